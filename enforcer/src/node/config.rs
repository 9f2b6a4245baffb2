//! The daemon's configuration file (TOML): where the policy is, where to attach, where to
//! pin, and how large the maps are.
//!
//! ```toml
//! policy = "/etc/enforcer/policy.toml"   # relative paths are relative to this file
//! interfaces = ["eth0"]                  # attach points besides the agents' own interfaces
//! bpffs = "/sys/fs/bpf/enforcer"         # pins: maps/ and links/
//! state_dir = "/var/lib/enforcer"        # what must survive a reboot: the control plane's last
//!                                        # bundle, mode overrides, the inspecting proxy's CA
//! runtime_dir = "/run/enforcer"          # status.json and the socket: this boot only
//! hook = "auto"                          # auto (tc on veth/tap/other virtual devices, XDP on NICs) | xdp | tc
//! xdp_mode = "auto"                      # at XDP: auto (native, else generic) | native | generic
//! socket = "/run/enforcer/enforcer.sock" # local API (default: <runtime_dir>/enforcer.sock)
//! socket_group = "enforcer"              # group allowed to use it (mode 0660); default: root only
//! read_socket = "/run/enforcer/enforcer-ro.sock"  # status, agents, agent, stats only
//! read_socket_group = "monitoring"       # group allowed to read (mode 0660); default: everyone (0666)
//! api_max_connections = 64               # per socket; one more is refused
//! api_idle_timeout_ms = 30000            # per request line and per answer
//! max_policy_bytes = 13631488            # a larger policy is refused from any source; default
//!                                        # 1 MiB + 1 KiB per max_agents + 64 B per max prefix
//! metrics_listen = "127.0.0.1:9464"      # Prometheus /metrics; "" disables it
//! metrics_top_agents = 100               # per-agent series for the busiest N; sums for all
//! audit_log = "/var/log/enforcer/audit.jsonl"  # hash-chained JSON lines of denials
//! audit_events_per_sec = 100             # per-agent audit budget (0 turns events off)
//! audit_burst = 100
//! audit_global_events_per_sec = 1000     # all agents together; the rest become summaries
//! audit_summary_interval_secs = 10       # one summary record per agent and reason per interval
//!
//! [control_plane]                        # optional: policy pushed by `enforcer control-plane`
//! url = "https://cp.example:7443"
//! ca = "ca.pem"                          # the control plane's CA, pinned
//! node_id = "edge-1"
//! trusted_keys = ["<base64 Ed25519 public key>"]
//!
//! [dns]                                  # optional: the agents' resolver (host-name rules)
//! listen = ["10.200.0.53:53"]            # UDP and TCP; specific addresses assigned here
//! upstreams = ["192.0.2.53:53"]          # forwarded to, in order
//! grace_secs = 5                         # admitted addresses outlive their TTL by this
//! max_ttl_secs = 3600                    # TTLs in answers are capped at this
//! case_randomization = true              # 0x20: upstream queries' names in random case,
//!                                        # which answers must echo (off for upstreams that don't)
//! max_learned_per_agent = 1024           # learned (name, address) pairs one agent may hold;
//!                                        # an answer past it is refused (dns_learned_cap)
//!
//! [inspect]                              # optional: the inspecting TLS proxy (see enforcer::inspect)
//! listen = "0.0.0.0:3128"                # explicit CONNECT proxy; "" disables it
//! transparent_port = 3129                # redirect target for inspected agents' TLS ports; 0 disables
//! upstream_roots = "/etc/ssl/certs/ca-certificates.crt"  # roots for upstream certificates
//! ca_dir = "/var/lib/enforcer"           # the node CA's files (default: state_dir)
//! max_connections_per_agent = 256        # open proxied connections per agent; more are closed
//! max_connections = 4096                 # in all; lowered to fit RLIMIT_NOFILE with a reserve
//! record_layer = "rustls"                # rustls | auto | ktls: kernel TLS moves the records
//!                                        # never (rustls), where it can (auto), or must (ktls)
//!
//! [hooks]                                # per interface, overriding `hook`
//! eth1 = "tc"
//!
//! [limits]
//! max_agents = 4096
//! max_interfaces = 1024
//! max_source_prefixes = 65536
//! max_destination_prefixes = 65536
//! audit_ring_bytes = 1048576             # audit ring buffer: a power of two, >= page size
//! ```

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use thiserror::Error;

use crate::dataplane::{AttachMode, HookChoice, compile::Limits};

