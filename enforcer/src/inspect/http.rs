//! HTTP through the inspecting proxy: the agent's HTTP/1.1 or HTTP/2 is parsed by hyper
//! on the agent's side and spoken again by hyper to the server, one message at a time,
//! so the detectors see messages as the server will: a request head as text, and a body
//! without its chunked encoding or HTTP/2 framing ([`InspectedBody`]). A secret cut
//! across two DATA frames is one run of bytes here, where the byte stream the relay
//! searches ([`super::relay`]) would have a frame header in the middle of it.
//!
//! Both sides speak the protocol the server chose in ALPN ([`Protocol::from_alpn`]): the
//! proxy offers the agent exactly that, so no message is translated between versions.
//! Per request:
//! - the name in the request (`Host`, `:authority` or an absolute URI) must be the name
//!   the connection was admitted for, or the answer is `421 Misdirected Request`: one
//!   TLS connection admitted for an allowed name cannot carry requests for another
//!   (domain fronting);
//! - the head (request line and headers, as HTTP/1 text) is searched by the upstream
//!   detectors, then the body as it streams; a block answers `403` and the message never
//!   reaches the server (an HTTP/1 connection is closed after it, an HTTP/2 connection
//!   carries on with its other streams);
//! - the response body is searched by the downstream detectors when there are any; a
//!   block there cuts the response off (HTTP/1: the connection closes; HTTP/2: the stream
//!   is reset);
//! - an HTTP/1 upgrade (`101 Switching Protocols`, WebSocket) continues as a tunnel
//!   searched by the byte-stream relay.

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    body::Incoming,
    client::conn::{http1 as client1, http2 as client2},
    server::conn::{http1 as server1, http2 as server2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinHandle,
};

use super::{
    body::{BodyEvent, BoxError, Decoding, Found, InspectedBody, OnHit},
    decode::Limits,
    dlp::{Detectors, Scan},
    mcp::{self, Gate},
    relay::{self, Direction},
};
use crate::node::audit::McpDetail;

/// A message body as the proxy passes it on.
type ProxyBody = BoxBody<Bytes, BoxError>;

/// The HTTP version both sides of a connection speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2.
    Http2,
}

impl Protocol {
    /// The protocol of an ALPN choice: `None` for no choice or another protocol, which
    /// the caller relays as a byte stream.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Protocol> {
        match alpn? {
            b"h2" => Some(Protocol::Http2),
            b"http/1.1" | b"http/1.0" => Some(Protocol::Http1),
            _ => None,
        }
    }

    /// Whether `first` (the agent's first bytes, when nothing was chosen in ALPN) starts
    /// an HTTP/1 request: a method token and a space.
    pub fn sniff_http1(first: &[u8]) -> bool {
        let token = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
        (3..=16).contains(&token) && first.get(token) == Some(&b' ')
    }
}

/// What happened on a connection, as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A detector matched: `blocked` when it stopped the message.
    Hit {
        /// Which detector, and where.
        found: Found,
        /// The message was stopped.
        blocked: bool,
    },
    /// A body could not be decoded to be searched: stopped going up (unless the agent is
    /// in monitor mode), passed coming down.
    Undecodable {
        /// Which way it was going.
        direction: Direction,
        /// Why.
        error: String,
        /// The message was stopped.
        blocked: bool,
    },
    /// An MCP request judged by the gate ([`super::mcp`]): refused (`blocked`), flagged, or
    /// a `tools/call` passed (`reason` `mcp_call`).
    Mcp {
        /// `mcp_shadow`, `mcp_tool_denied`, `mcp_rate_limited`, `mcp_quota`,
        /// `mcp_malformed` or `mcp_call`.
        reason: &'static str,
        /// The request was not forwarded.
        blocked: bool,
        /// What it was about.
        detail: McpDetail,
        /// Why, in words (for refusals and flags).
        message: Option<String>,
    },
    /// A request named another host than the connection's.
    Misdirected {
        /// The name it asked for.
        host: String,
    },
}

