//! The redb index: tables, and the one function each that applies a log record to them.
//!
//! Everything here but `repeats` is rebuildable from the log alone: recovery replays log
//! records through [`apply_message`] and [`apply_arrival`], the same functions ingest
//! uses, so a replayed store and a live one cannot differ.

use redb::{
    MultimapTableDefinition, ReadTransaction, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use std::ops::Bound;

use super::catalog::{Catalog, Catalogs};
use super::codec;
use super::engine::idx_err;
use super::summary::{domain_of, Summary};
use super::Arrival;
use super::StoreError;
use crate::ids::{ArrivalId, MessageId};

/// Small values: format, epoch, node, counters, the log position indexed so far.
pub const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// message id → [`Loc`] of its blob record.
pub const MESSAGES: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("messages");
/// (segment of the message's blob, message id) → binary [`Summary`] of its top-level
/// headers. Ingest writes into the open segment's range of keys only, so the pages it
/// touches stay few however large the index grows.
pub const SUMMARIES: TableDefinition<'_, (u32, [u8; 32]), &[u8]> =
    TableDefinition::new("segment_summaries");
/// message id → summary, of index formats 1 to 4; moved into [`SUMMARIES`] on open.
pub const SUMMARIES_V4: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("summaries");
/// local arrival number (log order) → JSON [`Arrival`].
pub const ARRIVALS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("arrivals");
/// ([`origin_hash`] of an arrival id's `NODE/EPOCH`, its `SEQ`, local arrival number):
/// [`id_entry`]. Replicated arrivals dedupe here. Keys of one origin follow its sequence,
/// so ingest appends; a hash stands for every origin that has it, so each local number
/// found is checked against its arrival's id ([`super::catalog::local_of_id`]).
pub const ARRIVAL_IDS: TableDefinition<'_, (u64, u64, u64), ()> =
    TableDefinition::new("arrival_id_hashes");
/// ([`key_prefix`] of an arrival key, local arrival number). A client's retry dedupes
/// here, each local number found checked against the key of its arrival.
pub const ARRIVAL_KEYS: TableDefinition<'_, (u64, u64), ()> =
    TableDefinition::new("arrival_key_prefixes");
/// arrival id → local number, of index formats 1 to 4; moved into [`ARRIVAL_IDS`] on open.
pub const ARRIVAL_IDS_V4: TableDefinition<'_, &str, u64> = TableDefinition::new("arrival_ids");
/// arrival key → local number, of index formats 1 to 4; moved into [`ARRIVAL_KEYS`].
pub const ARRIVAL_KEYS_V4: TableDefinition<'_, [u8; 32], u64> =
    TableDefinition::new("arrival_keys");
/// (segment of the message's blob, message id) → local numbers of its arrivals, like
/// [`SUMMARIES`] keyed by segment first. An arrival whose message is not indexed when
/// it is (a catalog's arrivals replay before its blocks) has no row: its catalog has it.
pub const BY_MESSAGE: MultimapTableDefinition<'_, (u32, [u8; 32]), u64> =
    MultimapTableDefinition::new("segment_by_message");
/// message id → local numbers, of index formats 1 to 4; moved into [`BY_MESSAGE`].
pub const BY_MESSAGE_V4: MultimapTableDefinition<'_, [u8; 32], u64> =
    MultimapTableDefinition::new("by_message");
/// (arrival time µs, local arrival number) → message id.
pub const BY_TIME: TableDefinition<'_, (i64, u64), [u8; 32]> = TableDefinition::new("by_time");
/// `f:addr`, `f:@domain`, `t:addr`, `t:@domain` → [`term_ref`]s of the messages the key
/// finds. A ref stands for every message of its segment whose id starts with its 4
/// bytes; search checks each message it finds against the query, so a shared ref never
/// adds a wrong result. A key's refs sort by segment: ingest adds them at the end.
pub const ADDRS: MultimapTableDefinition<'_, &str, [u8; 8]> =
    MultimapTableDefinition::new("addr_refs");
/// ([`msgid_hash`] of a Message-ID header, lowercased, no brackets; [`term_ref`] of a
/// message) → nothing. A hash stands for every Message-ID that has it: search checks
/// what it finds, as with a ref.
pub const MSGIDS: TableDefinition<'_, (u64, [u8; 8]), ()> = TableDefinition::new("msgid_refs");
/// `addr_keys` of index formats 3 and 4 (8-byte id prefixes); moved into [`ADDRS`] on
/// open.
pub const ADDRS_V4: MultimapTableDefinition<'_, &str, [u8; 8]> =
    MultimapTableDefinition::new("addr_keys");
/// `msgid_keys` of index formats 3 and 4; moved into [`MSGIDS`] on open.
pub const MSGIDS_V4: MultimapTableDefinition<'_, &str, [u8; 8]> =
    MultimapTableDefinition::new("msgid_keys");
/// `addrs` of index formats 1 and 2 (whole message ids); moved into [`ADDRS_V4`] (and on
/// into [`ADDRS`]) on open.
pub const ADDRS_V2: MultimapTableDefinition<'_, &str, [u8; 32]> =
    MultimapTableDefinition::new("addrs");
/// `msgids` of index formats 1 and 2; moved into [`MSGIDS_V4`] (and on) on open.
pub const MSGIDS_V2: MultimapTableDefinition<'_, &str, [u8; 32]> =
    MultimapTableDefinition::new("msgids");

/// A search key of a message: under [`ADDRS`] or [`MSGIDS`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Term {
    Addr(String),
    MsgId(String),
}

