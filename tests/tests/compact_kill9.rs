//! Compaction is crash-safe from the outside (docs/store-format.md "Compacted segments"):
//! clients send mail continuously to a `cofferd` with small segments while `coffer compact
//! --wait` runs, and the test SIGKILLs the daemon at random moments and restarts it.
//! Afterwards a last `coffer compact --wait` finishes, every acknowledged message comes
//! back byte for byte (its hash is its id), most segments are compacted, and `coffer
//! verify --deep` is clean with the daemon running and stopped.
//!
//! kill -9 keeps the page cache, so this proves the recovery of half-done compactions,
//! not fsync discipline (the power-loss test does that on the fault layer).
//!
//! Each kill waits (bounded) until the daemon's control socket says a compaction runs,
//! then for a random 0–3 further acknowledgements. `coffer compact --wait` follows a
//! restarted daemon (it asks the new one again).
//!
//! Bounds: `THREADS` × `PER_THREAD` messages, `CLIENT_TIME_CAP`, `ATTEMPTS` per message,
//! `COFFER_E2E_COMPACT_KILLS` kills (5 by default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffer_archiver::control;
use coffer_e2e::daemon::smtp_daemon;
use coffer_e2e::{archived_form, bin, sha256_hex, wait_until, CofferCli, SmtpClient};
use rand::{Rng, SeedableRng};
use serde_json::json;

const THREADS: usize = 2;
const PER_THREAD: usize = 1000;
const CLIENT_TIME_CAP: Duration = Duration::from_secs(240);
const ATTEMPTS: usize = 20;
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

