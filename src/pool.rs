//! Pool per (database, user): idle stack, FIFO waiter queue, size limits, lifetimes, and a checkout guard that
//! discards its server unless it is explicitly released clean.

mod queue;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{Config, PoolSettings};
use crate::error::{Error, Result};
use crate::observe::PoolMetrics;
use crate::routing::Route;
use crate::server::{Login, ServerConn, Target};

/// Identity of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

/// Server-connection count shared by every pool of one database (for max_db_connections), and those pools.
#[derive(Default)]
pub struct DbLimit {
    pub open: AtomicUsize,
    /// The pools of the database (one per user): at the limit, a pool closes an idle connection of another one
    /// rather than make its client wait for that connection's idle timeout (pgBouncer does the same).
    pools: Mutex<Vec<std::sync::Weak<Pool>>>,
}

impl DbLimit {
    /// Adds a pool of this database.
    pub fn register(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock();
        pools.retain(|p| p.strong_count() > 0);
        if !pools.iter().any(|p| std::ptr::eq(p.as_ptr(), Arc::as_ptr(pool))) {
            pools.push(Arc::downgrade(pool));
        }
    }

    /// Closes the longest-idle connection of another pool of the database, if one is idle; true if it did.
    /// Called with `me`'s lock held, so the others are only tried (two pools evicting from each other at once must
    /// not wait on each other).
    fn evict_idle(&self, me: &Pool) -> bool {
        let pools: Vec<Arc<Pool>> = self.pools.lock().iter().filter_map(|p| p.upgrade()).collect();
        for p in pools.iter().filter(|p| !std::ptr::eq(Arc::as_ptr(p), me)) {
            let Some(mut g) = p.inner.try_lock() else { continue };
            if g.idle.is_empty() {
                continue;
            }
            // The idle list is used last-in first-out: its front has waited longest.
            let conn = g.idle.remove(0);
            g.servers.remove(&conn.id);
            g.total -= 1;
            drop(g);
            self.open.fetch_sub(1, Ordering::Relaxed);
            debug!(pool = %p.key.database, user = %p.key.user, server = conn.id, "closing an idle server for another user's pool (max_db_connections)");
            close_now(conn);
            return true;
        }
        false
    }
}

/// Counters behind SHOW STATS; plain atomics bumped once per query or transaction.
#[derive(Default)]
pub struct PoolStats {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
    pub wait_count: AtomicU64,
    pub errors: AtomicU64,
    /// Clients linked to a server / waiting for one / connected to this pool at all.
    pub cl_active: AtomicI64,
    pub cl_waiting: AtomicI64,
    pub clients: AtomicI64,
}

use queue::{Grant, Ticket, Turn, WaitQueue};

/// The parameters a server reported at login (ParameterStatus), shared by every client greeting.
pub type ServerParams = Arc<Vec<(String, String)>>;

/// What SHOW SERVERS lists about a connection.
#[derive(Clone, Debug)]
pub struct ServerMeta {
    pub target: Arc<Target>,
    pub backend_pid: i32,
    pub local_port: u16,
    pub connect_time: std::time::SystemTime,
}

struct Inner {
    // Boxed on purpose: connections move in and out of this list on every transaction.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// Connections open or being opened, idle or not.
    total: usize,
    queue: WaitQueue,
    servers: HashMap<u64, ServerMeta>,
    tuning: Tuning,
    /// The pool's own view of the route, and the generation it last saw: checking it costs one atomic load while
    /// the route is unchanged.
    route: watch::Receiver<Route>,
    generation: u64,
}

/// What a checkout needs from the pool settings and the config, copied when they change (`Pool::resize`) so a
/// transaction reads neither.
#[derive(Clone, Copy, Debug)]
struct Tuning {
    pool_size: usize,
    reserve_pool_size: usize,
    max_db_connections: usize,
    reserve_after: Duration,
    lifetime: Option<Duration>,
}

impl Tuning {
    fn new(s: &PoolSettings, cfg: &Config) -> Tuning {
        Tuning {
            pool_size: s.pool_size,
            reserve_pool_size: s.reserve_pool_size,
            max_db_connections: s.max_db_connections,
            reserve_after: cfg.proxy.reserve_pool_timeout.0,
            lifetime: cfg.proxy.server_lifetime.get(),
        }
    }

