//! coffer-milter against a real cofferd, driven by indymilter-test as the MTA.
//!
//! Proves: the archived bytes are the headers rebuilt exactly as the MTA passed them
//! (leading space kept, folded values' bare LF → CRLF, 8-bit untouched), a CRLF, then
//! the body; the arrival carries the envelope (every recipient) and the queue id;
//! several messages per milter connection; an abort mid-message (after a BDAT chunk
//! went out) archives nothing and leaves the connection usable; cofferd down →
//! `451 4.3.0` (or Continue with `on_failure = "accept"`), and back up → archived;
//! `add_header` adds `X-Coffer-Archived: <message id>`.

use std::ffi::CString;
use std::net::SocketAddr;
use std::time::Duration;

use coffer_e2e::milter::MilterNode;
use coffer_e2e::sha256_hex;
use coffer_e2e::CofferCli;
use indymilter_test::{MacroStage, Status, TestConnection};

/// One message as the MTA hands it over.
struct Mail {
    from: &'static str,
    rcpts: Vec<String>,
    queue_id: String,
    /// Name and value exactly as passed (leading space included).
    headers: Vec<(&'static str, Vec<u8>)>,
    /// Body chunks.
    body: Vec<Vec<u8>>,
}

impl Mail {
    fn simple(queue_id: &str, subject: &str) -> Mail {
        Mail {
            from: "<sender@example.org>",
            rcpts: vec!["<rcpt@example.net>".into()],
            queue_id: queue_id.into(),
            headers: vec![
                ("From", b" sender@example.org".to_vec()),
                ("To", b" rcpt@example.net".to_vec()),
                ("Subject", format!(" {subject}").into_bytes()),
            ],
            body: vec![b"Hello.\r\n".to_vec()],
        }
    }

    /// The bytes cofferd must hold, rebuilt here independently of the milter's code.
    fn expected(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, value) in &self.headers {
            v.extend_from_slice(name.as_bytes());
            v.push(b':');
            let mut prev = 0;
            for &b in value {
                if b == b'\n' && prev != b'\r' {
                    v.push(b'\r');
                }
                v.push(b);
                prev = b;
            }
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"\r\n");
        for c in &self.body {
            v.extend_from_slice(c);
        }
        v
    }
}

async fn open(m: &MilterNode) -> TestConnection {
    let mut conn = TestConnection::configure()
        .exact_leading_space(true)
        .read_timeout(Duration::from_secs(60))
        .open_unix(&m.milter_socket)
        .await
        .expect("open a milter connection");
    let client: SocketAddr = "192.0.2.7:40123".parse().unwrap();
    conn.macros(
        MacroStage::Connect,
        [("j", "mx.example.org"), ("{daemon_name}", "smtpd")],
    )
    .await
    .unwrap();
    ok(conn.connect("client.example.com", client).await.unwrap());
    ok(conn.helo("client.example.com").await.unwrap());
    conn
}

fn ok(s: Status) {
    assert!(
        matches!(s, Status::Continue | Status::Noreply),
        "expected Continue/Noreply, got {s:?}"
    );
}

/// Sends everything up to (not including) end-of-message.
async fn send_until_eom(conn: &mut TestConnection, mail: &Mail) {
    conn.macros(MacroStage::Mail, [("{auth_authen}", "alice")])
        .await
        .unwrap();
    ok(conn.mail([mail.from, "BODY=8BITMIME"]).await.unwrap());
    for r in &mail.rcpts {
        conn.macros(MacroStage::Rcpt, [("{rcpt_mailer}", "smtp")])
            .await
            .unwrap();
        ok(conn.rcpt([r.as_str()]).await.unwrap());
    }
    conn.macros(MacroStage::Data, [("i", mail.queue_id.as_str())])
        .await
        .unwrap();
    ok(conn.data().await.unwrap());
    for (name, value) in &mail.headers {
        let value = CString::new(value.clone()).expect("no NUL in test headers");
        ok(conn.header(*name, value).await.unwrap());
    }
    ok(conn.eoh().await.unwrap());
    for chunk in &mail.body {
        ok(conn.body(chunk.clone()).await.unwrap());
    }
}

