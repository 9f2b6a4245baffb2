//! What the CLI says about the daemon's state and the pinned program's (issue 15): mode
//! overrides kept out of `policy diff` and cleared with `mode --clear`; `stop` in one
//! accurate line; `status` and `stats` with no daemon; a pin path that is not a bpffs; a
//! log without colour codes when it is not a terminal.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use enforcer::lab::require_root;
use integration_tests::{Lab, Tmpfs, UDP_9000_POLICY as POLICY, enforcer_bin};
use serde_json::Value;

/// `enforcer --config <the lab's> ARGS`: exit code, stdout, stderr.
fn run(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let run = lab.run_cli(args);
    (run.code, run.stdout, run.stderr)
}

fn outcome(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Points the lab's configuration at another pin directory.
fn set_bpffs(lab: &Lab, bpffs: &Path) {
    let path = lab.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    let old = format!("bpffs = \"{}\"\n", lab.bpffs().display());
    assert!(config.contains(&old), "{config}");
    std::fs::write(
        &path,
        config.replace(&old, &format!("bpffs = \"{}\"\n", bpffs.display())),
    )
    .unwrap();
}

/// The agent's 5 allowed and 7 denied datagrams.
fn traffic(lab: &Lab) {
    lab.udp_9000_traffic(5, 7);
}

#[test]
fn mode_overrides_stay_out_of_policy_diff_and_clear_restores_the_policy_mode() {
    if !require_root("mode_overrides_stay_out_of_policy_diff_and_clear_restores_the_policy_mode") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    let file = lab.dir.join("policy.toml");
    let file = file.to_str().unwrap();

    let (code, out, err) = run(&lab, &["mode", "coder", "monitor"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("agent 1 now in monitor mode"), "{out}");

    // Against the file that is enforcing: no change of the file's, the override apart.
    let (code, out, err) = run(&lab, &["policy", "diff", file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("changed"), "the override is no change: {out}");
    assert_eq!(
        out.trim(),
        "runtime overrides (not in the file): agent coder: monitor",
        "{out}"
    );
    let (_, diff) = lab.run_cli_json(&["policy", "diff", file]);
    assert_eq!(diff["agents_changed"], serde_json::json!([]), "{diff}");
    assert_eq!(
        diff["overrides"],
        serde_json::json!([{"id": 1, "name": "coder", "mode": "monitor"}])
    );
    // A real change of the file's still shows.
    let changed = lab.write_file("changed.toml", &POLICY.replace("9000", "9002"));
    let (_, diff) = lab.run_cli_json(&["policy", "diff", changed.to_str().unwrap()]);
    assert_eq!(diff["agents_changed"][0]["name"], "coder", "{diff}");

    // --clear: back to the policy's mode, saved and audited.
    let (code, out, err) = run(&lab, &["mode", "coder", "--clear"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out.trim(),
        "agent 1 back in the policy's enforce mode: override cleared (generation 3)"
    );
    let agents = lab.cli_json(&["agents"]);
    assert_eq!(agents[0]["mode"], "enforce");
    assert_eq!(agents[0]["override"], Value::Null);
    let saved = std::fs::read_to_string(lab.state_dir().join("overrides.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&saved).unwrap(),
        serde_json::json!({})
    );
    let audit = std::fs::read_to_string(lab.dir.join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("mode_change") && l.contains("override cleared")),
        "{audit}"
    );
    let (_, out, _) = run(&lab, &["policy", "diff", file]);
    assert!(!out.contains("runtime overrides"), "{out}");
    // Nothing to clear: said, and nothing applied.
    let (code, out, _) = run(&lab, &["mode", "coder", "--clear"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "agent 1 has no override: it is in the policy's enforce mode"
    );
    assert_eq!(lab.status().generation, 3);
    // A mode and --clear together are refused by the parser.
    let (code, _, err) = run(&lab, &["mode", "coder", "monitor", "--clear"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn status_stats_and_stop_say_what_the_pinned_program_does() {
    if !require_root("status_stats_and_stop_say_what_the_pinned_program_does") {
        return;
    }
    let mut lab = Lab::new(1);
    // A pin directory of the daemon's own making, inside the lab's bpffs: `stop --detach`
    // removes it once empty.
    let pins = lab.bpffs().join("enforcer");
    set_bpffs(&lab, &pins);
    lab.write_policy(POLICY);
    lab.start_daemon();
    traffic(&lab);
    let pid = lab.status().pid;

    // With the daemon: milliseconds, the metrics address and the audit log.
    let (code, out, err) = run(&lab, &["status"]);
    println!("status:\n{out}");
    assert_eq!(code, 0, "{err}");
    let apply = out.lines().find(|l| l.starts_with("last apply")).unwrap();
    assert!(apply.ends_with(" ms") && !apply.contains("us"), "{out}");
    assert!(
        out.contains("metrics     http://127.0.0.1:9464/metrics"),
        "{out}"
    );
    let audit_log = lab.dir.join("audit.jsonl");
    assert!(
        out.contains(&format!("audit log   {}", audit_log.display())),
        "{out}"
    );
    let (_, stats) = lab.run_cli_json(&["stats"]);
    assert_eq!(stats["source"], "daemon");

    // stop: one line, naming what keeps enforcing.
    let (code, out, err) = run(&lab, &["stop"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "daemon {pid} stopped; the pinned program keeps enforcing (generation 1 on gwa1)\n"
        )
    );

    // status with no daemon: what the pins enforce, exit 3.
    let (code, out, err) = run(&lab, &["status"]);
    println!("status, no daemon:\n{out}");
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        out.starts_with("daemon      not running: no daemon at"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "pinned      policy generation 1 (sha256 {}, 1 agent), from the maps under {}",
            lab.status().digest,
            pins.display()
        )),
        "{out}"
    );
    let attached = out.lines().find(|l| l.starts_with("attached")).unwrap();
    assert!(
        attached.contains("gwa1") && attached.contains("tc ") && !attached.contains("NOT"),
        "{out}"
    );
    let (code, status) = lab.run_cli_json(&["status"]);
    assert_eq!(code, 3);
    assert_eq!(status["daemon"], Value::Null);
    assert_eq!(status["source"], "pinned maps");
    assert_eq!(status["enforcing"], true);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["hooks"][0]["interface"], "gwa1");
    assert!(status["hooks"][0]["program_id"].as_u64().unwrap() > 0);

    // stats with no daemon: from the pins, said so, with a verdict per reason.
    let (code, out, err) = run(&lab, &["stats"]);
    println!("stats, no daemon:\n{out}");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().next().unwrap(),
        format!(
            "policy generation 1, from the pinned maps under {} (no daemon running)",
            pins.display()
        )
    );
    let header = out.lines().nth(1).unwrap();
    let verdict = header.find("VERDICT").expect("a VERDICT column");
    let denied = out.lines().find(|l| l.contains("egress_denied")).unwrap();
    assert_eq!(&denied[verdict..verdict + 4], "drop", "{out}");
    let allowed = out.lines().find(|l| l.contains("allowed")).unwrap();
    assert_eq!(&allowed[verdict..verdict + 4], "pass", "{out}");
    let (_, stats) = lab.run_cli_json(&["stats"]);
    assert_eq!(stats["source"], "pinned maps");
    let coder = stats["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 1)
        .unwrap();
    assert_eq!(coder["reasons"]["egress_denied"]["packets"], 7);
    assert_eq!(coder["reasons"]["egress_denied"]["verdict"], "drop");
    assert_eq!(coder["reasons"]["allowed"]["verdict"], "pass");

    // stop with no daemon: nothing to stop, and what still enforces.
    let (code, out, err) = run(&lab, &["stop"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "nothing to stop: no daemon running; the pinned program keeps enforcing (generation 1 on gwa1); `enforcer stop --detach` removes it\n"
    );

    // --detach: one line; the pins and the directory made for them are gone.
    let (code, v) = lab.run_cli_json(&["stop", "--detach"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["detached"], true);
    assert_eq!(v["stopped_pid"], Value::Null);
    assert_eq!(v["interfaces"], serde_json::json!(["gwa1"]));
    assert_eq!(
        v["message"],
        format!(
            "no daemon running and the program detached from gwa1: pins under {} removed",
            pins.display()
        )
    );
    assert!(!pins.exists(), "the emptied pin directory is removed");
    // Once more: nothing there, nothing made.
    let (code, out, err) = run(&lab, &["stop", "--detach"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "nothing to stop: no daemon and no pins under {}\n",
            pins.display()
        )
    );
    assert!(!pins.exists());
    let (code, status) = lab.run_cli_json(&["status"]);
    assert_eq!((code, &status["enforcing"]), (3, &Value::Bool(false)));
}

#[test]
fn stop_finds_the_daemon_through_its_socket_without_a_configuration() {
    if !require_root("stop_finds_the_daemon_through_its_socket_without_a_configuration") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    let pid = lab.status().pid;
    let socket = lab.runtime_dir().join("enforcer.sock");
    let socket = socket.to_str().unwrap();
    let no_config = lab.dir.join("absent.toml");
    let no_config = no_config.to_str().unwrap();

    let (code, out, err) = outcome(&lab.cli(&[
        "--config", no_config, "--socket", socket, "stop", "--detach",
    ]));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        format!(
            "daemon {pid} stopped and the program detached from gwa1: pins under {} removed\n",
            lab.bpffs().display()
        )
    );
    assert!(
        enforcer::dataplane::attached_interfaces(lab.bpffs()).is_empty(),
        "no pinned link left"
    );
    // No daemon at the socket now: nothing to stop, said in one JSON document.
    let (code, out, err) =
        outcome(&lab.cli(&["--json", "--config", no_config, "--socket", socket, "stop"]));
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["message"],
        format!("nothing to stop: no daemon at {socket}")
    );
    // --detach needs the pin path, which only the daemon or the configuration knows.
    let (code, out, err) = outcome(&lab.cli(&[
        "--config", no_config, "--socket", socket, "stop", "--detach",
    ]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("give --config"), "{err}");
}

#[test]
fn a_pin_path_off_bpffs_is_named_once_and_the_log_has_no_colour_codes() {
    if !require_root("a_pin_path_off_bpffs_is_named_once_and_the_log_has_no_colour_codes") {
        return;
    }
    let lab = Lab::new(1);
    lab.write_policy(POLICY);
    // A tmpfs holds both the pins and the state: the daemon warns about the state (a log
    // line to look at) and must refuse the pin path.
    let tmpfs = Tmpfs::mount(&lab.dir.join("tmpfs"), "4m");
    let pins: PathBuf = lab.dir.join("tmpfs/pins");
    set_bpffs(&lab, &pins);
    let path = lab.config_path();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        config.replace("state_dir = \"state\"", "state_dir = \"tmpfs/state\""),
    )
    .unwrap();
    let wanted = format!(
        "{} is not a bpf filesystem (mount one: mount -t bpf bpf {})",
        pins.display(),
        pins.display()
    );

    let out = lab
        .gw
        .command(enforcer_bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .env("ENFORCER_LOG", "info")
        .output()
        .unwrap();
    let (code, stdout, stderr) = outcome(&out);
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert_eq!(stderr.matches(&wanted).count(), 1, "{stderr}");
    assert!(!stderr.contains("requested pinning"), "{stderr}");
    assert!(!pins.exists(), "nothing made on the wrong file system");
    // Not a terminal: the log is plain text.
    assert!(stderr.contains("state_dir is on tmpfs"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes in {stderr:?}");

    // Writing the pinned maps with no daemon checks the same.
    let (code, out, err) = run(
        &lab,
        &[
            "policy",
            "apply",
            lab.dir.join("policy.toml").to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert_eq!(err.matches(&wanted).count(), 1, "{err}");
    assert!(!pins.exists());
    drop(tmpfs);
}
