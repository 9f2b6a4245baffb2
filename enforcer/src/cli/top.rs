//! `enforcer top`: live per-agent rates.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{Cli, table};
use crate::{dataplane::stats, node::api::Request, out, outln};

/// Refreshes per-agent rates in place: counters are sampled each interval and the
/// difference divided by the time between samples.
pub(super) fn top(cli: &Cli, interval: Duration, count: Option<u64>) -> anyhow::Result<ExitCode> {
    let sample = || -> anyhow::Result<(Instant, Vec<stats::AgentStats>)> {
        let v = cli.call(Request::Stats)?;
        Ok((Instant::now(), serde_json::from_value(v["agents"].clone())?))
    };
    let totals = |a: &stats::AgentStats| -> (u64, u64, u64) {
        a.reasons.iter().fold((0, 0, 0), |(p, d, b), (reason, c)| {
            let drop = enforcer_common::Reason::ALL
                .iter()
                .any(|r| r.name() == *reason && r.is_drop());
            if drop {
                (p, d + c.packets, b)
            } else {
                (p + c.packets, d, b + c.bytes)
            }
        })
    };
    let (mut t0, mut before) = sample()?;
    let mut n = 0;
    loop {
        thread::sleep(interval);
        let (t1, after) = sample()?;
        let secs = (t1 - t0).as_secs_f64();
        let mut rows = Vec::new();
        for a in &after {
            let (p1, d1, b1) = totals(a);
            let (p0, d0, b0) = before
                .iter()
                .find(|b| b.id == a.id)
                .map_or((0, 0, 0), totals);
            rows.push((
                a.id,
                a.name.clone(),
                (p1 - p0) as f64 / secs,
                (d1 - d0) as f64 / secs,
                (b1 - b0) as f64 * 8.0 / secs,
            ));
        }
        rows.sort_by(|a, b| (b.2 + b.3).total_cmp(&(a.2 + a.3)));
        if cli.json {
            let v: Vec<Value> = rows.iter().map(|r| serde_json::json!({"id": r.0, "name": r.1, "passed_pps": r.2, "dropped_pps": r.3, "passed_bps": r.4})).collect();
            outln!("{}", serde_json::to_string(&v)?);
        } else {
            let mut screen = String::from("\x1b[H\x1b[2J");
            let _ = writeln!(
                screen,
                "enforcer top - every {:.1}s, Ctrl-C to quit",
                interval.as_secs_f64()
            );
            let mut lines = table::new(
                &[
                    "ID",
                    "NAME",
                    "PASSED pkt/s",
                    "DROPPED pkt/s",
                    "PASSED bit/s",
                ],
                &[0, 2, 3, 4],
            );
            for r in &rows {
                lines.add_row(vec![
                    r.0.to_string(),
                    r.1.clone(),
                    format!("{:.0}", r.2),
                    format!("{:.0}", r.3),
                    format!("{:.0}", r.4),
                ]);
            }
            screen.push_str(&table::render(&lines));
            out!("{screen}");
            let _ = std::io::stdout().flush();
        }
        (t0, before) = (t1, after);
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
