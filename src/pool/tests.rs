//! Checkouts against a stand-in server: however a checkout ends (served, expired, dropped while queued, while
//! connecting or while its server is checked), the pool's count of connections stays exact and no waiter is left
//! waiting while there is room for it.

use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::config::{Dur, PoolMode};
use crate::server::Target;

/// A stand-in PostgreSQL that lets anyone in (AuthenticationOk, ReadyForQuery) and answers every simple query with
/// CommandComplete and ReadyForQuery, while the switches allow it.
struct FakeServer {
    port: u16,
    /// Connections accepted, and those of them not yet hung up by the pool.
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// While false, new connections get no answer to their startup message.
    logins: Arc<AtomicBool>,
    /// While false, queries get no answer.
    queries: Arc<AtomicBool>,
}

impl FakeServer {
    /// `max_login_delay` holds each login back by up to that long (varied per connection), so that a checkout can
    /// be given up while its connection is being opened.
    async fn start(max_login_delay: Duration) -> FakeServer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let server = FakeServer {
            port: l.local_addr().expect("bound").port(),
            accepted: Default::default(),
            open: Default::default(),
            logins: Arc::new(AtomicBool::new(true)),
            queries: Arc::new(AtomicBool::new(true)),
        };
        let (accepted, open) = (server.accepted.clone(), server.open.clone());
        let (logins, queries) = (server.logins.clone(), server.queries.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let n = accepted.fetch_add(1, Ordering::Relaxed) as u64 + 1;
                open.fetch_add(1, Ordering::Relaxed);
                let delay = Duration::from_micros((n * 7919) % (max_login_delay.as_micros() as u64 + 1));
                let login = logins.load(Ordering::Relaxed);
                let (open, queries) = (open.clone(), queries.clone());
                tokio::spawn(async move {
                    serve_one(s, login.then_some(delay), &queries).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        server
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Serves one connection until the peer hangs up; `login` is the delay before letting it in, `None` for never.
async fn serve_one(mut s: TcpStream, login: Option<Duration>, queries: &AtomicBool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let mut logged_in = false;
    loop {
        loop {
            // The startup message has no type byte; every later message has one.
            let head = usize::from(logged_in);
            if buf.len() < head + 4 {
                break;
            }
            let len = u32::from_be_bytes(buf[head..head + 4].try_into().expect("4 bytes")) as usize;
            if buf.len() < head + len {
                break;
            }
            let t = if logged_in { buf[0] } else { 0 };
            buf.drain(..head + len);
            let reply: &[u8] = match t {
                0 => {
                    let Some(delay) = login else { continue };
                    tokio::time::sleep(delay).await;
                    logged_in = true;
                    b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I"
                }
                b'Q' if queries.load(Ordering::Relaxed) => b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I",
                _ => continue,
            };
            if s.write_all(reply).await.is_err() {
                return;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A pool of `size` (plus `reserve`) in front of `server`, counted against the database's `limit`.
fn pool_at(server: &FakeServer, user: &str, size: usize, reserve: usize, limit: &Arc<DbLimit>) -> Arc<Pool> {
    pool_with(server, user, size, reserve, limit, |_| {})
}

/// `pool_at`, with `tune` adjusting the config first.
fn pool_with(
    server: &FakeServer,
    user: &str,
    size: usize,
    reserve: usize,
    limit: &Arc<DbLimit>,
    tune: impl FnOnce(&mut Config),
) -> Arc<Pool> {
    let mut cfg = Config::default();
    // No server_check_query unless a test asks for one: most checkouts then take no round trip.
    cfg.proxy.server_check_query = String::new();
    tune(&mut cfg);
    let settings = PoolSettings {
        pool_mode: PoolMode::Transaction,
        pool_size: size,
        min_pool_size: 0,
        reserve_pool_size: reserve,
        max_db_connections: cfg.proxy.max_db_connections,
    };
    let (_route_tx, route) = crate::routing::fixed(Target { host: "127.0.0.1".into(), port: server.port });
    let pool = Arc::new(Pool::new(
        PoolKey { database: "db".into(), user: user.into() },
        Login { user: user.into(), database: "db".into(), secret: None, scram_keys: None },
        settings,
        Arc::new(ArcSwap::from_pointee(cfg)),
        route,
        false,
        crate::observe::Metrics::new().pool("db", false),
        limit.clone(),
    ));
    limit.register(&pool);
    pool
}

/// The app's janitor tends the queue every 100 ms; here every 5 ms.
fn tend(pools: Vec<Arc<Pool>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            for p in &pools {
                p.tend_waiters(Instant::now());
            }
        }
    })
}

/// Waits up to 2 s for `f` to hold.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn soon() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(5))
}

#[tokio::test]
async fn a_checkout_dropped_while_connecting_gives_its_slot_back() {
    let server = FakeServer::start(Duration::ZERO).await;
    let pool = pool_at(&server, "u", 1, 0, &Default::default());
    // 1. Through `Step::Connect`: the server never answers the login, the client gives up.
    server.logins.store(false, Ordering::Relaxed);
    assert!(tokio::time::timeout(Duration::from_millis(50), pool.checkout(soon())).await.is_err());
    assert_eq!(pool.counts().total, 0, "a connect given up mid-way still counts against the pool");
    // 2. Through a `Grant::Slot`: a queued checkout is handed the room of a closed connection and opens its own.
    server.logins.store(true, Ordering::Relaxed);
    let held = pool.checkout(soon()).await.expect("the server lets this one in");
    let p = pool.clone();
    let queued = tokio::spawn(async move { p.checkout(soon()).await.map(drop) });
    eventually("the second checkout queues", || pool.counts().waiters == 1).await;
    server.logins.store(false, Ordering::Relaxed);
    held.discard();
    eventually("the queued checkout is connecting", || server.accepted() == 2).await;
    queued.abort();
    assert!(queued.await.expect_err("aborted").is_cancelled());
    assert_eq!(pool.counts().total, 0, "a granted slot given up mid-connect still counts against the pool");
    // The pool still serves.
    server.logins.store(true, Ordering::Relaxed);
    let c = tokio::time::timeout(Duration::from_secs(2), pool.checkout(soon())).await;
    assert!(matches!(c, Ok(Ok(_))), "the pool lost its only slot");
}

#[tokio::test]
async fn a_checkout_dropped_while_its_server_is_checked_closes_the_server() {
    let server = FakeServer::start(Duration::ZERO).await;
    let pool = pool_with(&server, "u", 1, 0, &Default::default(), |c| {
        c.proxy.server_check_query = "select 1".into();
        c.proxy.server_check_delay = Dur(Duration::ZERO);
    });
    pool.checkout(soon()).await.expect("connects").release();
    assert_eq!(pool.counts().idle, 1);
    // The idle server is checked before use, and the check never comes back.
    server.queries.store(false, Ordering::Relaxed);
    assert!(tokio::time::timeout(Duration::from_millis(50), pool.checkout(soon())).await.is_err());
    assert_eq!(pool.counts().total, 0, "a server dropped mid-check still counts against the pool");
    eventually("the server dropped mid-check is closed", || server.open() == 0).await;
}

/// Two pools of 2 (users "a" and "b") of one database limited to one server connection (max_db_connections = 1).
async fn two_pools_one_connection() -> (FakeServer, Arc<DbLimit>, Arc<Pool>, Arc<Pool>) {
    let server = FakeServer::start(Duration::ZERO).await;
    let limit = Arc::new(DbLimit::default());
    let tune = |c: &mut Config| c.proxy.max_db_connections = 1;
    let a = pool_with(&server, "a", 2, 0, &limit, tune);
    let b = pool_with(&server, "b", 2, 0, &limit, tune);
    (server, limit, a, b)
}

/// max_db_connections is shared by every pool of a database: room freed in one pool must reach a client queued in
/// another, which has nothing of its own to hand over.
#[tokio::test]
async fn a_waiter_held_back_by_max_db_connections_gets_room_freed_by_another_pool() {
    let (_server, limit, a, b) = two_pools_one_connection().await;
    let janitor = tend(vec![a.clone(), b.clone()]);
    let held = a.checkout(soon()).await.expect("the database's only connection");
    let b2 = b.clone();
    let queued = tokio::spawn(async move {
        let t0 = Instant::now();
        b2.checkout(Some(t0 + Duration::from_secs(3))).await.map(|c| (c, t0.elapsed()))
    });
    eventually("b's checkout queues behind the database limit", || b.counts().waiters == 1).await;
    held.discard();
    let (c, waited) = queued.await.expect("no panic").expect("b gets the room a freed");
    eprintln!("b waited {waited:?}");
    assert!(waited < Duration::from_secs(1), "{waited:?}");
    assert_eq!(limit.open.load(Ordering::Relaxed), 1);
    drop(c);
    janitor.abort();
}

/// At max_db_connections, an idle connection of another pool of the database is closed to make room, as pgBouncer
/// does: otherwise the client would wait for that connection's server_idle_timeout (600 s by default).
#[tokio::test]
async fn at_the_database_limit_an_idle_connection_of_another_pool_makes_room() {
    let (server, limit, a, b) = two_pools_one_connection().await;
    a.checkout(soon()).await.expect("the database's only connection").release();
    assert_eq!((a.counts().total, a.counts().idle), (1, 1));
    let t0 = Instant::now();
    let c = tokio::time::timeout(Duration::from_secs(3), b.checkout(soon()))
        .await
        .expect("b is served at once, not after a's idle timeout")
        .expect("b connects");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(a.counts().total, 0, "a's idle connection was closed for b");
    assert_eq!(limit.open.load(Ordering::Relaxed), 1, "still one connection for the database");
    eventually("a's connection is gone from the server", || server.open() == 1).await;
    // A connection in use is never taken: with b's checked out, a waits.
    let r = tokio::time::timeout(Duration::from_millis(300), a.checkout(None)).await;
    assert!(r.is_err(), "a must not get a second connection past the limit");
    assert_eq!(limit.open.load(Ordering::Relaxed), 1);
    drop(c);
}

/// A small xorshift: the stress test needs varied choices, not good randomness.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Many tasks on several threads check out from a pool of 2 (+1 reserve after 2 ms) and end their checkouts every
/// way there is; every checkout that is not given up must be served within a bound, and at the end the pool's
/// count must match the connections the server holds, all of them usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkouts_from_many_tasks_are_all_served_and_the_count_stays_exact() {
    const TASKS: u64 = 16;
    const OPS: u64 = 400;
    let server = FakeServer::start(Duration::from_micros(300)).await;
    let pool = pool_with(&server, "u", 2, 1, &Default::default(), |c| {
        c.proxy.reserve_pool_timeout = Dur(Duration::from_millis(2));
        // Idle checkouts run server_check_query once their server sat 200 µs: some do, some do not.
        c.proxy.server_check_query = "select 1".into();
        c.proxy.server_check_delay = Dur(Duration::from_micros(200));
    });
    let janitor = tend(vec![pool.clone()]);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
                let (mut served, mut given_up) = (0u64, 0u64);
                for _ in 0..OPS {
                    match rng.below(8) {
                        // Given up after up to 3 ms: dropped while queued, while connecting, while checked, or not
                        // at all; the first poll alone when the timeout is 0.
                        0 => {
                            let within = Duration::from_micros(rng.below(3000));
                            match tokio::time::timeout(within, pool.checkout(soon())).await {
                                Ok(c) => drop(c.expect("served")),
                                Err(_) => given_up += 1,
                            }
                        }
                        // A deadline that may pass while queued: served or told query_wait_timeout.
                        1 => match pool.checkout(Some(Instant::now() + Duration::from_millis(1))).await {
                            Ok(c) => c.release(),
                            Err(Error::Timeout("query_wait_timeout")) => given_up += 1,
                            Err(e) => panic!("checkout failed: {e}"),
                        },
                        _ => {
                            let t0 = Instant::now();
                            let c = pool.checkout(Some(t0 + Duration::from_secs(10))).await.expect("served");
                            let waited = t0.elapsed();
                            assert!(waited < Duration::from_secs(5), "a checkout waited {waited:?}");
                            served += 1;
                            for _ in 0..rng.below(3) {
                                tokio::task::yield_now().await;
                            }
                            match rng.below(8) {
                                0 => c.discard(),
                                1 => drop(c),
                                _ => c.release(),
                            }
                        }
                    }
                }
                (served, given_up)
            })
        })
        .collect();
    let (mut served, mut given_up) = (0, 0);
    for t in tasks {
        // A lost wake-up shows as a checkout that never ends: fail instead of hanging.
        let (s, g) = tokio::time::timeout(Duration::from_secs(30), t).await.expect("a task hung").expect("no panic");
        served += s;
        given_up += g;
    }
    janitor.abort();
    let c = pool.counts();
    eprintln!("{served} served, {given_up} given up in {:?}; pool {c:?}", started.elapsed());
    assert!(pool.max_wait_us.load(Ordering::Relaxed) > 0, "no checkout ever waited: the queue was not exercised");
    assert_eq!(c.waiters, 0);
    assert_eq!(c.total, c.idle, "nothing is checked out or being opened any more");
    assert!(c.total <= 3, "{c:?}");
    eventually("the server holds exactly the pool's connections", || server.open() == pool.counts().total).await;
    // Every slot is usable: three checkouts at once (the third after the reserve timeout).
    let all: Vec<_> = (0..3).map(|_| pool.checkout(soon())).collect();
    let all = tokio::time::timeout(Duration::from_secs(2), futures_join(all)).await.expect("the pool lost slots");
    assert!(all.iter().all(Result::is_ok));
}

/// Polls the checkouts together on this task.
async fn futures_join<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                if let Poll::Ready(v) = f.as_mut().poll(cx) {
                    *o = Some(v);
                }
            }
        }
        if out.iter().all(Option::is_some) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("all ready")).collect()
}
