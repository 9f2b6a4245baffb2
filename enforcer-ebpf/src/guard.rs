//! Stage 5a, guards against runaway agents: the circuit breaker, limits shared by every agent
//! that reaches one destination group, the new-connection rate, and quotas over hours and
//! days, around the agent's own packet and byte limiters (see [`guard_decide`]).
//!
//! Only agents whose policy has `AGENT_GUARDED` come here, through one BPF global function,
//! so agents without guards pay one flag test, and the verifier walks the guards once rather
//! than along every path of the programs that call them.

use core::{intrinsics::AtomicOrdering, ptr};

use aya_ebpf::helpers::bpf_ktime_get_ns;
use enforcer_common::{
    AUDIT_FAMILY_NONE, AgentPolicy, AuditEvent, RULE_ALWAYS, RULE_GROUP_MASK, Reason, TIME_SHIFT,
    guard::{
        BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_MAX_LEVEL, BREAKER_OPEN, EVENT_BREAKER_CLOSED,
        EVENT_BREAKER_HALF_OPEN, EVENT_BREAKER_OPENED, EVENT_QUOTA_EXHAUSTED, GUARD_BREAKER,
        GUARD_BREAKER_REJECT, GUARD_QUOTA, GuardPolicy, GuardState, QUOTA_CONNS_DAY,
        QUOTA_CONNS_HOUR, QUOTA_EXHAUSTED, QUOTA_MAX, QUOTA_WINDOW_SECS, QUOTA_WINDOW_SHIFT,
        QUOTAS, breaker_parts, breaker_word, quota_window,
    },
};

use crate::{
    audit::NoTuple,
    context::{Packet, Wire},
    egress::match_rules,
    identify::Family,
    limits::*,
    maps::*,
    parse::{Flow, IPPROTO_TCP, L4Kind, peek},
};

/// What the guards read of a packet beyond the hand-off, implemented by both families'
/// flows and by [`NoTuple`] for frames whose headers could not be read.
pub(crate) trait GuardFacts {
    /// Whether the packet opens a TCP connection (SYN without ACK): what connection limits
    /// and quotas count.
    fn opens_connection<C: Packet>(&self, ctx: &C) -> bool;

    /// The guard bits of the agent's rule that matches the packet (`PortRule::guard`):
    /// its shared group and whether it passes an open breaker. Looked up again here rather
    /// than carried from the egress stage, so that stage stays as it was for every agent
    /// without guards. Host-name rules (learned addresses, server names) carry none.
    fn rule_guard(&self, slot: u32, agent: u32, policy: &AgentPolicy) -> u16;
}

impl<A: Family> GuardFacts for Flow<A> {
    #[inline(always)]
    fn opens_connection<C: Packet>(&self, ctx: &C) -> bool {
        // Data offset and flags are bytes 12 and 13 of the header.
        self.proto == IPPROTO_TCP
            && self.l4.kind == L4Kind::Port
            && peek::<C, 2>(ctx, self.l4_off + 12).is_some_and(|b| b[1] & 0x12 == 0x02)
    }

    #[inline(always)]
    fn rule_guard(&self, slot: u32, agent: u32, policy: &AgentPolicy) -> u16 {
        let rules = self.dst.rules(slot, agent, policy, TABLES.get(slot));
        match_rules(rules, self.proto, self.l4, |_| 0, |r| r.guard).unwrap_or(0)
    }
}

impl GuardFacts for NoTuple {
    #[inline(always)]
    fn opens_connection<C: Packet>(&self, _ctx: &C) -> bool {
        false
    }

    #[inline(always)]
    fn rule_guard(&self, _slot: u32, _agent: u32, _policy: &AgentPolicy) -> u16 {
        0
    }
}