fn push_address(out: &mut Vec<Term>, prefix: &str, addr: &str) {
    let a = addr.to_lowercase();
    if let Some(d) = domain_of(&a) {
        out.push(Term::Addr(format!("{prefix}{d}")));
    }
    out.push(Term::Addr(format!("{prefix}{a}")));
}

/// The search keys a message's summary gives it: `f:` and `t:` addresses and domains,
/// its Message-ID.
pub fn summary_terms(summary: &Summary) -> Vec<Term> {
    let mut out = Vec::new();
    for a in &summary.from {
        push_address(&mut out, "f:", a);
    }
    for a in &summary.to {
        push_address(&mut out, "t:", a);
    }
    if let Some(mid) = &summary.message_id {
        out.push(Term::MsgId(mid.to_lowercase()));
    }
    out
}

/// Whether `addr` gives search key `key` under `prefix` (`f:` or `t:`), as
/// [`push_address`] does: the address or its domain, lowercased.
fn address_gives(prefix: &str, addr: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    let a = addr.to_lowercase();
    a == rest || domain_of(&a).as_deref() == Some(rest)
}

/// Whether [`summary_terms`] of `summary` holds `term`, without making them all.
pub fn summary_gives(summary: &Summary, term: &Term) -> bool {
    match term {
        Term::Addr(k) => {
            summary.from.iter().any(|a| address_gives("f:", a, k))
                || summary.to.iter().any(|a| address_gives("t:", a, k))
        }
        Term::MsgId(k) => summary
            .message_id
            .as_ref()
            .is_some_and(|m| m.to_lowercase() == *k),
    }
}

/// Whether [`arrival_terms`] of an arrival with this envelope holds `term`.
pub fn envelope_gives(mail_from: &str, rcpt_to: &[String], term: &Term) -> bool {
    match term {
        Term::Addr(k) => {
            (!mail_from.is_empty() && address_gives("f:", mail_from, k))
                || rcpt_to.iter().any(|r| address_gives("t:", r, k))
        }
        Term::MsgId(_) => false,
    }
}

/// The search keys an arrival gives its message: envelope sender and recipients.
pub fn arrival_terms(arrival: &Arrival) -> Vec<Term> {
    let mut out = Vec::new();
    if !arrival.mail_from.is_empty() {
        push_address(&mut out, "f:", &arrival.mail_from);
    }
    for r in &arrival.rcpt_to {
        push_address(&mut out, "t:", r);
    }
    out
}

/// The first 8 bytes of the SHA-256 of an arrival id's `NODE/EPOCH`.
pub fn origin_hash(id: &ArrivalId) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{}/{}", id.node, id.epoch).as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// (origin hash, sequence): what [`ARRIVAL_IDS`] files arrival `id` under.
pub fn id_key(id: &ArrivalId) -> (u64, u64) {
    (origin_hash(id), id.seq)
}

/// The [`ARRIVAL_IDS`] entry of arrival `id` numbered `local`.
pub fn id_entry(id: &ArrivalId, local: u64) -> (u64, u64, u64) {
    let (h, seq) = id_key(id);
    (h, seq, local)
}

/// The local numbers [`ARRIVAL_IDS`] files an arrival id under (its [`id_key`]), each
/// to be checked against its arrival.
///
/// # Errors
/// redb errors.
pub fn id_locals<T: ReadableTable<(u64, u64, u64), ()>>(
    t: &T,
    (h, seq): (u64, u64),
) -> Result<Vec<u64>, redb::Error> {
    let mut out = Vec::new();
    for e in t.range((h, seq, 0)..=(h, seq, u64::MAX))? {
        out.push(e?.0.value().2);
    }
    Ok(out)
}

/// What [`ARRIVAL_KEYS`] holds of an arrival key (itself a hash): its first 8 bytes.
pub fn key_prefix(key: &[u8; 32]) -> u64 {
    u64::from_be_bytes(key[..8].try_into().expect("8 bytes"))
}

/// The local numbers filed under `hash` in [`ARRIVAL_KEYS`], each to be checked against
/// its arrival.
///
/// # Errors
/// redb errors.
pub fn key_locals<T: ReadableTable<(u64, u64), ()>>(
    t: &T,
    hash: u64,
) -> Result<Vec<u64>, redb::Error> {
    let mut out = Vec::new();
    for e in t.range((hash, 0)..=(hash, u64::MAX))? {
        out.push(e?.0.value().1);
    }
    Ok(out)
}

/// The first 8 bytes of a message id: what the search-key tables of index formats 3
/// and 4 held.
pub fn id_prefix(id: &[u8; 32]) -> [u8; 8] {
    id[..8].try_into().expect("8 bytes")
}

/// The range of message ids that start with `prefix`, for a range read of `messages`.
pub fn prefix_range(prefix: &[u8]) -> std::ops::RangeInclusive<[u8; 32]> {
    let mut lo = [0u8; 32];
    let mut hi = [0xffu8; 32];
    lo[..prefix.len()].copy_from_slice(prefix);
    hi[..prefix.len()].copy_from_slice(prefix);
    lo..=hi
}

/// What [`ADDRS`] and [`MSGIDS`] hold of message `id` whose blob is in `segment`: the
/// segment, big-endian, and the first 4 bytes of the id.
pub fn term_ref(segment: u32, id: &[u8; 32]) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&segment.to_be_bytes());
    r[4..].copy_from_slice(&id[..4]);
    r
}

