//! `enforcer run`: load and pin the program, apply the policy, attach, then serve reloads
//! (SIGHUP) until SIGTERM/SIGINT. Exiting leaves the pinned program enforcing the last
//! good policy; the next start picks the pins up without a gap.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    compile::{self, CompileError, Compiled, Limits},
    config::Config,
    dataplane::{ApplyError, Dataplane, DataplaneError, KernelMaps},
    policy::{self, Policy, PolicyError},
};

/// Errors that stop the daemon.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The policy is invalid and nothing is enforcing yet, so there is no last good policy
    /// to fall back on.
    #[error(transparent)]
    Policy(#[from] LoadError),
    /// Loading, attaching or pinning failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// Applying the first policy failed.
    #[error("applying the policy")]
    Apply(#[from] ApplyError),
    /// The state directory could not be written.
    #[error("writing {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Signal handlers or the runtime could not be set up.
    #[error("setting up the runtime")]
    Runtime(#[source] io::Error),
}

/// Errors loading and compiling a policy file.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The document is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The policy does not fit the maps or names unknown interfaces.
    #[error("{path}")]
    Compile {
        /// The policy file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: CompileError,
    },
}

/// Resolves an interface name in the caller's network namespace.
pub fn if_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Reads, validates and compiles a policy file.
pub fn load_policy(path: &Path, limits: &Limits) -> Result<(Policy, Compiled), LoadError> {
    let policy = policy::load(path)?;
    let compiled =
        compile::compile(&policy, limits, &if_index).map_err(|source| LoadError::Compile {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((policy, compiled))
}

/// What the daemon publishes in `state_dir/status.json` for the CLI.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The daemon's pid.
    pub pid: u32,
    /// Policy generation enforcing now.
    pub generation: u64,
    /// The policy file.
    pub policy: PathBuf,
    /// Reload attempts so far (start-up counts as the first).
    pub attempts: u64,
    /// Why the last attempt failed, if it did; the previous policy is still enforcing.
    pub last_error: Option<String>,
    /// Agent names of the enforcing policy, by id.
    pub agents: BTreeMap<u32, String>,
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// Time the last successful apply took, in microseconds.
    pub apply_micros: u64,
}

impl Status {
    /// Reads the status a daemon published, if any.
    pub fn read(state_dir: &Path) -> Option<Status> {
        let text = fs::read_to_string(state_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write(&self, state_dir: &Path) -> Result<(), DaemonError> {
        let path = state_dir.join("status.json");
        let tmp = state_dir.join("status.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("status serializes");
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| DaemonError::State { path, source })
    }

    /// Whether the daemon that wrote this is still running.
    pub fn daemon_alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        self.pid != 0 && unsafe { libc::kill(self.pid as i32, 0) } == 0
    }
}

/// Names of the agents in a policy, by id, for status and stats.
pub fn agent_names(policy: &Policy) -> BTreeMap<u32, String> {
    policy
        .agents()
        .iter()
        .map(|a| (a.id, a.name.clone()))
        .collect()
}

struct Daemon {
    config: Config,
    dataplane: Dataplane,
    status: Status,
}

impl Daemon {
    /// Interfaces to attach to: the configuration's plus every agent interface.
    fn wanted_interfaces(&self, policy: Option<&Policy>) -> BTreeSet<String> {
        let mut wanted: BTreeSet<String> = self.config.interfaces.iter().cloned().collect();
        if let Some(policy) = policy {
            for agent in policy.agents() {
                wanted.extend(agent.interfaces.iter().cloned());
            }
        } else {
            // No new policy: keep what is attached.
            wanted.extend(self.dataplane.attached_interfaces());
        }
        wanted
    }

    fn attach(&mut self, policy: Option<&Policy>) -> Result<(), DaemonError> {
        let wanted = self.wanted_interfaces(policy);
        for interface in &wanted {
            let how = self.dataplane.attach(interface, self.config.xdp_mode)?;
            tracing::info!(interface, ?how, "attached");
        }
        for interface in self.dataplane.attached_interfaces() {
            if !wanted.contains(&interface) {
                match self.dataplane.detach(&interface) {
                    Ok(()) => {
                        tracing::info!(interface, "detached: no longer named by config or policy")
                    }
                    Err(error) => tracing::warn!(interface, %error, "removing a stale link pin"),
                }
            }
        }
        self.status.interfaces = self.dataplane.attached_interfaces();
        Ok(())
    }

    /// Loads the policy file and applies it; on any error the running policy stays.
    fn reload(&mut self) -> Result<(), DaemonError> {
        self.status.attempts += 1;
        let started = Instant::now();
        let outcome = load_policy(&self.config.policy, &self.config.limits)
            .map_err(|e| error_chain(&e))
            .and_then(|(policy, compiled)| {
                let generation = self
                    .dataplane
                    .apply(&compiled)
                    .map_err(|e| error_chain(&e))?;
                Ok((policy, generation))
            });
        match outcome {
            Ok((policy, generation)) => {
                self.status.generation = generation;
                self.status.agents = agent_names(&policy);
                self.status.apply_micros = started.elapsed().as_micros() as u64;
                self.status.last_error = None;
                tracing::info!(
                    generation,
                    agents = policy.agents().len(),
                    micros = self.status.apply_micros,
                    "policy applied"
                );
                if let Err(e) = self.attach(Some(&policy)) {
                    tracing::error!(error = %error_chain(&e), "attaching after reload");
                    self.status.last_error = Some(error_chain(&e));
                }
            }
            Err(message) => {
                tracing::error!(error = %message, "policy rejected; the previous policy keeps enforcing");
                self.status.last_error = Some(message);
            }
        }
        self.status.write(&self.config.state_dir)
    }
}

/// Renders an error and its sources on one line, as the CLI and logs show them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    fs::create_dir_all(&config.state_dir).map_err(|source| DaemonError::State {
        path: config.state_dir.clone(),
        source,
    })?;
    let started = Instant::now();
    // Validate before touching the kernel: a bad policy with nothing pinned is fatal, a
    // bad policy over a pinned one keeps the pinned one.
    let first = load_policy(&config.policy, &config.limits);
    let pinned_generation = KernelMaps::from_pins(&config.bpffs)
        .and_then(|m| Ok(m.current_state()?.generation))
        .unwrap_or(0);
    let first = match first {
        Ok(loaded) => Some(loaded),
        Err(e) if pinned_generation > 0 => {
            tracing::error!(
                error = %error_chain(&e),
                generation = pinned_generation,
                "policy rejected at start-up; the pinned policy keeps enforcing"
            );
            None
        }
        Err(e) => return Err(e.into()),
    };

    let dataplane = Dataplane::load(&config.bpffs, &config.limits)?;
    let mut daemon = Daemon {
        status: Status {
            pid: std::process::id(),
            policy: config.policy.clone(),
            generation: pinned_generation,
            attempts: 1,
            ..Status::default()
        },
        config,
        dataplane,
    };
    match &first {
        Some((policy, compiled)) => {
            let generation = daemon.dataplane.apply(compiled)?;
            daemon.status.generation = generation;
            daemon.status.agents = agent_names(policy);
            daemon.status.apply_micros = started.elapsed().as_micros() as u64;
            tracing::info!(generation, agents = policy.agents().len(), "policy applied");
        }
        None => {
            daemon.status.last_error =
                Some("policy rejected at start-up; pinned policy enforcing".into());
            if let Some(previous) = Status::read(&daemon.config.state_dir) {
                daemon.status.agents = previous.agents;
            }
        }
    }
    daemon.attach(first.as_ref().map(|(p, _)| p))?;
    daemon.status.write(&daemon.config.state_dir)?;
    tracing::info!(
        interfaces = ?daemon.status.interfaces,
        "enforcing; SIGHUP reloads the policy, SIGTERM exits and leaves the pinned program enforcing"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Runtime)?;
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the policy");
                    daemon.reload()?;
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        Ok::<(), DaemonError>(())
    })?;
    tracing::info!("exiting; the pinned program keeps enforcing the last good policy");
    daemon.status.pid = 0;
    daemon.status.write(&daemon.config.state_dir)
}
