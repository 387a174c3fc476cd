//! Keeping an identity's certificate fresh in a long-running process.
//!
//! Identity certificates are short-lived (24 h by default), so every process that lives longer
//! than one certificate renews its own, with a fresh key, over mutual TLS with the current one
//! (`POST /v1/renew`). [`RenewingIdentity`] holds the current [`Credentials`], publishes each
//! renewal on a `watch` channel (readers take no lock on the hot path beyond the channel's
//! short read lock), optionally persists it, and runs the schedule: renew once the policy core
//! says renewal is due (`umbra_policies::renewal`: less than a third of the nominal validity
//! left), retry with backoff on failure, give up once the certificate has expired (the
//! controller refuses an expired certificate, so only re-enrollment helps).
//!
//! The wall time comes from the injected [`Clock`]; the waits are tokio's, so a test moves
//! both (a `ManualClock` and `tokio::time::pause`) instead of waiting.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use umbra_clock::Clock;
use umbra_pki::IdentityFile;
use umbra_policies::renewal::{self, RenewAt};
use umbra_policies::Timestamp;

use crate::client::ControllerClient;
use crate::credentials::Credentials;
use crate::error::SdkError;
use crate::failover::Rotation;
use crate::sync::lock;

/// How far the CA backdates `notBefore` for clock skew (`CertificateAuthority::issue`); not part
/// of the lifetime the controller meant to grant.
pub const ISSUE_BACKDATE: Duration = Duration::from_secs(renewal::ISSUE_BACKDATE_SECS);
/// The shortest wait between two renewals, however short the validity: a controller
/// configured with a tiny validity must not make every process renew in a tight loop.
pub const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(1);
/// First and largest pause between failed renewal attempts.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long one renewal attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait, from `now` (time since the Unix epoch), before renewing the certificate
/// valid from `not_before` to `not_after` (seconds since the epoch).
///
/// When renewal is due is the policy core's rule ([`umbra_policies::renewal::due`]: a 24 h
/// certificate renews 16 h after it was issued, a 6 s one after 4 s). The wait is never
/// shorter than [`MIN_RENEW_INTERVAL`], even when renewal is overdue: one renewal per interval
/// at most, whatever the validity.
pub fn renewal_delay(not_before: u64, not_after: u64, now: Duration) -> Duration {
    let at = renewal::due(
        Timestamp(not_before),
        Timestamp(not_after),
        Timestamp(now.as_secs()),
    );
    match at {
        RenewAt::Now => MIN_RENEW_INTERVAL,
        RenewAt::At(t) => Duration::from_secs(t.0)
            .saturating_sub(now)
            .max(MIN_RENEW_INTERVAL),
    }
}

/// How long to wait after `failures` failed attempts (1 for the first), never past half the
/// time the certificate has left, so that several attempts fit before it expires.
fn retry_delay(failures: u32, left: Duration) -> Duration {
    let backoff = RETRY_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16));
    backoff.min(RETRY_MAX).min(left / 2).max(RETRY_MIN / 2)
}

/// An identity that renews its own certificate: the current [`Credentials`], a `watch` of
/// every renewal, and (with [`RenewingIdentity::run`]) the schedule. Cheap to clone; clones
/// share everything.
#[derive(Clone)]
pub struct RenewingIdentity {
    shared: Arc<Shared>,
}

struct Shared {
    tx: watch::Sender<Arc<Credentials>>,
    /// The controllers' addresses (the identity file's, or the ones given instead).
    controllers: Arc<[String]>,
    /// Which controller answered last and which failed, shared by every client of this
    /// identity (the renewal's, a router's control channel, a context's calls and watches),
    /// so that all go to a controller known to answer.
    rotation: Arc<Mutex<Rotation>>,
    /// Where each renewal is saved (0600), if anywhere.
    path: Mutex<Option<PathBuf>>,
    /// One renewal at a time: two concurrent ones would both succeed and the earlier result
    /// would be thrown away.
    renewing: tokio::sync::Mutex<()>,
    /// Where the schedule reads the time.
    clock: Clock,
}

impl std::fmt::Debug for RenewingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RenewingIdentity")
            .field("current", &*self.current())
            .finish_non_exhaustive()
    }
}

