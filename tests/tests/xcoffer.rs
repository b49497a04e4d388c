//! XCOFFER (interfaces.md "XCOFFER"): advertised as `XCOFFER <node> <epoch>` and
//! accepted only on a `trust_xcoffer` listener; what it carries is kept with the arrival
//! (`coffer get --envelope`), its queue id becomes the arrival's; an untrusted listener
//! neither advertises nor accepts it (555); the MAIL line may be 16 KiB on the trusted
//! listener, and no longer.

use std::net::SocketAddr;

use coffer_e2e::daemon::{free_addr, Daemon, Probe};
use coffer_e2e::wire::Wire;
use coffer_e2e::CofferCli;
use coffer_e2e::{archived_form, sha256_hex, smtp::dot_stuff, Accepted};
use coffer_proto::xcoffer::{encode, Xcoffer};

/// Whole MAIL line, CRLF included, accepted on a trusted listener.
const TRUSTED_LINE_MAX: usize = 16 * 1024;

struct Setup {
    d: Daemon,
    trusted: SocketAddr,
    untrusted: SocketAddr,
}

fn start() -> Setup {
    let mut picked = (free_addr(), free_addr());
    let d = Daemon::launch(|_| {
        picked = (free_addr(), free_addr());
        let (trusted, untrusted) = picked;
        let toml = format!(
            r#"[node]
name = "node-x"
data_dir = "data"

[store]
min_free_disk = "0"

[[listener]]
name = "ha"
bind = "{trusted}"
trust_xcoffer = true

[[listener]]
name = "journal"
bind = "{untrusted}"

[[route]]
from = ["ha", "journal"]
"#
        );
        (toml, Probe::Tcp(untrusted))
    });
    Setup {
        d,
        trusted: picked.0,
        untrusted: picked.1,
    }
}

fn ehlo(addr: SocketAddr) -> (Wire, Vec<String>) {
    let mut c = Wire::tcp(addr).unwrap().expect_220().unwrap();
    let r = c.expect("EHLO peer.test", 250).unwrap();
    (c, r.lines)
}

/// DATA with `msg`; returns the acceptance.
fn data(c: &mut Wire, msg: &[u8]) -> Accepted {
    let r = c.cmd("DATA").unwrap();
    assert_eq!(r.code, 354, "{r}");
    c.send_raw(&dot_stuff(msg)).unwrap();
    Accepted::parse(c.read_reply().unwrap()).unwrap()
}

