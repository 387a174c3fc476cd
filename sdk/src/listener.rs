//! Hosting a service through routers: the registrations (`Op::Bind` streams, one per router)
//! and the task that keeps them alive.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use umbra_pki::Serial;
use umbra_policies::Name;
use umbra_proto::stream::Op;

use crate::context::{request, Caller, Context, Early, Incoming, RouterTarget};
use crate::error::SdkError;
use crate::stream::{read_error, Stream};
use crate::sync::lock;

/// Callers queued for a listener that is not accepting; more are refused.
const ACCEPT_BACKLOG: usize = 128;

// Hosting is the listener's business; `Context` knows only the registry of listeners its
// connections hand incoming streams to, so the modules depend one way: listener → context.
impl Context {
    /// Hosts `service` on every router the controller lists: callers that dial it arrive on the
    /// returned listener, with no listening port here. Needs a Bind grant. The listener keeps
    /// its registrations alive: it binds again after a router connection is lost, and on routers
    /// that appear later. One listener per service per context.
    pub async fn bind(&self, service: &str) -> Result<Listener, SdkError> {
        let name = Name::new(service).map_err(|_| SdkError::Denied {
            service: service.to_owned(),
        })?;
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let ours = tx.downgrade();
        lock(self.listeners()).insert(name.clone(), tx);
        match bind_all(self, &name, &HashSet::new(), false).await {
            Ok(binds) if !binds.is_empty() => {
                Ok(Listener::start(self.clone(), name, (rx, ours), binds))
            }
            Ok(_) => {
                forget(self, &name, &ours);
                Err(SdkError::Unavailable("every router".into()))
            }
            Err(e) => {
                forget(self, &name, &ours);
                Err(e)
            }
        }
    }
}

/// Removes `name`'s listener from the context if it is still the one whose channel `ours` is:
/// a listener dropped late (its task aborted and dropped whenever the runtime got to it, as when
/// a gateway is restarted in its process) must not remove the one a new `bind` of the same
/// service put there meanwhile, which would then refuse every caller.
fn forget(ctx: &Context, name: &Name, ours: &mpsc::WeakSender<Incoming>) {
    let mut listeners = lock(ctx.listeners());
    let still_ours = listeners
        .get(name)
        .is_some_and(|tx| ours.upgrade().is_some_and(|o| o.same_channel(tx)));
    if still_ours {
        listeners.remove(name);
    }
}

/// How often a listener looks for routers it is not registered with.
const REFRESH: Duration = Duration::from_secs(30);
/// First and largest pause before binding again after a registration was lost.
const REBIND_MIN: Duration = Duration::from_millis(100);
const REBIND_MAX: Duration = Duration::from_secs(5);

/// One router's registration.
pub(crate) struct Binding {
    router: RouterTarget,
    /// The certificate the connection carrying it was made with.
    serial: Serial,
    send: SendStream,
    recv: RecvStream,
}

