//! Configuration: the `proxy.toml` schema with its defaults, loading, validation and the reload diff.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// How long a server connection stays with one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// For the client's whole session.
    Session,
    /// Until the transaction ends (ReadyForQuery 'I').
    Transaction,
    /// Until the statement ends; multi-statement transactions are refused.
    Statement,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        })
    }
}

/// Client authentication method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthType {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

/// A duration written as `"1s"`, `"100ms"`, `"2m"`, or a bare number of seconds; `0` means off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// `None` when the setting is 0 (off).
    pub fn get(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
    const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    const fn ms(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            f.write_str("0")
        } else {
            write!(f, "{}", humantime::format_duration(self.0))
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) if n >= 0.0 && n.is_finite() => Ok(Dur(Duration::from_secs_f64(n))),
            Raw::Num(n) => Err(serde::de::Error::custom(format!("invalid duration {n}"))),
            Raw::Text(s) => {
                let t = s.trim();
                if t == "0" {
                    return Ok(Dur(Duration::ZERO));
                }
                humantime::parse_duration(t)
                    .map(Dur)
                    .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
            }
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// The `[proxy]` table: listener and pool defaults (pgBouncer's knobs).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub listen: String,
    pub pool_mode: PoolMode,
    pub max_client_conn: usize,
    pub default_pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Dur,
    /// Server connections per database across all its users; 0 = unlimited.
    pub max_db_connections: usize,
    pub server_connect_timeout: Dur,
    pub server_login_retry: Dur,
    pub query_timeout: Dur,
    pub query_wait_timeout: Dur,
    pub idle_transaction_timeout: Dur,
    pub client_idle_timeout: Dur,
    pub client_login_timeout: Dur,
    pub server_idle_timeout: Dur,
    pub server_lifetime: Dur,
    pub server_check_query: String,
    pub server_check_delay: Dur,
    pub server_reset_query: String,
    /// Run the reset query in transaction mode too (pgBouncer's server_reset_query_always).
    pub server_reset_query_always: bool,
    pub max_prepared_statements: usize,
    pub max_packet_size: usize,
    pub tcp_keepalive: bool,
    pub tcp_keepcnt: u32,
    pub tcp_keepidle: u64,
    pub tcp_keepintvl: u64,
    pub shutdown_timeout: Dur,
    /// Worker threads for the runtime; 0 = one per core. One (like pgBouncer) spends the least CPU per transaction
    /// when the proxy shares a small host with PostgreSQL (docs/benchmarks.md).
    pub workers: usize,
    /// Keep polling for socket events this long after the last message instead of sleeping in `epoll_wait`: less
    /// latency per hop, a core kept busy while traffic flows. 0 = off (src/busypoll.rs).
    pub busy_poll: Dur,
    /// Parameters a client may set in its startup packet and have applied on every server it gets.
    pub track_extra_parameters: Vec<String>,
    /// Startup parameters silently dropped instead of refused (pgBouncer's ignore_startup_parameters).
    pub ignore_startup_parameters: Vec<String>,
    /// Inline timing, fingerprints and slow-query capture; off only to measure what they cost.
    pub observability: bool,
    /// Not a key: the TLS connector built from `[server_tls]` by `Config::load`. It lives here because
    /// `ServerConn::connect` is handed only `[proxy]`; rebuilding it on every load is what reloads the CA.
    #[serde(skip)]
    pub server_tls: crate::tls::ConnectorSlot,
    /// PID file; also names the run directory where an upgrade hands the listener over and cancels cross over.
    pub pidfile: Option<PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "0.0.0.0:6432".into(),
            pool_mode: PoolMode::Transaction,
            max_client_conn: 1000,
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 0,
            reserve_pool_timeout: Dur::secs(5),
            max_db_connections: 0,
            server_connect_timeout: Dur::secs(5),
            server_login_retry: Dur::secs(1),
            query_timeout: Dur::default(),
            query_wait_timeout: Dur::secs(120),
            idle_transaction_timeout: Dur::default(),
            client_idle_timeout: Dur::default(),
            client_login_timeout: Dur::secs(60),
            server_idle_timeout: Dur::secs(600),
            server_lifetime: Dur::secs(3600),
            server_check_query: "select 1".into(),
            server_check_delay: Dur::secs(30),
            server_reset_query: "DISCARD ALL".into(),
            server_reset_query_always: false,
            max_prepared_statements: 200,
            max_packet_size: 1 << 30,
            tcp_keepalive: true,
            tcp_keepcnt: 3,
            tcp_keepidle: 600,
            tcp_keepintvl: 30,
            shutdown_timeout: Dur::secs(30),
            workers: 1,
            busy_poll: Dur::default(),
            track_extra_parameters: Vec::new(),
            ignore_startup_parameters: vec!["extra_float_digits".into()],
            observability: true,
            server_tls: Default::default(),
            pidfile: None,
        }
    }
}

