//! Support for the integration tests: a lab of network namespaces with agents behind a
//! gateway that runs the real `enforcer` daemon, torn down on drop even when a test panics.
//!
//! ```text
//!   agent i (10.200.i.2, fd20:i::2) --veth-- gwa<i> [XDP] gateway gws --veth-- server
//!                                                                 (10.200.100.2, fd20:100::2,
//!                                                                  169.254.169.254, 198.18.0.2)
//! ```

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use enforcer::{
    dataplane::KernelMaps,
    lab::{self, BpffsMount, ChildGuard, Netns},
    node::daemon::Status,
};

pub mod etcd;
pub mod https;
pub mod partition;
pub mod proxy_lab;

/// Runs `f` on a thread inside a fresh network namespace that holds an interface `sbx0`
/// standing in for an agent sandbox's veth (a veth pair: this kernel has no dummy driver,
/// and only the index matters). BPF_PROG_TEST_RUN resolves `ingress_ifindex` in the
/// caller's namespace, so packet tests run there; the namespace is deleted afterwards,
/// also on panic.
pub fn in_sandbox_netns(prefix: &str, f: impl FnOnce() + Send + 'static) {
    let ns = Netns::create(&lab::unique_name(prefix)).unwrap();
    ns.ip(&[
        "link", "add", "sbx0", "type", "veth", "peer", "name", "sbx0p",
    ])
    .unwrap();
    ns.ip(&["link", "set", "sbx0", "up"]).unwrap();
    lab::in_netns(&ns, f);
}

/// Address of agent `i` (1-based).
pub fn agent_v4(i: usize) -> IpAddr {
    format!("10.200.{i}.2").parse().unwrap()
}

/// IPv6 address of agent `i`.
pub fn agent_v6(i: usize) -> IpAddr {
    format!("fd20:{i}::2").parse().unwrap()
}

/// The server's main IPv4 address.
pub const SERVER_V4: &str = "10.200.100.2";
/// The server's IPv6 address.
pub const SERVER_V6: &str = "fd20:100::2";
/// A cloud-metadata address the server also answers on.
pub const METADATA: &str = "169.254.169.254";
/// A non-private address the server also answers on (RFC 2544 benchmarking range).
pub const PUBLIC: &str = "198.18.0.2";

/// `ip:port` as a socket address (IPv6 without brackets is accepted).
pub fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The directory of the CLI's JSON schemas, one file per command (`enforcer/schema/`).
pub fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../enforcer/schema")
}

/// Checks `value` against `enforcer/schema/<name>.json`; panics naming every place that
/// does not match, with the document.
pub fn check_schema(name: &str, value: &serde_json::Value) {
    let path = schema_dir().join(format!("{name}.json"));
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", path.display()));
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("  at {}: {e}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "output does not match {}:\n{}\n{}",
        path.display(),
        errors.join("\n"),
        serde_json::to_string_pretty(value).unwrap()
    );
}

/// The `enforcer` binary cargo built next to this test binary.
pub fn enforcer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/enforcer
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("enforcer");
    assert!(
        bin.exists(),
        "{} not found: run the tests with `cargo xtask test`, or `cargo build --release --bins` first",
        bin.display()
    );
    bin
}

/// Agent 1 (`coder`, on `gwa1`) may send UDP to the server's port 9000 only: a datagram to
/// any other port is a denial, so an audit record.
pub const UDP_9000_POLICY: &str = r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
egress_default = "deny"
rate = { packets_per_sec = 100000 }
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"
"#;