/// The messages a [`term_ref`] stands for: those of `messages` whose id starts with its
/// 4 bytes and whose blob is in its segment (practically always one).
///
/// # Errors
/// redb errors.
pub fn ref_messages<T: ReadableTable<[u8; 32], &'static [u8]>>(
    messages: &T,
    r: [u8; 8],
) -> Result<Vec<[u8; 32]>, redb::Error> {
    let segment = u32::from_be_bytes(r[..4].try_into().expect("4 bytes"));
    let mut out = Vec::new();
    for e in messages.range(prefix_range(&r[4..]))? {
        let (k, v) = e?;
        if Loc::decode(v.value()).is_some_and(|l| l.segment == segment) {
            out.push(k.value());
        }
    }
    Ok(out)
}

/// What [`MSGIDS`] keys a Message-ID by: the first 8 bytes of its SHA-256.
pub fn msgid_hash(key: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(key.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The refs [`MSGIDS`] files under Message-ID `key`.
///
/// # Errors
/// redb errors.
pub fn msgid_refs<T: ReadableTable<(u64, [u8; 8]), ()>>(
    t: &T,
    key: &str,
) -> Result<Vec<[u8; 8]>, redb::Error> {
    let h = msgid_hash(key);
    let mut out = Vec::new();
    for e in t.range((h, [0u8; 8])..=(h, [0xffu8; 8]))? {
        out.push(e?.0.value().1);
    }
    Ok(out)
}
/// connection name → JSON [`CursorState`]: replication progress. Not in the log: after a
/// rebuilt index a connection starts again from zero (an idempotent resend).
pub const CURSORS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("cursors");
/// (connection name, local arrival number) → why the peer refused it (5xx, retries).
pub const PARKED: TableDefinition<'_, (&str, u64), &str> = TableDefinition::new("parked");
/// segment number → JSON [`SegmentInfo`] of a compacted segment. Rebuildable: replaying a
/// `.blk` marks it.
pub const SEGMENTS: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("segments");

/// segment number → [`super::catalog::TermFilter`] of its catalog's search keys.
/// Rebuildable: replaying a `.blk` writes it.
pub const SEGMENT_FILTERS: TableDefinition<'_, u32, &[u8]> =
    TableDefinition::new("segment_filters");

/// What the index knows of a compacted segment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentInfo {
    pub compacted: bool,
    pub blocks: u64,
    /// Size of the `.blk` file.
    pub bytes: u64,
    /// Size of the `.seg` it replaced (0 when rebuilt from the `.blk` alone).
    #[serde(default)]
    pub from_bytes: u64,
    /// Dictionary of its blocks (0: none).
    #[serde(default)]
    pub dict: u32,
    /// Offset of its catalog block in the `.blk` (0: none, as before index format 4).
    #[serde(default)]
    pub catalog: u64,
    /// The local arrival numbers its catalog holds, first and last (0: none).
    #[serde(default)]
    pub first_local: u64,
    #[serde(default)]
    pub last_local: u64,
    /// The earliest and latest arrival times its catalog holds (µs; 0: none).
    #[serde(default)]
    pub first_time: i64,
    #[serde(default)]
    pub last_time: i64,
}

impl SegmentInfo {
    /// A `segments` value; `None` if it does not parse.
    pub fn decode(b: &[u8]) -> Option<SegmentInfo> {
        serde_json::from_slice(b).ok()
    }

    /// Notes where `catalog` is (offset `at` of the `.blk`) and what it holds.
    pub fn set_catalog(&mut self, at: u64, catalog: &Catalog) {
        self.catalog = at;
        (self.first_local, self.last_local) = catalog.locals().unwrap_or((0, 0));
        (self.first_time, self.last_time) = catalog.times().unwrap_or((0, 0));
    }
}

/// One message moving from its record in a segment to its place in a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub message: MessageId,
    pub from: Loc,
    pub to: Loc,
}

pub const K_FORMAT: &str = "format";
pub const K_EPOCH: &str = "epoch";
pub const K_NODE: &str = "node";
pub const K_NEXT_SEQ: &str = "next_seq";
pub const K_NEXT_LOCAL: &str = "next_local";
pub const K_TAIL_SEG: &str = "tail_seg";
pub const K_TAIL_OFF: &str = "tail_off";
pub const K_MESSAGES: &str = "messages";
pub const K_ARRIVALS: &str = "arrivals";
pub const K_REPEATS: &str = "repeats";
pub const K_RAW_BYTES: &str = "raw_bytes";
pub const K_STORED_BYTES: &str = "stored_bytes";

/// One connection's durable replication state.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CursorState {
    /// Every local arrival number up to this one is shipped, parked or not for this
    /// connection (a low-water mark).
    pub cursor: u64,
    /// The peer's store epoch as its EHLO said, when last seen.
    #[serde(default)]
    pub peer_epoch: Option<String>,
    /// While resyncing a rebuilt peer: arrivals up to this local number go regardless of
    /// routes and trace.
    #[serde(default)]
    pub resync_until: u64,
}

