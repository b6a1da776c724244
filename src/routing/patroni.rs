//! Patroni watcher: polls the cluster's REST API and publishes who the writable leader and the replicas are.
//!
//! The proxy never talks to etcd itself. Every Patroni member serves the same DCS-backed view on
//! `GET /cluster`, so asking any reachable member is enough, and asking the next one when a member
//! is dead or slow keeps the view fresh through a leader crash.
//!
//! Everything a peer sends (status line, headers, body, JSON) is treated as untrusted: sizes are
//! capped, every request is bounded by a timeout, and malformed input becomes a `PatroniError`,
//! never a panic.

use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch::Sender;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Poll period used when the configuration does not say otherwise. A graceful switchover leaves
/// the cluster without a leader for only ~50 ms, and the new leader shows up in `/cluster` within
/// 40 ms of the etcd change, so polling much slower than this would add directly to the write gap.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Per-endpoint request timeout. On loopback `/cluster` answers in a few ms; while etcd is down it
/// does not answer within 0.5 s at all, so waiting longer only delays trying the next endpoint.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_millis(300);
/// Largest response body accepted. A `/cluster` body is a few hundred bytes per member.
pub const MAX_BODY: usize = 1 << 20;

/// `tokio::time::interval` panics on a zero period, and a near-zero period would just spin.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Status line plus headers (and chunked trailers); far more than any sane server sends.
const MAX_HEAD: usize = 64 * 1024;
/// A chunk-size line is a few hex digits plus optional extensions.
const MAX_CHUNK_LINE: usize = 4096;
/// Interim (1xx) responses skipped before giving up; a GET should see none at all.
const MAX_INTERIM_RESPONSES: usize = 8;
/// libpq's default, which is what Patroni's connection URL means when it names no port.
const DEFAULT_PG_PORT: u16 = 5432;

#[derive(Clone, Debug)]
pub struct PatroniConfig {
    /// Cluster name, only used to label logs.
    pub name: String,
    /// REST API base URLs, e.g. "http://127.0.0.1:8008".
    pub endpoints: Vec<String>,
    pub poll_interval: Duration,
    pub http_timeout: Duration,
}

impl PatroniConfig {
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        PatroniConfig {
            name: name.into(),
            endpoints,
            poll_interval: DEFAULT_POLL_INTERVAL,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
        }
    }
}

impl Default for PatroniConfig {
    fn default() -> Self {
        PatroniConfig::new(String::new(), Vec::new())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub name: String,
    pub role: Role,
    pub state: String,
    pub host: String,
    pub port: u16,
    pub api_url: Option<String>,
    pub timeline: Option<u64>,
    /// Patroni's "lag" field in bytes; None when it says "unknown" or gives nothing usable.
    pub lag_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    StandbyLeader,
    SyncStandby,
    Replica,
    Other,
}

impl Role {
    fn from_patroni(s: &str) -> Role {
        // `/cluster` says "leader"; `/patroni` and Patroni < 3.1 elsewhere say "master", newer
        // versions "primary". Accepting all three costs nothing and survives an upgrade.
        match s.to_ascii_lowercase().as_str() {
            "leader" | "master" | "primary" => Role::Leader,
            "standby_leader" => Role::StandbyLeader,
            "sync_standby" => Role::SyncStandby,
            "replica" => Role::Replica,
            _ => Role::Other,
        }
    }
}

/// What the watcher knows now.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterView {
    /// The member with role leader AND state running; None while there is none.
    pub leader: Option<Member>,
    pub members: Vec<Member>,
    /// Endpoint that answered last.
    pub source: Option<String>,
    /// False when no endpoint answered the last poll; `leader` then still holds the last
    /// confirmed leader so the proxy can keep routing to it (and say so).
    pub reachable: bool,
    /// When this view was last confirmed from an answer.
    pub updated: Instant,
    /// When `leader` last changed.
    pub changed: Option<Instant>,
}

