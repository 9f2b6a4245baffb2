//! The audit log under faults: a full file system, a torn last line, records cut from the
//! end. The daemon keeps enforcing and starting, and the chain says what happened.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use enforcer::lab::{require_root, udp_send};
use integration_tests::{Lab, SERVER_V4, Tmpfs, UDP_9000_POLICY as POLICY, sa};
use serde_json::Value;

fn cli_json(lab: &Lab, args: &[&str]) -> Value {
    lab.cli_json(args)
}

/// `enforcer audit verify ARGS` with the lab's configuration: success and what it printed.
fn verify(lab: &Lab, args: &[&str]) -> (bool, String) {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    lab.run_cli(&all).ok_output()
}

/// Sends `n` denied datagrams from agent 1.
fn deny(lab: &Lab, n: u64) {
    let sent = udp_send(
        lab.agent(1),
        sa(SERVER_V4, 9001),
        None,
        b"no",
        n,
        Duration::from_micros(200),
    )
    .unwrap();
    assert_eq!(sent, n);
}

fn records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls `done` (sending `n` denials between polls, when `n > 0`) until it holds; the
/// deadline only bounds a hang.
fn wait_until(lab: &Lab, what: &str, n: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after 30 s");
        if n > 0 {
            deny(lab, n);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A lab with one agent whose audit log is `log` (relative to the lab directory) and
/// whose audit budget lets every denial through.
fn lab_with_log(log: &str) -> Lab {
    let lab = Lab::new(1);
    let config = fs::read_to_string(lab.config_path()).unwrap().replace(
        "audit_log = \"audit.jsonl\"\n",
        &format!("audit_log = \"{log}\"\naudit_events_per_sec = 100000\naudit_burst = 100000\n"),
    );
    fs::write(lab.config_path(), config).unwrap();
    lab.write_policy(POLICY);
    lab
}

#[test]
fn audit_writing_resumes_after_a_full_disk_and_records_the_gap() {
    if !require_root("audit_writing_resumes_after_a_full_disk_and_records_the_gap") {
        return;
    }
    let mut lab = lab_with_log("full/audit.jsonl");
    // Dropped before the lab: unmounted before the lab's directory is removed.
    let disk = Tmpfs::mount(&lab.dir.join("full"), "64k");
    let log = lab.dir.join("full/audit.jsonl");
    lab.start_daemon();

    // Fill the file system: the failure shows in status at once, and enforcing goes on.
    let mut failing = Value::Null;
    wait_until(&lab, "status reports the audit log failing", 100, || {
        failing = cli_json(&lab, &["status"])["audit"].clone();
        !failing["last_error"].is_null()
    });
    assert!(
        failing["last_error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{failing}"
    );
    assert!(failing["failing_since"].is_string(), "{failing}");
    assert!(failing["write_errors"].as_u64().unwrap() >= 1, "{failing}");
    let written_before = records(&log).len();
    assert!(
        written_before > 50,
        "the log took records until it was full"
    );
    // Denied while the disk is full: the data plane still drops, the writer counts.
    let dropped = || {
        cli_json(&lab, &["agents"])[0]["dropped_packets"]
            .as_u64()
            .unwrap()
    };
    let before = dropped();
    deny(&lab, 300);
    assert!(dropped() >= before + 300, "the program keeps enforcing");
    wait_until(&lab, "events counted as unwritten", 0, || {
        cli_json(&lab, &["status"])["audit"]["events_unwritten"]
            .as_u64()
            .unwrap()
            >= 300
    });

    // Space returns: writing resumes by itself (retry with backoff), first with a record
    // of how many events were lost, then with new denials.
    disk.remount("size=4m");
    wait_until(&lab, "the audit log writable again", 20, || {
        cli_json(&lab, &["status"])["audit"]["last_error"].is_null()
    });
    deny(&lab, 5);
    wait_until(&lab, "new denials in the log", 5, || {
        records(&log)
            .last()
            .is_some_and(|r| r["reason"] == "egress_denied" && r["source"].is_null())
            && records(&log).len() > written_before + 1
    });
    let all = records(&log);
    let gaps: Vec<&Value> = all
        .iter()
        .filter(|r| r["reason"] == "events_lost")
        .collect();
    assert!(!gaps.is_empty(), "a record says events were lost");
    let lost: u64 = gaps
        .iter()
        .map(|r| r["events_lost"].as_u64().unwrap())
        .sum();
    let unwritten = cli_json(&lab, &["status"])["audit"]["events_unwritten"]
        .as_u64()
        .unwrap();
    assert_eq!(
        lost, unwritten,
        "the chain's gap records account for every unwritten event"
    );
    assert!(lost >= 300, "{lost}");
    assert_eq!(gaps[0]["source"], "audit");
    assert!(
        gaps[0]["detail"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{}",
        gaps[0]
    );
    let (ok, out) = verify(&lab, &[log.to_str().unwrap()]);
    assert!(ok, "{out}");
    drop(lab);
    drop(disk);
}

#[test]
fn a_torn_audit_line_is_set_aside_and_the_daemon_starts() {
    if !require_root("a_torn_audit_line_is_set_aside_and_the_daemon_starts") {
        return;
    }
    let mut lab = lab_with_log("audit.jsonl");
    let log = lab.dir.join("audit.jsonl");
    lab.start_daemon();
    deny(&lab, 3);
    wait_until(&lab, "three records", 0, || records(&log).len() >= 3);
    lab.stop_daemon(libc::SIGTERM);
    let written = records(&log).len();
    // A write cut short by a crash: part of a line, no newline.
    let torn = br#"{"seq":99,"time":"2026-12-07T01:"#;
    let mut bytes = fs::read(&log).unwrap();
    bytes.extend_from_slice(torn);
    fs::write(&log, &bytes).unwrap();

    // Starts (start_daemon panics if it exits), and says what it found.
    lab.start_daemon();
    let status = cli_json(&lab, &["status"]);
    let recovered = status["audit"]["recovered"].as_array().unwrap();
    assert_eq!(recovered.len(), 1, "{status}");
    let side: Vec<PathBuf> = fs::read_dir(&lab.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("audit.jsonl.tail-"))
        .collect();
    assert_eq!(side.len(), 1, "{side:?}");
    assert_eq!(fs::read(&side[0]).unwrap(), torn, "the torn bytes, kept");
    let all = records(&log);
    assert_eq!(all.len(), written + 1);
    let notice = &all[written];
    assert_eq!(notice["reason"], "tail_set_aside");
    assert_eq!(notice["source"], "audit");
    assert!(
        notice["detail"]
            .as_str()
            .unwrap()
            .contains(&side[0].display().to_string()),
        "{notice}"
    );
    // The chain goes on through the notice.
    deny(&lab, 2);
    wait_until(&lab, "records after the notice", 0, || {
        records(&log).len() >= written + 3
    });
    let (ok, out) = verify(&lab, &[log.to_str().unwrap()]);
    assert!(ok, "{out}");
}

#[test]
fn audit_verify_catches_a_cut_tail_against_the_saved_head() {
    if !require_root("audit_verify_catches_a_cut_tail_against_the_saved_head") {
        return;
    }
    let mut lab = lab_with_log("audit.jsonl");
    let log = lab.dir.join("audit.jsonl");
    let log_s = log.to_str().unwrap().to_string();
    lab.start_daemon();
    deny(&lab, 5);
    wait_until(&lab, "five records", 0, || records(&log).len() >= 5);
    // status and the head file name the head, for collection off the host.
    wait_until(&lab, "the head saved", 0, || {
        cli_json(&lab, &["status"])["audit"]["head_saved_seq"] == 5
    });
    let status = cli_json(&lab, &["status"]);
    lab.stop_daemon(libc::SIGTERM);
    let saved: Value =
        serde_json::from_slice(&fs::read(lab.state_dir().join("audit-head.json")).unwrap())
            .unwrap();
    assert_eq!(saved["seq"], 5);
    assert_eq!(saved["hash"], status["audit"]["head"]);

    let original = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let (ok, out) = verify(&lab, &[&log_s]);
    assert!(ok && out.contains("seq 5"), "{out}");
    for cut in [1, 2] {
        fs::write(&log, lines[..lines.len() - cut].join("\n") + "\n").unwrap();
        // The chain alone still holds: only the saved head shows the cut.
        assert!(verify(&lab, &["--no-head", &log_s]).0);
        let (ok, out) = verify(&lab, &[&log_s]);
        assert!(!ok, "cut {cut}: {out}");
        assert!(out.contains("cut from the end"), "{out}");
    }
    let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
    let last = edited.last_mut().unwrap();
    *last = last.replace("10.200.1.2", "10.200.1.3");
    fs::write(&log, edited.join("\n") + "\n").unwrap();
    assert!(verify(&lab, &["--no-head", &log_s]).0);
    let (ok, out) = verify(&lab, &[&log_s]);
    assert!(!ok && out.contains("was changed"), "{out}");

    // A daemon started on a cut log records the mismatch in the chain and goes on.
    fs::write(&log, lines[..3].join("\n") + "\n").unwrap();
    lab.start_daemon();
    let status = cli_json(&lab, &["status"]);
    assert!(
        status["audit"]["recovered"][0]
            .as_str()
            .unwrap()
            .contains("seq 5"),
        "{status}"
    );
    let all = records(&log);
    assert_eq!(all[3]["reason"], "chain_head_mismatch");
    assert_eq!(all[3]["seq"], 4);
}

#[test]
fn a_flood_over_the_global_budget_becomes_summaries() {
    if !require_root("a_flood_over_the_global_budget_becomes_summaries") {
        return;
    }
    let mut lab = lab_with_log("audit.jsonl");
    let config = fs::read_to_string(lab.config_path()).unwrap().replace(
        "audit_burst = 100000\n",
        "audit_burst = 100000\naudit_global_events_per_sec = 20\naudit_summary_interval_secs = 1\n",
    );
    fs::write(lab.config_path(), config).unwrap();
    let log = lab.dir.join("audit.jsonl");
    lab.start_daemon();
    deny(&lab, 500);
    // Every denial is in a record of its own or counted in a summary: none is lost.
    let mut counted = 0;
    wait_until(&lab, "all 500 denials accounted for", 0, || {
        let all = records(&log);
        let alone = all
            .iter()
            .filter(|r| r["reason"] == "egress_denied")
            .count() as u64;
        let folded: u64 = all
            .iter()
            .filter(|r| r["reason"] == "summary")
            .map(|r| r["events"].as_u64().unwrap())
            .sum();
        counted = alone + folded;
        counted >= 500
    });
    assert_eq!(counted, 500);
    let all = records(&log);
    let alone = all
        .iter()
        .filter(|r| r["reason"] == "egress_denied")
        .count();
    assert!(
        alone < 250,
        "most of the flood is summarized, not written alone: {alone} records"
    );
    let summaries: Vec<&Value> = all.iter().filter(|r| r["reason"] == "summary").collect();
    assert!(!summaries.is_empty());
    for s in &summaries {
        assert_eq!(s["source"], "audit");
        assert_eq!(s["agent"], 1);
        assert_eq!(s["agent_name"], "coder");
        assert_eq!(s["event_reason"], "egress_denied");
        assert_eq!(s["first"]["dst"], "10.200.100.2:9001");
        assert_eq!(s["last"]["proto"], "udp");
    }
    let health = &cli_json(&lab, &["status"])["audit"];
    assert_eq!(
        health["events_summarized"].as_u64().unwrap() as usize,
        500 - alone,
        "{health}"
    );
    let (ok, out) = verify(&lab, &[log.to_str().unwrap()]);
    assert!(ok, "{out}");
}
