//! Section 7, fleet scale (issue 18): how long a publish takes to reach 1,000 nodes through
//! two control-plane replicas on etcd, and what the replicas spend doing it.
//!
//! The nodes are the real node client (`controlplane::sync::run`, mTLS with a certificate
//! of its own each, failover list of both replicas), 1,000 of them on one tokio runtime in
//! this process; each answers every bundle at once with an ACK, so the times are the
//! control plane's and the network's, not a daemon's apply. The replicas are
//! `enforcer control-plane serve` processes from this build on one etcd member; bundles are
//! published in-process as `enforcer control-plane publish` does (`etcd::Store::publish`,
//! target `all`). The baseline, in the same run: the same 1,000 clients against one
//! single-process control plane (a policy directory and the signing key), published by
//! replacing its `default.toml`.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer::{
    controlplane::{
        NodeStatus,
        bundle::{self, SigningKey, Target},
        certs::{self, CertPaths},
        etcd::{EtcdConfig, Store},
        proto::{NodesRequest, policy_sync_client::PolicySyncClient},
        sync::{self, Applied, ClientEndpoint, ConnectionState, Held, PolicyUpdate, SyncConfig},
    },
    lab::{
        ChildGuard,
        etcd::{EtcdCluster, etcd_available},
        unique_name,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::common::{Agent1, Stat, check_interrupted, policy_text};

/// The control plane under test, from this build.
const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");
/// The goal for the fleet: every node ACKs a publish within this, at the p99.
pub const TARGET_P99_S: f64 = 2.0;
/// Agents in the published policy (about 3 kB of TOML): a small policy, so the times are
/// of fan-out and not of moving megabytes.
const POLICY_AGENTS: u32 = 10;
/// How often the nodes' ACKs are looked for in etcd or the control plane's `Nodes`.
const POLL: Duration = Duration::from_millis(20);
/// The single-process control plane's directory scan interval: as often as the fleet's
/// ACKs are polled, so its pick-up delay (half of it on average) is small in its times.
const DIR_POLL_MS: u64 = 20;
/// Far above what any step should take, only to turn a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(120);
/// Quiet time after each round, so the next publish does not meet the last one's writes.
const SETTLE: Duration = Duration::from_millis(300);

/// One publish, over every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// The bundle's version.
    pub version: u64,
    /// Median over nodes of the time from the publish to the node's ACK (ms).
    pub p50_ms: f64,
    /// 99th percentile over nodes (ms).
    pub p99_ms: f64,
    /// The last node (ms).
    pub max_ms: f64,
    /// Until the control plane's record (etcd, or the single process's `Nodes`) shows every
    /// node with the version ACKed (ms), polled every 20 ms once every node answered.
    pub all_acked_ms: f64,
}

/// CPU and memory of one process over the measured publishes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessUse {
    /// Which process.
    pub name: String,
    /// Nodes connected to it (0 for etcd).
    pub nodes: usize,
    /// User + system CPU over the measured rounds, their pauses included (ms).
    pub cpu_ms: f64,
    /// The same per publish (ms).
    pub cpu_ms_per_publish: f64,
    /// CPU while the nodes connected (ms): TLS handshakes and hellos.
    pub connect_cpu_ms: f64,
    /// Resident memory after the rounds (KiB).
    pub rss_kib: u64,
    /// Peak resident memory (KiB).
    pub hwm_kib: u64,
}

/// One control-plane setup with the 1,000 nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeResult {
    /// "fleet" (two replicas on etcd) or "single" (one process, a policy directory).
    pub mode: String,
    /// From starting the node clients until every one is connected (s).
    pub connect_s: f64,
    /// The measured publishes (a first, unmeasured one warms up).
    pub rounds: Vec<Round>,
    /// Median over every node of every measured round (ms).
    pub p50_ms: f64,
    /// 99th percentile over the same (ms).
    pub p99_ms: f64,
    /// The slowest node of any round (ms).
    pub max_ms: f64,
    /// Until the record showed every node ACKed, over the rounds (ms).
    pub all_acked_ms: Stat,
    /// The control-plane processes (and etcd, for the fleet).
    pub processes: Vec<ProcessUse>,
}