/// [`guard_decide`]'s `facts`: the verdict so far in the low 8 bits, then these flags, then
/// the destination group in bits 16..32 and the slot in bit 32.
pub(crate) const FACT_REJECT: u64 = 1 << 8;
/// The packet opens a connection: TCP SYN without ACK.
pub(crate) const FACT_SYN: u64 = 1 << 9;
/// The agent is in monitor mode.
pub(crate) const FACT_MONITOR: u64 = 1 << 10;
/// The matching rule is always allowed: an open breaker lets it through (the resolver).
pub(crate) const FACT_EXEMPT: u64 = 1 << 11;
/// [`guard_decide`]'s answer: the reason in the low 8 bits, and this bit when the drop is
/// to be answered with a reject.
pub(crate) const OUT_REJECT: u32 = 1 << 8;

/// Packs what [`guard_decide`] needs to know of the packet.
#[inline(always)]
pub(crate) fn facts(
    verdict: Reason,
    reject: bool,
    syn: bool,
    monitor: bool,
    rule_guard: u16,
    slot: u32,
) -> u64 {
    (verdict as u64)
        | if reject { FACT_REJECT } else { 0 }
        | if syn { FACT_SYN } else { 0 }
        | if monitor { FACT_MONITOR } else { 0 }
        | if rule_guard & RULE_ALWAYS != 0 {
            FACT_EXEMPT
        } else {
            0
        }
        | (u64::from(rule_guard & RULE_GROUP_MASK) << 16)
        | (u64::from(slot & 1) << 32)
}

