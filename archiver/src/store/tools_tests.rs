//! Tests of the maintenance tools: `verify --deep` finding damage, `reindex`, `backup`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::envelope::{Envelope, SessionInfo};

fn opts(dir: &Path, segment_size: u64) -> StoreOptions {
    StoreOptions {
        data_dir: dir.to_owned(),
        node: "node-a".into(),
        segment_size,
        max_pending: 256 << 20,
        min_free_disk: 0,
        ..StoreOptions::default()
    }
}

fn msg(i: usize, from: &str) -> Incoming {
    let body = format!(
        "From: sender{i}@example.org\r\nTo: rcpt{}@example.net\r\nSubject: message {i}\r\n\
         Message-ID: <m{i}@example.org>\r\n\r\n{}\r\n",
        i % 3,
        "body text ".repeat(20 + i % 50)
    );
    Incoming {
        bytes: body.into_bytes(),
        envelope: Envelope {
            mail_from: from.into(),
            mail_params: vec![],
            rcpt_to: vec![format!("rcpt{}@example.net", i % 3)],
        },
        session: SessionInfo {
            listener: "journal".into(),
            protocol: "ESMTP".into(),
            client_addr: Some("127.0.0.1:1".into()),
            helo: Some("c".into()),
            queue_id: None,
            xcoffer: None,
            tls: None,
        },
    }
}

/// A closed store of `n` messages (one of them also arriving twice, one a retry).
fn filled(dir: &Path, n: usize, segment_size: u64) -> Vec<Receipt> {
    let store = Store::open(opts(dir, segment_size)).unwrap();
    let h = store.handle();
    let mut out: Vec<Receipt> = (0..n)
        .map(|i| h.ingest_blocking(msg(i, "a@example.org")).unwrap())
        .collect();
    out.push(h.ingest_blocking(msg(0, "other@example.org")).unwrap());
    assert!(h.ingest_blocking(msg(1, "a@example.org")).unwrap().repeat);
    drop(h);
    store.close();
    out
}

fn verify(dir: &Path, deep: bool) -> VerifyReport {
    StoreReader::open(dir)
        .unwrap()
        .verify(deep, &mut |_, _| {})
        .unwrap()
}

fn seg(dir: &Path, n: u32) -> std::path::PathBuf {
    log::segment_path(&dir.join(log::LOG_DIR), n)
}

fn all(dir: &Path) -> (Vec<MessageRecord>, StoreStatus) {
    let r = StoreReader::open(dir).unwrap();
    let q = Query::default();
    (r.search(&q).unwrap(), r.status().unwrap())
}

#[test]
fn deep_verify_finds_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let receipts = filled(dir.path(), 5, 64 << 20);
    assert!(verify(dir.path(), true).problems.is_empty());
    // Flip a byte inside the first record's payload (segment header 64 + record header 56).
    let path = seg(dir.path(), 1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[64 + 56 + 10] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();

    let shallow = verify(dir.path(), false);
    let first = receipts[0].message_id.to_hex();
    assert!(
        shallow.problems.iter().any(|p| p.contains(&first)
            && p.contains("checksum")
            && p.contains("00000001.seg at 64")),
        "{:?}",
        shallow.problems
    );
    let deep = verify(dir.path(), true);
    assert!(
        deep.problems
            .iter()
            .any(|p| p.contains("00000001.seg: damaged at offset 64")),
        "{:?}",
        deep.problems
    );
}

#[test]
fn deep_verify_finds_a_truncated_segment_that_is_not_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 40, 4096);
    let segs = log::list_segments(&io::RealVfs, &dir.path().join(log::LOG_DIR)).unwrap();
    assert!(segs.len() > 3, "{segs:?}");
    let path = seg(dir.path(), 2);
    let len = std::fs::metadata(&path).unwrap().len();
    let cut = len - 100;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let report = verify(dir.path(), true);
    let named: Vec<&String> = report
        .problems
        .iter()
        .filter(|p| p.contains("00000002.seg: damaged at offset"))
        .collect();
    assert_eq!(named.len(), 1, "{:?}", report.problems);
    // The offset named is where the last whole record ends, before the cut.
    let at: u64 = named[0]
        .split("offset ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(at < cut && at >= record::SEGMENT_HEADER_LEN, "{at} {cut}");
}

#[test]
fn deep_verify_finds_a_missing_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let receipts = filled(dir.path(), 5, 64 << 20);
    let gone = receipts[2].message_id;
    {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        let db = b.create(dir.path().join(engine::INDEX_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(index::MESSAGES).unwrap();
            assert!(t.remove(gone.0).unwrap().is_some());
        }
        txn.commit().unwrap();
    }
    let report = verify(dir.path(), true);
    let hex = gone.to_hex();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains(&hex) && p.contains("in the log but not in the index")),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("counts 5 messages but holds 4")),
        "{:?}",
        report.problems
    );
    // A reindex repairs it.
    let r = reindex::reindex(dir.path(), "node-a", &mut |_, _| {}).unwrap();
    assert!(r.verify.problems.is_empty(), "{:?}", r.verify.problems);
    assert_eq!(r.after.messages, 5);
    assert!(verify(dir.path(), true).problems.is_empty());
}

