//! The kTLS hook (`enforcer::ktls`): the `sk_msg` detectors in the kernel, the "no kTLS"
//! fallback signal, and, in the VM (`cargo xtask vmtest`), real TLS connections spliced in
//! the kernel through kTLS.
//!
//! The host has no CONFIG_TLS, but sockmap and `sk_msg` work on plain TCP sockets, and the
//! verdicts come from the same program and automaton, so the host tests drive the
//! detectors through loopback TCP; the VM tests add kTLS on top.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
};

use enforcer::{
    ktls::{Inspector, Ktls, KtlsError, Marker},
    lab::require_root,
};
use enforcer_common::inspect::InspectReason;

const SECRET: u32 = 1;
const MCP: u32 = 2;
const KEY: u32 = 3;

fn markers() -> Vec<(Marker, bool)> {
    vec![
        (
            Marker {
                id: SECRET,
                literal: b"sk-live-".to_vec(),
            },
            true,
        ),
        (
            Marker {
                id: MCP,
                literal: br#""method":"tools/call""#.to_vec(),
            },
            false,
        ),
        (
            Marker {
                id: KEY,
                literal: b"-----BEGIN PRIVATE KEY-----".to_vec(),
            },
            true,
        ),
    ]
}

/// A loopback TCP pair: (client, server end).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Reads everything the server end gets until EOF, on a thread.
fn drain(mut server: TcpStream) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut got = Vec::new();
        // A reset after a block still leaves what arrived before it.
        let _ = server.read_to_end(&mut got);
        got
    })
}

fn counter(inspector: &Inspector, reason: InspectReason) -> u64 {
    inspector
        .counters()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == reason)
        .unwrap()
        .1
}

/// Deterministic filler with no marker in it.
fn filler(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"abcdefghij0123456789"[i % 20]).collect()
}

#[test]
fn detectors_block_a_secret_split_across_sends_on_plain_tcp() {
    if !require_root("detectors_block_a_secret_split_across_sends_on_plain_tcp") {
        return;
    }
    let inspector = Inspector::load(&markers()).expect("loading the inspection object");
    let (mut client, server) = pair();
    let reg = inspector
        .register(
            client.as_fd(),
            client.local_addr().unwrap(),
            client.peer_addr().unwrap(),
        )
        .unwrap();
    let reader = drain(server);

    // Clean bytes pass byte-exact, including one 40 KiB write (more than the program scans
    // per run, so the kernel splits it with apply_bytes) and an MCP call (flag only).
    let mut sent = filler(40 * 1024);
    client.write_all(&sent).unwrap();
    let mcp = br#"{"jsonrpc":"2.0","method":"tools/call","id":1}"#;
    client.write_all(mcp).unwrap();
    sent.extend_from_slice(mcp);
    // The secret marker split across two sends: the first half alone is no marker.
    client.write_all(b"token=sk-li").unwrap();
    sent.extend_from_slice(b"token=sk-li");
    let blocked = client.write_all(b"ve-0123456789");
    assert_eq!(
        blocked.as_ref().map_err(std::io::Error::kind),
        Err(ErrorKind::PermissionDenied),
        "the send completing the marker must fail with EACCES"
    );
    // Sticky: nothing more leaves this socket.
    assert_eq!(
        client.write_all(b"harmless").map_err(|e| e.kind()),
        Err(ErrorKind::PermissionDenied)
    );
    let flow = reg.flow().unwrap();
    assert_eq!(reg.hit().unwrap(), Some((SECRET, true)));
    assert_eq!(flow.bytes, sent.len() as u64, "kernel byte counter");
    drop(client);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the receiver got exactly the bytes before the marker");
    assert!(!got.windows(8).any(|w| w == b"sk-live-"));

    let hits = inspector.hits().unwrap();
    assert_eq!(hits.get(&SECRET), Some(&1));
    assert_eq!(hits.get(&MCP), Some(&1));
    assert_eq!(hits.get(&KEY), Some(&0));
    // At least the record that completed the marker; whether the sticky drop of the next
    // send runs the program again is the kernel's choice (tcp_bpf keeps a DROP verdict).
    assert!(counter(&inspector, InspectReason::Blocked) >= 1);
    assert_eq!(counter(&inspector, InspectReason::UnknownFlow), 0);
    assert_eq!(counter(&inspector, InspectReason::PullFailed), 0);
}

#[test]
fn new_markers_apply_to_new_connections() {
    if !require_root("new_markers_apply_to_new_connections") {
        return;
    }
    let inspector = Inspector::load(&markers()).unwrap();
    let replacement = vec![(
        Marker {
            id: 40,
            literal: b"ghp_".to_vec(),
        },
        true,
    )];
    inspector.set_markers(&replacement).unwrap();

    let (mut client, server) = pair();
    let reg = inspector
        .register(
            client.as_fd(),
            client.local_addr().unwrap(),
            client.peer_addr().unwrap(),
        )
        .unwrap();
    let reader = drain(server);
    // The old marker no longer blocks; the new one does.
    client.write_all(b"sk-live-passes-now ").unwrap();
    assert_eq!(
        client.write_all(b"ghp_abc").map_err(|e| e.kind()),
        Err(ErrorKind::PermissionDenied)
    );
    assert_eq!(reg.hit().unwrap(), Some((40, true)));
    drop(client);
    assert_eq!(reader.join().unwrap(), b"sk-live-passes-now ");
    assert_eq!(inspector.hits().unwrap().get(&40), Some(&1));
}

#[test]
fn ktls_load_says_when_the_kernel_has_no_ktls() {
    if !require_root("ktls_load_says_when_the_kernel_has_no_ktls") {
        return;
    }
    let plain: Vec<Marker> = markers().into_iter().map(|(m, _)| m).collect();
    let result = Ktls::load(&plain, |id| id != MCP);
    // Independent evidence of kTLS: the module is loaded or loadable.
    let loaded = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .unwrap_or_default()
        .split_whitespace()
        .any(|u| u == "tls");
    let loadable = std::process::Command::new("modprobe")
        .args(["-n", "tls"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match result {
        Ok(_) => assert!(loaded || loadable, "kTLS claimed on a kernel without it"),
        Err(e @ KtlsError::NoKtls { .. }) => {
            assert!(!loaded, "kTLS refused although the tls ULP is loaded: {e}");
            assert!(
                e.to_string().starts_with("kernel has no kTLS (CONFIG_TLS)"),
                "{e}"
            );
        }
        Err(e) => panic!("unexpected error: {e:?}"),
    }
}
