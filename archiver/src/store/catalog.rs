//! The catalog of a compacted segment (docs/store-format.md "Catalogs").
//!
//! Compaction writes, as the last block of a `.blk`, the summaries of the messages whose
//! blobs it holds and the arrivals its records hold, in the binary form of
//! [`super::codec`], compressed like the blocks. The switch that puts the `.blk` in place
//! then drops those rows from `summaries` and `arrivals`: a sealed segment's share of the
//! index is kept compressed, at a fraction of what redb's pages take.
//!
//! Readers look a row up first and the catalog second ([`summary`], [`arrival`]), and take
//! a catalog's entry only where the index agrees with it (the message is located in that
//! segment; the arrival id maps to that local number). So a catalog can never add or
//! replace an entry, only stand in for a row that was dropped for it.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use redb::{ReadTransaction, ReadableTable};

use super::codec;
use super::engine::{idx_err, io_err};
use super::index::{
    self, Loc, Move, SegmentInfo, Term, ARRIVALS, ARRIVAL_IDS, ARRIVAL_KEYS, BY_MESSAGE, SEGMENTS,
    SUMMARIES,
};
use super::io::{VFile, Vfs};
use super::log::blk_path;
use super::record::{self, BlockHeader, BLOCK_CODEC_CATALOG, BLOCK_HEADER_LEN, RECORD_TRAILER_LEN};
use super::summary::Summary;
use super::{Arrival, StoreError};
use crate::ids::{ArrivalId, MessageId};

/// The first layout (index format 4): each summary and each arrival with its key.
const MAGIC: &[u8; 4] = b"CCAT";
/// The layout written now: by column (all summary ids, their lengths, the summaries;
/// all local numbers as LEB128 differences, the arrivals' lengths, the arrivals), which
/// compresses better.
const MAGIC_COLUMNS: &[u8; 4] = b"CCA2";
/// An arrival and its local number; `Err(why)` if it does not decode.
pub type Numbered = (u64, Result<Arrival, String>);

/// Gives the catalog of a segment being compacted from its moves and arrival ids.
pub type CatalogOf<'a> = dyn FnMut(&[Move], &[String]) -> Result<Catalog, StoreError> + 'a;

/// Decoded catalogs a [`Catalogs`] keeps.
const CACHED: usize = 4;

/// What a compacted segment carries of the index: summaries sorted by message id and
/// arrivals sorted by local number (each value in the binary form of
/// [`super::codec`]). The search keys they give are derived from them when first
/// needed (a catalog of index format 4 stored them).
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub summaries: Vec<([u8; 32], Vec<u8>)>,
    pub arrivals: Vec<(u64, Vec<u8>)>,
    /// The search keys: derived on first use, or as a format-4 catalog stored them.
    keys: OnceLock<Keys>,
    /// (arrival µs, local number, message id) of every arrival, newest first: derived.
    by_time: Vec<(i64, u64, [u8; 32])>,
    /// (message id, local number) of every arrival, sorted: derived.
    by_message: Vec<([u8; 32], u64)>,
}

/// A catalog's search keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Keys {
    /// Ids of messages stored elsewhere that an arrival here names, sorted.
    others: Vec<[u8; 32]>,
    /// Search keys, sorted, each with its messages: numbers into `summaries`, then
    /// into `others`.
    terms: Vec<(Term, Vec<u32>)>,
}

impl Keys {
    /// The search keys the index gives these summaries and arrivals
    /// ([`index::summary_terms`], [`index::arrival_terms`]).
    fn of(summaries: &[([u8; 32], Vec<u8>)], arrivals: &[(u64, Vec<u8>)]) -> Keys {
        // Summaries are numbered by position; the messages arrivals name elsewhere after
        // them, in id order.
        let mut numbered: Vec<(Term, u32)> = Vec::new();
        for (i, (_, v)) in summaries.iter().enumerate() {
            if let Ok(s) = codec::decode_summary(v) {
                let n = count(i);
                numbered.extend(index::summary_terms(&s).into_iter().map(|t| (t, n)));
            }
        }
        let mut elsewhere: Vec<(Term, [u8; 32])> = Vec::new();
        for (_, v) in arrivals {
            let Ok(a) = codec::decode_arrival(v) else {
                continue;
            };
            let Ok(m) = a.message.parse::<MessageId>() else {
                continue;
            };
            let terms = index::arrival_terms(&a);
            match summaries.binary_search_by(|s| s.0.cmp(&m.0)) {
                Ok(i) => numbered.extend(terms.into_iter().map(|t| (t, count(i)))),
                Err(_) => elsewhere.extend(terms.into_iter().map(|t| (t, m.0))),
            }
        }
        let mut others: Vec<[u8; 32]> = elsewhere.iter().map(|(_, id)| *id).collect();
        others.sort_unstable();
        others.dedup();
        for (t, id) in elsewhere {
            let i = others.binary_search(&id).expect("collected");
            numbered.push((t, count(summaries.len() + i)));
        }
        numbered.sort_unstable();
        numbered.dedup();
        let mut terms: Vec<(Term, Vec<u32>)> = Vec::new();
        for (t, n) in numbered {
            match terms.last_mut() {
                Some((last, ns)) if *last == t => ns.push(n),
                _ => terms.push((t, vec![n])),
            }
        }
        Keys { others, terms }
    }
}

