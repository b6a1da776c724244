//! DB health collector: a side task with its own server connection, sampling pg_stat views every few seconds.
//!
//! Per configured database it keeps one dedicated server connection to the database's current route
//! target, samples `pg_stat_database`, `max_connections` and `pg_stat_replication`, turns the numbers
//! into a [`HealthSnapshot`] with a 0–100 score and threshold warnings ([`assess`]), publishes it in a
//! [`HealthMonitor`] (for SHOW HEALTH and `/api/health`) and sets the `db_*` gauges the old Python
//! monitor exported. The formula and thresholds are documented in `docs/health.md`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::RwLock;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::auth::Secret;
use crate::error::{Error, Result};
use crate::server::{Login, ServerConn, Target};
use crate::state::Shared;

/// How often `run` samples when the caller has no opinion.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Upper bound on one database's whole sample (connect excluded), in case the network hangs.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One MiB; the old monitor's lag thresholds were "10 MB" and "100 MB" computed as `n * 1024 * 1024`.
const MIB: f64 = 1024.0 * 1024.0;

/// The old monitor's thresholds: (warning, critical).
pub const CONNECTION_UTILIZATION_PERCENT: (f64, f64) = (70.0, 90.0);
/// Mean query time in ms: (warning, critical).
pub const QUERY_TIME_MS: (f64, f64) = (100.0, 1000.0);
/// Buffer hit ratio in %: (warning, critical); lower is worse.
pub const BUFFER_HIT_PERCENT: (f64, f64) = (90.0, 80.0);
/// Replication lag in bytes: (warning, critical) = (10 MiB, 100 MiB).
pub const REPLICATION_LAG_BYTES: (f64, f64) = (10.0 * MIB, 100.0 * MIB);

/// The latest view of one database's health.
#[derive(Clone, Debug, Serialize)]
pub struct HealthSnapshot {
    /// The configured database name (the `[databases.NAME]` key).
    pub database: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// `blks_hit / (blks_hit + blks_read)` of this database since the last stats reset; 100 when nothing was read.
    pub buffer_hit_ratio_percent: f64,
    /// Server-wide backends connected to some database (`sum(numbackends)`), since `max_connections` is server-wide.
    pub connections: i64,
    pub max_connections: i64,
    pub connection_utilization_percent: f64,
    pub xact_commit: i64,
    pub xact_rollback: i64,
    /// (commits + rollbacks) per second between the last two samples; 0 on the first sample.
    pub transactions_per_second: f64,
    pub deadlocks: i64,
    pub temp_files: i64,
    pub temp_bytes: i64,
    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub in_recovery: bool,
    pub replication: Vec<ReplicaLag>,
    pub max_lag_bytes: f64,
    pub max_lag_seconds: f64,
    /// Mean query time as measured by pgrelay, when the caller provided it ([`HealthMonitor::set_mean_query_ms`]).
    pub mean_query_ms: Option<f64>,
    pub score: f64,
    pub warnings: Vec<Warning>,
    /// Why this sample failed; the other numbers are then zero and the score is 0.
    pub error: Option<String>,
}

/// One row of `pg_stat_replication`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReplicaLag {
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sync_state: String,
    /// WAL bytes between this server's position and the replica's replay position; 0 when unknown.
    pub lag_bytes: f64,
    /// `replay_lag` in seconds; 0 when PostgreSQL reports none (an idle, caught-up replica).
    pub lag_seconds: f64,
}

/// A threshold that a sample crossed.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Warning {
    /// Which number: `connection_utilization_percent`, `buffer_hit_ratio_percent`, `replication_lag_bytes`, `mean_query_ms`.
    pub metric: &'static str,
    /// `"warning"` or `"critical"`.
    pub level: &'static str,
    pub value: f64,
    /// The threshold of `level` that `value` crossed.
    pub threshold: f64,
    pub message: String,
}

