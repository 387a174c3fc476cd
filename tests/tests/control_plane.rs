//! The control plane end to end: the real controller over HTTPS on 127.0.0.1:0.

use std::time::Duration;

use base64::Engine;
use http::Method;
use umbra_pki::IdentityFile;
use umbra_policies::{Action, Hosting, IdentityKind, Name, Selector, Semantic, Service};
use umbra_proto::api::*;
use umbra_sdk::{ControllerClient, SdkError};
use umbra_tests::*;

const NONE: Option<&()> = None;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

async fn create(
    c: &ControllerClient,
    n: &str,
    kind: IdentityKind,
    roles: &[&str],
) -> TokenResponse {
    let req = CreateIdentityRequest {
        name: name(n),
        kind,
        roles: roles.iter().map(|r| name(r)).collect(),
        token_ttl_secs: None,
    };
    c.call(Method::POST, "/v1/identities", Some(&req))
        .await
        .expect("create identity")
}

async fn enrolled(t: &TestController, n: &str, kind: IdentityKind, roles: &[&str]) -> IdentityFile {
    let tok = create(&t.admin_client(), n, kind, roles).await;
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("enroll")
}

fn service(n: &str, roles: &[&str]) -> Service {
    Service {
        name: name(n),
        roles: roles.iter().map(|r| name(r)).collect(),
        hosting: Hosting::Address("127.0.0.1:9".parse().unwrap()),
        intercepts: vec![format!("{n}.umbra:443").parse().unwrap()],
        proxy_protocol: false,
    }
}

/// A service hosted through the SDK (no address): what an LLM or MCP gateway serves.
fn hosted_service(n: &str) -> Service {
    Service {
        hosting: Hosting::Sdk,
        ..service(n, &[])
    }
}

async fn grant(
    c: &ControllerClient,
    ids: &[&str],
    svcs: &[&str],
) -> Result<umbra_policies::ServicePolicy, SdkError> {
    let req = GrantRequest {
        name: None,
        action: Action::Dial,
        identities: ids.iter().map(|s| s.parse::<Selector>().unwrap()).collect(),
        services: svcs
            .iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect(),
        semantic: Semantic::AnyOf,
        limits: umbra_policies::GrantLimits::default(),
    };
    c.call(Method::POST, "/v1/policies", Some(&req)).await
}

async fn explain(c: &ControllerClient, id: &str, svc: &str) -> ExplainResponse {
    c.call(
        Method::GET,
        &format!("/v1/explain?identity={id}&service={svc}"),
        NONE,
    )
    .await
    .expect("explain")
}

fn api_status(e: &SdkError) -> Option<u16> {
    match e {
        SdkError::Api { status, .. } => Some(*status),
        _ => None,
    }
}

fn is_handshake_refusal(e: &SdkError) -> bool {
    matches!(e, SdkError::Handshake { .. })
}

#[tokio::test]
async fn enroll_grant_explain_revoke_and_survive_restart() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let agent = enrolled(&t, "agent-1", IdentityKind::Agent, &["analysts"]).await;
    assert_eq!(
        agent.spiffe().to_string(),
        "spiffe://test.umbra/agent/agent-1"
    );

    // The identity file holds a key: written 0600 and never shown by Debug.
    let path = t.path("agent-1.json");
    agent.save(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!format!("{agent:?}").contains("PRIVATE KEY"));

    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&service("llm", &["ai"])))
        .await
        .unwrap();
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&service("db", &[])))
        .await
        .unwrap();
    assert!(
        !explain(&admin, "agent-1", "llm").await.allowed,
        "deny by default"
    );
    let p = grant(&admin, &["#analysts"], &["@llm"]).await.unwrap();
    let ex = explain(&admin, "agent-1", "llm").await;
    assert!(ex.allowed, "{ex:?}");
    assert_eq!(ex.granting, vec![p.name.clone()]);
    assert!(!explain(&admin, "agent-1", "db").await.allowed);

    // The agent can renew its own certificate, and the new one works.
    let renewed = umbra_sdk::renew(&agent).await.expect("renew");
    assert_ne!(renewed.leaf().unwrap().serial, agent.leaf().unwrap().serial);
    assert_ne!(
        renewed.key_pem.expose(),
        agent.key_pem.expose(),
        "renewal rotates the key"
    );
    // An agent is not an admin.
    let e = t
        .client_for(&renewed)
        .call::<Vec<IdentityView>>(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(403), "{e}");

    // Revoke: the record stays, every certificate is refused at the handshake.
    let _: umbra_policies::Identity = admin
        .call(Method::POST, "/v1/identities/agent-1/revoke", NONE)
        .await
        .unwrap();
    let ex = explain(&admin, "agent-1", "llm").await;
    assert!(!ex.allowed);
    assert!(ex.reason.contains("revoked"), "{}", ex.reason);
    let e = umbra_sdk::renew(&renewed).await.unwrap_err();
    assert!(
        is_handshake_refusal(&e),
        "a revoked certificate must fail the handshake: {e}"
    );
    let e = umbra_sdk::renew(&agent).await.unwrap_err();
    assert!(is_handshake_refusal(&e), "{e}");
    let show: IdentityView = admin
        .call(Method::GET, "/v1/identities/agent-1", NONE)
        .await
        .unwrap();
    assert!(show.identity.revoked);
    assert_eq!(show.certs.len(), 2);
    assert!(show.certs.iter().all(|c| c.revoked));

    // Restart: everything committed is still there, revocations included.
    let t = t.restart().await;
    let admin = t.admin_client();
    let ids: Vec<IdentityView> = admin
        .call(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap();
    let names: Vec<&str> = ids.iter().map(|i| i.identity.name.as_str()).collect();
    assert_eq!(names, vec!["admin", "agent-1"]);
    let svcs: Vec<Service> = admin.call(Method::GET, "/v1/services", NONE).await.unwrap();
    assert_eq!(svcs.len(), 2);
    let pols: Vec<umbra_policies::ServicePolicy> =
        admin.call(Method::GET, "/v1/policies", NONE).await.unwrap();
    assert_eq!(pols.len(), 1);
    let mut renewed = renewed;
    renewed.controller = t.addr(); // the restarted controller listens on a new ephemeral port
    let e = umbra_sdk::renew(&renewed).await.unwrap_err();
    assert!(
        is_handshake_refusal(&e),
        "revocation must survive a restart: {e}"
    );

    // The audit log recorded who did what.
    let audit: Vec<AuditEntry> = admin
        .call(Method::GET, "/v1/audit?limit=100", NONE)
        .await
        .unwrap();
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    for want in [
        "identity.create",
        "identity.enroll",
        "identity.renew",
        "service.create",
        "policy.grant",
        "identity.revoke",
    ] {
        assert!(actions.contains(&want), "audit lacks {want}: {actions:?}");
    }
    let renew = audit.iter().find(|a| a.action == "identity.renew").unwrap();
    assert_eq!(
        renew.detail["old_serial"],
        agent.leaf().unwrap().serial.to_string()
    );
    let revoke = audit
        .iter()
        .find(|a| a.action == "identity.revoke")
        .unwrap();
    assert_eq!(revoke.actor, "spiffe://test.umbra/admin/admin");
    assert!(
        !serde_json::to_string(&audit).unwrap().contains("eyJ"),
        "no token in the audit log"
    );
}