/// Two catalogs are equal when they hold the same summaries and arrivals: everything
/// else is derived from those.
impl PartialEq for Catalog {
    fn eq(&self, other: &Self) -> bool {
        self.summaries == other.summaries && self.arrivals == other.arrivals
    }
}

impl Eq for Catalog {}

impl Catalog {
    /// The catalog of these summaries and arrivals (sorted and deduplicated here).
    pub fn build(
        mut summaries: Vec<([u8; 32], Vec<u8>)>,
        mut arrivals: Vec<(u64, Vec<u8>)>,
    ) -> Catalog {
        summaries.sort_unstable_by_key(|s| s.0);
        summaries.dedup_by_key(|s| s.0);
        arrivals.sort_unstable_by_key(|a| a.0);
        arrivals.dedup_by_key(|a| a.0);
        Catalog {
            summaries,
            arrivals,
            ..Catalog::default()
        }
        .derive()
    }

    /// The search keys, derived now if not yet.
    fn keys(&self) -> &Keys {
        self.keys
            .get_or_init(|| Keys::of(&self.summaries, &self.arrivals))
    }

    /// Fills the lookups derived from the arrivals.
    fn derive(mut self) -> Catalog {
        self.by_time = self
            .arrivals
            .iter()
            .filter_map(|(local, v)| {
                let (m, t) = codec::arrival_message_and_time(v).or_else(|| {
                    let a = codec::decode_arrival(v).ok()?;
                    Some((
                        a.message.parse::<MessageId>().ok()?.0,
                        index::time_us(&a.time),
                    ))
                })?;
                Some((t, *local, m))
            })
            .collect();
        self.by_time.sort_unstable_by(|a, b| b.cmp(a));
        self.by_message = self.by_time.iter().map(|e| (e.2, e.1)).collect();
        self.by_message.sort_unstable();
        self
    }

