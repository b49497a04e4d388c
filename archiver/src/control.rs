//! The control socket: `DATA_DIR/control.sock`, for the CLI's commands that need the
//! running daemon (live state now; queue retry/skip, resync and compact as they land).
//!
//! Protocol: one JSON object per line, one request per connection, one JSON reply line:
//! `{"cmd":"ping"}`, `{"cmd":"status"}`, `{"cmd":"reload"}`, `{"cmd":"queue"}`,
//! `{"cmd":"queue_retry","arrival":"NODE/EPOCH/SEQ"}`, `{"cmd":"queue_skip","arrival":..}`,
//! `{"cmd":"resync","connection":"NAME"}`, `{"cmd":"compact"}` (seal the open segment and
//! compact in the background; the reply's `request` number is what `compact_status`'s
//! `done` reaches once that run ended, in the daemon of that `pid`),
//! `{"cmd":"compact_status"}`. Replies carry `"ok": true`
//! or `"ok": false, "error": "..."`. The socket is created 0600: only the daemon's own
//! user (and root) may use it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::relay::{Command, Replication};
use crate::store::{index, Arrival, StoreHandle};

/// File name of the control socket inside `data_dir`.
pub const SOCKET: &str = "control.sock";
/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;
/// A client must send its request, and a CLI waits for the reply, this long at most.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The bound control socket; removed on drop if it is still ours.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `data_dir/control.sock` (0600), replacing a stale socket left by a crash.
    ///
    /// # Errors
    /// The path is taken by something that is not a stale socket, or binding failed.
    pub fn bind(data_dir: &Path) -> std::io::Result<ControlSocket> {
        let path = data_dir.join(SOCKET);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            // The store lock is ours, so no other daemon uses this socket: it is stale.
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlSocket { listener, path })
    }

    /// Serves requests until `shutdown` turns true. `reload` receives a message for each
    /// `reload` request.
    pub async fn serve(
        self,
        store: StoreHandle,
        listeners: Vec<Value>,
        replication: std::sync::Arc<Replication>,
        reload: mpsc::Sender<()>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        info!(socket = %self.path.display(), "control socket ready");
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let (store, listeners, reload) = (store.clone(), listeners.clone(), reload.clone());
                    let replication = replication.clone();
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut line = String::new();
                        let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
                        let got = tokio::time::timeout(TIMEOUT, reader.read_line(&mut line)).await;
                        let reply = match got {
                            Ok(Ok(n)) if n > 0 => {
                                handle(&line, &store, &listeners, &replication, &reload).await
                            }
                            _ => json!({"ok": false, "error": "no request"}),
                        };
                        let mut out = reply.to_string();
                        out.push('\n');
                        if let Err(e) = write.write_all(out.as_bytes()).await {
                            debug!(error = %e, "control reply");
                        }
                    });
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn handle(
    line: &str,
    store: &StoreHandle,
    listeners: &[Value],
    replication: &Replication,
    reload: &mpsc::Sender<()>,
) -> Value {
    let request: Value = match serde_json::from_str(line.trim()) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match request.get("cmd").and_then(Value::as_str) {
        Some("ping") => json!({"ok": true}),
        Some("status") => {
            let s = store.stats();
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            json!({
                "ok": true,
                "node": store.node(),
                "epoch": store.epoch(),
                "pid": std::process::id(),
                "pending_bytes": store.pending_bytes(),
                "free_disk_bytes": store.free_disk(),
                "store_failed": store.failed(),
                "low_disk": store.low_disk(),
                "messages": get(&s.messages),
                "arrivals": get(&s.arrivals),
                "compaction": store.compaction_status(),
                "listeners": listeners,
                "connections": replication.statuses(),
            })
        }
        Some("queue") => match parked(store) {
            Ok(parked) => {
                let conns: Vec<Value> = replication
                    .statuses()
                    .into_iter()
                    .map(|c| {
                        let mut v = json!(c);
                        let list: Vec<&Value> = parked
                            .iter()
                            .filter(|p| p["connection"] == c.name.as_str())
                            .collect();
                        v["parked_arrivals"] = json!(list);
                        v
                    })
                    .collect();
                json!({"ok": true, "connections": conns})
            }
            Err(e) => json!({"ok": false, "error": e}),
        },
        Some(cmd @ ("queue_retry" | "queue_skip")) => {
            let Some(arrival) = request.get("arrival").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "no \"arrival\" in the request"});
            };
            match parked(store) {
                Ok(all) => {
                    let mut sent = Vec::new();
                    for p in all.iter().filter(|p| p["arrival"] == arrival) {
                        let (Some(conn), Some(local)) =
                            (p["connection"].as_str(), p["local"].as_u64())
                        else {
                            continue;
                        };
                        let Some(h) = replication.get(conn) else {
                            continue;
                        };
                        let c = if cmd == "queue_retry" {
                            Command::Retry(local)
                        } else {
                            Command::Skip(local)
                        };
                        if h.commands.send(c).await.is_ok() {
                            sent.push(conn.to_owned());
                        }
                    }
                    if sent.is_empty() {
                        json!({"ok": false, "error": format!("arrival {arrival} is not parked")})
                    } else {
                        json!({"ok": true, "connections": sent})
                    }
                }
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        Some("resync") => {
            let Some(name) = request.get("connection").and_then(Value::as_str) else {
                return json!({"ok": false, "error": "no \"connection\" in the request"});
            };
            match replication.get(name) {
                Some(h) => match h.commands.send(Command::Resync).await {
                    Ok(()) => json!({"ok": true}),
                    Err(_) => json!({"ok": false, "error": "the replicator has stopped"}),
                },
                None => json!({"ok": false, "error": format!("no connection named {name:?}")}),
            }
        }
        Some("compact") => match store.request_compaction() {
            Ok(n) => json!({"ok": true, "request": n, "pid": std::process::id()}),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Some("compact_status") => {
            let mut v = json!(store.compaction_status());
            v["ok"] = json!(true);
            v["pid"] = json!(std::process::id());
            v
        }
        Some("reload") => match reload.try_send(()) {
            Ok(()) => json!({"ok": true}),
            Err(_) => json!({"ok": false, "error": "a reload is already pending"}),
        },
        Some(other) => json!({"ok": false, "error": format!("unknown command {other:?}")}),
        None => json!({"ok": false, "error": "no \"cmd\" in the request"}),
    }
}

