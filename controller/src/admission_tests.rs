use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

fn src(last: u8) -> Source {
    Source::of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

fn small() -> Limits {
    Limits {
        pending: 8,
        per_source: 3,
        enroll_handshakes: 2,
        main_handshakes: 2,
    }
}

fn accept<H: std::fmt::Debug>(a: &mut Admission<H>, s: Source, now: Instant, h: H) -> ConnId {
    match a.admit(s, now, h) {
        Admit::Accept { id, .. } => id,
        other => panic!("refused: {other:?}"),
    }
}

#[test]
fn sources_are_addresses_and_ipv6_prefixes() {
    let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(Source::of(a.into()), Source::of(b.into()));
    assert_ne!(Source::of(a.into()), Source::of(c.into()));
    let mapped: Ipv6Addr = "::ffff:127.0.0.2".parse().unwrap();
    assert_eq!(Source::of(mapped.into()), src(2));
    assert_ne!(src(2), src(3));
}

#[test]
fn a_source_at_its_cap_replaces_its_own_oldest_silent_connection() {
    let t0 = Instant::now();
    let mut a = Admission::new(small());
    for i in 0..3u32 {
        accept(&mut a, src(2), t0 + Duration::from_millis(i.into()), i);
    }
    // The fourth sheds the first, never anyone else's.
    let other = accept(&mut a, src(3), t0, 100);
    match a.admit(src(2), t0 + Duration::from_secs(1), 3) {
        Admit::Accept { shed, .. } => assert_eq!(shed, Some(0)),
        r => panic!("{r:?}"),
    }
    assert_eq!(a.pending_from(src(2)), 3);
    assert_eq!(a.pending_from(src(3)), 1);
    a.release(other);
    assert_eq!(a.pending_from(src(3)), 0);
}

#[test]
fn a_source_whose_connections_all_spoke_is_refused_at_its_cap() {
    let t0 = Instant::now();
    let mut a = Admission::new(small());
    for i in 0..3 {
        let id = accept(&mut a, src(2), t0, i);
        a.spoke(id);
    }
    assert_eq!(a.admit(src(2), t0, 9), Admit::Refuse(Refusal::SourceFull));
    // Another source still gets in.
    accept(&mut a, src(3), t0, 10);
}

#[test]
fn when_full_the_busiest_sources_silent_connection_is_shed_first() {
    let t0 = Instant::now();
    let mut a = Admission::new(small());
    // Source 2: three silent. Source 3: two silent (older). Sources 4, 5, 6: one talking each.
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(accept(&mut a, src(3), t0, (3, i)));
    }
    for i in 0..3 {
        ids.push(accept(
            &mut a,
            src(2),
            t0 + Duration::from_secs(1 + i),
            (2, i),
        ));
    }
    for s in 4..7 {
        let id = accept(&mut a, src(s), t0, (s, 0));
        a.spoke(id);
    }
    assert_eq!(a.pending(), 8);
    match a.admit(src(1), t0 + Duration::from_secs(9), (1, 0)) {
        Admit::Accept { shed, .. } => assert_eq!(shed, Some((2, 0))),
        r => panic!("{r:?}"),
    }
    assert_eq!(a.pending(), 8);
}

#[test]
fn when_every_slot_has_spoken_newcomers_are_refused() {
    let t0 = Instant::now();
    let mut a = Admission::new(small());
    for s in 0..8 {
        let id = accept(&mut a, src(s), t0, s);
        a.spoke(id);
    }
    assert_eq!(a.admit(src(100), t0, 100), Admit::Refuse(Refusal::Full));
}

#[test]
fn handshake_pools_are_separate_and_bounded() {
    let t0 = Instant::now();
    let mut a = Admission::new(small());
    // One source: it holds the most, so its third handshake cannot take from itself.
    let e: Vec<_> = (0..3).map(|k| accept(&mut a, src(0), t0, k)).collect();
    a.hello(e[0], Pool::Enroll).unwrap();
    a.hello(e[1], Pool::Enroll).unwrap();
    // Full, and no source holds more than the newcomer's would: refused.
    assert_eq!(
        a.hello(e[2], Pool::Enroll),
        Err(Refusal::PoolFull(Pool::Enroll))
    );
    // The refused one is gone; the mutual-TLS pool is untouched by enrollment.
    assert_eq!(a.pending(), 2);
    let m = accept(&mut a, src(9), t0, 9);
    a.hello(m, Pool::Main).unwrap();
    // Finishing a handshake frees its pool slot.
    a.release(e[0]);
    let e3 = accept(&mut a, src(4), t0, 4);
    a.hello(e3, Pool::Enroll).unwrap();
}

