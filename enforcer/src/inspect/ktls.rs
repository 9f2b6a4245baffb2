//! Kernel TLS hand-off for the inspecting proxy: after both TLS handshakes, the agent's
//! connection and the upstream connection move into kernel TLS, an `sk_msg` BPF program
//! runs the detectors on the plaintext, and the kernel relays the bytes: after the
//! handshakes no application byte enters user-space memory.
//!
//! # What the kernel supports, and the design chosen
//! - **kTLS TX runs the socket's `sk_msg` verdict on plaintext.** `tls_sw_sendmsg` and the
//!   splice/sendpage path call `bpf_exec_tx_verdict` on the open record before encrypting
//!   it (Linux 4.20+, `net/tls/tls_sw.c`); `SK_DROP` frees the record and the send returns
//!   `EACCES`. Records are at most 16 KiB, so one record is one program run.
//! - **Order: sockmap first, then the TLS ULP** (as designed; current kernels refuse both
//!   orders, see below). The kernel refuses to add a socket that already has a ULP to a
//!   sockmap (`sockmap_ktls.c`, `test_sockmap_ktls_update_fails_when_sock_has_ulp`), while
//!   `tls_init` builds its protocol on top of whatever `sk_prot` the socket has, sockmap's
//!   included (`tls_build_proto`), which is what `test_sockmap`'s kTLS mode exercised.
//! - **splice(2) from a kTLS RX socket into a kTLS TX socket.** `tls_sw_splice_read`
//!   (Linux 4.17+) hands decrypted record pages to a pipe; splicing the pipe into the other
//!   socket goes through kTLS TX (`tls_sw_sendpage` on 6.1, `MSG_SPLICE_PAGES` on 6.5+),
//!   so the detectors see every byte and the plaintext moves page to page inside the
//!   kernel. User space only issues the syscalls.
//! - **Rejected: `sk_skb` stream verdict on the kTLS RX socket** (`sk_psock_tls_strp_read`
//!   does hand it decrypted skbs) with `bpf_sk_redirect_map` into the other socket: the
//!   redirected skb reaches the target through `skb_send_sock`, whose interplay with a
//!   kTLS TX socket has had fixes through 6.x (e.g. the 2025 sockmap_ktls selftests for
//!   `tx_cork`/`tx_no_buf`), and an `sk_skb` verdict cannot fail a send the way `SK_DROP` on
//!   the TX side fails the splice with `EACCES`, which is how user space learns of a block
//!   at once. `sk_msg` redirect into a kTLS TX socket was rejected for the same reason.
//! - **Control records stay in user space.** splice refuses non-data records (`EINVAL`,
//!   the record stays queued); they are read with `recvmsg` and `TLS_GET_RECORD_TYPE`:
//!   session tickets are dropped, `close_notify` is forwarded as an alert record. A TLS 1.3
//!   KeyUpdate ends the splice with an error: Linux 6.1 kTLS cannot rekey RX (6.13 can).
//!
//! The detectors are an Aho-Corasick automaton built here ([`Automaton`]) as a full
//! transition table the program walks one byte at a time, carrying its state per socket so
//! a marker split over records is found. A blocking marker drops the record that completes
//! it, so the peer never receives the whole marker; user space sees `EACCES`, resets both
//! connections and reports the [`Hit`].
//!
//! Plaintext rustls already decrypted before the hand-off (received application data in
//! its buffer) is written into the kTLS socket by user space, so it also passes the
//! detectors; [`SpliceReport::user_space_bytes`] counts it, and everything else counted in
//! the report comes from the program's per-socket counters.
//!
//! # What Debian's 6.1 and 6.12 kernels actually do (measured in the VM)
//! - The `enforcer-inspect` object loads and verifies on both (after three verifier
//!   workarounds commented in `enforcer-ebpf/src/inspect.rs`), and its detectors work on
//!   plain TCP sockets: the host tests run there too.
//! - The kTLS transport works on both: 64 MiB each way through [`splice_uninspected`]'s
//!   path, byte-exact, session tickets and close_notify handled as control records.
//! - **But neither kernel combines the two, and no order of steps helps.** Measured in the
//!   VM (`vm::ktls_keys_are_refused_exactly_while_the_socket_is_in_a_sockmap`, and a scratch
//!   matrix: TLS 1.2 and 1.3, AES-GCM-128 and -256, SOCKMAP and SOCKHASH, no program,
//!   `sk_msg` only, `sk_msg` plus an `sk_skb` verdict, IPv4 and IPv6, TX or RX first): a
//!   socket in a sockmap takes the `tls` ULP, then `TLS_TX` and `TLS_RX` both fail with
//!   `EINVAL`; deleted from the map, the same socket takes its keys. A socket with the ULP,
//!   keys or not, cannot join a sockmap (`EINVAL`).
//! - **Where: `do_tls_setsockopt_conf` (net/tls/tls_main.c) now starts with
//!   `if (sk_psock(sk)) return -EINVAL;`**, commented upstream "TLS and sockmap are mutually
//!   exclusive. A socket already in a sockmap (i.e. with a psock attached) cannot be
//!   upgraded to TLS. sockmap rejects TLS sockets already (see sk_psock_init())" (read in
//!   the bpf tree's tls_main.c, kernel-patches/bpf; the older torvalds/linux copy in the
//!   reference store lacks it). Its selftest (`sockmap_ktls.c`, "tls rx after sockmap
//!   insert") names the bug it closes: the kTLS + sockmap reverse-order `frag_list`
//!   use-after-free (TLS RX's strparser behind the psock's `data_ready`). Debian carries the
//!   backport: in `tls.ko` of 6.1.192 and of 6.12.117, `tls_setsockopt` for `TLS_TX`/`TLS_RX`
//!   takes the socket lock, tests `sk_user_data` for the psock flag and returns `-EINVAL`
//!   before reading the option (disassembled), and ftrace's function graph shows it
//!   returning without reaching `tls_set_device_offload`/`tls_set_sw_offload`. The other
//!   order was closed years earlier (`sk_psock_init` refuses a socket with a ULP;
//!   upstream's `update_fails_when_sock_has_ulp`).
//! - **So from which version does it work? None going forward.** `sk_msg` on kTLS ran
//!   from 4.20 (sockmap first, as `test_sockmap --ktls` did) until this check reached a
//!   kernel; mainline and the stable lines Debian ships have it, and upstream declared the
//!   combination unsupported rather than fixed it. Only a kernel from before the backport
//!   accepts the order, with the use-after-free the check closes. [`Ktls::load`] runs the
//!   sequence on a loopback socket and returns [`KtlsError::NoSockmapKtls`] wherever it is
//!   refused, and the proxy ([`crate::inspect::InspectPath::choose`]) falls back to user
//!   space with that reason. The inspected splice tests in `tests/tests/ktls.rs` therefore
//!   run nowhere available; the hand-off of the proxy's connections to [`Ktls::splice`] is
//!   not wired in, for want of a kernel to test it on.
//! - Before the hand-off, tokio-rustls's handshake loop reads on while the session wants to
//!   read, so one application record per connection may already be decrypted in user space
//!   ([`SpliceReport::user_space_bytes`]); [`HandshakeCork`] keeps that to whole records,
//!   which the kernel can continue from.
//!
//! Minimum kernel: 5.17 (`bpf_loop` in the detectors), TLS 1.3 RX offload 5.2.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    io::{self, Read as _},
    mem::size_of,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    sync::{Mutex, MutexGuard},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockMap},
    programs::{ProgramError, SkMsg},
};
use enforcer_common::inspect::{
    Dfa, FAMILY_V4, FAMILY_V6, FlowKey, FlowState, GENERATIONS, InspectReason, MARKER_BLOCK,
    MAX_MARKERS, MAX_STATES, names,
};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::{io::Interest, net::TcpStream};

