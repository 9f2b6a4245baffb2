//! The audit trail of denials: events from the XDP program's `AUDIT` ring buffer become JSON
//! lines in a hash-chained, append-only file that [`verify`] can prove intact.
//!
//! # Flow
//! The XDP program reports every drop and every monitor-mode would-drop, within a per-agent
//! budget ([`AuditRate`], default 100 events/s with a burst of 100), as an
//! [`AuditEvent`]. Events over the budget are counted as *suppressed*, events that find the
//! ring full as *lost*, per agent, in the agent's `COUNTERS` entry ([`collect_stats`]): a gap in the log is
//! always visible in the counters. [`run`] reads the ring, names agents and the policy from
//! the [`AuditContext`] the daemon publishes on each apply, and appends through
//! [`AuditLog`].
//!
//! # Line format
//! One JSON object per line, compact, keys in this fixed order:
//!
//! ```text
//! {"seq":1,"time":"2026-11-28T10:00:00.123456789Z","ktime_ns":8123456789,"agent":1,
//!  "agent_name":"coder","reason":"egress_denied","verdict":"drop","proto":"tcp",
//!  "src":"10.1.0.2:40000","dst":"10.9.1.5:443","ifindex":3,"len":60,
//!  "policy_generation":4,"policy_digest":"9f86…","prev":"5e2b…"}
//! ```
//! (one line in the file). `seq` counts records from 1, across rotated files (see below). `time` is RFC 3339 UTC;
//! `ktime_ns` the kernel's CLOCK_MONOTONIC reading it was converted from (see
//! [`WallClock`]). `agent_name` is null for unknown traffic (agent 0) and when the policy the
//! event was decided under is not known to the reader. `proto`, `src` and `dst` are null when
//! the frame's IP header could not be read; IPv6 endpoints are written `[addr]:port`, and the
//! port is 0 when the protocol has none. `verdict` is `pass` for monitor-mode would-drops.
//! `policy_generation` is the generation the program saw; `policy_digest` is the hex SHA-256
//! of that generation's policy text, null when the reader does not know it (events left in
//! the pinned ring from before the daemon started).
//!
//! A guard's transition (a breaker opened, half-open or closed, a quota used up) is a
//! [`GuardRecord`] instead: `event` names it, `reason` is the reason of the packet that
//! caused it, and it has no tuple. Transitions are never folded into summaries.
//!
//! # Hash chain
//! `prev` is the hex SHA-256 of the previous line's exact bytes, without its newline; the
//! first line of a file has 64 zeros. The verifier hashes the raw bytes it read and never
//! re-serializes, so there is no canonical-form question: whatever bytes the writer wrote
//! are what is chained. Changing, inserting or deleting any line but the last breaks the
//! chain at a line [`verify`] names. What a chain alone cannot show: removal of lines at the
//! end, or a last line edited; the writer keeps the chain's head outside the log for that
//! ([`head`], checked by [`verify_anchored`]). A whole file rewritten from scratch, head
//! file included, needs the head collected off the host (`status`, `/metrics`).
//!
//! # Faults
//! A write error does not stop the trail: see [`writer`]. A damaged end found at start is
//! set aside, not refused: see [`AuditLog::open_at`].
//!
//! # Rotation
//! logrotate (or anything) renames the file and signals the daemon (SIGHUP or SIGUSR1),
//! which [`AuditLog::reopen`]s the path: the new file's first line continues the chain, with
//! the next `seq` and the hash of the rotated file's last line as its `prev`. [`verify_set`]
//! checks the files oldest first as one chain; a set whose oldest file was deleted starts
//! mid-chain, and the report says at which `seq` and after which hash.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{File, OpenOptions},
    future::Future,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use enforcer_common::{
    AUDIT_FAMILY_V4, AUDIT_FAMILY_V6, AuditConfig, AuditEvent, Reason, UNITS_PER_SEC, UNKNOWN_AGENT,
};
use ring::digest;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, watch},
};

use crate::dataplane::{KernelMaps, MapsError};

pub mod budget;
pub mod head;
pub mod writer;

pub use budget::{GlobalBudget, SummaryRecord};
pub use head::Head;
pub use writer::{Health, SharedHealth, Writer};

/// `prev` of the first line of a file.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Mode of a newly created log file (before the umask): owner writes, group reads.
pub const LOG_MODE: u32 = 0o640;

/// How long [`run`] holds events of a policy generation it has no [`AuditContext`] for yet,
/// waiting for the daemon to publish it (it publishes after `apply` returns, which includes
/// a 20 ms grace period, so a fresh policy's first denials usually arrive first).
pub const CONTEXT_WAIT: Duration = Duration::from_secs(1);

/// Contexts of past generations [`run`] keeps, so events still in the ring from before a
/// reload are attributed to the policy that decided them.
const CONTEXT_HISTORY: usize = 16;

/// Events [`run`] writes between two yields to the runtime, so a large backlog does not
/// starve the daemon's other tasks (signals, reloads) on its single thread.
const WRITE_CHUNK: usize = 256;

/// Errors of the audit trail.
#[derive(Debug, Error)]
pub enum AuditError {
    /// A file operation on the log failed.
    #[error("{op} audit log {path}")]
    Io {
        /// What was being done ("opening", "reading", ...).
        op: &'static str,
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the log's write lock: two writers would fork the chain.
    #[error("audit log {path} is locked by another writer (is another daemon running?)")]
    Locked {
        /// The log file.
        path: PathBuf,
    },
    /// The log is not intact: the first bad line and why.
    #[error("{path}:{line}: {problem}")]
    Corrupt {
        /// The log file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        problem: Problem,
    },
    /// Appending a record failed; the file was cut back to its last whole record.
    #[error("appending to audit log {path}")]
    Write {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A record could not be serialized as a JSON object.
    #[error("serializing an audit record")]
    Serialize {
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The chain head saved outside the log is not one.
    #[error("{path} is not an audit chain head: {message}")]
    Head {
        /// The head file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// Registering or polling the ring buffer's file descriptor failed.
    #[error("polling the audit ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8)")]
    Ring {
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Why a line of the log is bad.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Problem {
    /// The line's bytes changed: its hash is not the `prev` the next line records.
    #[error(
        "line was altered: it hashes to {actual}, but line {next_line} records prev {recorded}"
    )]
    Altered {
        /// The line after it, which holds the recorded hash.
        next_line: u64,
        /// SHA-256 of the line as it is now.
        actual: String,
        /// `prev` of the next line.
        recorded: String,
    },
    /// The line's own `prev` does not match the line before it, though the next line
    /// confirms this line's bytes are as written: its `prev` field was changed.
    #[error("prev is {recorded}, but the line before hashes to {expected}")]
    PrevMismatch {
        /// SHA-256 of the previous line (or [`GENESIS`]).
        expected: String,
        /// `prev` as the line holds it.
        recorded: String,
    },
    /// `seq` jumps: lines before this one were deleted (or lines inserted).
    #[error("seq is {found} where {expected} was due: records are missing before this line")]
    Missing {
        /// The seq the chain expected.
        expected: u64,
        /// The seq the line holds.
        found: u64,
    },
    /// The line is not a JSON object with `seq` and `prev`.
    #[error("not an audit record: {message}")]
    Unparsable {
        /// The parser's message.
        message: String,
    },
    /// The last line has no newline: a write was cut short (crash, full disk) or the file was
    /// truncated.
    #[error("the last line is truncated (no newline at its end)")]
    Truncated,
    /// The log ends before the head recorded outside it: records were cut from its end.
    #[error(
        "the log ends at seq {last_seq}, but the chain head recorded outside it is seq {recorded_seq} ({recorded_hash}): records were cut from the end"
    )]
    CutTail {
        /// `seq` of the log's last record.
        last_seq: u64,
        /// `seq` of the recorded head.
        recorded_seq: u64,
        /// Hash of the recorded head.
        recorded_hash: String,
    },
    /// The record at the recorded head's `seq` is not the one that was written there.
    #[error(
        "seq {seq} hashes to {actual}, but the chain head recorded outside the log says {recorded}: the record was changed (and the lines after it, if any, rewritten)"
    )]
    HeadMismatch {
        /// `seq` of the recorded head.
        seq: u64,
        /// SHA-256 of the line as it is now.
        actual: String,
        /// The recorded hash.
        recorded: String,
    },
}

/// The audit limiter's budget per agent, as operators write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct AuditRate {
    /// Sustained events per second per agent; 0 turns events off (all are counted as
    /// suppressed).
    pub events_per_sec: u32,
    /// Events an idle agent may produce back to back; 0 also turns events off.
    pub burst: u32,
}

impl Default for AuditRate {
    fn default() -> Self {
        AuditRate {
            events_per_sec: 100,
            burst: 100,
        }
    }
}

/// Largest [`AuditConfig::event_tolerance`]: 146 years, far beyond any useful burst, and
/// low enough that `now + tolerance + cost` never overflows the kernel's 64-bit arithmetic.
const MAX_TOLERANCE: u64 = 1 << 62;

impl AuditRate {
    /// The map value the kernel reads (GCRA in `1 >> TIME_SHIFT` ns units, like the packet
    /// limiters). A burst too long to express saturates at 146 years.
    pub fn config(&self) -> AuditConfig {
        if self.events_per_sec == 0 {
            return AuditConfig::default();
        }
        let cost = UNITS_PER_SEC / u64::from(self.events_per_sec);
        AuditConfig {
            event_cost: cost,
            event_tolerance: u64::from(self.burst)
                .saturating_mul(cost)
                .min(MAX_TOLERANCE),
        }
    }
}

/// What the reader needs to know about the applied policy, published by the daemon on a
/// `watch` channel after every successful apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditContext {
    /// Policy generation `apply` returned.
    pub generation: u64,
    /// Hex SHA-256 of the policy file's text ([`sha256_hex`]).
    pub digest: String,
    /// Agent names by id.
    pub agents: BTreeMap<u32, String>,
}