/// Every parked arrival: `{"connection", "local", "arrival", "message", "reason"}`.
fn parked(store: &StoreHandle) -> Result<Vec<Value>, String> {
    use redb::ReadableTable;
    let e = |e: redb::Error| e.to_string();
    let txn = store.snapshot().map_err(|e| e.to_string())?;
    let parked = txn.open_table(index::PARKED).map_err(|x| e(x.into()))?;
    let mut out = Vec::new();
    for entry in parked.iter().map_err(|x| e(x.into()))?.take(100_000) {
        let (k, v) = entry.map_err(|x| e(x.into()))?;
        let (conn, local) = k.value();
        let a: Option<Arrival> = store.arrival_at(&txn, local).ok().flatten();
        out.push(json!({
            "connection": conn,
            "local": local,
            "arrival": a.as_ref().map(|a| a.id.to_string()),
            "message": a.as_ref().map(|a| a.message.clone()),
            "reason": v.value(),
        }));
    }
    Ok(out)
}

/// Why the CLI could not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the daemon is not reachable at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon answered: {0}")]
    Refused(String),
    #[error("bad answer from the daemon: {0}")]
    BadReply(String),
}

/// Sends one request to the daemon of `data_dir` and returns its reply (blocking; for the
/// CLI).
///
/// # Errors
/// The socket is missing or dead ([`ControlError::Unreachable`]: exit 3), the daemon
/// refused the request, or its reply was not JSON.
pub fn request(data_dir: &Path, request: &Value) -> Result<Value, ControlError> {
    use std::io::{BufRead, Write};
    let path = data_dir.join(SOCKET);
    let unreachable = |source| ControlError::Unreachable {
        path: path.clone(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut reply = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    let v: Value =
        serde_json::from_str(reply.trim()).map_err(|e| ControlError::BadReply(e.to_string()))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v)
    } else {
        let why = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        warn!(error = why, "control request refused");
        Err(ControlError::Refused(why.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::fault::FaultVfs;
    use crate::store::{Store, StoreOptions};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_ping_reload_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(
            Arc::new(FaultVfs::new()),
            StoreOptions {
                data_dir: "/c".into(),
                node: "node-c".into(),
                segment_size: 1 << 20,
                max_pending: 1 << 20,
                min_free_disk: 0,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let socket = ControlSocket::bind(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(SOCKET))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (reload_tx, mut reload_rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let listeners = vec![json!({"name": "journal"})];
        let server = tokio::spawn(socket.serve(
            store.handle(),
            listeners,
            Arc::new(Replication::default()),
            reload_tx,
            stop_rx,
        ));
        let data_dir = dir.path().to_owned();
        let replies = tokio::task::spawn_blocking(move || {
            (
                request(&data_dir, &json!({"cmd": "ping"})).unwrap(),
                request(&data_dir, &json!({"cmd": "status"})).unwrap(),
                request(&data_dir, &json!({"cmd": "reload"})).unwrap(),
                request(&data_dir, &json!({"cmd": "nope"}))
                    .unwrap_err()
                    .to_string(),
                request(&data_dir, &json!({"cmd": "compact_status"})).unwrap(),
                request(&data_dir, &json!({"cmd": "compact"}))
                    .unwrap_err()
                    .to_string(),
            )
        })
        .await
        .unwrap();
        assert_eq!(replies.0["ok"], true);
        assert_eq!(replies.1["node"], "node-c");
        assert_eq!(replies.1["listeners"][0]["name"], "journal");
        assert_eq!(replies.2["ok"], true);
        assert!(replies.3.contains("unknown command"), "{}", replies.3);
        assert_eq!(replies.4["done"], 0);
        assert_eq!(replies.4["pid"], std::process::id());
        assert!(
            replies.5.contains("no background compactor"),
            "{}",
            replies.5
        );
        assert!(reload_rx.try_recv().is_ok());
        stop_tx.send(true).unwrap();
        server.await.unwrap();
        assert!(!dir.path().join(SOCKET).exists(), "removed on shutdown");
        let gone = request(dir.path(), &json!({"cmd": "ping"})).unwrap_err();
        assert!(matches!(gone, ControlError::Unreachable { .. }));
    }
}