#[tokio::test]
async fn tokens_work_once_and_bad_tokens_are_refused() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let tok = create(&admin, "agent-1", IdentityKind::Agent, &[]).await;
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("first use");
    let e = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already used"), "{e}");

    // Tampered payload: the signature no longer matches.
    let tok = create(&admin, "agent-2", IdentityKind::Agent, &[]).await;
    let mut parts: Vec<String> = tok.token.split('.').map(str::to_owned).collect();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&parts[1])
        .unwrap();
    let tampered = String::from_utf8(payload)
        .unwrap()
        .replace("agent-2", "agent-9");
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tampered);
    let e = umbra_sdk::enroll(&parts.join("."), Some(&t.addr()))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(401), "{e}");
    assert!(e.to_string().contains("enrollment refused"), "{e}");

    // Garbage.
    for bad in ["", "abc", "a.b.c", &"x".repeat(10_000)] {
        let e = umbra_sdk::enroll(bad, Some(&t.addr())).await.unwrap_err();
        assert!(matches!(e, SdkError::Token(_)), "{bad:.20}: {e}");
    }

    // A token from another controller (another CA and signing key).
    let other = TestController::start().await;
    let foreign = create(&other.admin_client(), "agent-3", IdentityKind::Agent, &[]).await;
    let e = umbra_sdk::enroll(&foreign.token, Some(&t.addr()))
        .await
        .unwrap_err();
    assert!(
        is_handshake_refusal(&e),
        "the pinned CA does not match, so nothing is sent: {e}"
    );

    // A token for a deleted identity.
    let tok = create(&admin, "agent-4", IdentityKind::Agent, &[]).await;
    let _: serde_json::Value = admin
        .call(Method::DELETE, "/v1/identities/agent-4", NONE)
        .await
        .unwrap();
    let e = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(401), "{e}");

    // A newer token replaces an older unused one.
    let old = create(&admin, "agent-5", IdentityKind::Agent, &[]).await;
    let new: TokenResponse = admin
        .call(
            Method::POST,
            "/v1/identities/agent-5/token",
            Some(&TokenRequest::default()),
        )
        .await
        .unwrap();
    let e = umbra_sdk::enroll(&old.token, Some(&t.addr()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("replaced"), "{e}");
    umbra_sdk::enroll(&new.token, Some(&t.addr()))
        .await
        .expect("the newer token works");

    // Expired: issued now, presented to the same controller an hour later.
    let tok = create(&admin, "agent-6", IdentityKind::Agent, &[]).await;
    let t = t.restart_with(shifted_clock(3600)).await;
    let e = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
}

/// Builds a CSR with rcgen that asks for more than it should get.
fn greedy_csr() -> (Vec<u8>, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["evil.example".to_owned(), "localhost".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://test.umbra/admin/admin".try_into().unwrap(),
    ));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap();
    (csr.der().to_vec(), key)
}

