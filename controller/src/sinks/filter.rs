//! Which event kinds (audit actions such as `sandbox.dial_denied`) a sink gets: a list of
//! patterns where `*` stands for any run of characters (`sandbox.*`, `*.revoke`, `*`).

/// A validated list of kind patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindFilter(Vec<String>);

impl KindFilter {
    /// At least one pattern, each 1 to 64 of `[a-z0-9._*]`.
    pub fn new(patterns: Vec<String>) -> Result<KindFilter, String> {
        if patterns.is_empty() {
            return Err("events lists at least one kind or pattern".into());
        }
        for p in &patterns {
            let ok = !p.is_empty()
                && p.len() <= 64
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'*')
                });
            if !ok {
                return Err(format!("event pattern {p:?} is not 1 to 64 of [a-z0-9._*]"));
            }
        }
        Ok(KindFilter(patterns))
    }

    /// Whether `kind` matches one of the patterns.
    pub fn matches(&self, kind: &str) -> bool {
        self.0.iter().any(|p| glob(p.as_bytes(), kind.as_bytes()))
    }
}

/// `*` matches any run of bytes; everything else matches itself. Linear backtracking on the
/// last star, so a pattern cannot make it slow.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(p: &[&str]) -> KindFilter {
        KindFilter::new(p.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    #[test]
    fn lists_and_globs() {
        let refusals = f(&["sandbox.dial_denied", "sandbox.dns_*", "*.revoke"]);
        for yes in [
            "sandbox.dial_denied",
            "sandbox.dns_refused",
            "sandbox.dns_malformed",
            "identity.revoke",
            "policy.revoke",
        ] {
            assert!(refusals.matches(yes), "{yes}");
        }
        for no in [
            "sandbox.started",
            "identity.create",
            "sandbox.dial_denied2",
            "router.stream",
            "identity.revoked",
        ] {
            assert!(!refusals.matches(no), "{no}");
        }
        assert!(f(&["*"]).matches("anything.at_all"));
        assert!(f(&["router.stream*"]).matches("router.stream_refused"));
        assert!(f(&["a*b*c"]).matches("axxbyyc"));
        assert!(!f(&["a*b*c"]).matches("axxbyy"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(KindFilter::new(vec![]).is_err());
        assert!(KindFilter::new(vec!["Sandbox.*".into()]).is_err());
        assert!(KindFilter::new(vec!["a b".into()]).is_err());
    }
}