/// The `[auth]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(rename = "type")]
    pub kind: AuthType,
    /// pgBouncer-format userlist, relative to the config file.
    pub file: Option<PathBuf>,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    /// Users missing from the userlist are looked up with `auth_query`, run as this user (who must be in the userlist).
    pub auth_user: Option<String>,
    /// `$1` is the user name; the query returns (name, secret) with the secret as PostgreSQL stores it.
    pub auth_query: String,
    /// How long a looked-up secret (or its absence) is cached.
    pub auth_cache: Dur,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            kind: AuthType::ScramSha256,
            file: None,
            admin_users: vec!["pgrelay".into()],
            stats_users: Vec::new(),
            auth_user: None,
            auth_query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            auth_cache: Dur::secs(60),
        }
    }
}

/// The `[tls]` table (towards clients).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub mode: TlsMode,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Client-side TLS policy.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Disable,
    Allow,
    Require,
}

/// The `[server_tls]` table (towards PostgreSQL).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub mode: ServerTlsMode,
    /// PEM file of the CA(s) that sign the servers' certificates; needed by verify-ca and verify-full.
    pub ca_file: Option<PathBuf>,
    /// SCRAM-SHA-256-PLUS on pgrelay's own login to PostgreSQL.
    pub channel_binding: ChannelBinding,
}

/// Channel binding towards PostgreSQL, libpq's `channel_binding` names.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChannelBinding {
    /// Plain SCRAM-SHA-256 even over TLS.
    Disable,
    /// SCRAM-SHA-256-PLUS (tls-server-end-point) when the connection is TLS and the server offers it.
    #[default]
    Prefer,
    /// Only SCRAM-SHA-256-PLUS: any other way of logging in (plaintext, trust, password, md5, plain SCRAM)
    /// fails the connection.
    Require,
}

/// Server-side TLS policy, libpq's `sslmode` names.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Plaintext.
    #[default]
    Disable,
    /// TLS if the server offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// TLS or fail; the certificate is not checked (encryption without authentication).
    Require,
    /// TLS with a certificate chain to `ca_file`; any host name.
    VerifyCa,
    /// TLS with a certificate chain to `ca_file` whose name matches the host.
    VerifyFull,
}

/// The `[metrics]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/health`, `/api/*`); empty = off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9091".into() }
    }
}

/// The `[slow_query]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SlowQueryConfig {
    pub threshold: Dur,
    /// JSON-lines file the slow queries are appended to; empty = ring buffer only.
    pub log: Option<PathBuf>,
    pub redact_parameters: bool,
    pub ring_size: usize,
}

impl Default for SlowQueryConfig {
    fn default() -> Self {
        SlowQueryConfig { threshold: Dur::ms(100), log: None, redact_parameters: false, ring_size: 1000 }
    }
}

/// The `[health]` table: the DB health collector.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub enabled: bool,
    pub interval: Dur,
    /// PostgreSQL role the collector logs in as (needs a userlist entry; pg_monitor to see replication lag).
    pub user: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { enabled: true, interval: Dur::secs(5), user: "postgres".into() }
    }
}

/// One `[databases.NAME]` entry: where a client database name is sent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// Host name, IP address, or a directory starting with `/` for a Unix socket.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Database name on the server; defaults to the entry's name.
    pub dbname: Option<String>,
    /// Log in to the server as this user instead of the client's.
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
    pub reserve_pool_size: Option<usize>,
    pub pool_mode: Option<PoolMode>,
    pub max_db_connections: Option<usize>,
    /// Follow the leader of this `[patroni.NAME]` cluster instead of a static host.
    pub patroni: Option<String>,
    /// With `patroni`: `replica` sends this pool to a streaming replica whose lag is below `max_replica_lag`
    /// (falling back to the leader when none qualifies); `primary` (the default) to the leader.
    pub role: Option<DbRole>,
    /// Replication lag limit in bytes for `role = "replica"` (as Patroni's /cluster reports it); default 1 MiB.
    pub max_replica_lag: Option<u64>,
}

