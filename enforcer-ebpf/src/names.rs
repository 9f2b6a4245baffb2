//! Stage 4, learned names and TLS server names: DNS only to the agent's resolver, addresses
//! the resolver learned for allowed names, and the ClientHello's server name on TLS ports.

use aya_ebpf::programs::{TcContext, XdpContext};
use enforcer_common::{
    AGENT_DEFAULT_ALLOW, AgentPolicy, FlowKey, MAX_TLS_PORTS, NameEntry, NameV4Key, NameV6Key,
    Reason, ResolverKey, RuleSet, SNI_EXACT, SNI_NAME_LEN, SNI_WILDCARD, SniKey, TIME_SHIFT,
    programs::STAGE_FINISH,
};

use crate::{context::*, egress::*, limits::*, maps::*, parse::*};

/// TLS extensions the SNI check walks in a ClientHello before giving up (browsers send
/// about 20, with GREASE).
pub(crate) const MAX_TLS_EXTENSIONS: usize = 32;
/// `encrypted_client_hello` (draft-ietf-tls-esni): the real server name is encrypted.
pub(crate) const TLS_EXT_ECH: u16 = 0xfe0d;

/// An address family's side of the host-name checks.
pub(crate) trait NameAddr: Copy {
    /// 4 or 6.
    const FAMILY: u8;
    /// The `RESOLVERS` key of this address and `port`.
    fn resolver(&self, port: u16) -> ResolverKey;
    /// The address the agent's resolver learned for an allowed name, if any.
    fn learned(&self, agent: u32) -> Option<&'static NameEntry>;
    /// The address as stored in a [`FlowKey`].
    fn flow_addr(&self) -> [u8; 16];
}

impl NameAddr for [u8; 4] {
    const FAMILY: u8 = 4;
    #[inline(always)]
    fn resolver(&self, port: u16) -> ResolverKey {
        let a = self;
        ResolverKey {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ],
            port,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn learned(&self, agent: u32) -> Option<&'static NameEntry> {
        // SAFETY: the value is only read, during this program run.
        unsafe { NAMES_V4.get(&NameV4Key { agent, addr: *self }) }
    }

