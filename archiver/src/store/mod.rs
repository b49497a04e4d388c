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
//! - [`reindex`], [`backup`]: rebuild the index from the log; copy a live store.
//! - [`compact`], [`compactor`], [`dict`]: sealed segments rewritten as compressed blocks
//!   (in the background or on `coffer compact`), and the zstd dictionaries they use.
//!
//! See `docs/store-format.md` for the byte layout, the commit order and the invariants.

pub mod backup;
pub mod catalog;
pub mod codec;
pub mod compact;
pub mod compactor;
pub mod dict;
pub mod engine;
pub mod fault;
pub mod index;
pub mod io;
pub mod log;
pub mod reader;
pub mod record;
pub mod reindex;
pub mod stats;
pub mod summary;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use reader::StoreReader;

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
    /// How sealed segments are compacted (`[store]` `block_size`, `block_level`,
    /// `dictionary`).
    pub compaction: compact::CompactOptions,
    /// Run the background compactor (the daemon); otherwise compaction happens only
    /// when [`StoreHandle::compact`] is called.
    pub background_compaction: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("coffer-data"),
            node: "coffer".into(),
            segment_size: 64 << 20,
            max_pending: 256 << 20,
            min_free_disk: 0,
            compaction: compact::CompactOptions::default(),
            background_compaction: false,
        }
    }
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
    /// The disk is full: a write met ENOSPC, or free space is below `min_free_disk`.
    #[error("disk full (no space left on the device, or free space below min_free_disk)")]
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
    /// What a trusted Coffer client sent in `XCOFFER=` (the milter, a replicating peer):
    /// the origin's arrival id, time, client, HELO, TLS, macros and trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xcoffer: Option<coffer_proto::Xcoffer>,
    /// Nodes known to hold this arrival, in the order it reached them (this node last).
    /// Replication forwards an arrival only to peers not on it (docs/replication.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<String>,
    /// For a replicated arrival: the local listener it came in on (`listener` is the
    /// origin's). Routes match on this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// The TLS of the session that delivered it here (like `client_addr`, what this node
    /// saw; the original client's TLS of a replicated arrival is in `xcoffer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<coffer_proto::TlsInfo>,
    /// For a replicated arrival: when this node stored its copy (RFC 3339 UTC); `time`
    /// is the origin's. The difference is the replication delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<String>,
}

impl Arrival {
    /// Whether this arrival came from a peer (it keeps the origin's id).
    pub fn replicated(&self) -> bool {
        self.via.is_some()
    }

    /// The listener routes match: where it came in on this node.
    pub fn local_listener(&self) -> &str {
        self.via.as_deref().unwrap_or(&self.listener)
    }

    /// Coffer-to-Coffer hops an onward copy would have made before reaching the next
    /// node: 0 from the origin, the received `hops` + 1 from a replica.
    pub fn next_hops(&self) -> u32 {
        if self.replicated() {
            self.xcoffer
                .as_ref()
                .map_or(0, |x| x.hops)
                .saturating_add(1)
        } else {
            0
        }
    }

