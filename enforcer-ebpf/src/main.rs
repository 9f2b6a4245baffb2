//! The enforcer's XDP program: identifies the agent that sent a packet, checks the
//! destination against the agent's egress rules, applies the agent's token buckets and
//! counts the decision by reason. Drops and monitor-mode would-drops are also reported to
//! user space through the `AUDIT` ring buffer, within a per-agent event budget.
//!
//! Minimum kernel: 5.12 (64-bit BPF_CMPXCHG for the rate limiter, bounded loops, LPM tries;
//! the ring buffer needs 5.8 and the coarse clock 5.11).
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics is the only 64-bit CAS on the BPF target"
)]
#![expect(
    missing_docs,
    reason = "#[xdp] generates undocumented wrapper functions"
)]

use core::{intrinsics::AtomicOrdering, ptr};

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use enforcer_common::{
    ACTION_ALLOW, AGENT_ACTIVE, AGENT_COARSE_CLOCK, AGENT_DEFAULT_ALLOW, AGENT_DST_LPM_V4,
    AGENT_DST_LPM_V6, AGENT_MONITOR, AGENT_NAMES, AGENT_RESTRICTED, AUDIT_FAMILY_NONE,
    AUDIT_FAMILY_V4, AUDIT_FAMILY_V6, AgentPolicy, AuditConfig, AuditEvent, AuditStats, Bucket,
    Clock, Counter, DstV4Key, DstV6Key, FlowKey, HostV4Key, HostV6Key, IfaceKey, LpmV4, LpmV6,
    MAX_DST_PROBES, MAX_IPV6_EXT_HEADERS, MAX_RULES_PER_PREFIX, MAX_TLS_PORTS, MAX_VLAN_TAGS,
    NameEntry, NameV4Key, NameV6Key, OWNER_BITS, PROTO_ANY, Reason, ResolverKey, RuleSet,
    SLOT_HAS_IFACES, SLOT_SRC_LPM_V4, SLOT_SRC_LPM_V6, SLOT_UNKNOWN_DROP, SNI_EXACT, SNI_NAME_LEN,
    SNI_WILDCARD, SlotConfig, SniKey, State, TABLE_DST_V4, TABLE_DST_V6, TABLE_SRC_V4,
    TABLE_SRC_V6, TABLE_WAYS, TIME_SHIFT, TableBucket, TableBucket1, TableBucket2, TableBucket3,
    TableConfig, TlsPorts, UNITS_PER_SEC, UNKNOWN_AGENT, counter_index, dst_key_v4, dst_key_v6,
    owner, owner_word, src_key_v4, src_key_v6, table_bucket,
};

// Map sizes here are placeholders: the daemon sets the real ones at load time
// (`EbpfLoader::map_max_entries`) from its configuration. Every map is pinned by name so a
// restarted daemon, or a reloaded program, keeps the same policy, buckets and counters.
const DEFAULT_AGENTS: u32 = 1024;

