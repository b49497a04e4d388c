//! Two nodes replicating to each other (docs/replication.md): A on 127.0.0.2 and B on
//! 127.0.0.3, each with a `journal` listener forwarded to the other and an `ha` listener
//! (trust_xcoffer, allowing only the other node) archived only. Mail sent to either ends
//! up on both, once, under the same arrival ids; after B is killed with SIGKILL while mail
//! streams into A, B catches up when it returns and A's lag drops to zero.

use coffer_e2e::ha::{converge, lag_zero, start_pair, CONVERGE};
use coffer_e2e::{wait_until, CofferCli};

fn message(tag: &str, i: usize) -> Vec<u8> {
    format!(
        "From: sender{i}@example.org\r\nTo: rcpt@example.net\r\nSubject: {tag} {i}\r\n\
         Message-ID: <{tag}-{i}@example.org>\r\n\r\nBody of {tag} {i}.\r\n"
    )
    .into_bytes()
}

#[test]
fn mail_to_either_node_ends_up_on_both_once_and_survives_an_outage() {
    let (a, mut b) = start_pair(|_| String::new());

    // Both directions.
    for i in 0..10 {
        a.send("s@example.org", &["r@example.net"], &message("to-a", i));
        b.send("s@example.org", &["r@example.net"], &message("to-b", i));
    }
    // The same bytes and envelope on both nodes are two first arrivals (two clients).
    let same = message("both", 0);
    let on_a = a.send("s@example.org", &["r@example.net"], &same);
    let on_b = b.send("s@example.org", &["r@example.net"], &same);
    assert_ne!(on_a.arrival_id, on_b.arrival_id);
    let ids = converge(&[&a, &b], |ids| ids.len() == 22);
    assert!(ids.iter().any(|id| id.starts_with("a/")) && ids.iter().any(|id| id.starts_with("b/")));
    // A replicated copy keeps the origin's facts and records where it came in.
    let arrivals = b.arrivals(&on_a.message_id);
    let copy = arrivals
        .iter()
        .find(|x| x["id"] == on_a.arrival_id.as_str())
        .expect("A's arrival is on B");
    assert_eq!(copy["listener"], "journal");
    assert_eq!(copy["via"], "ha");
    assert_eq!(copy["trace"], serde_json::json!(["a", "b"]));
    lag_zero(&a);
    lag_zero(&b);
    let status = a.status();
    assert_eq!(status["connections"][0]["name"], "to-b");
    assert_eq!(status["connections"][0]["peer"], "b");
    assert_eq!(status["connections"][0]["parked"], 0);

    // Outage: B is killed while mail streams into A, then comes back.
    let total = 500;
    let sender = {
        let addr = a.addr;
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
        (a.status()["arrivals"].as_u64().unwrap_or(0) >= 72).then_some(())
    });
    b.kill9();
    let _ = wait_until("A to take 300 messages of the stream", CONVERGE, || {
        (a.status()["arrivals"].as_u64().unwrap_or(0) >= 322).then_some(())
    });
    let down = a.status()["connections"][0].clone();
    assert!(
        down["lag_arrivals"].as_u64().unwrap_or(0) > 0,
        "A knows B is behind: {down}"
    );
    b.restart();
    sender.join().expect("sender thread");
    converge(&[&a, &b], |ids| ids.len() == 22 + total);
    lag_zero(&a);
    lag_zero(&b);
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(sa["messages"], sb["messages"]);
    assert_eq!(sa["arrivals"], sb["arrivals"]);
}