/// The `enforcer-inspect` object, built by `build.rs`.
static INSPECT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer-inspect"));

/// Sockets the sockmap holds at once: two per spliced connection.
const MAX_SOCKETS: u32 = 4096;
/// Bytes moved per splice call: one full TLS record, so each call is one detector run.
const SPLICE_CHUNK: usize = 16 * 1024;

/// A literal marker the detectors look for, in both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// Caller's id, reported back in [`Hit`] and the hit counters.
    pub id: u32,
    /// The bytes to find (case-sensitive, non-empty).
    pub literal: Vec<u8>,
}

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Agent to upstream.
    Up,
    /// Upstream to agent.
    Down,
}

/// A marker found on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// [`Marker::id`].
    pub marker_id: u32,
    /// Where it was found.
    pub direction: Direction,
}

/// What a splice did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpliceReport {
    /// Plaintext bytes sent upstream (the program's counter on the upstream socket).
    pub up_bytes: u64,
    /// Plaintext bytes sent to the agent (the program's counter on the agent socket).
    pub down_bytes: u64,
    /// The first marker found (the blocking one when a block ended the splice).
    pub hit: Option<Hit>,
    /// A blocking marker stopped the connection; both sides were reset.
    pub blocked: bool,
    /// Plaintext bytes user space handled: what rustls had already decrypted before the
    /// hand-off. Everything else stayed in the kernel.
    pub user_space_bytes: u64,
}

