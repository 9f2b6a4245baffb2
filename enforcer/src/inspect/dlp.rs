//! Data-loss prevention: the detectors (literal markers and regular expressions) searched in
//! the plaintext of a proxied connection, one compiled set per direction ([`Detectors`]),
//! and the per-stream search state ([`Scanner`]).
//!
//! A stream arrives in reads of any size, so a match can straddle reads. The search has two
//! stages. One Aho-Corasick automaton finds every detector's *anchors*: a literal detector's
//! literal, and the literals every match of a regex detector starts with (checked by
//! [`crate::policy::regex_shape`]). The last `longest anchor` bytes of the stream are
//! searched again with the next read, so an anchor straddling reads is found exactly once.
//! A literal's anchor is its hit. A regex anchor opens a *candidate*: that detector's
//! anchored dense DFA, started at the anchor with the byte before it as look-behind (so a
//! leading `\b` is right even when the anchor begins a read), and advanced over each new
//! byte as it arrives; its state is kept between reads, so nothing is searched twice and
//! nothing but the candidate's state and the held bytes is kept. A dead state drops the
//! candidate; a match state (one byte late, which is how a trailing `\b` sees the next byte;
//! at the end of the stream [`Scanner::finish`] asks the end-of-input transition) is a hit.
//! A candidate lives at most its detector's longest match.
//!
//! A `block` match must never reach the other side, not even in part, so the scanner
//! *holds back* everything from the start of the earliest open block candidate, and the
//! longest tail of the stream that is a proper prefix of a block anchor: those bytes are
//! released once later bytes show they do not start a match (or when the stream ends, or
//! when the relay decides the sender has gone idle, see [`Scanner::release_held`]). A read
//! that completes a block match is not written at all.
//!
//! Why a dense DFA per detector: the lazy DFA's state ids are valid only until its cache is
//! next used, and several candidates stay open across reads; `meta::Regex` cannot resume a
//! search; and one unanchored DFA for all patterns cannot say where a match started, so it
//! could not hold back exactly.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, Weak},
};

use aho_corasick::{AhoCorasick, MatchKind};
use regex_automata::{
    Anchored,
    dfa::{Automaton as _, StartKind, dense},
    nfa::thompson,
    util::{primitives::StateID, start, syntax},
};
use thiserror::Error;

use super::catalogue::CATALOGUE;
use crate::policy::{
    CatalogueMode, Detector, DetectorAction, DetectorDirection, DetectorPattern, Policy,
    regex_shape,
};

/// Most memory one regex detector's DFA may take. The catalogue's largest takes a few
/// hundred KiB; a policy regex that needs more is refused at compile time rather than
/// growing the proxy without bound.
const DFA_SIZE_LIMIT: usize = 8 << 20;