/// Section 7.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetResult {
    /// Simulated nodes.
    pub nodes: usize,
    /// Measured publishes per setup.
    pub rounds: usize,
    /// etcd members (one: the replicas, not etcd's replication, are measured).
    pub etcd_members: usize,
    /// Size of the published policy (bytes).
    pub policy_bytes: usize,
    /// The single control plane's directory scan interval (ms).
    pub dir_poll_ms: u64,
    /// Two replicas on etcd.
    pub fleet: ModeResult,
    /// The baseline: one single-process control plane.
    pub single: ModeResult,
}

/// Everything the section started, removed on drop: the control planes first (SIGTERM,
/// then SIGKILL), then etcd, then the directory.
struct FleetLab {
    planes: Vec<Plane>,
    etcd: Option<EtcdCluster>,
    dir: PathBuf,
}

impl Drop for FleetLab {
    fn drop(&mut self) {
        for p in &mut self.planes {
            let _ = p.child.terminate(Duration::from_secs(5));
        }
        self.planes.clear();
        self.etcd = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One control-plane process.
struct Plane {
    name: String,
    url: String,
    log: PathBuf,
    child: ChildGuard,
}

/// Raises this process's open-file limit (children inherit it): 1,000 TLS connections
/// here, as many on the replicas' side.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return;
        }
        if lim.rlim_cur >= want {
            return;
        }
        if lim.rlim_max < want {
            // Root may raise the hard limit as well.
            lim.rlim_max = want;
        }
        lim.rlim_cur = want;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
            eprintln!(
                "warning: could not raise RLIMIT_NOFILE to {want}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .port()
}

/// Starts `enforcer control-plane serve CONFIG` and waits until it accepts connections.
fn start_plane(dir: &Path, name: &str, config: &str, port: u16) -> Plane {
    let file = dir.join(format!("{name}.toml"));
    fs::write(&file, config).expect("writing a control-plane config");
    let log = dir.join(format!("{name}.log"));
    let out = fs::File::create(&log).expect("creating a control-plane log");
    let child = Command::new(ENFORCER)
        .args(["control-plane", "serve"])
        .arg(&file)
        .env("ENFORCER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("starting enforcer control-plane serve");
    let mut plane = Plane {
        name: name.to_owned(),
        url: format!("https://127.0.0.1:{port}"),
        log,
        child: ChildGuard::new(child),
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(exit)) = plane.child.wait_timeout(Duration::from_millis(20)) {
            panic!(
                "{name} exited during start-up ({exit}):\n{}",
                fs::read_to_string(&plane.log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{name} did not listen in time");
    }
    plane
}

/// Resident and peak resident memory of `pid` (KiB).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU of `pid`, every thread (ms), from `/proc/<pid>/stat`.
fn cpu_ms(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields counted here follow its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1e3 / hz
}

/// Nearest-rank percentile `p` (0-100) of sorted `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// How a setup publishes.
enum Publisher {
    /// `etcd::Store::publish`, target `all` (boxed: the store's client is large).
    Etcd { store: Box<Store>, key: SigningKey },
    /// A new `default.toml`, renamed into place so the scan never reads half a file.
    Dir(PathBuf),
}

impl Publisher {
    async fn publish(&self, policy: String) {
        match self {
            Publisher::Etcd { store, key } => {
                store
                    .publish(key, "bench.toml", &Target::All, policy.into_bytes())
                    .await
                    .expect("publishing into etcd");
            }
            Publisher::Dir(dir) => {
                let tmp = dir.join(".default.toml.new");
                fs::write(&tmp, policy).expect("writing the policy");
                fs::rename(&tmp, dir.join("default.toml")).expect("replacing default.toml");
            }
        }
    }
}

/// Where the ACKs are recorded, as `control-plane nodes` reads them.
enum Record {
    /// The fleet's: etcd (boxed: the store's client is large).
    Etcd(Box<Store>),
    /// The single control plane's `Nodes`, on one connection kept open.
    Plane(PolicySyncClient<tonic::transport::Channel>),
}

impl Record {
    async fn nodes(&mut self) -> Vec<NodeStatus> {
        match self {
            Record::Etcd(store) => store.nodes().await.expect("reading the nodes from etcd"),
            Record::Plane(client) => client
                .nodes(NodesRequest {})
                .await
                .expect("asking the control plane for its nodes")
                .into_inner()
                .nodes
                .into_iter()
                .map(NodeStatus::from)
                .collect(),
        }
    }
}

/// The simulated nodes: each node's connection state, and every ACK as
/// (node, version, when it was answered).
struct Nodes {
    states: Vec<watch::Receiver<ConnectionState>>,
    acks: mpsc::UnboundedReceiver<(usize, u64, Instant)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts one node client per name, node `i` on replica `i % urls.len()` first.
fn start_nodes(names: &[String], pki: &CertPaths, urls: &[String], trusted: &str) -> Nodes {
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let mut states = Vec::new();
    let mut tasks = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut order: Vec<String> = urls.to_vec();
        order.rotate_left(i % urls.len());
        let client = &pki.clients[name];
        let cfg = SyncConfig {
            url: String::new(),
            urls: order,
            ca: Some(pki.ca.cert.clone()),
            client_cert: Some(client.cert.clone()),
            client_key: Some(client.key.clone()),
            server_name: None,
            node_id: name.clone(),
            labels: BTreeMap::from([("zone".to_owned(), format!("z{}", i % 4))]),
            trusted_keys: vec![trusted.to_owned()],
            backoff_min_ms: 50,
            backoff_max_ms: 1_000,
            insecure: false,
        };
        let (updates_tx, mut updates) = mpsc::channel::<PolicyUpdate>(1);
        let (state_tx, state) = watch::channel(ConnectionState::Idle);
        states.push(state);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = sync::run(cfg, Held::default(), updates_tx, state_tx).await {
                panic!("node client: {}", sync::error_text(&e));
            }
        }));
        let ack_tx = ack_tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(update) = updates.recv().await {
                let version = update.bundle.version();
                let _ = update.reply.send(Ok(Applied {
                    generation: version,
                    audit: None,
                }));
                let _ = ack_tx.send((i, version, Instant::now()));
            }
        }));
    }
    Nodes {
        states,
        acks,
        tasks,
    }
}

