//! Compaction: sealed segments rewritten as blocks, read back by every reader, rebuilt by
//! reindex, copied by backup, and a half-done compaction settled at open.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::compact::CompactOptions;
use super::fault::FaultVfs;
use super::io::Vfs;
use super::log::{blk_path, blk_tmp_path, list_log, segment_path, LOG_DIR};
use super::*;
use crate::envelope::{Envelope, SessionInfo};

fn opts(dir: &Path, segment_size: u64, dictionary: bool) -> StoreOptions {
    StoreOptions {
        data_dir: dir.to_owned(),
        node: "node-a".into(),
        segment_size,
        compaction: CompactOptions {
            block_size: 16 << 10,
            level: 3,
            dictionary,
        },
        ..StoreOptions::default()
    }
}

const WORDS: &[&str] = &[
    "invoice", "meeting", "report", "please", "find", "attached", "regards", "the", "of", "budget",
    "review", "contract", "schedule", "customer", "order",
];

fn message(i: usize) -> Vec<u8> {
    let mut body = String::new();
    for k in 0..(20 + (i * 37) % 400) {
        body.push_str(WORDS[(i * 7 + k * 13) % WORDS.len()]);
        body.push_str(if k % 11 == 10 { "\r\n" } else { " " });
    }
    format!(
        "From: sender{}@example.org\r\nTo: rcpt{}@example.net\r\nSubject: message {i}\r\n\
         Message-ID: <c{i}@example.org>\r\n\r\n{body}\r\n",
        i % 17,
        i % 5
    )
    .into_bytes()
}

fn incoming(i: usize) -> Incoming {
    Incoming {
        bytes: message(i),
        envelope: Envelope {
            mail_from: format!("sender{}@example.org", i % 17),
            mail_params: vec![],
            rcpt_to: vec![format!("rcpt{}@example.net", i % 5)],
        },
        session: SessionInfo {
            listener: "journal".into(),
            protocol: "ESMTP".into(),
            ..SessionInfo::default()
        },
    }
}

fn ingest(h: &StoreHandle, range: std::ops::Range<usize>) -> BTreeMap<usize, MessageId> {
    range
        .map(|i| (i, h.ingest_blocking(incoming(i)).unwrap().message_id))
        .collect()
}

fn check_all(reader: &StoreReader, ids: &BTreeMap<usize, MessageId>) {
    for (i, id) in ids {
        assert_eq!(reader.read_message(id).unwrap(), message(*i), "message {i}");
    }
    let report = reader.verify(true, &mut |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.messages_checked, ids.len() as u64);
}

#[test]
fn compacted_segments_read_back_and_shrink() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/c");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir, 32 << 10, false)).unwrap();
    let h = store.handle();
    let mut ids = ingest(&h, 0..120);
    // Answered once the index has committed everything before it: the totals are current.
    h.update_state_blocking(writer::StateOp::Seal).unwrap();
    let before = h.stats().stored_bytes.load(Ordering::Relaxed);
    let report = h.compact(true, &|| false).unwrap();
    assert!(report.segments >= 3, "{report:?}");
    assert!(report.bytes_out < report.bytes_in / 2, "{report:?}");
    let after = h.stats().stored_bytes.load(Ordering::Relaxed);
    assert!(
        after < before,
        "stored_bytes reflects compaction: {before} -> {after}"
    );
    for (i, id) in &ids {
        assert_eq!(h.read_message(id).unwrap(), message(*i));
    }
    // Nothing left to do; then more mail, sealed and compacted in its turn.
    assert_eq!(h.compact(false, &|| false).unwrap().segments, 0);
    ids.extend(ingest(&h, 120..150));
    assert!(h.compact(true, &|| false).unwrap().segments >= 1);
    let status = h.compaction_status();
    assert!(status.segments_compacted > report.segments, "{status:?}");
    drop(h);
    store.close();

    let log_dir = dir.join(LOG_DIR);
    let files = list_log(&vfs, &log_dir).unwrap();
    let last = files.last().unwrap().number;
    for f in &files {
        assert!(!(f.seg && f.blk), "segment {} in both forms", f.number);
        assert_eq!(
            f.seg,
            f.number == last,
            "only the open segment is not compacted: {f:?}"
        );
    }
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap();
    check_all(&reader, &ids);
    let st = reader.status().unwrap();
    assert_eq!(st.messages, 150);
    assert!(st.stored_bytes * 3 < st.raw_bytes, "{st:?}");
    // Retries of compacted messages are still repeats.
    drop(reader);
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir, 32 << 10, false)).unwrap();
    assert!(store.handle().ingest_blocking(incoming(3)).unwrap().repeat);
    store.close();
}

