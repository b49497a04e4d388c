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

use super::compact;
use super::dict::Dicts;
use super::index::{self, Loc, SegmentInfo, Tables, META, SEGMENTS};
use super::io::{StoreLock, Vfs};
use super::log::{
    self, blk_path, list_log, segment_path, ActiveSegment, Log, SegmentFiles, LOG_DIR,
};
use super::record::{
    decode_payload, INDEX_FORMAT, KIND_ARRIVAL, KIND_MESSAGE, KIND_REPEAT, SEGMENT_HEADER_LEN,
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
    pub dicts: Arc<Dicts>,
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
        let segments = list_log(&*vfs, &log_dir).map_err(io_err(&log_dir))?;
        let dicts = Arc::new(Dicts::new(vfs.clone(), &data_dir));
        dicts
            .remove_leftovers()
            .map_err(io_err(&data_dir.join(super::dict::DICT_DIR)))?;
        // An index rewrite cut short (crash, kill): `index.redb` is still the old one.
        let rewrite = data_dir.join(super::compactor::REWRITE_INDEX_FILE);
        match vfs.remove_file(&rewrite) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err(&rewrite)(e));
            }
            _ => {}
        }

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
        let (stored_epoch, stored_format): (Option<[u8; 16]>, Option<u32>) = {
            let meta = txn.open_table(META).map_err(idx_err)?;
            let format = meta
                .get(index::K_FORMAT)
                .map_err(idx_err)?
                .map(|v| v.value().to_vec());
            let format =
                format.map(|f| u32::from_le_bytes(f.as_slice().try_into().unwrap_or([0; 4])));
            if let Some(v) = format {
                if !(1..=INDEX_FORMAT).contains(&v) {
                    return Err(StoreError::Unsupported(format!(
                        "index format {v}; this build reads formats 1 to {INDEX_FORMAT}"
                    )));
                }
            }
            let e = meta.get(index::K_EPOCH).map_err(idx_err)?;
            (e.and_then(|v| v.value().try_into().ok()), format)
        };
        if stored_format.is_some_and(|v| v < 3) {
            let (arrivals, summaries) = index::upgrade_values(&txn).map_err(idx_err)?;
            info!(
                arrivals,
                summaries, "index values re-encoded for index format {INDEX_FORMAT}"
            );
        }
        if stored_format.is_some_and(|v| v < 5) {
            let moved = index::upgrade_arrival_tables(&txn).map_err(idx_err)?;
            let locations = index::upgrade_locations(&txn).map_err(idx_err)?;
            let rows = index::upgrade_by_segment(&txn).map_err(idx_err)?
                + index::upgrade_term_refs(&txn).map_err(idx_err)?;
            info!(
                moved,
                locations,
                rows,
                "arrival ids, arrival keys, locations, summaries, message arrivals and \
                 search keys re-encoded for index format {INDEX_FORMAT}"
            );
        }
        settle_compactions(&*vfs, &txn, &log_dir, &segments)?;
        let mut segments = list_log(&*vfs, &log_dir).map_err(io_err(&log_dir))?;
        let first_header_epoch = match segments.first() {
            Some(f) if f.seg => {
                let p = segment_path(&log_dir, f.number);
                let file = vfs.open_read(&p).map_err(io_err(&p))?;
                Some(log::read_header(&*file).map_err(io_err(&p))?.epoch)
            }
            Some(f) => {
                let p = blk_path(&log_dir, f.number);
                let file = vfs.open_read(&p).map_err(io_err(&p))?;
                Some(log::read_blk_header(&*file).map_err(io_err(&p))?.epoch)
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
            meta.insert(index::K_FORMAT, INDEX_FORMAT.to_le_bytes().as_slice())
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
            segments.push(SegmentFiles {
                number: 1,
                seg: true,
                blk: false,
            });
            info!(data_dir = %data_dir.display(), epoch = %uuid::Uuid::from_bytes(epoch), "created a new store");
        } else if let Some(last) = segments.last().filter(|f| !f.seg).copied() {
            // Only sealed segments are compacted, so the newest is never a `.blk`; should
            // one be (a log copied without its newest segment), appends go to a new one.
            Log::create_segment(&*vfs, &log_dir, last.number + 1, epoch)
                .map_err(io_err(&log_dir))?;
            segments.push(SegmentFiles {
                number: last.number + 1,
                seg: true,
                blk: false,
            });
        }

        let ctx = ReplayCtx {
            vfs: &vfs,
            log_dir: &log_dir,
            node,
            epoch8: &epoch8,
            epoch,
            dicts: &dicts,
        };
        let active = replay(&ctx, &txn, &segments)?;
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
            dicts,
        })
    }
}

