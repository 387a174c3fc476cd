//! Properties of every decoder a peer feeds: the control channel's frames and the data plane's
//! stream headers. Arbitrary bytes never panic, what is kept is bounded by the input or by the
//! stated limit, and whatever the encoders write decodes to what they were given. The fuzz
//! targets in `fuzz/` drive the same functions with coverage guidance.

use proptest::prelude::*;
use umbra_policies::{IdentityId, Name, Timestamp};
use umbra_proto::stream::{
    decode_request_header, decode_response, encode_request, encode_response, IncomingRequest, Op,
    ServiceRequest, Status, StreamFrameError, MAX_REQUEST_PAYLOAD, STREAM_PROTOCOL_VERSION,
};
use umbra_proto::{
    encode, ChangeEvent, ControlMessage, Delta, FrameDecoder, FrameError, RevokedCert, RouterInfo,
    KEEPALIVE,
};

fn name() -> impl Strategy<Value = Name> {
    "[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?".prop_map(|s| Name::new(s).expect("the regex is a name"))
}

fn identity_id() -> impl Strategy<Value = IdentityId> {
    "[A-Za-z0-9_-]{1,64}".prop_map(|s| IdentityId::new(s).expect("the regex is an id"))
}

fn change() -> impl Strategy<Value = ChangeEvent> {
    prop_oneof![
        identity_id().prop_map(|id| ChangeEvent::IdentityDeleted { id }),
        name().prop_map(|name| ChangeEvent::ServiceDeleted { name }),
        name().prop_map(|name| ChangeEvent::PolicyDeleted { name }),
        (any::<String>(), identity_id(), any::<u64>()).prop_map(|(serial, identity, t)| {
            ChangeEvent::CertRevoked {
                cert: RevokedCert {
                    serial,
                    identity,
                    not_after: Timestamp(t),
                },
            }
        }),
        (identity_id(), name(), proptest::option::of(any::<String>())).prop_map(
            |(id, name, advertise)| ChangeEvent::RouterPut {
                router: RouterInfo {
                    id,
                    name,
                    advertise,
                },
            }
        ),
        identity_id().prop_map(|id| ChangeEvent::RouterDeleted { id }),
    ]
}

fn message() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (any::<u32>(), any::<String>())
            .prop_map(|(version, epoch)| ControlMessage::Hello { version, epoch }),
        any::<u64>().prop_map(|seq| ControlMessage::Heartbeat { seq }),
        (any::<u64>(), any::<u64>(), change(), any::<bool>()).prop_map(
            |(seq, at, change, last_in_commit)| {
                ControlMessage::Delta(Box::new(Delta {
                    seq,
                    at: Timestamp(at),
                    change,
                    last_in_commit,
                }))
            }
        ),
    ]
}

