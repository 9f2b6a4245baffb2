//! Tests that need a kernel feature the host may lack, or a kernel the host is not, so they
//! run inside the VMs of `cargo xtask vmtest` (Debian's 6.1 and 6.12 kernels, which have
//! kTLS, and on 6.1 tc without tcx).
//!
//! Every test here is `#[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]`, so
//! a plain `cargo test` on a host without kTLS skips them, and vmtest runs them with
//! `--include-ignored`. None of them has a skip path of its own: in the VM a missing feature
//! is a failure. Each failure message names the guest's kernel release.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use enforcer::{
    dataplane::{
        Dataplane,
        compile::{self, Limits},
        testrun::run_xdp,
    },
    lab::{BpffsMount, UdpSink, require_root, udp_send},
    node::netlink::if_index,
    policy,
};
use enforcer_common::{Reason, programs};
use etherparse::PacketBuilder;
use integration_tests::{Lab, SERVER_V4, in_sandbox_netns, sa};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// A TLS 1.3 application-data record: outer type 23, legacy version 3.3 (RFC 8446 5.2).
const RECORD_HEADER: [u8; 3] = [0x17, 0x03, 0x03];
/// AES-GCM's tag, and TLS 1.3's inner content-type byte, both inside the record.
const TAG_LEN: usize = 16;
const INNER_TYPE_LEN: usize = 1;

const PLAINTEXT: &[u8] = b"kTLS in the guest kernel: this line travels encrypted over loopback";

/// The guest's `uname -r`, for failure messages.
fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("(osrelease unreadable: {e})"))
}

/// A connected loopback TCP pair `(client, server)`. Reads time out rather than hang if
/// the kernel never delivers (the assertion then fails; no timing is judged).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    (client, server)
}

/// The crypto state both ends of a test connection install: TLS 1.3, AES-GCM-128, record
/// sequence starting at 0. Fixed values: these tests check the kernel's record layer, not
/// a handshake.
fn crypto_info() -> libc::tls12_crypto_info_aes_gcm_128 {
    libc::tls12_crypto_info_aes_gcm_128 {
        info: libc::tls_crypto_info {
            version: libc::TLS_1_3_VERSION,
            cipher_type: libc::TLS_CIPHER_AES_GCM_128,
        },
        iv: *b"ivivivi1",
        key: *b"0123456789abcdef",
        salt: *b"salt",
        rec_seq: [0; 8],
    }
}

/// Attaches the `tls` upper-layer protocol to `socket` and installs [`crypto_info`] for
/// `direction` (`TLS_TX` or `TLS_RX`). Panics with the errno and the kernel release if
/// either step fails: that is what "no kTLS" looks like.
fn enable_ktls(socket: &TcpStream, direction: libc::c_int) {
    let fd = socket.as_raw_fd();
    // The ULP is attached once per socket; a second attach fails with EEXIST.
    let ulp = b"tls";
    // SAFETY: `ulp` outlives the call and its length is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    assert!(
        rc == 0 || err.raw_os_error() == Some(libc::EEXIST),
        "setsockopt(TCP_ULP, \"tls\") on {}: {err} (CONFIG_TLS missing?)",
        kernel()
    );
    let info = crypto_info();
    // SAFETY: `info` is the repr(C) struct the kernel expects for AES-GCM-128, passed with
    // its size; it lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            direction,
            (&raw const info).cast(),
            size_of_val(&info) as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt(SOL_TLS, {}) on {}: {}",
        if direction == libc::TLS_TX {
            "TLS_TX"
        } else {
            "TLS_RX"
        },
        kernel(),
        std::io::Error::last_os_error()
    );
}

/// What the kernel puts on the wire for a kTLS send: one TLS 1.3 record whose header is
/// right and whose body is not the plaintext. A peer without kTLS reads the raw record.
#[test]
#[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
fn ktls_tx_writes_encrypted_records() {
    let (mut tx, mut raw) = tcp_pair();
    enable_ktls(&tx, libc::TLS_TX);
    tx.write_all(PLAINTEXT).unwrap();

    let mut header = [0u8; 5];
    raw.read_exact(&mut header).unwrap();
    let body_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    assert_eq!(
        (&header[..3], body_len),
        (
            &RECORD_HEADER[..],
            PLAINTEXT.len() + INNER_TYPE_LEN + TAG_LEN
        ),
        "record header from {}",
        kernel()
    );
    let mut body = vec![0u8; body_len];
    raw.read_exact(&mut body).unwrap();
    assert!(
        !body.windows(PLAINTEXT.len()).any(|w| w == PLAINTEXT),
        "the record from {} carries the plaintext",
        kernel()
    );
    // One write of this size is one record: nothing else follows it.
    raw.set_nonblocking(true).unwrap();
    let mut more = [0u8; 1];
    assert_eq!(
        raw.read(&mut more).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock),
        "bytes after the record from {}",
        kernel()
    );
}