impl RenewingIdentity {
    /// Starts from `identity`, renewing with the controllers at `controller` (one `host:port`
    /// or a comma-separated list; default: the file's) on the schedule `clock` tells
    /// (production: `Clock::system()`). Nothing runs until [`RenewingIdentity::run`] is
    /// spawned. Renewals keep the file's own controller list, whatever `controller` says.
    pub fn new(
        identity: IdentityFile,
        controller: Option<&str>,
        clock: Clock,
    ) -> Result<RenewingIdentity, SdkError> {
        let controllers: Arc<[String]> = crate::client::controllers(&identity, controller)?
            .iter()
            .map(ToString::to_string)
            .collect();
        let creds = Credentials::new(identity, clock.clone())?;
        let (tx, _) = watch::channel(Arc::new(creds));
        Ok(RenewingIdentity {
            shared: Arc::new(Shared {
                tx,
                rotation: Arc::new(Mutex::new(Rotation::new(controllers.len()))),
                controllers,
                path: Mutex::new(None),
                renewing: tokio::sync::Mutex::new(()),
                clock,
            }),
        })
    }

    /// The current credentials.
    pub fn current(&self) -> Arc<Credentials> {
        Arc::clone(&self.shared.tx.borrow())
    }

    /// The current identity file (the newest certificate and key).
    pub fn identity(&self) -> Arc<IdentityFile> {
        Arc::clone(self.current().identity())
    }

