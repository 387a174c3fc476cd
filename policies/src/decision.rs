//! The outcome of an authorization question: a permit naming the policy that grants it, or the
//! reason for a refusal.

use crate::name::Name;

/// Access is granted. Carries the granting policy so that every allowed session can be logged
/// and audited against the rule that let it through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Permit {
    /// The granting policy; when several grant, the first by name, so the answer is stable.
    pub policy: Name,
}

/// Access is refused, and why.
///
/// A service that does not exist and one the identity is not granted both give
/// [`Deny::NotGranted`], so that a caller cannot learn which services exist by probing names.
/// The shells never choose what a peer is told themselves: `umbra_proto::verdict` maps every
/// reason to the wire, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Deny {
    /// No identity has this id.
    #[error("unknown identity")]
    UnknownIdentity,
    /// The identity is disabled until an operator enables it again.
    #[error("identity is disabled")]
    IdentityDisabled,
    /// The identity is revoked for good.
    #[error("identity is revoked")]
    IdentityRevoked,
    /// The identity's expiry time has passed.
    #[error("identity has expired")]
    IdentityExpired,
    /// No policy grants this identity this action on a service of this name (or there is no
    /// such service).
    #[error("not granted")]
    NotGranted,
    /// The certificate's identity exists but is of a kind that may not use this door (only
    /// agents use the data plane, only admins the management API, only routers the control
    /// channel).
    #[error("identity kind may not connect here")]
    WrongKind,
    /// The certificate's serial is revoked (its identity was revoked or deleted).
    #[error("certificate revoked")]
    CertRevoked,
    /// The certificate's validity has ended while its connection was open.
    #[error("certificate has expired")]
    CertExpired,
    /// Granted, but the service has no hosting to send the stream to. Unreachable while the
    /// view is consistent (a granted service exists); kept apart so that a view caught between
    /// two updates refuses rather than guesses, and told to peers exactly as
    /// [`Deny::NotGranted`].
    #[error("no hosting for the service")]
    NoHosting,
}

impl Deny {
    /// The reason in a few words (what `Display` prints), for logs and for error types that
    /// hold a `&'static str`.
    pub fn reason(self) -> &'static str {
        match self {
            Deny::UnknownIdentity => "unknown identity",
            Deny::IdentityDisabled => "identity is disabled",
            Deny::IdentityRevoked => "identity is revoked",
            Deny::IdentityExpired => "identity has expired",
            Deny::NotGranted => "not granted",
            Deny::WrongKind => "identity kind may not connect here",
            Deny::CertRevoked => "certificate revoked",
            Deny::CertExpired => "certificate has expired",
            Deny::NoHosting => "no hosting for the service",
        }
    }
}

/// Why a decision came out as it did, for operators (`umbra explain`) and audit logs. Unlike a
/// bare [`Deny`], it says whether the service exists, so it must only be shown to admins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The identity's name, if the id is known.
    pub identity: Option<Name>,
    /// Whether a service of the asked name exists.
    pub service_exists: bool,
    /// Every policy that grants the action on the service to the identity, by name, whether or
    /// not the identity is active right now.
    pub granting: Vec<Name>,
    /// The decision itself, exactly as the index's `check` gives it.
    pub decision: Result<Permit, Deny>,
    /// One sentence for a person.
    pub reason: String,
}
