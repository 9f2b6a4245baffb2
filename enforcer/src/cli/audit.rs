//! `enforcer audit tail` and `audit verify`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use serde_json::Value;

use super::{Cli, print_json};
use crate::{
    error::error_chain,
    node::{api::Request, config::Config},
    outln,
};

/// `enforcer audit tail`.
pub(super) fn tail(
    cli: &Cli,
    lines: usize,
    follow: bool,
    agent: &Option<String>,
    reason: &Option<String>,
    verdict: &Option<String>,
) -> anyhow::Result<ExitCode> {
    let filter = crate::node::audit::TailFilter {
        agent: agent.clone(),
        reason: reason.clone(),
        verdict: verdict.clone(),
    };
    // With a filter the last N matching records are among more lines: look further
    // back (bounded). At least one line, whose seq is where following starts.
    let ask = if filter.is_empty() {
        lines
    } else {
        lines.saturating_mul(50).min(20_000)
    };
    let v = cli.call(Request::AuditTail { lines: ask.max(1) })?;
    let got: Vec<&str> = v["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let shown: Vec<&str> = got.iter().copied().filter(|l| filter.matches(l)).collect();
    let shown = &shown[shown.len().saturating_sub(lines)..];
    // A table by default, the way `hubble observe` reads; with --json the records as the
    // log stores them, one per line.
    let print = |line: &str| {
        if cli.json {
            outln!("{line}");
        } else {
            outln!("{}", tail_row(line));
        }
    };
    if !cli.json && (follow || !shown.is_empty()) {
        outln!("{}", tail_header());
    }
    for line in shown {
        print(line);
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    let after = got
        .last()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|r| r["seq"].as_u64())
        .unwrap_or(0);
    let path = PathBuf::from(v["file"].as_str().unwrap_or_default());
    let mut follower = crate::node::audit::Follower::new(&path, after).with_context(
        || "following the audit log (reading it needs the daemon's file permissions)",
    )?;
    loop {
        for line in follower.poll()? {
            if filter.matches(&line) {
                // outln! flushes each line, and a closed pipe (`| head`) ends the command.
                print(&line);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Column widths of the `audit tail` table. Fixed, so the rows `-f` adds later line up
/// with the first ones; a longer cell pushes the rest of its row to the right.
const TIME_W: usize = 23;
const AGENT_W: usize = 12;
const VERDICT_W: usize = 7;
const REASON_W: usize = 20;
const PROTO_W: usize = 5;

/// The header line of the `audit tail` table.
pub(super) fn tail_header() -> String {
    tail_cells("TIME", "AGENT", "VERDICT", "REASON", "PROTO", "FLOW", "")
}

fn tail_cells(
    time: &str,
    agent: &str,
    verdict: &str,
    reason: &str,
    proto: &str,
    flow: &str,
    detail: &str,
) -> String {
    let mut line = format!(
        "{time:<TIME_W$}  {agent:<AGENT_W$}  {verdict:<VERDICT_W$}  {reason:<REASON_W$}  {proto:<PROTO_W$}  {flow}"
    );
    if !detail.is_empty() {
        line.push_str("  ");
        line.push_str(detail);
    }
    line.trim_end().to_string()
}

/// One audit record as a row: time, agent, verdict, reason, protocol, `src -> dst`, and
/// what else the kind of record has (a summary's count, a notice's or a change's words).
/// A line that is not a record is shown as it is, never hidden.
pub(super) fn tail_row(line: &str) -> String {
    let Ok(r) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    if !r.is_object() {
        return line.to_string();
    }
    let text = |v: &Value| v.as_str().map(str::to_string);
    // `2026-12-07T04:50:00.123456789Z` as `2026-12-07 04:50:00.123`.
    let time =
        r["time"]
            .as_str()
            .map_or_else(String::new, |t| match (t.get(..10), t.get(11..23)) {
                (Some(day), Some(clock)) => format!("{day} {clock}"),
                _ => t.to_string(),
            });
    let agent = match (&r["agent_name"], &r["agent"]) {
        (Value::String(name), _) => name.clone(),
        (_, Value::Number(n)) if n.as_u64() == Some(0) => "(unknown)".to_string(),
        (_, Value::Number(n)) => format!("agent {n}"),
        _ => "-".to_string(),
    };
    let flow = |src: &Value, dst: &Value| match (text(src), text(dst)) {
        (Some(s), Some(d)) => format!("{s} -> {d}"),
        (None, Some(d)) => format!("-> {d}"),
        (Some(s), None) => format!("{s} ->"),
        (None, None) => String::new(),
    };
    let verdict = text(&r["verdict"]).unwrap_or_else(|| "-".to_string());
    let reason = text(&r["reason"]).unwrap_or_default();
    let dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_string());
    if reason == "summary" {
        // Events over the global budget, folded into one record.
        let event_reason = dash(text(&r["event_reason"]));
        return tail_cells(
            &time,
            &agent,
            &verdict,
            &event_reason,
            &dash(text(&r["last"]["proto"])),
            &flow(&r["last"]["src"], &r["last"]["dst"]),
            &format!(
                "(summary: {} events in {}s, first at {})",
                r["events"],
                r["window_secs"],
                r["first"]["time"].as_str().unwrap_or("?")
            ),
        );
    }
    if let Some(event) = text(&r["event"]) {
        // A guard's transition: the event in the reason's place, what caused it and what
        // it carries after.
        let mut details = vec![format!("(reason {})", dash(text(&r["reason"])))];
        if let Some(level) = r["cooldown_level"].as_u64() {
            details.push(format!("cooldown level {level}"));
        }
        if let Some(until) = text(&r["open_until"]) {
            details.push(format!("open until {until}"));
        }
        if let Some(quota) = text(&r["quota"]) {
            details.push(format!("quota {quota}"));
        }
        return tail_cells(&time, &agent, "-", &event, "-", "", &details.join(", "));
    }
    let mut details = Vec::new();
    if r.get("ktime_ns").is_none() {
        // Decided in user space (the resolver, the proxy, the API) or about the log itself.
        if let Some(source) = text(&r["source"]) {
            details.push(format!("[{source}]"));
        }
    }
    if let Some(name) = text(&r["name"]) {
        details.push(format!("name {name}"));
    }
    if let Some(lost) = r["events_lost"].as_u64().filter(|&n| n > 0) {
        details.push(format!("{lost} events lost"));
    }
    if let Some(detail) = text(&r["detail"]) {
        details.push(detail);
    }
    if let Some(uid) = r["actor"]["uid"].as_u64() {
        details.push(format!("by uid {uid}"));
    }
    // A notice of the audit writer concerns no agent, nor does agent 0 of a record made in
    // user space (a policy apply); agent 0 of the kernel's is traffic of no known agent.
    let agent = if r.get("agent").is_none() || (r.get("ktime_ns").is_none() && r["agent"] == 0) {
        "-".to_string()
    } else {
        agent
    };
    tail_cells(
        &time,
        &agent,
        &verdict,
        &reason,
        &dash(text(&r["proto"])),
        &flow(&r["src"], &r["dst"]),
        &details.join(" "),
    )
}

/// `enforcer audit verify`.
pub(super) fn verify(
    cli: &Cli,
    files: &[PathBuf],
    continued: bool,
    head: Option<&Path>,
    no_head: bool,
) -> anyhow::Result<ExitCode> {
    match verify_head(cli, files, head, no_head).and_then(|anchor| {
        Ok((
            crate::node::audit::verify_anchored(files, continued, anchor.as_ref().map(|a| &a.1))?,
            anchor,
        ))
    }) {
        Ok((report, anchor)) => {
            let names = files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(" ");
            if cli.json {
                print_json(&serde_json::json!({
                    "ok": true,
                    "lines": report.lines,
                    "first_seq": report.first_seq,
                    "last_seq": report.last_seq,
                    "starts_after": report.starts_after,
                    "head": report.head,
                    "head_file": anchor.as_ref().map(|a| &a.0),
                    "head_checked_seq": report.anchor_checked,
                }));
            } else {
                outln!(
                    "{names}: ok: {} records, chain head {}",
                    report.lines,
                    report.head
                );
                if report.first_seq > 1 {
                    outln!(
                        "the chain starts at seq {}, after a line hashing to {} (in an older rotated file, not given)",
                        report.first_seq,
                        report.starts_after
                    );
                }
                match (&anchor, report.anchor_checked) {
                    (Some((file, _)), Some(seq)) => outln!(
                        "the log reaches the head saved in {} (seq {seq}): nothing was cut from its end",
                        file.display()
                    ),
                    (Some((file, a)), None) => outln!(
                        "the head saved in {} (seq {}) lies before the files given: their end is not checked",
                        file.display(),
                        a.seq
                    ),
                    (None, _) => outln!(
                        "no saved chain head checked: records cut from the end would not show (see --head)"
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if cli.json {
                print_json(&serde_json::json!({"ok": false, "error": error_chain(&e)}));
            } else {
                eprintln!("{}", error_chain(&e));
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The chain head `audit verify` checks the files against: `--head`, or the daemon's when
/// the last file is the configured log and a head was saved; none with `--no-head`.
fn verify_head(
    cli: &Cli,
    files: &[PathBuf],
    head: Option<&Path>,
    no_head: bool,
) -> Result<Option<(PathBuf, crate::node::audit::Head)>, crate::node::audit::AuditError> {
    use crate::node::audit::{Head, head::FILE_NAME};
    if no_head {
        return Ok(None);
    }
    if let Some(path) = head {
        return match Head::load(path)? {
            Some(h) => Ok(Some((path.to_path_buf(), h))),
            None => Err(crate::node::audit::AuditError::Io {
                op: "reading the chain head of",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            }),
        };
    }
    let Ok(config) = Config::load(&cli.config) else {
        return Ok(None);
    };
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !files.last().is_some_and(|f| same(f, &config.audit_log)) {
        return Ok(None);
    }
    let path = config.state_dir.join(FILE_NAME);
    Ok(Head::load(&path)?.map(|h| (path, h)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<&str> {
        s.split_whitespace().collect()
    }

    #[test]
    fn guard_transitions_read_as_rows() {
        let opened = r#"{"seq":9,"time":"2026-12-07T04:50:01.000000000Z","ktime_ns":5,"event":"breaker_opened","agent":1,"agent_name":"coder","reason":"egress_denied","cooldown_level":1,"open_until":"2026-12-07T04:51:01.000000000Z","policy_generation":1,"policy_digest":"ab","prev":"cd"}"#;
        assert_eq!(
            words(&tail_row(opened)),
            [
                "2026-12-07",
                "04:50:01.000",
                "coder",
                "-",
                "breaker_opened",
                "-",
                "(reason",
                "egress_denied),",
                "cooldown",
                "level",
                "1,",
                "open",
                "until",
                "2026-12-07T04:51:01.000000000Z"
            ]
        );
        let quota = r#"{"seq":9,"time":"2026-12-07T04:50:01.000000000Z","ktime_ns":5,"event":"quota_exhausted","agent":1,"agent_name":null,"reason":"quota_exhausted","quota":"bytes_per_day","policy_generation":1,"policy_digest":null,"prev":"cd"}"#;
        assert!(
            tail_row(quota).ends_with("(reason quota_exhausted), quota bytes_per_day"),
            "{}",
            tail_row(quota)
        );
    }

    #[test]
    fn records_of_every_kind_read_as_rows() {
        let denial = r#"{"seq":7,"time":"2026-12-07T04:50:00.123456789Z","ktime_ns":5,"agent":1,"agent_name":"coder","reason":"egress_denied","verdict":"drop","proto":"udp","src":"10.200.1.2:4000","dst":"10.200.100.2:9001","ifindex":3,"len":44,"policy_generation":1,"policy_digest":"ab","prev":"cd"}"#;
        let row = tail_row(denial);
        assert_eq!(
            words(&row),
            [
                "2026-12-07",
                "04:50:00.123",
                "coder",
                "drop",
                "egress_denied",
                "udp",
                "10.200.1.2:4000",
                "->",
                "10.200.100.2:9001"
            ]
        );
        // Columns start where the header's do.
        let header = tail_header();
        for title in ["AGENT", "VERDICT", "REASON", "PROTO", "FLOW"] {
            let at = header.find(title).unwrap();
            assert_ne!(&row[at..=at], " ", "{title}: {header}\n{row}");
            assert_eq!(&row[at - 1..at], " ", "{title}: {header}\n{row}");
        }

        let change = r#"{"seq":1,"time":"2026-12-07T04:49:00.000000000Z","source":"api","agent":0,"agent_name":null,"reason":"policy_apply","verdict":"applied","src":null,"dst":null,"name":null,"detail":"/etc/enforcer/policy.toml","actor":{"uid":0,"gid":0,"pid":12},"policy_generation":1,"policy_digest":"ab","prev":"00"}"#;
        assert_eq!(
            words(&tail_row(change)),
            [
                "2026-12-07",
                "04:49:00.000",
                "-",
                "applied",
                "policy_apply",
                "-",
                "[api]",
                "/etc/enforcer/policy.toml",
                "by",
                "uid",
                "0"
            ]
        );

        let notice = r#"{"seq":2,"time":"2026-12-07T04:49:01.000000000Z","source":"audit","reason":"events_lost","events_lost":12,"detail":"the ring buffer was full","prev":"00"}"#;
        assert_eq!(
            words(&tail_row(notice)),
            [
                "2026-12-07",
                "04:49:01.000",
                "-",
                "-",
                "events_lost",
                "-",
                "[audit]",
                "12",
                "events",
                "lost",
                "the",
                "ring",
                "buffer",
                "was",
                "full"
            ]
        );

        let summary = r#"{"seq":3,"time":"2026-12-07T04:49:10.000000000Z","source":"audit","reason":"summary","agent":1,"agent_name":"coder","event_reason":"egress_denied","verdict":"drop","events":37,"first":{"time":"2026-12-07T04:49:00.5Z","proto":"udp","src":"a:1","dst":"b:2"},"last":{"time":"2026-12-07T04:49:09Z","proto":"udp","src":"a:1","dst":"b:3"},"window_secs":10,"policy_generation":1,"prev":"00"}"#;
        assert_eq!(
            words(&tail_row(summary)),
            [
                "2026-12-07",
                "04:49:10.000",
                "coder",
                "drop",
                "egress_denied",
                "udp",
                "a:1",
                "->",
                "b:3",
                "(summary:",
                "37",
                "events",
                "in",
                "10s,",
                "first",
                "at",
                "2026-12-07T04:49:00.5Z)"
            ]
        );

        assert_eq!(tail_row("not json {"), "not json {");
    }
}
