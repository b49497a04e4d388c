//! LMTP on a Unix socket (interfaces.md "LMTP"): real clients (swaks, Postfix's
//! smtp-source with `-L`) over `unix:PATH`, and a raw client driving one transaction to
//! the recipient limit: 1,000 recipients get one `250 2.0.0` each after the single
//! durable commit, the 1,001st gets 452, and one arrival lists all 1,000. The socket
//! takes `socket_mode` and is removed when the daemon stops.
//!
//! A missing swaks or smtp-source skips that test with a printed reason, except when `CI`
//! is set: there it fails.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use coffer_e2e::daemon::{Daemon, Probe};
use coffer_e2e::wire::Wire;
use coffer_e2e::CofferCli;
use coffer_e2e::{archived_form, require_tool, run, sha256_hex, smtp::dot_stuff, Accepted};

const TOOL_DEADLINE: Duration = Duration::from_secs(120);
const RECIPIENTS: usize = 1000;

fn socket_path(root: &Path) -> PathBuf {
    root.join("lmtp.sock")
}

/// A daemon whose only listener is LMTP on `<tmp>/lmtp.sock`, mode 0660.
fn lmtp_daemon() -> (Daemon, PathBuf) {
    let d = Daemon::launch(|root| {
        let sock = socket_path(root);
        let toml = format!(
            r#"[node]
name = "lm"
data_dir = "data"

[store]
min_free_disk = "0"

[[listener]]
name = "lmtp"
protocol = "lmtp"
bind = "unix:{sock}"
socket_mode = 0o660
max_message_size = "1MiB"

[[route]]
from = ["lmtp"]
"#,
            sock = sock.display()
        );
        (toml, Probe::Unix(sock))
    });
    let sock = socket_path(d.dir());
    (d, sock)
}

fn assert_socket_mode(sock: &Path) {
    let meta = std::fs::symlink_metadata(sock).expect("stat the socket");
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        sock.display()
    );
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o660,
        "socket_mode not applied to {}",
        sock.display()
    );
}

/// SIGTERM: a clean exit, and the socket file is gone.
fn stop_and_check_socket_removed(d: &mut Daemon, sock: &Path) {
    let status = d.terminate();
    assert!(status.success(), "cofferd exit: {status}\n{}", d.log_tail());
    assert!(
        std::fs::symlink_metadata(sock).is_err(),
        "{} still exists after SIGTERM",
        sock.display()
    );
}

