//! The shipped Prometheus rules and Grafana dashboard parse, and name only metrics pgrelay exports.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// Every metric pgrelay exports. Keep in step with the registrations in src/observe/mod.rs
/// (`Metrics::pool`), src/app.rs (`pool_gauges`, `start_patroni`), src/state.rs (reload failures)
/// and src/health.rs (`Gauges::new`).
const EXPORTED: &[&str] = &[
    "db_query_duration_seconds",
    "pgrelay_pool_wait_seconds",
    "pgrelay_queries_total",
    "pgrelay_transactions_total",
    "pgrelay_query_errors_total",
    "pgrelay_pool_checkouts_total",
    "pgrelay_client_bytes_received_total",
    "pgrelay_client_bytes_sent_total",
    "db_connections_total",
    "pgrelay_pool_utilization_percent",
    "pgrelay_clients",
    "pgrelay_slow_queries_total",
    "pgrelay_leader_changes_total",
    "pgrelay_config_reload_failures_total",
    "db_buffer_hit_ratio_percent",
    "db_connection_utilization_percent",
    "db_replication_lag_bytes",
    "db_replication_lag_seconds",
    "db_performance_score",
    "db_queries_per_second",
    "pgrelay_health_collector_errors_total",
];

/// The exported histograms: their `_bucket`, `_sum` and `_count` series are exported too.
const HISTOGRAMS: &[&str] = &["db_query_duration_seconds", "pgrelay_pool_wait_seconds"];

/// Series Prometheus makes itself for every scrape target.
const SCRAPE_SERIES: &[&str] = &["up"];

