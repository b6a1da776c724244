//! Criterion micro-benchmarks of the per-transaction hot path: frame header parsing (Query, Bind), the fingerprint
//! normaliser (short and ~1 KiB queries), the per-fingerprint stats table, prepared-statement Parse handling, and pool
//! checkout/checkin (uncontended and with queued waiters).
//!
//! `cargo bench --bench micro` (add `-- --quick` for a short pass, `-- pool` to run one group). The pool benchmarks
//! need a server to open their connections: a stub on a Unix socket in a temp dir answers the startup message with
//! AuthenticationOk + BackendKeyData + ReadyForQuery and reads nothing else, since a warm checkout never talks to
//! the server.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use pgrelay::config::{Config, PoolMode, PoolSettings};
use pgrelay::observe::{fingerprint, qstats::QueryStatsTable, Metrics};
use pgrelay::pool::{DbLimit, Pool, PoolKey};
use pgrelay::server::{Login, Target};

const SHORT_SQL: &str = "SELECT id, name, email FROM users WHERE org_id = 42 AND status IN (1, 2, 3) LIMIT 50";

/// A ~1 KiB reporting query: joins, string and numeric literals, a long IN list, a comment.
fn long_sql() -> String {
    let ids: Vec<String> = (1000..1100).map(|i| i.to_string()).collect();
    let sql = format!(
        "/* report:daily */ SELECT o.id, o.created_at, o.total_cents, c.name, c.email, a.city, a.country, \
         sum(li.quantity * li.unit_price_cents) AS gross, count(DISTINCT li.sku) AS skus \
         FROM orders o JOIN customers c ON c.id = o.customer_id JOIN addresses a ON a.id = o.shipping_address_id \
         LEFT JOIN line_items li ON li.order_id = o.id \
         WHERE o.created_at >= '2024-01-01 00:00:00+00' AND o.created_at < '2024-02-01 00:00:00+00' \
         AND o.status = 'shipped' AND c.segment <> 'internal' AND o.total_cents > 1500 \
         AND o.customer_id IN ({}) \
         GROUP BY o.id, o.created_at, o.total_cents, c.name, c.email, a.city, a.country \
         HAVING sum(li.quantity) > 2 ORDER BY gross DESC, o.id LIMIT 200 OFFSET 0",
        ids.join(", ")
    );
    assert!((900..1300).contains(&sql.len()), "long query should stay near 1 KiB, is {}", sql.len());
    sql
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&((4 + sql.len() + 1) as u32).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// Bind of an unnamed portal to statement "s1" with three text parameters, as pgbench -M prepared sends it.
fn bind_message() -> Vec<u8> {
    let mut body = Vec::new();
    body.push(0); // portal ""
    body.extend_from_slice(b"s1\0");
    body.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: all text
    let params: [&[u8]; 3] = [b"42", b"1234567", b"shipped"];
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        body.extend_from_slice(&(p.len() as i32).to_be_bytes());
        body.extend_from_slice(p);
    }
    body.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
    let mut m = vec![b'B'];
    m.extend_from_slice(&((4 + body.len()) as u32).to_be_bytes());
    m.extend_from_slice(&body);
    m
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol");
    for (name, msg) in [("query", query_message(SHORT_SQL)), ("bind", bind_message())] {
        g.bench_with_input(BenchmarkId::new("frame_header", name), &msg, |b, m| {
            b.iter(|| pgrelay::protocol::frame_header(black_box(m), 1 << 30))
        });
    }
    g.finish();
}

