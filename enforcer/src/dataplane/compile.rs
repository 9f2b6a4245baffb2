//! The compile step: a validated [`Policy`] becomes the exact set of map entries the XDP
//! program reads. Pure and deterministic (same policy, same entries, in the same order), so
//! it is unit-tested without a kernel; writing the entries into maps is the thin layer in
//! [`crate::dataplane`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_REJECT, AGENT_ACTIVE, AGENT_COARSE_CLOCK,
    AGENT_DEFAULT_ALLOW, AGENT_DST_LPM_V4, AGENT_DST_LPM_V6, AGENT_GUARDED, AGENT_MONITOR,
    AGENT_NAMES, AGENT_RESTRICTED, AgentPolicy, COARSE_CLOCK_MIN_NS, MAX_DST_PROBES,
    MAX_RULES_PER_PREFIX, PROTO_ANY, PortRule, RULE_ALWAYS, RULE_GROUP_MASK, RuleSet, SNI_EXACT,
    SNI_WILDCARD, TIME_SHIFT, TlsPorts, UNITS_PER_SEC,
    guard::{GUARD_BREAKER, GUARD_BREAKER_REJECT, GUARD_QUOTA, GuardPolicy, SharedPolicy},
};

use crate::policy::{
    Action, Agent, BreakerAction, Destination, EgressDefault, EgressRule, IpNet, Limit, Mode,
    NamePattern, Policy, PortRange, Proto, Rate, SharedGroup, UnknownTraffic,
};

/// Server-name entries per slot, over all agents: half the `SNI` map, which holds both
/// slots.
pub const MAX_SERVER_NAMES: u32 = 2048;

/// Capacities of the loaded maps, which a policy must fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Highest agent id (agent ids are `1..=max_agents`).
    pub max_agents: u32,
    /// Interface-to-agent entries per slot.
    pub max_interfaces: u32,
    /// Source prefixes per slot and family (host routes and LPM prefixes counted apart).
    pub max_source_prefixes: u32,
    /// Destination prefixes per slot and family, over all agents.
    pub max_destination_prefixes: u32,
    /// Bytes of the audit ring buffer: a power of two and a multiple of the page size (a
    /// kernel requirement). Each event takes 80 bytes (72 plus the ring's 8-byte header).
    pub audit_ring_bytes: u32,
}

/// Default [`Limits::audit_ring_bytes`]: 1 MiB, about 13,000 events.
pub const DEFAULT_AUDIT_RING_BYTES: u32 = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_agents: 4096,
            max_interfaces: 1024,
            max_source_prefixes: 65_536,
            max_destination_prefixes: 65_536,
            audit_ring_bytes: DEFAULT_AUDIT_RING_BYTES,
        }
    }
}

/// An IPv4 or IPv6 prefix in network byte order, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix<const N: usize> {
    /// Address bytes, host bits cleared.
    pub addr: [u8; N],
    /// Prefix length in bits, `0..=N*8`.
    pub len: u8,
}

/// The map entries of one policy, without slot numbers (the apply layer adds the slot).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Traffic from no known agent is dropped.
    pub unknown_drop: bool,
    /// `(agent id, policy)`, sorted by id.
    pub agents: Vec<(u32, AgentPolicy)>,
    /// `(ifindex, agent id)`, sorted by ifindex.
    pub interfaces: Vec<(u32, u32)>,
    /// Interfaces the policy names that do not exist on this host now, sorted: their agents
    /// are enforced wherever they are attached, and these are attached once they appear.
    pub pending: Vec<String>,
    /// Exact IPv4 source addresses (/32) to agent id, sorted.
    pub source_hosts_v4: Vec<([u8; 4], u32)>,
    /// Exact IPv6 source addresses (/128) to agent id, sorted.
    pub source_hosts_v6: Vec<([u8; 16], u32)>,
    /// Shorter IPv4 source prefixes to agent id, sorted.
    pub source_prefixes_v4: Vec<(Prefix<4>, u32)>,
    /// Shorter IPv6 source prefixes to agent id, sorted.
    pub source_prefixes_v6: Vec<(Prefix<16>, u32)>,
    /// `(agent id, destination prefix, rules)` for IPv4, sorted by agent then prefix.
    pub destinations_v4: Vec<(u32, Prefix<4>, RuleSet)>,
    /// Same for IPv6.
    pub destinations_v6: Vec<(u32, Prefix<16>, RuleSet)>,
    /// TCP ports whose connections to name-admitted addresses are SNI-checked.
    pub tls_ports: TlsPorts,
    /// `(agent id, SNI_EXACT or SNI_WILDCARD, name, rules)`: the server names each agent may
    /// use (a wildcard as its suffix with the leading dot), sorted.
    pub server_names: Vec<(u32, u32, String, RuleSet)>,
    /// `(agent id, guards)`, sorted by id: exactly the agents with `AGENT_GUARDED` (the
    /// program reads `GUARD_POLICY` for no other).
    pub guards: Vec<(u32, GuardPolicy)>,
    /// `(group id, shared limit)` of every `[[shared]]` group, sorted by group.
    pub shared: Vec<(u16, SharedPolicy)>,
}

/// Why a policy does not fit the maps or the host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// An agent id is beyond the agent maps.
    #[error(
        "agent \"{agent}\" has id {id}, but the maps hold agent ids up to {max_agents} \
         (max_agents)"
    )]
    AgentIdTooLarge {
        /// The agent's name.
        agent: String,
        /// Its id.
        id: u32,
        /// The limit.
        max_agents: u32,
    },
    /// Two interface names of the policy resolved to the same interface.
    #[error(
        "interface \"{interface}\" of agent \"{agent}\" and interface \"{other_interface}\" of \
         agent \"{other_agent}\" are the same interface (ifindex {ifindex})"
    )]
    SameInterface {
        /// The interface index both names resolved to.
        ifindex: u32,
        /// The agent that named it first.
        agent: String,
        /// The name it used.
        interface: String,
        /// The agent that named it second.
        other_agent: String,
        /// The name it used.
        other_interface: String,
    },
    /// A destination prefix collects more rules than a map entry holds.
    #[error(
        "agent \"{agent}\": destination {prefix} has {rules} rules once the rules of every \
         prefix containing it are merged in, more than the {max} a destination entry holds"
    )]
    TooManyRules {
        /// The agent's name.
        agent: String,
        /// The destination prefix.
        prefix: IpNet,
        /// Rules the prefix would need.
        rules: usize,
        /// [`MAX_RULES_PER_PREFIX`].
        max: usize,
    },
    /// A host name is named by more distinct protocol/port rules than an entry holds.
    #[error(
        "agent \"{agent}\": host name {name} has {rules} distinct protocol/port rules, more \
         than the {max} an entry holds"
    )]
    TooManyNameRules {
        /// The agent's name.
        agent: String,
        /// The name pattern.
        name: String,
        /// Rules it would need.
        rules: usize,
        /// [`MAX_RULES_PER_PREFIX`].
        max: usize,
    },
    /// A rate or burst cannot be expressed in the rate limiter's 64-bit time units.
    #[error(
        "agent \"{agent}\": rate.{field} = {value} cannot be expressed in the rate limiter's \
         64-bit time units (the burst would span more than 36 years)"
    )]
    RateOutOfRange {
        /// The agent's name.
        agent: String,
        /// The field of the `rate` table.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A guard's rate or burst cannot be expressed in the limiter's 64-bit time units.
    #[error(
        "agent \"{agent}\": {field} = {value} cannot be expressed in the rate limiter's \
         64-bit time units (the burst would span more than 36 years)"
    )]
    GuardOutOfRange {
        /// The agent's name.
        agent: String,
        /// The field, like `connections.burst`.
        field: String,
        /// Its value.
        value: u64,
    },
    /// A shared group's rate or burst cannot be expressed in the limiter's time units.
    #[error(
        "shared group \"{group}\": {field} = {value} cannot be expressed in the rate \
         limiter's 64-bit time units (the burst would span more than 36 years)"
    )]
    SharedOutOfRange {
        /// The group's name.
        group: String,
        /// The field, like `rate.packets_burst`.
        field: String,
        /// Its value.
        value: u64,
    },
    /// The policy needs more entries of some map than it holds.
    #[error("policy needs {needed} {limit}, but the maps hold {max} ({})", limit.setting())]
    LimitExceeded {
        /// Which map capacity.
        limit: LimitKind,
        /// Entries the policy needs.
        needed: usize,
        /// Entries the maps hold.
        max: u32,
        /// The agent, in document order, whose entries go past the capacity.
        agent: String,
        /// Its field that holds them, like `prefixes[3]` (the first entry that does not
        /// fit) or `egress` (destinations come from several rules).
        field: String,
    },
}

impl CompileError {
    /// The field of `policy` (the policy that failed to compile) the error is about, as
    /// the validator names fields: `agents[2].id`, `agents[0].egress[1].to[0]`,
    /// `shared[0].rate.packets_burst`. `None` only if the error names no agent or shared
    /// group of `policy`.
    pub fn field(&self, policy: &Policy) -> Option<String> {
        let index = |name: &str| policy.agents().iter().position(|a| a.name == name);
        let agent_field =
            |name: &str, field: &str| Some(format!("agents[{}].{field}", index(name)?));
        // The first `to` entry of `agent` that `hit` picks, as `egress[k].to[m]`.
        let destination = |name: &str, hit: &dyn Fn(&Destination) -> bool| {
            let i = index(name)?;
            let agent = &policy.agents()[i];
            let at = agent.egress.iter().enumerate().find_map(|(k, rule)| {
                let m = rule.to.iter().position(hit)?;
                Some(format!("egress[{k}].to[{m}]"))
            });
            Some(format!("agents[{i}].{}", at.as_deref().unwrap_or("egress")))
        };
        match self {
            CompileError::AgentIdTooLarge { agent, .. } => agent_field(agent, "id"),
            CompileError::SameInterface {
                other_agent,
                other_interface,
                ..
            } => {
                let i = index(other_agent)?;
                let j = policy.agents()[i]
                    .interfaces
                    .iter()
                    .position(|n| n == other_interface)?;
                Some(format!("agents[{i}].interfaces[{j}]"))
            }
            CompileError::TooManyRules { agent, prefix, .. } => {
                destination(agent, &|d| d.nets().contains(prefix))
            }
            CompileError::TooManyNameRules { agent, name, .. } => destination(
                agent,
                &|d| matches!(d, Destination::Name(p) if p.to_string() == *name),
            ),
            CompileError::RateOutOfRange { agent, field, .. } => {
                agent_field(agent, &format!("rate.{field}"))
            }
            CompileError::LimitExceeded { agent, field, .. } => agent_field(agent, field),
            CompileError::GuardOutOfRange { agent, field, .. } => agent_field(agent, field),
            CompileError::SharedOutOfRange { group, field, .. } => {
                let i = policy.shared().iter().position(|g| g.name == *group)?;
                Some(format!("shared[{i}].{field}"))
            }
        }
    }
}

/// A map capacity from [`Limits`] that a policy can exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Interface entries.
    Interfaces,
    /// IPv4 source host (/32) entries.
    SourceHostsV4,
    /// IPv6 source host (/128) entries.
    SourceHostsV6,
    /// IPv4 source prefix entries (shorter than /32).
    SourcePrefixesV4,
    /// IPv6 source prefix entries (shorter than /128).
    SourcePrefixesV6,
    /// IPv4 destination entries, over all agents.
    DestinationsV4,
    /// IPv6 destination entries, over all agents.
    DestinationsV6,
    /// Server names (exact and wildcard), over all agents.
    ServerNames,
}

