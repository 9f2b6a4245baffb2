//! The policy document: a human-first TOML file that says which agents exist, how they are
//! recognised, how fast they may send and where they may send to.
//!
//! ```toml
//! [defaults]
//! unknown = "pass"          # traffic from no known agent: "pass" (default) or "drop"
//!
//! [[agents]]
//! id = 1                    # 1..=max_agents, unique; it is the agent's index in the maps
//! name = "coder"            # unique, [A-Za-z0-9_.-]{1,64}
//! interfaces = ["veth-coder"]         # host-side interfaces that identify the agent (optional)
//! prefixes = ["10.77.1.2/32", "fd77:1::2/128"]  # source prefixes that identify it (optional; a bare address means /32 or /128)
//! mode = "enforce"          # or "monitor" (would-drops counted, packets pass); default enforce
//! egress_default = "deny"   # destination matching no rule: "deny" (default) or "allow"
//! rate = { packets_per_sec = 1000, packets_burst = 100, bytes_per_sec = 1_000_000, bytes_burst = 100_000 }  # optional table, each limit optional; bursts default to max(rate/10, 1 packet) and max(bytes/10, 9000 bytes)
//!
//! [[agents.egress]]
//! action = "allow"          # or "deny", or "reject" (a drop answered with a TCP RST or an ICMP unreachable, so the agent's call fails at once)
//! to = ["10.77.2.0/24", "@metadata"]   # CIDRs, bare addresses, or @presets
//! proto = "tcp"             # "tcp" | "udp" | "icmp" | "any" (default any)
//! ports = "443"             # "443", "8000-8100", an integer, or omitted = all ports; an error with proto icmp
//! ```
//!
//! The inspecting proxy ([`crate::inspect`]) adds detectors, literal markers or regular
//! expressions searched in the plaintext of inspected agents' TLS connections, a catalogue
//! of well-known secret formats ([`crate::inspect::catalogue`]) and a per-agent switch:
//!
//! ```toml
//! [[detectors]]
//! name = "openai-key"       # unique, [A-Za-z0-9_.-]{1,64}; names it in audit records and metrics
//! literal = "sk-live-"      # 1 to 64 bytes, matched exactly (case-sensitive); or instead:
//! # regex = '\bAKIA[0-9A-Z]{16}\b'  # bytes, not Unicode ((?i) is ASCII-only); needs a literal
//! #                         # start and a bounded length (at most 8192 bytes): `{20,400}`, not `+`
//! action = "block"          # "block": close the connection before the marker passes; "flag": audit, let it pass
//! direction = "both"        # "up" (agent to server), "down" (server to agent) or "both" (default)
//!
//! [dlp]
//! catalogue = "block"       # the shipped secret formats: "off" (default), "flag" or "block"
//! catalogue_except = ["bearer"]  # catalogue entries to leave out (names must exist)
//!
//! [[agents]]
//! inspect = true            # route this agent's TLS through the inspecting proxy (default false)
//! ```
//!
//! An agent needs at least one interface or source prefix. Destination presets are listed in
//! [`PRESETS`].
//!
//! Sandboxes that come and go get a *profile* instead of one agent entry each: every
//! interface matching one of its patterns becomes an agent instance of its own, with an id
//! the daemon allocates and the name `<profile>/<interface>` (see
//! [`crate::node::instances`]). Runtimes that name sandboxes themselves attach a profile
//! with `enforcer agent add --profile`, which is why its pattern list may be empty.
//!
//! ```toml
//! [[profiles]]
//! name = "coder"            # unique among profiles and agents, [A-Za-z0-9_.-]{1,64}
//! interfaces = ["agt-coder-*", "fc-tap?"]   # patterns of 1 to 15 bytes: '*' any run, '?' one byte (optional)
//! mode = "monitor"          # mode, egress_default, rate, egress, inspect and guards as for agents
//! egress = [ { action = "allow", to = ["@private"], proto = "udp", ports = 53 } ]
//! ```
//!
//! A profile has no `id` or `prefixes`: each instance gets its own id, and an instance added
//! by hand its own prefixes. An interface a static agent names stays that agent's even when
//! a pattern matches it.
//!
//! Guards against a runaway agent: a new-connection rate, quotas over hours and days, a
//! circuit breaker that stops an agent whose packets keep being dropped, and limits shared by
//! every agent that reaches one destination group. Agents and profiles take the same tables
//! (a profile's instances inherit them):
//!
//! ```toml
//! [[shared]]
//! name = "llm-api"          # unique, [A-Za-z0-9_.-]{1,64}; at most 1023 groups
//! rate = { packets_per_sec = 5000, bytes_per_sec = 50_000_000 }  # as an agent's rate
//! connections = { per_sec = 100, burst = 200 }                   # new TCP connections; at least one of rate and connections
//!
//! [[agents]]
//! id = 2
//! name = "runner"
//! interfaces = ["veth-runner"]
//! connections = { per_sec = 10, burst = 20 }   # new TCP connections (SYN without ACK); burst defaults to max(per_sec/10, 1)
//! quota = { bytes_per_hour = 1_000_000_000, connections_per_day = 10_000 }  # also bytes_per_day, connections_per_hour; each optional, hours on the wall clock, days in UTC
//! breaker = { drops = 50, within_secs = 10, cooldown_secs = 30, action = "reject" }
//! # The 51st drop within 10 s opens the breaker: all the agent's traffic is refused for the
//! # cooldown ("drop", the default, or "reject"), then new connections pass at probe_per_sec
//! # (default 1, probe_burst 1) until calm_secs (default cooldown_secs) pass without a drop;
//! # a drop while half-open reopens it with twice the cooldown, up to max_cooldown_secs
//! # (default max(600, cooldown_secs)). Every duration is 1 to 86400 seconds.
//!
//! [[agents.egress]]
//! action = "allow"
//! to = ["api.example.com"]
//! proto = "tcp"
//! ports = 443
//! shared = "llm-api"        # charge the group's shared limit (allow rules only)
//!
//! [[agents.egress]]
//! action = "allow"
//! to = ["10.0.0.53"]
//! proto = "udp"
//! ports = 53
//! always = true             # passes an open breaker (the resolver, a control channel; allow rules only)
//! ```
//!
//! Parsing happens in two passes. Serde reads the document into raw types that keep every
//! field's byte span ([`toml::Spanned`]) and reject unknown fields, so a typo is an error
//! rather than a silently ignored rule. Then a validation pass checks everything serde cannot
//! (ranges, CIDR syntax, uniqueness across agents) and collects *all* problems, each with
//! `file:line:column: field: message`, so an operator fixes a file in one round trip. The
//! result is a [`Policy`], which only this module can construct: whoever holds one holds a
//! validated policy.

use std::{
    collections::HashMap,
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use enforcer_common::{
    MAX_AGENT_ID,
    guard::{MAX_SHARED_GROUPS, QUOTA_MAX},
};
use serde::{Deserialize, Deserializer, de};
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

/// A destination preset usable in `to` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// Its name, with its `@`.
    pub name: &'static str,
    /// The prefixes it stands for.
    pub prefixes: &'static [&'static str],
    /// What it covers, for `enforcer policy presets`.
    pub description: &'static str,
}

/// Every destination preset. Public so the CLI can list them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "@rfc1918",
        prefixes: &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        description: "IPv4 private networks (RFC 1918)",
    },
    Preset {
        name: "@ula",
        prefixes: &["fc00::/7"],
        description: "IPv6 unique local addresses (RFC 4193)",
    },
    Preset {
        name: "@link-local",
        prefixes: &["169.254.0.0/16", "fe80::/10"],
        description: "link-local addresses, where most clouds' metadata services answer",
    },
    Preset {
        name: "@shared",
        prefixes: &["100.64.0.0/10"],
        description: "RFC 6598 shared address space (carrier-grade NAT); some clouds run \
                      metadata and internal services there (Alibaba Cloud 100.100.100.200)",
    },
    Preset {
        name: "@private",
        prefixes: &[
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
            "169.254.0.0/16",
            "fe80::/10",
            "100.64.0.0/10",
        ],
        description: "every non-public range above: @rfc1918, @ula, @link-local and @shared \
                      (RFC 6598 100.64.0.0/10, included since some clouds' metadata \
                      services live there)",
    },
    Preset {
        name: "@metadata",
        // AWS/GCP/Azure IMDS, AWS ECS task metadata, Alibaba Cloud, AWS IMDS over IPv6.
        prefixes: &[
            "169.254.169.254/32",
            "169.254.170.2/32",
            "100.100.100.200/32",
            "fd00:ec2::254/128",
        ],
        description: "cloud instance metadata services: AWS, GCP and Azure IMDS, AWS ECS task \
                      metadata, Alibaba Cloud, AWS IMDS over IPv6",
    },
    Preset {
        name: "@loopback",
        prefixes: &["127.0.0.0/8", "::1/128"],
        description: "loopback addresses",
    },
    Preset {
        name: "@any",
        prefixes: &["0.0.0.0/0", "::/0"],
        description: "every address",
    },
];

/// Highest `packets_per_sec`: the per-packet cost in rate-limiter time units must stay
/// well above 1 for the integer division to be accurate.
pub const MAX_PACKETS_PER_SEC: u64 = 1_000_000_000;

/// Highest `bytes_per_sec` (8 Tbit/s, beyond any NIC).
pub const MAX_BYTES_PER_SEC: u64 = 1_000_000_000_000;

/// Smallest `bytes_burst`: one full-size Ethernet frame (1500 bytes of payload, 14 of
/// header, 4 of VLAN tag). With less, the bytes limiter could never admit such a frame.
pub const MIN_BYTES_BURST: u64 = 1518;

/// Floor of the default `bytes_burst`: room for a jumbo frame, so a low byte rate alone does
/// not make large packets impossible.
pub const DEFAULT_MIN_BYTES_BURST: u64 = 9000;

/// Longest interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
const MAX_IFNAME_LEN: usize = 15;

/// Longest agent name.
const MAX_NAME_LEN: usize = 64;

/// `defaults.tls_ports` when the document does not set it.
pub const DEFAULT_TLS_PORTS: [u16; 1] = [443];

/// Most TLS ports a policy may name (the XDP program compares each).
pub const MAX_TLS_PORTS: usize = enforcer_common::MAX_TLS_PORTS;

/// A validated policy. Only [`parse`] and [`load`] make one, so its invariants hold: agent
/// ids and names are unique and in range, no interface or source prefix belongs to two
/// agents, every agent has an identity, rates are in range with bursts resolved, and profile
/// names are unique and distinct from agent names. [`Policy::set_instances`] adds agents whose
/// uniqueness its caller vouches for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    unknown: UnknownTraffic,
    tls_ports: Vec<u16>,
    /// The document's agents, then the instances of its profiles (see
    /// [`Policy::set_instances`]).
    agents: Vec<Agent>,
    /// How many of `agents` the document itself names.
    own: usize,
    profiles: Vec<Profile>,
    detectors: Vec<Detector>,
    dlp: Dlp,
    shared: Vec<SharedGroup>,
    mcp_servers: Vec<McpServer>,
}

impl Policy {
    /// The destination groups with a shared limit, in document order: group id `1 + index`.
    pub fn shared(&self) -> &[SharedGroup] {
        &self.shared
    }

    /// The id of the shared group called `name` (`1 + its index`; 0 is no group).
    pub fn shared_group(&self, name: &str) -> Option<u16> {
        self.shared
            .iter()
            .position(|g| g.name == name)
            // Fewer than MAX_SHARED_GROUPS groups, so the id fits.
            .map(|i| i as u16 + 1)
    }

    /// What happens to traffic from no known agent.
    pub fn unknown(&self) -> UnknownTraffic {
        self.unknown
    }

    /// The agents, in document order.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// The profiles, in document order; names are unique and no agent has one.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// The profile called `name`.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.name == name)
    }

    /// The profile whose instance a sandbox interface becomes: the first in document order
    /// with a pattern matching `interface`. None when a static agent names the interface:
    /// static agents win over patterns, so an operator can single out one sandbox of a
    /// family (`agt-coder-7` as an agent of its own beside `agt-coder-*`) without an error.
    pub fn profile_for(&self, interface: &str) -> Option<&Profile> {
        // The document's agents only: an instance's own interface still matches its profile.
        if self
            .own_agents()
            .iter()
            .any(|a| a.interfaces.iter().any(|i| i == interface))
        {
            return None;
        }
        self.profiles.iter().find(|p| p.matches(interface))
    }

    /// Puts `instances` (agents made from this policy's profiles) after the document's own
    /// agents, in place of the ones there: the daemon keeps one policy and changes only
    /// its instances as sandboxes come and go. Callers guarantee distinct ids and names.
    pub fn set_instances(&mut self, instances: impl IntoIterator<Item = Agent>) {
        self.agents.truncate(self.own);
        self.agents.extend(instances);
    }

    /// The agents the document itself names, without instances.
    pub fn own_agents(&self) -> &[Agent] {
        &self.agents[..self.own]
    }

    /// A copy with `extra` appended to the agents: the static agents plus the daemon's
    /// agent instances, which is what the data plane is compiled from. The invariants are
    /// the caller's to keep: `extra` must have ids, names, interfaces and source prefixes no
    /// other agent has (the instance table checks them when it makes instances).
    pub fn with_agents(&self, extra: impl IntoIterator<Item = Agent>) -> Policy {
        let mut policy = self.clone();
        policy.agents.extend(extra);
        debug_assert!(
            {
                let mut ids = std::collections::HashSet::new();
                let mut names = std::collections::HashSet::new();
                policy
                    .agents
                    .iter()
                    .all(|a| ids.insert(a.id) && names.insert(a.name.as_str()))
            },
            "with_agents was given an agent whose id or name is taken"
        );
        policy
    }

    /// The inspecting proxy's detectors, in document order; names are unique.
    pub fn detectors(&self) -> &[Detector] {
        &self.detectors
    }

    /// The `[dlp]` section: which catalogue entries the inspecting proxy adds.
    pub fn dlp(&self) -> &Dlp {
        &self.dlp
    }

    /// TCP ports whose connections to name-admitted addresses must open with a TLS
    /// ClientHello naming an allowed host (`defaults.tls_ports`).
    pub fn tls_ports(&self) -> &[u16] {
        &self.tls_ports
    }

    /// The agent whose sandbox interface is `ifname`.
    pub fn agent_by_interface(&self, ifname: &str) -> Option<&Agent> {
        self.agents
            .iter()
            .find(|a| a.interfaces.iter().any(|i| i == ifname))
    }

    /// The agent a packet from `src` belongs to by source address: the longest of the
    /// agents' source prefixes containing it (an exact host is the longest), as the XDP
    /// program decides after the interface.
    pub fn agent_by_source(&self, src: IpAddr) -> Option<&Agent> {
        self.agents
            .iter()
            .flat_map(|a| a.sources.iter().map(move |net| (net, a)))
            .filter(|(net, _)| net.contains(&IpNet::host(src)))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, a)| a)
    }

    /// Sets the mode of agent `id` (an operator's runtime override); false if there is no
    /// such agent. The mode is not part of any invariant, so the policy stays valid.
    pub fn set_mode(&mut self, id: u32, mode: Mode) -> bool {
        match self.agents.iter_mut().find(|a| a.id == id) {
            Some(agent) => {
                agent.mode = mode;
                true
            }
            None => false,
        }
    }
}

/// One agent of a [`Policy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    /// Agent id, `1..=MAX_AGENT_ID`; its index in the agent maps.
    pub id: u32,
    /// Unique name, for messages, metrics and the CLI.
    pub name: String,
    /// Host-side interfaces whose traffic is this agent's.
    pub interfaces: Vec<String>,
    /// Source prefixes whose traffic is this agent's.
    pub sources: Vec<IpNet>,
    /// Enforce or only count.
    pub mode: Mode,
    /// Verdict for destinations that no rule matches.
    pub egress_default: EgressDefault,
    /// Rate limits, with bursts resolved.
    pub rate: Rate,
    /// Egress rules, in document order.
    pub egress: Vec<EgressRule>,
    /// Whether the agent's TLS goes through the inspecting proxy.
    pub inspect: bool,
    /// Connection rate, quotas and circuit breaker.
    pub guards: Guards,
    /// The MCP gate (`[agents.mcp]`); `None`: MCP passes ungated (still audited).
    pub mcp: Option<AgentMcp>,
}

/// A template for agents that come and go (`[[profiles]]`): every sandbox interface
/// matching one of its patterns, or named by `enforcer agent add`, becomes an agent
/// instance with the profile's mode, limits and rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Unique name among profiles and agents; without `/`, which separates it from the
    /// interface in instance names.
    pub name: String,
    /// Interface name patterns (`*` any run of bytes, `?` one byte), in document order.
    pub patterns: Vec<String>,
    /// Enforce or only count.
    pub mode: Mode,
    /// Verdict for destinations that no rule matches.
    pub egress_default: EgressDefault,
    /// Rate limits of each instance, with bursts resolved.
    pub rate: Rate,
    /// Egress rules, in document order.
    pub egress: Vec<EgressRule>,
    /// Whether the instances' TLS goes through the inspecting proxy.
    pub inspect: bool,
    /// Connection rate, quotas and circuit breaker of each instance.
    pub guards: Guards,
    /// The MCP gate of each instance (`[profiles.mcp]`).
    pub mcp: Option<AgentMcp>,
}

impl Profile {
    /// Whether one of the patterns matches `interface`.
    pub fn matches(&self, interface: &str) -> bool {
        self.patterns.iter().any(|p| glob_match(p, interface))
    }

    /// The agent that instance `id` of this profile on `interface` is: named
    /// `<profile>/<interface>`, identified by the interface and the source `prefixes`, with
    /// everything else from the profile. A `/` cannot occur in an agent's or a profile's
    /// name, so an instance's name is never an agent's.
    pub fn instance(&self, id: u32, interface: &str, prefixes: &[IpNet]) -> Agent {
        Agent {
            id,
            name: format!("{}/{interface}", self.name),
            interfaces: vec![interface.to_owned()],
            sources: prefixes.to_vec(),
            mode: self.mode,
            egress_default: self.egress_default,
            rate: self.rate,
            egress: self.egress.clone(),
            inspect: self.inspect,
            guards: self.guards,
            mcp: self.mcp.clone(),
        }
    }
}

/// Whether `name` matches the shell-style `pattern`, byte by byte: `*` matches any run of
/// bytes (the empty one too), `?` exactly one, every other byte itself, and the whole name
/// must match. Iterative, backtracking only to the last `*`, so a pattern full of stars
/// costs at most `pattern.len() * name.len()` steps and no stack.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // The last star seen and the name position it is matched up to, to resume from when a
    // later byte fails: letting that star eat one more byte is the only other choice.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == b'?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    pi = sp + 1;
                    ni = sn + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Most detectors a policy may have: every one is searched in every byte of inspected
/// traffic, and the kTLS path's BPF program has a fixed-size table of them.
pub const MAX_DETECTORS: usize = 64;

/// Longest detector literal, in bytes: the scanner re-reads this much of each read's end.
/// Also the longest literal start taken from a regex (longer ones are cut, which only makes
/// the start less exact).
pub const MAX_LITERAL_LEN: usize = 64;

/// Longest match a regex detector may have, in bytes: a partial match is held back from the
/// other side while it may still complete, so this bounds what one connection holds.
pub const MAX_REGEX_LEN: usize = 8192;

/// Most literal starts a regex detector may have (each is an entry of the anchor search).
pub const MAX_REGEX_STARTS: usize = 256;

/// A marker the inspecting proxy looks for (`[[detectors]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detector {
    /// Unique name, for audit records and metrics.
    pub name: String,
    /// What to look for.
    pub pattern: DetectorPattern,
    /// What a hit does.
    pub action: DetectorAction,
    /// Which way of the connection it is searched in.
    pub direction: DetectorDirection,
}

