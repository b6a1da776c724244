//! Real drivers (psycopg 3, asyncpg, node-postgres, pgjdbc) at their default prepared-statement settings through
//! pgrelay in transaction mode, with fewer server connections than clients so statements hop between servers.
//! Each driver's checks live in a script under `tests/drivers/`; a missing runtime is a failure that says what to
//! install, never a skip.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const POOL_SIZE: usize = 4;

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Debian's interpreter: the `python3` on PATH may be a pyenv shim without the system driver packages.
const PYTHON: &str = "/usr/bin/python3";

fn require_python_module(module: &str, package: &str) {
    let ok = Command::new(PYTHON)
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{PYTHON} cannot import {module}: install it with `apt-get install -y {package}` (scripts/install-deps)"
    );
}

fn require_tool(tool: &str, install: &str) {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "`{tool}` not found or not working: {install}");
}

/// What a driver script did, as seen from the outside.
struct Outcome {
    output: String,
    success: bool,
    elapsed: Duration,
    max_servers: usize,
}

/// Number of client backends on the test database other than the observer itself.
fn server_count(pg_port: u16) -> Option<usize> {
    psql_at(
        pg_port,
        "postgres",
        PASSWORD,
        "postgres",
        "select count(*) from pg_stat_activity where backend_type = 'client backend' \
         and datname = 'postgres' and pid <> pg_backend_pid() and application_name <> 'pgrelay-health'",
    )
    .ok()?
    .parse()
    .ok()
}

/// Runs `cmd` against the relay with PG* variables set, killing it after `timeout`, while sampling how many server
/// connections PostgreSQL sees.
fn run_script(pg: &Pg, relay: &Relay, mut cmd: Command, timeout: Duration) -> Outcome {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out_path = out_dir.path().join("output");
    let out = std::fs::File::create(&out_path).unwrap();
    cmd.env("PGHOST", "127.0.0.1")
        .env("PGPORT", relay.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGPASSWORD", PASSWORD)
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stop = AtomicBool::new(false);
    let max_servers = AtomicUsize::new(0);
    let status = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Some(n) = server_count(pg.port) {
                    max_servers.fetch_max(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for driver script") {
                break Some(st);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        stop.store(true, Ordering::Relaxed);
        status
    });
    let elapsed = start.elapsed();
    let mut output = std::fs::read_to_string(&out_path).unwrap_or_default();
    if status.is_none() {
        output.push_str(&format!("\n[killed after the {timeout:?} timeout]"));
    }
    Outcome {
        output,
        success: status.is_some_and(|s| s.success()),
        elapsed,
        max_servers: max_servers.load(Ordering::Relaxed),
    }
}

/// Server connections the admin console reports for the `postgres` pool (active + idle).
fn pool_servers(relay: &Relay) -> usize {
    let out = relay.psql("pgrelay", "admin", "pgrelay", "show pools").expect("admin console show pools");
    // Columns: database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|sv_active|...|sv_idle
    out.lines()
        .filter(|l| l.starts_with("postgres|"))
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            f[6].parse::<usize>().unwrap() + f[9].parse::<usize>().unwrap()
        })
        .sum()
}

fn check(name: &str, build: impl FnOnce() -> Command, timeout: Duration) {
    let pg = Pg::start();
    let relay = Relay::start(&pg, &format!("default_pool_size = {POOL_SIZE}"), "");
    let o = run_script(&pg, &relay, build(), timeout);
    eprintln!(
        "{name}: exit ok = {}, {:.1}s, at most {} server connections seen\n{}",
        o.success,
        o.elapsed.as_secs_f64(),
        o.max_servers,
        o.output.trim()
    );
    assert!(o.success, "{name} failed:\n{}", o.output);
    let sv = pool_servers(&relay);
    assert!(sv <= POOL_SIZE, "show pools: {sv} server connections for a pool of {POOL_SIZE}");
    assert!(
        o.max_servers <= POOL_SIZE,
        "pg_stat_activity saw {} server connections for a pool of {POOL_SIZE}",
        o.max_servers
    );
}

#[test]
fn psycopg3_prepare_threshold_0() {
    require_python_module("psycopg", "python3-psycopg");
    check(
        "psycopg3_check.py",
        || {
            let mut c = Command::new(PYTHON);
            c.arg(drivers_dir().join("python/psycopg3_check.py"));
            c
        },
        Duration::from_secs(180),
    );
}

#[test]
fn asyncpg_defaults() {
    require_python_module("asyncpg", "python3-asyncpg");
    check(
        "asyncpg_check.py",
        || {
            let mut c = Command::new(PYTHON);
            c.arg(drivers_dir().join("python/asyncpg_check.py"));
            c
        },
        Duration::from_secs(180),
    );
}

/// Installs node-postgres from the committed lockfile unless it is already there.
fn npm_ci(dir: &Path) {
    if dir.join("node_modules/pg/package.json").exists() {
        return;
    }
    let out =
        Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(dir).output().expect("run npm ci");
    assert!(
        out.status.success(),
        "npm ci in {} failed (node-postgres comes from the npm registry):\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_pg_named_queries() {
    require_tool("node", "install Node.js (scripts/install-deps installs Debian's nodejs)");
    require_tool("npm", "install npm (scripts/install-deps installs Debian's npm)");
    let dir = drivers_dir().join("node");
    npm_ci(&dir);
    check(
        "pg_check.js",
        || {
            let mut c = Command::new("node");
            c.arg(dir.join("pg_check.js")).current_dir(&dir);
            c
        },
        Duration::from_secs(180),
    );
}

#[test]
fn pgjdbc_prepare_threshold_1() {
    require_tool("javac", "install a JDK: apt-get install -y default-jdk-headless");
    require_tool("java", "install a JDK: apt-get install -y default-jdk-headless");
    let jar = std::env::var("PGJDBC_JAR").unwrap_or_else(|_| "/usr/share/java/postgresql.jar".into());
    assert!(
        Path::new(&jar).exists(),
        "pgjdbc not found at {jar}: apt-get install -y libpostgresql-jdbc-java (or set PGJDBC_JAR)"
    );
    let classes = tempfile::tempdir().expect("tempdir");
    let out = Command::new("javac")
        .arg("-cp")
        .arg(&jar)
        .arg("-d")
        .arg(classes.path())
        .arg(drivers_dir().join("java/PgjdbcCheck.java"))
        .output()
        .expect("run javac");
    assert!(out.status.success(), "javac PgjdbcCheck.java failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let cp = format!("{}:{jar}", classes.path().display());
    check(
        "PgjdbcCheck",
        || {
            let mut c = Command::new("java");
            c.arg("-cp").arg(&cp).arg("PgjdbcCheck");
            c
        },
        Duration::from_secs(180),
    );
}
