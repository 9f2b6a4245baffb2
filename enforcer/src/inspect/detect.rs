//! The detectors: literal markers searched in the plaintext stream of a proxied connection,
//! in both directions, with one Aho-Corasick automaton for all of them.
//!
//! A stream arrives in reads of any size, so a marker can straddle two reads. Each
//! direction keeps a [`Scanner`]: the last `longest marker - 1` bytes of the stream are
//! searched again together with the next read, which finds every straddling occurrence
//! exactly once (only matches ending in the new bytes are reported).
//!
//! A `block` marker must never reach the other side, not even in part, so the scanner also
//! *holds back* the longest tail of the stream that is a proper prefix of a block marker:
//! those bytes are released once the next read shows they do not start a marker (or when
//! the stream ends, or when the relay decides the sender has gone idle, see
//! [`Scanner::release_held`]). A read that completes a block marker is not written at all.

use aho_corasick::{AhoCorasick, MatchKind};
use thiserror::Error;

use crate::policy::{Detector, DetectorAction};

/// Errors building the automaton.
#[derive(Debug, Error)]
pub enum DetectError {
    /// aho-corasick refused the patterns (only possible far beyond the policy's limits).
    #[error("building the detector automaton")]
    Build(#[source] aho_corasick::BuildError),
}

/// The detectors of one policy, compiled.
#[derive(Debug)]
pub struct Detectors {
    automaton: AhoCorasick,
    names: Vec<String>,
    actions: Vec<DetectorAction>,
    /// Literals of the `block` detectors: what the scanner holds back a prefix of.
    block_literals: Vec<Vec<u8>>,
    /// Longest literal: the scanner keeps one byte less of context.
    longest: usize,
}

impl Detectors {
    /// Compiles the policy's detectors.
    pub fn new(detectors: &[Detector]) -> Result<Self, DetectError> {
        // Standard semantics with overlapping search: every detector's occurrence is
        // reported even where it overlaps another marker.
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(detectors.iter().map(|d| d.literal.as_bytes()))
            .map_err(DetectError::Build)?;
        Ok(Detectors {
            automaton,
            names: detectors.iter().map(|d| d.name.clone()).collect(),
            actions: detectors.iter().map(|d| d.action).collect(),
            block_literals: detectors
                .iter()
                .filter(|d| d.action == DetectorAction::Block)
                .map(|d| d.literal.as_bytes().to_vec())
                .collect(),
            longest: detectors.iter().map(|d| d.literal.len()).max().unwrap_or(0),
        })
    }

    /// Whether there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Detector `index`'s name.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// Detector `index`'s action.
    pub fn action(&self, index: usize) -> DetectorAction {
        self.actions[index]
    }

    /// A scanner for one direction of one connection.
    pub fn scanner(&self) -> Scanner {
        Scanner {
            tail: Vec::with_capacity(self.longest),
            held: 0,
        }
    }

    /// Length of the longest suffix of `bytes` that is a proper prefix of a block marker.
    fn partial_block(&self, bytes: &[u8]) -> usize {
        let most = bytes.len().min(self.longest.saturating_sub(1));
        (1..=most)
            .rev()
            .find(|&k| {
                let suffix = &bytes[bytes.len() - k..];
                self.block_literals
                    .iter()
                    .any(|l| l.len() > k && l.starts_with(suffix))
            })
            .unwrap_or(0)
    }
}

/// What one read of the stream leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// No block marker completed: write `release` to the other side. `flagged` lists the
    /// flag detectors (indices) whose markers completed in this read, once per occurrence.
    Pass {
        /// Bytes to forward now (held bytes of earlier reads first).
        release: Vec<u8>,
        /// Flag detectors that matched.
        flagged: Vec<usize>,
    },
    /// A block marker completed in this read: nothing of it may be forwarded.
    Block {
        /// The first block detector that matched.
        detector: usize,
        /// Flag detectors that matched in the same read.
        flagged: Vec<usize>,
    },
}

/// One direction's search state: the end of the stream seen so far.
#[derive(Debug)]
pub struct Scanner {
    /// The last `longest - 1` bytes of the stream (or fewer, early on).
    tail: Vec<u8>,
    /// How many bytes at the end of `tail` have not been forwarded yet.
    held: usize,
}

impl Scanner {
    /// Scans the next bytes of the stream.
    pub fn feed(&mut self, detectors: &Detectors, chunk: &[u8]) -> Scan {
        if detectors.is_empty() {
            return Scan::Pass {
                release: chunk.to_vec(),
                flagged: Vec::new(),
            };
        }
        let mut window = std::mem::take(&mut self.tail);
        let seen = window.len();
        window.extend_from_slice(chunk);
        let mut flagged = Vec::new();
        let mut blocked = None;
        for m in detectors.automaton.find_overlapping_iter(&window) {
            // Matches ending in the old tail were reported by the previous read.
            if m.end() <= seen {
                continue;
            }
            let index = m.pattern().as_usize();
            match detectors.actions[index] {
                DetectorAction::Block => {
                    blocked.get_or_insert(index);
                }
                DetectorAction::Flag => flagged.push(index),
            }
        }
        if let Some(detector) = blocked {
            // The connection ends here; keep nothing.
            return Scan::Block { detector, flagged };
        }
        // Only bytes not forwarded yet can be held: after an idle release the tail may
        // look like a marker's start again, but those bytes are already on the other side.
        let unsent = seen - self.held;
        let hold = detectors.partial_block(&window).min(window.len() - unsent);
        let release = window[unsent..window.len() - hold].to_vec();
        let keep = window.len().min(detectors.longest.saturating_sub(1));
        window.drain(..window.len() - keep);
        self.tail = window;
        self.held = hold;
        Scan::Pass { release, flagged }
    }

