//! A filesystem that can break: in memory, tracking written versus synced bytes.
//!
//! [`FaultVfs`] keeps, for every file, the bytes a process would read (`live`) and the
//! bytes that would survive a power cut (`durable`: what the last completed sync saw),
//! and, for names, which ones a directory sync made durable. It can
//!
//! * lose power at the Nth sync ([`FaultVfs::crash_at_sync`]): that sync fails, and every
//!   later call fails with EIO until [`FaultVfs::power_loss`] builds the image a real
//!   disk would hold — synced bytes, plus a random prefix of any unsynced tail of an
//!   append-only log segment (a torn write) — and lets the store reopen;
//! * answer ENOSPC to writes that grow a file ([`FaultVfs::set_enospc`]);
//! * answer EIO to syncs ([`FaultVfs::set_sync_eio`]).
//!
//! Names follow directory syncs: a created or renamed-to name not yet made durable
//! vanishes at a power cut, and a removed or renamed-from name whose removal was not made
//! durable comes back (with its synced bytes), as on a real disk.
//!
//! Used by the power-loss property test and by unit tests of error handling.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::io::{StoreLock, VFile, Vfs};

#[derive(Default)]
struct FileState {
    live: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct State {
    files: HashMap<PathBuf, Arc<Mutex<FileState>>>,
    durable_names: HashSet<PathBuf>,
    /// Durable names removed (or renamed away) since their directory's last sync: a power
    /// cut brings them back.
    removed: HashMap<PathBuf, Arc<Mutex<FileState>>>,
    dirs: HashSet<PathBuf>,
    syncs: u64,
    crash_at: Option<u64>,
    crashed: bool,
    enospc: bool,
    sync_eio: bool,
    torn_seed: u64,
}

/// An in-memory filesystem with power loss and error injection. Cheap to clone; clones
/// share the same disk.
#[derive(Clone, Default)]
pub struct FaultVfs {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for FaultVfs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultVfs")
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected EIO: {what}"))
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FaultVfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loses power when the `n`th sync from now (1 = the next) is attempted.
    pub fn crash_at_sync(&self, n: u64) {
        let mut s = lock(&self.state);
        s.crash_at = Some(s.syncs + n);
    }

    /// Whether power has been lost (every call fails until [`FaultVfs::power_loss`]).
    pub fn crashed(&self) -> bool {
        lock(&self.state).crashed
    }

    /// Syncs attempted so far.
    pub fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }

    pub fn set_enospc(&self, on: bool) {
        lock(&self.state).enospc = on;
    }

    pub fn set_sync_eio(&self, on: bool) {
        lock(&self.state).sync_eio = on;
    }

    /// Cuts the power: every file goes back to its durable bytes (a segment keeps a random
    /// prefix of its unsynced tail, as a torn write would), names not made durable by a
    /// directory sync disappear, and the disk works again. `seed` picks the torn tails.
    pub fn power_loss(&self, seed: u64) {
        let mut s = lock(&self.state);
        s.torn_seed = seed;
        let names: Vec<PathBuf> = s.files.keys().cloned().collect();
        let removed: Vec<(PathBuf, Arc<Mutex<FileState>>)> = s.removed.drain().collect();
        let mut rng = seed | 1;
        for name in names {
            if !s.durable_names.contains(&name) {
                s.files.remove(&name);
                continue;
            }
            let file = s.files[&name].clone();
            let mut f = lock(&file);
            let mut image = f.durable.clone();
            let is_segment = name.extension().is_some_and(|e| e == "seg");
            if is_segment && f.live.len() > f.durable.len() && f.live.starts_with(&f.durable) {
                // xorshift: deterministic per seed
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let extra = f.live.len() - f.durable.len();
                let keep = usize::try_from(rng % (extra as u64 + 1)).unwrap_or(0);
                image.extend_from_slice(&f.live[f.durable.len()..f.durable.len() + keep]);
            }
            f.live.clone_from(&image);
            f.durable = image;
        }
        for (name, file) in removed {
            if s.durable_names.contains(&name) && !s.files.contains_key(&name) {
                let durable = lock(&file).durable.clone();
                let back = FileState {
                    live: durable.clone(),
                    durable,
                };
                s.files.insert(name, Arc::new(Mutex::new(back)));
            }
        }
        s.crashed = false;
        s.crash_at = None;
        s.enospc = false;
        s.sync_eio = false;
    }

    /// The live bytes of a file (for tests that corrupt or inspect the disk).
    pub fn file_bytes(&self, path: &Path) -> Option<Vec<u8>> {
        let s = lock(&self.state);
        s.files.get(path).map(|f| lock(f).live.clone())
    }