fn fingerprints(c: &mut Criterion) {
    let long = long_sql();
    let mut g = c.benchmark_group("fingerprint");
    for (name, sql) in [("short", SHORT_SQL), ("1k", long.as_str())] {
        g.throughput(Throughput::Bytes(sql.len() as u64));
        let mut out = String::new();
        g.bench_with_input(BenchmarkId::new("normalize", name), sql, |b, s| {
            b.iter(|| fingerprint::normalize(black_box(s), &mut out))
        });
        g.bench_with_input(BenchmarkId::new("fingerprint", name), sql, |b, s| {
            b.iter(|| fingerprint::fingerprint(black_box(s)))
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("query_type", |b| b.iter(|| fingerprint::query_type(black_box(SHORT_SQL))));
    g.finish();
}

fn query_stats(c: &mut Criterion) {
    let mut g = c.benchmark_group("qstats");
    let table = QueryStatsTable::new(5000);
    let fp = fingerprint::fingerprint(SHORT_SQL);
    table.record(fp, SHORT_SQL, "db", 10, 1, false);
    // The relay's path for a fingerprint seen before.
    g.bench_function("record_known", |b| b.iter(|| table.record_known(black_box(fp), 120, 1, false)));
    g.bench_function("record_existing", |b| b.iter(|| table.record(black_box(fp), SHORT_SQL, "db", 120, 1, false)));
    // A full table meeting new fingerprints: every record evicts the cheapest entry of its shard.
    let full = QueryStatsTable::new(5000);
    for i in 0..5000u64 {
        full.record(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), SHORT_SQL, "db", 100 + i, 1, false);
    }
    let mut next = 1u64 << 40;
    g.bench_function("record_new_full_table", |b| {
        b.iter(|| {
            next = next.wrapping_add(0x9e37_79b9_7f4a_7c15);
            full.record(black_box(next), SHORT_SQL, "db", 1_000_000, 1, false)
        })
    });
    g.finish();
}

fn prepared(c: &mut Criterion) {
    let mut g = c.benchmark_group("prepared");
    let mut parse = b"s1\0".to_vec();
    parse.extend_from_slice(SHORT_SQL.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    g.bench_function("from_parse", |b| b.iter(|| pgrelay::prepared::from_parse(black_box(&parse), |_| 0, 0)));
    g.bench_function("classify", |b| b.iter(|| pgrelay::prepared::classify(black_box(SHORT_SQL))));
    g.finish();
}

/// Accepts connections on `dir/.s.PGSQL.port` and logs each one in; afterwards it only drains what it is sent.
async fn stub_server(listener: UnixListener) {
    let mut pid = 1000;
    while let Ok((mut s, _)) = listener.accept().await {
        pid += 1;
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut startup = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
            if s.read_exact(&mut startup).await.is_err() {
                return;
            }
            let mut reply = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'K', 0, 0, 0, 12];
            reply.extend_from_slice(&i32::to_be_bytes(pid));
            reply.extend_from_slice(&i32::to_be_bytes(pid * 7));
            reply.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
            if s.write_all(&reply).await.is_err() {
                return;
            }
            let mut sink = [0u8; 256];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    }
}

fn stub_pool(dir: &Path, port: u16, pool_size: usize) -> Arc<Pool> {
    let (_tx, route) = pgrelay::routing::fixed(Target { host: dir.display().to_string(), port });
    let settings = PoolSettings {
        pool_mode: PoolMode::Transaction,
        pool_size,
        min_pool_size: 0,
        reserve_pool_size: 0,
        max_db_connections: 0,
    };
    let login = Login { user: "bench".into(), database: "bench".into(), secret: None, scram_keys: None };
    Arc::new(Pool::new(
        PoolKey { database: "bench".into(), user: "bench".into() },
        login,
        settings,
        Arc::new(ArcSwap::from_pointee(Config::default())),
        route,
        false,
        Metrics::new().pool("bench", true),
        Arc::new(DbLimit::default()),
    ))
}

/// Opens `n` connections at once (so the pool holds `n` idle ones afterwards).
async fn fill(pool: &Arc<Pool>, n: usize) {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pool.checkout(None).await.expect("the stub server logs every connection in"));
    }
    for c in held {
        c.release();
    }
}

fn pools(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime builds");
    let dir = tempfile::tempdir().expect("a temp dir for the stub server's socket");
    let port = 5432;
    let listener = {
        let _guard = rt.enter();
        UnixListener::bind(dir.path().join(format!(".s.PGSQL.{port}"))).expect("the stub socket binds")
    };
    rt.spawn(stub_server(listener));
    let mut g = c.benchmark_group("pool");

    // An idle server is waiting: checkout pops it, release pushes it back (the relay's path per transaction).
    let pool = stub_pool(dir.path(), port, 20);
    rt.block_on(fill(&pool, 20));
    g.bench_function("checkout_release_idle", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let conn = pool.checkout(black_box(None)).await.expect("an idle server is there");
                    conn.release();
                }
                start.elapsed()
            })
        })
    });

    // Four tasks share one server: most checkouts queue, and release hands the server to the first waiter.
    let tasks = 4u64;
    let one = stub_pool(dir.path(), port, 1);
    rt.block_on(fill(&one, 1));
    g.bench_function("checkout_release_4_tasks_1_server", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                let per_task = iters.div_ceil(tasks);
                let handles: Vec<_> = (0..tasks)
                    .map(|_| {
                        let p = one.clone();
                        tokio::spawn(async move {
                            for _ in 0..per_task {
                                let conn = p.checkout(None).await.expect("the one server comes back");
                                tokio::task::yield_now().await;
                                conn.release();
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    h.await.expect("a checkout task does not panic");
                }
                // Normalised to `iters` although per_task * tasks may exceed it by up to tasks - 1.
                start.elapsed().mul_f64(iters as f64 / (per_task * tasks) as f64)
            })
        })
    });
    g.finish();
    // Inside the runtime: closing a server connection writes its Terminate through the runtime's reactor.
    rt.block_on(async move {
        drop((pool, one));
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}

criterion_group!(benches, frames, fingerprints, query_stats, prepared, pools);
criterion_main!(benches);
