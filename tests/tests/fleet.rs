//! A fleet, end to end, with real processes: a 3-member etcd cluster (Debian's etcd), two
//! `enforcer control-plane serve` replicas on it, and three node daemons enforcing real
//! traffic in their own labs. Policies are published with `enforcer control-plane publish`.
//!
//! Topology: etcd and the replicas run in a namespace of their own (`cp`; the whole test
//! body runs on a thread inside it, so the processes it starts are there too), joined to
//! each lab's gateway by a veth (`cp` 10.251.<i>.1, gateway `ctl` 10.251.<i>.2). A node is
//! partitioned by taking its `ctl` link down. Nothing leaves these namespaces.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use enforcer::{
    controlplane::{bundle, certs, sync},
    lab::{self, ChildGuard, Netns, in_netns, require_root},
};
use integration_tests::{
    DENY_ALL_AGENT1, Lab, allow_udp_ports, enforcer_bin,
    etcd::{EtcdCluster, EtcdTls, etcd_available},
};
use serde_json::Value;

/// Turns a hang into a failure; far above what any step needs.
const DEADLINE: Duration = Duration::from_secs(60);

/// Waits until the node enforces bundle `version`.
fn wait_version(lab: &Lab, node: &str, version: u64) -> Value {
    let suffix = format!("@v{version}");
    lab.wait_status(
        &format!("{node} to enforce version {version}"),
        DEADLINE,
        |s| {
            s["policy_origin"]
                .as_str()
                .is_some_and(|o| o.ends_with(&suffix))
        },
    )
}

/// `control-plane nodes --json` as node `lab` sees the fleet (through its replicas).
fn fleet_nodes(lab: &Lab) -> Vec<Value> {
    let nodes = lab.control_plane_nodes();
    integration_tests::check_schema("nodes", &nodes);
    nodes.as_array().unwrap().clone()
}