/// Errors compiling detectors.
#[derive(Debug, Error)]
pub enum DetectError {
    /// aho-corasick refused the anchors (only possible far beyond the policy's limits).
    #[error("building the detector automaton")]
    Build(#[source] aho_corasick::BuildError),
    /// A regex detector cannot be searched in a stream (the policy check refuses these).
    #[error("detector {name}: {message}")]
    Regex {
        /// The detector.
        name: String,
        /// Why.
        message: String,
    },
    /// A regex detector's DFA could not be built, e.g. over the size limit.
    #[error("detector {name}: building its DFA")]
    Dfa {
        /// The detector.
        name: String,
        /// What regex-automata said.
        #[source]
        source: Box<dense::BuildError>,
    },
}

/// Checks that a regex detector compiles within the DFA size limit, for the policy check:
/// a policy the proxy cannot compile is refused where it is written, not at apply time.
/// The error is the message for the policy's `regex` field.
pub fn check_regex(regex: &str) -> Result<(), String> {
    match Verifier::shared("", regex) {
        Ok(_) => Ok(()),
        Err(DetectError::Regex { message, .. }) => Err(message),
        Err(DetectError::Dfa { source, .. }) if source.is_size_limit_exceeded() => Err(format!(
            "the regex needs more than {} MiB as a DFA: fewer or smaller counted \
             repetitions after an ambiguous part",
            DFA_SIZE_LIMIT >> 20
        )),
        Err(e) => Err(crate::error::error_chain(&e)),
    }
}

/// A regex detector's verifier.
#[derive(Debug)]
struct Verifier {
    dfa: dense::DFA<Vec<u32>>,
    /// Every match starts with one of these.
    starts: Vec<Vec<u8>>,
    /// The longest match: a candidate older than this (plus the one byte a match state
    /// lags) cannot match any more.
    max_len: usize,
}

impl Verifier {
    /// The verifier of `regex`, built once and shared while any detector set holds it:
    /// each policy is compiled four times (two directions, two modes), and the catalogue's
    /// DFAs take a few MiB and a few hundred milliseconds to build.
    fn shared(name: &str, regex: &str) -> Result<Arc<Verifier>, DetectError> {
        static BUILT: Mutex<BTreeMap<String, Weak<Verifier>>> = Mutex::new(BTreeMap::new());
        let mut built = BUILT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(verifier) = built.get(regex).and_then(Weak::upgrade) {
            return Ok(verifier);
        }
        let shape = regex_shape(regex).map_err(|message| DetectError::Regex {
            name: name.to_string(),
            message,
        })?;
        let dfa = dense::Builder::new()
            .configure(
                dense::DFA::config()
                    .start_kind(StartKind::Anchored)
                    .dfa_size_limit(Some(DFA_SIZE_LIMIT))
                    .determinize_size_limit(Some(DFA_SIZE_LIMIT)),
            )
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().utf8(false))
            .build(regex)
            .map_err(|e| DetectError::Dfa {
                name: name.to_string(),
                source: Box::new(e),
            })?;
        let verifier = Arc::new(Verifier {
            dfa,
            starts: shape.starts,
            max_len: shape.max_len,
        });
        built.retain(|_, v| v.strong_count() > 0);
        built.insert(regex.to_string(), Arc::downgrade(&verifier));
        Ok(verifier)
    }
}

/// One direction's compiled detectors.
#[derive(Debug)]
pub struct Detectors {
    /// Every detector's anchors.
    automaton: AhoCorasick,
    /// The detector of each anchor (pattern id).
    anchor_detector: Vec<usize>,
    names: Vec<String>,
    /// Action in force (all `Flag` in a monitor set).
    actions: Vec<DetectorAction>,
    /// Action as written by the policy or the catalogue.
    written: Vec<DetectorAction>,
    /// Per detector: its DFA when it is a regex detector.
    verifiers: Vec<Option<Arc<Verifier>>>,
    /// Every proper prefix of a block detector's anchor: a tail of the stream that is one
    /// is held back.
    block_prefixes: HashSet<Vec<u8>>,
    /// Longest anchor: the scanner keeps this much of the stream as context.
    longest: usize,
}

impl Detectors {
    /// Compiles `detectors`, all of them (the caller picks the direction's).
    pub fn new(detectors: &[Detector]) -> Result<Self, DetectError> {
        Self::build(detectors, false)
    }

