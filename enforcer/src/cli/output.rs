//! What every command prints through: stdout that ends quietly at a closed pipe, the one
//! JSON document `--json` promises (errors included), and numbers scaled with their
//! units as people read them.
//!
//! Rust's `println!` panics when stdout is a closed pipe (`enforcer policy presets |
//! head -1` exited 101 with "failed printing to stdout"); the CLI prints with [`outln!`]
//! and [`out!`] instead, which end the process with success there, as `head`'s other
//! writers do. The daemon keeps SIGPIPE ignored, so a client that goes away is an error
//! on its socket, not the end of the daemon.

use std::io::{ErrorKind, Write as _};

use serde_json::{Value, json};

use crate::policy::Issue;

/// Writes `text` to stdout and flushes it. A closed pipe ends the process with exit
/// code 0; another write error ends it with 1 and a line on stderr.
pub fn write_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

/// `println!` for the CLI: see [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::output::write_stdout("\n")
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the CLI: see [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(&format!($($arg)*))
    };
}

/// Prints `value` as indented JSON.
pub fn print_json(value: &Value) {
    write_stdout(&format!(
        "{}\n",
        serde_json::to_string_pretty(value).expect("json values serialize")
    ));
}

/// The JSON document of a failed command under `--json`: `{"error": {"message",
/// "exit_code", "issues"}}`, where each issue of a policy names its file, line, column and
/// field.
pub fn error_json(message: &str, exit_code: u8, issues: &[Issue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            json!({
                "file": i.location.origin,
                "line": i.location.line,
                "column": i.location.column,
                "field": i.field,
                "message": i.message,
            })
        })
        .collect();
    json!({ "error": { "message": message, "exit_code": exit_code, "issues": issues } })
}

/// A count scaled to three significant digits with an SI suffix: `999`, `1.23K`, `45.6M`,
/// `7.89G`. Counts below 1,000 print whole.
pub fn count(n: f64) -> String {
    scaled(n, "")
}

/// Bytes with an SI unit: `512 B`, `1.50 kB`, `12.0 MB`.
pub fn bytes(n: f64) -> String {
    let s = scaled(n, "");
    match s.chars().last() {
        Some('K') => format!("{} kB", &s[..s.len() - 1]),
        Some(c @ ('M' | 'G' | 'T')) => format!("{} {c}B", &s[..s.len() - 1]),
        _ => format!("{s} B"),
    }
}

/// Bits per second with an SI unit: `800 bit/s`, `1.20 Mbit/s`.
pub fn bits_per_sec(n: f64) -> String {
    let s = scaled(n, "");
    match s.chars().last() {
        Some('K') => format!("{} kbit/s", &s[..s.len() - 1]),
        Some(c @ ('M' | 'G' | 'T')) => format!("{} {c}bit/s", &s[..s.len() - 1]),
        _ => format!("{s} bit/s"),
    }
}

fn scaled(n: f64, unit: &str) -> String {
    const STEPS: [&str; 4] = ["K", "M", "G", "T"];
    if !n.is_finite() || n.abs() < 999.5 {
        return format!("{n:.0}{unit}");
    }
    let mut v = n;
    let mut step = "";
    for s in STEPS {
        if v.abs() < 999.5 {
            break;
        }
        v /= 1000.0;
        step = s;
    }
    let digits = if v.abs() < 9.995 {
        2
    } else if v.abs() < 99.95 {
        1
    } else {
        0
    };
    format!("{v:.digits$}{step}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_keep_three_significant_digits() {
        assert_eq!(count(0.0), "0");
        assert_eq!(count(999.0), "999");
        assert_eq!(count(1_000.0), "1.00K");
        assert_eq!(count(1_234.0), "1.23K");
        assert_eq!(count(45_600.0), "45.6K");
        assert_eq!(count(999_400.0), "999K");
        assert_eq!(count(999_600.0), "1.00M");
        assert_eq!(count(7_890_000_000.0), "7.89G");
    }

    #[test]
    fn bytes_and_bits_carry_their_units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1_500.0), "1.50 kB");
        assert_eq!(bytes(12_000_000.0), "12.0 MB");
        assert_eq!(bits_per_sec(800.0), "800 bit/s");
        assert_eq!(bits_per_sec(1_200_000.0), "1.20 Mbit/s");
    }
}