#[test]
fn reindex_rebuilds_an_equal_index() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 30, 4096);
    let (records, status) = all(dir.path());
    assert_eq!(status.repeats, 1);
    std::fs::write(dir.path().join(reindex::OLD_INDEX_FILE), b"stale").unwrap();

    let r = reindex::reindex(dir.path(), "node-a", &mut |_, _| {}).unwrap();
    assert!(r.verify.problems.is_empty(), "{:?}", r.verify.problems);
    assert_eq!(r.kept_old, None);
    assert_eq!(r.before.as_ref(), Some(&status));
    assert!(!dir.path().join(reindex::OLD_INDEX_FILE).exists());

    let (again, after) = all(dir.path());
    assert_eq!(again, records);
    assert_eq!(
        after, status,
        "every total, repeats included, comes back from the log"
    );
    assert_eq!(r.after, after);
    // Arrival keys came back: a retry is still a repeat, and sequence numbers go on.
    let store = Store::open(opts(dir.path(), 4096)).unwrap();
    let h = store.handle();
    assert!(h.ingest_blocking(msg(3, "a@example.org")).unwrap().repeat);
    let next = h.ingest_blocking(msg(99, "a@example.org")).unwrap();
    assert_eq!(next.arrival_id.seq, status.arrivals + 1);
}

#[test]
fn reindex_refuses_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 2, 64 << 20);
    let store = Store::open(opts(dir.path(), 64 << 20)).unwrap();
    let err = reindex::reindex(dir.path(), "node-a", &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, StoreError::DaemonRunning(_)), "{err}");
    assert!(dir.path().join(engine::INDEX_FILE).exists());
    assert!(!dir.path().join(reindex::OLD_INDEX_FILE).exists());
    store.close();
    let missing = dir.path().join("nothing-here");
    assert!(matches!(
        reindex::reindex(&missing, "n", &mut |_, _| {}),
        Err(StoreError::NoStore(_))
    ));
}

#[test]
fn backup_under_load_restores_everything_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dest = dir.path().join("dest");
    let store = Store::open(opts(&src, 16 << 10)).unwrap();
    let h = store.handle();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (h, acked, stop) = (h.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 50 {
                let r = h.ingest_blocking(msg(i, "load@example.org")).unwrap();
                acked.lock().unwrap().push(r.message_id);
                i += 1;
            }
        })
    };
    while acked.lock().unwrap().len() < 30 {
        std::thread::yield_now();
    }
    let before: Vec<MessageId> = acked.lock().unwrap().clone();
    let report = backup::backup(&src, "node-a", &dest, &mut |_, _| {}).unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    drop(h);
    store.close();

    assert!(report.segments > 1, "{report:?}");
    assert!(report.status.messages >= before.len() as u64);
    let copy = StoreReader::open(&dest).unwrap();
    let v = copy.verify(true, &mut |_, _| {}).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.messages_checked, report.status.messages);
    for id in &before {
        copy.read_message(id).unwrap();
    }
    let st = copy.status().unwrap();
    assert_eq!(st.node, "node-a");
    assert_eq!(
        st.epoch,
        StoreReader::open(&src).unwrap().status().unwrap().epoch
    );
    // Every arrival in the copy is one of the original's.
    let ids = |r: &StoreReader| -> BTreeSet<String> {
        r.search(&Query::default())
            .unwrap()
            .into_iter()
            .flat_map(|m| m.arrivals.into_iter().map(|a| a.id.to_string()))
            .collect()
    };
    let original = ids(&StoreReader::open(&src).unwrap());
    assert!(ids(&copy).is_subset(&original));
    drop(copy);

    // cofferd can open it and go on.
    let store = Store::open(opts(&dest, 16 << 10)).unwrap();
    assert!(
        store
            .handle()
            .ingest_blocking(msg(0, "load@example.org"))
            .unwrap()
            .repeat
    );
    store.close();
    // A backup never goes over an existing store.
    assert!(backup::backup(&src, "node-a", &dest, &mut |_, _| {}).is_err());
}

#[test]
fn backup_without_a_daemon_and_into_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dest = dir.path().join("dest");
    filled(&src, 5, 64 << 20);
    std::fs::create_dir(&dest).unwrap();
    let r = backup::backup(&src, "node-a", &dest, &mut |_, _| {}).unwrap();
    assert_eq!(
        (r.segments, r.status.messages, r.status.arrivals),
        (1, 5, 6)
    );
    let (a, _) = all(&src);
    let (b, _) = all(&dest);
    assert_eq!(a, b);
    assert!(!dir.path().join(".dest.coffer-backup").exists());
}

