//! What the daemon and the CLI show and keep of the runaway-agent guards: a breaker and quota
//! use written into the pinned `GUARDS` map by hand (as the data plane would), read back by
//! `agent`, `agents`, `top` and `/metrics`; `breaker reset` closing it, audited with who
//! asked; and quota use that survives pins removed (a reboot, `stop --detach`).
//!
//! The limits come from `GUARD_POLICY`, which the policy's guard syntax fills; these tests
//! write only the state, so an agent without guards in its policy shows a breaker only
//! while its word is not closed, and no quotas.

use enforcer::{
    lab::require_root,
    node::guards::{self, QUOTA_FILE},
};
use enforcer_common::{
    TIME_SHIFT,
    guard::{BREAKER_OPEN, GuardState, QUOTA_WINDOW_SHIFT, breaker_word, quota_window},
};
use integration_tests::{Lab, UDP_9000_POLICY as POLICY, check_schema};
use serde_json::Value;

const SEC: u64 = 1_000_000_000 << TIME_SHIFT;

/// Quota words of the current hour and day with some use.
fn quota_words() -> [u64; 4] {
    let now = guards::unix_secs();
    let hour = quota_window(now, 3600) << QUOTA_WINDOW_SHIFT;
    let day = quota_window(now, 86_400) << QUOTA_WINDOW_SHIFT;
    [hour | 1500, day | 9000, hour | 3, day | 7]
}

#[test]
fn an_open_breaker_shows_everywhere_and_reset_closes_it() {
    if !require_root("an_open_breaker_shows_everywhere_and_reset_closes_it") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    // Open for five more minutes, at cooldown level 2, after 4 trips.
    let until = guards::now_units() + 300 * SEC;
    let state = GuardState {
        breaker: breaker_word(BREAKER_OPEN, 2, until),
        strike_tat: guards::now_units(),
        trips: 4,
        quota: quota_words(),
        ..GuardState::default()
    };
    lab.maps().set_guard_state(1, state).unwrap();

    let agent = lab.cli_json(&["agent", "coder"]);
    check_schema("agent", &agent);
    let b = &agent["guards"]["breaker"];
    assert_eq!(b["state"], "open", "{agent}");
    assert_eq!(b["cooldown_level"], 2, "{agent}");
    let left = b["remaining_secs"].as_f64().unwrap();
    assert!(left > 250.0 && left <= 300.0, "{agent}");
    assert!(b["open_until"].as_str().unwrap().ends_with('Z'), "{agent}");
    assert_eq!(agent["guards"]["trips"], 4, "{agent}");
    // No quota limits in this policy: none shown, whatever the words hold.
    assert_eq!(agent["guards"]["quotas"], serde_json::json!({}), "{agent}");
    let text = lab.run_cli(&["agent", "coder"]);
    assert!(
        text.stdout.contains("  breaker     open until "),
        "{}",
        text.stdout
    );

    let agents = lab.cli_json(&["agents"]);
    check_schema("agents", &agents);
    assert_eq!(agents[0]["breaker"], "open", "{agents}");
    let table = lab.run_cli(&["agents"]);
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(header[3], "BREAKER", "{}", table.stdout);
    assert_eq!(
        table
            .stdout
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .nth(3),
        Some("open"),
        "{}",
        table.stdout
    );
    let stats = lab.cli_json(&["stats"]);
    check_schema("stats", &stats);
    let coder = stats["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == 1)
        .unwrap();
    assert_eq!(coder["breaker"], "open", "{stats}");

    let metrics = lab.scrape_metrics();
    assert_eq!(
        metrics.get("enforcer_breakers{state=\"open\"}"),
        Some(&1.0),
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("enforcer_breakers{state=\"half_open\"}"),
        Some(&0.0),
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("enforcer_breaker_trips_total"),
        Some(&4.0),
        "{metrics:?}"
    );
    assert_eq!(
        metrics.get("enforcer_guard_transitions_total{event=\"breaker_opened\"}"),
        Some(&0.0),
        "{metrics:?}"
    );

    let (code, reset) = lab.run_cli_json(&["breaker", "reset", "gwa1"]);
    assert_eq!(code, 0, "{reset}");
    check_schema("breaker-reset", &reset);
    assert_eq!(reset["agent"], 1);
    assert_eq!(reset["was"], "open");
    assert_eq!(reset["state"], "closed");
    let after = lab.maps().guard_state(1).unwrap();
    assert_eq!(
        after,
        GuardState {
            breaker: 0,
            strike_tat: 0,
            probe_tat: 0,
            ..state
        },
        "quotas and trips stay"
    );
    assert_eq!(lab.cli_json(&["agents"])[0]["breaker"], Value::Null);
    let metrics = lab.scrape_metrics();
    assert_eq!(
        metrics.get("enforcer_breakers{state=\"open\"}"),
        Some(&0.0),
        "{metrics:?}"
    );

    // The reset is in the audit log with who asked.
    let tail = lab.run_cli(&["--json", "audit", "tail", "-n", "20"]);
    let reset_record = tail
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["reason"] == "breaker_reset")
        .unwrap_or_else(|| panic!("no breaker_reset record: {}", tail.stdout));
    check_schema("audit-record", &reset_record);
    assert_eq!(reset_record["agent"], 1, "{reset_record}");
    assert_eq!(reset_record["verdict"], "applied", "{reset_record}");
    assert_eq!(reset_record["actor"]["uid"], 0, "{reset_record}");

    // An unknown agent: an error, and nothing changed.
    let out = lab.run_cli(&["breaker", "reset", "nobody"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no agent \"nobody\""), "{out:?}");
}