/// Errors reading the configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has wrong fields.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was wrong.
        message: String,
    },
    /// A field has an impossible value.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What was expected.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    policy: PathBuf,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default = "default_bpffs")]
    bpffs: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_runtime_dir")]
    runtime_dir: PathBuf,
    #[serde(default)]
    hook: HookChoice,
    #[serde(default)]
    hooks: BTreeMap<String, HookChoice>,
    #[serde(default)]
    xdp_mode: AttachMode,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    read_socket: Option<PathBuf>,
    read_socket_group: Option<String>,
    #[serde(default = "default_api_max_connections")]
    api_max_connections: usize,
    #[serde(default = "default_api_idle_timeout_ms")]
    api_idle_timeout_ms: u64,
    max_policy_bytes: Option<usize>,
    #[serde(default = "default_metrics")]
    metrics_listen: String,
    #[serde(default = "default_metrics_top_agents")]
    metrics_top_agents: usize,
    #[serde(default = "default_audit_log")]
    audit_log: PathBuf,
    #[serde(default = "default_audit_rate")]
    audit_events_per_sec: u32,
    #[serde(default = "default_audit_rate")]
    audit_burst: u32,
    #[serde(default = "default_audit_global")]
    audit_global_events_per_sec: u32,
    #[serde(default = "default_audit_summary_interval")]
    audit_summary_interval_secs: u64,
    #[serde(default)]
    limits: RawLimits,
    control_plane: Option<crate::controlplane::sync::SyncConfig>,
    dns: Option<RawDns>,
    inspect: Option<RawInspect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    listen: Vec<std::net::SocketAddr>,
    upstreams: Vec<std::net::SocketAddr>,
    #[serde(default = "d_grace")]
    grace_secs: u32,
    #[serde(default = "d_max_ttl")]
    max_ttl_secs: u32,
    #[serde(default = "d_case_randomization")]
    case_randomization: bool,
    #[serde(default = "d_max_learned_per_agent")]
    max_learned_per_agent: usize,
}

fn d_grace() -> u32 {
    5
}
fn d_max_ttl() -> u32 {
    3600
}
/// On: dnsmasq (the integration tests' upstream), unbound and BIND echo the question as
/// asked.
fn d_case_randomization() -> bool {
    true
}
fn d_max_learned_per_agent() -> usize {
    crate::dns::DEFAULT_MAX_LEARNED_PER_AGENT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInspect {
    #[serde(default = "default_inspect_listen")]
    listen: String,
    #[serde(default = "default_transparent_port")]
    transparent_port: u16,
    #[serde(default = "default_upstream_roots")]
    upstream_roots: PathBuf,
    ca_dir: Option<PathBuf>,
    #[serde(default = "default_max_connections_per_agent")]
    max_connections_per_agent: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default)]
    record_layer: crate::inspect::RecordLayer,
}

fn default_max_connections_per_agent() -> usize {
    crate::inspect::DEFAULT_MAX_CONNECTIONS_PER_AGENT
}

fn default_max_connections() -> usize {
    crate::inspect::DEFAULT_MAX_CONNECTIONS
}

fn default_inspect_listen() -> String {
    crate::inspect::DEFAULT_LISTEN.into()
}

fn default_transparent_port() -> u16 {
    crate::inspect::DEFAULT_TRANSPARENT_PORT
}

fn default_upstream_roots() -> PathBuf {
    PathBuf::from(crate::inspect::DEFAULT_UPSTREAM_ROOTS)
}

fn default_metrics_top_agents() -> usize {
    100
}

fn default_audit_log() -> PathBuf {
    PathBuf::from("/var/log/enforcer/audit.jsonl")
}

fn default_api_max_connections() -> usize {
    64
}

fn default_api_idle_timeout_ms() -> u64 {
    30_000
}

/// The default `max_policy_bytes` for `limits`: room for every agent and prefix the maps
/// can hold, written out at length, and no more (a 45 MB policy once took the daemon to
/// 1.3 GB while it parsed).
pub fn default_max_policy_bytes(limits: &Limits) -> usize {
    (1 << 20)
        + 1024 * limits.max_agents as usize
        + 64 * (limits.max_source_prefixes as usize + limits.max_destination_prefixes as usize)
}

fn default_audit_global() -> u32 {
    crate::node::audit::GlobalBudget::default().events_per_sec
}

fn default_audit_summary_interval() -> u64 {
    crate::node::audit::GlobalBudget::default()
        .interval
        .as_secs()
}

fn default_audit_rate() -> u32 {
    100
}

