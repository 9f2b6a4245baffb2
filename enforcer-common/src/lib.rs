//! Types shared by the XDP program (`enforcer-ebpf`) and the daemon (`enforcer`).
//!
//! Every map key and value is defined here once, `#[repr(C)]` with explicit padding and a
//! size assertion beside it, so the kernel side and user space cannot drift apart.
//!
//! # Policy slots
//! Policy maps hold two complete policies, *slot 0* and *slot 1*; the slot number is part of
//! every key. The XDP program reads the active slot once per packet from [`State`] and uses
//! it for every lookup, so a packet sees exactly one policy. The daemon writes a new policy
//! into the inactive slot, then flips [`State::active_slot`] (see `ARCHITECTURE.md`).
#![no_std]

use core::mem::size_of;

pub mod guard;

/// Number of policy slots (double buffering).
pub const SLOTS: u32 = 2;

/// Agent index used for traffic that no agent matched. Real agents have ids `1..`.
pub const UNKNOWN_AGENT: u32 = 0;

/// Largest agent id the key layout can carry (the slot takes the top bit of an owner word).
pub const MAX_AGENT_ID: u32 = (1 << 24) - 1;

/// Egress rules one destination prefix can carry after the compile step merged in the rules
/// of every covering prefix. Bounded so the kernel loop over them has a fixed trip count.
pub const MAX_RULES_PER_PREFIX: usize = 16;

/// Fixed-point scale of rate-limiter time: one unit is 1/16 ns. A u64 of such units spans
/// 36 years of `bpf_ktime_get_ns`, and per-byte costs at 1 GB/s are still 16 units, so
/// integer rounding stays far below the 1% level.
pub const TIME_SHIFT: u32 = 4;

/// One second in rate-limiter time units.
pub const UNITS_PER_SEC: u64 = 1_000_000_000 << TIME_SHIFT;

/// IPv6 extension headers the parser walks before it calls the chain undecidable.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;

/// VLAN tags (802.1Q or 802.1ad) the parser strips before it calls the frame undecidable.
pub const MAX_VLAN_TAGS: usize = 2;

/// Why the XDP program passed or dropped a packet. The numbers are stable: they index the
/// counters map and appear in metrics and audit records.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Passed: a known agent, within its rate, to an allowed destination.
    Allowed = 0,
    /// Passed: no agent matched and the default for unknown traffic is pass.
    UnknownPass = 1,
    /// Dropped: no agent matched and the default for unknown traffic is drop.
    UnknownDrop = 2,
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
    NonIp = 3,
    /// Dropped: over the agent's packets-per-second limit.
    RateLimitedPackets = 4,
    /// Dropped: over the agent's bytes-per-second limit.
    RateLimitedBytes = 5,
    /// Dropped: destination, protocol or port not allowed for the agent.
    EgressDenied = 6,
    /// Dropped: a non-first IP fragment (no ports) whose verdict depends on ports.
    Fragment = 7,
    /// Dropped: truncated headers, too many VLAN tags or an IPv6 extension chain longer than
    /// the parser walks, from an agent with egress restrictions.
    Malformed = 8,
    /// Passed in monitor mode; enforce mode would have dropped it as `RateLimitedPackets`.
    MonitorRateLimitedPackets = 9,
    /// Passed in monitor mode; enforce mode would have dropped it as `RateLimitedBytes`.
    MonitorRateLimitedBytes = 10,
    /// Passed in monitor mode; enforce mode would have dropped it as `EgressDenied`.
    MonitorEgressDenied = 11,
    /// Passed in monitor mode; enforce mode would have dropped it as `Fragment`.
    MonitorFragment = 12,
    /// Passed in monitor mode; enforce mode would have dropped it as `Malformed`.
    MonitorMalformed = 13,
    /// Passed: link-local control traffic that cannot leave the link, like ARP for IPv4:
    /// IPv6 neighbour discovery (hop limit 255), MLD and IGMP (hop limit / TTL 1).
    LinkControl = 14,
    /// Dropped: DNS (UDP/TCP 53) or DNS over TLS (TCP 853) from an agent with host-name
    /// rules to anywhere but the enforcer's resolver.
    DnsBypass = 15,
    /// Dropped: the first data segment of a TLS-port connection to a name-admitted address
    /// named a server the agent may not reach (SNI).
    SniDenied = 16,
    /// Dropped: the first data segment of a TLS-port connection to a name-admitted address
    /// was not a readable ClientHello with a server name (not TLS, cut short, no SNI, an
    /// encrypted ClientHello).
    SniInvalid = 17,
    /// Passed in monitor mode; enforce mode would have dropped it as `DnsBypass`.
    MonitorDnsBypass = 18,
    /// Passed in monitor mode; enforce mode would have dropped it as `SniDenied`.
    MonitorSniDenied = 19,
    /// Passed in monitor mode; enforce mode would have dropped it as `SniInvalid`.
    MonitorSniInvalid = 20,
    /// Dropped: UDP to one of the TLS ports of a name-admitted address (QUIC, HTTP/3),
    /// whose server name the program cannot read; clients fall back to TCP, where it is
    /// checked (`SniDenied`, `SniInvalid`).
    QuicRefused = 21,
    /// Passed in monitor mode; enforce mode would have dropped it as `QuicRefused`.
    MonitorQuicRefused = 22,
    /// Dropped: a new connection (TCP SYN without ACK) over the agent's connection rate.
    ConnRateLimited = 23,
    /// Dropped: one of the agent's quotas (bytes or connections per hour or day) is used up.
    QuotaExhausted = 24,
    /// Dropped: over the shared limit of the destination group the matching rule names.
    SharedLimited = 25,
    /// Dropped: the agent's circuit breaker is open, or half-open and past its probe rate.
    BreakerOpen = 26,
    /// Passed in monitor mode; enforce mode would have dropped it as `ConnRateLimited`.
    MonitorConnRateLimited = 27,
    /// Passed in monitor mode; enforce mode would have dropped it as `QuotaExhausted`.
    MonitorQuotaExhausted = 28,
    /// Passed in monitor mode; enforce mode would have dropped it as `SharedLimited`.
    MonitorSharedLimited = 29,
    /// Passed in monitor mode; enforce mode would have dropped it as `BreakerOpen`.
    MonitorBreakerOpen = 30,
}

impl Reason {
    /// Number of reasons; the counters map has this many slots per agent.
    pub const COUNT: u32 = 31;