pub fn initial_view() -> ClusterView {
    ClusterView {
        leader: None,
        members: Vec::new(),
        source: None,
        // Nothing has answered yet, so claiming reachability would be a lie.
        reachable: false,
        updated: Instant::now(),
        changed: None,
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PatroniError {
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("invalid request path {0:?}")]
    InvalidPath(String),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed http response: {0}")]
    Http(&'static str),
    #[error("response body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("unexpected http status {0}")]
    Status(u16),
    #[error("malformed /cluster body: {0}")]
    Cluster(String),
}

// ---------------------------------------------------------------------------------------------
// /cluster parsing
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ClusterDoc {
    // Members stay untyped so that one odd field in one member cannot hide the whole cluster.
    members: Vec<Value>,
}

/// Parse a GET /cluster body. Pure, fuzzable.
///
/// The body must be a JSON object with a `members` array, otherwise it is an error (that also
/// catches pointing the watcher at a non-cluster endpoint such as `/patroni`). A member that
/// cannot be routed to (no name, no host, impossible port) is left out rather than failing the
/// whole answer: it could not be used as leader or replica anyway. Members come back sorted by
/// name so the same cluster read from different endpoints compares equal.
pub fn parse_cluster(body: &[u8]) -> Result<Vec<Member>, PatroniError> {
    let doc: ClusterDoc = serde_json::from_slice(body).map_err(|e| PatroniError::Cluster(e.to_string()))?;
    let mut members: Vec<Member> = Vec::with_capacity(doc.members.len());
    for raw in &doc.members {
        let Some(m) = parse_member(raw) else { continue };
        // Names are unique in Patroni's DCS; a duplicate means a confused peer, and the first
        // entry is as good a guess as any.
        if members.iter().any(|x| x.name == m.name) {
            continue;
        }
        members.push(m);
    }
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(members)
}

fn parse_member(raw: &Value) -> Option<Member> {
    let obj = raw.as_object()?;
    let name = obj.get("name")?.as_str()?;
    if name.is_empty() {
        return None;
    }
    // Patroni omits host (and port) when the member's conn_url is missing or unparsable.
    let host = obj.get("host")?.as_str()?;
    if host.is_empty() {
        return None;
    }
    let port = match obj.get("port") {
        None | Some(Value::Null) => DEFAULT_PG_PORT,
        Some(v) => parse_port(v)?,
    };
    let role = obj.get("role").and_then(Value::as_str).map_or(Role::Other, Role::from_patroni);
    // Patroni itself writes "" when a member has not reported a state.
    let state = obj.get("state").and_then(Value::as_str).unwrap_or("").to_string();
    let api_url = obj.get("api_url").and_then(Value::as_str).map(str::to_string);
    let timeline = obj.get("timeline").and_then(Value::as_u64);
    // "unknown" (or a negative/float value) carries no usable byte count.
    let lag_bytes = obj.get("lag").and_then(Value::as_u64);
    Some(Member { name: name.to_string(), role, state, host: host.to_string(), port, api_url, timeline, lag_bytes })
}

fn parse_port(v: &Value) -> Option<u16> {
    let n = match v {
        Value::Number(n) => n.as_u64()?,
        // Tolerate a quoted number; nothing else.
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok()?,
        _ => return None,
    };
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// The usable writable leader: role leader AND state running. During a switchover the old leader
/// is `leader/stopping` while PostgreSQL is already shutting down, so role alone is not enough.
/// If the answer somehow names two running leaders we refuse to guess.
fn choose_leader(members: &[Member]) -> Option<Member> {
    let mut it = members.iter().filter(|m| m.role == Role::Leader && m.state == "running");
    let first = it.next()?;
    if it.next().is_some() {
        return None;
    }
    Some(first.clone())
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 GET client
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct Target {
    /// Host to connect to (brackets stripped from IPv6 literals).
    host: String,
    port: u16,
    /// Value of the Host header, as written in the URL.
    authority: String,
    /// Path prefix from the URL, without a trailing slash ("" for a bare base URL).
    prefix: String,
}

fn parse_url(url: &str) -> Result<Target, PatroniError> {
    let bad = |reason| PatroniError::InvalidUrl { url: url.to_string(), reason };
    // Anything that could end up in the request head must not be able to break its framing.
    if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("contains whitespace or control characters"));
    }
    let rest = match url.find("://") {
        Some(i) if url[..i].eq_ignore_ascii_case("http") => &url[i + 3..],
        Some(_) => return Err(bad("only http:// is supported")),
        None => url,
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if path.contains(['?', '#']) {
        return Err(bad("query or fragment not supported in a base url"));
    }
    if authority.contains('@') {
        return Err(bad("credentials in the url are not supported"));
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let Some(end) = inner.find(']') else {
            return Err(bad("unterminated [ipv6] host"));
        };
        let after = &inner[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("garbage after [ipv6] host")),
        };
        (&inner[..end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    if !authority.starts_with('[') && host.contains(':') {
        return Err(bad("ipv6 hosts must be written in brackets"));
    }
    let port = match port {
        None => 80,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(bad("port out of range")),
        },
        Some(_) => return Err(bad("invalid port")),
    };
    Ok(Target {
        host: host.to_string(),
        port,
        authority: authority.to_string(),
        prefix: path.trim_end_matches('/').to_string(),
    })
}

/// One GET, for tests and `SHOW CLUSTER`: returns status code and body.
///
/// `url` is a base URL ("http://127.0.0.1:8008"), `path` starts with '/'. Connect, request and
/// the whole response are bounded together by `timeout`; the body is capped at [`MAX_BODY`].
/// Any status code is returned as-is; judging it is the caller's business.
pub async fn http_get(url: &str, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>), PatroniError> {
    http_request(url, path, None, timeout).await
}

/// One POST of a JSON body (etcd's v3 gateway is read with `POST /v3/kv/range`), bounded and capped like
/// [`http_get`].
pub async fn http_post_json(
    url: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), PatroniError> {
    http_request(url, path, Some(body), timeout).await
}

async fn http_request(
    url: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), PatroniError> {
    let target = parse_url(url)?;
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(PatroniError::InvalidPath(path.to_string()));
    }
    match tokio::time::timeout(timeout, request_inner(&target, path, body)).await {
        Ok(r) => r,
        Err(_) => Err(PatroniError::Timeout(timeout)),
    }
}

async fn request_inner(t: &Target, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>), PatroniError> {
    let mut stream = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|source| PatroniError::Connect { addr: t.authority.clone(), source })?;
    // One small write then wait: Nagle would only add latency here.
    let _ = stream.set_nodelay(true);
    let (method, extra) = match body {
        None => ("GET", String::new()),
        Some(b) => ("POST", format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len())),
    };
    let mut request = format!(
        "{method} {}{} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pgrelay\r\nAccept: application/json\r\n{extra}Connection: close\r\n\r\n",
        t.prefix, path, t.authority
    )
    .into_bytes();
    // Head and body in one write: one segment on loopback.
    request.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&request).await?;
    read_response(stream, MAX_BODY).await
}

