//! Live config reload against real PostgreSQL servers: pgbench through 20 reloads, pools resized in place, untouched
//! pools keep their connections, broken files rejected, a database moved to another server, `pgrelay check` diffs.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Admin console query through the relay.
fn admin(relay: &Relay, sql: &str) -> String {
    relay.psql("pgrelay", "admin", "pgrelay", sql).unwrap_or_else(|e| panic!("admin {sql}: {e}"))
}

/// The value of one SHOW CONFIG key.
fn config_value(relay: &Relay, key: &str) -> String {
    let out = admin(relay, "SHOW CONFIG");
    out.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.first() == Some(&key)).then(|| f[1].to_string())
        })
        .unwrap_or_default()
}

/// SHOW DATABASES rows as (name, host, port, pool_size).
fn databases(relay: &Relay) -> Vec<(String, String, String, String)> {
    admin(relay, "SHOW DATABASES")
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f[0].into(), f[1].into(), f[2].into(), f[5].into())
        })
        .collect()
}

/// Rewrites the config with `[proxy]` extras and extra tables, the same shape `Relay::start` writes.
fn write_config(relay: &Relay, pg_port: u16, proxy_extra: &str, tail: &str) {
    let cfg = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\nserver_check_delay = \"0\"\n{proxy_extra}\n\n[auth]\ntype = \"scram-sha-256\"\nfile = \"userlist.txt\"\nadmin_users = [\"pgrelay\"]\nstats_users = [\"stats\"]\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n[health]\nenabled = false\n\n[databases.postgres]\nhost = \"127.0.0.1\"\nport = {pg_port}\n\n{tail}\n",
        relay.port, relay.metrics_port
    );
    // Write then rename, as an operator's tooling would: a reload never sees half a file.
    let tmp = relay.dir.path().join("proxy.toml.new");
    std::fs::write(&tmp, cfg).unwrap();
    std::fs::rename(&tmp, relay.config_path()).unwrap();
}

fn count_in_log(relay: &Relay, needle: &str) -> usize {
    relay.log().matches(needle).count()
}