    /// The catalog's bytes before compression (the layout of [`MAGIC_COLUMNS`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC_COLUMNS);
        b.extend_from_slice(&count(self.summaries.len()).to_le_bytes());
        b.extend_from_slice(&count(self.arrivals.len()).to_le_bytes());
        for (id, _) in &self.summaries {
            b.extend_from_slice(id);
        }
        for (_, v) in &self.summaries {
            put_leb(&mut b, count(v.len()));
        }
        for (_, v) in &self.summaries {
            b.extend_from_slice(v);
        }
        let mut last = 0;
        for (local, _) in &self.arrivals {
            codec::put_uint(&mut b, local - last);
            last = *local;
        }
        for (_, v) in &self.arrivals {
            put_leb(&mut b, count(v.len()));
        }
        for (_, v) in &self.arrivals {
            b.extend_from_slice(v);
        }
        b
    }

    /// # Errors
    /// Why the bytes are not a catalog.
    pub fn decode(b: &[u8]) -> Result<Catalog, String> {
        let mut r = Cursor { b, at: 0 };
        let columns = match r.take(4)? {
            m if m == MAGIC_COLUMNS => true,
            m if m == MAGIC => false,
            _ => return Err("not a catalog (bad magic)".into()),
        };
        let summaries = r.u32()? as usize;
        let arrivals = r.u32()? as usize;
        let (others, terms) = if columns {
            (0, 0)
        } else {
            (r.u32()? as usize, r.u32()? as usize)
        };
        // Every entry takes at least this many bytes: a bad count cannot allocate much.
        let least = summaries.saturating_mul(36)
            + arrivals.saturating_mul(12)
            + others.saturating_mul(32)
            + terms.saturating_mul(9);
        if least > b.len() {
            return Err("catalog counts exceed its bytes".into());
        }
        let mut c = Catalog {
            summaries: Vec::with_capacity(summaries),
            arrivals: Vec::with_capacity(arrivals),
            ..Catalog::default()
        };
        if columns {
            let ids = r.take(summaries.saturating_mul(32))?;
            let lens = (0..summaries)
                .map(|_| r.leb())
                .collect::<Result<Vec<_>, _>>()?;
            for (id, len) in ids.chunks_exact(32).zip(lens) {
                let id: [u8; 32] = id.try_into().expect("32 bytes");
                c.summaries.push((id, r.take(len as usize)?.to_vec()));
            }
            let mut local = 0u64;
            let mut locals = Vec::with_capacity(arrivals);
            for _ in 0..arrivals {
                local = local
                    .checked_add(r.leb64()?)
                    .ok_or("a local number in the catalog is too large")?;
                locals.push(local);
            }
            let lens = (0..arrivals)
                .map(|_| r.leb())
                .collect::<Result<Vec<_>, _>>()?;
            for (local, len) in locals.into_iter().zip(lens) {
                c.arrivals.push((local, r.take(len as usize)?.to_vec()));
            }
        } else {
            for _ in 0..summaries {
                let id: [u8; 32] = r.take(32)?.try_into().expect("32 bytes");
                let len = r.u32()? as usize;
                c.summaries.push((id, r.take(len)?.to_vec()));
            }
            for _ in 0..arrivals {
                let local = u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
                let len = r.u32()? as usize;
                c.arrivals.push((local, r.take(len)?.to_vec()));
            }
            let keys = decode_keys(&mut r, summaries, others, terms)?;
            c.keys = OnceLock::from(keys);
        }
        if r.at != b.len() {
            return Err("bytes after the catalog's entries".into());
        }
        if !c.summaries.windows(2).all(|w| w[0].0 < w[1].0)
            || !c.arrivals.windows(2).all(|w| w[0].0 < w[1].0)
        {
            return Err("catalog entries out of order".into());
        }
        Ok(c.derive())
    }

    /// The encoded summary of message `id`, if the catalog holds it.
    pub fn summary(&self, id: &MessageId) -> Option<&[u8]> {
        self.summaries
            .binary_search_by(|(k, _)| k.cmp(&id.0))
            .ok()
            .map(|i| self.summaries[i].1.as_slice())
    }

    /// The encoded arrival with local number `local`, if the catalog holds it.
    pub fn arrival(&self, local: u64) -> Option<&[u8]> {
        self.arrivals
            .binary_search_by(|(k, _)| k.cmp(&local))
            .ok()
            .map(|i| self.arrivals[i].1.as_slice())
    }

    /// The first and last local numbers it holds.
    pub fn locals(&self) -> Option<(u64, u64)> {
        Some((self.arrivals.first()?.0, self.arrivals.last()?.0))
    }

    /// The earliest and latest arrival times it holds (µs).
    pub fn times(&self) -> Option<(i64, i64)> {
        Some((self.by_time.last()?.0, self.by_time.first()?.0))
    }

    /// Every search key with the ids of the messages it finds.
    pub fn terms(&self) -> impl Iterator<Item = (&Term, Vec<[u8; 32]>)> {
        self.keys()
            .terms
            .iter()
            .map(|(t, ns)| (t, ns.iter().map(|n| self.id_of(*n)).collect()))
    }

    /// The messages search key `term` finds here. Unless the keys are derived already,
    /// a scan for this one key: far cheaper than deriving them all (no key is built, none
    /// sorted).
    pub fn find(&self, term: &Term) -> Vec<[u8; 32]> {
        if let Some(keys) = self.keys.get() {
            return match keys.terms.binary_search_by(|(t, _)| t.cmp(term)) {
                Ok(i) => keys.terms[i].1.iter().map(|n| self.id_of(*n)).collect(),
                Err(_) => Vec::new(),
            };
        }
        let mut found = BTreeSet::new();
        for (id, v) in &self.summaries {
            if codec::decode_summary(v).is_ok_and(|s| index::summary_gives(&s, term)) {
                found.insert(*id);
            }
        }
        if matches!(term, Term::Addr(_)) {
            for (_, v) in &self.arrivals {
                let envelope = codec::arrival_envelope(v).or_else(|| {
                    let a = codec::decode_arrival(v).ok()?;
                    Some((
                        a.message.parse::<MessageId>().ok()?.0,
                        a.mail_from,
                        a.rcpt_to,
                    ))
                });
                if let Some((m, from, rcpt)) = envelope {
                    if index::envelope_gives(&from, &rcpt, term) {
                        found.insert(m);
                    }
                }
            }
        }
        found.into_iter().collect()
    }

    /// The local numbers of its arrivals of message `id`.
    pub fn arrivals_of(&self, id: &MessageId) -> impl Iterator<Item = u64> + '_ {
        let id = id.0;
        let from = self.by_message.partition_point(|e| e.0 < id);
        self.by_message[from..]
            .iter()
            .take_while(move |e| e.0 == id)
            .map(|e| e.1)
    }

    /// (arrival µs, local number, message id) of its arrivals, newest first.
    pub fn by_time(&self) -> &[(i64, u64, [u8; 32])] {
        &self.by_time
    }

    fn id_of(&self, n: u32) -> [u8; 32] {
        let n = n as usize;
        match self.summaries.get(n) {
            Some(s) => s.0,
            None => self.keys().others[n - self.summaries.len()],
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).expect("catalog parts under 4 GiB")
}

/// The ids of messages stored elsewhere and the search keys, as a catalog of the first
/// layout ([`MAGIC`]) ends.
fn decode_keys(
    r: &mut Cursor<'_>,
    summaries: usize,
    others: usize,
    terms: usize,
) -> Result<Keys, String> {
    let mut k = Keys {
        others: Vec::with_capacity(others),
        terms: Vec::with_capacity(terms),
    };
    for _ in 0..others {
        k.others.push(r.take(32)?.try_into().expect("32 bytes"));
    }
    let ids = summaries + others;
    for _ in 0..terms {
        let kind = r.take(1)?[0];
        let len = r.u32()? as usize;
        let key = std::str::from_utf8(r.take(len)?)
            .map_err(|_| "a search key is not UTF-8")?
            .to_owned();
        let t = match kind {
            0 => Term::Addr(key),
            1 => Term::MsgId(key),
            k => return Err(format!("unknown search key kind {k}")),
        };
        let n = r.u32()? as usize;
        if n > r.b.len() - r.at {
            return Err("catalog counts exceed its bytes".into());
        }
        let mut ns = Vec::with_capacity(n);
        let mut last = 0u32;
        for i in 0..n {
            let d = r.leb()?;
            if i > 0 && d == 0 {
                return Err("a search key's messages are not ascending".into());
            }
            let number = last
                .checked_add(d)
                .filter(|x| (*x as usize) < ids)
                .ok_or("a search key names no message of the catalog")?;
            ns.push(number);
            last = number;
        }
        k.terms.push((t, ns));
    }
    if !k.others.windows(2).all(|w| w[0] < w[1]) || !k.terms.windows(2).all(|w| w[0].0 < w[1].0) {
        return Err("catalog entries out of order".into());
    }
    Ok(k)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.at..self.at.saturating_add(n))
            .ok_or("catalog is cut short")?;
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// A u64 in LEB128 (at most 10 bytes).
    fn leb64(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("a number in the catalog is too large".into());
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a number in the catalog is too long".into())
    }

    /// A u32 in LEB128.
    fn leb(&mut self) -> Result<u32, String> {
        u32::try_from(self.leb64()?).map_err(|_| "a number in the catalog is too large".into())
    }
}

