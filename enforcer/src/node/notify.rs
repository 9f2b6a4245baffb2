//! The systemd readiness protocol (`sd_notify(3)`), sent with the `sd-notify` crate (pure
//! Rust, no libsystemd): one datagram of `KEY=VALUE` lines to the socket `$NOTIFY_SOCKET`
//! names.
//!
//! The daemon runs as `Type=notify` (`packaging/enforcer.service`): it sends `READY=1` once
//! the program is attached and a policy enforces, `RELOADING=1` then `READY=1` around a
//! SIGHUP reload, and `STOPPING=1` on the way out. Outside systemd the variable is unset and
//! every call does nothing. The end-to-end check is `tests/tests/service.rs`, which runs the
//! daemon against a notify socket of its own; `cargo xtask vmtest --systemd` runs it under
//! systemd.

use std::io;

use sd_notify::NotifyState;
use thiserror::Error;

/// A notification systemd may not have received: it would then time the start out, or
/// think a reload never ended.
#[derive(Debug, Error)]
#[error("sending {what} to $NOTIFY_SOCKET ({socket})")]
pub struct NotifyError {
    /// What was being sent (`READY=1`, ...).
    pub what: &'static str,
    /// The variable's value when sending.
    pub socket: String,
    /// The underlying error (no listener, a relative path, a full queue).
    #[source]
    pub source: io::Error,
}

fn send(what: &'static str, states: &[NotifyState<'_>]) -> Result<(), NotifyError> {
    // unset_env false: later notifications (reloads, stopping) need the variable too.
    sd_notify::notify(false, states).map_err(|source| NotifyError {
        what,
        socket: std::env::var("NOTIFY_SOCKET").unwrap_or_default(),
        source,
    })
}

/// `READY=1` with a `STATUS=` line: start-up is complete (or a reload has finished).
///
/// systemd starts units ordered after this one, and `systemctl start` returns, only now.
pub fn ready(status: &str) -> Result<(), NotifyError> {
    let status = one_line(status);
    send(
        "READY=1",
        &[NotifyState::Ready, NotifyState::Status(&status)],
    )
}

/// `RELOADING=1` with `MONOTONIC_USEC=`: a reload has begun; send [`ready`] when it is done.
///
/// systemd 253 and later require `MONOTONIC_USEC` (`CLOCK_MONOTONIC` in microseconds) for
/// `Type=notify-reload` to match the message to the reload it asked for; earlier versions
/// ignore it.
pub fn reloading() -> Result<(), NotifyError> {
    let now = NotifyState::monotonic_usec_now().map_err(|source| NotifyError {
        what: "RELOADING=1",
        socket: String::new(),
        source,
    })?;
    send("RELOADING=1", &[NotifyState::Reloading, now])
}

/// `STOPPING=1`: the daemon is shutting down (the pinned program keeps enforcing).
pub fn stopping() -> Result<(), NotifyError> {
    send("STOPPING=1", &[NotifyState::Stopping])
}

/// A status text as one line. Each line of a notification is an assignment of its own, and
/// the crate sends `STATUS=` text as given: a newline in it could add `READY=1` or the like.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_cannot_inject_assignments() {
        assert_eq!(one_line("ok\nREADY=1\r\nX=y"), "ok READY=1  X=y");
        assert_eq!(one_line("3 agents"), "3 agents");
    }
}
