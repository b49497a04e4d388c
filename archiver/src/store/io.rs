//! The file layer: every byte the store reads or writes goes through [`Vfs`].
//!
//! Two implementations: [`RealVfs`] on the real filesystem, and
//! [`fault::FaultVfs`](super::fault::FaultVfs), an in-memory filesystem that tracks
//! written versus synced bytes and can lose power at any sync, or answer ENOSPC and EIO
//! on demand. The power-loss property test runs the real store code on the latter.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One open file. Positional reads and writes only: the log is append-only and each
/// writer knows its offsets.
#[allow(clippy::len_without_is_empty)]
pub trait VFile: Send + Sync + Debug {
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; a short file is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync: the file's data (and the metadata needed to read it) reach the disk.
    fn sync_data(&self) -> io::Result<()>;
}

/// A lock held on a store (released on drop).
pub trait StoreLock: Send + Debug {}

/// The filesystem as the store sees it.
pub trait Vfs: Send + Sync + Debug + 'static {
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (not paths).
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    fn exists(&self, path: &Path) -> bool;
    /// Opens an existing file read-write.
    fn open(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    /// Opens an existing file for reading only.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    /// Creates a new file; fails if it exists. The new name is durable only after
    /// [`Vfs::sync_dir`] on its directory.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` if it exists. Durable only after [`Vfs::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsync of a directory: makes created, renamed and removed names durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Bytes available to an unprivileged writer on the filesystem holding `path`.
    fn free_space(&self, path: &Path) -> io::Result<u64>;
    /// Takes the store's writer lock without waiting; `Ok(None)` if another process holds it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StoreLock>>>;
    /// A redb storage backend for `path`, or `None` to let redb open the real file itself
    /// (with its multi-process byte-range locks, which the daemon and CLI need).
    fn index_backend(&self, path: &Path) -> io::Result<Option<Box<dyn redb::StorageBackend>>>;
    /// Whether `index.redb` is a real file redb opens itself (see
    /// [`Vfs::index_backend`]), so that the daemon can rewrite it in place.
    fn index_is_real_file(&self) -> bool {
        true
    }
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealVfs;

#[derive(Debug)]
struct RealFile(File);

impl VFile for RealFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

#[derive(Debug)]
struct FlockGuard(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl StoreLock for FlockGuard {}

impl Vfs for RealVfs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn open(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        Ok(Box::new(RealFile(File::open(path)?)))
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
    fn free_space(&self, path: &Path) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        #[allow(clippy::unnecessary_cast)]
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn StoreLock>>> {
        use nix::fcntl::{Flock, FlockArg};
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(guard) => Ok(Some(Box::new(FlockGuard(guard)))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(io::Error::from(e)),
        }
    }
    fn index_backend(&self, _path: &Path) -> io::Result<Option<Box<dyn redb::StorageBackend>>> {
        Ok(None)
    }
}

/// A boxed redb backend, as redb wants a sized one.
#[derive(Debug)]
pub struct DynBackend(pub Box<dyn redb::StorageBackend>);

impl redb::StorageBackend for DynBackend {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux keeps a nice value
/// per thread), so background work — the index stage, compaction — takes the CPU time
/// the acknowledging path (sessions, the log stage) leaves. A failure is logged and
/// otherwise ignored: the thread just keeps its priority.
#[allow(unsafe_code)]
pub fn lower_thread_priority(nice: i32, what: &str) {
    // SAFETY: setpriority(2) takes plain integers; with PRIO_PROCESS and 0 Linux changes
    // the calling thread's nice value only.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if r != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "could not lower the {what}'s priority");
    }
}
