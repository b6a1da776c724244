//! Owns the bounded, sharded table of per-fingerprint query statistics and its latency histograms.
//!
//! # Percentile accuracy
//!
//! Each entry keeps a fixed log-linear histogram: values 0..8 µs get one exact bucket each, and
//! every power-of-two range above that is split into 8 equal sub-buckets, up to 2^27 µs (~134 s);
//! larger values land in the last bucket. A bucket's width is at most 1/8 of its lower bound and
//! percentiles report the bucket midpoint, so the relative error of p50/p95/p99 is at most
//! 1/16 = 6.25 % for values up to ~134 s (further clamped to the exact observed min/max).
//!
//! # Eviction
//!
//! Capacity is split across shards and each shard evicts on its own: when a new fingerprint
//! arrives at a full shard, the shard's entry with the smallest `total_us` is dropped. That costs an
//! O(capacity / shards) scan, but only when inserting a *new* fingerprint into a full shard; the
//! record path for a known fingerprint is a hash lookup under one shard lock, without allocation.
//! Because eviction is per shard, "heaviest kept" holds within each shard: the globally heaviest
//! `capacity / shards - 1` entries are always retained, lighter ones may survive in a quiet shard
//! while a slightly heavier one is evicted from a busy shard.

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Capacity recommended for a proxy: enough distinct statements for typical applications while
/// keeping the table around a few MB.
pub const DEFAULT_CAPACITY: usize = 5000;
/// Stored query text is cut to this many bytes (at a char boundary).
pub const MAX_QUERY_TEXT: usize = 2048;

const SHARDS: usize = 16;
/// Below this capacity sharding would leave shards with a handful of slots (or none), which makes
/// per-shard eviction too far from the global policy, so a single shard is used.
const MIN_CAPACITY_FOR_SHARDING: usize = SHARDS * 16;

const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = 200;

/// Fingerprints are already well-mixed 64-bit hashes, so hashing them again would be wasted work.
#[derive(Default)]
struct FpHasher(u64);

impl Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if keys other than u64 are ever used; keep it correct, not fast.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type FpMap = HashMap<u64, Entry, BuildHasherDefault<FpHasher>>;

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let sub = ((v >> shift) - SUB) as usize;
    let idx = (msb - SUB_BITS + 1) as usize * SUB as usize + sub;
    idx.min(BUCKETS - 1)
}

/// Representative value (midpoint) of a bucket.
fn bucket_mid(idx: usize) -> u64 {
    if (idx as u64) < SUB {
        return idx as u64;
    }
    let group = idx as u64 / SUB;
    let sub = idx as u64 % SUB;
    let shift = group - 1;
    let lo = (SUB + sub) << shift;
    let width = 1u64 << shift;
    lo + width / 2
}

struct Entry {
    query: Box<str>,
    database: Box<str>,
    calls: u64,
    errors: u64,
    rows: u64,
    total_us: u64,
    max_us: u64,
    min_us: u64,
    // Boxed so map slots stay small and a rehash moves 80 bytes, not 880.
    hist: Box<[u32; BUCKETS]>,
}

impl Entry {
    fn new(text: &str, database: &str) -> Self {
        Entry {
            query: truncate(text, MAX_QUERY_TEXT).into(),
            database: database.into(),
            calls: 0,
            errors: 0,
            rows: 0,
            total_us: 0,
            max_us: 0,
            min_us: u64::MAX,
            hist: Box::new([0; BUCKETS]),
        }
    }

    fn add(&mut self, duration_us: u64, rows: u64, error: bool) {
        self.calls = self.calls.saturating_add(1);
        self.errors = self.errors.saturating_add(u64::from(error));
        self.rows = self.rows.saturating_add(rows);
        self.total_us = self.total_us.saturating_add(duration_us);
        self.max_us = self.max_us.max(duration_us);
        self.min_us = self.min_us.min(duration_us);
        let b = bucket_of(duration_us);
        if self.hist[b] == u32::MAX {
            // Halving every bucket keeps the distribution's shape (and so the percentiles) while
            // letting a long-lived hot query keep counting in 4-byte buckets.
            for c in self.hist.iter_mut() {
                *c -= *c / 2;
            }
        }
        self.hist[b] += 1;
    }

