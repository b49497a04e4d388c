//! Segment files: append, sync, rotate, scan, read one record.
//!
//! Segments live in `DATA_DIR/log/NNNNNNNN.seg`. Only the newest segment is ever written;
//! a new one is created (header written, file synced, directory synced) before the first
//! record goes into it, so a torn write can only ever be at the tail of the newest one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::io::{VFile, Vfs};
use super::record::{
    check_crc, RecordHeader, SegmentHeader, RECORD_HEADER_LEN, RECORD_TRAILER_LEN,
    SEGMENT_HEADER_LEN,
};

pub const LOG_DIR: &str = "log";

pub fn segment_path(log_dir: &Path, number: u32) -> PathBuf {
    log_dir.join(format!("{number:08}.seg"))
}

/// The compacted form of segment `number` (docs/store-format.md "Compacted segments").
pub fn blk_path(log_dir: &Path, number: u32) -> PathBuf {
    log_dir.join(format!("{number:08}.blk"))
}

/// Where a compaction writes segment `number`'s blocks before renaming them into place.
pub fn blk_tmp_path(log_dir: &Path, number: u32) -> PathBuf {
    log_dir.join(format!("{number:08}.blk.tmp"))
}

/// The files present for one segment number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentFiles {
    pub number: u32,
    /// `NNNNNNNN.seg` exists.
    pub seg: bool,
    /// `NNNNNNNN.blk` exists.
    pub blk: bool,
}

/// Every segment number in `log_dir` with the forms it is present in, ascending.
///
/// # Errors
/// The directory cannot be read.
pub fn list_log(vfs: &dyn Vfs, log_dir: &Path) -> io::Result<Vec<SegmentFiles>> {
    if !vfs.exists(log_dir) {
        return Ok(Vec::new());
    }
    let mut map = std::collections::BTreeMap::<u32, SegmentFiles>::new();
    for name in vfs.read_dir(log_dir)? {
        let (n, blk) = if let Some(n) = name.strip_suffix(".seg") {
            (n, false)
        } else if let Some(n) = name.strip_suffix(".blk") {
            (n, true)
        } else {
            continue;
        };
        let Ok(number) = n.parse::<u32>() else {
            continue;
        };
        let e = map.entry(number).or_insert(SegmentFiles {
            number,
            ..SegmentFiles::default()
        });
        if blk {
            e.blk = true;
        } else {
            e.seg = true;
        }
    }
    Ok(map.into_values().collect())
}

/// Segment numbers present in `log_dir` (as a segment or compacted), ascending.
///
/// # Errors
/// The directory cannot be read.
pub fn list_segments(vfs: &dyn Vfs, log_dir: &Path) -> io::Result<Vec<u32>> {
    Ok(list_log(vfs, log_dir)?.iter().map(|s| s.number).collect())
}

/// Reads and checks a compacted segment's header.
///
/// # Errors
/// I/O errors, or `InvalidData` naming what is wrong.
pub fn read_blk_header(file: &dyn VFile) -> io::Result<SegmentHeader> {
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut b, 0)?;
    SegmentHeader::decode_blk(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads and checks a segment's header.
///
/// # Errors
/// I/O errors, or `InvalidData` naming what is wrong.
pub fn read_header(file: &dyn VFile) -> io::Result<SegmentHeader> {
    let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut b, 0)?;
    SegmentHeader::decode(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One record read back from a segment.
pub struct RawRecord {
    pub header: RecordHeader,
    pub payload: Vec<u8>,
    pub offset: u64,
}

/// Reads the record at `offset` and checks it (magic, lengths, CRC).
///
/// # Errors
/// I/O errors; `InvalidData` for a record that fails its checks.
pub fn read_record(file: &dyn VFile, offset: u64) -> io::Result<RawRecord> {
    let mut head = [0u8; RECORD_HEADER_LEN];
    file.read_exact_at(&mut head, offset)?;
    let header =
        RecordHeader::decode(&head).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut whole = read_declared(file, offset, header.total_len())?;
    if !check_crc(&whole) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record checksum mismatch",
        ));
    }
    whole.truncate(whole.len() - RECORD_TRAILER_LEN);
    let payload = whole.split_off(RECORD_HEADER_LEN);
    Ok(RawRecord {
        header,
        payload,
        offset,
    })
}

