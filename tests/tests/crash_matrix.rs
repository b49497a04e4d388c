//! The crash matrix (docs/reliability.md "Crash matrix"): `cofferd` SIGKILLed at random
//! moments while mail flows, then restarted on the same store, in the places where mail
//! enters it other than plain SMTP (`kill9.rs` covers that one):
//!
//! - **LMTP**: the milter's trusted LMTP socket, transactions exactly as coffer-milter
//!   sends them (`MAIL FROM:<…> XCOFFER=<…>`, several `RCPT TO`, the content in two
//!   `BDAT` chunks, one reply per recipient). Every message that got its 250s is there
//!   byte for byte with exactly one arrival (a resend after a kill is a repeat), the
//!   queue id XCOFFER carried is the arrival's, and `coffer verify --deep` is clean.
//! - **Replication**: a pair replicating to each other while mail flows into A; B (the
//!   receiver) is killed, then A (the sender). Afterwards both hold exactly the same
//!   arrival set, each acknowledged message once, both cursors caught up (`lag_arrivals`
//!   0 in `coffer status --json`), `verify --deep` clean on both.
//!
//! Each scenario kills `COFFER_CRASH_ITERATIONS` times (default 3; CI runs the
//! default) and prints one `crash-matrix:` summary line. `COFFER_E2E_SEED` replays the
//! same messages and kill points. The milter-under-Postfix column is in
//! `crash_milter_postfix.rs`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer_e2e::ha::{converge, lag_zero, start_pair};
use coffer_e2e::milter::LMTP_TOML;
use coffer_e2e::wire::Wire;
use coffer_e2e::{
    archived_form, crash_iterations, crash_per_thread, crash_time_cap, e2e_seed, export_all,
    sha256_hex, wait_until, Accepted, CofferCli, Node, NodeOptions, SmtpClient,
};
use coffer_proto::xcoffer::{encode, Xcoffer};
use rand::{Rng, SeedableRng};

const ATTEMPTS_PER_MESSAGE: usize = 20;
const RECONNECT_DEADLINE: Duration = Duration::from_secs(60);

/// One message a client tried to hand over.
struct Sent {
    bytes: Vec<u8>,
    from: String,
    to: Vec<String>,
    queue_id: String,
    /// The acceptance, when every recipient got a 250.
    acked: Option<Accepted>,
    attempts: usize,
}

