use super::*;
use crate::error::Entity;
use crate::model::{Action, HostPort, Hosting, IdentityId, Semantic};
use crate::selector::Selector;

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// The errors of a document that must not parse, as (path, kind).
fn errors(yaml: &str) -> Vec<(String, DocErrorKind)> {
    let errs = parse_document(yaml).expect_err("document should be refused");
    errs.into_iter().map(|e| (e.path, e.kind)).collect()
}

/// The single error of a document, asserting its path.
fn error_at(yaml: &str, path: &str) -> DocErrorKind {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].0, path, "{errs:#?}");
    errs[0].1.clone()
}

const EXAMPLE: &str = r##"
identities:
  - name: agent-1
    kind: agent
    roles: [analysts]
    disabled: false
  - name: ops
    kind: admin
  - name: host-1
    roles: [hosts]
    disabled: true
services:
  - name: llm
    roles: [ai]
    address: api.internal:443
    intercepts: ["llm.umbra:443"]
    proxy_protocol: false
  - name: notes
    hosted: true
policies:
  - name: analysts-llm
    action: dial
    identities: ["#analysts"]
    services: ["@llm"]
    semantic: anyOf
  - name: hosts-bind-notes
    action: bind
    identities: ["#hosts", "@host-1"]
    services: ["@notes"]
    semantic: allOf
  - name: defaults
    identities: ["#all"]
    services: ["#ai"]
"##;

#[test]
fn parses_the_example_with_defaults() {
    let doc = parse_document(EXAMPLE).unwrap();
    assert_eq!(doc.identities.len(), 3);
    assert_eq!(doc.identities[0].kind, IdentityKind::Agent);
    assert_eq!(doc.identities[1].kind, IdentityKind::Admin);
    assert_eq!(
        doc.identities[2].kind,
        IdentityKind::Agent,
        "agent is the default"
    );
    assert!(doc.identities[2].disabled);
    assert_eq!(
        doc.services[0].hosting,
        Hosting::Address("api.internal:443".parse().unwrap())
    );
    assert_eq!(
        doc.services[0].intercepts,
        vec!["llm.umbra:443".parse::<HostPort>().unwrap()]
    );
    assert_eq!(doc.services[1].hosting, Hosting::Sdk);
    assert_eq!(doc.policies[1].action, Action::Bind);
    assert_eq!(doc.policies[1].semantic, Semantic::AllOf);
    assert_eq!(doc.policies[2].action, Action::Dial, "dial is the default");
    assert_eq!(
        doc.policies[2].semantic,
        Semantic::AnyOf,
        "anyOf is the default"
    );
    assert_eq!(doc.policies[2].identities, vec![Selector::All]);
    doc.validate().unwrap();
}

#[test]
fn to_yaml_round_trips() {
    let doc = parse_document(EXAMPLE).unwrap();
    let yaml = doc.to_yaml();
    assert_eq!(parse_document(&yaml).unwrap(), doc, "{yaml}");
}

#[test]
fn empty_lists_are_an_empty_document() {
    assert_eq!(parse_document("{}").unwrap(), Document::default());
    assert_eq!(
        parse_document("identities: []\nservices: []\npolicies: []").unwrap(),
        Document::default()
    );
}

#[test]
fn invalid_names() {
    let yaml = "identities: [{name: Agent}]";
    let kind = error_at(yaml, "identities[0].name");
    assert_eq!(kind, DocErrorKind::Name(crate::NameError::InvalidChar('A')));
    error_at(
        "identities: [{name: a, roles: [ok, -bad]}]",
        "identities[0].roles[1]",
    );
    error_at(
        "services: [{name: 'a b', hosted: true}]",
        "services[0].name",
    );
    error_at(
        "services: [{name: s, roles: ['x/y'], hosted: true}]",
        "services[0].roles[0]",
    );
    let yaml = "policies: [{name: '', identities: ['#all'], services: ['#all']}]";
    assert_eq!(
        error_at(yaml, "policies[0].name"),
        DocErrorKind::Name(crate::NameError::Empty)
    );
}

