//! The packet-path test bed: a generator namespace and a receiver namespace joined by a
//! veth pair, the two generators, and the receiver's statistics.
//!
//! ```text
//!  gen netns                                   rcv netns
//!  AF_PACKET sendmmsg (socket buffers), or     XDP program under test (or none)
//!  bench_tx (BPF_PROG_TEST_RUN, live frames)
//!     out of genX ──────────── veth ─────────▶ rcvX ─▶ nftables ingress ─▶ IP ─▶ iptables
//!                                                                         INPUT ─▶ UDP :9
//! ```
//!
//! Which generator sends is [`Bed::generator`] (see `generator.rs`). The socket generator
//! is stopped by a flag. The live-frames one is `bench_tx` run by `BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` and the generator veth as ingress device: one call per CPU
//! with a repeat count that never runs out, ended by a signal (the test-run loop checks for
//! pending signals between batches and returns EINTR): many short calls instead would each
//! wait for an RCU grace period when the kernel tears the call's page pool down.
//!
//! The receiver keeps GRO on, so veth runs NAPI even without an XDP program (a veth only
//! accepts XDP_TX frames from its peer when it has NAPI). With `threaded` NAPI the receive
//! work runs in a kernel thread that the bed pins to another CPU than the generator
//! ("apart"); without it, NAPI runs in softirq on the generator's CPU ("same").

use std::{
    fs::File,
    net::{Ipv4Addr, UdpSocket},
    os::{fd::AsRawFd as _, unix::fs::FileExt as _},
    sync::{
        Once,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunAttrs, TestRunOptions,
    maps::{Array, MapData, PerCpuArray},
    programs::Xdp,
};
use enforcer::lab::{self, Netns};
use enforcer_common::bench::{self as names, GenConfig};
use etherparse::PacketBuilder;

use super::{
    common::{agent_v4, in_ns},
    generator::{self, Kind},
};

/// The benchmark helper object built next to the enforcer's (see `enforcer-ebpf/src/bench.rs`).
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-bench"));

/// The receiver's address, where every generated frame goes (UDP port [`PORT`]).
pub const RCV_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The generator side's address.
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Destination UDP port: a socket is bound there that never reads, so admitted packets
/// go all the way into UDP and are dropped at its full receive buffer.
pub const PORT: u16 = 9;
/// Frames per live-frames batch (the kernel's default).
const BATCH: u32 = generator::BATCH as u32;

/// Where the receiving NAPI runs relative to the generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuMode {
    /// Generator and receive processing share one CPU (steadier on a small machine).
    Same,
    /// The generator on CPU 0, threaded NAPI pinned to CPU 1.
    Apart,
}

/// Counters read from the receiver namespace at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    /// When it was taken.
    pub at: Option<Instant>,
    /// rx_packets of the receiving veth: frames its NAPI processed (any verdict).
    pub rx_packets: u64,
    /// rx_dropped of the receiving veth: frames the full NAPI ring refused.
    pub rx_dropped: u64,
    /// `Ip: InDelivers`: packets handed to a transport protocol, i.e. admitted by every
    /// filter on the way.
    pub in_delivers: u64,
}

/// The test bed. Dropping it removes the namespaces (and so everything configured in
/// them); fields drop in order, sockets and files first.
pub struct Bed {
    /// Held open (never read): admitted packets end in its full receive buffer.
    _sink: UdpSocket,
    dev_file: File,
    snmp_file: File,
    /// The benchmark object: `bench_tx` and `bench_drop`.
    pub bench: Ebpf,
    /// The receiver-side interface, where programs and filters go.
    pub rcv_if: String,
    gen_ifindex: u32,
    /// The live-frames template (agent 1; `bench_tx` rewrites the source address).
    frame: Vec<u8>,
    /// The socket generator's frames, one per agent, complete with checksums.
    socket_frames: Vec<Vec<u8>>,
    gen_mac: [u8; 6],
    rcv_mac: [u8; 6],
    /// Frames the socket generators sent since the last flood started.
    socket_sent: AtomicU64,
    /// Which generator [`Bed::flood`] runs.
    pub generator: Kind,
    mode: CpuMode,
    /// The receiver's threaded NAPI kernel threads (apart mode), found by [`Bed::pin_napi`].
    napi_pids: Vec<i32>,
    /// Receiver namespace.
    pub rcv: Netns,
    /// Generator namespace.
    pub generator_ns: Netns,
}

fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let text = ns
        .exec(&["cat", &format!("/sys/class/net/{ifname}/address")])
        .expect("reading a MAC address");
    let mut mac = [0u8; 6];
    for (i, part) in text.trim().split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("hex MAC");
    }
    mac
}

/// `ETHTOOL_SGRO`: with GRO on, a veth has NAPI even without an XDP program.
const ETHTOOL_SGRO: u32 = 0x2c;
/// `ETHTOOL_STSO`: every TSO feature of the device.
const ETHTOOL_STSO: u32 = 0x1f;

/// `ETHTOOL_GTSO`: whether TSO is on.
pub const ETHTOOL_GTSO: u32 = 0x1e;

/// Sets one ethtool offload of `ifname` in the calling thread's namespace (`cmd` is one of
/// the legacy `ETHTOOL_S*` commands).
fn set_offload(ifname: &str, cmd: u32, on: bool) {
    ethtool_value(ifname, cmd, u32::from(on));
}

/// Whether one ethtool offload of `ifname` is on, in the calling thread's namespace (`cmd`
/// is one of the legacy `ETHTOOL_G*` commands).
pub fn offload(ifname: &str, cmd: u32) -> bool {
    ethtool_value(ifname, cmd, 0) != 0
}

/// Issues a legacy ethtool command that takes and returns one `ethtool_value`.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> u32 {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; 16],
        data: &raw mut value,
        _pad: [0; 16],
    };
    req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
    let sock = UdpSocket::bind("0.0.0.0:0").expect("a socket for ioctl");
    // SAFETY: SIOCETHTOOL reads and writes an ifreq whose data points at an ethtool_value;
    // both live for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) };
    assert_eq!(
        rc,
        0,
        "ethtool command {cmd:#x} on {ifname}: {}",
        std::io::Error::last_os_error()
    );
    value.data
}

extern "C" fn on_stop(_: libc::c_int) {}

/// SIGUSR1 with an empty handler and without SA_RESTART: it interrupts a generator's
/// BPF_PROG_TEST_RUN call, which then returns EINTR.
fn install_stop_signal() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (empty).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as usize;
            libc::sigemptyset(&raw mut sa.sa_mask);
            sa.sa_flags = 0;
            assert_eq!(
                libc::sigaction(libc::SIGUSR1, &raw const sa, std::ptr::null_mut()),
                0
            );
        }
    });
}