/// The guards, in the order a packet meets them:
/// 1. the breaker: open refuses everything of the agent (`BreakerOpen`) but what the rule
///    marks exempt; half-open lets new connections through at the probe rate; a half-open
///    breaker without a strike for the calm period closes;
/// 2. the destination group's shared limit (`SharedLimited`), on packets the rules allowed;
/// 3. the agent's new-connection rate (`ConnRateLimited`);
/// 4. the agent's packet and byte limiters (`RateLimited*`);
/// 5. the quotas (`QuotaExhausted`), charged only for packets that pass, so their use is
///    what left;
/// 6. monitor mode turns the drop into its would-drop;
/// 7. a drop or would-drop (but not a packet refused by an open breaker) is a strike; the
///    strike the strike limiter refuses, or any strike while half-open, opens the breaker,
///    each reopening from half-open with twice the cooldown up to the maximum.
///
/// A BPF global function, verified once on its own: `agent`, `index` (`slot *
/// agent_stride + agent`, as for `AGENTS`), `facts` (see [`facts`]) and the packet's weight.
/// Returns the reason, with [`OUT_REJECT`] when the drop is to be rejected. Every state
/// change is one 64-bit compare-and-swap; the CPU whose swap wins reports the transition.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn guard_decide(
    agent: u64,
    index: u64,
    facts: u64,
    bytes: u64,
    packets: u64,
) -> u32 {
    let verdict = Reason::from_u32((facts & 0xff) as u32).unwrap_or(Reason::Malformed);
    let agent = agent as u32;
    let (Some(policy), Some(guard), Some(state)) = (
        AGENTS.get(index as u32),
        GUARD_POLICY.get(index as u32),
        GUARDS.get_ptr_mut(agent),
    ) else {
        return verdict as u32;
    };
    let wire = Wire { packets, bytes };
    let syn = facts & FACT_SYN != 0;
    let monitor = facts & FACT_MONITOR != 0;
    let mut reject = facts & FACT_REJECT != 0;
    let now = tick_now();
    let mut reason = verdict;

    // 1. The breaker's gate.
    let mut half_open = false;
    let breaker = guard.flags & GUARD_BREAKER != 0;
    if breaker {
        // SAFETY: `state` points into an array map value, valid for the program's run; the
        // word is only written with compare-and-swap.
        let word_at = unsafe { ptr::addr_of_mut!((*state).breaker) };
        let word = unsafe { ptr::read_volatile(word_at) };
        let (mut kind, level, time) = breaker_parts(word);
        let mut current = word;
        if kind == BREAKER_OPEN && now >= time {
            // The cooldown is over: half-open from now, once.
            let next = breaker_word(BREAKER_HALF_OPEN, level, now);
            if swap(word_at, word, next) {
                transition(agent, EVENT_BREAKER_HALF_OPEN, Reason::BreakerOpen, level);
            }
            kind = BREAKER_HALF_OPEN;
            current = next;
        }
        if kind == BREAKER_HALF_OPEN {
            let (_, level, since) = breaker_parts(current);
            if now.saturating_sub(since) >= guard.calm {
                if swap(word_at, current, breaker_word(BREAKER_CLOSED, 0, 0)) {
                    transition(agent, EVENT_BREAKER_CLOSED, Reason::BreakerOpen, level);
                }
            } else {
                half_open = true;
            }
        }
        if reason == Reason::Allowed && facts & FACT_EXEMPT == 0 {
            if kind == BREAKER_OPEN {
                reason = Reason::BreakerOpen;
            } else if half_open
                && syn
                && !gcra(
                    // SAFETY: as above.
                    unsafe { ptr::addr_of_mut!((*state).probe_tat) },
                    now,
                    guard.probe_cost,
                    guard.probe_tolerance,
                )
            {
                reason = Reason::BreakerOpen;
            }
            if reason == Reason::BreakerOpen && guard.flags & GUARD_BREAKER_REJECT != 0 {
                reject = true;
            }
        }
    }

    // 2. The destination group's shared limit.
    let group = ((facts >> 16) & 0xffff) as u32;
    if reason == Reason::Allowed && group != 0 {
        reason = shared(group, (facts >> 32) as u32 & 1, now, syn, wire);
    }

    // 3. New connections.
    if reason == Reason::Allowed
        && syn
        && guard.conn_cost != 0
        && !gcra(
            // SAFETY: as above.
            unsafe { ptr::addr_of_mut!((*state).conn_tat) },
            now,
            guard.conn_cost,
            guard.conn_tolerance,
        )
    {
        reason = Reason::ConnRateLimited;
    }

    // 4. The agent's packet and byte limiters.
    if reason == Reason::Allowed {
        match rate_limit(agent, policy, wire) {
            Ok(r) => reason = r,
            Err(()) => return verdict as u32,
        }
    }

    // 5. Quotas.
    if reason == Reason::Allowed && guard.flags & GUARD_QUOTA != 0 {
        reason = quotas(agent, guard, state, now, syn, bytes);
    }

    // 6. Monitor mode.
    if reason.is_drop() && monitor {
        reason = reason.monitored();
    }

    // 7. Strikes.
    // Refusals of an open breaker are not strikes (they would keep it open forever); a
    // probe refused while half-open is: the load is back.
    let refused_by_breaker = reason == Reason::BreakerOpen || reason == Reason::MonitorBreakerOpen;
    if breaker && (reason.is_drop() || reason.is_monitored()) && (!refused_by_breaker || half_open)
    {
        strike(agent, guard, state, now, half_open, reason);
    }

    if reason.is_drop() && reject {
        reason as u32 | OUT_REJECT
    } else {
        reason as u32
    }
}

/// A destination group's shared packets, bytes and connections limiters (see
/// `SharedPolicy`): exact across every agent and CPU that charges them.
#[inline(always)]
fn shared(group: u32, slot: u32, now: u64, syn: bool, wire: Wire) -> Reason {
    let (Some(p), Some(b)) = (
        SHARED_POLICY.get((group << 1) | slot),
        SHARED_BUCKETS.get_ptr_mut(group),
    ) else {
        return Reason::Allowed;
    };
    // SAFETY: `b` points into an array map value, valid for the program's run; the fields
    // are only written with compare-and-swap.
    let (packet_tat, byte_tat, conn_tat) = unsafe {
        (
            ptr::addr_of_mut!((*b).packet_tat),
            ptr::addr_of_mut!((*b).byte_tat),
            ptr::addr_of_mut!((*b).conn_tat),
        )
    };
    if syn && p.conn_cost != 0 && !gcra(conn_tat, now, p.conn_cost, p.conn_tolerance) {
        return Reason::SharedLimited;
    }
    let packet_cost = p.packet_cost * wire.packets;
    if p.packet_cost != 0 && !gcra(packet_tat, now, packet_cost, p.packet_tolerance) {
        return Reason::SharedLimited;
    }
    if p.byte_rate != 0 {
        let cost = wire.bytes * enforcer_common::UNITS_PER_SEC / p.byte_rate;
        if !gcra(byte_tat, now, cost, p.byte_tolerance) {
            if p.packet_cost != 0 {
                // SAFETY: atomic subtraction on a valid, aligned u64 in a map value: the
                // packet charge of a packet the bytes limiter refused is given back.
                unsafe {
                    core::intrinsics::atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(
                        packet_tat,
                        packet_cost,
                    );
                }
            }
            return Reason::SharedLimited;
        }
    }
    Reason::Allowed
}

