//! The systemd readiness protocol (`sd_notify(3)`), without linking libsystemd: one
//! datagram of `KEY=VALUE` lines to the `AF_UNIX` socket named by `$NOTIFY_SOCKET`.
//!
//! The daemon runs as `Type=notify` (`packaging/enforcer.service`): it sends `READY=1` once
//! the program is attached and a policy enforces, `RELOADING=1` then `READY=1` around a
//! SIGHUP reload, and `STOPPING=1` on the way out. Outside systemd the variable is unset and
//! every call is a no-op that returns `Ok(false)`.

use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
    path::Path,
};

use thiserror::Error;

/// The environment variable systemd sets for a service with `NotifyAccess=` other than
/// `none`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Errors sending a notification.
#[derive(Debug, Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is set but is neither an absolute path nor an abstract address.
    #[error(
        "{NOTIFY_SOCKET}={value:?}: expected an absolute socket path or an abstract address \
         (@name)"
    )]
    Address {
        /// The variable's value, as given.
        value: String,
    },
    /// The sending socket could not be created.
    #[error("creating a datagram socket to notify {socket}")]
    Socket {
        /// The notify socket's address, as given.
        socket: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The datagram could not be sent (no listener, or the listener's queue is full).
    #[error("sending {state:?} to the notify socket {socket}")]
    Send {
        /// The notify socket's address, as given.
        socket: String,
        /// The notification.
        state: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `CLOCK_MONOTONIC` could not be read for `MONOTONIC_USEC`.
    #[error("reading CLOCK_MONOTONIC for a reload notification")]
    Clock {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to `$NOTIFY_SOCKET`.
///
/// Returns `Ok(false)` without doing anything when the variable is unset or empty (not
/// running under systemd, or `NotifyAccess=none`), `Ok(true)` once the datagram is sent.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    notify_at(std::env::var_os(NOTIFY_SOCKET).as_deref(), state)
}

/// [`notify`] with the socket address given rather than read from the environment: an
/// absolute path, or `@name` for the abstract address `name`. `None` or empty is a no-op
/// returning `Ok(false)`.
pub fn notify_at(socket: Option<&OsStr>, state: &str) -> Result<bool, NotifyError> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(false);
    };
    let shown = || socket.to_string_lossy().into_owned();
    let send_err = |source| NotifyError::Send {
        socket: shown(),
        state: state.to_owned(),
        source,
    };
    let sender = UnixDatagram::unbound().map_err(|source| NotifyError::Socket {
        socket: shown(),
        source,
    })?;
    let sent = match socket.as_bytes() {
        // systemd's convention (as in sd_notify): a leading '@' stands for the NUL byte
        // that starts a Linux abstract socket address.
        [b'@', name @ ..] => {
            let addr = SocketAddr::from_abstract_name(name)
                .map_err(|_| NotifyError::Address { value: shown() })?;
            sender.send_to_addr(state.as_bytes(), &addr)
        }
        [b'/', ..] => sender.send_to(state.as_bytes(), Path::new(socket)),
        // Relative paths would depend on the working directory; systemd never sets one.
        _ => return Err(NotifyError::Address { value: shown() }),
    }
    .map_err(send_err)?;
    // A datagram is sent whole or not at all; a short count would be a kernel surprise.
    if sent != state.len() {
        return Err(send_err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        )));
    }
    Ok(true)
}

/// `READY=1` with a `STATUS=` line: start-up is complete (or a reload has finished).
///
/// systemd starts units ordered after this one, and `systemctl start` returns, only now.
pub fn ready(status: &str) -> Result<bool, NotifyError> {
    notify(&ready_message(status))
}

/// `RELOADING=1` with `MONOTONIC_USEC=`: a reload has begun; send [`ready`] when it is done.
///
/// systemd 253 and later require `MONOTONIC_USEC` (`CLOCK_MONOTONIC` in microseconds) for
/// `Type=notify-reload` to match the message to the reload it asked for; earlier versions
/// ignore it.
pub fn reloading() -> Result<bool, NotifyError> {
    notify(&reloading_message(monotonic_usec()?))
}

/// `STOPPING=1`: the daemon is shutting down (the pinned program keeps enforcing).
pub fn stopping() -> Result<bool, NotifyError> {
    notify("STOPPING=1")
}

/// `STATUS=`: a one-line status that `systemctl status` shows.
pub fn status(text: &str) -> Result<bool, NotifyError> {
    notify(&status_line(text))
}

fn ready_message(status: &str) -> String {
    format!("READY=1\n{}", status_line(status))
}

fn reloading_message(monotonic_usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
}

/// A `STATUS=` assignment. Newlines become spaces: each line of a notification is its own
/// assignment, so a status text must not be able to add `READY=1` or the like.
fn status_line(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> Result<u64, NotifyError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(NotifyError::Clock {
            source: io::Error::last_os_error(),
        });
    }
    Ok(ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::PathBuf,
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use super::*;

    /// A unique name per test in this process, so parallel tests never share a socket.
    fn unique(prefix: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(unique("enforcer-notify"));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Receives one datagram. The timeout only keeps a broken sender from hanging the test.
    fn receive(receiver: &UnixDatagram) -> String {
        receiver
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = receiver.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn unset_or_empty_socket_is_a_no_op() {
        assert!(!notify_at(None, "READY=1").unwrap());
        assert!(!notify_at(Some(OsStr::new("")), "READY=1").unwrap());
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = TempDir::new();
        let path = dir.0.join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        assert!(notify_at(Some(path.as_os_str()), &ready_message("enforcing")).unwrap());
        assert_eq!(receive(&receiver), "READY=1\nSTATUS=enforcing");
    }

    #[test]
    fn sends_to_an_abstract_address() {
        let name = unique("enforcer-notify-test");
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let socket = format!("@{name}");
        assert!(notify_at(Some(OsStr::new(&socket)), "STOPPING=1").unwrap());
        assert_eq!(receive(&receiver), "STOPPING=1");
    }

    #[test]
    fn relative_path_is_rejected() {
        let err = notify_at(Some(OsStr::new("run/notify")), "READY=1").unwrap_err();
        assert!(matches!(err, NotifyError::Address { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "NOTIFY_SOCKET=\"run/notify\": expected an absolute socket path or an abstract \
             address (@name)"
        );
    }

    #[test]
    fn missing_listener_names_the_socket() {
        let dir = TempDir::new();
        let path = dir.0.join("nobody.sock");
        let err = notify_at(Some(path.as_os_str()), "READY=1").unwrap_err();
        assert!(matches!(err, NotifyError::Send { .. }), "{err:?}");
        assert!(err.to_string().contains("nobody.sock"), "{err}");
    }

    #[test]
    fn status_cannot_inject_assignments() {
        assert_eq!(
            ready_message("ok\nREADY=1\r\nX=y"),
            "READY=1\nSTATUS=ok READY=1  X=y"
        );
        assert_eq!(status_line("3 agents"), "STATUS=3 agents");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let before = monotonic_usec().unwrap();
        let message = reloading_message(monotonic_usec().unwrap());
        let after = monotonic_usec().unwrap();
        let (first, second) = message.split_once('\n').unwrap();
        assert_eq!(first, "RELOADING=1");
        let usec: u64 = second
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
    }
}
