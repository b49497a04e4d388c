//! Real SMTP clients against the real daemon: swaks (one message, checked end to end) and
//! Postfix's smtp-source (50 messages over 5 parallel sessions; every one must be
//! archived once).
//!
//! A missing tool skips the test with a printed reason, except when `CI` is set: there
//! it fails (`.ci/run` installs both).

use std::process::Command;
use std::time::Duration;

use coffer_e2e::CofferCli;
use coffer_e2e::{require_tool, run, sha256_hex, Node};

const TOOL_DEADLINE: Duration = Duration::from_secs(180);

#[test]
fn swaks_message_is_archived() {
    let Some(swaks) = require_tool("swaks", "swaks") else {
        return;
    };
    let node = Node::start();
    let mut cmd = Command::new(swaks);
    cmd.args(["--server", &node.addr.to_string()])
        .args(["--helo", "swaks.e2e.test"])
        .args(["--from", "swaks-sender@example.org"])
        .args(["--to", "swaks-rcpt@example.net"])
        .args(["--header", "Subject: hello from swaks e2e"])
        .args([
            "--body",
            "This message was sent by swaks.\n.leading dot line\nend",
        ]);
    let out = run(cmd, TOOL_DEADLINE).expect("run swaks");
    assert_eq!(
        out.code,
        Some(0),
        "swaks failed:\n{out}\n{}",
        node.log_tail()
    );

    // swaks prints the transcript; the server's answer to the final dot names the ids.
    let transcript = out.stdout_str();
    let line = transcript
        .lines()
        .find(|l| l.contains("250") && l.contains("Ok:"))
        .unwrap_or_else(|| {
            panic!("no `250 … Ok: <arrival> <id>` in swaks' transcript:\n{transcript}")
        });
    let id = line.split_whitespace().last().unwrap().to_owned();
    assert_eq!(id.len(), 64, "{line}");

    let bytes = node.get(&id);
    assert_eq!(sha256_hex(&bytes), id);
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("Subject: hello from swaks e2e"), "{text}");
    assert!(
        text.contains("\r\n.leading dot line\r\n"),
        "dot-unstuffed body line missing:\n{text}"
    );

    let found = node.search(&["--from", "swaks-sender@example.org"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["id"].as_str(), Some(id.as_str()));
    let arrivals = node.arrivals(&id);
    assert_eq!(arrivals.len(), 1);
    assert_eq!(
        arrivals[0]["mail_from"].as_str(),
        Some("swaks-sender@example.org")
    );

    let status = node.status();
    assert_eq!(status["messages"].as_u64(), Some(1), "{status}");
    assert_eq!(status["arrivals"].as_u64(), Some(1), "{status}");
}

#[test]
fn smtp_source_load_is_archived_once_each() {
    let Some(smtp_source) = require_tool("smtp-source", "postfix") else {
        return;
    };
    let node = Node::start();
    const MESSAGES: u64 = 50;
    let mut cmd = Command::new(smtp_source);
    cmd.args(["-c", "-m", &MESSAGES.to_string(), "-s", "5", "-l", "2048"])
        .args(["-f", "source@example.org", "-t", "sink@example.net"])
        .arg(node.addr.to_string());
    let out = run(cmd, TOOL_DEADLINE).expect("run smtp-source");
    assert_eq!(
        out.code,
        Some(0),
        "smtp-source failed:\n{out}\n{}",
        node.log_tail()
    );

    // smtp-source numbers its Message-Ids, so all 50 are distinct messages.
    let status = node.status();
    assert_eq!(status["messages"].as_u64(), Some(MESSAGES), "{status}");
    assert_eq!(status["arrivals"].as_u64(), Some(MESSAGES), "{status}");
    assert_eq!(status["repeats"].as_u64(), Some(0), "{status}");

    let found = node.search(&["--from", "source@example.org"]);
    assert_eq!(
        found.len() as u64,
        MESSAGES,
        "search by the envelope sender's header"
    );
    for m in found.iter().take(5) {
        let id = m["id"].as_str().unwrap();
        assert_eq!(sha256_hex(&node.get(id)), id);
    }
    let v = node.coffer(&["verify"]);
    assert_eq!(v.code, Some(0), "coffer verify:\n{v}");
}