    /// Most connections the pool may hold: pool_size plus the reserve.
    fn cap(&self) -> usize {
        self.pool_size + self.reserve_pool_size
    }
}

/// `server_check_delay` in microseconds, or `NO_CHECK` when there is no server_check_query.
fn check_after_us(cfg: &Config) -> u64 {
    if cfg.proxy.server_check_query.is_empty() {
        NO_CHECK
    } else {
        cfg.proxy.server_check_delay.0.as_micros() as u64
    }
}

const NO_CHECK: u64 = u64::MAX;

impl Inner {
    /// Follows a route change (a new leader or login retires older connections).
    fn refresh_route(&mut self) {
        if self.route.has_changed().unwrap_or(false) {
            self.generation = self.route.borrow_and_update().generation;
        }
    }

    /// Whether an idle connection may serve again; `refresh_route` first.
    fn is_usable(&self, conn: &ServerConn, now: Instant) -> bool {
        if conn.generation != self.generation {
            return false;
        }
        // `created + l` rather than `now - created`: an addition is about half the instructions of a subtraction.
        match self.tuning.lifetime {
            Some(l) => conn.created.checked_add(l).is_none_or(|end| now <= end),
            None => true,
        }
    }
}

/// One pool.
pub struct Pool {
    pub key: PoolKey,
    pub login: ArcSwap<Login>,
    pub settings: ArcSwap<PoolSettings>,
    pub config: Arc<ArcSwap<Config>>,
    route: watch::Receiver<Route>,
    /// For Patroni-routed databases: a new connection must be writable (`pg_is_in_recovery() = false`).
    must_be_primary: bool,
    inner: Mutex<Inner>,
    pub stats: PoolStats,
    pub metrics: PoolMetrics,
    db_limit: Arc<DbLimit>,
    pub paused: AtomicBool,
    /// Set when the pool's database is removed by a reload: connections close as they come back.
    pub retired: AtomicBool,
    /// The parameters the first server reported, replayed to clients at login.
    pub server_params: Mutex<Option<ServerParams>>,
    pub max_wait_us: AtomicU64,
    /// Content hash → version of statements whose server copies went stale (see `prepared::from_parse`).
    stmt_versions: Mutex<std::collections::HashMap<u64, u32>>,
    /// DDL statements seen through this pool (see `prepared::from_parse`).
    pub ddl_epoch: std::sync::atomic::AtomicU32,
    has_stmt_versions: AtomicBool,
    /// Set after a failed connect: no new attempt before `next_try` while the route stays the same.
    backoff: Mutex<Option<Backoff>>,
    /// server_check_delay in µs while a server_check_query is set (`NO_CHECK` otherwise); kept by `resize`.
    check_after_us: AtomicU64,
}

/// Pacing of connection attempts to a target that just failed.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    /// Route generation of the failed target: a new route (a new leader) is tried at once.
    generation: u64,
    next_try: Instant,
    /// When the current run of failures began, and how many attempts it took (for the recovery log line).
    since: Instant,
    attempts: u32,
}

/// Result of the locked part of a checkout.
enum Step {
    Got(Box<ServerConn>),
    Connect,
    /// Queued; a reserve connection may be opened at the instant given, if still waiting.
    Wait(Ticket, Option<Instant>),
}

