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

/// Errors of the store as a whole (open, recovery, reads).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("index error: {0}")]
    Index(String),
    #[error("store is damaged: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the daemon is running (it holds {0}); stop it first")]
    DaemonRunning(PathBuf),
}

/// Why a message id (or prefix) did not name exactly one message.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no archived message matches {0:?}")]
    NotFound(String),
    #[error("{0:?} matches {1} messages; give more digits")]
    Ambiguous(String, usize),
    #[error("{0:?} is not a message id or a prefix of at least 8 hex digits")]
    BadPrefix(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Read access to a store, for the CLI and the daemon's own readers.
///
/// Opens read-only beside a running daemon (redb in `SingleWriter` mode); with no daemon
/// running it opens the store itself, repairing it after a crash if it must.
pub struct StoreReader {
    _private: (),
}

#[allow(clippy::unused_self, unused_variables)]
impl StoreReader {
    /// # Errors
    /// The store does not exist or cannot be opened.
    pub fn open(data_dir: &std::path::Path) -> Result<StoreReader, StoreError> {
        Err(StoreError::Unsupported(format!("not implemented: {}", data_dir.display())))
    }

    /// Whether a daemon holds the store's write lock.
    pub fn daemon_running(&self) -> bool {
        false
    }

    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        Err(StoreError::Unsupported("not implemented".into()))
    }

    /// Messages matching `query`, newest arrival first.
    pub fn search(&self, query: &Query) -> Result<Vec<MessageRecord>, StoreError> {
        Err(StoreError::Unsupported("not implemented".into()))
    }

    /// Resolves a full id or a unique prefix of at least 8 hex digits.
    pub fn resolve(&self, prefix: &str) -> Result<MessageId, LookupError> {
        Err(LookupError::NotFound(prefix.into()))
    }

    pub fn record(&self, id: &MessageId) -> Result<MessageRecord, StoreError> {
        Err(StoreError::Unsupported("not implemented".into()))
    }

    /// The archived bytes, exactly.
    pub fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, StoreError> {
        Err(StoreError::Unsupported("not implemented".into()))
    }

    pub fn arrivals(&self, id: &MessageId) -> Result<Vec<Arrival>, StoreError> {
        Err(StoreError::Unsupported("not implemented".into()))
    }

    /// Number of messages `verify` will check (for a progress bar).
    pub fn message_count(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Re-hashes every message; with `deep`, also checks the index against the log.
    /// `progress(done, total)` is called as it goes.
    pub fn verify(
        &self,
        deep: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        Err(StoreError::Unsupported("not implemented".into()))
    }
}
