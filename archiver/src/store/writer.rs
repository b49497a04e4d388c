//! The writer: the only code that appends to the log or writes the index.
//!
//! Two threads, one pipeline:
//!
//! * the **log stage** (`store-writer`) takes [`Job`]s from a bounded channel and
//!   group-commits whatever is waiting: it decides what is new (arrival keys and blobs,
//!   looked up in a read snapshot of the index plus what it appended and the index has not
//!   committed yet), appends the records to the active segment with one write, runs one
//!   fdatasync (plus a directory fsync for a new segment), and then answers every job of
//!   the batch: **the log is the durable point**;
//! * the **index stage** (`store-indexer`) applies those batches to redb — several per
//!   transaction when it is behind — through the same functions recovery replays the log
//!   with, and commits.
//!
//! The index therefore trails the log by a few milliseconds and only ever points at
//! synced records; a crash loses no acknowledged mail because recovery replays the log
//! past the index's tail (docs/store-format.md). Readers beside the daemon wait for the
//! index to reach the log end they saw before answering (`reader.rs`), so a message
//! acknowledged before a command started is always visible to it.
//!
//! Failure handling (design.md §2.6): a failed append (ENOSPC, EIO) rolls the batch back
//! and the writer carries on; a failed sync or index commit *poisons* the store — no retry
//! in place, since the kernel may have dropped the dirty pages — and the writer reopens
//! it from disk, recovering from the last durable point.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use redb::{ReadTransaction, ReadableDatabase};
use tracing::{error, info, warn};

use super::engine::{arrival_key, idx_err, Engine};
pub use super::index::StateOp;
use super::index::{self, get_u64, Loc, Tables};
use super::io::StoreLock;
use super::log::Log;
use super::record::{
    encode_record, RecordHeader, KIND_ARRIVAL, KIND_MESSAGE, KIND_REPEAT, SEGMENT_HEADER_LEN,
};
use super::summary::Summary;
use super::{Arrival, IngestError, Receipt, Shared, StoreError};
use crate::envelope::{Envelope, SessionInfo};
use crate::ids::{ArrivalId, ArrivalKey, MessageId};

/// Most jobs committed in one log batch.
const MAX_BATCH_JOBS: usize = 512;
/// Most payload bytes committed in one log batch.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// Log batches waiting for the index stage; the log stage waits beyond this.
const INDEX_QUEUE: usize = 64;
/// Least time between the starts of two index commits while batches keep coming.
const INDEX_COMMIT_SPACING: Duration = Duration::from_millis(50);
/// Nice value of the index stage. Nobody waits on it (answers go out after the log sync),
/// so under CPU contention it yields to the sessions and the log stage, which are on the
/// path of every acknowledgement; when it falls behind, its batches grow and each
/// message costs it less.
const INDEXER_NICE: i32 = 10;
/// Most log batches applied in one index transaction.
const MAX_INDEX_BATCHES: usize = 64;
/// How often an idle writer re-measures free disk (and retries a failed store).
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Free space under which a store failure is reported as a full disk.
const DISK_FULL_MARGIN: u64 = 16 << 20;
/// How long a poisoned writer waits between attempts to reopen the store.
const REOPEN_BACKOFF: Duration = Duration::from_millis(500);
/// How long an index rewrite waits for in-process readers to let go of the index.
const REWRITE_HOLDER_WAIT: Duration = Duration::from_secs(5);

/// A message made ready for the log off the writer thread: hashed, compressed, parsed.
pub struct Prepared {
    pub id: MessageId,
    pub raw_len: u32,
    pub codec: u8,
    /// The zstd dictionary the payload was compressed with (0: none).
    pub dict_id: u32,
    pub payload: Vec<u8>,
    pub summary: Summary,
    pub envelope: Envelope,
    pub session: SessionInfo,
}

pub type Reply = Box<dyn FnOnce(Result<Receipt, IngestError>) + Send>;

pub struct Job {
    pub prepared: Prepared,
    pub reply: Reply,
}

/// Answer to a [`StateOp`], given once the index committed it.
pub type StateReply = Box<dyn FnOnce(Result<(), IngestError>) + Send>;

/// What an index rewrite did: `index.redb`'s size before and after, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexRewrite {
    pub before: u64,
    pub after: u64,
    /// The same as disk space in use (redb grows the file ahead of its need, sparsely).
    pub disk_before: u64,
    pub disk_after: u64,
    /// How long ingest waited: from closing the index to reopening it.
    pub millis: u64,
}

/// Answer to [`Work::RewriteIndex`]: the sizes, or why the index was left as it was.
pub type RewriteReply = Box<dyn FnOnce(Result<IndexRewrite, String>) + Send>;

