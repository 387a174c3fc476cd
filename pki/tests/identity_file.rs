//! Identity files: what `umbra enroll` writes and every process loads.

mod common;

use common::{ca, enroll};
use umbra_pki::{CertificateError, IdentityFile, IdentityFileError, PkiError};
use umbra_policies::IdentityKind;

#[test]
fn save_load_round_trip() {
    let ca = ca();
    let id = enroll(&ca, IdentityKind::Agent, "agent-1");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent-1.json");
    id.save(&path).expect("save");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let loaded = IdentityFile::load(&path).expect("load");
    assert_eq!(loaded.version, 1);
    assert_eq!(loaded.id, id.id);
    assert_eq!(loaded.name, id.name);
    assert_eq!(loaded.kind, id.kind);
    assert_eq!(loaded.trust_domain, id.trust_domain);
    assert_eq!(loaded.controller, id.controller);
    assert_eq!(loaded.ca_pem, id.ca_pem);
    assert_eq!(loaded.cert_pem, id.cert_pem);
    assert_eq!(loaded.key_pem, id.key_pem);
    assert_eq!(
        loaded.spiffe().to_string(),
        "spiffe://umbra.local/agent/agent-1"
    );
    let leaf = loaded.leaf().expect("leaf");
    assert_eq!(leaf.spiffe, loaded.spiffe());
    assert!(leaf.not_before < leaf.not_after);

    // Saving again replaces the file in place.
    loaded.save(&path).expect("save again");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
}

#[test]
fn debug_does_not_show_the_key() {
    let ca = ca();
    let id = enroll(&ca, IdentityKind::Agent, "agent-1");
    let dbg = format!("{id:?}");
    assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    let key_body: String = id
        .key_pem
        .expose()
        .lines()
        .nth(1)
        .expect("key line")
        .to_owned();
    assert!(!dbg.contains(&key_body));
    assert!(dbg.contains("key_pem: \"...\""), "{dbg}");
    assert!(dbg.contains("agent-1"));
}

fn load_json(value: &serde_json::Value) -> Result<IdentityFile, PkiError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("id.json");
    std::fs::write(&path, serde_json::to_vec(value).expect("json")).expect("write");
    IdentityFile::load(&path)
}

fn cause(err: PkiError) -> PkiError {
    match err {
        PkiError::File { path, cause } => {
            assert!(path.ends_with("id.json"));
            *cause
        }
        other => panic!("expected an error naming the file, got {other:?}"),
    }
}

#[test]
fn load_refuses_bad_files() {
    let ca = ca();
    let id = enroll(&ca, IdentityKind::Agent, "agent-1");
    let good = serde_json::to_value(&id).expect("json");
    assert!(load_json(&good).is_ok());

    let mut v2 = good.clone();
    v2["version"] = 2.into();
    assert!(matches!(
        cause(load_json(&v2).expect_err("version")),
        PkiError::IdentityFile(IdentityFileError::UnsupportedVersion(2))
    ));

    let mut unknown = good.clone();
    unknown["extra"] = true.into();
    assert!(matches!(
        cause(load_json(&unknown).expect_err("unknown field")),
        PkiError::IdentityFile(IdentityFileError::Json(_))
    ));

    // The file claims another name than its certificate carries.
    let mut renamed = good.clone();
    renamed["name"] = "agent-2".into();
    assert!(matches!(
        cause(load_json(&renamed).expect_err("mismatch")),
        PkiError::IdentityFile(IdentityFileError::SpiffeMismatch { .. })
    ));
    let mut rekind = good.clone();
    rekind["kind"] = "admin".into();
    assert!(load_json(&rekind).is_err());

    // Someone else's key.
    let other = enroll(&ca, IdentityKind::Agent, "agent-2");
    let mut swapped = good.clone();
    swapped["key_pem"] = other.key_pem.expose().into();
    assert!(matches!(
        cause(load_json(&swapped).expect_err("key mismatch")),
        PkiError::Certificate(CertificateError::KeyMismatch)
    ));

    let mut no_key = good.clone();
    no_key["key_pem"] = "".into();
    assert!(matches!(
        cause(load_json(&no_key).expect_err("no key")),
        PkiError::Key(_)
    ));

    let mut bad_name = good;
    bad_name["name"] = "Agent One".into();
    assert!(load_json(&bad_name).is_err());

    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.json");
    assert!(matches!(
        IdentityFile::load(&missing),
        Err(PkiError::Io { .. })
    ));
}

/// A file written before controller lists existed names one controller; it loads unchanged and
/// reads as a list of one. A list loads too, and a broken list is refused at load with the
/// reason, not at the first connection.
#[test]
fn one_controller_or_a_list_loads_and_a_broken_list_is_refused() {
    let ca = ca();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("id.json");
    let mut id = enroll(&ca, IdentityKind::Agent, "agent-1");

    // The old format, byte for byte as it was written: a single `host:port`.
    id.save(&path).expect("save");
    let json = std::fs::read_to_string(&path).expect("read");
    assert!(
        json.contains("\"controller\": \"127.0.0.1:7443\""),
        "{json}"
    );
    let loaded = IdentityFile::load(&path).expect("an old single-address file loads");
    let list = loaded.controllers().expect("controllers");
    assert_eq!(list.len(), 1);
    assert_eq!(list.to_string(), "127.0.0.1:7443");

    id.controller = "10.0.0.1:7443,[::1]:7443, ctrl.example:443".into();
    id.save(&path).expect("save");
    let loaded = IdentityFile::load(&path).expect("a list loads");
    assert_eq!(
        loaded.controllers().expect("controllers").to_string(),
        "10.0.0.1:7443,[::1]:7443,ctrl.example:443"
    );

    for bad in ["", "10.0.0.1:7443,,10.0.0.2:7443", "10.0.0.1"] {
        id.controller = bad.into();
        id.save(&path).expect("save");
        let err = IdentityFile::load(&path).expect_err(bad);
        assert!(
            matches!(
                err,
                PkiError::File { ref cause, .. }
                    if matches!(**cause, PkiError::IdentityFile(IdentityFileError::Controllers(_)))
            ),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().contains("controller"), "{bad:?}: {err}");
    }
}
