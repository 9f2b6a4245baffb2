//! The daemon's local control API: newline-delimited JSON over a Unix socket (default
//! `/run/enforcer/enforcer.sock`, mode 0660, owned by the configured group). One request
//! line, one response line: `{"ok": ...}` or `{"error": "..."}`. The kernel's file
//! permissions are the access control: a user who is neither root nor in the socket's
//! group cannot connect, and [`Client::connect`] says so.

use std::{
    ffi::CString,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
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
    /// The last lines of the audit log.
    AuditTail {
        /// How many lines.
        lines: usize,
    },
}

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

/// Binds the socket (replacing a stale one), sets mode 0660 and the group, and serves
/// connections until the listener is dropped, forwarding each request to `calls`.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, ApiError> {
    let sock_err = |op, source| ApiError::Socket {
        op,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| sock_err("creating the directory of", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("removing a stale", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| sock_err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| sock_err("setting mode 0660 on", e))?;
    if let Some(group) = group {
        let gid = group_id(group).ok_or_else(|| ApiError::NoSuchGroup {
            group: group.to_string(),
            path: path.to_path_buf(),
        })?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| sock_err("changing the group of", e))?;
    }
    Ok(listener)
}

fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: getgrnam takes a NUL-terminated name and returns a pointer into static storage
    // or null; the gid is copied out before any other call could reuse that storage.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: non-null pointer from getgrnam.
    (!group.is_null()).then(|| unsafe { (*group).gr_gid })
}

/// Accepts connections forever, one task per connection.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let (reply, answer) = oneshot::channel();
                        if calls.send(Call { request, reply }).await.is_err() {
                            return;
                        }
                        answer.await.unwrap_or_else(|_| {
                            Response::Error("the daemon is shutting down".into())
                        })
                    }
                    Err(e) => Response::Error(format!("bad request: {e}")),
                };
                let mut out = serde_json::to_vec(&response).expect("responses serialize");
                out.push(b'\n');
                if write.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_round_trips_through_the_socket() {
        let dir = std::env::temp_dir().join(format!("enforcer-api-{}", std::process::id()));
        let path = dir.join("t.sock");
        let listener = bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let answer = match call.request {
                    Request::Status => Response::Ok(serde_json::json!({"generation": 7})),
                    _ => Response::Error("nope".into()),
                };
                let _ = call.reply.send(answer);
            }
        });
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
        assert_eq!(
            answers.0,
            Response::Ok(serde_json::json!({"generation": 7}))
        );
        assert_eq!(answers.1, Response::Error("nope".into()));
        let _ = std::fs::remove_dir_all(dir);
    }
}
