//! The advisor on a workload whose right answers are known: queries that need an index and queries that must not get
//! one. Precision and recall are measured, then the advice is applied and the workload must get faster.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;

const SCHEMA: &str = "
create table orders(id bigserial primary key, customer_id int not null, status text not null,
                    created_at timestamptz not null, amount numeric not null, note text);
insert into orders(customer_id, status, created_at, amount, note)
  select (g::bigint * 7919 % 20000)::int + 1,
         case when g % 50 = 0 then 'open' when g % 50 < 5 then 'cancelled' else 'filled' end,
         now() - (g || ' seconds')::interval, (g % 1000)::numeric, md5(g::text)
  from generate_series(1, 300000) g;
create index orders_created_at on orders(created_at);
create table trades(id bigserial primary key, symbol text not null, account_id int not null, ts timestamptz not null,
                    qty int, price numeric);
insert into trades(symbol, account_id, ts, qty, price)
  select 'SYM' || (g % 500), (g::bigint * 7907 % 5000)::int + 1, now() - (g || ' seconds')::interval, g % 100, g % 1000
  from generate_series(1, 300000) g;
create index trades_symbol on trades(symbol);
create table currencies(code text primary key, name text);
insert into currencies select 'C' || g, 'Currency ' || g from generate_series(1, 50) g;
analyze;
";

/// The positives, as (table, leading column) of the index each one needs.
fn expected() -> BTreeSet<(String, String)> {
    [("orders", "customer_id"), ("trades", "account_id"), ("orders", "status")]
        .iter()
        .map(|(t, c)| (t.to_string(), c.to_string()))
        .collect()
}

async fn workload(c: &tokio_postgres::Client, rounds: i32) -> Duration {
    let t = Instant::now();
    for i in 0..rounds {
        // Need an index: a composite lookup, a per-account latest-N, and a rare status value with a range.
        c.query("select * from orders where customer_id = $1 and status = $2", &[&(1000 + i), &"open"]).await.unwrap();
        c.query("select * from trades where account_id = $1 order by ts desc limit 20", &[&(42 + i)]).await.unwrap();
        c.query("select * from orders where status = $1 and amount > $2::int", &[&"open", &990i32]).await.unwrap();
        // Must not get one: primary key, a value matching 90 % of rows, a tiny table, an already indexed column,
        // a leading-wildcard LIKE.
        c.query("select * from orders where id = $1", &[&(i as i64 + 1)]).await.unwrap();
        c.batch_execute("select count(*) from orders where status = 'filled'").await.unwrap();
        c.query("select * from currencies where name = $1", &[&"Currency 7"]).await.unwrap();
        c.query("select * from trades where symbol = $1", &[&"SYM7"]).await.unwrap();
        c.batch_execute("select count(*) from orders where note like '%abc'").await.unwrap();
    }
    t.elapsed()
}

fn recommended(report: &serde_json::Value) -> BTreeSet<(String, String)> {
    report["recommendations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["table"].as_str().unwrap().to_string(), r["columns"][0].as_str().unwrap().to_string()))
        .collect()
}

fn precision_recall(got: &BTreeSet<(String, String)>) -> (f64, f64) {
    let want = expected();
    let hits = got.intersection(&want).count() as f64;
    let precision = if got.is_empty() { 0.0 } else { hits / got.len() as f64 };
    (precision, hits / want.len() as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advice_is_precise_verified_and_makes_the_workload_faster() {
    let pg = Pg::start();
    pg.psql(SCHEMA);
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("slow.jsonl");
    let relay = Relay::start(&pg, "", &format!("[slow_query]\nthreshold = \"1us\"\nlog = \"{}\"\n", log.display()));
    let c = relay.connect().await;
    let before = workload(&c, 3).await;

    // 1. In-process, over HTTP.
    let body = relay.http_get("/api/advice");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(report["hypopg"], true, "HypoPG must be installed for this test (apt-get install postgresql-15-hypopg)");
    let got = recommended(&report);
    let (p, r) = precision_recall(&got);
    eprintln!("advice: {got:?} precision {p:.2} recall {r:.2}");
    assert!(p >= 0.9 && r >= 0.9, "precision {p:.2} recall {r:.2}: {report:#}");
    for rec in report["recommendations"].as_array().unwrap() {
        assert_eq!(rec["verified"], true);
        let (b, a) = (rec["cost_before"].as_f64().unwrap(), rec["cost_after"].as_f64().unwrap());
        assert!(a <= b * 0.5, "{rec}");
        assert!(rec["create"].as_str().unwrap().starts_with("CREATE INDEX CONCURRENTLY"));
        assert!(rec["size_bytes"].as_u64().unwrap() > 0);
    }
    // Red flags name their plan node.
    let flagged = report["queries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["query"].as_str().unwrap().contains("from trades where account_id"))
        .unwrap();
    assert!(flagged["red_flags"].as_array().unwrap().iter().any(|f| f["node"] == "Seq Scan on trades"), "{flagged:#}");
    // SHOW QUERIES says which fingerprints have advice.
    let show = relay.psql("pgrelay", "admin", "pgrelay", "show queries").unwrap();
    assert!(show.lines().filter(|l| l.contains("CREATE INDEX")).count() >= 3, "{show}");

    // 2. The command line, against the running pgrelay's config, and against the slow-query log.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["advise", "--json", "--config"])
        .arg(relay.config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(recommended(&cli), got);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .arg("advise")
        .arg("--slow-log")
        .arg(&log)
        .arg("--database-url")
        .arg(format!("postgres://postgres:{PASSWORD}@127.0.0.1:{}/postgres", pg.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("checked with a hypothetical index"), "{text}");
    assert_eq!(text.matches("CREATE INDEX CONCURRENTLY").count(), 3, "{text}");

    // 3. Apply the advice; the workload gets faster.
    for rec in report["recommendations"].as_array().unwrap() {
        pg.psql(rec["create"].as_str().unwrap());
    }
    pg.psql("analyze");
    let c2 = relay.connect().await;
    let _ = workload(&c2, 1).await; // warm the new plans
    let after = workload(&c2, 3).await;
    eprintln!("workload: before {before:?}, after {after:?}");
    assert!(after < before.mul_f64(0.8), "before {before:?} after {after:?}");
}
