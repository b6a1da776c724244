//! Micro-benchmarks of the hot-path pieces, printing ns/op: frame header parsing, the fingerprint normaliser, the
//! per-fingerprint stats table and prepared-statement Parse handling. `cargo bench --bench micro`.
//! (Plain timing loops with black_box; run them on a quiet machine and compare numbers from one run.)

use std::hint::black_box;
use std::time::Instant;

fn time<F: FnMut() -> u64>(name: &str, n: u32, mut f: F) {
    let mut acc = 0u64;
    for _ in 0..n / 10 {
        acc ^= f();
    }
    let start = Instant::now();
    for _ in 0..n {
        acc ^= f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    println!("{name:<44} {ns:>9.1} ns/op   (checksum {:x})", acc & 0xff);
}

fn main() {
    let sql = "SELECT id, name, email FROM users WHERE org_id = 42 AND status IN (1, 2, 3) LIMIT 50";
    let mut q = Vec::new();
    q.push(b'Q');
    q.extend_from_slice(&((4 + sql.len() + 1) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    time("protocol::frame_header (Query)", 10_000_000, || {
        pgrelay::protocol::frame_header(black_box(&q), 1 << 30).ok().flatten().map(|(_, l)| l as u64).unwrap_or(0)
    });
    let mut out = String::new();
    time("fingerprint::normalize (84-byte query)", 1_000_000, || {
        pgrelay::observe::fingerprint::normalize(black_box(sql), &mut out)
    });
    time("fingerprint::fingerprint (84-byte query)", 1_000_000, || {
        pgrelay::observe::fingerprint::fingerprint(black_box(sql))
    });
    time("fingerprint::query_type", 10_000_000, || pgrelay::observe::fingerprint::query_type(black_box(sql)) as u64);
    let table = pgrelay::observe::qstats::QueryStatsTable::new(5000);
    table.record(7, "select 1", "db", 10, 1, false);
    time("qstats::record_known (existing fingerprint)", 10_000_000, || {
        table.record_known(black_box(7), 120, 1, false) as u64
    });
    let mut parse = vec![b's', b'1', 0];
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    time("prepared::from_parse (named Parse)", 1_000_000, || {
        pgrelay::prepared::from_parse(black_box(&parse), |_| 0, 0).map(|(_, p)| p.hash).unwrap_or(0)
    });
    time("prepared::classify (ordinary query)", 10_000_000, || {
        pgrelay::prepared::classify(black_box(sql)).is_some() as u64
    });
}
