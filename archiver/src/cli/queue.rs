//! `coffer queue [--json]`, `coffer queue retry ARRIVAL`, `coffer queue skip ARRIVAL`,
//! `coffer resync CONNECTION`: replication state, through the daemon's control socket
//! (exit 3 when it is not running).

use std::io::Write;
use std::path::Path;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::error::{CliError, EXIT_OK};
use super::output::{self, ConnectionStatus};
use crate::control::{self, ControlError};

#[derive(Args, Debug)]
pub struct QueueArgs {
    #[command(subcommand)]
    pub action: Option<QueueAction>,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum QueueAction {
    /// Ship a parked arrival again (on every connection that parked it).
    Retry {
        /// The arrival id, NODE/EPOCH/SEQ.
        #[arg(value_name = "ARRIVAL")]
        arrival: String,
    },
    /// Give up on a parked arrival: it will not be shipped on those connections.
    Skip {
        #[arg(value_name = "ARRIVAL")]
        arrival: String,
    },
}

#[derive(Args, Debug)]
pub struct ResyncArgs {
    /// The connection's name.
    #[arg(value_name = "CONNECTION")]
    pub connection: String,
}

fn ask(data_dir: &Path, request: &Value) -> Result<Value, CliError> {
    control::request(data_dir, request).map_err(|e| match e {
        ControlError::Unreachable { .. } => CliError::NoDaemon(e.to_string()),
        ControlError::Refused(why) => CliError::Refused(why),
        ControlError::BadReply(_) => CliError::NoDaemon(e.to_string()),
    })
}

/// The daemon's connections for `coffer status`; empty (with a warning) if it does not
/// answer.
pub fn daemon_connections(data_dir: &Path) -> Vec<ConnectionStatus> {
    match ask(data_dir, &json!({"cmd": "status"})) {
        Ok(v) => serde_json::from_value(v["connections"].clone()).unwrap_or_default(),
        Err(e) => {
            tracing::warn!("replication state unavailable: {e}");
            Vec::new()
        }
    }
}

/// # Errors
/// The daemon is not reachable or refused.
pub fn cmd_queue(data_dir: &Path, a: &QueueArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    let (cmd, arrival) = match &a.action {
        None => {
            let v = ask(data_dir, &json!({"cmd": "queue"}))?;
            let conns = v["connections"].clone();
            if a.json {
                output::write_json(out, &json!({"connections": conns}))
                    .map_err(CliError::Output)?;
            } else {
                write_queue_human(out, &conns).map_err(CliError::Output)?;
            }
            return Ok(EXIT_OK);
        }
        Some(QueueAction::Retry { arrival }) => ("queue_retry", arrival),
        Some(QueueAction::Skip { arrival }) => ("queue_skip", arrival),
    };
    let v = ask(data_dir, &json!({"cmd": cmd, "arrival": arrival}))?;
    if a.json {
        output::write_json(out, &v).map_err(CliError::Output)?;
    } else {
        let conns: Vec<&str> = v["connections"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let what = if cmd == "queue_retry" {
            "queued again"
        } else {
            "skipped"
        };
        writeln!(out, "{arrival}: {what} on {}", conns.join(", ")).map_err(CliError::Output)?;
    }
    Ok(EXIT_OK)
}

/// # Errors
/// The daemon is not reachable, or has no such connection.
pub fn cmd_resync(data_dir: &Path, a: &ResyncArgs, out: &mut dyn Write) -> Result<u8, CliError> {
    ask(
        data_dir,
        &json!({"cmd": "resync", "connection": a.connection}),
    )?;
    writeln!(out, "{}: resyncing from the first arrival", a.connection)
        .map_err(CliError::Output)?;
    Ok(EXIT_OK)
}

fn write_queue_human(out: &mut dyn Write, conns: &Value) -> std::io::Result<()> {
    let empty = Vec::new();
    let list = conns.as_array().unwrap_or(&empty);
    if list.is_empty() {
        return writeln!(out, "no connections");
    }
    for c in list {
        let s = |k: &str| c[k].as_str().unwrap_or("-").to_owned();
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        writeln!(
            out,
            "{} (peer {}, {} mode): {}, cursor {}, lag {} arrivals, parked {}",
            s("name"),
            s("peer"),
            s("mode"),
            s("state"),
            n("cursor"),
            n("lag_arrivals"),
            n("parked")
        )?;
        if let Some(err) = c["last_error"].as_str() {
            writeln!(out, "  last error: {err}")?;
        }
        if let Some(until) = c["resync_until"].as_u64() {
            writeln!(
                out,
                "  resyncing: every arrival up to local number {until} is sent again"
            )?;
        }
        for d in c["deferred"].as_array().unwrap_or(&empty) {
            writeln!(
                out,
                "  deferred {} after {} attempts, next in {} ms: {}",
                d["arrival"].as_str().unwrap_or("?"),
                d["attempts"].as_u64().unwrap_or(0),
                d["next_attempt_ms"].as_u64().unwrap_or(0),
                d["last_error"].as_str().unwrap_or("")
            )?;
        }
        for p in c["parked_arrivals"].as_array().unwrap_or(&empty) {
            writeln!(
                out,
                "  parked {}: {}",
                p["arrival"].as_str().unwrap_or("?"),
                p["reason"].as_str().unwrap_or("")
            )?;
        }
    }
    Ok(())
}
