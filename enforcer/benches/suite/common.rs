//! What every section shares: the machine and its hygiene, statistics, policies and
//! packets, and running code inside a network namespace without `'static` closures.

use std::{
    fmt::Write as _,
    fs::{self, File},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use enforcer::lab::Netns;
use etherparse::PacketBuilder;
use serde::{Deserialize, Serialize};

/// The machine a run happened on and the state it was in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Host name.
    pub host: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// `/proc/sys/net/core/bpf_jit_enable` (1: JIT on).
    pub bpf_jit_enable: String,
    /// The current clocksource (tsc is the cheap one).
    pub clocksource: String,
    /// Raw and packet sockets open on the machine when the run started (a tcpdump left
    /// running copies every frame and skews every packet-path number).
    pub raw_sockets: usize,
    /// 1-minute load average at the start and at the end of the run.
    #[serde(deserialize_with = "nan_if_null")]
    pub load_start: f64,
    /// 1-minute load average at the end of the run.
    #[serde(deserialize_with = "nan_if_null")]
    pub load_end: f64,
    /// Time the hypervisor ran someone else on this VM's CPUs during the run (percent of
    /// CPU time, from /proc/stat): a busy host makes every number noisy.
    #[serde(deserialize_with = "nan_if_null")]
    pub steal_percent: f64,
    /// Problems found by the hygiene check, empty when clean.
    pub warnings: Vec<String>,
    #[serde(skip, default)]
    cpu_start: (u64, u64),
}

/// (steal, total) jiffies of all CPUs so far.
fn cpu_times() -> (u64, u64) {
    let stat = read_trim("/proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guests are inside user.
    let total = fields.iter().take(8).sum();
    (fields.get(7).copied().unwrap_or(0), total)
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// 1-minute load average.
pub fn load_average() -> f64 {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Open sockets listed in a `/proc/net` table (one header line).
fn proc_net_entries(path: &str) -> usize {
    fs::read_to_string(path)
        .map(|t| t.lines().skip(1).filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

impl Machine {
    /// Describes this machine and checks the conditions numbers depend on: JIT on, no raw
    /// or packet sockets, a TSC clocksource. Findings are warnings, printed and recorded.
    pub fn probe() -> Machine {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        let raw_sockets = ["/proc/net/raw", "/proc/net/raw6", "/proc/net/packet"]
            .iter()
            .map(|p| proc_net_entries(p))
            .sum();
        let mut m = Machine {
            host: read_trim("/proc/sys/kernel/hostname"),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            bpf_jit_enable: read_trim("/proc/sys/net/core/bpf_jit_enable"),
            clocksource: read_trim(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            ),
            raw_sockets,
            load_start: load_average(),
            load_end: f64::NAN,
            steal_percent: f64::NAN,
            warnings: Vec::new(),
            cpu_start: cpu_times(),
        };
        if m.bpf_jit_enable != "1" && m.bpf_jit_enable != "2" {
            m.warnings.push(format!(
                "BPF JIT is off (bpf_jit_enable = {:?}): programs run interpreted",
                m.bpf_jit_enable
            ));
        }
        if m.raw_sockets > 0 {
            m.warnings.push(format!(
                "{} raw/packet sockets are open (tcpdump?); they see every frame",
                m.raw_sockets
            ));
        }
        if m.clocksource != "tsc" {
            m.warnings.push(format!(
                "clocksource is {:?}, not tsc: timestamps cost more",
                m.clocksource
            ));
        }
        if m.load_start > 0.5 {
            m.warnings.push(format!(
                "load average {:.2} at the start: other work competes for the CPUs",
                m.load_start
            ));
        }
        m
    }

    /// Records the end of the run: load average and the hypervisor's steal time.
    pub fn finish(&mut self) {
        self.load_end = load_average();
        let (steal, total) = cpu_times();
        let (steal0, total0) = self.cpu_start;
        self.steal_percent =
            (steal - steal0) as f64 / (total.saturating_sub(total0)).max(1) as f64 * 100.0;
        if self.steal_percent > 2.0 {
            self.warnings.push(format!(
                "the hypervisor took {:.1}% of CPU time during the run (steal): expect noise",
                self.steal_percent
            ));
        }
    }

    /// One line naming the machine.
    pub fn describe(&self) -> String {
        format!(
            "{}, Linux {}, {} ({} CPUs), JIT {}, clocksource {}, load {:.2}",
            self.host,
            self.kernel,
            self.cpu,
            self.cpus,
            if self.bpf_jit_enable == "0" {
                "off"
            } else {
                "on"
            },
            self.clocksource,
            self.load_start
        )
    }
}

/// `YYYY-MM-DD` (UTC) of now, without a date crate.
pub fn today() -> String {
    // `time::Date` displays as YYYY-MM-DD.
    time::OffsetDateTime::now_utc().date().to_string()
}

/// Reads a number that JSON holds as `null` when it was NaN (serde_json writes NaN so).
pub fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Stat {
    /// Median (upper median for an even count).
    #[serde(deserialize_with = "nan_if_null")]
    pub median: f64,
    /// Smallest sample.
    #[serde(deserialize_with = "nan_if_null")]
    pub min: f64,
    /// Largest sample.
    #[serde(deserialize_with = "nan_if_null")]
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Stat {
    /// Summarises `samples` (NaN when empty).
    pub fn of(samples: &[f64]) -> Stat {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Stat {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        v.sort_by(f64::total_cmp);
        Stat {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        }
    }
}

/// Source address of agent `id`: 100.64.0.0/10 counted up (the generator writes the same).
pub fn agent_v4(id: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + id)
}

/// IPv6 source address of agent `id`.
pub fn agent_v6(id: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0)) + u128::from(id))
}

/// The `k`-th allow-list prefix of agent 1: distinct /24s spread over the address space
/// (an odd multiplier is a bijection modulo 2^24).
pub fn prefix_v4(k: u32) -> Ipv4Addr {
    Ipv4Addr::from((k.wrapping_mul(2_654_435_761) & 0x00ff_ffff) << 8)
}

/// The `k`-th IPv6 allow-list prefix of agent 1: distinct /48s in 2400::/16, spread the
/// same way (the addresses only ever appear in maps and test-run frames).
pub fn prefix_v6(k: u32) -> Ipv6Addr {
    let spread = u128::from(k.wrapping_mul(2_654_435_761) & 0x00ff_ffff);
    Ipv6Addr::from((0x2400u128 << 112) | (spread << 80))
}

/// Destination agent `id` (> 1) may reach, IPv4 (198.18.0.0/15, the benchmarking range).
pub fn other_dst_v4(id: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + id)
}

/// Destination agent `id` (> 1) may reach, IPv6 (2001:2::/48, the benchmarking range).
pub fn other_dst_v6(id: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0)) + u128::from(id))
}