    /// All reasons, in numeric order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Allowed,
        Reason::UnknownPass,
        Reason::UnknownDrop,
        Reason::NonIp,
        Reason::RateLimitedPackets,
        Reason::RateLimitedBytes,
        Reason::EgressDenied,
        Reason::Fragment,
        Reason::Malformed,
        Reason::MonitorRateLimitedPackets,
        Reason::MonitorRateLimitedBytes,
        Reason::MonitorEgressDenied,
        Reason::MonitorFragment,
        Reason::MonitorMalformed,
        Reason::LinkControl,
        Reason::DnsBypass,
        Reason::SniDenied,
        Reason::SniInvalid,
        Reason::MonitorDnsBypass,
        Reason::MonitorSniDenied,
        Reason::MonitorSniInvalid,
        Reason::QuicRefused,
        Reason::MonitorQuicRefused,
        Reason::ConnRateLimited,
        Reason::QuotaExhausted,
        Reason::SharedLimited,
        Reason::BreakerOpen,
        Reason::MonitorConnRateLimited,
        Reason::MonitorQuotaExhausted,
        Reason::MonitorSharedLimited,
        Reason::MonitorBreakerOpen,
    ];

    /// Whether the packet was dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::UnknownDrop
                | Reason::RateLimitedPackets
                | Reason::RateLimitedBytes
                | Reason::EgressDenied
                | Reason::Fragment
                | Reason::Malformed
                | Reason::DnsBypass
                | Reason::SniDenied
                | Reason::SniInvalid
                | Reason::QuicRefused
                | Reason::ConnRateLimited
                | Reason::QuotaExhausted
                | Reason::SharedLimited
                | Reason::BreakerOpen
        )
    }

    /// Whether the packet is a monitor-mode would-drop (passed, but enforce mode would have
    /// dropped it).
    pub const fn is_monitored(self) -> bool {
        matches!(
            self,
            Reason::MonitorRateLimitedPackets
                | Reason::MonitorRateLimitedBytes
                | Reason::MonitorEgressDenied
                | Reason::MonitorFragment
                | Reason::MonitorMalformed
                | Reason::MonitorDnsBypass
                | Reason::MonitorSniDenied
                | Reason::MonitorSniInvalid
                | Reason::MonitorQuicRefused
                | Reason::MonitorConnRateLimited
                | Reason::MonitorQuotaExhausted
                | Reason::MonitorSharedLimited
                | Reason::MonitorBreakerOpen
        )
    }

    /// Whether the packet is reported to the audit trail: every drop and every monitor-mode
    /// would-drop. Passed packets never are.
    pub const fn is_audited(self) -> bool {
        self.is_drop() || self.is_monitored()
    }

    /// The reason a monitor-mode agent's packet is counted under instead of this drop.
    pub const fn monitored(self) -> Reason {
        match self {
            Reason::RateLimitedPackets => Reason::MonitorRateLimitedPackets,
            Reason::RateLimitedBytes => Reason::MonitorRateLimitedBytes,
            Reason::EgressDenied => Reason::MonitorEgressDenied,
            Reason::Fragment => Reason::MonitorFragment,
            Reason::Malformed => Reason::MonitorMalformed,
            Reason::DnsBypass => Reason::MonitorDnsBypass,
            Reason::SniDenied => Reason::MonitorSniDenied,
            Reason::SniInvalid => Reason::MonitorSniInvalid,
            Reason::QuicRefused => Reason::MonitorQuicRefused,
            Reason::ConnRateLimited => Reason::MonitorConnRateLimited,
            Reason::QuotaExhausted => Reason::MonitorQuotaExhausted,
            Reason::SharedLimited => Reason::MonitorSharedLimited,
            Reason::BreakerOpen => Reason::MonitorBreakerOpen,
            other => other,
        }
    }

    /// Stable snake_case name, used in metrics labels and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::UnknownPass => "unknown_pass",
            Reason::UnknownDrop => "unknown_drop",
            Reason::NonIp => "non_ip",
            Reason::RateLimitedPackets => "rate_limited_packets",
            Reason::RateLimitedBytes => "rate_limited_bytes",
            Reason::EgressDenied => "egress_denied",
            Reason::Fragment => "fragment",
            Reason::Malformed => "malformed",
            Reason::MonitorRateLimitedPackets => "monitor_rate_limited_packets",
            Reason::MonitorRateLimitedBytes => "monitor_rate_limited_bytes",
            Reason::MonitorEgressDenied => "monitor_egress_denied",
            Reason::MonitorFragment => "monitor_fragment",
            Reason::MonitorMalformed => "monitor_malformed",
            Reason::LinkControl => "link_control",
            Reason::DnsBypass => "dns_bypass",
            Reason::SniDenied => "sni_denied",
            Reason::SniInvalid => "sni_invalid",
            Reason::MonitorDnsBypass => "monitor_dns_bypass",
            Reason::MonitorSniDenied => "monitor_sni_denied",
            Reason::MonitorSniInvalid => "monitor_sni_invalid",
            Reason::QuicRefused => "quic_refused",
            Reason::MonitorQuicRefused => "monitor_quic_refused",
            Reason::ConnRateLimited => "conn_rate_limited",
            Reason::QuotaExhausted => "quota_exhausted",
            Reason::SharedLimited => "shared_limited",
            Reason::BreakerOpen => "breaker_open",
            Reason::MonitorConnRateLimited => "monitor_conn_rate_limited",
            Reason::MonitorQuotaExhausted => "monitor_quota_exhausted",
            Reason::MonitorSharedLimited => "monitor_shared_limited",
            Reason::MonitorBreakerOpen => "monitor_breaker_open",
        }
    }

    /// The reason with number `n`, if there is one.
    pub const fn from_u32(n: u32) -> Option<Reason> {
        if n < Self::COUNT {
            Some(Self::ALL[n as usize])
        } else {
            None
        }
    }
}

/// Global enforcement state: map `STATE`, one element.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// The policy slot packets use (0 or 1).
    pub active_slot: u32,
    /// Entries per slot in `AGENTS` (`max_agents + 1`, index 0 being the unknown agent).
    pub agent_stride: u32,
    /// Generation of the active policy, increased by one at every apply.
    pub generation: u64,
}
const _: () = assert!(size_of::<State>() == 16);

/// [`SlotConfig::flags`]: traffic from no known agent is dropped (else passed).
pub const SLOT_UNKNOWN_DROP: u32 = 1 << 0;
/// [`SlotConfig::flags`]: the slot holds source prefixes that are not host routes, so the
/// source LPM tries must be consulted after the exact-address maps miss.
pub const SLOT_SRC_LPM_V4: u32 = 1 << 1;
/// Same as [`SLOT_SRC_LPM_V4`] for IPv6.
pub const SLOT_SRC_LPM_V6: u32 = 1 << 2;
/// [`SlotConfig::flags`]: the slot maps at least one interface to an agent.
pub const SLOT_HAS_IFACES: u32 = 1 << 3;

/// Per-slot settings: map `SLOTS`, indexed by slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// `SLOT_*` flags.
    pub flags: u32,
    /// Explicit padding.
    pub _pad: u32,
}
const _: () = assert!(size_of::<SlotConfig>() == 8);