#[map]
static STATE: Array<State> = Array::pinned(1, 0);
#[map]
static SLOTS: Array<SlotConfig> = Array::pinned(enforcer_common::SLOTS, 0);
#[map]
static AGENTS: Array<AgentPolicy> = Array::pinned(2 * (DEFAULT_AGENTS + 1), 0);
#[map]
static BUCKETS: Array<Bucket> = Array::pinned(DEFAULT_AGENTS + 1, 0);
#[map]
static COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::pinned((DEFAULT_AGENTS + 1) * Reason::COUNT, 0);
#[map]
static IFACES: HashMap<IfaceKey, u32> = HashMap::pinned(1024, 0);
#[map]
static SRC_HOST_V4: HashMap<HostV4Key, u32> = HashMap::pinned(1024, 0);
#[map]
static SRC_HOST_V6: HashMap<HostV6Key, u32> = HashMap::pinned(1024, 0);
#[map]
static SRC_V4: LpmTrie<LpmV4, u32> = LpmTrie::pinned(1024, 0);
#[map]
static SRC_V6: LpmTrie<LpmV6, u32> = LpmTrie::pinned(1024, 0);
#[map]
static DST_V4: LpmTrie<LpmV4, RuleSet> = LpmTrie::pinned(1024, 0);
#[map]
static DST_V6: LpmTrie<LpmV6, RuleSet> = LpmTrie::pinned(1024, 0);
#[map]
static DST_HASH_V4: HashMap<DstV4Key, RuleSet> = HashMap::pinned(1024, 0);
#[map]
static DST_HASH_V6: HashMap<DstV6Key, RuleSet> = HashMap::pinned(1024, 0);
/// Audit events. Pinned like the rest, so events the program writes while no daemon reads
/// them wait for the next one (until the ring fills; then they are counted as lost).
#[map]
static AUDIT: RingBuf = RingBuf::pinned(1 << 20, 0);
#[map]
static AUDIT_CONFIG: Array<AuditConfig> = Array::pinned(1, 0);
/// Audit limiter state: one GCRA theoretical arrival time per agent id. A map of its own
/// (not a third field of `Bucket`) so the layouts of the maps earlier versions pinned stay
/// as they were and an upgraded daemon can take over running pins without detaching.
#[map]
static AUDIT_LIMITS: Array<u64> = Array::pinned(DEFAULT_AGENTS + 1, 0);
#[map]
static AUDIT_STATS: PerCpuArray<AuditStats> = PerCpuArray::pinned(DEFAULT_AGENTS + 1, 0);
// Host names. Maps of their own, so the layouts of the maps above stay as earlier versions
// pinned them.
#[map]
static TLS_PORTS: Array<TlsPorts> = Array::pinned(enforcer_common::SLOTS, 0);
#[map]
static RESOLVERS: HashMap<ResolverKey, u32> = HashMap::pinned(64, 0);
#[map]
static NAMES_V4: HashMap<NameV4Key, NameEntry> = HashMap::pinned(65536, 0);
#[map]
static NAMES_V6: HashMap<NameV6Key, NameEntry> = HashMap::pinned(65536, 0);
#[map]
static SNI: HashMap<SniKey, RuleSet> = HashMap::pinned(4096, 0);
#[map]
static SNI_SCRATCH: PerCpuArray<SniScratch> = PerCpuArray::pinned(1, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(65536, 0);
#[map]
static CLOCK: Array<Clock> = Array::pinned(1, 0);
#[map]
static SRC_TABLE_V4: Array<TableBucket1> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
static SRC_TABLE_V6: Array<TableBucket2> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
static DST_TABLE_V4: Array<TableBucket1> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
static DST_TABLE_V6: Array<TableBucket3> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
static RULES: Array<RuleSet> = Array::pinned(2 * DEFAULT_AGENTS, 0);
#[map]
static TABLES: Array<TableConfig> = Array::pinned(enforcer_common::SLOTS, 0);

/// Where the SNI check works: the key it looks up, and the server name as read from the
/// packet. Kernel-only (user space never reads it), and per CPU because 512 bytes do not
/// fit on the BPF stack beside everything else.
#[repr(C)]
struct SniScratch {
    key: SniKey,
    raw: [u8; SNI_NAME_LEN],
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_IGMP: u8 = 2;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// Largest L3/L4 offset the parser follows. XDP frames are at most a page, so a larger
/// offset cannot be inside the packet; the bound also gives the verifier a range for the
/// variable offsets of IPv4 options and IPv6 extension headers.
const MAX_OFFSET: usize = 4096;
/// A mask that keeps every offset up to [`MAX_OFFSET`]: applied to offsets passed into
/// global functions, whose arguments the verifier knows nothing about.
const OFFSET_MASK: u64 = 0x1fff;

/// TLS extensions the SNI check walks in a ClientHello before giving up (browsers send
/// about 20, with GREASE).
const MAX_TLS_EXTENSIONS: usize = 32;
/// `encrypted_client_hello` (draft-ietf-tls-esni): the real server name is encrypted.
const TLS_EXT_ECH: u16 = 0xfe0d;

/// Compare-and-swap attempts on a bucket before the packet is treated as over the limit.
/// Only CPUs racing on the same agent retry, so a handful is plenty; failing closed keeps
/// the limit exact even under pathological contention.
const CAS_ATTEMPTS: usize = 8;

/// The enforcer. Fail-open on internal errors, which only a map the loader failed to size
/// can cause (no packet content reaches the `Err` arm): a broken deploy must not cut a
/// server off its network, and the daemon refuses to start in that state anyway.
#[xdp]
// `#[xdp]` wraps this in the exported entry point; without the hint LLVM may keep it a
// separate function once the program is large, putting a BPF-to-BPF call on every packet.
#[inline(always)]
pub fn enforce(ctx: XdpContext) -> u32 {
    match try_enforce(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// The floor benchmarks compare against: returns XDP_PASS and touches nothing.
#[xdp]
pub fn pass_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Measures the tick clock for the daemon (see [`Clock`]): run with `BPF_PROG_TEST_RUN`,
/// never attached.
#[xdp]
pub fn clock_probe(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    // Bounds check against data_end: the verifier rejects a write not dominated by one.
    if start + 16 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: helpers without preconditions; [start, start + 16) is inside the packet
    // (checked above), written unaligned.
    unsafe {
        let jiffies = bpf_jiffies64();
        let ns = bpf_ktime_get_ns();
        ptr::write_unaligned(start as *mut [u8; 8], jiffies.to_le_bytes());
        ptr::write_unaligned((start + 8) as *mut [u8; 8], ns.to_le_bytes());
    }
    xdp_action::XDP_PASS
}

/// What the parser found about the transport layer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum L4 {
    /// A protocol with ports (TCP, UDP, SCTP, UDP-Lite) and its ports. Decisions use only
    /// `dst`; `src` is kept for audit events (it comes from the same 4-byte read).
    Port { src: u16, dst: u16 },
    /// A protocol without ports (ICMP, GRE, ESP, ...): only any-port rules apply.
    NoPorts,
    /// A non-first fragment of a protocol with ports: the port is unknowable.
    Fragment,
    /// Headers cut short or a chain the parser will not follow: nothing can be decided.
    Undecidable,
    /// Link-local control traffic (IPv6 neighbour discovery, MLD, IGMP) that the hop
    /// limit keeps on the link: passed like ARP, or agents could not use IP at all.
    LinkControl,
}

/// The IP-layer facts a decision needs, for either family.
struct Flow<A> {
    src: A,
    dst: A,
    proto: u8,
    l4: L4,
    /// Offset of the IP header.
    l3_off: usize,
    /// Offset of the transport header (meaningful for `L4::Port`).
    l4_off: usize,
    /// Offset where the IP packet ends by its length field: the stack trims anything
    /// after it (Ethernet padding), so the SNI check must not read it as payload.
    ip_end: usize,
}

#[inline(always)]
fn try_enforce(ctx: &XdpContext) -> Result<u32, ()> {
    let state = STATE.get(0).ok_or(())?;
    let slot = state.active_slot & 1;
    let stride = state.agent_stride;
    let slot_cfg = SLOTS.get(slot).ok_or(())?;
    let len = (ctx.data_end() - ctx.data()) as u64;

    // Interface identity first: on the host side of a sandbox veth the interface is the
    // agent, whatever source address it claims.
    let mut agent = UNKNOWN_AGENT;
    if slot_cfg.flags & SLOT_HAS_IFACES != 0 {
        let key = IfaceKey {
            slot,
            ifindex: ctx.ingress_ifindex() as u32,
        };
        // SAFETY: the value is a plain u32 copied out immediately.
        if let Some(a) = unsafe { IFACES.get(&key) } {
            agent = *a;
        }
    }

    let mut off = ETH_HLEN;
    let Some(mut ethertype) = read_be16(ctx, 12) else {
        return undecidable(ctx, slot, stride, slot_cfg, agent, len);
    };
    // Strip up to MAX_VLAN_TAGS 802.1Q / 802.1ad tags; the loop has a constant trip count
    // so the verifier sees it bounded.
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // The inner ethertype sits in the last two bytes of the 4-byte tag.
        let Some(inner) = read_be16(ctx, off + 2) else {
            return undecidable(ctx, slot, stride, slot_cfg, agent, len);
        };
        ethertype = inner;
        off += 4;
    }

    match ethertype {
        ETH_P_IP => match parse_v4(ctx, off) {
            Some(flow) => decide(ctx, slot, stride, slot_cfg, agent, &flow, len),
            None => undecidable(ctx, slot, stride, slot_cfg, agent, len),
        },
        ETH_P_IPV6 => match parse_v6(ctx, off) {
            Some(flow) => decide(ctx, slot, stride, slot_cfg, agent, &flow, len),
            None => undecidable(ctx, slot, stride, slot_cfg, agent, len),
        },
        // A third tag: the frame hides its payload deeper than the parser looks.
        ETH_P_8021Q | ETH_P_8021AD => undecidable(ctx, slot, stride, slot_cfg, agent, len),
        _ => {
            count(agent, Reason::NonIp, len);
            Ok(xdp_action::XDP_PASS)
        }
    }
}

/// Reads `N` bytes at `off`, or `None` if they are not all before `data_end`.
///
/// Keep `N >= 2`: for `N == 1` LLVM folds `start + 1 > end` into `start >= end`, a form
/// the verifier does not turn into a readable range.
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, off: usize) -> Option<[u8; N]> {
    // The explicit bound keeps the offset's range small for the verifier.
    if off > MAX_OFFSET {
        return None;
    }
    let start = ctx.data() + off;
    // Bounds check against data_end: the verifier rejects any packet read not dominated by one.
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start, start + N) lies inside the packet (checked above); [u8; N] has
    // alignment 1.
    Some(unsafe { ptr::read(start as *const [u8; N]) })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    read::<2>(ctx, off).map(u16::from_be_bytes)
}

#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

/// Reads the ports of a first (or unfragmented) packet at `off`.
#[inline(always)]
fn transport(ctx: &XdpContext, proto: u8, off: usize) -> L4 {
    if !has_ports(proto) {
        return L4::NoPorts;
    }
    // Source port at +0, destination port at +2 in all four protocols: one 4-byte read with
    // the same bounds check the destination port alone needed, so keeping the source port
    // costs passed packets nothing.
    match read::<4>(ctx, off) {
        Some(p) => L4::Port {
            src: u16::from_be_bytes([p[0], p[1]]),
            dst: u16::from_be_bytes([p[2], p[3]]),
        },
        None => L4::Undecidable,
    }
}

/// Classifies an ICMPv6 message at `off`. Neighbour discovery (RFC 4861: router and
/// neighbour solicitation and advertisement, redirect) is only valid with hop limit 255 and
/// MLD (RFC 2710, 3810) is sent with hop limit 1; either way it never leaves the link.
#[inline(always)]
fn icmpv6(ctx: &XdpContext, off: usize, hop_limit: u8) -> L4 {
    // Type, code and checksum: the fixed start of every ICMPv6 message.
    let Some([kind, ..]) = read::<4>(ctx, off) else {
        return L4::Undecidable;
    };
    match (kind, hop_limit) {
        (133..=137, 255) | (130..=132 | 143, 1) => L4::LinkControl,
        _ => L4::NoPorts,
    }
}

/// Parses an IPv4 header at `off`. `None` when the header is truncated or invalid, so the
/// source address cannot be trusted.
#[inline(always)]
fn parse_v4(ctx: &XdpContext, off: usize) -> Option<Flow<[u8; 4]>> {
    let h = read::<20>(ctx, off)?;
    let version = h[0] >> 4;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if version != 4 || ihl < 20 {
        return None;
    }
    let proto = h[9];
    let ttl = h[8];
    let ip_end = off + u16::from_be_bytes([h[2], h[3]]) as usize;
    let src = [h[12], h[13], h[14], h[15]];
    let dst = [h[16], h[17], h[18], h[19]];
    let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let l4 = if proto == IPPROTO_IGMP && ttl == 1 && frag_offset == 0 {
        // IGMP is link-scoped with TTL 1 (RFC 2236, 3376): no router forwards it.
        L4::LinkControl
    } else if frag_offset == 1 && proto == IPPROTO_TCP {
        // An 8-byte offset can only serve to overwrite the TCP ports of the first fragment
        // (RFC 1858, section 3.2): never legitimate.
        L4::Undecidable
    } else if frag_offset != 0 {
        // A non-first fragment has no transport header; ports are unknown.
        if has_ports(proto) {
            L4::Fragment
        } else {
            L4::NoPorts
        }
    } else if read::<4>(ctx, off + ihl - 4).is_none() {
        // Options announced by IHL but cut off.
        L4::Undecidable
    } else {
        // Options are skipped by IHL; a first fragment too short to hold the ports is
        // Undecidable (the tiny-fragment attack of RFC 1858).
        transport(ctx, proto, off + ihl)
    };
    Some(Flow {
        src,
        dst,
        proto,
        l4,
        l3_off: off,
        l4_off: off + ihl,
        ip_end,
    })
}