    /// Whether bytes are held back waiting for the next read.
    pub fn holding(&self) -> bool {
        self.held > 0
    }

    /// Gives up holding: returns the held bytes for forwarding. Called at the end of the
    /// stream, and when the sender goes quiet with a marker's prefix at the end of what it
    /// sent (a protocol may legitimately end a message with `sk`; holding it forever would
    /// stall the exchange). The bytes stay in the search context, so if the marker is
    /// completed later it is still found and the connection closed before the rest passes.
    pub fn release_held(&mut self) -> Vec<u8> {
        let held = self.tail[self.tail.len() - self.held..].to_vec();
        self.held = 0;
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detectors() -> Detectors {
        Detectors::new(&[
            Detector {
                name: "openai-key".into(),
                literal: "sk-live-".into(),
                action: DetectorAction::Block,
            },
            Detector {
                name: "mcp-call".into(),
                literal: "\"method\":\"tools/call\"".into(),
                action: DetectorAction::Flag,
            },
            Detector {
                name: "pem".into(),
                literal: "-----BEGIN".into(),
                action: DetectorAction::Block,
            },
        ])
        .unwrap()
    }

    /// Feeds `chunks`, returning what was forwarded (including a final release), the flag
    /// hits and the block, if any.
    fn run(d: &Detectors, chunks: &[&[u8]]) -> (Vec<u8>, Vec<usize>, Option<usize>) {
        let mut s = d.scanner();
        let mut out = Vec::new();
        let mut flags = Vec::new();
        for chunk in chunks {
            match s.feed(d, chunk) {
                Scan::Pass { release, flagged } => {
                    out.extend(release);
                    flags.extend(flagged);
                }
                Scan::Block { detector, flagged } => {
                    flags.extend(flagged);
                    return (out, flags, Some(detector));
                }
            }
        }
        out.extend(s.release_held());
        (out, flags, None)
    }

    #[test]
    fn clean_stream_passes_unchanged_whatever_the_chunking() {
        let d = detectors();
        let text = b"POST /v1 HTTP/1.1\r\nask-live skate sk-liv -----BEGI end sk";
        for split in 0..text.len() {
            let (out, flags, block) = run(&d, &[&text[..split], &text[split..]]);
            assert_eq!(out, text, "split at {split}");
            assert!(flags.is_empty() && block.is_none());
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(run(&d, &bytes).0, text);
    }

    #[test]
    fn block_marker_straddling_reads_is_found_and_never_forwarded() {
        let d = detectors();
        let text = b"token=sk-live-abcdef&x=1";
        let start = 6;
        for split in 0..=text.len() {
            let (out, _, block) = run(&d, &[&text[..split], &text[split..]]);
            assert_eq!(block, Some(0), "split at {split}");
            // Nothing from the marker's first byte on was written.
            assert!(out.len() <= start, "split at {split}: forwarded {out:?}");
            assert_eq!(out, &text[..out.len()]);
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        let (out, _, block) = run(&d, &bytes);
        assert_eq!((out.as_slice(), block), (&text[..start], Some(0)));
    }

    #[test]
    fn flag_marker_passes_and_is_reported_once_per_occurrence() {
        let d = detectors();
        let text = br#"{"jsonrpc":"2.0","method":"tools/call"} {"method":"tools/call"}"#;
        for split in 0..=text.len() {
            let (out, flags, block) = run(&d, &[&text[..split], &text[split..]]);
            assert_eq!(out, text);
            assert_eq!(flags, vec![1, 1], "split at {split}");
            assert_eq!(block, None);
        }
    }

    #[test]
    fn held_prefix_released_when_idle_still_blocks_if_completed_later() {
        let d = detectors();
        let mut s = d.scanner();
        assert_eq!(
            s.feed(&d, b"abc sk-li"),
            Scan::Pass {
                release: b"abc ".to_vec(),
                flagged: vec![]
            }
        );
        assert!(s.holding());
        assert_eq!(s.release_held(), b"sk-li");
        assert!(!s.holding());
        assert_eq!(
            s.feed(&d, b"ve-1"),
            Scan::Block {
                detector: 0,
                flagged: vec![]
            }
        );
    }

    #[test]
    fn no_detectors_forwards_everything() {
        let d = Detectors::new(&[]).unwrap();
        assert!(d.is_empty());
        let (out, flags, block) = run(&d, &[b"sk-live-", b"x"]);
        assert_eq!(
            (out.as_slice(), flags.len(), block),
            (&b"sk-live-x"[..], 0, None)
        );
    }
}