/// What a connection's requests are judged with, shared by its requests.
pub struct Exchange {
    /// The name the agent's connection was admitted for.
    pub name: String,
    /// Detectors of what the agent sends.
    pub up: Arc<Detectors>,
    /// Detectors of what the server answers.
    pub down: Arc<Detectors>,
    /// Told about every [`Event`].
    pub events: Arc<dyn Fn(Event) + Send + Sync>,
    /// The agent is in monitor mode: what cannot be searched passes (and is reported).
    pub monitor: bool,
    /// Decoding limits per body.
    pub limits: Limits,
    /// The MCP gate and the agent's id, for an agent with `[agents.mcp]`.
    pub mcp: Option<(Arc<Gate>, u32)>,
    up_bytes: Arc<AtomicU64>,
    down_bytes: Arc<AtomicU64>,
    requests: AtomicU64,
    blocked: AtomicU64,
    /// Upgraded connections still running: the connection is over when they are.
    tunnels: Mutex<Vec<JoinHandle<()>>>,
}

impl Exchange {
    /// A connection admitted for `name`, of an agent in monitor mode if `monitor`, whose
    /// MCP requests are judged by `mcp` (the gate and the agent's id) if it has one.
    pub fn new(
        name: String,
        up: Arc<Detectors>,
        down: Arc<Detectors>,
        monitor: bool,
        mcp: Option<(Arc<Gate>, u32)>,
        events: Arc<dyn Fn(Event) + Send + Sync>,
    ) -> Arc<Exchange> {
        Arc::new(Exchange {
            name,
            up,
            down,
            events,
            monitor,
            limits: Limits::default(),
            mcp,
            up_bytes: Arc::default(),
            down_bytes: Arc::default(),
            requests: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
            tunnels: Mutex::new(Vec::new()),
        })
    }

    /// A hit callback for one message that also marks `stopped` on a block.
    fn on_hit(self: &Arc<Self>, stopped: Arc<AtomicBool>) -> OnHit {
        let exchange = self.clone();
        Arc::new(move |event| {
            let (event, blocked) = match event {
                BodyEvent::Detector(found, blocked) => (Event::Hit { found, blocked }, blocked),
                BodyEvent::Undecodable {
                    direction,
                    error,
                    blocked,
                } => (
                    Event::Undecodable {
                        direction,
                        error,
                        blocked,
                    },
                    blocked,
                ),
            };
            if blocked {
                stopped.store(true, Ordering::Relaxed);
                exchange.blocked.fetch_add(1, Ordering::Relaxed);
            }
            (exchange.events)(event);
        })
    }
}

/// How a connection ended.
#[derive(Debug)]
pub struct HttpReport {
    /// Requests the agent sent.
    pub requests: u64,
    /// Messages (or tunnels) a block detector stopped.
    pub blocked: u64,
    /// Body bytes passed to the server.
    pub up_bytes: u64,
    /// Body bytes passed to the agent.
    pub down_bytes: u64,
    /// What ended the connection, if not a clean close.
    pub error: Option<String>,
}

/// The server's side of a connection.
#[derive(Clone)]
enum Upstream {
    /// One request at a time: the lock is held until the response head arrives, and the
    /// next `ready` waits for the previous exchange to finish.
    Http1(Arc<tokio::sync::Mutex<client1::SendRequest<ProxyBody>>>),
    Http2(client2::SendRequest<ProxyBody>),
}

