//! Slow-query capture: a bounded ring for SHOW SLOW and /api/slow, and a background writer of JSON lines.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// One captured slow query.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlowQuery {
    /// Seconds since the Unix epoch, with microseconds.
    pub time: f64,
    pub duration_ms: f64,
    pub database: String,
    pub user: String,
    pub client_addr: String,
    pub application_name: String,
    #[serde(serialize_with = "hex64", deserialize_with = "unhex64")]
    pub fingerprint: u64,
    pub normalized: String,
    pub query: String,
    /// Bound parameter values as text (binary ones as `\x` hex), `None` for NULL; empty when redacted or none.
    pub params: Vec<Option<String>>,
    /// Parameter type OIDs from the Parse (0 = unspecified), and the format of each value (0 text, 1 binary).
    pub param_types: Vec<u32>,
    pub param_formats: Vec<i16>,
    #[serde(default)]
    pub redacted: bool,
    pub rows: u64,
    pub error: Option<String>,
    pub server: String,
}

fn hex64<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:016x}"))
}

fn unhex64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    u64::from_str_radix(&s, 16).map_err(serde::de::Error::custom)
}

/// The ring and the writer's channel.
pub struct SlowLog {
    ring: Mutex<VecDeque<SlowQuery>>,
    cap: usize,
    tx: Mutex<Option<mpsc::Sender<SlowQuery>>>,
    pub captured: AtomicU64,
    pub dropped: AtomicU64,
}

impl SlowLog {
    /// A ring of `cap` entries, no file.
    pub fn new(cap: usize) -> SlowLog {
        SlowLog {
            ring: Mutex::new(VecDeque::with_capacity(cap.min(4096))),
            cap: cap.max(1),
            tx: Mutex::new(None),
            captured: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Starts appending to `path` from a background task.
    pub fn start_writer(&self, path: PathBuf) {
        let (tx, mut rx) = mpsc::channel::<SlowQuery>(1024);
        *self.tx.lock() = Some(tx);
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
            let mut file = match file {
                Ok(f) => std::io::BufWriter::new(f),
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot open slow-query log");
                    return;
                }
            };
            info!(file = %path.display(), "slow-query log open");
            while let Some(q) = rx.blocking_recv() {
                if let Ok(line) = serde_json::to_string(&q) {
                    let _ = writeln!(file, "{line}");
                }
                // Flush when the queue is drained so `tail -f` and tests see each record promptly.
                if rx.is_empty() {
                    let _ = file.flush();
                }
            }
            let _ = file.flush();
        });
    }

    /// Records one slow query; never blocks (a full writer queue counts a drop).
    pub fn push(&self, q: SlowQuery) {
        self.captured.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = self.tx.lock().as_ref() {
            if tx.try_send(q.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut r = self.ring.lock();
        if r.len() >= self.cap {
            r.pop_front();
        }
        r.push_back(q);
    }

    /// Newest first.
    pub fn recent(&self, limit: usize) -> Vec<SlowQuery> {
        self.ring.lock().iter().rev().take(limit).cloned().collect()
    }
}
