//! A throwaway Postfix instance for end-to-end tests: its own `config_directory`,
//! `queue_directory` and `data_directory` in a temp dir, smtpd on a free port of
//! 127.0.0.1, relaying everything to an `smtp-sink` on another free port, and
//! `smtpd_milters`/`non_smtpd_milters` pointing at a milter socket.
//!
//! Not chrooted (master.cf chroot column `n`) so absolute socket paths work; production
//! Debian chroots smtpd and cleanup (docs/milter.md). Needs root (Postfix's own
//! user/ownership checks), like bench/ingest.sh. Stopped with `postfix -c DIR stop` on
//! drop, then its master is waited for by PID; the sink is killed by PID.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{free_port, run, wait_until, CmdOutput, START_DEADLINE};

/// A running throwaway Postfix and its smtp-sink.
pub struct Postfix {
    dir: Option<tempfile::TempDir>,
    pub smtpd_port: u16,
    pub sink_port: u16,
    sink: Option<Child>,
    started: bool,
}

impl Postfix {
    /// Writes main.cf/master.cf, starts smtp-sink and Postfix, and waits until smtpd
    /// greets. `milter_socket` goes into `smtpd_milters` and `non_smtpd_milters` in the
    /// per-milter form with `default_action=tempfail`.
    ///
    /// # Panics
    /// Postfix or the sink did not come up (the Postfix log is printed).
    pub fn start(milter_socket: &Path) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("coffer-postfix-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        // Postfix's daemons run as user postfix and must get in.
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["etc", "spool", "data"] {
            fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let status = Command::new("chown")
            .args(["postfix:", &d.join("data").display().to_string()])
            .status()
            .expect("chown");
        assert!(status.success(), "chown postfix data dir");
        let mut pf = Postfix {
            dir: Some(dir),
            smtpd_port: free_port("127.0.0.1"),
            sink_port: free_port("127.0.0.1"),
            sink: None,
            started: false,
        };
        pf.start_sink();
        pf.write_config(milter_socket);
        let out = pf.postfix(&["check"]);
        assert_eq!(
            out.code,
            Some(0),
            "postfix check:\n{out}\n{}",
            pf.log_tail()
        );
        let out = pf.postfix(&["start"]);
        pf.started = true;
        assert_eq!(
            out.code,
            Some(0),
            "postfix start:\n{out}\n{}",
            pf.log_tail()
        );
        let port = pf.smtpd_port;
        if let Err(e) = wait_until("Postfix smtpd to greet", START_DEADLINE, || {
            greets(port).then_some(())
        }) {
            panic!("{e}\n{}", pf.log_tail());
        }
        pf
    }

    /// The temp directory (config in `etc/`, queue in `spool/`, log in `maillog`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir().join("etc")
    }

