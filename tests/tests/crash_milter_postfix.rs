//! The crash matrix's milter column and the milter path's disk-full case
//! (docs/reliability.md "Crash matrix", "I/O errors"), through a real throwaway Postfix
//! with coffer-milter in `smtpd_milters` (`default_action=tempfail`), relaying to an
//! `smtp-sink` that dumps what it gets:
//!
//! - **kill -9 under Postfix**: SMTP clients send to Postfix's smtpd while the test
//!   SIGKILLs coffer-milter (and, every other time, cofferd behind it) and restarts it.
//!   Postfix tempfails what it cannot hand over, the clients retry. Afterwards, with
//!   Postfix's queue flushed: every message a client got 250 for is archived exactly
//!   once (one arrival for its envelope), delivered to the sink, and the sink holds
//!   nothing the archive lacks. `COFFER_CRASH_ITERATIONS` kills (default 3).
//! - **the store's disk full**: cofferd's store on a small tmpfs that fills up; clients
//!   get a 4xx from Postfix (milter tempfail), nothing is delivered unarchived, the log
//!   and `/metrics` say the disk is full, and once space returns the retried mail is
//!   archived exactly once. Without a tmpfs (not root, `COFFER_E2E_NO_TMPFS=1`) it
//!   prints `FALLBACK:` and fills the disk with `min_free_disk` instead.
//!
//! Needs root, postfix and smtp-source's package; skipped with a reason outside CI.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_e2e::daemon::{free_addr, http_get, metric};
use coffer_e2e::milter::MilterNode;
use coffer_e2e::postfix::Postfix;
use coffer_e2e::tmpfs::Tmpfs;
use coffer_e2e::{
    crash_iterations, crash_per_thread, crash_time_cap, e2e_seed, export_all, require_tool,
    wait_until, CofferCli, SmtpClient,
};
use rand::{Rng, SeedableRng};

const ATTEMPTS_PER_MESSAGE: usize = 30;

fn tools_present() -> bool {
    let ok = require_tool("postfix", "postfix").is_some()
        && require_tool("postqueue", "postfix").is_some()
        && require_tool("smtp-sink", "postfix").is_some();
    if ok && !nix::unistd::Uid::effective().is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        assert!(!ci, "the Postfix e2e tests need root in CI");
        eprintln!("SKIPPED: a throwaway Postfix instance needs root");
        return false;
    }
    ok
}

/// One message a client tried to get through Postfix.
struct Sent {
    message_id: String,
    bytes: Vec<u8>,
    from: String,
    to: Vec<String>,
    acked: bool,
    attempts: usize,
}

fn message(tag: &str, thread: usize, n: usize, body: usize, rng: &mut impl Rng) -> Sent {
    let message_id = format!("{tag}.{thread}.{n}@example.org");
    let mut bytes = format!(
        "From: t{thread}@example.org\r\nTo: rcpt@example.net\r\nSubject: {tag} {thread}/{n}\r\n\
         Message-ID: <{message_id}>\r\n\r\n"
    )
    .into_bytes();
    while bytes.len() < body {
        let len = rng.gen_range(10..76);
        bytes.extend((0..len).map(|_| rng.gen_range(b'a'..=b'z')));
        bytes.extend_from_slice(b"\r\n");
    }
    let rcpts = rng.gen_range(1..=3);
    Sent {
        message_id,
        bytes,
        from: format!("t{thread}@example.org"),
        to: (0..rcpts)
            .map(|r| format!("r{r}.m{n}@t{thread}.example.net"))
            .collect(),
        acked: false,
        attempts: 0,
    }
}

/// One SMTP transaction with Postfix; `Ok(true)` for a 250 at the end of DATA,
/// `Ok(false)` for a 4xx anywhere (Postfix or the milter said try again).
fn transaction(c: &mut SmtpClient, s: &Sent) -> anyhow::Result<bool> {
    let r = c.mail(&s.from)?;
    if r.code != 250 {
        anyhow::ensure!(r.code / 100 == 4, "MAIL: {r}");
        return Ok(false);
    }
    for to in &s.to {
        let r = c.rcpt(to)?;
        if r.code != 250 {
            anyhow::ensure!(r.code / 100 == 4, "RCPT: {r}");
            return Ok(false);
        }
    }
    let r = c.data(&s.bytes)?;
    anyhow::ensure!(r.code == 250 || r.code / 100 == 4, "DATA: {r}");
    Ok(r.code == 250)
}

