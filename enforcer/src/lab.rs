//! A network-namespace lab for the demo, the integration tests and the benchmarks.
//!
//! It builds small topologies (namespaces joined by veth pairs, optionally routed through a
//! forwarding namespace), runs code inside them and pushes bounded amounts of traffic between
//! them, so that the enforcer's XDP program can be attached to a real interface and observed.
//!
//! Topology is made by shelling out to `ip` (iproute2): it is what an operator would type, its
//! errors are readable, and it saves us a netlink dependency. Code runs inside a namespace on a
//! dedicated thread that `setns(2)`s into it; a socket belongs to the namespace of the thread
//! that created it, for its whole life, so only socket *creation* has to happen on such a
//! thread.
//!
//! Everything here cleans up on drop and every traffic helper is bounded in time. Nothing is
//! ever sent anywhere but into the namespaces and veths the caller created.
//!
//! Needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`); tests gate on [`require_root`].
//!
//! `ip netns exec` gives the command a private mount namespace with a fresh `/sys`, so a bpffs
//! mounted on `/sys/fs/bpf` outside is *not* visible to processes started by
//! [`Netns::spawn`]; pin under a [`BpffsMount`] (below `/run`) when both sides must see the pins.

pub mod etcd;

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{self, ErrorKind, Read, Write},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Where `ip netns add` bind-mounts named network namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Parent directory of the bpffs instances made by [`BpffsMount`].
const BPFFS_DIR: &str = "/run/enforcer-lab";
/// Linux's `IFNAMSIZ` less the terminating NUL.
const MAX_IFNAME_LEN: usize = 15;
/// Datagrams per `sendmmsg`/`recvmmsg` call: enough to amortise the syscall, small enough
/// that the stop flag and the deadline are checked often.
const BATCH: usize = 64;
/// How often background loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a dropped [`ChildGuard`] waits after SIGTERM before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

/// What went wrong while building the lab or moving traffic through it.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line, as it would be typed.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// A command could not be started at all (usually: `ip` is not installed).
    #[error("starting `{command}`")]
    Spawn {
        /// The command line, as it would be typed.
        command: String,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },
    /// A system call or socket operation failed.
    #[error("{action}")]
    Io {
        /// What was being done, e.g. "binding udp socket to 198.18.0.1:9 in netns lab1".
        action: String,
        /// The error the kernel returned.
        #[source]
        source: io::Error,
    },
    /// A namespace name `ip netns` would reject or misinterpret.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An interface name that does not fit `IFNAMSIZ`.
    #[error("interface name {name:?} is longer than {MAX_IFNAME_LEN} bytes")]
    InterfaceName {
        /// The rejected name.
        name: String,
    },
    /// The interface does not exist in that namespace.
    #[error("no interface {ifname:?} in network namespace {netns}")]
    NoSuchInterface {
        /// The namespace that was searched.
        netns: String,
        /// The interface that was looked up.
        ifname: String,
    },
    /// A TCP echo came back different from what was sent.
    #[error("echo from {addr} did not match: sent {sent:?}, received {received:?}")]
    EchoMismatch {
        /// The echo server.
        addr: SocketAddr,
        /// The line sent.
        sent: String,
        /// What came back before the deadline.
        received: String,
    },
    /// A CPU number outside the affinity mask's range.
    #[error("cpu {cpu} is out of range (the affinity mask holds {max} cpus)")]
    CpuOutOfRange {
        /// The requested CPU.
        cpu: usize,
        /// The size of the mask.
        max: usize,
    },
}

impl LabError {
    fn io(action: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            action: action.into(),
            source,
        }
    }
}

/// Runs a command to completion and returns its stdout, or its stderr inside the error.
fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, LabError> {
    let command = display_command(program, args);
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn display_command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.as_ref().to_string_lossy());
    }
    line
}

/// Returns a name unique to this process and call, at most 15 bytes so that it is also a
/// valid interface name.
///
/// The process id is written in fixed-width base 36 so that two processes can never produce
/// the same name; a per-process counter follows. `prefix` is cut short when needed.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // pid_max is at most 2^22, which fits in five base-36 digits (36^5 > 6 * 10^7).
    let suffix = format!("{:0>5}{}", base36(u64::from(std::process::id())), base36(n));
    let room = MAX_IFNAME_LEN.saturating_sub(suffix.len());
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(room)
        .collect();
    format!("{prefix}{suffix}")
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ascii")
}

