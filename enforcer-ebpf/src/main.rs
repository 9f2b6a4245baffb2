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
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, generated::bpf_ktime_get_coarse_ns},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use enforcer_common::{
    ACTION_ALLOW, AGENT_ACTIVE, AGENT_COARSE_CLOCK, AGENT_DEFAULT_ALLOW, AGENT_DST_LPM_V4,
    AGENT_DST_LPM_V6, AGENT_MONITOR, AGENT_RESTRICTED, AUDIT_FAMILY_NONE, AUDIT_FAMILY_V4,
    AUDIT_FAMILY_V6, AgentPolicy, AuditConfig, AuditEvent, AuditStats, Bucket, Counter, DstV4Key,
    DstV6Key, HostV4Key, HostV6Key, IfaceKey, LpmV4, LpmV6, MAX_DST_PROBES, MAX_IPV6_EXT_HEADERS,
    MAX_RULES_PER_PREFIX, MAX_VLAN_TAGS, OWNER_BITS, PROTO_ANY, Reason, RuleSet, SLOT_HAS_IFACES,
    SLOT_SRC_LPM_V4, SLOT_SRC_LPM_V6, SLOT_UNKNOWN_DROP, SlotConfig, State, TIME_SHIFT,
    UNITS_PER_SEC, UNKNOWN_AGENT, counter_index, owner, owner_word,
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
            Some(flow) => decide_v4(ctx, slot, stride, slot_cfg, agent, &flow, len),
            None => undecidable(ctx, slot, stride, slot_cfg, agent, len),
        },
        ETH_P_IPV6 => match parse_v6(ctx, off) {
            Some(flow) => decide_v6(ctx, slot, stride, slot_cfg, agent, &flow, len),
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
    let mut next = h[6];
    let hop_limit = h[7];
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
    })
}

#[inline(always)]
fn decide_v4(
    ctx: &XdpContext,
    slot: u32,
    stride: u32,
    slot_cfg: &SlotConfig,
    mut agent: u32,
    flow: &Flow<[u8; 4]>,
    len: u64,
) -> Result<u32, ()> {
    if agent == UNKNOWN_AGENT {
        let key = HostV4Key {
            slot,
            addr: flow.src,
        };
        // SAFETY: plain u32 value, copied out.
        if let Some(a) = unsafe { SRC_HOST_V4.get(&key) } {
            agent = *a;
        } else if slot_cfg.flags & SLOT_SRC_LPM_V4 != 0 {
            let key = Key::new(
                OWNER_BITS + 32,
                LpmV4 {
                    owner: slot.to_be_bytes(),
                    addr: flow.src,
                },
            );
            if let Some(a) = SRC_V4.get(&key) {
                agent = *a;
            }
        }
    }
    if flow.l4 == L4::LinkControl {
        count(agent, Reason::LinkControl, len);
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(policy) = agent_policy(slot, stride, agent) else {
        return unknown(ctx, slot_cfg, len, flow);
    };
    let verdict = if policy.flags & AGENT_RESTRICTED != 0 {
        egress(
            dst_v4(slot, agent, policy, flow.dst),
            flow.proto,
            flow.l4,
            policy.flags,
        )
    } else {
        Reason::Allowed
    };
    finish(ctx, agent, policy, verdict, len, flow)
}

#[inline(always)]
fn decide_v6(
    ctx: &XdpContext,
    slot: u32,
    stride: u32,
    slot_cfg: &SlotConfig,
    mut agent: u32,
    flow: &Flow<[u8; 16]>,
    len: u64,
) -> Result<u32, ()> {
    if agent == UNKNOWN_AGENT {
        let key = HostV6Key {
            slot,
            addr: flow.src,
        };
        // SAFETY: plain u32 value, copied out.
        if let Some(a) = unsafe { SRC_HOST_V6.get(&key) } {
            agent = *a;
        } else if slot_cfg.flags & SLOT_SRC_LPM_V6 != 0 {
            let key = Key::new(
                OWNER_BITS + 128,
                LpmV6 {
                    owner: slot.to_be_bytes(),
                    addr: flow.src,
                },
            );
            if let Some(a) = SRC_V6.get(&key) {
                agent = *a;
            }
        }
    }
    if flow.l4 == L4::LinkControl {
        count(agent, Reason::LinkControl, len);
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(policy) = agent_policy(slot, stride, agent) else {
        return unknown(ctx, slot_cfg, len, flow);
    };
    let verdict = if policy.flags & AGENT_RESTRICTED != 0 {
        egress(
            dst_v6(slot, agent, policy, flow.dst),
            flow.proto,
            flow.l4,
            policy.flags,
        )
    } else {
        Reason::Allowed
    };
    finish(ctx, agent, policy, verdict, len, flow)
}

/// The rules of the longest of the agent's IPv4 destination prefixes that contains `dst`.
/// A few hash probes (one per prefix length the agent uses, longest first) cost less than
/// an LPM walk whose depth grows with every agent's entries; agents with many lengths use
/// the LPM trie.
#[inline(always)]
fn dst_v4(slot: u32, agent: u32, policy: &AgentPolicy, dst: [u8; 4]) -> Option<&'static RuleSet> {
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
    for i in 0..MAX_DST_PROBES {
        if i >= n {
            break;
        }
        let len = u32::from(policy.dst_lens_v4[i]);
        // len is 0..=32 (compile checks); shifting a u32 by 32 is not defined, so /0 is
        // handled apart.
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << ((32 - len) & 31)
        };
        key.len = len;
        key.addr = (addr & mask).to_be_bytes();
        // SAFETY: the value is only read, during this program run.
        if let Some(rules) = unsafe { DST_HASH_V4.get(&key) } {
            return Some(rules);
        }
    }
    None
}