fn default_metrics() -> String {
    "127.0.0.1:9464".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "d_agents")]
    max_agents: u32,
    #[serde(default = "d_ifaces")]
    max_interfaces: u32,
    #[serde(default = "d_prefixes")]
    max_source_prefixes: u32,
    #[serde(default = "d_prefixes")]
    max_destination_prefixes: u32,
    #[serde(default = "d_audit_ring")]
    audit_ring_bytes: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_agents: d_agents(),
            max_interfaces: d_ifaces(),
            max_source_prefixes: d_prefixes(),
            max_destination_prefixes: d_prefixes(),
            audit_ring_bytes: d_audit_ring(),
        }
    }
}

fn d_agents() -> u32 {
    Limits::default().max_agents
}
fn d_ifaces() -> u32 {
    Limits::default().max_interfaces
}
fn d_prefixes() -> u32 {
    Limits::default().max_source_prefixes
}
fn d_audit_ring() -> u32 {
    Limits::default().audit_ring_bytes
}
fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/enforcer")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/enforcer")
}
fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/enforcer")
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The file this came from.
    pub path: PathBuf,
    /// The policy file (made absolute relative to the config file).
    pub policy: PathBuf,
    /// Interfaces to attach to besides those the policy names.
    pub interfaces: Vec<String>,
    /// bpffs directory for pins.
    pub bpffs: PathBuf,
    /// Directory for what must survive a reboot: the control plane's last bundle, the mode
    /// overrides, the inspecting proxy's CA (by default).
    pub state_dir: PathBuf,
    /// Directory for what describes this boot only: `status.json` and the default socket.
    pub runtime_dir: PathBuf,
    /// The hook every interface gets unless [`Config::hooks`] names it.
    pub hook: HookChoice,
    /// The hook of particular interfaces.
    pub hooks: BTreeMap<String, HookChoice>,
    /// XDP attach mode.
    pub xdp_mode: AttachMode,
    /// The local API socket.
    pub socket: PathBuf,
    /// Group that may use the socket besides root.
    pub socket_group: Option<String>,
    /// The read-only API socket (status, agents, agent, stats).
    pub read_socket: PathBuf,
    /// Group that may use the read-only socket (mode 0660); `None`: everyone (0666).
    pub read_socket_group: Option<String>,
    /// Limits of each API socket's server.
    pub api: crate::node::api::ApiLimits,
    /// The largest policy text accepted, from the file, the API or the control plane.
    pub max_policy_bytes: usize,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Agents with series of their own on `/metrics`: the busiest N by packets judged.
    pub metrics_top_agents: usize,
    /// The hash-chained audit log.
    pub audit_log: PathBuf,
    /// Per-agent audit event budget.
    pub audit_rate: crate::node::audit::AuditRate,
    /// The budget of all agents together, and the summary window.
    pub audit_budget: crate::node::audit::GlobalBudget,
    /// Where policy comes from, when a control plane manages it (paths resolved).
    pub control_plane: Option<crate::controlplane::sync::SyncConfig>,
    /// Map capacities.
    pub limits: Limits,
    /// The agents' DNS resolver, when configured.
    pub dns: Option<crate::dns::DnsConfig>,
    /// The inspecting proxy, when the `[inspect]` section is present (paths resolved).
    pub inspect: Option<crate::inspect::InspectConfig>,
}