fn put_leb(out: &mut Vec<u8>, v: u32) {
    codec::put_uint(out, u64::from(v));
}

/// The catalog as one block of a `.blk` (header, zstd frame, CRC).
///
/// # Errors
/// zstd errors (an impossible level).
pub fn encode_block(c: &Catalog, level: i32) -> std::io::Result<Vec<u8>> {
    let raw = c.encode();
    let frame = zstd::bulk::compress(&raw, level)?;
    let h = BlockHeader {
        codec: BLOCK_CODEC_CATALOG,
        dict_id: 0,
        stored_len: count(frame.len()),
        raw_len: count(raw.len()),
        records: 0,
        messages: 0,
    };
    let mut out = Vec::with_capacity(frame.len() + BLOCK_HEADER_LEN + RECORD_TRAILER_LEN);
    record::encode_block(&mut out, &h, &frame);
    Ok(out)
}

/// Reads the catalog block at `offset` of a `.blk`.
///
/// # Errors
/// I/O errors; damage as `InvalidData`.
pub fn read(file: &dyn VFile, offset: u64) -> std::io::Result<Catalog> {
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let block = super::compact::read_block(file, offset, &record::no_dicts)?;
    if block.header.codec != BLOCK_CODEC_CATALOG {
        return Err(bad(format!("the block at {offset} is not a catalog")));
    }
    Catalog::decode(&block.payload).map_err(bad)
}

/// Decoded catalogs, a few at a time, for one process's readers.
pub struct Catalogs {
    vfs: Arc<dyn Vfs>,
    log_dir: PathBuf,
    cache: Mutex<VecDeque<(u32, Arc<Catalog>)>>,
    /// Which catalog holds which local numbers, as last loaded.
    ranges: Mutex<Option<Arc<LocalRanges>>>,
}

impl Catalogs {
    pub fn new(vfs: Arc<dyn Vfs>, log_dir: PathBuf) -> Catalogs {
        Catalogs {
            vfs,
            log_dir,
            cache: Mutex::new(VecDeque::with_capacity(CACHED)),
            ranges: Mutex::new(None),
        }
    }

    /// The local number ranges of the catalogs: as last loaded, or loaded from `txn` if
    /// `fresh` or never loaded. A segment's range never changes once compacted.
    ///
    /// # Errors
    /// Index errors.
    fn ranges(&self, txn: &ReadTransaction, fresh: bool) -> Result<Arc<LocalRanges>, StoreError> {
        let mut r = self
            .ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*r {
            Some(l) if !fresh => Ok(l.clone()),
            _ => {
                let l = Arc::new(LocalRanges::load(txn)?);
                *r = Some(l.clone());
                Ok(l)
            }
        }
    }

    /// The catalog of segment `n`, if `segments` says it has one.
    ///
    /// # Errors
    /// Index and I/O errors, a damaged catalog.
    pub fn of(&self, txn: &ReadTransaction, n: u32) -> Result<Option<Arc<Catalog>>, StoreError> {
        if let Some(c) = self.cached(n) {
            return Ok(Some(c));
        }
        match segment_info(txn, n)? {
            Some(info) => self.of_info(n, &info),
            None => Ok(None),
        }
    }

    /// The catalog of segment `n`, which `segments` describes as `info`.
    ///
    /// # Errors
    /// I/O errors, a damaged catalog.
    pub fn of_info(&self, n: u32, info: &SegmentInfo) -> Result<Option<Arc<Catalog>>, StoreError> {
        if let Some(c) = self.cached(n) {
            return Ok(Some(c));
        }
        if info.catalog == 0 {
            return Ok(None);
        }
        let path = blk_path(&self.log_dir, n);
        let file = self.vfs.open_read(&path).map_err(io_err(&path))?;
        let c = Arc::new(read(&*file, info.catalog).map_err(|e| {
            StoreError::Corrupt(format!(
                "{} at {}: catalog: {e}",
                path.display(),
                info.catalog
            ))
        })?);
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHED {
            cache.pop_front();
        }
        cache.push_back((n, c.clone()));
        Ok(Some(c))
    }

    fn cached(&self, n: u32) -> Option<Arc<Catalog>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, c)| c.clone())
    }
}