/// Parses an IPv6 header at `off` and walks up to MAX_IPV6_EXT_HEADERS extension headers.
#[inline(always)]
fn parse_v6(ctx: &XdpContext, off: usize) -> Option<Flow<[u8; 16]>> {
    let h = read::<40>(ctx, off)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let l3_off = off;
    let mut next = h[6];
    let hop_limit = h[7];
    let ip_end = off + 40 + u16::from_be_bytes([h[4], h[5]]) as usize;
    let mut off = off + 40;
    // Stays Undecidable if the bound runs out inside the chain.
    let mut l4 = L4::Undecidable;
    // Up to MAX_IPV6_EXT_HEADERS extension headers, then the upper layer: a constant trip
    // count for the verifier. A longer chain stays Undecidable.
    for _ in 0..MAX_IPV6_EXT_HEADERS + 1 {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING => {
                let Some(e) = read::<4>(ctx, off) else {
                    break;
                };
                // A routing header with segments left names another final destination
                // than the header's: the real destination is unknowable here.
                if next == IPPROTO_ROUTING && e[3] != 0 {
                    break;
                }
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some(e) = read::<2>(ctx, off) else {
                    break;
                };
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(e) = read::<8>(ctx, off) else {
                    break;
                };
                next = e[0];
                off += 8;
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    l4 = if has_ports(next) {
                        L4::Fragment
                    } else {
                        L4::NoPorts
                    };
                    break;
                }
            }
            IPPROTO_ICMPV6 => {
                l4 = icmpv6(ctx, off, hop_limit);
                break;
            }
            _ => {
                l4 = transport(ctx, next, off);
                break;
            }
        }
    }
    Some(Flow {
        src,
        dst,
        proto: next,
        l4,
        l3_off,
        l4_off: off,
        ip_end,
    })
}

/// The decision for a parsed packet of either family: the agent (by interface already, else
/// by source address), then its egress rules and limits.
#[inline(always)]
fn decide<A: Family>(
    ctx: &XdpContext,
    slot: u32,
    stride: u32,
    slot_cfg: &SlotConfig,
    mut agent: u32,
    flow: &Flow<A>,
    len: u64,
) -> Result<u32, ()>
where
    Flow<A>: AuditTuple,
{
    let tables = TABLES.get(slot);
    if agent == UNKNOWN_AGENT {
        agent = flow.src.host_agent(slot, tables);
    }
    if agent == UNKNOWN_AGENT && slot_cfg.flags & A::SLOT_SRC_LPM != 0 {
        agent = flow.src.prefix_agent(slot);
    }
    if flow.l4 == L4::LinkControl {
        count(agent, Reason::LinkControl, len);
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(policy) = agent_policy(slot, stride, agent) else {
        return unknown(ctx, slot_cfg, len, flow);
    };
    let verdict = if policy.flags & AGENT_RESTRICTED == 0 {
        Reason::Allowed
    } else if policy.flags & AGENT_NAMES != 0 {
        names(
            ctx,
            slot,
            agent,
            policy,
            flow,
            flow.dst.rules(slot, agent, policy, tables),
        )
    } else {
        egress(
            flow.dst.rules(slot, agent, policy, tables),
            flow.proto,
            flow.l4,
            policy.flags,
        )
    };
    finish(ctx, agent, policy, verdict, len, flow)
}

/// An address family's side of agent identification and of the destination lookup.
trait Family: NameAddr {
    /// [`SlotConfig::flags`]: the slot has source prefixes of this family.
    const SLOT_SRC_LPM: u32;
    /// The agent whose exact source address this is: the slot's source table, then its
    /// overflow hash map when the table says so.
    fn host_agent(&self, slot: u32, tables: Option<&TableConfig>) -> u32;
    /// The agent of the slot's longest source prefix holding this address.
    fn prefix_agent(&self, slot: u32) -> u32;
    /// The rules of the agent's longest destination prefix holding this address.
    fn rules(
        &self,
        slot: u32,
        agent: u32,
        policy: &AgentPolicy,
        tables: Option<&TableConfig>,
    ) -> Option<&'static RuleSet>;
}

impl Family for [u8; 4] {
    const SLOT_SRC_LPM: u32 = SLOT_SRC_LPM_V4;

    #[inline(always)]
    fn host_agent(&self, slot: u32, tables: Option<&TableConfig>) -> u32 {
        let (agent, overflow) =
            table_probe(&SRC_TABLE_V4, slot, tables, TABLE_SRC_V4, src_key_v4(*self));
        if agent != UNKNOWN_AGENT || !overflow {
            return agent;
        }
        let key = HostV4Key { slot, addr: *self };
        // SAFETY: plain u32 value, copied out.
        unsafe { SRC_HOST_V4.get(&key) }.map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn prefix_agent(&self, slot: u32) -> u32 {
        let key = Key::new(
            OWNER_BITS + 32,
            LpmV4 {
                owner: slot.to_be_bytes(),
                addr: *self,
            },
        );
        SRC_V4.get(&key).map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn rules(
        &self,
        slot: u32,
        agent: u32,
        policy: &AgentPolicy,
        tables: Option<&TableConfig>,
    ) -> Option<&'static RuleSet> {
        dst_v4(slot, agent, policy, tables, *self)
    }
}

impl Family for [u8; 16] {
    const SLOT_SRC_LPM: u32 = SLOT_SRC_LPM_V6;

    #[inline(always)]
    fn host_agent(&self, slot: u32, tables: Option<&TableConfig>) -> u32 {
        let (agent, overflow) =
            table_probe(&SRC_TABLE_V6, slot, tables, TABLE_SRC_V6, src_key_v6(*self));
        if agent != UNKNOWN_AGENT || !overflow {
            return agent;
        }
        let key = HostV6Key { slot, addr: *self };
        // SAFETY: plain u32 value, copied out.
        unsafe { SRC_HOST_V6.get(&key) }.map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn prefix_agent(&self, slot: u32) -> u32 {
        let key = Key::new(
            OWNER_BITS + 128,
            LpmV6 {
                owner: slot.to_be_bytes(),
                addr: *self,
            },
        );
        SRC_V6.get(&key).map_or(UNKNOWN_AGENT, |a| *a)
    }

    #[inline(always)]
    fn rules(
        &self,
        slot: u32,
        agent: u32,
        policy: &AgentPolicy,
        tables: Option<&TableConfig>,
    ) -> Option<&'static RuleSet> {
        dst_v6(slot, agent, policy, tables, *self)
    }
}

/// The value of `key` in the slot's table `which` (see [`TableBucket`]), 0 if it is not
/// there, and whether a miss must also look in the table's overflow hash map (always, for a
/// slot without the table: one written before tables existed has only the hash maps).
#[inline(always)]
fn table_probe<const W: usize>(
    table: &Array<TableBucket<W>>,
    slot: u32,
    tables: Option<&TableConfig>,
    which: usize,
    key: [u64; W],
) -> (u32, bool) {
    let Some(t) = tables else {
        return (0, true);
    };
    let bits = t.bits[which];
    if bits == 0 {
        return (0, true);
    }
    let index = (table_bucket(&key, t.seeds[which], bits) << 1) | slot;
    // Only an index beyond the map (a table the daemon sized wrongly) fails: the overflow
    // map then decides alone.
    let Some(bucket) = table.get(index) else {
        return (0, true);
    };
    for way in 0..TABLE_WAYS {
        let value = bucket.values[way];
        // Differences folded into one word: compared with `==` (a chain of compares), the
        // 3-word IPv6 destination keys became a call to a byte-by-byte `memcmp`.
        let mut diff = 0;
        for word in 0..W {
            diff |= bucket.keys[way][word] ^ key[word];
        }
        if value != 0 && diff == 0 {
            return (value, false);
        }
    }
    (0, bucket.overflow != 0)
}

/// The rule set at `index` of the slot's part of `RULES`, as a destination table names it.
#[inline(always)]
fn rules_at(slot: u32, index: u32) -> Option<&'static RuleSet> {
    RULES.get((index << 1) | slot)
}

/// The rules of the longest of the agent's IPv4 destination prefixes that contains `dst`.
/// A few hash probes (one per prefix length the agent uses, longest first) cost less than
/// an LPM walk whose depth grows with every agent's entries; agents with many lengths use
/// the LPM trie.
#[inline(always)]
fn dst_v4(
    slot: u32,
    agent: u32,
    policy: &AgentPolicy,
    tables: Option<&TableConfig>,
    dst: [u8; 4],
) -> Option<&'static RuleSet> {
    if policy.flags & AGENT_DST_LPM_V4 != 0 {
        let key = Key::new(
            OWNER_BITS + 32,
            LpmV4 {
                owner: owner(slot, agent),
                addr: dst,
            },
        );
        return DST_V4.get(&key);
    }
    let addr = u32::from_be_bytes(dst);
    let mut key = DstV4Key {
        owner: owner_word(slot, agent),
        len: 0,
        addr: [0; 4],
    };
    let n = policy.dst_lens_v4_count as usize;
    // One 8-byte read, each length shifted out below: indexing the array made LLVM walk
    // a pointer whose bound Linux 6.1's verifier loses (`invalid access to map value`).
    let mut lens = u64::from_le_bytes(policy.dst_lens_v4);
    for i in 0..MAX_DST_PROBES {
        if i >= n {
            break;
        }
        let len = (lens & 0xff) as u32;
        lens >>= 8;
        // len is 0..=32 (compile checks). The mask has no branch for /0: one path fewer
        // per probe, which Linux 6.1's verifier multiplies by every later branch (its
        // 8192-entry limit on pending branches, `The sequence of 8193 jumps is too complex`).
        let mask = (high_bits(len) >> 32) as u32;
        let masked = addr & mask;
        let (index, overflow) = table_probe(
            &DST_TABLE_V4,
            slot,
            tables,
            TABLE_DST_V4,
            dst_key_v4(key.owner, len, masked),
        );
        if index != 0 {
            return rules_at(slot, index);
        }
        if overflow {
            key.len = len;
            key.addr = masked.to_be_bytes();
            // SAFETY: the value is only read, during this program run.
            if let Some(rules) = unsafe { DST_HASH_V4.get(&key) } {
                return Some(rules);
            }
        }
    }
    None
}