/// kTLS both ways: what one socket encrypts on send, a socket with the same key decrypts on
/// receive, and the reader gets exactly the plaintext.
#[test]
#[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
fn ktls_rx_decrypts_what_tx_encrypted() {
    let (mut tx, mut rx) = tcp_pair();
    enable_ktls(&tx, libc::TLS_TX);
    enable_ktls(&rx, libc::TLS_RX);
    // Two writes, two records: the receive side keeps the record sequence too.
    tx.write_all(PLAINTEXT).unwrap();
    tx.write_all(b" and a second record").unwrap();
    let want = [PLAINTEXT, b" and a second record"].concat();
    let mut got = vec![0u8; want.len()];
    rx.read_exact(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "plaintext after kTLS TX and RX on {}",
        kernel()
    );
}

/// The enforcer's XDP object loads on the guest kernel (its verifier accepts it) and
/// decides packets there: one allowed and one denied packet through BPF_PROG_TEST_RUN.
/// `packets.rs`, which vmtest runs too, does the whole table.
#[test]
#[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
fn xdp_program_decides_on_the_guest_kernel() {
    if !require_root("xdp_program_decides_on_the_guest_kernel") {
        return;
    }
    const POLICY: &str = r#"
[[agents]]
id = 1
name = "agent"
prefixes = ["10.1.0.2"]
egress_default = "deny"
[[agents.egress]]
action = "allow"
to = ["10.9.0.0/16"]
proto = "tcp"
ports = "443"
"#;
    in_sandbox_netns("vm", || {
        let bpffs = BpffsMount::new().unwrap();
        let limits = Limits {
            max_agents: 8,
            ..Limits::default()
        };
        let policy = policy::parse("vm.toml", POLICY).unwrap();
        let compiled = compile::compile(&policy, &limits, &if_index).unwrap();
        let mut dp = Dataplane::load(bpffs.path(), &limits)
            .unwrap_or_else(|e| panic!("loading the XDP object on {}: {e:?}", kernel()));
        dp.apply(&compiled).unwrap();
        for (port, verdict, reason) in [
            (443, XDP_PASS, Reason::Allowed),
            (80, XDP_DROP, Reason::EgressDenied),
        ] {
            let before = dp.maps().counter(1, reason).unwrap();
            let packet = tcp4("10.1.0.2", "10.9.0.1", port);
            let program = dp.program(programs::ENFORCE).unwrap();
            let result = run_xdp(program, &packet, None, 1).unwrap();
            let after = dp.maps().counter(1, reason).unwrap();
            assert_eq!(
                (result.return_value, after.packets - before.packets),
                (verdict, 1),
                "tcp to port {port} on {}: (verdict, {reason:?} packets)",
                kernel()
            );
        }
    });
}

/// The daemon attaches at tc ingress on the guest kernel (a clsact filter on 6.1, a tcx link
/// on 6.12), enforces real UDP from an agent namespace, and a restart switches the
/// attachment to the new program in place (the filter is replaced, not added twice).
#[test]
#[ignore = "runs in the VM (cargo xtask vmtest): tc attachment on the guest kernel"]
fn tc_hook_enforces_real_traffic_and_survives_a_restart() {
    if !require_root("tc_hook_enforces_real_traffic_and_survives_a_restart") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(
        r#"
[[agents]]
id = 1
name = "agent"
interfaces = ["gwa1"]
egress_default = "deny"
[[agents.egress]]
action = "allow"
to = ["10.200.100.2"]
proto = "udp"
ports = "9000"
"#,
    );
    let release = kernel();
    let mut numbers = release
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let mode = if version >= (6, 6) { "tcx" } else { "clsact" };
    let mut programs_seen = Vec::new();
    for round in ["start", "restart"] {
        lab.start_daemon();
        let hooks = lab.hooks();
        let h = &hooks["gwa1"];
        assert_eq!(
            (h["hook"].as_str(), h["mode"].as_str(), h["ours"].as_bool()),
            (Some("tc"), Some(mode), Some(true)),
            "{round} on {release}: {h}"
        );
        programs_seen.push(h["program_id"].as_u64().unwrap());
        let ok = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9000)).unwrap();
        let no = UdpSink::spawn(&lab.server, sa("0.0.0.0", 9001)).unwrap();
        for (port, sink_count) in [(9000, 10), (9001, 10)] {
            udp_send(
                lab.agent(1),
                sa(SERVER_V4, port),
                None,
                b"x",
                sink_count,
                Duration::from_millis(2),
            )
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(ok.stop().0, 10, "{round} on {release}: allowed datagrams");
        assert_eq!(no.stop().0, 0, "{round} on {release}: denied datagrams");
        lab.stop_daemon(libc::SIGTERM);
    }
    assert_ne!(
        programs_seen[0], programs_seen[1],
        "the restart runs its own program"
    );
}