#[test]
fn trusted_listener_advertises_and_records_xcoffer() {
    let s = start();
    let epoch = s.d.status()["epoch"].as_str().unwrap().to_owned();
    let (mut c, lines) = ehlo(s.trusted);
    let adv: Vec<&String> = lines.iter().filter(|l| l.starts_with("XCOFFER")).collect();
    assert_eq!(adv, [&format!("XCOFFER node-x {epoch}")], "EHLO: {lines:?}");

    let x = Xcoffer {
        queue_id: Some("4Q1x2y3zAB".into()),
        client_name: Some("mx1.example.org".into()),
        client_addr: Some("192.0.2.25".into()),
        helo: Some("mx1.example.org".into()),
        protocol: Some("ESMTPS".into()),
        auth_user: Some("alice".into()),
        trace: vec!["node-y".into()],
        hops: 1,
        ..Xcoffer::default()
    };
    let line = format!(
        "MAIL FROM:<origin@example.org> SIZE=200 XCOFFER={} BODY=8BITMIME",
        encode(&x)
    );
    c.expect(&line, 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let msg = b"Subject: via xcoffer\r\n\r\nrelayed\r\n";
    let acc = data(&mut c, msg);
    c.quit().unwrap();
    assert_eq!(acc.message_id, sha256_hex(&archived_form(msg)));

    let arrivals = s.d.arrivals(&acc.message_id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    let a = &arrivals[0];
    assert_eq!(a["listener"], "ha", "{a}");
    assert_eq!(a["queue_id"], "4Q1x2y3zAB", "{a}");
    let xj = &a["xcoffer"];
    assert_eq!(xj["queue_id"], "4Q1x2y3zAB", "{a}");
    assert_eq!(xj["client_name"], "mx1.example.org", "{a}");
    assert_eq!(xj["client_addr"], "192.0.2.25", "{a}");
    assert_eq!(xj["auth_user"], "alice", "{a}");
    assert_eq!(xj["trace"], serde_json::json!(["node-y"]), "{a}");
    assert_eq!(xj["hops"], 1, "{a}");
    // The session's own view stays what it saw; XCOFFER is not a recorded parameter.
    let seen = a["client_addr"].as_str().unwrap_or_default();
    assert!(seen.starts_with("127.0.0.1"), "client_addr {seen:?} in {a}");
    let params: Vec<&str> = a["mail_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(params, ["SIZE=200", "BODY=8BITMIME"], "{a}");
    // Search shows the same record.
    let found =
        s.d.coffer_ok(&["search", "--subject", "via xcoffer", "--json"])
            .json();
    assert_eq!(found[0]["arrivals"][0]["queue_id"], "4Q1x2y3zAB", "{found}");
}

#[test]
fn untrusted_listener_neither_advertises_nor_accepts_xcoffer() {
    let s = start();
    let (mut c, lines) = ehlo(s.untrusted);
    assert!(
        !lines
            .iter()
            .any(|l| l.to_ascii_uppercase().starts_with("XCOFFER")),
        "XCOFFER advertised on an untrusted listener: {lines:?}"
    );
    let x = Xcoffer {
        queue_id: Some("FORGED".into()),
        origin_arrival: Some("node-y/0badf00d/7".into()),
        ..Xcoffer::default()
    };
    let r = c
        .cmd(&format!(
            "MAIL FROM:<forger@example.org> XCOFFER={}",
            encode(&x)
        ))
        .unwrap();
    assert_eq!(r.code, 555, "{r}");
    assert!(r.text().starts_with("5.5.4"), "{r}");
    // No transaction was opened.
    assert_eq!(c.cmd("RCPT TO:<archive@example.net>").unwrap().code, 503);
    // Plain mail still works on the same session.
    c.expect("MAIL FROM:<plain@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let acc = data(&mut c, b"Subject: plain\r\n\r\nx\r\n");
    c.quit().unwrap();
    let a = &s.d.arrivals(&acc.message_id)[0];
    assert!(a["queue_id"].is_null() || a["queue_id"] == "", "{a}");
    assert!(a["xcoffer"].is_null(), "{a}");

    // On the trusted listener, XCOFFER after plain HELO is refused too.
    let mut c = Wire::tcp(s.trusted).unwrap().expect_220().unwrap();
    c.expect("HELO old.test", 250).unwrap();
    let r = c
        .cmd(&format!("MAIL FROM:<a@example.org> XCOFFER={}", encode(&x)))
        .unwrap();
    assert_eq!(r.code, 555, "{r}");
    let _ = c.quit();
    assert_eq!(s.d.counts(), (1, 1));
}

/// A MAIL line carrying XCOFFER that is exactly `total` bytes long with its CRLF.
///
/// The value's length follows from the JSON's (4 characters per 3 bytes, unpadded), so
/// the padding is estimated and then searched in a small window; the sender's length
/// varies too, since some encoded lengths (4k+1) cannot occur.
fn mail_line_of(total: usize) -> String {
    let make = |pad: usize, extra: usize| {
        let mut x = Xcoffer {
            queue_id: Some("BIGQ".into()),
            ..Xcoffer::default()
        };
        x.macros.insert("pad".into(), "p".repeat(pad));
        let from = format!("big{}@example.org", "b".repeat(extra));
        format!("MAIL FROM:<{from}> XCOFFER={}", encode(&x))
    };
    let empty = make(0, 0).len();
    let estimate = (total.saturating_sub(2 + empty)) * 3 / 4;
    for pad in estimate.saturating_sub(8)..estimate + 8 {
        for extra in 0..4 {
            let line = make(pad, extra);
            if line.len() + 2 == total {
                return line;
            }
        }
    }
    panic!("no MAIL line of exactly {total} bytes");
}

#[test]
fn sixteen_kib_mail_line_is_accepted_on_the_trusted_listener_only() {
    let s = start();
    let (mut c, _) = ehlo(s.trusted);
    let line = mail_line_of(TRUSTED_LINE_MAX);
    assert_eq!(line.len() + 2, TRUSTED_LINE_MAX);
    c.expect(&line, 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let acc = data(&mut c, b"Subject: big mail line\r\n\r\nx\r\n");

    // One byte more is refused as too long, and the session goes on.
    let r = c.cmd(&mail_line_of(TRUSTED_LINE_MAX + 1)).unwrap();
    assert_eq!(r.code, 500, "{r}");
    assert!(r.text().starts_with("5.5.6"), "{r}");
    c.expect("NOOP", 250).unwrap();
    c.quit().unwrap();

    let a = &s.d.arrivals(&acc.message_id)[0];
    assert_eq!(a["queue_id"], "BIGQ", "{}", a["queue_id"]);
    let pad = a["xcoffer"]["macros"]["pad"].as_str().unwrap_or_default();
    assert!(
        pad.len() > 11_000 && pad.bytes().all(|b| b == b'p'),
        "pad of {} bytes",
        pad.len()
    );

    // Elsewhere, commands are capped at 4 KiB: the same kind of line is too long.
    let (mut c, _) = ehlo(s.untrusted);
    let r = c.cmd(&mail_line_of(4097)).unwrap();
    assert_eq!(r.code, 500, "{r}");
    c.expect("NOOP", 250).unwrap();
    let _ = c.quit();
    assert_eq!(s.d.counts(), (1, 1));
}