/// Errors of the kTLS hand-off.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel cannot do kernel TLS; the proxy falls back to user space.
    #[error("kernel has no kTLS (CONFIG_TLS): {detail}")]
    NoKtls {
        /// What failed.
        detail: String,
    },
    /// The kernel has kTLS and sockmap but will not combine them (a socket in a sockmap
    /// cannot get kTLS keys, and one with keys cannot join a sockmap): the case on Debian's
    /// Linux 6.1 and 6.12. The proxy falls back to user space.
    #[error("kernel cannot inspect kTLS sockets through a sockmap: {detail}")]
    NoSockmapKtls {
        /// Which step the kernel refused.
        detail: String,
    },
    /// The BPF object did not load (needs Linux 5.17 for bpf_loop, and sockmap).
    #[error("loading the inspection object (needs Linux 5.17+ with sockmap)")]
    Load {
        /// The loader's error.
        #[source]
        source: EbpfError,
    },
    /// A program in the object is missing, did not verify, or did not attach.
    #[error("{what}")]
    Program {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("{what}")]
    Map {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// The object lacks a map this code needs (object and code out of step).
    #[error("the inspection object has no map {name}")]
    MissingMap {
        /// Map name.
        name: &'static str,
    },
    /// The markers cannot be compiled.
    #[error("markers: {message}")]
    Markers {
        /// What is wrong, naming the marker.
        message: String,
    },
    /// The socket is no longer ESTABLISHED (the peer already half-closed it, or it
    /// failed): the kernel only puts ESTABLISHED TCP sockets in a sockmap.
    #[error("the connection is no longer established (peer closed it before the kTLS hand-off)")]
    NotEstablished,
    /// Every sockmap slot is taken.
    #[error("the inspection sockmap is full ({MAX_SOCKETS} sockets)")]
    Full,
    /// rustls refused to hand out the session's secrets.
    #[error("extracting the {side} connection's TLS secrets")]
    Secrets {
        /// `agent` or `upstream`.
        side: &'static str,
        /// The cause (e.g. `enable_secret_extraction` not set).
        #[source]
        source: rustls::Error,
    },
    /// The negotiated TLS version or cipher suite has no kTLS equivalent here.
    #[error("the {side} connection uses {what}, which kernel TLS offload does not support")]
    Unsupported {
        /// `agent` or `upstream`.
        side: &'static str,
        /// The version or suite.
        what: String,
    },
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The peer sent something the kernel relay cannot handle.
    #[error("{side} connection: {message}")]
    Protocol {
        /// `agent` or `upstream`.
        side: &'static str,
        /// What arrived.
        message: String,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> KtlsError {
    move |source| KtlsError::Io { what, source }
}

fn map_err(what: &'static str) -> impl FnOnce(MapError) -> KtlsError {
    move |source| KtlsError::Map { what, source }
}

// ---------------------------------------------------------------------------------------
// The automaton
// ---------------------------------------------------------------------------------------

/// The markers compiled into the table the kernel walks (Aho-Corasick with every failure
/// transition resolved in advance, so the kernel never backtracks).
pub struct Automaton {
    dfa: Box<Dfa>,
    /// Marker id of each slot.
    ids: Vec<u32>,
}

impl Automaton {
    /// Compiles `(marker, block)` pairs. Errors name the marker: an empty literal, a
    /// duplicate id, more than [`MAX_MARKERS`] markers, or literals longer in total than
    /// the table's [`MAX_STATES`] states allow.
    pub fn build(markers: &[(Marker, bool)]) -> Result<Self, KtlsError> {
        if markers.len() > MAX_MARKERS {
            return Err(KtlsError::Markers {
                message: format!("{} markers, at most {MAX_MARKERS}", markers.len()),
            });
        }
        // SAFETY: Dfa is integers and arrays of integers; all zeroes is a valid value
        // (every transition to the root, no outputs). Allocated zeroed on the heap because
        // it is half a megabyte.
        let mut dfa: Box<Dfa> = unsafe { Box::<Dfa>::new_zeroed().assume_init() };
        let mut ids = Vec::with_capacity(markers.len());
        // Trie: child[state][byte], 0 = none (the root is never a child).
        let mut child: Vec<[u16; 256]> = vec![[0; 256]];
        let mut out: Vec<u16> = vec![0];
        for (slot, (marker, block)) in markers.iter().enumerate() {
            if marker.literal.is_empty() {
                return Err(KtlsError::Markers {
                    message: format!("marker {} is empty", marker.id),
                });
            }
            if ids.contains(&marker.id) {
                return Err(KtlsError::Markers {
                    message: format!("marker id {} appears twice", marker.id),
                });
            }
            ids.push(marker.id);
            dfa.marker_flags[slot] = if *block { MARKER_BLOCK } else { 0 };
            let mut state = 0usize;
            for &byte in &marker.literal {
                let next = child[state][byte as usize];
                state = if next != 0 {
                    next as usize
                } else {
                    if child.len() == MAX_STATES {
                        return Err(KtlsError::Markers {
                            message: format!(
                                "marker {} does not fit: the markers' literals need more than \
                                 {} states (about that many bytes in total)",
                                marker.id,
                                MAX_STATES - 1
                            ),
                        });
                    }
                    child.push([0; 256]);
                    out.push(0);
                    let new = child.len() - 1;
                    child[state][byte as usize] = new as u16;
                    new
                };
            }
            out[state] = preferred(out[state], slot as u16 + 1, &dfa.marker_flags);
        }

        // Breadth first, so a state's failure state (shorter) is complete before it.
        let mut fail = vec![0usize; child.len()];
        let mut queue = std::collections::VecDeque::from([0usize]);
        while let Some(state) = queue.pop_front() {
            for (byte, &next) in child[state].iter().enumerate() {
                let idx = state * 256 + byte;
                if next != 0 {
                    let next = next as usize;
                    fail[next] = if state == 0 {
                        0
                    } else {
                        dfa.next[fail[state] * 256 + byte] as usize
                    };
                    out[next] = preferred(out[next], out[fail[next]], &dfa.marker_flags);
                    dfa.next[idx] = next as u16;
                    queue.push_back(next);
                } else {
                    dfa.next[idx] = if state == 0 {
                        0
                    } else {
                        dfa.next[fail[state] * 256 + byte]
                    };
                }
            }
        }
        dfa.out[..out.len()].copy_from_slice(&out);
        Ok(Self { dfa, ids })
    }

    /// Runs `bytes` from `state` the way the kernel does; returns the state after them and
    /// the first hit as `(marker id, blocks)`, stopping at a blocking hit. For tests and
    /// for checking the kernel's results.
    pub fn scan(&self, mut state: u32, bytes: &[u8]) -> (u32, Option<(u32, bool)>) {
        let mut hit = None;
        for &byte in bytes {
            state = u32::from(self.dfa.next[(state as usize % MAX_STATES) * 256 + byte as usize]);
            let out = self.dfa.out[state as usize];
            if out != 0 {
                let slot = usize::from(out - 1);
                let block = self.dfa.marker_flags[slot] & MARKER_BLOCK != 0;
                if hit.is_none() || block {
                    hit = Some((self.ids[slot], block));
                }
                if block {
                    break;
                }
            }
        }
        (state, hit)
    }

    /// Marker id of a slot + 1 value as the kernel reports it.
    fn id_of(&self, slot_plus_one: u32) -> Option<u32> {
        self.ids
            .get((slot_plus_one as usize).checked_sub(1)?)
            .copied()
    }
}

/// Of two outputs (slot + 1, 0 none) ending in one state, the one to report: a blocking
/// marker wins, so a flagged marker that is a suffix of a blocking one cannot hide it.
fn preferred(a: u16, b: u16, flags: &[u32; MAX_MARKERS]) -> u16 {
    let blocks = |o: u16| o != 0 && flags[usize::from(o - 1)] & MARKER_BLOCK != 0;
    match (a, b) {
        (0, b) => b,
        (a, 0) => a,
        (a, b) if blocks(b) && !blocks(a) => b,
        (a, _) => a,
    }
}

// ---------------------------------------------------------------------------------------
// The loaded object
// ---------------------------------------------------------------------------------------

struct Maps {
    socks: SockMap<MapData>,
    dfa: Array<MapData, Dfa>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    hits: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// The automaton of each generation, to name the markers its flows report.
    automata: [Option<Automaton>; GENERATIONS as usize],
    active: u32,
    /// Hits of generations since overwritten, by marker id.
    retired_hits: BTreeMap<u32, u64>,
    free_slots: Vec<u32>,
}

/// The `enforcer-inspect` object, loaded, its `sk_msg` program attached to its sockmap.
/// Works on any TCP socket (plain TCP sockets get the same verdicts from `tcp_bpf`), so it
/// loads without kTLS; [`Ktls`] adds the TLS hand-off.
pub struct Inspector {
    maps: Mutex<Maps>,
    // Owns the program (and so its attachment); dropped after the maps.
    _ebpf: Ebpf,
}

impl Inspector {
    /// Loads the object and installs the markers (`(marker, block)`).
    pub fn load(markers: &[(Marker, bool)]) -> Result<Self, KtlsError> {
        let automaton = Automaton::build(markers)?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::MAP_SOCKS, MAX_SOCKETS)
            .map_max_entries(names::MAP_FLOWS, MAX_SOCKETS)
            .load(INSPECT_OBJECT)
            .map_err(|source| KtlsError::Load { source })?;
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(KtlsError::MissingMap { name });
        let socks = SockMap::try_from(take(names::MAP_SOCKS)?)
            .map_err(map_err("opening the inspection sockmap"))?;
        let dfa =
            Array::try_from(take(names::MAP_DFA)?).map_err(map_err("opening the automaton map"))?;
        let flows =
            HashMap::try_from(take(names::MAP_FLOWS)?).map_err(map_err("opening the flow map"))?;
        let hits =
            Array::try_from(take(names::MAP_HITS)?).map_err(map_err("opening the hit counters"))?;
        let counters = PerCpuArray::try_from(take(names::MAP_COUNTERS)?)
            .map_err(map_err("opening the inspection counters"))?;

        let socks_fd = socks
            .fd()
            .try_clone()
            .map_err(io_err("duplicating the sockmap fd"))?;
        let prog: &mut SkMsg = ebpf
            .program_mut(names::PROG_INSPECT)
            .ok_or(KtlsError::Program {
                what: "the inspection object has no inspect_msg program",
                source: ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| KtlsError::Program {
                what: "inspect_msg is not an sk_msg program",
                source,
            })?;
        prog.load().map_err(|source| KtlsError::Program {
            what: "loading inspect_msg (the verifier's log is in the cause)",
            source,
        })?;
        prog.attach(&socks_fd)
            .map_err(|source| KtlsError::Program {
                what: "attaching inspect_msg to the sockmap",
                source,
            })?;

        let mut maps = Maps {
            socks,
            dfa,
            flows,
            hits,
            counters,
            automata: [None, None],
            active: 0,
            retired_hits: BTreeMap::new(),
            free_slots: (0..MAX_SOCKETS).rev().collect(),
        };
        maps.install(automaton, 0)?;
        Ok(Self {
            maps: Mutex::new(maps),
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock leaves the maps as consistent as the kernel's
        // view of them, so the poison is not a reason to stop inspecting.
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the markers. Connections from now on use the new set; connections already
    /// spliced keep the set they started with, as long as they are not two changes old (the
    /// object keeps two automata).
    pub fn set_markers(&self, markers: &[(Marker, bool)]) -> Result<(), KtlsError> {
        let automaton = Automaton::build(markers)?;
        let mut maps = self.maps();
        let next = (maps.active + 1) % GENERATIONS;
        maps.install(automaton, next)
    }

    /// Hits per marker id since load (all generations).
    pub fn hits(&self) -> Result<BTreeMap<u32, u64>, KtlsError> {
        let maps = self.maps();
        let mut total = maps.retired_hits.clone();
        for generation in 0..GENERATIONS {
            if let Some(automaton) = &maps.automata[generation as usize] {
                for (slot, id) in automaton.ids.iter().enumerate() {
                    let count = maps.hit_count(generation, slot as u32)?;
                    *total.entry(*id).or_default() += count;
                }
            }
        }
        Ok(total)
    }

    /// Messages the program judged, by reason, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(InspectReason, u64)>, KtlsError> {
        let maps = self.maps();
        InspectReason::ALL
            .iter()
            .map(|&reason| {
                let values = maps
                    .counters
                    .get(&(reason as u32), 0)
                    .map_err(map_err("reading the inspection counters"))?;
                Ok((reason, values.iter().sum()))
            })
            .collect()
    }

    /// Puts a connected TCP socket under inspection: every byte sent on it from now on
    /// passes the detectors. Must happen before the socket gets a ULP (kTLS). The socket
    /// leaves the sockmap when the returned guard drops.
    pub fn register(
        &self,
        socket: BorrowedFd<'_>,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Registration<'_>, KtlsError> {
        let key = flow_key(local, peer);
        let mut maps = self.maps();
        let slot = maps.free_slots.pop().ok_or(KtlsError::Full)?;
        let state = FlowState {
            generation: maps.active,
            ..FlowState::default()
        };
        let generation = maps.active;
        if let Err(e) = maps.flows.insert(key, state, 0) {
            maps.free_slots.push(slot);
            return Err(map_err("registering the socket's flow")(e));
        }
        if let Err(e) = maps.socks.set(slot, &socket, 0) {
            let _ = maps.flows.remove(&key);
            maps.free_slots.push(slot);
            if let MapError::SyscallError(aya::sys::SyscallError { io_error, .. }) = &e
                && io_error.raw_os_error() == Some(libc::EOPNOTSUPP)
            {
                return Err(KtlsError::NotEstablished);
            }
            return Err(map_err("adding the socket to the inspection sockmap")(e));
        }
        Ok(Registration {
            inspector: self,
            key,
            slot,
            generation,
        })
    }
}

impl Maps {
    fn install(&mut self, automaton: Automaton, generation: u32) -> Result<(), KtlsError> {
        // Fold the old hits of this generation into the totals before its slots change
        // meaning, then zero them.
        if let Some(old) = self.automata[generation as usize].take() {
            for (slot, id) in old.ids.iter().enumerate() {
                let count = self.hit_count(generation, slot as u32)?;
                *self.retired_hits.entry(*id).or_default() += count;
            }
        }
        for slot in 0..MAX_MARKERS as u32 {
            self.hits
                .set(generation * MAX_MARKERS as u32 + slot, 0, 0)
                .map_err(map_err("zeroing the hit counters"))?;
        }
        self.dfa
            .set(generation, automaton.dfa.as_ref(), 0)
            .map_err(map_err("writing the marker automaton"))?;
        self.automata[generation as usize] = Some(automaton);
        self.active = generation;
        Ok(())
    }

    fn hit_count(&self, generation: u32, slot: u32) -> Result<u64, KtlsError> {
        self.hits
            .get(&(generation * MAX_MARKERS as u32 + slot), 0)
            .map_err(map_err("reading the hit counters"))
    }
}

/// A socket in the inspection sockmap; removes it (and its flow state) on drop.
pub struct Registration<'a> {
    inspector: &'a Inspector,
    key: FlowKey,
    slot: u32,
    generation: u32,
}

impl Registration<'_> {
    /// The program's state for this socket.
    pub fn flow(&self) -> Result<FlowState, KtlsError> {
        self.inspector
            .maps()
            .flows
            .get(&self.key, 0)
            .map_err(map_err("reading the socket's flow state"))
    }

    /// Marker id of the flow's first hit and whether it blocked the flow.
    pub fn hit(&self) -> Result<Option<(u32, bool)>, KtlsError> {
        let flow = self.flow()?;
        let maps = self.inspector.maps();
        let Some(automaton) = &maps.automata[self.generation as usize] else {
            return Ok(None);
        };
        Ok(if flow.blocked != 0 {
            automaton.id_of(flow.blocked).map(|id| (id, true))
        } else {
            automaton.id_of(flow.first_hit).map(|id| (id, false))
        })
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut maps = self.inspector.maps();
        // The socket may be closed already, which removed it from the sockmap; either way
        // the slot is free again.
        let _ = maps.socks.clear_index(&self.slot);
        let _ = maps.flows.remove(&self.key);
        maps.free_slots.push(self.slot);
    }
}

/// The key the program computes for a socket, from user space's view of it.
fn flow_key(local: SocketAddr, peer: SocketAddr) -> FlowKey {
    fn words(addr: SocketAddr) -> (u32, [u32; 4]) {
        match addr {
            // IPv4-mapped addresses on a dual-stack socket: the kernel reports the socket's
            // family, AF_INET6, with the mapped address, which is what this keeps.
            SocketAddr::V4(v4) => (FAMILY_V4, [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0]),
            SocketAddr::V6(v6) => {
                let o = v6.ip().octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (FAMILY_V6, [w(0), w(4), w(8), w(12)])
            }
        }
    }
    let (family, local_ip) = words(local);
    let (_, remote_ip) = words(peer);
    FlowKey {
        family,
        local_port: u32::from(local.port()),
        remote_port: u32::from(peer.port()),
        local_ip,
        remote_ip,
    }
}

// ---------------------------------------------------------------------------------------
// kTLS
// ---------------------------------------------------------------------------------------

/// The loaded sockmap object with the kernel-TLS hand-off; one per daemon.
pub struct Ktls {
    inspector: Inspector,
}

impl Ktls {
    /// Checks that the kernel has the TLS ULP (setting it on a loopback socket, which also
    /// loads the `tls` module), then loads the BPF object (sockmap, `sk_msg`, `bpf_loop`).
    /// `block_on_hit(id)` says which markers block; the others are only counted and
    /// reported. The error says what is missing, e.g. "kernel has no kTLS (CONFIG_TLS)".
    pub fn load(markers: &[Marker], block_on_hit: impl Fn(u32) -> bool) -> Result<Self, KtlsError> {
        probe_ktls()?;
        let markers: Vec<(Marker, bool)> = markers
            .iter()
            .map(|m| (m.clone(), block_on_hit(m.id)))
            .collect();
        let inspector = Inspector::load(&markers)?;
        probe_sockmap_ktls(&inspector)?;
        Ok(Self { inspector })
    }

    /// Replaces the markers (see [`Inspector::set_markers`]).
    pub fn set_markers(&self, markers: &[(Marker, bool)]) -> Result<(), KtlsError> {
        self.inspector.set_markers(markers)
    }

    /// The detectors, their counters.
    pub fn inspector(&self) -> &Inspector {
        &self.inspector
    }

    /// Takes over both TLS sessions after their handshakes and relays in the kernel until
    /// both directions close or a blocking marker hits (then both connections are reset).
    ///
    /// Steps: flush what rustls still has to send, take the plaintext rustls already
    /// decrypted, extract the secrets; put both sockets in the sockmap; then TLS ULP, TX
    /// and RX on each (the order the kernel needs); write the taken plaintext through the
    /// detectors; then splice each direction RX → pipe → TX.
    ///
    /// The TLS streams must come straight from the handshake: rustls must not have read
    /// part of a record past it (see [`HandshakeCork`]).
    pub async fn splice<A, U>(
        &self,
        agent: tokio_rustls::server::TlsStream<A>,
        upstream: tokio_rustls::client::TlsStream<U>,
    ) -> Result<SpliceReport, KtlsError>
    where
        A: IntoTcp,
        U: IntoTcp,
    {
        splice_pair(Some(&self.inspector), agent, upstream).await
    }
}

/// The kTLS transport of [`Ktls::splice`] without the sockmap and its detectors: the same
/// hand-off (secrets, crypto info, record sequence numbers, control records, splice
/// RX → pipe → TX), so the transport can be tested and measured on kernels that refuse
/// sockmap + kTLS (Debian's 6.1 and 6.12). Bytes pass uninspected, hence only behind the
/// `ktls-transport-test` feature, which only the tests enable.
#[cfg(feature = "ktls-transport-test")]
pub async fn splice_uninspected<A, U>(
    agent: tokio_rustls::server::TlsStream<A>,
    upstream: tokio_rustls::client::TlsStream<U>,
) -> Result<SpliceReport, KtlsError>
where
    A: IntoTcp,
    U: IntoTcp,
{
    probe_ktls()?;
    splice_pair(None, agent, upstream).await
}

/// The hand-off and relay; with `inspector`, both sockets are in its sockmap and the byte
/// counts and hits come from the program, else the counts are what splice moved.
async fn splice_pair<A, U>(
    inspector: Option<&Inspector>,
    agent: tokio_rustls::server::TlsStream<A>,
    upstream: tokio_rustls::client::TlsStream<U>,
) -> Result<SpliceReport, KtlsError>
where
    A: IntoTcp,
    U: IntoTcp,
{
    let (agent_io, agent_conn) = agent.into_inner();
    let (upstream_io, upstream_conn) = upstream.into_inner();
    let agent = Side::take(agent_io.into_tcp()?, agent_conn.into(), "agent").await?;
    let upstream = Side::take(upstream_io.into_tcp()?, upstream_conn.into(), "upstream").await?;

    // Sockmap first: the kernel refuses sockets that already have a ULP.
    let registrations = match inspector {
        Some(inspector) => Some((agent.register(inspector)?, upstream.register(inspector)?)),
        None => None,
    };
    agent.enable_ktls()?;
    upstream.enable_ktls()?;

    let mut report = SpliceReport {
        user_space_bytes: (agent.taken.len() + upstream.taken.len()) as u64,
        ..SpliceReport::default()
    };
    // Plaintext rustls decrypted before the hand-off: through the detectors like the rest
    // (agent's goes up, upstream's goes down).
    let mut blocked =
        !write_all(&upstream, &agent.taken).await? || !write_all(&agent, &upstream.taken).await?;
    let (mut up_moved, mut down_moved) = (agent.taken.len() as u64, upstream.taken.len() as u64);

    if !blocked {
        let up = relay(&agent, &upstream, agent.closed);
        let down = relay(&upstream, &agent, upstream.closed);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            let end = tokio::select! {
                end = &mut up, if !up_done => {
                    up_done = true;
                    let (end, moved) = end?;
                    up_moved += moved;
                    end
                }
                end = &mut down, if !down_done => {
                    down_done = true;
                    let (end, moved) = end?;
                    down_moved += moved;
                    end
                }
            };
            if end == End::Blocked {
                blocked = true;
                break;
            }
        }
    }

    report.blocked = blocked;
    if let Some((agent_reg, upstream_reg)) = &registrations {
        let up_flow = upstream_reg.flow()?;
        let down_flow = agent_reg.flow()?;
        report.up_bytes = up_flow.bytes;
        report.down_bytes = down_flow.bytes;
        report.hit = match (upstream_reg.hit()?, agent_reg.hit()?) {
            // A blocking hit is the one to report.
            (Some((id, true)), _) | (None | Some((_, false)), Some((id, true))) => Some(Hit {
                marker_id: id,
                direction: if up_flow.blocked != 0 {
                    Direction::Up
                } else {
                    Direction::Down
                },
            }),
            (Some((id, false)), _) => Some(Hit {
                marker_id: id,
                direction: Direction::Up,
            }),
            (None, Some((id, false))) => Some(Hit {
                marker_id: id,
                direction: Direction::Down,
            }),
            (None, None) => None,
        };
    } else {
        report.up_bytes = up_moved;
        report.down_bytes = down_moved;
    }
    if blocked {
        agent.reset();
        upstream.reset();
    }
    drop(registrations);
    Ok(report)
}

/// Sets the `tls` ULP on a loopback TCP socket: the only reliable test (the module may be
/// loadable but not loaded, and `/proc/sys/net/ipv4/tcp_available_ulp` lists only loaded
/// ULPs).
fn probe_ktls() -> Result<(), KtlsError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(io_err("binding a loopback socket to probe for kTLS"))?;
    let addr = listener.local_addr().map_err(io_err("probing for kTLS"))?;
    let client = std::net::TcpStream::connect(addr)
        .map_err(io_err("connecting on loopback to probe kTLS"))?;
    let _server = listener
        .accept()
        .map_err(io_err("accepting the kTLS probe"))?;
    set_ulp(client.as_raw_fd()).map_err(|e| KtlsError::NoKtls {
        detail: format!(
            "setting the \"tls\" TCP ULP failed: {e} (kernel TLS needs Linux 4.13+ built with \
             CONFIG_TLS)"
        ),
    })
}

/// Runs the hand-off's kernel sequence on a loopback socket: into the inspection sockmap,
/// TLS ULP, then TX keys (a throwaway AES-128-GCM key). Debian's Linux 6.1.192 and
/// 6.12.117 refuse the keys with EINVAL once the socket is in a sockmap (with or without a
/// program attached), and refuse a socket with keys in a sockmap (EINVAL), so on them the
/// splice cannot run at all; this says so at load time instead of failing every
/// connection.
fn probe_sockmap_ktls(inspector: &Inspector) -> Result<(), KtlsError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(io_err("binding a loopback socket to probe sockmap + kTLS"))?;
    let addr = listener
        .local_addr()
        .map_err(io_err("probing sockmap + kTLS"))?;
    let client = std::net::TcpStream::connect(addr)
        .map_err(io_err("connecting on loopback to probe sockmap + kTLS"))?;
    let _server = listener
        .accept()
        .map_err(io_err("accepting the sockmap + kTLS probe"))?;
    let local = client
        .local_addr()
        .map_err(io_err("probing sockmap + kTLS"))?;
    let _registration = inspector.register(client.as_fd(), local, addr)?;
    let refused = |step: &str, e: io::Error| KtlsError::NoSockmapKtls {
        detail: format!("{step} on a socket in the sockmap failed: {e}"),
    };
    set_ulp(client.as_raw_fd()).map_err(|e| refused("setting the \"tls\" ULP", e))?;
    let info = libc::tls12_crypto_info_aes_gcm_128 {
        info: libc::tls_crypto_info {
            version: libc::TLS_1_3_VERSION,
            cipher_type: libc::TLS_CIPHER_AES_GCM_128,
        },
        iv: [0; 8],
        key: [0; 16],
        salt: [0; 4],
        rec_seq: [0; 8],
    };
    // SAFETY: our socket; the option value is `info`, of its size.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TLS,
            libc::TLS_TX,
            (&raw const info).cast(),
            size_of::<libc::tls12_crypto_info_aes_gcm_128>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let mut refusal = refused("setting kTLS TX keys", e);
        if let KtlsError::NoSockmapKtls { detail } = &mut refusal {
            // The check that refuses it (module doc): worth naming in the one log line.
            detail.push_str(" (this kernel keeps TLS and sockmap mutually exclusive)");
        }
        return Err(refusal);
    }
    Ok(())
}

