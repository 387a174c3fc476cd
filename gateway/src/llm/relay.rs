//! Relaying a provider's stream event by event, metering it as it goes and ending it in the
//! format's own error shape if the budget runs out.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::admit::{settle, Admission};
use super::{Shared, MAX_EVENT};
use crate::config::Model;
use crate::errors::{self, Kind};
use crate::ledger::Record;
use crate::meter::{Format, StreamMeter, Verdict};
use crate::sse;
use crate::Body;

/// Streams `resp` to the client; settles the request when the stream ends or the client goes.
#[allow(clippy::too_many_arguments)]
pub(super) fn relay(
    s: Arc<Shared>,
    mut adm: Admission,
    rec: Record,
    model: Model,
    format: Format,
    input_estimate: u64,
    client_wants_usage: bool,
    resp: Response<Incoming>,
) -> Response<Body> {
    // A small queue: a slow client slows the relay, which slows the provider (backpressure).
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut upstream = resp.into_body();
        let mut parser = sse::Parser::new(MAX_EVENT);
        let mut meter = StreamMeter::new(format, input_estimate, client_wants_usage);
        let mut delivered = meter.so_far();
        let mut seq = 0u64;
        let reason: &str;
        'outer: loop {
            let frame = tokio::select! {
                f = upstream.frame() => f,
                _ = tx.closed() => { reason = "client disconnected"; break 'outer; }
            };
            let data = match frame {
                None => {
                    reason = if meter.finished() {
                        "completed"
                    } else {
                        "upstream ended early"
                    };
                    break;
                }
                Some(Err(_)) => {
                    reason = "upstream failed mid-stream";
                    break;
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            let items = match parser.push(&data) {
                Ok(items) => items,
                Err(e) => {
                    let ev = errors::stream_event(format, Kind::Upstream, &e.to_string(), seq);
                    let _ = tx.send(sse::encode(&ev)).await;
                    reason = "upstream stream malformed";
                    break;
                }
            };
            for item in items {
                let bytes = match item {
                    sse::Item::Comment(c) => sse::encode_comment(&c),
                    sse::Item::Event(ev) => {
                        if meter.observe(&ev) == Verdict::Drop {
                            continue;
                        }
                        // More spent than held (the prompt was longer than estimated, or the
                        // provider overran the cap): hold more, or end the stream here.
                        let now = meter.so_far().total();
                        if let Some(budget) = adm.budget {
                            if now > adm.reservation.amount {
                                let extra = now - adm.reservation.amount;
                                if !s
                                    .ledger
                                    .grow(&mut adm.reservation, budget, extra)
                                    .unwrap_or(false)
                                {
                                    let ev = errors::stream_event(
                                        format,
                                        Kind::Budget,
                                        "Token budget exhausted for this period.",
                                        seq,
                                    );
                                    let _ = tx.send(sse::encode(&ev)).await;
                                    reason = "budget exhausted mid-stream";
                                    break 'outer;
                                }
                            }
                        }
                        seq += 1;
                        sse::encode(&ev)
                    }
                };
                if tx.send(bytes).await.is_err() {
                    reason = "client disconnected";
                    break 'outer;
                }
                delivered = meter.so_far();
            }
        }
        // Dropping the upstream body closes its connection: the provider stops generating.
        drop(upstream);
        let usage = if reason == "completed" {
            meter.charge()
        } else {
            delivered
        };
        settle(&s, adm, rec, &model, usage, reason);
    });
    crate::sse_response(rx)
}