impl Config {
    /// The hook `interface` gets: its own in `[hooks]`, else `hook`.
    pub fn hook_of(&self, interface: &str) -> HookChoice {
        self.hooks.get(interface).copied().unwrap_or(self.hook)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        let l = &raw.limits;
        if l.max_agents == 0 || l.max_agents > enforcer_common::MAX_AGENT_ID {
            return Err(invalid(
                "limits.max_agents",
                format!(
                    "expected 1..={}, got {}",
                    enforcer_common::MAX_AGENT_ID,
                    l.max_agents
                ),
            ));
        }
        for (field, v) in [
            ("limits.max_interfaces", l.max_interfaces),
            ("limits.max_source_prefixes", l.max_source_prefixes),
            (
                "limits.max_destination_prefixes",
                l.max_destination_prefixes,
            ),
        ] {
            if v == 0 || v > (1 << 24) {
                return Err(invalid(field, format!("expected 1..={}, got {v}", 1 << 24)));
            }
        }
        // The kernel's rule for BPF_MAP_TYPE_RINGBUF sizes.
        let page = page_size();
        if !l.audit_ring_bytes.is_power_of_two() || l.audit_ring_bytes < page {
            return Err(invalid(
                "limits.audit_ring_bytes",
                format!(
                    "expected a power of two of at least the page size ({page}), got {}",
                    l.audit_ring_bytes
                ),
            ));
        }
        for name in &raw.interfaces {
            if name.is_empty() || name.len() > 15 {
                return Err(invalid(
                    "interfaces",
                    format!("{name:?} is not an interface name (1 to 15 bytes)"),
                ));
            }
        }
        let metrics_listen = match raw.metrics_listen.trim() {
            "" => None,
            addr => Some(addr.parse().map_err(|e| {
                invalid(
                    "metrics_listen",
                    format!("expected an address like 127.0.0.1:9464, got {addr:?}: {e}"),
                )
            })?),
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let state_dir = base.join(&raw.state_dir);
        let runtime_dir = base.join(&raw.runtime_dir);
        let inspect = match raw.inspect {
            Some(i) => {
                let listen = match i.listen.trim() {
                    "" => None,
                    addr => Some(addr.parse().map_err(|e| {
                        invalid(
                            "inspect.listen",
                            format!("expected an address like 0.0.0.0:3128, got {addr:?}: {e}"),
                        )
                    })?),
                };
                let transparent_port = (i.transparent_port != 0).then_some(i.transparent_port);
                if listen.is_none() && transparent_port.is_none() {
                    return Err(invalid(
                        "inspect",
                        "both listen and transparent_port are off; remove the section to \
                         disable the proxy"
                            .into(),
                    ));
                }
                for (field, value) in [
                    (
                        "inspect.max_connections_per_agent",
                        i.max_connections_per_agent,
                    ),
                    ("inspect.max_connections", i.max_connections),
                ] {
                    if value == 0 {
                        return Err(invalid(field, "expected at least 1, got 0".into()));
                    }
                }
                Some(crate::inspect::InspectConfig {
                    listen,
                    transparent_port,
                    upstream_roots: base.join(i.upstream_roots),
                    ca_dir: i.ca_dir.map_or_else(|| state_dir.clone(), |d| base.join(d)),
                    max_connections_per_agent: i.max_connections_per_agent,
                    max_connections: i.max_connections,
                    record_layer: i.record_layer,
                })
            }
            None => None,
        };
        let control_plane = match raw.control_plane {
            Some(mut cp) => {
                cp.resolve_paths(base);
                cp.validate().map_err(|e| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    field: "control_plane",
                    message: crate::error::error_chain(&e),
                })?;
                Some(cp)
            }
            None => None,
        };
        let dns = raw.dns.map(|d| validate_dns(d, &invalid)).transpose()?;
        let socket = raw
            .socket
            .map(|s| base.join(s))
            .unwrap_or_else(|| runtime_dir.join("enforcer.sock"));
        if raw.audit_summary_interval_secs == 0 {
            return Err(invalid(
                "audit_summary_interval_secs",
                "must be at least 1".into(),
            ));
        }
        if raw.api_max_connections == 0 {
            return Err(invalid("api_max_connections", "must be at least 1".into()));
        }
        if raw.api_idle_timeout_ms == 0 {
            return Err(invalid("api_idle_timeout_ms", "must be at least 1".into()));
        }
        let limits = Limits {
            max_agents: l.max_agents,
            max_interfaces: l.max_interfaces,
            max_source_prefixes: l.max_source_prefixes,
            max_destination_prefixes: l.max_destination_prefixes,
            audit_ring_bytes: l.audit_ring_bytes,
        };
        let max_policy_bytes = raw
            .max_policy_bytes
            .unwrap_or_else(|| default_max_policy_bytes(&limits));
        Ok(Config {
            dns,
            read_socket: raw
                .read_socket
                .map(|s| base.join(s))
                .unwrap_or_else(|| socket.with_file_name("enforcer-ro.sock")),
            read_socket_group: raw.read_socket_group,
            api: crate::node::api::ApiLimits {
                max_connections: raw.api_max_connections,
                idle_timeout: std::time::Duration::from_millis(raw.api_idle_timeout_ms),
                max_request_bytes: max_policy_bytes.saturating_mul(2).saturating_add(64 << 10),
            },
            max_policy_bytes,
            socket,
            socket_group: raw.socket_group,
            metrics_listen,
            metrics_top_agents: raw.metrics_top_agents,
            audit_log: base.join(&raw.audit_log),
            control_plane,
            audit_budget: crate::node::audit::GlobalBudget {
                events_per_sec: raw.audit_global_events_per_sec,
                interval: std::time::Duration::from_secs(raw.audit_summary_interval_secs),
            },
            audit_rate: crate::node::audit::AuditRate {
                events_per_sec: raw.audit_events_per_sec,
                burst: raw.audit_burst,
            },
            path: path.to_path_buf(),
            policy: base.join(&raw.policy),
            interfaces: raw.interfaces,
            bpffs: base.join(&raw.bpffs),
            state_dir,
            runtime_dir,
            hook: raw.hook,
            hooks: raw.hooks,
            xdp_mode: raw.xdp_mode,
            inspect,
            limits,
        })
    }
}

