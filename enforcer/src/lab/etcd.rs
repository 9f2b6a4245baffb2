//! Real etcd clusters for the control-plane tests and the fleet benchmark: N members of
//! Debian's etcd 3.4 (`/usr/bin/etcd`) on loopback, each with its own data directory and
//! log file in a temporary directory, all killed and removed on drop, also when a test
//! panics.
//!
//! The ports are free ones the kernel hands out, never 2379/2380: installing etcd-server on
//! a machine running systemd starts a system `etcd.service` there, and a test must neither
//! depend on it nor collide with it. Heartbeats and election timeouts are short (50/500 ms)
//! so a new leader is elected within a second or so of killing the old one.
//!
//! Cluster state is read with `etcdctl` (etcd-client), as an operator would, so a failing
//! test's message shows the same view.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use super::{ChildGuard, unique_name};

/// The etcd server binary (Debian's etcd-server).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// The etcd command-line client (Debian's etcd-client).
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// The ports of the system etcd (`etcd.service`), which our clusters must never take.
const SYSTEM_PORTS: [u16; 2] = [2379, 2380];
/// How long members have to become healthy, and a leader to be elected: far above what a
/// start takes (about a second), only to turn a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(30);
/// How often readiness and leadership are polled.
const POLL: Duration = Duration::from_millis(50);
/// Attempts at starting a cluster when a port the kernel called free was taken before
/// etcd bound it.
const START_ATTEMPTS: usize = 3;
/// Lines of a member's log quoted in a failure message.
const LOG_TAIL: usize = 30;

/// Returns whether a test that needs etcd and etcdctl can run. When either is missing it
/// panics under CI (`CI=true`), where a skipped test would pass silently, and otherwise
/// prints why it skips (the pattern of `enforcer::lab::require_root`).
#[track_caller]
pub fn etcd_available(test: &str) -> bool {
    let missing: Vec<&str> = [ETCD_BIN, ETCDCTL_BIN]
        .into_iter()
        .filter(|bin| !Path::new(bin).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let missing = missing.join(" and ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test} needs {missing}: CI must have etcd-server and etcd-client installed \
             (`cargo xtask setup`); refusing to skip"
        );
    }
    eprintln!("skipping {test}: {missing} not installed (`cargo xtask setup` installs them)");
    false
}

/// One member: how to start it, and the process while it runs.
struct Member {
    name: String,
    client_url: String,
    /// Plain-HTTP URL serving `/health`: the client URL, or with TLS the metrics URL.
    health_url: String,
    log: PathBuf,
    args: Vec<String>,
    process: Option<ChildGuard>,
    /// The member's raft id, learnt once the cluster is healthy.
    id: u64,
}

impl Member {
    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let mut command = Command::new(ETCD_BIN);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // The environment configures etcd as well as the flags do (ETCD_NAME, ...): a
        // variable left over in the caller's shell must not change the cluster.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD_BIN} for {}: {e}", self.name));
        self.process = Some(ChildGuard::new(child));
    }

    fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| matches!(p.child_mut().try_wait(), Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process
                .signal(libc::SIGKILL)
                .unwrap_or_else(|e| panic!("killing {}: {e}", self.name));
            let exit = process
                .wait_timeout(DEADLINE)
                .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name));
            assert!(exit.is_some(), "{} did not exit after SIGKILL", self.name);
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
        format!("--- {} ({}) ---\n{tail}", self.name, self.log.display())
    }
}

/// An etcd cluster of real `etcd` processes on loopback; every member is killed and its
/// data removed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    tls: Option<EtcdTls>,
    // Removed by `Drop::drop` after it killed every member: no etcd is left writing into a
    // removed directory. A plain directory rather than `tempfile::TempDir`: tempfile is
    // only a dev-dependency of this crate, and the drop order is explicit this way.
    dir: PathBuf,
}

