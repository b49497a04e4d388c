//! zstd dictionaries trained on the archive's own mail (docs/store-format.md
//! "Compacted segments").
//!
//! `DATA_DIR/dict/NNNNNNNN.dict`: a 24-byte header (magic `COFFDICT`, id u32, length
//! u32, CRC-32C of the dictionary u32, reserved u32) and the zstd dictionary. A file is
//! written under `.tmp`, synced, renamed into place and its folder synced before any
//! record or block names its id; it is never rewritten nor deleted afterwards.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::io::Vfs;

pub const DICT_DIR: &str = "dict";
const MAGIC: &[u8; 8] = b"COFFDICT";
const HEADER_LEN: usize = 24;
/// Size of a trained dictionary (design.md §3 measured 110 KB).
pub const DICT_SIZE: usize = 110 << 10;
/// Most messages sampled to train one.
pub const MAX_SAMPLES: usize = 4000;
/// Most sample bytes (each message counts at most its first 16 KiB).
pub const MAX_SAMPLE_BYTES: usize = 8 << 20;
pub const SAMPLE_PREFIX: usize = 16 << 10;
/// Fewer samples than this train no dictionary (zstd needs a few hundred).
pub const MIN_SAMPLES: usize = 200;

/// A dictionary and its id.
pub type Dict = (u32, Arc<Vec<u8>>);

pub fn dict_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.dict"))
}

/// The dictionaries of one store, loaded on first use and kept (they never change).
#[derive(Debug)]
pub struct Dicts {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    cache: Mutex<HashMap<u32, Arc<Vec<u8>>>>,
}

impl Dicts {
    pub fn new(vfs: Arc<dyn Vfs>, data_dir: &Path) -> Self {
        Self {
            vfs,
            dir: data_dir.join(DICT_DIR),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Dictionary `id`, checked.
    ///
    /// # Errors
    /// It is missing or damaged (what it says names the file).
    pub fn get(&self, id: u32) -> Result<Arc<Vec<u8>>, String> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = cache.get(&id) {
            return Ok(d.clone());
        }
        let path = dict_path(&self.dir, id);
        let d = Arc::new(read(&*self.vfs, &path, id).map_err(|e| {
            format!(
                "zstd dictionary {id} ({}) cannot be read: {e}",
                path.display()
            )
        })?);
        cache.insert(id, d.clone());
        Ok(d)
    }

    /// The ids present, ascending.
    ///
    /// # Errors
    /// The folder cannot be read.
    pub fn ids(&self) -> io::Result<Vec<u32>> {
        if !self.vfs.exists(&self.dir) {
            return Ok(Vec::new());
        }
        let mut ids: Vec<u32> = self
            .vfs
            .read_dir(&self.dir)?
            .iter()
            .filter_map(|n| n.strip_suffix(".dict")?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The newest dictionary, if there is one.
    ///
    /// # Errors
    /// The folder cannot be read, or that dictionary is damaged.
    pub fn newest(&self) -> Result<Option<Dict>, String> {
        let ids = self.ids().map_err(|e| e.to_string())?;
        match ids.last() {
            Some(&id) => Ok(Some((id, self.get(id)?))),
            None => Ok(None),
        }
    }

    /// Removes what an interrupted [`Dicts::add`] left (`*.tmp`).
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_leftovers(&self) -> io::Result<()> {
        if !self.vfs.exists(&self.dir) {
            return Ok(());
        }
        let mut removed = false;
        for name in self.vfs.read_dir(&self.dir)? {
            if name.ends_with(".tmp") {
                self.vfs.remove_file(&self.dir.join(name))?;
                removed = true;
            }
        }
        if removed {
            self.vfs.sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Stores `dict` durably under the next free id and returns the id.
    ///
    /// # Errors
    /// I/O errors: then nothing refers to the new id.
    pub fn add(&self, dict: Vec<u8>) -> io::Result<u32> {
        let id = self.ids()?.last().map_or(1, |n| n + 1);
        let fresh = !self.vfs.exists(&self.dir);
        self.vfs.create_dir_all(&self.dir)?;
        if fresh {
            if let Some(parent) = self.dir.parent() {
                self.vfs.sync_dir(parent)?;
            }
        }
        let path = dict_path(&self.dir, id);
        let tmp = path.with_extension("dict.tmp");
        if self.vfs.exists(&tmp) {
            self.vfs.remove_file(&tmp)?;
        }
        let len = u32::try_from(dict.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut b = Vec::with_capacity(HEADER_LEN + dict.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&crc32c::crc32c(&dict).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&dict);
        let f = self.vfs.create_new(&tmp)?;
        f.write_all_at(&b, 0)?;
        f.sync_data()?;
        drop(f);
        self.vfs.rename(&tmp, &path)?;
        self.vfs.sync_dir(&self.dir)?;
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, Arc::new(dict));
        Ok(id)
    }
}

fn read(vfs: &dyn Vfs, path: &Path, id: u32) -> io::Result<Vec<u8>> {
    let f = vfs.open_read(path)?;
    let len = usize::try_from(f.len()?).map_err(|_| io::ErrorKind::InvalidData)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    if len < HEADER_LEN {
        return Err(bad("short file"));
    }
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, 0)?;
    let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
    if &b[0..8] != MAGIC {
        return Err(bad("bad magic"));
    }
    let (file_id, dict_len, crc) = (u(8), u(12), u(16));
    if file_id != id || dict_len as usize != len - HEADER_LEN {
        return Err(bad("header does not match the file"));
    }
    let dict = b.split_off(HEADER_LEN);
    if crc32c::crc32c(&dict) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(dict)
}

/// Trains a dictionary on `samples` (messages), or says why not.
///
/// # Errors
/// Too few samples, or zstd refused.
pub fn train(samples: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    if samples.len() < MIN_SAMPLES {
        return Err(format!(
            "{} messages are too few to train a dictionary on (at least {MIN_SAMPLES})",
            samples.len()
        ));
    }
    zstd::dict::from_samples(samples, DICT_SIZE).map_err(|e| format!("training: {e}"))
}