/// A u64 with its top `n` bits set, for `n` in 0..=64, without a branch (see [`dst_v4`]):
/// two shifts of at most 32 each, since one shift by 64 is undefined.
#[inline(always)]
fn high_bits(n: u32) -> u64 {
    let half = n / 2;
    !((u64::MAX >> half) >> (n - half))
}

/// IPv6 form of [`dst_v4`].
#[inline(always)]
fn dst_v6(
    slot: u32,
    agent: u32,
    policy: &AgentPolicy,
    tables: Option<&TableConfig>,
    dst: [u8; 16],
) -> Option<&'static RuleSet> {
    if policy.flags & AGENT_DST_LPM_V6 != 0 {
        let key = Key::new(
            OWNER_BITS + 128,
            LpmV6 {
                owner: owner(slot, agent),
                addr: dst,
            },
        );
        return DST_V6.get(&key);
    }
    let hi = u64::from_be_bytes([
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7],
    ]);
    let lo = u64::from_be_bytes([
        dst[8], dst[9], dst[10], dst[11], dst[12], dst[13], dst[14], dst[15],
    ]);
    let owner = owner_word(slot, agent);
    let n = policy.dst_lens_v6_count as usize;
    // One 8-byte read, as in [`dst_v4`].
    let mut lens = u64::from_le_bytes(policy.dst_lens_v6);
    for i in 0..MAX_DST_PROBES {
        if i >= n {
            break;
        }
        let len = (lens & 0xff) as i64;
        lens >>= 8;
        // len is 0..=128 (compile checks). Branch-free for the same reason as in
        // [`dst_v4`] (BPF has no select: a `min` or an `if` is a jump): `over` is
        // max(len - 64, 0), from the sign of len - 64.
        let over = (len - 64) & !((len - 64) >> 63);
        let (mask_hi, mask_lo) = (high_bits((len - over) as u32), high_bits(over as u32));
        let (masked_hi, masked_lo) = (hi & mask_hi, lo & mask_lo);
        let (index, overflow) = table_probe(
            &DST_TABLE_V6,
            slot,
            tables,
            TABLE_DST_V6,
            dst_key_v6(owner, len as u32, masked_hi, masked_lo),
        );
        if index != 0 {
            return rules_at(slot, index);
        }
        if overflow {
            // Built only here: zeroing it up front was a `memset` call on every packet.
            let (h, l) = (masked_hi.to_be_bytes(), masked_lo.to_be_bytes());
            let key = DstV6Key {
                owner,
                len: len as u32,
                addr: [
                    h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4],
                    l[5], l[6], l[7],
                ],
            };
            // SAFETY: the value is only read, during this program run.
            if let Some(rules) = unsafe { DST_HASH_V6.get(&key) } {
                return Some(rules);
            }
        }
    }
    None
}

/// An address family's side of the host-name checks.
trait NameAddr: Copy {
    /// 4 or 6.
    const FAMILY: u8;
    /// The `RESOLVERS` key of this address and `port`.
    fn resolver(&self, port: u16) -> ResolverKey;
    /// The address the agent's resolver learned for an allowed name, if any.
    fn learned(&self, agent: u32) -> Option<&'static NameEntry>;
    /// The address as stored in a [`FlowKey`].
    fn flow_addr(&self) -> [u8; 16];
}

impl NameAddr for [u8; 4] {
    const FAMILY: u8 = 4;
    #[inline(always)]
    fn resolver(&self, port: u16) -> ResolverKey {
        let a = self;
        ResolverKey {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ],
            port,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn learned(&self, agent: u32) -> Option<&'static NameEntry> {
        // SAFETY: the value is only read, during this program run.
        unsafe { NAMES_V4.get(&NameV4Key { agent, addr: *self }) }
    }