/// Which member of a Patroni cluster a database's pool uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DbRole {
    Primary,
    Replica,
}

impl DatabaseConfig {
    /// Unix-socket directory, when `host` is one.
    pub fn unix_dir(&self) -> Option<&str> {
        self.host.as_deref().filter(|h| h.starts_with('/'))
    }
}

/// One `[patroni.NAME]` cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PatroniConfig {
    pub endpoints: Vec<String>,
    pub poll_interval: Dur,
    pub http_timeout: Dur,
    /// etcd client URLs of Patroni's DCS (v3 API). When set, Patroni's `failover` key is watched so that a
    /// switchover stops new transactions on the old leader before it shuts down.
    pub etcd: Vec<String>,
    /// Patroni's `scope` (the cluster name in the DCS); required with `etcd`.
    pub scope: Option<String>,
    /// Patroni's `namespace`.
    pub namespace: String,
    pub etcd_poll_interval: Dur,
    /// Pause between connection attempts while the leader refuses them (crash, shutdown, promotion).
    pub connect_retry: Dur,
}

impl Default for PatroniConfig {
    fn default() -> Self {
        PatroniConfig {
            endpoints: Vec::new(),
            poll_interval: Dur::ms(100),
            http_timeout: Dur::ms(300),
            etcd: Vec::new(),
            scope: None,
            namespace: "/service".into(),
            etcd_poll_interval: Dur::ms(25),
            connect_retry: Dur::ms(50),
        }
    }
}

/// The whole `proxy.toml`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub server_tls: ServerTlsConfig,
    pub metrics: MetricsConfig,
    pub slow_query: SlowQueryConfig,
    pub health: HealthConfig,
    pub databases: BTreeMap<String, DatabaseConfig>,
    pub patroni: BTreeMap<String, PatroniConfig>,
    /// Directory of the config file, to resolve relative paths. Not a key.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// A config that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Invalid { path: PathBuf, key: String, reason: String },
}

