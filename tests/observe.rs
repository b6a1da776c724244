//! Inline query intelligence end to end: histograms, per-fingerprint stats, slow-query capture, admin and HTTP views.

mod common;

use std::time::Duration;

use common::*;

/// Value of one Prometheus sample line `name{labels} value` whose name and labels contain all of `needles`.
fn metric(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_and_fingerprint_counts_match_the_workload_exactly() {
    let pg = Pg::start();
    pg.psql("create table items(id int primary key, v text)");
    let relay = Relay::start(&pg, "default_pool_size = 2", "[slow_query]\nthreshold = \"10s\"\n");
    let c = relay.connect().await;
    let stmt = c.prepare("select v from items where id = $1").await.unwrap();
    for i in 0..37 {
        c.query_opt(&stmt, &[&i]).await.unwrap();
    }
    for i in 0..13 {
        c.execute("insert into items values ($1, 'x')", &[&i]).await.unwrap();
    }
    // Simple protocol; IN lists of different lengths and different literals share one fingerprint.
    c.batch_execute("select * from items where id in (1)").await.unwrap();
    c.batch_execute("select * from items where id in (1, 2, 3)").await.unwrap();
    c.batch_execute("SELECT *  FROM items WHERE id IN (7,8) -- comment").await.unwrap();
    c.batch_execute("update items set v = 'y' where id = 3").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let m = relay.http_get("/metrics");
    let db = "database=\"postgres\"";
    assert_eq!(metric(&m, "db_query_duration_seconds_count", &[db, "query_type=\"select\""]), 40.0, "{m}");
    assert_eq!(metric(&m, "db_query_duration_seconds_count", &[db, "query_type=\"insert\""]), 13.0);
    assert_eq!(metric(&m, "db_query_duration_seconds_count", &[db, "query_type=\"update\""]), 1.0);
    // Buckets run from 50 µs to 10 s.
    assert!(
        m.contains("db_query_duration_seconds_bucket{database=\"postgres\",query_type=\"select\",le=\"0.00005\"}"),
        "{m}"
    );
    assert!(m.contains("le=\"10\""));
    assert!(metric(&m, "pgrelay_pool_wait_seconds_count", &[db]) >= 54.0);

    let q: serde_json::Value = serde_json::from_str(&relay.http_get("/api/queries")).unwrap();
    let by_query = |needle: &str| -> Vec<serde_json::Value> {
        q.as_array().unwrap().iter().filter(|e| e["query"].as_str().unwrap().contains(needle)).cloned().collect()
    };
    let sel = by_query("from items where id = $1");
    assert_eq!(sel.len(), 1, "{q}");
    assert_eq!(sel[0]["calls"], 37);
    let ins = by_query("insert into items");
    assert_eq!(ins.len(), 1, "{q}");
    assert_eq!(ins[0]["calls"], 13);
    assert_eq!(ins[0]["rows"], 13);
    let inl = by_query("id in (");
    assert_eq!(inl.len(), 1, "IN lists of any length must share a fingerprint: {q}");
    assert_eq!(inl[0]["calls"], 3);
    // The admin console shows the same table.
    let show = relay.psql("pgrelay", "admin", "pgrelay", "show queries").unwrap();
    assert!(show.contains("from items where id = $1"), "{show}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_queries_are_captured_with_parameters() {
    let pg = Pg::start();
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("slow.jsonl");
    let relay = Relay::start(&pg, "", &format!("[slow_query]\nthreshold = \"100ms\"\nlog = \"{}\"\n", log.display()));
    let c = relay.connect().await;
    c.query("select pg_sleep($1), $2::text as tag", &[&0.2f64, &"order-42"]).await.unwrap();
    c.batch_execute("select pg_sleep(0.15)").await.unwrap();
    c.batch_execute("select pg_sleep(0.001)").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let slow: serde_json::Value = serde_json::from_str(&relay.http_get("/api/slow")).unwrap();
    let slow = slow.as_array().unwrap();
    assert_eq!(slow.len(), 2, "{slow:?}");
    let ext = slow.iter().find(|s| s["query"].as_str().unwrap().contains("$2::text")).expect("extended query captured");
    assert!(ext["duration_ms"].as_f64().unwrap() >= 190.0, "{ext}");
    assert_eq!(ext["params"], serde_json::json!(["0.2", "order-42"]), "{ext}");
    assert_eq!(ext["database"], "postgres");
    assert_eq!(ext["user"], "postgres");
    assert!(ext["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(ext["normalized"].as_str().unwrap().contains("pg_sleep($1)"), "{ext}");
    assert_eq!(ext["server"], format!("127.0.0.1:{}", pg.port));
    let simple = slow.iter().find(|s| s["query"] == "select pg_sleep(0.15)").expect("simple query captured");
    assert_eq!(simple["rows"], 1);

    let file = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = file.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{file}");
    assert!(lines.iter().any(|l| l["params"] == serde_json::json!(["0.2", "order-42"])));

    let show = relay.psql("pgrelay", "admin", "pgrelay", "show slow").unwrap();
    assert!(show.contains("order-42") && show.contains("pg_sleep(0.15)"), "{show}");
    let m = relay.http_get("/metrics");
    assert_eq!(metric(&m, "pgrelay_slow_queries_total", &["database=\"postgres\""]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_parameters_stay_out_of_capture() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "[slow_query]\nthreshold = \"50ms\"\nredact_parameters = true\n");
    let c = relay.connect().await;
    c.query("select pg_sleep(0.1), $1::text", &[&"secret-card-number"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let slow = relay.http_get("/api/slow");
    assert!(slow.contains("pg_sleep"), "{slow}");
    assert!(!slow.contains("secret-card-number"), "{slow}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_view_from_console_and_http() {
    let pg = Pg::start();
    let relay = Relay::start(&pg, "", "[health]\ninterval = \"200ms\"\n");
    relay.connect().await.query_one("select 1", &[]).await.unwrap();
    let mut h = serde_json::Value::Null;
    for _ in 0..50 {
        h = serde_json::from_str(&relay.http_get("/api/health")).unwrap();
        if h.as_array().is_some_and(|a| !a.is_empty() && a[0]["max_connections"] != 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = &h[0];
    assert_eq!(h["database"], "postgres");
    assert_eq!(h["max_connections"].as_i64().unwrap().to_string(), pg.psql("show max_connections"));
    assert!(h["score"].as_f64().unwrap() > 50.0, "{h}");
    let show = relay.psql("pgrelay", "admin", "pgrelay", "show health").unwrap();
    assert!(show.starts_with("postgres|"), "{show}");
    let m = relay.http_get("/metrics");
    assert!(m.contains("db_performance_score{database=\"postgres\"}"), "{m}");
    assert!(m.contains("db_buffer_hit_ratio_percent{database=\"postgres\"}"));
}