/// Every compacted segment that has a catalog, with what `segments` says of it.
///
/// # Errors
/// Index errors.
pub fn cataloged(txn: &ReadTransaction) -> Result<Vec<(u32, SegmentInfo)>, StoreError> {
    let t = txn.open_table(SEGMENTS).map_err(idx_err)?;
    let mut out = Vec::new();
    for e in t.iter().map_err(idx_err)? {
        let (k, v) = e.map_err(idx_err)?;
        if let Some(info) = SegmentInfo::decode(v.value()) {
            if info.catalog != 0 {
                out.push((k.value(), info));
            }
        }
    }
    Ok(out)
}

fn segment_info(txn: &ReadTransaction, n: u32) -> Result<Option<SegmentInfo>, StoreError> {
    let t = txn.open_table(SEGMENTS).map_err(idx_err)?;
    let v = t.get(n).map_err(idx_err)?;
    Ok(v.and_then(|v| SegmentInfo::decode(v.value())))
}

/// The summary of message `id`, located at `loc`: its row, or its segment's catalog.
///
/// # Errors
/// Index and I/O errors, a damaged catalog, a summary that does not decode.
pub fn summary(
    txn: &ReadTransaction,
    cats: &Catalogs,
    id: &MessageId,
    loc: Loc,
) -> Result<Option<Summary>, StoreError> {
    let bad = |e: String| StoreError::Corrupt(format!("summary of {id}: {e}"));
    let t = txn.open_table(SUMMARIES).map_err(idx_err)?;
    if let Some(v) = t.get((loc.segment, id.0)).map_err(idx_err)? {
        return codec::decode_summary(v.value()).map(Some).map_err(bad);
    }
    if !loc.in_block() {
        return Ok(None);
    }
    match cats.of(txn, loc.segment)? {
        Some(c) => c
            .summary(id)
            .map(|v| codec::decode_summary(v).map_err(bad))
            .transpose(),
        None => Ok(None),
    }
}

/// The local numbers of the arrivals of message `id`, located at `loc`: its rows of
/// `by_message`, and the arrivals of it that its segment's catalog holds (their rows
/// were dropped).
///
/// # Errors
/// Index and I/O errors, a damaged catalog.
pub fn locals_of(
    txn: &ReadTransaction,
    cats: &Catalogs,
    id: &MessageId,
    loc: Loc,
) -> Result<BTreeSet<u64>, StoreError> {
    let t = txn.open_multimap_table(BY_MESSAGE).map_err(idx_err)?;
    let mut out = BTreeSet::new();
    for l in t.get((loc.segment, id.0)).map_err(idx_err)? {
        out.insert(l.map_err(idx_err)?.value());
    }
    if loc.in_block() {
        if let Some(c) = cats.of(txn, loc.segment)? {
            out.extend(c.arrivals_of(id));
        }
    }
    Ok(out)
}

/// Which segment's catalog holds which local numbers, from `segments`.
struct LocalRanges(Vec<(u64, u64, u32)>);

impl LocalRanges {
    fn load(txn: &ReadTransaction) -> Result<LocalRanges, StoreError> {
        let mut v: Vec<_> = cataloged(txn)?
            .into_iter()
            .filter(|(_, info)| info.first_local != 0)
            .map(|(n, info)| (info.first_local, info.last_local, n))
            .collect();
        v.sort_unstable();
        Ok(LocalRanges(v))
    }

    /// The segments whose catalogs may hold `local`, likeliest first. A segment's range
    /// can reach below its own arrivals (a replicated duplicate of an older arrival is
    /// cataloged where its record is, as the index numbered it), so ranges may overlap.
    fn candidates(&self, local: u64) -> impl Iterator<Item = u32> + '_ {
        let end = self.0.partition_point(|r| r.0 <= local);
        self.0[..end]
            .iter()
            .rev()
            .filter(move |r| local <= r.1)
            .map(|r| r.2)
    }
}

/// The arrival numbered `local` in the catalog of a compacted segment whose range holds
/// it, found through `segments` (read in a write transaction too); `Err(why)` if it
/// does not decode. Whether the index agrees is for the caller to check.
///
/// # Errors
/// Index and I/O errors, a damaged catalog.
pub fn cataloged_arrival<T: ReadableTable<u32, &'static [u8]>>(
    segments: &T,
    cats: &Catalogs,
    local: u64,
) -> Result<Option<Result<Arrival, String>>, StoreError> {
    for e in segments.iter().map_err(idx_err)? {
        let (k, v) = e.map_err(idx_err)?;
        let Some(info) = SegmentInfo::decode(v.value()) else {
            continue;
        };
        if info.catalog == 0 || info.first_local == 0 {
            continue;
        }
        if !(info.first_local..=info.last_local).contains(&local) {
            continue;
        }
        if let Some(c) = cats.of_info(k.value(), &info)? {
            if let Some(v) = c.arrival(local) {
                return Ok(Some(codec::decode_arrival(v).map_err(|e| e.to_string())));
            }
        }
    }
    Ok(None)
}

