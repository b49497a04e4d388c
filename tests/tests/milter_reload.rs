//! coffer-milter's signals: SIGHUP re-reads the `[milter]` section, SIGUSR1 logs the
//! end-of-message latency, and exit logs it too.
//!
//! Proves, against a real cofferd with indymilter-test as the MTA: with cofferd down a
//! message is tempfailed; after the file says `on_failure = "accept"` and SIGHUP, the
//! next message on the *same* MTA connection continues (logged `NOT ARCHIVED`), and a
//! changed `max_connections` is reported as needing a restart; a file that no longer
//! parses is refused on SIGHUP and the running configuration kept; SIGUSR1 logs `eom
//! latency` with the count and failures of the window, and a new window starts; SIGTERM
//! still exits 0.

use std::ffi::CString;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coffer_e2e::milter::LMTP_TOML;
use coffer_e2e::{bin, lossy, wait_until, Node, NodeOptions, START_DEADLINE};
use indymilter_test::{MacroStage, Status, TestConnection};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const MILTER_KEYS: &str = "[milter]\nlisten = \"unix:milter.sock\"\ntarget = \
                           \"unix:lmtp.sock\"\ntimeout = \"5s\"\n";

/// coffer-milter started by this test (its PID is needed for the signals); killed on
/// drop.
struct Milter {
    child: Child,
    log: std::path::PathBuf,
}

impl Milter {
    fn start(node: &Node) -> Milter {
        let log_path = node.dir().join("coffer-milter.log");
        let log = File::create(&log_path).expect("milter log");
        let child = Command::new(bin("coffer-milter"))
            .arg("--config")
            .arg(&node.config_path)
            .current_dir(node.dir())
            .env_remove("COFFER_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn coffer-milter");
        let mut m = Milter {
            child,
            log: log_path,
        };
        let socket = node.dir().join("milter.sock");
        let child = &mut m.child;
        let up = wait_until("coffer-milter to listen", START_DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(format!("exited early: {status}")));
            }
            std::os::unix::net::UnixStream::connect(&socket)
                .is_ok()
                .then_some(Ok(()))
        });
        if !matches!(up, Ok(Ok(()))) {
            panic!("coffer-milter did not start: {up:?}\n{}", m.log_text());
        }
        m
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        kill(pid, sig).expect("signal coffer-milter");
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| lossy(&b))
            .unwrap_or_default()
    }

    /// Waits until the log holds `needle` `n` times or more.
    fn wait_log(&self, needle: &str, n: usize) {
        let found = wait_until(needle, START_DEADLINE, || {
            (self.log_text().matches(needle).count() >= n).then_some(())
        });
        assert!(
            found.is_ok(),
            "no {needle:?} in the log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Milter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(s: Status) {
    assert!(
        matches!(s, Status::Continue | Status::Noreply),
        "expected Continue/Noreply, got {s:?}"
    );
}

/// One small message on `conn`; returns the end-of-message status.
async fn send(conn: &mut TestConnection, qid: &str) -> Status {
    ok(conn.mail(["<sender@example.org>"]).await.unwrap());
    ok(conn.rcpt(["<rcpt@example.net>"]).await.unwrap());
    conn.macros(MacroStage::Data, [("i", qid)]).await.unwrap();
    ok(conn.data().await.unwrap());
    for (name, value) in [("From", " sender@example.org"), ("Subject", qid)] {
        ok(conn
            .header(name, CString::new(value).unwrap())
            .await
            .unwrap());
    }
    ok(conn.eoh().await.unwrap());
    ok(conn.body(b"Hello.\r\n".to_vec()).await.unwrap());
    conn.eom().await.unwrap().1
}

/// Replaces the `[milter]` section (the file's last) with `section`.
fn rewrite_milter_section(config: &Path, section: &str) {
    let text = std::fs::read_to_string(config).expect("read config");
    let head = text.split("[milter]").next().expect("text before [milter]");
    std::fs::write(config, format!("{head}{section}")).expect("write config");
}

#[tokio::test]
async fn sighup_applies_on_failure_and_sigusr1_reports_latency() {
    let mut node = Node::start_with(NodeOptions {
        name: "e2e".into(),
        extra_toml: format!("{LMTP_TOML}\n{MILTER_KEYS}"),
        ..NodeOptions::default()
    });
    let milter = Milter::start(&node);
    let mut conn = TestConnection::configure()
        .exact_leading_space(true)
        .read_timeout(Duration::from_secs(60))
        .open_unix(node.dir().join("milter.sock"))
        .await
        .expect("open a milter connection");
    let client: SocketAddr = "192.0.2.7:40123".parse().unwrap();
    ok(conn.connect("client.example.com", client).await.unwrap());
    ok(conn.helo("client.example.com").await.unwrap());

    // 1. Archived while cofferd runs.
    assert_eq!(send(&mut conn, "QIDUP").await, Status::Continue);
    // SIGUSR1: one message in this window, none failed.
    milter.signal(Signal::SIGUSR1);
    milter.wait_log("eom latency since the last report count=1 failed=0", 1);

    // 2. cofferd down: fail closed.
    assert!(node.terminate().success(), "{}", node.log_tail());
    let status = send(&mut conn, "QIDDOWN").await;
    assert!(
        matches!(status, Status::Tempfail { .. }),
        "{status:?}\n{}",
        milter.log_text()
    );

    // 3. on_failure = "accept" and a new max_connections, then SIGHUP: the first
    // applies to the next message on this very connection, the second needs a restart.
    rewrite_milter_section(
        &node.config_path,
        &format!("{MILTER_KEYS}on_failure = \"accept\"\nmax_connections = 7\n"),
    );
    milter.signal(Signal::SIGHUP);
    milter.wait_log("SIGHUP: applied on_failure: Tempfail -> Accept", 1);
    milter.wait_log("`max_connections` changed", 1);
    assert_eq!(send(&mut conn, "QIDACCEPT").await, Status::Continue);
    milter.wait_log("NOT ARCHIVED", 1);

    // 4. A file that does not parse: refused, the running configuration kept.
    rewrite_milter_section(&node.config_path, "[milter]\non_failure = \"maybe\"\n");
    milter.signal(Signal::SIGHUP);
    milter.wait_log("keeping the running configuration", 1);
    assert_eq!(send(&mut conn, "QIDKEPT").await, Status::Continue);
    milter.wait_log("NOT ARCHIVED", 2);

    // 5. The window since the first report: three messages, all three not archived.
    milter.signal(Signal::SIGUSR1);
    milter.wait_log("eom latency since the last report count=3 failed=3", 1);
    let log = milter.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("count=3 failed=3"))
        .unwrap();
    for key in ["p50_ms=", "p90_ms=", "p99_ms=", "p999_ms=", "max_ms="] {
        assert!(line.contains(key), "{line}");
    }
    conn.close().await.unwrap();

    // 6. SIGTERM: exit 0, with a last (empty) report.
    milter.signal(Signal::SIGTERM);
    let mut milter = milter;
    let child = &mut milter.child;
    let status = wait_until("coffer-milter to exit", START_DEADLINE, || {
        child.try_wait().ok().flatten()
    })
    .expect("coffer-milter exits");
    assert!(status.success(), "{}", milter.log_text());
    assert!(
        milter
            .log_text()
            .contains("eom latency since the last report count=0"),
        "{}",
        milter.log_text()
    );
}