/// Charges every quota the agent has; the first that would go over refuses the packet, and
/// what the others were charged is given back, so use counts only what passed. The window
/// is the wall clock's hour or UTC day: a word from an earlier window starts again from 0.
#[inline(always)]
fn quotas(
    agent: u32,
    guard: &GuardPolicy,
    state: *mut GuardState,
    now: u64,
    syn: bool,
    bytes: u64,
) -> Reason {
    let offset = GUARD_CONFIG.get(0).map_or(0, |c| c.wall_offset_secs);
    let secs = (now >> TIME_SHIFT) / 1_000_000_000 + offset;
    let cost_of = |kind: usize| {
        if kind == QUOTA_CONNS_HOUR || kind == QUOTA_CONNS_DAY {
            syn as u64
        } else {
            bytes
        }
    };
    let mut charged = [0u64; QUOTAS];
    let mut windows = [0u64; QUOTAS];
    for kind in 0..QUOTAS {
        let limit = guard.quota[kind];
        let cost = cost_of(kind);
        if limit == 0 || cost == 0 {
            continue;
        }
        let window = quota_window(secs, QUOTA_WINDOW_SECS[kind]);
        windows[kind] = window;
        // SAFETY: `state` points into an array map value; quota words are only written
        // with compare-and-swap.
        let at = unsafe { ptr::addr_of_mut!((*state).quota[kind]) };
        match charge(at, window, cost, limit) {
            Charge::Done => charged[kind] = cost,
            Charge::Refused { first } => {
                for k in 0..QUOTAS {
                    if charged[k] != 0 {
                        // SAFETY: as above.
                        let at = unsafe { ptr::addr_of_mut!((*state).quota[k]) };
                        refund(at, windows[k], charged[k]);
                    }
                }
                if first {
                    transition(
                        agent,
                        EVENT_QUOTA_EXHAUSTED,
                        Reason::QuotaExhausted,
                        kind as u64,
                    );
                }
                return Reason::QuotaExhausted;
            }
        }
    }
    Reason::Allowed
}

enum Charge {
    Done,
    /// Over the quota; `first` when this refusal is the window's first (reported once).
    Refused {
        first: bool,
    },
}

/// Adds `cost` to a quota word of `window` unless the use would pass `limit`.
#[inline(always)]
fn charge(at: *mut u64, window: u64, cost: u64, limit: u64) -> Charge {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: valid, aligned u64 in a map value; a stale read fails the swap.
        let old = unsafe { ptr::read_volatile(at) };
        let (used, flag) = if old >> QUOTA_WINDOW_SHIFT == window {
            (old & QUOTA_MAX, old & QUOTA_EXHAUSTED)
        } else {
            (0, 0)
        };
        let base = window << QUOTA_WINDOW_SHIFT;
        if used + cost > limit {
            if flag != 0 {
                return Charge::Refused { first: false };
            }
            if swap(at, old, base | QUOTA_EXHAUSTED | used) {
                return Charge::Refused { first: true };
            }
            continue;
        }
        if swap(at, old, base | flag | (used + cost)) {
            return Charge::Done;
        }
    }
    // Contention past every attempt: refused, as the limiters fail closed.
    Charge::Refused { first: false }
}

