//! The relay loop: one task owns the client and, while linked, its server connection. Frames are scanned in place,
//! forwarded in one write per batch, and the server goes back to the pool at the transaction boundary.
//!
//! Every forwarded message that the server answers is recorded in `expect`, in order. That queue is what lets the
//! proxy drop answers to messages it injected (a Parse before a Bind, a SET for the client's settings) and
//! synthesise answers to messages it absorbed (a Parse the server already has, a Close of a shared statement)
//! without ever reordering the stream, and it tells exactly when the server is back at a transaction boundary.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

use super::ClientConn;
use crate::config::PoolMode;
use crate::error::{Error, Result};
use crate::observe::fingerprint::query_type;
use crate::observe::QueryType;
use crate::pool::{Pool, PooledConn};
use crate::prepared::{self, Prepared, SessionCommand};
use crate::protocol::{self, sqlstate, take_cstr};
use crate::state::{CancelTarget, ClientInfo, ClientState, Shared};

/// Server frames larger than this are streamed through instead of buffered whole (unless the proxy must read them).
const STREAM_THRESHOLD: usize = 64 * 1024;

/// An answer the server (or the proxy) still owes, in order.
#[derive(Debug)]
enum Expect {
    /// ParseComplete. `swallow`: the Parse was injected. `hash`/`client`: forget them if the Parse fails.
    Parse {
        swallow: bool,
        hash: Option<u64>,
        client: Option<String>,
    },
    /// BindComplete ends it; the named statement bound, if any (a stale statement is detected here).
    Bind(Option<Arc<Prepared>>),
    /// RowDescription or NoData ends it (a statement Describe sends ParameterDescription first, whose types are kept
    /// for the statement).
    Describe(Option<Arc<Prepared>>),
    /// CommandComplete, EmptyQueryResponse or PortalSuspended ends it.
    Execute,
    Close {
        swallow: bool,
    },
    /// ReadyForQuery ends a Sync, a simple Query or a FunctionCall.
    Ready {
        swallow: bool,
        start: Instant,
        qtype: QueryType,
        set: Option<Box<SessionCommand>>,
        obs: Observed,
        /// Whether anything was executed (a Parse/Describe-only round trip is not a query).
        exec: bool,
    },
    /// An answer the proxy makes up, sent once everything before it is answered. `undo`: the client statement name
    /// to forget if the server skips this message (an earlier error in the same pipeline).
    Synth {
        msg: Synthetic,
        undo: Option<Undo>,
    },
}

/// What to take back if the server skips the message a made-up answer stands for (an earlier error in the pipeline).
#[derive(Debug)]
enum Undo {
    /// A Parse the proxy answered: the name was never defined.
    Forget(String),
    /// A Close the proxy answered: the name still exists.
    Restore(String, Arc<Prepared>),
}