/// A detector's marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectorPattern {
    /// The bytes to find (the TOML string's UTF-8 encoding), 1 to [`MAX_LITERAL_LEN`].
    Literal(String),
    /// A regular expression over bytes, checked by [`regex_shape`].
    Regex(String),
}

/// Which way of a connection a detector is searched in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorDirection {
    /// From the agent to the server.
    Up,
    /// From the server to the agent.
    Down,
    /// Both ways (what every detector did before directions existed).
    #[default]
    Both,
}

impl DetectorDirection {
    /// Whether bytes going up (`true`) or down (`false`) are searched.
    pub const fn covers(self, up: bool) -> bool {
        match self {
            DetectorDirection::Up => up,
            DetectorDirection::Down => !up,
            DetectorDirection::Both => true,
        }
    }
}

/// The `[dlp]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dlp {
    /// What the catalogue's entries do.
    pub catalogue: CatalogueMode,
    /// Catalogue entries left out, by name (each exists in the catalogue).
    pub catalogue_except: Vec<String>,
}

/// What the shipped catalogue of secret formats does (`[dlp] catalogue`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogueMode {
    /// Not searched. The default, so that an upgrade never starts blocking by itself.
    #[default]
    Off,
    /// Every entry flags.
    Flag,
    /// Every entry blocks, except those whose own default is to flag (`bearer`: agents
    /// legitimately send bearer tokens to their own APIs).
    Block,
}

/// What a regex detector compiles to: the literals every match starts with, and the
/// longest match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegexShape {
    /// Every match starts with one of these (each 1 to [`MAX_LITERAL_LEN`] bytes).
    pub starts: Vec<Vec<u8>>,
    /// The longest match, in bytes (at most [`MAX_REGEX_LEN`]).
    pub max_len: usize,
}

/// The syntax a regex detector is parsed with: bytes, not Unicode (so `(?i)` is ASCII-only
/// and needs no Unicode tables, `.` is any byte but `\n`, and `\b` is an ASCII word
/// boundary, which the streaming DFA supports).
pub fn regex_syntax_config() -> regex_syntax::ParserBuilder {
    let mut builder = regex_syntax::ParserBuilder::new();
    builder.unicode(false).utf8(false);
    builder
}

/// Checks that `pattern` can be searched in a stream: it parses, every match starts with
/// one of a few literals (the anchor search finds where a match may begin), and matches
/// are bounded (so a partial match is held back for a bounded number of bytes). The error
/// is the message for the policy's `regex` field.
pub fn regex_shape(pattern: &str) -> Result<RegexShape, String> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};

    let hir = regex_syntax_config()
        .build()
        .parse(pattern)
        .map_err(|e| match e {
            regex_syntax::Error::Parse(e) => {
                format!(
                    "at byte {} of the regex: {}",
                    e.span().start.offset,
                    e.kind()
                )
            }
            regex_syntax::Error::Translate(e) => {
                format!(
                    "at byte {} of the regex: {}",
                    e.span().start.offset,
                    e.kind()
                )
            }
            e => e.to_string(),
        })?;
    let unbounded = || {
        "a regex detector needs a literal start such as `AKIA` and a bounded length: \
         write `{20,400}`, not `+`"
            .to_string()
    };
    let seq = Extractor::new()
        .kind(ExtractKind::Prefix)
        .limit_literal_len(MAX_LITERAL_LEN)
        .extract(&hir);
    let starts: Vec<Vec<u8>> = match seq.literals() {
        Some(lits) if !lits.is_empty() && lits.len() <= MAX_REGEX_STARTS => {
            lits.iter().map(|l| l.as_bytes().to_vec()).collect()
        }
        Some([]) => return Err("the regex can never match".into()),
        _ => return Err(unbounded()),
    };
    if starts.iter().any(Vec::is_empty) {
        return Err(unbounded());
    }
    match hir.properties().maximum_len() {
        Some(n) if n <= MAX_REGEX_LEN => Ok(RegexShape { starts, max_len: n }),
        Some(n) => Err(format!(
            "a regex detector's matches may be at most {MAX_REGEX_LEN} bytes long, this one's \
             up to {n}"
        )),
        None => Err(unbounded()),
    }
}

/// What a detector hit does to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorAction {
    /// Close both sides before the marker reaches the other one.
    Block,
    /// Let it through; count and audit it.
    Flag,
}

impl DetectorAction {
    /// The name used in metrics and audit reasons.
    pub const fn name(self) -> &'static str {
        match self {
            DetectorAction::Block => "block",
            DetectorAction::Flag => "flag",
        }
    }
}

impl Agent {
    /// Whether any allow rule names a host: the agent's DNS goes only to the enforcer's
    /// resolver, and its connections to name-admitted addresses are SNI-checked.
    pub fn has_names(&self) -> bool {
        self.egress
            .iter()
            .any(|r| r.to.iter().any(|d| matches!(d, Destination::Name(_))))
    }

    /// Protocol and ports of every rule with a pattern matching `name` (normalized, see
    /// [`normalize_name`]), in document order; empty when the name is not allowed.
    pub fn name_rules(&self, name: &str) -> Vec<(Proto, PortRange)> {
        let mut rules = Vec::new();
        for r in &self.egress {
            let hit =
                r.to.iter()
                    .any(|d| matches!(d, Destination::Name(p) if p.matches(name)));
            if hit && !rules.contains(&(r.proto, r.ports)) {
                rules.push((r.proto, r.ports));
            }
        }
        rules
    }

    /// Whether `name` (normalized) is allowed for `proto` to `port`.
    pub fn allows_name(&self, name: &str, proto: Proto, port: u16) -> bool {
        self.name_rules(name).iter().any(|(p, ports)| {
            (*p == Proto::Any || *p == proto) && (ports.lo..=ports.hi).contains(&port)
        })
    }
}

/// What happens to traffic from no known agent (`defaults.unknown`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTraffic {
    /// Let it through (the default: the enforcer only constrains the agents it knows).
    #[default]
    Pass,
    /// Drop it.
    Drop,
}

/// An agent's enforcement mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drops are carried out.
    #[default]
    Enforce,
    /// Would-drops are counted and the packet passes, to try a policy before enforcing it.
    Monitor,
}

/// Verdict for a destination that matches no rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    /// Deny (the default: an allow-list).
    #[default]
    Deny,
    /// Allow (a deny-list).
    Allow,
}

/// What an egress rule does to the traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
    /// Drop it and answer the sender (a TCP RST, else an ICMP administratively-prohibited
    /// error, within a per-agent reply budget), so its call fails at once instead of
    /// timing out. Otherwise a deny.
    Reject,
}

impl Action {
    /// Whether the rule drops what it matches (deny or reject).
    pub fn drops(self) -> bool {
        matches!(self, Action::Deny | Action::Reject)
    }
}

/// Transport protocol an egress rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// Every protocol.
    #[default]
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP for IPv4 destinations, ICMPv6 for IPv6 ones.
    Icmp,
}

impl Proto {
    /// The name used in the policy document.
    pub const fn name(self) -> &'static str {
        match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        }
    }
}

/// An agent's rate limits. `None` means no limit of that kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Packets per second and burst in packets.
    pub packets: Option<Limit>,
    /// Bytes per second and burst in bytes.
    pub bytes: Option<Limit>,
}

/// One rate limit: a sustained rate and the burst allowed above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Sustained rate per second, at least 1.
    pub per_sec: u64,
    /// Burst, in the same unit (packets or bytes).
    pub burst: u64,
}

/// One egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EgressRule {
    /// Allow or deny.
    pub action: Action,
    /// Destinations the rule covers, in document order.
    pub to: Vec<Destination>,
    /// Protocol the rule matches.
    pub proto: Proto,
    /// Destination ports the rule matches; [`PortRange::ALL`] when the document omits them.
    pub ports: PortRange,
    /// The [`SharedGroup`] whose limit the rule's packets charge (allow rules only).
    pub shared: Option<String>,
    /// The rule's packets pass an open circuit breaker (the resolver, a control channel).
    pub always: bool,
}

/// An agent's guards against running away (`connections`, `quota`, `breaker`), the same for
/// agents and profiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Guards {
    /// New TCP connections (SYN without ACK) per second and burst.
    pub connections: Option<Limit>,
    /// Quotas per hour and per day.
    pub quota: Quota,
    /// The circuit breaker.
    pub breaker: Option<Breaker>,
}

impl Guards {
    /// Whether no guard is set.
    pub fn is_empty(&self) -> bool {
        self.connections.is_none() && self.quota.is_empty() && self.breaker.is_none()
    }
}

/// Quotas over wall-clock hours and UTC days; each `None` (no quota) or `1..=QUOTA_MAX`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Quota {
    /// Bytes per hour.
    pub bytes_per_hour: Option<u64>,
    /// Bytes per UTC day.
    pub bytes_per_day: Option<u64>,
    /// New connections per hour.
    pub connections_per_hour: Option<u64>,
    /// New connections per UTC day.
    pub connections_per_day: Option<u64>,
}

impl Quota {
    /// Whether no quota is set.
    pub fn is_empty(&self) -> bool {
        self.by_kind().iter().all(Option::is_none)
    }

    /// The quotas by `enforcer_common::guard::QUOTA_*` index (the order of `QUOTA_NAMES`).
    pub fn by_kind(&self) -> [Option<u64>; enforcer_common::guard::QUOTAS] {
        [
            self.bytes_per_hour,
            self.bytes_per_day,
            self.connections_per_hour,
            self.connections_per_day,
        ]
    }
}

/// Most drops a breaker may count within its window.
pub const MAX_BREAKER_DROPS: u64 = 1_000_000;

/// Longest breaker duration (window, cooldowns, calm), in seconds: a day.
pub const MAX_BREAKER_SECS: u64 = 86_400;

/// The circuit breaker: `drops` drops within `within_secs` open it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Breaker {
    /// Drops (or would-drops) tolerated within the window; the next one opens the breaker.
    pub drops: u64,
    /// The window, in seconds.
    pub within_secs: u64,
    /// How long the first opening lasts, in seconds.
    pub cooldown_secs: u64,
    /// The longest cooldown, in seconds: each reopening from half-open doubles it up to this.
    pub max_cooldown_secs: u64,
    /// New connections per second and burst while half-open.
    pub probe: Limit,
    /// Half-open closes after this many seconds without a drop.
    pub calm_secs: u64,
    /// What an open breaker does to a packet.
    pub action: BreakerAction,
}

/// What an open breaker does to the packets it refuses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BreakerAction {
    /// Drop them.
    #[default]
    Drop,
    /// Answer them: TCP RST, ICMP administratively prohibited.
    Reject,
}

/// A destination group with a limit shared by every agent whose rule names it (`[[shared]]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SharedGroup {
    /// Unique name, which rules use.
    pub name: String,
    /// Packets and bytes per second of the group, bursts resolved.
    pub rate: Rate,
    /// New TCP connections per second of the group.
    pub connections: Option<Limit>,
}

/// One entry of a rule's `to` list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A CIDR or bare address.
    Net(IpNet),
    /// A host name or `*.` wildcard (allow rules only): its addresses are learned from the
    /// enforcer's DNS resolver, and TLS connections to them must name it.
    Name(NamePattern),
    /// A preset from [`PRESETS`], already expanded.
    Preset {
        /// The preset's name, with its `@`.
        name: &'static str,
        /// The prefixes it stands for.
        nets: Vec<IpNet>,
    },
}

impl Destination {
    /// The prefixes this destination stands for.
    pub fn nets(&self) -> &[IpNet] {
        match self {
            Destination::Net(net) => std::slice::from_ref(net),
            Destination::Preset { nets, .. } => nets,
            Destination::Name(_) => &[],
        }
    }
}

/// A host-name pattern of an allow rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    /// Exactly this name (normalized: lower case, no trailing dot).
    Exact(String),
    /// Every name ending in this suffix, which keeps its leading dot: `*.example.com` is
    /// `.example.com` and matches `a.example.com` and `a.b.example.com`, not `example.com`.
    Wildcard(String),
}

impl NamePattern {
    /// Whether the normalized `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Wildcard(suffix) => {
                name.len() > suffix.len() && name.ends_with(suffix.as_str())
            }
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// Longest host name (RFC 1035, without the trailing dot).
pub const MAX_HOST_NAME_LEN: usize = 253;

/// Why a host name is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than [`MAX_HOST_NAME_LEN`].
    #[error("a host name has 1 to {MAX_HOST_NAME_LEN} characters, got {len}")]
    Length {
        /// Its length.
        len: usize,
    },
    /// A label is empty or longer than 63.
    #[error("label {index} of \"{name}\" has {len} characters; labels have 1 to 63")]
    Label {
        /// The name.
        name: String,
        /// Label number, from 0.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// A character outside letters, digits, `-` and `_`.
    #[error("\"{name}\" has {ch:?}; host names use letters, digits, '-', '_' and '.'")]
    Char {
        /// The name.
        name: String,
        /// The offending character.
        ch: char,
    },
}

/// `name` in the form patterns are compared in: ASCII lower case, one trailing dot
/// removed; checked to be a host name (labels of 1 to 63 letters, digits, `-` or `_`).
pub fn normalize_name(name: &str) -> Result<String, NameError> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() || name.len() > MAX_HOST_NAME_LEN {
        return Err(NameError::Length { len: name.len() });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::Char { name, ch });
    }
    if let Some((index, label)) = name
        .split('.')
        .enumerate()
        .find(|(_, l)| l.is_empty() || l.len() > 63)
    {
        let len = label.len();
        return Err(NameError::Label { name, index, len });
    }
    Ok(name)
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Net(net) => net.fmt(f),
            Destination::Preset { name, .. } => f.write_str(name),
            Destination::Name(pattern) => pattern.fmt(f),
        }
    }
}

/// An inclusive range of destination ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Lowest port.
    pub lo: u16,
    /// Highest port, at least `lo`.
    pub hi: u16,
}

impl PortRange {
    /// Every port; also matches packets that have no ports (ICMP, non-first fragments).
    pub const ALL: PortRange = PortRange {
        lo: 0,
        hi: u16::MAX,
    };
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// An IPv4 or IPv6 prefix with its host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    len: u8,
}

impl IpNet {
    /// The prefix `addr/len`; an error if `len` is longer than the address or `addr` has
    /// bits set beyond `len`.
    pub fn new(addr: IpAddr, len: u8) -> Result<IpNet, NetError> {
        let max = max_len(addr);
        if len > max {
            return Err(NetError::TooLong { len, max });
        }
        let net = IpNet {
            addr: mask(addr, len),
            len,
        };
        if net.addr != addr {
            return Err(NetError::HostBits {
                given: format!("{addr}/{len}"),
                network: net,
            });
        }
        Ok(net)
    }

    /// The host route for `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> IpNet {
        IpNet {
            addr,
            len: max_len(addr),
        }
    }

    /// Network address, host bits zero.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether this is a single address (/32 or /128).
    pub fn is_host(&self) -> bool {
        self.len == max_len(self.addr)
    }

    /// Whether every address of `other` is in this prefix (same family only).
    pub fn contains(&self, other: &IpNet) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && self.len <= other.len
            && mask(other.addr, self.len) == self.addr
    }
}

/// Written as its text form (`10.0.0.0/8`), as in the policy, for files the daemon keeps.
impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from its text form, with [`IpNet::from_str`]'s checks.
impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IpNet, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(de::Error::custom)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after the first `len` cleared. `len` is at most the address width.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            // checked_shl: a shift by the full width (len 0) is an overflow, and means "no bits".
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpNet {
    type Err = NetError;

    /// `addr/len`, or a bare address meaning a host route.
    fn from_str(s: &str) -> Result<IpNet, NetError> {
        let syntax = || NetError::Syntax {
            given: s.to_owned(),
        };
        match s.split_once('/') {
            None => s.parse().map(IpNet::host).map_err(|_| syntax()),
            Some((addr, len)) => {
                let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
                // u8::from_str accepts a leading '+'; a prefix length is plain digits.
                if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                let len: u8 = len.parse().map_err(|_| NetError::TooLong {
                    len: u8::MAX,
                    max: max_len(addr),
                })?;
                IpNet::new(addr, len)
            }
        }
    }
}

/// Why a string is not a valid [`IpNet`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Not an address or `address/length` at all.
    #[error("expected an IP address or CIDR like \"10.0.0.0/8\" or \"fd00::/8\", got \"{given}\"")]
    Syntax {
        /// The text given.
        given: String,
    },
    /// The prefix length is longer than the address.
    #[error("prefix length {len} is longer than the {max} bits of the address")]
    TooLong {
        /// The length given (255 if it did not even fit a byte).
        len: u8,
        /// Bits in the address.
        max: u8,
    },
    /// Bits are set after the prefix length, which usually means a mistyped prefix.
    #[error("{given} has host bits set; did you mean {network}?")]
    HostBits {
        /// The prefix given.
        given: String,
        /// The prefix with its host bits cleared.
        network: IpNet,
    },
}

/// Where in a policy file something is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// The file (or other origin) the policy came from.
    pub origin: String,
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.origin, self.line, self.column)
    }
}

/// One problem in a policy document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Issue {
    /// Where it is.
    pub location: Location,
    /// Path of the field, like `agents[1].egress[0].ports`; empty for the document itself.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.field, self.message)
        }
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("reading policy file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not text: a policy is TOML, which is UTF-8.
    #[error("{location}: {}", not_text(.offset, .byte))]
    NotText {
        /// Where the first byte that is not UTF-8 is (line and column of the text before it).
        location: Location,
        /// Its offset in bytes from the start of the file.
        offset: usize,
        /// The byte.
        byte: u8,
    },
    /// The text is not valid TOML. One error per line when displayed, with a note when
    /// there are several: the parser recovers after an error, so later ones may be echoes.
    #[error("{}", syntax_lines(issues, *more))]
    Syntax {
        /// Every syntax error found, in document order, at most one per line and at most
        /// [`MAX_SYNTAX_ERRORS`].
        issues: Vec<Issue>,
        /// Errors found past [`MAX_SYNTAX_ERRORS`], not listed.
        more: usize,
    },
    /// The TOML does not describe a valid policy. One issue per line when displayed.
    #[error("{}", lines(issues))]
    Invalid {
        /// Every problem found, in document order. Serde stops at the first wrong type or
        /// unknown field, so a document with such a problem reports just that one.
        issues: Vec<Issue>,
    },
}

impl PolicyError {
    /// The problems by place, for machine-readable reports; none for a file that could not
    /// be read.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            PolicyError::Invalid { issues } | PolicyError::Syntax { issues, .. } => issues.clone(),
            PolicyError::NotText {
                location,
                offset,
                byte,
            } => vec![Issue {
                location: location.clone(),
                field: String::new(),
                message: not_text(offset, byte),
            }],
            PolicyError::Read { .. } => Vec::new(),
        }
    }
}

fn not_text(offset: &usize, byte: &u8) -> String {
    format!("not UTF-8 text (byte 0x{byte:02x} at offset {offset}); a policy is a TOML file")
}

/// Most syntax errors one report lists: past a few dozen, a file is not TOML at all.
pub const MAX_SYNTAX_ERRORS: usize = 20;

fn syntax_lines(issues: &[Issue], more: usize) -> String {
    let mut out = lines(issues);
    if more > 0 {
        out.push_str(&format!(
            "\n{} syntax errors, the first {} shown; later ones may follow from earlier ones",
            issues.len() + more,
            issues.len()
        ));
    } else if issues.len() > 1 {
        out.push_str(&format!(
            "\n{} syntax errors; later ones may follow from earlier ones",
            issues.len()
        ));
    }
    out
}

