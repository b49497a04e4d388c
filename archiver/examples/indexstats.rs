//! Where the bytes of an `index.redb` go: per table, its entries, the bytes of its keys
//! and values, and redb's own statistics (stored leaf bytes, metadata, fragmentation,
//! pages); then the database's totals and the file's size.
//!
//! Usage: `indexstats <data-dir or index.redb>`. Opens the index read-only in spirit (it
//! runs no write but `begin_write` for the database statistics); stop the daemon first.

use std::path::PathBuf;

use redb::{
    Key, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableStats, Value,
};

use coffer_archiver::store::index;

struct Row {
    name: String,
    entries: u64,
    key_bytes: u64,
    value_bytes: u64,
    stats: TableStats,
}

fn table<K: Key + 'static, V: Value + 'static>(
    txn: &redb::ReadTransaction,
    def: TableDefinition<'_, K, V>,
) -> Option<Row> {
    let t = txn.open_table(def).ok()?;
    let (mut entries, mut key_bytes, mut value_bytes) = (0, 0, 0);
    for e in t.iter().ok()? {
        let (k, v) = e.ok()?;
        entries += 1;
        key_bytes += K::as_bytes(&k.value()).as_ref().len() as u64;
        value_bytes += V::as_bytes(&v.value()).as_ref().len() as u64;
    }
    Some(Row {
        name: def.to_string(),
        entries,
        key_bytes,
        value_bytes,
        stats: t.stats().ok()?,
    })
}

fn multimap<K: Key + 'static, V: Key + 'static>(
    txn: &redb::ReadTransaction,
    def: MultimapTableDefinition<'_, K, V>,
) -> Option<Row> {
    let t = txn.open_multimap_table(def).ok()?;
    let (mut entries, mut key_bytes, mut value_bytes) = (0, 0, 0);
    for e in t.iter().ok()? {
        let (k, vs) = e.ok()?;
        let klen = K::as_bytes(&k.value()).as_ref().len() as u64;
        for v in vs {
            let v = v.ok()?;
            entries += 1;
            key_bytes += klen;
            value_bytes += V::as_bytes(&v.value()).as_ref().len() as u64;
        }
    }
    Some(Row {
        name: format!("{def} (multimap)"),
        entries,
        key_bytes,
        value_bytes,
        stats: t.stats().ok()?,
    })
}

fn main() {
    let arg = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: indexstats <data-dir>"),
    );
    let path = if arg.is_dir() {
        arg.join("index.redb")
    } else {
        arg
    };
    let file_bytes = std::fs::metadata(&path).expect("index.redb").len();
    let db = redb::Database::open(&path).expect("open index.redb");
    let txn = db.begin_read().expect("read transaction");
    let rows: Vec<Row> = [
        table(&txn, index::META),
        table(&txn, index::MESSAGES),
        table(&txn, index::SUMMARIES),
        table(&txn, index::ARRIVALS),
        table(&txn, index::ARRIVAL_IDS),
        table(&txn, index::ARRIVAL_KEYS),
        multimap(&txn, index::BY_MESSAGE),
        table(&txn, index::BY_TIME),
        multimap(&txn, index::ADDRS),
        table(&txn, index::MSGIDS),
        table(&txn, index::CURSORS),
        table(&txn, index::PARKED),
        table(&txn, index::SEGMENTS),
        table(&txn, index::SEGMENT_FILTERS),
    ]
    .into_iter()
    .flatten()
    .collect();
    println!(
        "{:<26} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>6} {:>6}",
        "table",
        "entries",
        "key B",
        "value B",
        "leaf B",
        "meta B",
        "frag B",
        "leaf",
        "branch",
        "pages B"
    );
    let mut sum_pages = 0;
    for r in &rows {
        let s = &r.stats;
        let pages = (s.leaf_pages() + s.branch_pages()) * 4096;
        sum_pages += pages;
        println!(
            "{:<26} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>6} {:>6}",
            r.name,
            r.entries,
            r.key_bytes,
            r.value_bytes,
            s.stored_bytes(),
            s.metadata_bytes(),
            s.fragmented_bytes(),
            s.leaf_pages(),
            s.branch_pages(),
            pages
        );
    }
    drop(txn);
    let w = db.begin_write().expect("write transaction");
    let s = w.stats().expect("database stats");
    println!(
        "database: allocated pages {} (page {} B), leaf {} branch {}, stored {} B, \
         metadata {} B, fragmented {} B; table pages {} B; file {} B",
        s.allocated_pages(),
        s.page_size(),
        s.leaf_pages(),
        s.branch_pages(),
        s.stored_bytes(),
        s.metadata_bytes(),
        s.fragmented_bytes(),
        sum_pages,
        file_bytes
    );
    w.abort().expect("abort");
}
