//! The sandbox's DNS responder: authorized names resolve to their loopback listeners, everything
//! else is NXDOMAIN, and no query is ever forwarded anywhere.
//!
//! Only what a stub resolver sends is understood: one question, standard query, no compression in
//! the question. Anything else gets FORMERR or NOTIMP rather than a guess, and is reported as
//! [`Outcome::Malformed`] so that it is audited too: a query is a channel the agent controls, and
//! one the responder refuses to parse must not be a silent one. Labels may hold any octet (DNS
//! allows it, and encoded data uses it); such a name cannot be an authorized one, so it is
//! NXDOMAIN. Names compare without case and without a trailing dot, as DNS names do, but are
//! reported as asked, in RFC 1035 presentation form, because the case of an encoded name is data.

use std::net::Ipv4Addr;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const HEADER: usize = 12;
/// Answers live briefly so that a revoked name stops resolving soon in caching clients.
const TTL: u32 = 5;
/// The longest name on the wire, length octets included (RFC 1035 2.3.4).
const MAX_WIRE_NAME: usize = 255;

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
    /// A name the identity may not reach: NXDOMAIN. The name as asked, in presentation form.
    Refused(String),
    /// Not a query this responder understands: FORMERR or NOTIMP.
    Malformed {
        /// What was wrong, in a few words (a fixed string, never peer data).
        reason: &'static str,
        /// The question's name as far as it could be read, in presentation form.
        name: Option<String>,
    },
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// A question name as it was on the wire: its labels, octets as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WireName {
    labels: Vec<Vec<u8>>,
}

impl WireName {
    /// RFC 1035 presentation form, case preserved: `.` and `\` inside a label are escaped with
    /// a backslash, anything not printable ASCII (space included) as `\DDD`. The root is `.`.
    fn presentation(&self) -> String {
        if self.labels.is_empty() {
            return ".".into();
        }
        let mut out = String::new();
        for (i, label) in self.labels.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            for &c in label {
                match c {
                    b'.' | b'\\' => {
                        out.push('\\');
                        out.push(char::from(c));
                    }
                    0x21..=0x7e => out.push(char::from(c)),
                    _ => out.push_str(&format!("\\{c:03}")),
                }
            }
        }
        out
    }

    /// The lower-case dotted name authorized names are kept under, if this can be a host name at
    /// all (letters, digits, `-`, `_`); any other octet means it is no name of ours.
    fn lookup_key(&self) -> Option<String> {
        let host = |c: &u8| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_';
        if self.labels.is_empty() || !self.labels.iter().flatten().all(host) {
            return None;
        }
        let parts: Vec<String> = self
            .labels
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        Some(parts.join("."))
    }
}

/// Why a question name could not be read; what was read before is kept for the audit.
#[derive(Debug)]
struct BadName {
    reason: &'static str,
    partial: WireName,
}

/// Reads the question name starting at `at`; returns it and the offset after it.
fn read_name(b: &[u8], mut at: usize) -> Result<(WireName, usize), BadName> {
    let mut name = WireName { labels: Vec::new() };
    let mut wire = 1;
    loop {
        let bad = |reason, name: WireName| BadName {
            reason,
            partial: name,
        };
        let Some(&len) = b.get(at) else {
            return Err(bad("truncated name", name));
        };
        let len = usize::from(len);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers and extended label types have no place in a question.
        if len > 63 {
            return Err(bad("compression or extended label in the question", name));
        }
        wire += 1 + len;
        if wire > MAX_WIRE_NAME {
            return Err(bad("name longer than 255 octets", name));
        }
        let Some(label) = b.get(at..at + len) else {
            return Err(bad("truncated name", name));
        };
        name.labels.push(label.to_vec());
        at += len;
    }
    Ok((name, at))
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
    // The name is read first, whatever else is wrong, so that the audit has it.
    let parsed = if qdcount >= 1 {
        Some(read_name(query, HEADER))
    } else {
        None
    };
    let named = |p: &Option<Result<(WireName, usize), BadName>>| match p {
        Some(Ok((n, _))) => Some(n.presentation()),
        Some(Err(b)) if !b.partial.labels.is_empty() => Some(b.partial.presentation()),
        _ => None,
    };
    let malformed = |rcode: u16, reason: &'static str, name: Option<String>| {
        Some((
            reply(rcode, &[], &[], 0),
            Outcome::Malformed { reason, name },
        ))
    };
    if opcode != 0 {
        return malformed(RCODE_NOTIMP, "not a standard query", named(&parsed));
    }
    if qdcount != 1 {
        return malformed(RCODE_FORMERR, "not exactly one question", named(&parsed));
    }
    let (name, after) = match parsed {
        Some(Ok(x)) => x,
        Some(Err(b)) => {
            let name = (!b.partial.labels.is_empty()).then(|| b.partial.presentation());
            return malformed(RCODE_FORMERR, b.reason, name);
        }
        None => return malformed(RCODE_FORMERR, "not exactly one question", None),
    };
    let (Some(qtype), Some(qclass)) = (be16(query, after), be16(query, after + 2)) else {
        return malformed(
            RCODE_FORMERR,
            "truncated question",
            Some(name.presentation()),
        );
    };
    let question = &query[HEADER..after + 4];
    let Some(ip) = name.lookup_key().and_then(|k| lookup(&k)) else {
        return Some((
            reply(RCODE_NXDOMAIN, question, &[], 0),
            Outcome::Refused(name.presentation()),
        ));
    };
    let asked = name.presentation();
    if qtype != TYPE_A || qclass != CLASS_IN {
        return Some((reply(0, question, &[], 0), Outcome::NoData(asked)));
    }
    let mut rr = Vec::with_capacity(16);
    rr.extend_from_slice(&0xC00Cu16.to_be_bytes()); // the question's name
    rr.extend_from_slice(&TYPE_A.to_be_bytes());
    rr.extend_from_slice(&CLASS_IN.to_be_bytes());
    rr.extend_from_slice(&TTL.to_be_bytes());
    rr.extend_from_slice(&4u16.to_be_bytes());
    rr.extend_from_slice(&ip.octets());
    Some((reply(0, question, &rr, 1), Outcome::Answered(asked)))
}