async fn raw_enroll(
    t: &TestController,
    token: &str,
    csr: &[u8],
) -> Result<EnrollResponse, SdkError> {
    let claims = umbra_pki::decode_unverified(token).unwrap();
    let tls = umbra_pki::client_config_pinned(claims.ca, &[b"http/1.1"]);
    let c = ControllerClient::new(
        &t.addr().parse().unwrap(),
        umbra_pki::ENROLL_SERVER_NAME,
        tls,
    );
    let req = EnrollRequest {
        token: token.to_owned(),
        csr: base64::engine::general_purpose::STANDARD.encode(csr),
    };
    c.call(Method::POST, "/v1/enroll", Some(&req)).await
}

#[tokio::test]
async fn the_controller_not_the_csr_decides_what_is_certified() {
    let t = TestController::start().await;
    let tok = create(&t.admin_client(), "agent-1", IdentityKind::Agent, &[]).await;

    // A CSR whose signature does not verify (proof of possession fails) is refused, and the
    // token is not spent by the failure.
    let (mut csr, _) = greedy_csr();
    let last = csr.len() - 1;
    csr[last] ^= 0x55;
    let e = raw_enroll(&t, &tok.token, &csr).await.unwrap_err();
    assert_eq!(api_status(&e), Some(400), "{e}");
    let e = raw_enroll(&t, &tok.token, b"not a csr").await.unwrap_err();
    assert_eq!(api_status(&e), Some(400), "{e}");

    let (csr, _) = greedy_csr();
    let resp = raw_enroll(&t, &tok.token, &csr)
        .await
        .expect("the token still works");
    let leaf = umbra_pki::parse_pem_chain(&resp.cert_pem)
        .unwrap()
        .remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|g| format!("{g:?}"))
        .collect();
    assert_eq!(names.len(), 1, "only the SPIFFE id: {names:?}");
    assert!(
        names[0].contains("spiffe://test.umbra/agent/agent-1"),
        "{names:?}"
    );
    assert!(!cert.is_ca());
    assert!(cert.subject().to_string().contains("agent-1"));
}

#[tokio::test]
async fn the_management_api_takes_only_admins() {
    let t = TestController::start().await;
    let admin = t.admin_client();

    // No client certificate at all: the handshake is refused.
    let tls = umbra_pki::client_config_pinned(t.ctrl.ca().fingerprint(), &[b"http/1.1"]);
    let anon = ControllerClient::new(
        &t.addr().parse().unwrap(),
        umbra_pki::CONTROLLER_SERVER_NAME,
        tls,
    );
    let e = anon
        .call::<Vec<IdentityView>>(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap_err();
    assert!(is_handshake_refusal(&e), "{e}");

    // A router certificate is authenticated but not an admin: 403.
    let tok: TokenResponse = admin
        .call(
            Method::POST,
            "/v1/routers",
            Some(&serde_json::json!({"name": "r1"})),
        )
        .await
        .unwrap();
    let router = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .unwrap();
    let e = t
        .client_for(&router)
        .call::<Vec<IdentityView>>(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(403), "{e}");

    // A second admin works until it is revoked, then fails at the handshake.
    let second = enrolled(&t, "ops", IdentityKind::Admin, &[]).await;
    let c2 = t.client_for(&second);
    let _: Vec<IdentityView> = c2
        .call(Method::GET, "/v1/identities", NONE)
        .await
        .expect("second admin");
    let _: umbra_policies::Identity = admin
        .call(Method::POST, "/v1/identities/ops/revoke", NONE)
        .await
        .unwrap();
    let e = c2
        .call::<Vec<IdentityView>>(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap_err();
    assert!(is_handshake_refusal(&e), "{e}");
    // An admin cannot revoke or delete itself.
    let e = admin
        .call::<serde_json::Value>(Method::POST, "/v1/identities/admin/revoke", NONE)
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(409), "{e}");

    // A certificate from another CA is refused at the handshake.
    let other = TestController::start().await;
    let mut foreign = other.admin.clone();
    foreign.ca_pem = t.admin.ca_pem.clone();
    let e = t
        .client_for(&foreign)
        .call::<Vec<IdentityView>>(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap_err();
    assert!(is_handshake_refusal(&e), "{e}");
}

#[tokio::test]
async fn an_expired_admin_certificate_is_refused() {
    // The controller judges client certificates on its own clock: moved three days on, the
    // admin certificate made at init (24 h) has expired at its handshake.
    let clock = umbra_clock::ManualClock::starting_now();
    let t = TestController::start_with({
        let clock = clock.clock();
        |cfg| cfg.clock = clock
    })
    .await;
    clock.advance(Duration::from_secs(3 * 86400));
    let e = t
        .admin_client()
        .call::<Vec<IdentityView>>(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap_err();
    assert!(is_handshake_refusal(&e), "{e}");
}

async fn raw(
    c: &ControllerClient,
    method: Method,
    path: &str,
    body: &str,
) -> Result<serde_json::Value, SdkError> {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_owned()));
    c.call(method, path, Some(&v)).await
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let before = t.ctrl.state();

    let cases: Vec<(&str, serde_json::Value, u16, &str)> = vec![
        (
            "/v1/identities",
            serde_json::json!({"name": "Bad Name"}),
            400,
            "allowed are",
        ),
        (
            "/v1/identities",
            serde_json::json!({"name": "ok", "colour": "red"}),
            400,
            "unknown field",
        ),
        (
            "/v1/identities",
            serde_json::json!({"name": "ok", "kind": "router"}),
            400,
            "router",
        ),
        (
            "/v1/identities",
            serde_json::json!("just a string"),
            400,
            "malformed",
        ),
        (
            "/v1/identities",
            serde_json::json!({"name": "x".repeat(64)}),
            400,
            "63",
        ),
        (
            "/v1/services",
            serde_json::json!({"name": "s", "hosting": {"address": "nohost"}}),
            400,
            "port",
        ),
        (
            "/v1/policies",
            serde_json::json!({"identities": ["agent"], "services": ["#all"]}),
            400,
            "must start",
        ),
        (
            "/v1/policies",
            serde_json::json!({"identities": ["@ghost"], "services": ["#all"]}),
            400,
            "@ghost: there is no identity named \"ghost\"",
        ),
        (
            "/v1/apply",
            serde_json::json!({"document": "identities: [", "dry_run": false}),
            400,
            "",
        ),
    ];
    for (path, body, status, needle) in cases {
        let e = admin
            .call::<serde_json::Value>(Method::POST, path, Some(&body))
            .await
            .unwrap_err();
        assert_eq!(api_status(&e), Some(status), "{path} {body}: {e}");
        assert!(e.to_string().contains(needle), "{path} {body}: {e}");
    }
    // Oversized body.
    let huge = serde_json::json!({"document": "#".repeat(17 * 1024 * 1024), "dry_run": true});
    let e = admin
        .call::<serde_json::Value>(Method::POST, "/v1/apply", Some(&huge))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(413), "{e}");
    // Unknown things are 404.
    let e = raw(&admin, Method::POST, "/v1/identities/nobody/revoke", "null")
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(404), "{e}");
    let e = raw(&admin, Method::DELETE, "/v1/policies/nothing", "null")
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(404), "{e}");

    assert_eq!(t.ctrl.state(), before, "refused requests change nothing");
    // The controller is still serving.
    let _: Vec<IdentityView> = admin
        .call(Method::GET, "/v1/identities", NONE)
        .await
        .unwrap();
}