impl Pool {
    /// Creates an empty pool.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: PoolKey,
        login: Login,
        settings: PoolSettings,
        config: Arc<ArcSwap<Config>>,
        route: watch::Receiver<Route>,
        must_be_primary: bool,
        metrics: PoolMetrics,
        db_limit: Arc<DbLimit>,
    ) -> Pool {
        let mut own_route = route.clone();
        let generation = own_route.borrow_and_update().generation;
        let cfg = config.load();
        let inner = Inner {
            idle: Vec::new(),
            total: 0,
            queue: WaitQueue::default(),
            servers: HashMap::new(),
            tuning: Tuning::new(&settings, &cfg),
            route: own_route,
            generation,
        };
        let check_after_us = AtomicU64::new(check_after_us(&cfg));
        drop(cfg);
        Pool {
            key,
            login: ArcSwap::from_pointee(login),
            settings: ArcSwap::from_pointee(settings),
            config,
            route,
            must_be_primary,
            inner: Mutex::new(inner),
            stats: PoolStats::default(),
            metrics,
            db_limit,
            paused: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            server_params: Mutex::new(None),
            max_wait_us: AtomicU64::new(0),
            stmt_versions: Mutex::new(Default::default()),
            ddl_epoch: std::sync::atomic::AtomicU32::new(0),
            has_stmt_versions: AtomicBool::new(false),
            backoff: Mutex::new(None),
            check_after_us,
        }
    }

    /// Current version of a statement's content hash (0 until it went stale once).
    #[inline]
    pub fn statement_version(&self, content: u64) -> u32 {
        if !self.has_stmt_versions.load(Ordering::Relaxed) {
            return 0;
        }
        self.stmt_versions.lock().get(&content).copied().unwrap_or(0)
    }

    /// Marks a statement's server copies stale: the next prepare of that text gets a new server-side name.
    pub fn bump_statement_version(&self, content: u64) {
        *self.stmt_versions.lock().entry(content).or_insert(0) += 1;
        self.has_stmt_versions.store(true, Ordering::Relaxed);
    }

    /// Gets a server connection, waiting in FIFO order up to `deadline`.
    pub async fn checkout(self: &Arc<Self>, deadline: Option<Instant>) -> Result<PooledConn> {
        self.checkout_at(deadline, Instant::now()).await
    }

    /// `checkout` for a caller that already read the clock (`start`): an idle connection costs no clock read.
    pub async fn checkout_at(self: &Arc<Self>, deadline: Option<Instant>, start: Instant) -> Result<PooledConn> {
        let mut immediate = true;
        // Whether the reserve may be used; decided under the lock by the first step.
        let mut reserve = None;
        let mut waiting = false;
        // When a wait ended, if the clock was read then.
        let mut end = None;
        let result = loop {
            let step =
                std::future::poll_fn(|cx| Poll::Ready(self.step(&mut reserve, start, deadline, cx.waker()))).await;
            // An idle connection, and when it was had; `true` when it was handed over after a wait.
            let (conn, at, granted) = match step {
                Step::Got(conn) => (conn, start, false),
                Step::Connect => {
                    immediate = false;
                    // Boxed here and below: opening a connection (TCP, TLS, authentication) needs far more state than a
                    // checkout, and this future is part of every session's.
                    break Box::pin(self.open(deadline)).await;
                }
                Step::Wait(ticket, reserve_at) => {
                    immediate = false;
                    if !waiting {
                        waiting = true;
                        self.stats.cl_waiting.fetch_add(1, Ordering::Relaxed);
                    }
                    // Awaited in the same poll as `step`, with the waker it queued (see `Turn::fresh`).
                    let turn = Turn { pool: self, ticket: Some(ticket), fresh: true };
                    // The deadline is enforced by `tend_waiters` (run by the janitor every 100 ms), so a wait costs
                    // no timer; only a pending reserve pool needs one.
                    let grant = match reserve_at {
                        None => Some(turn.await),
                        Some(at) => tokio::select! {
                            g = turn => Some(g),
                            _ = tokio::time::sleep_until(at.into()) => {
                                reserve = Some(true);
                                None
                            }
                        },
                    };
                    match grant {
                        Some(Grant::Expired) => break Err(Error::Timeout("query_wait_timeout")),
                        Some(Grant::Conn(conn)) => (conn, Instant::now(), true),
                        Some(Grant::Slot) => break Box::pin(self.open(deadline)).await,
                        None => continue,
                    }
                }
            };
            // `prepare_idle` only has work for Patroni-routed pools and when server_check_query is due.
            if !self.must_be_primary && !self.check_due(&conn, at) {
                if granted {
                    end = Some(at);
                }
                break Ok(conn);
            }
            match self.prepare_idle(conn, at).await {
                Some(conn) => break Ok(conn),
                None => immediate = false,
            }
        };
        if waiting {
            self.stats.cl_waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let got_at = if immediate {
            start
        } else {
            match end {
                Some(t) if result.is_ok() => t,
                _ => Instant::now(),
            }
        };
        let waited = got_at.saturating_duration_since(start);
        let us = waited.as_micros() as u64;
        if us > 0 {
            self.stats.wait_time_us.fetch_add(us, Ordering::Relaxed);
            self.max_wait_us.fetch_max(us, Ordering::Relaxed);
        }
        self.stats.wait_count.fetch_add(1, Ordering::Relaxed);
        self.metrics.record_wait(waited);
        result.map(|conn| PooledConn { conn: Some(conn), pool: self.clone(), got_at })
    }

    /// The locked part of a checkout: an idle connection, room to open one, or a place in the queue (woken
    /// through `waker`). `reserve` is decided on the first call.
    fn step(&self, reserve: &mut Option<bool>, now: Instant, deadline: Option<Instant>, waker: &Waker) -> Step {
        let mut g = self.inner.lock();
        g.refresh_route();
        // Idle connections only exist while nobody waits (checkin hands them straight to the queue), so taking one
        // never overtakes a queued client.
        while let Some(conn) = g.idle.pop() {
            if g.is_usable(&conn, now) {
                return Step::Got(conn);
            }
            g.servers.remove(&conn.id);
            g.total -= 1;
            self.db_limit.open.fetch_sub(1, Ordering::Relaxed);
            close_now(conn);
        }
        let t = g.tuning;
        let reserve = *reserve.get_or_insert(t.reserve_pool_size > 0 && t.reserve_after.is_zero());
        let limit = t.pool_size + if reserve { t.reserve_pool_size } else { 0 };
        if g.total < limit && self.db_room(&t) {
            g.total += 1;
            self.db_limit.open.fetch_add(1, Ordering::Relaxed);
            return Step::Connect;
        }
        let ticket = g.queue.push(waker.clone(), now, deadline);
        let reserve_at = (t.reserve_pool_size > 0 && !reserve).then(|| now + t.reserve_after);
        Step::Wait(ticket, reserve_at)
    }

    /// Whether an idle connection must pass server_check_query before use.
    fn check_due(&self, conn: &ServerConn, now: Instant) -> bool {
        let after = self.check_after_us.load(Ordering::Relaxed);
        match after {
            NO_CHECK => false,
            // Always, even when `now` was read before another session's checkin stamped `last_used`.
            0 => true,
            _ => conn.last_used.checked_add(Duration::from_micros(after)).is_some_and(|due| now >= due),
        }
    }

    /// Checks an idle connection before handing it out (server_check_query after server_check_delay idle).
    async fn prepare_idle(self: &Arc<Self>, mut conn: Box<ServerConn>, now: Instant) -> Option<Box<ServerConn>> {
        // A leader that died while the connection sat idle (a crash) would fail the client's next transaction,
        // which never reached it: drop the connection here and the checkout goes on (one non-blocking peek;
        // only for Patroni-routed pools, where a dying server is an expected event).
        if self.must_be_primary && peer_gone(&conn) {
            debug!(pool = %self.key.database, server = conn.id, "idle server hung up, dropping it");
            self.forget(conn);
            return None;
        }
        if self.check_due(&conn, now) {
            let query = self.config.load().proxy.server_check_query.clone();
            // Guarded while the check runs: a checkout dropped meanwhile closes the server and frees its slot.
            let mut guard = PooledConn { conn: Some(conn), pool: self.clone(), got_at: now };
            let ok = Box::pin(tokio::time::timeout(Duration::from_secs(5), guard.execute(&query))).await;
            if !matches!(ok, Ok(Ok(()))) {
                debug!(pool = %self.key.database, server = guard.id, "server check failed, dropping it");
                guard.discard();
                return None;
            }
            conn = guard.conn.take().expect("conn is Some until release/discard consume the guard");
        }
        Some(conn)
    }

    /// Opens a new connection for a slot already counted in `total`, giving up at `deadline`.
    async fn open(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Box<ServerConn>> {
        let slot = Opening { pool: Some(self) };
        let conn = self.connect(deadline).await?;
        slot.opened();
        let mut g = self.inner.lock();
        g.servers.insert(
            conn.id,
            ServerMeta {
                target: conn.target.clone(),
                backend_pid: conn.backend_pid,
                local_port: conn.local_port,
                connect_time: std::time::SystemTime::now(),
            },
        );
        Ok(Box::new(conn))
    }

    /// Connects to the route's current target.
    ///
    /// A fixed host fails fast (after server_login_retry since the last failure, like pgBouncer). A pool that
    /// follows a Patroni leader instead waits and retries, up to `deadline`: while there is no leader, and while
    /// the leader refuses connections (crashed but still named by Patroni for up to its ttl, shutting down for a
    /// switchover, starting up, still in recovery after its promotion). New transactions then wait for the new
    /// leader instead of failing. Attempts are paced by `connect_retry`, one at a time per pool; a new route
    /// (generation) is tried at once.
    async fn connect(&self, deadline: Option<Instant>) -> Result<ServerConn> {
        let mut route_rx = self.route.clone();
        loop {
            // 1. A target to try (none while Patroni names no leader or a switchover is pending).
            let (target, generation) = loop {
                let r = route_rx.borrow_and_update().clone();
                if let Some(t) = r.target {
                    break (t, r.generation);
                }
                tokio::select! {
                    c = route_rx.changed() => if c.is_err() { return Err(Error::Pool("routing stopped".into())) },
                    _ = sleep_until_opt(deadline) => return Err(Error::Timeout("query_wait_timeout")),
                }
            };
            // 2. Wait out the pause after a failure on this same route (a new route clears it).
            if let Some(until) = self.claim_attempt(generation) {
                if !self.must_be_primary {
                    tokio::time::sleep_until(until.into()).await;
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.into()) => {}
                        c = route_rx.changed() => if c.is_err() { return Err(Error::Pool("routing stopped".into())) },
                        _ = sleep_until_opt(deadline) => return Err(Error::Timeout("query_wait_timeout")),
                    }
                    continue;
                }
            }
            // 3. Connect; a leader must also be writable.
            let attempt = async {
                let mut conn = self.connect_once(&target, generation).await?;
                if !self.must_be_primary {
                    return Ok(conn);
                }
                let rows = conn.query_column("select pg_is_in_recovery()").await?;
                if rows.first().and_then(|r| r.first()).cloned().flatten().as_deref() == Some("f") {
                    return Ok(conn);
                }
                conn.terminate().await;
                Err(Error::ServerRefused {
                    code: "57P03".into(),
                    message: "in recovery (promotion not finished)".into(),
                })
            };
            let e = match attempt.await {
                Ok(conn) => return self.connected(conn),
                Err(e) => e,
            };
            // 4. Remember the failure; a leader that is only unavailable for now is tried again.
            let first = self.note_failure(generation);
            if !self.must_be_primary || !leader_unavailable(&e) {
                warn!(db = %self.key.database, user = %self.key.user, server = %target, error = %e, "server connect failed");
                return Err(e);
            }
            if first {
                warn!(db = %self.key.database, user = %self.key.user, server = %target, error = %e,
                    "leader unavailable; new transactions wait and retry");
            } else {
                debug!(db = %self.key.database, server = %target, error = %e, "leader still unavailable");
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::Timeout("query_wait_timeout"));
            }
        }
    }

    /// Pause between attempts after a failure: short for a Patroni leader (it comes back or is replaced within
    /// seconds, and waiting clients should not notice the pause), server_login_retry for a fixed host.
    fn retry_pause(&self) -> Duration {
        let cfg = self.config.load();
        if !self.must_be_primary {
            return cfg.proxy.server_login_retry.0;
        }
        cfg.databases
            .get(&self.key.database)
            .and_then(|d| d.patroni.as_ref())
            .and_then(|p| cfg.patroni.get(p))
            .map_or(Duration::from_millis(50), |p| p.connect_retry.0)
    }

    /// `Some(until)` when an attempt on `generation` must wait; otherwise the attempt may go ahead, and while
    /// failures are being paced it takes the next turn, so waiting checkouts try one at a time.
    fn claim_attempt(&self, generation: u64) -> Option<Instant> {
        let mut b = self.backoff.lock();
        let cur = (*b)?;
        if cur.generation != generation {
            *b = None;
            return None;
        }
        let now = Instant::now();
        if cur.next_try > now {
            return Some(cur.next_try);
        }
        if self.must_be_primary {
            b.as_mut().expect("checked above").next_try = now + self.retry_pause();
        }
        None
    }

    /// Records a failed attempt on `generation`; true for the first failure of a run.
    fn note_failure(&self, generation: u64) -> bool {
        let now = Instant::now();
        let pause = self.retry_pause();
        let mut b = self.backoff.lock();
        match b.as_mut() {
            Some(cur) if cur.generation == generation => {
                cur.next_try = now + pause;
                cur.attempts += 1;
                false
            }
            _ => {
                *b = Some(Backoff { generation, next_try: now + pause, since: now, attempts: 1 });
                true
            }
        }
    }

    async fn connect_once(&self, target: &Arc<Target>, generation: u64) -> Result<ServerConn> {
        let cfg = self.config.load_full();
        let login = self.login.load_full();
        ServerConn::connect(target.clone(), &login, &cfg.proxy, generation).await
    }

    fn connected(&self, conn: ServerConn) -> Result<ServerConn> {
        if let Some(b) = self.backoff.lock().take() {
            info!(db = %self.key.database, server = %conn.target, failed_attempts = b.attempts,
                waited_ms = b.since.elapsed().as_millis() as u64, "server connect succeeded again");
        }
        debug!(db = %self.key.database, server = %conn.target, pid = conn.backend_pid, "server connected");
        {
            let mut p = self.server_params.lock();
            if p.is_none() {
                *p = Some(Arc::new(conn.params.clone()));
            }
        }
        Ok(conn)
    }

    /// The janitor's look at the queue (every 100 ms): waiters whose deadline has passed give up
    /// (query_wait_timeout), and waiters held back by max_db_connections get the room that another pool of the
    /// database freed. Nothing else hands them that room: a pool hands what it frees to its own queue only.
    pub fn tend_waiters(&self, now: Instant) {
        let woken = {
            let mut g = self.inner.lock();
            let mut woken = g.queue.expire(now);
            woken.extend(self.admit(&mut g));
            woken
        };
        for w in woken {
            w.wake();
        }
    }

    /// Whether the database has room for one more server connection under max_db_connections, closing another
    /// pool's idle one to make it if needed. Called with this pool's lock held.
    fn db_room(&self, t: &Tuning) -> bool {
        t.max_db_connections == 0
            || self.db_limit.open.load(Ordering::Relaxed) < t.max_db_connections
            || self.db_limit.evict_idle(self)
    }

    /// Grants room to open a connection to queued checkouts, in queue order, while the pool is below pool_size and
    /// the database below max_db_connections; returns the wakers to wake once the lock is released.
    fn admit(&self, g: &mut Inner) -> Vec<Waker> {
        let mut woken = Vec::new();
        let t = g.tuning;
        while g.total < t.pool_size && g.queue.live().0 > 0 && self.db_room(&t) {
            let Ok(w) = g.queue.grant_first(Grant::Slot) else { break };
            g.total += 1;
            self.db_limit.open.fetch_add(1, Ordering::Relaxed);
            woken.push(w);
        }
        woken
    }

    /// A slot counted in `total` is free again: hand it to the first live waiter, or shrink.
    fn give_back_slot(&self) {
        let mut g = self.inner.lock();
        // Above the cap (the pool was shrunk by a reload) the slot goes away instead of to a waiter.
        if g.total <= g.tuning.cap() {
            if let Ok(w) = g.queue.grant_first(Grant::Slot) {
                drop(g);
                w.wake();
                return;
            }
        }
        g.total -= 1;
        self.db_limit.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Applies new settings after a reload (the caller stores `settings` and the config first): a smaller pool
    /// closes its surplus idle connections now (busy ones close as they come back), a larger one lets queued
    /// clients open connections at once, in queue order.
    pub fn resize(&self) {
        let s = self.settings.load();
        let cfg = self.config.load();
        self.check_after_us.store(check_after_us(&cfg), Ordering::Relaxed);
        let mut closed = Vec::new();
        let woken = {
            let mut g = self.inner.lock();
            g.tuning = Tuning::new(&s, &cfg);
            while g.total > s.pool_size {
                let Some(c) = g.idle.pop() else { break };
                g.servers.remove(&c.id);
                g.total -= 1;
                self.db_limit.open.fetch_sub(1, Ordering::Relaxed);
                closed.push(c);
            }
            self.admit(&mut g)
        };
        for w in woken {
            w.wake();
        }
        if !closed.is_empty() {
            info!(db = %self.key.database, user = %self.key.user, closed = closed.len(), "pool shrunk; surplus idle connections closed");
        }
        for c in closed {
            close_now(c);
        }
    }

    /// Returns a clean, idle connection.
    fn checkin(&self, mut conn: Box<ServerConn>, now: Instant) {
        conn.last_used = now;
        self.put_back(conn, now);
    }

    /// Passes on a connection granted to a checkout that gave up before taking it. It gets a checkin's checks: the
    /// route, lifetime, pool size or pool may have changed since it was granted.
    fn pass_on(&self, conn: Box<ServerConn>) {
        self.put_back(conn, Instant::now());
    }

    /// Hands a connection to the next waiter or the idle list, or closes it when it must not serve again.
    fn put_back(&self, conn: Box<ServerConn>, now: Instant) {
        let mut g = self.inner.lock();
        g.refresh_route();
        let surplus = g.total > g.tuning.cap();
        if surplus || conn.tx_status != b'I' || !g.is_usable(&conn, now) || self.retired.load(Ordering::Relaxed) {
            drop(g);
            self.forget(conn);
            return;
        }
        self.hand_over(g, conn);
    }

    /// Gives an idle connection to the first waiter, or puts it on the idle list; wakes the waiter unlocked.
    fn hand_over(&self, mut g: parking_lot::MutexGuard<'_, Inner>, conn: Box<ServerConn>) {
        match g.queue.grant_first(Grant::Conn(conn)) {
            Ok(w) => {
                drop(g);
                w.wake();
            }
            Err(Grant::Conn(c)) => g.idle.push(c),
            Err(Grant::Slot | Grant::Expired) => unreachable!("grant_first gives back the grant it was given"),
        }
    }

    /// Closes a connection and frees its slot.
    pub fn forget(&self, conn: Box<ServerConn>) {
        self.inner.lock().servers.remove(&conn.id);
        close_now(conn);
        self.give_back_slot();
    }

    /// Periodic upkeep: idle/lifetime expiry, stale routing, min_pool_size. Returns how many connections to open.
    pub fn janitor(self: &Arc<Self>) {
        let cfg = self.config.load();
        let s = self.settings.load();
        let idle_timeout = cfg.proxy.server_idle_timeout.get();
        let mut closed = Vec::new();
        let to_open;
        {
            let mut g = self.inner.lock();
            g.refresh_route();
            let min = s.min_pool_size;
            let mut i = 0;
            while i < g.idle.len() {
                let conn = &g.idle[i];
                let expired_idle = idle_timeout.is_some_and(|t| conn.last_used.elapsed() > t) && g.total > min;
                if expired_idle || !g.is_usable(conn, Instant::now()) || self.retired.load(Ordering::Relaxed) {
                    let c = g.idle.swap_remove(i);
                    g.servers.remove(&c.id);
                    g.total -= 1;
                    self.db_limit.open.fetch_sub(1, Ordering::Relaxed);
                    closed.push(c);
                } else {
                    i += 1;
                }
            }
            g.queue.compact();
            let route_ok = self.route.borrow().target.is_some();
            to_open = if route_ok && !self.retired.load(Ordering::Relaxed) && !self.paused.load(Ordering::Relaxed) {
                min.saturating_sub(g.total)
            } else {
                0
            };
            g.total += to_open;
            self.db_limit.open.fetch_add(to_open, Ordering::Relaxed);
        }
        for c in closed {
            close_now(c);
        }
        for _ in 0..to_open {
            let pool = self.clone();
            // Bounded: a leader that stays unavailable must not pin the slot.
            let deadline = Instant::now() + Duration::from_secs(10);
            tokio::spawn(async move {
                if let Ok(conn) = pool.open(Some(deadline)).await {
                    pool.checkin(conn, Instant::now());
                }
            });
        }
    }

    /// Counts for SHOW POOLS and metrics: (total, idle, waiting clients, oldest wait).
    pub fn counts(&self) -> PoolCounts {
        let g = self.inner.lock();
        let (waiters, oldest) = g.queue.live();
        PoolCounts { total: g.total, idle: g.idle.len(), waiters, oldest_wait: oldest.map(|t| t.elapsed()) }
    }

    /// Connections for SHOW SERVERS: (id, meta, idle?).
    pub fn servers(&self) -> Vec<(u64, ServerMeta, bool)> {
        let g = self.inner.lock();
        let idle: Vec<u64> = g.idle.iter().map(|c| c.id).collect();
        g.servers.iter().map(|(id, m)| (*id, m.clone(), idle.contains(id))).collect()
    }

    /// Closes every idle connection now (KILL, leader change, reload of the target).
    pub fn drop_idle(&self) {
        let closed: Vec<Box<ServerConn>> = {
            let mut g = self.inner.lock();
            let v: Vec<Box<ServerConn>> = g.idle.drain(..).collect();
            for c in &v {
                g.servers.remove(&c.id);
            }
            g.total -= v.len();
            self.db_limit.open.fetch_sub(v.len(), Ordering::Relaxed);
            v
        };
        for c in closed {
            close_now(c);
        }
    }

    /// The routing receiver, for watching leader changes.
    pub fn route(&self) -> watch::Receiver<Route> {
        self.route.clone()
    }

    /// Logs the pool's state at info level (used on shutdown and reload).
    pub fn log_state(&self) {
        let c = self.counts();
        info!(db = %self.key.database, user = %self.key.user, total = c.total, idle = c.idle, waiting = c.waiters, "pool state");
    }
}

