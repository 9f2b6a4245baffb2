//! The daemon's local control API: newline-delimited JSON over Unix sockets. One request
//! line, one response line: `{"ok": ...}` or `{"error": "..."}`.
//!
//! # Access
//! Two sockets, two levels, and the kernel's file permissions decide who reaches which (as
//! libvirt's `libvirt-sock` and `libvirt-sock-ro`):
//! - the admin socket (default `/run/enforcer/enforcer.sock`, mode 0660, root and the
//!   configured `socket_group`) takes every request;
//! - the read-only socket (default `/run/enforcer/enforcer-ro.sock`, mode 0666, or 0660
//!   with `read_socket_group`) takes only [`Request::read_only`] ones: status, agents,
//!   agent, stats (what `top` reads), the same data `/metrics` serves on localhost.
//!
//! A user who can reach neither cannot connect, and [`Client::connect`] says so. Every
//! request carries the caller's uid, gid and pid from `SO_PEERCRED` ([`Peer`]): changes
//! are audited with them.
//!
//! # Limits
//! Per socket, [`ApiLimits`]: at most `max_connections` at once (one more gets an error
//! line and is closed, so the admin socket stays reachable whatever happens on the other),
//! `idle_timeout` for each request line and each answer, and `max_request_bytes` per line
//! (read no further). A failing `accept` (EMFILE at the descriptor limit) backs off instead
//! of spinning.
//!
//! # Binding
//! The socket is bound inside a fresh private directory beside its path, given its mode
//! and group there, and renamed onto the path: it never exists at the path with the
//! umask's mode, and no one can swap in a symlink for `chmod` to follow.

use std::{
    ffi::CString,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{
        fs::{DirBuilderExt as _, PermissionsExt as _},
        net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{Semaphore, mpsc, oneshot},
    time::timeout,
};

use crate::policy::Mode;

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Daemon, policy and attachment state.
    Status,
    /// Every agent of the enforcing policy with a counter summary.
    Agents,
    /// One agent (by id or name) with its rules and counters by reason.
    Agent {
        /// Id or name.
        agent: String,
    },
    /// Per-agent counters by reason.
    Stats,
    /// The enforcing policy's text.
    PolicyShow,
    /// Differences between the enforcing policy and `text`.
    PolicyDiff {
        /// The candidate policy.
        text: String,
        /// Where it came from, for error messages.
        origin: String,
    },
    /// Validate and apply `text`, and make it the daemon's policy file.
    PolicyApply {
        /// The policy.
        text: String,
        /// Where it came from, for error messages.
        origin: String,
    },
    /// Override an agent's mode at run time (kept across reloads and restarts).
    Mode {
        /// Id or name.
        agent: String,
        /// The new mode.
        mode: Mode,
    },
    /// Drop an agent's runtime mode override: it is back in the policy's mode.
    ModeClear {
        /// Id or name.
        agent: String,
    },
    /// Make an agent of `profile` for a sandbox interface the caller names (kept across
    /// restarts until removed).
    AgentAdd {
        /// The profile of the enforcing policy.
        profile: String,
        /// The sandbox's host-side interface (it may come later).
        interface: String,
        /// Source prefixes that are the agent's too.
        #[serde(default)]
        prefixes: Vec<String>,
    },
    /// Remove an agent instance (by name, interface or id).
    AgentRemove {
        /// Name, interface or id.
        agent: String,
    },
    /// Close an agent's circuit breaker now (by name, interface or id): its strike and
    /// probe limiters start full; quotas and the trip count stay. Audited with who asked.
    BreakerReset {
        /// Name, interface or id.
        agent: String,
    },
    /// The last lines of the audit log.
    AuditTail {
        /// How many lines.
        lines: usize,
    },
}

impl Request {
    /// Whether the read-only socket takes it: it reads state and changes nothing.
    pub fn read_only(&self) -> bool {
        matches!(
            self,
            Request::Status | Request::Agents | Request::Agent { .. } | Request::Stats
        )
    }
}

/// What a socket lets its callers do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Every request.
    Admin,
    /// [`Request::read_only`] requests only.
    ReadOnly,
}

/// The process that sent a request, from `SO_PEERCRED` (taken when it connected).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its process id (absent if it is in another pid namespace).
    pub pid: Option<i32>,
}

/// The limits each socket's server keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections served at once; one more gets an error line and is closed.
    pub max_connections: usize,
    /// How long the server waits for a request line, and for an answer to be taken.
    pub idle_timeout: Duration,
    /// The longest request line read; a longer one is answered with an error and the
    /// connection closed.
    pub max_request_bytes: usize,
}