#[tokio::test]
async fn concurrent_conflicting_writes_have_one_winner() {
    let t = TestController::start().await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = t.admin_client();
        tasks.push(tokio::spawn(async move {
            let req = CreateIdentityRequest {
                name: name("contested"),
                kind: IdentityKind::Agent,
                roles: vec![],
                token_ttl_secs: None,
            };
            c.call::<TokenResponse>(Method::POST, "/v1/identities", Some(&req))
                .await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(api_status(&e), Some(409), "{e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(
        t.ctrl
            .state()
            .identities
            .values()
            .filter(|i| i.name.as_str() == "contested")
            .count(),
        1
    );
}

#[tokio::test]
async fn deleting_a_named_service_needs_cascade() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let _ = enrolled(&t, "a1", IdentityKind::Agent, &[]).await;
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&service("llm", &[])))
        .await
        .unwrap();
    let p = grant(&admin, &["@a1"], &["@llm"]).await.unwrap();
    let e = raw(&admin, Method::DELETE, "/v1/services/llm", "null")
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(409), "{e}");
    assert!(e.to_string().contains(p.name.as_str()), "{e}");
    let r = raw(
        &admin,
        Method::DELETE,
        "/v1/services/llm?cascade=true",
        "null",
    )
    .await
    .unwrap();
    assert_eq!(r["deleted_policies"][0], p.name.as_str());
    assert!(t.ctrl.state().policies.is_empty());
    // Duplicate intercepts are refused.
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&service("one", &[])))
        .await
        .unwrap();
    let mut dup = service("two", &[]);
    dup.intercepts = service("one", &[]).intercepts;
    let e = admin
        .call::<Service>(Method::POST, "/v1/services", Some(&dup))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(409), "{e}");
}

const DOC: &str = r##"
identities:
  - name: admin
    kind: admin
  - name: agent-1
    roles: [analysts]
  - name: agent-2
services:
  - name: llm
    roles: [ai]
    address: 127.0.0.1:8080
    intercepts: ["llm.umbra:443"]
  - name: tools
    hosted: true
policies:
  - name: analysts-ai
    identities: ["#analysts"]
    services: ["#ai"]
  - name: agent-2-tools
    action: dial
    identities: ["@agent-2"]
    services: ["@tools"]
"##;

