//! Answers to rejected packets: the packet is turned into a TCP RST or an ICMP
//! administratively-prohibited error and sent back out of the interface it arrived on, so
//! the sender's call fails at once instead of waiting for its timeout. Used for `reject`
//! egress rules; independent of them, so any stage that drops a packet may answer it.
//!
//! The reply is built in place: the RST fits inside the segment it answers (headers only,
//! the packet is cut after them); the ICMP error grows the packet at its head by its own
//! IP and ICMP headers, so the quoted original stays where it was and only the link-layer
//! header moves. Every write goes through the context's store helper (see
//! [`Packet::store_bytes`]), every checksum through `bpf_csum_diff` (Linux 4.6).

use aya_ebpf::{
    helpers::generated::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use enforcer_common::{MAX_IPV6_EXT_HEADERS, REJECT_REPLY_COST, REJECT_REPLY_TOLERANCE};

use crate::{audit::NoTuple, context::*, limits::*, maps::*, parse::*};

/// Where a reply to a packet starts from: its IP and transport offsets, the end of its IP
/// packet, its protocol and family, packed into one word as [`reject_reply`] takes them
/// (a global function takes scalars only): l3 << 48 | l4 << 32 | IP end << 16 |
/// protocol << 8 | family (4 or 6). 0: the packet cannot be answered.
#[derive(Clone, Copy)]
pub(crate) struct ReplyTo(u64);

impl ReplyTo {
    /// A packet that gets no reply.
    pub(crate) const NONE: ReplyTo = ReplyTo(0);

    /// The packet `flow` (of `family`, 4 or 6) was parsed from; [`ReplyTo::NONE`] for a
    /// non-first fragment or a transport the parser could not read.
    #[inline(always)]
    pub(crate) fn of<A>(flow: &Flow<A>, family: u64) -> ReplyTo {
        if flow.l4.kind != L4Kind::Port && flow.l4.kind != L4Kind::NoPorts {
            return ReplyTo::NONE;
        }
        // The IP end in 16 bits, saturated: it only bounds the quote and a SYN's payload.
        let ip_end = if flow.ip_end > 0xffff {
            0xffff
        } else {
            flow.ip_end as u64
        };
        ReplyTo(
            (flow.l3_off as u64) << 48
                | (flow.l4_off as u64) << 32
                | ip_end << 16
                | u64::from(flow.proto) << 8
                | family,
        )
    }
}

/// What a closing stage can answer: the packets it holds a parsed flow of.
pub(crate) trait ReplyTarget {
    /// Where a reply to this packet starts from.
    fn reply_to(&self) -> ReplyTo;
}

impl ReplyTarget for Flow<[u8; 4]> {
    #[inline(always)]
    fn reply_to(&self) -> ReplyTo {
        ReplyTo::of(self, 4)
    }
}

impl ReplyTarget for Flow<[u8; 16]> {
    #[inline(always)]
    fn reply_to(&self) -> ReplyTo {
        ReplyTo::of(self, 6)
    }
}

/// No IP header could be read: nothing to answer.
impl ReplyTarget for NoTuple {
    #[inline(always)]
    fn reply_to(&self) -> ReplyTo {
        ReplyTo::NONE
    }
}

/// The names stage's packets stay drop-only: the finish stage has no parsed flow, only the
/// audit tuple.
impl ReplyTarget for Handoff {
    #[inline(always)]
    fn reply_to(&self) -> ReplyTo {
        ReplyTo::NONE
    }
}

/// Answers a packet that is being dropped: `Some(action)` when the packet was turned into
/// a reply and `action` sends it back (`XDP_TX`, or at tc a redirect to the interface it
/// arrived on), `None` when it gets none and must be dropped as it is. None for a packet
/// that must never be answered (an ICMP error, a RST, a non-first fragment), when the
/// agent's reply budget (`REJECT_REPLIES_PER_SEC`, map `REJECT_LIMITS`) is spent, or when
/// a resize or write failed (the packet may then be half rewritten: it is dropped anyway).
/// Not for monitor-mode agents: their packets pass, and a reply would break what passes.
#[inline(always)]
#[expect(
    dead_code,
    reason = "the entry for stages that branch on the answer; egress closes with reject_or_drop"
)]
pub(crate) fn reject<C: Packet>(ctx: &C, agent: u32, to: ReplyTo) -> Option<u32> {
    let action = reject_or_drop(ctx, agent, to);
    (action != C::DROP).then_some(action)
}

