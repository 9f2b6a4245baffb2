//! Helpers for the benchmarks, built as their own object (`enforcer-bench`) so that nothing
//! here can change the enforcer's object, its maps or its verifier budget.
//!
//! - `bench_tx` is the packet generator: run by `BPF_PROG_TEST_RUN` with
//!   `BPF_F_TEST_XDP_LIVE_FRAMES` (Linux 5.18) and an `ingress_ifindex` of a veth end, its
//!   XDP_TX sends every frame out of that veth, so it arrives at the peer, where the XDP
//!   program under test runs in the real receive path. Frames are rewritten in place to come
//!   from one of many source addresses (one per agent), round robin per CPU.
//! - `bench_drop` counts and drops: the "bare XDP_DROP" configuration.
//! - `bench_pass` passes: what having an XDP program at all costs allowed traffic.
#![no_std]
#![no_main]
#![expect(
    missing_docs,
    reason = "#[xdp] generates undocumented wrapper functions"
)]

use core::ptr;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use enforcer_common::bench::{GenConfig, SEQ_BURSTING, SEQ_NEXT_NS, SEQ_SENT};

#[map]
static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);
#[map]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
/// How far (ns) a paced CPU may fall behind and still make up for it with frames back to
/// back: longer than a scheduler time slice, so a generator that shares its CPU keeps its
/// average rate.
const CATCH_UP_NS: u64 = 50_000_000;
/// Frames per paced burst: the test-run batch, and the socket generator's `sendmmsg` batch.
const BURST: u64 = 64;

/// The generator. A frame it cannot rewrite (not a 20-byte-header IPv4 frame, or no
/// configuration) is aborted rather than sent with the template's address.
#[xdp]
pub fn bench_tx(ctx: XdpContext) -> u32 {
    match rewrite_source(&ctx) {
        Some(true) => xdp_action::XDP_TX,
        // Too early for a paced frame: not sent, and not counted.
        Some(false) => xdp_action::XDP_DROP,
        None => xdp_action::XDP_ABORTED,
    }
}

/// Writes the next source address into the IPv4 header and recomputes the header checksum
/// (the template's UDP checksum is 0, "none", so it does not cover the address). Live-frames
/// mode recycles pages without restoring their content, so every field the program depends
/// on is written, never adjusted.
///
/// With pacing, frames go in bursts of [`BURST`]: once that many are due (each due
/// `interval_ns` after the one before), every due frame is sent back to back, then the CPU
/// waits for the next burst. The receiver's NAPI so wakes once per burst at any rate, as it
/// does for a flood, and its CPU per frame compares with the socket generator's, which
/// sends `sendmmsg` batches of the same size. A CPU that fell a little behind catches up;
/// one that fell far behind (preempted) starts afresh. `Some(false)`: not this frame.
#[inline(always)]
fn rewrite_source(ctx: &XdpContext) -> Option<bool> {
    let cfg = GEN_CONFIG.get(0)?;
    let seq = GEN_SEQ.get_ptr_mut(SEQ_SENT)?;
    let next = GEN_SEQ.get_ptr_mut(SEQ_NEXT_NS)?;
    let bursting = GEN_SEQ.get_ptr_mut(SEQ_BURSTING)?;
    if cfg.interval_ns != 0 {
        // SAFETY: helper without preconditions (Linux 4.1).
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: per-CPU values; XDP does not migrate mid-program, so nothing races this
        // CPU's copies.
        unsafe {
            let due = *next;
            // Start a burst when its last frame is due; go on while frames are due.
            let start = if *bursting != 0 {
                due
            } else {
                due + (BURST - 1) * cfg.interval_ns
            };
            if now < start {
                *bursting = 0;
                return Some(false);
            }
            *bursting = 1;
            // Catch up after short stalls (NAPI work between batches), so the average
            // rate holds; after a long one (preemption) start afresh instead of bursting.
            *next = if now - due > CATCH_UP_NS {
                now + cfg.interval_ns
            } else {
                due + cfg.interval_ns
            };
        }
    }
    // SAFETY: as above.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    let count = u64::from(cfg.count.max(1));
    let src = cfg.base.wrapping_add((n % count) as u32).to_be_bytes();

    let ip = ctx.data() + ETH_HLEN;
    // Bounds check against data_end: the verifier rejects any packet access not dominated by one.
    if ip + IPV4_HLEN > ctx.data_end() {
        return None;
    }
    let h = ip as *mut [u8; IPV4_HLEN];
    // SAFETY: [ip, ip + 20) lies inside the packet (checked above); [u8; 20] has alignment 1.
    let mut hdr = unsafe { ptr::read(h) };
    if hdr[0] != 0x45 {
        return None;
    }
    hdr[12..16].copy_from_slice(&src);
    hdr[10] = 0;
    hdr[11] = 0;
    let mut sum = 0u32;
    for i in 0..IPV4_HLEN / 2 {
        sum += u32::from(u16::from_be_bytes([hdr[2 * i], hdr[2 * i + 1]]));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = (!(sum as u16)).to_be_bytes();
    hdr[10] = check[0];
    hdr[11] = check[1];
    // SAFETY: as above.
    unsafe { ptr::write(h, hdr) };
    Some(true)
}

/// Counts the frame on this CPU and drops it: the cheapest possible XDP filter.
#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    if let Some(c) = DROPS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, as in `rewrite_source`.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

/// Passes every frame: on a veth, frames then take the XDP path into the stack.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
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