#[tokio::test]
async fn apply_and_export_round_trip() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let dry: ApplyResponse = admin
        .call(
            Method::POST,
            "/v1/apply",
            Some(&ApplyRequest {
                document: DOC.into(),
                dry_run: true,
            }),
        )
        .await
        .unwrap();
    assert!(!dry.applied);
    assert_eq!(dry.changes, 6, "{}", dry.plan);
    assert!(dry.plan.contains("agent-1"), "{}", dry.plan);
    assert!(
        t.ctrl.state().services.is_empty(),
        "a dry run changes nothing"
    );

    let done: ApplyResponse = admin
        .call(
            Method::POST,
            "/v1/apply",
            Some(&ApplyRequest {
                document: DOC.into(),
                dry_run: false,
            }),
        )
        .await
        .unwrap();
    assert!(done.applied);
    assert!(explain(&admin, "agent-1", "llm").await.allowed);
    assert!(explain(&admin, "agent-2", "tools").await.allowed);
    assert!(!explain(&admin, "agent-2", "llm").await.allowed);

    let export: ExportResponse = admin.call(Method::GET, "/v1/export", NONE).await.unwrap();
    let again: ApplyResponse = admin
        .call(
            Method::POST,
            "/v1/apply",
            Some(&ApplyRequest {
                document: export.document.clone(),
                dry_run: false,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        again.changes, 0,
        "export then apply is a no-op: {}",
        again.plan
    );

    // Every problem in a bad document is reported at once, and nothing changes.
    let bad = "identities:\n  - name: Bad\n  - name: x\n    kind: agent\n  - name: x\npolicies:\n  - name: p\n    identities: ['@nobody']\n    services: ['#all']\n";
    let e = admin
        .call::<ApplyResponse>(
            Method::POST,
            "/v1/apply",
            Some(&ApplyRequest {
                document: bad.into(),
                dry_run: false,
            }),
        )
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert_eq!(api_status(&e), Some(400), "{msg}");
    for needle in ["identities[0]", "duplicate", "nobody"] {
        assert!(msg.contains(needle), "missing {needle:?} in {msg}");
    }
    // Omitting the applying admin is refused rather than locking the operator out.
    let e = admin
        .call::<ApplyResponse>(
            Method::POST,
            "/v1/apply",
            Some(&ApplyRequest {
                document: "identities: []\n".into(),
                dry_run: false,
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(409), "{e}");
    assert_eq!(t.ctrl.state().services.len(), 2);
}

#[tokio::test]
async fn no_write_puts_two_services_on_one_intercept() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let apply = |document: &str| ApplyRequest {
        document: document.into(),
        dry_run: false,
    };
    // Before, `apply` took this and the tunneler silently kept one of the two.
    let doc = r#"
identities: [{name: admin, kind: admin}]
services:
  - {name: one, hosted: true, intercepts: ["llm.umbra:443"]}
  - {name: two, address: "127.0.0.1:8080", intercepts: ["LLM.umbra:443"]}
"#;
    let e = admin
        .call::<ApplyResponse>(Method::POST, "/v1/apply", Some(&apply(doc)))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(400), "{e}");
    assert!(
        e.to_string().contains(
            "services[1].intercepts[0]: intercept llm.umbra:443 of service two is already used by service one"
        ),
        "{e}"
    );
    assert!(t.ctrl.state().services.is_empty(), "nothing was applied");

    // One service per intercept applies; a command adding a second is refused by the same rule.
    let fixed = doc.replace("LLM.umbra:443", "other.umbra:443");
    let done: ApplyResponse = admin
        .call(Method::POST, "/v1/apply", Some(&apply(&fixed)))
        .await
        .unwrap();
    assert!(done.applied, "{}", done.plan);
    let mut dup = service("three", &[]);
    dup.intercepts = vec!["other.umbra:443".parse().unwrap()];
    let e = admin
        .call::<Service>(Method::POST, "/v1/services", Some(&dup))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(409), "{e}");
    assert!(
        e.to_string()
            .contains("intercept other.umbra:443 is already used by service two"),
        "{e}"
    );
    // So is an identity name that is taken, and a grant with nothing to grant to.
    let e = admin
        .call::<TokenResponse>(
            Method::POST,
            "/v1/identities",
            Some(&CreateIdentityRequest {
                name: name("admin"),
                kind: IdentityKind::Agent,
                roles: vec![],
                token_ttl_secs: None,
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(409), "{e}");
    assert!(
        e.to_string()
            .contains("an identity named admin already exists"),
        "{e}"
    );
    let e = grant(&admin, &[], &["@one"]).await.unwrap_err();
    assert_eq!(api_status(&e), Some(400), "{e}");
    assert!(
        e.to_string()
            .contains("identities: a policy needs at least one selector"),
        "{e}"
    );
    assert_eq!(t.ctrl.state().services.len(), 2);
    assert!(t.ctrl.state().policies.is_empty());
}

#[tokio::test]
async fn routers_follow_the_control_channel() {
    use umbra_proto::{ChangeEvent, ControlMessage, FrameDecoder};
    let t = TestController::start().await;
    let admin = t.admin_client();
    let tok: TokenResponse = admin
        .call(
            Method::POST,
            "/v1/routers",
            Some(&serde_json::json!({"name": "r1"})),
        )
        .await
        .unwrap();
    let router = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .unwrap();
    let rc = t.client_for(&router);

    async fn next(s: &mut umbra_sdk::ResponseStream, d: &mut FrameDecoder) -> ControlMessage {
        loop {
            if let Some(m) = d.next::<ControlMessage>().unwrap() {
                return m;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), s.chunk())
                .await
                .expect("timely")
                .unwrap()
                .expect("open");
            d.push(&chunk);
        }
    }

    let mut s = rc
        .stream("/v1/control?advertise=127.0.0.1:4433")
        .await
        .unwrap();
    let mut d = FrameDecoder::new(umbra_proto::MAX_CONTROL_FRAME);
    let ControlMessage::Hello { epoch, .. } = next(&mut s, &mut d).await else {
        panic!("hello first")
    };
    let ControlMessage::SnapshotBegin {
        epoch: snap_epoch,
        seq: snap_seq,
    } = next(&mut s, &mut d).await
    else {
        panic!("then a snapshot")
    };
    assert_eq!(snap_epoch, epoch);
    // The snapshot comes in chunks; the router's own identity is in one of them.
    let mut saw_router = false;
    loop {
        match next(&mut s, &mut d).await {
            ControlMessage::SnapshotChunk(c) => {
                saw_router |= c.identities.iter().any(|i| i.name.as_str() == "r1");
            }
            ControlMessage::SnapshotEnd(counts) => {
                assert!(counts.identities >= 2, "{counts:?}");
                break;
            }
            other => panic!("a snapshot is chunks then its end, not {other:?}"),
        }
    }
    assert!(saw_router);

    // A revocation arrives as deltas, pushed: the certificate first, then the identity.
    let agent = enrolled(&t, "agent-1", IdentityKind::Agent, &[]).await;
    let serial = agent.leaf().unwrap().serial.to_string();
    let mut seq = snap_seq;
    let mut saw_identity = false;
    loop {
        if let ControlMessage::Delta(dl) = next(&mut s, &mut d).await {
            assert_eq!(dl.seq, seq + 1, "deltas are gapless");
            seq = dl.seq;
            if let ChangeEvent::IdentityPut { identity } = &dl.change {
                if identity.name.as_str() == "agent-1" && !identity.revoked {
                    saw_identity = true;
                    let _: umbra_policies::Identity = admin
                        .call(Method::POST, "/v1/identities/agent-1/revoke", NONE)
                        .await
                        .unwrap();
                }
            }
            if let ChangeEvent::CertRevoked { cert } = &dl.change {
                assert_eq!(cert.serial, serial);
                break;
            }
        }
    }
    assert!(saw_identity);

    // Resuming from a sequence number replays only what came after it.
    drop(s);
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&service("late", &[])))
        .await
        .unwrap();
    let mut s = rc
        .stream(&format!("/v1/control?epoch={epoch}&seq={seq}"))
        .await
        .unwrap();
    let mut d = FrameDecoder::new(umbra_proto::MAX_CONTROL_FRAME);
    assert!(matches!(
        next(&mut s, &mut d).await,
        ControlMessage::Hello { .. }
    ));
    let mut got_late = false;
    for _ in 0..5 {
        match next(&mut s, &mut d).await {
            ControlMessage::SnapshotBegin { .. } => {
                panic!("a resumable follower gets deltas, not a snapshot")
            }
            ControlMessage::Delta(dl) => {
                assert!(dl.seq > seq);
                if matches!(&dl.change, ChangeEvent::ServicePut { service } if service.name.as_str() == "late")
                {
                    got_late = true;
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(got_late);
    let routers: Vec<RouterView> = admin.call(Method::GET, "/v1/routers", NONE).await.unwrap();
    assert_eq!(routers[0].advertise.as_deref(), Some("127.0.0.1:4433"));

    // Agents may not open the control channel.
    let e = t
        .client_for(&agent)
        .stream("/v1/control")
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            e,
            SdkError::Handshake { .. } | SdkError::Api { status: 403, .. }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_host_sees_every_active_agent_that_may_dial_what_it_binds() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let gw = enrolled(&t, "gw", IdentityKind::Agent, &[]).await;
    create(&admin, "a1", IdentityKind::Agent, &["analysts"]).await;
    create(&admin, "a2", IdentityKind::Agent, &["analysts"]).await;
    create(&admin, "a3", IdentityKind::Agent, &[]).await;
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&hosted_service("llm")))
        .await
        .unwrap();
    let named = |name_: &str, action, ids: &[&str], rpm: Option<u32>| GrantRequest {
        name: Some(name(name_)),
        action,
        identities: ids.iter().map(|s| s.parse::<Selector>().unwrap()).collect(),
        services: vec!["@llm".parse().unwrap()],
        semantic: Semantic::AnyOf,
        limits: umbra_policies::GrantLimits {
            rpm: rpm.map(|r: u32| umbra_policies::Rpm::try_from(r).unwrap()),
            ..Default::default()
        },
    };
    for req in [
        named("gw-binds", Action::Bind, &["@gw"], None),
        named("analysts", Action::Dial, &["#analysts"], Some(60)),
        named("everyone", Action::Dial, &["#all"], None),
    ] {
        let _: umbra_policies::ServicePolicy = admin
            .call(Method::POST, "/v1/policies", Some(&req))
            .await
            .unwrap();
    }
    let grants = || async {
        let v: EdgeView = t
            .client_for(&gw)
            .call(Method::GET, "/v1/edge", NONE)
            .await
            .unwrap();
        assert_eq!(v.services.len(), 1);
        assert!(
            v.services[0].bind,
            "gw binds llm (and `#all` lets it dial too)"
        );
        (v.services[0].grants.iter())
            .map(|g| {
                (
                    g.name.to_string(),
                    g.policy.to_string(),
                    g.limits.rpm.map(u32::from),
                )
            })
            .collect::<Vec<_>>()
    };
    let row = |i: &str, p: &str, rpm| (i.to_owned(), p.to_owned(), rpm);
    // Every agent the Dial policies select, with each granting policy's limits; the admin that
    // `#all` selects too calls no gateway.
    assert_eq!(
        grants().await,
        [
            row("a1", "analysts", Some(60)),
            row("a1", "everyone", None),
            row("a2", "analysts", Some(60)),
            row("a2", "everyone", None),
            row("a3", "everyone", None),
            row("gw", "everyone", None),
        ]
    );
    let _: serde_json::Value = admin
        .call(Method::POST, "/v1/identities/a2/revoke", NONE)
        .await
        .unwrap();
    let now = grants().await;
    assert!(now.iter().all(|(i, _, _)| i != "a2"), "{now:?}");
    assert_eq!(now.len(), 4);
}

#[tokio::test]
async fn an_identity_sees_only_its_own_services() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let a1 = enrolled(&t, "a1", IdentityKind::Agent, &["analysts"]).await;
    let a2 = enrolled(&t, "a2", IdentityKind::Agent, &[]).await;
    for s in ["llm", "db", "tools"] {
        let _: Service = admin
            .call(Method::POST, "/v1/services", Some(&service(s, &[])))
            .await
            .unwrap();
    }
    grant(&admin, &["#analysts"], &["@llm", "@tools"])
        .await
        .unwrap();
    let v: EdgeView = t
        .client_for(&a1)
        .call(Method::GET, "/v1/edge", NONE)
        .await
        .unwrap();
    let names: Vec<&str> = v.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["llm", "tools"]);
    assert!(v.services.iter().all(|s| s.dial && !s.bind));
    assert_eq!(v.services[0].intercepts[0].to_string(), "llm.umbra:443");
    let v: EdgeView = t
        .client_for(&a2)
        .call(Method::GET, "/v1/edge", NONE)
        .await
        .unwrap();
    assert!(
        v.services.is_empty(),
        "nothing is granted, so nothing exists"
    );

    // The watch pushes a new view when a grant changes it.
    use umbra_proto::edge::EdgeWatchDecoder;
    let mut s = t.client_for(&a2).stream("/v1/edge/watch").await.unwrap();
    let mut d = EdgeWatchDecoder::new(1 << 20);
    let mut views = Vec::new();
    let mut granted = false;
    while views.len() < 2 {
        if let Some(v) = d.next().unwrap() {
            views.push(v.clone());
            if !granted {
                grant(&admin, &["@a2"], &["@db"]).await.unwrap();
                granted = true;
            }
            continue;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), s.chunk())
            .await
            .expect("timely")
            .unwrap()
            .expect("open");
        d.push(&chunk);
    }
    assert!(views[0].services.is_empty());
    assert_eq!(views[1].services.len(), 1);
    assert_eq!(views[1].services[0].name.as_str(), "db");
}

