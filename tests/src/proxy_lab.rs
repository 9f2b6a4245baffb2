//! The inspecting proxy's lab: the daemon with `[inspect]` on, an HTTPS server in the server
//! namespace that records exactly what it received and sent, the node CA the agent trusts,
//! ways for the agent to reach the server through the proxy, and the checks every record
//! layer must pass (shared by tests/inspect.rs, tests/mcp.rs and tests/ktls.rs).

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use enforcer::lab;
use rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde_json::Value;

pub use crate::https::{hex, pattern};
use crate::{Lab, SERVER_V4};

/// The name the agent may reach (served by the test server).
pub const ALLOWED: &str = "api.example.test";
/// A name the upstream certificate covers but the inspect tests' policy does not allow.
pub const DENIED: &str = "other.example.test";
/// The gateway address of agent 1: its proxy address.
pub const GATEWAY: &str = "10.200.1.1";
/// The proxy's CONNECT port (`[inspect] listen`).
pub const CONNECT_PORT: u16 = 3128;
/// The port nftables redirects the agents' TLS to (`[inspect] transparent_port`).
pub const TRANSPARENT_PORT: u16 = 3129;
/// What the server keeps of each request's raw plaintext, to search for markers.
pub const RAW_KEEP: usize = 1 << 20;
/// The port of the hyper server ([`crate::https::HttpsServer`]) that speaks HTTP/2 as well
/// as HTTP/1.1, beside the recording HTTP/1.1 server on 443.
pub const ALT_PORT: u16 = 8443;

/// The literal [`detector_policy`]'s block detector (`secret-key`) stops.
pub const SECRET_MARKER: &str = "sk-live-";
/// The literal [`detector_policy`]'s flag detector (`mcp-call`) audits.
pub const MCP_MARKER: &str = r#""method":"tools/call""#;

/// The inspect tests' policy: a block detector for [`SECRET_MARKER`], a flag detector for
/// [`MCP_MARKER`], and agent 1 (`coder`, inspected) allowed to [`ALLOWED`] on 443, to the
/// server's address (the transparent way in) and to the proxy (the CONNECT way in).
pub fn detector_policy() -> String {
    format!(
        r#"
[[detectors]]
name = "secret-key"
literal = "{SECRET_MARKER}"
action = "block"

[[detectors]]
name = "mcp-call"
literal = '{MCP_MARKER}'
action = "flag"

[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
inspect = true
[[agents.egress]]
action = "deny"
to = ["@metadata"]
[[agents.egress]]
action = "allow"
to = ["{ALLOWED}"]
proto = "tcp"
ports = "443"
# The packets themselves: to the server's address (transparent mode) and to the
# proxy on the gateway (CONNECT mode).
[[agents.egress]]
action = "allow"
to = ["{SERVER_V4}"]
proto = "tcp"
ports = "443"
[[agents.egress]]
action = "allow"
to = ["{GATEWAY}"]
proto = "tcp"
ports = "{CONNECT_PORT}"
"#
    )
}

/// A body with [`SECRET_MARKER`] well after its start, so some of the request does reach
/// the server and the proof of a block is that the marker itself never did.
pub fn secret_body() -> Vec<u8> {
    let mut secret = vec![b'a'; 200_000];
    secret.extend_from_slice(format!("&token={SECRET_MARKER}0123456789abcdef&").as_bytes());
    secret.extend_from_slice(&[b'b'; 5000]);
    secret
}

/// What a command wrote to stderr, for assertion messages.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the server saw on one connection.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The request line (`POST /upload HTTP/1.1`).
    pub request_line: String,
    /// The first [`RAW_KEEP`] plaintext bytes received (head and body).
    pub raw: Vec<u8>,
    /// Body bytes received and their SHA-256 (uploads).
    pub body_len: u64,
    /// SHA-256 of the body received, hex.
    pub body_sha: String,
    /// Body bytes sent and their SHA-256 (downloads).
    pub sent_len: u64,
    /// SHA-256 of the body sent, hex.
    pub sent_sha: String,
    /// Whether the exchange finished.
    pub complete: bool,
}

