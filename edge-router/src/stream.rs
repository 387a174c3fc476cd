//! One QUIC stream: read the request within a deadline, ask the core's `check_stream`, then
//! connect and splice while watching the policy, ending the stream with the code
//! `umbra_proto::verdict` gives the reason the moment the judge no longer allows it.

use std::sync::Arc;

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio_util::sync::CancellationToken;
use umbra_pki::PeerCert;
use umbra_policies::{check_stream, Deny, IdentityId, Name, StreamPermit, StreamRequest, Target};
use umbra_proto::stream::{
    decode_request_header, decode_response, encode_request, encode_response, IncomingRequest, Op,
    ServiceRequest, Status, StreamFrameError,
};
use umbra_proto::verdict::{Moment, Verdict};

use crate::hosts::Host;
use crate::logbudget::budgeted;
use crate::metrics::Action;
use crate::policy::{Policy, PolicyRx};
use crate::server::Shared;
use crate::splice;
use crate::stats::bump;

/// What every stream of a connection knows about it.
pub(crate) struct ConnCtx {
    pub id: IdentityId,
    pub peer: PeerCert,
    pub conn: Connection,
    pub shared: Arc<Shared>,
}

/// Why a request frame was not accepted.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{0}")]
    Frame(#[from] StreamFrameError),
    #[error("reading the request: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("the request took too long")]
    Timeout,
}

async fn read_request(recv: &mut RecvStream) -> Result<(Op, ServiceRequest), RequestError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header).await?;
    let (op, len) = decode_request_header(header)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await?;
    let req = serde_json::from_slice(&payload).map_err(StreamFrameError::from)?;
    Ok((op, req))
}

/// Answers with a refusal and ends the stream both ways.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, verdict: Verdict) {
    let reply = encode_response(verdict.status);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.write_all(&reply)).await;
    let _ = send.finish();
    let _ = recv.stop(VarInt::from_u32(verdict.code));
}

/// Resets what is left of a stream both ways.
fn reset(send: &mut SendStream, recv: &mut RecvStream, code: u32) {
    let _ = send.reset(VarInt::from_u32(code));
    let _ = recv.stop(VarInt::from_u32(code));
}

/// The judge's answer for a stream of this connection at `t`: the connection must still be
/// admitted as the identity it was admitted as, and the stream granted to it.
fn judge(
    ctx: &ConnCtx,
    p: &Policy,
    request: StreamRequest<'_>,
    t: umbra_policies::Timestamp,
) -> Result<StreamPermit, Deny> {
    p.readmit(&ctx.peer, &ctx.id, t)?;
    check_stream(&p.index, &ctx.id, request, t)
}

/// Handles one stream a client opened.
pub(crate) async fn handle(
    ctx: Arc<ConnCtx>,
    mut send: SendStream,
    mut recv: RecvStream,
    cancel: CancellationToken,
) {
    let _slot = match ctx.shared.books.open_stream(&ctx.id) {
        Ok(slot) => slot,
        Err(limit) => {
            budgeted!(ctx.shared.logs, warn, %limit, "stream refused");
            bump(&ctx.shared.stats.limited);
            ctx.shared.metrics.refused("limited");
            reset(&mut send, &mut recv, Verdict::LIMIT.code);
            return;
        }
    };
    let req = tokio::time::timeout(ctx.shared.limits.request_timeout, read_request(&mut recv))
        .await
        .unwrap_or(Err(RequestError::Timeout));
    let (op, service) = match req {
        Ok((op, r)) => (op, r.service),
        Err(e) => {
            budgeted!(ctx.shared.logs, info, error = %e, "bad request refused");
            bump(&ctx.shared.stats.bad_requests);
            ctx.shared.metrics.refused("bad_request");
            refuse(&mut send, &mut recv, Verdict::BAD_REQUEST).await;
            return;
        }
    };
    tracing::Span::current().record("service", service.as_str());
    match op {
        Op::Dial => dial(&ctx, send, recv, service, cancel).await,
        Op::Bind => bind(&ctx, send, recv, service, cancel).await,
        Op::Incoming => {
            budgeted!(
                ctx.shared.logs,
                info,
                "a client may not send Incoming: refused"
            );
            bump(&ctx.shared.stats.bad_requests);
            refuse(&mut send, &mut recv, Verdict::BAD_REQUEST).await;
        }
    }
}

