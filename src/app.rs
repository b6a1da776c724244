//! Supervisor: binds the listeners, spawns side tasks (janitor, HTTP), wires signals, owns drain and shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::protocol::{self, sqlstate};
use crate::state::{load_userlist, ClientState, Shared};

/// SIGHUP, SIGTERM, SIGINT and SIGUSR2 streams.
pub type SignalHandlers = std::io::Result<(Signal, Signal, Signal, Signal)>;

/// Installs the signal handlers; call it before binding, so a SIGHUP right after start reloads instead of killing the
/// process (the default action).
pub fn signal_handlers() -> SignalHandlers {
    Ok((
        signal(SignalKind::hangup())?,
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::user_defined2())?,
    ))
}
mod handover;
pub use handover::{upgrade, RunDir};

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SHUTDOWN: finish running transactions first.
    Drain,
    /// SIGINT: leave now.
    Fast,
    /// SIGUSR2 (a successor took over the listener): stop accepting, let clients leave on their own up to
    /// shutdown_timeout, then drain.
    Retire,
}

/// Loads the userlist and builds the shared state for `cfg`.
pub fn build(cfg: Config, config_path: PathBuf) -> Result<Arc<Shared>, String> {
    let userlist = load_userlist(&cfg)?;
    Ok(Shared::new(cfg, config_path, userlist))
}

/// Binds the client listener (SO_REUSEADDR and SO_REUSEPORT, so a new binary can bind beside an old one).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// The listening socket for `addr`: taken over from the running pgrelay named by the pidfile when there is one (an
/// upgrade: both processes then accept from one socket, so nothing queued is lost when the old one stops), else bound.
pub fn listen(shared: &Shared, addr: SocketAddr) -> std::io::Result<TcpListener> {
    if let Some(rd) = RunDir::of(shared) {
        if let Some(old) = rd.running_pid().filter(|p| *p != std::process::id()) {
            match handover::take_listener(&rd.ctl_path(old)) {
                Ok(l) if l.local_addr().ok() == Some(addr) => {
                    info!(pid = old, addr = %addr, "took over the listening socket from the running pgrelay");
                    l.set_nonblocking(true)?;
                    return TcpListener::from_std(l);
                }
                Ok(l) => {
                    warn!(pid = old, theirs = ?l.local_addr().ok(), ours = %addr, "running pgrelay listens elsewhere; binding")
                }
                Err(e) => {
                    warn!(pid = old, error = %e, "could not take over the listener; binding beside it (SO_REUSEPORT)")
                }
            }
        }
    }
    bind(addr)
}