#[test]
fn invalid_selectors() {
    let yaml = "policies: [{name: p, identities: ['#all', analysts], services: ['#all']}]";
    let kind = error_at(yaml, "policies[0].identities[1]");
    assert!(matches!(kind, DocErrorKind::Selector(_)), "{kind:?}");
    let yaml = "policies: [{name: p, identities: ['#all'], services: ['@']}]";
    assert!(matches!(
        error_at(yaml, "policies[0].services[0]"),
        DocErrorKind::Selector(_)
    ));
}

#[test]
fn invalid_host_ports() {
    let yaml = "services: [{name: s, address: 'api.internal'}]";
    assert!(matches!(
        error_at(yaml, "services[0].address"),
        DocErrorKind::HostPort(_)
    ));
    let yaml = "services: [{name: s, hosted: true, intercepts: ['a:1', 'a:99999']}]";
    assert!(matches!(
        error_at(yaml, "services[0].intercepts[1]"),
        DocErrorKind::HostPort(_)
    ));
}

#[test]
fn hosting_needs_exactly_one_of_address_and_hosted() {
    let both = "services: [{name: s, address: 'a:1', hosted: true}]";
    assert_eq!(
        error_at(both, "services[0]"),
        DocErrorKind::AddressAndHosted
    );
    let neither = "services: [{name: s}]";
    assert_eq!(error_at(neither, "services[0]"), DocErrorKind::NoHosting);
    let hosted_false = "services: [{name: s, hosted: false}]";
    assert_eq!(
        error_at(hosted_false, "services[0]"),
        DocErrorKind::NoHosting
    );
    let address_and_false = "services: [{name: s, address: 'a:1', hosted: false}]";
    assert!(parse_document(address_and_false).is_ok());
}

#[test]
fn duplicate_names() {
    // Identity names are unique across agents and admins.
    let yaml = "identities: [{name: a}, {name: b}, {name: a, kind: admin}]";
    let kind = error_at(yaml, "identities[2].name");
    assert_eq!(
        kind,
        DocErrorKind::Duplicate {
            entity: Entity::Identity,
            name: n("a"),
            first: "identities[0]".into()
        }
    );
    let yaml = "services: [{name: s, hosted: true}, {name: s, address: 'a:1'}]";
    assert!(matches!(
        error_at(yaml, "services[1].name"),
        DocErrorKind::Duplicate {
            entity: Entity::Service,
            ..
        }
    ));
    let p = "{name: p, identities: ['#all'], services: ['#all']}";
    let yaml = format!("policies: [{p}, {p}]");
    assert!(matches!(
        error_at(&yaml, "policies[1].name"),
        DocErrorKind::Duplicate {
            entity: Entity::Policy,
            ..
        }
    ));
    // Different lists are different namespaces.
    let yaml = "identities: [{name: x}]\nservices: [{name: x, hosted: true}]\n\
                policies: [{name: x, identities: ['@x'], services: ['@x']}]";
    assert!(parse_document(yaml).is_ok());
}

#[test]
fn dangling_references() {
    let yaml = "identities: [{name: a}]\nservices: [{name: s, hosted: true}]\n\
                policies: [{name: p, identities: ['@a', '@s'], services: ['@s']}]";
    assert_eq!(
        error_at(yaml, "policies[0].identities[1]"),
        DocErrorKind::Dangling {
            entity: Entity::Identity,
            name: n("s")
        },
        "an @name on the identity side must name an identity, not a service"
    );
    let yaml = "identities: [{name: a}]\n\
                policies: [{name: p, identities: ['@a'], services: ['#all', '@a']}]";
    assert_eq!(
        error_at(yaml, "policies[0].services[1]"),
        DocErrorKind::Dangling {
            entity: Entity::Service,
            name: n("a")
        }
    );
}