/// Sends `s` until Postfix answers 250 (bounded); a new session after each failure.
fn deliver(addr: SocketAddr, s: &mut Sent, end: Instant, pause: Duration) {
    for _ in 0..ATTEMPTS_PER_MESSAGE {
        if Instant::now() >= end {
            return;
        }
        s.attempts += 1;
        let ok = SmtpClient::connect(addr).and_then(|mut c| {
            anyhow::ensure!(c.ehlo("client.e2e.test")?.code == 250, "EHLO");
            let ok = transaction(&mut c, s)?;
            let _ = c.quit();
            Ok(ok)
        });
        if matches!(ok, Ok(true)) {
            s.acked = true;
            return;
        }
        std::thread::sleep(pause);
    }
}

/// The `Message-ID` (without brackets) of a message, if it has one.
fn message_id_of(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let at = text.find("\nMessage-ID: <")? + "\nMessage-ID: <".len();
    let end = text[at..].find('>')?;
    Some(text[at..at + end].to_owned())
}

/// What the archive and the sink hold, by Message-ID.
struct Outcome {
    /// Arrivals per Message-ID in the archive, over every stored message carrying it.
    arrivals: BTreeMap<String, Vec<serde_json::Value>>,
    /// Message-IDs the sink received.
    delivered: BTreeSet<String>,
}

fn outcome(m: &MilterNode, pf: &Postfix) -> Outcome {
    let out = m
        .node
        .dir()
        .join(format!("export-{}", rand::random::<u32>()));
    let exported = export_all(&m.node, &out);
    let _ = std::fs::remove_dir_all(&out);
    let mut arrivals: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for e in exported.values() {
        let id = message_id_of(&e.bytes).expect("every test message has a Message-ID");
        arrivals
            .entry(id)
            .or_default()
            .extend(e.arrivals.iter().cloned());
    }
    let delivered = pf
        .sink_dumped()
        .iter()
        .filter_map(|b| message_id_of(b))
        .collect();
    Outcome {
        arrivals,
        delivered,
    }
}

/// Exactly once for every acknowledged message, at most once for the rest, nothing
/// delivered that is not archived. Returns (lost, duplicate arrivals, delivered).
fn check(m: &MilterNode, pf: &Postfix, sent: &[Sent]) -> (usize, usize, usize) {
    let o = outcome(m, pf);
    let mut lost = Vec::new();
    let mut duplicates = 0;
    for s in sent {
        let arrivals = o.arrivals.get(&s.message_id).map_or(&[][..], Vec::as_slice);
        duplicates += arrivals.len().saturating_sub(1);
        if s.acked {
            if arrivals.is_empty() {
                lost.push(s.message_id.clone());
                continue;
            }
            let a = &arrivals[0];
            assert_eq!(a["mail_from"].as_str(), Some(s.from.as_str()), "{a}");
            let got: BTreeSet<&str> = a["rcpt_to"]
                .as_array()
                .expect("rcpt_to")
                .iter()
                .filter_map(serde_json::Value::as_str)
                .collect();
            let want: BTreeSet<&str> = s.to.iter().map(String::as_str).collect();
            assert_eq!(got, want, "{}: envelope", s.message_id);
            assert!(a["queue_id"].as_str().is_some_and(|q| !q.is_empty()), "{a}");
            assert!(
                o.delivered.contains(&s.message_id),
                "{} got 250 from Postfix but never reached the sink\n{}",
                s.message_id,
                pf.log_tail()
            );
        }
    }
    let unarchived: Vec<&String> = o
        .delivered
        .iter()
        .filter(|id| !o.arrivals.contains_key(*id))
        .collect();
    assert!(
        unarchived.is_empty(),
        "delivered but not archived: {unarchived:?}"
    );
    assert!(
        lost.is_empty() && duplicates == 0,
        "{} acknowledged messages not archived ({lost:?}), {duplicates} duplicate arrivals\n{}",
        lost.len(),
        m.log_tail()
    );
    let v = m.node.coffer(&["verify", "--deep"]);
    assert_eq!(v.code, Some(0), "coffer verify --deep:\n{v}");
    (lost.len(), duplicates, o.delivered.len())
}