/// Every row of `arrivals`, decoded.
fn arrival_rows(txn: &redb::WriteTransaction) -> Vec<(u64, Arrival)> {
    use redb::ReadableTable;
    txn.open_table(index::ARRIVALS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            (k.value(), codec::decode_arrival(v.value()).unwrap())
        })
        .collect()
}

/// Rewrites an index of a store with no compacted segment as formats 2 to 4 kept
/// arrival ids, arrival keys, locations, summaries and message arrivals: whole ids and
/// keys, fixed-width locations, summaries and arrivals by message id alone.
fn downgrade_to_format_4(txn: &redb::WriteTransaction) {
    use redb::{ReadableMultimapTable, ReadableTable};
    {
        let messages = txn.open_table(index::MESSAGES).unwrap();
        let src = txn.open_multimap_table(index::ADDRS).unwrap();
        let mut dst = txn.open_multimap_table(index::ADDRS_V4).unwrap();
        for e in src.iter().unwrap() {
            let (k, refs) = e.unwrap();
            for r in refs {
                for id in index::ref_messages(&messages, r.unwrap().value()).unwrap() {
                    dst.insert(k.value(), index::id_prefix(&id)).unwrap();
                }
            }
        }
        // Message-IDs are kept hashed now: the old rows come from the summaries.
        let summaries = txn.open_table(index::SUMMARIES).unwrap();
        let mut dst = txn.open_multimap_table(index::MSGIDS_V4).unwrap();
        for e in summaries.iter().unwrap() {
            let (k, v) = e.unwrap();
            let s = codec::decode_summary(v.value()).unwrap();
            for t in index::summary_terms(&s) {
                if let index::Term::MsgId(m) = t {
                    dst.insert(m.as_str(), index::id_prefix(&k.value().1))
                        .unwrap();
                }
            }
        }
    }
    txn.delete_multimap_table(index::ADDRS).unwrap();
    txn.delete_table(index::MSGIDS).unwrap();
    {
        let src = txn.open_table(index::SUMMARIES).unwrap();
        let mut dst = txn.open_table(index::SUMMARIES_V4).unwrap();
        for e in src.iter().unwrap() {
            let (k, v) = e.unwrap();
            dst.insert(k.value().1, v.value()).unwrap();
        }
        let src = txn.open_multimap_table(index::BY_MESSAGE).unwrap();
        let mut dst = txn.open_multimap_table(index::BY_MESSAGE_V4).unwrap();
        for e in src.iter().unwrap() {
            let (k, locals) = e.unwrap();
            for l in locals {
                dst.insert(k.value().1, l.unwrap().value()).unwrap();
            }
        }
    }
    txn.delete_table(index::SUMMARIES).unwrap();
    txn.delete_multimap_table(index::BY_MESSAGE).unwrap();
    let rows = arrival_rows(txn);
    {
        let keys = txn.open_table(index::ARRIVAL_KEYS).unwrap();
        let mut old_ids = txn.open_table(index::ARRIVAL_IDS_V4).unwrap();
        let mut old_keys = txn.open_table(index::ARRIVAL_KEYS_V4).unwrap();
        for (local, a) in &rows {
            old_ids.insert(a.id.to_string().as_str(), local).unwrap();
            if let Some(key) = engine::arrival_key(a) {
                if keys
                    .get((index::key_prefix(&key), *local))
                    .unwrap()
                    .is_some()
                {
                    old_keys.insert(key, local).unwrap();
                }
            }
        }
        let mut messages = txn.open_table(index::MESSAGES).unwrap();
        let locs: Vec<([u8; 32], index::Loc)> = messages
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value(), index::Loc::decode(v.value()).unwrap())
            })
            .collect();
        for (id, l) in locs {
            let mut v = Vec::new();
            v.extend_from_slice(&l.segment.to_le_bytes());
            v.extend_from_slice(&l.offset.to_le_bytes());
            v.extend_from_slice(&l.record_len.to_le_bytes());
            v.extend_from_slice(&l.raw_len.to_le_bytes());
            if let Some(p) = l.position {
                v.extend_from_slice(&p.to_le_bytes());
            }
            messages.insert(id, v.as_slice()).unwrap();
        }
    }
    txn.delete_table(index::ARRIVAL_IDS).unwrap();
    txn.delete_table(index::ARRIVAL_KEYS).unwrap();
}

