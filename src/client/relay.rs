//! The relay loop: one task owns the client and, while linked, its server connection. Frames are scanned in place,
//! forwarded in one write per batch, and the server goes back to the pool at the transaction boundary.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::ClientConn;
use crate::config::PoolMode;
use crate::error::{Error, Result};
use crate::observe::fingerprint::query_type;
use crate::observe::QueryType;
use crate::pool::{Pool, PooledConn};
use crate::protocol::{self, sqlstate};
use crate::state::{CancelTarget, ClientInfo, ClientState, Shared};

/// Server frames larger than this are streamed through instead of buffered whole (unless the proxy must read them).
const STREAM_THRESHOLD: usize = 64 * 1024;

/// One query awaiting its ReadyForQuery.
struct InFlight {
    start: Instant,
    qtype: QueryType,
}

/// What woke the loop.
enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
    Kill,
}

/// A logged-in client's session state.
pub struct Session {
    shared: Arc<Shared>,
    info: Arc<ClientInfo>,
    pool: Arc<Pool>,
    mode: PoolMode,
    /// Settings this client asked for (startup parameters); applied to every server it gets.
    params: Vec<(String, String)>,
    max_packet: usize,
    inflight: VecDeque<InFlight>,
    /// Extended-protocol messages forwarded since the last Sync: the server is not at a boundary yet.
    open_extended: bool,
    /// Injected queries whose responses are dropped before anything reaches the client.
    swallow: u32,
    /// Bytes of a large server frame still streaming through, and whether they are dropped.
    server_skip: usize,
    server_skip_drop: bool,
    last_qtype: QueryType,
    linked_at: Option<Instant>,
    /// Close at the next transaction boundary (drain).
    close_at_boundary: Option<(&'static str, String)>,
    out: BytesMut,
}

impl Session {
    /// A session for a client that just logged in.
    pub fn new(
        shared: Arc<Shared>,
        info: Arc<ClientInfo>,
        pool: Arc<Pool>,
        params: Vec<(String, String)>,
    ) -> Session {
        let cfg = shared.config.load();
        Session {
            mode: pool.settings.load().pool_mode,
            max_packet: cfg.proxy.max_packet_size,
            shared: shared.clone(),
            info,
            pool,
            params,
            inflight: VecDeque::with_capacity(16),
            open_extended: false,
            swallow: 0,
            server_skip: 0,
            server_skip_drop: false,
            last_qtype: QueryType::Other,
            linked_at: None,
            close_at_boundary: None,
            out: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Relays until the client leaves or is told to.
    pub async fn run(mut self, conn: &mut ClientConn) -> Result<()> {
        let mut server: Option<PooledConn> = None;
        let info = self.info.clone();
        let kill = info.kill.notified();
        tokio::pin!(kill);
        kill.as_mut().enable();
        let result = loop {
            let ev = match server.as_mut() {
                Some(srv) => {
                    let s: &mut crate::server::ServerConn = srv;
                    tokio::select! {
                        biased;
                        _ = &mut kill => Event::Kill,
                        r = s.stream.read_buf(&mut s.rbuf) => Event::Server(r),
                        r = conn.stream.read_buf(&mut conn.rbuf) => Event::Client(r),
                    }
                }
                None => tokio::select! {
                    biased;
                    _ = &mut kill => Event::Kill,
                    r = conn.stream.read_buf(&mut conn.rbuf) => Event::Client(r),
                },
            };
            match ev {
                Event::Client(Ok(0)) | Event::Client(Err(_)) => break Ok(()),
                Event::Client(Ok(n)) => {
                    self.pool
                        .stats
                        .bytes_received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    match self.on_client_data(conn, &mut server).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                Event::Server(r) => {
                    let srv = server
                        .as_mut()
                        .expect("server events only arrive while linked");
                    let r = match r {
                        Ok(0) => Err(Error::Server(std::io::ErrorKind::UnexpectedEof.into())),
                        Ok(_) => self.on_server_data(conn, srv).await,
                        Err(e) => Err(Error::Server(e)),
                    };
                    match r {
                        Ok(true) => {
                            self.unlink(server.take().expect("linked"), true).await;
                            if let Some((code, msg)) = self.close_at_boundary.take() {
                                conn.fatal(code, &msg).await;
                                break Ok(());
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            if e.is_server_side() {
                                warn!(client = %conn.addr, error = %e, "server connection lost mid-transaction");
                                conn.fatal(
                                    sqlstate::CONNECTION_FAILURE,
                                    "server conn crashed? the server closed the connection",
                                )
                                .await;
                            }
                            if let Some(s) = server.take() {
                                self.unlink(s, false).await;
                            }
                            break Err(e);
                        }
                    }
                }
                Event::Kill => {
                    let reason = self.info.kill_reason.lock().take();
                    let (code, msg) = reason.unwrap_or((
                        sqlstate::ADMIN_SHUTDOWN,
                        "closing because of an admin command".into(),
                    ));
                    let at_boundary =
                        code == sqlstate::ADMIN_SHUTDOWN && msg.contains("shutting down");
                    if at_boundary && server.is_some() {
                        self.close_at_boundary = Some((code, msg));
                        kill.set(info.kill.notified());
                        kill.as_mut().enable();
                        continue;
                    }
                    conn.fatal(code, &msg).await;
                    break Ok(());
                }
            }
        };
        // Leaving: a server at a clean boundary goes back, anything else is closed (PostgreSQL rolls back).
        if let Some(s) = server.take() {
            let clean = self.at_boundary(&s);
            self.unlink(s, clean).await;
        }
        result
    }

    fn at_boundary(&self, s: &PooledConn) -> bool {
        self.inflight.is_empty()
            && !self.open_extended
            && self.swallow == 0
            && self.server_skip == 0
            && s.tx_status == b'I'
            && s.rbuf.is_empty()
    }

    /// Scans complete client frames, links a server if needed and forwards them. `Ok(false)` = client is done.
    async fn on_client_data(
        &mut self,
        conn: &mut ClientConn,
        server: &mut Option<PooledConn>,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut terminate = false;
        let mut only_syncs = true;
        let mut consumed = 0;
        let before = self.inflight.len();
        loop {
            let buf = &conn.rbuf[consumed..];
            let (t, len) = match protocol::frame_header(buf, self.max_packet) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    warn!(client = %conn.addr, error = %e, "client protocol violation");
                    conn.fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!("invalid message: {e}"),
                    )
                    .await;
                    return Err(e.into());
                }
            };
            if buf.len() < len {
                conn.rbuf.reserve(len - buf.len());
                break;
            }
            let body = &buf[5..len];
            match t {
                b'Q' => {
                    let qt = query_type(protocol::query_text(body));
                    self.inflight.push_back(InFlight {
                        start: now,
                        qtype: qt,
                    });
                    only_syncs = false;
                }
                b'P' => {
                    let mut r = body;
                    let _name = protocol::take_cstr(&mut r);
                    self.last_qtype = protocol::take_cstr(&mut r)
                        .map(query_type)
                        .unwrap_or(QueryType::Other);
                    self.open_extended = true;
                    only_syncs = false;
                }
                b'S' => {
                    self.inflight.push_back(InFlight {
                        start: now,
                        qtype: self.last_qtype,
                    });
                    self.open_extended = false;
                }
                b'F' => {
                    self.inflight.push_back(InFlight {
                        start: now,
                        qtype: QueryType::Other,
                    });
                    only_syncs = false;
                }
                b'B' | b'E' | b'D' | b'C' => {
                    self.open_extended = true;
                    only_syncs = false;
                }
                b'H' => {}
                b'd' | b'c' | b'f' => only_syncs = false,
                b'X' => {
                    terminate = true;
                    consumed += len;
                    break;
                }
                other => {
                    warn!(client = %conn.addr, msg_type = other, "invalid frontend message type");
                    conn.fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        &format!("invalid frontend message type {other}"),
                    )
                    .await;
                    return Err(Error::ClientProtocol(protocol::ProtocolError::Malformed(
                        "message type",
                    )));
                }
            }
            self.out.extend_from_slice(&buf[..len]);
            consumed += len;
        }
        conn.rbuf.advance(consumed);
        if !self.out.is_empty() {
            if server.is_none() {
                if only_syncs && !self.open_extended {
                    // A bare Sync (or Flush) needs no server: answer it here.
                    for _ in before..self.inflight.len() {
                        protocol::ready_for_query(&mut conn.wbuf, b'I');
                    }
                    self.inflight.truncate(before);
                    self.out.clear();
                    conn.flush().await?;
                    return Ok(!terminate);
                }
                match self.link(conn, now).await {
                    Ok(s) => *server = Some(s),
                    Err(e) => {
                        self.refuse_batch(conn, &e).await?;
                        return Ok(!terminate);
                    }
                }
            }
            let srv = server.as_mut().expect("linked above");
            if let Some(q) = self.inflight.front() {
                self.info
                    .query_start_us
                    .store(self.shared.micros(q.start), Ordering::Relaxed);
            }
            self.info.idle_in_tx.store(false, Ordering::Relaxed);
            if let Err(e) = srv.stream.write_all(&self.out).await {
                self.out.clear();
                conn.fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "server connection failed while sending",
                )
                .await;
                return Err(Error::Server(e));
            }
            self.out.clear();
        }
        if terminate {
            return Ok(false);
        }
        Ok(true)
    }