/// The current policy, marked seen so that the next change wakes the caller.
fn current(rx: &mut PolicyRx) -> Option<Arc<Policy>> {
    rx.borrow_and_update().clone()
}

async fn dial(
    ctx: &ConnCtx,
    mut send: SendStream,
    mut recv: RecvStream,
    service: Name,
    cancel: CancellationToken,
) {
    let mut rx = ctx.shared.policy.clone();
    let Some(policy) = current(&mut rx) else {
        refuse(&mut send, &mut recv, Verdict::NO_POLICY).await;
        return;
    };
    let request = StreamRequest::Dial(service.as_str());
    let started = std::time::Instant::now();
    let t = ctx.shared.clock.timestamp();
    let permit = match ctx.shared.metrics.check(|| judge(ctx, &policy, request, t)) {
        Ok(p) => p,
        Err(why) => {
            // The same answer whether the service exists or not (`Verdict::of`).
            tracing::debug!(decision = "deny", action = "dial", reason = %why, "stream refused");
            bump(&ctx.shared.stats.streams_denied);
            ctx.shared
                .metrics
                .denied(Action::Dial, &service, &policy, why);
            (ctx.shared.reports).refused(&ctx.peer.spiffe, service.as_str(), "dial", why);
            refuse(&mut send, &mut recv, Verdict::of(why, Moment::Request)).await;
            return;
        }
    };
    let Ok(grant) = crate::grant_limits::charge(ctx, &policy, &service, &permit) else {
        refuse(&mut send, &mut recv, Verdict::LIMIT).await;
        return;
    };
    let pace = grant.as_ref().and_then(|g| g.shaper());
    tracing::debug!(decision = "allow", action = "dial", policy = %permit.policy, "stream allowed");
    bump(&ctx.shared.stats.streams_allowed);
    ctx.shared.metrics.allowed(Action::Dial, &service);
    drop(policy);
    let spiffe = &ctx.peer.spiffe;
    let (svc, granted) = (service.as_str(), permit.policy.as_str());
    let report = (ctx.shared.reports).allowed(spiffe, svc, "dial", granted, started);
    let (up, down) = ctx.shared.metrics.tallies(&service);
    let charges = splice::Charges {
        pace,
        up: &up,
        down: &down,
    };
    let end = match permit.target {
        Target::Address {
            address: target,
            proxy_protocol,
        } => {
            let connect = crate::egress::connect(&target, ctx.shared.limits.connect_timeout);
            let connected = tokio::select! {
                _ = cancel.cancelled() => return,
                c = connect => c,
            };
            let (tcp, addr) = match connected {
                Ok(c) => c,
                Err(e) => {
                    budgeted!(ctx.shared.logs, warn, %target, error = %e, "service unreachable");
                    refuse(&mut send, &mut recv, Verdict::UNREACHABLE).await;
                    return;
                }
            };
            tracing::debug!(%addr, "connected to service");
            let mut tcp = tcp;
            if proxy_protocol {
                let id = ctx.peer.spiffe.to_string();
                let header =
                    crate::proxy::header(ctx.conn.remote_address(), addr, &id, ctx.id.as_str());
                if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut tcp, &header).await {
                    budgeted!(ctx.shared.logs, warn, error = %e, "service closed before the PROXY header");
                    refuse(&mut send, &mut recv, Verdict::UNREACHABLE).await;
                    return;
                }
            }
            if send.write_all(&encode_response(Status::Ok)).await.is_err() {
                return;
            }
            let (r, w) = tcp.into_split();
            let caller =
                |p: &Policy| judge(ctx, p, request, ctx.shared.clock.timestamp()).map(drop);
            let service = splice::ServiceSide::Tcp(r, w);
            watched(
                &mut send, &mut recv, service, caller, &mut rx, &cancel, charges,
            )
            .await
        }
        Target::SdkHost => {
            let Some((host, hsend, hrecv)) = to_host(ctx, &service).await else {
                refuse(&mut send, &mut recv, Verdict::UNREACHABLE).await;
                return;
            };
            if send.write_all(&encode_response(Status::Ok)).await.is_err() {
                return;
            }
            let (mut hsend, mut hrecv) = (hsend, hrecv);
            // Both ends must keep their grants: the caller Dial, the host Bind.
            let both = |p: &Policy| {
                let t = ctx.shared.clock.timestamp();
                judge(ctx, p, request, t)?;
                check_stream(&p.index, &host, StreamRequest::Bind(service.as_str()), t).map(drop)
            };
            let service = splice::ServiceSide::Host(&mut hsend, &mut hrecv);
            let out = watched(
                &mut send, &mut recv, service, both, &mut rx, &cancel, charges,
            )
            .await;
            if let Some(code) = end_code(&out) {
                let _ = hsend.reset(VarInt::from_u32(code));
            }
            out
        }
        // A bind permit answers a bind request only; never given to a dial.
        Target::Host => {
            refuse(&mut send, &mut recv, Verdict::BAD_REQUEST).await;
            return;
        }
    };
    match &end {
        End::Done((up, down)) => tracing::debug!(up, down, "stream done"),
        End::Refused(why) => {
            budgeted!(ctx.shared.logs, info, decision = "terminate", reason = %why, "stream closed");
            bump(&ctx.shared.stats.streams_terminated);
            ctx.shared.metrics.cut(Action::Dial, &service, *why);
        }
        End::NoPolicy => budgeted!(ctx.shared.logs, warn, "no current policy: stream closed"),
        End::Failed | End::Cancelled => {}
    }
    let moved = Some((up.total(), down.total()));
    report.finish(moved, end.reason(), matches!(end, End::Refused(_)));
    if let Some(code) = end_code(&end) {
        reset(&mut send, &mut recv, code);
    }
}