impl AuditContext {
    /// The context of generation `generation`, applied from `policy_text`.
    pub fn new(generation: u64, policy_text: &str, agents: BTreeMap<u32, String>) -> Self {
        AuditContext {
            generation,
            digest: sha256_hex(policy_text.as_bytes()),
            agents,
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// Converts the kernel's `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock time.
///
/// The offset between CLOCK_REALTIME and CLOCK_MONOTONIC is sampled by reading the
/// monotonic clock on both sides of a realtime reading (the midpoint bounds the error by
/// half the sampling window, well under a microsecond). [`run`] samples again before every
/// batch, so a step of the wall clock (settimeofday, an NTP step) or a suspend (which stops
/// CLOCK_MONOTONIC) shows in the next batch; an event that waited in the ring across such a
/// step is converted with the new offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    /// Samples both clocks now.
    pub fn sample() -> Self {
        let before = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        let after = clock_ns(libc::CLOCK_MONOTONIC);
        WallClock {
            offset_ns: real - (before + after) / 2,
        }
    }

    /// A clock with a fixed offset (realtime minus monotonic), for tests.
    pub fn with_offset(offset_ns: i128) -> Self {
        WallClock { offset_ns }
    }

    /// Nanoseconds since the Unix epoch of the monotonic reading `ktime_ns`.
    pub fn unix_ns(&self, ktime_ns: u64) -> i128 {
        i128::from(ktime_ns) + self.offset_ns
    }
}

/// `clock` (CLOCK_MONOTONIC, CLOCK_REALTIME, ...) in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-28T10:00:00.123456789Z` (ISO 8601's
/// default format in the `time` crate: always nine fractional digits, `Z` for UTC). A time
/// outside the years -9999 to 9999 cannot be written so and comes out as
/// `@<nanoseconds since the epoch>`, which no clock of this century produces.
pub fn rfc3339(unix_ns: i128) -> String {
    use time::format_description::well_known::Iso8601;
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_ns)
        .ok()
        .and_then(|t| t.format(&Iso8601::DEFAULT).ok())
        .unwrap_or_else(|| format!("@{unix_ns}"))
}

/// Name of an IP protocol number, or the number itself. The names are IANA's keywords in
/// lower case, except 4 (keyword "IPv4", IPv4 in IPv4), named `ipip` as `ip tunnel` and
/// `/etc/protocols` do, so it does not read as "an IPv4 packet".
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        2 => "igmp".into(),
        4 => "ipip".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        41 => "ipv6".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => n.to_string(),
    }
}

/// Decodes one ring buffer record; `None` if it is not the size of an [`AuditEvent`] (an
/// object and a daemon from different builds).
pub fn decode(bytes: &[u8]) -> Option<AuditEvent> {
    if bytes.len() != size_of::<AuditEvent>() {
        return None;
    }
    // SAFETY: the length is checked; AuditEvent is plain integers (any bit pattern is
    // valid) and the read is unaligned-safe.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<AuditEvent>()) })
}

/// The body of one log line (the writer adds `seq` in front and `prev` at the end). Field
/// order is the line's key order; see the module docs for each field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 UTC wall-clock time of the event.
    pub time: String,
    /// The kernel's CLOCK_MONOTONIC reading, nanoseconds.
    pub ktime_ns: u64,
    /// Agent id (0: traffic from no known agent).
    pub agent: u32,
    /// Agent name under the event's policy, if known.
    pub agent_name: Option<String>,
    /// Reason name ([`Reason::name`]), or `reason-N` for a number this build does not know.
    pub reason: String,
    /// `drop`, or `pass` for a monitor-mode would-drop (`unknown` with an unknown reason).
    pub verdict: String,
    /// IP protocol name ([`proto_name`]); null without an IP header.
    pub proto: Option<String>,
    /// Source `ip:port`; null without an IP header.
    pub src: Option<String>,
    /// Destination `ip:port`; null without an IP header.
    pub dst: Option<String>,
    /// Interface the frame arrived on.
    pub ifindex: u32,
    /// Frame length in bytes.
    pub len: u32,
    /// Policy generation the program saw.
    pub policy_generation: u64,
    /// Hex SHA-256 of that generation's policy text, if known.
    pub policy_digest: Option<String>,
}

impl Record {
    /// The record of `event`, with names from `context` when it is the context of the
    /// event's generation.
    pub fn new(event: &AuditEvent, context: Option<&AuditContext>, clock: &WallClock) -> Self {
        let context = context.filter(|c| c.generation == event.generation);
        let reason = Reason::from_u32(event.reason);
        let endpoint = |addr: &[u8; 16], port: u16| match event.family {
            AUDIT_FAMILY_V4 => Some(
                SocketAddr::new(
                    Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).into(),
                    port,
                )
                .to_string(),
            ),
            AUDIT_FAMILY_V6 => {
                Some(SocketAddr::new(Ipv6Addr::from(*addr).into(), port).to_string())
            }
            _ => None,
        };
        let has_ip = matches!(event.family, AUDIT_FAMILY_V4 | AUDIT_FAMILY_V6);
        Record {
            time: rfc3339(clock.unix_ns(event.time_ns)),
            ktime_ns: event.time_ns,
            agent: event.agent,
            agent_name: if event.agent == UNKNOWN_AGENT {
                None
            } else {
                context.and_then(|c| c.agents.get(&event.agent).cloned())
            },
            reason: reason.map_or_else(|| format!("reason-{}", event.reason), |r| r.name().into()),
            verdict: match reason {
                Some(r) if r.is_drop() => "drop",
                Some(_) => "pass",
                None => "unknown",
            }
            .into(),
            proto: has_ip.then(|| proto_name(event.proto)),
            src: endpoint(&event.src, event.src_port),
            dst: endpoint(&event.dst, event.dst_port),
            ifindex: event.ifindex,
            len: event.len,
            policy_generation: event.generation,
            policy_digest: context.map(|c| c.digest.clone()),
        }
    }
}

/// The body of a guard transition's log line (an [`AuditEvent`] with a `kind`): a breaker
/// opened, half-open or closed, or a quota used up. Beside the fields of a packet's
/// [`Record`] that a transition has, `event` names it, and what it carries follows:
/// the cooldown level and (while it is still open when the reader sees it) the end of the
/// cooldown for `breaker_opened`, the quota's name for `quota_exhausted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardRecord {
    /// RFC 3339 UTC wall-clock time of the transition.
    pub time: String,
    /// The kernel's CLOCK_MONOTONIC reading, nanoseconds.
    pub ktime_ns: u64,
    /// `breaker_opened`, `breaker_half_open`, `breaker_closed`, `quota_exhausted`.
    pub event: String,
    /// Agent id.
    pub agent: u32,
    /// Agent name under the event's policy, if known.
    pub agent_name: Option<String>,
    /// The reason of the packet that caused it ([`Reason::name`]).
    pub reason: String,
    /// Breaker events: the cooldown level (reopenings in a row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_level: Option<u8>,
    /// `breaker_opened`: when the cooldown ends (RFC 3339), if the breaker was still open
    /// when the reader looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_until: Option<String>,
    /// `quota_exhausted`: the quota (`bytes_per_hour`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    /// Policy generation the program saw.
    pub policy_generation: u64,
    /// Hex SHA-256 of that generation's policy text, if known.
    pub policy_digest: Option<String>,
}

impl GuardRecord {
    /// The record of transition `event` (`event.kind != 0`), named from `context` when it
    /// is the context of the event's generation; `open_until` is the breaker's cooldown end
    /// in CLOCK_MONOTONIC nanoseconds, if known. `None` for a packet or an unknown kind.
    pub fn new(
        event: &AuditEvent,
        context: Option<&AuditContext>,
        clock: &WallClock,
        open_until: Option<u64>,
    ) -> Option<Self> {
        use enforcer_common::guard::{EVENT_BREAKER_OPENED, EVENT_QUOTA_EXHAUSTED, QUOTA_NAMES};
        let name = crate::node::guards::event_name(event.kind)?;
        let context = context.filter(|c| c.generation == event.generation);
        let quota = event.kind == EVENT_QUOTA_EXHAUSTED;
        Some(GuardRecord {
            time: rfc3339(clock.unix_ns(event.time_ns)),
            ktime_ns: event.time_ns,
            event: name.into(),
            agent: event.agent,
            agent_name: context.and_then(|c| c.agents.get(&event.agent).cloned()),
            reason: Reason::from_u32(event.reason)
                .map_or_else(|| format!("reason-{}", event.reason), |r| r.name().into()),
            cooldown_level: (!quota).then_some(event.detail),
            open_until: open_until
                .filter(|_| event.kind == EVENT_BREAKER_OPENED)
                .map(|ns| rfc3339(clock.unix_ns(ns))),
            quota: quota.then(|| {
                QUOTA_NAMES
                    .get(usize::from(event.detail))
                    .map_or_else(|| format!("quota-{}", event.detail), |n| (*n).to_string())
            }),
            policy_generation: event.generation,
            policy_digest: context.map(|c| c.digest.clone()),
        })
    }
}

/// What the reader needs for guard transitions: the counter behind
/// `enforcer_guard_transitions_total`, and the maps, to read when an opened breaker's
/// cooldown ends (the ring record carries only its level).
#[derive(Default)]
pub struct GuardAudit {
    /// Transitions seen, by event.
    pub transitions: crate::node::guards::GuardTransitions,
    /// The pinned maps, if they could be opened.
    pub maps: Option<KernelMaps>,
}

impl GuardAudit {
    /// The end of agent `agent`'s cooldown in CLOCK_MONOTONIC ns, if its breaker is open.
    fn open_until(&self, agent: u32) -> Option<u64> {
        use enforcer_common::guard::{BREAKER_OPEN, breaker_parts};
        let state = self.maps.as_ref()?.guard_state(agent).ok()?;
        let (kind, _, time) = breaker_parts(state.breaker);
        (kind == BREAKER_OPEN).then_some(time >> enforcer_common::TIME_SHIFT)
    }
}

/// Where a [`UserEvent`] was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserSource {
    /// The per-agent DNS resolver.
    Dns,
    /// The inspecting TLS proxy.
    Proxy,
    /// The audit writer, about the log itself ([`NoticeRecord`]).
    Audit,
    /// The local API: a policy or mode change, with who asked.
    Api,
}

