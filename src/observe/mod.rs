//! Query timing, fingerprints, per-fingerprint stats, slow-query capture and the Prometheus metric handles.

use std::time::Duration;

use metrics::{Counter, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub mod fingerprint;
pub mod qstats;
pub mod slow;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::Config;

pub use fingerprint::QueryType;

/// Bucket bounds of the latency histograms: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

const META: Metadata<'static> = Metadata::new("pgrelay", metrics::Level::INFO, Some("pgrelay::observe"));

/// `LATENCY_BUCKETS` in nanoseconds, the form `LatencyHistogram::record` compares against.
const LATENCY_BOUNDS_NS: [u64; LATENCY_BUCKETS.len()] = {
    let mut ns = [0u64; LATENCY_BUCKETS.len()];
    let mut i = 0;
    while i < ns.len() {
        ns[i] = (LATENCY_BUCKETS[i] * 1e9 + 0.5) as u64;
        i += 1;
    }
    ns
};

/// A latency histogram with the fixed `LATENCY_BUCKETS`, kept as plain atomic counters and rendered at scrape time.
///
/// Recorded once per query and once per checkout, so it must be cheap: a bucket search over small integers and two
/// relaxed adds (the general-purpose histogram of the metrics exporter queued every sample, about 300 instructions a
/// record, and sorted them into buckets later).
#[derive(Default)]
pub struct LatencyHistogram {
    /// Per bucket, not cumulative; the last one counts samples above the largest bound.
    counts: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Counts one sample.
    #[inline]
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(LATENCY_BOUNDS_NS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Appends the `_bucket`, `_sum` and `_count` series in Prometheus text format; `labels` is the rendered label
    /// list without braces.
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write;
        let sep = if labels.is_empty() { "" } else { "," };
        let mut total = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            match LATENCY_BUCKETS.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// The process's metric registry. Not installed globally: handles are registered from it explicitly.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Latency histograms by (name, rendered labels), rendered after the exporter's own metrics.
    latency: parking_lot::Mutex<Vec<(&'static str, String, Arc<LatencyHistogram>)>>,
}

impl Metrics {
    /// Creates the registry (counters and gauges; latency histograms are `LatencyHistogram`s kept here).
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Metrics { recorder, handle, latency: Default::default() }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        let mut hists: Vec<(&'static str, String, Arc<LatencyHistogram>)> = self.latency.lock().clone();
        hists.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut family = "";
        for (name, labels, h) in &hists {
            if *name != family {
                if !family.is_empty() {
                    out.push('\n');
                }
                out.push_str(&format!("# TYPE {name} histogram\n"));
                family = name;
            }
            h.render(name, labels, &mut out);
        }
        if !family.is_empty() {
            out.push('\n');
        }
        out
    }

    /// A counter handle.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &META)
    }

    /// A gauge handle.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> metrics::Gauge {
        self.recorder.register_gauge(&key(name, labels), &META)
    }

    /// A latency histogram (seconds, `LATENCY_BUCKETS`); the same name and labels give the same histogram.
    pub fn latency_histogram(&self, name: &'static str, labels: &[(&'static str, String)]) -> Arc<LatencyHistogram> {
        let rendered = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect::<Vec<_>>().join(",");
        let mut all = self.latency.lock();
        if let Some((_, _, h)) = all.iter().find(|(n, l, _)| *n == name && *l == rendered) {
            return h.clone();
        }
        let h = Arc::new(LatencyHistogram::default());
        all.push((name, rendered, h.clone()));
        h
    }

    /// The handles one pool records into, registered once.
    pub fn pool(&self, database: &str, enabled: bool) -> PoolMetrics {
        let db = || ("database", database.to_string());
        let qd = |t: QueryType| {
            self.latency_histogram("db_query_duration_seconds", &[db(), ("query_type", t.as_str().to_string())])
        };
        PoolMetrics {
            enabled,
            query_duration: [
                qd(QueryType::Select),
                qd(QueryType::Insert),
                qd(QueryType::Update),
                qd(QueryType::Delete),
                qd(QueryType::Other),
            ],
            pool_wait: self.latency_histogram("pgrelay_pool_wait_seconds", &[db()]),
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

/// A label value as Prometheus' text format wants it: backslash, double quote and newline escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.clone())).collect();
    Key::from_parts(name, labels)
}

/// Metric handles of one pool.
pub struct PoolMetrics {
    pub enabled: bool,
    query_duration: [Arc<LatencyHistogram>; 5],
    pool_wait: Arc<LatencyHistogram>,
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
            self.query_duration[t as usize].record(d);
        }
        self.queries.increment(1);
    }

    /// Records how long a client waited for a server.
    #[inline]
    pub fn record_wait(&self, d: Duration) {
        self.checkouts.increment(1);
        if self.enabled {
            self.pool_wait.record(d);
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
    use super::{tag_rows, Metrics, LATENCY_BOUNDS_NS, LATENCY_BUCKETS};
    use std::time::Duration;

    #[test]
    fn latency_bounds_match_the_published_buckets() {
        assert_eq!(LATENCY_BOUNDS_NS.len(), LATENCY_BUCKETS.len());
        for (ns, s) in LATENCY_BOUNDS_NS.iter().zip(LATENCY_BUCKETS) {
            assert_eq!(*ns, (s * 1e9).round() as u64);
        }
    }

    #[test]
    fn latency_histogram_renders_cumulative_buckets() {
        let m = Metrics::new();
        let h = m.latency_histogram("x_seconds", &[("database", "d\"b".to_string())]);
        h.record(Duration::from_micros(50)); // on the first bound: counted in it (le is inclusive)
        h.record(Duration::from_micros(51));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60)); // above every bound
        assert!(std::ptr::eq(&*h, &*m.latency_histogram("x_seconds", &[("database", "d\"b".to_string())])));
        let _other = m.latency_histogram("a_seconds", &[]);
        let text = m.render();
        let l = r#"database="d\"b""#;
        for want in [
            format!("x_seconds_bucket{{{l},le=\"0.00005\"}} 1"),
            format!("x_seconds_bucket{{{l},le=\"0.0001\"}} 2"),
            format!("x_seconds_bucket{{{l},le=\"0.0025\"}} 2"),
            format!("x_seconds_bucket{{{l},le=\"0.005\"}} 3"),
            format!("x_seconds_bucket{{{l},le=\"10\"}} 3"),
            format!("x_seconds_bucket{{{l},le=\"+Inf\"}} 4"),
            format!("x_seconds_sum{{{l}}} 60.003101"),
            format!("x_seconds_count{{{l}}} 4"),
            "a_seconds_bucket{le=\"+Inf\"} 0".to_string(),
        ] {
            assert!(text.lines().any(|line| line == want), "missing {want} in\n{text}");
        }
        assert_eq!(text.matches("# TYPE x_seconds histogram").count(), 1);
        assert!(text.find("# TYPE a_seconds").unwrap() < text.find("# TYPE x_seconds").unwrap(), "sorted by name");
    }

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
