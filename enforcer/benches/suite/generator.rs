//! The packet generators of the veth bed, one per way a frame can reach the receiver.
//!
//! - [`Kind::Socket`]: what an agent's sandbox sends. `AF_PACKET` sockets opened in the
//!   generator namespace (with `PACKET_QDISC_BYPASS`), one thread per CPU, write prebuilt
//!   UDP frames with `sendmmsg` in batches, paced or flat out. Each frame is a socket buffer
//!   that `veth_xmit` hands to the peer, so the receiver runs the same path as for an
//!   agent's traffic (XDP on an skb, which veth copies; GRO; the stack). Works on every
//!   kernel.
//! - [`Kind::Frames`]: `bench_tx` run by `BPF_PROG_TEST_RUN` with
//!   `BPF_F_TEST_XDP_LIVE_FRAMES` (Linux 5.18): XDP_TX hands XDP frames to the peer's NAPI,
//!   the path a NIC's frames take through native XDP, at a rate no socket reaches. Some
//!   kernels refuse live frames (EPERM on the host kernels of December 2026, where plain
//!   test runs still work), so it is probed ([`probe_frames`]) and left out with the reason.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Which generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `AF_PACKET` sockets in the generator namespace: socket buffers, as agents send.
    Socket,
    /// Live XDP frames from `BPF_PROG_TEST_RUN`: the NIC-like path.
    Frames,
}

impl Kind {
    /// Every generator, in the order the packet-path section runs them.
    pub const ALL: [Kind; 2] = [Kind::Socket, Kind::Frames];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Socket => "socket",
            Kind::Frames => "frames",
        }
    }

    /// Parses a name from `--generators`.
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What it is, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Socket => {
                "AF_PACKET sockets in the generator namespace (PACKET_QDISC_BYPASS, sendmmsg batches of 64, \
                 one thread per CPU): socket buffers through veth_xmit, the path an agent's traffic takes"
            }
            Kind::Frames => {
                "BPF_PROG_TEST_RUN live frames (bench_tx, XDP_TX into the veth): XDP frames into the \
                 receiver's NAPI, the path a NIC's frames take"
            }
        }
    }
}

/// Frames per `sendmmsg` call (the same batch the live-frames generator uses).
pub const BATCH: usize = 64;
/// How far (ns) a paced thread may fall behind and still catch up with frames back to back;
/// after a longer stall (preemption) it starts afresh rather than bursting. The same rule
/// as `bench_tx`'s.
const CATCH_UP_NS: u64 = 50_000_000;

/// A transmit-only packet socket bound to `ifindex` in the calling thread's namespace.
/// Protocol 0: it receives nothing, so no frame of the run is copied to it.
pub fn tx_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option that lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let addr = sockaddr(ifindex);
    // SAFETY: a sockaddr_ll that lives for the call, with its true length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr(ifindex: u32) -> libc::sockaddr_ll {
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    // Bound with protocol 0 (receive nothing); each frame carries its own EtherType.
    addr.sll_protocol = 0;
    addr.sll_ifindex = ifindex as i32;
    addr
}

/// One socket generator thread: sends `frames` round robin starting at `first`, on average
/// one frame per `interval_ns` in batches of [`BATCH`] (0: flat out), until `stop`; adds
/// what the kernel accepted to `sent`.
/// The calling thread must already be in the generator namespace and on its CPU.
pub fn run_socket(
    ifindex: u32,
    frames: &[Vec<u8>],
    first: usize,
    interval_ns: u64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<(), String> {
    let fd = tx_socket(ifindex)
        .map_err(|e| format!("opening an AF_PACKET socket on ifindex {ifindex}: {e}"))?;
    // Sleeps of tens of microseconds between paced batches: the default 50 us timer slack
    // would stretch every one of them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let mut iovs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    let n = frames.len();
    let mut next = first % n;
    let start = Instant::now();
    // Paced: the frame count due by now, as a send clock that slips after a long stall.
    let mut clock_start = 0u64;
    let mut clock_sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut batch = BATCH;
        if interval_ns != 0 {
            // Whole batches when they are due, as a socket flat out sends them: frames come
            // in bursts of BATCH, so the receiver's NAPI wakes once per batch whatever the
            // rate (sending each frame on its own time would measure thread wake-ups).
            let now = start.elapsed().as_nanos() as u64;
            let due_at = clock_start + (clock_sent + BATCH as u64 - 1) * interval_ns;
            if now < due_at {
                std::thread::sleep(Duration::from_nanos((due_at - now).min(1_000_000)));
                continue;
            }
            if now - due_at > CATCH_UP_NS {
                clock_start = now;
                clock_sent = 0;
            }
            let due = (now - clock_start) / interval_ns + 1 - clock_sent;
            batch = (due as usize).clamp(1, BATCH);
        }
        for (i, m) in msgs[..batch].iter_mut().enumerate() {
            // Each message points at one prebuilt frame; the socket's bound address is the
            // destination.
            m.msg_hdr.msg_iov = &raw mut iovs[(next + i) % n];
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `batch` messages, each with one iovec into `frames`, all alive for the call.
        let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), batch as u32, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Transient: the device is busy or memory is short; try again.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                    std::thread::yield_now();
                    continue;
                }
                _ => return Err(format!("sendmmsg on ifindex {ifindex}: {e}")),
            }
        }
        let k = rc as usize;
        next = (next + k) % n;
        clock_sent += k as u64;
        sent.fetch_add(k as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Opens `path` (a network namespace) and enters it on the calling thread.
pub fn enter_netns(path: &std::path::Path) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: setns only reads the fd, which `file` keeps open for the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "entering {}: {}",
            path.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(())
}
