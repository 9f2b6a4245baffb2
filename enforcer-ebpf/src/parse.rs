//! Stage 1, parse: Ethernet, up to two VLAN tags, IPv4 or IPv6 with options and extension
//! headers, and the transport ports, into a [`Flow`]; anything the parser cannot follow
//! is undecidable, never guessed.

use core::ptr;

use enforcer_common::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS};

use crate::context::{Packet, Wire};

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88a8;

pub(crate) const IPPROTO_HOPOPTS: u8 = 0;
pub(crate) const IPPROTO_IGMP: u8 = 2;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const IPPROTO_ROUTING: u8 = 43;
pub(crate) const IPPROTO_FRAGMENT: u8 = 44;
pub(crate) const IPPROTO_AH: u8 = 51;
pub(crate) const IPPROTO_DSTOPTS: u8 = 60;
pub(crate) const IPPROTO_SCTP: u8 = 132;
pub(crate) const IPPROTO_UDPLITE: u8 = 136;

/// Largest L3/L4 offset the parser follows. XDP frames are at most a page, so a larger
/// offset cannot be inside the packet; the bound also gives the verifier a range for the
/// variable offsets of IPv4 options and IPv6 extension headers.
pub(crate) const MAX_OFFSET: usize = 4096;
/// A mask that keeps every offset up to [`MAX_OFFSET`]: applied to offsets passed into
/// global functions, whose arguments the verifier knows nothing about.
pub(crate) const OFFSET_MASK: u64 = 0x1fff;

/// What the parser found about the transport layer: its kind.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum L4Kind {
    /// A protocol with ports (TCP, UDP, SCTP, UDP-Lite) and its ports. Decisions use only
    /// `dst`; `src` is kept for audit events (it comes from the same 4-byte read).
    Port,
    /// A protocol without ports (ICMP, GRE, ESP, ...): only any-port rules apply.
    NoPorts,
    /// A non-first fragment of a protocol with ports: the port is unknowable.
    Fragment,
    /// Headers cut short or a chain the parser will not follow: nothing can be decided.
    Undecidable,
    /// Link-local control traffic (IPv6 neighbour discovery, MLD, IGMP) that the hop
    /// limit keeps on the link: passed like ARP, or agents could not use IP at all.
    LinkControl,
}

/// What the parser found about the transport layer: the kind and, for [`L4Kind::Port`],
/// the ports (0 otherwise).
///
/// A struct with every field always written, not an enum with data: an enum's payload is
/// undefined in the variants without one, and LLVM copies it anyway, from whatever
/// register is at hand; on a path where that register was never written the verifier
/// refuses the program ("R5 !read_ok", seen once the tc parser gained its pull paths).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct L4 {
    pub(crate) kind: L4Kind,
    pub(crate) src: u16,
    pub(crate) dst: u16,
}

#[expect(
    non_upper_case_globals,
    reason = "named like the kinds, so comparisons and patterns read as they did when L4 was an enum"
)]
impl L4 {
    pub(crate) const NoPorts: L4 = L4::of(L4Kind::NoPorts);
    pub(crate) const Fragment: L4 = L4::of(L4Kind::Fragment);
    pub(crate) const Undecidable: L4 = L4::of(L4Kind::Undecidable);
    pub(crate) const LinkControl: L4 = L4::of(L4Kind::LinkControl);

    const fn of(kind: L4Kind) -> L4 {
        L4 {
            kind,
            src: 0,
            dst: 0,
        }
    }

    /// A protocol with ports, and its ports.
    #[inline(always)]
    pub(crate) const fn port(src: u16, dst: u16) -> L4 {
        L4 {
            kind: L4Kind::Port,
            src,
            dst,
        }
    }

    /// The destination port of a protocol with ports.
    #[inline(always)]
    pub(crate) fn dst_port(self) -> Option<u16> {
        (self.kind == L4Kind::Port).then_some(self.dst)
    }
}

/// The IP-layer facts a decision needs, for either family.
pub(crate) struct Flow<A> {
    pub(crate) src: A,
    pub(crate) dst: A,
    pub(crate) proto: u8,
    pub(crate) l4: L4,
    /// Offset of the IP header.
    pub(crate) l3_off: usize,
    /// Offset of the transport header (meaningful for `L4Kind::Port`).
    pub(crate) l4_off: usize,
    /// Offset where the IP packet ends by its length field: the stack trims anything
    /// after it (Ethernet padding), so the SNI check must not read it as payload.
    pub(crate) ip_end: usize,
}