/// A small buffered reader that never holds more than it was asked to keep.
struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    fn new(inner: R) -> Self {
        Reader { inner, buf: Vec::with_capacity(8192), pos: 0 }
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Read more from the peer; Ok(0) at EOF.
    async fn fill(&mut self) -> Result<usize, PatroniError> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= 8192 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut tmp = [0u8; 8192];
        let n = self.inner.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// One line terminated by LF, without the LF and an optional preceding CR. At most `max`
    /// bytes before the terminator; `Ok(None)` at a clean EOF before any byte of the line.
    async fn line(&mut self, max: usize) -> Result<Option<Vec<u8>>, PatroniError> {
        loop {
            if let Some(i) = self.avail().iter().position(|&b| b == b'\n') {
                if i > max + 1 {
                    return Err(PatroniError::Http("line too long"));
                }
                let mut line = self.avail()[..i].to_vec();
                self.pos += i + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.len() > max {
                    return Err(PatroniError::Http("line too long"));
                }
                return Ok(Some(line));
            }
            if self.avail().len() > max + 1 {
                return Err(PatroniError::Http("line too long"));
            }
            if self.fill().await? == 0 {
                return if self.avail().is_empty() {
                    Ok(None)
                } else {
                    Err(PatroniError::Http("connection closed mid-line"))
                };
            }
        }
    }

    /// Append exactly `n` bytes to `out`.
    async fn take(&mut self, mut n: usize, out: &mut Vec<u8>) -> Result<(), PatroniError> {
        loop {
            let k = self.avail().len().min(n);
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.pos += k;
            n -= k;
            if n == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(PatroniError::Http("connection closed before the body was complete"));
            }
        }
    }

    /// Append everything up to EOF to `out`, failing once `out` would exceed `cap`.
    async fn rest(&mut self, cap: usize, out: &mut Vec<u8>) -> Result<(), PatroniError> {
        loop {
            if out.len() + self.avail().len() > cap {
                return Err(PatroniError::BodyTooLarge { limit: cap });
            }
            out.extend_from_slice(&self.buf[self.pos..]);
            self.pos = self.buf.len();
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Framing {
    Chunked,
    Length(usize),
    UntilClose,
}

struct Head {
    status: u16,
    framing: Framing,
}

/// Read one HTTP/1.x response (after interim 1xx ones) from `r`; body at most `cap` bytes.
async fn read_response<R: AsyncRead + Unpin>(r: R, cap: usize) -> Result<(u16, Vec<u8>), PatroniError> {
    let mut r = Reader::new(r);
    let mut interim = 0;
    let head = loop {
        let head = read_head(&mut r, cap).await?;
        // 101 would switch protocols, which we never asked for; other 1xx are just noise before
        // the real answer.
        if (100..200).contains(&head.status) && head.status != 101 {
            interim += 1;
            if interim > MAX_INTERIM_RESPONSES {
                return Err(PatroniError::Http("too many interim responses"));
            }
            continue;
        }
        break head;
    };
    let mut body = Vec::new();
    // These statuses never carry a body, whatever the headers claim.
    if head.status == 204 || head.status == 304 || head.status == 101 {
        return Ok((head.status, body));
    }
    match head.framing {
        Framing::Length(n) => {
            body.reserve_exact(n);
            r.take(n, &mut body).await?;
        }
        Framing::UntilClose => r.rest(cap, &mut body).await?,
        Framing::Chunked => read_chunked(&mut r, cap, &mut body).await?,
    }
    Ok((head.status, body))
}

async fn read_head<R: AsyncRead + Unpin>(r: &mut Reader<R>, cap: usize) -> Result<Head, PatroniError> {
    let Some(status_line) = r.line(MAX_HEAD).await? else {
        return Err(PatroniError::Http("connection closed without a response"));
    };
    let mut used = status_line.len();
    let status = parse_status_line(&status_line)?;

    let mut chunked = false;
    let mut has_te = false;
    let mut length: Option<u64> = None;
    loop {
        let Some(line) = r.line(MAX_HEAD).await? else {
            return Err(PatroniError::Http("connection closed inside the headers"));
        };
        used += line.len() + 2;
        if used > MAX_HEAD {
            return Err(PatroniError::Http("headers too large"));
        }
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(PatroniError::Http("header line without ':'"));
        };
        let name = &line[..colon];
        let value = trim_ows(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_decimal(value).ok_or(PatroniError::Http("invalid content-length"))?;
            // Two different lengths mean we cannot know where the body ends.
            if length.is_some_and(|old| old != n) {
                return Err(PatroniError::Http("conflicting content-length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            // Only the last coding decides whether the body is chunk-framed.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            chunked = trim_ows(last).eq_ignore_ascii_case(b"chunked");
        }
    }
    // Transfer-Encoding overrides Content-Length (RFC 9112 6.3); a non-chunked transfer coding
    // is delimited by the connection closing.
    let framing = if has_te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        // Refuse early rather than read a megabyte we will throw away.
        if n > cap as u64 {
            return Err(PatroniError::BodyTooLarge { limit: cap });
        }
        Framing::Length(n as usize)
    } else {
        Framing::UntilClose
    };
    Ok(Head { status, framing })
}

fn parse_status_line(line: &[u8]) -> Result<u16, PatroniError> {
    let bad = PatroniError::Http("invalid status line");
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next().ok_or(PatroniError::Http("invalid status line"))?;
    // Patroni's Python server answers HTTP/1.0; anything 1.x frames the same way for a GET.
    if !version.starts_with(b"HTTP/1.") {
        return Err(bad);
    }
    let code = parts.next().unwrap_or(b"");
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return Err(bad);
    }
    let status = code.iter().fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
    if status < 100 {
        return Err(bad);
    }
    Ok(status)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

async fn read_chunked<R: AsyncRead + Unpin>(
    r: &mut Reader<R>,
    cap: usize,
    body: &mut Vec<u8>,
) -> Result<(), PatroniError> {
    loop {
        let Some(line) = r.line(MAX_CHUNK_LINE).await? else {
            return Err(PatroniError::Http("connection closed before the last chunk"));
        };
        // chunk-size [; extensions]: extensions carry nothing we need.
        let size_part = line.split(|&b| b == b';').next().unwrap_or(b"");
        let size_part = trim_ows(size_part);
        if size_part.is_empty() || size_part.len() > 15 || !size_part.iter().all(u8::is_ascii_hexdigit) {
            return Err(PatroniError::Http("invalid chunk size"));
        }
        let size = size_part.iter().fold(0u64, |acc, &d| {
            // At most 15 hex digits, so this cannot overflow.
            acc * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
        });
        if size == 0 {
            break;
        }
        if body.len() as u64 + size > cap as u64 {
            return Err(PatroniError::BodyTooLarge { limit: cap });
        }
        r.take(size as usize, body).await?;
        // Strict CRLF here (no bare LF): a chunk size that is off by one would otherwise slip a
        // stray CR into the body instead of being caught as a framing error.
        let mut crlf = Vec::with_capacity(2);
        r.take(2, &mut crlf).await?;
        if crlf != b"\r\n" {
            return Err(PatroniError::Http("chunk data not followed by CRLF"));
        }
    }
    // Trailer section. The body is complete at this point, so a peer that closes without the
    // final empty line has still told us everything; only unbounded trailers are an error.
    let mut used = 0usize;
    while let Some(line) = r.line(MAX_CHUNK_LINE).await? {
        if line.is_empty() {
            break;
        }
        used += line.len() + 2;
        if used > MAX_HEAD {
            return Err(PatroniError::Http("trailers too large"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Watcher
// ---------------------------------------------------------------------------------------------

/// GET /cluster from one endpoint and parse it; anything but a 200 with a cluster body is a
/// failure of that endpoint.
async fn fetch_cluster(endpoint: &str, timeout: Duration) -> Result<Vec<Member>, PatroniError> {
    let (status, body) = http_get(endpoint, "/cluster", timeout).await?;
    if status != 200 {
        return Err(PatroniError::Status(status));
    }
    parse_cluster(&body)
}

/// One poll: the endpoint that answered last first, then the others in configured order.
/// Returns the index of the endpoint that answered, or the last error when none did.
async fn poll_once(cfg: &PatroniConfig, preferred: usize) -> Result<(usize, Vec<Member>), PatroniError> {
    let n = cfg.endpoints.len();
    let mut last_err = PatroniError::Http("no endpoints");
    for k in 0..n {
        let idx = (preferred + k) % n;
        let ep = &cfg.endpoints[idx];
        match fetch_cluster(ep, cfg.http_timeout).await {
            Ok(members) => return Ok((idx, members)),
            Err(e) => {
                // Per-poll detail only; the transition itself is logged once by `watch`.
                debug!(cluster = %cfg.name, endpoint = %ep, error = %e, "patroni endpoint failed");
                last_err = e;
            }
        }
    }
    Err(last_err)
}

fn same_node(a: &Option<Member>, b: &Option<Member>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.name == b.name && a.host == b.host && a.port == b.port,
        _ => false,
    }
}

/// Fold a successful answer into `view`. Returns true when subscribers should be woken: the
/// leader, the member list or reachability changed. `updated` and `source` are refreshed
/// silently, since they change on every poll or endpoint switch without changing routing.
fn apply_answer(view: &mut ClusterView, members: Vec<Member>, source: &str, now: Instant) -> bool {
    let leader = choose_leader(&members);
    let modified = leader != view.leader || members != view.members || !view.reachable;
    // `changed` tracks which node is the leader, not cosmetic updates of its fields (a new
    // timeline on the same node is not a move).
    if !same_node(&view.leader, &leader) {
        view.changed = Some(now);
    }
    view.leader = leader;
    view.members = members;
    if view.source.as_deref() != Some(source) {
        view.source = Some(source.to_string());
    }
    view.reachable = true;
    view.updated = now;
    modified
}

/// Fold "no endpoint answered" into `view`: the last leader and members stay (the proxy keeps
/// routing to the last confirmed leader), only reachability flips.
fn apply_failure(view: &mut ClusterView) -> bool {
    let modified = view.reachable;
    view.reachable = false;
    modified
}

/// Runs until `shutdown` is cancelled: every poll_interval, GET /cluster from the endpoints (start
/// with the one that answered last, try the next when one fails or times out); publish a new
/// ClusterView on `tx` only when it changed (send_if_modified), with `leader` chosen as
/// role=leader & state=running. When every endpoint fails, keep the last leader but set
/// reachable=false. Logs once per transition, not once per poll.
pub async fn watch(cfg: PatroniConfig, tx: Sender<ClusterView>, shutdown: CancellationToken) {
    if cfg.endpoints.is_empty() {
        warn!(cluster = %cfg.name, "no patroni endpoints configured");
        shutdown.cancelled().await;
        return;
    }
    let mut ticker = tokio::time::interval(cfg.poll_interval.max(MIN_POLL_INTERVAL));
    // After a slow poll (several endpoints timing out) start the next one a full period later
    // instead of firing a burst of catch-up polls.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut preferred = 0usize;
    // None until the first poll, so that the very first outcome is logged either way.
    let mut was_reachable: Option<bool> = None;
    let mut leader_known = false;

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = poll_once(&cfg, preferred) => r,
        };
        match outcome {
            Ok((idx, members)) => {
                let source = &cfg.endpoints[idx];
                if was_reachable != Some(true) {
                    info!(cluster = %cfg.name, source = %source, "patroni reachable");
                } else if idx != preferred {
                    info!(cluster = %cfg.name, from = %cfg.endpoints[preferred], to = %source,
                        "patroni endpoint switched");
                }
                was_reachable = Some(true);
                preferred = idx;

                let mut moved: Option<Option<Member>> = None;
                tx.send_if_modified(|view| {
                    let before = view.leader.clone();
                    let modified = apply_answer(view, members, source, Instant::now());
                    if !same_node(&before, &view.leader) || !leader_known {
                        moved = Some(view.leader.clone());
                    }
                    modified
                });
                if let Some(leader) = moved {
                    leader_known = true;
                    match leader {
                        Some(l) => info!(cluster = %cfg.name, leader = %l.name, host = %l.host,
                            port = l.port, "patroni leader changed"),
                        None => warn!(cluster = %cfg.name, source = %source,
                            "patroni reports no running leader"),
                    }
                }
            }
            Err(e) => {
                if was_reachable != Some(false) {
                    let kept = tx.borrow().leader.as_ref().map(|l| l.name.clone());
                    warn!(cluster = %cfg.name, error = %e, endpoints = cfg.endpoints.len(),
                        kept_leader = ?kept, "patroni unreachable");
                }
                was_reachable = Some(false);
                tx.send_if_modified(apply_failure);
            }
        }
    }
    debug!(cluster = %cfg.name, "patroni watcher stopped");
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    const FIX_8008: &[u8] =
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/patroni/8008-cluster.body"));
    const FIX_8009: &[u8] =
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/patroni/8009-cluster.body"));
    const FIX_PATRONI: &[u8] =
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/patroni/8008-patroni.body"));

    fn body(members: &[(&str, &str, &str, u16)]) -> String {
        let ms: Vec<String> = members
            .iter()
            .map(|(name, role, state, port)| {
                format!(
                    r#"{{"name": "{name}", "role": "{role}", "state": "{state}", "api_url": "http://127.0.0.1:1/patroni", "host": "127.0.0.1", "port": {port}, "timeline": 5}}"#
                )
            })
            .collect();
        format!(r#"{{"members": [{}]}}"#, ms.join(", "))
    }

    // ---- parse_cluster ----------------------------------------------------------------------

    #[test]
    fn captured_cluster_bodies() {
        for fixture in [FIX_8008, FIX_8009] {
            let m = parse_cluster(fixture).unwrap();
            assert_eq!(
                m,
                vec![
                    Member {
                        name: "node1".into(),
                        role: Role::Leader,
                        state: "running".into(),
                        host: "127.0.0.1".into(),
                        port: 15432,
                        api_url: Some("http://127.0.0.1:8008/patroni".into()),
                        timeline: Some(13),
                        lag_bytes: None,
                    },
                    Member {
                        name: "node2".into(),
                        role: Role::Replica,
                        state: "running".into(),
                        host: "127.0.0.1".into(),
                        port: 15433,
                        api_url: Some("http://127.0.0.1:8009/patroni".into()),
                        timeline: Some(13),
                        lag_bytes: Some(0),
                    },
                ]
            );
            assert_eq!(choose_leader(&m).unwrap().name, "node1");
        }
    }

    #[test]
    fn status_body_is_not_a_cluster() {
        assert!(matches!(parse_cluster(FIX_PATRONI), Err(PatroniError::Cluster(_))));
    }

    #[test]
    fn no_leader() {
        let b = body(&[("node1", "replica", "stopping", 15432), ("node2", "replica", "running", 15433)]);
        let m = parse_cluster(b.as_bytes()).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(choose_leader(&m), None);
        assert_eq!(choose_leader(&parse_cluster(br#"{"members": []}"#).unwrap()), None);
    }

    #[test]
    fn leader_stopping_is_not_usable() {
        let b = body(&[("node1", "leader", "stopping", 15432), ("node2", "replica", "running", 15433)]);
        let m = parse_cluster(b.as_bytes()).unwrap();
        assert_eq!(m[0].role, Role::Leader);
        assert_eq!(m[0].state, "stopping");
        assert_eq!(choose_leader(&m), None);
    }

    #[test]
    fn standby_leader_is_not_writable() {
        let b = body(&[("s1", "standby_leader", "running", 15432), ("s2", "replica", "running", 15433)]);
        let m = parse_cluster(b.as_bytes()).unwrap();
        assert_eq!(m[0].role, Role::StandbyLeader);
        assert_eq!(choose_leader(&m), None);
    }

    #[test]
    fn roles_and_two_leaders() {
        let b = body(&[
            ("a", "master", "running", 1),
            ("b", "sync_standby", "running", 2),
            ("c", "quorum_whatever", "running", 3),
        ]);
        let m = parse_cluster(b.as_bytes()).unwrap();
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::Leader, Role::SyncStandby, Role::Other]);
        let two = body(&[("a", "leader", "running", 1), ("b", "leader", "running", 2)]);
        assert_eq!(choose_leader(&parse_cluster(two.as_bytes()).unwrap()), None);
    }

    #[test]
    fn lag_unknown_and_odd_fields() {
        let b = br#"{"members": [
            {"name": "n2", "role": "replica", "state": "running", "host": "h2", "port": 2, "lag": "unknown"},
            {"name": "n3", "role": "replica", "state": "running", "host": "h3", "port": "3", "lag": -5, "timeline": "x"},
            {"name": "n4", "role": "replica", "state": "running", "host": "h4", "lag": 123456789012},
            {"name": "n1", "role": "leader", "state": "running", "host": "h1", "port": 1},
            {"name": "bad-port", "role": "replica", "state": "running", "host": "h", "port": 70000},
            {"name": "zero-port", "role": "replica", "state": "running", "host": "h", "port": 0},
            {"name": "no-host", "role": "replica", "state": "running", "port": 5},
            {"role": "replica", "host": "h", "port": 5},
            {"name": "n1", "role": "replica", "state": "running", "host": "dup", "port": 9},
            "not an object", 7, null
        ], "scope": "hft", "pause": false}"#;
        let m = parse_cluster(b).unwrap();
        let names: Vec<&str> = m.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["n1", "n2", "n3", "n4"]);
        assert_eq!(m[0].host, "h1");
        assert_eq!(m[1].lag_bytes, None);
        assert_eq!(m[2].port, 3);
        assert_eq!(m[2].lag_bytes, None);
        assert_eq!(m[2].timeline, None);
        assert_eq!(m[3].port, DEFAULT_PG_PORT);
        assert_eq!(m[3].lag_bytes, Some(123456789012));
        assert_eq!(m[3].api_url, None);
    }

    #[test]
    fn garbage_is_an_error() {
        for b in [
            &b""[..],
            b"null",
            b"[]",
            b"{}",
            b"{\"members\": {}}",
            b"{\"members\": null}",
            b"<html>503</html>",
            b"{\"members\": [{\"name\": \"n1\"",
            b"\xff\xfe\x00",
        ] {
            assert!(matches!(parse_cluster(b), Err(PatroniError::Cluster(_))), "{:?}", String::from_utf8_lossy(b));
        }
        // Nesting far beyond serde_json's recursion limit must be an error, not a stack overflow.
        let deep = format!(r#"{{"members": [{}]}}"#, "[".repeat(100_000));
        assert!(parse_cluster(deep.as_bytes()).is_err());
    }

    #[test]
    fn truncations_and_bit_flips_never_panic() {
        for fixture in [FIX_8008, FIX_8009] {
            for i in 0..fixture.len() {
                let r = parse_cluster(&fixture[..i]);
                assert!(r.is_err(), "truncated at {i} parsed");
            }
            // Deterministic xorshift so failures reproduce.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut b = fixture.to_vec();
                let i = (x as usize) % b.len();
                b[i] = (x >> 32) as u8;
                let _ = parse_cluster(&b);
            }
        }
    }

    // ---- url / response parsing ------------------------------------------------------------

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8008").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.prefix.as_str()), ("127.0.0.1", 8008, ""));
        let t = parse_url("HTTP://[::1]:8009/api/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.authority.as_str(), t.prefix.as_str()),
            ("::1", 8009, "[::1]:8009", "/api")
        );
        let t = parse_url("node1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("node1", 80));
        for bad in [
            "https://x:1",
            "http://",
            "http://:80",
            "http://x:0",
            "http://x:65536",
            "http://x:8a",
            "http://x:",
            "http://::1:80",
            "http://[::1",
            "http://[::1]x",
            "http://u:p@x:1",
            "http://x:1/a?b",
            "http://x:1\r\nEvil: 1",
            "http://x y:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    async fn parse_raw(raw: &[u8]) -> Result<(u16, Vec<u8>), PatroniError> {
        read_response(raw, MAX_BODY).await
    }

    #[tokio::test]
    async fn response_framings() {
        let (s, b) = parse_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA").await.unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"hello"[..]));
        let (s, b) = parse_raw(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: x\r\n\r\nbye").await.unwrap();
        assert_eq!((s, b.as_slice()), (503, &b"bye"[..]));
        let (s, b) = parse_raw(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 1\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"abc"[..]));
        // Bare LF line endings and a 100 Continue first.
        let (s, b) = parse_raw(b"HTTP/1.1 100 Continue\n\nHTTP/1.1 200 OK\nContent-Length: 2\n\nok").await.unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"ok"[..]));
        let (s, b) = parse_raw(b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n").await.unwrap();
        assert_eq!((s, b.len()), (204, 0));
        // Last chunk without trailer terminator: the body is complete, accept it.
        let (_, b) = parse_raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n").await.unwrap();
        assert_eq!(b, b"ok");
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"garbage\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 099 x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffff\r\n",
        ];
        for raw in cases {
            assert!(parse_raw(raw).await.is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
        let mut interims = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(20);
        interims.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(parse_raw(&interims).await.is_err());
        let long_header = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD + 10));
        assert!(parse_raw(long_header.as_bytes()).await.is_err());
        let many_headers = format!("HTTP/1.1 200 OK\r\n{}\r\n", "X-A: b\r\n".repeat(20_000));
        assert!(parse_raw(many_headers.as_bytes()).await.is_err());
    }

    #[tokio::test]
    async fn response_truncations_never_panic() {
        let full =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\nwxyz\r\n2\r\nab\r\n0\r\nT: v\r\n\r\n";
        for i in 0..full.len() {
            let _ = parse_raw(&full[..i]).await;
        }
        assert_eq!(parse_raw(full).await.unwrap().1, b"wxyzab");
    }

    // ---- http_get against tiny servers ------------------------------------------------------

    /// Accept one connection at a time, read the request head, then run `respond` on the socket.
    async fn serve_with<F, Fut>(respond: F) -> (SocketAddr, JoinHandle<()>)
    where
        F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let respond = Arc::new(respond);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let respond = respond.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    respond(s, String::from_utf8_lossy(&req).into_owned()).await;
                });
            }
        });
        (addr, task)
    }

    const T: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn http_content_length_and_request_shape() {
        let seen = Arc::new(Mutex::new(String::new()));
        let seen2 = seen.clone();
        let (addr, task) = serve_with(move |mut s, req| {
            *seen2.lock().unwrap() = req;
            async move {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"members\":[]}")
                    .await;
            }
        })
        .await;
        let url = format!("http://{addr}");
        let (status, body) = http_get(&url, "/cluster", T).await.unwrap();
        assert_eq!(status, 200);
        // Content-Length said 13, so the 14th byte is not part of the body.
        assert_eq!(body, b"{\"members\":[]");
        let req = seen.lock().unwrap().clone();
        assert!(req.starts_with("GET /cluster HTTP/1.1\r\n"), "{req}");
        assert!(req.contains(&format!("\r\nHost: {addr}\r\n")), "{req}");
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
        // A path prefix in the base URL is kept.
        let (_, _) = http_get(&format!("http://{addr}/api/"), "/cluster", T).await.unwrap();
        assert!(seen.lock().unwrap().starts_with("GET /api/cluster HTTP/1.1\r\n"));
        assert!(matches!(http_get(&url, "cluster", T).await, Err(PatroniError::InvalidPath(_))));
        task.abort();
    }

    #[tokio::test]
    async fn http_chunked_in_pieces() {
        let (addr, task) = serve_with(|mut s, _| async move {
            let parts: [&[u8]; 6] = [
                b"HTTP/1.1 200 OK\r\nTransfer-",
                b"Encoding: chunked\r\n\r\n0",
                b"f\r\n{\"members\": [",
                b"]}\r\n",
                b"0\r\n",
                b"\r\n",
            ];
            for p in parts {
                let _ = s.write_all(p).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Keep the connection open: the client must stop at the terminating chunk, not EOF.
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let (status, body) = http_get(&format!("http://{addr}"), "/cluster", T).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, br#"{"members": []}"#);
        assert_eq!(parse_cluster(&body).unwrap(), vec![]);
        task.abort();
    }

    #[tokio::test]
    async fn http_until_close() {
        let (addr, task) = serve_with(|mut s, _| async move {
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            let _ = s.write_all(FIX_8008).await;
        })
        .await;
        let (status, body) = http_get(&format!("http://{addr}"), "/cluster", T).await.unwrap();
        assert_eq!((status, body.as_slice()), (200, FIX_8008));
        task.abort();
    }

    #[tokio::test]
    async fn http_slow_server_times_out() {
        let (addr, task) = serve_with(|mut s, _| async move {
            // Headers promptly, body never: the timeout covers the whole exchange.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab").await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
        .await;
        let t0 = Instant::now();
        let r = http_get(&format!("http://{addr}"), "/cluster", Duration::from_millis(200)).await;
        let took = t0.elapsed();
        assert!(matches!(r, Err(PatroniError::Timeout(_))), "{r:?}");
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "{took:?}");
        task.abort();
    }

    #[tokio::test]
    async fn http_refused_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = http_get(&format!("http://{addr}"), "/cluster", T).await;
        assert!(matches!(r, Err(PatroniError::Connect { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn http_oversized_bodies() {
        // Declared too large: refused before reading the body.
        let (addr, task) = serve_with(|mut s, _| async move {
            let _ =
                s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1).as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let r = http_get(&format!("http://{addr}"), "/cluster", T).await;
        assert!(matches!(r, Err(PatroniError::BodyTooLarge { .. })), "{r:?}");
        task.abort();

        // Undeclared: streamed until the cap is crossed, chunked and close-delimited.
        for chunked in [true, false] {
            let (addr, task) = serve_with(move |mut s, _| async move {
                let head: &[u8] = if chunked {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                } else {
                    b"HTTP/1.0 200 OK\r\n\r\n"
                };
                let _ = s.write_all(head).await;
                let block = vec![b'x'; 64 * 1024];
                for _ in 0..40 {
                    let r = if chunked {
                        s.write_all(format!("{:x}\r\n", block.len()).as_bytes())
                            .await
                            .and(s.write_all(&block).await)
                            .and(s.write_all(b"\r\n").await)
                    } else {
                        s.write_all(&block).await
                    };
                    if r.is_err() {
                        return;
                    }
                }
            })
            .await;
            let r = http_get(&format!("http://{addr}"), "/cluster", Duration::from_secs(5)).await;
            assert!(matches!(r, Err(PatroniError::BodyTooLarge { .. })), "chunked={chunked}: {r:?}");
            task.abort();
        }
    }

    // ---- watcher against fake Patroni endpoints ---------------------------------------------

    #[derive(Clone)]
    enum Mode {
        Serve(String),
        /// Accept, then close without answering.
        Close,
        /// Accept and never answer.
        Hang,
        Status(u16),
    }

    struct Fake {
        addr: SocketAddr,
        mode: Arc<Mutex<Mode>>,
        task: JoinHandle<()>,
    }

    impl Fake {
        async fn start(body: &str) -> Fake {
            let mode = Arc::new(Mutex::new(Mode::Serve(body.to_string())));
            let m = mode.clone();
            let (addr, task) = serve_with(move |mut s, _| {
                let mode = m.lock().unwrap().clone();
                async move {
                    let (status, body) = match mode {
                        Mode::Serve(b) => (200, b),
                        Mode::Status(c) => (c, String::from("{}")),
                        Mode::Close => return,
                        Mode::Hang => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                    };
                    // Patroni 3.0.2 answers HTTP/1.0 like this.
                    let _ = s
                        .write_all(format!("HTTP/1.0 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
                        .await;
                }
            })
            .await;
            Fake { addr, mode, task }
        }
        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }
        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }
        fn serve(&self, body: &str) {
            self.set(Mode::Serve(body.to_string()));
        }
        /// Stop listening: later connects are refused.
        async fn kill(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    const POLL: Duration = Duration::from_millis(100);

    fn cfg(endpoints: Vec<String>) -> PatroniConfig {
        PatroniConfig { name: "hft".into(), endpoints, poll_interval: POLL, http_timeout: Duration::from_millis(300) }
    }

    fn leader_name(v: &ClusterView) -> Option<String> {
        v.leader.as_ref().map(|l| l.name.clone())
    }

    /// Wait (bounded) for a published view satisfying `pred`; returns it and how long it took.
    async fn wait_view(
        rx: &mut watch::Receiver<ClusterView>,
        within: Duration,
        pred: impl Fn(&ClusterView) -> bool,
    ) -> (ClusterView, Duration) {
        let t0 = Instant::now();
        let r = tokio::time::timeout(within, async {
            loop {
                {
                    let v = rx.borrow_and_update();
                    if pred(&v) {
                        return v.clone();
                    }
                }
                rx.changed().await.expect("watcher gone");
            }
        })
        .await;
        match r {
            Ok(v) => (v, t0.elapsed()),
            Err(_) => panic!("no matching view within {within:?}; last: {:?}", *rx.borrow()),
        }
    }

    /// Collect every view the watcher publishes, to check what subscribers saw in between.
    fn record(mut rx: watch::Receiver<ClusterView>) -> Arc<Mutex<Vec<ClusterView>>> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let v = rx.borrow_and_update().clone();
                l.lock().unwrap().push(v);
            }
        });
        log
    }

    fn start_watch(endpoints: Vec<String>) -> (watch::Receiver<ClusterView>, CancellationToken, JoinHandle<()>) {
        let (tx, rx) = watch::channel(initial_view());
        let token = CancellationToken::new();
        let task = tokio::spawn(watch(cfg(endpoints), tx, token.clone()));
        (rx, token, task)
    }

    fn node1_leader() -> String {
        body(&[("node1", "leader", "running", 15432), ("node2", "replica", "running", 15433)])
    }
    fn node2_leader() -> String {
        body(&[("node1", "replica", "running", 15432), ("node2", "leader", "running", 15433)])
    }

    #[tokio::test]
    async fn watcher_fails_over_to_second_endpoint() {
        let a = Fake::start(&node1_leader()).await;
        let b = Fake::start(&node1_leader()).await;
        let (a_url, b_url) = (a.url(), b.url());
        let (mut rx, token, task) = start_watch(vec![a_url.clone(), b_url.clone()]);
        let log = record(rx.clone());

        let (v, _) = wait_view(&mut rx, Duration::from_secs(2), |v| v.reachable).await;
        assert_eq!(leader_name(&v).as_deref(), Some("node1"));
        assert_eq!(v.source.as_deref(), Some(a_url.as_str()));
        assert_eq!(v.members.len(), 2);
        assert!(v.changed.is_some());

        a.kill().await;
        // The source switch alone does not wake subscribers, so look at the current value.
        let t0 = Instant::now();
        while rx.borrow().source.as_deref() != Some(b_url.as_str()) {
            assert!(t0.elapsed() < Duration::from_secs(2), "no failover: {:?}", *rx.borrow());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let v = rx.borrow().clone();
        assert!(v.reachable);
        assert_eq!(leader_name(&v).as_deref(), Some("node1"));
        let confirmed = v.updated;
        tokio::time::sleep(POLL * 3).await;
        assert!(rx.borrow().updated > confirmed, "polls via the second endpoint must refresh `updated`");

        // While failing over, subscribers never saw the cluster unreachable or leaderless.
        for v in log.lock().unwrap().iter() {
            assert!(v.reachable && leader_name(v).as_deref() == Some("node1"), "{v:?}");
        }

        // And the second endpoint keeps being followed: a leader change shows up.
        b.serve(&node2_leader());
        let (v, took) =
            wait_view(&mut rx, Duration::from_secs(2), |v| leader_name(v).as_deref() == Some("node2")).await;
        assert!(took <= POLL * 3, "took {took:?}");
        assert_eq!(v.leader.as_ref().unwrap().port, 15433);
        token.cancel();
        task.await.unwrap();
        b.kill().await;
    }

    #[tokio::test]
    async fn watcher_follows_switchover() {
        let a = Fake::start(&node1_leader()).await;
        let (mut rx, token, task) = start_watch(vec![a.url()]);
        let (v0, _) = wait_view(&mut rx, Duration::from_secs(2), |v| v.reachable).await;
        assert_eq!(leader_name(&v0).as_deref(), Some("node1"));
        let changed0 = v0.changed.unwrap();

        // Old leader demoting: still role leader, but not running -> no usable leader.
        a.serve(&body(&[("node1", "leader", "stopping", 15432), ("node2", "replica", "running", 15433)]));
        let (v, took) = wait_view(&mut rx, Duration::from_secs(2), |v| v.leader.is_none()).await;
        assert!(took <= POLL * 3, "leader=None took {took:?}");
        assert!(v.reachable);
        assert!(v.changed.unwrap() > changed0);
        assert_eq!(v.members[0].state, "stopping");

        a.serve(&node2_leader());
        let (v, took) =
            wait_view(&mut rx, Duration::from_secs(2), |v| leader_name(v).as_deref() == Some("node2")).await;
        assert!(took <= POLL * 3, "new leader took {took:?}");
        eprintln!("new leader published {took:?} after the body changed");

        // Identical answers afterwards publish nothing new.
        rx.borrow_and_update();
        tokio::time::sleep(POLL * 4).await;
        assert!(!rx.has_changed().unwrap(), "{:?}", *rx.borrow());
        assert!(rx.borrow().updated > v.updated);
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn watcher_all_down_keeps_leader() {
        let a = Fake::start(&node1_leader()).await;
        let b = Fake::start(&node1_leader()).await;
        let (mut rx, token, task) = start_watch(vec![a.url(), b.url()]);
        let (up, _) = wait_view(&mut rx, Duration::from_secs(2), |v| v.reachable).await;

        // One endpoint refuses, the other hangs past http_timeout.
        a.set(Mode::Close);
        b.set(Mode::Hang);
        let (v, _) = wait_view(&mut rx, Duration::from_secs(3), |v| !v.reachable).await;
        assert_eq!(v.leader, up.leader, "last confirmed leader is kept");
        assert_eq!(v.members, up.members);
        assert_eq!(v.changed, up.changed, "an outage is not a leader change");
        let last_confirmed = v.updated;
        // Staying down publishes nothing new and does not pretend to confirm anything.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().updated, last_confirmed);

        // A non-200 answer is a failure too; a good answer from anyone brings it back.
        a.set(Mode::Status(503));
        b.serve(&node2_leader());
        let (v, _) = wait_view(&mut rx, Duration::from_secs(3), |v| v.reachable).await;
        assert_eq!(leader_name(&v).as_deref(), Some("node2"));
        assert_eq!(v.source, Some(b.url()));
        assert!(v.updated > last_confirmed);

        // Everything refused (listeners gone) behaves the same.
        a.kill().await;
        b.kill().await;
        let (v, _) = wait_view(&mut rx, Duration::from_secs(3), |v| !v.reachable).await;
        assert_eq!(leader_name(&v).as_deref(), Some("node2"));
        token.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn watcher_skips_garbage_endpoint_and_stops_promptly() {
        let a = Fake::start("<html>not json</html>").await;
        let b = Fake::start(&node1_leader()).await;
        let (mut rx, token, task) = start_watch(vec![a.url(), b.url()]);
        let (v, _) = wait_view(&mut rx, Duration::from_secs(2), |v| v.reachable).await;
        assert_eq!(v.source, Some(b.url()));
        assert_eq!(leader_name(&v).as_deref(), Some("node1"));

        // Cancel while a poll is stuck on a hanging endpoint.
        b.set(Mode::Hang);
        a.set(Mode::Hang);
        tokio::time::sleep(POLL * 2).await;
        let t0 = Instant::now();
        token.cancel();
        tokio::time::timeout(Duration::from_millis(200), task).await.expect("watch did not stop").unwrap();
        assert!(t0.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn watcher_without_endpoints_waits_for_shutdown() {
        let (rx, token, task) = start_watch(vec![]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!rx.borrow().reachable);
        token.cancel();
        tokio::time::timeout(Duration::from_secs(1), task).await.unwrap().unwrap();
    }

    #[test]
    fn apply_is_quiet_when_nothing_changes() {
        let members = parse_cluster(FIX_8008).unwrap();
        let mut v = initial_view();
        let t1 = Instant::now();
        assert!(apply_answer(&mut v, members.clone(), "a", t1));
        assert_eq!(v.changed, Some(t1));
        let t2 = t1 + Duration::from_millis(100);
        assert!(!apply_answer(&mut v, members.clone(), "b", t2));
        assert_eq!((v.updated, v.changed, v.source.as_deref()), (t2, Some(t1), Some("b")));
        assert!(apply_failure(&mut v));
        assert!(!apply_failure(&mut v));
        assert!(v.leader.is_some() && !v.reachable);
        assert!(apply_answer(&mut v, members, "a", t2));
    }
}
