//! The inspecting proxy with `record_layer = "auto"`: rustls on this host, whose kernel
//! has no kTLS, and kernel TLS where the kernel has it (`proxy_lab::auto_layer`; the VM
//! runs the same checks under kernel TLS in `ktls.rs`). A real curl in an agent namespace talks HTTPS through the daemon's proxy, explicitly
//! (`--proxy`, CONNECT) and transparently (plain `https://`, redirected by nftables), to
//! a rustls server in the server namespace that reports exactly what it received and
//! sent. The agent trusts the node CA the way a sandbox would (`--cacert`).

use std::{
    fs,
    io::{self, Read as _},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use enforcer::lab::{self, require_root};
use integration_tests::{
    METADATA, PUBLIC, SERVER_V4, https,
    proxy_lab::{
        ALLOWED, ALT_PORT, CONNECT_PORT, DENIED, GATEWAY, MCP_MARKER, SECRET_MARKER, Setup,
        TRANSPARENT_PORT, Via, auto_layer, detector_policy, metric, pattern, secret_body,
        setup_with, sha256_hex, stderr,
    },
};

/// Size of the clean transfers in each direction.
const BIG: usize = 64 << 20;

fn setup() -> Setup {
    setup_with(1, "", &detector_policy())
}

/// Clean uploads and downloads of 64 MiB, both ways in, arrive byte-exact, on the record
/// layer this kernel gives.
#[test]
fn clean_large_transfers_are_byte_exact() {
    if !require_root("clean_large_transfers_are_byte_exact") {
        return;
    }
    let s = setup();
    let moved = s.clean_transfers(BIG);
    let (layer, reason) = auto_layer();
    s.assert_record_layer(layer, reason, moved.connections);
    let metrics = s.metrics();
    assert_eq!(
        metric(
            &metrics,
            "enforcer_inspect_connections_total{agent=\"coder\",agent_id=\"1\",result=\"relayed\"}"
        ),
        Some(moved.connections as f64),
        "{metrics}"
    );
    // Every plaintext byte went through the proxy: the uploads (with their request
    // heads) up, the downloads (with response heads) down.
    let up = metric(&metrics, "enforcer_inspect_bytes_total{direction=\"up\"}").unwrap();
    let down = metric(&metrics, "enforcer_inspect_bytes_total{direction=\"down\"}").unwrap();
    assert!(up >= moved.up as f64, "{metrics}");
    assert!(down >= moved.down as f64, "{metrics}");
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
    let secret = secret_body();
    let secret_path = s.lab.write_file("secret.txt", "");
    fs::write(&secret_path, &secret).unwrap();
    let mcp = format!(r#"{{"jsonrpc":"2.0","id":1,{MCP_MARKER},"params":{{"name":"x"}}}}"#);
    let mut expected_records = 0;
    for via in [Via::Connect, Via::Transparent] {
        s.assert_secret_upload_blocked(via, &secret_path);
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
        m(&format!(
            "enforcer_inspect_path{{path=\"{}\"}}",
            auto_layer().0
        )),
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
    let policy = detector_policy().replace("ports = \"443\"", "ports = \"443-8443\"");
    let s = setup_with(1, "", &policy);
    let server_addr = SocketAddr::new(SERVER_V4.parse().unwrap(), ALT_PORT);
    let server = https::HttpsServer::spawn(
        https::bind_in(&s.lab.server, server_addr),
        &s.upstream_cert,
        &s.upstream_key,
    );
    let proxy: SocketAddr = format!("{GATEWAY}:{CONNECT_PORT}").parse().unwrap();
    let url = |path: &str| format!("https://{ALLOWED}:{ALT_PORT}{path}");
    let curl = |args: &[&str]| s.curl_connect(ALLOWED, ALT_PORT, SERVER_V4, args);
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
        let sent = https::send_frames(s.lab.agent(1), &route, version, "/upload", &[], pieces);
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
        let sent = https::send_frames(s.lab.agent(1), &route, version, "/upload", &[], clean);
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
        &format!("{}\n[dlp]\ncatalogue = \"block\"\n", detector_policy()),
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

/// One way to send a body: its name, extra headers and pieces.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Vec<Vec<u8>>);

/// Every blocking catalogue secret is stopped in both HTTP versions when its body is cut
/// inside the secret into two DATA frames or chunks, and when the body is gzip'd and sent
/// in 7-byte pieces: the server never receives the secret, decoded or not, and each stop
/// is audited with the entry's name.
#[test]
fn catalogue_secrets_are_blocked_cut_across_frames_and_gzipped() {
    if !require_root("catalogue_secrets_are_blocked_cut_across_frames_and_gzipped") {
        return;
    }
    use std::io::Write as _;

    use enforcer::{inspect::catalogue::CATALOGUE, policy::DetectorAction};

    let policy = format!(
        "{}\n[dlp]\ncatalogue = \"block\"\n",
        detector_policy().replace("ports = \"443\"", "ports = \"443-8443\"")
    );
    let s = setup_with(1, "", &policy);
    let server_addr = SocketAddr::new(SERVER_V4.parse().unwrap(), ALT_PORT);
    let server = https::HttpsServer::spawn(
        https::bind_in(&s.lab.server, server_addr),
        &s.upstream_cert,
        &s.upstream_key,
    );
    let route = https::Route {
        proxy: format!("{GATEWAY}:{CONNECT_PORT}").parse().unwrap(),
        server: server_addr,
        name: ALLOWED,
        ca: &s.node_ca,
    };
    let gunzip = |bytes: &[u8]| {
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        let _ = decoder.write_all(bytes);
        let _ = decoder.flush();
        decoder.get_ref().clone()
    };
    let mut records = 0;
    for entry in CATALOGUE
        .iter()
        .filter(|e| e.default_action == DetectorAction::Block)
    {
        let example = entry.true_examples[0].as_bytes();
        let body = [b"BODY-START ".as_slice(), example, b" BODY-END\n"].concat();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&body).unwrap();
        let gz = gz.finish().unwrap();
        let cut = "BODY-START ".len() + example.len() / 2;
        for version in [https::Version::Http1, https::Version::Http2] {
            let cases: [Case; 2] = [
                ("cut", &[], vec![body[..cut].to_vec(), body[cut..].to_vec()]),
                (
                    "gzip",
                    &[("content-encoding", "gzip")],
                    gz.chunks(7).map(<[u8]>::to_vec).collect(),
                ),
            ];
            for (case, headers, pieces) in cases {
                let what = format!("{} {version:?} {case}", entry.name);
                let sent =
                    https::send_frames(s.lab.agent(1), &route, version, "/upload", headers, pieces);
                assert!(!matches!(sent, Ok((200, _))), "{what}: passed: {sent:?}");
                records += 1;
                let r = &s.proxy_records(records)[records - 1];
                assert_eq!(r["reason"], "detector_block", "{what}: {r}");
                assert_eq!(r["detail"], entry.name, "{what}: {r}");
                for got in server.received() {
                    for bytes in [got.body.clone(), gunzip(&got.body)] {
                        assert!(
                            !bytes.windows(example.len()).any(|w| w == example),
                            "{what}: the server received the secret"
                        );
                    }
                }
            }
        }
    }
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
        s.curl_connect(
            ALLOWED,
            443,
            to,
            &[&format!("https://{ALLOWED}/download/10")],
        )
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
        detector_policy()
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
        &detector_policy().replace("inspect = true", "inspect = false"),
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
