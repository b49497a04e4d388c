//! `coffer backup DEST`: a consistent copy of a live store that `cofferd` can open.
//!
//! redb has no online backup, and copying `index.redb` under a read transaction is not
//! safe against the writer reusing pages, so the backup copies **the log only** and
//! rebuilds the index from it in the copy:
//!
//! 1. note the end of the log now: the newest segment and its length. Everything
//!    acknowledged before this moment lies below it (a message is acknowledged only after
//!    its records were synced, and a segment is created only after the one before it was
//!    synced);
//! 2. copy every segment up to that one whole, and that one up to the noted length, into
//!    a temporary folder beside DEST; bytes below a segment's end never change (the log
//!    is append-only), so the copy needs no lock and works beside a running daemon;
//! 3. fsync every file and folder, then open the copy as a store: the open finds no index
//!    and replays the whole log into a new one, checking every record's CRC; a torn
//!    record at the very end (a batch being written as step 1 looked) is cut off there,
//!    exactly as after a crash;
//! 4. rename the folder to DEST and fsync its parent.
//!
//! A compacted segment is copied as its `.blk` once its `.seg` is gone, and `dict/`
//! (the zstd dictionaries records may name) is copied whole.
//!
//! The copy keeps the store epoch and arrival ids: it is this store, restored. Start
//! `cofferd` with `data_dir = DEST`; it is not a second node.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::dict::DICT_DIR;
use super::engine::{io_err, Engine};
use super::io::{RealVfs, Vfs};
use super::log::{blk_path, list_segments, segment_path, LOG_DIR};
use super::record::SEGMENT_HEADER_LEN;
use super::{StoreError, StoreReader, StoreStatus};

/// What a backup copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    /// Segment files copied.
    pub segments: u32,
    /// Log bytes copied.
    pub bytes: u64,
    /// The log position copied up to: (newest segment, its length in the copy).
    pub end: (u32, u64),
    /// The copy's totals once its index was rebuilt (`repeats` is 0).
    pub status: StoreStatus,
}

/// Syncs a directory (its entries' names).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Whether `dest` can receive a backup: missing, or an empty folder.
///
/// # Errors
/// `dest` exists and is not an empty folder (`AlreadyExists`), or cannot be read.
pub fn check_dest(dest: &Path) -> Result<(), StoreError> {
    match fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(StoreError::Io {
                    path: dest.to_owned(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "exists and is not empty; a backup goes into a new folder",
                    ),
                })
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io {
            path: dest.to_owned(),
            source: if dest.is_file() {
                io::Error::new(io::ErrorKind::AlreadyExists, "exists and is a file")
            } else {
                e
            },
        }),
    }
}

/// The folder a backup into `dest` is assembled in.
fn staging_dir(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or_else(|| "backup".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(".{name}.coffer-backup"))
}

/// Copies the first `len` bytes of `input` (the file at `src`) into the new file `dst`
/// and syncs it. `newest`: the file may have become shorter meanwhile (a failed append
/// rolled back: those bytes were never acknowledged), so fewer bytes are fine.
fn copy_prefix(
    input: &File,
    src: &Path,
    dst: &Path,
    len: u64,
    newest: bool,
) -> Result<u64, StoreError> {
    let mut output = File::create_new(dst).map_err(io_err(dst))?;
    let mut input = io::Read::take(input, len);
    let copied = io::copy(&mut input, &mut output).map_err(io_err(src))?;
    if copied != len && !newest {
        return Err(StoreError::Corrupt(format!(
            "{}: shorter than expected ({copied} of {len} bytes)",
            src.display()
        )));
    }
    output.sync_all().map_err(io_err(dst))?;
    Ok(copied)
}