fn message(tag: &str, thread: usize, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut m = format!(
        "From: t{thread}@example.org\r\nTo: archive@example.net\r\nSubject: {tag} {thread}/{n}\r\n\
         Message-ID: <{tag}.{thread}.{n}@example.org>\r\n\r\n"
    )
    .into_bytes();
    for i in 0..rng.gen_range(1..120) {
        if i % 13 == 2 {
            m.push(b'.');
        }
        let len = rng.gen_range(0..100);
        m.extend((0..len).map(|_| rng.gen_range(b' '..=b'~')));
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// Shared between the client threads and the killer.
struct Flow {
    stop: AtomicBool,
    acked: AtomicUsize,
    /// Kills planned: bounds the clients.
    iterations: usize,
}

impl Flow {
    fn new(iterations: usize) -> Arc<Flow> {
        Arc::new(Flow {
            stop: AtomicBool::new(false),
            acked: AtomicUsize::new(0),
            iterations,
        })
    }
}

/// One LMTP transaction as coffer-milter sends it. All recipients' replies must be 250
/// and name the same message.
fn lmtp_transaction(c: &mut Wire, s: &Sent) -> anyhow::Result<Accepted> {
    let x = Xcoffer {
        queue_id: Some(s.queue_id.clone()),
        client_addr: Some("192.0.2.7".into()),
        helo: Some("mx.example.org".into()),
        ..Xcoffer::default()
    };
    c.expect(
        &format!("MAIL FROM:<{}> XCOFFER={}", s.from, encode(&x)),
        250,
    )?;
    for r in &s.to {
        c.expect(&format!("RCPT TO:<{r}>"), 250)?;
    }
    let cut = s.bytes.len() / 2;
    let r = c.bdat(&s.bytes[..cut], false)?;
    anyhow::ensure!(r.code == 250, "BDAT chunk: {r}");
    let mut replies = vec![c.bdat(&s.bytes[cut..], true)?];
    for _ in 1..s.to.len() {
        replies.push(c.read_reply()?);
    }
    let mut acc = None::<Accepted>;
    for r in replies {
        let a = Accepted::parse(r)?;
        if let Some(prev) = &acc {
            anyhow::ensure!(prev.message_id == a.message_id, "recipients disagree");
        }
        acc = Some(a);
    }
    Ok(acc.expect("at least one recipient"))
}

/// One client thread: sends the messages `make` builds, each up to
/// `ATTEMPTS_PER_MESSAGE` times within the time cap. A failure (killed mid-transaction, or
/// refused while the daemon recovers) drops the session, and the same transaction goes
/// again on a new one, as coffer-milter and MTAs do.
fn run_client<C>(
    flow: &Flow,
    what: &str,
    mut make: impl FnMut(usize) -> Sent,
    connect: impl Fn() -> Option<C>,
    mut transact: impl FnMut(&mut C, &Sent) -> anyhow::Result<Accepted>,
    quit: impl FnOnce(C),
) -> Vec<Sent> {
    let end = Instant::now() + crash_time_cap(flow.iterations);
    let mut out = Vec::new();
    let mut session: Option<C> = None;
    for n in 0..crash_per_thread(flow.iterations) {
        if flow.stop.load(Ordering::Relaxed) || Instant::now() >= end {
            break;
        }
        let mut s = make(n);
        for _ in 0..ATTEMPTS_PER_MESSAGE {
            if Instant::now() >= end {
                break;
            }
            if session.is_none() {
                session = wait_until(what, RECONNECT_DEADLINE, &connect).ok();
            }
            let Some(c) = session.as_mut() else { continue };
            s.attempts += 1;
            match transact(c, &s) {
                Ok(acc) => {
                    s.acked = Some(acc);
                    break;
                }
                Err(_) => session = None,
            }
        }
        if s.acked.is_some() {
            flow.acked.fetch_add(1, Ordering::Relaxed);
        }
        out.push(s);
    }
    if let Some(c) = session {
        quit(c);
    }
    out
}

fn lmtp_client(thread: usize, sock: &Path, seed: u64, flow: &Flow) -> Vec<Sent> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let make = |n| {
        let rcpts = rng.gen_range(2..=4);
        Sent {
            bytes: message("lmtp", thread, n, &mut rng),
            from: format!("t{thread}@example.org"),
            to: (0..rcpts)
                .map(|r| format!("r{r}.m{n}@t{thread}.example.net"))
                .collect(),
            queue_id: format!("Q{thread}X{n}"),
            acked: None,
            attempts: 0,
        }
    };
    let connect = || {
        let mut c = Wire::unix(sock).ok()?.expect_220().ok()?;
        c.expect("LHLO crash.test", 250).ok()?;
        Some(c)
    };
    run_client(
        flow,
        "the LMTP socket to accept again",
        make,
        connect,
        lmtp_transaction,
        |c| {
            let _ = c.quit();
        },
    )
}

fn smtp_client(thread: usize, addr: std::net::SocketAddr, seed: u64, flow: &Flow) -> Vec<Sent> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let make = |n| Sent {
        bytes: message("repl", thread, n, &mut rng),
        from: format!("t{thread}@example.org"),
        to: vec![
            format!("m{n}@t{thread}.example.net"),
            "journal@example.net".into(),
        ],
        queue_id: String::new(),
        acked: None,
        attempts: 0,
    };
    let connect = || {
        let mut c = SmtpClient::connect(addr).ok()?;
        (c.ehlo("crash.test").ok()?.code == 250).then_some(c)
    };
    run_client(
        flow,
        "cofferd to accept again",
        make,
        connect,
        |c: &mut SmtpClient, s: &Sent| {
            let to: Vec<&str> = s.to.iter().map(String::as_str).collect();
            c.send(&s.from, &to, &s.bytes)
        },
        |c| {
            let _ = c.quit();
        },
    )
}

