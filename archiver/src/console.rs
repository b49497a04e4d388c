//! The console listener: `GET /health` and Prometheus `GET /metrics` over plain HTTP/1.1.
//!
//! Deliberately tiny: one request per connection, request head capped at 8 KiB, no body.
//! The search/retrieve API comes later (interfaces.md).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::store::StoreHandle;

/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;
/// A client must send its request within this time.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most console connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// Serves the console on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(bind = %addr, "console serving /health and /metrics");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                let (store, metrics) = (store.clone(), metrics.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = handle(stream, &store, &metrics).await {
                        debug!(error = %e, "console connection");
                    }
                });
            }
        }
    }
}

async fn handle(
    mut stream: tokio::net::TcpStream,
    store: &StoreHandle,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = respond(method, path, store, metrics);
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

fn respond(
    method: &str,
    path: &str,
    store: &StoreHandle,
    metrics: &Metrics,
) -> (&'static str, &'static str, String) {
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/health" => {
            let state = if store.failed() {
                "store_failed"
            } else if store.low_disk() {
                "low_disk"
            } else {
                "ok"
            };
            let body = serde_json::json!({
                "status": state,
                "node": store.node(),
                "epoch": store.epoch(),
                "pending_bytes": store.pending_bytes(),
                "free_disk_bytes": store.free_disk(),
            })
            .to_string()
                + "\n";
            let status = if state == "ok" {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "application/json", body)
        }
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render(store)),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}
