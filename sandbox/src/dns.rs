//! The sandbox's DNS responder: authorized names resolve to their loopback listeners, everything
//! else is NXDOMAIN, and no query is ever forwarded anywhere.
//!
//! Only what a stub resolver sends is understood: one question, standard query, no compression in
//! the question. Anything else gets FORMERR or NOTIMP rather than a guess. Names compare without
//! case and without a trailing dot, as DNS names do.

use std::net::Ipv4Addr;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// Answers live briefly so that a revoked name stops resolving soon in caching clients.
const TTL: u32 = 5;

const RCODE_FORMERR: u16 = 1;
const RCODE_NXDOMAIN: u16 = 3;
const RCODE_NOTIMP: u16 = 4;

/// What the responder did with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An authorized name: its address was given.
    Answered(String),
    /// An authorized name asked for a type it has no record of (AAAA, say).
    NoData(String),
    /// A name the identity may not reach: NXDOMAIN.
    Refused(String),
    /// Not a query this responder understands.
    Malformed,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads the question name starting at `at`; returns the lower-case dotted name and the offset
/// after it.
fn read_name(b: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    loop {
        let len = usize::from(*b.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers and extended label types have no place in a question.
        if len > 63 {
            return None;
        }
        let label = b.get(at..at + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &c in label {
            // Host names only; anything else cannot be an authorized name anyway.
            if !(c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
                return None;
            }
            name.push(char::from(c.to_ascii_lowercase()));
        }
        at += len;
        if name.len() > 253 {
            return None;
        }
    }
    Some((name, at))
}

/// Answers one query. `lookup` maps an authorized (lower-case) name to its address; `None`
/// means the name does not exist for this identity. Returns `None` for input that is not even a
/// DNS header, which gets no reply at all.
pub fn answer(
    query: &[u8],
    lookup: impl Fn(&str) -> Option<Ipv4Addr>,
) -> Option<(Vec<u8>, Outcome)> {
    let id = be16(query, 0)?;
    let flags = be16(query, 2)?;
    let qdcount = be16(query, 4)?;
    if flags & 0x8000 != 0 {
        // A response sent to us: never answer, or two responders could loop.
        return None;
    }
    let rd = flags & 0x0100;
    let opcode = (flags >> 11) & 0xf;
    let reply = |rcode: u16, question: &[u8], answers: &[u8], count: u16| {
        let mut out = Vec::with_capacity(HEADER + question.len() + answers.len());
        out.extend_from_slice(&id.to_be_bytes());
        // QR, authoritative, recursion desired echoed, recursion available (so stub resolvers
        // do not complain), the response code.
        let f = 0x8000 | 0x0400 | rd | 0x0080 | rcode;
        out.extend_from_slice(&f.to_be_bytes());
        out.extend_from_slice(&u16::from(!question.is_empty()).to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(question);
        out.extend_from_slice(answers);
        out
    };
    if opcode != 0 {
        return Some((reply(RCODE_NOTIMP, &[], &[], 0), Outcome::Malformed));
    }
    if qdcount != 1 {
        return Some((reply(RCODE_FORMERR, &[], &[], 0), Outcome::Malformed));
    }
    let Some((name, after)) = read_name(query, HEADER) else {
        return Some((reply(RCODE_FORMERR, &[], &[], 0), Outcome::Malformed));
    };
    let (Some(qtype), Some(qclass)) = (be16(query, after), be16(query, after + 2)) else {
        return Some((reply(RCODE_FORMERR, &[], &[], 0), Outcome::Malformed));
    };
    let question = &query[HEADER..after + 4];
    let Some(ip) = lookup(&name) else {
        return Some((
            reply(RCODE_NXDOMAIN, question, &[], 0),
            Outcome::Refused(name),
        ));
    };
    if qtype != TYPE_A || qclass != CLASS_IN {
        return Some((reply(0, question, &[], 0), Outcome::NoData(name)));
    }
    let mut rr = Vec::with_capacity(16);
    rr.extend_from_slice(&0xC00Cu16.to_be_bytes()); // the question's name
    rr.extend_from_slice(&TYPE_A.to_be_bytes());
    rr.extend_from_slice(&CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&TTL.to_be_bytes());
    rr.extend_from_slice(&4u16.to_be_bytes());
    rr.extend_from_slice(&ip.octets());
    Some((reply(0, question, &rr, 1), Outcome::Answered(name)))
}

/// Builds a standard query for `name` (tests and the escape probe use it).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len().min(63) as u8);
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

/// The response code and the first A record of a response (tests and the escape probe).
pub fn parse_response(b: &[u8]) -> Option<(u16, Option<Ipv4Addr>)> {
    let flags = be16(b, 2)?;
    let qd = be16(b, 4)?;
    let an = be16(b, 6)?;
    let mut at = HEADER;
    for _ in 0..qd {
        let (_, after) = read_name(b, at)?;
        at = after + 4;
    }
    let mut ip = None;
    if an > 0 {
        // Our answers name the question by pointer.
        let rtype = be16(b, at + 2)?;
        let rdlen = usize::from(be16(b, at + 10)?);
        let data = b.get(at + 12..at + 12 + rdlen)?;
        if rtype == TYPE_A && rdlen == 4 {
            ip = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
    }
    Some((flags & 0xf, ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<Ipv4Addr> {
        (name == "llm.umbra").then_some(Ipv4Addr::new(127, 77, 0, 1))
    }

    #[test]
    fn authorized_names_resolve_in_any_case() {
        for name in ["llm.umbra", "LLM.Umbra.", "llm.UMBRA"] {
            let (r, o) = answer(&query(7, name, 1), lookup).unwrap();
            assert_eq!(o, Outcome::Answered("llm.umbra".into()));
            assert_eq!(&r[..2], &[0, 7], "id echoed");
            assert_eq!(
                parse_response(&r),
                Some((0, Some(Ipv4Addr::new(127, 77, 0, 1))))
            );
        }
    }

    #[test]
    fn other_names_do_not_exist() {
        let (r, o) = answer(&query(1, "api.openai.com", 1), lookup).unwrap();
        assert_eq!(o, Outcome::Refused("api.openai.com".into()));
        assert_eq!(parse_response(&r), Some((RCODE_NXDOMAIN, None)));
        let (r, o) = answer(&query(1, "llm.umbra", 28), lookup).unwrap();
        assert_eq!(o, Outcome::NoData("llm.umbra".into()));
        assert_eq!(parse_response(&r), Some((0, None)));
    }

    #[test]
    fn malformed_queries_get_errors_not_panics() {
        assert!(answer(&[], lookup).is_none());
        assert!(answer(&[1, 2, 3], lookup).is_none());
        let mut q = query(1, "llm.umbra", 1);
        q[2] |= 0x80; // a response
        assert!(answer(&q, lookup).is_none());
        let mut q = query(1, "llm.umbra", 1);
        q[5] = 2; // two questions
        assert_eq!(answer(&q, lookup).unwrap().1, Outcome::Malformed);
        let mut q = query(1, "llm.umbra", 1);
        q[12] = 0xC0; // a pointer in the question
        assert_eq!(answer(&q, lookup).unwrap().1, Outcome::Malformed);
        let q = query(1, "llm.umbra", 1);
        for cut in 0..q.len() {
            let _ = answer(&q[..cut], lookup);
        }
        let mut q = query(1, "llm.umbra", 1);
        q[2] = 0x28; // opcode 5 (update)
        assert_eq!(answer(&q, lookup).unwrap().1, Outcome::Malformed);
        // Every byte value in every position: no panic.
        let base = query(9, "a.b", 1);
        for i in 0..base.len() {
            for v in 0..=255u8 {
                let mut q = base.clone();
                q[i] = v;
                let _ = answer(&q, lookup);
            }
        }
    }
}
