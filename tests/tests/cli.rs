//! The local CLI against a running daemon (over its Unix socket), and the Prometheus
//! endpoint, with real traffic behind them.

use std::{process::Command, time::Duration};

use enforcer::lab::{ChildGuard, require_root, udp_send};
use integration_tests::{Lab, SERVER_V4, Tmpfs, UDP_9000_POLICY as POLICY, enforcer_bin, sa};
use serde_json::Value;

fn cli_json(lab: &Lab, args: &[&str]) -> Value {
    lab.cli_json(args)
}

#[test]
fn cli_reports_and_controls_a_running_daemon() {
    if !require_root("cli_reports_and_controls_a_running_daemon") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    let (allowed, denied) = lab.udp_9000_traffic(30, 40);
    let a1 = lab.agent(1);

    let status = cli_json(&lab, &["status"]);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["agents"], 1);
    assert_eq!(status["interfaces"], serde_json::json!(["gwa1"]));
    assert_eq!(status["policy_digest"].as_str().unwrap().len(), 64);

    let agents = cli_json(&lab, &["agents"]);
    assert_eq!(agents[0]["name"], "coder");
    assert_eq!(agents[0]["mode"], "enforce");
    assert!(agents[0]["dropped_packets"].as_u64().unwrap() >= 40);

    let agent = cli_json(&lab, &["agent", "coder"]);
    assert_eq!(agent["egress"][0]["ports"], "9000");
    assert_eq!(agent["counters"]["egress_denied"]["packets"], 40);
    assert!(agent["counters"]["allowed"]["packets"].as_u64().unwrap() >= 30);

    let stats = cli_json(&lab, &["stats"]);
    let coder = stats["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 1)
        .unwrap();
    assert_eq!(coder["reasons"]["egress_denied"]["packets"], 40);

    // The same numbers through /metrics.
    let metrics = lab.scrape_metrics();
    assert_eq!(
        metrics[r#"enforcer_packets_total{agent="coder",agent_id="1",reason="egress_denied",verdict="drop"}"#],
        40.0
    );
    // The sums over all agents (one agent here: the same number).
    assert_eq!(
        metrics[r#"enforcer_agents_packets_total{reason="egress_denied",verdict="drop"}"#],
        40.0
    );
    assert_eq!(metrics[r#"enforcer_interfaces{state="attached"}"#], 1.0);
    assert_eq!(metrics[r#"enforcer_interfaces{state="pending"}"#], 0.0);
    assert_eq!(metrics["enforcer_policy_generation"], 1.0);
    let build = metrics
        .keys()
        .find(|k| k.starts_with("enforcer_build_info{"))
        .unwrap_or_else(|| panic!("no build info: {metrics:?}"));
    let version = std::process::Command::new(integration_tests::enforcer_bin())
        .arg("--version")
        .output()
        .unwrap()
        .stdout;
    let version = String::from_utf8(version).unwrap();
    let version = version.trim().strip_prefix("enforcer ").unwrap();
    assert!(build.contains(&format!("version=\"{version}\"")), "{build}");
    assert_eq!(metrics[build], 1.0);
    assert_eq!(metrics[r#"enforcer_map_entries{map="agents"}"#], 1.0);
    assert_eq!(
        metrics[r#"enforcer_policy_reloads_total{result="ok"}"#],
        1.0
    );

    // Monitor mode at run time: the denied port now passes, counted as would-deny.
    let mode = cli_json(&lab, &["mode", "coder", "monitor"]);
    assert_eq!(mode["generation"], 2);
    assert_eq!(
        udp_send(a1, sa(SERVER_V4, 9001), None, b"m", 10, Duration::ZERO).unwrap(),
        10
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        denied.counts().0,
        10,
        "monitor mode lets the would-denied datagrams through"
    );
    let agent = cli_json(&lab, &["agent", "1"]);
    assert_eq!(agent["mode"], "monitor");
    assert_eq!(agent["counters"]["monitor_egress_denied"]["packets"], 10);
    assert_eq!(cli_json(&lab, &["status"])["overrides"]["1"], "monitor");
    cli_json(&lab, &["mode", "coder", "enforce"]);
    assert_eq!(
        udp_send(a1, sa(SERVER_V4, 9001), None, b"e", 5, Duration::ZERO).unwrap(),
        5
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(denied.counts().0, 10, "enforcing again");

    // policy show / diff.
    let shown = cli_json(&lab, &["policy", "show"]);
    assert_eq!(shown["text"], POLICY);
    let candidate = lab.write_file(
        "candidate.toml",
        &POLICY.replace("ports = \"9000\"", "ports = \"9000-9001\""),
    );
    let diff = cli_json(&lab, &["policy", "diff", candidate.to_str().unwrap()]);
    assert_eq!(diff["agents_changed"][0]["name"], "coder");
    assert!(
        diff["diff"]
            .as_str()
            .unwrap()
            .contains("+ports = \"9000-9001\""),
        "{diff}"
    );

    // top samples twice and prints one JSON line of rates.
    let config = lab.config_path();
    let out = lab.cli(&[
        "--json",
        "--config",
        config.to_str().unwrap(),
        "top",
        "--count",
        "1",
        "--interval",
        "0.2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rates: Value = serde_json::from_slice(&out.stdout).unwrap();
    let coder = rates["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == 1)
        .unwrap();
    assert_eq!(coder["name"], "coder");
    assert!(coder["passed_packets_per_sec"].as_f64().unwrap() >= 0.0);

    assert_eq!(allowed.stop().0, 30);
    drop(denied);
}

/// The admin socket lets in root and its group only; the read-only socket serves anyone
/// status and stats, never a change; every change is audited with who asked; a policy over
/// `max_policy_bytes` is refused.
#[test]
fn the_admin_socket_refuses_outsiders_and_the_read_only_one_serves_them() {
    if !require_root("the_admin_socket_refuses_outsiders_and_the_read_only_one_serves_them") {
        return;
    }
    let mut lab = Lab::new(1);
    let config = std::fs::read_to_string(lab.config_path()).unwrap().replace(
        "audit_log = \"audit.jsonl\"\n",
        "audit_log = \"audit.jsonl\"\nmax_policy_bytes = 4096\n",
    );
    std::fs::write(lab.config_path(), config).unwrap();
    lab.write_policy(POLICY);
    lab.start_daemon();
    let socket = lab.runtime_dir().join("enforcer.sock");
    let read_socket = lab.runtime_dir().join("enforcer-ro.sock");
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!((mode(&socket), mode(&read_socket)), (0o660, 0o666));
    // The lab directory must be traversable for the refusal to come from the socket itself.
    for dir in [lab.dir.clone(), lab.runtime_dir()] {
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    // A copy nobody can execute wherever the checkout lives.
    let cli = lab.dir.join("enforcer-cli");
    std::fs::copy(enforcer_bin(), &cli).unwrap();
    let as_nobody = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&cli)
            .args(args)
            .args(["--socket", socket.to_str().unwrap()])
            .output()
            .expect("setpriv (util-linux) runs the CLI as nobody");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = as_nobody(&["mode", "coder", "monitor"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("permission denied connecting to") && out.contains("socket's group"),
        "{out}"
    );
    // Monitoring needs no group: status and stats through the read-only socket.
    for read in [&["status"][..], &["--json", "stats"]] {
        let (ok, out) = as_nobody(read);
        assert!(ok, "{read:?}: {out}");
    }
    // Root is let in, and its changes are audited with its uid and pid.
    let out = lab.cli(&[
        "mode",
        "coder",
        "monitor",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let big = format!("{POLICY}\n{}\n", "# padding\n".repeat(500));
    let file = lab.write_file("big.toml", &big);
    let config = lab.config_path();
    let out = lab.cli(&[
        "--config",
        config.to_str().unwrap(),
        "policy",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_policy_bytes (4096)"), "{stderr}");
    let records = wait_records(&lab, 2);
    let changes: Vec<Value> = records
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["source"] == "api")
        .collect();
    assert_eq!(changes.len(), 2, "{records:#?}");
    assert_eq!(changes[0]["reason"], "mode_change");
    assert_eq!(changes[0]["verdict"], "applied");
    assert_eq!(changes[0]["agent"], 1);
    assert_eq!(changes[0]["actor"]["uid"], 0);
    assert!(
        changes[0]["actor"]["pid"].as_u64().unwrap() > 0,
        "{}",
        changes[0]
    );
    assert_eq!(changes[1]["reason"], "policy_apply");
    assert_eq!(changes[1]["verdict"], "refused");
    assert!(
        changes[1]["detail"]
            .as_str()
            .unwrap()
            .contains("max_policy_bytes"),
        "{}",
        changes[1]
    );
}

/// Waits until the audit log has at least `n` records (the reader writes asynchronously).
fn wait_records(lab: &Lab, n: usize) -> Vec<String> {
    let path = lab.dir.join("audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} audit records after 20 s",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn audit_trail_records_denials_and_detects_tampering() {
    if !require_root("audit_trail_records_denials_and_detects_tampering") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    let a1 = lab.agent(1);
    assert_eq!(
        udp_send(
            a1,
            sa(SERVER_V4, 9001),
            None,
            b"no",
            5,
            Duration::from_millis(1)
        )
        .unwrap(),
        5
    );
    let lines = wait_records(&lab, 5);
    assert_eq!(
        lines.len(),
        5,
        "one record per denial, nothing else: {lines:#?}"
    );
    let digest = cli_json(&lab, &["status"])["policy_digest"].clone();
    for line in &lines {
        let r: Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["reason"], "egress_denied");
        assert_eq!(r["agent_name"], "coder");
        assert_eq!(r["proto"], "udp");
        assert_eq!(r["dst"], "10.200.100.2:9001");
        assert_eq!(r["policy_digest"], digest);
        assert_eq!(r["policy_generation"], 1);
    }

    // The CLI's tail goes through the daemon.
    let config = lab.config_path();
    let out = lab.cli(&[
        "--config",
        config.to_str().unwrap(),
        "--json",
        "audit",
        "tail",
        "-n",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tail = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        tail.lines().collect::<Vec<_>>(),
        lines[3..].iter().map(String::as_str).collect::<Vec<_>>()
    );

    // A restarted daemon continues the same chain.
    lab.stop_daemon(libc::SIGTERM);
    lab.start_daemon();
    assert_eq!(
        udp_send(
            lab.agent(1),
            sa(SERVER_V4, 9001),
            None,
            b"no",
            3,
            Duration::from_millis(1)
        )
        .unwrap(),
        3
    );
    let lines = wait_records(&lab, 8);
    let log = lab.dir.join("audit.jsonl");
    let out = lab.cli(&["--json", "audit", "verify", log.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["lines"], 8);

    // Tampering with the third record is found, and named.
    let mut tampered = lines.clone();
    tampered[2] = tampered[2].replace("10.200.100.2:9001", "10.200.100.2:9000");
    assert_ne!(tampered[2], lines[2]);
    let copy = lab.write_file("tampered.jsonl", &(tampered.join("\n") + "\n"));
    let out = lab.cli(&["audit", "verify", copy.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tampered.jsonl:3: "),
        "verify names the first bad line: {stderr}"
    );

    // Rotated as logrotate does (rename, create, SIGUSR1): the new file continues the
    // chain, and the set verifies as one.
    let rotated = lab.dir.join("audit.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    std::fs::write(&log, b"").unwrap();
    lab.signal_daemon(libc::SIGUSR1);
    // The signal and the records race: wait until a denial lands in the new file.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&log).unwrap().len() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no record reached the new file"
        );
        udp_send(
            lab.agent(1),
            sa(SERVER_V4, 9001),
            None,
            b"no",
            1,
            Duration::ZERO,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let old_lines = std::fs::read_to_string(&rotated).unwrap().lines().count();
    let new = wait_records(&lab, 1);
    let first: Value = serde_json::from_str(&new[0]).unwrap();
    assert_eq!(first["seq"], old_lines as u64 + 1, "seq goes on: {first}");
    let verify = |args: &[&str]| {
        let mut all = vec!["--json", "audit", "verify"];
        all.extend_from_slice(args);
        let out = lab.cli(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (rotated_s, log_s) = (rotated.to_str().unwrap(), log.to_str().unwrap());
    let (ok, report) = verify(&[rotated_s, log_s]);
    assert!(ok, "{report}");
    let report: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["first_seq"], 1);
    assert_eq!(report["lines"], old_lines as u64 + new.len() as u64);
    // The new file alone starts mid-chain: refused unless said to continue one.
    assert!(!verify(&[log_s]).0);
    let (ok, alone) = verify(&["--continued", log_s]);
    assert!(ok, "{alone}");
    let alone: Value = serde_json::from_str(&alone).unwrap();
    assert_eq!(alone["first_seq"], old_lines as u64 + 1);
    // Out of order, the link breaks.
    assert!(!verify(&[log_s, rotated_s]).0);
}

/// `audit tail -f` with filters: starts after the records already there, shows only the
/// asked-for agent's records as they are written, and goes on in the new file after a
/// rotation.
#[test]
fn audit_tail_follows_with_filters_across_rotation() {
    if !require_root("audit_tail_follows_with_filters_across_rotation") {
        return;
    }
    let mut lab = Lab::new(2);
    lab.write_policy(&format!(
        "{POLICY}\n[[agents]]\nid = 2\nname = \"other\"\ninterfaces = [\"gwa2\"]\negress_default = \"deny\"\n"
    ));
    lab.start_daemon();
    let deny = |agent: usize, n: u64| {
        let sent = udp_send(
            lab.agent(agent),
            sa(SERVER_V4, 9001),
            None,
            b"no",
            n,
            Duration::from_millis(1),
        )
        .unwrap();
        assert_eq!(sent, n);
    };
    // Records from before the follow starts are not followed (-n 0 shows none of them).
    deny(1, 2);
    wait_records(&lab, 2);
    let (mut child, rx) = lab.follow_cli(&[
        "--json",
        "audit",
        "tail",
        "-n",
        "0",
        "-f",
        "--agent",
        "coder",
        "--verdict",
        "drop",
    ]);
    let collect = |n: usize| -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => got.push(serde_json::from_str::<Value>(&line).unwrap()),
                Err(_) => panic!("followed {} of {n} records: {got:#?}", got.len()),
            }
        }
        got
    };
    // Let the follower start before anything new is written.
    std::thread::sleep(Duration::from_millis(500));
    deny(2, 3);
    deny(1, 3);
    let first = collect(3);
    // Rotated: the follower goes on in the new file.
    let log = lab.dir.join("audit.jsonl");
    std::fs::rename(&log, lab.dir.join("audit.jsonl.1")).unwrap();
    std::fs::write(&log, b"").unwrap();
    lab.signal_daemon(libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    deny(2, 2);
    deny(1, 2);
    let second = collect(2);
    let all: Vec<&Value> = first.iter().chain(&second).collect();
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(
        seqs[0] > 2,
        "records from before the follow are not repeated: {seqs:?}"
    );
    for r in &all {
        assert_eq!(r["agent_name"], "coder", "{r}");
        assert_eq!(r["verdict"], "drop", "{r}");
    }
    // Nothing else arrives: the other agent's records were filtered out.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    let _ = child.terminate(Duration::from_secs(2));
}

/// `enforcer stop` after the daemon was killed outright (SIGKILL leaves its pid in
/// status.json) and its pid given to another process: that process is not signalled, for a
/// status file of this build (pid and start time) and of an older one (pid only).
#[test]
fn stop_never_signals_a_pid_the_daemon_no_longer_holds() {
    if !require_root("stop_never_signals_a_pid_the_daemon_no_longer_holds") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    let daemon = lab.status();
    assert!(
        daemon.pid_start.is_some(),
        "status.json names the daemon by pid and start time: {daemon:?}"
    );
    lab.stop_daemon(libc::SIGKILL);
    assert_eq!(
        lab.status().pid,
        daemon.pid,
        "a killed daemon leaves its pid"
    );

    // The kernel cannot be made to reuse a pid on demand: the status file is pointed at a
    // bystander instead, as if the daemon's pid had been handed to it.
    let mut bystander = ChildGuard::new(Command::new("sleep").arg("300").spawn().unwrap());
    let config = lab.config_path();
    for (what, pid_start) in [("this build", daemon.pid_start), ("an older build", None)] {
        let status = enforcer::node::daemon::Status {
            pid: bystander.id(),
            pid_start,
            ..daemon.clone()
        };
        std::fs::write(
            lab.runtime_dir().join("status.json"),
            serde_json::to_string(&status).unwrap(),
        )
        .unwrap();
        let out = lab.cli(&["--config", config.to_str().unwrap(), "stop"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: stop failed: {stderr}");
        assert!(
            stderr.contains("not signalling"),
            "{what}: stop should say why it signals nothing: {stderr}"
        );
        assert!(
            bystander.child_mut().try_wait().unwrap().is_none(),
            "{what}: enforcer stop signalled pid {}, which is not the daemon",
            bystander.id()
        );
    }
}

/// `policy apply` and `mode` change nothing when the change cannot be saved: what enforces
/// is what a restart (or a SIGHUP) would read, and the exit code says so.
#[test]
fn a_change_that_cannot_be_saved_is_not_enforced() {
    if !require_root("a_change_that_cannot_be_saved_is_not_enforced") {
        return;
    }
    let mut lab = Lab::new(1);
    // The policy file and the state directory on a file system made read-only under the
    // running daemon, as a remount after an I/O error does.
    let disk = Tmpfs::mount(&lab.dir.join("ro"), "1m");
    std::fs::create_dir_all(lab.dir.join("ro/state")).unwrap();
    std::fs::write(lab.dir.join("ro/policy.toml"), POLICY).unwrap();
    let config = std::fs::read_to_string(lab.config_path())
        .unwrap()
        .replace("policy = \"policy.toml\"", "policy = \"ro/policy.toml\"")
        .replace("state_dir = \"state\"", "state_dir = \"ro/state\"");
    std::fs::write(lab.config_path(), config).unwrap();
    lab.start_daemon();
    disk.remount("ro");
    let before = cli_json(&lab, &["status"]);
    let denied = || {
        cli_json(&lab, &["agents"])[0]["dropped_packets"]
            .as_u64()
            .unwrap()
    };
    let send_denied = || {
        udp_send(
            lab.agent(1),
            sa(SERVER_V4, 9001),
            None,
            b"no",
            5,
            Duration::from_millis(1),
        )
        .unwrap()
    };

    let (ok, out) = lab.run_cli(&["mode", "coder", "monitor"]).ok_output();
    assert!(!ok, "{out}");
    assert!(
        out.contains("not changed") && out.contains("Read-only"),
        "{out}"
    );
    let agents = cli_json(&lab, &["agents"]);
    assert!(agents[0]["override"].is_null(), "{agents}");
    let dropped = denied();
    send_denied();
    assert_eq!(denied(), dropped + 5, "still enforcing, not monitoring");

    let allow_all = POLICY.replace("ports = \"9000\"", "ports = \"9000-9001\"");
    let candidate = lab.write_file("candidate.toml", &allow_all);
    let (ok, out) = lab
        .run_cli(&["policy", "apply", candidate.to_str().unwrap()])
        .ok_output();
    assert!(!ok, "{out}");
    assert!(out.contains("not applied"), "{out}");
    let after = cli_json(&lab, &["status"]);
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(after["policy_digest"], before["policy_digest"], "{after}");

    // Writable again: the change is saved, enforced, and survives a restart.
    disk.remount("rw");
    let (ok, out) = lab.run_cli(&["mode", "coder", "monitor"]).ok_output();
    assert!(ok, "{out}");
    lab.stop_daemon(libc::SIGTERM);
    lab.start_daemon();
    let agents = cli_json(&lab, &["agents"]);
    assert_eq!(agents[0]["override"], "monitor", "{agents}");
    drop(lab);
    drop(disk);
}
