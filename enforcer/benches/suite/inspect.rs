//! Section 8: what the inspecting proxy costs. First the detector catalogue alone, per MiB
//! searched through a `Scanner` in 16 KiB reads, against no detectors and two literals;
//! then an upload through the inspected HTTP path against a plain TCP relay, both over
//! loopback in this process and without TLS, so the difference is HTTP parsing and the
//! search, not encryption.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use enforcer::{
    inspect::{
        catalogue::CATALOGUE,
        dlp::{Detectors, Scan},
        http::{self as proxy, Exchange, Protocol},
    },
    policy::{Detector, DetectorAction, DetectorDirection, DetectorPattern},
};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::{
    Request, Response,
    body::{Frame, Incoming},
    client::conn::{http1 as client1, http2 as client2},
    server::conn::{http1 as server1, http2 as server2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

/// Size of one read fed to the scanner, as the relay reads.
const READ: usize = 16 * 1024;

/// Size of one body frame the client sends.
const FRAME: usize = 64 * 1024;

/// HTTP/2 flow-control windows of the benchmark's own client and server: hyper's 64 KiB
/// default holds a loopback upload to a window per round trip, which would measure the
/// window rather than the path (the proxy's windows are its own, and stay as they are).
const H2_WINDOW: u32 = 8 << 20;

/// One corpus searched by one detector set, median of the runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScanRow {
    /// `random`, `base64` or `json`.
    pub corpus: String,
    /// `none`, `literals` or `catalogue`.
    pub set: String,
    /// Detectors in the set.
    pub detectors: usize,
    /// Throughput (MiB/s), median of the runs.
    pub mib_s: f64,
    /// Cost per MiB searched (µs), median of the runs.
    pub us_per_mib: f64,
    /// Block matches met (the scan restarts after one); zero on these corpora.
    pub blocks: u64,
}

/// One upload through one path.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathRow {
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    /// `plain` (TCP relay) or `inspected` (the proxy's HTTP path, whole catalogue).
    pub mode: String,
    /// Upload throughput (MiB/s), median of the runs.
    pub mib_s: f64,
    /// Slowest run (MiB/s).
    pub min_mib_s: f64,
    /// Fastest run (MiB/s).
    pub max_mib_s: f64,
}

/// Section 8's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InspectResult {
    /// Size of each scanned corpus (MiB).
    pub corpus_mib: usize,
    /// Size of each upload (MiB).
    pub upload_mib: usize,
    /// Runs per measurement (the median is reported).
    pub runs: usize,
    /// Catalogue cost.
    pub scan: Vec<ScanRow>,
    /// Inspected path against the plain relay.
    pub paths: Vec<PathRow>,
}

impl InspectResult {
    /// The `set`'s cost per MiB over the `base` set's on `corpus`.
    pub fn scan_ratio(&self, corpus: &str, set: &str, base: &str) -> f64 {
        let cost = |s: &str| {
            self.scan
                .iter()
                .find(|r| r.corpus == corpus && r.set == s)
                .map_or(f64::NAN, |r| r.us_per_mib)
        };
        cost(set) / cost(base)
    }

    /// Inspected over plain throughput for `protocol`.
    pub fn path_ratio(&self, protocol: &str) -> f64 {
        let speed = |m: &str| {
            self.paths
                .iter()
                .find(|r| r.protocol == protocol && r.mode == m)
                .map_or(f64::NAN, |r| r.mib_s)
        };
        speed("inspected") / speed("plain")
    }
}

