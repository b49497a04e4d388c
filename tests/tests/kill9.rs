//! Durable before acknowledged (design.md §2.1), from the outside: client threads send
//! mail continuously while the test SIGKILLs `cofferd` at random moments and restarts it
//! on the same store. Every message that got a 250 must be there afterwards, byte for
//! byte, with exactly one arrival for its envelope (retries of unacknowledged sends are
//! repeats, not new arrivals); whatever else is stored must be intact; `coffer verify`
//! finds nothing.
//!
//! kill -9 leaves the page cache alone, so this cannot prove fsync discipline (the
//! store's fault-injecting file layer does that); it proves recovery, torn-tail
//! handling and idempotent retries against the real binary.
//!
//! Bounds: `THREADS` × `PER_THREAD` messages, `CLIENT_TIME_CAP` for the clients, a
//! bounded number of attempts per message, `KILLS` kills.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_e2e::CofferCli;
use coffer_e2e::{archived_form, sha256_hex, wait_until, Node, SmtpClient};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const THREADS: usize = 4;
const PER_THREAD: usize = 150;
const KILLS: usize = 3;
const CLIENT_TIME_CAP: Duration = Duration::from_secs(150);
const ATTEMPTS_PER_MESSAGE: usize = 20;
/// How long a client waits for the daemon to come back before it gives up on a message.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

struct Sent {
    bytes: Vec<u8>,
    from: String,
    to: Vec<String>,
    /// The message id from the 250, if one came.
    acked: Option<String>,
    /// Transactions started for this message (more than 1: resent after a failure).
    attempts: usize,
}

fn message(thread: usize, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut m = format!(
        "From: t{thread}@example.org\r\nTo: archive@example.net\r\nSubject: kill9 {thread}/{n}\r\n\
         Message-ID: <k9.{thread}.{n}@example.org>\r\n\r\n"
    )
    .into_bytes();
    let lines = rng.gen_range(1..200);
    for i in 0..lines {
        if i % 17 == 3 {
            m.push(b'.');
        }
        let len = rng.gen_range(0..120);
        m.extend((0..len).map(|_| rng.gen_range(b' '..=b'~')));
        m.extend_from_slice(b"\r\n");
    }
    m
}

fn client(
    thread: usize,
    addr: SocketAddr,
    seed: u64,
    stop: &AtomicBool,
    acked: &AtomicUsize,
) -> Vec<Sent> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let end = Instant::now() + CLIENT_TIME_CAP;
    let mut out = Vec::new();
    let mut session: Option<SmtpClient> = None;
    for n in 0..PER_THREAD {
        if stop.load(Ordering::Relaxed) || Instant::now() >= end {
            break;
        }
        let from = format!("t{thread}@example.org");
        let to = vec![
            format!("m{n}@t{thread}.example.net"),
            "journal@example.net".to_owned(),
        ];
        let to_refs: Vec<&str> = to.iter().map(String::as_str).collect();
        let bytes = message(thread, n, &mut rng);
        let mut result = None;
        let mut attempts = 0;
        for _ in 0..ATTEMPTS_PER_MESSAGE {
            if Instant::now() >= end {
                break;
            }
            if session.is_none() {
                // The daemon may be down: wait (bounded) until it greets again.
                session = wait_until("cofferd to accept again", RECONNECT_DEADLINE, || {
                    let mut c = SmtpClient::connect(addr).ok()?;
                    (c.ehlo("kill9.test").ok()?.code == 250).then_some(c)
                })
                .ok();
            }
            let Some(c) = session.as_mut() else { continue };
            attempts += 1;
            match c.send(&from, &to_refs, &bytes) {
                Ok(acc) => {
                    result = Some(acc.message_id);
                    break;
                }
                Err(_) => {
                    // Killed mid-transaction, or a 4xx while recovering: new session, and
                    // send the same bytes with the same envelope again.
                    session = None;
                }
            }
        }
        if result.is_some() {
            acked.fetch_add(1, Ordering::Relaxed);
        }
        out.push(Sent {
            bytes,
            from,
            to,
            acked: result,
            attempts,
        });
    }
    if let Some(c) = session {
        let _ = c.quit();
    }
    out
}

fn arrival_list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o
            .get("arrivals")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        _ => vec![],
    }
}

