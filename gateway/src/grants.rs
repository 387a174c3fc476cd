//! Who may call the gateway's service, and with what limits: the grants of the controller's
//! policy, as the gateway's own edge view lists them, plus the per-minute request windows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use umbra_policies::{IdentityId, Rpm};
use umbra_proto::api::{EdgeView, HostedGrant};
use umbra_sdk::{Context, SdkError};

/// How long the last grants are honoured while the controller cannot be reached.
const STALE_GRANTS: Duration = Duration::from_secs(60);

/// Follows the host's edge view and keeps the grants of `service` current in a watch channel,
/// reconnecting when the controller goes away. While it is away the last grants stay (the
/// routers still decide who reaches the service at all), for at most a minute; then nobody is
/// served. Returns once the first view has arrived.
pub async fn follow(
    ctx: Context,
    service: &str,
) -> Result<(watch::Receiver<Arc<Grants>>, tokio::task::JoinHandle<()>), SdkError> {
    let mut watch_edge = ctx.watch_edge().await?;
    let first = watch_edge
        .next()
        .await?
        .map(|v| Grants::from_view(&v, service))
        .unwrap_or_default();
    let (tx, rx) = watch::channel(Arc::new(first));
    let svc = service.to_string();
    let task = tokio::spawn(async move {
        let mut lost_since: Option<Instant> = None;
        loop {
            while let Ok(Some(view)) = watch_edge.next().await {
                lost_since = None;
                tx.send_replace(Arc::new(Grants::from_view(&view, &svc)));
            }
            loop {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > STALE_GRANTS {
                    tx.send_replace(Arc::new(Grants::default()));
                }
                match ctx.watch_edge().await {
                    Ok(w) => {
                        watch_edge = w;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the controller");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    });
    Ok((rx, task))
}

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
            .filter(|g| g.limits.allows_model(model))
            .collect()
    }
}

/// Sliding one-minute windows of requests per (identity, policy), on tokio's monotonic clock
/// (so `tokio::time::pause` moves them in a test).
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
        rpm: Rpm,
        now: Instant,
    ) -> Result<(), Duration> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let q = w.entry((id.clone(), policy.to_string())).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            q.pop_front();
        }
        if q.len() >= rpm.get() as usize {
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
        rpm: Rpm,
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
        if live.len() >= rpm.get() as usize {
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
        let (one, two) = (Rpm::try_from(1).unwrap(), Rpm::try_from(2).unwrap());
        assert!(r.take(&id, "p", two, t0).is_ok());
        assert!(r.take(&id, "p", two, t0 + Duration::from_secs(1)).is_ok());
        let wait = r
            .take(&id, "p", two, t0 + Duration::from_secs(2))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(58));
        assert!(r.has_room(&id, "other", one, t0).is_ok(), "per policy");
        assert!(r.take(&id, "p", two, t0 + Duration::from_secs(61)).is_ok());
    }
}