/// What the score is computed from; separate from the snapshot so the formula can be tested alone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreInputs {
    pub connection_utilization_percent: f64,
    pub buffer_hit_ratio_percent: f64,
    pub max_lag_bytes: f64,
    pub mean_query_ms: Option<f64>,
    /// Deadlocks since the previous sample.
    pub new_deadlocks: i64,
    /// Temp files since the previous sample.
    pub new_temp_files: i64,
}

/// Score penalties, in points off 100 (see `docs/health.md`).
pub mod penalty {
    /// Connection utilisation above 70 % / above 90 %.
    pub const CONNECTIONS: (f64, f64) = (15.0, 30.0);
    /// Buffer hit ratio below 90 % / below 80 %.
    pub const BUFFER_HIT: (f64, f64) = (10.0, 25.0);
    /// Replication lag above 10 MiB / above 100 MiB.
    pub const REPLICATION_LAG: (f64, f64) = (10.0, 25.0);
    /// Mean query time above 100 ms / above 1000 ms (only when known).
    pub const QUERY_TIME: (f64, f64) = (10.0, 25.0);
    /// Any deadlock since the previous sample.
    pub const DEADLOCKS: f64 = 10.0;
    /// Any temp file since the previous sample.
    pub const TEMP_FILES: f64 = 5.0;
}

/// The health score (0–100) and the warnings for one sample.
///
/// Start at 100; subtract the warning or critical penalty of each threshold crossed; subtract the
/// deadlock and temp-file penalties when those counters grew; clamp to 0..=100. Non-finite inputs
/// count as "no problem" rather than poisoning the score.
pub fn assess(i: &ScoreInputs) -> (f64, Vec<Warning>) {
    let mut score = 100.0;
    let mut warnings = Vec::new();
    let mut check = |metric: &'static str,
                     value: f64,
                     (warn_at, crit_at): (f64, f64),
                     (warn_pts, crit_pts): (f64, f64),
                     higher_is_worse: bool,
                     what: &str| {
        if !value.is_finite() {
            return;
        }
        let crossed = |t: f64| {
            if higher_is_worse {
                value > t
            } else {
                value < t
            }
        };
        let (level, threshold, pts) = if crossed(crit_at) {
            ("critical", crit_at, crit_pts)
        } else if crossed(warn_at) {
            ("warning", warn_at, warn_pts)
        } else {
            return;
        };
        score -= pts;
        let dir = if higher_is_worse { "above" } else { "below" };
        warnings.push(Warning {
            metric,
            level,
            value,
            threshold,
            message: format!("{what} {value:.1} is {dir} the {level} threshold {threshold:.1}"),
        });
    };
    check(
        "connection_utilization_percent",
        i.connection_utilization_percent,
        CONNECTION_UTILIZATION_PERCENT,
        penalty::CONNECTIONS,
        true,
        "connection utilisation %",
    );
    check(
        "buffer_hit_ratio_percent",
        i.buffer_hit_ratio_percent,
        BUFFER_HIT_PERCENT,
        penalty::BUFFER_HIT,
        false,
        "buffer hit ratio %",
    );
    check(
        "replication_lag_bytes",
        i.max_lag_bytes,
        REPLICATION_LAG_BYTES,
        penalty::REPLICATION_LAG,
        true,
        "replication lag bytes",
    );
    if let Some(ms) = i.mean_query_ms {
        check("mean_query_ms", ms, QUERY_TIME_MS, penalty::QUERY_TIME, true, "mean query time ms");
    }
    if i.new_deadlocks > 0 {
        score -= penalty::DEADLOCKS;
    }
    if i.new_temp_files > 0 {
        score -= penalty::TEMP_FILES;
    }
    (f64::clamp(score, 0.0, 100.0), warnings)
}

/// The latest snapshot of every database, shared between the collector and its readers.
#[derive(Default)]
pub struct HealthMonitor {
    latest: RwLock<BTreeMap<String, HealthSnapshot>>,
    mean_query_ms: RwLock<HashMap<String, f64>>,
}

