//! `enforcer run`: load and pin the program, apply the policy, attach, then serve reloads
//! (SIGHUP, the local API) until SIGTERM/SIGINT. Exiting leaves the pinned program
//! enforcing the last good policy; the next start picks the pins up without a gap.
//!
//! One task owns the [`Dataplane`] and every policy change goes through it
//! ([`Daemon::apply_text`]): the file on SIGHUP, `policy apply` and `mode` from the API.
//! Parse, validate and compile happen before any map is touched, so a rejected policy
//! leaves the running one intact.
//!
//! Guards ([`guards`]): right after loading, and every minute, the daemon writes the wall
//! clock's offset the quota windows are numbered by, and saves every agent's quota use to
//! `state_dir/quotas.json`; a `GUARDS` map no pin kept gets that use back before anything is
//! attached.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    controlplane::{
        bundle::BundleStore,
        sync::{self, ConnectionState, PolicyUpdate},
    },
    dataplane::{
        ApplyError, Dataplane, DataplaneError, KernelMaps,
        compile::{self, CompileError, Compiled, Limits},
        stats,
    },
    error::error_chain,
    node::{
        api::{self, Access, Call, Peer, Request, Response},
        audit::{
            self, AuditContext, AuditLog, Head, NoticeRecord, SharedHealth, UserAudit, UserEvent,
            UserSource, Writer,
        },
        config::Config,
        guards,
        instances::Instances,
        metrics::{self, DaemonInfo},
        netlink::{self, LinkEvent, if_index},
        notify,
    },
    policy::{self, Mode, Policy, PolicyError},
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
    /// The local API socket could not be set up.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The metrics listener could not be bound.
    #[error("binding the metrics endpoint on {addr}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Signal handlers or the runtime could not be set up.
    #[error("setting up the runtime")]
    Runtime(#[source] io::Error),
    /// The audit log could not be opened.
    #[error("opening the audit log {path}")]
    Audit {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: audit::AuditError,
    },
    /// A map operation failed at start-up.
    #[error(transparent)]
    Maps(#[from] crate::dataplane::MapsError),
    /// The DNS resolver could not start.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The inspecting proxy could not start.
    #[error("starting the inspecting proxy")]
    Inspect(#[from] crate::inspect::proxy::InspectError),
}

/// Errors loading and compiling a policy.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The document is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The policy does not fit the maps or names unknown interfaces.
    #[error("{origin}")]
    Compile {
        /// Where the policy came from.
        origin: String,
        /// The underlying error (boxed: it is large, and this is the cold path).
        #[source]
        source: Box<CompileError>,
    },
}

/// Reads, validates and compiles a policy file.
pub fn load_policy(path: &Path, limits: &Limits) -> Result<(Policy, Compiled), LoadError> {
    let policy = policy::load(path)?;
    let compiled = compile_policy(&policy, &path.display().to_string(), limits)?;
    Ok((policy, compiled))
}

fn compile_policy(policy: &Policy, origin: &str, limits: &Limits) -> Result<Compiled, LoadError> {
    compile::compile(policy, limits, &if_index).map_err(|source| LoadError::Compile {
        origin: origin.to_string(),
        source: Box::new(source),
    })
}

/// Hex SHA-256 of a policy text: the digest status, metrics and audit records name.
pub fn digest(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the daemon publishes in `runtime_dir/status.json`, for tools that cannot use the
/// socket (and for tests waiting on start-up).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The daemon's pid, written once start-up is complete (policy, proxy and its
    /// redirect, metrics, DNS); 0 while it starts and once it exited.
    pub pid: u32,
    /// When that process started, in clock ticks since boot (`/proc/PID/stat`, field 22).
    /// With the pid it names one process: a daemon killed with SIGKILL leaves its pid here,
    /// and the kernel may give that pid to any later process, which `enforcer stop` must
    /// not signal. Absent in status files of older daemons.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Policy generation enforcing now.
    pub generation: u64,
    /// The policy file.
    pub policy: PathBuf,
    /// SHA-256 of the enforcing policy text.
    pub digest: String,
    /// Policy attempts so far (start-up counts as the first).
    pub attempts: u64,
    /// Interfaces the configuration or policy names that do not exist now: attached when
    /// they appear.
    #[serde(default)]
    pub pending: Vec<String>,
    /// Why the last attempt failed, if it did; the previous policy is still enforcing.
    pub last_error: Option<String>,
    /// Agent names of the enforcing policy, by id.
    pub agents: BTreeMap<u32, String>,
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    /// Time the last successful apply took, in microseconds.
    pub apply_micros: u64,
    /// Runtime mode overrides by agent id.
    pub overrides: BTreeMap<u32, Mode>,
}

impl Status {
    /// Reads the status a daemon published, if any.
    pub fn read(runtime_dir: &Path) -> Option<Status> {
        let text = fs::read_to_string(runtime_dir.join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn write(&self, runtime_dir: &Path) -> Result<(), DaemonError> {
        write_atomic(
            &runtime_dir.join("status.json"),
            serde_json::to_string_pretty(self)
                .expect("status serializes")
                .as_bytes(),
        )
    }

    /// Whether the daemon that wrote this is still running: its pid exists and is the same
    /// process (see [`Status::pid_start`]), not a later one the pid was given to.
    /// A zombie (exited, not yet reaped by its parent) is not running: `enforcer stop`
    /// waits for the exit, not for the parent's `wait`.
    pub fn daemon_alive(&self) -> bool {
        self.pid != 0
            && self.reused_pid().is_none()
            && process_start(self.pid).is_some()
            && !is_zombie(self.pid)
    }

    /// When the pid this names is held by another process than the daemon that wrote it:
    /// what that process is, to say so. `None` when the pid is the daemon's or is gone.
    pub fn reused_pid(&self) -> Option<String> {
        if self.pid == 0 {
            return None;
        }
        let started = process_start(self.pid)?;
        let comm = fs::read_to_string(format!("/proc/{}/comm", self.pid))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let same = match self.pid_start {
            Some(recorded) => started == recorded,
            // An older daemon recorded no start time: the command name is the best check.
            None => comm == "enforcer",
        };
        (!same).then(|| {
            format!(
                "pid {} is now {comm:?}, started at tick {started}",
                self.pid
            )
        })
    }
}

impl Status {
    /// Sends `signal` to the daemon that wrote this, if it still runs; `Ok(false)` when it
    /// does not (gone, or its pid now held by another process). The pid is pinned with a
    /// pidfd (Linux 5.3) before its start time is checked, so it cannot be handed to
    /// another process between the check and the signal.
    pub fn signal_daemon(&self, signal: libc::c_int) -> std::io::Result<bool> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        if self.pid == 0 {
            return Ok(false);
        }
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if !self.daemon_alive() {
            return Ok(false);
        }
        // SAFETY: pidfd_send_signal(2) with our pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(true)
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat`, field 22), or `None`
/// when there is no such process. The command name in field 2 may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: field 22 is the 20th.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` has exited and waits for its parent to reap it (state `Z` in
/// `/proc/PID/stat`, the field after the command name).
fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            == Some("Z")
    })
}

/// Replaces a file of the daemon's (status, overrides, the policy file) durably: a crash
/// leaves the old contents or the new (see [`crate::durable`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DaemonError> {
    crate::durable::replace(path, bytes, 0o644).map_err(|source| DaemonError::State {
        path: path.to_path_buf(),
        source,
    })
}

/// Names of the agents in a policy, by id, for status and stats.
pub fn agent_names(policy: &Policy) -> BTreeMap<u32, String> {
    policy
        .agents()
        .iter()
        .map(|a| (a.id, a.name.clone()))
        .collect()
}

/// The enforcing policy.
struct Enforcing {
    text: String,
    origin: String,
    policy: Policy,
    compiled: Compiled,
    applied_at: SystemTime,
}

struct Daemon {
    config: Config,
    dataplane: Dataplane,
    status: Status,
    current: Option<Enforcing>,
    info: watch::Sender<DaemonInfo>,
    audit: watch::Sender<AuditContext>,
    /// How writing the audit log goes.
    audit_health: SharedHealth,
    /// Where user-space components (DNS resolver, inspecting proxy) record audit events.
    user_audit: UserAudit,
    /// The enforcing policy, for the inspecting proxy (names, detectors, who is inspected)
    /// and the DNS resolver (who may resolve which names).
    inspect_policy: watch::Sender<Option<Arc<Policy>>>,
    /// The last applied control-plane bundle, persisted for fail-static restarts.
    store: Option<BundleStore>,
    /// The bundle version held (the rollback floor), and whether only as a floor.
    held: sync::Held,
    /// Why the stored bundle was not used at start, if it was not.
    stored_bundle_error: Option<String>,
    /// The control-plane connection, when one is configured.
    control_plane: Option<watch::Receiver<ConnectionState>>,
    reloads_ok: u64,
    reloads_rejected: u64,
    /// Each wanted interface's index when last attached (`None`: pending), to tell which
    /// rtnetlink events change what is enforced.
    resolved: BTreeMap<String, Option<u32>>,
    /// The agent instances of the policy's profiles (see [`agents`]).
    instances: Instances,
    /// Every interface of this namespace, name to index, kept from rtnetlink events.
    links: BTreeMap<String, u32>,
}

mod agents;

impl Daemon {
    /// Interfaces to attach to: the configuration's plus every agent interface.
    fn wanted_interfaces(&self) -> BTreeSet<String> {
        let mut wanted: BTreeSet<String> = self.config.interfaces.iter().cloned().collect();
        match &self.current {
            Some(current) => {
                for agent in current.policy.agents() {
                    wanted.extend(agent.interfaces.iter().cloned());
                }
            }
            // No policy of ours yet (pinned one enforcing): keep what is attached.
            None => wanted.extend(self.dataplane.attached_interfaces()),
        }
        wanted
    }

    /// Attaches to every wanted interface that exists and detaches from the others. One
    /// interface that fails does not keep the rest unattached; the first error is returned.
    fn attach(&mut self) -> Result<(), DataplaneError> {
        let wanted = self.wanted_interfaces();
        self.resolved.clear();
        let mut first_error = None;
        for interface in &wanted {
            if let Err(e) = self.attach_one(interface, true) {
                first_error.get_or_insert(e);
            }
        }
        for interface in self.dataplane.attached_interfaces() {
            if !wanted.contains(&interface) {
                let _ = self.attach_one(&interface, false);
            }
        }
        self.hooks_changed();
        first_error.map_or(Ok(()), Err)
    }

    /// [`Daemon::attach`] for a few interfaces (those an agent change touched): each is
    /// attached if wanted and present, detached otherwise. Errors are logged and kept in
    /// `status.last_error`.
    fn attach_some(&mut self, interfaces: &[String]) {
        if interfaces.is_empty() {
            return;
        }
        let wanted = self.wanted_interfaces();
        for interface in interfaces.iter().collect::<BTreeSet<_>>() {
            let want = wanted.contains(interface);
            if !want {
                self.resolved.remove(interface);
            }
            if let Err(e) = self.attach_one(interface, want) {
                self.status.last_error = Some(error_chain(&e));
            }
        }
        self.hooks_changed();
    }

    /// Attaches `interface` if `wanted` and present; otherwise removes its hook.
    fn attach_one(&mut self, interface: &str, wanted: bool) -> Result<(), DataplaneError> {
        if !wanted {
            match self.dataplane.detach(interface) {
                Ok(()) => {
                    tracing::info!(interface, "detached: no longer named by config or policy")
                }
                Err(error) => tracing::warn!(interface, %error, "removing a stale link pin"),
            }
            return Ok(());
        }
        let index = if_index(interface);
        self.resolved.insert(interface.to_string(), index);
        if index.is_none() {
            // Not there (yet): attached when rtnetlink reports it. A pin from the
            // interface's previous life is stale: the kernel detached with the device.
            if let Err(error) = self.dataplane.detach(interface) {
                tracing::warn!(interface, %error, "removing the pin of a vanished interface");
            }
            return Ok(());
        }
        match self.dataplane.attach(
            interface,
            self.config.hook_of(interface),
            self.config.xdp_mode,
        ) {
            Ok(how) => {
                tracing::info!(interface, ?how, "attached");
                Ok(())
            }
            Err(e) => {
                tracing::error!(interface, error = %error_chain(&e), "attaching");
                Err(e)
            }
        }
    }

    /// Records in `status` which interfaces are attached and which pending.
    fn hooks_changed(&mut self) {
        self.status.interfaces = self.dataplane.attached_interfaces();
        self.status.pending = self
            .resolved
            .iter()
            .filter(|(_, index)| index.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        if !self.status.pending.is_empty() {
            tracing::debug!(pending = ?self.status.pending, "interfaces not present yet: attached when they appear");
        }
    }

    /// Follows an interface change. The host's link table is kept up to date; when a
    /// wanted interface appears, goes away, or comes back under a new index, or a link
    /// appears or goes that a profile's pattern matches, the agents concerned are compiled
    /// and applied on their own ([`agents`]). Other changes (another interface, a link
    /// going up or down) change nothing. Lost events re-read every link and apply the
    /// whole policy again.
    fn on_link(&mut self, event: LinkEvent) {
        let mut changed = Vec::new();
        match &event {
            LinkEvent::Overrun => self.links = agents::host_links(),
            LinkEvent::Changed { ifindex, name } => {
                for (n, i) in &self.resolved {
                    if (*i == Some(*ifindex) && n != name) || (n == name && *i != Some(*ifindex)) {
                        changed.push(n.clone());
                    }
                }
                let new_link = self.links.get(name) != Some(ifindex);
                self.links.retain(|n, i| *i != *ifindex || n == name);
                self.links.insert(name.clone(), *ifindex);
                if !new_link && changed.is_empty() {
                    return;
                }
                changed.push(name.clone());
            }
            LinkEvent::Gone { ifindex, name } => {
                for (n, i) in &self.resolved {
                    if *i == Some(*ifindex) {
                        changed.push(n.clone());
                    }
                }
                self.links.retain(|_, i| *i != *ifindex);
                changed.push(name.clone());
            }
        }
        let current = self
            .current
            .as_ref()
            .map(|c| (c.origin.clone(), c.text.clone()));
        match (current, &event) {
            (Some((origin, text)), LinkEvent::Overrun) => {
                tracing::info!("link events were lost: applying the policy again");
                let _ = self.apply_text(&origin, &text);
            }
            (Some(_), _) => {
                changed.sort();
                changed.dedup();
                let why = format!("interfaces changed: {}", changed.join(", "));
                self.follow(&changed, &why);
            }
            // Only the pinned policy enforces: its interface map stays, attach what exists.
            (None, _) => {
                if changed.iter().all(|n| !self.resolved.contains_key(n))
                    && !matches!(event, LinkEvent::Overrun)
                {
                    return;
                }
                if let Err(e) = self.attach() {
                    self.status.last_error = Some(error_chain(&e));
                }
                let _ = self.status.write(&self.config.runtime_dir);
                self.publish();
            }
        }
    }

    /// Validates, compiles (with the runtime mode overrides) and applies a policy text.
    /// Any error leaves the running policy enforcing and is returned as a message.
    fn apply_text(&mut self, origin: &str, text: &str) -> Result<u64, String> {
        self.status.attempts += 1;
        let started = Instant::now();
        let outcome = (|| -> Result<(Policy, Compiled, u64, Instances), String> {
            if text.len() > self.config.max_policy_bytes {
                return Err(format!(
                    "{origin}: the policy is {} bytes, more than max_policy_bytes ({}) allows",
                    text.len(),
                    self.config.max_policy_bytes
                ));
            }
            let mut policy = policy::parse(origin, text).map_err(|e| error_chain(&e))?;
            // The instances follow the new policy: a static agent may not take what one
            // holds (a sandbox cannot be moved under its feet), and instances of profiles
            // it no longer has, or that its patterns no longer match, go.
            let clashes = self.instances.clashes(&policy);
            if !clashes.is_empty() {
                let list: Vec<String> = clashes.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "{origin}: {}; remove the instance first (enforcer agent remove NAME)",
                    list.join("; ")
                ));
            }
            let mut instances = self.instances.clone();
            let reconciled = instances.reconcile(&policy, &self.links);
            let agents = instances.agents(&policy);
            policy.set_instances(agents);
            for (id, mode) in &self.status.overrides {
                policy.set_mode(*id, *mode);
            }
            let compiled = compile_policy(&policy, origin, &self.config.limits)
                .map_err(|e| error_chain(&e))?;
            self.reset_fresh_ids(reconciled.added.iter().map(|i| i.id));
            let generation = self
                .dataplane
                .apply(&compiled)
                .map_err(|e| error_chain(&e))?;
            Ok((policy, compiled, generation, instances))
        })();
        let result = match outcome {
            Ok((policy, compiled, generation, instances)) => {
                if instances != self.instances {
                    let gone: Vec<u32> = self
                        .instances
                        .iter()
                        .filter(|i| instances.get(&i.name()).is_none_or(|now| now.id != i.id))
                        .map(|i| i.id)
                        .collect();
                    self.instances = instances;
                    self.save_instances();
                    self.forget_overrides(gone);
                }
                self.status.generation = generation;
                self.status.agents = agent_names(&policy);
                self.status.digest = digest(text);
                self.status.apply_micros = started.elapsed().as_micros() as u64;
                self.status.last_error = None;
                self.reloads_ok += 1;
                tracing::info!(
                    generation,
                    origin,
                    agents = policy.agents().len(),
                    micros = self.status.apply_micros,
                    "policy applied"
                );
                if self.config.inspect.is_none() && policy.agents().iter().any(|a| a.inspect) {
                    tracing::warn!(
                        "agents have inspect = true but the configuration has no [inspect] section: their TLS is not inspected"
                    );
                }
                self.inspect_policy
                    .send_replace(Some(Arc::new(policy.clone())));
                // Records of packets decided by this generation name it and its digest.
                self.audit.send_replace(AuditContext::new(
                    generation,
                    text,
                    self.status.agents.clone(),
                ));
                self.current = Some(Enforcing {
                    text: text.to_string(),
                    origin: origin.to_string(),
                    policy,
                    compiled,
                    applied_at: SystemTime::now(),
                });
                if let Err(e) = self.attach() {
                    let message = error_chain(&e);
                    tracing::error!(error = %message, "attaching after apply");
                    self.status.last_error = Some(message);
                }
                Ok(generation)
            }
            Err(message) => {
                tracing::error!(origin, error = %message, "policy rejected; the previous policy keeps enforcing");
                self.status.last_error = Some(message.clone());
                self.reloads_rejected += 1;
                Err(message)
            }
        };
        if let Err(e) = self.status.write(&self.config.runtime_dir) {
            tracing::warn!(error = %error_chain(&e), "writing status.json");
        }
        self.publish();
        release_freed_heap();
        result
    }

    /// Applies a verified control-plane bundle. It is saved first, so what enforces is what a
    /// restart loads; if the kernel then refuses it, the previous bundle is put back. An ACK
    /// (`Ok`) means enforcing and on disk, a NACK neither.
    fn apply_bundle(&mut self, update: PolicyUpdate) {
        let bundle = update.bundle;
        let origin = bundle.origin();
        let result = std::str::from_utf8(bundle.policy())
            .map_err(|e| format!("malformed policy: {origin}: not UTF-8: {e}"))
            .and_then(|text| {
                let Some(store) = self.store.clone() else {
                    return self.apply_text(&origin, text);
                };
                let previous = store
                    .read_raw()
                    .and_then(|previous| store.save(&bundle).map(|()| previous))
                    .map_err(|e| {
                        format!(
                            "not applied: the bundle cannot be saved ({})",
                            error_chain(&e)
                        )
                    })?;
                let applied = self.apply_text(&origin, text);
                if applied.is_err()
                    && let Err(e) = store.restore(previous.as_deref())
                {
                    tracing::error!(error = %error_chain(&e), "putting the previous bundle back");
                }
                let generation = applied?;
                if let Err(e) = store.raise_floor(bundle.version()) {
                    // The saved bundle holds the version too, while it verifies.
                    tracing::error!(error = %error_chain(&e), "recording the rollback floor");
                }
                Ok(generation)
            });
        if result.is_ok() {
            self.held = sync::Held {
                version: bundle.version(),
                floor_only: false,
            };
        }
        // The ACK carries the audit chain's head, kept off the node by the control plane.
        let audit = self.audit_health.get();
        let result = result.map(|generation| sync::Applied {
            generation,
            audit: Some((audit.head, audit.seq)),
        });
        let _ = update.reply.send(result);
    }

    /// Reloads the configured policy file.
    fn reload_file(&mut self) -> Result<u64, String> {
        let path = self.config.policy.clone();
        match fs::read_to_string(&path) {
            Ok(text) => self.apply_text(&path.display().to_string(), &text),
            Err(e) => {
                let message = format!("reading policy file {}: {e}", path.display());
                self.status.attempts += 1;
                self.status.last_error = Some(message.clone());
                self.reloads_rejected += 1;
                let _ = self.status.write(&self.config.runtime_dir);
                self.publish();
                Err(message)
            }
        }
    }

    /// Updates what the metrics endpoint reports.
    fn publish(&self) {
        let limits = &self.config.limits;
        let map_fill = match &self.current {
            Some(c) => {
                let k = &c.compiled;
                vec![
                    (
                        "agents",
                        k.agents.len() as u64,
                        u64::from(limits.max_agents),
                    ),
                    (
                        "interfaces",
                        k.interfaces.len() as u64,
                        u64::from(limits.max_interfaces),
                    ),
                    (
                        "sources_v4",
                        (k.source_hosts_v4.len() + k.source_prefixes_v4.len()) as u64,
                        u64::from(limits.max_source_prefixes),
                    ),
                    (
                        "sources_v6",
                        (k.source_hosts_v6.len() + k.source_prefixes_v6.len()) as u64,
                        u64::from(limits.max_source_prefixes),
                    ),
                    (
                        "destinations_v4",
                        k.destinations_v4.len() as u64,
                        u64::from(limits.max_destination_prefixes),
                    ),
                    (
                        "destinations_v6",
                        k.destinations_v6.len() as u64,
                        u64::from(limits.max_destination_prefixes),
                    ),
                ]
            }
            None => Vec::new(),
        };
        let applied_at = self
            .current
            .as_ref()
            .and_then(|c| c.applied_at.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.info.send_modify(|info| {
            info.agents = std::sync::Arc::new(self.status.agents.clone());
            info.generation = self.status.generation;
            info.applied_at = applied_at;
            info.apply_seconds = self.status.apply_micros as f64 / 1e6;
            info.reloads_ok = self.reloads_ok;
            info.reloads_rejected = self.reloads_rejected;
            info.map_fill = map_fill;
            info.top_agents = self.config.metrics_top_agents;
            info.interfaces_attached = self.status.interfaces.len() as u64;
            info.interfaces_pending = self.status.pending.len() as u64;
            info.control_plane_connected = self
                .control_plane
                .as_ref()
                .map(|s| matches!(*s.borrow(), ConnectionState::Connected { .. }));
        });
    }

    /// Finds an agent of the enforcing policy by id or name.
    fn find_agent(&self, key: &str) -> Result<&policy::Agent, String> {
        let current = self
            .current
            .as_ref()
            .ok_or("no policy of this daemon is enforcing yet")?;
        current
            .policy
            .agents()
            .iter()
            .find(|a| {
                a.name == key
                    || key.parse::<u32>().ok() == Some(a.id)
                    || a.interfaces.iter().any(|i| i == key)
            })
            .ok_or_else(|| format!("no agent {key:?} in the enforcing policy"))
    }

    /// The minute's guard work: the wall clock's offset, and the quota use saved.
    fn guard_tick(&mut self) {
        if let Err(e) = self
            .dataplane
            .maps()
            .set_guard_config(guards::guard_config())
        {
            tracing::error!(error = %error_chain(&e), "writing the wall clock's offset for quota windows");
        }
        self.save_quotas();
    }

    /// Saves every active agent's quota words, with its id and name, for the next boot.
    fn save_quotas(&mut self) {
        let path = self.config.state_dir.join(guards::QUOTA_FILE);
        let names = self.status.agents.clone();
        if let Err(e) = guards::save_quotas(self.dataplane.maps(), &names, &path) {
            tracing::error!(path = %path.display(), error = %error_chain(&e), "saving the quota use");
        }
    }

    /// `breaker reset`: the agent's breaker closed, its strike and probe limiters full;
    /// quotas and the trip count stay.
    fn reset_breaker(&mut self, agent: &str) -> Result<Value, String> {
        let (id, name) = self.find_agent(agent).map(|a| (a.id, a.name.clone()))?;
        let maps = self.dataplane.maps();
        let before = maps.guard_state(id).map_err(|e| error_chain(&e))?;
        let policy = maps.guard_policy(id).map_err(|e| error_chain(&e))?;
        let was = guards::Breaker::effective(before.breaker, guards::now_units(), policy.calm);
        maps.set_guard_state(id, guards::reset_breaker(before))
            .map_err(|e| error_chain(&e))?;
        tracing::info!(agent = id, name, was = was.name(), "breaker reset");
        Ok(json!({
            "agent": id,
            "name": name,
            "was": was.name(),
            "state": "closed",
            "trips": before.trips,
        }))
    }

    /// The agent's interfaces that do not exist yet: enforced once they appear.
    fn pending_of(&self, agent: &policy::Agent) -> Vec<String> {
        agent
            .interfaces
            .iter()
            .filter(|i| self.status.pending.contains(i))
            .cloned()
            .collect()
    }

    fn persist_overrides(&self) -> Result<(), String> {
        write_atomic(
            &self.config.state_dir.join("overrides.json"),
            serde_json::to_string_pretty(&self.status.overrides)
                .expect("overrides serialize")
                .as_bytes(),
        )
        .map_err(|e| error_chain(&e))
    }

    /// Sets (`Some`) or clears (`None`) an agent's runtime mode override and applies the
    /// enforcing policy with it. Saved first, so what enforces is what a restart reads; if
    /// the kernel then refuses the change, the saved overrides are put back.
    fn set_override(&mut self, agent: &str, mode: Option<Mode>) -> Result<Value, String> {
        let (id, policy_mode) = self.find_agent(agent).map(|a| (a.id, a.mode))?;
        let (origin, text) = self
            .current
            .as_ref()
            .map(|c| (c.origin.clone(), c.text.clone()))
            .ok_or("no policy of this daemon is enforcing yet")?;
        let previous = match mode {
            Some(mode) => self.status.overrides.insert(id, mode),
            None => match self.status.overrides.remove(&id) {
                Some(previous) => Some(previous),
                // Nothing to clear: the agent already runs in the policy's mode.
                None => {
                    return Ok(json!({
                        "agent": id,
                        "mode": policy_mode,
                        "override": null,
                        "cleared": false,
                        "generation": self.status.generation,
                    }));
                }
            },
        };
        let put_back = |daemon: &mut Daemon| match previous {
            Some(p) => daemon.status.overrides.insert(id, p),
            None => daemon.status.overrides.remove(&id),
        };
        if let Err(e) = self.persist_overrides() {
            put_back(self);
            return Err(format!(
                "not changed: the mode overrides cannot be saved ({e}); under the systemd unit state_dir must be below ReadWritePaths="
            ));
        }
        match self.apply_text(&origin, &text) {
            Ok(generation) => {
                let now = self.find_agent(agent).map(|a| a.mode).ok();
                Ok(json!({
                    "agent": id,
                    "mode": now,
                    "override": mode,
                    "cleared": mode.is_none(),
                    "generation": generation,
                }))
            }
            Err(e) => {
                put_back(self);
                if let Err(saved) = self.persist_overrides() {
                    tracing::error!(error = %saved, "putting the previous mode overrides back");
                }
                Err(e)
            }
        }
    }

    fn handle(&mut self, request: Request, peer: Peer) -> Response {
        // Changes are audited with who asked, whether they took effect or not.
        let change = match &request {
            Request::PolicyApply { origin, .. } => Some(("policy_apply", None, origin.clone())),
            Request::Mode { agent, mode } => Some((
                "mode_change",
                self.find_agent(agent).ok().map(|a| a.id),
                format!(
                    "agent {agent} to {} mode",
                    match mode {
                        Mode::Enforce => "enforce",
                        Mode::Monitor => "monitor",
                    }
                ),
            )),
            Request::ModeClear { agent } => Some((
                "mode_change",
                self.find_agent(agent).ok().map(|a| a.id),
                format!("agent {agent} back to the policy's mode (override cleared)"),
            )),
            Request::AgentAdd {
                profile,
                interface,
                prefixes,
            } => Some((
                "agent_add",
                None,
                format!(
                    "agent of profile {profile} on {interface}{}",
                    if prefixes.is_empty() {
                        String::new()
                    } else {
                        format!(" with prefixes {}", prefixes.join(", "))
                    }
                ),
            )),
            Request::AgentRemove { agent } => Some((
                "agent_remove",
                self.find_agent(agent).ok().map(|a| a.id),
                format!("agent {agent}"),
            )),
            Request::BreakerReset { agent } => Some((
                "breaker_reset",
                self.find_agent(agent).ok().map(|a| a.id),
                format!("breaker of agent {agent} closed"),
            )),
            _ => None,
        };
        let answer = match &request {
            Request::AgentAdd {
                profile,
                interface,
                prefixes,
            } => self.add_instance(profile, interface, prefixes, Some(&peer)),
            _ => self.answer(request),
        };
        // An added agent is audited under the id it got.
        let change = change.map(|(reason, agent, what)| {
            let id = agent.or_else(|| {
                answer
                    .as_ref()
                    .ok()
                    .and_then(|v| v["id"].as_u64())
                    .map(|id| id as u32)
            });
            (reason, id, what)
        });
        if let Some((reason, agent, what)) = change {
            self.user_audit.record(UserEvent {
                source: UserSource::Api,
                agent: agent.unwrap_or(0),
                reason,
                verdict: if answer.is_ok() { "applied" } else { "refused" },
                src: None,
                dst: None,
                name: None,
                detail: Some(match &answer {
                    Ok(_) => what,
                    Err(e) => format!("{what}: {e}"),
                }),
                actor: Some(peer),
                mcp: None,
            });
        }
        match answer {
            Ok(value) => Response::Ok(value),
            Err(message) => Response::Error(message),
        }
    }

    fn answer(&mut self, request: Request) -> Result<Value, String> {
        match request {
            Request::Status => Ok(json!({
                "pid": std::process::id(),
                "pid_start": self.status.pid_start,
                "metrics_listen": self.config.metrics_listen,
                "audit_log": self.config.audit_log,
                "generation": self.status.generation,
                "policy_file": self.config.policy,
                "policy_origin": self.current.as_ref().map(|c| c.origin.clone()),
                "policy_digest": self.status.digest,
                "applied_at_unix": self.current.as_ref()
                    .and_then(|c| c.applied_at.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                "apply_micros": self.status.apply_micros,
                "attempts": self.status.attempts,
                "last_error": self.status.last_error,
                "agents": self.status.agents.len(),
                "interfaces": self.status.interfaces,
                "pending": self.status.pending,
                "hooks": self.dataplane.hooks(),
                "overrides": self.status.overrides,
                "audit": self.audit_health,
                "bpffs": self.config.bpffs,
                "inspect": self.info.borrow().inspect.as_ref().map(|stats| stats.status()),
                "control_plane": self.control_plane.as_ref().map(|state| json!({
                    "url": self.config.control_plane.as_ref().map(|c| c.url.clone()),
                    "state": state.borrow().to_string(),
                    "connected": matches!(*state.borrow(), ConnectionState::Connected { .. }),
                    "rollback_floor": self.held.version,
                    "enforcing_local_file": self.held.floor_only,
                    "stored_bundle_error": self.stored_bundle_error,
                })),
            })),
            Request::Agents => {
                let counters = self
                    .dataplane
                    .maps()
                    .counters_batch()
                    .map_err(|e| error_chain(&e))?;
                let current = self
                    .current
                    .as_ref()
                    .ok_or("no policy of this daemon is enforcing yet")?;
                let last = current
                    .policy
                    .agents()
                    .iter()
                    .map(|a| a.id)
                    .max()
                    .unwrap_or(0);
                let breakers = guards::breakers_upto(self.dataplane.maps(), last)
                    .map_err(|e| error_chain(&e))?;
                Ok(Value::Array(
                    current
                        .policy
                        .agents()
                        .iter()
                        .map(|a| {
                            let c = counters.get(a.id as usize).copied().unwrap_or_default();
                            let (passed, dropped) = Reason::ALL.iter().fold((0, 0), |(p, d), r| {
                                if r.is_drop() {
                                    (p, d + c[*r as usize].packets)
                                } else {
                                    (p + c[*r as usize].packets, d)
                                }
                            });
                            json!({
                                "id": a.id,
                                "name": a.name,
                                "mode": a.mode,
                                "override": self.status.overrides.get(&a.id),
                                "profile": self.instances.get(&a.name).map(|i| &i.profile),
                                "interfaces": a.interfaces,
                                "pending_interfaces": self.pending_of(a),
                                "prefixes": a.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
                                "egress_rules": a.egress.len(),
                                "passed_packets": passed,
                                "dropped_packets": dropped,
                                "breaker": breakers.get(a.id as usize).copied().flatten().map(|b| b.name()),
                            })
                        })
                        .collect(),
                ))
            }
            Request::Agent { agent } => {
                let a = self.find_agent(&agent)?.clone();
                let counters = self
                    .dataplane
                    .maps()
                    .agent_counters(a.id)
                    .map_err(|e| error_chain(&e))?;
                let maps = self.dataplane.maps();
                let guard_state = maps.guard_state(a.id).map_err(|e| error_chain(&e))?;
                let guard_policy = maps.guard_policy(a.id).map_err(|e| error_chain(&e))?;
                let guards = guards::guards_json(
                    &guard_policy,
                    &guard_state,
                    guards::now_units(),
                    &audit::WallClock::sample(),
                    guards::unix_secs(),
                );
                let reasons: BTreeMap<&str, Value> = Reason::ALL
                    .iter()
                    .filter(|r| counters[**r as usize].packets > 0)
                    .map(|r| {
                        let c = counters[*r as usize];
                        (r.name(), json!({"packets": c.packets, "bytes": c.bytes}))
                    })
                    .collect();
                Ok(json!({
                    "id": a.id,
                    "name": a.name,
                    "mode": a.mode,
                    "override": self.status.overrides.get(&a.id),
                    "profile": self.instances.get(&a.name).map(|i| &i.profile),
                    "interfaces": a.interfaces,
                    "pending_interfaces": self.pending_of(&a),
                    "prefixes": a.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "egress_default": format!("{:?}", a.egress_default).to_lowercase(),
                    "rate": {
                        "packets_per_sec": a.rate.packets.map(|l| l.per_sec),
                        "packets_burst": a.rate.packets.map(|l| l.burst),
                        "bytes_per_sec": a.rate.bytes.map(|l| l.per_sec),
                        "bytes_burst": a.rate.bytes.map(|l| l.burst),
                    },
                    "egress": a.egress.iter().map(|r| json!({
                        "action": format!("{:?}", r.action).to_lowercase(),
                        "to": r.to.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "proto": r.proto.name(),
                        // ICMP has no ports (and a policy may not name any).
                        "ports": (r.proto != policy::Proto::Icmp).then(|| r.ports.to_string()),
                    })).collect::<Vec<_>>(),
                    "counters": reasons,
                    "guards": guards,
                }))
            }
            Request::Stats => {
                let maps = self.dataplane.maps();
                let mut agents =
                    stats::collect(maps, &self.status.agents).map_err(|e| error_chain(&e))?;
                let last = agents.iter().map(|a| a.id).max().unwrap_or(0);
                let breakers = guards::breakers_upto(maps, last).map_err(|e| error_chain(&e))?;
                for a in &mut agents {
                    a.breaker = breakers
                        .get(a.id as usize)
                        .copied()
                        .flatten()
                        .map(|b| b.name().to_string());
                }
                Ok(json!({"generation": self.status.generation, "agents": agents}))
            }
            Request::PolicyShow => {
                let current = self
                    .current
                    .as_ref()
                    .ok_or("no policy of this daemon is enforcing yet")?;
                Ok(json!({
                    "origin": current.origin,
                    "generation": self.status.generation,
                    "digest": self.status.digest,
                    "overrides": self.status.overrides,
                    "text": current.text,
                }))
            }
            Request::PolicyDiff { text, origin } => {
                let candidate = policy::parse(&origin, &text).map_err(|e| error_chain(&e))?;
                let current = self
                    .current
                    .as_ref()
                    .ok_or("no policy of this daemon is enforcing yet")?;
                // The enforcing policy carries the runtime mode overrides; the file does
                // not. Compared as the file says, an override is no change of the file's
                // (it showed as a changed agent with an empty diff): listed apart instead.
                let file =
                    policy::parse(&current.origin, &current.text).map_err(|e| error_chain(&e))?;
                let mut diff = policy_diff(&file, &current.text, &candidate, &text);
                diff["overrides"] = self
                    .status
                    .overrides
                    .iter()
                    .map(|(id, mode)| {
                        let name = file.agents().iter().find(|a| a.id == *id).map(|a| &a.name);
                        json!({"id": id, "name": name, "mode": mode})
                    })
                    .collect();
                Ok(diff)
            }
            Request::PolicyApply { text, origin } => {
                if let Some(cp) = &self.config.control_plane {
                    return Err(format!(
                        "the policy of this node is managed by the control plane at {}: change it there",
                        cp.url
                    ));
                }
                // The policy file first, so what enforces is what a SIGHUP or a restart
                // reads; if the kernel then refuses the policy, the file is put back.
                let path = self.config.policy.clone();
                let previous = fs::read(&path).ok();
                write_atomic(&path, text.as_bytes()).map_err(|e| {
                    format!(
                        "not applied: the policy file cannot be written ({}); under the systemd unit it must be below ReadWritePaths=",
                        error_chain(&e)
                    )
                })?;
                match self.apply_text(&origin, &text) {
                    // The interfaces not on this host, so the CLI need not compile the
                    // policy again to name them.
                    Ok(generation) => Ok(json!({
                        "generation": generation,
                        "pending_interfaces": self.current.as_ref().map(|c| &c.compiled.pending),
                    })),
                    Err(message) => {
                        let restored = match previous {
                            Some(bytes) => write_atomic(&path, &bytes),
                            None => fs::remove_file(&path).map_err(|source| DaemonError::State {
                                path: path.clone(),
                                source,
                            }),
                        };
                        if let Err(e) = restored {
                            tracing::error!(error = %error_chain(&e), "putting the previous policy file back");
                        }
                        Err(message)
                    }
                }
            }
            Request::Mode { agent, mode } => self.set_override(&agent, Some(mode)),
            Request::AgentRemove { agent } => self.remove_instance(&agent),
            Request::AgentAdd { .. } => Err("agent add is answered by handle".into()),
            Request::ModeClear { agent } => self.set_override(&agent, None),
            Request::BreakerReset { agent } => self.reset_breaker(&agent),
            Request::AuditTail { lines } => {
                let lines =
                    audit::tail(&self.config.audit_log, lines).map_err(|e| error_chain(&e))?;
                Ok(json!({"file": self.config.audit_log, "lines": lines}))
            }
        }
    }
}

use enforcer_common::Reason;

/// What changed between two policies: agents added, removed and changed, and a line diff.
pub fn policy_diff(old: &Policy, old_text: &str, new: &Policy, new_text: &str) -> Value {
    let by_id = |p: &Policy| -> BTreeMap<u32, policy::Agent> {
        p.agents().iter().map(|a| (a.id, a.clone())).collect()
    };
    let (a, b) = (by_id(old), by_id(new));
    let added: Vec<_> = b
        .keys()
        .filter(|id| !a.contains_key(id))
        .map(|id| json!({"id": id, "name": b[id].name}))
        .collect();
    let removed: Vec<_> = a
        .keys()
        .filter(|id| !b.contains_key(id))
        .map(|id| json!({"id": id, "name": a[id].name}))
        .collect();
    let changed: Vec<_> = a
        .keys()
        .filter(|id| b.get(id).is_some_and(|n| *n != a[id]))
        .map(|id| json!({"id": id, "name": b[id].name}))
        .collect();
    let unified = similar::TextDiff::from_lines(old_text, new_text)
        .unified_diff()
        .header("enforcing", "candidate")
        .to_string();
    json!({
        "agents_added": added,
        "agents_removed": removed,
        "agents_changed": changed,
        "unknown_traffic_changed": old.unknown() != new.unknown(),
        "diff": unified,
    })
}

/// Logs a failed sd_notify: systemd would then time the start out, which the log explains.
fn warn_notify(result: Result<(), notify::NotifyError>) {
    if let Err(error) = result {
        tracing::warn!(error = %error_chain(&error), "notifying systemd");
    }
}

impl Status {
    /// One line for systemd's STATUS=.
    fn summary(&self) -> String {
        let mut line = format!(
            "enforcing policy generation {} ({} agents) on {} interfaces",
            self.generation,
            self.agents.len(),
            self.interfaces.len()
        );
        if let Some(error) = &self.last_error {
            line.push_str(&format!("; last policy rejected: {error}"));
        }
        line
    }
}

/// The stop signal and task of a running DNS resolver.
type DnsTask = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// Starts the agents' DNS resolver once the policy enforces: binds its addresses (an error
/// stops start-up), lets agents with names reach them through the data plane, and follows
/// every policy the daemon applies.
fn start_dns(daemon: &mut Daemon) -> Result<Option<DnsTask>, DaemonError> {
    let Some(config) = daemon.config.dns.clone() else {
        // No resolver: agents with names get no DNS at all (and none a previous run allowed).
        daemon.dataplane.maps().set_resolvers(&[])?;
        return Ok(None);
    };
    let bound = crate::dns::bind(&config)?;
    daemon.dataplane.maps().set_resolvers(&config.listen)?;
    // The resolver writes learned addresses through its own handle on the pinned maps.
    let sink = KernelMaps::from_pins(&daemon.config.bpffs)?;
    let metrics = crate::dns::DnsMetrics::default();
    daemon
        .info
        .send_modify(|info| info.dns = Some(metrics.clone()));
    let resolver = Arc::new(crate::dns::Resolver::new(
        config.clone(),
        sink,
        daemon.inspect_policy.subscribe(),
        (daemon.user_audit.clone(), daemon.config.audit_rate),
        metrics,
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(crate::dns::run(bound, resolver, async move {
        let _ = stopped.await;
    }));
    tracing::info!(listen = ?config.listen, upstreams = ?config.upstreams, "DNS resolver serving");
    Ok(Some((stop, task)))
}

/// Opens the audit log where the chain head saved in the state directory says it ended
/// (see [`audit::head`]); what opening finds (a torn tail, a cut one, an unreadable head)
/// becomes the first records the writer appends.
fn open_audit(config: &Config) -> Result<Writer, DaemonError> {
    let head_file = config.state_dir.join(audit::head::FILE_NAME);
    let mut notices = Vec::new();
    let head = match Head::load(&head_file) {
        Ok(head) => head.filter(|h| {
            let ours = h.log == config.audit_log;
            if !ours {
                tracing::info!(head = %head_file.display(), log = %h.log.display(), "the saved audit chain head is of another log file; starting from this one's end");
            }
            ours
        }),
        Err(e) => {
            let detail = format!(
                "{}; the log's tail cannot be checked against it",
                error_chain(&e)
            );
            tracing::error!("{detail}");
            notices.push(NoticeRecord::new("chain_head_unreadable", 0, detail));
            None
        }
    };
    let (log, found) =
        AuditLog::open_at(&config.audit_log, head.as_ref()).map_err(|e| DaemonError::Audit {
            path: config.audit_log.clone(),
            source: e,
        })?;
    notices.extend(found);
    Ok(
        Writer::new(log, notices, Some(head_file), SharedHealth::default())
            .with_budget(config.audit_budget),
    )
}

/// Raises the soft descriptor limit to the hard one (systemd gives 1024 of 524288): the
/// soft limit is a guard for programs that use `select(2)`, which this one does not, and
/// each inspected connection holds two descriptors.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                tracing::debug!(
                    from = soft,
                    to = limit.rlim_max,
                    "raised the descriptor limit"
                );
            }
        }
    }
}

