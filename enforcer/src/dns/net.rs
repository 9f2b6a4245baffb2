//! The socket work the resolver needs beyond what tokio offers: the interface a UDP query
//! arrived on (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), the interface a TCP peer is reached
//! through, and asking an upstream over UDP or TCP.

use std::{
    ffi::CStr,
    io,
    mem::{self, MaybeUninit},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use hickory_proto::op::Message;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{TcpStream, UdpSocket},
    time::{Instant, timeout, timeout_at},
};

use super::message;

/// Largest DNS message over UDP that the resolver reads (EDNS payloads above 4096 are
/// not used in practice; a larger datagram is cut and fails to parse).
pub const MAX_UDP: usize = 4096;

/// Asks the kernel to report each datagram's arrival interface on `socket`.
pub fn enable_pktinfo(socket: &std::net::UdpSocket, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const on).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives one datagram: its length, sender and the index of the interface it arrived on
/// (when the kernel reported one).
pub async fn recv_with_ifindex(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<u32>)> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::READABLE, || recvmsg_pktinfo(fd, buf))
        .await
}

fn recvmsg_pktinfo(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u32>)> {
    let mut addr = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    // u64 alignment for the cmsg headers; room for either pktinfo.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = addr.as_mut_ptr().cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control);
    // SAFETY: msg describes valid buffers of the stated sizes.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ifindex = None;
    // SAFETY: walking the control buffer the kernel filled, with the CMSG macros.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                ifindex = Some(info.ipi_ifindex as u32);
            } else if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                ifindex = Some(info.ipi6_ifindex);
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    // SAFETY: the kernel wrote a sockaddr of msg_namelen bytes.
    let from = unsafe { sockaddr(addr.as_ptr()) }
        .ok_or_else(|| io::Error::other("datagram from an address that is not IP"))?;
    Ok((n as usize, from, ifindex))
}

/// # Safety
/// `addr` points to an initialized `sockaddr_storage`.
unsafe fn sockaddr(addr: *const libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the caller's contract; the family says which layout is valid.
    unsafe {
        match i32::from((*addr).ss_family) {
            libc::AF_INET => {
                let a = &*addr.cast::<libc::sockaddr_in>();
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let a = &*addr.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// The name of interface `index` in the caller's network namespace.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The interface whose own subnet holds `peer` (longest prefix wins): for a TCP peer, the
/// interface the handshake's answers went out on, since only a peer reachable through it
/// could complete the handshake. `None` when no local subnet holds the address (a peer
/// behind a router), in which case the caller falls back to source-address identity.
pub fn interface_for_peer(peer: IpAddr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return None;
    }
    let mut best: Option<(u32, String)> = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: non-null sockaddrs of the family they state; sockaddr() checks it.
        let (addr, mask) = unsafe {
            (
                sockaddr(ifa.ifa_addr.cast()),
                sockaddr(ifa.ifa_netmask.cast()),
            )
        };
        let (Some(addr), Some(mask)) = (addr, mask) else {
            continue;
        };
        let len = match (addr.ip(), mask.ip(), peer) {
            (IpAddr::V4(a), IpAddr::V4(m), IpAddr::V4(p)) => {
                let (a, m, p) = (u32::from(a), u32::from(m), u32::from(p));
                (a & m == p & m).then(|| m.count_ones())
            }
            (IpAddr::V6(a), IpAddr::V6(m), IpAddr::V6(p)) => {
                let (a, m, p) = (u128::from(a), u128::from(m), u128::from(p));
                (a & m == p & m).then(|| m.count_ones())
            }
            _ => None,
        };
        let Some(len) = len else { continue };
        if best.as_ref().is_none_or(|(l, _)| len > *l) {
            // SAFETY: ifa_name is a NUL-terminated interface name.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            best = Some((len, name));
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(head) };
    best.map(|(_, name)| name)
}

/// Asks `upstream` over UDP from a fresh socket (a random source port per query) and
/// returns the first datagram that answers `query` (see [`message::UpstreamQuery::check`]).
/// Every other datagram goes to `rejected` and the wait goes on until `wait` is up, so a
/// forged or stale datagram can neither stand in for the answer nor end the wait.
pub async fn ask_udp(
    upstream: SocketAddr,
    query: &message::UpstreamQuery,
    wait: Duration,
    rejected: impl Fn(message::Rejected),
) -> io::Result<(Message, Vec<u8>)> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from any other address or port before they
    // reach us, and reports an upstream's ICMP refusal, so a dead one is skipped at once.
    socket.connect(upstream).await?;
    socket.send(&query.bytes).await?;
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = timeout_at(deadline, socket.recv_from(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        // The source rule stated here too, not left to how the socket was set up.
        if (from.ip(), from.port()) != (upstream.ip(), upstream.port()) {
            rejected(message::Rejected::Source);
            continue;
        }
        let Ok(answer) = Message::from_vec(&buf[..n]) else {
            rejected(message::Rejected::Malformed);
            continue;
        };
        match query.check(&answer) {
            Ok(()) => return Ok((answer, buf[..n].to_vec())),
            Err(why) => rejected(why),
        }
    }
}

/// Asks `upstream` over TCP (two-byte length prefix, RFC 1035 4.2.2); an answer that does
/// not answer `query` goes to `rejected` and fails the attempt (one query per connection:
/// nothing else can follow on it).
pub async fn ask_tcp(
    upstream: SocketAddr,
    query: &message::UpstreamQuery,
    wait: Duration,
    rejected: impl Fn(message::Rejected),
) -> io::Result<(Message, Vec<u8>)> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        write_framed(&mut stream, &query.bytes).await?;
        let answer = read_framed(&mut stream)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed"))?;
        let checked = Message::from_vec(&answer)
            .map_err(|_| message::Rejected::Malformed)
            .and_then(|parsed| query.check(&parsed).map(|()| parsed));
        match checked {
            Ok(parsed) => Ok((parsed, answer)),
            Err(why) => {
                rejected(why);
                Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("answer rejected ({})", why.reason()),
                ))
            }
        }
    };
    timeout(wait, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

/// Reads one length-prefixed message; `None` at a clean end of stream.
pub async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Writes one length-prefixed message.
pub async fn write_framed(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 65535 bytes"))?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    stream.write_all(&out).await
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the XDP program's `bpf_ktime_get_ns` reads,
/// so expiries written to the kernel mean the same instant there.
pub fn monotonic_ns() -> u64 {
    // Nanoseconds since boot: positive and far below u64::MAX.
    crate::node::audit::clock_ns(libc::CLOCK_MONOTONIC) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_peers_map_to_lo() {
        assert_eq!(
            interface_for_peer(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9))).as_deref(),
            Some("lo")
        );
    }

    #[tokio::test]
    async fn pktinfo_reports_the_arrival_interface() {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_pktinfo(&std, false).unwrap();
        std.set_nonblocking(true).unwrap();
        let socket = UdpSocket::from_std(std).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client
            .send_to(b"hello", socket.local_addr().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, from, ifindex) = recv_with_ifindex(&socket, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, client.local_addr().unwrap());
        assert_eq!(ifindex.and_then(if_name).as_deref(), Some("lo"));
    }
}