#[test]
fn reindex_and_backup_understand_compacted_segments_and_dictionaries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(opts(&data, 256 << 10, true)).unwrap();
    let h = store.handle();
    let mut ids = ingest(&h, 0..400);
    let report = h.compact(true, &|| false).unwrap();
    assert_eq!(report.trained_dict, Some(1), "{report:?}");
    // From now on ingest compresses with the dictionary too.
    ids.extend(ingest(&h, 400..460));
    drop(h);
    store.close();
    let seg = list_log(&io::RealVfs, &data.join(LOG_DIR)).unwrap();
    let newest = segment_path(&data.join(LOG_DIR), seg.last().unwrap().number);
    let f = io::RealVfs.open_read(&newest).unwrap();
    let mut with_dict = 0;
    log::scan(&*f, record::SEGMENT_HEADER_LEN, |rec| {
        with_dict += usize::from(rec.header.dict_id == 1);
        Ok::<(), std::io::Error>(())
    })
    .unwrap();
    assert!(
        with_dict > 10,
        "ingest uses the dictionary ({with_dict} records)"
    );

    let reader = StoreReader::open(&data).unwrap();
    check_all(&reader, &ids);
    let before = reader.status().unwrap();
    drop(reader);

    let r = reindex::reindex(&data, "node-a", &mut |_, _| {}).unwrap();
    assert!(r.verify.problems.is_empty(), "{:?}", r.verify.problems);
    assert_eq!(r.after.messages, before.messages);
    assert_eq!(r.after.arrivals, before.arrivals);
    assert_eq!(r.after.raw_bytes, before.raw_bytes);
    assert_eq!(
        r.after.stored_bytes, before.stored_bytes,
        "block shares come back equal"
    );
    check_all(&StoreReader::open(&data).unwrap(), &ids);

    let dest = dir.path().join("copy");
    let b = backup::backup(&data, "node-a", &dest, &mut |_, _| {}).unwrap();
    assert_eq!(b.status.messages, before.messages);
    assert!(dest.join("dict/00000001.dict").exists());
    check_all(&StoreReader::open(&dest).unwrap(), &ids);
}

/// A store of 60 messages with its active segment sealed: the messages, the first
/// segment's number and the store's epoch.
fn sealed_store(vfs: &FaultVfs, dir: &Path) -> (BTreeMap<usize, MessageId>, u32, [u8; 16]) {
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir, 32 << 10, false)).unwrap();
    let h = store.handle();
    let ids = ingest(&h, 0..60);
    h.update_state_blocking(writer::StateOp::Seal).unwrap();
    drop(h);
    store.close();
    let n = list_log(vfs, &dir.join(LOG_DIR)).unwrap()[0].number;
    let epoch = *uuid::Uuid::parse_str(
        &StoreReader::open_with(Arc::new(vfs.clone()), dir)
            .unwrap()
            .status()
            .unwrap()
            .epoch,
    )
    .unwrap()
    .as_bytes();
    (ids, n, epoch)
}

#[test]
fn a_half_done_compaction_is_settled_at_open() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/h");
    let log_dir = dir.join(LOG_DIR);
    let (ids, n, epoch) = sealed_store(&vfs, dir);
    // Blocks written and renamed into place, the switch not committed: the `.blk` goes.
    let seg_bytes = vfs.file_bytes(&segment_path(&log_dir, n)).unwrap();
    let written = compact::rewrite(
        &vfs,
        &log_dir,
        n,
        epoch,
        &CompactOptions {
            block_size: 4096,
            level: 1,
            dictionary: false,
        },
        None,
        &record::no_dicts,
        &mut || false,
        &mut |_, _| Ok(Default::default()),
    )
    .unwrap();
    assert!(written.is_some());
    vfs.put_file_bytes(&blk_tmp_path(&log_dir, n), b"partial".to_vec());
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap();
    assert!(
        !vfs.exists(&blk_path(&log_dir, n)),
        "the unswitched .blk is removed"
    );
    assert!(!vfs.exists(&blk_tmp_path(&log_dir, n)));
    check_all(&reader, &ids);
    drop(reader);
    // Switch committed, the old segment not deleted (or back after a crash): it goes.
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir, 32 << 10, false)).unwrap();
    assert!(store.handle().compact(false, &|| false).unwrap().segments >= 1);
    store.close();
    assert!(vfs.exists(&blk_path(&log_dir, n)));
    vfs.put_file_bytes(&segment_path(&log_dir, n), seg_bytes);
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap();
    assert!(
        !vfs.exists(&segment_path(&log_dir, n)),
        "the replaced .seg is removed"
    );
    check_all(&reader, &ids);
}

