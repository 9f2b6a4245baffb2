//! Loading the XDP program, pinning its maps and links, and writing compiled policies into
//! the maps: the thin layer under [`crate::dataplane::compile`].
//!
//! # Atomic apply
//! Policy maps hold two slots (see `enforcer_common`). [`apply`] clears the inactive slot,
//! writes the whole new policy there, and only then flips `STATE.active_slot`. The XDP
//! program reads the active slot once per packet and uses it for every lookup, so each
//! packet sees either the old policy or the new one, never a mix. A failed write leaves
//! the active slot, and so the running policy, untouched. Before the next apply reuses the
//! old slot, [`apply`] waits [`GRACE`] so packets still in flight on the old slot (XDP runs
//! to completion in microseconds, under RCU) have finished.
//!
//! # Audit maps
//! The program also reports denials through the ring buffer `AUDIT`, which the daemon's
//! reader ([`crate::node::audit::run`]) takes with [`Dataplane::take_audit_ring`]; the per-agent
//! suppressed and lost counts (in each agent's `COUNTERS` entry) are read through
//! [`KernelMaps`], and the
//! audit limiter's parameters set with [`KernelMaps::set_audit_config`].

pub mod compile;
mod incremental;
pub use incremental::SlotEntries;
pub mod stats;
pub mod table;
pub mod testrun;
pub mod verifier;

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray, ProgramArray,
        RingBuf, lpm_trie::Key,
    },
    programs::{
        LinkOrder, ProgramError, ProgramInfo, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkType, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::{XdpLink, XdpMode},
    },
    util::KernelVersion,
};
use enforcer_common::{
    AGENT_ACTIVE, AGENT_DST_LPM_V4, AGENT_DST_LPM_V6, AgentCounters, AgentPolicy, AuditConfig,
    AuditStats, Bucket, Clock, Counter, DstV4Key, DstV6Key, HostV4Key, HostV6Key, IfaceKey, LpmV4,
    LpmV6, NameEntry, NameV4Key, NameV6Key, OWNER_BITS, Reason, ResolverKey, RuleSet,
    SLOT_HAS_IFACES, SLOT_SRC_LPM_V4, SLOT_SRC_LPM_V6, SLOT_UNKNOWN_DROP, SlotConfig, SniKey,
    State, TABLE_DST_V4, TABLE_DST_V6, TABLE_SRC_V4, TABLE_SRC_V6, TIME_SHIFT, TableBucket,
    TableBucket1, TableBucket2, TableBucket3, TableConfig, TlsPorts, UNKNOWN_AGENT, dst_key_v4,
    dst_key_v6,
    guard::{GuardConfig, GuardPolicy, GuardState, MAX_SHARED_GROUPS, SharedBucket, SharedPolicy},
    maps, owner, owner_word, programs, src_key_v4, src_key_v6,
};
use thiserror::Error;

use crate::{
    dataplane::{
        compile::{Compiled, Limits, name_rule_set},
        incremental::RuleIndex,
        table::Table,
        verifier::{VerifierError, VerifierStats},
    },
    node::{
        audit::AuditRate,
        netlink::{self, XdpAttachMode},
    },
    policy::{PortRange, Proto},
};

/// The XDP object built by `build.rs`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-ebpf"));

/// How long [`apply`] waits after a flip before the old slot may be rewritten.
pub const GRACE: Duration = Duration::from_millis(20);

/// Errors reading or writing the policy maps.
#[derive(Debug, Error)]
pub enum MapsError {
    /// A map operation failed.
    #[error("{op} map {map}")]
    Map {
        /// What was being done ("writing", "clearing", ...).
        op: &'static str,
        /// The map's name.
        map: &'static str,
        /// The underlying error.
        #[source]
        source: MapError,
    },
    /// A batch lookup failed.
    #[error("reading map {map} in batches (Linux 5.6+)")]
    Batch {
        /// The map's name.
        map: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A batch update failed.
    #[error("writing map {map} in batches (Linux 5.6+)")]
    BatchWrite {
        /// The map's name.
        map: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A learned address would need more rules than an entry holds.
    #[error(
        "a learned address needs {count} distinct protocol/port rules, more than an entry holds"
    )]
    TooManyNameRules {
        /// Rules it would need.
        count: usize,
    },
    /// A fake map refused a write (tests).
    #[error("injected failure writing {map}")]
    Injected {
        /// The map the fake pretended to fail on.
        map: &'static str,
    },
}

/// Errors applying a compiled policy.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// Reading the enforcement state failed.
    #[error("reading the enforcement state")]
    State(#[source] MapsError),
    /// Writing the new policy into the inactive slot failed; the running policy is intact.
    #[error("writing the new policy into slot {slot} (the running policy is unchanged)")]
    Write {
        /// The inactive slot being written.
        slot: u32,
        /// The underlying error.
        #[source]
        source: MapsError,
    },
    /// Flipping the active slot failed; the running policy is intact.
    #[error("activating slot {slot} (the running policy is unchanged)")]
    Flip {
        /// The slot that should have become active.
        slot: u32,
        /// The underlying error.
        #[source]
        source: MapsError,
    },
}

/// The policy maps as [`apply`] needs them. Implemented by the kernel maps and by an
/// in-memory fake, so the apply protocol is tested without root.
pub trait PolicyMaps {
    /// Reads `STATE`.
    fn state(&self) -> Result<State, MapsError>;
    /// Writes `STATE`: the single write that switches every packet to another slot.
    fn set_state(&mut self, state: State) -> Result<(), MapsError>;
    /// Removes every entry of `slot`.
    fn clear_slot(&mut self, slot: u32) -> Result<(), MapsError>;
    /// Writes every entry of `compiled` into `slot`.
    fn write_slot(&mut self, slot: u32, compiled: &Compiled) -> Result<(), MapsError>;
    /// Rewrites `slot` from `from`, which it holds, to `to`, touching only the entries that
    /// differ. `Ok(false)`, before any write, when it cannot be done in place; then [`apply`]
    /// clears and writes the slot whole.
    fn update_slot(&mut self, slot: u32, from: &Compiled, to: &Compiled)
    -> Result<bool, MapsError>;
}

/// What this process wrote into each slot, so the next apply to it writes only the
/// difference, and when the active slot last changed.
#[derive(Debug, Default)]
pub struct Slots {
    /// Per slot, the policy written there and the generation it was written for.
    images: [Option<(Arc<Compiled>, u64)>; 2],
    /// The last flip this process made: its generation and time.
    flipped: Option<(u64, Instant)>,
    /// How the last apply wrote its slot.
    last_write: Option<SlotWrite>,
}

/// How an apply wrote the inactive slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotWrite {
    /// Cleared and written whole: the first applies of a process, or a table outgrown.
    Whole,
    /// Only the entries that differ from what the slot held.
    Changes,
}

impl Slots {
    /// How the last apply wrote its slot.
    pub fn last_write(&self) -> Option<SlotWrite> {
        self.last_write
    }
}

/// Applies `compiled` atomically (see the module docs) and returns the new generation.
///
/// The inactive slot holds the policy of two applies ago, or, after a failed apply or in a
/// new process, something this process does not know: a known slot gets only the entries
/// that differ ([`PolicyMaps::update_slot`]), an unknown one is cleared and written whole.
/// Either way the running policy is untouched until the flip. A flip made by another
/// process (the generation is not the one this process flipped to) makes both slots unknown.
pub fn apply(
    maps: &mut impl PolicyMaps,
    slots: &mut Slots,
    compiled: &Compiled,
) -> Result<u64, ApplyError> {
    let state = maps.state().map_err(ApplyError::State)?;
    let target = (state.active_slot ^ 1) & 1;
    match slots.flipped {
        Some((generation, at)) if generation == state.generation => {
            // Packets that began on the target slot before the flip may still read it.
            let since = at.elapsed();
            if since < GRACE {
                thread::sleep(GRACE - since);
            }
        }
        Some(_) => slots.images = [None, None],
        None => {}
    }
    let image = slots.images[target as usize].take();
    let mut how = SlotWrite::Whole;
    let written = (|| {
        if let Some((image, _)) = &image
            && maps.update_slot(target, image, compiled)?
        {
            how = SlotWrite::Changes;
            return Ok(());
        }
        maps.clear_slot(target)?;
        maps.write_slot(target, compiled)
    })();
    if let Err(source) = written {
        // Best effort: leave no half-written slot behind. The active slot is untouched
        // either way.
        let _ = maps.clear_slot(target);
        return Err(ApplyError::Write {
            slot: target,
            source,
        });
    }
    let next = State {
        active_slot: target,
        agent_stride: state.agent_stride,
        generation: state.generation + 1,
    };
    maps.set_state(next).map_err(|source| ApplyError::Flip {
        slot: target,
        source,
    })?;
    slots.flipped = Some((next.generation, Instant::now()));
    slots.last_write = Some(how);
    slots.images[target as usize] = Some((Arc::new(compiled.clone()), next.generation));
    Ok(next.generation)
}

