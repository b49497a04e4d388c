//! Store unit tests on the real filesystem (tempdir) and on the fault layer.

use std::path::Path;
use std::sync::Arc;

use super::fault::FaultVfs;
use super::*;
use crate::envelope::{Envelope, SessionInfo};

fn opts(dir: &Path) -> StoreOptions {
    StoreOptions {
        data_dir: dir.to_owned(),
        node: "node-a".into(),
        segment_size: 64 << 20,
        max_pending: 256 << 20,
        min_free_disk: 0,
        ..StoreOptions::default()
    }
}

fn msg(bytes: &[u8], from: &str, to: &[&str]) -> Incoming {
    Incoming {
        bytes: bytes.to_vec(),
        envelope: Envelope {
            mail_from: from.into(),
            mail_params: vec![],
            rcpt_to: to.iter().map(|s| (*s).to_owned()).collect(),
        },
        session: SessionInfo {
            listener: "journal".into(),
            protocol: "ESMTP".into(),
            client_addr: Some("127.0.0.1:1234".into()),
            helo: Some("client".into()),
            queue_id: None,
            xcoffer: None,
            tls: None,
        },
    }
}

const M1: &[u8] = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Quarterly numbers\r\nMessage-ID: <m1@example.org>\r\n\r\nHello Bob.\r\n";

#[test]
fn ingest_then_read_back_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    let h = store.handle();
    let big: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {i}\r\n").into_bytes())
        .collect();
    let r1 = h
        .ingest_blocking(msg(M1, "alice@example.org", &["bob@example.net"]))
        .unwrap();
    let r2 = h.ingest_blocking(msg(&big, "x@y", &["z@w"])).unwrap();
    assert!(!r1.repeat && !r2.repeat);
    assert_eq!(r1.arrival_id.node, "node-a");
    assert_eq!(r1.arrival_id.seq + 1, r2.arrival_id.seq);
    drop(h);
    store.close();

    let reader = StoreReader::open(dir.path()).unwrap();
    assert!(!reader.daemon_running());
    assert_eq!(reader.read_message(&r1.message_id).unwrap(), M1);
    assert_eq!(reader.read_message(&r2.message_id).unwrap(), big);
    let st = reader.status().unwrap();
    assert_eq!((st.messages, st.arrivals, st.repeats), (2, 2, 0));
    assert!(st.stored_bytes < st.raw_bytes, "the big message compresses");
    let prefix = &r1.message_id.to_hex()[..10];
    assert_eq!(reader.resolve(prefix).unwrap(), r1.message_id);
    assert!(matches!(
        reader.resolve("0000000000"),
        Err(LookupError::NotFound(_))
    ));
    assert!(matches!(
        reader.resolve("xyz"),
        Err(LookupError::BadPrefix(_))
    ));
    let report = reader.verify(true, &mut |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.messages_checked, 2);
}