/// Finishes or rolls back a compaction a crash interrupted (docs/store-format.md
/// "Compacted segments"): `.tmp` files go; a segment present in both forms keeps the one
/// the index points at (the `.blk` once `segments` marks it compacted, else the `.seg`).
fn settle_compactions(
    vfs: &dyn Vfs,
    txn: &WriteTransaction,
    log_dir: &Path,
    files: &[SegmentFiles],
) -> Result<(), StoreError> {
    if !vfs.exists(log_dir) {
        return Ok(());
    }
    let mut changed = false;
    for name in vfs.read_dir(log_dir).map_err(io_err(log_dir))? {
        if name.ends_with(".tmp") {
            let p = log_dir.join(&name);
            warn!(file = %p.display(), "removing what an interrupted compaction was writing");
            vfs.remove_file(&p).map_err(io_err(&p))?;
            changed = true;
        }
    }
    let segments = txn.open_table(SEGMENTS).map_err(idx_err)?;
    for f in files.iter().filter(|f| f.seg && f.blk) {
        let compacted = segments
            .get(f.number)
            .map_err(idx_err)?
            .and_then(|v| SegmentInfo::decode(v.value()))
            .is_some_and(|i| i.compacted);
        let loser = if compacted {
            segment_path(log_dir, f.number)
        } else {
            blk_path(log_dir, f.number)
        };
        warn!(file = %loser.display(), "removing the half of an interrupted compaction the index does not use");
        vfs.remove_file(&loser).map_err(io_err(&loser))?;
        changed = true;
    }
    if changed {
        vfs.sync_dir(log_dir).map_err(io_err(log_dir))?;
    }
    Ok(())
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
    dicts: Arc<Dicts>,
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
            dicts,
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
            dicts,
            lock,
        }
    }
}

/// What replay needs to know of the store.
pub(crate) struct ReplayCtx<'a> {
    pub vfs: &'a Arc<dyn Vfs>,
    pub log_dir: &'a Path,
    pub node: &'a str,
    pub epoch8: &'a str,
    pub epoch: [u8; 16],
    pub dicts: &'a Dicts,
}