    /// Overwrites a file's bytes, live and durable (a test corrupting the disk).
    pub fn put_file_bytes(&self, path: &Path, bytes: Vec<u8>) {
        let mut s = lock(&self.state);
        let file = s.files.entry(path.to_owned()).or_default().clone();
        s.durable_names.insert(path.to_owned());
        let mut f = lock(&file);
        f.live.clone_from(&bytes);
        f.durable = bytes;
    }

    fn check_alive(&self) -> io::Result<()> {
        if lock(&self.state).crashed {
            return Err(eio("power lost"));
        }
        Ok(())
    }

    fn file(&self, path: &Path) -> io::Result<FaultFile> {
        self.check_alive()?;
        let s = lock(&self.state);
        match s.files.get(path) {
            Some(f) => Ok(FaultFile {
                vfs: self.clone(),
                file: f.clone(),
                name: path.to_owned(),
            }),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                path.display().to_string(),
            )),
        }
    }

    /// Counts a sync; returns an error if this sync is where power is lost or EIO is due.
    fn sync_point(&self, what: &str) -> io::Result<()> {
        let mut s = lock(&self.state);
        if s.crashed {
            return Err(eio("power lost"));
        }
        s.syncs += 1;
        if s.crash_at.is_some_and(|n| s.syncs >= n) {
            s.crashed = true;
            return Err(eio(&format!("power lost at sync of {what}")));
        }
        if s.sync_eio {
            return Err(eio(&format!("sync of {what}")));
        }
        Ok(())
    }
}

/// An open file of a [`FaultVfs`].
pub struct FaultFile {
    vfs: FaultVfs,
    file: Arc<Mutex<FileState>>,
    name: PathBuf,
}

impl fmt::Debug for FaultFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultFile({})", self.name.display())
    }
}