/// Rewrites a current index as format 2 wrote it: JSON `arrivals` and `summaries`,
/// whole message ids in `addrs` and `msgids`, and what [`downgrade_to_format_4`] does.
fn downgrade_to_format_2(dir: &Path) {
    use redb::{ReadableMultimapTable, ReadableTable};
    let db = redb::Database::open(dir.join(engine::INDEX_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    downgrade_to_format_4(&txn);
    {
        let all = arrival_rows(&txn);
        let mut t = txn.open_table(index::ARRIVALS).unwrap();
        for (k, a) in all {
            t.insert(k, serde_json::to_vec(&a).unwrap().as_slice())
                .unwrap();
        }
        let mut t = txn.open_table(index::SUMMARIES_V4).unwrap();
        let all: Vec<([u8; 32], summary::Summary)> = t
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value(), codec::decode_summary(v.value()).unwrap())
            })
            .collect();
        for (k, s) in all {
            t.insert(k, serde_json::to_vec(&s).unwrap().as_slice())
                .unwrap();
        }
        let ids: Vec<[u8; 32]> = txn
            .open_table(index::MESSAGES)
            .unwrap()
            .iter()
            .unwrap()
            .map(|e| e.unwrap().0.value())
            .collect();
        for (new, old) in [
            (index::ADDRS_V4, index::ADDRS_V2),
            (index::MSGIDS_V4, index::MSGIDS_V2),
        ] {
            {
                let src = txn.open_multimap_table(new).unwrap();
                let mut dst = txn.open_multimap_table(old).unwrap();
                for e in src.iter().unwrap() {
                    let (k, vs) = e.unwrap();
                    for v in vs {
                        let p = v.unwrap().value();
                        for id in ids.iter().filter(|id| index::id_prefix(id) == p) {
                            dst.insert(k.value(), id).unwrap();
                        }
                    }
                }
            }
            txn.delete_multimap_table(new).unwrap();
        }
        let mut meta = txn.open_table(index::META).unwrap();
        meta.insert(index::K_FORMAT, 2u32.to_le_bytes().as_slice())
            .unwrap();
        let state = index::CursorState {
            cursor: 3,
            peer_epoch: Some("0badcafe".into()),
            resync_until: 2,
        };
        txn.open_table(index::CURSORS)
            .unwrap()
            .insert("peer", serde_json::to_vec(&state).unwrap().as_slice())
            .unwrap();
        txn.open_table(index::PARKED)
            .unwrap()
            .insert(("peer", 2), "550 refused")
            .unwrap();
    }
    txn.commit().unwrap();
}

/// (format, JSON values left, cursors, parked) of a closed store's index.
type IndexState = (
    u32,
    usize,
    Vec<(String, Vec<u8>)>,
    Vec<(String, u64, String)>,
);

fn index_state(dir: &Path) -> IndexState {
    use redb::{ReadableDatabase, ReadableTable};
    let db = redb::Database::open(dir.join(engine::INDEX_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(index::META).unwrap();
    let format = u32::from_le_bytes(
        meta.get(index::K_FORMAT)
            .unwrap()
            .unwrap()
            .value()
            .try_into()
            .unwrap(),
    );
    let arrivals = txn.open_table(index::ARRIVALS).unwrap();
    let mut values: Vec<Vec<u8>> = arrivals
        .iter()
        .unwrap()
        .map(|e| e.unwrap().1.value().to_vec())
        .collect();
    if format < 5 {
        let t = txn.open_table(index::SUMMARIES_V4).unwrap();
        values.extend(t.iter().unwrap().map(|e| e.unwrap().1.value().to_vec()));
    } else {
        let t = txn.open_table(index::SUMMARIES).unwrap();
        values.extend(t.iter().unwrap().map(|e| e.unwrap().1.value().to_vec()));
    }
    let json = values.iter().filter(|v| v.first() == Some(&b'{')).count();
    let cursors = txn
        .open_table(index::CURSORS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            (k.value().to_owned(), v.value().to_vec())
        })
        .collect();
    let parked = txn
        .open_table(index::PARKED)
        .unwrap()
        .iter()
        .unwrap()
        .map(|e| {
            let (k, v) = e.unwrap();
            let (c, l) = k.value();
            (c.to_owned(), l, v.value().to_owned())
        })
        .collect();
    (format, json, cursors, parked)
}

#[test]
fn a_format_2_index_is_upgraded_on_open_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let receipts = filled(dir.path(), 40, 8192);
    let (records, status) = all(dir.path());
    assert_eq!(status.repeats, 1);
    assert_eq!(records.len(), 40);
    downgrade_to_format_2(dir.path());
    let (format, json, cursors, parked) = index_state(dir.path());
    assert_eq!((format, json), (2, 41 + 40));

    let store = Store::open(opts(dir.path(), 8192)).unwrap();
    store.close();
    let (format, json, cursors_after, parked_after) = index_state(dir.path());
    assert_eq!((format, json), (record::INDEX_FORMAT, 0));
    assert_eq!(cursors_after, cursors);
    assert_eq!(parked_after, parked);
    assert_eq!(
        parked_after,
        vec![("peer".to_owned(), 2, "550 refused".to_owned())]
    );

    let (again, after) = all(dir.path());
    assert_eq!(again, records);
    assert_eq!(after, status);
    {
        use redb::{ReadableDatabase, TableHandle};
        let db = redb::Database::open(dir.path().join(engine::INDEX_FILE)).unwrap();
        let names: Vec<String> = db
            .begin_read()
            .unwrap()
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(!names.contains(&"arrival_ids".to_owned()), "{names:?}");
        assert!(!names.contains(&"arrival_keys".to_owned()), "{names:?}");
    }
    let r = StoreReader::open(dir.path()).unwrap();
    for (i, receipt) in receipts.iter().take(40).enumerate() {
        let q = Query {
            from: Some(format!("sender{i}@example.org")),
            ..Query::default()
        };
        let found = r.search(&q).unwrap();
        assert_eq!(found.len(), 1, "{i}");
        assert_eq!(found[0].id, receipt.message_id.to_hex());
        let q = Query {
            message_id: Some(format!("<m{i}@example.org>")),
            ..Query::default()
        };
        assert_eq!(r.search(&q).unwrap()[0].id, receipt.message_id.to_hex());
    }
    drop(r);
    assert!(verify(dir.path(), true).problems.is_empty());
    // A client's retry of an arrival indexed before the upgrade is still a repeat.
    let store = Store::open(opts(dir.path(), 8192)).unwrap();
    assert!(
        store
            .handle()
            .ingest_blocking(msg(2, "a@example.org"))
            .unwrap()
            .repeat
    );
    assert!(
        !store
            .handle()
            .ingest_blocking(msg(2, "b@example.org"))
            .unwrap()
            .repeat
    );
    store.close();
    let (now, after) = all(dir.path());
    assert_eq!(now.len(), records.len());
    assert_eq!(
        (after.repeats, after.arrivals),
        (status.repeats + 1, status.arrivals + 1)
    );
    // Reindexing the upgraded store gives the same answers.
    reindex::reindex(dir.path(), "node-a", &mut |_, _| {}).unwrap();
    assert_eq!(all(dir.path()).0, now);
}

