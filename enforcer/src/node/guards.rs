//! The user-space half of the runaway-agent guards (`enforcer_common::guard`): what the
//! CLI, the metrics and the audit trail show of an agent's breaker and quotas, computed
//! from the `GUARDS` words exactly as the data plane reads them; the wall-clock offset the
//! quota windows need; `breaker reset`; and quota use kept across a reboot
//! (`state_dir/quotas.json`).
//!
//! Breaker state is never saved: its times are CLOCK_MONOTONIC readings, which start again
//! at every boot, so a saved "open until" would mean nothing after one. A breaker starts
//! closed after a reboot (or `enforcer stop --detach`); the strikes that opened it open it
//! again if the agent keeps misbehaving.

use std::{
    collections::BTreeMap,
    io,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use enforcer_common::{
    TIME_SHIFT,
    guard::{
        BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN, EVENT_BREAKER_CLOSED,
        EVENT_BREAKER_HALF_OPEN, EVENT_BREAKER_OPENED, EVENT_QUOTA_EXHAUSTED, GUARD_BREAKER,
        GUARD_BREAKER_REJECT, GuardConfig, GuardPolicy, GuardState, QUOTA_NAMES, QUOTA_WINDOW_SECS,
        QUOTAS, breaker_parts, quota_parts, quota_window,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    dataplane::{KernelMaps, MapsError},
    node::audit::{WallClock, clock_ns, rfc3339},
};

/// Name of the quota file in the state directory.
pub const QUOTA_FILE: &str = "quotas.json";

/// The data plane's clock now: CLOCK_MONOTONIC nanoseconds in limiter time units (the
/// kernel's `tick_now`, which may lag it by a jiffy).
pub fn now_units() -> u64 {
    (clock_ns(libc::CLOCK_MONOTONIC) as u64) << TIME_SHIFT
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, whole seconds: what the data plane adds to its
/// monotonic seconds to number the wall-clock hours and days of quota windows.
pub fn guard_config() -> GuardConfig {
    let offset = WallClock::sample().unix_ns(0);
    GuardConfig {
        wall_offset_secs: u64::try_from(offset.div_euclid(1_000_000_000)).unwrap_or(0),
    }
}

/// A breaker as the data plane will treat the agent's next packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    /// Closed: the agent's traffic is judged as usual.
    Closed,
    /// Open: everything of the agent is refused until `until` (limiter time units).
    Open {
        /// Reopenings in a row (the cooldown doubled this many times).
        level: u64,
        /// End of the cooldown, limiter time units.
        until: u64,
    },
    /// Half-open since `since`: new connections at the probe rate.
    HalfOpen {
        /// Reopenings in a row.
        level: u64,
        /// Since when, limiter time units.
        since: u64,
    },
}

impl Breaker {
    /// The effective state of breaker word `word` at `now` (limiter time units) with the
    /// policy's `calm`, as `guard_decide` computes it: open past its time is half-open (the
    /// next packet moves it there), half-open `calm` past its time is closed.
    pub fn effective(word: u64, now: u64, calm: u64) -> Breaker {
        let (state, level, time) = breaker_parts(word);
        match state {
            BREAKER_OPEN if now < time => Breaker::Open { level, until: time },
            BREAKER_OPEN => Breaker::HalfOpen { level, since: time },
            BREAKER_HALF_OPEN if now.saturating_sub(time) >= calm => Breaker::Closed,
            BREAKER_HALF_OPEN => Breaker::HalfOpen { level, since: time },
            _ => Breaker::Closed,
        }
    }

    /// Stable name: `closed`, `open`, `half_open`.
    pub fn name(&self) -> &'static str {
        match self {
            Breaker::Closed => "closed",
            Breaker::Open { .. } => "open",
            Breaker::HalfOpen { .. } => "half_open",
        }
    }

    /// The cooldown level (0 when closed).
    pub fn level(&self) -> u64 {
        match self {
            Breaker::Closed => 0,
            Breaker::Open { level, .. } | Breaker::HalfOpen { level, .. } => *level,
        }
    }
}

/// Whether the agent has a breaker to show: its policy has one, or its word is not closed
/// (a breaker the policy dropped since, or state written by hand).
pub fn has_breaker(policy: &GuardPolicy, state: &GuardState) -> bool {
    policy.flags & GUARD_BREAKER != 0 || breaker_parts(state.breaker).0 != BREAKER_CLOSED
}

/// The agent's breaker at `now`, or `None` without one (see [`has_breaker`]).
pub fn breaker_of(policy: &GuardPolicy, state: &GuardState, now: u64) -> Option<Breaker> {
    has_breaker(policy, state).then(|| Breaker::effective(state.breaker, now, policy.calm))
}

/// One quota in its current window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaUse {
    /// `QUOTA_*` index.
    pub kind: usize,
    /// The limit per window (0: none).
    pub limit: u64,
    /// Use in the current window: a word of an earlier window counts as 0, as in the
    /// kernel.
    pub used: u64,
    /// Whether the quota refused something in the current window.
    pub exhausted: bool,
    /// Unix second at which the current window ends.
    pub window_end: u64,
}