fn lines(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(Issue::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and validates the policy file at `path`.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = read(path)?;
    parse(&path.display().to_string(), &text)
}

/// Reads the policy file at `path` as text; a file that is not UTF-8 (a binary, another
/// encoding) is an error naming the first byte that is not.
pub fn read(path: &Path) -> Result<String, PolicyError> {
    let bytes = fs::read(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        // The text before the bad byte is valid, so it can be counted in lines and columns.
        let before = std::str::from_utf8(&bytes[..offset]).unwrap_or_default();
        let origin = path.display().to_string();
        PolicyError::NotText {
            location: Lines::new(&origin, before).locate(offset),
            offset,
            byte: bytes[offset],
        }
    })
}

/// An issue at `field` (a path like `agents[3].rate.packets_burst`) of the document
/// `text`, located at the field's value, or at the deepest part of the path that exists.
/// For problems found after validation, such as a policy that does not fit the maps.
pub fn issue_at(origin: &str, text: &str, field: String, message: String) -> Issue {
    let offset = DeTable::parse(text)
        .map(|tree| span_of(tree.get_ref(), &field))
        .unwrap_or(0);
    Issue {
        location: Lines::new(origin, text).locate(offset),
        field,
        message,
    }
}

/// The byte offset of `path`'s value in `root`: keys separated by `.`, array indices in
/// brackets.
fn span_of(root: &DeTable<'_>, path: &str) -> usize {
    let mut table = root;
    let mut offset = 0;
    for part in path.split('.') {
        let (key, indices) = part
            .split_once('[')
            .map_or((part, ""), |(k, rest)| (k, rest));
        let Some((_, mut value)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
            return offset;
        };
        offset = value.span().start;
        for index in indices.split('[').filter(|i| !i.is_empty()) {
            let item = index
                .trim_end_matches(']')
                .parse::<usize>()
                .ok()
                .and_then(|i| match value.get_ref() {
                    DeValue::Array(items) => items.get(i),
                    _ => None,
                });
            let Some(item) = item else {
                return offset;
            };
            value = item;
            offset = value.span().start;
        }
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => return offset,
        }
    }
    offset
}

/// Parses and validates a policy document. `origin` names it in messages (a file path).
pub fn parse(origin: &str, text: &str) -> Result<Policy, PolicyError> {
    let lines = Lines::new(origin, text);
    // Parse to a spanned tree once: it feeds serde, and it maps the byte span of a serde
    // error back to the field path, which toml's error does not expose.
    let tree = DeTable::parse(text).map_err(|e| {
        let (mut issues, more) = syntax_errors(&lines, text);
        if issues.is_empty() {
            // The recovering parse found nothing the strict one did: report the strict one.
            issues.push(Issue {
                location: lines.locate(e.span().map_or(0, |s| s.start)),
                field: String::new(),
                message: e.message().trim_end().to_owned(),
            });
        }
        PolicyError::Syntax { issues, more }
    })?;
    // A document with nothing in it (zero length, or blanks and comments only) is refused:
    // a crash or a full disk that emptied the file must not leave a server enforcing
    // nothing. A policy with no agents says so: `agents = []`.
    if tree.get_ref().is_empty() {
        return Err(PolicyError::Invalid {
            issues: vec![Issue {
                location: lines.locate(0),
                field: String::new(),
                message: "the policy is empty; a policy with no agents says so explicitly \
                          (`agents = []`)"
                    .to_owned(),
            }],
        });
    }
    // The tree is consumed, not cloned: a spanned tree is several kilobytes per agent (a
    // second copy took a 100,000-agent apply's peak from ~260 to ~530 MB). Only an error
    // needs it again, and then it is parsed again.
    let raw = RawPolicy::deserialize(toml::de::Deserializer::from(tree)).map_err(|e| {
        let at = e.span().unwrap_or(0..0);
        let field = DeTable::parse(text)
            .map(|tree| field_at(tree.get_ref(), &at))
            .unwrap_or_default();
        PolicyError::Invalid {
            issues: vec![Issue {
                location: lines.locate(at.start),
                field,
                message: e.message().trim_end().to_owned(),
            }],
        }
    })?;
    let mut checker = Checker {
        lines,
        issues: Vec::new(),
        groups: Vec::new(),
    };
    let policy = checker.policy(raw);
    if checker.issues.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyError::Invalid {
            issues: checker.issues,
        })
    }
}

/// Every syntax error of `text` the parser finds, recovering after each: at most one per
/// line (recovery often reports the rest of a broken line again) and at most
/// [`MAX_SYNTAX_ERRORS`], with the number of errors past those.
fn syntax_errors(lines: &Lines<'_>, text: &str) -> (Vec<Issue>, usize) {
    let (_, errors) = DeTable::parse_recoverable(text);
    let mut issues: Vec<Issue> = Vec::new();
    for e in errors {
        let location = lines.locate(e.span().map_or(0, |s| s.start));
        if issues.iter().any(|i| i.location.line == location.line) {
            continue;
        }
        issues.push(Issue {
            location,
            field: String::new(),
            message: e.message().trim_end().to_owned(),
        });
    }
    issues.sort_by_key(|i| (i.location.line, i.location.column));
    let more = issues.len().saturating_sub(MAX_SYNTAX_ERRORS);
    issues.truncate(MAX_SYNTAX_ERRORS);
    (issues, more)
}

/// Turns byte offsets into `origin:line:column`.
struct Lines<'a> {
    origin: &'a str,
    text: &'a str,
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(origin: &'a str, text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines {
            origin,
            text,
            starts,
        }
    }

    fn locate(&self, offset: usize) -> Location {
        let line = self.starts.partition_point(|&s| s <= offset).max(1) - 1;
        let start = self.starts[line];
        // Columns count characters, as editors do; fall back to bytes if the offset is not on
        // a character boundary (it always is for spans toml reports).
        let column = self
            .text
            .get(start..offset)
            .map_or(offset.saturating_sub(start), |s| s.chars().count());
        Location {
            origin: self.origin.to_owned(),
            line: line + 1,
            column: column + 1,
        }
    }
}

