//! The kTLS transport (`enforcer::inspect::ktls`) in the VM (`cargo xtask vmtest --test
//! ktls`; the host has no CONFIG_TLS), in process: real TLS connections handed to kernel
//! TLS and spliced in the kernel, and the two record layers the proxy can use measured
//! side by side ([`vm`]). The proxy on kernel TLS through the real daemon is
//! `ktls_proxy.rs`, which CI runs on both kernels. (The sockmap inspector these tests once
//! drove is gone: Linux refuses kTLS keys on sockets in a sockmap, as
//! `vm::ktls_keys_are_refused_exactly_while_the_socket_is_in_a_sockmap` records.)

use enforcer::lab::require_root;

mod vm {
    use std::sync::Arc;

    use enforcer::inspect::{
        dlp::DetectorSet,
        ktls::{HandshakeCork, KernelTls, SpliceReport, hand_off, splice_uninspected},
        relay::userspace_relay,
    };
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
        // Both handshakes under the cork, as the proxy does, whatever comes after.
        let mut agent_tls = TlsAcceptor::from(proxy_server)
            .accept(HandshakeCork::new(agent_tcp))
            .await
            .unwrap();
        let mut upstream_tls = TlsConnector::from(upstream_client)
            .connect(upstream_name, HandshakeCork::new(upstream_tcp))
            .await
            .unwrap();
        let report = match proxy {
            Proxy::Transport => splice_uninspected(agent_tls, upstream_tls).await.unwrap(),
            Proxy::Ktls(set) => {
                KernelTls::probe()
                    .unwrap()
                    .admit(&agent_tls, &upstream_tls)
                    .unwrap();
                let (agent, upstream) = hand_off(agent_tls, upstream_tls).await.unwrap();
                relay(agent, upstream, &set).await
            }
            Proxy::Rustls(set) => {
                agent_tls.get_mut().0.uncork();
                upstream_tls.get_mut().0.uncork();
                relay(agent_tls, upstream_tls, &set).await
            }
        };
        (server.await.unwrap(), agent.await.unwrap(), report)
    }

    /// What sits between the agent and the server.
    enum Proxy {
        /// The kTLS transport alone (`splice_uninspected`): no inspection, the ceiling.
        Transport,
        /// The proxy's relay with these detectors over kernel TLS (`hand_off`).
        Ktls(DetectorSet),
        /// The proxy's relay with these detectors over the rustls sessions.
        Rustls(DetectorSet),
    }

    /// The detectors a proxy runs: the shipped catalogue blocking, and literals of the
    /// inspect tests' kind.
    fn detectors() -> DetectorSet {
        let text = r#"
[[detectors]]
name = "secret-key"
literal = "sk-live-"
action = "block"

[[detectors]]
name = "mcp-call"
literal = '"method":"tools/call"'
action = "flag"

[[detectors]]
name = "private-key"
literal = "-----BEGIN PRIVATE KEY-----"
action = "block"

[dlp]
catalogue = "block"
"#;
        let policy = enforcer::policy::parse("bench.toml", text).unwrap();
        DetectorSet::compile(Some(&policy), false).unwrap()
    }

    /// The proxy's user-space relay (`userspace_relay`) between `agent` and `upstream`;
    /// traffic is clean, so a block hit or an error fails the test.
    async fn relay<A, U>(agent: A, upstream: U, set: &DetectorSet) -> SpliceReport
    where
        A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let report =
            userspace_relay(agent, upstream, set.up.clone(), set.down.clone(), |_, _| {}).await;
        assert!(
            report.hit.is_none(),
            "a block hit in clean traffic: {report:?}"
        );
        assert!(report.error.is_none(), "{report:?}");
        SpliceReport {
            up_bytes: report.up_bytes,
            down_bytes: report.down_bytes,
            user_space_bytes: report.up_bytes + report.down_bytes,
        }
    }

    /// Whether the CPU the kernel sees has `flag` (`/proc/cpuinfo`).
    fn cpu_has(cpuinfo: &str, flag: &str) -> bool {
        cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == flag))
    }

    /// The drivers the kernel has for `gcm(aes)` (`/proc/crypto`): `generic-gcm-aesni`
    /// among them means kTLS can use AES-NI.
    fn gcm_drivers() -> Vec<String> {
        std::fs::read_to_string("/proc/crypto")
            .unwrap_or_default()
            .split("\n\n")
            .filter(|block| {
                block
                    .lines()
                    .any(|l| l.starts_with("name") && l.ends_with(": gcm(aes)"))
            })
            .filter_map(|block| {
                block
                    .lines()
                    .find(|l| l.starts_with("driver"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|d| d.trim().to_string())
            })
            .collect()
    }

    /// The two record layers the proxy can use, side by side with the same user-space
    /// work on top (its relay and detectors: the shipped catalogue and three literals):
    /// kernel TLS (`hand_off`) against rustls, and the kernel splice with no inspection as
    /// the ceiling. Each path moves the same bytes each way (checked by SHA-256), three
    /// runs each, interleaved; the median is printed (no threshold: a measurement, not a
    /// check). Run with `--nocapture` to see it.
    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn zz_bench_ktls_against_rustls_record_layer() {
        assert!(require_root("zz_bench_ktls_against_rustls_record_layer"));
        // Small, as this file runs in CI on both kernels: TCG moves a few MiB/s.
        const LEN: usize = 8 << 20;
        const RUNS: usize = 3;
        let rt = runtime();
        let names = [
            "kTLS + relay",
            "rustls + relay",
            "kTLS splice (no inspection)",
        ];
        let mut rates = vec![Vec::new(); names.len()];
        for _ in 0..RUNS {
            for (i, name) in names.iter().enumerate() {
                let proxy = match i {
                    0 => Proxy::Ktls(detectors()),
                    1 => Proxy::Rustls(detectors()),
                    _ => Proxy::Transport,
                };
                let (up, down) = (chunks(5, LEN).collect(), chunks(6, LEN).collect());
                let start = std::time::Instant::now();
                // A stuck path fails with its name instead of holding the VM until its
                // timeout.
                let (server, agent, report) = rt
                    .block_on(async {
                        tokio::time::timeout(
                            std::time::Duration::from_secs(240),
                            run(proxy, up, down),
                        )
                        .await
                    })
                    .unwrap_or_else(|_| panic!("{name}: stuck for 240 s"));
                let secs = start.elapsed().as_secs_f64();
                assert_exact(&server, &agent, (5, 6), LEN);
                assert_eq!(
                    (report.up_bytes, report.down_bytes),
                    (LEN as u64, LEN as u64),
                    "{name}"
                );
                rates[i].push(2.0 * LEN as f64 / secs / f64::from(1 << 20));
            }
        }
        let mut medians = Vec::new();
        for r in &rates {
            let mut sorted = r.clone();
            sorted.sort_by(f64::total_cmp);
            medians.push(sorted[sorted.len() / 2]);
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        eprintln!(
            "bench: kernel {}; cpu aes: {}, pclmulqdq: {}; gcm(aes) drivers: {}",
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim(),
            cpu_has(&cpuinfo, "aes"),
            cpu_has(&cpuinfo, "pclmulqdq"),
            gcm_drivers().join(", ")
        );
        for ((name, rate), all) in names.iter().zip(&medians).zip(&rates) {
            eprintln!(
                "bench: {name}: {rate:.1} MiB/s (median of {RUNS}: {all:.1?}; {} MiB each way)",
                LEN >> 20
            );
        }
        eprintln!(
            "bench: kTLS / rustls (both with the relay) = {:.2}; client, proxy and server share the VM's one vCPU",
            medians[0] / medians[1]
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
