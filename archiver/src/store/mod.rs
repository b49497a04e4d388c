//! The archive store: append-only segment log + redb index, one writer thread.
//!
//! # Layout
//! - [`io`]: the file layer every store byte goes through ([`io::Vfs`]), with the real
//!   filesystem and a fault-injecting one that can lose power at any sync.
//! - `record`: the log record codec (magic, lengths, CRC, flags, payload).
//! - `log`: segment files: append, fdatasync, recovery of torn tails.
//! - `index`: redb tables: messages, arrivals, arrival keys, search keys, meta.
//! - `writer`: the writer thread: group commit of everything waiting on the channel.
//! - `reader`: read side for the CLI and the daemon: status, search, get, verify.
//!
//! See `docs/store-format.md` for the byte layout, the commit order and the invariants.

pub mod io;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, SessionInfo};
use crate::ids::{ArrivalId, MessageId};

/// How to open a store for writing (the daemon, or the CLI when no daemon runs).
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    /// This node's name: the first part of every arrival id minted here.
    pub node: String,
    /// A segment is sealed, and a new one started, past this many bytes.
    pub segment_size: u64,
    /// Bytes accepted but not yet committed; above it ingest answers [`IngestError::Busy`].
    pub max_pending: u64,
    /// Below this much free disk ingest answers [`IngestError::DiskFull`].
    pub min_free_disk: u64,
}

/// One message handed to the store by a listener.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The archived bytes, exactly as the transport delivered them.
    pub bytes: Vec<u8>,
    pub envelope: Envelope,
    pub session: SessionInfo,
}

/// What the store says once an [`Incoming`] is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub message_id: MessageId,
    pub arrival_id: ArrivalId,
    /// True when this was a retry of an arrival already stored (same bytes, same
    /// envelope, same listener): nothing new was added.
    pub repeat: bool,
}

/// Why the store did not take a message. Every variant is temporary for the client:
/// listeners answer 4xx and the sender keeps the mail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("too much mail waiting to be committed (max_pending)")]
    Busy,
    #[error("free disk space below min_free_disk")]
    DiskFull,
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("the store is shutting down")]
    ShuttingDown,
}

/// One arrival: a message landing on a listener with an envelope. Stored in the log and
/// the index, and shown by `coffer get --envelope` and `coffer search --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    pub id: ArrivalId,
    /// The message's id (SHA-256, hex).
    pub message: String,
    /// Arrival time, RFC 3339 UTC.
    pub time: String,
    pub listener: String,
    pub protocol: String,
    pub client_addr: Option<String>,
    pub helo: Option<String>,
    pub mail_from: String,
    #[serde(default)]
    pub mail_params: Vec<String>,
    pub rcpt_to: Vec<String>,
    pub queue_id: Option<String>,
}

/// Search filters (`coffer search`, `coffer export`). All given filters must match.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Exact address (case-insensitive) or `@domain`.
    pub from: Option<String>,
    /// Exact address or `@domain`; matches To, Cc and envelope recipients.
    pub to: Option<String>,
    /// Case-insensitive substring of the decoded Subject.
    pub subject: Option<String>,
    /// The Message-ID header, with or without angle brackets.
    pub message_id: Option<String>,
    /// Arrival time bounds, microseconds since the Unix epoch, UTC: `since <= t < until`.
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    /// 0 = no limit.
    pub limit: usize,
}

/// One archived message as search shows it (`coffer search --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: String,
    /// Size of the archived bytes.
    pub size: u64,
    /// The Date header as written in the message, if any.
    pub date: Option<String>,
    pub from: Vec<String>,
    /// To and Cc addresses from the headers.
    pub to: Vec<String>,
    pub subject: Option<String>,
    pub message_id: Option<String>,
    pub arrivals: Vec<Arrival>,
}

/// Totals for `coffer status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    pub node: String,
    /// The store epoch, a UUID.
    pub epoch: String,
    pub messages: u64,
    pub arrivals: u64,
    pub repeats: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
}

/// What `coffer verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub messages_checked: u64,
    pub arrivals_checked: u64,
    /// One line per problem, naming the message or record.
    pub problems: Vec<String>,
}
