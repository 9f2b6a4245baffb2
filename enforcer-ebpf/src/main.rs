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

mod audit;
mod context;
mod egress;
mod guard;
mod identify;
mod limits;
mod maps;
mod names;
mod parse;
mod reject;

use core::ptr;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use enforcer_common::{
    AGENT_GUARDED, AGENT_MONITOR, AGENT_NAMES, AGENT_RESTRICTED, AgentPolicy, IfaceKey,
    MAX_VLAN_TAGS, Reason, SLOT_HAS_IFACES, SLOT_UNKNOWN_DROP, SlotConfig, UNKNOWN_AGENT,
    programs::{STAGE_DECIDE, STAGE_GUARD, STAGE_NAMES, STAGE_REJECT},
};

use crate::{
    audit::*, context::*, egress::*, guard::*, identify::*, limits::*, maps::*, names::*, parse::*,
    reject::*,
};

/// The enforcer. Fail-open on internal errors, which only a map the loader failed to size
/// can cause (no packet content reaches the `Err` arm): a broken deploy must not cut a
/// server off its network, and the daemon refuses to start in that state anyway.
#[xdp]
// `#[xdp]` wraps this in the exported entry point; without the hint LLVM may keep it a
// separate function once the program is large, putting a BPF-to-BPF call on every packet.
#[inline(always)]
pub fn enforce(ctx: XdpContext) -> u32 {
    match try_enforce(&ctx, weigh(&ctx)) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// Stage 4, the host-name checks, tail-called by [`enforce`] (see [`names_stage`]).
#[xdp]
pub fn enforce_names(ctx: XdpContext) -> u32 {
    match names_stage(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// The closing stage (limits, counting, audit), tail-called by [`enforce_names`] with the
/// verdict in [`HANDOFF`]. Its own program so that nothing follows the names stage's
/// global functions in that program (see [`names_stage`]). Fail-open on `Err` like
/// [`enforce`]: only a broken load or a policy slot rewritten under the packet reaches it.
#[xdp]
pub fn enforce_finish(ctx: XdpContext) -> u32 {
    match finish_stage(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// The enforcer at tc, for the host side of sandbox veths: the same pipeline as
/// [`enforce`] over the socket buffers the agent's stack sent, so the agent keeps its
/// offloads (see [`Packet`]).
///
/// This entry only prepares the packet: it makes the headers directly readable
/// ([`pull_headers`]) and weighs it ([`weigh`]: a GSO super-packet's segments and wire
/// bytes), hands the weight over in [`HANDOFF`] and tail-calls [`enforce_decide_tc`], which
/// decides as [`enforce`] does. Both steps branch on what only an skb has (a linear part
/// shorter than the headers, `gso_segs`), and inside the decision every such branch split
/// all the paths after it: Linux 6.1's verifier then needed 68-98% of its budget. As BPF
/// global functions they split nothing, but 6.1 cannot track a scalar's precision back
/// across a call to one and marks every scalar precise instead, which ended its pruning
/// just the same. Here the verifier walks them once, and the decision reads the weight
/// from a map, where its precision tracking stops.
///
/// Fail-open on `Err` like [`enforce`]: only a broken load leaves the decision stage out
/// (the daemon fills `STAGES_TC` before it attaches this program).
#[classifier]
pub fn enforce_tc(ctx: TcContext) -> i32 {
    match tc_entry(&ctx) {
        Ok(action) => action as i32,
        Err(()) => TcContext::PASS as i32,
    }
}

#[inline(always)]
fn tc_entry(ctx: &TcContext) -> Result<u32, ()> {
    pull_headers(ctx);
    let wire = weigh(ctx);
    let h = HANDOFF.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's hand-off, owned by this packet until its last stage (see
    // `Handoff`); a tail call does not return on success.
    unsafe {
        (*h).len = wire.bytes;
        (*h).segs = wire.packets;
        STAGES_TC.tail_call(ctx, STAGE_DECIDE);
    }
    Err(())
}

/// The decision at tc, tail-called by [`enforce_tc`] with the packet's weight in
/// [`HANDOFF`].
#[classifier]
#[inline(always)]
pub fn enforce_decide_tc(ctx: TcContext) -> i32 {
    let Some(h) = HANDOFF.get(0) else {
        return TcContext::PASS as i32;
    };
    let wire = Wire {
        packets: h.segs,
        bytes: h.len,
    };
    match try_enforce(&ctx, wire) {
        Ok(action) => action as i32,
        Err(()) => TcContext::PASS as i32,
    }
}

/// [`enforce_names`] at tc.
#[classifier]
pub fn enforce_names_tc(ctx: TcContext) -> i32 {
    match names_stage(&ctx) {
        Ok(action) => action as i32,
        Err(()) => TcContext::PASS as i32,
    }
}

/// [`enforce_finish`] at tc.
#[classifier]
pub fn enforce_finish_tc(ctx: TcContext) -> i32 {
    match finish_stage(&ctx) {
        Ok(action) => action as i32,
        Err(()) => TcContext::PASS as i32,
    }
}

/// Reads the hand-off and closes like [`decide`] does for the packets it decides itself.
#[inline(always)]
fn finish_stage<C: Packet>(ctx: &C) -> Result<u32, ()> {
    let h = HANDOFF.get(0).ok_or(())?;
    let slot = ((h.owner >> 32) as u32) & 1;
    let agent = h.owner as u32;
    let policy = agent_policy(slot, h.stride, agent).ok_or(())?;
    let verdict = Reason::from_u32(h.verdict).ok_or(())?;
    let wire = Wire {
        packets: h.segs,
        bytes: h.len,
    };
    finish(
        ctx,
        agent,
        slot,
        h.stride,
        policy,
        Verdict::of(verdict),
        wire,
        h,
    )
}

/// The guards of an agent that has them (see [`guard_decide`]), then the close, tail-called
/// by the stage that would have closed the packet, with everything in [`HANDOFF`]. A stage
/// of its own so that the verifier walks the guards apart from the paths of the entry
/// program, whose budget they would otherwise multiply (every decision path of `enforce`
/// ends here, and Linux 6.1 loses its pruning after a BPF-to-BPF call; see
/// [`names_stage`]). Fail-open on `Err` like [`enforce`].
#[xdp]
pub fn enforce_guard(ctx: XdpContext) -> u32 {
    match guard_stage(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// [`enforce_guard`] at tc.
#[classifier]
pub fn enforce_guard_tc(ctx: TcContext) -> i32 {
    match guard_stage(&ctx) {
        Ok(action) => action as i32,
        Err(()) => TcContext::PASS as i32,
    }
}

#[inline(always)]
fn guard_stage<C: Packet>(ctx: &C) -> Result<u32, ()> {
    let h = HANDOFF.get(0).ok_or(())?;
    let Some((ethertype, off)) = link_layer(ctx) else {
        return guard_close(ctx, h, &NoTuple);
    };
    match ethertype {
        ETH_P_IP => match parse_v4(ctx, off) {
            Some(flow) => guard_close(ctx, h, &flow),
            None => guard_close(ctx, h, &NoTuple),
        },
        ETH_P_IPV6 => match parse_v6(ctx, off) {
            Some(flow) => guard_close(ctx, h, &flow),
            None => guard_close(ctx, h, &NoTuple),
        },
        _ => guard_close(ctx, h, &NoTuple),
    }
}

/// The guards' verdict for the packet the hand-off describes, then the close.
#[inline(always)]
fn guard_close<C: Packet, F: AuditTuple + GuardFacts + ReplyTarget>(
    ctx: &C,
    h: &Handoff,
    flow: &F,
) -> Result<u32, ()> {
    let slot = ((h.owner >> 32) as u32) & 1;
    let agent = h.owner as u32;
    let policy = agent_policy(slot, h.stride, agent).ok_or(())?;
    let verdict = Reason::from_u32(h.verdict & 0xff).ok_or(())?;
    let facts = facts(
        verdict,
        false,
        flow.opens_connection(ctx),
        policy.flags & AGENT_MONITOR != 0,
        flow.rule_guard(slot, agent, policy),
        slot,
    );
    let out = guard_decide(
        u64::from(agent),
        u64::from(slot * h.stride + agent),
        facts,
        h.len,
        h.segs,
    );
    let reason = Reason::from_u32(out & 0xff).ok_or(())?;
    let wire = Wire {
        packets: h.segs,
        bytes: h.len,
    };
    // A breaker's reject is decided; a rule's is looked up again by the reply stage, so
    // neither this stage nor the entry program carries the rule's reject bit (each split
    // the verifier's states past its limit on Linux 6.1).
    let reject = if out & OUT_REJECT != 0 {
        REJECT_FORCED
    } else if reason == Reason::EgressDenied {
        REJECT_IF_RULE
    } else {
        0
    };
    close(ctx, agent, reason, reject, wire, flow)
}

/// The reply to a packet a `reject` rule or breaker refused ([`reject_or_drop`]), already
/// counted and audited, tail-called with the agent in `Handoff::owner` and the packed
/// reply target in `Handoff::layout`. A stage of its own: the reply's global function,
/// called inline on every drop path of the entry program, took `enforce` past the
/// verifier's 1,000,000 instructions on Linux 6.1, which stops pruning after a BPF-to-BPF
/// call (see [`names_stage`]). Drops when the hand-off is missing.
#[xdp]
pub fn enforce_reject(ctx: XdpContext) -> u32 {
    reject_stage(&ctx)
}

/// [`enforce_reject`] at tc.
#[classifier]
pub fn enforce_reject_tc(ctx: TcContext) -> i32 {
    reject_stage(&ctx) as i32
}

/// `Handoff::verdict` for [`enforce_reject`]: reply (a breaker's reject).
const REJECT_FORCED: u32 = 1;
/// Reply if the agent's rule that matches the packet says `reject`.
const REJECT_IF_RULE: u32 = 2;

#[inline(always)]
fn reject_stage<C: Packet>(ctx: &C) -> u32 {
    let Some(h) = HANDOFF.get(0) else {
        return C::DROP;
    };
    let Some((ethertype, off)) = link_layer(ctx) else {
        return C::DROP;
    };
    match ethertype {
        ETH_P_IP => match parse_v4(ctx, off) {
            Some(flow) => reject_flow(ctx, h, &flow),
            None => C::DROP,
        },
        ETH_P_IPV6 => match parse_v6(ctx, off) {
            Some(flow) => reject_flow(ctx, h, &flow),
            None => C::DROP,
        },
        _ => C::DROP,
    }
}

/// The reply to `flow`, if the breaker asked for it or the agent's matching rule says
/// `reject`; else the drop.
#[inline(always)]
fn reject_flow<C: Packet, A: Family>(ctx: &C, h: &Handoff, flow: &Flow<A>) -> u32
where
    Flow<A>: ReplyTarget,
{
    let slot = ((h.owner >> 32) as u32) & 1;
    let agent = h.owner as u32;
    let rejects = h.verdict == REJECT_FORCED
        || agent_policy(slot, h.stride, agent).is_some_and(|policy| {
            let rules = flow.dst.rules(slot, agent, policy, TABLES.get(slot));
            match_rules(
                rules,
                flow.proto,
                flow.l4,
                |_| false,
                |r| r.action == enforcer_common::ACTION_REJECT,
            )
            .unwrap_or(false)
        });
    if rejects {
        reject_or_drop(ctx, agent, flow.reply_to())
    } else {
        C::DROP
    }
}

/// The floor benchmarks compare against: returns XDP_PASS and touches nothing.
#[xdp]
pub fn pass_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Measures the tick clock for the daemon (see [`Clock`]): run with `BPF_PROG_TEST_RUN`,
/// never attached. Writes `jiffies`, CLOCK_MONOTONIC ns read after it, and CLOCK_MONOTONIC
/// ns read before it, so a caller has a bound on each side of the `jiffies` read: the tick
/// that advances `jiffies` is an interrupt, which can land between two helper calls and take
/// long (0.4 ms was seen under emulation), so one reading alone bounds nothing.
#[xdp]
pub fn clock_probe(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    // Bounds check against data_end: the verifier rejects a write not dominated by one.
    if start + 24 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: helpers without preconditions; [start, start + 24) is inside the packet
    // (checked above), written unaligned.
    unsafe {
        let before = bpf_ktime_get_ns();
        let jiffies = bpf_jiffies64();
        let after = bpf_ktime_get_ns();
        ptr::write_unaligned(start as *mut [u8; 8], jiffies.to_le_bytes());
        ptr::write_unaligned((start + 8) as *mut [u8; 8], after.to_le_bytes());
        ptr::write_unaligned((start + 16) as *mut [u8; 8], before.to_le_bytes());
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_enforce<C: Packet>(ctx: &C, wire: Wire) -> Result<u32, ()> {
    let state = STATE.get(0).ok_or(())?;
    let slot = state.active_slot & 1;
    let stride = state.agent_stride;
    let slot_cfg = SLOTS.get(slot).ok_or(())?;

    // Interface identity first: on the host side of a sandbox veth the interface is the
    // agent, whatever source address it claims.
    let mut agent = UNKNOWN_AGENT;
    if slot_cfg.flags & SLOT_HAS_IFACES != 0 {
        let key = IfaceKey {
            slot,
            ifindex: ctx.ifindex(),
        };
        // SAFETY: the value is a plain u32 copied out immediately.
        if let Some(a) = unsafe { IFACES.get(&key) } {
            agent = *a;
        }
    }

    let Some((ethertype, off)) = link_layer(ctx) else {
        return undecidable(ctx, slot, stride, slot_cfg, agent, wire);
    };
    // The frame's tags and the one the kernel already took off into metadata (tc) together
    // may not exceed the limit: a double-tagged frame is the same frame at both hooks.
    if (off - ETH_HLEN) / 4 + ctx.outer_tags() > MAX_VLAN_TAGS {
        return undecidable(ctx, slot, stride, slot_cfg, agent, wire);
    }

    match ethertype {
        ETH_P_IP => match parse_v4(ctx, off) {
            Some(flow) => decide(ctx, slot, stride, slot_cfg, agent, wire, &flow),
            None => undecidable(ctx, slot, stride, slot_cfg, agent, wire),
        },
        ETH_P_IPV6 => match parse_v6(ctx, off) {
            Some(flow) => decide(ctx, slot, stride, slot_cfg, agent, wire, &flow),
            None => undecidable(ctx, slot, stride, slot_cfg, agent, wire),
        },
        // A third tag: the frame hides its payload deeper than the parser looks.
        ETH_P_8021Q | ETH_P_8021AD => undecidable(ctx, slot, stride, slot_cfg, agent, wire),
        _ => {
            count(agent, Reason::NonIp, wire);
            Ok(C::PASS)
        }
    }
}

/// The decision for a parsed packet of either family: the agent (by interface already, else
/// by source address), then its egress rules and limits.
#[inline(always)]
fn decide<C: Packet, A: Family>(
    ctx: &C,
    slot: u32,
    stride: u32,
    slot_cfg: &SlotConfig,
    mut agent: u32,
    wire: Wire,
    flow: &Flow<A>,
) -> Result<u32, ()>
where
    Flow<A>: AuditTuple + ReplyTarget,
{
    let tables = TABLES.get(slot);
    if agent == UNKNOWN_AGENT {
        agent = flow.src.host_agent(slot, tables);
    }
    if agent == UNKNOWN_AGENT && slot_cfg.flags & A::SLOT_SRC_LPM != 0 {
        agent = flow.src.prefix_agent(slot);
    }
    if flow.l4 == L4::LinkControl {
        count(agent, Reason::LinkControl, wire);
        return Ok(C::PASS);
    }
    let Some(policy) = agent_policy(slot, stride, agent) else {
        return unknown(ctx, slot_cfg, wire, flow);
    };
    let verdict = if policy.flags & AGENT_RESTRICTED == 0 {
        Verdict::of(Reason::Allowed)
    } else if policy.flags & AGENT_NAMES != 0 {
        match names(
            slot,
            agent,
            policy,
            flow,
            flow.dst.rules(slot, agent, policy, tables),
        ) {
            // Drop-only: a `reject` rule reached through the names checks drops like `deny`.
            NamesVerdict::Decided(reason) => Verdict::of(reason),
            NamesVerdict::Learned {
                default,
                layout,
                owner,
                l4,
            } => {
                let h = HANDOFF.get_ptr_mut(0).ok_or(())?;
                // SAFETY: this CPU's hand-off, owned by this packet until its last stage
                // (see `Handoff`). Every field the stages read is written: the memory is
                // reused, and an IPv4 tuple fills only the first 4 address bytes.
                unsafe {
                    (*h).layout = layout;
                    (*h).owner = owner;
                    (*h).l4 = l4;
                    (*h).len = wire.bytes;
                    (*h).segs = wire.packets;
                    (*h).stride = stride;
                    (*h).verdict = default as u32;
                    (*h).tuple.src = [0; 16];
                    (*h).tuple.dst = [0; 16];
                    flow.fill(&mut (*h).tuple);
                    C::stages().tail_call(ctx, STAGE_NAMES);
                }
                // Only a broken load leaves the stage out (the daemon fills `STAGES` before
                // it attaches this program): fail open, as for a mis-sized map.
                return Err(());
            }
        }
    } else {
        egress(
            flow.dst.rules(slot, agent, policy, tables),
            flow.proto,
            flow.l4,
            policy.flags,
        )
    };
    finish(ctx, agent, slot, stride, policy, verdict, wire, flow)
}

/// Traffic from no known agent follows the slot's default.
#[inline(always)]
fn unknown<C: Packet, F: AuditTuple>(
    ctx: &C,
    slot_cfg: &SlotConfig,
    wire: Wire,
    flow: &F,
) -> Result<u32, ()> {
    if slot_cfg.flags & SLOT_UNKNOWN_DROP != 0 {
        count(UNKNOWN_AGENT, Reason::UnknownDrop, wire);
        if admit(UNKNOWN_AGENT) {
            audit(ctx, UNKNOWN_AGENT, Reason::UnknownDrop, wire, flow);
        }
        Ok(C::DROP)
    } else {
        count(UNKNOWN_AGENT, Reason::UnknownPass, wire);
        Ok(C::PASS)
    }
}

/// A frame whose IP header could not be read: only the interface can name the agent, and
/// a restricted agent gets no benefit of the doubt.
#[inline(always)]
fn undecidable<C: Packet>(
    ctx: &C,
    slot: u32,
    stride: u32,
    slot_cfg: &SlotConfig,
    agent: u32,
    wire: Wire,
) -> Result<u32, ()> {
    let Some(policy) = agent_policy(slot, stride, agent) else {
        return unknown(ctx, slot_cfg, wire, &NoTuple);
    };
    let verdict = if policy.flags & AGENT_RESTRICTED != 0 {
        Reason::Malformed
    } else {
        Reason::Allowed
    };
    finish(
        ctx,
        agent,
        slot,
        stride,
        policy,
        Verdict::of(verdict),
        wire,
        &NoTuple,
    )
}

/// Applies the rate limit to packets the egress check allowed (or hands the packet to the
/// guard stage, for agents with guards), turns would-drops into passes for monitor-mode
/// agents, and closes.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined: the arguments are registers"
)]
fn finish<C: Packet, F: AuditTuple + ReplyTarget>(
    ctx: &C,
    agent: u32,
    slot: u32,
    stride: u32,
    policy: &AgentPolicy,
    verdict: Verdict,
    wire: Wire,
    flow: &F,
) -> Result<u32, ()> {
    if policy.flags & AGENT_GUARDED != 0 {
        // The guards run in a stage of their own (see [`guard_stage`]). As little as can be
        // is done here: the verifier walks this branch once for every path of the entry
        // program that reaches it, so the stage parses the packet again for what it needs.
        let h = HANDOFF.get_ptr_mut(0).ok_or(())?;
        // SAFETY: this CPU's hand-off, owned by this packet until its last stage (see
        // `Handoff`); a tail call does not return on success.
        unsafe {
            (*h).owner = (u64::from(slot) << 32) | u64::from(agent);
            (*h).stride = stride;
            (*h).len = wire.bytes;
            (*h).segs = wire.packets;
            (*h).verdict = verdict.reason as u32;
            C::stages().tail_call(ctx, STAGE_GUARD);
        }
        // Only a broken load leaves the stage out: fail open, as for a mis-sized map.
        return Err(());
    }
    let mut reason = verdict.reason;
    if reason == Reason::Allowed {
        reason = rate_limit(agent, policy, wire)?;
    }
    if reason.is_drop() && policy.flags & AGENT_MONITOR != 0 {
        reason = reason.monitored();
    }
    close(ctx, agent, reason, 0, wire, flow)
}

/// Counts the packet under its final reason, reports drops and would-drops to the audit
/// trail, answers a drop a `reject` rule or breaker decided ([`reject`]), and returns the
/// action.
#[inline(always)]
fn close<C: Packet, F: AuditTuple + ReplyTarget>(
    ctx: &C,
    agent: u32,
    reason: Reason,
    reject: u32,
    wire: Wire,
    flow: &F,
) -> Result<u32, ()> {
    count(agent, reason, wire);
    // A passed packet pays this one test of the reason and nothing else: no lookup, no
    // clock read, no ring access.
    if reason.is_audited() {
        if admit(agent) {
            audit(ctx, agent, reason, wire, flow);
        }
        // Only a real drop is answered: a monitor-mode agent's would-drop passes, and a
        // reply would break what passes.
        // The reply is a stage of its own (see [`enforce_reject`]).
        if reject != 0 && reason.is_drop() {
            if let Some(h) = HANDOFF.get_ptr_mut(0) {
                // SAFETY: this CPU's hand-off, owned by this packet until its last stage
                // (see `Handoff`), which already holds its owner and stride (only the
                // guard stage asks for replies); a tail call does not return on success.
                unsafe {
                    (*h).verdict = reject;
                    C::stages().tail_call(ctx, STAGE_REJECT);
                }
            }
            // Only a broken load leaves the stage out: the packet is dropped as decided.
            return Ok(C::DROP);
        }
    }
    Ok(if reason.is_drop() { C::DROP } else { C::PASS })
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