impl HealthMonitor {
    /// An empty monitor.
    pub fn new() -> Arc<Self> {
        Arc::new(HealthMonitor::default())
    }

    /// The latest snapshot of every database, ordered by name.
    pub fn snapshot(&self) -> Vec<HealthSnapshot> {
        self.latest.read().values().cloned().collect()
    }

    /// The latest snapshot of one database.
    pub fn get(&self, database: &str) -> Option<HealthSnapshot> {
        self.latest.read().get(database).cloned()
    }

    /// Tells the collector pgrelay's own mean query time for `database` (None = unknown); used from the next sample on.
    pub fn set_mean_query_ms(&self, database: &str, ms: Option<f64>) {
        let mut m = self.mean_query_ms.write();
        match ms.filter(|v| v.is_finite()) {
            Some(v) => {
                m.insert(database.to_string(), v);
            }
            None => {
                m.remove(database);
            }
        }
    }

    fn mean_query_ms(&self, database: &str) -> Option<f64> {
        self.mean_query_ms.read().get(database).copied()
    }

    fn publish(&self, s: HealthSnapshot) {
        self.latest.write().insert(s.database.clone(), s);
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.latest.write().retain(|k, _| keep(k));
    }
}

/// Samples every configured database every `interval` until `shared.shutdown` is cancelled.
///
/// Logs in as `login_user`, or as the database entry's `user`/`password` when set; the secret of
/// `login_user` comes from the userlist otherwise.
pub async fn run(shared: Arc<Shared>, monitor: Arc<HealthMonitor>, interval: Duration, login_user: String) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut collectors: BTreeMap<String, Collector> = BTreeMap::new();
    info!(interval = ?interval, user = %login_user, "health collector started");
    'run: loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => break 'run,
        }
        let cfg = shared.config.load_full();
        collectors.retain(|db, _| cfg.databases.contains_key(db));
        monitor.retain(|db| cfg.databases.contains_key(db));
        for db in cfg.databases.keys() {
            let c = collectors.entry(db.clone()).or_insert_with(|| Collector::new(&shared, db));
            let snap = tokio::select! {
                s = c.sample(&shared, &login_user, monitor.mean_query_ms(db)) => s,
                _ = shared.shutdown.cancelled() => break 'run,
            };
            c.gauges.set(&snap);
            monitor.publish(snap);
        }
    }
    for (_, c) in collectors {
        if let Some(conn) = c.conn {
            conn.terminate().await;
        }
    }
    info!("health collector stopped");
}

/// Gauge handles of one database, registered once.
struct Gauges {
    buffer_hit: metrics::Gauge,
    utilization: metrics::Gauge,
    lag_bytes: metrics::Gauge,
    lag_seconds: metrics::Gauge,
    score: metrics::Gauge,
    qps: metrics::Gauge,
    errors: metrics::Counter,
}

impl Gauges {
    fn new(shared: &Shared, db: &str) -> Gauges {
        let m = &shared.metrics;
        let l = || [("database", db.to_string())];
        Gauges {
            buffer_hit: m.gauge("db_buffer_hit_ratio_percent", &l()),
            utilization: m.gauge("db_connection_utilization_percent", &l()),
            lag_bytes: m.gauge("db_replication_lag_bytes", &l()),
            lag_seconds: m.gauge("db_replication_lag_seconds", &l()),
            score: m.gauge("db_performance_score", &l()),
            qps: m.gauge("db_queries_per_second", &l()),
            errors: m.counter("pgrelay_health_collector_errors_total", &l()),
        }
    }