/// Settings of one pool after database overrides are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSettings {
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub reserve_pool_size: usize,
    pub max_db_connections: usize,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut cfg = Config::parse(&text, path)?;
        cfg.base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.validate(path)?;
        cfg.load_tls(path)?;
        Ok(cfg)
    }

    /// Parses TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: reason.to_string(),
        };
        let Ok(p) = self.proxy.listen.parse::<std::net::SocketAddr>() else {
            return Err(bad("proxy.listen", "expected an address like 0.0.0.0:6432"));
        };
        if !self.metrics.listen.is_empty() {
            let Ok(m) = self.metrics.listen.parse::<std::net::SocketAddr>() else {
                return Err(bad("metrics.listen", "expected an address like 127.0.0.1:9091"));
            };
            // Both are bound with SO_REUSEPORT (for upgrades), so a shared port would not fail to bind: the kernel
            // would split incoming connections between the client listener and the HTTP one.
            if p.port() == m.port() && (p.ip() == m.ip() || p.ip().is_unspecified() || m.ip().is_unspecified()) {
                return Err(bad("metrics.listen", "must not be the address of proxy.listen"));
            }
        }
        if self.proxy.default_pool_size == 0 {
            return Err(bad("proxy.default_pool_size", "must be at least 1"));
        }
        if self.proxy.max_client_conn == 0 {
            return Err(bad("proxy.max_client_conn", "must be at least 1"));
        }
        if self.proxy.max_packet_size < 1024 {
            return Err(bad("proxy.max_packet_size", "must be at least 1024"));
        }
        if self.proxy.min_pool_size > self.proxy.default_pool_size {
            return Err(bad("proxy.min_pool_size", "must not exceed default_pool_size"));
        }
        if self.tls.mode != TlsMode::Disable && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err(bad("tls.cert", "tls.mode needs tls.cert and tls.key"));
        }
        if matches!(self.server_tls.mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull)
            && self.server_tls.ca_file.is_none()
        {
            return Err(bad("server_tls.ca_file", "verify-ca and verify-full need a CA file"));
        }
        if self.server_tls.channel_binding == ChannelBinding::Require && self.server_tls.mode == ServerTlsMode::Disable
        {
            return Err(bad("server_tls.channel_binding", "\"require\" needs TLS: set server_tls.mode"));
        }
        if self.auth.kind != AuthType::Trust && self.auth.file.is_none() {
            return Err(bad("auth.file", "md5 and scram-sha-256 need a userlist file"));
        }
        for (name, db) in &self.databases {
            let key = |k: &str| format!("databases.{name}.{k}");
            if name == "pgrelay" || name == "pgbouncer" {
                return Err(bad(&format!("databases.{name}"), "name is reserved for the admin console"));
            }
            match (&db.host, &db.patroni) {
                (Some(_), Some(_)) => return Err(bad(&key("patroni"), "give either host or patroni, not both")),
                (None, None) => return Err(bad(&key("host"), "missing (or set patroni)")),
                (None, Some(p)) if !self.patroni.contains_key(p) => {
                    return Err(bad(&key("patroni"), &format!("no [patroni.{p}] section")))
                }
                _ => {}
            }
            if db.role == Some(DbRole::Replica) && db.patroni.is_none() {
                return Err(bad(&key("role"), "role = \"replica\" needs patroni = \"CLUSTER\""));
            }
            if db.pool_size == Some(0) {
                return Err(bad(&key("pool_size"), "must be at least 1"));
            }
        }
        for (name, p) in &self.patroni {
            if p.endpoints.is_empty() {
                return Err(bad(&format!("patroni.{name}.endpoints"), "at least one endpoint"));
            }
            for (k, urls) in [("endpoints", &p.endpoints), ("etcd", &p.etcd)] {
                for e in urls {
                    if !e.starts_with("http://") {
                        return Err(bad(&format!("patroni.{name}.{k}"), &format!("{e:?}: expected http://host:port")));
                    }
                }
            }
            let scope_ok = p.scope.as_deref().is_some_and(|s| !s.is_empty() && !s.contains('/'));
            if !p.etcd.is_empty() && !scope_ok {
                return Err(bad(&format!("patroni.{name}.scope"), "etcd needs Patroni's scope (e.g. \"hft\")"));
            }
            for (k, d) in [
                ("poll_interval", p.poll_interval),
                ("http_timeout", p.http_timeout),
                ("etcd_poll_interval", p.etcd_poll_interval),
                ("connect_retry", p.connect_retry),
            ] {
                if d.0.is_zero() {
                    return Err(bad(&format!("patroni.{name}.{k}"), "must be greater than zero"));
                }
            }
        }
        Ok(())
    }

    /// Checks the client-side certificate and key load, and builds the server-side connector.
    fn load_tls(&mut self, path: &Path) -> Result<(), ConfigError> {
        let bad =
            |key: &str, reason: String| ConfigError::Invalid { path: path.to_path_buf(), key: key.into(), reason };
        crate::tls::Acceptor::from_config(self).map_err(|e| bad("tls.cert", e.to_string()))?;
        let connector =
            crate::tls::Connector::from_config(self).map_err(|e| bad("server_tls.ca_file", e.to_string()))?;
        self.proxy.server_tls = crate::tls::ConnectorSlot(connector);
        Ok(())
    }

    /// Resolves a path from the config relative to the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Pool settings of a database with its overrides applied.
    pub fn pool_settings(&self, db: &DatabaseConfig) -> PoolSettings {
        let p = &self.proxy;
        PoolSettings {
            pool_mode: db.pool_mode.unwrap_or(p.pool_mode),
            pool_size: db.pool_size.unwrap_or(p.default_pool_size),
            min_pool_size: db.min_pool_size.unwrap_or(p.min_pool_size),
            reserve_pool_size: db.reserve_pool_size.unwrap_or(p.reserve_pool_size),
            max_db_connections: db.max_db_connections.unwrap_or(p.max_db_connections),
        }
    }

    /// Flattened `key = value` pairs, for SHOW CONFIG and the reload diff.
    pub fn flatten(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(self) {
            flatten_into("", &toml::Value::Table(t), &mut out);
        }
        out
    }

    /// What a reload from `self` to `new` would change: (key, old, new), plus keys that need a restart.
    pub fn diff(&self, new: &Config) -> ConfigDiff {
        let old: BTreeMap<_, _> = self.flatten().into_iter().collect();
        let new_map: BTreeMap<_, _> = new.flatten().into_iter().collect();
        let mut changes = Vec::new();
        for (k, v) in &old {
            match new_map.get(k) {
                Some(nv) if nv == v => {}
                Some(nv) => changes.push((k.clone(), Some(v.clone()), Some(nv.clone()))),
                None => changes.push((k.clone(), Some(v.clone()), None)),
            }
        }
        for (k, v) in &new_map {
            if !old.contains_key(k) {
                changes.push((k.clone(), None, Some(v.clone())));
            }
        }
        let restart = changes.iter().filter(|(k, _, _)| needs_restart(k)).map(|(k, _, _)| k.clone()).collect();
        ConfigDiff { changes, restart }
    }

    /// Puts back the running values of keys a reload cannot apply (see [`needs_restart`]), so the config in force
    /// says what is really running.
    pub fn keep_restart_keys(&mut self, running: &Config) {
        self.proxy.listen.clone_from(&running.proxy.listen);
        self.proxy.workers = running.proxy.workers;
        self.proxy.busy_poll = running.proxy.busy_poll;
        self.proxy.pidfile.clone_from(&running.proxy.pidfile);
        self.metrics.listen.clone_from(&running.metrics.listen);
        self.patroni.clone_from(&running.patroni);
        // Patroni watchers are wired at start: a database keeps following (or not following) a cluster as it did.
        self.databases.retain(|name, db| {
            let was = running.databases.get(name);
            let was_patroni = was.and_then(|r| r.patroni.as_ref());
            if db.patroni.as_ref() == was_patroni {
                return true;
            }
            match was {
                Some(r) if db.patroni.is_some() || was_patroni.is_some() => {
                    db.host.clone_from(&r.host);
                    db.port = r.port;
                    db.patroni.clone_from(&r.patroni);
                    true
                }
                Some(_) => true,
                None => false,
            }
        });
    }
}