/// A decision made in user space rather than by the XDP program: a refused DNS name, a
/// detector hit in the inspecting proxy. It goes into the same hash-chained log as the
/// kernel's events, through [`UserAudit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserEvent {
    /// Which component decided.
    pub source: UserSource,
    /// Agent id (0: no known agent).
    pub agent: u32,
    /// Stable reason name, e.g. `dns_refused`, `detector_block`.
    pub reason: &'static str,
    /// `drop` (refused, blocked) or `pass` (flagged, or monitor mode).
    pub verdict: &'static str,
    /// The agent's end of the exchange.
    pub src: Option<SocketAddr>,
    /// The destination, `ip:port` or `host:port`, when there is one.
    pub dst: Option<String>,
    /// The host name in question (DNS question, TLS server name, CONNECT host).
    pub name: Option<String>,
    /// What matched or why, e.g. the detector's name.
    pub detail: Option<String>,
    /// Who asked, for a change made through the local API.
    pub actor: Option<crate::node::api::Peer>,
    /// The MCP request, for the proxy's MCP records.
    pub mcp: Option<McpDetail>,
}

/// What an MCP record is about: the server, the JSON-RPC method and the tool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpDetail {
    /// The `[[mcp_servers]]` entry the request went to; absent for a server not in the
    /// registry (shadow MCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The request's path (without the query).
    pub path: String,
    /// The JSON-RPC method, e.g. `tools/call`.
    pub method: String,
    /// The tool of a `tools/call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// The body of a [`UserEvent`]'s log line (the writer adds `seq` and `prev`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// RFC 3339 UTC wall-clock time the writer received the event.
    pub time: String,
    /// Which component decided.
    pub source: UserSource,
    /// Agent id.
    pub agent: u32,
    /// Agent name under the newest policy the writer knows.
    pub agent_name: Option<String>,
    /// Reason name.
    pub reason: String,
    /// `drop` or `pass`.
    pub verdict: String,
    /// The agent's end, `ip:port`.
    pub src: Option<String>,
    /// The destination.
    pub dst: Option<String>,
    /// The host name in question.
    pub name: Option<String>,
    /// What matched or why.
    pub detail: Option<String>,
    /// Who asked (uid, gid, pid), for a change made through the local API; absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<crate::node::api::Peer>,
    /// The MCP request, for the proxy's MCP records; absent otherwise (so records written
    /// before it existed hash the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpDetail>,
    /// Newest policy generation the writer knows.
    pub policy_generation: u64,
    /// Hex SHA-256 of that policy's text.
    pub policy_digest: Option<String>,
}

impl UserRecord {
    fn new(event: UserEvent, context: Option<&AuditContext>, unix_ns: i128) -> Self {
        UserRecord {
            time: rfc3339(unix_ns),
            source: event.source,
            agent: event.agent,
            agent_name: context.and_then(|c| c.agents.get(&event.agent).cloned()),
            reason: event.reason.into(),
            verdict: event.verdict.into(),
            src: event.src.map(|a| a.to_string()),
            dst: event.dst,
            name: event.name,
            detail: event.detail,
            actor: event.actor,
            mcp: event.mcp,
            policy_generation: context.map_or(0, |c| c.generation),
            policy_digest: context.map(|c| c.digest.clone()),
        }
    }
}

/// The body of a line the writer adds about the log itself: events it could not write
/// (`events_lost`), a damaged tail it set aside at start (`tail_set_aside`), a log that
/// no longer reaches the head recorded outside it (`chain_head_mismatch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeRecord {
    /// RFC 3339 UTC wall-clock time the writer wrote it.
    pub time: String,
    /// Always [`UserSource::Audit`].
    pub source: UserSource,
    /// What happened.
    pub reason: String,
    /// Events not written (`events_lost`; 0 for the other reasons).
    pub events_lost: u64,
    /// What happened, in words, with the file names and counts to follow it up.
    pub detail: String,
}

impl NoticeRecord {
    /// A notice of `reason`, timed now.
    pub fn new(reason: &str, events_lost: u64, detail: String) -> Self {
        NoticeRecord {
            time: rfc3339(time::OffsetDateTime::now_utc().unix_timestamp_nanos()),
            source: UserSource::Audit,
            reason: reason.into(),
            events_lost,
            detail,
        }
    }
}

/// Events queued for the writer before [`UserAudit::record`] starts counting them lost.
pub const USER_QUEUE: usize = 4096;

/// A cloneable handle that user-space components record [`UserEvent`]s through. Never
/// blocks: when the writer's queue is full the event is counted in [`UserAudit::lost`]
/// (exported as a metric), so a gap is visible, as with the kernel's ring.
#[derive(Clone, Debug)]
pub struct UserAudit {
    tx: mpsc::Sender<UserEvent>,
    lost: Arc<AtomicU64>,
}

impl UserAudit {
    /// A handle and the receiver to give [`run`].
    pub fn channel() -> (Self, mpsc::Receiver<UserEvent>) {
        let (tx, rx) = mpsc::channel(USER_QUEUE);
        (
            UserAudit {
                tx,
                lost: Arc::new(AtomicU64::new(0)),
            },
            rx,
        )
    }

    /// Queues `event` for the log.
    pub fn record(&self, event: UserEvent) {
        if self.tx.try_send(event).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events that found the queue full (or the writer gone).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// A line as the writer serializes it: `seq`, the body's fields, then `prev`.
#[derive(Serialize)]
struct LineOut<'a, T: Serialize> {
    seq: u64,
    #[serde(flatten)]
    body: &'a T,
    prev: &'a str,
}

/// The two fields the chain needs, read from any line.
#[derive(Deserialize)]
struct ChainFields {
    seq: u64,
    prev: String,
}

/// The append-only, hash-chained log file. One writer per file, enforced with an exclusive
/// `flock` held while the value lives.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file: where a failed append cuts back to.
    len: u64,
    last_seq: u64,
    head: String,
}