/// Checks the `[dns]` section: the data plane admits agents' DNS only to the exact listen
/// addresses, so a wildcard address there could never be reached.
fn validate_dns(
    raw: RawDns,
    invalid: &impl Fn(&'static str, String) -> ConfigError,
) -> Result<crate::dns::DnsConfig, ConfigError> {
    if raw.listen.is_empty() {
        return Err(invalid(
            "dns.listen",
            "expected at least one address".into(),
        ));
    }
    for addr in &raw.listen {
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(invalid(
                "dns.listen",
                format!("expected a specific address and port like 10.200.0.53:53, got {addr}"),
            ));
        }
    }
    if raw.upstreams.is_empty() {
        return Err(invalid(
            "dns.upstreams",
            "expected at least one address".into(),
        ));
    }
    for addr in &raw.upstreams {
        if addr.ip().is_unspecified() || addr.port() == 0 || raw.listen.contains(addr) {
            return Err(invalid(
                "dns.upstreams",
                format!("expected a specific address and port of another server, got {addr}"),
            ));
        }
    }
    if raw.max_ttl_secs == 0 || raw.max_ttl_secs > 86_400 {
        return Err(invalid(
            "dns.max_ttl_secs",
            format!("expected 1..=86400, got {}", raw.max_ttl_secs),
        ));
    }
    if raw.grace_secs > 3600 {
        return Err(invalid(
            "dns.grace_secs",
            format!("expected 0..=3600, got {}", raw.grace_secs),
        ));
    }
    if raw.max_learned_per_agent == 0 {
        return Err(invalid(
            "dns.max_learned_per_agent",
            "expected at least 1, got 0".into(),
        ));
    }
    Ok(crate::dns::DnsConfig {
        listen: raw.listen,
        upstreams: raw.upstreams,
        grace: std::time::Duration::from_secs(u64::from(raw.grace_secs)),
        max_ttl_secs: raw.max_ttl_secs,
        case_randomization: raw.case_randomization,
        max_learned_per_agent: raw.max_learned_per_agent,
    })
}

