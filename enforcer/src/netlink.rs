//! What the kernel says about an interface: one `RTM_GETLINK` over rtnetlink, read for its
//! XDP attribute (`IFLA_XDP`: the attach mode and the program id) and its kind
//! (`IFLA_INFO_KIND`: veth, tun, bridge, ...; none for a physical NIC).
//!
//! The daemon cannot take this from its own bookkeeping: a link pinned by an earlier run
//! keeps the mode it was created with, which the `bpf_link_info` of an XDP link does not
//! carry, and an interface deleted under a pin detaches its program without telling anyone.

use std::{ffi::CString, io};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use serde::Serialize;

/// How XDP runs on an interface, as `ip link` would show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttachMode {
    /// No XDP program.
    None,
    /// In the driver (native XDP), before any socket buffer exists.
    Native,
    /// Generic (skb) mode: after the socket buffer is built, slower.
    Generic,
    /// Offloaded to the NIC.
    Offload,
    /// Programs in more than one mode at once.
    Multiple,
}

impl XdpAttachMode {
    /// The mode's name as `status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            XdpAttachMode::None => "none",
            XdpAttachMode::Native => "native",
            XdpAttachMode::Generic => "generic",
            XdpAttachMode::Offload => "offload",
            XdpAttachMode::Multiple => "multiple",
        }
    }
}

/// The XDP state of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct XdpState {
    /// The interface's index.
    pub ifindex: u32,
    /// The attach mode.
    pub mode: XdpAttachMode,
    /// The attached program's id (0 when none or when several are attached).
    pub program_id: u32,
}

/// Errors of [`xdp_state`].
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The interface does not exist in this network namespace.
    #[error("no interface named {interface:?} in this network namespace")]
    NoSuchInterface {
        /// The name asked for.
        interface: String,
    },
    /// The netlink socket failed.
    #[error("asking rtnetlink about {interface}: {source}")]
    Io {
        /// The interface.
        interface: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The kernel answered something this code cannot read.
    #[error("reading rtnetlink's answer about {interface}: {detail}")]
    Answer {
        /// The interface.
        interface: String,
        /// What was wrong.
        detail: String,
    },
}

/// What [`link`] reads of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// The XDP program and its mode.
    pub xdp: XdpState,
    /// The driver kind of a virtual device (`veth`, `tun`, `bridge`, `vlan`, ...); `None`
    /// for a physical NIC, whose driver registers no link kind.
    pub kind: Option<String>,
}

/// Asks the kernel which XDP program runs on `interface` and in which mode.
pub fn xdp_state(interface: &str) -> Result<XdpState, NetlinkError> {
    link(interface).map(|l| l.xdp)
}

/// Asks the kernel about `interface` (see [`Link`]).
pub fn link(interface: &str) -> Result<Link, NetlinkError> {
    let missing = || NetlinkError::NoSuchInterface {
        interface: interface.to_string(),
    };
    let name = CString::new(interface).map_err(|_| missing())?;
    // SAFETY: if_nametoindex reads a NUL-terminated string and returns 0 when there is no
    // such interface.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(missing());
    }
    let io_err = |source| NetlinkError::Io {
        interface: interface.to_string(),
        source,
    };
    let answer_err = |detail: String| NetlinkError::Answer {
        interface: interface.to_string(),
        detail,
    };

    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io_err)?;
    socket.bind_auto().map_err(io_err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io_err)?;
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)),
    );
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(io_err)?;

    // One request without NLM_F_DUMP: one answer, the link or an error.
    let (answer, _) = socket.recv_from_full().map_err(io_err)?;
    let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|e| answer_err(e.to_string()))?;
    match message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => Ok(Link {
            xdp: xdp_of(ifindex, &link.attributes),
            kind: kind_of(&link.attributes),
        }),
        // The interface went away between the name lookup and the request.
        NetlinkPayload::Error(e) if e.raw_code() == -libc::ENODEV => Err(missing()),
        NetlinkPayload::Error(e) => Err(io_err(io::Error::from_raw_os_error(-e.raw_code()))),
        other => Err(answer_err(format!(
            "expected a link, got message type {}",
            other.message_type()
        ))),
    }
}

/// Reads `IFLA_INFO_KIND` out of a link's attributes.
fn kind_of(attributes: &[LinkAttribute]) -> Option<String> {
    attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind.to_string()),
            _ => None,
        }),
        _ => None,
    })
}

/// Reads `IFLA_XDP` out of a link's attributes. A kernel that sends none has no program
/// attached (every kernel since 4.12 sends it for every link).
fn xdp_of(ifindex: u32, attributes: &[LinkAttribute]) -> XdpState {
    let mut state = XdpState {
        ifindex,
        mode: XdpAttachMode::None,
        program_id: 0,
    };
    let Some(xdp) = attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => Some(xdp),
        _ => None,
    }) else {
        return state;
    };
    for attribute in xdp {
        match attribute {
            LinkXdp::Attached(attached) => {
                state.mode = match attached {
                    XdpAttached::None => XdpAttachMode::None,
                    XdpAttached::Driver => XdpAttachMode::Native,
                    XdpAttached::SocketBuffer => XdpAttachMode::Generic,
                    XdpAttached::Hardware => XdpAttachMode::Offload,
                    // A mode this crate does not know is one more than we can name.
                    XdpAttached::Multiple | XdpAttached::Other(_) => XdpAttachMode::Multiple,
                    _ => XdpAttachMode::Multiple,
                }
            }
            // Sent only when exactly one program is attached.
            LinkXdp::ProgId(id) => state.program_id = *id,
            _ => {}
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mode_and_program() {
        let attributes = [
            LinkAttribute::Mtu(1500),
            LinkAttribute::Xdp(vec![
                LinkXdp::Attached(XdpAttached::SocketBuffer),
                LinkXdp::ProgId(42),
                LinkXdp::SkbProgId(42),
            ]),
        ];
        assert_eq!(
            xdp_of(7, &attributes),
            XdpState {
                ifindex: 7,
                mode: XdpAttachMode::Generic,
                program_id: 42
            }
        );
        let none = [LinkAttribute::Xdp(vec![LinkXdp::Attached(
            XdpAttached::None,
        )])];
        assert_eq!(xdp_of(7, &none).mode, XdpAttachMode::None);
        assert_eq!(xdp_of(7, &[]).mode, XdpAttachMode::None);
    }

    #[test]
    fn loopback_has_no_xdp_and_a_missing_name_is_named() {
        // Every network namespace has `lo`; nothing in this crate attaches XDP to it.
        let lo = link("lo").unwrap();
        assert_eq!(lo.xdp.ifindex, 1);
        assert_eq!(lo.xdp.mode, XdpAttachMode::None);
        // Loopback registers no link kind: to this test, a physical device.
        assert_eq!(lo.kind, None);
        let err = xdp_state("enf-no-such0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "no interface named \"enf-no-such0\" in this network namespace"
        );
    }
}