/// Whether `dir` is on a tmpfs (`/run`, `/tmp` on most systems): emptied at every boot.
fn on_tmpfs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct it is given; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// Order matters: signal handlers first (a SIGHUP that arrives during start-up is queued,
/// not fatal), then the API socket (a client that connects early waits in the backlog),
/// then the policy and the attachments, and only then READY=1 for systemd.
pub fn run(config: Config) -> Result<(), DaemonError> {
    for dir in [&config.state_dir, &config.runtime_dir] {
        fs::create_dir_all(dir).map_err(|source| DaemonError::State {
            path: dir.clone(),
            source,
        })?;
    }
    if on_tmpfs(&config.state_dir) {
        tracing::warn!(
            state_dir = %config.state_dir.display(),
            "state_dir is on tmpfs: the control plane's last bundle and the mode overrides \
             will not survive a reboot (the default is /var/lib/enforcer)"
        );
    }
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Runtime)?;
    // SIGUSR1 only reopens the audit log (logrotate's postrotate); SIGHUP does that too.
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Runtime)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let admin = api::bind(&config.socket, config.socket_group.as_deref(), 0o660)?;
    let read_mode = if config.read_socket_group.is_some() {
        0o660
    } else {
        0o666
    };
    let read = api::bind(
        &config.read_socket,
        config.read_socket_group.as_deref(),
        read_mode,
    )?;
    tokio::spawn(api::serve(
        admin,
        Access::Admin,
        config.api,
        calls_tx.clone(),
    ));
    tokio::spawn(api::serve(read, Access::ReadOnly, config.api, calls_tx));

    let overrides: BTreeMap<u32, Mode> =
        fs::read_to_string(config.state_dir.join("overrides.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
    // Fail-static: with a control plane, the last bundle this node applied (re-verified
    // with the configured keys) enforces before any connection is attempted. The rollback
    // floor stands whether or not the bundle still verifies.
    let mut held = sync::Held::default();
    let mut stored = None;
    let mut stored_bundle_error = None;
    let store = config
        .control_plane
        .as_ref()
        .map(|_| BundleStore::new(&config.state_dir));
    if let (Some(cp), Some(store)) = (&config.control_plane, &store) {
        let floor = store.floor().unwrap_or_else(|e| {
            tracing::error!(error = %error_chain(&e), "reading the rollback floor; taking the stored bundle's version");
            0
        });
        match cp
            .validate()
            .map_err(|e| error_chain(&e))
            .and_then(|verifier| store.load(&verifier).map_err(|e| error_chain(&e)))
        {
            Ok(Some(bundle)) => {
                held.version = bundle.version().max(floor);
                held.floor_only = floor > bundle.version();
                // A store written before the floor existed: the bundle's version seeds it.
                if let Err(e) = store.raise_floor(bundle.version()) {
                    tracing::error!(error = %error_chain(&e), "recording the rollback floor");
                }
                match String::from_utf8(bundle.policy().to_vec()) {
                    Ok(text) => stored = Some((bundle.origin(), text)),
                    Err(e) => {
                        tracing::error!(error = %e, "stored bundle is not UTF-8; ignoring it");
                        stored_bundle_error = Some(format!("not UTF-8: {e}"));
                        held.floor_only = true;
                    }
                }
            }
            Ok(None) => {
                held = sync::Held {
                    version: floor,
                    floor_only: floor > 0,
                };
            }
            Err(e) => {
                tracing::error!(error = %e, rollback_floor = floor, "stored bundle rejected; starting from the policy file, still refusing bundle versions up to the floor");
                stored_bundle_error = Some(e);
                held = sync::Held {
                    version: floor,
                    floor_only: floor > 0,
                };
            }
        }
    }
    // Validate before touching the kernel: a bad policy with nothing pinned is fatal, a
    // bad policy over a pinned one keeps the pinned one.
    let first = match stored {
        Some((origin, text)) => Ok((origin, text)),
        None => fs::read_to_string(&config.policy)
            .map(|text| (config.policy.display().to_string(), text))
            .map_err(|source| {
                LoadError::Policy(PolicyError::Read {
                    path: config.policy.clone(),
                    source,
                })
            }),
    }
    .and_then(|(origin, text)| {
        let mut policy = policy::parse(&origin, &text)?;
        for (id, mode) in &overrides {
            policy.set_mode(*id, *mode);
        }
        compile_policy(&policy, &origin, &config.limits)?;
        Ok((origin, text))
    });
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
        Err(e) => {
            let _ = fs::remove_file(&config.socket);
            return Err(e.into());
        }
    };

    // Instances made by an earlier run keep their ids (a pattern instance only while its
    // interface is the same one); a damaged table is set aside rather than fatal.
    let instances_path = config.state_dir.join("instances.json");
    let instances = Instances::load(&instances_path, config.limits.max_agents).unwrap_or_else(|e| {
        tracing::error!(error = %error_chain(&e), "reading the agent instance table; starting with none (added instances must be added again)");
        Instances::new(config.limits.max_agents)
    });
    // A GUARDS map that no pin kept (a reboot, `stop --detach`) starts empty: the quota use
    // saved before it goes back in, below, before anything is attached.
    let guards_fresh = !config
        .bpffs
        .join("maps")
        .join(enforcer_common::maps::GUARDS)
        .exists();
    let mut dataplane = Dataplane::load(&config.bpffs, &config.limits)?;
    // Quota windows are wall-clock hours and days: the offset before the first packet.
    dataplane.maps().set_guard_config(guards::guard_config())?;
    if guards_fresh {
        restore_quotas(&config, &instances, first.as_ref(), dataplane.maps());
    }
    let (info, info_rx) = watch::channel(DaemonInfo::default());
    let guard_transitions = guards::GuardTransitions::default();
    info.send_modify(|i| i.guard_transitions = guard_transitions.clone());
    // The audit trail: the kernel's budget, then the reader of the ring into the log.
    dataplane
        .maps()
        .set_audit_config(config.audit_rate.config())?;
    let ring = dataplane.take_audit_ring()?;
    let writer = open_audit(&config)?;
    let audit_health = writer.health().clone();
    info.send_modify(|i| i.audit = Some(audit_health.clone()));
    let (audit_ctx, audit_rx) =
        watch::channel(AuditContext::new(pinned_generation, "", BTreeMap::new()));
    let (audit_stop, audit_stopped) = tokio::sync::oneshot::channel::<()>();
    let (user_audit, user_audit_rx) = UserAudit::channel();
    let (audit_reopen, audit_reopen_rx) = mpsc::channel::<()>(1);
    let audit_task = tokio::spawn(audit::run(
        ring,
        writer,
        audit_rx,
        user_audit_rx,
        audit_reopen_rx,
        audit::GuardAudit {
            transitions: guard_transitions,
            maps: KernelMaps::from_pins(&config.bpffs).ok(),
        },
        async move {
            let _ = audit_stopped.await;
        },
    ));
    // Interface changes, subscribed before the first attach so none is missed between.
    let (links_tx, mut links) = mpsc::channel::<LinkEvent>(256);
    if let Err(e) = netlink::watch_links(links_tx) {
        tracing::error!(error = %e, "cannot follow interface changes over rtnetlink: interfaces that appear later are not attached until a reload");
    }
    let mut daemon = Daemon {
        status: Status {
            policy: config.policy.clone(),
            generation: pinned_generation,
            overrides,
            ..Status::default()
        },
        config,
        dataplane,
        current: None,
        info,
        audit: audit_ctx,
        audit_health,
        user_audit,
        inspect_policy: watch::channel(None).0,
        store,
        held,
        stored_bundle_error,
        control_plane: None,
        reloads_ok: 0,
        reloads_rejected: 0,
        resolved: BTreeMap::new(),
        instances,
        links: agents::host_links(),
    };
    match first {
        Some((origin, text)) => {
            daemon.apply_text(&origin, &text).map_err(|message| {
                // Validated above, so only the kernel can refuse now.
                DaemonError::State {
                    path: daemon.config.bpffs.clone(),
                    source: io::Error::other(message),
                }
            })?;
        }
        None => {
            daemon.status.attempts = 1;
            daemon.status.last_error =
                Some("policy rejected at start-up; pinned policy enforcing".into());
            if let Some(previous) = Status::read(&daemon.config.runtime_dir) {
                daemon.status.agents = previous.agents;
                daemon.status.digest = previous.digest;
            }
            daemon.attach()?;
            daemon.status.write(&daemon.config.runtime_dir)?;
            daemon.publish();
        }
    }
    // The inspecting proxy, once the first policy says whom to inspect.
    if let Some(inspect) = daemon.config.inspect.clone() {
        let stats = Arc::new(crate::inspect::Stats::default());
        crate::inspect::proxy::spawn(
            inspect,
            daemon.user_audit.clone(),
            stats.clone(),
            daemon.inspect_policy.subscribe(),
        )
        .await?;
        daemon.info.send_modify(|info| info.inspect = Some(stats));
    }
    if let Some(addr) = daemon.config.metrics_listen {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| DaemonError::Metrics { addr, source })?;
        tokio::spawn(metrics::serve(
            listener,
            daemon.config.bpffs.clone(),
            info_rx,
        ));
    }
    let dns = start_dns(&mut daemon)?;
    // The policy stream: only now, after the last good policy enforces.
    let (updates_tx, mut updates) = mpsc::channel::<PolicyUpdate>(4);
    if let Some(cp) = daemon.config.control_plane.clone() {
        let (state_tx, state_rx) = watch::channel(ConnectionState::default());
        daemon.control_plane = Some(state_rx);
        tokio::spawn(async move {
            if let Err(e) = sync::run(cp, held, updates_tx, state_tx).await {
                tracing::error!(error = %sync::error_text(&e), "the control-plane client stopped");
            }
        });
    } else {
        drop(updates_tx);
    }
    // Ready: what waits on status.json (the demo, tests, scripts) may now rely on all of it.
    daemon.status.pid = std::process::id();
    daemon.status.pid_start = process_start(daemon.status.pid);
    daemon.status.write(&daemon.config.runtime_dir)?;
    warn_notify(notify::ready(&daemon.status.summary()));
    tracing::info!(
        interfaces = ?daemon.status.interfaces,
        socket = %daemon.config.socket.display(),
        "enforcing; SIGHUP reloads the policy, SIGTERM exits and leaves the pinned program enforcing"
    );
    let mut connection = daemon.control_plane.clone();
    // Every minute: the wall clock's offset again (a clock step moves the quota windows
    // within a minute) and the quota use saved for the next boot.
    let mut minute =
        tokio::time::interval_at(tokio::time::Instant::now() + GUARD_PERIOD, GUARD_PERIOD);
    minute.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = minute.tick() => daemon.guard_tick(),
            // Connection changes reach /metrics (and `status` reads the watch directly).
            Some(Ok(())) = async {
                match connection.as_mut() {
                    Some(watch) => Some(watch.changed().await),
                    None => std::future::pending().await,
                }
            } => daemon.publish(),
            _ = usr1.recv() => {
                let _ = audit_reopen.try_send(());
            }
            _ = hup.recv() => {
                let _ = audit_reopen.try_send(());
                if daemon.config.control_plane.is_some() {
                    tracing::info!("SIGHUP: the policy comes from the control plane; nothing to reload");
                } else {
                    tracing::info!("SIGHUP: reloading the policy");
                    warn_notify(notify::reloading());
                    let _ = daemon.reload_file();
                    warn_notify(notify::ready(&daemon.status.summary()));
                }
            }
            Some(event) = links.recv() => daemon.on_link(event),
            Some(update) = updates.recv() => {
                daemon.apply_bundle(update);
                daemon.publish();
            }
            Some(call) = calls.recv() => {
                let response = daemon.handle(call.request, call.peer);
                let _ = call.reply.send(response);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    warn_notify(notify::stopping());
    daemon.save_quotas();
    if let Some((stop, task)) = dns {
        let _ = stop.send(());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    if daemon
        .config
        .inspect
        .as_ref()
        .is_some_and(|i| i.transparent_port.is_some())
        && let Err(e) = crate::inspect::redirect::remove()
    {
        tracing::error!(error = %error_chain(&e), "removing the transparent redirect");
    }
    // Let the audit reader drain what the ring holds and sync the log.
    let _ = audit_stop.send(());
    match audit_task.await {
        Ok(Ok(summary)) => tracing::info!(records = summary.records, "audit log closed"),
        Ok(Err(e)) => tracing::error!(error = %error_chain(&e), "audit reader failed"),
        Err(e) => tracing::error!(error = %e, "audit reader panicked"),
    }
    tracing::info!("exiting; the pinned program keeps enforcing the last good policy");
    let _ = fs::remove_file(&daemon.config.socket);
    daemon.status.pid = 0;
    daemon.status.pid_start = None;
    daemon.status.write(&daemon.config.runtime_dir)
}

/// How often the daemon rewrites the wall clock's offset and saves the quota use.
const GUARD_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

/// Puts the quota use saved in `state_dir` back into a freshly created `GUARDS` map, for the
/// agents whose id has the same name in the policy about to be applied (static agents and
/// the instances kept from the last run). Breaker state is not saved (see [`guards`]).
fn restore_quotas(
    config: &Config,
    instances: &Instances,
    first: Option<&(String, String)>,
    maps: &mut KernelMaps,
) {
    let path = config.state_dir.join(guards::QUOTA_FILE);
    let saved = match guards::load_quotas(&path) {
        Ok(saved) if saved.is_empty() => return,
        Ok(saved) => saved,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "reading the saved quota use; quotas start from zero");
            return;
        }
    };
    let mut names: BTreeMap<u32, String> = first
        .and_then(|(origin, text)| policy::parse(origin, text).ok())
        .map(|p| agent_names(&p))
        .unwrap_or_default();
    names.extend(instances.iter().map(|i| (i.id, i.name())));
    match guards::restore_quotas(maps, &saved, &names) {
        Ok(n) => tracing::info!(agents = n, saved = saved.len(), "quota use restored"),
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "restoring the saved quota use; quotas start from zero")
        }
    }
}

/// Returns the heap an apply freed to the kernel. Parsing a policy builds a spanned TOML tree
/// of a few kilobytes per agent that is dropped once compiled, and glibc keeps freed memory
/// mapped: without this the daemon's RSS stayed at the parse's peak (about 500 MB after a
/// 100,000-agent apply, of which about 110 MB is live).
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only hands free heap pages back; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_start_reads_field_22_after_the_command_name() {
        let me = std::process::id();
        let started = process_start(me).expect("this process has a start time");
        assert!(started > 0);
        assert_eq!(
            process_start(me),
            Some(started),
            "a start time does not change"
        );
        let status = Status {
            pid: me,
            pid_start: Some(started),
            ..Status::default()
        };
        assert!(status.daemon_alive() && status.reused_pid().is_none());
        // The same pid with another start time: a later process, never the daemon.
        let reused = Status {
            pid_start: Some(started + 1),
            ..status.clone()
        };
        assert!(!reused.daemon_alive());
        assert!(
            reused
                .reused_pid()
                .is_some_and(|r| r.contains(&me.to_string()))
        );
    }
}