fn read_proc(file: &File) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    // pread at 0 regenerates the seq file each time.
    let n = file.read_at(&mut buf, 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

impl Bed {
    /// Creates both namespaces, the veth pair, the sink socket and the generator.
    pub fn new(mode: CpuMode, generator: Kind) -> Bed {
        let generator_ns = Netns::create(&lab::unique_name("bgen")).expect("generator netns");
        let rcv = Netns::create(&lab::unique_name("brcv")).expect("receiver netns");
        let gen_if = lab::unique_name("bg");
        let rcv_if = lab::unique_name("br");
        lab::veth_pair(
            &generator_ns,
            &gen_if,
            &[&format!("{GEN_ADDR}/24")],
            &rcv,
            &rcv_if,
            &[&format!("{RCV_ADDR}/24")],
        )
        .expect("veth pair");
        // Replies (ICMP) to the agents' range go back to the generator, where nothing
        // listens; loose reverse-path filtering so no config depends on it.
        lab::add_route(&rcv, "100.64.0.0/10", &GEN_ADDR.to_string()).expect("route");
        rcv.exec(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])
            .expect("sysctl");
        rcv.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{rcv_if}.rp_filter=0"),
        ])
        .expect("sysctl");
        let (sink, dev_file, snmp_file, gen_ifindex) = {
            let rcv_name = rcv_if.clone();
            let (sink, dev, snmp) = in_ns(&rcv, move || {
                set_offload(&rcv_name, ETHTOOL_SGRO, true);
                let sink = UdpSocket::bind((RCV_ADDR, PORT)).expect("binding the sink");
                let open = |p: &str| File::open(p).unwrap_or_else(|e| panic!("{p}: {e}"));
                (
                    sink,
                    open("/proc/thread-self/net/dev"),
                    open("/proc/thread-self/net/snmp"),
                )
            });
            let gen_name = gen_if.clone();
            let ifindex = in_ns(&generator_ns, move || {
                // veth hands a socket buffer to the peer's NAPI only when the sender has no
                // TSO (or the skb could be aggregated); otherwise it goes through the
                // backlog, in softirq on the sending CPU. An XDP program on the receiver
                // takes the sender's TSO away anyway (`veth_xdp_set`); without one, TSO off
                // keeps every configuration's receive work in the same NAPI thread, which
                // is what apart mode measures. The frames are 60 bytes: nothing to segment.
                set_offload(&gen_name, ETHTOOL_STSO, false);
                let c = std::ffi::CString::new(gen_name).expect("no NUL");
                // SAFETY: a valid NUL-terminated string.
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            });
            assert!(ifindex > 0, "no ifindex for {gen_if}");
            (sink, dev, snmp, ifindex)
        };
        // The smallest receive buffer: admitted packets reach UDP and are dropped there,
        // without a reader competing for the CPU.
        // SAFETY: setsockopt with an int value that lives for the call.
        unsafe {
            let v: libc::c_int = 1;
            libc::setsockopt(
                sink.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const v).cast(),
                4,
            );
        }
        let gen_mac = mac_of(&generator_ns, &gen_if);
        let rcv_mac = mac_of(&rcv, &rcv_if);
        let mut frame = udp_frame(gen_mac, rcv_mac, agent_v4(1));
        // UDP checksum 0 ("none"): the generator rewrites the source address, which the
        // UDP checksum would cover.
        frame[40] = 0;
        frame[41] = 0;
        let mut bench = EbpfLoader::new()
            .load(BENCH_OBJECT)
            .expect("loading the bench object");
        for name in [names::PROG_TX, names::PROG_DROP, names::PROG_PASS] {
            let p: &mut Xdp = bench
                .program_mut(name)
                .expect("bench program")
                .try_into()
                .expect("xdp");
            p.load().expect("verifying the bench program");
        }
        install_stop_signal();
        let mut bed = Bed {
            _sink: sink,
            dev_file,
            snmp_file,
            bench,
            rcv_if,
            gen_ifindex,
            frame,
            socket_frames: Vec::new(),
            gen_mac,
            rcv_mac,
            socket_sent: AtomicU64::new(0),
            generator,
            mode,
            napi_pids: Vec::new(),
            rcv,
            generator_ns,
        };
        bed.set_mode(mode);
        bed
    }

    /// Switches the receiver between softirq NAPI (same CPU) and threaded NAPI pinned to
    /// CPU 1 (apart).
    pub fn set_mode(&mut self, mode: CpuMode) {
        let value = if mode == CpuMode::Apart { "1" } else { "0" };
        self.rcv
            .exec(&[
                "sh",
                "-c",
                &format!("echo {value} > /sys/class/net/{}/threaded", self.rcv_if),
            ])
            .expect("setting threaded NAPI");
        self.mode = mode;
        self.pin_napi();
    }

    /// Pins the receiver's NAPI threads (if threaded) to CPU 1. Called again after every
    /// program change, which may recreate them.
    pub fn pin_napi(&mut self) {
        self.napi_pids.clear();
        if self.mode != CpuMode::Apart {
            return;
        }
        // Kernel thread names are cut at 15 bytes; "napi/" and the bed's interface name fit.
        let prefix = format!("napi/{}", self.rcv_if);
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.starts_with(&prefix) {
                // SAFETY: a zeroed cpu_set_t is empty; CPU 1 is inside it.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(1, &mut set);
                    libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set);
                }
                self.napi_pids.push(pid);
            }
        }
        assert!(
            !self.napi_pids.is_empty(),
            "no NAPI thread of {} found to pin",
            self.rcv_if
        );
    }

    /// CPU time (ns) the receiver's NAPI threads have run so far (apart mode: everything the
    /// receive path does for the veth's frames, from the XDP program to the UDP socket),
    /// from `/proc/PID/schedstat`; `None` in same mode, where receive work runs in softirq
    /// on the generator's CPU and cannot be told apart from it.
    pub fn napi_cpu_ns(&self) -> Option<u64> {
        if self.napi_pids.is_empty() {
            return None;
        }
        let mut total = 0;
        for pid in &self.napi_pids {
            let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
                .unwrap_or_else(|e| panic!("reading the schedstat of NAPI thread {pid}: {e}"));
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("schedstat starts with the run time in ns");
        }
        Some(total)
    }

    /// Frames `bench_drop` dropped so far, all CPUs.
    pub fn drops(&self) -> u64 {
        let map: PerCpuArray<&MapData, u64> = self
            .bench
            .map(names::MAP_DROPS)
            .expect("DROPS")
            .try_into()
            .expect("per-cpu array");
        map.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Reads the receiver's statistics.
    pub fn snapshot(&self) -> Snapshot {
        let at = Instant::now();
        let dev = read_proc(&self.dev_file);
        let mut s = Snapshot {
            at: Some(at),
            ..Snapshot::default()
        };
        for line in dev.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            if name.trim() == self.rcv_if {
                let f: Vec<u64> = rest
                    .split_whitespace()
                    .map(|v| v.parse().unwrap_or(0))
                    .collect();
                // bytes packets errs drop ...
                s.rx_packets = f.get(1).copied().unwrap_or(0);
                s.rx_dropped = f.get(3).copied().unwrap_or(0);
            }
        }
        let snmp = read_proc(&self.snmp_file);
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
        if let (Some(head), Some(vals)) = (ip.next(), ip.next())
            && let Some(i) = head.split_whitespace().position(|h| h == "InDelivers")
        {
            s.in_delivers = vals
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        s
    }

    /// Floods from `cpus` with frames from `agents` source addresses (`agent_v4(1..)`), each
    /// CPU pacing to one frame per `interval_ns` (0: as fast as it can), runs `during`
    /// while the flood goes on, stops the generators and returns what `during` returned
    /// and how many frames they sent.
    pub fn flood<R>(
        &mut self,
        cpus: &[usize],
        agents: u32,
        interval_ns: u64,
        during: impl FnOnce(&Bed) -> R,
    ) -> (R, u64) {
        match self.generator {
            Kind::Frames => self.configure_frames(agents, interval_ns),
            Kind::Socket => {
                let agents = agents.max(1);
                if self.socket_frames.len() != agents as usize {
                    self.socket_frames = (1..=agents)
                        .map(|id| udp_frame(self.gen_mac, self.rcv_mac, agent_v4(id)))
                        .collect();
                }
                self.socket_sent.store(0, Ordering::Relaxed);
            }
        }
        let bed: &Bed = self;
        let stop = AtomicBool::new(false);
        let result = thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let mut handles = Vec::new();
            for (index, &cpu) in cpus.iter().enumerate() {
                let tx = tx.clone();
                let stop = &stop;
                handles.push(s.spawn(move || {
                    generator::enter_netns(&bed.generator_ns.path())?;
                    lab::pin_to_cpu(cpu).map_err(|e| format!("pinning the generator: {e}"))?;
                    // SAFETY: pthread_self has no preconditions.
                    tx.send((index, unsafe { libc::pthread_self() }))
                        .expect("main waits");
                    match bed.generator {
                        Kind::Frames => bed.send_frames(),
                        Kind::Socket => {
                            // Threads start at different agents, so each agent's frames are
                            // spread over every CPU's share.
                            let first = index * bed.socket_frames.len() / cpus.len();
                            generator::run_socket(
                                bed.gen_ifindex,
                                &bed.socket_frames,
                                first,
                                interval_ns,
                                stop,
                                &bed.socket_sent,
                            )
                        }
                    }
                }));
            }
            drop(tx);
            // Threads report in any order; keep them in spawn order, beside their handles.
            let mut threads: Vec<(usize, libc::pthread_t)> = rx.iter().take(cpus.len()).collect();
            threads.sort_by_key(|&(index, _)| index);
            // A generator that failed before it reported is joined (and its error raised)
            // below, before `during` could measure nothing.
            if threads.len() < cpus.len() {
                for h in handles {
                    if let Err(e) = h.join().expect("generator thread") {
                        panic!("generator failed: {e}");
                    }
                }
                panic!("a generator thread ended before it started sending");
            }
            // A panic in `during` must still stop the generators, or the scope would wait
            // for calls that run for minutes.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| during(bed)));
            stop.store(true, Ordering::Relaxed);
            if bed.generator == Kind::Frames {
                interrupt_until_finished(&threads, &handles);
            }
            let out = out.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            for h in handles {
                if let Err(e) = h.join().expect("generator thread") {
                    panic!("generator failed ({} generator): {e}", bed.generator.name());
                }
            }
            out
        });
        let sent = self.sent();
        (result, sent)
    }

    /// Whether this kernel lets `BPF_PROG_TEST_RUN` send live frames (Linux 5.18, and not
    /// refused by policy): one frame from the generator namespace, which the receiver
    /// processes like any other. `Err` says what the kernel answered.
    pub fn probe_frames(&mut self) -> Result<(), String> {
        self.configure_frames(1, 0);
        let bed: &Bed = self;
        thread::scope(|s| {
            s.spawn(|| {
                generator::enter_netns(&bed.generator_ns.path())?;
                bed.test_run_frames(1)
            })
            .join()
            .expect("probe thread")
        })
    }

    fn configure_frames(&mut self, agents: u32, interval_ns: u64) {
        {
            let mut cfg: Array<&mut MapData, GenConfig> = self
                .bench
                .map_mut(names::MAP_CONFIG)
                .expect("GEN_CONFIG")
                .try_into()
                .expect("array");
            cfg.set(
                0,
                GenConfig {
                    base: u32::from(agent_v4(1)),
                    count: agents.max(1),
                    interval_ns,
                },
                0,
            )
            .expect("writing GEN_CONFIG");
        }
        self.reset_seq();
    }

    /// One live-frames generator: runs until a signal interrupts it (EINTR is its normal
    /// end).
    fn send_frames(&self) -> Result<(), String> {
        match self.test_run_frames(u32::MAX) {
            Err(e) if e.contains("Interrupted") || e.contains("os error 4") => Ok(()),
            other => other,
        }
    }

    fn test_run_frames(&self, repeat: u32) -> Result<(), String> {
        let prog: &Xdp = self
            .bench
            .program(names::PROG_TX)
            .expect("bench_tx")
            .try_into()
            .expect("xdp");
        let md = XdpMd {
            data_end: self.frame.len() as u32,
            ingress_ifindex: self.gen_ifindex,
            ..XdpMd::default()
        };
        // SAFETY: XdpMd is repr(C) u32s without padding.
        let ctx =
            unsafe { std::slice::from_raw_parts((&raw const md).cast::<u8>(), size_of::<XdpMd>()) };
        prog.test_run(TestRunOptions {
            data_in: Some(&self.frame),
            ctx_in: Some(ctx),
            repeat,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..TestRunOptions::default()
        })
        .map(|_| ())
        .map_err(|e| format!("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: {e:?}"))
    }

    fn seq_map(&self) -> PerCpuArray<&MapData, u64> {
        self.bench
            .map(names::MAP_SEQ)
            .expect("GEN_SEQ")
            .try_into()
            .expect("per-cpu array")
    }

    /// Frames the generators sent (all CPUs) since the last flood started.
    pub fn sent(&self) -> u64 {
        if self.generator == Kind::Socket {
            return self.socket_sent.load(Ordering::Relaxed);
        }
        self.seq_map()
            .get(&names::SEQ_SENT, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    fn reset_seq(&mut self) {
        let cpus = aya::util::nr_cpus().expect("cpus");
        let mut map: PerCpuArray<&mut MapData, u64> = self
            .bench
            .map_mut(names::MAP_SEQ)
            .expect("GEN_SEQ")
            .try_into()
            .expect("per-cpu array");
        for i in [names::SEQ_SENT, names::SEQ_NEXT_NS, names::SEQ_BURSTING] {
            map.set(
                i,
                aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).expect("values"),
                0,
            )
            .expect("resetting GEN_SEQ");
        }
    }
}

