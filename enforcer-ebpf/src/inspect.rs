//! The TLS-inspection object (`enforcer-inspect`): one `sk_msg` program, `inspect_msg`,
//! attached to the sockmap `INSPECT_SOCKS` that holds both sockets of every proxied
//! connection `enforcer::ktls` has moved into kernel TLS.
//!
//! With kTLS TX on a socket, `tls_sw_sendmsg` and the splice path run the socket's `sk_msg`
//! verdict on the *plaintext* open record before it is encrypted (`bpf_exec_tx_verdict` in
//! `net/tls/tls_sw.c`, Linux 4.20+), one record of at most 16 KiB per run. So the program
//! sees, for every byte the proxy forwards, exactly the bytes that will be encrypted for the
//! peer, and an `SK_DROP` stops them before they are: the send fails with `EACCES`. On a
//! plain TCP socket in the map the same program runs from `tcp_bpf_sendmsg`.
//!
//! The detector is an Aho-Corasick automaton compiled by user space into a full transition
//! table ([`Dfa`]): one table load per byte, no backtracking, and the state after the last
//! byte is kept per socket so a marker split across records is still found.
//!
//! Minimum kernel: 5.17 (`bpf_loop`); sockmap + kTLS as used here: 4.20.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core::intrinsics is the only atomic add on the BPF target"
)]
#![expect(
    missing_docs,
    reason = "#[sk_msg] generates undocumented wrapper functions"
)]

use core::{ffi::c_void, intrinsics::AtomicOrdering, ptr};

use aya_ebpf::{
    bindings::sk_action,
    helpers::generated::{bpf_loop, bpf_msg_apply_bytes, bpf_msg_pull_data},
    macros::{map, sk_msg},
    maps::{Array, HashMap, PerCpuArray, SockMap},
    programs::SkMsgContext,
};
use enforcer_common::inspect::{
    Dfa, FAMILY_V6, FlowKey, FlowState, GENERATIONS, InspectReason, MARKER_BLOCK, MAX_MARKERS,
    MAX_STATES, MAX_WINDOWS, WINDOW,
};

// Sizes are placeholders where user space sets the real ones at load time (the sockmap and
// the flow table follow the proxy's connection limit).
#[map]
static INSPECT_SOCKS: SockMap = SockMap::with_max_entries(1024, 0);
#[map]
static INSPECT_DFA: Array<Dfa> = Array::with_max_entries(GENERATIONS, 0);
#[map]
static INSPECT_FLOWS: HashMap<FlowKey, FlowState> = HashMap::with_max_entries(1024, 0);
#[map]
static INSPECT_HITS: Array<u64> = Array::with_max_entries(GENERATIONS * MAX_MARKERS as u32, 0);
#[map]
static INSPECT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(InspectReason::COUNT, 0);

/// The verdict. Every `Err` fails closed: bytes the program could not scan are never sent.
#[sk_msg]
pub fn inspect_msg(ctx: SkMsgContext) -> u32 {
    let reason = match try_inspect(&ctx) {
        Ok(()) => InspectReason::Passed,
        Err(reason) => reason,
    };
    count(reason);
    match reason {
        InspectReason::Passed => sk_action::SK_PASS,
        _ => sk_action::SK_DROP,
    }
}

/// What the per-byte callback reads and writes. Lives on the program's stack; `bpf_loop`
/// hands the callback a pointer to it.
#[repr(C)]
struct Scan {
    /// Packet pointers of the current window (after `bpf_msg_pull_data`). The verifier keeps
    /// their type through the stack spill, so the callback may compare and load with them.
    data: *const u8,
    data_end: *const u8,
    dfa: *const Dfa,
    state: u32,
    /// First marker hit in this message, slot + 1.
    hit: u32,
    /// Blocking marker hit, slot + 1; the scan stops there.
    block: u32,
    _pad: u32,
}

fn try_inspect(ctx: &SkMsgContext) -> Result<(), InspectReason> {
    let key = flow_key(ctx);
    let flow = INSPECT_FLOWS
        .get_ptr_mut(&key)
        .ok_or(InspectReason::UnknownFlow)?;
    // SAFETY: a hash map value pointer, valid for this run; this socket's runs are
    // serialised by the socket lock, so nothing else writes this entry meanwhile.
    let flow = unsafe { &mut *flow };
    if flow.blocked != 0 {
        return Err(InspectReason::Blocked);
    }
    let generation = flow.generation & (GENERATIONS - 1);
    let dfa = INSPECT_DFA
        .get_ptr(generation)
        .ok_or(InspectReason::NoAutomaton)?;

    let size = ctx.size();
    let limit = WINDOW * MAX_WINDOWS;
    let scanned = if size > limit { limit } else { size };
    // Over `limit`, the verdict covers only the first `limit` bytes and the kernel runs the
    // program again on the rest (tcp_bpf and tls_sw both split on apply_bytes). Set it on
    // every run, 0 included: the value stays in the message between runs, and a stale one
    // would extend this verdict over bytes of later sends the program never sees.
    let apply = if size > limit { limit } else { 0 };
    // SAFETY: the helper only writes the message's apply_bytes.
    unsafe { bpf_msg_apply_bytes(ctx.msg, apply) };

    // Not null pointers: zeroing them would become a `memset` call (see flow_key); the
    // loop sets both before every use anyway.
    let mut scan = Scan {
        data: ctx.data() as *const u8,
        data_end: ctx.data_end() as *const u8,
        dfa,
        state: flow.dfa_state,
        hit: 0,
        block: 0,
        _pad: 0,
    };
    // Constant trip count: the verifier walks each window once; the bytes of a window are
    // one `bpf_loop` whose callback it verifies once.
    for window in 0..MAX_WINDOWS {
        let start = window * WINDOW;
        if start >= scanned {
            break;
        }
        let end = if scanned - start > WINDOW {
            start + WINDOW
        } else {
            scanned
        };
        // Makes [start, end) linear and points data/data_end at it (copies only when the
        // window spans two scatterlist pages).
        // SAFETY: helper call on the program's own context.
        if unsafe { bpf_msg_pull_data(ctx.msg, start, end, 0) } != 0 {
            return Err(InspectReason::PullFailed);
        }
        scan.data = ctx.data() as *const u8;
        scan.data_end = ctx.data_end() as *const u8;
        // SAFETY: the callback only touches `scan`, which outlives the call.
        unsafe {
            bpf_loop(
                end - start,
                scan_byte as *mut c_void,
                ptr::from_mut(&mut scan).cast(),
                0,
            )
        };
        if scan.block != 0 {
            break;
        }
    }

    if scan.hit != 0 {
        flow.hits += 1;
        if flow.first_hit == 0 {
            flow.first_hit = scan.hit;
        }
        let slot = (scan.hit - 1) & (MAX_MARKERS as u32 - 1);
        if let Some(hits) = INSPECT_HITS.get_ptr_mut(generation * MAX_MARKERS as u32 + slot) {
            // SAFETY: array value pointer; shared by every CPU, hence the atomic add.
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hits, 1)
            };
        }
    }
    if scan.block != 0 {
        flow.blocked = scan.block;
        return Err(InspectReason::Blocked);
    }
    flow.dfa_state = scan.state;
    flow.bytes += u64::from(scanned);
    Ok(())
}

