//! The command line's definition (clap derive): every command, its arguments and its help
//! text, which `enforcer generate` also turns into man pages and completions.

#![expect(
    missing_docs,
    reason = "clap turns doc comments into help text: an item's help is its documentation, and a \
              doc comment on a subcommand's type would change what `--help` prints"
)]

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "enforcer",
    version,
    about = "XDP rate limiting and egress allow-listing for AI agents"
)]
pub struct Cli {
    /// Daemon configuration file (for the socket, pin and state paths).
    #[arg(long, global = true, default_value = "/etc/enforcer/enforcer.toml")]
    pub config: PathBuf,
    /// The daemon's socket (default: from the configuration, else /run/enforcer/enforcer.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `enforcer breaker reset`.
#[derive(Subcommand)]
pub enum BreakerCommand {
    /// Close an agent's circuit breaker now: its traffic is judged as usual again (quotas
    /// and the trip count stay). Audited with who asked.
    Reset {
        /// Agent id, name or interface.
        agent: String,
    },
}

/// `enforcer agent add|remove|wait`: agents of sandboxes, for runtimes and orchestrators.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Make an agent of a profile of the enforcing policy for a sandbox interface (it may
    /// come later). Kept across daemon restarts until removed; returns once enforced.
    Add {
        /// The profile (`[[profiles]]` of the policy).
        #[arg(long)]
        profile: String,
        /// The sandbox's host-side interface.
        #[arg(long)]
        interface: String,
        /// A source prefix that is the agent's too (repeatable).
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
    },
    /// Remove an agent made by `agent add` or by a profile's pattern (by name, interface
    /// or id); returns once no longer enforced.
    Remove {
        /// Agent name, interface or id.
        agent: String,
    },
    /// Wait until an interface's agent is enforced and its hook attached: what a runtime
    /// runs before it brings a sandbox's link up, so the first packet meets the policy.
    Wait {
        /// The sandbox's host-side interface.
        interface: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: load, pin and attach the XDP program and enforce the policy.
    Run,
    /// Daemon, policy and attachment state.
    Status,
    /// The agents of the enforcing policy with packet totals.
    Agents,
    /// One agent, by id, name or interface: identity, rules, limits, counters by reason.
    /// `agent add`, `agent remove` and `agent wait` manage the agents of sandboxes.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Agent {
        /// Agent id, name or interface.
        #[arg(required = true)]
        agent: Option<String>,
        #[command(subcommand)]
        command: Option<AgentCommand>,
    },
    /// Per-agent counters by reason (from the pinned maps if no daemon runs).
    Stats,
    /// Load every program of the data plane on this kernel, in a private bpffs, and print
    /// what the verifier spent on each against its 1,000,000-instruction limit.
    Doctor,
    /// Live per-agent packet and bit rates, passed and dropped: refreshing in place on a
    /// terminal, a block per sample under a timestamp elsewhere, a JSON line per sample
    /// with --json.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
        /// Row order: by agent id (stable), by name, or busiest first by passed or dropped
        /// packets per second.
        #[arg(long, value_enum, default_value_t = TopSort::Id)]
        sort: TopSort,
    },
    /// Check, apply, show or diff policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Switch an agent between monitor and enforce mode (kept across reloads and restarts),
    /// or with --clear put it back in the policy's mode.
    Mode {
        /// Agent id or name.
        agent: String,
        /// The mode.
        #[arg(required_unless_present = "clear")]
        mode: Option<ModeArg>,
        /// Drop the runtime override: the agent runs in the mode its policy names.
        #[arg(long, conflicts_with = "mode")]
        clear: bool,
    },
    /// Circuit breakers of runaway agents.
    Breaker {
        #[command(subcommand)]
        command: BreakerCommand,
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
pub enum ControlPlaneCommand {
    /// Serve the policies in a directory (`default.toml`, `nodes/<node_id>.toml`), signed,
    /// to every node that connects; pushes changes as the files change.
    Serve {
        /// Control-plane configuration (TOML: dir, signing_key, listen, tls_cert, tls_key,
        /// optional client_ca for mutual TLS).
        file: PathBuf,
    },
    /// Every node the control plane has seen, with the versions sent and acknowledged
    /// (connects with the `[control_plane]` settings of `--config`, trying each of `urls`
    /// in turn). A replica answers for the whole fleet.
    Nodes,
    /// Validate a policy, sign it for its target and write it to the fleet's etcd with the
    /// next fleet-wide version (a compare-and-swap): every replica relays it to the nodes
    /// it targets. Without --node or --selector, it is for every node.
    Publish {
        /// The policy file (TOML); rejected whole, with file:line:column, if invalid.
        file: PathBuf,
        /// The Ed25519 signing key (`signing.key` from `enforcer keygen`).
        #[arg(long)]
        signing_key: PathBuf,
        /// etcd client URLs (repeat, or comma-separated).
        #[arg(long = "etcd", required = true, value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix in etcd.
        #[arg(long, default_value = crate::controlplane::etcd::DEFAULT_PREFIX)]
        etcd_prefix: String,
        /// PEM CA of etcd's certificate (https endpoints).
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// PEM client certificate for etcd (with --etcd-key).
        #[arg(long)]
        etcd_cert: Option<PathBuf>,
        /// PEM key of --etcd-cert.
        #[arg(long)]
        etcd_key: Option<PathBuf>,
        /// Only for this node.
        #[arg(long, conflicts_with = "selector")]
        node: Option<String>,
        /// Only for nodes with these labels: key=value[,key=value...].
        #[arg(long)]
        selector: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum InspectCommand {
    /// Print the node's inspection CA certificate (PEM) for agent sandboxes to trust;
    /// generates the CA (in `[inspect].ca_dir`, default the state directory) if the
    /// daemon has not yet.
    Ca,
}

#[derive(Subcommand)]
pub enum AuditCommand {
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

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TopSort {
    Id,
    Name,
    Passed,
    Dropped,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Monitor,
    Enforce,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
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