    #[inline(always)]
    fn flow_addr(&self) -> [u8; 16] {
        let a = self;
        [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    }
}

impl NameAddr for [u8; 16] {
    const FAMILY: u8 = 6;
    #[inline(always)]
    fn resolver(&self, port: u16) -> ResolverKey {
        ResolverKey {
            addr: *self,
            port,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn learned(&self, agent: u32) -> Option<&'static NameEntry> {
        // SAFETY: the value is only read, during this program run.
        unsafe { NAMES_V6.get(&NameV6Key { agent, addr: *self }) }
    }

    #[inline(always)]
    fn flow_addr(&self) -> [u8; 16] {
        *self
    }
}

/// The egress decision for an agent with host-name rules:
/// 1. DNS (UDP/TCP 53) and DNS over TLS (TCP 853) may only go to a resolver in
///    `RESOLVERS`, whatever the rules say: the resolver is what keeps the learned
///    addresses honest.
/// 2. The static rules decide as for any agent when one matches.
/// 3. Otherwise an address the agent's resolver learned for an allowed name, unexpired,
///    whose rules allow the protocol and port, is allowed; a TCP connection to one of the
///    slot's TLS ports must then open with a ClientHello naming an allowed server ([`sni`]).
/// 4. Otherwise the agent's default.
#[inline(always)]
pub(crate) fn names<A: NameAddr>(
    slot: u32,
    agent: u32,
    policy: &AgentPolicy,
    flow: &Flow<A>,
    rules: Option<&'static RuleSet>,
) -> NamesVerdict {
    let dport = flow.l4.dst_port().unwrap_or(0);
    let dns = (dport == 53 && (flow.proto == IPPROTO_UDP || flow.proto == IPPROTO_TCP))
        || (dport == 853 && flow.proto == IPPROTO_TCP);
    if dns {
        // SAFETY: the value is not used, only its presence.
        return NamesVerdict::Decided(
            if unsafe { RESOLVERS.get(&flow.dst.resolver(dport)) }.is_some() {
                Reason::Allowed
            } else {
                Reason::DnsBypass
            },
        );
    }
    if let Some(reason) = rule_verdict(rules, flow.proto, flow.l4) {
        return NamesVerdict::Decided(reason);
    }
    let default = if policy.flags & AGENT_DEFAULT_ALLOW != 0 {
        Reason::Allowed
    } else {
        Reason::EgressDenied
    };
    let (kind, sport, dport) = match flow.l4.kind {
        L4Kind::Port => (L4_PORT, flow.l4.src, flow.l4.dst),
        L4Kind::NoPorts => (L4_NO_PORTS, 0, 0),
        L4Kind::Fragment => (L4_FRAGMENT, 0, 0),
        // Undecidable and link control were decided before the rules.
        _ => return NamesVerdict::Decided(Reason::Malformed),
    };
    let layout = ((flow.l3_off as u64) << 48)
        | ((flow.l4_off as u64) << 32)
        | ((flow.ip_end as u64 & 0xffff) << 16)
        | u64::from(A::FAMILY);
    let owner = (u64::from(slot) << 32) | u64::from(agent);
    let l4 =
        (kind << 48) | (u64::from(flow.proto) << 32) | (u64::from(sport) << 16) | u64::from(dport);
    NamesVerdict::Learned {
        default,
        layout,
        owner,
        l4,
    }
}

/// What [`names`] decided in the entry program.
pub(crate) enum NamesVerdict {
    /// DNS, or a static rule, or a malformed transport: decided.
    Decided(Reason),
    /// Only an address learned for a host name can admit the packet: the names stage
    /// ([`names_stage`]) decides, with `default` if none does. The rest are
    /// [`learned_admission`]'s packed arguments.
    Learned {
        default: Reason,
        layout: u64,
        owner: u64,
        l4: u64,
    },
}

/// Stage 4 as a program of its own, tail-called by the entry program with the packet's
/// facts in [`HANDOFF`]: the learned-address check and the TLS server-name check decide,
/// then the finish stage closes. Its own program so that the verifier walks the host-name
/// checks apart from the entry program's paths: Linux 6.1 marks every scalar precise when
/// its precision tracking walks back into a BPF-to-BPF call, which stopped it pruning
/// anything after the global functions and took the whole program past 1,000,000
/// processed instructions. Here nothing follows the calls but a store and a tail call.
///
/// `Err`: the hand-off is missing or the finish stage could not be reached, which only a
/// broken load can cause (the daemon fills `STAGES` before it attaches); the entry point
/// fails open, like the entry program's `Err` arm.
///
/// At tc the ClientHello may sit in page fragments the global functions cannot read:
/// [`tls_admission`] then answers `LEARNED_PULL`, and this stage pulls the segment's first
/// `MAX_OFFSET` bytes in (here, outside the global functions, which must not change the
/// packet) and asks again. Only a connection's first data segment not yet in `FLOWS` pays
/// for the pull.
#[inline(always)]
pub(crate) fn names_stage<C: Packet>(ctx: &C) -> Result<u32, ()> {
    let h = HANDOFF.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's hand-off, owned by the packet from the entry program's write to
    // the last stage (see `Handoff`).
    let (layout, owner, l4, default) = unsafe { ((*h).layout, (*h).owner, (*h).l4, (*h).verdict) };
    let verdict = match ctx.learned_admission(layout, owner, l4) {
        LEARNED_ALLOWED => Reason::Allowed as u32,
        LEARNED_TLS => {
            let mut answer = ctx.tls_admission(layout, owner, l4);
            if C::CAN_PULL && answer == LEARNED_PULL && ctx.pull(MAX_OFFSET as u32) {
                answer = ctx.tls_admission(layout, owner, l4);
            }
            match answer {
                LEARNED_ALLOWED => Reason::Allowed as u32,
                LEARNED_SNI_DENIED => Reason::SniDenied as u32,
                // Still not readable after a pull (a broken length): refused.
                _ => Reason::SniInvalid as u32,
            }
        }
        LEARNED_QUIC => Reason::QuicRefused as u32,
        _ => default,
    };
    // SAFETY: as above.
    unsafe { (*h).verdict = verdict };
    // SAFETY: a tail call does not return on success; on failure control comes back here.
    unsafe { C::stages().tail_call(ctx, STAGE_FINISH) };
    Err(())
}

/// [`learned_admission`]'s encoding of the transport layer kind.
pub(crate) const L4_PORT: u64 = 0;
pub(crate) const L4_NO_PORTS: u64 = 1;
pub(crate) const L4_FRAGMENT: u64 = 2;
/// [`learned_admission`]'s answers.
pub(crate) const LEARNED_NONE: u32 = 0;
pub(crate) const LEARNED_ALLOWED: u32 = 1;
pub(crate) const LEARNED_SNI_DENIED: u32 = 2;
pub(crate) const LEARNED_SNI_INVALID: u32 = 3;
pub(crate) const LEARNED_TLS: u32 = 4;
pub(crate) const LEARNED_QUIC: u32 = 5;
/// [`tls_admission`] at tc: the ClientHello is not directly readable; pull and ask again.
pub(crate) const LEARNED_PULL: u32 = 6;

/// Whether a learned address admits the packet: a BPF *global* function, verified once on
/// its own rather than along every path of `enforce` that reaches it (inlined in both
/// families' paths, it and the SNI check took `enforce` past the verifier's budget).
/// Global functions take the context and scalars only, so the facts come packed: `layout`
/// = IP header offset << 48 | transport offset << 32 | IP end << 16 | family (4 or 6),
/// `owner` = slot << 32 | agent, `l4` = kind << 48 | protocol << 32 | source port << 16 |
/// destination port. The addresses are read again from the packet. Returns
/// `LEARNED_NONE`, `LEARNED_ALLOWED`, `LEARNED_TLS` when the connection must pass
/// [`tls_admission`] too, or `LEARNED_QUIC` (see [`learned`]). Linux 5.6 (global functions).
///
/// Each global function exists once per context type (`_tc` at tc): the verifier types a
/// global function's context argument by the program type it is verified for.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn learned_admission(ctx: XdpRaw, layout: u64, owner: u64, l4: u64) -> u32 {
    learned_admission_in(&XdpContext::new(ctx), layout, owner, l4)
}

/// [`learned_admission`] at tc.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn learned_admission_tc(ctx: TcRaw, layout: u64, owner: u64, l4: u64) -> u32 {
    learned_admission_in(&TcContext::new(ctx), layout, owner, l4)
}

