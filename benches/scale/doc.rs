//! The declarative document the bench applies: the random deployment the issue describes
//! (identities with a random role each, services with a random role each, one random
//! role-to-role Dial grant per policy) plus the bench's own named entries (the agents it
//! enrolls, the echo service they reach, the services it grants during the run).
//!
//! Written straight to a file, line by line, so the bench never holds a million-identity
//! document in memory; the same seed gives the same document.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

/// Role attributes on each side (identity roles `ir-…`, service roles `sr-…`).
pub const ROLES: usize = 1_000;
/// The port every intercept uses; each service has its own loopback address.
const PORT: u16 = 17_000;

/// The service every bench agent may dial (role `bench-rv`): the revocation and tunnel-start
/// probes connect to its intercept.
pub const BENCH_ECHO: &str = "bench-echo";
/// The role that grants `bench-echo`.
pub const BENCH_ROLE: &str = "bench-rv";
/// The agent whose tunneler serves the grant probe.
pub const GRANT_AGENT: &str = "grant-agent";
/// An agent that exists only in the scale document: once the router lets it through, the
/// router has taken the whole document.
pub const PROBE_AGENT: &str = "probe-agent";
/// The role every fan-out watcher holds.
pub const FAN_ROLE: &str = "fan";
/// The service the fan-out grant adds to every watcher's view.
pub const FAN_SERVICE: &str = "fan-new";

/// How large a deployment to generate.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// What `BENCH_SCALE` said.
    pub label: &'static str,
    /// Agents.
    pub identities: usize,
    /// Router-hosted services.
    pub services: usize,
    /// Dial policies.
    pub policies: usize,
}

impl Scale {
    /// `BENCH_SCALE`: `10k`, `100k` (default) or `1m`.
    pub fn from_env() -> Result<Scale, String> {
        let v = std::env::var("BENCH_SCALE").unwrap_or_else(|_| "100k".to_owned());
        let (label, n) = match v.to_ascii_lowercase().as_str() {
            "10k" => ("10k", 10_000),
            "100k" => ("100k", 100_000),
            "1m" => ("1m", 1_000_000),
            other => return Err(format!("BENCH_SCALE={other:?}: use 10k, 100k or 1m")),
        };
        Ok(Scale {
            label,
            identities: n,
            services: n / 10,
            policies: n / 10,
        })
    }

    /// The identity-revocation floor from the issue (p99): 10 ms, 20 ms at a million.
    pub fn revocation_floor_ms(&self) -> f64 {
        if self.identities >= 1_000_000 {
            20.0
        } else {
            10.0
        }
    }

    /// The router's memory floor from the issue: 192 MiB, 1.5 GiB at a million.
    pub fn router_floor_mib(&self) -> f64 {
        if self.identities >= 1_000_000 {
            1536.0
        } else {
            192.0
        }
    }
}

/// A small xorshift64* generator: the document must be the same in every run, and the bench
/// needs nothing stronger.
pub struct Rng(u64);

impl Rng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The intercept of `bench-echo`.
pub fn bench_echo_intercept() -> SocketAddr {
    SocketAddr::from(([127, 7, 0, 1], PORT))
}

/// The intercept of `fan-new`.
pub fn fan_intercept() -> SocketAddr {
    SocketAddr::from(([127, 8, 0, 1], PORT))
}

/// The name of the `i`th service granted during phase `phase` (`a` small, `b` at scale).
pub fn grant_service(phase: char, i: usize) -> String {
    format!("grant-{phase}-{i:02}")
}

/// The intercept of [`grant_service`]: a block of addresses per phase.
pub fn grant_intercept(phase: char, i: usize) -> SocketAddr {
    let block = if phase == 'a' { 0 } else { 1 };
    SocketAddr::from(([127, 9, block, 1 + (i % 250) as u8], PORT))
}

/// The `i`th revocation agent of the scale phase.
pub fn rv_agent(i: usize) -> String {
    format!("rv-{i:03}")
}

/// The `i`th fan-out watcher.
pub fn fan_agent(i: usize) -> String {
    format!("fan-{i:04}")
}