impl LimitKind {
    /// Every kind, in the order the capacities are checked.
    pub const ALL: [LimitKind; 8] = [
        LimitKind::Interfaces,
        LimitKind::SourceHostsV4,
        LimitKind::SourceHostsV6,
        LimitKind::SourcePrefixesV4,
        LimitKind::SourcePrefixesV6,
        LimitKind::DestinationsV4,
        LimitKind::DestinationsV6,
        LimitKind::ServerNames,
    ];

    /// The field of `agent` that holds its entry number `nth` (from 0) of this kind: the
    /// source prefix itself, or the list the entries come from.
    fn field(self, agent: &Agent, nth: usize) -> String {
        let source = |v4: bool, host: bool| {
            agent
                .sources
                .iter()
                .enumerate()
                .filter(|(_, net)| net.addr().is_ipv4() == v4 && net.is_host() == host)
                .nth(nth)
                .map_or_else(|| "prefixes".to_owned(), |(j, _)| format!("prefixes[{j}]"))
        };
        match self {
            LimitKind::Interfaces => "interfaces".to_owned(),
            LimitKind::SourceHostsV4 => source(true, true),
            LimitKind::SourceHostsV6 => source(false, true),
            LimitKind::SourcePrefixesV4 => source(true, false),
            LimitKind::SourcePrefixesV6 => source(false, false),
            LimitKind::DestinationsV4 | LimitKind::DestinationsV6 | LimitKind::ServerNames => {
                "egress".to_owned()
            }
        }
    }

    /// How many entries of this kind the maps hold under `limits`.
    pub const fn capacity(self, limits: &Limits) -> u32 {
        match self {
            LimitKind::Interfaces => limits.max_interfaces,
            LimitKind::SourceHostsV4
            | LimitKind::SourceHostsV6
            | LimitKind::SourcePrefixesV4
            | LimitKind::SourcePrefixesV6 => limits.max_source_prefixes,
            LimitKind::DestinationsV4 | LimitKind::DestinationsV6 => {
                limits.max_destination_prefixes
            }
            LimitKind::ServerNames => MAX_SERVER_NAMES,
        }
    }

    /// The [`Limits`] field that sets this capacity.
    pub const fn setting(self) -> &'static str {
        match self {
            LimitKind::Interfaces => "max_interfaces",
            LimitKind::SourceHostsV4
            | LimitKind::SourceHostsV6
            | LimitKind::SourcePrefixesV4
            | LimitKind::SourcePrefixesV6 => "max_source_prefixes",
            LimitKind::DestinationsV4 | LimitKind::DestinationsV6 => "max_destination_prefixes",
            LimitKind::ServerNames => "the fixed size of the SNI map",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::Interfaces => "interface entries",
            LimitKind::SourceHostsV4 => "IPv4 source host entries",
            LimitKind::SourceHostsV6 => "IPv6 source host entries",
            LimitKind::SourcePrefixesV4 => "IPv4 source prefix entries",
            LimitKind::SourcePrefixesV6 => "IPv6 source prefix entries",
            LimitKind::DestinationsV4 => "IPv4 destination entries",
            LimitKind::DestinationsV6 => "IPv6 destination entries",
            LimitKind::ServerNames => "server name entries",
        })
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// Compiles `policy` into map entries, checking that it fits `limits`. `ifindex` resolves an
/// interface name on this host (a parameter so tests need no network namespace).
///
/// Destinations follow the kernel's lookup: the longest destination prefix of the agent that
/// contains the address is found, and the first rule in its list whose protocol and port
/// match decides. So each prefix an agent names gets the rules of every prefix of that agent
/// containing it, most specific first and deny before allow within one prefix: the most
/// specific prefix with a rule matching the packet decides, and on one prefix deny wins.
pub fn compile(
    policy: &Policy,
    limits: &Limits,
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Result<Compiled, CompileError> {
    compile_agents(policy, policy.agents(), limits, ifindex)
}

/// Compiles `agents` under `policy`'s defaults: with `policy.agents()` the whole policy
/// ([`compile`]), with a few agents the fragment [`Compiled::replace_agents`] puts in place
/// of theirs, so an agent that comes, goes or changes costs its own entries, not the
/// policy's.
pub fn compile_agents<'a>(
    policy: &Policy,
    agents: impl IntoIterator<Item = &'a Agent>,
    limits: &Limits,
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Result<Compiled, CompileError> {
    let mut out = Compiled {
        unknown_drop: policy.unknown() == UnknownTraffic::Drop,
        ..Compiled::default()
    };
    for (slot, port) in out.tls_ports.ports.iter_mut().zip(policy.tls_ports()) {
        *slot = *port;
    }
    // Group ids are 1 + the index in document order (0 is no group), so already sorted.
    for (i, group) in policy.shared().iter().enumerate() {
        // The validator allows fewer than MAX_SHARED_GROUPS groups, so the id fits.
        out.shared.push((i as u16 + 1, shared_policy(group)?));
    }
    let group_of = |name: &str| policy.shared_group(name).unwrap_or(0);
    // ifindex -> (agent, interface name), to name both sides if two names share an index.
    let mut iface_owner: BTreeMap<u32, (&str, &str)> = BTreeMap::new();
    // Entries of each kind (in `LimitKind::ALL` order) each agent adds, in document order:
    // an error about a capacity names the agent whose entries go past it.
    let mut added: Vec<(&Agent, [usize; LimitKind::ALL.len()])> = Vec::new();

    for agent in agents {
        let before = out.entries();
        if agent.id > limits.max_agents {
            return Err(CompileError::AgentIdTooLarge {
                agent: agent.name.clone(),
                id: agent.id,
                max_agents: limits.max_agents,
            });
        }
        let mut agent_entry = agent_policy(agent)?;
        if let Some(guards) = guard_policy(agent)? {
            agent_entry.flags |= AGENT_GUARDED;
            out.guards.push((agent.id, guards));
        }
        out.agents.push((agent.id, agent_entry));

        for name in &agent.interfaces {
            // A sandbox's interface may come later than its policy: not an error.
            let Some(index) = ifindex(name) else {
                out.pending.push(name.clone());
                continue;
            };
            if let Some((other_agent, other_name)) = iface_owner.insert(index, (&agent.name, name))
            {
                return Err(CompileError::SameInterface {
                    ifindex: index,
                    agent: other_agent.to_owned(),
                    interface: other_name.to_owned(),
                    other_agent: agent.name.clone(),
                    other_interface: name.clone(),
                });
            }
            out.interfaces.push((index, agent.id));
        }

        for net in &agent.sources {
            match net.addr() {
                IpAddr::V4(a) if net.is_host() => out.source_hosts_v4.push((a.octets(), agent.id)),
                IpAddr::V6(a) if net.is_host() => out.source_hosts_v6.push((a.octets(), agent.id)),
                IpAddr::V4(_) => out
                    .source_prefixes_v4
                    .extend(prefix_v4(net).map(|p| (p, agent.id))),
                IpAddr::V6(_) => out
                    .source_prefixes_v6
                    .extend(prefix_v6(net).map(|p| (p, agent.id))),
            }
        }

        // The kernel never looks up destinations for an unrestricted agent, so its entries
        // would only take map space.
        if restricted(agent) {
            let guard = |rule: &EgressRule| rule_guard(rule, &group_of);
            let v4 = &mut out.destinations_v4;
            destinations(agent, IPPROTO_ICMP, prefix_v4, &guard, v4)?;
            let v6 = &mut out.destinations_v6;
            destinations(agent, IPPROTO_ICMPV6, prefix_v6, &guard, v6)?;
            server_names(agent, &mut out.server_names)?;
        }
        let after = out.entries();
        added.push((agent, std::array::from_fn(|k| after[k] - before[k])));
    }
    out.server_names
        .sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));

    destination_lookup(&mut out);
    out.agents.sort_by_key(|&(id, _)| id);
    out.guards.sort_by_key(|&(id, _)| id);
    out.interfaces.sort();
    out.pending.sort();
    out.pending.dedup();
    out.source_hosts_v4.sort();
    out.source_hosts_v6.sort();
    out.source_prefixes_v4.sort();
    out.source_prefixes_v6.sort();
    out.destinations_v4
        .sort_by_key(|&(id, prefix, _)| (id, prefix));
    out.destinations_v6
        .sort_by_key(|&(id, prefix, _)| (id, prefix));

    let entries = out.entries();
    for (k, limit) in LimitKind::ALL.into_iter().enumerate() {
        let max = limit.capacity(limits);
        let needed = entries[k];
        // usize -> u64 is lossless on every target Rust supports.
        if needed as u64 <= u64::from(max) {
            continue;
        }
        // The agent holding entry number `max` (counted from 0), the first that does not fit.
        let mut fit = max as usize;
        let (agent, nth) = added
            .iter()
            .find_map(|(agent, counts)| {
                if fit < counts[k] {
                    return Some((*agent, fit));
                }
                fit -= counts[k];
                None
            })
            .expect("entries beyond the capacity belong to some agent");
        return Err(CompileError::LimitExceeded {
            limit,
            needed,
            max,
            agent: agent.name.clone(),
            field: limit.field(agent, nth),
        });
    }
    Ok(out)
}

impl Compiled {
    /// Puts `fragment` (from [`compile_agents`]) in place of the entries of the agents
    /// `gone` (ids; their interface names `gone_interfaces` leave `pending`): for one agent
    /// that comes, goes or changes, the result equals compiling the whole policy again.
    /// Refused when the result would not fit the maps (`who` names the agent for the
    /// message) or an interface of the fragment is already another agent's.
    pub fn replace_agents(
        self,
        gone: &BTreeSet<u32>,
        gone_interfaces: &[String],
        fragment: Compiled,
        limits: &Limits,
        who: &str,
    ) -> Result<Compiled, CompileError> {
        let mut ids = gone.clone();
        ids.extend(fragment.agents.iter().map(|(id, _)| *id));
        let keep = |id: &u32| !ids.contains(id);
        let mut next = self;
        next.agents.retain(|(id, _)| keep(id));
        next.guards.retain(|(id, _)| keep(id));
        next.interfaces.retain(|(_, id)| keep(id));
        next.source_hosts_v4.retain(|(_, id)| keep(id));
        next.source_hosts_v6.retain(|(_, id)| keep(id));
        next.source_prefixes_v4.retain(|(_, id)| keep(id));
        next.source_prefixes_v6.retain(|(_, id)| keep(id));
        next.destinations_v4.retain(|(id, _, _)| keep(id));
        next.destinations_v6.retain(|(id, _, _)| keep(id));
        next.server_names.retain(|(id, _, _, _)| keep(id));
        next.pending.retain(|name| !gone_interfaces.contains(name));
        for &(ifindex, agent) in &fragment.interfaces {
            if let Some(&(_, other)) = next.interfaces.iter().find(|(i, _)| *i == ifindex) {
                return Err(CompileError::SameInterface {
                    ifindex,
                    agent: format!("agent {other}"),
                    interface: format!("ifindex {ifindex}"),
                    other_agent: format!("agent {agent}"),
                    other_interface: format!("ifindex {ifindex}"),
                });
            }
        }
        // Each list is sorted and the fragment's part is short: sorting again finds the
        // two runs and merges them.
        next.agents.extend(fragment.agents);
        next.agents.sort_by_key(|&(id, _)| id);
        next.guards.extend(fragment.guards);
        next.guards.sort_by_key(|&(id, _)| id);
        // The shared groups are the policy's, not an agent's: a fragment compiled under
        // the same policy has the same ones, and an empty fragment (an agent that went)
        // none, so `next` keeps its own.
        next.interfaces.extend(fragment.interfaces);
        next.interfaces.sort();
        next.pending.extend(fragment.pending);
        next.pending.sort();
        next.pending.dedup();
        next.source_hosts_v4.extend(fragment.source_hosts_v4);
        next.source_hosts_v4.sort();
        next.source_hosts_v6.extend(fragment.source_hosts_v6);
        next.source_hosts_v6.sort();
        next.source_prefixes_v4.extend(fragment.source_prefixes_v4);
        next.source_prefixes_v4.sort();
        next.source_prefixes_v6.extend(fragment.source_prefixes_v6);
        next.source_prefixes_v6.sort();
        next.destinations_v4.extend(fragment.destinations_v4);
        next.destinations_v4
            .sort_by_key(|&(id, prefix, _)| (id, prefix));
        next.destinations_v6.extend(fragment.destinations_v6);
        next.destinations_v6
            .sort_by_key(|&(id, prefix, _)| (id, prefix));
        next.server_names.extend(fragment.server_names);
        next.server_names
            .sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
        let entries = next.entries();
        for (k, limit) in LimitKind::ALL.into_iter().enumerate() {
            let max = limit.capacity(limits);
            if entries[k] as u64 > u64::from(max) {
                return Err(CompileError::LimitExceeded {
                    limit,
                    needed: entries[k],
                    max,
                    agent: who.to_string(),
                    field: limit.setting().to_string(),
                });
            }
        }
        Ok(next)
    }