fn set_ulp(fd: RawFd) -> io::Result<()> {
    const TLS: &[u8] = b"tls";
    // SAFETY: fd is an open socket; the option value is a valid buffer of that length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            TLS.as_ptr().cast(),
            TLS.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The transport under a TLS stream that [`Ktls::splice`] accepts: a plain tokio
/// `TcpStream`, or one wrapped in [`HandshakeCork`].
pub trait IntoTcp: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    /// The socket.
    fn into_tcp(self) -> Result<TcpStream, KtlsError>;
}

impl IntoTcp for TcpStream {
    fn into_tcp(self) -> Result<TcpStream, KtlsError> {
        Ok(self)
    }
}

/// A `TcpStream` that never reads past the end of a TLS record, so when the handshake
/// completes rustls holds no partial record of application data: the next byte in the
/// socket is the start of a record, which is where kernel TLS must start. (rustls reads in
/// 4 KiB chunks and keeps a partial record in a buffer it cannot hand over.) Use it under
/// the acceptor and the connector of connections that may be spliced.
pub struct HandshakeCork {
    tcp: TcpStream,
    /// Bytes left in the current record; 0 at a record boundary.
    left: usize,
    /// Header bytes read so far (a header may arrive in pieces).
    header: [u8; 5],
    header_len: usize,
}