impl AuditLog {
    /// [`AuditLog::open_at`] without a recorded head, writing the notices it returns: for
    /// tools and tests that write a log of their own.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let (mut log, notices) = AuditLog::open_at(path, None)?;
        for notice in &notices {
            log.append(notice)?;
        }
        Ok(log)
    }

    /// Opens `path` for appending, creating it with mode [`LOG_MODE`] (less the umask). An
    /// existing file's chain continues from its last line, so a restarted daemon extends
    /// the same chain; an empty file continues `anchor`, the head recorded outside the log
    /// (a log rotated away while the daemon was stopped). Only the end of the file is read
    /// (the whole file is [`verify`]'s job).
    ///
    /// A damaged end does not stop the opening, which would stop the daemon: a last line
    /// cut short (a crash or a full disk during a write) or not an audit record is moved to
    /// a side file beside the log (`<log>.tail-<unix seconds>`) and the log cut back to its
    /// last whole record. A log that no longer reaches `anchor` (records cut from its end,
    /// or its last one changed) continues its own last line. Each finding is returned as a
    /// [`NoticeRecord`] for the writer to append first, so the chain says what happened.
    pub fn open_at(
        path: &Path,
        anchor: Option<&Head>,
    ) -> Result<(Self, Vec<NoticeRecord>), AuditError> {
        let io_err = |op| {
            move |source| AuditError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(LOG_MODE)
            .open(path)
            .map_err(io_err("opening"))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                AuditError::Locked {
                    path: path.to_path_buf(),
                }
            } else {
                io_err("locking")(e)
            });
        }
        let len = file.metadata().map_err(io_err("reading"))?.len();
        let mut log = AuditLog {
            path: path.to_path_buf(),
            file,
            len,
            last_seq: 0,
            head: GENESIS.to_string(),
        };
        let mut notices = Vec::new();
        if len > 0 {
            let mut last = [0u8];
            log.file
                .seek(SeekFrom::Start(len - 1))
                .and_then(|_| log.file.read_exact(&mut last))
                .map_err(io_err("reading"))?;
            if last[0] != b'\n' {
                let piece = last_line(&mut log.file, len).map_err(io_err("reading"))?;
                notices.push(log.set_aside(
                    len - piece.len() as u64,
                    "the last line was cut short (a write interrupted by a crash or a full disk)",
                )?);
            }
        }
        if log.len > 0 {
            let line = last_line(&mut log.file, log.len - 1).map_err(io_err("reading"))?;
            match serde_json::from_slice::<ChainFields>(&line) {
                Ok(fields) => {
                    log.last_seq = fields.seq;
                    log.head = sha256_hex(&line);
                }
                Err(e) => {
                    notices.push(log.set_aside(
                        log.len - line.len() as u64 - 1,
                        &format!("the last line is not an audit record ({e})"),
                    )?);
                    log.read_last_strictly()?;
                }
            }
        }
        if let Some(anchor) = anchor.filter(|a| a.seq > 0) {
            if log.len == 0 {
                log.last_seq = anchor.seq;
                log.head = anchor.hash.clone();
            } else if !log.reaches(anchor).map_err(io_err("reading"))? {
                tracing::error!(path = %path.display(), log_seq = log.last_seq, head_seq = anchor.seq, "the audit log does not reach the chain head recorded outside it");
                notices.push(NoticeRecord::new(
                    "chain_head_mismatch",
                    0,
                    format!(
                        "the log ends at seq {} ({}), but the chain head recorded outside it is seq {} ({}): records were cut from the end or changed; the chain continues from the log's last record",
                        log.last_seq, log.head, anchor.seq, anchor.hash
                    ),
                ));
            }
        }
        Ok((log, notices))
    }

    /// Moves the bytes from `from` to the end into a new side file and cuts the log back to
    /// `from`; returns the notice that says so.
    fn set_aside(&mut self, from: u64, why: &str) -> Result<NoticeRecord, AuditError> {
        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { op, path, source }
        };
        let mut piece = vec![0; (self.len - from) as usize];
        self.file
            .seek(SeekFrom::Start(from))
            .and_then(|_| self.file.read_exact(&mut piece))
            .map_err(io_err("reading", &self.path))?;
        let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut side = PathBuf::from(format!("{}.tail-{stamp}", self.path.display()));
        for n in 1.. {
            if !side.exists() {
                break;
            }
            side = PathBuf::from(format!("{}.tail-{stamp}-{n}", self.path.display()));
        }
        // The bytes are safe in the side file before the log loses them.
        crate::durable::replace(&side, &piece, LOG_MODE)
            .map_err(io_err("setting aside the damaged tail of", &self.path))?;
        self.file
            .set_len(from)
            .and_then(|()| self.file.sync_all())
            .map_err(io_err("cutting the damaged tail of", &self.path))?;
        self.len = from;
        let detail = format!(
            "{why}: {} bytes after seq {} moved to {}",
            piece.len(),
            self.last_whole_seq(),
            side.display()
        );
        tracing::warn!(path = %self.path.display(), "{detail}");
        Ok(NoticeRecord::new("tail_set_aside", 0, detail))
    }

    /// `seq` of the last line if it reads as a record, else 0 (for messages only).
    fn last_whole_seq(&mut self) -> u64 {
        if self.len == 0 {
            return 0;
        }
        last_line(&mut self.file, self.len - 1)
            .ok()
            .and_then(|l| serde_json::from_slice::<ChainFields>(&l).ok())
            .map_or(0, |f| f.seq)
    }

    /// Takes the chain's head from the last line, which must be a record.
    fn read_last_strictly(&mut self) -> Result<(), AuditError> {
        if self.len == 0 {
            return Ok(());
        }
        let line = last_line(&mut self.file, self.len - 1).map_err(|source| AuditError::Io {
            op: "reading",
            path: self.path.clone(),
            source,
        })?;
        let fields: ChainFields = serde_json::from_slice(&line).map_err(|e| {
            let lines = count_lines(&mut self.file).unwrap_or(0);
            AuditError::Corrupt {
                path: self.path.clone(),
                line: lines,
                problem: Problem::Unparsable {
                    message: e.to_string(),
                },
            }
        })?;
        self.last_seq = fields.seq;
        self.head = sha256_hex(&line);
        Ok(())
    }

    /// Whether the log still holds `anchor`: the line with its `seq` hashes to its hash.
    /// The log may be ahead of it (records written after the last save of the head); the
    /// lines after it are walked back from the end.
    fn reaches(&mut self, anchor: &Head) -> io::Result<bool> {
        if self.last_seq < anchor.seq {
            return Ok(false);
        }
        let mut end = self.len - 1;
        let mut line = last_line(&mut self.file, end)?;
        loop {
            let Ok(fields) = serde_json::from_slice::<ChainFields>(&line) else {
                return Ok(false);
            };
            if fields.seq <= anchor.seq {
                return Ok(fields.seq == anchor.seq && sha256_hex(&line) == anchor.hash);
            }
            let start = end - line.len() as u64;
            if start == 0 {
                return Ok(false);
            }
            end = start - 1;
            line = last_line(&mut self.file, end)?;
        }
    }

    /// Opens the path again if the file there is no longer the one being written (it was
    /// rotated away); returns the notices of [`AuditLog::open_at`] if it did. A new empty
    /// file continues this chain (next `seq`, `prev` the last line written); a non-empty
    /// one continues its own last line, with a notice that it does not continue this chain.
    /// On an error the current file stays in use.
    pub fn reopen(&mut self) -> Result<Option<Vec<NoticeRecord>>, AuditError> {
        use std::os::unix::fs::MetadataExt as _;
        let current = self.file.metadata().map_err(|source| AuditError::Io {
            op: "reading",
            path: self.path.clone(),
            source,
        })?;
        if let Ok(there) = std::fs::metadata(&self.path)
            && (there.dev(), there.ino()) == (current.dev(), current.ino())
        {
            return Ok(None);
        }
        let anchor = Head {
            log: self.path.clone(),
            seq: self.last_seq,
            hash: self.head.clone(),
        };
        let (next, notices) = AuditLog::open_at(&self.path, Some(&anchor))?;
        // The rotated file keeps what was written; make sure it reached the disk.
        let _ = self.sync();
        *self = next;
        Ok(Some(notices))
    }

    /// Appends `body` (which must serialize to a JSON object, like [`Record`]) as the next
    /// line, chained to the previous one; returns its `seq`. The line goes out in one
    /// `write` on an `O_APPEND` descriptor; if that fails the file is cut back to its last
    /// whole record, so a failed append leaves no torn line behind.
    pub fn append<T: Serialize>(&mut self, body: &T) -> Result<u64, AuditError> {
        let seq = self.last_seq + 1;
        let mut line = serde_json::to_vec(&LineOut {
            seq,
            body,
            prev: &self.head,
        })
        .map_err(|source| AuditError::Serialize { source })?;
        // Compact serde_json output escapes control characters inside strings, so a line
        // never holds a newline of its own.
        let head = sha256_hex(&line);
        line.push(b'\n');
        if let Err(source) = self.file.write_all(&line) {
            let _ = self.file.set_len(self.len);
            return Err(AuditError::Write {
                path: self.path.clone(),
                source,
            });
        }
        self.len += line.len() as u64;
        self.last_seq = seq;
        self.head = head;
        Ok(seq)
    }

    /// Flushes written records to the disk (`fdatasync`).
    pub fn sync(&self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|source| AuditError::Io {
            op: "syncing",
            path: self.path.clone(),
            source,
        })
    }

    /// Hex SHA-256 of the last line: the `prev` of the next one ([`GENESIS`] when empty).
    pub fn head(&self) -> &str {
        &self.head
    }

    /// `seq` of the last line (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Newlines in `file`.
fn count_lines(file: &mut File) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(file);
    let mut n = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(n);
        }
        n += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let used = buf.len();
        reader.consume(used);
    }
}

/// The line that ends at byte `end` (its newline), without the newline.
fn last_line(file: &mut File, end: u64) -> io::Result<Vec<u8>> {
    const STEP: u64 = 4096;
    let mut start = end;
    let mut line = Vec::new();
    while start > 0 {
        let from = start.saturating_sub(STEP);
        let mut chunk = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        if let Some(nl) = chunk.iter().rposition(|&b| b == b'\n') {
            chunk.drain(..=nl);
            chunk.extend_from_slice(&line);
            return Ok(chunk);
        }
        chunk.extend_from_slice(&line);
        line = chunk;
        start = from;
    }
    Ok(line)
}

/// An intact log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records checked.
    pub lines: u64,
    /// `seq` of the first record: 1, or more when the oldest file of a rotated set is gone.
    pub first_seq: u64,
    /// The `prev` of the first record: [`GENESIS`] at the chain's start, else the hash of
    /// the last line of the file before (deleted, or not given).
    pub starts_after: String,
    /// `seq` of the last record (0 for an empty file).
    pub last_seq: u64,
    /// Hex SHA-256 of the last line ([`GENESIS`] for an empty file): record it outside the
    /// host to make later truncation of the log detectable.
    pub head: String,
    /// `seq` of the recorded head [`verify_anchored`] found in the log and matched; `None`
    /// when none was given or it lies before the files given (rotated away).
    pub anchor_checked: Option<u64>,
}

/// One line as [`verify`] reads it.
struct Checked {
    hash: String,
    fields: Result<ChainFields, Problem>,
}

/// Checks every line of the log at `path`: each is a JSON object whose `seq` follows the
/// previous one's and whose `prev` is the SHA-256 of the previous line's raw bytes, and the
/// file ends with a newline. Returns the report of an intact log, or
/// [`AuditError::Corrupt`] naming the first bad line:
/// - a line whose bytes changed: that line ([`Problem::Altered`], found through the next
///   line's `prev`; for the last line only its `prev` can be checked);
/// - a line whose `prev` changed: that line ([`Problem::PrevMismatch`]);
/// - deleted lines: the line after them ([`Problem::Missing`]);
/// - a line that is not JSON: that line; a last line without newline: that line.
///
/// The chain must start in this file (see [`verify_set`] for one that continues a rotated
/// file). Reads the file once, keeping two lines in memory.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_set(&[path.to_path_buf()], false)
}

/// [`verify`] for rotated files, oldest first, as one chain: each file's first line must
/// continue the previous file's last. With `continued`, the oldest file given may start
/// mid-chain (the files before it were rotated away): its first line is taken as given,
/// and the report says where it starts ([`VerifyReport::first_seq`],
/// [`VerifyReport::starts_after`]). Without it, lines cut from the start are caught.
/// Errors name the file and its line.
pub fn verify_set(paths: &[PathBuf], continued: bool) -> Result<VerifyReport, AuditError> {
    verify_anchored(paths, continued, None)
}

/// [`verify_set`], and with `anchor` (the chain head the writer recorded outside the log,
/// [`Head`]) also that nothing was cut from the end: the set must reach the anchor's `seq`
/// ([`Problem::CutTail`]), and the line there must hash to the anchor's hash
/// ([`Problem::HeadMismatch`]), which also catches a changed last line. Lines after the
/// anchor are accepted: the writer saves the head a little after it writes.
pub fn verify_anchored(
    paths: &[PathBuf],
    continued: bool,
    anchor: Option<&Head>,
) -> Result<VerifyReport, AuditError> {
    let mut report: Option<VerifyReport> = None;
    for path in paths {
        let from = report.as_ref().map(|r| (r.last_seq, r.head.clone()));
        let part = verify_file(path, from, continued, anchor)?;
        report = Some(match report {
            None => part,
            Some(r) => VerifyReport {
                lines: r.lines + part.lines,
                first_seq: r.first_seq,
                starts_after: r.starts_after,
                // An empty file in the middle continues nothing and changes nothing.
                last_seq: if part.lines == 0 {
                    r.last_seq
                } else {
                    part.last_seq
                },
                head: if part.lines == 0 { r.head } else { part.head },
                anchor_checked: r.anchor_checked.or(part.anchor_checked),
            },
        });
    }
    let report = report.unwrap_or(VerifyReport {
        lines: 0,
        first_seq: 0,
        starts_after: GENESIS.to_string(),
        last_seq: 0,
        head: GENESIS.to_string(),
        anchor_checked: None,
    });
    if let Some(anchor) = anchor.filter(|a| a.seq > report.last_seq) {
        let last = paths.last().cloned().unwrap_or_default();
        let lines = File::open(&last)
            .and_then(|mut f| count_lines(&mut f))
            .unwrap_or(0);
        return Err(AuditError::Corrupt {
            path: last,
            line: lines + 1,
            problem: Problem::CutTail {
                last_seq: report.last_seq,
                recorded_seq: anchor.seq,
                recorded_hash: anchor.hash.clone(),
            },
        });
    }
    Ok(report)
}