    #[inline(always)]
    fn flow_addr(&self) -> [u8; 16] {
        let a = self;
        [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }
}

impl NameAddr for [u8; 16] {
    const FAMILY: u8 = 6;
    #[inline(always)]
    fn resolver(&self, port: u16) -> ResolverKey {
        ResolverKey {
            addr: *self,
            port,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn learned(&self, agent: u32) -> Option<&'static NameEntry> {
        // SAFETY: the value is only read, during this program run.
        unsafe { NAMES_V6.get(&NameV6Key { agent, addr: *self }) }
    }

    #[inline(always)]
    fn flow_addr(&self) -> [u8; 16] {
        *self
    }
}

/// The egress decision for an agent with host-name rules:
/// 1. DNS (UDP/TCP 53) and DNS over TLS (TCP 853) may only go to a resolver in
///    `RESOLVERS`, whatever the rules say: the resolver is what keeps the learned
///    addresses honest.
/// 2. The static rules decide as for any agent when one matches.
/// 3. Otherwise an address the agent's resolver learned for an allowed name, unexpired,
///    whose rules allow the protocol and port, is allowed; a TCP connection to one of the
///    slot's TLS ports must then open with a ClientHello naming an allowed server ([`sni`]).
/// 4. Otherwise the agent's default.
#[inline(always)]
fn names<A: NameAddr>(
    ctx: &XdpContext,
    slot: u32,
    agent: u32,
    policy: &AgentPolicy,
    flow: &Flow<A>,
    rules: Option<&RuleSet>,
) -> Reason {
    let dport = match flow.l4 {
        L4::Port { dst, .. } => dst,
        _ => 0,
    };
    let dns = (dport == 53 && (flow.proto == IPPROTO_UDP || flow.proto == IPPROTO_TCP))
        || (dport == 853 && flow.proto == IPPROTO_TCP);
    if dns {
        // SAFETY: the value is not used, only its presence.
        return if unsafe { RESOLVERS.get(&flow.dst.resolver(dport)) }.is_some() {
            Reason::Allowed
        } else {
            Reason::DnsBypass
        };
    }
    if let Some(reason) = rule_verdict(rules, flow.proto, flow.l4) {
        return reason;
    }
    let default = if policy.flags & AGENT_DEFAULT_ALLOW != 0 {
        Reason::Allowed
    } else {
        Reason::EgressDenied
    };
    let (kind, sport, dport) = match flow.l4 {
        L4::Port { src, dst } => (L4_PORT, src, dst),
        L4::NoPorts => (L4_NO_PORTS, 0, 0),
        L4::Fragment => (L4_FRAGMENT, 0, 0),
        // Undecidable and link control were decided before the rules.
        _ => return Reason::Malformed,
    };
    let layout = ((flow.l3_off as u64) << 48)
        | ((flow.l4_off as u64) << 32)
        | ((flow.ip_end as u64 & 0xffff) << 16)
        | u64::from(A::FAMILY);
    let owner = (u64::from(slot) << 32) | u64::from(agent);
    let l4 =
        (kind << 48) | (u64::from(flow.proto) << 32) | (u64::from(sport) << 16) | u64::from(dport);
    // Two calls rather than one nesting the other: each global function's stack adds to
    // `enforce`'s on the call chain, and the BPF stack is 512 bytes for the whole chain.
    match learned_admission(ctx.ctx, layout, owner, l4) {
        LEARNED_ALLOWED => Reason::Allowed,
        LEARNED_TLS => match tls_admission(ctx.ctx, layout, owner, l4) {
            LEARNED_ALLOWED => Reason::Allowed,
            LEARNED_SNI_DENIED => Reason::SniDenied,
            _ => Reason::SniInvalid,
        },
        _ => default,
    }
}

/// [`learned_admission`]'s encoding of the transport layer kind.
const L4_PORT: u64 = 0;
const L4_NO_PORTS: u64 = 1;
const L4_FRAGMENT: u64 = 2;
/// [`learned_admission`]'s answers.
const LEARNED_NONE: u32 = 0;
const LEARNED_ALLOWED: u32 = 1;
const LEARNED_SNI_DENIED: u32 = 2;
const LEARNED_SNI_INVALID: u32 = 3;
const LEARNED_TLS: u32 = 4;

/// Whether a learned address admits the packet: a BPF *global* function, verified once on
/// its own rather than along every path of `enforce` that reaches it (inlined in both
/// families' paths, it and the SNI check took `enforce` past the verifier's budget).
/// Global functions take the context and scalars only, so the facts come packed: `layout`
/// = IP header offset << 48 | transport offset << 32 | IP end << 16 | family (4 or 6),
/// `owner` = slot << 32 | agent, `l4` = kind << 48 | protocol << 32 | source port << 16 |
/// destination port. The addresses are read again from the packet. Returns
/// `LEARNED_NONE`, `LEARNED_ALLOWED`, or `LEARNED_TLS` when the connection must pass
/// [`tls_admission`] too. Linux 5.6 (global functions).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn learned_admission(ctx: *mut xdp_md, layout: u64, owner: u64, l4: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let Some(p) = Packed::new(layout, owner, l4) else {
        return LEARNED_NONE;
    };
    let found = if p.family == 4 {
        read::<4>(&ctx, p.l3_off + 16).and_then(|dst| learned(&p, dst))
    } else {
        read::<16>(&ctx, p.l3_off + 24).and_then(|dst| learned(&p, dst))
    };
    match found {
        Some(true) => LEARNED_TLS,
        Some(false) => LEARNED_ALLOWED,
        None => LEARNED_NONE,
    }
}

/// The SNI check of a connection a learned address admitted ([`sni`]), as a global
/// function for the same reasons as [`learned_admission`], with the same arguments.
/// Returns `LEARNED_ALLOWED`, `LEARNED_SNI_DENIED` or `LEARNED_SNI_INVALID`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tls_admission(ctx: *mut xdp_md, layout: u64, owner: u64, l4: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let Some(p) = Packed::new(layout, owner, l4) else {
        return LEARNED_SNI_INVALID;
    };
    // One read at a time with an early return: a tuple of two `Option`s let LLVM carry an
    // undefined register into the key on the path where a read failed, which the
    // verifier rejects.
    let reason = if p.family == 4 {
        let Some(src) = read::<4>(&ctx, p.l3_off + 12) else {
            return LEARNED_SNI_INVALID;
        };
        let Some(dst) = read::<4>(&ctx, p.l3_off + 16) else {
            return LEARNED_SNI_INVALID;
        };
        sni(&ctx, &p, src.flow_addr(), dst.flow_addr())
    } else {
        let Some(src) = read::<16>(&ctx, p.l3_off + 8) else {
            return LEARNED_SNI_INVALID;
        };
        let Some(dst) = read::<16>(&ctx, p.l3_off + 24) else {
            return LEARNED_SNI_INVALID;
        };
        sni(&ctx, &p, src, dst)
    };
    match reason {
        Reason::Allowed => LEARNED_ALLOWED,
        Reason::SniDenied => LEARNED_SNI_DENIED,
        _ => LEARNED_SNI_INVALID,
    }
}

/// The facts [`names`] passes to the global functions, unpacked.
struct Packed {
    family: u64,
    l3_off: usize,
    l4_off: usize,
    ip_end: usize,
    slot: u32,
    agent: u32,
    proto: u8,
    l4: L4,
}

impl Packed {
    #[inline(always)]
    fn new(layout: u64, owner: u64, l4: u64) -> Option<Packed> {
        let sport = (l4 >> 16) as u16;
        let dport = l4 as u16;
        Some(Packed {
            family: layout & 0xff,
            // Offsets come from `enforce`, below MAX_OFFSET; the masks (no-ops for such
            // values) hand the verifier that bound directly, which it needs for packet
            // pointers: it knows nothing of a global function's arguments.
            l3_off: ((layout >> 48) & OFFSET_MASK) as usize,
            l4_off: ((layout >> 32) & OFFSET_MASK) as usize,
            ip_end: ((layout >> 16) & 0xffff) as usize,
            slot: (owner >> 32) as u32,
            agent: owner as u32,
            proto: (l4 >> 32) as u8,
            l4: match l4 >> 48 {
                L4_PORT => L4::Port {
                    src: sport,
                    dst: dport,
                },
                L4_NO_PORTS => L4::NoPorts,
                L4_FRAGMENT => L4::Fragment,
                _ => return None,
            },
        })
    }
}

/// Whether an unexpired learned entry for `dst` allows the packet: `None` if not, else
/// whether the connection must also pass the SNI check (TCP to one of the TLS ports).
#[inline(always)]
fn learned<A: NameAddr>(p: &Packed, dst: A) -> Option<bool> {
    let entry = dst.learned(p.agent)?;
    // The tick clock lags by at most a tick and never leads: an entry may outlive its TTL
    // and grace by that much, never fall short of it.
    if tick_now() >> TIME_SHIFT > entry.expires_ns {
        return None;
    }
    if rule_verdict(Some(&entry.rules), p.proto, p.l4) != Some(Reason::Allowed) {
        return None;
    }
    Some(match p.l4 {
        L4::Port { dst, .. } => p.proto == IPPROTO_TCP && is_tls_port(p.slot, dst),
        _ => false,
    })
}

/// Whether `port` is one of the slot's TLS ports.
#[inline(always)]
fn is_tls_port(slot: u32, port: u16) -> bool {
    let Some(tls) = TLS_PORTS.get(slot) else {
        return false;
    };
    for i in 0..MAX_TLS_PORTS {
        if tls.ports[i] != 0 && tls.ports[i] == port {
            return true;
        }
    }
    false
}