#[test]
fn acknowledged_mail_survives_kill9() {
    let mut node = Node::start();
    let addr = node.addr;
    let seed: u64 = std::env::var("COFFER_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!(
        "kill9: seed {seed} (set COFFER_E2E_SEED to replay the same messages and kill points)"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let s = seed.wrapping_add(t as u64 + 1);
            std::thread::spawn(move || client(t, addr, s, &stop, &acked))
        })
        .collect();

    // Kill at random points of the stream: after a random number of further 250s (the
    // other threads are mid-transaction by then), so every kill lands under load.
    let mut kills_done = 0;
    for k in 0..KILLS {
        let target = acked.load(Ordering::Relaxed) + rng.gen_range(10..120);
        let reached = wait_until(
            "more acknowledged messages before the next kill",
            Duration::from_secs(90),
            || (acked.load(Ordering::Relaxed) >= target).then_some(()),
        );
        if reached.is_err() {
            // Clients finished (or stalled): kill anyway, the checks below decide.
            eprintln!(
                "kill9: kill {k}: only {} acked, wanted {target}",
                acked.load(Ordering::Relaxed)
            );
        }
        eprintln!(
            "kill9: SIGKILL {} after {} acked",
            node.pid(),
            acked.load(Ordering::Relaxed)
        );
        node.kill9();
        kills_done += 1;
        node.restart();
    }
    // Mail must flow again after the last restart; then the clients run to their bounds.
    let after = acked.load(Ordering::Relaxed);
    let flowing = wait_until(
        "mail to be acknowledged after the last restart",
        Duration::from_secs(60),
        || {
            (acked.load(Ordering::Relaxed) >= after + 10 || clients.iter().all(|h| h.is_finished()))
                .then_some(())
        },
    );
    if flowing.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let sent: Vec<Sent> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();

    let acked_msgs: Vec<&Sent> = sent.iter().filter(|s| s.acked.is_some()).collect();
    let resent = sent.iter().filter(|s| s.attempts > 1).count();
    eprintln!(
        "kill9: {} sent, {} acknowledged, {resent} resent after a failure, {kills_done} kills",
        sent.len(),
        acked_msgs.len()
    );
    assert_eq!(kills_done, KILLS);
    assert!(
        acked_msgs.len() > 20,
        "too few messages acknowledged to mean anything\n{}",
        node.log_tail()
    );

    for s in &acked_msgs {
        assert_eq!(
            s.acked.as_deref(),
            Some(sha256_hex(&archived_form(&s.bytes)).as_str())
        );
    }

    // The whole archive at once: export every message and its arrivals.
    let export = node.dir().join("export");
    node.coffer_ok(&[
        "export",
        "--format",
        "eml",
        "--out",
        export.to_str().unwrap(),
    ]);
    let mut exported: BTreeMap<String, (Vec<u8>, Vec<Value>)> = BTreeMap::new();
    for e in std::fs::read_dir(&export).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "eml") {
            let id = p.file_stem().unwrap().to_str().unwrap().to_owned();
            let bytes = std::fs::read(&p).unwrap();
            let json: Value =
                serde_json::from_slice(&std::fs::read(p.with_extension("json")).unwrap())
                    .unwrap_or_else(|e| panic!("{id}.json: {e}"));
            exported.insert(id, (bytes, arrival_list(&json)));
        }
    }

    // Everything stored is intact, acknowledged or not (an unacknowledged message may
    // or may not have made it: both are correct).
    for (id, (bytes, _)) in &exported {
        assert_eq!(
            &sha256_hex(bytes),
            id,
            "exported {id}.eml does not hash to its id"
        );
    }
    let all_sent: BTreeSet<String> = sent
        .iter()
        .map(|s| sha256_hex(&archived_form(&s.bytes)))
        .collect();
    for id in exported.keys() {
        assert!(
            all_sent.contains(id),
            "the store holds {id}, which nobody sent"
        );
    }

    // Every acknowledged message: present, byte-exact, exactly one arrival, its envelope.
    let mut missing = Vec::new();
    for s in &acked_msgs {
        let id = s.acked.clone().unwrap();
        let Some((bytes, arrivals)) = exported.get(&id) else {
            missing.push(id);
            continue;
        };
        assert_eq!(bytes, &archived_form(&s.bytes), "{id}: bytes differ");
        assert_eq!(
            arrivals.len(),
            1,
            "{id}: expected exactly one arrival: {arrivals:?}"
        );
        assert_eq!(
            arrivals[0]["mail_from"].as_str(),
            Some(s.from.as_str()),
            "{id}"
        );
        let mut got: Vec<&str> = arrivals[0]["rcpt_to"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        got.sort_unstable();
        let mut want: Vec<&str> = s.to.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(got, want, "{id}: envelope recipients");
    }
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost: {missing:?}\n{}",
        missing.len(),
        node.log_tail()
    );

    // The same through `get`, on a sample.
    for s in acked_msgs.iter().take(10) {
        let id = s.acked.as_deref().unwrap();
        assert_eq!(node.get(id), archived_form(&s.bytes));
        assert_eq!(node.arrivals(id).len(), 1);
    }

    // Counts: one arrival per stored message (each message has its own envelope), and
    // no more than were sent.
    let status = node.status();
    let messages = status["messages"].as_u64().unwrap();
    let arrivals = status["arrivals"].as_u64().unwrap();
    assert_eq!(messages, exported.len() as u64, "{status}");
    assert_eq!(arrivals, messages, "{status}");
    assert!(
        messages >= acked_msgs.len() as u64 && messages <= sent.len() as u64,
        "{status}"
    );

    let v = node.coffer(&["verify"]);
    assert_eq!(
        v.code,
        Some(0),
        "coffer verify with the daemon running:\n{v}"
    );
    let st = node.terminate();
    assert!(
        st.success(),
        "cofferd exit after SIGTERM: {st}\n{}",
        node.log_tail()
    );
    let v = node.coffer(&["verify"]);
    assert_eq!(v.code, Some(0), "coffer verify on the stopped store:\n{v}");
}
