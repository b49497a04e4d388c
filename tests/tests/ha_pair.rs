//! Two nodes replicating to each other (docs/replication.md): A on 127.0.0.2 and B on
//! 127.0.0.3, each with a `journal` listener forwarded to the other and an `ha` listener
//! (trust_xcoffer, allowing only the other node) archived only. Mail sent to either ends
//! up on both, once, under the same arrival ids; after B is killed with SIGKILL while mail
//! streams into A, B catches up when it returns and A's lag drops to zero.

use std::collections::BTreeSet;
use std::time::Duration;

use coffer_e2e::{free_port, wait_until, CofferCli, Node, NodeOptions};

/// How long convergence may take (catch-up starts within `probe_interval`, 1 s here).
const CONVERGE: Duration = Duration::from_secs(120);

struct Pair {
    a: Node,
    b: Node,
}

fn ha_toml(me: &str, ip: &str, ha_port: u16, peer: &str, peer_ip: &str, peer_port: u16) -> String {
    format!(
        r#"
[[listener]]
name = "ha"
protocol = "smtp"
bind = "{ip}:{ha_port}"
allow = ["{peer_ip}/32"]
trust_xcoffer = true

[[connection]]
name = "to-{peer}"
peer = "{peer}"
target = "{peer_ip}:{peer_port}"
source = "{ip}"
sessions = 4
probe_interval = "1s"

[[route]]
from = ["journal"]
archive = true
forward = ["to-{peer}"]

[[route]]
from = ["ha"]
archive = true
forward = []
# node {me}
"#
    )
}

fn start_pair() -> Pair {
    let (ip_a, ip_b) = ("127.0.0.2", "127.0.0.3");
    let (ha_a, ha_b) = (free_port(ip_a), free_port(ip_b));
    let a = Node::start_with(NodeOptions {
        name: "a".into(),
        ip: ip_a.into(),
        extra_toml: ha_toml("a", ip_a, ha_a, "b", ip_b, ha_b),
        ..NodeOptions::default()
    });
    let b = Node::start_with(NodeOptions {
        name: "b".into(),
        ip: ip_b.into(),
        extra_toml: ha_toml("b", ip_b, ha_b, "a", ip_a, ha_a),
        ..NodeOptions::default()
    });
    Pair { a, b }
}

fn message(tag: &str, i: usize) -> Vec<u8> {
    format!(
        "From: sender{i}@example.org\r\nTo: rcpt@example.net\r\nSubject: {tag} {i}\r\n\
         Message-ID: <{tag}-{i}@example.org>\r\n\r\nBody of {tag} {i}.\r\n"
    )
    .into_bytes()
}

/// Every arrival id on a node, and the number of arrival entries (to catch duplicates).
fn arrival_ids(node: &Node) -> (BTreeSet<String>, usize) {
    let mut ids = BTreeSet::new();
    let mut n = 0;
    for rec in node.search(&[]) {
        for a in rec["arrivals"].as_array().expect("arrivals") {
            ids.insert(a["id"].as_str().expect("arrival id").to_owned());
            n += 1;
        }
    }
    (ids, n)
}

fn connection(node: &Node) -> serde_json::Value {
    let status = node.status();
    status["connections"][0].clone()
}

/// Waits until both nodes hold the same arrival set of `want` arrivals.
fn converge(p: &Pair, want: usize) -> BTreeSet<String> {
    let result = wait_until("both nodes to hold the same arrivals", CONVERGE, || {
        let (a, na) = arrival_ids(&p.a);
        let (b, nb) = arrival_ids(&p.b);
        (a.len() == want && a == b && na == want && nb == want).then_some(a)
    });
    result.unwrap_or_else(|e| {
        let (a, _) = arrival_ids(&p.a);
        let (b, _) = arrival_ids(&p.b);
        panic!(
            "{e}: A has {}, B has {} (want {want})\nA: {}\nB: {}\n{}\n{}",
            a.len(),
            b.len(),
            connection(&p.a),
            connection(&p.b),
            p.a.log_tail(),
            p.b.log_tail()
        )
    })
}

fn lag_zero(node: &Node) {
    let r = wait_until("the lag to drop to zero", CONVERGE, || {
        let c = connection(node);
        (c["lag_arrivals"] == 0 && c["state"] == "up").then_some(c)
    });
    if let Err(e) = r {
        panic!("{e}: {}\n{}", connection(node), node.log_tail());
    }
}

#[test]
fn mail_to_either_node_ends_up_on_both_once_and_survives_an_outage() {
    let mut p = start_pair();

    // Both directions.
    for i in 0..10 {
        p.a.send("s@example.org", &["r@example.net"], &message("to-a", i));
        p.b.send("s@example.org", &["r@example.net"], &message("to-b", i));
    }
    // The same bytes and envelope on both nodes are two first arrivals (two clients).
    let same = message("both", 0);
    let on_a = p.a.send("s@example.org", &["r@example.net"], &same);
    let on_b = p.b.send("s@example.org", &["r@example.net"], &same);
    assert_ne!(on_a.arrival_id, on_b.arrival_id);
    let ids = converge(&p, 22);
    assert!(ids.iter().any(|id| id.starts_with("a/")) && ids.iter().any(|id| id.starts_with("b/")));
    // A replicated copy keeps the origin's facts and records where it came in.
    let arrivals = p.b.arrivals(&on_a.message_id);
    let copy = arrivals
        .iter()
        .find(|x| x["id"] == on_a.arrival_id.as_str())
        .expect("A's arrival is on B");
    assert_eq!(copy["listener"], "journal");
    assert_eq!(copy["via"], "ha");
    assert_eq!(copy["trace"], serde_json::json!(["a", "b"]));
    lag_zero(&p.a);
    lag_zero(&p.b);
    let status = p.a.status();
    assert_eq!(status["connections"][0]["name"], "to-b");
    assert_eq!(status["connections"][0]["peer"], "b");
    assert_eq!(status["connections"][0]["parked"], 0);

    // Outage: B is killed while mail streams into A, then comes back.
    let total = 500;
    let sender = {
        let addr = p.a.addr;
        std::thread::spawn(move || {
            let mut c = coffer_e2e::SmtpClient::connect(addr).expect("connect to A");
            c.ehlo("e2e.test").expect("EHLO");
            for i in 0..total {
                c.send("s@example.org", &["r@example.net"], &message("outage", i))
                    .unwrap_or_else(|e| panic!("message {i}: {e:#}"));
            }
            let _ = c.quit();
        })
    };
    // Kill B once A has taken some of the stream.
    let _ = wait_until("A to take 50 messages of the stream", CONVERGE, || {
        (p.a.status()["arrivals"].as_u64().unwrap_or(0) >= 72).then_some(())
    });
    p.b.kill9();
    let _ = wait_until("A to take 300 messages of the stream", CONVERGE, || {
        (p.a.status()["arrivals"].as_u64().unwrap_or(0) >= 322).then_some(())
    });
    let down = connection(&p.a);
    assert!(
        down["lag_arrivals"].as_u64().unwrap_or(0) > 0,
        "A knows B is behind: {down}"
    );
    p.b.restart();
    sender.join().expect("sender thread");
    converge(&p, 22 + total);
    lag_zero(&p.a);
    lag_zero(&p.b);
    let (sa, sb) = (p.a.status(), p.b.status());
    assert_eq!(sa["messages"], sb["messages"]);
    assert_eq!(sa["arrivals"], sb["arrivals"]);
}