#[test]
fn the_index_rewrite_keeps_every_entry_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 300, 64 << 20);
    downgrade_to_format_2(dir.path()); // adds a cursor and a parked arrival
    drop(Store::open(opts(dir.path(), 64 << 20)).unwrap()); // upgrades in place
    let (records, status) = all(dir.path());
    let state = index_state(dir.path());
    let (before, after) = compactor::compact_index(dir.path()).unwrap();
    assert!(after < before, "{before} -> {after}");
    assert_eq!(
        std::fs::metadata(dir.path().join(engine::INDEX_FILE))
            .unwrap()
            .len(),
        after
    );
    assert!(!dir.path().join(compactor::REWRITE_INDEX_FILE).exists());
    assert_eq!(all(dir.path()), (records, status));
    assert_eq!(index_state(dir.path()), state);
    assert!(verify(dir.path(), true).problems.is_empty());
    // The rewritten index takes writes again.
    let store = Store::open(opts(dir.path(), 64 << 20)).unwrap();
    store
        .handle()
        .ingest_blocking(msg(1000, "late@example.org"))
        .unwrap();
    store.close();
    assert_eq!(all(dir.path()).1.messages, 301);

    // Held by an open store: refused, and the index is left alone.
    let store = Store::open(opts(dir.path(), 64 << 20)).unwrap();
    assert!(matches!(
        compactor::compact_index(dir.path()),
        Err(StoreError::DaemonRunning(_))
    ));
    store.close();
}