/// The local number the index gives arrival `id`: among those filed under its hash in
/// `arrival_ids`, the one whose arrival has that id.
///
/// # Errors
/// Index and I/O errors, a damaged catalog.
pub fn local_of_id(
    txn: &ReadTransaction,
    cats: &Catalogs,
    id: &ArrivalId,
) -> Result<Option<u64>, StoreError> {
    let ids = txn.open_table(ARRIVAL_IDS).map_err(idx_err)?;
    for local in index::id_locals(&ids, index::id_key(id)).map_err(idx_err)? {
        if arrival(txn, cats, local)?.is_some_and(|a| a.id == *id) {
            return Ok(Some(local));
        }
    }
    Ok(None)
}

/// The arrival that arrival key `key` was first given to: among the local numbers filed
/// under its prefix in `arrival_keys`, the one whose arrival has that key.
///
/// # Errors
/// Index and I/O errors, a damaged catalog.
pub fn arrival_of_key(
    txn: &ReadTransaction,
    cats: &Catalogs,
    key: &[u8; 32],
) -> Result<Option<Arrival>, StoreError> {
    let keys = txn.open_table(ARRIVAL_KEYS).map_err(idx_err)?;
    for local in index::key_locals(&keys, index::key_prefix(key)).map_err(idx_err)? {
        if let Some(a) = arrival(txn, cats, local)? {
            if super::engine::arrival_key(&a).as_ref() == Some(key) {
                return Ok(Some(a));
            }
        }
    }
    Ok(None)
}

/// The arrival with local number `local`, found in the catalogs: that of the segment
/// that holds it, where the index files that arrival's id under `local`.
fn arrival_in_catalogs(
    txn: &ReadTransaction,
    cats: &Catalogs,
    ids: &redb::ReadOnlyTable<(u64, u64, u64), ()>,
    local: u64,
) -> Result<Option<Result<Arrival, String>>, StoreError> {
    let mut found = None;
    // The ranges as last loaded; loaded anew once if they miss (a newer compaction).
    for fresh in [false, true] {
        let ranges = cats.ranges(txn, fresh)?;
        for n in ranges.candidates(local) {
            if let Some(c) = cats.of(txn, n)? {
                if let Some(v) = c.arrival(local) {
                    found = Some(codec::decode_arrival(v));
                    break;
                }
            }
        }
        if found.is_some() {
            break;
        }
    }
    let a = match found {
        None => return Ok(None),
        Some(Err(e)) => return Ok(Some(Err(e.to_string()))),
        Some(Ok(a)) => a,
    };
    let agrees = ids
        .get(index::id_entry(&a.id, local))
        .map_err(idx_err)?
        .is_some();
    Ok(agrees.then_some(Ok(a)))
}

/// The arrival with local number `local`, wherever the index keeps it: its row, or a
/// compacted segment's catalog.
///
/// # Errors
/// Index and I/O errors, a damaged catalog, an arrival that does not decode.
pub fn arrival(
    txn: &ReadTransaction,
    cats: &Catalogs,
    local: u64,
) -> Result<Option<Arrival>, StoreError> {
    let bad = |e: String| StoreError::Corrupt(format!("arrival #{local}: {e}"));
    let rows = txn.open_table(ARRIVALS).map_err(idx_err)?;
    if let Some(v) = rows.get(local).map_err(idx_err)? {
        return codec::decode_arrival(v.value())
            .map(Some)
            .map_err(|e| bad(e.to_string()));
    }
    let ids = txn.open_table(ARRIVAL_IDS).map_err(idx_err)?;
    arrival_in_catalogs(txn, cats, &ids, local)?
        .transpose()
        .map_err(bad)
}

/// The arrivals numbered `from` to `from + max - 1` (and at most the last one given),
/// in order, wherever they are kept; one that does not decode is `Err(why)`.
///
/// # Errors
/// Index and I/O errors, a damaged catalog.
pub fn arrivals_from(
    txn: &ReadTransaction,
    cats: &Catalogs,
    from: u64,
    max: usize,
) -> Result<Vec<Numbered>, StoreError> {
    let from = from.max(1);
    let last = last_local(txn)?.min(from.saturating_add(max as u64).saturating_sub(1));
    if last < from {
        return Ok(Vec::new());
    }
    let rows = txn.open_table(ARRIVALS).map_err(idx_err)?;
    let mut out = Vec::new();
    let mut rows = rows.range(from..=last).map_err(idx_err)?.peekable();
    let mut ids = None;
    for local in from..=last {
        let row = match rows.peek() {
            Some(Ok((k, _))) if k.value() == local => rows.next(),
            Some(Err(_)) => rows.next(),
            _ => None,
        };
        if let Some(row) = row {
            let (_, v) = row.map_err(idx_err)?;
            out.push((
                local,
                codec::decode_arrival(v.value()).map_err(|e| e.to_string()),
            ));
            continue;
        }
        // Not a row: a compacted segment's catalog holds it.
        if ids.is_none() {
            ids = Some(txn.open_table(ARRIVAL_IDS).map_err(idx_err)?);
        }
        let ids = ids.as_ref().expect("opened");
        if let Some(a) = arrival_in_catalogs(txn, cats, ids, local)? {
            out.push((local, a));
        }
    }
    Ok(out)
}