/// The SNI check of a TCP segment to a TLS port of a name-admitted address.
///
/// Segments without payload (the handshake, bare ACKs, FIN, RST) carry nothing and pass.
/// The first segment with payload must hold a TLS handshake record starting a ClientHello
/// whose `server_name` extension lies within this segment and names a host the agent may
/// reach on this port (exact, or under an allowed `*.` suffix); the connection is then
/// remembered in `FLOWS` and its later segments pass without parsing. Anything else is
/// dropped: not TLS (`sni_invalid`), no or unreadable server name (`sni_invalid`), an
/// `encrypted_client_hello` extension among those in the segment (`sni_invalid`: the name
/// that counts is hidden), a name not allowed (`sni_denied`). Retransmissions of a refused
/// ClientHello are refused again, so nothing of such a connection gets through.
#[inline(always)]
fn sni(ctx: &XdpContext, p: &Packed, src: [u8; 16], dst: [u8; 16]) -> Reason {
    let L4::Port {
        src: sport,
        dst: dport,
    } = p.l4
    else {
        return Reason::SniInvalid;
    };
    let key = FlowKey {
        agent: p.agent,
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        src,
        dst,
    };
    // TCP data offset: the high nibble of byte 12, in 32-bit words.
    let Some(b) = read::<2>(ctx, p.l4_off + 12) else {
        return Reason::SniInvalid;
    };
    let payload = p.l4_off + ((b[0] >> 4) as usize) * 4;
    let data_end = ctx.data_end() - ctx.data();
    let end = if p.ip_end < data_end {
        p.ip_end
    } else {
        data_end
    };
    if payload >= end {
        return Reason::Allowed;
    }
    // SAFETY: the value is not used, only its presence.
    if unsafe { FLOWS.get(&key) }.is_some() {
        return Reason::Allowed;
    }
    let reason = client_hello(ctx, p.slot, p.agent, dport, payload, end);
    if reason == Reason::Allowed {
        // Once per connection, not per packet. A full LRU evicts its oldest flow, whose
        // next segment is then refused: eviction can break a connection, not open one.
        let _ = FLOWS.insert(&key, &1, 0);
    }
    reason
}