/// The shortest and longest wait after a failed `accept`.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// A response line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Success, with a command-specific JSON value.
    Ok(serde_json::Value),
    /// Failure, with a message for people.
    Error(String),
}

/// A request waiting for the daemon's answer.
pub struct Call {
    /// The request.
    pub request: Request,
    /// Who sent it.
    pub peer: Peer,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Response>,
}

/// Errors of the API server and client.
#[derive(Debug, Error)]
pub enum ApiError {
    /// The socket could not be created or configured.
    #[error("{op} {path}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The configured group does not exist.
    #[error("group {group:?} for {path} does not exist")]
    NoSuchGroup {
        /// The group name.
        group: String,
        /// The socket path.
        path: PathBuf,
    },
    /// Connecting was refused by the socket's permissions.
    #[error(
        "permission denied connecting to {path}: run as root or as a member of the socket's group"
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// No daemon listens on the socket.
    #[error("no daemon at {path} (is `enforcer run` running?)")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The exchange failed midway.
    #[error("talking to the daemon at {path}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The daemon answered something unparsable.
    #[error("unreadable answer from the daemon at {path}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Binds the socket at `path` with `mode` and, if given, `group`, replacing a stale one (see
/// the module documentation: bound in a private directory, renamed onto the path).
pub fn bind(path: &Path, group: Option<&str>, mode: u32) -> Result<UnixListener, ApiError> {
    let sock_err = |op, source| ApiError::Socket {
        op,
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| sock_err("creating the directory of", e))?;
    let gid = group
        .map(|group| {
            group_id(group).ok_or_else(|| ApiError::NoSuchGroup {
                group: group.to_string(),
                path: path.to_path_buf(),
            })
        })
        .transpose()?;
    // Beside the path, so the rename stays on one file system; mkdir fails if it exists.
    let private = dir.join(format!(
        ".{}.{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| sock_err("creating a private directory beside", e))?;
    let inner = private.join("socket");
    let bound = (|| {
        let listener =
            std::os::unix::net::UnixListener::bind(&inner).map_err(|e| sock_err("binding", e))?;
        // Inside a directory only this process can enter: the path is the socket.
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode))
            .map_err(|e| sock_err("setting the mode of", e))?;
        if let Some(gid) = gid {
            std::os::unix::fs::lchown(&inner, None, Some(gid))
                .map_err(|e| sock_err("changing the group of", e))?;
        }
        // Atomic, and it replaces a stale socket (or a symlink, never followed).
        std::fs::rename(&inner, path).map_err(|e| sock_err("moving into place", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| sock_err("configuring", e))?;
        UnixListener::from_std(listener).map_err(|e| sock_err("registering", e))
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    bound
}

fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated name and returns a pointer into static storage
    // or null; the gid is copied out before any other call could reuse that storage.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: non-null pointer from getgrnam.
    (!group.is_null()).then(|| unsafe { (*group).gr_gid })
}

/// Accepts connections on `listener` forever, one task per connection, within `limits`,
/// forwarding the requests `access` allows to `calls` and refusing the others.
pub async fn serve(
    listener: UnixListener,
    access: Access,
    limits: ApiLimits,
    calls: mpsc::Sender<Call>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(e) => {
                // EMFILE and ENFILE stay until descriptors are freed: retrying at once
                // would spin a CPU.
                tracing::warn!(error = %e, retry_in = ?backoff, "accepting an API connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut stream = stream;
                let line = error_line(&format!(
                    "too many connections: this socket serves {} at once; try again",
                    limits.max_connections
                ));
                let _ = timeout(limits.idle_timeout, stream.write_all(&line)).await;
            });
            continue;
        };
        let peer = stream
            .peer_cred()
            .map(|c| Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            })
            .unwrap_or_default();
        let calls = calls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            connection(stream, access, peer, limits, calls).await;
        });
    }
}

fn error_line(message: &str) -> Vec<u8> {
    let mut out =
        serde_json::to_vec(&Response::Error(message.into())).expect("responses serialize");
    out.push(b'\n');
    out
}