#[test]
fn quota_use_survives_pins_removed() {
    if !require_root("quota_use_survives_pins_removed") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(POLICY);
    lab.start_daemon();
    let words = quota_words();
    let state = GuardState {
        breaker: breaker_word(BREAKER_OPEN, 1, guards::now_units() + 300 * SEC),
        trips: 2,
        quota: words,
        ..GuardState::default()
    };
    lab.maps().set_guard_state(1, state).unwrap();
    // The daemon saves at shutdown; then the pins go, as at a reboot.
    lab.stop_daemon(libc::SIGTERM);
    let saved = guards::load_quotas(&lab.state_dir().join(QUOTA_FILE)).unwrap();
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!((saved[0].id, saved[0].name.as_str()), (1, "coder"));
    assert_eq!(saved[0].quota, words);
    let out = lab.run_cli(&["stop", "--detach"]);
    assert_eq!(out.code, 0, "{out:?}");

    lab.start_daemon();
    let restored = lab.maps().guard_state(1).unwrap();
    assert_eq!(restored.quota, words, "quota use restored");
    // Monotonic times mean nothing after a reboot: the breaker is not restored.
    assert_eq!((restored.breaker, restored.trips), (0, 0));

    // A restart over surviving pins keeps GUARDS as it is: nothing written back.
    lab.maps()
        .set_guard_state(
            1,
            GuardState {
                quota: [0; 4],
                ..restored
            },
        )
        .unwrap();
    lab.stop_daemon(libc::SIGTERM);
    lab.start_daemon();
    assert_eq!(lab.maps().guard_state(1).unwrap().quota, [0; 4]);
    lab.stop_daemon(libc::SIGTERM);
}

