//! The two places the pipeline runs: XDP (`enforce`, for NICs: frames before the stack
//! builds a socket buffer) and tc (`enforce_tc`, for sandbox veths: the socket buffers an
//! agent's stack sends, GSO super-packets included, with no copy and no offload taken
//! away). Every stage is written once against [`Packet`]; the two implementations below are
//! the only code that knows which context it runs in, and each entry point is
//! monomorphised for its own, so XDP pays nothing for what tc needs.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action, xdp_md},
    helpers::generated::{
        bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_pull_data, bpf_skb_store_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};

use crate::{maps::*, names::*, reject::*};

/// What the stages need from the context they run in.
pub(crate) trait Packet: EbpfContext {
    /// The action that lets the packet go on: `XDP_PASS`; at tc `TC_ACT_UNSPEC`, "no
    /// objection", so a program or filter after ours still runs (tcx's `TCX_NEXT`).
    const PASS: u32;
    /// The action that drops the packet.
    const DROP: u32;
    /// Whether [`Packet::pull`] can make more of the packet directly readable (tc: socket
    /// buffers keep payload, and rarely headers, in page fragments).
    const CAN_PULL: bool;

    /// Start of the directly readable bytes.
    fn data(&self) -> usize;
    /// End of the directly readable bytes.
    fn data_end(&self) -> usize;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// Bytes of the packet, from the Ethernet header: a GSO super-packet's whole length.
    fn len(&self) -> u64;
    /// Segments the packet goes on the wire as: `gso_segs` of a GSO super-packet, else 1.
    fn segs(&self) -> u64;
    /// VLAN tags the kernel already took off into metadata (tc sees the outer tag there
    /// once the receive path has untagged the frame; XDP sees every tag in the frame).
    fn outer_tags(&self) -> usize;
    /// Makes the first `min(len, self.len())` bytes directly readable; false if it could
    /// not. Invalidates everything read through packet pointers before (nothing in the
    /// stages keeps one: every read starts again from [`Packet::data`]).
    fn pull(&self, len: u32) -> bool;
    /// The program array of this context's stages.
    fn stages() -> &'static ProgramArray;
    /// [`learned_admission`] for this context.
    fn learned_admission(&self, layout: u64, owner: u64, l4: u64) -> u32;
    /// [`tls_admission`] for this context.
    fn tls_admission(&self, layout: u64, owner: u64, l4: u64) -> u32;
    /// [`server_name_lookup`] for this context.
    fn server_name_lookup(&self, span: u64, owner: u64, port: u64) -> u32;
    /// Copies `len` bytes at `off` to `dst` with the context's helper (Linux 5.18 for
    /// XDP); 0 on success.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes.
    unsafe fn load_bytes(&self, off: u32, dst: *mut c_void, len: u32) -> i64;
    /// [`reject_reply`] for this context: turns the packet into the answer to a rejected
    /// packet and returns the action that sends it, or [`Packet::DROP`] (no reply).
    fn reply(&self, agent: u32, to: u64) -> u32;
    /// Copies `len` bytes from `src` into the packet at `off` with the context's helper
    /// (Linux 5.18 for XDP), never by direct access: at tc a direct write makes the verifier
    /// add a prologue that uncloses every cloned socket buffer, a copy on every TCP segment.
    /// False if it failed.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads.
    unsafe fn store_bytes(&self, off: u32, src: *const c_void, len: u32) -> bool;
    /// Adds `len` bytes in front of the packet (their content is undefined); false if it
    /// could not.
    fn grow_head(&self, len: u32) -> bool;
    /// Cuts the packet to `len` bytes from the Ethernet header; false if it could not.
    fn trim(&self, len: u32) -> bool;
    /// The action that sends the packet back out of the interface it arrived on: `XDP_TX`;
    /// at tc a redirect to the interface's egress (`TC_ACT_REDIRECT`).
    fn send_back(&self) -> u32;
}

