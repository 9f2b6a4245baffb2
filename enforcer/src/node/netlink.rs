//! What the kernel says about interfaces, over rtnetlink:
//! - [`link`]: one `RTM_GETLINK`, read for the XDP attribute (`IFLA_XDP`: the attach mode
//!   and the program id) and the kind (`IFLA_INFO_KIND`: veth, tun, bridge, ...; none for a
//!   physical NIC);
//! - [`watch_links`]: the `RTNLGRP_LINK` multicast group, so the daemon attaches to a
//!   sandbox's interface when it appears, and forgets it when it goes.
//!
//! The daemon cannot take this from its own bookkeeping: a link pinned by an earlier run
//! keeps the mode it was created with, which the `bpf_link_info` of an XDP link does not
//! carry, and an interface deleted under a pin detaches its program without telling anyone.

use std::{ffi::CString, io, thread};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use serde::Serialize;

/// Resolves an interface name in the caller's network namespace.
pub fn if_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

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

/// A change to the interfaces of the daemon's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface appeared or changed: created, renamed, moved in, brought up or down.
    Changed {
        /// Its index.
        ifindex: u32,
        /// Its name now.
        name: String,
    },
    /// An interface went away: deleted, or moved to another namespace.
    Gone {
        /// Its index.
        ifindex: u32,
        /// Its last name.
        name: String,
    },
    /// The kernel dropped events (the socket's buffer overran): look at everything again.
    Overrun,
}

/// `RTNLGRP_LINK` (uapi `rtnetlink.h`).
const RTNLGRP_LINK: u32 = 1;

/// Subscribes to the interface changes of the caller's network namespace and sends them to
/// `events` from a thread of its own, until the receiver is dropped. The subscription is in
/// place when this returns: no change after that is missed (an overrun says so).
pub fn watch_links(events: tokio::sync::mpsc::Sender<LinkEvent>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.add_membership(RTNLGRP_LINK)?;
    thread::Builder::new()
        .name("rtnetlink".into())
        .spawn(move || {
            loop {
                let batch = match socket.recv_from_full() {
                    Ok((bytes, _)) => link_events(&bytes),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => vec![LinkEvent::Overrun],
                    Err(e) => {
                        tracing::error!(error = %e, "reading rtnetlink link events; interfaces are no longer followed");
                        return;
                    }
                };
                for event in batch {
                    if events.blocking_send(event).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// The link events in one datagram of the multicast group (several messages may share one).
fn link_events(mut bytes: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) else {
            // Unreadable: what it said is unknown, so everything must be looked at again.
            events.push(LinkEvent::Overrun);
            break;
        };
        let length = (message.header.length as usize).max(16);
        let name = |link: &LinkMessage| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })
        };
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                if let Some(name) = name(&link) {
                    events.push(LinkEvent::Changed {
                        ifindex: link.header.index,
                        name,
                    });
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                if let Some(name) = name(&link) {
                    events.push(LinkEvent::Gone {
                        ifindex: link.header.index,
                        name,
                    });
                }
            }
            _ => {}
        }
        // Messages are aligned to 4 bytes (NLMSG_ALIGN).
        bytes = bytes.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    events
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

    fn link_message(new: bool, ifindex: u32, name: &str) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = ifindex;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        let payload = if new {
            RouteNetlinkMessage::NewLink(link)
        } else {
            RouteNetlinkMessage::DelLink(link)
        };
        let mut message = NetlinkMessage::new(NetlinkHeader::default(), payload.into());
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    #[test]
    fn link_events_read_every_message_of_a_datagram() {
        let mut datagram = link_message(true, 7, "agt-a");
        datagram.extend(link_message(false, 5, "agt-b1"));
        assert_eq!(
            link_events(&datagram),
            vec![
                LinkEvent::Changed {
                    ifindex: 7,
                    name: "agt-a".into()
                },
                LinkEvent::Gone {
                    ifindex: 5,
                    name: "agt-b1".into()
                },
            ]
        );
        // A torn message makes the reader look at everything again.
        let torn = &datagram[..datagram.len() - 3];
        assert_eq!(link_events(torn).last(), Some(&LinkEvent::Overrun));
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
