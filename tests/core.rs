//! The pooling proxy core against a real PostgreSQL: drivers, pool modes, limits, timeouts, cancel, hygiene.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_tokio_postgres_simple_and_extended() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "");
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", "select 40 + 2").unwrap(), "42");
    let c = relay.connect().await;
    // Simple protocol.
    let rows = c.simple_query("select 'a' as x; select 'b'").await.unwrap();
    assert_eq!(rows.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count(), 2);
    // Extended protocol with parameters, named statements and a pipeline of several Syncs in flight.
    let stmt = c.prepare("select $1::int4 * 2").await.unwrap();
    let vals: Vec<i32> = (0..20).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> = vals.iter().map(|v| [v as _]).collect();
    let futs: Vec<_> = params.iter().map(|p| c.query_one(&stmt, p)).collect();
    let res = join_all(futs.into_iter().map(Box::pin).collect()).await;
    for (i, r) in res.into_iter().enumerate() {
        assert_eq!(r.unwrap().get::<_, i32>(0), i as i32 * 2);
    }
    // Errors inside a transaction, then recovery.
    c.batch_execute("create table t(id int primary key)").await.unwrap();
    c.batch_execute("begin; insert into t values (1)").await.unwrap();
    assert!(c.batch_execute("insert into t values (1)").await.is_err());
    c.batch_execute("rollback").await.unwrap();
    assert_eq!(c.query_one("select count(*) from t", &[]).await.unwrap().get::<_, i64>(0), 0);
    // NOTICE passes through.
    c.batch_execute("do $$ begin raise notice 'hello'; end $$").await.unwrap();
}

/// PostgreSQL over its Unix socket (`host = "/dir"`, what pgBouncer users run on one host): queries, a pipeline of
/// transactions from several clients with exact counts, a COPY IN big enough that writes to the server have to
/// wait for room in the socket buffer, and a COPY OUT of it all back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_its_unix_socket() {
    let pg = Pg::start();
    pg.psql("create table u(id int, pad text)");
    let tail = format!(
        "[databases.unixdb]\nhost = \"{}\"\nport = {}\ndbname = \"postgres\"\npool_size = 4",
        pg.socket_dir().display(),
        pg.port
    );
    let relay = Relay::start(&pg, "", &tail);
    assert_eq!(relay.psql("postgres", PASSWORD, "unixdb", "select 40 + 2").unwrap(), "42");
    let url = relay.url("postgres", PASSWORD).replace("dbname=postgres", "dbname=unixdb");
    let mut tasks = Vec::new();
    for c in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let cl = connect(&url).await;
            for i in 0..50 {
                cl.batch_execute(&format!("begin; insert into u values ({}, 'x'); commit", c * 1000 + i))
                    .await
                    .unwrap();
                let n: i64 =
                    cl.query_one("select count(*) from u where id = $1", &[&(c * 1000 + i)]).await.unwrap().get(0);
                assert_eq!(n, 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // ~24 MB through COPY: the proxy writes to the server faster than it takes them.
    let file = relay.dir.path().join("copy.tsv");
    let pad = "p".repeat(100);
    let body: String = (0..200_000).map(|i| format!("{}\t{pad}\n", 100_000 + i)).collect();
    std::fs::write(&file, body).unwrap();
    relay.psql("postgres", PASSWORD, "unixdb", &format!("\\copy u from '{}'", file.display())).unwrap();
    assert_eq!(pg.psql("select count(*), sum(length(pad)) from u where id >= 100000"), "200000|20000000");
    let out = relay.dir.path().join("out.tsv");
    relay
        .psql(
            "postgres",
            PASSWORD,
            "unixdb",
            &format!("\\copy (select * from u where id >= 100000 order by id) to '{}'", out.display()),
        )
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap().len(), std::fs::read(&file).unwrap().len());
    assert_eq!(pg.psql("select count(*) from u where id < 100000"), "400");
}

