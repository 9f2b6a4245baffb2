//! The MCP gate with real clients: the MCP SDK's own client (tests/mcp/client.py) in the
//! agent namespace talks to the SDK's own server (tests/mcp/server.py) in the server
//! namespace, through the daemon's inspecting proxy. The agent uses a plain
//! `https://api.example.test:8443/...` URL; the name resolves to the server's address
//! through the agent namespace's own hosts file (`/etc/netns/<ns>/hosts`, which
//! `ip netns exec` mounts over /etc/hosts), and nftables redirects the connection to the
//! proxy because 8443 is one of the policy's `tls_ports`. The server logs every tool call it
//! executes, which shows that a refused call never arrived.
//!
//! The Python side comes from the venv `cargo xtask setup` creates (target/mcp-venv).

use std::{
    fs,
    io::Write,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use enforcer::lab::{self, ChildGuard, Netns, require_root};
use integration_tests::{
    SERVER_V4, https,
    proxy_lab::{ALLOWED, CONNECT_PORT, GATEWAY, Setup, metric, setup_with},
};
use serde_json::Value;

/// The port the SDK server listens on (the lab's own HTTPS server has 443).
const MCP_PORT: u16 = 8443;
/// A hyper server that also speaks HTTP/2: uvicorn speaks HTTP/1.1 only, and the proxy
/// offers the agent the protocol the upstream chose.
const H2_PORT: u16 = 8442;
/// The registry's path for the approved server.
const APPROVED_PATH: &str = "/mcp";
/// A path on the same host that the registry does not know: a shadow server.
const SHADOW_PATH: &str = "/rogue";

/// The JSON-RPC codes the gate answers with.
const NOT_APPROVED: i64 = -32090;
const TOOL_DENIED: i64 = -32091;
const RATE_LIMITED: i64 = -32092;
const MALFORMED: i64 = -32093;

/// One registered server, `echo` the only tool agent 1 may call, three calls in a burst
/// and three a minute; `shadow` is `"block"` or `"flag"`.
fn policy(shadow: &str) -> String {
    format!(
        r#"
[defaults]
tls_ports = [443, {H2_PORT}, {MCP_PORT}]

[[mcp_servers]]
name = "tools"
host = "{ALLOWED}"
path = "{APPROVED_PATH}"

[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]
inspect = true
[[agents.egress]]
action = "allow"
to = ["{ALLOWED}"]
proto = "tcp"
ports = "443-{MCP_PORT}"
[[agents.egress]]
action = "allow"
to = ["{SERVER_V4}"]
proto = "tcp"
ports = "443-{MCP_PORT}"
[[agents.egress]]
action = "allow"
to = ["{GATEWAY}"]
proto = "tcp"
ports = "{CONNECT_PORT}"

[agents.mcp]
shadow = "{shadow}"

[[agents.mcp.servers]]
server = "tools"
tools = ["echo"]
calls_per_minute = 3
burst = 3
"#
    )
}

/// The venv's python (`cargo xtask setup` makes it).
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = root.join("target/mcp-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it creates the MCP SDK venv)",
        python.display()
    );
    python
}

/// A script in tests/mcp/.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp").join(name)
}

/// `/etc/netns/<ns>/`, holding a hosts file for the namespace; removed on drop.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn hosts(ns: &Netns, lines: &str) -> NetnsEtc {
        let dir = Path::new("/etc/netns").join(ns.name());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("hosts"), lines).unwrap();
        NetnsEtc(dir)
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        // /etc/netns itself only if no one else uses it.
        let _ = fs::remove_dir("/etc/netns");
    }
}

/// The SDK server in the server namespace, on both paths, and the file it logs calls to.
struct McpServer {
    _child: ChildGuard,
    log: PathBuf,
}