/// Runs the proxy until a signal or SHUTDOWN; `listener` is already bound.
pub async fn run(shared: Arc<Shared>, listener: TcpListener, handlers: SignalHandlers) -> std::io::Result<()> {
    raise_fd_limit();
    let tracker = TaskTracker::new();
    let cfg = shared.config.load_full();
    if !cfg.metrics.listen.is_empty() {
        // SO_REUSEPORT here too: during an upgrade the old and the new process both hold the metrics port.
        match cfg.metrics.listen.parse().map_err(std::io::Error::other).and_then(bind) {
            Ok(l) => {
                info!(addr = %cfg.metrics.listen, "metrics endpoint listening");
                tokio::spawn(crate::http::serve(shared.clone(), l));
            }
            Err(e) => {
                error!(addr = %cfg.metrics.listen, error = %e, "cannot bind metrics endpoint")
            }
        }
    }
    if let Some(log) = &cfg.slow_query.log {
        shared.observer.slow.start_writer(cfg.resolve(log));
    }
    start_patroni(&shared);
    if cfg.health.enabled && !cfg.databases.is_empty() {
        tokio::spawn(crate::health::run(
            shared.clone(),
            shared.health.clone(),
            cfg.health.interval.get().unwrap_or(crate::health::DEFAULT_INTERVAL),
            cfg.health.user.clone(),
        ));
    }
    tokio::spawn(janitor(shared.clone()));
    if let Some(window) = cfg.proxy.busy_poll.get() {
        info!(window = ?window, "busy polling on");
        let shared = shared.clone();
        tokio::spawn(async move { shared.busy_poll.run(window).await });
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(signals(shared.clone(), stop_tx, handlers));
    // 1. Control socket (hands the listener to a successor, takes cancels for our clients), 2. pidfile = ready.
    let run_dir = RunDir::of(&shared).map(Arc::new);
    let control = match &run_dir {
        Some(rd) => match handover::Control::start(shared.clone(), rd.ctl_path(std::process::id()), &listener) {
            Ok(c) => {
                rd.write_pid()?;
                Some(c)
            }
            Err(e) => {
                error!(error = %e, "cannot open the control socket; upgrades will bind beside this process");
                rd.write_pid()?;
                None
            }
        },
        None => None,
    };
    info!(addr = %listener.local_addr()?, pid = std::process::id(), "pgrelay listening");
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = stop_rx.changed() => break,
            r = listener.accept() => match r {
                Ok((sock, addr)) => accept(&shared, &tracker, sock, addr, run_dir.clone()),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Stop accepting: our copy of the socket goes; a successor holding it keeps every queued connection.
    drop(listener);
    if let Some(c) = &control {
        c.stop_handover();
    }
    let mut how = stop_rx.borrow().unwrap_or(Stop::Drain);
    if how == Stop::Retire {
        how = retire(&shared, &tracker, &mut stop_rx).await;
    }
    if how == Stop::Fast {
        info!("exiting now (SIGINT)");
    } else {
        shared.shutdown.cancel();
        drain(&shared, &tracker).await;
    }
    if let Some(rd) = &run_dir {
        rd.remove_pid();
    }
    drop(control);
    Ok(())
}

/// Starts a watcher per `[patroni.NAME]` (plus a failover-key watcher when `etcd` is set) and routes the
/// databases that follow it.
fn start_patroni(shared: &Arc<Shared>) {
    use crate::routing::{self, failover, patroni};
    let cfg = shared.config.load_full();
    for (name, pc) in &cfg.patroni {
        let (tx, rx) = tokio::sync::watch::channel(patroni::initial_view());
        let pcfg = patroni::PatroniConfig {
            name: name.clone(),
            endpoints: pc.endpoints.clone(),
            poll_interval: pc.poll_interval.0,
            http_timeout: pc.http_timeout.0,
        };
        tokio::spawn(patroni::watch(pcfg, tx, shared.shutdown.clone()));
        let (key_tx, key_rx) = tokio::sync::watch::channel(failover::FailoverKey::Unknown);
        if !pc.etcd.is_empty() {
            let ecfg = failover::EtcdConfig {
                cluster: name.clone(),
                endpoints: pc.etcd.clone(),
                key: failover::failover_key(&pc.namespace, pc.scope.as_deref().unwrap_or_default()),
                poll_interval: pc.etcd_poll_interval.0,
                http_timeout: pc.http_timeout.0,
            };
            info!(cluster = %name, etcd = ?pc.etcd, key = %ecfg.key, "watching patroni's failover key");
            tokio::spawn(failover::watch(ecfg, key_tx, shared.shutdown.clone()));
        }
        // Without etcd the sender is dropped here and the key stays Unknown (the follower copes with a closed channel).
        let mut senders = Vec::new();
        let mut replica_senders = Vec::new();
        for (db, dc) in &cfg.databases {
            if dc.patroni.as_deref() == Some(name.as_str()) {
                let (rtx, rrx) = routing::pending();
                if dc.role == Some(crate::config::DbRole::Replica) {
                    replica_senders.push((rtx.clone(), dc.max_replica_lag.unwrap_or(1 << 20)));
                } else {
                    senders.push(rtx.clone());
                }
                shared.routes.insert(db.clone(), (rtx, rrx));
            }
        }
        if !replica_senders.is_empty() {
            tokio::spawn(routing::follow_replicas(name.clone(), rx.clone(), replica_senders, shared.shutdown.clone()));
        }
        shared.clusters.insert(name.clone(), rx.clone());
        let m = shared.metrics.clone();
        let label = || vec![("cluster", name.clone())];
        let info_name = name.clone();
        let metrics = routing::ClusterMetrics {
            leader_changes: m.counter("pgrelay_leader_changes_total", &label()),
            reachable: m.gauge("pgrelay_patroni_reachable", &label()),
            switchover_pending: m.gauge("pgrelay_patroni_switchover_pending", &label()),
            etcd_reachable: (!pc.etcd.is_empty()).then(|| m.gauge("pgrelay_patroni_etcd_reachable", &label())),
            leader_info: Box::new(move |member: &str| {
                m.gauge(
                    "pgrelay_patroni_leader_info",
                    &[("cluster", info_name.clone()), ("member", member.to_string())],
                )
            }),
        };
        // Two /cluster polls: long enough that a stale view is not taken for a refused switchover.
        let release_delay = pc.poll_interval.0 * 2 + pc.http_timeout.0;
        tokio::spawn(routing::follow_cluster(
            name.clone(),
            rx,
            key_rx,
            senders,
            metrics,
            release_delay,
            shared.shutdown.clone(),
        ));
        info!(cluster = %name, endpoints = ?pc.endpoints, "following patroni cluster");
    }
}

fn accept(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    sock: TcpStream,
    addr: SocketAddr,
    run_dir: Option<Arc<RunDir>>,
) {
    let max = shared.config.load().proxy.max_client_conn;
    let n = shared.client_count.fetch_add(1, Ordering::AcqRel);
    let shared = shared.clone();
    if n >= max {
        tracker.spawn(async move {
            let mut b = bytes::BytesMut::new();
            protocol::error_response(
                &mut b,
                "FATAL",
                sqlstate::TOO_MANY_CONNECTIONS,
                "no more connections allowed (max_client_conn)",
            );
            let mut sock = sock;
            let _ =
                tokio::time::timeout(Duration::from_secs(1), tokio::io::AsyncWriteExt::write_all(&mut sock, &b)).await;
            shared.client_count.fetch_sub(1, Ordering::AcqRel);
            info!(client = %addr, max, "refused client: max_client_conn reached");
        });
        return;
    }
    tracker.spawn(async move {
        // With a run dir, a cancel key we never issued may belong to the other process of an upgrade.
        if let Some(rd) = run_dir {
            if let Some(k) = Box::pin(handover::peek_cancel(&sock)).await {
                if !shared.cancel_keys.contains_key(&k) {
                    Box::pin(rd.forward_cancel(k)).await;
                    shared.client_count.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        }
        crate::client::serve(shared.clone(), sock, addr).await;
        shared.client_count.fetch_sub(1, Ordering::AcqRel);
    });
}

/// SIGHUP reloads; SIGTERM (drain), SIGINT (fast exit) and SIGUSR2 (retire) are published on `stop`, later ones
/// overriding earlier ones (a SIGTERM while retiring drains now, a SIGINT leaves now).
async fn signals(shared: Arc<Shared>, stop: tokio::sync::watch::Sender<Option<Stop>>, handlers: SignalHandlers) {
    let Ok((mut hup, mut term, mut int, mut usr2)) = handlers else {
        error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading config");
                let _ = shared.reload();
            }
            _ = term.recv() => {
                info!("SIGTERM: draining");
                shared.shutdown.cancel();
                let _ = stop.send(Some(Stop::Drain));
            }
            _ = int.recv() => {
                shared.shutdown.cancel();
                let _ = stop.send(Some(Stop::Fast));
            }
            _ = usr2.recv() => {
                info!("SIGUSR2: retiring (a successor accepts new clients)");
                let _ = stop.send(Some(Stop::Retire));
            }
        }
    }
}

/// Retiring after an upgrade: clients stay until they leave on their own (up to shutdown_timeout), idle server
/// connections of pools nobody uses any more close; then the caller drains the rest at transaction boundaries.
async fn retire(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    stop: &mut tokio::sync::watch::Receiver<Option<Stop>>,
) -> Stop {
    let timeout = shared.config.load().proxy.shutdown_timeout.0;
    let start = Instant::now();
    tracker.close();
    info!(clients = shared.clients.len(), timeout = ?timeout, "retiring: waiting for clients to leave");
    loop {
        for p in shared.pools.iter() {
            if p.stats.clients.load(Ordering::Relaxed) <= 0 {
                p.drop_idle();
            }
        }
        if tracker.is_empty() {
            return Stop::Drain;
        }
        if start.elapsed() >= timeout {
            warn!(
                clients = shared.clients.len(),
                "retire: shutdown_timeout reached; closing clients at transaction boundaries"
            );
            return Stop::Drain;
        }
        tokio::select! {
            _ = tracker.wait() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            r = stop.changed() => {
                let now = if r.is_ok() { *stop.borrow() } else { None };
                if let Some(s @ (Stop::Drain | Stop::Fast)) = now {
                    return s;
                }
            }
        }
    }
}

/// Lets running transactions finish (up to shutdown_timeout), closing clients at their boundaries.
async fn drain(shared: &Arc<Shared>, tracker: &TaskTracker) {
    let timeout = shared.config.load().proxy.shutdown_timeout.0;
    let start = Instant::now();
    tracker.close();
    info!(clients = shared.clients.len(), timeout = ?timeout, "draining");
    loop {
        for c in shared.clients.iter() {
            c.kill(sqlstate::ADMIN_SHUTDOWN, "pgrelay is shutting down".into());
        }
        if tracker.is_empty() || start.elapsed() >= timeout {
            break;
        }
        tokio::select! {
            _ = tracker.wait() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let left = shared.clients.len();
    if left > 0 {
        warn!(clients = left, "shutdown_timeout reached; closing remaining clients");
    }
    for p in shared.pools.iter() {
        p.drop_idle();
    }
    info!(secs = start.elapsed().as_secs_f64(), "drained");
}

/// Periodic work: client timeouts every 100 ms, pool upkeep and gauges every second.
async fn janitor(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    let mut gauges: HashMap<String, [metrics::Gauge; 5]> = HashMap::new();
    let mut query_totals: HashMap<String, (u64, u64)> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        n += 1;
        client_timeouts(&shared);
        let now = Instant::now();
        for p in shared.pools.iter() {
            p.tend_waiters(now);
        }
        if n.is_multiple_of(10) {
            for p in shared.pools.iter() {
                p.janitor();
            }
            pool_gauges(&shared, &mut gauges);
            mean_query_times(&shared, &mut query_totals);
        }
    }
}

fn client_timeouts(shared: &Arc<Shared>) {
    let cfg = shared.config.load();
    let p = &cfg.proxy;
    let (qt, itx, cidle) = (p.query_timeout.get(), p.idle_transaction_timeout.get(), p.client_idle_timeout.get());
    if qt.is_none() && itx.is_none() && cidle.is_none() {
        return;
    }
    let now = shared.micros(Instant::now());
    for c in shared.clients.iter() {
        let state = c.state();
        let since = c.state_since_us.load(Ordering::Relaxed);
        if let Some(qt) = qt {
            let q = c.query_start_us.load(Ordering::Relaxed);
            if q != 0 && now.saturating_sub(q) > qt.as_micros() as u64 {
                // Mark it so the cancel goes out once; the server answers the client with 57014.
                if c.query_start_us.compare_exchange(q, u64::MAX, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    info!(client = %c.addr, db = %c.database, "query_timeout: cancelling query");
                    let (c, tls) = (c.clone(), p.server_tls.0.clone());
                    tokio::spawn(async move { crate::client::cancel_client(&c, tls.as_deref()).await });
                }
            }
        }
        if let Some(t) = itx {
            if c.idle_in_tx.load(Ordering::Relaxed) && now.saturating_sub(since) > t.as_micros() as u64 {
                c.idle_in_tx.store(false, Ordering::Relaxed);
                c.kill(sqlstate::IDLE_IN_TRANSACTION_TIMEOUT, "idle transaction timeout".into());
            }
        }
        if let Some(t) = cidle {
            if state == ClientState::Idle && now.saturating_sub(since) > t.as_micros() as u64 {
                c.set_state(ClientState::Login, now);
                c.kill(sqlstate::IDLE_SESSION_TIMEOUT, "client_idle_timeout".into());
            }
        }
    }
}

fn pool_gauges(shared: &Shared, gauges: &mut HashMap<String, [metrics::Gauge; 5]>) {
    let mut per_db: HashMap<String, [f64; 5]> = HashMap::new();
    for p in shared.pools.iter() {
        let c = p.counts();
        let size = p.settings.load().pool_size as f64;
        let e = per_db.entry(p.key.database.clone()).or_default();
        e[0] += (c.total - c.idle) as f64;
        e[1] += c.idle as f64;
        e[2] += p.stats.cl_waiting.load(Ordering::Relaxed).max(0) as f64;
        e[3] += size;
        e[4] += p.stats.clients.load(Ordering::Relaxed).max(0) as f64;
    }
    for (db, v) in per_db {
        let g = gauges.entry(db.clone()).or_insert_with(|| {
            let m = &shared.metrics;
            let l = |state: &str| [("state", state.to_string()), ("database", db.clone())];
            [
                m.gauge("db_connections_total", &l("active")),
                m.gauge("db_connections_total", &l("idle")),
                m.gauge("db_connections_total", &l("waiting")),
                m.gauge("pgrelay_pool_utilization_percent", &[("database", db.clone())]),
                m.gauge("pgrelay_clients", &[("database", db.clone())]),
            ]
        });
        g[0].set(v[0]);
        g[1].set(v[1]);
        g[2].set(v[2]);
        g[3].set(if v[3] > 0.0 { 100.0 * v[0] / v[3] } else { 0.0 });
        g[4].set(v[4]);
    }
}

/// Feeds the health score the mean query time each database saw over the last second.
fn mean_query_times(shared: &Shared, prev: &mut HashMap<String, (u64, u64)>) {
    let mut now: HashMap<String, (u64, u64)> = HashMap::new();
    for p in shared.pools.iter() {
        let e = now.entry(p.key.database.clone()).or_default();
        e.0 += p.stats.query_count.load(Ordering::Relaxed);
        e.1 += p.stats.query_time_us.load(Ordering::Relaxed);
    }
    for (db, (n, t)) in &now {
        let (pn, pt) = prev.get(db).copied().unwrap_or_default();
        let dn = n.saturating_sub(pn);
        let ms = (dn > 0).then(|| t.saturating_sub(pt) as f64 / dn as f64 / 1000.0);
        shared.health.set_mean_query_ms(db, ms);
    }
    *prev = now;
}

/// Raises the open-files soft limit to the hard limit, so thousands of clients do not hit EMFILE.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                info!(from = old, to = lim.rlim_cur, "raised open-files limit");
            }
        }
    }
}