/// Snapshot of a pool's counts.
#[derive(Debug, Clone, Copy)]
pub struct PoolCounts {
    pub total: usize,
    pub idle: usize,
    pub waiters: usize,
    pub oldest_wait: Option<Duration>,
}

/// A slot counted in `total` for a connection being opened. Given back on drop unless the connection was opened:
/// a connect that fails, or whose checkout is dropped mid-way, must not cost the pool its room.
struct Opening<'a> {
    pool: Option<&'a Pool>,
}

impl Opening<'_> {
    /// The slot now belongs to an open connection.
    fn opened(mut self) {
        self.pool = None;
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pool {
            p.give_back_slot();
        }
    }
}

/// A checked-out server connection; returned to the pool only by [`PooledConn::release`], closed otherwise.
pub struct PooledConn {
    // Boxed: a connection changes hands several times per transaction (idle list, grant, guard), and a box moves
    // as one pointer instead of a few hundred bytes.
    conn: Option<Box<ServerConn>>,
    pool: Arc<Pool>,
    /// When the checkout ended: the caller's clock reading if no wait was needed.
    pub got_at: Instant,
}

impl PooledConn {
    /// Returns the connection to its pool; the caller vouches that the server is idle and clean.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// `release` with the caller's clock reading.
    pub fn release_at(mut self, now: Instant) {
        if let Some(c) = self.conn.take() {
            self.pool.checkin(c, now);
        }
    }

