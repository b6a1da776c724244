//! The process-wide state handed to every task as `Arc<Shared>`: config, userlist, pools, clients, metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::auth::Userlist;
use crate::config::Config;
use crate::observe::Metrics;
use crate::pool::{DbLimit, Pool, PoolKey};
use crate::routing::Route;
use crate::server::{Login, Target};

/// Client states, as SHOW CLIENTS reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    Login = 0,
    Idle = 1,
    Waiting = 2,
    Active = 3,
}

impl ClientState {
    fn from_u8(v: u8) -> ClientState {
        match v {
            1 => ClientState::Idle,
            2 => ClientState::Waiting,
            3 => ClientState::Active,
            _ => ClientState::Login,
        }
    }

    /// pgBouncer's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Login => "login",
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// Where a client's cancel request must go while it is linked.
#[derive(Clone, Debug)]
pub struct CancelTarget {
    pub target: Arc<Target>,
    pub pid: i32,
    pub key: i32,
    pub server_id: u64,
}

/// What the rest of the process may see or do to one client session.
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    pub user: String,
    pub database: String,
    pub application_name: Mutex<String>,
    pub connect_time: SystemTime,
    pub cancel_key: (i32, i32),
    pub linked: Mutex<Option<CancelTarget>>,
    pub(crate) state: AtomicU8,
    /// Micros since `Shared::epoch` when the current state began.
    pub state_since_us: AtomicU64,
    /// Micros since epoch when the oldest in-flight query started; 0 = none.
    pub query_start_us: AtomicU64,
    /// Set when the server is idle inside a transaction, waiting for this client.
    pub idle_in_tx: AtomicBool,
    pub kill: KillSignal,
    pub kill_reason: Mutex<Option<(&'static str, String)>>,
    pub tls: bool,
}

impl ClientInfo {
    /// Current state.
    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Changes state and stamps the time.
    #[inline]
    pub fn set_state(&self, s: ClientState, now_us: u64) {
        self.state.store(s as u8, Ordering::Relaxed);
        self.state_since_us.store(now_us, Ordering::Relaxed);
    }

