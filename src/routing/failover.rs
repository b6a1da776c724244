//! Early warning of a planned leader change: polls Patroni's `failover` key in etcd (v3 JSON gateway).
//!
//! `patronictl switchover` (and `POST /switchover`, `/failover`) first writes `<namespace>/<scope>/failover`
//! in the DCS, and only then does the old leader fast-shut PostgreSQL, killing every transaction running
//! there. Seeing the key lets the router stop starting transactions on the old leader while the running ones
//! finish. `/cluster` cannot give this signal in time: it shows `leader/stopping` only once PostgreSQL is
//! already going down.
//!
//! Like the `/cluster` watcher, everything etcd sends is untrusted: bounded requests, capped bodies, and a
//! malformed answer is an error for that poll, never a panic.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::watch::Sender;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::patroni::{http_post_json, PatroniError};

/// Poll period of the failover key. Between the key appearing and the old leader's fast shutdown there are
/// only a few hundred milliseconds, and that time is what running transactions get to finish.
pub const DEFAULT_ETCD_POLL_INTERVAL: Duration = Duration::from_millis(25);
/// `tokio::time::interval` panics on zero; below this the poller would just spin.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Where the key lives and how to read it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Cluster name, only used to label logs.
    pub cluster: String,
    /// etcd client URLs, e.g. "http://127.0.0.1:2379".
    pub endpoints: Vec<String>,
    /// Full key, e.g. "/service/hft/failover".
    pub key: String,
    pub poll_interval: Duration,
    pub http_timeout: Duration,
}

/// Patroni's failover key as `<namespace>/<scope>/failover` (Patroni's own namespace default is "/service/").
pub fn failover_key(namespace: &str, scope: &str) -> String {
    let ns = namespace.trim_end_matches('/');
    let ns = if ns.starts_with('/') || ns.is_empty() { ns.to_string() } else { format!("/{ns}") };
    format!("{ns}/{scope}/failover")
}

/// A switchover or failover Patroni has been asked to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingFailover {
    /// The leader to move away from (a switchover names it; a failover may not).
    pub leader: Option<String>,
    /// The member to move to, when one was named.
    pub candidate: Option<String>,
}

impl PendingFailover {
    /// True when this request would take the leadership away from `leader`.
    pub fn moves_away_from(&self, leader: &str) -> bool {
        match (&self.leader, &self.candidate) {
            (Some(l), _) => l == leader && self.candidate.as_deref() != Some(leader),
            (None, Some(c)) => c != leader,
            (None, None) => false,
        }
    }
}

/// What the poller last learned about the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverKey {
    /// Not configured, not read yet, or etcd does not answer: no early warning is available.
    Unknown,
    /// No request pending (key missing, empty, `{}`, or a switchover scheduled for later).
    Idle,
    Pending(PendingFailover),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    #[error(transparent)]
    Http(#[from] PatroniError),
    #[error("unexpected http status {0}")]
    Status(u16),
    #[error("malformed range answer: {0}")]
    Range(&'static str),
}

/// The value of the first key in a `POST /v3/kv/range` answer; `None` when the key does not exist.
pub fn parse_range_answer(body: &[u8]) -> Result<Option<Vec<u8>>, EtcdError> {
    let doc: Value = serde_json::from_slice(body).map_err(|_| EtcdError::Range("not json"))?;
    let obj = doc.as_object().ok_or(EtcdError::Range("not an object"))?;
    // The gateway omits empty fields: no `kvs` means no such key.
    let Some(kvs) = obj.get("kvs") else { return Ok(None) };
    let first = kvs.as_array().ok_or(EtcdError::Range("kvs is not an array"))?.first();
    let Some(kv) = first else { return Ok(None) };
    // An empty value is omitted too.
    let Some(v) = kv.get("value") else { return Ok(Some(Vec::new())) };
    let v = v.as_str().ok_or(EtcdError::Range("value is not a string"))?;
    base64::engine::general_purpose::STANDARD.decode(v).map(Some).map_err(|_| EtcdError::Range("value is not base64"))
}

/// Reads Patroni's failover value. `now` decides whether a scheduled switchover is due; one whose time cannot
/// be read counts as not due (the `/cluster` fallbacks still apply when it happens).
pub fn parse_failover_value(v: &[u8], now: SystemTime) -> FailoverKey {
    let text = String::from_utf8_lossy(v);
    let text = text.trim();
    if text.is_empty() {
        return FailoverKey::Idle;
    }
    let nonempty = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    let p = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => {
            if let Some(at) = o.get("scheduled_at").and_then(Value::as_str).filter(|s| !s.is_empty()) {
                if !scheduled_is_due(at, now) {
                    return FailoverKey::Idle;
                }
            }
            PendingFailover { leader: nonempty(o.get("leader")), candidate: nonempty(o.get("member")) }
        }
        Ok(_) => return FailoverKey::Idle,
        // Patroni's older plain form: "leader:candidate".
        Err(_) => {
            let mut it = text.splitn(2, ':').map(|s| s.trim().to_string()).map(|s| (!s.is_empty()).then_some(s));
            PendingFailover { leader: it.next().flatten(), candidate: it.next().flatten() }
        }
    };
    if p.leader.is_none() && p.candidate.is_none() {
        FailoverKey::Idle
    } else {
        FailoverKey::Pending(p)
    }
}

