//! The webhook sink: an HTTPS POST of `{"events": [...]}` per batch, on a connection of its own,
//! signed so that the receiver can tell it came from this controller and is fresh:
//! `X-Umbra-Timestamp: <unix seconds>` and
//! `X-Umbra-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`.
//! Any answer but 2xx is a failure and the batch is sent again later (so a receiver sees a batch
//! at least once and tells repeats apart by the events' `id`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::config::Secret;
use super::{Event, SinkError};

/// The signature header.
pub const SIGNATURE: &str = "x-umbra-signature";
/// The timestamp header, signed with the body.
pub const TIMESTAMP: &str = "x-umbra-timestamp";

/// `sha256=<hex>` of HMAC-SHA256 over `timestamp.body`.
pub fn signature(secret: &Secret, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// A webhook client.
pub struct WebhookSink {
    url: hyper::Uri,
    host: String,
    port: u16,
    secret: Secret,
    timeout: Duration,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &super::config::WebhookUrl(self.url.clone()))
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// A client for `url` trusting `ca_file` (PEM) or the Web PKI roots.
    pub fn new(
        url: hyper::Uri,
        secret: Secret,
        ca_file: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<WebhookSink, SinkError> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(p) => {
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(p)
                    .map_err(|e| SinkError::Setup(format!("{}: {e}", p.display())))?;
                for c in certs {
                    let c = c.map_err(|e| SinkError::Setup(format!("{}: {e}", p.display())))?;
                    roots
                        .add(c)
                        .map_err(|e| SinkError::Setup(format!("{}: {e}", p.display())))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SinkError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let host = url
            .host()
            .ok_or_else(|| SinkError::Setup("the url has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port_u16().unwrap_or(443);
        Ok(WebhookSink {
            url,
            host,
            port,
            secret,
            timeout,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// POSTs one batch; `now` is the signed timestamp (unix seconds).
    pub async fn send(&mut self, events: &[Event], now: u64) -> Result<(), SinkError> {
        let body = serde_json::to_vec(&serde_json::json!({ "events": events }))
            .map_err(|e| SinkError::Io(e.to_string()))?;
        let sig = signature(&self.secret, now, &body);
        tokio::time::timeout(self.timeout, self.post(body, now, sig))
            .await
            .map_err(|_| SinkError::Io("timed out".into()))?
    }

    async fn post(&self, body: Vec<u8>, now: u64, sig: String) -> Result<(), SinkError> {
        let io = |e: &dyn std::fmt::Display| SinkError::Io(e.to_string());
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| io(&e))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(self.host.clone()).map_err(|e| io(&e))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| io(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| io(&e))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = self
            .url
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let authority = self.url.authority().map_or("", |a| a.as_str()).to_owned();
        let req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "umbra-controller")
            .header(TIMESTAMP, now.to_string())
            .header(SIGNATURE, sig)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| io(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| io(&e));
        let out = match resp {
            Ok(resp) => {
                let status = resp.status();
                // Read (a bounded part of) the answer so the connection ends cleanly.
                let _ = http_body_util::Limited::new(resp.into_body(), 4096)
                    .collect()
                    .await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(SinkError::Status(status.as_u16()))
                }
            }
            Err(e) => Err(e),
        };
        conn.abort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 ("Jefe" / "what do ya want for nothing?"), split at its first
        // space so that the timestamp and the dot are part of the signed text.
        let s = Secret::from_test(b"Jefe");
        let sig = signature(&s, 7, b"what do ya want for nothing?");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let want = ring::hmac::sign(&key, b"7.what do ya want for nothing?");
        assert_eq!(sig, format!("sha256={}", hex::encode(want.as_ref())));
        let rfc = ring::hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(rfc.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