impl HandshakeCork {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            left: 0,
            header: [0; 5],
            header_len: 0,
        }
    }
}

impl IntoTcp for HandshakeCork {
    fn into_tcp(self) -> Result<TcpStream, KtlsError> {
        if self.header_len != 0 || self.left != 0 {
            return Err(KtlsError::Protocol {
                side: "handed-over",
                message: "the TLS stream stopped inside a record".into(),
            });
        }
        Ok(self.tcp)
    }
}

impl tokio::io::AsyncRead for HandshakeCork {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.left == 0 {
            // At a boundary: read the header alone, then hand it out.
            while this.header_len < 5 {
                let mut hb = tokio::io::ReadBuf::new(&mut this.header[this.header_len..]);
                match std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut hb) {
                    Poll::Ready(Ok(())) if hb.filled().is_empty() => {
                        // EOF: give out a partial header so rustls sees the truncation.
                        let n = this.header_len.min(buf.remaining());
                        buf.put_slice(&this.header[..n]);
                        this.header_len = 0;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(())) => this.header_len += hb.filled().len(),
                    other => return other,
                }
            }
            if buf.remaining() < 5 {
                return Poll::Ready(Err(io::Error::other("read buffer under 5 bytes")));
            }
            buf.put_slice(&this.header);
            this.left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
            this.header_len = 0;
            return Poll::Ready(Ok(()));
        }
        let want = this.left.min(buf.remaining());
        let mut limited = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(want));
        let poll = std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut limited);
        if let Poll::Ready(Ok(())) = poll {
            let n = limited.filled().len();
            buf.advance(n);
            this.left -= n;
        }
        poll
    }
}

