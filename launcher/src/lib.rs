//! Umbra's launcher: `umbra run`, one agent in a sealed sandbox whose only network is a tunneler.
//!
//! It is its own crate because it is the one place that joins the two: the sandbox
//! (`umbra-sandbox`, which knows nothing of the overlay) and the tunneler (`umbra-tunneler`, which
//! knows nothing of sandboxes). Both stay usable alone, and the dependency runs one way only:
//! launcher → tunneler → SDK, launcher → sandbox.
//!
//! `umbra tunnel --netns/--pid` ([`attach()`]) gives an agent that already runs in a container
//! the same network: the listeners, names and audit of `umbra run` (shared in `inside`), made in
//! a network namespace Umbra did not create.
//!
//! It also holds the escape suite behind `umbra verify` ([`verify`]), which runs the escape
//! probe through the same launcher and judges from the host what the probe cannot see.
//!
//! Everything it starts has an owner that stops it on every path out: the tunneler
//! ([`umbra_tunneler::Tunneler`] stops its task on drop), the sandbox (`Running` and its cgroup),
//! the DNS responder and the hosts writer (task sets that abort on drop). An early return
//! leaves nothing running.

pub mod attach;
mod inside;
pub mod metrics;
pub mod report;
mod resolver;
mod run;
pub mod verify;

pub use attach::{attach, AttachError, AttachOptions, Target};
pub use inside::Namespace;
pub use resolver::DNS_ADDR;
pub use run::{interrupted, run, Ending, RunError, RunOptions, RunOutcome, SANDBOX_CONNECTIONS};