/// Builds a standard query for `name` (tests and the escape probe use it).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let labels: Vec<&[u8]> = name
        .trim_end_matches('.')
        .split('.')
        .map(str::as_bytes)
        .collect();
    query_labels(id, &labels, qtype)
}

/// Builds a standard query whose name is `labels`, octets as given (at most 63 of each are
/// used): how a name that holds dots or binary data inside a label is asked.
pub fn query_labels(id: u16, labels: &[&[u8]], qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in labels {
        let n = label.len().min(63);
        q.push(n as u8);
        q.extend_from_slice(&label[..n]);
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
        let (_, after) = read_name(b, at).ok()?;
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
            assert_eq!(o, Outcome::Answered(name.trim_end_matches('.').into()));
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
        assert!(matches!(
            answer(&q, lookup).unwrap().1,
            Outcome::Malformed { name: Some(ref n), .. } if n == "llm.umbra"
        ));
        let mut q = query(1, "llm.umbra", 1);
        q[12] = 0xC0; // a pointer in the question
        assert!(matches!(
            answer(&q, lookup).unwrap().1,
            Outcome::Malformed { name: None, .. }
        ));
        let q = query(1, "llm.umbra", 1);
        for cut in 0..q.len() {
            let _ = answer(&q[..cut], lookup);
        }
        let mut q = query(1, "llm.umbra", 1);
        q[2] = 0x28; // opcode 5 (update)
        assert!(matches!(
            answer(&q, lookup).unwrap().1,
            Outcome::Malformed {
                reason: "not a standard query",
                ..
            }
        ));
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

    #[test]
    fn any_octet_in_a_label_is_nxdomain_reported_as_asked() {
        // Mixed case, a dot inside a label, a backslash, a space, control and high octets.
        let labels: [&[u8]; 3] = [b"AbC.d\\e f", &[0, 0x7f, 0xff, b'Z'], b"Umbra"];
        let (r, o) = answer(&query_labels(3, &labels, 1), lookup).unwrap();
        assert_eq!(
            o,
            Outcome::Refused(r"AbC\.d\\e\032f.\000\127\255Z.Umbra".into())
        );
        assert_eq!(parse_response(&r), Some((RCODE_NXDOMAIN, None)));
        // A dot inside a label is not a separator: "llm.umbra" as one label is not llm.umbra.
        let (_, o) = answer(&query_labels(3, &[b"llm.umbra"], 1), lookup).unwrap();
        assert_eq!(o, Outcome::Refused(r"llm\.umbra".into()));
        // The case of a refused name is kept: encoded data survives.
        let (_, o) = answer(&query(3, "aGVsbG8.Exfil.example", 1), lookup).unwrap();
        assert_eq!(o, Outcome::Refused("aGVsbG8.Exfil.example".into()));
    }

    #[test]
    fn overlong_and_truncated_names_are_malformed_with_what_was_read() {
        let long = vec![b"a".repeat(63); 5];
        let labels: Vec<&[u8]> = long.iter().map(|l| l.as_slice()).collect();
        let (r, o) = answer(&query_labels(4, &labels, 1), lookup).unwrap();
        assert_eq!(parse_response(&r).map(|p| p.0), Some(RCODE_FORMERR));
        match o {
            Outcome::Malformed { reason, name } => {
                assert_eq!(reason, "name longer than 255 octets");
                assert_eq!(name.map(|n| n.len()), Some(3 * 63 + 2));
            }
            other => panic!("{other:?}"),
        }
        let q = query(4, "Secret.data", 1);
        let (_, o) = answer(&q[..q.len() - 8], lookup).unwrap();
        assert_eq!(
            o,
            Outcome::Malformed {
                reason: "truncated name",
                name: Some("Secret".into())
            }
        );
    }

    #[test]
    fn presentation_escapes_round_the_special_octets() {
        let n = WireName { labels: vec![] };
        assert_eq!(n.presentation(), ".");
        let n = WireName {
            labels: vec![b"a\"b;c".to_vec(), vec![b'\\'], vec![b'.']],
        };
        assert_eq!(n.presentation(), "a\"b;c.\\\\.\\.");
        assert_eq!(n.lookup_key(), None);
    }
}