/// The red team's finding: complete ClientHellos from a dozen sources, never finished, held
/// every mutual-TLS handshake slot, and admins were refused. A newcomer from a source holding
/// fewer now takes the slot of the busiest source's oldest handshake.
#[test]
fn stalled_handshakes_from_many_sources_cannot_keep_a_new_source_out() {
    let t0 = Instant::now();
    let limits = Limits {
        pending: 64,
        per_source: 4,
        enroll_handshakes: 2,
        main_handshakes: 6,
    };
    let mut a = Admission::new(limits);
    // Three sources hold two stalled handshakes each: the pool is full.
    for s in 0..3u8 {
        for k in 0..2u64 {
            let at = t0 + Duration::from_millis(u64::from(s) * 10 + k);
            let id = accept(&mut a, src(s), at, (src(s), u64::from(s) * 10 + k));
            assert_eq!(a.hello(id, Pool::Main), Ok(None));
        }
    }
    // An attacker's source that already holds two cannot take from its peers.
    let more = accept(&mut a, src(1), t0 + Duration::from_millis(50), (src(1), 99));
    assert_eq!(
        a.hello(more, Pool::Main),
        Err(Refusal::PoolFull(Pool::Main))
    );
    // A new source (an admin) takes the oldest slot of a busiest source.
    let admin = accept(&mut a, src(7), t0 + Duration::from_millis(60), (src(7), 70));
    assert_eq!(a.hello(admin, Pool::Main), Ok(Some((src(0), 0))));
    // And a source at one handshake takes from those at two, never from the admin.
    let third = accept(&mut a, src(0), t0 + Duration::from_millis(70), (src(0), 80));
    let shed = a.hello(third, Pool::Main).unwrap().expect("a slot");
    assert_ne!(shed.0, src(7));
}

#[derive(Debug, Clone)]
enum Op {
    Admit(u8),
    Spoke(usize),
    Hello(usize, bool),
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6).prop_map(Op::Admit),
        any::<usize>().prop_map(Op::Spoke),
        (any::<usize>(), any::<bool>()).prop_map(|(i, e)| Op::Hello(i, e)),
        any::<usize>().prop_map(Op::Release),
    ]
}

proptest! {
    /// Whatever happens, no bound is exceeded, counts match the entries, a silent connection
    /// is only ever shed for a newcomer, and a source never sheds another's connection at its
    /// own cap.
    #[test]
    fn bounds_hold_under_any_sequence(ops in proptest::collection::vec(op(), 0..300)) {
        let limits = small();
        let t0 = Instant::now();
        let mut a: Admission<(Source, u64)> = Admission::new(limits);
        let mut live: Vec<(ConnId, Source, u64)> = Vec::new();
        let mut spoken = std::collections::HashSet::new();
        for (step, op) in ops.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(step as u64);
            match op {
                Op::Admit(s) => {
                    let s = src(s);
                    let at_cap = a.pending_from(s) >= limits.per_source;
                    match a.admit(s, now, (s, step as u64)) {
                        Admit::Accept { id, shed } => {
                            if let Some((vs, vstep)) = shed {
                                prop_assert!(!spoken.contains(&vstep), "shed one that spoke");
                                if at_cap { prop_assert_eq!(vs, s); }
                                live.retain(|(_, _, st)| *st != vstep);
                            }
                            live.push((id, s, step as u64));
                        }
                        Admit::Refuse(_) => {}
                    }
                }
                Op::Spoke(i) if !live.is_empty() => {
                    let (id, _, st) = live[i % live.len()];
                    a.spoke(id);
                    spoken.insert(st);
                }
                Op::Hello(i, enroll) if !live.is_empty() => {
                    let k = i % live.len();
                    let (id, _, st) = live[k];
                    spoken.insert(st);
                    let pool = if enroll { Pool::Enroll } else { Pool::Main };
                    match a.hello(id, pool) {
                        Err(_) => { live.remove(k); }
                        Ok(Some((_, vstep))) => {
                            prop_assert!(vstep != st, "a newcomer never sheds itself");
                            live.retain(|(_, _, lst)| *lst != vstep);
                        }
                        Ok(None) => {}
                    }
                }
                Op::Release(i) if !live.is_empty() => {
                    let (id, _, _) = live.remove(i % live.len());
                    a.release(id);
                    a.release(id);
                }
                _ => {}
            }
            prop_assert_eq!(a.pending(), live.len());
            prop_assert!(a.pending() <= limits.pending);
            for s in 0..6 {
                let n = live.iter().filter(|(_, ls, _)| *ls == src(s)).count();
                prop_assert_eq!(a.pending_from(src(s)), n);
                prop_assert!(n <= limits.per_source);
            }
            prop_assert!(a.per_pool.get(&Pool::Enroll).copied().unwrap_or(0) <= limits.enroll_handshakes);
            prop_assert!(a.per_pool.get(&Pool::Main).copied().unwrap_or(0) <= limits.main_handshakes);
        }
    }
}
