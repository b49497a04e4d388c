//! The redb index: tables, and the one function each that applies a log record to them.
//!
//! Everything here but `repeats` is rebuildable from the log alone: recovery replays log
//! records through [`apply_message`] and [`apply_arrival`], the same functions ingest
//! uses, so a replayed store and a live one cannot differ.

use redb::{
    MultimapTableDefinition, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use super::summary::{domain_of, Summary};
use super::Arrival;
use crate::ids::MessageId;

/// Small values: format, epoch, node, counters, the log position indexed so far.
pub const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// message id → [`Loc`] of its blob record.
pub const MESSAGES: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("messages");
/// message id → JSON [`Summary`] of its top-level headers.
pub const SUMMARIES: TableDefinition<'_, [u8; 32], &[u8]> = TableDefinition::new("summaries");
/// local arrival number (log order) → JSON [`Arrival`].
pub const ARRIVALS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("arrivals");
/// arrival id (`NODE/EPOCH/SEQ`) → local arrival number. Replicated arrivals dedupe here.
pub const ARRIVAL_IDS: TableDefinition<'_, &str, u64> = TableDefinition::new("arrival_ids");
/// arrival key → local arrival number. A client's retry dedupes here.
pub const ARRIVAL_KEYS: TableDefinition<'_, [u8; 32], u64> = TableDefinition::new("arrival_keys");
/// message id → local arrival numbers.
pub const BY_MESSAGE: MultimapTableDefinition<'_, [u8; 32], u64> =
    MultimapTableDefinition::new("by_message");
/// (arrival time µs, local arrival number) → message id.
pub const BY_TIME: TableDefinition<'_, (i64, u64), [u8; 32]> = TableDefinition::new("by_time");
/// `f:addr`, `f:@domain`, `t:addr`, `t:@domain` → message ids.
pub const ADDRS: MultimapTableDefinition<'_, &str, [u8; 32]> =
    MultimapTableDefinition::new("addrs");
/// Message-ID header (lowercased, no brackets) → message ids.
pub const MSGIDS: MultimapTableDefinition<'_, &str, [u8; 32]> =
    MultimapTableDefinition::new("msgids");

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

/// Where a message's blob lives in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub segment: u32,
    /// Offset of the record's first byte in the segment.
    pub offset: u64,
    /// Whole record length on disk (header + payload + CRC).
    pub record_len: u32,
    pub raw_len: u32,
}