/// Drains every message the decoder can give; stops at the first error, as a reader does.
fn drain(d: &mut FrameDecoder) -> (Vec<ControlMessage>, Option<FrameError>) {
    let mut out = Vec::new();
    loop {
        match d.next::<ControlMessage>() {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

proptest! {
    #[test]
    fn frames_of_arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
        max in 0usize..256,
    ) {
        let mut d = FrameDecoder::new(max);
        let input: usize = chunks.iter().map(Vec::len).sum();
        let mut got = 0;
        for c in &chunks {
            d.push(c);
            let (msgs, err) = drain(&mut d);
            got += msgs.len();
            if let Some(FrameError::TooLarge { len, max: m }) = err {
                prop_assert!(len > m, "refused {len} under the limit {m}");
                break;
            }
            if err.is_some() {
                break;
            }
        }
        // Each message costs its 4-byte header and at least 2 bytes of JSON.
        prop_assert!(got * 6 <= input, "{got} messages out of {input} bytes");
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_before_its_bytes_arrive(
        max in 0usize..(1 << 20),
        extra in 1usize..(1 << 20),
    ) {
        let len = u32::try_from(max + extra).expect("under 2 MiB");
        let mut d = FrameDecoder::new(max);
        d.push(&len.to_be_bytes());
        let refused = matches!(d.next::<ControlMessage>(), Err(FrameError::TooLarge { .. }));
        prop_assert!(refused, "a header alone must be refused");
    }

    #[test]
    fn frames_round_trip_in_any_split(
        msgs in proptest::collection::vec(message(), 0..8),
        keepalives in proptest::collection::vec(any::<bool>(), 8),
        splits in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
    ) {
        let mut bytes = Vec::new();
        for (m, k) in msgs.iter().zip(keepalives.iter().cycle()) {
            if *k {
                bytes.extend(KEEPALIVE);
            }
            bytes.extend(encode(m).expect("a message encodes"));
        }
        let mut cuts: Vec<usize> = splits.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut d = FrameDecoder::new(bytes.len());
        let mut got = Vec::new();
        for w in cuts.windows(2) {
            d.push(&bytes[w[0]..w[1]]);
            let (m, err) = drain(&mut d);
            prop_assert!(err.is_none(), "{err:?}");
            got.extend(m);
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn stream_headers_never_panic_and_stay_in_bounds(h in any::<[u8; 4]>(), r in any::<[u8; 2]>()) {
        match decode_request_header(h) {
            Ok((op, len)) => {
                prop_assert_eq!(h[0], STREAM_PROTOCOL_VERSION);
                prop_assert_eq!(op as u8, h[1]);
                prop_assert!(len <= MAX_REQUEST_PAYLOAD);
            }
            Err(StreamFrameError::TooLarge(len)) => prop_assert!(len > MAX_REQUEST_PAYLOAD),
            Err(_) => {}
        }
        if let Ok(status) = decode_response(r) {
            prop_assert_eq!(encode_response(status), r);
        }
    }

    #[test]
    fn stream_requests_round_trip(
        service in name(),
        caller_id in identity_id(),
        caller_name in name(),
        caller_spiffe in ".{0,200}",
        op in prop_oneof![Just(Op::Dial), Just(Op::Bind)],
    ) {
        let req = ServiceRequest { service: service.clone() };
        let bytes = encode_request(op, &req).expect("a small request encodes");
        let header: [u8; 4] = bytes[..4].try_into().expect("a header");
        prop_assert_eq!(decode_request_header(header).ok(), Some((op, bytes.len() - 4)));
        prop_assert_eq!(serde_json::from_slice::<ServiceRequest>(&bytes[4..]).ok(), Some(req));

        let inc = IncomingRequest { service, caller_id, caller_name, caller_spiffe };
        let bytes = encode_request(Op::Incoming, &inc).expect("a small request encodes");
        let header: [u8; 4] = bytes[..4].try_into().expect("a header");
        prop_assert_eq!(decode_request_header(header).ok(), Some((Op::Incoming, bytes.len() - 4)));
        prop_assert_eq!(serde_json::from_slice::<IncomingRequest>(&bytes[4..]).ok(), Some(inc));
    }

    #[test]
    fn stream_payloads_of_arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        // What a router does with the payload it read after a valid header.
        let _ = serde_json::from_slice::<ServiceRequest>(&body);
        let _ = serde_json::from_slice::<IncomingRequest>(&body);
    }
}

#[test]
fn every_status_round_trips() {
    for s in [
        Status::Ok,
        Status::Denied,
        Status::Unavailable,
        Status::BadRequest,
    ] {
        assert_eq!(decode_response(encode_response(s)).ok(), Some(s));
    }
}

#[test]
fn an_oversized_request_is_not_encoded() {
    let inc = IncomingRequest {
        service: Name::new("s").expect("a name"),
        caller_id: IdentityId::new("i").expect("an id"),
        caller_name: Name::new("c").expect("a name"),
        caller_spiffe: "x".repeat(MAX_REQUEST_PAYLOAD),
    };
    assert!(matches!(
        encode_request(Op::Incoming, &inc),
        Err(StreamFrameError::TooLarge(_))
    ));
}