/// Waits for `more` further acknowledgements (or 90 s: clients done or stalled, the
/// checks afterwards decide) so that each kill lands under load.
fn wait_for_acks(flow: &Flow, more: usize) {
    let target = flow.acked.load(Ordering::Relaxed) + more;
    let _ = wait_until(
        "more acknowledged messages before the next kill",
        Duration::from_secs(90),
        || (flow.acked.load(Ordering::Relaxed) >= target).then_some(()),
    );
}

/// Lets some more mail through after the last restart, tells the clients to stop and
/// gathers what they sent, with its [`summary`]; fails when too little was acknowledged
/// for the run to mean anything (`node` is the one whose log is shown then).
fn finish(
    flow: &Flow,
    clients: Vec<std::thread::JoinHandle<Vec<Sent>>>,
    node: &Node,
) -> (Vec<Sent>, (usize, usize, usize)) {
    let after = flow.acked.load(Ordering::Relaxed);
    let _ = wait_until(
        "mail to be acknowledged after the last restart",
        Duration::from_secs(60),
        || {
            (flow.acked.load(Ordering::Relaxed) >= after + 20
                || clients.iter().all(|h| h.is_finished()))
            .then_some(())
        },
    );
    flow.stop.store(true, Ordering::Relaxed);
    let sent: Vec<Sent> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    let counts = summary(&sent);
    assert!(
        counts.1 > 20,
        "too few acknowledged to mean anything\n{}",
        node.log_tail()
    );
    (sent, counts)
}

/// What [`check_store`] counted.
struct Checked {
    stored: usize,
    lost: usize,
    duplicates: usize,
}

/// The whole store of `node` against what was sent: everything stored hashes to its id
/// and was sent by someone; every acknowledged message is there byte for byte with
/// exactly one arrival carrying its envelope (and, when `listener` is given, arriving
/// there with the queue id XCOFFER carried); `arrivals == messages` in `coffer status`;
/// `coffer verify --deep` exits 0.
fn check_store(node: &Node, sent: &[Sent], listener: Option<&str>) -> Checked {
    let out = node.dir().join(format!("export-{}", rand::random::<u32>()));
    let exported = export_all(node, &out);
    let _ = std::fs::remove_dir_all(&out);
    let all_sent: BTreeSet<String> = sent
        .iter()
        .map(|s| sha256_hex(&archived_form(&s.bytes)))
        .collect();
    for (id, e) in &exported {
        assert_eq!(
            &sha256_hex(&e.bytes),
            id,
            "{id}.eml does not hash to its id"
        );
        assert!(
            all_sent.contains(id),
            "the store holds {id}, which nobody sent"
        );
    }
    let (mut lost, mut duplicates) = (Vec::new(), 0);
    for s in sent {
        let Some(acc) = &s.acked else { continue };
        let id = &acc.message_id;
        assert_eq!(
            id,
            &sha256_hex(&archived_form(&s.bytes)),
            "250 names another id"
        );
        let Some(e) = exported.get(id) else {
            lost.push(id.clone());
            continue;
        };
        assert_eq!(e.bytes, archived_form(&s.bytes), "{id}: bytes differ");
        if e.arrivals.len() != 1 {
            duplicates += e.arrivals.len().saturating_sub(1);
            eprintln!("{id}: {} arrivals: {:?}", e.arrivals.len(), e.arrivals);
            continue;
        }
        let a = &e.arrivals[0];
        assert_eq!(a["mail_from"].as_str(), Some(s.from.as_str()), "{id}: {a}");
        let got: BTreeSet<&str> = a["rcpt_to"]
            .as_array()
            .expect("rcpt_to")
            .iter()
            .filter_map(serde_json::Value::as_str)
            .collect();
        let want: BTreeSet<&str> = s.to.iter().map(String::as_str).collect();
        assert_eq!(got, want, "{id}: envelope recipients");
        assert_eq!(
            a["id"].as_str(),
            Some(acc.arrival_id.as_str()),
            "{id}: arrival id"
        );
        if let Some(l) = listener {
            assert_eq!(a["listener"], l, "{id}: {a}");
            if !s.queue_id.is_empty() {
                assert_eq!(
                    a["queue_id"].as_str(),
                    Some(s.queue_id.as_str()),
                    "{id}: {a}"
                );
            }
        }
    }
    assert!(
        lost.is_empty() && duplicates == 0,
        "{} acknowledged messages lost ({lost:?}), {duplicates} duplicate arrivals\n{}",
        lost.len(),
        node.log_tail()
    );
    let status = node.status();
    assert_eq!(
        status["messages"].as_u64(),
        Some(exported.len() as u64),
        "{status}"
    );
    assert_eq!(status["arrivals"], status["messages"], "{status}");
    let v = node.coffer(&["verify", "--deep"]);
    assert_eq!(v.code, Some(0), "coffer verify --deep:\n{v}");
    Checked {
        stored: exported.len(),
        lost: lost.len(),
        duplicates,
    }
}

