//! The kTLS transport (`enforcer::inspect::ktls`): real TLS connections handed to kernel
//! TLS and spliced in the kernel, in the VM (`cargo xtask vmtest`); the host has no
//! CONFIG_TLS. (The sockmap inspector these tests once drove is gone: Linux refuses kTLS
//! keys on sockets in a sockmap, as
//! `vm::ktls_keys_are_refused_exactly_while_the_socket_is_in_a_sockmap` records.)

use enforcer::lab::require_root;

/// Literals the user-space path of the comparison scans for, as the proxy's detectors do.
const MARKERS: [&[u8]; 3] = [
    b"sk-live-",
    br#""method":"tools/call""#,
    b"-----BEGIN PRIVATE KEY-----",
];

mod vm {
    use std::sync::Arc;

    use enforcer::inspect::ktls::{HandshakeCork, SpliceReport, splice_uninspected};
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

    /// What one end of the connection received: length and SHA-256.
    #[derive(Debug)]
    struct Received {
        len: u64,
        digest: Vec<u8>,
        /// The stream ended with an error (reset, missing close_notify) rather than EOF.
        error: Option<String>,
    }

    async fn receive(mut r: impl tokio::io::AsyncRead + Unpin) -> Received {
        let mut ctx = Context::new(&SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let (mut len, mut error) = (0u64, None);
        loop {
            match r.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    len += n as u64;
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
    /// the socket over: the kernel sets the TLS ULP only on ESTABLISHED sockets.) Returns what
    /// the server and the agent received and the splice's report.
    async fn run(
        proxy: Proxy,
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
            splice_uninspected(agent_tls, upstream_tls).await.unwrap()
        };
        (server.await.unwrap(), agent.await.unwrap(), report)
    }

    /// What sits between the agent and the server.
    enum Proxy {
        /// The kTLS transport alone (`splice_uninspected`).
        Transport,
        /// rustls in user space, copying through an aho-corasick scan of [`MARKERS`]: the
        /// proxy's path, for the comparison.
        UserSpace,
    }

    /// The user-space path: decrypt, scan (carrying the last bytes so a split marker is
    /// found), re-encrypt, both directions; clean traffic is asserted.
    async fn user_space_proxy(
        agent: tokio_rustls::server::TlsStream<TcpStream>,
        upstream: tokio_rustls::client::TlsStream<TcpStream>,
    ) -> SpliceReport {
        let longest = MARKERS.iter().map(|m| m.len()).max().unwrap();
        let ac = aho_corasick::AhoCorasick::new(MARKERS).unwrap();
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

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The kTLS transport alone (no detectors), on every kernel with kTLS: rustls's
    /// secrets, sequence numbers and cipher in kTLS, session tickets and close_notify as
    /// control records, 64 MiB each way through splice, byte-exact.
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
        // tokio-rustls's handshake loop reads on while the session wants to read, so the
        // agent's first application record (the cork keeps it whole) may already be
        // decrypted: at most one record per side passes through user space.
        assert!(report.user_space_bytes <= 2 * 16 * 1024, "{report:?}");
    }
}

/// The proxy's byte-stream relay (what is not HTTP) on kernel TLS, through the real
/// daemon: the direction with detectors is read through `KtlsStream` and searched, the
/// direction without any is spliced in the kernel.
mod byte_stream {
    use std::{
        io::{Read as _, Write as _},
        net::SocketAddr,
        sync::{Arc, Mutex},
        thread,
    };

    use integration_tests::{
        SERVER_V4,
        https::{Route, bind_in, connect_tls, pattern},
        proxy_lab::{
            ALLOWED, CONNECT_PORT, GATEWAY, metric, server_config, setup_with, sha256_hex,
        },
    };
    use rustls::ServerConfig;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Not HTTP: the proxy's sniff sends it to the byte-stream relay.
    const PORT: u16 = 9443;
    const UP: usize = 4 << 20;
    const DOWN: usize = 16 << 20;
    const MARKER: &[u8] = b"sk-live-";

    fn policy() -> String {
        let marker = String::from_utf8_lossy(MARKER);
        format!(
            r#"
[[detectors]]
name = "secret-key"
literal = "{marker}"
action = "block"
direction = "up"

[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
inspect = true
[[agents.egress]]
action = "allow"
to = ["{ALLOWED}"]
proto = "tcp"
ports = "{PORT}"
[[agents.egress]]
action = "allow"
to = ["{SERVER_V4}"]
proto = "tcp"
ports = "{PORT}"
[[agents.egress]]
action = "allow"
to = ["{GATEWAY}"]
proto = "tcp"
ports = "{CONNECT_PORT}"
"#
        )
    }

    /// What the server received on one connection: its bytes (up to the first error).
    type Got = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A TLS server that reads `UP` bytes (or to the end), then sends `DOWN` bytes of
    /// [`pattern`] and close_notify; one thread per connection.
    fn serve(listener: std::net::TcpListener, config: Arc<ServerConfig>) -> Got {
        let got: Got = Arc::default();
        let record = got.clone();
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let (config, record) = (config.clone(), record.clone());
                thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut received = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    while received.len() < UP {
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => received.extend_from_slice(&buf[..n]),
                        }
                    }
                    let complete = received.len() == UP;
                    record.lock().unwrap().push(received);
                    if complete {
                        let _ = tls.write_all(&pattern(DOWN));
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    }
                });
            }
        });
        got
    }

    /// One connection from agent 1: send `up` through the proxy and read to the end.
    fn exchange(s: &integration_tests::proxy_lab::Setup, up: Vec<u8>) -> Result<Vec<u8>, String> {
        let route = Route {
            proxy: SocketAddr::new(GATEWAY.parse().unwrap(), CONNECT_PORT),
            server: SocketAddr::new(SERVER_V4.parse().unwrap(), PORT),
            name: ALLOWED,
            ca: &s.node_ca,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let tls = connect_tls(s.lab.agent(1), &route, Vec::new()).await?;
            let (mut reader, mut writer) = tokio::io::split(tls);
            let reading = async {
                let mut down = Vec::new();
                reader
                    .read_to_end(&mut down)
                    .await
                    .map(|_| down)
                    .map_err(|e| format!("reading: {e}"))
            };
            let writing = async {
                writer.write_all(&up).await.map_err(|e| e.to_string())?;
                writer.flush().await.map_err(|e| e.to_string())
            };
            let (down, written) = tokio::join!(reading, writing);
            written?;
            let down = down?;
            let _ = writer.shutdown().await;
            Ok(down)
        })
    }

    /// Up is searched (a marker in it is blocked before it reaches the server), down is
    /// spliced in the kernel (`enforcer_inspect_spliced_bytes_total` counts exactly it),
    /// and both arrive byte-exact.
    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn a_direction_without_detectors_is_spliced_in_the_kernel() {
        assert!(require_root(
            "a_direction_without_detectors_is_spliced_in_the_kernel"
        ));
        let s = setup_with(1, "record_layer = \"ktls\"", &policy());
        let config = server_config(&s.upstream_cert, &s.upstream_key);
        let listener = bind_in(
            &s.lab.server,
            SocketAddr::new(SERVER_V4.parse().unwrap(), PORT),
        );
        let got = serve(listener, config);

        let sockets = |metrics: &str, direction: &str| {
            metric(
                metrics,
                &format!(
                    "enforcer_inspect_ktls_sockets_total{{direction=\"{direction}\",mode=\"sw\"}}"
                ),
            )
            .unwrap_or_else(|| panic!("no kernel TLS socket count: {metrics}"))
        };
        let before = s.metrics();

        // Binary, not an HTTP request line.
        let mut clean = vec![0u8, 1, 2, 3];
        clean.extend_from_slice(&pattern(UP - 4));
        let down = exchange(&s, clean.clone()).unwrap();
        assert_eq!(down.len(), DOWN);
        assert_eq!(
            sha256_hex(&down),
            sha256_hex(&pattern(DOWN)),
            "agent got other bytes"
        );
        let received = got.lock().unwrap()[0].clone();
        assert_eq!(
            sha256_hex(&received),
            sha256_hex(&clean),
            "server got other bytes"
        );

        let metrics = s.metrics();
        let m = |name: &str| metric(&metrics, name);
        assert_eq!(
            m("enforcer_inspect_record_layer_total{layer=\"ktls\",reason=\"kernel\"}"),
            Some(1.0),
            "{metrics}"
        );
        // The kernel set up both sockets of the connection, both directions, in software.
        for direction in ["tx", "rx"] {
            assert_eq!(
                sockets(&metrics, direction) - sockets(&before, direction),
                2.0,
                "{direction}: {metrics}"
            );
        }
        // Down, and only down, went through the kernel.
        assert_eq!(
            m("enforcer_inspect_spliced_bytes_total"),
            Some(DOWN as f64),
            "{metrics}"
        );
        assert_eq!(
            m("enforcer_inspect_bytes_total{direction=\"up\"}"),
            Some(UP as f64),
            "{metrics}"
        );

        // The marker in the middle of the agent's bytes: the connection is closed and the
        // server never receives it.
        let mut secret = clean.clone();
        secret[UP / 2..UP / 2 + MARKER.len()].copy_from_slice(MARKER);
        let result = exchange(&s, secret);
        assert!(result.is_err(), "a blocked stream ended cleanly");
        let records = s.proxy_records(1);
        let blocked = records.last().unwrap();
        assert_eq!(blocked["reason"], "detector_block", "{blocked}");
        assert_eq!(blocked["verdict"], "drop", "{blocked}");
        assert_eq!(blocked["detail"], "secret-key", "{blocked}");
        let all = got.lock().unwrap();
        assert_eq!(all.len(), 2, "the blocked connection reached the server");
        assert!(
            all[1].len() < UP / 2 + MARKER.len()
                && !all[1].windows(MARKER.len()).any(|w| w == MARKER),
            "the server got {} bytes, the marker among them",
            all[1].len()
        );
    }
}