    /// A failed sample only moves the score (to 0) and the error counter: the last good numbers stay.
    fn set(&self, s: &HealthSnapshot) {
        self.score.set(s.score);
        if s.error.is_some() {
            self.errors.increment(1);
            return;
        }
        self.buffer_hit.set(s.buffer_hit_ratio_percent);
        self.utilization.set(s.connection_utilization_percent);
        self.lag_bytes.set(s.max_lag_bytes);
        self.lag_seconds.set(s.max_lag_seconds);
        self.qps.set(s.transactions_per_second);
    }
}

/// Counters of the previous sample, for per-second rates and growth.
struct Previous {
    at: Instant,
    xacts: i64,
    deadlocks: i64,
    temp_files: i64,
}

/// The collector's state for one database.
struct Collector {
    db: String,
    conn: Option<ServerConn>,
    prev: Option<Previous>,
    /// Set after the first failure so a down database is logged once, not every interval.
    failing: bool,
    gauges: Gauges,
}

impl Collector {
    fn new(shared: &Shared, db: &str) -> Collector {
        Collector { db: db.to_string(), conn: None, prev: None, failing: false, gauges: Gauges::new(shared, db) }
    }

    async fn sample(&mut self, shared: &Shared, login_user: &str, mean_query_ms: Option<f64>) -> HealthSnapshot {
        let r = match self.connection(shared, login_user).await {
            Ok(conn) => match tokio::time::timeout(SAMPLE_TIMEOUT, query(conn)).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout("health sample")),
            },
            Err(e) => Err(e),
        };
        match r {
            Ok(raw) => {
                if self.failing {
                    info!(db = %self.db, "health collector reconnected");
                    self.failing = false;
                }
                self.snapshot(raw, mean_query_ms)
            }
            Err(e) => {
                // The connection may be mid-message; never reuse it after an error.
                self.conn = None;
                self.prev = None;
                if self.failing {
                    debug!(db = %self.db, error = %e, "health sample failed");
                } else {
                    warn!(db = %self.db, error = %e, "health sample failed; retrying every interval");
                    self.failing = true;
                }
                failed(&self.db, mean_query_ms, e.to_string())
            }
        }
    }

    /// The dedicated connection, (re)made when missing or when the route moved to another target.
    async fn connection(&mut self, shared: &Shared, login_user: &str) -> Result<&mut ServerConn> {
        let route = shared
            .route(&self.db)
            .ok_or_else(|| Error::Pool(format!("database {} has no route", self.db)))?
            .borrow()
            .clone();
        let target: Arc<Target> =
            route.target.ok_or_else(|| Error::Pool(format!("database {} has no leader now", self.db)))?;
        let stale = match &self.conn {
            Some(c) => c.generation != route.generation || *c.target != *target,
            None => true,
        };
        if stale {
            if let Some(old) = self.conn.take() {
                old.terminate().await;
            }
            self.prev = None;
            let cfg = shared.config.load_full();
            let dbc = cfg
                .databases
                .get(&self.db)
                .ok_or_else(|| Error::Pool(format!("database {} is not configured", self.db)))?;
            let user = dbc.user.clone().unwrap_or_else(|| login_user.to_string());
            let secret = match &dbc.password {
                Some(p) => Some(Secret::parse(p)),
                None => shared.userlist.load().get(&user).cloned(),
            };
            let login = Login {
                user,
                database: dbc.dbname.clone().unwrap_or_else(|| self.db.clone()),
                secret,
                scram_keys: None,
            };
            let mut conn = ServerConn::connect(target, &login, &cfg.proxy, route.generation).await?;
            // A hung catalog query must not stall the collector; the name makes it easy to spot in pg_stat_activity.
            conn.execute("SET statement_timeout = '2s'; SET application_name = 'pgrelay-health'").await?;
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or_else(|| Error::Internal("health connection vanished after connect".into()))
    }

    fn snapshot(&mut self, raw: Raw, mean_query_ms: Option<f64>) -> HealthSnapshot {
        let now = Instant::now();
        let xacts = raw.xact_commit.saturating_add(raw.xact_rollback);
        // A counter that went down means pg_stat_reset(): start the deltas over.
        let (tps, new_deadlocks, new_temp_files) = match &self.prev {
            Some(p) if xacts >= p.xacts && raw.deadlocks >= p.deadlocks && raw.temp_files >= p.temp_files => {
                let secs = now.saturating_duration_since(p.at).as_secs_f64();
                let tps = if secs > 0.0 { (xacts - p.xacts) as f64 / secs } else { 0.0 };
                (tps, raw.deadlocks - p.deadlocks, raw.temp_files - p.temp_files)
            }
            _ => (0.0, 0, 0),
        };
        self.prev = Some(Previous { at: now, xacts, deadlocks: raw.deadlocks, temp_files: raw.temp_files });
        let hit = ratio_percent(raw.blks_hit, raw.blks_hit.saturating_add(raw.blks_read), 100.0);
        let util = ratio_percent(raw.connections, raw.max_connections, 0.0);
        let max_lag_bytes = raw.replication.iter().map(|r| r.lag_bytes).fold(0.0, f64::max);
        let max_lag_seconds = raw.replication.iter().map(|r| r.lag_seconds).fold(0.0, f64::max);
        let (score, warnings) = assess(&ScoreInputs {
            connection_utilization_percent: util,
            buffer_hit_ratio_percent: hit,
            max_lag_bytes,
            mean_query_ms,
            new_deadlocks,
            new_temp_files,
        });
        HealthSnapshot {
            database: self.db.clone(),
            at: SystemTime::now(),
            buffer_hit_ratio_percent: hit,
            connections: raw.connections,
            max_connections: raw.max_connections,
            connection_utilization_percent: util,
            xact_commit: raw.xact_commit,
            xact_rollback: raw.xact_rollback,
            transactions_per_second: tps,
            deadlocks: raw.deadlocks,
            temp_files: raw.temp_files,
            temp_bytes: raw.temp_bytes,
            in_recovery: raw.in_recovery,
            replication: raw.replication,
            max_lag_bytes,
            max_lag_seconds,
            mean_query_ms,
            score,
            warnings,
            error: None,
        }
    }
}

