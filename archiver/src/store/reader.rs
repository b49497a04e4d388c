//! Read access for the CLI (and the daemon's own readers).
//!
//! Beside a running daemon the index is opened read-only (redb `SingleWriter` mode, so
//! the reader follows the daemon's commits) and segments are read directly: they are
//! append-only, and the index only points at synced records. With no daemon running the
//! reader opens the store for writing, which runs recovery first.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{ReadTransaction, ReadableDatabase, ReadableTable};

use super::engine::{idx_err, io_err, Engine, INDEX_FILE, LOCK_FILE};
use super::index::{
    self, Loc, ADDRS, ARRIVALS, BY_MESSAGE, BY_TIME, MESSAGES, META, MSGIDS, SUMMARIES,
};
use super::io::{RealVfs, VFile, Vfs};
use super::log::{self, list_segments, segment_path, LOG_DIR};
use super::record::{decode_payload, KIND_ARRIVAL, KIND_MESSAGE, SEGMENT_HEADER_LEN};
use super::summary::Summary;
use super::{Arrival, LookupError, MessageRecord, Query, StoreError, StoreStatus, VerifyReport};
use crate::ids::MessageId;

/// Longest a reader waits for the daemon's index to catch up with its log.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

enum Db {
    /// No daemon: this process holds the store (recovered on open).
    Owned(Box<Engine>),
    /// A daemon holds the store: follow its commits read-only.
    Shared(redb::ReadOnlyDatabase),
}

/// Read access to a store. See the module docs for the two modes.
pub struct StoreReader {
    vfs: Arc<dyn Vfs>,
    log_dir: PathBuf,
    db: Db,
    files: Mutex<HashMap<u32, Arc<dyn VFile>>>,
}

impl StoreReader {
    /// # Errors
    /// [`StoreError::NoStore`] if there is no archive at `data_dir`; open errors.
    pub fn open(data_dir: &Path) -> Result<StoreReader, StoreError> {
        Self::open_with(Arc::new(RealVfs), data_dir)
    }

