//! Opening a store for writing: create, or recover after a crash.
//!
//! Recovery replays the log past the position the index last committed (`tail_seg`,
//! `tail_off` in META) through the same `apply_*` functions ingest uses, truncates a torn
//! tail of the newest segment, and commits. An index that redb cannot open is set aside
//! and rebuilt from the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableTable, WriteTransaction};
use tracing::{info, warn};

use super::index::{self, Loc, Tables, META};
use super::io::{StoreLock, Vfs};
use super::log::{self, list_segments, segment_path, ActiveSegment, Log, LOG_DIR};
use super::record::{
    decode_payload, FORMAT_VERSION, KIND_ARRIVAL, KIND_MESSAGE, KIND_REPEAT, SEGMENT_HEADER_LEN,
};
use super::summary::Summary;
use super::{Arrival, StoreError};
use crate::envelope::Envelope;
use crate::ids::{ArrivalKey, MessageId};

pub const INDEX_FILE: &str = "index.redb";
/// redb's page cache for the writer (redb's own default is 1 GiB): part of the daemon's
/// memory bound (docs/store-format.md), whatever the size of the store.
pub const INDEX_CACHE_BYTES: usize = 128 << 20;
/// The page cache of a read-only open beside the daemon (a `coffer` command).
pub const READER_CACHE_BYTES: usize = 32 << 20;
pub const LOCK_FILE: &str = "daemon.lock";

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn idx_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Index(e.into().to_string())
}

/// The arrival key of an arrival that first landed on this store.
pub(crate) fn arrival_key(a: &Arrival) -> Option<[u8; 32]> {
    let message: MessageId = a.message.parse().ok()?;
    let env = Envelope {
        mail_from: a.mail_from.clone(),
        mail_params: a.mail_params.clone(),
        rcpt_to: a.rcpt_to.clone(),
    };
    Some(ArrivalKey::new(&message, &env, &a.listener).0)
}

/// A store open for writing: the log's active segment and the index.
pub struct Engine {
    pub vfs: Arc<dyn Vfs>,
    pub data_dir: PathBuf,
    pub log_dir: PathBuf,
    pub node: String,
    pub epoch: [u8; 16],
    /// First 8 hex digits of the epoch, as in arrival ids.
    pub epoch8: String,
    pub db: Arc<redb::Database>,
    pub log: Log,
    /// Held for as long as the engine lives: no second writer, and the CLI knows.
    pub(crate) lock: Box<dyn StoreLock>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({})", self.data_dir.display())
    }
}

fn open_index(vfs: &dyn Vfs, path: &Path) -> Result<redb::Database, StoreError> {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(INDEX_CACHE_BYTES);
    match vfs.index_backend(path).map_err(io_err(path))? {
        Some(backend) => builder
            .create_with_backend(super::io::DynBackend(backend))
            .map_err(idx_err),
        None => {
            builder.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
            builder.create(path).map_err(idx_err)
        }
    }
}

impl Engine {
    /// Opens (creating if needed) the store in `data_dir` for writing, recovering it.
    /// `node` names this node in new arrival ids; `None` keeps the name the store has.
    ///
    /// # Errors
    /// Another process holds the store ([`StoreError::DaemonRunning`]), I/O errors, or a
    /// log that is damaged somewhere other than its tail.
    pub fn open(
        vfs: Arc<dyn Vfs>,
        data_dir: &Path,
        node: Option<&str>,
    ) -> Result<Engine, StoreError> {
        vfs.create_dir_all(data_dir).map_err(io_err(data_dir))?;
        let lock_path = data_dir.join(LOCK_FILE);
        let lock = vfs
            .try_lock(&lock_path)
            .map_err(io_err(&lock_path))?
            .ok_or_else(|| StoreError::DaemonRunning(lock_path.clone()))?;
        Self::open_locked(vfs, data_dir, node, lock).map_err(|(e, _lock)| e)
    }

    /// [`Engine::open`] with the store's lock already held (a writer reopening after a
    /// failure keeps it throughout, so no other process slips in). On failure the lock
    /// is handed back.
    ///
    /// # Errors
    /// As [`Engine::open`], with the lock.
    pub fn open_locked(
        vfs: Arc<dyn Vfs>,
        data_dir: &Path,
        node: Option<&str>,
        lock: Box<dyn StoreLock>,
    ) -> Result<Engine, (StoreError, Box<dyn StoreLock>)> {
        match Self::open_inner(vfs, data_dir, node) {
            Ok(parts) => Ok(parts.with_lock(lock)),
            Err(e) => Err((e, lock)),
        }
    }

