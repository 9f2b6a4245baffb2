//! The chain's head kept outside the log: `seq` and hash of the last record written, in a
//! small file of the daemon's state directory (`audit-head.json`), replaced durably.
//!
//! A hash chain shows every change to a line that has a line after it, but not lines cut
//! from the end, nor a last line edited: the file is still a valid, shorter chain. The head
//! recorded elsewhere closes that gap: [`super::verify_anchored`] checks that the log still
//! holds the recorded `seq` and that the line there hashes to the recorded hash. `status`
//! and `/metrics` show the head too, so a collector can keep it off the host, out of reach
//! of whoever can rewrite both files.
//!
//! The writer saves the head at most every [`SAVE_INTERVAL`] and at shutdown, so a crash
//! can leave the log a little ahead of it, never behind: the log may extend past the
//! recorded head, and the check looks for the recorded line inside it.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::AuditError;

/// Name of the head file in the state directory.
pub const FILE_NAME: &str = "audit-head.json";

/// How often at most the writer replaces the head file (two fsyncs each) while records
/// come in; records written since the last save are covered once the next save lands.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(250);

/// The chain's last record as the writer last saved it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The log file the chain is written to: a head of another log is not this log's.
    pub log: PathBuf,
    /// `seq` of the last record written.
    pub seq: u64,
    /// Hex SHA-256 of that record's line.
    pub hash: String,
}

impl Head {
    /// Reads the head saved at `path`: `Ok(None)` when there is none, an error naming the
    /// file when it cannot be read or is not a head.
    pub fn load(path: &Path) -> Result<Option<Head>, AuditError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(AuditError::Io {
                    op: "reading the chain head of",
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| AuditError::Head {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// Replaces the head file at `path` durably (a crash leaves the old head or this one).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("a head serializes");
        crate::durable::replace(path, &text, 0o644)
    }
}
