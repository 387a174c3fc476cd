//! A parser of the OpenMetrics / Prometheus text exposition format, following the spec
//! (`# HELP`, `# TYPE`, `# UNIT`, samples with escaped label values, `# EOF`), so that the
//! metrics tests assert numbers, not substrings. Strict: a line it does not understand, a
//! sample of no declared family or a missing `# EOF` is an error.

use std::collections::BTreeMap;

/// A metric family's declaration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Family {
    /// `counter`, `gauge`, `histogram`, ...
    pub kind: String,
    /// Its help text.
    pub help: String,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (a family's name, or it with `_total`, `_bucket`, `_sum`, ...).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Families by name.
    pub families: BTreeMap<String, Family>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

/// The suffixes a sample name may add to its family's name, per type.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" | "gaugehistogram" => {
            &["_bucket", "_sum", "_count", "_created", "_gsum", "_gcount"]
        }
        "summary" => &["", "_sum", "_count", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

impl Exposition {
    /// Parses a whole exposition.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        let mut eof = false;
        for (n, line) in text.lines().enumerate() {
            let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            if eof {
                return Err(err("text after # EOF"));
            }
            if line == "# EOF" {
                eof = true;
            } else if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let arg = parts.next().unwrap_or("").to_string();
                if !valid_name(name) {
                    return Err(err("bad metric name"));
                }
                let fam = out.families.entry(name.to_string()).or_default();
                match kw {
                    "HELP" => fam.help = arg,
                    "TYPE" => fam.kind = arg,
                    "UNIT" => {}
                    _ => return Err(err("unknown descriptor")),
                }
            } else {
                let s = parse_sample(line).map_err(|e| err(&e))?;
                let declared = out.families.iter().any(|(f, fam)| {
                    s.name
                        .strip_prefix(f.as_str())
                        .is_some_and(|sfx| suffixes(&fam.kind).contains(&sfx))
                });
                if !declared {
                    return Err(err("sample of no declared family"));
                }
                out.samples.push(s);
            }
        }
        if !eof {
            return Err("no # EOF".into());
        }
        Ok(out)
    }

    /// The samples named `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the samples named `name` whose labels include all of `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one sample named `name` with exactly these labels' values (others may be present).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.matching(name, labels);
        let first = it.next()?.value;
        it.next().is_none().then_some(first)
    }

    /// Whether a family of this name (as written in `# TYPE`) is declared.
    pub fn has_family(&self, name: &str) -> bool {
        self.families.contains_key(name)
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err("bad sample name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            // A label name, `=`, a quoted value, then `,` or `}`.
            let start = chars.peek().map(|(i, _)| *i).ok_or("unterminated labels")?;
            if body[start..].starts_with('}') {
                chars.next();
                break;
            }
            let eq = body[start..].find('=').ok_or("label without =")? + start;
            let key = &body[start..eq];
            if !valid_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                chars.next();
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    c => value.push(c),
                }
            }
            if labels.insert(key.to_string(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.next().map(|(_, c)| c) {
                Some(',') => {}
                Some('}') => break,
                _ => return Err("expected , or }".into()),
            }
        }
        let consumed = chars.peek().map_or(body.len(), |(i, _)| *i);
        rest = &body[consumed..];
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    // An exemplar (` # {...} v`) may follow; a timestamp may follow the value.
    let rest = rest.split(" # ").next().unwrap_or(rest);
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        parse_value(ts)?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Fetches `http://addr/metrics` and parses it.
pub async fn scrape(addr: std::net::SocketAddr) -> Result<Exposition, String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Exposition::parse(&String::from_utf8_lossy(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_families_labels_escapes_and_histograms() {
        let text = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.75\nh_count 2\n\
                    # TYPE g gauge\ng +Inf\n# EOF\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.value("a_b_total", &[("x", "1")]), Some(3.0));
        assert_eq!(e.samples[0].labels["y"], "q\"\\\n");
        assert_eq!(e.value("h_count", &[]), Some(2.0));
        assert_eq!(e.value("h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(e.value("g", &[]), Some(f64::INFINITY));
    }

    #[test]
    fn refuses_what_the_format_does_not_allow() {
        for bad in [
            "x 1\n# EOF\n",                          // no family
            "# TYPE x gauge\nx 1\n",                 // no EOF
            "# TYPE x gauge\nx{a=1} 1\n# EOF\n",     // unquoted
            "# TYPE x gauge\nx{a=\"1\" 1\n# EOF\n",  // unterminated
            "# TYPE x gauge\nx one\n# EOF\n",        // bad value
            "# TYPE x counter\nx_bucket 1\n# EOF\n", // wrong suffix
            "# TYPE x gauge\nx 1\n# EOF\nx 2\n",     // after EOF
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad:?}");
        }
    }
}