fn failed(db: &str, mean_query_ms: Option<f64>, error: String) -> HealthSnapshot {
    HealthSnapshot {
        database: db.to_string(),
        at: SystemTime::now(),
        buffer_hit_ratio_percent: 0.0,
        connections: 0,
        max_connections: 0,
        connection_utilization_percent: 0.0,
        xact_commit: 0,
        xact_rollback: 0,
        transactions_per_second: 0.0,
        deadlocks: 0,
        temp_files: 0,
        temp_bytes: 0,
        in_recovery: false,
        replication: Vec::new(),
        max_lag_bytes: 0.0,
        max_lag_seconds: 0.0,
        mean_query_ms,
        score: 0.0,
        warnings: Vec::new(),
        error: Some(error),
    }
}

/// The numbers as the server reported them.
struct Raw {
    blks_hit: i64,
    blks_read: i64,
    connections: i64,
    max_connections: i64,
    xact_commit: i64,
    xact_rollback: i64,
    deadlocks: i64,
    temp_files: i64,
    temp_bytes: i64,
    in_recovery: bool,
    replication: Vec<ReplicaLag>,
}

/// This database's counters plus the server-wide backend count, in one statement (one snapshot).
pub const DATABASE_SQL: &str = "SELECT d.blks_hit, d.blks_read, \
     (SELECT sum(numbackends) FROM pg_stat_database WHERE datid <> 0), \
     current_setting('max_connections'), d.xact_commit, d.xact_rollback, d.deadlocks, \
     d.temp_files, d.temp_bytes, pg_is_in_recovery() \
     FROM pg_stat_database d WHERE d.datname = current_database()";

/// Replicas of this server; on a standby (cascading replication) the lag is measured from its replay position.
pub const REPLICATION_SQL: &str = "SELECT application_name, host(client_addr), state, sync_state, \
     pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
     ELSE pg_current_wal_lsn() END, replay_lsn)::float8, \
     extract(epoch FROM replay_lag)::float8 \
     FROM pg_stat_replication";