#[test]
fn search_by_address_checks_what_an_id_prefix_finds() {
    let dir = tempfile::tempdir().unwrap();
    let receipts = filled(dir.path(), 3, 64 << 20);
    // Point sender0's address key at the ref of message 1 as well, as if the two ids
    // shared their first 4 bytes: search still answers only message 0.
    {
        use redb::ReadableTable;
        let db = redb::Database::open(dir.path().join(engine::INDEX_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        let id = receipts[1].message_id.0;
        let loc = index::Loc::decode(
            txn.open_table(index::MESSAGES)
                .unwrap()
                .get(id)
                .unwrap()
                .unwrap()
                .value(),
        )
        .unwrap();
        txn.open_multimap_table(index::ADDRS)
            .unwrap()
            .insert("f:sender0@example.org", index::term_ref(loc.segment, &id))
            .unwrap();
        txn.commit().unwrap();
    }
    let r = StoreReader::open(dir.path()).unwrap();
    let q = Query {
        from: Some("sender0@example.org".into()),
        ..Query::default()
    };
    let found: Vec<String> = r.search(&q).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(found, vec![receipts[0].message_id.to_hex()]);
    let q = Query {
        from: Some("@example.org".into()),
        ..Query::default()
    };
    assert_eq!(r.search(&q).unwrap().len(), 3);
}

#[test]
fn an_open_store_rewrites_its_index_and_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path(), 64 << 10)).unwrap();
    let h = store.handle();
    let mut receipts: Vec<Receipt> = (0..600)
        .map(|i| h.ingest_blocking(msg(i, "a@example.org")).unwrap())
        .collect();
    h.compact(true, &|| false).unwrap();
    let index = dir.path().join(engine::INDEX_FILE);
    let size = || std::fs::metadata(&index).unwrap().len();
    // A reader beside the store, opened before the rewrite: it keeps the old file.
    let early = StoreReader::open(dir.path()).unwrap();
    assert!(early.daemon_running());
    assert_eq!(early.search(&Query::default()).unwrap().len(), 600);

    let before = size();
    let r = h.rewrite_index().unwrap();
    assert_eq!(r.before, before);
    assert_eq!(r.after, size());
    assert!(r.after < r.before, "{} -> {}", r.before, r.after);
    assert!(r.disk_after < r.disk_before, "{r:?}");
    assert!(!dir.path().join(compactor::REWRITE_INDEX_FILE).exists());
    assert_eq!(h.shared.stats.reopens.load(Ordering::Relaxed), 0);
    assert!(!h.failed());
    // The early reader finishes on the old file; in-process reads use the new one.
    for rc in &receipts {
        assert!(!early.read_message(&rc.message_id).unwrap().is_empty());
        assert!(!h.read_message(&rc.message_id).unwrap().is_empty());
    }
    drop(early);
    // Ingest goes on, into the new index.
    receipts.push(h.ingest_blocking(msg(5000, "late@example.org")).unwrap());
    let late = StoreReader::open(dir.path()).unwrap();
    assert_eq!(late.search(&Query::default()).unwrap().len(), 601);
    for rc in &receipts {
        assert!(!late.read_message(&rc.message_id).unwrap().is_empty());
    }
    drop(late);

    // A rewrite that fails (its file cannot be made) leaves the index as it was.
    let blocker = dir.path().join(compactor::REWRITE_INDEX_FILE);
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("x"), b"x").unwrap();
    let size_now = size();
    let failed = h.rewrite_index().unwrap_err();
    assert!(failed.contains("old index is kept"), "{failed}");
    assert_eq!(size(), size_now);
    std::fs::remove_dir_all(&blocker).unwrap();
    receipts.push(h.ingest_blocking(msg(5002, "after@example.org")).unwrap());

    // An in-process holder that does not let go: the index is left as it was, the
    // store carries on. (A reader waits until the index holds the last message.)
    StoreReader::open(dir.path()).unwrap().status().unwrap();
    let held = h.shared.db.read().unwrap().clone().unwrap();
    let size_now = size();
    let refused = h.rewrite_index().unwrap_err();
    assert!(refused.contains("not rewritten"), "{refused}");
    drop(held);
    assert_eq!(size(), size_now);
    receipts.push(h.ingest_blocking(msg(5001, "later@example.org")).unwrap());
    drop(h);
    store.close();
    let (records, status) = all(dir.path());
    assert_eq!((records.len(), status.messages), (603, 603));
    assert!(verify(dir.path(), true).problems.is_empty());
}

#[test]
fn a_leftover_index_rewrite_is_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 20, 64 << 20);
    let leftover = dir.path().join(compactor::REWRITE_INDEX_FILE);
    std::fs::write(&leftover, b"half a copy").unwrap();
    let store = Store::open(opts(dir.path(), 64 << 20)).unwrap();
    assert!(!leftover.exists());
    store.close();
    assert_eq!(all(dir.path()).1.messages, 20);
}

