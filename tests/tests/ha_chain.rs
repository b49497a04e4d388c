//! Three nodes: a chain A → B → C (B passes on what it receives), and a full mesh where
//! every node forwards both its own and its replicated arrivals to the others: the trace
//! stops the loop, so every node ends with the same arrival set, each arrival once.

use std::collections::BTreeSet;
use std::time::Duration;

use coffer_e2e::{free_port, wait_until, CofferCli, Node, NodeOptions};

const CONVERGE: Duration = Duration::from_secs(120);

/// (name, ip, ha port)
type Spec = (&'static str, &'static str, u16);

/// A node's extra TOML: an `ha` listener allowing the other nodes, a connection to each
/// of `to`, and the routes: journal → `journal_to`, ha → `ha_to`.
fn toml(me: Spec, all: &[Spec], to: &[Spec], journal_to: &[&str], ha_to: &[&str]) -> String {
    let allow: Vec<String> = all
        .iter()
        .filter(|s| s.0 != me.0)
        .map(|s| format!("\"{}/32\"", s.1))
        .collect();
    let mut t = format!(
        "\n[[listener]]\nname = \"ha\"\nprotocol = \"smtp\"\nbind = \"{}:{}\"\nallow = [{}]\n\
         trust_xcoffer = true\n",
        me.1,
        me.2,
        allow.join(", ")
    );
    for p in to {
        t.push_str(&format!(
            "\n[[connection]]\nname = \"to-{0}\"\npeer = \"{0}\"\ntarget = \"{1}:{2}\"\n\
             source = \"{3}\"\nprobe_interval = \"1s\"\n",
            p.0, p.1, p.2, me.1
        ));
    }
    let list = |v: &[&str]| {
        v.iter()
            .map(|c| format!("\"to-{c}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    t.push_str(&format!(
        "\n[[route]]\nfrom = [\"journal\"]\nforward = [{}]\n\n[[route]]\nfrom = [\"ha\"]\n\
         forward = [{}]\n",
        list(journal_to),
        list(ha_to)
    ));
    t
}

fn specs() -> [Spec; 3] {
    [
        ("a", "127.0.0.2", free_port("127.0.0.2")),
        ("b", "127.0.0.3", free_port("127.0.0.3")),
        ("c", "127.0.0.4", free_port("127.0.0.4")),
    ]
}

fn start(spec: Spec, extra: String) -> Node {
    Node::start_with(NodeOptions {
        name: spec.0.into(),
        ip: spec.1.into(),
        extra_toml: extra,
        ..NodeOptions::default()
    })
}

fn arrival_ids(node: &Node) -> (BTreeSet<String>, usize) {
    let mut ids = BTreeSet::new();
    let mut n = 0;
    for rec in node.search(&[]) {
        for a in rec["arrivals"].as_array().expect("arrivals") {
            ids.insert(a["id"].as_str().expect("id").to_owned());
            n += 1;
        }
    }
    (ids, n)
}

fn converge(nodes: &[&Node], want: usize) {
    let r = wait_until("every node to hold the same arrivals", CONVERGE, || {
        let sets: Vec<_> = nodes.iter().map(|n| arrival_ids(n)).collect();
        sets.iter()
            .all(|(ids, n)| ids.len() == want && *n == want && *ids == sets[0].0)
            .then_some(())
    });
    if let Err(e) = r {
        let counts: Vec<usize> = nodes.iter().map(|n| arrival_ids(n).0.len()).collect();
        let logs: Vec<String> = nodes.iter().map(|n| n.log_tail()).collect();
        panic!("{e}: counts {counts:?} (want {want})\n{}", logs.join("\n"));
    }
}

fn message(tag: &str, i: usize) -> Vec<u8> {
    format!("Subject: {tag} {i}\r\nMessage-ID: <{tag}{i}@example.org>\r\n\r\n{tag} {i}\r\n")
        .into_bytes()
}

#[test]
fn a_chain_passes_arrivals_on() {
    let [a, b, c] = specs();
    let all = [a, b, c];
    let na = start(a, toml(a, &all, &[b], &["b"], &[]));
    let nb = start(b, toml(b, &all, &[c], &["c"], &["c"]));
    let nc = start(c, toml(c, &all, &[], &[], &[]));
    for i in 0..5 {
        na.send("s@example.org", &["r@example.net"], &message("chain", i));
    }
    converge(&[&na, &nb, &nc], 5);
    // On C an arrival from A has made one hop before B sent it, and all three hold it.
    let rec = &nc.search(&[])[0];
    let arr = &rec["arrivals"][0];
    assert_eq!(arr["trace"], serde_json::json!(["a", "b", "c"]), "{arr}");
    assert_eq!(arr["xcoffer"]["hops"], 1, "{arr}");
    // Queue and resync go through the daemon.
    let q = nb.coffer_ok(&["queue", "--json"]).json();
    assert_eq!(q["connections"][0]["name"], "to-c");
    assert_eq!(q["connections"][0]["mode"], "xcoffer");
    assert_eq!(nb.coffer(&["resync", "nope"]).code, Some(1));
    nb.coffer_ok(&["resync", "to-c"]);
    assert_eq!(nb.coffer(&["queue", "retry", "b/00000000/1"]).code, Some(1));
    // A resync sends everything again: C counts repeats, not arrivals.
    let r = wait_until("C to see the resent arrivals as repeats", CONVERGE, || {
        (nc.status()["repeats"].as_u64().unwrap_or(0) >= 5).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", nb.log_tail()));
    converge(&[&na, &nb, &nc], 5);
}

#[test]
fn a_mesh_does_not_loop() {
    let [a, b, c] = specs();
    let all = [a, b, c];
    let mesh = |me: Spec| {
        let others: Vec<Spec> = all.iter().copied().filter(|s| s.0 != me.0).collect();
        let names: Vec<&str> = others.iter().map(|s| s.0).collect();
        toml(me, &all, &others, &names, &names)
    };
    let mut nodes = vec![start(a, mesh(a)), start(b, mesh(b)), start(c, mesh(c))];
    for (k, n) in nodes.iter().enumerate() {
        for i in 0..4 {
            n.send(
                "s@example.org",
                &["r@example.net"],
                &message(&format!("m{k}-"), i),
            );
        }
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, 12);
    // Stopping C: A and B keep going, C catches up after it returns.
    nodes[2].kill9();
    nodes[0].send("s@example.org", &["r@example.net"], &message("late", 0));
    nodes[2].restart();
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, 13);
    // The daemon is needed for the queue: exit 3 without it.
    nodes[1].terminate();
    assert_eq!(nodes[1].coffer(&["queue"]).code, Some(3));
    nodes.truncate(2);
}

#[test]
fn a_refused_arrival_is_parked_without_blocking_the_rest() {
    let [a, b, _] = specs();
    let all = [a, b];
    let na = start(a, toml(a, &all, &[b], &["b"], &[]));
    // B's ha listener refuses anything over 2 KiB with 552.
    let extra = toml(b, &all, &[], &[], &[]).replace(
        "trust_xcoffer = true\n",
        "trust_xcoffer = true\nmax_message_size = \"2KiB\"\n",
    );
    let nb = start(b, extra);
    let big = [message("big", 0), vec![b'x'; 4096], b"\r\n".to_vec()].concat();
    let refused = na.send("s@example.org", &["r@example.net"], &big);
    for i in 0..3 {
        na.send("s@example.org", &["r@example.net"], &message("small", i));
    }
    let parked = |n: &Node| n.status()["connections"][0]["parked"].as_u64();
    let r = wait_until("the big one parked, the rest shipped", CONVERGE, || {
        let c = na.status()["connections"][0].clone();
        (c["parked"] == 1 && c["lag_arrivals"] == 0 && arrival_ids(&nb).0.len() == 3).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", na.log_tail()));
    let q = na.coffer_ok(&["queue", "--json"]).json();
    let p = &q["connections"][0]["parked_arrivals"][0];
    assert_eq!(p["arrival"], refused.arrival_id.as_str(), "{q}");
    assert!(p["reason"].as_str().unwrap_or("").contains("552"), "{q}");
    // Retried, it is refused again; skipped, it is gone.
    na.coffer_ok(&["queue", "retry", &refused.arrival_id]);
    let r = wait_until("the retry to be parked again", CONVERGE, || {
        let q = na.coffer_ok(&["queue", "--json"]).json();
        let c = &q["connections"][0];
        let refusals = c["failures"]["permanent"].as_u64().unwrap_or(0);
        (c["parked"] == 1 && refusals >= 2).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", na.log_tail()));
    na.coffer_ok(&["queue", "skip", &refused.arrival_id]);
    let r = wait_until("the skip", CONVERGE, || {
        (parked(&na) == Some(0)).then_some(())
    });
    r.unwrap_or_else(|e| panic!("{e}\n{}", na.log_tail()));
    assert_eq!(arrival_ids(&nb).0.len(), 3);
}
