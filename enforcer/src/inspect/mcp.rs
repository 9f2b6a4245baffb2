//! MCP (Model Context Protocol, JSON-RPC 2.0 over HTTP) recognition and the gate.
//!
//! [`parse`] reads a request body with serde_json, so whitespace, `\/` and `\u0074`
//! escapes and any key order read as the server reads them; a repeated key among the
//! fields the gate looks at (`jsonrpc`, `id`, `method`, `params`, `params.name`,
//! `params.uri`) is an error, which closes the "last key wins here, first key wins there"
//! dodge. [`Gate::judge`] then checks one call against the policy's registry
//! (`[[mcp_servers]]`) and the agent's grants (`[agents.mcp]`): shadow server, tool
//! allow-list, `tools/call` rate, `tools/call` quota. Refusals are JSON-RPC errors
//! ([`error_reply`]) with codes clear of the MCP SDKs' own.

use std::{collections::HashMap, fmt, sync::Mutex};

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::Value;
use tokio::time::Instant;

use crate::policy::{
    AgentMcp, McpGrant, McpPath, McpQuota, McpRate, McpServer, McpShadow, Policy, normalize_name,
};

/// JSON-RPC error code: the MCP server is not approved for this agent.
pub const CODE_SHADOW: i64 = -32090;
/// JSON-RPC error code: the tool is not on the agent's allow-list for this server.
pub const CODE_TOOL_DENIED: i64 = -32091;
/// JSON-RPC error code: the agent's `tools/call` rate or quota for this server is spent.
pub const CODE_LIMITED: i64 = -32092;
/// JSON-RPC error code: the request was blocked by a DLP detector, or is malformed.
pub const CODE_BLOCKED: i64 = -32093;

/// Request headers that make a request MCP whatever its body (the streamable HTTP
/// transport; `Mcp-Method` from the 2026-07-28 revision on). Lower case, as `http`'s
/// `HeaderName` spells them.
pub const MCP_HEADERS: [&str; 3] = ["mcp-session-id", "mcp-protocol-version", "mcp-method"];

/// Whether the header called `name` (any case) is one of [`MCP_HEADERS`].
pub fn is_mcp_header(name: &str) -> bool {
    MCP_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// One JSON-RPC request or notification of a body.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The request id as sent (`None` for a notification; `Some(Null)` for `"id": null`).
    pub id: Option<Value>,
    /// The method.
    pub method: String,
    /// `params.name` of a `tools/call`, if it is a string.
    pub tool: Option<String>,
    /// `params.uri` of a `resources/read`, if it is a string.
    pub uri: Option<String>,
}

/// What a request body is.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    /// Not JSON-RPC: not JSON at all (does not start with `{` or `[`), or JSON with neither
    /// `jsonrpc` nor a string `method` (an ordinary JSON API body).
    NotJson,
    /// JSON-RPC: the requests and notifications, in body order. Responses the client sends
    /// (to a server's `sampling/*` or `elicitation/*` request: `result` or `error`, no
    /// `method`) are not calls and are left out, so a body of responses only is
    /// `Rpc(vec![])`.
    Rpc(Vec<Call>),
    /// Starts like JSON but does not parse (syntax, trailing bytes, a repeated key the gate
    /// reads), or is JSON-RPC-shaped but invalid (`jsonrpc` not `"2.0"` beside a method, an
    /// empty batch, a batch mixing messages and other values). The message is serde's, with
    /// line and column, or says what is wrong.
    Malformed(String),
}