    fn open_inner(
        vfs: Arc<dyn Vfs>,
        data_dir: &Path,
        node: Option<&str>,
    ) -> Result<Unlocked, StoreError> {
        let data_dir = data_dir.to_owned();
        vfs.create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
        let log_dir = data_dir.join(LOG_DIR);
        let mut segments = list_segments(&*vfs, &log_dir).map_err(io_err(&log_dir))?;

        let index_path = data_dir.join(INDEX_FILE);
        let db = match open_index(&*vfs, &index_path) {
            Ok(db) => db,
            Err(StoreError::Index(e)) if !segments.is_empty() => {
                warn!(error = %e, "the index cannot be opened; rebuilding it from the log");
                vfs.remove_file(&index_path).map_err(io_err(&index_path))?;
                open_index(&*vfs, &index_path)?
            }
            Err(e) => return Err(e),
        };

        let txn = db.begin_write().map_err(idx_err)?;
        let stored_epoch: Option<[u8; 16]> = {
            let meta = txn.open_table(META).map_err(idx_err)?;
            let format = meta
                .get(index::K_FORMAT)
                .map_err(idx_err)?
                .map(|v| v.value().to_vec());
            if let Some(f) = format {
                let v = u32::from_le_bytes(f.as_slice().try_into().unwrap_or([0; 4]));
                if v != FORMAT_VERSION {
                    return Err(StoreError::Unsupported(format!(
                        "index format {v}; this build reads format {FORMAT_VERSION}"
                    )));
                }
            }
            let e = meta.get(index::K_EPOCH).map_err(idx_err)?;
            e.and_then(|v| v.value().try_into().ok())
        };
        let first_header_epoch = match segments.first() {
            Some(&n) => {
                let p = segment_path(&log_dir, n);
                let f = vfs.open_read(&p).map_err(io_err(&p))?;
                Some(log::read_header(&*f).map_err(io_err(&p))?.epoch)
            }
            None => None,
        };
        let epoch = match (stored_epoch, first_header_epoch) {
            (Some(a), Some(b)) if a != b => {
                return Err(StoreError::Corrupt(
                    "the index and the log belong to different stores (epochs differ)".into(),
                ))
            }
            (Some(e), _) | (None, Some(e)) => e,
            (None, None) => *uuid::Uuid::new_v4().as_bytes(),
        };
        {
            let mut meta = txn.open_table(META).map_err(idx_err)?;
            meta.insert(index::K_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(idx_err)?;
            meta.insert(index::K_EPOCH, epoch.as_slice())
                .map_err(idx_err)?;
        }
        let node = match node {
            Some(n) => n.to_owned(),
            None => {
                let meta = txn.open_table(META).map_err(idx_err)?;
                let stored = meta.get(index::K_NODE).map_err(idx_err)?;
                stored.map_or_else(
                    || "coffer".to_owned(),
                    |v| String::from_utf8_lossy(v.value()).into_owned(),
                )
            }
        };
        txn.open_table(META)
            .map_err(idx_err)?
            .insert(index::K_NODE, node.as_bytes())
            .map_err(idx_err)?;
        let node = node.as_str();
        let epoch8 = hex::encode(&epoch[..4]);

        if segments.is_empty() {
            vfs.create_dir_all(&log_dir).map_err(io_err(&log_dir))?;
            vfs.sync_dir(&data_dir).map_err(io_err(&data_dir))?;
            Log::create_segment(&*vfs, &log_dir, 1, epoch).map_err(io_err(&log_dir))?;
            segments.push(1);
            info!(data_dir = %data_dir.display(), epoch = %uuid::Uuid::from_bytes(epoch), "created a new store");
        }

        let active = replay(&*vfs, &txn, &log_dir, &segments, node, &epoch8, epoch)?;
        txn.commit().map_err(idx_err)?;
        let log = Log::new(vfs.clone(), log_dir.clone(), epoch, active);
        Ok(Unlocked {
            vfs,
            data_dir,
            log_dir,
            node: node.to_owned(),
            epoch,
            epoch8,
            db: Arc::new(db),
            log,
        })
    }
}

/// An opened store waiting for its lock to be attached.
struct Unlocked {
    vfs: Arc<dyn Vfs>,
    data_dir: PathBuf,
    log_dir: PathBuf,
    node: String,
    epoch: [u8; 16],
    epoch8: String,
    db: Arc<redb::Database>,
    log: Log,
}

impl Unlocked {
    fn with_lock(self, lock: Box<dyn StoreLock>) -> Engine {
        let Unlocked {
            vfs,
            data_dir,
            log_dir,
            node,
            epoch,
            epoch8,
            db,
            log,
        } = self;
        Engine {
            vfs,
            data_dir,
            log_dir,
            node,
            epoch,
            epoch8,
            db,
            log,
            lock,
        }
    }
}

/// Indexes every record past the committed tail; truncates a torn tail of the newest
/// segment. Returns the newest segment, ready for appends.
fn replay(
    vfs: &dyn Vfs,
    txn: &WriteTransaction,
    log_dir: &Path,
    segments: &[u32],
    node: &str,
    epoch8: &str,
    epoch: [u8; 16],
) -> Result<ActiveSegment, StoreError> {
    let mut tables = Tables::open(txn).map_err(idx_err)?;
    let tail_seg = u32::try_from(tables.counters.tail_seg).unwrap_or(0);
    let tail_off = tables.counters.tail_off;
    let last = *segments.last().expect("at least one segment");
    let mut replayed = 0u64;
    for &n in segments.iter().filter(|&&n| n >= tail_seg) {
        let path = segment_path(log_dir, n);
        let file = vfs.open(&path).map_err(io_err(&path))?;
        let header = log::read_header(&*file).map_err(io_err(&path))?;
        if header.number != n || header.epoch != epoch {
            return Err(StoreError::Corrupt(format!(
                "{}: header names segment {} of another store",
                path.display(),
                header.number
            )));
        }
        let start = if n == tail_seg && tail_off >= SEGMENT_HEADER_LEN {
            tail_off
        } else {
            SEGMENT_HEADER_LEN
        };
        let scan = log::scan(&*file, start, |rec| -> Result<(), StoreError> {
            replayed += 1;
            apply_record(&mut tables, n, rec, node, epoch8)
        })?;
        if scan.valid_end < scan.file_len {
            if n != last {
                return Err(StoreError::Corrupt(format!(
                    "{}: damaged at offset {} ({}), and it is not the newest segment",
                    path.display(),
                    scan.valid_end,
                    scan.stopped.unwrap_or_default()
                )));
            }
            warn!(
                segment = %path.display(),
                at = scan.valid_end,
                dropped = scan.file_len - scan.valid_end,
                "truncating a torn tail left by a crash"
            );
            file.set_len(scan.valid_end).map_err(io_err(&path))?;
            file.sync_data().map_err(io_err(&path))?;
        }
        if n == last {
            tables.counters.tail_seg = u64::from(n);
            tables.counters.tail_off = scan.valid_end;
            tables.counters.next_seq = tables.counters.next_seq.max(1);
            tables.finish().map_err(idx_err)?;
            if replayed > 0 {
                info!(records = replayed, "replayed log records into the index");
            }
            return Ok(ActiveSegment {
                number: n,
                file,
                len: scan.valid_end,
            });
        }
    }
    // tail_seg is beyond the newest segment: the index is ahead of the log.
    Err(StoreError::Corrupt(format!(
        "the index has segment {tail_seg} but the log ends at segment {last}"
    )))
}

fn apply_record(
    tables: &mut Tables<'_>,
    segment: u32,
    rec: log::RawRecord,
    node: &str,
    epoch8: &str,
) -> Result<(), StoreError> {
    let h = rec.header;
    match h.kind {
        KIND_MESSAGE => {
            let raw = decode_payload(&h, &rec.payload).map_err(StoreError::Corrupt)?;
            let summary = Summary::of(&raw);
            let loc = Loc {
                segment,
                offset: rec.offset,
                record_len: u32::try_from(h.total_len()).unwrap_or(u32::MAX),
                raw_len: h.raw_len,
            };
            tables
                .apply_message(&h.message, loc, &summary)
                .map_err(idx_err)?;
        }
        KIND_ARRIVAL => {
            let arrival: Arrival = serde_json::from_slice(&rec.payload)
                .map_err(|e| StoreError::Corrupt(format!("arrival record: {e}")))?;
            let ours = arrival.id.node == node && arrival.id.epoch == epoch8;
            let key = if ours { arrival_key(&arrival) } else { None };
            if ours && arrival.id.seq >= tables.counters.next_seq {
                tables.counters.next_seq = arrival.id.seq + 1;
            }
            tables.apply_arrival(&arrival, key).map_err(idx_err)?;
        }
        KIND_REPEAT => tables.counters.repeats += 1,
        _ => unreachable!("record kinds are checked when decoded"),
    }
    Ok(())
}
