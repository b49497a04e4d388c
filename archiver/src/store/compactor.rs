//! Running compactions: which segments, in what order, and the background thread.
//!
//! [`StoreHandle::compact`] compacts, one after the other, every sealed segment that is
//! not compacted yet (after sealing the active one, if asked): for each, the rewrite
//! (`compact.rs`, steps 1–3), the switch through the index stage (step 4), then the
//! old segment's deletion (step 5). The daemon runs it on a low-priority thread
//! ([`Background`]) every [`AUTO_INTERVAL`] and whenever `coffer compact` asks; memory is
//! one block at a time plus the list of the segment's message moves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::ReadableDatabase;
use serde::Serialize;
use tracing::{debug, error, info};

use super::catalog;
use super::codec;
use super::compact;
use super::dict;
use super::engine::{idx_err, io_err};
use super::index::{self, SegmentInfo, StateOp, META, SEGMENTS};
use super::log::{self, list_log, segment_path};
use super::record::{decode_payload, KIND_MESSAGE, SEGMENT_HEADER_LEN};
use super::{StoreError, StoreHandle};

/// Nice value of the compactor thread: it takes only CPU time nothing else wants.
const COMPACTOR_NICE: i32 = 19;

/// How often the background compactor looks for sealed segments by itself.
pub const AUTO_INTERVAL: Duration = Duration::from_secs(30);

/// Progress counters, for `coffer compact --wait`, status and `/metrics`.
#[derive(Debug, Default)]
pub struct CompactionState {
    /// Requests made (`coffer compact`), numbered from 1.
    pub requested: AtomicU64,
    /// The highest request number a finished run covered.
    pub done: AtomicU64,
    pub running: AtomicBool,
    /// Segments compacted since start.
    pub segments: AtomicU64,
    /// Sealed segments waiting, as last counted.
    pub waiting: AtomicU64,
    /// Bytes of segments rewritten, and of what they became.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Raw bytes of the messages compacted.
    pub raw_bytes: AtomicU64,
    /// Why the last run failed, if it did (cleared by a good run).
    pub last_error: Mutex<Option<String>>,
    /// The last index rewrite (after a requested run): what it did or why it did not.
    pub last_index: Mutex<Option<IndexOutcome>>,
}

/// What the index rewrite after a requested compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexOutcome {
    /// `index.redb`'s size before and after, when it was rewritten.
    pub bytes_before: Option<u64>,
    pub bytes_after: Option<u64>,
    /// The disk space it used before and after (redb grows the file sparsely).
    pub disk_bytes_before: Option<u64>,
    pub disk_bytes_after: Option<u64>,
    /// How long ingest waited for it, in milliseconds.
    pub millis: Option<u64>,
    /// Why the index was left as it was, if it was.
    pub skipped: Option<String>,
}

/// What one run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactReport {
    pub segments: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub raw_bytes: u64,
    /// The dictionary trained in this run, if one was.
    pub trained_dict: Option<u32>,
}

/// The state of compaction as `coffer compact --wait` and `coffer status` see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactionStatus {
    pub running: bool,
    pub requested: u64,
    pub done: u64,
    pub segments_compacted: u64,
    pub segments_waiting: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_error: Option<String>,
    /// The index rewrite of the last requested run, if one ran.
    pub index: Option<IndexOutcome>,
}