#[tokio::test]
async fn revoked_routers_are_not_offered_and_streams_are_capped_per_identity() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let tok: TokenResponse = admin
        .call(
            Method::POST,
            "/v1/routers",
            Some(&serde_json::json!({"name": "r1"})),
        )
        .await
        .unwrap();
    let router = umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .unwrap();
    let rc = t.client_for(&router);
    let s = rc
        .stream("/v1/control?advertise=127.0.0.1:4433")
        .await
        .unwrap();
    let agent = enrolled(&t, "agent-1", IdentityKind::Agent, &[]).await;
    let ac = t.client_for(&agent);
    let v: EdgeView = ac.call(Method::GET, "/v1/edge", NONE).await.unwrap();
    assert_eq!(v.routers.len(), 1);

    // A revoked router is never offered to agents again, and cannot reopen its channel.
    let _: umbra_policies::Identity = admin
        .call(Method::POST, "/v1/identities/r1/revoke", NONE)
        .await
        .unwrap();
    let v: EdgeView = ac.call(Method::GET, "/v1/edge", NONE).await.unwrap();
    assert!(v.routers.is_empty(), "{v:?}");
    drop(s);
    assert!(rc
        .stream("/v1/control?advertise=127.0.0.1:4433")
        .await
        .is_err());

    // One identity cannot hold more than its share of long-lived streams.
    let mut held = Vec::new();
    for _ in 0..umbra_controller::MAX_STREAMS_PER_IDENTITY {
        held.push(ac.stream("/v1/edge/watch").await.expect("within the cap"));
    }
    let e = ac
        .stream("/v1/edge/watch")
        .await
        .err()
        .expect("over the cap");
    assert_eq!(api_status(&e), Some(409), "{e}");
    held.pop();
    // The slot comes back once a stream ends (the controller notices the closed body).
    let mut ok = false;
    for _ in 0..100 {
        if ac.stream("/v1/edge/watch").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a closed stream gives its slot back");
}

