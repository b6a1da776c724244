//! One backend connection: connect, log in, parameter status, transaction status, reset and health check.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::auth::{self, ClientBinding, ScramClient, ScramCredential, Secret};
use crate::config::{ChannelBinding, ProxyConfig};
use crate::error::{Error, Result};
use crate::protocol::{self, take_cstr, take_i32};

/// Where a server lives: a TCP host and port, or a Unix-socket directory and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A byte stream to a server.
pub enum ServerStream {
    Tcp(TcpStream),
    /// Watched for readability only (`crate::uds`).
    Unix(crate::uds::UdsStream),
    Tls(Box<crate::tls::WriteThrough<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How pgrelay logs in to a server.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub database: String,
    /// The user's secret from the userlist or the database entry.
    pub secret: Option<Secret>,
    /// SCRAM keys recovered from a client's proof, for servers that want SCRAM when only a verifier is stored.
    pub scram_keys: Option<([u8; 32], [u8; 32])>,
}

/// Server parameters that follow each client (reported by the server via ParameterStatus).
pub const TRACKED_PARAMS: &[&str] =
    &["client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "standard_conforming_strings", "application_name"];

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// One logged-in server connection.
pub struct ServerConn {
    pub id: u64,
    pub stream: ServerStream,
    pub rbuf: BytesMut,
    pub target: Arc<Target>,
    pub backend_pid: i32,
    pub backend_key: i32,
    /// Every ParameterStatus the server sent, latest value wins.
    pub params: Vec<(String, String)>,
    pub created: Instant,
    pub last_used: Instant,
    /// Routing generation this connection was made under; a newer generation retires it.
    pub generation: u64,
    /// Last ReadyForQuery status: b'I', b'T' or b'E'.
    pub tx_status: u8,
    pub local_port: u16,
    /// Settings pgrelay SET on this server for its current client, by name (see `client::relay`).
    pub applied: Vec<(String, String)>,
    /// Proxy-wide prepared statements that exist on this server.
    pub statements: crate::prepared::ServerStatements,
}

impl ServerConn {
    /// Opens and logs in a new connection.
    pub async fn connect(
        target: Arc<Target>,
        login: &Login,
        proxy: &ProxyConfig,
        generation: u64,
    ) -> Result<ServerConn> {
        let timeout = proxy.server_connect_timeout.get().unwrap_or(Duration::from_secs(3600));
        match tokio::time::timeout(timeout, Self::connect_inner(target, login, proxy, generation)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout("server_connect_timeout")),
        }
    }

    async fn connect_inner(
        target: Arc<Target>,
        login: &Login,
        proxy: &ProxyConfig,
        generation: u64,
    ) -> Result<ServerConn> {
        let (stream, local_port) = if target.is_unix() {
            let path = format!("{}/.s.PGSQL.{}", target.host.trim_end_matches('/'), target.port);
            (ServerStream::Unix(crate::uds::UdsStream::connect(path.as_ref()).await.map_err(Error::Server)?), 0)
        } else {
            let s = TcpStream::connect((target.host.as_str(), target.port)).await.map_err(Error::Server)?;
            configure_tcp(&s, proxy);
            let lp = s.local_addr().map(|a| a.port()).unwrap_or(0);
            // As in libpq, Unix sockets are never encrypted.
            match &proxy.server_tls.0 {
                Some(tls) => (negotiate_tls(s, tls, &target.host).await?, lp),
                None => (ServerStream::Tcp(s), lp),
            }
        };
        let mut conn = ServerConn {
            id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            target,
            backend_pid: 0,
            backend_key: 0,
            params: Vec::new(),
            created: Instant::now(),
            last_used: Instant::now(),
            generation,
            tx_status: b'I',
            local_port,
            applied: Vec::new(),
            statements: Default::default(),
        };
        let binding = proxy.server_tls.0.as_ref().map_or(ChannelBinding::Disable, |c| c.channel_binding);
        conn.login(login, binding).await?;
        Ok(conn)
    }

    fn is_tls(&self) -> bool {
        matches!(self.stream, ServerStream::Tls(_))
    }

    /// tls-server-end-point data of the server's certificate; `None` on plaintext and Unix sockets.
    fn end_point(&self) -> Option<Vec<u8>> {
        match &self.stream {
            ServerStream::Tls(s) => crate::tls::Connector::end_point(&s.inner),
            ServerStream::Tcp(_) | ServerStream::Unix(_) => None,
        }
    }

    async fn login(&mut self, login: &Login, policy: ChannelBinding) -> Result<()> {
        let mut out = BytesMut::new();
        protocol::startup_message(&mut out, &[("user", &login.user), ("database", &login.database)]);
        self.stream.write_all(&out).await.map_err(Error::Server)?;
        let mut scram: Option<ScramClient> = None;
        // Set once a SCRAM-SHA-256-PLUS exchange is verified; `require` accepts no other way in.
        let mut bound = false;
        loop {
            let (t, body) = self.read_message().await?;
            let mut r = &body[..];
            match t {
                b'R' => {
                    let code = take_i32(&mut r).ok_or_else(|| Error::ServerProtocol("short auth message".into()))?;
                    out.clear();
                    // Checked before any password is sent: the point of `require` is not to log in to
                    // (or hand a password or md5 hash to) a server that has not proved its certificate's key.
                    if policy == ChannelBinding::Require && !bound && matches!(code, 0 | 3 | 5) {
                        return Err(Error::Auth(format!(
                            "server_tls.channel_binding is require but the server {} without channel binding",
                            if code == 0 { "let pgrelay in" } else { "asked for a password" }
                        )));
                    }
                    match code {
                        0 => {
                            if scram.as_ref().is_some_and(|c| !c.is_authenticated()) {
                                return Err(Error::Auth(
                                    "server ended SCRAM before proving it knows the password".into(),
                                ));
                            }
                        }
                        3 => {
                            let Some(Secret::Plain(p)) = &login.secret else {
                                return Err(Error::Auth(format!(
                                    "server wants a cleartext password for {} and none is configured",
                                    login.user
                                )));
                            };
                            protocol::password_message(&mut out, p);
                        }
                        5 => {
                            if r.len() < 4 {
                                return Err(Error::ServerProtocol("short md5 salt".into()));
                            }
                            let salt = [r[0], r[1], r[2], r[3]];
                            let resp = login
                                .secret
                                .as_ref()
                                .and_then(|s| auth::md5_response(&login.user, s, salt))
                                .ok_or_else(|| {
                                    Error::Auth(format!(
                                        "server wants md5 for {} and no password or md5 hash is configured",
                                        login.user
                                    ))
                                })?;
                            protocol::password_message(&mut out, &resp);
                        }
                        10 => {
                            let mut mechs = Vec::new();
                            while let Some(m) = take_cstr(&mut r) {
                                if m.is_empty() {
                                    break;
                                }
                                mechs.push(m.to_string());
                            }
                            let binding =
                                choose_binding(policy, self.is_tls(), self.end_point(), &mechs).map_err(Error::Auth)?;
                            let cred = match (&login.secret, login.scram_keys) {
                                (Some(Secret::Plain(p)), _) => ScramCredential::Password(p.clone()),
                                (_, Some((client_key, server_key))) => ScramCredential::Keys { client_key, server_key },
                                _ => {
                                    return Err(Error::Auth(format!(
                                        "server wants SCRAM for {} and pgrelay has neither its password nor keys from a client's SCRAM login",
                                        login.user
                                    )))
                                }
                            };
                            let c = ScramClient::new(cred).with_binding(binding);
                            protocol::sasl_initial_response(&mut out, c.mechanism(), &c.client_first());
                            scram = Some(c);
                        }
                        11 => {
                            let c = scram
                                .as_mut()
                                .ok_or_else(|| Error::ServerProtocol("SASLContinue before SASL".into()))?;
                            let resp = c.server_first(r).map_err(|e| Error::Auth(format!("scram with server: {e}")))?;
                            protocol::sasl_response(&mut out, &resp);
                        }
                        12 => {
                            let c =
                                scram.as_mut().ok_or_else(|| Error::ServerProtocol("SASLFinal before SASL".into()))?;
                            c.server_final(r).map_err(|e| Error::Auth(format!("scram with server: {e}")))?;
                            bound = c.is_bound();
                            if bound {
                                tracing::debug!(server = %self.target, "logged in with SCRAM-SHA-256-PLUS");
                            }
                        }
                        other => return Err(Error::Auth(format!("server wants unsupported auth method {other}"))),
                    }
                    if !out.is_empty() {
                        self.stream.write_all(&out).await.map_err(Error::Server)?;
                    }
                }
                b'S' => self.note_parameter(r),
                b'K' => {
                    self.backend_pid = take_i32(&mut r).unwrap_or(0);
                    self.backend_key = take_i32(&mut r).unwrap_or(0);
                }
                b'E' => {
                    let f = protocol::parse_error_fields(r);
                    return Err(Error::ServerRefused { code: f.code, message: f.message });
                }
                b'N' | b'v' => {}
                b'Z' => {
                    self.tx_status = r.first().copied().unwrap_or(b'I');
                    return Ok(());
                }
                other => {
                    return Err(Error::ServerProtocol(format!("unexpected message {:?} during login", other as char)))
                }
            }
        }
    }

    /// Records a ParameterStatus body.
    pub fn note_parameter(&mut self, mut body: &[u8]) {
        let (Some(k), Some(v)) = (take_cstr(&mut body), take_cstr(&mut body)) else {
            return;
        };
        if let Some(slot) = self.params.iter_mut().find(|(n, _)| n == k) {
            if slot.1 != v {
                slot.1 = v.to_string();
            }
        } else {
            self.params.push((k.to_string(), v.to_string()));
        }
    }

    /// After DISCARD ALL / RESET ALL nothing pgrelay SET is in force any more.
    pub fn applied_reset(&mut self) {
        self.applied.clear();
    }

    /// Current value of a reported parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Reads one whole message (used outside the relay loop: login, reset, checks).
    pub async fn read_message(&mut self) -> Result<(u8, BytesMut)> {
        loop {
            if let Some((t, len)) =
                protocol::frame_header(&self.rbuf, 1 << 30).map_err(|e| Error::ServerProtocol(e.to_string()))?
            {
                if self.rbuf.len() >= len {
                    let mut frame = self.rbuf.split_to(len);
                    frame.advance(5);
                    return Ok((t, frame));
                }
                self.rbuf.reserve(len - self.rbuf.len());
            }
            let n = self.stream.read_buf(&mut self.rbuf).await.map_err(Error::Server)?;
            if n == 0 {
                return Err(Error::Server(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs a simple query and waits for its ReadyForQuery; an ErrorResponse becomes an error.
    /// ParameterStatus messages it causes are recorded.
    pub async fn execute(&mut self, sql: &str) -> Result<()> {
        let mut out = BytesMut::new();
        protocol::query(&mut out, sql);
        self.stream.write_all(&out).await.map_err(Error::Server)?;
        self.finish_query().await
    }

    /// Reads responses up to ReadyForQuery, keeping the first error.
    pub async fn finish_query(&mut self) -> Result<()> {
        let mut err = None;
        loop {
            let (t, body) = self.read_message().await?;
            match t {
                b'Z' => {
                    self.tx_status = body.first().copied().unwrap_or(b'I');
                    return match err {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                b'E' => {
                    let f = protocol::parse_error_fields(&body);
                    err.get_or_insert(Error::ServerRefused { code: f.code, message: f.message });
                }
                b'S' => self.note_parameter(&body),
                _ => {}
            }
        }
    }

    /// Runs a query and returns the first column of every row as text (for the health collector and checks).
    pub async fn query_column(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut out = BytesMut::new();
        protocol::query(&mut out, sql);
        self.stream.write_all(&out).await.map_err(Error::Server)?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let (t, body) = self.read_message().await?;
            match t {
                b'D' => {
                    let mut r = &body[..];
                    let n = protocol::take_i16(&mut r).unwrap_or(0).max(0) as usize;
                    let mut row = Vec::with_capacity(n);
                    for _ in 0..n {
                        let len = take_i32(&mut r).unwrap_or(-1);
                        if len < 0 || len as usize > r.len() {
                            row.push(None);
                        } else {
                            row.push(Some(String::from_utf8_lossy(&r[..len as usize]).into_owned()));
                            r = &r[len as usize..];
                        }
                    }
                    rows.push(row);
                }
                b'E' => {
                    let f = protocol::parse_error_fields(&body);
                    err.get_or_insert(Error::ServerRefused { code: f.code, message: f.message });
                }
                b'S' => self.note_parameter(&body),
                b'Z' => {
                    self.tx_status = body.first().copied().unwrap_or(b'I');
                    return match err {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Politely closes the connection.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        protocol::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(100), self.stream.write_all(&out)).await;
    }
}

/// Picks the channel binding of pgrelay's SCRAM login, as libpq does for `channel_binding`: bind when the
/// connection is TLS and the server offers SCRAM-SHA-256-PLUS; say "y" (could bind, was not offered) over
/// TLS otherwise, so a server that did offer it sees the downgrade. `Require` accepts only binding.
fn choose_binding(
    policy: ChannelBinding,
    tls: bool,
    end_point: Option<Vec<u8>>,
    mechs: &[String],
) -> std::result::Result<ClientBinding, String> {
    let offered = |m: &str| mechs.iter().any(|x| x == m);
    let plus = offered(auth::SCRAM_SHA_256_PLUS);
    if policy != ChannelBinding::Disable && tls && plus {
        if let Some(ep) = end_point {
            return Ok(ClientBinding::EndPoint(ep));
        }
    }
    if policy == ChannelBinding::Require {
        let why = if !tls {
            "the connection to the server is not TLS"
        } else if !plus {
            "the server does not offer SCRAM-SHA-256-PLUS"
        } else {
            "the server certificate's signature algorithm has no tls-server-end-point hash"
        };
        return Err(format!("server_tls.channel_binding is require but {why}"));
    }
    if !offered(auth::SCRAM_SHA_256) {
        return Err(format!("server offers no supported SASL mechanism: {mechs:?}"));
    }
    // With PLUS on offer but no binding data for this certificate, "n" is the truth: we cannot bind here.
    Ok(if policy != ChannelBinding::Disable && tls && !plus { ClientBinding::NotOffered } else { ClientBinding::None })
}

/// Sends SSLRequest, reads exactly one byte, then handshakes. Reading more than one byte could swallow
/// bytes a man in the middle placed after the 'S', which would then be read as if they came through TLS
/// (CVE-2021-23222); the plain `TcpStream` has no buffer of its own, so nothing is left behind.
async fn negotiate_tls(mut tcp: TcpStream, tls: &crate::tls::Connector, host: &str) -> Result<ServerStream> {
    use crate::config::ServerTlsMode;
    let mut req = [0u8; 8];
    req[..4].copy_from_slice(&8u32.to_be_bytes());
    req[4..].copy_from_slice(&protocol::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await.map_err(Error::Server)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(Error::Server)?;
    match answer[0] {
        b'S' => {
            let s = tls.connect(host, tcp).await.map_err(|e| Error::Auth(format!("tls handshake with server: {e}")))?;
            Ok(ServerStream::Tls(Box::new(crate::tls::WriteThrough::new(s))))
        }
        b'N' if tls.mode == ServerTlsMode::Prefer => Ok(ServerStream::Tcp(tcp)),
        b'N' => Err(Error::Auth(format!("server does not support SSL and server_tls.mode is {:?}", tls.mode))),
        // An ErrorResponse here comes from a server that predates SSL; its text was not encrypted, so it is not shown.
        other => Err(Error::ServerProtocol(format!("unexpected answer {other:#04x} to SSLRequest"))),
    }
}

/// Applies TCP_NODELAY and the keepalive settings to a socket.
pub fn configure_tcp(s: &TcpStream, proxy: &ProxyConfig) {
    let _ = s.set_nodelay(true);
    if proxy.tcp_keepalive {
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(proxy.tcp_keepidle.max(1)))
            .with_interval(Duration::from_secs(proxy.tcp_keepintvl.max(1)))
            .with_retries(proxy.tcp_keepcnt.max(1));
        let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
    }
}

/// Sends a CancelRequest for backend (pid, key) to a server, over TLS when `tls` (the `[server_tls]`
/// connector) says the server connections are: the key is a credential for killing queries, and a
/// `hostssl`-only server's traffic should carry none of it in the clear. PostgreSQL reads a CancelRequest
/// inside a TLS session just as it reads a StartupMessage there. `prefer` falls back to plaintext on 'N'.
pub async fn send_cancel(target: &Target, tls: Option<&crate::tls::Connector>, pid: i32, key: i32) -> Result<()> {
    let mut out = BytesMut::new();
    protocol::cancel_request(&mut out, pid, key);
    let fut = async {
        // PostgreSQL closes the socket after reading the request; waiting for that keeps the order
        // "cancel delivered, then anything else" for callers that care.
        let mut b = [0u8; 1];
        if target.is_unix() {
            let path = format!("{}/.s.PGSQL.{}", target.host.trim_end_matches('/'), target.port);
            let mut s = UnixStream::connect(path).await.map_err(Error::Server)?;
            s.write_all(&out).await.map_err(Error::Server)?;
            let _ = s.read(&mut b).await;
        } else {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await.map_err(Error::Server)?;
            let _ = tcp.set_nodelay(true);
            let mut s = match tls {
                Some(tls) => negotiate_tls(tcp, tls, &target.host).await?,
                None => ServerStream::Tcp(tcp),
            };
            s.write_all(&out).await.map_err(Error::Server)?;
            let _ = s.read(&mut b).await;
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.unwrap_or(Err(Error::Timeout("cancel request")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_choice() {
        use ChannelBinding::{Disable, Prefer, Require};
        let both = [auth::SCRAM_SHA_256_PLUS.to_string(), auth::SCRAM_SHA_256.to_string()];
        let plain = [auth::SCRAM_SHA_256.to_string()];
        let ep = || Some(vec![1u8; 32]);
        let bound = ClientBinding::EndPoint(vec![1u8; 32]);
        assert_eq!(choose_binding(Prefer, true, ep(), &both), Ok(bound.clone()));
        assert_eq!(choose_binding(Require, true, ep(), &both), Ok(bound));
        assert_eq!(choose_binding(Disable, true, ep(), &both), Ok(ClientBinding::None));
        // Over TLS without PLUS on offer: "y", so a server that did offer it (stripped in transit) refuses.
        assert_eq!(choose_binding(Prefer, true, ep(), &plain), Ok(ClientBinding::NotOffered));
        assert_eq!(choose_binding(Disable, true, ep(), &plain), Ok(ClientBinding::None));
        assert_eq!(choose_binding(Prefer, false, None, &plain), Ok(ClientBinding::None));
        // A certificate without a tls-server-end-point hash cannot be bound to.
        assert_eq!(choose_binding(Prefer, true, None, &both), Ok(ClientBinding::None));
        for (tls, end_point, mechs, why) in [
            (false, None, &plain[..], "not TLS"),
            (true, ep(), &plain[..], "does not offer SCRAM-SHA-256-PLUS"),
            (true, None, &both[..], "no tls-server-end-point hash"),
        ] {
            let e = choose_binding(Require, tls, end_point, mechs).unwrap_err();
            assert!(e.starts_with("server_tls.channel_binding is require") && e.contains(why), "{e}");
        }
        let e = choose_binding(Prefer, false, None, &[auth::SCRAM_SHA_256_PLUS.to_string()]).unwrap_err();
        assert!(e.contains("no supported SASL mechanism"), "{e}");
    }
}