async fn send(conn: &mut TestConnection, mail: &Mail) -> (indymilter_test::EomActions, Status) {
    send_until_eom(conn, mail).await;
    conn.eom().await.unwrap()
}

/// Checks that `mail` is archived byte-exact with its envelope and queue id, once.
fn assert_archived(m: &MilterNode, mail: &Mail) -> String {
    let want = mail.expected();
    let id = sha256_hex(&want);
    let got = m.node.get(&id);
    assert!(
        got == want,
        "archived bytes differ for {id}\n{}",
        m.log_tail()
    );
    let arrivals = m.node.arrivals(&id);
    assert_eq!(arrivals.len(), 1, "{arrivals:?}");
    let a = &arrivals[0];
    let text = a.to_string();
    assert_eq!(a["listener"], "milter", "{text}");
    assert_eq!(a["queue_id"], mail.queue_id.as_str(), "{text}");
    let from = mail.from.trim_start_matches('<').trim_end_matches('>');
    assert_eq!(a["mail_from"], from, "{text}");
    let rcpts: Vec<String> = mail
        .rcpts
        .iter()
        .map(|r| r.trim_start_matches('<').trim_end_matches('>').to_owned())
        .collect();
    assert_eq!(a["rcpt_to"], serde_json::json!(rcpts), "{text}");
    // Macros of every stage reach XCOFFER: connect, mail, data.
    let x = &a["xcoffer"];
    assert_eq!(x["macros"]["j"], "mx.example.org", "{text}");
    assert_eq!(x["macros"]["{daemon_name}"], "smtpd", "{text}");
    assert_eq!(x["auth_user"], "alice", "{text}");
    assert_eq!(x["queue_id"], mail.queue_id.as_str(), "{text}");
    id
}