/// The path (`agents[1].egress[0].ports`) of the innermost key or value whose span holds
/// the start of `at`. A full walk rather than a descent: the span toml gives a `[[table]]`
/// is only its header, which does not contain the table's keys.
fn field_at(root: &DeTable<'_>, at: &Range<usize>) -> String {
    #[derive(Clone)]
    enum Seg {
        Key(String),
        Index(usize),
    }
    struct Best {
        width: usize,
        depth: usize,
        path: Vec<Seg>,
    }
    fn consider(span: Range<usize>, pos: usize, path: &[Seg], best: &mut Option<Best>) {
        let holds = span.contains(&pos) || (span.is_empty() && span.start == pos);
        if !holds {
            return;
        }
        let width = span.len();
        let better = match best {
            None => true,
            Some(b) => width < b.width || (width == b.width && path.len() > b.depth),
        };
        if better {
            *best = Some(Best {
                width,
                depth: path.len(),
                path: path.to_vec(),
            });
        }
    }
    fn walk_table(table: &DeTable<'_>, pos: usize, path: &mut Vec<Seg>, best: &mut Option<Best>) {
        for (key, value) in table.iter() {
            path.push(Seg::Key(key.get_ref().to_string()));
            consider(key.span(), pos, path, best);
            walk_value(value, pos, path, best);
            path.pop();
        }
    }
    fn walk_value(
        value: &Spanned<DeValue<'_>>,
        pos: usize,
        path: &mut Vec<Seg>,
        best: &mut Option<Best>,
    ) {
        consider(value.span(), pos, path, best);
        match value.get_ref() {
            DeValue::Table(t) => walk_table(t, pos, path, best),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    walk_value(item, pos, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    let mut best = None;
    walk_table(root, at.start, &mut Vec::new(), &mut best);
    let mut out = String::new();
    for seg in best.map(|b| b.path).unwrap_or_default() {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(&k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(&k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

// The raw document, as serde sees it. Fields that need checks serde cannot do keep their
// span, so the checker can point at them.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    agents: Vec<Spanned<RawAgent>>,
    #[serde(default)]
    profiles: Vec<Spanned<RawProfile>>,
    #[serde(default)]
    detectors: Vec<Spanned<RawDetector>>,
    #[serde(default)]
    dlp: RawDlp,
    #[serde(default)]
    shared: Vec<Spanned<RawShared>>,
    #[serde(default)]
    mcp_servers: Vec<Spanned<RawMcpServer>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDlp {
    #[serde(default)]
    catalogue: CatalogueMode,
    #[serde(default)]
    catalogue_except: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShared {
    name: Spanned<String>,
    rate: Option<RawRate>,
    connections: Option<RawConnections>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    per_sec: Spanned<i64>,
    burst: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    bytes_per_hour: Option<Spanned<i64>>,
    bytes_per_day: Option<Spanned<i64>>,
    connections_per_hour: Option<Spanned<i64>>,
    connections_per_day: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    drops: Spanned<i64>,
    within_secs: Option<Spanned<i64>>,
    cooldown_secs: Option<Spanned<i64>>,
    max_cooldown_secs: Option<Spanned<i64>>,
    probe_per_sec: Option<Spanned<i64>>,
    probe_burst: Option<Spanned<i64>>,
    calm_secs: Option<Spanned<i64>>,
    #[serde(default)]
    action: BreakerAction,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: Spanned<String>,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    egress_default: EgressDefault,
    #[serde(default)]
    rate: Option<RawRate>,
    #[serde(default)]
    egress: Vec<Spanned<RawRule>>,
    #[serde(default)]
    inspect: bool,
    connections: Option<RawConnections>,
    quota: Option<RawQuota>,
    breaker: Option<RawBreaker>,
    mcp: Option<RawAgentMcp>,
    // Fields of an agent that a profile cannot have: read (whatever their type) so that the
    // checker can say why, rather than serde's bare "unknown field".
    #[serde(default)]
    id: Option<Spanned<de::IgnoredAny>>,
    #[serde(default)]
    prefixes: Option<Spanned<de::IgnoredAny>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    name: Spanned<String>,
    literal: Option<Spanned<String>>,
    regex: Option<Spanned<String>>,
    action: DetectorAction,
    #[serde(default)]
    direction: DetectorDirection,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    unknown: UnknownTraffic,
    tls_ports: Option<Spanned<Vec<Spanned<i64>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    // Integers are read as i64, the TOML integer type, so that out-of-range values get this
    // module's message rather than serde's "invalid value".
    id: Spanned<i64>,
    name: Spanned<String>,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    egress_default: EgressDefault,
    #[serde(default)]
    rate: Option<RawRate>,
    #[serde(default)]
    egress: Vec<Spanned<RawRule>>,
    #[serde(default)]
    inspect: bool,
    connections: Option<RawConnections>,
    quota: Option<RawQuota>,
    breaker: Option<RawBreaker>,
    mcp: Option<RawAgentMcp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    packets_per_sec: Option<Spanned<i64>>,
    packets_burst: Option<Spanned<i64>>,
    bytes_per_sec: Option<Spanned<i64>>,
    bytes_burst: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Action,
    to: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    proto: Proto,
    ports: Option<Spanned<RawPorts>>,
    shared: Option<Spanned<String>>,
    always: Option<Spanned<bool>>,
}

/// `ports` as written: an integer or a string, checked later.
enum RawPorts {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for RawPorts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawPorts, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = RawPorts;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port like 443 or a string like \"443\" or \"8000-8100\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPorts, E> {
                Ok(RawPorts::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPorts, E> {
                Ok(RawPorts::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPorts, E> {
                Ok(RawPorts::Str(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The validation pass: builds the [`Policy`] and records every problem on the way.
struct Checker<'a> {
    lines: Lines<'a>,
    issues: Vec<Issue>,
    /// The names of the `[[shared]]` groups, in document order, which rules may name.
    groups: Vec<String>,
}

/// Who claimed something first, for messages about duplicates.
#[derive(Clone, Copy)]
struct Claim<'r> {
    index: usize,
    name: &'r str,
}

impl fmt::Display for Claim<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "agent \"{}\" (agents[{}])", self.name, self.index)
    }
}

impl Checker<'_> {
    fn issue(&mut self, span: Range<usize>, field: String, message: String) {
        self.issues.push(Issue {
            location: self.lines.locate(span.start),
            field,
            message,
        });
    }

    fn policy(&mut self, raw: RawPolicy) -> Policy {
        let mut ids: HashMap<u32, Claim<'_>> = HashMap::new();
        let mut names: HashMap<&str, Claim<'_>> = HashMap::new();
        let mut interfaces: HashMap<&str, Claim<'_>> = HashMap::new();
        let mut sources: HashMap<IpNet, Claim<'_>> = HashMap::new();
        let mut agents = Vec::with_capacity(raw.agents.len());
        // Groups first: the agents' and profiles' rules name them.
        let shared = self.shared(&raw.shared);
        // MCP servers too: the agents' and profiles' `mcp.servers` name them.
        let mcp_servers = self.mcp_servers(&raw.mcp_servers);

        for (i, raw_agent) in raw.agents.iter().enumerate() {
            let a = raw_agent.get_ref();
            let at = |field: &str| format!("agents[{i}].{field}");
            let me = Claim {
                index: i,
                name: a.name.get_ref(),
            };

            let id = self.agent_id(&a.id, at("id"));
            if let Some(id) = id {
                if let Some(first) = ids.get(&id) {
                    let msg = format!("{me} reuses id {id} of {first}; ids must be unique");
                    self.issue(a.id.span(), at("id"), msg);
                } else {
                    ids.insert(id, me);
                }
            }

            self.agent_name(&a.name, at("name"));
            if let Some(first) = names.get(a.name.get_ref().as_str()) {
                let msg = format!("name \"{}\" is already used by {first}", a.name.get_ref());
                self.issue(a.name.span(), at("name"), msg);
            } else {
                names.insert(a.name.get_ref(), me);
            }

            let mut agent_ifaces = Vec::with_capacity(a.interfaces.len());
            for (j, iface) in a.interfaces.iter().enumerate() {
                let field = at(&format!("interfaces[{j}]"));
                let name = iface.get_ref().as_str();
                if !valid_ifname(name) {
                    let msg = format!(
                        "expected an interface name of 1 to {MAX_IFNAME_LEN} bytes without '/', \
                         ':' or whitespace, got \"{name}\""
                    );
                    self.issue(iface.span(), field, msg);
                    continue;
                }
                match interfaces.get(name) {
                    Some(first) if first.index == i => {
                        let msg = format!("interface \"{name}\" is listed twice");
                        self.issue(iface.span(), field, msg);
                    }
                    Some(first) => {
                        let msg = format!(
                            "interface \"{name}\" of {me} already identifies {first}; an \
                             interface can identify only one agent"
                        );
                        self.issue(iface.span(), field, msg);
                    }
                    None => {
                        interfaces.insert(name, me);
                        agent_ifaces.push(name.to_owned());
                    }
                }
            }

            let mut agent_sources = Vec::with_capacity(a.prefixes.len());
            for (j, prefix) in a.prefixes.iter().enumerate() {
                let field = at(&format!("prefixes[{j}]"));
                let net = match prefix.get_ref().parse::<IpNet>() {
                    Ok(net) => net,
                    Err(e) => {
                        self.issue(prefix.span(), field, e.to_string());
                        continue;
                    }
                };
                match sources.get(&net) {
                    Some(first) if first.index == i => {
                        let msg = format!("source prefix {net} is listed twice");
                        self.issue(prefix.span(), field, msg);
                    }
                    Some(first) => {
                        let msg = format!(
                            "source prefix {net} of {me} already identifies {first}; a source \
                             prefix can identify only one agent"
                        );
                        self.issue(prefix.span(), field, msg);
                    }
                    None => {
                        sources.insert(net, me);
                        agent_sources.push(net);
                    }
                }
            }

            if a.interfaces.is_empty() && a.prefixes.is_empty() {
                let msg = format!(
                    "{me} has neither interfaces nor prefixes, so no traffic could be \
                     attributed to it; give it at least one"
                );
                self.issue(raw_agent.span(), format!("agents[{i}]"), msg);
            }

            let rate = match &a.rate {
                Some(r) => self.rate(r, &at("rate")),
                None => Rate::default(),
            };

            let egress = a
                .egress
                .iter()
                .enumerate()
                .filter_map(|(j, rule)| self.rule(rule, &at(&format!("egress[{j}]"))))
                .collect();
            let guards = self.guards(
                (&a.connections, &a.quota, &a.breaker),
                &format!("agents[{i}]"),
            );
            let mcp = self.agent_mcp(a.mcp.as_ref(), &mcp_servers, &at("mcp"));

            agents.push(Agent {
                id: id.unwrap_or(0),
                name: a.name.get_ref().clone(),
                interfaces: agent_ifaces,
                sources: agent_sources,
                mode: a.mode,
                egress_default: a.egress_default,
                rate,
                egress,
                inspect: a.inspect,
                guards,
                mcp,
            });
        }

        let tls_ports = self.tls_ports(raw.defaults.tls_ports.as_ref());
        let profiles = self.profiles(&raw.profiles, &names, &mcp_servers);
        let detectors = self.detectors(&raw.detectors);
        let dlp = self.dlp(&raw.dlp);
        Policy {
            unknown: raw.defaults.unknown,
            tls_ports,
            own: agents.len(),
            agents,
            profiles,
            detectors,
            dlp,
            shared,
            mcp_servers,
        }
    }

    fn dlp(&mut self, raw: &RawDlp) -> Dlp {
        let mut except = Vec::with_capacity(raw.catalogue_except.len());
        for (i, name) in raw.catalogue_except.iter().enumerate() {
            let known = crate::inspect::catalogue::CATALOGUE
                .iter()
                .any(|e| e.name == name.get_ref());
            if known {
                except.push(name.get_ref().clone());
            } else {
                let names: Vec<_> = crate::inspect::catalogue::CATALOGUE
                    .iter()
                    .map(|e| e.name)
                    .collect();
                let msg = format!(
                    "no catalogue entry is called \"{}\"; the entries are {}",
                    name.get_ref(),
                    names.join(", ")
                );
                self.issue(name.span(), format!("dlp.catalogue_except[{i}]"), msg);
            }
        }
        Dlp {
            catalogue: raw.catalogue,
            catalogue_except: except,
        }
    }

    /// The `[[shared]]` groups; records their names for the rules.
    fn shared(&mut self, raw: &[Spanned<RawShared>]) -> Vec<SharedGroup> {
        let mut groups = Vec::with_capacity(raw.len());
        let max = MAX_SHARED_GROUPS as usize - 1;
        for (i, spanned) in raw.iter().enumerate() {
            let g = spanned.get_ref();
            let at = |field: &str| format!("shared[{i}].{field}");
            if i == max {
                let msg = format!("at most {max} shared groups are supported");
                self.issue(spanned.span(), format!("shared[{i}]"), msg);
            }
            let name = g.name.get_ref();
            self.agent_name(&g.name, at("name"));
            if let Some(first) = self.groups.iter().position(|n| n == name) {
                let msg = format!("name \"{name}\" is already used by shared[{first}]");
                self.issue(g.name.span(), at("name"), msg);
            }
            // Every entry keeps its place, so group ids follow document order.
            self.groups.push(name.clone());
            let rate = match &g.rate {
                Some(r) => self.rate(r, &at("rate")),
                None => Rate::default(),
            };
            let connections = g
                .connections
                .as_ref()
                .and_then(|c| self.connections(c, &at("connections")));
            let no_rate = g
                .rate
                .as_ref()
                .is_none_or(|r| r.packets_per_sec.is_none() && r.bytes_per_sec.is_none());
            if no_rate && g.connections.is_none() {
                let msg = format!(
                    "shared group \"{name}\" has no limit; give it a rate, connections or both"
                );
                self.issue(spanned.span(), format!("shared[{i}]"), msg);
            }
            groups.push(SharedGroup {
                name: name.clone(),
                rate,
                connections,
            });
        }
        groups
    }

    /// A `connections` table: `per_sec` and `burst` (default max(per_sec/10, 1)).
    fn connections(&mut self, c: &RawConnections, at: &str) -> Option<Limit> {
        self.limit(
            (&Some(c.per_sec.clone()), "per_sec"),
            (&c.burst, "burst"),
            at,
            MAX_PACKETS_PER_SEC,
            |rate| (rate / 10).max(1),
            |burst| {
                (burst < 1)
                    .then(|| format!("expected a burst of at least 1 connection, got {burst}"))
            },
        )
    }

    /// The guards of an agent or profile at `at` (`agents[3]`).
    fn guards(
        &mut self,
        (connections, quota, breaker): (
            &Option<RawConnections>,
            &Option<RawQuota>,
            &Option<RawBreaker>,
        ),
        at: &str,
    ) -> Guards {
        let connections = connections
            .as_ref()
            .and_then(|c| self.connections(c, &format!("{at}.connections")));
        let quota = quota
            .as_ref()
            .map(|q| self.quota(q, &format!("{at}.quota")))
            .unwrap_or_default();
        let breaker = breaker
            .as_ref()
            .and_then(|b| self.breaker(b, &format!("{at}.breaker")));
        Guards {
            connections,
            quota,
            breaker,
        }
    }

    /// An integer field in `range`, or `default` when omitted; `None` after an issue.
    fn number(
        &mut self,
        value: &Option<Spanned<i64>>,
        field: String,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> Option<u64> {
        let Some(value) = value else {
            return Some(default);
        };
        match u64::try_from(*value.get_ref()) {
            Ok(v) if range.contains(&v) => Some(v),
            _ => {
                let msg = format!(
                    "expected {} to {}, got {}",
                    range.start(),
                    range.end(),
                    value.get_ref()
                );
                self.issue(value.span(), field, msg);
                None
            }
        }
    }

    fn quota(&mut self, q: &RawQuota, at: &str) -> Quota {
        let mut one = |value: &Option<Spanned<i64>>, name: &str| {
            let v = value.as_ref()?;
            match u64::try_from(*v.get_ref()) {
                Ok(n) if (1..=QUOTA_MAX).contains(&n) => Some(n),
                _ => {
                    let msg = format!(
                        "expected 1 to {QUOTA_MAX} (omit the field for no quota), got {}",
                        v.get_ref()
                    );
                    self.issue(v.span(), format!("{at}.{name}"), msg);
                    None
                }
            }
        };
        Quota {
            bytes_per_hour: one(&q.bytes_per_hour, "bytes_per_hour"),
            bytes_per_day: one(&q.bytes_per_day, "bytes_per_day"),
            connections_per_hour: one(&q.connections_per_hour, "connections_per_hour"),
            connections_per_day: one(&q.connections_per_day, "connections_per_day"),
        }
    }

    fn breaker(&mut self, b: &RawBreaker, at: &str) -> Option<Breaker> {
        let before = self.issues.len();
        let field = |name: &str| format!("{at}.{name}");
        let secs = 1..=MAX_BREAKER_SECS;
        let drops = self.number(
            &Some(b.drops.clone()),
            field("drops"),
            1..=MAX_BREAKER_DROPS,
            0,
        );
        let within = self.number(&b.within_secs, field("within_secs"), secs.clone(), 10);
        let cooldown = self.number(&b.cooldown_secs, field("cooldown_secs"), secs.clone(), 30);
        let max_cooldown = self.number(
            &b.max_cooldown_secs,
            field("max_cooldown_secs"),
            secs.clone(),
            cooldown.unwrap_or(0).max(600),
        );
        let probe_per_sec = self.number(
            &b.probe_per_sec,
            field("probe_per_sec"),
            1..=MAX_PACKETS_PER_SEC,
            1,
        );
        let probe_burst = self.number(&b.probe_burst, field("probe_burst"), 1..=u64::MAX, 1);
        let calm = self.number(
            &b.calm_secs,
            field("calm_secs"),
            secs,
            cooldown.unwrap_or(1),
        );
        if let (Some(cooldown), Some(max), Some(v)) = (cooldown, max_cooldown, &b.max_cooldown_secs)
            && max < cooldown
        {
            let msg = format!(
                "expected at least cooldown_secs ({cooldown}), got {max}: the cooldown only \
                 grows up to it"
            );
            self.issue(v.span(), field("max_cooldown_secs"), msg);
        }
        if self.issues.len() != before {
            return None;
        }
        Some(Breaker {
            drops: drops?,
            within_secs: within?,
            cooldown_secs: cooldown?,
            max_cooldown_secs: max_cooldown?,
            probe: Limit {
                per_sec: probe_per_sec?,
                burst: probe_burst?,
            },
            calm_secs: calm?,
            action: b.action,
        })
    }

    /// The `[[profiles]]`; `agents` holds the agents' names, which profiles may not take.
    fn profiles(
        &mut self,
        raw: &[Spanned<RawProfile>],
        agents: &HashMap<&str, Claim<'_>>,
        mcp_servers: &[McpServer],
    ) -> Vec<Profile> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        // Pattern -> the profile that lists it first: the same pattern in a later profile
        // could never match, as the first profile in document order wins.
        let mut patterns: HashMap<&str, usize> = HashMap::new();
        let mut profiles = Vec::with_capacity(raw.len());
        for (i, spanned) in raw.iter().enumerate() {
            let p = spanned.get_ref();
            let at = |field: &str| format!("profiles[{i}].{field}");
            let before = self.issues.len();

            let name = p.name.get_ref().as_str();
            if name.contains('/') {
                let msg = format!(
                    "a profile name cannot hold '/', which separates the profile from the \
                     interface in instance names (\"coder/agt-coder-1\"), got \"{name}\""
                );
                self.issue(p.name.span(), at("name"), msg);
            } else {
                self.agent_name(&p.name, at("name"));
            }
            if let Some(first) = names.get(name) {
                let msg = format!("name \"{name}\" is already used by profiles[{first}]");
                self.issue(p.name.span(), at("name"), msg);
            } else if let Some(agent) = agents.get(name) {
                let msg = format!(
                    "name \"{name}\" is already used by {agent}; profiles and agents share \
                     one namespace (the CLI and metrics find either by name)"
                );
                self.issue(p.name.span(), at("name"), msg);
            } else {
                names.insert(name, i);
            }

            for (field, value) in [("id", &p.id), ("prefixes", &p.prefixes)] {
                if let Some(value) = value {
                    let msg = format!(
                        "a profile has no {field}: each of its instances gets its own (ids \
                         from the daemon, prefixes from `enforcer agent add --prefix`)"
                    );
                    self.issue(value.span(), at(field), msg);
                }
            }

            let mut profile_patterns = Vec::with_capacity(p.interfaces.len());
            for (j, pattern) in p.interfaces.iter().enumerate() {
                let field = at(&format!("interfaces[{j}]"));
                let text = pattern.get_ref().as_str();
                // '*' and '?' are bytes an interface name may hold, so the name check is
                // the pattern check too.
                if !valid_ifname(text) {
                    let msg = format!(
                        "expected an interface name pattern of 1 to {MAX_IFNAME_LEN} bytes \
                         without '/', ':' or whitespace ('*' matches any run, '?' one byte), \
                         got \"{text}\""
                    );
                    self.issue(pattern.span(), field, msg);
                    continue;
                }
                match patterns.get(text) {
                    Some(&first) if first == i => {
                        let msg = format!("pattern \"{text}\" is listed twice");
                        self.issue(pattern.span(), field, msg);
                    }
                    Some(&first) => {
                        let msg = format!(
                            "pattern \"{text}\" is already listed by profiles[{first}], which \
                             comes first and so would take every interface it matches"
                        );
                        self.issue(pattern.span(), field, msg);
                    }
                    None => {
                        patterns.insert(text, i);
                        profile_patterns.push(text.to_owned());
                    }
                }
            }

            let rate = match &p.rate {
                Some(r) => self.rate(r, &at("rate")),
                None => Rate::default(),
            };
            let egress = p
                .egress
                .iter()
                .enumerate()
                .filter_map(|(j, rule)| self.rule(rule, &at(&format!("egress[{j}]"))))
                .collect();
            let guards = self.guards(
                (&p.connections, &p.quota, &p.breaker),
                &format!("profiles[{i}]"),
            );
            let mcp = self.agent_mcp(p.mcp.as_ref(), mcp_servers, &at("mcp"));

            if self.issues.len() == before {
                profiles.push(Profile {
                    name: name.to_owned(),
                    patterns: profile_patterns,
                    mode: p.mode,
                    egress_default: p.egress_default,
                    rate,
                    egress,
                    inspect: p.inspect,
                    guards,
                    mcp,
                });
            }
        }
        profiles
    }

    fn detectors(&mut self, raw: &[Spanned<RawDetector>]) -> Vec<Detector> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut detectors = Vec::with_capacity(raw.len());
        for (i, spanned) in raw.iter().enumerate() {
            let d = spanned.get_ref();
            let at = |field: &str| format!("detectors[{i}].{field}");
            if i == MAX_DETECTORS {
                let msg = format!("at most {MAX_DETECTORS} detectors are supported");
                self.issue(spanned.span(), format!("detectors[{i}]"), msg);
            }
            let before = self.issues.len();
            self.agent_name(&d.name, at("name"));
            if let Some(first) = names.get(d.name.get_ref().as_str()) {
                let msg = format!(
                    "name \"{}\" is already used by detectors[{first}]",
                    d.name.get_ref()
                );
                self.issue(d.name.span(), at("name"), msg);
            } else {
                names.insert(d.name.get_ref(), i);
            }
            let pattern = match (&d.literal, &d.regex) {
                (Some(literal), None) => {
                    let len = literal.get_ref().len();
                    if !(1..=MAX_LITERAL_LEN).contains(&len) {
                        let msg = format!("expected 1 to {MAX_LITERAL_LEN} bytes, got {len}");
                        self.issue(literal.span(), at("literal"), msg);
                    }
                    Some(DetectorPattern::Literal(literal.get_ref().clone()))
                }
                (None, Some(regex)) => {
                    let checked = regex_shape(regex.get_ref())
                        .and_then(|_| crate::inspect::dlp::check_regex(regex.get_ref()));
                    if let Err(msg) = checked {
                        self.issue(regex.span(), at("regex"), msg);
                    }
                    Some(DetectorPattern::Regex(regex.get_ref().clone()))
                }
                (Some(_), Some(regex)) => {
                    let msg = "a detector has either `literal` or `regex`, not both".into();
                    self.issue(regex.span(), at("regex"), msg);
                    None
                }
                (None, None) => {
                    let msg = "a detector needs `literal` or `regex`".into();
                    self.issue(spanned.span(), format!("detectors[{i}]"), msg);
                    None
                }
            };
            if let Some(pattern) = pattern
                && self.issues.len() == before
            {
                detectors.push(Detector {
                    name: d.name.get_ref().clone(),
                    pattern,
                    action: d.action,
                    direction: d.direction,
                });
            }
        }
        detectors
    }

    fn tls_ports(&mut self, raw: Option<&Spanned<Vec<Spanned<i64>>>>) -> Vec<u16> {
        let Some(raw) = raw else {
            return DEFAULT_TLS_PORTS.to_vec();
        };
        if raw.get_ref().len() > MAX_TLS_PORTS {
            let msg = format!(
                "at most {MAX_TLS_PORTS} TLS ports, got {}",
                raw.get_ref().len()
            );
            self.issue(raw.span(), "defaults.tls_ports".into(), msg);
        }
        let mut out = Vec::new();
        for (i, port) in raw.get_ref().iter().enumerate() {
            match u16::try_from(*port.get_ref()) {
                Ok(p) if p > 0 && !out.contains(&p) => out.push(p),
                Ok(p) if p > 0 => {
                    let msg = format!("port {p} is listed twice");
                    self.issue(port.span(), format!("defaults.tls_ports[{i}]"), msg);
                }
                _ => {
                    let msg = format!("expected a port in 1-65535, got {}", port.get_ref());
                    self.issue(port.span(), format!("defaults.tls_ports[{i}]"), msg);
                }
            }
        }
        out
    }

    fn agent_id(&mut self, id: &Spanned<i64>, field: String) -> Option<u32> {
        let v = *id.get_ref();
        let msg = if v == 0 {
            "agent ids start at 1 (0 stands for traffic from no known agent)".to_owned()
        } else {
            match u32::try_from(v) {
                Ok(v) if v <= MAX_AGENT_ID => return Some(v),
                _ => format!("expected an agent id in 1..={MAX_AGENT_ID}, got {v}"),
            }
        };
        self.issue(id.span(), field, msg);
        None
    }

    fn agent_name(&mut self, name: &Spanned<String>, field: String) {
        let n = name.get_ref();
        let ok = (1..=MAX_NAME_LEN).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            let msg = format!(
                "expected 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -, got \"{n}\""
            );
            self.issue(name.span(), field, msg);
        }
    }

    fn rate(&mut self, r: &RawRate, at: &str) -> Rate {
        let packets = self.limit(
            (&r.packets_per_sec, "packets_per_sec"),
            (&r.packets_burst, "packets_burst"),
            at,
            MAX_PACKETS_PER_SEC,
            |rate| (rate / 10).max(1),
            |burst| {
                (burst < 1).then(|| format!("expected a burst of at least 1 packet, got {burst}"))
            },
        );
        let bytes = self.limit(
            (&r.bytes_per_sec, "bytes_per_sec"),
            (&r.bytes_burst, "bytes_burst"),
            at,
            MAX_BYTES_PER_SEC,
            |rate| (rate / 10).max(DEFAULT_MIN_BYTES_BURST),
            |burst| {
                (burst < MIN_BYTES_BURST as i64).then(|| {
                    format!(
                        "expected at least {MIN_BYTES_BURST} bytes, got {burst}: a smaller burst \
                         could never pass a full-size Ethernet frame"
                    )
                })
            },
        );
        Rate { packets, bytes }
    }

    /// One limit of a `rate` table: the rate in `1..=max`, and the burst checked by
    /// `bad_burst` or defaulted by `default_burst`.
    fn limit(
        &mut self,
        (rate, rate_name): (&Option<Spanned<i64>>, &str),
        (burst, burst_name): (&Option<Spanned<i64>>, &str),
        at: &str,
        max: u64,
        default_burst: impl Fn(u64) -> u64,
        bad_burst: impl Fn(i64) -> Option<String>,
    ) -> Option<Limit> {
        let burst = match burst {
            Some(b) => match bad_burst(*b.get_ref()) {
                Some(msg) => {
                    self.issue(b.span(), format!("{at}.{burst_name}"), msg);
                    None
                }
                None if rate.is_none() => {
                    let msg = format!(
                        "{burst_name} has no effect without {rate_name}; set {rate_name} or \
                         remove {burst_name}"
                    );
                    self.issue(b.span(), format!("{at}.{burst_name}"), msg);
                    None
                }
                // bad_burst rejected everything below 1, so the value is positive.
                None => Some(b.get_ref().unsigned_abs()),
            },
            None => None,
        };
        let rate = rate.as_ref()?;
        let per_sec = match u64::try_from(*rate.get_ref()) {
            Ok(v) if (1..=max).contains(&v) => v,
            _ => {
                let msg = format!(
                    "expected 1 to {max} (omit the field for no limit), got {}",
                    rate.get_ref()
                );
                self.issue(rate.span(), format!("{at}.{rate_name}"), msg);
                return None;
            }
        };
        Some(Limit {
            per_sec,
            burst: burst.unwrap_or_else(|| default_burst(per_sec)),
        })
    }

    fn rule(&mut self, rule: &Spanned<RawRule>, at: &str) -> Option<EgressRule> {
        let r = rule.get_ref();
        let before = self.issues.len();

        if r.to.get_ref().is_empty() {
            let msg = "expected at least one destination (a CIDR, an address or a preset like \
                       \"@any\")"
                .to_owned();
            self.issue(r.to.span(), format!("{at}.to"), msg);
        }
        let mut to = Vec::with_capacity(r.to.get_ref().len());
        for (k, dest) in r.to.get_ref().iter().enumerate() {
            match destination(dest.get_ref()) {
                Ok(Destination::Name(_)) if r.action.drops() => {
                    let msg = "host names can only be allowed: a name the agent may not use \
                               is refused by its DNS resolver already; deny addresses with \
                               CIDRs or presets"
                        .to_owned();
                    self.issue(dest.span(), format!("{at}.to[{k}]"), msg);
                }
                Ok(Destination::Name(_)) if r.proto == Proto::Icmp => {
                    let msg =
                        "host names apply to tcp and udp rules (and \"any\"), not icmp".to_owned();
                    self.issue(dest.span(), format!("{at}.to[{k}]"), msg);
                }
                Ok(d) => to.push(d),
                Err(msg) => self.issue(dest.span(), format!("{at}.to[{k}]"), msg),
            }
        }

        let ports = match &r.ports {
            None => PortRange::ALL,
            Some(p) if r.proto == Proto::Icmp => {
                let msg = "ports do not apply to proto \"icmp\"; remove ports, or use proto \
                           \"tcp\", \"udp\" or \"any\""
                    .to_owned();
                self.issue(p.span(), format!("{at}.ports"), msg);
                PortRange::ALL
            }
            Some(p) => match ports(p.get_ref()) {
                Ok(range) => range,
                Err(msg) => {
                    self.issue(p.span(), format!("{at}.ports"), msg);
                    PortRange::ALL
                }
            },
        };

        let shared = match &r.shared {
            Some(name) if r.action == Action::Deny => {
                let msg = "a deny rule's packets never reach a shared limit; name the group on \
                           an allow rule"
                    .to_owned();
                self.issue(name.span(), format!("{at}.shared"), msg);
                None
            }
            Some(name) if !self.groups.contains(name.get_ref()) => {
                let known = if self.groups.is_empty() {
                    "there are no [[shared]] groups".to_owned()
                } else {
                    format!("known groups: {}", self.groups.join(", "))
                };
                let msg = format!("unknown shared group \"{}\"; {known}", name.get_ref());
                self.issue(name.span(), format!("{at}.shared"), msg);
                None
            }
            Some(name) => Some(name.get_ref().clone()),
            None => None,
        };
        let always = match &r.always {
            Some(always) if *always.get_ref() && r.action == Action::Deny => {
                let msg = "always lets allowed packets through an open breaker; a deny rule \
                           allows none"
                    .to_owned();
                self.issue(always.span(), format!("{at}.always"), msg);
                false
            }
            Some(always) => *always.get_ref(),
            None => false,
        };

        (self.issues.len() == before).then_some(EgressRule {
            action: r.action,
            to,
            proto: r.proto,
            ports,
            shared,
            always,
        })
    }
}

/// Linux's `dev_valid_name`: not empty, shorter than `IFNAMSIZ`, not `.` or `..`, and no
/// `/`, `:` or whitespace. Crate-visible for interfaces named outside a policy file
/// (`enforcer agent add`).
pub(crate) fn valid_ifname(name: &str) -> bool {
    (1..=MAX_IFNAME_LEN).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

/// One `to` entry: a preset or a prefix.
fn destination(text: &str) -> Result<Destination, String> {
    if text.starts_with('@') {
        let Some(Preset {
            name,
            prefixes: nets,
            ..
        }) = PRESETS.iter().find(|p| p.name == text)
        else {
            let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            return Err(format!(
                "unknown preset \"{text}\"; known presets: {}",
                known.join(", ")
            ));
        };
        let nets = nets
            .iter()
            .map(|n| {
                n.parse()
                    .expect("PRESETS holds valid prefixes (unit-tested)")
            })
            .collect();
        return Ok(Destination::Preset { name, nets });
    }
    // A name has a letter, `-` or `_` in its last label (top-level domains are never
    // numeric); anything else is read as an address so typos in addresses are reported
    // as such.
    let looks_like_name = text.starts_with("*.")
        || text.trim_end_matches('.').contains('.')
            && text
                .trim_end_matches('.')
                .rsplit('.')
                .next()
                .is_some_and(|tld| {
                    tld.bytes()
                        .any(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
                })
            && !text.contains(':')
            && !text.contains('/');
    if looks_like_name {
        return match text.strip_prefix("*.") {
            Some(rest) => normalize_name(rest)
                .map(|n| Destination::Name(NamePattern::Wildcard(format!(".{n}"))))
                .map_err(|e| e.to_string()),
            None if text.contains('*') => Err(format!(
                "\"{text}\": a wildcard is a whole leftmost label, as in \"*.example.com\""
            )),
            None => normalize_name(text)
                .map(|n| Destination::Name(NamePattern::Exact(n)))
                .map_err(|e| e.to_string()),
        };
    }
    text.parse()
        .map(Destination::Net)
        .map_err(|e: NetError| e.to_string())
}

/// A `ports` value: `443`, `"443"` or `"8000-8100"`.
fn ports(raw: &RawPorts) -> Result<PortRange, String> {
    let port = |v: i64| u16::try_from(v).map_err(|_| format!("port {v} is outside 0-65535"));
    match raw {
        RawPorts::Int(v) => port(*v).map(|p| PortRange { lo: p, hi: p }),
        RawPorts::Str(s) => {
            let expected =
                || format!("expected a port or range like \"443\" or \"8000-8100\", got \"{s}\"");
            let number = |t: &str| -> Result<u16, String> {
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(expected());
                }
                // Digits only, so the only failure left is size; saturate to report it.
                port(t.parse::<i64>().unwrap_or(i64::MAX))
            };
            let (lo, hi) = match s.split_once('-') {
                None => {
                    let p = number(s)?;
                    (p, p)
                }
                Some((lo, hi)) => (number(lo)?, number(hi)?),
            };
            if lo > hi {
                return Err(format!(
                    "range \"{s}\" runs backwards; did you mean \"{hi}-{lo}\"?"
                ));
            }
            Ok(PortRange { lo, hi })
        }
    }
}

// --- MCP: the registry of servers (`[[mcp_servers]]`) and each agent's gate
// (`[agents.mcp]`). Kept apart from the rest so the inspecting proxy's parts of the policy
// change independently.

/// Longest `mcp_servers.path`, in bytes.
pub const MAX_MCP_PATH_LEN: usize = 1024;

/// Longest MCP tool name, in bytes (the MCP specification's limit).
pub const MAX_MCP_TOOL_LEN: usize = 128;

/// Most `calls_per_minute` and `burst` of an MCP server grant.
pub const MAX_MCP_CALLS_PER_MINUTE: u64 = 1_000_000;

/// Longest `quota_seconds` of an MCP server grant: a year.
pub const MAX_MCP_QUOTA_SECONDS: u64 = 365 * 24 * 3600;

/// An MCP server the policy knows (`[[mcp_servers]]`): requests to `host` whose path
/// matches `path` are this server's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McpServer {
    /// Unique name, which agents' grants refer to, and audit records and metrics carry.
    pub name: String,
    /// The host name (normalized: lower case, no trailing dot), compared with the TLS
    /// server name.
    pub host: String,
    /// Which request paths are the server's.
    pub path: McpPath,
}

/// The paths of an [`McpServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum McpPath {
    /// This path only (`"/mcp"`).
    Exact(String),
    /// This path and every path below it: `"/mcp/*"` is `Prefix("/mcp")`, matching `/mcp`,
    /// `/mcp/` and `/mcp/a/b`, not `/mcpx`; `"/*"` is `Prefix("")`, every path.
    Prefix(String),
}

impl McpPath {
    /// Whether `path` (without its query) is one of these.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            McpPath::Exact(p) => p == path,
            McpPath::Prefix(p) => path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

impl fmt::Display for McpPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            McpPath::Exact(p) => f.write_str(p),
            McpPath::Prefix(p) => write!(f, "{p}/*"),
        }
    }
}

/// What the gate does with MCP traffic to a server the agent is not granted
/// (`[agents.mcp] shadow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum McpShadow {
    /// Refuse it with a JSON-RPC error.
    #[default]
    Block,
    /// Let it through; count and audit it.
    Flag,
}

/// An agent's MCP gate (`[agents.mcp]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentMcp {
    /// What happens to MCP traffic to servers not in `servers`.
    pub shadow: McpShadow,
    /// The servers the agent may use, in document order; each server at most once.
    pub servers: Vec<McpGrant>,
}

impl AgentMcp {
    /// The grant for the server called `server`.
    pub fn grant(&self, server: &str) -> Option<&McpGrant> {
        self.servers.iter().find(|g| g.server == server)
    }
}

/// One server an agent may use (`[[agents.mcp.servers]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McpGrant {
    /// The [`McpServer`]'s name.
    pub server: String,
    /// The tools `tools/call` may name; `None`: every tool.
    pub tools: Option<Vec<String>>,
    /// The `tools/call` rate: `calls_per_minute` with `burst`.
    pub rate: Option<McpRate>,
    /// The `tools/call` quota: `quota` calls per `quota_seconds`.
    pub quota: Option<McpQuota>,
}

impl McpGrant {
    /// Whether `tools/call` may name `tool`.
    pub fn allows_tool(&self, tool: &str) -> bool {
        self.tools
            .as_ref()
            .is_none_or(|tools| tools.iter().any(|t| t == tool))
    }
}

/// A token-bucket rate of `tools/call`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct McpRate {
    /// Calls per minute, refilled evenly.
    pub per_minute: u64,
    /// Calls that may come at once.
    pub burst: u64,
}

