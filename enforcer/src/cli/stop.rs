//! `enforcer stop`: one line (or one JSON document) that says what was stopped, what was
//! detached, and what still enforces.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::{Cli, bad, is_not_running, load_config, print_json};
use crate::{
    dataplane::{self, KernelMaps},
    error::error_chain,
    node::{api::Request, daemon::Status},
    outln,
};

/// The daemon to stop, and where its pins are.
struct Target {
    /// What names the daemon (pid and start time), if one may be running.
    status: Option<Status>,
    /// The pin directory, if known.
    bpffs: Option<PathBuf>,
}

/// `enforcer stop [--detach]`.
pub(super) fn stop(cli: &Cli, detach: bool) -> anyhow::Result<ExitCode> {
    let target = find(cli, detach)?;
    let mut stopped = None;
    if let Some(status) = target.status
        && status
            .signal_daemon(libc::SIGTERM)
            .with_context(|| format!("signalling daemon {}", status.pid))?
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        while status.daemon_alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        if status.daemon_alive() {
            bail!("daemon {} did not exit within 10 s of SIGTERM", status.pid);
        }
        stopped = Some(status.pid);
    }
    // What the pins hold once the daemon is gone: what keeps enforcing, or what detaching
    // takes away.
    let (interfaces, generation, pinned) = match &target.bpffs {
        Some(bpffs) => (
            dataplane::attached_interfaces(bpffs),
            KernelMaps::from_pins(bpffs)
                .ok()
                .and_then(|m| m.current_state().ok())
                .map(|s| s.generation),
            has_pins(bpffs),
        ),
        None => (Vec::new(), None, false),
    };
    let mut removed = false;
    if detach && let Some(bpffs) = &target.bpffs {
        if pinned {
            dataplane::remove_pins(bpffs)
                .with_context(|| format!("removing pins under {}", bpffs.display()))?;
            removed = true;
        }
        // The daemon made the pin directory; empty now, it goes too. A mount point (or a
        // directory holding anything else) stays.
        let _ = std::fs::remove_dir(bpffs);
    }
    let outcome = Outcome {
        stopped,
        detach,
        removed,
        pinned,
        bpffs: target.bpffs.as_deref(),
        interfaces: &interfaces,
        generation,
    };
    let message = outcome.message(&cli.socket());
    let enforcing = outcome.enforcing();
    if cli.json {
        print_json(&json!({
            "stopped_pid": stopped,
            "detached": removed,
            "bpffs": target.bpffs,
            "interfaces": interfaces,
            "generation": generation,
            "still_enforcing": enforcing,
            "message": message,
        }));
    } else {
        outln!("{message}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `stop` did and found, for its one line.
#[derive(Clone, Copy)]
struct Outcome<'a> {
    /// The daemon stopped, if any.
    stopped: Option<u32>,
    /// Whether --detach was asked for.
    detach: bool,
    /// Whether pins were removed.
    removed: bool,
    /// Whether anything was pinned (before any removal).
    pinned: bool,
    /// The pin directory, if known.
    bpffs: Option<&'a Path>,
    /// Interfaces with a pinned link (before any removal).
    interfaces: &'a [String],
    /// The pinned maps' policy generation.
    generation: Option<u64>,
}

impl Outcome<'_> {
    /// Whether a program still enforces: pins with no attached interface (a daemon that
    /// never attached) enforce nothing.
    fn enforcing(&self) -> bool {
        !self.removed && !self.interfaces.is_empty()
    }

    /// The one line `stop` prints; `socket` is where a daemon was looked for.
    fn message(&self, socket: &Path) -> String {
        let pins = self
            .bpffs
            .map_or_else(|| "-".to_string(), |p| p.display().to_string());
        let on = if self.interfaces.is_empty() {
            "no interface".to_string()
        } else {
            self.interfaces.join(", ")
        };
        let generation = self
            .generation
            .map_or_else(|| "?".to_string(), |g| g.to_string());
        let daemon = match self.stopped {
            Some(pid) => format!("daemon {pid} stopped"),
            None => "no daemon running".to_string(),
        };
        let enforcing = self.enforcing();
        match (self.stopped, self.detach) {
            // Only the socket was known, and no daemon answers there.
            (None, _) if self.bpffs.is_none() => {
                format!("nothing to stop: no daemon at {}", socket.display())
            }
            (_, true) if self.removed => {
                format!("{daemon} and the program detached from {on}: pins under {pins} removed")
            }
            (Some(_), true) => format!("{daemon}; no pins under {pins} to remove"),
            (Some(_), false) if enforcing => format!(
                "{daemon}; the pinned program keeps enforcing (generation {generation} on {on})"
            ),
            (Some(_), false) if self.pinned => {
                format!("{daemon}; the program is attached to no interface: nothing enforces")
            }
            (Some(_), false) => format!("{daemon}; nothing pinned under {pins}"),
            (None, false) if enforcing => format!(
                "nothing to stop: no daemon running; the pinned program keeps enforcing (generation {generation} on {on}); `enforcer stop --detach` removes it"
            ),
            (None, false) if self.pinned => format!(
                "nothing to stop: no daemon running and no interface attached; `enforcer stop --detach` removes the pins under {pins}"
            ),
            (None, _) => format!("nothing to stop: no daemon and no pins under {pins}"),
        }
    }
}

