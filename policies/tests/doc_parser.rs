//! Properties of the YAML document parser, which reads what an operator (or anyone who can
//! reach `umbra apply`) sends: any text is refused or accepted without a panic, nothing larger
//! than the stated bound is parsed, aliases cannot multiply a small document into a large one,
//! and every document that parses writes out to YAML that parses back to it. The fuzz target
//! in `fuzz/` drives the same function with coverage guidance.

use proptest::prelude::*;
use umbra_policies::{parse_document, DocErrorKind, Document, MAX_DOCUMENT_BYTES};

/// Everything a document holds, counted: each entry and each of its list items.
fn size(doc: &Document) -> usize {
    let yaml = doc.to_yaml();
    yaml.lines().count()
}

fn pick(words: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    proptest::sample::select(words)
}

/// Mostly `good`, now and then `bad`: documents are valid often enough to round-trip, and
/// every rule still gets broken.
fn mostly(
    good: &'static [&'static str],
    bad: &'static [&'static str],
) -> BoxedStrategy<&'static str> {
    prop_oneof![20 => pick(good), 1 => pick(bad)].boxed()
}

fn name() -> BoxedStrategy<&'static str> {
    mostly(
        &["a", "b", "llm", "x.y", "notes", "n-1", "z_2"],
        &["Bad", "-e", "\"\""],
    )
}

fn role() -> impl Strategy<Value = String> {
    mostly(&["ai", "ops", "all"], &["B!"]).prop_map(str::to_string)
}

fn selector() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => name().prop_map(|n| format!("\"@{n}\"")),
        4 => role().prop_map(|r| format!("\"#{r}\"")),
        1 => name().prop_map(str::to_string),
    ]
}

fn list(item: impl Strategy<Value = String>, min: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(item, min..3).prop_map(|v| format!("[{}]", v.join(", ")))
}

fn identity() -> impl Strategy<Value = String> {
    (
        name(),
        mostly(&["agent", "admin"], &["router", "robot"]),
        list(role(), 0),
        any::<bool>(),
    )
        .prop_map(|(n, k, r, d)| {
            format!("  - {{name: {n}, kind: {k}, roles: {r}, disabled: {d}}}\n")
        })
}

fn service() -> impl Strategy<Value = String> {
    (
        name(),
        list(role(), 0),
        mostly(
            &[", address: \"api.internal:443\"", ", hosted: true"],
            &[
                "",
                ", address: \"nope\"",
                ", hosted: true, address: \"a:1\"",
            ],
        ),
        prop_oneof![
            Just(String::new()),
            Just(", intercepts: [\"llm.umbra:443\"]".to_string())
        ],
    )
        .prop_map(|(n, r, a, i)| format!("  - {{name: {n}, roles: {r}{a}{i}}}\n"))
}

fn policy() -> impl Strategy<Value = String> {
    (
        name(),
        pick(&["dial", "bind"]),
        prop_oneof![9 => list(selector(), 1), 1 => list(selector(), 0)],
        prop_oneof![9 => list(selector(), 1), 1 => list(selector(), 0)],
        pick(&["anyOf", "allOf"]),
    )
        .prop_map(|(n, a, i, s, m)| {
            format!(
                "  - {{name: {n}, action: {a}, identities: {i}, services: {s}, semantic: {m}}}\n"
            )
        })
}

/// Documents in the schema's shape, valid or not in every way the rules check.
fn document() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(identity(), 0..4),
        proptest::collection::vec(service(), 0..4),
        proptest::collection::vec(policy(), 0..4),
    )
        .prop_map(|(i, s, p)| {
            format!(
                "identities:\n{}services:\n{}policies:\n{}",
                i.concat(),
                s.concat(),
                p.concat()
            )
            .replace(":\nservices", ": []\nservices")
            .replace(":\npolicies", ": []\npolicies")
        })
}

fn check(yaml: &str) -> Result<(), TestCaseError> {
    match parse_document(yaml) {
        Ok(doc) => {
            // What parsed writes out and parses back to itself.
            let again = doc.to_yaml();
            let back = parse_document(&again);
            prop_assert_eq!(back.as_ref(), Ok(&doc), "{}", again);
            // Nothing in the output that the input did not spell out.
            prop_assert!(
                size(&doc) <= 4 * yaml.len() + 4,
                "{} lines out of {} bytes",
                size(&doc),
                yaml.len()
            );
        }
        Err(errors) => prop_assert!(!errors.is_empty()),
    }
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        check(&text)?;
    }

    #[test]
    fn documents_in_the_schema_shape_round_trip_or_are_refused(yaml in document()) {
        check(&yaml)?;
    }

    #[test]
    fn damaged_documents_never_panic(
        yaml in document(),
        cut in any::<proptest::sample::Index>(),
        insert in "[\\[\\]{}:&*!|>#@ \n-]{0,4}",
    ) {
        let at = cut.index(yaml.len() + 1);
        let mut damaged = yaml;
        // The documents are ASCII, so every index is a character boundary.
        damaged.insert_str(at, &insert);
        check(&damaged)?;
    }
}

#[test]
fn documents_over_the_bound_are_refused_before_parsing() {
    let yaml = format!("identities: []\n#{}", "x".repeat(MAX_DOCUMENT_BYTES));
    let errors = parse_document(&yaml).expect_err("too large");
    assert!(
        matches!(errors[0].kind, DocErrorKind::TooLarge { .. }),
        "{errors:?}"
    );
}

#[test]
fn aliases_do_not_multiply_a_small_document() {
    // The "billion laughs": each level doubles the roles of the one before it.
    let mut yaml = String::from("x0: &x0 [ai, ai]\n");
    for i in 1..30 {
        yaml.push_str(&format!("x{i}: &x{i} [*x{}, *x{}]\n", i - 1, i - 1));
    }
    yaml.push_str("identities: [{name: a, roles: *x29}]\n");
    // Refused (unknown fields, a nested list where a role belongs, or the parser's alias
    // bound), quickly and without building the expansion.
    assert!(parse_document(&yaml).is_err());
    let roles = "roles: &r [a, b, c, d, e, f, g, h]";
    let mut yaml = format!("identities:\n  - {{name: i0, {roles}}}\n");
    for i in 1..2000 {
        yaml.push_str(&format!("  - {{name: i{i}, roles: *r}}\n"));
    }
    // Legitimate reuse of an alias is fine, and the result is bounded by the aliases' count.
    let doc = parse_document(&yaml).expect("a valid document");
    assert_eq!(doc.identities.len(), 2000);
}