/// [`AgentPolicy::flags`]: the entry is in use.
pub const AGENT_ACTIVE: u32 = 1 << 0;
/// [`AgentPolicy::flags`]: monitor mode: would-drops are counted and the packet passes.
pub const AGENT_MONITOR: u32 = 1 << 1;
/// [`AgentPolicy::flags`]: some destination may be denied, so the destination maps must be
/// consulted and undecidable packets (malformed, port-less fragments) are denied.
pub const AGENT_RESTRICTED: u32 = 1 << 2;
/// [`AgentPolicy::flags`]: a destination that matches no rule is allowed (else denied).
pub const AGENT_DEFAULT_ALLOW: u32 = 1 << 3;
/// [`AgentPolicy::flags`]: the agent's IPv4 destinations use more than
/// [`MAX_DST_PROBES`] prefix lengths, so they live in the LPM trie `DST_V4` instead of the
/// per-length hash `DST_HASH_V4`.
pub const AGENT_DST_LPM_V4: u32 = 1 << 4;
/// Same as [`AGENT_DST_LPM_V4`] for IPv6.
pub const AGENT_DST_LPM_V6: u32 = 1 << 5;
/// [`AgentPolicy::flags`]: every burst of the agent spans at least [`COARSE_CLOCK_MIN_NS`],
/// so the rate limiter may read the cheaper jiffy-resolution clock without admitting less
/// than the rate (a tick's worth of tokens always fits in the burst).
pub const AGENT_COARSE_CLOCK: u32 = 1 << 6;
/// [`AgentPolicy::flags`]: the agent has host-name rules: its DNS may only go to the
/// enforcer's resolver (`RESOLVERS`), destinations no static rule matches are looked up in
/// the addresses its resolver learned (`NAMES_V4/V6`), and TLS-port connections to those
/// must name an allowed server (`SNI`).
pub const AGENT_NAMES: u32 = 1 << 7;
/// [`AgentPolicy::flags`]: the agent has guards (connection rate, quotas, breaker) in
/// `GUARD_POLICY`, or a rule of it names a shared destination limit.
pub const AGENT_GUARDED: u32 = 1 << 8;

/// Destination prefix lengths per family that the XDP program probes in the hash maps,
/// longest first; an agent with more distinct lengths falls back to the LPM trie.
pub const MAX_DST_PROBES: usize = 8;

/// The smallest burst duration (burst / rate) for which the coarse clock is exact enough:
/// four ticks of the slowest kernel clock (HZ=100, 10 ms).
pub const COARSE_CLOCK_MIN_NS: u64 = 40_000_000;

/// An agent's policy: map `AGENTS`, indexed by `slot * agent_stride + agent id`.
///
/// Rate limits are GCRA parameters in time units of `1 >> TIME_SHIFT` ns: a packet costs
/// `packet_cost`, a byte costs `UNITS_PER_SEC / byte_rate`, and a packet is admitted while
/// the theoretical arrival time stays within `*_tolerance` of now.
///
/// Destination lookups: unless `AGENT_DST_LPM_*` is set, the program masks the destination
/// with each of the `dst_lens_*` prefix lengths (longest first) and looks the result up in
/// `DST_HASH_*`; the first hit is the longest matching prefix, as an LPM lookup would find.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentPolicy {
    /// `AGENT_*` flags.
    pub flags: u32,
    /// Prefix lengths in use in `dst_lens_v4`.
    pub dst_lens_v4_count: u8,
    /// Prefix lengths in use in `dst_lens_v6`.
    pub dst_lens_v6_count: u8,
    /// Explicit padding.
    pub _pad: u16,
    /// Cost of one packet in time units; 0 means no packets-per-second limit.
    pub packet_cost: u64,
    /// Packet burst in time units (`burst * packet_cost`).
    pub packet_tolerance: u64,
    /// Bytes per second; 0 means no bytes-per-second limit.
    pub byte_rate: u64,
    /// Byte burst in time units (`burst_bytes * UNITS_PER_SEC / byte_rate`).
    pub byte_tolerance: u64,
    /// Distinct IPv4 destination prefix lengths, longest first.
    pub dst_lens_v4: [u8; MAX_DST_PROBES],
    /// Distinct IPv6 destination prefix lengths, longest first.
    pub dst_lens_v6: [u8; MAX_DST_PROBES],
}
const _: () = assert!(size_of::<AgentPolicy>() == 56);

/// Rate-limiter state of one agent: map `BUCKETS`, indexed by agent id. Not per slot: an
/// agent keeps its bucket across policy changes.
///
/// Each field is a GCRA theoretical arrival time in time units, updated by the XDP program
/// with a 64-bit compare-and-swap, so the limit holds for the agent as a whole on any
/// number of CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Theoretical arrival time of the packets limiter.
    pub packet_tat: u64,
    /// Theoretical arrival time of the bytes limiter.
    pub byte_tat: u64,
}
const _: () = assert!(size_of::<Bucket>() == 16);

/// A packets-and-bytes counter: one reason's in an agent's [`AgentCounters`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (whole frames, as XDP sees them).
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// Everything counted for one agent: a [`Counter`] per reason (index = reason number) and
/// its audit events that did not reach the ring. The value of map `COUNTERS` (per CPU),
/// indexed by agent id; user space sums the CPUs.
///
/// One entry per agent rather than one per (agent, reason), and the audit stats in the same
/// entry rather than a map of their own: reading every agent's statistics is one walk of
/// 100,000 entries at 100,000 agents. With a key per reason and a second map, the kernel's
/// batch lookups cost most of a second of CPU per `/metrics` scrape.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Indexed by [`Reason`] number.
    pub by_reason: [Counter; Reason::COUNT as usize],
    /// Audit events suppressed or lost.
    pub audit: AuditStats,
}
const _: () = assert!(size_of::<AgentCounters>() == 16 * Reason::COUNT as usize + 16);

impl AgentCounters {
    /// Adds `other` into `self`, reason by reason: one CPU's values into a sum, or one
    /// agent's into a total (user space).
    pub fn add(&mut self, other: &AgentCounters) {
        for (total, c) in self.by_reason.iter_mut().zip(&other.by_reason) {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
        self.audit.suppressed += other.audit.suppressed;
        self.audit.lost += other.audit.lost;
    }
}

/// [`AuditEvent::family`]: the frame's IP header could not be read; addresses, protocol and
/// ports are zero.
pub const AUDIT_FAMILY_NONE: u8 = 0;
/// [`AuditEvent::family`]: IPv4.
pub const AUDIT_FAMILY_V4: u8 = 4;
/// [`AuditEvent::family`]: IPv6.
pub const AUDIT_FAMILY_V6: u8 = 6;

/// One denial (or monitor-mode would-denial) reported by the XDP program: a record of the
/// ring buffer `AUDIT`. Written only on the drop path, after the per-agent audit limiter
/// admitted it (see [`AuditConfig`]).
///
/// Addresses are in network byte order. An IPv4 address fills the first 4 bytes and the
/// other 12 are zero (not the IPv4-mapped form): [`AuditEvent::family`] says which, and the
/// kernel side copies 4 bytes instead of building a mapped address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the event was built.
    pub time_ns: u64,
    /// [`State::generation`] the program saw while building the event. A packet in flight
    /// across a policy flip (microseconds) may carry the next generation.
    pub generation: u64,
    /// Agent id ([`UNKNOWN_AGENT`] for unknown traffic under `unknown = "drop"`).
    pub agent: u32,
    /// [`Reason`] number: a drop, or a monitor-mode would-drop.
    pub reason: u32,
    /// Interface the frame arrived on (`ingress_ifindex`).
    pub ifindex: u32,
    /// Frame length in bytes, as XDP sees it.
    pub len: u32,
    /// Source address; see the type's docs for IPv4.
    pub src: [u8; 16],
    /// Destination address; see the type's docs for IPv4.
    pub dst: [u8; 16],
    /// Source port, host byte order; 0 when the protocol has none or it was not read
    /// (non-first fragment, cut header).
    pub src_port: u16,
    /// Destination port, host byte order; 0 as for `src_port`.
    pub dst_port: u16,
    /// `AUDIT_FAMILY_*`.
    pub family: u8,
    /// IP protocol number (the upper-layer protocol for IPv6, after extension headers).
    pub proto: u8,
    /// What the record reports: `guard::EVENT_*`. A packet (0, what every record was before
    /// guards existed) or a guard's transition, which carries the agent, the reason that
    /// caused it and the time, and no tuple.
    pub kind: u8,
    /// The transition's detail: the `QUOTA_*` index of an exhausted quota, the breaker's
    /// cooldown level; 0 for packets.
    pub detail: u8,
}
const _: () = assert!(size_of::<AuditEvent>() == 72);

