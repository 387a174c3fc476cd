//! An incremental Server-Sent Events parser, for relaying provider streams event by event.
//!
//! Bytes arrive split anywhere: inside a line, between `\r` and `\n`, inside a multi-byte
//! character. Lines end with `\n`, `\r\n` or `\r`, as the SSE grammar allows; comments (lines
//! starting with `:`) are kept apart so that keep-alives can be passed on. One event or line
//! larger than the limit is an error, never unbounded buffering.

use bytes::Bytes;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// What the parser yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event, complete.
    Event(Event),
    /// A comment line (a keep-alive, typically), without the leading `:`.
    Comment(String),
}

/// The stream broke the size limit or was not text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line or an event exceeded the limit.
    #[error("an event of the upstream stream exceeds {0} bytes")]
    TooLarge(usize),
    /// A line was not UTF-8.
    #[error("the upstream stream is not UTF-8 text")]
    NotText,
}

/// The most bytes copied into the parser's buffer at once.
const PIECE: usize = 64 << 10;

/// The parser state between reads.
#[derive(Debug)]
pub struct Parser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
    data_len: usize,
    has_data: bool,
    max: usize,
}

impl Parser {
    /// A parser that refuses lines and events larger than `max` bytes.
    pub fn new(max: usize) -> Parser {
        Parser {
            buf: Vec::new(),
            event: None,
            data: Vec::new(),
            data_len: 0,
            has_data: false,
            max,
        }
    }

    /// Feeds bytes; returns every item they complete. However large `bytes` is, the parser
    /// copies it a piece at a time and fails as soon as an unfinished line passes the limit, so
    /// it never holds more than the limit plus one piece.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Item>, SseError> {
        let mut out = Vec::new();
        for piece in bytes.chunks(PIECE) {
            out.extend(self.push_piece(piece)?);
        }
        Ok(out)
    }

    fn push_piece(&mut self, bytes: &[u8]) -> Result<Vec<Item>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                if b == b'\r' && i + 1 == self.buf.len() {
                    // A `\r` at the end may be the first half of `\r\n`: wait for more.
                    break;
                }
                let line = std::str::from_utf8(&self.buf[start..i])
                    .map_err(|_| SseError::NotText)?
                    .to_owned();
                let skip = if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                i += skip;
                start = i;
                if let Some(item) = self.line(line)? {
                    out.push(item);
                }
                continue;
            }
            i += 1;
        }
        self.buf.drain(..start);
        if self.buf.len() > self.max {
            return Err(SseError::TooLarge(self.max));
        }
        Ok(out)
    }

    fn line(&mut self, line: String) -> Result<Option<Item>, SseError> {
        if line.is_empty() {
            if !self.has_data && self.event.is_none() {
                return Ok(None);
            }
            let ev = Event {
                event: self.event.take(),
                data: std::mem::take(&mut self.data).join("\n"),
            };
            self.data_len = 0;
            self.has_data = false;
            return Ok(Some(Item::Event(ev)));
        }
        if let Some(c) = line.strip_prefix(':') {
            return Ok(Some(Item::Comment(c.to_owned())));
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                self.data_len += value.len() + 1;
                if self.data_len > self.max {
                    return Err(SseError::TooLarge(self.max));
                }
                self.data.push(value.to_owned());
                self.has_data = true;
            }
            // `id` and `retry` mean nothing to a relay of LLM streams; unknown fields are
            // ignored, as the grammar says.
            _ => {}
        }
        Ok(None)
    }
}

/// An event as bytes, with `\n` line ends.
pub fn encode(ev: &Event) -> Bytes {
    let mut s = String::with_capacity(ev.data.len() + 32);
    if let Some(e) = &ev.event {
        s.push_str("event: ");
        s.push_str(e);
        s.push('\n');
    }
    for line in ev.data.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    Bytes::from(s)
}

/// A comment as bytes.
pub fn encode_comment(c: &str) -> Bytes {
    Bytes::from(format!(":{c}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(items: Vec<Item>) -> Vec<Event> {
        items
            .into_iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e),
                Item::Comment(_) => None,
            })
            .collect()
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        // The last event ends with lone `\r`s; the comment after it tells the final `\r` was
        // not half of a `\r\n` (until then a parser must wait).
        let stream = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: line1\ndata: line2\n\nevent: x\rdata: y\r\r: tail\n";
        let whole = events(Parser::new(1 << 20).push(stream).unwrap());
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0].event.as_deref(), Some("message_start"));
        assert_eq!(whole[0].data, "{\"a\":1}");
        assert_eq!(whole[1].data, "line1\nline2");
        assert_eq!(whole[2].event.as_deref(), Some("x"));
        for split in 1..stream.len() {
            let mut p = Parser::new(1 << 20);
            let mut got = p.push(&stream[..split]).unwrap();
            got.extend(p.push(&stream[split..]).unwrap());
            assert_eq!(events(got), whole, "split at {split}");
        }
        // One byte at a time.
        let mut p = Parser::new(1 << 20);
        let mut got = Vec::new();
        for b in stream.iter() {
            got.extend(p.push(&[*b]).unwrap());
        }
        assert_eq!(events(got), whole);
    }

    #[test]
    fn comments_are_kept_and_limits_hold() {
        let mut p = Parser::new(16);
        assert_eq!(
            p.push(b": ping\n").unwrap(),
            vec![Item::Comment(" ping".into())]
        );
        assert_eq!(p.push(&[b'x'; 40]).unwrap_err(), SseError::TooLarge(16));
        let mut p = Parser::new(1 << 10);
        assert_eq!(p.push(b"data: \xff\xfe\n").unwrap_err(), SseError::NotText);
        // One huge read of an unfinished line fails after at most a piece past the limit.
        let mut p = Parser::new(1 << 10);
        let huge = vec![b'x'; 8 << 20];
        assert_eq!(p.push(&huge).unwrap_err(), SseError::TooLarge(1 << 10));
        assert!(
            p.buf.capacity() <= (1 << 10) + 2 * PIECE,
            "{}",
            p.buf.capacity()
        );
        // Many whole events in one read are still fine.
        let mut p = Parser::new(64);
        let many = b"data: a\n\n".repeat(100_000);
        assert_eq!(p.push(&many).unwrap().len(), 100_000);
    }

    #[test]
    fn encoding_round_trips() {
        let ev = Event {
            event: Some("e".into()),
            data: "a\nb".into(),
        };
        let got = events(Parser::new(1 << 10).push(&encode(&ev)).unwrap());
        assert_eq!(got, vec![ev]);
    }
}
