//! `enforcer`: the daemon (`run`) and the local CLI, which talks to a running daemon over
//! its Unix socket (and, for `stats` and `policy apply` with no daemon, to the pinned maps).
//! The commands live in [`enforcer::cli`]; this file only sets up logging.

use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    enforcer::cli::main()
}
