//! The reader task's side of the log: appends records, rides out write errors, saves the
//! chain head.
//!
//! A write error (full disk, read-only remount, I/O error) never stops the reader. The
//! writer enters a *failing* state: the error shows at once in [`Health`] (status,
//! `/metrics`) and in one log line; events that arrive meanwhile are drained from the ring
//! and counted, not written (holding them would only move the loss into the kernel's ring,
//! where it is counted per agent as *lost*). Every [`RETRY_FIRST`], doubling up to
//! [`RETRY_MAX`], the writer tries to append an `events_lost` record saying how many events
//! were not written, from when, and why; the first one that lands ends the failure and
//! writing goes on. So the chain itself says where it has a gap and how large.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Serialize, Serializer};
use tokio::time::Instant;

use super::{
    AuditLog, NoticeRecord, Record,
    budget::{Budget, GlobalBudget},
    head::Head,
};
use crate::error::error_chain;

/// The first retry after a write error.
pub const RETRY_FIRST: Duration = Duration::from_millis(100);

/// The longest wait between two retries.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

/// How the audit writer is doing, shared with `status` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Health {
    /// The log file being written.
    pub file: PathBuf,
    /// `seq` of the last record written.
    pub seq: u64,
    /// Hex SHA-256 of the last record written: the chain's head.
    pub head: String,
    /// `seq` of the head last saved outside the log (0: none saved yet).
    pub head_saved_seq: u64,
    /// Why writing fails now, if it does.
    pub last_error: Option<String>,
    /// Since when writing fails (RFC 3339).
    pub failing_since: Option<String>,
    /// Write attempts that failed, retries included.
    pub write_errors: u64,
    /// Events not written because writing failed, since the daemon started.
    pub events_unwritten: u64,
    /// Events over the global budget, folded into summary records, since the daemon
    /// started.
    pub events_summarized: u64,
    /// Summary records written.
    pub summaries: u64,
    /// Why the head could not be saved, if the last save failed.
    pub head_error: Option<String>,
    /// What opening the log found and recorded (a torn tail set aside, a cut tail).
    pub recovered: Vec<String>,
}

/// [`Health`] behind a lock, cloned into the daemon and the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct SharedHealth(Arc<Mutex<Health>>);

impl SharedHealth {
    /// A copy of the health now.
    pub fn get(&self) -> Health {
        self.0.lock().expect("audit health lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut Health)) {
        f(&mut self.0.lock().expect("audit health lock"));
    }
}

impl Serialize for SharedHealth {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.get().serialize(serializer)
    }
}

/// A failure in progress.
#[derive(Debug)]
struct Failure {
    since_ns: i128,
    error: String,
    /// Events not written since it began.
    lost: u64,
    retry_at: Instant,
    backoff: Duration,
}

/// The log with its failure state and its head file.
#[derive(Debug)]
pub struct Writer {
    log: AuditLog,
    /// Where the head is saved (`None`: not saved, as in tests of the log alone).
    head_file: Option<PathBuf>,
    health: SharedHealth,
    /// Records to write before any other: what opening the log found.
    notices: Vec<NoticeRecord>,
    failure: Option<Failure>,
    /// `seq` of the head last saved, and when the next save is due if it is behind.
    saved_seq: u64,
    save_due: Option<Instant>,
    last_save: Option<Instant>,
    /// The global budget of the kernel's events (see [`super::budget`]).
    budget: Budget,
}

fn now_ns() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
}

