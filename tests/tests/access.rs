//! Only expected peers get in, and nothing gets out unasked (design.md §2; docs/reliability.md
//! "Access"):
//!
//! - a TCP listener with an `allow` list refuses a client from outside it (127.0.0.3
//!   against `allow = ["127.0.0.2/32"]`) with `554 5.7.1 <address> not allowed` before
//!   any command, logs the refusal and counts it in `/metrics`
//!   (`coffer_connections_refused_total{reason="not_allowed"}`); the allowed client is
//!   served;
//! - cofferd never relays: mail for any recipient on a listener whose route forwards
//!   nowhere reaches no other host — an `smtp-sink` on 127.0.0.4:25, where an open relay
//!   would deliver `victim@[127.0.0.4]`, gets nothing — and a route forwards only to its
//!   configured connection;
//! - a `unix:` listener's socket gets the configured `socket_mode` and `socket_group`.
//!
//! An HA listener with `require_client_cert` refusing a peer without a certificate is
//! `tls.rs` (`replication_over_tls_needs_the_right_certificates_and_reloads_them`).

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use coffer_e2e::daemon::{free_addr, http_get, metric, Daemon, Probe};
use coffer_e2e::sink::SmtpSink;
use coffer_e2e::smtp::dot_stuff;
use coffer_e2e::wire::Wire;
use coffer_e2e::{require_tool, wait_until, Accepted, CofferCli};

const ALLOWED: &str = "127.0.0.2";
const STRANGER: &str = "127.0.0.3";
/// Where an open relay would deliver mail for `victim@[127.0.0.4]`.
const ELSEWHERE: &str = "127.0.0.4";

struct Setup {
    d: Daemon,
    /// `allow = [ALLOWED]`, routed to the archive only.
    journal: SocketAddr,
    /// Default allow (loopback), routed to the archive and the connection `to-sink`.
    relay: SocketAddr,
    console: SocketAddr,
}

fn start(sink: &str) -> Setup {
    let mut picked = (free_addr(), free_addr(), free_addr());
    let d = Daemon::launch(|_| {
        picked = (free_addr(), free_addr(), free_addr());
        let (journal, relay, console) = picked;
        let toml = format!(
            r#"[node]
name = "access"
data_dir = "data"

[store]
min_free_disk = "0"

[[listener]]
name = "journal"
bind = "{journal}"
allow = ["{ALLOWED}/32"]

[[listener]]
name = "relay"
bind = "{relay}"

[[listener]]
name = "lmtp"
protocol = "lmtp"
bind = "unix:lmtp.sock"
socket_mode = 0o640
socket_group = "mail"

[[connection]]
name = "to-sink"
peer = "sink"
target = "{sink}"
sessions = 1
probe_interval = "1s"

[[route]]
from = ["journal", "lmtp"]
archive = true
forward = []

[[route]]
from = ["relay"]
archive = true
forward = ["to-sink"]

[console]
bind = "{console}"
"#
        );
        (toml, Probe::Tcp(relay))
    });
    Setup {
        d,
        journal: picked.0,
        relay: picked.1,
        console: picked.2,
    }
}

fn connections_refused(console: SocketAddr, listener: &str) -> f64 {
    let (code, text) = http_get(console, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{text}");
    let series = format!(
        "coffer_connections_refused_total{{listener=\"{listener}\",reason=\"not_allowed\"}}"
    );
    metric(&text, &series).unwrap_or_else(|| panic!("{series} missing from\n{text}"))
}

/// One DATA transaction on a session that has greeted; the acceptance.
fn send(c: &mut Wire, to: &[&str], msg: &[u8]) -> Accepted {
    c.expect("MAIL FROM:<sender@example.org>", 250).unwrap();
    for r in to {
        c.expect(&format!("RCPT TO:<{r}>"), 250).unwrap();
    }
    c.expect("DATA", 354).unwrap();
    c.send_raw(&dot_stuff(msg)).unwrap();
    Accepted::parse(c.read_reply().unwrap()).unwrap()
}

fn sink_tool() -> Option<std::path::PathBuf> {
    let tool = require_tool("smtp-sink", "postfix")?;
    if !nix::unistd::Uid::effective().is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        assert!(!ci, "the access test binds port 25 and needs root in CI");
        eprintln!("SKIPPED: binding {ELSEWHERE}:25 needs root");
        return None;
    }
    Some(tool)
}