    /// # Errors
    /// As [`StoreReader::open`].
    pub fn open_with(vfs: Arc<dyn Vfs>, data_dir: &Path) -> Result<StoreReader, StoreError> {
        let index_path = data_dir.join(INDEX_FILE);
        let log_dir = data_dir.join(LOG_DIR);
        if !vfs.exists(&index_path) && !vfs.exists(&log_dir) {
            return Err(StoreError::NoStore(data_dir.to_owned()));
        }
        let lock_path = data_dir.join(LOCK_FILE);
        let free = vfs
            .try_lock(&lock_path)
            .map_err(io_err(&lock_path))?
            .is_some();
        let db = if free {
            match Engine::open(vfs.clone(), data_dir, None) {
                Ok(engine) => Db::Owned(Box::new(engine)),
                Err(StoreError::DaemonRunning(_)) => Db::Shared(open_shared(&index_path)?),
                Err(e) => return Err(e),
            }
        } else {
            Db::Shared(open_shared(&index_path)?)
        };
        Ok(StoreReader {
            vfs,
            log_dir,
            db,
            files: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a daemon holds the store's write lock.
    pub fn daemon_running(&self) -> bool {
        matches!(self.db, Db::Shared(_))
    }

    fn read(&self) -> Result<ReadTransaction, StoreError> {
        match &self.db {
            Db::Owned(e) => e.db.begin_read().map_err(idx_err),
            Db::Shared(db) => self.caught_up(db),
        }
    }

    /// The newest segment and its length: the end of what the daemon has written.
    fn log_end(&self) -> Result<(u32, u64), StoreError> {
        let segments = list_segments(&*self.vfs, &self.log_dir).map_err(io_err(&self.log_dir))?;
        let Some(&last) = segments.last() else {
            return Ok((0, 0));
        };
        let path = segment_path(&self.log_dir, last);
        let len = self
            .vfs
            .open_read(&path)
            .and_then(|f| f.len())
            .map_err(io_err(&path))?;
        Ok((last, len))
    }

    /// A snapshot of the daemon's index that covers everything in the log when this was
    /// called. The daemon acknowledges a message once it is in the log and indexes it
    /// up to a quarter of a second later under load; waiting for the index to reach the log end seen now makes
    /// every message acknowledged before this call visible to it.
    fn caught_up(&self, db: &redb::ReadOnlyDatabase) -> Result<ReadTransaction, StoreError> {
        let mut target = self.log_end()?;
        let deadline = std::time::Instant::now() + CATCH_UP_WAIT;
        loop {
            let txn = db.begin_read().map_err(idx_err)?;
            let tail = {
                let meta = txn.open_table(META).map_err(idx_err)?;
                let seg = u32::try_from(index::meta_u64(&meta, index::K_TAIL_SEG)).unwrap_or(0);
                (seg, index::meta_u64(&meta, index::K_TAIL_OFF))
            };
            if tail >= target || std::time::Instant::now() >= deadline {
                return Ok(txn);
            }
            drop(txn);
            // A failed append is truncated away: never wait for bytes that are gone.
            target = target.min(self.log_end()?);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// # Errors
    /// Index errors.
    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(idx_err)?;
        let epoch = meta
            .get(index::K_EPOCH)
            .map_err(idx_err)?
            .and_then(|v| <[u8; 16]>::try_from(v.value()).ok())
            .map(|e| uuid::Uuid::from_bytes(e).to_string())
            .unwrap_or_default();
        let node = meta
            .get(index::K_NODE)
            .map_err(idx_err)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned())
            .unwrap_or_default();
        Ok(StoreStatus {
            node,
            epoch,
            messages: index::meta_u64(&meta, index::K_MESSAGES),
            arrivals: index::meta_u64(&meta, index::K_ARRIVALS),
            repeats: index::meta_u64(&meta, index::K_REPEATS),
            raw_bytes: index::meta_u64(&meta, index::K_RAW_BYTES),
            stored_bytes: index::meta_u64(&meta, index::K_STORED_BYTES),
        })
    }

    /// Number of messages `verify` will check.
    ///
    /// # Errors
    /// Index errors.
    pub fn message_count(&self) -> Result<u64, StoreError> {
        Ok(self.status()?.messages)
    }

    /// Resolves a full id or a unique prefix of at least 8 hex digits.
    ///
    /// # Errors
    /// Not found, ambiguous, not hex, or a store error.
    pub fn resolve(&self, prefix: &str) -> Result<MessageId, LookupError> {
        let p = prefix.trim().to_ascii_lowercase();
        if p.len() < 8 || p.len() > 64 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LookupError::BadPrefix(prefix.to_owned()));
        }
        let mut lo = [0u8; 32];
        let mut hi = [0xffu8; 32];
        for (i, c) in p.bytes().enumerate() {
            let nib = (c as char).to_digit(16).expect("checked hex") as u8;
            let byte = i / 2;
            if i % 2 == 0 {
                lo[byte] = nib << 4;
                hi[byte] = (nib << 4) | 0x0f;
            } else {
                lo[byte] |= nib;
                hi[byte] = (hi[byte] & 0xf0) | nib;
            }
        }
        let txn = self.read()?;
        let messages = txn.open_table(MESSAGES).map_err(idx_err)?;
        let mut found = Vec::new();
        for entry in messages.range(lo..=hi).map_err(idx_err)? {
            let (k, _) = entry.map_err(idx_err)?;
            found.push(MessageId(k.value()));
            if found.len() > 1 {
                break;
            }
        }
        match found.len() {
            0 => Err(LookupError::NotFound(prefix.to_owned())),
            1 => Ok(found[0]),
            n => Err(LookupError::Ambiguous(prefix.to_owned(), n)),
        }
    }

    fn loc(txn: &ReadTransaction, id: &MessageId) -> Result<Option<Loc>, StoreError> {
        let messages = txn.open_table(MESSAGES).map_err(idx_err)?;
        let v = messages.get(id.0).map_err(idx_err)?;
        match v {
            None => Ok(None),
            Some(v) => Loc::decode(v.value())
                .map(Some)
                .ok_or_else(|| StoreError::Corrupt(format!("bad location for {id}"))),
        }
    }

    fn segment(&self, n: u32) -> Result<Arc<dyn VFile>, StoreError> {
        let mut files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = files.get(&n) {
            return Ok(f.clone());
        }
        let path = segment_path(&self.log_dir, n);
        let f: Arc<dyn VFile> = Arc::from(self.vfs.open_read(&path).map_err(io_err(&path))?);
        files.insert(n, f.clone());
        Ok(f)
    }

    fn read_at(&self, id: &MessageId, loc: Loc) -> Result<Vec<u8>, StoreError> {
        let file = self.segment(loc.segment)?;
        check_blob(&*file, &self.log_dir, id, loc)
    }

    /// The archived bytes, exactly (checked against the id before they are returned).
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the message is missing or damaged.
    pub fn read_message(&self, id: &MessageId) -> Result<Vec<u8>, StoreError> {
        let txn = self.read()?;
        let loc = Self::loc(&txn, id)?
            .ok_or_else(|| StoreError::Corrupt(format!("message {id} is not in the index")))?;
        drop(txn);
        self.read_at(id, loc)
    }

    fn arrivals_in(txn: &ReadTransaction, id: &MessageId) -> Result<Vec<Arrival>, StoreError> {
        let by_msg = txn.open_multimap_table(BY_MESSAGE).map_err(idx_err)?;
        let arrivals = txn.open_table(ARRIVALS).map_err(idx_err)?;
        let mut out = Vec::new();
        for local in by_msg.get(id.0).map_err(idx_err)? {
            let local = local.map_err(idx_err)?.value();
            if let Some(json) = arrivals.get(local).map_err(idx_err)? {
                let a: Arrival = serde_json::from_slice(json.value())
                    .map_err(|e| StoreError::Corrupt(format!("arrival {local}: {e}")))?;
                out.push(a);
            }
        }
        out.sort_by(|a, b| a.time.cmp(&b.time));
        Ok(out)
    }

    /// Every arrival of a message, oldest first.
    ///
    /// # Errors
    /// Index errors.
    pub fn arrivals(&self, id: &MessageId) -> Result<Vec<Arrival>, StoreError> {
        Self::arrivals_in(&self.read()?, id)
    }

    fn record_in(
        txn: &ReadTransaction,
        id: &MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let Some(loc) = Self::loc(txn, id)? else {
            return Ok(None);
        };
        let summaries = txn.open_table(SUMMARIES).map_err(idx_err)?;
        let summary: Summary = match summaries.get(id.0).map_err(idx_err)? {
            Some(v) => serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt(format!("summary of {id}: {e}")))?,
            None => Summary::default(),
        };
        Ok(Some(MessageRecord {
            id: id.to_hex(),
            size: u64::from(loc.raw_len),
            date: summary.date,
            from: summary.from,
            to: summary.to,
            subject: summary.subject,
            message_id: summary.message_id,
            arrivals: Self::arrivals_in(txn, id)?,
        }))
    }