    /// Compiles `detectors`; `monitor` turns every block into a flag (the written action
    /// is kept for the records).
    fn build(detectors: &[Detector], monitor: bool) -> Result<Self, DetectError> {
        let mut anchors: Vec<Vec<u8>> = Vec::new();
        let mut anchor_detector = Vec::new();
        let mut verifiers = Vec::with_capacity(detectors.len());
        let mut block_prefixes = HashSet::new();
        let actions: Vec<DetectorAction> = detectors
            .iter()
            .map(|d| {
                if monitor {
                    DetectorAction::Flag
                } else {
                    d.action
                }
            })
            .collect();
        for (index, d) in detectors.iter().enumerate() {
            let (starts, verifier) = match &d.pattern {
                DetectorPattern::Literal(literal) => (vec![literal.as_bytes().to_vec()], None),
                DetectorPattern::Regex(regex) => {
                    let verifier = Verifier::shared(&d.name, regex)?;
                    (verifier.starts.clone(), Some(verifier))
                }
            };
            if actions[index] == DetectorAction::Block {
                for start in &starts {
                    for k in 1..start.len() {
                        block_prefixes.insert(start[..k].to_vec());
                    }
                }
            }
            anchor_detector.extend(std::iter::repeat_n(index, starts.len()));
            anchors.extend(starts);
            verifiers.push(verifier);
        }
        // Standard semantics with overlapping search: every anchor's occurrence is
        // reported even where it overlaps another one.
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&anchors)
            .map_err(DetectError::Build)?;
        Ok(Detectors {
            automaton,
            anchor_detector,
            names: detectors.iter().map(|d| d.name.clone()).collect(),
            actions,
            written: detectors.iter().map(|d| d.action).collect(),
            verifiers,
            block_prefixes,
            longest: anchors.iter().map(Vec::len).max().unwrap_or(0),
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

    /// Detector `index`'s action in force (`Flag` for every detector of a monitor set).
    pub fn action(&self, index: usize) -> DetectorAction {
        self.actions[index]
    }

    /// Detector `index`'s action as the policy or the catalogue wrote it: a monitor-mode
    /// agent's would-be block is recorded as a block.
    pub fn written_action(&self, index: usize) -> DetectorAction {
        self.written[index]
    }

    /// A scanner for one direction of one connection.
    pub fn scanner(&self) -> Scanner {
        Scanner {
            buf: Vec::with_capacity(self.longest),
            base: 0,
            sent: 0,
            pending: u64::MAX,
            candidates: Vec::new(),
        }
    }

    /// Length of the longest suffix of `bytes` that is a proper prefix of a block anchor.
    fn partial_block(&self, bytes: &[u8]) -> usize {
        let most = bytes.len().min(self.longest.saturating_sub(1));
        (1..=most)
            .rev()
            .find(|&k| self.block_prefixes.contains(&bytes[bytes.len() - k..]))
            .unwrap_or(0)
    }
}

/// Both directions' detectors of one policy, for one mode.
#[derive(Clone, Debug)]
pub struct DetectorSet {
    /// Searched in what the agent sends.
    pub up: Arc<Detectors>,
    /// Searched in what the server sends.
    pub down: Arc<Detectors>,
}

impl DetectorSet {
    /// The policy's detectors, each in the directions it names, plus the catalogue's
    /// entries as its `[dlp]` section says (in both directions). `monitor` turns every block
    /// into a flag: a monitor-mode agent's would-be block is audited and its bytes pass.
    pub fn compile(policy: Option<&Policy>, monitor: bool) -> Result<DetectorSet, DetectError> {
        let mut all: Vec<Detector> = policy.map(|p| p.detectors().to_vec()).unwrap_or_default();
        if let Some(p) = policy {
            let dlp = p.dlp();
            let action = match dlp.catalogue {
                CatalogueMode::Off => None,
                CatalogueMode::Flag => Some(DetectorAction::Flag),
                CatalogueMode::Block => Some(DetectorAction::Block),
            };
            if let Some(action) = action {
                all.extend(
                    CATALOGUE
                        .iter()
                        .filter(|e| !dlp.catalogue_except.iter().any(|x| x == e.name))
                        .map(|e| Detector {
                            name: e.name.to_string(),
                            pattern: DetectorPattern::Regex(e.regex.to_string()),
                            // An entry whose own default is flag stays flag.
                            action: match e.default_action {
                                DetectorAction::Flag => DetectorAction::Flag,
                                DetectorAction::Block => action,
                            },
                            direction: DetectorDirection::Both,
                        }),
                );
            }
        }
        let way = |up: bool| -> Vec<Detector> {
            all.iter()
                .filter(|d| d.direction.covers(up))
                .cloned()
                .collect()
        };
        Ok(DetectorSet {
            up: Arc::new(Detectors::build(&way(true), monitor)?),
            down: Arc::new(Detectors::build(&way(false), monitor)?),
        })
    }
}

/// What one read of the stream leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// No block match completed: write `release` to the other side. `flagged` lists the
    /// flag detectors (indices) whose matches completed in this read, once per occurrence.
    Pass {
        /// Bytes to forward now (held bytes of earlier reads first).
        release: Vec<u8>,
        /// Flag detectors that matched.
        flagged: Vec<usize>,
    },
    /// A block match completed in this read: nothing of it may be forwarded.
    Block {
        /// The block detector whose match ended first.
        detector: usize,
        /// Flag detectors that matched in the same read.
        flagged: Vec<usize>,
    },
}

/// The first block detector and the flag detectors among `hits` (end offset, detector),
/// in stream order. Candidates of one detector that started apart but ended in the same
/// state (merged, or opened by two anchors at one offset in two reads) report one match
/// at one end: one hit.
fn outcome(d: &Detectors, mut hits: Vec<(u64, usize)>) -> (Option<usize>, Vec<usize>) {
    hits.sort_unstable();
    hits.dedup();
    let blocked = hits
        .iter()
        .find(|&&(_, i)| d.actions[i] == DetectorAction::Block)
        .map(|&(_, i)| i);
    let flagged = hits
        .iter()
        .filter(|&&(_, i)| d.actions[i] == DetectorAction::Flag)
        .map(|&(_, i)| i)
        .collect();
    (blocked, flagged)
}

/// A regex detector's match in progress.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    detector: usize,
    /// Stream offset of its first byte (the earliest, when candidates merged).
    start: u64,
    /// Stream offset of the latest start merged into it: its age bound counts from here.
    born: u64,
    /// DFA state after every byte of the stream so far.
    state: StateID,
}

