//! A real Postfix with coffer-milter in `smtpd_milters`, handing off to a real cofferd.
//!
//! Proves, through Postfix 3.x itself (not a simulated MTA):
//! - a message sent with swaks is archived once, byte-exact as Postfix passed it
//!   (Bcc removed by Postfix's `message_drop_headers`, leading spaces and folding kept,
//!   no Received: line of Postfix's own), with Postfix's queue id and every envelope
//!   recipient — including a BCC-only recipient that appears in no header;
//! - smtp-source (several sessions, three recipients each) gives one arrival per
//!   message, each with a queue id and its three recipients;
//! - with cofferd stopped the SMTP client gets a 4xx at end of DATA and nothing is
//!   archived; with cofferd back the retried message is archived exactly once.
//!
//! Needs root (Postfix's ownership checks), postfix, swaks and smtp-source; skipped
//! with a printed reason when they are missing outside CI.

use std::process::Command;
use std::time::Duration;

use coffer_e2e::milter::MilterNode;
use coffer_e2e::postfix::Postfix;
use coffer_e2e::CofferCli;
use coffer_e2e::{require_tool, run, sha256_hex, CmdOutput};

fn tools_present() -> bool {
    let ok = require_tool("postfix", "postfix").is_some()
        && require_tool("smtp-source", "postfix").is_some()
        && require_tool("swaks", "swaks").is_some();
    if ok && !nix::unistd::Uid::effective().is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        assert!(!ci, "the Postfix e2e test needs root in CI");
        eprintln!("SKIPPED: a throwaway Postfix instance needs root");
        return false;
    }
    ok
}

/// Runs swaks against Postfix's smtpd with `data` (LF line ends; swaks sends CRLF).
fn swaks(pf: &Postfix, from: &str, to: &[&str], data: &str) -> CmdOutput {
    let file = pf.dir().join("swaks-data.eml");
    std::fs::write(&file, data).expect("write data");
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", "127.0.0.1", "--port"])
        .arg(pf.smtpd_port.to_string())
        .args(["--helo", "client.e2e.test", "--from", from, "--to"])
        .arg(to.join(","))
        .arg("--data")
        .arg(&file)
        .args(["--timeout", "120"]);
    run(cmd, Duration::from_secs(180)).expect("run swaks")
}

