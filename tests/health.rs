//! The DB health collector against a real PostgreSQL: its numbers match the pg_stat views read
//! directly, its gauges are exported, it reconnects, and its score and warnings follow the thresholds.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{Pg, PASSWORD, USERLIST};
use pgrelay::config::Config;
use pgrelay::health::{self, assess, HealthMonitor, HealthSnapshot, ScoreInputs};
use pgrelay::state::Shared;

const DB: &str = "postgres";

/// Shared state for a config whose database `postgres` points at `pg`; the collector logs in as
/// `postgres` with the secret from the userlist.
fn shared_for(pg: &Pg) -> (tempfile::TempDir, Arc<Shared>) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("userlist.txt"), USERLIST).unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[auth]\ntype = \"scram-sha-256\"\nfile = \"userlist.txt\"\n\n[metrics]\nlisten = \"\"\n\n[databases.{DB}]\nhost = \"127.0.0.1\"\nport = {}\n",
        pg.port
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).expect("test config loads");
    let shared = pgrelay::app::build(cfg, path).expect("build shared state");
    (dir, shared)
}

fn start(shared: &Arc<Shared>) -> (Arc<HealthMonitor>, tokio::task::JoinHandle<()>) {
    let monitor = HealthMonitor::new();
    let task =
        tokio::spawn(health::run(shared.clone(), monitor.clone(), Duration::from_millis(200), "postgres".into()));
    (monitor, task)
}