/// A quota of `tools/call`s: `calls` per `seconds`, refilled evenly (a token bucket of
/// `calls` tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct McpQuota {
    /// Calls per period.
    pub calls: u64,
    /// The period, in seconds.
    pub seconds: u64,
}

impl Policy {
    /// The MCP servers, in document order; names are unique.
    pub fn mcp_servers(&self) -> &[McpServer] {
        &self.mcp_servers
    }
}

impl Agent {
    /// The agent's MCP gate; `None`: MCP passes ungated (still audited).
    pub fn mcp(&self) -> Option<&AgentMcp> {
        self.mcp.as_ref()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcpServer {
    name: Spanned<String>,
    host: Spanned<String>,
    path: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentMcp {
    #[serde(default)]
    shadow: McpShadow,
    #[serde(default)]
    servers: Vec<Spanned<RawMcpGrant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMcpGrant {
    server: Spanned<String>,
    tools: Option<Vec<Spanned<String>>>,
    calls_per_minute: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
    quota: Option<Spanned<i64>>,
    quota_seconds: Option<Spanned<i64>>,
}

/// `path` of an `[[mcp_servers]]` entry, checked: an absolute path without query,
/// fragment, percent-encoding or dot segments (the gate compares paths as bytes, so a
/// pattern must be in the one form requests are compared in), `*` only as a final `/*`.
fn mcp_path(text: &str) -> Result<McpPath, String> {
    let (base, prefix) = match text.strip_suffix("/*") {
        Some(base) => (base, true),
        None => (text, false),
    };
    let bad = |why: &str| {
        Err(format!(
            "expected a path like \"/mcp\" or a prefix like \"/mcp/*\" ({why}), got \"{text}\""
        ))
    };
    if !text.starts_with('/') {
        return bad("it starts with '/'");
    }
    if text.len() > MAX_MCP_PATH_LEN {
        return bad(&format!("at most {MAX_MCP_PATH_LEN} bytes"));
    }
    if let Some(c) = base
        .chars()
        .find(|&c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '%' | '*'))
    {
        return bad(&format!("no {c:?}; '*' only as a final \"/*\""));
    }
    if base.split('/').any(|seg| seg == "." || seg == "..") {
        return bad("no \".\" or \"..\" segments");
    }
    Ok(if prefix {
        McpPath::Prefix(base.to_owned())
    } else {
        McpPath::Exact(base.to_owned())
    })
}

impl Checker<'_> {
    /// The `[[mcp_servers]]` registry.
    fn mcp_servers(&mut self, raw: &[Spanned<RawMcpServer>]) -> Vec<McpServer> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut places: HashMap<(String, String), usize> = HashMap::new();
        let mut servers = Vec::with_capacity(raw.len());
        for (i, spanned) in raw.iter().enumerate() {
            let m = spanned.get_ref();
            let at = |field: &str| format!("mcp_servers[{i}].{field}");
            let before = self.issues.len();
            self.agent_name(&m.name, at("name"));
            if let Some(first) = names.get(m.name.get_ref().as_str()) {
                let msg = format!(
                    "name \"{}\" is already used by mcp_servers[{first}]",
                    m.name.get_ref()
                );
                self.issue(m.name.span(), at("name"), msg);
            } else {
                names.insert(m.name.get_ref(), i);
            }
            let host = match normalize_name(m.host.get_ref()) {
                Ok(host) => host,
                Err(e) => {
                    self.issue(m.host.span(), at("host"), e.to_string());
                    String::new()
                }
            };
            let path = match mcp_path(m.path.get_ref()) {
                Ok(path) => Some(path),
                Err(msg) => {
                    self.issue(m.path.span(), at("path"), msg);
                    None
                }
            };
            if self.issues.len() != before {
                continue;
            }
            let Some(path) = path else { continue };
            let place = (host.clone(), path.to_string());
            if let Some(first) = places.get(&place) {
                let msg = format!(
                    "host \"{host}\" and path \"{path}\" are already mcp_servers[{first}]'s"
                );
                self.issue(m.path.span(), at("path"), msg);
                continue;
            }
            places.insert(place, i);
            servers.push(McpServer {
                name: m.name.get_ref().clone(),
                host,
                path,
            });
        }
        servers
    }

    /// An agent's or a profile's `mcp` table, at `at` (`agents[0].mcp`).
    fn agent_mcp(
        &mut self,
        raw: Option<&RawAgentMcp>,
        servers: &[McpServer],
        at: &str,
    ) -> Option<AgentMcp> {
        let raw = raw?;
        let mut grants: Vec<McpGrant> = Vec::with_capacity(raw.servers.len());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (j, spanned) in raw.servers.iter().enumerate() {
            let g = spanned.get_ref();
            let at = |field: &str| format!("{at}.servers[{j}].{field}");
            let before = self.issues.len();
            let name = g.server.get_ref().as_str();
            if !servers.iter().any(|s| s.name == name) {
                let known = servers
                    .iter()
                    .map(|s| format!("\"{}\"", s.name))
                    .collect::<Vec<_>>();
                let msg = if known.is_empty() {
                    format!("no mcp_servers entry is called \"{name}\"; there are none")
                } else {
                    format!(
                        "no mcp_servers entry is called \"{name}\"; expected one of {}",
                        known.join(", ")
                    )
                };
                self.issue(g.server.span(), at("server"), msg);
            } else if let Some(first) = seen.get(name) {
                let msg = format!("server \"{name}\" is already granted by servers[{first}]");
                self.issue(g.server.span(), at("server"), msg);
            } else {
                seen.insert(name, j);
            }
            let tools = g.tools.as_ref().map(|tools| {
                let mut out: Vec<String> = Vec::with_capacity(tools.len());
                for (k, tool) in tools.iter().enumerate() {
                    let t = tool.get_ref();
                    let field = at(&format!("tools[{k}]"));
                    if t.is_empty() || t.len() > MAX_MCP_TOOL_LEN || t.chars().any(char::is_control)
                    {
                        let msg = format!(
                            "expected a tool name of 1 to {MAX_MCP_TOOL_LEN} bytes without \
                             control characters, got {t:?}"
                        );
                        self.issue(tool.span(), field, msg);
                    } else if out.contains(t) {
                        let msg = format!("tool \"{t}\" is listed twice");
                        self.issue(tool.span(), field, msg);
                    } else {
                        out.push(t.clone());
                    }
                }
                out
            });
            let rate = self
                .mcp_pair(
                    (&g.calls_per_minute, "calls_per_minute"),
                    (&g.burst, "burst"),
                    (MAX_MCP_CALLS_PER_MINUTE, MAX_MCP_CALLS_PER_MINUTE),
                    &at,
                )
                .map(|(per_minute, burst)| McpRate { per_minute, burst });
            let quota = self
                .mcp_pair(
                    (&g.quota, "quota"),
                    (&g.quota_seconds, "quota_seconds"),
                    (u64::from(u32::MAX), MAX_MCP_QUOTA_SECONDS),
                    &at,
                )
                .map(|(calls, seconds)| McpQuota { calls, seconds });
            if self.issues.len() == before {
                grants.push(McpGrant {
                    server: name.to_owned(),
                    tools,
                    rate,
                    quota,
                });
            }
        }
        Some(AgentMcp {
            shadow: raw.shadow,
            servers: grants,
        })
    }

    /// Two integer fields that come together (`calls_per_minute` and `burst`), each in
    /// `1..=max`: both or neither.
    fn mcp_pair(
        &mut self,
        (a, a_name): (&Option<Spanned<i64>>, &str),
        (b, b_name): (&Option<Spanned<i64>>, &str),
        (a_max, b_max): (u64, u64),
        at: &dyn Fn(&str) -> String,
    ) -> Option<(u64, u64)> {
        match (a, b) {
            (None, None) => None,
            (Some(v), None) | (None, Some(v)) => {
                let (given, missing) = if a.is_some() {
                    (a_name, b_name)
                } else {
                    (b_name, a_name)
                };
                let msg = format!("{given} needs {missing} too (both or neither)");
                self.issue(v.span(), at(given), msg);
                None
            }
            (Some(_), Some(_)) => {
                let x = self.number(a, at(a_name), 1..=a_max, 0);
                let y = self.number(b, at(b_name), 1..=b_max, 0);
                Some((x?, y?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the module documentation, verbatim.
    const EXAMPLE: &str = r#"[defaults]
unknown = "pass"          # traffic from no known agent: "pass" (default) or "drop"

[[agents]]
id = 1                    # 1..=max_agents, unique; it is the agent's index in the maps
name = "coder"            # unique, [A-Za-z0-9_.-]{1,64}
interfaces = ["veth-coder"]         # host-side interfaces that identify the agent (optional)
prefixes = ["10.77.1.2/32", "fd77:1::2/128"]  # source prefixes that identify it (optional; a bare address means /32 or /128)
mode = "enforce"          # or "monitor" (would-drops counted, packets pass); default enforce
egress_default = "deny"   # destination matching no rule: "deny" (default) or "allow"
rate = { packets_per_sec = 1000, packets_burst = 100, bytes_per_sec = 1_000_000, bytes_burst = 100_000 }  # optional table, each limit optional; bursts default to max(rate/10, 1 packet) and max(bytes/10, 9000 bytes)

[[agents.egress]]
action = "allow"          # or "deny", or "reject" (a drop answered with a TCP RST or an ICMP unreachable, so the agent's call fails at once)
to = ["10.77.2.0/24", "@metadata"]   # CIDRs, bare addresses, or @presets
proto = "tcp"             # "tcp" | "udp" | "icmp" | "any" (default any)
ports = "443"             # "443", "8000-8100", an integer, or omitted = all ports; an error with proto icmp
"#;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// The issues of a policy that must fail validation, as displayed.
    fn issues(text: &str) -> Vec<String> {
        match parse("p.toml", text) {
            Ok(p) => panic!("expected an error, got {p:#?}"),
            Err(PolicyError::Invalid { issues }) => issues.iter().map(Issue::to_string).collect(),
            Err(e) => panic!("expected validation issues, got {e}"),
        }
    }

    /// The single issue of a policy that must fail validation.
    fn issue(text: &str) -> String {
        let all = issues(text);
        assert_eq!(all.len(), 1, "{all:#?}");
        all.into_iter().next().unwrap()
    }

    /// One agent with an identity, then `extra` lines in its table.
    fn agent(extra: &str) -> String {
        format!("[[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"veth-a\"]\n{extra}")
    }

    #[test]
    fn an_empty_policy_is_an_error_and_no_agents_is_said_explicitly() {
        for text in ["", "\n  \n", "# only a comment\n"] {
            let e = parse("policy.toml", text).unwrap_err().to_string();
            assert!(
                e.contains("policy.toml:1:1") && e.contains("the policy is empty"),
                "{text:?}: {e}"
            );
        }
        assert!(
            parse("policy.toml", "agents = []\n")
                .unwrap()
                .agents()
                .is_empty()
        );
        assert!(parse("policy.toml", "[defaults]\nunknown = \"drop\"\n").is_ok());
    }

    #[test]
    fn documented_example_parses() {
        let p = parse("policy.toml", EXAMPLE).unwrap();
        assert_eq!(p.unknown(), UnknownTraffic::Pass);
        let expected = Agent {
            id: 1,
            name: "coder".into(),
            interfaces: vec!["veth-coder".into()],
            sources: vec![net("10.77.1.2/32"), net("fd77:1::2/128")],
            mode: Mode::Enforce,
            egress_default: EgressDefault::Deny,
            rate: Rate {
                packets: Some(Limit {
                    per_sec: 1000,
                    burst: 100,
                }),
                bytes: Some(Limit {
                    per_sec: 1_000_000,
                    burst: 100_000,
                }),
            },
            egress: vec![EgressRule {
                action: Action::Allow,
                to: vec![
                    Destination::Net(net("10.77.2.0/24")),
                    Destination::Preset {
                        name: "@metadata",
                        nets: vec![
                            net("169.254.169.254/32"),
                            net("169.254.170.2/32"),
                            net("100.100.100.200/32"),
                            net("fd00:ec2::254/128"),
                        ],
                    },
                ],
                proto: Proto::Tcp,
                ports: PortRange { lo: 443, hi: 443 },
                shared: None,
                always: false,
            }],
            inspect: false,
            guards: Guards::default(),
            mcp: None,
        };
        assert_eq!(p.agents(), &[expected]);
    }

    #[test]
    fn defaults_apply() {
        let p = parse(
            "p.toml",
            &agent("prefixes = [\"10.0.0.1\", \"fd00::/8\"]\n"),
        )
        .unwrap();
        assert_eq!(p.unknown(), UnknownTraffic::Pass);
        let a = &p.agents()[0];
        assert_eq!(a.mode, Mode::Enforce);
        assert_eq!(a.egress_default, EgressDefault::Deny);
        assert_eq!(a.rate, Rate::default());
        assert!(a.egress.is_empty());
        // A bare address is a host route.
        assert_eq!(a.sources, vec![net("10.0.0.1/32"), net("fd00::/8")]);

        let p = parse("p.toml", "agents = []\n").unwrap();
        assert!(p.agents().is_empty());
    }

    #[test]
    fn rule_defaults_and_port_forms() {
        let p = parse(
            "p.toml",
            &agent(
                "[[agents.egress]]\naction = \"deny\"\nto = [\"::1\"]\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nproto = \"udp\"\nports = 53\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nproto = \"tcp\"\nports = \"8000-8100\"\n",
            ),
        )
        .unwrap();
        let e = &p.agents()[0].egress;
        assert_eq!(e[0].proto, Proto::Any);
        assert_eq!(e[0].ports, PortRange::ALL);
        assert_eq!(e[0].to, vec![Destination::Net(net("::1/128"))]);
        assert_eq!(e[1].ports, PortRange { lo: 53, hi: 53 });
        assert_eq!(e[2].ports, PortRange { lo: 8000, hi: 8100 });
    }

    #[test]
    fn burst_defaults() {
        let p = parse(
            "p.toml",
            &agent("rate = { packets_per_sec = 5, bytes_per_sec = 1_000_000 }\n"),
        )
        .unwrap();
        let r = p.agents()[0].rate;
        assert_eq!(
            r.packets,
            Some(Limit {
                per_sec: 5,
                burst: 1
            })
        );
        assert_eq!(
            r.bytes,
            Some(Limit {
                per_sec: 1_000_000,
                burst: 100_000
            })
        );
        let p = parse(
            "p.toml",
            &agent("rate = { packets_per_sec = 1000, bytes_per_sec = 1000 }\n"),
        )
        .unwrap();
        let r = p.agents()[0].rate;
        assert_eq!(r.packets.unwrap().burst, 100);
        assert_eq!(r.bytes.unwrap().burst, 9000);
    }

    #[test]
    fn presets_expand_and_parse() {
        for preset in PRESETS {
            let Ok(Destination::Preset { name, nets }) = destination(preset.name) else {
                panic!("{} did not expand", preset.name);
            };
            assert_eq!(name, preset.name);
            assert_eq!(nets.len(), preset.prefixes.len());
            for (text, parsed) in preset.prefixes.iter().zip(&nets) {
                assert_eq!(text.parse::<IpNet>().as_ref(), Ok(parsed));
            }
            assert!(!preset.description.is_empty());
        }
        let prefixes = |name: &str| {
            let mut p = PRESETS
                .iter()
                .find(|p| p.name == name)
                .unwrap()
                .prefixes
                .to_vec();
            p.sort();
            p
        };
        // @private is exactly the union of the four non-public presets, RFC 6598's shared
        // space included, and says so.
        let mut union: Vec<&str> = ["@rfc1918", "@ula", "@link-local", "@shared"]
            .iter()
            .flat_map(|p| prefixes(p))
            .collect();
        union.sort();
        assert_eq!(prefixes("@private"), union);
        assert!(prefixes("@private").contains(&"100.64.0.0/10"));
        let private = PRESETS.iter().find(|p| p.name == "@private").unwrap();
        assert!(private.description.contains("RFC 6598"));
    }

    #[test]
    fn ipnet_parsing() {
        assert_eq!(net("10.1.2.3"), IpNet::host("10.1.2.3".parse().unwrap()));
        assert_eq!(net("0.0.0.0/0").prefix_len(), 0);
        assert!(net("10.0.0.0/8").contains(&net("10.1.0.0/16")));
        assert!(!net("10.1.0.0/16").contains(&net("10.0.0.0/8")));
        assert!(!net("0.0.0.0/0").contains(&net("::/128")));
        assert!(net("::/0").contains(&net("fd00::1")));
        assert_eq!(
            "10.0.0.1/24".parse::<IpNet>().unwrap_err().to_string(),
            "10.0.0.1/24 has host bits set; did you mean 10.0.0.0/24?"
        );
        assert_eq!(
            "fd00::1/8".parse::<IpNet>().unwrap_err().to_string(),
            "fd00::1/8 has host bits set; did you mean fd00::/8?"
        );
        assert_eq!(
            "10.0.0.0/33".parse::<IpNet>().unwrap_err().to_string(),
            "prefix length 33 is longer than the 32 bits of the address"
        );
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "host",
            "fe80::1%eth0",
            "1.2.3.4/8/8",
        ] {
            assert!(
                matches!(bad.parse::<IpNet>(), Err(NetError::Syntax { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "10.0.0.0/999".parse::<IpNet>(),
            Err(NetError::TooLong { .. })
        ));
    }

    #[test]
    fn syntax_error_has_location() {
        let err = parse("p.toml", "[[agents]]\nid = = 1\n").unwrap_err();
        let PolicyError::Syntax { issues, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(issues.len(), 1, "{err}");
        let location = &issues[0].location;
        assert_eq!((location.line, location.column), (2, 6), "{err}");
        assert!(err.to_string().starts_with("p.toml:2:6: "), "{err}");
        assert!(!err.to_string().contains("syntax errors"), "{err}");

        let err = parse("p.toml", "a = 1\na = 2\n").unwrap_err();
        assert!(err.to_string().starts_with("p.toml:2:1: "), "{err}");
    }

    #[test]
    fn every_syntax_error_is_reported() {
        // Three broken lines between good ones: each is reported where it is, in order,
        // with a note that later errors may be echoes of earlier ones.
        let text = "[[agents]]\nid = = 1\nname = \"a\"\nprefixes = [\"10.0.0.1\"]\n\
                    mode = enforce\n[[agents]]\nid = 2\nname = \"b\" x\n";
        let err = parse("p.toml", text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.toml:2:6: extra `=`, expected nothing\n\
             p.toml:5:8: string values must be quoted, expected literal string\n\
             p.toml:8:12: unexpected key or value, expected newline, `#`\n\
             3 syntax errors; later ones may follow from earlier ones"
        );
        assert_eq!(err.issues().len(), 3);

        // A file that is not TOML at all is cut short, and says so.
        let junk = "= = =\n".repeat(100);
        let err = parse("p.toml", &junk).unwrap_err();
        let PolicyError::Syntax { issues, more } = &err else {
            panic!("not a syntax error: {err}");
        };
        assert_eq!((issues.len(), *more), (MAX_SYNTAX_ERRORS, 80));
        assert!(
            err.to_string().ends_with(
                "\n100 syntax errors, the first 20 shown; later ones may follow from earlier ones"
            ),
            "{err}"
        );
    }

    #[test]
    fn binary_file_names_its_first_bad_byte() {
        let path = std::env::temp_dir().join(format!("enforcer-policy-{}.bin", std::process::id()));
        fs::write(&path, b"[defaults]\nunknown = \"dr\xffop\"\n").unwrap();
        let err = load(&path).unwrap_err();
        fs::remove_file(&path).unwrap();
        let PolicyError::NotText {
            location,
            offset,
            byte,
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!((*offset, *byte), (24, 0xff));
        assert_eq!((location.line, location.column), (2, 14));
        assert_eq!(
            err.to_string(),
            format!(
                "{}:2:14: not UTF-8 text (byte 0xff at offset 24); a policy is a TOML file",
                path.display()
            )
        );
    }

    #[test]
    fn issues_found_after_validation_point_at_their_field() {
        let text = "[[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.0.0.1\"]\n\
                    [[agents]]\nid = 7\nname = \"b\"\nprefixes = [\"10.0.0.2\", \"10.0.0.3\"]\n\
                    rate = { packets_per_sec = 5 }\n";
        let at = |field: &str| issue_at("p.toml", text, field.into(), "m".into()).to_string();
        assert_eq!(at("agents[1].id"), "p.toml:6:6: agents[1].id: m");
        assert_eq!(
            at("agents[1].prefixes[1]"),
            "p.toml:8:25: agents[1].prefixes[1]: m"
        );
        assert_eq!(
            at("agents[1].rate.packets_per_sec"),
            "p.toml:9:28: agents[1].rate.packets_per_sec: m"
        );
        // A path that goes further than the document stops at the deepest part there.
        assert_eq!(at("agents[1].egress"), "p.toml:5:1: agents[1].egress: m");
    }

    #[test]
    fn unknown_field_names_path() {
        let text = agent("[[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nport = 443\n");
        assert_eq!(
            issue(&text),
            "p.toml:8:1: agents[0].egress[0].port: unknown field `port`, expected one of \
             `action`, `to`, `proto`, `ports`, `shared`, `always`"
        );
        assert_eq!(
            issue("[default]\nunknown = \"drop\"\n"),
            "p.toml:1:2: default: unknown field `default`, expected one of `defaults`, \
             `agents`, `profiles`, `detectors`, `dlp`, `shared`, `mcp_servers`"
        );
        assert_eq!(
            issue(&agent("rate = { packets_per_second = 5 }\n")),
            "p.toml:5:10: agents[0].rate.packets_per_second: unknown field \
             `packets_per_second`, expected one of `packets_per_sec`, `packets_burst`, \
             `bytes_per_sec`, `bytes_burst`"
        );
    }

    #[test]
    fn type_errors_name_path() {
        assert_eq!(
            issue("[defaults]\nunknown = \"dorp\"\n"),
            "p.toml:2:11: defaults.unknown: unknown variant `dorp`, expected `pass` or `drop`"
        );
        assert_eq!(
            issue(&agent("mode = \"audit\"\n")),
            "p.toml:5:8: agents[0].mode: unknown variant `audit`, expected `enforce` or `monitor`"
        );
        assert_eq!(
            issue("[[agents]]\nid = \"1\"\nname = \"a\"\n"),
            "p.toml:2:6: agents[0].id: invalid type: string \"1\", expected i64"
        );
        assert_eq!(
            issue(&agent(
                "[[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nports = true\n"
            )),
            "p.toml:8:9: agents[0].egress[0].ports: invalid type: boolean `true`, expected a \
             port like 443 or a string like \"443\" or \"8000-8100\""
        );
        assert_eq!(
            issue("[[agents]]\nid = 1\n"),
            "p.toml:1:1: agents[0]: missing field `name`"
        );
        assert_eq!(
            issue(&agent("[[agents.egress]]\nto = [\"@any\"]\n")),
            "p.toml:5:1: agents[0].egress[0]: missing field `action`"
        );
    }

    #[test]
    fn bad_ports() {
        let rule = |ports: &str, proto: &str| {
            agent(&format!(
                "[[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nproto = \"{proto}\"\n    ports = {ports}\n"
            ))
        };
        assert_eq!(
            issue(&rule("\"80-\"", "tcp")),
            "p.toml:9:13: agents[0].egress[0].ports: expected a port or range like \"443\" or \
             \"8000-8100\", got \"80-\""
        );
        assert_eq!(
            issue(&rule("\"http\"", "tcp")),
            "p.toml:9:13: agents[0].egress[0].ports: expected a port or range like \"443\" or \
             \"8000-8100\", got \"http\""
        );
        assert_eq!(
            issue(&rule("70000", "udp")),
            "p.toml:9:13: agents[0].egress[0].ports: port 70000 is outside 0-65535"
        );
        assert_eq!(
            issue(&rule("\"1-70000\"", "udp")),
            "p.toml:9:13: agents[0].egress[0].ports: port 70000 is outside 0-65535"
        );
        assert_eq!(
            issue(&rule("\"8100-8000\"", "udp")),
            "p.toml:9:13: agents[0].egress[0].ports: range \"8100-8000\" runs backwards; did \
             you mean \"8000-8100\"?"
        );
        assert_eq!(
            issue(&rule("\"1\"", "icmp")),
            "p.toml:9:13: agents[0].egress[0].ports: ports do not apply to proto \"icmp\"; \
             remove ports, or use proto \"tcp\", \"udp\" or \"any\""
        );
    }

    #[test]
    fn bad_destinations() {
        let text = agent(
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.1/24\", \"@nope\", \"::/0\", \"x\"]\n\
             [[agents.egress]]\naction = \"deny\"\nto = []\n",
        );
        assert_eq!(
            issues(&text),
            vec![
                "p.toml:7:7: agents[0].egress[0].to[0]: 10.0.0.1/24 has host bits set; did you \
                 mean 10.0.0.0/24?",
                "p.toml:7:22: agents[0].egress[0].to[1]: unknown preset \"@nope\"; known \
                 presets: @rfc1918, @ula, @link-local, @shared, @private, @metadata, @loopback, \
                 @any",
                "p.toml:7:39: agents[0].egress[0].to[3]: expected an IP address or CIDR like \
                 \"10.0.0.0/8\" or \"fd00::/8\", got \"x\"",
                "p.toml:10:6: agents[0].egress[1].to: expected at least one destination (a \
                 CIDR, an address or a preset like \"@any\")",
            ]
        );
    }

    #[test]
    fn bad_agent_fields() {
        let text = "[[agents]]\nid = 0\nname = \"bad name\"\ninterfaces = [\"a/b\", \"waytoolonginterface\"]\nprefixes = [\"10.0.0.0/33\"]\n\
                    [[agents]]\nid = 16777216\nname = \"b\"\nprefixes = [\"fd00::\"]\n\
                    [[agents]]\nid = -1\nname = \"\"\n";
        assert_eq!(
            issues(text),
            vec![
                "p.toml:2:6: agents[0].id: agent ids start at 1 (0 stands for traffic from no \
                 known agent)",
                "p.toml:3:8: agents[0].name: expected 1 to 64 characters from A-Z a-z 0-9 _ . \
                 -, got \"bad name\"",
                "p.toml:4:15: agents[0].interfaces[0]: expected an interface name of 1 to 15 \
                 bytes without '/', ':' or whitespace, got \"a/b\"",
                "p.toml:4:22: agents[0].interfaces[1]: expected an interface name of 1 to 15 \
                 bytes without '/', ':' or whitespace, got \"waytoolonginterface\"",
                "p.toml:5:13: agents[0].prefixes[0]: prefix length 33 is longer than the 32 bits \
                 of the address",
                "p.toml:7:6: agents[1].id: expected an agent id in 1..=16777215, got 16777216",
                "p.toml:11:6: agents[2].id: expected an agent id in 1..=16777215, got -1",
                "p.toml:12:8: agents[2].name: expected 1 to 64 characters from A-Z a-z 0-9 _ . \
                 -, got \"\"",
                "p.toml:10:1: agents[2]: agent \"\" (agents[2]) has neither interfaces nor \
                 prefixes, so no traffic could be attributed to it; give it at least one",
            ]
        );
    }

    #[test]
    fn duplicates_name_both_agents() {
        let text = "[[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"veth0\", \"veth0\"]\nprefixes = [\"10.0.0.1\", \"10.0.0.1/32\"]\n\
                    [[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"veth0\"]\nprefixes = [\"10.0.0.1/32\", \"10.0.0.0/31\"]\n";
        assert_eq!(
            issues(text),
            vec![
                "p.toml:4:24: agents[0].interfaces[1]: interface \"veth0\" is listed twice",
                "p.toml:5:25: agents[0].prefixes[1]: source prefix 10.0.0.1/32 is listed twice",
                "p.toml:7:6: agents[1].id: agent \"a\" (agents[1]) reuses id 1 of agent \"a\" \
                 (agents[0]); ids must be unique",
                "p.toml:8:8: agents[1].name: name \"a\" is already used by agent \"a\" \
                 (agents[0])",
                "p.toml:9:15: agents[1].interfaces[0]: interface \"veth0\" of agent \"a\" \
                 (agents[1]) already identifies agent \"a\" (agents[0]); an interface can \
                 identify only one agent",
                "p.toml:10:13: agents[1].prefixes[0]: source prefix 10.0.0.1/32 of agent \"a\" \
                 (agents[1]) already identifies agent \"a\" (agents[0]); a source prefix can \
                 identify only one agent",
            ]
        );
    }

    #[test]
    fn bad_rates() {
        let text = agent(
            "rate = { packets_per_sec = 0, packets_burst = 0, bytes_per_sec = 1_000_000_000_001, bytes_burst = 1000 }\n",
        );
        assert_eq!(
            issues(&text),
            vec![
                "p.toml:5:47: agents[0].rate.packets_burst: expected a burst of at least 1 \
                 packet, got 0",
                "p.toml:5:28: agents[0].rate.packets_per_sec: expected 1 to 1000000000 (omit \
                 the field for no limit), got 0",
                "p.toml:5:99: agents[0].rate.bytes_burst: expected at least 1518 bytes, got \
                 1000: a smaller burst could never pass a full-size Ethernet frame",
                "p.toml:5:66: agents[0].rate.bytes_per_sec: expected 1 to 1000000000000 (omit \
                 the field for no limit), got 1000000000001",
            ]
        );
        assert_eq!(
            issue(&agent("rate = { bytes_burst = 10_000 }\n")),
            "p.toml:5:24: agents[0].rate.bytes_burst: bytes_burst has no effect without \
             bytes_per_sec; set bytes_per_sec or remove bytes_burst"
        );
        assert_eq!(
            issue(&agent("rate = { packets_per_sec = -5 }\n")),
            "p.toml:5:28: agents[0].rate.packets_per_sec: expected 1 to 1000000000 (omit the \
             field for no limit), got -5"
        );
    }

    #[test]
    fn detectors_and_inspect_switch() {
        let text = format!(
            "{}inspect = true\n\n[[detectors]]\nname = \"key\"\nliteral = \"sk-live-\"\naction = \"block\"\n\n[[detectors]]\nname = \"mcp\"\nliteral = '\"method\":\"tools/call\"'\naction = \"flag\"\n",
            agent("")
        );
        let p = parse("p.toml", &text).unwrap();
        assert!(p.agents()[0].inspect);
        assert_eq!(
            p.detectors(),
            &[
                Detector {
                    name: "key".into(),
                    pattern: DetectorPattern::Literal("sk-live-".into()),
                    action: DetectorAction::Block,
                    direction: DetectorDirection::Both,
                },
                Detector {
                    name: "mcp".into(),
                    pattern: DetectorPattern::Literal(r#""method":"tools/call""#.into()),
                    action: DetectorAction::Flag,
                    direction: DetectorDirection::Both,
                },
            ]
        );
        assert!(!parse("p.toml", &agent("")).unwrap().agents()[0].inspect);
    }

    #[test]
    fn bad_detectors() {
        let text = "[[detectors]]\nname = \"k\"\nliteral = \"\"\naction = \"flag\"\n\n\
                    [[detectors]]\nname = \"k\"\nliteral = \"x\"\naction = \"block\"\n\n\
                    [[detectors]]\nname = \"bad name\"\nliteral = \"x\"\naction = \"flag\"\n";
        assert_eq!(
            issues(text),
            vec![
                "p.toml:3:11: detectors[0].literal: expected 1 to 64 bytes, got 0",
                "p.toml:7:8: detectors[1].name: name \"k\" is already used by detectors[0]",
                "p.toml:12:8: detectors[2].name: expected 1 to 64 characters from A-Z a-z 0-9 \
                 _ . -, got \"bad name\"",
            ]
        );
        assert_eq!(
            issue("[[detectors]]\nname = \"k\"\nliteral = \"x\"\naction = \"drop\"\n"),
            "p.toml:4:10: detectors[0].action: unknown variant `drop`, expected `block` or \
             `flag`"
        );
    }

    #[test]
    fn regex_detectors_directions_and_dlp() {
        let text = "[[detectors]]\nname = \"aws\"\nregex = '\\bAKIA[0-9A-Z]{16}\\b'\n\
                    action = \"block\"\ndirection = \"up\"\n\n\
                    [dlp]\ncatalogue = \"block\"\ncatalogue_except = [\"bearer\"]\n";
        let p = parse("p.toml", text).unwrap();
        assert_eq!(
            p.detectors(),
            &[Detector {
                name: "aws".into(),
                pattern: DetectorPattern::Regex(r"\bAKIA[0-9A-Z]{16}\b".into()),
                action: DetectorAction::Block,
                direction: DetectorDirection::Up,
            }]
        );
        assert_eq!(
            p.dlp(),
            &Dlp {
                catalogue: CatalogueMode::Block,
                catalogue_except: vec!["bearer".into()],
            }
        );
        // Off unless the policy says otherwise.
        assert_eq!(
            parse("p.toml", "agents = []\n").unwrap().dlp(),
            &Dlp::default()
        );
        assert_eq!(
            regex_shape(r"(?i)bearer[ \t]{1,8}[a-z]{20,400}")
                .unwrap()
                .max_len,
            6 + 8 + 400
        );
        assert_eq!(
            regex_shape(r"-----BEGIN ((RSA|EC) )?PRIVATE KEY-----")
                .unwrap()
                .starts
                .len(),
            3
        );
    }

    #[test]
    fn bad_regex_detectors_and_dlp() {
        let detector =
            |pattern: &str| format!("[[detectors]]\nname = \"k\"\n{pattern}\naction = \"block\"\n");
        let unbounded = "a regex detector needs a literal start such as `AKIA` and a bounded \
                         length: write `{20,400}`, not `+`";
        assert_eq!(
            issue(&detector("regex = 'AKIA[0-9A-Z]+'")),
            format!("p.toml:3:9: detectors[0].regex: {unbounded}")
        );
        assert_eq!(
            issue(&detector("regex = '[0-9A-Z]{16}'")),
            format!("p.toml:3:9: detectors[0].regex: {unbounded}")
        );
        assert_eq!(
            issue(&detector("regex = 'a?b?'")),
            format!("p.toml:3:9: detectors[0].regex: {unbounded}")
        );
        assert_eq!(
            issue(&detector("regex = 'x[a-z]{1,9000}'")),
            "p.toml:3:9: detectors[0].regex: a regex detector's matches may be at most 8192 \
             bytes long, this one's up to 9001"
        );
        assert_eq!(
            issue(&detector("regex = 'x[ab]{0,20}a[ab]{20}'")),
            "p.toml:3:9: detectors[0].regex: the regex needs more than 8 MiB as a DFA: fewer \
             or smaller counted repetitions after an ambiguous part"
        );
        assert_eq!(
            issue(&detector("regex = 'AKIA[0-9'")),
            "p.toml:3:9: detectors[0].regex: at byte 4 of the regex: unclosed character class"
        );
        assert_eq!(
            issue(&detector("literal = \"x\"\nregex = 'x'")),
            "p.toml:4:9: detectors[0].regex: a detector has either `literal` or `regex`, not both"
        );
        assert_eq!(
            issue(&detector("")),
            "p.toml:1:1: detectors[0]: a detector needs `literal` or `regex`"
        );
        assert_eq!(
            issue(&format!(
                "{}direction = \"sideways\"\n",
                detector("literal = \"x\"")
            )),
            "p.toml:5:13: detectors[0].direction: unknown variant `sideways`, expected one of \
             `up`, `down`, `both`"
        );
        assert_eq!(
            issue("[dlp]\ncatalogue = \"on\"\n"),
            "p.toml:2:13: dlp.catalogue: unknown variant `on`, expected one of `off`, `flag`, \
             `block`"
        );
        let err =
            issue("[dlp]\ncatalogue = \"flag\"\ncatalogue_except = [\"bearer\", \"berer\"]\n");
        assert!(
            err.starts_with(
                "p.toml:3:31: dlp.catalogue_except[1]: no catalogue entry is called \"berer\"; \
                 the entries are aws-access-key-id, "
            ),
            "{err}"
        );
    }

    #[test]
    fn columns_count_characters() {
        // The name holds a two-byte character; the column after it counts it once.
        let text = "[[agents]]\nid = 1\nname = \"é\" ; x\n";
        let err = parse("p.toml", text).unwrap_err();
        assert!(err.to_string().starts_with("p.toml:3:12: "), "{err}");
    }

    #[test]
    fn load_names_missing_file() {
        let err = load(Path::new("/nonexistent/policy.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading policy file /nonexistent/policy.toml"
        );
        assert!(matches!(err, PolicyError::Read { .. }));
    }

    #[test]
    fn host_names_parse_normalize_and_match() {
        let p = parse(
            "p.toml",
            &format!(
                "[defaults]\ntls_ports = [443, 8443]\n{}",
                agent(
                    "prefixes = [\"10.0.0.0/8\", \"10.1.0.7\"]\n\
                     [[agents.egress]]\naction = \"allow\"\n\
                     to = [\"API.Example.test.\", \"*.cdn.example.test\", \"10.0.2.0/24\"]\n\
                     proto = \"tcp\"\nports = 443\n\
                     [[agents.egress]]\naction = \"allow\"\nto = [\"api.example.test\"]\n\
                     proto = \"udp\"\nports = \"8000-8100\"\n"
                )
            ),
        )
        .unwrap();
        assert_eq!(p.tls_ports(), [443, 8443]);
        let a = &p.agents()[0];
        assert!(a.has_names());
        assert_eq!(
            a.egress[0].to[..2],
            [
                Destination::Name(NamePattern::Exact("api.example.test".into())),
                Destination::Name(NamePattern::Wildcard(".cdn.example.test".into())),
            ]
        );
        assert_eq!(
            a.name_rules("api.example.test"),
            [
                (Proto::Tcp, PortRange { lo: 443, hi: 443 }),
                (Proto::Udp, PortRange { lo: 8000, hi: 8100 }),
            ]
        );
        assert!(a.allows_name("x.y.cdn.example.test", Proto::Tcp, 443));
        assert!(!a.allows_name("cdn.example.test", Proto::Tcp, 443));
        assert!(!a.allows_name("xcdn.example.test", Proto::Tcp, 443));
        assert!(!a.allows_name("api.example.test", Proto::Tcp, 80));
        assert!(a.name_rules("other.test").is_empty());
        assert_eq!(p.agent_by_interface("veth-a").map(|a| a.id), Some(1));
        assert_eq!(
            p.agent_by_source("10.1.0.7".parse().unwrap()).map(|a| a.id),
            Some(1)
        );
        assert!(p.agent_by_source("11.0.0.1".parse().unwrap()).is_none());
        assert_eq!(
            parse("p.toml", &agent("")).unwrap().tls_ports(),
            DEFAULT_TLS_PORTS
        );
    }

    #[test]
    fn reject_rules_parse_and_follow_the_deny_rules() {
        let p = parse(
            "p.toml",
            &agent(
                "[[agents.egress]]\naction = \"reject\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\n\
                 ports = \"80\"\n",
            ),
        )
        .unwrap();
        let rule = &p.agents[0].egress[0];
        assert_eq!(rule.action, Action::Reject);
        assert!(rule.action.drops() && Action::Deny.drops() && !Action::Allow.drops());
        assert_eq!(
            issue(&agent(
                "[[agents.egress]]\naction = \"reject\"\nto = [\"api.example.test\"]\n\
                 proto = \"tcp\"\n"
            )),
            "p.toml:7:7: agents[0].egress[0].to[0]: host names can only be allowed: a name the \
             agent may not use is refused by its DNS resolver already; deny addresses with \
             CIDRs or presets"
        );
        assert!(
            issue(&agent(
                "[[agents.egress]]\naction = \"refuse\"\nto = [\"10.0.0.0/8\"]\n"
            ))
            .contains("reject")
        );
    }

    #[test]
    fn bad_host_names_are_reported_where_they_are() {
        let rule = |to: &str, action: &str| {
            agent(&format!(
                "[[agents.egress]]\naction = \"{action}\"\nto = [{to}]\nproto = \"tcp\"\n"
            ))
        };
        assert_eq!(
            issue(&rule("\"api.example.test\"", "deny")),
            "p.toml:7:7: agents[0].egress[0].to[0]: host names can only be allowed: a name the \
             agent may not use is refused by its DNS resolver already; deny addresses with \
             CIDRs or presets"
        );
        assert!(
            issue(&rule("\"a*.example.test\"", "allow"))
                .contains("a wildcard is a whole leftmost label")
        );
        assert!(issue(&rule("\"bad!name.test\"", "allow")).contains("has '!'"));
        assert!(issue(&rule("\"a..b.test\"", "allow")).contains("label 1"));
        assert!(
            issue(&format!(
                "[defaults]\ntls_ports = [1, 2, 3, 4, 5]\n{}",
                agent("")
            ))
            .contains("at most 4")
        );
        assert!(normalize_name(&"a".repeat(254)).is_err());
    }
    /// The profile example of the module documentation, with an agent beside it.
    const PROFILES: &str = r#"[[agents]]
id = 1
name = "coder-7"
interfaces = ["agt-coder-7"]

[[profiles]]
name = "coder"
interfaces = ["agt-coder-*", "fc-tap?"]
mode = "monitor"
egress_default = "deny"
rate = { packets_per_sec = 1000 }
egress = [ { action = "allow", to = ["@private"], proto = "udp", ports = 53 } ]
inspect = true

[[profiles]]
name = "any-agent"
interfaces = ["agt-*"]

[[profiles]]
name = "by-hand"
"#;

    /// The profile example from the module documentation, verbatim.
    const PROFILE_EXAMPLE: &str = r#"[[profiles]]
name = "coder"            # unique among profiles and agents, [A-Za-z0-9_.-]{1,64}
interfaces = ["agt-coder-*", "fc-tap?"]   # patterns of 1 to 15 bytes: '*' any run, '?' one byte (optional)
mode = "monitor"          # mode, egress_default, rate, egress, inspect and guards as for agents
egress = [ { action = "allow", to = ["@private"], proto = "udp", ports = 53 } ]
"#;

    #[test]
    fn documented_profile_example_parses() {
        let p = parse("policy.toml", PROFILE_EXAMPLE).unwrap();
        assert!(p.agents().is_empty());
        let coder = p.profile("coder").unwrap();
        assert_eq!(coder.mode, Mode::Monitor);
        assert_eq!(p.profile_for("fc-tap1"), Some(coder));
    }

    #[test]
    fn profiles_parse() {
        let p = parse("p.toml", PROFILES).unwrap();
        let names: Vec<&str> = p.profiles().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["coder", "any-agent", "by-hand"]);
        let coder = p.profile("coder").unwrap();
        assert_eq!(coder.patterns, ["agt-coder-*", "fc-tap?"]);
        assert_eq!(coder.mode, Mode::Monitor);
        assert_eq!(coder.egress_default, EgressDefault::Deny);
        assert_eq!(
            coder.rate.packets,
            Some(Limit {
                per_sec: 1000,
                burst: 100
            })
        );
        assert_eq!(coder.egress.len(), 1);
        assert_eq!(coder.egress[0].ports, PortRange { lo: 53, hi: 53 });
        assert!(coder.inspect);
        let by_hand = p.profile("by-hand").unwrap();
        assert!(by_hand.patterns.is_empty());
        assert_eq!(
            (by_hand.mode, by_hand.rate, by_hand.inspect),
            (Mode::Enforce, Rate::default(), false)
        );
        assert!(p.profile("coder-7").is_none(), "agents are not profiles");
        // Profiles are not agents: nothing that reads agents sees them.
        assert_eq!(p.agents().len(), 1);
    }

    #[test]
    fn profile_for_takes_the_first_match_and_leaves_static_agents_alone() {
        let p = parse("p.toml", PROFILES).unwrap();
        let profile = |iface: &str| p.profile_for(iface).map(|p| p.name.as_str());
        // Both "agt-coder-*" and "agt-*" match; coder comes first in the document.
        assert_eq!(profile("agt-coder-1"), Some("coder"));
        assert_eq!(profile("agt-other"), Some("any-agent"));
        assert_eq!(profile("fc-tap3"), Some("coder"));
        assert_eq!(profile("fc-tap33"), None);
        assert_eq!(profile("eth0"), None);
        // A static agent names agt-coder-7: it stays the agent's.
        assert_eq!(profile("agt-coder-7"), None);
        assert!(p.profile("coder").unwrap().matches("agt-coder-7"));
    }

    #[test]
    fn an_instance_is_an_agent_of_its_profile() {
        let p = parse("p.toml", PROFILES).unwrap();
        let coder = p.profile("coder").unwrap();
        let a = coder.instance(4000, "agt-coder-1", &[net("10.9.0.2/32")]);
        assert_eq!(
            a,
            Agent {
                id: 4000,
                name: "coder/agt-coder-1".into(),
                interfaces: vec!["agt-coder-1".into()],
                sources: vec![net("10.9.0.2/32")],
                mode: coder.mode,
                egress_default: coder.egress_default,
                rate: coder.rate,
                egress: coder.egress.clone(),
                inspect: coder.inspect,
                guards: coder.guards,
                mcp: None,
            }
        );
        let all = p.with_agents([a.clone()]);
        assert_eq!(all.agents().len(), 2);
        assert_eq!(all.agent_by_interface("agt-coder-1"), Some(&a));
        assert_eq!(all.profiles(), p.profiles());
        assert_eq!(p.agents().len(), 1, "the original is unchanged");
    }

    #[test]
    fn glob_matching() {
        let cases = [
            ("*", "", true),
            ("*", "eth0", true),
            ("agt-*", "agt-", true),
            ("agt-*", "agt-x", true),
            ("agt-*", "xagt-x", false),
            ("*-tap", "fc-tap", true),
            ("*-tap", "fc-tap0", false),
            ("fc-tap?", "fc-tap1", true),
            ("fc-tap?", "fc-tap", false),
            ("fc-tap?", "fc-tap12", false),
            ("??", "ab", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("a*bc", "abcbc", true),
            ("veth0", "veth0", true),
            ("veth0", "veth01", false),
            ("veth0", "veth", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(glob_match(pattern, name), expected, "{pattern:?} {name:?}");
        }
        // Many stars against a long mismatch: quadratic at worst, and no recursion.
        let pattern = "*a".repeat(1000) + "b";
        assert!(!glob_match(&pattern, &"a".repeat(5000)));
    }

    /// A valid agent named "a", then one profile with `lines` in its table.
    fn profile(lines: &str) -> String {
        format!("{}[[profiles]]\n{lines}", agent(""))
    }

    #[test]
    fn bad_profiles_are_located() {
        assert_eq!(
            issues(&profile(
                "name = \"p\"\ninterfaces = [\"agt coder\", \"agt-coder-*-long\", \"ok-*\", \"ok-*\"]\n\
                 [[profiles]]\nname = \"p\"\ninterfaces = [\"ok-*\"]\n\
                 [[profiles]]\nname = \"a\"\n\
                 [[profiles]]\nname = \"x/y\"\n\
                 [[profiles]]\nname = \"q\"\nid = 3\nprefixes = [\"10.0.0.1\"]\n\
                 rate = { packets_per_sec = 0 }\n"
            )),
            vec![
                "p.toml:7:15: profiles[0].interfaces[0]: expected an interface name pattern of \
                 1 to 15 bytes without '/', ':' or whitespace ('*' matches any run, '?' one \
                 byte), got \"agt coder\"",
                "p.toml:7:28: profiles[0].interfaces[1]: expected an interface name pattern of \
                 1 to 15 bytes without '/', ':' or whitespace ('*' matches any run, '?' one \
                 byte), got \"agt-coder-*-long\"",
                "p.toml:7:56: profiles[0].interfaces[3]: pattern \"ok-*\" is listed twice",
                "p.toml:9:8: profiles[1].name: name \"p\" is already used by profiles[0]",
                "p.toml:10:15: profiles[1].interfaces[0]: pattern \"ok-*\" is already listed by \
                 profiles[0], which comes first and so would take every interface it matches",
                "p.toml:12:8: profiles[2].name: name \"a\" is already used by agent \"a\" \
                 (agents[0]); profiles and agents share one namespace (the CLI and metrics \
                 find either by name)",
                "p.toml:14:8: profiles[3].name: a profile name cannot hold '/', which separates \
                 the profile from the interface in instance names (\"coder/agt-coder-1\"), got \
                 \"x/y\"",
                "p.toml:17:6: profiles[4].id: a profile has no id: each of its instances gets \
                 its own (ids from the daemon, prefixes from `enforcer agent add --prefix`)",
                "p.toml:18:12: profiles[4].prefixes: a profile has no prefixes: each of its \
                 instances gets its own (ids from the daemon, prefixes from `enforcer agent \
                 add --prefix`)",
                "p.toml:19:28: profiles[4].rate.packets_per_sec: expected 1 to 1000000000 (omit \
                 the field for no limit), got 0",
            ]
        );
        assert_eq!(
            issue(&profile("name = \"p\"\ninterface = [\"x\"]\n")),
            "p.toml:7:1: profiles[0].interface: unknown field `interface`, expected one of \
             `name`, `interfaces`, `mode`, `egress_default`, `rate`, `egress`, `inspect`, \
             `connections`, `quota`, `breaker`, `mcp`, `id`, `prefixes`"
        );
        assert_eq!(
            issue(&profile("interfaces = [\"x\"]\n")),
            "p.toml:5:1: profiles[0]: missing field `name`"
        );
        assert_eq!(
            issue(&profile("name = \"bad name\"\n")),
            "p.toml:6:8: profiles[0].name: expected 1 to 64 characters from A-Z a-z 0-9 _ . -, \
             got \"bad name\""
        );
    }

    /// The guards example of the module documentation, verbatim.
    const GUARDS_EXAMPLE: &str = r#"[[shared]]
name = "llm-api"          # unique, [A-Za-z0-9_.-]{1,64}; at most 1023 groups
rate = { packets_per_sec = 5000, bytes_per_sec = 50_000_000 }  # as an agent's rate
connections = { per_sec = 100, burst = 200 }                   # new TCP connections; at least one of rate and connections

[[agents]]
id = 2
name = "runner"
interfaces = ["veth-runner"]
connections = { per_sec = 10, burst = 20 }   # new TCP connections (SYN without ACK); burst defaults to max(per_sec/10, 1)
quota = { bytes_per_hour = 1_000_000_000, connections_per_day = 10_000 }  # also bytes_per_day, connections_per_hour; each optional, hours on the wall clock, days in UTC
breaker = { drops = 50, within_secs = 10, cooldown_secs = 30, action = "reject" }
# The 51st drop within 10 s opens the breaker: all the agent's traffic is refused for the
# cooldown ("drop", the default, or "reject"), then new connections pass at probe_per_sec
# (default 1, probe_burst 1) until calm_secs (default cooldown_secs) pass without a drop;
# a drop while half-open reopens it with twice the cooldown, up to max_cooldown_secs
# (default max(600, cooldown_secs)). Every duration is 1 to 86400 seconds.

[[agents.egress]]
action = "allow"
to = ["api.example.com"]
proto = "tcp"
ports = 443
shared = "llm-api"        # charge the group's shared limit (allow rules only)

[[agents.egress]]
action = "allow"
to = ["10.0.0.53"]
proto = "udp"
ports = 53
always = true             # passes an open breaker (the resolver, a control channel; allow rules only)
"#;

    #[test]
    fn documented_guards_example_parses() {
        let p = parse("policy.toml", GUARDS_EXAMPLE).unwrap();
        assert_eq!(
            p.shared(),
            &[SharedGroup {
                name: "llm-api".into(),
                rate: Rate {
                    packets: Some(Limit {
                        per_sec: 5000,
                        burst: 500
                    }),
                    bytes: Some(Limit {
                        per_sec: 50_000_000,
                        burst: 5_000_000
                    }),
                },
                connections: Some(Limit {
                    per_sec: 100,
                    burst: 200
                }),
            }]
        );
        assert_eq!(p.shared_group("llm-api"), Some(1));
        assert_eq!(p.shared_group("other"), None);
        let a = &p.agents()[0];
        assert_eq!(
            a.guards,
            Guards {
                connections: Some(Limit {
                    per_sec: 10,
                    burst: 20
                }),
                quota: Quota {
                    bytes_per_hour: Some(1_000_000_000),
                    bytes_per_day: None,
                    connections_per_hour: None,
                    connections_per_day: Some(10_000),
                },
                breaker: Some(Breaker {
                    drops: 50,
                    within_secs: 10,
                    cooldown_secs: 30,
                    max_cooldown_secs: 600,
                    probe: Limit {
                        per_sec: 1,
                        burst: 1
                    },
                    calm_secs: 30,
                    action: BreakerAction::Reject,
                }),
            }
        );
        assert_eq!(
            a.guards.quota.by_kind(),
            [Some(1_000_000_000), None, None, Some(10_000)]
        );
        assert_eq!(
            (a.egress[0].shared.as_deref(), a.egress[0].always),
            (Some("llm-api"), false)
        );
        assert_eq!(
            (a.egress[1].shared.as_deref(), a.egress[1].always),
            (None, true)
        );
    }

    #[test]
    fn every_guard_field_parses() {
        let text = "[[shared]]\nname = \"g1\"\nconnections = { per_sec = 7 }\n\
                    [[shared]]\nname = \"g2\"\nrate = { packets_per_sec = 10, packets_burst = 3, bytes_per_sec = 2000, bytes_burst = 4000 }\n"
            .to_owned()
            + &agent(
                "connections = { per_sec = 1000 }\n\
                 quota = { bytes_per_hour = 1, bytes_per_day = 8_796_093_022_207, connections_per_hour = 3, connections_per_day = 4 }\n\
                 breaker = { drops = 1_000_000, within_secs = 86400, cooldown_secs = 5, max_cooldown_secs = 5, probe_per_sec = 20, probe_burst = 4, calm_secs = 1, action = \"drop\" }\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nshared = \"g2\"\nalways = true\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nalways = false\n",
            );
        let p = parse("p.toml", &text).unwrap();
        assert_eq!(
            p.shared()[0],
            SharedGroup {
                name: "g1".into(),
                rate: Rate::default(),
                connections: Some(Limit {
                    per_sec: 7,
                    burst: 1
                }),
            }
        );
        assert_eq!(
            p.shared()[1].rate,
            Rate {
                packets: Some(Limit {
                    per_sec: 10,
                    burst: 3
                }),
                bytes: Some(Limit {
                    per_sec: 2000,
                    burst: 4000
                }),
            }
        );
        assert_eq!(p.shared()[1].connections, None);
        assert_eq!(p.shared_group("g2"), Some(2));
        let g = p.agents()[0].guards;
        assert_eq!(
            g.connections,
            Some(Limit {
                per_sec: 1000,
                burst: 100
            })
        );
        assert_eq!(
            g.quota.by_kind(),
            [Some(1), Some(QUOTA_MAX), Some(3), Some(4)]
        );
        assert_eq!(
            g.breaker,
            Some(Breaker {
                drops: 1_000_000,
                within_secs: 86_400,
                cooldown_secs: 5,
                max_cooldown_secs: 5,
                probe: Limit {
                    per_sec: 20,
                    burst: 4
                },
                calm_secs: 1,
                action: BreakerAction::Drop,
            })
        );
        let e = &p.agents()[0].egress;
        assert_eq!((e[0].shared.as_deref(), e[0].always), (Some("g2"), true));
        assert_eq!((e[1].shared.as_deref(), e[1].always), (None, false));
    }

    #[test]
    fn guard_defaults() {
        let p = parse("p.toml", &agent("")).unwrap();
        assert_eq!(p.agents()[0].guards, Guards::default());
        assert!(p.agents()[0].guards.is_empty());
        assert!(p.shared().is_empty());

        let guards = |extra: &str| parse("p.toml", &agent(extra)).unwrap().agents()[0].guards;
        // Connection burst: a tenth of the rate, at least 1.
        assert_eq!(
            guards("connections = { per_sec = 9 }\n").connections,
            Some(Limit {
                per_sec: 9,
                burst: 1
            })
        );
        assert_eq!(
            guards("connections = { per_sec = 250 }\n")
                .connections
                .unwrap()
                .burst,
            25
        );
        // A breaker with only drops.
        let b = guards("breaker = { drops = 5 }\n").breaker.unwrap();
        assert_eq!(
            b,
            Breaker {
                drops: 5,
                within_secs: 10,
                cooldown_secs: 30,
                max_cooldown_secs: 600,
                probe: Limit {
                    per_sec: 1,
                    burst: 1
                },
                calm_secs: 30,
                action: BreakerAction::Drop,
            }
        );
        // calm follows the cooldown; the longest cooldown is at least the first.
        let b = guards("breaker = { drops = 5, cooldown_secs = 900 }\n")
            .breaker
            .unwrap();
        assert_eq!((b.max_cooldown_secs, b.calm_secs), (900, 900));
        let b = guards("breaker = { drops = 5, cooldown_secs = 60, calm_secs = 2 }\n")
            .breaker
            .unwrap();
        assert_eq!((b.max_cooldown_secs, b.calm_secs), (600, 2));
        // An empty quota table is no quota; a guard alone makes the guards non-empty.
        let g = guards("quota = {}\n");
        assert!(g.quota.is_empty() && g.is_empty());
        assert!(!guards("quota = { connections_per_hour = 5 }\n").is_empty());
        assert!(!guards("breaker = { drops = 1 }\n").is_empty());
    }

    #[test]
    fn profile_instances_inherit_guards() {
        let text = "[[shared]]\nname = \"g\"\nconnections = { per_sec = 5 }\n\
                    [[profiles]]\nname = \"p\"\ninterfaces = [\"agt-*\"]\n\
                    connections = { per_sec = 2, burst = 3 }\n\
                    quota = { bytes_per_day = 100 }\n\
                    breaker = { drops = 4, action = \"reject\" }\n\
                    egress = [ { action = \"allow\", to = [\"@any\"], shared = \"g\", always = true } ]\n";
        let p = parse("p.toml", text).unwrap();
        let profile = p.profile("p").unwrap();
        assert_eq!(
            profile.guards.connections,
            Some(Limit {
                per_sec: 2,
                burst: 3
            })
        );
        assert_eq!(profile.guards.quota.bytes_per_day, Some(100));
        assert_eq!(
            profile.guards.breaker.unwrap().action,
            BreakerAction::Reject
        );
        let instance = profile.instance(9, "agt-1", &[]);
        assert_eq!(instance.guards, profile.guards);
        assert_eq!(instance.egress[0].shared.as_deref(), Some("g"));
        assert!(instance.egress[0].always);
    }

    #[test]
    fn bad_guards_are_located() {
        let text = agent(
            "connections = { per_sec = 0, burst = 0 }\n\
             quota = { bytes_per_hour = 0, bytes_per_day = 8_796_093_022_208, connections_per_hour = -1 }\n\
             breaker = { drops = 0, within_secs = 86401, cooldown_secs = 0, probe_per_sec = 0, probe_burst = 0, calm_secs = 100000 }\n",
        );
        assert_eq!(
            issues(&text),
            vec![
                "p.toml:5:38: agents[0].connections.burst: expected a burst of at least 1 \
                 connection, got 0",
                "p.toml:5:27: agents[0].connections.per_sec: expected 1 to 1000000000 (omit \
                 the field for no limit), got 0",
                "p.toml:6:28: agents[0].quota.bytes_per_hour: expected 1 to 8796093022207 \
                 (omit the field for no quota), got 0",
                "p.toml:6:47: agents[0].quota.bytes_per_day: expected 1 to 8796093022207 (omit \
                 the field for no quota), got 8796093022208",
                "p.toml:6:89: agents[0].quota.connections_per_hour: expected 1 to \
                 8796093022207 (omit the field for no quota), got -1",
                "p.toml:7:21: agents[0].breaker.drops: expected 1 to 1000000, got 0",
                "p.toml:7:38: agents[0].breaker.within_secs: expected 1 to 86400, got 86401",
                "p.toml:7:61: agents[0].breaker.cooldown_secs: expected 1 to 86400, got 0",
                "p.toml:7:80: agents[0].breaker.probe_per_sec: expected 1 to 1000000000, got 0",
                "p.toml:7:97: agents[0].breaker.probe_burst: expected 1 to \
                 18446744073709551615, got 0",
                "p.toml:7:112: agents[0].breaker.calm_secs: expected 1 to 86400, got 100000",
            ]
        );
        assert_eq!(
            issue(&agent(
                "breaker = { drops = 5, cooldown_secs = 60, max_cooldown_secs = 59 }\n"
            )),
            "p.toml:5:64: agents[0].breaker.max_cooldown_secs: expected at least cooldown_secs \
             (60), got 59: the cooldown only grows up to it"
        );
        assert_eq!(
            issue(&agent("breaker = { drops = 5, action = \"open\" }\n")),
            "p.toml:5:33: agents[0].breaker.action: unknown variant `open`, expected `drop` or \
             `reject`"
        );
        assert_eq!(
            issue(&agent("breaker = { within_secs = 5 }\n")),
            "p.toml:5:11: agents[0].breaker: missing field `drops`"
        );
        assert_eq!(
            issue(&agent("connections = { burst = 5 }\n")),
            "p.toml:5:15: agents[0].connections: missing field `per_sec`"
        );
        assert_eq!(
            issue(&agent("quota = { bytes_per_week = 5 }\n")),
            "p.toml:5:11: agents[0].quota.bytes_per_week: unknown field `bytes_per_week`, \
             expected one of `bytes_per_hour`, `bytes_per_day`, `connections_per_hour`, \
             `connections_per_day`"
        );
        // Profiles are checked the same way, under their own path.
        assert_eq!(
            issue(&profile("name = \"p\"\nbreaker = { drops = 0 }\n")),
            "p.toml:7:21: profiles[0].breaker.drops: expected 1 to 1000000, got 0"
        );
    }

    #[test]
    fn bad_shared_groups_and_rule_guards_are_located() {
        let text = "[[shared]]\nname = \"g\"\nrate = { packets_per_sec = 5 }\n\
                    [[shared]]\nname = \"g\"\nconnections = { per_sec = 1 }\n\
                    [[shared]]\nname = \"bad name\"\nrate = { packets_burst = 5 }\n\
                    [[shared]]\nname = \"empty\"\n"
            .to_owned()
            + &agent(
                "[[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nshared = \"nope\"\n\
                 [[agents.egress]]\naction = \"deny\"\nto = [\"@any\"]\nshared = \"g\"\nalways = true\n",
            );
        assert_eq!(
            issues(&text),
            vec![
                "p.toml:5:8: shared[1].name: name \"g\" is already used by shared[0]",
                "p.toml:8:8: shared[2].name: expected 1 to 64 characters from A-Z a-z 0-9 _ . \
                 -, got \"bad name\"",
                "p.toml:9:26: shared[2].rate.packets_burst: packets_burst has no effect without \
                 packets_per_sec; set packets_per_sec or remove packets_burst",
                "p.toml:7:1: shared[2]: shared group \"bad name\" has no limit; give it a rate, \
                 connections or both",
                "p.toml:10:1: shared[3]: shared group \"empty\" has no limit; give it a rate, \
                 connections or both",
                "p.toml:19:10: agents[0].egress[0].shared: unknown shared group \"nope\"; known \
                 groups: g, g, bad name, empty",
                "p.toml:23:10: agents[0].egress[1].shared: a deny rule's packets never reach a \
                 shared limit; name the group on an allow rule",
                "p.toml:24:10: agents[0].egress[1].always: always lets allowed packets through \
                 an open breaker; a deny rule allows none",
            ]
        );
        assert_eq!(
            issue(&agent(
                "[[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nshared = \"g\"\n"
            )),
            "p.toml:8:10: agents[0].egress[0].shared: unknown shared group \"g\"; there are no \
             [[shared]] groups"
        );
        assert_eq!(
            issue("[[shared]]\nname = \"g\"\nconnections = { per_sec = 1 }\nlimit = 5\n"),
            "p.toml:4:1: shared[0].limit: unknown field `limit`, expected one of `name`, \
             `rate`, `connections`"
        );
        // Group ids are 10 bits: at most 1023 groups.
        let groups = |n: usize| -> String {
            (0..n)
                .map(|i| format!("[[shared]]\nname = \"g{i}\"\nconnections = {{ per_sec = 1 }}\n"))
                .collect()
        };
        assert_eq!(
            issue(&groups(1024)),
            "p.toml:3070:1: shared[1023]: at most 1023 shared groups are supported"
        );
        assert_eq!(
            parse("p.toml", &groups(1023))
                .unwrap()
                .shared_group("g1022"),
            Some(1023)
        );
    }

    const MCP: &str = r#"[[mcp_servers]]
name = "github"
host = "API.GitHub.com."
path = "/mcp"

[[mcp_servers]]
name = "docs"
host = "docs.example.com"
path = "/mcp/*"

[[agents]]
id = 1
name = "a"
interfaces = ["veth-a"]

[agents.mcp]
shadow = "flag"

[[agents.mcp.servers]]
server = "github"
tools = ["search_issues", "get_file"]
calls_per_minute = 30
burst = 5
quota = 1000
quota_seconds = 86400

[[agents.mcp.servers]]
server = "docs"

[[agents]]
id = 2
name = "b"
interfaces = ["veth-b"]

[[profiles]]
name = "coder"
interfaces = ["agt-coder-*"]

[profiles.mcp]
servers = [{ server = "docs", tools = [] }]
"#;

    #[test]
    fn mcp_registry_and_grants() {
        let p = parse("p.toml", MCP).unwrap();
        assert_eq!(
            p.mcp_servers(),
            &[
                McpServer {
                    name: "github".into(),
                    host: "api.github.com".into(),
                    path: McpPath::Exact("/mcp".into()),
                },
                McpServer {
                    name: "docs".into(),
                    host: "docs.example.com".into(),
                    path: McpPath::Prefix("/mcp".into()),
                },
            ]
        );
        let a = p.agents()[0].mcp().unwrap();
        assert_eq!(
            a,
            &AgentMcp {
                shadow: McpShadow::Flag,
                servers: vec![
                    McpGrant {
                        server: "github".into(),
                        tools: Some(vec!["search_issues".into(), "get_file".into()]),
                        rate: Some(McpRate {
                            per_minute: 30,
                            burst: 5
                        }),
                        quota: Some(McpQuota {
                            calls: 1000,
                            seconds: 86400
                        }),
                    },
                    McpGrant {
                        server: "docs".into(),
                        tools: None,
                        rate: None,
                        quota: None,
                    },
                ],
            }
        );
        assert!(a.grant("github").unwrap().allows_tool("get_file"));
        assert!(!a.grant("github").unwrap().allows_tool("delete_repo"));
        assert!(a.grant("docs").unwrap().allows_tool("anything"));
        assert_eq!(p.agents()[1].mcp(), None, "no [agents.mcp]: not gated");
        // A profile's gate goes to its instances; shadow defaults to block.
        let i = p.profile("coder").unwrap().instance(9, "agt-coder-1", &[]);
        let m = i.mcp().unwrap();
        assert_eq!(m.shadow, McpShadow::Block);
        assert_eq!(m.servers[0].tools, Some(vec![]));
        assert!(!m.servers[0].allows_tool("x"));
    }

    #[test]
    fn mcp_paths() {
        let exact = McpPath::Exact("/mcp".into());
        assert!(exact.matches("/mcp"));
        assert!(!exact.matches("/mcp/"));
        assert!(!exact.matches("/MCP"));
        let prefix = McpPath::Prefix("/mcp".into());
        for yes in ["/mcp", "/mcp/", "/mcp/a/b"] {
            assert!(prefix.matches(yes), "{yes}");
        }
        for no in ["/mcpx", "/", "/other/mcp"] {
            assert!(!prefix.matches(no), "{no}");
        }
        assert!(McpPath::Prefix(String::new()).matches("/anything"));
        assert_eq!(mcp_path("/*").unwrap(), McpPath::Prefix(String::new()));
        assert_eq!(prefix.to_string(), "/mcp/*");
    }

    #[test]
    fn bad_mcp_servers() {
        let text = "[[mcp_servers]]\nname = \"m\"\nhost = \"a..b\"\npath = \"mcp\"\n\n\
                    [[mcp_servers]]\nname = \"m\"\nhost = \"h\"\npath = \"/a/*/b\"\n\n\
                    [[mcp_servers]]\nname = \"ok\"\nhost = \"h\"\npath = \"/x/../y\"\n\n\
                    [[mcp_servers]]\nname = \"p1\"\nhost = \"h\"\npath = \"/mcp?x=1\"\n\n\
                    [[mcp_servers]]\nname = \"p2\"\nhost = \"h\"\npath = \"/mcp\"\n\n\
                    [[mcp_servers]]\nname = \"p3\"\nhost = \"H.\"\npath = \"/mcp\"\n\n\
                    [[mcp_servers]]\nname = \"bad name\"\nhost = \"h\"\npath = \"/%6dcp\"\n";
        assert_eq!(
            issues(text),
            [
                "p.toml:3:8: mcp_servers[0].host: label 1 of \"a..b\" has 0 characters; labels \
                 have 1 to 63",
                "p.toml:4:8: mcp_servers[0].path: expected a path like \"/mcp\" or a prefix like \
                 \"/mcp/*\" (it starts with '/'), got \"mcp\"",
                "p.toml:7:8: mcp_servers[1].name: name \"m\" is already used by mcp_servers[0]",
                "p.toml:9:8: mcp_servers[1].path: expected a path like \"/mcp\" or a prefix like \
                 \"/mcp/*\" (no '*'; '*' only as a final \"/*\"), got \"/a/*/b\"",
                "p.toml:14:8: mcp_servers[2].path: expected a path like \"/mcp\" or a prefix \
                 like \"/mcp/*\" (no \".\" or \"..\" segments), got \"/x/../y\"",
                "p.toml:19:8: mcp_servers[3].path: expected a path like \"/mcp\" or a prefix \
                 like \"/mcp/*\" (no '?'; '*' only as a final \"/*\"), got \"/mcp?x=1\"",
                "p.toml:29:8: mcp_servers[5].path: host \"h\" and path \"/mcp\" are already \
                 mcp_servers[4]'s",
                "p.toml:32:8: mcp_servers[6].name: expected 1 to 64 characters from A-Z a-z 0-9 \
                 _ . -, got \"bad name\"",
                "p.toml:34:8: mcp_servers[6].path: expected a path like \"/mcp\" or a prefix \
                 like \"/mcp/*\" (no '%'; '*' only as a final \"/*\"), got \"/%6dcp\"",
            ]
        );
        assert_eq!(
            issue("[[mcp_servers]]\nname = \"m\"\nhost = \"h\"\n"),
            "p.toml:1:1: mcp_servers[0]: missing field `path`"
        );
    }

    #[test]
    fn bad_mcp_grants() {
        let text = format!(
            "[[mcp_servers]]\nname = \"gh\"\nhost = \"h\"\npath = \"/mcp\"\n\n{}",
            agent(
                "[agents.mcp]\n\
                 [[agents.mcp.servers]]\nserver = \"nope\"\n\
                 [[agents.mcp.servers]]\nserver = \"gh\"\ntools = [\"a\", \"\", \"a\"]\n\
                 calls_per_minute = 10\n\
                 [[agents.mcp.servers]]\nserver = \"gh\"\nquota_seconds = 60\n\
                 [[agents.mcp.servers]]\nserver = \"gh\"\ncalls_per_minute = 0\nburst = 5\n\
                 quota = 10\nquota_seconds = 0\n"
            )
        );
        assert_eq!(
            issues(&text),
            [
                "p.toml:12:10: agents[0].mcp.servers[0].server: no mcp_servers entry is called \
                 \"nope\"; expected one of \"gh\"",
                "p.toml:15:15: agents[0].mcp.servers[1].tools[1]: expected a tool name of 1 to \
                 128 bytes without control characters, got \"\"",
                "p.toml:15:19: agents[0].mcp.servers[1].tools[2]: tool \"a\" is listed twice",
                "p.toml:16:20: agents[0].mcp.servers[1].calls_per_minute: calls_per_minute \
                 needs burst too (both or neither)",
                "p.toml:18:10: agents[0].mcp.servers[2].server: server \"gh\" is already granted \
                 by servers[1]",
                "p.toml:19:17: agents[0].mcp.servers[2].quota_seconds: quota_seconds needs quota \
                 too (both or neither)",
                "p.toml:21:10: agents[0].mcp.servers[3].server: server \"gh\" is already granted \
                 by servers[1]",
                "p.toml:22:20: agents[0].mcp.servers[3].calls_per_minute: expected 1 to 1000000, \
                 got 0",
                "p.toml:25:17: agents[0].mcp.servers[3].quota_seconds: expected 1 to 31536000, \
                 got 0",
            ]
        );
        assert_eq!(
            issue(&agent("[agents.mcp]\nshadow = \"allow\"\n")),
            "p.toml:6:10: agents[0].mcp.shadow: unknown variant `allow`, expected `block` or \
             `flag`"
        );
        assert_eq!(
            issue(&agent("[[agents.mcp.servers]]\nserver = \"x\"\n")),
            "p.toml:6:10: agents[0].mcp.servers[0].server: no mcp_servers entry is called \
             \"x\"; there are none"
        );
        assert_eq!(
            issue(&agent("[agents.mcp]\ntool = [\"x\"]\n")),
            "p.toml:6:1: agents[0].mcp.tool: unknown field `tool`, expected `shadow` or `servers`"
        );
    }
}