/// Settings of the audit limiter: map `AUDIT_CONFIG`, one element, written by the daemon.
///
/// Every agent (and the unknown agent) has its own GCRA limiter in `AUDIT_LIMITS`, with
/// these shared parameters in the rate limiter's time units (`1 >> TIME_SHIFT` ns): an
/// event costs `event_cost` and is admitted while the agent's theoretical arrival time stays
/// within `event_tolerance` of now. Events over the limit are counted as
/// [`AuditStats::suppressed`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditConfig {
    /// Cost of one event (`UNITS_PER_SEC / events_per_sec`). 0 turns events off: every
    /// audited packet is counted as suppressed, so an unconfigured map is never silent.
    pub event_cost: u64,
    /// Burst in time units (`burst * event_cost`).
    pub event_tolerance: u64,
}
const _: () = assert!(size_of::<AuditConfig>() == 16);

/// The tick clock the rate and audit limiters read when a tick's resolution is enough:
/// map `CLOCK`, one element, written by the daemon at every load.
///
/// `now = jiffies * tick_units - offset` is CLOCK_MONOTONIC in limiter time units (1 <<
/// [`TIME_SHIFT`] per ns), lagging by up to a tick like the kernel's coarse clock, so
/// buckets charged on either clock stay comparable. `jiffies` is one load for the program
/// (the verifier inlines `bpf_jiffies64`), where `bpf_ktime_get_coarse_ns` is a helper call
/// that measured about 14 ns per packet. All zero until measured: the program then reads
/// the coarse clock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// Time units per jiffy: the kernel's `TICK_NSEC << TIME_SHIFT`.
    pub tick_units: u64,
    /// `jiffies * tick_units - (CLOCK_MONOTONIC ns << TIME_SHIFT)` at the same instant
    /// (wrapping).
    pub offset: u64,
}
const _: () = assert!(size_of::<Clock>() == 16);

/// What happened to an agent's audit events that did not reach the ring: part of its
/// [`AgentCounters`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Events the per-agent audit limiter refused.
    pub suppressed: u64,
    /// Events admitted by the limiter that found the ring buffer full (reserve failed).
    pub lost: u64,
}
const _: () = assert!(size_of::<AuditStats>() == 16);

/// Key of map `IFACES`: which agent owns an interface, in a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfaceKey {
    /// Policy slot.
    pub slot: u32,
    /// Interface index.
    pub ifindex: u32,
}
const _: () = assert!(size_of::<IfaceKey>() == 8);

/// Key of map `SRC_HOST_V4` (exact source address to agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostV4Key {
    /// Policy slot.
    pub slot: u32,
    /// Address in network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<HostV4Key>() == 8);

/// Key of map `SRC_HOST_V6` (exact source address to agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostV6Key {
    /// Policy slot.
    pub slot: u32,
    /// Address in network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<HostV6Key>() == 20);

/// Entries per bucket of the exact-match tables (`SRC_TABLE_*`, `DST_TABLE_*`).
pub const TABLE_WAYS: usize = 4;

/// One bucket of an exact-match table, the program's first probe before a hash map: exact
/// source address to agent id (`SRC_TABLE_V4/V6`, before `SRC_HOST_V4/V6`), or an agent's
/// destination prefix to its rules' index in `RULES` (`DST_TABLE_V4/V6`, before
/// `DST_HASH_V4/V6`).
///
/// A table is an array map holding both slots' tables interleaved (bucket `b` of slot `s`
/// at index `b << 1 | s`); [`table_bucket`] picks the one bucket a key can be in, and the
/// program compares its [`TABLE_WAYS`] keys. That is an inlined array lookup, a few
/// multiplies and compares, where a kernel hash lookup measured about 20 ns per packet
/// (jhash, the call, the bucket walk). A key that did not fit its bucket goes to the hash
/// map instead, and the bucket's `overflow` tells the program to look there on a miss, so
/// a table is exact at any load. `W` is the key's size in u64 words (see the `*_key_*`
/// functions).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBucket<const W: usize> {
    /// Keys; an entry is in use when its value is not 0.
    pub keys: [[u64; W]; TABLE_WAYS],
    /// Values (an agent id, or a `RULES` index), 0 for a free entry.
    pub values: [u32; TABLE_WAYS],
    /// Nonzero: a key of this bucket is in the overflow hash map.
    pub overflow: u32,
    /// Explicit padding.
    pub _pad: u32,
}

impl<const W: usize> Default for TableBucket<W> {
    fn default() -> Self {
        TableBucket {
            keys: [[0; W]; TABLE_WAYS],
            values: [0; TABLE_WAYS],
            overflow: 0,
            _pad: 0,
        }
    }
}

/// Bucket of `SRC_TABLE_V4` and `DST_TABLE_V4`.
pub type TableBucket1 = TableBucket<1>;
/// Bucket of `SRC_TABLE_V6`.
pub type TableBucket2 = TableBucket<2>;
/// Bucket of `DST_TABLE_V6`.
pub type TableBucket3 = TableBucket<3>;
const _: () = assert!(size_of::<TableBucket1>() == 56);
const _: () = assert!(size_of::<TableBucket2>() == 88);
const _: () = assert!(size_of::<TableBucket3>() == 120);

/// Where a slot's tables are: map `TABLES`, indexed by slot. A table with `1 << bits`
/// buckets; `bits` 0: the slot has no such table, and the program looks in the hash map
/// alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableConfig {
    /// Hash seeds of `SRC_TABLE_V4`, `SRC_TABLE_V6`, `DST_TABLE_V4`, `DST_TABLE_V6`.
    pub seeds: [u64; 4],
    /// Bucket-index bits of the same tables.
    pub bits: [u32; 4],
}
const _: () = assert!(size_of::<TableConfig>() == 48);