/// One byte through the automaton. Returns 1 to stop the loop (end of data, or a blocking
/// hit), 0 to go on.
extern "C" fn scan_byte(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Scan` try_inspect passed to bpf_loop.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    // The verifier needs a bounded offset before adding it to a packet pointer; the loop
    // never runs more than WINDOW times anyway.
    if index >= u64::from(WINDOW) {
        return 1;
    }
    let p = scan.data.wrapping_add(index as usize);
    if p.wrapping_add(1) > scan.data_end {
        return 1;
    }
    // SAFETY: p is inside [data, data_end), checked just above.
    let byte = unsafe { *p } as usize;
    // SAFETY: `dfa` is a map value pointer of the right type; both indices are masked into
    // their arrays (MAX_STATES is a power of two), which is also what the verifier checks.
    let (next, out, flags) = unsafe {
        let dfa = &*scan.dfa;
        // Row offset through black_box so LLVM cannot prove its low byte zero and fuse
        // `row + byte` into an OR: Linux 6.1's verifier forgets every bound of a register
        // ORed with a non-constant (6.7 relaxed that), while it keeps them over an ADD.
        let row = core::hint::black_box(((scan.state as usize) & (MAX_STATES - 1)) << 8);
        let next = *dfa.next.as_ptr().add(row + byte) as usize & (MAX_STATES - 1);
        let out = u32::from(*dfa.out.as_ptr().add(next));
        let flags = if out == 0 {
            0
        } else {
            *dfa.marker_flags
                .as_ptr()
                .add((out as usize - 1) & (MAX_MARKERS - 1))
        };
        (next, out, flags)
    };
    scan.state = next as u32;
    if out != 0 {
        if scan.hit == 0 {
            scan.hit = out;
        }
        if flags & MARKER_BLOCK != 0 {
            scan.hit = out;
            scan.block = out;
            return 1;
        }
    }
    0
}

/// The socket's key, as user space computes it from the socket's addresses.
fn flow_key(ctx: &SkMsgContext) -> FlowKey {
    let md = ctx.msg;
    // Context fields are read one by one with volatile loads: the verifier only accepts
    // `*(ctx + constant)`, and LLVM would otherwise load through a pointer it selected
    // between two fields ("dereference of modified ctx ptr").
    // SAFETY: reads of context fields sk_msg programs may read (all of them, any family).
    let field = |p: *const u32| unsafe { ptr::read_volatile(p) };
    let (family, local_port, raw_port, local4, remote4, local6, remote6) = unsafe {
        (
            field(&raw const (*md).family),
            field(&raw const (*md).local_port),
            field(&raw const (*md).remote_port),
            field(&raw const (*md).local_ip4),
            field(&raw const (*md).remote_ip4),
            [
                field(&raw const (*md).local_ip6[0]),
                field(&raw const (*md).local_ip6[1]),
                field(&raw const (*md).local_ip6[2]),
                field(&raw const (*md).local_ip6[3]),
            ],
            [
                field(&raw const (*md).remote_ip6[0]),
                field(&raw const (*md).remote_ip6[1]),
                field(&raw const (*md).remote_ip6[2]),
                field(&raw const (*md).remote_ip6[3]),
            ],
        )
    };
    // remote_port holds the port's network-order bytes; some kernels shift them into the
    // upper half of the word (sock_ops style). Normalise both to host order.
    let raw = if raw_port > 0xffff {
        raw_port >> 16
    } else {
        raw_port
    };
    let remote_port = u32::from(u16::from_be(raw as u16));
    // Every word is written with a value (no zeroed array then patched): LLVM turns
    // zeroing into a call to `memset`, a global function Linux 6.1's verifier rejects
    // ("reg type unsupported for arg#0").
    let (local_ip, remote_ip) = if family == FAMILY_V6 {
        (local6, remote6)
    } else {
        ([local4, 0, 0, 0], [remote4, 0, 0, 0])
    };
    FlowKey {
        family,
        local_port,
        remote_port,
        local_ip,
        remote_ip,
    }
}

fn count(reason: InspectReason) {
    if let Some(counter) = INSPECT_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value pointer, only this CPU writes it.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