/// A named network namespace (`ip netns add`), deleted on drop.
///
/// Deleting only removes the name: the kernel frees the namespace, and the veth ends inside
/// it, once the last process and socket in it are gone. Drop sockets and children first.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up. A stale namespace of the same name,
    /// left by a crashed run, is deleted first.
    pub fn create(name: &str) -> Result<Self, LabError> {
        validate_netns_name(name)?;
        if Path::new(NETNS_DIR).join(name).exists() {
            // Best effort: if it cannot be deleted, `ip netns add` reports why below.
            let _ = run("ip", &["netns", "del", name]);
        }
        run("ip", &["netns", "add", name])?;
        // From here on, Drop deletes the namespace if a later step fails.
        let netns = Self {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that pins the namespace (`/run/netns/NAME`); `setns(2)` takes it.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip netns exec NAME args...` to completion and returns its stdout.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, LabError> {
        let mut full: Vec<&OsStr> = vec!["netns".as_ref(), "exec".as_ref(), self.name.as_ref()];
        full.extend(args.iter().map(AsRef::as_ref));
        run("ip", &full)
    }

    /// Runs `ip -n NAME args...` (an iproute2 command inside the namespace).
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String, LabError> {
        let mut full: Vec<&OsStr> = vec!["-n".as_ref(), self.name.as_ref()];
        full.extend(args.iter().map(AsRef::as_ref));
        run("ip", &full)
    }

    /// A [`Command`] that runs `program` inside the namespace (`ip netns exec NAME program`),
    /// for the caller to add arguments, environment and stdio to.
    ///
    /// `ip netns exec` execs the program in place, so the child's pid is the program's own
    /// and signals reach it directly.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Starts `args[0] args[1..]` inside the namespace. Wrap the child in a [`ChildGuard`] so
    /// that it cannot outlive the test.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Child, LabError> {
        let Some((program, rest)) = args.split_first() else {
            return Err(LabError::Spawn {
                command: format!("ip netns exec {}", self.name),
                source: io::Error::new(ErrorKind::InvalidInput, "no program given"),
            });
        };
        self.command(program)
            .args(rest)
            .spawn()
            .map_err(|source| LabError::Spawn {
                command: format!(
                    "ip netns exec {} {}",
                    self.name,
                    display_command(&program.as_ref().to_string_lossy(), rest)
                ),
                source,
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Nothing useful can be done with a failure here; a stale name is removed by the
        // next `create` of the same name.
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn validate_netns_name(name: &str) -> Result<(), LabError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("it is a path component")
    } else if name.len() > 200 {
        Some("it is longer than 200 bytes")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("only ascii letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LabError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn validate_ifname(name: &str) -> Result<(), LabError> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(LabError::InterfaceName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Joins `a` and `b` with a veth pair (`a_if` in `a`, `b_if` in `b`), assigns the addresses
/// (CIDR notation, IPv4 or IPv6) and brings both ends up.
///
/// Each end gets two TX and two RX queues so that traffic from two CPUs can be spread over
/// two NAPI contexts when an XDP program is attached, as on a real multi-queue NIC. Both ends
/// are created directly inside their namespaces, so nothing is ever left in the caller's.
pub fn veth_pair(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> Result<(), LabError> {
    validate_ifname(a_if)?;
    validate_ifname(b_if)?;
    #[rustfmt::skip]
    run("ip", &[
        "link", "add", "name", a_if, "netns", a.name(), "numtxqueues", "2", "numrxqueues", "2",
        "type", "veth",
        "peer", "name", b_if, "netns", b.name(), "numtxqueues", "2", "numrxqueues", "2",
    ])?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            add_address(ns, ifname, addr)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Assigns `cidr` (e.g. `198.18.0.1/24`, `2001:db8::1/64`) to `ifname` inside `ns`. IPv6
/// addresses skip duplicate address detection (`nodad`) so they are usable at once.
pub fn add_address(ns: &Netns, ifname: &str, cidr: &str) -> Result<(), LabError> {
    if cidr.contains(':') {
        ns.ip(&["-6", "addr", "add", cidr, "dev", ifname, "nodad"])?;
    } else {
        ns.ip(&["-4", "addr", "add", cidr, "dev", ifname])?;
    }
    Ok(())
}

/// Turns on IPv4 and IPv6 forwarding inside `ns`, so it can route between its interfaces.
pub fn set_forwarding(ns: &Netns) -> Result<(), LabError> {
    // /proc/sys/net shows the network namespace of the thread that opens it.
    try_in_netns(ns, || -> Result<(), LabError> {
        for knob in [
            "/proc/sys/net/ipv4/ip_forward",
            "/proc/sys/net/ipv6/conf/all/forwarding",
        ] {
            std::fs::write(knob, "1")
                .map_err(|source| LabError::io(format!("writing 1 to {knob}"), source))?;
        }
        Ok(())
    })?
}

/// Adds (or replaces) a route to `dest` (CIDR) via the gateway `via` inside `ns`.
pub fn add_route(ns: &Netns, dest: &str, via: &str) -> Result<(), LabError> {
    ns.ip(&["route", "replace", dest, "via", via])?;
    Ok(())
}

/// Returns the index of interface `ifname` inside `ns`, as XDP attachment wants it.
pub fn ifindex(ns: &Netns, ifname: &str) -> Result<u32, LabError> {
    validate_ifname(ifname)?;
    let c_name = CString::new(ifname).map_err(|_| LabError::InterfaceName {
        name: ifname.to_owned(),
    })?;
    // SAFETY: c_name is a valid NUL-terminated string that outlives the call.
    let index = try_in_netns(ns, move || unsafe { libc::if_nametoindex(c_name.as_ptr()) })?;
    if index == 0 {
        return Err(LabError::NoSuchInterface {
            netns: ns.name().to_owned(),
            ifname: ifname.to_owned(),
        });
    }
    Ok(index)
}

/// A thread running inside a network namespace, from [`spawn_in_netns`].
#[derive(Debug)]
pub struct NetnsThread<T>(JoinHandle<Option<T>>);

impl<T> NetnsThread<T> {
    /// Waits for the thread and returns its result, or the payload of its panic.
    pub fn join(self) -> thread::Result<T> {
        // `None` only comes from a thread that failed to enter the namespace, and
        // spawn_in_netns never hands such a thread out.
        self.0
            .join()
            .map(|value| value.expect("the thread entered the namespace"))
    }

    /// Whether the thread has finished.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Starts `f` on a new thread inside `ns` and returns once the thread has entered the
/// namespace. Failing to enter is reported here, before `f` runs.
pub fn spawn_in_netns<T, F>(ns: &Netns, f: F) -> Result<NetnsThread<T>, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = ns.path();
    let file = File::open(&path).map_err(|source| {
        LabError::io(
            format!("opening network namespace {}", path.display()),
            source,
        )
    })?;
    let (entered_tx, entered_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let handle = thread::Builder::new()
        .name(format!("netns-{}", ns.name()))
        .spawn(move || {
            // SAFETY: setns only reads the fd, which `file` keeps open for the call. Only this
            // thread changes namespace (CLONE_NEWNET has no single-threaded requirement).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            drop(file);
            if rc != 0 {
                let _ = entered_tx.send(Err(io::Error::last_os_error()));
                // `f` must not run in the wrong namespace; the caller reports the error.
                return None;
            }
            let _ = entered_tx.send(Ok(()));
            Some(f())
        })
        .map_err(|source| LabError::io("spawning a thread", source))?;
    let entered = entered_rx
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("thread exited before entering")));
    if let Err(source) = entered {
        let _ = handle.join();
        return Err(LabError::io(
            format!("entering network namespace {}", path.display()),
            source,
        ));
    }
    Ok(NetnsThread(handle))
}

/// Runs `f` to completion on a new thread inside `ns` and returns its result; a panic in `f`
/// is re-raised here.
pub fn try_in_netns<T, F>(ns: &Netns, f: F) -> Result<T, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let handle = spawn_in_netns(ns, f)?;
    match handle.join() {
        Ok(value) => Ok(value),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Like [`try_in_netns`], for tests: panics if the namespace cannot be entered.
pub fn in_netns<T, F>(ns: &Netns, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    try_in_netns(ns, f).unwrap_or_else(|e| panic!("running in netns {}: {e}", ns.name()))
}

/// Pins the calling thread to `cpu`, so that senders and receivers do not wander between
/// CPUs during a measurement.
pub fn pin_to_cpu(cpu: usize) -> Result<(), LabError> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    let max = 8 * mem::size_of::<libc::cpu_set_t>();
    if cpu >= max {
        return Err(LabError::CpuOutOfRange { cpu, max });
    }
    // SAFETY: cpu is inside the set's bounds (checked above); pid 0 is the calling thread.
    let rc = unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(LabError::io(
            format!("pinning thread to cpu {cpu}"),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A private bpffs instance mounted under `/run/enforcer-lab/`, so a test can pin maps and
/// programs without touching `/sys/fs/bpf` or another test's pins. Each mount of bpffs is a
/// separate instance. On drop, the pins are removed, the instance unmounted and the
/// directory deleted.
#[derive(Debug)]
pub struct BpffsMount {
    path: PathBuf,
}

impl BpffsMount {
    /// Mounts a new bpffs instance on a new directory.
    pub fn new() -> Result<Self, LabError> {
        let path = Path::new(BPFFS_DIR).join(unique_name("bpffs"));
        // A concurrent drop may remove the parent between the two mkdirs; try again then.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match std::fs::create_dir_all(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound && attempts < 5 => continue,
                Err(source) => {
                    return Err(LabError::io(format!("creating {}", path.display()), source));
                }
            }
        }
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .expect("the path is built from ascii without NUL");
        // SAFETY: all pointers are valid NUL-terminated strings; bpffs takes no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c_path.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let source = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(LabError::io(
                format!("mounting bpffs on {}", path.display()),
                source,
            ));
        }
        Ok(Self { path })
    }

    /// Where the instance is mounted; pin paths go below it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        // Unmounting alone frees the instance's pins; removing them first also releases them
        // when something else (an `ip netns exec` mount namespace) still holds the mount.
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                let p = entry.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        if let Ok(c_path) = CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: c_path is a valid NUL-terminated string.
            unsafe {
                if libc::umount2(c_path.as_ptr(), 0) != 0 {
                    // Busy: detach it now, the kernel finishes when the last user goes.
                    libc::umount2(c_path.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        let _ = std::fs::remove_dir(&self.path);
        // Succeeds only when no other mount is left in it.
        let _ = std::fs::remove_dir(BPFFS_DIR);
    }
}

/// Owns a child process and makes sure it is gone when dropped: SIGTERM, up to five seconds
/// to exit, then SIGKILL; always reaped.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Takes ownership of `child`.
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// The child itself, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Sends `signal` (e.g. `libc::SIGINT`) unless the child has already been reaped, so a
    /// recycled pid is never signalled.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<(), LabError> {
        let id = self.0.id();
        let action = || format!("sending signal {signal} to pid {id}");
        if self
            .0
            .try_wait()
            .map_err(|e| LabError::io(action(), e))?
            .is_some()
        {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(id).expect("pids fit in pid_t");
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(LabError::io(action(), io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .0
                .try_wait()
                .map_err(|e| LabError::io(format!("waiting for pid {}", self.0.id()), e))?;
            if status.is_some() || Instant::now() >= deadline {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10).min(deadline - Instant::now()));
        }
    }

    /// SIGTERM, then SIGKILL if the child has not exited within `grace`; returns how it
    /// exited.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, LabError> {
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        self.0
            .wait()
            .map_err(|e| LabError::io(format!("reaping pid {}", self.0.id()), e))
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        Self(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.terminate(TERM_GRACE).is_err() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Returns whether a test that needs root can run. Without root it panics under CI
/// (`CI=true`), where a skipped test would pass silently, and otherwise prints why it skips.
#[track_caller]
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root: CI must run as root; refusing to skip");
    }
    eprintln!("skipping {test}: needs root");
    false
}

fn set_int_sockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives for the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unspecified(addr: &SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Counts UDP datagrams arriving at an address inside a namespace, on a background thread.
#[derive(Debug)]
pub struct UdpSink {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    packets: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    /// Binds `addr` (port 0 picks one; see [`UdpSink::local_addr`]) inside `ns` and starts
    /// counting. The receive buffer is raised to 8 MiB so that bursts are not lost in the
    /// socket before they are counted.
    pub fn spawn(ns: &Netns, addr: SocketAddr) -> Result<Self, LabError> {
        let socket = try_in_netns(ns, move || UdpSocket::bind(addr))?.map_err(|e| {
            LabError::io(
                format!("binding udp socket to {addr} in netns {}", ns.name()),
                e,
            )
        })?;
        let fd = socket.as_raw_fd();
        // SO_RCVBUFFORCE (root) goes past net.core.rmem_max; fall back to what is allowed.
        if set_int_sockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20).is_err() {
            let _ = set_int_sockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20);
        }
        socket
            .set_read_timeout(Some(POLL))
            .map_err(|e| LabError::io("setting udp sink read timeout", e))?;
        let local = socket
            .local_addr()
            .map_err(|e| LabError::io("reading udp sink address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let packets = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name(format!("udp-sink-{local}"))
            .spawn({
                let (stop, packets, bytes) = (stop.clone(), packets.clone(), bytes.clone());
                move || receive_loop(&socket, &stop, &packets, &bytes)
            })
            .map_err(|e| LabError::io("spawning udp sink thread", e))?;
        Ok(Self {
            local,
            stop,
            packets,
            bytes,
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Packets and bytes (UDP payload) counted so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Stops the receiver, closes the socket and returns the final (packets, bytes).
    pub fn stop(mut self) -> (u64, u64) {
        self.shutdown();
        self.counts()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The loop wakes at least every POLL; a panic in it has nothing left to report.
            let _ = thread.join();
        }
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn receive_loop(socket: &UdpSocket, stop: &AtomicBool, packets: &AtomicU64, bytes: &AtomicU64) {
    const BUF: usize = 2048;
    let mut buffers = vec![[0u8; BUF]; BATCH];
    let mut iovecs: Vec<libc::iovec> = buffers
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: BUF,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain data; all-zero means no name and no control data.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // MSG_WAITFORONE: block (up to SO_RCVTIMEO) for the first datagram only. MSG_TRUNC:
        // msg_len is the datagram's real length even when it did not fit the buffer.
        // SAFETY: every mmsghdr points at its own iovec and buffer, which outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            let n = n as usize;
            packets.fetch_add(n as u64, Ordering::Relaxed);
            let total: u64 = msgs[..n].iter().map(|m| u64::from(m.msg_len)).sum();
            bytes.fetch_add(total, Ordering::Relaxed);
        }
        // Timeouts (EAGAIN) and errors alike: look at the stop flag and go on.
    }
}

/// A TCP server inside a namespace that echoes back whatever each connection sends.
#[derive(Debug)]
pub struct TcpEchoServer {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEchoServer {
    /// Listens on `addr` (port 0 picks one; see [`TcpEchoServer::local_addr`]) inside `ns`.
    pub fn spawn(ns: &Netns, addr: SocketAddr) -> Result<Self, LabError> {
        let listener = try_in_netns(ns, move || TcpListener::bind(addr))?.map_err(|e| {
            LabError::io(format!("listening on tcp {addr} in netns {}", ns.name()), e)
        })?;
        // Non-blocking accept lets the loop notice the stop flag.
        listener
            .set_nonblocking(true)
            .map_err(|e| LabError::io("making tcp listener non-blocking", e))?;
        let local = listener
            .local_addr()
            .map_err(|e| LabError::io("reading tcp listener address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name(format!("tcp-echo-{local}"))
            .spawn({
                let (stop, accepted) = (stop.clone(), accepted.clone());
                move || accept_loop(&listener, &stop, &accepted)
            })
            .map_err(|e| LabError::io("spawning tcp echo thread", e))?;
        Ok(Self {
            local,
            stop,
            accepted,
            thread: Some(thread),
        })
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes every connection and returns how many were accepted.
    pub fn stop(mut self) -> u64 {
        self.shutdown();
        self.accepted()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: &TcpListener, stop: &Arc<AtomicBool>, accepted: &AtomicU64) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let stop = stop.clone();
                connections.retain(|h| !h.is_finished());
                if let Ok(h) = thread::Builder::new()
                    .name("tcp-echo-conn".into())
                    .spawn(move || echo(stream, &stop))
                {
                    connections.push(h);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            // ECONNABORTED and friends: the next accept may work.
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    for h in connections {
        let _ = h.join();
    }
}

fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    // The accepted socket may inherit non-blocking mode; use timeouts instead.
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Connects from `ns` to the echo server at `addr`, sends a line and checks that the same
/// line comes back, all within `timeout`. The error says which step failed.
pub fn check_tcp_echo(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<(), LabError> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let line = format!(
        "probe {} {}\n",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let deadline = Instant::now() + timeout;
    let netns = ns.name().to_owned();
    try_in_netns(ns, move || {
        let step = |what: &str, e: io::Error| {
            LabError::io(format!("{what} tcp {addr} from netns {netns}"), e)
        };
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let mut stream =
            TcpStream::connect_timeout(&addr, left()).map_err(|e| step("connecting to", e))?;
        stream
            .set_write_timeout(Some(left()))
            .and_then(|()| stream.write_all(line.as_bytes()))
            .map_err(|e| step("writing to", e))?;
        let mut received = Vec::new();
        let mut buf = [0u8; 256];
        while received.len() < line.len() {
            if Instant::now() >= deadline {
                break;
            }
            stream
                .set_read_timeout(Some(left()))
                .map_err(|e| step("reading from", e))?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break;
                }
                Err(e) => return Err(step("reading from", e)),
            }
        }
        if received == line.as_bytes() {
            Ok(())
        } else {
            Err(LabError::EchoMismatch {
                addr,
                sent: line,
                received: String::from_utf8_lossy(&received).into_owned(),
            })
        }
    })?
}

/// Whether a TCP echo round trip from `ns` to `addr` succeeds within `timeout`; see
/// [`check_tcp_echo`] for the reason when it does not.
pub fn tcp_probe(ns: &Netns, addr: SocketAddr, timeout: Duration) -> bool {
    check_tcp_echo(ns, addr, timeout).is_ok()
}

/// Makes a non-blocking UDP socket inside the current namespace, bound to `src` (any address
/// of the right family if `None`) and connected to `dst`.
fn sender_socket(dst: SocketAddr, src: Option<IpAddr>) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(SocketAddr::new(src.unwrap_or_else(|| unspecified(&dst)), 0))?;
    socket.connect(dst)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Sends `count` datagrams carrying `payload` from `ns` to `dst`, pausing `gap` between
/// them, and returns how many the kernel accepted. For small, deliberate exchanges; see
/// [`udp_flood`] for load.
pub fn udp_send(
    ns: &Netns,
    dst: SocketAddr,
    src: Option<IpAddr>,
    payload: &[u8],
    count: u64,
    gap: Duration,
) -> Result<u64, LabError> {
    let payload = payload.to_vec();
    let netns = ns.name().to_owned();
    try_in_netns(ns, move || {
        let socket = sender_socket(dst, src).map_err(|e| {
            LabError::io(format!("opening udp socket to {dst} in netns {netns}"), e)
        })?;
        let mut sent = 0;
        for i in 0..count {
            if i > 0 && !gap.is_zero() {
                thread::sleep(gap);
            }
            // A refused or dropped datagram is what the caller is measuring, not an error.
            if socket.send(&payload).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    })?
}

/// Floods `dst` with UDP datagrams of `payload_len` bytes from `ns` for `duration`: one
/// sender thread per CPU in `cpus`, each pinned there, sending batches with `sendmmsg`.
/// Returns how many datagrams the kernel accepted; back-pressure (ENOBUFS, EAGAIN) and ICMP
/// errors are not counted and do not stop the flood.
///
/// `src` must be an address assigned inside `ns` (see [`add_address`]); `None` lets the
/// kernel choose.
pub fn udp_flood(
    ns: &Netns,
    dst: SocketAddr,
    payload_len: usize,
    duration: Duration,
    cpus: &[usize],
    src: Option<IpAddr>,
) -> Result<u64, LabError> {
    let deadline = Instant::now() + duration;
    let mut senders = Vec::with_capacity(cpus.len());
    let mut first_error = None;
    for &cpu in cpus {
        let netns = ns.name().to_owned();
        match spawn_in_netns(ns, move || -> Result<u64, LabError> {
            pin_to_cpu(cpu)?;
            let socket = sender_socket(dst, src).map_err(|e| {
                LabError::io(format!("opening udp socket to {dst} in netns {netns}"), e)
            })?;
            Ok(flood(&socket, payload_len, deadline))
        }) {
            Ok(sender) => senders.push(sender),
            Err(e) => {
                first_error = Some(e);
                break;
            }
        }
    }
    let mut total = 0;
    for sender in senders {
        // Join all before reporting, so no sender outlives the call.
        match sender.join() {
            Ok(Ok(sent)) => total += sent,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

fn flood(socket: &UdpSocket, payload_len: usize, deadline: Instant) -> u64 {
    // The payload is only read by the kernel, so every message can point at the same bytes.
    let mut payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: mmsghdr is plain data; all-zero means no name (the socket is connected).
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut sent = 0u64;
    while Instant::now() < deadline {
        // SAFETY: every mmsghdr points at `iov`, which points at `payload`; both outlive the
        // call and the kernel only reads them (and writes msg_len).
        let n = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            sent += n as u64;
        } else {
            // Full queue (EAGAIN/ENOBUFS) or a queued ICMP error (ECONNREFUSED): let the
            // receiver side catch up a little rather than spin on the error.
            thread::yield_now();
        }
    }
    sent
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn netns_listed(name: &str) -> bool {
        let out = run("ip", &["netns", "list"]).unwrap();
        out.lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    }

    #[test]
    fn unique_names_fit_ifnamsiz_and_differ() {
        let a = unique_name("a-rather-long-prefix");
        let b = unique_name("a-rather-long-prefix");
        assert!(a.len() <= MAX_IFNAME_LEN, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("a-rather"), "{a}");
    }

    #[test]
    fn veth_pair_echo_and_flood_then_clean_up() {
        if !require_root("lab::veth_pair_echo_and_flood_then_clean_up") {
            return;
        }
        let (name_a, name_b) = (unique_name("laba"), unique_name("labb"));
        {
            let a = Netns::create(&name_a).unwrap();
            let b = Netns::create(&name_b).unwrap();
            assert!(netns_listed(&name_a) && netns_listed(&name_b));
            veth_pair(
                &a,
                "veth0",
                &["198.18.0.1/24", "2001:db8:18::1/64"],
                &b,
                "veth0",
                &["198.18.0.2/24", "2001:db8:18::2/64"],
            )
            .unwrap();
            assert!(ifindex(&b, "veth0").unwrap() > 1);
            assert!(matches!(
                ifindex(&b, "nope0"),
                Err(LabError::NoSuchInterface { .. })
            ));

            let server = TcpEchoServer::spawn(&b, "198.18.0.2:0".parse().unwrap()).unwrap();
            let server6 = TcpEchoServer::spawn(&b, "[2001:db8:18::2]:0".parse().unwrap()).unwrap();
            let timeout = Duration::from_secs(2);
            check_tcp_echo(&a, server.local_addr(), timeout).unwrap();
            assert!(tcp_probe(&a, server6.local_addr(), timeout));
            // Nothing listens on port 1: refused at once.
            assert!(!tcp_probe(&a, "198.18.0.2:1".parse().unwrap(), timeout));
            assert_eq!(server.stop(), 1);
            assert_eq!(server6.stop(), 1);

            let sink = UdpSink::spawn(&b, "198.18.0.2:0".parse().unwrap()).unwrap();
            let sent = udp_flood(
                &a,
                sink.local_addr(),
                64,
                Duration::from_millis(200),
                &[0, 1],
                Some("198.18.0.1".parse().unwrap()),
            )
            .unwrap();
            // Let the backlog drain into the socket before counting.
            thread::sleep(Duration::from_millis(100));
            let (packets, bytes) = sink.stop();
            eprintln!("flood: sent {sent}, received {packets} packets / {bytes} bytes");
            assert!(sent > 0 && packets > 0);
            assert!(packets <= sent);
            assert_eq!(bytes, packets * 64);

            let sink6 = UdpSink::spawn(&b, "[2001:db8:18::2]:0".parse().unwrap()).unwrap();
            let sent = udp_send(&a, sink6.local_addr(), None, b"hello", 5, Duration::ZERO).unwrap();
            thread::sleep(Duration::from_millis(50));
            assert_eq!(sent, 5);
            assert_eq!(sink6.stop(), (5, 25));
        }
        assert!(!netns_listed(&name_a), "{name_a} left behind");
        assert!(!netns_listed(&name_b), "{name_b} left behind");
    }

    #[test]
    fn routed_through_a_forwarding_namespace() {
        if !require_root("lab::routed_through_a_forwarding_namespace") {
            return;
        }
        let client = Netns::create(&unique_name("cli")).unwrap();
        let router = Netns::create(&unique_name("rtr")).unwrap();
        let server = Netns::create(&unique_name("srv")).unwrap();
        veth_pair(
            &client,
            "eth0",
            &["198.18.1.2/24"],
            &router,
            "c0",
            &["198.18.1.1/24"],
        )
        .unwrap();
        veth_pair(
            &router,
            "s0",
            &["198.18.2.1/24"],
            &server,
            "eth0",
            &["198.18.2.2/24"],
        )
        .unwrap();
        set_forwarding(&router).unwrap();
        assert_eq!(
            router
                .exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])
                .unwrap()
                .trim(),
            "1"
        );
        // Forwarding was turned on in the router only.
        assert_eq!(
            client
                .exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])
                .unwrap()
                .trim(),
            "0"
        );
        add_route(&client, "198.18.2.0/24", "198.18.1.1").unwrap();
        add_route(&server, "198.18.1.0/24", "198.18.2.1").unwrap();
        let echo = TcpEchoServer::spawn(&server, "198.18.2.2:0".parse().unwrap()).unwrap();
        check_tcp_echo(&client, echo.local_addr(), Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn errors_name_the_command_and_its_stderr() {
        if !require_root("lab::errors_name_the_command_and_its_stderr") {
            return;
        }
        let ns = Netns::create(&unique_name("err")).unwrap();
        let err = add_route(&ns, "198.18.9.0/24", "198.18.8.1").unwrap_err();
        let LabError::Command {
            command, stderr, ..
        } = &err
        else {
            panic!("unexpected error {err:?}");
        };
        assert!(command.starts_with("ip -n "), "{command}");
        assert!(!stderr.is_empty());
        assert!(matches!(
            Netns::create("a/b"),
            Err(LabError::InvalidName { .. })
        ));
        let panicked = std::panic::catch_unwind(|| in_netns(&ns, || panic!("boom")));
        assert_eq!(panicked.unwrap_err().downcast_ref::<&str>(), Some(&"boom"));
        // A stale namespace of the same name is replaced, not an error.
        let again = Netns::create(ns.name()).unwrap();
        assert!(netns_listed(again.name()));
    }

    #[test]
    fn bpffs_mount_and_child_guard_clean_up() {
        if !require_root("lab::bpffs_mount_and_child_guard_clean_up") {
            return;
        }
        let path = {
            let bpffs = BpffsMount::new().unwrap();
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
            let p = bpffs.path().to_str().unwrap().to_owned();
            assert!(
                mounts
                    .lines()
                    .any(|l| l.contains(&p) && l.contains(" bpf "))
            );
            std::fs::create_dir(bpffs.path().join("pins")).unwrap();
            p
        };
        assert!(!Path::new(&path).exists());
        assert!(
            !std::fs::read_to_string("/proc/mounts")
                .unwrap()
                .contains(&path)
        );

        let ns = Netns::create(&unique_name("chld")).unwrap();
        let mut child = ChildGuard::new(ns.spawn(&["sleep", "30"]).unwrap());
        assert!(
            child
                .wait_timeout(Duration::from_millis(50))
                .unwrap()
                .is_none()
        );
        let status = child.terminate(Duration::from_secs(2)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}