/// Signals the live-frames generator threads until every one has returned: a signal that
/// lands just before a thread enters the syscall would otherwise be lost.
fn interrupt_until_finished(
    threads: &[(usize, libc::pthread_t)],
    handles: &[thread::ScopedJoinHandle<'_, Result<(), String>>],
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while handles.iter().any(|h| !h.is_finished()) {
        for ((_, t), h) in threads.iter().zip(handles) {
            if !h.is_finished() {
                // SAFETY: the thread has not finished, and a scoped thread is only joined at
                // the end of the scope, so `t` names it.
                unsafe { libc::pthread_kill(*t, libc::SIGUSR1) };
            }
        }
        if Instant::now() > deadline {
            // Panicking here would leave the scope waiting for the generator for minutes;
            // the next run's start-up sweep removes what this leaves.
            eprintln!("generators did not stop after 30 s of signals; exiting");
            std::process::exit(3);
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// A 60-byte Ethernet + IPv4 + UDP frame from `src` to the receiver's sink port, with
/// correct checksums.
fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), RCV_ADDR.octets(), 64)
        .udp(40000, PORT)
        .write(&mut frame, &[0u8; 18])
        .expect("building the frame");
    frame
}

/// The kernel's `struct xdp_md` as BPF_PROG_TEST_RUN takes it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}
