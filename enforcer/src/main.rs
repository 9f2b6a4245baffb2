//! `enforcer`: the daemon (`run`) and the local CLI, which talks to a running daemon over
//! its Unix socket (and, for `stats` and `policy apply` with no daemon, to the pinned maps).
//! The commands live in [`enforcer::cli`]; this file only sets up logging.

use std::{io::IsTerminal as _, process::ExitCode};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: journald, files and pipes get
        // plain text (the codes showed up as `\x1b[2m` in `journalctl`).
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    enforcer::cli::main()
}
