//! An HTTPS server for the proxy tests that speaks HTTP/1.1 and HTTP/2 (ALPN `h2`,
//! `http/1.1`), built on hyper as a real server would be, and records every request it
//! got: method, path, protocol, headers and body (its length, SHA-256 and first bytes).
//!
//! Routes: `POST /upload` answers the body's SHA-256; `GET /download/<n>` sends `n`
//! deterministic bytes ([`pattern`]); `POST /echo` answers the body as it came; anything
//! else is `404`.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use bytes::Bytes;
use enforcer::lab::Netns;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use tokio_stream::StreamExt as _;

/// What the server keeps of each body, to search for markers.
pub const BODY_KEEP: usize = 1 << 20;

/// One request as the server received it.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path and query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The first [`BODY_KEEP`] body bytes.
    pub body: Vec<u8>,
    /// Body bytes received and their SHA-256.
    pub body_len: u64,
    /// Hex SHA-256 of the whole body.
    pub body_sha: String,
    /// The body arrived whole (not cut off by a reset or a closed connection).
    pub complete: bool,
}

/// The running server; stopped when dropped.
pub struct HttpsServer {
    received: Arc<Mutex<Vec<Received>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HttpsServer {
    /// Serves on `listener` (already bound, in whatever namespace) with the certificate
    /// and key in `cert` and `key` (PEM).
    pub fn spawn(listener: std::net::TcpListener, cert: &Path, key: &Path) -> HttpsServer {
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        listener.set_nonblocking(true).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let log = received.clone();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut stopped = std::pin::pin!(stopped);
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                    };
                    let (acceptor, log) = (acceptor.clone(), log.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                        let service = service_fn(move |request| handle(request, log.clone()));
                        let io = TokioIo::new(tls);
                        if h2 {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await;
                        } else {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        }
                    });
                }
            });
        });
        HttpsServer {
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The requests so far, in the order their bodies ended.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (up to 20 s) until `count` requests are recorded.
    pub fn wait_received(&self, count: usize) -> Vec<Received> {
        wait_count("requests", count, || self.received())
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits (up to 20 s) until `get` returns at least `count` records of `what`: a server
/// finishes its record after the client may already have exited.
pub fn wait_count<T>(what: &str, count: usize, get: impl Fn() -> Vec<T>) -> Vec<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get();
        if got.len() >= count {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "the server recorded {} {what}, expected {count}",
            got.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Binds `addr` inside network namespace `netns`.
pub fn bind_in(netns: &Netns, addr: SocketAddr) -> std::net::TcpListener {
    enforcer::lab::in_netns(netns, move || std::net::TcpListener::bind(addr).unwrap())
}

/// Where [`send_frames`] goes: `server` through the CONNECT proxy `proxy`, as `name`,
/// trusting `ca`.
#[derive(Clone, Copy, Debug)]
pub struct Route<'a> {
    /// The proxy's CONNECT address.
    pub proxy: SocketAddr,
    /// The server's address (what CONNECT names).
    pub server: SocketAddr,
    /// The name in TLS and in the request.
    pub name: &'a str,
    /// PEM roots the client trusts (the node CA).
    pub ca: &'a Path,
}

/// How [`send_frames`] speaks to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.1, the body chunked: one chunk per piece.
    Http1,
    /// HTTP/2: one DATA frame (at least) per piece.
    Http2,
}

/// A TLS connection from namespace `netns` along `route`: `CONNECT` to the server's
/// address through the proxy, then TLS as `route.name` trusting `route.ca`, offering
/// `alpn`.
pub async fn connect_tls(
    netns: &Netns,
    route: &Route<'_>,
    alpn: Vec<Vec<u8>>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (proxy, server) = (route.proxy, route.server);
    let tcp = enforcer::lab::in_netns(netns, move || std::net::TcpStream::connect(proxy))
        .map_err(|e| format!("connecting to the proxy: {e}"))?;
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(route.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn;
    tcp.set_nonblocking(true).unwrap();
    let mut tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    tcp.write_all(format!("CONNECT {server} HTTP/1.1\r\nHost: {server}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            return Err("the proxy closed during CONNECT".to_string());
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT: {}", String::from_utf8_lossy(&head)));
    }
    let server_name = rustls::pki_types::ServerName::try_from(route.name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

/// POSTs a body cut into `pieces` (each sent as its own chunk or DATA frame, with a pause
/// between them), with `headers` besides Host, from namespace `netns` along `route` (CONNECT names the address, TLS
/// and the request the name, as `curl --connect-to` does). Returns the response status, or the error that ended
/// the exchange (a reset stream or a closed connection).
pub fn send_frames(
    netns: &Netns,
    route: &Route<'_>,
    version: Version,
    path: &str,
    headers: &[(&str, &str)],
    pieces: Vec<Vec<u8>>,
) -> Result<(u16, Vec<u8>), String> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let alpn = vec![match version {
        Version::Http1 => b"http/1.1".to_vec(),
        Version::Http2 => b"h2".to_vec(),
    }];
    let (name, path, port) = (
        route.name.to_string(),
        path.to_string(),
        route.server.port(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let tls = connect_tls(netns, route, alpn).await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
        let body = http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(|piece| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(piece)))
            }),
        );
        let uri = match version {
            Version::Http1 => path.clone(),
            Version::Http2 => format!("https://{name}:{port}{path}"),
        };
        let mut request = Request::post(uri).header(hyper::header::HOST, format!("{name}:{port}"));
        for (k, v) in &headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let request = request.body(body).unwrap();
        let feeder = tokio::spawn(async move {
            for piece in pieces {
                if tx.send(piece).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let io = TokioIo::new(tls);
        let response = match version {
            Version::Http1 => {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                sender.send_request(request).await
            }
            Version::Http2 => {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                sender.send_request(request).await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        feeder.abort();
        Ok((status, body))
    })
}

async fn handle(
    request: Request<Incoming>,
    log: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let mut record = Received {
        method: request.method().to_string(),
        path: request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        version: format!("{:?}", request.version()),
        headers: request
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        ..Received::default()
    };
    let mut body = request.into_body();
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut echo = Vec::new();
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            complete = false;
            break;
        };
        if let Some(data) = frame.data_ref() {
            hash.update(data);
            record.body_len += data.len() as u64;
            let room = BODY_KEEP.saturating_sub(record.body.len());
            record.body.extend_from_slice(&data[..data.len().min(room)]);
            if record.path == "/echo" && echo.len() < BODY_KEEP {
                echo.extend_from_slice(data);
            }
        }
    }
    record.complete = complete;
    record.body_sha = hex(hash.finish().as_ref());
    let response = match (record.method.as_str(), record.path.as_str()) {
        ("POST", "/upload") => {
            Response::new(Full::new(Bytes::from(format!("{}\n", record.body_sha))))
        }
        ("POST", "/echo") => Response::new(Full::new(Bytes::from(echo))),
        ("GET", path) if path.starts_with("/download/") => {
            let n: usize = path["/download/".len()..].parse().unwrap_or(0);
            Response::new(Full::new(Bytes::from(pattern(n))))
        }
        _ => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    };
    log.lock().unwrap().push(record);
    Ok(response)
}

/// The deterministic download content: a xorshift stream (incompressible, so no layer
/// could shortcut it).
pub fn pattern(n: usize) -> Vec<u8> {
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

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