/// How a spliced stream ended.
enum End {
    /// Both directions finished.
    Done(splice::Moved),
    /// One side failed (reset, stopped, connection lost, I/O error).
    Failed,
    /// The router is shutting down.
    Cancelled,
    /// The judge no longer allows it, and why.
    Refused(Deny),
    /// The router lost its policy (stale controller): it fails closed.
    NoPolicy,
}

impl End {
    /// Why it ended otherwise, for the decision report.
    fn reason(&self) -> Option<String> {
        match self {
            End::Done(_) => None,
            End::Failed => Some("failed".into()),
            End::Cancelled => Some("router stopping".into()),
            End::Refused(why) => Some(why.to_string()),
            End::NoPolicy => Some("no current policy".into()),
        }
    }
}

/// The code to reset the stream's remaining directions with, if any.
fn end_code(end: &End) -> Option<u32> {
    match end {
        End::Done(_) => None,
        End::Failed => Some(Verdict::UNREACHABLE.code),
        End::Cancelled => Some(Verdict::STOPPING.code),
        End::NoPolicy => Some(Verdict::NO_POLICY.code),
        End::Refused(why) => Some(Verdict::of(*why, Moment::Open).code),
    }
}

/// Splices while asking `allowed` again on every policy change.
async fn watched(
    send: &mut SendStream,
    recv: &mut RecvStream,
    service: splice::ServiceSide<'_>,
    allowed: impl Fn(&Policy) -> Result<(), Deny>,
    rx: &mut PolicyRx,
    cancel: &CancellationToken,
    charges: splice::Charges<'_>,
) -> End {
    let splice = splice::run(send, recv, service, charges);
    tokio::pin!(splice);
    loop {
        tokio::select! {
            r = &mut splice => {
                return match r {
                    Ok(m) => End::Done(m),
                    Err(e) => {
                        tracing::debug!(error = %e, "stream ended");
                        End::Failed
                    }
                };
            }
            _ = cancel.cancelled() => return End::Cancelled,
            changed = rx.changed() => {
                if changed.is_err() {
                    return End::Cancelled;
                }
                match current(rx).map(|p| allowed(&p)) {
                    None => return End::NoPolicy,
                    Some(Err(why)) => return End::Refused(why),
                    Some(Ok(())) => {}
                }
            }
        }
    }
}