    /// The nodes holding it: the recorded trace plus the origin node.
    pub fn holders(&self) -> Vec<String> {
        let mut t = self.trace.clone();
        if !t.contains(&self.id.node) {
            t.insert(0, self.id.node.clone());
        }
        t
    }
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
    #[error("I/O error: {0}")]
    Os(#[from] std::io::Error),
    #[error("index error: {0}")]
    Index(String),
    #[error("store is damaged: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the daemon is running (it holds {0}); stop it first")]
    DaemonRunning(PathBuf),
    #[error("no archive at {0}")]
    NoStore(PathBuf),
    #[error("the archive cannot be read right now: {0}")]
    Unavailable(String),
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

/// zstd level used at ingest: light, so the writer keeps up; sealed segments are
/// recompressed harder later.
pub const INGEST_ZSTD_LEVEL: i32 = 1;
/// Messages smaller than this are stored uncompressed (zstd gains little on them).
pub const COMPRESS_MIN_BYTES: usize = 512;
/// Messages up to this size are hashed and compressed on the async task itself.
const INLINE_PREPARE_MAX: usize = 256 << 10;
/// Decoded blocks kept for in-process readers (replicators): at most this many, each up
/// to `block_size` (plus a message bigger than that).
const BLOCK_CACHE: usize = 2;
/// Jobs waiting for the writer; producers block (on blocking threads) beyond this.
const CHANNEL_CAPACITY: usize = 1024;

/// State shared by the handles and the writer thread.
pub struct Shared {
    vfs: Arc<dyn io::Vfs>,
    data_dir: PathBuf,
    node: String,
    epoch: String,
    /// `[store] max_pending` and `min_free_disk`: live, SIGHUP may change them.
    max_pending: AtomicU64,
    min_free_disk: AtomicU64,
    /// Bytes accepted by `ingest` and not yet answered.
    pending: AtomicU64,
    /// Free disk as last measured by the writer.
    free_disk: AtomicU64,
    low_disk: AtomicBool,
    /// The writer hit a sync/commit failure and is reopening the store.
    failed: AtomicBool,
    /// The index stage's commit failed: it answers what still reaches it with an error
    /// until the writer notices and reopens the store.
    index_failed: AtomicBool,
    /// The failure happened with the disk full: refusals say 452 while it lasts.
    failed_full: AtomicBool,
    /// Highest log batch whose index entries are committed (see `writer`).
    committed_gen: AtomicU64,
    stats: stats::StoreStats,
    /// The index the writer has open, for in-process readers (replicators). `None` while
    /// the store reopens after a failure. Hold the `Arc` only briefly: a reopen needs it.
    db: std::sync::RwLock<Option<Arc<redb::Database>>>,
    log_dir: PathBuf,
    /// Bumped after every index commit: in-process readers wait on it for new arrivals.
    committed: tokio::sync::watch::Sender<u64>,
    epoch_bytes: [u8; 16],
    /// The store's zstd dictionaries (readers load them by id).
    dicts: Arc<dict::Dicts>,
    /// The dictionary ingest compresses with, once one exists and `dictionary` is on.
    ingest_dict: std::sync::RwLock<IngestDict>,
    compact_opts: compact::CompactOptions,
    /// Held while a compaction runs: one at a time.
    compact_lock: std::sync::Mutex<()>,
    compaction: compactor::CompactionState,
    /// The blocks in-process readers decoded last, by (segment, offset).
    blocks: std::sync::Mutex<Vec<reader::CachedBlock>>,
    /// The catalogs in-process readers decoded last.
    catalogs: catalog::Catalogs,
    /// Wakes the background compactor, while one runs.
    compaction_tx: std::sync::Mutex<Option<crossbeam_channel::Sender<bool>>>,
}

impl Shared {
    /// Tells the background compactor (if one runs) that a segment was sealed.
    fn segment_sealed(&self) {
        if let Some(tx) = self
            .compaction_tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            let _ = tx.send(false);
        }
    }

    fn set_db(&self, db: Option<Arc<redb::Database>>) {
        *self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = db;
    }
}

/// The open store: owns the writer thread. Dropping every [`StoreHandle`] and calling
/// [`Store::close`] drains the writer (every accepted job is answered) and joins it.
pub struct Store {
    handle: StoreHandle,
    writer: Option<JoinHandle<()>>,
    compactor: Option<compactor::Background>,
}

/// A cheap-clone front for the writer thread, used by listeners.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
    tx: crossbeam_channel::Sender<writer::Work>,
}

impl Store {
    /// Opens the store on the real filesystem.
    ///
    /// # Errors
    /// See [`Store::open_with`].
    pub fn open(opts: StoreOptions) -> Result<Store, StoreError> {
        Self::open_with(Arc::new(io::RealVfs), opts)
    }