/// Registers `service` with every listed router not in `skip`. Refusals by policy are
/// returned at once; routers that cannot be reached are left for later. With `fresh`, only
/// over connections made with the current certificate.
pub(crate) async fn bind_all(
    ctx: &Context,
    service: &Name,
    skip: &HashSet<RouterTarget>,
    fresh: bool,
) -> Result<Vec<Binding>, SdkError> {
    let mut binds = Vec::new();
    for router in ctx.routers(true).await? {
        if skip.contains(&router) {
            continue;
        }
        let (conn, serial) = match ctx.connection_with(&router, !fresh).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%router, error = %e, "router unreachable; will bind later");
                continue;
            }
        };
        match request(&conn, Op::Bind, service, &mut Early::none()).await {
            Ok((send, recv)) => binds.push(Binding {
                router,
                serial,
                send,
                recv,
            }),
            Err(e) if e.try_another_router() => {
                tracing::debug!(%router, error = %e, "bind failed; will retry")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(binds)
}

/// Waits until a registration ends; says why.
async fn held(mut b: Binding) -> (RouterTarget, SdkError) {
    let mut sink = [0u8; 64];
    let why = loop {
        match b.recv.read(&mut sink).await {
            Ok(Some(_)) => continue,
            Ok(None) => break SdkError::Disconnected("the router ended the registration".into()),
            Err(e) => break read_error(e, "bind"),
        }
    };
    // Keep the send side until here: dropping it would end the registration.
    drop(b.send);
    (b.router, why)
}

/// Callers of a service this identity hosts.
pub struct Listener {
    service: Name,
    rx: mpsc::Receiver<Incoming>,
    /// Its entry in the context's listeners, to remove only that one.
    ours: mpsc::WeakSender<Incoming>,
    keeper: tokio::task::JoinHandle<()>,
    ctx: Context,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Listener {
    pub(crate) fn start(
        ctx: Context,
        service: Name,
        (rx, ours): (mpsc::Receiver<Incoming>, mpsc::WeakSender<Incoming>),
        binds: Vec<Binding>,
    ) -> Listener {
        let keeper = tokio::spawn(keep(ctx.clone(), service.clone(), binds, ours.clone()));
        Listener {
            service,
            rx,
            ours,
            keeper,
            ctx,
        }
    }

    /// The next caller: a stream and who it is. Fails with [`SdkError::Revoked`] or
    /// [`SdkError::Denied`] once this identity may no longer host the service.
    pub async fn accept(&mut self) -> Result<(Stream, Caller), SdkError> {
        self.rx.recv().await.ok_or(SdkError::Revoked)
    }

    /// The hosted service.
    pub fn service(&self) -> &Name {
        &self.service
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.keeper.abort();
        forget(&self.ctx, &self.service, &self.ours);
    }
}

/// Holds the registrations; binds again where one is lost, and on new routers. Ends (closing
/// the listener) when binding is refused by policy.
///
/// After a certificate renewal it registers again over connections made with the new
/// certificate, and only then drops each router's old registration: a router closes a
/// connection when the certificate it was made with expires, and callers should not see that
/// moment. (A router takes one registration per service per connection, so the two are never on
/// the same connection.)
async fn keep(ctx: Context, service: Name, binds: Vec<Binding>, ours: mpsc::WeakSender<Incoming>) {
    let mut held_binds = JoinSet::new();
    // Each router's registration: the task holding it, and the certificate it was made with.
    let mut bound: HashMap<RouterTarget, (AbortHandle, Serial)> = HashMap::new();
    for b in binds {
        let (router, serial) = (b.router.clone(), b.serial.clone());
        bound.insert(router, (held_binds.spawn(held(b)), serial));
    }
    let mut renewals = ctx.watch_identity();
    renewals.borrow_and_update();
    let mut backoff = REBIND_MIN;
    loop {
        let (wait, renewed) = tokio::select! {
            Some(ended) = held_binds.join_next_with_id(), if !held_binds.is_empty() => {
                // A registration replaced after a renewal was aborted: not a loss.
                if let Ok((id, (router, why))) = ended {
                    if bound.get(&router).is_some_and(|(h, _)| h.id() == id) {
                        tracing::info!(%router, service = %service, reason = %why, "registration lost");
                        bound.remove(&router);
                    }
                }
                (backoff, false)
            }
            Ok(()) = renewals.changed() => {
                renewals.borrow_and_update();
                (Duration::ZERO, true)
            }
            _ = tokio::time::sleep(REFRESH) => (Duration::ZERO, false),
        };
        tokio::time::sleep(wait).await;
        let skip: HashSet<RouterTarget> = if renewed {
            let current = ctx.watch_identity().borrow().leaf().serial.clone();
            (bound.iter())
                .filter(|(_, (_, serial))| *serial == current)
                .map(|(router, _)| router.clone())
                .collect()
        } else {
            bound.keys().cloned().collect()
        };
        match bind_all(&ctx, &service, &skip, renewed).await {
            Ok(new) => {
                backoff = if new.is_empty() {
                    (backoff * 2).min(REBIND_MAX)
                } else {
                    REBIND_MIN
                };
                for b in new {
                    tracing::info!(router = %b.router, service = %service, serial = %b.serial, "registered");
                    let (router, serial) = (b.router.clone(), b.serial.clone());
                    let handle = held_binds.spawn(held(b));
                    if let Some((old, _)) = bound.insert(router, (handle, serial)) {
                        // Both took callers until here; the one on the old certificate goes.
                        old.abort();
                    }
                }
            }
            Err(SdkError::Denied { .. } | SdkError::Revoked) => {
                tracing::warn!(service = %service, "no longer allowed to host: listener closed");
                held_binds.shutdown().await;
                forget(&ctx, &service, &ours);
                return;
            }
            Err(e) => {
                tracing::debug!(service = %service, error = %e, "binding again failed");
                backoff = (backoff * 2).min(REBIND_MAX);
            }
        }
    }
}