/// How long a router waits for an SDK host to take a caller.
const HOST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens a stream to a registered host of `service` that may still bind it and that accepts
/// the caller; tries each host once.
async fn to_host(ctx: &ConnCtx, service: &Name) -> Option<(IdentityId, SendStream, RecvStream)> {
    let policy = ctx.shared.policy.borrow().clone()?;
    let t = ctx.shared.clock.timestamp();
    let bind = StreamRequest::Bind(service.as_str());
    let hosts: Vec<Host> = (ctx.shared.hosts).candidates(service, |id| {
        check_stream(&policy.index, id, bind, t).is_ok()
    });
    let req = IncomingRequest {
        service: service.clone(),
        caller_id: ctx.id.clone(),
        caller_name: ctx.peer.spiffe.name().clone(),
        caller_spiffe: ctx.peer.spiffe.to_string(),
    };
    let frame = encode_request(Op::Incoming, &req).ok()?;
    for host in hosts {
        let attempt = async {
            let (mut s, mut r) = host.conn.open_bi().await.ok()?;
            s.write_all(&frame).await.ok()?;
            let mut resp = [0u8; 2];
            r.read_exact(&mut resp).await.ok()?;
            match decode_response(resp) {
                Ok(Status::Ok) => Some((s, r)),
                _ => None,
            }
        };
        match tokio::time::timeout(HOST_TIMEOUT, attempt).await {
            Ok(Some(pair)) => {
                tracing::debug!(host = %host.id, "handed to SDK host");
                return Some((host.id, pair.0, pair.1));
            }
            _ => {
                budgeted!(ctx.shared.logs, info, host = %host.id, "SDK host did not take the caller")
            }
        }
    }
    None
}

/// Registers the connection as a host of `service` for as long as the bind stream stays open
/// and the grant holds.
async fn bind(
    ctx: &ConnCtx,
    mut send: SendStream,
    mut recv: RecvStream,
    service: Name,
    cancel: CancellationToken,
) {
    let mut rx = ctx.shared.policy.clone();
    let request = StreamRequest::Bind(service.as_str());
    let policy = current(&mut rx);
    let t = ctx.shared.clock.timestamp();
    let verdict = (policy.as_ref()).map(|p| ctx.shared.metrics.check(|| judge(ctx, p, request, t)));
    match verdict {
        None => {
            refuse(&mut send, &mut recv, Verdict::NO_POLICY).await;
            return;
        }
        Some(Err(why)) => {
            tracing::debug!(decision = "deny", action = "bind", reason = %why, "bind refused");
            bump(&ctx.shared.stats.streams_denied);
            if let Some(p) = &policy {
                ctx.shared.metrics.denied(Action::Bind, &service, p, why);
            }
            (ctx.shared.reports).refused(&ctx.peer.spiffe, service.as_str(), "bind", why);
            refuse(&mut send, &mut recv, Verdict::of(why, Moment::Request)).await;
            return;
        }
        Some(Ok(permit)) => {
            budgeted!(ctx.shared.logs, info, decision = "allow", action = "bind", policy = %permit.policy, "host registered");
            bump(&ctx.shared.stats.streams_allowed);
            ctx.shared.metrics.allowed(Action::Bind, &service);
        }
    }
    let host = Host {
        id: ctx.id.clone(),
        conn: ctx.conn.clone(),
    };
    if !ctx.shared.hosts.add(service.clone(), host) {
        refuse(&mut send, &mut recv, Verdict::LIMIT).await;
        return;
    }
    if send.write_all(&encode_response(Status::Ok)).await.is_ok() {
        let mut sink = [0u8; 64];
        let end = loop {
            tokio::select! {
                _ = cancel.cancelled() => break End::Cancelled,
                // The host ends its binding by finishing or resetting the stream; anything it
                // sends is ignored.
                r = recv.read(&mut sink) => if !matches!(r, Ok(Some(_))) { break End::Done((0, 0)) },
                changed = rx.changed() => {
                    if changed.is_err() { break End::Cancelled; }
                    match current(&mut rx).map(|p| judge(ctx, &p, request, ctx.shared.clock.timestamp())) {
                        None => break End::NoPolicy,
                        Some(Err(why)) => break End::Refused(why),
                        Some(Ok(_)) => {}
                    }
                }
            }
        };
        if let End::Refused(why) = &end {
            budgeted!(ctx.shared.logs, info, decision = "terminate", action = "bind", reason = %why, "bind ended");
            bump(&ctx.shared.stats.streams_terminated);
            ctx.shared.metrics.cut(Action::Bind, &service, *why);
        }
        match end_code(&end) {
            Some(code) => reset(&mut send, &mut recv, code),
            None => {
                let _ = send.finish();
            }
        }
    }
    ctx.shared.hosts.remove(&service, ctx.conn.stable_id());
}