/// Messages the proxy answers on the server's behalf.
#[derive(Debug)]
enum Synthetic {
    ParseComplete,
    CloseComplete,
    BindComplete,
    NoData,
    /// ParameterDescription with no parameters, then NoData (Describe of an absorbed statement).
    NoParamsNoData,
    Command(&'static str),
    /// An ErrorResponse (SQLSTATE, message); the proxy then drops the client's messages up to its Sync, as the server
    /// would have.
    Error(&'static str, String),
}

/// A statement that does nothing and reports success, standing in for session commands the proxy absorbs.
const NO_OP: &str = "DO $pgrelay$BEGIN END$pgrelay$";

/// The refusal of SQL-level PREPARE in transaction mode.
const PREPARE_REFUSED: &str = "SQL PREPARE is not supported in transaction pooling mode: use protocol-level prepared statements (every driver's default), or session mode";

/// How the proxy handles a session command.
enum Absorb {
    No,
    /// A SET/RESET to remember once it succeeds.
    Set(Box<SessionCommand>),
    /// Send this instead: `NO_OP`, or (not starting with "DO") an error message to answer with.
    Replace(String),
}

/// The command tag PostgreSQL would answer an absorbed session command with.
fn command_tag(sql: &str) -> &'static str {
    match prepared::classify(sql) {
        Some(SessionCommand::DeallocateAll) => "DEALLOCATE ALL",
        Some(SessionCommand::DiscardAll) => "DISCARD ALL",
        _ => "DEALLOCATE",
    }
}

/// A Bind of the unnamed statement into the unnamed portal.
fn unnamed_bind(body: &[u8]) -> bool {
    body.len() >= 2 && body[0] == 0 && body[1] == 0
}

/// What the observer needs about one query: its fingerprint and where its text and parameters are kept.
#[derive(Debug, Default, Clone)]
struct Observed {
    /// 0 when observability was off when it was sent.
    fp: u64,
    /// Sequence numbers into the session's text and Bind rings (0 = none).
    text: u32,
    bind: u32,
    prepared: Option<Arc<Prepared>>,
}

/// `Observed::fp` of a simple Query whose fingerprint is worked out after the batch went to the server, off the
/// latency path (see `fill_fingerprints`). Real fingerprints are kept below it.
const FP_PENDING: u64 = u64::MAX;

/// A query answered by the server, recorded once its answer has been flushed to the client.
struct Done {
    qtype: QueryType,
    took: Duration,
    obs: Observed,
    rows: u64,
    error: bool,
    last_error: Option<String>,
}

/// What the proxy learns from a query text: fingerprint, statement kind, and whether it is a session command.
#[derive(Clone, Copy, Debug)]
struct TextInfo {
    fp: u64,
    qtype: QueryType,
    session: bool,
    /// The text has a quoted string, and texts of its shape differ in those strings: a shape-cache hit must look
    /// at the text again for a session command (an advisory-lock call can hide in a literal).
    quoted: bool,
}

/// The fingerprint of a text, kept clear of 0 (observability off) and `FP_PENDING`.
fn real_fingerprint(sql: &str) -> u64 {
    crate::observe::fingerprint::fingerprint(sql).clamp(1, FP_PENDING - 1)
}

/// The text cache's key: the shape key when there is one (texts that differ only in literal values share it, see
/// `fingerprint::shape_key`), else a hash of the exact text. `true` when it is a shape key.
fn text_key(sql: &str) -> (u64, bool) {
    // `shape_key` gives up at a `$` (parameters of the extended protocol, dollar quotes) after scanning up to it.
    let shape = match memchr::memchr(b'$', sql.as_bytes()) {
        Some(_) => None,
        None => crate::observe::fingerprint::shape_key(sql),
    };
    match shape {
        Some(k) => (k, true),
        None => (crate::observe::fingerprint::hash_segment(0x7e57, sql.as_bytes()), false),
    }
}

/// The saved text with sequence number `seq`, if the ring still holds it (0 = none was saved).
fn text_slot(texts: &[TextSlot], seq: u32) -> Option<&TextSlot> {
    (seq != 0).then(|| texts.get(seq as usize % RING)).flatten().filter(|s| s.seq == seq)
}

/// Slots of the per-session query-text cache (a power of two).
const TEXT_CACHE: usize = 64;

/// Slots of the per-thread query-text cache behind the sessions' own (a power of two).
const SHARED_TEXT_CACHE: usize = 1024;

thread_local! {
    /// The second level of the text cache, shared by the sessions this runtime thread runs. A session's own cache
    /// starts empty, so with a connection per transaction every text would be normalised again (about 3,000
    /// instructions). Same keys and same contents as the sessions' caches; only settled fingerprints are kept.
    static SHARED_TEXTS: std::cell::RefCell<Vec<(u64, TextInfo)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What the thread's sessions learnt about the text with key `h`, if a fingerprint was settled for it.
fn shared_text(h: u64) -> Option<TextInfo> {
    SHARED_TEXTS.with(|c| {
        let c = c.borrow();
        c.get((h as usize) & (SHARED_TEXT_CACHE - 1))
            .filter(|(k, i)| *k == h && i.fp != 0 && i.fp != FP_PENDING)
            .map(|(_, i)| *i)
    })
}

/// Shares what a session learnt about the text with key `h` (settled fingerprints only).
fn share_text(h: u64, info: TextInfo) {
    if info.fp == 0 || info.fp == FP_PENDING {
        return;
    }
    SHARED_TEXTS.with(|c| *text_slot_mut(&mut c.borrow_mut(), SHARED_TEXT_CACHE, h) = (h, info));
}

/// The slot of key `h` in a direct-mapped text cache of `size` slots (a power of two), allocated on first use:
/// one slot per hash bucket, the newest text wins. No hashing of the hash, no allocation after the first miss, and
/// texts seen once (literals inlined) cost a slot overwrite, not a map insert.
fn text_slot_mut(cache: &mut Vec<(u64, TextInfo)>, size: usize, h: u64) -> &mut (u64, TextInfo) {
    if cache.is_empty() {
        *cache = vec![(0, TextInfo { fp: 0, qtype: QueryType::Other, session: false, quoted: false }); size];
    }
    &mut cache[(h as usize) & (size - 1)]
}

/// Slots of recent query texts and Bind messages, reused so capture costs a copy, not an allocation.
const RING: usize = 8;

#[derive(Default)]
struct TextSlot {
    seq: u32,
    text: String,
    /// Parameter types of an unnamed Parse.
    types: Vec<u8>,
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
    /// Settings this client asked for (startup parameters and SETs), as (name, SQL value); applied to every server.
    params: Vec<(String, String)>,
    max_packet: usize,
    max_prepared: usize,
    expect: VecDeque<Expect>,
    /// Extended-protocol messages forwarded since the last Sync: the server is not at a boundary yet.
    open_extended: bool,
    /// Bytes of a large server frame still streaming through, and whether they are dropped.
    server_skip: usize,
    server_skip_drop: bool,
    /// An error arrived since the last ReadyForQuery (so a pending SET did not take).
    saw_error: bool,
    cur_qtype: QueryType,
    /// The client's named statements (transaction and statement modes).
    statements: HashMap<String, Arc<Prepared>>,
    /// Set once the client uses a session-scoped feature: it keeps its server until it leaves.
    pinned: Option<&'static str>,
    /// When the current server was linked, in `Shared::micros`.
    linked_us: Option<u64>,
    /// The config as of the last look; a load costs a pointer comparison while no reload happened.
    config: arc_swap::Cache<Arc<arc_swap::ArcSwap<crate::config::Config>>, Arc<crate::config::Config>>,
    /// Close at the next transaction boundary (drain).
    close_at_boundary: Option<(&'static str, String)>,
    out: BytesMut,
    observer: Arc<crate::observe::Observer>,
    /// Observability on for the batch being forwarded.
    obs_on: bool,
    cur: Observed,
    texts: Vec<TextSlot>,
    binds: Vec<(u32, Vec<u8>)>,
    seq: u32,
    /// Raw-text hash → what the proxy reads from a query text, so a repeated query is scanned once.
    fp_cache: Vec<(u64, TextInfo)>,
    /// Ready expectations whose fingerprint is still `FP_PENDING`.
    fp_pending: usize,
    /// Queries answered in the current server read, recorded after the answer is flushed.
    done: Vec<Done>,
    rows: u64,
    last_error: Option<String>,
    /// The clock reading of the last server batch (reused when it ends the transaction).
    last_now: Instant,
    /// An Execute was forwarded since the last Sync.
    group_exec: bool,
    /// A SET/RESET sent through the extended protocol in this Sync group.
    group_set: Option<Box<SessionCommand>>,
    /// The proxy answered an error inside this Sync group: drop messages up to the Sync.
    skip_until_sync: bool,
    /// The unnamed statement is a session command the proxy answers itself (its command tag), and so is the unnamed
    /// portal bound from it.
    absorbed_unnamed: Option<&'static str>,
    absorbed_portal: Option<&'static str>,
    /// SETs run inside the open transaction: they follow the client only if it commits.
    tx_sets: Vec<SessionCommand>,
    /// The last CommandComplete was COMMIT.
    last_commit: bool,
}

impl Session {
    /// A session for a client that just logged in.
    pub fn new(shared: Arc<Shared>, info: Arc<ClientInfo>, pool: Arc<Pool>, params: Vec<(String, String)>) -> Session {
        let cfg = shared.config.load();
        let params = params.into_iter().map(|(k, v)| (k, protocol::quote_literal(&v))).collect();
        Session {
            mode: pool.settings.load().pool_mode,
            max_packet: cfg.proxy.max_packet_size,
            max_prepared: cfg.proxy.max_prepared_statements,
            shared: shared.clone(),
            info,
            pool,
            params,
            expect: VecDeque::new(),
            open_extended: false,
            server_skip: 0,
            server_skip_drop: false,
            saw_error: false,
            cur_qtype: QueryType::Other,
            statements: HashMap::new(),
            pinned: None,
            linked_us: None,
            config: arc_swap::Cache::new(shared.config.clone()),
            close_at_boundary: None,
            out: BytesMut::new(),
            observer: shared.observer.clone(),
            obs_on: false,
            cur: Observed::default(),
            // Allocated on first use: most connections of a big fleet sit idle.
            texts: Vec::new(),
            binds: Vec::new(),
            seq: 0,
            fp_cache: Vec::new(),
            fp_pending: 0,
            done: Vec::new(),
            rows: 0,
            last_error: None,
            group_exec: false,
            last_now: Instant::now(),
            group_set: None,
            skip_until_sync: false,
            tx_sets: Vec::new(),
            absorbed_unnamed: None,
            absorbed_portal: None,
            last_commit: false,
        }
    }

    fn rewrites(&self) -> bool {
        self.mode != PoolMode::Session
    }

    /// Relays until the client leaves or is told to.
    pub async fn run(mut self, conn: &mut ClientConn) -> Result<()> {
        let mut server: Option<PooledConn> = None;
        let info = self.info.clone();
        let result = loop {
            let ev = match server.as_mut() {
                Some(srv) => {
                    let s: &mut crate::server::ServerConn = srv;
                    tokio::select! {
                        biased;
                        _ = std::future::poll_fn(|cx| info.kill.poll_fired(cx)) => Event::Kill,
                        r = s.stream.read_buf(&mut s.rbuf) => Event::Server(r),
                        r = conn.stream.read_buf(&mut conn.rbuf) => Event::Client(r),
                    }
                }
                None => tokio::select! {
                    biased;
                    _ = std::future::poll_fn(|cx| info.kill.poll_fired(cx)) => Event::Kill,
                    r = conn.stream.read_buf(&mut conn.rbuf) => Event::Client(r),
                },
            };
            self.shared.busy_poll.touch();
            match ev {
                Event::Client(Ok(0)) | Event::Client(Err(_)) => break Ok(()),
                Event::Client(Ok(n)) => {
                    self.pool.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    match self.on_client_data(conn, &mut server).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                Event::Server(r) => {
                    let srv = server.as_mut().expect("server events only arrive while linked");
                    let r = match r {
                        Ok(0) => Err(Error::Server(std::io::ErrorKind::UnexpectedEof.into())),
                        Ok(_) => self.on_server_data(conn, srv).await,
                        Err(e) => Err(Error::Server(e)),
                    };
                    match r {
                        Ok(true) => {
                            self.unlink(server.take().expect("linked"), true, self.last_now).await;
                            // An idle client keeps small buffers: thousands of them are the common case.
                            if conn.wbuf.capacity() > 64 * 1024 {
                                conn.wbuf = BytesMut::with_capacity(1024);
                            }
                            if self.out.capacity() > 64 * 1024 {
                                self.out = BytesMut::new();
                            }
                            if let Some((code, msg)) = self.close_at_boundary.take() {
                                conn.fatal(code, &msg).await;
                                break Ok(());
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            if e.is_server_side() {
                                warn!(client = %conn.addr, error = %e, "server connection lost");
                                conn.fatal(
                                    sqlstate::CONNECTION_FAILURE,
                                    "server conn crashed? the server closed the connection",
                                )
                                .await;
                            }
                            if let Some(s) = server.take() {
                                self.unlink(s, false, Instant::now()).await;
                            }
                            break Err(e);
                        }
                    }
                }
                Event::Kill => {
                    let reason = self.info.kill_reason.lock().take();
                    let (code, msg) =
                        reason.unwrap_or((sqlstate::ADMIN_SHUTDOWN, "closing because of an admin command".into()));
                    let at_boundary = code == sqlstate::ADMIN_SHUTDOWN && msg.contains("shutting down");
                    if at_boundary && server.is_some() {
                        self.close_at_boundary = Some((code, msg));
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
            self.unlink(s, clean, Instant::now()).await;
        }
        result
    }

    fn at_boundary(&self, s: &PooledConn) -> bool {
        self.expect.is_empty()
            && !self.open_extended
            && self.server_skip == 0
            && s.tx_status == b'I'
            && s.rbuf.is_empty()
    }

    /// Scans complete client frames, links a server when one is needed, rewrites what must be rewritten and forwards
    /// the batch in one write. `Ok(false)` = the client is done.
    async fn on_client_data(&mut self, conn: &mut ClientConn, server: &mut Option<PooledConn>) -> Result<bool> {
        let mut now = Instant::now();
        let mut consumed = 0;
        let mut terminate = false;
        self.obs_on = self.observer.enabled();
        loop {
            let buf = &conn.rbuf[consumed..];
            let (t, len) = match protocol::frame_header(buf, self.max_packet) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    warn!(client = %conn.addr, error = %e, "client protocol violation");
                    conn.fatal(sqlstate::PROTOCOL_VIOLATION, &format!("invalid message: {e}")).await;
                    return Err(e.into());
                }
            };
            if buf.len() < len {
                conn.rbuf.reserve(len - buf.len());
                break;
            }
            match t {
                b'X' => {
                    terminate = true;
                    consumed += len;
                    break;
                }
                b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'S' | b'H' | b'F' | b'd' | b'c' | b'f' => {}
                other => {
                    warn!(client = %conn.addr, msg_type = other, "invalid frontend message type");
                    conn.fatal(sqlstate::PROTOCOL_VIOLATION, &format!("invalid frontend message type {other}")).await;
                    return Err(Error::ClientProtocol(protocol::ProtocolError::Malformed("message type")));
                }
            }
            if self.skip_until_sync && server.is_none() {
                // Finishing a batch that was refused a server: everything up to its Sync is dropped.
                if t == b'S' {
                    self.skip_until_sync = false;
                    protocol::ready_for_query(&mut conn.wbuf, b'I');
                }
                consumed += len;
                continue;
            }
            // Messages that can be answered here need no server.
            if server.is_none() && self.expect.is_empty() && self.out.is_empty() {
                let local = match t {
                    b'S' if !self.open_extended => {
                        protocol::ready_for_query(&mut conn.wbuf, b'I');
                        true
                    }
                    b'H' if !self.open_extended => true,
                    b'Q' if self.rewrites() => self.answer_locally(&mut conn.wbuf, &buf[5..len], b'I'),
                    _ => false,
                };
                if local {
                    consumed += len;
                    continue;
                }
                match self.link(now).await {
                    Ok(s) => {
                        // Query timings start once a server is at hand: waiting for one is pool wait, counted
                        // apart (SHOW POOLS maxwait, pgrelay_pool_wait_seconds), as pgBouncer does.
                        now = s.got_at;
                        *server = Some(s);
                    }
                    Err(e) => {
                        conn.rbuf.advance(consumed);
                        self.refuse_batch(conn, &e, &buf_owned(&conn.rbuf)).await?;
                        return Ok(true);
                    }
                }
            }
            let srv = server.as_mut().expect("linked above");
            if t == b'Q' && self.rewrites() && self.expect.is_empty() && self.out.is_empty() {
                let status = srv.tx_status;
                if self.answer_locally(&mut conn.wbuf, &conn.rbuf[consumed + 5..consumed + len], status) {
                    consumed += len;
                    continue;
                }
            }
            let frame = &conn.rbuf[consumed..consumed + len];
            self.forward(srv, t, frame, now);
            consumed += len;
        }
        conn.rbuf.advance(consumed);
        self.flush_synth(conn);
        if !conn.wbuf.is_empty() {
            conn.flush().await?;
        }
        if !self.out.is_empty() {
            let srv = server.as_mut().expect("output only exists while linked");
            if let Some(start) = self.expect.iter().find_map(|e| match e {
                Expect::Ready { start, swallow: false, .. } => Some(*start),
                _ => None,
            }) {
                self.info.query_start_us.store(self.shared.micros(start), Ordering::Relaxed);
            }
            self.info.idle_in_tx.store(false, Ordering::Relaxed);
            let r = srv.stream.write_all(&self.out).await;
            self.out.clear();
            // The server is busy with the batch now: fingerprint the new texts meanwhile.
            self.fill_fingerprints();
            if let Err(e) = r {
                conn.fatal(sqlstate::CONNECTION_FAILURE, "server connection failed while sending").await;
                return Err(Error::Server(e));
            }
        }
        Ok(!terminate)
    }

    /// Copies one client frame to the server output, rewriting named statements and recording what it expects.
    fn forward(&mut self, srv: &mut PooledConn, t: u8, frame: &[u8], now: Instant) {
        let body = &frame[5..];
        let rewrites = self.rewrites();
        if self.skip_until_sync && t != b'S' {
            return;
        }
        match t {
            b'Q' => {
                // A simple Query destroys the unnamed statement and portal.
                self.absorbed_unnamed = None;
                self.absorbed_portal = None;
                let sql = protocol::query_text(body);
                let info = self.text_info(sql, self.obs_on);
                self.cur_qtype = info.qtype;
                let mut set = None;
                let mut replaced: Option<String> = None;
                if rewrites && info.session {
                    match self.session_command(srv, sql) {
                        Absorb::Set(cmd) => set = Some(cmd),
                        Absorb::Replace(text) => replaced = Some(text),
                        Absorb::No => {}
                    }
                }
                let obs = if self.obs_on {
                    if info.fp == FP_PENDING {
                        self.fp_pending += 1;
                    }
                    Observed { fp: info.fp, text: self.save_text(sql, &[]), bind: 0, prepared: None }
                } else {
                    Observed::default()
                };
                match replaced {
                    Some(text) if text.starts_with("DO") => protocol::query(&mut self.out, &text),
                    Some(msg) => protocol::query(
                        &mut self.out,
                        &format!(
                            "DO $pgrelay$BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', MESSAGE = {}; END$pgrelay$",
                            protocol::quote_literal(&msg)
                        ),
                    ),
                    None => self.out.extend_from_slice(frame),
                }
                self.expect.push_back(Expect::Ready {
                    swallow: false,
                    start: now,
                    qtype: self.cur_qtype,
                    set,
                    obs,
                    exec: true,
                });
                if self.fp_pending >= RING / 2 {
                    // A long pipeline would overwrite the texts of pending fingerprints: work them out now.
                    self.fill_fingerprints();
                }
            }
            b'P' => {
                self.open_extended = true;
                let named = body.first().is_some_and(|&b| b != 0);
                if !named {
                    self.absorbed_unnamed = None;
                    self.absorbed_portal = None;
                }
                if !(named && rewrites) {
                    let mut r = body;
                    let _ = take_cstr(&mut r);
                    let sql = take_cstr(&mut r).unwrap_or("");
                    let info = self.text_info(sql, false);
                    self.cur_qtype = info.qtype;
                    if self.obs_on {
                        self.cur = Observed { fp: info.fp, text: self.save_text(sql, r), bind: 0, prepared: None };
                    }
                    if rewrites && info.session {
                        match self.session_command(srv, sql) {
                            Absorb::Set(cmd) => self.group_set = Some(cmd),
                            Absorb::Replace(text) if !text.starts_with("DO") => {
                                // Refused: answer with the error ourselves and skip to the Sync, as the server would.
                                self.expect.push_back(Expect::Synth {
                                    msg: Synthetic::Error(sqlstate::FEATURE_NOT_SUPPORTED, text),
                                    undo: None,
                                });
                                self.skip_until_sync = true;
                                return;
                            }
                            Absorb::Replace(_) => {
                                // Answered here, Bind and Execute included (see `absorbed_unnamed`).
                                self.absorbed_unnamed = Some(command_tag(sql));
                                self.expect.push_back(Expect::Synth { msg: Synthetic::ParseComplete, undo: None });
                                return;
                            }
                            Absorb::No => {}
                        }
                    }
                    self.out.extend_from_slice(frame);
                    self.expect.push_back(Expect::Parse { swallow: false, hash: None, client: None });
                    return;
                }
                let pool = self.pool.clone();
                let Some((client_name, p)) =
                    prepared::from_parse(body, |c| pool.statement_version(c), pool.ddl_epoch.load(Ordering::Relaxed))
                else {
                    // Malformed: let the server say so.
                    self.out.extend_from_slice(frame);
                    self.expect.push_back(Expect::Parse { swallow: false, hash: None, client: None });
                    return;
                };
                if self.statements.contains_key(&client_name) {
                    self.expect.push_back(Expect::Synth {
                        msg: Synthetic::Error(
                            sqlstate::DUPLICATE_PREPARED_STATEMENT,
                            format!("prepared statement \"{client_name}\" already exists"),
                        ),
                        undo: None,
                    });
                    self.skip_until_sync = true;
                    return;
                }
                match &p.session {
                    Some(SessionCommand::Pin(what)) => self.pin(what),
                    Some(SessionCommand::Prepare) => {
                        self.expect.push_back(Expect::Synth {
                            msg: Synthetic::Error(sqlstate::FEATURE_NOT_SUPPORTED, PREPARE_REFUSED.into()),
                            undo: None,
                        });
                        self.skip_until_sync = true;
                        return;
                    }
                    _ => {}
                }
                self.cur_qtype = p.qtype;
                let p = Arc::new(p);
                if self.obs_on {
                    self.cur = Observed { fp: p.fingerprint, text: 0, bind: 0, prepared: Some(p.clone()) };
                }
                self.statements.insert(client_name.clone(), p.clone());
                if srv.tx_status == b'E' {
                    // In a failed transaction the server refuses every Parse (25P02): let it say so, and do not let
                    // that error make us forget the statement it does hold.
                    self.out.extend_from_slice(&p.parse);
                    self.expect.push_back(Expect::Parse { swallow: false, hash: None, client: Some(client_name) });
                } else if srv.statements.touch(p.hash) {
                    self.expect.push_back(Expect::Synth {
                        msg: Synthetic::ParseComplete,
                        undo: Some(Undo::Forget(client_name)),
                    });
                } else {
                    self.prepare_on_server(srv, &p, false, Some(client_name));
                }
            }
            b'B' | b'D' | b'C' => {
                self.open_extended = true;
                let stmt = self.statement_ref(t, body);
                if t == b'B' {
                    if let Some(
                        cmd @ (SessionCommand::Set { .. } | SessionCommand::Reset(_) | SessionCommand::ResetAll),
                    ) = stmt.as_ref().and_then(|p| p.session.as_ref())
                    {
                        self.group_set = Some(Box::new(cmd.clone()));
                    }
                    if body.first() == Some(&0) {
                        // Any Bind into the unnamed portal replaces whatever the proxy absorbed there.
                        self.absorbed_portal = None;
                    }
                    if let Some(tag) = self.absorbed_unnamed.filter(|_| unnamed_bind(body)) {
                        // Binding the statement the proxy absorbed: answer for the server, and for its Execute.
                        self.absorbed_portal = Some(tag);
                        self.expect.push_back(Expect::Synth { msg: Synthetic::BindComplete, undo: None });
                        return;
                    }
                }
                if t == b'D' && body.get(1) == Some(&0) {
                    let msg = match body.first() {
                        Some(b'S') if self.absorbed_unnamed.is_some() => Some(Synthetic::NoParamsNoData),
                        Some(b'P') if self.absorbed_portal.is_some() => Some(Synthetic::NoData),
                        _ => None,
                    };
                    if let Some(msg) = msg {
                        self.expect.push_back(Expect::Synth { msg, undo: None });
                        return;
                    }
                }
                if t == b'B' && self.obs_on {
                    self.cur.bind = self.save_bind(body);
                    if let Some(p) = &stmt {
                        self.cur.fp = p.fingerprint;
                        self.cur.text = 0;
                        self.cur.prepared = Some(p.clone());
                    }
                }
                match stmt {
                    Some(p) if t == b'C' => {
                        // Other clients may share the server-side statement: forget it here, answer here.
                        let name = client_stmt_name(body).unwrap_or_default();
                        self.statements.remove(&name);
                        self.expect.push_back(Expect::Synth {
                            msg: Synthetic::CloseComplete,
                            undo: Some(Undo::Restore(name, p)),
                        });
                    }
                    Some(p) if self.pool.statement_version(p.content) != p.version => {
                        // Prepared before DDL changed its result type: PostgreSQL would refuse it until re-prepared.
                        self.expect.push_back(Expect::Synth {
                            msg: Synthetic::Error(
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "cached plan must not change result type".into(),
                            ),
                            undo: None,
                        });
                        self.skip_until_sync = true;
                    }
                    Some(p) => {
                        if !srv.statements.touch(p.hash) {
                            self.prepare_on_server(srv, &p, true, None);
                        }
                        if t == b'B' {
                            self.cur_qtype = p.qtype;
                            prepared::rewrite_bind(&mut self.out, body, &p.name);
                            self.expect.push_back(Expect::Bind(Some(p.clone())));
                        } else {
                            prepared::statement_message(&mut self.out, b'D', &p.name);
                            self.expect.push_back(Expect::Describe(Some(p.clone())));
                        }
                    }
                    None => {
                        self.out.extend_from_slice(frame);
                        self.expect.push_back(match t {
                            b'B' => Expect::Bind(None),
                            b'D' => Expect::Describe(None),
                            _ => Expect::Close { swallow: false },
                        });
                    }
                }
            }
            b'E' => {
                self.open_extended = true;
                self.group_exec = true;
                if let Some(tag) = self.absorbed_portal.filter(|_| body.first() == Some(&0)) {
                    self.expect.push_back(Expect::Synth { msg: Synthetic::Command(tag), undo: None });
                    return;
                }
                self.out.extend_from_slice(frame);
                self.expect.push_back(Expect::Execute);
            }
            b'S' => {
                self.open_extended = false;
                self.skip_until_sync = false;
                self.out.extend_from_slice(frame);
                let obs = if self.obs_on { self.cur.clone() } else { Observed::default() };
                self.expect.push_back(Expect::Ready {
                    swallow: false,
                    start: now,
                    qtype: self.cur_qtype,
                    set: self.group_set.take(),
                    obs,
                    exec: std::mem::take(&mut self.group_exec),
                });
            }
            b'F' => {
                self.out.extend_from_slice(frame);
                self.expect.push_back(Expect::Ready {
                    swallow: false,
                    start: now,
                    qtype: QueryType::Other,
                    set: None,
                    obs: Observed::default(),
                    exec: true,
                });
            }
            // Flush and COPY data get no answer of their own.
            _ => self.out.extend_from_slice(frame),
        }
    }

    /// What to do with a session command (SET, DEALLOCATE, DISCARD, PREPARE, pinning features) in transaction mode.
    fn session_command(&mut self, srv: &mut PooledConn, sql: &str) -> Absorb {
        match prepared::classify(sql) {
            Some(cmd @ (SessionCommand::Set { .. } | SessionCommand::Reset(_) | SessionCommand::ResetAll)) => {
                Absorb::Set(Box::new(cmd))
            }
            // An unknown name goes through: the server answers 26000 as it would have.
            Some(SessionCommand::Deallocate(name)) if self.statements.remove(&name).is_some() => {
                Absorb::Replace(NO_OP.into())
            }
            Some(SessionCommand::DeallocateAll) => {
                // The server-side statements are shared with other clients: only this client's names go.
                self.statements.clear();
                Absorb::Replace(NO_OP.into())
            }
            Some(SessionCommand::DiscardAll) => {
                self.statements.clear();
                self.params.clear();
                if self.pinned.is_some() {
                    // Its temp tables and the like live on this server: DISCARD ALL must reach it.
                    srv.statements.clear();
                    srv.applied.clear();
                    Absorb::No
                } else {
                    Absorb::Replace(NO_OP.into())
                }
            }
            Some(SessionCommand::Prepare) => Absorb::Replace(PREPARE_REFUSED.into()),
            Some(SessionCommand::Pin(what)) => {
                self.pin(what);
                Absorb::No
            }
            _ => Absorb::No,
        }
    }

    /// The client's named statement a Bind, Describe or Close refers to (None for unnamed, portals, unknown names).
    fn statement_ref(&self, t: u8, body: &[u8]) -> Option<Arc<Prepared>> {
        if !self.rewrites() {
            return None;
        }
        let name = match t {
            b'B' => {
                let mut r = body;
                take_cstr(&mut r)?;
                take_cstr(&mut r)?
            }
            _ => {
                if body.first() != Some(&b'S') {
                    return None;
                }
                let mut r = &body[1..];
                take_cstr(&mut r)?
            }
        };
        if name.is_empty() {
            return None;
        }
        self.statements.get(name).cloned()
    }

    /// Writes the Parse for `p` (closing an evicted statement first if the server is full).
    fn prepare_on_server(&mut self, srv: &mut PooledConn, p: &Prepared, swallow: bool, client: Option<String>) {
        if let Some(victim) = srv.statements.insert(p.hash, self.max_prepared) {
            prepared::statement_message(&mut self.out, b'C', &prepared::server_name(victim));
            self.expect.push_back(Expect::Close { swallow: true });
        }
        self.out.extend_from_slice(&p.parse);
        self.expect.push_back(Expect::Parse { swallow, hash: Some(p.hash), client });
    }

    fn pin(&mut self, what: &'static str) {
        if self.pinned.is_none() && self.mode == PoolMode::Transaction {
            debug!(client = %self.info.addr, feature = what, "client pinned to its server");
            self.pinned = Some(what);
        }
    }

    /// Answers DEALLOCATE/DISCARD ALL/PREPARE without a server when nothing is in flight. Returns whether it did.
    fn answer_locally(&mut self, wbuf: &mut BytesMut, body: &[u8], status: u8) -> bool {
        if !prepared::maybe_local(body) {
            return false;
        }
        let sql = protocol::query_text(body);
        let (tag, err) = match prepared::classify(sql) {
            Some(SessionCommand::Deallocate(name)) => {
                if self.statements.remove(&name).is_none() {
                    (
                        "",
                        Some((
                            sqlstate::UNDEFINED_PREPARED_STATEMENT,
                            format!("prepared statement \"{name}\" does not exist"),
                        )),
                    )
                } else {
                    ("DEALLOCATE", None)
                }
            }
            Some(SessionCommand::DeallocateAll) => {
                self.statements.clear();
                ("DEALLOCATE ALL", None)
            }
            // A pinned client's server holds its session state: let DISCARD ALL reach it.
            Some(SessionCommand::DiscardAll) if self.pinned.is_none() => {
                self.statements.clear();
                self.params.clear();
                ("DISCARD ALL", None)
            }
            Some(SessionCommand::Prepare) => ("", Some((sqlstate::FEATURE_NOT_SUPPORTED, PREPARE_REFUSED.to_string()))),
            _ => return false,
        };
        match err {
            Some((code, m)) => protocol::error_response(wbuf, "ERROR", code, &m),
            None => protocol::command_complete(wbuf, tag),
        }
        protocol::ready_for_query(wbuf, status);
        true
    }

    /// Emits made-up answers that are now at the head of the queue (called after every message, mostly for nothing).
    #[inline]
    fn flush_synth(&mut self, conn: &mut ClientConn) {
        if matches!(self.expect.front(), Some(Expect::Synth { .. })) {
            self.emit_synth(conn);
        }
    }

    fn emit_synth(&mut self, conn: &mut ClientConn) {
        while let Some(Expect::Synth { msg, .. }) = self.expect.front() {
            match msg {
                Synthetic::ParseComplete | Synthetic::CloseComplete => {
                    conn.wbuf.put_u8(if matches!(msg, Synthetic::ParseComplete) { b'1' } else { b'3' });
                    conn.wbuf.put_i32(4);
                }
                Synthetic::BindComplete | Synthetic::NoData => {
                    conn.wbuf.put_u8(if matches!(msg, Synthetic::BindComplete) { b'2' } else { b'n' });
                    conn.wbuf.put_i32(4);
                }
                Synthetic::NoParamsNoData => {
                    conn.wbuf.put_slice(&[b't', 0, 0, 0, 6, 0, 0, b'n', 0, 0, 0, 4]);
                }
                Synthetic::Command(tag) => protocol::command_complete(&mut conn.wbuf, tag),
                Synthetic::Error(code, m) => protocol::error_response(&mut conn.wbuf, "ERROR", code, m),
            }
            self.expect.pop_front();
        }
    }

    /// Gets a server for this client and brings its settings in line (an injected SET/RESET, its answer dropped).
    async fn link(&mut self, now: Instant) -> Result<PooledConn> {
        let now_us = self.shared.micros(now);
        self.info.set_state(ClientState::Waiting, now_us);
        while self.shared.paused.load(Ordering::Acquire) || self.pool.paused.load(Ordering::Acquire) {
            let resumed = self.shared.resumed.notified();
            if !self.shared.paused.load(Ordering::Acquire) && !self.pool.paused.load(Ordering::Acquire) {
                break;
            }
            resumed.await;
        }
        let deadline = self.config.load().proxy.query_wait_timeout.get().map(|d| now + d);
        self.pool.stats.cl_active.fetch_add(1, Ordering::Relaxed);
        let mut srv = match self.pool.checkout_at(deadline, now).await {
            Ok(s) => s,
            Err(e) => {
                self.pool.stats.cl_active.fetch_sub(1, Ordering::Relaxed);
                self.info.set_state(ClientState::Idle, self.shared.micros(Instant::now()));
                return Err(e);
            }
        };
        let (now, now_us) =
            if srv.got_at == now { (now, now_us) } else { (srv.got_at, self.shared.micros(srv.got_at)) };
        if let Some(sql) = settings_sync(&srv, &self.params) {
            protocol::query(&mut self.out, &sql);
            self.expect.push_back(Expect::Ready {
                swallow: true,
                start: now,
                qtype: QueryType::Other,
                set: None,
                obs: Observed::default(),
                exec: false,
            });
            srv.applied.clear();
            srv.applied.extend(self.params.iter().cloned());
        }
        *self.info.linked.lock() = Some(CancelTarget {
            target: srv.target.clone(),
            pid: srv.backend_pid,
            key: srv.backend_key,
            server_id: srv.id,
        });
        self.info.set_state(ClientState::Active, now_us);
        self.linked_us = Some(now_us);
        Ok(srv)
    }

    /// Returns or closes the server and marks the client idle.
    async fn unlink(&mut self, mut srv: PooledConn, clean: bool, now: Instant) {
        *self.info.linked.lock() = None;
        self.info.query_start_us.store(0, Ordering::Relaxed);
        self.pool.stats.cl_active.fetch_sub(1, Ordering::Relaxed);
        let now_us = self.shared.micros(now);
        if let Some(t) = self.linked_us.take() {
            self.pool.stats.xact_time_us.fetch_add(now_us.saturating_sub(t), Ordering::Relaxed);
            self.pool.stats.xact_count.fetch_add(1, Ordering::Relaxed);
            self.pool.metrics.transactions.increment(1);
        }
        self.info.set_state(ClientState::Idle, now_us);
        self.expect.clear();
        self.open_extended = false;
        if !clean {
            srv.discard();
            return;
        }
        let reset = {
            let cfg = self.config.load();
            let q = &cfg.proxy.server_reset_query;
            let wanted = self.mode == PoolMode::Session || self.pinned.is_some() || cfg.proxy.server_reset_query_always;
            (!q.is_empty() && wanted).then(|| q.clone())
        };
        if let Some(q) = reset {
            let r = async {
                if self.pinned.is_some() {
                    srv.execute("select pg_advisory_unlock_all()").await?;
                }
                srv.execute(&q).await
            };
            match tokio::time::timeout(Duration::from_secs(5), r).await {
                Ok(Ok(())) => {
                    srv.applied.clear();
                    srv.statements.clear();
                }
                _ => {
                    srv.discard();
                    return;
                }
            }
        }
        srv.release_at(now);
    }

    /// Tells the client its batch could not get a server: an error, then ReadyForQuery for each pending sync.
    async fn refuse_batch(&mut self, conn: &mut ClientConn, e: &Error, rest: &[u8]) -> Result<()> {
        let msg = match e {
            Error::Timeout(what) => format!("pgrelay: {what}: no server connection available"),
            other => format!("pgrelay: could not get a server connection: {other}"),
        };
        info!(client = %conn.addr, db = %self.info.database, error = %e, "no server for client");
        self.pool.stats.errors.fetch_add(1, Ordering::Relaxed);
        // Everything the client sent in this batch is dropped; each Sync/Query in it gets its ReadyForQuery.
        let mut syncs = 0;
        let mut r = rest;
        while let Ok(Some((t, len))) = protocol::frame_header(r, usize::MAX) {
            if r.len() < len {
                break;
            }
            if matches!(t, b'S' | b'Q' | b'F') {
                syncs += 1;
            }
            r = &r[len..];
        }
        // Complete frames go; a frame still arriving stays, so the stream stays in step.
        let complete = rest.len() - r.len();
        conn.rbuf.advance(complete.min(conn.rbuf.len()));
        self.out.clear();
        self.expect.clear();
        self.open_extended = false;
        protocol::error_response(&mut conn.wbuf, "ERROR", sqlstate::CANNOT_CONNECT, &msg);
        if syncs == 0 {
            // The rest of the batch has not arrived yet: drop it as it comes, and answer its Sync (as the server
            // would after an error).
            self.skip_until_sync = true;
            return conn.flush().await;
        }
        for _ in 0..syncs {
            protocol::ready_for_query(&mut conn.wbuf, b'I');
        }
        conn.flush().await
    }

    /// Forwards what the server sent. `Ok(true)` = the server is at a boundary and should be unlinked.
    async fn on_server_data(&mut self, conn: &mut ClientConn, srv: &mut PooledConn) -> Result<bool> {
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
            let dropped = self.dropping();
            let have = srv.rbuf.len();
            if have < len {
                let must_read = matches!(t, b'Z' | b'E' | b'S');
                if must_read || len <= STREAM_THRESHOLD {
                    srv.rbuf.reserve(len - have);
                    break;
                }
                // Only row data and the like get this big; they never end an expectation.
                if !dropped {
                    conn.wbuf.extend_from_slice(&srv.rbuf[..have]);
                }
                srv.rbuf.advance(have);
                self.server_skip = len - have;
                self.server_skip_drop = dropped;
                break;
            }
            let mut forward = !dropped;
            match t {
                b'Z' => {
                    let status = srv.rbuf[5];
                    srv.tx_status = status;
                    // Everything up to the Ready is answered by now.
                    loop {
                        match self.expect.pop_front() {
                            Some(Expect::Ready { swallow, start, qtype, set, obs, exec }) => {
                                forward = !swallow;
                                if !swallow {
                                    saw_ready = true;
                                }
                                if !swallow && exec {
                                    let now = *now.get_or_insert_with(Instant::now);
                                    let took = now.saturating_duration_since(start);
                                    // Recorded after the answer has gone to the client (`record_done`).
                                    self.done.push(Done {
                                        qtype,
                                        took,
                                        obs,
                                        rows: self.rows,
                                        error: self.saw_error,
                                        last_error: self.last_error.take(),
                                    });
                                    if let Some(cmd) = set {
                                        if !self.saw_error {
                                            if status == b'I' && self.tx_sets.is_empty() {
                                                self.apply_session_command(srv, *cmd);
                                            } else {
                                                self.tx_sets.push(*cmd);
                                            }
                                        }
                                    }
                                    if status == b'I' && !self.tx_sets.is_empty() {
                                        // The transaction ended: its SETs stand only if it committed.
                                        let sets = std::mem::take(&mut self.tx_sets);
                                        if self.last_commit {
                                            for cmd in sets {
                                                self.apply_session_command(srv, cmd);
                                            }
                                        }
                                    }
                                }
                                break;
                            }
                            Some(_) => continue,
                            None => break,
                        }
                    }
                    self.saw_error = false;
                    self.rows = 0;
                    self.last_error = None;
                    match self.expect.iter().find_map(|e| match e {
                        Expect::Ready { start, .. } => Some(*start),
                        _ => None,
                    }) {
                        Some(s) => self.info.query_start_us.store(self.shared.micros(s), Ordering::Relaxed),
                        None => self.info.query_start_us.store(0, Ordering::Relaxed),
                    }
                }
                b'E' => {
                    let f = protocol::parse_error_fields(&srv.rbuf[5..len]);
                    if f.severity == "FATAL" || f.severity == "PANIC" {
                        fatal = true;
                    }
                    self.saw_error = true;
                    if self.obs_on && self.last_error.is_none() {
                        self.last_error = Some(format!("{}: {}", f.code, f.message));
                    }
                    // An injected Parse that fails is the client's error too (its Bind will be skipped); a failed
                    // injected SET or Close is pgrelay's own business.
                    forward = !matches!(
                        self.expect.front(),
                        Some(Expect::Ready { swallow: true, .. }) | Some(Expect::Close { swallow: true })
                    );
                    if forward {
                        self.pool.stats.errors.fetch_add(1, Ordering::Relaxed);
                        self.pool.metrics.errors.increment(1);
                    } else {
                        warn!(client = %conn.addr, code = %f.code, error = %f.message, "statement injected by pgrelay failed");
                    }
                    if f.message.contains("cached plan must not change result type") {
                        // The server-side statement is stale after DDL: new prepares of this text get a fresh one.
                        if let Some(Expect::Bind(Some(p)) | Expect::Describe(Some(p))) = self.expect.front() {
                            let p = p.clone();
                            self.pool.bump_statement_version(p.content);
                            // This client retries with the statement it holds: give it the fresh one.
                            let v = self.pool.statement_version(p.content);
                            if let Some(fresh) = prepared::reversion(&p, v).map(Arc::new) {
                                for held in self.statements.values_mut() {
                                    if held.content == p.content {
                                        *held = fresh.clone();
                                    }
                                }
                            }
                        }
                    }
                    self.on_error(srv);
                }
                b'1' => {
                    if let Some(Expect::Parse { swallow, .. }) = self.expect.front() {
                        forward = !*swallow;
                        self.expect.pop_front();
                    }
                }
                b'2' => self.pop_if(|e| matches!(e, Expect::Bind(_))),
                b'3' => {
                    if let Some(Expect::Close { swallow }) = self.expect.front() {
                        forward = !*swallow;
                        self.expect.pop_front();
                    }
                }
                b'T' | b'n' => self.pop_if(|e| matches!(e, Expect::Describe(_))),
                b't' => {
                    if let Some(Expect::Describe(Some(p))) = self.expect.front() {
                        if p.described_types.get().is_none() {
                            let _ = p.described_types.set(crate::observe::parse_param_types(&srv.rbuf[5..len]));
                        }
                    }
                }
                b'C' | b'I' | b's' => {
                    if t == b'C' {
                        let tag = &srv.rbuf[5..len];
                        self.rows += crate::observe::tag_rows(tag);
                        self.last_commit = tag.starts_with(b"COMMIT");
                        if tag.starts_with(b"ALTER") || tag.starts_with(b"DROP") || tag.starts_with(b"CREATE") {
                            // Result shapes may have changed: statements prepared from now on get fresh server copies.
                            self.pool.ddl_epoch.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.pop_if(|e| matches!(e, Expect::Execute))
                }
                b'S' => {
                    let body = srv.rbuf[5..len].to_vec();
                    srv.note_parameter(&body);
                }
                _ => {}
            }
            if forward {
                conn.wbuf.extend_from_slice(&srv.rbuf[..len]);
            }
            srv.rbuf.advance(len);
            self.flush_synth(conn);
        }
        if let Some(n) = now {
            self.last_now = n;
        }
        if !conn.wbuf.is_empty() {
            self.pool.stats.bytes_sent.fetch_add(conn.wbuf.len() as u64, Ordering::Relaxed);
            let r = conn.flush().await;
            self.record_done(srv);
            r?;
        } else {
            self.record_done(srv);
        }
        if fatal {
            return Err(Error::ServerRefused { code: "FATAL".into(), message: "server sent FATAL".into() });
        }
        if !saw_ready || !self.expect.is_empty() {
            return Ok(false);
        }
        let status = srv.tx_status;
        if status != b'I' {
            if self.mode == PoolMode::Statement {
                conn.fatal(sqlstate::FEATURE_NOT_SUPPORTED, "transaction blocks not allowed in statement pooling mode")
                    .await;
                return Err(Error::Pool("transaction in statement mode".into()));
            }
            self.info.idle_in_tx.store(true, Ordering::Relaxed);
            self.info.state_since_us.store(self.shared.micros(Instant::now()), Ordering::Relaxed);
            return Ok(false);
        }
        if (self.mode == PoolMode::Session || self.pinned.is_some()) && self.close_at_boundary.is_none() {
            return Ok(false);
        }
        Ok(self.at_boundary(srv))
    }

    /// True while the answer at the head of the queue belongs to something the proxy injected.
    fn dropping(&self) -> bool {
        matches!(
            self.expect.front(),
            Some(Expect::Ready { swallow: true, .. })
                | Some(Expect::Parse { swallow: true, .. })
                | Some(Expect::Close { swallow: true })
        )
    }

    fn pop_if(&mut self, f: impl Fn(&Expect) -> bool) {
        if self.expect.front().is_some_and(f) {
            self.expect.pop_front();
        }
    }

    /// An ErrorResponse: the failing message is at the head. In the extended protocol the server now skips everything
    /// up to the next Sync, so nothing else before that Ready will be answered (made-up answers included).
    fn on_error(&mut self, srv: &mut PooledConn) {
        let Some(head) = self.expect.front() else {
            return;
        };
        if matches!(head, Expect::Ready { .. }) {
            return; // a simple query: its ReadyForQuery follows
        }
        let mut skipped = Vec::new();
        while let Some(e) = self.expect.front() {
            if matches!(e, Expect::Ready { .. }) {
                break;
            }
            skipped.extend(self.expect.pop_front());
        }
        if self.expect.is_empty() {
            // The Sync has not arrived yet (a pipeline sent in pieces): the server skips the rest up to it, so the
            // proxy must too, or it answers for skipped messages and records statements the server never prepared.
            self.skip_until_sync = true;
        }
        // Undo in reverse order, so a skipped Close-then-Parse of one name ends with the name as it was.
        for e in skipped.into_iter().rev() {
            match e {
                // A Parse that failed (or was skipped) must leave no stale mapping behind.
                Expect::Parse { hash, client, .. } => {
                    if let Some(h) = hash {
                        srv.statements.remove(h);
                    }
                    if let Some(c) = client {
                        self.statements.remove(&c);
                    }
                }
                Expect::Synth { undo: Some(Undo::Forget(c)), .. } => {
                    self.statements.remove(&c);
                }
                Expect::Synth { undo: Some(Undo::Restore(c, p)), .. } => {
                    self.statements.insert(c, p);
                }
                _ => {}
            }
        }
    }

    /// Fingerprint of a query text, normalising each distinct text once per session.
    fn text_info(&mut self, sql: &str, defer: bool) -> TextInfo {
        let (h, by_shape) = text_key(sql);
        let slot = text_slot_mut(&mut self.fp_cache, TEXT_CACHE, h);
        let known = if slot.0 == h && slot.1.fp != 0 && (defer || slot.1.fp != FP_PENDING) {
            Some(slot.1)
        } else {
            // The session has not seen it; the other sessions of this thread may have.
            shared_text(h).inspect(|k| *slot = (h, *k))
        };
        if let Some(known) = known {
            if by_shape && known.quoted {
                // Fingerprint and statement kind follow from the shape; a session command may hide in a literal.
                return TextInfo { session: prepared::classify(sql).is_some(), ..known };
            }
            return known;
        }
        let info = TextInfo {
            fp: if defer { FP_PENDING } else { real_fingerprint(sql) },
            qtype: query_type(sql),
            session: prepared::classify(sql).is_some(),
            quoted: by_shape && memchr::memchr(b'\'', sql.as_bytes()).is_some(),
        };
        *slot = (h, info);
        share_text(h, info);
        info
    }

    /// Works out the fingerprints left `FP_PENDING` by `forward`, from the texts kept in the ring.
    fn fill_fingerprints(&mut self) {
        if self.fp_pending == 0 {
            return;
        }
        self.fp_pending = 0;
        for e in self.expect.iter_mut() {
            let Expect::Ready { obs, .. } = e else { continue };
            if obs.fp != FP_PENDING {
                continue;
            }
            let slot = text_slot(&self.texts, obs.text);
            obs.fp = match slot {
                Some(slot) => {
                    let fp = real_fingerprint(&slot.text);
                    let (h, _) = text_key(&slot.text);
                    if let Some(c) = self.fp_cache.get_mut((h as usize) & (TEXT_CACHE - 1)) {
                        if c.0 == h {
                            c.1.fp = fp;
                            share_text(h, c.1);
                        }
                    }
                    fp
                }
                None => 0,
            };
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn save_text(&mut self, sql: &str, types: &[u8]) -> u32 {
        let seq = self.next_seq();
        if self.texts.is_empty() {
            self.texts = (0..RING).map(|_| TextSlot::default()).collect();
        }
        let slot = &mut self.texts[seq as usize % RING];
        slot.seq = seq;
        slot.text.clear();
        slot.text.push_str(sql);
        slot.types.clear();
        slot.types.extend_from_slice(types);
        seq
    }

    fn save_bind(&mut self, body: &[u8]) -> u32 {
        let seq = self.next_seq();
        if self.binds.is_empty() {
            self.binds = (0..RING).map(|_| (0, Vec::new())).collect();
        }
        let slot = &mut self.binds[seq as usize % RING];
        slot.0 = seq;
        slot.1.clear();
        slot.1.extend_from_slice(body);
        seq
    }

    /// Records a finished query in the per-fingerprint table, and captures it if it was slow.
    /// Timings, counters and query intelligence for the queries answered in the last server read.
    fn record_done(&mut self, srv: &PooledConn) {
        if self.done.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        for mut q in done.drain(..) {
            self.pool.metrics.record_query(q.qtype, q.took);
            self.pool.stats.query_count.fetch_add(1, Ordering::Relaxed);
            self.pool.stats.query_time_us.fetch_add(q.took.as_micros() as u64, Ordering::Relaxed);
            if q.obs.fp == FP_PENDING {
                // Not filled in (the batch never reached the server in one piece): work it out now.
                q.obs.fp = text_slot(&self.texts, q.obs.text).map_or(0, |s| real_fingerprint(&s.text));
            }
            if q.obs.fp != 0 {
                self.observe_done(srv, q);
            }
        }
        self.done = done;
    }

    fn observe_done(&mut self, srv: &PooledConn, q: Done) {
        let Done { obs, took: d, rows, error, last_error, .. } = q;
        let us = d.as_micros() as u64;
        let text_slot = text_slot(&self.texts, obs.text);
        let text: &str = match (&obs.prepared, text_slot) {
            (Some(p), _) => &p.query,
            (None, Some(slot)) => &slot.text,
            (None, None) => "",
        };
        if !self.observer.stats.record_known(obs.fp, us, rows, error) {
            let mut norm = String::new();
            crate::observe::fingerprint::normalize(text, &mut norm);
            self.observer.stats.record(obs.fp, &norm, &self.info.database, us, rows, error);
        }
        if us < self.observer.threshold_us() {
            return;
        }
        self.pool.metrics.slow_queries.increment(1);
        let redacted = self.observer.redact();
        let mut param_types = match (&obs.prepared, text_slot) {
            (Some(p), _) => {
                let off = 5 + p.name.len() + 1 + p.query.len() + 1;
                crate::observe::parse_param_types(p.parse.get(off..).unwrap_or(&[]))
            }
            (None, Some(slot)) => crate::observe::parse_param_types(&slot.types),
            _ => Vec::new(),
        };
        // Types the client left unspecified (0) are the ones the server worked out when the statement was described.
        if let Some(described) = obs.prepared.as_ref().and_then(|p| p.described_types.get()) {
            param_types.resize(described.len().max(param_types.len()), 0);
            for (t, d) in param_types.iter_mut().zip(described) {
                if *t == 0 {
                    *t = *d;
                }
            }
        }
        let (params, param_formats) = match (obs.bind != 0).then(|| self.binds.get(obs.bind as usize % RING)).flatten()
        {
            Some((seq, body)) if *seq == obs.bind && !redacted => crate::observe::bind_params(body, &param_types),
            _ => (Vec::new(), Vec::new()),
        };
        let mut normalized = String::new();
        crate::observe::fingerprint::normalize(text, &mut normalized);
        let time =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let q = crate::observe::slow::SlowQuery {
            time,
            duration_ms: us as f64 / 1000.0,
            database: self.info.database.clone(),
            user: self.info.user.clone(),
            client_addr: self.info.addr.to_string(),
            application_name: self.info.application_name.lock().clone(),
            fingerprint: obs.fp,
            normalized,
            query: if redacted { String::new() } else { text.to_string() },
            params,
            param_types,
            param_formats,
            redacted,
            rows,
            error: last_error,
            server: srv.target.to_string(),
        };
        self.observer.slow.push(q);
    }

    /// A SET/RESET that succeeded now follows the client to other servers.
    fn apply_session_command(&mut self, srv: &mut PooledConn, cmd: SessionCommand) {
        match cmd {
            SessionCommand::Set { name, value } => {
                if value.eq_ignore_ascii_case("default") {
                    self.params.retain(|(k, _)| !k.eq_ignore_ascii_case(&name));
                } else if let Some(p) = self.params.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(&name)) {
                    p.1 = value;
                } else {
                    self.params.push((name, value));
                }
            }
            SessionCommand::Reset(name) => self.params.retain(|(k, _)| !k.eq_ignore_ascii_case(&name)),
            SessionCommand::ResetAll => self.params.clear(),
            _ => return,
        }
        srv.applied.clear();
        srv.applied.extend(self.params.iter().cloned());
    }
}

fn buf_owned(b: &BytesMut) -> Vec<u8> {
    b.to_vec()
}

fn client_stmt_name(close_body: &[u8]) -> Option<String> {
    let mut r = close_body.get(1..)?;
    take_cstr(&mut r).map(str::to_string)
}

/// The SET/RESET statement that makes a server's settings match a client's, if any differ.
fn settings_sync(srv: &crate::server::ServerConn, wanted: &[(String, String)]) -> Option<String> {
    // The common case: the server's last client (or this one) had the same settings, applied in the same order.
    if srv.applied.as_slice() == wanted {
        return None;
    }
    let mut sql = String::new();
    for (k, v) in wanted {
        let applied = srv.applied.iter().find(|(n, _)| n.eq_ignore_ascii_case(k));
        let same = match applied {
            Some((_, av)) => av == v,
            None => srv.param(k).map(protocol::quote_literal).as_deref() == Some(v.as_str()),
        };
        if !same {
            sql.push_str(&format!("SET {} = {};", protocol::quote_ident(k), v));
        }
    }
    for (k, _) in &srv.applied {
        if !wanted.iter().any(|(n, _)| n.eq_ignore_ascii_case(k)) {
            sql.push_str(&format!("RESET {};", protocol::quote_ident(k)));
        }
    }
    (!sql.is_empty()).then_some(sql)
}
