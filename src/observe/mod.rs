//! Query timing, fingerprints, per-fingerprint stats, slow-query capture and the Prometheus metric handles.

use std::time::Duration;

use metrics::{Counter, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub mod fingerprint;
pub mod qstats;
pub mod slow;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::Config;

pub use fingerprint::QueryType;

/// Bucket bounds of the latency histograms: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

const META: Metadata<'static> = Metadata::new("pgrelay", metrics::Level::INFO, Some("pgrelay::observe"));

/// The process's metric registry. Not installed globally: handles are registered from it explicitly.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    /// Creates the registry with pgrelay's histogram buckets.
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is a non-empty constant");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        Metrics { recorder, handle }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram samples into their buckets; called periodically so memory stays flat between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> metrics::Gauge {
        self.recorder.register_gauge(&key(name, labels), &META)
    }

    /// A histogram handle.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, String)]) -> Histogram {
        self.recorder.register_histogram(&key(name, labels), &META)
    }

    /// The handles one pool records into, registered once.
    pub fn pool(&self, database: &str, enabled: bool) -> PoolMetrics {
        let db = || ("database", database.to_string());
        let qd =
            |t: QueryType| self.histogram("db_query_duration_seconds", &[db(), ("query_type", t.as_str().to_string())]);
        PoolMetrics {
            enabled,
            query_duration: [
                qd(QueryType::Select),
                qd(QueryType::Insert),
                qd(QueryType::Update),
                qd(QueryType::Delete),
                qd(QueryType::Other),
            ],
            pool_wait: self.histogram("pgrelay_pool_wait_seconds", &[db()]),
            queries: self.counter("pgrelay_queries_total", &[db()]),
            transactions: self.counter("pgrelay_transactions_total", &[db()]),
            errors: self.counter("pgrelay_query_errors_total", &[db()]),
            checkouts: self.counter("pgrelay_pool_checkouts_total", &[db()]),
            bytes_received: self.counter("pgrelay_client_bytes_received_total", &[db()]),
            bytes_sent: self.counter("pgrelay_client_bytes_sent_total", &[db()]),
            slow_queries: self.counter("pgrelay_slow_queries_total", &[db()]),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect();
    Key::from_parts(name, labels)
}

/// Metric handles of one pool.
pub struct PoolMetrics {
    pub enabled: bool,
    query_duration: [Histogram; 5],
    pool_wait: Histogram,
    pub queries: Counter,
    pub transactions: Counter,
    pub errors: Counter,
    pub checkouts: Counter,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub slow_queries: Counter,
}

impl PoolMetrics {
    /// Records one query's latency.
    #[inline]
    pub fn record_query(&self, t: QueryType, d: Duration) {
        if self.enabled {
            self.query_duration[t as usize].record(d.as_secs_f64());
        }
        self.queries.increment(1);
    }

    /// Records how long a client waited for a server.
    #[inline]
    pub fn record_wait(&self, d: Duration) {
        self.checkouts.increment(1);
        if self.enabled {
            self.pool_wait.record(d.as_secs_f64());
        }
    }
}

/// Query intelligence shared by all sessions: per-fingerprint stats and slow-query capture.
pub struct Observer {
    pub stats: qstats::QueryStatsTable,
    pub slow: slow::SlowLog,
    threshold_us: AtomicU64,
    redact: AtomicBool,
    enabled: AtomicBool,
    /// Fingerprint → the index the advisor last recommended for it (for SHOW QUERIES).
    pub advice: parking_lot::Mutex<std::collections::HashMap<u64, String>>,
}

impl Observer {
    /// Builds it from the config (the slow-query file writer is started separately, inside the runtime).
    pub fn new(cfg: &Config) -> Observer {
        let o = Observer {
            stats: qstats::QueryStatsTable::new(qstats::DEFAULT_CAPACITY),
            slow: slow::SlowLog::new(cfg.slow_query.ring_size),
            threshold_us: AtomicU64::new(0),
            redact: AtomicBool::new(false),
            enabled: AtomicBool::new(true),
            advice: Default::default(),
        };
        o.configure(cfg);
        o
    }

    /// Applies the reloadable settings.
    pub fn configure(&self, cfg: &Config) {
        let t = cfg.slow_query.threshold.0.as_micros() as u64;
        self.threshold_us.store(if t == 0 { u64::MAX } else { t }, Ordering::Relaxed);
        self.redact.store(cfg.slow_query.redact_parameters, Ordering::Relaxed);
        self.enabled.store(cfg.proxy.observability, Ordering::Relaxed);
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn threshold_us(&self) -> u64 {
        self.threshold_us.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn redact(&self) -> bool {
        self.redact.load(Ordering::Relaxed)
    }
}

/// Decodes a Bind body's parameters for display: text values as they are, binary ones decoded by type OID when the
/// type is a common scalar (`types`, from the Parse or the server's ParameterDescription), else as `\x` hex.
/// Returns (values, formats).
pub fn bind_params(body: &[u8], types: &[u32]) -> (Vec<Option<String>>, Vec<i16>) {
    use crate::protocol::{take_cstr, take_i16, take_i32};
    let mut r = body;
    let mut values = Vec::new();
    let mut out_formats = Vec::new();
    let (Some(_), Some(_)) = (take_cstr(&mut r), take_cstr(&mut r)) else { return (values, out_formats) };
    let Some(nf) = take_i16(&mut r) else { return (values, out_formats) };
    let mut formats = Vec::new();
    for _ in 0..nf.max(0) {
        match take_i16(&mut r) {
            Some(f) => formats.push(f),
            None => return (values, out_formats),
        }
    }
    let Some(np) = take_i16(&mut r) else { return (values, out_formats) };
    for i in 0..np.max(0) as usize {
        let fmt = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats.get(i).copied().unwrap_or(0),
        };
        let Some(len) = take_i32(&mut r) else { break };
        if len < 0 {
            values.push(None);
            out_formats.push(fmt);
            continue;
        }
        let len = len as usize;
        if len > r.len() {
            break;
        }
        let v = &r[..len];
        r = &r[len..];
        values.push(Some(if fmt == 0 {
            String::from_utf8_lossy(v).into_owned()
        } else if let Some(d) = decode_binary(types.get(i).copied().unwrap_or(0), v) {
            d
        } else {
            let mut s = String::with_capacity(2 + 2 * v.len());
            s.push_str("\\x");
            for b in v {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }));
        out_formats.push(fmt);
    }
    (values, out_formats)
}

/// Parameter type OIDs from the tail of a Parse body (after name and query).
pub fn parse_param_types(mut types: &[u8]) -> Vec<u32> {
    let Some(n) = crate::protocol::take_i16(&mut types) else { return Vec::new() };
    let mut v = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        match crate::protocol::take_i32(&mut types) {
            Some(t) => v.push(t as u32),
            None => break,
        }
    }
    v
}

/// Rows from a CommandComplete tag ("SELECT 5", "INSERT 0 3", "UPDATE 2").
pub fn tag_rows(body: &[u8]) -> u64 {
    let end = memchr::memchr(0, body).unwrap_or(body.len());
    let tag = &body[..end];
    let start = memchr::memrchr(b' ', tag).map_or(tag.len(), |i| i + 1);
    let digits = &tag[start..];
    if digits.is_empty() {
        return 0;
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return 0;
        }
        match n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d - b'0'))) {
            Some(v) => n = v,
            None => return 0,
        }
    }
    n
}