/// Client TLS of a cluster from [`EtcdCluster::start_tls`]: members serve https with
/// `cert`/`key` and accept only clients with a certificate from `ca`; `client_cert` and
/// `client_key` are what the harness's own etcdctl presents.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// CA of the server certificate and of every client certificate.
    pub ca: PathBuf,
    /// The members' server certificate (its names must include 127.0.0.1).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// A client certificate for etcdctl.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl EtcdCluster {
    /// Like [`EtcdCluster::start`] on 127.0.0.1, with client TLS and client-certificate
    /// authentication (peers talk plain HTTP on loopback).
    pub fn start_tls(members: usize, tls: EtcdTls) -> Self {
        Self::start_with(&vec![Ipv4Addr::LOCALHOST; members], Some(tls))
    }

    /// Starts a cluster of `members` members (1 or 3 are the useful sizes) on 127.0.0.1
    /// and waits until every member reports healthy. Panics, quoting the members' logs, if
    /// etcd is missing or the cluster is not healthy within 30 s; check
    /// [`etcd_available`] first.
    pub fn start(members: usize) -> Self {
        Self::start_on(&vec![Ipv4Addr::LOCALHOST; members])
    }

    /// Like [`EtcdCluster::start`], with member `i` listening on `hosts[i]`: loopback
    /// aliases (127.0.0.x) put members on different addresses, so that the integration
    /// tests' `LoopbackPartition` can cut one off.
    pub fn start_on(hosts: &[Ipv4Addr]) -> Self {
        Self::start_with(hosts, None)
    }

    fn start_with(hosts: &[Ipv4Addr], tls: Option<EtcdTls>) -> Self {
        assert!(
            !hosts.is_empty(),
            "an etcd cluster needs at least one member"
        );
        for attempt in 1..=START_ATTEMPTS {
            let mut cluster = Self::spawn(hosts, tls.clone());
            match cluster.wait_healthy() {
                Ok(()) => {
                    cluster.learn_ids();
                    return cluster;
                }
                // Another process took a port between our probe and etcd's bind: new ports.
                Err(why) if why.contains("address already in use") && attempt < START_ATTEMPTS => {
                    eprintln!("etcd cluster start, attempt {attempt}: a port was taken; retrying")
                }
                Err(why) => panic!("etcd cluster did not start: {why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(hosts: &[Ipv4Addr], tls: Option<EtcdTls>) -> Self {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(unique_name("etcd"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!(
                "creating the etcd cluster's temporary directory {}: {e}",
                dir.display()
            )
        });
        let token = format!(
            "enforcer-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let ports = free_ports(hosts);
        // With TLS, `/health` is read in plain HTTP from the metrics listener.
        let metrics = free_ports(hosts);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let peer_url = |i: usize| format!("http://{}:{}", hosts[i], ports[i].1);
        let initial_cluster = (0..hosts.len())
            .map(|i| format!("m{i}={}", peer_url(i)))
            .collect::<Vec<_>>()
            .join(",");
        let members = (0..hosts.len())
            .map(|i| {
                let name = format!("m{i}");
                let client_url = format!("{scheme}://{}:{}", hosts[i], ports[i].0);
                let data_dir = dir.join(&name);
                let mut args = vec![
                    format!("--name={name}"),
                    format!("--data-dir={}", data_dir.display()),
                    format!("--listen-client-urls={client_url}"),
                    format!("--advertise-client-urls={client_url}"),
                    format!("--listen-peer-urls={}", peer_url(i)),
                    format!("--initial-advertise-peer-urls={}", peer_url(i)),
                    format!("--initial-cluster={initial_cluster}"),
                    "--initial-cluster-state=new".to_owned(),
                    format!("--initial-cluster-token={token}"),
                    // Quick elections; heartbeats at a tenth of the timeout, as etcd's
                    // tuning guide advises.
                    "--heartbeat-interval=50".to_owned(),
                    "--election-timeout=500".to_owned(),
                    // 3.4's default logger, capnslog, still writes raft's info lines
                    // and a deprecation warning; zap honours --log-level.
                    "--logger=zap".to_owned(),
                    "--log-level=warn".to_owned(),
                    "--log-outputs=stderr".to_owned(),
                ];
                let health_url = match &tls {
                    None => client_url.clone(),
                    Some(tls) => {
                        let url = format!("http://{}:{}", hosts[i], metrics[i].0);
                        args.extend([
                            format!("--listen-metrics-urls={url}"),
                            format!("--cert-file={}", tls.cert.display()),
                            format!("--key-file={}", tls.key.display()),
                            format!("--trusted-ca-file={}", tls.ca.display()),
                            "--client-cert-auth".to_owned(),
                        ]);
                        url
                    }
                };
                Member {
                    log: dir.join(format!("{name}.log")),
                    name,
                    client_url,
                    health_url,
                    args,
                    process: None,
                    id: 0,
                }
            })
            .collect();
        let mut cluster = Self { members, tls, dir };
        for member in &mut cluster.members {
            member.spawn();
        }
        cluster
    }

    /// Waits until every member answers `/health` with `true`; an error quotes the logs.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let mut pending: Vec<usize> = (0..self.members.len()).collect();
        while !pending.is_empty() {
            for &i in &pending {
                if !self.members[i].is_running() {
                    return Err(format!(
                        "member {} exited during start-up\n{}",
                        self.members[i].name,
                        self.logs()
                    ));
                }
            }
            pending.retain(|&i| !healthy(&self.members[i].health_url));
            if Instant::now() >= deadline {
                let names: Vec<&str> = pending
                    .iter()
                    .map(|&i| self.members[i].name.as_str())
                    .collect();
                return Err(format!(
                    "members {names:?} not healthy within {DEADLINE:?}\n{}",
                    self.logs()
                ));
            }
            thread::sleep(POLL);
        }
        Ok(())
    }

    fn learn_ids(&mut self) {
        for i in 0..self.members.len() {
            let status = self
                .status(i)
                .unwrap_or_else(|e| panic!("status of healthy member m{i}: {e}"));
            self.members[i].id = status.member_id;
        }
    }

    /// The client URLs ("http://127.0.0.1:PORT"), member 0 first, killed members included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URL of `member`.
    pub fn endpoint(&self, member: usize) -> String {
        self.members[member].client_url.clone()
    }

    /// The number of members, living or killed.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members; never true (a cluster starts with at least one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Where `member`'s log is written (stdout and stderr, across restarts).
    pub fn log_path(&self, member: usize) -> &Path {
        &self.members[member].log
    }

    /// The temporary directory holding every member's data directory and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `member`'s process is alive.
    pub fn is_running(&mut self, member: usize) -> bool {
        self.members[member].is_running()
    }

    /// `member`'s process id, unless it was killed.
    pub fn pid(&self, member: usize) -> Option<u32> {
        self.members[member].process.as_ref().map(ChildGuard::id)
    }

    /// SIGKILLs `member` (no graceful leave: the cluster sees a crash) and waits until it is
    /// gone. Killing a killed member does nothing.
    pub fn kill(&mut self, member: usize) {
        self.members[member].kill();
    }

    /// Starts a killed `member` again with its data directory, so it rejoins the cluster
    /// as the member it was; waits until it reports healthy.
    pub fn restart(&mut self, member: usize) {
        assert!(
            !self.members[member].is_running(),
            "m{member} is still running"
        );
        self.members[member].spawn();
        let deadline = Instant::now() + DEADLINE;
        while !healthy(&self.members[member].health_url) {
            assert!(
                self.members[member].is_running(),
                "m{member} exited on restart\n{}",
                self.members[member].log_tail()
            );
            assert!(
                Instant::now() < deadline,
                "m{member} not healthy within {DEADLINE:?} of its restart\n{}",
                self.logs()
            );
            thread::sleep(POLL);
        }
    }

    /// The index of the current leader: the member that a majority of all members name
    /// as leader. Panics, with what each member said, if there is none right now (during
    /// an election); [`EtcdCluster::wait_leader`] waits for one.
    pub fn leader(&self) -> usize {
        self.agreed_leader(None)
            .unwrap_or_else(|why| panic!("no etcd leader: {why}\n{}", self.logs()))
    }

    /// Waits until a majority of all members name the same living leader, other than
    /// `excluding` (the member just killed, which the others may name until their election
    /// timeout), and returns its index. Panics after 30 s, with what each member said.
    pub fn wait_leader(&self, excluding: Option<usize>) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.agreed_leader(excluding) {
                Ok(leader) => return leader,
                Err(why) => assert!(
                    Instant::now() < deadline,
                    "no etcd leader within {DEADLINE:?}: {why}\n{}",
                    self.logs()
                ),
            }
            thread::sleep(POLL);
        }
    }

    fn agreed_leader(&self, excluding: Option<usize>) -> Result<usize, String> {
        let quorum = self.members.len() / 2 + 1;
        let mut said = Vec::new();
        let mut votes: Vec<(u64, usize)> = Vec::new();
        for (i, member) in self.members.iter().enumerate() {
            if member.process.is_none() {
                said.push(format!("m{i}: killed"));
                continue;
            }
            match self.status(i) {
                Ok(status) => {
                    said.push(format!("m{i}: leader {:x}", status.leader));
                    match votes.iter_mut().find(|(id, _)| *id == status.leader) {
                        Some((_, n)) => *n += 1,
                        None => votes.push((status.leader, 1)),
                    }
                }
                Err(e) => said.push(format!("m{i}: {e}")),
            }
        }
        let said = said.join("; ");
        let Some(&(id, _)) = votes.iter().find(|(id, n)| *id != 0 && *n >= quorum) else {
            return Err(format!("no majority of {quorum} names a leader ({said})"));
        };
        let Some(leader) = self.members.iter().position(|m| m.id == id) else {
            return Err(format!("leader {id:x} is not a member ({said})"));
        };
        if Some(leader) == excluding || self.members[leader].process.is_none() {
            return Err(format!(
                "the leader is m{leader}, excluded or killed ({said})"
            ));
        }
        Ok(leader)
    }

    /// `member`'s own view, from `etcdctl endpoint status`.
    fn status(&self, member: usize) -> Result<Status, String> {
        let out = self.etcdctl(member, &["endpoint", "status", "-w", "json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("endpoint status printed no JSON ({e})"))?;
        let field = |pointer: &str| {
            doc.pointer(pointer)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("endpoint status has no {pointer}: {doc}"))
        };
        Ok(Status {
            member_id: field("/0/Status/header/member_id")?,
            leader: field("/0/Status/leader")?,
        })
    }

    /// Runs `etcdctl ARGS` against `member` alone, with timeouts short enough for polling
    /// (a killed member's endpoint fails in a couple of seconds, not etcdctl's default 5).
    pub fn etcdctl(&self, member: usize, args: &[&str]) -> Output {
        self.etcdctl_at(&self.members[member].client_url, args)
    }

    /// Runs `etcdctl ARGS` against the given endpoints (comma-separated client URLs).
    pub fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Output {
        let mut command = Command::new(ETCDCTL_BIN);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL") {
                command.env_remove(key);
            }
        }
        if let Some(tls) = &self.tls {
            command.args([
                format!("--cacert={}", tls.ca.display()),
                format!("--cert={}", tls.client_cert.display()),
                format!("--key={}", tls.client_key.display()),
            ]);
        }
        command
            .arg(format!("--endpoints={endpoints}"))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {ETCDCTL_BIN}: {e}"))
    }

    /// `etcdctl put KEY VALUE` through `member`; panics with etcdctl's message on failure.
    pub fn put(&self, member: usize, key: &str, value: &str) {
        let out = self.etcdctl(member, &["put", key, value]);
        assert!(
            out.status.success(),
            "etcdctl put {key} via m{member} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// `etcdctl get KEY --print-value-only` through `member` (a linearizable read): the
    /// value, or `None` when the key does not exist; panics on failure.
    pub fn get(&self, member: usize, key: &str) -> Option<String> {
        let out = self.etcdctl(member, &["get", key, "--print-value-only"]);
        assert!(
            out.status.success(),
            "etcdctl get {key} via m{member} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        // One line per value; nothing at all for a missing key.
        text.strip_suffix('\n').map(str::to_owned)
    }

    /// Every member's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(Member::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut process) = member.process.take() {
                // SIGKILL, not ChildGuard's SIGTERM and grace: the data is thrown away.
                let _ = process.signal(libc::SIGKILL);
                let _ = process.wait_timeout(DEADLINE);
            }
        }
        // Every data directory and log, now that no member writes there.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What `etcdctl endpoint status` says about one member.
struct Status {
    member_id: u64,
    leader: u64,
}

/// A (client, peer) port pair per host, each free when probed: all probe listeners are
/// held at once, so no two pairs are the same.
fn free_ports(hosts: &[Ipv4Addr]) -> Vec<(u16, u16)> {
    let mut held = Vec::new();
    let mut port = |host: Ipv4Addr| loop {
        let listener = TcpListener::bind(SocketAddr::from((host, 0)))
            .unwrap_or_else(|e| panic!("binding {host}:0 to find a free port: {e}"));
        let found = listener.local_addr().unwrap().port();
        held.push(listener);
        // Ephemeral ports start far above 2380 by default; a narrowed
        // ip_local_port_range is no reason to share the system etcd's ports.
        if !SYSTEM_PORTS.contains(&found) {
            return found;
        }
    };
    hosts.iter().map(|&h| (port(h), port(h))).collect()
}

/// `GET /health` on a client URL answered `{"health":"true"}`: the member is up, has a
/// leader and can serve a read.
fn healthy(client_url: &str) -> bool {
    let Some(addr) = client_url
        .strip_prefix("http://")
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") && response.contains(r#""health":"true""#)
}
