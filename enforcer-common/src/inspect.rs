//! Types of the TLS-inspection object (`enforcer-inspect`): the marker automaton, the
//! per-socket flow state and the counters, shared by its `sk_msg` program and
//! `enforcer::ktls`.
//!
//! The detectors are one Aho-Corasick automaton compiled in user space into a full
//! transition table ([`Dfa`]), so the kernel side is one table load per byte and a marker
//! that straddles two messages is found by carrying one state number per socket
//! ([`FlowState::dfa_state`]).

use core::mem::size_of;

/// States of the automaton (a power of two: the program masks state numbers with
/// `MAX_STATES - 1` so every table index is provably in bounds). Bounds the total length of
/// all markers: the trie has at most one state per marker byte, plus the root.
pub const MAX_STATES: usize = 1024;
/// Markers per automaton (a power of two, for the same masking reason).
pub const MAX_MARKERS: usize = 64;
/// Automata kept at once: user space writes the one new flows do not use yet, then starts
/// giving new flows its number ([`FlowState::generation`]), so a flow never reads a
/// half-written table.
pub const GENERATIONS: u32 = 2;
/// Bytes scanned per `bpf_msg_pull_data` window: one page, so a pull copies at most one
/// order-0 page (an atomic allocation that rarely fails).
pub const WINDOW: u32 = 4096;
/// Windows scanned per program run: 16 KiB, the largest TLS record payload, so one kTLS
/// record is one run. A longer message (plain TCP) is split with `bpf_msg_apply_bytes` and
/// the rest comes back as a new run.
pub const MAX_WINDOWS: u32 = 4;

/// [`Dfa::marker_flags`]: a hit on this marker drops the message and every later one on
/// the flow (`SK_DROP`); without it a hit is only counted and recorded.
pub const MARKER_BLOCK: u32 = 1;

/// The compiled markers: `next[state * 256 + byte]` is the next state, `out[state]` is
/// `marker slot + 1` of a marker that ends in `state` (0: none; a blocking marker wins when
/// several end there).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Dfa {
    /// Transition table, full (no failure links left to follow in the kernel).
    pub next: [u16; MAX_STATES * 256],
    /// Marker ending in each state, as slot + 1.
    pub out: [u16; MAX_STATES],
    /// Per marker slot: [`MARKER_BLOCK`].
    pub marker_flags: [u32; MAX_MARKERS],
}
const _: () = assert!(size_of::<Dfa>() == MAX_STATES * 256 * 2 + MAX_STATES * 2 + MAX_MARKERS * 4);

/// `FlowKey::family` values (`AF_INET`, `AF_INET6`, as the `sk_msg` context reports them).
pub const FAMILY_V4: u32 = 2;
/// See [`FAMILY_V4`].
pub const FAMILY_V6: u32 = 10;

/// A TCP socket as the `sk_msg` context sees it. Addresses are the context's raw words
/// (network byte order; an IPv4 address is word 0, the others 0); ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order.
    pub remote_port: u32,
    /// Local address words.
    pub local_ip: [u32; 4],
    /// Remote address words.
    pub remote_ip: [u32; 4],
}
const _: () = assert!(size_of::<FlowKey>() == 44);

/// What the program keeps per inspected socket; user space creates the entry before the
/// socket can send, the program changes it in place (it runs under the socket lock, so one
/// run at a time per socket), user space reads it when the splice ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Automaton state after the last byte sent: the carry that finds straddling markers.
    pub dfa_state: u32,
    /// [`Dfa`] generation this flow started with.
    pub generation: u32,
    /// First marker hit on this flow, as slot + 1 (0: none).
    pub first_hit: u32,
    /// Blocking marker that stopped the flow, as slot + 1 (0: not blocked). Sticky: once
    /// set every later message is dropped too.
    pub blocked: u32,
    /// Plaintext bytes the program let through.
    pub bytes: u64,
    /// Marker hits on this flow (one per message at most).
    pub hits: u64,
}
const _: () = assert!(size_of::<FlowState>() == 32);

/// Why the program dropped or passed a message, counted per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InspectReason {
    /// Scanned, no blocking marker.
    Passed = 0,
    /// A blocking marker hit, or the flow was already blocked.
    Blocked = 1,
    /// The socket has no flow entry (fail closed: only registered sockets are in the map).
    UnknownFlow = 2,
    /// `bpf_msg_pull_data` failed (fail closed: unscanned bytes never pass).
    PullFailed = 3,
    /// No automaton in the map (cannot happen after load; fail closed).
    NoAutomaton = 4,
}

impl InspectReason {
    /// Number of reasons, the size of the `INSPECT_COUNTERS` map.
    pub const COUNT: u32 = 5;
    /// Every reason, in number order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Passed,
        Self::Blocked,
        Self::UnknownFlow,
        Self::PullFailed,
        Self::NoAutomaton,
    ];

    /// Stable name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Blocked => "blocked",
            Self::UnknownFlow => "unknown_flow",
            Self::PullFailed => "pull_failed",
            Self::NoAutomaton => "no_automaton",
        }
    }
}

/// Names in the object.
pub mod names {
    /// The `sk_msg` program.
    pub const PROG_INSPECT: &str = "inspect_msg";
    /// Sockmap the program is attached to; both sockets of a splice are in it.
    pub const MAP_SOCKS: &str = "INSPECT_SOCKS";
    /// Array of [`super::GENERATIONS`] [`super::Dfa`].
    pub const MAP_DFA: &str = "INSPECT_DFA";
    /// Hash [`super::FlowKey`] to [`super::FlowState`].
    pub const MAP_FLOWS: &str = "INSPECT_FLOWS";
    /// Array of u64 hits, `GENERATIONS * MAX_MARKERS`, index `generation * MAX_MARKERS + slot`.
    pub const MAP_HITS: &str = "INSPECT_HITS";
    /// Per-CPU array of u64 messages by [`super::InspectReason`].
    pub const MAP_COUNTERS: &str = "INSPECT_COUNTERS";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: #[repr(C)], only integers and arrays of integers, no implicit padding.
    unsafe impl aya::Pod for Dfa {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
}