/// Parses the ClientHello at `off` (payload of one segment, ending at `end`) and checks
/// its server name. Every read is bounds-checked against the packet by [`read`] and
/// against `end`, the payload's end.
#[inline(always)]
fn client_hello(
    ctx: &XdpContext,
    slot: u32,
    agent: u32,
    port: u16,
    off: usize,
    end: usize,
) -> Reason {
    // TLS record header (content type 22 = handshake, major version 3), then the
    // handshake header (type 1 = ClientHello, 24-bit length).
    let Some(h) = read::<9>(ctx, off) else {
        return Reason::SniInvalid;
    };
    if h[0] != 22 || h[1] != 3 || h[5] != 1 {
        return Reason::SniInvalid;
    }
    // legacy_version (2) and random (32), then the session id.
    let mut p = off + 9 + 34;
    let Some(sid) = read::<2>(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 1 + sid[0] as usize;
    let Some(cs) = read_be16(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 2 + cs as usize;
    let Some(comp) = read::<2>(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 1 + comp[0] as usize;
    let Some(ext_len) = read_be16(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 2;
    let ext_end = p + ext_len as usize;
    let ext_end = if ext_end < end { ext_end } else { end };
    let mut name_off = 0;
    let mut name_len = 0;
    // Constant trip count for the verifier; `p` stays below MAX_OFFSET because `read`
    // refuses anything beyond it.
    for _ in 0..MAX_TLS_EXTENSIONS {
        if p + 4 > ext_end {
            break;
        }
        let Some(e) = read::<4>(ctx, p) else {
            break;
        };
        let kind = u16::from_be_bytes([e[0], e[1]]);
        let len = u16::from_be_bytes([e[2], e[3]]) as usize;
        if kind == TLS_EXT_ECH {
            return Reason::SniInvalid;
        }
        if kind == 0 {
            // server_name: list length (2), name type (1, 0 = host_name), name length (2).
            let Some(n) = read::<5>(ctx, p + 4) else {
                return Reason::SniInvalid;
            };
            if n[2] != 0 {
                return Reason::SniInvalid;
            }
            name_off = p + 9;
            name_len = u16::from_be_bytes([n[3], n[4]]) as usize;
        }
        p += 4 + len;
    }
    if name_len == 0 || name_len > SNI_NAME_LEN - 1 || name_off + name_len > end {
        return Reason::SniInvalid;
    }
    let span = ((name_off as u64) << 32) | name_len as u64;
    let owner = (u64::from(slot) << 32) | u64::from(agent);
    let code = server_name_lookup(ctx.ctx, span, owner, u64::from(port));
    if code == Reason::Allowed as u32 {
        Reason::Allowed
    } else if code == Reason::SniDenied as u32 {
        Reason::SniDenied
    } else {
        Reason::SniInvalid
    }
}

/// Looks the server name at `off` (`len` bytes, 1..=255, inside the packet) up in `SNI`:
/// first exactly, then every suffix that starts at a dot, longest first, as a wildcard.
///
/// The key holds the name right-aligned (see [`SniKey`]), so a suffix's key is the same
/// buffer with the bytes before it zeroed: one left-to-right walk zeroes as it goes and
/// looks up at each dot, without copying.
///
/// A BPF global function too, verified once (`span` = offset << 32 | length, `owner` =
/// slot << 32 | agent). Its loops have a constant trip count and never compare the index
/// with the unknown length: such a comparison gives the verifier a new range of the length
/// in every iteration, so no state prunes another and the paths multiply past its budget.
/// Where a byte belongs to the name is computed with arithmetic instead.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn server_name_lookup(ctx: *mut xdp_md, span: u64, owner: u64, port: u64) -> u32 {
    let Some(scratch) = SNI_SCRATCH.get_ptr_mut(0) else {
        return Reason::SniInvalid as u32;
    };
    // SAFETY: per-CPU map value, used only by this CPU for the rest of this run.
    let scratch = unsafe { &mut *scratch };
    // The caller passes a length of 1..=255. ARG_CONST_SIZE must be non-zero and fit the
    // buffer, and the verifier must see that: Linux 6.1 learns nothing from `len == 0`
    // being false (the `!=` refinement came later), so the bound [1, 256] is built by
    // arithmetic, the identity on 1..=255 (0 would become 256, which the caller never
    // sends and which still fits `raw`).
    let len = (((span as u32).wrapping_sub(1)) & 0xff) + 1;
    let off = ((span >> 32) & 0xffff) as u32;
    // SAFETY: `raw` is SNI_NAME_LEN (256) bytes of map value, len <= 255; the helper
    // (Linux 5.18) checks the packet range itself.
    let loaded = unsafe { bpf_xdp_load_bytes(ctx, off, scratch.raw.as_mut_ptr().cast(), len) };
    if loaded != 0 {
        return Reason::SniInvalid as u32;
    }
    scratch.key.slot = (owner >> 32) as u32;
    scratch.key.agent = owner as u32;
    scratch.key.kind = SNI_EXACT;
    scratch.key._pad = 0;
    let len = len as usize;
    // Right-align and lower-case: key byte i is raw byte i + len - 256 when i + len >= 256
    // (bit 8 of i + len), else padding. A zero byte inside the name would alias the
    // padding, so it makes the name invalid; other bytes outside host-name characters
    // simply match no allowed name.
    let mut zero_in_name = 0u8;
    for i in 0..SNI_NAME_LEN {
        let inside = (((i + len) >> 8) & 1) as u8;
        let b = scratch.raw[(i + len) & 0xff] & 0u8.wrapping_sub(inside);
        let upper = (b.wrapping_sub(b'A') < 26) as u8;
        zero_in_name |= inside & (b == 0) as u8;
        scratch.key.name[i] = b | (upper << 5);
    }
    if zero_in_name != 0 {
        return Reason::SniInvalid as u32;
    }
    let port = port as u16;
    if allows(&scratch.key, port) {
        return Reason::Allowed as u32;
    }
    scratch.key.kind = SNI_WILDCARD;
    // The padding holds no dots, so only the name's own dots start a lookup.
    for i in 0..SNI_NAME_LEN {
        if scratch.key.name[i] == b'.' && allows(&scratch.key, port) {
            return Reason::Allowed as u32;
        }
        scratch.key.name[i] = 0;
    }
    Reason::SniDenied as u32
}

/// Whether `SNI` holds `key` with a rule allowing TCP to `port`.
#[inline(always)]
fn allows(key: &SniKey, port: u16) -> bool {
    // SAFETY: the value is only read, during this program run.
    let rules = unsafe { SNI.get(key) };
    rules.is_some()
        && rule_verdict(rules, IPPROTO_TCP, L4::Port { src: 0, dst: port }) == Some(Reason::Allowed)
}

/// The agent's policy in this slot, if `agent` is a configured agent.
#[inline(always)]
fn agent_policy(slot: u32, stride: u32, agent: u32) -> Option<&'static AgentPolicy> {
    if agent == UNKNOWN_AGENT {
        return None;
    }
    let policy = AGENTS.get(slot * stride + agent)?;
    if policy.flags & AGENT_ACTIVE == 0 {
        return None;
    }
    Some(policy)
}

/// Traffic from no known agent follows the slot's default.
#[inline(always)]
fn unknown<F: AuditTuple>(
    ctx: &XdpContext,
    slot_cfg: &SlotConfig,
    len: u64,
    flow: &F,
) -> Result<u32, ()> {
    if slot_cfg.flags & SLOT_UNKNOWN_DROP != 0 {
        count(UNKNOWN_AGENT, Reason::UnknownDrop, len);
        if admit(UNKNOWN_AGENT) {
            audit(ctx, UNKNOWN_AGENT, Reason::UnknownDrop, len, flow);
        }
        Ok(xdp_action::XDP_DROP)
    } else {
        count(UNKNOWN_AGENT, Reason::UnknownPass, len);
        Ok(xdp_action::XDP_PASS)
    }
}

/// A frame whose IP header could not be read: only the interface can name the agent, and
/// a restricted agent gets no benefit of the doubt.
#[inline(always)]
fn undecidable(
    ctx: &XdpContext,
    slot: u32,
    stride: u32,
    slot_cfg: &SlotConfig,
    agent: u32,
    len: u64,
) -> Result<u32, ()> {
    let Some(policy) = agent_policy(slot, stride, agent) else {
        return unknown(ctx, slot_cfg, len, &NoTuple);
    };
    let verdict = if policy.flags & AGENT_RESTRICTED != 0 {
        Reason::Malformed
    } else {
        Reason::Allowed
    };
    finish(ctx, agent, policy, verdict, len, &NoTuple)
}

/// Walks a destination's rules: the first rule whose protocol and ports match decides; no
/// match falls back to the agent's default.
#[inline(always)]
fn egress(rules: Option<&RuleSet>, proto: u8, l4: L4, flags: u32) -> Reason {
    match rule_verdict(rules, proto, l4) {
        Some(reason) => reason,
        None if flags & AGENT_DEFAULT_ALLOW != 0 => Reason::Allowed,
        None => Reason::EgressDenied,
    }
}

/// The verdict of the first of `rules` whose protocol and ports match, `None` if none does.
#[inline(always)]
fn rule_verdict(rules: Option<&RuleSet>, proto: u8, l4: L4) -> Option<Reason> {
    if l4 == L4::Undecidable {
        return Some(Reason::Malformed);
    }
    if let Some(rules) = rules {
        let n = rules.len as usize;
        for i in 0..MAX_RULES_PER_PREFIX {
            if i >= n {
                break;
            }
            let r = &rules.rules[i];
            if r.proto != PROTO_ANY && r.proto != proto {
                continue;
            }
            match l4 {
                L4::Port { dst: port, .. } => {
                    if port < r.port_lo || port > r.port_hi {
                        continue;
                    }
                }
                L4::NoPorts => {
                    if !r.any_port() {
                        continue;
                    }
                }
                // The first rule for this protocol depends on the port, which a non-first
                // fragment does not carry: no verdict is safe but a drop.
                L4::Fragment => {
                    if !r.any_port() {
                        return Some(Reason::Fragment);
                    }
                }
                L4::Undecidable => return Some(Reason::Malformed),
                L4::LinkControl => return Some(Reason::LinkControl),
            }
            return Some(if r.action == ACTION_ALLOW {
                Reason::Allowed
            } else {
                Reason::EgressDenied
            });
        }
    }
    None
}

/// Applies the rate limit to packets the egress check allowed, turns would-drops into
/// passes for monitor-mode agents, counts, reports drops and would-drops to the audit
/// trail, and returns the XDP action.
#[inline(always)]
fn finish<F: AuditTuple>(
    ctx: &XdpContext,
    agent: u32,
    policy: &AgentPolicy,
    verdict: Reason,
    len: u64,
    flow: &F,
) -> Result<u32, ()> {
    let mut reason = verdict;
    if reason == Reason::Allowed {
        reason = rate_limit(agent, policy, len)?;
    }
    if reason.is_drop() && policy.flags & AGENT_MONITOR != 0 {
        reason = reason.monitored();
    }
    count(agent, reason, len);
    // A passed packet pays this one test of the reason and nothing else: no lookup, no
    // clock read, no ring access.
    if reason.is_audited() {
        if admit(agent) {
            audit(ctx, agent, reason, len, flow);
        }
    }
    Ok(if reason.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    })
}

/// GCRA over both limits. The packets limiter is charged first; if the bytes limiter then
/// refuses, the packet charge is refunded, so a dropped packet costs nothing.
#[inline(always)]
fn rate_limit(agent: u32, policy: &AgentPolicy, len: u64) -> Result<Reason, ()> {
    if policy.packet_cost == 0 && policy.byte_rate == 0 {
        return Ok(Reason::Allowed);
    }
    let bucket = BUCKETS.get_ptr_mut(agent).ok_or(())?;
    // Both clocks are CLOCK_MONOTONIC; the tick clock lags by up to a tick and costs a
    // fraction of the precise one. The compile step allows it only when every burst of the
    // agent spans several ticks, so the lag never costs admitted packets.
    let now = if policy.flags & AGENT_COARSE_CLOCK != 0 {
        tick_now()
    } else {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() << TIME_SHIFT }
    };
    // SAFETY: `bucket` points into an array map value, valid for the program's run; the
    // fields are only accessed atomically (or with a racy read that the CAS validates).
    let packet_tat = unsafe { ptr::addr_of_mut!((*bucket).packet_tat) };
    let byte_tat = unsafe { ptr::addr_of_mut!((*bucket).byte_tat) };

    if policy.packet_cost != 0
        && !gcra(packet_tat, now, policy.packet_cost, policy.packet_tolerance)
    {
        return Ok(Reason::RateLimitedPackets);
    }
    if policy.byte_rate != 0 {
        let cost = len * UNITS_PER_SEC / policy.byte_rate;
        if !gcra(byte_tat, now, cost, policy.byte_tolerance) {
            if policy.packet_cost != 0 {
                // SAFETY: atomic add on a valid, 8-byte aligned u64 in a map value.
                unsafe {
                    core::intrinsics::atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(
                        packet_tat,
                        policy.packet_cost,
                    );
                }
            }
            return Ok(Reason::RateLimitedBytes);
        }
    }
    Ok(Reason::Allowed)
}

/// One GCRA admission on the theoretical arrival time at `tat`: admit when the new arrival
/// time stays within `tolerance` of `now`, and publish it with a 64-bit compare-and-swap so
/// every CPU shares one limiter.
#[inline(always)]
fn gcra(tat: *mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: valid, aligned u64 in a map value. A torn read is impossible for an aligned
        // 64-bit load; a stale one fails the CAS below and is retried.
        let old = unsafe { ptr::read_volatile(tat) };
        let base = if old > now { old } else { now };
        let new = base + cost;
        if new - now > tolerance {
            return false;
        }
        // SAFETY: as above; BPF_CMPXCHG (Linux 5.12).
        let (_, swapped) = unsafe {
            core::intrinsics::atomic_cxchg::<
                u64,
                { AtomicOrdering::SeqCst },
                { AtomicOrdering::SeqCst },
            >(tat, old, new)
        };
        if swapped {
            return true;
        }
    }
    false
}

