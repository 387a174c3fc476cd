//! The stdio side of an upstream session: newline-delimited JSON-RPC read from a child process,
//! with every line bounded before it is buffered, and every waiting request's entry removed on
//! every exit path.
//!
//! A server's stdout is a peer like any other: a tool that prints 150 MB on one line must not
//! make the gateway hold 150 MB. Lines are read chunk by chunk and the session ends the moment
//! one passes [`MAX_MESSAGE`], before the chunk that would pass it is copied.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::oneshot;

use super::upstream::{is_list_changed, RpcError};

/// Largest message accepted from an upstream server.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Capacity kept for the line buffer between messages: one large message does not pin its
/// buffer for the session's life.
const KEEP_CAPACITY: usize = 64 << 10;

/// Requests waiting for an answer, by JSON-RPC id.
pub(crate) type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, RpcError>>>>>;

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The line is longer than allowed; nothing past the limit was buffered.
    #[error("an upstream message exceeds {0} bytes")]
    TooLong(usize),
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one line (with its `\n`) into `buf`, never letting `buf` hold or reserve more than
/// `max` bytes. `Ok(false)` at the end of the stream.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, LineError> {
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(!buf.is_empty());
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let need = buf.len() + take;
        if need > max.saturating_add(1) || (!done && need > max) {
            return Err(LineError::TooLong(max));
        }
        if need > buf.capacity() {
            // Grow geometrically, but never past the limit.
            let target = need.max(buf.capacity() * 2).min(max.saturating_add(1));
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

/// Removes a request's pending entry when dropped: on an answer, a timeout, a failed write or
/// a caller that went away, the map never keeps it.
pub(crate) struct PendingGuard<'a> {
    pub pending: &'a Pending,
    pub id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.id);
        }
    }
}

/// Reads a server's stdout until it ends or breaks a bound; answers go to the pending
/// requests, list changes to `changed`. At the end every waiting request is told why.
pub(crate) async fn read_stdio(
    stdout: tokio::process::ChildStdout,
    pending: Pending,
    alive: Arc<AtomicBool>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut lines = BufReader::with_capacity(KEEP_CAPACITY, stdout);
    let mut buf = Vec::new();
    let why = loop {
        buf.clear();
        if buf.capacity() > KEEP_CAPACITY {
            buf.shrink_to(KEEP_CAPACITY);
        }
        match read_line_bounded(&mut lines, &mut buf, MAX_MESSAGE).await {
            Ok(true) => {}
            Ok(false) => break "upstream exited".to_string(),
            Err(e) => {
                tracing::warn!(error = %e, "upstream stdio session ended");
                break e.to_string();
            }
        }
        let Ok(v) = serde_json::from_slice::<Value>(&buf) else {
            continue;
        };
        if is_list_changed(&v) {
            changed.notify_waiters();
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            continue;
        };
        if v.get("method").is_some() {
            // A request from the server (sampling, roots): the gateway offers none.
            continue;
        }
        let r = match (v.get("result"), v.get("error")) {
            (Some(r), _) => Ok(r.clone()),
            (None, Some(e)) => Err(RpcError::from_value(e)),
            _ => Err(RpcError::transport("malformed upstream answer")),
        };
        let tx = pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(r);
        }
    };
    alive.store(false, Ordering::SeqCst);
    // Everyone waiting learns the server is gone, and why.
    if let Ok(mut p) = pending.lock() {
        for (_, tx) in p.drain() {
            let _ = tx.send(Err(RpcError::transport(why.clone())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn lines_are_read_whole_and_split_correctly() {
        let data: &[u8] = b"{\"a\":1}\n\nlast-without-newline";
        let mut r = BufReader::with_capacity(3, data);
        let mut buf = Vec::new();
        assert!(read_line_bounded(&mut r, &mut buf, 64).await.unwrap());
        assert_eq!(buf, b"{\"a\":1}\n");
        buf.clear();
        assert!(read_line_bounded(&mut r, &mut buf, 64).await.unwrap());
        assert_eq!(buf, b"\n");
        buf.clear();
        assert!(read_line_bounded(&mut r, &mut buf, 64).await.unwrap());
        assert_eq!(buf, b"last-without-newline");
        buf.clear();
        assert!(!read_line_bounded(&mut r, &mut buf, 64).await.unwrap());
    }

    #[tokio::test]
    async fn an_endless_line_is_refused_before_it_is_buffered() {
        // An upstream that never ends its line: the old reader buffered until memory ran out.
        let max = 1 << 20;
        let mut r = BufReader::with_capacity(64 << 10, tokio::io::repeat(b'x'));
        let mut buf = Vec::new();
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            read_line_bounded(&mut r, &mut buf, max),
        )
        .await
        .expect("the reader gives up instead of buffering forever");
        assert!(matches!(got, Err(LineError::TooLong(m)) if m == max));
        assert!(buf.len() <= max, "held {}", buf.len());
        assert!(buf.capacity() <= max + 1, "reserved {}", buf.capacity());
    }

    #[tokio::test]
    async fn the_limit_is_exact() {
        let max = 100;
        let mut line = vec![b'y'; max];
        line.push(b'\n');
        let mut r = BufReader::with_capacity(7, &line[..]);
        let mut buf = Vec::new();
        assert!(read_line_bounded(&mut r, &mut buf, max).await.unwrap());
        assert_eq!(buf.len(), max + 1);
        let mut over = vec![b'y'; max + 1];
        over.push(b'\n');
        let mut r = BufReader::with_capacity(7, &over[..]);
        buf.clear();
        assert!(read_line_bounded(&mut r, &mut buf, max).await.is_err());
        // What follows an oversized line is not read as a message.
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest).await;
        assert!(rest.len() < over.len());
    }
}