/// One direction's search state.
#[derive(Debug)]
pub struct Scanner {
    /// The end of the stream: at least the last `longest` bytes (context for the anchor
    /// search and the look-behind byte), and every byte not forwarded yet.
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// Stream offset up to which bytes were forwarded.
    sent: u64,
    /// Stream offset of the earliest block candidate that would match if the stream ended
    /// here: an idle release stops before it (the match lacks only its end-of-input check).
    pending: u64,
    candidates: Vec<Candidate>,
}

impl Scanner {
    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    fn byte(&self, offset: u64) -> u8 {
        self.buf[(offset - self.base) as usize]
    }

    /// Scans the next bytes of the stream.
    pub fn feed(&mut self, d: &Detectors, chunk: &[u8]) -> Scan {
        if d.is_empty() {
            return Scan::Pass {
                release: chunk.to_vec(),
                flagged: Vec::new(),
            };
        }
        let seen = self.end();
        self.buf.extend_from_slice(chunk);
        let end = self.end();
        // Hits as (end offset, detector).
        let mut hits: Vec<(u64, usize)> = Vec::new();

        // Anchors ending in the new bytes; those ending earlier were seen by an earlier read.
        let from = ((seen - self.base) as usize).saturating_sub(d.longest.saturating_sub(1));
        let opened = self.candidates.len();
        for m in d.automaton.find_overlapping_iter(&self.buf[from..]) {
            let (start, stop) = (
                self.base + (from + m.start()) as u64,
                self.base + (from + m.end()) as u64,
            );
            if stop <= seen {
                continue;
            }
            let detector = d.anchor_detector[m.pattern().as_usize()];
            let Some(verifier) = &d.verifiers[detector] else {
                hits.push((stop, detector));
                continue;
            };
            // Two anchors of one detector at one offset (`ab` and `abc`, perhaps in two
            // reads) are one candidate.
            if self
                .candidates
                .iter()
                .any(|c| c.detector == detector && c.start == start)
            {
                continue;
            }
            // `longest` bytes of context are kept, so the byte before an anchor that ends
            // in the new bytes is in `buf` unless the anchor starts the stream.
            let behind = (start > 0).then(|| self.byte(start - 1));
            let config = start::Config::new()
                .anchored(Anchored::Yes)
                .look_behind(behind);
            // Errors only for quit bytes (none without Unicode word boundaries) or an
            // unanchored start (the DFA is built anchored).
            let Ok(state) = verifier.dfa.start_state(&config) else {
                continue;
            };
            // New candidates are advanced from their start below, old ones from `seen`.
            self.candidates.push(Candidate {
                detector,
                start,
                born: start,
                state,
            });
        }

        let mut open = Vec::with_capacity(self.candidates.len());
        for (i, mut c) in std::mem::take(&mut self.candidates).into_iter().enumerate() {
            let verifier = d.verifiers[c.detector]
                .as_ref()
                .expect("candidates are regex detectors'");
            let mut at = if i < opened { seen } else { c.start };
            let alive = loop {
                if at == end {
                    break true;
                }
                c.state = verifier.dfa.next_state(c.state, self.byte(at));
                at += 1;
                if verifier.dfa.is_special_state(c.state) {
                    if verifier.dfa.is_match_state(c.state) {
                        // Match states lag one byte: the match ended before this byte.
                        hits.push((at - 1, c.detector));
                    }
                    // Match (reported once), dead or quit: this candidate is over.
                    break false;
                }
                if at - c.born > verifier.max_len as u64 {
                    // Longer than any match and not matched: cannot match any more.
                    break false;
                }
            };
            if alive {
                open.push(c);
            }
        }
        // Candidates of one detector in one state have the same future: keep one, holding
        // from the earliest start. This bounds the candidates by the DFA's states however
        // many anchors a stream repeats.
        open.sort_by_key(|c| (c.detector, c.state, c.start));
        open.dedup_by(|later, kept| {
            let same = later.detector == kept.detector && later.state == kept.state;
            if same {
                kept.born = kept.born.max(later.born);
            }
            same
        });
        self.candidates = open;

        let (blocked, flagged) = outcome(d, hits);
        if let Some(detector) = blocked {
            // The connection ends here; keep nothing.
            self.reset();
            return Scan::Block { detector, flagged };
        }

        // Hold from the earliest open block candidate and from a tail that may begin a
        // block anchor. Only bytes not forwarded yet can be held: after an idle release
        // the tail may look like a match's start again, but those bytes are already gone.
        let mut hold = end - d.partial_block(&self.buf) as u64;
        self.pending = u64::MAX;
        for c in &self.candidates {
            if d.actions[c.detector] == DetectorAction::Block {
                hold = hold.min(c.start);
                let dfa = &d.verifiers[c.detector].as_ref().expect("regex").dfa;
                if dfa.is_match_state(dfa.next_eoi_state(c.state)) {
                    self.pending = self.pending.min(c.start);
                }
            }
        }
        let hold = hold.max(self.sent);
        let release =
            self.buf[(self.sent - self.base) as usize..(hold - self.base) as usize].to_vec();
        self.sent = hold;
        let keep_from = self
            .sent
            .min(end.saturating_sub(d.longest as u64))
            .max(self.base);
        self.buf.drain(..(keep_from - self.base) as usize);
        self.base = keep_from;
        Scan::Pass { release, flagged }
    }