/// Reads `N` bytes at `off` directly from the packet, or `None` if they are not all before
/// `data_end`: what the BPF global functions use, which must not change the packet.
///
/// Keep `N >= 2`: for `N == 1` LLVM folds `start + 1 > end` into `start >= end`, a form
/// the verifier does not turn into a readable range.
#[inline(always)]
pub(crate) fn peek<C: Packet, const N: usize>(ctx: &C, off: usize) -> Option<[u8; N]> {
    // The explicit bound keeps the offset's range small for the verifier.
    if off > MAX_OFFSET {
        return None;
    }
    let start = ctx.data() + off;
    // Bounds check against data_end: the verifier rejects any packet read not dominated by one.
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: [start, start + N) lies inside the packet (checked above); [u8; N] has
    // alignment 1.
    Some(unsafe { ptr::read(start as *const [u8; N]) })
}

/// Reads `N` bytes at `off` (see [`peek`]). At tc, [`pull_headers`] made the headers
/// directly readable first, so the parser never changes the packet itself.
#[inline(always)]
pub(crate) fn read<C: Packet, const N: usize>(ctx: &C, off: usize) -> Option<[u8; N]> {
    peek::<C, N>(ctx, off)
}

/// What [`pull_headers`] pulls when it cannot tell how long the headers are.
const GENEROUS_HEADERS: usize = 256;

/// At tc, makes the headers the parser reads directly readable, before it reads any: a
/// socket buffer may keep part of a packet in page fragments. A socket's own packets carry
/// their headers in the linear part, so this reads the length they need (Ethernet, tags, IP
/// header, and the transport bytes the parser and the GSO weight read) and pulls only when
/// the linear part is shorter: a pull on a cloned buffer (every TCP segment is one) copies
/// its head. One pull, before the parse, with nothing kept across it: pulling at each read
/// instead doubled the paths after every read site, which took Linux 6.1's verifier to
/// 86% of its budget for `enforce_tc`.
#[inline(always)]
pub(crate) fn pull_headers<C: Packet>(ctx: &C) {
    if !C::CAN_PULL {
        return;
    }
    let linear = (ctx.data_end() - ctx.data()) as u64;
    if linear >= ctx.len() {
        return;
    }
    let need = headers_needed(ctx) as u64;
    if linear < need {
        ctx.pull(need as u32);
    }
}

/// The bytes from the frame's start the parser reads for this packet, from what is directly
/// readable; [`GENEROUS_HEADERS`] when that is not enough to tell (an IPv6 extension chain,
/// or headers cut by the linear part's end).
#[inline(always)]
fn headers_needed<C: Packet>(ctx: &C) -> usize {
    let Some((ethertype, off)) = link_layer(ctx) else {
        return GENEROUS_HEADERS;
    };
    let (l4_off, proto) = match ethertype {
        ETH_P_IP => {
            let Some(h) = peek::<C, 10>(ctx, off) else {
                return GENEROUS_HEADERS;
            };
            (off + ((h[0] & 0x0f) as usize) * 4, h[9])
        }
        ETH_P_IPV6 => {
            let Some(h) = peek::<C, 8>(ctx, off) else {
                return GENEROUS_HEADERS;
            };
            match h[6] {
                IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 | IPPROTO_SCTP | IPPROTO_UDPLITE => {
                    (off + 40, h[6])
                }
                _ => return GENEROUS_HEADERS,
            }
        }
        _ => return 0,
    };
    // TCP: through the data offset (byte 12), which the GSO weight and the SNI check read;
    // UDP: its header; anything else: the 4 bytes ports or ICMP type sit in.
    l4_off
        + match proto {
            IPPROTO_TCP => 14,
            IPPROTO_UDP => 8,
            _ => 4,
        }
}

#[inline(always)]
pub(crate) fn peek_be16<C: Packet>(ctx: &C, off: usize) -> Option<u16> {
    peek::<C, 2>(ctx, off).map(u16::from_be_bytes)
}