#[inline(always)]
fn learned_admission_in<C: Packet>(ctx: &C, layout: u64, owner: u64, l4: u64) -> u32 {
    let Some(p) = Packed::new(layout, owner, l4) else {
        return LEARNED_NONE;
    };
    let found = if p.family == 4 {
        peek::<C, 4>(ctx, p.l3_off + 16).and_then(|dst| learned(&p, dst))
    } else {
        peek::<C, 16>(ctx, p.l3_off + 24).and_then(|dst| learned(&p, dst))
    };
    found.unwrap_or(LEARNED_NONE)
}

/// The SNI check of a connection a learned address admitted ([`sni`]), as a global
/// function for the same reasons as [`learned_admission`], with the same arguments.
/// Returns `LEARNED_ALLOWED`, `LEARNED_SNI_DENIED`, `LEARNED_SNI_INVALID`, or at tc
/// `LEARNED_PULL` (see [`names_stage`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tls_admission(ctx: XdpRaw, layout: u64, owner: u64, l4: u64) -> u32 {
    tls_admission_in(&XdpContext::new(ctx), layout, owner, l4)
}

/// [`tls_admission`] at tc.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tls_admission_tc(ctx: TcRaw, layout: u64, owner: u64, l4: u64) -> u32 {
    tls_admission_in(&TcContext::new(ctx), layout, owner, l4)
}