/// How a CLI command ended: [`Lab::run_cli`].
#[derive(Debug)]
pub struct CliRun {
    /// The exit code (-1 if a signal ended it).
    pub code: i32,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl CliRun {
    /// stdout then stderr, for messages that may be on either.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Whether it exited 0, and [`CliRun::output`].
    pub fn ok_output(&self) -> (bool, String) {
        (self.code == 0, self.output())
    }
}

/// A tmpfs mounted on a directory (created if missing), unmounted on drop: a file system
/// a test can fill or make read-only under the daemon.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`64k`, `4m`) on `dir`.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let tmpfs = Tmpfs(dir.to_path_buf());
        tmpfs.mount_with(0, &format!("size={size},mode=0755"));
        tmpfs
    }

    /// Changes the mounted file system's options (`size=4m`, `ro`, `rw`): a daemon in a
    /// mount namespace made after [`Tmpfs::mount`] (`ip netns exec`) sees the change too,
    /// since it is the same file system.
    pub fn remount(&self, options: &str) {
        let flags = if options.split(',').any(|o| o == "ro") {
            libc::MS_RDONLY
        } else {
            0
        };
        self.mount_with(libc::MS_REMOUNT | flags, options);
    }

    fn mount_with(&self, flags: libc::c_ulong, data: &str) {
        use std::os::unix::ffi::OsStrExt as _;
        let target = std::ffi::CString::new(self.0.as_os_str().as_bytes()).unwrap();
        let data = std::ffi::CString::new(data).unwrap();
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mounting a tmpfs on {}: {}",
            self.0.display(),
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt as _;
        let target = std::ffi::CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: umount2(2) with a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A policy for agent 1 of a [`Lab`] (interface `gwa1`) that denies everything: under it,
/// whatever passes came from somewhere else (a control plane).
pub const DENY_ALL_AGENT1: &str =
    "[[agents]]\nid = 1\nname = \"coder\"\ninterfaces = [\"gwa1\"]\negress_default = \"deny\"\n";

/// [`DENY_ALL_AGENT1`] allowing UDP to the server's `ports` (`"9000"`, `"9000-9001"`).
pub fn allow_udp_ports(ports: &str) -> String {
    format!(
        "{DENY_ALL_AGENT1}[[agents.egress]]\naction = \"allow\"\nto = [\"{SERVER_V4}\"]\nproto = \"udp\"\nports = \"{ports}\"\n"
    )
}

/// Agents, a gateway running the enforcer, and a server, in fresh namespaces.
pub struct Lab {
    /// The gateway: where the XDP program is attached and the daemon runs.
    pub gw: Netns,
    /// The agents, index 0 being agent 1.
    pub agents: Vec<Netns>,
    /// The server namespace.
    pub server: Netns,
    /// Working directory holding the config, the policy and the state directory.
    pub dir: PathBuf,
    daemon: Option<ChildGuard>,
    // Dropped after the daemon (field order): removing the pins detaches the program.
    bpffs: BpffsMount,
}

impl Lab {
    /// Builds the topology with `agents` agents. Nothing is attached yet; the daemon's
    /// configuration names every agent-facing gateway interface as an attach point, so
    /// agents matched by source prefix are enforced too.
    pub fn new(agents: usize) -> Lab {
        let gw = Netns::create(&lab::unique_name("gw")).unwrap();
        let server = Netns::create(&lab::unique_name("srv")).unwrap();
        lab::set_forwarding(&gw).unwrap();
        lab::veth_pair(
            &gw,
            "gws",
            &["10.200.100.1/24", "fd20:100::1/64"],
            &server,
            "eth0",
            &["10.200.100.2/24", "fd20:100::2/64"],
        )
        .unwrap();
        for extra in [METADATA, PUBLIC] {
            lab::add_address(&server, "lo", &format!("{extra}/32")).unwrap();
            lab::add_route(&gw, &format!("{extra}/32"), SERVER_V4).unwrap();
        }
        lab::add_route(&server, "default", "10.200.100.1").unwrap();
        lab::add_route(&server, "default", "fd20:100::1").unwrap();
        let mut agent_ns = Vec::new();
        for i in 1..=agents {
            let ns = Netns::create(&lab::unique_name(&format!("ag{i}"))).unwrap();
            lab::veth_pair(
                &gw,
                &format!("gwa{i}"),
                &[&format!("10.200.{i}.1/24"), &format!("fd20:{i}::1/64")],
                &ns,
                "eth0",
                &[&format!("10.200.{i}.2/24"), &format!("fd20:{i}::2/64")],
            )
            .unwrap();
            lab::add_route(&ns, "default", &format!("10.200.{i}.1")).unwrap();
            lab::add_route(&ns, "default", &format!("fd20:{i}::1")).unwrap();
            agent_ns.push(ns);
        }
        let dir = std::env::temp_dir().join(lab::unique_name("enf-lab"));
        fs::create_dir_all(dir.join("state")).unwrap();
        let bpffs = BpffsMount::new().unwrap();
        let lab = Lab {
            gw,
            agents: agent_ns,
            server,
            dir,
            daemon: None,
            bpffs,
        };
        fs::write(
            lab.config_path(),
            format!(
                "policy = \"policy.toml\"\ninterfaces = {:?}\nbpffs = \"{}\"\nstate_dir = \"state\"\nruntime_dir = \"run\"\nhook = \"auto\"\nxdp_mode = \"native\"\naudit_log = \"audit.jsonl\"\n\n[limits]\nmax_agents = 64\n",
                (1..=agents).map(|i| format!("gwa{i}")).collect::<Vec<_>>(),
                lab.bpffs.path().display()
            ),
        )
        .unwrap();
        lab
    }

    /// Sets the daemon's `xdp_mode` (the lab starts with `native`); before `start_daemon`.
    pub fn set_xdp_mode(&self, mode: &str) {
        let path = self.config_path();
        let config = fs::read_to_string(&path).unwrap();
        assert!(config.contains("xdp_mode = \"native\"\n"));
        fs::write(
            &path,
            config.replace("xdp_mode = \"native\"\n", &format!("xdp_mode = {mode:?}\n")),
        )
        .unwrap();
    }

    /// Sets the daemon's `hook` (the lab starts with `auto`: tc on its veths); before
    /// `start_daemon`.
    pub fn set_hook(&self, hook: &str) {
        let path = self.config_path();
        let config = fs::read_to_string(&path).unwrap();
        assert!(config.contains("hook = \"auto\"\n"));
        fs::write(
            &path,
            config.replace("hook = \"auto\"\n", &format!("hook = {hook:?}\n")),
        )
        .unwrap();
    }

    /// The daemon's hooks as `enforcer status --json` reports them, by interface.
    pub fn hooks(&self) -> BTreeMap<String, serde_json::Value> {
        let out = self.cli(&[
            "status",
            "--json",
            "--config",
            self.config_path().to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "enforcer status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status["hooks"]
            .as_array()
            .expect("status has hooks")
            .iter()
            .map(|h| (h["interface"].as_str().unwrap().to_string(), h.clone()))
            .collect()
    }

    /// Agent `i`'s namespace (1-based).
    pub fn agent(&self, i: usize) -> &Netns {
        &self.agents[i - 1]
    }

    /// The daemon configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("enforcer.toml")
    }

    /// The bpffs directory holding the pins.
    pub fn bpffs(&self) -> &Path {
        self.bpffs.path()
    }

    /// The daemon's state directory (what survives a reboot: bundle, overrides, CA).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The daemon's runtime directory (`status.json`, the socket).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// Writes the daemon's policy file.
    pub fn write_policy(&self, text: &str) {
        fs::write(self.dir.join("policy.toml"), text).unwrap();
    }

    /// Writes `text` as another file in the lab directory and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    /// `enforcer status --json` of this lab's daemon.
    pub fn status_json(&self) -> serde_json::Value {
        let config = self.config_path();
        let out = self.cli(&["--json", "--config", config.to_str().unwrap(), "status"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls [`Lab::status_json`] until `pred` holds and returns that status; panics after
    /// `deadline`, naming `what` and quoting the last status.
    pub fn wait_status(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + deadline;
        loop {
            let s = self.status_json();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "waiting for {what}: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `enforcer control-plane nodes --json` with this lab's configuration (its
    /// `[control_plane]` table says where to ask).
    pub fn control_plane_nodes(&self) -> serde_json::Value {
        let config = self.config_path();
        let out = self.cli(&[
            "--json",
            "--config",
            config.to_str().unwrap(),
            "control-plane",
            "nodes",
        ]);
        assert!(
            out.status.success(),
            "control-plane nodes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Sends `n` datagrams from agent 1 to each port of the server and returns how many
    /// arrived per port.
    pub fn probe_udp(&self, ports: &[u16], n: u64) -> Vec<u64> {
        let sinks: Vec<lab::UdpSink> = ports
            .iter()
            .map(|p| lab::UdpSink::spawn(&self.server, sa("0.0.0.0", *p)).unwrap())
            .collect();
        for p in ports {
            let sent = lab::udp_send(
                self.agent(1),
                sa(SERVER_V4, *p),
                None,
                b"x",
                n,
                Duration::from_millis(1),
            )
            .unwrap();
            assert_eq!(sent, n);
        }
        std::thread::sleep(Duration::from_millis(200));
        sinks.into_iter().map(|s| s.stop().0).collect()
    }

    /// Starts `enforcer run` in the gateway and waits until it reports its first policy.
    pub fn start_daemon(&mut self) {
        self.start_daemon_with_env(std::iter::empty::<(&str, &str)>());
    }

    /// [`Lab::start_daemon`] with extra environment variables for the daemon (such as
    /// `NOTIFY_SOCKET`).
    pub fn start_daemon_with_env<K, V>(&mut self, env: impl IntoIterator<Item = (K, V)>)
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        self.start_daemon_wrapped(&[], env);
    }

    /// [`Lab::start_daemon_with_env`], the daemon started through `wrapper` (a command and
    /// its arguments that runs the rest, such as `setpriv` with the unit's capabilities).
    pub fn start_daemon_wrapped<K, V>(
        &mut self,
        wrapper: &[&str],
        env: impl IntoIterator<Item = (K, V)>,
    ) where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        assert!(self.daemon.is_none(), "daemon already running");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.gw.command(program);
                c.args(args).arg(enforcer_bin());
                c
            }
            None => self.gw.command(enforcer_bin()),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            // Warnings and errors only: the daemon's stderr is not captured by the harness.
            .env("ENFORCER_LOG", "warn")
            .envs(env)
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child);
        let pid = guard.id();
        // Start-up verifies every program (eight, at XDP and tc): seconds on a host, far
        // longer in an emulated VM. A bound on hanging, not a speed check.
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(status) = Status::read(&self.runtime_dir())
                && status.pid == pid
            {
                break;
            }
            if let Ok(Some(exit)) = guard.wait_timeout(Duration::from_millis(20)) {
                panic!("enforcer run exited during start-up: {exit}");
            }
            assert!(
                Instant::now() < deadline,
                "enforcer run did not report ready in 180 s"
            );
        }
        self.daemon = Some(guard);
    }

    /// Stops the daemon with `signal` and waits for it to exit; the pins stay.
    pub fn stop_daemon(&mut self, signal: libc::c_int) {
        let mut guard = self.daemon.take().expect("daemon running");
        guard.signal(signal).unwrap();
        let exit = guard.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(exit.is_some(), "daemon did not exit after signal {signal}");
    }

    /// Sends `signal` to the running daemon.
    pub fn signal_daemon(&self, signal: libc::c_int) {
        let pid = self.daemon.as_ref().expect("daemon running").id();
        // SAFETY: kill(2) on the pid of a child this lab started and has not reaped.
        assert_eq!(
            unsafe { libc::kill(pid as i32, signal) },
            0,
            "signalling the daemon"
        );
    }

    /// The daemon's published status.
    pub fn status(&self) -> Status {
        Status::read(&self.runtime_dir()).expect("status.json")
    }

    /// Waits until the daemon has made more than `attempts` policy attempts.
    pub fn wait_attempts(&self, attempts: u64) -> Status {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = Status::read(&self.runtime_dir())
                && s.attempts > attempts
            {
                return s;
            }
            assert!(Instant::now() < deadline, "no reload reported in 30 s");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the `enforcer` CLI in the gateway namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.gw.command(enforcer_bin()).args(args).output().unwrap()
    }

    /// Under [`UDP_9000_POLICY`]: agent 1 sends `allowed` datagrams to the server's port
    /// 9000 and `denied` to 9001, each to a listener (an ICMP port unreachable would fail
    /// the next send on the connected socket). The listeners are returned, to count what
    /// arrived.
    pub fn udp_9000_traffic(&self, allowed: u64, denied: u64) -> (lab::UdpSink, lab::UdpSink) {
        let sinks = (
            lab::UdpSink::spawn(&self.server, sa("0.0.0.0", 9000)).unwrap(),
            lab::UdpSink::spawn(&self.server, sa("0.0.0.0", 9001)).unwrap(),
        );
        for (port, n) in [(9000, allowed), (9001, denied)] {
            let sent = lab::udp_send(
                self.agent(1),
                sa(SERVER_V4, port),
                None,
                b"x",
                n,
                Duration::ZERO,
            )
            .unwrap();
            assert_eq!(sent, n, "datagrams sent to port {port}");
        }
        sinks
    }

    /// `enforcer --config <the lab's> ARGS`: what it printed and how it ended.
    pub fn run_cli(&self, args: &[&str]) -> CliRun {
        let config = self.config_path();
        let mut all = vec!["--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        CliRun {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// [`Lab::run_cli`] with `--json`: the exit code and the one JSON document on stdout
    /// (panics if stdout is not one), for commands expected to fail as well.
    pub fn run_cli_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let run = self.run_cli(&all);
        let doc = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
            panic!(
                "enforcer {args:?}: stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                run.stdout, run.stderr
            )
        });
        (run.code, doc)
    }

    /// Starts `enforcer --config <the lab's> ARGS` (a following command: `audit tail -f`,
    /// `top`) in the gateway namespace; its stdout lines arrive on the receiver. The
    /// process is killed when the guard drops.
    pub fn follow_cli(&self, args: &[&str]) -> (ChildGuard, mpsc::Receiver<String>) {
        use std::io::BufRead as _;
        let config = self.config_path();
        let mut child = ChildGuard::new(
            self.gw
                .command(enforcer_bin())
                .args(["--config", config.to_str().unwrap()])
                .args(args)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdout = child.child_mut().stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        (child, rx)
    }

    /// Scrapes the daemon's `/metrics` (the lab's `127.0.0.1:9464` in the gateway
    /// namespace) into `series -> value`, the series being the metric name with its labels
    /// exactly as printed.
    pub fn scrape_metrics(&self) -> BTreeMap<String, f64> {
        use std::io::{Read as _, Write as _};
        let text = lab::in_netns(&self.gw, || {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9464").unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        });
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("bad metrics line {l:?}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {l:?}"));
                (series.to_string(), value)
            })
            .collect()
    }

    /// `enforcer --json --config <the lab's> ARGS`, parsed; panics if it fails.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let config = self.config_path();
        let mut all = vec!["--json", "--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "enforcer {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "enforcer {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The pinned maps, opened the way `enforcer stats` does.
    pub fn maps(&self) -> KernelMaps {
        KernelMaps::from_pins(self.bpffs()).unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.terminate(Duration::from_secs(5));
        }
        let _ = fs::remove_dir_all(&self.dir);
        // bpffs (pins, hence the XDP links) and the namespaces go with their own Drops.
    }
}

/// A control plane that sends a fixed list of bundles, the ones a real control plane never
/// would (bad signatures, old versions, ...), and reports every message the node sends:
/// the hello, then one answer per bundle. Bundles go out one at a time, each after the node
/// answered the previous one.
#[derive(Clone)]
pub struct CraftedControlPlane {
    /// The bundles, in order.
    pub bundles: Vec<enforcer::controlplane::proto::Bundle>,
    /// Where the node's messages go.
    pub heard:
        tokio::sync::mpsc::UnboundedSender<enforcer::controlplane::proto::node_message::Kind>,
}

#[tonic::async_trait]
impl enforcer::controlplane::proto::policy_sync_server::PolicySync for CraftedControlPlane {
    type SyncStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<
                    Item = Result<enforcer::controlplane::proto::Bundle, tonic::Status>,
                > + Send
                + 'static,
        >,
    >;

    async fn sync(
        &self,
        request: tonic::Request<tonic::Streaming<enforcer::controlplane::proto::NodeMessage>>,
    ) -> Result<tonic::Response<Self::SyncStream>, tonic::Status> {
        use enforcer::controlplane::proto::NodeMessage;
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(self.bundles.len().max(1));
        let bundles = self.bundles.clone();
        let heard = self.heard.clone();
        tokio::spawn(async move {
            // The hello first; then one bundle at a time.
            match inbound.message().await {
                Ok(Some(NodeMessage { kind: Some(kind) })) => {
                    let _ = heard.send(kind);
                }
                _ => return,
            }
            for bundle in bundles {
                if tx.send(Ok(bundle)).await.is_err() {
                    return;
                }
                match inbound.message().await {
                    Ok(Some(NodeMessage { kind: Some(kind) })) => {
                        let _ = heard.send(kind);
                    }
                    _ => return,
                }
            }
            // Keep the stream open until the node goes away.
            while let Ok(Some(_)) = inbound.message().await {}
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn nodes(
        &self,
        _: tonic::Request<enforcer::controlplane::proto::NodesRequest>,
    ) -> Result<tonic::Response<enforcer::controlplane::proto::NodesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "a crafted control plane only streams",
        ))
    }
}
