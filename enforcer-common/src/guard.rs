//! Runaway-agent guards: new-connection rate, quotas over hours and days, limits shared by
//! every agent that reaches one destination group, and the circuit breaker.
//!
//! The policy half ([`GuardPolicy`], [`SharedPolicy`]) lives in the policy slots and flips
//! with them; the state half ([`GuardState`], the shared groups' [`super::Bucket`]s) is per
//! agent id or group, kept across policy changes and daemon restarts (pinned), like the
//! agents' token buckets.

/// Quota kinds, the index into [`GuardPolicy::quota`] and [`GuardState::quota`].
pub const QUOTA_BYTES_HOUR: usize = 0;
/// Bytes per day (UTC).
pub const QUOTA_BYTES_DAY: usize = 1;
/// New connections per hour.
pub const QUOTA_CONNS_HOUR: usize = 2;
/// New connections per day (UTC).
pub const QUOTA_CONNS_DAY: usize = 3;
/// Number of quota kinds.
pub const QUOTAS: usize = 4;
/// Window length of each quota kind, in seconds.
pub const QUOTA_WINDOW_SECS: [u64; QUOTAS] = [3600, 86_400, 3600, 86_400];
/// Stable names of the quota kinds, in the policy, the CLI and metrics.
pub const QUOTA_NAMES: [&str; QUOTAS] = [
    "bytes_per_hour",
    "bytes_per_day",
    "connections_per_hour",
    "connections_per_day",
];

/// A quota word ([`GuardState::quota`]): the window number in the top bits, one flag bit
/// (the quota refused something in this window, so the exhaustion was reported once),
/// and the use in the low bits. One 64-bit word, so a compare-and-swap moves window and
/// use together and the count is exact on any number of CPUs.
pub const QUOTA_USE_BITS: u32 = 43;
/// The flag bit of a quota word: exhausted in its window.
pub const QUOTA_EXHAUSTED: u64 = 1 << QUOTA_USE_BITS;
/// Where the window number starts in a quota word.
pub const QUOTA_WINDOW_SHIFT: u32 = QUOTA_USE_BITS + 1;
/// Largest use (and quota) a word holds: 8 TiB a day.
pub const QUOTA_MAX: u64 = (1 << QUOTA_USE_BITS) - 1;

/// The window number of wall-clock second `secs` for a window of `len` seconds, as the
/// quota word keeps it (20 bits: the hour numbers repeat after 119 years).
pub const fn quota_window(secs: u64, len: u64) -> u64 {
    (secs / len) & ((1 << (64 - QUOTA_WINDOW_SHIFT)) - 1)
}

/// Splits a quota word into (window, exhausted, use).
pub const fn quota_parts(word: u64) -> (u64, bool, u64) {
    (
        word >> QUOTA_WINDOW_SHIFT,
        word & QUOTA_EXHAUSTED != 0,
        word & QUOTA_MAX,
    )
}

/// [`GuardPolicy::flags`]: the agent has a circuit breaker.
pub const GUARD_BREAKER: u32 = 1 << 0;
/// [`GuardPolicy::flags`]: an open breaker rejects (TCP RST, ICMP administratively
/// prohibited) instead of dropping.
pub const GUARD_BREAKER_REJECT: u32 = 1 << 1;
/// [`GuardPolicy::flags`]: at least one quota is set.
pub const GUARD_QUOTA: u32 = 1 << 2;

/// An agent's guards in one policy slot: map `GUARD_POLICY`, indexed like `AGENTS`
/// (`slot * agent_stride + agent id`). Read only for agents whose `AgentPolicy` has
/// `AGENT_GUARDED`, so agents without guards pay nothing for them.
///
/// Rates are GCRA parameters in limiter time units (`1 >> TIME_SHIFT` ns), as in
/// `AgentPolicy`; durations are in the same units.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardPolicy {
    /// `GUARD_*` flags.
    pub flags: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Cost of one new connection (TCP SYN without ACK); 0: no connection rate.
    pub conn_cost: u64,
    /// Connection burst in time units (`burst * conn_cost`).
    pub conn_tolerance: u64,
    /// Breaker: cost of one strike (a packet of the agent dropped, or that enforce mode
    /// would drop). The breaker opens on the strike its GCRA refuses: `drops` strikes
    /// within `within` seconds is a cost of `within / drops` and a tolerance of `within`.
    pub strike_cost: u64,
    /// Breaker: strike tolerance in time units.
    pub strike_tolerance: u64,
    /// Breaker: the first cooldown, in time units; each reopening from half-open doubles
    /// it, up to `max_cooldown`.
    pub cooldown: u64,
    /// Breaker: the longest cooldown, in time units.
    pub max_cooldown: u64,
    /// Breaker: cost of one new connection while half-open (the probe rate).
    pub probe_cost: u64,
    /// Breaker: probe burst in time units.
    pub probe_tolerance: u64,
    /// Breaker: half-open closes after this long (time units) without a strike.
    pub calm: u64,
    /// Quota per window, by `QUOTA_*` index; 0: none.
    pub quota: [u64; QUOTAS],
}
const _: () = assert!(size_of::<GuardPolicy>() == 112);