/// Deterministic bytes: xorshift64, so every run and machine searches the same corpus.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The three corpora of `len` bytes: random bytes, base64 text in 76-column lines (an
/// attachment), and JSON lines of English-like words (an agent's API traffic).
fn corpora(len: usize) -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let random: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut base64 = Vec::with_capacity(len + 80);
    while base64.len() < len {
        for _ in 0..76 {
            base64.push(alphabet[(rng.next() % 64) as usize]);
        }
        base64.extend_from_slice(b"\r\n");
    }
    base64.truncate(len);
    let words = [
        "the", "agent", "reads", "a", "file", "and", "writes", "summary", "of", "results", "for",
        "user", "request", "with", "model", "tool", "output", "is", "in", "context", "which",
        "plan", "next", "step", "search", "query", "answer", "document", "page", "table",
    ];
    let keys = ["role", "content", "name", "text", "id", "type"];
    let mut json = Vec::with_capacity(len + 512);
    let mut n = 0u64;
    while json.len() < len {
        n += 1;
        json.extend_from_slice(b"{\"");
        json.extend_from_slice(keys[(rng.next() % keys.len() as u64) as usize].as_bytes());
        json.extend_from_slice(format!("\":{n},\"content\":\"").as_bytes());
        for i in 0..(8 + rng.next() % 40) {
            if i > 0 {
                json.push(b' ');
            }
            json.extend_from_slice(words[(rng.next() % words.len() as u64) as usize].as_bytes());
        }
        json.extend_from_slice(b".\"}\n");
    }
    json.truncate(len);
    vec![("random", random), ("base64", base64), ("json", json)]
}

fn literal(name: &str, text: &str, action: DetectorAction) -> Detector {
    Detector {
        name: name.into(),
        pattern: DetectorPattern::Literal(text.into()),
        action,
        direction: DetectorDirection::Both,
    }
}

/// The whole catalogue with each entry's own default action, as `DetectorSet::compile`
/// makes it for `catalogue = "block"`.
fn catalogue() -> Vec<Detector> {
    CATALOGUE
        .iter()
        .map(|e| Detector {
            name: e.name.to_string(),
            pattern: DetectorPattern::Regex(e.regex.to_string()),
            action: e.default_action,
            direction: DetectorDirection::Both,
        })
        .collect()
}

/// The detector sets compared: none, the inspect tests' two literals, the catalogue.
fn sets() -> Vec<(&'static str, Detectors, usize)> {
    let literals = vec![
        literal("api-key", "sk-live-", DetectorAction::Block),
        literal(
            "mcp-call",
            "\"method\":\"tools/call\"",
            DetectorAction::Flag,
        ),
    ];
    let all = catalogue();
    let n = all.len();
    vec![
        ("none", Detectors::new(&[]).expect("no detectors"), 0),
        (
            "literals",
            Detectors::new(&literals).expect("the literals"),
            2,
        ),
        ("catalogue", Detectors::new(&all).expect("the catalogue"), n),
    ]
}

/// One search of `data` in 16 KiB reads: time taken, block matches met.
fn scan_once(d: &Detectors, data: &[u8]) -> (Duration, u64) {
    let started = Instant::now();
    let mut s = d.scanner();
    let mut out = 0usize;
    let mut blocks = 0;
    for chunk in data.chunks(READ) {
        match s.feed(d, chunk) {
            Scan::Pass { release, .. } => out += release.len(),
            // The relay would close the connection; a fresh scanner goes on.
            Scan::Block { .. } => {
                blocks += 1;
                s = d.scanner();
            }
        }
    }
    if let Scan::Pass { release, .. } = s.finish(d) {
        out += release.len();
    }
    std::hint::black_box(out);
    (started.elapsed(), blocks)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn scan_rows(corpus_len: usize, runs: usize) -> Vec<ScanRow> {
    let corpora = corpora(corpus_len);
    let sets = sets();
    let mib = corpus_len as f64 / (1 << 20) as f64;
    let mut rows = Vec::new();
    for (corpus, data) in &corpora {
        for (set, d, detectors) in &sets {
            let mut times = Vec::new();
            let mut blocks = 0;
            // Interleaving would not help here: each run is one pass over the same bytes.
            for _ in 0..runs {
                let (took, b) = scan_once(d, data);
                times.push(took.as_secs_f64());
                blocks = b;
            }
            let s = median(times);
            rows.push(ScanRow {
                corpus: (*corpus).into(),
                set: (*set).into(),
                detectors: *detectors,
                mib_s: mib / s,
                us_per_mib: s * 1e6 / mib,
                blocks,
            });
        }
    }
    rows
}

/// The server: answers every request with the number of body bytes it read.
async fn count_body(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let mut body = request.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
        }
    }
    Ok(Response::new(Full::new(Bytes::from(n.to_string()))))
}