/// [`TableConfig`] index of `SRC_TABLE_V4`.
pub const TABLE_SRC_V4: usize = 0;
/// [`TableConfig`] index of `SRC_TABLE_V6`.
pub const TABLE_SRC_V6: usize = 1;
/// [`TableConfig`] index of `DST_TABLE_V4`.
pub const TABLE_DST_V4: usize = 2;
/// [`TableConfig`] index of `DST_TABLE_V6`.
pub const TABLE_DST_V6: usize = 3;

/// Largest table, in bits of bucket index.
pub const MAX_TABLE_BITS: u32 = 30;

/// The `SRC_TABLE_V4` key of an IPv4 address (network byte order).
#[inline(always)]
pub fn src_key_v4(addr: [u8; 4]) -> [u64; 1] {
    [u64::from(u32::from_be_bytes(addr))]
}

/// The `SRC_TABLE_V6` key of an IPv6 address (network byte order).
#[inline(always)]
pub fn src_key_v6(addr: [u8; 16]) -> [u64; 2] {
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        b0,
        b1,
        b2,
        b3,
        b4,
        b5,
        b6,
        b7,
    ] = addr;
    [
        u64::from_be_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        u64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7]),
    ]
}

/// The `DST_TABLE_V4` key of an agent's destination prefix: the [`owner_word`] (slot and
/// agent, which leaves bits 24-30 free) with the prefix length (at most 32) in bits 24-29,
/// then the masked address.
#[inline(always)]
pub fn dst_key_v4(owner: u32, len: u32, addr: u32) -> [u64; 1] {
    [(u64::from(owner | (len & 0x3f) << 24) << 32) | u64::from(addr)]
}

/// The `DST_TABLE_V6` key of an agent's destination prefix: owner word and prefix length,
/// then the masked address's halves.
#[inline(always)]
pub fn dst_key_v6(owner: u32, len: u32, hi: u64, lo: u64) -> [u64; 3] {
    [u64::from(owner) | u64::from(len) << 32, hi, lo]
}

/// The bucket of `key` in a table of `1 << bits` buckets (`bits` in 1..=[`MAX_TABLE_BITS`]):
/// multiplicative hashing (the top bits of the sum of the seeded words times odd
/// constants), a few instructions the program and the daemon compute alike.
#[inline(always)]
pub fn table_bucket<const W: usize>(key: &[u64; W], seed: u64, bits: u32) -> u32 {
    const M: [u64; 3] = [
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
    ];
    let mut h = 0u64;
    let mut i = 0;
    while i < W && i < M.len() {
        h = h.wrapping_add((key[i] ^ seed).wrapping_mul(M[i]));
        i += 1;
    }
    // The mask keeps the shift defined (and tells the verifier so) whatever `bits` is.
    (h >> ((64 - bits) & 63)) as u32
}

/// Data of an LPM key over IPv4: a 32-bit owner word, then the address. The prefix length
/// of the key is `32 + address prefix length`, so the owner always matches exactly.
///
/// The owner word is big-endian so it forms the leading bits the trie compares: for the
/// source maps it is the slot; for the destination maps it is [`owner`]`(slot, agent)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmV4 {
    /// Owner word, big-endian.
    pub owner: [u8; 4],
    /// Address in network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<LpmV4>() == 8);

/// IPv6 form of [`LpmV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmV6 {
    /// Owner word, big-endian.
    pub owner: [u8; 4],
    /// Address in network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<LpmV6>() == 20);

/// Bits of an LPM key's owner word.
pub const OWNER_BITS: u32 = 32;

/// Owner word of a destination-map key: the slot in the top bit, the agent id below.
pub const fn owner(slot: u32, agent: u32) -> [u8; 4] {
    owner_word(slot, agent).to_be_bytes()
}

/// Key of map `DST_HASH_V4`: one destination prefix of one agent, in a slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DstV4Key {
    /// [`owner_word`]`(slot, agent)`.
    pub owner: u32,
    /// Prefix length.
    pub len: u32,
    /// The prefix, host bits zero, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<DstV4Key>() == 12);

/// Key of map `DST_HASH_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DstV6Key {
    /// [`owner_word`]`(slot, agent)`.
    pub owner: u32,
    /// Prefix length.
    pub len: u32,
    /// The prefix, host bits zero, network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<DstV6Key>() == 24);

/// The owner of a destination entry as a native integer: slot in the top bit, agent below.
pub const fn owner_word(slot: u32, agent: u32) -> u32 {
    (slot << 31) | agent
}

/// Protocol value in [`PortRule::proto`] that matches any protocol.
pub const PROTO_ANY: u8 = 0;
/// [`PortRule::action`]: deny.
pub const ACTION_DENY: u8 = 0;
/// [`PortRule::action`]: allow.
pub const ACTION_ALLOW: u8 = 1;
/// [`PortRule::action`]: deny, and answer the sender so its call fails at once (a TCP RST,
/// else an ICMP administratively-prohibited error), within [`REJECT_REPLIES_PER_SEC`].
pub const ACTION_REJECT: u8 = 2;

/// Replies to rejected packets one agent may get per second: the rest are plain drops, so
/// a flood of rejected packets cannot become a flood of replies.
pub const REJECT_REPLIES_PER_SEC: u64 = 100;
/// Replies to rejected packets one agent may get in a burst.
pub const REJECT_REPLY_BURST: u64 = 100;
/// The reply limiter's cost of one reply, in the rate limiter's time units (map
/// `REJECT_LIMITS`, GCRA like the audit limiter).
pub const REJECT_REPLY_COST: u64 = UNITS_PER_SEC / REJECT_REPLIES_PER_SEC;
/// The reply limiter's burst in time units.
pub const REJECT_REPLY_TOLERANCE: u64 = REJECT_REPLY_BURST * REJECT_REPLY_COST;

/// [`PortRule::guard`]: the bits of the destination group (`guard::MAX_SHARED_GROUPS`).
pub const RULE_GROUP_MASK: u16 = 0x3ff;
/// [`PortRule::guard`]: the rule's packets pass an open breaker (the agent's resolver, its
/// control channel).
pub const RULE_ALWAYS: u16 = 1 << 15;

/// One egress rule inside a [`RuleSet`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6) or [`PROTO_ANY`].
    pub proto: u8,
    /// [`ACTION_ALLOW`], [`ACTION_DENY`] or [`ACTION_REJECT`].
    pub action: u8,
    /// What the guards make of the rule (`RULE_*` bits): the destination group whose
    /// shared limit an allowed packet charges (`guard::SharedPolicy`; 0: none) and whether
    /// an open breaker lets the rule's packets through.
    pub guard: u16,
    /// Lowest destination port, inclusive.
    pub port_lo: u16,
    /// Highest destination port, inclusive. `0..=65535` means any port, and is the only
    /// range that matches packets without ports (ICMP, non-first fragments).
    pub port_hi: u16,
}
const _: () = assert!(size_of::<PortRule>() == 8);