impl Upstream {
    async fn send(&self, request: Request<ProxyBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Upstream::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                sender.send_request(request).await
            }
            Upstream::Http2(sender) => {
                let mut sender = sender.clone();
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

/// Serves the agent's requests on `agent` by sending them on `upstream`, both speaking
/// `protocol`, until the agent's connection ends.
pub async fn serve<A, U>(
    agent: A,
    upstream: U,
    protocol: Protocol,
    exchange: Arc<Exchange>,
) -> HttpReport
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let error = match protocol {
        Protocol::Http1 => serve_http1(agent, upstream, exchange.clone()).await,
        Protocol::Http2 => serve_http2(agent, upstream, exchange.clone()).await,
    }
    .err();
    let tunnels = std::mem::take(&mut *exchange.tunnels.lock().expect("tunnels lock"));
    for tunnel in tunnels {
        let _ = tunnel.await;
    }
    HttpReport {
        requests: exchange.requests.load(Ordering::Relaxed),
        blocked: exchange.blocked.load(Ordering::Relaxed),
        up_bytes: exchange.up_bytes.load(Ordering::Relaxed),
        down_bytes: exchange.down_bytes.load(Ordering::Relaxed),
        error,
    }
}

async fn serve_http1<A, U>(agent: A, upstream: U, exchange: Arc<Exchange>) -> Result<(), String>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Header names go on as the agent wrote them: a server may (wrongly) care.
    let (sender, connection) = client1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(upstream))
        .await
        .map_err(|e| format!("upstream: {e}"))?;
    let upstream_task = tokio::spawn(connection.with_upgrades());
    let upstream = Upstream::Http1(Arc::new(tokio::sync::Mutex::new(sender)));
    let service = service_fn(move |request| forward(request, upstream.clone(), exchange.clone()));
    let served = server1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(agent), service)
        .with_upgrades()
        .await;
    upstream_task.abort();
    served.map_err(|e| format!("agent: {e}"))
}

async fn serve_http2<A, U>(agent: A, upstream: U, exchange: Arc<Exchange>) -> Result<(), String>
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = client2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(upstream))
        .await
        .map_err(|e| format!("upstream: {e}"))?;
    let upstream_task = tokio::spawn(connection);
    let upstream = Upstream::Http2(sender);
    let service = service_fn(move |request| forward(request, upstream.clone(), exchange.clone()));
    let served = server2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(agent), service)
        .await;
    upstream_task.abort();
    served.map_err(|e| format!("agent: {e}"))
}

/// One request: judged, passed on, and its response passed back.
async fn forward(
    mut request: Request<Incoming>,
    upstream: Upstream,
    exchange: Arc<Exchange>,
) -> Result<Response<ProxyBody>, Infallible> {
    exchange.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(host) = misdirected(&request, &exchange.name) {
        (exchange.events)(Event::Misdirected { host: host.clone() });
        let message = format!(
            "this connection is for {}, not {host}: open another connection",
            exchange.name
        );
        return Ok(reply(StatusCode::MISDIRECTED_REQUEST, &message));
    }
    let stopped = Arc::new(AtomicBool::new(false));
    let on_hit = exchange.on_hit(stopped.clone());
    if let Some(detector) = search_head(&request, &exchange.up, &on_hit) {
        return Ok(blocked_reply(&exchange.up, detector));
    }
    if exchange.mcp.is_some() && may_be_rpc(&request) {
        return Ok(forward_rpc(request, upstream, exchange, on_hit, stopped).await);
    }
    let agent_upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    let decoding = Decoding::for_header(
        request
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
        exchange.limits,
    );
    let (parts, body) = request.into_parts();
    let body = InspectedBody::new(
        body,
        exchange.up.clone(),
        Direction::Up,
        decoding,
        !exchange.monitor,
        on_hit.clone(),
        exchange.up_bytes.clone(),
    );
    let sent = upstream
        .send(Request::from_parts(parts, body.boxed()))
        .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(_) if stopped.load(Ordering::Relaxed) => {
            return Ok(stopped_reply());
        }
        Err(e) => {
            tracing::debug!(error = %e, "proxy: upstream request failed");
            return Ok(reply(StatusCode::BAD_GATEWAY, "the server did not answer"));
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(agent_upgrade) = agent_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let tunnel = tokio::spawn(tunnel(agent_upgrade, upstream_upgrade, exchange.clone()));
        exchange.tunnels.lock().expect("tunnels lock").push(tunnel);
    }
    Ok(respond(response, &exchange))
}

