//! What a peer is told when it is refused: the one mapping from the core's [`Deny`] (and the
//! router's own refusals) to the wire pair, a stream [`Status`] and a QUIC application close
//! code. Every router call site that refuses or ends a stream or a connection takes its pair
//! from here, so one reason never reads differently on two paths.
//!
//! The rules:
//! - `REVOKED` says "what you had was taken away": a revoked certificate or identity, on any
//!   path (at connect too, where a revocation the handshake had not seen yet is caught), and,
//!   on something already open, a grant withdrawn or an identity deleted.
//! - `DENIED` says "you may not, now": an unknown identity or one of the wrong kind, a disabled
//!   or expired identity or an expired certificate (on every path: at connect, when a policy
//!   change re-admits an open connection, and when its expiry timer fires), and a stream that
//!   is not granted.
//! - A service that does not exist and one that is not granted get the same pair at each
//!   moment, so a peer cannot probe which services exist.

use umbra_policies::Deny;

use crate::stream::{codes, Status};

/// Whether the refusal answers a new request or ends something the peer already had; it
/// decides only whether a withdrawn grant reads as revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// A new connection or stream is being refused.
    Request,
    /// An admitted connection or a spliced stream is being ended (a policy change, a timer).
    Open,
}

/// The wire answer to a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The status byte answered to a stream request (unused once a stream is open).
    pub status: Status,
    /// The QUIC application code the stream is reset or the connection closed with.
    pub code: u32,
    /// The close reason sent with a connection close; it says no more than the code, except
    /// that an expiry says so (the peer's own certificate or identity, nothing it could probe).
    pub reason: &'static [u8],
}

impl Verdict {
    /// The router has no trustworthy policy (never synchronized, or stale) or is stopping:
    /// try another router.
    pub const NO_POLICY: Verdict = Verdict::new(Status::Unavailable, codes::SHUTDOWN, b"no policy");
    /// The router is shutting down: try another router.
    pub const STOPPING: Verdict =
        Verdict::new(Status::Unavailable, codes::SHUTDOWN, b"shutting down");
    /// Authorized, but the service (or every SDK host) could not be reached.
    pub const UNREACHABLE: Verdict = Verdict::new(Status::Unavailable, codes::UNAVAILABLE, b"");
    /// The peer broke the protocol (a malformed or forbidden request).
    pub const BAD_REQUEST: Verdict = Verdict::new(Status::BadRequest, codes::PROTOCOL, b"");
    /// A bound on what one identity (or the router) may hold was reached.
    pub const LIMIT: Verdict = Verdict::new(Status::Unavailable, codes::LIMIT, b"limit");

    const fn new(status: Status, code: u32, reason: &'static [u8]) -> Verdict {
        Verdict {
            status,
            code,
            reason,
        }
    }

    /// The one answer to `deny` at `moment`.
    pub fn of(deny: Deny, moment: Moment) -> Verdict {
        let revoked = Verdict::new(Status::Denied, codes::REVOKED, b"revoked");
        let denied = Verdict::new(Status::Denied, codes::DENIED, b"");
        let expired = Verdict::new(Status::Denied, codes::DENIED, b"expired");
        match (deny, moment) {
            (Deny::CertRevoked | Deny::IdentityRevoked, _) => revoked,
            (Deny::IdentityExpired | Deny::CertExpired, _) => expired,
            (Deny::IdentityDisabled | Deny::WrongKind, _) => denied,
            (Deny::NotGranted | Deny::NoHosting | Deny::UnknownIdentity, Moment::Request) => denied,
            (Deny::NotGranted | Deny::NoHosting | Deny::UnknownIdentity, Moment::Open) => revoked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Deny; 9] = [
        Deny::UnknownIdentity,
        Deny::IdentityDisabled,
        Deny::IdentityRevoked,
        Deny::IdentityExpired,
        Deny::NotGranted,
        Deny::WrongKind,
        Deny::CertRevoked,
        Deny::CertExpired,
        Deny::NoHosting,
    ];

    fn moment() -> impl Strategy<Value = Moment> {
        prop_oneof![Just(Moment::Request), Just(Moment::Open)]
    }

    proptest! {
        /// Every reason is a refusal in a code a client understands, never `Ok`.
        #[test]
        fn every_deny_is_a_refusal(i in 0..ALL.len(), m in moment()) {
            let v = Verdict::of(ALL[i], m);
            prop_assert_eq!(v.status, Status::Denied);
            prop_assert!([codes::DENIED, codes::REVOKED].contains(&v.code));
        }

        /// A missing service, a service without hosting and an ungranted one read the same.
        #[test]
        fn missing_and_ungranted_read_the_same(m in moment()) {
            prop_assert_eq!(Verdict::of(Deny::NotGranted, m), Verdict::of(Deny::NoHosting, m));
            prop_assert_eq!(
                Verdict::of(Deny::NotGranted, m),
                Verdict::of(Deny::UnknownIdentity, m)
            );
        }

        /// What the identity or its certificate is does not depend on the path that noticed.
        #[test]
        fn identity_reasons_read_the_same_on_every_path(i in 0..ALL.len()) {
            let d = ALL[i];
            let grant_level = matches!(d, Deny::NotGranted | Deny::NoHosting | Deny::UnknownIdentity);
            prop_assume!(!grant_level);
            prop_assert_eq!(Verdict::of(d, Moment::Request), Verdict::of(d, Moment::Open));
        }
    }

    #[test]
    fn the_codes_by_reason() {
        use Moment::{Open, Request};
        assert_eq!(Verdict::of(Deny::IdentityExpired, Open).code, codes::DENIED);
        assert_eq!(Verdict::of(Deny::IdentityExpired, Open).reason, b"expired");
        assert_eq!(
            Verdict::of(Deny::IdentityDisabled, Open).code,
            codes::DENIED
        );
        assert_eq!(
            Verdict::of(Deny::IdentityRevoked, Request).code,
            codes::REVOKED
        );
        assert_eq!(Verdict::of(Deny::CertRevoked, Request).code, codes::REVOKED);
        assert_eq!(Verdict::of(Deny::NotGranted, Request).code, codes::DENIED);
        assert_eq!(Verdict::of(Deny::NotGranted, Open).code, codes::REVOKED);
        assert_eq!(Verdict::NO_POLICY.code, codes::SHUTDOWN);
    }
}
