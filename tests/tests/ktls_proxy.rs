//! The inspecting proxy on kernel TLS, through the real daemon, in the VM (`cargo xtask
//! vmtest`; the host has no CONFIG_TLS): with `record_layer = "ktls"` real curl is
//! byte-exact and inspected over HTTP/1.1 and HTTP/2 ([`daemon`]), and a byte stream has
//! its direction without detectors spliced in the kernel ([`byte_stream`]);
//! `record_layer = "rustls"` is honoured where the kernel has kTLS.

use enforcer::lab::require_root;

/// The proxy through the real daemon on kernel TLS: what the host runs on rustls in
/// inspect.rs, here with the record layer forced to `ktls`, so a kernel that cannot take
/// the connections fails the daemon's start rather than passing on rustls.
mod daemon {
    use std::{fs, net::SocketAddr};

    use enforcer::{inspect::catalogue::CATALOGUE, policy::DetectorAction};
    use integration_tests::{
        SERVER_V4, https,
        proxy_lab::{
            ALLOWED, ALT_PORT, Setup, Via, detector_policy, metric, secret_body, setup_with, stderr,
        },
    };

    use super::*;

    /// Size of each clean transfer: 4 MiB, where the host moves 64. Under TCG a transfer
    /// through the daemon moved about 1.4 MiB/s (6.12, a shared 2-CPU host: curl, the
    /// proxy's two sessions and the server share the VM's one emulated vCPU), so eight of
    /// 64 MiB took six minutes; this file has to stay within a few minutes per kernel in CI.
    const SIZE: usize = 4 << 20;

    /// The inspect tests' policy with the catalogue blocking, and the hyper server's port
    /// open and redirected too (a TLS port), for HTTP/2 both ways in.
    fn policy() -> String {
        format!(
            "[defaults]\ntls_ports = [443, {ALT_PORT}]\n{}\n[dlp]\ncatalogue = \"block\"\n",
            detector_policy().replace("ports = \"443\"", &format!("ports = \"443-{ALT_PORT}\""))
        )
    }

    /// The daemon with `record_layer = layer`, and the HTTP/2 server on [`ALT_PORT`].
    fn setup(layer: &str) -> (Setup, https::HttpsServer) {
        let s = setup_with(1, &format!("record_layer = \"{layer}\"\n"), &policy());
        let server = https::HttpsServer::spawn(
            https::bind_in(
                &s.lab.server,
                SocketAddr::new(SERVER_V4.parse().unwrap(), ALT_PORT),
            ),
            &s.upstream_cert,
            &s.upstream_key,
        );
        (s, server)
    }

    /// The proxy on kernel TLS, through the daemon (one daemon: each start costs most of a
    /// minute under TCG). Clean uploads and downloads of [`SIZE`] over HTTP/1.1 and HTTP/2,
    /// through CONNECT and transparently, arrive byte-exact, every byte through the proxy's
    /// relay, unaudited. The detectors search kernel TLS's plaintext: a request carrying the
    /// block marker is refused with 403 both ways in and the server never receives the
    /// marker, and so is a shipped catalogue secret over HTTP/2. Every connection is counted
    /// as `ktls (kernel)` in the metrics and `enforcer status`, and none as rustls.
    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn ktls_record_layer_through_the_daemon_is_byte_exact_and_inspected() {
        assert!(require_root(
            "ktls_record_layer_through_the_daemon_is_byte_exact_and_inspected"
        ));
        let (s, server) = setup("ktls");
        let h1 = s.clean_transfers(SIZE);
        let h2 = s.clean_transfers_h2(&server, SIZE);
        let mut connections = h1.connections + h2.connections;
        let metrics = s.metrics();
        assert_eq!(
            metric(
                &metrics,
                "enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"relayed\"}"
            ),
            Some(connections as f64),
            "{metrics}"
        );
        let up = metric(&metrics, "enforcer_inspect_bytes_total{direction=\"up\"}").unwrap();
        let down = metric(&metrics, "enforcer_inspect_bytes_total{direction=\"down\"}").unwrap();
        assert!(up >= (h1.up + h2.up) as f64, "{metrics}");
        assert!(down >= (h1.down + h2.down) as f64, "{metrics}");
        assert!(
            s.proxy_records(0).is_empty(),
            "clean traffic is not audited"
        );

        let mut records = 0;
        let secret_path = s.lab.write_file("secret.txt", "");
        fs::write(&secret_path, secret_body()).unwrap();
        for via in [Via::Connect, Via::Transparent] {
            let out = s.assert_secret_upload_blocked(via, &secret_path);
            connections += 1;
            records += 1;
            // The HTTP path answers the block.
            assert!(stderr(&out).contains("403"), "{via:?}: {}", stderr(&out));
            let r = &s.proxy_records(records)[records - 1];
            assert_eq!(
                (&r["reason"], &r["verdict"], &r["detail"]),
                (
                    &"detector_block".into(),
                    &"drop".into(),
                    &"secret-key".into()
                ),
                "{via:?}: {r}"
            );
        }

        // A shipped secret format, over HTTP/2.
        let entry = CATALOGUE
            .iter()
            .find(|e| e.default_action == DetectorAction::Block)
            .unwrap();
        let example = entry.true_examples[0].as_bytes();
        let body_path = s.lab.write_file("catalogue.txt", "");
        fs::write(
            &body_path,
            [b"BODY-START ".as_slice(), example, b" BODY-END\n"].concat(),
        )
        .unwrap();
        let out = s.curl_to(
            Via::Transparent,
            ALLOWED,
            ALT_PORT,
            &[
                "--http2",
                "--data-binary",
                &format!("@{}", body_path.display()),
                &format!("https://{ALLOWED}:{ALT_PORT}/upload"),
            ],
        );
        connections += 1;
        records += 1;
        assert!(!out.status.success(), "{}: passed", entry.name);
        assert!(stderr(&out).contains("403"), "{}", stderr(&out));
        for got in server.received() {
            assert!(
                !got.body.windows(example.len()).any(|w| w == example),
                "{}: the server received the secret",
                entry.name
            );
        }
        let r = &s.proxy_records(records)[records - 1];
        assert_eq!(r["reason"], "detector_block", "{r}");
        assert_eq!(r["detail"], entry.name, "{r}");

        s.assert_record_layer("ktls", "kernel", connections);
        let metrics = s.metrics();
        assert_eq!(
            metric(
                &metrics,
                "enforcer_inspect_detector_hits_total{agent=\"coder\",agent_id=\"1\",detector=\"secret-key\",action=\"block\"}"
            ),
            Some(2.0),
            "{metrics}"
        );
        assert!(
            !fs::read(s.lab.dir.join("audit.jsonl"))
                .unwrap()
                .windows(example.len())
                .any(|w| w == example),
            "the audit log holds the secret"
        );
    }

    /// `record_layer = "rustls"` is honoured where the kernel has kTLS: a byte-exact
    /// transfer, every connection counted as `rustls (configured)`.
    #[test]
    #[ignore = "needs kTLS: runs in the VM (cargo xtask vmtest)"]
    fn rustls_record_layer_is_honoured_where_the_kernel_has_ktls() {
        assert!(require_root(
            "rustls_record_layer_is_honoured_where_the_kernel_has_ktls"
        ));
        let (s, _server) = setup("rustls");
        let moved = s.clean_transfers(SIZE);
        s.assert_record_layer("rustls", "configured", moved.connections);
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
