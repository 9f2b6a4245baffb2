//! `enforcer top`: live per-agent rates.
//!
//! On a terminal the screen is redrawn in place and the table fits the terminal's width
//! (`COLUMNS`, else the terminal's size): NAME is shortened before a line would wrap.
//! Elsewhere (a pipe, a file) each sample is a block of its own under a timestamp line,
//! without screen codes and without a width limit unless `COLUMNS` sets one. `--json`
//! prints one object per sample and line.

use std::{
    io::IsTerminal as _,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{args::TopSort, output};
use crate::{dataplane::stats, node::api::Request, out, outln};

/// One agent's rates over one interval.
#[derive(Clone, Debug, PartialEq)]
struct Rates {
    id: u32,
    name: String,
    passed_pps: f64,
    dropped_pps: f64,
    passed_bits: f64,
    dropped_bits: f64,
    /// The circuit breaker's state, for agents with one.
    breaker: Option<String>,
}

/// Packets and bytes an agent passed and dropped in all.
#[derive(Clone, Copy, Default)]
struct Totals {
    passed_packets: u64,
    dropped_packets: u64,
    passed_bytes: u64,
    dropped_bytes: u64,
}

impl Totals {
    fn of(a: &stats::AgentStats) -> Totals {
        let mut t = Totals::default();
        for (reason, c) in &a.reasons {
            let drop = super::show::verdict(reason) == "drop";
            if drop {
                t.dropped_packets += c.packets;
                t.dropped_bytes += c.bytes;
            } else {
                t.passed_packets += c.packets;
                t.passed_bytes += c.bytes;
            }
        }
        t
    }
}

/// Samples the counters every `interval` and prints the rates between samples.
pub(super) fn top(
    cli: &super::Cli,
    interval: Duration,
    count: Option<u64>,
    sort: TopSort,
) -> anyhow::Result<ExitCode> {
    let sample = || -> anyhow::Result<(Instant, Vec<stats::AgentStats>)> {
        let v = cli.call(Request::Stats)?;
        Ok((Instant::now(), serde_json::from_value(v["agents"].clone())?))
    };
    let terminal = std::io::stdout().is_terminal();
    let (mut t0, mut before) = sample()?;
    let mut n = 0;
    loop {
        thread::sleep(interval);
        let (t1, after) = sample()?;
        let now =
            crate::node::audit::rfc3339(time::OffsetDateTime::now_utc().unix_timestamp_nanos());
        let secs = (t1 - t0).as_secs_f64();
        let mut rows: Vec<Rates> = after
            .iter()
            .map(|a| {
                let t1 = Totals::of(a);
                let t0 = before
                    .iter()
                    .find(|b| b.id == a.id)
                    .map(Totals::of)
                    .unwrap_or_default();
                // A counter that went backwards was reset (a new pin): count from zero.
                let rate = |x1: u64, x0: u64| x1.checked_sub(x0).unwrap_or(x1) as f64 / secs;
                Rates {
                    id: a.id,
                    name: a.name.clone(),
                    passed_pps: rate(t1.passed_packets, t0.passed_packets),
                    dropped_pps: rate(t1.dropped_packets, t0.dropped_packets),
                    passed_bits: rate(t1.passed_bytes, t0.passed_bytes) * 8.0,
                    dropped_bits: rate(t1.dropped_bytes, t0.dropped_bytes) * 8.0,
                    breaker: a.breaker.clone(),
                }
            })
            .collect();
        sort_rows(&mut rows, sort);
        if cli.json {
            outln!("{}", sample_json(&now, secs, &rows));
        } else {
            let time = now.get(..19).map_or(now.clone(), |s| format!("{s}Z"));
            let width = width(terminal);
            let mut title = format!("enforcer top  {time}  every {:.1}s", interval.as_secs_f64());
            // The hint only where it fits whole.
            const HINT: &str = ", Ctrl-C to quit";
            if terminal && width.is_none_or(|w| title.len() + HINT.len() <= w) {
                title.push_str(HINT);
            }
            let mut text = String::new();
            for line in std::iter::once(title).chain(render(&rows, width)) {
                text += &fit(&line, width);
                text += "\n";
            }
            if terminal {
                // Home and clear, then the screen.
                out!("\x1b[H\x1b[2J{text}");
            } else {
                // A block per sample, apart from the previous one.
                out!("{}{text}", if n > 0 { "\n" } else { "" });
            }
        }
        (t0, before) = (t1, after);
        n += 1;
        if count.is_some_and(|c| n >= c) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// Orders the rows: by id (stable across samples), by name, or busiest first by passed or
/// dropped packets (ties by id).
fn sort_rows(rows: &mut [Rates], sort: TopSort) {
    match sort {
        TopSort::Id => rows.sort_by_key(|r| r.id),
        TopSort::Name => rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id))),
        TopSort::Passed => {
            rows.sort_by(|a, b| b.passed_pps.total_cmp(&a.passed_pps).then(a.id.cmp(&b.id)))
        }
        TopSort::Dropped => rows.sort_by(|a, b| {
            b.dropped_pps
                .total_cmp(&a.dropped_pps)
                .then(a.id.cmp(&b.id))
        }),
    }
}