/// Reads the `len` bytes at `offset` that a record or block header declares. The length
/// comes from the file itself (up to [`MAX_PAYLOAD`](super::record::MAX_PAYLOAD) plus
/// framing), so it is checked against the file's size before anything is allocated: a
/// damaged or torn header that claims a gigabyte in a small file is the same
/// `UnexpectedEof` a short read gives, without the gigabyte buffer.
///
/// # Errors
/// I/O errors; `UnexpectedEof` when the file ends before `offset + len`.
pub fn read_declared(file: &dyn VFile, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let file_len = file.len()?;
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("a record of {len} bytes at {offset} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let mut whole = vec![0u8; len];
    file.read_exact_at(&mut whole, offset)?;
    Ok(whole)
}

/// Outcome of scanning a segment from some offset.
pub struct Scan {
    /// Offset just past the last valid record.
    pub valid_end: u64,
    /// The file's length; bytes past `valid_end` are a torn or damaged tail.
    pub file_len: u64,
    /// Why the scan stopped before `file_len`, if it did.
    pub stopped: Option<String>,
}

/// Reads records from `offset` to the end of a segment, calling `f` for each valid one,
/// and stops at the first record that is incomplete or fails its checks.
///
/// # Errors
/// I/O errors other than a short read, or an error returned by `f`.
pub fn scan<E: From<io::Error>>(
    file: &dyn VFile,
    mut offset: u64,
    mut f: impl FnMut(RawRecord) -> Result<(), E>,
) -> Result<Scan, E> {
    let file_len = file.len()?;
    loop {
        if offset == file_len {
            return Ok(Scan {
                valid_end: offset,
                file_len,
                stopped: None,
            });
        }
        match read_record(file, offset) {
            Ok(rec) => {
                let next = offset + rec.header.total_len();
                f(rec)?;
                offset = next;
            }
            Err(e)
                if e.kind() == io::ErrorKind::UnexpectedEof
                    || e.kind() == io::ErrorKind::InvalidData =>
            {
                return Ok(Scan {
                    valid_end: offset,
                    file_len,
                    stopped: Some(e.to_string()),
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The newest segment, open for appending.
#[derive(Debug)]
pub struct ActiveSegment {
    pub number: u32,
    pub file: Box<dyn VFile>,
    /// Bytes in the file that belong to it (everything before is valid).
    pub len: u64,
}

/// The writer's view of the log.
#[derive(Debug)]
pub struct Log {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    epoch: [u8; 16],
    pub active: ActiveSegment,
    /// A segment was created since the last sync: the directory needs a sync too.
    dir_dirty: bool,
}

impl Log {
    pub fn new(vfs: Arc<dyn Vfs>, dir: PathBuf, epoch: [u8; 16], active: ActiveSegment) -> Self {
        Self {
            vfs,
            dir,
            epoch,
            active,
            dir_dirty: false,
        }
    }

    /// Creates segment `number` with its header, synced, and its name made durable.
    ///
    /// # Errors
    /// Any I/O error; the half-created file is left for recovery to judge.
    pub fn create_segment(
        vfs: &dyn Vfs,
        dir: &Path,
        number: u32,
        epoch: [u8; 16],
    ) -> io::Result<ActiveSegment> {
        let path = segment_path(dir, number);
        let file = vfs.create_new(&path)?;
        let header = SegmentHeader {
            number,
            epoch,
            created_us: chrono::Utc::now().timestamp_micros(),
        };
        let made = file
            .write_all_at(&header.encode(), 0)
            .and_then(|()| file.sync_data())
            .and_then(|()| vfs.sync_dir(dir));
        if let Err(e) = made {
            // Nothing is in it yet: take it away so that the next attempt starts clean
            // (if this fails too, the next attempt finds it and the store reopens).
            drop(file);
            let _ = vfs.remove_file(&path);
            return Err(e);
        }
        Ok(ActiveSegment {
            number,
            file,
            len: SEGMENT_HEADER_LEN,
        })
    }

    /// Seals the active segment and starts the next one.
    ///
    /// # Errors
    /// Creating the new segment failed.
    pub fn rotate(&mut self) -> io::Result<()> {
        let next = Self::create_segment(&*self.vfs, &self.dir, self.active.number + 1, self.epoch)?;
        self.active = next;
        self.dir_dirty = false;
        Ok(())
    }

    /// Writes `bytes` at the end of the active segment. Not durable until [`Log::sync`].
    ///
    /// # Errors
    /// The write failed (ENOSPC among others); the caller rolls back with [`Log::truncate`].
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<u64> {
        let at = self.active.len;
        self.active.file.write_all_at(bytes, at)?;
        self.active.len += bytes.len() as u64;
        Ok(at)
    }

    /// Cuts the active segment back to `len` (undoing a failed batch).
    ///
    /// # Errors
    /// The truncate failed.
    pub fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.active.len = len;
        self.active.file.set_len(len)
    }

    /// fdatasync of the active segment (and its directory, if it is new).
    ///
    /// # Errors
    /// The sync failed: the store must stop writing and reopen (the kernel may have
    /// dropped the dirty pages, so retrying in place proves nothing).
    pub fn sync(&mut self) -> io::Result<()> {
        self.active.file.sync_data()?;
        if self.dir_dirty {
            self.vfs.sync_dir(&self.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::MessageId;
    use crate::store::record::{encode_record, RecordHeader, KIND_MESSAGE};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// An in-memory file that remembers the largest buffer a read asked it to fill.
    #[derive(Debug, Default)]
    struct Probe {
        bytes: Mutex<Vec<u8>>,
        largest_read: AtomicUsize,
    }

    impl VFile for Probe {
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.lock().unwrap().len() as u64)
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.largest_read.fetch_max(buf.len(), Ordering::Relaxed);
            let b = self.bytes.lock().unwrap();
            let start = usize::try_from(offset).unwrap();
            let src = b
                .get(start..start + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            unreachable!("read-only in these tests")
        }
        fn set_len(&self, _: u64) -> io::Result<()> {
            unreachable!("read-only in these tests")
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(stored_len: u32, payload: &[u8]) -> Vec<u8> {
        let h = RecordHeader {
            kind: KIND_MESSAGE,
            flags: 0,
            codec: 0,
            dict_id: 0,
            key_id: 0,
            stored_len,
            raw_len: stored_len,
            message: MessageId([7; 32]),
        };
        let mut out = Vec::new();
        encode_record(&mut out, &h, payload);
        out
    }

    #[test]
    fn a_valid_record_reads_back() {
        let f = Probe::default();
        *f.bytes.lock().unwrap() = record(5, b"hello");
        let r = read_record(&f, 0).unwrap();
        assert_eq!(r.payload, b"hello");
    }

    #[test]
    fn a_header_declaring_a_gigabyte_in_a_small_file_is_short_without_allocating_it() {
        // A real record's header with its length field rewritten to 1 GiB: the header
        // decodes (the length is within MAX_PAYLOAD), the file holds 70 bytes.
        let mut bytes = record(5, b"hello");
        bytes[16..20].copy_from_slice(&(1u32 << 30).to_le_bytes());
        let f = Probe::default();
        *f.bytes.lock().unwrap() = bytes;
        let e = read_record(&f, 0).err().expect("a short record");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(
            f.largest_read.load(Ordering::Relaxed) <= RECORD_HEADER_LEN,
            "read_record asked for a {} byte buffer",
            f.largest_read.load(Ordering::Relaxed)
        );
        // A scan stops there as at any torn tail.
        let s = scan::<io::Error>(&f, 0, |_| Ok(())).unwrap();
        assert_eq!(s.valid_end, 0);
        assert!(s.stopped.is_some());
    }

    #[test]
    fn a_declared_length_past_u64_is_short_too() {
        let f = Probe::default();
        *f.bytes.lock().unwrap() = vec![0; 10];
        let e = read_declared(&f, u64::MAX - 2, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
