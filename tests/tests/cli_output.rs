//! What the CLI prints for people and for scripts (issue 15): `agents` and `agent`,
//! `top`, `audit tail`, and the verdict label and build info on /metrics, each against a
//! running daemon with real traffic from agent namespaces.

use std::{
    process::Output,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use enforcer::{
    cli::output,
    lab::{UdpSink, require_root, udp_send},
};
use integration_tests::{Lab, SERVER_V4, sa};
use serde_json::Value;

/// Agent 1 may send UDP to the server's port 9000 and ICMP to it; agent 2, whose name is
/// longer than a narrow terminal leaves room for, may send nothing.
const POLICY: &str = r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
egress_default = "deny"
rate = { packets_per_sec = 100000, packets_burst = 20000, bytes_per_sec = 10_000_000, bytes_burst = 1_000_000 }
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "icmp"

[[agents]]
id = 2
name = "a-rather-long-agent-name-for-narrow-terminals"
interfaces = ["gwa2"]
egress_default = "deny"
"#;

const LONG_NAME: &str = "a-rather-long-agent-name-for-narrow-terminals";

fn lab() -> Lab {
    let mut lab = Lab::new(2);
    lab.write_policy(POLICY);
    lab.start_daemon();
    lab
}

/// `enforcer --config <the lab's> ARGS` with `env`; panics unless it succeeds.
fn run(lab: &Lab, env: &[(&str, &str)], args: &[&str]) -> String {
    let config = lab.config_path();
    let out: Output = lab
        .gw
        .command(integration_tests::enforcer_bin())
        .env_remove("COLUMNS")
        .envs(env.iter().copied())
        .args(["--config", config.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "enforcer {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends `n` datagrams from agent `i` to the server's port 9001, which no rule allows.
fn deny(lab: &Lab, i: usize, n: u64) {
    let sent = udp_send(
        lab.agent(i),
        sa(SERVER_V4, 9001),
        None,
        b"no",
        n,
        Duration::ZERO,
    );
    assert_eq!(sent.unwrap(), n);
}

/// Whether `s` is an RFC 3339 time in UTC: `2026-12-07T04:50:00Z`, with or without a
/// fraction of a second.
fn is_utc_rfc3339(s: &str) -> bool {
    let digits = |r: std::ops::Range<usize>| {
        s.get(r)
            .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
    };
    let fraction = s.get(19..s.len() - 1).unwrap_or("x");
    s.len() >= 20
        && digits(0..4)
        && &s[4..5] == "-"
        && digits(5..7)
        && &s[7..8] == "-"
        && digits(8..10)
        && &s[10..11] == "T"
        && digits(11..13)
        && &s[13..14] == ":"
        && digits(14..16)
        && &s[16..17] == ":"
        && digits(17..19)
        && s.ends_with('Z')
        && (fraction.is_empty()
            || fraction.starts_with('.')
                && fraction.len() > 1
                && fraction[1..].bytes().all(|b| b.is_ascii_digit()))
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn agents_and_agent_scale_align_mark_overrides_and_give_icmp_no_ports() {
    if !require_root("agents_and_agent_scale_align_mark_overrides_and_give_icmp_no_ports") {
        return;
    }
    let lab = lab();
    deny(&lab, 1, 1234);
    let changed = lab.cli_json(&["mode", "coder", "monitor"]);
    assert_eq!(changed["mode"], "monitor", "{changed}");

    let json = lab.cli_json(&["agents"]);
    assert_eq!(json[0]["dropped_packets"], 1234, "{json}");
    assert_eq!(json[0]["override"], "monitor", "{json}");
    assert!(json[1]["override"].is_null(), "{json}");

    let text = run(&lab, &[], &["agents"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    // DROPPED is scaled and ends under its header.
    let end = lines[0].find("DROPPED").unwrap() + "DROPPED".len();
    assert_eq!(&lines[1][end - 5..end], "1.23K", "{text}");
    assert_eq!(lines[1].len(), end, "{text}");
    assert_eq!(&lines[2][end - 1..], "0", "{text}");
    assert!(lines[1].contains(" monitor (override) "), "{text}");
    assert!(lines[2].contains(" enforce "), "{text}");
    assert!(!lines[2].contains("override"), "{text}");

    let json = lab.cli_json(&["agent", "coder"]);
    assert_eq!(json["egress"][0]["ports"], "9000", "{json}");
    assert_eq!(json["egress"][1]["proto"], "icmp", "{json}");
    assert!(json["egress"][1]["ports"].is_null(), "{json}");
    let denied_bytes = json["counters"]["egress_denied"]["bytes"].as_f64().unwrap();

    let text = run(&lab, &[], &["agent", "coder"]);
    assert!(
        text.starts_with("agent 1 \"coder\", mode monitor (override)\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  rate        100K pps (burst 20.0K), 10.0 MB/s (burst 1.00 MB)\n"),
        "{text}"
    );
    assert!(!text.contains("0-65535"), "{text}");
    assert!(!text.contains("bytes_burst"), "{text}");
    let rule = |proto: &str| {
        text.lines()
            .find(|l| words(l).get(1) == Some(&proto))
            .unwrap_or_else(|| panic!("no {proto} rule: {text}"))
    };
    let server = format!("{SERVER_V4}/32");
    assert_eq!(words(rule("icmp")), ["allow", "icmp", &server], "{text}");
    assert_eq!(
        words(rule("udp")),
        ["allow", "udp", "9000", &server],
        "{text}"
    );
    let denied = text
        .lines()
        .find(|l| l.trim_start().starts_with("egress_denied"))
        .unwrap_or_else(|| panic!("no egress_denied counter: {text}"));
    let expected = format!("egress_denied drop 1.23K {}", output::bytes(denied_bytes));
    assert_eq!(words(denied), words(&expected), "{text}");

    let long = run(&lab, &[], &["agent", "2"]);
    assert!(long.contains("\n  rate        unlimited\n"), "{long}");
}

/// Runs `top` while `agents` send denied datagrams, and returns what it printed.
fn top_under_traffic(lab: &Lab, agents: &[usize], env: &[(&str, &str)], args: &[&str]) -> String {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for &i in agents {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    deny(lab, i, 20);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let out = run(lab, env, args);
        stop.store(true, Ordering::Relaxed);
        out
    })
}

#[test]
fn top_fits_sixty_columns_sorts_and_prints_blocks_off_a_terminal() {
    if !require_root("top_fits_sixty_columns_sorts_and_prints_blocks_off_a_terminal") {
        return;
    }
    let lab = lab();
    // Only agent 2 drops: by dropped packets it comes first, then the others by id.
    let text = top_under_traffic(
        &lab,
        &[2],
        &[("COLUMNS", "60")],
        &[
            "top",
            "--count",
            "2",
            "--interval",
            "0.3",
            "--sort",
            "dropped",
        ],
    );
    assert!(
        !text.contains('\x1b'),
        "screen codes off a terminal: {text:?}"
    );
    for line in text.lines() {
        assert!(
            line.chars().count() <= 60,
            "{line:?} is wider than 60: {text}"
        );
    }
    // Two blocks, each under a timestamp line, apart by a blank line.
    let blocks: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(blocks.len(), 2, "{text}");
    for block in &blocks {
        let lines: Vec<&str> = block.lines().collect();
        // Unknown traffic (id 0) and the two agents.
        assert_eq!(lines.len(), 5, "{block}");
        let title = words(lines[0]);
        assert_eq!(title[..2], ["enforcer", "top"], "{block}");
        assert!(
            is_utc_rfc3339(title[2]),
            "{} is no RFC 3339 time: {block}",
            title[2]
        );
        assert_eq!(
            words(lines[1]),
            [
                "ID", "NAME", "PASS", "pkt/s", "DROP", "pkt/s", "PASS", "bit/s", "DROP", "bit/s"
            ],
            "{block}"
        );
        // The long name is shortened, not wrapped.
        assert!(lines.iter().all(|l| !l.contains(LONG_NAME)), "{block}");
    }
    let second: Vec<&str> = blocks[1].lines().collect();
    let row2 = words(second[2]);
    assert_eq!(row2[0], "2", "{text}");
    assert!(row2[1].ends_with('…'), "{text}");
    assert!(
        LONG_NAME.starts_with(row2[1].trim_end_matches('…')),
        "{text}"
    );
    assert_eq!(words(second[3])[..2], ["0", "(unknown)"], "{text}");
    assert_eq!(words(second[4])[..2], ["1", "coder"], "{text}");
    // It drops, so its dropped rates are not zero; the others' are.
    assert_ne!(row2[3], "0", "{text}");
    assert_eq!(words(second[4])[3], "0", "{text}");
    assert!(second[2].ends_with("bit/s"), "{text}");

    // Without COLUMNS and without a terminal there is no width limit; by id by default.
    let wide = top_under_traffic(
        &lab,
        &[2],
        &[],
        &["top", "--count", "1", "--interval", "0.2"],
    );
    let lines: Vec<&str> = wide.lines().collect();
    assert_eq!(words(lines[2])[..2], ["0", "(unknown)"], "{wide}");
    assert_eq!(words(lines[3])[..2], ["1", "coder"], "{wide}");
    assert_eq!(words(lines[4])[..2], ["2", LONG_NAME], "{wide}");
}

/// On a terminal 60 columns wide (a pty from `script`, sized with `stty`), `top` redraws
/// the screen in place and its lines fit the terminal's width, found with TIOCGWINSZ.
#[test]
fn top_on_a_terminal_clears_the_screen_and_fits_its_width() {
    if !require_root("top_on_a_terminal_clears_the_screen_and_fits_its_width") {
        return;
    }
    let lab = lab();
    let config = lab.config_path();
    let command = format!(
        "stty cols 60 rows 40; {} --config {} top --count 2 --interval 0.2",
        integration_tests::enforcer_bin().display(),
        config.display()
    );
    let out = lab
        .gw
        .command("script")
        .env_remove("COLUMNS")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap().replace('\r', "");
    let screens: Vec<&str> = text.split("\x1b[H\x1b[2J").collect();
    // Nothing before the first screen, then two screens.
    assert_eq!(screens.len(), 3, "{text:?}");
    assert_eq!(screens[0], "", "{text:?}");
    for screen in &screens[1..] {
        let rows: Vec<&str> = screen.lines().collect();
        // The title is whole: the quit hint is left out where it would not fit.
        assert!(rows[0].ends_with("every 0.2s"), "{screen}");
        assert_eq!(rows.len(), 5, "{screen}");
        for line in &rows {
            assert!(
                line.chars().count() <= 60,
                "{line:?} is wider than 60: {screen}"
            );
        }
        assert!(!screen.contains(LONG_NAME), "{screen}");
        assert!(rows[4].starts_with(" 2  a-rather"), "{screen}");
        assert!(words(rows[4])[1].ends_with('…'), "{screen}");
    }
}

#[test]
fn top_json_prints_a_line_per_sample_with_time_and_units() {
    if !require_root("top_json_prints_a_line_per_sample_with_time_and_units") {
        return;
    }
    let lab = lab();
    let text = top_under_traffic(
        &lab,
        &[1, 2],
        &[],
        &["--json", "top", "--count", "2", "--interval", "0.3"],
    );
    let samples: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(samples.len(), 2, "{text}");
    for sample in &samples {
        let time = sample["time"].as_str().unwrap();
        assert!(is_utc_rfc3339(time), "{sample}");
        let agents = sample["agents"].as_array().unwrap();
        let ids: Vec<u64> = agents.iter().map(|a| a["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [0, 1, 2], "{sample}");
        for a in agents {
            let mut keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                [
                    "dropped_bits_per_sec",
                    "dropped_packets_per_sec",
                    "id",
                    "name",
                    "passed_bits_per_sec",
                    "passed_packets_per_sec"
                ],
                "{sample}"
            );
            // Packets to two decimals, bits whole.
            for k in ["passed_packets_per_sec", "dropped_packets_per_sec"] {
                let v = a[k].as_f64().unwrap() * 100.0;
                assert!((v - v.round()).abs() < 1e-6, "{k} not rounded: {sample}");
            }
            assert!(a["passed_bits_per_sec"].is_u64(), "{sample}");
            assert!(a["dropped_bits_per_sec"].is_u64(), "{sample}");
        }
    }
    let coder = samples[1]["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 1)
        .unwrap();
    assert_eq!(coder["name"], "coder");
    assert!(
        coder["dropped_packets_per_sec"].as_f64().unwrap() > 0.0,
        "{coder}"
    );
    assert!(
        coder["dropped_bits_per_sec"].as_u64().unwrap() > 0,
        "{coder}"
    );
}

/// Waits until the audit log holds `n` lines, and returns them.
fn wait_records(lab: &Lab, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(lab.dir.join("audit.jsonl")).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} records: {lines:#?}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn audit_tail_prints_a_table_json_with_json_and_follows_in_the_same_format() {
    if !require_root("audit_tail_prints_a_table_json_with_json_and_follows_in_the_same_format") {
        return;
    }
    let lab = lab();
    // A change through the API is a record too, of another kind.
    let policy = lab.dir.join("policy.toml");
    run(&lab, &[], &["policy", "apply", policy.to_str().unwrap()]);
    deny(&lab, 1, 2);
    let records = wait_records(&lab, 3);
    assert_eq!(records.len(), 3, "{records:#?}");

    let json = run(&lab, &[], &["--json", "audit", "tail", "-n", "3"]);
    assert_eq!(
        json.lines().collect::<Vec<_>>(),
        records.iter().map(String::as_str).collect::<Vec<_>>(),
        "--json prints the records as stored"
    );

    let text = run(&lab, &[], &["audit", "tail", "-n", "3"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        words(lines[0]),
        ["TIME", "AGENT", "VERDICT", "REASON", "PROTO", "FLOW"],
        "{text}"
    );
    let change = words(lines[1]);
    assert_eq!(
        change[2..6],
        ["-", "applied", "policy_apply", "-"],
        "{text}"
    );
    assert_eq!(change[6], "[api]", "{text}");
    assert!(lines[1].ends_with("by uid 0"), "{text}");
    for (line, record) in lines[2..].iter().zip(&records[1..]) {
        let r: Value = serde_json::from_str(record).unwrap();
        let w = words(line);
        // `2026-12-07T04:50:00.123456789Z` reads `2026-12-07 04:50:00.123`.
        let t = r["time"].as_str().unwrap();
        assert_eq!(w[..2], [&t[..10], &t[11..23]], "{text}");
        let src = r["src"].as_str().unwrap();
        assert_eq!(
            w[2..],
            [
                "coder",
                "drop",
                "egress_denied",
                "udp",
                src,
                "->",
                "10.200.100.2:9001"
            ],
            "{text}"
        );
        // Every column starts under its header.
        for title in ["AGENT", "VERDICT", "REASON", "PROTO", "FLOW"] {
            let at = lines[0].find(title).unwrap();
            assert_eq!(&line[at - 1..=at].chars().next(), &Some(' '), "{text}");
            assert_ne!(&line[at..=at], " ", "{title}: {text}");
        }
    }

    // -f: the header, then each new record as a row like the ones above.
    let (_child, rx) = lab.follow_cli(&["audit", "tail", "-n", "0", "-f"]);
    let next = || {
        rx.recv_timeout(Duration::from_secs(20))
            .expect("a line from audit tail -f")
    };
    assert_eq!(next(), lines[0], "the same header");
    deny(&lab, 1, 1);
    let followed = next();
    assert_eq!(
        words(&followed)[2..6],
        ["coder", "drop", "egress_denied", "udp"],
        "{followed}"
    );
    assert!(followed.ends_with(" -> 10.200.100.2:9001"), "{followed}");
    assert!(
        serde_json::from_str::<Value>(&followed).is_err(),
        "{followed}"
    );
}

#[test]
fn metrics_label_packets_and_bytes_with_their_verdict_and_give_build_info() {
    if !require_root("metrics_label_packets_and_bytes_with_their_verdict_and_give_build_info") {
        return;
    }
    let lab = lab();
    deny(&lab, 1, 25);
    // A listener, so no port-unreachable answer fails the sender's next send.
    let sink = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
    let sent = udp_send(
        lab.agent(1),
        sa(SERVER_V4, 9000),
        None,
        b"ok",
        15,
        Duration::ZERO,
    );
    assert_eq!(sent.unwrap(), 15);
    let denied = lab.cli_json(&["agent", "coder"])["counters"]["egress_denied"].clone();
    let m = lab.scrape_metrics();
    let series = |name: &str, reason: &str, verdict: &str| {
        let key = format!(
            r#"enforcer_{name}_total{{agent="coder",agent_id="1",reason="{reason}",verdict="{verdict}"}}"#
        );
        *m.get(&key).unwrap_or_else(|| panic!("no {key}: {m:#?}"))
    };
    assert_eq!(series("packets", "egress_denied", "drop"), 25.0);
    assert_eq!(
        series("bytes", "egress_denied", "drop"),
        denied["bytes"].as_f64().unwrap()
    );
    assert!(series("packets", "allowed", "pass") >= 15.0);
    assert_eq!(
        m[r#"enforcer_agents_packets_total{reason="egress_denied",verdict="drop"}"#],
        25.0
    );
    // Every packet and byte series says its verdict, the one its reason has.
    for key in m.keys().filter(|k| {
        [
            "enforcer_packets_total{",
            "enforcer_bytes_total{",
            "enforcer_agents_packets_total{",
        ]
        .iter()
        .any(|p| k.starts_with(p))
    }) {
        let drop = enforcer_common::Reason::ALL
            .iter()
            .any(|r| r.is_drop() && key.contains(&format!("reason=\"{}\"", r.name())));
        let verdict = if drop {
            r#"verdict="drop""#
        } else {
            r#"verdict="pass""#
        };
        assert!(key.ends_with(&format!("{verdict}}}")), "{key}");
    }
    let version = run(&lab, &[], &["--version"]);
    let version = version.trim().strip_prefix("enforcer ").unwrap();
    let build: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with("enforcer_build_info{"))
        .collect();
    assert_eq!(build.len(), 1, "{m:#?}");
    let (key, value) = build[0];
    assert_eq!(*value, 1.0);
    assert!(
        key.starts_with(&format!(
            r#"enforcer_build_info{{version="{version}",object_sha256=""#
        )),
        "{key}"
    );
    drop(sink);
}