impl VFile for FaultFile {
    fn len(&self) -> io::Result<u64> {
        self.vfs.check_alive()?;
        Ok(lock(&self.file).live.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.vfs.check_alive()?;
        let f = lock(&self.file);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        match f.live.get(start..start + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.vfs.check_alive()?;
        let enospc_on = lock(&self.vfs.state).enospc;
        let mut f = lock(&self.file);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start + buf.len();
        if end > f.live.len() {
            if enospc_on {
                return Err(enospc());
            }
            f.live.resize(end, 0);
        }
        f.live[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.vfs.check_alive()?;
        let enospc_on = lock(&self.vfs.state).enospc;
        let mut f = lock(&self.file);
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        if len > f.live.len() && enospc_on {
            return Err(enospc());
        }
        f.live.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.vfs.sync_point(&self.name.display().to_string())?;
        let mut f = lock(&self.file);
        f.durable = f.live.clone();
        Ok(())
    }
}

/// redb's view of a [`FaultFile`].
#[derive(Debug)]
struct FaultBackend(FaultFile);

impl redb::StorageBackend for FaultBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_exact_at(out, offset)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_all_at(data, offset)
    }
}

#[derive(Debug)]
struct NoLock;
impl StoreLock for NoLock {}

impl Vfs for FaultVfs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut s = lock(&self.state);
        let mut p = Some(path);
        while let Some(dir) = p {
            s.dirs.insert(dir.to_owned());
            p = dir.parent();
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.check_alive()?;
        let s = lock(&self.state);
        if !s.dirs.contains(path) {
            return Err(io::ErrorKind::NotFound.into());
        }
        let mut names: Vec<String> = s
            .files
            .keys()
            .chain(s.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        let s = lock(&self.state);
        s.files.contains_key(path) || s.dirs.contains(path)
    }

    fn open(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        Ok(Box::new(self.file(path)?))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        Ok(Box::new(self.file(path)?))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VFile>> {
        self.check_alive()?;
        {
            let mut s = lock(&self.state);
            if s.files.contains_key(path) {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            // A name created again over an unsynced removal: the new file is what the
            // name will hold once its directory is synced; until then neither is sure.
            s.removed.remove(path);
            s.durable_names.remove(path);
            if s.enospc {
                return Err(enospc());
            }
            s.files.insert(path.to_owned(), Arc::default());
        }
        self.open(path)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut s = lock(&self.state);
        let file = s.files.remove(path).ok_or(io::ErrorKind::NotFound)?;
        if s.durable_names.contains(path) {
            s.removed.entry(path.to_owned()).or_insert(file);
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check_alive()?;
        let mut s = lock(&self.state);
        let file = s.files.remove(from).ok_or(io::ErrorKind::NotFound)?;
        if s.durable_names.contains(from) {
            s.removed
                .entry(from.to_owned())
                .or_insert_with(|| file.clone());
        }
        if let Some(old) = s.files.insert(to.to_owned(), file) {
            if s.durable_names.contains(to) {
                s.removed.entry(to.to_owned()).or_insert(old);
            }
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.sync_point(&path.display().to_string())?;
        let mut s = lock(&self.state);
        let live: Vec<PathBuf> = s
            .files
            .keys()
            .filter(|p| p.parent() == Some(path))
            .cloned()
            .collect();
        s.durable_names.retain(|p| p.parent() != Some(path));
        s.durable_names.extend(live);
        s.removed.retain(|p, _| p.parent() != Some(path));
        Ok(())
    }

    fn free_space(&self, _path: &Path) -> io::Result<u64> {
        self.check_alive()?;
        Ok(if lock(&self.state).enospc {
            0
        } else {
            u64::MAX / 2
        })
    }

    fn try_lock(&self, _path: &Path) -> io::Result<Option<Box<dyn StoreLock>>> {
        Ok(Some(Box::new(NoLock)))
    }

    fn index_is_real_file(&self) -> bool {
        false
    }

    fn index_backend(&self, path: &Path) -> io::Result<Option<Box<dyn redb::StorageBackend>>> {
        if !self.exists(path) {
            self.create_new(path)?;
        }
        Ok(Some(Box::new(FaultBackend(self.file(path)?))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_bytes_and_names_vanish_at_power_loss() {
        let vfs = FaultVfs::new();
        let dir = Path::new("/d");
        vfs.create_dir_all(dir).unwrap();
        let a = vfs.create_new(&dir.join("a")).unwrap();
        a.write_all_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        vfs.sync_dir(dir).unwrap();
        a.write_all_at(b" world", 5).unwrap();
        let b = vfs.create_new(&dir.join("b")).unwrap();
        b.write_all_at(b"x", 0).unwrap();
        b.sync_data().unwrap();
        vfs.power_loss(7);
        assert_eq!(vfs.file_bytes(&dir.join("a")).unwrap(), b"hello");
        assert!(!vfs.exists(&dir.join("b")), "name never made durable");
    }

    #[test]
    fn crash_at_sync_fails_that_sync_and_everything_after() {
        let vfs = FaultVfs::new();
        vfs.create_dir_all(Path::new("/d")).unwrap();
        let a = vfs.create_new(Path::new("/d/a")).unwrap();
        vfs.sync_dir(Path::new("/d")).unwrap();
        vfs.crash_at_sync(1);
        a.write_all_at(b"abc", 0).unwrap();
        assert!(a.sync_data().is_err());
        assert!(vfs.crashed());
        assert!(a.write_all_at(b"d", 3).is_err());
        vfs.power_loss(1);
        assert_eq!(vfs.file_bytes(Path::new("/d/a")).unwrap(), b"");
    }

    #[test]
    fn unsynced_removal_and_rename_come_back_at_power_loss() {
        let vfs = FaultVfs::new();
        let dir = Path::new("/d");
        vfs.create_dir_all(dir).unwrap();
        for name in ["a", "b"] {
            let f = vfs.create_new(&dir.join(name)).unwrap();
            f.write_all_at(name.as_bytes(), 0).unwrap();
            f.sync_data().unwrap();
        }
        vfs.sync_dir(dir).unwrap();
        vfs.remove_file(&dir.join("a")).unwrap();
        vfs.rename(&dir.join("b"), &dir.join("c")).unwrap();
        assert!(!vfs.exists(&dir.join("a")) && vfs.exists(&dir.join("c")));
        vfs.power_loss(3);
        assert_eq!(vfs.file_bytes(&dir.join("a")).unwrap(), b"a");
        assert_eq!(vfs.file_bytes(&dir.join("b")).unwrap(), b"b");
        assert!(!vfs.exists(&dir.join("c")));
        vfs.rename(&dir.join("b"), &dir.join("c")).unwrap();
        vfs.remove_file(&dir.join("a")).unwrap();
        vfs.sync_dir(dir).unwrap();
        vfs.power_loss(4);
        assert!(!vfs.exists(&dir.join("a")) && !vfs.exists(&dir.join("b")));
        assert_eq!(vfs.file_bytes(&dir.join("c")).unwrap(), b"b");
    }

    #[test]
    fn enospc_only_refuses_growth() {
        let vfs = FaultVfs::new();
        vfs.create_dir_all(Path::new("/d")).unwrap();
        let a = vfs.create_new(Path::new("/d/a")).unwrap();
        a.write_all_at(b"abc", 0).unwrap();
        vfs.set_enospc(true);
        assert_eq!(
            a.write_all_at(b"d", 3).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        a.write_all_at(b"x", 0).unwrap();
    }
}
