//! The kTLS hook (`enforcer::inspect::ktls`): the `sk_msg` detectors in the kernel, the "no kTLS"
//! fallback signal, and, in the VM (`cargo xtask vmtest`), real TLS connections spliced in
//! the kernel through kTLS.
//!
//! The host has no CONFIG_TLS, but sockmap and `sk_msg` work on plain TCP sockets, and the
//! verdicts come from the same program and automaton, so the host tests drive the
//! detectors through loopback TCP; the VM tests add kTLS on top.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    mem::size_of,
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
};

use enforcer::{
    inspect::ktls::{Inspector, Ktls, KtlsError, Marker},
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
    assert!(
        got == sent,
        "the receiver got exactly the bytes before the marker"
    );
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
        // kTLS present but not usable with a sockmap (Debian's 6.1 and 6.12).
        Err(KtlsError::NoSockmapKtls { .. }) => assert!(loaded || loadable),
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

// ---------------------------------------------------------------------------------------
// In the VM: real TLS through the kernel splice
// ---------------------------------------------------------------------------------------

mod vm {
    use std::sync::Arc;

    use enforcer::inspect::ktls::{Direction, HandshakeCork, Hit, Ktls, SpliceReport};
    use ring::digest::{Context, SHA256};
    use rustls::{
        ClientConfig, RootCertStore, ServerConfig,
        crypto::ring::default_provider,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    };
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A TLS identity for `name` and a client config trusting it (and only it).
    fn identity(name: &str, extract: bool) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut server = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.enable_secret_extraction = extract;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = extract;
        (Arc::new(server), Arc::new(client))
    }

    /// What one end of the connection received: length, SHA-256, and the first bytes.
    #[derive(Debug)]
    struct Received {
        len: u64,
        digest: Vec<u8>,
        head: Vec<u8>,
        /// The stream ended with an error (reset, missing close_notify) rather than EOF.
        error: Option<String>,
    }

    async fn receive(mut r: impl tokio::io::AsyncRead + Unpin) -> Received {
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let (mut len, mut head, mut error) = (0u64, Vec::new(), None);
        loop {
            match r.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    len += n as u64;
                    if head.len() < 4096 {
                        head.extend_from_slice(&buf[..n.min(4096 - head.len())]);
                    }
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        Received {
            len,
            digest: ctx.finish().as_ref().to_vec(),
            head,
            error,
        }
    }

    /// `len` pseudo-random bytes (xorshift), in chunks; the same seed gives the same bytes.
    fn chunks(seed: u64, len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut x = seed | 1;
        let mut left = len;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let n = left.min(256 * 1024);
            left -= n;
            Some(
                (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect(),
            )
        })
    }

    fn digest_of(parts: impl Iterator<Item = Vec<u8>>) -> Vec<u8> {
        let mut ctx = Context::new(&SHA256);
        parts.for_each(|p| ctx.update(&p));
        ctx.finish().as_ref().to_vec()
    }

    /// Both ends received, without error, exactly the `len` bytes of `chunks` the other end
    /// sent: upstream those of seed `seeds.0`, the agent those of seed `seeds.1`.
    fn assert_exact(server: &Received, agent: &Received, seeds: (u64, u64), len: usize) {
        assert_eq!(server.error, None);
        assert_eq!(agent.error, None);
        assert_eq!(server.len, len as u64);
        assert_eq!(
            server.digest,
            digest_of(chunks(seeds.0, len)),
            "upstream got other bytes"
        );
        assert_eq!(agent.len, len as u64);
        assert_eq!(
            agent.digest,
            digest_of(chunks(seeds.1, len)),
            "agent got other bytes"
        );
    }

    /// Reads exactly `len` bytes (or until EOF or an error).
    async fn receive_exact(r: &mut (impl tokio::io::AsyncRead + Unpin), len: u64) -> Received {
        receive(r.take(len)).await
    }

    /// Agent → proxy (kTLS splice) → server, over loopback. The agent sends `up`, the
    /// server reads that many bytes and answers with `down` and close_notify, the agent
    /// reads to the end and closes. (The agent must not half-close before the proxy hands
    /// the socket over: the kernel only puts ESTABLISHED sockets in a sockmap.) Returns what
    /// the server and the agent received and the splice's report.
    async fn run(
        proxy: Proxy<'_>,
        up: Vec<Vec<u8>>,
        down: Vec<Vec<u8>>,
    ) -> (Received, Received, SpliceReport) {
        let (upstream_server, upstream_client) = identity("upstream.test", true);
        let (proxy_server, agent_client) = identity("proxy.test", true);
        let up_len: u64 = up.iter().map(|c| c.len() as u64).sum();

        let server_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server_listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = server_listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(upstream_server)
                .accept(tcp)
                .await
                .unwrap();
            let mut got = receive_exact(&mut tls, up_len).await;
            if got.error.is_none() && got.len < up_len {
                got.error = Some(format!("EOF after {} bytes", got.len));
            }
            if got.error.is_none() {
                for chunk in down {
                    tls.write_all(&chunk).await.unwrap();
                }
                tls.shutdown().await.unwrap();
                // The agent's close_notify, through the proxy.
                let rest = receive(&mut tls).await;
                assert_eq!(rest.len, 0, "bytes after the request");
            }
            got
        });

        let proxy_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy_listener.local_addr().unwrap();
        let agent = tokio::spawn(async move {
            let tcp = TcpStream::connect(proxy_addr).await.unwrap();
            let tls = TlsConnector::from(agent_client)
                .connect(ServerName::try_from("proxy.test").unwrap(), tcp)
                .await
                .unwrap();
            let (reader, mut writer) = tokio::io::split(tls);
            let reading = tokio::spawn(receive(reader));
            for chunk in up {
                if writer.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let got = reading.await.unwrap();
            let _ = writer.shutdown().await;
            got
        });

        let (agent_tcp, _) = proxy_listener.accept().await.unwrap();
        let upstream_tcp = TcpStream::connect(server_addr).await.unwrap();
        let upstream_name = ServerName::try_from("upstream.test").unwrap();
        let report = if let Proxy::UserSpace = proxy {
            let agent_tls = TlsAcceptor::from(proxy_server)
                .accept(agent_tcp)
                .await
                .unwrap();
            let upstream_tls = TlsConnector::from(upstream_client)
                .connect(upstream_name, upstream_tcp)
                .await
                .unwrap();
            user_space_proxy(agent_tls, upstream_tls).await
        } else {
            let agent_tls = TlsAcceptor::from(proxy_server)
                .accept(HandshakeCork::new(agent_tcp))
                .await
                .unwrap();
            let upstream_tls = TlsConnector::from(upstream_client)
                .connect(upstream_name, HandshakeCork::new(upstream_tcp))
                .await
                .unwrap();
            match proxy {
                Proxy::Inspected(ktls) => ktls.splice(agent_tls, upstream_tls).await.unwrap(),
                _ => enforcer::inspect::ktls::splice_uninspected(agent_tls, upstream_tls)
                    .await
                    .unwrap(),
            }
        };
        (server.await.unwrap(), agent.await.unwrap(), report)
    }

    /// What sits between the agent and the server.
    enum Proxy<'a> {
        /// `Ktls::splice`: kTLS, the sockmap and its detectors.
        Inspected(&'a Ktls),
        /// The kTLS transport alone (`splice_uninspected`).
        Transport,
        /// rustls in user space, copying through an aho-corasick scan of the same markers:
        /// the proxy's fallback path, for the comparison.
        UserSpace,
    }

    /// The user-space path: decrypt, scan (carrying the last bytes so a split marker is
    /// found), re-encrypt, both directions; clean traffic is asserted.
    async fn user_space_proxy(
        agent: tokio_rustls::server::TlsStream<TcpStream>,
        upstream: tokio_rustls::client::TlsStream<TcpStream>,
    ) -> SpliceReport {
        let literals: Vec<Vec<u8>> = markers().into_iter().map(|(m, _)| m.literal).collect();
        let longest = literals.iter().map(Vec::len).max().unwrap();
        let ac = aho_corasick::AhoCorasick::new(&literals).unwrap();
        async fn copy(
            mut from: impl tokio::io::AsyncRead + Unpin,
            mut to: impl tokio::io::AsyncWrite + Unpin,
            ac: &aho_corasick::AhoCorasick,
            longest: usize,
        ) -> u64 {
            let mut buf = vec![0u8; 64 * 1024];
            let mut window = Vec::new();
            let mut total = 0u64;
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                window.extend_from_slice(&buf[..n]);
                assert!(ac.find(&window).is_none(), "a marker in clean traffic");
                let keep = window.len().min(longest - 1);
                window.drain(..window.len() - keep);
                to.write_all(&buf[..n]).await.unwrap();
                total += n as u64;
            }
            let _ = to.shutdown().await;
            total
        }
        let (agent_r, agent_w) = tokio::io::split(agent);
        let (up_r, up_w) = tokio::io::split(upstream);
        let (up_bytes, down_bytes) = tokio::join!(
            copy(agent_r, up_w, &ac, longest),
            copy(up_r, agent_w, &ac, longest)
        );
        SpliceReport {
            up_bytes,
            down_bytes,
            user_space_bytes: up_bytes + down_bytes,
            ..SpliceReport::default()
        }
    }

    /// Throughput of one transfer through the kTLS transport (kernel splice) and through
    /// the user-space path, in one run, printed (no threshold: a measurement, not a check;
    /// the bytes are still checked). Run with `--nocapture` to see it.
    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn zz_bench_ktls_transport_against_user_space_relay() {
        assert!(require_root(
            "zz_bench_ktls_transport_against_user_space_relay"
        ));
        const LEN: usize = 32 << 20;
        let rt = runtime();
        let mut rates = Vec::new();
        for (name, proxy) in [
            ("kTLS splice", Proxy::Transport),
            ("user space", Proxy::UserSpace),
        ] {
            let (up, down) = (chunks(5, LEN).collect(), chunks(6, LEN).collect());
            let start = std::time::Instant::now();
            let (server, agent, report) = rt.block_on(run(proxy, up, down));
            let secs = start.elapsed().as_secs_f64();
            assert_eq!(
                server.digest,
                digest_of(chunks(5, LEN)),
                "{name}: upstream bytes"
            );
            assert_eq!(
                agent.digest,
                digest_of(chunks(6, LEN)),
                "{name}: agent bytes"
            );
            assert_eq!(
                (report.up_bytes, report.down_bytes),
                (LEN as u64, LEN as u64)
            );
            let rate = 2.0 * LEN as f64 / secs / f64::from(1 << 20);
            eprintln!(
                "bench: {name}: {} MiB each way in {secs:.2} s = {rate:.1} MiB/s (client, proxy and server share the VM's one vCPU)",
                LEN >> 20
            );
            rates.push(rate);
        }
        eprintln!(
            "bench: kTLS splice / user space = {:.2} (kernel {})",
            rates[0] / rates[1],
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        );
    }

    /// The loaded hook, or `None` on a kernel that refuses sockmap + kTLS, after checking
    /// that this is the only reason. Every kernel with the "TLS and sockmap are mutually
    /// exclusive" check refuses it (Debian's 6.1 and 6.12 among them; the cause is pinned
    /// by `vm::ktls_keys_are_refused_exactly_while_the_socket_is_in_a_sockmap`), so these
    /// inspected-splice tests only run on a kernel from before that check.
    fn load(test: &str) -> Option<Ktls> {
        let plain: Vec<Marker> = markers().into_iter().map(|(m, _)| m).collect();
        match Ktls::load(&plain, |id| id != MCP) {
            Ok(ktls) => Some(ktls),
            Err(e @ KtlsError::NoSockmapKtls { .. }) => {
                assert!(raw_sockmap_then_ktls().is_err(), "{e}");
                eprintln!("{test}: not run on this kernel: {e}");
                None
            }
            Err(e) => panic!("loading the kTLS hook: {e:?}"),
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The kTLS transport alone (no sockmap, no detectors), on every kernel with kTLS:
    /// rustls's secrets, sequence numbers and cipher in kTLS, session tickets and
    /// close_notify as control records, 64 MiB each way through splice, byte-exact.
    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn ktls_transport_moves_64_mib_each_way_byte_exact() {
        assert!(require_root(
            "ktls_transport_moves_64_mib_each_way_byte_exact"
        ));
        const LEN: usize = 64 << 20;
        let (server, agent, report) = runtime().block_on(run(
            Proxy::Transport,
            chunks(3, LEN).collect(),
            chunks(4, LEN).collect(),
        ));
        assert_exact(&server, &agent, (3, 4), LEN);
        assert_eq!(
            (report.up_bytes, report.down_bytes),
            (LEN as u64, LEN as u64)
        );
        assert_eq!((&report.hit, report.blocked), (&None, false));
        // tokio-rustls's handshake loop reads on while the session wants to read, so the
        // agent's first application record (the cork keeps it whole) may already be
        // decrypted: at most one record per side passes through user space.
        assert!(report.user_space_bytes <= 2 * 16 * 1024, "{report:?}");
    }

    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn clean_traffic_is_byte_exact_both_ways_through_the_kernel() {
        assert!(require_root(
            "clean_traffic_is_byte_exact_both_ways_through_the_kernel"
        ));
        const LEN: usize = 64 << 20;
        let Some(ktls) = load("clean_traffic_is_byte_exact_both_ways_through_the_kernel") else {
            return;
        };
        let (server, agent, report) = runtime().block_on(run(
            Proxy::Inspected(&ktls),
            chunks(1, LEN).collect(),
            chunks(2, LEN).collect(),
        ));
        assert_exact(&server, &agent, (1, 2), LEN);
        // Every byte went through the detectors in the kernel (their counters), none
        // through user space.
        assert_eq!(
            report,
            SpliceReport {
                up_bytes: LEN as u64,
                down_bytes: LEN as u64,
                hit: None,
                blocked: false,
                user_space_bytes: 0,
            }
        );
        let counters = ktls.inspector().counters().unwrap();
        assert!(
            counters
                .iter()
                .all(|(r, n)| *r == InspectReason::Passed || *n == 0),
            "{counters:?}"
        );
    }

    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn a_post_with_a_secret_is_blocked_before_upstream_sees_it() {
        assert!(require_root(
            "a_post_with_a_secret_is_blocked_before_upstream_sees_it"
        ));
        let Some(ktls) = load("a_post_with_a_secret_is_blocked_before_upstream_sees_it") else {
            return;
        };
        let body = br#"{"api_key":"sk-live-4242424242424242"}"#;
        let head = format!(
            "POST /v1/upload HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Headers and body in separate writes, as an HTTP client sends them: the first
        // record passes, the one with the secret is dropped.
        let up = vec![head.as_bytes().to_vec(), body.to_vec()];
        let (server, agent, report) =
            runtime().block_on(run(Proxy::Inspected(&ktls), up, vec![b"ok".to_vec()]));
        assert!(report.blocked, "{report:?}");
        assert_eq!(
            report.hit,
            Some(Hit {
                marker_id: SECRET,
                direction: Direction::Up
            })
        );
        assert_eq!(report.user_space_bytes, 0);
        // Upstream got the headers at most, never the marker, and no clean end.
        assert!(
            server.error.is_some(),
            "upstream saw an orderly end: {server:?}"
        );
        assert!(server.len <= head.len() as u64, "{server:?}");
        assert!(!server.head.windows(8).any(|w| w == b"sk-live-"));
        assert_eq!(&server.head[..], &head.as_bytes()[..server.head.len()]);
        // The agent's connection was reset, not answered.
        assert!(agent.error.is_some() || agent.len == 0, "{agent:?}");
        assert_eq!(ktls.inspector().hits().unwrap().get(&SECRET), Some(&1));
    }

    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn an_mcp_tool_call_is_detected_and_flagged() {
        assert!(require_root("an_mcp_tool_call_is_detected_and_flagged"));
        let Some(ktls) = load("an_mcp_tool_call_is_detected_and_flagged") else {
            return;
        };
        let call = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}"#;
        let reply = br#"{"jsonrpc":"2.0","id":7,"result":{}}"#;
        let (server, agent, report) = runtime().block_on(run(
            Proxy::Inspected(&ktls),
            vec![call.to_vec()],
            vec![reply.to_vec()],
        ));
        assert!(!report.blocked);
        assert_eq!(
            report.hit,
            Some(Hit {
                marker_id: MCP,
                direction: Direction::Up
            })
        );
        // Flag only: both sides got everything.
        assert_eq!(server.head, call);
        assert_eq!(agent.head, reply);
        assert_eq!(report.up_bytes, call.len() as u64);
        assert_eq!(report.down_bytes, reply.len() as u64);
        assert_eq!(ktls.inspector().hits().unwrap().get(&MCP), Some(&1));
    }
}

/// The kernel sequence the splice needs, done by hand with raw syscalls on a loopback
/// socket: into a sockmap (no program), TLS ULP, TX keys. `Err` says which step failed.
fn raw_sockmap_then_ktls() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let (client, _server) = pair();
    let fd = client.as_raw_fd();
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[15 /* BPF_MAP_TYPE_SOCKMAP */, 4, 4, 1]);
    // SAFETY: bpf(2) with a zero-padded attr of the size passed.
    let map = unsafe { libc::syscall(libc::SYS_bpf, 0, create.as_ptr(), 128) };
    if map < 0 {
        return Err(format!(
            "sockmap create: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the map fd is ours.
    let _map = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(map as i32) };
    let (key, value) = (0u32, fd as u32);
    // BPF_MAP_UPDATE_ELEM: map_fd, key pointer, value pointer, flags.
    let update = [
        map as u64,
        (&raw const key) as u64,
        (&raw const value) as u64,
        0,
    ];
    // SAFETY: as above; key and value outlive the call.
    if unsafe { libc::syscall(libc::SYS_bpf, 2, update.as_ptr(), 32) } != 0 {
        return Err(format!(
            "sockmap update: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: setsockopt with valid buffers of the lengths passed.
    if unsafe { libc::setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, b"tls".as_ptr().cast(), 3) } != 0
    {
        return Err(format!("ULP: {}", std::io::Error::last_os_error()));
    }
    let info = libc::tls12_crypto_info_aes_gcm_128 {
        info: libc::tls_crypto_info {
            version: libc::TLS_1_2_VERSION,
            cipher_type: libc::TLS_CIPHER_AES_GCM_128,
        },
        iv: [1; 8],
        key: [2; 16],
        salt: [3; 4],
        rec_seq: [0; 8],
    };
    let len = size_of::<libc::tls12_crypto_info_aes_gcm_128>() as libc::socklen_t;
    // SAFETY: as above.
    if unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TLS,
            libc::TLS_TX,
            (&raw const info).cast(),
            len,
        )
    } != 0
    {
        return Err(format!("TLS_TX: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `Ktls::load` refuses exactly when the kernel refuses the sequence: on Debian's 6.1 and
/// 6.12 it does (TLS_TX on a sockmap socket: EINVAL), and the proxy must then fall back.
#[test]
#[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
fn ktls_load_agrees_with_the_kernel_on_sockmap_and_ktls() {
    assert!(require_root(
        "ktls_load_agrees_with_the_kernel_on_sockmap_and_ktls"
    ));
    let raw = raw_sockmap_then_ktls();
    let plain: Vec<Marker> = markers().into_iter().map(|(m, _)| m).collect();
    let loaded = Ktls::load(&plain, |id| id != MCP);
    eprintln!("kernel: {raw:?}; Ktls::load: {:?}", loaded.as_ref().err());
    match (raw, loaded) {
        (Ok(()), Ok(_)) => {}
        (Err(step), Err(e @ KtlsError::NoSockmapKtls { .. })) => {
            assert!(step.starts_with("TLS_TX"), "{step}");
            assert!(e.to_string().contains("setting kTLS TX keys"), "{e}");
        }
        (raw, loaded) => panic!("kernel says {raw:?}, Ktls::load says {:?}", loaded.err()),
    }
}
