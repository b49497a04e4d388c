//! Ingest over SMTP, then read back with the CLI: `get` returns the archived bytes (their
//! SHA-256 is the message id), `search` finds the message by From, To (headers and
//! envelope) and Subject, and `get --envelope` shows the envelope.

use coffer_e2e::CofferCli;
use coffer_e2e::{sha256_hex, Node};
use serde_json::Value;

const ALICE_MSG: &[u8] = b"From: Alice Example <alice@example.org>\r\n\
To: Bob <bob@example.net>\r\n\
Cc: carol@example.com\r\n\
Subject: Quarterly report (e2e)\r\n\
Message-ID: <q1-report@example.org>\r\n\
Date: Sat, 01 Jun 2024 12:00:00 +0000\r\n\
\r\n\
Numbers attached.\r\n";

const DAVE_MSG: &[u8] = b"From: dave@example.com\r\n\
To: erin@example.com\r\n\
Subject: Lunch?\r\n\
Message-ID: <lunch@example.com>\r\n\
\r\n\
Noon.\r\n";

fn ids(found: &[Value]) -> Vec<String> {
    found
        .iter()
        .map(|m| {
            m["id"]
                .as_str()
                .expect("search result has an id")
                .to_owned()
        })
        .collect()
}

#[test]
fn send_get_search_envelope() {
    let node = Node::start();
    let a = node.send(
        "alice@example.org",
        &["bob@example.net", "journal@example.net"],
        ALICE_MSG,
    );
    let d = node.send("dave@example.com", &["erin@example.com"], DAVE_MSG);

    // The 250 names the message id: the SHA-256 of the bytes as archived.
    assert_eq!(a.message_id, sha256_hex(ALICE_MSG), "reply: {}", a.reply);
    assert_eq!(d.message_id, sha256_hex(DAVE_MSG), "reply: {}", d.reply);
    // Arrival ids are NODE/EPOCH/SEQ, NODE being the configured name.
    let parts: Vec<&str> = a.arrival_id.rsplitn(3, '/').collect();
    assert_eq!(parts.len(), 3, "arrival id {}", a.arrival_id);
    assert_eq!(parts[2], "e2e", "arrival id {}", a.arrival_id);
    assert_eq!(parts[1].len(), 8, "epoch part of {}", a.arrival_id);
    assert!(
        parts[0].parse::<u64>().is_ok(),
        "seq part of {}",
        a.arrival_id
    );
    assert_ne!(a.arrival_id, d.arrival_id);

    // get: exactly the bytes, by full id and by a unique prefix.
    let got = node.get(&a.message_id);
    assert_eq!(sha256_hex(&got), a.message_id);
    assert_eq!(got, ALICE_MSG);
    assert_eq!(node.get(&a.message_id[..12]), ALICE_MSG);

    // search: From (exact, any case, by domain), To/Cc, envelope recipient, Subject.
    let cases: &[(&[&str], bool)] = &[
        (&["--from", "alice@example.org"], true),
        (&["--from", "ALICE@Example.ORG"], true),
        (&["--from", "@example.org"], true),
        (&["--to", "bob@example.net"], true),
        (&["--to", "carol@example.com"], true),
        (&["--to", "journal@example.net"], true),
        (&["--subject", "quarterly REPORT"], true),
        (&["--message-id", "<q1-report@example.org>"], true),
        (
            &["--from", "alice@example.org", "--subject", "report"],
            true,
        ),
        (&["--from", "nobody@example.org"], false),
        (
            &["--from", "alice@example.org", "--subject", "lunch"],
            false,
        ),
        (&["--to", "erin@example.com"], false),
    ];
    for (args, expect) in cases {
        let found = ids(&node.search(args));
        assert_eq!(
            found.contains(&a.message_id),
            *expect,
            "search {args:?} returned {found:?}"
        );
        if *expect {
            assert!(
                !found.contains(&d.message_id),
                "search {args:?} also returned the other message"
            );
        }
    }
    let found = node.search(&["--subject", "lunch"]);
    assert_eq!(ids(&found), vec![d.message_id.clone()]);
    assert_eq!(found[0]["size"].as_u64(), Some(DAVE_MSG.len() as u64));
    assert_eq!(found[0]["subject"].as_str(), Some("Lunch?"));

    // get --envelope: one arrival with the envelope as sent.
    let arrivals = node.arrivals(&a.message_id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    let arr = &arrivals[0];
    assert_eq!(arr["id"].as_str(), Some(a.arrival_id.as_str()), "{arr}");
    assert_eq!(
        arr["mail_from"].as_str(),
        Some("alice@example.org"),
        "{arr}"
    );
    let mut rcpts: Vec<&str> = arr["rcpt_to"]
        .as_array()
        .expect("rcpt_to")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    rcpts.sort_unstable();
    assert_eq!(rcpts, ["bob@example.net", "journal@example.net"], "{arr}");
    assert_eq!(arr["listener"].as_str(), Some("journal"), "{arr}");

    let status = node.status();
    assert_eq!(status["messages"].as_u64(), Some(2), "{status}");
    assert_eq!(status["arrivals"].as_u64(), Some(2), "{status}");
    assert_eq!(status["node"].as_str(), Some("e2e"), "{status}");
}

#[test]
fn get_survives_a_restart() {
    let mut node = Node::start();
    let a = node.send("alice@example.org", &["bob@example.net"], ALICE_MSG);
    let status = node.terminate();
    assert!(
        status.success(),
        "cofferd exit after SIGTERM: {status}\n{}",
        node.log_tail()
    );
    // With the daemon stopped, the CLI opens the store itself.
    assert_eq!(node.get(&a.message_id), ALICE_MSG);
    node.restart();
    assert_eq!(node.get(&a.message_id), ALICE_MSG);
    assert_eq!(node.arrivals(&a.message_id).len(), 1);
}