/// The first snapshot taken after `after` that satisfies `ok`.
async fn snapshot_after(
    monitor: &HealthMonitor,
    after: SystemTime,
    ok: impl Fn(&HealthSnapshot) -> bool,
) -> HealthSnapshot {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = monitor.get(DB) {
            if s.at > after && ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "no matching health snapshot in 30 s; last: {s:#?}");
        }
        assert!(Instant::now() < deadline, "no health snapshot in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// psql's unaligned output row split into fields.
fn fields(row: &str) -> Vec<i64> {
    row.split('|').map(|f| f.trim().parse().unwrap_or_else(|_| panic!("number in {row:?}"))).collect()
}

/// psql directly against `pg`, without stalling the runtime the collector runs on.
async fn psql(pg: &Pg, sql: &str) -> String {
    tokio::task::block_in_place(|| pg.psql(sql))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_match_pg_stat_views() {
    let pg = Pg::start();
    let (_dir, shared) = shared_for(&pg);
    let (monitor, task) = start(&shared);

    // A sort that spills (temp file), then a warm-up so the hit ratio is dominated by cached reads.
    psql(&pg, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g").await;
    psql(&pg, "SET work_mem = '64kB'; SELECT count(*) FROM (SELECT v FROM t ORDER BY v) s").await;
    for _ in 0..10 {
        psql(&pg, "SELECT count(*) FROM t WHERE v LIKE 'a%'").await;
    }
    // psql backends flush their statistics as they exit; give the last one a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let max_connections: i64 = psql(&pg, "SHOW max_connections").await.parse().unwrap();
    let backends: i64 =
        psql(&pg, "SELECT sum(numbackends) FROM pg_stat_database WHERE datid <> 0").await.parse().unwrap();
    let direct = fields(
        &psql(
            &pg,
            "SELECT blks_hit, blks_read, xact_commit, xact_rollback, deadlocks, temp_files, temp_bytes \
             FROM pg_stat_database WHERE datname = 'postgres'",
        )
        .await,
    );
    let read_at = SystemTime::now();
    let (hit, read) = (direct[0], direct[1]);
    assert!(direct[5] >= 1, "the spilling sort made a temp file: {direct:?}");

    let s = snapshot_after(&monitor, read_at, |s| s.error.is_none()).await;
    assert_eq!(s.max_connections, max_connections);
    assert_eq!(s.max_connections, 300, "the harness sets max_connections = 300");
    assert!((s.connections - backends).abs() <= 2, "connections {} vs sum(numbackends) {backends}", s.connections);
    let util = 100.0 * s.connections as f64 / s.max_connections as f64;
    assert!((s.connection_utilization_percent - util).abs() < 1e-9);
    let direct_ratio = 100.0 * hit as f64 / (hit + read) as f64;
    assert!(
        (s.buffer_hit_ratio_percent - direct_ratio).abs() <= 1.0,
        "hit ratio {} vs direct {direct_ratio} ({hit} hits, {read} reads)",
        s.buffer_hit_ratio_percent
    );
    // Counters only grow, and only by the collector's own few statements since the direct read.
    assert!(
        s.xact_commit >= direct[2] && s.xact_commit <= direct[2] + 100,
        "xact_commit {} vs direct {}",
        s.xact_commit,
        direct[2]
    );
    assert!(s.xact_rollback >= direct[3] && s.xact_rollback <= direct[3] + 5);
    assert_eq!(s.deadlocks, direct[4]);
    assert_eq!(s.temp_files, direct[5]);
    assert_eq!(s.temp_bytes, direct[6]);
    assert!(!s.in_recovery);
    assert!(s.replication.is_empty(), "no replicas: {:?}", s.replication);
    assert_eq!((s.max_lag_bytes, s.max_lag_seconds), (0.0, 0.0));
    assert_eq!(s.mean_query_ms, None);
    assert!(s.transactions_per_second >= 0.0 && s.transactions_per_second.is_finite());

    // Score and warnings are the pure formula applied to the snapshot's own numbers (at most the
    // deadlock/temp-file growth penalties lower).
    let (score, warnings) = assess(&ScoreInputs {
        connection_utilization_percent: s.connection_utilization_percent,
        buffer_hit_ratio_percent: s.buffer_hit_ratio_percent,
        max_lag_bytes: s.max_lag_bytes,
        mean_query_ms: s.mean_query_ms,
        new_deadlocks: 0,
        new_temp_files: 0,
    });
    assert_eq!(s.warnings, warnings);
    assert!(s.score <= score && s.score >= score - 15.0, "{} vs {score}", s.score);

    // A workload between two samples shows up as transactions per second.
    let before = SystemTime::now();
    for _ in 0..30 {
        psql(&pg, "SELECT 1").await;
    }
    let busy = snapshot_after(&monitor, before, |s| s.transactions_per_second > 0.0).await;
    assert!(busy.transactions_per_second > 0.0);

    // One dedicated connection, reused across samples, with its name and statement_timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sessions = psql(&pg, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgrelay-health'").await;
    assert_eq!(sessions, "1", "one collector connection");

    // Gauges, registered under the old monitor's names with a database label.
    let text = shared.metrics.render();
    for name in [
        "db_buffer_hit_ratio_percent",
        "db_connection_utilization_percent",
        "db_replication_lag_bytes",
        "db_replication_lag_seconds",
        "db_performance_score",
        "db_queries_per_second",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{database=\"{DB}\"}} ")))
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(v.is_finite(), "{line}");
    }
    let g = |name: &str| -> f64 {
        let prefix = format!("{name}{{database=\"{DB}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap()
    };
    assert!((g("db_buffer_hit_ratio_percent") - direct_ratio).abs() <= 1.0);
    assert!(g("db_performance_score") > 0.0);

    // The caller's mean query time feeds the thresholds: 250 ms is above the 100 ms warning.
    monitor.set_mean_query_ms(DB, Some(250.0));
    let t = SystemTime::now();
    let s = snapshot_after(&monitor, t, |s| s.mean_query_ms.is_some()).await;
    let w = s.warnings.iter().find(|w| w.metric == "mean_query_ms").expect("a mean_query_ms warning");
    assert_eq!((w.level, w.threshold, w.value), ("warning", 100.0, 250.0));
    assert!(s.score <= 90.0, "score {}", s.score);
    let json = serde_json::to_value(monitor.snapshot()).unwrap();
    assert_eq!(json[0]["database"], DB);
    assert_eq!(json[0]["warnings"][0]["level"], "warning");
    assert!(json[0]["at"].as_str().is_some_and(|t| t.ends_with('Z')));

    shared.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("collector stops on shutdown").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_errors_and_reconnects_after_a_restart() {
    let pg = Pg::start();
    let (_dir, shared) = shared_for(&pg);
    let (monitor, task) = start(&shared);
    let s = snapshot_after(&monitor, SystemTime::UNIX_EPOCH, |s| s.error.is_none()).await;
    assert_eq!(s.max_connections, 300);

    tokio::task::block_in_place(|| pg.stop());
    let t = SystemTime::now();
    let down = snapshot_after(&monitor, t, |s| s.error.is_some()).await;
    assert_eq!(down.score, 0.0);
    let text = shared.metrics.render();
    assert!(
        text.lines().any(|l| l.starts_with(&format!("pgrelay_health_collector_errors_total{{database=\"{DB}\"}} "))),
        "error counter exported:\n{text}"
    );
    assert!(text.contains(&format!("db_performance_score{{database=\"{DB}\"}} 0")));

    tokio::task::block_in_place(|| pg.restart());
    let t = SystemTime::now();
    let up = snapshot_after(&monitor, t, |s| s.error.is_none()).await;
    assert_eq!(up.max_connections, 300);
    assert!(up.score > 0.0);

    shared.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("collector stops on shutdown").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_from_pg_stat_replication() {
    let pg = Pg::start();
    let (_dir, shared) = shared_for(&pg);
    let (monitor, task) = start(&shared);
    // pg_receivewal is a real physical replication client: it appears in pg_stat_replication
    // (with no replay position, so its lag columns are NULL, which the collector must tolerate).
    let wal = tempfile::tempdir().unwrap();
    let mut child = Command::new("pg_receivewal")
        .arg("-D")
        .arg(wal.path())
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-w"])
        .env("PGPASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pg_receivewal (postgresql-client)");
    let s = snapshot_after(&monitor, SystemTime::UNIX_EPOCH, |s| s.replication.iter().any(|r| r.state == "streaming"))
        .await;
    let direct = psql(&pg, "SELECT application_name, host(client_addr), sync_state FROM pg_stat_replication").await;
    let _ = child.kill();
    let _ = child.wait();
    let r = &s.replication[0];
    assert_eq!(s.replication.len(), 1, "{:?}", s.replication);
    assert_eq!(format!("{}|{}|{}", r.application_name, r.client_addr.as_deref().unwrap_or(""), r.sync_state), direct);
    assert_eq!(r.application_name, "pg_receivewal");
    assert!(r.lag_bytes >= 0.0 && r.lag_bytes.is_finite());
    assert!(r.lag_seconds >= 0.0 && r.lag_seconds.is_finite());
    assert_eq!(s.max_lag_bytes, r.lag_bytes);

    shared.shutdown.cancel();
    task.await.unwrap();
}

/// A streaming standby of `primary` (pg_basebackup -R), stopped on drop.
struct Standby {
    port: u16,
    dir: tempfile::TempDir,
}

extern "C" {
    fn geteuid() -> u32;
}

/// A PostgreSQL program, run as `postgres` when we are root (the server refuses to run as root).
fn pg_cmd(bin: &str) -> Command {
    let path = common::pg_bin().join(bin);
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } == 0 {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Standby {
    fn start(primary: &Pg) -> Standby {
        let dir = tempfile::Builder::new().prefix("pgrelay-standby-").tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { geteuid() } == 0 {
            let st = Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(st.success());
        }
        let data = dir.path().join("data");
        let out = pg_cmd("pg_basebackup")
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "--checkpoint=fast", "-w"])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .expect("pg_basebackup");
        assert!(out.status.success(), "pg_basebackup: {}", String::from_utf8_lossy(&out.stderr));
        let port = common::free_port();
        let out = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("pg.log"))
            .arg("-o")
            .arg(format!("-p {port} -k {}", dir.path().display()))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "standby start: {}",
            std::fs::read_to_string(dir.path().join("pg.log")).unwrap_or_default()
        );
        Standby { port, dir }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_and_standby() {
    let pg = Pg::start();
    let standby = tokio::task::block_in_place(|| Standby::start(&pg));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\n[auth]\ntype = \"trust\"\n\n[metrics]\nlisten = \"\"\n\n\
         [databases.primary]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\nuser = \"postgres\"\npassword = \"{PASSWORD}\"\n\n\
         [databases.standby]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\nuser = \"postgres\"\npassword = \"{PASSWORD}\"\n",
        pg.port, standby.port
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).unwrap();
    let shared = pgrelay::app::build(Config::load(&path).unwrap(), path).unwrap();
    // The login user is not in any userlist: the entries' user/password must be used.
    let monitor = HealthMonitor::new();
    let task = tokio::spawn(health::run(shared.clone(), monitor.clone(), Duration::from_millis(200), "nobody".into()));
    // Write some WAL so the replica has something to replay.
    psql(&pg, "CREATE TABLE w AS SELECT g FROM generate_series(1, 50000) g").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (p, s) = loop {
        let all = monitor.snapshot();
        let get = |n: &str| all.iter().find(|s| s.database == n).cloned();
        if let (Some(p), Some(s)) = (get("primary"), get("standby")) {
            if p.replication.iter().any(|r| r.state == "streaming") && s.error.is_none() {
                break (p, s);
            }
        }
        assert!(Instant::now() < deadline, "no primary+standby snapshots: {all:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(p.error, None);
    assert!(!p.in_recovery);
    assert_eq!(p.replication.len(), 1, "{:?}", p.replication);
    let r = &p.replication[0];
    assert_eq!((r.sync_state.as_str(), r.client_addr.as_deref()), ("async", Some("127.0.0.1")));
    let direct = psql(&pg, "SELECT application_name, state FROM pg_stat_replication").await;
    assert_eq!(format!("{}|{}", r.application_name, r.state), direct);
    assert!(r.lag_bytes >= 0.0 && r.lag_bytes < 64.0 * 1024.0 * 1024.0, "{r:?}");
    assert!(r.lag_seconds >= 0.0 && r.lag_seconds < 10.0, "{r:?}");
    assert_eq!((p.max_lag_bytes, p.max_lag_seconds), (r.lag_bytes, r.lag_seconds));
    // The standby is sampled without errors (no pg_current_wal_lsn() there) and says it is one.
    assert!(s.in_recovery);
    assert!(s.replication.is_empty());
    assert_eq!(s.max_connections, 300);
    // Once replay catches up the lag reads (near) zero on the primary.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = monitor.get("primary").unwrap();
        if p.replication.len() == 1 && p.max_lag_bytes == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "lag never reached 0: {:?}", p.replication);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shared.shutdown.cancel();
    task.await.unwrap();
}

#[test]
fn score_and_warnings_follow_the_thresholds() {
    let healthy = ScoreInputs {
        connection_utilization_percent: 10.0,
        buffer_hit_ratio_percent: 99.5,
        max_lag_bytes: 0.0,
        mean_query_ms: Some(2.0),
        new_deadlocks: 0,
        new_temp_files: 0,
    };
    assert_eq!(assess(&healthy), (100.0, vec![]));

    // 95 % utilisation: critical, and the score drops by the critical penalty.
    let (score, w) = assess(&ScoreInputs { connection_utilization_percent: 95.0, ..healthy.clone() });
    assert_eq!(w.len(), 1);
    assert_eq!(
        (w[0].metric, w[0].level, w[0].value, w[0].threshold),
        ("connection_utilization_percent", "critical", 95.0, 90.0)
    );
    assert_eq!(score, 70.0);
    // 75 %: warning only; exactly 70 % is not above the threshold.
    let (score, w) = assess(&ScoreInputs { connection_utilization_percent: 75.0, ..healthy.clone() });
    assert_eq!((w[0].level, w[0].threshold, score), ("warning", 70.0, 85.0));
    let at_threshold = ScoreInputs { connection_utilization_percent: 70.0, ..healthy.clone() };
    assert_eq!(assess(&at_threshold), (100.0, vec![]));

    // Buffer hit: lower is worse.
    let hit = |v: f64| assess(&ScoreInputs { buffer_hit_ratio_percent: v, ..healthy.clone() });
    assert_eq!(hit(85.0).0, 90.0);
    assert_eq!(hit(85.0).1[0].level, "warning");
    assert_eq!(hit(70.0).0, 75.0);
    assert_eq!(hit(70.0).1[0].level, "critical");

    // Replication lag in MiB: 10 warning, 100 critical.
    let lag = |mib: f64| assess(&ScoreInputs { max_lag_bytes: mib * 1024.0 * 1024.0, ..healthy.clone() });
    assert!(lag(9.0).1.is_empty());
    assert_eq!(lag(50.0).1[0].level, "warning");
    assert_eq!(lag(150.0).1[0].level, "critical");
    assert_eq!(lag(150.0).0, 75.0);

    // Query time: 100 / 1000 ms, and ignored when unknown.
    let q = |ms: Option<f64>| assess(&ScoreInputs { mean_query_ms: ms, ..healthy.clone() });
    assert_eq!(q(Some(150.0)).0, 90.0);
    assert_eq!(q(Some(1500.0)).1[0].level, "critical");
    assert_eq!(q(None), (100.0, vec![]));

    // Growth of deadlocks and temp files costs points but raises no threshold warning.
    let (score, w) = assess(&ScoreInputs { new_deadlocks: 2, new_temp_files: 1, ..healthy.clone() });
    assert_eq!((score, w.len()), (85.0, 0));

    // Everything wrong at once clamps to 0; garbage inputs never panic or produce NaN.
    let (score, w) = assess(&ScoreInputs {
        connection_utilization_percent: 99.0,
        buffer_hit_ratio_percent: 10.0,
        max_lag_bytes: 1e12,
        mean_query_ms: Some(5000.0),
        new_deadlocks: 1,
        new_temp_files: 1,
    });
    assert_eq!((score, w.len()), (0.0, 4));
    assert!(w.iter().all(|w| w.level == "critical"));
    let (score, w) = assess(&ScoreInputs {
        connection_utilization_percent: f64::NAN,
        buffer_hit_ratio_percent: f64::INFINITY,
        max_lag_bytes: f64::NEG_INFINITY,
        mean_query_ms: Some(f64::NAN),
        new_deadlocks: i64::MIN,
        new_temp_files: i64::MAX,
    });
    assert!((0.0..=100.0).contains(&score) && w.is_empty());
}