#[test]
fn empty_selector_lists() {
    let yaml = "policies: [{name: p, identities: [], services: ['#all']}]";
    assert_eq!(
        error_at(yaml, "policies[0].identities"),
        DocErrorKind::EmptySelectors
    );
    let missing = "policies: [{name: p, identities: ['#all']}]";
    assert_eq!(
        error_at(missing, "policies[0].services"),
        DocErrorKind::EmptySelectors
    );
}

#[test]
fn routers_and_revoked_identities_are_listed_as_such() {
    let yaml = "identities: [{name: r1, kind: router}, {name: old, revoked: true}]";
    let doc = parse_document(yaml).unwrap();
    assert_eq!(doc.identities[0].kind, IdentityKind::Router);
    assert!(!doc.identities[0].revoked);
    assert!(doc.identities[1].revoked);
    assert_eq!(parse_document(&doc.to_yaml()).unwrap(), doc);
}

#[test]
fn an_intercept_belongs_to_one_service() {
    let yaml = r#"
services:
  - {name: a, hosted: true, intercepts: ["x.umbra:443", "x.umbra:443"]}
  - {name: b, hosted: true, intercepts: ["y.umbra:80", "X.umbra:443"]}
"#;
    let kind = error_at(yaml, "services[1].intercepts[1]");
    assert_eq!(
        kind.to_string(),
        "intercept x.umbra:443 of service b is already used by service a"
    );
}

#[test]
fn serde_errors_are_single_syntax_errors() {
    for yaml in [
        "identities: [{name: a, colour: blue}]",
        "servces: []",
        "policies: [{name: p, action: fly, identities: ['#all'], services: ['#all']}]",
        "identities: [{name: a, kind: robot}]",
        "identities: {name: a",
        "identities: [{name: a, disabled: maybe}]",
    ] {
        let errs = errors(yaml);
        assert_eq!(errs.len(), 1, "{yaml}: {errs:?}");
        assert_eq!(errs[0].0, "");
        assert!(matches!(errs[0].1, DocErrorKind::Syntax(_)), "{yaml}");
    }
    let errs = errors("identities: [{name: a, colour: blue}]");
    let message = errs[0].1.to_string();
    assert!(message.contains("colour"), "{message}");
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let yaml = " ".repeat(MAX_DOCUMENT_BYTES + 1);
    assert_eq!(
        error_at(&yaml, ""),
        DocErrorKind::TooLarge {
            size: MAX_DOCUMENT_BYTES + 1,
            max: MAX_DOCUMENT_BYTES
        }
    );
}

#[test]
fn reports_every_problem_at_once() {
    let yaml = r##"
identities:
  - name: Bad
  - name: a
  - name: a
    roles: ["X"]
services:
  - name: s
  - name: t
    address: "nope"
policies:
  - name: p
    identities: ["@ghost", "oops"]
    services: []
"##;
    let paths: Vec<String> = errors(yaml).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        [
            "identities[0].name",
            "identities[2].roles[0]",
            "services[0]",
            "services[1].address",
            "policies[0].identities[1]",
            "identities[2].name",
            "policies[0].identities[0]",
            "policies[0].services",
        ]
    );
}

#[test]
fn errors_display_with_their_path() {
    let errs = parse_document("policies: [{name: p, identities: ['#all'], services: ['@x']}]")
        .unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "policies[0].services[0]: @x: there is no service named \"x\""
    );
    let errs = parse_document(&" ".repeat(MAX_DOCUMENT_BYTES + 1)).unwrap_err();
    assert!(errs[0].to_string().starts_with("the document is"));
}

fn identity(id: &str, name: &str, kind: IdentityKind) -> Identity {
    Identity {
        id: IdentityId::new(id).unwrap(),
        name: n(name),
        kind,
        roles: [n("r")].into(),
        disabled: false,
        revoked: false,
        expires_at: None,
    }
}