/// One file of a chain; `from` is the previous file's `(last seq, head)`, `None` for the
/// first file, which starts the chain, or with `continued` may start mid-chain.
fn verify_file(
    path: &Path,
    from: Option<(u64, String)>,
    continued: bool,
    anchor: Option<&Head>,
) -> Result<VerifyReport, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        op: "opening",
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::new(file);
    let corrupt = |line, problem| AuditError::Corrupt {
        path: path.to_path_buf(),
        line,
        problem,
    };
    let mut read = |n: u64| -> Result<Option<Checked>, AuditError> {
        let mut buf = Vec::new();
        let got = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| AuditError::Io {
                op: "reading",
                path: path.to_path_buf(),
                source,
            })?;
        if got == 0 {
            return Ok(None);
        }
        if buf.pop() != Some(b'\n') {
            return Err(corrupt(n, Problem::Truncated));
        }
        Ok(Some(Checked {
            hash: sha256_hex(&buf),
            fields: serde_json::from_slice::<ChainFields>(&buf).map_err(|e| Problem::Unparsable {
                message: e.to_string(),
            }),
        }))
    };

    let anchored = from.is_some() || !continued;
    let (mut prev_seq, mut prev_hash) = from.unwrap_or((0, GENESIS.to_string()));
    let mut first_seq = 0;
    let mut anchor_checked = None;
    let mut starts_after = prev_hash.clone();
    let mut n = 0;
    let mut next = read(1)?;
    while let Some(line) = next {
        n += 1;
        let fields = line.fields.map_err(|p| corrupt(n, p))?;
        // Read one line ahead: it tells a changed line from a changed `prev`.
        next = read(n + 1)?;
        if n == 1 {
            // The oldest file given may continue a rotated file that is gone: its first
            // line is where the checked chain starts.
            if !anchored {
                prev_seq = fields.seq - 1;
                prev_hash = fields.prev.clone();
                starts_after = fields.prev.clone();
            }
            first_seq = fields.seq;
        }
        if fields.seq != prev_seq + 1 {
            return Err(corrupt(
                n,
                Problem::Missing {
                    expected: prev_seq + 1,
                    found: fields.seq,
                },
            ));
        }
        if fields.prev != prev_hash {
            // If the next line vouches for this line's bytes, this line is as written and
            // the line before changed. If it does not, this line changed too, and since
            // its `prev` already disagrees, its `prev` is what was edited. Without a next
            // line it cannot be told apart: the line before is named, whose change is the
            // likelier edit. The first line has no line before it.
            let next_vouches = next
                .as_ref()
                .and_then(|l| l.fields.as_ref().ok())
                .is_some_and(|f| f.prev == line.hash);
            let last = next.is_none();
            return Err(if n == 1 || !(next_vouches || last) {
                corrupt(
                    n,
                    Problem::PrevMismatch {
                        expected: prev_hash,
                        recorded: fields.prev,
                    },
                )
            } else {
                corrupt(
                    n - 1,
                    Problem::Altered {
                        next_line: n,
                        actual: prev_hash,
                        recorded: fields.prev,
                    },
                )
            });
        }
        if let Some(anchor) = anchor.filter(|a| a.seq == fields.seq) {
            if line.hash != anchor.hash {
                return Err(corrupt(
                    n,
                    Problem::HeadMismatch {
                        seq: anchor.seq,
                        actual: line.hash,
                        recorded: anchor.hash.clone(),
                    },
                ));
            }
            anchor_checked = Some(anchor.seq);
        }
        prev_hash = line.hash;
        prev_seq = fields.seq;
    }
    Ok(VerifyReport {
        lines: n,
        first_seq,
        starts_after,
        last_seq: prev_seq,
        head: prev_hash,
        anchor_checked,
    })
}

/// The last `n` lines of the log at `path` (fewer if it has fewer), oldest first, without
/// newlines; a truncated last line is included as it is. Reads backwards from the end, so
/// the cost does not grow with the file.
pub fn tail(path: &Path, n: usize) -> Result<Vec<String>, AuditError> {
    let io_err = |op| {
        move |source| AuditError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io_err("opening"))?;
    let len = file.metadata().map_err(io_err("reading"))?.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    const STEP: u64 = 64 * 1024;
    let mut start = len;
    let mut buf = Vec::new();
    // n + 1 newlines (not counting one that ends the file) guarantee n whole lines.
    let newlines = |buf: &[u8]| {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        body.iter().filter(|&&b| b == b'\n').count()
    };
    while start > 0 && newlines(&buf) < n + 1 {
        let from = start.saturating_sub(STEP);
        let mut chunk = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))
            .and_then(|_| file.read_exact(&mut chunk))
            .map_err(io_err("reading"))?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
        start = from;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.split_terminator('\n').collect();
    if start > 0 {
        // The first piece starts mid-line.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| l.to_string()).collect())
}

/// Which records `audit tail` shows; an empty field matches every record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TailFilter {
    /// The agent's name or id.
    pub agent: Option<String>,
    /// The reason (`egress_denied`, `rate_limited_packets`, ...).
    pub reason: Option<String>,
    /// `drop`, or `pass` for monitor-mode would-drops.
    pub verdict: Option<String>,
}

impl TailFilter {
    /// Whether the filter sets anything.
    pub fn is_empty(&self) -> bool {
        *self == TailFilter::default()
    }

    /// Whether the log line `line` passes. A line that is not a JSON object passes only an
    /// empty filter: a damaged line is shown, never silently hidden, unless asked to filter.
    pub fn matches(&self, line: &str) -> bool {
        if self.is_empty() {
            return true;
        }
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        let text = |key: &str| match &record[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        self.agent
            .as_ref()
            .is_none_or(|a| *a == text("agent_name") || *a == text("agent"))
            && self.reason.as_ref().is_none_or(|r| *r == text("reason"))
            && self.verdict.as_ref().is_none_or(|v| *v == text("verdict"))
    }
}

/// Follows the log at `path` as it grows, like `tail -F`: yields each whole line appended
/// after the record with `seq` `after`, and goes on in the new file when the log is
/// rotated (the path names another file, and the old one has no more to read).
pub struct Follower {
    path: PathBuf,
    file: File,
    partial: Vec<u8>,
    after: u64,
}

impl Follower {
    /// Starts at the end of the log (within its last 64 KiB, to pick up lines with a `seq`
    /// above `after` that were written since the caller's last look).
    pub fn new(path: &Path, after: u64) -> Result<Self, AuditError> {
        let mut file = File::open(path).map_err(|source| AuditError::Io {
            op: "opening",
            path: path.to_path_buf(),
            source,
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let from = len.saturating_sub(64 * 1024);
        let _ = file.seek(SeekFrom::Start(from));
        Ok(Follower {
            path: path.to_path_buf(),
            file,
            // Starting mid-file, the first piece is not a whole line: drop it.
            partial: Vec::new(),
            after,
        }
        .skip_first_piece(from > 0))
    }

    fn skip_first_piece(mut self, skip: bool) -> Self {
        if skip {
            let mut byte = [0u8];
            while let Ok(1) = self.file.read(&mut byte) {
                if byte[0] == b'\n' {
                    break;
                }
            }
        }
        self
    }

    /// The whole lines appended since the last call (none if nothing was).
    pub fn poll(&mut self) -> Result<Vec<String>, AuditError> {
        use std::os::unix::fs::MetadataExt as _;
        let mut out = self.read_lines()?;
        // Rotated: the old file is read to its end above, then the new one from its start.
        let current = self.file.metadata().ok().map(|m| (m.dev(), m.ino()));
        let there = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if there.is_some()
            && there != current
            && let Ok(file) = File::open(&self.path)
        {
            self.file = file;
            self.partial.clear();
            out.extend(self.read_lines()?);
        }
        Ok(out)
    }

    fn read_lines(&mut self) -> Result<Vec<String>, AuditError> {
        let mut buf = Vec::new();
        self.file
            .read_to_end(&mut buf)
            .map_err(|source| AuditError::Io {
                op: "reading",
                path: self.path.clone(),
                source,
            })?;
        self.partial.extend_from_slice(&buf);
        let mut lines = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line[..nl]).into_owned();
            let seq = serde_json::from_str::<ChainFields>(&line)
                .map(|f| f.seq)
                .ok();
            if seq.is_none_or(|seq| seq > self.after) {
                if let Some(seq) = seq {
                    self.after = seq;
                }
                lines.push(line);
            }
        }
        Ok(lines)
    }
}

/// One agent's audit events that never reached the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentAuditStats {
    /// Agent id (0 = traffic from no known agent).
    pub id: u32,
    /// Agent name from the applied policy, if known.
    pub name: Option<String>,
    /// Events the per-agent audit limiter refused.
    pub suppressed: u64,
    /// Events admitted that found the ring full.
    pub lost: u64,
}

/// Suppressed and lost events, summed over CPUs, of the unknown agent and of every agent
/// active in the applied policy; `names` maps ids to names.
pub fn collect_stats(
    maps: &KernelMaps,
    names: &BTreeMap<u32, String>,
) -> Result<Vec<AgentAuditStats>, MapsError> {
    let mut ids = vec![UNKNOWN_AGENT];
    ids.extend(maps.active_agents()?);
    let stats = maps.audit_stats_upto(ids.iter().copied().max().unwrap_or(0))?;
    Ok(ids
        .into_iter()
        .map(|id| {
            let s = stats.get(id as usize).copied().unwrap_or_default();
            AgentAuditStats {
                id,
                name: names.get(&id).cloned(),
                suppressed: s.suppressed,
                lost: s.lost,
            }
        })
        .collect())
}

/// What [`run`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Records appended to the log.
    pub records: u64,
    /// Ring records of the wrong size, skipped (an object and a daemon from different
    /// builds); each is also logged as a warning.
    pub malformed: u64,
    /// Events not written because writing the log failed ([`writer`]).
    pub unwritten: u64,
    /// Events over the global budget, folded into summaries ([`budget`]).
    pub summarized: u64,
}