async fn server(listener: TcpListener, protocol: Protocol) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let io = TokioIo::new(stream);
        tokio::spawn(async move {
            let service = service_fn(count_body);
            let _ = match protocol {
                Protocol::Http1 => server1::Builder::new().serve_connection(io, service).await,
                Protocol::Http2 => {
                    server2::Builder::new(TokioExecutor::new())
                        .initial_stream_window_size(H2_WINDOW)
                        .initial_connection_window_size(H2_WINDOW)
                        .serve_connection(io, service)
                        .await
                }
            };
        });
    }
}

/// The relay between the client and the server: plain, or the inspecting proxy's HTTP
/// path with the whole catalogue in both directions.
async fn relay(
    listener: TcpListener,
    upstream: std::net::SocketAddr,
    protocol: Protocol,
    inspected: bool,
) {
    let detectors = Arc::new(Detectors::new(&catalogue()).expect("the catalogue"));
    loop {
        let Ok((mut agent, _)) = listener.accept().await else {
            return;
        };
        let detectors = detectors.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = agent.set_nodelay(true);
            let _ = server.set_nodelay(true);
            if inspected {
                // The name must be the request's host, or the proxy answers 421.
                let exchange = Exchange::new(
                    "127.0.0.1".into(),
                    detectors.clone(),
                    detectors,
                    false,
                    None,
                    Arc::new(|_| {}),
                );
                let report = proxy::serve(agent, server, protocol, exchange).await;
                if report.blocked > 0 {
                    eprintln!("inspect: the proxy blocked {} uploads", report.blocked);
                }
            } else {
                let _ = tokio::io::copy_bidirectional(&mut agent, &mut server).await;
            }
        });
    }
}

/// One upload of `body` repeated to `total` bytes through `relay`: the time from the
/// request to the server's answer.
async fn upload(
    relay: std::net::SocketAddr,
    protocol: Protocol,
    body: Bytes,
    total: usize,
) -> Duration {
    let stream = TcpStream::connect(relay)
        .await
        .expect("connecting to the relay");
    stream.set_nodelay(true).expect("nodelay");
    let io = TokioIo::new(stream);
    let frames = (0..total.div_ceil(FRAME)).map(move |i| {
        let at = (i * FRAME) % body.len();
        let len = FRAME.min(total - i * FRAME).min(body.len() - at);
        Ok::<_, std::convert::Infallible>(Frame::data(body.slice(at..at + len)))
    });
    let body = StreamBody::new(tokio_stream::iter(frames));
    let started = Instant::now();
    let response = match protocol {
        Protocol::Http1 => {
            let (mut sender, connection) = client1::handshake(io).await.expect("HTTP/1 handshake");
            tokio::spawn(connection);
            let request = Request::post("/upload")
                .header(hyper::header::HOST, format!("127.0.0.1:{}", relay.port()))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(body)
                .expect("request");
            sender.send_request(request).await
        }
        Protocol::Http2 => {
            let (mut sender, connection) = client2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(H2_WINDOW)
                .initial_connection_window_size(H2_WINDOW)
                .handshake(io)
                .await
                .expect("HTTP/2 handshake");
            tokio::spawn(connection);
            let request = Request::post(format!("http://127.0.0.1:{}/upload", relay.port()))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(body)
                .expect("request");
            sender.send_request(request).await
        }
    }
    .expect("upload");
    let status = response.status();
    let answer = response
        .into_body()
        .collect()
        .await
        .expect("reading the answer")
        .to_bytes();
    let took = started.elapsed();
    assert!(status.is_success(), "upload answered {status}");
    let got: usize = std::str::from_utf8(&answer)
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("the server's byte count");
    assert_eq!(got, total, "the server read another size");
    took
}

