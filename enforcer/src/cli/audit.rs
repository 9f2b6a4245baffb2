//! `enforcer audit tail` and `audit verify`.

use std::{
    io::Write as _,
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
    for line in &shown[shown.len().saturating_sub(lines)..] {
        outln!("{line}");
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
    let stdout = std::io::stdout();
    loop {
        for line in follower.poll()? {
            if filter.matches(&line) {
                let mut out = stdout.lock();
                // A closed pipe (`| head`) ends the command.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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
