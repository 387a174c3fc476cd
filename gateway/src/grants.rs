//! Who may call the gateway's service, and with what limits: the grants of the controller's
//! policy, as the gateway's own edge view lists them, plus the per-minute request windows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use umbra_policies::IdentityId;
use umbra_proto::api::{EdgeView, HostedGrant};

/// The grants to dial one service, by caller.
#[derive(Debug, Default, Clone)]
pub struct Grants {
    by_identity: HashMap<IdentityId, Vec<HostedGrant>>,
}

impl Grants {
    /// The grants for `service` in a host's edge view.
    pub fn from_view(view: &EdgeView, service: &str) -> Grants {
        let mut by_identity: HashMap<IdentityId, Vec<HostedGrant>> = HashMap::new();
        for s in view
            .services
            .iter()
            .filter(|s| s.bind && s.name.as_str() == service)
        {
            for g in &s.grants {
                by_identity
                    .entry(g.identity.clone())
                    .or_default()
                    .push(g.clone());
            }
        }
        Grants { by_identity }
    }

    /// A caller's grants (empty: none, or not known yet).
    pub fn of(&self, id: &IdentityId) -> &[HostedGrant] {
        self.by_identity.get(id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The grants of a caller that allow `model`.
    pub fn for_model<'a>(&'a self, id: &IdentityId, model: &str) -> Vec<&'a HostedGrant> {
        self.of(id)
            .iter()
            .filter(|g| g.models.as_ref().is_none_or(|m| m.matches(model)))
            .collect()
    }
}

/// Sliding one-minute windows of requests per (identity, policy).
#[derive(Debug, Default)]
pub struct RateWindows {
    windows: Mutex<HashMap<(IdentityId, String), VecDeque<Instant>>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl RateWindows {
    /// Takes one request from the window if `rpm` allows it now; otherwise how long until it
    /// would.
    pub fn take(
        &self,
        id: &IdentityId,
        policy: &str,
        rpm: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let q = w.entry((id.clone(), policy.to_string())).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            q.pop_front();
        }
        if q.len() >= rpm as usize {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        q.push_back(now);
        Ok(())
    }

    /// Whether a request would be admitted now, without taking it.
    pub fn has_room(
        &self,
        id: &IdentityId,
        policy: &str,
        rpm: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let Some(q) = w.get(&(id.clone(), policy.to_string())) else {
            return Ok(());
        };
        let live: Vec<&Instant> = q
            .iter()
            .filter(|t| now.duration_since(**t) < WINDOW)
            .collect();
        if live.len() >= rpm as usize {
            let oldest = live.first().map(|t| **t).unwrap_or(now);
            return Err(WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide() {
        let r = RateWindows::default();
        let id = IdentityId::new("id-1").unwrap();
        let t0 = Instant::now();
        assert!(r.take(&id, "p", 2, t0).is_ok());
        assert!(r.take(&id, "p", 2, t0 + Duration::from_secs(1)).is_ok());
        let wait = r
            .take(&id, "p", 2, t0 + Duration::from_secs(2))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(58));
        assert!(r.has_room(&id, "other", 1, t0).is_ok(), "per policy");
        assert!(r.take(&id, "p", 2, t0 + Duration::from_secs(61)).is_ok());
    }
}
