//! Scale: 10,000 client connections on one pgrelay (trust auth, a hand-written startup to keep it quick), queries on
//! a sample of them, RSS per idle client, latency of active clients beside the idle ones, FIFO service of waiters.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const CLIENTS: usize = 10_000;

/// Raises this process's open-files soft limit to the hard limit (the test holds 10,000 sockets).
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// A relay with trust auth for clients (the server login still uses the userlist password).
fn trust_relay(pg: &Pg, pool_size: usize) -> Relay {
    let (port, metrics_port) = relay_ports();
    let dir = tempfile::Builder::new().prefix("pgrelay-scale-").tempdir().unwrap();
    std::fs::write(dir.path().join("userlist.txt"), USERLIST).unwrap();
    let cfg = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\nmax_client_conn = 20000\ndefault_pool_size = {pool_size}\n\
         query_wait_timeout = \"30s\"\nserver_check_delay = \"0\"\n\n[auth]\ntype = \"trust\"\nfile = \"userlist.txt\"\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[health]\nenabled = false\n\n\
         [databases.postgres]\nhost = \"127.0.0.1\"\nport = {}\n\n\
         [databases.fifo]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\npool_size = 1\n",
        pg.port, pg.port
    );
    std::fs::write(dir.path().join("proxy.toml"), cfg).unwrap();
    let mut r = Relay { port, metrics_port, dir, child: None };
    r.spawn();
    r
}

fn startup_packet(db: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", "postgres"), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

fn query_packet(sql: &str) -> Vec<u8> {
    let mut p = vec![b'Q'];
    p.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    p.extend_from_slice(sql.as_bytes());
    p.push(0);
    p
}

/// Reads messages until ReadyForQuery; returns the first column of the last DataRow, if any.
fn read_until_ready(s: &mut TcpStream) -> Option<String> {
    let mut value = None;
    loop {
        let mut h = [0u8; 5];
        s.read_exact(&mut h).expect("read header");
        let len = i32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("read body");
        match h[0] {
            b'E' => panic!("error from relay: {}", String::from_utf8_lossy(&body)),
            b'D' => {
                let n = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                value = (n >= 0).then(|| String::from_utf8_lossy(&body[6..6 + n as usize]).into_owned());
            }
            b'Z' => return value,
            _ => {}
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Timed round trips of `select 1` over a few connections.
fn latencies(conns: &mut [TcpStream], rounds: usize) -> Vec<Duration> {
    let q = query_packet("select 1");
    let mut out = Vec::new();
    for _ in 0..rounds {
        for c in conns.iter_mut() {
            let t = Instant::now();
            c.write_all(&q).unwrap();
            assert_eq!(read_until_ready(c).as_deref(), Some("1"));
            out.push(t.elapsed());
        }
    }
    out.sort();
    out
}

#[test]
fn ten_thousand_clients_small_memory_and_fifo_waiters() {
    let limit = raise_nofile();
    assert!(limit as usize > CLIENTS + 500, "hard open-files limit {limit} is too low for {CLIENTS} clients");
    let pg = Pg::start();
    let relay = trust_relay(&pg, 20);
    assert!(relay.log().contains("open-files limit") || relay.log().contains("pgrelay listening"));
    let pid = relay.child.as_ref().unwrap().id();
    let started = Instant::now();

    // Warm up: the pool's first server and the allocator's arenas, so the baseline is a running proxy.
    let mut active: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            s.write_all(&startup_packet("postgres")).unwrap();
            read_until_ready(&mut s);
            s
        })
        .collect();
    let baseline_lat = latencies(&mut active, 50);
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = rss_kib(pid);

    // 1. Open 10,000 connections in batches: write the startups of a batch, then read their answers.
    let startup = startup_packet("postgres");
    let mut idle: Vec<TcpStream> = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS / 500 {
        let mut batch: Vec<TcpStream> = (0..500)
            .map(|_| {
                let s = TcpStream::connect(("127.0.0.1", relay.port)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s
            })
            .collect();
        for s in batch.iter_mut() {
            s.write_all(&startup).unwrap();
        }
        for s in batch.iter_mut() {
            read_until_ready(s);
        }
        idle.extend(batch);
    }
    let opened = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = rss_kib(pid);
    let per_client = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / CLIENTS as f64;
    println!(
        "{CLIENTS} clients open after {opened:?}; pgrelay RSS {rss0} KiB -> {rss1} KiB: {per_client:.0} bytes per idle client"
    );

    // 2. A sample of 500 of them runs a query, all at once: each gets its answer from a pool of 20.
    let q = query_packet("select 42");
    let sample: Vec<usize> = (0..CLIENTS).step_by(CLIENTS / 500).collect();
    for &i in &sample {
        idle[i].write_all(&q).unwrap();
    }
    for &i in &sample {
        assert_eq!(read_until_ready(&mut idle[i]).as_deref(), Some("42"), "client {i}");
    }

    // 3. Active clients' latency with 10,000 idle ones connected.
    let loaded_lat = latencies(&mut active, 50);
    println!(
        "select 1 round trip on 20 active clients: p50 {:?} p99 {:?} alone, p50 {:?} p99 {:?} beside {CLIENTS} idle",
        percentile(&baseline_lat, 0.5),
        percentile(&baseline_lat, 0.99),
        percentile(&loaded_lat, 0.5),
        percentile(&loaded_lat, 0.99),
    );
    assert!(percentile(&loaded_lat, 0.99) < Duration::from_millis(50), "p99 with idle clients: {loaded_lat:?}");

    // 4. FIFO: pool_size 1, 20 clients queued in a known order, each sleeping 50 ms; served in arrival order.
    let n = 20;
    let mut queued: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            s.write_all(&startup_packet("fifo")).unwrap();
            read_until_ready(&mut s);
            s
        })
        .collect();
    let fifo_start = Instant::now();
    for (i, s) in queued.iter_mut().enumerate() {
        let sql = format!(
            "select {i} || ' ' || (extract(epoch from clock_timestamp()) * 1000000)::bigint from pg_sleep(0.05)"
        );
        s.write_all(&query_packet(&sql)).unwrap();
        // Arrival order must be unambiguous: let the relay queue this one before the next arrives.
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut served: Vec<(i64, usize)> = queued
        .iter_mut()
        .map(|s| {
            let v = read_until_ready(s).unwrap();
            let (i, t) = v.split_once(' ').unwrap();
            (t.parse().unwrap(), i.parse().unwrap())
        })
        .collect();
    let fifo_took = fifo_start.elapsed();
    served.sort();
    let order: Vec<usize> = served.iter().map(|(_, i)| *i).collect();
    println!("fifo: {n} queued clients served in order {order:?} in {fifo_took:?}");
    assert_eq!(order, (0..n).collect::<Vec<_>>(), "waiters not served in arrival order");
    assert!(fifo_took < Duration::from_secs(5));

    // The relay is still whole: every connection is counted, nothing was refused.
    let clients = relay.psql("postgres", PASSWORD, "postgres", "select 1");
    assert!(clients.is_ok(), "{clients:?}");
    drop(idle);
    println!("whole test {:?}", started.elapsed());
    assert!(per_client < 64.0 * 1024.0, "{per_client:.0} bytes per idle client");
}