/// Errors loading the program or attaching it.
#[derive(Debug, Error)]
pub enum DataplaneError {
    /// The pin path is on another file system than bpffs: every pin would fail.
    #[error("{path} is not a bpf filesystem (mount one: mount -t bpf bpf {path})")]
    NotBpffs {
        /// The configured pin path (or the directory it would be created in).
        path: PathBuf,
    },
    /// The pin directory could not be created.
    #[error("creating pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The object failed to load (verifier, missing bpffs, ...).
    #[error("loading the XDP object with maps pinned under {path}")]
    Load {
        /// The map pin directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program was missing or failed to load.
    #[error("loading program {name}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// The underlying error.
        #[source]
        source: ProgramError,
    },
    /// The kernel is older than [`MIN_KERNEL`].
    #[error(
        "Linux {release} is too old: the enforcer needs 5.18 or later (bpf_xdp_load_bytes, with \
         which the TLS server-name check reads packets)"
    )]
    KernelTooOld {
        /// `uname -r`.
        release: String,
    },
    /// The kernel's verifier refused a program.
    #[error(
        "the kernel's verifier rejected program {name} ({summary}); ENFORCER_LOG=debug prints its \
         whole log, `enforcer doctor` what each program costs where they load"
    )]
    Rejected {
        /// The program.
        name: &'static str,
        /// The error and the log's last lines.
        summary: String,
    },
    /// A map was missing from the object or had the wrong shape.
    #[error("opening map {name}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// The underlying error.
        #[source]
        source: MapError,
    },
    /// A map named in `enforcer_common::maps` is not in the object.
    #[error("map {name} is missing from the XDP object")]
    MissingMap {
        /// The map's name.
        name: &'static str,
    },
    /// Pinned maps were created for other limits than the configuration's.
    #[error(
        "pinned maps under {path} were created for max_agents = {pinned}, the configuration says {configured}; \
         run `enforcer stop --detach` (or remove the pins) to resize"
    )]
    LimitsMismatch {
        /// The map pin directory.
        path: PathBuf,
        /// max_agents the pins were created with.
        pinned: u32,
        /// max_agents from the configuration.
        configured: u32,
    },
    /// Reading or writing a map failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The tick clock could not be measured (see [`measure_clock`]).
    #[error("measuring the kernel's tick clock with program {program}")]
    Clock {
        /// The probe program.
        program: &'static str,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Attaching to an interface failed in every mode tried.
    #[error("attaching XDP to {interface}")]
    Attach {
        /// The interface.
        interface: String,
        /// The underlying error.
        #[source]
        source: ProgramError,
    },
    /// Pinned counters of another reason layout could not be removed.
    #[error("removing the pinned counters at {path}, made for another set of reasons")]
    ResetCounters {
        /// The pin.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The tail-called stages could not be put in place.
    #[error("{op} the program array of the pipeline's stages at {path}")]
    Stages {
        /// What was being done.
        op: &'static str,
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Verifying a copy of a program for its statistics failed.
    #[error(transparent)]
    Verifier(#[from] VerifierError),
    /// Pinning or replacing a link failed.
    #[error("{op} the XDP link of {interface} at {path}")]
    Link {
        /// What was being done.
        op: &'static str,
        /// The interface.
        interface: String,
        /// The pin path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// XDP attach mode requested by the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// The enforcer's hook on one interface, as the kernel reports it (`enforcer status`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hook {
    /// The interface.
    pub interface: String,
    /// `xdp` or `tc`.
    pub hook: &'static str,
    /// At XDP the attach mode (`native`, `generic`, `offload`, `multiple`, `none`); at tc
    /// `tcx` or `clsact`. `None` when the kernel could not be asked (see `problem`).
    pub mode: Option<&'static str>,
    /// The program the kernel runs there (0: none).
    pub program_id: u32,
    /// Whether that program is this daemon's `enforce`.
    pub ours: bool,
    /// Why the interface is not enforced as its pin says, if it is not.
    pub problem: Option<String>,
}

/// How an interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A pinned XDP link from an earlier run now runs this program (atomic, no gap).
    Replaced,
    /// Newly attached at XDP in native mode.
    Native,
    /// Newly attached at XDP in generic mode.
    Generic,
    /// Newly attached at tc ingress with a tcx link.
    Tcx,
    /// A pinned tcx link from an earlier run now runs this program.
    TcxReplaced,
    /// Newly attached at tc ingress as a clsact filter (before Linux 6.6).
    Clsact,
    /// The clsact filter an earlier run left now runs this program.
    ClsactReplaced,
}

/// Measures [`Clock`] for this boot with the `clock_probe` program.
///
/// A jiffy is the coarse clocks' resolution: `clock_getres(CLOCK_MONOTONIC_COARSE)` returns
/// the kernel's `TICK_NSEC`, and the kernel advances `jiffies` by one per `TICK_NSEC` of
/// CLOCK_MONOTONIC. The offset is taken where `jiffies` changes, from the last reading
/// before the change: the tick happened between the two readings, so the tick clock never
/// runs ahead of CLOCK_MONOTONIC and lags it by at most a tick (plus one probe run, a few
/// microseconds).
fn measure_clock(probe: &Xdp) -> Result<Clock, Box<dyn std::error::Error + Send + Sync>> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes the timespec it is given.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) } != 0 {
        return Err(Box::new(io::Error::last_os_error()));
    }
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    // HZ is at least 100 on every architecture Linux supports with XDP.
    if tick_ns == 0 || tick_ns > 10_000_000 {
        return Err(format!("CLOCK_MONOTONIC_COARSE has a resolution of {tick_ns} ns").into());
    }
    // (jiffies, CLOCK_MONOTONIC ns read before it) from one run of the program.
    let sample = || -> Result<(u64, u64), ProgramError> {
        let packet = [0u8; 64];
        let mut out = [0u8; 64];
        probe.test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        let word = |at: usize| {
            u64::from_le_bytes(
                out[at..at + 8]
                    .try_into()
                    .expect("8 bytes of a 64-byte buffer"),
            )
        };
        Ok((word(0), word(16)))
    };
    // The tick that advanced `jiffies` to its new value came after the previous sample read
    // the old value, so after that sample's clock reading taken *before* its `jiffies`
    // read: that reading is a lower bound of the tick's time, which keeps the tick clock
    // from ever running ahead. (A reading taken after the `jiffies` read is no bound: the
    // tick's interrupt can land between the two and last long.)
    //
    // The kernel advances `jiffies` in the tick's interrupt, which can come late (a busy or
    // virtual CPU; under an emulator by hundreds of microseconds). A late tick makes that
    // bound late too, and the tick clock would then run ahead by the delay whenever later
    // ticks come on time. So several ticks are watched and the earliest implied start of
    // tick `jiffies = 0` kept: one tick on time is enough.
    const TICKS: u32 = 5;
    let tick_units = tick_ns << TIME_SHIFT;
    let (mut jiffies, mut before_ns) = sample()?;
    // A few ticks; a second is far beyond them at any HZ.
    let deadline = before_ns + 1_000_000_000;
    let mut offset: Option<u64> = None;
    let mut seen = 0;
    while seen < TICKS {
        let (j, ns) = sample()?;
        if j != jiffies {
            let this = j
                .wrapping_mul(tick_units)
                .wrapping_sub(before_ns << TIME_SHIFT);
            // The largest offset is the earliest start: the tick clock that lags most.
            // Offsets of one boot differ by far less than half the u64 range, so their
            // wrapping difference orders them.
            offset = Some(offset.map_or(this, |o| {
                if (this.wrapping_sub(o) as i64) > 0 {
                    this
                } else {
                    o
                }
            }));
            seen += 1;
        }
        if ns > deadline {
            return Err(
                format!("jiffies advanced {seen} times in a second, from {jiffies}").into(),
            );
        }
        (jiffies, before_ns) = (j, ns);
    }
    Ok(Clock {
        tick_units,
        offset: offset.expect("TICKS > 0 ticks were seen"),
    })
}

/// Buckets per slot of a table for at most `keys` keys: room for one key per bucket (see
/// [`Table::build`]).
fn table_buckets(keys: u32) -> u32 {
    keys.next_power_of_two().max(2)
}

/// Distinct rule sets per slot the destination tables can point to in `RULES`. Prefixes
/// share rule sets (every prefix of one allow rule has the same set), so this is far below
/// the number of prefixes; the destinations of any further sets go to the hash maps, which
/// hold their rules themselves.
fn rule_sets(limits: &Limits) -> u32 {
    limits.max_destination_prefixes.clamp(1, 16_384)
}

/// The oldest kernel the programs load on: the TLS server-name check reads packet bytes
/// with `bpf_xdp_load_bytes` (Linux 5.18); everything else is older (64-bit `BPF_CMPXCHG`
/// 5.12, the ring buffer 5.8, global functions 5.6).
pub const MIN_KERNEL: (u32, u32) = (5, 18);

/// Whether a kernel release (`uname -r`) is at least [`MIN_KERNEL`]; `None` when it does not
/// start with `MAJOR.MINOR` (then loading decides).
pub fn kernel_supported(release: &str) -> Option<bool> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= MIN_KERNEL)
}

/// A program the kernel refused, as one line: the verifier's last words, its full log at
/// debug level (`ENFORCER_LOG=debug`).
fn rejected(name: &'static str, source: ProgramError) -> DataplaneError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            tracing::debug!(program = name, "verifier log:\n{log}");
            // The reason is the last lines before the statistics the kernel appends (stack
            // depth, processed instructions), which say nothing about what was refused.
            let last: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                        && !l.starts_with("processed ")
                })
                .collect();
            let tail = last[last.len().saturating_sub(2)..].join("; ");
            DataplaneError::Rejected {
                name,
                summary: if tail.is_empty() {
                    io_error.to_string()
                } else {
                    format!("{io_error}: {tail}")
                },
            }
        }
        source => DataplaneError::Program { name, source },
    }
}

/// Every program of the object, as [`Dataplane::load`] loads them.
const XDP_PROGRAMS: [&str; 7] = [
    programs::ENFORCE,
    programs::ENFORCE_NAMES,
    programs::ENFORCE_FINISH,
    programs::ENFORCE_GUARD,
    programs::ENFORCE_REJECT,
    programs::PASS_FLOOR,
    programs::CLOCK_PROBE,
];

/// The tc (`sched_cls`) programs of the object: the same pipeline for socket buffers.
const TC_PROGRAMS: [&str; 6] = [
    programs::ENFORCE_TC,
    programs::ENFORCE_DECIDE_TC,
    programs::ENFORCE_NAMES_TC,
    programs::ENFORCE_FINISH_TC,
    programs::ENFORCE_GUARD_TC,
    programs::ENFORCE_REJECT_TC,
];

/// The verifier's budget of processed instructions for one program load
/// (`BPF_COMPLEXITY_LIMIT_INSNS`, Linux 5.2 and later).
pub const VERIFIER_INSN_LIMIT: u32 = 1_000_000;

/// What the kernel's verifier spent on one loaded program.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VerifierCost {
    /// The program's name (`enforcer_common::programs`).
    pub program: &'static str,
    /// Instructions the verifier processed for it, global functions included
    /// (`bpf_prog_info.verified_insns`, Linux 5.16); `None` on an older kernel.
    pub processed: Option<u32>,
    /// What the verifier log says when a copy is verified again (peak states, stack
    /// depth; see [`crate::dataplane::verifier`]).
    pub stats: VerifierStats,
}

impl VerifierCost {
    /// The share of [`VERIFIER_INSN_LIMIT`] used, in percent.
    pub fn percent(&self) -> Option<f64> {
        self.processed
            .map(|n| f64::from(n) * 100.0 / f64::from(VERIFIER_INSN_LIMIT))
    }
}

/// The verifier's cost of every program as a table for people (`enforcer doctor`, the
/// tests on every kernel they run on).
pub fn verifier_table(release: &str, costs: &[VerifierCost]) -> String {
    let mut out = format!(
        "verifier cost on Linux {release} (processed instructions: the limit is {VERIFIER_INSN_LIMIT} per program;\n\
         peak states: the most held at once; stack: bytes per function, main first, 512 along a call chain)\n\
         {:<16} {:>10} {:>9} {:>12} {:>12}  {}\n",
        "program", "processed", "of limit", "peak states", "total states", "stack"
    );
    for c in costs {
        let (n, pct) = match (c.processed, c.percent()) {
            (Some(n), Some(p)) => (n.to_string(), format!("{p:.1}%")),
            _ => ("-".to_owned(), "needs 5.16".to_owned()),
        };
        let stack = c
            .stats
            .stack_depth
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join("+");
        out.push_str(&format!(
            "{:<16} {n:>10} {pct:>9} {:>12} {:>12}  {stack}\n",
            c.program, c.stats.peak_states, c.stats.total_states
        ));
    }
    out
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    bpffs: PathBuf,
    limits: Limits,
    kernel: KernelMaps,
    /// This load's `STAGES` and `STAGES_TC` pins (see [`Dataplane::load`]).
    stages_pins: Vec<PathBuf>,
    /// Whether [`Dataplane::attach`] attached this load's program anywhere: then its
    /// stages pin outlives it, as the pinned links do.
    attached: bool,
    /// Whether the tc programs are loaded (see [`Dataplane::load_tc`]).
    tc_loaded: bool,
    /// What this load wrote into each policy slot.
    slots: Slots,
}