/// One sample as a JSON line: its time, the seconds it covers, and per agent the rates
/// under names that carry their units, packets to two decimals and bits whole, and the
/// breaker's state for agents with one.
fn sample_json(time: &str, secs: f64, rows: &[Rates]) -> String {
    let cents = |x: f64| (x * 100.0).round() / 100.0;
    let agents: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut v = json!({
                "id": r.id,
                "name": r.name,
                "passed_packets_per_sec": cents(r.passed_pps),
                "dropped_packets_per_sec": cents(r.dropped_pps),
                "passed_bits_per_sec": r.passed_bits.round() as u64,
                "dropped_bits_per_sec": r.dropped_bits.round() as u64,
            });
            // Only agents with a breaker have the key.
            if let Some(b) = &r.breaker {
                v["breaker"] = json!(b);
            }
            v
        })
        .collect();
    json!({"time": time, "interval_secs": cents(secs), "agents": agents}).to_string()
}

/// The width to fit: `COLUMNS` if set, else the terminal's; no limit off a terminal.
fn width(terminal: bool) -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .filter(|&c| c > 0)
    {
        return Some(c);
    }
    if !terminal {
        return None;
    }
    // The standard library has no terminal size; comfy-table's needs crossterm.
    // SAFETY: winsize is plain integers, all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which lives across the call.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then_some(usize::from(ws.ws_col))
}

/// The narrowest NAME is shortened to before lines are cut.
const MIN_NAME: usize = 4;

/// The table's lines, NAME shortened (with `…`) so that every line fits `width`. Numbers
/// are right-aligned under their headers. A BRK column (the circuit breaker: `ok`, `OPEN`,
/// `half`, `-` without one) follows NAME when any agent has a breaker, so tables of
/// policies without guards keep their columns.
fn render(rows: &[Rates], width: Option<usize>) -> Vec<String> {
    let breakers = rows.iter().any(|r| r.breaker.is_some());
    let mut header = vec!["ID", "NAME"];
    if breakers {
        header.push("BRK");
    }
    header.extend(["PASS pkt/s", "DROP pkt/s", "PASS bit/s", "DROP bit/s"]);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![r.id.to_string(), r.name.clone()];
            if breakers {
                row.push(breaker_cell(r.breaker.as_deref()).to_string());
            }
            row.extend([
                output::count(r.passed_pps),
                output::count(r.dropped_pps),
                output::bits_per_sec(r.passed_bits),
                output::bits_per_sec(r.dropped_bits),
            ]);
            row
        })
        .collect();
    let chars = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = header.iter().map(|h| chars(h)).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(chars(cell));
        }
    }
    // Two spaces after ID and NAME, one between the right-aligned numbers and after BRK
    // (whose cells are left-aligned and shorter than its width, "half" aside).
    let mut gaps = vec![0, 2];
    if breakers {
        gaps.extend([2, 1]);
    } else {
        gaps.push(2);
    }
    gaps.extend([1, 1, 1]);
    if let Some(limit) = width {
        let total: usize = widths.iter().sum::<usize>() + gaps.iter().sum::<usize>();
        if total > limit {
            widths[1] = widths[1]
                .saturating_sub(total - limit)
                .max(MIN_NAME.min(widths[1]));
        }
    }
    let line = |row: &[&str]| {
        let mut s = String::new();
        for (i, cell) in row.iter().enumerate() {
            s.push_str(&" ".repeat(gaps[i]));
            let w = widths[i];
            if i == 1 {
                let shown = shorten(cell, w);
                s.push_str(&format!("{shown:<w$}"));
            } else if i == 2 && breakers {
                s.push_str(&format!("{cell:<w$}"));
            } else {
                s.push_str(&format!("{cell:>w$}"));
            }
        }
        s
    };
    std::iter::once(line(&header))
        .chain(cells.iter().map(|c| {
            let row: Vec<&str> = c.iter().map(String::as_str).collect();
            line(&row)
        }))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// A breaker state in four characters at most, the open one loud.
fn breaker_cell(state: Option<&str>) -> &'static str {
    match state {
        None => "-",
        Some("open") => "OPEN",
        Some("half_open") => "half",
        Some(_) => "ok",
    }
}

