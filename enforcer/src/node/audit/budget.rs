//! The global audit budget: how many of the kernel's events per second become a line of
//! their own, whatever the number of agents; the rest become summaries.
//!
//! The kernel already limits each agent ([`super::AuditRate`], 100 events/s by default), but
//! a thousand agents flooding at once still make 100,000 lines a second (about 42 MB/s and
//! most of a CPU). On top of the per-agent limit, the reader admits at most
//! `events_per_sec` events a second (token bucket, burst of one second's worth) as records.
//! An event over that budget is not dropped silently and not written alone: it is folded
//! into the summary of its agent and reason for the current window, which keeps the count,
//! the first and the last event (time, protocol, endpoints). Every `interval` each summary
//! becomes one `summary` record. So the log grows by at most `events_per_sec` records a
//! second plus one record per agent and reason per interval, and every event the ring
//! delivered is in a record or in a count.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Record, UserSource};

/// The global budget as operators write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct GlobalBudget {
    /// Events per second written as records of their own, all agents together; 0: no
    /// global limit.
    pub events_per_sec: u32,
    /// How long a summary window lasts.
    pub interval: Duration,
}

impl Default for GlobalBudget {
    fn default() -> Self {
        GlobalBudget {
            events_per_sec: 1000,
            interval: Duration::from_secs(10),
        }
    }
}

/// One event of a summary: when and between whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// RFC 3339 time of the event.
    pub time: String,
    /// IP protocol name, if any.
    pub proto: Option<String>,
    /// Source `ip:port`, if any.
    pub src: Option<String>,
    /// Destination `ip:port`, if any.
    pub dst: Option<String>,
}

impl Sample {
    fn of(record: &Record) -> Self {
        Sample {
            time: record.time.clone(),
            proto: record.proto.clone(),
            src: record.src.clone(),
            dst: record.dst.clone(),
        }
    }
}

/// The body of a `summary` line: the events of one agent and reason over the global
/// budget during one window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryRecord {
    /// RFC 3339 time the window closed.
    pub time: String,
    /// Always [`UserSource::Audit`].
    pub source: UserSource,
    /// Always `summary`.
    pub reason: String,
    /// Agent id.
    pub agent: u32,
    /// Agent name, if known.
    pub agent_name: Option<String>,
    /// The events' reason.
    pub event_reason: String,
    /// The events' verdict.
    pub verdict: String,
    /// Events folded into this record.
    pub events: u64,
    /// The first of them.
    pub first: Sample,
    /// The last of them.
    pub last: Sample,
    /// The window's length, seconds.
    pub window_secs: u64,
    /// Policy generation of the last event.
    pub policy_generation: u64,
}

/// The token bucket and the open summaries.
#[derive(Debug)]
pub struct Budget {
    config: GlobalBudget,
    tokens: f64,
    refilled: Instant,
    /// Summaries of the current window, by agent and reason.
    open: BTreeMap<(u32, String), SummaryRecord>,
    /// When the current window closes (`None`: no summary open).
    closes: Option<Instant>,
}

impl Budget {
    /// A full bucket.
    pub fn new(config: GlobalBudget) -> Self {
        Budget {
            config,
            tokens: f64::from(config.events_per_sec),
            refilled: Instant::now(),
            open: BTreeMap::new(),
            closes: None,
        }
    }

    /// Whether `record` may be written as a line of its own now; if not, it is folded
    /// into its summary.
    pub fn admit(&mut self, record: &Record) -> bool {
        let rate = f64::from(self.config.events_per_sec);
        if rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.fold(record, now);
        false
    }

    fn fold(&mut self, record: &Record, now: Instant) {
        let sample = Sample::of(record);
        let window_secs = self.config.interval.as_secs();
        self.closes.get_or_insert(now + self.config.interval);
        self.open
            .entry((record.agent, record.reason.clone()))
            .and_modify(|s| {
                s.events += 1;
                s.last = sample.clone();
                s.policy_generation = record.policy_generation;
            })
            .or_insert_with(|| SummaryRecord {
                time: String::new(),
                source: UserSource::Audit,
                reason: "summary".into(),
                agent: record.agent,
                agent_name: record.agent_name.clone(),
                event_reason: record.reason.clone(),
                verdict: record.verdict.clone(),
                events: 1,
                first: sample.clone(),
                last: sample,
                window_secs,
                policy_generation: record.policy_generation,
            });
    }

    /// When the open summaries are due (`None`: none open).
    pub fn due(&self) -> Option<Instant> {
        self.closes
    }

    /// Closes the window: its summaries, timed `now_rfc3339`, in agent and reason order.
    pub fn close(&mut self, now_rfc3339: &str) -> Vec<SummaryRecord> {
        self.closes = None;
        std::mem::take(&mut self.open)
            .into_values()
            .map(|mut s| {
                s.time = now_rfc3339.to_string();
                s
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent: u32, reason: &str, port: u16) -> Record {
        Record {
            time: format!("2026-12-07T00:00:00.{port:09}Z"),
            ktime_ns: u64::from(port),
            agent,
            agent_name: Some(format!("a{agent}")),
            reason: reason.into(),
            verdict: "drop".into(),
            proto: Some("udp".into()),
            src: Some(format!("10.0.0.{agent}:{port}")),
            dst: Some("10.9.0.1:53".into()),
            ifindex: 1,
            len: 60,
            policy_generation: 2,
            policy_digest: None,
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn events_over_the_global_budget_are_folded_per_agent_and_reason() {
        let mut budget = Budget::new(GlobalBudget {
            events_per_sec: 5,
            interval: Duration::from_secs(10),
        });
        let mut admitted = 0;
        for i in 0..30u16 {
            let agent = 1 + u32::from(i % 2);
            let reason = if i % 3 == 0 {
                "rate_limited_packets"
            } else {
                "egress_denied"
            };
            if budget.admit(&record(agent, reason, i)) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5, "a full bucket: one second's worth");
        assert!(budget.due().is_some());
        let summaries = budget.close("2026-12-07T00:00:10Z");
        assert_eq!(budget.due(), None);
        let total: u64 = summaries.iter().map(|s| s.events).sum();
        assert_eq!(total, 25, "every event over the budget is counted");
        assert_eq!(summaries.len(), 4, "one per agent and reason");
        let s = &summaries[0];
        assert_eq!((s.agent, s.event_reason.as_str()), (1, "egress_denied"));
        assert_eq!(s.reason, "summary");
        assert_eq!(s.source, UserSource::Audit);
        assert_eq!(s.first.src.as_deref(), Some("10.0.0.1:8"));
        assert_eq!(s.last.src.as_deref(), Some("10.0.0.1:28"));
        assert_eq!(s.window_secs, 10);
        // A second later the bucket holds another second's worth.
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = (0..10)
            .filter(|&i| budget.admit(&record(3, "egress_denied", i)))
            .count();
        assert_eq!(again, 5);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn no_global_limit_admits_everything() {
        let mut budget = Budget::new(GlobalBudget {
            events_per_sec: 0,
            interval: Duration::from_secs(1),
        });
        assert!((0..10_000).all(|i| budget.admit(&record(1, "egress_denied", i))));
        assert!(budget.close("t").is_empty());
    }
}