/// The highest local arrival number given so far (0: none). Arrivals are numbered
/// 1, 2, … without gaps.
///
/// # Errors
/// Index errors.
pub fn last_local(txn: &ReadTransaction) -> Result<u64, StoreError> {
    let meta = txn.open_table(index::META).map_err(idx_err)?;
    Ok(index::meta_u64(&meta, index::K_NEXT_LOCAL).saturating_sub(1))
}

/// Bits per search key in a [`TermFilter`]: about 1 % false positives with 7 probes.
const FILTER_BITS_PER_KEY: usize = 10;
const FILTER_PROBES: u32 = 7;

/// A Bloom filter of a catalog's search keys, kept in the index (`segment_filters`) so
/// that a search by key reads only the catalogs that may hold the key. Derived from the
/// catalog, like the rest of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermFilter(Vec<u8>);

impl TermFilter {
    pub fn of(catalog: &Catalog) -> TermFilter {
        let bytes = (catalog.keys().terms.len() * FILTER_BITS_PER_KEY)
            .div_ceil(8)
            .max(8);
        let mut bits = vec![0u8; bytes];
        for (t, _) in &catalog.keys().terms {
            for bit in probes(t, bytes * 8) {
                bits[bit / 8] |= 1 << (bit % 8);
            }
        }
        TermFilter(bits)
    }

    pub fn from_bytes(b: &[u8]) -> TermFilter {
        TermFilter(b.to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// False only if the catalog has no such key.
    pub fn may_hold(&self, term: &Term) -> bool {
        if self.0.is_empty() {
            return true;
        }
        probes(term, self.0.len() * 8).all(|bit| self.0[bit / 8] & (1 << (bit % 8)) != 0)
    }
}

/// The filter's bit positions for `term` (double hashing over CRC-32C: stable across
/// builds, unlike std's hasher).
fn probes(term: &Term, bits: usize) -> impl Iterator<Item = usize> {
    let (kind, key) = match term {
        Term::Addr(k) => (0u8, k),
        Term::MsgId(k) => (1u8, k),
    };
    let h1 = crc32c::crc32c_append(u32::from(kind), key.as_bytes());
    let h2 = crc32c::crc32c_append(h1 ^ 0x9e37_79b9, key.as_bytes()) | 1;
    (0..FILTER_PROBES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) as usize) % bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(n: usize) -> Catalog {
        let summaries = (0..n)
            .map(|i| {
                let s = Summary {
                    from: vec![format!("sender{i}@example.org")],
                    to: vec![format!("rcpt{}@example.net", i % 7)],
                    message_id: Some(format!("m{i}@example.org")),
                    ..Summary::default()
                };
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&(i as u64).to_be_bytes());
                (id, codec::encode_summary(&s))
            })
            .collect();
        Catalog::build(summaries, Vec::new())
    }

    #[test]
    fn a_catalog_reads_back_and_finds_its_messages_by_key() {
        let c = catalog(300);
        let back = Catalog::decode(&c.encode()).unwrap();
        assert_eq!(back, c);
        let found = back.find(&Term::Addr("t:rcpt3@example.net".into()));
        assert_eq!(found.len(), 43);
        assert_eq!(back.find(&Term::Addr("t:@example.net".into())).len(), 300);
        assert_eq!(back.find(&Term::MsgId("m9@example.org".into())).len(), 1);
        assert_eq!(back.find(&Term::MsgId("m299@example.org".into())).len(), 1);
        let mut big = Vec::new();
        put_leb(&mut big, u32::MAX);
        put_leb(&mut big, 300);
        codec::put_uint(&mut big, u64::MAX);
        let mut r = Cursor { b: &big, at: 0 };
        assert_eq!((r.leb(), r.leb()), (Ok(u32::MAX), Ok(300)));
        assert_eq!(r.leb64(), Ok(u64::MAX));
        assert!(c
            .find(&Term::Addr("f:nobody@example.org".into()))
            .is_empty());
        // Damage is refused, not misread.
        let mut bytes = c.encode();
        let n = bytes.len();
        assert!(Catalog::decode(&bytes[..n - 3]).is_err());
        let first_len = 12 + 300 * 32;
        bytes[first_len] = bytes[first_len].wrapping_add(1); // one length is wrong
        assert!(Catalog::decode(&bytes).is_err());
    }

    /// A catalog with arrivals too: 40 messages, two arrivals each.
    fn catalog_with_arrivals() -> Catalog {
        let c = catalog(40);
        let mut arrivals = Vec::new();
        for (i, (id, _)) in c.summaries.iter().enumerate() {
            for k in 0..2u64 {
                let a = Arrival {
                    id: crate::ids::ArrivalId {
                        node: "node-a".into(),
                        epoch: "0a1b2c3d".into(),
                        seq: 2 * i as u64 + k + 1,
                    },
                    message: MessageId(*id).to_hex(),
                    time: format!("2026-05-01T12:00:{:02}.000001Z", i % 60),
                    listener: "journal".into(),
                    protocol: "ESMTP".into(),
                    client_addr: Some("192.0.2.1".into()),
                    helo: None,
                    mail_from: format!("sender{i}@example.org"),
                    mail_params: Vec::new(),
                    rcpt_to: vec![format!("rcpt{k}@example.net")],
                    queue_id: None,
                    xcoffer: None,
                    trace: vec!["node-a".into()],
                    via: None,
                    tls: None,
                    received: None,
                };
                arrivals.push((2 * i as u64 + k + 1, codec::encode_arrival(&a)));
            }
        }
        Catalog::build(c.summaries, arrivals)
    }