/// [`reject`] as the action to return: the reply's, or the drop. What a closing stage
/// returns as it is: nothing branches on the global function's answer, so Linux 6.1's
/// verifier has no precision to track back across the call (see `enforce_tc`).
#[inline(always)]
pub(crate) fn reject_or_drop<C: Packet>(ctx: &C, agent: u32, to: ReplyTo) -> u32 {
    if to.0 == 0 {
        return C::DROP;
    }
    ctx.reply(agent, to.0)
}

/// [`reject`]'s work, as a BPF *global* function: verified once on its own, not along every
/// path of the entry program that reaches it (the hot path holds only the call), the way
/// the host-name checks are. Returns the action that sends the reply, or `XDP_DROP`. Linux
/// 5.6 (global functions); the helpers it uses are at most 5.18 (`bpf_xdp_store_bytes`).
///
/// It changes the packet, which a global function may: its caller returns its answer at
/// once and holds no packet pointer across the call.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn reject_reply(ctx: XdpRaw, agent: u64, to: u64) -> u32 {
    or_drop(&XdpContext::new(ctx), agent as u32, to)
}

/// [`reject_reply`] at tc; `TC_ACT_SHOT` when there is no reply.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn reject_reply_tc(ctx: TcRaw, agent: u64, to: u64) -> u32 {
    or_drop(&TcContext::new(ctx), agent as u32, to)
}

#[inline(always)]
fn or_drop<C: Packet>(ctx: &C, agent: u32, to: u64) -> u32 {
    match reply_in(ctx, agent, to) {
        0 => C::DROP,
        action => action,
    }
}

const IPPROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// TTL and hop limit of a reply.
const REPLY_TTL: u8 = 64;
/// Most bytes of the original packet an ICMP error quotes, from its IP header: enough for
/// an IPv4 header with every option and 8 bytes after it (RFC 792 asks for those), and for
/// an IPv6 header with a short extension chain; RFC 4443 asks for as much as fits, which a
/// longer chain gets up to this. A multiple of 4, for `bpf_csum_diff`.
const QUOTE_MAX: usize = 96;
/// IP header and ICMP header of an ICMP error: what it adds in front of the quote.
const ICMP4_GROWTH: usize = 20 + 8;
const ICMP6_GROWTH: usize = 40 + 8;
/// Largest link-layer header: Ethernet and two VLAN tags.
const L2_MAX: usize = 22;

/// Where a reply is put together: per CPU, because the headers, the quote and the copies
/// of the original's headers do not fit on the BPF stack beside the entry program's frame
/// (512 bytes for both). Kernel-only, owned by one packet like [`Handoff`].
#[repr(C)]
pub(crate) struct ReplyScratch {
    /// The original's IP header (20 or 40 bytes) and, for TCP, its TCP header at 40.
    orig: [u8; 64],
    /// The reply's IP header and its TCP or ICMP header.
    out: [u8; 64],
    /// The link-layer header.
    l2: [u8; L2_MAX + 2],
    /// The quoted original, zero past its length.
    quote: [u8; QUOTE_MAX],
}

#[inline(always)]
fn reply_in<C: Packet>(ctx: &C, agent: u32, to: u64) -> u32 {
    // Offsets come from the parser, below MAX_OFFSET; the masks hand the verifier the bound
    // it needs, since it knows nothing of a global function's arguments.
    let l3 = ((to >> 48) & OFFSET_MASK) as usize;
    let l4 = ((to >> 32) & OFFSET_MASK) as usize;
    let ip_end = ((to >> 16) & 0xffff) as usize;
    let proto = (to >> 8) as u8;
    let v6 = to & 0xff == 6;
    if !(ETH_HLEN..=L2_MAX).contains(&l3) || l4 < l3 + if v6 { 40 } else { 20 } {
        return 0;
    }
    let Some(s) = REPLY_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch, owned by this packet for the program's run (see
    // `ReplyScratch`).
    let s = unsafe { &mut *s };
    let at = At { l3, l4, ip_end };
    if proto == IPPROTO_TCP {
        if v6 {
            rst::<C, 40>(ctx, s, agent, at)
        } else {
            rst::<C, 20>(ctx, s, agent, at)
        }
    } else if v6 {
        unreachable_v6(ctx, s, agent, at, proto)
    } else {
        unreachable_v4(ctx, s, agent, at, proto)
    }
}

/// The original packet's offsets.
#[derive(Clone, Copy)]
struct At {
    l3: usize,
    l4: usize,
    ip_end: usize,
}

