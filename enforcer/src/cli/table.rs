//! The CLI's tables, with comfy-table: plain columns with no borders, each as wide as its
//! widest cell, numbers right-aligned. (Fixed `format!` widths broke the alignment at the
//! first agent name longer than the width.)

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};

use crate::dataplane::stats::AgentStats;

/// A table with `header`; the columns numbered in `numeric` are right-aligned.
pub fn new(header: &[&str], numeric: &[usize]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for &i in numeric {
        if let Some(column) = table.column_mut(i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table
}

/// The table's text, every line ending in a newline and without trailing blanks (the
/// preset draws its borders as spaces).
pub fn render(table: &Table) -> String {
    table
        .lines()
        .map(|line| format!("{}\n", line.trim_end()))
        .collect()
}

/// Per-agent counters: a line per agent with its totals and first reason, then a line per
/// further reason it has counted.
/// Counts are scaled (`1.23K`, `12.0 MB`); VERDICT says whether a reason's packets were
/// dropped or passed (monitor mode's would-drops passed).
pub fn stats(stats: &[AgentStats]) -> String {
    use crate::cli::output::{bytes, count};
    let mut table = new(
        &[
            "AGENT", "NAME", "PASSED", "DROPPED", "REASON", "VERDICT", "PACKETS", "BYTES",
        ],
        &[0, 2, 3, 6, 7],
    );
    for a in stats {
        let mut reasons = a.reasons.iter();
        let first = reasons.next();
        let reason_cells = |r: Option<(&String, &crate::dataplane::stats::ReasonCount)>| {
            r.map_or_else(
                || vec![String::new(); 4],
                |(reason, c)| {
                    vec![
                        reason.clone(),
                        crate::cli::show::verdict(reason).to_string(),
                        count(c.packets as f64),
                        bytes(c.bytes as f64),
                    ]
                },
            )
        };
        let mut row = vec![
            a.id.to_string(),
            a.name.clone(),
            count(a.passed_packets as f64),
            count(a.dropped_packets as f64),
        ];
        row.extend(reason_cells(first));
        table.add_row(row);
        for reason in reasons {
            let mut row = vec![String::new(); 4];
            row.extend(reason_cells(Some(reason)));
            table.add_row(row);
        }
    }
    render(&table)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dataplane::stats::ReasonCount;

    #[test]
    fn columns_fit_their_widest_cell() {
        let agents = [
            AgentStats {
                id: 7,
                name: "a-name-longer-than-twenty-characters".into(),
                passed_packets: 5,
                dropped_packets: 3,
                breaker: None,
                reasons: BTreeMap::from([
                    (
                        "allowed".to_string(),
                        ReasonCount {
                            packets: 5,
                            bytes: 500,
                        },
                    ),
                    (
                        "rate_limited_bytes".to_string(),
                        ReasonCount {
                            packets: 3,
                            bytes: 4500,
                        },
                    ),
                ]),
            },
            AgentStats {
                id: 12,
                name: "b".into(),
                passed_packets: 123_456,
                dropped_packets: 0,
                breaker: None,
                reasons: BTreeMap::new(),
            },
        ];
        let text = stats(&agents);
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        // Every row's PASSED column ends where the header's does, however long the name.
        let end = lines[0].find("PASSED").unwrap() + "PASSED".len();
        assert_eq!(&lines[1][end - 1..end], "5", "{text}");
        assert_eq!(&lines[3][end - 4..end], "123K", "scaled: {text}");
        assert!(
            lines[2].trim_start().starts_with("rate_limited_bytes"),
            "{text}"
        );
        let verdict = lines[0].find("VERDICT").unwrap();
        assert_eq!(&lines[1][verdict..verdict + 4], "pass", "{text}");
        assert_eq!(&lines[2][verdict..verdict + 4], "drop", "{text}");
        assert!(lines[2].ends_with("4.50 kB"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
    }
}