/// `verify --deep` finds nothing.
fn assert_verifies_clean(reader: &StoreReader) {
    let report = reader.verify(true, &mut |_, _| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn retry_is_a_repeat_new_envelope_is_a_new_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    let h = store.handle();
    let a = h
        .ingest_blocking(msg(M1, "alice@example.org", &["bob@example.net"]))
        .unwrap();
    let b = h
        .ingest_blocking(msg(M1, "alice@example.org", &["bob@example.net"]))
        .unwrap();
    assert!(b.repeat);
    assert_eq!(a.arrival_id, b.arrival_id);
    let c = h
        .ingest_blocking(msg(M1, "alice@example.org", &["carol@example.net"]))
        .unwrap();
    assert!(!c.repeat);
    assert_ne!(a.arrival_id, c.arrival_id);
    // Same Message-ID header, different bytes: a different message, kept.
    let other = [M1, b"PS.\r\n"].concat();
    let d = h
        .ingest_blocking(msg(&other, "alice@example.org", &["bob@example.net"]))
        .unwrap();
    assert_ne!(d.message_id, a.message_id);
    drop(h);
    store.close();
    let reader = StoreReader::open(dir.path()).unwrap();
    let st = reader.status().unwrap();
    assert_eq!((st.messages, st.arrivals, st.repeats), (2, 3, 1));
    let arrivals = reader.arrivals(&a.message_id).unwrap();
    assert_eq!(arrivals.len(), 2);
    let found = reader
        .search(&Query {
            message_id: Some("<m1@example.org>".into()),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(found.len(), 2);
}

#[test]
fn search_by_address_domain_subject_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    let h = store.handle();
    let a = h
        .ingest_blocking(msg(M1, "alice@example.org", &["bob@example.net"]))
        .unwrap();
    let m2 = b"From: carol@other.org\r\nTo: dave@example.net\r\nCc: Erin <erin@cc.example>\r\nSubject: lunch\r\n\r\nx\r\n";
    let b = h
        .ingest_blocking(msg(m2, "bounce@other.org", &["hidden@bcc.example"]))
        .unwrap();
    drop(h);
    store.close();
    let r = StoreReader::open(dir.path()).unwrap();
    let ids =
        |q: Query| -> Vec<String> { r.search(&q).unwrap().into_iter().map(|m| m.id).collect() };
    let (ah, bh) = (a.message_id.to_hex(), b.message_id.to_hex());
    assert_eq!(
        ids(Query {
            from: Some("ALICE@example.org".into()),
            ..Query::default()
        }),
        vec![ah.clone()]
    );
    assert_eq!(
        ids(Query {
            to: Some("@example.net".into()),
            ..Query::default()
        })
        .len(),
        2
    );
    assert_eq!(
        ids(Query {
            to: Some("erin@cc.example".into()),
            ..Query::default()
        }),
        vec![bh.clone()]
    );
    assert_eq!(
        ids(Query {
            to: Some("hidden@bcc.example".into()),
            ..Query::default()
        }),
        vec![bh.clone()]
    );
    assert_eq!(
        ids(Query {
            subject: Some("QUARTERLY".into()),
            ..Query::default()
        }),
        vec![ah.clone()]
    );
    assert_eq!(
        ids(Query::default()),
        vec![bh.clone(), ah.clone()],
        "newest first"
    );
    assert_eq!(
        ids(Query {
            limit: 1,
            ..Query::default()
        }),
        vec![bh]
    );
    assert!(ids(Query {
        since_us: Some(i64::MAX - 1),
        ..Query::default()
    })
    .is_empty());
}

#[test]
fn torn_tail_is_truncated_and_acknowledged_mail_survives() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/store");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir)).unwrap();
    let h = store.handle();
    let a = h.ingest_blocking(msg(M1, "a@x", &["b@y"])).unwrap();
    // The next batch dies at its first sync: its bytes may be torn on disk.
    vfs.crash_at_sync(1);
    assert!(h
        .ingest_blocking(msg(b"Subject: lost\r\n\r\nx\r\n", "a@x", &["b@y"]))
        .is_err());
    drop(h);
    store.close();
    vfs.power_loss(12345);
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap();
    assert_eq!(reader.read_message(&a.message_id).unwrap(), M1);
    assert_eq!(reader.status().unwrap().arrivals, 1);
    assert_verifies_clean(&reader);
}

#[test]
fn enospc_rolls_back_and_ingest_resumes() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/store");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir)).unwrap();
    let h = store.handle();
    vfs.set_enospc(true);
    let err = h.ingest_blocking(msg(M1, "a@x", &["b@y"])).unwrap_err();
    assert!(matches!(err, IngestError::DiskFull), "{err}");
    // What the session logs must not blame min_free_disk alone: it is 0 here.
    assert!(err.to_string().contains("no space left"), "{err}");
    vfs.set_enospc(false);
    // The idle writer re-measures free disk and lifts the refusal by itself.
    let mut ok = None;
    for _ in 0..50 {
        match h.ingest_blocking(msg(M1, "a@x", &["b@y"])) {
            Ok(r) => {
                ok = Some(r);
                break;
            }
            Err(IngestError::DiskFull) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => panic!("{e}"),
        }
    }
    let r = ok.expect("ingest resumed once space returned");
    assert!(!r.repeat);
}