async fn query(conn: &mut ServerConn) -> Result<Raw> {
    let rows = conn.query_column(DATABASE_SQL).await?;
    let row = rows.first().map(Vec::as_slice).unwrap_or_default();
    let col = |i: usize| row.get(i).and_then(|v| v.as_deref());
    let mut raw = Raw {
        blks_hit: int(col(0)),
        blks_read: int(col(1)),
        connections: int(col(2)),
        max_connections: int(col(3)),
        xact_commit: int(col(4)),
        xact_rollback: int(col(5)),
        deadlocks: int(col(6)),
        temp_files: int(col(7)),
        temp_bytes: int(col(8)),
        in_recovery: col(9) == Some("t"),
        replication: Vec::new(),
    };
    // Without pg_read_all_stats the lag columns are NULL; a failure here must not hide the numbers above.
    match conn.query_column(REPLICATION_SQL).await {
        Ok(rows) => raw.replication = rows.iter().map(Vec::as_slice).map(replica).collect(),
        Err(e @ Error::ServerRefused { .. }) => {
            debug!(error = %e, "pg_stat_replication not readable")
        }
        Err(e) => return Err(e),
    }
    Ok(raw)
}

fn replica(r: &[Option<String>]) -> ReplicaLag {
    let col = |i: usize| r.get(i).and_then(|v| v.as_deref());
    let text = |i: usize| col(i).unwrap_or("").to_string();
    ReplicaLag {
        application_name: text(0),
        client_addr: col(1).filter(|s| !s.is_empty()).map(str::to_string),
        state: text(2),
        sync_state: text(3),
        lag_bytes: float(col(4)).max(0.0),
        lag_seconds: float(col(5)).max(0.0),
    }
}

/// An integer column; NULL, empty or garbage read as 0. `sum()` of bigints arrives as numeric text, so
/// a fractional form is accepted too.
fn int(v: Option<&str>) -> i64 {
    let v = v.unwrap_or("").trim();
    v.parse::<i64>().ok().or_else(|| v.parse::<f64>().ok().filter(|f| f.is_finite()).map(|f| f as i64)).unwrap_or(0)
}

/// A float column; NULL, empty, NaN or infinity read as 0.
fn float(v: Option<&str>) -> f64 {
    v.and_then(|s| s.trim().parse::<f64>().ok()).filter(|f| f.is_finite()).unwrap_or(0.0)
}

/// `100 * part / whole`, or `if_empty` when `whole` is not positive.
fn ratio_percent(part: i64, whole: i64, if_empty: f64) -> f64 {
    if whole <= 0 {
        return if_empty;
    }
    (100.0 * part as f64 / whole as f64).max(0.0)
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_values_read_as_zero() {
        assert_eq!(int(None), 0);
        assert_eq!(int(Some("")), 0);
        assert_eq!(int(Some("abc")), 0);
        assert_eq!(int(Some("42")), 42);
        assert_eq!(int(Some("42.0")), 42);
        assert_eq!(float(Some("NaN")), 0.0);
        assert_eq!(float(Some("inf")), 0.0);
        assert_eq!(float(Some(" 1.5 ")), 1.5);
        assert_eq!(ratio_percent(5, 0, 100.0), 100.0);
        assert_eq!(ratio_percent(0, -1, 0.0), 0.0);
        assert_eq!(ratio_percent(1, 4, 0.0), 25.0);
    }

    #[test]
    fn replica_row_tolerates_nulls_and_short_rows() {
        let r = replica(&[Some("walreceiver".into()), None]);
        assert_eq!(r.application_name, "walreceiver");
        assert_eq!(r.client_addr, None);
        assert_eq!((r.lag_bytes, r.lag_seconds), (0.0, 0.0));
    }
}