#[tokio::test]
async fn enrollment_bodies_are_small() {
    let t = TestController::start().await;
    let tok = create(&t.admin_client(), "agent-1", IdentityKind::Agent, &[]).await;
    let claims = umbra_pki::decode_unverified(&tok.token).unwrap();
    let tls = umbra_pki::client_config_pinned(claims.ca, &[b"http/1.1"]);
    let c = ControllerClient::new(
        &t.addr().parse().unwrap(),
        umbra_pki::ENROLL_SERVER_NAME,
        tls,
    );
    let big = serde_json::json!({"token": tok.token, "csr": "A".repeat(100 * 1024)});
    let e = c
        .call::<EnrollResponse>(Method::POST, "/v1/enroll", Some(&big))
        .await
        .unwrap_err();
    assert_eq!(api_status(&e), Some(413), "{e}");
    // The token was not spent.
    umbra_sdk::enroll(&tok.token, Some(&t.addr()))
        .await
        .expect("still valid");
}

#[tokio::test]
async fn deltas_mark_where_each_commit_ends() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    let _ = enrolled(&t, "a1", IdentityKind::Agent, &[]).await;
    let _: Service = admin
        .call(Method::POST, "/v1/services", Some(&service("llm", &[])))
        .await
        .unwrap();
    grant(&admin, &["@a1"], &["@llm"]).await.unwrap();
    let mut sub = t.ctrl.subscribe(None).unwrap();
    // One command, two changes: the service and the policy that named it.
    let _ = raw(
        &admin,
        Method::DELETE,
        "/v1/services/llm?cascade=true",
        "null",
    )
    .await
    .unwrap();
    let first = sub.deltas.recv().await.unwrap();
    let second = sub.deltas.recv().await.unwrap();
    assert!(!first.last_in_commit, "{first:?}");
    assert!(second.last_in_commit, "{second:?}");
    assert_eq!(second.seq, first.seq + 1);
    // The same marks come back when a follower resumes from the log.
    let resumed = t
        .ctrl
        .subscribe(Some((&sub_epoch(&mut sub), first.seq - 1)))
        .unwrap();
    let marks: Vec<bool> = resumed
        .initial
        .filter_map(|m| match m {
            umbra_proto::ControlMessage::Delta(d) => Some(d.last_in_commit),
            _ => None,
        })
        .collect();
    assert_eq!(marks, vec![false, true]);
}