impl Dataplane {
    /// Loads the XDP object with its maps pinned under `bpffs/maps` (reusing pins left by
    /// an earlier run, so policy, buckets and counters survive restarts).
    pub fn load(bpffs: &Path, limits: &Limits) -> Result<Self, DataplaneError> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let release = release.trim();
        if kernel_supported(release) == Some(false) {
            return Err(DataplaneError::KernelTooOld {
                release: release.to_owned(),
            });
        }
        check_bpffs(bpffs)?;
        let maps_dir = bpffs.join("maps");
        for dir in [&maps_dir, &bpffs.join("links")] {
            fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let stride = limits.max_agents + 1;
        // A pinned ring keeps its size: aya maps the ring with the size the loader was
        // given, not the pinned map's, so the two must agree. Resizing needs the pins gone.
        let mut limits = *limits;
        let ring_pin = maps_dir.join(maps::AUDIT);
        if ring_pin.exists() {
            let pinned = MapInfo::from_pin(&ring_pin)
                .map_err(|source| DataplaneError::Map {
                    name: maps::AUDIT,
                    source,
                })?
                .max_entries();
            if pinned != limits.audit_ring_bytes {
                tracing::warn!(
                    pinned,
                    configured = limits.audit_ring_bytes,
                    "the pinned audit ring keeps its size; run `enforcer stop --detach` (or remove the pins) to resize"
                );
                limits.audit_ring_bytes = pinned;
            }
        }
        reset_counters_of_another_layout(&maps_dir, stride)?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(maps::AGENTS, 2 * stride)
            .map_max_entries(maps::BUCKETS, stride)
            .map_max_entries(maps::COUNTERS, stride)
            .map_max_entries(maps::IFACES, 2 * limits.max_interfaces)
            .map_max_entries(maps::SRC_HOST_V4, 2 * limits.max_source_prefixes)
            .map_max_entries(maps::SRC_HOST_V6, 2 * limits.max_source_prefixes)
            .map_max_entries(
                maps::SRC_TABLE_V4,
                2 * table_buckets(limits.max_source_prefixes),
            )
            .map_max_entries(
                maps::SRC_TABLE_V6,
                2 * table_buckets(limits.max_source_prefixes),
            )
            .map_max_entries(
                maps::DST_TABLE_V4,
                2 * table_buckets(limits.max_destination_prefixes),
            )
            .map_max_entries(
                maps::DST_TABLE_V6,
                2 * table_buckets(limits.max_destination_prefixes),
            )
            .map_max_entries(maps::RULES, 2 * (rule_sets(&limits) + 1))
            .map_max_entries(maps::SRC_V4, 2 * limits.max_source_prefixes)
            .map_max_entries(maps::SRC_V6, 2 * limits.max_source_prefixes)
            .map_max_entries(maps::DST_V4, 2 * limits.max_destination_prefixes)
            .map_max_entries(maps::DST_V6, 2 * limits.max_destination_prefixes)
            .map_max_entries(maps::DST_HASH_V4, 2 * limits.max_destination_prefixes)
            .map_max_entries(maps::DST_HASH_V6, 2 * limits.max_destination_prefixes)
            .map_max_entries(maps::AUDIT, limits.audit_ring_bytes)
            .map_max_entries(maps::AUDIT_LIMITS, stride)
            .map_max_entries(maps::GUARD_POLICY, 2 * stride)
            .map_max_entries(maps::GUARDS, stride)
            .map_max_entries(maps::REJECT_LIMITS, stride);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load {
                path: maps_dir.clone(),
                source: Box::new(source),
            })?;
        for name in XDP_PROGRAMS {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Program {
                    name,
                    source: ProgramError::NotLoaded,
                })?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            program.load().map_err(|source| rejected(name, source))?;
        }
        // The tc programs load on first use ([`Dataplane::load_tc`]): a server with NICs only
        // never pays for verifying them.
        // The limiters' tick clock, measured for this boot before any packet can need it.
        let clock = {
            let name = programs::CLOCK_PROBE;
            let probe: &Xdp = ebpf.program(name).and_then(|p| p.try_into().ok()).ok_or(
                DataplaneError::Program {
                    name,
                    source: ProgramError::NotLoaded,
                },
            )?;
            measure_clock(probe).map_err(|source| DataplaneError::Clock {
                program: name,
                source,
            })?
        };
        let name = maps::CLOCK;
        let mut clock_map: Array<_, Clock> = ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap { name })?
            .try_into()
            .map_err(|source| DataplaneError::Map { name, source })?;
        clock_map
            .set(0, clock, 0)
            .map_err(err("writing", maps::CLOCK))?;
        let stages_pins = vec![install_stages(
            &mut ebpf,
            bpffs,
            programs::ENFORCE,
            maps::STAGES,
            &programs::STAGES,
        )?];
        let mut kernel = KernelMaps::take(&mut ebpf, &limits)?;
        let state = kernel.state()?;
        if state.agent_stride == 0 {
            // Fresh pins: record the stride the program indexes AGENTS with.
            kernel.set_state(State {
                agent_stride: stride,
                ..state
            })?;
        } else if state.agent_stride != stride {
            return Err(DataplaneError::LimitsMismatch {
                path: maps_dir,
                pinned: state.agent_stride - 1,
                configured: limits.max_agents,
            });
        }
        if kernel.audit_config()? == AuditConfig::default() {
            // Fresh pins: the default audit budget until the daemon sets its own.
            kernel.set_audit_config(AuditRate::default().config())?;
        }
        Ok(Dataplane {
            ebpf,
            bpffs: bpffs.to_path_buf(),
            limits,
            kernel,
            stages_pins,
            attached: false,
            tc_loaded: false,
            slots: Slots::default(),
        })
    }

    /// Takes the audit ring buffer out of the loaded object, for [`crate::node::audit::run`]. A
    /// ring has one reader: a second call fails with [`DataplaneError::MissingMap`].
    pub fn take_audit_ring(&mut self) -> Result<RingBuf<MapData>, DataplaneError> {
        let name = maps::AUDIT;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DataplaneError::MissingMap { name })?;
        RingBuf::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// The limits the maps were sized for (`audit_ring_bytes` is the pinned ring's size
    /// when one was reused).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The policy maps, for [`apply`] and for reading state.
    pub fn maps(&mut self) -> &mut KernelMaps {
        &mut self.kernel
    }

    /// Applies a compiled policy atomically; returns the new generation.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<u64, ApplyError> {
        apply(&mut self.kernel, &mut self.slots, compiled)
    }

    /// How the last apply wrote its slot.
    pub fn last_write(&self) -> Option<SlotWrite> {
        self.slots.last_write()
    }

    /// Forgets what the slots hold, so the next two applies write whole, as after a restart
    /// (the churn tests compare both ways).
    pub fn forget_slots(&mut self) {
        self.slots = Slots::default();
    }

    /// What the verifier spent on each program of this load (the tc ones once
    /// [`Dataplane::load_tc`] ran).
    pub fn verifier_costs(&self) -> Result<Vec<VerifierCost>, DataplaneError> {
        let tc: &[&'static str] = if self.tc_loaded { &TC_PROGRAMS } else { &[] };
        let infos = XDP_PROGRAMS
            .iter()
            .chain(tc)
            .map(|&name| {
                let program = self.ebpf.program(name).ok_or(DataplaneError::Program {
                    name,
                    source: ProgramError::NotLoaded,
                })?;
                let info = program
                    .info()
                    .map_err(|source| DataplaneError::Program { name, source })?;
                Ok((name, info))
            })
            .collect::<Result<Vec<_>, DataplaneError>>()?;
        let stats = verifier::stats(EBPF_OBJECT, &infos)?;
        Ok(infos
            .into_iter()
            .zip(stats)
            .map(|((name, info), stats)| VerifierCost {
                program: name,
                processed: info.verified_instruction_count(),
                stats,
            })
            .collect())
    }

    /// A loaded XDP program by name (see `enforcer_common::programs`), e.g. for test runs.
    pub fn program(&self, name: &str) -> Option<&Xdp> {
        self.ebpf.program(name)?.try_into().ok()
    }

    /// A loaded tc program by name (see `enforcer_common::programs`), e.g. for test runs;
    /// `None` until [`Dataplane::load_tc`].
    pub fn classifier(&self, name: &str) -> Option<&SchedClassifier> {
        if !self.tc_loaded {
            return None;
        }
        self.ebpf.program(name)?.try_into().ok()
    }

    /// Loads the tc programs and fills and pins their stage array, once: attaching at tc
    /// does it, so a daemon with only NICs never verifies them (they cost as much
    /// verification as the XDP ones, which in an emulated VM is most of a start-up).
    pub fn load_tc(&mut self) -> Result<(), DataplaneError> {
        if self.tc_loaded {
            return Ok(());
        }
        for name in TC_PROGRAMS {
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or(DataplaneError::Program {
                    name,
                    source: ProgramError::NotLoaded,
                })?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            program.load().map_err(|source| rejected(name, source))?;
        }
        let pin = install_stages(
            &mut self.ebpf,
            &self.bpffs,
            programs::ENFORCE_TC,
            maps::STAGES_TC,
            &programs::STAGES_TC,
        )?;
        self.stages_pins.push(pin);
        self.tc_loaded = true;
        Ok(())
    }

    fn link_pin(&self, interface: &str) -> PathBuf {
        self.bpffs.join("links").join(interface)
    }

    /// Attaches the enforcer to `interface` at the hook `choice` picks (see [`HookChoice`]):
    /// XDP in `xdp_mode`, or tc ingress (a tcx link on Linux 6.6+, else a direct-action
    /// `cls_bpf` filter on the `clsact` qdisc). What an earlier run left there is switched to
    /// this build's program atomically (`BPF_LINK_UPDATE`, or a netlink filter replace), so
    /// enforcement has no gap across restarts; a new attachment is pinned (the tc filter is
    /// marked by a pin) so it outlives the daemon. When the interface moves from one hook to
    /// the other, the new one is in place before the old one goes: for that moment a packet
    /// may be judged twice, never not at all.
    pub fn attach(
        &mut self,
        interface: &str,
        choice: HookChoice,
        xdp_mode: AttachMode,
    ) -> Result<Attached, DataplaneError> {
        let want_tc = match choice {
            HookChoice::Xdp => false,
            HookChoice::Tc => true,
            // A device that registers a link kind (veth, tun/tap, bridge, vlan, ...) is
            // virtual: its packets are socket buffers already, and XDP on it would copy them
            // and (veth) take the peer's offloads away. Physical NICs register none.
            HookChoice::Auto => netlink::link(interface)
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_string(),
                    source: ProgramError::IOError(io::Error::other(source.to_string())),
                })?
                .kind
                .is_some(),
        };
        let current = current_hook(&self.bpffs, interface);
        let outcome = if want_tc {
            self.attach_tc(interface, current)?
        } else {
            self.attach_xdp(interface, xdp_mode, current)?
        };
        self.attached = true;
        // The program the old attachment ran may be gone now, and with it the last user of
        // its stages.
        prune_stages(&self.bpffs);
        Ok(outcome)
    }

    fn attach_xdp(
        &mut self,
        interface: &str,
        mode: AttachMode,
        current: Option<HookKind>,
    ) -> Result<Attached, DataplaneError> {
        let pin = self.link_pin(interface);
        let bpffs = self.bpffs.clone();
        let program: &mut Xdp = self
            .ebpf
            .program_mut(programs::ENFORCE)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::Program {
                name: programs::ENFORCE,
                source: ProgramError::NotLoaded,
            })?;
        let link_err =
            |op, source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Link {
                op,
                interface: interface.to_string(),
                path: pin.clone(),
                source,
            };
        if current == Some(HookKind::Xdp) {
            let pinned = PinnedLink::from_pin(&pin).map_err(|e| link_err("opening", e.into()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_err("opening", e.into()))?;
            program
                .attach_to_link(link)
                .map_err(|e| link_err("replacing the program of", e.into()))?;
            return Ok(Attached::Replaced);
        }
        let tries: &[(XdpMode, Attached)] = match mode {
            AttachMode::Auto => &[
                (XdpMode::Driver, Attached::Native),
                (XdpMode::Skb, Attached::Generic),
            ],
            AttachMode::Native => &[(XdpMode::Driver, Attached::Native)],
            AttachMode::Generic => &[(XdpMode::Skb, Attached::Generic)],
        };
        let mut last = None;
        for &(xdp_mode, outcome) in tries {
            match program.attach(interface, xdp_mode) {
                Ok(id) => {
                    if outcome == Attached::Generic && mode == AttachMode::Auto {
                        tracing::warn!(
                            interface,
                            error = %last.as_ref().map(|e: &ProgramError| e.to_string()).unwrap_or_default(),
                            "native XDP unavailable; attached in generic mode, which runs later in the stack and is slower"
                        );
                    }
                    let link = program
                        .take_link(id)
                        .map_err(|e| link_err("taking", e.into()))?;
                    let fd_link =
                        FdLink::try_from(link).map_err(|e| link_err("converting", e.into()))?;
                    // The tc hook this interface had goes only now, with XDP in place.
                    if let Some(old) = current {
                        remove_hook(&bpffs, interface, old)
                            .map_err(|e| link_err("removing the tc hook before", e.into()))?;
                    }
                    fd_link
                        .pin(&pin)
                        .map_err(|e| link_err("pinning", e.into()))?;
                    return Ok(outcome);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(DataplaneError::Attach {
            interface: interface.to_string(),
            source: last.unwrap_or(ProgramError::NotLoaded),
        })
    }

    fn attach_tc(
        &mut self,
        interface: &str,
        current: Option<HookKind>,
    ) -> Result<Attached, DataplaneError> {
        self.load_tc()?;
        let pin = self.link_pin(interface);
        let marker = tc_marker(&self.bpffs, interface);
        let bpffs = self.bpffs.clone();
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(programs::ENFORCE_TC)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::Program {
                name: programs::ENFORCE_TC,
                source: ProgramError::NotLoaded,
            })?;
        let link_err = |op, path: &Path, source: Box<dyn std::error::Error + Send + Sync>| {
            DataplaneError::Link {
                op,
                interface: interface.to_string(),
                path: path.to_path_buf(),
                source,
            }
        };
        if tcx_supported() {
            if current == Some(HookKind::Tcx) {
                let pinned =
                    PinnedLink::from_pin(&pin).map_err(|e| link_err("opening", &pin, e.into()))?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| link_err("opening", &pin, e.into()))?;
                program
                    .attach_to_link(link)
                    .map_err(|e| link_err("replacing the program of", &pin, e.into()))?;
                return Ok(Attached::TcxReplaced);
            }
            // First among the interface's tcx programs: the policy sees the packet before
            // anything that could redirect it.
            let id = program
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_string(),
                    source,
                })?;
            let link = program
                .take_link(id)
                .map_err(|e| link_err("taking", &pin, e.into()))?;
            let fd_link =
                FdLink::try_from(link).map_err(|e| link_err("converting", &pin, e.into()))?;
            if let Some(old) = current {
                remove_hook(&bpffs, interface, old)
                    .map_err(|e| link_err("removing the old hook before", &pin, e.into()))?;
            }
            fd_link
                .pin(&pin)
                .map_err(|e| link_err("pinning", &pin, e.into()))?;
            return Ok(Attached::Tcx);
        }
        // Before Linux 6.6: a direct-action cls_bpf filter on the clsact qdisc, at a fixed
        // priority and handle, so a restart finds its filter and replaces the program in it.
        match tc::qdisc_add_clsact(interface) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(DataplaneError::Attach {
                    interface: interface.to_string(),
                    source: source.into(),
                });
            }
        }
        let replaced = current == Some(HookKind::Clsact);
        let id = if replaced {
            let link = SchedClassifierLink::attached(
                interface,
                TcAttachType::Ingress,
                TC_PRIORITY,
                TC_HANDLE,
                None,
            )
            .map_err(|e| link_err("opening", &marker, e.into()))?;
            program
                .attach_to_link(link)
                .map_err(|e| link_err("replacing the program of", &marker, e.into()))?
        } else {
            program
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: TC_PRIORITY,
                        handle: TC_HANDLE,
                        classid: None,
                    }),
                )
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_string(),
                    source,
                })?
        };
        // The filter must outlive this process: aya would remove it when the link drops.
        std::mem::forget(
            program
                .take_link(id)
                .map_err(|e| link_err("taking", &marker, e.into()))?,
        );
        if let Some(old) = current.filter(|&old| old != HookKind::Clsact) {
            remove_hook(&bpffs, interface, old)
                .map_err(|e| link_err("removing the old hook before", &marker, e.into()))?;
        }
        // The marker pins the program the filter runs: what `status` and the next run read.
        let _ = fs::remove_file(&marker);
        if let Some(dir) = marker.parent() {
            fs::create_dir_all(dir).map_err(|e| link_err("creating", dir, e.into()))?;
        }
        program
            .pin(&marker)
            .map_err(|e| link_err("pinning", &marker, e.into()))?;
        Ok(if replaced {
            Attached::ClsactReplaced
        } else {
            Attached::Clsact
        })
    }

    /// Interfaces the enforcer is attached to (by a pinned link or a marked tc filter).
    pub fn attached_interfaces(&self) -> Vec<String> {
        attached_interfaces(&self.bpffs)
    }

    /// What runs on each interface the enforcer is attached to, as the kernel reports it
    /// now (the mode of an attachment an earlier run made is known only to the kernel).
    pub fn hooks(&self) -> Vec<Hook> {
        let id = |p: Option<&aya::programs::Program>| p.and_then(|p| p.info().ok()).map(|i| i.id());
        let ours_xdp = id(self.ebpf.program(programs::ENFORCE));
        let ours_tc = id(self.ebpf.program(programs::ENFORCE_TC));
        self.attached_interfaces()
            .into_iter()
            .map(|interface| hook_state(&self.bpffs, interface, ours_xdp, ours_tc))
            .collect()
    }

    /// Detaches the enforcer from `interface` (removes its link pin, or its tc filter and
    /// the marker).
    pub fn detach(&mut self, interface: &str) -> io::Result<()> {
        match current_hook(&self.bpffs, interface) {
            Some(kind) => remove_hook(&self.bpffs, interface, kind),
            None => Ok(()),
        }
    }
}