/// Recent contexts by generation.
struct Contexts {
    recent: VecDeque<AuditContext>,
    /// The newest generation [`write_batch`] already waited [`CONTEXT_WAIT`] for: a
    /// context that never comes must not stall every later batch too.
    waited_for: u64,
}

impl Contexts {
    fn push(&mut self, c: AuditContext) {
        if self
            .recent
            .back()
            .is_some_and(|b| b.generation == c.generation)
        {
            self.recent.pop_back();
        }
        if self.recent.len() == CONTEXT_HISTORY {
            self.recent.pop_front();
        }
        self.recent.push_back(c);
    }

    fn get(&self, generation: u64) -> Option<&AuditContext> {
        self.recent
            .iter()
            .rev()
            .find(|c| c.generation == generation)
    }

    fn newest(&self) -> u64 {
        self.recent.back().map_or(0, |c| c.generation)
    }
}

/// The reader task: appends every event of the ring buffer to the log through `writer`
/// until `shutdown` completes, then drains what the ring holds at that moment and returns.
///
/// Wakes on the ring's epoll readiness (tokio `AsyncFd`, no polling interval). Events are
/// named from `context`: the daemon sends an [`AuditContext`] after each successful apply;
/// events of a generation newer than any context seen are held up to [`CONTEXT_WAIT`] for
/// it, then written without names. Each batch ends with an `fdatasync`.
///
/// A write error does not end the task: the [`Writer`] counts what it cannot write and
/// retries with backoff (see [`writer`]). Only a failing ring ends it with an error; while
/// no reader runs, the kernel keeps filling the pinned ring and then counts *lost* events,
/// so nothing disappears unseen.
pub async fn run(
    ring: RingBuf<MapData>,
    mut writer: Writer,
    mut context: watch::Receiver<AuditContext>,
    mut user: mpsc::Receiver<UserEvent>,
    mut reopen: mpsc::Receiver<()>,
    guards: GuardAudit,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, AuditError> {
    // SAFETY: the ring owns its map's descriptor (MapData holds an OwnedFd), which stays
    // open and unchanged until the AsyncFd, owning the ring, is dropped.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| AuditError::Ring { source: e.into() })?;
    let mut contexts = Contexts {
        recent: VecDeque::new(),
        waited_for: 0,
    };
    contexts.push(context.borrow_and_update().clone());
    let mut context_open = true;
    let mut user_open = true;
    let mut reopen_open = true;
    let mut summary = RunSummary::default();
    tokio::pin!(shutdown);
    loop {
        let retry_at = writer.retry_at();
        let save_due = writer.save_due();
        let summaries_due = writer.summaries_due();
        tokio::select! {
            () = &mut shutdown => break,
            event = user.recv(), if user_open => match event {
                Some(event) => {
                    let mut events = vec![event];
                    while let Ok(more) = user.try_recv() {
                        events.push(more);
                    }
                    write_user(events, &mut writer, &contexts, &mut summary);
                }
                None => user_open = false,
            },
            asked = reopen.recv(), if reopen_open => match asked {
                // A failed reopen keeps writing the file it has: nothing is lost.
                Some(()) => match writer.log().reopen() {
                    Ok(Some(notices)) => {
                        let log = writer.log();
                        tracing::info!(path = %log.path().display(), seq = log.last_seq() + 1, "audit log reopened; the chain continues");
                        for notice in &notices {
                            writer.append(notice);
                        }
                        writer.finish();
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "reopening the audit log; still writing the old file"),
                },
                None => reopen_open = false,
            },
            changed = context.changed(), if context_open => match changed {
                Ok(()) => contexts.push(context.borrow_and_update().clone()),
                // The daemon dropped the sender: keep the last context and stop asking.
                Err(_) => context_open = false,
            },
            // Writing failed: retry even when no event comes to try with.
            () = sleep_until(retry_at), if retry_at.is_some() => {
                if writer.ready() {
                    writer.finish();
                }
            },
            () = sleep_until(save_due), if save_due.is_some() => writer.save_head(),
            () = sleep_until(summaries_due), if summaries_due.is_some() => writer.write_summaries(),
            guard = fd.readable_mut() => {
                let mut guard = guard.map_err(|source| AuditError::Ring { source })?;
                // Clear, then drain: an event committed after the drain's last read raises
                // a new wake-up that this clear cannot swallow. (Drain-then-clear could miss
                // it, and the kernel wakes the reader only when it has caught up, so every
                // later event would wait too.)
                guard.clear_ready();
                let batch = drain(guard.get_inner_mut(), &mut summary);
                write_batch(&batch, &mut writer, &mut context, &mut contexts, &mut context_open, &guards, &mut summary).await;
            }
        }
    }
    let mut events = Vec::new();
    while let Ok(more) = user.try_recv() {
        events.push(more);
    }
    write_user(events, &mut writer, &contexts, &mut summary);
    let batch = drain(fd.get_mut(), &mut summary);
    write_batch(
        &batch,
        &mut writer,
        &mut context,
        &mut contexts,
        &mut context_open,
        &guards,
        &mut summary,
    )
    .await;
    summary.unwritten = writer.health().get().events_unwritten;
    writer.close();
    Ok(summary)
}

/// Sleeps until `at` (forever without one: the `select!` arm is disabled then anyway).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Takes every event the ring holds now.
fn drain(ring: &mut RingBuf<MapData>, summary: &mut RunSummary) -> Vec<AuditEvent> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(event) => batch.push(event),
            None => {
                summary.malformed += 1;
                tracing::warn!(
                    bytes = item.len(),
                    expected = size_of::<AuditEvent>(),
                    "skipping an audit ring record of the wrong size"
                );
            }
        }
    }
    batch
}

