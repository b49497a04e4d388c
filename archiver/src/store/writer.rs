//! The writer thread: the only code that appends to the log or writes the index.
//!
//! It takes [`Job`]s from a bounded channel and group-commits whatever is waiting:
//! records appended to the active segment, one fdatasync (plus a directory fsync for a new
//! segment), one redb transaction, then every job of the batch is answered. One sync for
//! many messages is where the throughput comes from.
//!
//! Failure handling (design.md §2.6): a failed append (ENOSPC, EIO) rolls the batch back
//! and the writer carries on; a failed sync or commit *poisons* the engine — no retry in
//! place, since the kernel may have dropped the dirty pages — and the next batch reopens
//! the store from disk, recovering from the last durable point.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redb::ReadableTable;
use tracing::{error, info, warn};

use super::engine::{idx_err, Engine};
use super::index::{self, apply_arrival, apply_message, get_u64, put_u64, Loc};
use super::record::{encode_record, RecordHeader, KIND_ARRIVAL, KIND_MESSAGE};
use super::summary::Summary;
use super::{Arrival, IngestError, Receipt, Shared, StoreError};
use crate::envelope::{Envelope, SessionInfo};
use crate::ids::{ArrivalId, ArrivalKey, MessageId};

/// Most jobs committed in one batch.
const MAX_BATCH_JOBS: usize = 512;
/// Most payload bytes committed in one batch.
const MAX_BATCH_BYTES: usize = 64 << 20;
/// How often an idle writer re-measures free disk (and retries a failed store).
const IDLE_TICK: Duration = Duration::from_millis(250);
/// How long a poisoned writer waits between attempts to reopen the store.
const REOPEN_BACKOFF: Duration = Duration::from_millis(500);

/// A message made ready for the log off the writer thread: hashed, compressed, parsed.
pub struct Prepared {
    pub id: MessageId,
    pub raw_len: u32,
    pub codec: u8,
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

pub fn now_rfc3339() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

pub struct Writer {
    engine: Option<Engine>,
    shared: Arc<Shared>,
    segment_size: u64,
    last_reopen: Option<Instant>,
}

impl Writer {
    pub fn new(engine: Engine, shared: Arc<Shared>, segment_size: u64) -> Self {
        let w = Self {
            engine: Some(engine),
            shared,
            segment_size,
            last_reopen: None,
        };
        w.refresh_disk();
        if let Some(e) = &w.engine {
            if let Ok(txn) = e.db.begin_write() {
                publish_totals(&w.shared, &read_totals(&txn));
            }
        }
        w
    }

    /// Runs until every sender is gone, then returns (everything received was answered).
    ///
    /// While idle it re-measures free disk and, after a failure, retries reopening the
    /// store, so refusals end by themselves once the cause is gone.
    pub fn run(mut self, rx: &Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(IDLE_TICK) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    if self.engine.is_none() {
                        let _ = self.ensure_engine();
                    }
                    self.refresh_disk();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            let mut bytes = batch[0].prepared.payload.len();
            while batch.len() < MAX_BATCH_JOBS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        bytes += job.prepared.payload.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
        info!("store writer drained and stopped");
    }

    fn refresh_disk(&self) {
        if let Some(e) = &self.engine {
            if let Ok(free) = e.vfs.free_space(&e.data_dir) {
                self.shared.free_disk.store(free, Ordering::Relaxed);
                self.shared
                    .low_disk
                    .store(free < self.shared.min_free_disk, Ordering::Relaxed);
            }
        }
    }

    fn ensure_engine(&mut self) -> Result<(), String> {
        if self.engine.is_some() {
            return Ok(());
        }
        if self
            .last_reopen
            .is_some_and(|t| t.elapsed() < REOPEN_BACKOFF)
        {
            return Err("the store failed and is being reopened".into());
        }
        self.last_reopen = Some(Instant::now());
        match Engine::open(
            self.shared.vfs.clone(),
            &self.shared.data_dir,
            Some(&self.shared.node),
        ) {
            Ok(engine) => {
                info!("store reopened and recovered after a failure");
                self.shared.stats.reopens.fetch_add(1, Ordering::Relaxed);
                self.engine = Some(engine);
                self.shared.failed.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "reopening the store failed");
                Err(format!("the store failed and cannot be reopened: {e}"))
            }
        }
    }

