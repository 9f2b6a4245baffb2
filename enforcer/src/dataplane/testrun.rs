//! Running the XDP and tc programs on a packet without a network: `BPF_PROG_TEST_RUN`, as
//! the packet-table tests and the benchmarks use it.

use aya::{
    TestRun as _, TestRunOptions, TestRunResult,
    programs::{ProgramError, SchedClassifier, Xdp},
};

/// The kernel's `struct xdp_md` as `BPF_PROG_TEST_RUN` takes it for XDP context input.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}
const _: () = assert!(size_of::<XdpMd>() == 24);

/// Runs `program` on `packet` `repeat` times. With `ingress_ifindex`, the program sees the
/// packet as received on that interface (it must exist in the caller's network namespace;
/// Linux 5.15+ for test runs with an XDP context).
pub fn run_xdp(
    program: &Xdp,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
    repeat: u32,
) -> Result<TestRunResult, ProgramError> {
    run_xdp_into(program, packet, ingress_ifindex, repeat, None)
}

/// Most bytes a program's output frame is read back as: a page, what an XDP frame can be.
const FRAME_OUT: usize = 4096;

/// Runs `program` on `packet` once, as [`run_xdp`] does, and returns its action with the
/// frame as the program left it (what `XDP_TX` would send).
pub fn run_xdp_frame(
    program: &Xdp,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<(u32, Vec<u8>), ProgramError> {
    let mut out = vec![0; FRAME_OUT];
    let r = run_xdp_into(program, packet, ingress_ifindex, 1, Some(&mut out))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn run_xdp_into(
    program: &Xdp,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
    repeat: u32,
    data_out: Option<&mut [u8]>,
) -> Result<TestRunResult, ProgramError> {
    let md = XdpMd {
        data_end: packet.len() as u32,
        ingress_ifindex: ingress_ifindex.unwrap_or(0),
        ..XdpMd::default()
    };
    // SAFETY: XdpMd is repr(C), made of u32s with no padding.
    let ctx =
        unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
    program.test_run(TestRunOptions {
        data_in: Some(packet),
        ctx_in: ingress_ifindex.map(|_| ctx),
        data_out,
        repeat: repeat.max(1),
        ..TestRunOptions::default()
    })
}

/// The kernel's `struct __sk_buff` (192 bytes) as 32-bit words, for the fields
/// `BPF_PROG_TEST_RUN` lets a caller set (every other one must be zero).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SkBuffIn([u32; 48]);
const _: () = assert!(size_of::<SkBuffIn>() == 192);
/// Word indices: `offsetof(struct __sk_buff, field) / 4`.
const SKB_INGRESS_IFINDEX: usize = 36 / 4;
const SKB_IFINDEX: usize = 40 / 4;
const SKB_GSO_SEGS: usize = 164 / 4;
const SKB_GSO_SIZE: usize = 176 / 4;

/// What a tc test run's socket buffer carries besides the packet.
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbMeta {
    /// The interface the packet arrives on (it must exist in the caller's network
    /// namespace); `lo` when unset.
    pub ifindex: Option<u32>,
    /// Segments of a GSO super-packet (0 or 1: not GSO).
    pub gso_segs: u32,
    /// Payload bytes per segment of a GSO super-packet.
    pub gso_size: u32,
}

/// Runs the tc `program` on `packet` (from its Ethernet header) `repeat` times, as a socket
/// buffer with `meta` (Linux 5.10+ for `gso_segs`, 5.11 for `gso_size`).
pub fn run_tc(
    program: &SchedClassifier,
    packet: &[u8],
    meta: SkbMeta,
    repeat: u32,
) -> Result<TestRunResult, ProgramError> {
    run_tc_into(program, packet, meta, repeat, None)
}

/// Runs the tc `program` on `packet` once, as [`run_tc`] does, and returns its action with
/// the packet as the program left it (what a redirect would send).
pub fn run_tc_frame(
    program: &SchedClassifier,
    packet: &[u8],
    meta: SkbMeta,
) -> Result<(u32, Vec<u8>), ProgramError> {
    let mut out = vec![0; FRAME_OUT];
    let r = run_tc_into(program, packet, meta, 1, Some(&mut out))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn run_tc_into(
    program: &SchedClassifier,
    packet: &[u8],
    meta: SkbMeta,
    repeat: u32,
    data_out: Option<&mut [u8]>,
) -> Result<TestRunResult, ProgramError> {
    let mut skb = SkBuffIn([0; 48]);
    if let Some(ifindex) = meta.ifindex {
        skb.0[SKB_INGRESS_IFINDEX] = ifindex;
        skb.0[SKB_IFINDEX] = ifindex;
    }
    skb.0[SKB_GSO_SEGS] = meta.gso_segs;
    skb.0[SKB_GSO_SIZE] = meta.gso_size;
    // SAFETY: SkBuffIn is repr(C), 48 u32s with no padding.
    let ctx =
        unsafe { std::slice::from_raw_parts((&raw const skb).cast::<u8>(), size_of::<SkBuffIn>()) };
    program.test_run(TestRunOptions {
        data_in: Some(packet),
        ctx_in: Some(ctx),
        data_out,
        repeat: repeat.max(1),
        ..TestRunOptions::default()
    })
}
