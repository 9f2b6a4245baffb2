//! The daemon and the control plane together: the real `enforcer control-plane serve`
//! process and the real daemon in the gateway namespace, over TLS; policy pushed from a
//! directory reaches the XDP maps and real traffic; the daemon keeps enforcing when the
//! control plane dies and restarts fail-static from its persisted bundle; bundles a real
//! control plane would never send (from a hand-written server) are NACKed and change nothing.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use enforcer::{
    controlplane::{
        bundle::{self, SigningKey},
        certs,
        proto::{node_message::Kind, policy_sync_server::PolicySyncServer},
    },
    lab::{ChildGuard, require_root, spawn_in_netns},
};
use integration_tests::{CraftedControlPlane, DENY_ALL_AGENT1, Lab, allow_udp_ports, enforcer_bin};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_status(lab: &Lab, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    lab.wait_status(what, Duration::from_secs(30), pred)
}

struct ControlPlane {
    public_key: String,
    policies: std::path::PathBuf,
    ca: std::path::PathBuf,
    config: std::path::PathBuf,
}

fn control_plane(lab: &Lab) -> ControlPlane {
    let dir = lab.dir.join("cp");
    let certs = certs::generate(&dir.join("tls"), &["127.0.0.1"], &[]).unwrap();
    let keys = bundle::keygen(&dir.join("keys")).unwrap();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let config = dir.join("cp.toml");
    std::fs::write(
        &config,
        format!(
            "dir = \"policies\"\nsigning_key = \"{}\"\nlisten = \"127.0.0.1:7443\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\npoll_interval_ms = 50\n",
            keys.private_key.display(),
            certs.server.cert.display(),
            certs.server.key.display()
        ),
    )
    .unwrap();
    ControlPlane {
        public_key: std::fs::read_to_string(&keys.public_key)
            .unwrap()
            .trim()
            .to_string(),
        policies,
        ca: certs.ca.cert,
        config,
    }
}

fn start_control_plane(lab: &Lab, cp: &ControlPlane) -> ChildGuard {
    ChildGuard::new(
        lab.gw
            .command(enforcer_bin())
            .args(["control-plane", "serve"])
            .arg(&cp.config)
            .env("ENFORCER_LOG", "warn")
            .spawn()
            .unwrap(),
    )
}

fn add_control_plane_to_config(lab: &Lab, table: &str) {
    let mut text = std::fs::read_to_string(lab.config_path()).unwrap();
    text.push_str(table);
    std::fs::write(lab.config_path(), text).unwrap();
}

/// A [`CraftedControlPlane`] serving `bundles` on 127.0.0.1:7444 in the gateway namespace,
/// where the daemon runs; stopped on drop.
struct Crafted {
    heard: mpsc::UnboundedReceiver<Kind>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<enforcer::lab::NetnsThread<()>>,
}

impl Crafted {
    fn serve(lab: &Lab, bundles: Vec<enforcer::controlplane::proto::Bundle>) -> Crafted {
        let (heard_tx, heard) = mpsc::unbounded_channel();
        let crafted = CraftedControlPlane {
            bundles,
            heard: heard_tx,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = spawn_in_netns(&lab.gw, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:7444")
                    .await
                    .unwrap();
                let _ = tonic::transport::Server::builder()
                    .serve_with_incoming_shutdown(
                        PolicySyncServer::new(crafted),
                        TcpListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await;
            });
        })
        .unwrap();
        Crafted {
            heard,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// The first `n` messages the node sends (hello, then one answer per bundle), as text.
    fn hear(&mut self, n: usize) -> Vec<String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut answers = Vec::new();
        runtime.block_on(async {
            while answers.len() < n {
                let kind = tokio::time::timeout(Duration::from_secs(30), self.heard.recv())
                    .await
                    .expect("the daemon answers every bundle")
                    .unwrap();
                answers.push(match kind {
                    Kind::Hello(h) => format!(
                        "hello {}{}",
                        h.version,
                        if h.floor_only { " floor_only" } else { "" }
                    ),
                    Kind::Ack(a) => format!("ack {}", a.version),
                    Kind::Nack(n) => format!("nack {}: {}", n.version, n.reason),
                });
            }
        });
        answers
    }
}