fn message(thread: usize, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let words = [
        "archive", "invoice", "meeting", "budget", "report", "the", "of", "please",
    ];
    let mut m = format!(
        "From: c{thread}@example.org\r\nTo: archive@example.net\r\nSubject: compact {thread}/{n}\r\n\
         Message-ID: <ck.{thread}.{n}@example.org>\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..rng.gen_range(5..120) {
        for _ in 0..rng.gen_range(3..14) {
            m.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
            m.push(b' ');
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// Sends messages until done or stopped; returns (message id, bytes) of each one acked.
fn client(
    thread: usize,
    addr: SocketAddr,
    seed: u64,
    stop: &AtomicBool,
    acked: &AtomicUsize,
) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let end = Instant::now() + CLIENT_TIME_CAP;
    let mut out = Vec::new();
    let mut session: Option<SmtpClient> = None;
    for n in 0..PER_THREAD {
        if stop.load(Ordering::Relaxed) || Instant::now() >= end {
            break;
        }
        let bytes = message(thread, n, &mut rng);
        for _ in 0..ATTEMPTS {
            if Instant::now() >= end {
                break;
            }
            if session.is_none() {
                session = wait_until("cofferd to accept again", RECONNECT_DEADLINE, || {
                    let mut c = SmtpClient::connect(addr).ok()?;
                    (c.ehlo("compact.test").ok()?.code == 250).then_some(c)
                })
                .ok();
            }
            let Some(c) = session.as_mut() else { continue };
            match c.send("c@example.org", &["archive@example.net"], &bytes) {
                Ok(acc) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    out.push((acc.message_id, archived_form(&bytes)));
                    break;
                }
                Err(_) => session = None,
            }
        }
    }
    if let Some(c) = session {
        let _ = c.quit();
    }
    out
}

#[test]
fn compaction_survives_kill9_and_loses_nothing() {
    let kills: usize = std::env::var("COFFER_E2E_COMPACT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("COFFER_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!(
        "compact_kill9: seed {seed}, {kills} kills (COFFER_E2E_SEED, COFFER_E2E_COMPACT_KILLS)"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let launched = smtp_daemon(
        "min_free_disk = \"16MiB\"\nsegment_size = \"48KiB\"\nblock_size = \"16KiB\"\n\
         block_level = 3\ndictionary = true",
        "",
        false,
    );
    let mut d = launched.daemon;
    let addr = launched.smtp;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let s = seed.wrapping_add(t as u64 + 1);
            std::thread::spawn(move || client(t, addr, s, &stop, &acked))
        })
        .collect();

    let compacts = Arc::new(Mutex::new(Vec::new()));
    for k in 0..kills {
        // `coffer compact --wait` in the background; once the daemon has its request (a
        // `coffer compact` that found no daemon would compact the store itself and hold
        // it), the kill.
        let data_dir = d.dir().join("data");
        let status = || control::request(&data_dir, &json!({"cmd": "compact_status"})).ok();
        let requested = status().and_then(|v| v["requested"].as_u64()).unwrap_or(0);
        let child = Command::new(bin("coffer"))
            .arg("--config")
            .arg(&d.config_path)
            .args(["compact", "--wait"])
            .current_dir(d.dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn coffer compact");
        let asked = wait_until(
            "the daemon to take the request",
            Duration::from_secs(30),
            || status().filter(|v| v["requested"].as_u64().unwrap_or(0) > requested),
        );
        assert!(
            asked.is_ok(),
            "coffer compact did not reach the daemon\n{}",
            d.log_tail()
        );
        // Aim at a compaction under way: wait (bounded) until the daemon says one runs,
        // then for a random few more acknowledgements.
        let running = wait_until("a compaction to run", Duration::from_secs(10), || {
            status().filter(|v| v["running"] == true)
        });
        let target = acked.load(Ordering::Relaxed) + rng.gen_range(0..4);
        let reached = wait_until(
            "acknowledgements before the kill",
            Duration::from_secs(10),
            || (acked.load(Ordering::Relaxed) >= target).then_some(()),
        );
        if running.is_err() || reached.is_err() {
            eprintln!(
                "compact_kill9: kill {k}: compaction seen running: {}, {} acked",
                running.is_ok(),
                acked.load(Ordering::Relaxed)
            );
        }
        eprintln!(
            "compact_kill9: SIGKILL {} after {} acked",
            d.pid(),
            acked.load(Ordering::Relaxed)
        );
        d.kill9();
        compacts.lock().unwrap().push(child);
        d.restart();
    }
    // The compact commands end once the daemon they asked is gone (exit 3) or done.
    for mut c in compacts.lock().unwrap().drain(..) {
        let ended = wait_until("coffer compact to end", Duration::from_secs(120), || {
            c.try_wait().ok().flatten()
        });
        if ended.is_err() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let after = acked.load(Ordering::Relaxed);
    let flowing = wait_until(
        "mail acknowledged after the last restart",
        Duration::from_secs(60),
        || {
            (acked.load(Ordering::Relaxed) >= after + 10 || clients.iter().all(|h| h.is_finished()))
                .then_some(())
        },
    );
    if flowing.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let sent: Vec<(String, Vec<u8>)> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    assert!(
        flowing.is_ok(),
        "mail did not flow after the last restart\n{}",
        d.log_tail()
    );
    assert!(
        sent.len() > 50,
        "too few messages acknowledged ({})\n{}",
        sent.len(),
        d.log_tail()
    );

    let log = d.log_text();
    eprintln!(
        "compact_kill9: {} segments compacted before the last run; {} half-done compactions \
         settled at a restart",
        log.matches("compacted a sealed segment").count(),
        log.matches("an interrupted compaction").count()
    );
    // A last compaction runs to its end.
    let out = d.coffer_ok(&["compact", "--wait", "--json"]);
    eprintln!("compact_kill9: {}", out.stdout_str().trim());
    // It rewrote the index too; a rewrite cut short by a kill left nothing behind.
    let doc = out.json();
    assert!(
        doc["index_bytes_after"].as_u64().is_some(),
        "the index was not rewritten: {doc}\n{}",
        d.log_tail()
    );
    assert!(!d.dir().join("data/index.redb.rewrite").exists());
    let logs = std::fs::read_dir(d.dir().join("data/log"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    let blk = logs.iter().filter(|n| n.ends_with(".blk")).count();
    let seg = logs.iter().filter(|n| n.ends_with(".seg")).count();
    assert!(blk >= 2, "compacted segments: {logs:?}");
    assert_eq!(seg, 1, "only the open segment stays uncompacted: {logs:?}");

    // Every acknowledged message, byte for byte.
    let export = d.dir().join("export");
    d.coffer_ok(&[
        "export",
        "--format",
        "eml",
        "--out",
        export.to_str().unwrap(),
    ]);
    let mut exported = BTreeMap::new();
    for e in std::fs::read_dir(&export).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "eml") {
            let id = p.file_stem().unwrap().to_string_lossy().into_owned();
            exported.insert(id, std::fs::read(&p).unwrap());
        }
    }
    let mut missing = Vec::new();
    for (id, bytes) in &sent {
        assert_eq!(&sha256_hex(bytes), id, "the 250 named the message's hash");
        match exported.get(id) {
            Some(b) => assert_eq!(b, bytes, "{id}: bytes differ"),
            None => missing.push(id.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost: {missing:?}\n{}",
        missing.len(),
        d.log_tail()
    );
    for (id, bytes) in sent.iter().take(5) {
        assert_eq!(&d.get(id), bytes);
    }

    let v = d.coffer(&["verify", "--deep"]);
    assert_eq!(v.code, Some(0), "verify --deep beside the daemon:\n{v}");
    let st = d.terminate();
    assert!(
        st.success(),
        "cofferd exit after SIGTERM: {st}\n{}",
        d.log_tail()
    );
    let v = d.coffer(&["verify", "--deep"]);
    assert_eq!(v.code, Some(0), "verify --deep on the stopped store:\n{v}");
}