impl Writer {
    /// Writes to `log`, first the `notices` opening it produced; saves the head to
    /// `head_file` if given; reports through `health`.
    pub fn new(
        log: AuditLog,
        notices: Vec<NoticeRecord>,
        head_file: Option<PathBuf>,
        health: SharedHealth,
    ) -> Self {
        health.update(|h| {
            h.file = log.path().to_path_buf();
            h.seq = log.last_seq();
            h.head = log.head().to_string();
            h.recovered = notices.iter().map(|n| n.detail.clone()).collect();
        });
        let mut writer = Writer {
            log,
            head_file,
            health,
            notices,
            failure: None,
            saved_seq: 0,
            save_due: None,
            last_save: None,
            budget: Budget::new(GlobalBudget {
                events_per_sec: 0,
                ..GlobalBudget::default()
            }),
        };
        if !writer.notices.is_empty() {
            // Written at once, with the failure handling of any other record.
            let notices = std::mem::take(&mut writer.notices);
            for notice in notices {
                writer.append(&notice);
            }
            writer.finish();
        }
        writer
    }

    /// Limits the kernel's events to `budget`; without this call there is no global
    /// limit.
    pub fn with_budget(mut self, budget: GlobalBudget) -> Self {
        self.budget = Budget::new(budget);
        self
    }

    /// Whether `record` may be written alone under the global budget; if not, it was
    /// folded into its summary.
    pub fn admit(&mut self, record: &Record) -> bool {
        let admitted = self.budget.admit(record);
        if !admitted {
            self.health.update(|h| h.events_summarized += 1);
        }
        admitted
    }

    /// When the open summaries are due.
    pub fn summaries_due(&self) -> Option<Instant> {
        self.budget.due()
    }

    /// Writes the open summaries (a record each) and syncs.
    pub fn write_summaries(&mut self) {
        let summaries = self.budget.close(&super::rfc3339(now_ns()));
        if summaries.is_empty() {
            return;
        }
        let mut written = 0;
        for summary in &summaries {
            if self.append(summary) {
                written += 1;
            }
        }
        self.health.update(|h| h.summaries += written);
        self.finish();
    }

    /// The log.
    pub fn log(&mut self) -> &mut AuditLog {
        &mut self.log
    }

    /// The health this writer reports through.
    pub fn health(&self) -> &SharedHealth {
        &self.health
    }

    /// Whether records can be appended now. While writing fails, this is where the retry
    /// happens once it is due: the `events_lost` record goes first, and only if it lands is
    /// the failure over.
    pub fn ready(&mut self) -> bool {
        let Some(failure) = &self.failure else {
            return true;
        };
        if Instant::now() < failure.retry_at {
            return false;
        }
        let notice = NoticeRecord::new(
            "events_lost",
            failure.lost,
            format!(
                "writing the audit log failed from {} to {}: {}; {} events were not written",
                super::rfc3339(failure.since_ns),
                super::rfc3339(now_ns()),
                failure.error,
                failure.lost
            ),
        );
        match self.log.append(&notice).and_then(|_| self.log.sync()) {
            Ok(()) => {
                let failure = self.failure.take().expect("failing");
                tracing::warn!(
                    events_unwritten = failure.lost,
                    since = %super::rfc3339(failure.since_ns),
                    "the audit log is writable again; the gap is recorded in the chain"
                );
                self.health.update(|h| {
                    h.last_error = None;
                    h.failing_since = None;
                });
                self.written();
                true
            }
            Err(e) => {
                let failure = self.failure.as_mut().expect("failing");
                failure.backoff = (failure.backoff * 2).min(RETRY_MAX);
                failure.retry_at = Instant::now() + failure.backoff;
                failure.error = error_chain(&e);
                tracing::debug!(error = %failure.error, retry_in = ?failure.backoff, "the audit log is still not writable");
                let error = failure.error.clone();
                self.health.update(|h| {
                    h.write_errors += 1;
                    h.last_error = Some(error);
                });
                false
            }
        }
    }

    /// When the next retry is due, while writing fails.
    pub fn retry_at(&self) -> Option<Instant> {
        self.failure.as_ref().map(|f| f.retry_at)
    }