fn sub_epoch(sub: &mut umbra_controller::Subscription) -> String {
    sub.initial
        .find_map(|m| match m {
            umbra_proto::ControlMessage::Hello { epoch, .. } => Some(epoch),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn bad_query_strings_get_the_json_envelope() {
    let t = TestController::start().await;
    let admin = t.admin_client();
    for path in [
        "/v1/identities?colour=red",
        "/v1/identities?kind=robot",
        "/v1/explain?identity=x",
        "/v1/audit?limit=-1",
    ] {
        let e = admin
            .call::<serde_json::Value>(Method::GET, path, NONE)
            .await
            .unwrap_err();
        match e {
            SdkError::Api { status, code, .. } => {
                assert_eq!(status, 400, "{path}");
                assert_eq!(code, "invalid", "{path}: an error body in our envelope");
            }
            other => panic!("{path}: {other}"),
        }
    }
}

/// The control channel says when its replay is complete (a heartbeat right after it), and
/// sends heartbeats as often as the router asks, but never faster than the floor.
#[tokio::test]
async fn heartbeats_follow_the_routers_request_within_bounds() {
    use umbra_proto::{ControlMessage, FrameDecoder};
    let t = TestController::start().await;
    let router = umbra_tests::dataplane::router_identity(&t, "r1").await;
    let rc = t.client_for(&router);
    // Counts the heartbeats within `window`; the first message must be Hello.
    async fn count(rc: &umbra_sdk::ControllerClient, query: &str, window: Duration) -> Vec<String> {
        let mut s = rc.stream(&format!("/v1/control?{query}")).await.unwrap();
        let mut d = FrameDecoder::new(umbra_proto::MAX_CONTROL_FRAME);
        let mut kinds = vec![];
        let end = tokio::time::Instant::now() + window;
        loop {
            while let Some(m) = d.next::<ControlMessage>().unwrap() {
                kinds.push(
                    match m {
                        ControlMessage::Hello { .. } => "hello",
                        ControlMessage::SnapshotBegin { .. } => "snapshot",
                        ControlMessage::SnapshotChunk(_) => "chunk",
                        ControlMessage::SnapshotEnd(_) => "end",
                        ControlMessage::Delta(_) => "delta",
                        ControlMessage::Heartbeat { .. } => "heartbeat",
                    }
                    .to_owned(),
                );
            }
            match tokio::time::timeout_at(end, s.chunk()).await {
                Ok(Ok(Some(c))) => d.push(&c),
                Ok(other) => panic!("channel ended: {:?}", other.err()),
                Err(_) => return kinds,
            }
        }
    }
    let window = Duration::from_millis(1600);
    let default = count(&rc, "", window).await;
    assert_eq!(
        default,
        ["hello", "snapshot", "chunk", "end", "heartbeat"],
        "the catch-up marker, then 5 s of quiet"
    );
    let fast = count(&rc, "heartbeat_ms=1", window).await;
    let beats = fast.iter().filter(|k| *k == "heartbeat").count();
    // One catch-up marker, then one every 250 ms at the fastest: about six in 1.6 s.
    assert!((4..=8).contains(&beats), "{fast:?}");
    let asked = count(&rc, "heartbeat_ms=500", window).await;
    let beats = asked.iter().filter(|k| *k == "heartbeat").count();
    assert!((2..=5).contains(&beats), "{asked:?}");
}
