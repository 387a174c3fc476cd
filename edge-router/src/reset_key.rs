//! The router's stateless-reset key, kept across restarts.
//!
//! QUIC lets a server that lost a connection's state (it restarted) tell the client so with a
//! stateless reset, whose token is an HMAC of the connection id under the server's key. With a
//! key drawn afresh at every start, a restarted router's resets are ignored and its clients
//! hang on dead connections for the whole idle timeout; with the key kept in a private file
//! beside the router's identity, they learn within one round trip and dial again.

use std::path::Path;

use rand::RngCore;

/// The file name, in the directory of the router's identity file.
pub const FILE: &str = "stateless-reset.key";

/// The key from `DIR/stateless-reset.key` beside `identity_path`, created (0600) on first use;
/// a fresh random key when the router keeps no files or the file cannot be used (logged: the
/// only cost is slower failover after a restart).
pub fn load_or_create(identity_path: Option<&Path>) -> [u8; 32] {
    let mut fresh = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    let Some(path) = identity_path.and_then(Path::parent).map(|d| d.join(FILE)) else {
        return fresh;
    };
    match std::fs::read(&path) {
        Ok(bytes) => match <[u8; 32]>::try_from(bytes.as_slice()) {
            Ok(key) => return key,
            Err(_) => {
                tracing::warn!(path = %path.display(), "the stateless-reset key is not 32 bytes; replacing it")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the stateless-reset key; using a fresh one");
            return fresh;
        }
    }
    if let Err(e) = umbra_pki::write_file(&path, &fresh, 0o600) {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the stateless-reset key; clients will notice a restart only by timeout");
    }
    fresh
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("router.json");
        let a = super::load_or_create(Some(&id));
        let b = super::load_or_create(Some(&id));
        assert_eq!(a, b);
        let meta = std::fs::metadata(dir.path().join(super::FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_ne!(super::load_or_create(None), a);
        std::fs::write(dir.path().join(super::FILE), b"short").unwrap();
        let c = super::load_or_create(Some(&id));
        assert_ne!(c, a, "a damaged key is replaced");
        assert_eq!(super::load_or_create(Some(&id)), c);
    }
}