#[inline(always)]
pub(crate) fn read_be16<C: Packet>(ctx: &C, off: usize) -> Option<u16> {
    read::<C, 2>(ctx, off).map(u16::from_be_bytes)
}

#[inline(always)]
pub(crate) fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

/// Reads the ports of a first (or unfragmented) packet at `off`.
#[inline(always)]
pub(crate) fn transport<C: Packet>(ctx: &C, proto: u8, off: usize) -> L4 {
    if !has_ports(proto) {
        return L4::NoPorts;
    }
    // Source port at +0, destination port at +2 in all four protocols: one 4-byte read with
    // the same bounds check the destination port alone needed, so keeping the source port
    // costs passed packets nothing.
    match read::<C, 4>(ctx, off) {
        Some(p) => L4::port(
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ),
        None => L4::Undecidable,
    }
}

/// Classifies an ICMPv6 message at `off`. Neighbour discovery (RFC 4861: router and
/// neighbour solicitation and advertisement, redirect) is only valid with hop limit 255 and
/// MLD (RFC 2710, 3810) is sent with hop limit 1; either way it never leaves the link.
#[inline(always)]
pub(crate) fn icmpv6<C: Packet>(ctx: &C, off: usize, hop_limit: u8) -> L4 {
    // Type, code and checksum: the fixed start of every ICMPv6 message.
    let Some([kind, ..]) = read::<C, 4>(ctx, off) else {
        return L4::Undecidable;
    };
    match (kind, hop_limit) {
        (133..=137, 255) | (130..=132 | 143, 1) => L4::LinkControl,
        _ => L4::NoPorts,
    }
}

/// Parses an IPv4 header at `off`. `None` when the header is truncated or invalid, so the
/// source address cannot be trusted.
#[inline(always)]
pub(crate) fn parse_v4<C: Packet>(ctx: &C, off: usize) -> Option<Flow<[u8; 4]>> {
    let h = read::<C, 20>(ctx, off)?;
    let version = h[0] >> 4;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if version != 4 || ihl < 20 {
        return None;
    }
    let proto = h[9];
    let ttl = h[8];
    let ip_end = off + u16::from_be_bytes([h[2], h[3]]) as usize;
    let src = [h[12], h[13], h[14], h[15]];
    let dst = [h[16], h[17], h[18], h[19]];
    let frag_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let l4 = if proto == IPPROTO_IGMP && ttl == 1 && frag_offset == 0 {
        // IGMP is link-scoped with TTL 1 (RFC 2236, 3376): no router forwards it.
        L4::LinkControl
    } else if frag_offset == 1 && proto == IPPROTO_TCP {
        // An 8-byte offset can only serve to overwrite the TCP ports of the first fragment
        // (RFC 1858, section 3.2): never legitimate.
        L4::Undecidable
    } else if frag_offset != 0 {
        // A non-first fragment has no transport header; ports are unknown.
        if has_ports(proto) {
            L4::Fragment
        } else {
            L4::NoPorts
        }
    } else if read::<C, 4>(ctx, off + ihl - 4).is_none() {
        // Options announced by IHL but cut off.
        L4::Undecidable
    } else {
        // Options are skipped by IHL; a first fragment too short to hold the ports is
        // Undecidable (the tiny-fragment attack of RFC 1858).
        transport(ctx, proto, off + ihl)
    };
    Some(Flow {
        src,
        dst,
        proto,
        l4,
        l3_off: off,
        l4_off: off + ihl,
        ip_end,
    })
}

