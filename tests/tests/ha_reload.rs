//! A replication connection added by SIGHUP starts at once, from the first arrival, and
//! one removed by SIGHUP stops: `[[connection]]`s and `[[route]]`s reload without a
//! restart (docs/interfaces.md "Reload").

use std::time::Duration;

use coffer_e2e::{free_port, wait_until, CofferCli, Node, NodeOptions};

const CONVERGE: Duration = Duration::from_secs(60);

fn ha_listener(ip: &str, port: u16, peer_ip: &str) -> String {
    format!(
        r#"
[[listener]]
name = "ha"
protocol = "smtp"
bind = "{ip}:{port}"
allow = ["{peer_ip}/32"]
trust_xcoffer = true

[[route]]
from = ["ha"]
archive = true
forward = []
"#
    )
}

fn connection(ip: &str, peer: &str, peer_ip: &str, peer_port: u16) -> String {
    format!(
        r#"
[[connection]]
name = "to-{peer}"
peer = "{peer}"
target = "{peer_ip}:{peer_port}"
source = "{ip}"
probe_interval = "1s"

[[route]]
from = ["journal"]
archive = true
forward = ["to-{peer}"]
"#
    )
}

fn message(i: usize) -> Vec<u8> {
    format!("From: s@example.org\r\nTo: r@example.net\r\nSubject: reload {i}\r\n\r\nbody {i}\r\n")
        .into_bytes()
}

fn count(node: &Node) -> u64 {
    node.status()["arrivals"].as_u64().expect("arrivals")
}

#[test]
fn sighup_adds_and_removes_a_replication_connection() {
    let (ip_a, ip_b) = ("127.0.0.2", "127.0.0.3");
    let (ha_a, ha_b) = (free_port(ip_a), free_port(ip_b));
    let a = Node::start_with(NodeOptions {
        name: "a".into(),
        ip: ip_a.into(),
        extra_toml: ha_listener(ip_a, ha_a, ip_b),
        ..NodeOptions::default()
    });
    let b = Node::start_with(NodeOptions {
        name: "b".into(),
        ip: ip_b.into(),
        extra_toml: ha_listener(ip_b, ha_b, ip_a),
        ..NodeOptions::default()
    });
    let pid = a.pid();
    a.send("s@example.org", &["r@example.net"], &message(1));
    assert_eq!(count(&a), 1);
    assert_eq!(count(&b), 0, "no connection yet: nothing replicated");

    // Add the connection and its route; SIGHUP; B catches up from the first arrival.
    let with = format!("{}{}", a.config_toml(), connection(ip_a, "b", ip_b, ha_b));
    std::fs::write(&a.config_path, &with).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until("B to receive A's first message", CONVERGE, || {
        (count(&b) == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log_tail(), b.log_tail()));
    a.send("s@example.org", &["r@example.net"], &message(2));
    wait_until("B to receive the next one", CONVERGE, || {
        (count(&b) == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log_tail(), b.log_tail()));
    let status = a.status();
    assert_eq!(status["connections"][0]["name"], "to-b", "{status}");
    assert_eq!(a.pid(), pid, "no restart");

    // Remove it again: the replicator stops, new mail stays on A.
    std::fs::write(&a.config_path, a.config_toml()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until("A to drop the connection", CONVERGE, || {
        a.status()["connections"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail()));
    a.send("s@example.org", &["r@example.net"], &message(3));
    assert_eq!(count(&a), 3);
    // Proving an absence needs a wait: longer than probe_interval, nothing may follow.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&b), 2, "a removed connection ships nothing");
}