/// The server's response, passed back: its body searched by the downstream detectors
/// when there are any, counted either way.
fn respond(response: Response<Incoming>, exchange: &Arc<Exchange>) -> Response<ProxyBody> {
    let decoding = Decoding::for_header(
        response
            .headers()
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
        exchange.limits,
    );
    let (parts, body) = response.into_parts();
    let body = if exchange.down.is_empty() {
        let counter = exchange.down_bytes.clone();
        body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        })
        .map_err(BoxError::from)
        .boxed()
    } else {
        InspectedBody::new(
            body,
            exchange.down.clone(),
            Direction::Down,
            decoding,
            false,
            exchange.on_hit(Arc::new(AtomicBool::new(false))),
            exchange.down_bytes.clone(),
        )
        .boxed()
    };
    Response::from_parts(parts, body)
}

/// Largest request body the MCP gate reads whole; a larger JSON body of a gated agent
/// is refused (413) rather than passed unjudged.
pub const MAX_RPC_BODY: usize = 8 << 20;

/// Whether a request may carry JSON-RPC: a POST with a JSON content type or any of the
/// MCP transport's headers (the SDKs send both).
fn may_be_rpc(request: &Request<Incoming>) -> bool {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .to_ascii_lowercase()
                .contains("json")
        });
    let mcp_headers = request
        .headers()
        .keys()
        .any(|k| mcp::is_mcp_header(k.as_str()));
    request.method() == http::Method::POST && (json || mcp_headers)
}