    fn start_sink(&mut self) {
        let log = fs::File::create(self.dir().join("smtp-sink.log")).expect("sink log");
        // Every message the sink accepts is dumped to a file of its own (`-d`, as user
        // nobody): what Postfix delivered, for tests that compare it with the archive.
        let dump = self.sink_dump_dir();
        fs::create_dir_all(&dump).expect("sink dump dir");
        fs::set_permissions(&dump, fs::Permissions::from_mode(0o777)).expect("chmod dump");
        let template = format!("{}/%H%M%S.", dump.display());
        let child = Command::new(crate::find_tool("smtp-sink").expect("smtp-sink"))
            .args([
                "-u",
                "nobody",
                "-d",
                &template,
                &format!("127.0.0.1:{}", self.sink_port),
                "100",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn smtp-sink");
        self.sink = Some(child);
        let port = self.sink_port;
        wait_until("smtp-sink to greet", START_DEADLINE, || {
            greets(port).then_some(())
        })
        .expect("smtp-sink up");
    }

    fn write_config(&self, milter_socket: &Path) {
        let d = self.dir();
        let milter = format!(
            "{{ unix:{}, default_action=tempfail }}",
            milter_socket.display()
        );
        let main_cf = format!(
            "# Throwaway instance for the coffer-milter e2e tests.
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = mx.e2e.invalid
mydomain = e2e.invalid
myorigin = e2e.invalid
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink}
smtp_tls_security_level = none
# Loopback tests would otherwise see Message-Id/Date added for the local client.
local_header_rewrite_clients =
message_size_limit = 104857600
biff = no
smtputf8_enable = no
# coffer-milter, last in the list, failing closed.
milter_protocol = 6
smtpd_milters = {milter}
non_smtpd_milters = {milter}
milter_connect_timeout = 30s
milter_command_timeout = 30s
milter_content_timeout = 300s
",
            d = d.display(),
            sink = self.sink_port,
        );
        let master_cf = format!(
            "# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:{port} inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
",
            port = self.smtpd_port
        );
        fs::write(d.join("etc/main.cf"), main_cf).expect("main.cf");
        fs::write(d.join("etc/master.cf"), master_cf).expect("master.cf");
    }

    /// Runs `postfix -c DIR ARGS`.
    pub fn postfix(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(crate::find_tool("postfix").expect("postfix"));
        cmd.arg("-c").arg(self.config_dir()).args(args);
        run(cmd, Duration::from_secs(120)).expect("run postfix")
    }

    fn sink_dump_dir(&self) -> PathBuf {
        self.dir().join("sink-dump")
    }

    /// Every message the sink accepted so far (smtp-sink's own headers first, then the
    /// message as Postfix delivered it).
    pub fn sink_dumped(&self) -> Vec<Vec<u8>> {
        let Ok(dir) = fs::read_dir(self.sink_dump_dir()) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .take(100_000)
            .filter_map(|e| fs::read(e.path()).ok())
            .collect()
    }

    /// Runs `postqueue -c DIR ARGS`.
    pub fn postqueue(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(crate::find_tool("postqueue").expect("postqueue"));
        cmd.arg("-c").arg(self.config_dir()).args(args);
        run(cmd, Duration::from_secs(120)).expect("run postqueue")
    }

    /// Asks Postfix to deliver its deferred mail now (`postqueue -f`) and waits until its
    /// queue is empty (`postqueue -p` says so), flushing again every few seconds.
    ///
    /// # Panics
    /// The queue did not empty within `deadline` (the queue and the log are printed).
    pub fn flush_until_empty(&self, deadline: Duration) {
        let mut last_flush = std::time::Instant::now();
        let _ = self.postqueue(&["-f"]);
        let r = wait_until("Postfix's queue to empty", deadline, || {
            if last_flush.elapsed() > Duration::from_secs(5) {
                let _ = self.postqueue(&["-f"]);
                last_flush = std::time::Instant::now();
            }
            self.postqueue(&["-p"])
                .stdout_str()
                .contains("Mail queue is empty")
                .then_some(())
        });
        if let Err(e) = r {
            panic!(
                "{e}
{}
{}",
                self.postqueue(&["-p"]),
                self.log_tail()
            );
        }
    }

    /// The last 60 lines of Postfix's log.
    pub fn log_tail(&self) -> String {
        let text = fs::read(self.dir().join("maillog"))
            .map(|b| crate::lossy(&b))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(60);
        format!(
            "---- postfix maillog (last lines) ----\n{}",
            lines[start..].join("\n")
        )
    }

    /// Stops Postfix (and waits for its master by PID) and the sink.
    pub fn stop(&mut self) {
        if self.started {
            self.started = false;
            let master = fs::read_to_string(self.dir().join("spool/pid/master.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            let _ = self.postfix(&["stop"]);
            if let Some(pid) = master {
                let pid = Pid::from_raw(pid);
                let gone = wait_until("Postfix master to exit", START_DEADLINE, || {
                    kill(pid, None).is_err().then_some(())
                });
                if gone.is_err() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
        }
        if let Some(mut sink) = self.sink.take() {
            let _ = sink.kill();
            let _ = sink.wait();
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("COFFER_E2E_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("e2e: keeping {}", d.keep().display());
            }
        }
    }
}

fn greets(port: u16) -> bool {
    use std::io::{BufRead, BufReader, Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = Vec::new();
    let ok = matches!(
        BufReader::new((&s).take(4096)).read_until(b'\n', &mut line),
        Ok(n) if n > 0
    ) && line.starts_with(b"220");
    let _ = s.write_all(b"QUIT\r\n");
    ok
}