    /// How many entries of each kind, in [`LimitKind::ALL`] order.
    fn entries(&self) -> [usize; LimitKind::ALL.len()] {
        [
            self.interfaces.len(),
            self.source_hosts_v4.len(),
            self.source_hosts_v6.len(),
            self.source_prefixes_v4.len(),
            self.source_prefixes_v6.len(),
            self.destinations_v4.len(),
            self.destinations_v6.len(),
            self.server_names.len(),
        ]
    }
}

/// Whether some destination may be denied. An agent whose default is allow and that has no
/// deny rule allows everything, so the kernel can skip the destination lookup.
fn restricted(agent: &Agent) -> bool {
    agent.egress_default == EgressDefault::Deny || agent.egress.iter().any(|r| r.action.drops())
}

/// One agent's destination rules as the XDP program holds them, for user space to judge an
/// address the way the program judges a packet to it: the inspecting proxy checks every
/// address it is about to dial with it. Built by the same [`destinations`] that fills the
/// maps, so the rule model is written once, and judged by the same walk as
/// `rule_verdict` in `enforcer-ebpf/src/egress.rs` (longest prefix, then first rule whose
/// protocol and ports match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRules {
    /// Whether some destination may be denied at all (see [`restricted`]); an unrestricted
    /// agent's packets skip the lookup.
    restricted: bool,
    /// Whether allow rules name hosts (`AGENT_NAMES`): DNS goes to the resolver only and
    /// learned addresses count.
    names: bool,
    /// `egress_default = "allow"`.
    default_allow: bool,
    v4: Vec<(Prefix<4>, RuleSet)>,
    v6: Vec<(Prefix<16>, RuleSet)>,
}

/// How [`DestinationRules::judge`] decided, for messages and audit records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// The agent has no deny rule and a default of allow: nothing is looked up.
    Unrestricted,
    /// A rule on the longest matching prefix allows it.
    RuleAllows,
    /// A rule on the longest matching prefix denies it (`@private`, `@metadata`, ...).
    RuleDenies,
    /// No rule matches; the address was learned for an allowed host name.
    NameAdmits,
    /// No rule matches; `egress_default = "allow"`.
    DefaultAllows,
    /// No rule matches, no allowed name admits it, and `egress_default = "deny"`.
    DefaultDenies,
    /// DNS (tcp or udp 53, tcp 853) of an agent with names goes only to the enforcer's
    /// resolver, which user space never dials on an agent's behalf.
    DnsBypass,
}

impl Judgement {
    /// Whether the packet would pass.
    pub const fn allowed(self) -> bool {
        matches!(
            self,
            Judgement::Unrestricted
                | Judgement::RuleAllows
                | Judgement::NameAdmits
                | Judgement::DefaultAllows
        )
    }

    /// Why, in words.
    pub const fn describe(self) -> &'static str {
        match self {
            Judgement::Unrestricted => "the agent has no deny rule and egress_default is allow",
            Judgement::RuleAllows => "an egress rule allows it",
            Judgement::RuleDenies => "an egress rule denies it",
            Judgement::NameAdmits => "an allowed host name resolved to it",
            Judgement::DefaultAllows => "no egress rule matches and egress_default is allow",
            Judgement::DefaultDenies => {
                "no egress rule matches, no allowed host name resolved to it, and \
                 egress_default is deny"
            }
            Judgement::DnsBypass => {
                "DNS of an agent with host names goes to the enforcer's resolver only"
            }
        }
    }
}

impl DestinationRules {
    /// Compiles `agent`'s destination rules (errors as [`compile`] would give them).
    pub fn new(agent: &Agent) -> Result<DestinationRules, CompileError> {
        let mut out = DestinationRules {
            restricted: restricted(agent),
            names: agent.has_names(),
            default_allow: agent.egress_default == EgressDefault::Allow,
            v4: Vec::new(),
            v6: Vec::new(),
        };
        if out.restricted {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            // Judging an address needs the rules' actions only, not their guard bits.
            destinations(agent, IPPROTO_ICMP, prefix_v4, &|_| 0, &mut v4)?;
            destinations(agent, IPPROTO_ICMPV6, prefix_v6, &|_| 0, &mut v6)?;
            out.v4 = v4.into_iter().map(|(_, p, r)| (p, r)).collect();
            out.v6 = v6.into_iter().map(|(_, p, r)| (p, r)).collect();
        }
        Ok(out)
    }

    /// The verdict of the agent's static rules for a packet to `dst` (`proto`, destination
    /// `port`, ignored for ICMP): the first rule of the longest prefix containing `dst`
    /// whose protocol and ports match, `None` if there is none. `Proto::Any` stands for a
    /// protocol only rules for every protocol match.
    pub fn rule(&self, dst: IpAddr, proto: Proto, port: u16) -> Option<Action> {
        let (set, icmp) = match dst.to_canonical() {
            IpAddr::V4(a) => (longest(&self.v4, a.octets()), IPPROTO_ICMP),
            IpAddr::V6(a) => (longest(&self.v6, a.octets()), IPPROTO_ICMPV6),
        };
        let (number, port) = match proto {
            Proto::Any => (PROTO_ANY, None),
            Proto::Tcp => (IPPROTO_TCP, Some(port)),
            Proto::Udp => (IPPROTO_UDP, Some(port)),
            Proto::Icmp => (icmp, None),
        };
        let set = set?;
        set.rules[..set.len as usize]
            .iter()
            .find(|r| {
                (r.proto == PROTO_ANY || r.proto == number)
                    && match port {
                        Some(port) => (r.port_lo..=r.port_hi).contains(&port),
                        // No ports: only a rule for every port decides it.
                        None => r.any_port(),
                    }
            })
            .map(|r| match r.action {
                ACTION_ALLOW => Action::Allow,
                ACTION_REJECT => Action::Reject,
                _ => Action::Deny,
            })
    }

    /// The XDP program's verdict for a packet to `dst`: static rules first (a deny there
    /// wins over everything), then, if `learned` (`dst` is an address an allowed host
    /// name resolved to, for this protocol and port) and the agent has names, the name's
    /// admission, then `egress_default`.
    pub fn judge(&self, dst: IpAddr, proto: Proto, port: u16, learned: bool) -> Judgement {
        if !self.restricted {
            return Judgement::Unrestricted;
        }
        let dns = (port == 53 && matches!(proto, Proto::Tcp | Proto::Udp))
            || (port == 853 && proto == Proto::Tcp);
        if self.names && dns {
            return Judgement::DnsBypass;
        }
        match self.rule(dst, proto, port) {
            Some(Action::Allow) => Judgement::RuleAllows,
            Some(Action::Deny | Action::Reject) => Judgement::RuleDenies,
            None if learned && self.names => Judgement::NameAdmits,
            None if self.default_allow => Judgement::DefaultAllows,
            None => Judgement::DefaultDenies,
        }
    }
}

/// The rule set of the longest of `prefixes` containing `addr`: what the probes (or the
/// LPM trie) find.
fn longest<const N: usize>(prefixes: &[(Prefix<N>, RuleSet)], addr: [u8; N]) -> Option<&RuleSet> {
    prefixes
        .iter()
        .filter(|(p, _)| mask(addr, p.len) == p.addr)
        .max_by_key(|(p, _)| p.len)
        .map(|(_, set)| set)
}

/// Chooses, per agent and family, how the kernel finds a destination's rules: probing the
/// hash map once per distinct prefix length (longest first), or, with more than
/// `MAX_DST_PROBES` lengths, the LPM trie.
fn destination_lookup(out: &mut Compiled) {
    let mut lens: BTreeMap<u32, (BTreeSet<u8>, BTreeSet<u8>)> = BTreeMap::new();
    for (id, prefix, _) in &out.destinations_v4 {
        lens.entry(*id).or_default().0.insert(prefix.len);
    }
    for (id, prefix, _) in &out.destinations_v6 {
        lens.entry(*id).or_default().1.insert(prefix.len);
    }
    for (id, policy) in &mut out.agents {
        let Some((v4, v6)) = lens.get(id) else {
            continue;
        };
        let fill = |set: &BTreeSet<u8>, lens: &mut [u8; MAX_DST_PROBES], count: &mut u8| {
            if set.len() > MAX_DST_PROBES {
                return false;
            }
            for (slot, len) in lens.iter_mut().zip(set.iter().rev()) {
                *slot = *len;
            }
            *count = set.len() as u8;
            true
        };
        if !fill(v4, &mut policy.dst_lens_v4, &mut policy.dst_lens_v4_count) {
            policy.flags |= AGENT_DST_LPM_V4;
        }
        if !fill(v6, &mut policy.dst_lens_v6, &mut policy.dst_lens_v6_count) {
            policy.flags |= AGENT_DST_LPM_V6;
        }
    }
}

/// Flags and GCRA parameters of one agent.
fn agent_policy(agent: &Agent) -> Result<AgentPolicy, CompileError> {
    let out_of_range = |field, value| CompileError::RateOutOfRange {
        agent: agent.name.clone(),
        field,
        value,
    };

    let mut flags = AGENT_ACTIVE;
    if agent.mode == Mode::Monitor {
        flags |= AGENT_MONITOR;
    }
    if agent.egress_default == EgressDefault::Allow {
        flags |= AGENT_DEFAULT_ALLOW;
    }
    if restricted(agent) {
        flags |= AGENT_RESTRICTED;
        if agent.has_names() {
            flags |= AGENT_NAMES;
        }
    }

    let [packet_cost, packet_tolerance, byte_rate, byte_tolerance] =
        rate_gcra(&agent.rate).map_err(|(field, value)| out_of_range(field, value))?;

    // The coarse clock lags by up to a tick: safe when every burst spans several ticks.
    let spans_ticks = |tolerance: u64| tolerance >> TIME_SHIFT >= COARSE_CLOCK_MIN_NS;
    if (packet_cost != 0 || byte_rate != 0)
        && (packet_cost == 0 || spans_ticks(packet_tolerance))
        && (byte_rate == 0 || spans_ticks(byte_tolerance))
    {
        flags |= AGENT_COARSE_CLOCK;
    }

    Ok(AgentPolicy {
        flags,
        packet_cost,
        packet_tolerance,
        byte_rate,
        byte_tolerance,
        // Filled in by `destination_lookup` once the destinations are known.
        ..AgentPolicy::default()
    })
}