/// End to end, with the policy's guards (the compile step fills `GUARD_POLICY`): drops open
/// the breaker, the transition is an audit record of its own and a metric, the agent's
/// allowed traffic is refused as `breaker_open` until `breaker reset`, and the quotas show
/// their limits and use.
#[test]
fn drops_open_the_breaker_and_the_trail_says_so() {
    if !require_root("drops_open_the_breaker_and_the_trail_says_so") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(&POLICY.replace(
        "rate = { packets_per_sec = 100000 }\n",
        "rate = { packets_per_sec = 100000 }\n\
         breaker = { drops = 3, within_secs = 10, cooldown_secs = 600 }\n\
         quota = { bytes_per_hour = 1_000_000, connections_per_day = 100 }\n",
    ));
    lab.start_daemon();
    let agent = lab.cli_json(&["agent", "coder"]);
    check_schema("agent", &agent);
    assert_eq!(agent["guards"]["breaker"]["state"], "closed", "{agent}");
    assert_eq!(agent["guards"]["breaker"]["action"], "drop", "{agent}");
    assert_eq!(lab.cli_json(&["agents"])[0]["breaker"], "closed");

    // Three datagrams pass and count against the byte quota; the fourth drop of ten opens.
    let (_ok, _denied) = lab.udp_9000_traffic(3, 10);
    let agent = lab.cli_json(&["agent", "coder"]);
    check_schema("agent", &agent);
    let g = &agent["guards"];
    assert_eq!(g["breaker"]["state"], "open", "{agent}");
    assert_eq!(g["breaker"]["cooldown_level"], 0, "{agent}");
    assert_eq!(g["trips"], 1, "{agent}");
    let bytes = &g["quotas"]["bytes_per_hour"];
    assert_eq!(bytes["limit"], 1_000_000, "{agent}");
    let used = bytes["used"].as_u64().unwrap();
    assert!(used > 0 && used < 1000, "{agent}");
    assert_eq!(g["quotas"]["connections_per_day"]["used"], 0, "{agent}");
    assert!(g["quotas"].get("bytes_per_day").is_none(), "{agent}");

    // Allowed traffic is refused while open.
    enforcer::lab::udp_send(
        lab.agent(1),
        integration_tests::sa(integration_tests::SERVER_V4, 9000),
        None,
        b"x",
        2,
        std::time::Duration::ZERO,
    )
    .unwrap();
    let agent = lab.cli_json(&["agent", "coder"]);
    assert_eq!(agent["counters"]["breaker_open"]["packets"], 2, "{agent}");

    // The transition in the audit log, once, with the cooldown's end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let opened = loop {
        let tail = lab.run_cli(&["--json", "audit", "tail", "-n", "50"]);
        let found: Vec<Value> = tail
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["event"] == "breaker_opened")
            .collect();
        if !found.is_empty() {
            assert_eq!(found.len(), 1, "{}", tail.stdout);
            break found[0].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no breaker_opened record: {}",
            tail.stdout
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    check_schema("audit-record", &opened);
    assert_eq!(opened["agent_name"], "coder", "{opened}");
    assert_eq!(opened["reason"], "egress_denied", "{opened}");
    assert_eq!(opened["cooldown_level"], 0, "{opened}");
    assert!(opened["open_until"].is_string(), "{opened}");
    let table = lab.run_cli(&["audit", "tail", "-n", "50"]);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.contains("breaker_opened") && l.contains("open until")),
        "{}",
        table.stdout
    );

    let metrics = lab.scrape_metrics();
    for (series, value) in [
        (
            "enforcer_guard_transitions_total{event=\"breaker_opened\"}",
            1.0,
        ),
        ("enforcer_breakers{state=\"open\"}", 1.0),
        ("enforcer_breaker_trips_total", 1.0),
        (
            "enforcer_agents_packets_total{reason=\"breaker_open\",verdict=\"drop\"}",
            2.0,
        ),
    ] {
        assert_eq!(metrics.get(series), Some(&value), "{series}: {metrics:?}");
    }

    // Reset: allowed traffic passes again; quota use and trips stay.
    let (code, reset) = lab.run_cli_json(&["breaker", "reset", "coder"]);
    assert_eq!(code, 0, "{reset}");
    assert_eq!(reset["was"], "open");
    assert_eq!(reset["trips"], 1);
    enforcer::lab::udp_send(
        lab.agent(1),
        integration_tests::sa(integration_tests::SERVER_V4, 9000),
        None,
        b"x",
        2,
        std::time::Duration::ZERO,
    )
    .unwrap();
    let agent = lab.cli_json(&["agent", "coder"]);
    assert_eq!(agent["guards"]["breaker"]["state"], "closed", "{agent}");
    assert_eq!(agent["counters"]["allowed"]["packets"], 5, "{agent}");
    assert!(
        agent["guards"]["quotas"]["bytes_per_hour"]["used"]
            .as_u64()
            .unwrap()
            > used,
        "{agent}"
    );
    lab.stop_daemon(libc::SIGTERM);
}