/// `params` as the gate sees it. Anything but an object (JSON-RPC allows positional
/// params; MCP never uses them) has no name and no uri.
#[derive(Default)]
struct Params {
    name: Option<Value>,
    uri: Option<Value>,
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Params, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Params;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("JSON-RPC params")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut p = Params::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key.0.as_str() {
                        "name" => &mut p.name,
                        "uri" => &mut p.uri,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.is_some() {
                        return Err(de::Error::custom(format_args!(
                            "duplicate field `params.{}`",
                            key.0
                        )));
                    }
                    *slot = Some(map.next_value()?);
                }
                Ok(p)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Params, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Params::default())
            }

            fn visit_unit<E: de::Error>(self) -> Result<Params, E> {
                Ok(Params::default())
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Params, E> {
                Ok(Params::default())
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Params, E> {
                Ok(Params::default())
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Params, E> {
                Ok(Params::default())
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Params, E> {
                Ok(Params::default())
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Params, E> {
                Ok(Params::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// An object key, unescaped (serde_json hands escaped keys over as owned strings).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        String::deserialize(d).map(Key)
    }
}

/// One element of a body: an object read for the fields JSON-RPC has, or another value.
///
/// Hand-written rather than derived: a derived struct also accepts an *array* positionally
/// (`["2.0", 1, "tools/call"]` would read as a call), and this one keeps any value that is
/// not an object apart so an ordinary JSON array body is not taken for a batch.
enum Element {
    Object(Box<Message>),
    Other,
}

#[derive(Default)]
struct Message {
    jsonrpc: Option<Value>,
    id: Option<Value>,
    method: Option<Value>,
    params: Option<Params>,
    /// `result` or `error` present: a response.
    response: bool,
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Element, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Element;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Element, A::Error> {
                let mut m = Message::default();
                let mut result = false;
                let mut error = false;
                while let Some(key) = map.next_key::<Key>()? {
                    let name = key.0.as_str();
                    let dup = match name {
                        "jsonrpc" | "id" | "method" => {
                            let slot = match name {
                                "jsonrpc" => &mut m.jsonrpc,
                                "id" => &mut m.id,
                                _ => &mut m.method,
                            };
                            let dup = slot.is_some();
                            if !dup {
                                *slot = Some(map.next_value()?);
                            }
                            dup
                        }
                        "params" => {
                            let dup = m.params.is_some();
                            if !dup {
                                m.params = Some(map.next_value()?);
                            }
                            dup
                        }
                        "result" | "error" => {
                            let seen = if name == "result" {
                                &mut result
                            } else {
                                &mut error
                            };
                            let dup = *seen;
                            *seen = true;
                            if !dup {
                                map.next_value::<IgnoredAny>()?;
                            }
                            dup
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            false
                        }
                    };
                    if dup {
                        // The same message serde's derived structs give.
                        return Err(de::Error::custom(format_args!("duplicate field `{name}`")));
                    }
                }
                m.response = result || error;
                Ok(Element::Object(Box::new(m)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Element::Other)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Element, E> {
                Ok(Element::Other)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Element, E> {
                Ok(Element::Other)
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Element, E> {
                Ok(Element::Other)
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Element, E> {
                Ok(Element::Other)
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Element, E> {
                Ok(Element::Other)
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<Element, E> {
                Ok(Element::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// What one element is.
enum Kind {
    /// Not JSON-RPC.
    Plain,
    /// A request or notification.
    Call(Call),
    /// A response from the client.
    Response,
}

fn classify(e: Element) -> Result<Kind, String> {
    let Element::Object(m) = e else {
        return Ok(Kind::Plain);
    };
    let method = match m.method {
        Some(Value::String(s)) => Some(s),
        Some(_) if m.jsonrpc.is_some() => return Err("`method` is not a string".into()),
        _ => None,
    };
    if m.jsonrpc.is_none() && method.is_none() {
        return Ok(Kind::Plain);
    }
    if m.jsonrpc != Some(Value::String("2.0".into())) {
        return Err(format!(
            "`jsonrpc` must be \"2.0\", got {}",
            m.jsonrpc
                .map_or_else(|| "nothing".into(), |v| v.to_string())
        ));
    }
    let Some(method) = method else {
        return if m.response {
            Ok(Kind::Response)
        } else {
            Err("a JSON-RPC message has a method, a result or an error".into())
        };
    };
    let params = m.params.unwrap_or_default();
    let text = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let tool = if method == "tools/call" {
        text(params.name)
    } else {
        None
    };
    let uri = if method == "resources/read" {
        text(params.uri)
    } else {
        None
    };
    Ok(Kind::Call(Call {
        id: m.id,
        method,
        tool,
        uri,
    }))
}

/// Reads a request body (already decoded from its Content-Encoding).
pub fn parse(body: &[u8]) -> Parsed {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    let kinds = match first {
        Some(b'{') => serde_json::from_slice::<Element>(body).map(|e| vec![e]),
        Some(b'[') => serde_json::from_slice::<Vec<Element>>(body),
        _ => return Parsed::NotJson,
    };
    let batch = first == Some(&b'[');
    let elements = match kinds {
        Ok(elements) => elements,
        Err(e) => return Parsed::Malformed(e.to_string()),
    };
    if batch && elements.is_empty() {
        return Parsed::Malformed("an empty batch".into());
    }
    let (mut calls, mut plain, mut responses) = (Vec::new(), 0, 0);
    for (i, e) in elements.into_iter().enumerate() {
        match classify(e) {
            Ok(Kind::Plain) => plain += 1,
            Ok(Kind::Call(c)) => calls.push(c),
            Ok(Kind::Response) => responses += 1,
            Err(why) if batch => return Parsed::Malformed(format!("batch element {i}: {why}")),
            Err(why) => return Parsed::Malformed(why),
        }
    }
    match (plain, calls.len() + responses) {
        (0, _) => Parsed::Rpc(calls),
        (_, 0) => Parsed::NotJson,
        _ => Parsed::Malformed("a batch mixes JSON-RPC messages and other values".into()),
    }
}

/// Whether `m` is an MCP method (the 2025-11-25 and 2026-07-28 revisions' families).
pub fn is_mcp_method(m: &str) -> bool {
    const EXACT: [&str; 4] = [
        "initialize",
        "ping",
        "completion/complete",
        "logging/setLevel",
    ];
    const FAMILIES: [&str; 8] = [
        "tools/",
        "resources/",
        "prompts/",
        "notifications/",
        "roots/",
        "sampling/",
        "elicitation/",
        "tasks/",
    ];
    EXACT.contains(&m) || FAMILIES.iter().any(|f| m.starts_with(f))
}

/// Why the `Mcp-Method` and `Mcp-Name` headers disagree with the body's call, if they do:
/// the server acts on the body and may route on the headers, and the gate must judge the
/// call that is acted on. `Mcp-Name` is compared with the tool of a `tools/call` and the
/// uri of a `resources/read`; for other methods the gate reads no name to compare.
pub fn header_mismatch(
    call: &Call,
    mcp_method: Option<&str>,
    mcp_name: Option<&str>,
) -> Option<String> {
    if let Some(m) = mcp_method
        && m != call.method
    {
        return Some(format!(
            "the Mcp-Method header says {m:?}, the body's method is {:?}",
            call.method
        ));
    }
    let body_name = match call.method.as_str() {
        "tools/call" => call.tool.as_deref(),
        "resources/read" => call.uri.as_deref(),
        _ => return None,
    };
    match mcp_name {
        Some(n) if Some(n) != body_name => Some(format!(
            "the Mcp-Name header says {n:?}, the body names {}",
            body_name.map_or_else(|| "nothing".to_owned(), |b| format!("{b:?}"))
        )),
        _ => None,
    }
}

/// The JSON-RPC error object for a refused request: `{"jsonrpc":"2.0","id":…,"error":
/// {"code":…,"message":…}}`, with `"id": null` when the id is unknown.
pub fn error_reply(id: Option<&Value>, code: i64, message: &str) -> Vec<u8> {
    serde_json::to_vec(&error_object(id, code, message)).unwrap_or_default()
}

fn error_object(id: Option<&Value>, code: i64, message: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": { "code": code, "message": message },
    })
}

/// The reply to a refused batch: one error object per request (`(id, code, message)`),
/// notifications (no id) left out as JSON-RPC says; `None` when nothing is left (a batch
/// of notifications gets no body).
pub fn batch_reply(errors: &[(Option<Value>, i64, String)]) -> Option<Vec<u8>> {
    let items: Vec<Value> = errors
        .iter()
        .filter(|(id, _, _)| id.is_some())
        .map(|(id, code, message)| error_object(id.as_ref(), *code, message))
        .collect();
    if items.is_empty() {
        return None;
    }
    serde_json::to_vec(&items).ok()
}

/// The gate's decision on one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it. `server` is the registry's name for the destination, if it has one.
    Pass {
        /// The matched `[[mcp_servers]]` entry.
        server: Option<String>,
    },
    /// Answer it with a JSON-RPC error and do not forward it.
    Refuse {
        /// The matched `[[mcp_servers]]` entry.
        server: Option<String>,
        /// The JSON-RPC error code.
        code: i64,
        /// The audit reason (`mcp_shadow`, `mcp_tool_denied`, `mcp_rate_limited`,
        /// `mcp_quota`).
        reason: &'static str,
        /// The error message for the client.
        message: String,
    },
    /// Forward it, and audit it as flagged.
    Flag {
        /// The matched `[[mcp_servers]]` entry.
        server: Option<String>,
        /// The audit reason (`mcp_shadow`).
        reason: &'static str,
        /// What was flagged.
        message: String,
    },
}

/// Which bucket of a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Bucket {
    Rate,
    Quota,
}

/// A bucket's shape: `count` tokens, one refilled every `span_ns / per` ns. GCRA on an
/// exact integer clock: time is kept in units of `1/per` ns, so the emission interval is
/// `span_ns` units, without rounding (60 s / 7 calls is not a whole number of ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    count: u64,
    per: u64,
    span_ns: u128,
}

impl Shape {
    /// `calls_per_minute` with `burst`.
    fn rate(r: McpRate) -> Shape {
        Shape {
            count: r.burst,
            per: r.per_minute,
            span_ns: 60_000_000_000,
        }
    }

    /// `quota` calls per `quota_seconds`: a bucket of `quota` tokens, refilled over the
    /// period.
    fn quota(q: McpQuota) -> Shape {
        Shape {
            count: q.calls,
            per: q.calls,
            span_ns: u128::from(q.seconds) * 1_000_000_000,
        }
    }

    /// The bucket's new `tat` if one more call fits at `now_ns`, else `None`. The bucket
    /// is full when `tat <= now`; each call adds one emission interval; a call fits while
    /// `tat` stays within `count` intervals of `now`: `count` calls at once, then one per
    /// interval, exactly a token bucket.
    fn admit(&self, tat: Option<u128>, now_ns: u128) -> Option<u128> {
        let now = now_ns * u128::from(self.per);
        let new = tat.unwrap_or(0).max(now) + self.span_ns;
        (new - now <= self.span_ns * u128::from(self.count)).then_some(new)
    }
}

/// The state of one bucket: its shape (a changed shape is a new bucket) and its
/// theoretical arrival time, in units of `1/per` ns since the gate's epoch.
#[derive(Clone, Copy, Debug)]
struct Tat {
    shape: Shape,
    tat: u128,
}

/// The shape of `grant`'s bucket `kind`, if it has one.
fn shape_of(grant: &McpGrant, kind: Bucket) -> Option<Shape> {
    match kind {
        Bucket::Rate => grant.rate.map(Shape::rate),
        Bucket::Quota => grant.quota.map(Shape::quota),
    }
}

type BucketKey = (u32, String, Bucket);

/// The MCP gate: the policy's registry and grants, and the token buckets of every
/// (agent, server, rate or quota).
pub struct Gate {
    config: Mutex<Config>,
    buckets: Mutex<HashMap<BucketKey, Tat>>,
    /// Bucket time zero.
    epoch: Instant,
}

struct Config {
    servers: Vec<McpServer>,
    agents: HashMap<u32, AgentMcp>,
}

impl Config {
    fn new(policy: &Policy) -> Config {
        Config {
            servers: policy.mcp_servers().to_vec(),
            agents: policy
                .agents()
                .iter()
                .filter_map(|a| Some((a.id, a.mcp()?.clone())))
                .collect(),
        }
    }

    /// Every bucket the grants have, with its shape.
    fn shapes(&self) -> HashMap<BucketKey, Shape> {
        let mut out = HashMap::new();
        for (&agent, mcp) in &self.agents {
            for g in &mcp.servers {
                for kind in [Bucket::Rate, Bucket::Quota] {
                    if let Some(shape) = shape_of(g, kind) {
                        out.insert((agent, g.server.clone(), kind), shape);
                    }
                }
            }
        }
        out
    }

    /// The registry entry for a request to `host` at `path` (query and fragment cut off):
    /// an exact path first, else the longest prefix. A path a server could read as another
    /// (dot segments, an encoded dot, slash or backslash) is no entry's: `/mcp/../admin`
    /// must not pass as `/mcp/*`.
    fn lookup(&self, host: &str, path: &str) -> Option<&McpServer> {
        let host = normalize_name(host).ok()?;
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let lower = path.to_ascii_lowercase();
        if path.split('/').any(|seg| seg == "." || seg == "..")
            || path.contains('\\')
            || ["%2e", "%2f", "%5c"].iter().any(|e| lower.contains(e))
        {
            return None;
        }
        self.servers
            .iter()
            .filter(|s| s.host == host && s.path.matches(path))
            .max_by_key(|s| match &s.path {
                McpPath::Exact(_) => usize::MAX,
                McpPath::Prefix(p) => p.len(),
            })
    }
}

impl Gate {
    /// A gate for `policy`'s registry and the grants of its agents (pass the policy with
    /// its profile instances, [`Policy::with_agents`], so that they are gated too).
    pub fn new(policy: &Policy) -> Gate {
        Gate {
            config: Mutex::new(Config::new(policy)),
            buckets: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    /// Takes a new policy: buckets of grants whose rate or quota is unchanged keep their
    /// state (a policy push must not hand every agent a fresh burst); the others go.
    pub fn update(&self, policy: &Policy) {
        let config = Config::new(policy);
        let shapes = config.shapes();
        self.buckets
            .lock()
            .unwrap()
            .retain(|key, tat| shapes.get(key) == Some(&tat.shape));
        *self.config.lock().unwrap() = config;
    }

    /// Judges one call of agent `agent_id` to `host` (the TLS server name) at `path` (the
    /// request target's path, query allowed) at `now`. In order: the registry entry for
    /// (host, path); not granted to this agent → the agent's `shadow` (Refuse
    /// [`CODE_SHADOW`] or Flag, reason `mcp_shadow`); a `tools/call` of a tool not on the
    /// allow-list → Refuse [`CODE_TOOL_DENIED`] `mcp_tool_denied`; the rate bucket → Refuse
    /// [`CODE_LIMITED`] `mcp_rate_limited`; the quota bucket → Refuse [`CODE_LIMITED`]
    /// `mcp_quota`. Only `tools/call` takes from the buckets, and only when it passes.
    /// An agent without `[agents.mcp]` always passes.
    pub fn judge(
        &self,
        agent_id: u32,
        host: &str,
        path: &str,
        call: &Call,
        now: Instant,
    ) -> Verdict {
        let config = self.config.lock().unwrap();
        let server = config.lookup(host, path).map(|s| s.name.clone());
        let Some(mcp) = config.agents.get(&agent_id) else {
            return Verdict::Pass { server };
        };
        let grant: Option<&McpGrant> = server.as_deref().and_then(|s| mcp.grant(s));
        let Some(grant) = grant else {
            let message = match &server {
                Some(s) => format!("MCP server \"{s}\" is not approved for this agent"),
                None => format!("{host}{path} is not an approved MCP server"),
            };
            return match mcp.shadow {
                McpShadow::Block => Verdict::Refuse {
                    server,
                    code: CODE_SHADOW,
                    reason: "mcp_shadow",
                    message,
                },
                McpShadow::Flag => Verdict::Flag {
                    server,
                    reason: "mcp_shadow",
                    message,
                },
            };
        };
        if call.method != "tools/call" {
            return Verdict::Pass { server };
        }
        let tool = call.tool.as_deref();
        if grant.tools.is_some() && !tool.is_some_and(|t| grant.allows_tool(t)) {
            let message = match tool {
                Some(t) => format!(
                    "tool \"{t}\" is not allowed on MCP server \"{}\"",
                    grant.server
                ),
                None => "a tools/call without a tool name".to_owned(),
            };
            return Verdict::Refuse {
                server,
                code: CODE_TOOL_DENIED,
                reason: "mcp_tool_denied",
                message,
            };
        }
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos();
        let mut buckets = self.buckets.lock().unwrap();
        let mut taken = Vec::with_capacity(2);
        for (kind, reason, what) in [
            (Bucket::Rate, "mcp_rate_limited", "rate"),
            (Bucket::Quota, "mcp_quota", "quota"),
        ] {
            let Some(shape) = shape_of(grant, kind) else {
                continue;
            };
            let key = (agent_id, grant.server.clone(), kind);
            let tat = buckets
                .get(&key)
                .filter(|t| t.shape == shape)
                .map(|t| t.tat);
            match shape.admit(tat, now_ns) {
                Some(new) => taken.push((key, Tat { shape, tat: new })),
                None => {
                    return Verdict::Refuse {
                        server,
                        code: CODE_LIMITED,
                        reason,
                        message: format!(
                            "the tools/call {what} for MCP server \"{}\" is spent",
                            grant.server
                        ),
                    };
                }
            }
        }
        // Both passed: only now is anything taken, so a refused call costs nothing.
        buckets.extend(taken);
        Verdict::Pass { server }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::policy;

    fn calls(body: &str) -> Vec<Call> {
        match parse(body.as_bytes()) {
            Parsed::Rpc(calls) => calls,
            other => panic!("{body}: {other:?}"),
        }
    }

    fn one(body: &str) -> Call {
        let mut c = calls(body);
        assert_eq!(c.len(), 1, "{body}");
        c.remove(0)
    }

    fn malformed(body: &str) -> String {
        match parse(body.as_bytes()) {
            Parsed::Malformed(m) => m,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn the_method_reads_as_the_server_reads_it() {
        let expect = Call {
            id: Some(json!(7)),
            method: "tools/call".into(),
            tool: Some("get_file".into()),
            uri: None,
        };
        for body in [
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_file"}}"#,
            r#"{"jsonrpc" : "2.0" , "id" : 7 , "method" : "tools/call" , "params" : { "name" : "get_file" } }"#,
            r#"{"jsonrpc":"2.0","id":7,"method":"tools\/call","params":{"name":"get_file"}}"#,
            r#"{"jsonrpc":"2.0","id":7,"method":"\u0074ools/call","params":{"\u006eame":"get\u005ffile"}}"#,
            r#"{"params":{"arguments":{"path":"x"},"name":"get_file"},"method":"tools/call","id":7,"jsonrpc":"2.0"}"#,
            "\u{feff} \n{\n  \"jsonrpc\": \"2.0\",\n  \"id\": 7,\n  \"method\": \"tools/call\",\n  \"params\": {\n    \"name\": \"get_file\"\n  }\n}\n",
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_file","meta":{"name":"x","name":"y"}},"extra":1,"extra":2}"#,
        ] {
            assert_eq!(one(body), expect, "{body}");
        }
        let read = one(
            r#"{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}}"#,
        );
        assert_eq!(read.uri.as_deref(), Some("file:///x"));
        assert_eq!(read.tool, None);
        let note = one(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(note.id, None);
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#).id,
            Some(Value::Null)
        );
        // Positional params have no name.
        assert_eq!(
            one(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["get_file"]}"#).tool,
            None
        );
    }

    #[test]
    fn repeated_keys_are_malformed() {
        for body in [
            r#"{"method":"ping","method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"},"params":{"name":"b"}}"#,
            r#"{"jsonrpc":"2.0","jsonrpc":"2.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","\u006dethod":"tools/call"}"#,
        ] {
            let m = malformed(body);
            assert!(m.contains("duplicate field"), "{body}: {m}");
            assert!(m.contains("line 1 column"), "{body}: {m}");
        }
    }

    #[test]
    fn other_malformed_bodies() {
        assert!(malformed(r#"{"jsonrpc":"2.0","method":"ping""#).contains("EOF while parsing"));
        assert!(
            malformed(r#"{"jsonrpc":"2.0","method":"ping"} trailing"#)
                .contains("trailing characters")
        );
        assert!(malformed(r#"{"jsonrpc":"1.0","id":1,"method":"tools/call"}"#).contains("\"2.0\""));
        assert!(malformed(r#"{"id":1,"method":"tools/call"}"#).contains("`jsonrpc` must be"));
        assert!(
            malformed(r#"{"jsonrpc":"2.0","id":1}"#).contains("a method, a result or an error")
        );
        assert!(malformed(r#"{"jsonrpc":"2.0","id":1,"method":5}"#).contains("not a string"));
        assert_eq!(malformed("[]"), "an empty batch");
        assert!(malformed(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, 5]"#).contains("mixes"));
        assert!(
            malformed(
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, {"jsonrpc":"1.0","method":"ping"}]"#
            )
            .starts_with("batch element 1: ")
        );
    }

    #[test]
    fn not_json_rpc() {
        for body in [
            "",
            "   ",
            "name=value&method=tools/call",
            "\"tools/call\"",
            r#"{"query":"select 1","id":3}"#,
            r#"{"method":5}"#,
            "[1, 2, 3]",
            r#"[{"a":1},{"b":[1,2]}]"#,
        ] {
            assert_eq!(parse(body.as_bytes()), Parsed::NotJson, "{body}");
        }
    }

    #[test]
    fn batches_and_responses() {
        let c = calls(
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},
                {"jsonrpc":"2.0","method":"notifications/progress"},
                {"jsonrpc":"2.0","id":"s1","result":{}},
                {"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"u"}}]"#,
        );
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].tool.as_deref(), Some("a"));
        assert_eq!(c[1].method, "notifications/progress");
        assert_eq!(c[2].uri.as_deref(), Some("u"));
        // The client answering a server's request: no calls.
        assert_eq!(
            calls(r#"{"jsonrpc":"2.0","id":"s1","error":{"code":1,"message":"no"}}"#),
            []
        );
    }

    #[test]
    fn mcp_methods_and_headers() {
        for m in [
            "initialize",
            "ping",
            "tools/call",
            "tools/list",
            "resources/read",
            "prompts/get",
            "completion/complete",
            "logging/setLevel",
            "notifications/initialized",
            "roots/list",
            "sampling/createMessage",
            "elicitation/create",
            "tasks/get",
        ] {
            assert!(is_mcp_method(m), "{m}");
        }
        for m in [
            "",
            "tools",
            "eth_call",
            "logging/set",
            "Tools/call",
            "initialized",
        ] {
            assert!(!is_mcp_method(m), "{m}");
        }
        assert!(is_mcp_header("Mcp-Session-Id"));
        assert!(is_mcp_header("MCP-PROTOCOL-VERSION"));
        assert!(is_mcp_header("mcp-method"));
        assert!(!is_mcp_header("Mcp-Name"));
    }

    #[test]
    fn headers_must_agree_with_the_body() {
        let call =
            one(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_file"}}"#);
        assert_eq!(header_mismatch(&call, None, None), None);
        assert_eq!(
            header_mismatch(&call, Some("tools/call"), Some("get_file")),
            None
        );
        assert!(
            header_mismatch(&call, Some("tools/list"), None)
                .unwrap()
                .contains("Mcp-Method")
        );
        assert!(
            header_mismatch(&call, Some("tools/call"), Some("delete"))
                .unwrap()
                .contains("Mcp-Name")
        );
        let read =
            one(r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a://b"}}"#);
        assert_eq!(
            header_mismatch(&read, Some("resources/read"), Some("a://b")),
            None
        );
        assert!(header_mismatch(&read, None, Some("a://c")).is_some());
        let ping = one(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#);
        assert_eq!(header_mismatch(&ping, Some("ping"), Some("whatever")), None);
    }

    #[test]
    fn replies() {
        let r: Value =
            serde_json::from_slice(&error_reply(Some(&json!(7)), CODE_SHADOW, "no")).unwrap();
        assert_eq!(
            r,
            json!({"jsonrpc":"2.0","id":7,"error":{"code":-32090,"message":"no"}})
        );
        let r: Value = serde_json::from_slice(&error_reply(None, CODE_BLOCKED, "bad")).unwrap();
        assert_eq!(r["id"], Value::Null);
        let b = batch_reply(&[
            (Some(json!(1)), CODE_TOOL_DENIED, "t".into()),
            (None, CODE_TOOL_DENIED, "n".into()),
            (Some(json!("x")), CODE_LIMITED, "r".into()),
        ])
        .unwrap();
        let b: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(b.as_array().unwrap().len(), 2);
        assert_eq!(b[1]["id"], json!("x"));
        assert_eq!(batch_reply(&[(None, CODE_SHADOW, "n".into())]), None);
    }

    const POLICY: &str = r#"
[[mcp_servers]]
name = "gh"
host = "api.github.com"
path = "/mcp"

[[mcp_servers]]
name = "docs"
host = "docs.example.com"
path = "/mcp/*"

[[mcp_servers]]
name = "docs-admin"
host = "docs.example.com"
path = "/mcp/admin/*"

[[agents]]
id = 1
name = "a"
interfaces = ["veth-a"]

[[agents.mcp.servers]]
server = "gh"
tools = ["get_file", "search"]
calls_per_minute = 6
burst = 2

[[agents.mcp.servers]]
server = "docs"
quota = 3
quota_seconds = 3600

[[agents]]
id = 2
name = "b"
interfaces = ["veth-b"]

[agents.mcp]
shadow = "flag"

[[agents]]
id = 3
name = "c"
interfaces = ["veth-c"]
"#;

    fn policy(text: &str) -> Policy {
        policy::parse("p.toml", text).unwrap()
    }

    fn tool(name: &str) -> Call {
        Call {
            id: Some(json!(1)),
            method: "tools/call".into(),
            tool: Some(name.into()),
            uri: None,
        }
    }

    fn list() -> Call {
        Call {
            id: Some(json!(1)),
            method: "tools/list".into(),
            tool: None,
            uri: None,
        }
    }

    fn reason(v: &Verdict) -> &'static str {
        match v {
            Verdict::Pass { .. } => "pass",
            Verdict::Refuse { reason, .. } | Verdict::Flag { reason, .. } => reason,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn registry_shadow_and_tools() {
        let gate = Gate::new(&policy(POLICY));
        let now = Instant::now();
        let gh = |path: &str, call: &Call| gate.judge(1, "API.github.com.", path, call, now);
        assert_eq!(
            gh("/mcp?session=1", &tool("get_file")),
            Verdict::Pass {
                server: Some("gh".into())
            }
        );
        let v = gh("/mcp", &tool("delete_repo"));
        assert!(
            matches!(&v, Verdict::Refuse { code: CODE_TOOL_DENIED, reason: "mcp_tool_denied", server: Some(s), .. } if s == "gh"),
            "{v:?}"
        );
        let nameless = Call {
            tool: None,
            ..tool("x")
        };
        assert_eq!(reason(&gh("/mcp", &nameless)), "mcp_tool_denied");
        assert_eq!(
            reason(&gh("/mcp", &list())),
            "pass",
            "the allow-list is for tools/call only"
        );
        // Not registered at that path: shadow, blocked by default.
        let v = gh("/mcp/other", &list());
        assert!(
            matches!(
                &v,
                Verdict::Refuse {
                    code: CODE_SHADOW,
                    reason: "mcp_shadow",
                    server: None,
                    ..
                }
            ),
            "{v:?}"
        );
        // Registered but not granted: shadow too, naming the server.
        let v = gate.judge(1, "docs.example.com", "/mcp/admin/x", &list(), now);
        assert!(
            matches!(&v, Verdict::Refuse { reason: "mcp_shadow", server: Some(s), .. } if s == "docs-admin"),
            "{v:?}"
        );
        // The longest prefix wins; dot segments and encoded dots match nothing.
        assert_eq!(
            reason(&gate.judge(1, "docs.example.com", "/mcp/x", &list(), now)),
            "pass"
        );
        for sneaky in ["/mcp/admin/../x", "/mcp/%2e%2e/admin", "/mcp/./x"] {
            let v = gate.judge(1, "docs.example.com", sneaky, &list(), now);
            assert!(
                matches!(&v, Verdict::Refuse { server: None, .. }),
                "{sneaky}: {v:?}"
            );
        }
        // Shadow = flag.
        let v = gate.judge(2, "api.github.com", "/mcp", &tool("get_file"), now);
        assert!(
            matches!(&v, Verdict::Flag { reason: "mcp_shadow", server: Some(s), .. } if s == "gh"),
            "{v:?}"
        );
        // No [agents.mcp]: not gated; unknown agents neither.
        assert_eq!(
            gate.judge(3, "evil.example", "/mcp", &tool("x"), now),
            Verdict::Pass { server: None }
        );
        assert_eq!(
            reason(&gate.judge(99, "api.github.com", "/mcp", &tool("x"), now)),
            "pass"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rate_bucket_is_exact() {
        let gate = Gate::new(&policy(POLICY));
        let call = |now| reason(&gate.judge(1, "api.github.com", "/mcp", &tool("get_file"), now));
        let t0 = Instant::now();
        // Burst 2, then refused.
        assert_eq!(call(t0), "pass");
        assert_eq!(call(t0), "pass");
        assert_eq!(call(t0), "mcp_rate_limited");
        // Refused calls and other methods take nothing; one token every 60/6 = 10 s.
        assert_eq!(
            reason(&gate.judge(1, "api.github.com", "/mcp", &list(), t0)),
            "pass"
        );
        tokio::time::advance(Duration::from_secs(10) - Duration::from_nanos(1)).await;
        assert_eq!(call(Instant::now()), "mcp_rate_limited");
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert_eq!(call(Instant::now()), "pass");
        assert_eq!(call(Instant::now()), "mcp_rate_limited");
        // A denied tool takes nothing either.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            reason(&gate.judge(1, "api.github.com", "/mcp", &tool("rm"), Instant::now())),
            "mcp_tool_denied"
        );
        assert_eq!(call(Instant::now()), "pass");
        assert_eq!(call(Instant::now()), "pass");
        assert_eq!(call(Instant::now()), "mcp_rate_limited");
    }

    #[tokio::test(start_paused = true)]
    async fn quota_bucket_and_updates() {
        let p = policy(POLICY);
        let gate = Gate::new(&p);
        let call = |gate: &Gate| {
            reason(&gate.judge(
                1,
                "docs.example.com",
                "/mcp/q",
                &tool("anything"),
                Instant::now(),
            ))
        };
        for _ in 0..3 {
            assert_eq!(call(&gate), "pass");
        }
        assert_eq!(call(&gate), "mcp_quota");
        // One call back every 3600 / 3 = 1200 s.
        tokio::time::advance(Duration::from_secs(1199)).await;
        assert_eq!(call(&gate), "mcp_quota");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(call(&gate), "pass");
        assert_eq!(call(&gate), "mcp_quota");
        // The same policy again: the spent bucket stays spent.
        gate.update(&p);
        assert_eq!(call(&gate), "mcp_quota");
        // A changed quota is a new bucket.
        gate.update(&policy(&POLICY.replace("quota = 3", "quota = 4")));
        for _ in 0..4 {
            assert_eq!(call(&gate), "pass");
        }
        assert_eq!(call(&gate), "mcp_quota");
        // The quota removed: its bucket is pruned, and the calls are unlimited.
        let without = POLICY.replace("quota = 3\nquota_seconds = 3600\n", "");
        gate.update(&policy(&without));
        assert_eq!(gate.buckets.lock().unwrap().len(), 0);
        assert_eq!(call(&gate), "pass");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_and_quota_together_take_only_when_both_pass() {
        let text = POLICY.replace(
            "calls_per_minute = 6\nburst = 2",
            "calls_per_minute = 60\nburst = 5\nquota = 2\nquota_seconds = 60",
        );
        let gate = Gate::new(&policy(&text));
        let call =
            || reason(&gate.judge(1, "api.github.com", "/mcp", &tool("search"), Instant::now()));
        assert_eq!(call(), "pass");
        assert_eq!(call(), "pass");
        assert_eq!(call(), "mcp_quota");
        assert_eq!(call(), "mcp_quota");
        // The refused calls took no rate tokens: 3 of the burst of 5 are left, and the
        // quota is back after 30 s per call.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(call(), "pass");
        assert_eq!(call(), "pass");
        assert_eq!(call(), "mcp_quota");
    }
}