/// Charges the agent's reply budget: GCRA on its `REJECT_LIMITS` arrival time, on the tick
/// clock like the audit budget (a flood guard, not a contract).
#[inline(always)]
fn charge(agent: u32) -> bool {
    match REJECT_LIMITS.get_ptr_mut(agent) {
        Some(tat) => gcra(tat, tick_now(), REJECT_REPLY_COST, REJECT_REPLY_TOLERANCE),
        None => false,
    }
}

/// Reads `len` bytes at `off` of the packet into `dst`, wherever they are (at tc possibly
/// in page fragments).
#[inline(always)]
fn load<C: Packet>(ctx: &C, off: usize, dst: &mut [u8]) -> bool {
    // SAFETY: `dst` is valid for its length of writes.
    unsafe { ctx.load_bytes(off as u32, dst.as_mut_ptr().cast(), dst.len() as u32) == 0 }
}

/// Writes `src` into the packet at `off`.
#[inline(always)]
fn store<C: Packet>(ctx: &C, off: usize, src: &[u8]) -> bool {
    // SAFETY: `src` is valid for its length of reads.
    unsafe { ctx.store_bytes(off as u32, src.as_ptr().cast(), src.len() as u32) }
}

/// The 32-bit ones' complement sum of `bytes` (a multiple of 4 long, at most 512) added to
/// `seed`, in the machine's byte order, as the kernel keeps partial checksums.
#[inline(always)]
fn sum(bytes: &[u8], seed: u32) -> u32 {
    // SAFETY: `bytes` is valid for its length; the helper only reads `to`.
    unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            bytes.as_ptr().cast_mut().cast(),
            bytes.len() as u32,
            seed,
        ) as u32
    }
}

/// Folds a 32-bit partial sum plus `extra` into the 16-bit checksum, in the bytes to store.
#[inline(always)]
fn fold(sum: u32, extra: u32) -> [u8; 2] {
    let mut s = u64::from(sum) + u64::from(extra);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}

/// A 16-bit big-endian value as it adds to a sum in the machine's byte order.
#[inline(always)]
fn word(value: u16) -> u32 {
    u32::from(u16::from_ne_bytes(value.to_be_bytes()))
}

/// Swaps the Ethernet addresses of the link-layer header read at `from` and writes it, with
/// its tags as they were, at 0.
#[inline(always)]
fn link_back<C: Packet>(ctx: &C, s: &mut ReplyScratch, from: usize, l3: usize) -> bool {
    let l2 = &mut s.l2;
    // At most 22 bytes: a packet with an IP header behind its link layer has them.
    if !load(ctx, from, &mut l2[..L2_MAX]) {
        return false;
    }
    for i in 0..6 {
        l2.swap(i, i + 6);
    }
    // Fixed sizes for the helper: the tags come back whole.
    match l3 {
        ETH_HLEN => store(ctx, 0, &l2[..ETH_HLEN]),
        18 => store(ctx, 0, &l2[..18]),
        _ => store(ctx, 0, &l2[..L2_MAX]),
    }
}