/// A change of replication state, applied by the index stage only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateOp {
    SetCursor {
        connection: String,
        state: CursorState,
    },
    Park {
        connection: String,
        local: u64,
        reason: String,
    },
    Unpark {
        connection: String,
        local: u64,
    },
    /// Seal the active segment: the log stage starts a new one (and the index's tail
    /// moves into it with this commit). Nothing else changes in the index.
    Seal,
    /// The atomic switch of a compaction: every message of `segment` whose location is
    /// still `from` moves `to` its block, `segments` marks it compacted, and the rows its
    /// catalog holds leave `summaries` and `arrivals`.
    Relocate {
        segment: u32,
        moves: Vec<Move>,
        info: SegmentInfo,
        catalog: std::sync::Arc<Catalog>,
    },
}

/// Where a message's blob lives in the log: a record in a segment (`position` is
/// `None`), or an entry of a block in a compacted segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Loc {
    pub segment: u32,
    /// Offset of the record's (or the block's) first byte in the file.
    pub offset: u64,
    /// Whole record length on disk (header + payload + CRC); for a block entry, the share
    /// of the block's bytes counted for this message.
    pub record_len: u32,
    pub raw_len: u32,
    /// The entry of the block's table, for a compacted segment.
    pub position: Option<u32>,
}

impl Loc {
    /// The `messages` value of this location ([`codec::encode_loc`]).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_loc(self)
    }

    /// A `messages` value ([`codec::decode_loc`]).
    pub fn decode(b: &[u8]) -> Option<Loc> {
        codec::decode_loc(b)
    }

    /// A `messages` value of index formats 2 to 4: fixed-width little-endian fields,
    /// 20 bytes, or 24 with a block position.
    fn decode_v4(b: &[u8]) -> Option<Loc> {
        if b.len() != 20 && b.len() != 24 {
            return None;
        }
        Some(Loc {
            segment: u32::from_le_bytes(b[0..4].try_into().ok()?),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            record_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            position: match b.get(20..24) {
                Some(p) => Some(u32::from_le_bytes(p.try_into().ok()?)),
                None => None,
            },
        })
    }

    /// Whether this is a place in a compacted segment's block.
    pub fn in_block(&self) -> bool {
        self.position.is_some()
    }
}

pub fn get_u64(txn: &WriteTransaction, key: &str) -> Result<u64, redb::Error> {
    let t = txn.open_table(META)?;
    let v = t.get(key)?;
    Ok(v.and_then(|v| v.value().try_into().ok())
        .map_or(0, u64::from_le_bytes))
}

/// The counters kept in META, read once per transaction and written back once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub arrivals: u64,
    pub repeats: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub next_seq: u64,
    pub next_local: u64,
    pub tail_seg: u64,
    pub tail_off: u64,
}

impl Counters {
    const KEYS: [&'static str; 9] = [
        K_MESSAGES,
        K_ARRIVALS,
        K_REPEATS,
        K_RAW_BYTES,
        K_STORED_BYTES,
        K_NEXT_SEQ,
        K_NEXT_LOCAL,
        K_TAIL_SEG,
        K_TAIL_OFF,
    ];

    fn slots(&mut self) -> [&mut u64; 9] {
        [
            &mut self.messages,
            &mut self.arrivals,
            &mut self.repeats,
            &mut self.raw_bytes,
            &mut self.stored_bytes,
            &mut self.next_seq,
            &mut self.next_local,
            &mut self.tail_seg,
            &mut self.tail_off,
        ]
    }
}

/// Every table of the index, opened once for a write transaction: opening and closing a
/// redb table costs an update of the table directory, so a batch opens each once.
pub struct Tables<'t> {
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    messages: redb::Table<'t, [u8; 32], &'static [u8]>,
    summaries: redb::Table<'t, (u32, [u8; 32]), &'static [u8]>,
    arrivals: redb::Table<'t, u64, &'static [u8]>,
    arrival_ids: redb::Table<'t, (u64, u64, u64), ()>,
    arrival_keys: redb::Table<'t, (u64, u64), ()>,
    by_message: redb::MultimapTable<'t, (u32, [u8; 32]), u64>,
    by_time: redb::Table<'t, (i64, u64), [u8; 32]>,
    addrs: redb::MultimapTable<'t, &'static str, [u8; 8]>,
    msgids: redb::Table<'t, (u64, [u8; 8]), ()>,
    cursors: redb::Table<'t, &'static str, &'static [u8]>,
    parked: redb::Table<'t, (&'static str, u64), &'static str>,
    segments: redb::Table<'t, u32, &'static [u8]>,
    segment_filters: redb::Table<'t, u32, &'static [u8]>,
    /// Where an arrival whose row was dropped is read back (to check an id's hash).
    catalogs: &'t Catalogs,
    /// META's counters as of this transaction; written back by [`Tables::finish`].
    pub counters: Counters,
}

impl<'t> Tables<'t> {
    /// Opens (creating if needed) every table and reads the counters. `catalogs` reads
    /// the catalogs of this store's compacted segments.
    ///
    /// # Errors
    /// redb errors.
    pub fn open(txn: &'t WriteTransaction, catalogs: &'t Catalogs) -> Result<Self, redb::Error> {
        let meta = txn.open_table(META)?;
        let mut counters = Counters::default();
        for (key, slot) in Counters::KEYS.iter().zip(counters.slots()) {
            *slot = meta_u64(&meta, key);
        }
        Ok(Tables {
            meta,
            messages: txn.open_table(MESSAGES)?,
            summaries: txn.open_table(SUMMARIES)?,
            arrivals: txn.open_table(ARRIVALS)?,
            arrival_ids: txn.open_table(ARRIVAL_IDS)?,
            arrival_keys: txn.open_table(ARRIVAL_KEYS)?,
            by_message: txn.open_multimap_table(BY_MESSAGE)?,
            by_time: txn.open_table(BY_TIME)?,
            addrs: txn.open_multimap_table(ADDRS)?,
            msgids: txn.open_table(MSGIDS)?,
            cursors: txn.open_table(CURSORS)?,
            parked: txn.open_table(PARKED)?,
            segments: txn.open_table(SEGMENTS)?,
            segment_filters: txn.open_table(SEGMENT_FILTERS)?,
            catalogs,
            counters,
        })
    }