#[inline(always)]
fn tls_admission_in<C: Packet>(ctx: &C, layout: u64, owner: u64, l4: u64) -> u32 {
    let Some(p) = Packed::new(layout, owner, l4) else {
        return LEARNED_SNI_INVALID;
    };
    // One read at a time with an early return: a tuple of two `Option`s let LLVM carry an
    // undefined register into the key on the path where a read failed, which the
    // verifier rejects.
    if p.family == 4 {
        let Some(src) = peek::<C, 4>(ctx, p.l3_off + 12) else {
            return LEARNED_SNI_INVALID;
        };
        let Some(dst) = peek::<C, 4>(ctx, p.l3_off + 16) else {
            return LEARNED_SNI_INVALID;
        };
        sni(ctx, &p, src.flow_addr(), dst.flow_addr())
    } else {
        let Some(src) = peek::<C, 16>(ctx, p.l3_off + 8) else {
            return LEARNED_SNI_INVALID;
        };
        let Some(dst) = peek::<C, 16>(ctx, p.l3_off + 24) else {
            return LEARNED_SNI_INVALID;
        };
        sni(ctx, &p, src, dst)
    }
}

/// The facts [`names`] passes to the global functions, unpacked.
pub(crate) struct Packed {
    family: u64,
    l3_off: usize,
    l4_off: usize,
    ip_end: usize,
    slot: u32,
    agent: u32,
    proto: u8,
    l4: L4,
}

impl Packed {
    #[inline(always)]
    fn new(layout: u64, owner: u64, l4: u64) -> Option<Packed> {
        let sport = (l4 >> 16) as u16;
        let dport = l4 as u16;
        Some(Packed {
            family: layout & 0xff,
            // Offsets come from `enforce`, below MAX_OFFSET; the masks (no-ops for such
            // values) hand the verifier that bound directly, which it needs for packet
            // pointers: it knows nothing of a global function's arguments.
            l3_off: ((layout >> 48) & OFFSET_MASK) as usize,
            l4_off: ((layout >> 32) & OFFSET_MASK) as usize,
            ip_end: ((layout >> 16) & 0xffff) as usize,
            slot: (owner >> 32) as u32,
            agent: owner as u32,
            proto: (l4 >> 32) as u8,
            l4: match l4 >> 48 {
                L4_PORT => L4::port(sport, dport),
                L4_NO_PORTS => L4::NoPorts,
                L4_FRAGMENT => L4::Fragment,
                _ => return None,
            },
        })
    }
}

/// Whether an unexpired learned entry for `dst` allows the packet: `None` if not, else
/// `LEARNED_ALLOWED`, `LEARNED_TLS` when the connection must also pass the SNI check (TCP to
/// one of the TLS ports), or `LEARNED_QUIC` for UDP to one of them: QUIC carries its server
/// name in an encrypted Initial packet the program cannot read, so it is refused and the
/// client falls back to TCP, where the name is checked.
#[inline(always)]
pub(crate) fn learned<A: NameAddr>(p: &Packed, dst: A) -> Option<u32> {
    let entry = dst.learned(p.agent)?;
    // The tick clock lags by at most a tick and never leads: an entry may outlive its TTL
    // and grace by that much, never fall short of it.
    if tick_now() >> TIME_SHIFT > entry.expires_ns {
        return None;
    }
    if rule_verdict(Some(&entry.rules), p.proto, p.l4) != Some(Reason::Allowed) {
        return None;
    }
    Some(match p.l4.dst_port() {
        Some(dst) if is_tls_port(p.slot, dst) => match p.proto {
            IPPROTO_TCP => LEARNED_TLS,
            IPPROTO_UDP => LEARNED_QUIC,
            _ => LEARNED_ALLOWED,
        },
        _ => LEARNED_ALLOWED,
    })
}