impl Packet for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;
    const CAN_PULL: bool = false;

    // Loaded afresh at every use, volatile, as at tc (see there): with the SNI check's
    // reads reordered for tc, LLVM started reusing one load for several bounds checks in
    // the XDP build too, and Linux 6.1's verifier lost the checked range on the copy
    // ("invalid access to packet, off=1 size=1, r=0").
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer the kernel passed; the field every XDP program reads.
        unsafe { ptr::read_volatile(&raw const (*self.ctx).data) as usize }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { ptr::read_volatile(&raw const (*self.ctx).data_end) as usize }
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
    #[inline(always)]
    fn segs(&self) -> u64 {
        1
    }
    #[inline(always)]
    fn outer_tags(&self) -> usize {
        0
    }
    #[inline(always)]
    fn pull(&self, _len: u32) -> bool {
        false
    }
    #[inline(always)]
    fn stages() -> &'static ProgramArray {
        &STAGES
    }
    #[inline(always)]
    fn learned_admission(&self, layout: u64, owner: u64, l4: u64) -> u32 {
        learned_admission(self.ctx, layout, owner, l4)
    }
    #[inline(always)]
    fn tls_admission(&self, layout: u64, owner: u64, l4: u64) -> u32 {
        tls_admission(self.ctx, layout, owner, l4)
    }
    #[inline(always)]
    fn server_name_lookup(&self, span: u64, owner: u64, port: u64) -> u32 {
        server_name_lookup(self.ctx, span, owner, port)
    }
    #[inline(always)]
    unsafe fn load_bytes(&self, off: u32, dst: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller's contract; the helper checks the packet range itself.
        unsafe { bpf_xdp_load_bytes(self.ctx, off, dst, len) }
    }

    #[inline(always)]
    fn reply(&self, agent: u32, to: u64) -> u32 {
        reject_reply(self.ctx, u64::from(agent), to)
    }
    #[inline(always)]
    unsafe fn store_bytes(&self, off: u32, src: *const c_void, len: u32) -> bool {
        // SAFETY: the caller's contract; the helper (Linux 5.18) checks the packet range.
        unsafe { bpf_xdp_store_bytes(self.ctx, off, src.cast_mut(), len) == 0 }
    }
    #[inline(always)]
    fn grow_head(&self, len: u32) -> bool {
        // SAFETY: the helper (Linux 4.10) checks the headroom itself.
        unsafe { bpf_xdp_adjust_head(self.ctx, -(len as i32)) == 0 }
    }
    #[inline(always)]
    fn trim(&self, len: u32) -> bool {
        let now = Packet::len(self) as i64;
        // Through memory: folded into the 32-bit delta, LLVM did the subtraction of the
        // packet pointers in 32 bits, which the verifier refuses ("32-bit pointer
        // arithmetic prohibited").
        // SAFETY: a read of a local.
        let now = unsafe { ptr::read_volatile(&now) };
        // SAFETY: the helper (Linux 4.18) refuses a frame cut below an Ethernet header.
        unsafe { bpf_xdp_adjust_tail(self.ctx, (i64::from(len) - now) as i32) == 0 }
    }
    #[inline(always)]
    fn send_back(&self) -> u32 {
        xdp_action::XDP_TX
    }
}

impl Packet for TcContext {
    const PASS: u32 = TC_ACT_UNSPEC as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;
    const CAN_PULL: bool = true;