/// Which half of a [`Limit`] cannot be expressed in the limiter's time units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unrepresentable {
    /// The rate (its cost would be 0, which the kernel reads as no limit).
    Rate,
    /// The burst (its tolerance would pass 64 bits).
    Burst,
}

/// GCRA parameters of a limit counted in events (packets, connections, probes): the cost of
/// one event, `UNITS_PER_SEC / per_sec`, and the burst in time units, `burst * cost`.
fn event_gcra(limit: Limit) -> Result<(u64, u64), Unrepresentable> {
    // A cost of 0 would read as "no limit" in the kernel, so it is out of range too.
    let cost = UNITS_PER_SEC
        .checked_div(limit.per_sec)
        .filter(|&cost| cost > 0)
        .ok_or(Unrepresentable::Rate)?;
    let tolerance = u64::try_from(u128::from(limit.burst) * u128::from(cost))
        .map_err(|_| Unrepresentable::Burst)?;
    Ok((cost, tolerance))
}

/// GCRA parameters of a bytes limit: the rate itself (the kernel divides by it per packet)
/// and the burst in time units, `burst * UNITS_PER_SEC / per_sec`.
fn byte_gcra(limit: Limit) -> Result<(u64, u64), Unrepresentable> {
    let tolerance = (u128::from(limit.burst) * u128::from(UNITS_PER_SEC))
        .checked_div(u128::from(limit.per_sec))
        .ok_or(Unrepresentable::Rate)?;
    let tolerance = u64::try_from(tolerance).map_err(|_| Unrepresentable::Burst)?;
    Ok((limit.per_sec, tolerance))
}

/// `[packet_cost, packet_tolerance, byte_rate, byte_tolerance]` of a `rate` table (zeros for
/// a limit not set), as `AgentPolicy` and `SharedPolicy` hold them; the error names the
/// field of the table that cannot be expressed, and its value.
fn rate_gcra(rate: &Rate) -> Result<[u64; 4], (&'static str, u64)> {
    let (packet_cost, packet_tolerance) = match rate.packets {
        None => (0, 0),
        Some(limit) => event_gcra(limit).map_err(|e| match e {
            Unrepresentable::Rate => ("packets_per_sec", limit.per_sec),
            Unrepresentable::Burst => ("packets_burst", limit.burst),
        })?,
    };
    let (byte_rate, byte_tolerance) = match rate.bytes {
        None => (0, 0),
        Some(limit) => byte_gcra(limit).map_err(|e| match e {
            Unrepresentable::Rate => ("bytes_per_sec", limit.per_sec),
            Unrepresentable::Burst => ("bytes_burst", limit.burst),
        })?,
    };
    Ok([packet_cost, packet_tolerance, byte_rate, byte_tolerance])
}

/// Whether the program must run the guards for `agent`: it has a connection rate, a quota or
/// a breaker, or a rule of it names a shared group or passes an open breaker.
/// Whether the agent's packets go through the guard stage: it has guards, or a rule with a
/// shared group, `always`, or `reject` (the reply is decided in the guard stage, so the
/// entry program carries no reject bit: on Linux 6.1 that bit split its states past the
/// verifier's limit).
fn guarded(agent: &Agent) -> bool {
    !agent.guards.is_empty()
        || agent
            .egress
            .iter()
            .any(|r| r.shared.is_some() || r.always || r.action == Action::Reject)
}

/// The `GUARD_POLICY` entry of `agent`, `None` when it has no guards (see [`guarded`]); an
/// agent guarded only through its rules gets an entry of zeros, which the program reads as
/// no connection rate, no quota and no breaker.
fn guard_policy(agent: &Agent) -> Result<Option<GuardPolicy>, CompileError> {
    if !guarded(agent) {
        return Ok(None);
    }
    let out_of_range = |field: &str, value| CompileError::GuardOutOfRange {
        agent: agent.name.clone(),
        field: field.to_owned(),
        value,
    };
    let mut out = GuardPolicy::default();
    let guards = &agent.guards;
    if let Some(limit) = guards.connections {
        (out.conn_cost, out.conn_tolerance) = event_gcra(limit).map_err(|e| match e {
            Unrepresentable::Rate => out_of_range("connections.per_sec", limit.per_sec),
            Unrepresentable::Burst => out_of_range("connections.burst", limit.burst),
        })?;
    }
    for (slot, quota) in out.quota.iter_mut().zip(guards.quota.by_kind()) {
        *slot = quota.unwrap_or(0);
    }
    if !guards.quota.is_empty() {
        out.flags |= GUARD_QUOTA;
    }
    if let Some(b) = guards.breaker {
        out.flags |= GUARD_BREAKER;
        if b.action == BreakerAction::Reject {
            out.flags |= GUARD_BREAKER_REJECT;
        }
        // The validator bounds every duration by a day and drops by a million, so none of
        // these products come near 64 bits, and the strike cost is at least 16,000.
        let window = b.within_secs * UNITS_PER_SEC;
        out.strike_cost = window / b.drops;
        // `drops` strikes at once take the limiter to exactly its tolerance and the next one
        // is refused: the breaker opens at drop `drops + 1` within the window. `drops *
        // cost` rather than the window itself, which integer division can leave a cost
        // above, admitting one strike more.
        out.strike_tolerance = out.strike_cost * b.drops;
        out.cooldown = b.cooldown_secs * UNITS_PER_SEC;
        out.max_cooldown = b.max_cooldown_secs * UNITS_PER_SEC;
        out.calm = b.calm_secs * UNITS_PER_SEC;
        (out.probe_cost, out.probe_tolerance) = event_gcra(b.probe).map_err(|e| match e {
            Unrepresentable::Rate => out_of_range("breaker.probe_per_sec", b.probe.per_sec),
            Unrepresentable::Burst => out_of_range("breaker.probe_burst", b.probe.burst),
        })?;
    }
    Ok(Some(out))
}

/// The `SHARED_POLICY` entry of a group.
fn shared_policy(group: &SharedGroup) -> Result<SharedPolicy, CompileError> {
    let out_of_range = |field: String, value| CompileError::SharedOutOfRange {
        group: group.name.clone(),
        field,
        value,
    };
    let [packet_cost, packet_tolerance, byte_rate, byte_tolerance] = rate_gcra(&group.rate)
        .map_err(|(field, value)| out_of_range(format!("rate.{field}"), value))?;
    let (conn_cost, conn_tolerance) = match group.connections {
        None => (0, 0),
        Some(limit) => event_gcra(limit).map_err(|e| match e {
            Unrepresentable::Rate => out_of_range("connections.per_sec".into(), limit.per_sec),
            Unrepresentable::Burst => out_of_range("connections.burst".into(), limit.burst),
        })?,
    };
    Ok(SharedPolicy {
        packet_cost,
        packet_tolerance,
        byte_rate,
        byte_tolerance,
        conn_cost,
        conn_tolerance,
    })
}

/// A rule's `PortRule::guard` bits: its shared group's id (`group_of` resolves the name; the
/// validator made sure it exists) and whether it passes an open breaker.
fn rule_guard(rule: &EgressRule, group_of: &dyn Fn(&str) -> u16) -> u16 {
    let group = rule.shared.as_deref().map_or(0, group_of) & RULE_GROUP_MASK;
    if rule.always {
        group | RULE_ALWAYS
    } else {
        group
    }
}

fn prefix_v4(net: &IpNet) -> Option<Prefix<4>> {
    match net.addr() {
        IpAddr::V4(a) => Some(Prefix {
            addr: a.octets(),
            len: net.prefix_len(),
        }),
        IpAddr::V6(_) => None,
    }
}

fn prefix_v6(net: &IpNet) -> Option<Prefix<16>> {
    match net.addr() {
        IpAddr::V6(a) => Some(Prefix {
            addr: a.octets(),
            len: net.prefix_len(),
        }),
        IpAddr::V4(_) => None,
    }
}

/// `addr` with every bit after the first `len` cleared.
fn mask<const N: usize>(mut addr: [u8; N], len: u8) -> [u8; N] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let kept = usize::from(len).saturating_sub(i * 8).min(8);
        // checked_shl: shifting a u8 by 8 overflows, and means "keep no bits".
        *byte &= 0xffu8.checked_shl(8 - kept as u32).unwrap_or(0);
    }
    addr
}

/// The rules an address learned for a name carries, or a server name's: allow rules for
/// `rules` (protocol and ports of every rule naming it), dead ones dropped. An error if more
/// than [`MAX_RULES_PER_PREFIX`] remain.
pub fn name_rule_set(rules: &[(Proto, PortRange)]) -> Result<RuleSet, usize> {
    let mut merged: Vec<PortRule> = Vec::new();
    for (proto, ports) in rules {
        let rule = PortRule {
            proto: match proto {
                Proto::Tcp => IPPROTO_TCP,
                Proto::Udp => IPPROTO_UDP,
                // Names are refused on icmp rules at parse time; `any` is what is left.
                Proto::Any | Proto::Icmp => PROTO_ANY,
            },
            action: ACTION_ALLOW,
            guard: 0,
            port_lo: ports.lo,
            port_hi: ports.hi,
        };
        if !merged.iter().any(|earlier| shadows(earlier, &rule)) {
            merged.retain(|later| !shadows(&rule, later));
            merged.push(rule);
        }
    }
    if merged.len() > MAX_RULES_PER_PREFIX {
        return Err(merged.len());
    }
    let mut set = RuleSet {
        len: merged.len() as u32,
        ..RuleSet::default()
    };
    set.rules[..merged.len()].copy_from_slice(&merged);
    Ok(set)
}

/// The `SNI` entries of one agent: every name pattern of its allow rules with the rules
/// that name it.
fn server_names(
    agent: &Agent,
    out: &mut Vec<(u32, u32, String, RuleSet)>,
) -> Result<(), CompileError> {
    let mut patterns: BTreeMap<&NamePattern, Vec<(Proto, PortRange)>> = BTreeMap::new();
    for rule in agent.egress.iter().filter(|r| r.action == Action::Allow) {
        for dest in &rule.to {
            if let Destination::Name(pattern) = dest {
                let rules = patterns.entry(pattern).or_default();
                if !rules.contains(&(rule.proto, rule.ports)) {
                    rules.push((rule.proto, rule.ports));
                }
            }
        }
    }
    for (pattern, rules) in patterns {
        let set = name_rule_set(&rules).map_err(|count| CompileError::TooManyNameRules {
            agent: agent.name.clone(),
            name: pattern.to_string(),
            rules: count,
            max: MAX_RULES_PER_PREFIX,
        })?;
        let (kind, name) = match pattern {
            NamePattern::Exact(n) => (SNI_EXACT, n.clone()),
            NamePattern::Wildcard(suffix) => (SNI_WILDCARD, suffix.clone()),
        };
        out.push((agent.id, kind, name, set));
    }
    Ok(())
}

/// Whether `earlier` decides every packet `later` would match, making `later` dead. This
/// holds for packets without ports and port-less fragments too: a rule covering all ports
/// of its protocol decides them the same way, and one that does not is skipped (or stops a
/// fragment) before `later` is reached.
fn shadows(earlier: &PortRule, later: &PortRule) -> bool {
    (earlier.proto == PROTO_ANY || earlier.proto == later.proto)
        && earlier.port_lo <= later.port_lo
        && later.port_hi <= earlier.port_hi
}

