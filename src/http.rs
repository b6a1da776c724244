//! HTTP endpoint on `[metrics] listen`: `/metrics` (Prometheus), `/health`, and JSON under `/api/`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::state::Shared;

/// Serves HTTP until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(120), handle(shared, sock)).await {
                debug!(error = %e, "http request timed out");
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == b'\r').unwrap_or(0)]).to_string();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let (status, ctype, body) = if method != "GET" {
        (405, "text/plain", "method not allowed\n".to_string())
    } else if path == "/api/advice" {
        match crate::advisor::run::in_process(&shared).await {
            Ok(r) => json(&r),
            Err(e) => (500, "text/plain", format!("{e}\n")),
        }
    } else {
        route(&shared, path)
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

fn route(shared: &Shared, path: &str) -> (u16, &'static str, String) {
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4", shared.metrics.render()),
        "/health" => {
            let ok = !shared.shutdown.is_cancelled();
            let body = serde_json::json!({
                "status": if ok { "ok" } else { "draining" },
                "clients": shared.client_count.load(Ordering::Relaxed),
                "pools": shared.pools.len(),
            });
            (if ok { 200 } else { 503 }, "application/json", body.to_string())
        }
        "/api/pools" => {
            let pools: Vec<_> = shared
                .pools
                .iter()
                .map(|p| {
                    let c = p.counts();
                    serde_json::json!({
                        "database": p.key.database, "user": p.key.user,
                        "servers": c.total, "idle": c.idle, "waiting": c.waiters,
                        "clients": p.stats.clients.load(Ordering::Relaxed),
                        "transactions": p.stats.xact_count.load(Ordering::Relaxed),
                        "queries": p.stats.query_count.load(Ordering::Relaxed),
                    })
                })
                .collect();
            (200, "application/json", serde_json::Value::Array(pools).to_string())
        }
        "/api/queries" => json(&shared.observer.stats.snapshot()),
        "/api/slow" => json(&shared.observer.slow.recent(1000)),
        "/api/health" => json(&shared.health.snapshot()),
        _ => (404, "text/plain", "not found\n".to_string()),
    }
}

fn json<T: serde::Serialize>(v: &T) -> (u16, &'static str, String) {
    match serde_json::to_string(v) {
        Ok(b) => (200, "application/json", b),
        Err(e) => (500, "text/plain", format!("{e}\n")),
    }
}