    fn percentile(&self, q: f64) -> u64 {
        let total: u64 = self.hist.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for (idx, &c) in self.hist.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return bucket_mid(idx).clamp(self.min_us, self.max_us);
            }
        }
        self.max_us
    }

    fn snapshot(&self, fp: u64) -> QueryStat {
        QueryStat {
            fingerprint: fp,
            query: self.query.to_string(),
            database: self.database.to_string(),
            calls: self.calls,
            errors: self.errors,
            rows: self.rows,
            total_us: self.total_us,
            mean_us: if self.calls == 0 { 0.0 } else { self.total_us as f64 / self.calls as f64 },
            max_us: self.max_us,
            min_us: if self.calls == 0 { 0 } else { self.min_us },
            p50_us: self.percentile(0.50),
            p95_us: self.percentile(0.95),
            p99_us: self.percentile(0.99),
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Shard {
    map: FpMap,
    cap: usize,
}

/// Bounded per-fingerprint statistics, safe to share between connection tasks.
pub struct QueryStatsTable {
    shards: Box<[Mutex<Shard>]>,
    evicted: AtomicU64,
}

impl Default for QueryStatsTable {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl QueryStatsTable {
    /// `capacity` is the maximum number of distinct fingerprints kept (a capacity of 0 is
    /// treated as 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let n = if capacity >= MIN_CAPACITY_FOR_SHARDING { SHARDS } else { 1 };
        let shards = (0..n)
            .map(|i| Mutex::new(Shard { map: FpMap::default(), cap: capacity / n + usize::from(i < capacity % n) }))
            .collect();
        QueryStatsTable { shards, evicted: AtomicU64::new(0) }
    }

    fn shard(&self, fp: u64) -> &Mutex<Shard> {
        // Bits 32.. are used because HashMap takes its bucket index from the low bits and its
        // control tag from the top 7; choosing the shard from either would skew them per shard.
        let idx = ((fp >> 32) as usize) % self.shards.len();
        &self.shards[idx]
    }

    /// Record one execution. `text` is only copied when the fingerprint is new (the normalised
    /// text, truncated to 2 KiB at a char boundary).
    /// Records one execution of an already known fingerprint; `false` if it is not in the table (call `record`).
    pub fn record_known(&self, fp: u64, duration_us: u64, rows: u64, error: bool) -> bool {
        let mut shard = self.shard(fp).lock();
        match shard.map.get_mut(&fp) {
            Some(e) => {
                e.add(duration_us, rows, error);
                true
            }
            None => false,
        }
    }

    pub fn record(&self, fp: u64, text: &str, database: &str, duration_us: u64, rows: u64, error: bool) {
        let mut shard = self.shard(fp).lock();
        if let Some(e) = shard.map.get_mut(&fp) {
            e.add(duration_us, rows, error);
            return;
        }
        if shard.map.len() >= shard.cap {
            let victim = shard.map.iter().min_by_key(|(k, e)| (e.total_us, **k)).map(|(k, _)| *k);
            if let Some(k) = victim {
                shard.map.remove(&k);
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut e = Entry::new(text, database);
        e.add(duration_us, rows, error);
        shard.map.insert(fp, e);
    }

    /// Snapshot sorted by total time descending.
    pub fn snapshot(&self) -> Vec<QueryStat> {
        let mut out = Vec::with_capacity(self.len());
        for s in self.shards.iter() {
            let s = s.lock();
            out.extend(s.map.iter().map(|(&fp, e)| e.snapshot(fp)));
        }
        out.sort_by(|a, b| b.total_us.cmp(&a.total_us).then(a.fingerprint.cmp(&b.fingerprint)));
        out
    }

    pub fn get(&self, fp: u64) -> Option<QueryStat> {
        self.shard(fp).lock().map.get(&fp).map(|e| e.snapshot(fp))
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of entries dropped to make room for new fingerprints since creation or the last
    /// reset().
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Drops all entries and zeroes the eviction counter.
    pub fn reset(&self) {
        for s in self.shards.iter() {
            s.lock().map.clear();
        }
        self.evicted.store(0, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct QueryStat {
    /// Serialised as a 16-hex-digit string: JSON numbers above 2^53 lose precision in most
    /// consumers.
    #[serde(serialize_with = "serialize_fp")]
    pub fingerprint: u64,
    pub query: String,
    pub database: String,
    pub calls: u64,
    pub errors: u64,
    pub rows: u64,
    pub total_us: u64,
    pub mean_us: f64,
    pub max_us: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
}

fn serialize_fp<S: serde::Serializer>(fp: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{fp:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bucket_layout_is_contiguous_and_bounded() {
        let mut prev = 0;
        for v in 0..(1u64 << 20) {
            let b = bucket_of(v);
            assert!(b == prev || b == prev + 1, "gap at {v}");
            prev = b;
            let mid = bucket_mid(b);
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 1.0 / 16.0 + 1e-9, "v={v} mid={mid} err={err}");
        }
        // 100 s is inside the precise range, not clamped into the last bucket.
        assert!(bucket_of(100_000_000) < BUCKETS - 1);
        assert_eq!(bucket_of((1 << 27) - 1), BUCKETS - 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for v in [0u64, 1, 7, 8, 15] {
            assert_eq!(bucket_mid(bucket_of(v)), v);
        }
    }

    #[test]
    fn counts_exact_from_four_threads() {
        let t = Arc::new(QueryStatsTable::new(DEFAULT_CAPACITY));
        let fps: Vec<u64> = (0..40u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let per_thread = 10_000u64;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let t = Arc::clone(&t);
                let fps = fps.clone();
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        let fp = fps[(i % fps.len() as u64) as usize];
                        t.record(fp, "select $1", "db", 10, 2, (i / fps.len() as u64).is_multiple_of(10));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(t.len(), fps.len());
        let snap = t.snapshot();
        let calls: u64 = snap.iter().map(|s| s.calls).sum();
        assert_eq!(calls, 4 * per_thread);
        for s in &snap {
            assert_eq!(s.calls, 4 * per_thread / fps.len() as u64);
            assert_eq!(s.rows, 2 * s.calls);
            assert_eq!(s.total_us, 10 * s.calls);
            assert_eq!(s.errors, s.calls / 10);
            assert_eq!((s.min_us, s.max_us, s.p50_us, s.p99_us), (10, 10, 10, 10));
            assert_eq!(s.mean_us, 10.0);
        }
        assert_eq!(t.evicted(), 0);
    }

    #[test]
    fn eviction_keeps_the_heaviest_single_shard() {
        let t = QueryStatsTable::new(10);
        // Heavy ones first, then a stream of light newcomers that must not displace them.
        for fp in 0..9u64 {
            t.record(fp, "heavy", "db", 1_000_000 + fp, 1, false);
        }
        for fp in 100..200u64 {
            t.record(fp, "light", "db", 5, 1, false);
        }
        assert_eq!(t.len(), 10);
        assert_eq!(t.evicted(), 100 + 9 - 10);
        for fp in 0..9u64 {
            assert!(t.get(fp).is_some(), "heavy {fp} evicted");
        }
        // A newcomer heavier than everything displaces the lightest.
        t.record(500, "heaviest", "db", 9_000_000, 1, false);
        let snap = t.snapshot();
        assert_eq!(snap[0].fingerprint, 500);
        assert!(snap.iter().all(|s| s.query != "light"));
        assert!(snap.windows(2).all(|w| w[0].total_us >= w[1].total_us));
    }

    #[test]
    fn eviction_keeps_the_heaviest_sharded() {
        let t = QueryStatsTable::new(DEFAULT_CAPACITY);
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut all = Vec::new();
        for _ in 0..20_000 {
            let fp = next();
            let dur = next() % 1_000_000;
            t.record(fp, "q", "db", dur, 0, false);
            all.push((dur, fp));
        }
        assert_eq!(t.len(), DEFAULT_CAPACITY);
        assert_eq!(t.evicted(), 20_000 - DEFAULT_CAPACITY as u64);
        // Each shard holds >= 312 slots, so the global top (312 - 1) must all have survived.
        all.sort_unstable_by(|a, b| b.cmp(a));
        for &(dur, fp) in all.iter().take(DEFAULT_CAPACITY / SHARDS - 1) {
            assert_eq!(t.get(fp).map(|s| s.total_us), Some(dur));
        }
    }

    #[test]
    fn percentiles_within_bound() {
        let t = QueryStatsTable::new(16);
        for v in 1..=10_000u64 {
            t.record(1, "q", "db", v, 0, false);
        }
        let s = t.get(1).unwrap();
        let within = |got: u64, want: f64| ((got as f64 - want) / want).abs() <= 1.0 / 16.0;
        assert!(within(s.p50_us, 5000.0), "p50 {}", s.p50_us);
        assert!(within(s.p95_us, 9500.0), "p95 {}", s.p95_us);
        assert!(within(s.p99_us, 9900.0), "p99 {}", s.p99_us);
        assert_eq!((s.min_us, s.max_us, s.calls, s.total_us), (1, 10_000, 10_000, 50_005_000));
        assert!((s.mean_us - 5000.5).abs() < 1e-9);

        // Constant latency is reported exactly thanks to min/max clamping.
        t.record(2, "q", "db", 1234, 0, false);
        let s = t.get(2).unwrap();
        assert_eq!((s.p50_us, s.p95_us, s.p99_us), (1234, 1234, 1234));

        // Beyond the histogram range (> ~134 s) percentiles are capped by the exact max.
        t.record(3, "q", "db", 500_000_000, 0, false);
        t.record(3, "q", "db", 600_000_000, 0, false);
        let s = t.get(3).unwrap();
        assert!(s.p99_us <= 600_000_000 && s.p50_us >= 500_000_000);

        // Skewed distribution: 99 fast, 1 slow.
        for _ in 0..99 {
            t.record(4, "q", "db", 100, 0, false);
        }
        t.record(4, "q", "db", 80_000, 0, false);
        let s = t.get(4).unwrap();
        assert!(within(s.p50_us, 100.0) && within(s.p95_us, 100.0) && within(s.p99_us, 100.0));
        assert_eq!(s.max_us, 80_000);
    }

    #[test]
    fn histogram_saturation_halves_and_keeps_shape() {
        let mut e = Entry::new("q", "db");
        e.hist[bucket_of(100)] = u32::MAX - 1;
        e.hist[bucket_of(5000)] = 1000;
        e.min_us = 100;
        e.max_us = 5000;
        e.add(100, 0, false);
        e.add(100, 0, false);
        assert!(e.hist[bucket_of(100)] < u32::MAX / 2 + 10);
        assert_eq!(e.hist[bucket_of(5000)], 500);
        assert_eq!(e.percentile(0.5), 100);
    }

    #[test]
    fn recording_a_known_fingerprint_does_not_allocate() {
        let t = QueryStatsTable::new(DEFAULT_CAPACITY);
        t.record(42, "select $1", "db", 1, 1, false);
        let (allocs, _) = crate::observe::alloc_count::count(|| {
            for i in 0..1000 {
                t.record(42, "select $1", "db", i, 1, i % 7 == 0);
            }
        });
        assert_eq!(allocs, 0);
    }

    #[test]
    fn text_stored_once_and_truncated() {
        let t = QueryStatsTable::new(100);
        t.record(7, "select $1", "app", 5, 1, false);
        t.record(7, "something else", "other", 5, 1, true);
        let s = t.get(7).unwrap();
        assert_eq!((s.query.as_str(), s.database.as_str()), ("select $1", "app"));
        assert_eq!((s.calls, s.errors), (2, 1));

        // 'é' is 2 bytes; 1 + 2*1500 bytes must be cut at the char boundary below 2048.
        let long = format!("x{}", "é".repeat(1500));
        t.record(8, &long, "app", 1, 0, false);
        let q = t.get(8).unwrap().query;
        assert_eq!(q.len(), 2047);
        assert!(long.starts_with(&q));
    }

    #[test]
    fn reset_len_get() {
        let t = QueryStatsTable::new(0);
        assert!(t.is_empty());
        t.record(1, "a", "db", 1, 0, false);
        t.record(2, "b", "db", 2, 0, false);
        assert_eq!((t.len(), t.evicted()), (1, 1));
        assert!(t.get(1).is_none() && t.get(2).is_some());
        t.reset();
        assert_eq!((t.len(), t.evicted()), (0, 0));
        assert!(t.get(2).is_none());
        assert!(t.snapshot().is_empty());
    }

    // A minimal serde Serializer that renders a struct as `field=value;` so the wire format of
    // QueryStat can be checked without pulling in a JSON crate.
    mod flat {
        use serde::ser::{self, Impossible, Serialize};
        use std::fmt;

        #[derive(Debug)]
        pub struct Error(String);
        impl fmt::Display for Error {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for Error {}
        impl ser::Error for Error {
            fn custom<T: fmt::Display>(msg: T) -> Self {
                Error(msg.to_string())
            }
        }
        fn unsupported<T>() -> Result<T, Error> {
            Err(Error("unsupported".into()))
        }

        pub struct Flat;
        pub struct Fields(String);

        macro_rules! prim {
            ($($name:ident: $ty:ty),*) => {$(
                fn $name(self, v: $ty) -> Result<String, Error> { Ok(v.to_string()) }
            )*};
        }

        impl ser::Serializer for Flat {
            type Ok = String;
            type Error = Error;
            type SerializeSeq = Impossible<String, Error>;
            type SerializeTuple = Impossible<String, Error>;
            type SerializeTupleStruct = Impossible<String, Error>;
            type SerializeTupleVariant = Impossible<String, Error>;
            type SerializeMap = Impossible<String, Error>;
            type SerializeStruct = Fields;
            type SerializeStructVariant = Impossible<String, Error>;
            prim!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
                  serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
                  serialize_u64: u64, serialize_f32: f32, serialize_f64: f64, serialize_char: char);
            fn serialize_str(self, v: &str) -> Result<String, Error> {
                Ok(format!("{v:?}"))
            }
            fn serialize_bytes(self, _: &[u8]) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_none(self) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_some<T: ?Sized + Serialize>(self, _: &T) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_unit(self) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_unit_struct(self, _: &'static str) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _: &'static str, _: &T) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_newtype_variant<T: ?Sized + Serialize>(
                self,
                _: &'static str,
                _: u32,
                _: &'static str,
                _: &T,
            ) -> Result<String, Error> {
                unsupported()
            }
            fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
                unsupported()
            }
            fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Error> {
                unsupported()
            }
            fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, Error> {
                unsupported()
            }
            fn serialize_tuple_variant(
                self,
                _: &'static str,
                _: u32,
                _: &'static str,
                _: usize,
            ) -> Result<Self::SerializeTupleVariant, Error> {
                unsupported()
            }
            fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
                unsupported()
            }
            fn serialize_struct(self, _: &'static str, _: usize) -> Result<Fields, Error> {
                Ok(Fields(String::new()))
            }
            fn serialize_struct_variant(
                self,
                _: &'static str,
                _: u32,
                _: &'static str,
                _: usize,
            ) -> Result<Self::SerializeStructVariant, Error> {
                unsupported()
            }
        }

        impl ser::SerializeStruct for Fields {
            type Ok = String;
            type Error = Error;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, v: &T) -> Result<(), Error> {
                let v = v.serialize(Flat)?;
                self.0.push_str(&format!("{key}={v};"));
                Ok(())
            }
            fn end(self) -> Result<String, Error> {
                Ok(self.0)
            }
        }
    }

    #[test]
    fn fingerprint_serialises_as_hex_string() {
        let t = QueryStatsTable::new(10);
        t.record(0xab, "select $1", "db", 3, 1, false);
        let s = t.get(0xab).unwrap().serialize(flat::Flat).unwrap();
        assert!(s.starts_with("fingerprint=\"00000000000000ab\";query=\"select $1\";database=\"db\";calls=1;"), "{s}");
        for field in [
            "errors=0;",
            "rows=1;",
            "total_us=3;",
            "mean_us=3;",
            "max_us=3;",
            "min_us=3;",
            "p50_us=3;",
            "p95_us=3;",
            "p99_us=3;",
        ] {
            assert!(s.contains(field), "{field} missing in {s}");
        }
    }
}