#[test]
fn milter_and_cofferd_kill9_under_postfix() {
    if !tools_present() {
        return;
    }
    let iterations = crash_iterations(3);
    let seed = e2e_seed();
    eprintln!("crash-matrix milter: seed {seed} (COFFER_E2E_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = MilterNode::start("timeout = \"20s\"");
    let pf = Postfix::start(&m.milter_socket);
    let addr = SocketAddr::from(([127, 0, 0, 1], pf.smtpd_port));

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|t| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let s = seed.wrapping_add(t as u64 + 1);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(s);
                let end = Instant::now() + crash_time_cap(iterations);
                let mut out = Vec::new();
                for n in 0..crash_per_thread(iterations) {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= end {
                        break;
                    }
                    let size = rng.gen_range(200..8000);
                    let mut msg = message("cm", t, n, size, &mut rng);
                    deliver(addr, &mut msg, end, Duration::from_millis(200));
                    if msg.acked {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    out.push(msg);
                }
                out
            })
        })
        .collect();
    let wait_for = |more: usize| {
        let target = acked.load(Ordering::Relaxed) + more;
        let _ = wait_until("more mail through Postfix", Duration::from_secs(90), || {
            (acked.load(Ordering::Relaxed) >= target).then_some(())
        });
    };
    let mut kills = (0, 0);
    for i in 0..iterations {
        wait_for(rng.gen_range(5..40));
        if i % 2 == 0 {
            m.kill9_milter();
            kills.0 += 1;
            m.start_milter();
        } else {
            m.node.kill9();
            kills.1 += 1;
            m.node.restart();
        }
    }
    let after = acked.load(Ordering::Relaxed);
    let _ = wait_until(
        "mail after the last restart",
        Duration::from_secs(60),
        || {
            (acked.load(Ordering::Relaxed) >= after + 20 || clients.iter().all(|h| h.is_finished()))
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<Sent> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    pf.flush_until_empty(Duration::from_secs(120));
    let n_acked = sent.iter().filter(|s| s.acked).count();
    let retried = sent.iter().filter(|s| s.attempts > 1).count();
    assert!(n_acked > 20, "too few acknowledged\n{}", m.log_tail());
    let (lost, dups, delivered) = check(&m, &pf, &sent);
    eprintln!(
        "crash-matrix milter: {iterations} iterations, {} kills of coffer-milter, {} of \
         cofferd, {} messages sent through Postfix, {n_acked} acknowledged, {retried} \
         retried after a 4xx, {delivered} delivered to the sink, lost = {lost}, duplicate \
         arrivals = {dups}, delivered unarchived = 0, verify --deep clean",
        kills.0,
        kills.1,
        sent.len()
    );
}

/// `coffer_refusals_total{listener="milter",reason=REASON}` from the console.
fn refusals(console: SocketAddr, reason: &str) -> u64 {
    let (code, text) = http_get(console, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{text}");
    let series = format!("coffer_refusals_total{{listener=\"milter\",reason=\"{reason}\"}}");
    metric(&text, &series).map_or(0, |v| v as u64)
}

#[test]
fn store_disk_full_through_postfix_tempfails_then_archives_once() {
    if !tools_present() {
        return;
    }
    let mut m = MilterNode::start("timeout = \"20s\"");
    // Put the store on a small tmpfs: stop cofferd, mount over its (still empty) data
    // dir, give it a console, start it again on the new, empty filesystem.
    m.node.terminate();
    let console = free_addr();
    let tmpfs = Tmpfs::mount(&m.node.data_dir, "8m");
    let config = std::fs::read_to_string(&m.node.config_path).expect("read config");
    let fallback = tmpfs.as_ref().err().cloned();
    let config = match &fallback {
        // ENOSPC for real: no free-space guard in the way.
        None => config.replace("min_free_disk = \"16MiB\"", "min_free_disk = \"0\""),
        // No tmpfs: the free-space guard plays the full disk (set above the free space
        // later, once the store exists).
        Some(_) => config,
    };
    std::fs::write(
        &m.node.config_path,
        format!("{config}\n[console]\nbind = \"{console}\"\n"),
    )
    .expect("write config");
    m.node.restart();
    let pf = Postfix::start(&m.milter_socket);
    let addr = SocketAddr::from(([127, 0, 0, 1], pf.smtpd_port));
    let mut rng = rand::rngs::StdRng::seed_from_u64(e2e_seed());

    let filler = m.node.data_dir.join("filler");
    match &fallback {
        None => {
            // Leave about 2 MiB of the 8 for the store and the mail.
            let free = || {
                let st = nix::sys::statvfs::statvfs(&m.node.data_dir).expect("statvfs");
                #[allow(clippy::unnecessary_cast)]
                let f = st.blocks_available() as u64 * st.fragment_size() as u64;
                f
            };
            let fill = free().saturating_sub(2 << 20);
            std::fs::write(&filler, vec![0x5a; fill as usize]).expect("filler");
        }
        Some(why) => {
            eprintln!(
                "FALLBACK: cannot mount a tmpfs ({why}); min_free_disk above the free space \
                 plays the full disk"
            );
            let config = std::fs::read_to_string(&m.node.config_path).unwrap();
            std::fs::write(
                &m.node.config_path,
                config.replace("min_free_disk = \"16MiB\"", "min_free_disk = \"100TiB\""),
            )
            .unwrap();
            m.node.kill9();
            m.node.restart();
        }
    }

    // Fill: messages of 64-256 KiB through Postfix until one is refused.
    let end = Instant::now() + Duration::from_secs(180);
    let mut sent = Vec::new();
    let mut refused = None;
    for n in 0..200 {
        let size = rng.gen_range(64 << 10..256 << 10);
        let mut s = message("df", 0, n, size, &mut rng);
        let mut c = SmtpClient::connect(addr).expect("connect to Postfix");
        assert_eq!(c.ehlo("client.e2e.test").unwrap().code, 250);
        s.attempts = 1;
        s.acked = transaction(&mut c, &s).expect("250 or 4xx from Postfix");
        let _ = c.quit();
        let acked = s.acked;
        sent.push(s);
        if !acked {
            refused = Some(sent.len() - 1);
            break;
        }
        assert!(Instant::now() < end, "the disk never filled");
    }
    let refused = refused.unwrap_or_else(|| panic!("no 4xx after 200 messages\n{}", m.log_tail()));
    let before_full = sent.iter().filter(|s| s.acked).count();
    // Postfix says why it refused: the milter's tempfail, carrying cofferd's reply.
    let maillog = pf.log_tail();
    assert!(
        maillog.contains("milter-reject: END-OF-MESSAGE") && maillog.contains("archive refused"),
        "{maillog}"
    );
    let log = m.node.log_text();
    let full = log.contains("disk full")
        || log.contains("No space left on device")
        || log.contains("min_free_disk");
    assert!(
        full,
        "cofferd's log does not say the disk is full\n{}",
        m.node.log_tail()
    );
    let (disk_full, store_failed) = (
        refusals(console, "disk_full"),
        refusals(console, "store_failed"),
    );
    assert!(
        disk_full + store_failed >= 1,
        "no refusal counted: disk_full {disk_full}, store_failed {store_failed}"
    );
    // A few more tries while full: still 4xx, still nothing stored twice.
    for _ in 0..3 {
        let mut c = SmtpClient::connect(addr).unwrap();
        c.ehlo("client.e2e.test").unwrap();
        let s = &mut sent[refused];
        s.attempts += 1;
        assert!(
            !transaction(&mut c, s).unwrap(),
            "accepted while the disk is full"
        );
        let _ = c.quit();
    }

    // Space returns: the refused message, retried by its client, goes through once.
    match &fallback {
        None => std::fs::remove_file(&filler).expect("remove filler"),
        Some(_) => {
            let config = std::fs::read_to_string(&m.node.config_path).unwrap();
            std::fs::write(
                &m.node.config_path,
                config.replace("min_free_disk = \"100TiB\"", "min_free_disk = \"0\""),
            )
            .unwrap();
            m.node.kill9();
            m.node.restart();
        }
    }
    let s = &mut sent[refused];
    deliver(
        addr,
        s,
        Instant::now() + Duration::from_secs(60),
        Duration::from_millis(500),
    );
    assert!(
        s.acked,
        "not accepted after space returned\n{}",
        m.log_tail()
    );
    let mut after = message("df", 1, 0, 4096, &mut rng);
    // An address literal (RFC 5321 4.1.3): Postfix accepts it, so cofferd must too, or
    // the milter would tempfail this message for good.
    after.to.push("literal@[192.0.2.1]".into());
    deliver(
        addr,
        &mut after,
        Instant::now() + Duration::from_secs(60),
        Duration::from_millis(500),
    );
    assert!(
        after.acked,
        "a message with an address-literal recipient did not get through\n{}\n{}",
        m.log_tail(),
        pf.log_tail()
    );
    sent.push(after);
    pf.flush_until_empty(Duration::from_secs(120));
    let (lost, dups, delivered) = check(&m, &pf, &sent);
    eprintln!(
        "io-errors milter: {} store full after {before_full} messages ({}); client got 4xx \
         {} times; refusals disk_full {disk_full}, store_failed {store_failed}; after space \
         returned: {} acknowledged in all, {delivered} delivered, lost = {lost}, duplicate \
         arrivals = {dups}",
        if fallback.is_none() {
            "tmpfs (ENOSPC)"
        } else {
            "FALLBACK min_free_disk"
        },
        sent[refused].message_id,
        sent[refused].attempts - 1,
        sent.iter().filter(|s| s.acked).count()
    );
    drop(pf);
    drop(m);
    drop(tmpfs);
}