    /// Writes the counters back to META and closes the tables.
    ///
    /// # Errors
    /// redb errors.
    pub fn finish(mut self) -> Result<Counters, redb::Error> {
        let mut counters = self.counters;
        for (key, slot) in Counters::KEYS.iter().zip(counters.slots()) {
            self.meta.insert(*key, slot.to_le_bytes().as_slice())?;
        }
        Ok(counters)
    }

    fn insert_terms(
        &mut self,
        terms: &[Term],
        segment: u32,
        id: &MessageId,
    ) -> Result<(), redb::Error> {
        let r = term_ref(segment, &id.0);
        for t in terms {
            match t {
                Term::Addr(k) => self.addrs.insert(k.as_str(), r)?,
                Term::MsgId(k) => self.msgids.insert((msgid_hash(k), r), ())?.is_some(),
            };
        }
        Ok(())
    }

    /// Indexes a message blob found at `loc`. A blob already indexed is left alone (the
    /// first copy in the log wins).
    ///
    /// # Errors
    /// redb errors.
    pub fn apply_message(
        &mut self,
        id: &MessageId,
        loc: Loc,
        summary: &Summary,
    ) -> Result<bool, redb::Error> {
        if self.messages.get(id.0)?.is_some() {
            return Ok(false);
        }
        self.messages.insert(id.0, loc.encode().as_slice())?;
        self.summaries.insert(
            (loc.segment, id.0),
            codec::encode_summary(summary).as_slice(),
        )?;
        self.insert_terms(&summary_terms(summary), loc.segment, id)?;
        self.counters.messages += 1;
        self.counters.raw_bytes += u64::from(loc.raw_len);
        self.counters.stored_bytes += u64::from(loc.record_len);
        Ok(true)
    }

    /// Applies a change of replication state.
    ///
    /// # Errors
    /// redb errors.
    pub fn apply_state(&mut self, op: &StateOp) -> Result<(), redb::Error> {
        match op {
            StateOp::SetCursor { connection, state } => {
                let json = serde_json::to_vec(state).expect("cursor serializes");
                self.cursors.insert(connection.as_str(), json.as_slice())?;
            }
            StateOp::Park {
                connection,
                local,
                reason,
            } => {
                self.parked
                    .insert((connection.as_str(), *local), reason.as_str())?;
            }
            StateOp::Unpark { connection, local } => {
                self.parked.remove((connection.as_str(), *local))?;
            }
            StateOp::Seal => {}
            StateOp::Relocate {
                segment,
                moves,
                info,
                catalog,
            } => {
                for m in moves {
                    let current = self
                        .messages
                        .get(m.message.0)?
                        .and_then(|v| Loc::decode(v.value()));
                    if current != Some(m.from) {
                        continue; // another copy of the blob is the indexed one
                    }
                    self.messages
                        .insert(m.message.0, m.to.encode().as_slice())?;
                    self.counters.stored_bytes = (self.counters.stored_bytes
                        + u64::from(m.to.record_len))
                    .saturating_sub(u64::from(m.from.record_len));
                }
                self.mark_compacted(*segment, info)?;
                self.drop_cataloged(*segment, catalog)?;
            }
        }
        Ok(())
    }

    /// Notes the filter of `segment`'s catalog keys, and drops the rows that compacted
    /// segment `segment`'s catalog holds: a summary where
    /// the message's blob is indexed in that segment; an arrival, and its `by_time` row,
    /// where its id maps to the local number the catalog gives it (and its `by_message`
    /// row, where the message is in that segment too); a search key's row
    /// where the catalog finds that message under that key and no other message shares
    /// the id prefix the row holds. The live switch and the replay of a `.blk` both come
    /// here, so a rebuilt index drops what the live one did.
    ///
    /// # Errors
    /// redb errors.
    pub fn drop_cataloged(&mut self, segment: u32, catalog: &Catalog) -> Result<(), redb::Error> {
        let filter = super::catalog::TermFilter::of(catalog);
        self.segment_filters.insert(segment, filter.as_bytes())?;
        for (id, _) in &catalog.summaries {
            let here = self
                .messages
                .get(*id)?
                .and_then(|v| Loc::decode(v.value()))
                .is_some_and(|l| l.segment == segment && l.in_block());
            if here {
                self.summaries.remove((segment, *id))?;
            }
        }
        for (local, v) in &catalog.arrivals {
            let Ok(a) = codec::decode_arrival(v) else {
                continue;
            };
            // The index gives that id this number, and the row (if still there) agrees.
            let agrees = self.arrival_ids.get(id_entry(&a.id, *local))?.is_some()
                && self.arrivals.get(*local)?.is_none_or(|v| {
                    codec::decode_arrival(v.value()).is_ok_and(|row| row.id == a.id)
                });
            if agrees {
                self.arrivals.remove(*local)?;
                self.by_time.remove((time_us(&a.time), *local))?;
                // The message's own segment's catalog finds it by message: its row goes.
                if let Ok(m) = a.message.parse::<MessageId>() {
                    let here = self
                        .messages
                        .get(m.0)?
                        .and_then(|v| Loc::decode(v.value()))
                        .is_some_and(|l| l.segment == segment && l.in_block());
                    if here {
                        self.by_message.remove((segment, m.0), *local)?;
                    }
                }
            }
        }
        for (term, ids) in catalog.terms() {
            for id in ids {
                let located = self.messages.get(id)?.and_then(|v| Loc::decode(v.value()));
                let Some(loc) = located else {
                    continue;
                };
                let r = term_ref(loc.segment, &id);
                if ref_messages(&self.messages, r)?.len() > 1 {
                    continue; // the row stands for another message too
                }
                match term {
                    Term::Addr(k) => self.addrs.remove(k.as_str(), r)?,
                    Term::MsgId(k) => self.msgids.remove((msgid_hash(k), r))?.is_some(),
                };
            }
        }
        Ok(())
    }

