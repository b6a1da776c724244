//! Test harness: a real PostgreSQL (initdb into a temp dir, a free port) and a real pgrelay process in front of it.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "secret";

/// Directory of PostgreSQL's server binaries.
pub fn pg_bin() -> PathBuf {
    let dir = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let p = PathBuf::from(dir);
    assert!(
        p.join("initdb").exists(),
        "PostgreSQL server binaries not found in {}: install them with `apt-get install -y postgresql` (or set PG_BIN)",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Free ports for a relay's client and metrics listeners, never the same one. `free_port` can return the port it
/// returned just before (the probe is closed), and pgrelay binds both listeners with SO_REUSEPORT, so one port for
/// both would not fail: the kernel would share the connections between the two listeners, and a client that lands
/// on the metrics one waits for an HTTP request timeout (120 s) before it is hung up on.
pub fn relay_ports() -> (u16, u16) {
    let port = free_port();
    loop {
        let metrics_port = free_port();
        if metrics_port != port {
            return (port, metrics_port);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs a PostgreSQL binary, as the `postgres` user when we are root (initdb and postgres refuse to run as root).
fn pg_command(bin: &str) -> Command {
    let path = pg_bin().join(bin);
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn chown_postgres(p: &Path) {
    if is_root() {
        let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(p).status().expect("chown");
        assert!(st.success(), "chown postgres {}", p.display());
    }
}

/// A template data directory made once per build tree and copied for each test (initdb is the slow part).
fn template() -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let tpl = base.join("pg-template-v2");
    if tpl.join("PG_VERSION").exists() {
        return tpl;
    }
    let tmp = base.join(format!("pg-template-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let pw = tmp.join("pw");
    std::fs::write(&pw, PASSWORD).unwrap();
    chown_postgres(&tmp);
    let _ = Command::new("chmod").arg("755").arg(&base).status();
    let out = pg_command("initdb")
        .arg("-D")
        .arg(tmp.join("data"))
        .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"])
        .arg(format!("--pwfile={}", pw.display()))
        .output()
        .expect("run initdb");
    assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    let data = tmp.join("data");
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    writeln!(
        conf,
        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\nshared_buffers = 64MB\nlisten_addresses = '127.0.0.1'\nlog_min_messages = warning"
    )
    .unwrap();
    // Another test process may have won the race; either template is fine.
    if std::fs::rename(&data, &tpl).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    tpl
}

/// A PostgreSQL server in a temp dir, stopped and removed on drop.
pub struct Pg {
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Pg {
    /// Starts a fresh server (user `postgres`, password `secret`, SCRAM).
    pub fn start() -> Pg {
        let tpl = template();
        let dir = tempfile::Builder::new().prefix("pgrelay-pg-").tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let st = Command::new("cp").arg("-a").arg(&tpl).arg(&data).status().expect("cp");
        assert!(st.success());
        chown_postgres(dir.path());
        let _ = Command::new("chmod").arg("755").arg(dir.path()).status();
        let port = free_port();
        let pg = Pg { port, dir };
        pg.pg_ctl_start();
        pg
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn pg_ctl_start(&self) {
        let out = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("pg.log"))
            .arg("-o")
            .arg(format!("-p {} -k {}", self.port, self.dir.path().display()))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
        );
    }

    /// Stops the server (fast mode).
    pub fn stop(&self) {
        let _ = pg_command("pg_ctl").arg("-D").arg(self.data()).args(["-m", "fast", "-w", "-t", "30", "stop"]).output();
    }

    /// Starts it again after `stop`.
    pub fn restart(&self) {
        self.stop();
        self.pg_ctl_start();
    }

    /// Runs SQL directly against the server with psql, returning trimmed unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        psql_at(self.port, "postgres", PASSWORD, "postgres", sql).expect("psql direct")
    }

    /// Connection string for tokio-postgres, direct.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres password={PASSWORD} dbname=postgres", self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs psql and returns its output (unaligned, tuples only) or its error text.
pub fn psql_at(port: u16, user: &str, password: &str, db: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-U")
        .arg(user)
        .arg("-d")
        .arg(db)
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql not found: apt-get install -y postgresql-client");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// A running pgrelay process, killed on drop.
pub struct Relay {
    pub port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
}

/// The userlist every test relay uses: the PostgreSQL superuser and an admin.
pub const USERLIST: &str = "\"postgres\" \"secret\"\n\"pgrelay\" \"admin\"\n\"stats\" \"stats\"\n";

impl Relay {
    /// Starts pgrelay in front of `pg` with database `postgres`; `proxy_extra` goes into `[proxy]`,
    /// `tail` is appended to the file (more tables).
    pub fn start(pg: &Pg, proxy_extra: &str, tail: &str) -> Relay {
        Relay::start_at(pg.port, proxy_extra, tail)
    }

    /// Like `start`, with database `postgres` on 127.0.0.1:`server_port` (e.g. a recording forwarder).
    pub fn start_at(server_port: u16, proxy_extra: &str, tail: &str) -> Relay {
        let (port, metrics_port) = relay_ports();
        let dir = tempfile::Builder::new().prefix("pgrelay-relay-").tempdir().expect("tempdir");
        std::fs::write(dir.path().join("userlist.txt"), USERLIST).unwrap();
        let cfg = format!(
            "[proxy]\nlisten = \"127.0.0.1:{port}\"\nserver_check_delay = \"0\"\n{proxy_extra}\n\n[auth]\ntype = \"scram-sha-256\"\nfile = \"userlist.txt\"\nadmin_users = [\"pgrelay\"]\nstats_users = [\"stats\"]\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[databases.postgres]\nhost = \"127.0.0.1\"\nport = {server_port}\n\n{tail}\n"
        );
        std::fs::write(dir.path().join("proxy.toml"), cfg).unwrap();
        let mut r = Relay { port, metrics_port, dir, child: None };
        r.spawn();
        r
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }

    /// Starts (or restarts) the process and waits until it accepts connections.
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("pgrelay.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn pgrelay");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "pgrelay did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgrelay.log")).unwrap_or_default()
    }

    pub fn url(&self, user: &str, password: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password={password} dbname=postgres", self.port)
    }

    /// tokio-postgres connection as `postgres` through the relay.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url("postgres", PASSWORD)).await
    }

    /// psql through the relay.
    pub fn psql(&self, user: &str, password: &str, db: &str, sql: &str) -> Result<String, String> {
        psql_at(self.port, user, password, db, sql)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit, returning whether it did within `t`.
    pub fn wait_exit(&mut self, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the metrics/API port; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("metrics port");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- pgrelay log ----\n{}", self.log());
        }
    }
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Like `connect`, returning the error.
pub async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Runs pgbench and returns (stdout+stderr, success).
pub fn pgbench(args: &[&str]) -> (String, bool) {
    let out = Command::new("pgbench")
        .args(args)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .expect("pgbench not found: apt-get install -y postgresql-contrib (or postgresql-15)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (text, out.status.success())
}

/// The server's message text of an error (tokio-postgres displays only "db error").
pub fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())
}

/// Polls every future together on the current task, so tokio-postgres pipelines their messages on one connection.
pub async fn join_all<F: std::future::Future + Unpin>(mut futs: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut results: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if results[i].is_none() {
                match std::pin::Pin::new(f).poll(cx) {
                    Poll::Ready(v) => results[i] = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("all ready")).collect()
}