    /// Closes the connection (its state is unknown or broken).
    pub fn discard(mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.forget(c);
        }
    }

    /// The pool it came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl std::ops::Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn.as_ref().expect("conn is Some until release/discard consume the guard")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn.as_mut().expect("conn is Some until release/discard consume the guard")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        // A guard dropped without release() belongs to a client that broke off mid-way: its server may be inside a
        // transaction or mid-response, so it is closed (PostgreSQL rolls the transaction back), never reused.
        if let Some(c) = self.conn.take() {
            self.pool.forget(c);
        }
    }
}

/// Closes a connection without waiting: a best-effort Terminate, then the socket is dropped.
fn close_now(conn: Box<ServerConn>) {
    if let crate::server::ServerStream::Tcp(s) = &conn.stream {
        let _ = s.try_write(&[b'X', 0, 0, 0, 4]);
    } else if let crate::server::ServerStream::Unix(s) = &conn.stream {
        let _ = s.try_write(&[b'X', 0, 0, 0, 4]);
    }
}

/// True when an idle server has hung up, or sent an unrequested ErrorResponse (a FATAL before it closes).
fn peer_gone(conn: &ServerConn) -> bool {
    use std::os::fd::AsRawFd;
    if conn.rbuf.first() == Some(&b'E') {
        return true;
    }
    let fd = match &conn.stream {
        crate::server::ServerStream::Tcp(s) => s.as_raw_fd(),
        crate::server::ServerStream::Unix(s) => s.as_raw_fd(),
        // Encrypted bytes cannot be peeked at meaningfully; a dead TLS server is found on first use instead.
        crate::server::ServerStream::Tls(_) => return false,
    };
    let mut b = [0u8; 1];
    // SAFETY: a non-blocking peek of at most one byte from an fd the connection owns into a local buffer.
    let n = unsafe { libc::recv(fd, b.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        return std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock;
    }
    n == 0 || b[0] == b'E'
}

/// A connect error that means "the leader cannot take connections right now", not "this will never work":
/// refused/reset sockets, a connect timeout, and PostgreSQL's shutdown/startup/recovery refusals (57P01
/// admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now). Authentication and missing-database
/// errors are not retried.
fn leader_unavailable(e: &Error) -> bool {
    match e {
        Error::Server(_) | Error::Timeout("server_connect_timeout") => true,
        Error::ServerRefused { code, .. } => matches!(code.as_str(), "57P01" | "57P02" | "57P03"),
        _ => false,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