/// Patroni writes `datetime.isoformat()`, e.g. "2026-11-29T01:00:00+00:00" (UTC offsets only are read).
fn scheduled_is_due(at: &str, now: SystemTime) -> bool {
    let utc = at.strip_suffix("+00:00").map(|s| format!("{s}Z")).unwrap_or_else(|| at.to_string());
    match humantime::parse_rfc3339_weak(utc.trim_end_matches('Z')) {
        // Start draining a little before the time: Patroni acts on its next HA loop after it.
        Ok(t) => t <= now + Duration::from_secs(1),
        Err(_) => false,
    }
}

/// One read of the key from one endpoint.
async fn read_key(endpoint: &str, key: &str, timeout: Duration) -> Result<Option<Vec<u8>>, EtcdError> {
    let body = serde_json::json!({ "key": base64::engine::general_purpose::STANDARD.encode(key) }).to_string();
    let (status, answer) = http_post_json(endpoint, "/v3/kv/range", body.as_bytes(), timeout).await?;
    if status != 200 {
        return Err(EtcdError::Status(status));
    }
    parse_range_answer(&answer)
}

/// Runs until `shutdown`: every poll_interval reads the failover key (the endpoint that answered last first)
/// and publishes what it means on `tx` when that changes. When no endpoint answers the key is `Unknown`.
pub async fn watch(cfg: EtcdConfig, tx: Sender<FailoverKey>, shutdown: CancellationToken) {
    if cfg.endpoints.is_empty() {
        return;
    }
    let mut ticker = tokio::time::interval(cfg.poll_interval.max(MIN_POLL_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut preferred = 0usize;
    let mut was_reachable: Option<bool> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let poll = async {
            let mut last = None;
            for k in 0..cfg.endpoints.len() {
                let idx = (preferred + k) % cfg.endpoints.len();
                match read_key(&cfg.endpoints[idx], &cfg.key, cfg.http_timeout).await {
                    Ok(v) => return Ok((idx, v)),
                    Err(e) => {
                        debug!(cluster = %cfg.cluster, endpoint = %cfg.endpoints[idx], error = %e, "etcd endpoint failed");
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or(EtcdError::Range("no endpoints")))
        };
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = poll => r,
        };
        let key = match outcome {
            Ok((idx, v)) => {
                if was_reachable != Some(true) {
                    info!(cluster = %cfg.cluster, endpoint = %cfg.endpoints[idx], key = %cfg.key, "etcd reachable; watching the failover key");
                }
                was_reachable = Some(true);
                preferred = idx;
                v.map_or(FailoverKey::Idle, |v| parse_failover_value(&v, SystemTime::now()))
            }
            Err(e) => {
                if was_reachable != Some(false) {
                    warn!(cluster = %cfg.cluster, error = %e, "etcd unreachable; no early warning of switchovers");
                }
                was_reachable = Some(false);
                FailoverKey::Unknown
            }
        };
        tx.send_if_modified(|k| {
            if *k == key {
                return false;
            }
            *k = key;
            true
        });
    }
    debug!(cluster = %cfg.cluster, "failover key watcher stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn key_path() {
        assert_eq!(failover_key("/service/", "hft"), "/service/hft/failover");
        assert_eq!(failover_key("/service", "hft"), "/service/hft/failover");
        assert_eq!(failover_key("service", "hft"), "/service/hft/failover");
    }

    #[test]
    fn range_answers() {
        let absent = br#"{"header":{"cluster_id":"1","member_id":"2","revision":"9","raft_term":"2"}}"#;
        assert_eq!(parse_range_answer(absent).unwrap(), None);
        let v = format!(r#"{{"header":{{}},"kvs":[{{"key":"{}","value":"{}"}}],"count":"1"}}"#, b64("/k"), b64("{}"));
        assert_eq!(parse_range_answer(v.as_bytes()).unwrap(), Some(b"{}".to_vec()));
        let empty = format!(r#"{{"kvs":[{{"key":"{}"}}],"count":"1"}}"#, b64("/k"));
        assert_eq!(parse_range_answer(empty.as_bytes()).unwrap(), Some(Vec::new()));
        for bad in [&b"nope"[..], b"[]", br#"{"kvs":3}"#, br#"{"kvs":[{"value":7}]}"#, br#"{"kvs":[{"value":"!!"}]}"#] {
            assert!(parse_range_answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn failover_values() {
        let now = SystemTime::now();
        let p = |l: Option<&str>, c: Option<&str>| {
            FailoverKey::Pending(PendingFailover { leader: l.map(Into::into), candidate: c.map(Into::into) })
        };
        assert_eq!(
            parse_failover_value(br#"{"leader":"node1","member":"node2"}"#, now),
            p(Some("node1"), Some("node2"))
        );
        assert_eq!(parse_failover_value(br#"{"member":"node2"}"#, now), p(None, Some("node2")));
        assert_eq!(parse_failover_value(b"node1:node2", now), p(Some("node1"), Some("node2")));
        for idle in [&b""[..], b"{}", b"  ", br#"{"leader":"","member":""}"#, b"[1]"] {
            assert_eq!(parse_failover_value(idle, now), FailoverKey::Idle, "{}", String::from_utf8_lossy(idle));
        }
        // Scheduled: idle until (just before) its time; an unreadable time never drains early.
        let at = |t: SystemTime| {
            format!(
                r#"{{"leader":"node1","member":"node2","scheduled_at":"{}+00:00"}}"#,
                humantime::format_rfc3339_micros(t)
            )
            .replace("Z+00:00", "+00:00")
        };
        assert_eq!(parse_failover_value(at(now + Duration::from_secs(60)).as_bytes(), now), FailoverKey::Idle);
        assert_eq!(parse_failover_value(at(now).as_bytes(), now), p(Some("node1"), Some("node2")));
        let odd = br#"{"leader":"node1","scheduled_at":"tomorrow"}"#;
        assert_eq!(parse_failover_value(odd, now), FailoverKey::Idle);
    }

    #[test]
    fn moves_away() {
        let f = |l: Option<&str>, c: Option<&str>| PendingFailover {
            leader: l.map(Into::into),
            candidate: c.map(Into::into),
        };
        assert!(f(Some("node1"), Some("node2")).moves_away_from("node1"));
        assert!(f(Some("node1"), None).moves_away_from("node1"));
        assert!(!f(Some("node1"), Some("node2")).moves_away_from("node2"));
        assert!(f(None, Some("node2")).moves_away_from("node1"));
        assert!(!f(None, Some("node1")).moves_away_from("node1"));
        assert!(!f(Some("node1"), Some("node1")).moves_away_from("node1"));
    }
}