/// Which hook runs the enforcer on an interface (`hook` in the configuration, or per
/// interface in `[hooks]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookChoice {
    /// tc for virtual devices (veth, tun/tap, bridges: anything that registers a link
    /// kind), XDP for physical NICs.
    #[default]
    Auto,
    /// XDP, in `xdp_mode`.
    Xdp,
    /// tc ingress.
    Tc,
}

/// The kind of attachment an interface has, from its pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HookKind {
    /// A pinned XDP link.
    Xdp,
    /// A pinned tcx link (Linux 6.6+).
    Tcx,
    /// A `cls_bpf` filter on the clsact qdisc, marked by a program pin under `tc/`.
    Clsact,
}

/// The tc filter's priority and handle on kernels without tcx: fixed, so a restart finds
/// the filter to replace. Priority 2 runs before filters added with the default priority.
const TC_PRIORITY: u16 = 2;
const TC_HANDLE: TcHandle = TcHandle::new(0, 0xe7f);

/// Whether this kernel has tcx links (Linux 6.6).
fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn tc_marker(bpffs: &Path, interface: &str) -> PathBuf {
    bpffs.join("tc").join(interface)
}

/// The enforcer's attachment on `interface`, by its pins.
fn current_hook(bpffs: &Path, interface: &str) -> Option<HookKind> {
    let pin = bpffs.join("links").join(interface);
    if pin.exists() {
        let kind = PinnedLink::from_pin(&pin)
            .ok()
            .and_then(|l| FdLink::from(l).info().ok())
            .and_then(|info| info.link_type().ok());
        return Some(if kind == Some(LinkType::Tcx) {
            HookKind::Tcx
        } else {
            HookKind::Xdp
        });
    }
    tc_marker(bpffs, interface)
        .exists()
        .then_some(HookKind::Clsact)
}