/// Appends user-space events, named from the newest context, and syncs.
fn write_user(
    events: Vec<UserEvent>,
    writer: &mut Writer,
    contexts: &Contexts,
    summary: &mut RunSummary,
) {
    if events.is_empty() {
        return;
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let context = contexts.recent.back();
    for event in events {
        if writer.append(&UserRecord::new(event, context, now)) {
            summary.records += 1;
        }
    }
    writer.finish();
}

async fn write_batch(
    batch: &[AuditEvent],
    writer: &mut Writer,
    context: &mut watch::Receiver<AuditContext>,
    contexts: &mut Contexts,
    context_open: &mut bool,
    guards: &GuardAudit,
    summary: &mut RunSummary,
) {
    if batch.is_empty() {
        return;
    }
    if !writer.ready() {
        // Writing fails and the retry is not due: count, do not wait for names.
        writer.lose(batch.len() as u64);
        return;
    }
    let newest_event = batch.iter().map(|e| e.generation).max().unwrap_or(0);
    if newest_event > contexts.newest() && newest_event > contexts.waited_for && *context_open {
        contexts.waited_for = newest_event;
        let _ = tokio::time::timeout(CONTEXT_WAIT, async {
            while contexts.newest() < newest_event {
                if context.changed().await.is_err() {
                    *context_open = false;
                    break;
                }
                contexts.push(context.borrow_and_update().clone());
            }
        })
        .await;
    }
    let clock = WallClock::sample();
    for (i, chunk) in batch.chunks(WRITE_CHUNK).enumerate() {
        if i > 0 {
            tokio::task::yield_now().await;
        }
        for event in chunk {
            if event.kind != enforcer_common::guard::EVENT_PACKET {
                // Transitions are rare (one per breaker change or quota window) and are
                // what an operator looks for: never folded into a summary.
                guards.transitions.count(event.kind);
                let until = guards.open_until(event.agent);
                match GuardRecord::new(event, contexts.get(event.generation), &clock, until) {
                    Some(record) if writer.append(&record) => summary.records += 1,
                    Some(_) => {}
                    None => {
                        summary.malformed += 1;
                        tracing::warn!(
                            kind = event.kind,
                            "skipping an audit record of an unknown kind"
                        );
                    }
                }
                continue;
            }
            let record = Record::new(event, contexts.get(event.generation), &clock);
            if !writer.admit(&record) {
                summary.summarized += 1;
            } else if writer.append(&record) {
                summary.records += 1;
            }
        }
    }
    writer.finish();
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _};

    use super::*;

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "enforcer-audit-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn event(i: u32) -> AuditEvent {
        let mut e = AuditEvent {
            time_ns: 1_000_000_000 + u64::from(i),
            generation: 3,
            agent: 1 + i % 3,
            reason: Reason::EgressDenied as u32,
            ifindex: 7,
            len: 60 + i,
            src_port: 40000,
            dst_port: 443,
            family: AUDIT_FAMILY_V4,
            proto: 6,
            ..AuditEvent::default()
        };
        e.src[..4].copy_from_slice(&[10, 1, 0, 2]);
        e.dst[..4].copy_from_slice(&[10, 9, 1, 5]);
        e
    }

    fn context() -> AuditContext {
        AuditContext::new(
            3,
            "[defaults]\n",
            BTreeMap::from([(1, "coder".into()), (2, "web".into())]),
        )
    }

    /// Writes `n` records to a fresh log at `path`.
    fn write(path: &Path, n: u32) {
        let mut log = AuditLog::open(path).unwrap();
        let ctx = context();
        let clock = WallClock::with_offset(1_800_000_000_000_000_000);
        for i in 0..n {
            log.append(&Record::new(&event(i), Some(&ctx), &clock))
                .unwrap();
        }
        log.sync().unwrap();
    }

    fn lines(path: &Path) -> Vec<Vec<u8>> {
        fs::read(path)
            .unwrap()
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn corrupt_at(path: &Path) -> (u64, Problem) {
        match verify(path) {
            Err(AuditError::Corrupt { line, problem, .. }) => (line, problem),
            other => panic!("expected a corrupt log, got {other:?}"),
        }
    }

    #[test]
    fn tunnel_protocols_are_named() {
        // 4 was written as "4" beside "gre" and "ipv6" (issue 15).
        assert_eq!(proto_name(4), "ipip");
        assert_eq!(proto_name(41), "ipv6");
        assert_eq!(proto_name(47), "gre");
        assert_eq!(proto_name(200), "200");
    }

    #[test]
    fn rate_config_matches_the_gcra_units() {
        let c = AuditRate::default().config();
        assert_eq!(c.event_cost, UNITS_PER_SEC / 100);
        assert_eq!(c.event_tolerance, 100 * c.event_cost);
        assert_eq!(
            AuditRate {
                events_per_sec: 0,
                burst: 5
            }
            .config(),
            AuditConfig::default(),
            "rate 0: events off"
        );
        let huge = AuditRate {
            events_per_sec: 1,
            burst: u32::MAX,
        }
        .config();
        assert_eq!(huge.event_tolerance, MAX_TOLERANCE);
    }

    #[test]
    fn rfc3339_formats_utc_with_nanoseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339(1_798_761_599_999_999_999),
            "2026-12-31T23:59:59.999999999Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(rfc3339(i128::MAX), format!("@{}", i128::MAX));
    }

    #[test]
    fn wall_clock_follows_the_realtime_clock() {
        let clock = WallClock::sample();
        let now = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        // Both readings were taken after the sample; they agree to well under a second.
        assert!((clock.unix_ns(mono) - now).abs() < 1_000_000_000);
    }

    #[test]
    fn records_name_agents_and_endpoints() {
        let clock = WallClock::with_offset(1_800_000_000_000_000_000);
        let ctx = context();
        let r = Record::new(&event(0), Some(&ctx), &clock);
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            format!(
                "{{\"time\":\"2027-01-15T08:00:01.000000000Z\",\"ktime_ns\":1000000000,\"agent\":1,\
                 \"agent_name\":\"coder\",\"reason\":\"egress_denied\",\"verdict\":\"drop\",\
                 \"proto\":\"tcp\",\"src\":\"10.1.0.2:40000\",\"dst\":\"10.9.1.5:443\",\
                 \"ifindex\":7,\"len\":60,\"policy_generation\":3,\"policy_digest\":\"{}\"}}",
                sha256_hex(b"[defaults]\n")
            )
        );

        // IPv6, monitor mode, a generation the reader has no context for.
        let mut e = event(0);
        e.family = AUDIT_FAMILY_V6;
        e.src = "fd01::2".parse::<Ipv6Addr>().unwrap().octets();
        e.dst = "fd09::9".parse::<Ipv6Addr>().unwrap().octets();
        e.proto = 17;
        e.reason = Reason::MonitorEgressDenied as u32;
        e.generation = 4;
        let r = Record::new(&e, Some(&ctx), &clock);
        assert_eq!(r.src.as_deref(), Some("[fd01::2]:40000"));
        assert_eq!(r.dst.as_deref(), Some("[fd09::9]:443"));
        assert_eq!(r.proto.as_deref(), Some("udp"));
        assert_eq!(r.verdict, "pass");
        assert_eq!(r.reason, "monitor_egress_denied");
        assert_eq!(r.agent_name, None);
        assert_eq!(r.policy_digest, None);

        // No IP header; unknown agent.
        let e = AuditEvent {
            agent: UNKNOWN_AGENT,
            reason: Reason::UnknownDrop as u32,
            generation: 3,
            ..AuditEvent::default()
        };
        let r = Record::new(&e, Some(&ctx), &clock);
        assert_eq!(
            (r.proto, r.src, r.dst, r.agent_name),
            (None, None, None, None)
        );
        assert_eq!(r.policy_digest, Some(ctx.digest.clone()));
    }

    #[test]
    fn guard_transitions_become_records_of_their_own() {
        use enforcer_common::guard::{EVENT_BREAKER_OPENED, EVENT_QUOTA_EXHAUSTED};
        let clock = WallClock::with_offset(1_800_000_000_000_000_000);
        let ctx = context();
        let opened = AuditEvent {
            time_ns: 2_000_000_000,
            generation: 3,
            agent: 1,
            reason: Reason::EgressDenied as u32,
            kind: EVENT_BREAKER_OPENED,
            detail: 2,
            ..AuditEvent::default()
        };
        let r = GuardRecord::new(&opened, Some(&ctx), &clock, Some(62_000_000_000)).unwrap();
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(
            line,
            format!(
                "{{\"time\":\"2027-01-15T08:00:02.000000000Z\",\"ktime_ns\":2000000000,\
                 \"event\":\"breaker_opened\",\"agent\":1,\"agent_name\":\"coder\",\
                 \"reason\":\"egress_denied\",\"cooldown_level\":2,\
                 \"open_until\":\"2027-01-15T08:01:02.000000000Z\",\"policy_generation\":3,\
                 \"policy_digest\":\"{}\"}}",
                sha256_hex(b"[defaults]\n")
            )
        );
        let quota = AuditEvent {
            reason: Reason::QuotaExhausted as u32,
            kind: EVENT_QUOTA_EXHAUSTED,
            detail: 3,
            ..opened
        };
        let r = GuardRecord::new(&quota, Some(&ctx), &clock, Some(1)).unwrap();
        assert_eq!(r.event, "quota_exhausted");
        assert_eq!(r.reason, "quota_exhausted");
        assert_eq!(r.quota.as_deref(), Some("connections_per_day"));
        assert_eq!((r.cooldown_level, r.open_until), (None, None));
        // A packet is no transition; an unknown kind is none either.
        assert!(GuardRecord::new(&event(0), Some(&ctx), &clock, None).is_none());
        let unknown = AuditEvent { kind: 99, ..opened };
        assert!(GuardRecord::new(&unknown, Some(&ctx), &clock, None).is_none());
    }

    #[test]
    fn decode_checks_the_size() {
        let e = event(5);
        // SAFETY: AuditEvent is plain integers with explicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const e).cast::<u8>(), size_of::<AuditEvent>())
        };
        assert_eq!(decode(bytes), Some(e));
        assert_eq!(decode(&bytes[..70]), None);
    }

    #[test]
    fn intact_chain_verifies() {
        let dir = TempDir::new("intact");
        let path = dir.file("audit.log");
        write(&path, 10);
        let report = verify(&path).unwrap();
        assert_eq!(report.lines, 10);
        assert_eq!(report.last_seq, 10);
        let all = lines(&path);
        assert_eq!(report.head, sha256_hex(all[9].strip_suffix(b"\n").unwrap()));
        // The first record links to the genesis hash, each next one to the line before.
        let first: serde_json::Value = serde_json::from_slice(&all[0]).unwrap();
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["seq"], 1);
        let second: serde_json::Value = serde_json::from_slice(&all[1]).unwrap();
        assert_eq!(
            second["prev"],
            sha256_hex(all[0].strip_suffix(b"\n").unwrap())
        );
        // Every line is `{"seq":..., <record>, "prev":...}` and parses back into a Record.
        let line = std::str::from_utf8(&all[3]).unwrap();
        assert!(line.starts_with("{\"seq\":4,\"time\":"), "{line}");
        let record: Record = serde_json::from_str(line).unwrap();
        assert_eq!(record.len, 63);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777 & !LOG_MODE,
            0,
            "created no more permissive than 0640"
        );
        let empty = dir.file("empty.log");
        fs::write(&empty, b"").unwrap();
        assert_eq!(
            verify(&empty).unwrap(),
            VerifyReport {
                lines: 0,
                first_seq: 0,
                starts_after: GENESIS.into(),
                last_seq: 0,
                head: GENESIS.into(),
                anchor_checked: None,
            }
        );
    }

    #[test]
    fn rotation_continues_the_chain_and_the_set_verifies() {
        let dir = TempDir::new("rotate");
        let path = dir.file("audit.jsonl");
        let ctx = context();
        let clock = WallClock::with_offset(1_800_000_000_000_000_000);
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..3 {
            log.append(&Record::new(&event(i), Some(&ctx), &clock))
                .unwrap();
        }
        // Nothing rotated: reopening is a no-op.
        assert!(log.reopen().unwrap().is_none());
        // Rotated twice, logrotate style: rename, then the daemon is signalled.
        let (one, two) = (dir.file("audit.jsonl.1"), dir.file("audit.jsonl.2"));
        for rotated in [&two, &one] {
            fs::rename(&path, rotated).unwrap();
            assert!(log.reopen().unwrap().is_some());
            for i in 0..2 {
                log.append(&Record::new(&event(i), Some(&ctx), &clock))
                    .unwrap();
            }
        }
        log.sync().unwrap();
        let set = [two.clone(), one.clone(), path.clone()];
        let report = verify_set(&set, false).unwrap();
        assert_eq!((report.lines, report.first_seq, report.last_seq), (7, 1, 7));
        assert_eq!(report.head, log.head());
        // The current file alone starts mid-chain, after the rotated file's last line:
        // an error unless it is said to continue one.
        assert!(verify(&path).is_err());
        let alone = verify_set(std::slice::from_ref(&path), true).unwrap();
        assert_eq!((alone.lines, alone.first_seq), (2, 6));
        assert_eq!(
            alone.starts_after,
            verify_set(&set[..2], false).unwrap().head
        );
        // Out of order, or with a file left out in the middle, the link breaks and the
        // error names the file.
        for bad in [
            vec![one.clone(), two.clone()],
            vec![two.clone(), path.clone()],
        ] {
            let err = verify_set(&bad, true).unwrap_err().to_string();
            assert!(err.contains(&bad[1].display().to_string()), "{err}");
        }
        // The oldest file's first lines cut: still caught, inside a file.
        edit_line(&one, 1, |l| l.clear());
        assert!(verify_set(&set, false).is_err());
    }

    /// Rewrites line `k` (1-based) of the log with `f`.
    fn edit_line(path: &Path, k: usize, f: impl FnOnce(&mut Vec<u8>)) {
        let mut all = lines(path);
        f(&mut all[k - 1]);
        fs::write(path, all.concat()).unwrap();
    }

    #[test]
    fn changed_byte_names_its_line() {
        let dir = TempDir::new("flip");
        let path = dir.file("audit.log");
        for k in [1usize, 4, 9] {
            write(&path, 10);
            // A digit of "len": still valid JSON, only the hash chain can tell.
            edit_line(&path, k, |line| {
                let at = line.windows(6).position(|w| w == b"\"len\":").unwrap() + 6;
                line[at] = if line[at] == b'9' { b'8' } else { b'9' };
            });
            let (line, problem) = corrupt_at(&path);
            assert_eq!(line, k as u64, "{problem}");
            assert!(
                matches!(problem, Problem::Altered { next_line, .. } if next_line == k as u64 + 1),
                "{problem}"
            );
            fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn changed_prev_or_broken_json_names_its_line() {
        let dir = TempDir::new("prev");
        let path = dir.file("audit.log");
        write(&path, 6);
        edit_line(&path, 3, |line| {
            let at = line.windows(8).position(|w| w == b"\"prev\":\"").unwrap() + 8;
            line[at] = if line[at] == b'a' { b'b' } else { b'a' };
        });
        let (line, problem) = corrupt_at(&path);
        assert_eq!(line, 3);
        assert!(matches!(problem, Problem::PrevMismatch { .. }), "{problem}");
        fs::remove_file(&path).unwrap();

        write(&path, 6);
        edit_line(&path, 5, |line| line[0] = b'[');
        let (line, problem) = corrupt_at(&path);
        assert_eq!(line, 5);
        assert!(matches!(problem, Problem::Unparsable { .. }), "{problem}");
    }

    #[test]
    fn changed_last_line_is_caught_through_its_prev_only() {
        let dir = TempDir::new("last");
        let path = dir.file("audit.log");
        write(&path, 5);
        // The last line's content is covered by no later hash (see the module docs), but
        // its prev still is checked.
        edit_line(&path, 5, |line| {
            let at = line.windows(8).position(|w| w == b"\"prev\":\"").unwrap() + 8;
            line[at] = if line[at] == b'a' { b'b' } else { b'a' };
        });
        let (line, problem) = corrupt_at(&path);
        assert_eq!(
            line, 4,
            "no next line: reported as the line before changing"
        );
        assert!(
            matches!(problem, Problem::Altered { next_line: 5, .. }),
            "{problem}"
        );
    }

    #[test]
    fn deleted_line_names_the_line_after() {
        let dir = TempDir::new("delete");
        let path = dir.file("audit.log");
        for k in [1usize, 5] {
            write(&path, 8);
            let mut all = lines(&path);
            all.remove(k - 1);
            fs::write(&path, all.concat()).unwrap();
            let (line, problem) = corrupt_at(&path);
            assert_eq!(line, k as u64, "{problem}");
            assert_eq!(
                problem,
                Problem::Missing {
                    expected: k as u64,
                    found: k as u64 + 1
                }
            );
            fs::remove_file(&path).unwrap();
        }
    }

    /// The notices opening `path` against `anchor` found, after appending them.
    fn open_with(path: &Path, anchor: Option<&Head>) -> Vec<NoticeRecord> {
        let (mut log, notices) = AuditLog::open_at(path, anchor).unwrap();
        for n in &notices {
            log.append(n).unwrap();
        }
        notices
    }

    fn side_files(dir: &TempDir) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".tail-"))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_torn_last_line_is_set_aside_and_the_chain_goes_on() {
        let dir = TempDir::new("trunc");
        let path = dir.file("audit.log");
        write(&path, 4);
        let whole = fs::read(&path).unwrap();
        let len = whole.len() as u64;
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        // verify is strict: the damage is named.
        assert_eq!(corrupt_at(&path), (4, Problem::Truncated));
        // Opening sets the torn bytes aside and records that, instead of refusing to start.
        let notices = open_with(&path, None);
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].reason, "tail_set_aside");
        assert!(notices[0].detail.contains("after seq 3"), "{notices:?}");
        let side = side_files(&dir);
        assert_eq!(side.len(), 1, "{side:?}");
        let start = whole[..whole.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        assert_eq!(
            fs::read(&side[0]).unwrap(),
            whole[start..whole.len() - 10],
            "the side file holds exactly the torn bytes"
        );
        let report = verify(&path).unwrap();
        assert_eq!((report.lines, report.last_seq), (4, 4));
        let last: NoticeRecord = serde_json::from_str(&tail(&path, 1).unwrap()[0]).unwrap();
        assert_eq!(last.source, UserSource::Audit);
        assert!(last.detail.contains(&side[0].display().to_string()));
    }

    #[test]
    fn an_unparsable_last_line_is_set_aside() {
        let dir = TempDir::new("garbage");
        let path = dir.file("audit.log");
        write(&path, 2);
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"not a record\n")
            .unwrap();
        let notices = open_with(&path, None);
        assert_eq!(notices.len(), 1);
        assert!(
            notices[0].detail.contains("not an audit record"),
            "{notices:?}"
        );
        assert_eq!(fs::read(&side_files(&dir)[0]).unwrap(), b"not a record\n");
        assert_eq!(verify(&path).unwrap().last_seq, 3);
    }

    fn head_of(path: &Path) -> Head {
        let report = verify(path).unwrap();
        Head {
            log: path.to_path_buf(),
            seq: report.last_seq,
            hash: report.head,
        }
    }

    fn cut_lines(path: &Path, n: usize) {
        let all = lines(path);
        fs::write(path, all[..all.len() - n].concat()).unwrap();
    }

    #[test]
    fn verify_against_the_saved_head_catches_a_cut_or_changed_tail() {
        let dir = TempDir::new("anchor");
        let path = dir.file("audit.log");
        write(&path, 5);
        let original = fs::read(&path).unwrap();
        let head = head_of(&path);
        let checked =
            |anchor: &Head| verify_anchored(std::slice::from_ref(&path), false, Some(anchor));
        assert_eq!(checked(&head).unwrap().anchor_checked, Some(5));
        for cut in [1, 2] {
            cut_lines(&path, cut);
            // The chain alone cannot tell.
            assert!(verify(&path).is_ok());
            match checked(&head) {
                Err(AuditError::Corrupt {
                    line,
                    problem:
                        Problem::CutTail {
                            last_seq,
                            recorded_seq: 5,
                            ..
                        },
                    ..
                }) => assert_eq!((line, last_seq), (6 - cut as u64, 5 - cut as u64)),
                other => panic!("cut {cut}: {other:?}"),
            }
            fs::write(&path, &original).unwrap();
        }
        edit_line(&path, 5, |l| {
            let at = l.windows(5).position(|w| w == b"40000").unwrap();
            l[at] = b'5';
        });
        assert!(
            verify(&path).is_ok(),
            "an edited last line passes the chain"
        );
        assert!(matches!(
            checked(&head),
            Err(AuditError::Corrupt {
                line: 5,
                problem: Problem::HeadMismatch { seq: 5, .. },
                ..
            })
        ));
        // A log ahead of its saved head (records written after the last save) is fine.
        fs::write(&path, &original).unwrap();
        write(&path, 2);
        assert_eq!(checked(&head).unwrap().anchor_checked, Some(5));
        // A head older than the files given cannot be checked, and says so.
        let old = Head {
            seq: 0,
            ..head.clone()
        };
        assert_eq!(checked(&old).unwrap().anchor_checked, None);
    }

    #[test]
    fn opening_a_log_short_of_its_saved_head_records_the_mismatch() {
        let dir = TempDir::new("short");
        let path = dir.file("audit.log");
        write(&path, 4);
        let head = head_of(&path);
        // Ahead of the head, or at it: nothing to say.
        write(&path, 1);
        assert!(open_with(&path, Some(&head)).is_empty());
        cut_lines(&path, 3);
        let notices = open_with(&path, Some(&head));
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].reason, "chain_head_mismatch");
        assert!(notices[0].detail.contains("seq 2"), "{notices:?}");
        // The chain goes on from the log's own last record, the break recorded in it.
        assert_eq!(verify(&path).unwrap().last_seq, 3);
    }

    #[test]
    fn an_empty_log_continues_the_saved_head() {
        let dir = TempDir::new("rotated");
        let path = dir.file("audit.log");
        write(&path, 3);
        let head = head_of(&path);
        fs::rename(&path, dir.file("audit.log.1")).unwrap();
        let (mut log, notices) = AuditLog::open_at(&path, Some(&head)).unwrap();
        assert!(notices.is_empty());
        assert_eq!(log.last_seq(), 3);
        log.append(&Record::new(&event(9), None, &WallClock::with_offset(0)))
            .unwrap();
        let set = verify_set(&[dir.file("audit.log.1"), path.clone()], false).unwrap();
        assert_eq!(set.last_seq, 4);
    }

    #[test]
    fn reopening_continues_the_chain() {
        let dir = TempDir::new("resume");
        let path = dir.file("audit.log");
        write(&path, 3);
        let head = verify(&path).unwrap().head;
        {
            let log = AuditLog::open(&path).unwrap();
            assert_eq!(log.last_seq(), 3);
            assert_eq!(log.head(), head);
        }
        write(&path, 3);
        let report = verify(&path).unwrap();
        assert_eq!((report.lines, report.last_seq), (6, 6));
    }

    #[test]
    fn one_writer_at_a_time() {
        let dir = TempDir::new("lock");
        let path = dir.file("audit.log");
        let _first = AuditLog::open(&path).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Locked { .. })
        ));
    }

    #[test]
    fn failed_append_leaves_the_chain_intact() {
        let dir = TempDir::new("serialize");
        let path = dir.file("audit.log");
        let mut log = AuditLog::open(&path).unwrap();
        log.append(&Record::new(&event(0), None, &WallClock::with_offset(0)))
            .unwrap();
        // Not an object: rejected before anything is written.
        assert!(matches!(log.append(&42), Err(AuditError::Serialize { .. })));
        assert_eq!(log.last_seq(), 1);
        assert_eq!(verify(&path).unwrap().lines, 1);
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = TempDir::new("tail");
        let path = dir.file("audit.log");
        write(&path, 7);
        let all: Vec<String> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(tail(&path, 3).unwrap(), all[4..]);
        assert_eq!(tail(&path, 7).unwrap(), all);
        assert_eq!(tail(&path, 100).unwrap(), all);
        assert!(tail(&path, 0).unwrap().is_empty());
        assert!(matches!(
            tail(&dir.file("missing.log"), 3),
            Err(AuditError::Io { op: "opening", .. })
        ));
    }
}
