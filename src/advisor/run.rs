//! Where the advisor's inputs come from: a slow-query log plus a database URL, a running pgrelay's HTTP API plus its
//! config, or this process's own capture (for `GET /api/advice`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::{advise, group, Db, Report};
use crate::auth::Secret;
use crate::config::{Config, ProxyConfig};
use crate::error::{Error, Result};
use crate::observe::slow::SlowQuery;
use crate::server::{Login, ServerConn, Target};

/// `pgrelay advise --slow-log FILE --database-url URL`.
pub async fn from_files(slow_log: &Path, url: &str) -> Result<Report> {
    let text =
        std::fs::read_to_string(slow_log).map_err(|e| Error::Internal(format!("{}: {e}", slow_log.display())))?;
    let samples: Vec<SlowQuery> =
        text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
    let (target, login) = parse_url(url)?;
    // One URL serves every database named in the log.
    let mut groups = group(samples, &HashMap::new());
    for g in &mut groups {
        g.database = login.database.clone();
    }
    let conn = ServerConn::connect(Arc::new(target), &login, &ProxyConfig::default(), 0).await?;
    let mut dbs = HashMap::from([(login.database.clone(), Db::new(conn).await?)]);
    Ok(advise(groups, &mut dbs).await)
}

/// `pgrelay advise --config proxy.toml`: the slow queries of the running pgrelay that config describes.
pub async fn from_config(path: &Path) -> Result<Report> {
    let cfg = Config::load(path).map_err(|e| Error::Internal(e.to_string()))?;
    let userlist = crate::state::load_userlist(&cfg).map_err(Error::Internal)?;
    if cfg.metrics.listen.is_empty() {
        return Err(Error::Internal(
            "metrics.listen is empty: the advisor reads the slow queries from pgrelay's HTTP API".into(),
        ));
    }
    let base = format!("http://{}", cfg.metrics.listen.replace("0.0.0.0", "127.0.0.1"));
    let get = |p: &'static str| {
        let base = base.clone();
        async move {
            let (code, body) = crate::routing::patroni::http_get(&base, p, std::time::Duration::from_secs(10))
                .await
                .map_err(|e| Error::Internal(format!("GET {base}{p}: {e}")))?;
            if code != 200 {
                return Err(Error::Internal(format!("GET {base}{p}: HTTP {code}")));
            }
            Ok(body)
        }
    };
    let samples: Vec<SlowQuery> =
        serde_json::from_slice(&get("/api/slow").await?).map_err(|e| Error::Internal(format!("/api/slow: {e}")))?;
    let stats: Vec<serde_json::Value> = serde_json::from_slice(&get("/api/queries").await?).unwrap_or_default();
    let stats = stats_map(&stats);
    let groups = group(samples, &stats);
    let mut dbs = HashMap::new();
    for g in &groups {
        if dbs.contains_key(&g.database) {
            continue;
        }
        let Some(dbc) = cfg.databases.get(&g.database) else { continue };
        let Some(host) = dbc.host.clone() else { continue };
        let user = dbc.user.clone().unwrap_or_else(|| g.samples[0].user.clone());
        let secret = dbc.password.as_deref().map(Secret::parse).or_else(|| userlist.get(&user).cloned());
        let login = Login {
            user,
            database: dbc.dbname.clone().unwrap_or_else(|| g.database.clone()),
            secret,
            scram_keys: None,
        };
        let target = Target { host, port: dbc.port.unwrap_or(5432) };
        let conn = ServerConn::connect(Arc::new(target), &login, &cfg.proxy, 0).await?;
        dbs.insert(g.database.clone(), Db::new(conn).await?);
    }
    Ok(advise(groups, &mut dbs).await)
}

/// This process's captured slow queries (for `GET /api/advice`), logging in like its pools do.
pub async fn in_process(shared: &crate::state::Shared) -> Result<Report> {
    let samples = shared.observer.slow.recent(usize::MAX);
    let stats: HashMap<u64, (u64, f64)> = shared
        .observer
        .stats
        .snapshot()
        .into_iter()
        .map(|q| (q.fingerprint, (q.calls, q.total_us as f64 / 1000.0)))
        .collect();
    let groups = group(samples, &stats);
    let cfg = shared.config.load_full();
    let mut dbs = HashMap::new();
    for g in &groups {
        if dbs.contains_key(&g.database) {
            continue;
        }
        let Some(pool) = shared.pool(&g.database, &g.samples[0].user) else { continue };
        let Some(target) = pool.route().borrow().target.clone() else { continue };
        let login = (**pool.login.load()).clone();
        match ServerConn::connect(target, &login, &cfg.proxy, 0).await {
            Ok(conn) => {
                dbs.insert(g.database.clone(), Db::new(conn).await?);
            }
            Err(e) => tracing::warn!(db = %g.database, error = %e, "advisor cannot connect"),
        }
    }
    let report = advise(groups, &mut dbs).await;
    let mut advice = shared.observer.advice.lock();
    advice.clear();
    for r in &report.recommendations {
        for fp in &r.fingerprints {
            advice.insert(*fp, r.create.clone());
        }
    }
    Ok(report)
}

fn stats_map(stats: &[serde_json::Value]) -> HashMap<u64, (u64, f64)> {
    stats
        .iter()
        .filter_map(|q| {
            let fp = u64::from_str_radix(q["fingerprint"].as_str()?, 16).ok()?;
            Some((fp, (q["calls"].as_u64()?, q["total_us"].as_f64()? / 1000.0)))
        })
        .collect()
}

/// `postgres://user:password@host:port/dbname` or `host=... port=... user=... password=... dbname=...`.
pub fn parse_url(url: &str) -> Result<(Target, Login)> {
    let bad = |m: &str| Error::Internal(format!("--database-url: {m}"));
    let (mut host, mut port, mut user, mut password, mut dbname) =
        ("127.0.0.1".to_string(), 5432u16, "postgres".to_string(), None::<String>, None::<String>);
    if let Some(rest) = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://")) {
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        if let Some(a) = auth {
            match a.split_once(':') {
                Some((u, p)) => {
                    user = u.to_string();
                    password = Some(p.to_string());
                }
                None => user = a.to_string(),
            }
        }
        let hostpart = hostpart.split('?').next().unwrap_or(hostpart);
        let (hp, db) = hostpart.split_once('/').unwrap_or((hostpart, ""));
        if !db.is_empty() {
            dbname = Some(db.to_string());
        }
        match hp.rsplit_once(':') {
            Some((h, p)) => {
                host = h.to_string();
                port = p.parse().map_err(|_| bad("bad port"))?;
            }
            None if !hp.is_empty() => host = hp.to_string(),
            None => {}
        }
    } else {
        for kv in url.split_whitespace() {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad("expected key=value pairs or a postgres:// URL"))?;
            match k {
                "host" => host = v.to_string(),
                "port" => port = v.parse().map_err(|_| bad("bad port"))?,
                "user" => user = v.to_string(),
                "password" => password = Some(v.to_string()),
                "dbname" => dbname = Some(v.to_string()),
                _ => {}
            }
        }
    }
    let database = dbname.unwrap_or_else(|| user.clone());
    let password = password.or_else(|| std::env::var("PGPASSWORD").ok());
    Ok((Target { host, port }, Login { user, database, secret: password.map(Secret::Plain), scram_keys: None }))
}