/// `s` in at most `w` characters: cut, with `…` as the last, when longer.
fn shorten(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// A line cut to `width` characters (the last resort when even a short NAME is too wide).
fn fit(line: &str, width: Option<usize>) -> String {
    match width {
        Some(w) if line.chars().count() > w => line.chars().take(w).collect(),
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(id: u32, name: &str, passed_pps: f64, dropped_pps: f64) -> Rates {
        Rates {
            id,
            name: name.into(),
            passed_pps,
            dropped_pps,
            passed_bits: passed_pps * 8000.0,
            dropped_bits: dropped_pps * 800.0,
            breaker: None,
        }
    }

    #[test]
    fn rows_fit_sixty_columns_by_shortening_the_name() {
        let rows = [
            rates(1, "a-rather-long-agent-name", 1_234_567.0, 12.0),
            rates(12, "b", 0.0, 99_999.0),
        ];
        let wide = render(&rows, None);
        assert!(wide[1].contains("a-rather-long-agent-name"), "{wide:?}");
        assert!(wide.iter().any(|l| l.chars().count() > 60), "{wide:?}");
        let narrow = render(&rows, Some(60));
        for l in &narrow {
            assert!(l.chars().count() <= 60, "{l:?} in {narrow:?}");
        }
        assert_eq!(
            narrow[1].split_whitespace().collect::<Vec<_>>(),
            [
                "1",
                "a-rather…",
                "1.23M",
                "12",
                "9.88",
                "Gbit/s",
                "9.60",
                "kbit/s"
            ],
            "{narrow:?}"
        );
        // The numbers end under their headers.
        let end = narrow[0].find("DROP pkt/s").unwrap() + "DROP pkt/s".len();
        assert_eq!(&narrow[2][end - 4..end], "100K", "{narrow:?}");
        assert_eq!(fit("abcdef", Some(4)), "abcd");
    }

    #[test]
    fn breakers_get_a_column_only_when_an_agent_has_one() {
        let mut rows = [
            rates(1, "a-rather-long-agent-name", 1_234_567.0, 12.0),
            rates(12, "b", 0.0, 99_999.0),
            rates(13, "c", 0.0, 0.0),
        ];
        rows[1].breaker = Some("open".into());
        rows[2].breaker = Some("closed".into());
        let narrow = render(&rows, Some(60));
        for l in &narrow {
            assert!(l.chars().count() <= 60, "{l:?} in {narrow:?}");
        }
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(words(&narrow[0])[..3], ["ID", "NAME", "BRK"], "{narrow:?}");
        assert_eq!(words(&narrow[1])[2], "-", "{narrow:?}");
        assert_eq!(words(&narrow[2])[..3], ["12", "b", "OPEN"], "{narrow:?}");
        assert_eq!(words(&narrow[3])[2], "ok", "{narrow:?}");
        // The numbers still end under their headers.
        let end = narrow[0].find("DROP pkt/s").unwrap() + "DROP pkt/s".len();
        assert_eq!(&narrow[2][end - 4..end], "100K", "{narrow:?}");
        let line = sample_json("t", 1.0, &rows[1..2]);
        assert!(line.contains("\"breaker\":\"open\""), "{line}");
    }

    #[test]
    fn sorting_is_stable_or_by_the_chosen_column() {
        let mut rows = vec![
            rates(3, "c", 5.0, 0.0),
            rates(1, "z", 1.0, 9.0),
            rates(2, "a", 5.0, 1.0),
        ];
        let ids = |rows: &[Rates]| rows.iter().map(|r| r.id).collect::<Vec<_>>();
        sort_rows(&mut rows, TopSort::Id);
        assert_eq!(ids(&rows), [1, 2, 3]);
        sort_rows(&mut rows, TopSort::Passed);
        assert_eq!(ids(&rows), [2, 3, 1]);
        sort_rows(&mut rows, TopSort::Dropped);
        assert_eq!(ids(&rows), [1, 2, 3]);
        sort_rows(&mut rows, TopSort::Name);
        assert_eq!(ids(&rows), [2, 3, 1]);
    }

    #[test]
    fn json_samples_round_and_name_their_units() {
        let line = sample_json(
            "2026-12-07T04:00:00.000000000Z",
            1.00213,
            &[rates(1, "coder", 29.936_3, 0.333_33)],
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"time": "2026-12-07T04:00:00.000000000Z", "interval_secs": 1.0,
                "agents": [{"id": 1, "name": "coder",
                    "passed_packets_per_sec": 29.94, "dropped_packets_per_sec": 0.33,
                    "passed_bits_per_sec": 239_490, "dropped_bits_per_sec": 267}]})
        );
    }
}