#[test]
fn swaks_and_smtp_source_over_the_socket() {
    let (Some(swaks), Some(smtp_source)) = (
        require_tool("swaks", "swaks"),
        require_tool("smtp-source", "postfix"),
    ) else {
        return;
    };
    let (mut d, sock) = lmtp_daemon();
    assert_socket_mode(&sock);

    let mut cmd = Command::new(swaks);
    cmd.args(["--socket", &sock.display().to_string()])
        .args(["--protocol", "LMTP"])
        .args(["--helo", "swaks.lmtp.test"])
        .args(["--from", "lmtp-sender@example.org"])
        .args(["--to", "lmtp-rcpt@example.net"])
        .args(["--header", "Subject: swaks over an LMTP socket"])
        .args(["--body", "Over LMTP.\n.dot line\nend"]);
    let out = run(cmd, TOOL_DEADLINE).expect("run swaks");
    assert_eq!(out.code, Some(0), "swaks failed:\n{out}\n{}", d.log_tail());
    let transcript = out.stdout_str();
    let line = transcript
        .lines()
        .find(|l| l.contains("250") && l.contains("Ok:"))
        .unwrap_or_else(|| panic!("no `250 … Ok: <arrival> <id>` from swaks:\n{transcript}"));
    let id = line.split_whitespace().last().unwrap().to_owned();
    let bytes = d.get(&id);
    assert_eq!(sha256_hex(&bytes), id);
    assert!(
        String::from_utf8_lossy(&bytes).contains("\r\n.dot line\r\n"),
        "dot-unstuffed line missing"
    );
    let arrivals = d.arrivals(&id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    assert_eq!(arrivals[0]["listener"], "lmtp", "{arrivals:?}");
    assert_eq!(arrivals[0]["mail_from"], "lmtp-sender@example.org");
    assert_eq!(arrivals[0]["rcpt_to"][0], "lmtp-rcpt@example.net");

    const MESSAGES: u64 = 50;
    let mut cmd = Command::new(smtp_source);
    cmd.args(["-L", "-m", &MESSAGES.to_string(), "-s", "5", "-l", "2048"])
        .args(["-f", "source@example.org", "-t", "sink@example.net"])
        .arg(format!("unix:{}", sock.display()));
    let out = run(cmd, TOOL_DEADLINE).expect("run smtp-source");
    assert_eq!(
        out.code,
        Some(0),
        "smtp-source failed:\n{out}\n{}",
        d.log_tail()
    );

    let status = d.status();
    assert_eq!(status["messages"].as_u64(), Some(MESSAGES + 1), "{status}");
    assert_eq!(status["arrivals"].as_u64(), Some(MESSAGES + 1), "{status}");
    assert_eq!(status["repeats"].as_u64(), Some(0), "{status}");

    stop_and_check_socket_removed(&mut d, &sock);
}

#[test]
fn thousand_recipients_get_one_reply_each_and_one_arrival() {
    let (mut d, sock) = lmtp_daemon();
    assert_socket_mode(&sock);

    let mut c = Wire::unix(&sock).unwrap().expect_220().unwrap();
    // LMTP: EHLO is refused, LHLO answers with the extension list.
    assert_eq!(c.cmd("EHLO raw.test").unwrap().code, 500);
    let lhlo = c.expect("LHLO raw.test", 250).unwrap();
    for ext in [
        "PIPELINING",
        "CHUNKING",
        "BINARYMIME",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(lhlo.lines.iter().any(|l| l == ext), "{ext} missing: {lhlo}");
    }
    assert!(
        !lhlo.lines.iter().any(|l| l.starts_with("XCOFFER")),
        "XCOFFER advertised without trust_xcoffer: {lhlo}"
    );

    c.expect("MAIL FROM:<bulk@example.org>", 250).unwrap();
    let rcpts: Vec<String> = (0..=RECIPIENTS)
        .map(|i| format!("r{i:04}@example.net"))
        .collect();
    // Pipelined in batches of 100 commands, then their replies in order.
    let mut replies = Vec::with_capacity(rcpts.len());
    for batch in rcpts.chunks(100) {
        let mut block = String::new();
        for r in batch {
            block.push_str(&format!("RCPT TO:<{r}>\r\n"));
        }
        c.send_raw(block.as_bytes()).unwrap();
        for _ in batch {
            replies.push(c.read_reply().unwrap());
        }
    }
    for (i, r) in replies.iter().take(RECIPIENTS).enumerate() {
        assert_eq!(r.code, 250, "RCPT #{}: {r}", i + 1);
    }
    let last = &replies[RECIPIENTS];
    assert_eq!(last.code, 452, "recipient #{}: {last}", RECIPIENTS + 1);
    assert!(last.text().starts_with("4.5.3"), "{last}");

    let msg = b"From: bulk@example.org\r\nTo: undisclosed-recipients:;\r\n\
                Subject: one thousand recipients\r\n\r\nbody\r\n.leading dot\r\n";
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    c.send_raw(&dot_stuff(msg)).unwrap();
    let mut ids = BTreeSet::new();
    for i in 0..RECIPIENTS {
        let r = c.read_reply().unwrap();
        assert!(r.text().starts_with("2.0.0"), "reply #{}: {r}", i + 1);
        let acc = Accepted::parse(r).unwrap_or_else(|e| panic!("reply #{}: {e:#}", i + 1));
        ids.insert((acc.arrival_id, acc.message_id));
    }
    assert_eq!(ids.len(), 1, "every reply names the same arrival: {ids:?}");
    let (arrival, id) = ids.into_iter().next().unwrap();
    assert_eq!(id, sha256_hex(&archived_form(msg)));

    // The session goes on: a BDAT transaction with 3 recipients gets 3 replies.
    c.expect("MAIL FROM:<bdat@example.org>", 250).unwrap();
    for r in ["x1@example.net", "x2@example.net", "x3@example.net"] {
        c.expect(&format!("RCPT TO:<{r}>"), 250).unwrap();
    }
    let small = b"Subject: bdat over lmtp\r\n\r\nhi\r\n";
    let first = c.bdat(small, true).unwrap();
    let mut bdat_ids = BTreeSet::new();
    bdat_ids.insert(Accepted::parse(first).unwrap().message_id);
    for _ in 1..3 {
        bdat_ids.insert(Accepted::parse(c.read_reply().unwrap()).unwrap().message_id);
    }
    assert_eq!(
        bdat_ids.into_iter().collect::<Vec<_>>(),
        vec![sha256_hex(small)]
    );

    // Over max_message_size on LAST: one 552 per recipient, nothing stored, and the
    // session goes on.
    c.expect("MAIL FROM:<big@example.org>", 250).unwrap();
    for r in ["y1@example.net", "y2@example.net"] {
        c.expect(&format!("RCPT TO:<{r}>"), 250).unwrap();
    }
    let big = vec![b'b'; (1 << 20) + 1];
    for i in 0..2 {
        let r = if i == 0 {
            c.bdat(&big, true).unwrap()
        } else {
            c.read_reply().unwrap()
        };
        assert_eq!(r.code, 552, "reply #{}: {r}", i + 1);
    }
    c.expect("NOOP", 250).unwrap();
    let _ = c.quit();

    let arrivals = d.arrivals(&id);
    assert_eq!(arrivals.len(), 1, "one arrival for the transaction");
    assert_eq!(
        arrivals[0]["id"].as_str(),
        Some(arrival.as_str()),
        "{:?}",
        arrivals[0]["id"]
    );
    let got: Vec<&str> = arrivals[0]["rcpt_to"]
        .as_array()
        .expect("rcpt_to is an array")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: Vec<&str> = rcpts[..RECIPIENTS].iter().map(String::as_str).collect();
    assert_eq!(got.len(), RECIPIENTS);
    assert_eq!(
        got.iter().collect::<BTreeSet<_>>(),
        want.iter().collect::<BTreeSet<_>>(),
        "the arrival lists exactly the 1,000 accepted recipients"
    );
    assert_eq!(d.counts(), (2, 2));

    // An idle session at shutdown is told so (421) and the socket is still removed.
    let mut idle = Wire::unix(&sock).unwrap().expect_220().unwrap();
    idle.expect("LHLO idle.test", 250).unwrap();
    stop_and_check_socket_removed(&mut d, &sock);
    let r = idle.read_reply().unwrap();
    assert_eq!(r.code, 421, "{r}");
}