/// Finds the daemon and its pins: from the configuration's status.json, or, when the
/// configuration cannot be read and `--socket` is given, from the daemon's own answer.
fn find(cli: &Cli, detach: bool) -> anyhow::Result<Target> {
    let config = match (load_config(&cli.config), &cli.socket) {
        (Ok(config), _) => config,
        (Err(e), None) => return Err(e),
        (Err(config_error), Some(socket)) => return from_socket(cli, socket, detach, config_error),
    };
    let status = Status::read(&config.runtime_dir);
    if let Some(reused) = status.as_ref().and_then(Status::reused_pid) {
        // A daemon killed outright leaves its pid in status.json; the pid may since
        // belong to anything. Not ours to signal.
        eprintln!(
            "no daemon to stop: {}/status.json names a daemon that is gone ({reused}); not signalling it",
            config.runtime_dir.display()
        );
    }
    Ok(Target {
        status,
        bpffs: Some(config.bpffs),
    })
}

/// [`find`] through the socket: the daemon's status names its pid, start time and pins.
fn from_socket(
    cli: &Cli,
    socket: &Path,
    detach: bool,
    config_error: anyhow::Error,
) -> anyhow::Result<Target> {
    let v = match cli.call(Request::Status) {
        Ok(v) => v,
        Err(e) if is_not_running(&e) && !detach => {
            return Ok(Target {
                status: None,
                bpffs: None,
            });
        }
        Err(e) => {
            return Err(bad(format!(
                "error: no daemon answers at {} ({}), and without a configuration ({}) the pins are unknown: give --config",
                socket.display(),
                error_chain(e.as_ref()),
                error_chain(config_error.as_ref()).trim_start_matches("error: ")
            )));
        }
    };
    let pid = v["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    let Some(pid) = pid else {
        bail!("the daemon at {} did not say its pid", socket.display());
    };
    let bpffs = v["bpffs"].as_str().map(PathBuf::from);
    if detach && bpffs.is_none() {
        // An older daemon's answer: stopping it and then finding nothing to detach
        // would leave its program enforcing while saying otherwise.
        return Err(bad(format!(
            "error: the daemon at {} does not say where its pins are: give --config to detach",
            socket.display()
        )));
    }
    Ok(Target {
        status: Some(Status {
            pid,
            // Absent from older daemons' answers: then the command name is checked.
            pid_start: v["pid_start"].as_u64(),
            ..Status::default()
        }),
        bpffs,
    })
}

/// Whether anything of the enforcer is pinned under `bpffs`.
fn has_pins(bpffs: &Path) -> bool {
    ["links", "tc", "stages", "maps"].iter().any(|sub| {
        std::fs::read_dir(bpffs.join(sub)).is_ok_and(|mut entries| entries.next().is_some())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of the one line: what stopped, what was removed, what still enforces.
    #[test]
    fn one_line_says_what_stopped_and_what_still_enforces() {
        let pins = Path::new("/sys/fs/bpf/enforcer");
        let one = ["eth1".to_string()];
        let socket = Path::new("/run/enforcer/enforcer.sock");
        let base = Outcome {
            stopped: Some(42),
            detach: false,
            removed: false,
            pinned: true,
            bpffs: Some(pins),
            interfaces: &one,
            generation: Some(7),
        };
        let cases = [
            (
                base,
                "daemon 42 stopped; the pinned program keeps enforcing (generation 7 on eth1)",
            ),
            (
                Outcome {
                    detach: true,
                    removed: true,
                    ..base
                },
                "daemon 42 stopped and the program detached from eth1: pins under /sys/fs/bpf/enforcer removed",
            ),
            (
                Outcome {
                    interfaces: &[],
                    ..base
                },
                "daemon 42 stopped; the program is attached to no interface: nothing enforces",
            ),
            (
                Outcome {
                    detach: true,
                    pinned: false,
                    interfaces: &[],
                    ..base
                },
                "daemon 42 stopped; no pins under /sys/fs/bpf/enforcer to remove",
            ),
            (
                Outcome {
                    stopped: None,
                    ..base
                },
                "nothing to stop: no daemon running; the pinned program keeps enforcing (generation 7 on eth1); `enforcer stop --detach` removes it",
            ),
            (
                Outcome {
                    stopped: None,
                    interfaces: &[],
                    ..base
                },
                "nothing to stop: no daemon running and no interface attached; `enforcer stop --detach` removes the pins under /sys/fs/bpf/enforcer",
            ),
            (
                Outcome {
                    stopped: None,
                    detach: true,
                    pinned: false,
                    interfaces: &[],
                    generation: None,
                    ..base
                },
                "nothing to stop: no daemon and no pins under /sys/fs/bpf/enforcer",
            ),
            (
                Outcome {
                    stopped: None,
                    pinned: false,
                    bpffs: None,
                    interfaces: &[],
                    generation: None,
                    ..base
                },
                "nothing to stop: no daemon at /run/enforcer/enforcer.sock",
            ),
        ];
        for (outcome, line) in cases {
            assert_eq!(outcome.message(socket), line);
        }
        assert!(base.enforcing());
        assert!(
            !Outcome {
                detach: true,
                removed: true,
                ..base
            }
            .enforcing()
        );
    }
}