    /// A receiver that sees every renewal (persist it, rebuild a server configuration, ...).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Credentials>> {
        self.shared.tx.subscribe()
    }

    /// Saves every later renewal to `path` (atomically, mode 0600), so that a restart starts
    /// from the newest certificate rather than one that may have expired. `None` stops saving.
    pub fn set_path(&self, path: Option<PathBuf>) {
        *lock(&self.shared.path) = path;
    }

    /// A controller client that authenticates with the current certificate on every new
    /// connection. Every client made here shares what it learns about which controller
    /// answers.
    pub fn controller(&self) -> ControllerClient {
        ControllerClient::live(
            Arc::clone(&self.shared.controllers),
            Arc::clone(&self.shared.rotation),
            self.subscribe(),
        )
    }

    /// Renews now: a fresh key, a certificate for it, saved (if a path is set) and published.
    pub async fn renew_now(&self) -> Result<Arc<Credentials>, SdkError> {
        let _one = self.shared.renewing.lock().await;
        let old = self.current();
        let renewed = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            // The live client presents `old`: one renewal at a time, and this one has not
            // been published yet.
            crate::enroll::renew_via(old.identity(), &self.controller()),
        )
        .await
        .map_err(|_| SdkError::Timeout("renewal".into()))??;
        let creds = Arc::new(Credentials::new(renewed, self.shared.clock.clone())?);
        let path = lock(&self.shared.path).clone();
        if let Some(path) = path {
            let file = Arc::clone(creds.identity());
            let target = path.clone();
            let saved = tokio::task::spawn_blocking(move || file.save(&target)).await;
            match saved {
                Ok(Ok(())) => {
                    tracing::debug!(path = %path.display(), "renewed identity saved")
                }
                // The new certificate is still used: the old one in the file stays valid
                // until it expires, and the next renewal tries to save again.
                Ok(Err(e)) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot save the renewed identity")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot save the renewed identity")
                }
            }
        }
        tracing::info!(
            identity = %creds.leaf().spiffe,
            old_serial = %old.leaf().serial,
            serial = %creds.leaf().serial,
            not_after = creds.leaf().not_after.0,
            "certificate renewed"
        );
        self.shared.tx.send_replace(Arc::clone(&creds));
        Ok(creds)
    }

    /// Renews on schedule until `cancel` fires or the certificate expires unrenewed. Spawn it
    /// once per identity (the owner of the task ends it with `cancel`).
    pub async fn run(self, cancel: CancellationToken) {
        let spiffe = self.current().leaf().spiffe.to_string();
        let span = tracing::info_span!("renewal", identity = %spiffe);
        tracing::Instrument::instrument(self.run_inner(cancel), span).await
    }

    async fn run_inner(self, cancel: CancellationToken) {
        let mut failures = 0u32;
        let mut rx = self.subscribe();
        loop {
            let current = Arc::clone(&rx.borrow_and_update());
            let leaf = current.leaf();
            let now = self.shared.clock.since_epoch();
            let left = Duration::from_secs(leaf.not_after.0).saturating_sub(now);
            let wait = if failures == 0 {
                renewal_delay(leaf.not_before.0, leaf.not_after.0, now)
            } else {
                retry_delay(failures, left)
            };
            tracing::debug!(in_ms = wait.as_millis() as u64, "next renewal");
            // The first attempt waits for a date on the injected clock (so a test that moves
            // the clock is not kept waiting) and, however overdue, the floor in real time; a
            // retry waits its backoff in real time only.
            let due = UNIX_EPOCH + now + wait;
            let until_due = async {
                let floor = tokio::time::sleep(if failures == 0 {
                    MIN_RENEW_INTERVAL
                } else {
                    wait
                });
                if failures == 0 {
                    tokio::join!(floor, self.shared.clock.sleep_until(due));
                } else {
                    floor.await;
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                // Someone else renewed (`renew_now`): schedule from the new certificate.
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    failures = 0;
                    continue;
                }
                _ = until_due => {}
            }
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.renew_now() => r,
            };
            match attempt {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let left = Duration::from_secs(leaf.not_after.0)
                        .saturating_sub(self.shared.clock.since_epoch());
                    if left.is_zero() {
                        tracing::error!(error = %e, serial = %leaf.serial, "certificate expired before it could be renewed; the identity must enroll again");
                        return;
                    }
                    tracing::warn!(error = %e, attempt = failures, left_s = left.as_secs(), "certificate renewal failed; retrying");
                }
            }
            // Our own publication is not news.
            rx.borrow_and_update();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 3600;

    #[test]
    fn renews_after_two_thirds_of_the_nominal_validity() {
        let issued = 1_000_000;
        let (nb, na) = (issued - 300, issued + DAY);
        // At issuance: wait 16 h (a third of 24 h is left then), not counting the backdate.
        let d = renewal_delay(nb, na, Duration::from_secs(issued));
        assert_eq!(d, Duration::from_secs(16 * 3600));
        // Later, the wait shrinks with the time that passed.
        let d = renewal_delay(nb, na, Duration::from_secs(issued + 3600));
        assert_eq!(d, Duration::from_secs(15 * 3600));
    }

    #[test]
    fn overdue_and_tiny_validities_are_floored() {
        let issued = 1_000_000;
        // Overdue: renew soon, but not in a tight loop.
        assert_eq!(
            renewal_delay(issued - 300, issued + 60, Duration::from_secs(issued + 59)),
            MIN_RENEW_INTERVAL
        );
        // Expired, or a validity of zero: same floor.
        assert_eq!(
            renewal_delay(issued, issued, Duration::from_secs(issued + 10)),
            MIN_RENEW_INTERVAL
        );
        // Three seconds of validity (plus the backdate): renew after two.
        let d = renewal_delay(issued - 300, issued + 3, Duration::from_secs(issued));
        assert_eq!(d, Duration::from_secs(2));
        // A certificate shorter than the backdate was not backdated by our CA.
        let d = renewal_delay(issued, issued + 300, Duration::from_secs(issued));
        assert_eq!(d, Duration::from_secs(200));
        // Six seconds: renew after four, not every second.
        let d = renewal_delay(issued - 300, issued + 6, Duration::from_secs(issued));
        assert_eq!(d, Duration::from_secs(4));
    }

    #[test]
    fn retries_back_off_but_fit_before_expiry() {
        let day = Duration::from_secs(DAY);
        assert_eq!(retry_delay(1, day), RETRY_MIN);
        assert_eq!(retry_delay(2, day), RETRY_MIN * 2);
        assert_eq!(retry_delay(40, day), RETRY_MAX);
        assert_eq!(
            retry_delay(40, Duration::from_secs(10)),
            Duration::from_secs(5)
        );
        assert_eq!(retry_delay(40, Duration::ZERO), RETRY_MIN / 2);
    }
}