    /// Records that `segment` is compacted (`segments` table).
    ///
    /// # Errors
    /// redb errors.
    pub fn mark_compacted(&mut self, segment: u32, info: &SegmentInfo) -> Result<(), redb::Error> {
        let json = serde_json::to_vec(info).expect("segment info serializes");
        self.segments.insert(segment, json.as_slice())?;
        Ok(())
    }

    /// What `segments` says of `segment`.
    ///
    /// # Errors
    /// redb errors.
    pub fn segment_info(&self, segment: u32) -> Result<Option<SegmentInfo>, redb::Error> {
        Ok(self
            .segments
            .get(segment)?
            .and_then(|v| SegmentInfo::decode(v.value())))
    }

    /// The arrival numbered `local`: its row, or the catalog of the compacted segment
    /// that holds it. `None` if neither has it or it does not decode.
    fn arrival_at(&self, local: u64) -> Result<Option<Arrival>, StoreError> {
        if let Some(v) = self.arrivals.get(local).map_err(idx_err)? {
            return Ok(codec::decode_arrival(v.value()).ok());
        }
        Ok(
            super::catalog::cataloged_arrival(&self.segments, self.catalogs, local)?
                .and_then(Result::ok),
        )
    }

    /// Indexes an arrival. Returns its local number, or `None` if an arrival with this id
    /// was already indexed (a replayed or replicated duplicate).
    ///
    /// # Errors
    /// redb errors; a catalog that cannot be read.
    pub fn apply_arrival(
        &mut self,
        arrival: &Arrival,
        key: Option<[u8; 32]>,
    ) -> Result<Option<u64>, StoreError> {
        let (h, seq) = id_key(&arrival.id);
        for local in id_locals(&self.arrival_ids, (h, seq)).map_err(idx_err)? {
            if self.arrival_at(local)?.is_some_and(|a| a.id == arrival.id) {
                return Ok(None);
            }
        }
        self.insert_arrival(arrival, key, (h, seq)).map_err(idx_err)
    }

    /// Numbers and indexes a new arrival, filed under `(h, seq)` ([`id_key`]).
    fn insert_arrival(
        &mut self,
        arrival: &Arrival,
        key: Option<[u8; 32]>,
        (h, seq): (u64, u64),
    ) -> Result<Option<u64>, redb::Error> {
        let local = self.counters.next_local.max(1);
        self.counters.next_local = local + 1;
        self.arrival_ids.insert((h, seq, local), ())?;
        let message: MessageId = arrival.message.parse().expect("arrival names a message id");
        self.arrivals
            .insert(local, codec::encode_arrival(arrival).as_slice())?;
        let segment = self
            .messages
            .get(message.0)?
            .and_then(|v| Loc::decode(v.value()))
            .map(|l| l.segment);
        if let Some(segment) = segment {
            self.by_message.insert((segment, message.0), local)?;
            self.insert_terms(&arrival_terms(arrival), segment, &message)?;
        }
        self.by_time
            .insert((time_us(&arrival.time), local), message.0)?;
        if let Some(key) = key {
            self.arrival_keys.insert((key_prefix(&key), local), ())?;
        }
        self.counters.arrivals += 1;
        Ok(Some(local))
    }
}

/// Re-encodes the JSON values of `arrivals` and `summaries` (index formats 1 and 2) in
/// the binary form of format 3, in key order and in chunks (memory stays bounded).
/// Returns how many of each it re-encoded. Nothing else changes.
///
/// # Errors
/// redb errors; a value that is neither form is left as it is (verify reports it).
pub fn upgrade_values(txn: &WriteTransaction) -> Result<(u64, u64), redb::Error> {
    let json = |v: &[u8]| v.first() == Some(&b'{');
    let arrivals = recode_values(txn, ARRIVALS, |v| {
        json(v)
            .then(|| codec::decode_arrival(v).ok())
            .flatten()
            .map(|a| codec::encode_arrival(&a))
    })?;
    let summaries = recode_values(txn, SUMMARIES_V4, |v| {
        json(v)
            .then(|| codec::decode_summary(v).ok())
            .flatten()
            .map(|s| codec::encode_summary(&s))
    })?;
    for (old, new) in [(ADDRS_V2, ADDRS_V4), (MSGIDS_V2, MSGIDS_V4)] {
        move_to_prefixes(txn, old, new)?;
    }
    Ok((arrivals, summaries))
}

