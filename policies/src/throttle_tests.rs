use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::{MaxConnections, Rate, Throughput};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn rate(s: &str) -> Throughput {
    Throughput {
        rate: Some(s.parse().unwrap()),
        ..Throughput::default()
    }
}

fn conns(n: u32) -> Throughput {
    Throughput {
        connections: Some(MaxConnections::try_from(n).unwrap()),
        ..Throughput::default()
    }
}

#[test]
fn a_rate_admits_its_burst_then_one_per_interval() {
    let r = Refill::of_rate("600/min".parse::<Rate>().unwrap());
    let mut b = Bucket::full(&r, ms(0));
    for _ in 0..600 {
        assert!(b.take(&r, 1, ms(0)).is_ok());
    }
    // 600/min is one every 100 ms.
    assert_eq!(b.take(&r, 1, ms(0)), Err(ms(100)));
    assert_eq!(b.take(&r, 1, ms(99)), Err(ms(100)));
    assert_eq!(b.take(&r, 1, ms(100)), Ok(()));
    assert_eq!(b.take(&r, 1, ms(150)), Err(ms(200)));
}

#[test]
fn a_charged_bucket_waits_out_its_debt() {
    let r = Refill::new(1000, Duration::from_secs(1), 100).unwrap();
    let mut b = Bucket::full(&r, ms(0));
    assert_eq!(b.ready_at(&r, ms(0)), None);
    b.charge(&r, 600, ms(0));
    // 500 bytes of debt at 1000 B/s.
    assert_eq!(b.ready_at(&r, ms(0)), Some(ms(500)));
    assert_eq!(b.ready_at(&r, ms(400)), Some(ms(500)));
    assert_eq!(b.ready_at(&r, ms(500)), None);
    assert!(!b.is_full(&r, ms(550)));
    assert!(b.is_full(&r, ms(600)));
    assert_eq!(b.tokens(&r, ms(10_000)), 100);
}

#[test]
fn a_bandwidth_bucket_holds_a_tenth_of_a_second_or_one_read() {
    let big = Refill::of_bandwidth("100MiB/s".parse().unwrap());
    assert_eq!(big.burst(), (100 << 20) / 10);
    let small = Refill::of_bandwidth("1KiB/s".parse().unwrap());
    assert_eq!(small.burst(), 64 * 1024);
    assert!(Refill::new(0, Duration::from_secs(1), 1).is_none());
    assert!(Refill::new(1, Duration::ZERO, 1).is_none());
}

#[test]
fn connections_are_held_until_closed() {
    let limits = conns(2);
    let mut book = GrantBook::default();
    assert_eq!(book.try_open(&limits, ms(0)), Ok(()));
    assert_eq!(book.try_open(&limits, ms(0)), Ok(()));
    assert_eq!(book.try_open(&limits, ms(0)), Err(GrantLimit::Connections));
    assert!(!book.is_idle(&limits, ms(0)));
    book.close();
    assert_eq!(book.try_open(&limits, ms(0)), Ok(()));
    book.close();
    book.close();
    assert!(book.is_idle(&limits, ms(0)));
}

#[test]
fn a_refused_stream_takes_neither_slot_nor_token() {
    let limits = Throughput {
        connections: Some(MaxConnections::try_from(1).unwrap()),
        rate: Some("2/s".parse().unwrap()),
        bandwidth: None,
    };
    let mut book = GrantBook::default();
    assert_eq!(book.try_open(&limits, ms(0)), Ok(()));
    assert_eq!(book.try_open(&limits, ms(0)), Err(GrantLimit::Connections));
    book.close();
    // The refusal above took no token: one is left.
    assert_eq!(book.try_open(&limits, ms(0)), Ok(()));
    book.close();
    assert_eq!(book.try_open(&limits, ms(0)), Err(GrantLimit::Rate));
    assert_eq!(book.open(), 0);
    assert_eq!(book.try_open(&limits, ms(500)), Ok(()));
}