    fn commit_batch(&mut self, batch: Vec<Job>) {
        if let Err(why) = self.ensure_engine() {
            for job in batch {
                (job.reply)(Err(IngestError::Unavailable(why.clone())));
            }
            return;
        }
        let started = Instant::now();
        let outcome = self.try_commit(&batch);
        let stats = &self.shared.stats;
        if outcome.is_ok() {
            stats.batch_messages.observe(batch.len() as u64);
            stats
                .commit_us
                .observe(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        self.refresh_disk();
        match outcome {
            Ok(receipts) => {
                for (job, r) in batch.into_iter().zip(receipts) {
                    (job.reply)(Ok(r));
                }
            }
            Err(BatchError::RolledBack(e)) => {
                for job in batch {
                    (job.reply)(Err(e.clone_kind()));
                }
            }
            Err(BatchError::Poisoned(why)) => {
                error!(error = %why, "a sync or commit failed; the store stops writing and reopens");
                self.engine = None;
                self.shared.failed.store(true, Ordering::Relaxed);
                for job in batch {
                    (job.reply)(Err(IngestError::Unavailable(why.clone())));
                }
            }
        }
    }

    fn try_commit(&mut self, batch: &[Job]) -> Result<Vec<Receipt>, BatchError> {
        let engine = self.engine.as_mut().expect("engine present");
        if engine.log.active.len >= self.segment_size {
            engine
                .log
                .rotate()
                .map_err(|e| BatchError::from_io("creating a new segment", &e))?;
        }
        let txn = engine
            .db
            .begin_write()
            .map_err(|e| BatchError::Poisoned(idx_err(e).to_string()))?;
        let fail = |e: StoreError| BatchError::Poisoned(e.to_string());
        let mut receipts = Vec::with_capacity(batch.len());
        let mut buf =
            Vec::with_capacity(batch.iter().map(|j| j.prepared.payload.len() + 512).sum());
        let base = engine.log.active.len;
        let segment = engine.log.active.number;
        let mut seen_keys: HashMap<[u8; 32], ArrivalId> = HashMap::new();
        let mut next_seq = get_u64(&txn, index::K_NEXT_SEQ)
            .map_err(|e| fail(idx_err(e)))?
            .max(1);
        let mut repeats = 0u64;
        for job in batch {
            let p = &job.prepared;
            let key = ArrivalKey::new(&p.id, &p.envelope, &p.session.listener).0;
            if let Some(existing) = seen_keys.get(&key).cloned() {
                repeats += 1;
                receipts.push(Receipt {
                    message_id: p.id,
                    arrival_id: existing,
                    repeat: true,
                });
                continue;
            }
            if let Some(existing) = lookup_key(&txn, key).map_err(fail)? {
                repeats += 1;
                receipts.push(Receipt {
                    message_id: p.id,
                    arrival_id: existing,
                    repeat: true,
                });
                continue;
            }
            if !index::has_message(&txn, &p.id).map_err(|e| fail(idx_err(e)))? {
                let h = RecordHeader {
                    kind: KIND_MESSAGE,
                    flags: u8::from(p.summary.unparsed),
                    codec: p.codec,
                    dict_id: 0,
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
                };
                encode_record(&mut buf, &h, &p.payload);
                apply_message(&txn, &p.id, loc, &p.summary).map_err(|e| fail(idx_err(e)))?;
            }
            let arrival_id = ArrivalId {
                node: engine.node.clone(),
                epoch: engine.epoch8.clone(),
                seq: next_seq,
            };
            next_seq += 1;
            let arrival = Arrival {
                id: arrival_id.clone(),
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
            };
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
            apply_arrival(&txn, &arrival, Some(key)).map_err(|e| fail(idx_err(e)))?;
            seen_keys.insert(key, arrival_id.clone());
            receipts.push(Receipt {
                message_id: p.id,
                arrival_id,
                repeat: false,
            });
        }
        put_u64(&txn, index::K_NEXT_SEQ, next_seq).map_err(|e| fail(idx_err(e)))?;
        if repeats > 0 {
            index::add_u64(&txn, index::K_REPEATS, repeats).map_err(|e| fail(idx_err(e)))?;
        }
        if !buf.is_empty() {
            if let Err(e) = engine.log.append(&buf) {
                drop(txn);
                self.shared
                    .stats
                    .errors_append
                    .fetch_add(1, Ordering::Relaxed);
                if let Err(t) = engine.log.truncate(base) {
                    return Err(BatchError::Poisoned(format!(
                        "append failed ({e}) and the rollback failed too ({t})"
                    )));
                }
                return Err(BatchError::from_io("appending to the log", &e));
            }
            // Durable point: after this sync every record of the batch survives a crash.
            if let Err(e) = engine.log.sync() {
                self.shared
                    .stats
                    .errors_sync
                    .fetch_add(1, Ordering::Relaxed);
                return Err(BatchError::Poisoned(format!("syncing the log: {e}")));
            }
        }
        put_u64(&txn, index::K_TAIL_SEG, u64::from(segment)).map_err(|e| fail(idx_err(e)))?;
        put_u64(&txn, index::K_TAIL_OFF, engine.log.active.len).map_err(|e| fail(idx_err(e)))?;
        let totals = read_totals(&txn);
        if let Err(e) = txn.commit() {
            self.shared
                .stats
                .errors_commit
                .fetch_add(1, Ordering::Relaxed);
            return Err(BatchError::Poisoned(format!("committing the index: {e}")));
        }
        publish_totals(&self.shared, &totals);
        Ok(receipts)
    }
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

fn lookup_key(
    txn: &redb::WriteTransaction,
    key: [u8; 32],
) -> Result<Option<ArrivalId>, StoreError> {
    let keys = txn.open_table(index::ARRIVAL_KEYS).map_err(idx_err)?;
    let Some(local) = keys.get(key).map_err(idx_err)?.map(|v| v.value()) else {
        return Ok(None);
    };
    let arrivals = txn.open_table(index::ARRIVALS).map_err(idx_err)?;
    let json = arrivals.get(local).map_err(idx_err)?.ok_or_else(|| {
        StoreError::Corrupt(format!("arrival key points at missing arrival {local}"))
    })?;
    let a: Arrival = serde_json::from_slice(json.value())
        .map_err(|e| StoreError::Corrupt(format!("arrival {local}: {e}")))?;
    Ok(Some(a.id))
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