#[test]
fn sync_failure_poisons_then_the_store_reopens_itself() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/store");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir)).unwrap();
    let h = store.handle();
    let a = h.ingest_blocking(msg(M1, "a@x", &["b@y"])).unwrap();
    vfs.set_sync_eio(true);
    assert!(matches!(
        h.ingest_blocking(msg(b"x\r\n", "a@x", &["b@y"])),
        Err(IngestError::Unavailable(_))
    ));
    vfs.set_sync_eio(false);
    let mut last = None;
    for _ in 0..50 {
        match h.ingest_blocking(msg(b"y\r\n", "a@x", &["b@y"])) {
            Ok(r) => {
                last = Some(r);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
    assert!(last.is_some(), "the writer reopened the store");
    drop(h);
    store.close();
    let reader = StoreReader::open_with(Arc::new(vfs), dir).unwrap();
    assert_eq!(reader.read_message(&a.message_id).unwrap(), M1);
}

#[test]
fn max_pending_refuses_with_busy_but_always_admits_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.max_pending = 10;
    let store = Store::open(o).unwrap();
    let h = store.handle();
    // One message bigger than the budget is admitted when nothing else is pending.
    h.ingest_blocking(msg(M1, "a@x", &["b@y"])).unwrap();
    let g = h.admit(5).unwrap();
    assert!(matches!(h.admit(6), Err(IngestError::Busy)));
    // A reload raises the budget: admitted at once.
    h.set_limits(11, 0);
    let g2 = h.admit(6).unwrap();
    drop((g, g2));
    assert!(h.admit(6).is_ok());
}

#[test]
fn second_writer_is_refused_and_reader_follows_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    assert!(matches!(
        Store::open(opts(dir.path())),
        Err(StoreError::DaemonRunning(_))
    ));
    let h = store.handle();
    let a = h.ingest_blocking(msg(M1, "a@x", &["b@y"])).unwrap();
    let reader = StoreReader::open(dir.path()).unwrap();
    assert!(reader.daemon_running());
    assert_eq!(reader.read_message(&a.message_id).unwrap(), M1);
    let b = h
        .ingest_blocking(msg(b"Subject: later\r\n\r\n.\r\n", "a@x", &["b@y"]))
        .unwrap();
    assert_eq!(
        reader.read_message(&b.message_id).unwrap(),
        b"Subject: later\r\n\r\n.\r\n"
    );
    assert_eq!(reader.status().unwrap().arrivals, 2);
}

/// A reader beside the daemon never answers from an index that is behind the log it
/// saw (the daemon's index commits failing, e.g. on a full disk): "not found" for an
/// acknowledged message would be a lie. It says the daemon cannot serve instead.
#[test]
fn reader_refuses_an_index_that_stays_behind_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    let a = store
        .handle()
        .ingest_blocking(msg(M1, "a@x", &["b@y"]))
        .unwrap();
    // Log bytes the index will never reach, as after an acknowledged batch whose index
    // commit keeps failing.
    let segs = log::list_segments(&io::RealVfs, &dir.path().join("log")).unwrap();
    let last = log::segment_path(&dir.path().join("log"), *segs.last().unwrap());
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 64]).unwrap();
    let reader = StoreReader::open(dir.path()).unwrap();
    assert!(reader.daemon_running());
    match reader.read_message(&a.message_id) {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("not caught up"), "{why}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    drop(store);
}