/// What the in-kernel policy gives agent 1 besides its prefixes.
#[derive(Clone, Copy, Debug)]
pub struct Agent1 {
    /// Packets per second (burst a tenth of it, at least 1); 0 for no limit.
    pub pps: u64,
    /// Whether agent 1's prefixes include IPv6 ones.
    pub v6: bool,
}

/// A policy with `agents` agents. Agent 1 is the measured one: `prefixes` allow rules
/// (TCP 443) per family and the given limit; every other agent has one source address per
/// family and one allow rule per family, so the maps hold `agents` sources and
/// `prefixes + agents - 1` destinations per family.
pub fn policy_text(agents: u32, prefixes: u32, a1: Agent1) -> String {
    let mut s = String::with_capacity(agents as usize * 260 + prefixes as usize * 50);
    let rate = if a1.pps == 0 {
        String::new()
    } else {
        format!(
            "rate = {{ packets_per_sec = {}, packets_burst = {} }}\n",
            a1.pps,
            (a1.pps / 10).max(1)
        )
    };
    let sources = if a1.v6 {
        format!("\"{}\", \"{}\"", agent_v4(1), agent_v6(1))
    } else {
        format!("\"{}\"", agent_v4(1))
    };
    let _ = write!(
        s,
        "[[agents]]\nid = 1\nname = \"a1\"\nprefixes = [{sources}]\negress_default = \"deny\"\n{rate}\
         [[agents.egress]]\naction = \"allow\"\nproto = \"tcp\"\nports = \"443\"\nto = ["
    );
    for k in 0..prefixes {
        let _ = write!(s, "\"{}/24\",", prefix_v4(k));
        if a1.v6 {
            let _ = write!(s, "\"{}/48\",", prefix_v6(k));
        }
    }
    s.push_str("]\n");
    for id in 2..=agents {
        if a1.v6 {
            let _ = write!(
                s,
                "[[agents]]\nid = {id}\nname = \"a{id}\"\nprefixes = [\"{}\", \"{}\"]\n\
                 egress_default = \"deny\"\n[[agents.egress]]\naction = \"allow\"\nto = [\"{}\", \"{}\"]\n",
                agent_v4(id),
                agent_v6(id),
                other_dst_v4(id),
                other_dst_v6(id)
            );
        } else {
            let _ = write!(
                s,
                "[[agents]]\nid = {id}\nname = \"a{id}\"\nprefixes = [\"{}\"]\n\
                 egress_default = \"deny\"\n[[agents.egress]]\naction = \"allow\"\nto = [\"{}\"]\n",
                agent_v4(id),
                other_dst_v4(id)
            );
        }
    }
    s
}