/// Serves one connection until it closes, idles out or sends too much.
async fn connection(
    stream: tokio::net::UnixStream,
    access: Access,
    peer: Peer,
    limits: ApiLimits,
    calls: mpsc::Sender<Call>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let cap = limits.max_request_bytes as u64 + 1;
        let read = timeout(
            limits.idle_timeout,
            (&mut reader).take(cap).read_until(b'\n', &mut line),
        )
        .await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let response = if line.len() > limits.max_request_bytes {
            let message = format!(
                "request larger than {} bytes (twice max_policy_bytes, for the JSON escaping of a policy): not read",
                limits.max_request_bytes
            );
            let _ = timeout(limits.idle_timeout, write.write_all(&error_line(&message))).await;
            return;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) if access == Access::ReadOnly && !request.read_only() => {
                    Response::Error(
                        "permission denied: this is the read-only socket (status, agents, agent, stats); changes go through the admin socket, as root or a member of its group".into(),
                    )
                }
                Ok(request) => {
                    let (reply, answer) = oneshot::channel();
                    if calls.send(Call { request, peer, reply }).await.is_err() {
                        return;
                    }
                    answer.await.unwrap_or_else(|_| {
                        Response::Error("the daemon is shutting down".into())
                    })
                }
                Err(e) => Response::Error(format!("bad request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&response).expect("responses serialize");
        out.push(b'\n');
        match timeout(limits.idle_timeout, write.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

/// A blocking client for the CLI.
pub struct Client {
    path: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ApiError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::PermissionDenied => ApiError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ => ApiError::NotRunning {
                path: path.to_path_buf(),
                source,
            },
        })?;
        // Applying a large policy takes a while; nothing legitimate takes minutes.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
        Ok(Client {
            path: path.to_path_buf(),
            stream: BufReader::new(stream),
        })
    }

    /// Sends one request and returns the daemon's answer.
    pub fn call(&mut self, request: &Request) -> Result<Response, ApiError> {
        let io_err = |source| ApiError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(request).expect("requests serialize");
        line.push(b'\n');
        self.stream.get_mut().write_all(&line).map_err(io_err)?;
        let mut answer = String::new();
        self.stream.read_line(&mut answer).map_err(io_err)?;
        serde_json::from_str(&answer).map_err(|source| ApiError::Protocol {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::Mode {
            agent: "coder".into(),
            mode: Mode::Monitor,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"cmd":"mode","agent":"coder","mode":"monitor"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        let ok = serde_json::to_string(&Response::Ok(serde_json::json!({"a": 1}))).unwrap();
        assert_eq!(ok, r#"{"ok":{"a":1}}"#);
    }

    /// A socket path in a fresh directory, removed on drop.
    struct SocketDir(PathBuf);

    impl SocketDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("enforcer-api-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            SocketDir(dir)
        }

        fn path(&self) -> PathBuf {
            self.0.join("t.sock")
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const LIMITS: ApiLimits = ApiLimits {
        max_connections: 8,
        idle_timeout: Duration::from_secs(30),
        max_request_bytes: 1 << 20,
    };

    /// Serves `listener` with a daemon that answers `Status` with the caller's [`Peer`]
    /// and everything else with an echo of its command.
    fn serve_echo(listener: UnixListener, access: Access, limits: ApiLimits) {
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        tokio::spawn(serve(listener, access, limits, tx));
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let answer = match call.request {
                    Request::Status => Response::Ok(serde_json::to_value(call.peer).unwrap()),
                    other => Response::Error(format!(
                        "echo {}",
                        serde_json::to_value(other).unwrap()["cmd"]
                    )),
                };
                let _ = call.reply.send(answer);
            }
        });
    }

    /// Sends `lines` (raw bytes) on one connection and reads every answer line until the
    /// server closes it.
    fn exchange(path: PathBuf, bytes: Vec<u8>) -> Vec<String> {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
            .collect()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_round_trips_through_the_socket_with_its_peer() {
        let dir = SocketDir::new("call");
        let path = dir.path();
        let listener = bind(&path, None, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        serve_echo(listener, Access::Admin, LIMITS);
        let client_path = path.clone();
        let answers = tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&client_path).unwrap();
            (
                c.call(&Request::Status).unwrap(),
                c.call(&Request::Stats).unwrap(),
            )
        })
        .await
        .unwrap();
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        assert_eq!(
            answers.0,
            Response::Ok(serde_json::json!({
                "uid": uid,
                "gid": unsafe { libc::getgid() },
                "pid": std::process::id(),
            }))
        );
        assert_eq!(answers.1, Response::Error("echo \"stats\"".into()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_read_only_socket_refuses_changes() {
        let dir = SocketDir::new("ro");
        let listener = bind(&dir.path(), None, 0o666).unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666, "no umask on the way");
        serve_echo(listener, Access::ReadOnly, LIMITS);
        let mut lines = Vec::new();
        for r in [
            Request::Stats,
            Request::Mode {
                agent: "a".into(),
                mode: Mode::Monitor,
            },
            Request::PolicyApply {
                text: String::new(),
                origin: "x".into(),
            },
            Request::AuditTail { lines: 1 },
        ] {
            lines.extend(serde_json::to_vec(&r).unwrap());
            lines.push(b'\n');
        }
        let answers = tokio::task::spawn_blocking(move || exchange(dir.path(), lines))
            .await
            .unwrap();
        assert_eq!(answers.len(), 4);
        assert!(answers[0].contains("echo"), "reads pass: {}", answers[0]);
        for refused in &answers[1..] {
            assert!(refused.contains("read-only socket"), "{refused}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_beyond_the_cap_are_refused_and_idle_ones_closed() {
        let dir = SocketDir::new("cap");
        let listener = bind(&dir.path(), None, 0o660).unwrap();
        let limits = ApiLimits {
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
            ..LIMITS
        };
        serve_echo(listener, Access::Admin, limits);
        let path = dir.path();
        let (third, held_closed, later) = tokio::task::spawn_blocking(move || {
            let held: Vec<UnixStream> = (0..2)
                .map(|_| UnixStream::connect(&path).unwrap())
                .collect();
            // Give the server the time to take both (a bound, not a measurement).
            std::thread::sleep(Duration::from_millis(100));
            let third = exchange(path.clone(), b"{\"cmd\":\"status\"}\n".to_vec());
            // Silent past the idle timeout: the server hangs up.
            let held_closed = held
                .into_iter()
                .map(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    BufReader::new(s).lines().next().is_none()
                })
                .collect::<Vec<_>>();
            let later = exchange(path, b"{\"cmd\":\"status\"}\n".to_vec());
            (third, held_closed, later)
        })
        .await
        .unwrap();
        assert_eq!(third.len(), 1);
        assert!(third[0].contains("too many connections"), "{third:?}");
        assert_eq!(held_closed, [true, true]);
        assert!(later[0].contains("uid"), "a slot is free again: {later:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_over_the_size_limit_is_refused_unread() {
        let dir = SocketDir::new("size");
        let listener = bind(&dir.path(), None, 0o660).unwrap();
        let limits = ApiLimits {
            max_request_bytes: 1024,
            ..LIMITS
        };
        serve_echo(listener, Access::Admin, limits);
        let path = dir.path();
        let answers = tokio::task::spawn_blocking(move || {
            let mut big = b"{\"cmd\":\"policy_show\",\"x\":\"".to_vec();
            big.resize(64 << 10, b'a');
            big.extend_from_slice(b"\"}\n{\"cmd\":\"status\"}\n");
            exchange(path, big)
        })
        .await
        .unwrap();
        assert_eq!(answers.len(), 1, "closed after the refusal: {answers:?}");
        assert!(answers[0].contains("larger than 1024 bytes"), "{answers:?}");
    }

    #[test]
    fn the_socket_appears_at_its_path_only_with_its_final_mode() {
        let dir = SocketDir::new("appear");
        let path = dir.path();
        // A stale socket (or anything) at the path is replaced, not followed.
        std::fs::write(&path, b"stale").unwrap();
        // SAFETY: inotify_init1 and inotify_add_watch with a NUL-terminated path; the
        // descriptor is read and closed below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
        assert!(fd >= 0);
        let c_dir = CString::new(dir.0.to_str().unwrap()).unwrap();
        assert!(
            unsafe {
                libc::inotify_add_watch(
                    fd,
                    c_dir.as_ptr(),
                    libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB,
                )
            } >= 0
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _listener = runtime.block_on(async { bind(&path, None, 0o660).unwrap() });
        let mut buf = vec![0u8; 64 << 10];
        // SAFETY: read into a buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        unsafe { libc::close(fd) };
        assert!(n > 0);
        let mut events = Vec::new();
        let mut at = 0;
        while at < n as usize {
            // struct inotify_event: wd, mask, cookie, len, then len bytes of name.
            let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            let name = String::from_utf8_lossy(&buf[at + 16..at + 16 + len])
                .trim_end_matches('\0')
                .to_string();
            events.push((name, mask));
            at += 16 + len;
        }
        let at_path: Vec<u32> = events
            .iter()
            .filter(|(name, _)| name == "t.sock")
            .map(|(_, mask)| *mask)
            .collect();
        assert_eq!(
            at_path,
            [libc::IN_MOVED_TO],
            "the socket's name appears once, moved in finished; no create, no chmod there: {events:?}"
        );
        let meta = std::fs::symlink_metadata(&path).unwrap();
        use std::os::unix::fs::FileTypeExt as _;
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "the private directory is gone");
    }
}
