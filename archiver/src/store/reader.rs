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

use super::catalog::{self, Catalogs, TermFilter};
use super::codec;
use super::compact::{self, DecodedBlock};
use super::dict::Dicts;
use super::engine::{idx_err, io_err, Engine, INDEX_FILE, LOCK_FILE};
use super::index::{self, Loc, Term, ADDRS, BY_TIME, MESSAGES, META, MSGIDS, SEGMENT_FILTERS};
use super::io::{RealVfs, VFile, Vfs};
use super::log::{self, blk_path, list_log, segment_path, LOG_DIR};
use super::record::{decode_payload, DictLookup, KIND_ARRIVAL, KIND_MESSAGE, SEGMENT_HEADER_LEN};
use super::{Arrival, LookupError, MessageRecord, Query, StoreError, StoreStatus, VerifyReport};
use crate::ids::MessageId;

/// Longest a reader waits for the daemon's index to catch up with its log.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Index entries `verify` sorts by location at a time, so that each block is decoded
/// about once per chunk rather than once per message.
const VERIFY_CHUNK: usize = 65_536;

/// A decoded block and where it is: (segment, offset).
pub(crate) type CachedBlock = ((u32, u64), Arc<DecodedBlock>);

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
    /// Open files by (segment, compacted).
    files: Mutex<HashMap<(u32, bool), Arc<dyn VFile>>>,
    dicts: Dicts,
    /// The last block decoded, by (segment, offset): consecutive messages share it.
    block: Mutex<Option<CachedBlock>>,
    /// The catalogs of compacted segments decoded last.
    catalogs: Catalogs,
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
            dicts: Dicts::new(vfs.clone(), data_dir),
            catalogs: Catalogs::new(vfs.clone(), log_dir.clone()),
            vfs,
            log_dir,
            db,
            files: Mutex::new(HashMap::new()),
            block: Mutex::new(None),
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
        let segments =
            super::log::list_segments(&*self.vfs, &self.log_dir).map_err(io_err(&self.log_dir))?;
        let Some(&last) = segments.last() else {
            return Ok((0, 0));
        };
        let path = segment_path(&self.log_dir, last);
        let len = match self.vfs.open_read(&path).and_then(|f| f.len()) {
            Ok(len) => len,
            // Compacted: sealed, below the index's tail.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok((last, len))
    }

    /// A snapshot of the daemon's index that covers everything in the log when this was
    /// called. The daemon acknowledges a message once it is in the log and indexes it a
    /// few milliseconds later; waiting for the index to reach the log end seen now makes
    /// every message acknowledged before this call visible to it.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the index does not catch up within
    /// [`CATCH_UP_WAIT`] (its commits are failing, e.g. on a full disk): an older
    /// snapshot could answer "not found" for a message that was acknowledged.
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
            if tail >= target {
                return Ok(txn);
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "the daemon's index has not caught up with its log for {} s (indexed \
                     to segment {} offset {}, the log ends at segment {} offset {}): its \
                     index commits are failing or stalled (is the disk full? see its log). \
                     Nothing acknowledged is lost: it is all in the log; try again once \
                     the daemon can write.",
                    CATCH_UP_WAIT.as_secs(),
                    tail.0,
                    tail.1,
                    target.0,
                    target.1
                )));
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

    fn file(&self, n: u32, blk: bool) -> Result<Arc<dyn VFile>, StoreError> {
        let mut files = self
            .files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = files.get(&(n, blk)) {
            return Ok(f.clone());
        }
        let path = if blk {
            blk_path(&self.log_dir, n)
        } else {
            segment_path(&self.log_dir, n)
        };
        let f: Arc<dyn VFile> = Arc::from(self.vfs.open_read(&path).map_err(io_err(&path))?);
        files.insert((n, blk), f.clone());
        Ok(f)
    }

    fn read_at(&self, id: &MessageId, loc: Loc) -> Result<Vec<u8>, StoreError> {
        let Some(position) = loc.position else {
            let file = self.file(loc.segment, false)?;
            let lookup = |d| self.dicts.get(d);
            return check_blob(&*file, &self.log_dir, id, loc, &lookup);
        };
        let key = (loc.segment, loc.offset);
        let cached = self
            .block
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, b)| b.clone());
        let block = match cached {
            Some(b) => b,
            None => {
                let file = self.file(loc.segment, true)?;
                let lookup = |d| self.dicts.get(d);
                let b = Arc::new(load_block(&*file, &self.log_dir, id, loc, &lookup)?);
                *self
                    .block
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((key, b.clone()));
                b
            }
        };
        block_message(&block, &self.log_dir, id, loc, position)
    }

    /// [`StoreReader::read_at`], taking the location anew from the index when the file
    /// it names is gone (a compaction replaced it after the snapshot was taken).
    fn read_fresh(&self, id: &MessageId, mut loc: Loc) -> Result<Vec<u8>, StoreError> {
        for _ in 0..3 {
            match self.read_at(id, loc) {
                Err(e) if is_gone(&e) => {
                    let txn = self.read()?;
                    match Self::loc(&txn, id)? {
                        Some(l) if l != loc => loc = l,
                        _ => return Err(e),
                    }
                }
                r => return r,
            }
        }
        self.read_at(id, loc)
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
        self.read_fresh(id, loc)
    }

    /// The arrivals of message `id`, located at `loc`, oldest first.
    fn arrivals_at(
        &self,
        txn: &ReadTransaction,
        id: &MessageId,
        loc: Loc,
    ) -> Result<Vec<Arrival>, StoreError> {
        let mut out = Vec::new();
        for local in catalog::locals_of(txn, &self.catalogs, id, loc)? {
            if let Some(a) = catalog::arrival(txn, &self.catalogs, local)? {
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
        let txn = self.read()?;
        match Self::loc(&txn, id)? {
            Some(loc) => self.arrivals_at(&txn, id, loc),
            None => Ok(Vec::new()),
        }
    }

    fn record_in(
        &self,
        txn: &ReadTransaction,
        id: &MessageId,
    ) -> Result<Option<MessageRecord>, StoreError> {
        match Self::loc(txn, id)? {
            Some(loc) => self.record_at(txn, id, loc).map(Some),
            None => Ok(None),
        }
    }

    /// The record of message `id`, located at `loc`.
    fn record_at(
        &self,
        txn: &ReadTransaction,
        id: &MessageId,
        loc: Loc,
    ) -> Result<MessageRecord, StoreError> {
        let summary = catalog::summary(txn, &self.catalogs, id, loc)?.unwrap_or_default();
        Ok(MessageRecord {
            id: id.to_hex(),
            size: u64::from(loc.raw_len),
            date: summary.date,
            from: summary.from,
            to: summary.to,
            subject: summary.subject,
            message_id: summary.message_id,
            arrivals: self.arrivals_at(txn, id, loc)?,
        })
    }

    /// # Errors
    /// [`StoreError::Corrupt`] if the message is not in the index.
    pub fn record(&self, id: &MessageId) -> Result<MessageRecord, StoreError> {
        self.record_in(&self.read()?, id)?
            .ok_or_else(|| StoreError::Corrupt(format!("message {id} is not in the index")))
    }

    /// Messages matching `query`, newest arrival first. Searches the index's rows and the
    /// catalogs of compacted segments.
    ///
    /// # Errors
    /// Index errors.
    pub fn search(&self, q: &Query) -> Result<Vec<MessageRecord>, StoreError> {
        let txn = self.read()?;
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let term = if let Some(m) = &q.message_id {
            Some(Term::MsgId(
                m.trim().trim_matches(['<', '>']).to_lowercase(),
            ))
        } else if let Some(f) = &q.from {
            Some(Term::Addr(format!("f:{}", f.trim().to_lowercase())))
        } else {
            q.to.as_ref()
                .map(|t| Term::Addr(format!("t:{}", t.trim().to_lowercase())))
        };
        let cataloged = catalog::cataloged(&txn)?;
        let mut out = Vec::new();
        if let Some(term) = term {
            let refs = match &term {
                Term::Addr(k) => {
                    let t = txn.open_multimap_table(ADDRS).map_err(idx_err)?;
                    let mut refs = Vec::new();
                    for v in t.get(k.as_str()).map_err(idx_err)? {
                        refs.push(v.map_err(idx_err)?.value());
                    }
                    refs
                }
                Term::MsgId(k) => {
                    let t = txn.open_table(MSGIDS).map_err(idx_err)?;
                    index::msgid_refs(&t, k).map_err(idx_err)?
                }
            };
            let messages = txn.open_table(MESSAGES).map_err(idx_err)?;
            let mut ids = BTreeSet::new();
            for r in refs {
                ids.extend(index::ref_messages(&messages, r).map_err(idx_err)?);
            }
            let filters = txn.open_table(SEGMENT_FILTERS).map_err(idx_err)?;
            for (n, _) in &cataloged {
                let may_hold = filters
                    .get(*n)
                    .map_err(idx_err)?
                    .is_none_or(|f| TermFilter::from_bytes(f.value()).may_hold(&term));
                if !may_hold {
                    continue;
                }
                if let Some(c) = self.catalogs.of(&txn, *n)? {
                    ids.extend(c.find(&term));
                }
            }
            // In location order: each compacted segment's catalog is decoded once, not
            // once for every message it holds.
            let mut located = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(loc) = Self::loc(&txn, &MessageId(id))? {
                    located.push((loc.segment, id, loc));
                }
            }
            located.sort_unstable_by_key(|l| (l.0, l.1));
            for (_, id, loc) in located {
                let r = self.record_at(&txn, &MessageId(id), loc)?;
                if matches(&r, q) {
                    out.push(r);
                }
            }
            out.sort_by(|a, b| latest(b).cmp(latest(a)));
            out.truncate(limit);
        } else {
            let lo = q.since_us.unwrap_or(i64::MIN);
            let hi = q.until_us.unwrap_or(i64::MAX);
            let mut seen = BTreeSet::new();
            let mut newest = self.newest_first(&txn, &cataloged, lo, hi)?;
            while let Some(id) = newest.next()? {
                if !seen.insert(id) {
                    continue;
                }
                if let Some(r) = self.record_in(&txn, &MessageId(id))? {
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

    /// The message ids of arrivals with times in `lo..hi`, newest first, from `by_time`
    /// and the catalogs merged: a catalog is read once the merge reaches its latest time.
    fn newest_first<'a>(
        &'a self,
        txn: &'a ReadTransaction,
        cataloged: &[(u32, index::SegmentInfo)],
        lo: i64,
        hi: i64,
    ) -> Result<NewestFirst<'a>, StoreError> {
        let by_time = txn.open_table(BY_TIME).map_err(idx_err)?;
        let mut pending: Vec<(i64, u32)> = cataloged
            .iter()
            .filter(|(_, i)| i.last_time >= lo && i.first_time < hi)
            .map(|(n, i)| (i.last_time, *n))
            .collect();
        pending.sort_unstable(); // latest last: popped first
        Ok(NewestFirst {
            reader: self,
            txn,
            rows: by_time,
            next_row: None,
            lo,
            hi,
            pending,
            heap: std::collections::BinaryHeap::new(),
        })
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
        // In chunks sorted by location: each block of a compacted segment is decoded once
        // per chunk, not once per message.
        let mut chunk: Vec<(Loc, MessageId)> = Vec::with_capacity(VERIFY_CHUNK.min(1 << 16));
        let mut check = |chunk: &mut Vec<(Loc, MessageId)>, report: &mut VerifyReport| {
            chunk.sort_unstable();
            for (loc, id) in chunk.drain(..) {
                report.messages_checked += 1;
                if let Err(e) = self.read_fresh(&id, loc) {
                    report.problems.push(e.to_string());
                }
                progress(report.messages_checked, total);
            }
        };
        for entry in messages.iter().map_err(idx_err)? {
            let (k, v) = entry.map_err(idx_err)?;
            let id = MessageId(k.value());
            match Loc::decode(v.value()) {
                Some(loc) => chunk.push((loc, id)),
                None => {
                    report.messages_checked += 1;
                    report
                        .problems
                        .push(format!("message {id}: bad location in the index"));
                }
            }
            if chunk.len() >= VERIFY_CHUNK {
                check(&mut chunk, &mut report);
            }
        }
        check(&mut chunk, &mut report);
        // Every local number from 1 to the last, in rows or in catalogs.
        let last = catalog::last_local(&txn)?;
        let mut from = 1;
        while from <= last {
            let end = (from + VERIFY_CHUNK as u64).min(last + 1);
            let chunk = match catalog::arrivals_from(&txn, &self.catalogs, from, VERIFY_CHUNK) {
                Ok(c) => c,
                // A damaged catalog: one at a time, so that each unreadable one is named.
                Err(_) => (from..end)
                    .filter_map(|l| match catalog::arrival(&txn, &self.catalogs, l) {
                        Ok(a) => a.map(|a| (l, Ok(a))),
                        Err(e) => Some((l, Err(e.to_string()))),
                    })
                    .collect(),
            };
            let mut expect = from;
            for (local, a) in chunk {
                for gap in expect..local {
                    report.problems.push(format!(
                        "arrival #{gap} is in neither the index nor a catalog"
                    ));
                }
                expect = local + 1;
                report.arrivals_checked += 1;
                match a {
                    Ok(a) => match a.message.parse::<MessageId>() {
                        Ok(m) if messages.get(m.0).map_err(idx_err)?.is_some() => {}
                        _ => report.problems.push(format!(
                            "arrival {}: its message {} is not in the index",
                            a.id, a.message
                        )),
                    },
                    Err(e) => report
                        .problems
                        .push(format!("arrival #{local}: unreadable: {e}")),
                }
            }
            for gap in expect..end {
                report.problems.push(format!(
                    "arrival #{gap} is in neither the index nor a catalog"
                ));
            }
            from = end;
        }
        let meta = txn.open_table(META).map_err(idx_err)?;
        let counted = index::meta_u64(&meta, index::K_MESSAGES);
        if counted != report.messages_checked {
            report.problems.push(format!(
                "the index counts {counted} messages but holds {}",
                report.messages_checked
            ));
        }
        let counted = index::meta_u64(&meta, index::K_ARRIVALS);
        if counted != report.arrivals_checked {
            report.problems.push(format!(
                "the index counts {counted} arrivals but holds {}",
                report.arrivals_checked
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
        let segments = list_log(&*self.vfs, &self.log_dir).map_err(io_err(&self.log_dir))?;
        let mut in_log = BTreeSet::new();
        let mut check = |path: &Path,
                         at: u64,
                         h: &super::record::RecordHeader,
                         payload: &[u8],
                         problems: &mut Vec<String>|
         -> Result<(), StoreError> {
            match h.kind {
                KIND_MESSAGE => {
                    in_log.insert(h.message.0);
                    if messages.get(h.message.0).map_err(idx_err)?.is_none() {
                        problems.push(format!(
                            "{} at {at}: message {} is in the log but not in the index",
                            path.display(),
                            h.message
                        ));
                    }
                }
                KIND_ARRIVAL => match serde_json::from_slice::<Arrival>(payload) {
                    Ok(a) => {
                        if catalog::local_of_id(txn, &self.catalogs, &a.id)?.is_none() {
                            problems.push(format!(
                                "{} at {at}: arrival {} is in the log but not in the index",
                                path.display(),
                                a.id
                            ));
                        }
                    }
                    Err(e) => problems.push(format!(
                        "{} at {at}: unreadable arrival record: {e}",
                        path.display()
                    )),
                },
                _ => {}
            }
            Ok(())
        };
        for f in segments.iter().copied().filter(|f| f.number <= tail_seg) {
            let n = f.number;
            // The segment as it is now: compacted if its `.seg` is gone (the records are
            // the same in both forms).
            let seg = if f.seg {
                match self.file(n, false) {
                    Ok(file) => Some(file),
                    Err(e) if is_gone(&e) && f.blk => None,
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            let mut problems = Vec::new();
            let Some(file) = seg else {
                let path = blk_path(&self.log_dir, n);
                let file = self.file(n, true)?;
                if let Err(e) = log::read_blk_header(&*file) {
                    report.problems.push(format!("{}: {e}", path.display()));
                    continue;
                }
                let lookup = |d| self.dicts.get(d);
                let scan = compact::scan_blk(&*file, &lookup, |at, _, recs| {
                    for rec in recs {
                        check(&path, at, &rec.header, rec.payload, &mut problems)?;
                    }
                    Ok::<(), StoreError>(())
                })?;
                report.problems.append(&mut problems);
                if let Some(at) = scan.catalog {
                    match catalog::read(&*file, at) {
                        Ok(c) => {
                            // Its arrivals are in no block: the catalog is their record.
                            for (local, v) in &c.arrivals {
                                let id = match codec::decode_arrival(v) {
                                    Ok(a) => a.id,
                                    Err(e) => {
                                        report.problems.push(format!(
                                            "{}: catalog at {at}: arrival #{local}: {e}",
                                            path.display()
                                        ));
                                        continue;
                                    }
                                };
                                if ids
                                    .get(index::id_entry(&id, *local))
                                    .map_err(idx_err)?
                                    .is_none()
                                {
                                    report.problems.push(format!(
                                        "{}: catalog at {at}: arrival {id} is in the log but \
                                         not in the index",
                                        path.display()
                                    ));
                                }
                            }
                        }
                        Err(e) => report
                            .problems
                            .push(format!("{}: catalog at {at}: {e}", path.display())),
                    }
                }
                if let Some(why) = scan.stopped {
                    report.problems.push(format!(
                        "{}: damaged at offset {}: {why}",
                        path.display(),
                        scan.valid_end
                    ));
                }
                continue;
            };
            let path = segment_path(&self.log_dir, n);
            if let Err(e) = log::read_header(&*file) {
                report.problems.push(format!("{}: {e}", path.display()));
                continue;
            }
            let scan = log::scan(
                &*file,
                SEGMENT_HEADER_LEN,
                |rec| -> Result<(), StoreError> {
                    let end = rec.offset + rec.header.total_len();
                    if n == tail_seg && end > tail_off {
                        return Ok(()); // written after the snapshot we read: not indexed yet
                    }
                    check(&path, rec.offset, &rec.header, &rec.payload, &mut problems)
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

/// A row of `by_time`: (arrival µs, local number) → message id.
type TimeRow = ((i64, u64), [u8; 32]);

/// The merge of [`StoreReader::newest_first`]: `by_time` read backwards from `hi`, a
/// page at a time, against a heap of the catalogs' entries loaded so far.
struct NewestFirst<'a> {
    reader: &'a StoreReader,
    txn: &'a ReadTransaction,
    rows: redb::ReadOnlyTable<(i64, u64), [u8; 32]>,
    /// The next row to give (`Some(None)`: none left), once read.
    next_row: Option<Option<TimeRow>>,
    lo: i64,
    hi: i64,
    /// Catalogs not loaded yet, by latest time (latest last).
    pending: Vec<(i64, u32)>,
    heap: std::collections::BinaryHeap<(i64, u64, [u8; 32])>,
}

impl NewestFirst<'_> {
    /// The newest row of `by_time` from `lo` up to (not including) `end`.
    fn row_before(&self, end: (i64, u64)) -> Result<Option<TimeRow>, StoreError> {
        Ok(self
            .rows
            .range((self.lo, 0u64)..end)
            .map_err(idx_err)?
            .next_back()
            .transpose()
            .map_err(idx_err)?
            .map(|(k, v)| (k.value(), v.value())))
    }

    fn peek_row(&mut self) -> Result<Option<TimeRow>, StoreError> {
        if self.next_row.is_none() {
            self.next_row = Some(self.row_before((self.hi, 0))?);
        }
        Ok(self.next_row.expect("read"))
    }

    fn next(&mut self) -> Result<Option<[u8; 32]>, StoreError> {
        loop {
            let row = self.peek_row()?;
            let front = row.map(|r| r.0 .0).max(self.heap.peek().map(|e| e.0));
            // A catalog whose latest time is at or after the front may hold what comes
            // next: load it before choosing.
            if let Some(&(latest, n)) = self.pending.last() {
                if front.is_none_or(|f| latest >= f) {
                    self.pending.pop();
                    if let Some(c) = self.reader.catalogs.of(self.txn, n)? {
                        self.heap.extend(
                            c.by_time()
                                .iter()
                                .filter(|e| self.lo <= e.0 && e.0 < self.hi)
                                .copied(),
                        );
                    }
                    continue;
                }
            }
            let from_row = match (row, self.heap.peek()) {
                (None, None) => return Ok(None),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(r), Some(e)) => (r.0 .0, r.0 .1) >= (e.0, e.1),
            };
            if from_row {
                let (key, id) = row.expect("a row");
                self.next_row = Some(self.row_before(key)?);
                return Ok(Some(id));
            }
            return Ok(self.heap.pop().map(|e| e.2));
        }
    }
}

fn open_shared(path: &Path) -> Result<redb::ReadOnlyDatabase, StoreError> {
    let db = open_shared_db(path)?;
    // The daemon upgrades its index when it starts: one of another build may keep
    // another format, which this build must not read.
    let format = {
        let txn = db.begin_read().map_err(idx_err)?;
        let meta = txn.open_table(META).map_err(idx_err)?;
        let v = meta.get(index::K_FORMAT).map_err(idx_err)?;
        v.and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
            .map(u32::from_le_bytes)
    };
    match format {
        Some(f) if f != super::record::INDEX_FORMAT => Err(StoreError::Unsupported(format!(
            "the running daemon keeps its index in format {f} and this coffer reads format \
             {}: run a cofferd and a coffer of the same version (after an upgrade, restart \
             cofferd: it upgrades the index as it starts)",
            super::record::INDEX_FORMAT
        ))),
        _ => Ok(db),
    }
}

fn open_shared_db(path: &Path) -> Result<redb::ReadOnlyDatabase, StoreError> {
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

/// Whether a read failed because the file a location names is not there (a compaction
/// replaced it): the caller takes the location anew from the index.
pub fn is_gone(e: &StoreError) -> bool {
    matches!(e, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Reads the blob of message `id` at `loc` (opening its segment, or its compacted form),
/// checked against the id.
///
/// # Errors
/// [`StoreError::Corrupt`] if the record is missing, damaged or not that message's;
/// [`StoreError::Io`] with `NotFound` if the file is gone ([`is_gone`]).
pub fn read_blob(
    vfs: &dyn Vfs,
    log_dir: &Path,
    id: &MessageId,
    loc: Loc,
    dicts: DictLookup<'_>,
) -> Result<Vec<u8>, StoreError> {
    match loc.position {
        None => {
            let path = segment_path(log_dir, loc.segment);
            let file = vfs.open_read(&path).map_err(io_err(&path))?;
            check_blob(&*file, log_dir, id, loc, dicts)
        }
        Some(position) => {
            let path = blk_path(log_dir, loc.segment);
            let file = vfs.open_read(&path).map_err(io_err(&path))?;
            let block = load_block(&*file, log_dir, id, loc, dicts)?;
            block_message(&block, log_dir, id, loc, position)
        }
    }
}

pub(crate) fn load_block(
    file: &dyn VFile,
    log_dir: &Path,
    id: &MessageId,
    loc: Loc,
    dicts: DictLookup<'_>,
) -> Result<DecodedBlock, StoreError> {
    compact::read_block(file, loc.offset, dicts).map_err(|e| {
        StoreError::Corrupt(format!(
            "{} at {}: {e} (message {id})",
            blk_path(log_dir, loc.segment).display(),
            loc.offset
        ))
    })
}

pub(crate) fn block_message(
    block: &DecodedBlock,
    log_dir: &Path,
    id: &MessageId,
    loc: Loc,
    position: u32,
) -> Result<Vec<u8>, StoreError> {
    let raw = block.message(position, id).map_err(|e| {
        StoreError::Corrupt(format!(
            "{} block at {}: {e} (message {id})",
            blk_path(log_dir, loc.segment).display(),
            loc.offset
        ))
    })?;
    if MessageId::of(&raw) != *id {
        return Err(StoreError::Corrupt(format!(
            "message {id}: bytes do not hash to the id"
        )));
    }
    Ok(raw)
}

fn check_blob(
    file: &dyn VFile,
    log_dir: &Path,
    id: &MessageId,
    loc: Loc,
    dicts: DictLookup<'_>,
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
    let raw = decode_payload(&rec.header, &rec.payload, dicts)
        .map_err(|e| StoreError::Corrupt(format!("message {id}: {e}")))?;
    if MessageId::of(&raw) != *id {
        return Err(StoreError::Corrupt(format!(
            "message {id}: bytes do not hash to the id"
        )));
    }
    Ok(raw)
}