/// `queued as XXXX` from swaks' transcript.
fn queue_id(out: &CmdOutput) -> String {
    let text = out.stdout_str();
    let at = text
        .find("queued as ")
        .unwrap_or_else(|| panic!("no `queued as` in swaks output:\n{out}"));
    text[at + "queued as ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

const MESSAGE: &str = "From: Sender <sender@example.org>
To: Visible <visible@example.net>
Bcc: hidden@example.net
Subject:   three spaces and caf\u{e9}
X-Folded: first part,
\tsecond part,
  third part
Message-ID: <postfix-fidelity-1@example.org>
Date: Tue, 01 Oct 2024 10:00:00 +0000

Body line one.
..a line that started with a dot
Last line.
";

/// What Postfix hands the milter for `data` sent by swaks: CRLF line ends, no Bcc (its
/// `message_drop_headers`), dots unstuffed, and one empty last line (swaks ends DATA
/// with CRLF `.` CRLF after the file's final newline).
fn expected_archive(data: &str) -> Vec<u8> {
    let mut v: String = data
        .lines()
        .filter(|l| !l.starts_with("Bcc:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    v.push_str("\r\n");
    v.into_bytes()
}

#[test]
fn postfix_hands_every_message_to_the_archive() {
    if !tools_present() {
        return;
    }
    let mut m = MilterNode::start("timeout = \"20s\"");
    let pf = Postfix::start(&m.milter_socket);

    // 1. swaks, three recipients, one of them only in the envelope (BCC).
    let rcpts = [
        "visible@example.net",
        "other@example.com",
        "hidden@example.net",
    ];
    let out = swaks(&pf, "sender@example.org", &rcpts, MESSAGE);
    assert_eq!(
        out.code,
        Some(0),
        "swaks:\n{out}\n{}\n{}",
        m.log_tail(),
        pf.log_tail()
    );
    let qid = queue_id(&out);
    let want = expected_archive(MESSAGE);
    let id = sha256_hex(&want);
    let got = m.node.coffer(&["get", &id]);
    assert_eq!(
        got.code,
        Some(0),
        "not archived as expected (id {id}):\n{got}\narchive holds: {:?}\n{}",
        m.node.search(&[]),
        m.log_tail()
    );
    assert!(got.stdout == want, "bytes differ:\n{}", got.stdout_str());
    let arrivals = m.node.arrivals(&id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    let a = &arrivals[0];
    assert_eq!(a["queue_id"], qid.as_str(), "{a}");
    assert_eq!(a["mail_from"], "sender@example.org", "{a}");
    assert_eq!(a["rcpt_to"], serde_json::json!(rcpts), "{a}");
    assert_eq!(a["listener"], "milter", "{a}");

    // 2. smtp-source: 12 messages in 3 sessions, 3 recipients each.
    let before = m.node.status()["arrivals"].as_u64().unwrap();
    let mut cmd = Command::new(coffer_e2e::find_tool("smtp-source").unwrap());
    cmd.args([
        "-m",
        "12",
        "-s",
        "3",
        "-l",
        "2048",
        "-r",
        "3",
        "-f",
        "load@example.org",
    ])
    .args(["-t", "rcpt@example.net"])
    .arg(format!("127.0.0.1:{}", pf.smtpd_port));
    let out = run(cmd, Duration::from_secs(300)).expect("smtp-source");
    assert_eq!(out.code, Some(0), "smtp-source:\n{out}\n{}", pf.log_tail());
    let after = m.node.status()["arrivals"].as_u64().unwrap();
    assert_eq!(after - before, 12, "{}\n{}", m.log_tail(), pf.log_tail());
    let records = m.node.search(&["--from", "load@example.org"]);
    let loads: Vec<&serde_json::Value> = records
        .iter()
        .flat_map(|r| r["arrivals"].as_array().unwrap())
        .filter(|a| a["mail_from"] == "load@example.org")
        .collect();
    assert_eq!(loads.len(), 12, "{records:?}");
    for a in loads {
        assert!(a["queue_id"].as_str().is_some_and(|q| !q.is_empty()), "{a}");
        assert_eq!(a["rcpt_to"].as_array().unwrap().len(), 3, "{a}");
    }

    // 3. cofferd down: the client is told to retry, nothing is archived.
    m.node.terminate();
    let retry = MESSAGE.replace("fidelity-1", "retry-1");
    let out = swaks(&pf, "sender@example.org", &["retry@example.net"], &retry);
    assert_ne!(out.code, Some(0), "swaks should fail:\n{out}");
    let transcript = out.stdout_str();
    assert!(
        transcript.contains("<** 451 4.3.0"),
        "expected 451 4.3.0 at end of DATA:\n{out}\n{}",
        pf.log_tail()
    );

    // 4. cofferd back: the retry is archived exactly once.
    m.node.restart();
    let out = swaks(&pf, "sender@example.org", &["retry@example.net"], &retry);
    assert_eq!(out.code, Some(0), "swaks retry:\n{out}\n{}", m.log_tail());
    let retry_id = sha256_hex(&expected_archive(&retry));
    let arrivals = m.node.arrivals(&retry_id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    assert_eq!(arrivals[0]["queue_id"], queue_id(&out).as_str());
    assert_eq!(m.node.status()["arrivals"].as_u64().unwrap(), after + 1);

    // 5. Locally submitted mail (the sendmail command, pickup, cleanup): archived
    //    through non_smtpd_milters.
    let local = "From: local@example.org\nTo: someone@example.net\n\
                 Subject: submitted with sendmail\nMessage-ID: <local-1@e2e.test>\n\n\
                 Handed to the sendmail command.\n";
    let mut cmd = Command::new("/usr/sbin/sendmail");
    cmd.arg("-C")
        .arg(pf.config_dir())
        .args(["-f", "local@example.org", "-i", "someone@example.net"])
        .stdin(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("sendmail");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(local.as_bytes())
            .expect("write to sendmail");
    }
    assert!(
        child.wait().expect("sendmail").success(),
        "{}",
        pf.log_tail()
    );
    let found = coffer_e2e::wait_until(
        "the locally submitted message to be archived",
        Duration::from_secs(60),
        || {
            let r = m.node.search(&["--message-id", "local-1@e2e.test"]);
            (!r.is_empty()).then_some(r)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", m.log_tail(), pf.log_tail()));
    let a = &found[0]["arrivals"][0];
    assert_eq!(a["mail_from"], "local@example.org", "{a}");
    assert_eq!(
        a["rcpt_to"],
        serde_json::json!(["someone@example.net"]),
        "{a}"
    );
    assert!(a["queue_id"].as_str().is_some_and(|q| !q.is_empty()), "{a}");

    // 6. A 20 MB message through Postfix: streamed to cofferd in chunks, archived once.
    let mut big = String::from(
        "From: big@example.org\nTo: large@example.net\nSubject: twenty megabytes\n\
         Message-ID: <big-1@e2e.test>\n\n",
    );
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n";
    while big.len() < 20 << 20 {
        big.push_str(line);
    }
    let out = swaks(&pf, "big@example.org", &["large@example.net"], &big);
    assert_eq!(
        out.code,
        Some(0),
        "swaks 20 MB:\n{}\n{}",
        m.log_tail(),
        pf.log_tail()
    );
    let big_qid = queue_id(&out);
    let want = expected_archive(&big);
    let big_id = sha256_hex(&want);
    let got = m.node.coffer(&["get", &big_id]);
    assert_eq!(
        got.code,
        Some(0),
        "20 MB message not archived byte-exact:\n{}",
        m.log_tail()
    );
    assert_eq!(got.stdout.len(), want.len());
    let arrivals = m.node.arrivals(&big_id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    assert_eq!(arrivals[0]["queue_id"], big_qid.as_str());

    drop(pf);
    assert!(m.stop_milter(), "{}", m.log_tail());
}
