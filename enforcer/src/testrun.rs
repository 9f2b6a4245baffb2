//! Running the XDP program on a packet without a network: `BPF_PROG_TEST_RUN`, as the
//! packet-table tests and the benchmarks use it.

use aya::{
    TestRun as _, TestRunOptions, TestRunResult,
    programs::{ProgramError, Xdp},
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
        repeat: repeat.max(1),
        ..TestRunOptions::default()
    })
}