impl tokio::io::AsyncWrite for HandshakeCork {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// One connection being handed to the kernel.
struct Side {
    tcp: TcpStream,
    name: &'static str,
    version: ProtocolVersion,
    tx: (u64, ConnectionTrafficSecrets),
    rx: (u64, ConnectionTrafficSecrets),
    /// Application plaintext rustls had already decrypted.
    taken: Vec<u8>,
    /// The peer had already sent close_notify.
    closed: bool,
}

impl Side {
    async fn take(
        tcp: TcpStream,
        mut conn: rustls::Connection,
        name: &'static str,
    ) -> Result<Self, KtlsError> {
        // rustls refuses to give the secrets while it has records to send (the server's
        // session tickets, typically).
        while conn.wants_write() {
            tcp.writable()
                .await
                .map_err(io_err("waiting to flush TLS records"))?;
            match conn.write_tls(&mut TryWriter(&tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err("flushing TLS records before the hand-off")(e)),
            }
        }
        let mut taken = Vec::new();
        let closed = match conn.reader().read_to_end(&mut taken) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(io_err("taking the plaintext rustls buffered")(e)),
        };
        let version = conn.protocol_version().ok_or_else(|| KtlsError::Protocol {
            side: name,
            message: "handshake not complete".into(),
        })?;
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|source| KtlsError::Secrets { side: name, source })?;
        Ok(Self {
            tcp,
            name,
            version,
            tx: secrets.tx,
            rx: secrets.rx,
            taken,
            closed,
        })
    }

    fn register<'a>(&self, inspector: &'a Inspector) -> Result<Registration<'a>, KtlsError> {
        let local = self
            .tcp
            .local_addr()
            .map_err(io_err("reading the socket's address"))?;
        let peer = self
            .tcp
            .peer_addr()
            .map_err(io_err("reading the socket's peer address"))?;
        inspector.register(self.tcp.as_fd(), local, peer)
    }

    fn enable_ktls(&self) -> Result<(), KtlsError> {
        let fd = self.tcp.as_raw_fd();
        set_ulp(fd).map_err(|e| KtlsError::NoKtls {
            detail: format!("setting the \"tls\" ULP on the {} socket: {e}", self.name),
        })?;
        for (option, (seq, secrets), what) in [
            (libc::TLS_TX, &self.tx, "setting kTLS TX keys"),
            (libc::TLS_RX, &self.rx, "setting kTLS RX keys"),
        ] {
            let info = CryptoInfo::new(self.version, *seq, secrets, self.name)?;
            let (ptr, len) = info.as_raw();
            // SAFETY: fd is our socket; ptr/len describe the crypto-info struct `info`.
            let rc = unsafe { libc::setsockopt(fd, libc::SOL_TLS, option, ptr, len) };
            if rc != 0 {
                return Err(io_err(what)(io::Error::last_os_error()));
            }
        }
        Ok(())
    }

    /// Aborts the connection: close with a zero linger sends an RST.
    fn reset(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and option buffer. Failure leaves an orderly close, which is
        // still a close.
        unsafe {
            libc::setsockopt(
                self.tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

/// `io::Write` over a non-blocking tokio socket, for rustls's `write_tls`.
struct TryWriter<'a>(&'a TcpStream);

impl io::Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// kTLS's crypto-info structs, by cipher.
enum CryptoInfo {
    Aes128(libc::tls12_crypto_info_aes_gcm_128),
    Aes256(libc::tls12_crypto_info_aes_gcm_256),
    Chacha(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    fn new(
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
        side: &'static str,
    ) -> Result<Self, KtlsError> {
        let version = match version {
            ProtocolVersion::TLSv1_2 => libc::TLS_1_2_VERSION,
            ProtocolVersion::TLSv1_3 => libc::TLS_1_3_VERSION,
            other => {
                return Err(KtlsError::Unsupported {
                    side,
                    what: format!("{other:?}"),
                });
            }
        };
        let rec_seq = seq.to_be_bytes();
        // For AES-GCM the 12-byte nonce base is a 4-byte salt and an 8-byte IV in kTLS's
        // terms, in both TLS 1.2 (implicit salt) and 1.3; ChaCha20 takes all 12 as IV.
        Ok(match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                let iv = iv.as_ref();
                Self::Aes128(libc::tls12_crypto_info_aes_gcm_128 {
                    info: libc::tls_crypto_info {
                        version,
                        cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                    },
                    iv: iv[4..12].try_into().unwrap(),
                    key: key.as_ref().try_into().map_err(|_| bad_key(side))?,
                    salt: iv[..4].try_into().unwrap(),
                    rec_seq,
                })
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                let iv = iv.as_ref();
                Self::Aes256(libc::tls12_crypto_info_aes_gcm_256 {
                    info: libc::tls_crypto_info {
                        version,
                        cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                    },
                    iv: iv[4..12].try_into().unwrap(),
                    key: key.as_ref().try_into().map_err(|_| bad_key(side))?,
                    salt: iv[..4].try_into().unwrap(),
                    rec_seq,
                })
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                Self::Chacha(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: libc::tls_crypto_info {
                        version,
                        cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                    },
                    iv: iv.as_ref().try_into().unwrap(),
                    key: key.as_ref().try_into().map_err(|_| bad_key(side))?,
                    salt: [],
                    rec_seq,
                })
            }
            _ => {
                return Err(KtlsError::Unsupported {
                    side,
                    what: "a cipher suite newer than this code".into(),
                });
            }
        })
    }

    fn as_raw(&self) -> (*const c_void, libc::socklen_t) {
        fn raw<T>(v: &T) -> (*const c_void, libc::socklen_t) {
            (
                std::ptr::from_ref(v).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        }
        match self {
            Self::Aes128(i) => raw(i),
            Self::Aes256(i) => raw(i),
            Self::Chacha(i) => raw(i),
        }
    }
}

fn bad_key(side: &'static str) -> KtlsError {
    KtlsError::Protocol {
        side,
        message: "traffic key of unexpected length".into(),
    }
}

/// Writes user-space plaintext into a kTLS socket. `Ok(false)`: the detectors blocked it.
async fn write_all(to: &Side, mut bytes: &[u8]) -> Result<bool, KtlsError> {
    while !bytes.is_empty() {
        to.tcp
            .writable()
            .await
            .map_err(io_err("waiting to write"))?;
        match to.tcp.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => return Ok(false),
            Err(e) => return Err(io_err("writing buffered plaintext into kTLS")(e)),
        }
    }
    Ok(true)
}