/// IPv6 form of [`dst_v4`].
#[inline(always)]
fn dst_v6(slot: u32, agent: u32, policy: &AgentPolicy, dst: [u8; 16]) -> Option<&'static RuleSet> {
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
    let mut key = DstV6Key {
        owner: owner_word(slot, agent),
        len: 0,
        addr: [0; 16],
    };
    let n = policy.dst_lens_v6_count as usize;
    for i in 0..MAX_DST_PROBES {
        if i >= n {
            break;
        }
        let len = u32::from(policy.dst_lens_v6[i]);
        let (mask_hi, mask_lo) = if len == 0 {
            (0, 0)
        } else if len <= 64 {
            (u64::MAX << ((64 - len) & 63), 0)
        } else {
            (u64::MAX, u64::MAX << ((128 - len) & 63))
        };
        key.len = len;
        let (h, l) = ((hi & mask_hi).to_be_bytes(), (lo & mask_lo).to_be_bytes());
        key.addr = [
            h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5],
            l[6], l[7],
        ];
        // SAFETY: the value is only read, during this program run.
        if let Some(rules) = unsafe { DST_HASH_V6.get(&key) } {
            return Some(rules);
        }
    }
    None
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
        audit(ctx, UNKNOWN_AGENT, Reason::UnknownDrop, len, flow);
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
    if l4 == L4::Undecidable {
        return Reason::Malformed;
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
                        return Reason::Fragment;
                    }
                }
                L4::Undecidable => return Reason::Malformed,
                L4::LinkControl => return Reason::LinkControl,
            }
            return if r.action == ACTION_ALLOW {
                Reason::Allowed
            } else {
                Reason::EgressDenied
            };
        }
    }
    if flags & AGENT_DEFAULT_ALLOW != 0 {
        Reason::Allowed
    } else {
        Reason::EgressDenied
    }
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
        audit(ctx, agent, reason, len, flow);
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
    // Both clocks are CLOCK_MONOTONIC; the coarse one (Linux 5.11) lags by up to a tick and
    // costs a fraction of the precise one. The compile step allows it only when every burst
    // of the agent spans several ticks, so the lag never costs admitted packets.
    // SAFETY: helpers without preconditions.
    let ns = if policy.flags & AGENT_COARSE_CLOCK != 0 {
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    let now = ns << TIME_SHIFT;
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

/// Reports a drop or monitor-mode would-drop to the `AUDIT` ring buffer, if the agent's
/// audit limiter admits it. Never silent: a refused event counts as `suppressed`, an
/// admitted one that finds the ring full as `lost`, both per agent in `AUDIT_STATS`.
///
/// Runs only for audited reasons, so none of its work touches the path of a passed packet.
/// This inlined half copies the packet's facts into an event on the stack; the shared
/// half, [`emit`], does the rest.
#[inline(always)]
fn audit<F: AuditTuple>(ctx: &XdpContext, agent: u32, reason: Reason, len: u64, flow: &F) {
    // The budget first: a flood of drops is mostly suppressed events, and those should not
    // pay for building a record (the benchmark showed ~60 ns per drop when they did).
    if !admit(agent) {
        return;
    }
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

/// Charges the agent's audit budget; a refused event is counted as suppressed. Not
/// inlined for the same reason as [`emit`]: the limiter's unrolled CAS loop exists once.
#[inline(never)]
fn admit(agent: u32) -> bool {
    let Some(stats) = AUDIT_STATS.get_ptr_mut(agent) else {
        return false;
    };
    if audit_admit(agent) {
        return true;
    }
    // SAFETY: per-CPU map value, written only by this CPU while the program runs.
    unsafe { (*stats).suppressed += 1 };
    false
}

/// The agent's audit limiter: GCRA on its `AUDIT_LIMITS` arrival time with the shared
/// `AUDIT_CONFIG` parameters, on the coarse clock (Linux 5.11). The coarse clock lags by up
/// to a tick; with the default budget (100 events/s, burst 100, a one-second burst) that is
/// far inside the burst, and the audit budget is a flood guard, not a contract.
#[inline(always)]
fn audit_admit(agent: u32) -> bool {
    // Missing config or limiter entry: refuse (the caller counts it as suppressed).
    let Some(cfg) = AUDIT_CONFIG.get(0) else {
        return false;
    };
    if cfg.event_cost == 0 {
        return false;
    }
    let Some(tat) = AUDIT_LIMITS.get_ptr_mut(agent) else {
        return false;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() } << TIME_SHIFT;
    gcra(tat, now, cfg.event_cost, cfg.event_tolerance)
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