fn tcp4(src: &str, dst: &str, dport: u16) -> Vec<u8> {
    let src: std::net::Ipv4Addr = src.parse().unwrap();
    let dst: std::net::Ipv4Addr = dst.parse().unwrap();
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(40000, dport, 1, 1024);
    let mut packet = Vec::with_capacity(builder.size(0));
    builder.write(&mut packet, &[]).unwrap();
    packet
}

/// A sockmap (`BPF_MAP_TYPE_SOCKMAP`, one slot, no program), closed on drop.
struct RawSockmap(std::os::fd::OwnedFd);

impl RawSockmap {
    fn new() -> RawSockmap {
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
        let mut attr = [0u32; 32];
        attr[..4].copy_from_slice(&[15 /* BPF_MAP_TYPE_SOCKMAP */, 4, 4, 1]);
        // SAFETY: bpf(2) with a zero-padded attr of the size passed.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0, /* BPF_MAP_CREATE */
                attr.as_ptr(),
                128,
            )
        };
        assert!(
            fd >= 0,
            "creating a sockmap on {}: {}",
            kernel(),
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor that nothing else owns.
        RawSockmap(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
    }

    /// Puts `socket` in slot 0 (`BPF_MAP_UPDATE_ELEM`), or deletes slot 0 when `socket` is
    /// `None` (`BPF_MAP_DELETE_ELEM`), which drops the socket's psock.
    fn set(&self, socket: Option<&TcpStream>) -> std::io::Result<()> {
        let key = 0u32;
        let value = socket.map_or(0, |s| s.as_raw_fd() as u32);
        // map_fd, key pointer, value pointer, flags. Delete takes no value: the kernel
        // refuses an attr with anything set past `key` (EINVAL).
        let attr = [
            self.0.as_raw_fd() as u64,
            (&raw const key) as u64,
            socket.map_or(0, |_| (&raw const value) as u64),
            0,
        ];
        let cmd = if socket.is_some() { 2 } else { 3 };
        // SAFETY: bpf(2) with an attr of the size passed; key and value outlive the call.
        if unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), 32) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// `setsockopt(SOL_TLS, direction)` with [`crypto_info`]; the ULP must be set already.
fn set_keys(socket: &TcpStream, direction: libc::c_int) -> std::io::Result<()> {
    let info = crypto_info();
    // SAFETY: as in `enable_ktls`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TLS,
            direction,
            (&raw const info).cast(),
            size_of_val(&info) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_ulp(socket: &TcpStream) -> std::io::Result<()> {
    // SAFETY: a 3-byte option value with its length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            b"tls".as_ptr().cast(),
            3,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Why the sockmap inspector was removed (ARCHITECTURE.md, "kTLS: the transport kept, the
/// sockmap inspector removed"), pinned down: kTLS keys are refused (EINVAL, both
/// directions) exactly while the socket has a sockmap psock (the `sk_psock(sk)` check at the
/// top of `do_tls_setsockopt_conf`), and accepted on the same socket, ULP already set, once
/// it has left the map; and a socket with the TLS ULP, keys or not, cannot join a sockmap. No order gives a kTLS socket an `sk_msg` program. If a
/// kernel ever changes this, this test fails and the removal deserves another look.
#[test]
#[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
fn ktls_keys_are_refused_exactly_while_the_socket_is_in_a_sockmap() {
    assert!(require_root(
        "ktls_keys_are_refused_exactly_while_the_socket_is_in_a_sockmap"
    ));
    let release = kernel();
    let map = RawSockmap::new();
    let (client, _server) = tcp_pair();
    map.set(Some(&client))
        .unwrap_or_else(|e| panic!("plain socket into the sockmap on {release}: {e}"));
    set_ulp(&client).unwrap_or_else(|e| panic!("TLS ULP on a sockmap socket on {release}: {e}"));
    for direction in [libc::TLS_TX, libc::TLS_RX] {
        let refused = set_keys(&client, direction).expect_err(&format!(
            "{release} accepted kTLS keys ({direction}) on a socket in a sockmap"
        ));
        assert_eq!(
            refused.raw_os_error(),
            Some(libc::EINVAL),
            "{release}: {refused}"
        );
    }
    // Out of the map (the psock goes with it), the same socket takes its keys.
    map.set(None).unwrap();
    set_keys(&client, libc::TLS_TX)
        .unwrap_or_else(|e| panic!("TX keys after leaving the sockmap on {release}: {e}"));

    // The other order: a socket with the ULP, with and without keys, cannot join.
    let (with_keys, _server) = tcp_pair();
    enable_ktls(&with_keys, libc::TLS_TX);
    let (ulp_only, _server) = tcp_pair();
    set_ulp(&ulp_only).unwrap();
    for socket in [&with_keys, &ulp_only] {
        let refused = map
            .set(Some(socket))
            .expect_err(&format!("{release} let a TLS socket into a sockmap"));
        assert_eq!(
            refused.raw_os_error(),
            Some(libc::EINVAL),
            "{release}: {refused}"
        );
    }
}