    // `data` and `data_end` are loaded afresh at every use, volatile: LLVM otherwise reuses
    // an earlier load and widens it with a 32-bit move, which the verifier reads as a
    // scalar, not a packet pointer ("invalid mem access 'scalar'"); and a pull
    // invalidates every earlier load anyway.
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer the kernel passed; the field every tc program reads.
        unsafe { ptr::read_volatile(&raw const (*self.skb.skb).data) as usize }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { ptr::read_volatile(&raw const (*self.skb.skb).data_end) as usize }
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer the kernel passed; a field every tc program may read.
        unsafe { (*self.skb.skb).ifindex }
    }
    #[inline(always)]
    fn len(&self) -> u64 {
        u64::from(TcContext::len(self))
    }
    #[inline(always)]
    fn segs(&self) -> u64 {
        // SAFETY: as above (`gso_segs`: Linux 5.1). 0 for a packet that is not GSO.
        let segs = unsafe { (*self.skb.skb).gso_segs };
        if segs > 1 { u64::from(segs) } else { 1 }
    }
    #[inline(always)]
    fn outer_tags(&self) -> usize {
        // SAFETY: as above.
        (unsafe { (*self.skb.skb).vlan_present } != 0) as usize
    }
    #[inline(always)]
    fn pull(&self, len: u32) -> bool {
        let total = TcContext::len(self);
        let len = if len < total { len } else { total };
        // SAFETY: the helper (Linux 4.9) takes any length and fails if it cannot pull.
        unsafe { bpf_skb_pull_data(self.skb.skb.cast(), len) == 0 }
    }
    #[inline(always)]
    fn stages() -> &'static ProgramArray {
        &STAGES_TC
    }
    #[inline(always)]
    fn learned_admission(&self, layout: u64, owner: u64, l4: u64) -> u32 {
        learned_admission_tc(self.skb.skb, layout, owner, l4)
    }
    #[inline(always)]
    fn tls_admission(&self, layout: u64, owner: u64, l4: u64) -> u32 {
        tls_admission_tc(self.skb.skb, layout, owner, l4)
    }
    #[inline(always)]
    fn server_name_lookup(&self, span: u64, owner: u64, port: u64) -> u32 {
        server_name_lookup_tc(self.skb.skb, span, owner, port)
    }
    #[inline(always)]
    unsafe fn load_bytes(&self, off: u32, dst: *mut c_void, len: u32) -> i64 {
        // SAFETY: the caller's contract; the helper checks the packet range itself.
        unsafe { bpf_skb_load_bytes(self.skb.skb.cast(), off, dst, len) }
    }
    #[inline(always)]
    fn reply(&self, agent: u32, to: u64) -> u32 {
        reject_reply_tc(self.skb.skb, u64::from(agent), to)
    }
    #[inline(always)]
    unsafe fn store_bytes(&self, off: u32, src: *const c_void, len: u32) -> bool {
        // SAFETY: the caller's contract; the helper (Linux 4.1) makes the buffer writable
        // and checks the range itself.
        unsafe { bpf_skb_store_bytes(self.skb.skb.cast(), off, src, len, 0) == 0 }
    }
    #[inline(always)]
    fn grow_head(&self, len: u32) -> bool {
        // SAFETY: the helper (Linux 4.10) reallocates the head as needed; the MAC header
        // moves to the new start, which the redirect then sends from.
        unsafe { bpf_skb_change_head(self.skb.skb.cast(), len, 0) == 0 }
    }
    #[inline(always)]
    fn trim(&self, len: u32) -> bool {
        // SAFETY: the helper (Linux 4.9) trims page fragments too and resets a GSO
        // super-packet's segmentation.
        unsafe { bpf_skb_change_tail(self.skb.skb.cast(), len, 0) == 0 }
    }
    #[inline(always)]
    fn send_back(&self) -> u32 {
        // SAFETY: helper without preconditions (Linux 4.4); egress of the interface the
        // packet arrived on: the host side of a sandbox veth sends it to the agent.
        unsafe { bpf_redirect(Packet::ifindex(self), 0) as u32 }
    }
}

/// The kernel's raw context pointers, for the global functions' wrappers.
pub(crate) type XdpRaw = *mut xdp_md;
/// See [`XdpRaw`].
pub(crate) type TcRaw = *mut __sk_buff;

/// What a packet weighs for counters and limits: the segments and bytes it goes on the wire
/// as. An XDP frame is one segment of its length; a GSO super-packet at tc is `gso_segs`
/// segments, each repeating the headers up to the transport payload, so its bytes are its
/// length plus the headers of every segment after the first: the sum of the Ethernet frames
/// that leave (without preamble, FCS and inter-frame gap), as XDP would count them.
#[derive(Clone, Copy)]
pub(crate) struct Wire {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
}