/// Client sockets get tcp_keepalive like server sockets (and TCP_NODELAY, which `ss` does not show): the kernel's
/// keepalive timer on pgrelay's side of the client connection runs with the configured idle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_get_tcp_keepalive() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "tcp_keepalive = true\ntcp_keepidle = 77", "");
    let c = relay.connect().await;
    assert_eq!(c.query_one("select 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &format!("( sport = :{} )", relay.port)])
        .output()
        .expect("ss not found: apt-get install -y iproute2");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("keepalive"), "no keepalive timer on pgrelay's client socket: {text}");
    // The timer counts down from tcp_keepidle (77 s: "1min16sec"), not the kernel default (7200 s).
    assert!(text.contains("keepalive,1min"), "keepalive timer not from tcp_keepidle: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_exact_counters_in_transaction_mode() {
    let pg = Pg::start();
    pg.psql("create table counters(id int primary key, n int not null)");
    pg.psql("insert into counters select g, 0 from generate_series(0, 49) g");
    let relay = Relay::start(&pg, "default_pool_size = 4", "");
    let url = relay.url("postgres", PASSWORD);
    let mut tasks = Vec::new();
    for id in 0..50i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            for _ in 0..200 {
                // A real multi-statement transaction: the server must stay with this client until COMMIT.
                c.batch_execute(&format!(
                    "begin; update counters set n = n + 1 where id = {id}; select pg_advisory_xact_lock(1); commit"
                ))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sum = pg.psql("select sum(n), min(n), max(n) from counters");
    assert_eq!(sum, "10000|200|200");
    // Never more than pool_size servers for 50 clients.
    let n: i32 = pg
        .psql("select count(*) from pg_stat_activity where backend_type = 'client backend' and application_name not in ('psql', 'pgrelay-health')")
        .parse()
        .unwrap();
    assert!(n <= 4, "{n} server connections for a pool of 4");
}

#[test]
fn pgbench_simple_and_extended_through_relay() {
    let pg = Pg::start();
    let port = pg.port.to_string();
    let (out, ok) = pgbench(&["-i", "-s", "1", "-h", "127.0.0.1", "-p", &port, "-U", "postgres", "postgres"]);
    assert!(ok, "{out}");
    let relay = Relay::start(&pg, "default_pool_size = 5", "");
    let rport = relay.port.to_string();
    for mode in ["simple", "extended"] {
        let (out, ok) = pgbench(&[
            "-h",
            "127.0.0.1",
            "-p",
            &rport,
            "-U",
            "postgres",
            "-M",
            mode,
            "-c",
            "10",
            "-j",
            "2",
            "-t",
            "200",
            "postgres",
        ]);
        assert!(ok, "pgbench -M {mode} failed: {out}");
        assert!(out.contains("number of transactions actually processed: 2000/2000"), "{out}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    // TPC-B keeps the books balanced (pgbench truncates history before each run, so compare the balances), and the
    // last run's history has exactly its 2000 rows.
    let sums = pg.psql(
        "select (select sum(bbalance) from pgbench_branches) = (select sum(abalance) from pgbench_accounts), \
         (select sum(tbalance) from pgbench_tellers) = (select sum(abalance) from pgbench_accounts), \
         (select count(*) from pgbench_history)",
    );
    assert_eq!(sums, "t|t|2000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_leaves_no_row_and_no_dirty_server() {
    let pg = Pg::start();
    pg.psql("create table k(id int)");
    let relay = Relay::start(&pg, "default_pool_size = 1", "");
    {
        let c = relay.connect().await;
        c.batch_execute("begin; insert into k values (1)").await.unwrap();
        // The client vanishes mid-transaction (socket closed without COMMIT or Terminate).
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The single server slot is usable again, outside any transaction, and the row is gone.
    let c = relay.connect().await;
    let row = c.query_one("select count(*), txid_current_if_assigned() is null from k", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert!(row.get::<_, bool>(1), "new client landed inside an old transaction");
    assert_eq!(pg.psql("select count(*) from k"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_recovers_after_postgres_restart() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "default_pool_size = 4\nserver_login_retry = \"100ms\"", "");
    let url = relay.url("postgres", PASSWORD);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok_after = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, stop, ok_after) = (url.clone(), stop.clone(), ok_after.clone());
        // Every client is logged in before the restart: this test is about the pool, not about logins.
        let mut c = connect(&url).await;
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.query_one("select 1", &[]).await {
                    Ok(_) => {
                        ok_after.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if c.is_closed() {
                            if let Ok(n) = try_connect(&url).await {
                                c = n;
                            }
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| pg.restart());
    let before = ok_after.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = before;
    while Instant::now() < deadline && after <= before + 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = ok_after.load(std::sync::atomic::Ordering::Relaxed);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(after > before + 100, "queries did not resume after restart: {before} -> {after}");
    // A brand-new client works too.
    let c = relay.connect().await;
    c.query_one("select 1", &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_with_clear_error() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "max_client_conn = 3", "");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(relay.connect().await);
    }
    let Err(e) = try_connect(&relay.url("postgres", PASSWORD)).await else { panic!("4th client must be refused") };
    assert!(msg(&e).contains("max_client_conn"), "{e}");
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"));
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.connect().await.query_one("select 1", &[]).await.unwrap();
}

/// A relay with a pool of one server (plus `[proxy]` settings `extra`), and a client holding that server in an open
/// transaction, so the next client has to wait.
async fn pool_of_one_held(pg: &Pg, extra: &str) -> (Relay, tokio_postgres::Client) {
    let relay = Relay::start(pg, &format!("default_pool_size = 1\n{extra}"), "");
    let a = relay.connect().await;
    a.batch_execute("begin; select 1").await.unwrap();
    (relay, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_wait_timeout_gives_an_error_not_a_hang() {
    let pg = Pg::start();
    let (relay, a) = pool_of_one_held(&pg, "query_wait_timeout = \"500ms\"").await;
    let b = relay.connect().await;
    let t = Instant::now();
    let e = b.query_one("select 1", &[]).await.expect_err("b must time out waiting");
    let waited = t.elapsed();
    assert!(msg(&e).contains("query_wait_timeout"), "{e}");
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "{waited:?}");
    // b's session survives the error, and gets a server once a is done.
    a.batch_execute("commit").await.unwrap();
    assert_eq!(b.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_serves_a_client_after_reserve_pool_timeout() {
    let pg = Pg::start();
    let (relay, a) =
        pool_of_one_held(&pg, "reserve_pool_size = 1\nreserve_pool_timeout = \"300ms\"\nquery_wait_timeout = \"10s\"")
            .await;
    let b = relay.connect().await;
    let t = Instant::now();
    assert_eq!(b.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2);
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(5), "{waited:?}");
    a.batch_execute("commit").await.unwrap();
    assert_eq!(b.query_one("select 3", &[]).await.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_clients_that_hang_up_do_not_cost_the_pool_its_server() {
    let pg = Pg::start();
    let (relay, a) = pool_of_one_held(&pg, "query_wait_timeout = \"10s\"").await;
    let mut quitters = Vec::new();
    for _ in 0..3 {
        let c = relay.connect().await;
        quitters.push(tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_millis(200), c.query_one("select 2", &[])).await;
            assert!(r.is_err(), "the pool's only server is busy, so the query must still be queued");
        }));
    }
    for q in quitters {
        q.await.unwrap();
    }
    a.batch_execute("commit").await.unwrap();
    drop(a);
    // The server went back to the pool (or to a queued client that then left): later clients get it.
    for i in 0..3 {
        let d = relay.connect().await;
        let r = tokio::time::timeout(Duration::from_secs(5), d.query_one("select $1::int", &[&i])).await;
        assert_eq!(r.expect("served within 5s").unwrap().get::<_, i32>(0), i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_on_the_server() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "query_timeout = \"300ms\"", "");
    let c = relay.connect().await;
    let t = Instant::now();
    let e = c.batch_execute("select pg_sleep(10)").await.expect_err("must be cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The connection is still good.
    assert_eq!(c.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_right_server() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "default_pool_size = 4", "");
    let c = relay.connect().await;
    let other = relay.connect().await;
    let token = c.cancel_token();
    let h = tokio::spawn(async move { c.batch_execute("select pg_sleep(10)").await });
    // The other client keeps running while the first one sleeps.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t2 = tokio::spawn(async move { other.batch_execute("select pg_sleep(1)").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = h.await.unwrap().expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    t2.await.unwrap().expect("the other client's query must not be cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_database_are_refused() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "");
    let e = try_connect(&relay.url("postgres", "wrong")).await.err().unwrap();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let e = try_connect(&relay.url("nobody", "x")).await.err().unwrap();
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let url = format!("host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=nope", relay.port);
    let e = try_connect(&url).await.err().unwrap();
    assert_eq!(sqlstate(&e).as_deref(), Some("3D000"), "{e}");
    assert!(msg(&e).contains("nope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_clients_and_trust() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "");
    // Switch the relay to md5 via a reload: the userlist holds plaintext, so md5 works.
    let cfg = std::fs::read_to_string(relay.config_path()).unwrap().replace("scram-sha-256", "md5");
    std::fs::write(relay.config_path(), cfg).unwrap();
    relay.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", "select 1").unwrap(), "1");
    assert!(relay
        .psql("postgres", "bad", "postgres", "select 1")
        .unwrap_err()
        .contains("password authentication failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_follow_the_client_and_do_not_leak() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "default_pool_size = 1", "");
    let a = connect(&format!("{} application_name=alpha options=''", relay.url("postgres", PASSWORD))).await;
    let b = connect(&format!("{} application_name=beta", relay.url("postgres", PASSWORD))).await;
    let plain = relay.connect().await;
    for _ in 0..5 {
        let av: String = a.query_one("select current_setting('application_name')", &[]).await.unwrap().get(0);
        let bv: String = b.query_one("select current_setting('application_name')", &[]).await.unwrap().get(0);
        let pv: String = plain.query_one("select current_setting('application_name')", &[]).await.unwrap().get(0);
        assert_eq!((av.as_str(), bv.as_str(), pv.as_str()), ("alpha", "beta", ""));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_statement_modes() {
    let pg = Pg::start();
    let relay = Relay::start(
        &pg,
        "default_pool_size = 2",
        "[databases.sess]\nhost = \"127.0.0.1\"\nport = PGPORT\ndbname = \"postgres\"\npool_mode = \"session\"\n\n[databases.stmt]\nhost = \"127.0.0.1\"\nport = PGPORT\ndbname = \"postgres\"\npool_mode = \"statement\"\n"
            .replace("PGPORT", &pg.port.to_string())
            .as_str(),
    );
    let sess =
        connect(&format!("host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=sess", relay.port)).await;
    sess.batch_execute("set work_mem = '7MB'").await.unwrap();
    let v: String = sess.query_one("show work_mem", &[]).await.unwrap().get(0);
    assert_eq!(v, "7MB");
    drop(sess);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // After the session ends, DISCARD ALL ran: the next session starts clean.
    let sess =
        connect(&format!("host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=sess", relay.port)).await;
    let v: String = sess.query_one("show work_mem", &[]).await.unwrap().get(0);
    assert_eq!(v, "4MB");

    let stmt =
        connect(&format!("host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=stmt", relay.port)).await;
    assert_eq!(stmt.query_one("select 5", &[]).await.unwrap().get::<_, i32>(0), 5);
    let e = stmt.batch_execute("begin").await.err();
    let e = match e {
        Some(e) => e,
        None => stmt.query_one("select 1", &[]).await.expect_err("connection closed after refusing BEGIN"),
    };
    assert!(msg(&e).contains("statement pooling") || e.is_closed(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_large_rows_and_large_queries() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "");
    let c = relay.connect().await;
    c.batch_execute("create table big(id int, v text)").await.unwrap();
    // A 20 MB value through the relay both ways (streams through without being buffered whole).
    let big = "x".repeat(20 << 20);
    c.execute("insert into big values (1, $1)", &[&big]).await.unwrap();
    let got: String = c.query_one("select v from big where id = 1", &[]).await.unwrap().get(0);
    assert_eq!(got.len(), big.len());
    // A 1 MB query text.
    let list: Vec<String> = (0..150_000).map(|i| i.to_string()).collect();
    let q = format!("select count(*) from (values ({})) v", list.join("),("));
    assert!(q.len() > 1_000_000);
    assert_eq!(c.query_one(q.as_str(), &[]).await.unwrap().get::<_, i64>(0), 150_000);
    // COPY in and out through psql.
    let dir = relay.dir.path().join("in.csv");
    std::fs::write(&dir, (1..=5000).map(|i| format!("{i},row{i}\n")).collect::<String>()).unwrap();
    let st = std::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &relay.port.to_string(), "-U", "postgres", "-d", "postgres"])
        .args(["-c", "create table cp2(a int, b text)", "-c"])
        .arg(format!("\\copy cp2 from '{}' csv", dir.display()))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let out = relay.psql("postgres", PASSWORD, "postgres", "copy (select sum(a) from cp2) to stdout").unwrap();
    assert_eq!(out, (1..=5000).sum::<i64>().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_console_from_psql() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "");
    let c = relay.connect().await;
    c.query_one("select 1", &[]).await.unwrap();
    let pools = relay.psql("pgrelay", "admin", "pgrelay", "show pools").unwrap();
    assert!(pools.contains("postgres|postgres|"), "{pools}");
    let ver = relay.psql("pgrelay", "admin", "pgbouncer", "show version").unwrap();
    assert!(ver.starts_with("pgrelay"), "{ver}");
    for cmd in ["show stats", "show clients", "show servers", "show databases", "show config", "show lists"] {
        relay.psql("pgrelay", "admin", "pgrelay", cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }
    let stats = relay.psql("stats", "stats", "pgrelay", "show stats").unwrap();
    assert!(stats.starts_with("postgres|"), "{stats}");
    let e = relay.psql("stats", "stats", "pgrelay", "pause").unwrap_err();
    assert!(e.contains("admin access"), "{e}");
    let e = relay.psql("postgres", PASSWORD, "pgrelay", "show pools").unwrap_err();
    assert!(e.contains("access denied"), "{e}");
    let metrics = relay.http_get("/metrics");
    assert!(metrics.contains("db_query_duration_seconds_bucket"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_transactions() {
    let pg = Pg::start();
    pg.psql("create table d(id int)");
    let mut relay = Relay::start(&pg, "shutdown_timeout = \"10s\"", "");
    let c = relay.connect().await;
    let idle = relay.connect().await;
    c.batch_execute("begin; insert into d values (1)").await.unwrap();
    relay.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New clients are refused, the running transaction can still commit.
    assert!(try_connect(&relay.url("postgres", PASSWORD)).await.is_err());
    c.batch_execute("insert into d values (2); commit").await.unwrap();
    assert!(relay.wait_exit(Duration::from_secs(5)), "pgrelay did not exit after the drain");
    assert_eq!(pg.psql("select count(*) from d"), "2");
    assert!(idle.query_one("select 1", &[]).await.is_err());
}

/// Raw protocol: version negotiation, SSL/GSS refusal, garbage.
#[test]
fn startup_packet_handling() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "");
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    // SSLRequest and GSSENCRequest are answered 'N'.
    for code in [80877103u32, 80877104] {
        let mut s = connect();
        s.write_all(&8u32.to_be_bytes()).unwrap();
        s.write_all(&code.to_be_bytes()).unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b[0], b'N');
    }
    // Protocol 3.2 asked: NegotiateProtocolVersion comes before the auth request.
    let mut s = connect();
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&0u32.to_be_bytes());
    pkt.extend_from_slice(&((3u32 << 16) | 2).to_be_bytes());
    for kv in ["user", "postgres", "database", "postgres", "_pq_.foo", "1", ""] {
        pkt.extend_from_slice(kv.as_bytes());
        pkt.push(0);
    }
    let len = pkt.len() as u32;
    pkt[..4].copy_from_slice(&len.to_be_bytes());
    s.write_all(&pkt).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], b'v', "expected NegotiateProtocolVersion");
    // Protocol 4.0: a clear error.
    let mut s = connect();
    s.write_all(&8u32.to_be_bytes()).unwrap();
    s.write_all(&(4u32 << 16).to_be_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(buf.first(), Some(&b'E'));
    assert!(String::from_utf8_lossy(&buf).contains("unsupported frontend protocol"));
    // A silly length: error and close, and the relay still serves others.
    let mut s = connect();
    s.write_all(&0x7fff_ffffu32.to_be_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(buf.first(), Some(&b'E'));
    assert_eq!(relay.psql("postgres", PASSWORD, "postgres", "select 1").unwrap(), "1");
}

/// CPU time (user + system, in clock ticks of 10 ms) a process has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// `busy_poll`: queries relay as usual while the runtime polls, and once traffic stops the poller parks (an idle
/// relay does not keep a core busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_relays_and_goes_quiet_when_idle() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "busy_poll = \"5ms\"", "");
    let c = relay.connect().await;
    let stmt = c.prepare("select $1::int8 + 1").await.unwrap();
    for i in 0..500i64 {
        assert_eq!(c.query_one(&stmt, &[&i]).await.unwrap().get::<_, i64>(0), i + 1);
    }
    assert!(relay.log().contains("busy polling on"), "{}", relay.log());
    // Idle: within a window of 5 ms the poller parks; a poller that kept spinning would use the whole second.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = relay.child.as_ref().unwrap().id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(used < 30, "an idle relay with busy_poll used {used} ticks of CPU in 1 s");
    // And it wakes up again for the next query.
    assert_eq!(c.query_one(&stmt, &[&41i64]).await.unwrap().get::<_, i64>(0), 42);
}

/// `max_db_connections` with two users: the second user's query gets the database's only server connection by
/// closing the first user's idle one (as pgBouncer does), instead of waiting for its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_closes_another_users_idle_server_to_make_room() {
    let pg = Pg::start();
    pg.psql("create role stats login password 'stats'");
    // No health collector: its own connection to the database would show in the count below.
    let relay = Relay::start(&pg, "max_db_connections = 1\nquery_wait_timeout = \"5s\"", "[health]\nenabled = false");
    let a = relay.connect().await;
    assert_eq!(a.query_one("select 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    // a's connection is idle in the pool of (postgres, postgres); a second user needs one.
    let b = connect(&relay.url("stats", "stats")).await;
    let t0 = Instant::now();
    let who: String = b.query_one("select current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "stats");
    assert!(t0.elapsed() < Duration::from_secs(3), "the second user waited {:?}", t0.elapsed());
    // One server connection for the database the whole time, and the first user can take it back in turn.
    let n: i64 = b
        .query_one(
            "select count(*) from pg_stat_activity where datname = 'postgres' and backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "max_db_connections = 1 was exceeded");
    assert_eq!(a.query_one("select 2", &[]).await.unwrap().get::<_, i32>(0), 2);
}
