//! coffer-milter driven by `miltertest` (OpenDKIM's libmilter test tool), a second,
//! independent implementation of the MTA side of the milter protocol, through the Lua
//! script `tests/fixtures/miltertest/transaction.lua`.
//!
//! Proves: a full transaction (negotiate as Postfix does — leading space and no reply
//! before end-of-message — connect, helo, mail, two rcpt, data, four headers, eoh, body,
//! eom) ends in "continue", and only after cofferd archived the message: `coffer search`
//! finds it by Message-ID, its bytes are the headers and body as sent, and its arrival
//! has the queue id, sender, both recipients and the connection facts. With cofferd
//! stopped the same transaction gets a tempfail at end-of-message, and once cofferd is
//! back the next one is archived.
//!
//! Needs `miltertest` (Debian package miltertest): skipped with a printed reason when
//! it is missing, a failure when `CI` is set.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_e2e::milter::MilterNode;
use coffer_e2e::CofferCli;
use coffer_e2e::{fixtures_dir, require_tool, run, sha256_hex, CmdOutput};

/// Runs the transaction script against the milter with `-D` variables.
fn miltertest(tool: &Path, m: &MilterNode, vars: &[(&str, &str)]) -> CmdOutput {
    let script = fixtures_dir().join("miltertest/transaction.lua");
    let mut cmd = Command::new(tool);
    cmd.arg("-D")
        .arg(format!("socket=unix:{}", m.milter_socket.display()));
    for (k, v) in vars {
        cmd.arg("-D").arg(format!("{k}={v}"));
    }
    cmd.arg("-s").arg(script);
    run(cmd, Duration::from_secs(120)).expect("run miltertest")
}

/// What the script sends, as cofferd must hold it: miltertest adds the space after
/// each header's colon (SMFIP_HDR_LEADSPC), the body is sent as is.
fn expected(msgid: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@miltertest.example>\r\n\
         To: one@miltertest.example, two@miltertest.example\r\n\
         Subject: miltertest transaction\r\n\
         Message-ID: <{msgid}@miltertest.example>\r\n\
         \r\n\
         Hello from miltertest.\r\n\
         .leading dot\r\n\
         Last line.\r\n"
    )
    .into_bytes()
}

/// The one message with this Message-ID local part, by `coffer search`.
fn find(m: &MilterNode, msgid: &str) -> Vec<serde_json::Value> {
    m.node
        .search(&["--message-id", &format!("<{msgid}@miltertest.example>")])
}

#[test]
fn miltertest_transaction_is_archived_before_it_continues() {
    let Some(tool) = require_tool("miltertest", "miltertest") else {
        return;
    };
    let mut m = MilterNode::start("timeout = \"20s\"");

    // 1. The full transaction: continue at end-of-message, archived.
    let out = miltertest(&tool, &m, &[("msgid", "mt-one"), ("qid", "MTQ1")]);
    assert!(
        out.code == Some(0) && out.stdout_str().contains("eom accepted"),
        "miltertest failed (its errors are terse; see the logs):\n{out}\n{}",
        m.log_tail()
    );
    let found = find(&m, "mt-one");
    assert_eq!(found.len(), 1, "{found:?}\n{}", m.log_tail());
    let want = expected("mt-one");
    let id = sha256_hex(&want);
    assert_eq!(found[0]["id"], id.as_str(), "{:?}", found[0]);
    assert!(
        m.node.get(&id) == want,
        "bytes differ:\n{}",
        String::from_utf8_lossy(&m.node.get(&id))
    );
    let arrivals = m.node.arrivals(&id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    let a = &arrivals[0];
    assert_eq!(a["listener"], "milter", "{a}");
    assert_eq!(a["queue_id"], "MTQ1", "{a}");
    assert_eq!(a["mail_from"], "sender@miltertest.example", "{a}");
    assert_eq!(
        a["rcpt_to"],
        serde_json::json!(["one@miltertest.example", "two@miltertest.example"]),
        "{a}"
    );
    assert_eq!(
        a["mail_params"],
        serde_json::json!(["BODY=8BITMIME"]),
        "{a}"
    );
    let x = &a["xcoffer"];
    assert_eq!(x["helo"], "client.miltertest.invalid", "{a}");
    assert_eq!(x["client_name"], "client.miltertest.invalid", "{a}");
    assert_eq!(x["auth_user"], "alice", "{a}");
    assert_eq!(x["macros"]["j"], "mx.miltertest.invalid", "{a}");

    // 2. cofferd stopped: the same transaction is tempfailed at end-of-message.
    assert!(m.node.terminate().success(), "{}", m.log_tail());
    let out = miltertest(
        &tool,
        &m,
        &[("msgid", "mt-two"), ("qid", "MTQ2"), ("expect", "tempfail")],
    );
    assert!(
        out.code == Some(0) && out.stdout_str().contains("eom tempfailed"),
        "expected a tempfail with cofferd down:\n{out}\n{}",
        m.log_tail()
    );
    assert!(
        m.milter_log_text().contains("answering 451"),
        "{}",
        m.log_tail()
    );

    // 3. cofferd back: archived again, and the tempfailed one was not.
    m.node.restart();
    let out = miltertest(&tool, &m, &[("msgid", "mt-three"), ("qid", "MTQ3")]);
    assert!(
        out.code == Some(0) && out.stdout_str().contains("eom accepted"),
        "miltertest failed after cofferd came back:\n{out}\n{}",
        m.log_tail()
    );
    assert_eq!(find(&m, "mt-three").len(), 1, "{}", m.log_tail());
    assert!(find(&m, "mt-two").is_empty(), "{}", m.log_tail());
    assert!(m.stop_milter(), "{}", m.log_tail());
}
