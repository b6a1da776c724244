//! Admin console: the virtual database `pgrelay` (alias `pgbouncer`) speaking the PostgreSQL protocol, with
//! pgBouncer's SHOW commands and column names, plus pgrelay's own.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Buf;
use pgwire::messages::startup::Authentication;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::client::ClientConn;
use crate::protocol::{self, sqlstate};
use crate::state::Shared;

type Rows = (Vec<&'static str>, Vec<Vec<Option<String>>>);

fn s<T: ToString>(v: T) -> Option<String> {
    Some(v.to_string())
}

fn ts(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// Serves an admin-console session for an already authenticated user.
pub async fn serve(shared: Arc<Shared>, mut conn: ClientConn, user: String, _params: Vec<(String, String)>) {
    let cfg = shared.config.load_full();
    let is_admin = cfg.auth.admin_users.iter().any(|u| u == &user);
    let is_stats = cfg.auth.stats_users.iter().any(|u| u == &user);
    if !is_admin && !is_stats {
        warn!(client = %conn.addr, user = %user, "admin console refused: not in admin_users or stats_users");
        conn.fatal(sqlstate::INVALID_AUTHORIZATION, "admin console access denied: user is not in auth.admin_users")
            .await;
        return;
    }
    protocol::authentication(&mut conn.wbuf, Authentication::Ok);
    for (k, v) in [
        ("server_version", "15.0 (pgrelay)"),
        ("client_encoding", "UTF8"),
        ("server_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "pgrelay"),
    ] {
        protocol::parameter_status(&mut conn.wbuf, k, v);
    }
    protocol::backend_key_data(&mut conn.wbuf, 0, 0);
    protocol::ready_for_query(&mut conn.wbuf, b'I');
    if conn.stream.write_all(&conn.wbuf).await.is_err() {
        return;
    }
    conn.wbuf.clear();
    loop {
        let msg = loop {
            match protocol::frame_header(&conn.rbuf, 1 << 20) {
                Ok(Some((t, len))) if conn.rbuf.len() >= len => {
                    let mut f = conn.rbuf.split_to(len);
                    f.advance(5);
                    break Some((t, f));
                }
                Ok(_) => {}
                Err(_) => break None,
            }
            match conn.stream.read_buf(&mut conn.rbuf).await {
                Ok(0) | Err(_) => break None,
                Ok(_) => {}
            }
        };
        let Some((t, body)) = msg else { return };
        match t {
            b'Q' => {
                let sql = protocol::query_text(&body).to_string();
                let done = run_command(&shared, &mut conn, &sql, is_admin).await;
                protocol::ready_for_query(&mut conn.wbuf, b'I');
                if conn.stream.write_all(&conn.wbuf).await.is_err() {
                    return;
                }
                conn.wbuf.clear();
                if done {
                    return;
                }
            }
            b'X' => return,
            b'S' => {
                protocol::ready_for_query(&mut conn.wbuf, b'I');
                let _ = conn.stream.write_all(&conn.wbuf).await;
                conn.wbuf.clear();
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                // Only the simple protocol is spoken here; the error comes once, and Sync answers with ReadyForQuery.
                if t == b'P' {
                    protocol::error_response(
                        &mut conn.wbuf,
                        "ERROR",
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console supports only the simple query protocol",
                    );
                }
            }
            _ => {
                conn.fatal(sqlstate::PROTOCOL_VIOLATION, "invalid frontend message type").await;
                return;
            }
        }
    }
}

/// Runs one admin statement, writing its result into the client's buffer. Returns true when the session must end.
async fn run_command(shared: &Arc<Shared>, conn: &mut ClientConn, sql: &str, is_admin: bool) -> bool {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_ascii_uppercase()).collect();
    let arg = text.split_whitespace().nth(1).map(|a| a.trim_matches('"').to_string());
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    if words.is_empty() {
        protocol::empty_query(&mut conn.wbuf);
        return false;
    }
    if words[0] != "SHOW" && !is_admin {
        error(conn, sqlstate::INVALID_AUTHORIZATION, "admin access needed (user is only in auth.stats_users)");
        return false;
    }
    let rows: Option<Rows> = match words.as_slice() {
        ["SHOW", what] => match *what {
            "POOLS" => Some(show_pools(shared)),
            "STATS" => Some(show_stats(shared)),
            "CLIENTS" => Some(show_clients(shared)),
            "SERVERS" => Some(show_servers(shared)),
            "DATABASES" => Some(show_databases(shared)),
            "CONFIG" => Some(show_config(shared)),
            "VERSION" => Some((vec!["version"], vec![vec![s(format!("pgrelay {}", env!("CARGO_PKG_VERSION")))]])),
            "LISTS" => Some(show_lists(shared)),
            "CLUSTER" => Some(show_cluster(shared)),
            "QUERIES" => Some(show_queries(shared)),
            "SLOW" => Some(show_slow(shared)),
            "HEALTH" => Some(show_health(shared)),
            "HELP" => Some((vec!["command"], HELP.iter().map(|h| vec![s(h)]).collect())),
            _ => {
                error(conn, sqlstate::SYNTAX_ERROR, &format!("unknown SHOW command: {what}; try SHOW HELP"));
                return false;
            }
        },
        ["PAUSE"] | ["PAUSE", _] => {
            set_paused(shared, arg.as_deref(), true);
            protocol::command_complete(&mut conn.wbuf, "PAUSE");
            None
        }
        ["RESUME"] | ["RESUME", _] => {
            set_paused(shared, arg.as_deref(), false);
            protocol::command_complete(&mut conn.wbuf, "RESUME");
            None
        }
        ["RELOAD"] => {
            match shared.reload() {
                Ok(diff) => {
                    info!(changes = diff.changes.len(), "config reloaded from admin console");
                    for k in &diff.restart {
                        protocol::notice_response(
                            &mut conn.wbuf,
                            "55000",
                            &format!(
                                "{k} changed in the file but needs a restart to take effect; the running value stays"
                            ),
                        );
                    }
                    protocol::command_complete(&mut conn.wbuf, "RELOAD");
                }
                Err(e) => error(conn, sqlstate::INTERNAL, &format!("reload failed, old config kept: {e}")),
            }
            None
        }
        ["KILL", _] => {
            let db = arg.unwrap_or_default();
            let mut n = 0;
            for c in shared.clients.iter() {
                if c.database == db {
                    c.kill(sqlstate::ADMIN_SHUTDOWN, "closed by KILL from the admin console".into());
                    n += 1;
                }
            }
            for p in shared.pools.iter() {
                if p.key.database == db {
                    p.drop_idle();
                }
            }
            info!(db = %db, clients = n, "KILL from admin console");
            protocol::command_complete(&mut conn.wbuf, "KILL");
            None
        }
        ["SHUTDOWN"] => {
            info!("SHUTDOWN from admin console");
            protocol::command_complete(&mut conn.wbuf, "SHUTDOWN");
            shared.shutdown.cancel();
            return true;
        }
        _ => {
            error(conn, sqlstate::SYNTAX_ERROR, &format!("unknown admin command: {text}; try SHOW HELP"));
            return false;
        }
    };
    if let Some((cols, rows)) = rows {
        protocol::row_description(&mut conn.wbuf, &cols);
        let n = rows.len();
        for r in rows {
            protocol::data_row(&mut conn.wbuf, &r);
        }
        protocol::command_complete(&mut conn.wbuf, &format!("SHOW {n}"));
    }
    false
}

const HELP: &[&str] = &[
    "SHOW POOLS|STATS|CLIENTS|SERVERS|DATABASES|CONFIG|VERSION|LISTS|HELP",
    "SHOW QUERIES|SLOW|HEALTH|CLUSTER",
    "PAUSE [db]",
    "RESUME [db]",
    "RELOAD",
    "KILL db",
    "SHUTDOWN",
];

fn error(conn: &mut ClientConn, code: &str, msg: &str) {
    protocol::error_response(&mut conn.wbuf, "ERROR", code, msg);
}

fn set_paused(shared: &Shared, db: Option<&str>, paused: bool) {
    match db {
        None => shared.paused.store(paused, Ordering::Release),
        Some(db) => {
            for p in shared.pools.iter() {
                if p.key.database == db {
                    p.paused.store(paused, Ordering::Release);
                }
            }
        }
    }
    if !paused {
        shared.resumed.notify_waiters();
    }
}

fn show_pools(shared: &Shared) -> Rows {
    let cols = vec![
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_active_cancel_req",
        "cl_waiting_cancel_req",
        "sv_active",
        "sv_active_cancel",
        "sv_being_canceled",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    let mut rows = Vec::new();
    for p in shared.pools.iter() {
        let c = p.counts();
        let st = &p.stats;
        let waiting = st.cl_waiting.load(Ordering::Relaxed).max(0);
        let active = (st.cl_active.load(Ordering::Relaxed) - waiting).max(0);
        let idle_clients = (st.clients.load(Ordering::Relaxed) - active - waiting).max(0);
        let maxwait = c.oldest_wait.unwrap_or_default();
        rows.push(vec![
            s(&p.key.database),
            s(&p.key.user),
            s(active + idle_clients),
            s(waiting),
            s(0),
            s(0),
            s(c.total - c.idle),
            s(0),
            s(0),
            s(c.idle),
            s(0),
            s(0),
            s(0),
            s(maxwait.as_secs()),
            s(maxwait.subsec_micros()),
            s(p.settings.load().pool_mode),
        ]);
    }
    rows.sort_by(|a, b| a[0].cmp(&b[0]).then(a[1].cmp(&b[1])));
    (cols, rows)
}

fn show_stats(shared: &Shared) -> Rows {
    let cols = vec![
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ];
    let mut per_db: std::collections::BTreeMap<String, [u64; 8]> = Default::default();
    for p in shared.pools.iter() {
        let st = &p.stats;
        let e = per_db.entry(p.key.database.clone()).or_default();
        for (i, v) in [
            &st.xact_count,
            &st.query_count,
            &st.bytes_received,
            &st.bytes_sent,
            &st.xact_time_us,
            &st.query_time_us,
            &st.wait_time_us,
            &st.wait_count,
        ]
        .iter()
        .enumerate()
        {
            e[i] += v.load(Ordering::Relaxed);
        }
    }
    let uptime = shared.epoch.elapsed().as_secs().max(1);
    let rows = per_db
        .into_iter()
        .map(|(db, v)| {
            let [xc, qc, rx, tx, xt, qt, wt, wc] = v;
            vec![
                s(db),
                s(xc),
                s(qc),
                s(rx),
                s(tx),
                s(xt),
                s(qt),
                s(wt),
                s(xc / uptime),
                s(qc / uptime),
                s(rx / uptime),
                s(tx / uptime),
                s(xt.checked_div(xc).unwrap_or(0)),
                s(qt.checked_div(qc).unwrap_or(0)),
                s(wt.checked_div(wc).unwrap_or(0)),
            ]
        })
        .collect();
    (cols, rows)
}

const CONN_COLS: &[&str] = &[
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
];

fn show_clients(shared: &Shared) -> Rows {
    let now_us = shared.micros(std::time::Instant::now());
    let mut rows: Vec<Vec<Option<String>>> = shared
        .clients
        .iter()
        .map(|c| {
            let since = c.state_since_us.load(Ordering::Relaxed);
            let waited = if c.state() == crate::state::ClientState::Waiting { now_us.saturating_sub(since) } else { 0 };
            let link = c.linked.lock().as_ref().map(|l| format!("{:x}", l.server_id));
            vec![
                s("C"),
                s(&c.user),
                s(&c.database),
                s(c.state().as_str()),
                s(c.addr.ip()),
                s(c.addr.port()),
                c.local.map(|l| l.ip().to_string()),
                c.local.map(|l| l.port().to_string()),
                s(ts(c.connect_time)),
                s(ts(shared.started + std::time::Duration::from_micros(since))),
                s(waited / 1_000_000),
                s(waited % 1_000_000),
                s(0),
                s(format!("{:x}", c.id)),
                link,
                s(0),
                s(if c.tls { "TLS" } else { "" }),
                s(c.application_name.lock().clone()),
            ]
        })
        .collect();
    rows.sort_by(|a, b| a[13].cmp(&b[13]));
    (CONN_COLS.to_vec(), rows)
}

fn show_servers(shared: &Shared) -> Rows {
    let mut linked = std::collections::HashMap::new();
    for c in shared.clients.iter() {
        if let Some(l) = c.linked.lock().as_ref() {
            linked.insert(l.server_id, c.id);
        }
    }
    let mut rows = Vec::new();
    for p in shared.pools.iter() {
        for (id, m, idle) in p.servers() {
            rows.push(vec![
                s("S"),
                s(&p.login.load().user),
                s(&p.key.database),
                s(if idle {
                    "idle"
                } else if linked.contains_key(&id) {
                    "active"
                } else {
                    "used"
                }),
                s(&m.target.host),
                s(m.target.port),
                s("127.0.0.1"),
                s(m.local_port),
                s(ts(m.connect_time)),
                s(ts(m.connect_time)),
                s(0),
                s(0),
                s(0),
                s(format!("{id:x}")),
                linked.get(&id).map(|c| format!("{c:x}")),
                s(m.backend_pid),
                s(""),
                s(""),
            ]);
        }
    }
    (CONN_COLS.to_vec(), rows)
}

fn show_databases(shared: &Shared) -> Rows {
    let cols = vec![
        "name",
        "host",
        "port",
        "database",
        "force_user",
        "pool_size",
        "min_pool_size",
        "reserve_pool",
        "pool_mode",
        "max_connections",
        "current_connections",
        "paused",
        "disabled",
    ];
    let cfg = shared.config.load();
    let mut rows = Vec::new();
    for (name, db) in &cfg.databases {
        let st = cfg.pool_settings(db);
        let route = shared.route(name).and_then(|r| r.borrow().target.clone());
        let current: usize = shared.pools.iter().filter(|p| &p.key.database == name).map(|p| p.counts().total).sum();
        let paused = shared.paused.load(Ordering::Relaxed)
            || shared.pools.iter().any(|p| &p.key.database == name && p.paused.load(Ordering::Relaxed));
        rows.push(vec![
            s(name),
            route.as_ref().map(|t| t.host.clone()).or_else(|| db.patroni.as_ref().map(|p| format!("patroni:{p}"))),
            route.as_ref().map(|t| t.port.to_string()),
            s(db.dbname.clone().unwrap_or_else(|| name.clone())),
            db.user.clone(),
            s(st.pool_size),
            s(st.min_pool_size),
            s(st.reserve_pool_size),
            s(st.pool_mode),
            s(st.max_db_connections),
            s(current),
            s(u8::from(paused)),
            s(0),
        ]);
    }
    (cols, rows)
}

fn show_config(shared: &Shared) -> Rows {
    let cfg = shared.config.load();
    let defaults: std::collections::HashMap<String, String> =
        crate::config::Config::default().flatten().into_iter().collect();
    let rows = cfg
        .flatten()
        .into_iter()
        .map(|(k, v)| {
            let changeable = if crate::config::RESTART_KEYS.contains(&k.as_str()) { "no" } else { "yes" };
            let d = defaults.get(&k).cloned();
            vec![s(k), s(v), d, s(changeable)]
        })
        .collect();
    (vec!["key", "value", "default", "changeable"], rows)
}

fn show_lists(shared: &Shared) -> Rows {
    let cfg = shared.config.load();
    let servers: usize = shared.pools.iter().map(|p| p.counts().total).sum();
    let idle: usize = shared.pools.iter().map(|p| p.counts().idle).sum();
    let rows = vec![
        vec![s("databases"), s(cfg.databases.len())],
        vec![s("users"), s(shared.userlist.load().len())],
        vec![s("pools"), s(shared.pools.len())],
        vec![s("used_clients"), s(shared.clients.len())],
        vec![s("used_servers"), s(servers - idle)],
        vec![s("free_servers"), s(idle)],
    ];
    (vec!["list", "items"], rows)
}

fn show_cluster(shared: &Shared) -> Rows {
    let cols = vec![
        "cluster",
        "member",
        "host",
        "port",
        "role",
        "state",
        "timeline",
        "lag_bytes",
        "routed",
        "reachable",
        "leader_since",
    ];
    let mut rows = Vec::new();
    for c in shared.clusters.iter() {
        let v = c.value().borrow().clone();
        for m in &v.members {
            let routed = v.leader.as_ref().is_some_and(|l| l.name == m.name);
            let since = if routed { v.changed.map(|t| format!("{:.1}s ago", t.elapsed().as_secs_f64())) } else { None };
            rows.push(vec![
                s(c.key()),
                s(&m.name),
                s(&m.host),
                s(m.port),
                s(format!("{:?}", m.role).to_lowercase()),
                s(&m.state),
                m.timeline.map(|t| t.to_string()),
                m.lag_bytes.map(|t| t.to_string()),
                s(routed),
                s(v.reachable),
                since,
            ]);
        }
    }
    (cols, rows)
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn show_queries(shared: &Shared) -> Rows {
    let cols = vec![
        "fingerprint",
        "database",
        "calls",
        "total_ms",
        "mean_ms",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "rows",
        "errors",
        "query",
        "advice",
    ];
    let advice = shared.observer.advice.lock().clone();
    let rows = shared
        .observer
        .stats
        .snapshot()
        .into_iter()
        .map(|q| {
            vec![
                s(format!("{:016x}", q.fingerprint)),
                s(q.database),
                s(q.calls),
                s(ms(q.total_us)),
                s(format!("{:.3}", q.mean_us / 1000.0)),
                s(ms(q.p50_us)),
                s(ms(q.p95_us)),
                s(ms(q.p99_us)),
                s(ms(q.max_us)),
                s(q.rows),
                s(q.errors),
                s(q.query),
                advice.get(&q.fingerprint).cloned(),
            ]
        })
        .collect();
    (cols, rows)
}

fn show_slow(shared: &Shared) -> Rows {
    let cols = vec![
        "time",
        "duration_ms",
        "database",
        "user",
        "client",
        "application_name",
        "fingerprint",
        "query",
        "params",
        "rows",
        "error",
        "server",
    ];
    let rows = shared
        .observer
        .slow
        .recent(200)
        .into_iter()
        .map(|q| {
            let t = UNIX_EPOCH + std::time::Duration::from_secs_f64(q.time.max(0.0));
            vec![
                s(humantime::format_rfc3339_millis(t)),
                s(format!("{:.3}", q.duration_ms)),
                s(q.database),
                s(q.user),
                s(q.client_addr),
                s(q.application_name),
                s(format!("{:016x}", q.fingerprint)),
                s(if q.redacted { q.normalized } else { q.query }),
                s(serde_json::to_string(&q.params).unwrap_or_default()),
                s(q.rows),
                q.error,
                s(q.server),
            ]
        })
        .collect();
    (cols, rows)
}

fn show_health(shared: &Shared) -> Rows {
    let cols = vec![
        "database",
        "score",
        "buffer_hit_ratio_percent",
        "connection_utilization_percent",
        "connections",
        "max_connections",
        "transactions_per_second",
        "deadlocks",
        "temp_files",
        "max_lag_bytes",
        "max_lag_seconds",
        "in_recovery",
        "warnings",
        "error",
    ];
    let rows = shared
        .health
        .snapshot()
        .into_iter()
        .map(|h| {
            let warnings: Vec<String> = h.warnings.iter().map(|w| format!("{}: {}", w.level, w.message)).collect();
            vec![
                s(&h.database),
                s(format!("{:.0}", h.score)),
                s(format!("{:.2}", h.buffer_hit_ratio_percent)),
                s(format!("{:.1}", h.connection_utilization_percent)),
                s(h.connections),
                s(h.max_connections),
                s(format!("{:.1}", h.transactions_per_second)),
                s(h.deadlocks),
                s(h.temp_files),
                s(h.max_lag_bytes),
                s(h.max_lag_seconds),
                s(h.in_recovery),
                s(warnings.join("; ")),
                h.error.clone(),
            ]
        })
        .collect();
    (cols, rows)
}