#[test]
fn only_allowed_clients_get_in_and_nothing_is_relayed() {
    let Some(tool) = sink_tool() else { return };
    let sinks = tempfile::Builder::new()
        .prefix("coffer-e2e-sinks-")
        .tempdir()
        .unwrap();
    let configured = SmtpSink::start(&tool, sinks.path(), &[]);
    let elsewhere = SmtpSink::start_on(&tool, sinks.path(), ELSEWHERE, 25, &[]);
    let s = start(&configured.addr());

    // 1. The allow list: a stranger gets 554 before any command, twice; logged, counted.
    for _ in 0..2 {
        let mut c = Wire::tcp_from(STRANGER.parse().unwrap(), s.journal).unwrap();
        assert_eq!(c.greeting.code, 554, "{}", c.greeting);
        assert_eq!(c.greeting.text(), format!("5.7.1 {STRANGER} not allowed"));
        // The connection is closed after the refusal: nothing else comes.
        assert!(c.read_to_eof().is_empty());
    }
    let log = s.d.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("connection refused: address not in allow list")
                && l.contains(STRANGER)
                && l.contains("journal")
        ),
        "the refusal is not in the log\n{}",
        s.d.log_tail()
    );
    assert_eq!(connections_refused(s.console, "journal"), 2.0);
    assert_eq!(connections_refused(s.console, "relay"), 0.0);

    // The allowed client is served — with recipients an open relay would deliver.
    let mut c = Wire::tcp_from(ALLOWED.parse().unwrap(), s.journal)
        .unwrap()
        .expect_220()
        .unwrap();
    c.expect("EHLO allowed.test", 250).unwrap();
    let to_anyone = [
        "victim@[127.0.0.4]",
        "postmaster@localhost",
        "someone@example.com",
    ];
    let archived = send(
        &mut c,
        &to_anyone,
        b"Subject: archive only\r\nMessage-ID: <archive-only@access.test>\r\n\r\nkept here\r\n",
    );
    c.quit().unwrap();
    assert_eq!(s.d.arrivals(&archived.message_id).len(), 1);

    // 2. A route forwards only to its configured connection.
    let mut c = Wire::tcp(s.relay).unwrap().expect_220().unwrap();
    c.expect("EHLO relay.test", 250).unwrap();
    let forwarded = send(
        &mut c,
        &["victim@[127.0.0.4]"],
        b"Subject: forwarded\r\nMessage-ID: <forwarded@access.test>\r\n\r\nto the sink\r\n",
    );
    c.quit().unwrap();
    let got = wait_until(
        "the configured connection to deliver",
        Duration::from_secs(60),
        || {
            let d = configured.dumped();
            (!d.is_empty()).then_some(d)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.d.log_tail()));
    // Wait until the connection has nothing left to send, then count.
    wait_until(
        "the connection's lag to drop to zero",
        Duration::from_secs(60),
        || {
            let c = s.d.status()["connections"][0].clone();
            (c["lag_arrivals"] == 0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", s.d.log_tail()));
    let got_all = configured.dumped();
    assert_eq!(
        got_all.len(),
        1,
        "the sink got more than the relay's message: {got_all:?}"
    );
    assert!(
        got[0].contains("Message-ID: <forwarded@access.test>"),
        "{}",
        got[0]
    );
    assert!(
        !got_all[0].contains("archive-only@access.test"),
        "mail of a listener that forwards nowhere was forwarded"
    );
    assert_eq!(s.d.arrivals(&forwarded.message_id).len(), 1);
    let conns = s.d.status()["connections"].clone();
    assert_eq!(conns.as_array().map(Vec::len), Some(1), "{conns}");
    // The host the recipients named got nothing, from either listener.
    assert!(
        elsewhere.dumped().is_empty(),
        "mail reached {ELSEWHERE}:25: {:?}",
        elsewhere.dumped()
    );

    // 3. The unix socket: mode and group as configured.
    let sock = s.d.dir().join("lmtp.sock");
    check_socket(&sock, 0o640, "mail");
    let mut c = Wire::unix(&sock).unwrap().expect_220().unwrap();
    c.expect("LHLO access.test", 250).unwrap();
    let _ = c.quit();
}

fn check_socket(sock: &Path, mode: u32, group: &str) {
    let meta = std::fs::metadata(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        sock.display()
    );
    assert_eq!(meta.permissions().mode() & 0o7777, mode, "socket_mode");
    let gid = nix::unistd::Group::from_name(group)
        .expect("group lookup")
        .unwrap_or_else(|| panic!("no group {group}"))
        .gid;
    assert_eq!(meta.gid(), gid.as_raw(), "socket_group");
}