    /// Appends `body` if writing works; otherwise counts it lost. Returns whether it was
    /// written.
    pub fn append<T: Serialize>(&mut self, body: &T) -> bool {
        if !self.ready() {
            self.lose(1);
            return false;
        }
        match self.log.append(body) {
            Ok(_) => true,
            Err(e) => {
                self.fail(&e, 1);
                false
            }
        }
    }

    /// Counts `n` events that will not be written (writing fails).
    pub fn lose(&mut self, n: u64) {
        if let Some(failure) = &mut self.failure {
            failure.lost += n;
        }
        self.health.update(|h| h.events_unwritten += n);
    }

    /// Ends a batch: syncs what was appended, publishes the head and saves it when due.
    pub fn finish(&mut self) {
        if self.failure.is_some() {
            return;
        }
        if let Err(e) = self.log.sync() {
            // Records in the page cache may not reach the disk: a failure like any other,
            // though no event of this batch is counted as unwritten.
            self.fail(&e, 0);
            return;
        }
        self.written();
    }

    /// When the head file is due to catch up with the log.
    pub fn save_due(&self) -> Option<Instant> {
        self.save_due
    }

    /// Saves the head now if it is behind the log.
    pub fn save_head(&mut self) {
        self.save_due = None;
        let Some(path) = &self.head_file else {
            return;
        };
        if self.saved_seq == self.log.last_seq() && self.last_save.is_some() {
            return;
        }
        let head = Head {
            log: self.log.path().to_path_buf(),
            seq: self.log.last_seq(),
            hash: self.log.head().to_string(),
        };
        self.last_save = Some(Instant::now());
        match head.save(path) {
            Ok(()) => {
                self.saved_seq = head.seq;
                self.health.update(|h| {
                    h.head_saved_seq = head.seq;
                    h.head_error = None;
                });
            }
            Err(e) => {
                let error = format!("saving the audit chain head to {}: {e}", path.display());
                let first = self.health.get().head_error.is_none();
                if first {
                    tracing::error!(%error, "the log's tail is not covered until a save succeeds");
                }
                self.health.update(|h| h.head_error = Some(error));
            }
        }
    }

    /// After records reached the disk: publish the head, save it or schedule the save.
    fn written(&mut self) {
        let (seq, head) = (self.log.last_seq(), self.log.head().to_string());
        self.health.update(|h| {
            h.seq = seq;
            h.head = head;
        });
        if self.head_file.is_none() || (seq == self.saved_seq && self.last_save.is_some()) {
            return;
        }
        match self.last_save {
            Some(at) if at.elapsed() < super::head::SAVE_INTERVAL => {
                self.save_due.get_or_insert(at + super::head::SAVE_INTERVAL);
            }
            _ => self.save_head(),
        }
    }

    fn fail(&mut self, error: &super::AuditError, lost: u64) {
        let error = error_chain(error);
        tracing::error!(
            %error,
            "writing the audit log failed; enforcing goes on, events are counted until it \
             can be written again (retrying with backoff)"
        );
        self.failure = Some(Failure {
            since_ns: now_ns(),
            error: error.clone(),
            lost: 0,
            retry_at: Instant::now() + RETRY_FIRST,
            backoff: RETRY_FIRST,
        });
        self.health.update(|h| {
            h.write_errors += 1;
            h.last_error = Some(error);
            h.failing_since = Some(super::rfc3339(now_ns()));
        });
        self.lose(lost);
    }

    /// At shutdown: the open summaries, one last try to record a gap, then the head.
    pub fn close(mut self) -> AuditLog {
        self.write_summaries();
        if self.failure.is_some() {
            if let Some(f) = &mut self.failure {
                f.retry_at = Instant::now();
            }
            if !self.ready() {
                let lost = self.failure.as_ref().map_or(0, |f| f.lost);
                tracing::error!(
                    events_unwritten = lost,
                    "the audit log is still not writable at shutdown; the gap is not recorded in the chain"
                );
            }
        }
        self.save_head();
        self.log
    }
}
