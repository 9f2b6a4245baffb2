//! Stage 5, limits: the agent's packets/s and bytes/s GCRA limiters, exact across CPUs, on
//! the precise or the tick clock.

use core::{intrinsics::AtomicOrdering, ptr};

use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use enforcer_common::{AGENT_COARSE_CLOCK, AgentPolicy, Reason, TIME_SHIFT, UNITS_PER_SEC};

use crate::{context::Wire, maps::*};

/// Compare-and-swap attempts on a bucket before the packet is treated as over the limit.
/// Only CPUs racing on the same agent retry, so a handful is plenty; failing closed keeps
/// the limit exact even under pathological contention.
pub(crate) const CAS_ATTEMPTS: usize = 8;

/// GCRA over both limits. The packets limiter is charged first; if the bytes limiter then
/// refuses, the packet charge is refunded, so a dropped packet costs nothing. A GSO
/// super-packet is charged for all its segments and wire bytes at once (see [`Wire`]).
#[inline(always)]
pub(crate) fn rate_limit(agent: u32, policy: &AgentPolicy, wire: Wire) -> Result<Reason, ()> {
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

    let packet_cost = policy.packet_cost * wire.packets;
    if policy.packet_cost != 0 && !gcra(packet_tat, now, packet_cost, policy.packet_tolerance) {
        return Ok(Reason::RateLimitedPackets);
    }
    if policy.byte_rate != 0 {
        let cost = wire.bytes * UNITS_PER_SEC / policy.byte_rate;
        if !gcra(byte_tat, now, cost, policy.byte_tolerance) {
            if policy.packet_cost != 0 {
                // SAFETY: atomic add on a valid, 8-byte aligned u64 in a map value.
                unsafe {
                    core::intrinsics::atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(
                        packet_tat,
                        packet_cost,
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
///
/// A packet that costs more than the whole burst (a GSO super-packet against a small byte
/// burst) could never conform; it is admitted when the bucket is full (`tat` not ahead of
/// `now`), and the limiter then runs in debt by the excess, refusing everything after it
/// until the debt is paid: the long-run rate stays exact, and TCP is not stalled forever
/// on a segment size it did not choose.
#[inline(always)]
pub(crate) fn gcra(tat: *mut u64, now: u64, cost: u64, tolerance: u64) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        // SAFETY: valid, aligned u64 in a map value. A torn read is impossible for an aligned
        // 64-bit load; a stale one fails the CAS below and is retried.
        let old = unsafe { ptr::read_volatile(tat) };
        let base = if old > now { old } else { now };
        let new = base + cost;
        if new - now > tolerance && !(old <= now && cost > tolerance) {
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
pub(crate) fn tick_now() -> u64 {
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