/// Rows of `summaries`, `arrivals`, `by_time`, `addr_refs`, `msgid_refs` and
/// `by_message` in a closed store's index.
fn row_counts(dir: &Path) -> [u64; 6] {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    let db = redb::Database::open(dir.join(engine::INDEX_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    [
        txn.open_table(index::SUMMARIES).unwrap().len().unwrap(),
        txn.open_table(index::ARRIVALS).unwrap().len().unwrap(),
        txn.open_table(index::BY_TIME).unwrap().len().unwrap(),
        txn.open_multimap_table(index::ADDRS)
            .unwrap()
            .len()
            .unwrap(),
        txn.open_table(index::MSGIDS).unwrap().len().unwrap(),
        txn.open_multimap_table(index::BY_MESSAGE)
            .unwrap()
            .len()
            .unwrap(),
    ]
}

/// The answers to a set of searches: by sender, recipient, domain, Message-ID, time.
fn searches(dir: &Path) -> Vec<Vec<String>> {
    let r = StoreReader::open(dir).unwrap();
    let (records, _) = all(dir);
    let times: Vec<i64> = records
        .iter()
        .map(|r| index::time_us(&r.arrivals[0].time))
        .collect();
    let mid = times[times.len() / 2];
    let mut qs = vec![
        Query {
            from: Some("other@example.org".into()),
            ..Query::default()
        },
        Query {
            from: Some("@EXAMPLE.org".into()),
            ..Query::default()
        },
        Query {
            to: Some("rcpt1@example.net".into()),
            ..Query::default()
        },
        Query {
            to: Some("@example.net".into()),
            limit: 7,
            ..Query::default()
        },
        Query {
            since_us: Some(mid),
            ..Query::default()
        },
        Query {
            until_us: Some(mid),
            limit: 5,
            ..Query::default()
        },
        Query {
            limit: 3,
            ..Query::default()
        },
        Query {
            subject: Some("message 1".into()),
            ..Query::default()
        },
    ];
    for i in [0, 7, 31, 59] {
        qs.push(Query {
            from: Some(format!("sender{i}@example.org")),
            ..Query::default()
        });
        qs.push(Query {
            message_id: Some(format!("<m{i}@example.org>")),
            ..Query::default()
        });
    }
    qs.iter()
        .map(|q| {
            r.search(q)
                .unwrap()
                .into_iter()
                .map(|m| m.id)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every arrival by local number, as an in-process reader (a replicator) sees them.
fn by_local(h: &StoreHandle) -> Vec<(u64, Arrival)> {
    let txn = h.snapshot().unwrap();
    h.arrivals_from(&txn, 1, 10_000)
        .unwrap()
        .into_iter()
        .map(|(l, a)| (l, a.unwrap()))
        .collect()
}

#[test]
fn compacted_segments_keep_their_summaries_and_arrivals_in_catalogs() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 60, 4096);
    let (records, status) = all(dir.path());
    assert_eq!((status.messages, status.arrivals), (60, 61));
    assert_eq!(row_counts(dir.path())[..3], [60, 61, 61]);
    let answers = searches(dir.path());
    assert!(answers.iter().all(|a| !a.is_empty()), "{answers:?}");
    let compacting = || StoreOptions {
        compaction: compact::CompactOptions {
            block_size: 8192,
            level: 3,
            dictionary: false,
        },
        ..opts(dir.path(), 4096)
    };

    let store = Store::open(compacting()).unwrap();
    let h = store.handle();
    let locals = by_local(&h);
    assert_eq!(locals.len(), 61);
    // The sealed segments first: searches read rows and catalogs together.
    assert!(h.compact(false, &|| false).unwrap().segments > 3);
    assert_eq!(by_local(&h), locals);
    drop(h);
    store.close();
    let rows = row_counts(dir.path());
    assert!(rows.iter().all(|n| *n > 0) && rows[1] < 20, "{rows:?}");
    assert_eq!(searches(dir.path()), answers);
    assert_eq!(all(dir.path()).0, records);

    // Replicated arrivals keep their origin's time: rows as old as cataloged arrivals,
    // which a search merges by time (equal times: the higher local number first).
    let store = Store::open(compacting()).unwrap();
    let h = store.handle();
    for (k, i) in [5usize, 20, 40].into_iter().enumerate() {
        let mut m = msg(100 + k, "peer@example.org");
        m.session.xcoffer = Some(coffer_proto::Xcoffer {
            origin_arrival: Some(format!("peer/0badf00d/{}", k + 1)),
            origin_time: Some(records[i].arrivals[0].time.clone()),
            ..coffer_proto::Xcoffer::default()
        });
        assert!(!h.ingest_blocking(m).unwrap().repeat);
    }
    drop(h);
    store.close();
    let newest = |q: Query| -> Vec<String> {
        let r = StoreReader::open(dir.path()).unwrap();
        r.search(&q)
            .unwrap()
            .iter()
            .map(|m| m.arrivals.iter().map(|a| a.time.clone()).max().unwrap())
            .collect()
    };
    let everything = newest(Query::default());
    assert_eq!(everything.len(), 63);
    assert!(
        everything.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {everything:?}"
    );
    let answers = searches(dir.path());
    let (records, status) = all(dir.path());
    assert_eq!(status.arrivals, 64);

    let store = Store::open(compacting()).unwrap();
    let h = store.handle();
    let locals = by_local(&h);
    assert_eq!(locals.len(), 64);
    assert!(h.compact(true, &|| false).unwrap().segments >= 1);
    // The compacted segments' rows are gone from the index; their catalogs answer.
    assert_eq!(by_local(&h), locals);
    let txn = h.snapshot().unwrap();
    for (local, a) in &locals {
        assert_eq!(h.arrival_at(&txn, *local).unwrap().as_ref(), Some(a));
    }
    drop(txn);
    // A client's retry of an arrival now kept in a catalog is still a repeat.
    assert!(h.ingest_blocking(msg(3, "a@example.org")).unwrap().repeat);
    drop(h);
    store.close();
    // The catalogs are the arrivals' record: no block holds an arrival record any more.
    let log_dir = dir.path().join(log::LOG_DIR);
    let mut in_blocks = [0usize; 2];
    for f in log::list_log(&io::RealVfs, &log_dir).unwrap() {
        if !f.blk {
            continue;
        }
        let file = io::Vfs::open_read(&io::RealVfs, &log::blk_path(&log_dir, f.number)).unwrap();
        compact::scan_blk(&*file, &record::no_dicts, |_, _, recs| {
            for r in recs {
                in_blocks[usize::from(r.header.kind == record::KIND_ARRIVAL)] += 1;
            }
            Ok::<(), std::io::Error>(())
        })
        .unwrap();
    }
    assert_eq!(in_blocks[1], 0, "{in_blocks:?}");
    assert!(in_blocks[0] >= 63, "{in_blocks:?}");
    // Left: the `by_message` row of a repeat arrival in another segment than its message.
    assert_eq!(
        row_counts(dir.path()),
        [0, 0, 0, 0, 0, 1],
        "all of it is compacted"
    );
    assert_eq!(newest(Query::default()), everything);
    assert_eq!(searches(dir.path()), answers);
    let (again, after) = all(dir.path());
    assert_eq!(again, records);
    assert_eq!(after.arrivals, status.arrivals);
    assert_eq!(after.repeats, status.repeats + 1);
    let report = verify(dir.path(), true);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.arrivals_checked, 64);

    // A rebuilt index drops the same rows, and answers the same.
    let r = reindex::reindex(dir.path(), "node-a", &mut |_, _| {}).unwrap();
    assert!(r.verify.problems.is_empty(), "{:?}", r.verify.problems);
    assert_eq!(row_counts(dir.path()), [0, 0, 0, 0, 0, 1]);
    assert_eq!(all(dir.path()), (again, after));
    assert_eq!(searches(dir.path()), answers);

    // A catalog that no longer reads back is named by verify, and reads fail loudly.
    let blk = log::blk_path(&dir.path().join(log::LOG_DIR), 1);
    let mut bytes = std::fs::read(&blk).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&blk, bytes).unwrap();
    let report = verify(dir.path(), true);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("00000001.blk") && p.contains("catalog")),
        "{:?}",
        report.problems
    );
}

