//! SIGHUP reload (interfaces.md "Reload"): the config file is rewritten and the daemon
//! signalled; `allow` and limits apply to connections accepted afterwards, without a
//! restart (same PID), while a session opened before keeps its settings. An invalid file
//! changes nothing. A change that needs a restart is logged as such and not applied.
//!
//! Clients connect from chosen loopback sources (127.0.0.1 and 127.0.0.2: every
//! 127.0.0.0/8 address is local on Linux).

use std::net::SocketAddr;

use coffer_e2e::daemon::{free_addr, Daemon, Probe};
use coffer_e2e::smtp::dot_stuff;
use coffer_e2e::wire::Wire;
use coffer_e2e::Accepted;

const A: &str = "127.0.0.1";
const B: &str = "127.0.0.2";

fn config(addr: SocketAddr, allow: &str, max_size: &str, max_pending: &str) -> String {
    format!(
        r#"[node]
name = "e2e"
data_dir = "data"

[store]
min_free_disk = "0"
max_pending = "{max_pending}"

[[listener]]
name = "journal"
bind = "{addr}"
allow = ["{allow}/32"]
max_message_size = "{max_size}"

[[route]]
from = ["journal"]
"#
    )
}

fn start() -> (Daemon, SocketAddr) {
    let mut picked = free_addr();
    let d = Daemon::launch(|_| {
        picked = free_addr();
        (config(picked, A, "1MiB", "64MiB"), Probe::Tcp(picked))
    });
    (d, picked)
}

/// Connects to `addr` from the source address `from` and reads the greeting.
fn connect_from(from: &str, addr: SocketAddr) -> Wire {
    Wire::tcp_from(from.parse().unwrap(), addr).unwrap()
}

fn assert_refused(from: &str, addr: SocketAddr) {
    let mut c = connect_from(from, addr);
    assert_eq!(c.greeting.code, 554, "{from}: {}", c.greeting);
    assert_eq!(
        c.greeting.text(),
        format!("5.7.1 {from} not allowed"),
        "{}",
        c.greeting
    );
    let _ = c.read_to_eof();
}

/// A session from `from` that greets with 220, after EHLO; returns it and the SIZE.
fn session_from(from: &str, addr: SocketAddr) -> (Wire, u64) {
    let c = connect_from(from, addr);
    let mut c = c
        .expect_220()
        .unwrap_or_else(|e| panic!("from {from}: {e:#}"));
    let ehlo = c.expect("EHLO reload.test", 250).unwrap();
    let size = ehlo
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("SIZE ")?.parse().ok())
        .expect("SIZE in EHLO");
    (c, size)
}

fn send(c: &mut Wire, subject: &str) -> Accepted {
    c.expect("MAIL FROM:<r@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    c.expect("DATA", 354).unwrap();
    c.send_raw(&dot_stuff(
        format!("Subject: {subject}\r\n\r\nx\r\n").as_bytes(),
    ))
    .unwrap();
    Accepted::parse(c.read_reply().unwrap()).unwrap()
}

#[test]
fn sighup_applies_allow_and_limits_to_new_connections() {
    let (mut d, addr) = start();
    let pid = d.pid();
    let (mut old, size) = session_from(A, addr);
    assert_eq!(size, 1 << 20);
    assert_refused(B, addr);

    d.write_config(&config(addr, B, "2MiB", "32MiB"));
    let log = d.sighup();
    assert!(log.contains("SIGHUP: configuration reloaded"), "{log}");
    assert!(
        log.contains("[store] max_pending changed from") && !log.contains("needs a restart"),
        "a [store] limit change is applied live and logged as such:\n{log}"
    );

    assert_refused(A, addr);
    let (mut new, size) = session_from(B, addr);
    assert_eq!(size, 2 << 20, "max_message_size reloaded for new sessions");
    send(&mut new, "from the newly allowed source");
    new.quit().unwrap();
    // The session opened before the reload keeps its settings and still works.
    send(&mut old, "from the session opened before the reload");
    old.quit().unwrap();

    assert!(d.is_alive(), "cofferd exited\n{}", d.log_tail());
    assert_eq!(d.pid(), pid, "reloaded without a restart");
    assert_eq!(d.counts(), (2, 2));
}

#[test]
fn invalid_config_on_sighup_keeps_the_old_settings() {
    let (mut d, addr) = start();
    let pid = d.pid();
    for (what, text) in [
        (
            "an unknown key",
            config(addr, B, "2MiB", "64MiB").replace("allow =", "alow ="),
        ),
        ("a bad size", config(addr, B, "2 parsecs", "64MiB")),
        ("broken TOML", "[[listener]\nname = ".to_owned()),
    ] {
        d.write_config(&text);
        let log = d.sighup();
        assert!(
            log.contains("SIGHUP: the configuration has errors and was not applied"),
            "{what}: {log}"
        );
        assert!(!log.contains("configuration reloaded"), "{what}: {log}");
        let (c, size) = session_from(A, addr);
        assert_eq!(size, 1 << 20, "{what}: old max_message_size kept");
        c.quit().unwrap();
        assert_refused(B, addr);
        assert!(d.is_alive(), "{what}: cofferd exited\n{}", d.log_tail());
        assert_eq!(d.pid(), pid);
    }
    // A valid file afterwards is applied.
    d.write_config(&config(addr, B, "1MiB", "64MiB"));
    let log = d.sighup();
    assert!(log.contains("SIGHUP: configuration reloaded"), "{log}");
    assert_refused(A, addr);
    let (c, _) = session_from(B, addr);
    c.quit().unwrap();
}