#[test]
fn a_compaction_interrupted_by_a_failed_store_loses_nothing() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/f");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir, 16 << 10, false)).unwrap();
    let h = store.handle();
    let ids = ingest(&h, 0..80);
    vfs.set_sync_eio(true);
    assert!(h.compact(true, &|| false).is_err());
    vfs.set_sync_eio(false);
    // The writer reopens by itself once syncs work again; then the compaction succeeds.
    let mut done = None;
    for _ in 0..200 {
        match h.compact(true, &|| false) {
            Ok(r) => {
                done = Some(r);
                break;
            }
            Err(e) => eprintln!("compact: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(done.is_some_and(|r| r.segments >= 1));
    drop(h);
    store.close();
    check_all(
        &StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap(),
        &ids,
    );
}

/// A segment's first block is compressed with and without the dictionary; the smaller
/// frame decides for the segment. A dictionary made of mail like the segment's wins in
/// small blocks; one of random bytes never does.
#[test]
fn a_dictionary_is_used_only_where_it_makes_blocks_smaller() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/d");
    let log_dir = dir.join(LOG_DIR);
    let (ids, n, epoch) = sealed_store(&vfs, dir);
    let like_the_mail: Vec<u8> = (1000..1040).flat_map(message).collect();
    let mut rng_state = 0x9e37_79b9_7f4a_7c15_u64;
    let random: Vec<u8> = (0..like_the_mail.len())
        .map(|_| {
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            rng_state as u8
        })
        .collect();
    for (dict, helps) in [(like_the_mail, true), (random, false)] {
        let shared = Arc::new(dict.clone());
        let lookup = move |id: u32| -> Result<Arc<Vec<u8>>, String> {
            if id == 7 {
                Ok(shared.clone())
            } else {
                Err(format!("no dictionary {id}"))
            }
        };
        let written = compact::rewrite(
            &vfs,
            &log_dir,
            n,
            epoch,
            &CompactOptions {
                block_size: 4096,
                level: 3,
                dictionary: true,
            },
            Some((7, &dict)),
            &lookup,
            &mut || false,
            &mut |_, _| Ok(Default::default()),
        )
        .unwrap()
        .unwrap();
        assert!(written.info.blocks > 1, "{:?}", written.info);
        assert_eq!(
            written.info.dict,
            if helps { 7 } else { 0 },
            "helps: {helps}"
        );
        assert!(!written.moves.is_empty());
        // Not switched in: the next round rewrites the same segment again.
        vfs.remove_file(&blk_path(&log_dir, n)).unwrap();
    }
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap();
    check_all(&reader, &ids);
}

/// Compacted segments written before index format 4 hold blocks of codec 1 (40-byte
/// table entries with ids, every message a whole record): they still read.
#[test]
fn a_block_of_codec_1_still_reads() {
    use super::record::{
        encode_block, encode_record, BlockHeader, RecordHeader, TableEntry, BLOCK_CODEC_ZSTD,
        TABLE_ENTRY_LEN,
    };
    let msgs: Vec<Vec<u8>> = (0..3).map(message).collect();
    let mut records = Vec::new();
    let mut table = Vec::new();
    for m in &msgs {
        let id = crate::ids::MessageId::of(m);
        let len = u32::try_from(m.len()).unwrap();
        let h = RecordHeader::stored_message(id, len, 0);
        let at = records.len();
        encode_record(&mut records, &h, m);
        table.push(TableEntry {
            message: id,
            offset: u32::try_from(at).unwrap(),
            len: u32::try_from(records.len() - at).unwrap(),
            flags: 0,
        });
    }
    let table_len = u32::try_from(table.len() * TABLE_ENTRY_LEN).unwrap();
    let mut payload = Vec::new();
    for e in &table {
        TableEntry {
            offset: e.offset + table_len,
            ..*e
        }
        .encode(&mut payload);
    }
    payload.extend_from_slice(&records);
    let frame = zstd::bulk::compress(&payload, 3).unwrap();
    let h = BlockHeader {
        codec: BLOCK_CODEC_ZSTD,
        dict_id: 0,
        stored_len: u32::try_from(frame.len()).unwrap(),
        raw_len: u32::try_from(payload.len()).unwrap(),
        records: 3,
        messages: 3,
    };
    let mut bytes = vec![0u8; 64];
    encode_block(&mut bytes, &h, &frame);
    let vfs = FaultVfs::new();
    let path = Path::new("/v1.blk");
    vfs.put_file_bytes(path, bytes);
    let file = vfs.open_read(path).unwrap();
    let block = compact::read_block(&*file, 64, &record::no_dicts).unwrap();
    let recs = block.records().unwrap();
    assert_eq!(recs.len(), 3);
    for (i, m) in msgs.iter().enumerate() {
        let id = crate::ids::MessageId::of(m);
        assert_eq!(recs[i].header.message, id);
        assert_eq!(recs[i].position, Some(u32::try_from(i).unwrap()));
        assert_eq!(block.message(u32::try_from(i).unwrap(), &id).unwrap(), *m);
    }
    let other = crate::ids::MessageId::of(b"another message");
    assert!(block.message(0, &other).is_err());
}