/// The intercept of the `i`th generated service: its own loopback address (127.10.0.0 and up,
/// avoiding .0 and .255 in the last two bytes).
fn scale_intercept(i: usize) -> SocketAddr {
    let a = 10 + (i / 62_500) as u8;
    let b = 1 + ((i / 250) % 250) as u8;
    let c = 1 + (i % 250) as u8;
    SocketAddr::from(([127, a, b, c], PORT))
}

/// What one document holds.
pub struct Spec {
    /// The generated deployment, or none (the small deployment, or a fallback when the scale
    /// document cannot be applied).
    pub scale: Option<Scale>,
    /// Revocation agents (`rv-…`).
    pub rv_agents: usize,
    /// Fan-out watchers (`fan-…`).
    pub fan_agents: usize,
    /// Services granted one by one during the run, and the phase they belong to.
    pub grants: (usize, char),
    /// Whether the bench agents also get a random role (a view as large as a generated
    /// agent's).
    pub random_roles: bool,
    /// Whether [`PROBE_AGENT`] is listed.
    pub probe: bool,
    /// Where every service points.
    pub echo: SocketAddr,
    /// The PRNG seed.
    pub seed: u64,
}

/// Writes the document; returns its size in bytes.
pub fn write(path: &Path, spec: &Spec) -> std::io::Result<u64> {
    let file = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::new(file);
    let mut rng = Rng::new(spec.seed);
    let echo = spec.echo;
    let extra_role = |rng: &mut Rng| {
        if spec.random_roles {
            format!(", ir-{:04}", rng.below(ROLES))
        } else {
            String::new()
        }
    };

    writeln!(w, "identities:")?;
    writeln!(w, "  - {{name: admin, kind: admin}}")?;
    let bench = [(GRANT_AGENT.to_owned(), BENCH_ROLE)]
        .into_iter()
        .chain(spec.probe.then(|| (PROBE_AGENT.to_owned(), BENCH_ROLE)))
        .chain((0..spec.rv_agents).map(|i| (rv_agent(i), BENCH_ROLE)))
        .chain((0..spec.fan_agents).map(|i| (fan_agent(i), FAN_ROLE)));
    for (name, role) in bench {
        let extra = extra_role(&mut rng);
        writeln!(w, "  - {{name: {name}, roles: [{role}{extra}]}}")?;
    }
    if let Some(s) = spec.scale {
        for i in 0..s.identities {
            writeln!(
                w,
                "  - {{name: a-{i:07}, roles: [ir-{:04}]}}",
                rng.below(ROLES)
            )?;
        }
    }

    writeln!(w, "services:")?;
    let svc =
        |w: &mut std::io::BufWriter<std::fs::File>, name: &str, role: &str, at: SocketAddr| {
            writeln!(
                w,
                "  - {{name: {name}, roles: [{role}], address: '{echo}', intercepts: ['{at}']}}"
            )
        };
    svc(&mut w, BENCH_ECHO, "bench", bench_echo_intercept())?;
    svc(&mut w, FAN_SERVICE, "bench", fan_intercept())?;
    let (grants, phase) = spec.grants;
    for i in 0..grants {
        svc(
            &mut w,
            &grant_service(phase, i),
            "bench",
            grant_intercept(phase, i),
        )?;
    }
    if let Some(s) = spec.scale {
        for i in 0..s.services {
            let role = format!("sr-{:04}", rng.below(ROLES));
            svc(&mut w, &format!("s-{i:06}"), &role, scale_intercept(i))?;
        }
    }

    writeln!(w, "policies:")?;
    writeln!(
        w,
        "  - {{name: bench-rv, identities: ['#{BENCH_ROLE}'], services: ['@{BENCH_ECHO}']}}"
    )?;
    if let Some(s) = spec.scale {
        for i in 0..s.policies {
            writeln!(
                w,
                "  - {{name: p-{i:06}, identities: ['#ir-{:04}'], services: ['#sr-{:04}']}}",
                rng.below(ROLES),
                rng.below(ROLES)
            )?;
        }
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}
