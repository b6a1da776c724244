//! A short smoke run of every fuzz target on stable Rust: the seed corpus in `fuzz/corpus/<target>/`, then
//! random mutations of it for `PGRELAY_FUZZ_SECS` seconds per target (default 2). The real fuzzing is
//! `scripts/fuzz` (cargo-fuzz, libFuzzer, nightly); this keeps CI honest that no target panics on its corpus.

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .collect();
    assert!(!out.is_empty(), "empty corpus {}", dir.display());
    out.sort();
    out
}

/// Byte flips, interesting values (lengths and counts at their edges), insertions, deletions and splices.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    const INTERESTING: &[&[u8]] =
        &[&[0], &[0xff], &[0x7f, 0xff, 0xff, 0xff], &[0x80, 0, 0, 0], &[0, 0, 0, 4], &[0xff, 0xff], &[0, 0], b","];
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let val = INTERESTING[rng.below(INTERESTING.len())];
                let end = (at + val.len()).min(v.len());
                v.splice(at..end, val.iter().copied());
            }
            2 => v.insert(at, rng.next() as u8),
            3 if at < v.len() => {
                let end = (at + 1 + rng.below(8)).min(v.len());
                v.drain(at..end);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                v.splice(at..at, other[from..].iter().copied().take(64));
            }
            _ => v.truncate(at),
        }
    }
    v
}

fn smoke(target: &str, f: fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        f(s);
    }
    let secs = std::env::var("PGRELAY_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds);
        let r = std::panic::catch_unwind(|| f(&input));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("pgrelay-fuzz-{target}-crash"));
            let _ = std::fs::write(&path, &input);
            panic!("{target} panicked on {input:?} (saved to {})", path.display());
        }
        runs += 1;
    }
    eprintln!("{target}: {} seeds, {runs} mutated inputs", seeds.len());
}

#[test]
fn frame_header() {
    smoke("frame_header", targets::frame_header);
}

#[test]
fn startup() {
    smoke("startup", targets::startup);
}

#[test]
fn scram() {
    smoke("scram", targets::scram);
}

#[test]
fn fingerprint() {
    smoke("fingerprint", targets::fingerprint);
}

#[test]
fn prepared() {
    smoke("prepared", targets::prepared);
}