impl Drop for Crafted {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

/// `[control_plane]` for a [`Crafted`] server, trusting `key_file`'s public key.
fn crafted_config(key_file: &Path) -> String {
    format!(
        "\n[control_plane]\nurl = \"http://127.0.0.1:7444\"\ninsecure = true\nnode_id = \"edge-1\"\ntrusted_keys = [\"{}\"]\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n",
        std::fs::read_to_string(key_file).unwrap().trim()
    )
}

#[test]
fn pushed_policy_enforces_and_survives_control_plane_loss() {
    if !require_root("pushed_policy_enforces_and_survives_control_plane_loss") {
        return;
    }
    let mut lab = Lab::new(1);
    // The local file denies everything: whatever passes came from the control plane.
    lab.write_policy(DENY_ALL_AGENT1);
    let cp = control_plane(&lab);
    write_atomic(&cp.policies.join("default.toml"), &allow_udp_ports("9000"));
    let mut server = start_control_plane(&lab, &cp);
    add_control_plane_to_config(
        &lab,
        &format!(
            "\n[control_plane]\nurl = \"https://127.0.0.1:7443\"\nca = \"{}\"\nnode_id = \"edge-1\"\ntrusted_keys = [\"{}\"]\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n",
            cp.ca.display(),
            cp.public_key
        ),
    );
    lab.start_daemon();
    let first = wait_status(&lab, "the first bundle", |s| {
        s["policy_origin"]
            .as_str()
            .is_some_and(|o| o.starts_with("default.toml@v"))
    });
    assert_eq!(first["control_plane"]["connected"], true, "{first}");
    assert_eq!(lab.probe_udp(&[9000, 9001], 10), vec![10, 0]);

    // A change in the directory reaches the maps; the time from the write to enforcement
    // is reported (a measurement, not a threshold).
    let generation = first["generation"].as_u64().unwrap();
    let written = Instant::now();
    write_atomic(
        &cp.policies.join("default.toml"),
        &allow_udp_ports("9000-9001"),
    );
    let second = wait_status(&lab, "the second bundle", |s| {
        s["generation"].as_u64() > Some(generation)
    });
    eprintln!(
        "policy file write to enforcement: {:.1} ms",
        written.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(lab.probe_udp(&[9000, 9001], 10), vec![10, 10]);
    let version: u64 = second["policy_origin"]
        .as_str()
        .unwrap()
        .rsplit_once("@v")
        .unwrap()
        .1
        .parse()
        .unwrap();

    // The control plane sees the node holding that version.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = lab.control_plane_nodes();
        if nodes[0]["version_acked"].as_u64() == Some(version) {
            assert_eq!(nodes[0]["node_id"], "edge-1");
            assert_eq!(nodes[0]["connected"], true);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node never acked {version}: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Control plane killed: enforcement goes on, the connection state says so.
    server.signal(libc::SIGKILL).unwrap();
    let _ = server.wait_timeout(Duration::from_secs(10));
    wait_status(&lab, "the disconnection", |s| {
        s["control_plane"]["connected"] == false
    });
    assert_eq!(lab.probe_udp(&[9000, 9001], 10), vec![10, 10]);

    // Daemon restarted with the control plane down: the persisted bundle enforces at once
    // (the local file would deny 9000 and 9001).
    lab.stop_daemon(libc::SIGTERM);
    lab.start_daemon();
    let restarted = lab.status_json();
    assert_eq!(
        restarted["policy_origin"], second["policy_origin"],
        "{restarted}"
    );
    assert_eq!(restarted["control_plane"]["connected"], false);
    assert_eq!(lab.probe_udp(&[9000, 9001], 10), vec![10, 10]);
}

#[test]
fn bad_bundles_are_nacked_and_the_last_good_policy_enforces() {
    if !require_root("bad_bundles_are_nacked_and_the_last_good_policy_enforces") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(DENY_ALL_AGENT1);
    let keys = bundle::keygen(&lab.dir.join("keys")).unwrap();
    let key = SigningKey::load(&keys.private_key).unwrap();
    let stranger = SigningKey::generate().unwrap();
    let sign = |key: &SigningKey, version: u64, policy: &str| {
        key.sign(
            version,
            1_700_000_000_000,
            "crafted.toml",
            &bundle::Target::All,
            policy.as_bytes().to_vec(),
        )
        .unwrap()
    };
    let good = sign(&key, 10, &allow_udp_ports("9000"));
    let mut bad_signature = sign(&key, 11, &allow_udp_ports("9000"));
    bad_signature.policy = allow_udp_ports("9000-9001").into_bytes();
    let unknown_key = sign(&stranger, 12, &allow_udp_ports("9000-9001"));
    let old = sign(&key, 5, &allow_udp_ports("9000-9001"));
    let mut unsigned = sign(&key, 13, &allow_udp_ports("9000-9001"));
    unsigned.signature.clear();
    let malformed = sign(
        &key,
        14,
        "[[agents]]\nid = 1\nname = \"coder\"\ninterfaces = [\"gwa1\"]\negress_default = \"sometimes\"\n",
    );
    let mut crafted = Crafted::serve(
        &lab,
        vec![good, bad_signature, unknown_key, old, unsigned, malformed],
    );
    add_control_plane_to_config(&lab, &crafted_config(&keys.public_key));
    lab.start_daemon();
    let text = crafted.hear(7);
    assert_eq!(text[0], "hello 0");
    assert_eq!(text[1], "ack 10");
    assert!(text[2].starts_with("nack 11: bad signature"), "{text:#?}");
    assert!(text[3].starts_with("nack 12: unknown key id"), "{text:#?}");
    assert!(text[4].starts_with("nack 5: rollback"), "{text:#?}");
    assert!(text[5].starts_with("nack 13: unsigned bundle"), "{text:#?}");
    assert!(
        text[6].starts_with("nack 14: ") && text[6].contains("egress_default"),
        "{text:#?}"
    );

    // The last good bundle (10: UDP 9000 only) still enforces on real traffic.
    let s = lab.status_json();
    assert_eq!(s["policy_origin"], "crafted.toml@v10", "{s}");
    assert_eq!(lab.probe_udp(&[9000, 9001], 10), vec![10, 0]);
    drop(lab);
    drop(crafted);
}

#[test]
fn a_stored_bundle_that_no_longer_verifies_keeps_the_rollback_floor() {
    if !require_root("a_stored_bundle_that_no_longer_verifies_keeps_the_rollback_floor") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(DENY_ALL_AGENT1);
    let old_keys = bundle::keygen(&lab.dir.join("old-keys")).unwrap();
    let new_keys = bundle::keygen(&lab.dir.join("new-keys")).unwrap();
    let sign = |keys: &bundle::KeyPaths, version: u64, policy: &str| {
        SigningKey::load(&keys.private_key)
            .unwrap()
            .sign(
                version,
                1_700_000_000_000,
                "crafted.toml",
                &bundle::Target::All,
                policy.as_bytes().to_vec(),
            )
            .unwrap()
    };
    let config = std::fs::read_to_string(lab.config_path()).unwrap();

    // Version 10 under the old key: applied and stored.
    let mut crafted = Crafted::serve(&lab, vec![sign(&old_keys, 10, &allow_udp_ports("9000"))]);
    std::fs::write(
        lab.config_path(),
        config.clone() + &crafted_config(&old_keys.public_key),
    )
    .unwrap();
    lab.start_daemon();
    assert_eq!(crafted.hear(2), ["hello 0", "ack 10"]);
    lab.stop_daemon(libc::SIGTERM);
    drop(crafted);

    // The old key rotated out: the stored bundle no longer verifies, the local file
    // enforces, and status says why. An older bundle under the new key is still a rollback.
    let mut crafted = Crafted::serve(
        &lab,
        vec![
            sign(&new_keys, 5, &allow_udp_ports("9000-9001")),
            sign(&new_keys, 11, &allow_udp_ports("9001")),
        ],
    );
    std::fs::write(
        lab.config_path(),
        config + &crafted_config(&new_keys.public_key),
    )
    .unwrap();
    lab.start_daemon();
    let text = crafted.hear(3);
    assert_eq!(text[0], "hello 10 floor_only", "{text:#?}");
    assert!(text[1].starts_with("nack 5: rollback"), "{text:#?}");
    assert_eq!(text[2], "ack 11", "{text:#?}");
    let s = lab.status_json();
    let cp = &s["control_plane"];
    assert!(
        cp["stored_bundle_error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown key id")),
        "{s}"
    );
    assert_eq!(cp["rollback_floor"], 11, "{s}");
    assert_eq!(cp["enforcing_local_file"], false, "{s}");
    assert_eq!(s["policy_origin"], "crafted.toml@v11", "{s}");
    assert_eq!(lab.probe_udp(&[9000, 9001], 10), vec![0, 10]);
    drop(lab);
    drop(crafted);
}
