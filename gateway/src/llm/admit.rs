//! Choosing the grant a request runs under and holding its worst-case cost in the ledger, then
//! replacing that hold with what the provider reported.

use tokio::time::Instant;

use umbra_policies::Timestamp;
use umbra_proto::api::HostedGrant;
use umbra_sdk::Caller;

use super::bound::{Bound, Unbounded};
use super::Shared;
use crate::config::Model;
use crate::errors::Kind;
use crate::ledger::{Bucket, Record, Reservation};
use crate::meter::Usage;

/// Why no grant admitted a request.
#[derive(Debug)]
pub(super) struct Refusal {
    /// How the client is told.
    pub kind: Kind,
    /// Seconds until it may succeed (`Retry-After`), for rate and budget refusals.
    pub retry: u64,
    /// The message the client gets and the ledger records.
    pub message: String,
}

/// The grant chosen for a request, and what it holds.
pub(super) struct Admission {
    pub grant: HostedGrant,
    pub reservation: Reservation,
    /// The output cap per choice sent upstream, if the gateway set one.
    pub max_out: Option<u64>,
    /// The budget of the chosen grant (for growing the reservation mid-stream).
    pub budget: Option<u64>,
}

/// Chooses a grant that allows the model and has room: unlimited grants first, then the one
/// with most tokens left. Under a budget the request's worst case ([`Bound`]) is held: all its
/// input, and every choice at the cap sent upstream, so that what the provider can bill never
/// exceeds what was held; a request that cannot be bounded is refused there.
pub(super) fn admit(
    s: &Shared,
    caller: &Caller,
    candidates: &[&HostedGrant],
    bound: &Result<Bound, Unbounded>,
    asked_max: Option<u64>,
) -> Result<Admission, Refusal> {
    let now: Timestamp = s.cfg.clock.timestamp();
    let instant = Instant::now();
    let mut ordered: Vec<(&HostedGrant, u64)> = candidates
        .iter()
        .map(|g| {
            let left = match g.limits.tokens {
                None => u64::MAX,
                Some(b) => {
                    let bucket = Bucket::new(caller.id.as_str(), g.policy.as_str(), b.period, now);
                    match s.ledger.used(&bucket) {
                        Ok((spent, held)) => b.amount.saturating_sub(spent).saturating_sub(held),
                        Err(_) => 0,
                    }
                }
            };
            (*g, left)
        })
        .collect();
    ordered.sort_by_key(|g| std::cmp::Reverse(g.1));
    let mut refusal: Option<Refusal> = None;
    for (g, _) in ordered {
        if let Some(rpm) = g.limits.rpm {
            if let Err(wait) = s.rate.has_room(&caller.id, g.policy.as_str(), rpm, instant) {
                let secs = wait.as_secs().max(1);
                if refusal.is_none() {
                    refusal = Some(Refusal {
                        kind: Kind::RateLimited,
                        retry: secs,
                        message: "Rate limit reached for requests per minute.".into(),
                    });
                }
                continue;
            }
        }
        let (reservation, max_out, budget) = match g.limits.tokens {
            None => (
                Reservation {
                    bucket: None,
                    amount: 0,
                    hold: None,
                },
                None,
                None,
            ),
            Some(b) => {
                let bound = match bound {
                    Ok(x) => x,
                    Err(e) => {
                        refusal = Some(Refusal {
                            kind: Kind::Invalid,
                            retry: 0,
                            message: e.to_string(),
                        });
                        continue;
                    }
                };
                let bucket = Bucket::new(caller.id.as_str(), g.policy.as_str(), b.period, now);
                let want_out = asked_max.unwrap_or(s.cfg.default_max_tokens).max(1);
                match s.ledger.reserve(
                    &bucket,
                    b.amount,
                    bound.min_reservation(),
                    bound.reservation_for(want_out),
                ) {
                    Ok(Ok(r)) => {
                        let out = bound.per_choice_cap(r.amount, want_out);
                        (r, Some(out), Some(b.amount))
                    }
                    Ok(Err(_)) | Err(_) => {
                        let retry = b.period.next(now).0.saturating_sub(now.0);
                        refusal = Some(Refusal {
                            kind: Kind::Budget,
                            retry,
                            message: "Token budget exhausted for this period.".into(),
                        });
                        continue;
                    }
                }
            }
        };
        if let Some(rpm) = g.limits.rpm {
            if let Err(wait) = s.rate.take(&caller.id, g.policy.as_str(), rpm, instant) {
                // Another request took the last slot meanwhile.
                let _ = s.ledger.release(reservation);
                refusal = Some(Refusal {
                    kind: Kind::RateLimited,
                    retry: wait.as_secs().max(1),
                    message: "Rate limit reached for requests per minute.".into(),
                });
                continue;
            }
        }
        return Ok(Admission {
            grant: g.clone(),
            reservation,
            max_out,
            budget,
        });
    }
    Err(refusal.unwrap_or(Refusal {
        kind: Kind::NotFound,
        retry: 0,
        message: "no grant".into(),
    }))
}

fn cost_micros(m: &Model, u: &Usage) -> u64 {
    let dollars = (u.input as f64) * m.price.0 / 1e6 + (u.output as f64) * m.price.1 / 1e6;
    (dollars * 1e6).round().max(0.0) as u64
}

/// Ends a request: its hold is replaced by what it spent, and it becomes a ledger record.
pub(super) fn settle(
    s: &Shared,
    adm: Admission,
    mut rec: Record,
    model: &Model,
    usage: Usage,
    reason: &str,
) {
    rec.policy = adm.grant.policy.to_string();
    rec.usage = usage;
    rec.cost_micros = cost_micros(model, &usage);
    rec.decision = "allowed";
    rec.reason = reason.to_string();
    tracing::info!(
        identity = %rec.name, model = %rec.model, policy = %rec.policy,
        input = usage.input, output = usage.output, estimated = usage.estimated, reason,
        "llm request"
    );
    (s.metrics).record(&rec, true);
    if let Err(e) = s.ledger.settle(adm.reservation, &rec) {
        tracing::warn!(error = %e, "cannot record a request");
    }
}