/// A small HTTPS server: `POST /upload` answers the SHA-256 of the body, `GET
/// /download/<n>` sends `n` deterministic bytes. Every connection is recorded.
pub struct HttpsServer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl HttpsServer {
    /// Serves on port 443 of the server address, in the lab's server namespace.
    pub fn spawn(lab: &Lab, cert: &Path, key: &Path) -> HttpsServer {
        let config = server_config(cert, key);
        // The socket is created in the server namespace and stays there; the threads
        // serving it can run anywhere.
        let listener = lab::in_netns(&lab.server, || {
            TcpListener::bind(SocketAddr::new(SERVER_V4.parse().unwrap(), 443)).unwrap()
        });
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let accept = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        tcp.set_nonblocking(false).unwrap();
                        let (config, seen) = (config.clone(), seen2.clone());
                        thread::spawn(move || serve_one(config, tcp, &seen));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        HttpsServer {
            stop,
            seen,
            accept: Some(accept),
        }
    }

    /// The connections recorded so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the record of connection `index` to be complete or failed: the server
    /// finishes writing its record after the client may already have exited.
    pub fn wait_seen(&self, count: usize) -> Vec<Seen> {
        crate::https::wait_count("connections", count, || self.seen())
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A rustls server config serving the PEM certificate chain `cert` with the PEM `key`.
pub fn server_config(cert: &Path, key: &Path) -> Arc<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    Arc::new(
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
}

/// SHA-256 of `bytes`, hex, as the audit records write it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    enforcer::node::audit::sha256_hex(bytes)
}

/// Serves one request and records it (also when the connection breaks in the middle).
fn serve_one(config: Arc<ServerConfig>, tcp: TcpStream, seen: &Mutex<Vec<Seen>>) {
    let mut record = Seen::default();
    let _ = exchange(config, tcp, &mut record);
    seen.lock().unwrap().push(record);
}

fn keep(record: &mut Seen, bytes: &[u8]) {
    let room = RAW_KEEP.saturating_sub(record.raw.len());
    record
        .raw
        .extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn exchange(config: Arc<ServerConfig>, tcp: TcpStream, record: &mut Seen) -> io::Result<()> {
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = StreamOwned::new(
        ServerConnection::new(config).map_err(io::Error::other)?,
        tcp,
    );
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        keep(record, &buf[..n]);
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).to_string();
    record.request_line = text.lines().next().unwrap_or_default().to_string();
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut parts = record.request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "POST" && path == "/upload" {
        let length: u64 = header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other("no content-length"))?;
        if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            tls.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let first = &head[body_start..];
        hash.update(first);
        record.body_len = first.len() as u64;
        while record.body_len < length {
            let n = tls.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            keep(record, &buf[..n]);
            hash.update(&buf[..n]);
            record.body_len += n as u64;
        }
        record.body_sha = hex(hash.finish().as_ref());
        let body = format!("{}\n", record.body_sha);
        write!(
            tls,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
    } else if method == "GET"
        && let Some(n) = path.strip_prefix("/download/")
    {
        let n: usize = n.parse().map_err(io::Error::other)?;
        let body = pattern(n);
        write!(
            tls,
            "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        )?;
        for chunk in body.chunks(256 * 1024) {
            tls.write_all(chunk)?;
        }
        record.sent_len = n as u64;
        record.sent_sha = sha256_hex(&body);
    } else {
        tls.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    record.complete = true;
    Ok(())
}

/// The lab with the daemon running the proxy, the server, and the node CA's file.
pub struct Setup {
    /// The lab; the daemon runs in its gateway namespace.
    pub lab: Lab,
    /// The upstream server on port 443.
    pub server: HttpsServer,
    /// The node CA certificate the agent trusts (PEM file).
    pub node_ca: PathBuf,
    /// The upstream servers' certificate and key (PEM files).
    pub upstream_cert: PathBuf,
    /// The upstream servers' key (PEM file).
    pub upstream_key: PathBuf,
}

/// The lab with `agents` agents, `extra` lines in `[inspect]` and `policy`. Without a
/// `record_layer` in `extra` the lab sets `auto`, so the probe and its fallback are what
/// the tests exercise ([`auto_layer`]).
pub fn setup_with(agents: usize, extra: &str, policy: &str) -> Setup {
    let auto = if extra.contains("record_layer") {
        ""
    } else {
        "record_layer = \"auto\"\n"
    };
    let mut lab = Lab::new(agents);
    let upstream =
        enforcer::controlplane::certs::generate(&lab.dir.join("upstream"), &[ALLOWED, DENIED], &[])
            .unwrap();
    let mut config = fs::OpenOptions::new()
        .append(true)
        .open(lab.config_path())
        .unwrap();
    write!(
        config,
        "\n[inspect]\nlisten = \"0.0.0.0:{CONNECT_PORT}\"\ntransparent_port = {TRANSPARENT_PORT}\nupstream_roots = \"{}\"\n{auto}{extra}",
        upstream.ca.cert.display()
    )
    .unwrap();
    drop(config);
    lab.write_policy(policy);
    let server = HttpsServer::spawn(&lab, &upstream.server.cert, &upstream.server.key);
    lab.start_daemon();
    // What an operator does to provision a sandbox's trust.
    let out = lab.cli(&[
        "--config",
        lab.config_path().to_str().unwrap(),
        "inspect",
        "ca",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let node_ca = lab.write_file("node-ca.pem", &pem);
    Setup {
        lab,
        server,
        node_ca,
        upstream_cert: upstream.server.cert.clone(),
        upstream_key: upstream.server.key.clone(),
    }
}

/// What [`Setup::clean_transfers`] moved through the proxy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moved {
    /// Connections made (one per transfer).
    pub connections: usize,
    /// Body bytes uploaded, all of them checked at the server.
    pub up: u64,
    /// Body bytes downloaded, all of them checked at the agent.
    pub down: u64,
}

/// How curl reaches the server.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    /// `--proxy` to the gateway; the CONNECT carries the server's address, the SNI the name.
    Connect,
    /// Straight to the server's address; the gateway redirects it to the proxy.
    Transparent,
}

impl Setup {
    /// curl in agent 1 through the CONNECT proxy to `name:port`, which CONNECT sends to
    /// the address `to` (`--connect-to`), with `args` (the URL among them).
    pub fn curl_connect(&self, name: &str, port: u16, to: &str, args: &[&str]) -> Output {
        self.lab
            .agent(1)
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "60", "--cacert"])
            .arg(&self.node_ca)
            .arg("--proxy")
            .arg(format!("http://{GATEWAY}:{CONNECT_PORT}"))
            .arg("--connect-to")
            .arg(format!("{name}:{port}:{to}:{port}"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs curl in agent 1 to `name` (port 443) with `args`: HTTPS trusting the node CA,
    /// `--fail`, reaching the server `via` the proxy's CONNECT or transparent way in.
    pub fn curl(&self, via: Via, name: &str, args: &[&str]) -> Output {
        self.curl_to(via, name, 443, args)
    }

    /// [`Setup::curl`] to `name:port` (the server's address, that port); the transparent
    /// way in needs `port` among the policy's `defaults.tls_ports`.
    pub fn curl_to(&self, via: Via, name: &str, port: u16, args: &[&str]) -> Output {
        let mut cmd = self.lab.agent(1).command("curl");
        cmd.args(["-sS", "--fail", "--max-time", "120", "--cacert"])
            .arg(&self.node_ca)
            // No 1 s wait for a 100 Continue on big uploads.
            .args(["-H", "Expect:"]);
        match via {
            Via::Connect => cmd
                .arg("--proxy")
                .arg(format!("http://{GATEWAY}:{CONNECT_PORT}"))
                .arg("--connect-to")
                .arg(format!("{name}:{port}:{SERVER_V4}:{port}")),
            Via::Transparent => cmd
                .arg("--resolve")
                .arg(format!("{name}:{port}:{SERVER_V4}")),
        };
        cmd.args(args).output().unwrap()
    }

    /// Clean HTTP/1.1 uploads of `size + 12345` bytes and downloads of `size` bytes through
    /// the recording server on 443, both ways in, each checked byte-exact: the upload's
    /// SHA-256 as the server computed it (curl shows it), the download's as curl wrote it
    /// against what the server sent. Four connections.
    pub fn clean_transfers(&self, size: usize) -> Moved {
        let upload = pattern(size + 12345)
            .iter()
            .map(|b| b.wrapping_add(1))
            .collect::<Vec<u8>>();
        let upload_path = self.lab.write_file("up.bin", "");
        fs::write(&upload_path, &upload).unwrap();
        let upload_sha = sha256_hex(&upload);
        let url = |path: &str| format!("https://{ALLOWED}{path}");
        let mut moved = Moved::default();
        for via in [Via::Connect, Via::Transparent] {
            // Up: the server's hash of what it received, and curl shows it.
            let out = self.curl(
                via,
                ALLOWED,
                &[
                    "--data-binary",
                    &format!("@{}", upload_path.display()),
                    &url("/upload"),
                ],
            );
            assert!(out.status.success(), "{via:?} upload: {}", stderr(&out));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                upload_sha,
                "{via:?}"
            );
            moved.connections += 1;
            let seen = self.server.wait_seen(moved.connections);
            let last = &seen[moved.connections - 1];
            assert!(last.complete, "{via:?}: {last:?}");
            assert_eq!(
                (last.body_len, &last.body_sha),
                (upload.len() as u64, &upload_sha)
            );
            moved.up += upload.len() as u64;

            // Down: what curl wrote is what the server sent.
            let down_path = self.lab.dir.join(format!("down-{via:?}.bin"));
            let out = self.curl(
                via,
                ALLOWED,
                &[
                    "-o",
                    down_path.to_str().unwrap(),
                    &url(&format!("/download/{size}")),
                ],
            );
            assert!(out.status.success(), "{via:?} download: {}", stderr(&out));
            moved.connections += 1;
            let seen = self.server.wait_seen(moved.connections);
            let last = &seen[moved.connections - 1];
            assert!(
                last.complete && last.sent_len == size as u64,
                "{via:?}: {last:?}"
            );
            let got = fs::read(&down_path).unwrap();
            assert_eq!(got.len(), size, "{via:?}");
            assert_eq!(sha256_hex(&got), last.sent_sha, "{via:?}");
            fs::remove_file(&down_path).unwrap();
            moved.down += size as u64;
        }
        fs::remove_file(&upload_path).unwrap();
        moved
    }

    /// [`Setup::clean_transfers`] over HTTP/2 (`--http2`) to `server`, the hyper server on
    /// [`ALT_PORT`]: each upload arrives whole as an HTTP/2 request with the SHA-256 sent,
    /// each download is [`pattern`]`(size)`. Both ways in; the transparent one needs
    /// [`ALT_PORT`] among the policy's `defaults.tls_ports`. Four connections.
    pub fn clean_transfers_h2(&self, server: &crate::https::HttpsServer, size: usize) -> Moved {
        let upload = pattern(size + 4321)
            .iter()
            .map(|b| b.wrapping_add(2))
            .collect::<Vec<u8>>();
        let upload_path = self.lab.write_file("up-h2.bin", "");
        fs::write(&upload_path, &upload).unwrap();
        let upload_sha = sha256_hex(&upload);
        let download_sha = sha256_hex(&pattern(size));
        let url = |path: &str| format!("https://{ALLOWED}:{ALT_PORT}{path}");
        let mut moved = Moved::default();
        for via in [Via::Connect, Via::Transparent] {
            let before = server.received().len();
            let out = self.curl_to(
                via,
                ALLOWED,
                ALT_PORT,
                &[
                    "--http2",
                    "--data-binary",
                    &format!("@{}", upload_path.display()),
                    &url("/upload"),
                ],
            );
            assert!(out.status.success(), "{via:?} h2 upload: {}", stderr(&out));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                upload_sha,
                "{via:?}"
            );
            let got = server.wait_received(before + 1);
            let last = &got[before];
            assert_eq!(last.version, "HTTP/2.0", "{via:?}: {:?}", last.headers);
            assert!(last.complete, "{via:?}");
            assert_eq!(
                (last.body_len, &last.body_sha),
                (upload.len() as u64, &upload_sha)
            );
            moved.connections += 1;
            moved.up += upload.len() as u64;

            let down_path = self.lab.dir.join(format!("down-h2-{via:?}.bin"));
            let out = self.curl_to(
                via,
                ALLOWED,
                ALT_PORT,
                &[
                    "--http2",
                    "-o",
                    down_path.to_str().unwrap(),
                    &url(&format!("/download/{size}")),
                ],
            );
            assert!(
                out.status.success(),
                "{via:?} h2 download: {}",
                stderr(&out)
            );
            let got = server.wait_received(before + 2);
            assert_eq!(got[before + 1].version, "HTTP/2.0", "{via:?}");
            let got = fs::read(&down_path).unwrap();
            assert_eq!(got.len(), size, "{via:?}");
            assert_eq!(sha256_hex(&got), download_sha, "{via:?}");
            fs::remove_file(&down_path).unwrap();
            moved.connections += 1;
            moved.down += size as u64;
        }
        fs::remove_file(&upload_path).unwrap();
        moved
    }

    /// Uploads the file `body` (holding [`SECRET_MARKER`] well after its start, as
    /// [`secret_body`] writes it) `via` the proxy and checks the block: curl fails, the
    /// server saw the request's head but not the whole request, and no request it received
    /// holds the marker. Returns curl's output.
    pub fn assert_secret_upload_blocked(&self, via: Via, body: &Path) -> Output {
        let before = self.server.seen().len();
        let out = self.curl(
            via,
            ALLOWED,
            &[
                "--data-binary",
                &format!("@{}", body.display()),
                &format!("https://{ALLOWED}/upload"),
            ],
        );
        assert!(
            !out.status.success(),
            "{via:?}: the secret upload must fail"
        );
        // The server saw the connection (the head passed) but never the marker.
        let seen = self.server.wait_seen(before + 1);
        let last = &seen[before];
        assert!(!last.complete, "{via:?}: {last:?}");
        assert_eq!(last.request_line, "POST /upload HTTP/1.1", "{via:?}");
        for record in &seen {
            assert!(
                !record
                    .raw
                    .windows(SECRET_MARKER.len())
                    .any(|w| w == SECRET_MARKER.as_bytes()),
                "{via:?}: the server received the marker"
            );
        }
        out
    }

    /// Every one of `connections` proxied connections took the record layer `layer` for
    /// `reason`, and the daemon says so everywhere: `enforcer_inspect_path` names `layer`
    /// alone, `enforcer_inspect_record_layer_total` counts them under `(layer, reason)` and
    /// nothing else, and `enforcer status` shows the same.
    pub fn assert_record_layer(&self, layer: &str, reason: &str, connections: usize) {
        let metrics = self.metrics();
        let lines = |prefix: &str| -> Vec<&str> {
            metrics.lines().filter(|l| l.starts_with(prefix)).collect()
        };
        assert_eq!(
            lines("enforcer_inspect_path{"),
            [format!("enforcer_inspect_path{{path=\"{layer}\"}} 1")],
            "{metrics}"
        );
        assert_eq!(
            lines("enforcer_inspect_record_layer_total{"),
            [format!(
                "enforcer_inspect_record_layer_total{{layer=\"{layer}\",reason=\"{reason}\"}} {connections}"
            )],
            "{metrics}"
        );
        let out = self.lab.cli(&[
            "--config",
            self.lab.config_path().to_str().unwrap(),
            "status",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let status = String::from_utf8_lossy(&out.stdout);
        let line = status
            .lines()
            .find(|l| l.starts_with("inspect     record layer "))
            .unwrap_or_else(|| panic!("no record layer line: {status}"));
        assert!(
            line.starts_with(&format!("inspect     record layer {layer}: "))
                && line.ends_with(&format!("; connections: {connections} {layer} ({reason})")),
            "{status}"
        );
    }

    /// The daemon's metrics page.
    pub fn metrics(&self) -> String {
        let out = self
            .lab
            .gw
            .command("curl")
            .args(["-sS", "http://127.0.0.1:9464/metrics"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Audit records from the proxy, waiting until there are at least `n`.
    pub fn proxy_records(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let records: Vec<Value> = fs::read_to_string(self.lab.dir.join("audit.jsonl"))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|r| r["source"] == "proxy")
                .collect();
            if records.len() >= n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "{} proxy audit records, expected {n}",
                records.len()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The record layer the proxy gives connections on this kernel with `record_layer =
/// "auto"`, as the `path` of `enforcer_inspect_path` and the `(layer, reason)` of
/// `enforcer_inspect_record_layer_total`: kernel TLS exactly where the probe finds it.
pub fn auto_layer() -> (&'static str, &'static str) {
    match enforcer::inspect::ktls::KernelTls::probe() {
        Ok(_) => ("ktls", "kernel"),
        Err(_) => ("rustls", "no_ktls"),
    }
}

/// The value of the metric line that starts with `prefix` (labels included).
pub fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