    /// Opens (creating or recovering) the store and starts the writer thread.
    ///
    /// # Errors
    /// Another process has the store open ([`StoreError::DaemonRunning`]), I/O errors,
    /// or damage that recovery cannot repair.
    pub fn open_with(vfs: Arc<dyn io::Vfs>, opts: StoreOptions) -> Result<Store, StoreError> {
        let engine = engine::Engine::open(vfs.clone(), &opts.data_dir, Some(&opts.node))?;
        let ingest_dict = if opts.compaction.dictionary {
            engine.dicts.newest().map_err(StoreError::Corrupt)?
        } else {
            None
        };
        let shared = Arc::new(Shared {
            vfs,
            data_dir: opts.data_dir.clone(),
            node: opts.node.clone(),
            epoch: uuid::Uuid::from_bytes(engine.epoch).to_string(),
            max_pending: AtomicU64::new(opts.max_pending),
            min_free_disk: AtomicU64::new(opts.min_free_disk),
            pending: AtomicU64::new(0),
            free_disk: AtomicU64::new(u64::MAX),
            low_disk: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            index_failed: AtomicBool::new(false),
            failed_full: AtomicBool::new(false),
            committed_gen: AtomicU64::new(0),
            stats: stats::StoreStats::default(),
            db: std::sync::RwLock::new(None),
            log_dir: engine.log_dir.clone(),
            committed: tokio::sync::watch::channel(0).0,
            epoch_bytes: engine.epoch,
            dicts: engine.dicts.clone(),
            ingest_dict: std::sync::RwLock::new(ingest_dict),
            compact_opts: opts.compaction.clone(),
            compact_lock: std::sync::Mutex::new(()),
            compaction: compactor::CompactionState::default(),
            compaction_tx: std::sync::Mutex::new(None),
            blocks: std::sync::Mutex::new(Vec::new()),
            catalogs: catalog::Catalogs::new(engine.vfs.clone(), engine.log_dir.clone()),
        });
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        let w = writer::Writer::new(engine, shared.clone(), opts.segment_size)?;
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(&rx))
            .map_err(|source| StoreError::Io {
                path: opts.data_dir.clone(),
                source,
            })?;
        let handle = StoreHandle { shared, tx };
        let compactor = if opts.background_compaction {
            Some(
                compactor::Background::start(handle.clone()).map_err(|source| StoreError::Io {
                    path: opts.data_dir.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        Ok(Store {
            handle,
            writer: Some(writer),
            compactor,
        })
    }

    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Stops the writer once every other handle is gone: it answers everything already
    /// queued, commits, and exits.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // The compactor holds a handle: it stops first (between two blocks), so the
        // writer sees every sender gone.
        if let Some(c) = self.compactor.take() {
            c.stop();
        }
        let (dead_tx, _) = crossbeam_channel::bounded(1);
        drop(std::mem::replace(&mut self.handle.tx, dead_tx));
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Holds `len` bytes of the `max_pending` budget until dropped.
struct PendingGuard {
    shared: Arc<Shared>,
    len: u64,
}

impl PendingGuard {
    fn acquire(shared: &Arc<Shared>, len: u64) -> Result<Self, IngestError> {
        let before = shared.pending.fetch_add(len, Ordering::AcqRel);
        // Always admit one message, however big, when nothing else is pending.
        if before > 0 && before + len > shared.max_pending.load(Ordering::Relaxed) {
            shared.pending.fetch_sub(len, Ordering::AcqRel);
            return Err(IngestError::Busy);
        }
        Ok(Self {
            shared: shared.clone(),
            len,
        })
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.shared.pending.fetch_sub(self.len, Ordering::AcqRel);
    }
}

/// A dictionary for ingest: its id and bytes.
type IngestDict = Option<dict::Dict>;

thread_local! {
    /// One zstd context per thread, reused: creating one per message is measurable. It
    /// is tied to the dictionary id it was made with (0: none).
    static COMPRESSOR: std::cell::RefCell<Option<(u32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(bytes: &[u8], dict: &IngestDict) -> Option<Vec<u8>> {
    let want = dict.as_ref().map_or(0, |(id, _)| *id);
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(id, _)| *id != want) {
            let made = match dict {
                Some((_, d)) => zstd::bulk::Compressor::with_dictionary(INGEST_ZSTD_LEVEL, d),
                None => zstd::bulk::Compressor::new(INGEST_ZSTD_LEVEL),
            };
            *c = made.ok().map(|m| (want, m));
        }
        c.as_mut()?.1.compress(bytes).ok()
    })
}

/// Hashes, compresses and parses a message: the CPU work done before the writer sees it.
fn prepare(msg: Incoming, dict: &IngestDict) -> writer::Prepared {
    let id = crate::ids::MessageId::of(&msg.bytes);
    let summary = summary::Summary::of(&msg.bytes);
    let raw_len = u32::try_from(msg.bytes.len()).expect("messages are capped far below 4 GiB");
    let compressed = if msg.bytes.len() >= COMPRESS_MIN_BYTES {
        compress(&msg.bytes, dict).filter(|c| c.len() < msg.bytes.len())
    } else {
        None
    };
    let (codec, dict_id, payload) = match compressed {
        Some(c) => (
            record::CODEC_ZSTD,
            dict.as_ref().map_or(0, |(id, _)| *id),
            c,
        ),
        None => (record::CODEC_STORED, 0, msg.bytes),
    };
    writer::Prepared {
        id,
        raw_len,
        codec,
        dict_id,
        payload,
        summary,
        envelope: msg.envelope,
        session: msg.session,
    }
}

impl StoreHandle {
    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// The store epoch (a UUID).
    pub fn epoch(&self) -> &str {
        &self.shared.epoch
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> &stats::StoreStats {
        &self.shared.stats
    }

    fn ingest_dict(&self) -> IngestDict {
        self.shared
            .ingest_dict
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Applies new `[store] max_pending` and `min_free_disk` (a reload): new messages
    /// are admitted under them; free disk is judged against the new floor at the
    /// writer's next measurement (within a quarter of a second).
    pub fn set_limits(&self, max_pending: u64, min_free_disk: u64) {
        self.shared
            .max_pending
            .store(max_pending, Ordering::Relaxed);
        self.shared
            .min_free_disk
            .store(min_free_disk, Ordering::Relaxed);
    }

    /// Bytes accepted and not yet answered (the `max_pending` budget in use).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// Free disk in `data_dir` as last measured.
    pub fn free_disk(&self) -> u64 {
        self.shared.free_disk.load(Ordering::Relaxed)
    }

    /// Whether the store failed and is reopening (ingest answers 451 meanwhile).
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Whether free disk is below `min_free_disk` (ingest answers 452 meanwhile).
    pub fn low_disk(&self) -> bool {
        self.shared.low_disk.load(Ordering::Relaxed)
    }

    fn admit(&self, len: u64) -> Result<PendingGuard, IngestError> {
        if self.shared.failed.load(Ordering::Relaxed) {
            if self.shared.failed_full.load(Ordering::Relaxed) {
                return Err(IngestError::DiskFull);
            }
            return Err(IngestError::Unavailable(
                "the store failed and is being reopened".into(),
            ));
        }
        if self.shared.low_disk.load(Ordering::Relaxed) {
            return Err(IngestError::DiskFull);
        }
        PendingGuard::acquire(&self.shared, len)
    }

    /// Archives one message. Resolves only once it is durable (or refused).
    ///
    /// # Errors
    /// An [`IngestError`]: every one is temporary; the client keeps the mail.
    ///
    /// # Cancellation
    /// Dropping the future does not withdraw the message: it may still be committed.
    pub async fn ingest(&self, msg: Incoming) -> Result<Receipt, IngestError> {
        let guard = self.admit(msg.bytes.len() as u64)?;
        // Hashing and light compression of a small message cost tens of µs: cheaper inline
        // than a hop to a blocking thread and back. Big ones go to the blocking pool.
        let dict = self.ingest_dict();
        let prepared = if msg.bytes.len() <= INLINE_PREPARE_MAX {
            prepare(msg, &dict)
        } else {
            tokio::task::spawn_blocking(move || prepare(msg, &dict))
                .await
                .map_err(|e| IngestError::Unavailable(format!("preparing the message: {e}")))?
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = writer::Work::Ingest(writer::Job {
            prepared,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        self.submit(job).await?;
        let result = rx.await.unwrap_or(Err(IngestError::ShuttingDown));
        drop(guard);
        result
    }

    /// Applies a change of replication state (cursor, parked arrival) through the index
    /// stage, the only writer of the index. Resolves once it is committed.
    ///
    /// # Errors
    /// The store is shutting down or failed; the change was not made.
    pub async fn update_state(&self, op: writer::StateOp) -> Result<(), IngestError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = writer::Work::State(
            op,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        self.submit(work).await?;
        rx.await.unwrap_or(Err(IngestError::ShuttingDown))
    }

    /// Hands work to the writer. When its channel is full the writer is behind: the wait
    /// for room happens on a blocking thread, not on the runtime.
    async fn submit(&self, work: writer::Work) -> Result<(), IngestError> {
        match self.tx.try_send(work) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::TrySendError::Full(work)) => {
                let sender = self.tx.clone();
                let sent = tokio::task::spawn_blocking(move || sender.send(work).is_ok())
                    .await
                    .unwrap_or(false);
                if sent {
                    Ok(())
                } else {
                    Err(IngestError::ShuttingDown)
                }
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(IngestError::ShuttingDown),
        }
    }

    /// [`StoreHandle::update_state`] for threads outside a runtime (the compactor).
    ///
    /// # Errors
    /// As [`StoreHandle::update_state`].
    pub fn update_state_blocking(&self, op: writer::StateOp) -> Result<(), IngestError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let work = writer::Work::State(
            op,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        self.tx.send(work).map_err(|_| IngestError::ShuttingDown)?;
        rx.recv().unwrap_or(Err(IngestError::ShuttingDown))
    }

    /// Rewrites `index.redb` in key order on the writer thread (ingest waits meanwhile):
    /// see `Writer::rewrite_index`. `Err` says why the index was left as it was; the
    /// store serves on either way.
    ///
    /// # Errors
    /// The index was not rewritten (the reason), or the store is shutting down.
    pub fn rewrite_index(&self) -> Result<writer::IndexRewrite, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let work = writer::Work::RewriteIndex(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        self.tx
            .send(work)
            .map_err(|_| IngestError::ShuttingDown.to_string())?;
        rx.recv()
            .unwrap_or_else(|_| Err(IngestError::ShuttingDown.to_string()))
    }

    /// A read snapshot of the committed index, for in-process readers.
    ///
    /// # Errors
    /// The store is reopening after a failure, or redb failed.
    pub fn snapshot(&self) -> Result<redb::ReadTransaction, StoreError> {
        use redb::ReadableDatabase;
        let db = self
            .shared
            .db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Index("the store is reopening".into()))?;
        db.begin_read().map_err(engine::idx_err)
    }

    /// The arrival with local number `local` as of `txn`, wherever the index keeps it
    /// (its row, or a compacted segment's catalog).
    ///
    /// # Errors
    /// Index and I/O errors, a damaged catalog or arrival.
    pub fn arrival_at(
        &self,
        txn: &redb::ReadTransaction,
        local: u64,
    ) -> Result<Option<Arrival>, StoreError> {
        catalog::arrival(txn, &self.shared.catalogs, local)
    }

    /// Arrivals `from` to `from + max - 1` as of `txn`, in order: see
    /// [`catalog::arrivals_from`].
    ///
    /// # Errors
    /// Index and I/O errors, a damaged catalog.
    pub fn arrivals_from(
        &self,
        txn: &redb::ReadTransaction,
        from: u64,
        max: usize,
    ) -> Result<Vec<catalog::Numbered>, StoreError> {
        catalog::arrivals_from(txn, &self.shared.catalogs, from, max)
    }

    /// Changes whenever the index commits: wait on it for new arrivals.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    /// The archived bytes of a message the index has committed, checked against the id.
    ///
    /// # Errors
    /// The message is not indexed, or its record is damaged.
    pub fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, StoreError> {
        let mut tries = 0;
        loop {
            let loc = {
                let txn = self.snapshot()?;
                let t = txn.open_table(index::MESSAGES).map_err(engine::idx_err)?;
                let v = t.get(id.0).map_err(engine::idx_err)?;
                v.and_then(|v| index::Loc::decode(v.value()))
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("message {id} is not in the index"))
                    })?
            };
            match self.read_at(id, loc) {
                // A compaction replaced the segment after the snapshot: read it anew.
                Err(e) if reader::is_gone(&e) && tries < 3 => tries += 1,
                r => return r,
            }
        }
    }

    /// Reads a message at `loc`; a block is decoded once for the messages read from it
    /// one after the other (a replicator walks arrivals in log order).
    fn read_at(&self, id: &MessageId, loc: index::Loc) -> Result<Vec<u8>, StoreError> {
        let sh = &self.shared;
        let lookup = |d| sh.dicts.get(d);
        let Some(position) = loc.position else {
            return reader::read_blob(&*sh.vfs, &sh.log_dir, id, loc, &lookup);
        };
        let key = (loc.segment, loc.offset);
        let cached = {
            let cache = sh
                .blocks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, b)| b.clone())
        };
        let block = match cached {
            Some(b) => b,
            None => {
                let path = log::blk_path(&sh.log_dir, loc.segment);
                let file = sh.vfs.open_read(&path).map_err(engine::io_err(&path))?;
                let b = Arc::new(reader::load_block(&*file, &sh.log_dir, id, loc, &lookup)?);
                let mut cache = sh
                    .blocks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.len() >= BLOCK_CACHE {
                    cache.remove(0);
                }
                cache.push((key, b.clone()));
                b
            }
        };
        reader::block_message(&block, &sh.log_dir, id, loc, position)
    }

    /// [`StoreHandle::ingest`] for threads outside a runtime (tests, import).
    ///
    /// # Errors
    /// As [`StoreHandle::ingest`].
    pub fn ingest_blocking(&self, msg: Incoming) -> Result<Receipt, IngestError> {
        let guard = self.admit(msg.bytes.len() as u64)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let job = writer::Work::Ingest(writer::Job {
            prepared: prepare(msg, &self.ingest_dict()),
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        self.tx.send(job).map_err(|_| IngestError::ShuttingDown)?;
        let result = rx.recv().unwrap_or(Err(IngestError::ShuttingDown));
        drop(guard);
        result
    }
}

#[cfg(test)]
mod compact_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tools_tests;
