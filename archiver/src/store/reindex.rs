//! `coffer reindex`: rebuild `index.redb` from the log alone.
//!
//! With the store's writer lock taken (so no daemon runs), the index is moved aside to
//! `index.redb.old` (replacing any earlier one) and the store is opened: an open that
//! finds no index replays the whole log into a new one through the same functions ingest
//! uses (`engine.rs`). The new index is then checked against the log (`verify --deep`);
//! only once it is clean is `index.redb.old` removed. If the rebuild fails, the old index
//! is put back. The `repeats` counter is not in the log and restarts from zero.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::ReadableDatabase;

use super::engine::{io_err, Engine, INDEX_FILE, LOCK_FILE};
use super::index::{self, META};
use super::io::{RealVfs, Vfs};
use super::log::LOG_DIR;
use super::{StoreError, StoreReader, StoreStatus, VerifyReport};

/// Where the index being replaced waits until the new one is verified.
pub const OLD_INDEX_FILE: &str = "index.redb.old";

/// What a reindex found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReindexReport {
    /// The old index's totals, when it could still be read.
    pub before: Option<StoreStatus>,
    /// The rebuilt index's totals (all of them come back from the log).
    pub after: StoreStatus,
    /// `verify --deep` of the rebuilt index. Not empty: the old index was kept as
    /// `index.redb.old`.
    pub verify: VerifyReport,
    /// Where the old index was kept, if it was.
    pub kept_old: Option<PathBuf>,
}

/// The totals of an index file, opened read-only; `None` if it cannot be read.
fn read_totals(path: &Path) -> Option<StoreStatus> {
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    let db = b.open_read_only(path).ok()?;
    let txn = db.begin_read().ok()?;
    let meta = txn.open_table(META).ok()?;
    let node = meta
        .get(index::K_NODE)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(v.value()).into_owned())
        .unwrap_or_default();
    let epoch = meta
        .get(index::K_EPOCH)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 16]>::try_from(v.value()).ok())
        .map(|e| uuid::Uuid::from_bytes(e).to_string())
        .unwrap_or_default();
    Some(StoreStatus {
        node,
        epoch,
        messages: index::meta_u64(&meta, index::K_MESSAGES),
        arrivals: index::meta_u64(&meta, index::K_ARRIVALS),
        repeats: index::meta_u64(&meta, index::K_REPEATS),
        raw_bytes: index::meta_u64(&meta, index::K_RAW_BYTES),
        stored_bytes: index::meta_u64(&meta, index::K_STORED_BYTES),
    })
}

/// Rebuilds the index of the store in `data_dir` from its log. `node` is this node's
/// name (the configuration's, as the daemon would use): arrivals minted under it get
/// their arrival keys back. `progress(done, total)` follows the verification.
///
/// # Errors
/// [`StoreError::DaemonRunning`] while another process holds the store (nothing is
/// touched); [`StoreError::NoStore`] without a log; the rebuild failed (the old index is
/// back in place).
pub fn reindex(
    data_dir: &Path,
    node: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReindexReport, StoreError> {
    let vfs = RealVfs;
    let log_dir = data_dir.join(LOG_DIR);
    if !vfs.exists(&log_dir) {
        return Err(StoreError::NoStore(data_dir.to_owned()));
    }
    let index_path = data_dir.join(INDEX_FILE);
    let old_path = data_dir.join(OLD_INDEX_FILE);
    let lock_path = data_dir.join(LOCK_FILE);
    {
        let _lock = vfs
            .try_lock(&lock_path)
            .map_err(io_err(&lock_path))?
            .ok_or_else(|| StoreError::DaemonRunning(lock_path.clone()))?;
        if vfs.exists(&index_path) {
            // Replaces an `.old` left by an earlier run: the index in place is newer.
            std::fs::rename(&index_path, &old_path).map_err(io_err(&index_path))?;
            vfs.sync_dir(data_dir).map_err(io_err(data_dir))?;
        }
        // The lock goes before the open below takes it again (flock is per open file,
        // so this process cannot take it twice). A daemon starting in between finds no
        // index and rebuilds it from the log itself; the open below then says it runs.
    }
    let before = if vfs.exists(&old_path) {
        read_totals(&old_path)
    } else {
        None
    };
    let rebuilt = Engine::open(Arc::new(RealVfs), data_dir, Some(node));
    match rebuilt {
        Ok(engine) => drop(engine),
        Err(e @ StoreError::DaemonRunning(_)) => return Err(e),
        Err(e) => {
            // Put the old index back: the store is as it was before the attempt.
            if vfs.exists(&old_path) {
                if vfs.exists(&index_path) {
                    vfs.remove_file(&index_path).map_err(io_err(&index_path))?;
                }
                std::fs::rename(&old_path, &index_path).map_err(io_err(&old_path))?;
                vfs.sync_dir(data_dir).map_err(io_err(data_dir))?;
            }
            return Err(e);
        }
    }
    let reader = StoreReader::open(data_dir)?;
    let verify = reader.verify(true, progress)?;
    let after = reader.status()?;
    drop(reader);
    let kept_old = if verify.problems.is_empty() {
        if vfs.exists(&old_path) {
            vfs.remove_file(&old_path).map_err(io_err(&old_path))?;
            vfs.sync_dir(data_dir).map_err(io_err(data_dir))?;
        }
        None
    } else {
        vfs.exists(&old_path).then_some(old_path)
    };
    Ok(ReindexReport {
        before,
        after,
        verify,
        kept_old,
    })
}