/// How one direction ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The sender closed (with or without close_notify); passed on.
    Closed,
    /// The detectors dropped a record.
    Blocked,
}

/// A pipe, both ends non-blocking.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> Result<Self, KtlsError> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io_err("creating a splice pipe")(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh descriptors we now own.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let flags =
        libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
    // SAFETY: plain fds, null offsets (both are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves one direction in the kernel: RX socket → pipe → TX socket, one record at a time.
async fn relay(from: &Side, to: &Side, already_closed: bool) -> Result<(End, u64), KtlsError> {
    let pipe = Pipe::new()?;
    let mut moved = 0u64;
    let (from_fd, to_fd) = (from.tcp.as_raw_fd(), to.tcp.as_raw_fd());
    let mut close_notify = already_closed;
    if !already_closed {
        loop {
            let got = from
                .tcp
                .async_io(Interest::READABLE, || {
                    splice(from_fd, pipe.write.as_raw_fd(), SPLICE_CHUNK, false)
                })
                .await;
            let mut left = match got {
                Ok(0) => break,
                Ok(n) => n,
                // splice refuses non-data records, leaving them queued.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match read_control(from)? {
                    Control::Ignore => continue,
                    Control::CloseNotify => {
                        close_notify = true;
                        break;
                    }
                },
                Err(e) => return Err(io_err("splicing from a kTLS socket")(e)),
            };
            while left > 0 {
                let sent = to
                    .tcp
                    .async_io(Interest::WRITABLE, || {
                        splice(pipe.read.as_raw_fd(), to_fd, left, false)
                    })
                    .await;
                match sent {
                    Ok(n) => {
                        left -= n;
                        moved += n as u64;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                        return Ok((End::Blocked, moved));
                    }
                    Err(e) => return Err(io_err("splicing into a kTLS socket")(e)),
                }
            }
        }
    }
    if close_notify {
        send_close_notify(to)?;
    }
    // SAFETY: our socket; half-close so the peer sees the end of this direction only.
    unsafe { libc::shutdown(to_fd, libc::SHUT_WR) };
    Ok((End::Closed, moved))
}

