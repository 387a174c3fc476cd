//! Properties of the gateways' parsers of peer input: the SSE parser (provider streams), MCP
//! paging cursors (clients) and `Mcp-Name` routing headers (clients). Arbitrary input never
//! panics, what comes out is bounded by what went in, and encoders round-trip. The fuzz targets
//! in `fuzz/` drive the same functions with coverage guidance.

use proptest::prelude::*;
use umbra_gateway::mcp::cursor::{Cursors, MAX_CURSOR_LEN};
use umbra_gateway::mcp::routing_header;
use umbra_gateway::sse::{encode, encode_comment, Event, Item, Parser, SseError};

fn item_len(i: &Item) -> usize {
    match i {
        Item::Event(e) => e.event.as_ref().map_or(0, String::len) + e.data.len(),
        Item::Comment(c) => c.len(),
    }
}

/// Feeds `chunks` to a parser until it fails; returns the items and the error.
fn feed(max: usize, chunks: &[Vec<u8>]) -> (Vec<Item>, Option<SseError>) {
    let mut p = Parser::new(max);
    let mut items = Vec::new();
    for c in chunks {
        match p.push(c) {
            Ok(i) => items.extend(i),
            Err(e) => return (items, Some(e)),
        }
    }
    (items, None)
}

fn sse_text() -> impl Strategy<Value = Vec<u8>> {
    // Mostly the grammar's own bytes, so that fields, line ends and events are common.
    let byte = prop_oneof![
        4 => proptest::sample::select(b"data:event: id\r\n\n:xy".to_vec()),
        1 => any::<u8>(),
    ];
    proptest::collection::vec(byte, 0..256)
}

fn event() -> impl Strategy<Value = Event> {
    // A field value is one line; the data may hold `\n` (each line becomes a `data:` line).
    // A leading space is the one a parser strips after the colon, so values start otherwise.
    let line = "([^ \r\n][^\r\n]{0,20})?";
    (
        proptest::option::of(line),
        proptest::collection::vec(line, 1..4),
    )
        .prop_map(|(event, data)| Event {
            event,
            data: data.join("\n"),
        })
}

proptest! {
    #[test]
    fn sse_never_panics_and_yields_no_more_than_it_was_given(
        chunks in proptest::collection::vec(sse_text(), 0..8),
        max in 1usize..128,
    ) {
        let input: usize = chunks.iter().map(Vec::len).sum();
        let (items, err) = feed(max, &chunks);
        let out: usize = items.iter().map(item_len).sum();
        prop_assert!(out <= input, "{out} bytes of items out of {input}");
        for i in &items {
            if let Item::Event(e) = i {
                prop_assert!(e.data.len() <= max, "an event of {} over {max}", e.data.len());
            }
        }
        if let Some(e) = err {
            prop_assert!(e == SseError::NotText || e == SseError::TooLarge(max));
        }
    }

    #[test]
    fn sse_gives_the_same_items_however_the_bytes_are_split(
        text in sse_text(),
        cut in any::<proptest::sample::Index>(),
    ) {
        let whole = feed(1 << 16, std::slice::from_ref(&text));
        let at = cut.index(text.len() + 1);
        let split = feed(1 << 16, &[text[..at].to_vec(), text[at..].to_vec()]);
        // An error may come at another point of a split stream, but never different items
        // before it when there is none.
        if whole.1.is_none() && split.1.is_none() {
            prop_assert_eq!(whole.0, split.0);
        }
    }

    #[test]
    fn sse_encoding_round_trips(events in proptest::collection::vec(event(), 0..6), comment in "[^\r\n]{0,20}") {
        let mut bytes = Vec::new();
        for e in &events {
            bytes.extend_from_slice(&encode(e));
        }
        bytes.extend_from_slice(&encode_comment(&comment));
        let (items, err) = feed(1 << 16, &[bytes]);
        prop_assert!(err.is_none(), "{err:?}");
        let mut want: Vec<Item> = events.into_iter().map(Item::Event).collect();
        want.push(Item::Comment(comment));
        prop_assert_eq!(items, want);
    }

    #[test]
    fn cursors_of_arbitrary_text_never_open(cursor in ".{0,200}", raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        let c = Cursors::new();
        prop_assert_eq!(c.open("tools", "id", &cursor), None);
        let lossy = String::from_utf8_lossy(&raw);
        prop_assert_eq!(c.open("tools", "id", &lossy), None);
    }

    #[test]
    fn cursors_round_trip_only_for_their_list_and_identity(
        offset in any::<u64>(),
        kind in "[a-z]{1,10}",
        identity in "[A-Za-z0-9_-]{1,64}",
        other in "[A-Za-z0-9_-]{1,64}",
    ) {
        let c = Cursors::new();
        let cur = c.issue(&kind, &identity, offset);
        prop_assert!(cur.len() <= MAX_CURSOR_LEN);
        prop_assert_eq!(c.open(&kind, &identity, &cur), Some(offset));
        if other != identity {
            prop_assert_eq!(c.open(&kind, &other, &cur), None);
        }
    }

    #[test]
    fn routing_headers_never_grow_and_round_trip(v in ".{0,100}", raw in proptest::collection::vec(any::<u8>(), 0..100)) {
        prop_assert_eq!(routing_header::decode(&routing_header::encode(&v)), Some(v.clone()));
        for input in [v, String::from_utf8_lossy(&raw).into_owned()] {
            if let Some(name) = routing_header::decode(&input) {
                prop_assert!(name.len() <= input.len());
                // Whatever decodes is spelled one way only.
                let again = routing_header::encode(&name);
                prop_assert_eq!(routing_header::decode(&again), Some(name));
            }
        }
    }

    #[test]
    fn encoded_routing_headers_are_valid_http_field_values(v in "\\PC{0,50}") {
        let e = routing_header::encode(&v);
        prop_assert!(http::HeaderValue::from_str(&e).is_ok(), "{e:?}");
    }
}