/// The TCP RST answering the segment at `at.l4` (IP header of `H` bytes: 20 or 40), built
/// over the segment itself: ACK set, the RST takes its sequence number from the segment's
/// acknowledgment; else (a SYN) it acknowledges everything the segment occupied, which
/// makes `connect()` fail with `ECONNREFUSED` (RFC 9293 3.10.7.1).
#[inline(always)]
fn rst<C: Packet, const H: usize>(ctx: &C, s: &mut ReplyScratch, agent: u32, at: At) -> u32 {
    if !load(ctx, at.l3, &mut s.orig[..H]) || !load(ctx, at.l4, &mut s.orig[40..60]) {
        return 0;
    }
    let tcp = &s.orig[40..60];
    let flags = tcp[13];
    if flags & TCP_RST != 0 || !charge(agent) {
        return 0;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let (out_seq, out_ack, out_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let header = ((tcp[12] >> 4) as usize) * 4;
        let payload = at.ip_end.saturating_sub(at.l4 + header) as u32;
        let occupied = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(occupied), TCP_RST | TCP_ACK)
    };
    let (sport, dport) = ([tcp[2], tcp[3]], [tcp[0], tcp[1]]);
    let out = &mut s.out;
    *out = [0; 64];
    {
        let seg = &mut out[H..H + 20];
        seg[..2].copy_from_slice(&sport);
        seg[2..4].copy_from_slice(&dport);
        seg[4..8].copy_from_slice(&out_seq.to_be_bytes());
        seg[8..12].copy_from_slice(&out_ack.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = out_flags;
    }
    let ip = &s.orig;
    // Pseudo-header (RFC 9293 3.1, RFC 8200 8.1): the addresses, the protocol and the TCP
    // length, 20.
    let pseudo = word(u16::from(IPPROTO_TCP)) + word(20);
    if H == 20 {
        out[0] = 0x45;
        out[3] = 40;
        // Don't fragment, as the kernel's own RSTs.
        out[6] = 0x40;
        out[8] = REPLY_TTL;
        out[9] = IPPROTO_TCP;
        out[12..16].copy_from_slice(&ip[16..20]);
        out[16..20].copy_from_slice(&ip[12..16]);
        let c = fold(sum(&out[..20], 0), 0);
        out[10..12].copy_from_slice(&c);
        let c = fold(sum(&out[20..40], sum(&out[12..20], 0)), pseudo);
        out[36..38].copy_from_slice(&c);
        finish_rst(ctx, s, at.l3, 40)
    } else {
        out[0] = 0x60;
        out[5] = 20;
        out[6] = IPPROTO_TCP;
        out[7] = REPLY_TTL;
        out[8..24].copy_from_slice(&ip[24..40]);
        out[24..40].copy_from_slice(&ip[8..24]);
        let c = fold(sum(&out[40..60], sum(&out[8..40], 0)), pseudo);
        out[56..58].copy_from_slice(&c);
        finish_rst(ctx, s, at.l3, 60)
    }
}

/// Writes the RST's `n` bytes of headers at `l3`, its link layer back, and cuts the packet
/// after them.
#[inline(always)]
fn finish_rst<C: Packet>(ctx: &C, s: &mut ReplyScratch, l3: usize, n: usize) -> u32 {
    let written = if n == 40 {
        store(ctx, l3, &s.out[..40])
    } else {
        store(ctx, l3, &s.out[..60])
    };
    if !written || !link_back(ctx, s, 0, l3) || !ctx.trim((l3 + n) as u32) {
        return 0;
    }
    ctx.send_back()
}

/// How much of the packet from `l3` an ICMP error quotes: all of it up to [`QUOTE_MAX`],
/// rounded down to 4 bytes; `None` if that is not its IP headers and 8 bytes more (a
/// longer IPv6 header chain is quoted up to [`QUOTE_MAX`] only).
#[inline(always)]
fn quote_len<C: Packet>(ctx: &C, at: At) -> Option<usize> {
    let len = ctx.len() as usize;
    let end = if at.ip_end < len { at.ip_end } else { len };
    let avail = end.saturating_sub(at.l3) & !3;
    let q = if avail < QUOTE_MAX { avail } else { QUOTE_MAX };
    (q == QUOTE_MAX || q >= at.l4 - at.l3 + 8).then_some(q)
}

/// Reads the quote into the zeroed scratch (the bytes past `q` stay zero, so a checksum
/// over the whole buffer is the quote's) and returns its sum.
#[inline(always)]
fn quote_sum<C: Packet>(
    ctx: &C,
    s: &mut ReplyScratch,
    l3: usize,
    q: usize,
    seed: u32,
) -> Option<u32> {
    s.quote = [0; QUOTE_MAX];
    // Read in 4-byte pieces, each of a constant length: a variable length must be a scalar
    // the verifier knows is at least 1, and Linux 6.1's verifier lost that bound however
    // it was tested (LLVM folds `n == 0 || n > MAX` into one unsigned compare of `n - 1`).
    // `q` is a multiple of 4 (see [`quote_len`]).
    for i in 0..QUOTE_MAX / 4 {
        let at = i * 4;
        if at >= q {
            break;
        }
        if !load(ctx, l3 + at, &mut s.quote[at..at + 4]) {
            return None;
        }
    }
    Some(sum(&s.quote, seed))
}

/// Grows the packet by the error's `n` bytes of headers (in `s.out`), moves the link layer
/// to the new front and writes the headers after it; the quote stays where it was, and the
/// packet is cut after it.
#[inline(always)]
fn finish_icmp<C: Packet>(ctx: &C, s: &mut ReplyScratch, l3: usize, q: usize, n: usize) -> u32 {
    if !ctx.grow_head(n as u32) || !link_back(ctx, s, n, l3) {
        return 0;
    }
    let written = if n == ICMP4_GROWTH {
        store(ctx, l3, &s.out[..ICMP4_GROWTH])
    } else {
        store(ctx, l3, &s.out[..ICMP6_GROWTH])
    };
    if !written || !ctx.trim((l3 + n + q) as u32) {
        return 0;
    }
    ctx.send_back()
}

/// ICMP destination unreachable, administratively prohibited (type 3 code 13, RFC 1812
/// 5.2.7.1), quoting the packet. Never for an ICMP error or a non-first fragment (RFC 1122
/// 3.2.2).
#[inline(always)]
fn unreachable_v4<C: Packet>(ctx: &C, s: &mut ReplyScratch, agent: u32, at: At, proto: u8) -> u32 {
    if !load(ctx, at.l3, &mut s.orig[..20]) {
        return 0;
    }
    if u16::from_be_bytes([s.orig[6], s.orig[7]]) & 0x1fff != 0 {
        return 0;
    }
    if proto == IPPROTO_ICMP {
        if !load(ctx, at.l4, &mut s.orig[40..44]) || matches!(s.orig[40], 3 | 4 | 5 | 11 | 12) {
            return 0;
        }
    }
    let Some(q) = quote_len(ctx, at) else {
        return 0;
    };
    if !charge(agent) {
        return 0;
    }
    s.out = [0; 64];
    s.out[20] = 3;
    s.out[21] = 13;
    let seed = sum(&s.out[20..28], 0);
    let Some(total) = quote_sum(ctx, s, at.l3, q, seed) else {
        return 0;
    };
    let (ip, out) = (&s.orig, &mut s.out);
    let c = fold(total, 0);
    out[22..24].copy_from_slice(&c);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&((ICMP4_GROWTH + q) as u16).to_be_bytes());
    out[8] = REPLY_TTL;
    out[9] = IPPROTO_ICMP;
    out[12..16].copy_from_slice(&ip[16..20]);
    out[16..20].copy_from_slice(&ip[12..16]);
    let c = fold(sum(&out[..20], 0), 0);
    out[10..12].copy_from_slice(&c);
    finish_icmp(ctx, s, at.l3, q, ICMP4_GROWTH)
}