#[tokio::test]
async fn headers_and_body_are_archived_exactly() {
    let m = MilterNode::start("");
    let mut conn = open(&m).await;
    let mail = Mail {
        from: "<s\u{e9}nder@example.org>",
        rcpts: vec![
            "<a@example.net>".into(),
            "<b@example.net>".into(),
            "<c@example.com>".into(),
        ],
        queue_id: "4Xyz1A2b3C".into(),
        headers: vec![
            ("Received", b" from client.example.com (client.example.com [192.0.2.7])\n\tby relay.example.org with ESMTP id 1234\n\tfor <a@example.net>; Tue, 1 Oct 2024 10:00:00 +0000".to_vec()),
            ("From", b" =?utf-8?q?S=C3=A9nder?= <sender@example.org>".to_vec()),
            ("To", b"   a@example.net,\n b@example.net".to_vec()),
            ("Subject", b" caf\xe9 \xc3\xa9t\xc3\xa9 \xff".to_vec()),
            ("X-No-Space", b"value".to_vec()),
            ("X-Tab", b"\tvalue".to_vec()),
            ("X-Empty", Vec::new()),
            ("X-Trailing", b" value  ".to_vec()),
        ],
        body: vec![
            b"First line\r\n".to_vec(),
            b"8-bit: \xe9\xe8\xff\r\n.leading dot\r\n".to_vec(),
            b"no final newline".to_vec(),
        ],
    };
    let (actions, status) = send(&mut conn, &mail).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    assert!(actions.actions.is_empty(), "no header without add_header");
    assert_archived(&m, &mail);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn empty_body_and_two_messages_on_one_connection() {
    let m = MilterNode::start("");
    let mut conn = open(&m).await;
    let mut first = Mail::simple("QID0001", "first");
    first.body.clear();
    let (_, status) = send(&mut conn, &first).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    let mut second = Mail::simple("QID0002", "second");
    second.rcpts = vec!["<x@example.net>".into(), "<y@example.net>".into()];
    let (_, status) = send(&mut conn, &second).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    conn.close().await.unwrap();
    assert!(first.expected().ends_with(b"first\r\n\r\n"));
    assert_archived(&m, &first);
    assert_archived(&m, &second);
    assert_eq!(m.node.status()["arrivals"], 2);
}

#[tokio::test]
async fn a_big_message_streams_in_chunks() {
    let m = MilterNode::start("");
    let mut conn = open(&m).await;
    let mut mail = Mail::simple("QIDBIG", "big");
    // 3.5 MiB in 64 KiB chunks: several BDAT chunks before the last one.
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\xe9\xe9\r\n";
    let mut body = Vec::new();
    while body.len() < 3 * 1024 * 1024 + 512 * 1024 {
        body.extend_from_slice(line);
    }
    mail.body = body.chunks(65535).map(<[u8]>::to_vec).collect();
    let (_, status) = send(&mut conn, &mail).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    assert_archived(&m, &mail);
}

#[tokio::test]
async fn abort_mid_message_archives_nothing_and_the_connection_goes_on() {
    let m = MilterNode::start("");
    let mut conn = open(&m).await;
    let mut aborted = Mail::simple("QIDABORT", "aborted");
    // Over one BDAT chunk, so a transaction is open at cofferd when the abort comes.
    aborted.body = vec![
        vec![b'x'; 700 * 1024],
        b"\r\n".to_vec(),
        vec![b'y'; 700 * 1024],
    ];
    send_until_eom(&mut conn, &aborted).await;
    conn.abort().await.unwrap();
    let next = Mail::simple("QIDNEXT", "after the abort");
    let (_, status) = send(&mut conn, &next).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    conn.close().await.unwrap();
    assert_archived(&m, &next);
    let status = m.node.status();
    assert_eq!(status["messages"], 1, "{status}");
    assert_eq!(status["arrivals"], 1, "{status}");
}

#[tokio::test]
async fn cofferd_down_tempfails_and_back_up_archives() {
    let mut m = MilterNode::start("timeout = \"5s\"");
    let mut conn = open(&m).await;
    // One message first, so the pool holds a connection that the stop then breaks.
    let warm = Mail::simple("QIDWARM", "warm");
    let (_, status) = send(&mut conn, &warm).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());

    m.node.terminate();
    let mail = Mail::simple("QIDDOWN", "while cofferd is down");
    let (_, status) = send(&mut conn, &mail).await;
    match &status {
        Status::Tempfail { message: Some(msg) } => {
            let msg = msg.to_string_lossy();
            assert!(msg.starts_with("451 4.3.0 archive"), "{msg}");
        }
        other => panic!("expected a 451 tempfail, got {other:?}\n{}", m.log_tail()),
    }

    m.node.restart();
    // The MTA retries the same message: archived once.
    let (_, status) = send(&mut conn, &mail).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    conn.close().await.unwrap();
    assert_archived(&m, &mail);
    assert_archived(&m, &warm);
}

#[tokio::test]
async fn on_failure_accept_lets_mail_through_unarchived() {
    let mut m = MilterNode::start("on_failure = \"accept\"\ntimeout = \"5s\"");
    m.node.terminate();
    let mut conn = open(&m).await;
    let (_, status) = send(&mut conn, &Mail::simple("QIDACC", "accepted")).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    conn.close().await.unwrap();
    assert!(
        m.milter_log_text().contains("NOT ARCHIVED"),
        "{}",
        m.log_tail()
    );
}

#[tokio::test]
async fn add_header_names_the_message_id() {
    let m = MilterNode::start("add_header = true");
    let mut conn = open(&m).await;
    let mail = Mail::simple("QIDHDR", "with header");
    let (actions, status) = send(&mut conn, &mail).await;
    assert_eq!(status, Status::Continue, "{}", m.log_tail());
    let id = sha256_hex(&mail.expected());
    assert!(
        actions.has_add_header("X-Coffer-Archived", format!(" {id}").as_str()),
        "{actions:?}"
    );
    conn.close().await.unwrap();
    assert_archived(&m, &mail);
}

#[tokio::test]
async fn sigterm_removes_the_socket() {
    let mut m = MilterNode::start("");
    assert!(m.milter_socket.exists());
    assert!(m.stop_milter(), "{}", m.log_tail());
    assert!(!m.milter_socket.exists(), "socket left behind");
}