/// Waits until `control-plane nodes` shows every node in `want` satisfying `pred`.
fn wait_fleet(lab: &Lab, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let nodes = fleet_nodes(lab);
        if pred(&nodes) {
            return nodes;
        }
        assert!(Instant::now() < deadline, "waiting for {what}: {nodes:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn node<'a>(nodes: &'a [Value], id: &str) -> &'a Value {
    nodes
        .iter()
        .find(|n| n["node_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {nodes:#?}"))
}

/// The fleet's files and processes, all inside the `cp` namespace.
struct Fleet {
    dir: PathBuf,
    etcd: EtcdCluster,
    replicas: Vec<Option<ChildGuard>>,
    signing_key: PathBuf,
    public_key: String,
    certs: certs::CertPaths,
    published: u32,
}

/// Replica `r` listens on this port of every `cp` address.
fn replica_port(r: usize) -> u16 {
    7443 + r as u16
}

impl Fleet {
    fn start(dir: &Path) -> Fleet {
        let etcd = EtcdCluster::start(3);
        let server_names = ["10.251.1.1", "10.251.2.1", "10.251.3.1"];
        let certs = certs::generate(
            &dir.join("tls"),
            &server_names,
            &["node-1", "node-2", "node-3", "stranger"],
        )
        .unwrap();
        let keys = bundle::keygen(&dir.join("keys")).unwrap();
        let public_key = std::fs::read_to_string(&keys.public_key)
            .unwrap()
            .trim()
            .to_string();
        let mut fleet = Fleet {
            dir: dir.to_owned(),
            etcd,
            replicas: Vec::new(),
            signing_key: keys.private_key,
            public_key,
            certs,
            published: 0,
        };
        for r in 0..2 {
            let replica = fleet.start_replica(r);
            fleet.replicas.push(Some(replica));
        }
        fleet
    }

    fn start_replica(&self, r: usize) -> ChildGuard {
        let name = ["replica-a", "replica-b"][r];
        let config = self.dir.join(format!("{name}.toml"));
        let endpoints: Vec<String> = self.etcd.endpoints();
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"0.0.0.0:{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\n[etcd]\nendpoints = {endpoints:?}\n",
                replica_port(r),
                self.certs.server.cert.display(),
                self.certs.server.key.display(),
                self.certs.ca.cert.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(enforcer_bin())
            .args(["control-plane", "serve"])
            .arg(&config)
            .env("ENFORCER_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child);
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", replica_port(r))).is_err() {
            if let Ok(Some(exit)) = guard.wait_timeout(Duration::from_millis(20)) {
                panic!("{name} exited: {exit}\n{}", self.replica_log(r));
            }
            assert!(Instant::now() < deadline, "{name} never listened");
        }
        guard
    }

    fn replica_log(&self, r: usize) -> String {
        let name = ["replica-a", "replica-b"][r];
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn kill_replica(&mut self, r: usize) {
        let mut replica = self.replicas[r].take().expect("replica running");
        replica.signal(libc::SIGKILL).unwrap();
        replica.wait_timeout(DEADLINE).unwrap();
    }

    /// `enforcer control-plane publish` of `policy` with `target_args`; returns the version.
    fn publish(&mut self, policy: &str, target_args: &[&str]) -> u64 {
        self.published += 1;
        let file = self.dir.join(format!("policy-{}.toml", self.published));
        std::fs::write(&file, policy).unwrap();
        let out = self.publish_file(&file, target_args);
        assert!(
            out.status.success(),
            "publish failed: {}{}\netcd:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.etcd.logs()
        );
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
        answer["version"].as_u64().unwrap()
    }

    fn publish_file(&self, file: &Path, target_args: &[&str]) -> std::process::Output {
        Command::new(enforcer_bin())
            .args(["--json", "control-plane", "publish"])
            .arg(file)
            .arg("--signing-key")
            .arg(&self.signing_key)
            .arg("--etcd")
            .arg(self.etcd.endpoints().join(","))
            .args(target_args)
            .env("ENFORCER_LOG", "warn")
            .output()
            .unwrap()
    }

    /// The `[control_plane]` table of node `i` (1-based): its own certificate, the
    /// replicas in `order`.
    fn node_table(&self, i: usize, order: [usize; 2], zone: &str) -> String {
        let name = format!("node-{i}");
        let client = &self.certs.clients[&name];
        let urls: Vec<String> = order
            .iter()
            .map(|r| format!("https://10.251.{i}.1:{}", replica_port(*r)))
            .collect();
        format!(
            "\n[control_plane]\nurls = {urls:?}\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\nnode_id = \"{name}\"\nlabels = {{ zone = \"{zone}\" }}\ntrusted_keys = [\"{}\"]\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n",
            self.certs.ca.cert.display(),
            client.cert.display(),
            client.key.display(),
            self.public_key,
        )
    }

    /// The raw value etcd holds at `key`, through member `m`.
    fn etcd_get(&self, m: usize, key: &str) -> Vec<u8> {
        let out = self.etcd.etcdctl(m, &["get", "--print-value-only", key]);
        assert!(out.status.success(), "{out:?}");
        let mut value = out.stdout;
        assert_eq!(
            value.pop(),
            Some(b'\n'),
            "etcdctl ends the value with a newline"
        );
        value
    }

    /// Writes `value` at `key` behind the publishers' back (a compromised store).
    fn etcd_put(&self, m: usize, key: &str, value: &[u8]) {
        let mut child = Command::new(integration_tests::etcd::ETCDCTL_BIN)
            .arg(format!("--endpoints={}", self.etcd.endpoint(m)))
            .args(["put", key])
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(value).unwrap();
        assert!(child.wait().unwrap().success());
    }
}

/// Joins lab `i`'s gateway to the `cp` namespace.
fn link(cp: &Netns, lab: &Lab, i: usize) {
    lab::veth_pair(
        cp,
        &format!("cpl{i}"),
        &[&format!("10.251.{i}.1/24")],
        &lab.gw,
        "ctl",
        &[&format!("10.251.{i}.2/24")],
    )
    .unwrap();
}

#[test]
fn a_fleet_publishes_fails_over_and_catches_up() {
    if !require_root("a_fleet_publishes_fails_over_and_catches_up")
        || !etcd_available("a_fleet_publishes_fails_over_and_catches_up")
    {
        return;
    }
    let cp = Arc::new(Netns::create(&lab::unique_name("cp")).unwrap());
    let inside = Arc::clone(&cp);
    in_netns(&cp, move || fleet_scenario(&inside));
}

fn fleet_scenario(cp: &Netns) {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(dir.path());
    // Nodes 1 and 2 prefer replica A, node 3 replica B. Zones: node-3 alone in us-1.
    let zones = ["eu-1", "eu-1", "us-1"];
    let orders = [[0, 1], [0, 1], [1, 0]];
    let mut labs: Vec<Lab> = Vec::new();
    for i in 1..=3 {
        let mut lab = Lab::new(1);
        link(cp, &lab, i);
        // The local file denies everything: whatever passes came from the fleet.
        lab.write_policy(DENY_ALL_AGENT1);
        let mut config = std::fs::read_to_string(lab.config_path()).unwrap();
        config.push_str(&fleet.node_table(i, orders[i - 1], zones[i - 1]));
        std::fs::write(lab.config_path(), config).unwrap();
        lab.start_daemon();
        labs.push(lab);
    }

    // 1. Published for all: every node ACKs and enforces it; the fleet view, from any
    //    replica, has each node on its preferred replica with an audit anchor.
    let v1 = fleet.publish(&allow_udp_ports("9000"), &[]);
    for (i, lab) in labs.iter().enumerate() {
        wait_version(lab, &format!("node-{}", i + 1), v1);
        assert_eq!(
            lab.probe_udp(&[9000, 9001], 10),
            vec![10, 0],
            "node-{}",
            i + 1
        );
    }
    let nodes = wait_fleet(&labs[0], "every node to ACK v1", |nodes| {
        nodes.len() == 3
            && nodes
                .iter()
                .all(|n| n["version_acked"] == v1 && n["connected"] == true)
    });
    for (i, want) in [(1, "replica-a"), (2, "replica-a"), (3, "replica-b")] {
        let n = node(&nodes, &format!("node-{i}"));
        assert_eq!(n["replica"], want, "{n}");
        assert_eq!(n["target"], "all", "{n}");
        assert_eq!(n["audit_head"].as_str().map(str::len), Some(64), "{n}");
    }

    // 2. A selector: only node-3 (zone us-1) takes it; the others keep v1.
    let v2 = fleet.publish(&allow_udp_ports("9000-9001"), &["--selector", "zone=us-1"]);
    wait_version(&labs[2], "node-3", v2);
    assert_eq!(labs[2].probe_udp(&[9000, 9001], 10), vec![10, 10]);
    assert_eq!(labs[0].probe_udp(&[9000, 9001], 10), vec![10, 0]);
    let nodes = wait_fleet(&labs[1], "node-3 to ACK the selector's bundle", |nodes| {
        node(nodes, "node-3")["version_acked"] == v2
    });
    assert_eq!(node(&nodes, "node-3")["target"], "selector:zone=us-1");
    assert_eq!(node(&nodes, "node-1")["version_acked"], v1);

    // 3. Replica A killed: nodes 1 and 2 fail over to B and keep receiving. Node-3 keeps
    //    its selector's bundle: more specific than a new bundle for all.
    fleet.kill_replica(0);
    let v3 = fleet.publish(&allow_udp_ports("9002"), &[]);
    for i in [0, 1] {
        wait_version(&labs[i], &format!("node-{}", i + 1), v3);
        assert_eq!(labs[i].probe_udp(&[9000, 9002], 10), vec![0, 10]);
    }
    let nodes = wait_fleet(&labs[0], "nodes 1 and 2 on replica B", |nodes| {
        ["node-1", "node-2"].iter().all(|id| {
            node(nodes, id)["replica"] == "replica-b" && node(nodes, id)["version_acked"] == v3
        })
    });
    assert_eq!(node(&nodes, "node-3")["version_acked"], v2);
    assert_eq!(labs[2].probe_udp(&[9000, 9001], 10), vec![10, 10]);

    // 4. The etcd leader killed: publishing still succeeds, and replica B still relays.
    let leader = fleet.etcd.leader();
    fleet.etcd.kill(leader);
    let v4 = fleet.publish(&allow_udp_ports("9003"), &[]);
    assert!(v4 > v3);
    for i in [0, 1] {
        wait_version(&labs[i], &format!("node-{}", i + 1), v4);
    }
    assert_eq!(labs[1].probe_udp(&[9002, 9003], 10), vec![0, 10]);

    // 5. Node 1 partitioned: it keeps its last good policy while the others move on, and
    //    catches up once it is back.
    labs[0].gw.ip(&["link", "set", "ctl", "down"]).unwrap();
    let v5 = fleet.publish(&allow_udp_ports("9004"), &[]);
    wait_version(&labs[1], "node-2", v5);
    assert_eq!(labs[0].probe_udp(&[9003, 9004], 10), vec![10, 0]);
    let held = labs[0].status_json();
    assert!(
        held["policy_origin"]
            .as_str()
            .unwrap()
            .ends_with(&format!("@v{v4}")),
        "{held}"
    );
    labs[0].gw.ip(&["link", "set", "ctl", "up"]).unwrap();
    wait_version(&labs[0], "node-1", v5);
    assert_eq!(labs[0].probe_udp(&[9003, 9004], 10), vec![0, 10]);

    // 6. A compromised store hands node-1 node-2's bundle: node-1 refuses it (the target is
    //    signed), says why, and keeps enforcing v5.
    let v6 = fleet.publish(&allow_udp_ports("9005"), &["--node", "node-2"]);
    wait_version(&labs[1], "node-2", v6);
    let live = (0..3).find(|m| *m != leader).unwrap();
    let theirs = fleet.etcd_get(live, "/enforcer/bundles/node/node-2");
    fleet.etcd_put(live, "/enforcer/bundles/node/node-1", &theirs);
    let nodes = wait_fleet(&labs[0], "node-1 to NACK node-2's bundle", |nodes| {
        node(nodes, "node-1")["version_nacked"] == v6
    });
    let reason = node(&nodes, "node-1")["last_nack_reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.starts_with(&format!(
            "wrong target: version {v6} is for node:node-2, not node \"node-1\""
        )),
        "{reason}"
    );
    assert_eq!(labs[0].probe_udp(&[9004, 9005], 10), vec![10, 0]);
    // The publisher repairs it with a bundle of node-1's own.
    let v7 = fleet.publish(&allow_udp_ports("9006"), &["--node", "node-1"]);
    wait_version(&labs[0], "node-1", v7);
    assert_eq!(labs[0].probe_udp(&[9004, 9006], 10), vec![0, 10]);

    // 7. A bad policy is refused whole by the publisher, with its place; nothing changes.
    let bad = fleet.dir.join("bad.toml");
    std::fs::write(&bad, "[[agents]]\nid = 0\nname = \"x\"\n").unwrap();
    let out = fleet.publish_file(&bad, &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("bad.toml:2:"), "{stdout}");
    assert_eq!(
        fleet.etcd_get(live, "/enforcer/version"),
        v7.to_string().into_bytes()
    );

    // 8. The audit anchor kept off node-2 catches a cut log there: a head file written
    //    from the fleet's record no longer verifies once the last records are gone.
    let nodes = fleet_nodes(&labs[0]);
    let anchor = node(&nodes, "node-2");
    let (hash, seq) = (
        anchor["audit_head"].as_str().unwrap().to_owned(),
        anchor["audit_records"].as_u64().unwrap(),
    );
    // Node-2 dropped datagrams (audited) before it applied v6.
    assert!(seq > 0, "{anchor}");
    let log = labs[1].dir.join("audit.jsonl");
    let copy = dir.path().join("node-2-audit.jsonl");
    std::fs::copy(&log, &copy).unwrap();
    let head = dir.path().join("anchor.json");
    std::fs::write(
        &head,
        serde_json::json!({"log": copy, "seq": seq, "hash": hash}).to_string(),
    )
    .unwrap();
    let verify = |file: &Path| {
        Command::new(enforcer_bin())
            .args(["audit", "verify", "--head"])
            .arg(&head)
            .arg(file)
            .output()
            .unwrap()
    };
    let whole = verify(&copy);
    assert!(whole.status.success(), "{whole:?}");
    let text = std::fs::read_to_string(&copy).unwrap();
    let kept: Vec<&str> = text.lines().take(seq as usize - 1).collect();
    std::fs::write(&copy, kept.join("\n") + "\n").unwrap();
    let cut = verify(&copy);
    assert!(
        !cut.status.success(),
        "a cut log verified against the anchor"
    );
    drop(labs);
    drop(fleet);
}