/// Removes the enforcer's attachment of `kind` from `interface`.
fn remove_hook(bpffs: &Path, interface: &str, kind: HookKind) -> io::Result<()> {
    match kind {
        HookKind::Xdp | HookKind::Tcx => fs::remove_file(bpffs.join("links").join(interface)),
        // A filter goes with its interface: then only the marker is left to remove.
        HookKind::Clsact if netlink::if_index(interface).is_none() => {
            fs::remove_file(tc_marker(bpffs, interface))
        }
        HookKind::Clsact => {
            match tc::qdisc_detach_program(interface, TcAttachType::Ingress, programs::ENFORCE_TC) {
                Ok(()) => {}
                // Gone already (with its interface, or by hand).
                Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
            fs::remove_file(tc_marker(bpffs, interface))
        }
    }
}

/// What the kernel runs at `interface`'s hook, against the ids of this load's programs.
fn hook_state(
    bpffs: &Path,
    interface: String,
    ours_xdp: Option<u32>,
    ours_tc: Option<u32>,
) -> Hook {
    let failed = |interface, problem: String| Hook {
        interface,
        hook: "?",
        mode: None,
        program_id: 0,
        ours: false,
        problem: Some(problem),
    };
    match current_hook(bpffs, &interface) {
        Some(HookKind::Xdp) | None => match netlink::xdp_state(&interface) {
            Ok(state) => Hook {
                hook: "xdp",
                mode: Some(state.mode.name()),
                program_id: state.program_id,
                ours: state.program_id != 0 && Some(state.program_id) == ours_xdp,
                problem: (state.mode == XdpAttachMode::None)
                    .then(|| "the link is pinned but no XDP program runs".to_string()),
                interface,
            },
            Err(e) => failed(interface, e.to_string()),
        },
        Some(HookKind::Tcx) => {
            match SchedClassifier::query_tcx(&interface, TcAttachType::Ingress) {
                Ok((_, programs)) => {
                    let ids: Vec<u32> = programs.iter().map(|p| p.id()).collect();
                    let ours = ours_tc.is_some_and(|id| ids.contains(&id));
                    Hook {
                        hook: "tc",
                        mode: Some("tcx"),
                        program_id: if ours {
                            ours_tc.unwrap_or(0)
                        } else {
                            ids.first().copied().unwrap_or(0)
                        },
                        ours,
                        problem: ids
                            .is_empty()
                            .then(|| "the link is pinned but no tcx program runs".to_string()),
                        interface,
                    }
                }
                // Listing the programs opens them by id, which needs CAP_SYS_ADMIN (not
                // granted by the systemd unit): then the pinned link says what it runs.
                Err(query) => {
                    let pin = bpffs.join("links").join(&interface);
                    match aya::programs::links::PinnedLink::from_pin(&pin)
                        .and_then(|link| aya::programs::links::FdLink::from(link).info())
                    {
                        Ok(info) => Hook {
                            hook: "tc",
                            mode: Some("tcx"),
                            program_id: info.program_id(),
                            ours: Some(info.program_id()) == ours_tc,
                            problem: None,
                            interface,
                        },
                        Err(e) => failed(
                            interface,
                            format!("asking for its tcx programs: {query}; reading its link: {e}"),
                        ),
                    }
                }
            }
        }
        Some(HookKind::Clsact) => {
            let marker = tc_marker(bpffs, &interface);
            // The filter itself is not listed here: the marker pins the program it was
            // given, and a filter gone with its interface shows as a missing interface.
            let problem = netlink::link(&interface).err().map(|e| e.to_string());
            match ProgramInfo::from_pin(&marker) {
                Ok(info) => Hook {
                    hook: "tc",
                    mode: Some("clsact"),
                    program_id: info.id(),
                    ours: Some(info.id()) == ours_tc,
                    problem,
                    interface,
                },
                Err(e) => failed(interface, format!("reading {}: {e}", marker.display())),
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // A load that never ran on an interface (a test run, `policy apply` without a
        // daemon) leaves nothing behind; an attached one's stages stay with its links.
        if !self.attached {
            for pin in &self.stages_pins {
                let _ = fs::remove_file(pin);
            }
        }
    }
}

/// Removes the pinned counters when they were made for another layout than this build's:
/// for another number of reasons (a reason was added, so each agent's [`AgentCounters`] has
/// another size), or by a build that kept one entry per (agent, reason). aya reuses a pinned
/// map whatever its sizes, so the old pin would be read and written at the wrong places.
/// Counters are statistics: this build starts them afresh and says so, and the program that
/// is still attached keeps its own (old) map until its link is switched. Pins made for
/// another `max_agents` are left for the stride check, which refuses them with a message
/// saying what to do.
fn reset_counters_of_another_layout(maps_dir: &Path, stride: u32) -> Result<(), DataplaneError> {
    let (agents_pin, counters_pin) = (maps_dir.join(maps::AGENTS), maps_dir.join(maps::COUNTERS));
    if !agents_pin.exists() || !counters_pin.exists() {
        return Ok(());
    }
    let info = |name: &'static str, pin: &Path| {
        MapInfo::from_pin(pin).map_err(|source| DataplaneError::Map { name, source })
    };
    let pinned_stride = info(maps::AGENTS, &agents_pin)?.max_entries() / 2;
    let counters = info(maps::COUNTERS, &counters_pin)?;
    let value_size = size_of::<AgentCounters>() as u32;
    if pinned_stride == stride
        && (counters.max_entries() != stride || counters.value_size() != value_size)
    {
        tracing::warn!(
            pinned_entries = counters.max_entries(),
            pinned_value_size = counters.value_size(),
            entries = stride,
            value_size,
            "the pinned counters were made for another set of reasons or layout; counting starts afresh"
        );
        fs::remove_file(&counters_pin).map_err(|source| DataplaneError::ResetCounters {
            path: counters_pin.clone(),
            source,
        })?;
    }
    // Builds before the audit stats moved into `COUNTERS` pinned them as a map of their own;
    // nothing reads that pin any more (a program still attached keeps its map by reference).
    let legacy = maps_dir.join(LEGACY_AUDIT_STATS);
    if legacy.exists() {
        fs::remove_file(&legacy).map_err(|source| DataplaneError::ResetCounters {
            path: legacy.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The pin name of the per-agent audit stats before they became part of [`AgentCounters`].
const LEGACY_AUDIT_STATS: &str = "AUDIT_STATS";

/// Where the `STAGES` arrays are pinned: one per loaded entry program, named by its id.
fn stages_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("stages")
}

/// Fills one of the loaded object's stage arrays (`STAGES` for XDP, `STAGES_TC` for tc)
/// with its stage programs and pins it under
/// `bpffs/stages/<id of the entry program>`.
///
/// A program array loses its entries when its last user-space reference (a descriptor or
/// a pin) goes, even while a program that tail-calls through it still runs: the pin keeps
/// the stages of a pinned entry program running after the daemon exits, and because each
/// load has its own array (never one pinned by name and reused), an entry program only
/// ever jumps into stages built with it, across upgrades too. Pins whose entry program is
/// gone are removed here and after every link switch ([`prune_stages`]).
fn install_stages(
    ebpf: &mut Ebpf,
    bpffs: &Path,
    entry_name: &'static str,
    name: &'static str,
    programs: &[(u32, &'static str)],
) -> Result<PathBuf, DataplaneError> {
    let dir = stages_dir(bpffs);
    fs::create_dir_all(&dir).map_err(|source| DataplaneError::PinDir {
        path: dir.clone(),
        source,
    })?;
    prune_stages(bpffs);
    let stage_err = |op, path: &Path, source: Box<dyn std::error::Error + Send + Sync>| {
        DataplaneError::Stages {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let entry = ebpf.program(entry_name).ok_or(DataplaneError::Program {
        name: entry_name,
        source: ProgramError::NotLoaded,
    })?;
    let id = entry
        .info()
        .map_err(|source| DataplaneError::Program {
            name: entry_name,
            source,
        })?
        .id();
    let pin = dir.join(id.to_string());
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    let mut stages =
        ProgramArray::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
    for &(index, program) in programs {
        let fd = ebpf
            .program(program)
            .ok_or(DataplaneError::Program {
                name: program,
                source: ProgramError::NotLoaded,
            })?
            .fd()
            .map_err(|source| DataplaneError::Program {
                name: program,
                source,
            })?;
        stages
            .set(index, fd, 0)
            .map_err(|e| stage_err("filling", &pin, e.into()))?;
    }
    stages
        .pin(&pin)
        .map_err(|e| stage_err("pinning", &pin, e.into()))?;
    Ok(pin)
}

/// Removes the `STAGES` pins of entry programs that no longer exist (replaced on every
/// interface, or never attached by a run that died).
///
/// Listing the loaded programs (`BPF_PROG_GET_NEXT_ID`) needs CAP_SYS_ADMIN, which the
/// systemd unit does not grant: there the list fails, and every pin stays. Pruning on an
/// empty list instead removed the live program's stages, so every tail call failed and tc
/// passed all traffic unjudged (found by the systemd VM test). A stale pin only holds
/// memory until the next reboot or `enforcer stop --detach`.
fn prune_stages(bpffs: &Path) {
    let Ok(entries) = fs::read_dir(stages_dir(bpffs)) else {
        return;
    };
    let live: Result<Vec<u32>, _> = aya::programs::loaded_programs()
        .map(|info| info.map(|info| info.id()))
        .collect();
    let Ok(live) = live else {
        return;
    };
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().parse::<u32>().ok();
        if id.is_none_or(|id| !live.contains(&id)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Fails unless `bpffs`, or the directory it would be created in, is on a bpf file system.
/// Pinning anywhere else fails map by map, with aya's `requested pinning. pinning failed`
/// and EPERM, which names neither the path nor the cause; and nothing is created there.
fn check_bpffs(bpffs: &Path) -> Result<(), DataplaneError> {
    use std::os::unix::ffi::OsStrExt as _;
    /// `BPF_FS_MAGIC` from `linux/magic.h`.
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    // The nearest directory that exists: the pin directory itself is made below.
    let Some(existing) = bpffs.ancestors().find(|p| p.exists()) else {
        return Ok(());
    };
    let Ok(path) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return Ok(());
    };
    // SAFETY: statfs(2) with a NUL-terminated path and a zeroed struct it fills.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        // Unknowable here: let the load say what fails.
        return Ok(());
    }
    if fs.f_type as i64 == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(DataplaneError::NotBpffs {
            path: bpffs.to_path_buf(),
        })
    }
}

/// What the kernel runs on each interface with a pinned link under `bpffs`, for
/// `enforcer status` with no daemon: no program of this process to compare with, so
/// `ours` is false throughout.
pub fn pinned_hooks(bpffs: &Path) -> Vec<Hook> {
    attached_interfaces(bpffs)
        .into_iter()
        .map(|interface| hook_state(bpffs, interface, None, None))
        .collect()
}

/// Interfaces with a pinned enforcer link under `bpffs`.
pub fn attached_interfaces(bpffs: &Path) -> Vec<String> {
    let mut names: Vec<String> = ["links", "tc"]
        .iter()
        .filter_map(|sub| fs::read_dir(bpffs.join(sub)).ok())
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Removes every pin under `bpffs` (links first, which detaches the program), leaving
/// nothing enforcing. Used by `enforcer stop --detach` and test clean-up.
pub fn remove_pins(bpffs: &Path) -> io::Result<()> {
    // A clsact filter outlives its marker: remove the filters first.
    for interface in fs::read_dir(bpffs.join("tc"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(interface) = interface.file_name().into_string() {
            remove_hook(bpffs, &interface, HookKind::Clsact)?;
        }
    }
    for sub in ["links", "tc", "stages", "maps"] {
        let dir = bpffs.join(sub);
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
    }
    Ok(())
}

/// The policy maps in the kernel, typed.
pub struct KernelMaps {
    stride: u32,
    state: Array<MapData, State>,
    slots: Array<MapData, SlotConfig>,
    agents: Array<MapData, AgentPolicy>,
    buckets: Array<MapData, Bucket>,
    counters: PerCpuArray<MapData, AgentCounters>,
    ifaces: HashMap<MapData, IfaceKey, u32>,
    src_host_v4: HashMap<MapData, HostV4Key, u32>,
    src_host_v6: HashMap<MapData, HostV6Key, u32>,
    src_table_v4: Array<MapData, TableBucket1>,
    src_table_v6: Array<MapData, TableBucket2>,
    dst_table_v4: Array<MapData, TableBucket1>,
    dst_table_v6: Array<MapData, TableBucket3>,
    rules: Array<MapData, RuleSet>,
    tables: Array<MapData, TableConfig>,
    src_v4: LpmTrie<MapData, LpmV4, u32>,
    src_v6: LpmTrie<MapData, LpmV6, u32>,
    dst_v4: LpmTrie<MapData, LpmV4, RuleSet>,
    dst_v6: LpmTrie<MapData, LpmV6, RuleSet>,
    dst_hash_v4: HashMap<MapData, DstV4Key, RuleSet>,
    dst_hash_v6: HashMap<MapData, DstV6Key, RuleSet>,
    audit_config: Array<MapData, AuditConfig>,
    audit_limits: Array<MapData, u64>,
    reject_limits: Array<MapData, u64>,
    tls_ports: Array<MapData, TlsPorts>,
    resolvers: HashMap<MapData, ResolverKey, u32>,
    names_v4: HashMap<MapData, NameV4Key, NameEntry>,
    names_v6: HashMap<MapData, NameV6Key, NameEntry>,
    sni: HashMap<MapData, SniKey, RuleSet>,
    guard_policy: Array<MapData, GuardPolicy>,
    guards: Array<MapData, GuardState>,
    shared_policy: Array<MapData, SharedPolicy>,
    shared_buckets: Array<MapData, SharedBucket>,
    guard_config: Array<MapData, GuardConfig>,
    /// Per slot, the `RULES` indices of its rule sets, when this process wrote the slot
    /// whole (see [`incremental`]).
    rule_index: [Option<RuleIndex>; 2],
}

/// Where [`KernelMaps`] gets its maps from: a freshly loaded object or the pins.
type MapSource<'a> = dyn FnMut(&'static str) -> Result<Map, DataplaneError> + 'a;

fn typed<M: TryFrom<Map, Error = MapError>>(
    source: &mut MapSource<'_>,
    name: &'static str,
) -> Result<M, DataplaneError> {
    M::try_from(source(name)?).map_err(|source| DataplaneError::Map { name, source })
}

/// Builds the table of `entries` (see [`Table::build`]) for `slot`, writes its buckets into
/// the slot's part of `map` (bucket `b` at `b << 1 | slot`), records its seed and size as
/// table `which` of `config`, and returns the positions of the entries that go to the hash
/// map instead.
///
/// The table fills the slot's part of the map whatever the number of keys: every later
/// apply, up to the map's capacity, then updates it in place (at most two keys a bucket,
/// see [`incremental`]) rather than rewriting the slot at a larger size. Writing every
/// bucket also overwrites whatever an earlier, unknown write left there.
fn place<const W: usize>(
    map: &mut Array<MapData, TableBucket<W>>,
    name: &'static str,
    slot: u32,
    (config, which): (&mut TableConfig, usize),
    entries: &[([u64; W], Option<u32>)],
) -> Result<Vec<usize>, MapsError>
where
    TableBucket<W>: aya::Pod,
{
    use aya::maps::IterableMap as _;
    // The kernel's size: a map pinned by a run with other limits keeps its own.
    let entries_in_map = map
        .map()
        .info()
        .map_err(err("reading the size of", name))?
        .max_entries();
    let table = Table::build(entries, table::max_bits(entries_in_map / 2));
    let keys: Vec<u32> = (0u32..)
        .take(table.buckets.len())
        .map(|b| b << 1 | slot)
        .collect();
    update_batch(map, &keys, &table.buckets, name)?;
    (config.seeds[which], config.bits[which]) = (table.seed, table.bits);
    Ok(table.overflow)
}

fn err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { op, map, source }
}

/// Deletes every key of `map` that `stale` selects. Keys are collected first: deleting
/// while walking `get_next_key` would restart the walk.
macro_rules! remove_where {
    ($map:expr, $name:expr, $stale:expr) => {{
        let keys: Vec<_> = $map
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(err("listing", $name))?;
        for key in keys.into_iter().filter($stale) {
            match $map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(err("clearing", $name)(e)),
            }
        }
    }};
}

impl KernelMaps {
    fn build(source: &mut MapSource<'_>, stride: u32) -> Result<Self, DataplaneError> {
        Ok(KernelMaps {
            stride,
            state: typed(source, maps::STATE)?,
            slots: typed(source, maps::SLOTS)?,
            agents: typed(source, maps::AGENTS)?,
            buckets: typed(source, maps::BUCKETS)?,
            counters: typed(source, maps::COUNTERS)?,
            ifaces: typed(source, maps::IFACES)?,
            src_host_v4: typed(source, maps::SRC_HOST_V4)?,
            src_host_v6: typed(source, maps::SRC_HOST_V6)?,
            src_table_v4: typed(source, maps::SRC_TABLE_V4)?,
            src_table_v6: typed(source, maps::SRC_TABLE_V6)?,
            dst_table_v4: typed(source, maps::DST_TABLE_V4)?,
            dst_table_v6: typed(source, maps::DST_TABLE_V6)?,
            rules: typed(source, maps::RULES)?,
            tables: typed(source, maps::TABLES)?,
            src_v4: typed(source, maps::SRC_V4)?,
            src_v6: typed(source, maps::SRC_V6)?,
            dst_v4: typed(source, maps::DST_V4)?,
            dst_v6: typed(source, maps::DST_V6)?,
            dst_hash_v4: typed(source, maps::DST_HASH_V4)?,
            dst_hash_v6: typed(source, maps::DST_HASH_V6)?,
            audit_config: typed(source, maps::AUDIT_CONFIG)?,
            audit_limits: typed(source, maps::AUDIT_LIMITS)?,
            reject_limits: typed(source, maps::REJECT_LIMITS)?,
            tls_ports: typed(source, maps::TLS_PORTS)?,
            resolvers: typed(source, maps::RESOLVERS)?,
            names_v4: typed(source, maps::NAMES_V4)?,
            names_v6: typed(source, maps::NAMES_V6)?,
            sni: typed(source, maps::SNI)?,
            guard_policy: typed(source, maps::GUARD_POLICY)?,
            guards: typed(source, maps::GUARDS)?,
            shared_policy: typed(source, maps::SHARED_POLICY)?,
            shared_buckets: typed(source, maps::SHARED_BUCKETS)?,
            guard_config: typed(source, maps::GUARD_CONFIG)?,
            rule_index: [None, None],
        })
    }

    fn take(ebpf: &mut Ebpf, limits: &Limits) -> Result<Self, DataplaneError> {
        Self::build(
            &mut |name| {
                ebpf.take_map(name)
                    .ok_or(DataplaneError::MissingMap { name })
            },
            limits.max_agents + 1,
        )
    }

    /// Opens the maps pinned under `bpffs/maps` by a running (or exited) daemon, without
    /// loading a program: what `enforcer stats` and `policy apply` use.
    pub fn from_pins(bpffs: &Path) -> Result<Self, DataplaneError> {
        let dir = bpffs.join("maps");
        let mut maps = Self::build(
            &mut |name| {
                let data = MapData::from_pin(dir.join(name))
                    .map_err(|source| DataplaneError::Map { name, source })?;
                Map::from_map_data(data).map_err(|source| DataplaneError::Map { name, source })
            },
            0,
        )?;
        maps.stride = maps.state()?.agent_stride;
        Ok(maps)
    }

    /// The enforcement state (active slot, generation).
    pub fn current_state(&self) -> Result<State, MapsError> {
        self.state()
    }

    /// Agent ids with an active policy in the active slot.
    pub fn active_agents(&self) -> Result<Vec<u32>, MapsError> {
        Ok(self
            .agent_policies()?
            .iter()
            .enumerate()
            .filter(|(_, p)| p.flags & AGENT_ACTIVE != 0)
            .map(|(id, _)| id as u32)
            .collect())
    }

    /// The agent's policy in the active slot.
    pub fn agent_policy(&self, id: u32) -> Result<AgentPolicy, MapsError> {
        let state = self.state()?;
        self.agents
            .get(&(state.active_slot * self.stride + id), 0)
            .map_err(err("reading", maps::AGENTS))
    }

    /// The (agent, reason) counter summed over CPUs.
    pub fn counter(&self, agent: u32, reason: Reason) -> Result<Counter, MapsError> {
        Ok(self.agent_counters(agent)?[reason as usize])
    }

    /// Every reason's counter of one agent (index = reason number), summed over CPUs.
    pub fn agent_counters(
        &self,
        agent: u32,
    ) -> Result<[Counter; Reason::COUNT as usize], MapsError> {
        Ok(self.agent_stats(agent)?.by_reason)
    }

    /// Everything counted for one agent, summed over CPUs.
    pub fn agent_stats(&self, agent: u32) -> Result<AgentCounters, MapsError> {
        let values = self
            .counters
            .get(&agent, 0)
            .map_err(err("reading", maps::COUNTERS))?;
        Ok(sum_counters(&values))
    }

    /// Resets an agent's rate-limiter state (used by tests and benchmarks).
    pub fn reset_bucket(&mut self, agent: u32) -> Result<(), MapsError> {
        self.buckets
            .set(agent, Bucket::default(), 0)
            .map_err(err("writing", maps::BUCKETS))
    }

    /// The audit limiter's parameters.
    pub fn audit_config(&self) -> Result<AuditConfig, MapsError> {
        self.audit_config
            .get(&0, 0)
            .map_err(err("reading", maps::AUDIT_CONFIG))
    }

    /// Sets the audit limiter's parameters (see [`AuditRate::config`]); takes effect for the
    /// next packet.
    pub fn set_audit_config(&mut self, config: AuditConfig) -> Result<(), MapsError> {
        self.audit_config
            .set(0, config, 0)
            .map_err(err("writing", maps::AUDIT_CONFIG))
    }

    /// An agent's suppressed and lost audit events, summed over CPUs.
    pub fn audit_stats(&self, agent: u32) -> Result<AuditStats, MapsError> {
        Ok(self.agent_stats(agent)?.audit)
    }

    /// The audit stats of agents 0 to `last`, summed over CPUs, in one walk of the counters
    /// (see [`KernelMaps::visit_counters`]).
    pub fn audit_stats_upto(&self, last: u32) -> Result<Vec<AuditStats>, MapsError> {
        let mut out = Vec::new();
        self.visit_counters(last, |_, c| out.push(c.audit))?;
        Ok(out)
    }

    /// Resets an agent's audit limiter to a full burst (used by tests).
    pub fn reset_audit_limiter(&mut self, agent: u32) -> Result<(), MapsError> {
        self.audit_limits
            .set(agent, 0, 0)
            .map_err(err("writing", maps::AUDIT_LIMITS))
    }

    /// Clears agent `id`'s guard state: breaker closed, connection and probe buckets full,
    /// quota use zero (see [`KernelMaps::reset_agent`]).
    pub fn reset_guards(&mut self, id: u32) -> Result<(), MapsError> {
        self.set_guard_state(id, GuardState::default())
    }

    /// Agent `id`'s guard state: breaker, buckets, quota words.
    pub fn guard_state(&self, id: u32) -> Result<GuardState, MapsError> {
        self.guards
            .get(&id, 0)
            .map_err(err("reading", maps::GUARDS))
    }

    /// Overwrites agent `id`'s guard state: `breaker reset`, and quota use restored after a
    /// reboot.
    pub fn set_guard_state(&mut self, id: u32, state: GuardState) -> Result<(), MapsError> {
        self.guards
            .set(id, state, 0)
            .map_err(err("writing", maps::GUARDS))
    }

    /// The guard state of agents 0 to `last`, in batches.
    pub fn guard_states_upto(&self, last: u32) -> Result<Vec<GuardState>, MapsError> {
        use aya::maps::IterableMap as _;
        lookup_batch(self.guards.map(), last + 1, 1, maps::GUARDS)
    }

    /// Agent `id`'s guards in the active slot (all zero: none).
    pub fn guard_policy(&self, id: u32) -> Result<GuardPolicy, MapsError> {
        let state = self.state()?;
        self.guard_policy
            .get(&(state.active_slot * self.stride + id), 0)
            .map_err(err("reading", maps::GUARD_POLICY))
    }

    /// A destination group's shared limiter state.
    pub fn shared_bucket(&self, group: u16) -> Result<SharedBucket, MapsError> {
        self.shared_buckets
            .get(&u32::from(group), 0)
            .map_err(err("reading", maps::SHARED_BUCKETS))
    }

    /// Sets the global guard settings (the wall clock's offset for quota windows).
    pub fn set_guard_config(&mut self, config: GuardConfig) -> Result<(), MapsError> {
        self.guard_config
            .set(0, config, 0)
            .map_err(err("writing", maps::GUARD_CONFIG))
    }

    /// Resets an agent's reject reply limiter to a full burst.
    pub fn reset_reject_limiter(&mut self, agent: u32) -> Result<(), MapsError> {
        self.reject_limits
            .set(agent, 0, 0)
            .map_err(err("writing", maps::REJECT_LIMITS))
    }

    /// Unknown-agent counters and every active agent's, keyed by agent id.
    pub fn all_counters(&self) -> Result<Vec<(u32, [Counter; Reason::COUNT as usize])>, MapsError> {
        let mut ids = vec![UNKNOWN_AGENT];
        ids.extend(self.active_agents()?);
        let counters = self.counters_upto(ids.iter().copied().max().unwrap_or(0))?;
        Ok(ids
            .into_iter()
            .filter_map(|id| counters.get(id as usize).map(|c| (id, *c)))
            .collect())
    }
}

impl PolicyMaps for KernelMaps {
    fn state(&self) -> Result<State, MapsError> {
        self.state.get(&0, 0).map_err(err("reading", maps::STATE))
    }

    fn set_state(&mut self, state: State) -> Result<(), MapsError> {
        self.state
            .set(0, state, 0)
            .map_err(err("writing", maps::STATE))
    }

    fn clear_slot(&mut self, slot: u32) -> Result<(), MapsError> {
        use aya::maps::IterableMap as _;
        self.rule_index[slot as usize] = None;
        self.slots
            .set(slot, SlotConfig::default(), 0)
            .map_err(err("clearing", maps::SLOTS))?;
        // No tables: buckets a later write does not reach are never probed.
        self.tables
            .set(slot, TableConfig::default(), 0)
            .map_err(err("clearing", maps::TABLES))?;
        // One batch read of the slot's part rather than a syscall per agent: at 100,000
        // agents a clear was 100,000 reads, however few agents the slot held.
        let base = slot * self.stride;
        let all: Vec<AgentPolicy> =
            lookup_batch(self.agents.map(), base + self.stride, 1, maps::AGENTS)?;
        let used: Vec<u32> = (base..)
            .zip(all.get(base as usize..).unwrap_or_default())
            .filter(|(_, policy)| **policy != AgentPolicy::default())
            .map(|(key, _)| key)
            .collect();
        let cleared = vec![AgentPolicy::default(); used.len()];
        update_batch(&mut self.agents, &used, &cleared, maps::AGENTS)?;
        // Guards at the same indices, read the same way.
        let all: Vec<GuardPolicy> = lookup_batch(
            self.guard_policy.map(),
            base + self.stride,
            1,
            maps::GUARD_POLICY,
        )?;
        let used: Vec<u32> = (base..)
            .zip(all.get(base as usize..).unwrap_or_default())
            .filter(|(_, policy)| **policy != GuardPolicy::default())
            .map(|(key, _)| key)
            .collect();
        let cleared = vec![GuardPolicy::default(); used.len()];
        update_batch(&mut self.guard_policy, &used, &cleared, maps::GUARD_POLICY)?;
        // Shared groups interleave the slots (`group << 1 | slot`): the whole map is 2,048
        // entries, one batch.
        let all: Vec<SharedPolicy> = lookup_batch(
            self.shared_policy.map(),
            2 * MAX_SHARED_GROUPS,
            1,
            maps::SHARED_POLICY,
        )?;
        let used: Vec<u32> = (0..)
            .zip(&all)
            .filter(|(key, policy)| key & 1 == slot && **policy != SharedPolicy::default())
            .map(|(key, _)| key)
            .collect();
        let cleared = vec![SharedPolicy::default(); used.len()];
        update_batch(
            &mut self.shared_policy,
            &used,
            &cleared,
            maps::SHARED_POLICY,
        )?;
        let slot_owner = slot.to_be_bytes();
        remove_where!(self.ifaces, maps::IFACES, |k: &IfaceKey| k.slot == slot);
        remove_where!(self.src_host_v4, maps::SRC_HOST_V4, |k: &HostV4Key| k.slot
            == slot);
        remove_where!(self.src_host_v6, maps::SRC_HOST_V6, |k: &HostV6Key| k.slot
            == slot);
        remove_where!(self.src_v4, maps::SRC_V4, |k: &Key<LpmV4>| k.data().owner
            == slot_owner);
        remove_where!(self.src_v6, maps::SRC_V6, |k: &Key<LpmV6>| k.data().owner
            == slot_owner);
        // Destination owners carry the slot in their top bit.
        remove_where!(self.dst_v4, maps::DST_V4, |k: &Key<LpmV4>| u32::from(
            k.data().owner[0] >> 7
        ) == slot);
        remove_where!(self.dst_v6, maps::DST_V6, |k: &Key<LpmV6>| u32::from(
            k.data().owner[0] >> 7
        ) == slot);
        remove_where!(self.dst_hash_v4, maps::DST_HASH_V4, |k: &DstV4Key| k.owner
            >> 31
            == slot);
        remove_where!(self.dst_hash_v6, maps::DST_HASH_V6, |k: &DstV6Key| k.owner
            >> 31
            == slot);
        remove_where!(self.sni, maps::SNI, |k: &SniKey| k.slot == slot);
        self.tls_ports
            .set(slot, TlsPorts::default(), 0)
            .map_err(err("clearing", maps::TLS_PORTS))?;
        Ok(())
    }

    fn update_slot(
        &mut self,
        slot: u32,
        from: &Compiled,
        to: &Compiled,
    ) -> Result<bool, MapsError> {
        // In place, each changed agent costs a few syscalls (its buckets read and written,
        // its agent set), about 4.5 us here; whole, each agent costs a share of a batch,
        // some three times less, plus every bucket of the tables, which fill their maps
        // (about 80 ms at 65,536 keys each). 100,000 agents added in place: 450 ms; written
        // whole: 150 ms; 10,000 added in place: 45 ms, whole: 88 ms. The difference in
        // agents is a lower bound on the changes; the whole write wins when
        // 4.5 d > 1.5 n + 80,000 (us), i.e. about 3 d > n + 53,000.
        let (old, new) = (from.agents.len(), to.agents.len());
        if old.abs_diff(new) * 3 > old.max(new) + 53_000 {
            return Ok(false);
        }
        self.update_in_place(slot, from, to)
    }

    fn write_slot(&mut self, slot: u32, c: &Compiled) -> Result<(), MapsError> {
        // Known again once the whole slot is written.
        self.rule_index[slot as usize] = None;
        let base = slot * self.stride;
        let (ids, policies): (Vec<u32>, Vec<AgentPolicy>) =
            c.agents.iter().map(|(id, p)| (base + id, *p)).unzip();
        update_batch(&mut self.agents, &ids, &policies, maps::AGENTS)?;
        let (ids, guards): (Vec<u32>, Vec<GuardPolicy>) =
            c.guards.iter().map(|(id, g)| (base + id, *g)).unzip();
        update_batch(&mut self.guard_policy, &ids, &guards, maps::GUARD_POLICY)?;
        let (ids, shared): (Vec<u32>, Vec<SharedPolicy>) = c
            .shared
            .iter()
            .map(|(group, p)| (u32::from(*group) << 1 | slot, *p))
            .unzip();
        update_batch(&mut self.shared_policy, &ids, &shared, maps::SHARED_POLICY)?;
        for &(ifindex, agent) in &c.interfaces {
            self.ifaces
                .insert(IfaceKey { slot, ifindex }, agent, 0)
                .map_err(err("writing", maps::IFACES))?;
        }
        // Exact sources go to the tables; what does not fit goes to the hash maps.
        let mut tables = TableConfig::default();
        let hosts = &c.source_hosts_v4;
        let keys: Vec<_> = hosts
            .iter()
            .map(|&(addr, agent)| (src_key_v4(addr), Some(agent)))
            .collect();
        let target = (&mut tables, TABLE_SRC_V4);
        for at in place(
            &mut self.src_table_v4,
            maps::SRC_TABLE_V4,
            slot,
            target,
            &keys,
        )? {
            let (addr, agent) = hosts[at];
            self.src_host_v4
                .insert(HostV4Key { slot, addr }, agent, 0)
                .map_err(err("writing", maps::SRC_HOST_V4))?;
        }
        let hosts = &c.source_hosts_v6;
        let keys: Vec<_> = hosts
            .iter()
            .map(|&(addr, agent)| (src_key_v6(addr), Some(agent)))
            .collect();
        let target = (&mut tables, TABLE_SRC_V6);
        for at in place(
            &mut self.src_table_v6,
            maps::SRC_TABLE_V6,
            slot,
            target,
            &keys,
        )? {
            let (addr, agent) = hosts[at];
            self.src_host_v6
                .insert(HostV6Key { slot, addr }, agent, 0)
                .map_err(err("writing", maps::SRC_HOST_V6))?;
        }
        let slot_owner = slot.to_be_bytes();
        for &(p, agent) in &c.source_prefixes_v4 {
            let key = Key::new(
                OWNER_BITS + u32::from(p.len),
                LpmV4 {
                    owner: slot_owner,
                    addr: p.addr,
                },
            );
            self.src_v4
                .insert(&key, agent, 0)
                .map_err(err("writing", maps::SRC_V4))?;
        }
        for &(p, agent) in &c.source_prefixes_v6 {
            let key = Key::new(
                OWNER_BITS + u32::from(p.len),
                LpmV6 {
                    owner: slot_owner,
                    addr: p.addr,
                },
            );
            self.src_v6
                .insert(&key, agent, 0)
                .map_err(err("writing", maps::SRC_V6))?;
        }
        // Each agent's destinations go where its flags tell the program to look.
        let flags: std::collections::HashMap<u32, u32> =
            c.agents.iter().map(|(id, p)| (*id, p.flags)).collect();
        let uses = |agent: &u32, flag| flags.get(agent).is_some_and(|f| f & flag != 0);
        // Hash-probed destinations go to the tables, their rule sets to `RULES` (each
        // distinct set once, index 0 unused); what does not fit goes to the hash maps.
        let mut index = RuleIndex::new(self.rules.len() / 2);
        let mut hashed = Vec::new();
        for entry @ (agent, p, rules) in &c.destinations_v4 {
            if !uses(agent, AGENT_DST_LPM_V4) {
                hashed.push(entry);
                continue;
            }
            let key = Key::new(
                OWNER_BITS + u32::from(p.len),
                LpmV4 {
                    owner: owner(slot, *agent),
                    addr: p.addr,
                },
            );
            self.dst_v4
                .insert(&key, rules, 0)
                .map_err(err("writing", maps::DST_V4))?;
        }
        let keys: Vec<_> = hashed
            .iter()
            .map(|(agent, p, rules)| {
                let (owner, len) = (owner_word(slot, *agent), u32::from(p.len));
                (
                    dst_key_v4(owner, len, u32::from_be_bytes(p.addr)),
                    index.acquire(rules).map(|(i, _)| i),
                )
            })
            .collect();
        let target = (&mut tables, TABLE_DST_V4);
        for at in place(
            &mut self.dst_table_v4,
            maps::DST_TABLE_V4,
            slot,
            target,
            &keys,
        )? {
            let (agent, p, rules) = hashed[at];
            // In the hash map the entry carries its rule set: it holds no index.
            if keys[at].1.is_some() {
                index.release(rules);
            }
            let key = DstV4Key {
                owner: owner_word(slot, *agent),
                len: u32::from(p.len),
                addr: p.addr,
            };
            self.dst_hash_v4
                .insert(key, rules, 0)
                .map_err(err("writing", maps::DST_HASH_V4))?;
        }
        let mut hashed = Vec::new();
        for entry @ (agent, p, rules) in &c.destinations_v6 {
            if !uses(agent, AGENT_DST_LPM_V6) {
                hashed.push(entry);
                continue;
            }
            let key = Key::new(
                OWNER_BITS + u32::from(p.len),
                LpmV6 {
                    owner: owner(slot, *agent),
                    addr: p.addr,
                },
            );
            self.dst_v6
                .insert(&key, rules, 0)
                .map_err(err("writing", maps::DST_V6))?;
        }
        let keys: Vec<_> = hashed
            .iter()
            .map(|(agent, p, rules)| {
                let (owner, len) = (owner_word(slot, *agent), u32::from(p.len));
                // The address's halves, as the source key has them.
                let [hi, lo] = src_key_v6(p.addr);
                (
                    dst_key_v6(owner, len, hi, lo),
                    index.acquire(rules).map(|(i, _)| i),
                )
            })
            .collect();
        let target = (&mut tables, TABLE_DST_V6);
        for at in place(
            &mut self.dst_table_v6,
            maps::DST_TABLE_V6,
            slot,
            target,
            &keys,
        )? {
            let (agent, p, rules) = hashed[at];
            if keys[at].1.is_some() {
                index.release(rules);
            }
            let key = DstV6Key {
                owner: owner_word(slot, *agent),
                len: u32::from(p.len),
                addr: p.addr,
            };
            self.dst_hash_v6
                .insert(key, rules, 0)
                .map_err(err("writing", maps::DST_HASH_V6))?;
        }
        let (keys, sets): (Vec<u32>, Vec<RuleSet>) = index
            .sets()
            .map(|(rules, i)| (i << 1 | slot, *rules))
            .unzip();
        update_batch(&mut self.rules, &keys, &sets, maps::RULES)?;
        self.rule_index[slot as usize] = Some(index);
        // Last: the program reads the tables only through this.
        self.tables
            .set(slot, tables, 0)
            .map_err(err("writing", maps::TABLES))?;
        for (agent, kind, name, rules) in &c.server_names {
            // Names are validated host names (at most 253 bytes, no zero byte).
            let key = SniKey::new(slot, *agent, *kind, name.as_bytes())
                .expect("policy names fit an SNI key");
            self.sni
                .insert(key, rules, 0)
                .map_err(err("writing", maps::SNI))?;
        }
        self.tls_ports
            .set(slot, c.tls_ports, 0)
            .map_err(err("writing", maps::TLS_PORTS))?;
        self.slots
            .set(slot, slot_config(c), 0)
            .map_err(err("writing", maps::SLOTS))
    }
}

impl KernelMaps {
    /// Allows `agent` to reach `addr` until `expires_ns` (CLOCK_MONOTONIC) under `rules`:
    /// an address its resolver answered for an allowed name. Replaces an earlier entry.
    pub fn learn_name(
        &mut self,
        agent: u32,
        addr: IpAddr,
        expires_ns: u64,
        rules: &[(Proto, PortRange)],
    ) -> Result<(), MapsError> {
        let rules = name_rule_set(rules).map_err(|count| MapsError::TooManyNameRules { count })?;
        let entry = NameEntry { expires_ns, rules };
        match addr {
            IpAddr::V4(a) => self
                .names_v4
                .insert(
                    NameV4Key {
                        agent,
                        addr: a.octets(),
                    },
                    entry,
                    0,
                )
                .map_err(err("writing", maps::NAMES_V4)),
            IpAddr::V6(a) => self
                .names_v6
                .insert(
                    NameV6Key {
                        agent,
                        addr: a.octets(),
                    },
                    entry,
                    0,
                )
                .map_err(err("writing", maps::NAMES_V6)),
        }
    }

    /// Removes what [`KernelMaps::learn_name`] allowed; absent entries are fine.
    pub fn forget_name(&mut self, agent: u32, addr: IpAddr) -> Result<(), MapsError> {
        let removed = match addr {
            IpAddr::V4(a) => self.names_v4.remove(&NameV4Key {
                agent,
                addr: a.octets(),
            }),
            IpAddr::V6(a) => self.names_v6.remove(&NameV6Key {
                agent,
                addr: a.octets(),
            }),
        };
        match removed {
            Ok(()) => Ok(()),
            Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err(
                "deleting from",
                if addr.is_ipv4() {
                    maps::NAMES_V4
                } else {
                    maps::NAMES_V6
                },
            )(e)),
        }
    }

    /// Every learned entry: `(agent, address, expiry)`.
    pub fn learned_names(&self) -> Result<Vec<(u32, IpAddr, u64)>, MapsError> {
        let mut out = Vec::new();
        for item in self.names_v4.iter() {
            let (k, v) = item.map_err(err("reading", maps::NAMES_V4))?;
            out.push((k.agent, IpAddr::from(k.addr), v.expires_ns));
        }
        for item in self.names_v6.iter() {
            let (k, v) = item.map_err(err("reading", maps::NAMES_V6))?;
            out.push((k.agent, IpAddr::from(k.addr), v.expires_ns));
        }
        Ok(out)
    }

    /// Makes `resolvers` the only addresses agents with host names may send DNS to.
    pub fn set_resolvers(&mut self, resolvers: &[SocketAddr]) -> Result<(), MapsError> {
        let wanted: Vec<ResolverKey> = resolvers.iter().map(|a| resolver_key(*a)).collect();
        remove_where!(self.resolvers, maps::RESOLVERS, |k: &ResolverKey| !wanted
            .contains(k));
        for key in wanted {
            self.resolvers
                .insert(key, 1, 0)
                .map_err(err("writing", maps::RESOLVERS))?;
        }
        Ok(())
    }
}

/// The `RESOLVERS` key of `addr`: IPv4 as IPv4-mapped IPv6.
fn resolver_key(addr: SocketAddr) -> ResolverKey {
    let ip = match addr.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    ResolverKey {
        addr: ip.octets(),
        port: addr.port(),
        _pad: [0; 2],
    }
}

/// The per-slot flags of a compiled policy.
pub fn slot_config(c: &Compiled) -> SlotConfig {
    let mut flags = 0;
    if c.unknown_drop {
        flags |= SLOT_UNKNOWN_DROP;
    }
    if !c.source_prefixes_v4.is_empty() {
        flags |= SLOT_SRC_LPM_V4;
    }
    if !c.source_prefixes_v6.is_empty() {
        flags |= SLOT_SRC_LPM_V6;
    }
    if !c.interfaces.is_empty() {
        flags |= SLOT_HAS_IFACES;
    }
    SlotConfig { flags, _pad: 0 }
}

/// In-memory [`PolicyMaps`] for tests of the apply protocol.
#[derive(Debug, Default)]
pub struct FakeMaps {
    /// The state map.
    pub state: State,
    /// What each slot holds.
    pub slots: [Option<Compiled>; 2],
    /// When set, `write_slot` fails (after clearing) to simulate a full map.
    pub fail_writes: bool,
    /// Every slot written whole, in order.
    pub writes: Vec<u32>,
    /// Every slot updated in place, in order.
    pub updates: Vec<u32>,
}

impl PolicyMaps for FakeMaps {
    fn state(&self) -> Result<State, MapsError> {
        Ok(self.state)
    }

    fn set_state(&mut self, state: State) -> Result<(), MapsError> {
        self.state = state;
        Ok(())
    }

    fn clear_slot(&mut self, slot: u32) -> Result<(), MapsError> {
        self.slots[slot as usize] = None;
        Ok(())
    }

    fn write_slot(&mut self, slot: u32, compiled: &Compiled) -> Result<(), MapsError> {
        self.writes.push(slot);
        if self.fail_writes {
            return Err(MapsError::Injected { map: maps::DST_V4 });
        }
        self.slots[slot as usize] = Some(compiled.clone());
        Ok(())
    }

    fn update_slot(
        &mut self,
        slot: u32,
        from: &Compiled,
        to: &Compiled,
    ) -> Result<bool, MapsError> {
        assert_eq!(
            self.slots[slot as usize].as_ref(),
            Some(from),
            "an update starts from what the slot holds"
        );
        self.updates.push(slot);
        if self.fail_writes {
            return Err(MapsError::Injected { map: maps::DST_V4 });
        }
        self.slots[slot as usize] = Some(to.clone());
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernels_older_than_5_18_are_refused_by_release() {
        assert_eq!(kernel_supported("5.10.0-27-amd64"), Some(false));
        assert_eq!(kernel_supported("5.17.15"), Some(false));
        assert_eq!(kernel_supported("5.18.0"), Some(true));
        assert_eq!(kernel_supported("6.1.0-57-amd64"), Some(true));
        assert_eq!(kernel_supported("6.18.44-fc-v1272"), Some(true));
        assert_eq!(kernel_supported("4.19.0"), Some(false));
        assert_eq!(kernel_supported("unknown"), None);
        assert_eq!(kernel_supported(""), None);
    }

    use super::*;

    fn policy(unknown_drop: bool) -> Compiled {
        Compiled {
            unknown_drop,
            ..Compiled::default()
        }
    }

    #[test]
    fn apply_writes_the_inactive_slot_then_flips() {
        let mut maps = FakeMaps::default();
        let mut slots = Slots::default();
        assert_eq!(apply(&mut maps, &mut slots, &policy(true)).unwrap(), 1);
        assert_eq!(maps.state.active_slot, 1);
        assert_eq!(maps.slots[1], Some(policy(true)));
        assert_eq!(apply(&mut maps, &mut slots, &policy(false)).unwrap(), 2);
        assert_eq!(maps.state.active_slot, 0);
        assert_eq!(maps.slots[0], Some(policy(false)));
        // The previous policy stays intact in the other slot until the next apply.
        assert_eq!(maps.slots[1], Some(policy(true)));
        assert_eq!(maps.writes, vec![1, 0]);
    }

    #[test]
    fn failed_write_keeps_the_running_policy() {
        let mut maps = FakeMaps::default();
        let mut slots = Slots::default();
        apply(&mut maps, &mut slots, &policy(true)).unwrap();
        maps.fail_writes = true;
        let err = apply(&mut maps, &mut slots, &policy(false)).unwrap_err();
        assert!(matches!(err, ApplyError::Write { slot: 0, .. }), "{err:?}");
        assert_eq!(maps.state.active_slot, 1);
        assert_eq!(maps.state.generation, 1);
        assert_eq!(maps.slots[1], Some(policy(true)));
        assert_eq!(maps.slots[0], None, "a half-written slot is cleared");
    }

    #[test]
    fn known_slots_get_only_changes_and_unknown_ones_are_written_whole() {
        let mut maps = FakeMaps::default();
        let mut slots = Slots::default();
        // A new process knows neither slot: the first two applies write whole.
        for p in [policy(true), policy(false), policy(true), policy(false)] {
            apply(&mut maps, &mut slots, &p).unwrap();
        }
        assert_eq!(maps.writes, [1, 0]);
        assert_eq!(maps.updates, [1, 0]);
        assert_eq!(slots.last_write(), Some(SlotWrite::Changes));
        assert_eq!(maps.slots[0], Some(policy(false)));
        // A failed update leaves its slot unknown: the next apply to it writes whole.
        maps.fail_writes = true;
        apply(&mut maps, &mut slots, &policy(true)).unwrap_err();
        maps.fail_writes = false;
        apply(&mut maps, &mut slots, &policy(true)).unwrap();
        assert_eq!(maps.writes, [1, 0, 1]);
        assert_eq!(slots.last_write(), Some(SlotWrite::Whole));
        // Another process flipped: neither slot is known any more.
        maps.state.generation += 1;
        maps.state.active_slot ^= 1;
        apply(&mut maps, &mut slots, &policy(false)).unwrap();
        assert_eq!(maps.writes, [1, 0, 1, 1]);
    }

    #[test]
    fn slot_flags_follow_the_policy() {
        let mut c = policy(true);
        assert_eq!(slot_config(&c).flags, SLOT_UNKNOWN_DROP);
        c.interfaces.push((3, 1));
        c.source_prefixes_v6.push((
            crate::dataplane::compile::Prefix {
                addr: [0; 16],
                len: 64,
            },
            1,
        ));
        assert_eq!(
            slot_config(&c).flags,
            SLOT_UNKNOWN_DROP | SLOT_HAS_IFACES | SLOT_SRC_LPM_V6
        );
    }
}

/// `union bpf_attr` as the `BPF_MAP_*_BATCH` commands read it.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Elements per `BPF_MAP_UPDATE_BATCH` call: the kernel copies keys and values in one go, so
/// this bounds what one call holds the map's update path for.
const UPDATE_CHUNK: usize = 4096;

/// Set once the kernel refused `BPF_MAP_UPDATE_BATCH`: later writes go element by element
/// without asking again.
static NO_UPDATE_BATCH: AtomicBool = AtomicBool::new(false);

/// Writes `values[i]` at key `keys[i]` of an array map with `BPF_MAP_UPDATE_BATCH` (Linux
/// 5.6), [`UPDATE_CHUNK`] elements a call: a whole write of 100,000 agents or of a table's
/// buckets takes tens of syscalls rather than one per element. A kernel that refuses the
/// command (`EINVAL` before 5.6, `ENOTSUPP` for a map without it) gets one write per
/// element, now and from then on.
fn update_batch<V: aya::Pod>(
    map: &mut Array<MapData, V>,
    keys: &[u32],
    values: &[V],
    name: &'static str,
) -> Result<(), MapsError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    use aya::maps::IterableMap as _;
    debug_assert_eq!(keys.len(), values.len());
    let mut done = 0;
    if !NO_UPDATE_BATCH.load(Ordering::Relaxed) {
        let fd = map.map().fd().as_fd().as_raw_fd() as u32;
        while done < keys.len() {
            let count = (keys.len() - done).min(UPDATE_CHUNK);
            let mut attr = BatchAttr {
                keys: keys[done..].as_ptr() as u64,
                values: values[done..].as_ptr() as u64,
                count: count as u32,
                map_fd: fd,
                ..BatchAttr::default()
            };
            // SAFETY: attr points at `count` keys and `count` values of the map's key and
            // value types (u32 and V), which the kernel only reads, valid for the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_UPDATE_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            if rc == 0 {
                done += count;
                continue;
            }
            let errno = io::Error::last_os_error();
            // 524 is the kernel's ENOTSUPP, which reaches user space as is.
            if !matches!(
                errno.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
            ) {
                return Err(MapsError::BatchWrite {
                    map: name,
                    source: errno,
                });
            }
            // Writing an array element again is harmless: the rest, one at a time.
            tracing::debug!(map = name, error = %errno, "no batch updates: writing element by element");
            NO_UPDATE_BATCH.store(true, Ordering::Relaxed);
            break;
        }
    }
    for (key, value) in keys[done..].iter().zip(&values[done..]) {
        map.set(*key, value, 0).map_err(err("writing", name))?;
    }
    Ok(())
}

/// Reads every element of an array map (`values_per_key` values per key: 1, or the
/// number of possible CPUs for a per-CPU array) with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6),
/// a few syscalls instead of one per element: what keeps `stats` and a metrics scrape
/// cheap at 100,000 agents.
/// Per-CPU values are laid out per possible CPU: how many, for a batch read of `map`.
fn possible_cpus(map: &'static str) -> Result<usize, MapsError> {
    aya::util::nr_cpus().map_err(|(_, source)| MapsError::Batch { map, source })
}

/// One agent's counters, summed over its per-CPU values.
fn sum_counters(per_cpu: &[AgentCounters]) -> AgentCounters {
    let mut sum = AgentCounters::default();
    for cpu in per_cpu {
        sum.add(cpu);
    }
    sum
}

/// Reads the values of keys `0..entries` of an array map with `BPF_MAP_LOOKUP_BATCH`, a few
/// syscalls whatever the count, collected.
fn lookup_batch<V: aya::Pod + Default + Clone>(
    map: &MapData,
    entries: u32,
    values_per_key: usize,
    name: &'static str,
) -> Result<Vec<V>, MapsError> {
    let mut out = Vec::with_capacity(entries as usize * values_per_key);
    for_each_batch(map, entries, values_per_key, name, |chunk: &[V]| {
        out.extend_from_slice(chunk);
    })?;
    Ok(out)
}

/// Hands the values of keys `0..entries` of an array map to `f`, a batch at a time (each
/// key's `values_per_key` values together), without collecting them: at 100,000 agents the
/// per-CPU counters are tens of megabytes, which a scrape need not allocate.
fn for_each_batch<V: aya::Pod + Default + Clone>(
    map: &MapData,
    entries: u32,
    values_per_key: usize,
    name: &'static str,
    mut f: impl FnMut(&[V]),
) -> Result<(), MapsError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // Keys per syscall: 8192, fewer when that would take more than 4 MiB of values (per-CPU
    // values on a many-CPU machine).
    let chunk = (4 << 20) / (values_per_key * size_of::<V>()).max(1);
    let chunk = chunk.clamp(1, 8192) as u32;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut seen = 0u32;
    let mut keys = vec![0u32; chunk as usize];
    let mut values = vec![V::default(); chunk as usize * values_per_key];
    let (mut cursor, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const cursor) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers of `chunk` keys and `chunk * values_per_key` values
        // of the map's value size (V is the map's value type, a multiple of 8 bytes for the
        // per-CPU layout), valid for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let errno = io::Error::last_os_error();
        let done = rc != 0 && errno.raw_os_error() == Some(libc::ENOENT);
        if rc != 0 && !done {
            return Err(MapsError::Batch {
                map: name,
                source: errno,
            });
        }
        // Never more than `entries` keys, though the kernel's batch may run past them.
        let take = attr.count.min(entries - seen);
        f(&values[..take as usize * values_per_key]);
        seen += take;
        if done || seen >= entries {
            return Ok(());
        }
        cursor = next;
        first = false;
    }
}

impl KernelMaps {
    /// Every agent's counters summed over CPUs, indexed by agent id then reason, in a few
    /// batch syscalls.
    pub fn counters_batch(&self) -> Result<Vec<[Counter; Reason::COUNT as usize]>, MapsError> {
        self.counters_upto(self.stride - 1)
    }

    /// Counters of agents `0..=last` (ids are dense from 1 in practice, so this reads only
    /// the part of the map in use), summed over CPUs.
    pub fn counters_upto(
        &self,
        last: u32,
    ) -> Result<Vec<[Counter; Reason::COUNT as usize]>, MapsError> {
        let mut out = Vec::new();
        self.visit_counters(last, |_, c| out.push(c.by_reason))?;
        Ok(out)
    }

    /// Calls `f` with each agent id `0..=last` and everything counted for it, summed over
    /// CPUs, in a few batch syscalls and without collecting the per-CPU values.
    pub fn visit_counters(
        &self,
        last: u32,
        mut f: impl FnMut(u32, &AgentCounters),
    ) -> Result<(), MapsError> {
        use aya::maps::IterableMap as _;
        let agents = last.min(self.stride - 1) + 1;
        let cpus = possible_cpus(maps::COUNTERS)?;
        let mut id = 0;
        for_each_batch(
            self.counters.map(),
            agents,
            cpus,
            maps::COUNTERS,
            |chunk: &[AgentCounters]| {
                for per_cpu in chunk.chunks(cpus) {
                    f(id, &sum_counters(per_cpu));
                    id += 1;
                }
            },
        )
    }

    /// Every agent's policy in the active slot, indexed by agent id, in a few batch
    /// syscalls.
    pub fn agent_policies(&self) -> Result<Vec<AgentPolicy>, MapsError> {
        use aya::maps::IterableMap as _;
        let state = self.state()?;
        let all: Vec<AgentPolicy> =
            lookup_batch(self.agents.map(), self.stride * 2, 1, maps::AGENTS)?;
        let base = (state.active_slot * self.stride) as usize;
        Ok(all
            .get(base..base + self.stride as usize)
            .map(<[_]>::to_vec)
            .unwrap_or_default())
    }

    /// Entries per slot the agents map holds (`max_agents + 1`).
    pub fn agent_stride(&self) -> u32 {
        self.stride
    }
}