/// ICMPv6 destination unreachable, administratively prohibited (type 1 code 1, RFC 4443
/// 3.1), quoting the packet. Never for an ICMPv6 error (types below 128) or a non-first
/// fragment.
#[inline(always)]
fn unreachable_v6<C: Packet>(ctx: &C, s: &mut ReplyScratch, agent: u32, at: At, proto: u8) -> u32 {
    if !load(ctx, at.l3, &mut s.orig[..40]) {
        return 0;
    }
    if !first_fragment_v6(ctx, s.orig[6], at.l3 + 40, at.l4) {
        return 0;
    }
    if proto == IPPROTO_ICMPV6 {
        if !load(ctx, at.l4, &mut s.orig[40..44]) || s.orig[40] < 128 {
            return 0;
        }
    }
    let Some(q) = quote_len(ctx, at) else {
        return 0;
    };
    if !charge(agent) {
        return 0;
    }
    let plen = (8 + q) as u16;
    {
        let (ip, out) = (&s.orig, &mut s.out);
        *out = [0; 64];
        out[0] = 0x60;
        out[4..6].copy_from_slice(&plen.to_be_bytes());
        out[6] = IPPROTO_ICMPV6;
        out[7] = REPLY_TTL;
        out[8..24].copy_from_slice(&ip[24..40]);
        out[24..40].copy_from_slice(&ip[8..24]);
        out[40] = 1;
        out[41] = 1;
    }
    // Pseudo-header (RFC 8200 8.1): the addresses, the upper-layer length, next header 58.
    let seed = sum(&s.out[8..48], 0);
    let Some(total) = quote_sum(ctx, s, at.l3, q, seed) else {
        return 0;
    };
    let c = fold(total, word(plen) + word(u16::from(IPPROTO_ICMPV6)));
    s.out[42..44].copy_from_slice(&c);
    finish_icmp(ctx, s, at.l3, q, ICMP6_GROWTH)
}

/// Whether the IPv6 extension headers from `off` to the transport header at `l4` (first
/// one `next`) hold no fragment header with a non-zero offset. The parser classifies a
/// fragment of a protocol without ports as `NoPorts`, so this walks the chain again; only
/// rejected packets with extension headers pay for it.
#[inline(always)]
fn first_fragment_v6<C: Packet>(ctx: &C, mut next: u8, mut off: usize, l4: usize) -> bool {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if off >= l4 {
            return true;
        }
        let mut e = [0u8; 4];
        if !load(ctx, off, &mut e) {
            return false;
        }
        match next {
            IPPROTO_FRAGMENT => {
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    return false;
                }
                off += 8;
            }
            IPPROTO_AH => off += (e[1] as usize + 2) * 4,
            _ => off += (e[1] as usize + 1) * 8,
        }
        next = e[0];
    }
    off >= l4
}