/// CLOCK_MONOTONIC in limiter time units at a tick's resolution (see [`Clock`]): one inlined
/// load of `jiffies` (`bpf_jiffies64`, Linux 5.5) scaled by the daemon's measurement, or the
/// coarse clock helper (Linux 5.11) when nothing was measured.
#[inline(always)]
fn tick_now() -> u64 {
    if let Some(clock) = CLOCK.get(0)
        && clock.tick_units != 0
    {
        // SAFETY: helper without preconditions.
        let jiffies = unsafe { bpf_jiffies64() };
        return jiffies
            .wrapping_mul(clock.tick_units)
            .wrapping_sub(clock.offset);
    }
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_coarse_ns() << TIME_SHIFT }
}

/// The addresses and ports an audit event records: implemented by both families' flows and
/// by [`NoTuple`] for frames whose IP header could not be read. Monomorphised and inlined,
/// so each call site copies exactly its family's bytes.
trait AuditTuple {
    /// Fills `family`, `proto`, the addresses and the ports of `event`.
    fn fill(&self, event: &mut AuditEvent);
}

/// Ports of a flow for an audit event: 0 when the protocol has none or they were not read.
#[inline(always)]
fn ports(l4: L4) -> (u16, u16) {
    match l4 {
        L4::Port { src, dst } => (src, dst),
        _ => (0, 0),
    }
}

impl AuditTuple for Flow<[u8; 4]> {
    #[inline(always)]
    fn fill(&self, event: &mut AuditEvent) {
        event.family = AUDIT_FAMILY_V4;
        event.proto = self.proto;
        // IPv4 fills the first 4 bytes; the rest stays zero (see AuditEvent).
        event.src[..4].copy_from_slice(&self.src);
        event.dst[..4].copy_from_slice(&self.dst);
        (event.src_port, event.dst_port) = ports(self.l4);
    }
}

impl AuditTuple for Flow<[u8; 16]> {
    #[inline(always)]
    fn fill(&self, event: &mut AuditEvent) {
        event.family = AUDIT_FAMILY_V6;
        event.proto = self.proto;
        event.src = self.src;
        event.dst = self.dst;
        (event.src_port, event.dst_port) = ports(self.l4);
    }
}

/// No IP header could be read: the event carries agent, reason, interface and length only.
struct NoTuple;

impl AuditTuple for NoTuple {
    #[inline(always)]
    fn fill(&self, event: &mut AuditEvent) {
        event.family = AUDIT_FAMILY_NONE;
    }
}

/// Reports a drop or monitor-mode would-drop that the agent's audit budget admitted
/// ([`admit`], checked first: a flood of drops is mostly suppressed events, and those should
/// not pay for building a record) to the `AUDIT` ring buffer. Never silent: an event that
/// finds the ring full counts as `lost` per agent in `AUDIT_STATS`.
///
/// Not inlined: the event is built on this function's stack, which the packet path's frame
/// then does not have to hold (with it inlined at each call site, the program exceeded
/// the 512-byte BPF stack). One subprogram per packet shape, called only for admitted
/// events; it copies the packet's facts into the event and [`emit`] does the rest.
#[inline(never)]
fn audit<F: AuditTuple>(ctx: &XdpContext, agent: u32, reason: Reason, len: u64, flow: &F) {
    // Every byte is set, padding included: ring memory is reused, and a field left
    // unwritten would show user space an older record's bytes.
    let mut event = AuditEvent {
        time_ns: 0,
        generation: 0,
        agent,
        reason: reason as u32,
        ifindex: ctx.ingress_ifindex() as u32,
        len: len as u32,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        family: AUDIT_FAMILY_NONE,
        proto: 0,
        _pad: [0; 2],
    };
    flow.fill(&mut event);
    emit(&event);
}

/// Limiter, ring reservation and submission, shared by every call site. Not inlined, on
/// purpose: six call sites (two decisions times three packet shapes) each inlining the
/// limiter's unrolled CAS loop doubled the program, and the larger body stopped LLVM from
/// inlining the program into its entry point, which put a BPF-to-BPF call on the path of
/// every packet. As a subprogram it exists once and costs its call only on the audit path;
/// `event` points into the caller's stack frame, which the verifier follows across the call.
#[inline(never)]
fn emit(event: &AuditEvent) {
    // The verifier requires the lookup's NULL check before any access; it only fails for an
    // agent id beyond the map (which the loader sizes like BUCKETS), so nothing is counted.
    let Some(stats) = AUDIT_STATS.get_ptr_mut(event.agent) else {
        return;
    };
    // The typed reserve asks for a constant size (size_of::<AuditEvent>()), the only form
    // the verifier accepts for bpf_ringbuf_reserve (Linux 5.8). From here to `submit` there
    // is no early return: the verifier rejects a path that leaks a reservation.
    let Some(mut entry) = AUDIT.reserve::<AuditEvent>(0) else {
        // SAFETY: per-CPU map value, written only by this CPU while the program runs.
        unsafe { (*stats).lost += 1 };
        return;
    };
    let mut out = *event;
    // The precise clock for the timestamp: only admitted events (at most the audit rate
    // per agent) pay for it; the limiter itself used the coarse clock.
    // SAFETY: helper without preconditions.
    out.time_ns = unsafe { bpf_ktime_get_ns() };
    // Read here rather than carried from the top of `try_enforce`, so passed packets pay
    // nothing for it.
    out.generation = STATE.get(0).map_or(0, |s| s.generation);
    entry.write(out);
    entry.submit(0);
}

/// Charges the agent's audit budget; a refused event is counted as suppressed.
///
/// The budget is GCRA on the agent's `AUDIT_LIMITS` arrival time with the shared
/// `AUDIT_CONFIG` parameters, on the tick clock ([`tick_now`]), which lags by up to a tick;
/// with the default budget (100 events/s, burst 100, a one-second burst) that is far inside
/// the burst, and the audit budget is a flood guard, not a contract.
///
/// Inlined up to the first read of the arrival time: in a flood of drops nearly every call
/// ends there, refused, at the cost of three inlined array lookups and a load. Only an event
/// the budget may admit calls [`audit_charge`].
#[inline(always)]
fn admit(agent: u32) -> bool {
    let Some(stats) = AUDIT_STATS.get_ptr_mut(agent) else {
        return false;
    };
    // Missing config or limiter entry, or events turned off: refuse, counted as suppressed.
    if let Some(cfg) = AUDIT_CONFIG.get(0)
        && cfg.event_cost != 0
        && let Some(tat) = AUDIT_LIMITS.get_ptr_mut(agent)
    {
        let now = tick_now();
        // SAFETY: valid, aligned u64 in a map value; a stale read is settled by the CAS.
        let old = unsafe { ptr::read_volatile(tat) };
        let base = if old > now { old } else { now };
        if base + cfg.event_cost - now <= cfg.event_tolerance
            && audit_charge(tat, now, cfg.event_cost, cfg.event_tolerance)
        {
            return true;
        }
    }
    // SAFETY: per-CPU map value, written only by this CPU while the program runs.
    unsafe { (*stats).suppressed += 1 };
    false
}

/// The compare-and-swap half of [`admit`]. Not inlined: its unrolled CAS loop exists once
/// instead of at each of the six audit call sites (two decisions times three packet
/// shapes), which kept the program small enough for LLVM to inline it into its entry point.
#[inline(never)]
fn audit_charge(tat: *mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
    gcra(tat, now, cost, tolerance)
}

/// Adds one packet of `len` bytes to the (agent, reason) counter, in place.
#[inline(always)]
fn count(agent: u32, reason: Reason, len: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(agent, reason)) {
        // SAFETY: per-CPU map value; XDP does not migrate between CPUs mid-program, so
        // nothing else writes this CPU's copy concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the BPF verifier rejects any program that could reach this point.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