/// Whether `port` is one of the slot's TLS ports.
#[inline(always)]
pub(crate) fn is_tls_port(slot: u32, port: u16) -> bool {
    let Some(tls) = TLS_PORTS.get(slot) else {
        return false;
    };
    for i in 0..MAX_TLS_PORTS {
        if tls.ports[i] != 0 && tls.ports[i] == port {
            return true;
        }
    }
    false
}

/// The SNI check of a TCP segment to a TLS port of a name-admitted address.
///
/// Segments without payload (the handshake, bare ACKs, FIN, RST) carry nothing and pass.
/// The first segment with payload must hold a TLS handshake record starting a ClientHello
/// whose `server_name` extension lies within this segment and names a host the agent may
/// reach on this port (exact, or under an allowed `*.` suffix); the connection is then
/// remembered in `FLOWS` and its later segments pass without parsing. Anything else is
/// dropped: not TLS (`sni_invalid`), no or unreadable server name (`sni_invalid`), an
/// `encrypted_client_hello` extension among those in the segment (`sni_invalid`: the name
/// that counts is hidden), a name not allowed (`sni_denied`). Retransmissions of a refused
/// ClientHello are refused again, so nothing of such a connection gets through.
///
/// Returns a `LEARNED_*` code, `LEARNED_PULL` at tc when the payload is not directly
/// readable. A plain code, not an `Option<Reason>`: the BPF build compiled the `None` niche
/// of that option (returned from one inlined path, matched in the caller) into a value the
/// caller read as `Some`, so a pull was never asked for and the connection was refused.
#[inline(always)]
pub(crate) fn sni<C: Packet>(ctx: &C, p: &Packed, src: [u8; 16], dst: [u8; 16]) -> u32 {
    if p.l4.kind != L4Kind::Port {
        return LEARNED_SNI_INVALID;
    }
    let (sport, dport) = (p.l4.src, p.l4.dst);
    let key = FlowKey {
        agent: p.agent,
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        src,
        dst,
    };
    let data_end = ctx.data_end() - ctx.data();
    // At tc the segment may extend past the directly readable bytes (its payload, rarely
    // its TCP header, in page fragments): then a flow already checked passes, and any
    // other asks for a pull rather than judging a payload it cannot see. A pull makes
    // `MAX_OFFSET` bytes (or all) readable, so the second call never asks again.
    if C::CAN_PULL {
        let want = if p.ip_end < MAX_OFFSET {
            p.ip_end
        } else {
            MAX_OFFSET
        };
        if data_end < want {
            // SAFETY: the value is not used, only its presence.
            if unsafe { FLOWS.get(&key) }.is_some() {
                return LEARNED_ALLOWED;
            }
            return LEARNED_PULL;
        }
    }
    // TCP data offset: the high nibble of byte 12, in 32-bit words.
    let Some(b) = peek::<C, 2>(ctx, p.l4_off + 12) else {
        return LEARNED_SNI_INVALID;
    };
    let payload = p.l4_off + ((b[0] >> 4) as usize) * 4;
    let end = if p.ip_end < data_end {
        p.ip_end
    } else {
        data_end
    };
    if payload >= end {
        return LEARNED_ALLOWED;
    }
    // SAFETY: the value is not used, only its presence.
    if unsafe { FLOWS.get(&key) }.is_some() {
        return LEARNED_ALLOWED;
    }
    let reason = client_hello(ctx, p.slot, p.agent, dport, payload, end);
    if reason == Reason::Allowed {
        // Once per connection, not per packet. A full LRU evicts its oldest flow, whose
        // next segment is then refused: eviction can break a connection, not open one.
        let _ = FLOWS.insert(&key, &1, 0);
    }
    match reason {
        Reason::Allowed => LEARNED_ALLOWED,
        Reason::SniDenied => LEARNED_SNI_DENIED,
        _ => LEARNED_SNI_INVALID,
    }
}

