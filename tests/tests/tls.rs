//! TLS (docs/interfaces.md "TLS", docs/replication.md "TLS"): replication A → B over
//! STARTTLS with client certificates, refused while a certificate is from another CA or
//! for another name, and shipping once the right files are reloaded with SIGHUP;
//! `required = true` and swaks `--tls`; the STARTTLS command injection; check-config.
//! Certificates are made at test time (rcgen) in a temporary folder.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_e2e::tls::{Ca, TlsSmtp};
use coffer_e2e::{bin, free_port, require_tool, run, wait_until, CofferCli, Node, NodeOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long replication or a reload may take to show (probes every second here).
const SETTLE: Duration = Duration::from_secs(120);

fn message(tag: &str) -> Vec<u8> {
    format!(
        "From: s@example.org\r\nTo: r@example.net\r\nSubject: {tag}\r\n\
         Message-ID: <{tag}@example.org>\r\n\r\nBody of {tag}.\r\n"
    )
    .into_bytes()
}

fn sighup(node: &Node) {
    let pid = i32::try_from(node.pid()).expect("pid");
    kill(Pid::from_raw(pid), Signal::SIGHUP).expect("SIGHUP");
}

fn log(node: &Node) -> String {
    String::from_utf8_lossy(&std::fs::read(&node.log_path).unwrap_or_default()).into_owned()
}

/// Waits until `node`'s log contains `text` `times` times or more.
fn wait_log(node: &Node, text: &str, times: usize) {
    let r = wait_until(&format!("{text:?} in the log"), SETTLE, || {
        (log(node).matches(text).count() >= times).then_some(())
    });
    if let Err(e) = r {
        panic!("{e}\n{}", node.log_tail());
    }
}

/// The connection as `coffer queue --json` shows it (with `last_error`).
fn connection(node: &Node) -> serde_json::Value {
    node.coffer_ok(&["queue", "--json"]).json()["connections"][0].clone()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn replication_over_tls_needs_the_right_certificates_and_reloads_them() {
    let pki = tempfile::tempdir().expect("tempdir");
    let dir = pki.path();
    let ca = Ca::new(dir, "cluster");
    let other = Ca::new(dir, "other");
    // B first answers with a certificate for another name; A presents one from another CA.
    let (b_crt, b_key) = ca.issue(dir, "b", "not-b");
    let (a_crt, a_key) = other.issue(dir, "a", "a");

    let (ip_a, ip_b) = ("127.0.0.2", "127.0.0.3");
    let ha_b = free_port(ip_b);
    let b = Node::start_with(NodeOptions {
        name: "b".into(),
        ip: ip_b.into(),
        extra_toml: format!(
            r#"
[[listener]]
name = "ha"
bind = "{ip_b}:{ha_b}"
allow = ["{ip_a}/32", "127.0.0.1/32"]
trust_xcoffer = true
tls = {{ cert = "{}", key = "{}", required = true, require_client_cert = true, client_ca = "{}" }}

[[route]]
from = ["ha"]
"#,
            p(&b_crt),
            p(&b_key),
            p(&ca.path)
        ),
        ..NodeOptions::default()
    });
    let a = Node::start_with(NodeOptions {
        name: "a".into(),
        ip: ip_a.into(),
        extra_toml: format!(
            r#"
[[connection]]
name = "to-b"
peer = "b"
target = "{ip_b}:{ha_b}"
source = "{ip_a}"
probe_interval = "1s"
tls = {{ ca = "{}", cert = "{}", key = "{}" }}

[[route]]
from = ["journal"]
forward = ["to-b"]
"#,
            p(&ca.path),
            p(&a_crt),
            p(&a_key)
        ),
        ..NodeOptions::default()
    });
    let sent = a.send("s@example.org", &["r@example.net"], &message("tls-1"));

    // 1. B's certificate does not name `b`: A refuses it and ships nothing.
    let r = wait_until("A to refuse B's certificate", SETTLE, || {
        let c = connection(&a);
        let e = c["last_error"].as_str().unwrap_or_default().to_owned();
        (e.contains("TLS handshake with `b` failed") && c["state"] == "down").then_some(e)
    });
    let why = r.unwrap_or_else(|e| panic!("{e}: {}\n{}", connection(&a), a.log_tail()));
    assert!(why.contains("not valid for name"), "{why}");
    assert!(log(&a).contains("TLS handshake with `b` failed"));

    // 2. B gets the right certificate (SIGHUP); now B refuses A's, from another CA.
    ca.issue(dir, "b", "b");
    sighup(&b);
    wait_log(&b, "TLS files read again", 1);
    wait_log(&b, "invalid peer certificate", 1);
    assert_eq!(connection(&a)["state"], "down", "{}", connection(&a));
    // A client without a certificate is refused too.
    let bare = TlsSmtp::connect(
        format!("{ip_b}:{ha_b}").parse().unwrap(),
        &ca.path,
        "b",
        None,
        b"",
    )
    .and_then(|mut c| c.command("EHLO bare.test"));
    assert!(bare.is_err(), "{bare:?}");
    assert!(b.search(&[]).is_empty(), "nothing reached B");

    // 3. A gets a certificate from the cluster CA (SIGHUP): the arrival ships, same id.
    ca.issue(dir, "a", "a");
    sighup(&a);
    let copy = wait_until("the arrival on B", SETTLE, || {
        b.search(&[]).first().map(|rec| rec["arrivals"][0].clone())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}\n{}",
            connection(&a),
            a.log_tail(),
            b.log_tail()
        )
    });
    assert_eq!(copy["id"], sent.arrival_id.as_str());
    let arrivals = b.arrivals(&sent.message_id);
    let tls = &arrivals[0]["tls"];
    assert!(
        tls["version"].as_str().unwrap().starts_with("TLSv1."),
        "{tls}"
    );
    assert_eq!(tls["peer_subject"], "CN=a", "{tls}");
    assert_eq!(tls["peer_issuer"], "CN=cluster", "{tls}");
    assert_eq!(tls["peer_verified"], true);
    assert_eq!(connection(&a)["state"], "up");
    assert_eq!(b.get(&sent.message_id), message("tls-1"));
}