/// Breaker states, in the top bits of [`GuardState::breaker`].
pub const BREAKER_CLOSED: u64 = 0;
/// Open: everything of the agent is refused until the word's time.
pub const BREAKER_OPEN: u64 = 1;
/// Half-open since the word's time: new connections at the probe rate.
pub const BREAKER_HALF_OPEN: u64 = 2;
/// Where the state starts in the breaker word.
pub const BREAKER_STATE_SHIFT: u32 = 62;
/// Where the cooldown level (reopenings in a row) starts in the breaker word.
pub const BREAKER_LEVEL_SHIFT: u32 = 56;
/// The breaker word's time: limiter time units shifted right by this, so 56 bits last
/// millennia (one step is 1,024 ns).
pub const BREAKER_TIME_SHIFT: u32 = 14;
/// Mask of the breaker word's time.
pub const BREAKER_TIME_MASK: u64 = (1 << BREAKER_LEVEL_SHIFT) - 1;
/// Highest cooldown level (the cooldown stops doubling at `max_cooldown` anyway).
pub const BREAKER_MAX_LEVEL: u64 = 63;

/// Builds a breaker word.
pub const fn breaker_word(state: u64, level: u64, time_units: u64) -> u64 {
    (state << BREAKER_STATE_SHIFT)
        | ((level & BREAKER_MAX_LEVEL) << BREAKER_LEVEL_SHIFT)
        | ((time_units >> BREAKER_TIME_SHIFT) & BREAKER_TIME_MASK)
}

/// Splits a breaker word into (state, level, time in limiter units).
pub const fn breaker_parts(word: u64) -> (u64, u64, u64) {
    (
        word >> BREAKER_STATE_SHIFT,
        (word >> BREAKER_LEVEL_SHIFT) & BREAKER_MAX_LEVEL,
        (word & BREAKER_TIME_MASK) << BREAKER_TIME_SHIFT,
    )
}

/// An agent's guard state: map `GUARDS`, indexed by agent id. Not per slot: an agent keeps
/// its breaker, connection bucket and quota use across policy changes; a new agent on a
/// reused id starts from zero (`reset_agent`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardState {
    /// Theoretical arrival time of the new-connection limiter.
    pub conn_tat: u64,
    /// Theoretical arrival time of the breaker's strike limiter.
    pub strike_tat: u64,
    /// Theoretical arrival time of the half-open probe limiter.
    pub probe_tat: u64,
    /// The breaker: state, cooldown level and time (see [`breaker_word`]). Open: when the
    /// cooldown ends. Half-open: since when, or the last strike since.
    pub breaker: u64,
    /// How many times the breaker opened, ever (an odometer for metrics).
    pub trips: u64,
    /// Quota words by `QUOTA_*` index (see [`QUOTA_USE_BITS`]).
    pub quota: [u64; QUOTAS],
}
const _: () = assert!(size_of::<GuardState>() == 72);

/// Most destination groups with a shared limit.
pub const MAX_SHARED_GROUPS: u32 = 1024;

/// A destination group's shared limit in one slot: map `SHARED_POLICY`, indexed
/// `group << 1 | slot`. Its bucket (`SHARED_BUCKETS`, a `Bucket` per group) is charged by
/// every agent whose matching egress rule names the group. Group 0 is none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedPolicy {
    /// Cost of one packet in time units; 0: no packets-per-second limit.
    pub packet_cost: u64,
    /// Packet burst in time units.
    pub packet_tolerance: u64,
    /// Bytes per second; 0: no bytes-per-second limit.
    pub byte_rate: u64,
    /// Byte burst in time units.
    pub byte_tolerance: u64,
    /// Cost of one new connection; 0: no connection rate.
    pub conn_cost: u64,
    /// Connection burst in time units.
    pub conn_tolerance: u64,
}
const _: () = assert!(size_of::<SharedPolicy>() == 48);

/// A shared group's limiter state: map `SHARED_BUCKETS`, indexed by group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedBucket {
    /// Theoretical arrival time of the packets limiter.
    pub packet_tat: u64,
    /// Theoretical arrival time of the bytes limiter.
    pub byte_tat: u64,
    /// Theoretical arrival time of the connections limiter.
    pub conn_tat: u64,
}
const _: () = assert!(size_of::<SharedBucket>() == 24);

/// Global guard settings: map `GUARD_CONFIG`, one element, written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardConfig {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC in seconds, at the daemon's last look: quota
    /// windows are wall-clock hours and UTC days. Rewritten every minute, so a clock step
    /// moves the boundaries within a minute.
    pub wall_offset_secs: u64,
}
const _: () = assert!(size_of::<GuardConfig>() == 8);

/// [`super::AuditEvent::kind`]: a packet dropped or would-dropped (every record before
/// guards had this kind).
pub const EVENT_PACKET: u8 = 0;
/// The breaker opened (from closed, or again from half-open).
pub const EVENT_BREAKER_OPENED: u8 = 1;
/// The breaker's cooldown ended: half-open.
pub const EVENT_BREAKER_HALF_OPEN: u8 = 2;
/// The breaker closed after a calm period.
pub const EVENT_BREAKER_CLOSED: u8 = 3;
/// A quota refused its first packet of the window (`detail` is the `QUOTA_*` index).
pub const EVENT_QUOTA_EXHAUSTED: u8 = 4;