/// Backs up the store in `data_dir`, whose node is `node`, into `dest` (missing or
/// empty). Works with or without a daemon running. `progress(done, total)` counts bytes.
///
/// # Errors
/// `dest` is not usable, I/O errors, or damage in the log (the copy is not kept).
pub fn backup(
    data_dir: &Path,
    node: &str,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BackupReport, StoreError> {
    check_dest(dest)?;
    let vfs = RealVfs;
    let log_dir = data_dir.join(LOG_DIR);
    if !vfs.exists(&log_dir) {
        return Err(StoreError::NoStore(data_dir.to_owned()));
    }
    // 1. The end of the log, now.
    let segments = list_segments(&vfs, &log_dir).map_err(io_err(&log_dir))?;
    let Some(&last) = segments.last() else {
        return Err(StoreError::NoStore(data_dir.to_owned()));
    };
    // Each segment is opened now and copied through that open file, with the length it
    // has now: a segment file replaced by a rewritten one meanwhile is still copied
    // whole, in one version.
    // A segment compacted meanwhile is copied in its compacted form: `.seg` while it is
    // there (a `.blk` beside it may still be unfinished), else the `.blk`, which is
    // whole once the `.seg` is gone (docs/store-format.md "Compacted segments").
    let mut plan = Vec::with_capacity(segments.len());
    for &n in &segments {
        let seg = segment_path(&log_dir, n);
        let (p, f) = match File::open(&seg) {
            Ok(f) => (seg, f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let blk = blk_path(&log_dir, n);
                let f = File::open(&blk).map_err(io_err(&blk))?;
                (blk, f)
            }
            Err(e) => return Err(io_err(&seg)(e)),
        };
        let len = f.metadata().map_err(io_err(&p))?.len();
        plan.push((n, f, len, p));
    }
    // A segment created this instant may not have its header yet: nothing is in it.
    if plan.len() > 1
        && plan
            .last()
            .is_some_and(|(_, _, len, _)| *len < SEGMENT_HEADER_LEN)
    {
        plan.pop();
    }
    let last = plan.last().map_or(last, |(n, _, _, _)| *n);
    let total: u64 = plan.iter().map(|(_, _, len, _)| len).sum();

    // 2. Copy into a staging folder beside DEST (a leftover of an interrupted run goes).
    let staging = staging_dir(dest);
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    let staging_log = staging.join(LOG_DIR);
    fs::create_dir_all(&staging_log).map_err(io_err(&staging_log))?;
    let result = (|| {
        let mut done = 0;
        progress(0, total);
        for (n, file, len, src) in &plan {
            let name = src.file_name().expect("segment files have names");
            done += copy_prefix(file, src, &staging_log.join(name), *len, *n == last)?;
            progress(done, total);
        }
        // Dictionaries: every one a copied record can name existed before that record
        // was written (they are durable before use), and none ever changes.
        let dict_dir = data_dir.join(DICT_DIR);
        if dict_dir.is_dir() {
            let staging_dict = staging.join(DICT_DIR);
            fs::create_dir_all(&staging_dict).map_err(io_err(&staging_dict))?;
            for entry in fs::read_dir(&dict_dir).map_err(io_err(&dict_dir))? {
                let entry = entry.map_err(io_err(&dict_dir))?;
                let name = entry.file_name();
                if !name.to_string_lossy().ends_with(".dict") {
                    continue;
                }
                let src = entry.path();
                let f = File::open(&src).map_err(io_err(&src))?;
                let len = f.metadata().map_err(io_err(&src))?.len();
                copy_prefix(&f, &src, &staging_dict.join(&name), len, false)?;
            }
            sync_dir(&staging_dict)?;
        }
        // 3. Names durable, then the index rebuilt from the copied log.
        sync_dir(&staging_log)?;
        sync_dir(&staging)?;
        drop(Engine::open(Arc::new(RealVfs), &staging, Some(node))?);
        sync_dir(&staging)?;
        let status = StoreReader::open(&staging)?.status()?;
        let end_len = fs::metadata(segment_path(&staging_log, last))
            .map_err(io_err(&staging_log))?
            .len();
        Ok(BackupReport {
            segments: u32::try_from(plan.len()).unwrap_or(u32::MAX),
            bytes: done,
            end: (last, end_len),
            status,
        })
    })();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // 4. Into place (an empty DEST folder is replaced), made durable.
    fs::rename(&staging, dest).map_err(io_err(dest))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    sync_dir(&parent)?;
    Ok(report)
}
