use proptest::prelude::*;

use super::*;

fn patterns() -> impl Strategy<Value = Option<Patterns>> {
    proptest::option::of(
        proptest::collection::vec("!?[a-z0-9_*?.-]{1,12}", 1..5)
            .prop_map(|v| Patterns::try_from(v).expect("generated patterns are valid")),
    )
}

fn limits() -> impl Strategy<Value = GrantLimits> {
    let period = prop_oneof![
        Just("minute"),
        Just("hour"),
        Just("day"),
        Just("week"),
        Just("month")
    ];
    let tokens = proptest::option::of((1u64..=1_000_000_000_000, period))
        .prop_map(|t| t.map(|(n, p)| format!("{n}/{p}").parse().expect("valid budget")));
    let rpm = proptest::option::of(1..=MAX_RPM).prop_map(|r| r.map(|r| Rpm::try_from(r).unwrap()));
    let connections = proptest::option::of(1..=crate::MAX_CONNECTIONS)
        .prop_map(|c| c.map(|c| crate::MaxConnections::try_from(c).unwrap()));
    let unit = prop_oneof![Just("s"), Just("min"), Just("h")];
    let rate = proptest::option::of((1..=crate::MAX_RATE_COUNT, unit))
        .prop_map(|r| r.map(|(n, u)| format!("{n}/{u}").parse().unwrap()));
    let bandwidth = proptest::option::of(1..=crate::MAX_BANDWIDTH)
        .prop_map(|b| b.map(|b| crate::Bandwidth::try_from(b).unwrap()));
    let gateway = (patterns(), tokens, rpm, patterns(), patterns(), patterns());
    (gateway, connections, rate, bandwidth).prop_map(
        |((models, tokens, rpm, tools, resources, prompts), connections, rate, bandwidth)| {
            GrantLimits {
                models,
                tokens,
                rpm,
                tools,
                resources,
                prompts,
                connections,
                rate,
                bandwidth,
            }
        },
    )
}