/// What the writer's channel carries.
#[allow(clippy::large_enum_variant)] // nearly every item is an `Ingest`: boxing it costs more
pub enum Work {
    /// A message to archive.
    Ingest(Job),
    /// A replication state change, applied by the index stage in log order.
    State(StateOp, StateReply),
    /// Rewrite `index.redb` in key order (`coffer compact`): close the index, rewrite it,
    /// reopen it. Ingest waits in the channel meanwhile.
    RewriteIndex(RewriteReply),
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// What one synced log batch asks of the index.
struct IndexBatch {
    /// Number of the log batch (1, 2, ...): what `committed_gen` counts.
    gen: u64,
    messages: Vec<(MessageId, Loc, Summary)>,
    /// Each arrival with its arrival key (`None` for a replicated one).
    arrivals: Vec<(Arrival, Option<[u8; 32]>)>,
    repeats: u64,
    /// Replication state changes, committed with this batch and answered after.
    state: Vec<(StateOp, StateReply)>,
    /// The log position just past this batch.
    tail: (u32, u64),
    /// The arrival sequence number to mint next.
    next_seq: u64,
}

/// Arrival keys and blobs the log stage appended that the index has not committed yet,
/// each tagged with its log batch number. Without them, a retry arriving before the
/// index caught up would be stored twice.
#[derive(Default)]
struct Pending {
    keys: HashMap<[u8; 32], (ArrivalId, u64)>,
    messages: HashMap<[u8; 32], u64>,
    /// Arrival ids appended (replicated arrivals dedupe by id only).
    ids: HashMap<String, u64>,
}

impl Pending {
    /// Forgets what the index has committed (and a snapshot taken after now will show).
    fn prune(&mut self, committed: u64) {
        self.keys.retain(|_, (_, gen)| *gen > committed);
        self.messages.retain(|_, gen| *gen > committed);
        self.ids.retain(|_, gen| *gen > committed);
    }
}

/// The store while it works: the log, the index stage, and what is in flight.
struct Live {
    db: Arc<redb::Database>,
    log: Log,
    node: String,
    epoch8: String,
    pending: Pending,
    next_seq: u64,
    gen: u64,
    index_tx: Option<Sender<IndexBatch>>,
    indexer: Option<JoinHandle<()>>,
    /// Held while the store is open for writing; taken back by the writer when the
    /// store fails, so the lock is never released between a failure and the reopen.
    lock: Option<Box<dyn StoreLock>>,
}

impl Live {
    fn start(engine: Engine, shared: &Arc<Shared>) -> Result<Live, StoreError> {
        let Engine {
            db,
            log,
            node,
            epoch8,
            lock,
            ..
        } = engine;
        let next_seq = {
            let txn = db.begin_write().map_err(idx_err)?;
            let next = get_u64(&txn, index::K_NEXT_SEQ).map_err(idx_err)?.max(1);
            publish_totals(shared, &read_totals(&txn));
            next
        };
        shared.committed_gen.store(0, Ordering::Release);
        shared.index_failed.store(false, Ordering::Release);
        shared.set_db(Some(db.clone()));
        let (index_tx, rx) = crossbeam_channel::bounded(INDEX_QUEUE);
        let (db2, shared2) = (db.clone(), shared.clone());
        let indexer = std::thread::Builder::new()
            .name("store-indexer".into())
            .spawn(move || run_indexer(&db2, &rx, &shared2))
            .map_err(StoreError::Os)?;
        Ok(Live {
            db,
            log,
            node,
            epoch8,
            pending: Pending::default(),
            next_seq,
            gen: 0,
            index_tx: Some(index_tx),
            indexer: Some(indexer),
            lock: Some(lock),
        })
    }

    /// Lets the index stage finish what it has and waits for it. Returns false if it
    /// stopped on a failure.
    fn stop(&mut self) -> bool {
        drop(self.index_tx.take());
        self.indexer.take().is_none_or(|h| h.join().is_ok())
    }