/// Keys a reload cannot apply; they are reported and take effect at the next start.
pub const RESTART_KEYS: &[&str] =
    &["proxy.listen", "proxy.workers", "proxy.busy_poll", "proxy.pidfile", "metrics.listen"];

/// Whether a change of `key` needs a restart: the listeners, the runtime, and the Patroni wiring.
pub fn needs_restart(key: &str) -> bool {
    RESTART_KEYS.contains(&key)
        || key.starts_with("patroni.")
        || (key.starts_with("databases.") && key.ends_with(".patroni"))
}

/// The difference between two configs.
#[derive(Debug, Default)]
pub struct ConfigDiff {
    pub changes: Vec<(String, Option<String>, Option<String>)>,
    pub restart: Vec<String>,
}

impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return writeln!(f, "no changes");
        }
        for (k, old, new) in &self.changes {
            let mark = if self.restart.contains(k) { "  (needs restart)" } else { "" };
            match (old, new) {
                (Some(o), Some(n)) => writeln!(f, "~ {k}: {o} -> {n}{mark}")?,
                (None, Some(n)) => writeln!(f, "+ {k} = {n}{mark}")?,
                (Some(o), None) => writeln!(f, "- {k} (was {o}){mark}")?,
                (None, None) => {}
            }
        }
        Ok(())
    }
}

