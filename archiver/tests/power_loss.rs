//! Power loss at any sync loses nothing acknowledged (design.md §2.1).
//!
//! Random ingest from several threads runs against the real store code on the fault
//! layer, which cuts the power at a random sync and keeps only what was synced (plus a
//! random torn prefix of unsynced log tails). After each cut the store is reopened and
//! compared with a model of what was acknowledged:
//!
//! 1. the store always opens;
//! 2. every acknowledged arrival is there, with its envelope, and its bytes read back
//!    exactly;
//! 3. nothing unacknowledged is half-visible: every arrival in the store was submitted,
//!    and its message reads back and hashes to its id;
//! 4. a retry of an acknowledged message is a repeat with the same arrival id;
//! 5. `verify --deep` finds nothing wrong.
//!
//! In some rounds a compaction (seal, rewrite sealed segments as blocks, switch, delete)
//! runs beside the ingest, so the cut also lands inside it; and one test cuts the power
//! at each sync of a compaction in turn, every one of them (docs/store-format.md
//! "Compacted segments"). After every cut no `.tmp` is left and no segment is in both
//! forms.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use coffer_archiver::envelope::{Envelope, SessionInfo};
use coffer_archiver::ids::MessageId;
use coffer_archiver::store::compact::CompactOptions;
use coffer_archiver::store::fault::FaultVfs;
use coffer_archiver::store::io::Vfs;
use coffer_archiver::store::{Incoming, Store, StoreOptions, StoreReader};
use proptest::prelude::*;

fn message(i: usize) -> Vec<u8> {
    let body = "The quick brown fox jumps over the lazy dog. ".repeat(1 + (i * 37) % 200);
    format!("From: s{i}@example.org\r\nTo: r@example.net\r\nSubject: m{i}\r\n\r\n{body}\r\n")
        .into_bytes()
}

/// The origin arrival id of a replicated copy: every third recipient index stands for a
/// copy a peer sends over its `ha` listener, keeping the origin's id.
fn origin(i: usize, rcpt: usize) -> Option<String> {
    (rcpt % 3 == 2).then(|| format!("node-b/0badf00d/{}", i * 100 + rcpt))
}

fn incoming(i: usize, rcpt: usize) -> Incoming {
    let mut m = first(i, rcpt);
    if let Some(id) = origin(i, rcpt) {
        m.session.listener = "ha".into();
        m.session.xcoffer = Some(coffer_proto::Xcoffer {
            origin_arrival: Some(id),
            origin_listener: Some("journal".into()),
            trace: vec!["node-b".into()],
            ..coffer_proto::Xcoffer::default()
        });
    }
    m
}

fn first(i: usize, rcpt: usize) -> Incoming {
    Incoming {
        bytes: message(i),
        envelope: Envelope {
            mail_from: format!("s{i}@example.org"),
            mail_params: vec![],
            rcpt_to: vec![format!("r{rcpt}@example.net")],
        },
        session: SessionInfo {
            listener: "journal".into(),
            protocol: "ESMTP".into(),
            ..SessionInfo::default()
        },
    }
}

fn options(segment_size: u64) -> StoreOptions {
    StoreOptions {
        data_dir: "/archive".into(),
        node: "node-a".into(),
        segment_size,
        max_pending: 1 << 30,
        min_free_disk: 0,
        compaction: CompactOptions {
            block_size: 2048,
            level: 1,
            dictionary: false,
        },
        ..StoreOptions::default()
    }
}

/// (message index, recipient index) → (message id, arrival id) of acknowledged arrivals.
type Model = HashMap<(usize, usize), (MessageId, String)>;

/// One round: the sync at which power is lost, each thread's (message, recipient)s, and
/// whether a compaction runs beside them.
type Round = (u64, Vec<Vec<(usize, usize)>>, bool);

fn run_case(seed: u64, rounds: &[Round], segment_size: u64) {
    let vfs = FaultVfs::new();
    let mut acked: Model = HashMap::new();
    let dir = Path::new("/archive");
    for (round, (crash_after, threads, compact)) in rounds.iter().enumerate() {
        let store = Store::open_with(Arc::new(vfs.clone()), options(segment_size))
            .unwrap_or_else(|e| panic!("round {round}: the store must open: {e}"));
        vfs.crash_at_sync(*crash_after);
        let results = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            if *compact {
                let h = store.handle();
                s.spawn(move || {
                    // Errors are expected once the power is gone.
                    for _ in 0..3 {
                        if h.compact(true, &|| false).is_err() {
                            break;
                        }
                    }
                });
            }
            for ops in threads {
                let h = store.handle();
                let results = results.clone();
                s.spawn(move || {
                    for &(i, r) in ops {
                        if let Ok(receipt) = h.ingest_blocking(incoming(i, r)) {
                            results.lock().unwrap().push(((i, r), receipt));
                        }
                    }
                });
            }
        });
        store.close();
        let before = acked.clone();
        for ((i, r), receipt) in results.lock().unwrap().drain(..) {
            let entry = (receipt.message_id, receipt.arrival_id.to_string());
            if let Some(prev) = acked.get(&(i, r)) {
                assert_eq!(prev, &entry, "a retry must name the arrival already stored");
            }
            if before.contains_key(&(i, r)) {
                assert!(receipt.repeat, "a retry of an earlier round is a repeat");
            }
            if let Some(id) = origin(i, r) {
                assert_eq!(entry.1, id, "a replicated arrival keeps its origin id");
            }
            acked.insert((i, r), entry);
        }
        vfs.power_loss(seed.wrapping_add(round as u64));
        check(&vfs, dir, &acked, round);
    }
}