#[test]
fn segments_rotate_and_reopen_keeps_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.segment_size = 4096;
    let mut ids = Vec::new();
    {
        let store = Store::open(o.clone()).unwrap();
        let h = store.handle();
        for i in 0..30 {
            let body = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(500 + i));
            ids.push(
                h.ingest_blocking(msg(body.as_bytes(), "a@x", &["b@y"]))
                    .unwrap(),
            );
        }
    }
    let segs = log::list_segments(&io::RealVfs, &dir.path().join("log")).unwrap();
    assert!(segs.len() > 3, "{segs:?}");
    let store = Store::open(o).unwrap();
    let next = store
        .handle()
        .ingest_blocking(msg(b"z\r\n", "a@x", &["b@y"]))
        .unwrap();
    assert_eq!(next.arrival_id.seq, ids.last().unwrap().arrival_id.seq + 1);
    store.close();
    let reader = StoreReader::open(dir.path()).unwrap();
    for r in &ids {
        reader.read_message(&r.message_id).unwrap();
    }
    assert_verifies_clean(&reader);
}

#[test]
fn index_lost_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let a;
    {
        let store = Store::open(opts(dir.path())).unwrap();
        a = store
            .handle()
            .ingest_blocking(msg(M1, "a@x", &["b@y"]))
            .unwrap();
    }
    std::fs::remove_file(dir.path().join("index.redb")).unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    let again = store
        .handle()
        .ingest_blocking(msg(M1, "a@x", &["b@y"]))
        .unwrap();
    assert!(again.repeat, "arrival keys were rebuilt from the log");
    assert_eq!(again.arrival_id, a.arrival_id);
    store.close();
    let reader = StoreReader::open(dir.path()).unwrap();
    assert_eq!(reader.status().unwrap().arrivals, 1);
}

#[test]
fn xcoffer_facts_are_kept_with_the_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(opts(dir.path())).unwrap();
    let h = store.handle();
    let x = coffer_proto::Xcoffer {
        origin_arrival: Some("node-b/0badf00d/7".into()),
        helo: Some("their\r\nhelo".into()),
        queue_id: Some("4Q1".into()),
        trace: vec!["node-b".into()],
        ..coffer_proto::Xcoffer::default()
    };
    let mut with = msg(M1, "a@x", &["b@y"]);
    with.session.queue_id = x.queue_id.clone();
    with.session.xcoffer = Some(x.clone());
    let r1 = h.ingest_blocking(with).unwrap();
    let r2 = h.ingest_blocking(msg(M1, "c@x", &["b@y"])).unwrap();
    drop(h);
    store.close();

    let reader = StoreReader::open(dir.path()).unwrap();
    let arrivals = reader.arrivals(&r1.message_id).unwrap();
    let a1 = arrivals.iter().find(|a| a.id == r1.arrival_id).unwrap();
    assert_eq!(a1.xcoffer.as_ref(), Some(&x));
    assert_eq!(a1.queue_id.as_deref(), Some("4Q1"));
    assert_eq!(a1.helo.as_deref(), Some("client"));
    let a2 = arrivals.iter().find(|a| a.id == r2.arrival_id).unwrap();
    assert_eq!(a2.xcoffer, None);
    // Left out of the JSON when absent; records written before the field still read.
    let json = serde_json::to_value(a2).unwrap();
    assert!(json.get("xcoffer").is_none(), "{json}");
    let old: Arrival = serde_json::from_value(json).unwrap();
    assert_eq!(&old, a2);
}

fn replicated(bytes: &[u8], origin: &str, trace: &[&str]) -> Incoming {
    let mut m = msg(
        bytes,
        "alice@example.org",
        &["bob@example.net", "carol@example.net"],
    );
    m.session.listener = "ha".into();
    m.session.client_addr = Some("127.0.0.2:40000".into());
    m.session.xcoffer = Some(coffer_proto::Xcoffer {
        origin_arrival: Some(origin.into()),
        origin_time: Some("2024-05-01T12:00:00.000001Z".into()),
        origin_listener: Some("journal".into()),
        protocol: Some("ESMTP".into()),
        mail_params: vec!["SIZE=100".into()],
        client_addr: Some("192.0.2.7:2525".into()),
        trace: trace.iter().map(|s| (*s).to_owned()).collect(),
        hops: 0,
        ..coffer_proto::Xcoffer::default()
    });
    m
}