impl PortRule {
    /// Whether the rule covers every port.
    pub const fn any_port(&self) -> bool {
        self.port_lo == 0 && self.port_hi == u16::MAX
    }
}

/// Value of the destination maps `DST_V4` / `DST_V6`: the ordered rules that apply to a
/// destination prefix. The first rule whose protocol and ports match decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleSet {
    /// Rules in use, at most [`MAX_RULES_PER_PREFIX`].
    pub len: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The rules, most specific prefix first, deny before allow within one prefix length.
    pub rules: [PortRule; MAX_RULES_PER_PREFIX],
}
const _: () = assert!(size_of::<RuleSet>() == 8 + 8 * MAX_RULES_PER_PREFIX);

/// Most `defaults.tls_ports` a policy may name.
pub const MAX_TLS_PORTS: usize = 4;

/// TLS ports of a slot's policy: map `TLS_PORTS`, indexed by slot. A map of its own rather
/// than fields in [`SlotConfig`], so pinned maps of an older version keep their layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsPorts {
    /// Ports in use, at most [`MAX_TLS_PORTS`]; 0 marks an unused entry.
    pub ports: [u16; MAX_TLS_PORTS],
}
const _: () = assert!(size_of::<TlsPorts>() == 8);

/// A DNS resolver address the agents with names may query: key of `RESOLVERS` (value u32,
/// unused). IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResolverKey {
    /// Address, network byte order.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    /// Explicit padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<ResolverKey>() == 20);

/// An address an agent's resolver answered for an allowed name: key of `NAMES_V4`. Not per
/// slot: learned state outlives a policy flip; the daemon prunes what a new policy no
/// longer allows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NameV4Key {
    /// Agent id.
    pub agent: u32,
    /// Address, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<NameV4Key>() == 8);

/// Same as [`NameV4Key`] for IPv6: key of `NAMES_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NameV6Key {
    /// Agent id.
    pub agent: u32,
    /// Address, network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<NameV6Key>() == 20);

/// Value of `NAMES_V4/V6`: until when the address is allowed, and for which protocols and
/// ports (the union of the rules of every allowed name that resolved to it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameEntry {
    /// CLOCK_MONOTONIC ns after which the entry is void (the program reads its tick clock).
    pub expires_ns: u64,
    /// The rules, all allows.
    pub rules: RuleSet,
}
const _: () = assert!(size_of::<NameEntry>() == 8 + size_of::<RuleSet>());

/// Bytes of a name in [`SniKey`]: the longest host name (253) fits, padded.
pub const SNI_NAME_LEN: usize = 256;
/// [`SniKey::kind`]: the name must equal the server name.
pub const SNI_EXACT: u32 = 0;
/// [`SniKey::kind`]: the name is a suffix with its leading dot (`*.example.com` is stored
/// as `.example.com`); the server name must end with it.
pub const SNI_WILDCARD: u32 = 1;

/// Key of `SNI` (and the per-CPU scratch entry the program builds it in): a host name an
/// agent may name in a ClientHello, per slot.
///
/// The name is **right-aligned** in `name` with zeros before it, so the key of a suffix
/// of the name is the same buffer with the bytes before the suffix zeroed: the program
/// walks the server name once, left to right, zeroing as it goes, and looks up each
/// suffix that starts at a dot without copying. Names never contain a zero byte (the
/// program rejects one), so the padding is unambiguous.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SniKey {
    /// Policy slot.
    pub slot: u32,
    /// Agent id.
    pub agent: u32,
    /// [`SNI_EXACT`] or [`SNI_WILDCARD`].
    pub kind: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The lower-case name, right-aligned.
    pub name: [u8; SNI_NAME_LEN],
}
const _: () = assert!(size_of::<SniKey>() == 16 + SNI_NAME_LEN);

impl Default for SniKey {
    fn default() -> Self {
        SniKey {
            slot: 0,
            agent: 0,
            kind: 0,
            _pad: 0,
            name: [0; SNI_NAME_LEN],
        }
    }
}

impl SniKey {
    /// The key of `name` (lower case, at most [`SNI_NAME_LEN`] bytes, no zero byte).
    pub fn new(slot: u32, agent: u32, kind: u32, name: &[u8]) -> Option<SniKey> {
        if name.len() > SNI_NAME_LEN || name.contains(&0) {
            return None;
        }
        let mut key = SniKey {
            slot,
            agent,
            kind,
            ..SniKey::default()
        };
        key.name[SNI_NAME_LEN - name.len()..].copy_from_slice(name);
        Some(key)
    }
}

/// A TCP connection whose ClientHello passed the SNI check: key of the LRU map `FLOWS`.
/// Later segments of the connection pass without parsing; a flow the LRU evicted has its
/// next data segment parsed as a ClientHello again, which fails, so eviction can only
/// break a connection, never open one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Agent id.
    pub agent: u32,
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// Source address (IPv4 in the first 4 bytes, rest zero).
    pub src: [u8; 16],
    /// Destination address (IPv4 in the first 4 bytes, rest zero).
    pub dst: [u8; 16],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// Names of the maps in the eBPF object, shared so user space never spells one twice.