    /// The end of the stream or message: resolves what only the end can (a match whose
    /// last check is the end of input, as a trailing `\b`), then releases everything
    /// held. The scanner starts over for the next message.
    pub fn finish(&mut self, d: &Detectors) -> Scan {
        let mut hits: Vec<(u64, usize)> = Vec::new();
        for c in &self.candidates {
            let dfa = &d.verifiers[c.detector].as_ref().expect("regex").dfa;
            if dfa.is_match_state(dfa.next_eoi_state(c.state)) {
                hits.push((self.end(), c.detector));
            }
        }
        let (blocked, flagged) = outcome(d, hits);
        let release = self.buf[(self.sent - self.base) as usize..].to_vec();
        self.reset();
        match blocked {
            Some(detector) => Scan::Block { detector, flagged },
            None => Scan::Pass { release, flagged },
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.base = 0;
        self.sent = 0;
        self.pending = u64::MAX;
        self.candidates.clear();
    }

    /// Whether bytes are held back that an idle release would let go (see
    /// [`Scanner::release_held`]).
    pub fn holding(&self) -> bool {
        self.sent < self.end().min(self.pending)
    }

    /// Gives up holding: returns the held bytes for forwarding. Called when the sender goes
    /// quiet with a match's possible start at the end of what it sent (a protocol may
    /// legitimately end a message with `sk`; holding it forever would stall the exchange).
    /// The bytes stay in the search context and candidates stay open, so if the match is
    /// completed later it is still found and the connection closed before the rest passes;
    /// what was released before is gone, though. Not released: a block match that lacks only
    /// its end-of-input check (a secret followed by nothing yet, whose trailing `\b` the
    /// next byte or the end of the stream decides); the relay waits for either.
    pub fn release_held(&mut self) -> Vec<u8> {
        let upto = self.end().min(self.pending).max(self.sent);
        let held = self.buf[(self.sent - self.base) as usize..(upto - self.base) as usize].to_vec();
        self.sent = upto;
        held
    }
}
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn detectors() -> Detectors {
        Detectors::new(&[
            Detector {
                name: "openai-key".into(),
                pattern: DetectorPattern::Literal("sk-live-".into()),
                direction: DetectorDirection::Both,
                action: DetectorAction::Block,
            },
            Detector {
                name: "mcp-call".into(),
                pattern: DetectorPattern::Literal("\"method\":\"tools/call\"".into()),
                direction: DetectorDirection::Both,
                action: DetectorAction::Flag,
            },
            Detector {
                name: "pem".into(),
                pattern: DetectorPattern::Literal("-----BEGIN".into()),
                direction: DetectorDirection::Both,
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

    fn regex(name: &str, regex: &str, action: DetectorAction) -> Detector {
        Detector {
            name: name.into(),
            pattern: DetectorPattern::Regex(regex.into()),
            action,
            direction: DetectorDirection::Both,
        }
    }

    fn aws() -> Detectors {
        Detectors::new(&[regex("aws", r"\bAKIA[0-9A-Z]{16}\b", DetectorAction::Block)]).unwrap()
    }

    /// Feeds `chunks` then finishes: what was forwarded, the flags, and the block.
    pub(crate) fn run_to_end(
        d: &Detectors,
        chunks: &[&[u8]],
    ) -> (Vec<u8>, Vec<usize>, Option<usize>) {
        let mut s = d.scanner();
        let (mut out, mut flags) = (Vec::new(), Vec::new());
        for chunk in chunks.iter().map(Some).chain([None]) {
            let scan = match chunk {
                Some(chunk) => s.feed(d, chunk),
                None => s.finish(d),
            };
            match scan {
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
        (out, flags, None)
    }

    #[test]
    fn leading_word_boundary_looks_behind_across_reads() {
        let d = aws();
        // A word character just before the anchor, in the previous read: no match.
        let (out, _, block) = run_to_end(&d, &[b"x", b"AKIAIOSFODNN7EXAMPLE "]);
        assert_eq!(
            (out.as_slice(), block),
            (&b"xAKIAIOSFODNN7EXAMPLE "[..], None)
        );
        // A space there: a match, and nothing of it leaves.
        let (out, _, block) = run_to_end(&d, &[b" ", b"AKIAIOSFODNN7EXAMPLE "]);
        assert_eq!((out.as_slice(), block), (&b" "[..], Some(0)));
        // The stream's first byte has nothing behind it: a boundary.
        let (out, _, block) = run_to_end(&d, &[b"AKIAIOSFODNN7EXAMPLE"]);
        assert_eq!((out.as_slice(), block), (&b""[..], Some(0)));
    }

    #[test]
    fn trailing_word_boundary_is_decided_by_the_next_read_or_the_end() {
        let d = aws();
        let mut s = d.scanner();
        let key = b"id=AKIAIOSFODNN7EXAMPLE";
        assert_eq!(
            s.feed(&d, key),
            Scan::Pass {
                release: b"id=".to_vec(),
                flagged: vec![]
            }
        );
        // Complete but for its end check: not let go by an idle release either.
        assert!(!s.holding());
        assert_eq!(s.release_held(), b"");
        assert_eq!(
            s.finish(&d),
            Scan::Block {
                detector: 0,
                flagged: vec![]
            }
        );
        // One more key character: not a key after all, everything passes.
        let mut s = d.scanner();
        s.feed(&d, key);
        assert_eq!(
            s.feed(&d, b"1&"),
            Scan::Pass {
                release: b"AKIAIOSFODNN7EXAMPLE1&".to_vec(),
                flagged: vec![]
            }
        );
        assert!(!s.holding());
        // And a boundary in the next read: a block.
        let mut s = d.scanner();
        s.feed(&d, key);
        assert!(matches!(
            s.feed(&d, b"&x=1"),
            Scan::Block { detector: 0, .. }
        ));
    }

    #[test]
    fn open_candidate_holds_back_and_idle_release_lets_its_prefix_go() {
        let d = aws();
        let mut s = d.scanner();
        assert_eq!(
            s.feed(&d, b"a AKIAIOSF"),
            Scan::Pass {
                release: b"a ".to_vec(),
                flagged: vec![]
            }
        );
        assert!(s.holding());
        assert_eq!(s.release_held(), b"AKIAIOSF");
        // The candidate stays open: completing it still blocks.
        assert!(matches!(
            s.feed(&d, b"ODNN7EXAMPLE\n"),
            Scan::Block { detector: 0, .. }
        ));
    }

    #[test]
    fn flag_regex_reports_once_and_forwards_everything() {
        let d = Detectors::new(&[regex(
            "bearer",
            r"(?i)authorization:[ \t]{0,8}bearer[ \t]{1,8}[A-Za-z0-9._~+/-]{20,4096}={0,2}",
            DetectorAction::Flag,
        )])
        .unwrap();
        let text = b"GET / HTTP/1.1\r\nAUTHORIZATION: bearer abcdefghijklmnopqrstuvwxyz\r\n\r\n";
        for split in 0..=text.len() {
            let (out, flags, block) = run_to_end(&d, &[&text[..split], &text[split..]]);
            assert_eq!((out.as_slice(), flags, block), (&text[..], vec![0], None));
        }
    }

    #[test]
    fn repeated_anchors_keep_a_bounded_number_of_candidates() {
        let d = Detectors::new(&[regex(
            "jwt",
            r"eyJ[A-Za-z0-9_-]{8,1024}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{16,1024}",
            DetectorAction::Block,
        )])
        .unwrap();
        let mut s = d.scanner();
        // Every anchor opens a candidate, but one dies once it is longer than its first
        // part may be (3 + 1024 bytes without a dot): a bounded number stay open, and only
        // the bytes from the oldest one's start are held.
        let text = "eyJ".repeat(2000);
        assert!(matches!(s.feed(&d, text.as_bytes()), Scan::Pass { .. }));
        assert!(s.candidates.len() <= 1027 / 3 + 1, "{}", s.candidates.len());
        let held = s.release_held().len();
        assert!((1000..=1027).contains(&held), "{held}");
    }

    #[test]
    fn detector_sets_split_by_direction_add_the_catalogue_and_keep_written_actions() {
        let text = "[[detectors]]\nname = \"up-only\"\nliteral = \"secret\"\naction = \"block\"\n\
                    direction = \"up\"\n\n[[detectors]]\nname = \"down-only\"\nregex = 'x[0-9]{2}'\n\
                    action = \"flag\"\ndirection = \"down\"\n\n[dlp]\ncatalogue = \"block\"\n\
                    catalogue_except = [\"jwt\"]\n";
        let policy = crate::policy::parse("p.toml", text).unwrap();
        let names = |d: &Detectors| -> Vec<String> {
            (0..d.names.len()).map(|i| d.name(i).to_string()).collect()
        };
        let set = DetectorSet::compile(Some(&policy), false).unwrap();
        let catalogue: Vec<String> = CATALOGUE
            .iter()
            .filter(|e| e.name != "jwt")
            .map(|e| e.name.to_string())
            .collect();
        assert_eq!(names(&set.up)[0], "up-only");
        assert_eq!(names(&set.up)[1..], catalogue[..]);
        assert_eq!(names(&set.down)[0], "down-only");
        assert_eq!(names(&set.down)[1..], catalogue[..]);
        let bearer = catalogue.iter().position(|n| n == "bearer").unwrap() + 1;
        assert_eq!(set.up.action(1), DetectorAction::Block);
        assert_eq!(set.up.action(bearer), DetectorAction::Flag);
        let monitor = DetectorSet::compile(Some(&policy), true).unwrap();
        assert_eq!(monitor.up.action(0), DetectorAction::Flag);
        assert_eq!(monitor.up.written_action(0), DetectorAction::Block);
        assert_eq!(monitor.up.written_action(bearer), DetectorAction::Flag);
        let mut s = monitor.up.scanner();
        assert_eq!(
            s.feed(&monitor.up, b"a secret"),
            Scan::Pass {
                release: b"a secret".to_vec(),
                flagged: vec![0]
            }
        );
        // No policy, or the catalogue off: nothing to search.
        let none = DetectorSet::compile(None, false).unwrap();
        assert!(none.up.is_empty() && none.down.is_empty());
    }

    #[test]
    fn whole_catalogue_compiles_in_reasonable_time() {
        let all: Vec<Detector> = CATALOGUE
            .iter()
            .map(|e| regex(e.name, e.regex, DetectorAction::Block))
            .collect();
        let started = std::time::Instant::now();
        let d = Detectors::new(&all).unwrap();
        let took = started.elapsed();
        let bytes: usize = d
            .verifiers
            .iter()
            .flatten()
            .map(|v| v.dfa.memory_usage())
            .sum();
        eprintln!(
            "catalogue: {} DFAs, {bytes} bytes, built in {took:?}",
            all.len()
        );
        for (e, v) in CATALOGUE.iter().zip(&d.verifiers) {
            let v = v.as_ref().unwrap();
            eprintln!("  {}: {} bytes", e.name, v.dfa.memory_usage());
        }
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }

    /// Throughput with the whole catalogue, on text made of the regexes' own characters
    /// (many anchors' neighbours, the slow case) and on binary: `cargo test --release -p
    /// enforcer --lib -- --ignored --nocapture scan_throughput`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn scan_throughput() {
        let all: Vec<Detector> = CATALOGUE
            .iter()
            .map(|e| regex(e.name, e.regex, DetectorAction::Block))
            .collect();
        let d = Detectors::new(&all).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-. ";
        let text: Vec<u8> = (0..32 << 20)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        let binary: Vec<u8> = (0..32 << 20).map(|_| next() as u8).collect();
        for (what, data) in [("text", &text), ("binary", &binary)] {
            let mut s = d.scanner();
            let started = std::time::Instant::now();
            let mut out = 0;
            for chunk in data.chunks(16 * 1024) {
                match s.feed(&d, chunk) {
                    Scan::Pass { release, .. } => out += release.len(),
                    Scan::Block { .. } => panic!("{what}: a block in random data"),
                }
            }
            let took = started.elapsed();
            eprintln!(
                "{what}: {:.0} MB/s ({out} bytes)",
                data.len() as f64 / took.as_secs_f64() / 1e6
            );
        }
    }
}