#[test]
fn replicated_arrivals_keep_their_origin_id_and_dedupe_by_it() {
    let vfs = Arc::new(FaultVfs::new());
    let dir = Path::new("/r");
    let store = Store::open_with(vfs.clone(), opts(dir)).unwrap();
    let h = store.handle();
    // A first arrival of the same bytes and envelope on another listener is separate.
    let local = h
        .ingest_blocking(msg(M1, "alice@example.org", &["bob@example.net"]))
        .unwrap();
    let r = h
        .ingest_blocking(replicated(M1, "node-b/0badf00d/7", &["node-b"]))
        .unwrap();
    assert_eq!(r.arrival_id.to_string(), "node-b/0badf00d/7");
    assert!(!r.repeat);
    // The same origin id again, in a later batch and with another envelope: a repeat.
    let mut again = replicated(M1, "node-b/0badf00d/7", &["node-b", "node-c"]);
    again.envelope.rcpt_to.truncate(1);
    let dup = h.ingest_blocking(again).unwrap();
    assert!(dup.repeat);
    assert_eq!(dup.arrival_id, r.arrival_id);
    // Two copies in one batch: one arrival. Sent from threads so they share a batch.
    let hs: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            std::thread::spawn(move || {
                h.ingest_blocking(replicated(b"other\r\n", "node-b/0badf00d/8", &[]))
                    .unwrap()
            })
        })
        .collect();
    let outs: Vec<Receipt> = hs.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(outs.iter().filter(|r| r.repeat).count(), 1);
    // Minting goes on from our own sequence.
    let next = h
        .ingest_blocking(msg(b"third\r\n", "x@y", &["z@w"]))
        .unwrap();
    assert_eq!(next.arrival_id.seq, local.arrival_id.seq + 1);
    drop(h);
    store.close();

    let check = |reader: &StoreReader| {
        let st = reader.status().unwrap();
        assert_eq!((st.arrivals, st.repeats), (4, 2));
        let arrivals = reader.arrivals(&r.message_id).unwrap();
        let a = arrivals
            .iter()
            .find(|a| a.id == r.arrival_id)
            .expect("replicated arrival indexed");
        assert_eq!(a.time, "2024-05-01T12:00:00.000001Z");
        assert_eq!(a.listener, "journal");
        assert_eq!(a.via.as_deref(), Some("ha"));
        assert_eq!(a.client_addr.as_deref(), Some("127.0.0.2:40000"));
        let x = a.xcoffer.as_ref().unwrap();
        assert_eq!(x.client_addr.as_deref(), Some("192.0.2.7:2525"));
        assert_eq!(a.mail_params, vec!["SIZE=100".to_owned()]);
        assert_eq!(a.trace, vec!["node-b".to_owned(), "node-a".to_owned()]);
        let first = arrivals.iter().find(|a| a.id == local.arrival_id).unwrap();
        assert_eq!(first.trace, vec!["node-a".to_owned()]);
    };
    let reader = StoreReader::open_with(vfs.clone(), dir).unwrap();
    check(&reader);
    drop(reader);
    // Rebuilt from the log alone, the index is the same.
    io::Vfs::remove_file(&*vfs, &dir.join(engine::INDEX_FILE)).unwrap();
    let reader = StoreReader::open_with(vfs.clone(), dir).unwrap();
    check(&reader);
    drop(reader);
    // And a replicated copy arriving after the rebuild is still a repeat.
    let store = Store::open_with(vfs, opts(dir)).unwrap();
    let h = store.handle();
    assert!(
        h.ingest_blocking(replicated(M1, "node-b/0badf00d/7", &[]))
            .unwrap()
            .repeat
    );
    drop(h);
    store.close();
}