/// Parses the ClientHello at `off` (payload of one segment, ending at `end`) and checks
/// its server name. Every read is bounds-checked against the packet by [`read`] and
/// against `end`, the payload's end.
#[inline(always)]
pub(crate) fn client_hello<C: Packet>(
    ctx: &C,
    slot: u32,
    agent: u32,
    port: u16,
    off: usize,
    end: usize,
) -> Reason {
    // TLS record header (content type 22 = handshake, major version 3), then the
    // handshake header (type 1 = ClientHello, 24-bit length).
    let Some(h) = peek::<C, 9>(ctx, off) else {
        return Reason::SniInvalid;
    };
    if h[0] != 22 || h[1] != 3 || h[5] != 1 {
        return Reason::SniInvalid;
    }
    // legacy_version (2) and random (32), then the session id.
    let mut p = off + 9 + 34;
    let Some(sid) = peek::<C, 2>(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 1 + sid[0] as usize;
    let Some(cs) = peek_be16(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 2 + cs as usize;
    let Some(comp) = peek::<C, 2>(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 1 + comp[0] as usize;
    let Some(ext_len) = peek_be16(ctx, p) else {
        return Reason::SniInvalid;
    };
    p += 2;
    let ext_end = p + ext_len as usize;
    let ext_end = if ext_end < end { ext_end } else { end };
    let mut name_off = 0;
    let mut name_len = 0;
    // Constant trip count for the verifier; `p` stays below MAX_OFFSET because `read`
    // refuses anything beyond it.
    for _ in 0..MAX_TLS_EXTENSIONS {
        if p + 4 > ext_end {
            break;
        }
        let Some(e) = peek::<C, 4>(ctx, p) else {
            break;
        };
        let kind = u16::from_be_bytes([e[0], e[1]]);
        let len = u16::from_be_bytes([e[2], e[3]]) as usize;
        if kind == TLS_EXT_ECH {
            return Reason::SniInvalid;
        }
        if kind == 0 {
            // server_name: list length (2), name type (1, 0 = host_name), name length (2).
            let Some(n) = peek::<C, 5>(ctx, p + 4) else {
                return Reason::SniInvalid;
            };
            if n[2] != 0 {
                return Reason::SniInvalid;
            }
            name_off = p + 9;
            name_len = u16::from_be_bytes([n[3], n[4]]) as usize;
        }
        p += 4 + len;
    }
    if name_len == 0 || name_len > SNI_NAME_LEN - 1 || name_off + name_len > end {
        return Reason::SniInvalid;
    }
    let span = ((name_off as u64) << 32) | name_len as u64;
    let owner = (u64::from(slot) << 32) | u64::from(agent);
    let code = ctx.server_name_lookup(span, owner, u64::from(port));
    if code == Reason::Allowed as u32 {
        Reason::Allowed
    } else if code == Reason::SniDenied as u32 {
        Reason::SniDenied
    } else {
        Reason::SniInvalid
    }
}

/// Looks the server name at `off` (`len` bytes, 1..=255, inside the packet) up in `SNI`:
/// first exactly, then every suffix that starts at a dot, longest first, as a wildcard.
///
/// The key holds the name right-aligned (see [`SniKey`]), so a suffix's key is the same
/// buffer with the bytes before it zeroed: one left-to-right walk zeroes as it goes and
/// looks up at each dot, without copying.
///
/// A BPF global function too, verified once (`span` = offset << 32 | length, `owner` =
/// slot << 32 | agent). Its loops have a constant trip count and never compare the index
/// with the unknown length: such a comparison gives the verifier a new range of the length
/// in every iteration, so no state prunes another and the paths multiply past its budget.
/// Where a byte belongs to the name is computed with arithmetic instead.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn server_name_lookup(ctx: XdpRaw, span: u64, owner: u64, port: u64) -> u32 {
    server_name_lookup_in(&XdpContext::new(ctx), span, owner, port)
}

/// [`server_name_lookup`] at tc.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn server_name_lookup_tc(ctx: TcRaw, span: u64, owner: u64, port: u64) -> u32 {
    server_name_lookup_in(&TcContext::new(ctx), span, owner, port)
}

#[inline(always)]
fn server_name_lookup_in<C: Packet>(ctx: &C, span: u64, owner: u64, port: u64) -> u32 {
    let Some(scratch) = SNI_SCRATCH.get_ptr_mut(0) else {
        return Reason::SniInvalid as u32;
    };
    // SAFETY: per-CPU map value, used only by this CPU for the rest of this run.
    let scratch = unsafe { &mut *scratch };
    // The caller passes a length of 1..=255. ARG_CONST_SIZE must be non-zero and fit the
    // buffer, and the verifier must see that: Linux 6.1 learns nothing from `len == 0`
    // being false (the `!=` refinement came later), so the bound [1, 256] is built by
    // arithmetic, the identity on 1..=255 (0 would become 256, which the caller never
    // sends and which still fits `raw`).
    let len = (((span as u32).wrapping_sub(1)) & 0xff) + 1;
    let off = ((span >> 32) & 0xffff) as u32;
    // SAFETY: `raw` is SNI_NAME_LEN (256) bytes of map value, len <= 255; the helper
    // (Linux 5.18) checks the packet range itself.
    let loaded = unsafe { ctx.load_bytes(off, scratch.raw.as_mut_ptr().cast(), len) };
    if loaded != 0 {
        return Reason::SniInvalid as u32;
    }
    scratch.key.slot = (owner >> 32) as u32;
    scratch.key.agent = owner as u32;
    scratch.key.kind = SNI_EXACT;
    scratch.key._pad = 0;
    let len = len as usize;
    // Right-align and lower-case: key byte i is raw byte i + len - 256 when i + len >= 256
    // (bit 8 of i + len), else padding. A zero byte inside the name would alias the
    // padding, so it makes the name invalid; other bytes outside host-name characters
    // simply match no allowed name.
    let mut zero_in_name = 0u8;
    for i in 0..SNI_NAME_LEN {
        let inside = (((i + len) >> 8) & 1) as u8;
        let b = scratch.raw[(i + len) & 0xff] & 0u8.wrapping_sub(inside);
        let upper = (b.wrapping_sub(b'A') < 26) as u8;
        zero_in_name |= inside & (b == 0) as u8;
        scratch.key.name[i] = b | (upper << 5);
    }
    if zero_in_name != 0 {
        return Reason::SniInvalid as u32;
    }
    let port = port as u16;
    if allows(&scratch.key, port) {
        return Reason::Allowed as u32;
    }
    scratch.key.kind = SNI_WILDCARD;
    // The padding holds no dots, so only the name's own dots start a lookup.
    for i in 0..SNI_NAME_LEN {
        if scratch.key.name[i] == b'.' && allows(&scratch.key, port) {
            return Reason::Allowed as u32;
        }
        scratch.key.name[i] = 0;
    }
    Reason::SniDenied as u32
}

/// Whether `SNI` holds `key` with a rule allowing TCP to `port`.
#[inline(always)]
pub(crate) fn allows(key: &SniKey, port: u16) -> bool {
    // SAFETY: the value is only read, during this program run.
    let rules = unsafe { SNI.get(key) };
    rules.is_some() && rule_verdict(rules, IPPROTO_TCP, L4::port(0, port)) == Some(Reason::Allowed)
}