fn check(vfs: &FaultVfs, dir: &Path, acked: &Model, round: usize) {
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir)
        .unwrap_or_else(|e| panic!("round {round}: the store must reopen after power loss: {e}"));
    let log_dir = dir.join("log");
    let names = vfs.read_dir(&log_dir).unwrap();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "round {round}: a .tmp survived the open: {names:?}"
    );
    for n in &names {
        if let Some(stem) = n.strip_suffix(".blk") {
            assert!(
                !names.contains(&format!("{stem}.seg")),
                "round {round}: segment {stem} is in both forms after the open"
            );
        }
    }
    for ((i, _), (id, arrival)) in acked {
        let bytes = reader
            .read_message(id)
            .unwrap_or_else(|e| panic!("round {round}: acknowledged message {i} lost: {e}"));
        assert_eq!(bytes, message(*i));
        let arrivals = reader.arrivals(id).unwrap();
        assert!(
            arrivals.iter().any(|a| &a.id.to_string() == arrival),
            "round {round}: acknowledged arrival {arrival} lost"
        );
    }
    let all = reader
        .search(&coffer_archiver::store::Query {
            limit: 0,
            ..Default::default()
        })
        .unwrap();
    let mut arrival_ids = std::collections::HashSet::new();
    for rec in &all {
        let id: MessageId = rec.id.parse().unwrap();
        let bytes = reader
            .read_message(&id)
            .expect("every visible message reads back");
        assert_eq!(MessageId::of(&bytes), id);
        for a in &rec.arrivals {
            assert!(
                arrival_ids.insert(a.id.to_string()),
                "arrival {} listed twice",
                a.id
            );
            let i: usize = a.mail_from[1..a.mail_from.find('@').unwrap()]
                .parse()
                .unwrap();
            assert_eq!(
                bytes,
                message(i),
                "an arrival points at the bytes it was sent with"
            );
        }
    }
    let status = reader.status().unwrap();
    assert_eq!(status.arrivals as usize, arrival_ids.len());
    assert!(status.arrivals as usize >= acked.len());
    let report = reader.verify(true, &mut |_, _| {}).unwrap();
    assert!(
        report.problems.is_empty(),
        "round {round}: verify: {:?}",
        report.problems
    );
}

fn cases() -> u32 {
    std::env::var("COFFER_POWER_LOSS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_arrivals_survive_power_loss(
        seed in any::<u64>(),
        segment_size in prop_oneof![Just(4096u64), Just(64 << 20)],
        rounds in prop::collection::vec(
            (
                1u64..60,
                prop::collection::vec(
                    prop::collection::vec((0usize..12, 0usize..3), 1..12),
                    1..4,
                ),
                any::<bool>(),
            ),
            1..5,
        ),
    ) {
        run_case(seed, &rounds, segment_size);
    }
}

/// Power lost at each sync of a compaction in turn, from the first to the last: the
/// store opens, holds every message and verifies clean, and a later compaction finishes.
#[test]
fn compaction_interrupted_at_every_sync_loses_nothing() {
    let dir = Path::new("/archive");
    let vfs = FaultVfs::new();
    let mut acked: Model = HashMap::new();
    {
        let store = Store::open_with(Arc::new(vfs.clone()), options(4096)).unwrap();
        let h = store.handle();
        for i in 0..12 {
            for r in 0..2 {
                let receipt = h.ingest_blocking(incoming(i, r)).unwrap();
                acked.insert((i, r), (receipt.message_id, receipt.arrival_id.to_string()));
            }
        }
        drop(h);
        store.close();
    }
    let image = vfs.clone();
    // How many syncs a whole compaction takes, on a copy of the disk.
    let dry = FaultVfs::new();
    copy_disk(&image, &dry, dir);
    let store = Store::open_with(Arc::new(dry.clone()), options(4096)).unwrap();
    let before = dry.syncs();
    let done = store.handle().compact(true, &|| false).unwrap();
    let total = dry.syncs() - before;
    store.close();
    assert!(done.segments > 1, "{done:?}");
    eprintln!(
        "a compaction of {} segments takes {total} syncs",
        done.segments
    );
    let bound = std::env::var("COFFER_COMPACT_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(total);
    for cut in 1..=total.min(bound) {
        let disk = FaultVfs::new();
        copy_disk(&image, &disk, dir);
        let store = Store::open_with(Arc::new(disk.clone()), options(4096)).unwrap();
        disk.crash_at_sync(cut);
        let _ = store.handle().compact(true, &|| false);
        store.close();
        disk.power_loss(cut);
        check(&disk, dir, &acked, usize::try_from(cut).unwrap());
        // And it can be finished afterwards.
        let store = Store::open_with(Arc::new(disk.clone()), options(4096)).unwrap();
        store.handle().compact(true, &|| false).unwrap();
        store.close();
        check(&disk, dir, &acked, usize::try_from(cut).unwrap());
    }
}

/// Copies every file of the store in `dir` (as synced) from one fault disk to another.
fn copy_disk(from: &FaultVfs, to: &FaultVfs, dir: &Path) {
    fn walk(from: &FaultVfs, to: &FaultVfs, d: &Path) {
        to.create_dir_all(d).unwrap();
        for name in from.read_dir(d).unwrap() {
            let p = d.join(&name);
            match from.file_bytes(&p) {
                Some(bytes) => to.put_file_bytes(&p, bytes),
                None => walk(from, to, &p),
            }
        }
    }
    walk(from, to, dir);
    to.sync_dir(&dir.join("log")).unwrap();
}