/// Text form of a binary value of a common scalar type.
fn decode_binary(oid: u32, v: &[u8]) -> Option<String> {
    let arr = |n: usize| -> Option<&[u8]> { (v.len() == n).then_some(v) };
    Some(match oid {
        16 => (arr(1)?[0] != 0).to_string(),
        21 => i16::from_be_bytes(arr(2)?.try_into().ok()?).to_string(),
        23 | 26 => i32::from_be_bytes(arr(4)?.try_into().ok()?).to_string(),
        20 => i64::from_be_bytes(arr(8)?.try_into().ok()?).to_string(),
        700 => f32::from_be_bytes(arr(4)?.try_into().ok()?).to_string(),
        701 => f64::from_be_bytes(arr(8)?.try_into().ok()?).to_string(),
        25 | 1043 | 1042 | 19 => std::str::from_utf8(v).ok()?.to_string(),
        2950 => {
            let b = arr(16)?;
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        }
        _ => return None,
    })
}

/// Counts heap allocations made by the current thread, so tests can prove hot paths are
/// allocation-free rather than just claim it.
#[cfg(test)]
#[allow(unsafe_code)]
pub(crate) mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    struct Counting;

    // SAFETY: every call is forwarded unchanged to the system allocator.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            COUNT.with(|c| c.set(c.get() + 1));
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            COUNT.with(|c| c.set(c.get() + 1));
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Allocations made by this thread while running `f`.
    pub fn count<R>(f: impl FnOnce() -> R) -> (u64, R) {
        let before = COUNT.with(|c| c.get());
        let r = f();
        (COUNT.with(|c| c.get()) - before, r)
    }
}

#[cfg(test)]
mod tests {
    use super::tag_rows;

    #[test]
    fn row_counts_from_command_tags() {
        assert_eq!(tag_rows(b"SELECT 1\0"), 1);
        assert_eq!(tag_rows(b"INSERT 0 25\0"), 25);
        assert_eq!(tag_rows(b"UPDATE 18446744073709551615\0"), u64::MAX);
        assert_eq!(tag_rows(b"COPY 3"), 3);
        for no_count in [&b"BEGIN\0"[..], b"SELECT \0", b"UPDATE 12x\0", b"UPDATE 18446744073709551616\0", b"\0", b""] {
            assert_eq!(tag_rows(no_count), 0, "{:?}", String::from_utf8_lossy(no_count));
        }
    }
}