    /// # Errors
    /// [`StoreError::Corrupt`] if the message is not in the index.
    pub fn record(&self, id: &MessageId) -> Result<MessageRecord, StoreError> {
        Self::record_in(&self.read()?, id)?
            .ok_or_else(|| StoreError::Corrupt(format!("message {id} is not in the index")))
    }

    /// Messages matching `query`, newest arrival first.
    ///
    /// # Errors
    /// Index errors.
    pub fn search(&self, q: &Query) -> Result<Vec<MessageRecord>, StoreError> {
        let txn = self.read()?;
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let key_lookup = if let Some(m) = &q.message_id {
            Some((MSGIDS, m.trim().trim_matches(['<', '>']).to_lowercase()))
        } else if let Some(f) = &q.from {
            Some((ADDRS, format!("f:{}", f.trim().to_lowercase())))
        } else {
            q.to.as_ref()
                .map(|t| (ADDRS, format!("t:{}", t.trim().to_lowercase())))
        };
        let mut out = Vec::new();
        if let Some((table, key)) = key_lookup {
            let t = txn.open_multimap_table(table).map_err(idx_err)?;
            let mut ids = BTreeSet::new();
            for v in t.get(key.as_str()).map_err(idx_err)? {
                ids.insert(v.map_err(idx_err)?.value());
            }
            for id in ids {
                if let Some(r) = Self::record_in(&txn, &MessageId(id))? {
                    if matches(&r, q) {
                        out.push(r);
                    }
                }
            }
            out.sort_by(|a, b| latest(b).cmp(latest(a)));
            out.truncate(limit);
        } else {
            let by_time = txn.open_table(BY_TIME).map_err(idx_err)?;
            let lo = (q.since_us.unwrap_or(i64::MIN), 0u64);
            let hi = (q.until_us.unwrap_or(i64::MAX), 0u64);
            let mut seen = BTreeSet::new();
            for entry in by_time.range(lo..hi).map_err(idx_err)?.rev() {
                let (_, v) = entry.map_err(idx_err)?;
                let id = v.value();
                if !seen.insert(id) {
                    continue;
                }
                if let Some(r) = Self::record_in(&txn, &MessageId(id))? {
                    if matches(&r, q) {
                        out.push(r);
                        if out.len() >= limit {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Re-hashes every message; with `deep`, also scans the whole log and checks the index
    /// against it. `progress(done, total)` is called as it goes.
    ///
    /// # Errors
    /// Index errors (damage found is reported in the [`VerifyReport`], not as an error).
    pub fn verify(
        &self,
        deep: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        let txn = self.read()?;
        let mut report = VerifyReport::default();
        let messages = txn.open_table(MESSAGES).map_err(idx_err)?;
        let total = index::table_len(&messages);
        for entry in messages.iter().map_err(idx_err)? {
            let (k, v) = entry.map_err(idx_err)?;
            let id = MessageId(k.value());
            report.messages_checked += 1;
            match Loc::decode(v.value()) {
                Some(loc) => {
                    if let Err(e) = self.read_at(&id, loc) {
                        report.problems.push(e.to_string());
                    }
                }
                None => report
                    .problems
                    .push(format!("message {id}: bad location in the index")),
            }
            progress(report.messages_checked, total);
        }
        let arrivals = txn.open_table(ARRIVALS).map_err(idx_err)?;
        for entry in arrivals.iter().map_err(idx_err)? {
            let (k, v) = entry.map_err(idx_err)?;
            report.arrivals_checked += 1;
            match serde_json::from_slice::<Arrival>(v.value()) {
                Ok(a) => match a.message.parse::<MessageId>() {
                    Ok(m) if messages.get(m.0).map_err(idx_err)?.is_some() => {}
                    _ => report.problems.push(format!(
                        "arrival {}: its message {} is not in the index",
                        a.id, a.message
                    )),
                },
                Err(e) => report
                    .problems
                    .push(format!("arrival #{}: unreadable: {e}", k.value())),
            }
        }
        let meta = txn.open_table(META).map_err(idx_err)?;
        let counted = index::meta_u64(&meta, index::K_MESSAGES);
        if counted != report.messages_checked {
            report.problems.push(format!(
                "the index counts {counted} messages but holds {}",
                report.messages_checked
            ));
        }
        if deep {
            self.verify_log(&txn, &mut report)?;
        }
        Ok(report)
    }

    fn verify_log(
        &self,
        txn: &ReadTransaction,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        let messages = txn.open_table(MESSAGES).map_err(idx_err)?;
        let ids = txn.open_table(index::ARRIVAL_IDS).map_err(idx_err)?;
        let meta = txn.open_table(META).map_err(idx_err)?;
        let tail_seg = u32::try_from(index::meta_u64(&meta, index::K_TAIL_SEG)).unwrap_or(0);
        let tail_off = index::meta_u64(&meta, index::K_TAIL_OFF);
        let segments = list_segments(&*self.vfs, &self.log_dir).map_err(io_err(&self.log_dir))?;
        let mut in_log = BTreeSet::new();
        for n in segments.iter().copied().filter(|&n| n <= tail_seg) {
            let path = segment_path(&self.log_dir, n);
            let file = self.segment(n)?;
            if let Err(e) = log::read_header(&*file) {
                report.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
            let mut problems = Vec::new();
            let scan = log::scan(
                &*file,
                SEGMENT_HEADER_LEN,
                |rec| -> Result<(), StoreError> {
                    let end = rec.offset + rec.header.total_len();
                    if n == tail_seg && end > tail_off {
                        return Ok(()); // written after the snapshot we read: not indexed yet
                    }
                    match rec.header.kind {
                        KIND_MESSAGE => {
                            in_log.insert(rec.header.message.0);
                            if messages
                                .get(rec.header.message.0)
                                .map_err(idx_err)?
                                .is_none()
                            {
                                problems.push(format!(
                                    "{} at {}: message {} is in the log but not in the index",
                                    path.display(),
                                    rec.offset,
                                    rec.header.message
                                ));
                            }
                        }
                        KIND_ARRIVAL => match serde_json::from_slice::<Arrival>(&rec.payload) {
                            Ok(a) => {
                                if ids
                                    .get(a.id.to_string().as_str())
                                    .map_err(idx_err)?
                                    .is_none()
                                {
                                    problems.push(format!(
                                        "{} at {}: arrival {} is in the log but not in the index",
                                        path.display(),
                                        rec.offset,
                                        a.id
                                    ));
                                }
                            }
                            Err(e) => problems.push(format!(
                                "{} at {}: unreadable arrival record: {e}",
                                path.display(),
                                rec.offset
                            )),
                        },
                        _ => {}
                    }
                    Ok(())
                },
            )?;
            report.problems.append(&mut problems);
            let indexed_end = if n == tail_seg {
                tail_off
            } else {
                scan.file_len
            };
            if scan.valid_end < indexed_end {
                report.problems.push(format!(
                    "{}: damaged at offset {}: {}",
                    path.display(),
                    scan.valid_end,
                    scan.stopped.unwrap_or_default()
                ));
            }
        }
        for entry in messages.iter().map_err(idx_err)? {
            let (k, _) = entry.map_err(idx_err)?;
            if !in_log.contains(&k.value()) {
                report.problems.push(format!(
                    "message {} is in the index but not in the log",
                    MessageId(k.value())
                ));
            }
        }
        Ok(())
    }
}

fn open_shared(path: &Path) -> Result<redb::ReadOnlyDatabase, StoreError> {
    let mut b = redb::Builder::new();
    b.set_cache_size(super::engine::READER_CACHE_BYTES);
    b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    b.open_read_only(path).map_err(|e| match e {
        // The daemon holds the store but its index is mid-recovery (a commit failed, e.g.
        // on a full disk, and the reopen that repairs it has not succeeded yet).
        redb::DatabaseError::RepairAborted => StoreError::Unavailable(
            "the daemon's index needs repair after a failed write; the daemon repairs it as \
             soon as it can write again (is the disk full? see its log). Nothing \
             acknowledged is lost: it is all in the log."
                .into(),
        ),
        e => idx_err(e),
    })
}

fn latest(r: &MessageRecord) -> &str {
    r.arrivals
        .iter()
        .map(|a| a.time.as_str())
        .max()
        .unwrap_or("")
}

fn addr_matches(pattern: &str, addr: &str) -> bool {
    let p = pattern.trim().to_lowercase();
    let a = addr.to_lowercase();
    if p.starts_with('@') {
        a.ends_with(&p)
    } else {
        a == p
    }
}

/// Whether a record matches every filter of the query.
fn matches(r: &MessageRecord, q: &Query) -> bool {
    if let Some(f) = &q.from {
        let hit = r.from.iter().any(|a| addr_matches(f, a))
            || r.arrivals.iter().any(|a| addr_matches(f, &a.mail_from));
        if !hit {
            return false;
        }
    }
    if let Some(t) = &q.to {
        let hit = r.to.iter().any(|a| addr_matches(t, a))
            || r.arrivals
                .iter()
                .flat_map(|a| a.rcpt_to.iter())
                .any(|a| addr_matches(t, a));
        if !hit {
            return false;
        }
    }
    if let Some(s) = &q.subject {
        let needle = s.to_lowercase();
        if !r
            .subject
            .as_ref()
            .is_some_and(|x| x.to_lowercase().contains(&needle))
        {
            return false;
        }
    }
    if let Some(m) = &q.message_id {
        let m = m.trim().trim_matches(['<', '>']).to_lowercase();
        if r.message_id.as_ref().map(|x| x.to_lowercase()) != Some(m) {
            return false;
        }
    }
    if q.since_us.is_some() || q.until_us.is_some() {
        let lo = q.since_us.unwrap_or(i64::MIN);
        let hi = q.until_us.unwrap_or(i64::MAX);
        if !r.arrivals.iter().any(|a| {
            let t = index::time_us(&a.time);
            lo <= t && t < hi
        }) {
            return false;
        }
    }
    true
}

/// Reads the blob of message `id` at `loc` (opening its segment), checked against the id.
///
/// # Errors
/// [`StoreError::Corrupt`] if the record is missing, damaged or not that message's.
pub fn read_blob(
    vfs: &dyn Vfs,
    log_dir: &Path,
    id: &MessageId,
    loc: Loc,
) -> Result<Vec<u8>, StoreError> {
    let path = segment_path(log_dir, loc.segment);
    let file = vfs.open_read(&path).map_err(io_err(&path))?;
    check_blob(&*file, log_dir, id, loc)
}

fn check_blob(
    file: &dyn VFile,
    log_dir: &Path,
    id: &MessageId,
    loc: Loc,
) -> Result<Vec<u8>, StoreError> {
    let path = segment_path(log_dir, loc.segment);
    let rec = log::read_record(file, loc.offset).map_err(|e| {
        StoreError::Corrupt(format!(
            "{} at {}: {e} (message {id})",
            path.display(),
            loc.offset
        ))
    })?;
    if rec.header.kind != KIND_MESSAGE || rec.header.message != *id {
        return Err(StoreError::Corrupt(format!(
            "{} at {}: not the blob of message {id}",
            path.display(),
            loc.offset
        )));
    }
    let raw = decode_payload(&rec.header, &rec.payload)
        .map_err(|e| StoreError::Corrupt(format!("message {id}: {e}")))?;
    if MessageId::of(&raw) != *id {
        return Err(StoreError::Corrupt(format!(
            "message {id}: bytes do not hash to the id"
        )));
    }
    Ok(raw)
}
