use proptest::prelude::*;

use super::*;

#[test]
fn bandwidth_parses_units_and_prints_the_largest_exact_one() {
    let b = |s: &str| s.parse::<Bandwidth>().map(Bandwidth::bytes_per_sec);
    assert_eq!(b("10MiB/s"), Ok(10 << 20));
    assert_eq!(b("10 mib/s"), Ok(10 << 20));
    assert_eq!(b("500KB/s"), Ok(500_000));
    assert_eq!(b("1GiB/s"), Ok(1 << 30));
    assert_eq!(b("2GB/s"), Ok(2_000_000_000));
    assert_eq!(b("4096B/s"), Ok(4096));
    assert_eq!(b("1_000KiB/s"), Ok(1_024_000));
    for (text, shown) in [
        ("10MiB/s", "10MiB/s"),
        ("1024KiB/s", "1MiB/s"),
        ("1000KB/s", "1MB/s"),
        ("1500B/s", "1500B/s"),
        ("1536KiB/s", "1536KiB/s"),
    ] {
        assert_eq!(text.parse::<Bandwidth>().unwrap().to_string(), shown);
    }
}

#[test]
fn bandwidth_rejects_zero_garbage_and_too_much() {
    for bad in [
        "",
        "0MiB/s",
        "0B/s",
        "10MiB",
        "10/s",
        "MiB/s",
        "-1MiB/s",
        "1.5MiB/s",
        "10XB/s",
        "10MiB/min",
        "2048GiB/s",
        "99999999999999999999GiB/s",
    ] {
        let e = bad.parse::<Bandwidth>().unwrap_err();
        assert!(e.to_string().contains("10MiB/s"), "{bad:?}: {e}");
    }
    assert!(Bandwidth::try_from(0).is_err());
    assert!(Bandwidth::try_from(MAX_BANDWIDTH + 1).is_err());
    assert!(serde_json::from_str::<Bandwidth>("\"0KiB/s\"").is_err());
}

#[test]
fn rate_parses_per_second_minute_and_hour() {
    let r: Rate = "600/min".parse().unwrap();
    assert_eq!((r.count(), r.unit()), (600, RateUnit::Minute));
    assert_eq!("10/s".parse::<Rate>().unwrap().unit(), RateUnit::Second);
    assert_eq!("10/sec".parse::<Rate>().unwrap().to_string(), "10/s");
    assert_eq!("5/hour".parse::<Rate>().unwrap().to_string(), "5/h");
    for bad in [
        "",
        "0/min",
        "10",
        "10/day",
        "x/min",
        "1000001/s",
        "-1/s",
        "1.5/s",
    ] {
        assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
    }
}

#[test]
fn connections_are_one_to_the_cap() {
    assert_eq!(
        "2".parse::<MaxConnections>().map(MaxConnections::get),
        Ok(2)
    );
    for bad in ["0", "", "x", "1000001", "-2"] {
        assert_eq!(
            bad.parse::<MaxConnections>(),
            Err(AllowanceError::Connections),
            "{bad:?}"
        );
    }
}

proptest! {
    #[test]
    fn bandwidth_round_trips_through_text_and_json(n in 1..=MAX_BANDWIDTH) {
        let b = Bandwidth::try_from(n).unwrap();
        prop_assert_eq!(b.to_string().parse::<Bandwidth>().unwrap(), b);
        let json = serde_json::to_string(&b).unwrap();
        prop_assert_eq!(serde_json::from_str::<Bandwidth>(&json).unwrap(), b);
    }

    #[test]
    fn rate_round_trips(n in 1..=MAX_RATE_COUNT, unit in prop_oneof![Just("s"), Just("min"), Just("h")]) {
        let r: Rate = format!("{n}/{unit}").parse().unwrap();
        prop_assert_eq!(r.count(), n);
        prop_assert_eq!(r.to_string().parse::<Rate>().unwrap(), r);
        let json = serde_json::to_string(&r).unwrap();
        prop_assert_eq!(serde_json::from_str::<Rate>(&json).unwrap(), r);
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,24}") {
        let _ = s.parse::<Bandwidth>();
        let _ = s.parse::<Rate>();
        let _ = s.parse::<MaxConnections>();
    }
}