/// Indexes every record past the committed tail; truncates a torn tail of the newest
/// segment. Returns the newest segment, ready for appends.
fn replay(
    ctx: &ReplayCtx<'_>,
    txn: &WriteTransaction,
    segments: &[SegmentFiles],
) -> Result<ActiveSegment, StoreError> {
    let log_dir = ctx.log_dir;
    let catalogs = super::catalog::Catalogs::new(ctx.vfs.clone(), log_dir.to_owned());
    let mut tables = Tables::open(txn, &catalogs).map_err(idx_err)?;
    let tail_seg = u32::try_from(tables.counters.tail_seg).unwrap_or(0);
    let tail_off = tables.counters.tail_off;
    let last = segments.last().expect("at least one segment").number;
    let mut replayed = 0u64;
    for f in segments.iter().filter(|f| f.number >= tail_seg) {
        let n = f.number;
        if !f.seg {
            replayed += replay_blk(ctx, &mut tables, n)?;
            continue;
        }
        let path = segment_path(log_dir, n);
        let file = ctx.vfs.open(&path).map_err(io_err(&path))?;
        if n == last && file.len().map_err(io_err(&path))? < SEGMENT_HEADER_LEN {
            // Created, and its name made durable by a sync of the folder, but its header
            // never synced: nothing was ever written in it. Write the header again.
            warn!(segment = %path.display(), "rewriting the header of a segment a crash left empty");
            let h = super::record::SegmentHeader {
                number: n,
                epoch: ctx.epoch,
                created_us: chrono::Utc::now().timestamp_micros(),
            };
            file.set_len(0).map_err(io_err(&path))?;
            file.write_all_at(&h.encode(), 0).map_err(io_err(&path))?;
            file.sync_data().map_err(io_err(&path))?;
        }
        let header = log::read_header(&*file).map_err(io_err(&path))?;
        if header.number != n || header.epoch != ctx.epoch {
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
        let dicts = |id| ctx.dicts.get(id);
        let scan = log::scan(&*file, start, |rec| -> Result<(), StoreError> {
            replayed += 1;
            let loc = Loc {
                segment: n,
                offset: rec.offset,
                record_len: u32::try_from(rec.header.total_len()).unwrap_or(u32::MAX),
                raw_len: rec.header.raw_len,
                position: None,
            };
            apply_record(&mut tables, loc, &rec.header, &rec.payload, ctx, &dicts)
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

/// Indexes every record of compacted segment `n`; it must be whole.
fn replay_blk(ctx: &ReplayCtx<'_>, tables: &mut Tables<'_>, n: u32) -> Result<u64, StoreError> {
    let path = blk_path(ctx.log_dir, n);
    let file = ctx.vfs.open_read(&path).map_err(io_err(&path))?;
    let header = log::read_blk_header(&*file).map_err(io_err(&path))?;
    if header.number != n || header.epoch != ctx.epoch {
        return Err(StoreError::Corrupt(format!(
            "{}: header names segment {} of another store",
            path.display(),
            header.number
        )));
    }
    let dicts = |id| ctx.dicts.get(id);
    let mut records = 0u64;
    let mut info = SegmentInfo {
        compacted: true,
        ..SegmentInfo::default()
    };
    // The catalog first: the arrivals it holds are in no block, and they came before any
    // arrival record a block still holds.
    let bad_catalog = |at: u64, e: std::io::Error| {
        StoreError::Corrupt(format!("{}: catalog at {at}: {e}", path.display()))
    };
    let catalog = match compact::find_catalog(&*file).map_err(io_err(&path))? {
        Some(at) => Some((
            at,
            super::catalog::read(&*file, at).map_err(|e| bad_catalog(at, e))?,
        )),
        None => None,
    };
    if let Some((_, c)) = &catalog {
        for (_, v) in &c.arrivals {
            let arrival = super::codec::decode_arrival(v)
                .map_err(|e| StoreError::Corrupt(format!("{}: catalog: {e}", path.display())))?;
            records += 1;
            apply_arrival(tables, arrival, ctx)?;
        }
    }
    let scan = compact::scan_blk(
        &*file,
        &dicts,
        |at, block, recs| -> Result<(), StoreError> {
            info.blocks += 1;
            info.dict = block.header.dict_id;
            for rec in recs {
                records += 1;
                let loc = compact::block_loc(n, at, block, &rec);
                apply_record(tables, loc, &rec.header, rec.payload, ctx, &dicts)?;
            }
            Ok(())
        },
    )?;
    if let Some(why) = scan.stopped {
        return Err(StoreError::Corrupt(format!(
            "{}: damaged at offset {} ({why})",
            path.display(),
            scan.valid_end
        )));
    }
    info.bytes = scan.file_len;
    if let Some((at, c)) = &catalog {
        info.set_catalog(*at, c);
        tables.drop_cataloged(n, c).map_err(idx_err)?;
    }
    tables.mark_compacted(n, &info).map_err(idx_err)?;
    Ok(records)
}

/// Indexes an arrival found in the log (a record, or a catalog).
fn apply_arrival(
    tables: &mut Tables<'_>,
    arrival: Arrival,
    ctx: &ReplayCtx<'_>,
) -> Result<(), StoreError> {
    let ours = arrival.id.node == ctx.node && arrival.id.epoch == ctx.epoch8;
    let key = if ours { arrival_key(&arrival) } else { None };
    if ours && arrival.id.seq >= tables.counters.next_seq {
        tables.counters.next_seq = arrival.id.seq + 1;
    }
    tables.apply_arrival(&arrival, key)?;
    Ok(())
}

fn apply_record(
    tables: &mut Tables<'_>,
    loc: Loc,
    h: &super::record::RecordHeader,
    payload: &[u8],
    ctx: &ReplayCtx<'_>,
    dicts: super::record::DictLookup<'_>,
) -> Result<(), StoreError> {
    match h.kind {
        KIND_MESSAGE => {
            let raw = decode_payload(h, payload, dicts).map_err(StoreError::Corrupt)?;
            let summary = Summary::of(&raw);
            tables
                .apply_message(&h.message, loc, &summary)
                .map_err(idx_err)?;
        }
        KIND_ARRIVAL => {
            let arrival: Arrival = serde_json::from_slice(payload)
                .map_err(|e| StoreError::Corrupt(format!("arrival record: {e}")))?;
            apply_arrival(tables, arrival, ctx)?;
        }
        KIND_REPEAT => tables.counters.repeats += 1,
        _ => unreachable!("record kinds are checked when decoded"),
    }
    Ok(())
}