    /// Gets a server for this client and brings its settings in line (injected SET/RESET, answer swallowed).
    async fn link(&mut self, conn: &mut ClientConn, now: Instant) -> Result<PooledConn> {
        self.info
            .set_state(ClientState::Waiting, self.shared.micros(now));
        while self.shared.paused.load(Ordering::Acquire) || self.pool.paused.load(Ordering::Acquire)
        {
            let resumed = self.shared.resumed.notified();
            if !self.shared.paused.load(Ordering::Acquire)
                && !self.pool.paused.load(Ordering::Acquire)
            {
                break;
            }
            resumed.await;
        }
        let deadline = self
            .shared
            .config
            .load()
            .proxy
            .query_wait_timeout
            .get()
            .map(|d| now + d);
        self.pool.stats.cl_active.fetch_add(1, Ordering::Relaxed);
        let mut srv = match self.pool.checkout(deadline).await {
            Ok(s) => s,
            Err(e) => {
                self.pool.stats.cl_active.fetch_sub(1, Ordering::Relaxed);
                self.info
                    .set_state(ClientState::Idle, self.shared.micros(Instant::now()));
                return Err(e);
            }
        };
        if let Some(sql) = settings_sync(&srv, &self.params) {
            // Written before the client's frames so its statements run with its own settings.
            let mut pre = BytesMut::with_capacity(sql.len() + 8 + self.out.len());
            protocol::query(&mut pre, &sql);
            pre.extend_from_slice(&self.out);
            self.out = pre;
            self.swallow += 1;
            note_applied(&mut srv, &self.params);
        }
        *self.info.linked.lock() = Some(CancelTarget {
            target: srv.target.clone(),
            pid: srv.backend_pid,
            key: srv.backend_key,
            server_id: srv.id,
        });
        self.info
            .set_state(ClientState::Active, self.shared.micros(now));
        self.linked_at = Some(now);
        let _ = conn;
        Ok(srv)
    }