/// PromQL functions, aggregation operators and keywords (identifiers that are not metric names).
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Metric names an expression refers to: identifiers that are not inside a string, a label matcher
/// `{...}`, a range `[...]` or a `by (...)`-style label list, are not a number or a Grafana
/// variable, are not followed by `(` (a function call) and are not PromQL keywords.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let skip_to = |mut i: usize, close: u8| {
        while i < b.len() && b[i] != close {
            if b[i] == b'"' || b[i] == b'\'' {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    // After one of these words, a parenthesised list holds label names, not an expression.
    let label_list = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_to(i + 1, c);
        } else if c == b'{' {
            i = skip_to(i + 1, b'}');
        } else if c == b'[' {
            i = skip_to(i + 1, b']');
        } else if c == b'$' {
            i += 1;
            while i < b.len() && (ident(b[i]) || b[i] == b'{' || b[i] == b'}') {
                i += 1;
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            // Numbers and durations (1e3, 0.95, 5m) as a whole, so their letters are not names.
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let call = b.get(j) == Some(&b'(');
            if label_list.contains(&word) && call {
                i = skip_to(j + 1, b')');
            } else if !call && !PROMQL_WORDS.contains(&word.to_ascii_lowercase().as_str()) {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `name` is a series pgrelay (or Prometheus, for its target) exports.
fn exported(name: &str) -> bool {
    if EXPORTED.contains(&name) || SCRAPE_SERIES.contains(&name) {
        return !HISTOGRAMS.contains(&name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| HISTOGRAMS.contains(&base)))
}

fn assert_all_exported(file: &str, exprs: &[String]) {
    assert!(!exprs.is_empty(), "{file}: no expressions found");
    let mut unknown = BTreeSet::new();
    for e in exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{file}: no metric in expression {e:?}");
        for n in names {
            if !exported(&n) {
                unknown.insert(format!("{n} (in {e:?})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "{file} uses metrics pgrelay does not export:\n{}",
        unknown.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn extractor_finds_metrics_and_skips_the_rest() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le, database) (rate(db_query_duration_seconds_bucket{database=~"$database", x="a}b"}[5m]))) > 1e-1"#
        ),
        ["db_query_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("a_total / ignoring(state) group_left (x) b_total offset 5m and on() up == bool 0"),
        ["a_total", "b_total", "up"]
    );
    assert_eq!(metric_names("sum(increase(foo[$__rate_interval])) by (cluster)"), ["foo"]);
    assert!(exported("db_query_duration_seconds_bucket"));
    assert!(exported("pgrelay_pool_wait_seconds_count"));
    assert!(!exported("db_query_duration_seconds"), "a histogram has no bare series");
    assert!(!exported("pgrelay_queries_total_bucket"));
    assert!(!exported("pg_up"));
}

#[test]
fn alert_rules_parse_and_name_exported_metrics() {
    let path = root().join("deploy/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&path).expect("read alerts.yml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yml is YAML");
    let groups = doc["groups"].as_sequence().expect("groups: a list");
    let mut exprs = Vec::new();
    let mut alerts = BTreeSet::new();
    for g in groups {
        let gname = g["name"].as_str().expect("every group has a name");
        for r in g["rules"].as_sequence().expect("rules: a list") {
            let expr = r["expr"].as_str().expect("every rule has expr");
            exprs.push(expr.to_string());
            let Some(alert) = r["alert"].as_str() else {
                continue;
            };
            assert!(alerts.insert(alert.to_string()), "duplicate alert {alert}");
            let ctx = format!("{gname}/{alert}");
            let f = r["for"].as_str().unwrap_or_else(|| panic!("{ctx}: no `for`"));
            humantime::parse_duration(f).unwrap_or_else(|e| panic!("{ctx}: for {f:?}: {e}"));
            let sev = r["labels"]["severity"].as_str().unwrap_or_else(|| panic!("{ctx}: no labels.severity"));
            assert!(["info", "warning", "critical"].contains(&sev), "{ctx}: severity {sev}");
            let summary =
                r["annotations"]["summary"].as_str().unwrap_or_else(|| panic!("{ctx}: no annotations.summary"));
            assert!(!summary.trim().is_empty(), "{ctx}: empty summary");
        }
    }
    // The old stack's rules must still be there.
    for (metric, threshold) in [
        ("db_connection_utilization_percent", "> 80"),
        ("db_query_duration_seconds_bucket", "> 0.1"),
        ("db_replication_lag_seconds", "> 10"),
        ("pgrelay_slow_queries_total", ">"),
        ("pgrelay_pool_wait_seconds_bucket", "> 0.05"),
        ("db_performance_score", "< 50"),
        ("pgrelay_config_reload_failures_total", "> 0"),
        ("up", "== 0"),
    ] {
        assert!(
            exprs.iter().any(|e| metric_names(e).iter().any(|n| n == metric) && e.contains(threshold)),
            "no rule on {metric} {threshold}"
        );
    }
    assert_all_exported("alerts.yml", &exprs);
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_parses_and_names_exported_metrics() {
    let path = root().join("deploy/grafana/pgrelay.json");
    let text = std::fs::read_to_string(&path).expect("read pgrelay.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("pgrelay.json is JSON");
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a prometheus datasource variable"
    );
    let panels = dash["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    collect_exprs(&dash["panels"], &mut exprs);
    // Variable queries: label_values(metric, label) names a metric too.
    for v in vars {
        if let Some(q) = v["query"]["query"].as_str().or(v["definition"].as_str()) {
            if let Some(inner) = q.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')) {
                let metric = inner.rsplit_once(',').map_or(inner, |(m, _)| m).trim();
                exprs.push(metric.to_string());
            }
        }
    }
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = p["title"].as_str().unwrap_or("?");
        let targets = p["targets"].as_array();
        assert!(targets.is_some_and(|t| !t.is_empty()), "panel {title:?} has no targets");
        for t in targets.into_iter().flatten() {
            let ds = t["datasource"]["uid"].as_str();
            assert_eq!(ds, Some("${datasource}"), "panel {title:?} uses the datasource variable");
        }
    }
    assert!(panels.iter().any(|p| p["type"] == "heatmap"), "a latency heatmap");
    for metric in [
        "db_query_duration_seconds_bucket",
        "db_query_duration_seconds_count",
        "pgrelay_queries_total",
        "db_connections_total",
        "pgrelay_pool_utilization_percent",
        "pgrelay_pool_wait_seconds_bucket",
        "pgrelay_slow_queries_total",
        "db_performance_score",
        "db_buffer_hit_ratio_percent",
        "db_replication_lag_seconds",
        "pgrelay_leader_changes_total",
    ] {
        assert!(exprs.iter().any(|e| metric_names(e).iter().any(|n| n == metric)), "dashboard shows no {metric}");
    }
    for q in ["0.5", "0.95", "0.99"] {
        assert!(
            exprs.iter().any(|e| e.starts_with(&format!("histogram_quantile({q},"))
                && e.contains("db_query_duration_seconds_bucket")),
            "no p{q} latency line"
        );
    }
    assert_all_exported("pgrelay.json", &exprs);
}
