//! Stage 6, counting and audit: the per-agent, per-reason counters and the hash-chained audit
//! trail's events, within a per-agent budget.

use core::ptr;

use aya_ebpf::helpers::bpf_ktime_get_ns;
use enforcer_common::{AUDIT_FAMILY_NONE, AUDIT_FAMILY_V4, AUDIT_FAMILY_V6, AuditEvent, Reason};

use crate::{context::*, limits::*, maps::*, parse::*};

/// The addresses and ports an audit event records: implemented by both families' flows and
/// by [`NoTuple`] for frames whose IP header could not be read. Monomorphised and inlined,
/// so each call site copies exactly its family's bytes.
pub(crate) trait AuditTuple {
    /// Fills `family`, `proto`, the addresses and the ports of `event`.
    fn fill(&self, event: &mut AuditEvent);
}

/// Ports of a flow for an audit event: 0 when the protocol has none or they were not read.
#[inline(always)]
pub(crate) fn ports(l4: L4) -> (u16, u16) {
    (l4.src, l4.dst)
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

/// A tuple the entry program handed to a tail-called stage.
impl AuditTuple for Handoff {
    #[inline(always)]
    fn fill(&self, event: &mut AuditEvent) {
        event.family = self.tuple.family;
        event.proto = self.tuple.proto;
        event.src = self.tuple.src;
        event.dst = self.tuple.dst;
        event.src_port = self.tuple.src_port;
        event.dst_port = self.tuple.dst_port;
    }
}

/// No IP header could be read: the event carries agent, reason, interface and length only.
pub(crate) struct NoTuple;

impl AuditTuple for NoTuple {
    #[inline(always)]
    fn fill(&self, event: &mut AuditEvent) {
        event.family = AUDIT_FAMILY_NONE;
    }
}

/// Reports a drop or monitor-mode would-drop that the agent's audit budget admitted
/// ([`admit`], checked first: a flood of drops is mostly suppressed events, and those should
/// not pay for building a record) to the `AUDIT` ring buffer. Never silent: an event that
/// finds the ring full counts as `lost` in the agent's `COUNTERS` entry.
///
/// Not inlined: the event is built on this function's stack, which the packet path's frame
/// then does not have to hold (with it inlined at each call site, the program exceeded
/// the 512-byte BPF stack). One subprogram per packet shape, called only for admitted
/// events; it copies the packet's facts into the event and [`emit`] does the rest.
#[inline(never)]
pub(crate) fn audit<C: Packet, F: AuditTuple>(
    ctx: &C,
    agent: u32,
    reason: Reason,
    wire: Wire,
    flow: &F,
) {
    // Every byte is set, padding included: ring memory is reused, and a field left
    // unwritten would show user space an older record's bytes.
    let mut event = AuditEvent {
        time_ns: 0,
        generation: 0,
        agent,
        reason: reason as u32,
        ifindex: ctx.ifindex(),
        len: wire.bytes as u32,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        family: AUDIT_FAMILY_NONE,
        proto: 0,
        kind: 0,
        detail: 0,
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
pub(crate) fn emit(event: &AuditEvent) {
    // The verifier requires the lookup's NULL check before any access; it only fails for an
    // agent id beyond the map (which the loader sizes like BUCKETS), so nothing is counted.
    let Some(counters) = COUNTERS.get_ptr_mut(event.agent) else {
        return;
    };
    // The typed reserve asks for a constant size (size_of::<AuditEvent>()), the only form
    // the verifier accepts for bpf_ringbuf_reserve (Linux 5.8). From here to `submit` there
    // is no early return: the verifier rejects a path that leaks a reservation.
    let Some(mut entry) = AUDIT.reserve::<AuditEvent>(0) else {
        // SAFETY: per-CPU map value, written only by this CPU while the program runs.
        unsafe { (*counters).audit.lost += 1 };
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
pub(crate) fn admit(agent: u32) -> bool {
    let Some(counters) = COUNTERS.get_ptr_mut(agent) else {
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
    unsafe { (*counters).audit.suppressed += 1 };
    false
}

/// The compare-and-swap half of [`admit`]. Not inlined: its unrolled CAS loop exists once
/// instead of at each of the six audit call sites (two decisions times three packet
/// shapes), which kept the program small enough for LLVM to inline it into its entry point.
#[inline(never)]
pub(crate) fn audit_charge(tat: *mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
    gcra(tat, now, cost, tolerance)
}

/// Adds a packet's segments and wire bytes to the (agent, reason) counter, in place.
#[inline(always)]
pub(crate) fn count(agent: u32, reason: Reason, wire: Wire) {
    if let Some(counters) = COUNTERS.get_ptr_mut(agent) {
        // SAFETY: per-CPU map value; XDP does not migrate between CPUs mid-program, so
        // nothing else writes this CPU's copy concurrently.
        // The reason's number through black_box: LLVM knows the enum's range and drops the
        // bounds check, but the verifier does not, and refuses the unchecked offset.
        let index = core::hint::black_box(reason as usize);
        if let Some(c) = unsafe { (*counters).by_reason.get_mut(index) } {
            c.packets += wire.packets;
            c.bytes += wire.bytes;
        }
    }
}
