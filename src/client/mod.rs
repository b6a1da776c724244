//! One client session: startup packet, TLS/GSS refusal, cancel requests, authentication, then the relay loop.

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
use crate::config::AuthType;
use crate::error::{Error, Result};
use crate::protocol::{self, sqlstate, StartupPacket};
use crate::state::{ClientInfo, ClientState, Shared};

pub use stream::ClientStream;

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
        }
        Ok(())
    }

    /// Sends an error and flushes; used before closing.
    pub async fn fatal(&mut self, code: &str, message: &str) {
        protocol::error_response(&mut self.wbuf, "FATAL", code, message);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
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
    let mut conn = ClientConn {
        stream: ClientStream::Tcp(socket),
        rbuf: BytesMut::with_capacity(8 * 1024),
        wbuf: BytesMut::with_capacity(8 * 1024),
        addr,
    };
    let login_timeout = shared.config.load().proxy.client_login_timeout.get();
    let startup = match login_timeout {
        Some(t) => match tokio::time::timeout(t, startup(&shared, &mut conn)).await {
            Ok(r) => r,
            Err(_) => {
                info!(client = %addr, "client_login_timeout: closing");
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, "client_login_timeout").await;
                return;
            }
        },
        None => startup(&shared, &mut conn).await,
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
        crate::admin::serve(shared, conn, startup.user, startup.params).await;
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
        tls: false,
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
                match pool.checkout(deadline).await {
                    Ok(c) => {
                        let p = c.params.clone();
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
        info.set_state(ClientState::Idle, shared.micros(Instant::now()));
        relay::Session::new(shared.clone(), info.clone(), pool.clone(), startup.params).run(&mut conn).await
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

/// Runs the startup phase. `Ok(None)` when the connection was a cancel request or was refused.
async fn startup(shared: &Arc<Shared>, conn: &mut ClientConn) -> Result<Option<Startup>> {
    let mut negotiations = 0;
    let (minor, params) = loop {
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
        match protocol::parse_startup(&body) {
            Ok(StartupPacket::Ssl) | Ok(StartupPacket::GssEnc) if negotiations < 2 => {
                negotiations += 1;
                if !conn.rbuf.is_empty() {
                    // Bytes after an SSLRequest before our answer would be a downgrade/injection attempt.
                    conn.fatal(sqlstate::PROTOCOL_VIOLATION, "unexpected data after SSL request").await;
                    return Ok(None);
                }
                conn.stream.write_all(b"N").await.map_err(Error::Client)?;
            }
            Ok(StartupPacket::Ssl) | Ok(StartupPacket::GssEnc) => {
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, "too many encryption requests").await;
                return Ok(None);
            }
            Ok(StartupPacket::Cancel { pid, key }) => {
                forward_cancel(shared, pid, key).await;
                return Ok(None);
            }
            Ok(StartupPacket::Startup { minor, params }) => break (minor, params),
            Err(e) => {
                warn!(client = %conn.addr, error = %e, "bad startup packet");
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, &e.to_string()).await;
                return Ok(None);
            }
        }
    };
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
    let secret = shared.userlist.load().get(user).cloned();
    let refuse = |conn: &mut ClientConn| {
        protocol::error_response(
            &mut conn.wbuf,
            "FATAL",
            sqlstate::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
        );
    };
    let Some(secret) = secret else {
        info!(client = %conn.addr, user = %user, "unknown user");
        refuse(conn);
        conn.flush().await?;
        return Ok(false);
    };
    // An md5 hash can only do md5, a SCRAM verifier only SCRAM; a plaintext password follows `type`.
    let use_scram = match (&secret, kind) {
        (Secret::Md5(_), _) => false,
        (Secret::Scram(_), _) => true,
        (Secret::Plain(_), k) => k == AuthType::ScramSha256,
    };
    let ok = if use_scram {
        scram_exchange(shared, conn, user, database, &secret).await?
    } else {
        let salt: [u8; 4] = rand::random();
        protocol::authentication(&mut conn.wbuf, Authentication::MD5Password(salt.to_vec()));
        conn.flush().await?;
        let (t, body) = conn.read_message().await?;
        if t != b'p' {
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, "expected password message").await;
            return Ok(false);
        }
        let resp = body.strip_suffix(b"\0").unwrap_or(&body);
        auth::md5_verify(user, &secret, salt, resp)
    };
    if !ok {
        info!(client = %conn.addr, user = %user, "password authentication failed");
        refuse(conn);
        conn.flush().await?;
    }
    Ok(ok)
}

async fn scram_exchange(
    shared: &Arc<Shared>,
    conn: &mut ClientConn,
    user: &str,
    database: &str,
    secret: &Secret,
) -> Result<bool> {
    let mut server = match ScramServer::new(secret) {
        Ok(s) => s,
        Err(e) => {
            warn!(user = %user, error = %e, "cannot do SCRAM with this user's secret");
            return Ok(false);
        }
    };
    protocol::authentication(&mut conn.wbuf, Authentication::SASL(vec!["SCRAM-SHA-256".into()]));
    conn.flush().await?;
    let (t, body) = conn.read_message().await?;
    let mut r = &body[..];
    let mech = protocol::take_cstr(&mut r).unwrap_or("");
    let len = protocol::take_i32(&mut r).unwrap_or(-1);
    if t != b'p' || mech != "SCRAM-SHA-256" || len < 0 || len as usize != r.len() {
        conn.fatal(sqlstate::PROTOCOL_VIOLATION, "malformed SASLInitialResponse or unsupported mechanism").await;
        return Ok(false);
    }
    let first = match server.client_first(r) {
        Ok(m) => m,
        Err(e) => {
            info!(client = %conn.addr, error = %e, "bad SCRAM client-first message");
            conn.fatal(sqlstate::PROTOCOL_VIOLATION, &format!("malformed SCRAM message: {e}")).await;
            return Ok(false);
        }
    };
    protocol::authentication(&mut conn.wbuf, Authentication::SASLContinue(first.into()));
    conn.flush().await?;
    let (t, body) = conn.read_message().await?;
    if t != b'p' {
        conn.fatal(sqlstate::PROTOCOL_VIOLATION, "expected SASLResponse").await;
        return Ok(false);
    }
    match server.client_final(&body) {
        Ok(fin) => {
            protocol::authentication(&mut conn.wbuf, Authentication::SASLFinal(fin.into()));
            if let (Some(ck), Secret::Scram(v)) = (server.client_key(), secret) {
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
            Ok(true)
        }
        Err(e) => {
            debug!(client = %conn.addr, error = %e, "scram proof rejected");
            Ok(false)
        }
    }
}

/// Forwards a client's CancelRequest to the server running its query, if any.
async fn forward_cancel(shared: &Arc<Shared>, pid: i32, key: i32) {
    let target = shared.cancel_keys.get(&(pid, key)).and_then(|c| c.linked.lock().clone());
    match target {
        Some(t) => {
            debug!(server = %t.target, "forwarding cancel request");
            if let Err(e) = crate::server::send_cancel(&t.target, t.pid, t.key).await {
                warn!(server = %t.target, error = %e, "cancel request to server failed");
            }
        }
        None => debug!("cancel request for unknown or idle client ignored"),
    }
}

/// Cancels whatever the client is running (used by query_timeout).
pub async fn cancel_client(info: &ClientInfo) {
    let t = info.linked.lock().clone();
    if let Some(t) = t {
        if let Err(e) = crate::server::send_cancel(&t.target, t.pid, t.key).await {
            warn!(server = %t.target, error = %e, "cancel request to server failed");
        }
    }
}
