//! One client session: encryption negotiation (SSLRequest, direct TLS, GSS refusal), startup packet, cancel
//! requests, authentication, then the relay loop.

mod relay;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use pgwire::messages::startup::Authentication;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::auth::{self, ScramServer, Secret};
use crate::config::{AuthType, TlsMode};
use crate::error::{Error, Result};
use crate::protocol::{self, sqlstate, StartupPacket};
use crate::state::{ClientInfo, ClientState, Shared};

pub use stream::{ClientStream, TlsClient};

/// Startup parameters that are not session settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// A client connection before and after login.
pub struct ClientConn {
    pub stream: ClientStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub addr: SocketAddr,
}

impl ClientConn {
    async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await.map_err(Error::Client)?;
            self.wbuf.clear();
            // A no-op on TCP; under TLS it pushes out records rustls still holds.
            self.stream.flush().await.map_err(Error::Client)?;
        }
        Ok(())
    }

    /// Sends an error and flushes; used before closing.
    pub async fn fatal(&mut self, code: &str, message: &str) {
        protocol::error_response(&mut self.wbuf, "FATAL", code, message);
        // Boxed: a timer is large, and this future is part of every session's state.
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), self.flush())).await;
    }

    async fn read_exact_n(&mut self, n: usize) -> Result<BytesMut> {
        while self.rbuf.len() < n {
            let got = self.stream.read_buf(&mut self.rbuf).await.map_err(Error::Client)?;
            if got == 0 {
                return Err(Error::Client(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        Ok(self.rbuf.split_to(n))
    }

    /// Reads one typed message during login (bounded to 10 kB like the startup packet).
    async fn read_message(&mut self) -> Result<(u8, BytesMut)> {
        loop {
            if let Some((t, len)) = protocol::frame_header(&self.rbuf, protocol::MAX_STARTUP_LEN)? {
                let mut f = self.read_exact_n(len).await?;
                f.advance(5);
                return Ok((t, f));
            }
            let got = self.stream.read_buf(&mut self.rbuf).await.map_err(Error::Client)?;
            if got == 0 {
                return Err(Error::Client(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// What the startup phase produced.
struct Startup {
    user: String,
    database: String,
    params: Vec<(String, String)>,
}

/// Serves one accepted socket until it closes.
pub async fn serve(shared: Arc<Shared>, socket: TcpStream, addr: SocketAddr) {
    let local = socket.local_addr().ok();
    crate::server::configure_tcp(&socket, &shared.config.load().proxy);
    let conn = ClientConn {
        stream: ClientStream::Tcp(socket),
        rbuf: BytesMut::with_capacity(256),
        wbuf: BytesMut::with_capacity(512),
        addr,
    };
    // One deadline covers encryption negotiation, the startup packet and authentication.
    // The phases of a connection are boxed futures: this task's own state then stays small, so spawning it copies
    // little and an idle client holds only the state of the phase it is in (the TLS handshake and the SCRAM
    // exchange need far more than a relaying session).
    let deadline = shared.config.load().proxy.client_login_timeout.get().map(|t| tokio::time::Instant::now() + t);
    let negotiated = match deadline {
        Some(d) => Box::pin(tokio::time::timeout_at(d, negotiate_encryption(&shared, conn))).await,
        None => Ok(Box::pin(negotiate_encryption(&shared, conn)).await),
    };
    let mut conn = match negotiated {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if !e.is_disconnect() {
                info!(client = %addr, error = %e, "client login failed");
            }
            return;
        }
        Err(_) => {
            info!(client = %addr, "client_login_timeout before the startup packet: closing");
            return;
        }
    };
    let startup = match deadline {
        Some(d) => match Box::pin(tokio::time::timeout_at(d, startup(&shared, &mut conn))).await {
            Ok(r) => r,
            Err(_) => {
                info!(client = %addr, "client_login_timeout: closing");
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, "client_login_timeout").await;
                return;
            }
        },
        None => Box::pin(startup(&shared, &mut conn)).await,
    };
    let startup = match startup {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            if !e.is_disconnect() {
                info!(client = %addr, error = %e, "client login failed");
            }
            return;
        }
    };
    if startup.database == "pgrelay" || startup.database == "pgbouncer" {
        Box::pin(crate::admin::serve(shared, conn, startup.user, startup.params)).await;
        return;
    }
    let Some(pool) = shared.pool(&startup.database, &startup.user) else {
        conn.fatal(sqlstate::UNKNOWN_DATABASE, &format!("no such database: {}", startup.database)).await;
        return;
    };
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let cancel_key = new_cancel_key(&shared);
    let app = startup.params.iter().find(|(k, _)| k == "application_name").map(|(_, v)| v.clone()).unwrap_or_default();
    let info = Arc::new(ClientInfo {
        id,
        addr,
        local,
        user: startup.user.clone(),
        database: startup.database.clone(),
        application_name: parking_lot::Mutex::new(app),
        connect_time: SystemTime::now(),
        cancel_key,
        linked: parking_lot::Mutex::new(None),
        state: Default::default(),
        state_since_us: Default::default(),
        query_start_us: Default::default(),
        idle_in_tx: Default::default(),
        kill: Default::default(),
        kill_reason: Default::default(),
        tls: conn.stream.is_tls(),
    });
    shared.clients.insert(id, info.clone());
    shared.cancel_keys.insert(cancel_key, info.clone());
    pool.stats.clients.fetch_add(1, Ordering::Relaxed);

    let result = async {
        // 1. Learn the server's parameters (one connection if the pool has none yet), 2. greet, 3. relay.
        let cached = pool.server_params.lock().clone();
        let server_params = match cached {
            Some(p) => p,
            None => {
                let deadline = shared.config.load().proxy.query_wait_timeout.get().map(|d| Instant::now() + d);
                match Box::pin(pool.checkout(deadline)).await {
                    Ok(c) => {
                        let p = Arc::new(c.params.clone());
                        c.release();
                        p
                    }
                    Err(e) => {
                        conn.fatal(sqlstate::CANNOT_CONNECT, &format!("pgrelay: could not connect to server: {e}"))
                            .await;
                        return Err(e);
                    }
                }
            }
        };
        authentication_ok(&mut conn, &server_params, &startup.params, cancel_key);
        conn.flush().await?;
        // The login's write buffer goes: a client that never queries (most of a big fleet) keeps none.
        conn.wbuf = BytesMut::new();
        info.set_state(ClientState::Idle, shared.micros(Instant::now()));
        Box::pin(relay::Session::new(shared.clone(), info.clone(), pool.clone(), startup.params).run(&mut conn)).await
    }
    .await;
    if let Err(e) = result {
        if e.is_disconnect() {
            debug!(client = %addr, "client disconnected");
        } else {
            debug!(client = %addr, error = %e, "client session ended");
        }
    }
    pool.stats.clients.fetch_sub(1, Ordering::Relaxed);
    shared.cancel_keys.remove(&cancel_key);
    shared.clients.remove(&id);
}

fn new_cancel_key(shared: &Shared) -> (i32, i32) {
    loop {
        let k = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
        if !shared.cancel_keys.contains_key(&k) {
            return k;
        }
    }
}

/// AuthenticationOk, ParameterStatus (the server's, with the client's own settings on top), BackendKeyData, ReadyForQuery.
fn authentication_ok(conn: &mut ClientConn, server: &[(String, String)], client: &[(String, String)], key: (i32, i32)) {
    protocol::authentication(&mut conn.wbuf, Authentication::Ok);
    for (k, v) in server {
        let v = client.iter().find(|(ck, _)| ck.eq_ignore_ascii_case(k)).map(|(_, cv)| cv).unwrap_or(v);
        protocol::parameter_status(&mut conn.wbuf, k, v);
    }
    protocol::backend_key_data(&mut conn.wbuf, key.0, key.1);
    protocol::ready_for_query(&mut conn.wbuf, b'I');
}

/// What may come before the startup packet: a direct TLS handshake (first byte 0x16), an SSLRequest
/// (answered 'S' when TLS is configured, 'N' otherwise) and a GSSENCRequest (always 'N'), each at most once.
/// Returns the connection, encrypted or not, with the next packet unread; `Ok(None)` when it was refused.
async fn negotiate_encryption(shared: &Shared, mut conn: ClientConn) -> Result<Option<ClientConn>> {
    let acceptor = shared.tls.load_full();
    let (mut ssl_seen, mut gss_seen) = (false, false);
    loop {
        // 1. Direct TLS (PostgreSQL 17 sslnegotiation=direct) starts with a handshake record where a packet
        //    length would be; peek so rustls gets the ClientHello from the socket untouched.
        //    Without TLS configured there is nothing to hand the socket to: the first read below sees the 0x16 and
        //    closes, and a plaintext login saves the peek's syscall.
        if let (false, false, Some(acceptor), ClientStream::Tcp(tcp)) = (ssl_seen, gss_seen, &acceptor, &conn.stream) {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await.map_err(Error::Client)? == 0 {
                return Err(Error::Client(std::io::ErrorKind::UnexpectedEof.into()));
            }
            if first[0] == 0x16 {
                let acceptor = acceptor.clone();
                return upgrade(conn, &acceptor, true).await;
            }
        }
        // 2. Look at the next packet without consuming it unless it is an encryption request.
        //    A length other than 8 is not a request: hand over at once (a client may wait for our error).
        for want in [4, 8] {
            while conn.rbuf.len() < want {
                if conn.stream.read_buf(&mut conn.rbuf).await.map_err(Error::Client)? == 0 {
                    return Err(Error::Client(std::io::ErrorKind::UnexpectedEof.into()));
                }
            }
            if want == 4 && conn.rbuf[0] == 0x16 && acceptor.is_none() && !ssl_seen && !gss_seen {
                info!(client = %conn.addr, "direct TLS handshake but TLS is not configured: closing");
                return Ok(None);
            }
            if conn.rbuf[..4] != 8u32.to_be_bytes() {
                return Ok(Some(conn));
            }
        }
        let code = u32::from_be_bytes([conn.rbuf[4], conn.rbuf[5], conn.rbuf[6], conn.rbuf[7]]);
        if code != protocol::SSL_REQUEST && code != protocol::GSSENC_REQUEST {
            return Ok(Some(conn));
        }
        conn.rbuf.advance(8);
        if !conn.rbuf.is_empty() {
            // 3. Bytes sent before our answer would be read as if they came through TLS, though they did not
            //    (CVE-2021-23214): refuse rather than buffer them.
            warn!(client = %conn.addr, "data after an encryption request before the answer: closing");
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, "received unencrypted data after SSL request").await;
            return Ok(None);
        }
        match code {
            protocol::SSL_REQUEST if !ssl_seen => {
                ssl_seen = true;
                if let Some(acceptor) = &acceptor {
                    conn.stream.write_all(b"S").await.map_err(Error::Client)?;
                    return upgrade(conn, acceptor, false).await;
                }
                conn.stream.write_all(b"N").await.map_err(Error::Client)?;
            }
            protocol::GSSENC_REQUEST if !gss_seen => {
                gss_seen = true;
                conn.stream.write_all(b"N").await.map_err(Error::Client)?;
            }
            _ => {
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, "too many encryption requests").await;
                return Ok(None);
            }
        }
    }
}

/// Runs the TLS handshake on the plain socket. Direct TLS must have negotiated ALPN "postgresql" (as in
/// PostgreSQL 17), so a TLS client of some other protocol pointed at us is not mistaken for one of ours.
async fn upgrade(conn: ClientConn, acceptor: &crate::tls::Acceptor, direct: bool) -> Result<Option<ClientConn>> {
    let ClientConn { stream, rbuf, wbuf, addr } = conn;
    let ClientStream::Tcp(tcp) = stream else {
        // negotiate_encryption upgrades at most once and returns right after.
        return Ok(None);
    };
    let tls = match acceptor.accept(tcp).await {
        Ok(t) => t,
        Err(e) => {
            info!(client = %addr, error = %e, direct, "tls handshake failed");
            return Ok(None);
        }
    };
    if direct && tls.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
        info!(client = %addr, "direct TLS without ALPN \"postgresql\": closing");
        return Ok(None);
    }
    debug!(client = %addr, direct, "tls established");
    let stream = ClientStream::Tls(Box::new(TlsClient {
        io: crate::tls::WriteThrough::new(tls),
        end_point: acceptor.end_point.clone(),
    }));
    Ok(Some(ClientConn { stream, rbuf, wbuf, addr }))
}

/// Runs the startup phase. `Ok(None)` when the connection was a cancel request or was refused.
async fn startup(shared: &Arc<Shared>, conn: &mut ClientConn) -> Result<Option<Startup>> {
    let header = conn.read_exact_n(4).await?;
    let len = match protocol::startup_len([header[0], header[1], header[2], header[3]]) {
        Ok(l) => l,
        Err(e) => {
            warn!(client = %conn.addr, error = %e, "bad startup packet");
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, &format!("invalid startup packet: {e}")).await;
            return Ok(None);
        }
    };
    let body = conn.read_exact_n(len - 4).await?;
    let (minor, params) = match protocol::parse_startup(&body) {
        // negotiate_encryption took every request that may come before the startup packet.
        Ok(StartupPacket::Ssl) | Ok(StartupPacket::GssEnc) => {
            warn!(client = %conn.addr, "encryption request after negotiation");
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, "unexpected encryption request").await;
            return Ok(None);
        }
        Ok(StartupPacket::Cancel { pid, key }) => {
            forward_cancel(shared, pid, key).await;
            return Ok(None);
        }
        Ok(StartupPacket::Startup { minor, params }) => (minor, params),
        Err(e) => {
            warn!(client = %conn.addr, error = %e, "bad startup packet");
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
            return Ok(None);
        }
    };
    if shared.config.load().tls.mode == TlsMode::Require && !conn.stream.is_tls() {
        info!(client = %conn.addr, "plaintext startup refused: tls.mode = require");
        conn.fatal(sqlstate::INVALID_AUTHORIZATION, "SSL required").await;
        return Ok(None);
    }
    let unsupported: Vec<String> =
        params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
    if minor > 0 || !unsupported.is_empty() {
        protocol::negotiate_protocol_version(&mut conn.wbuf, 0, unsupported);
    }
    let Some(user) = params.iter().find(|(k, _)| k == "user").map(|(_, v)| v.clone()).filter(|u| !u.is_empty()) else {
        conn.fatal(sqlstate::INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet").await;
        return Ok(None);
    };
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map(|(_, v)| v.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let cfg = shared.config.load_full();
    let mut settings = Vec::new();
    for (k, v) in params.into_iter().filter(|(k, _)| !k.starts_with("_pq_.")) {
        if k == "replication" {
            conn.fatal(sqlstate::FEATURE_NOT_SUPPORTED, "pgrelay does not pool replication connections").await;
            return Ok(None);
        }
        if k == "options" && !v.trim().is_empty() && !cfg.proxy.ignore_startup_parameters.iter().any(|i| i == "options")
        {
            conn.fatal(sqlstate::FEATURE_NOT_SUPPORTED, "unsupported startup parameter: options").await;
            return Ok(None);
        }
        if NOT_SETTINGS.contains(&k.as_str())
            || cfg.proxy.ignore_startup_parameters.iter().any(|i| i.eq_ignore_ascii_case(&k))
        {
            continue;
        }
        settings.push((k, v));
    }
    let is_admin_db = database == "pgrelay" || database == "pgbouncer";
    if !is_admin_db && !cfg.databases.contains_key(&database) {
        conn.fatal(sqlstate::UNKNOWN_DATABASE, &format!("no such database: {database}")).await;
        return Ok(None);
    }
    if !authenticate(shared, conn, &user, &database).await? {
        return Ok(None);
    }
    Ok(Some(Startup { user, database, params: settings }))
}

/// Authenticates the client per `[auth] type`. `Ok(false)` after a refusal was sent.
async fn authenticate(shared: &Arc<Shared>, conn: &mut ClientConn, user: &str, database: &str) -> Result<bool> {
    let kind = shared.config.load().auth.kind;
    if kind == AuthType::Trust {
        return Ok(true);
    }
    let secret = shared.secret_for(user, database).await;
    // An md5 hash can only do md5, a SCRAM verifier only SCRAM; a plaintext password (or an unknown user)
    // follows `type`.
    let use_scram = match (&secret, kind) {
        (Some(Secret::Md5(_)), _) => false,
        (Some(Secret::Scram(_)), _) => true,
        (_, k) => k == AuthType::ScramSha256,
    };
    // `None`: the exchange already sent its own FATAL (malformed messages).
    let verdict = match (&secret, use_scram) {
        (Some(secret), true) => match ScramServer::new(&shared.scram_secret(user, secret)) {
            Ok(server) => scram_exchange(shared, conn, user, database, server, Some(secret)).await?,
            Err(e) => {
                warn!(user = %user, error = %e, "cannot do SCRAM with this user's secret");
                Some(false)
            }
        },
        // Unknown users get the same exchange as known ones, failing only at the proof, so user names
        // cannot be probed.
        (None, true) => {
            let server = ScramServer::mock(user, auth::instance_secret());
            scram_exchange(shared, conn, user, database, server, None).await?
        }
        (secret, false) => {
            let salt: [u8; 4] = rand::random();
            protocol::authentication(&mut conn.wbuf, Authentication::MD5Password(salt.to_vec()));
            conn.flush().await?;
            let (t, body) = conn.read_message().await?;
            if t != b'p' {
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, "expected password message").await;
                return Ok(false);
            }
            let resp = body.strip_suffix(b"\0").unwrap_or(&body);
            Some(secret.as_ref().is_some_and(|s| auth::md5_verify(user, s, salt, resp)))
        }
    };
    let Some(ok) = verdict else {
        return Ok(false);
    };
    if !ok {
        let known = if secret.is_some() { "known" } else { "unknown" };
        info!(client = %conn.addr, user = %user, user_is = known, "password authentication failed");
        protocol::error_response(
            &mut conn.wbuf,
            "FATAL",
            sqlstate::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
        );
        conn.flush().await?;
    }
    Ok(ok)
}

/// One SCRAM exchange: `Some(passed)`, or `None` after a FATAL for a malformed message. SCRAM-SHA-256-PLUS (tls-server-end-point) is offered only on a TLS connection whose
/// certificate has channel binding data. `secret` is `None` for the mock exchange of an unknown user.
async fn scram_exchange(
    shared: &Arc<Shared>,
    conn: &mut ClientConn,
    user: &str,
    database: &str,
    mut server: ScramServer,
    secret: Option<&Secret>,
) -> Result<Option<bool>> {
    if let Some(cb) = conn.stream.end_point() {
        server = server.with_channel_binding(&cb);
    }
    let mechanisms = server.mechanisms().iter().map(|m| m.to_string()).collect();
    protocol::authentication(&mut conn.wbuf, Authentication::SASL(mechanisms));
    conn.flush().await?;
    let (t, body) = conn.read_message().await?;
    let mut r = &body[..];
    let mech = protocol::take_cstr(&mut r).unwrap_or("");
    let len = protocol::take_i32(&mut r).unwrap_or(-1);
    if t != b'p' || !server.mechanisms().contains(&mech) || len < 0 || len as usize != r.len() {
        info!(client = %conn.addr, "malformed SASLInitialResponse or unsupported mechanism");
        conn.fatal(sqlstate::PROTOCOL_VIOLATION, "malformed SASLInitialResponse or unsupported mechanism").await;
        return Ok(None);
    }
    let first = match server.client_first_with(mech, r) {
        Ok(m) => m,
        Err(e) => {
            info!(client = %conn.addr, error = %e, "bad SCRAM client-first message");
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, &format!("malformed SCRAM message: {e}")).await;
            return Ok(None);
        }
    };
    protocol::authentication(&mut conn.wbuf, Authentication::SASLContinue(first.into()));
    conn.flush().await?;
    let (t, body) = conn.read_message().await?;
    if t != b'p' {
        conn.fatal(sqlstate::PROTOCOL_VIOLATION, "expected SASLResponse").await;
        return Ok(None);
    }
    match server.client_final(&body) {
        Ok(fin) => {
            protocol::authentication(&mut conn.wbuf, Authentication::SASLFinal(fin.into()));
            if let (Some(ck), Some(Secret::Scram(v))) = (server.client_key(), secret) {
                // The server may want SCRAM too and we only hold the verifier: reuse the keys this client proved.
                let cfg = shared.config.load();
                let server_user_is_client =
                    cfg.databases.get(database).is_none_or(|d| d.user.is_none() && d.password.is_none());
                if server_user_is_client {
                    if let Some(pool) = shared.pool(database, user) {
                        let keys = Some((ck, v.server_key));
                        if pool.login.load().scram_keys != keys {
                            pool.login.rcu(|l| {
                                let mut l = (**l).clone();
                                l.scram_keys = keys;
                                l
                            });
                        }
                    }
                }
            }
            Ok(Some(true))
        }
        Err(auth::AuthError::BadProof) => Ok(Some(false)),
        Err(e) => {
            info!(client = %conn.addr, error = %e, "bad SCRAM client-final message");
            Ok(Some(false))
        }
    }
}

/// Forwards a client's CancelRequest to the server running its query, if any.
async fn forward_cancel(shared: &Arc<Shared>, pid: i32, key: i32) {
    let target = shared.cancel_keys.get(&(pid, key)).and_then(|c| c.linked.lock().clone());
    match target {
        Some(t) => {
            debug!(server = %t.target, "forwarding cancel request");
            let tls = shared.config.load().proxy.server_tls.0.clone();
            if let Err(e) = crate::server::send_cancel(&t.target, tls.as_deref(), t.pid, t.key).await {
                warn!(server = %t.target, error = %e, "cancel request to server failed");
            }
        }
        None => debug!("cancel request for unknown or idle client ignored"),
    }
}

/// Cancels whatever the client is running (used by query_timeout and by a cancel handed over in an upgrade).
/// `tls` is the `[server_tls]` connector the server connections are made with.
pub async fn cancel_client(info: &ClientInfo, tls: Option<&crate::tls::Connector>) {
    let t = info.linked.lock().clone();
    if let Some(t) = t {
        if let Err(e) = crate::server::send_cancel(&t.target, tls, t.pid, t.key).await {
            warn!(server = %t.target, error = %e, "cancel request to server failed");
        }
    }
}