impl Loc {
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&self.segment.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.record_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Loc> {
        if b.len() != 20 {
            return None;
        }
        Some(Loc {
            segment: u32::from_le_bytes(b[0..4].try_into().ok()?),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            record_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }
}

pub fn get_u64(txn: &WriteTransaction, key: &str) -> Result<u64, redb::Error> {
    let t = txn.open_table(META)?;
    let v = t.get(key)?;
    Ok(v.and_then(|v| v.value().try_into().ok())
        .map_or(0, u64::from_le_bytes))
}

pub fn put_u64(txn: &WriteTransaction, key: &str, v: u64) -> Result<(), redb::Error> {
    txn.open_table(META)?
        .insert(key, v.to_le_bytes().as_slice())?;
    Ok(())
}

pub fn add_u64(txn: &WriteTransaction, key: &str, delta: u64) -> Result<(), redb::Error> {
    let v = get_u64(txn, key)?;
    put_u64(txn, key, v + delta)
}

/// Creates every table so read-only opens find them.
pub fn create_tables(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(META)?;
    txn.open_table(MESSAGES)?;
    txn.open_table(SUMMARIES)?;
    txn.open_table(ARRIVALS)?;
    txn.open_table(ARRIVAL_IDS)?;
    txn.open_table(ARRIVAL_KEYS)?;
    txn.open_multimap_table(BY_MESSAGE)?;
    txn.open_table(BY_TIME)?;
    txn.open_multimap_table(ADDRS)?;
    txn.open_multimap_table(MSGIDS)?;
    Ok(())
}

/// Whether the message's blob is already indexed.
pub fn has_message(txn: &WriteTransaction, id: &MessageId) -> Result<bool, redb::Error> {
    Ok(txn.open_table(MESSAGES)?.get(id.0)?.is_some())
}

/// Indexes a message blob found at `loc`. A blob already indexed is left alone (the
/// first copy in the log wins).
pub fn apply_message(
    txn: &WriteTransaction,
    id: &MessageId,
    loc: Loc,
    summary: &Summary,
) -> Result<bool, redb::Error> {
    let mut messages = txn.open_table(MESSAGES)?;
    if messages.get(id.0)?.is_some() {
        return Ok(false);
    }
    messages.insert(id.0, loc.encode().as_slice())?;
    drop(messages);
    let json = serde_json::to_vec(summary).expect("summary serializes");
    txn.open_table(SUMMARIES)?.insert(id.0, json.as_slice())?;
    let mut addrs = txn.open_multimap_table(ADDRS)?;
    for (prefix, list) in [("f:", &summary.from), ("t:", &summary.to)] {
        for a in list {
            addrs.insert(format!("{prefix}{a}").as_str(), id.0)?;
            if let Some(d) = domain_of(a) {
                addrs.insert(format!("{prefix}{d}").as_str(), id.0)?;
            }
        }
    }
    if let Some(mid) = &summary.message_id {
        txn.open_multimap_table(MSGIDS)?
            .insert(mid.to_lowercase().as_str(), id.0)?;
    }
    add_u64(txn, K_MESSAGES, 1)?;
    add_u64(txn, K_RAW_BYTES, u64::from(loc.raw_len))?;
    add_u64(txn, K_STORED_BYTES, u64::from(loc.record_len))?;
    Ok(true)
}

/// Parses an arrival's RFC 3339 time into µs since the Unix epoch.
pub fn time_us(time: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(time).map_or(0, |t| t.timestamp_micros())
}

/// Indexes an arrival. Returns its local number, or `None` if an arrival with this id
/// was already indexed (a replayed or replicated duplicate).
pub fn apply_arrival(
    txn: &WriteTransaction,
    arrival: &Arrival,
    key: Option<[u8; 32]>,
) -> Result<Option<u64>, redb::Error> {
    let id = arrival.id.to_string();
    let mut ids = txn.open_table(ARRIVAL_IDS)?;
    if ids.get(id.as_str())?.is_some() {
        return Ok(None);
    }
    let local = get_u64(txn, K_NEXT_LOCAL)?.max(1);
    ids.insert(id.as_str(), local)?;
    drop(ids);
    put_u64(txn, K_NEXT_LOCAL, local + 1)?;
    let message: MessageId = arrival.message.parse().expect("arrival names a message id");
    let json = serde_json::to_vec(arrival).expect("arrival serializes");
    txn.open_table(ARRIVALS)?.insert(local, json.as_slice())?;
    txn.open_multimap_table(BY_MESSAGE)?
        .insert(message.0, local)?;
    txn.open_table(BY_TIME)?
        .insert((time_us(&arrival.time), local), message.0)?;
    if let Some(key) = key {
        txn.open_table(ARRIVAL_KEYS)?.insert(key, local)?;
    }
    let mut addrs = txn.open_multimap_table(ADDRS)?;
    if !arrival.mail_from.is_empty() {
        let a = arrival.mail_from.to_lowercase();
        addrs.insert(format!("f:{a}").as_str(), message.0)?;
        if let Some(d) = domain_of(&a) {
            addrs.insert(format!("f:{d}").as_str(), message.0)?;
        }
    }
    for r in &arrival.rcpt_to {
        let a = r.to_lowercase();
        addrs.insert(format!("t:{a}").as_str(), message.0)?;
        if let Some(d) = domain_of(&a) {
            addrs.insert(format!("t:{d}").as_str(), message.0)?;
        }
    }
    add_u64(txn, K_ARRIVALS, 1)?;
    Ok(Some(local))
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
