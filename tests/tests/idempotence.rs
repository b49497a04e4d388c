//! Identities (interfaces.md "Identities", design.md §2.2): the same bytes with the same
//! envelope on the same listener again is a *repeat* (a client retrying after a lost
//! 250), not a new arrival; a new envelope is a new arrival of the same message; nothing
//! is ever deduplicated by Message-ID.

use coffer_e2e::CofferCli;
use coffer_e2e::{sha256_hex, Node};
use serde_json::Value;

fn msg(message_id: Option<&str>, body: &str) -> Vec<u8> {
    let mut m = String::from(
        "From: sender@example.org\r\nTo: rcpt@example.net\r\nSubject: idempotence\r\n",
    );
    if let Some(id) = message_id {
        m.push_str(&format!("Message-ID: {id}\r\n"));
    }
    m.push_str("\r\n");
    m.push_str(body);
    m.push_str("\r\n");
    m.into_bytes()
}

fn count(status: &Value, key: &str) -> u64 {
    status[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no numeric {key:?}: {status}"))
}

fn rcpts(arrival: &Value) -> Vec<String> {
    let mut v: Vec<String> = arrival["rcpt_to"]
        .as_array()
        .unwrap_or_else(|| panic!("arrival without rcpt_to: {arrival}"))
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn same_bytes_same_envelope_is_a_repeat() {
    let node = Node::start();
    let m = msg(Some("<retry@example.org>"), "sent twice");
    let first = node.send(
        "sender@example.org",
        &["a@example.net", "b@example.net"],
        &m,
    );
    let again = node.send(
        "sender@example.org",
        &["a@example.net", "b@example.net"],
        &m,
    );
    // The set of recipients is what counts, not their order or duplicates.
    let reordered = node.send(
        "sender@example.org",
        &["b@example.net", "a@example.net", "b@example.net"],
        &m,
    );

    assert_eq!(first.message_id, sha256_hex(&m));
    for r in [&again, &reordered] {
        assert_eq!(r.message_id, first.message_id, "{}", r.reply);
        assert_eq!(
            r.arrival_id, first.arrival_id,
            "a repeat names the arrival it repeats: {}",
            r.reply
        );
    }
    let status = node.status();
    assert_eq!(count(&status, "messages"), 1, "{status}");
    assert_eq!(count(&status, "arrivals"), 1, "{status}");
    assert_eq!(count(&status, "repeats"), 2, "{status}");
    let arrivals = node.arrivals(&first.message_id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    assert_eq!(rcpts(&arrivals[0]), ["a@example.net", "b@example.net"]);
}

#[test]
fn same_bytes_new_envelope_is_a_new_arrival() {
    let node = Node::start();
    let m = msg(
        Some("<journal@example.org>"),
        "one message, three envelopes",
    );
    let a = node.send("sender@example.org", &["a@example.net"], &m);
    let b = node.send("sender@example.org", &["b@example.net"], &m);
    let c = node.send("other@example.org", &["a@example.net"], &m);

    assert!(a.message_id == b.message_id && b.message_id == c.message_id);
    assert_ne!(a.arrival_id, b.arrival_id);
    assert_ne!(a.arrival_id, c.arrival_id);
    assert_ne!(b.arrival_id, c.arrival_id);

    let status = node.status();
    assert_eq!(count(&status, "messages"), 1, "{status}");
    assert_eq!(count(&status, "arrivals"), 3, "{status}");
    assert_eq!(count(&status, "repeats"), 0, "{status}");

    let arrivals = node.arrivals(&a.message_id);
    assert_eq!(arrivals.len(), 3, "{arrivals:?}");
    let mut seen: Vec<(String, Vec<String>)> = arrivals
        .iter()
        .map(|x| (x["mail_from"].as_str().unwrap().to_owned(), rcpts(x)))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "other@example.org".to_owned(),
                vec!["a@example.net".to_owned()]
            ),
            (
                "sender@example.org".to_owned(),
                vec!["a@example.net".to_owned()]
            ),
            (
                "sender@example.org".to_owned(),
                vec!["b@example.net".to_owned()]
            ),
        ]
    );
    // The bytes are stored once.
    assert_eq!(node.get(&a.message_id), m);
    // Search shows every arrival of the message, and --to covers each envelope.
    let found = node.search(&["--to", "b@example.net"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0]["arrivals"].as_array().map(Vec::len),
        Some(3),
        "{}",
        found[0]
    );
}

#[test]
fn same_message_id_different_bytes_are_both_kept() {
    let node = Node::start();
    let m1 = msg(Some("<same@example.org>"), "first text");
    let m2 = msg(Some("<same@example.org>"), "second text, same Message-ID");
    let a = node.send("sender@example.org", &["a@example.net"], &m1);
    let b = node.send("sender@example.org", &["a@example.net"], &m2);
    assert_ne!(a.message_id, b.message_id);
    assert_eq!(node.get(&a.message_id), m1);
    assert_eq!(node.get(&b.message_id), m2);
    let status = node.status();
    assert_eq!(count(&status, "messages"), 2, "{status}");
    assert_eq!(count(&status, "arrivals"), 2, "{status}");
    let found = node.search(&["--message-id", "<same@example.org>"]);
    assert_eq!(found.len(), 2, "{found:?}");
}

#[test]
fn messages_without_message_id_are_all_kept() {
    let node = Node::start();
    let bodies = ["one", "two", "three", "four"];
    let mut ids = Vec::new();
    for body in bodies {
        let m = msg(None, body);
        let acc = node.send("sender@example.org", &["a@example.net"], &m);
        assert_eq!(node.get(&acc.message_id), m);
        ids.push(acc.message_id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), bodies.len());
    let status = node.status();
    assert_eq!(count(&status, "messages"), bodies.len() as u64, "{status}");
    assert_eq!(count(&status, "arrivals"), bodies.len() as u64, "{status}");
}