/// Gives `cost` back to a quota word, if it is still in `window`.
#[inline(always)]
fn refund(at: *mut u64, window: u64, cost: u64) {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: as in [`charge`].
        let old = unsafe { ptr::read_volatile(at) };
        if old >> QUOTA_WINDOW_SHIFT != window || old & QUOTA_MAX < cost {
            return;
        }
        if swap(at, old, old - cost) {
            return;
        }
    }
}

/// One strike against the breaker; opens it when the strike limiter refuses, or at once
/// when half-open.
#[inline(always)]
fn strike(
    agent: u32,
    guard: &GuardPolicy,
    state: *mut GuardState,
    now: u64,
    half_open: bool,
    reason: Reason,
) {
    // SAFETY: `state` points into an array map value; fields written with atomics only.
    let strike_tat = unsafe { ptr::addr_of_mut!((*state).strike_tat) };
    if !half_open && gcra(strike_tat, now, guard.strike_cost, guard.strike_tolerance) {
        return;
    }
    let word_at = unsafe { ptr::addr_of_mut!((*state).breaker) };
    // SAFETY: as above.
    let word = unsafe { ptr::read_volatile(word_at) };
    let (kind, level, _) = breaker_parts(word);
    let level = match kind {
        BREAKER_CLOSED => 0,
        BREAKER_HALF_OPEN => {
            if level < BREAKER_MAX_LEVEL {
                level + 1
            } else {
                level
            }
        }
        // Already open: another CPU won.
        _ => return,
    };
    // cooldown << level, at most max_cooldown: doubling stops at the maximum, so the loop
    // runs at most until the shift would pass it.
    let mut cooldown = guard.cooldown;
    for i in 0..BREAKER_MAX_LEVEL {
        if i >= level || cooldown >= guard.max_cooldown {
            break;
        }
        cooldown <<= 1;
    }
    if cooldown > guard.max_cooldown {
        cooldown = guard.max_cooldown;
    }
    if swap(
        word_at,
        word,
        breaker_word(BREAKER_OPEN, level, now + cooldown),
    ) {
        // SAFETY: atomic add on a valid, aligned u64 in a map value.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(
                ptr::addr_of_mut!((*state).trips),
                1,
            );
        }
        // The strike limiter starts full again, so a half-open period is not cut short by
        // strikes from before the cooldown.
        // SAFETY: valid, aligned u64 in a map value.
        unsafe { ptr::write_volatile(strike_tat, now) };
        transition(agent, EVENT_BREAKER_OPENED, reason, level);
    }
}

/// A 64-bit compare-and-swap; whether it swapped.
#[inline(always)]
fn swap(at: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: callers pass valid, aligned u64s in map values; BPF_CMPXCHG (Linux 5.12).
    unsafe {
        core::intrinsics::atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            at, old, new,
        )
        .1
    }
}

/// Reports a guard's transition to the audit ring: not subject to the agent's audit budget
/// (a transition happens at most once per cooldown or window), but counted as lost when the
/// ring is full, like every event.
#[inline(never)]
fn transition(agent: u32, kind: u8, reason: Reason, detail: u64) {
    let Some(counters) = COUNTERS.get_ptr_mut(agent) else {
        return;
    };
    let Some(mut entry) = AUDIT.reserve::<AuditEvent>(0) else {
        // SAFETY: per-CPU map value, written only by this CPU while the program runs.
        unsafe { (*counters).audit.lost += 1 };
        return;
    };
    entry.write(AuditEvent {
        // SAFETY: helper without preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        generation: STATE.get(0).map_or(0, |s| s.generation),
        agent,
        reason: reason as u32,
        ifindex: 0,
        len: 0,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        family: AUDIT_FAMILY_NONE,
        proto: 0,
        kind,
        detail: detail as u8,
    });
    entry.submit(0);
}
