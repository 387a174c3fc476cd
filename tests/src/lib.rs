//! End-to-end tests: start the real controller (and later routers and tunnelers) on
//! `127.0.0.1:0` with fresh certificates and assert what a user would see.
