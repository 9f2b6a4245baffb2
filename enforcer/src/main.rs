//! `enforcer`: the daemon (`run`) and the local CLI, which talks to a running daemon over
//! its Unix socket (and, for `stats` and `policy apply` with no daemon, to the pinned maps).

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use enforcer::{
    cli::table,
    dataplane::{self, Dataplane, KernelMaps, stats},
    error::error_chain,
    lab::BpffsMount,
    node::{
        api::{ApiError, Client, Request, Response},
        config::Config,
        daemon::{self, Status},
    },
    policy::{self, Mode},
};
use serde_json::Value;

/// Exit code for a bad configuration or policy (distinct from runtime failures).
const EXIT_BAD_INPUT: u8 = 2;

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "XDP rate limiting and egress allow-listing for AI agents"
)]
struct Cli {
    /// Daemon configuration file (for the socket, pin and state paths).
    #[arg(long, global = true, default_value = "/etc/enforcer/enforcer.toml")]
    config: PathBuf,
    /// The daemon's socket (default: from the configuration, else /run/enforcer/enforcer.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load, pin and attach the XDP program and enforce the policy.
    Run,
    /// Daemon, policy and attachment state.
    Status,
    /// The agents of the enforcing policy with packet totals.
    Agents,
    /// One agent, by id or name: identity, rules, limits, counters by reason.
    Agent {
        /// Agent id or name.
        agent: String,
    },
    /// Per-agent counters by reason (from the pinned maps if no daemon runs).
    Stats,
    /// Load every program of the data plane on this kernel, in a private bpffs, and print
    /// what the verifier spent on each against its 1,000,000-instruction limit.
    Doctor,
    /// Live per-agent packet and byte rates, refreshing in place.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Check, apply, show or diff policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Switch an agent between monitor and enforce mode (kept across reloads and restarts).
    Mode {
        /// Agent id or name.
        agent: String,
        /// The mode.
        mode: ModeArg,
    },
    /// The audit trail of denials.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Stop the daemon; with --detach also remove the pinned program and maps.
    Stop {
        /// Detach from every interface and remove all pins: nothing enforces afterwards.
        #[arg(long)]
        detach: bool,
    },
    /// Make an Ed25519 signing key pair for a control plane (signing.key, signing.pub).
    Keygen {
        /// Directory for the key files (created; existing keys are never overwritten).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Make a private CA, a server certificate and client certificates (PEM).
    Certs {
        /// Directory for the files (created; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Names (DNS names or IPs) the server certificate is valid for.
        #[arg(long = "server-name", required = true)]
        server_names: Vec<String>,
        /// A client certificate to make (for mutual TLS), by name; repeatable.
        #[arg(long = "client")]
        clients: Vec<String>,
    },
    /// Write man pages (DIR/man) and bash, zsh and fish completions (DIR/completions) from
    /// this CLI's definition: what `cargo xtask package` ships.
    #[command(hide = true)]
    Generate {
        /// Output directory (created).
        #[arg(long)]
        dir: PathBuf,
    },
    /// The inspecting proxy.
    Inspect {
        #[command(subcommand)]
        command: InspectCommand,
    },
    /// Serve signed policies to nodes, or show which node holds which version.
    ControlPlane {
        #[command(subcommand)]
        command: ControlPlaneCommand,
    },
    /// Run a demo: agents in network namespaces behind the enforcer, with live counters.
    Demo {
        /// How long to run traffic, in seconds.
        #[arg(long, default_value_t = 6)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum ControlPlaneCommand {
    /// Serve the policies in a directory (`default.toml`, `nodes/<node_id>.toml`), signed,
    /// to every node that connects; pushes changes as the files change.
    Serve {
        /// Control-plane configuration (TOML: dir, signing_key, listen, tls_cert, tls_key,
        /// optional client_ca for mutual TLS).
        file: PathBuf,
    },
    /// Every node the control plane has seen, with the versions sent and acknowledged
    /// (connects with the `[control_plane]` settings of `--config`).
    Nodes,
}

#[derive(Subcommand)]
enum InspectCommand {
    /// Print the node's inspection CA certificate (PEM) for agent sandboxes to trust;
    /// generates the CA (in `[inspect].ca_dir`, default the state directory) if the
    /// daemon has not yet.
    Ca,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The last records of the daemon's audit log; with -f, then each new one as it comes.
    Tail {
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep following the log (across rotations) until interrupted.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only records of this agent (name or id).
        #[arg(long)]
        agent: Option<String>,
        /// Only records with this reason (egress_denied, rate_limited_packets, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only records with this verdict: drop, or pass (monitor mode's would-drops).
        #[arg(long)]
        verdict: Option<String>,
    },
    /// Prove an audit log untampered, or name its first bad line.
    Verify {
        /// The log file, or a rotated set oldest first (`audit.jsonl.2 audit.jsonl.1
        /// audit.jsonl`), checked as one chain.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The oldest file given continues an older rotated file that is gone: accept a
        /// chain that starts after seq 1, and say where.
        #[arg(long)]
        continued: bool,
        /// The chain head the daemon saved outside the log (`audit-head.json`): the files
        /// must still reach it, so records cut from the end are caught. By default the
        /// daemon's, when the last file given is the configured audit log.
        #[arg(long, conflicts_with = "no_head")]
        head: Option<PathBuf>,
        /// Do not check against a saved chain head.
        #[arg(long)]
        no_head: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Monitor,
    Enforce,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file and report every error with file, line and field.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// Validate a policy and make it the daemon's policy (or, with no daemon running,
    /// write it into the pinned maps directly).
    Apply {
        /// The policy file.
        file: PathBuf,
    },
    /// Print the enforcing policy.
    Show,
    /// Show what applying a policy file would change.
    Diff {
        /// The candidate policy file.
        file: PathBuf,
    },
    /// List the destination presets a policy can name with `@`.
    Presets,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Bad input: a message naming the place, reported with the distinct exit code.
fn bad(message: String) -> anyhow::Error {
    BadInputError(message).into()
}

/// The chain head `audit verify` checks the files against: `--head`, or the daemon's when
/// the last file is the configured log and a head was saved; none with `--no-head`.
fn verify_head(
    cli: &Cli,
    files: &[PathBuf],
    head: Option<&Path>,
    no_head: bool,
) -> Result<Option<(PathBuf, enforcer::node::audit::Head)>, enforcer::node::audit::AuditError> {
    use enforcer::node::audit::{Head, head::FILE_NAME};
    if no_head {
        return Ok(None);
    }
    if let Some(path) = head {
        return match Head::load(path)? {
            Some(h) => Ok(Some((path.to_path_buf(), h))),
            None => Err(enforcer::node::audit::AuditError::Io {
                op: "reading the chain head of",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            }),
        };
    }
    let Ok(config) = Config::load(&cli.config) else {
        return Ok(None);
    };
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !files.last().is_some_and(|f| same(f, &config.audit_log)) {
        return Ok(None);
    }
    let path = config.state_dir.join(FILE_NAME);
    Ok(Head::load(&path)?.map(|h| (path, h)))
}

fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| bad(format!("error: {}", error_chain(&e))))
}

impl Cli {
    fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(|| {
            Config::load(&self.config)
                .map(|c| c.socket)
                .unwrap_or_else(|_| PathBuf::from("/run/enforcer/enforcer.sock"))
        })
    }

    /// The read-only socket: the configuration's, or `enforcer-ro.sock` beside the socket.
    fn read_socket(&self) -> PathBuf {
        match (&self.socket, Config::load(&self.config)) {
            (None, Ok(c)) => c.read_socket,
            _ => self.socket().with_file_name("enforcer-ro.sock"),
        }
    }

    /// Sends one request to the daemon; an error answer becomes an error. A request that
    /// only reads goes to the read-only socket when the admin socket refuses this user.
    fn call(&self, request: Request) -> anyhow::Result<Value> {
        let mut client = match Client::connect(&self.socket()) {
            Err(ApiError::PermissionDenied { .. }) if request.read_only() => {
                Client::connect(&self.read_socket())?
            }
            connected => connected?,
        };
        match client.call(&request)? {
            Response::Ok(value) => Ok(value),
            Response::Error(message) => bail!("{message}"),
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let result = dispatch(&cli);
    match result {
        Err(e) if e.downcast_ref::<BadInputError>().is_some() => {
            eprintln!("{e}");
            Ok(ExitCode::from(EXIT_BAD_INPUT))
        }
        other => other,
    }
}

/// Marks an error as bad input (exit code 2).
#[derive(Debug)]
struct BadInputError(String);

impl std::fmt::Display for BadInputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInputError {}

/// Man pages (one per command and subcommand, clap_mangen) into `dir/man` and completions
/// for bash, zsh and fish (clap_complete) into `dir/completions`.
fn generate(dir: &Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut Cli::command(), "enforcer", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    Ok(())
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("json values serialize")
    );
}

fn dispatch(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Run => {
            let config = load_config(&cli.config)?;
            match daemon::run(config) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(daemon::DaemonError::Policy(e)) => {
                    Err(bad(format!("error: {}", error_chain(&e))))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Status => {
            let v = cli.call(Request::Status)?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "daemon pid {}, policy generation {}",
                    v["pid"], v["generation"]
                );
                println!(
                    "policy      {} (sha256 {})",
                    v["policy_origin"].as_str().unwrap_or("-"),
                    v["policy_digest"].as_str().unwrap_or("-")
                );
                println!("agents      {}", v["agents"]);
                print_hooks(&v["hooks"]);
                if v["pending"].as_array().is_some_and(|p| !p.is_empty()) {
                    println!(
                        "pending     {} (not present yet: attached when they appear)",
                        join(&v["pending"])
                    );
                }
                println!("last apply  {} us", v["apply_micros"]);
                if let Some(e) = v["last_error"].as_str() {
                    println!("last error  {e} (the previous policy keeps enforcing)");
                }
                let audit = &v["audit"];
                println!(
                    "audit log   {} at seq {}, head {}",
                    audit["file"].as_str().unwrap_or("-"),
                    audit["seq"],
                    audit["head"].as_str().unwrap_or("-")
                );
                if let Some(e) = audit["last_error"].as_str() {
                    println!(
                        "audit error {e} (failing since {}; {} events not written, retrying)",
                        audit["failing_since"].as_str().unwrap_or("?"),
                        audit["events_unwritten"]
                    );
                }
                if let Some(e) = audit["head_error"].as_str() {
                    println!("audit error {e}");
                }
                for found in audit["recovered"].as_array().into_iter().flatten() {
                    println!("audit start {}", found.as_str().unwrap_or_default());
                }
                if let Some(o) = v["overrides"].as_object().filter(|o| !o.is_empty()) {
                    println!(
                        "overrides   {}",
                        o.iter()
                            .map(|(k, m)| format!("agent {k}: {}", m.as_str().unwrap_or("?")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents => {
            let v = cli.call(Request::Agents)?;
            if cli.json {
                print_json(&v);
            } else {
                let mut rows = table::new(
                    &["ID", "NAME", "MODE", "MATCH", "PASSED", "DROPPED"],
                    &[0, 4, 5],
                );
                for a in v.as_array().into_iter().flatten() {
                    let mut matched = join(&a["interfaces"]);
                    let prefixes = join(&a["prefixes"]);
                    if !prefixes.is_empty() {
                        if !matched.is_empty() {
                            matched.push_str(", ");
                        }
                        matched.push_str(&prefixes);
                    }
                    rows.add_row(vec![
                        a["id"].to_string(),
                        a["name"].as_str().unwrap_or("").to_string(),
                        a["mode"].as_str().unwrap_or("").to_string(),
                        matched,
                        a["passed_packets"].to_string(),
                        a["dropped_packets"].to_string(),
                    ]);
                }
                print!("{}", table::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { agent } => {
            let v = cli.call(Request::Agent {
                agent: agent.clone(),
            })?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "agent {} {:?} ({})",
                    v["id"],
                    v["name"].as_str().unwrap_or(""),
                    v["mode"].as_str().unwrap_or("")
                );
                println!("  interfaces  {}", join(&v["interfaces"]));
                println!("  prefixes    {}", join(&v["prefixes"]));
                println!("  rate        {}", v["rate"]);
                println!(
                    "  egress      default {}",
                    v["egress_default"].as_str().unwrap_or("")
                );
                for r in v["egress"].as_array().into_iter().flatten() {
                    println!(
                        "    {:<5} {:<5} ports {:<11} to {}",
                        r["action"].as_str().unwrap_or(""),
                        r["proto"].as_str().unwrap_or(""),
                        r["ports"].as_str().unwrap_or(""),
                        join(&r["to"])
                    );
                }
                println!("  counters");
                let mut rows = table::new(&["REASON", "PACKETS", "BYTES"], &[1, 2]);
                for (reason, c) in v["counters"].as_object().into_iter().flatten() {
                    rows.add_row(vec![
                        reason.clone(),
                        c["packets"].to_string(),
                        c["bytes"].to_string(),
                    ]);
                }
                for line in table::render(&rows).lines() {
                    println!("    {line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor => {
            let config = load_config(&cli.config)?;
            // A bpffs of its own, so nothing of the running daemon's pins is touched.
            let bpffs = BpffsMount::new().context("mounting a private bpffs")?;
            let mut dataplane = Dataplane::load(bpffs.path(), &config.limits)
                .context("loading the data plane on this kernel")?;
            dataplane
                .load_tc()
                .context("loading the tc programs on this kernel")?;
            let costs = dataplane.verifier_costs()?;
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned();
            if cli.json {
                print_json(&serde_json::json!({ "kernel": release, "programs": costs }));
            } else {
                print!("{}", dataplane::verifier_table(&release, &costs));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats => {
            let (generation, agents) = match cli.call(Request::Stats) {
                Ok(v) => (
                    v["generation"].as_u64().unwrap_or(0),
                    serde_json::from_value::<Vec<stats::AgentStats>>(v["agents"].clone())?,
                ),
                Err(e) if is_not_running(&e) => {
                    // The pinned program keeps enforcing without a daemon: read its maps.
                    let config = load_config(&cli.config)?;
                    let maps = KernelMaps::from_pins(&config.bpffs).with_context(|| {
                        format!(
                            "no daemon, and no pinned maps under {}",
                            config.bpffs.display()
                        )
                    })?;
                    let names = Status::read(&config.runtime_dir)
                        .map(|s| s.agents)
                        .unwrap_or_default();
                    (
                        maps.current_state()?.generation,
                        stats::collect(&maps, &names)?,
                    )
                }
                Err(e) => return Err(e),
            };
            if cli.json {
                print_json(&serde_json::to_value(&agents)?);
            } else {
                println!("policy generation {generation}");
                print!("{}", table::stats(&agents));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Top { interval, count } => {
            top(cli, Duration::from_secs_f64(interval.max(0.1)), *count)
        }
        Command::Policy { command } => policy_command(cli, command),
        Command::Mode { agent, mode } => {
            let mode = match mode {
                ModeArg::Monitor => Mode::Monitor,
                ModeArg::Enforce => Mode::Enforce,
            };
            let v = cli.call(Request::Mode {
                agent: agent.clone(),
                mode,
            })?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "agent {} now in {} mode (generation {})",
                    v["agent"],
                    v["mode"].as_str().unwrap_or(""),
                    v["generation"]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    lines,
                    follow,
                    agent,
                    reason,
                    verdict,
                },
        } => {
            let filter = enforcer::node::audit::TailFilter {
                agent: agent.clone(),
                reason: reason.clone(),
                verdict: verdict.clone(),
            };
            // With a filter the last N matching records are among more lines: look further
            // back (bounded). At least one line, whose seq is where following starts.
            let ask = if filter.is_empty() {
                *lines
            } else {
                lines.saturating_mul(50).min(20_000)
            };
            let v = cli.call(Request::AuditTail { lines: ask.max(1) })?;
            let got: Vec<&str> = v["lines"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let shown: Vec<&str> = got.iter().copied().filter(|l| filter.matches(l)).collect();
            for line in &shown[shown.len().saturating_sub(*lines)..] {
                println!("{line}");
            }
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            let after = got
                .last()
                .and_then(|l| serde_json::from_str::<Value>(l).ok())
                .and_then(|r| r["seq"].as_u64())
                .unwrap_or(0);
            let path = PathBuf::from(v["file"].as_str().unwrap_or_default());
            let mut follower = enforcer::node::audit::Follower::new(&path, after).with_context(
                || "following the audit log (reading it needs the daemon's file permissions)",
            )?;
            let stdout = std::io::stdout();
            loop {
                for line in follower.poll()? {
                    if filter.matches(&line) {
                        let mut out = stdout.lock();
                        // A closed pipe (`| head`) ends the command.
                        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    files,
                    continued,
                    head,
                    no_head,
                },
        } => match verify_head(cli, files, head.as_deref(), *no_head).and_then(|anchor| {
            Ok((
                enforcer::node::audit::verify_anchored(
                    files,
                    *continued,
                    anchor.as_ref().map(|a| &a.1),
                )?,
                anchor,
            ))
        }) {
            Ok((report, anchor)) => {
                let names = files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ");
                if cli.json {
                    print_json(&serde_json::json!({
                        "ok": true,
                        "lines": report.lines,
                        "first_seq": report.first_seq,
                        "last_seq": report.last_seq,
                        "starts_after": report.starts_after,
                        "head": report.head,
                        "head_file": anchor.as_ref().map(|a| &a.0),
                        "head_checked_seq": report.anchor_checked,
                    }));
                } else {
                    println!(
                        "{names}: ok: {} records, chain head {}",
                        report.lines, report.head
                    );
                    if report.first_seq > 1 {
                        println!(
                            "the chain starts at seq {}, after a line hashing to {} (in an older rotated file, not given)",
                            report.first_seq, report.starts_after
                        );
                    }
                    match (&anchor, report.anchor_checked) {
                        (Some((file, _)), Some(seq)) => println!(
                            "the log reaches the head saved in {} (seq {seq}): nothing was cut from its end",
                            file.display()
                        ),
                        (Some((file, a)), None) => println!(
                            "the head saved in {} (seq {}) lies before the files given: their end is not checked",
                            file.display(),
                            a.seq
                        ),
                        (None, _) => println!(
                            "no saved chain head checked: records cut from the end would not show (see --head)"
                        ),
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                if cli.json {
                    print_json(&serde_json::json!({"ok": false, "error": error_chain(&e)}));
                } else {
                    eprintln!("{}", error_chain(&e));
                }
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Stop { detach } => {
            let config = load_config(&cli.config)?;
            let status = Status::read(&config.runtime_dir);
            if let Some(reused) = status.as_ref().and_then(Status::reused_pid) {
                // A daemon killed outright leaves its pid in status.json; the pid may since
                // belong to anything. Not ours to signal.
                eprintln!(
                    "no daemon to stop: {}/status.json names a daemon that is gone ({reused}); not signalling it",
                    config.runtime_dir.display()
                );
            }
            if let Some(status) = status
                && status
                    .signal_daemon(libc::SIGTERM)
                    .with_context(|| format!("signalling daemon {}", status.pid))?
            {
                let deadline = Instant::now() + Duration::from_secs(10);
                while status.daemon_alive() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(50));
                }
                if status.daemon_alive() {
                    bail!("daemon {} did not exit within 10 s of SIGTERM", status.pid);
                }
                println!(
                    "daemon {} stopped; the pinned program keeps enforcing",
                    status.pid
                );
            }
            if *detach {
                dataplane::remove_pins(&config.bpffs)
                    .with_context(|| format!("removing pins under {}", config.bpffs.display()))?;
                println!(
                    "detached: removed every pin under {}",
                    config.bpffs.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            command: InspectCommand::Ca,
        } => {
            let config = load_config(&cli.config)?;
            let dir = config
                .inspect
                .map_or(config.state_dir, |inspect| inspect.ca_dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = enforcer::inspect::ca::NodeCa::load_or_create(&dir)?;
            print!("{}", ca.cert_pem());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { dir } => {
            generate(dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { dir } => {
            let keys = enforcer::controlplane::bundle::keygen(dir)?;
            println!(
                "private key {} (keep it on the control plane only)",
                keys.private_key.display()
            );
            println!(
                "public key  {} (key id {})",
                keys.public_key.display(),
                keys.key_id
            );
            println!(
                "trust it on nodes: trusted_keys = [\"{}\"]",
                std::fs::read_to_string(&keys.public_key)?.trim()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            dir,
            server_names,
            clients,
        } => {
            let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
            let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
            let paths = enforcer::controlplane::certs::generate(dir, &names, &clients)?;
            println!("CA      {}", paths.ca.cert.display());
            println!(
                "server  {} ({})",
                paths.server.cert.display(),
                names.join(", ")
            );
            for (name, p) in &paths.clients {
                println!("client  {} ({name})", p.cert.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ControlPlane {
            command: ControlPlaneCommand::Serve { file },
        } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut cfg: enforcer::controlplane::ControlPlaneConfig =
                toml::from_str(&text).map_err(|e| bad(format!("{}: {e}", file.display())))?;
            cfg.resolve_paths(file.parent().unwrap_or(Path::new(".")));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(enforcer::controlplane::serve(cfg, async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("signal handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ControlPlane {
            command: ControlPlaneCommand::Nodes,
        } => {
            let config = load_config(&cli.config)?;
            let cp = config.control_plane.ok_or_else(|| {
                bad(format!(
                    "{}: no [control_plane] table",
                    cli.config.display()
                ))
            })?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let nodes = runtime.block_on(enforcer::controlplane::nodes(&cp.endpoint()))?;
            if cli.json {
                print_json(&serde_json::to_value(&nodes)?);
            } else {
                let mut rows = table::new(
                    &["NODE", "CONNECTED", "SENT", "ACKED", "LAST NACK"],
                    &[2, 3],
                );
                for n in nodes {
                    rows.add_row(vec![
                        n.node_id,
                        n.connected.to_string(),
                        n.version_sent.to_string(),
                        n.version_acked.to_string(),
                        n.last_nack_reason.unwrap_or_default(),
                    ]);
                }
                print!("{}", table::render(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { seconds } => {
            enforcer::cli::demo::run(Duration::from_secs(*seconds))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One line per hooked interface: the mode the kernel reports and whether the program
/// running there is this daemon's.
fn print_hooks(hooks: &serde_json::Value) {
    let hooks = hooks.as_array().map(Vec::as_slice).unwrap_or_default();
    if hooks.is_empty() {
        println!("attached    (no interface)");
    }
    let width = hooks
        .iter()
        .filter_map(|h| h["interface"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    for (i, h) in hooks.iter().enumerate() {
        let label = if i == 0 { "attached" } else { "" };
        let interface = h["interface"].as_str().unwrap_or("?");
        let state = match (h["mode"].as_str(), h["problem"].as_str()) {
            (_, Some(problem)) => format!("NOT ENFORCING: {problem}"),
            (Some(mode), None) => {
                let whose = if h["ours"] == true {
                    "this daemon's program"
                } else {
                    "ANOTHER program"
                };
                let hook = h["hook"].as_str().unwrap_or("?");
                format!("{hook} {mode:<8} program {} ({whose})", h["program_id"])
            }
            (None, None) => "unknown".to_string(),
        };
        println!("{label:<11} {interface:<width$}  {state}");
    }
}

fn join(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn is_not_running(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<ApiError>(),
        Some(ApiError::NotRunning { .. })
    )
}

/// Refreshes per-agent rates in place: counters are sampled each interval and the
/// difference divided by the time between samples.
fn top(cli: &Cli, interval: Duration, count: Option<u64>) -> anyhow::Result<ExitCode> {
    let sample = || -> anyhow::Result<(Instant, Vec<stats::AgentStats>)> {
        let v = cli.call(Request::Stats)?;
        Ok((Instant::now(), serde_json::from_value(v["agents"].clone())?))
    };
    let totals = |a: &stats::AgentStats| -> (u64, u64, u64) {
        a.reasons.iter().fold((0, 0, 0), |(p, d, b), (reason, c)| {
            let drop = enforcer_common::Reason::ALL
                .iter()
                .any(|r| r.name() == *reason && r.is_drop());
            if drop {
                (p, d + c.packets, b)
            } else {
                (p + c.packets, d, b + c.bytes)
            }
        })
    };
    let (mut t0, mut before) = sample()?;
    let mut n = 0;
    loop {
        thread::sleep(interval);
        let (t1, after) = sample()?;
        let secs = (t1 - t0).as_secs_f64();
        let mut rows = Vec::new();
        for a in &after {
            let (p1, d1, b1) = totals(a);
            let (p0, d0, b0) = before
                .iter()
                .find(|b| b.id == a.id)
                .map_or((0, 0, 0), totals);
            rows.push((
                a.id,
                a.name.clone(),
                (p1 - p0) as f64 / secs,
                (d1 - d0) as f64 / secs,
                (b1 - b0) as f64 * 8.0 / secs,
            ));
        }
        rows.sort_by(|a, b| (b.2 + b.3).total_cmp(&(a.2 + a.3)));
        if cli.json {
            let v: Vec<Value> = rows.iter().map(|r| serde_json::json!({"id": r.0, "name": r.1, "passed_pps": r.2, "dropped_pps": r.3, "passed_bps": r.4})).collect();
            println!("{}", serde_json::to_string(&v)?);
        } else {
            let mut screen = String::from("\x1b[H\x1b[2J");
            let _ = writeln!(
                screen,
                "enforcer top - every {:.1}s, Ctrl-C to quit",
                interval.as_secs_f64()
            );
            let mut lines = table::new(
                &[
                    "ID",
                    "NAME",
                    "PASSED pkt/s",
                    "DROPPED pkt/s",
                    "PASSED bit/s",
                ],
                &[0, 2, 3, 4],
            );
            for r in &rows {
                lines.add_row(vec![
                    r.0.to_string(),
                    r.1.clone(),
                    format!("{:.0}", r.2),
                    format!("{:.0}", r.3),
                    format!("{:.0}", r.4),
                ]);
            }
            screen.push_str(&table::render(&lines));
            print!("{screen}");
            let _ = std::io::stdout().flush();
        }
        (t0, before) = (t1, after);
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn policy_command(cli: &Cli, command: &PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { file } => {
            let limits = if cli.config.exists() {
                load_config(&cli.config)?.limits
            } else {
                Default::default()
            };
            let policy = policy::load(file).map_err(|e| bad(error_chain(&e)))?;
            // Interfaces may live in another network namespace than the checker's; their
            // existence is checked when the daemon applies the policy.
            let compiled = enforcer::dataplane::compile::compile(&policy, &limits, &|_| Some(1))
                .map_err(|e| bad(format!("{}: {}", file.display(), error_chain(&e))))?;
            println!(
                "{}: ok: {} agents, {} source entries, {} destination entries",
                file.display(),
                compiled.agents.len(),
                compiled.source_hosts_v4.len()
                    + compiled.source_hosts_v6.len()
                    + compiled.source_prefixes_v4.len()
                    + compiled.source_prefixes_v6.len(),
                compiled.destinations_v4.len() + compiled.destinations_v6.len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Apply { file } => {
            let config = load_config(&cli.config)?;
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Validate here first, so errors name the file as the operator wrote it.
            let (policy, compiled) =
                daemon::load_policy(file, &config.limits).map_err(|e| bad(error_chain(&e)))?;
            let origin = file.display().to_string();
            match cli.call(Request::PolicyApply { text, origin }) {
                Ok(v) => {
                    if cli.json {
                        print_json(&v);
                    } else {
                        println!("applied: generation {}", v["generation"]);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if is_not_running(&e) => {
                    // No daemon: the pinned program still enforces; update its maps directly
                    // and install the file for the next daemon start.
                    let mut dataplane = Dataplane::load(&config.bpffs, &config.limits)?;
                    let generation = dataplane.apply(&compiled)?;
                    std::fs::copy(file, &config.policy)
                        .with_context(|| format!("installing {}", config.policy.display()))?;
                    let mut status = Status::read(&config.runtime_dir).unwrap_or_default();
                    status.generation = generation;
                    status.agents = daemon::agent_names(&policy);
                    std::fs::create_dir_all(&config.runtime_dir)?;
                    std::fs::write(
                        config.runtime_dir.join("status.json"),
                        serde_json::to_string_pretty(&status)?,
                    )?;
                    println!(
                        "applied to the pinned maps (no daemon running): generation {generation}"
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e),
            }
        }
        PolicyCommand::Show => {
            let v = cli.call(Request::PolicyShow)?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "# {} (generation {}, sha256 {})",
                    v["origin"].as_str().unwrap_or(""),
                    v["generation"],
                    v["digest"].as_str().unwrap_or("")
                );
                if let Some(o) = v["overrides"].as_object().filter(|o| !o.is_empty()) {
                    println!("# runtime mode overrides: {}", Value::Object(o.clone()));
                }
                print!("{}", v["text"].as_str().unwrap_or(""));
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            policy::parse(&file.display().to_string(), &text).map_err(|e| bad(error_chain(&e)))?;
            let v = cli.call(Request::PolicyDiff {
                text,
                origin: file.display().to_string(),
            })?;
            if cli.json {
                print_json(&v);
            } else {
                for (key, label) in [
                    ("agents_added", "added"),
                    ("agents_removed", "removed"),
                    ("agents_changed", "changed"),
                ] {
                    for a in v[key].as_array().into_iter().flatten() {
                        println!("{label:<8} agent {} {}", a["id"], a["name"]);
                    }
                }
                print!("{}", v["diff"].as_str().unwrap_or(""));
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Presets => {
            for (name, prefixes) in policy::PRESETS {
                println!("{name:<13} {}", prefixes.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
