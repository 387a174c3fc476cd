//! Command-line syntax. Parsing only; `main.rs` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Umbra: a zero-trust, dark-by-default network overlay for AI agents.
#[derive(Debug, Parser)]
#[command(name = "umbra", version, about, propagate_version = true)]
pub struct Cli {
    /// Admin identity file for management commands [default: .umbra/admin.json]
    #[arg(long, global = true, env = "UMBRA_ADMIN")]
    pub admin: Option<PathBuf>,
    /// Controller address (host:port), or several separated by commas to fail over among
    /// (a:443,b:443), overriding the identity file's
    #[arg(long, global = true, env = "UMBRA_CONTROLLER", value_parser = parse_controllers)]
    pub controller: Option<String>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// How logs are written to stderr: text (coloured only on a terminal) or json, one object
    /// per line, for log shippers
    #[arg(long, global = true, env = "UMBRA_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `--metrics`: where this process serves Prometheus metrics.
#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics (a loopback address unless
    /// --metrics-non-loopback: the metrics name services, models and tools)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Allow --metrics on an address other than loopback
    #[arg(long, requires = "metrics")]
    pub metrics_non_loopback: bool,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; colour only when stderr is a terminal and `NO_COLOR` is unset.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Initialize (if needed) and run Umbra on loopback with its embedded defaults
    Quickstart {
        /// The controller's directory
        #[arg(long, env = "UMBRA_DIR", default_value = ".umbra")]
        dir: PathBuf,
        /// Address for the controller to listen on [default: 127.0.0.1:1280]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Play the whole story on loopback: enroll, grant, dial, deny, revoke a live connection
    Demo,
    /// Create or run a controller
    #[command(subcommand)]
    Controller(ControllerCmd),
    /// Manage identities
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// Enroll with a one-time token: make a key here, get a certificate, write an identity file
    Enroll(EnrollArgs),
    /// Manage services
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Manage service policies
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Manage edge routers
    #[command(subcommand)]
    Router(RouterCmd),
    /// Expose, on loopback, exactly the services an identity may dial (on this host, or inside
    /// a container's network namespace with --netns/--pid)
    Tunnel {
        /// The agent's identity file
        #[arg(long)]
        identity: PathBuf,
        /// Keep this file updated with /etc/hosts lines for the intercept names (with
        /// --netns/--pid: as a block, the file's other lines kept)
        #[arg(long)]
        hosts_file: Option<PathBuf>,
        /// Threads carrying connections, each with its own connection to each router, so that
        /// interactive connections do not wait behind bulk ones
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=64))]
        lanes: u8,
        /// How long a thread keeps polling after it last moved bytes before it sleeps (a round
        /// trip then finds it awake); 0 turns it off
        #[arg(long, default_value = "200us", value_parser = parse_poll_window)]
        busy_poll: std::time::Duration,
        /// Listen inside this existing network namespace instead of on the host's loopback
        /// (`/var/run/netns/NAME`, `/proc/PID/ns/net`), with a DNS responder at 127.0.0.53 there
        #[arg(long, value_name = "PATH", conflicts_with = "pid")]
        netns: Option<PathBuf>,
        /// Serve the network namespace of this process (a container's), and write its
        /// /etc/hosts and /etc/resolv.conf through /proc/PID/root
        #[arg(long)]
        pid: Option<u32>,
        /// With --netns/--pid: serve a namespace that has interfaces besides lo (Umbra is then
        /// not its only path)
        #[arg(long)]
        allow_network: bool,
        /// With --netns/--pid: append events (refused dials and names) to this JSON-lines file
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Run a command in a sealed sandbox whose only network is the overlay
    Run(SandboxRunArgs),
    /// Run a gateway hosted on the overlay (no listening port)
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Build a sandbox exactly as `run` does and try to escape it; exits 1 if anything escaped
    Verify(VerifyArgs),
    /// Make the controller's state match a YAML document
    Apply(ApplyArgs),
    /// Print the controller's state as a YAML document
    Export,
    /// Print the newest audit log entries
    Audit {
        /// How many entries
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Then keep printing entries as they are recorded (operators' actions, agents'
        /// refusals, routers' decisions), resuming after a reconnect where it left off
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ControllerCmd {
    /// Create the CA, the token key, the store and the first admin identity in DIR
    Init {
        /// The controller's directory
        #[arg(long, env = "UMBRA_DIR", default_value = ".umbra")]
        dir: PathBuf,
        /// The SPIFFE trust domain of every identity
        #[arg(long, default_value = "umbra.local")]
        trust_domain: String,
        /// Where clients will reach the controller (host:port)
        #[arg(long, default_value = "127.0.0.1:1280")]
        address: String,
        /// Where the state is kept: sqlite:PATH or postgres://USER@HOST:PORT/DB
        /// [default: sqlite:DIR/umbra.db]
        #[arg(long, env = "UMBRA_STORE", hide_env_values = true)]
        store: Option<String>,
    },
    /// Serve enrollment, the management API and the control channel
    Run(RunArgs),
    /// Make a directory for another controller on the same database: copies the CA and token
    /// key from an existing controller's directory, checked against the database
    Join {
        /// The new controller's directory
        #[arg(long)]
        dir: PathBuf,
        /// An existing controller's directory (made by `init` or `join`)
        #[arg(long)]
        from: PathBuf,
        /// The database both controllers use: postgres://USER@HOST:PORT/DB
        #[arg(long, env = "UMBRA_STORE", hide_env_values = true)]
        store: String,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The controller's directory
    #[arg(long, env = "UMBRA_DIR", default_value = ".umbra")]
    pub dir: PathBuf,
    /// Address to listen on (TCP) [default: the address given at init]
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Address clients should use, if not the listening one; with several controllers on one
    /// database, all of their addresses separated by commas (a:443,b:443), which tokens and
    /// identity files then carry
    #[arg(long, value_parser = parse_controllers)]
    pub advertise: Option<String>,
    /// Where the state is kept: sqlite:PATH or postgres://USER@HOST:PORT/DB
    /// [default: sqlite:DIR/umbra.db]
    #[arg(long, env = "UMBRA_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// Lifetime of issued identity certificates
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub cert_validity: std::time::Duration,
    /// How long events reported by agents are kept in the audit log (0: until the row cap);
    /// operator actions are always kept
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub audit_retention: std::time::Duration,
    /// Most agent-reported rows kept in the audit log; above it the oldest go first, never
    /// operator actions
    #[arg(long, default_value_t = 1_000_000)]
    pub audit_max_agent_rows: u64,
    /// Authenticated connections the controller holds at once (each tunneler, SDK host and
    /// gateway keeps one open for its view)
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Of those, how many all agents together may hold; the rest is kept for admins and
    /// routers
    #[arg(long, default_value_t = 3584)]
    pub max_agent_connections: usize,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// Deliver audit events to the sinks this YAML file lists (JSON-lines file, syslog, HTTPS
    /// webhook), each filtered by event kind
    #[arg(long)]
    pub sinks: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Create an identity and print (or write) its one-time enrollment token
    Create {
        /// Name: a-z, 0-9, '-', '_', '.'; at most 63 characters
        name: String,
        /// Role attributes, comma separated
        #[arg(long = "role", value_delimiter = ',')]
        roles: Vec<String>,
        /// agent or admin
        #[arg(long, default_value = "agent")]
        kind: String,
        /// How long the token works
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        token_ttl: std::time::Duration,
        /// Write the token to this file (0600) instead of printing it
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// List identities
    List,
    /// Show one identity and its certificates
    Show { name: String },
    /// Revoke an identity: its certificates are refused everywhere and its live paths cut
    Revoke { name: String },
    /// Delete an identity (its certificates are revoked first)
    Delete {
        name: String,
        /// Also delete policies that name it with @name
        #[arg(long)]
        cascade: bool,
    },
    /// Issue a new enrollment token for an existing identity
    Token {
        name: String,
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        token_ttl: std::time::Duration,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Renew an identity file's certificate (with a fresh key), authenticating with the current one
    Renew {
        /// The identity file [default: the admin file]
        #[arg(long)]
        identity: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The token, or a file that holds it
    pub token: String,
    /// Where to write the identity file (0600)
    #[arg(short, long)]
    pub output: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service
    Create {
        name: String,
        /// The router dials this address
        #[arg(long, conflicts_with = "hosted", required_unless_present = "hosted")]
        address: Option<String>,
        /// Hosted through the SDK by identities that hold Bind
        #[arg(long)]
        hosted: bool,
        /// Where tunnelers expose it (NAME:PORT or IP:PORT), repeatable
        #[arg(long = "intercept")]
        intercepts: Vec<String>,
        /// Role attributes, comma separated
        #[arg(long = "role", value_delimiter = ',')]
        roles: Vec<String>,
        /// Send a PROXY protocol v2 header with the caller's identity
        #[arg(long)]
        proxy_protocol: bool,
    },
    /// List services
    List,
    /// Show one service
    Show { name: String },
    /// Delete a service
    Delete {
        name: String,
        /// Also delete policies that name it with @name
        #[arg(long)]
        cascade: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Grant identities access to services
    Grant {
        /// Identity selectors: @name, #role or #all (repeatable or comma separated)
        #[arg(long = "identity", required = true, value_delimiter = ',')]
        identities: Vec<String>,
        /// Service selectors: @name, #role or #all
        #[arg(long = "service", required = true, value_delimiter = ',')]
        services: Vec<String>,
        /// Grant Bind (host the service) instead of Dial
        #[arg(long)]
        bind: bool,
        /// Require every selector to match instead of any
        #[arg(long)]
        all_of: bool,
        /// The policy's name [default: generated]
        #[arg(long)]
        name: Option<String>,
        /// Models a gateway hosting the service allows: globs, `!` excludes (gpt-4o-mini,claude-*)
        #[arg(long)]
        models: Option<String>,
        /// Tokens each identity may spend per calendar period through this grant (200000/day)
        #[arg(long)]
        tokens: Option<String>,
        /// Requests per minute each identity may make through this grant
        #[arg(long)]
        rpm: Option<umbra_policies::Rpm>,
        /// MCP tools a gateway hosting the service shows: globs on server__tool, `!` hides
        #[arg(long)]
        tools: Option<String>,
        /// MCP resources shown (globs on server__uri)
        #[arg(long)]
        resources: Option<String>,
        /// MCP prompts shown (globs on server__prompt)
        #[arg(long)]
        prompts: Option<String>,
        /// Streams each identity may hold open at once through this grant, per router
        #[arg(long)]
        connections: Option<umbra_policies::MaxConnections>,
        /// New streams each identity may open through this grant, per router (600/min, 10/s,
        /// 100/h); up to that many at once, then refilled evenly
        #[arg(long)]
        rate: Option<umbra_policies::Rate>,
        /// Bytes per second all of an identity's streams through this grant may move, both
        /// directions together, per router (10MiB/s, 500KB/s); slowed down, never cut
        #[arg(long)]
        bandwidth: Option<umbra_policies::Bandwidth>,
    },
    /// Delete a policy; access it alone granted is cut
    Revoke { name: String },
    /// List policies
    List,
    /// Say which policies grant an identity access to a service, or why none does
    Explain {
        #[arg(long)]
        identity: String,
        #[arg(long)]
        service: String,
        /// Explain Bind instead of Dial
        #[arg(long)]
        bind: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouterCmd {
    /// Create a router identity and print (or write) its enrollment token
    Create {
        name: String,
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        token_ttl: std::time::Duration,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// List routers
    List,
    /// Delete a router
    Delete { name: String },
    /// Enroll this machine as a router with its one-time token
    Enroll {
        /// The token, or a file that holds it
        token: String,
        /// The router's directory (its identity goes to DIR/router.json)
        #[arg(long, default_value = ".umbra-router")]
        dir: PathBuf,
    },
    /// Run an edge router
    Run {
        /// The router's directory
        #[arg(long, default_value = ".umbra-router")]
        dir: PathBuf,
        /// UDP address to listen on
        #[arg(long, default_value = "127.0.0.1:3022")]
        listen: std::net::SocketAddr,
        /// Address clients should use, if not the listening one
        #[arg(long)]
        advertise: Option<String>,
        /// Serve the last policy for at most this long without hearing from the controller
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        stale_after: std::time::Duration,
        /// Data-plane threads, each with its own socket on the listening port [default: one
        /// per core, at most 8]
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
        lanes: Option<u8>,
        /// How long a data-plane thread keeps polling after it last moved bytes before it
        /// sleeps; 0 turns it off
        #[arg(long, default_value = "200us", value_parser = parse_poll_window)]
        busy_poll: std::time::Duration,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The YAML document ('-' for standard input)
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Print the plan without changing anything
    #[arg(long)]
    pub dry_run: bool,
}

/// Splits `90s` into 90 and `s`; `what` says what a good value looks like, for the error.
fn number_and_unit<'a>(s: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n = num.parse().map_err(|_| format!("{s:?} is not {what}"))?;
    Ok((n, unit))
}

/// One controller address or a comma-separated list, in its canonical form (no spaces).
fn parse_controllers(s: &str) -> Result<String, String> {
    s.parse::<umbra_pki::ControllerAddrs>()
        .map(|l| l.to_string())
        .map_err(|e| e.to_string())
}

/// Parses `90s`, `30m`, `24h`, `7d` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (n, unit) = number_and_unit(s, "a duration like 90s, 30m, 24h or 7d")?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses a busy-polling window: `200us`, `1ms`, or `0` (off); at most 10 ms, beyond which
/// polling would only burn CPU.
pub fn parse_poll_window(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (n, unit) = number_and_unit(s, "a window like 200us or 1ms")?;
    let d = match unit {
        "us" | "µs" => std::time::Duration::from_micros(n),
        "ms" => std::time::Duration::from_millis(n),
        "" if n == 0 => std::time::Duration::ZERO,
        _ => return Err(format!("{s:?}: give a unit, us or ms (or 0 for off)")),
    };
    if d > std::time::Duration::from_millis(10) {
        return Err(format!("{s:?} is longer than 10ms"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_windows() {
        use std::time::Duration;
        assert_eq!(parse_poll_window("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_poll_window("200µs"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_poll_window("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_poll_window("0"), Ok(Duration::ZERO));
        assert_eq!(parse_poll_window("0us"), Ok(Duration::ZERO));
        assert!(parse_poll_window("200").is_err(), "a unit is needed");
        assert!(parse_poll_window("11ms").is_err());
        assert!(parse_poll_window("1s").is_err());
        assert!(parse_poll_window("us").is_err());
        assert!(parse_poll_window("99999999999999999999999us").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("2d").unwrap().as_secs(), 172800);
        assert_eq!(parse_duration("15").unwrap().as_secs(), 15);
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

/// How `umbra run` confines the agent.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// The agent's identity file (never visible inside); not with --ephemeral
    #[arg(long, required_unless_present = "ephemeral")]
    pub identity: Option<PathBuf>,
    /// Read-write directory, at the same path inside, and the working directory [default: .]
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Extra read-only path, at the same path inside (repeatable)
    #[arg(long = "ro")]
    pub ro: Vec<PathBuf>,
    /// Path that must never be visible inside, such as the controller's directory (repeatable)
    #[arg(long = "hide")]
    pub hide: Vec<PathBuf>,
    /// Memory limit (K, M or G)
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// CPU limit in cores (fractions allowed)
    #[arg(long)]
    pub cpus: Option<String>,
    /// Process and thread limit
    #[arg(long, default_value_t = 512)]
    pub pids: u64,
    /// Run without Landlock if the kernel lacks it
    #[arg(long)]
    pub allow_degraded: bool,
    /// Create a short-lived identity for this task (needs the admin identity) and delete it after
    #[arg(long)]
    pub ephemeral: bool,
    /// Roles of the ephemeral identity (repeatable)
    #[arg(long = "role", requires = "ephemeral")]
    pub roles: Vec<String>,
}

/// `umbra run`.
#[derive(Debug, Args)]
pub struct SandboxRunArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Kill the agent and everything it started after this long (exit code 124)
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// Write the sandbox's audit events here, as JSON lines
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Keep the agent running (without network) when its identity is revoked
    #[arg(long)]
    pub keep_on_revoke: bool,
    /// Environment variable for the agent, KEY=VALUE or KEY to copy it (repeatable)
    #[arg(long = "env")]
    pub env: Vec<String>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// The command and its arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `umbra verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// Skip the limit attempts (fork bomb, memory and socket-buffer balloons, busy loop, held
    /// connections)
    #[arg(long)]
    pub skip_limits: bool,
    /// A listener on a test host (in a network namespace of the tests' own) that must stay
    /// unreachable (repeatable)
    #[arg(long = "test-host", hide = true)]
    pub test_hosts: Vec<std::net::SocketAddr>,
}

/// `umbra gateway ...`.
#[derive(Debug, Subcommand)]
pub enum GatewayCmd {
    /// The LLM gateway: which models, how many tokens and requests, by the caller's identity
    Llm {
        /// The gateway's identity file (it must hold Bind on the service)
        #[arg(long)]
        identity: PathBuf,
        /// Providers, keys and models (YAML)
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// The MCP gateway: which tools, resources and prompts, by the caller's identity
    Mcp {
        /// The gateway's identity file (it must hold Bind on the service)
        #[arg(long)]
        identity: PathBuf,
        /// Upstream MCP servers (YAML)
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
}
