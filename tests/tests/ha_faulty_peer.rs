//! A connection to a peer that is not a Coffer node — Postfix's `smtp-sink` — in plain
//! mode (no XCOFFER), made to misbehave with smtp-sink's fault options, then healthy
//! again (docs/replication.md "Failures", docs/high-availability.md):
//!
//! 1. 5xx (`-f MAIL`): each arrival is parked with the reply as its reason; the cursor
//!    passes it, so nothing else waits behind it.
//! 2. A disconnect without a reply (`-q MAIL`): the arrival is deferred and retried.
//! 3. 4xx (`-r RCPT`): deferred again, the attempts grow (capped exponential backoff,
//!    as `coffer queue --json` lists it), nothing is parked.
//! 4. A healthy sink: the deferred backlog and new mail drain (the log says "caught
//!    up"); the parked arrivals stay parked until `coffer queue retry` ships one and
//!    `coffer queue skip` forgets the other.
//!
//! No timing is asserted: each step waits for what `coffer queue --json` and the log
//! show, with a deadline. Without smtp-sink (Debian package postfix) the test skips,
//! unless `CI` is set.

use std::time::Duration;

use coffer_e2e::sink::SmtpSink;
use coffer_e2e::{require_tool, wait_until, CofferCli, Node, NodeOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

fn message(tag: &str) -> Vec<u8> {
    format!(
        "From: s@example.org\r\nTo: r@example.net\r\nSubject: faulty {tag}\r\n\
         Message-ID: <faulty-{tag}@example.org>\r\n\r\nBody of {tag}.\r\n"
    )
    .into_bytes()
}

/// The connection as `coffer queue --json` shows it.
fn queue(a: &Node) -> Value {
    a.coffer_ok(&["queue", "--json"]).json()["connections"][0].clone()
}

fn wait_queue(a: &Node, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
    let r = wait_until(what, DEADLINE, || {
        let q = queue(a);
        cond(&q).then_some(q)
    });
    r.unwrap_or_else(|e| panic!("{e}\nqueue: {:#}\n{}", queue(a), a.log_tail()))
}

fn deferred<'a>(q: &'a Value, arrival: &str) -> Option<&'a Value> {
    q["deferred"]
        .as_array()?
        .iter()
        .find(|d| d["arrival"] == arrival)
}

fn count(q: &Value, key: &str) -> u64 {
    q["failures"][key].as_u64().unwrap_or(0)
}

fn log(a: &Node) -> String {
    coffer_e2e::lossy(&std::fs::read(&a.log_path).unwrap_or_default())
}

