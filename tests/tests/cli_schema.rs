//! The CLI's `--json` output against the JSON Schema files that document it
//! (`enforcer/schema/`, one per command): every command runs for real against a daemon
//! enforcing real traffic, and each document it prints must match its schema. The
//! schemas forbid undocumented fields where the shape is fixed, so output that grows a
//! field fails here until the schema (the documentation) says what it is.

use enforcer::lab::require_root;
use integration_tests::{Lab, UDP_9000_POLICY as POLICY, check_schema, schema_dir};
use serde_json::Value;

/// Every schema file and where its command's output is checked: here, unless named.
const SCHEMAS: &[&str] = &[
    "agent",
    // tests/churn.rs checks `agent add`, `agent remove` and `agent wait`.
    "agent-change",
    "agent-wait",
    "agents",
    "audit-record",
    "audit-verify",
    "breaker-reset",
    "certs",
    "doctor",
    "error",
    "inspect-ca",
    "keygen",
    "mode",
    // tests/controlplane.rs checks `control-plane nodes`' document.
    "nodes",
    "policy-apply",
    "policy-check",
    "policy-diff",
    "policy-presets",
    "policy-show",
    "stats",
    "status",
    "stop",
    "top",
];

/// Runs `args`, expects `code`, and checks the document against `schema`.
fn check(lab: &Lab, args: &[&str], code: i32, schema: &str) -> Value {
    let (got, doc) = lab.run_cli_json(args);
    assert_eq!(got, code, "enforcer {args:?}: {doc}");
    check_schema(schema, &doc);
    doc
}

#[test]
fn every_schema_file_is_a_valid_schema_that_a_test_checks() {
    let mut found: Vec<String> = std::fs::read_dir(schema_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .map(|n| {
            n.strip_suffix(".json")
                .unwrap_or_else(|| panic!("{n}: not a .json"))
                .to_owned()
        })
        .collect();
    found.sort();
    assert_eq!(
        found, SCHEMAS,
        "schema files and the list of checked ones differ"
    );
    for name in SCHEMAS {
        let path = schema_dir().join(format!("{name}.json"));
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        jsonschema::meta::validate(&schema)
            .unwrap_or_else(|e| panic!("{} is not a valid JSON Schema: {e}", path.display()));
        assert!(schema["title"].is_string(), "{}: no title", path.display());
    }
}

/// A closed pipe (`enforcer ... | head`) ends a command quietly with success: Rust's
/// `println!` panicked there (exit 101, "failed printing to stdout").
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(integration_tests::enforcer_bin())
        .args(["policy", "presets"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_command_prints_json_that_matches_its_schema() {
    if !require_root("every_command_prints_json_that_matches_its_schema") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    lab.udp_9000_traffic(3, 4);
    let candidate = lab.write_file("candidate.toml", POLICY);
    let candidate = candidate.to_str().unwrap();

    let status = check(&lab, &["status"], 0, "status");
    check(&lab, &["agents"], 0, "agents");
    check(&lab, &["agent", "coder"], 0, "agent");
    check(&lab, &["stats"], 0, "stats");
    check(&lab, &["doctor"], 0, "doctor");
    check(&lab, &["policy", "show"], 0, "policy-show");
    check(&lab, &["policy", "check", candidate], 0, "policy-check");
    check(&lab, &["policy", "presets"], 0, "policy-presets");
    check(&lab, &["inspect", "ca"], 0, "inspect-ca");
    let keys = lab.state_dir().join("keys");
    check(
        &lab,
        &["keygen", "--dir", keys.to_str().unwrap()],
        0,
        "keygen",
    );
    let certs = lab.state_dir().join("certs");
    let made = check(
        &lab,
        &[
            "certs",
            "--dir",
            certs.to_str().unwrap(),
            "--server-name",
            "127.0.0.1",
            "--client",
            "node-1",
        ],
        0,
        "certs",
    );
    assert!(std::path::Path::new(made["clients"]["node-1"]["cert"].as_str().unwrap()).exists());
    check(&lab, &["mode", "coder", "monitor"], 0, "mode");
    check(&lab, &["breaker", "reset", "coder"], 0, "breaker-reset");
    check(&lab, &["policy", "diff", candidate], 0, "policy-diff");
    check(&lab, &["policy", "apply", candidate], 0, "policy-apply");

    // top --json: one document per line per sample.
    let config = lab.config_path();
    let out = lab.cli(&[
        "--json",
        "--config",
        config.to_str().unwrap(),
        "top",
        "--count",
        "2",
        "--interval",
        "0.2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let samples: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("top line {l:?}: {e}")))
        .collect();
    assert_eq!(samples.len(), 2, "{samples:?}");
    samples.iter().for_each(|s| check_schema("top", s));

    // audit tail --json: the records as stored, one per line.
    let out = lab.cli(&[
        "--json",
        "--config",
        config.to_str().unwrap(),
        "audit",
        "tail",
        "-n",
        "50",
    ]);
    assert!(out.status.success(), "{out:?}");
    let records: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect();
    assert!(
        records.iter().any(|r| r["reason"] == "egress_denied"),
        "{records:?}"
    );
    assert!(
        records.iter().any(|r| r["reason"] == "mode_change"),
        "{records:?}"
    );
    records.iter().for_each(|r| check_schema("audit-record", r));
    let log = status["audit"]["file"].as_str().unwrap();
    let ok = check(
        &lab,
        &["audit", "verify", "--no-head", log],
        0,
        "audit-verify",
    );
    assert_eq!(ok["ok"], true);

    // Failures: bad input (exit 2, issues by place) and a runtime error (exit 1).
    let bad = lab.write_file("bad.toml", "[[agents]]\nid = \"one\"\n");
    let e = check(
        &lab,
        &["policy", "check", bad.to_str().unwrap()],
        2,
        "error",
    );
    assert_eq!(e["error"]["issues"][0]["line"], 2, "{e}");
    let e = check(&lab, &["agent", "nobody"], 1, "error");
    assert!(e["error"]["issues"].as_array().unwrap().is_empty(), "{e}");
    let missing = lab.state_dir().join("no-such-audit.jsonl");
    let failed = check(
        &lab,
        &["audit", "verify", "--no-head", missing.to_str().unwrap()],
        1,
        "audit-verify",
    );
    assert_eq!(failed["ok"], false);

    let cleared = check(&lab, &["mode", "coder", "--clear"], 0, "mode");
    assert_eq!(cleared["cleared"], true);

    let stopped = check(&lab, &["stop"], 0, "stop");
    assert!(stopped["stopped_pid"].is_u64(), "{stopped}");
    // With no daemon: status (exit 3) and stats read the pins.
    let pinned = check(&lab, &["status"], 3, "status");
    assert_eq!(pinned["source"], "pinned maps");
    let stats = check(&lab, &["stats"], 0, "stats");
    assert_eq!(stats["source"], "pinned maps");
    let detached = check(&lab, &["stop", "--detach"], 0, "stop");
    assert_eq!(detached["detached"], true, "{detached}");
}
