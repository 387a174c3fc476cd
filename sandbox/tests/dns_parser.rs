//! Properties of the sandbox's DNS responder, whose queries come from the agent: arbitrary
//! datagrams never panic, a reply is never much larger than the query (no amplification, no
//! unbounded allocation), and every query the builders write is answered as asked. The fuzz
//! target in `fuzz/` drives the same functions with coverage guidance.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use umbra_sandbox::dns::{answer, parse_response, query, query_labels, Outcome};

const IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);

/// An answer record is 16 bytes; the header is 12.
const MAX_GROWTH: usize = 12 + 16;

fn lookup(name: &str) -> Option<Ipv4Addr> {
    name.starts_with("ok").then_some(IP)
}

fn outcome_name(o: &Outcome) -> Option<&str> {
    match o {
        Outcome::Answered(n) | Outcome::NoData(n) | Outcome::Refused(n) => Some(n),
        Outcome::Malformed { name, .. } => name.as_deref(),
    }
}

/// Datagrams that are mostly well-formed queries with damage, and sometimes plain noise.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    let label = proptest::collection::vec(any::<u8>(), 0..70);
    let built = (
        any::<u16>(),
        proptest::collection::vec(label, 0..6),
        any::<u16>(),
        proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
        any::<proptest::sample::Index>(),
    )
        .prop_map(|(id, labels, qtype, flips, cut)| {
            let labels: Vec<&[u8]> = labels.iter().map(Vec::as_slice).collect();
            let mut q = query_labels(id, &labels, qtype);
            for (at, b) in flips {
                let i = at.index(q.len());
                q[i] = b;
            }
            q.truncate(cut.index(q.len() + 1));
            q
        });
    prop_oneof![3 => built, 1 => proptest::collection::vec(any::<u8>(), 0..600)]
}

proptest! {
    #[test]
    fn arbitrary_datagrams_never_panic_and_never_amplify(q in datagram()) {
        if let Some((reply, outcome)) = answer(&q, lookup) {
            prop_assert!(reply.len() <= q.len().max(12) + MAX_GROWTH, "{} from {}", reply.len(), q.len());
            prop_assert_eq!(&reply[..2], &q[..2], "the id is echoed");
            // A name in presentation form is at most four characters an octet.
            if let Some(n) = outcome_name(&outcome) {
                prop_assert!(n.len() <= 4 * 255, "{n}");
            }
            prop_assert!(parse_response(&reply).is_some(), "our own reply parses");
        }
        let _ = parse_response(&q);
    }

    #[test]
    fn host_names_resolve_as_asked(
        id in any::<u16>(),
        labels in proptest::collection::vec("[A-Za-z0-9_-]{1,20}", 1..5),
        ok in any::<bool>(),
    ) {
        let mut name = labels.join(".");
        if ok {
            name.insert_str(0, "ok");
        }
        let (reply, outcome) = answer(&query(id, &name, 1), lookup).expect("a query gets a reply");
        prop_assert_eq!(&reply[..2], &id.to_be_bytes()[..]);
        if name.to_ascii_lowercase().starts_with("ok") {
            prop_assert_eq!(outcome, Outcome::Answered(name));
            prop_assert_eq!(parse_response(&reply), Some((0, Some(IP))));
        } else {
            prop_assert_eq!(outcome, Outcome::Refused(name));
            prop_assert_eq!(parse_response(&reply), Some((3, None)));
        }
    }

    #[test]
    fn any_octets_in_labels_are_refused_and_reported_in_presentation_form(
        labels in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..63), 1..4),
    ) {
        let refs: Vec<&[u8]> = labels.iter().map(Vec::as_slice).collect();
        let (_, outcome) = answer(&query_labels(9, &refs, 1), |_| None).expect("a reply");
        let Outcome::Refused(name) = outcome else {
            return Err(TestCaseError::fail(format!("{outcome:?}")));
        };
        prop_assert!(name.bytes().all(|c| (0x21..=0x7e).contains(&c)), "{name:?}");
        // Every octet is written at least once, and a dot stands between labels.
        let octets: usize = labels.iter().map(Vec::len).sum();
        prop_assert!(name.len() >= octets + labels.len() - 1, "{name:?}");
    }
}