/// Sends SIGHUP and waits until the relay logged the outcome (`needle` one more time).
fn hup_and_wait(relay: &Relay, needle: &str) {
    let before = count_in_log(relay, needle);
    relay.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while count_in_log(relay, needle) <= before {
        assert!(Instant::now() < deadline, "no {needle:?} after SIGHUP:\n{}", relay.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn metric(relay: &Relay, name: &str) -> f64 {
    relay
        .http_get("/metrics")
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn pgbench_failed(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

#[test]
fn pgbench_through_twenty_reloads_with_real_changes() {
    let pg = Pg::start();
    let (out, ok) =
        pgbench(&["-i", "-s", "2", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "postgres"]);
    assert!(ok, "pgbench -i: {out}");
    let relay = Relay::start(&pg, "default_pool_size = 10\nquery_wait_timeout = \"20s\"", "[health]\nenabled = false");
    let port = relay.port.to_string();
    let bench = |args: Vec<String>| {
        std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            pgbench(&a)
        })
    };
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-T", "20", "-j", "2", "-n"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push("postgres".into());
        v
    };
    let select_only = bench(common(&["-S", "-c", "10"]));
    let tpcb = bench(common(&["-c", "4"]));
    std::thread::sleep(Duration::from_millis(1500));

    // 20 reloads, each with a real change: pool size up and down, query_wait_timeout, the slow threshold, a new database.
    let sizes = [4, 16, 2, 12, 6];
    let waits = ["15s", "25s"];
    let slow = ["50ms", "200ms", "75ms"];
    let mut tail = String::new();
    for i in 0..20 {
        let size = sizes[i % sizes.len()];
        let wait = waits[i % waits.len()];
        let threshold = slow[i % slow.len()];
        if i == 7 {
            tail.push_str("[databases.added]\nhost = \"127.0.0.1\"\n");
            tail.push_str(&format!("port = {}\ndbname = \"postgres\"\npool_size = 3\n", pg.port));
        }
        write_config(
            &relay,
            pg.port,
            &format!("default_pool_size = {size}\nquery_wait_timeout = \"{wait}\""),
            &format!("[slow_query]\nthreshold = \"{threshold}\"\n\n{tail}"),
        );
        hup_and_wait(&relay, "config reloaded");
        assert_eq!(config_value(&relay, "proxy.default_pool_size"), size.to_string(), "reload {i}");
        assert_eq!(config_value(&relay, "proxy.query_wait_timeout"), wait, "reload {i}");
        assert_eq!(config_value(&relay, "slow_query.threshold"), threshold, "reload {i}");
        let dbs = databases(&relay);
        let pg_row = dbs.iter().find(|d| d.0 == "postgres").expect("postgres in SHOW DATABASES");
        assert_eq!(pg_row.3, size.to_string(), "SHOW DATABASES pool_size after reload {i}");
        // The pool follows within a second: no more servers than the new size (plus in-flight check-ins).
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let pools = admin(&relay, "SHOW POOLS");
            let row: Vec<String> = pools
                .lines()
                .find(|l| l.starts_with("postgres|postgres|"))
                .map(|l| l.split('|').map(String::from).collect())
                .unwrap_or_default();
            let servers: usize = row.get(6).and_then(|v| v.parse().ok()).unwrap_or(0)
                + row.get(9).and_then(|v| v.parse().ok()).unwrap_or(0);
            if servers <= size {
                break;
            }
            assert!(Instant::now() < deadline, "pool still has {servers} servers > {size} after reload {i}: {pools}");
            std::thread::sleep(Duration::from_millis(20));
        }
        if i >= 7 {
            assert!(dbs.iter().any(|d| d.0 == "added"), "new database missing from SHOW DATABASES: {dbs:?}");
            assert_eq!(relay.psql("postgres", PASSWORD, "added", "select 7").unwrap(), "7");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (out_s, ok_s) = select_only.join().unwrap();
    let (out_b, ok_b) = tpcb.join().unwrap();
    println!("select-only:\n{out_s}\ntpc-b:\n{out_b}");
    assert!(ok_s && ok_b, "pgbench failed:\n{out_s}\n{out_b}");
    for out in [&out_s, &out_b] {
        assert_eq!(pgbench_failed(out), Some(0), "failed transactions:\n{out}");
        assert!(!out.contains("aborted"), "{out}");
    }
    assert_eq!(metric(&relay, "pgrelay_config_reload_failures_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_in_place_and_untouched_pools_keep_their_connections() {
    let pg = Pg::start();
    let other =
        format!("[databases.other]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\npool_size = 1", pg.port);
    let relay = Relay::start(&pg, "default_pool_size = 8", &format!("[health]\nenabled = false\n\n{other}"));
    let other_url = format!("host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=other", relay.port);
    let o = connect(&other_url).await;
    let other_pid: i32 = o.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);

    // Eight transactions at once open eight servers, idle afterwards.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let c = relay.connect().await;
        c.batch_execute("begin; select 1").await.unwrap();
        clients.push(c);
    }
    for c in &clients {
        c.batch_execute("commit").await.unwrap();
    }
    let backends = || {
        pg.psql(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
        )
    };
    assert_eq!(backends(), "9", "8 for postgres + 1 for other");

    // Shrink to 3: the surplus idle servers close at once.
    let tail =
        format!("[databases.other]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\npool_size = 1\n", pg.port);
    write_config(&relay, pg.port, "default_pool_size = 3", &tail);
    hup_and_wait(&relay, "config reloaded");
    let deadline = Instant::now() + Duration::from_secs(2);
    while backends() != "4" {
        assert!(Instant::now() < deadline, "surplus not closed: {} backends", backends());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The untouched pool kept its server.
    let again: i32 = o.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(again, other_pid, "a pool whose settings did not change lost its connection");

    // Shrink to 1, hold it, queue a second client; growing lets the waiter in at once.
    write_config(&relay, pg.port, "default_pool_size = 1\nquery_wait_timeout = \"30s\"", &tail);
    hup_and_wait(&relay, "config reloaded");
    let holder = &clients[0];
    holder.batch_execute("begin; select 1").await.unwrap();
    let waiter = relay.connect().await;
    let t = tokio::spawn(async move {
        let start = Instant::now();
        waiter.query_one("select 1", &[]).await.unwrap();
        start.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!t.is_finished(), "the second client should wait for the only server");
    let reload_at = Instant::now();
    write_config(&relay, pg.port, "default_pool_size = 4\nquery_wait_timeout = \"30s\"", &tail);
    hup_and_wait(&relay, "config reloaded");
    let waited = t.await.unwrap();
    println!("waiter served {:?} after the grow reload (waited {waited:?} in all)", reload_at.elapsed());
    assert!(reload_at.elapsed() < Duration::from_secs(2), "grow did not let the waiter in");
    holder.batch_execute("commit").await.unwrap();
    let again: i32 = o.query_one("select pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(again, other_pid, "untouched pool lost its connection over three reloads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_config_keeps_the_old_one_and_counts_the_failure() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "default_pool_size = 5", "[health]\nenabled = false");
    let c = relay.connect().await;
    let good = std::fs::read_to_string(relay.config_path()).unwrap();

    // 1. Not TOML at all.
    std::fs::write(relay.config_path(), "[proxy\nlisten = ").unwrap();
    hup_and_wait(&relay, "config reload failed");
    assert!(relay.log().contains("proxy.toml"), "the log names the file");
    assert_eq!(c.query_one("select 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_eq!(metric(&relay, "pgrelay_config_reload_failures_total"), 1.0);

    // 2. Valid TOML, invalid value: the key is named, nothing applied.
    write_config(&relay, pg.port, "default_pool_size = 9", "[databases.bad]\nhost = \"127.0.0.1\"\npool_size = 0");
    hup_and_wait(&relay, "config reload failed");
    assert!(relay.log().contains("databases.bad.pool_size"), "{}", relay.log());
    assert_eq!(config_value(&relay, "proxy.default_pool_size"), "5");
    assert_eq!(metric(&relay, "pgrelay_config_reload_failures_total"), 2.0);

    // 3. The admin RELOAD reports the same failure as an error.
    let e = relay.psql("pgrelay", "admin", "pgrelay", "RELOAD").unwrap_err();
    assert!(e.contains("databases.bad.pool_size"), "{e}");
    assert_eq!(metric(&relay, "pgrelay_config_reload_failures_total"), 3.0);

    // 4. A missing userlist is a failure too.
    std::fs::write(relay.config_path(), good.replace("userlist.txt", "missing.txt")).unwrap();
    hup_and_wait(&relay, "config reload failed");
    assert!(relay.log().contains("missing.txt"));
    assert_eq!(c.query_one("select 2::int4", &[]).await.unwrap().get::<_, i32>(0), 2);

    // 5. A change of the listen address is reported, not applied; the rest of the file is.
    let moved = good
        .replace(&format!("127.0.0.1:{}", relay.port), "127.0.0.1:1")
        .replace("default_pool_size = 5", "default_pool_size = 6");
    let newfile = relay.dir.path().join("next.toml");
    std::fs::write(&newfile, &moved).unwrap();
    let running = relay.dir.path().join("running.toml");
    std::fs::write(&running, &good).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["check", "--config"])
        .arg(&newfile)
        .arg("--against")
        .arg(&running)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(out.status.success());
    assert!(text.contains("~ proxy.default_pool_size: 5 -> 6"), "{text}");
    assert!(text.contains("proxy.listen") && text.contains("(needs restart)"), "{text}");
    std::fs::write(relay.config_path(), &moved).unwrap();
    // The admin console's RELOAD says which changed keys wait for a restart (a NOTICE, on psql's stderr).
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &relay.port.to_string(),
            "-U",
            "pgrelay",
            "-d",
            "pgrelay",
            "-c",
            "RELOAD",
        ])
        .env("PGPASSWORD", "admin")
        .output()
        .expect("psql not found: apt-get install -y postgresql-client");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("NOTICE") && stderr.contains("proxy.listen") && stderr.contains("needs a restart"),
        "{stderr}"
    );
    assert!(relay.log().contains("changed key needs a restart"), "{}", relay.log());
    assert_eq!(config_value(&relay, "proxy.default_pool_size"), "6");
    assert_eq!(config_value(&relay, "proxy.listen"), format!("127.0.0.1:{}", relay.port));
    assert_eq!(c.query_one("select 3::int4", &[]).await.unwrap().get::<_, i32>(0), 3);
    assert_eq!(metric(&relay, "pgrelay_config_reload_failures_total"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_moved_to_another_server_drains_and_reconnects() {
    let one = Pg::start();
    let two = Pg::start();
    one.psql("create table marker(name text); insert into marker values ('one')");
    two.psql("create table marker(name text); insert into marker values ('two')");
    let relay = Relay::start(&one, "default_pool_size = 6", "[health]\nenabled = false");

    // Warm the pool: several idle servers on `one`.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let c = relay.connect().await;
        c.batch_execute("begin; select 1").await.unwrap();
        idle.push(c);
    }
    for c in &idle {
        c.batch_execute("commit").await.unwrap();
    }
    // A transaction running across the move.
    let tx = relay.connect().await;
    tx.batch_execute("begin").await.unwrap();
    let before: String = tx.query_one("select name from marker", &[]).await.unwrap().get(0);
    assert_eq!(before, "one");

    // Steady traffic across the move: no query may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..3 {
        let c = relay.connect().await;
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c.query_one("select name from marker", &[]).await.expect("query across the move");
                seen.push(r.get::<_, String>(0));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from_relay = |pg: &Pg| {
        pg.psql(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
        )
        .parse::<usize>()
        .unwrap()
    };
    assert!(from_relay(&one) >= 2);

    write_config(&relay, two.port, "default_pool_size = 6", "");
    hup_and_wait(&relay, "database moved");
    let moved_at = Instant::now();
    // The running transaction finishes where it started.
    let during: String = tx.query_one("select name from marker", &[]).await.unwrap().get(0);
    assert_eq!(during, "one", "a running transaction must stay on its server");
    let port: i32 = tx.query_one("select inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, one.port);
    // Idle connections to the old server close promptly; only the one under the open transaction remains.
    let deadline = Instant::now() + Duration::from_secs(1);
    while from_relay(&one) > 1 {
        assert!(Instant::now() < deadline, "idle servers on the old target not closed: {}", from_relay(&one));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("old target down to the transaction's server {:?} after the reload", moved_at.elapsed());
    tx.batch_execute("commit").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while from_relay(&one) > 0 {
        assert!(Instant::now() < deadline, "the transaction's server was not closed at check-in");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after: String = tx.query_one("select name from marker", &[]).await.unwrap().get(0);
    assert_eq!(after, "two");
    let port: i32 = tx.query_one("select inet_server_port()", &[]).await.unwrap().get(0);
    assert_eq!(port as u16, two.port);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        let seen = l.await.unwrap();
        assert!(seen.len() > 10);
        assert_eq!(seen.last().map(String::as_str), Some("two"));
    }
    let dbs = databases(&relay);
    assert_eq!(dbs[0].2, two.port.to_string(), "SHOW DATABASES shows the new port: {dbs:?}");
}