#[test]
fn a_faulty_plain_peer_parks_retries_and_catches_up() {
    let Some(tool) = require_tool("smtp-sink", "postfix") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // 1. The peer refuses every MAIL FROM with 500.
    let mut sink = SmtpSink::start(&tool, dir.path(), &["-f", "MAIL"]);
    let a = Node::start_with(NodeOptions {
        name: "a".into(),
        extra_toml: format!(
            r#"
[[connection]]
name = "to-sink"
peer = "sink"
target = "{}"
sessions = 2
probe_interval = "1s"

[[route]]
from = ["journal"]
forward = ["to-sink"]
"#,
            sink.addr()
        ),
        ..NodeOptions::default()
    });
    let p1 = a.send("s@example.org", &["r@example.net"], &message("p1"));
    let p2 = a.send("s@example.org", &["r@example.net"], &message("p2"));
    let q = wait_queue(&a, "both arrivals parked", |q| {
        q["parked"] == 2 && q["lag_arrivals"] == 0
    });
    assert_eq!(q["mode"], "plain", "smtp-sink offers no XCOFFER: {q:#}");
    assert_eq!(q["state"], "up", "{q:#}");
    let parked = q["parked_arrivals"].as_array().unwrap();
    for (p, acc) in parked.iter().zip([&p1, &p2]) {
        assert_eq!(p["arrival"], acc.arrival_id.as_str(), "{q:#}");
        let reason = p["reason"].as_str().unwrap();
        assert!(reason.contains("MAIL FROM: 500"), "{reason}");
    }
    let human = a.coffer_ok(&["queue"]).stdout_str();
    assert!(
        human.contains("plain mode") && human.contains(&format!("parked {}", p1.arrival_id)),
        "{human}"
    );

    // 2. The peer hangs up after MAIL without a word: deferred, not parked.
    sink.swap(&["-q", "MAIL"]);
    let d1 = a.send("s@example.org", &["r@example.net"], &message("d1"));
    let q = wait_queue(&a, "the disconnect to defer d1", |q| {
        deferred(q, &d1.arrival_id).is_some_and(|d| {
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("closed the connection"))
        })
    });
    assert_eq!(q["parked"], 2, "a disconnect parks nothing: {q:#}");

    // 3. The peer answers 450 to RCPT: retried with a growing backoff, never parked.
    sink.swap(&["-r", "RCPT"]);
    let t1 = a.send("s@example.org", &["r@example.net"], &message("t1"));
    let before = count(&q, "temporary");
    let q = wait_queue(&a, "4xx retries of d1 and t1", |q| {
        [&d1, &t1].iter().all(|acc| {
            deferred(q, &acc.arrival_id).is_some_and(|d| {
                d["attempts"].as_u64().unwrap_or(0) >= 2
                    && d["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains("RCPT TO: 450"))
            })
        })
    });
    assert!(count(&q, "temporary") >= before + 2, "{q:#}");
    assert_eq!(q["parked"], 2, "4xx parks nothing: {q:#}");
    assert_eq!(q["lag_arrivals"], 2, "d1 and t1 wait: {q:#}");
    assert!(
        log(&a).contains("arrival deferred; retrying with backoff"),
        "{}",
        a.log_tail()
    );
    let human = a.coffer_ok(&["queue"]).stdout_str();
    assert!(
        human.contains(&format!("deferred {}", t1.arrival_id)),
        "{human}"
    );

    // 4. A healthy peer: the backlog drains, new mail follows, the parked ones wait.
    let caught_up = |a: &Node| log(a).matches("caught up").count();
    let caught_before = caught_up(&a);
    sink.swap(&[]);
    let h1 = a.send("s@example.org", &["r@example.net"], &message("h1"));
    let q = wait_queue(&a, "the backlog to drain", |q| {
        q["lag_arrivals"] == 0
            && q["deferred"].as_array().is_some_and(Vec::is_empty)
            && q["shipped"].as_u64().unwrap_or(0) >= 3
    });
    assert_eq!(q["parked"], 2, "{q:#}");
    wait_until("the log to say it caught up", DEADLINE, || {
        (caught_up(&a) > caught_before).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail()));
    let subjects = |sink: &SmtpSink| -> Vec<String> {
        let mut v: Vec<String> = sink
            .dumped()
            .iter()
            .filter_map(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Subject: faulty ").map(str::to_owned))
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(subjects(&sink), ["d1", "h1", "t1"]);
    let _ = h1;

    // Parked: one retried (now shipped), one skipped (forgotten).
    a.coffer_ok(&["queue", "retry", &p1.arrival_id]);
    a.coffer_ok(&["queue", "skip", &p2.arrival_id]);
    let q = wait_queue(&a, "the retry shipped, the skip gone", |q| {
        q["parked"] == 0 && q["lag_arrivals"] == 0 && q["shipped"].as_u64().unwrap_or(0) >= 4
    });
    assert!(
        q["parked_arrivals"].as_array().is_some_and(Vec::is_empty),
        "{q:#}"
    );
    assert_eq!(subjects(&sink), ["d1", "h1", "p1", "t1"]);
    assert_eq!(a.coffer(&["queue", "retry", &p2.arrival_id]).code, Some(1));
}