/// Quota `kind` with `limit` and word `word` at wall-clock second `now_secs`.
pub fn quota_use(kind: usize, limit: u64, word: u64, now_secs: u64) -> QuotaUse {
    let len = QUOTA_WINDOW_SECS[kind];
    let (window, exhausted, used) = quota_parts(word);
    let current = window == quota_window(now_secs, len);
    QuotaUse {
        kind,
        limit,
        used: if current { used } else { 0 },
        exhausted: current && exhausted,
        window_end: (now_secs / len + 1) * len,
    }
}

/// Converts a limiter time to RFC 3339 wall-clock time.
fn wall(clock: &WallClock, units: u64) -> String {
    rfc3339(clock.unix_ns(units >> TIME_SHIFT))
}

/// The `guards` object of `agent --json`: breaker (null without one), trips, and per quota
/// kind with a limit its use in the current window.
pub fn guards_json(
    policy: &GuardPolicy,
    state: &GuardState,
    now: u64,
    clock: &WallClock,
    now_secs: u64,
) -> Value {
    let breaker = breaker_of(policy, state, now).map(|b| {
        let secs = |units: u64| ((units >> TIME_SHIFT) as f64 / 1e9 * 1000.0).round() / 1000.0;
        let (open_until, remaining, since) = match b {
            Breaker::Open { until, .. } => (
                Some(wall(clock, until)),
                Some(secs(until.saturating_sub(now))),
                None,
            ),
            Breaker::HalfOpen { since, .. } => (None, None, Some(wall(clock, since))),
            Breaker::Closed => (None, None, None),
        };
        json!({
            "state": b.name(),
            "cooldown_level": b.level(),
            "open_until": open_until,
            "remaining_secs": remaining,
            "half_open_since": since,
            "action": if policy.flags & GUARD_BREAKER_REJECT != 0 { "reject" } else { "drop" },
        })
    });
    let quotas: serde_json::Map<String, Value> = (0..QUOTAS)
        .filter(|&k| policy.quota[k] != 0)
        .map(|k| {
            let q = quota_use(k, policy.quota[k], state.quota[k], now_secs);
            (
                QUOTA_NAMES[k].to_string(),
                json!({
                    "limit": q.limit,
                    "used": q.used,
                    "exhausted": q.exhausted,
                    "window_ends": rfc3339(i128::from(q.window_end) * 1_000_000_000),
                    "window_ends_in_secs": q.window_end.saturating_sub(now_secs),
                }),
            )
        })
        .collect();
    json!({"breaker": breaker, "trips": state.trips, "quotas": quotas})
}

/// The wall clock's second now.
pub fn unix_secs() -> u64 {
    (clock_ns(libc::CLOCK_REALTIME) / 1_000_000_000) as u64
}

/// `breaker reset`: the breaker closed and its strike and probe limiters full; the quotas,
/// the connection limiter and the trip count stay.
pub fn reset_breaker(state: GuardState) -> GuardState {
    GuardState {
        breaker: 0,
        strike_tat: 0,
        probe_tat: 0,
        ..state
    }
}

