//! Whether an identity may act at all: kept with the identity and checked at lookup time, so
//! that time passing needs nothing and disabling or revoking needs no recompilation.

use crate::decision::Deny;
use crate::model::{Identity, Timestamp};

/// The part of an identity that decides whether it may act at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activity {
    disabled: bool,
    revoked: bool,
    expires_at: Option<Timestamp>,
}

impl Activity {
    pub(crate) fn of(identity: &Identity) -> Self {
        Activity {
            disabled: identity.disabled,
            revoked: identity.revoked,
            expires_at: identity.expires_at,
        }
    }

    /// Revocation is reported first (it is final), then disabling, then expiry.
    pub(crate) fn check(self, now: Timestamp) -> Result<(), Deny> {
        if self.revoked {
            Err(Deny::IdentityRevoked)
        } else if self.disabled {
            Err(Deny::IdentityDisabled)
        } else if self.expires_at.is_some_and(|e| now >= e) {
            Err(Deny::IdentityExpired)
        } else {
            Ok(())
        }
    }
}