#[test]
fn an_unlimited_grant_wins_and_else_the_first_with_room_is_charged() {
    let (mut a, mut b) = (GrantBook::default(), GrantBook::default());
    let mut grants = [(conns(1), &mut a), (Throughput::default(), &mut b)];
    for _ in 0..5 {
        assert_eq!(admit_stream(&mut grants, ms(0)), Ok(None));
    }
    assert_eq!(a.open(), 0);
    let mut grants = [(conns(1), &mut a), (rate("1/s"), &mut b)];
    assert_eq!(admit_stream(&mut grants, ms(0)), Ok(Some(0)));
    assert_eq!(admit_stream(&mut grants, ms(0)), Ok(Some(1)));
    // Neither has room: the first grant's limit is the one named.
    assert_eq!(
        admit_stream(&mut grants, ms(0)),
        Err(GrantLimit::Connections)
    );
    assert_eq!(admit_stream(&mut grants, ms(1000)), Ok(Some(1)));
    assert_eq!(admit_stream(&mut [], ms(0)), Ok(None));
}

proptest! {
    /// Whatever the arrivals, a bucket never admits more than its burst plus what accrued.
    #[test]
    fn a_bucket_never_admits_more_than_burst_plus_rate_times_time(
        per in 1u64..1000,
        period_ms in 1u64..5000,
        burst in 1u64..100,
        steps in proptest::collection::vec((0u64..500, 1u64..5), 1..200),
    ) {
        let r = Refill::new(per, ms(period_ms), burst).unwrap();
        let mut b = Bucket::full(&r, ms(0));
        let (mut now, mut taken) = (0u64, 0u64);
        for (dt, n) in steps {
            now += dt;
            match b.take(&r, n, ms(now)) {
                Ok(()) => taken += n,
                Err(at) => {
                    prop_assert!(at >= ms(now));
                    // Right when it said, the bucket has room (for what fits in the burst).
                    if n <= burst {
                        prop_assert!(at > ms(now));
                        let mut probe = b;
                        prop_assert_eq!(probe.take(&r, n, at), Ok(()));
                        let mut early = b;
                        prop_assert!(early.take(&r, n, at - Duration::from_nanos(1)).is_err());
                    }
                }
            }
            let accrued = u128::from(per) * u128::from(now) / u128::from(period_ms);
            prop_assert!(u128::from(taken) <= u128::from(burst) + accrued);
        }
    }

    /// Waiting on `ready_at` before each chunk keeps bytes moved within burst + rate × time +
    /// one chunk, and the level only grows while nothing is charged.
    #[test]
    fn charging_with_waits_keeps_to_the_rate(
        per in 1u64..100_000,
        chunks in proptest::collection::vec((1u64..70_000, 0u64..50), 1..100),
    ) {
        let r = Refill::new(per, Duration::from_secs(1), 1000).unwrap();
        let mut b = Bucket::full(&r, ms(0));
        let mut now = Duration::ZERO;
        let (mut moved, mut largest) = (0u128, 0u128);
        for (n, think) in chunks {
            now += ms(think);
            if let Some(at) = b.ready_at(&r, now) {
                prop_assert!(at > now);
                now = at;
                prop_assert_eq!(b.ready_at(&r, now), None);
            }
            let before = b.tokens(&r, now);
            prop_assert!(b.tokens(&r, now + ms(10)) >= before);
            b.charge(&r, n, now);
            moved += u128::from(n);
            largest = largest.max(u128::from(n));
            let accrued = u128::from(per) * now.as_nanos() / 1_000_000_000;
            prop_assert!(moved <= 1000 + accrued + largest);
        }
    }

    /// A book never holds more open streams than its cap, whatever order opens and closes come.
    #[test]
    fn a_book_never_exceeds_its_connections(cap in 1u32..5, ops in proptest::collection::vec(any::<bool>(), 1..100)) {
        let limits = conns(cap);
        let mut book = GrantBook::default();
        let mut open = 0u32;
        for open_one in ops {
            if open_one {
                let r = book.try_open(&limits, ms(0));
                prop_assert_eq!(r.is_ok(), open < cap);
                if r.is_ok() { open += 1; }
            } else if open > 0 {
                book.close();
                open -= 1;
            }
            prop_assert_eq!(book.open(), open);
        }
    }
}