    /// Returns or closes the server and marks the client idle.
    async fn unlink(&mut self, mut srv: PooledConn, clean: bool) {
        *self.info.linked.lock() = None;
        self.info.query_start_us.store(0, Ordering::Relaxed);
        self.pool.stats.cl_active.fetch_sub(1, Ordering::Relaxed);
        if let Some(t) = self.linked_at.take() {
            self.pool
                .stats
                .xact_time_us
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.pool.stats.xact_count.fetch_add(1, Ordering::Relaxed);
            self.pool.metrics.transactions.increment(1);
        }
        self.info
            .set_state(ClientState::Idle, self.shared.micros(Instant::now()));
        if !clean {
            srv.discard();
            return;
        }
        let reset = {
            let cfg = self.shared.config.load();
            let q = &cfg.proxy.server_reset_query;
            (!q.is_empty()
                && (self.mode == PoolMode::Session || cfg.proxy.server_reset_query_always))
                .then(|| q.clone())
        };
        if let Some(q) = reset {
            match tokio::time::timeout(Duration::from_secs(5), srv.execute(&q)).await {
                Ok(Ok(())) => srv.applied_reset(),
                _ => {
                    srv.discard();
                    return;
                }
            }
        }
        srv.release();
    }

    /// Tells the client its batch could not get a server: an error, then ReadyForQuery for each pending sync.
    async fn refuse_batch(&mut self, conn: &mut ClientConn, e: &Error) -> Result<()> {
        let (code, msg) = match e {
            Error::Timeout(what) => (
                sqlstate::CANNOT_CONNECT,
                format!("pgrelay: {what}: no server connection available"),
            ),
            other => (
                sqlstate::CANNOT_CONNECT,
                format!("pgrelay: could not get a server connection: {other}"),
            ),
        };
        info!(client = %conn.addr, db = %self.info.database, error = %e, "no server for client");
        self.pool.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.out.clear();
        protocol::error_response(&mut conn.wbuf, "ERROR", code, &msg);
        let pending = self.inflight.len();
        self.inflight.clear();
        self.open_extended = false;
        if pending == 0 {
            conn.flush().await?;
            return Err(Error::Pool(msg));
        }
        for _ in 0..pending {
            protocol::ready_for_query(&mut conn.wbuf, b'I');
        }
        conn.flush().await
    }