async fn path_rows(body: Bytes, total: usize, runs: usize) -> Vec<PathRow> {
    let mut rows = Vec::new();
    for (protocol, name) in [(Protocol::Http1, "HTTP/1.1"), (Protocol::Http2, "HTTP/2")] {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the server");
        let upstream = listener.local_addr().expect("server address");
        let server = tokio::spawn(server(listener, protocol));
        let mut relays = Vec::new();
        for inspected in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding the relay");
            let addr = listener.local_addr().expect("relay address");
            relays.push((
                inspected,
                addr,
                tokio::spawn(relay(listener, upstream, protocol, inspected)),
            ));
        }
        let mut speeds = vec![Vec::new(); 2];
        // Interleaved, so a change of machine load touches both paths alike.
        for _ in 0..runs {
            for (i, (_, addr, _)) in relays.iter().enumerate() {
                let took = upload(*addr, protocol, body.clone(), total).await;
                speeds[i].push(total as f64 / (1 << 20) as f64 / took.as_secs_f64());
            }
        }
        for ((inspected, _, task), s) in relays.into_iter().zip(speeds) {
            task.abort();
            let min = s.iter().copied().fold(f64::INFINITY, f64::min);
            let max = s.iter().copied().fold(0.0, f64::max);
            rows.push(PathRow {
                protocol: name.into(),
                mode: if inspected { "inspected" } else { "plain" }.into(),
                mib_s: median(s),
                min_mib_s: min,
                max_mib_s: max,
            });
        }
        server.abort();
    }
    rows
}

/// Runs section 8: corpora of `corpus_mib` MiB, uploads of `upload_mib` MiB, `runs` runs
/// each, and prints its tables.
pub fn run(corpus_mib: usize, upload_mib: usize, runs: usize) -> InspectResult {
    let scan = scan_rows(corpus_mib << 20, runs);
    println!("   catalogue cost: {READ}-byte reads through a Scanner, median of {runs}");
    println!(
        "   {:<8} {:<10} {:>9} {:>10} {:>10}",
        "corpus", "set", "detectors", "MiB/s", "µs/MiB"
    );
    for r in &scan {
        println!(
            "   {:<8} {:<10} {:>9} {:>10.0} {:>10.0}",
            r.corpus, r.set, r.detectors, r.mib_s, r.us_per_mib
        );
    }
    // The upload body: the JSON corpus, which the catalogue passes.
    let body = Bytes::from(corpora(8 << 20).pop().expect("the json corpus").1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let paths = runtime.block_on(path_rows(body, upload_mib << 20, runs));
    let result = InspectResult {
        corpus_mib,
        upload_mib,
        runs,
        scan,
        paths,
    };
    for corpus in ["random", "base64", "json"] {
        println!(
            "   {corpus}: catalogue / literals {:.2}, catalogue / none {:.2}",
            result.scan_ratio(corpus, "catalogue", "literals"),
            result.scan_ratio(corpus, "catalogue", "none")
        );
    }
    println!(
        "   upload of {upload_mib} MiB over loopback, in process, no TLS (HTTP parsing + search, not encryption)"
    );
    println!(
        "   {:<9} {:<10} {:>8} {:>8} {:>8}",
        "protocol", "path", "MiB/s", "min", "max"
    );
    for r in &result.paths {
        println!(
            "   {:<9} {:<10} {:>8.0} {:>8.0} {:>8.0}",
            r.protocol, r.mode, r.mib_s, r.min_mib_s, r.max_mib_s
        );
    }
    for p in ["HTTP/1.1", "HTTP/2"] {
        println!("   {p}: inspected / plain {:.2}", result.path_ratio(p));
    }
    result
}