    /// Asks the session to end with an error (`code`, `message`).
    pub fn kill(&self, code: &'static str, message: String) {
        *self.kill_reason.lock() = Some((code, message));
        self.kill.fire();
    }
}

/// The "end this session" signal of one client: set by [`ClientInfo::kill`], polled by the session each time it
/// waits for data. Polling it takes no lock (a `Notify` takes its waiter-list mutex on every poll, and a session polls
/// once or twice per message).
#[derive(Default)]
pub struct KillSignal {
    fired: AtomicBool,
    waker: atomic_waker::AtomicWaker,
}

impl KillSignal {
    /// Raises the signal and wakes the session.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Ready once per `fire` (taking the signal down again), else registers the task to be woken.
    pub fn poll_fired(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // Register first, then look: a fire in between finds the new waker, so it cannot be missed.
        self.waker.register(cx.waker());
        if self.fired.load(Ordering::Acquire) && self.fired.swap(false, Ordering::AcqRel) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// Everything shared.
pub struct Shared {
    pub config: Arc<ArcSwap<Config>>,
    pub config_path: std::path::PathBuf,
    pub userlist: ArcSwap<Userlist>,
    pub pools: DashMap<PoolKey, Arc<Pool>>,
    pub routes: DashMap<String, (watch::Sender<Route>, watch::Receiver<Route>)>,
    /// Latest view of each Patroni cluster, for SHOW CLUSTER.
    pub clusters: DashMap<String, watch::Receiver<crate::routing::patroni::ClusterView>>,
    pub db_limits: DashMap<String, Arc<DbLimit>>,
    pub clients: DashMap<u64, Arc<ClientInfo>>,
    pub cancel_keys: DashMap<(i32, i32), Arc<ClientInfo>>,
    pub metrics: Arc<Metrics>,
    pub observer: Arc<crate::observe::Observer>,
    pub health: Arc<crate::health::HealthMonitor>,
    pub client_count: AtomicUsize,
    pub next_client_id: AtomicU64,
    pub epoch: Instant,
    pub started: SystemTime,
    /// Stop accepting; set by SIGTERM / SHUTDOWN.
    pub shutdown: CancellationToken,
    pub paused: AtomicBool,
    pub resumed: Notify,
    pub reload_failures: AtomicU64,
    /// SCRAM verifiers made from plaintext userlist passwords, once per user and password (PBKDF2 is the expensive
    /// part of a login).
    pub plain_verifiers: DashMap<String, (String, crate::auth::Secret)>,
    /// Secrets looked up with `[auth] auth_query`, with when they were fetched (`None`: no such user).
    pub auth_cache: DashMap<String, (Instant, Option<crate::auth::Secret>)>,
    /// TLS towards clients; swapped by reload so new handshakes use the new certificate.
    pub tls: arc_swap::ArcSwapOption<crate::tls::Acceptor>,
    /// Busy polling, when `proxy.busy_poll` is set: sessions touch it per event.
    pub busy_poll: crate::busypoll::BusyPoll,
    reload_lock: Mutex<()>,
}

impl Shared {
    /// Builds the shared state for a loaded config.
    pub fn new(config: Config, config_path: std::path::PathBuf, userlist: Userlist) -> Arc<Shared> {
        let observer = Arc::new(crate::observe::Observer::new(&config));
        // Config::load already loaded the certificate once, so this fails only if the files changed since.
        let tls = crate::tls::Acceptor::from_config(&config).unwrap_or_else(|e| {
            tracing::error!(error = %e, "tls certificate could not be loaded; TLS is off");
            None
        });
        Arc::new(Shared {
            tls: arc_swap::ArcSwapOption::new(tls),
            busy_poll: Default::default(),
            observer,
            health: crate::health::HealthMonitor::new(),
            config: Arc::new(ArcSwap::from_pointee(config)),
            config_path,
            userlist: ArcSwap::from_pointee(userlist),
            pools: DashMap::new(),
            routes: DashMap::new(),
            clusters: DashMap::new(),
            db_limits: DashMap::new(),
            clients: DashMap::new(),
            cancel_keys: DashMap::new(),
            metrics: Arc::new(Metrics::new()),
            client_count: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(1),
            epoch: Instant::now(),
            started: SystemTime::now(),
            shutdown: CancellationToken::new(),
            paused: AtomicBool::new(false),
            resumed: Notify::new(),
            reload_failures: AtomicU64::new(0),
            plain_verifiers: DashMap::new(),
            auth_cache: DashMap::new(),
            reload_lock: Mutex::new(()),
        })
    }

    /// A user's secret: the userlist's, else (with `[auth] auth_user`) what `auth_query` returns from `database`'s
    /// server, cached for `auth_cache`.
    pub async fn secret_for(&self, user: &str, database: &str) -> Option<crate::auth::Secret> {
        if let Some(s) = self.userlist.load().get(user) {
            return Some(s.clone());
        }
        let cfg = self.config.load_full();
        let auth_user = cfg.auth.auth_user.clone()?;
        if let Some(e) = self.auth_cache.get(user) {
            if e.0.elapsed() < cfg.auth.auth_cache.0 {
                return e.1.clone();
            }
        }
        let dbc = cfg.databases.get(database)?;
        let target = self.route(database)?.borrow().target.clone()?;
        let login = Login {
            user: auth_user.clone(),
            database: dbc.dbname.clone().unwrap_or_else(|| database.to_string()),
            secret: self.userlist.load().get(&auth_user).cloned(),
            scram_keys: None,
        };
        let sql = cfg.auth.auth_query.replace("$1", &crate::protocol::quote_literal(user));
        let looked_up = async {
            let mut conn = crate::server::ServerConn::connect(target, &login, &cfg.proxy, 0).await?;
            let rows = conn.query_column(&sql).await;
            conn.terminate().await;
            rows
        };
        match looked_up.await {
            Ok(rows) => {
                let secret = rows
                    .into_iter()
                    .next()
                    .and_then(|r| r.into_iter().nth(1).flatten())
                    .map(|p| crate::auth::Secret::parse(&p));
                self.auth_cache.insert(user.to_string(), (Instant::now(), secret.clone()));
                secret
            }
            Err(e) => {
                tracing::warn!(user = %user, auth_user = %auth_user, error = %e, "auth_query failed");
                None
            }
        }
    }

    /// The secret a SCRAM exchange with a client uses: a plaintext password becomes a verifier, computed once.
    pub fn scram_secret(&self, user: &str, secret: &crate::auth::Secret) -> crate::auth::Secret {
        let crate::auth::Secret::Plain(pw) = secret else { return secret.clone() };
        if let Some(e) = self.plain_verifiers.get(user) {
            if e.0 == *pw {
                return e.1.clone();
            }
        }
        let salt: [u8; 16] = rand::random();
        let v = crate::auth::Secret::Scram(crate::auth::ScramVerifier::from_password(pw, &salt, 4096));
        self.plain_verifiers.insert(user.to_string(), (pw.clone(), v.clone()));
        v
    }

    /// Micros since start, for cheap timestamps in atomics.
    #[inline]
    pub fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// The route of a configured database, creating a fixed one for static hosts on first use.
    pub fn route(&self, db: &str) -> Option<watch::Receiver<Route>> {
        if let Some(r) = self.routes.get(db) {
            return Some(r.1.clone());
        }
        let cfg = self.config.load();
        let dbc = cfg.databases.get(db)?;
        let host = dbc.host.clone()?;
        let (tx, rx) = crate::routing::fixed(Target { host, port: dbc.port.unwrap_or(5432) });
        let entry = self.routes.entry(db.to_string()).or_insert((tx, rx));
        Some(entry.1.clone())
    }

    /// The pool for (database, user), created on first use. `None` if the database is not configured.
    pub fn pool(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let key = PoolKey { database: database.to_string(), user: user.to_string() };
        if let Some(p) = self.pools.get(&key) {
            return Some(p.clone());
        }
        let cfg = self.config.load_full();
        let dbc = cfg.databases.get(database)?;
        let route = self.route(database)?;
        let login = self.login_for(&key, dbc);
        let limit = self.db_limits.entry(database.to_string()).or_default().clone();
        let metrics = self.metrics.pool(database, cfg.proxy.observability);
        let pool = Arc::new(Pool::new(
            key.clone(),
            login,
            cfg.pool_settings(dbc),
            self.config.clone(),
            route,
            dbc.patroni.is_some() && dbc.role != Some(crate::config::DbRole::Replica),
            metrics,
            limit.clone(),
        ));
        let pool = self.pools.entry(key).or_insert(pool).clone();
        limit.register(&pool);
        Some(pool)
    }
}

impl Shared {
    /// Re-reads the config file (and userlist) and applies the difference; on any error the old config stays.
    pub fn reload(&self) -> Result<crate::config::ConfigDiff, String> {
        // SIGHUP and the admin RELOAD may race; one reload at a time keeps "old" and "new" meaningful.
        let _one_at_a_time = self.reload_lock.lock();
        let r = self.try_reload();
        if let Err(e) = &r {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
            self.metrics.counter("pgrelay_config_reload_failures_total", &[]).increment(1);
            tracing::error!(file = %self.config_path.display(), error = %e, "config reload failed; keeping the old config");
        }
        r
    }

    fn try_reload(&self) -> Result<crate::config::ConfigDiff, String> {
        // 1. Everything that can fail happens before anything is applied.
        let new = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let userlist = load_userlist(&new).map_err(|e| format!("auth.file: {e}"))?;
        let tls = crate::tls::Acceptor::from_config(&new).map_err(|e| e.to_string())?;
        let old = self.config.load_full();
        let diff = old.diff(&new);
        for k in &diff.restart {
            tracing::warn!(key = %k, "changed key needs a restart to take effect; the running value stays");
        }
        // 2. Keys that need a restart keep their running values, so SHOW CONFIG tells what is in force.
        let mut new = new;
        new.keep_restart_keys(&old);
        let new = Arc::new(new);
        self.config.store(new.clone());
        self.observer.configure(&new);
        self.userlist.store(Arc::new(userlist));
        self.tls.store(tls);
        // 3. Pools follow their database entry: sizes in place, a new login or target retires old connections, a
        //    removed database drains. Pools whose entry did not change keep every connection.
        let mut removed = Vec::new();
        for p in self.pools.iter() {
            let Some(db) = new.databases.get(&p.key.database) else {
                p.retired.store(true, Ordering::Relaxed);
                p.drop_idle();
                removed.push(p.key.clone());
                continue;
            };
            p.settings.store(Arc::new(new.pool_settings(db)));
            p.resize();
            let login = self.login_for(&p.key, db);
            let cur = p.login.load();
            let same_login = cur.user == login.user && cur.database == login.database && cur.secret == login.secret;
            if !same_login {
                let relogin = cur.user != login.user || cur.database != login.database;
                p.login.store(Arc::new(Login { scram_keys: cur.scram_keys, ..login }));
                // A new password only matters for new connections; another user or dbname retires the old ones.
                if relogin {
                    if let Some(r) = self.routes.get(&p.key.database) {
                        r.0.send_modify(|route| route.generation += 1);
                    }
                    p.drop_idle();
                }
            }
        }
        // Retired pools leave the map: clients still on them finish, a database added back later gets a fresh pool.
        for k in removed {
            self.pools.remove(&k);
            tracing::info!(db = %k.database, user = %k.user, "database removed; its pool drains");
        }
        // 4. A static database whose host/port changed: publish the new target (bumps the route generation), close
        //    idle connections to the old one now; linked ones finish their transaction there and close on check-in.
        for (name, db) in &new.databases {
            if let (Some(host), Some(r)) = (&db.host, self.routes.get(name)) {
                let t = Target { host: host.clone(), port: db.port.unwrap_or(5432) };
                if crate::routing::publish(&r.0, Some(t)) {
                    tracing::info!(db = %name, host = %host, port = db.port.unwrap_or(5432), "database moved; old connections drain");
                    for p in self.pools.iter().filter(|p| &p.key.database == name) {
                        p.drop_idle();
                    }
                }
            }
        }
        self.routes.retain(|name, _| new.databases.contains_key(name));
        tracing::info!(changes = diff.changes.len(), restart = ?diff.restart, "config reloaded");
        Ok(diff)
    }

    /// The server login a pool of `key` uses under database entry `db`.
    fn login_for(&self, key: &PoolKey, db: &crate::config::DatabaseConfig) -> Login {
        let user = db.user.clone().unwrap_or_else(|| key.user.clone());
        let secret = match &db.password {
            Some(pw) => Some(crate::auth::Secret::parse(pw)),
            None => self
                .userlist
                .load()
                .get(&user)
                .cloned()
                .or_else(|| self.auth_cache.get(&user).and_then(|e| e.1.clone())),
        };
        Login { user, database: db.dbname.clone().unwrap_or_else(|| key.database.clone()), secret, scram_keys: None }
    }
}

/// Loads the userlist named by the config (an empty one when there is none).
pub fn load_userlist(cfg: &Config) -> Result<Userlist, String> {
    match &cfg.auth.file {
        None => Ok(Userlist::default()),
        Some(f) => {
            let path = cfg.resolve(f);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            Userlist::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}
