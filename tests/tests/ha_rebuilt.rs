//! A rebuilt node (docs/replication.md "Epochs and resync"): B of a replicating pair
//! loses its store and starts empty, with a new store epoch. A, with nothing new to
//! send, notices the new epoch on its next idle probe and resyncs everything it holds —
//! A's own arrivals and the replicas of B's old ones, whose trace already names B —
//! so B ends with A's full arrival set, each arrival once, under the original ids.

use coffer_e2e::ha::{arrival_ids, converge, start_pair, CONVERGE};
use coffer_e2e::{wait_until, CofferCli, Node};

fn message(tag: &str, i: usize) -> Vec<u8> {
    format!(
        "From: s@example.org\r\nTo: r@example.net\r\nSubject: {tag} {i}\r\n\
         Message-ID: <{tag}-{i}@example.org>\r\n\r\nBody of {tag} {i}.\r\n"
    )
    .into_bytes()
}

fn log(n: &Node) -> String {
    coffer_e2e::lossy(&std::fs::read(&n.log_path).unwrap_or_default())
}

#[test]
fn a_rebuilt_peer_is_resynced_from_the_start() {
    let (a, mut b) = start_pair(|_| String::new());
    for i in 0..8 {
        a.send("s@example.org", &["r@example.net"], &message("on-a", i));
        b.send("s@example.org", &["r@example.net"], &message("on-b", i));
    }
    let before = converge(&[&a, &b], |ids| ids.len() == 16);
    let old_epoch = b.status()["epoch"].as_str().unwrap().to_owned();
    let q = a.coffer_ok(&["queue", "--json"]).json();
    assert_eq!(
        q["connections"][0]["peer_epoch"],
        old_epoch.as_str(),
        "{q:#}"
    );

    // B loses its store and comes back empty, with a new epoch. A is idle.
    b.kill9();
    std::fs::remove_dir_all(&b.data_dir).unwrap();
    b.restart();
    let new_epoch = b.status()["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new_epoch, old_epoch);

    let after = converge(&[&a, &b], |ids| ids.len() == 16);
    assert_eq!(
        after, before,
        "B has A's full arrival set again, under the same ids"
    );
    assert_eq!(arrival_ids(&b).1, 16, "each arrival once");
    // B's own old arrivals came back from A, trace and all.
    let rec = b.search(&["--subject", "on-b 3"]);
    let arr = &rec[0]["arrivals"][0];
    assert!(
        arr["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("b/{}", &old_epoch[..8])),
        "{arr}"
    );
    assert_eq!(arr["via"], "ha", "{arr}");

    // A says what happened: the new epoch, the resync, and the end of it.
    let r = wait_until("A to log the resync and its end", CONVERGE, || {
        let text = log(&a);
        let at = text.find("epoch changed (rebuilt): resyncing from the start")?;
        text[at..].contains("caught up").then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail()));
    let q = a.coffer_ok(&["queue", "--json"]).json();
    let c = &q["connections"][0];
    assert_eq!(c["peer_epoch"], new_epoch.as_str(), "{q:#}");
    assert_eq!(c["lag_arrivals"], 0, "{q:#}");
    assert!(c["resync_until"].is_null(), "the resync is over: {q:#}");

    // Normal replication goes on both ways.
    a.send("s@example.org", &["r@example.net"], &message("later-a", 0));
    b.send("s@example.org", &["r@example.net"], &message("later-b", 0));
    converge(&[&a, &b], |ids| ids.len() == 18);
}