/// Rewrites each value of table `def` that `recode` gives a new form, in key order and
/// in chunks of 4,096 (memory stays bounded). Returns how many it rewrote.
fn recode_values<K>(
    txn: &WriteTransaction,
    def: TableDefinition<'_, K, &'static [u8]>,
    recode: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<u64, redb::Error>
where
    K: redb::Key + Copy + 'static + for<'a> redb::Value<SelfType<'a> = K>,
{
    const CHUNK: usize = 4096;
    let mut t = txn.open_table(def)?;
    let mut count = 0;
    let mut from: Option<K> = None;
    loop {
        let mut chunk = Vec::new();
        let mut last = None;
        let range = match from {
            Some(f) => t.range::<K>((Bound::Excluded(f), Bound::Unbounded))?,
            None => t.range::<K>(..)?,
        };
        for e in range.take(CHUNK) {
            let (k, v) = e?;
            last = Some(k.value());
            if let Some(new) = recode(v.value()) {
                chunk.push((k.value(), new));
            }
        }
        for (k, v) in chunk {
            t.insert(k, v.as_slice())?;
            count += 1;
        }
        match last {
            Some(l) => from = Some(l),
            None => return Ok(count),
        }
    }
}

/// Moves a format-2 multimap of whole message ids into its format-3 table of prefixes.
fn move_to_prefixes(
    txn: &WriteTransaction,
    old: MultimapTableDefinition<'_, &str, [u8; 32]>,
    new: MultimapTableDefinition<'_, &str, [u8; 8]>,
) -> Result<(), redb::Error> {
    {
        let src = match txn.open_multimap_table(old) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut dst = txn.open_multimap_table(new)?;
        for e in src.iter()? {
            let (k, vs) = e?;
            for v in vs {
                dst.insert(k.value(), id_prefix(&v?.value()))?;
            }
        }
    }
    txn.delete_multimap_table(old)?;
    Ok(())
}

/// Moves `arrival_ids` and `arrival_keys` of index formats 1 to 4 (whole ids and keys)
/// into their format-5 tables of hashes and prefixes. Returns how many
/// entries moved.
///
/// # Errors
/// redb errors.
pub fn upgrade_arrival_tables(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    // (Opening a table in a write transaction creates it: an absent one moves nothing.)
    let mut moved = 0;
    {
        let src = txn.open_table(ARRIVAL_IDS_V4)?;
        let mut dst = txn.open_table(ARRIVAL_IDS)?;
        for e in src.iter()? {
            let (k, v) = e?;
            // (An id that does not parse cannot be asked for either; verify names it.)
            if let Ok(id) = k.value().parse::<ArrivalId>() {
                dst.insert(id_entry(&id, v.value()), ())?;
                moved += 1;
            }
        }
    }
    txn.delete_table(ARRIVAL_IDS_V4)?;
    {
        let src = txn.open_table(ARRIVAL_KEYS_V4)?;
        let mut dst = txn.open_table(ARRIVAL_KEYS)?;
        for e in src.iter()? {
            let (k, v) = e?;
            dst.insert((key_prefix(&k.value()), v.value()), ())?;
            moved += 1;
        }
    }
    txn.delete_table(ARRIVAL_KEYS_V4)?;
    Ok(moved)
}

/// Moves `summaries` and `by_message` of index formats 1 to 4 (keyed by message id) into
/// [`SUMMARIES`] and [`BY_MESSAGE`] (keyed by the message's segment first), after
/// [`upgrade_locations`]. A row whose message is not indexed has nothing to find it by
/// and is left out. Returns how many rows moved.
///
/// # Errors
/// redb errors.
pub fn upgrade_by_segment(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    let mut moved = 0;
    {
        let messages = txn.open_table(MESSAGES)?;
        let segment_of = |id: &[u8; 32]| -> Result<Option<u32>, redb::Error> {
            Ok(messages
                .get(id)?
                .and_then(|v| Loc::decode(v.value()))
                .map(|l| l.segment))
        };
        let src = txn.open_table(SUMMARIES_V4)?;
        let mut dst = txn.open_table(SUMMARIES)?;
        for e in src.iter()? {
            let (k, v) = e?;
            if let Some(segment) = segment_of(&k.value())? {
                dst.insert((segment, k.value()), v.value())?;
                moved += 1;
            }
        }
        let src = txn.open_multimap_table(BY_MESSAGE_V4)?;
        let mut dst = txn.open_multimap_table(BY_MESSAGE)?;
        for e in src.iter()? {
            let (k, locals) = e?;
            if let Some(segment) = segment_of(&k.value())? {
                for l in locals {
                    dst.insert((segment, k.value()), l?.value())?;
                    moved += 1;
                }
            }
        }
    }
    txn.delete_table(SUMMARIES_V4)?;
    txn.delete_multimap_table(BY_MESSAGE_V4)?;
    Ok(moved)
}

/// Moves `addr_keys` and `msgid_keys` of index formats 3 and 4 (8-byte id prefixes) into
/// [`ADDRS`] and [`MSGIDS`] ([`term_ref`]s), after [`upgrade_locations`]. Returns how many
/// rows it wrote.
///
/// # Errors
/// redb errors.
pub fn upgrade_term_refs(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    let mut moved = 0;
    {
        let messages = txn.open_table(MESSAGES)?;
        let refs_of = |p: [u8; 8]| -> Result<Vec<[u8; 8]>, redb::Error> {
            let mut out = Vec::new();
            for e in messages.range(prefix_range(&p))? {
                let (k, v) = e?;
                if let Some(l) = Loc::decode(v.value()) {
                    out.push(term_ref(l.segment, &k.value()));
                }
            }
            Ok(out)
        };
        let src = txn.open_multimap_table(ADDRS_V4)?;
        let mut dst = txn.open_multimap_table(ADDRS)?;
        for e in src.iter()? {
            let (k, ps) = e?;
            for p in ps {
                for r in refs_of(p?.value())? {
                    dst.insert(k.value(), r)?;
                    moved += 1;
                }
            }
        }
        let src = txn.open_multimap_table(MSGIDS_V4)?;
        let mut dst = txn.open_table(MSGIDS)?;
        for e in src.iter()? {
            let (k, ps) = e?;
            let h = msgid_hash(k.value());
            for p in ps {
                for r in refs_of(p?.value())? {
                    dst.insert((h, r), ())?;
                    moved += 1;
                }
            }
        }
    }
    txn.delete_multimap_table(ADDRS_V4)?;
    txn.delete_multimap_table(MSGIDS_V4)?;
    Ok(moved)
}

/// Re-encodes the `messages` values of index formats 2 to 4 ([`Loc::decode_v4`]) in the
/// form of format 5, in key order and in chunks. Returns how many it re-encoded; a value
/// of neither form is left as it is (verify reports it).
///
/// # Errors
/// redb errors.
pub fn upgrade_locations(txn: &WriteTransaction) -> Result<u64, redb::Error> {
    recode_values(txn, MESSAGES, |v| Loc::decode_v4(v).map(|l| l.encode()))
}

fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    r: &ReadTransaction,
    w: &WriteTransaction,
    def: TableDefinition<'_, K, V>,
) -> Result<(), redb::Error> {
    let src = match r.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut dst = w.open_table(def)?;
    for e in src.iter()? {
        let (k, v) = e?;
        dst.insert(k.value(), v.value())?;
    }
    Ok(())
}