/// A request that may carry JSON-RPC, from an agent with an MCP gate: the body is read
/// whole (searched by the detectors on the way, as any body), parsed, and each call
/// judged; a refused call is answered with a JSON-RPC error and nothing is forwarded.
async fn forward_rpc(
    request: Request<Incoming>,
    upstream: Upstream,
    exchange: Arc<Exchange>,
    on_hit: OnHit,
    stopped: Arc<AtomicBool>,
) -> Response<ProxyBody> {
    let Some((gate, agent)) = exchange.mcp.clone() else {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, "no MCP gate");
    };
    let header_text = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (mcp_method, mcp_name) = (header_text("mcp-method"), header_text("mcp-name"));
    let has_mcp_headers = request
        .headers()
        .keys()
        .any(|k| mcp::is_mcp_header(k.as_str()));
    let encoding = request.headers().get(header::CONTENT_ENCODING).cloned();
    let decoding = || {
        Decoding::for_header(
            encoding.as_ref().map(HeaderValue::as_bytes),
            exchange.limits,
        )
    };
    let path = request.uri().path().to_string();
    let (parts, body) = request.into_parts();
    let body = InspectedBody::new(
        body,
        exchange.up.clone(),
        Direction::Up,
        decoding(),
        !exchange.monitor,
        on_hit,
        Arc::default(),
    );
    let encoded = match http_body_util::Limited::new(body, MAX_RPC_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) if stopped.load(Ordering::Relaxed) => return stopped_reply(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message =
                format!("a JSON body over {MAX_RPC_BODY} bytes cannot be judged by the MCP gate");
            return reply(StatusCode::PAYLOAD_TOO_LARGE, &message);
        }
        Err(e) => {
            tracing::debug!(error = %e, "proxy: reading a JSON body");
            return reply(StatusCode::BAD_REQUEST, "the request body ended early");
        }
    };
    // Decoded again for the parse: the search above saw it decoded too, but passes the
    // encoded bytes on.
    let plain = match decoding() {
        Decoding::Decoder(mut decoder) => {
            let mut out = Vec::new();
            match decoder
                .push(&encoded, &mut out)
                .and_then(|()| decoder.finish(&mut out))
            {
                Ok(()) => Bytes::from(out),
                // Only reachable in monitor mode (the search stopped it otherwise).
                Err(_) => Bytes::new(),
            }
        }
        _ => encoded.clone(),
    };
    let detail = |call: &mcp::Call, server: Option<String>| McpDetail {
        server,
        path: path.clone(),
        method: call.method.clone(),
        tool: call.tool.clone(),
    };
    let calls = match mcp::parse(&plain) {
        mcp::Parsed::NotJson => Vec::new(),
        mcp::Parsed::Malformed(why) => {
            (exchange.events)(Event::Mcp {
                reason: "mcp_malformed",
                blocked: !exchange.monitor,
                detail: McpDetail {
                    server: None,
                    path: path.clone(),
                    method: String::new(),
                    tool: None,
                },
                message: Some(why.clone()),
            });
            if !exchange.monitor {
                let message = format!("refused by the enforcer: malformed JSON-RPC ({why})");
                return rpc_reply(mcp::error_reply(None, mcp::CODE_BLOCKED, &message));
            }
            Vec::new()
        }
        mcp::Parsed::Rpc(calls) => calls,
    };
    let now = tokio::time::Instant::now();
    // Per call: (id, code, message), code 0 for a call that may pass.
    let mut answers = Vec::new();
    let mut refused = false;
    for call in &calls {
        if !(has_mcp_headers || mcp::is_mcp_method(&call.method)) {
            // JSON-RPC that is not MCP (another protocol): not the gate's business.
            answers.push((call.id.clone(), 0, String::new()));
            continue;
        }
        let mismatch = mcp::header_mismatch(call, mcp_method.as_deref(), mcp_name.as_deref());
        let verdict = match mismatch {
            Some(why) => mcp::Verdict::Refuse {
                server: None,
                code: mcp::CODE_BLOCKED,
                reason: "mcp_malformed",
                message: why,
            },
            None => gate.judge(agent, &exchange.name, &path, call, now),
        };
        let (reason, blocked, server, message, code) = match verdict {
            mcp::Verdict::Pass { server } if call.method == "tools/call" => {
                ("mcp_call", false, server, None, 0)
            }
            mcp::Verdict::Pass { .. } => {
                answers.push((call.id.clone(), 0, String::new()));
                continue;
            }
            mcp::Verdict::Flag {
                server,
                reason,
                message,
            } => (reason, false, server, Some(message), 0),
            mcp::Verdict::Refuse {
                server,
                code,
                reason,
                message,
            } => (reason, !exchange.monitor, server, Some(message), code),
        };
        (exchange.events)(Event::Mcp {
            reason,
            blocked,
            detail: detail(call, server),
            message: message.clone(),
        });
        refused |= blocked;
        let code = if blocked { code } else { 0 };
        answers.push((
            call.id.clone(),
            code,
            format!("refused by the enforcer: {}", message.unwrap_or_default()),
        ));
    }
    if refused {
        // One refused call stops its whole body: a batch is one message to the server.
        let batch = plain.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        let errors: Vec<_> = answers
            .into_iter()
            .map(|(id, code, message)| match code {
                0 => (
                    id,
                    mcp::CODE_BLOCKED,
                    "not forwarded: another request in this batch was refused".to_string(),
                ),
                _ => (id, code, message),
            })
            .collect();
        let body = if batch {
            mcp::batch_reply(&errors)
        } else {
            errors
                .first()
                .filter(|(id, _, _)| id.is_some())
                .map(|(id, code, message)| mcp::error_reply(id.as_ref(), *code, message))
        };
        return match body {
            Some(body) => rpc_reply(body),
            // Notifications only: JSON-RPC has no answer for them.
            None => reply(StatusCode::FORBIDDEN, "refused by the enforcer's MCP gate"),
        };
    }
    exchange
        .up_bytes
        .fetch_add(encoded.len() as u64, Ordering::Relaxed);
    let request = Request::from_parts(parts, Full::new(encoded).map_err(BoxError::from).boxed());
    match upstream.send(request).await {
        Ok(response) => respond(response, &exchange),
        Err(e) => {
            tracing::debug!(error = %e, "proxy: upstream request failed");
            reply(StatusCode::BAD_GATEWAY, "the server did not answer")
        }
    }
}