pub mod maps {
    /// [`super::State`], one element.
    pub const STATE: &str = "STATE";
    /// [`super::SlotConfig`], one per slot.
    pub const SLOTS: &str = "SLOTS";
    /// [`super::AgentPolicy`], `SLOTS * agent_stride` elements.
    pub const AGENTS: &str = "AGENTS";
    /// [`super::Bucket`], one per agent id.
    pub const BUCKETS: &str = "BUCKETS";
    /// Per-CPU [`super::AgentCounters`], `agent_stride` elements.
    pub const COUNTERS: &str = "COUNTERS";
    /// [`super::IfaceKey`] to agent id.
    pub const IFACES: &str = "IFACES";
    /// [`super::HostV4Key`] to agent id.
    pub const SRC_HOST_V4: &str = "SRC_HOST_V4";
    /// [`super::HostV6Key`] to agent id.
    pub const SRC_HOST_V6: &str = "SRC_HOST_V6";
    /// LPM [`super::LpmV4`] (owner = slot) to agent id.
    pub const SRC_V4: &str = "SRC_V4";
    /// LPM [`super::LpmV6`] (owner = slot) to agent id.
    pub const SRC_V6: &str = "SRC_V6";
    /// LPM [`super::LpmV4`] (owner = slot and agent) to [`super::RuleSet`].
    pub const DST_V4: &str = "DST_V4";
    /// LPM [`super::LpmV6`] (owner = slot and agent) to [`super::RuleSet`].
    pub const DST_V6: &str = "DST_V6";
    /// [`super::DstV4Key`] to [`super::RuleSet`].
    pub const DST_HASH_V4: &str = "DST_HASH_V4";
    /// [`super::DstV6Key`] to [`super::RuleSet`].
    pub const DST_HASH_V6: &str = "DST_HASH_V6";
    /// Ring buffer of [`super::AuditEvent`]s; its size in bytes is its max_entries.
    pub const AUDIT: &str = "AUDIT";
    /// [`super::AuditConfig`], one element.
    pub const AUDIT_CONFIG: &str = "AUDIT_CONFIG";
    /// Audit limiter theoretical arrival time (u64), one per agent id.
    pub const AUDIT_LIMITS: &str = "AUDIT_LIMITS";
    /// Reject reply limiter theoretical arrival time (u64), one per agent id (see
    /// [`super::REJECT_REPLIES_PER_SEC`]).
    pub const REJECT_LIMITS: &str = "REJECT_LIMITS";
    /// [`super::TlsPorts`], one per slot.
    pub const TLS_PORTS: &str = "TLS_PORTS";
    /// [`super::ResolverKey`] to u32: where agents with names may send DNS.
    pub const RESOLVERS: &str = "RESOLVERS";
    /// [`super::NameV4Key`] to [`super::NameEntry`]: addresses learned from DNS answers.
    pub const NAMES_V4: &str = "NAMES_V4";
    /// [`super::NameV6Key`] to [`super::NameEntry`].
    pub const NAMES_V6: &str = "NAMES_V6";
    /// [`super::SniKey`] to [`super::RuleSet`]: server names an agent may use, per slot.
    pub const SNI: &str = "SNI";
    /// Per-CPU scratch [`super::SniKey`], one element: where the program builds SNI keys
    /// (too big for the 512-byte BPF stack).
    pub const SNI_SCRATCH: &str = "SNI_SCRATCH";
    /// LRU [`super::FlowKey`] to u32: connections whose ClientHello passed.
    pub const FLOWS: &str = "FLOWS";
    /// [`super::Clock`], one element.
    pub const CLOCK: &str = "CLOCK";
    /// [`super::TableBucket1`]s of both slots, interleaved.
    pub const SRC_TABLE_V4: &str = "SRC_TABLE_V4";
    /// [`super::TableBucket2`]s of both slots, interleaved.
    pub const SRC_TABLE_V6: &str = "SRC_TABLE_V6";
    /// [`super::TableBucket1`]s of both slots, interleaved.
    pub const DST_TABLE_V4: &str = "DST_TABLE_V4";
    /// [`super::TableBucket3`]s of both slots, interleaved.
    pub const DST_TABLE_V6: &str = "DST_TABLE_V6";
    /// [`super::RuleSet`]s the destination tables point to, both slots interleaved
    /// (index `i << 1 | slot`; index 0 unused).
    pub const RULES: &str = "RULES";
    /// [`super::TableConfig`], one per slot.
    pub const TABLES: &str = "TABLES";
    /// The program array of the tail-called stages (see [`super::programs::STAGES`]). Not
    /// pinned by name, and not in [`ALL`]: every loaded object has its own, so an entry
    /// program only ever jumps into stages loaded with it; the daemon pins it under
    /// `stages/` in its bpffs directory, which keeps its entries while a pinned link still
    /// runs the entry program.
    pub const STAGES: &str = "STAGES";
    /// [`STAGES`] of the tc programs (a program array holds one program type), handled
    /// the same way (see [`super::programs::STAGES_TC`]).
    pub const STAGES_TC: &str = "STAGES_TC";
    /// Per-CPU scratch, one element: what the entry program hands the stages it
    /// tail-calls. Kernel-only, and like [`STAGES`] one per loaded object.
    pub const HANDOFF: &str = "HANDOFF";
    /// Per-CPU scratch, one element: where a reply to a rejected packet is put together.
    /// Kernel-only, and like [`HANDOFF`] one per loaded object.
    pub const REPLY_SCRATCH: &str = "REPLY_SCRATCH";
    /// [`super::guard::GuardPolicy`], indexed like [`AGENTS`].
    pub const GUARD_POLICY: &str = "GUARD_POLICY";
    /// [`super::guard::GuardState`], one per agent id.
    pub const GUARDS: &str = "GUARDS";
    /// [`super::guard::SharedPolicy`], indexed `group << 1 | slot`.
    pub const SHARED_POLICY: &str = "SHARED_POLICY";
    /// [`super::guard::SharedBucket`], one per destination group.
    pub const SHARED_BUCKETS: &str = "SHARED_BUCKETS";
    /// [`super::guard::GuardConfig`], one element.
    pub const GUARD_CONFIG: &str = "GUARD_CONFIG";
    /// Every map pinned by name, for pinning and clean-up.
    pub const ALL: [&str; 37] = [
        STATE,
        SLOTS,
        AGENTS,
        BUCKETS,
        COUNTERS,
        IFACES,
        SRC_HOST_V4,
        SRC_HOST_V6,
        SRC_V4,
        SRC_V6,
        DST_V4,
        DST_V6,
        DST_HASH_V4,
        DST_HASH_V6,
        AUDIT,
        AUDIT_CONFIG,
        AUDIT_LIMITS,
        TLS_PORTS,
        RESOLVERS,
        NAMES_V4,
        NAMES_V6,
        SNI,
        SNI_SCRATCH,
        FLOWS,
        CLOCK,
        SRC_TABLE_V4,
        SRC_TABLE_V6,
        DST_TABLE_V4,
        DST_TABLE_V6,
        RULES,
        TABLES,
        GUARD_POLICY,
        GUARDS,
        SHARED_POLICY,
        SHARED_BUCKETS,
        GUARD_CONFIG,
        REJECT_LIMITS,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The enforcer.
    pub const ENFORCE: &str = "enforce";
    /// Stage 4 of the pipeline as a program of its own, tail-called by [`ENFORCE`] for a
    /// packet only an address learned for a host name can admit: the learned-address and
    /// TLS server-name checks.
    pub const ENFORCE_NAMES: &str = "enforce_names";
    /// The pipeline's closing stage (limits, counting, audit) as a program of its own,
    /// tail-called by [`ENFORCE_NAMES`]. [`ENFORCE`] runs the same code inline for every
    /// packet it decides itself.
    pub const ENFORCE_FINISH: &str = "enforce_finish";
    /// Index of [`ENFORCE_NAMES`] in the `STAGES` program array.
    pub const STAGE_NAMES: u32 = 0;
    /// Index of [`ENFORCE_FINISH`] in the `STAGES` program array.
    pub const STAGE_FINISH: u32 = 1;
    /// The guards (breaker, shared limits, connection rate, quotas) and the close after
    /// them, tail-called by whichever stage would close a packet of an agent with guards.
    pub const ENFORCE_GUARD: &str = "enforce_guard";
    /// Index of [`ENFORCE_GUARD`] in the `STAGES` program array (and of its tc twin in
    /// `STAGES_TC`).
    pub const STAGE_GUARD: u32 = 3;
    /// The reply to a packet a `reject` rule or breaker refused, tail-called by the stage
    /// that closed it (after counting and auditing it).
    pub const ENFORCE_REJECT: &str = "enforce_reject";
    /// Index of [`ENFORCE_REJECT`] in the `STAGES` program array (and of its tc twin in
    /// `STAGES_TC`).
    pub const STAGE_REJECT: u32 = 4;
    /// Entries of each stage array: the highest index plus one.
    pub const STAGE_SLOTS: u32 = 5;
    /// Every tail-called stage, by its index in `STAGES`.
    pub const STAGES: [(u32, &str); 4] = [
        (STAGE_NAMES, ENFORCE_NAMES),
        (STAGE_FINISH, ENFORCE_FINISH),
        (STAGE_GUARD, ENFORCE_GUARD),
        (STAGE_REJECT, ENFORCE_REJECT),
    ];
    /// The enforcer as a tc (`sched_cls`, direct action) program, for the host side of
    /// sandbox veths: the same stages over socket buffers. This entry makes the headers
    /// readable and weighs the packet, then tail-calls [`ENFORCE_DECIDE_TC`].
    pub const ENFORCE_TC: &str = "enforce_tc";
    /// [`ENFORCE`]'s decision at tc, tail-called by [`ENFORCE_TC`].
    pub const ENFORCE_DECIDE_TC: &str = "enforce_decide_tc";
    /// Index of [`ENFORCE_DECIDE_TC`] in the `STAGES_TC` program array (tc only).
    pub const STAGE_DECIDE: u32 = 2;
    /// [`ENFORCE_NAMES`] at tc.
    pub const ENFORCE_NAMES_TC: &str = "enforce_names_tc";
    /// [`ENFORCE_FINISH`] at tc.
    pub const ENFORCE_FINISH_TC: &str = "enforce_finish_tc";
    /// [`ENFORCE_GUARD`] at tc.
    pub const ENFORCE_GUARD_TC: &str = "enforce_guard_tc";
    /// [`ENFORCE_REJECT`] at tc.
    pub const ENFORCE_REJECT_TC: &str = "enforce_reject_tc";
    /// Every tail-called stage of [`ENFORCE_TC`], by its index in `STAGES_TC` (the same
    /// indices as [`STAGES`], and the decision after them).
    pub const STAGES_TC: [(u32, &str); 5] = [
        (STAGE_NAMES, ENFORCE_NAMES_TC),
        (STAGE_FINISH, ENFORCE_FINISH_TC),
        (STAGE_DECIDE, ENFORCE_DECIDE_TC),
        (STAGE_GUARD, ENFORCE_GUARD_TC),
        (STAGE_REJECT, ENFORCE_REJECT_TC),
    ];
    /// A trivial XDP_PASS program: the floor benchmarks compare against.
    pub const PASS_FLOOR: &str = "pass_floor";
    /// Writes `jiffies`, CLOCK_MONOTONIC ns read after it and CLOCK_MONOTONIC ns read
    /// before it (three little-endian u64s) over the first 24 bytes of the packet: run with
    /// `BPF_PROG_TEST_RUN`, it is how the daemon measures [`super::Clock`].
    pub const CLOCK_PROBE: &str = "clock_probe";
}

/// The benchmark helper object (`enforcer-bench`, a separate eBPF binary so nothing in it
/// can change the enforcer's object): a traffic generator and a counting drop program.
pub mod bench {
    /// Program that rewrites each frame's IPv4 source address and returns XDP_TX; run with
    /// `BPF_PROG_TEST_RUN` in live-frames mode it is the benchmarks' packet generator.
    pub const PROG_TX: &str = "bench_tx";
    /// Program that counts every frame and drops it: the "bare XDP_DROP" configuration.
    pub const PROG_DROP: &str = "bench_drop";
    /// Program that passes every frame: what any XDP program on a veth costs the frames
    /// that go on into the stack.
    pub const PROG_PASS: &str = "bench_pass";
    /// Array of one [`GenConfig`].
    pub const MAP_CONFIG: &str = "GEN_CONFIG";
    /// Per-CPU array of three u64: [`SEQ_SENT`], [`SEQ_NEXT_NS`] and [`SEQ_BURSTING`].
    pub const MAP_SEQ: &str = "GEN_SEQ";
    /// Index in [`MAP_SEQ`]: frames sent on that CPU (also the next agent index).
    pub const SEQ_SENT: u32 = 0;
    /// Index in [`MAP_SEQ`]: when that CPU may send its next paced frame (ktime ns).
    pub const SEQ_NEXT_NS: u32 = 1;
    /// Index in [`MAP_SEQ`]: 1 while that CPU sends a paced burst.
    pub const SEQ_BURSTING: u32 = 2;
    /// Per-CPU array of one u64: frames `bench_drop` dropped on that CPU.
    pub const MAP_DROPS: &str = "DROPS";