fn summary(sent: &[Sent]) -> (usize, usize, usize) {
    (
        sent.len(),
        sent.iter().filter(|s| s.acked.is_some()).count(),
        sent.iter().filter(|s| s.attempts > 1).count(),
    )
}

#[test]
fn lmtp_ingest_survives_kill9() {
    let iterations = crash_iterations(3);
    let seed = e2e_seed();
    eprintln!("crash-matrix lmtp: seed {seed} (COFFER_E2E_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut node = Node::start_with(NodeOptions {
        extra_toml: LMTP_TOML.into(),
        ..NodeOptions::default()
    });
    let sock: PathBuf = node.dir().join("lmtp.sock");
    let flow = Flow::new(iterations);
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let (flow, sock) = (flow.clone(), sock.clone());
            let s = seed.wrapping_add(t as u64 + 1);
            std::thread::spawn(move || lmtp_client(t, &sock, s, &flow))
        })
        .collect();
    for _ in 0..iterations {
        wait_for_acks(&flow, rng.gen_range(5..60));
        node.kill9();
        node.restart();
    }
    let (sent, (total, acked, resent)) = finish(&flow, clients, &node);
    let c = check_store(&node, &sent, Some("milter"));
    eprintln!(
        "crash-matrix lmtp: {iterations} iterations, {iterations} kills of cofferd, {total} \
         messages sent, {acked} acknowledged, {resent} resent, {} stored, lost = {}, \
         duplicate arrivals = {}, verify --deep clean",
        c.stored, c.lost, c.duplicates
    );
}

#[test]
fn replication_survives_kill9_of_receiver_and_sender() {
    let iterations = crash_iterations(3);
    let seed = e2e_seed();
    eprintln!("crash-matrix replication: seed {seed} (COFFER_E2E_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut a, mut b) = start_pair(|_| String::new());
    let addr = a.addr;
    let flow = Flow::new(iterations);
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let flow = flow.clone();
            let s = seed.wrapping_add(t as u64 + 1);
            std::thread::spawn(move || smtp_client(t, addr, s, &flow))
        })
        .collect();
    let mut kills = (0, 0);
    for _ in 0..iterations {
        // The receiver: A keeps taking mail and queues it while B is down.
        wait_for_acks(&flow, rng.gen_range(5..40));
        b.kill9();
        kills.1 += 1;
        wait_for_acks(&flow, rng.gen_range(1..20));
        b.restart();
        // The sender: mid-ingest and mid-replication at once.
        wait_for_acks(&flow, rng.gen_range(5..40));
        a.kill9();
        kills.0 += 1;
        a.restart();
    }
    let (sent, (total, acked, resent)) = finish(&flow, clients, &a);
    let want: BTreeSet<String> = sent
        .iter()
        .filter_map(|s| s.acked.as_ref().map(|a| a.arrival_id.clone()))
        .collect();
    let set = converge(&[&a, &b], |ids| want.is_subset(ids));
    lag_zero(&a);
    lag_zero(&b);
    let ca = check_store(&a, &sent, Some("journal"));
    let cb = check_store(&b, &sent, None);
    assert_eq!(ca.stored, cb.stored);
    eprintln!(
        "crash-matrix replication: {iterations} iterations, {} kills of the receiver, {} of \
         the sender, {total} messages sent, {acked} acknowledged, {resent} resent, {} \
         arrivals on both nodes, lost = {}, duplicate arrivals = {}, lag 0 both ways, \
         verify --deep clean on both",
        kills.1,
        kills.0,
        set.len(),
        ca.lost + cb.lost,
        ca.duplicates + cb.duplicates
    );
}