/// The destination entries of one agent in one address family. `prefix` picks and converts
/// the family's prefixes; `icmp` is the family's ICMP protocol number; `guard` gives a
/// rule's `PortRule::guard` bits.
fn destinations<const N: usize>(
    agent: &Agent,
    icmp: u8,
    prefix: fn(&IpNet) -> Option<Prefix<N>>,
    guard: &dyn Fn(&EgressRule) -> u16,
    out: &mut Vec<(u32, Prefix<N>, RuleSet)>,
) -> Result<(), CompileError> {
    // Each prefix named (kept as written too, for messages) with its rules, keyed for
    // ordering: deny (0) before allow (1), then document order.
    type Named<const N: usize> = BTreeMap<Prefix<N>, (IpNet, Vec<(u8, usize, PortRule)>)>;
    let mut named: Named<N> = BTreeMap::new();
    for (index, rule) in agent.egress.iter().enumerate() {
        let (action, rank) = match rule.action {
            Action::Deny => (ACTION_DENY, 0),
            Action::Reject => (ACTION_REJECT, 0),
            Action::Allow => (ACTION_ALLOW, 1),
        };
        let port_rule = PortRule {
            proto: match rule.proto {
                Proto::Any => PROTO_ANY,
                Proto::Tcp => IPPROTO_TCP,
                Proto::Udp => IPPROTO_UDP,
                Proto::Icmp => icmp,
            },
            action,
            guard: guard(rule),
            port_lo: rule.ports.lo,
            port_hi: rule.ports.hi,
        };
        for net in rule.to.iter().flat_map(|d| d.nets()) {
            if let Some(p) = prefix(net) {
                let (_, rules) = named.entry(p).or_insert_with(|| (*net, Vec::new()));
                rules.push((rank, index, port_rule));
            }
        }
    }
    for (_, rules) in named.values_mut() {
        rules.sort_by_key(|&(rank, index, _)| (rank, index));
    }

    // The prefixes containing P are P masked to each shorter length the agent uses that
    // are themselves named; probing those lengths is linear in the prefix count, where
    // comparing every pair would be quadratic.
    let lengths: BTreeSet<u8> = named.keys().map(|p| p.len).collect();
    for (p, (net, _)) in &named {
        let mut merged: Vec<PortRule> = Vec::new();
        for &len in lengths.iter().rev().filter(|&&len| len <= p.len) {
            let covering = Prefix {
                addr: mask(p.addr, len),
                len,
            };
            for &(_, _, rule) in named.get(&covering).into_iter().flat_map(|(_, r)| r) {
                // Dropping dead rules (identical ones included) keeps entries within
                // MAX_RULES_PER_PREFIX without changing any verdict.
                if !merged.iter().any(|earlier| shadows(earlier, &rule)) {
                    merged.push(rule);
                }
            }
        }
        if merged.len() > MAX_RULES_PER_PREFIX {
            return Err(CompileError::TooManyRules {
                agent: agent.name.clone(),
                prefix: *net,
                rules: merged.len(),
                max: MAX_RULES_PER_PREFIX,
            });
        }
        let mut set = RuleSet {
            len: merged.len() as u32,
            ..RuleSet::default()
        };
        set.rules[..merged.len()].copy_from_slice(&merged);
        out.push((agent.id, *p, set));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use enforcer_common::{TIME_SHIFT, UNITS_PER_SEC};

    use super::*;
    use crate::policy::parse;

    /// Interfaces `ifN` exist with index N.
    fn ifindex(name: &str) -> Option<u32> {
        name.strip_prefix("if")?.parse().ok()
    }

    fn compile_text(text: &str) -> Result<Compiled, CompileError> {
        let policy = parse("p.toml", text).unwrap_or_else(|e| panic!("{e}"));
        compile(&policy, &Limits::default(), &ifindex)
    }

    fn ok(text: &str) -> Compiled {
        compile_text(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rule(proto: u8, action: u8, port_lo: u16, port_hi: u16) -> PortRule {
        PortRule {
            proto,
            action,
            guard: 0,
            port_lo,
            port_hi,
        }
    }

    fn allow(proto: u8, ports: (u16, u16)) -> PortRule {
        rule(proto, ACTION_ALLOW, ports.0, ports.1)
    }

    fn deny(proto: u8, ports: (u16, u16)) -> PortRule {
        rule(proto, ACTION_DENY, ports.0, ports.1)
    }

    const ALL: (u16, u16) = (0, u16::MAX);

    fn set(rules: &[PortRule]) -> RuleSet {
        let mut s = RuleSet {
            len: rules.len() as u32,
            ..RuleSet::default()
        };
        s.rules[..rules.len()].copy_from_slice(rules);
        s
    }

    fn v4(s: &str) -> Prefix<4> {
        let (a, l) = s.split_once('/').unwrap();
        Prefix {
            addr: a.parse::<std::net::Ipv4Addr>().unwrap().octets(),
            len: l.parse().unwrap(),
        }
    }

    fn v6(s: &str) -> Prefix<16> {
        let (a, l) = s.split_once('/').unwrap();
        Prefix {
            addr: a.parse::<std::net::Ipv6Addr>().unwrap().octets(),
            len: l.parse().unwrap(),
        }
    }

    /// An agent `name` with id `id` on interface `if<id>`, then `extra` lines.
    fn agent(id: u32, extra: &str) -> String {
        format!("[[agents]]\nid = {id}\nname = \"a{id}\"\ninterfaces = [\"if{id}\"]\n{extra}")
    }

    #[test]
    fn replacing_one_agent_equals_compiling_the_whole_policy_again() {
        let body = |id: u32| {
            // Odd agents have guards of their own, agents 2 and 6 only a rule's.
            let guards = match id % 4 {
                1 => "connections = { per_sec = 10 }\nbreaker = { drops = 5 }\n",
                3 => "quota = { bytes_per_day = 1_000_000 }\n",
                _ => "",
            };
            let rule_guard = match id % 4 {
                2 => "shared = \"api\"\n",
                3 => "always = true\n",
                _ => "",
            };
            agent(
                id,
                &format!(
                    "prefixes = [\"10.0.0.{id}\", \"fd00::{id}\", \"10.{id}.0.0/16\"]\n\
                     egress_default = \"deny\"\n{guards}\
                     [[agents.egress]]\naction = \"allow\"\nto = [\"192.0.2.0/24\", \"2001:db8::/32\", \"api{id}.example.com\"]\nproto = \"tcp\"\nports = 443\n{rule_guard}"
                ),
            )
        };
        let text = |ids: &[u32]| {
            "[[shared]]\nname = \"api\"\nconnections = { per_sec = 50 }\n".to_owned()
                + &ids.iter().map(|&id| body(id)).collect::<String>()
        };
        let policy = parse("p.toml", &text(&[1, 2, 3, 4, 5, 6])).unwrap();
        // Only interfaces 2 and 6 exist, so the others are pending.
        let exists = |name: &str| ifindex(name).filter(|n| *n == 2 || *n == 6);
        let all = compile(&policy, &Limits::default(), &exists).unwrap();
        let ids = |c: &Compiled| c.guards.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(ids(&all), [1, 2, 3, 5, 6], "agent 4 has no guards");
        assert_eq!(all.shared.len(), 1);
        // Agent 3 goes.
        let without = all
            .clone()
            .replace_agents(
                &BTreeSet::from([3]),
                &["if3".to_owned()],
                Compiled::default(),
                &Limits::default(),
                "a3",
            )
            .unwrap();
        assert_eq!(without.agents.len(), 5);
        let expected = parse("p.toml", &text(&[1, 2, 4, 5, 6])).unwrap();
        assert_eq!(
            without,
            compile(&expected, &Limits::default(), &exists).unwrap()
        );
        // It comes back; agent 6 goes.
        let fragment =
            compile_agents(&policy, &policy.agents()[2..3], &Limits::default(), &exists).unwrap();
        let without = without
            .replace_agents(
                &BTreeSet::from([6]),
                &["if6".to_owned()],
                fragment,
                &Limits::default(),
                "a3",
            )
            .unwrap();
        let expected = parse("p.toml", &text(&[1, 2, 3, 4, 5])).unwrap();
        assert_eq!(
            without,
            compile(&expected, &Limits::default(), &exists).unwrap()
        );
        assert_eq!(ids(&without), [1, 2, 3, 5]);
        // Agent 1 changes: it loses its guards.
        let changed = policy.agents()[0].clone();
        let changed = crate::policy::Agent {
            guards: crate::policy::Guards::default(),
            ..changed
        };
        let fragment = compile_agents(&policy, [&changed], &Limits::default(), &exists).unwrap();
        let after = without
            .clone()
            .replace_agents(
                &BTreeSet::from([1]),
                &[],
                fragment,
                &Limits::default(),
                "a1",
            )
            .unwrap();
        assert_eq!(ids(&after), [2, 3, 5]);
        assert_eq!(after.agents[0].1.flags & AGENT_GUARDED, 0);
        let mut whole = expected.own_agents().to_vec();
        whole[0] = changed;
        let recompiled = compile_agents(&expected, &whole, &Limits::default(), &exists).unwrap();
        assert_eq!(after, recompiled);
        // One more agent than the maps hold is refused, and nothing changes.
        let tight = Limits {
            max_source_prefixes: 5,
            ..Limits::default()
        };
        let fragment = compile_agents(&policy, &policy.agents()[5..], &tight, &exists).unwrap();
        let e = without
            .clone()
            .replace_agents(&BTreeSet::new(), &[], fragment, &tight, "a6")
            .unwrap_err();
        assert!(
            matches!(e, CompileError::LimitExceeded { ref agent, needed: 6, max: 5, .. } if agent == "a6"),
            "{e:?}"
        );
    }

    #[test]
    fn documented_example() {
        let text = r#"
[defaults]
unknown = "pass"

[[agents]]
id = 1
name = "coder"
interfaces = ["if7"]
prefixes = ["10.77.1.2/32", "fd77:1::2/128"]
mode = "enforce"
egress_default = "deny"
rate = { packets_per_sec = 1000, packets_burst = 100, bytes_per_sec = 1_000_000, bytes_burst = 100_000 }

[[agents.egress]]
action = "allow"
to = ["10.77.2.0/24", "@metadata"]
proto = "tcp"
ports = "443"
"#;
        let c = ok(text);
        let https = set(&[allow(IPPROTO_TCP, (443, 443))]);
        assert_eq!(
            c,
            Compiled {
                unknown_drop: false,
                agents: vec![(
                    1,
                    AgentPolicy {
                        // Both bursts span 100 ms, enough for the coarse clock.
                        flags: AGENT_ACTIVE | AGENT_RESTRICTED | AGENT_COARSE_CLOCK,
                        packet_cost: 16_000_000,
                        packet_tolerance: 1_600_000_000,
                        byte_rate: 1_000_000,
                        byte_tolerance: 1_600_000_000,
                        dst_lens_v4_count: 2,
                        dst_lens_v4: [32, 24, 0, 0, 0, 0, 0, 0],
                        dst_lens_v6_count: 1,
                        dst_lens_v6: [128, 0, 0, 0, 0, 0, 0, 0],
                        _pad: 0,
                    }
                )],
                interfaces: vec![(7, 1)],
                pending: vec![],
                source_hosts_v4: vec![([10, 77, 1, 2], 1)],
                source_hosts_v6: vec![(v6("fd77:1::2/128").addr, 1)],
                source_prefixes_v4: vec![],
                source_prefixes_v6: vec![],
                destinations_v4: vec![
                    (1, v4("10.77.2.0/24"), https),
                    (1, v4("100.100.100.200/32"), https),
                    (1, v4("169.254.169.254/32"), https),
                    (1, v4("169.254.170.2/32"), https),
                ],
                destinations_v6: vec![(1, v6("fd00:ec2::254/128"), https)],
                tls_ports: TlsPorts {
                    ports: [443, 0, 0, 0],
                },
                server_names: vec![],
                guards: vec![],
                shared: vec![],
            }
        );
    }

    #[test]
    fn host_names_become_server_names_and_flags() {
        let c = ok(r#"
[defaults]
tls_ports = [443, 8443]
[[agents]]
id = 3
name = "a"
interfaces = ["if4"]
[[agents.egress]]
action = "allow"
to = ["api.example.test", "*.cdn.example.test", "10.0.0.0/8"]
proto = "tcp"
ports = 443
[[agents.egress]]
action = "allow"
to = ["api.example.test"]
proto = "tcp"
ports = "8000-9000"
[[agents.egress]]
action = "allow"
to = ["api.example.test"]
proto = "tcp"
ports = 8443
"#);
        assert_eq!(c.tls_ports.ports, [443, 8443, 0, 0]);
        assert_eq!(c.agents[0].1.flags & AGENT_NAMES, AGENT_NAMES);
        // The 8443 rule is inside 8000-9000, so it is dropped as dead.
        assert_eq!(
            c.server_names,
            vec![
                (
                    3,
                    SNI_EXACT,
                    "api.example.test".into(),
                    set(&[
                        allow(IPPROTO_TCP, (443, 443)),
                        allow(IPPROTO_TCP, (8000, 9000))
                    ])
                ),
                (
                    3,
                    SNI_WILDCARD,
                    ".cdn.example.test".into(),
                    set(&[allow(IPPROTO_TCP, (443, 443))])
                ),
            ]
        );
        // Names add no static destinations; the CIDR still does.
        assert_eq!(c.destinations_v4.len(), 1);
        // An agent without names has no name flag.
        let plain = ok("[[agents]]\nid = 1\nname = \"b\"\ninterfaces = [\"if4\"]\n");
        assert_eq!(plain.agents[0].1.flags & AGENT_NAMES, 0);
    }

    #[test]
    fn nested_prefixes_merge_most_specific_first() {
        let c = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"10.1.0.0/16\"]\nproto = \"tcp\"\nports = 22\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nproto = \"udp\"\nports = 53\n",
        ));
        let dns = allow(IPPROTO_UDP, (53, 53));
        assert_eq!(
            c.destinations_v4,
            vec![
                (1, v4("0.0.0.0/0"), set(&[dns])),
                (1, v4("10.0.0.0/8"), set(&[allow(IPPROTO_TCP, ALL), dns])),
                (
                    1,
                    v4("10.1.0.0/16"),
                    set(&[deny(IPPROTO_TCP, (22, 22)), allow(IPPROTO_TCP, ALL), dns])
                ),
            ]
        );
        assert_eq!(c.destinations_v6, vec![(1, v6("::/0"), set(&[dns]))]);
    }

    #[test]
    fn deny_first_then_document_order_on_one_prefix() {
        let c = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = 443\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = 80\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = \"0-1023\"\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"10.0.0.0/8\"]\nproto = \"udp\"\n",
        ));
        // The allows on 443 and 80 are dead under the deny of 0-1023, and dropped.
        assert_eq!(
            c.destinations_v4,
            vec![(
                1,
                v4("10.0.0.0/8"),
                set(&[deny(IPPROTO_TCP, (0, 1023)), deny(IPPROTO_UDP, ALL)])
            )]
        );

        let c = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = 443\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = 80\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = \"1000-2000\"\n",
        ));
        assert_eq!(
            c.destinations_v4,
            vec![(
                1,
                v4("10.0.0.0/8"),
                set(&[
                    deny(IPPROTO_TCP, (1000, 2000)),
                    allow(IPPROTO_TCP, (443, 443)),
                    allow(IPPROTO_TCP, (80, 80)),
                ])
            )]
        );
    }

    /// The rules of agent 1 of `text`, as the inspecting proxy judges addresses with them.
    fn rules_of(text: &str) -> DestinationRules {
        DestinationRules::new(&parse("t", text).unwrap().agents()[0]).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn user_space_judges_addresses_like_the_packet_tables() {
        let r = rules_of(&agent(
            1,
            "[[agents.egress]]\naction = \"deny\"\nto = [\"@metadata\", \"@private\"]\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.1.0.0/16\"]\nproto = \"tcp\"\nports = 443\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"0.0.0.0/0\", \"::/0\"]\nproto = \"tcp\"\nports = 8443\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"api.example.test\"]\nproto = \"tcp\"\nports = 443\n",
        ));
        let j = |dst: &str, port: u16, learned: bool| r.judge(ip(dst), Proto::Tcp, port, learned);
        // The metadata address is denied even when an allowed name resolved to it.
        assert_eq!(j("169.254.169.254", 443, false), Judgement::RuleDenies);
        assert_eq!(j("169.254.169.254", 443, true), Judgement::RuleDenies);
        assert_eq!(j("169.254.169.254", 8443, true), Judgement::RuleDenies);
        // The longer prefix decides: 10.1/16 allows 443 inside @private's 10/8 ...
        assert_eq!(j("10.1.2.3", 443, false), Judgement::RuleAllows);
        // ... and on its other ports the covering deny still holds.
        assert_eq!(j("10.1.2.3", 80, true), Judgement::RuleDenies);
        assert_eq!(j("10.2.0.1", 443, true), Judgement::RuleDenies);
        // @private holds RFC 6598's shared space, where some clouds serve metadata.
        assert_eq!(j("100.64.0.1", 8443, true), Judgement::RuleDenies);
        assert_eq!(j("100.127.255.254", 443, false), Judgement::RuleDenies);
        assert_eq!(j("100.128.0.1", 8443, false), Judgement::RuleAllows);
        // Elsewhere: 8443 is allowed everywhere, 443 only through a learned name.
        assert_eq!(j("198.18.0.2", 8443, false), Judgement::RuleAllows);
        assert_eq!(j("198.18.0.2", 443, false), Judgement::DefaultDenies);
        assert_eq!(j("198.18.0.2", 443, true), Judgement::NameAdmits);
        assert_eq!(j("2001:db8::1", 8443, false), Judgement::RuleAllows);
        assert_eq!(j("2001:db8::1", 443, false), Judgement::DefaultDenies);
        // IPv4-mapped IPv6 is judged as the IPv4 address.
        assert_eq!(
            j("::ffff:169.254.169.254", 8443, true),
            Judgement::RuleDenies
        );
        // DNS of an agent with names goes to the resolver only.
        assert_eq!(j("198.18.0.2", 853, true), Judgement::DnsBypass);
        assert!(!Judgement::DnsBypass.allowed());
        // Protocols: ICMP matches only rules for every port; udp is not tcp.
        assert_eq!(r.rule(ip("10.0.0.1"), Proto::Icmp, 0), Some(Action::Deny));
        assert_eq!(r.rule(ip("198.18.0.2"), Proto::Udp, 8443), None);

        // A deny-list: no match falls to the default allow, names or not.
        let r = rules_of(&agent(
            1,
            "egress_default = \"allow\"\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"@metadata\"]\nproto = \"tcp\"\nports = 80\n",
        ));
        assert_eq!(
            r.judge(ip("169.254.169.254"), Proto::Tcp, 80, true),
            Judgement::RuleDenies
        );
        assert_eq!(
            r.judge(ip("169.254.169.254"), Proto::Tcp, 443, false),
            Judgement::DefaultAllows
        );
        // Without a deny rule the program skips the lookup.
        let r = rules_of(&agent(1, "egress_default = \"allow\"\n"));
        assert_eq!(
            r.judge(ip("169.254.169.254"), Proto::Tcp, 80, false),
            Judgement::Unrestricted
        );
        // An allow-list without names: a learned address means nothing.
        let r = rules_of(&agent(1, ""));
        assert_eq!(
            r.judge(ip("198.18.0.2"), Proto::Tcp, 443, true),
            Judgement::DefaultDenies
        );
    }

    #[test]
    fn user_space_judgement_takes_the_longest_prefix_with_covering_rules() {
        let text = agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = 443\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"10.0.0.0/24\"]\nproto = \"tcp\"\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.7\"]\n",
        );
        let r = rules_of(&text);
        // The host allows everything, its /24 denies tcp, the /8 allows 443.
        assert_eq!(r.rule(ip("10.0.0.7"), Proto::Tcp, 443), Some(Action::Allow));
        assert_eq!(r.rule(ip("10.0.0.8"), Proto::Tcp, 443), Some(Action::Deny));
        assert_eq!(r.rule(ip("10.0.1.8"), Proto::Tcp, 443), Some(Action::Allow));
        assert_eq!(r.rule(ip("10.0.1.8"), Proto::Tcp, 80), None);
    }

    #[test]
    fn identical_and_shadowed_rules_are_dropped() {
        // The same prefix twice in one rule (directly and through a preset), the same rule
        // on a covering prefix, and a rule behind an any-protocol, any-port rule.
        let c = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\", \"@rfc1918\"]\nproto = \"tcp\"\nports = 443\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.1.0.0/16\"]\nproto = \"tcp\"\nports = 443\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.1.0.0/16\"]\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"10.1.0.0/16\"]\nproto = \"udp\"\nports = 53\n",
        ));
        let https = allow(IPPROTO_TCP, (443, 443));
        assert_eq!(
            c.destinations_v4,
            vec![
                (1, v4("10.0.0.0/8"), set(&[https])),
                (1, v4("10.1.0.0/16"), set(&[https, allow(PROTO_ANY, ALL)])),
                (1, v4("172.16.0.0/12"), set(&[https])),
                (1, v4("192.168.0.0/16"), set(&[https])),
            ]
        );
        assert!(c.destinations_v6.is_empty());
    }

    #[test]
    fn icmp_number_follows_family() {
        let c = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"@loopback\"]\nproto = \"icmp\"\n",
        ));
        assert_eq!(
            c.destinations_v4,
            vec![(1, v4("127.0.0.0/8"), set(&[allow(IPPROTO_ICMP, ALL)]))]
        );
        assert_eq!(
            c.destinations_v6,
            vec![(1, v6("::1/128"), set(&[allow(IPPROTO_ICMPV6, ALL)]))]
        );
    }

    #[test]
    fn presets_expand_per_family() {
        let c = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"deny\"\nto = [\"@private\"]\n",
        ));
        let d = set(&[deny(PROTO_ANY, ALL)]);
        assert_eq!(
            c.destinations_v4,
            vec![
                (1, v4("10.0.0.0/8"), d),
                (1, v4("100.64.0.0/10"), d),
                (1, v4("169.254.0.0/16"), d),
                (1, v4("172.16.0.0/12"), d),
                (1, v4("192.168.0.0/16"), d),
            ]
        );
        assert_eq!(
            c.destinations_v6,
            vec![(1, v6("fc00::/7"), d), (1, v6("fe80::/10"), d)]
        );
    }

    #[test]
    fn sources_split_hosts_from_prefixes() {
        let c = ok(
            "[[agents]]\nid = 2\nname = \"b\"\nprefixes = [\"10.0.1.0/24\", \"10.0.0.9\", \"fd00:1::/64\", \"fd00::1\", \"10.0.0.0/31\"]\n\
                    [[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.0.0.5/32\", \"0.0.0.0/0\"]\n",
        );
        assert_eq!(
            c.source_hosts_v4,
            vec![([10, 0, 0, 5], 1), ([10, 0, 0, 9], 2)]
        );
        assert_eq!(c.source_hosts_v6, vec![(v6("fd00::1/128").addr, 2)]);
        assert_eq!(
            c.source_prefixes_v4,
            vec![
                (v4("0.0.0.0/0"), 1),
                (v4("10.0.0.0/31"), 2),
                (v4("10.0.1.0/24"), 2)
            ]
        );
        assert_eq!(c.source_prefixes_v6, vec![(v6("fd00:1::/64"), 2)]);
        assert!(c.interfaces.is_empty());
        assert_eq!(c.agents.iter().map(|a| a.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn rate_math() {
        assert_eq!(TIME_SHIFT, 4, "the expectations below assume 1/16 ns units");
        let policy = |rate: &str| ok(&agent(1, &format!("rate = {rate}\n"))).agents[0].1;

        let p = policy("{ packets_per_sec = 1000 }");
        assert_eq!(p.packet_cost, 16_000_000);
        // Default burst: a tenth of the rate.
        assert_eq!(p.packet_tolerance, 100 * 16_000_000);
        assert_eq!((p.byte_rate, p.byte_tolerance), (0, 0));

        let p = policy("{ packets_per_sec = 3, packets_burst = 7 }");
        // Integer division: 16e9 / 3 rounds down.
        assert_eq!(p.packet_cost, 5_333_333_333);
        assert_eq!(p.packet_tolerance, 7 * 5_333_333_333);

        let p = policy("{ packets_per_sec = 1_000_000_000 }");
        assert_eq!(p.packet_cost, 16);

        let p = policy("{ bytes_per_sec = 125_000_000 }");
        assert_eq!((p.packet_cost, p.packet_tolerance), (0, 0));
        assert_eq!(p.byte_rate, 125_000_000);
        // Default burst 12.5 MB, a tenth of a second.
        assert_eq!(p.byte_tolerance, UNITS_PER_SEC / 10);

        let p = policy("{ bytes_per_sec = 3, bytes_burst = 1518 }");
        assert_eq!(p.byte_tolerance, 1518 * 16_000_000_000 / 3);

        let p = policy("{}");
        assert_eq!(
            (
                p.packet_cost,
                p.packet_tolerance,
                p.byte_rate,
                p.byte_tolerance
            ),
            (0, 0, 0, 0)
        );

        assert_eq!(
            compile_text(&agent(
                1,
                "rate = { packets_per_sec = 1, packets_burst = 9_000_000_000 }\n"
            )),
            Err(CompileError::RateOutOfRange {
                agent: "a1".into(),
                field: "packets_burst",
                value: 9_000_000_000,
            })
        );
        let text = agent(
            1,
            "rate = { packets_per_sec = 1, packets_burst = 9_000_000_000 }\n",
        );
        let policy = parse("p.toml", &text).unwrap();
        let err = compile(&policy, &Limits::default(), &ifindex).unwrap_err();
        assert_eq!(err.field(&policy).unwrap(), "agents[0].rate.packets_burst");
        let err = compile_text(&agent(
            1,
            "rate = { bytes_per_sec = 1, bytes_burst = 2_000_000_000 }\n",
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent \"a1\": rate.bytes_burst = 2000000000 cannot be expressed in the rate \
             limiter's 64-bit time units (the burst would span more than 36 years)"
        );
    }

    #[test]
    fn flags() {
        let flags = |extra: &str| ok(&agent(1, extra)).agents[0].1.flags;
        let deny_rule = "[[agents.egress]]\naction = \"deny\"\nto = [\"@metadata\"]\n";
        let allow_rule = "[[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\n";

        assert_eq!(flags(""), AGENT_ACTIVE | AGENT_RESTRICTED);
        assert_eq!(
            flags("mode = \"monitor\"\n"),
            AGENT_ACTIVE | AGENT_MONITOR | AGENT_RESTRICTED
        );
        // Default allow without deny rules allows everything: no destination lookup.
        assert_eq!(
            flags("egress_default = \"allow\"\n"),
            AGENT_ACTIVE | AGENT_DEFAULT_ALLOW
        );
        let c = ok(&agent(
            1,
            &format!("egress_default = \"allow\"\n{allow_rule}"),
        ));
        assert_eq!(c.agents[0].1.flags, AGENT_ACTIVE | AGENT_DEFAULT_ALLOW);
        assert!(c.destinations_v4.is_empty() && c.destinations_v6.is_empty());
        // One deny rule makes it restricted, and its entries are emitted.
        let c = ok(&agent(
            1,
            &format!("egress_default = \"allow\"\n{deny_rule}"),
        ));
        assert_eq!(
            c.agents[0].1.flags,
            AGENT_ACTIVE | AGENT_DEFAULT_ALLOW | AGENT_RESTRICTED
        );
        assert_eq!(c.destinations_v4.len(), 3);
        assert_eq!(c.destinations_v6.len(), 1);
        assert_eq!(
            flags(&format!("mode = \"monitor\"\n{allow_rule}")),
            AGENT_ACTIVE | AGENT_MONITOR | AGENT_RESTRICTED
        );
    }

    #[test]
    fn unknown_drop() {
        assert!(ok("[defaults]\nunknown = \"drop\"\n").unknown_drop);
        assert!(!ok("agents = []\n").unknown_drop);
    }

    #[test]
    fn interfaces_resolve() {
        let c = ok(&format!(
            "{}{}",
            agent(9, ""),
            "[[agents]]\nid = 3\nname = \"x\"\ninterfaces = [\"if4\", \"if2\"]\n"
        ));
        assert_eq!(c.interfaces, vec![(2, 3), (4, 3), (9, 9)]);

        // An interface that does not exist yet is pending, not an error.
        let c = ok("[[agents]]\nid = 1\nname = \"a\"\ninterfaces = [\"eth0\", \"if3\"]\n");
        assert_eq!(c.interfaces, vec![(3, 1)]);
        assert_eq!(c.pending, vec!["eth0".to_string()]);

        // Two spellings of one interface index on two agents.
        let err = compile_text(&format!(
            "{}[[agents]]\nid = 2\nname = \"b\"\ninterfaces = [\"if01\"]\n",
            agent(1, "")
        ))
        .unwrap_err();
        assert_eq!(
            err,
            CompileError::SameInterface {
                ifindex: 1,
                agent: "a1".into(),
                interface: "if1".into(),
                other_agent: "b".into(),
                other_interface: "if01".into(),
            }
        );
        let policy = parse(
            "p.toml",
            &format!(
                "{}[[agents]]\nid = 2\nname = \"b\"\ninterfaces = [\"if7\", \"if01\"]\n",
                agent(1, "")
            ),
        )
        .unwrap();
        let err = compile(&policy, &Limits::default(), &ifindex).unwrap_err();
        assert_eq!(err.field(&policy).unwrap(), "agents[1].interfaces[1]");
    }

    #[test]
    fn too_many_rules() {
        let mut text = agent(1, "");
        for port in 0..MAX_RULES_PER_PREFIX {
            text.push_str(&format!(
                "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\nproto = \"tcp\"\nports = {port}\n"
            ));
        }
        assert!(compile_text(&text).is_ok());
        // The 17th rule sits on a covering prefix: the /8 entry collects it.
        text.push_str(
            "[[agents.egress]]\naction = \"deny\"\nto = [\"0.0.0.0/0\"]\nproto = \"udp\"\n",
        );
        let err = compile_text(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent \"a1\": destination 10.0.0.0/8 has 17 rules once the rules of every prefix \
             containing it are merged in, more than the 16 a destination entry holds"
        );
        // The first rule that names the overfull prefix.
        let policy = parse("p.toml", &text).unwrap();
        assert_eq!(err.field(&policy).unwrap(), "agents[0].egress[0].to[0]");
    }

    #[test]
    fn limits() {
        let policy = parse(
            "p.toml",
            &format!(
                "{}{}",
                agent(
                    5,
                    "prefixes = [\"10.0.0.1\", \"10.0.0.2\", \"fd00::/64\", \"fd01::/64\"]\n\
                     [[agents.egress]]\naction = \"allow\"\nto = [\"@rfc1918\", \"@ula\"]\n"
                ),
                "[[agents]]\nid = 2\nname = \"b\"\ninterfaces = [\"if3\"]\nprefixes = [\"10.9.0.0/16\"]\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"@link-local\"]\n"
            ),
        )
        .unwrap();
        // Exactly at every limit compiles: 2 interfaces, 2 v4 hosts, 2 v6 prefixes, 4 v4
        // and 2 v6 destinations.
        let fits = Limits {
            max_agents: 5,
            max_interfaces: 2,
            max_source_prefixes: 2,
            max_destination_prefixes: 4,
            ..Limits::default()
        };
        assert!(compile(&policy, &fits, &ifindex).is_ok());

        let fail = |limits: Limits| compile(&policy, &limits, &ifindex).unwrap_err();
        // Each error names the field it is about, as the validator's issues do.
        let field = |e: &CompileError| e.field(&policy).unwrap();
        let err = fail(Limits {
            max_agents: 4,
            ..fits
        });
        assert_eq!(
            err,
            CompileError::AgentIdTooLarge {
                agent: "a5".into(),
                id: 5,
                max_agents: 4
            }
        );
        assert_eq!(field(&err), "agents[0].id");
        let err = fail(Limits {
            max_interfaces: 1,
            ..fits
        });
        assert_eq!(
            err.to_string(),
            "policy needs 2 interface entries, but the maps hold 1 (max_interfaces)"
        );
        assert_eq!(
            field(&err),
            "agents[1].interfaces",
            "b's interface is the second"
        );
        let err = fail(Limits {
            max_source_prefixes: 1,
            ..fits
        });
        assert_eq!(
            err,
            CompileError::LimitExceeded {
                limit: LimitKind::SourceHostsV4,
                needed: 2,
                max: 1,
                agent: "a5".into(),
                field: "prefixes[1]".into(),
            }
        );
        assert_eq!(field(&err), "agents[0].prefixes[1]");
        let err = fail(Limits {
            max_destination_prefixes: 3,
            ..fits
        });
        assert_eq!(
            err.to_string(),
            "policy needs 4 IPv4 destination entries, but the maps hold 3 \
             (max_destination_prefixes)"
        );
        assert_eq!(
            field(&err),
            "agents[1].egress",
            "a5 fills the 3, b adds the 4th"
        );
        // v6 source prefixes and destinations are counted apart from v4.
        let v6_policy = parse("p.toml", &agent(1, "prefixes = [\"fd00::/64\", \"fd01::/64\"]\n[[agents.egress]]\naction = \"allow\"\nto = [\"@private\"]\n")).unwrap();
        let err = compile(
            &v6_policy,
            &Limits {
                max_source_prefixes: 1,
                ..Limits::default()
            },
            &ifindex,
        )
        .unwrap_err();
        assert_eq!(
            err,
            CompileError::LimitExceeded {
                limit: LimitKind::SourcePrefixesV6,
                needed: 2,
                max: 1,
                agent: "a1".into(),
                field: "prefixes[1]".into(),
            }
        );
        let err = compile(
            &v6_policy,
            &Limits {
                max_destination_prefixes: 5,
                ..Limits::default()
            },
            &ifindex,
        );
        assert!(err.is_ok(), "5 v4 and 2 v6 destinations fit 5 per family");
    }

    #[test]
    fn deterministic() {
        let a = agent(
            1,
            "prefixes = [\"10.0.0.0/24\", \"fd00::1\"]\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"@private\", \"1.1.1.1\"]\nproto = \"udp\"\nports = 53\n\
             [[agents.egress]]\naction = \"deny\"\nto = [\"@metadata\", \"10.0.0.0/8\"]\n",
        );
        let b = agent(
            2,
            "prefixes = [\"10.0.1.0/24\"]\nmode = \"monitor\"\n\
             [[agents.egress]]\naction = \"allow\"\nto = [\"@any\"]\nproto = \"tcp\"\nports = \"1-1024\"\n",
        );
        let first = ok(&format!("{a}{b}"));
        assert_eq!(first, ok(&format!("{a}{b}")));
        // Agent order in the document does not matter either.
        assert_eq!(first, ok(&format!("{b}{a}")));
    }

    #[test]
    fn many_prefix_lengths_fall_back_to_the_lpm_trie() {
        // Nine IPv4 lengths (/16../24): one more than the kernel probes.
        let to: Vec<String> = (16..=24).map(|len| format!("\"10.0.0.0/{len}\"")).collect();
        let few: Vec<String> = (16..=23).map(|len| format!("\"10.0.0.0/{len}\"")).collect();
        let text = |to: &[String]| {
            format!(
                "[[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.1.0.2\"]\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [{}, \"fd00::/8\"]\n",
                to.join(", ")
            )
        };
        let many = ok(&text(&to)).agents[0].1;
        assert_eq!(many.flags & AGENT_DST_LPM_V4, AGENT_DST_LPM_V4);
        assert_eq!(many.flags & AGENT_DST_LPM_V6, 0);
        assert_eq!((many.dst_lens_v6_count, many.dst_lens_v6[0]), (1, 8));
        let eight = ok(&text(&few)).agents[0].1;
        assert_eq!(eight.flags & AGENT_DST_LPM_V4, 0);
        assert_eq!(eight.dst_lens_v4_count, 8);
        assert_eq!(
            eight.dst_lens_v4,
            [23, 22, 21, 20, 19, 18, 17, 16],
            "longest first"
        );
    }

    #[test]
    fn coarse_clock_only_when_every_burst_spans_ticks() {
        let flags = |rate: &str| {
            ok(&format!(
                "[[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.1.0.2\"]\nrate = {{ {rate} }}\n"
            ))
            .agents[0]
                .1
                .flags
        };
        // 100 packets at 1000/s = 100 ms: coarse. 10 at 1000/s = 10 ms: precise.
        assert_ne!(
            flags("packets_per_sec = 1000, packets_burst = 100") & AGENT_COARSE_CLOCK,
            0
        );
        assert_eq!(
            flags("packets_per_sec = 1000, packets_burst = 10") & AGENT_COARSE_CLOCK,
            0
        );
        // Both limits must qualify: 2000 bytes at 100 kB/s is 20 ms.
        assert_eq!(
            flags(
                "packets_per_sec = 1000, packets_burst = 100, bytes_per_sec = 100000, bytes_burst = 2000"
            ) & AGENT_COARSE_CLOCK,
            0
        );
        assert_ne!(
            flags("bytes_per_sec = 100000, bytes_burst = 9000") & AGENT_COARSE_CLOCK,
            0,
            "90 ms of bytes"
        );
    }

    /// A GCRA limiter as the program runs it (`limits.rs`): whether an event at `now` passes.
    fn gcra(tat: &mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
        let new = (*tat).max(now) + cost;
        if new - now > tolerance && !(*tat <= now && cost > tolerance) {
            return false;
        }
        *tat = new;
        true
    }

    #[test]
    fn guard_math() {
        assert_eq!(TIME_SHIFT, 4, "the expectations below assume 1/16 ns units");
        let c = ok(&agent(
            1,
            "connections = { per_sec = 10, burst = 20 }\n\
             quota = { bytes_per_hour = 1_000_000, connections_per_day = 7 }\n\
             breaker = { drops = 50, within_secs = 10, cooldown_secs = 30, action = \"reject\" }\n",
        ));
        assert_eq!(c.agents[0].1.flags & AGENT_GUARDED, AGENT_GUARDED);
        assert_eq!(
            c.guards,
            vec![(
                1,
                GuardPolicy {
                    flags: GUARD_BREAKER | GUARD_BREAKER_REJECT | GUARD_QUOTA,
                    _pad: 0,
                    conn_cost: UNITS_PER_SEC / 10,
                    conn_tolerance: 20 * (UNITS_PER_SEC / 10),
                    // 10 s over 50 drops: 0.2 s a strike, the whole window of tolerance.
                    strike_cost: 3_200_000_000,
                    strike_tolerance: 160_000_000_000,
                    cooldown: 30 * UNITS_PER_SEC,
                    max_cooldown: 600 * UNITS_PER_SEC,
                    probe_cost: UNITS_PER_SEC,
                    probe_tolerance: UNITS_PER_SEC,
                    calm: 30 * UNITS_PER_SEC,
                    quota: [1_000_000, 0, 0, 7],
                }
            )]
        );
        // Connection burst default: a tenth of the rate.
        let g = ok(&agent(1, "connections = { per_sec = 1000 }\n")).guards[0].1;
        assert_eq!(
            (g.conn_cost, g.conn_tolerance),
            (16_000_000, 100 * 16_000_000)
        );
        assert_eq!(g.flags, 0, "no breaker, no quota");
        let g = ok(&agent(
            1,
            "breaker = { drops = 1, within_secs = 1, cooldown_secs = 5, max_cooldown_secs = 40, \
             probe_per_sec = 4, probe_burst = 2, calm_secs = 3 }\n",
        ))
        .guards[0]
            .1;
        assert_eq!(g.flags, GUARD_BREAKER);
        assert_eq!(
            (g.strike_cost, g.strike_tolerance),
            (UNITS_PER_SEC, UNITS_PER_SEC)
        );
        assert_eq!(
            (g.cooldown, g.max_cooldown, g.calm),
            (5 * UNITS_PER_SEC, 40 * UNITS_PER_SEC, 3 * UNITS_PER_SEC)
        );
        assert_eq!(
            (g.probe_cost, g.probe_tolerance),
            (UNITS_PER_SEC / 4, UNITS_PER_SEC / 2)
        );
    }

    #[test]
    fn the_breaker_opens_at_the_drop_after_drops() {
        // Windows that divide evenly and ones that do not, drops up to the maximum: `drops`
        // strikes at one instant pass the strike limiter, the next one opens the breaker.
        for (drops, within) in [
            (1, 1),
            (3, 1),
            (7, 10),
            (50, 10),
            (999_999, 1),
            (1_000_000, 1),
            (123_457, 86_400),
        ] {
            let g = ok(&agent(
                1,
                &format!("breaker = {{ drops = {drops}, within_secs = {within} }}\n"),
            ))
            .guards[0]
                .1;
            let now = 1 << 40;
            let mut tat = 0;
            for k in 0..drops {
                assert!(
                    gcra(&mut tat, now, g.strike_cost, g.strike_tolerance),
                    "{drops} in {within} s: strike {k} refused"
                );
            }
            assert!(
                !gcra(&mut tat, now, g.strike_cost, g.strike_tolerance),
                "{drops} in {within} s: strike {drops} passed"
            );
            // Spread evenly over the window, the strikes never open it.
            let mut tat = 0;
            for k in 0..drops.min(1000) {
                let at = now + k * g.strike_cost;
                assert!(gcra(&mut tat, at, g.strike_cost, g.strike_tolerance));
            }
        }
    }

    #[test]
    fn rules_carry_their_group_and_always_bits() {
        let text = "[[shared]]\nname = \"one\"\nconnections = { per_sec = 5 }\n\
                    [[shared]]\nname = \"two\"\n\
                    rate = { packets_per_sec = 1000, bytes_per_sec = 1_000_000 }\n"
            .to_owned()
            + &agent(
                1,
                "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.53\"]\nproto = \"udp\"\nports = 53\nalways = true\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"10.1.0.0/16\"]\nproto = \"tcp\"\nports = 443\nshared = \"two\"\nalways = true\n\
                 [[agents.egress]]\naction = \"allow\"\nto = [\"10.1.0.0/16\"]\nproto = \"tcp\"\nports = 80\nshared = \"one\"\n\
                 [[agents.egress]]\naction = \"deny\"\nto = [\"10.1.2.0/24\"]\n",
            );
        let c = ok(&text);
        assert_eq!(
            c.shared,
            vec![
                (
                    1,
                    SharedPolicy {
                        conn_cost: UNITS_PER_SEC / 5,
                        conn_tolerance: UNITS_PER_SEC / 5,
                        ..SharedPolicy::default()
                    }
                ),
                (
                    2,
                    SharedPolicy {
                        packet_cost: 16_000_000,
                        packet_tolerance: 100 * 16_000_000,
                        byte_rate: 1_000_000,
                        byte_tolerance: UNITS_PER_SEC / 10,
                        conn_cost: 0,
                        conn_tolerance: 0,
                    }
                ),
            ]
        );
        // Guarded only through its rules: an entry of zeros.
        assert_eq!(c.agents[0].1.flags & AGENT_GUARDED, AGENT_GUARDED);
        assert_eq!(c.guards, vec![(1, GuardPolicy::default())]);
        let guarded = |ports, guard| PortRule {
            guard,
            ..allow(IPPROTO_TCP, ports)
        };
        let https = guarded((443, 443), 2 | RULE_ALWAYS);
        let http = guarded((80, 80), 1);
        let dns = PortRule {
            guard: RULE_ALWAYS,
            ..allow(IPPROTO_UDP, (53, 53))
        };
        assert_eq!(
            c.destinations_v4,
            vec![
                (1, v4("10.0.0.53/32"), set(&[dns])),
                (1, v4("10.1.0.0/16"), set(&[https, http])),
                // The deny of every port decides everything: the covering rules are dead.
                (1, v4("10.1.2.0/24"), set(&[deny(PROTO_ANY, ALL)])),
            ]
        );
        // No guards anywhere: no entry, no flag, no bits.
        let plain = ok(&agent(
            1,
            "[[agents.egress]]\naction = \"allow\"\nto = [\"10.0.0.0/8\"]\n",
        ));
        assert!(plain.guards.is_empty() && plain.shared.is_empty());
        assert_eq!(plain.agents[0].1.flags & AGENT_GUARDED, 0);
        assert_eq!(plain.destinations_v4[0].2.rules[0].guard, 0);
    }

    #[test]
    fn guards_out_of_range_name_their_field() {
        let text = agent(1, "connections = { per_sec = 1, burst = 9_000_000_000 }\n");
        let policy = parse("p.toml", &text).unwrap();
        let err = compile(&policy, &Limits::default(), &ifindex).unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent \"a1\": connections.burst = 9000000000 cannot be expressed in the rate \
             limiter's 64-bit time units (the burst would span more than 36 years)"
        );
        assert_eq!(err.field(&policy).unwrap(), "agents[0].connections.burst");
        let text = agent(1, "breaker = { drops = 1, probe_burst = 9_000_000_000 }\n");
        let policy = parse("p.toml", &text).unwrap();
        let err = compile(&policy, &Limits::default(), &ifindex).unwrap_err();
        assert_eq!(err.field(&policy).unwrap(), "agents[0].breaker.probe_burst");
        let text = "[[shared]]\nname = \"g\"\n\
                    rate = { packets_per_sec = 1, packets_burst = 9_000_000_000 }\n";
        let policy = parse("p.toml", text).unwrap();
        let err = compile(&policy, &Limits::default(), &ifindex).unwrap_err();
        assert_eq!(
            err,
            CompileError::SharedOutOfRange {
                group: "g".into(),
                field: "rate.packets_burst".into(),
                value: 9_000_000_000,
            }
        );
        assert_eq!(err.field(&policy).unwrap(), "shared[0].rate.packets_burst");
    }
}