#[test]
fn required_tls_swaks_and_the_starttls_injection() {
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(pki.path(), "local");
    let (crt, key) = ca.issue(pki.path(), "server", "localhost");
    let port = free_port("127.0.0.1");
    let node = Node::start_with(NodeOptions {
        name: "t".into(),
        ip: "127.0.0.1".into(),
        extra_toml: format!(
            r#"
[[listener]]
name = "secure"
bind = "127.0.0.1:{port}"
tls = {{ cert = "{}", key = "{}", required = true }}

[[route]]
from = ["secure"]
"#,
            p(&crt),
            p(&key)
        ),
        ..NodeOptions::default()
    });
    let secure: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // In the clear: STARTTLS is offered, MAIL is refused until it is used.
    let mut c = coffer_e2e::SmtpClient::connect(secure).expect("connect");
    c.ehlo("plain.test").expect("EHLO");
    assert!(
        c.extensions.iter().any(|e| e == "STARTTLS"),
        "{:?}",
        c.extensions
    );
    let r = c.mail("s@example.org").expect("MAIL");
    assert_eq!(r.code, 530, "{r}");
    assert!(
        r.text()
            .contains("5.7.0 Must issue a STARTTLS command first"),
        "{r}"
    );
    // The plain journal listener offers no STARTTLS.
    let mut j = node.smtp();
    j.ehlo("plain.test").expect("EHLO");
    assert!(!j.extensions.iter().any(|e| e == "STARTTLS"));

    // Commands an attacker appends behind STARTTLS in the clear are dropped unread.
    let smuggled = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.net>\r\n";
    let mut t = TlsSmtp::connect(secure, &ca.path, "localhost", None, smuggled).expect("STARTTLS");
    let ehlo = t.command("EHLO tls.test").expect("EHLO");
    assert!(
        ehlo.starts_with("250-") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    let r = t.command("RCPT TO:<victim@example.net>").expect("RCPT");
    assert!(
        r.starts_with("503 5.5.1 Need MAIL"),
        "no injected MAIL: {r}"
    );
    assert!(t
        .command("MAIL FROM:<s@example.org>")
        .unwrap()
        .starts_with("250 "));
    assert!(t
        .command("RCPT TO:<r@example.net>")
        .unwrap()
        .starts_with("250 "));
    assert!(t.command("DATA").unwrap().starts_with("354 "));
    let body = "Subject: over tls\r\n\r\nhello\r\n.";
    let r = t.command(body).expect("end of data");
    assert!(r.starts_with("250 2.0.0 Ok: t/"), "{r}");
    let arrival_id = r.split_whitespace().nth(3).unwrap().to_owned();
    let _ = t.command("QUIT");

    // swaks --tls.
    if let Some(swaks) = require_tool("swaks", "swaks") {
        let mut cmd = Command::new(swaks);
        cmd.args([
            "--server",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--tls",
        ])
        .args(["--from", "swaks@example.org", "--to", "r@example.net"])
        .args([
            "--ehlo",
            "swaks.test",
            "--header",
            "Subject: swaks over tls",
        ]);
        let out = run(cmd, Duration::from_secs(60)).expect("swaks");
        assert_eq!(out.code, Some(0), "swaks --tls: {out}");
    }

    let recs = node.search(&[]);
    let all: Vec<&serde_json::Value> = recs
        .iter()
        .flat_map(|r| r["arrivals"].as_array().unwrap())
        .collect();
    assert!(
        all.iter().all(|a| a["mail_from"] != "evil@attacker.test"),
        "{all:?}"
    );
    let ours = all
        .iter()
        .find(|a| a["id"] == arrival_id.as_str())
        .expect("the TLS arrival");
    assert_eq!(ours["listener"], "secure");
    let message = recs
        .iter()
        .find(|r| {
            r["arrivals"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == arrival_id.as_str())
        })
        .unwrap();
    let envelope = node.arrivals(message["id"].as_str().unwrap());
    assert!(
        envelope[0]["tls"]["version"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1."),
        "{envelope:?}"
    );
    assert!(envelope[0]["tls"].get("peer_subject").is_none());
}

#[test]
fn check_config_names_bad_tls_files_and_warns_about_trusted_listeners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "peers");
    let (crt, key) = ca.issue(dir.path(), "node", "n1");
    let check = |name: &str, listener_tls: &str, strict: bool| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[node]\nname = \"n1\"\ndata_dir = \"data\"\n\n[[listener]]\nname = \"ha\"\n\
                 bind = \"127.0.0.1:8091\"\ntrust_xcoffer = true\n{listener_tls}\n\
                 [[route]]\nfrom = [\"ha\"]\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin("cofferd"));
        cmd.arg("check-config").arg("--config").arg(&path);
        if strict {
            cmd.arg("--strict");
        }
        run(cmd, Duration::from_secs(60)).expect("cofferd check-config")
    };
    // Trusted TCP listener without client certificates: a warning; --strict fails.
    let out = check("open", "", false);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stderr_str().contains("warning: listener `ha`")
            && out.stderr_str().contains("require_client_cert"),
        "{out}"
    );
    assert_eq!(check("open", "", true).code, Some(2));
    let server_only = format!("tls = {{ cert = \"{}\", key = \"{}\" }}", p(&crt), p(&key));
    assert_eq!(check("server-only", &server_only, true).code, Some(2));
    // With client certificates required: no warning, --strict passes.
    let good = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", required = true, require_client_cert = true, \
         client_ca = \"{}\" }}",
        p(&crt),
        p(&key),
        p(&ca.path)
    );
    let out = check("good", &good, true);
    assert_eq!(out.code, Some(0), "{out}");
    assert!(!out.stderr_str().contains("warning"), "{out}");
    // Unreadable or unusable files: errors naming the listener, the key and the file.
    for (bad, key_name, file) in [
        (
            good.replace(&p(&crt), "missing.crt"),
            "`tls.cert`",
            "missing.crt",
        ),
        (good.replace(&p(&key), &p(&crt)), "`tls.key`", "node.crt"),
        (
            good.replace(&p(&ca.path), &p(&key)),
            "`tls.client_ca`",
            "node.key",
        ),
    ] {
        let out = check("bad", &bad, false);
        assert_eq!(out.code, Some(2), "{out}");
        let err = out.stderr_str();
        assert!(
            err.contains("bad.toml")
                && err.contains("listener `ha`")
                && err.contains(key_name)
                && err.contains(file),
            "{out}"
        );
    }
}