/// etcd as an SRE runs it: https with client certificates. The publisher and a replica
/// reach it with their own certificates (the `--etcd-*` flags and `[etcd]`'s `ca`, `cert`
/// and `key`), and a node receives what was published; without a client certificate the
/// publisher is refused and says where. Loopback only; no root needed.
#[test]
fn publisher_and_replica_reach_etcd_over_tls_with_client_certificates() {
    if !etcd_available("publisher_and_replica_reach_etcd_over_tls_with_client_certificates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tls = certs::generate(
        &dir.path().join("tls"),
        &["127.0.0.1"],
        &["etcdctl", "publisher", "replica", "node-1"],
    )
    .unwrap();
    let keys = bundle::keygen(&dir.path().join("keys")).unwrap();
    let etcd = EtcdCluster::start_tls(
        1,
        EtcdTls {
            ca: tls.ca.cert.clone(),
            cert: tls.server.cert.clone(),
            key: tls.server.key.clone(),
            client_cert: tls.clients["etcdctl"].cert.clone(),
            client_key: tls.clients["etcdctl"].key.clone(),
        },
    );
    let endpoint = etcd.endpoint(0);
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, allow_udp_ports("9000")).unwrap();
    let publish = |client: Option<&str>| {
        let mut command = Command::new(enforcer_bin());
        command
            .args(["--json", "control-plane", "publish"])
            .arg(&policy)
            .arg("--signing-key")
            .arg(&keys.private_key)
            .args(["--etcd", &endpoint, "--etcd-ca"])
            .arg(&tls.ca.cert);
        if let Some(name) = client {
            command
                .arg("--etcd-cert")
                .arg(&tls.clients[name].cert)
                .arg("--etcd-key")
                .arg(&tls.clients[name].key);
        }
        command.env("ENFORCER_LOG", "warn").output().unwrap()
    };

    // No client certificate: etcd refuses, nothing is published, the error names etcd.
    let refused = publish(None);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let error = String::from_utf8_lossy(&refused.stdout);
    assert!(error.contains(&format!("etcd ({endpoint})")), "{error}");
    assert_eq!(etcd.get(0, "/enforcer/version"), None);

    let published = publish(Some("publisher"));
    assert!(published.status.success(), "{published:?}");
    let version = serde_json::from_slice::<Value>(&published.stdout).unwrap()["version"]
        .as_u64()
        .unwrap();

    // A replica on the same etcd, with its own certificate.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let config = dir.path().join("replica.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"replica-tls\"\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\n[etcd]\nendpoints = [\"{endpoint}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            tls.server.cert.display(),
            tls.server.key.display(),
            tls.ca.cert.display(),
            tls.ca.cert.display(),
            tls.clients["replica"].cert.display(),
            tls.clients["replica"].key.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("replica.log")).unwrap();
    let mut replica = ChildGuard::new(
        Command::new(enforcer_bin())
            .args(["control-plane", "serve"])
            .arg(&config)
            .env("ENFORCER_LOG", "info")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(exit)) = replica.wait_timeout(Duration::from_millis(20)) {
            panic!(
                "the replica exited: {exit}\n{}",
                std::fs::read_to_string(dir.path().join("replica.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the replica never listened");
    }

    // A node (the real client, in process) receives the published bundle through it.
    let node = sync::SyncConfig {
        url: format!("https://127.0.0.1:{port}"),
        urls: Vec::new(),
        ca: Some(tls.ca.cert.clone()),
        client_cert: Some(tls.clients["node-1"].cert.clone()),
        client_key: Some(tls.clients["node-1"].key.clone()),
        server_name: None,
        node_id: "node-1".into(),
        labels: Default::default(),
        trusted_keys: vec![std::fs::read_to_string(&keys.public_key).unwrap()],
        backoff_min_ms: 50,
        backoff_max_ms: 500,
        insecure: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let received = runtime.block_on(async {
        let (updates_tx, mut updates) = tokio::sync::mpsc::channel(1);
        let (state_tx, _state) = tokio::sync::watch::channel(sync::ConnectionState::default());
        let client = tokio::spawn(sync::run(node, sync::Held::default(), updates_tx, state_tx));
        let update = tokio::time::timeout(DEADLINE, updates.recv())
            .await
            .expect("a bundle within the deadline")
            .expect("the client runs");
        let received = (
            update.bundle.version(),
            update.bundle.as_proto().target.clone(),
        );
        let _ = update.reply.send(Ok(sync::Applied::default()));
        client.abort();
        received
    });
    drop(runtime);
    assert_eq!(received, (version, "all".to_string()));
    // A replica stops promptly on SIGTERM.
    replica.signal(libc::SIGTERM).unwrap();
    let exit = replica.wait_timeout(DEADLINE).unwrap();
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}");
}