    /// What the generator sends: frame `n` on a CPU gets source address
    /// `base + n % count`, so every agent gets the same share of every CPU's frames.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct GenConfig {
        /// First source address, host byte order.
        pub base: u32,
        /// Number of consecutive source addresses (at least 1).
        pub count: u32,
        /// Pacing: on average one frame per this many ns from one CPU, sent in bursts of 64;
        /// frames that come too early are dropped unsent. 0 sends every frame (a flood).
        pub interval_ns: u64,
    }
    const _: () = assert!(size_of::<GenConfig>() == 16);
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all these types are #[repr(C)], made only of integers and arrays of integers,
    // with explicit padding fields, so every bit pattern is valid and there are no holes.
    unsafe impl aya::Pod for State {}
    unsafe impl aya::Pod for SlotConfig {}
    unsafe impl aya::Pod for AgentPolicy {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for AgentCounters {}
    unsafe impl aya::Pod for IfaceKey {}
    unsafe impl aya::Pod for HostV4Key {}
    unsafe impl aya::Pod for HostV6Key {}
    unsafe impl aya::Pod for LpmV4 {}
    unsafe impl aya::Pod for LpmV6 {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for RuleSet {}
    unsafe impl aya::Pod for DstV4Key {}
    unsafe impl aya::Pod for DstV6Key {}
    unsafe impl aya::Pod for AuditEvent {}
    unsafe impl aya::Pod for AuditConfig {}
    unsafe impl aya::Pod for Clock {}
    unsafe impl<const W: usize> aya::Pod for TableBucket<W> {}
    unsafe impl aya::Pod for TableConfig {}
    unsafe impl aya::Pod for AuditStats {}
    unsafe impl aya::Pod for bench::GenConfig {}
    unsafe impl aya::Pod for TlsPorts {}
    unsafe impl aya::Pod for ResolverKey {}
    unsafe impl aya::Pod for NameV4Key {}
    unsafe impl aya::Pod for NameV6Key {}
    unsafe impl aya::Pod for NameEntry {}
    unsafe impl aya::Pod for SniKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for guard::GuardPolicy {}
    unsafe impl aya::Pod for guard::GuardState {}
    unsafe impl aya::Pod for guard::SharedPolicy {}
    unsafe impl aya::Pod for guard::SharedBucket {}
    unsafe impl aya::Pod for guard::GuardConfig {}
}