    /// Forwards what the server sent. `Ok(true)` = the server is at a boundary and should be unlinked.
    async fn on_server_data(
        &mut self,
        conn: &mut ClientConn,
        srv: &mut PooledConn,
    ) -> Result<bool> {
        let mut now: Option<Instant> = None;
        let mut saw_ready = false;
        let mut fatal = false;
        loop {
            if self.server_skip > 0 {
                let n = self.server_skip.min(srv.rbuf.len());
                if n == 0 {
                    break;
                }
                if !self.server_skip_drop {
                    conn.wbuf.extend_from_slice(&srv.rbuf[..n]);
                }
                srv.rbuf.advance(n);
                self.server_skip -= n;
                continue;
            }
            let (t, len) = match protocol::frame_header(&srv.rbuf, 1 << 30) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Err(Error::ServerProtocol(e.to_string())),
            };
            let have = srv.rbuf.len();
            if have < len {
                let must_read = matches!(t, b'Z' | b'E' | b'S');
                if must_read || len <= STREAM_THRESHOLD {
                    srv.rbuf.reserve(len - have);
                    break;
                }
                let drop = self.swallow > 0;
                if !drop {
                    conn.wbuf.extend_from_slice(&srv.rbuf[..have]);
                }
                srv.rbuf.advance(have);
                self.server_skip = len - have;
                self.server_skip_drop = drop;
                break;
            }
            let dropped = self.swallow > 0;
            match t {
                b'Z' => {
                    let status = srv.rbuf[5];
                    srv.tx_status = status;
                    if dropped {
                        self.swallow -= 1;
                    } else {
                        saw_ready = true;
                        let now = *now.get_or_insert_with(Instant::now);
                        if let Some(q) = self.inflight.pop_front() {
                            let d = now.saturating_duration_since(q.start);
                            self.pool.metrics.record_query(q.qtype, d);
                            self.pool.stats.query_count.fetch_add(1, Ordering::Relaxed);
                            self.pool
                                .stats
                                .query_time_us
                                .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
                        }
                        match self.inflight.front() {
                            Some(q) => self
                                .info
                                .query_start_us
                                .store(self.shared.micros(q.start), Ordering::Relaxed),
                            None => self.info.query_start_us.store(0, Ordering::Relaxed),
                        }
                    }
                }
                b'E' => {
                    let f = protocol::parse_error_fields(&srv.rbuf[5..len]);
                    if f.severity == "FATAL" || f.severity == "PANIC" {
                        fatal = true;
                    }
                    if dropped {
                        warn!(client = %conn.addr, code = %f.code, error = %f.message, "applying client settings on server failed");
                    } else {
                        self.pool.stats.errors.fetch_add(1, Ordering::Relaxed);
                        self.pool.metrics.errors.increment(1);
                    }
                }
                b'S' => {
                    let body = srv.rbuf[5..len].to_vec();
                    srv.note_parameter(&body);
                }
                _ => {}
            }
            if !dropped {
                conn.wbuf.extend_from_slice(&srv.rbuf[..len]);
            }
            srv.rbuf.advance(len);
        }
        if !conn.wbuf.is_empty() {
            self.pool
                .stats
                .bytes_sent
                .fetch_add(conn.wbuf.len() as u64, Ordering::Relaxed);
            conn.flush().await?;
        }
        if fatal {
            return Err(Error::ServerRefused {
                code: "FATAL".into(),
                message: "server sent FATAL".into(),
            });
        }
        if !saw_ready || !self.inflight.is_empty() {
            return Ok(false);
        }
        let status = srv.tx_status;
        if status != b'I' {
            if self.mode == PoolMode::Statement {
                conn.fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "transaction blocks not allowed in statement pooling mode",
                )
                .await;
                return Err(Error::Pool("transaction in statement mode".into()));
            }
            self.info.idle_in_tx.store(true, Ordering::Relaxed);
            self.info
                .state_since_us
                .store(self.shared.micros(Instant::now()), Ordering::Relaxed);
            return Ok(false);
        }
        if self.mode == PoolMode::Session && self.close_at_boundary.is_none() {
            return Ok(false);
        }
        Ok(self.at_boundary(srv))
    }
}

/// The SET/RESET statement that makes a server's settings match a client's, if any differ.
fn settings_sync(srv: &crate::server::ServerConn, wanted: &[(String, String)]) -> Option<String> {
    let mut sql = String::new();
    for (k, v) in wanted {
        let applied = srv.applied.iter().find(|(n, _)| n.eq_ignore_ascii_case(k));
        let same = match applied {
            Some((_, av)) => av == v,
            None => srv.param(k) == Some(v.as_str()),
        };
        if !same {
            sql.push_str(&format!(
                "SET {} = {};",
                protocol::quote_ident(k),
                protocol::quote_literal(v)
            ));
        }
    }
    for (k, _) in &srv.applied {
        if !wanted.iter().any(|(n, _)| n.eq_ignore_ascii_case(k)) {
            sql.push_str(&format!("RESET {};", protocol::quote_ident(k)));
        }
    }
    (!sql.is_empty()).then_some(sql)
}

/// Records that a server now carries exactly the client's settings.
fn note_applied(srv: &mut crate::server::ServerConn, wanted: &[(String, String)]) {
    srv.applied.clear();
    srv.applied.extend(wanted.iter().cloned());
    debug!(
        server = srv.id,
        settings = srv.applied.len(),
        "client settings applied"
    );
}