fn flatten_into(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten_into(&key, v, out);
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_defaults() {
        let c = Config::parse(
            "[proxy]\nquery_timeout = \"250ms\"\nserver_lifetime = 10\n[databases.app]\nhost = \"127.0.0.1\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.proxy.query_timeout.0, Duration::from_millis(250));
        assert_eq!(c.proxy.server_lifetime.0, Duration::from_secs(10));
        assert_eq!(c.proxy.pool_mode, PoolMode::Transaction);
        assert!(c.proxy.idle_transaction_timeout.get().is_none());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[proxy]\nmax_clients = 3\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("max_clients"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::parse("[databases.app]\nport = 5432\n", Path::new("t.toml")).unwrap();
        c.auth.kind = AuthType::Trust;
        let e = c.validate(Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("databases.app.host"), "{e}");
    }

    /// `text` plus a database, parsed and validated with trust auth (no userlist needed).
    fn validated(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::parse(&format!("{text}\n[databases.app]\nhost = \"h\"\n"), Path::new("t.toml"))?;
        c.auth.kind = AuthType::Trust;
        c.validate(Path::new("t.toml")).map(|()| c)
    }

    #[test]
    fn metrics_listen_must_differ_from_proxy_listen() {
        let check = |proxy: &str, metrics: &str| {
            validated(&format!("[proxy]\nlisten = \"{proxy}\"\n[metrics]\nlisten = \"{metrics}\""))
        };
        for (p, m) in
            [("127.0.0.1:6432", "127.0.0.1:6432"), ("0.0.0.0:6432", "127.0.0.1:6432"), ("127.0.0.1:7", "0.0.0.0:7")]
        {
            let e = check(p, m).unwrap_err();
            assert!(e.to_string().contains("metrics.listen"), "{p} {m}: {e}");
        }
        check("127.0.0.1:6432", "127.0.0.1:9091").unwrap();
        check("127.0.0.1:6432", "127.0.0.2:6432").unwrap();
    }

    #[test]
    fn server_channel_binding_key() {
        let parse = validated;
        assert_eq!(parse("").unwrap().server_tls.channel_binding, ChannelBinding::Prefer);
        let c = parse("[server_tls]\nmode = \"require\"\nchannel_binding = \"require\"").unwrap();
        assert_eq!(c.server_tls.channel_binding, ChannelBinding::Require);
        let c = parse("[server_tls]\nchannel_binding = \"disable\"").unwrap();
        assert_eq!(c.server_tls.channel_binding, ChannelBinding::Disable);
        let e = parse("[server_tls]\nchannel_binding = \"require\"").unwrap_err();
        assert!(e.to_string().contains("server_tls.channel_binding") && e.to_string().contains("needs TLS"), "{e}");
        let e = parse("[server_tls]\nmode = \"prefer\"\nchannel_binding = \"always\"").unwrap_err();
        assert!(e.to_string().contains("channel_binding"), "{e}");
    }

    #[test]
    fn diff_lists_changes_and_restart_keys() {
        let a = Config::parse("[databases.app]\nhost = \"h\"\n", Path::new("a")).unwrap();
        let b = Config::parse(
            "[proxy]\nlisten = \"0.0.0.0:7000\"\ndefault_pool_size = 5\n[databases.app]\nhost = \"h\"\n",
            Path::new("b"),
        )
        .unwrap();
        let d = a.diff(&b);
        assert!(d.changes.iter().any(|(k, _, _)| k == "proxy.default_pool_size"));
        assert_eq!(d.restart, vec!["proxy.listen".to_string()]);
    }

    #[test]
    fn reload_keeps_running_values_of_restart_keys() {
        let a = Config::parse(
            "[databases.app]\nhost = \"h\"\n[databases.ha]\npatroni = \"main\"\n[patroni.main]\nendpoints = [\"http://a:1\"]\n",
            Path::new("a"),
        )
        .unwrap();
        let mut b = Config::parse(
            "[proxy]\nlisten = \"0.0.0.0:7000\"\ndefault_pool_size = 5\n[databases.app]\nhost = \"h2\"\n\
             [databases.ha]\nhost = \"x\"\n[databases.new]\npatroni = \"other\"\n\
             [patroni.other]\nendpoints = [\"http://b:1\"]\n",
            Path::new("b"),
        )
        .unwrap();
        let d = a.diff(&b);
        assert!(d.restart.contains(&"databases.ha.patroni".to_string()), "{d}");
        assert!(d.restart.contains(&"patroni.other.endpoints".to_string()), "{d}");
        assert!(!d.restart.contains(&"databases.app.host".to_string()), "{d}");
        b.keep_restart_keys(&a);
        assert_eq!(b.proxy.listen, a.proxy.listen);
        assert_eq!(b.proxy.default_pool_size, 5);
        assert_eq!(b.databases["app"].host.as_deref(), Some("h2"));
        assert_eq!(b.databases["ha"].patroni.as_deref(), Some("main"));
        assert!(!b.databases.contains_key("new"));
        assert_eq!(b.patroni, a.patroni);
    }
}
