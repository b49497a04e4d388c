//! `coffer compact [--wait] [--json]`: seal the open segment and rewrite sealed segments
//! as compressed blocks (docs/store-format.md "Compacted segments") — through the daemon's
//! control socket when it runs, directly on the store when it does not.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use super::error::{CliError, EXIT_OK};
use super::output;
use crate::config::Config;
use crate::control::{self, ControlError};
use crate::store::io::{RealVfs, Vfs};
use crate::store::{compactor, Store};

/// How often `--wait` asks the daemon whether the compaction is done.
const POLL: Duration = Duration::from_millis(200);
/// Daemon restarts `--wait` follows (asking the new daemon again) before it gives up.
const MAX_RESTARTS: u32 = 10;

#[derive(Args, Debug)]
#[command(
    after_help = "With the daemon running, the request goes over its control socket and \
                  the daemon's low-priority compactor does the work (ingest goes on), then \
                  rewrites index.redb in key order (ingest waits for that part); without \
                  --wait the command returns once the request is taken. With no daemon, \
                  the command compacts the store and index.redb itself and returns when \
                  done."
)]
pub struct CompactArgs {
    /// Return only once the compaction has finished.
    #[arg(long)]
    pub wait: bool,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// # Errors
/// The daemon holds the store but does not answer (exit 3), the daemon's compaction
/// failed, or the store's did.
pub fn cmd_compact(cfg: &Config, a: &CompactArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let data_dir = &cfg.node.data_dir;
    if !data_dir.is_dir() {
        return Err(CliError::NoArchive(data_dir.clone()));
    }
    match control::request(data_dir, &json!({"cmd": "compact"})) {
        Ok(v) => return through_daemon(data_dir, &v, a, out),
        Err(ControlError::Refused(why)) => return Err(CliError::Refused(why)),
        Err(e) => {
            // No daemon answering: if none holds the store, compact it here.
            let lock = data_dir.join(crate::store::engine::LOCK_FILE);
            let free = RealVfs
                .try_lock(&lock)
                .map_err(|e| CliError::Failed(format!("{}: {e}", lock.display())))?
                .is_some();
            if !free {
                return Err(CliError::NoDaemon(e.to_string()));
            }
        }
    }
    let store = Store::open(crate::server::store_options(cfg))?;
    let handle = store.handle();
    let res = handle.compact(true, &|| false);
    let status = handle.compaction_status();
    drop(handle);
    store.close();
    let report = res?;
    let (index_before, index_after) = compactor::compact_index(data_dir)?;
    let doc = json!({
        "daemon": false,
        "segments": report.segments,
        "bytes_in": report.bytes_in,
        "bytes_out": report.bytes_out,
        "raw_bytes": report.raw_bytes,
        "dictionary": report.trained_dict,
        "index_bytes_before": index_before,
        "index_bytes_after": index_after,
        "segments_compacted": status.segments_compacted,
    });
    if a.json {
        output::write_json(out, &doc).map_err(CliError::Output)?;
    } else {
        writeln!(
            out,
            "compacted {} segment(s): {} bytes of log became {} ({} raw bytes of mail); \
             index {} -> {} bytes{}",
            report.segments,
            report.bytes_in,
            report.bytes_out,
            report.raw_bytes,
            index_before,
            index_after,
            report
                .trained_dict
                .map(|d| format!("; trained dictionary {d}"))
                .unwrap_or_default()
        )
        .map_err(CliError::Output)?;
    }
    Ok(EXIT_OK)
}

fn through_daemon(
    data_dir: &Path,
    accepted: &Value,
    a: &CompactArgs,
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    let ask = |req: &Value| {
        control::request(data_dir, req).map_err(|e| match e {
            ControlError::Refused(why) => CliError::Refused(why),
            e => CliError::NoDaemon(e.to_string()),
        })
    };
    let mut request = accepted["request"].as_u64().unwrap_or(0);
    let mut pid = accepted["pid"].as_u64();
    let mut status = ask(&json!({"cmd": "compact_status"}))?;
    if a.wait {
        // Until the daemon says a run covering this request ended. A daemon restarted
        // meanwhile (another pid) knows nothing of the request: ask it again, a bounded
        // number of times.
        let mut restarts = 0;
        loop {
            if status["pid"].as_u64() != pid {
                restarts += 1;
                if restarts > MAX_RESTARTS {
                    return Err(CliError::Failed(
                        "the daemon keeps restarting; the compaction did not finish".into(),
                    ));
                }
                let again = ask(&json!({"cmd": "compact"}))?;
                request = again["request"].as_u64().unwrap_or(0);
                pid = again["pid"].as_u64();
            } else if status["done"].as_u64().unwrap_or(0) >= request {
                break;
            }
            std::thread::sleep(POLL);
            status = ask(&json!({"cmd": "compact_status"}))?;
        }
        if let Some(e) = status["last_error"].as_str() {
            return Err(CliError::Failed(format!("the compaction failed: {e}")));
        }
    }
    let mut doc = status.clone();
    let index = &status["index"];
    if let Some(o) = doc.as_object_mut() {
        o.remove("ok");
        o.insert("daemon".into(), Value::Bool(true));
        o.insert("request".into(), request.into());
        if a.wait {
            o.insert("index_bytes_before".into(), index["bytes_before"].clone());
            o.insert("index_bytes_after".into(), index["bytes_after"].clone());
        }
    }
    if a.json {
        output::write_json(out, &doc).map_err(CliError::Output)?;
    } else if a.wait {
        let index_text = match (
            index["bytes_before"].as_u64(),
            index["bytes_after"].as_u64(),
        ) {
            (Some(b), Some(a)) => format!(
                "; index {b} -> {a} bytes, {} -> {} on disk (ingest waited {} ms)",
                index["disk_bytes_before"].as_u64().unwrap_or(0),
                index["disk_bytes_after"].as_u64().unwrap_or(0),
                index["millis"].as_u64().unwrap_or(0)
            ),
            _ => match index["skipped"].as_str() {
                Some(why) => format!("; index not rewritten: {why}"),
                None => String::new(),
            },
        };
        writeln!(
            out,
            "compaction done: {} segment(s) compacted since the daemon started ({} bytes of \
             log became {}){index_text}",
            status["segments_compacted"], status["bytes_in"], status["bytes_out"]
        )
        .map_err(CliError::Output)?;
    } else {
        writeln!(
            out,
            "compaction requested (the daemon seals the open segment and compacts in the \
             background; --wait waits for it)"
        )
        .map_err(CliError::Output)?;
    }
    Ok(EXIT_OK)
}
