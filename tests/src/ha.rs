//! Helpers for the replication scenarios (`tests/tests/ha_*.rs`): the TOML of one node of
//! a replicating pair, and arrival sets as `coffer search --json` shows them.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::{free_port, wait_until, CofferCli, Node, NodeOptions};

/// How long convergence may take (catch-up starts within `probe_interval`, 1 s here).
pub const CONVERGE: Duration = Duration::from_secs(120);

/// The extra TOML of node `me` of a pair: an `ha` listener on `ip:ha_port` that allows
/// only the peer and trusts XCOFFER, a connection `to-PEER` from `ip`, and the pair's
/// routes: journal → the peer, ha → nothing.
pub fn pair_toml(
    me: &str,
    ip: &str,
    ha_port: u16,
    peer: &str,
    peer_ip: &str,
    peer_port: u16,
) -> String {
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

/// Two nodes, `a` on 127.0.0.2 and `b` on 127.0.0.3, replicating to each other.
/// `journal_extra(ip)` is added to each node's `journal` listener.
pub fn start_pair(journal_extra: impl Fn(&str) -> String) -> (Node, Node) {
    let (ip_a, ip_b) = ("127.0.0.2", "127.0.0.3");
    let (ha_a, ha_b) = (free_port(ip_a), free_port(ip_b));
    let a = Node::start_with(NodeOptions {
        name: "a".into(),
        ip: ip_a.into(),
        journal_extra: journal_extra(ip_a),
        extra_toml: pair_toml("a", ip_a, ha_a, "b", ip_b, ha_b),
    });
    let b = Node::start_with(NodeOptions {
        name: "b".into(),
        ip: ip_b.into(),
        journal_extra: journal_extra(ip_b),
        extra_toml: pair_toml("b", ip_b, ha_b, "a", ip_a, ha_a),
    });
    (a, b)
}

/// Every arrival id on a node, and the number of arrival entries (to catch duplicates).
pub fn arrival_ids(node: &Node) -> (BTreeSet<String>, usize) {
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

/// Waits until every node holds the same arrival set, each arrival once, and `done`
/// accepts it; returns it.
///
/// # Panics
/// Not within [`CONVERGE`] (counts, connection states and logs are printed).
pub fn converge(
    nodes: &[&Node],
    mut done: impl FnMut(&BTreeSet<String>) -> bool,
) -> BTreeSet<String> {
    let r = wait_until("every node to hold the same arrivals", CONVERGE, || {
        let sets: Vec<_> = nodes.iter().map(|n| arrival_ids(n)).collect();
        let same = sets
            .iter()
            .all(|(ids, n)| ids.len() == *n && *ids == sets[0].0);
        (same && done(&sets[0].0)).then(|| sets[0].0.clone())
    });
    r.unwrap_or_else(|e| {
        let mut report = String::new();
        for n in nodes {
            let (ids, entries) = arrival_ids(n);
            report.push_str(&format!(
                "\n{} ids, {entries} entries; connections {}\n{}",
                ids.len(),
                n.status()["connections"],
                n.log_tail()
            ));
        }
        panic!("{e}{report}")
    })
}

/// Waits until `node`'s only connection is up with nothing left to send
/// (`lag_arrivals` 0 in `coffer status --json`): its cursor has caught up.
///
/// # Panics
/// Not within [`CONVERGE`] (the connection's status and the log are printed).
pub fn lag_zero(node: &Node) {
    let connection = || node.status()["connections"][0].clone();
    let r = wait_until("the replication lag to drop to zero", CONVERGE, || {
        let c = connection();
        (c["lag_arrivals"] == 0 && c["state"] == "up").then_some(())
    });
    if let Err(e) = r {
        panic!("{e}: {}\n{}", connection(), node.log_tail());
    }
}