enum Control {
    Ignore,
    CloseNotify,
}

const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;

/// Reads the non-data record at the head of a kTLS socket.
fn read_control(side: &Side) -> Result<Control, KtlsError> {
    let mut data = vec![0u8; SPLICE_CHUNK + 256];
    // Room for one cmsg carrying the record type (one byte, padded).
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: all-zero msghdr is valid; fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>();
    // SAFETY: msg describes valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(side.tcp.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io_err("reading a TLS control record")(
            io::Error::last_os_error(),
        ));
    }
    let mut record_type = None;
    // SAFETY: iterating the cmsgs the kernel wrote into cbuf, as CMSG_* define.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE
            {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    let body = &data[..n as usize];
    match record_type {
        Some(RECORD_ALERT) if body.get(1) == Some(&0) => Ok(Control::CloseNotify),
        Some(RECORD_ALERT) => Err(KtlsError::Protocol {
            side: side.name,
            message: format!("TLS alert {body:?}"),
        }),
        // NewSessionTicket (4): resumption is not offered through the proxy; dropping the
        // ticket is harmless.
        Some(RECORD_HANDSHAKE) if body.first() == Some(&4) => Ok(Control::Ignore),
        Some(RECORD_HANDSHAKE) if body.first() == Some(&24) => Err(KtlsError::Protocol {
            side: side.name,
            message: "TLS 1.3 KeyUpdate: kernel TLS cannot rekey (Linux 6.13+ can; not used)"
                .into(),
        }),
        other => Err(KtlsError::Protocol {
            side: side.name,
            message: format!(
                "unexpected TLS record type {other:?} ({} bytes)",
                body.len()
            ),
        }),
    }
}

/// Sends a close_notify alert record through kTLS (record type by cmsg).
fn send_close_notify(to: &Side) -> Result<(), KtlsError> {
    let alert = [1u8, 0];
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: alert.as_ptr().cast_mut().cast(),
        iov_len: alert.len(),
    };
    // SAFETY: all-zero msghdr is valid; fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_FIRSTHDR/CMSG_DATA over cbuf, which has room for one
    // one-byte cmsg.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = RECORD_ALERT;
    }
    // SAFETY: msg describes valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(to.tcp.as_raw_fd(), &raw const msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        // The peer may be gone already; the FIN that follows still ends the direction.
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPIPE) && e.raw_os_error() != Some(libc::ECONNRESET) {
            return Err(io_err("sending close_notify through kTLS")(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(id: u32, s: &str) -> Marker {
        Marker {
            id,
            literal: s.as_bytes().to_vec(),
        }
    }

    /// Naive reference: first (by end position) marker occurrence, blocking ones first at
    /// equal end.
    fn naive(markers: &[(Marker, bool)], text: &[u8]) -> Option<(u32, bool)> {
        let mut first: Option<(u32, bool)> = None;
        for end in 1..=text.len() {
            let mut here: Option<(usize, bool)> = None;
            for (slot, (m, block)) in markers.iter().enumerate() {
                if text[..end].ends_with(&m.literal) {
                    here = match here {
                        None => Some((slot, *block)),
                        Some((_, false)) if *block => Some((slot, true)),
                        keep => keep,
                    };
                }
            }
            if let Some((slot, block)) = here {
                if first.is_none() || block {
                    first = Some((markers[slot].0.id, block));
                }
                if block {
                    return first;
                }
            }
        }
        first
    }

    #[test]
    fn finds_markers_across_chunk_boundaries() {
        let markers = vec![
            (marker(7, "sk-live-"), true),
            (marker(9, "\"method\":\"tools/call\""), false),
            (marker(11, "-----BEGIN PRIVATE KEY-----"), true),
        ];
        let a = Automaton::build(&markers).unwrap();
        let text = b"POST /x HTTP/1.1\r\n\r\n{\"method\":\"tools/call\"} key=sk-live-abc";
        // Every split point: the state carried between the two halves finds the markers.
        for split in 0..text.len() {
            let (s, h1) = a.scan(0, &text[..split]);
            let (_, h2) = a.scan(s, &text[split..]);
            let got = match (h1, h2) {
                (Some((_, true)), _) => h1,
                (_, Some((_, true))) => h2,
                (Some(_), _) => h1,
                _ => h2,
            };
            assert_eq!(got, Some((7, true)), "split at {split}");
        }
        assert_eq!(
            a.scan(0, b"{\"method\":\"tools/call\"}").1,
            Some((9, false))
        );
        assert_eq!(a.scan(0, b"sk-live").1, None);
    }

    #[test]
    fn agrees_with_naive_search_on_overlapping_markers() {
        // Suffix/prefix overlaps exercise the failure transitions.
        let markers = vec![
            (marker(1, "abab"), false),
            (marker(2, "bab"), true),
            (marker(3, "aab"), false),
            (marker(4, "b"), false),
            (marker(5, "abc"), true),
        ];
        let a = Automaton::build(&markers).unwrap();
        // Every string of length <= 7 over {a, b, c}.
        let mut count = 0;
        for len in 0..=7u32 {
            for n in 0..3usize.pow(len) {
                let text: Vec<u8> = (0..len).map(|i| b"abc"[(n / 3usize.pow(i)) % 3]).collect();
                assert_eq!(a.scan(0, &text).1, naive(&markers, &text), "text {text:?}");
                count += 1;
            }
        }
        assert_eq!(count, 3280);
    }

    #[test]
    fn rejects_bad_markers_by_name() {
        let empty = Automaton::build(&[(marker(3, ""), true)]).err().unwrap();
        assert_eq!(empty.to_string(), "markers: marker 3 is empty");
        let dup = Automaton::build(&[(marker(3, "a"), true), (marker(3, "b"), true)])
            .err()
            .unwrap();
        assert_eq!(dup.to_string(), "markers: marker id 3 appears twice");
        let long = Automaton::build(&[(
            Marker {
                id: 8,
                literal: vec![b'x'; MAX_STATES],
            },
            true,
        )])
        .err()
        .unwrap();
        assert!(long.to_string().contains("marker 8 does not fit"), "{long}");
        let fits = Automaton::build(&[(
            Marker {
                id: 8,
                literal: vec![b'x'; MAX_STATES - 1],
            },
            true,
        )]);
        assert!(fits.is_ok());
    }

    #[test]
    fn flow_key_matches_the_kernel_layout() {
        let key = flow_key(
            "10.0.0.1:443".parse().unwrap(),
            "192.168.1.2:5555".parse().unwrap(),
        );
        assert_eq!(key.family, FAMILY_V4);
        assert_eq!(key.local_port, 443);
        assert_eq!(key.remote_port, 5555);
        // Network byte order in memory, as the kernel stores the address.
        assert_eq!(key.local_ip[0].to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(key.remote_ip[0].to_ne_bytes(), [192, 168, 1, 2]);
    }
}