fn copy_multimap<K: redb::Key + 'static, V: redb::Key + 'static>(
    r: &ReadTransaction,
    w: &WriteTransaction,
    def: MultimapTableDefinition<'_, K, V>,
) -> Result<(), redb::Error> {
    let src = match r.open_multimap_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut dst = w.open_multimap_table(def)?;
    for e in src.iter()? {
        let (k, vs) = e?;
        for v in vs {
            dst.insert(k.value(), v?.value())?;
        }
    }
    Ok(())
}

/// Copies every table of the index from `r` into the empty database of `w`, each in
/// key order (so that redb fills its pages: [`super::compactor::compact_index`]).
///
/// # Errors
/// redb errors.
pub fn copy_tables(r: &ReadTransaction, w: &WriteTransaction) -> Result<(), redb::Error> {
    copy_table(r, w, META)?;
    copy_table(r, w, MESSAGES)?;
    copy_table(r, w, SUMMARIES)?;
    copy_table(r, w, ARRIVALS)?;
    copy_table(r, w, ARRIVAL_IDS)?;
    copy_table(r, w, ARRIVAL_KEYS)?;
    copy_multimap(r, w, BY_MESSAGE)?;
    copy_table(r, w, BY_TIME)?;
    copy_multimap(r, w, ADDRS)?;
    copy_table(r, w, MSGIDS)?;
    copy_table(r, w, CURSORS)?;
    copy_table(r, w, PARKED)?;
    copy_table(r, w, SEGMENTS)?;
    copy_table(r, w, SEGMENT_FILTERS)?;
    Ok(())
}

/// Every table of `txn` by name, kind and number of entries.
fn table_census(txn: &ReadTransaction) -> Result<Vec<(String, bool, u64)>, redb::Error> {
    use redb::{MultimapTableHandle, TableHandle};
    let mut out = Vec::new();
    for h in txn.list_tables()? {
        let name = h.name().to_owned();
        let t = txn.open_untyped_table(h)?;
        out.push((name, false, t.len()?));
    }
    for h in txn.list_multimap_tables()? {
        let name = h.name().to_owned();
        let t = txn.open_untyped_multimap_table(h)?;
        out.push((name, true, t.len()?));
    }
    out.sort();
    Ok(out)
}

/// Whether two indexes hold the same tables with as many entries each (a copy made by
/// [`copy_tables`] misses nothing).
///
/// # Errors
/// What differs, or a redb error.
pub fn same_tables(a: &ReadTransaction, b: &ReadTransaction) -> Result<(), String> {
    let a = table_census(a).map_err(|e| e.to_string())?;
    let b = table_census(b).map_err(|e| e.to_string())?;
    if a == b {
        Ok(())
    } else {
        Err(format!("the rewritten index differs: {a:?} became {b:?}"))
    }
}

/// Parses an arrival's RFC 3339 time into µs since the Unix epoch.
pub fn time_us(time: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time).map_or(0, |t| t.timestamp_micros())
}

/// The number of entries of a table, for status and verify.
pub fn table_len<T: ReadableTableMetadata>(t: &T) -> u64 {
    t.len().unwrap_or(0)
}

/// Reads a META u64 from any readable table.
pub fn meta_u64<T: ReadableTable<&'static str, &'static [u8]>>(t: &T, key: &str) -> u64 {
    t.get(key)
        .ok()
        .flatten()
        .and_then(|v| v.value().try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