/// Parses an IPv6 header at `off` and walks up to MAX_IPV6_EXT_HEADERS extension headers.
/// At tc, [`pull_headers`] made the first 256 bytes readable for a packet with extension
/// headers; a chain longer than that in page fragments stays `Undecidable` (only a
/// hand-built packet can be one).
#[inline(always)]
pub(crate) fn parse_v6<C: Packet>(ctx: &C, off: usize) -> Option<Flow<[u8; 16]>> {
    let h = read::<C, 40>(ctx, off)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let l3_off = off;
    let mut next = h[6];
    let hop_limit = h[7];
    let ip_end = off + 40 + u16::from_be_bytes([h[4], h[5]]) as usize;
    let mut off = off + 40;
    // Stays Undecidable if the bound runs out inside the chain.
    let mut l4 = L4::Undecidable;
    let mut upper = false;
    // Up to MAX_IPV6_EXT_HEADERS extension headers, then the upper layer: a constant trip
    // count for the verifier. A longer chain stays Undecidable.
    for _ in 0..MAX_IPV6_EXT_HEADERS + 1 {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING => {
                let Some(e) = peek::<C, 4>(ctx, off) else {
                    break;
                };
                // A routing header with segments left names another final destination
                // than the header's: the real destination is unknowable here.
                if next == IPPROTO_ROUTING && e[3] != 0 {
                    break;
                }
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some(e) = peek::<C, 2>(ctx, off) else {
                    break;
                };
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(e) = peek::<C, 8>(ctx, off) else {
                    break;
                };
                next = e[0];
                off += 8;
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    l4 = if has_ports(next) {
                        L4::Fragment
                    } else {
                        L4::NoPorts
                    };
                    break;
                }
            }
            _ => {
                upper = true;
                break;
            }
        }
    }
    // The upper layer is read once, after the loop, not in each iteration's arm: fewer
    // paths for the verifier.
    if upper {
        l4 = if next == IPPROTO_ICMPV6 {
            icmpv6(ctx, off, hop_limit)
        } else {
            transport(ctx, next, off)
        };
    }
    Some(Flow {
        src,
        dst,
        proto: next,
        l4,
        l3_off,
        l4_off: off,
        ip_end,
    })
}

/// The link layer: the ethertype after up to [`MAX_VLAN_TAGS`] 802.1Q / 802.1ad tags in
/// the frame, and the offset of what follows it; `None` when a tag is cut short. A third
/// tag comes back as the ethertype, for the caller to refuse. The loop has a constant trip
/// count so the verifier sees it bounded.
#[inline(always)]
pub(crate) fn link_layer<C: Packet>(ctx: &C) -> Option<(u16, usize)> {
    let mut ethertype = read_be16(ctx, 12)?;
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // The inner ethertype sits in the last two bytes of the 4-byte tag.
        ethertype = read_be16(ctx, off + 2)?;
        off += 4;
    }
    Some((ethertype, off))
}

/// What a packet weighs (see [`Wire`]). An XDP frame (`segs` 1) is its length; so is a
/// socket buffer that is not a GSO super-packet. A super-packet is measured by parsing its
/// headers here, at tc's entry (see [`crate::enforce_tc`] for why not in the decision).
#[inline(always)]
pub(crate) fn weigh<C: Packet>(ctx: &C) -> Wire {
    let segs = ctx.segs();
    let len = ctx.len();
    if segs <= 1 {
        return Wire {
            packets: 1,
            bytes: len,
        };
    }
    // Headers the parser cannot follow: each later segment's copy is unknowable, and the
    // length alone is a lower bound of the wire bytes.
    let headers = gso_headers(ctx).unwrap_or(0) as u64;
    Wire {
        packets: segs,
        bytes: len + (segs - 1) * headers,
    }
}

/// The headers every segment of a GSO super-packet repeats: everything up to the transport
/// payload (TCP's data offset, UDP's 8 bytes; the IP headers alone for anything else).
#[inline(always)]
fn gso_headers<C: Packet>(ctx: &C) -> Option<usize> {
    let (ethertype, off) = link_layer(ctx)?;
    let (l4_off, proto, ports) = match ethertype {
        ETH_P_IP => {
            let f = parse_v4(ctx, off)?;
            (f.l4_off, f.proto, f.l4.kind == L4Kind::Port)
        }
        ETH_P_IPV6 => {
            let f = parse_v6(ctx, off)?;
            (f.l4_off, f.proto, f.l4.kind == L4Kind::Port)
        }
        _ => return None,
    };
    Some(match (ports, proto) {
        (true, IPPROTO_TCP) => {
            // TCP data offset: the high nibble of byte 12, in 32-bit words.
            let b = peek::<C, 2>(ctx, l4_off + 12)?;
            l4_off + ((b[0] >> 4) as usize) * 4
        }
        (true, IPPROTO_UDP) => l4_off + 8,
        _ => l4_off,
    })
}