/// A JSON-RPC answer from the proxy itself: HTTP 200 with the error object(s), which
/// the MCP client hands to its caller as an error it can read.
fn rpc_reply(body: Vec<u8>) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(BoxError::from).boxed());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The name a request asks for, when it is not the connection's: from an absolute URI
/// (HTTP/2's `:authority` arrives there too) or the `Host` header, each checked.
fn misdirected(request: &Request<Incoming>, name: &str) -> Option<String> {
    let same = |host: &str| {
        host.trim_end_matches('.')
            .eq_ignore_ascii_case(name.trim_end_matches('.'))
    };
    if let Some(host) = request.uri().host()
        && !same(host.trim_start_matches('[').trim_end_matches(']'))
    {
        return Some(host.to_string());
    }
    let header = request.headers().get(header::HOST)?;
    let text = String::from_utf8_lossy(header.as_bytes()).into_owned();
    match text.parse::<http::uri::Authority>() {
        Ok(authority)
            if same(
                authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']'),
            ) =>
        {
            None
        }
        _ => Some(text),
    }
}

/// Searches the request head, written out as HTTP/1 text (`METHOD target VERSION`, then
/// `name: value` lines) whatever the protocol, so one detector matches a header in both.
/// Returns the block detector that matched.
fn search_head(
    request: &Request<Incoming>,
    detectors: &Detectors,
    on_hit: &OnHit,
) -> Option<usize> {
    if detectors.is_empty() {
        return None;
    }
    let mut head = format!(
        "{} {} {:?}\r\n",
        request.method(),
        request.uri(),
        request.version()
    )
    .into_bytes();
    for (name, value) in request.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut scanner = detectors.scanner();
    let found = |detector| Found {
        detector,
        direction: Direction::Up,
    };
    let scan = match scanner.feed(detectors, &head) {
        Scan::Pass { mut flagged, .. } => match scanner.finish(detectors) {
            Scan::Pass { flagged: more, .. } => {
                flagged.extend(more);
                Scan::Pass {
                    release: Vec::new(),
                    flagged,
                }
            }
            Scan::Block {
                detector,
                flagged: more,
            } => {
                flagged.extend(more);
                Scan::Block { detector, flagged }
            }
        },
        block => block,
    };
    match scan {
        Scan::Pass { flagged, .. } => {
            for detector in flagged {
                on_hit(BodyEvent::Detector(found(detector), false));
            }
            None
        }
        Scan::Block { detector, flagged } => {
            for detector in flagged {
                on_hit(BodyEvent::Detector(found(detector), false));
            }
            on_hit(BodyEvent::Detector(found(detector), true));
            Some(detector)
        }
    }
}

/// An upgraded connection (WebSocket and the like): both sides' streams, relayed and
/// searched as bytes.
async fn tunnel(
    agent: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    exchange: Arc<Exchange>,
) {
    let (Ok(agent), Ok(upstream)) = tokio::join!(agent, upstream) else {
        return;
    };
    let on_hit = exchange.on_hit(Arc::new(AtomicBool::new(false)));
    let report = relay::userspace_relay(
        TokioIo::new(agent),
        TokioIo::new(upstream),
        exchange.up.clone(),
        exchange.down.clone(),
        |detector, direction| {
            on_hit(BodyEvent::Detector(
                Found {
                    detector,
                    direction,
                },
                false,
            ))
        },
    )
    .await;
    exchange
        .up_bytes
        .fetch_add(report.up_bytes, Ordering::Relaxed);
    exchange
        .down_bytes
        .fetch_add(report.down_bytes, Ordering::Relaxed);
    if let Some(hit) = report.hit {
        on_hit(BodyEvent::Detector(
            Found {
                detector: hit.detector,
                direction: hit.direction,
            },
            true,
        ));
    }
}

fn reply(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(BoxError::from)
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn blocked_reply(detectors: &Detectors, detector: usize) -> Response<ProxyBody> {
    reply(
        StatusCode::FORBIDDEN,
        &format!(
            "blocked by the enforcer: detector {}",
            detectors.name(detector)
        ),
    )
}

/// The answer to a request whose body a detector stopped (already reported by its hit).
fn stopped_reply() -> Response<ProxyBody> {
    let mut response = reply(
        StatusCode::FORBIDDEN,
        "blocked by the enforcer: a detector matched the body",
    );
    // The server saw a message cut short; this connection cannot carry another.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