/// The system's page size (4096 when it cannot be read).
fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(
            Path::new("/etc/enforcer/enforcer.toml"),
            "policy = \"policy.toml\"\n",
        )
        .unwrap();
        assert_eq!(c.policy, PathBuf::from("/etc/enforcer/policy.toml"));
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/enforcer"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.xdp_mode, AttachMode::Auto);
    }

    #[test]
    fn unknown_field_names_line_and_column() {
        let err =
            Config::parse(Path::new("e.toml"), "policy = \"p\"\nxdp_mod = \"auto\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("e.toml:2:1: "), "{msg}");
        assert!(msg.contains("xdp_mod"), "{msg}");
    }

    #[test]
    fn bad_mode_and_limits_are_rejected() {
        let err = Config::parse(Path::new("e.toml"), "policy = \"p\"\nxdp_mode = \"fast\"\n")
            .unwrap_err();
        assert!(err.to_string().starts_with("e.toml:2:12: "), "{err}");
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[limits]\nmax_agents = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "e.toml: limits.max_agents: expected 1..=16777215, got 0"
        );
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[limits]\naudit_ring_bytes = 5000\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("e.toml: limits.audit_ring_bytes: expected a power of two"),
            "{err}"
        );
    }

    #[test]
    fn dns_section_defaults_and_checks() {
        let c = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[dns]\nlisten = [\"10.200.0.53:53\"]\nupstreams = [\"10.200.100.2:53\", \"[fd20::53]:53\"]\n",
        )
        .unwrap();
        let dns = c.dns.unwrap();
        assert_eq!(dns.listen, vec!["10.200.0.53:53".parse().unwrap()]);
        assert_eq!(dns.upstreams.len(), 2);
        assert_eq!(dns.grace, std::time::Duration::from_secs(5));
        assert_eq!(dns.max_ttl_secs, 3600);
        assert!(dns.case_randomization);
        assert_eq!(dns.max_learned_per_agent, 1024);
        let off = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[dns]\nlisten = [\"10.200.0.53:53\"]\nupstreams = [\"10.200.100.2:53\"]\ncase_randomization = false\n",
        )
        .unwrap();
        assert!(!off.dns.unwrap().case_randomization);
        assert_eq!(
            Config::parse(Path::new("e.toml"), "policy = \"p\"\n")
                .unwrap()
                .dns,
            None
        );
        for (body, expected) in [
            (
                "listen = [\"0.0.0.0:53\"]\nupstreams = [\"10.0.0.1:53\"]",
                "e.toml: dns.listen: expected a specific address and port like 10.200.0.53:53, got 0.0.0.0:53",
            ),
            (
                "listen = [\"10.0.0.2:53\"]\nupstreams = []",
                "e.toml: dns.upstreams: expected at least one address",
            ),
            (
                "listen = [\"10.0.0.2:53\"]\nupstreams = [\"10.0.0.2:53\"]",
                "e.toml: dns.upstreams: expected a specific address and port of another server, got 10.0.0.2:53",
            ),
            (
                "listen = [\"10.0.0.2:53\"]\nupstreams = [\"10.0.0.1:53\"]\nmax_ttl_secs = 0",
                "e.toml: dns.max_ttl_secs: expected 1..=86400, got 0",
            ),
            (
                "listen = [\"10.0.0.2:53\"]\nupstreams = [\"10.0.0.1:53\"]\nmax_learned_per_agent = 0",
                "e.toml: dns.max_learned_per_agent: expected at least 1, got 0",
            ),
        ] {
            let err = Config::parse(
                Path::new("e.toml"),
                &format!("policy = \"p\"\n[dns]\n{body}\n"),
            )
            .unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[dns]\nlisten = [\"10.0.0.2\"]\nupstreams = []\n",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("e.toml:3:"), "{err}");
    }

    /// What must survive a reboot goes under /var/lib by default, what describes this boot
    /// under /run; the socket follows the runtime directory.
    #[test]
    fn state_and_runtime_directories() {
        let c = Config::parse(Path::new("/etc/e/e.toml"), "policy = \"p\"\n").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/enforcer"));
        assert_eq!(c.runtime_dir, PathBuf::from("/run/enforcer"));
        assert_eq!(c.socket, PathBuf::from("/run/enforcer/enforcer.sock"));
        let c = Config::parse(
            Path::new("/etc/e/e.toml"),
            "policy = \"p\"\nstate_dir = \"keep\"\nruntime_dir = \"/run/x\"\n",
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/e/keep"));
        assert_eq!(c.socket, PathBuf::from("/run/x/enforcer.sock"));
    }

    #[test]
    fn inspect_section() {
        let c = Config::parse(Path::new("/etc/e/e.toml"), "policy = \"p\"\n").unwrap();
        assert_eq!(c.inspect, None);
        let c = Config::parse(
            Path::new("/etc/e/e.toml"),
            "policy = \"p\"\n[inspect]\nupstream_roots = \"roots.pem\"\n",
        )
        .unwrap();
        assert_eq!(
            c.inspect,
            Some(crate::inspect::InspectConfig {
                listen: Some("0.0.0.0:3128".parse().unwrap()),
                transparent_port: Some(3129),
                upstream_roots: PathBuf::from("/etc/e/roots.pem"),
                ca_dir: PathBuf::from("/var/lib/enforcer"),
                max_connections_per_agent: 256,
                max_connections: 4096,
                record_layer: crate::inspect::RecordLayer::Rustls,
            })
        );
        let c = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[inspect]\nrecord_layer = \"auto\"\n",
        )
        .unwrap();
        assert_eq!(
            c.inspect.unwrap().record_layer,
            crate::inspect::RecordLayer::Auto
        );
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[inspect]\nrecord_layer = \"kernel\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "e.toml:3:16: unknown variant `kernel`, expected one of `auto`, `ktls`, `rustls`"
        );
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[inspect]\nmax_connections_per_agent = 0\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("e.toml: inspect.max_connections_per_agent: expected at least 1"),
            "{err}"
        );
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[inspect]\nlisten = \"here\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("e.toml: inspect.listen: expected an address"),
            "{err}"
        );
        let err = Config::parse(
            Path::new("e.toml"),
            "policy = \"p\"\n[inspect]\nlisten = \"\"\ntransparent_port = 0\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("both listen and transparent_port are off")
        );
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
