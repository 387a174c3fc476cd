//! Turning the facts behind a decision into one sentence an operator can act on.

use crate::decision::{Deny, Explanation, Permit};
use crate::model::{Action, Identity, IdentityId, Timestamp};
use crate::name::Name;

/// Everything the index found out about one question.
pub(super) struct Facts<'a> {
    pub(super) identity: Option<&'a Identity>,
    pub(super) id: &'a IdentityId,
    pub(super) service: &'a str,
    pub(super) service_exists: bool,
    pub(super) action: Action,
    pub(super) now: Timestamp,
    pub(super) granting: Vec<Name>,
    pub(super) decision: Result<Permit, Deny>,
}

impl Facts<'_> {
    pub(super) fn into_explanation(self) -> Explanation {
        let reason = self.reason();
        Explanation {
            identity: self.identity.map(|i| i.name.clone()),
            service_exists: self.service_exists,
            granting: self.granting,
            decision: self.decision,
            reason,
        }
    }

    fn reason(&self) -> String {
        let (action, service) = (self.action, self.service);
        let Some(identity) = self.identity else {
            return format!("No identity has id {:?}.", self.id.as_str());
        };
        let who = &identity.name;
        let state = match &self.decision {
            Ok(permit) => {
                let others = match self.granting.len() {
                    0 | 1 => String::new(),
                    2 => " (1 other policy also grants it)".to_owned(),
                    n => format!(" ({} other policies also grant it)", n - 1),
                };
                return format!(
                    "{who} may {action} {service:?} through policy {}{others}.",
                    permit.policy
                );
            }
            Err(Deny::NotGranted | Deny::UnknownIdentity) if !self.service_exists => {
                return format!("There is no service named {service:?}.");
            }
            Err(Deny::NotGranted | Deny::UnknownIdentity) => {
                return format!("No {action} policy selects both {who} and {service:?}.");
            }
            // Only `judge` gives these; `Index::check` never does.
            Err(Deny::WrongKind | Deny::CertRevoked | Deny::CertExpired | Deny::NoHosting) => {
                return format!("{who} may not {action} {service:?}.");
            }
            Err(Deny::IdentityRevoked) => "revoked".to_owned(),
            Err(Deny::IdentityDisabled) => "disabled".to_owned(),
            Err(Deny::IdentityExpired) => match identity.expires_at {
                Some(t) => format!("expired (at {}, now is {})", t.0, self.now.0),
                None => "expired".to_owned(),
            },
        };
        let otherwise = match self.granting.first() {
            Some(p) => format!(", though policy {p} would otherwise grant it"),
            None => String::new(),
        };
        format!("{who} is {state}, so it may not {action} {service:?}{otherwise}.")
    }
}