/// Names of the transition events of `enforcer_common::guard::EVENT_*`, by number (0 is a
/// packet, no transition).
pub fn event_name(kind: u8) -> Option<&'static str> {
    match kind {
        EVENT_BREAKER_OPENED => Some("breaker_opened"),
        EVENT_BREAKER_HALF_OPEN => Some("breaker_half_open"),
        EVENT_BREAKER_CLOSED => Some("breaker_closed"),
        EVENT_QUOTA_EXHAUSTED => Some("quota_exhausted"),
        _ => None,
    }
}

/// Guard transitions the audit reader saw, by event (`EVENT_*` - 1), for the
/// `enforcer_guard_transitions_total` family.
#[derive(Clone, Debug, Default)]
pub struct GuardTransitions(Arc<[AtomicU64; 4]>);

impl GuardTransitions {
    /// Counts one transition of kind `kind` (`EVENT_*`); other kinds are ignored.
    pub fn count(&self, kind: u8) {
        if let Some(c) = usize::from(kind).checked_sub(1).and_then(|i| self.0.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (event name, count) of every kind.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        (1..=4u8)
            .filter_map(|k| {
                event_name(k).map(|n| (n, self.0[usize::from(k) - 1].load(Ordering::Relaxed)))
            })
            .collect()
    }
}

/// Breaker gauges and the trip odometer over agents 1 to `last`, from one batch read of
/// `GUARDS`: (open, half-open, trips). Only agents whose word is not closed have their
/// policy read (for the calm period).
pub fn breaker_totals(maps: &KernelMaps, last: u32) -> Result<(u64, u64, u64), MapsError> {
    if last == 0 {
        return Ok((0, 0, 0));
    }
    let states = maps.guard_states_upto(last)?;
    let now = now_units();
    let (mut open, mut half, mut trips) = (0, 0, 0);
    for (id, s) in states.iter().enumerate().skip(1) {
        trips += s.trips;
        if breaker_parts(s.breaker).0 == BREAKER_CLOSED {
            continue;
        }
        let policy = maps.guard_policy(id as u32)?;
        match Breaker::effective(s.breaker, now, policy.calm) {
            Breaker::Open { .. } => open += 1,
            Breaker::HalfOpen { .. } => half += 1,
            Breaker::Closed => {}
        }
    }
    Ok((open, half, trips))
}

/// The breaker of every agent 0 to `last` by id (`None`: the agent has none), from batch
/// reads of `AGENTS` and `GUARDS`; only agents with guards, or a word that is not closed,
/// have their `GUARD_POLICY` entry read.
pub fn breakers_upto(maps: &KernelMaps, last: u32) -> Result<Vec<Option<Breaker>>, MapsError> {
    let states = maps.guard_states_upto(last)?;
    let agents = maps.agent_policies()?;
    let now = now_units();
    states
        .iter()
        .enumerate()
        .map(|(id, state)| {
            let guarded = agents
                .get(id)
                .is_some_and(|a| a.flags & enforcer_common::AGENT_GUARDED != 0);
            if !guarded && breaker_parts(state.breaker).0 == BREAKER_CLOSED {
                return Ok(None);
            }
            let policy = maps.guard_policy(id as u32)?;
            Ok(breaker_of(&policy, state, now))
        })
        .collect()
}

/// One agent's quota words in [`QUOTA_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQuota {
    /// Agent id.
    pub id: u32,
    /// Agent name then: the words go back only to an agent of the same id and name.
    pub name: String,
    /// The quota words, by `QUOTA_*` index.
    pub quota: [u64; QUOTAS],
}

/// Saves the quota words of the agents `names` lists (id to name) to `path`, durably.
/// Agents whose words are all zero are left out.
pub fn save_quotas(
    maps: &KernelMaps,
    names: &BTreeMap<u32, String>,
    path: &Path,
) -> Result<usize, SaveError> {
    let last = names.keys().next_back().copied().unwrap_or(0);
    let states = if last == 0 {
        Vec::new()
    } else {
        maps.guard_states_upto(last).map_err(SaveError::Maps)?
    };
    let saved: Vec<SavedQuota> = names
        .iter()
        .filter_map(|(&id, name)| {
            let s = states.get(id as usize)?;
            (s.quota != [0; QUOTAS]).then(|| SavedQuota {
                id,
                name: name.clone(),
                quota: s.quota,
            })
        })
        .collect();
    let text = serde_json::to_vec_pretty(&saved).expect("quota words serialize");
    crate::durable::replace(path, &text, 0o644).map_err(SaveError::Io)?;
    Ok(saved.len())
}

