//! The figures and the table: latency samples with their percentiles, memory, and one row
//! per figure with its floor and verdict.

use std::time::Duration;

/// Latencies of one figure, and the runs that failed.
#[derive(Default)]
pub struct Samples {
    /// The latencies measured.
    pub v: Vec<Duration>,
    failed: usize,
    /// Why the first failed run failed.
    pub first_error: Option<String>,
}

impl Samples {
    /// One run: a latency, or why there is none.
    pub fn push(&mut self, r: Result<Duration, String>) {
        match r {
            Ok(d) => self.v.push(d),
            Err(e) => self.fail(e),
        }
    }

    /// A failed run.
    pub fn fail(&mut self, e: String) {
        self.failed += 1;
        self.first_error.get_or_insert(e);
    }

    /// The `p` quantile (0 to 1), nearest rank.
    pub fn pct(&self, p: f64) -> Option<Duration> {
        let mut v = self.v.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v.get(i).copied()
    }

    /// p50, p99, max and the count, and how many runs failed.
    pub fn show(&self) -> String {
        let mut s = match (self.pct(0.5), self.pct(0.99), self.pct(1.0)) {
            (Some(a), Some(b), Some(c)) => format!(
                "p50 {} p99 {} max {} (n={})",
                ms(a),
                ms(b),
                ms(c),
                self.v.len()
            ),
            _ => "no sample".to_owned(),
        };
        if self.failed > 0 {
            s.push_str(&format!(", {} failed", self.failed));
        }
        s
    }

    /// Met when p99 is under `floor` and nothing failed.
    pub fn met(&self, floor: Duration) -> &'static str {
        match self.pct(0.99) {
            Some(p) if p < floor && self.failed == 0 => "yes",
            Some(_) => "NO",
            None => "-",
        }
    }
}

/// A duration in ms (in s from one second on).
pub fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1e3;
    if m >= 1000.0 {
        format!("{:.2} s", m / 1e3)
    } else if m >= 100.0 {
        format!("{m:.0} ms")
    } else {
        format!("{m:.1} ms")
    }
}

/// RSS and peak, or `-`.
pub fn mem(m: Option<(f64, f64)>) -> String {
    match m {
        Some((rss, hwm)) => format!("{rss:.0} MiB (peak {hwm:.0})"),
        None => "-".to_owned(),
    }
}

/// Met when the RSS is under the floor.
pub fn mem_met(m: Option<(f64, f64)>, floor_mib: f64) -> &'static str {
    match m {
        Some((rss, _)) if rss < floor_mib => "yes",
        Some(_) => "NO",
        None => "-",
    }
}

/// One figure: at the small deployment, at scale, its floor, and whether it was met.
pub struct Row {
    figure: String,
    small: String,
    measured: String,
    floor: String,
    /// `yes`, `NO`, `-`, or empty for figures without a floor.
    pub met: String,
}

/// A row.
pub fn row(figure: &str, small: String, measured: String, floor: &str, met: &str) -> Row {
    Row {
        figure: figure.to_owned(),
        small,
        measured,
        floor: floor.to_owned(),
        met: met.to_owned(),
    }
}

/// Prints the rows as a Markdown table.
pub fn print_table(label: &str, rows: &[Row]) {
    let w = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .chain([title.chars().count()])
            .max()
            .unwrap_or(0)
    };
    let at = format!("measured at {label}");
    let (a, b, c, d) = (
        w(|r| &r.figure, "figure"),
        w(|r| &r.small, "at ~10 identities"),
        w(|r| &r.measured, &at),
        w(|r| &r.floor, "floor (target)"),
    );
    println!();
    println!(
        "| {:<a$} | {:<b$} | {:<c$} | {:<d$} | met? |",
        "figure", "at ~10 identities", at, "floor (target)"
    );
    println!(
        "|{}|{}|{}|{}|------|",
        "-".repeat(a + 2),
        "-".repeat(b + 2),
        "-".repeat(c + 2),
        "-".repeat(d + 2)
    );
    for r in rows {
        println!(
            "| {:<a$} | {:<b$} | {:<c$} | {:<d$} | {:<4} |",
            r.figure, r.small, r.measured, r.floor, r.met
        );
    }
}