/// A `[[profiles]]` entry to append to a [`policy_text`]: agents made from it have what
/// every agent but the first has, one allow rule, here to `to`.
pub fn profile_text(name: &str, to: Ipv4Addr) -> String {
    format!(
        "[[profiles]]\nname = \"{name}\"\negress_default = \"deny\"\n\
         [[profiles.egress]]\naction = \"allow\"\nto = [\"{to}\"]\n"
    )
}

/// An Ethernet + IPv4 + TCP (port 443) frame.
pub fn tcp_v4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, 443, 1, 1024)
        .write(&mut out, &[0u8; 18])
        .expect("writing a tcp frame");
    out
}

/// An Ethernet + IPv6 + TCP (port 443) frame.
pub fn tcp_v6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src.octets(), dst.octets(), 64)
        .tcp(40000, 443, 1, 1024)
        .write(&mut out, &[0u8; 18])
        .expect("writing a tcp frame");
    out
}

/// Runs `f` on a scoped thread that has entered `ns`, so `f` may borrow from the caller
/// (sockets, interface lookups and XDP attachment use the calling thread's namespace).
pub fn in_ns<T: Send, F: FnOnce() -> T + Send>(ns: &Netns, f: F) -> T {
    let file = File::open(ns.path()).expect("opening the namespace");
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns only reads the fd, which `file` keeps open for the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "entering {}", ns.name());
            drop(file);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into a flag that [`check_interrupted`] turns into a panic at
/// the next measurement boundary, so unwinding runs every clean-up guard (namespaces,
/// pins, rules, the daemon) instead of the process dying with them in place.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as *const () as usize;
            libc::sigemptyset(&raw mut sa.sa_mask);
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
    }
}

/// Panics (and so cleans up) if SIGINT or SIGTERM arrived.
pub fn check_interrupted() {
    assert!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted: cleaning up and stopping"
    );
}

/// The pid `lab::unique_name(prefix)` encoded after `prefix` (five base-36 digits).
fn pid_of(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?.get(..5)?;
    u32::from_str_radix(digits, 36).ok()
}

/// Removes what a run killed without unwinding (SIGKILL, a crash) left behind: namespaces
/// (with their nftables tables, iptables rules, veths and programs) and bpffs mounts whose
/// creating process is gone. Only names this benchmark makes are touched.
pub fn sweep_stale() {
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        for prefix in ["bgen", "brcv", "bscale"] {
            if let Some(pid) = pid_of(name, prefix)
                && !alive(pid)
            {
                println!("cleaning up namespace {name} left by a dead run (pid {pid})");
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", name])
                    .status();
            }
        }
    }
    // Private bpffs instances of the lab (`/run/enforcer-lab/bpffs<pid>...`).
    for entry in fs::read_dir("/run/enforcer-lab")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = pid_of(&name, "bpffs")
            && !alive(pid)
        {
            println!("cleaning up bpffs {name} left by a dead run (pid {pid})");
            let _ = std::process::Command::new("umount")
                .arg(entry.path())
                .status();
            let _ = fs::remove_dir(entry.path());
        }
    }
    let _ = fs::remove_dir("/run/enforcer-lab");
}