proptest! {
    /// Against a model of open counts: a stream is admitted exactly when a grant is unlimited
    /// or one has a free slot, and it is charged to the first such grant.
    #[test]
    fn admit_stream_charges_the_first_grant_with_room(
        caps in proptest::collection::vec(proptest::option::of(1u32..4), 1..4),
        ops in proptest::collection::vec((any::<bool>(), 0usize..4), 1..60),
    ) {
        let limits: Vec<Throughput> = caps.iter().map(|c| c.map_or(Throughput::default(), conns)).collect();
        let unlimited = caps.iter().any(Option::is_none);
        let mut books = vec![GrantBook::default(); caps.len()];
        let mut model = vec![0u32; caps.len()];
        for (open, which) in ops {
            if open {
                let mut grants: Vec<(Throughput, &mut GrantBook)> =
                    limits.iter().copied().zip(books.iter_mut()).collect();
                let got = admit_stream(&mut grants, ms(0));
                let want = if unlimited {
                    Ok(None)
                } else {
                    let room = (0..caps.len()).find(|&i| caps[i].is_some_and(|c| model[i] < c));
                    room.map(Some).ok_or(GrantLimit::Connections)
                };
                prop_assert_eq!(got, want);
                if let Ok(Some(i)) = got {
                    model[i] += 1;
                }
            } else if let Some(i) = (which < caps.len()).then_some(which).filter(|&i| model[i] > 0) {
                books[i].close();
                model[i] -= 1;
            }
            for (b, m) in books.iter().zip(&model) {
                prop_assert_eq!(b.open(), *m);
            }
        }
    }
}

#[test]
fn the_index_lists_every_granting_policy_by_name() {
    use crate::testing::{agent, id, policy, service, state};
    use crate::{Action, Index, Semantic, Timestamp};
    let mut limited = policy(
        "b-limited",
        Action::Dial,
        Semantic::AnyOf,
        &["@ann"],
        &["@svc"],
    );
    limited.limits.connections = Some(MaxConnections::try_from(2).unwrap());
    let s = state(
        [agent("ann", &["ops"]), agent("bob", &[])],
        [service("svc", &[])],
        [
            limited,
            policy("a-ops", Action::Dial, Semantic::AnyOf, &["#ops"], &["@svc"]),
            policy("c-bob", Action::Dial, Semantic::AnyOf, &["@bob"], &["@svc"]),
            policy(
                "d-bind",
                Action::Bind,
                Semantic::AnyOf,
                &["@ann"],
                &["@svc"],
            ),
        ],
    );
    let index = Index::build(&s);
    let t = Timestamp(0);
    let names = |who: &str, action| -> Vec<String> {
        (index.granting_policies(&id(who), "svc", action, t).iter())
            .map(|p| p.name.to_string())
            .collect()
    };
    assert_eq!(names("id-ann", Action::Dial), ["a-ops", "b-limited"]);
    assert_eq!(names("id-ann", Action::Bind), ["d-bind"]);
    assert_eq!(names("id-bob", Action::Dial), ["c-bob"]);
    assert!(names("id-nobody", Action::Dial).is_empty());
    assert!(index
        .granting_policies(&id("id-ann"), "ghost", Action::Dial, t)
        .is_empty());
    let got = index.granting_policies(&id("id-ann"), "svc", Action::Dial, t);
    assert_eq!(
        got[1]
            .limits
            .throughput()
            .connections
            .map(MaxConnections::get),
        Some(2)
    );
}