/// Why [`save_quotas`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Reading `GUARDS` failed.
    #[error("reading the guard state")]
    Maps(#[source] MapsError),
    /// Writing the file failed.
    #[error("writing the quota file")]
    Io(#[source] io::Error),
}

/// The saved words to restore: those whose id still has the same name in `names`.
pub fn quotas_to_restore(saved: &[SavedQuota], names: &BTreeMap<u32, String>) -> Vec<SavedQuota> {
    saved
        .iter()
        .filter(|s| names.get(&s.id) == Some(&s.name))
        .cloned()
        .collect()
}

/// Reads [`QUOTA_FILE`] at `path` (none: nothing saved).
pub fn load_quotas(path: &Path) -> io::Result<Vec<SavedQuota>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Writes the saved quota words of agents that still have the same id and name into a
/// freshly created `GUARDS` map (nothing else of their state). Returns how many agents got
/// theirs back.
pub fn restore_quotas(
    maps: &mut KernelMaps,
    saved: &[SavedQuota],
    names: &BTreeMap<u32, String>,
) -> Result<usize, MapsError> {
    let restore = quotas_to_restore(saved, names);
    for s in &restore {
        let state = maps.guard_state(s.id)?;
        maps.set_guard_state(
            s.id,
            GuardState {
                quota: s.quota,
                ..state
            },
        )?;
    }
    Ok(restore.len())
}

#[cfg(test)]
mod tests {
    use enforcer_common::guard::{
        QUOTA_BYTES_DAY, QUOTA_BYTES_HOUR, QUOTA_EXHAUSTED, breaker_word,
    };

    use super::*;

    const SEC: u64 = 1_000_000_000 << TIME_SHIFT;

    #[test]
    fn breaker_state_follows_the_kernel() {
        let open = breaker_word(BREAKER_OPEN, 2, 100 * SEC);
        // Time in the word is kept in steps of 2^14 units; 100 s is a whole number of them.
        assert_eq!(
            Breaker::effective(open, 40 * SEC, 30 * SEC),
            Breaker::Open {
                level: 2,
                until: 100 * SEC
            }
        );
        // Past the cooldown: half-open (the next packet moves it there), since its end.
        assert_eq!(
            Breaker::effective(open, 500 * SEC, 30 * SEC),
            Breaker::HalfOpen {
                level: 2,
                since: 100 * SEC
            }
        );
        let half = breaker_word(BREAKER_HALF_OPEN, 1, 100 * SEC);
        assert_eq!(
            Breaker::effective(half, 120 * SEC, 30 * SEC).name(),
            "half_open"
        );
        // Calm for the calm period: closed.
        assert_eq!(
            Breaker::effective(half, 130 * SEC, 30 * SEC),
            Breaker::Closed
        );
        assert_eq!(Breaker::effective(0, 130 * SEC, 30 * SEC), Breaker::Closed);
        assert_eq!(Breaker::Closed.level(), 0);
    }

    #[test]
    fn breakers_show_when_the_policy_or_the_word_has_one() {
        let none = GuardPolicy::default();
        let state = GuardState::default();
        assert_eq!(breaker_of(&none, &state, SEC), None);
        let with = GuardPolicy {
            flags: GUARD_BREAKER,
            ..GuardPolicy::default()
        };
        assert_eq!(breaker_of(&with, &state, SEC), Some(Breaker::Closed));
        let opened = GuardState {
            breaker: breaker_word(BREAKER_OPEN, 0, 10 * SEC),
            ..state
        };
        assert_eq!(breaker_of(&none, &opened, SEC).unwrap().name(), "open");
    }

    #[test]
    fn quota_use_counts_only_the_current_window() {
        let now = 1_800_000_123; // 2027-01-15T08:02:03Z
        let hour = quota_window(now, 3600);
        let word = (hour << enforcer_common::guard::QUOTA_WINDOW_SHIFT) | 5000;
        let q = quota_use(QUOTA_BYTES_HOUR, 10_000, word, now);
        assert_eq!((q.used, q.exhausted), (5000, false));
        assert_eq!(q.window_end, 1_800_003_600);
        // The word of the previous hour: nothing used in this one.
        let old =
            ((hour - 1) << enforcer_common::guard::QUOTA_WINDOW_SHIFT) | QUOTA_EXHAUSTED | 10_000;
        let q = quota_use(QUOTA_BYTES_HOUR, 10_000, old, now);
        assert_eq!((q.used, q.exhausted), (0, false));
        // Days end at UTC midnight.
        let q = quota_use(QUOTA_BYTES_DAY, 1, 0, now);
        assert_eq!(q.window_end % 86_400, 0);
        assert!(q.window_end > now && q.window_end - now <= 86_400);
    }

    #[test]
    fn guards_json_shows_breaker_and_quotas() {
        let clock = WallClock::with_offset(1_800_000_000_000_000_000);
        let now_secs = 1_800_000_123;
        let policy = GuardPolicy {
            flags: GUARD_BREAKER | GUARD_BREAKER_REJECT,
            quota: [10_000, 0, 0, 0],
            ..GuardPolicy::default()
        };
        let hour = quota_window(now_secs, 3600);
        let state = GuardState {
            breaker: breaker_word(BREAKER_OPEN, 1, 100 * SEC),
            trips: 3,
            quota: [
                (hour << enforcer_common::guard::QUOTA_WINDOW_SHIFT) | 1234,
                0,
                0,
                0,
            ],
            ..GuardState::default()
        };
        let v = guards_json(&policy, &state, 40 * SEC, &clock, now_secs);
        assert_eq!(v["breaker"]["state"], "open");
        assert_eq!(v["breaker"]["cooldown_level"], 1);
        assert_eq!(v["breaker"]["remaining_secs"], 60.0);
        assert_eq!(v["breaker"]["open_until"], "2027-01-15T08:01:40.000000000Z");
        assert_eq!(v["breaker"]["action"], "reject");
        assert_eq!(v["trips"], 3);
        assert_eq!(v["quotas"]["bytes_per_hour"]["used"], 1234);
        assert_eq!(v["quotas"]["bytes_per_hour"]["window_ends_in_secs"], 3477);
        assert!(v["quotas"].get("bytes_per_day").is_none());
    }

    #[test]
    fn reset_keeps_quotas_and_trips() {
        let state = GuardState {
            conn_tat: 1,
            strike_tat: 2,
            probe_tat: 3,
            breaker: breaker_word(BREAKER_OPEN, 4, 5 * SEC),
            trips: 6,
            quota: [7, 8, 9, 10],
        };
        let reset = reset_breaker(state);
        assert_eq!(
            reset,
            GuardState {
                strike_tat: 0,
                probe_tat: 0,
                breaker: 0,
                ..state
            }
        );
    }

    #[test]
    fn quotas_go_back_to_the_same_id_and_name_only() {
        let saved = vec![
            SavedQuota {
                id: 1,
                name: "coder".into(),
                quota: [1, 2, 3, 4],
            },
            SavedQuota {
                id: 2,
                name: "old".into(),
                quota: [5, 6, 7, 8],
            },
        ];
        let names = BTreeMap::from([(1, "coder".to_string()), (2, "new".to_string())]);
        assert_eq!(quotas_to_restore(&saved, &names), saved[..1]);
    }

    #[test]
    fn transitions_are_counted_by_event() {
        let t = GuardTransitions::default();
        t.count(EVENT_BREAKER_OPENED);
        t.count(EVENT_QUOTA_EXHAUSTED);
        t.count(EVENT_QUOTA_EXHAUSTED);
        t.count(0);
        t.count(9);
        assert_eq!(
            t.snapshot(),
            [
                ("breaker_opened", 1),
                ("breaker_half_open", 0),
                ("breaker_closed", 0),
                ("quota_exhausted", 2)
            ]
        );
    }
}