/// Under load the index commits at most once per commit spacing (50 ms), so at a power
/// cut it may trail the log by acknowledged batches. None of them is lost: recovery
/// replays the log past the index's durable tail.
#[test]
fn power_cut_while_the_index_trails_the_log_loses_nothing_acknowledged() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/store");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir)).unwrap();
    let h = store.handle();
    let mut acked = Vec::new();
    for i in 0..200 {
        let bytes = format!("Subject: n{i}\r\n\r\nbody {i}\r\n").into_bytes();
        let r = h.ingest_blocking(msg(&bytes, "a@x", &["b@y"])).unwrap();
        acked.push((r.message_id, bytes));
    }
    let indexed = {
        let txn = h.snapshot().unwrap();
        let meta = txn.open_table(index::META).unwrap();
        index::meta_u64(&meta, index::K_ARRIVALS)
    };
    eprintln!("the index held {indexed} of 200 acknowledged arrivals at the power cut");
    // The power goes at the next sync, whichever stage makes it.
    vfs.crash_at_sync(1);
    let _ = h.ingest_blocking(msg(b"Subject: cut\r\n\r\nx\r\n", "a@x", &["b@y"]));
    drop(h);
    store.close();
    assert!(vfs.crashed());
    vfs.power_loss(7);
    let reader = StoreReader::open_with(Arc::new(vfs.clone()), dir).unwrap();
    for (id, bytes) in &acked {
        assert_eq!(&reader.read_message(id).unwrap(), bytes);
    }
    assert!(reader.status().unwrap().arrivals >= 200);
    assert_verifies_clean(&reader);
}

/// Why every index commit is durable: the daemon opens its index so that readers in
/// other processes (the CLI) can follow it, and redb refuses non-durable commits in that
/// mode, since they would live only in the daemon's memory. If this ever changes, the
/// index stage could commit non-durably between durable commits.
#[test]
fn the_shared_index_refuses_non_durable_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = redb::Builder::new();
    b.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
    let db = b.create(dir.path().join("index.redb")).unwrap();
    let mut txn = db.begin_write().unwrap();
    assert!(matches!(
        txn.set_durability(redb::Durability::None),
        Err(redb::SetDurabilityError::NonDurableCommitUnsupported)
    ));
    txn.set_durability(redb::Durability::Immediate).unwrap();
    txn.commit().unwrap();
}

/// State changes sent while index commits fail are all answered (with an error), none
/// left waiting: after a failed commit the index stage answers whatever still reaches
/// it until the writer notices and reopens the store; then state changes commit again.
/// (A change that reached the index stage's channel just as it stopped used to wait
/// forever: a channel keeps what it holds while a sender lives. That window is too
/// narrow to hit on purpose; this is the guard around it.)
#[test]
fn state_changes_behind_a_failed_index_commit_are_answered() {
    let vfs = FaultVfs::new();
    let dir = Path::new("/store");
    let store = Store::open_with(Arc::new(vfs.clone()), opts(dir)).unwrap();
    let h = store.handle();
    h.ingest_blocking(msg(M1, "a@x", &["b@y"])).unwrap();
    let set = |h: &StoreHandle, connection: String, cursor: u64| {
        h.update_state_blocking(writer::StateOp::SetCursor {
            connection,
            state: index::CursorState {
                cursor,
                ..index::CursorState::default()
            },
        })
    };
    vfs.set_sync_eio(true);
    let (done, answered) = crossbeam_channel::unbounded();
    let callers: Vec<_> = (0..8)
        .map(|t| {
            let (h, done) = (h.clone(), done.clone());
            std::thread::spawn(move || {
                for i in 0..20 {
                    let _ = set(&h, format!("c{t}"), i);
                }
                done.send(t).unwrap();
            })
        })
        .collect();
    drop(done);
    for _ in 0..8 {
        answered
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("every state change is answered");
    }
    for c in callers {
        c.join().unwrap();
    }
    vfs.set_sync_eio(false);
    let reopened = (0..50).any(|_| {
        let ok = set(&h, "c0".into(), 99).is_ok();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        ok
    });
    assert!(reopened, "the writer reopened the store");
    drop(h);
    store.close();
}