    #[test]
    fn a_catalog_of_either_layout_reads_back() {
        let c = catalog_with_arrivals();
        assert_eq!(c.arrivals.len(), 80);
        let columns = c.encode();
        assert_eq!(&columns[..4], MAGIC_COLUMNS);
        assert_eq!(Catalog::decode(&columns).unwrap(), c);
        // The first layout (index format 4): each entry beside its key, then the keys.
        let keys = c.keys().clone();
        let mut rows = Vec::new();
        rows.extend_from_slice(MAGIC);
        for n in [
            c.summaries.len(),
            c.arrivals.len(),
            keys.others.len(),
            keys.terms.len(),
        ] {
            rows.extend_from_slice(&count(n).to_le_bytes());
        }
        for (id, v) in &c.summaries {
            rows.extend_from_slice(id);
            rows.extend_from_slice(&count(v.len()).to_le_bytes());
            rows.extend_from_slice(v);
        }
        for (local, v) in &c.arrivals {
            rows.extend_from_slice(&local.to_le_bytes());
            rows.extend_from_slice(&count(v.len()).to_le_bytes());
            rows.extend_from_slice(v);
        }
        for id in &keys.others {
            rows.extend_from_slice(id);
        }
        for (t, ns) in &keys.terms {
            let (kind, key) = match t {
                Term::Addr(k) => (0u8, k),
                Term::MsgId(k) => (1u8, k),
            };
            rows.push(kind);
            rows.extend_from_slice(&count(key.len()).to_le_bytes());
            rows.extend_from_slice(key.as_bytes());
            rows.extend_from_slice(&count(ns.len()).to_le_bytes());
            let mut last = 0;
            for n in ns {
                put_leb(&mut rows, n - last);
                last = *n;
            }
        }
        let back = Catalog::decode(&rows).unwrap();
        assert_eq!(back, c);
        // Stored keys are taken as they are; the same as derived ones.
        assert_eq!(back.keys.get(), Some(&keys));
        assert_eq!(
            back.find(&Term::Addr("t:rcpt1@example.net".into())).len(),
            40
        );
        assert_eq!(back.arrivals_of(&MessageId(c.summaries[7].0)).count(), 2);
    }

    #[test]
    fn a_scan_for_one_key_finds_what_the_derived_keys_find() {
        let base = catalog_with_arrivals();
        let mut summaries = base.summaries.clone();
        let odd = Summary {
            from: vec!["Dave@Example.COM".into(), "@x@y".into()],
            to: vec!["\u{c9}mile@Example.fr".into()],
            message_id: Some("MixedCase@Example.org".into()),
            ..Summary::default()
        };
        summaries.push(([0xee; 32], codec::encode_summary(&odd)));
        let mut arrivals = base.arrivals.clone();
        // An arrival of a message stored elsewhere, with an empty sender.
        let mut a = codec::decode_arrival(&arrivals[0].1).unwrap();
        a.message = MessageId([0xdd; 32]).to_hex();
        a.mail_from = String::new();
        a.rcpt_to = vec!["Other@Example.NET".into()];
        arrivals.push((1000, codec::encode_arrival(&a)));
        let derived = Catalog::build(summaries.clone(), arrivals.clone());
        let scanned = Catalog::build(summaries, arrivals);
        let mut queries: Vec<Term> = derived.terms().map(|(t, _)| t.clone()).collect();
        assert!(queries.len() > 50, "{}", queries.len());
        assert!(queries.contains(&Term::Addr("f:@x@y".into())));
        assert!(queries.contains(&Term::MsgId("mixedcase@example.org".into())));
        queries.extend([
            Term::Addr("f:nobody@example.org".into()),
            Term::Addr("t:@example".into()),
            Term::MsgId("m1@example.org.".into()),
        ]);
        for q in &queries {
            let want: BTreeSet<[u8; 32]> = derived.find(q).into_iter().collect();
            assert!(scanned.keys.get().is_none());
            let got: BTreeSet<[u8; 32]> = scanned.find(q).into_iter().collect();
            assert_eq!(got, want, "{q:?}");
        }
        assert_eq!(
            scanned.find(&Term::Addr("t:other@example.net".into())),
            vec![[0xdd; 32]]
        );
        assert_eq!(
            scanned.find(&Term::Addr("t:\u{e9}mile@example.fr".into())),
            vec![[0xee; 32]]
        );
    }

    #[test]
    fn the_filter_holds_every_key_and_few_others() {
        let c = catalog(2000);
        let f = TermFilter::from_bytes(TermFilter::of(&c).as_bytes());
        for (t, _) in c.terms() {
            assert!(f.may_hold(t), "{t:?}");
        }
        let false_positives = (0..10_000)
            .filter(|i| f.may_hold(&Term::Addr(format!("f:other{i}@example.com"))))
            .count();
        assert!(false_positives < 300, "{false_positives} of 10000");
    }
}