proptest! {
    #[test]
    fn json_and_raw_round_trip(l in limits()) {
        let json = serde_json::to_string(&l).unwrap();
        prop_assert_eq!(&serde_json::from_str::<GrantLimits>(&json).unwrap(), &l);
        // The document's unparsed form writes the same fields and parses back to the same value.
        let raw = RawLimits::from(&l);
        prop_assert_eq!(serde_json::to_value(&raw).unwrap(), serde_json::to_value(&l).unwrap());
        prop_assert_eq!(raw.parse().unwrap(), l);
    }

    #[test]
    fn rpm_in_range_is_accepted_and_prints_as_given(n in 1..=MAX_RPM) {
        let r = Rpm::try_from(n).unwrap();
        prop_assert_eq!(r.get(), n);
        prop_assert_eq!(r.to_string().parse::<Rpm>().unwrap(), r);
        prop_assert_eq!(serde_json::to_string(&r).unwrap(), n.to_string());
    }

    #[test]
    fn rpm_out_of_range_is_refused_everywhere(n in prop_oneof![Just(0u32), MAX_RPM + 1..=u32::MAX]) {
        prop_assert_eq!(Rpm::try_from(n), Err(AllowanceError::Rpm));
        prop_assert!(n.to_string().parse::<Rpm>().is_err());
        prop_assert!(serde_json::from_str::<Rpm>(&n.to_string()).is_err());
        let json = format!(r#"{{"rpm":{n}}}"#);
        prop_assert!(serde_json::from_str::<GrantLimits>(&json).is_err());
        let raw = RawLimits { rpm: Some(n), ..RawLimits::default() };
        prop_assert_eq!(raw.parse().unwrap_err(), vec![("rpm", AllowanceError::Rpm)]);
    }
}

#[test]
fn rpm_from_text_rejects_what_is_not_a_count() {
    for bad in ["", "-1", "1.5", "x", "0", "1000001", "99999999999"] {
        assert!(bad.parse::<Rpm>().is_err(), "{bad:?}");
    }
    assert_eq!(" 60 ".parse::<Rpm>().map(Rpm::get), Ok(60));
}

#[test]
fn every_invalid_field_is_reported_in_order() {
    let raw = RawLimits {
        models: Some(vec!["gpt 4o".into()]),
        tokens: Some("lots".into()),
        rpm: Some(0),
        tools: Some(vec![]),
        resources: Some(vec!["ok".into()]),
        prompts: None,
        connections: Some(0),
        rate: Some("5/day".into()),
        bandwidth: Some("0MiB/s".into()),
    };
    let fields: Vec<&str> = raw
        .parse()
        .unwrap_err()
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(
        fields,
        [
            "models",
            "tools",
            "tokens",
            "rpm",
            "connections",
            "rate",
            "bandwidth"
        ]
    );
}

#[test]
fn display_lists_the_set_limits() {
    assert_eq!(GrantLimits::default().to_string(), "-");
    let l: GrantLimits = serde_json::from_str(
        r#"{"models":["a","b*"],"tokens":"1000/day","rpm":60,"prompts":["p"]}"#,
    )
    .unwrap();
    assert_eq!(
        l.to_string(),
        "models=a,b* tokens=1000/day rpm=60 prompts=p"
    );
    assert!(l.allows_model("bx") && !l.allows_model("c"));
    assert!(GrantLimits::default().allows_model("anything"));
}

#[test]
fn flat_limits_keep_unknown_fields_refused() {
    let policy =
        r##"{"name":"p","action":"dial","identities":["#all"],"services":["#all"],"rpm":5}"##;
    let p: crate::ServicePolicy = serde_json::from_str(policy).unwrap();
    assert_eq!(p.limits.rpm.map(Rpm::get), Some(5));
    assert_eq!(serde_json::to_value(&p).unwrap()["rpm"], 5);
    let typo = policy.replace("\"rpm\"", "\"rpms\"");
    let err = serde_json::from_str::<crate::ServicePolicy>(&typo).unwrap_err();
    assert!(err.to_string().contains("rpms"), "{err}");
    let doc = "policies:\n  - name: p\n    identities: [\"#all\"]\n    services: [\"#all\"]\n    rpms: 5\n";
    assert!(crate::parse_document(doc).is_err());
    let doc = doc.replace("rpms", "rpm");
    let parsed = crate::parse_document(&doc).unwrap();
    assert_eq!(parsed.policies[0].limits.rpm.map(Rpm::get), Some(5));
}

#[test]
fn router_limits_are_flat_fields_in_json_and_yaml() {
    let doc = "policies:\n  - name: p\n    identities: [\"#all\"]\n    services: [\"#all\"]\n    connections: 2\n    rate: 600/min\n    bandwidth: 10MiB/s\n";
    let parsed = crate::parse_document(doc).unwrap();
    let l = &parsed.policies[0].limits;
    assert_eq!(l.connections.map(crate::MaxConnections::get), Some(2));
    assert_eq!(l.rate.map(|r| r.to_string()).as_deref(), Some("600/min"));
    assert_eq!(
        l.bandwidth.map(crate::Bandwidth::bytes_per_sec),
        Some(10 << 20)
    );
    assert_eq!(
        l.to_string(),
        "connections=2 rate=600/min bandwidth=10MiB/s"
    );
    assert!(!l.throughput().is_unlimited() && !l.is_unlimited());
    let json = serde_json::to_value(&parsed.policies[0]).unwrap();
    assert_eq!(json["bandwidth"], "10MiB/s");
    assert_eq!(json["rate"], "600/min");
    assert_eq!(json["connections"], 2);
    let bad = doc
        .replace("10MiB/s", "0MiB/s")
        .replace("600/min", "ten/min");
    let errs = crate::parse_document(&bad).unwrap_err();
    let err: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let err = err.join("\n");
    assert!(err.contains("bandwidth") && err.contains("rate"), "{err}");
}