#[test]
fn export_lists_revoked_identities_and_only_the_routers_policies_name() {
    let mut state = State::default();
    for i in [
        identity("id3", "zed", IdentityKind::Agent),
        identity("id1", "router-1", IdentityKind::Router),
        identity("id5", "router-2", IdentityKind::Router),
        identity("id2", "amy", IdentityKind::Admin),
        Identity {
            revoked: true,
            ..identity("id4", "gone", IdentityKind::Agent)
        },
    ] {
        state.identities.insert(i.id.clone(), i);
    }
    let mut named = crate::testing::policy(
        "p",
        Action::Dial,
        Semantic::AnyOf,
        &["@gone", "@router-2", "#r"],
        &["#all"],
    );
    named.semantic = Semantic::AnyOf;
    state.policies.insert(named.name.clone(), named);
    let doc = export(&state);
    let names: Vec<&str> = doc.identities.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["amy", "gone", "router-2", "zed"]);
    assert_eq!(doc.identities[0].kind, IdentityKind::Admin);
    assert!(doc.identities[1].revoked);
    assert_eq!(doc.identities[2].kind, IdentityKind::Router);
    assert_eq!(parse_document(&doc.to_yaml()).unwrap(), doc);
}

#[test]
fn validate_checks_documents_built_in_code() {
    let mut doc = parse_document(EXAMPLE).unwrap();
    doc.identities.push(DocIdentity {
        name: n("agent-1"),
        kind: IdentityKind::Router,
        roles: Roles::new(),
        disabled: false,
        revoked: false,
    });
    doc.policies[0].services.clear();
    doc.services[1].intercepts = doc.services[0].intercepts.clone();
    let errs = doc.validate().unwrap_err();
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "identities[3].name",
            "services[1].intercepts[0]",
            "policies[0].services"
        ]
    );
}

#[test]
fn normalized_sorts_every_list() {
    let doc = parse_document(EXAMPLE).unwrap();
    let mut reversed = doc.clone();
    reversed.identities.reverse();
    reversed.services.reverse();
    reversed.policies.reverse();
    assert_eq!(reversed.normalized(), doc.normalized());
    let normalized = doc.normalized();
    let names: Vec<&str> = (normalized.policies.iter())
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["analysts-llm", "defaults", "hosts-bind-notes"]);
}

#[test]
fn empty_input_is_refused() {
    // An empty or truncated file must not be taken for "delete everything".
    for yaml in ["", "  \n", "# only a comment\n", "~"] {
        assert_eq!(error_at(yaml, ""), DocErrorKind::Empty, "{yaml:?}");
    }
}

#[test]
fn gateway_limits_round_trip_and_bad_ones_are_reported_at_their_path() {
    let yaml = r##"
identities:
  - name: agent-1
    roles: [analysts]
services:
  - name: llm
    hosted: true
policies:
  - name: analysts-llm
    identities: ["#analysts"]
    services: ["@llm"]
    models: [gpt-4o-mini, "claude-*", "!claude-opus-*"]
    tokens: 200000/day
    rpm: 60
    tools: ["github__*", "!github__delete_*"]
"##;
    let doc = parse_document(yaml).unwrap();
    let p = &doc.policies[0];
    let l = &p.limits;
    assert!(l.models.as_ref().unwrap().matches("claude-3-5-haiku"));
    assert!(!l.models.as_ref().unwrap().matches("claude-opus-4"));
    assert_eq!(l.tokens.unwrap().to_string(), "200000/day");
    assert_eq!(l.rpm.map(crate::Rpm::get), Some(60));
    let tools = l.tools.as_ref().unwrap();
    assert!(tools.matches("github__create_issue") && !tools.matches("github__delete_repo"));
    assert!(l.resources.is_none() && l.prompts.is_none());
    let again = parse_document(&doc.to_yaml()).unwrap();
    assert_eq!(again.policies, doc.policies);

    let bad = yaml
        .replace("200000/day", "lots")
        .replace("rpm: 60", "rpm: 0")
        .replace("gpt-4o-mini", "\"gpt 4o\"")
        .replace("\"github__*\"", "\"\"");
    let errs = errors(&bad);
    let paths: Vec<&str> = errs.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "policies[0].models",
            "policies[0].tools",
            "policies[0].tokens",
            "policies[0].rpm"
        ],
        "{errs:#?}"
    );
}
