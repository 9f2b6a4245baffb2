//! The inspecting proxy on the user-space path (this host's kernel has no kTLS): a real
//! curl in an agent namespace talks HTTPS through the daemon's proxy, explicitly
//! (`--proxy`, CONNECT) and transparently (plain `https://`, redirected by nftables), to
//! a rustls server in the server namespace that reports exactly what it received and
//! sent. The agent trusts the node CA the way a sandbox would (`--cacert`).

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

use enforcer::lab::{self, require_root};
use integration_tests::{Lab, METADATA, PUBLIC, SERVER_V4, https};
use rustls::{
    ServerConfig, ServerConnection, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde_json::Value;

/// The name the agent may reach, and one it may not (both served by the test server).
const ALLOWED: &str = "api.example.test";
const DENIED: &str = "other.example.test";
/// The gateway address of agent 1: its proxy address.
const GATEWAY: &str = "10.200.1.1";
const CONNECT_PORT: u16 = 3128;
const TRANSPARENT_PORT: u16 = 3129;
/// Size of the clean transfers in each direction.
const BIG: usize = 64 << 20;
/// What the server keeps of each request's raw plaintext, to search for markers.
const RAW_KEEP: usize = 1 << 20;

const SECRET_MARKER: &str = "sk-live-";
const MCP_MARKER: &str = r#""method":"tools/call""#;

fn policy() -> String {
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

/// What the server saw on one connection.
#[derive(Clone, Debug, Default)]
struct Seen {
    request_line: String,
    /// The first [`RAW_KEEP`] plaintext bytes received (head and body).
    raw: Vec<u8>,
    /// Body bytes received and their SHA-256 (uploads).
    body_len: u64,
    body_sha: String,
    /// Body bytes sent and their SHA-256 (downloads).
    sent_len: u64,
    sent_sha: String,
    /// Whether the exchange finished.
    complete: bool,
}

/// A small HTTPS server: `POST /upload` answers the SHA-256 of the body, `GET
/// /download/<n>` sends `n` deterministic bytes. Every connection is recorded.
struct HttpsServer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl HttpsServer {
    fn spawn(lab: &Lab, cert: &Path, key: &Path) -> HttpsServer {
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
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

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the record of connection `index` to be complete or failed: the server
    /// finishes writing its record after the client may already have exited.
    fn wait_seen(&self, count: usize) -> Vec<Seen> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.seen();
            if seen.len() >= count {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "the server recorded {} connections, expected {count}",
                seen.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
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

/// The deterministic download content: a xorshift stream (incompressible, so no layer
/// could shortcut it).
fn pattern(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The lab with the daemon running the proxy, the server, and the node CA's file.
struct Setup {
    lab: Lab,
    server: HttpsServer,
    node_ca: PathBuf,
    /// The upstream servers' certificate and key (PEM files).
    upstream_cert: PathBuf,
    upstream_key: PathBuf,
}

fn setup() -> Setup {
    setup_with(1, "", &policy())
}

/// The lab with `agents` agents, `extra` lines in `[inspect]` and `policy`.
fn setup_with(agents: usize, extra: &str, policy: &str) -> Setup {
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
        "\n[inspect]\nlisten = \"0.0.0.0:{CONNECT_PORT}\"\ntransparent_port = {TRANSPARENT_PORT}\nupstream_roots = \"{}\"\n{extra}",
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

/// How curl reaches the server.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `--proxy` to the gateway; the CONNECT carries the server's address, the SNI the name.
    Connect,
    /// Straight to the server's address; the gateway redirects it to the proxy.
    Transparent,
}

impl Setup {
    fn curl(&self, via: Via, name: &str, args: &[&str]) -> Output {
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
                .arg(format!("{name}:443:{SERVER_V4}:443")),
            Via::Transparent => cmd.arg("--resolve").arg(format!("{name}:443:{SERVER_V4}")),
        };
        cmd.args(args).output().unwrap()
    }

    fn metrics(&self) -> String {
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
    fn proxy_records(&self, n: usize) -> Vec<Value> {
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The value of the metric line that starts with `prefix` (labels included).
fn metric(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Clean uploads and downloads of 64 MiB, both ways in, arrive byte-exact.
#[test]
fn clean_large_transfers_are_byte_exact() {
    if !require_root("clean_large_transfers_are_byte_exact") {
        return;
    }
    let s = setup();
    let upload = pattern(BIG + 12345)
        .iter()
        .map(|b| b.wrapping_add(1))
        .collect::<Vec<u8>>();
    let upload_path = s.lab.write_file("up.bin", "");
    fs::write(&upload_path, &upload).unwrap();
    let upload_sha = sha256_hex(&upload);
    let url = |path: &str| format!("https://{ALLOWED}{path}");
    let mut connections = 0;
    for via in [Via::Connect, Via::Transparent] {
        // Up: the server's hash of what it received, and curl shows it.
        let out = s.curl(
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
        connections += 1;
        let seen = s.server.wait_seen(connections);
        let last = &seen[connections - 1];
        assert!(last.complete, "{via:?}: {last:?}");
        assert_eq!(
            (last.body_len, &last.body_sha),
            (upload.len() as u64, &upload_sha)
        );

        // Down: what curl wrote is what the server sent.
        let down_path = s.lab.dir.join(format!("down-{via:?}.bin"));
        let out = s.curl(
            via,
            ALLOWED,
            &[
                "-o",
                down_path.to_str().unwrap(),
                &url(&format!("/download/{BIG}")),
            ],
        );
        assert!(out.status.success(), "{via:?} download: {}", stderr(&out));
        connections += 1;
        let seen = s.server.wait_seen(connections);
        let last = &seen[connections - 1];
        assert!(
            last.complete && last.sent_len == BIG as u64,
            "{via:?}: {last:?}"
        );
        let got = fs::read(&down_path).unwrap();
        assert_eq!(got.len(), BIG, "{via:?}");
        assert_eq!(sha256_hex(&got), last.sent_sha, "{via:?}");
        fs::remove_file(&down_path).unwrap();
    }
    let metrics = s.metrics();
    assert_eq!(
        metric(&metrics, "enforcer_inspect_path{path=\"userspace\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"relayed\"}"
        ),
        Some(4.0),
        "{metrics}"
    );
    // Every plaintext byte went through the proxy: two uploads (with their request
    // heads) up, two downloads (with response heads) down.
    let up = metric(&metrics, "enforcer_inspect_bytes_total{direction=\"up\"}").unwrap();
    let down = metric(&metrics, "enforcer_inspect_bytes_total{direction=\"down\"}").unwrap();
    assert!(up >= 2.0 * upload.len() as f64, "{metrics}");
    assert!(down >= 2.0 * BIG as f64, "{metrics}");
    assert!(
        s.proxy_records(0).is_empty(),
        "clean traffic is not audited"
    );
}

/// A secret is blocked before it reaches the server, a flagged marker passes and is
/// audited, and names outside the policy are refused; both ways in.
#[test]
fn detectors_and_names() {
    if !require_root("detectors_and_names") {
        return;
    }
    let s = setup();
    let url = |path: &str| format!("https://{ALLOWED}{path}");
    // The marker well after the start, so some of the request does reach the server and
    // the proof is that the marker itself never did.
    let mut secret = vec![b'a'; 200_000];
    secret.extend_from_slice(format!("&token={SECRET_MARKER}0123456789abcdef&").as_bytes());
    secret.extend_from_slice(&[b'b'; 5000]);
    let secret_path = s.lab.write_file("secret.txt", "");
    fs::write(&secret_path, &secret).unwrap();
    let mcp = format!(r#"{{"jsonrpc":"2.0","id":1,{MCP_MARKER},"params":{{"name":"x"}}}}"#);
    let mut expected_records = 0;
    for via in [Via::Connect, Via::Transparent] {
        let before = s.server.seen().len();
        let out = s.curl(
            via,
            ALLOWED,
            &[
                "--data-binary",
                &format!("@{}", secret_path.display()),
                &url("/upload"),
            ],
        );
        assert!(
            !out.status.success(),
            "{via:?}: the secret upload must fail"
        );
        // The server saw the connection (the head passed) but never the marker.
        let seen = s.server.wait_seen(before + 1);
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
        expected_records += 1;
        let records = s.proxy_records(expected_records);
        let r = &records[expected_records - 1];
        assert_eq!(r["reason"], "detector_block", "{r}");
        assert_eq!(r["verdict"], "drop", "{r}");
        assert_eq!(r["detail"], "secret-key", "{r}");
        assert_eq!(r["name"], ALLOWED, "{r}");
        assert_eq!(r["agent"], 1, "{r}");
        assert_eq!(r["dst"], format!("{SERVER_V4}:443"), "{r}");

        // Flagged: passes unchanged, audited.
        let out = s.curl(via, ALLOWED, &["--data-binary", &mcp, &url("/upload")]);
        assert!(out.status.success(), "{via:?} mcp: {}", stderr(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            sha256_hex(mcp.as_bytes())
        );
        expected_records += 1;
        let records = s.proxy_records(expected_records);
        let r = &records[expected_records - 1];
        assert_eq!(r["reason"], "detector_flag", "{r}");
        assert_eq!(r["verdict"], "pass", "{r}");
        assert_eq!(r["detail"], "mcp-call", "{r}");
        assert_eq!(r["name"], ALLOWED, "{r}");

        // A name the agent may not reach: refused before any byte reaches the server.
        let before = s.server.seen().len();
        let out = s.curl(via, DENIED, &[&format!("https://{DENIED}/download/10")]);
        // (The CONNECT names the address, so the refusal comes with the SNI.)
        assert!(!out.status.success(), "{via:?}: {DENIED} must be refused");
        expected_records += 1;
        let records = s.proxy_records(expected_records);
        let r = &records[expected_records - 1];
        assert_eq!(r["reason"], "proxy_name_denied", "{r}");
        assert_eq!(r["name"], DENIED, "{r}");
        assert_eq!(
            s.server.seen().len(),
            before,
            "{via:?}: the server was reached"
        );
    }

    // CONNECT with the name itself: refused with a 403 before anything is resolved.
    let out = s
        .lab
        .agent(1)
        .command("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(&s.node_ca)
        .arg("--proxy")
        .arg(format!("http://{GATEWAY}:{CONNECT_PORT}"))
        .arg(format!("https://{DENIED}/"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    let records = s.proxy_records(expected_records + 1);
    let r = &records[expected_records];
    assert_eq!(r["reason"], "proxy_name_denied", "{r}");
    assert_eq!(r["dst"], format!("{DENIED}:443"), "{r}");

    let metrics = s.metrics();
    let m = |labels: &str| metric(&metrics, labels);
    assert_eq!(
        m(
            "enforcer_inspect_detector_hits_total{agent=\"coder\",agent_id=\"1\",detector=\"secret-key\",action=\"block\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        m(
            "enforcer_inspect_detector_hits_total{agent=\"coder\",agent_id=\"1\",detector=\"mcp-call\",action=\"flag\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        m("enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"blocked\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        m(
            "enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"name_denied\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        m("enforcer_inspect_path{path=\"userspace\"}"),
        Some(1.0),
        "{metrics}"
    );

    // In monitor mode the same secret passes, and the would-be block is on record.
    let config = s.lab.config_path();
    let out = s.lab.cli(&[
        "--config",
        config.to_str().unwrap(),
        "mode",
        "coder",
        "monitor",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.curl(
        Via::Transparent,
        ALLOWED,
        &[
            "--data-binary",
            &format!("@{}", secret_path.display()),
            &url("/upload"),
        ],
    );
    assert!(out.status.success(), "monitor mode: {}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex(&secret)
    );
    let records = s.proxy_records(expected_records + 2);
    let r = &records[expected_records + 1];
    assert_eq!(r["reason"], "detector_block", "{r}");
    assert_eq!(r["verdict"], "pass", "{r}");
    assert_eq!(r["detail"], "secret-key", "{r}");

    // The proxy's records are links of the same hash chain as the kernel's.
    let log = s.lab.dir.join("audit.jsonl");
    let out = s.lab.cli(&["audit", "verify", log.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The port of the hyper server that speaks HTTP/2 as well as HTTP/1.1.
const ALT_PORT: u16 = 8443;

/// Messages are searched whole, whatever carries them: over HTTP/2 (curl, and a client
/// that cuts the body into DATA frames inside the marker) and chunked HTTP/1.1 cut the
/// same way, the marker never reaches the server while the same cut without a marker
/// passes byte-exact; and a request naming another host than its connection's is
/// refused with 421 in both versions.
#[test]
fn messages_are_searched_whole_over_http2_and_chunked_http1() {
    if !require_root("messages_are_searched_whole_over_http2_and_chunked_http1") {
        return;
    }
    let policy = policy().replace("ports = \"443\"", "ports = \"443-8443\"");
    let s = setup_with(1, "", &policy);
    let server_addr = SocketAddr::new(SERVER_V4.parse().unwrap(), ALT_PORT);
    let server = https::HttpsServer::spawn(
        https::bind_in(&s.lab.server, server_addr),
        &s.upstream_cert,
        &s.upstream_key,
    );
    let proxy: SocketAddr = format!("{GATEWAY}:{CONNECT_PORT}").parse().unwrap();
    let url = |path: &str| format!("https://{ALLOWED}:{ALT_PORT}{path}");
    let curl = |args: &[&str]| {
        s.lab
            .agent(1)
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "60", "--cacert"])
            .arg(&s.node_ca)
            .arg("--proxy")
            .arg(format!("http://{proxy}"))
            .arg("--connect-to")
            .arg(format!("{ALLOWED}:{ALT_PORT}:{SERVER_V4}:{ALT_PORT}"))
            .args(args)
            .output()
            .unwrap()
    };
    let never_saw_marker = |server: &https::HttpsServer| {
        for r in server.received() {
            assert!(
                !r.body
                    .windows(SECRET_MARKER.len())
                    .any(|w| w == SECRET_MARKER.as_bytes()),
                "the server received the marker: {r:?}"
            );
        }
    };
    let mut records = 0;

    // A clean upload over HTTP/2 arrives byte-exact, and the server spoke HTTP/2.
    let upload = pattern(8 << 20);
    let upload_path = s.lab.write_file("up2.bin", "");
    fs::write(&upload_path, &upload).unwrap();
    let out = curl(&[
        "--http2",
        "--data-binary",
        &format!("@{}", upload_path.display()),
        &url("/upload"),
    ]);
    assert!(out.status.success(), "h2 upload: {}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex(&upload)
    );
    let got = server.wait_received(1);
    assert_eq!(got[0].version, "HTTP/2.0", "{:?}", got[0].headers);
    assert_eq!(got[0].body_len, upload.len() as u64);

    // A marker in an HTTP/2 body from curl: refused, and it never arrived.
    let mut secret = vec![b'a'; 100_000];
    secret.extend_from_slice(format!("{SECRET_MARKER}0123456789abcdef").as_bytes());
    let secret_path = s.lab.write_file("secret2.txt", "");
    fs::write(&secret_path, &secret).unwrap();
    let out = curl(&[
        "--http2",
        "--data-binary",
        &format!("@{}", secret_path.display()),
        &url("/upload"),
    ]);
    assert!(!out.status.success(), "the h2 secret upload must fail");
    never_saw_marker(&server);
    records += 1;
    let r = &s.proxy_records(records)[records - 1];
    assert_eq!(
        (&r["reason"], &r["verdict"], &r["detail"]),
        (
            &"detector_block".into(),
            &"drop".into(),
            &"secret-key".into()
        ),
        "{r}"
    );

    // Cut inside the marker, each piece its own DATA frame or chunk.
    let (head, tail) = SECRET_MARKER.split_at(4);
    let route = https::Route {
        proxy,
        server: server_addr,
        name: ALLOWED,
        ca: &s.node_ca,
    };
    for version in [https::Version::Http2, https::Version::Http1] {
        let pieces = vec![
            format!("token={head}").into_bytes(),
            format!("{tail}0123456789abcdef&rest").into_bytes(),
        ];
        let sent = https::send_frames(s.lab.agent(1), &route, version, "/upload", pieces);
        assert!(
            !matches!(sent, Ok((200, _))),
            "{version:?}: a marker cut across frames passed: {sent:?}"
        );
        never_saw_marker(&server);
        records += 1;
        let r = &s.proxy_records(records)[records - 1];
        assert_eq!(r["detail"], "secret-key", "{version:?}: {r}");
        assert_eq!(r["reason"], "detector_block", "{version:?}: {r}");

        // The same cut without the marker's end passes whole.
        let clean = vec![format!("token={head}").into_bytes(), b"-not-it".to_vec()];
        let expect = sha256_hex(&clean.concat());
        let sent = https::send_frames(s.lab.agent(1), &route, version, "/upload", clean);
        let (status, body) = sent.unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!(status, 200, "{version:?}");
        assert_eq!(String::from_utf8_lossy(&body).trim(), expect, "{version:?}");
    }

    // Another host on this connection: 421 in both versions, nothing reaches the server.
    for version in ["--http2", "--http1.1"] {
        let before = server.received().len();
        let out = curl(&[
            version,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Host: {DENIED}"),
            &url("/download/10"),
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "421",
            "{version}: {}",
            stderr(&out)
        );
        assert_eq!(
            server.received().len(),
            before,
            "{version}: the server was reached"
        );
        records += 1;
        let r = &s.proxy_records(records)[records - 1];
        assert_eq!(r["reason"], "proxy_misdirected", "{version}: {r}");
        assert_eq!(r["verdict"], "drop", "{version}: {r}");
    }
}

/// With `[dlp] catalogue = "block"`, every shipped secret format that blocks by default
/// is stopped in an upload before any byte of it reaches the server, through both ways
/// in; the audit record names the catalogue entry and the audit log never holds the
/// secret. `bearer` flags: its upload passes and is on record.
#[test]
fn catalogue_secrets_are_blocked_and_never_audited() {
    if !require_root("catalogue_secrets_are_blocked_and_never_audited") {
        return;
    }
    use enforcer::{inspect::catalogue::CATALOGUE, policy::DetectorAction};

    let s = setup_with(
        1,
        "",
        &format!("{}\n[dlp]\ncatalogue = \"block\"\n", policy()),
    );
    let url = format!("https://{ALLOWED}/upload");
    let body_file = s.lab.write_file("body.txt", "");
    let mut expected_records = 0;
    for (i, entry) in CATALOGUE
        .iter()
        .filter(|e| e.default_action == DetectorAction::Block)
        .enumerate()
    {
        let via = if i % 2 == 0 {
            Via::Transparent
        } else {
            Via::Connect
        };
        let example = entry.true_examples[0];
        // Where the match starts in the example: at its first anchor.
        let lead = enforcer::policy::regex_shape(entry.regex)
            .unwrap()
            .starts
            .iter()
            .filter_map(|a| example.as_bytes().windows(a.len()).position(|w| w == a))
            .min()
            .unwrap();
        let secret = &example.as_bytes()[lead..];
        let body = format!("BODY-START {example} BODY-END\n");
        fs::write(&body_file, &body).unwrap();
        let before = s.server.seen().len();
        let out = s.curl(
            via,
            ALLOWED,
            &["--data-binary", &format!("@{}", body_file.display()), &url],
        );
        assert!(
            !out.status.success(),
            "{}: the upload must fail ({via:?})",
            entry.name
        );
        let seen = s.server.wait_seen(before + 1);
        let last = &seen[before];
        assert!(!last.complete, "{}: {last:?}", entry.name);
        // What reached the server of the body ends before the secret's first byte.
        let received = last
            .raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| &last.raw[i + 4..])
            .unwrap_or_default();
        let allowed = &body.as_bytes()[.."BODY-START ".len() + lead];
        assert!(
            allowed.starts_with(received),
            "{}: the server received {:?}",
            entry.name,
            String::from_utf8_lossy(received)
        );
        expected_records += 1;
        let records = s.proxy_records(expected_records);
        let r = &records[expected_records - 1];
        assert_eq!(r["reason"], "detector_block", "{}: {r}", entry.name);
        assert_eq!(r["verdict"], "drop", "{r}");
        assert_eq!(r["detail"], entry.name, "{r}");
        let log = fs::read(s.lab.dir.join("audit.jsonl")).unwrap();
        assert!(
            !log.windows(secret.len()).any(|w| w == secret),
            "{}: the audit log holds the secret",
            entry.name
        );
    }

    // bearer flags by default: the upload passes unchanged and is on record.
    let bearer = CATALOGUE.iter().find(|e| e.name == "bearer").unwrap();
    let body = format!("BODY-START {} BODY-END\n", bearer.true_examples[0]);
    fs::write(&body_file, &body).unwrap();
    let out = s.curl(
        Via::Transparent,
        ALLOWED,
        &["--data-binary", &format!("@{}", body_file.display()), &url],
    );
    assert!(out.status.success(), "bearer: {}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex(body.as_bytes())
    );
    let records = s.proxy_records(expected_records + 1);
    let r = &records[expected_records];
    assert_eq!(r["reason"], "detector_flag", "{r}");
    assert_eq!(r["verdict"], "pass", "{r}");
    assert_eq!(r["detail"], "bearer", "{r}");
}

/// The proxy dials only addresses the agent's egress rules allow: a CONNECT to the
/// metadata address (denied by a rule) is a 403, and one to an address no rule allows and
/// the allowed name does not resolve to is closed after the SNI. Both with the allowed
/// server name, both audited and counted, and nothing reaches listeners on either address.
#[test]
fn connect_to_addresses_the_policy_denies_is_refused_despite_an_allowed_name() {
    if !require_root("connect_to_addresses_the_policy_denies_is_refused_despite_an_allowed_name") {
        return;
    }
    let s = setup();
    let listeners: Vec<TcpListener> = [METADATA, PUBLIC]
        .into_iter()
        .map(|ip| {
            let l = lab::in_netns(&s.lab.server, || {
                TcpListener::bind(SocketAddr::new(ip.parse().unwrap(), 443)).unwrap()
            });
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let connect = |to: &str| {
        s.lab
            .agent(1)
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
            .arg(&s.node_ca)
            .arg("--proxy")
            .arg(format!("http://{GATEWAY}:{CONNECT_PORT}"))
            .arg("--connect-to")
            .arg(format!("{ALLOWED}:443:{to}:443"))
            .arg(format!("https://{ALLOWED}/download/10"))
            .output()
            .unwrap()
    };
    // The same request to the allowed address works: the refusals below are the address.
    let out = connect(SERVER_V4);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = connect(METADATA);
    assert!(!out.status.success(), "the metadata address was reached");
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    let records = s.proxy_records(1);
    let r = &records[0];
    assert_eq!(r["reason"], "proxy_egress_denied", "{r}");
    assert_eq!(r["verdict"], "drop", "{r}");
    assert_eq!(r["dst"], format!("{METADATA}:443"), "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("an egress rule denies it"),
        "{r}"
    );

    let out = connect(PUBLIC);
    assert!(!out.status.success(), "{PUBLIC} was reached");
    let records = s.proxy_records(2);
    let r = &records[1];
    assert_eq!(r["reason"], "proxy_egress_denied", "{r}");
    assert_eq!(r["dst"], format!("{PUBLIC}:443"), "{r}");
    assert_eq!(r["name"], ALLOWED, "{r}");

    for (ip, listener) in [METADATA, PUBLIC].into_iter().zip(&listeners) {
        match listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("a connection reached {ip}:443: {other:?}"),
        }
    }
    let metrics = s.metrics();
    assert_eq!(
        metric(
            &metrics,
            "enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"egress_denied\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
}

/// An agent holding `max_connections_per_agent` idle connections has its next one closed
/// at once (counted and audited as `proxy_connection_cap`), while another inspected agent
/// still gets through, and so does the first once it lets a connection go.
#[test]
fn one_agent_at_its_connection_cap_is_refused_while_another_connects() {
    if !require_root("one_agent_at_its_connection_cap_is_refused_while_another_connects") {
        return;
    }
    let policy = format!(
        r#"{}
[[agents]]
id = 2
name = "reviewer"
interfaces = ["gwa2"]
inspect = true
[[agents.egress]]
action = "allow"
to = ["{ALLOWED}", "{SERVER_V4}"]
proto = "tcp"
ports = "443"
[[agents.egress]]
action = "allow"
to = ["10.200.2.1"]
proto = "tcp"
ports = "{CONNECT_PORT}"
"#,
        policy()
    );
    let s = setup_with(2, "max_connections_per_agent = 2\n", &policy);
    let proxy = SocketAddr::new(GATEWAY.parse().unwrap(), CONNECT_PORT);
    let open = move || {
        let tcp = TcpStream::connect(proxy).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp
    };
    // Two idle connections: the proxy waits for their request heads.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| lab::in_netns(s.lab.agent(1), open))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut third = lab::in_netns(s.lab.agent(1), open);
    let mut byte = [0u8; 1];
    match third.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the connection over the cap was not closed at once: {other:?}"),
    }
    let records = s.proxy_records(1);
    let r = &records[0];
    assert_eq!(r["reason"], "proxy_connection_cap", "{r}");
    assert_eq!(r["agent"], 1, "{r}");

    let curl = |agent: usize, gateway: &str| {
        s.lab
            .agent(agent)
            .command("curl")
            .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
            .arg(&s.node_ca)
            .arg("--proxy")
            .arg(format!("http://{gateway}:{CONNECT_PORT}"))
            .arg("--connect-to")
            .arg(format!("{ALLOWED}:443:{SERVER_V4}:443"))
            .arg(format!("https://{ALLOWED}/download/10"))
            .output()
            .unwrap()
    };
    let out = curl(2, "10.200.2.1");
    assert!(out.status.success(), "agent 2: {}", stderr(&out));
    drop(idle);
    thread::sleep(Duration::from_millis(300));
    let out = curl(1, GATEWAY);
    assert!(
        out.status.success(),
        "agent 1 after closing: {}",
        stderr(&out)
    );

    let metrics = s.metrics();
    assert_eq!(
        metric(
            &metrics,
            "enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"cap_refused\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// The redirect lives in the daemon's own nftables table and goes with the daemon; the
/// node CA survives a restart.
#[test]
fn redirect_table_and_ca_lifecycle() {
    if !require_root("redirect_table_and_ca_lifecycle") {
        return;
    }
    let mut s = setup();
    let list = ["nft", "list", "table", "inet", "enforcer_inspect"];
    let table = s.lab.gw.exec(&list).expect("the daemon installs its table");
    assert!(
        table.contains("iifname \"gwa1\"")
            && table.contains(&format!("redirect to :{TRANSPARENT_PORT}")),
        "{table}"
    );
    let key = s.lab.state_dir().join("inspect-ca.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    s.lab.stop_daemon(libc::SIGTERM);
    assert!(
        s.lab.gw.exec(&list).is_err(),
        "the table must go with the daemon"
    );
    s.lab.start_daemon();
    // Ready (status.json names the pid) means the redirect is in place: a sandbox's
    // first connection after a restart must not slip past the proxy.
    assert!(
        s.lab.gw.exec(&list).is_ok(),
        "the daemon reported ready before installing its table"
    );
    let out = s.lab.cli(&[
        "--config",
        s.lab.config_path().to_str().unwrap(),
        "inspect",
        "ca",
    ]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        fs::read_to_string(&s.node_ca).unwrap(),
        "the CA is reused across restarts"
    );
    // And the trust the sandbox was given still works.
    let out = s.curl(
        Via::Transparent,
        ALLOWED,
        &[&format!("https://{ALLOWED}/download/1000")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, pattern(1000));

    // A policy that stops inspecting the agent takes the redirect away: its TLS now
    // reaches the server directly, whose certificate the node CA did not sign.
    let uninspected = s.lab.write_file(
        "uninspected.toml",
        &policy().replace("inspect = true", "inspect = false"),
    );
    let config = s.lab.config_path();
    let out = s.lab.cli(&[
        "--config",
        config.to_str().unwrap(),
        "policy",
        "apply",
        uninspected.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.lab.gw.exec(&list).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the table outlived inspect = false"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let out = s.curl(
        Via::Transparent,
        ALLOWED,
        &[&format!("https://{ALLOWED}/download/1000")],
    );
    // curl's exit code 60: the peer's certificate could not be verified.
    assert_eq!(out.status.code(), Some(60), "{}", stderr(&out));
}