#[test]
fn an_arrival_whose_id_or_key_hash_is_taken_is_still_indexed_as_new() {
    use redb::ReadableTable;
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path(), 3, 64 << 20);
    let (_, before) = all(dir.path());
    // Forge what a collision of 8-byte hashes would leave: the id the next arrival gets,
    // and its arrival key, filed under arrival 1 (which has another id and key).
    let next = msg(7, "z@example.org");
    {
        let db = redb::Database::open(dir.path().join(engine::INDEX_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta = txn.open_table(index::META).unwrap();
            let seq = index::meta_u64(&meta, index::K_NEXT_SEQ);
            let epoch: [u8; 16] = meta
                .get(index::K_EPOCH)
                .unwrap()
                .unwrap()
                .value()
                .try_into()
                .unwrap();
            let id = format!("node-a/{}/{seq}", &hex::encode(epoch)[..8]);
            let key = crate::ids::ArrivalKey::new(
                &crate::ids::MessageId::of(&next.bytes),
                &next.envelope,
                &next.session.listener,
            );
            let mut ids = txn.open_table(index::ARRIVAL_IDS).unwrap();
            ids.insert(index::id_entry(&id.parse().unwrap(), 1), ())
                .unwrap();
            let mut keys = txn.open_table(index::ARRIVAL_KEYS).unwrap();
            keys.insert((index::key_prefix(&key.0), 1), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(opts(dir.path(), 64 << 20)).unwrap();
    let h = store.handle();
    let first = h.ingest_blocking(next).unwrap();
    assert!(
        !first.repeat,
        "a hash shared with arrival 1 made it a repeat"
    );
    let again = h.ingest_blocking(msg(7, "z@example.org")).unwrap();
    assert!(again.repeat);
    assert_eq!(again.arrival_id, first.arrival_id);
    drop(h);
    store.close();
    let (records, after) = all(dir.path());
    assert_eq!(
        (after.arrivals, after.repeats),
        (before.arrivals + 1, before.repeats + 1)
    );
    let found = records
        .iter()
        .find(|m| m.from == ["sender7@example.org"])
        .unwrap();
    assert_eq!(found.arrivals.len(), 1);
    assert_eq!(found.arrivals[0].id, first.arrival_id);
    assert!(verify(dir.path(), true).problems.is_empty());
}

#[test]
fn a_reader_beside_a_daemon_of_another_index_format_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path(), 64 << 20)).unwrap();
    let h = store.handle();
    h.ingest_blocking(msg(1, "a@example.org")).unwrap();
    assert_eq!(all(dir.path()).1.messages, 1);
    let db = h.shared.db.read().unwrap().clone().unwrap();
    let set_format = |f: u32| {
        let txn = db.begin_write().unwrap();
        txn.open_table(index::META)
            .unwrap()
            .insert(index::K_FORMAT, f.to_le_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    };
    set_format(4);
    let err = StoreReader::open(dir.path()).err().expect("refused");
    assert!(matches!(err, StoreError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("format 4"), "{err}");
    set_format(record::INDEX_FORMAT);
    assert!(StoreReader::open(dir.path()).unwrap().daemon_running());
    drop(db);
    drop(h);
    store.close();
}