impl StoreHandle {
    /// Compacts every sealed segment not compacted yet, sealing the active one first if
    /// `seal`. `stop()` is asked between blocks; when it says true, the run ends early
    /// (the segment in progress is left as it was).
    ///
    /// # Errors
    /// The store failed or is shutting down, I/O errors, damage in a sealed segment.
    pub fn compact(
        &self,
        seal: bool,
        stop: &dyn Fn() -> bool,
    ) -> Result<CompactReport, StoreError> {
        let sh = &self.shared;
        let _one = sh
            .compact_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let unavailable = |e: super::IngestError| StoreError::Unavailable(e.to_string());
        if seal {
            self.update_state_blocking(StateOp::Seal)
                .map_err(unavailable)?;
        }
        let mut report = CompactReport::default();
        // Bounded: each pass compacts one segment or ends.
        for _ in 0..u32::MAX {
            if stop() {
                break;
            }
            let (waiting, leftovers) = self.candidates()?;
            sh.compaction
                .waiting
                .store(waiting.len() as u64, Ordering::Relaxed);
            for n in leftovers {
                // A segment whose switch committed but whose deletion did not happen.
                let p = segment_path(&sh.log_dir, n);
                remove_if_there(&*sh.vfs, &p)?;
                sh.vfs.sync_dir(&sh.log_dir).map_err(io_err(&sh.log_dir))?;
            }
            let Some(&n) = waiting.first() else {
                break;
            };
            let dict = self.dictionary(n, &mut report)?;
            let lookup = |id| sh.dicts.get(id);
            let mut pause = || {
                std::thread::yield_now();
                stop()
            };
            let mut catalog =
                |moves: &[index::Move], arrivals: &[String]| self.catalog_of(moves, arrivals);
            let rewritten = compact::rewrite(
                &*sh.vfs,
                &sh.log_dir,
                n,
                sh.epoch_bytes,
                &sh.compact_opts,
                dict.as_ref().map(|(id, d)| (*id, d.as_slice())),
                &lookup,
                &mut pause,
                &mut catalog,
            )?;
            let Some(r) = rewritten else {
                break;
            };
            let (bytes_in, bytes_out, raw) = (r.info.from_bytes, r.info.bytes, r.raw_bytes);
            // 4. The switch, in one index transaction.
            self.update_state_blocking(StateOp::Relocate {
                segment: n,
                moves: r.moves,
                info: r.info,
                catalog: r.catalog,
            })
            .map_err(unavailable)?;
            // 5. The old segment goes, now that nothing points at it.
            remove_if_there(&*sh.vfs, &segment_path(&sh.log_dir, n))?;
            sh.vfs.sync_dir(&sh.log_dir).map_err(io_err(&sh.log_dir))?;
            info!(
                segment = n,
                bytes_in,
                bytes_out,
                raw_bytes = raw,
                "compacted a sealed segment"
            );
            report.segments += 1;
            report.bytes_in += bytes_in;
            report.bytes_out += bytes_out;
            report.raw_bytes += raw;
            let c = &sh.compaction;
            c.segments.fetch_add(1, Ordering::Relaxed);
            c.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
            c.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
            c.raw_bytes.fetch_add(raw, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// The catalog of a segment being compacted, from the index: the summaries of the
    /// messages whose indexed blob moves, and the arrivals of its arrival records as the
    /// index numbered them (a duplicate the index passed over is left out). The segment
    /// is below the index's tail, so all of it is indexed.
    fn catalog_of(
        &self,
        moves: &[index::Move],
        arrivals: &[String],
    ) -> Result<catalog::Catalog, StoreError> {
        let txn = self.snapshot()?;
        let messages = txn.open_table(index::MESSAGES).map_err(idx_err)?;
        let summaries = txn.open_table(index::SUMMARIES).map_err(idx_err)?;
        let ids = txn.open_table(index::ARRIVAL_IDS).map_err(idx_err)?;
        let rows = txn.open_table(index::ARRIVALS).map_err(idx_err)?;
        let mut found = Vec::new();
        for m in moves {
            let indexed_here = messages
                .get(m.message.0)
                .map_err(idx_err)?
                .and_then(|v| index::Loc::decode(v.value()))
                == Some(m.from);
            if !indexed_here {
                continue;
            }
            if let Some(v) = summaries
                .get((m.from.segment, m.message.0))
                .map_err(idx_err)?
            {
                found.push((m.message.0, v.value().to_vec()));
            }
        }
        let mut numbered = Vec::new();
        for id in arrivals {
            // The segment's arrivals are rows still: of those filed under the id, the one
            // whose row has that id.
            let Ok(id) = id.parse::<crate::ids::ArrivalId>() else {
                continue;
            };
            for local in index::id_locals(&ids, index::id_key(&id)).map_err(idx_err)? {
                let Some(v) = rows.get(local).map_err(idx_err)? else {
                    continue;
                };
                let v = v.value();
                if codec::decode_arrival(v).is_ok_and(|a| a.id == id) {
                    numbered.push((local, v.to_vec()));
                    break;
                }
            }
        }
        Ok(catalog::Catalog::build(found, numbered))
    }

    /// Sealed segments to compact (below the index's tail, not compacted), and compacted
    /// ones whose `.seg` is still there.
    fn candidates(&self) -> Result<(Vec<u32>, Vec<u32>), StoreError> {
        let sh = &self.shared;
        let txn = self.snapshot()?;
        let tail = {
            let meta = txn.open_table(META).map_err(idx_err)?;
            u32::try_from(index::meta_u64(&meta, index::K_TAIL_SEG)).unwrap_or(0)
        };
        let segments = txn.open_table(SEGMENTS).map_err(idx_err)?;
        let mut waiting = Vec::new();
        let mut leftovers = Vec::new();
        for f in list_log(&*sh.vfs, &sh.log_dir).map_err(io_err(&sh.log_dir))? {
            if f.number >= tail || !f.seg {
                continue;
            }
            let compacted = segments
                .get(f.number)
                .map_err(idx_err)?
                .and_then(|v| SegmentInfo::decode(v.value()))
                .is_some_and(|i| i.compacted);
            if compacted {
                leftovers.push(f.number);
            } else {
                waiting.push(f.number);
            }
        }
        Ok((waiting, leftovers))
    }

    /// The dictionary for blocks (and from now on for ingest): the one there is, or one
    /// trained on segment `n`'s messages when `dictionary` is on and there is none yet.
    fn dictionary(
        &self,
        n: u32,
        report: &mut CompactReport,
    ) -> Result<Option<dict::Dict>, StoreError> {
        let sh = &self.shared;
        if !sh.compact_opts.dictionary {
            return Ok(None);
        }
        if let Some(d) = self.ingest_dict() {
            return Ok(Some(d));
        }
        let samples = sample_messages(self, n)?;
        let trained = match dict::train(&samples) {
            Ok(d) => d,
            Err(why) => {
                debug!(segment = n, %why, "no dictionary yet");
                return Ok(None);
            }
        };
        let dir = sh.data_dir.join(dict::DICT_DIR);
        let id = sh.dicts.add(trained).map_err(io_err(&dir))?;
        let d = sh.dicts.get(id).map_err(StoreError::Corrupt)?;
        info!(
            dictionary = id,
            samples = samples.len(),
            bytes = d.len(),
            "trained a zstd dictionary on the archive's own mail"
        );
        *sh.ingest_dict
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((id, d.clone()));
        report.trained_dict = Some(id);
        Ok(Some((id, d)))
    }

    /// Asks the background compactor to seal and compact now; returns the request's
    /// number ([`CompactionStatus::done`] reaches it once a run covering it ended).
    ///
    /// # Errors
    /// There is no background compactor (the store was opened without one).
    pub fn request_compaction(&self) -> Result<u64, StoreError> {
        let tx = self
            .shared
            .compaction_tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Unavailable("no background compactor runs".into()))?;
        let n = self
            .shared
            .compaction
            .requested
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        tx.send(true)
            .map_err(|_| StoreError::Unavailable("the compactor has stopped".into()))?;
        Ok(n)
    }

    /// [`StoreHandle::rewrite_index`], one compaction at a time, as the status says it.
    pub fn rewrite_index_outcome(&self) -> IndexOutcome {
        let _one = self
            .shared
            .compact_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.rewrite_index() {
            Ok(r) => IndexOutcome {
                bytes_before: Some(r.before),
                bytes_after: Some(r.after),
                disk_bytes_before: Some(r.disk_before),
                disk_bytes_after: Some(r.disk_after),
                millis: Some(r.millis),
                skipped: None,
            },
            Err(why) => IndexOutcome {
                skipped: Some(why),
                ..IndexOutcome::default()
            },
        }
    }

    pub fn compaction_status(&self) -> CompactionStatus {
        let c = &self.shared.compaction;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CompactionStatus {
            running: c.running.load(Ordering::Relaxed),
            requested: get(&c.requested),
            done: get(&c.done),
            segments_compacted: get(&c.segments),
            segments_waiting: get(&c.waiting),
            bytes_in: get(&c.bytes_in),
            bytes_out: get(&c.bytes_out),
            last_error: c
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            index: c
                .last_index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

fn remove_if_there(vfs: &dyn super::io::Vfs, p: &std::path::Path) -> Result<(), StoreError> {
    match vfs.remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(p)(e)),
    }
}

/// Up to [`dict::MAX_SAMPLES`] messages of segment `n` (each cut to
/// [`dict::SAMPLE_PREFIX`] bytes), to train a dictionary on.
fn sample_messages(h: &StoreHandle, n: u32) -> Result<Vec<Vec<u8>>, StoreError> {
    let sh = &h.shared;
    let path = segment_path(&sh.log_dir, n);
    let file = sh.vfs.open_read(&path).map_err(io_err(&path))?;
    let mut samples = Vec::new();
    let mut bytes = 0usize;
    let lookup = |id| sh.dicts.get(id);
    log::scan(
        &*file,
        SEGMENT_HEADER_LEN,
        |rec| -> Result<(), StoreError> {
            if rec.header.kind != KIND_MESSAGE
                || samples.len() >= dict::MAX_SAMPLES
                || bytes >= dict::MAX_SAMPLE_BYTES
            {
                return Ok(());
            }
            if let Ok(mut raw) = decode_payload(&rec.header, &rec.payload, &lookup) {
                raw.truncate(dict::SAMPLE_PREFIX);
                bytes += raw.len();
                samples.push(raw);
            }
            Ok(())
        },
    )?;
    Ok(samples)
}

/// The daemon's compactor thread, at the lowest CPU priority.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    handle: StoreHandle,
}

impl Background {
    /// Starts the thread.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(handle: StoreHandle) -> std::io::Result<Background> {
        let (tx, rx) = crossbeam_channel::unbounded::<bool>();
        *handle
            .shared
            .compaction_tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (handle.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("store-compactor".into())
            .spawn(move || run(&h, &rx, &s))?;
        Ok(Background {
            stop,
            thread: Some(thread),
            handle,
        })
    }

    /// Stops the thread (between two blocks) and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the only sender wakes the thread.
        self.handle
            .shared
            .compaction_tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wakes on a request (`true`: seal first), on a segment sealed by the writer (`false`),
/// or every [`AUTO_INTERVAL`].
fn run(h: &StoreHandle, rx: &crossbeam_channel::Receiver<bool>, stop: &AtomicBool) {
    super::io::lower_thread_priority(COMPACTOR_NICE, "compactor");
    let c = &h.shared.compaction;
    loop {
        let mut asked = match rx.recv_timeout(AUTO_INTERVAL) {
            Ok(seal) => seal,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Requests queued meanwhile are covered by this run.
        while let Ok(seal) = rx.try_recv() {
            asked |= seal;
        }
        let covers = c.requested.load(Ordering::Acquire);
        if h.failed() {
            continue;
        }
        c.running.store(true, Ordering::Relaxed);
        let result = h.compact(asked, &|| stop.load(Ordering::Relaxed));
        // Only a requested run (`coffer compact`) rewrites the index: ingest waits
        // while it does.
        if asked && result.is_ok() && !stop.load(Ordering::Relaxed) {
            let outcome = h.rewrite_index_outcome();
            *c.last_index
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
        }
        c.running.store(false, Ordering::Relaxed);
        let mut last = c
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(_) => *last = None,
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                error!(error = %e, "compaction failed; it is tried again later");
                *last = Some(e.to_string());
            }
        }
        drop(last);
        c.done.fetch_max(covers, Ordering::AcqRel);
    }
}

/// Name of the index being rewritten ([`compact_index`], or the daemon after a
/// requested compaction); a leftover is removed when the store opens.
pub const REWRITE_INDEX_FILE: &str = "index.redb.rewrite";

/// Makes `index.redb` as small as its content: copies every table in key order into a
/// fresh file (the pages come out full; random inserts leave B-tree pages about
/// half full), lets redb compact that, and renames it over the index. The copy must
/// hold the same tables with the same entries, or the index is left as it was. Only
/// with the store closed and its lock free; `coffer compact` runs it when no daemon
/// does.
///
/// # Errors
/// The daemon holds the store, or redb or the file system failed (the index is then
/// unchanged).
pub fn compact_index(data_dir: &std::path::Path) -> Result<(u64, u64), StoreError> {
    use super::io::Vfs;
    let lock_path = data_dir.join(super::engine::LOCK_FILE);
    let _lock = super::io::RealVfs
        .try_lock(&lock_path)
        .map_err(io_err(&lock_path))?
        .ok_or_else(|| StoreError::DaemonRunning(lock_path.clone()))?;
    let path = data_dir.join(super::engine::INDEX_FILE);
    let before = std::fs::metadata(&path).map_err(io_err(&path))?.len();
    {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        let src = b.open(&path).map_err(idx_err)?;
        write_rewrite(data_dir, &src)?;
    }
    install_rewrite(data_dir)?;
    let after = std::fs::metadata(&path).map_err(io_err(&path))?.len();
    Ok((before, after))
}

/// The first half of an index rewrite, for a caller holding the store's lock: copies
/// every table of `src` (the open `index.redb`) in key order into
/// [`REWRITE_INDEX_FILE`], lets redb compact it, and checks it holds the same tables
/// with the same entries. Nothing writes `src` meanwhile (the caller sees to it). On
/// failure the copy is removed and `index.redb` is untouched.
///
/// # Errors
/// redb or the file system failed, or the copy differs.
pub(crate) fn write_rewrite(
    data_dir: &std::path::Path,
    src: &redb::Database,
) -> Result<(), StoreError> {
    let tmp = data_dir.join(REWRITE_INDEX_FILE);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let rewritten = (|| -> Result<(), StoreError> {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        let mut dst = b.create(&tmp).map_err(idx_err)?;
        let r = src.begin_read().map_err(idx_err)?;
        let w = dst.begin_write().map_err(idx_err)?;
        index::copy_tables(&r, &w).map_err(idx_err)?;
        w.commit().map_err(idx_err)?;
        dst.compact().map_err(idx_err)?;
        let check = dst.begin_read().map_err(idx_err)?;
        index::same_tables(&r, &check).map_err(StoreError::Corrupt)?;
        Ok(())
    })();
    if let Err(e) = rewritten {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The second half: renames [`REWRITE_INDEX_FILE`] over `index.redb` and syncs the
/// folder. Only once nothing in this process has the old index open any more.
///
/// # Errors
/// The rename or the folder's sync failed.
pub(crate) fn install_rewrite(data_dir: &std::path::Path) -> Result<(), StoreError> {
    use super::io::Vfs;
    let path = data_dir.join(super::engine::INDEX_FILE);
    let tmp = data_dir.join(REWRITE_INDEX_FILE);
    let rt = super::io::RealVfs;
    rt.rename(&tmp, &path).map_err(io_err(&path))?;
    rt.sync_dir(data_dir).map_err(io_err(data_dir))?;
    Ok(())
}