/// Waits until every node is connected; returns how long that took and the nodes per
/// server URL.
async fn wait_connected(nodes: &Nodes, started: Instant) -> (Duration, BTreeMap<String, usize>) {
    loop {
        let mut per_server = BTreeMap::new();
        let mut waiting = Vec::new();
        for (i, s) in nodes.states.iter().enumerate() {
            match &*s.borrow() {
                ConnectionState::Connected { server, .. } => {
                    *per_server.entry(server.clone()).or_insert(0) += 1;
                }
                other => waiting.push(format!("node {i}: {other}")),
            }
        }
        if waiting.is_empty() {
            return (started.elapsed(), per_server);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{} of {} nodes not connected within {DEADLINE:?}; first: {}",
            waiting.len(),
            nodes.states.len(),
            waiting[..waiting.len().min(5)].join("; ")
        );
        tokio::time::sleep(POLL).await;
    }
}

/// One setup: its processes are up; start the nodes, publish `rounds + 1` times.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per setup, every argument a different piece of it"
)]
async fn measure(
    mode: &str,
    names: &[String],
    pki: &CertPaths,
    trusted: &str,
    planes: &[Plane],
    etcd_pid: Option<u32>,
    publisher: Publisher,
    mut record: Record,
    rounds: usize,
) -> ModeResult {
    let urls: Vec<String> = planes.iter().map(|p| p.url.clone()).collect();
    let mut pids: Vec<(String, u32)> = planes
        .iter()
        .map(|p| (p.name.clone(), p.child.id()))
        .collect();
    pids.extend(etcd_pid.map(|pid| ("etcd".to_owned(), pid)));
    let cpu = |pids: &[(String, u32)]| pids.iter().map(|(_, pid)| cpu_ms(*pid)).collect::<Vec<_>>();
    let c0 = cpu(&pids);
    let started = Instant::now();
    let mut nodes = start_nodes(names, pki, &urls, trusted);
    let (connect, per_server) = wait_connected(&nodes, started).await;
    let c1 = cpu(&pids);
    println!(
        "  {mode}: {} nodes connected in {:.2} s ({})",
        names.len(),
        connect.as_secs_f64(),
        per_server
            .iter()
            .map(|(s, n)| format!("{n} on {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let n = names.len();
    let mut held = vec![0u64; n];
    let mut measured = Vec::new();
    let mut all_samples = Vec::new();
    let mut c2 = c1.clone();
    for round in 0..=rounds {
        check_interrupted();
        if round == 1 {
            c2 = cpu(&pids);
        }
        let mut policy = policy_text(POLICY_AGENTS, 10, Agent1 { pps: 0, v6: false });
        policy.push_str(&format!("# {mode} round {round}\n"));
        let t0 = Instant::now();
        publisher.publish(policy).await;
        let mut times = vec![f64::NAN; n];
        let mut left = n;
        let mut version = 0;
        while left > 0 {
            let remaining = DEADLINE.saturating_sub(t0.elapsed());
            let Ok(Some((i, v, at))) = tokio::time::timeout(remaining, nodes.acks.recv()).await
            else {
                let missing: Vec<&str> = (0..n)
                    .filter(|&i| times[i].is_nan())
                    .map(|i| names[i].as_str())
                    .take(5)
                    .collect();
                panic!(
                    "{mode} round {round}: {left} of {n} nodes got no bundle within {DEADLINE:?} (first: {missing:?}); logs under the run's directory"
                );
            };
            if v <= held[i] {
                continue;
            }
            held[i] = v;
            version = version.max(v);
            if times[i].is_nan() {
                left -= 1;
            }
            times[i] = (at - t0).as_secs_f64() * 1e3;
        }
        // Every node answered: now the record, which cannot show the ACKs any earlier.
        let all_acked = loop {
            let acked = record
                .nodes()
                .await
                .iter()
                .filter(|s| s.version_acked >= version)
                .count();
            if acked >= n {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "{mode} round {round}: the record shows {acked} of {n} nodes ACKed version {version} after {DEADLINE:?}, though every node answered"
            );
            tokio::time::sleep(POLL).await;
        };
        times.sort_by(f64::total_cmp);
        let r = Round {
            version,
            p50_ms: percentile(&times, 50.0),
            p99_ms: percentile(&times, 99.0),
            max_ms: times[n - 1],
            all_acked_ms: all_acked.as_secs_f64() * 1e3,
        };
        println!(
            "  {mode} publish {round}{}: ACK p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; all ACKed on record after {:.0} ms",
            if round == 0 { " (warm-up)" } else { "" },
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.all_acked_ms
        );
        if round > 0 {
            all_samples.extend_from_slice(&times);
            measured.push(r);
        }
        tokio::time::sleep(SETTLE).await;
    }
    let c3 = cpu(&pids);
    all_samples.sort_by(f64::total_cmp);
    let processes = pids
        .iter()
        .enumerate()
        .map(|(k, (name, pid))| {
            let (rss_kib, hwm_kib) = memory_kib(*pid);
            let url = planes.get(k).map(|p| p.url.as_str()).unwrap_or("");
            ProcessUse {
                name: name.clone(),
                nodes: per_server.get(url).copied().unwrap_or(0),
                cpu_ms: c3[k] - c2[k],
                cpu_ms_per_publish: (c3[k] - c2[k]) / rounds as f64,
                connect_cpu_ms: c1[k] - c0[k],
                rss_kib,
                hwm_kib,
            }
        })
        .collect();
    drop(nodes);
    ModeResult {
        mode: mode.to_owned(),
        connect_s: connect.as_secs_f64(),
        p50_ms: percentile(&all_samples, 50.0),
        p99_ms: percentile(&all_samples, 99.0),
        max_ms: all_samples.last().copied().unwrap_or(f64::NAN),
        all_acked_ms: Stat::of(&measured.iter().map(|r| r.all_acked_ms).collect::<Vec<_>>()),
        rounds: measured,
        processes,
    }
}

fn plane_config(name: &str, port: u16, pki: &CertPaths, rest: &str) -> String {
    format!(
        "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n{rest}",
        pki.server.cert.display(),
        pki.server.key.display(),
        pki.ca.cert.display()
    )
}

/// Runs the section with `nodes` simulated nodes and `rounds` measured publishes per
/// setup; `None` when etcd is not installed (outside CI, which refuses to skip).
pub fn run(nodes: usize, rounds: usize) -> Option<FleetResult> {
    if !etcd_available("the fleet benchmark") {
        return None;
    }
    // A connection is a descriptor on each side, both sides' processes inherit this one.
    raise_nofile((nodes as u64) * 4 + 1024);
    let dir = std::env::temp_dir().join(unique_name("enf-fleet"));
    fs::create_dir_all(&dir).expect("creating the fleet directory");
    let mut lab = FleetLab {
        planes: Vec::new(),
        etcd: None,
        dir: dir.clone(),
    };
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i:04}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let pki = certs::generate(&dir.join("pki"), &["localhost", "127.0.0.1"], &name_refs)
        .expect("generating the certificates");
    let keys = bundle::keygen(&dir.join("key")).expect("generating the signing key");
    let key = SigningKey::load(&keys.private_key).expect("loading the signing key");
    let trusted = key.public_key().to_base64();
    let policy_bytes = policy_text(POLICY_AGENTS, 10, Agent1 { pps: 0, v6: false }).len();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    // The baseline first: one control plane, a policy directory.
    let policies = dir.join("policies");
    fs::create_dir_all(&policies).expect("policy directory");
    let port = free_port();
    let single_cfg = plane_config(
        "single",
        port,
        &pki,
        &format!(
            "dir = \"{}\"\nsigning_key = \"{}\"\npoll_interval_ms = {DIR_POLL_MS}\n",
            policies.display(),
            keys.private_key.display()
        ),
    );
    lab.planes
        .push(start_plane(&dir, "single", &single_cfg, port));
    let single = runtime.block_on(async {
        let endpoint = ClientEndpoint {
            url: lab.planes[0].url.clone(),
            ca: Some(pki.ca.cert.clone()),
            client_cert: Some(pki.clients[&names[0]].cert.clone()),
            client_key: Some(pki.clients[&names[0]].key.clone()),
            server_name: None,
            insecure: false,
        };
        let channel = endpoint
            .prepare()
            .expect("the control plane's endpoint")
            .connect()
            .await
            .expect("connecting to the control plane for its nodes");
        measure(
            "single",
            &names,
            &pki,
            &trusted,
            &lab.planes,
            None,
            Publisher::Dir(policies.clone()),
            Record::Plane(PolicySyncClient::new(channel)),
            rounds,
        )
        .await
    });
    for mut p in lab.planes.drain(..) {
        let _ = p.child.terminate(Duration::from_secs(5));
    }

    check_interrupted();
    // The fleet: one etcd member, two replicas.
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints();
    let etcd_pid = etcd.pid(0);
    lab.etcd = Some(etcd);
    for name in ["replica-a", "replica-b"] {
        let port = free_port();
        let cfg = plane_config(
            name,
            port,
            &pki,
            &format!(
                "[etcd]\nendpoints = [{}]\n",
                endpoints
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        lab.planes.push(start_plane(&dir, name, &cfg, port));
    }
    let fleet = runtime.block_on(async {
        let store = Store::connect(&EtcdConfig::plain(endpoints.clone()))
            .await
            .expect("connecting to etcd");
        measure(
            "fleet",
            &names,
            &pki,
            &trusted,
            &lab.planes,
            etcd_pid,
            Publisher::Etcd {
                store: Box::new(store.clone()),
                key,
            },
            Record::Etcd(Box::new(store)),
            rounds,
        )
        .await
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    let result = FleetResult {
        nodes,
        rounds,
        etcd_members: 1,
        policy_bytes,
        dir_poll_ms: DIR_POLL_MS,
        fleet,
        single,
    };
    let ratio = |f: f64, s: f64| f / s;
    println!(
        "  fleet/single: p50 {:.2}x, p99 {:.2}x; fleet p99 {:.0} ms (goal < {:.0} ms)",
        ratio(result.fleet.p50_ms, result.single.p50_ms),
        ratio(result.fleet.p99_ms, result.single.p99_ms),
        result.fleet.p99_ms,
        TARGET_P99_S * 1e3
    );
    drop(lab);
    Some(result)
}