impl McpServer {
    fn spawn(s: &Setup) -> McpServer {
        let log = s.lab.dir.join("mcp-calls.log");
        fs::write(&log, "").unwrap();
        let out = fs::File::create(s.lab.dir.join("mcp-server.out")).unwrap();
        let child = s
            .lab
            .server
            .command(python())
            .arg(script("server.py"))
            .arg(SERVER_V4)
            .arg(MCP_PORT.to_string())
            .arg(&s.upstream_cert)
            .arg(&s.upstream_key)
            .arg(&log)
            .args([APPROVED_PATH, SHADOW_PATH])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut child = ChildGuard::new(child);
        let addr = SocketAddr::new(SERVER_V4.parse().unwrap(), MCP_PORT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lab::in_netns(&s.lab.server, move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        }) {
            let exited = child.child_mut().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the MCP server did not come up ({exited:?}): {}",
                fs::read_to_string(s.lab.dir.join("mcp-server.out")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
        McpServer { _child: child, log }
    }

    /// The tools the server executed, in order.
    fn calls(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// What the client printed: the calls' lines, or the setup failure.
#[derive(Debug)]
struct ClientRun {
    code: Option<i32>,
    lines: Vec<Value>,
    #[expect(dead_code, reason = "read in the Debug output of a failed assertion")]
    stderr: String,
}

/// Runs the SDK client in agent 1 against `path`, making `calls` (`tool:arg`).
/// It trusts the node CA only, and the server's certificate comes from the upstream CA:
/// a session that works at all went through the proxy.
fn client(s: &Setup, path: &str, calls: &[&str]) -> ClientRun {
    let out: Output = s
        .lab
        .agent(1)
        .command(python())
        .arg(script("client.py"))
        .arg(format!("https://{ALLOWED}:{MCP_PORT}{path}"))
        .arg(&s.node_ca)
        .args(calls)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ClientRun {
        code: out.status.code(),
        lines: stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("client line {l:?}: {e}")))
            .collect(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The lab with the MCP policy, the server running and the agent's name resolving to it.
fn mcp_setup(shadow: &str) -> (Setup, McpServer, NetnsEtc) {
    let s = setup_with(1, "", &policy(shadow));
    let etc = NetnsEtc::hosts(
        s.lab.agent(1),
        &format!("127.0.0.1 localhost\n{SERVER_V4} {ALLOWED}\n"),
    );
    let server = McpServer::spawn(&s);
    (s, server, etc)
}

/// The proxy's audit records with `reason`, waiting (up to 20 s) for at least `n`.
fn records(s: &Setup, reason: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = s.proxy_records(0);
        let found: Vec<Value> = all
            .iter()
            .filter(|r| r["reason"] == reason)
            .cloned()
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{} proxy audit records with reason {reason}, expected {n}; all proxy records: {all:#?}",
            found.len()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn assert_refused(line: &Value, tool: &str, code: i64) {
    assert_eq!(line["tool"], tool, "{line}");
    assert_eq!(line["ok"], false, "{line}");
    assert_eq!(line["code"], code, "{line}");
}

/// Under `shadow = "block"`: the approved server answers the allowed tool; a tool outside
/// the list and a call over the rate are refused by the proxy with their own codes and never
/// reach the server; a server the registry lacks cannot even be initialized. Each decision
/// is audited with the MCP details.
#[test]
fn the_gate_holds_for_the_sdk_client() {
    if !require_root("the_gate_holds_for_the_sdk_client") {
        return;
    }
    let (s, server, _etc) = mcp_setup("block");

    // (a) the allowed tool, (c) one outside `tools`, and (d) three allowed calls fill
    // the burst of 3, so the fourth is over the rate. A denied call takes no token: the
    // allow-list is checked before the bucket.
    let run = client(
        &s,
        APPROVED_PATH,
        &["echo:hi", "delete_repo:x", "echo:b", "echo:c", "echo:d"],
    );
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.lines.len(), 5, "{run:#?}");
    assert_eq!(run.lines[0]["ok"], true, "{run:#?}");
    assert_eq!(run.lines[0]["text"], "hi", "{run:#?}");
    assert_refused(&run.lines[1], "delete_repo", TOOL_DENIED);
    assert_eq!(run.lines[2]["text"], "b", "{run:#?}");
    assert_eq!(run.lines[3]["text"], "c", "{run:#?}");
    assert_refused(&run.lines[4], "echo", RATE_LIMITED);
    assert_eq!(
        server.calls(),
        ["echo", "echo", "echo"],
        "delete_repo never arrived"
    );

    let calls = records(&s, "mcp_call", 3);
    assert_eq!(
        calls.len(),
        3,
        "one pass record per forwarded call: {calls:#?}"
    );
    for r in &calls {
        assert_eq!(r["verdict"], "pass", "{r}");
        assert_eq!(r["name"], ALLOWED, "{r}");
        assert_eq!(r["mcp"]["server"], "tools", "{r}");
        assert_eq!(r["mcp"]["method"], "tools/call", "{r}");
        assert_eq!(r["mcp"]["tool"], "echo", "{r}");
        assert_eq!(r["mcp"]["path"], APPROVED_PATH, "{r}");
    }
    let denied = records(&s, "mcp_tool_denied", 1);
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(denied[0]["verdict"], "drop", "{}", denied[0]);
    assert_eq!(denied[0]["name"], ALLOWED, "{}", denied[0]);
    assert_eq!(denied[0]["mcp"]["server"], "tools", "{}", denied[0]);
    assert_eq!(denied[0]["mcp"]["tool"], "delete_repo", "{}", denied[0]);
    let limited = records(&s, "mcp_rate_limited", 1);
    assert_eq!(limited.len(), 1, "{limited:#?}");
    assert_eq!(limited[0]["verdict"], "drop", "{}", limited[0]);
    assert_eq!(limited[0]["mcp"]["tool"], "echo", "{}", limited[0]);

    // (b) the same server on a path the registry does not list: refused at initialize.
    let run = client(&s, SHADOW_PATH, &["echo:shadow"]);
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert_eq!(run.lines.len(), 1, "{run:#?}");
    assert_eq!(run.lines[0]["setup"], false, "{run:#?}");
    assert_eq!(run.lines[0]["code"], NOT_APPROVED, "{run:#?}");
    assert_eq!(server.calls().len(), 3, "nothing reached the shadow path");
    let shadow = records(&s, "mcp_shadow", 1);
    let r = &shadow[0];
    assert_eq!(r["verdict"], "drop", "{r}");
    assert_eq!(r["name"], ALLOWED, "{r}");
    assert!(r["mcp"]["server"].is_null(), "no registry entry: {r}");
    assert_eq!(r["mcp"]["method"], "initialize", "{r}");
    assert_eq!(r["mcp"]["path"], SHADOW_PATH, "{r}");

    // The same counts for the scrape: three calls passed, one of each refusal.
    let metrics = s.metrics();
    let count = |reason: &str, verdict: &str| {
        metric(
            &metrics,
            &format!(
                "enforcer_inspect_mcp_requests_total{{agent=\"coder\",agent_id=\"1\",reason=\"{reason}\",verdict=\"{verdict}\"}}"
            ),
        )
    };
    assert_eq!(count("mcp_call", "pass"), Some(3.0), "{metrics}");
    assert_eq!(count("mcp_tool_denied", "drop"), Some(1.0), "{metrics}");
    assert_eq!(count("mcp_rate_limited", "drop"), Some(1.0), "{metrics}");
    assert_eq!(count("mcp_shadow", "drop"), Some(1.0), "{metrics}");
}

/// Under `shadow = "flag"` a server the registry lacks is reached, and audited as a pass.
#[test]
fn a_flagged_shadow_server_is_reached_and_audited() {
    if !require_root("a_flagged_shadow_server_is_reached_and_audited") {
        return;
    }
    let (s, server, _etc) = mcp_setup("flag");
    let run = client(&s, SHADOW_PATH, &["delete_repo:x"]);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert_eq!(run.lines.len(), 1, "{run:#?}");
    assert_eq!(run.lines[0]["ok"], true, "{run:#?}");
    assert_eq!(run.lines[0]["text"], "deleted x", "{run:#?}");
    assert_eq!(server.calls(), ["delete_repo"]);
    let shadow = records(&s, "mcp_shadow", 1);
    for r in &shadow {
        assert_eq!(r["verdict"], "pass", "{r}");
        assert_eq!(r["name"], ALLOWED, "{r}");
        assert!(r["mcp"]["server"].is_null(), "{r}");
        assert_eq!(r["mcp"]["path"], SHADOW_PATH, "{r}");
    }
    assert!(
        shadow
            .iter()
            .any(|r| r["mcp"]["method"] == "tools/call" && r["mcp"]["tool"] == "delete_repo"),
        "the flagged call itself is audited: {shadow:#?}"
    );
}

/// What `rpc_curl` got back: the status, the HTTP version and the body.
#[derive(Debug)]
struct CurlReply {
    status: u16,
    version: String,
    body: String,
}

impl CurlReply {
    /// The body as JSON; the assertion names the reply when it is not.
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{self:#?}: {e}"))
    }
}

/// POSTs `body` (a file, so gzip'd bytes go as they are) with a JSON content type from
/// agent 1 to `port` and `path` of the server through the proxy, with curl's extra `args`.
fn rpc_curl(s: &Setup, port: u16, path: &str, body: &[u8], args: &[&str]) -> CurlReply {
    let file = tempfile::NamedTempFile::new_in(&s.lab.dir).unwrap();
    fs::write(file.path(), body).unwrap();
    let out = s
        .lab
        .agent(1)
        .command("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(&s.node_ca)
        .args(["-H", "Content-Type: application/json", "-H", "Expect:"])
        .args(args)
        .arg("--data-binary")
        .arg(format!("@{}", file.path().display()))
        // The status and version on a last line of their own, after the body.
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("https://{ALLOWED}:{port}{path}"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, last) = stdout.rsplit_once('\n').unwrap();
    let (status, version) = last.split_once(' ').unwrap();
    CurlReply {
        status: status.parse().unwrap(),
        version: version.to_string(),
        body: body.to_string(),
    }
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

/// The gate judges the JSON-RPC message, not its bytes: a `tools/call` to a shadow server
/// is refused however it is written (whitespace, key order, `\/` and `\u` escapes, lines),
/// compressed or batched, over HTTP/1.1 or HTTP/2, and none of it reaches the server. A
/// message with two `method` keys, which two parsers could read two ways, is refused as
/// malformed. A JSON body that is no JSON-RPC passes, so the refusals above are not a gate
/// that refuses every JSON body.
#[test]
fn the_mcp_method_is_caught_whatever_its_spelling() {
    if !require_root("the_mcp_method_is_caught_whatever_its_spelling") {
        return;
    }
    let (s, server, _etc) = mcp_setup("block");
    let h2 = https::HttpsServer::spawn(
        https::bind_in(
            &s.lab.server,
            SocketAddr::new(SERVER_V4.parse().unwrap(), H2_PORT),
        ),
        &s.upstream_cert,
        &s.upstream_key,
    );
    let params = r#"{"name":"delete_repo","arguments":{"name":"x"}}"#;
    let call = |id: u32, method: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#)
    };
    let pretty = format!(
        "{{\n  \"jsonrpc\": \"2.0\",\n  \"id\": 5,\n  \"method\":\n    \"tools/call\",\n  \"params\": {params}\n}}\n"
    );
    // (description, body, curl's extra arguments, the request's id); HTTP/2 goes to the
    // hyper server, the rest to the SDK's.
    let cases: Vec<(&str, Vec<u8>, Vec<&str>, u32)> = vec![
        ("plain", call(1, "tools/call").into(), vec![], 1),
        (
            "spaces and another key order",
            format!(
                r#"{{"method" : "tools/call", "jsonrpc" : "2.0", "id" : 2, "params": {params}}}"#
            )
            .into(),
            vec![],
            2,
        ),
        (
            "an escaped slash",
            call(3, r"tools\/call").into(),
            vec![],
            3,
        ),
        (
            "a \\u escape",
            call(4, r"\u0074ools/call").into(),
            vec![],
            4,
        ),
        ("pretty-printed", pretty.into(), vec![], 5),
        (
            "gzip'd",
            gzip(call(6, "tools/call").as_bytes()),
            vec!["-H", "Content-Encoding: gzip"],
            6,
        ),
        ("HTTP/2", call(7, "tools/call").into(), vec!["--http2"], 7),
        (
            "HTTP/1.1",
            call(8, "tools/call").into(),
            vec!["--http1.1"],
            8,
        ),
    ];
    for (what, body, args, id) in &cases {
        let port = if *what == "HTTP/2" { H2_PORT } else { MCP_PORT };
        let reply = rpc_curl(&s, port, SHADOW_PATH, body, args);
        assert_eq!(reply.status, 200, "{what}: {reply:#?}");
        let json = reply.json();
        assert_eq!(json["id"], *id, "{what}: {reply:#?}");
        assert_eq!(json["error"]["code"], NOT_APPROVED, "{what}: {reply:#?}");
        match *what {
            "HTTP/2" => assert_eq!(reply.version, "2", "{reply:#?}"),
            "HTTP/1.1" => assert_eq!(reply.version, "1.1", "{reply:#?}"),
            _ => {}
        }
    }
    let batch = format!("[{}]", call(10, "tools/call"));
    let reply = rpc_curl(&s, MCP_PORT, SHADOW_PATH, batch.as_bytes(), &[]);
    assert_eq!(reply.status, 200, "batch: {reply:#?}");
    let json = reply.json();
    let errors = json
        .as_array()
        .unwrap_or_else(|| panic!("batch: {reply:#?}"));
    assert_eq!(errors.len(), 1, "batch: {reply:#?}");
    assert_eq!(errors[0]["id"], 10, "batch: {reply:#?}");
    assert_eq!(
        errors[0]["error"]["code"], NOT_APPROVED,
        "batch: {reply:#?}"
    );

    let duplicate = br#"{"jsonrpc":"2.0","id":9,"method":"ping","method":"tools/call"}"#;
    let reply = rpc_curl(&s, MCP_PORT, SHADOW_PATH, duplicate, &[]);
    assert_eq!(reply.status, 200, "duplicate method: {reply:#?}");
    assert_eq!(
        reply.json()["error"]["code"],
        MALFORMED,
        "duplicate method: {reply:#?}"
    );

    // The control: forwarded, so whatever the SDK server makes of it, no gate's error.
    let reply = rpc_curl(&s, MCP_PORT, SHADOW_PATH, br#"{"query":"x"}"#, &[]);
    let code = serde_json::from_str::<Value>(&reply.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_i64());
    assert!(
        code != Some(NOT_APPROVED) && code != Some(MALFORMED),
        "a JSON body that is no JSON-RPC passes: {reply:#?}"
    );
    assert!(
        !reply.body.contains("refused by the enforcer"),
        "a JSON body that is no JSON-RPC passes: {reply:#?}"
    );

    assert!(
        server.calls().is_empty(),
        "nothing was executed: {:?}",
        server.calls()
    );
    assert!(
        h2.received().is_empty(),
        "nothing reached the HTTP/2 server"
    );
    let refused = cases.len() + 1;
    let shadow = records(&s, "mcp_shadow", refused);
    assert_eq!(
        shadow.len(),
        refused,
        "one record per refused request: {shadow:#?}"
    );
    for r in &shadow {
        assert_eq!(r["verdict"], "drop", "{r}");
        assert_eq!(r["name"], ALLOWED, "{r}");
        assert!(r["mcp"]["server"].is_null(), "{r}");
        assert_eq!(r["mcp"]["method"], "tools/call", "{r}");
        assert_eq!(r["mcp"]["tool"], "delete_repo", "{r}");
        assert_eq!(r["mcp"]["path"], SHADOW_PATH, "{r}");
    }
    let malformed = records(&s, "mcp_malformed", 1);
    assert_eq!(malformed.len(), 1, "{malformed:#?}");
    assert_eq!(malformed[0]["verdict"], "drop", "{}", malformed[0]);
    assert_eq!(malformed[0]["mcp"]["path"], SHADOW_PATH, "{}", malformed[0]);
}