    /// Starts the index stage again after [`Live::stop`], on the same index, and shows
    /// the index to in-process readers again.
    fn resume(&mut self, shared: &Arc<Shared>) -> Result<(), StoreError> {
        shared.index_failed.store(false, Ordering::Release);
        let (index_tx, rx) = crossbeam_channel::bounded(INDEX_QUEUE);
        let (db2, shared2) = (self.db.clone(), shared.clone());
        let indexer = std::thread::Builder::new()
            .name("store-indexer".into())
            .spawn(move || run_indexer(&db2, &rx, &shared2))
            .map_err(StoreError::Os)?;
        self.index_tx = Some(index_tx);
        self.indexer = Some(indexer);
        shared.set_db(Some(self.db.clone()));
        Ok(())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Writer {
    live: Option<Live>,
    /// The store's lock while `live` is `None` (failed, reopening).
    held_lock: Option<Box<dyn StoreLock>>,
    shared: Arc<Shared>,
    segment_size: u64,
    last_reopen: Option<Instant>,
}

impl Writer {
    /// # Errors
    /// Starting the index stage failed.
    pub fn new(engine: Engine, shared: Arc<Shared>, segment_size: u64) -> Result<Self, StoreError> {
        let live = Live::start(engine, &shared)?;
        let w = Self {
            live: Some(live),
            held_lock: None,
            shared,
            segment_size,
            last_reopen: None,
        };
        w.refresh_disk();
        Ok(w)
    }

    /// Runs until every sender is gone, then returns once everything received was
    /// answered and indexed.
    ///
    /// While idle it re-measures free disk and, after a failure, retries reopening the
    /// store, so refusals end by themselves once the cause is gone.
    pub fn run(mut self, rx: &Receiver<Work>) {
        loop {
            let first = match rx.recv_timeout(IDLE_TICK) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    if self.live.is_some() && self.shared.index_failed.load(Ordering::Acquire) {
                        self.poison("the index stage stopped");
                    }
                    if self.live.is_none() {
                        let _ = self.ensure_live();
                    }
                    self.refresh_disk();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let (mut batch, mut state) = (Vec::new(), Vec::new());
            let mut bytes = 0;
            let mut seal = false;
            let mut rewrite = None;
            let mut next = Some(first);
            while let Some(work) = next.take() {
                match work {
                    Work::Ingest(job) => {
                        bytes += job.prepared.payload.len();
                        batch.push(job);
                    }
                    Work::State(op, reply) => {
                        seal |= op == StateOp::Seal;
                        state.push((op, reply));
                    }
                    // What came before it is committed first; what comes after waits.
                    Work::RewriteIndex(reply) => rewrite = Some(reply),
                }
                if rewrite.is_none() && batch.len() < MAX_BATCH_JOBS && bytes < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() || !state.is_empty() {
                self.commit_batch(batch, state, seal);
            }
            if let Some(reply) = rewrite {
                reply(self.rewrite_index());
            }
        }
        if let Some(mut live) = self.live.take() {
            if !live.stop() {
                error!("the index stage stopped on a failure; the next start replays the log");
            }
        }
        info!("store writer drained and stopped");
    }

    fn refresh_disk(&self) {
        if let Ok(free) = self.shared.vfs.free_space(&self.shared.data_dir) {
            self.shared.free_disk.store(free, Ordering::Relaxed);
            self.shared.low_disk.store(
                free < self.shared.min_free_disk.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
    }

    fn ensure_live(&mut self) -> Result<(), String> {
        if self.live.is_some() {
            return Ok(());
        }
        if self
            .last_reopen
            .is_some_and(|t| t.elapsed() < REOPEN_BACKOFF)
        {
            return Err("the store failed and is being reopened".into());
        }
        self.last_reopen = Some(Instant::now());
        // Reopen with the lock this writer kept through the failure; if it was lost (a
        // reopen that failed half-way), take it afresh.
        let opened = match self.held_lock.take() {
            Some(lock) => Engine::open_locked(
                self.shared.vfs.clone(),
                &self.shared.data_dir,
                Some(&self.shared.node),
                lock,
            )
            .map_err(|(e, lock)| {
                self.held_lock = Some(lock);
                e
            }),
            None => Engine::open(
                self.shared.vfs.clone(),
                &self.shared.data_dir,
                Some(&self.shared.node),
            ),
        };
        match opened.and_then(|engine| Live::start(engine, &self.shared)) {
            Ok(live) => {
                info!("store reopened and recovered after a failure");
                self.shared.stats.reopens.fetch_add(1, Ordering::Relaxed);
                self.live = Some(live);
                self.shared.failed.store(false, Ordering::Relaxed);
                self.shared.failed_full.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "reopening the store failed");
                Err(format!("the store failed and cannot be reopened: {e}"))
            }
        }
    }

    /// Rewrites `index.redb` in key order while the daemon keeps the store's lock: the
    /// index stage commits what was synced and stops, in-process readers lose the index
    /// (and are waited for, up to [`REWRITE_HOLDER_WAIT`]), the index is copied into
    /// `index.redb.rewrite` and checked, closed, replaced, and reopened. Not a failure:
    /// the store is not marked failed, nor the reopen counted. If the copy fails or a
    /// reader does not let go, the old index stays and the store carries on with it.
    ///
    /// Processes reading the store keep the old file open until they finish.
    fn rewrite_index(&mut self) -> Result<IndexRewrite, String> {
        self.ensure_live()?;
        if !self.shared.vfs.index_is_real_file() {
            return Err("the index is not a plain file here; not rewritten".into());
        }
        let data_dir = self.shared.data_dir.clone();
        let path = data_dir.join(super::engine::INDEX_FILE);
        let size = |p: &std::path::Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p)
                .map(|m| (m.len(), m.blocks() * 512))
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let (before, disk_before) = size(&path)?;
        let started = Instant::now();
        let live = self.live.as_mut().expect("live after ensure_live");
        if !live.stop() || self.shared.index_failed.load(Ordering::Acquire) {
            self.poison("the index stage stopped");
            return Err("the index stage had failed; the store reopens".into());
        }
        self.shared.set_db(None);
        let deadline = Instant::now() + REWRITE_HOLDER_WAIT;
        while Arc::strong_count(&live.db) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let outcome = if Arc::strong_count(&live.db) > 1 {
            Err(format!(
                "in-process readers held the index for more than {}s; it was not rewritten",
                REWRITE_HOLDER_WAIT.as_secs()
            ))
        } else {
            super::compactor::write_rewrite(&data_dir, &live.db)
                .map_err(|e| format!("rewriting the index failed ({e}); the old index is kept"))
        };
        if let Err(why) = outcome {
            warn!(error = %why, "index not rewritten");
            if let Err(e) = live.resume(&self.shared) {
                self.poison(&format!("restarting the index stage: {e}"));
            }
            return Err(why);
        }
        // Close the old index (the last `Arc` goes with `Live`), keeping the lock.
        let mut live = self.live.take().expect("live");
        let lock = live.lock.take().expect("a live store holds its lock");
        drop(live);
        let installed = super::compactor::install_rewrite(&data_dir);
        if installed.is_err() {
            let _ = std::fs::remove_file(data_dir.join(super::compactor::REWRITE_INDEX_FILE));
        }
        let reopened = Engine::open_locked(
            self.shared.vfs.clone(),
            &data_dir,
            Some(&self.shared.node),
            lock,
        )
        .map_err(|(e, lock)| {
            self.held_lock = Some(lock);
            e
        })
        .and_then(|engine| Live::start(engine, &self.shared));
        match reopened {
            Ok(live) => self.live = Some(live),
            Err(e) => {
                // As after a failure: refuse and retry reopening until it works.
                error!(error = %e, "reopening the store after rewriting its index failed");
                self.shared.failed.store(true, Ordering::Relaxed);
                self.last_reopen = Some(Instant::now());
                return Err(format!("reopening the store after the rewrite failed: {e}"));
            }
        }
        if let Err(e) = installed {
            warn!(error = %e, "index not rewritten");
            return Err(format!(
                "replacing the index failed ({e}); the old index is kept"
            ));
        }
        let (after, disk_after) = size(&path)?;
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(
            before,
            after, disk_before, disk_after, millis, "index rewritten in key order"
        );
        Ok(IndexRewrite {
            before,
            after,
            disk_before,
            disk_after,
            millis,
        })
    }

    fn poison(&mut self, why: &str) {
        error!(error = %why, "the store stops writing and reopens");
        // A failure with the disk (nearly) full is answered as "disk full" (452), not as
        // a broken store (451), while it lasts.
        let full = self
            .shared
            .vfs
            .free_space(&self.shared.data_dir)
            .is_ok_and(|free| free < DISK_FULL_MARGIN);
        self.shared.failed_full.store(full, Ordering::Relaxed);
        self.shared.failed.store(true, Ordering::Relaxed);
        self.shared.set_db(None);
        // Dropping `Live` lets the index stage finish what was synced and closes the
        // index, so the reopen starts from what is on disk. The lock stays with this
        // writer: no other process may open the store for writing in between.
        if let Some(mut live) = self.live.take() {
            self.held_lock = live.lock.take();
        }
    }

    fn commit_batch(&mut self, batch: Vec<Job>, state: Vec<(StateOp, StateReply)>, seal: bool) {
        if let Err(why) = self.ensure_live() {
            for job in batch {
                (job.reply)(Err(IngestError::Unavailable(why.clone())));
            }
            for (_, reply) in state {
                reply(Err(IngestError::Unavailable(why.clone())));
            }
            return;
        }
        let started = Instant::now();
        let outcome = self.append_batch(&batch, seal);
        self.refresh_disk();
        match outcome {
            Ok((receipts, mut index_batch)) => {
                index_batch.state = state;
                let stats = &self.shared.stats;
                stats.batch_messages.observe(batch.len() as u64);
                stats
                    .commit_us
                    .observe(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                for (job, r) in batch.into_iter().zip(receipts) {
                    (job.reply)(Ok(r));
                }
                let live = self.live.as_mut().expect("live after a good batch");
                let sent = live
                    .index_tx
                    .as_ref()
                    .is_some_and(|tx| tx.send(index_batch).is_ok());
                if !sent || self.shared.index_failed.load(Ordering::Acquire) {
                    // The index stage died (its commit failed). What was acknowledged is
                    // in the log; reopening replays it into the index.
                    self.poison("the index stage stopped");
                }
            }
            Err(BatchError::RolledBack(e)) => {
                for job in batch {
                    (job.reply)(Err(e.clone_kind()));
                }
                for (_, reply) in state {
                    reply(Err(e.clone_kind()));
                }
            }
            Err(BatchError::Poisoned(why)) => {
                self.poison(&why);
                let full = self.shared.failed_full.load(Ordering::Relaxed);
                for job in batch {
                    (job.reply)(Err(if full {
                        IngestError::DiskFull
                    } else {
                        IngestError::Unavailable(why.clone())
                    }));
                }
                for (_, reply) in state {
                    reply(Err(IngestError::Unavailable(why.clone())));
                }
            }
        }
    }

    /// Appends and syncs one batch. On success every job's receipt, and what the index
    /// stage must apply.
    fn append_batch(
        &mut self,
        batch: &[Job],
        seal: bool,
    ) -> Result<(Vec<Receipt>, IndexBatch), BatchError> {
        let live = self.live.as_mut().expect("live");
        let poisoned = |e: StoreError| BatchError::Poisoned(e.to_string());
        // Sealed at `segment_size`, or on request (`coffer compact`) if it holds records.
        if (!batch.is_empty() && live.log.active.len >= self.segment_size)
            || (seal && live.log.active.len > SEGMENT_HEADER_LEN)
        {
            live.log.rotate().map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    // A failed earlier attempt left the file: reopen and recover.
                    BatchError::Poisoned(format!("creating a new segment: {e}"))
                } else {
                    BatchError::from_io("creating a new segment", &e)
                }
            })?;
        }
        // Order matters: what the index committed is read before the snapshot is taken,
        // so everything pruned from `pending` is visible in the snapshot.
        let committed = self.shared.committed_gen.load(Ordering::Acquire);
        let snapshot = live.db.begin_read().map_err(|e| poisoned(idx_err(e)))?;
        live.pending.prune(committed);
        let gen = live.gen + 1;
        let segment = live.log.active.number;
        let base = live.log.active.len;
        let mut buf =
            Vec::with_capacity(batch.iter().map(|j| j.prepared.payload.len() + 512).sum());
        let mut receipts = Vec::with_capacity(batch.len());
        let mut out = IndexBatch {
            gen,
            messages: Vec::new(),
            arrivals: Vec::new(),
            repeats: 0,
            state: Vec::new(),
            tail: (segment, base),
            next_seq: live.next_seq,
        };
        let mut next_seq = live.next_seq;
        let mut new_keys: Vec<([u8; 32], ArrivalId)> = Vec::new();
        let mut new_messages: Vec<[u8; 32]> = Vec::new();
        let mut new_ids: Vec<String> = Vec::new();
        for job in batch {
            let p = &job.prepared;
            // A replicated arrival keeps its origin's id and dedupes by it alone; a first
            // arrival dedupes by its arrival key.
            let origin = replicated_origin(p);
            let key = ArrivalKey::new(&p.id, &p.envelope, &p.session.listener).0;
            let existing = match &origin {
                Some(id) => {
                    let s = id.to_string();
                    let known = live.pending.ids.contains_key(&s)
                        || new_ids.contains(&s)
                        || has_arrival_id(&snapshot, &self.shared.catalogs, id)
                            .map_err(poisoned)?;
                    known.then(|| id.clone())
                }
                None => match live.pending.keys.get(&key) {
                    Some((id, _)) => Some(id.clone()),
                    None => match new_keys.iter().find(|(k, _)| *k == key) {
                        Some((_, id)) => Some(id.clone()),
                        None => {
                            lookup_key(&snapshot, &self.shared.catalogs, key).map_err(poisoned)?
                        }
                    },
                },
            };
            if let Some(arrival_id) = existing {
                // Logged too, so the count survives a rebuilt index and readers that
                // wait for the log see it.
                let json = serde_json::to_vec(&serde_json::json!({
                    "arrival": arrival_id.to_string(),
                    "time": now_rfc3339(),
                    "client_addr": p.session.client_addr,
                }))
                .expect("repeat serializes");
                let len = u32::try_from(json.len()).expect("repeat under 4 GiB");
                let h = RecordHeader {
                    kind: KIND_REPEAT,
                    flags: 0,
                    codec: 0,
                    dict_id: 0,
                    key_id: 0,
                    stored_len: len,
                    raw_len: len,
                    message: p.id,
                };
                encode_record(&mut buf, &h, &json);
                out.repeats += 1;
                receipts.push(Receipt {
                    message_id: p.id,
                    arrival_id,
                    repeat: true,
                });
                continue;
            }
            let known = live.pending.messages.contains_key(&p.id.0)
                || new_messages.contains(&p.id.0)
                || has_message(&snapshot, &p.id).map_err(poisoned)?;
            if !known {
                let h = RecordHeader {
                    kind: KIND_MESSAGE,
                    flags: u8::from(p.summary.unparsed),
                    codec: p.codec,
                    dict_id: p.dict_id,
                    key_id: 0,
                    stored_len: u32::try_from(p.payload.len()).expect("payload under 4 GiB"),
                    raw_len: p.raw_len,
                    message: p.id,
                };
                let loc = Loc {
                    segment,
                    offset: base + buf.len() as u64,
                    record_len: u32::try_from(h.total_len()).expect("record under 4 GiB"),
                    raw_len: p.raw_len,
                    position: None,
                };
                encode_record(&mut buf, &h, &p.payload);
                out.messages.push((p.id, loc, p.summary.clone()));
                new_messages.push(p.id.0);
            }
            let (arrival, arrival_key) = match origin {
                Some(id) => {
                    // Our own id coming back (a store restored from a copy): never mint it
                    // again, and index it as recovery would.
                    let ours = id.node == live.node && id.epoch == live.epoch8;
                    if ours && id.seq >= next_seq {
                        next_seq = id.seq + 1;
                    }
                    let a = replicated_arrival(p, id, &live.node);
                    let k = if ours { arrival_key(&a) } else { None };
                    (a, k)
                }
                None => {
                    let id = ArrivalId {
                        node: live.node.clone(),
                        epoch: live.epoch8.clone(),
                        seq: next_seq,
                    };
                    next_seq += 1;
                    (first_arrival(p, id, &live.node), Some(key))
                }
            };
            let arrival_id = arrival.id.clone();
            let json = serde_json::to_vec(&arrival).expect("arrival serializes");
            let len = u32::try_from(json.len()).expect("arrival under 4 GiB");
            let h = RecordHeader {
                kind: KIND_ARRIVAL,
                flags: 0,
                codec: 0,
                dict_id: 0,
                key_id: 0,
                stored_len: len,
                raw_len: len,
                message: p.id,
            };
            encode_record(&mut buf, &h, &json);
            new_ids.push(arrival_id.to_string());
            if let Some(k) = arrival_key {
                new_keys.push((k, arrival_id.clone()));
            }
            out.arrivals.push((arrival, arrival_key));
            receipts.push(Receipt {
                message_id: p.id,
                arrival_id,
                repeat: false,
            });
        }
        drop(snapshot);
        if !buf.is_empty() {
            if let Err(e) = live.log.append(&buf) {
                self.shared
                    .stats
                    .errors_append
                    .fetch_add(1, Ordering::Relaxed);
                if let Err(t) = live.log.truncate(base) {
                    return Err(BatchError::Poisoned(format!(
                        "append failed ({e}) and the rollback failed too ({t})"
                    )));
                }
                return Err(BatchError::from_io("appending to the log", &e));
            }
            // The durable point: after this sync every record of the batch survives.
            if let Err(e) = live.log.sync() {
                self.shared
                    .stats
                    .errors_sync
                    .fetch_add(1, Ordering::Relaxed);
                return Err(BatchError::Poisoned(format!("syncing the log: {e}")));
            }
        }
        live.gen = gen;
        live.next_seq = next_seq;
        for (key, id) in new_keys {
            live.pending.keys.insert(key, (id, gen));
        }
        for m in new_messages {
            live.pending.messages.insert(m, gen);
        }
        for id in new_ids {
            live.pending.ids.insert(id, gen);
        }
        out.tail = (segment, live.log.active.len);
        out.next_seq = next_seq;
        Ok((receipts, out))
    }
}

/// The index stage: applies synced log batches to redb and commits.
fn run_indexer(db: &redb::Database, rx: &Receiver<IndexBatch>, shared: &Shared) {
    super::io::lower_thread_priority(INDEXER_NICE, "index stage");
    let mut last_commit: Option<Instant> = None;
    let mut last_tail_seg: Option<u32> = None;
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        // Under load, gather for at least INDEX_COMMIT_SPACING since the last commit:
        // more messages share each dirty index page, so a commit writes fewer pages per
        // message. Nobody waits on it: answers went out after the log sync.
        let gather_until = last_commit.map(|t| t + INDEX_COMMIT_SPACING);
        while batches.len() < MAX_INDEX_BATCHES {
            let next = match gather_until {
                Some(until) if until > Instant::now() => rx.recv_deadline(until).ok(),
                _ => rx.try_recv().ok(),
            };
            match next {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        check_relocations(&mut batches, shared);
        last_commit = Some(Instant::now());
        let started = Instant::now();
        match commit_index(db, &shared.catalogs, &batches) {
            Ok(totals) => {
                let tail_seg = batches.last().expect("one batch at least").tail.0;
                if last_tail_seg.is_some_and(|t| t < tail_seg) {
                    // The index moved past a sealed segment: it can be compacted now.
                    shared.segment_sealed();
                }
                last_tail_seg = Some(tail_seg);
                let last = batches.last().expect("one batch at least").gen;
                shared.committed_gen.store(last, Ordering::Release);
                publish_totals(shared, &totals);
                for b in &mut batches {
                    for (_, reply) in b.state.drain(..) {
                        reply(Ok(()));
                    }
                }
                shared.committed.send_modify(|n| *n += 1);
                shared
                    .stats
                    .index_commit_us
                    .observe(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            Err(e) => {
                shared.stats.errors_commit.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "committing the index failed; the index stage stops");
                // Nothing will commit what waits here or reaches here before the writer
                // notices and drops its sender: answer it now, or its callers wait
                // forever (a channel keeps what it holds while a sender lives).
                shared.index_failed.store(true, Ordering::Release);
                let why = format!("the index stage stopped: {e}");
                for b in batches.into_iter().chain(rx.iter()) {
                    for (_, reply) in b.state {
                        reply(Err(IngestError::Unavailable(why.clone())));
                    }
                }
                return;
            }
        }
    }
}

/// A compaction's switch only commits while its `.blk` is there: a reopen after a failure
/// removes a `.blk` the index does not point at yet (engine.rs), and no reopen runs
/// while this stage does, so what this sees holds until the commit.
fn check_relocations(batches: &mut [IndexBatch], shared: &Shared) {
    for b in batches {
        let mut kept = Vec::with_capacity(b.state.len());
        for (op, reply) in b.state.drain(..) {
            if let StateOp::Relocate { segment, .. } = &op {
                let blk = super::log::blk_path(&shared.log_dir, *segment);
                if !shared.vfs.exists(&blk) {
                    reply(Err(IngestError::Unavailable(format!(
                        "{} is gone; the compaction of segment {segment} is dropped",
                        blk.display()
                    ))));
                    continue;
                }
            }
            kept.push((op, reply));
        }
        b.state = kept;
    }
}

fn commit_index(
    db: &redb::Database,
    catalogs: &super::catalog::Catalogs,
    batches: &[IndexBatch],
) -> Result<[u64; 5], StoreError> {
    let txn = db.begin_write().map_err(idx_err)?;
    let mut tables = Tables::open(&txn, catalogs).map_err(idx_err)?;
    for b in batches {
        for (id, loc, summary) in &b.messages {
            tables.apply_message(id, *loc, summary).map_err(idx_err)?;
        }
        for (arrival, key) in &b.arrivals {
            tables.apply_arrival(arrival, *key)?;
        }
        tables.counters.repeats += b.repeats;
        for (op, _) in &b.state {
            tables.apply_state(op).map_err(idx_err)?;
        }
    }
    let last = batches.last().expect("one batch at least");
    tables.counters.next_seq = last.next_seq;
    tables.counters.tail_seg = u64::from(last.tail.0);
    tables.counters.tail_off = last.tail.1;
    let c = tables.finish().map_err(idx_err)?;
    txn.commit().map_err(idx_err)?;
    Ok([
        c.messages,
        c.arrivals,
        c.repeats,
        c.raw_bytes,
        c.stored_bytes,
    ])
}

const TOTAL_KEYS: [&str; 5] = [
    index::K_MESSAGES,
    index::K_ARRIVALS,
    index::K_REPEATS,
    index::K_RAW_BYTES,
    index::K_STORED_BYTES,
];

/// The index's totals as this transaction sees them.
fn read_totals(txn: &redb::WriteTransaction) -> [u64; 5] {
    TOTAL_KEYS.map(|k| get_u64(txn, k).unwrap_or(0))
}

/// Mirrors committed totals into the stats `/metrics` reads.
fn publish_totals(shared: &Shared, totals: &[u64; 5]) {
    let s = &shared.stats;
    let slots = [
        &s.messages,
        &s.arrivals,
        &s.repeats,
        &s.raw_bytes,
        &s.stored_bytes,
    ];
    for (slot, v) in slots.into_iter().zip(totals) {
        slot.store(*v, Ordering::Relaxed);
    }
}

/// The origin arrival id of a replicated message: `XCOFFER` `origin_arrival`, which only
/// trusted listeners accept.
fn replicated_origin(p: &Prepared) -> Option<ArrivalId> {
    let x = p.session.xcoffer.as_ref()?;
    x.origin_arrival.as_deref()?.parse().ok()
}

/// A message's first arrival anywhere: a new id, this session's facts.
fn first_arrival(p: &Prepared, id: ArrivalId, node: &str) -> Arrival {
    Arrival {
        id,
        message: p.id.to_hex(),
        time: now_rfc3339(),
        listener: p.session.listener.clone(),
        protocol: p.session.protocol.clone(),
        client_addr: p.session.client_addr.clone(),
        helo: p.session.helo.clone(),
        mail_from: p.envelope.mail_from.clone(),
        mail_params: p.envelope.mail_params.clone(),
        rcpt_to: p.envelope.rcpt_to.clone(),
        queue_id: p.session.queue_id.clone(),
        xcoffer: p.session.xcoffer.clone(),
        trace: vec![node.to_owned()],
        via: None,
        tls: p.session.tls.clone(),
        received: None,
    }
}

/// A replicated arrival: the origin's id, time, listener, protocol, MAIL parameters and
/// queue id from XCOFFER (kept whole with it), the envelope as sent, the trace extended by
/// this node, and the local listener it came in on as `via`.
fn replicated_arrival(p: &Prepared, id: ArrivalId, node: &str) -> Arrival {
    let x = p.session.xcoffer.clone().unwrap_or_default();
    let s = &p.session;
    let mut trace = x.trace.clone();
    if !trace.contains(&id.node) {
        trace.insert(0, id.node.clone());
    }
    if !trace.iter().any(|n| n == node) {
        trace.push(node.to_owned());
    }
    Arrival {
        id,
        message: p.id.to_hex(),
        time: x.origin_time.clone().unwrap_or_else(now_rfc3339),
        listener: x
            .origin_listener
            .clone()
            .unwrap_or_else(|| s.listener.clone()),
        protocol: x.protocol.clone().unwrap_or_else(|| s.protocol.clone()),
        // What this session saw, as for every arrival (interfaces.md "XCOFFER"); the
        // origin's client is inside `xcoffer`.
        client_addr: s.client_addr.clone(),
        helo: s.helo.clone(),
        mail_from: p.envelope.mail_from.clone(),
        // The origin's parameters; the hop's own (BODY=BINARYMIME) are transport.
        mail_params: x.mail_params.clone(),
        rcpt_to: p.envelope.rcpt_to.clone(),
        queue_id: x.queue_id.clone(),
        xcoffer: Some(x),
        trace,
        via: Some(s.listener.clone()),
        tls: s.tls.clone(),
        received: Some(now_rfc3339()),
    }
}

fn has_arrival_id(
    snapshot: &ReadTransaction,
    catalogs: &super::catalog::Catalogs,
    id: &ArrivalId,
) -> Result<bool, StoreError> {
    Ok(super::catalog::local_of_id(snapshot, catalogs, id)?.is_some())
}

fn has_message(snapshot: &ReadTransaction, id: &MessageId) -> Result<bool, StoreError> {
    let t = snapshot.open_table(index::MESSAGES).map_err(idx_err)?;
    Ok(t.get(id.0).map_err(idx_err)?.is_some())
}

fn lookup_key(
    snapshot: &ReadTransaction,
    catalogs: &super::catalog::Catalogs,
    key: [u8; 32],
) -> Result<Option<ArrivalId>, StoreError> {
    Ok(super::catalog::arrival_of_key(snapshot, catalogs, &key)?.map(|a| a.id))
}

enum BatchError {
    /// Nothing of the batch reached the disk; the store is fine.
    RolledBack(IngestErrorKind),
    /// The store's durable state is unknown: stop, reopen, recover.
    Poisoned(String),
}

#[derive(Clone)]
enum IngestErrorKind {
    DiskFull,
    Unavailable(String),
}

impl IngestErrorKind {
    fn clone_kind(&self) -> IngestError {
        match self {
            Self::DiskFull => IngestError::DiskFull,
            Self::Unavailable(s) => IngestError::Unavailable(s.clone()),
        }
    }
}

impl BatchError {
    fn from_io(what: &str, e: &std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            warn!("{what}: disk full; the batch was rolled back");
            Self::RolledBack(IngestErrorKind::DiskFull)
        } else {
            warn!("{what}: {e}; the batch was rolled back");
            Self::RolledBack(IngestErrorKind::Unavailable(format!("{what}: {e}")))
        }
    }
}
