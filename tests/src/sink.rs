//! Postfix's `smtp-sink` as a replication peer that does not speak XCOFFER (plain mode),
//! with its fault options: `-r CMD` answers 4xx to a command, `-f CMD` 5xx, `-q CMD`
//! disconnects without a reply (smtp-sink(1)). Every message it accepts is dumped to a
//! file (`-d`), so a test can tell what arrived.
//!
//! The sink keeps its port across [`SmtpSink::swap`]s, so a connection's `target` stays
//! valid while the peer's behaviour changes. It is killed by PID on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{free_port, greets, wait_until, START_DEADLINE};

/// A running `smtp-sink` on a loopback address.
pub struct SmtpSink {
    tool: PathBuf,
    /// The loopback address it listens on (127.0.0.1 unless [`SmtpSink::start_on`]).
    pub ip: String,
    pub port: u16,
    /// Where accepted messages are dumped, one file each (writable by `nobody`).
    pub dump_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl SmtpSink {
    /// Starts `smtp-sink` (found at `tool`) with the fault options `opts` (e.g.
    /// `["-r", "RCPT"]`) on a free port of 127.0.0.1, dumping into a new folder inside
    /// `dir` (`sink-dump-IP-PORT`).
    ///
    /// # Panics
    /// The sink does not greet within [`START_DEADLINE`].
    pub fn start(tool: &Path, dir: &Path, opts: &[&str]) -> SmtpSink {
        Self::start_on(tool, dir, "127.0.0.1", free_port("127.0.0.1"), opts)
    }

    /// Like [`SmtpSink::start`], on `ip:port` (e.g. `127.0.0.4:25`, where an open relay
    /// would deliver mail for `user@[127.0.0.4]`),
    ///
    /// # Panics
    /// The sink does not greet within [`START_DEADLINE`].
    pub fn start_on(tool: &Path, dir: &Path, ip: &str, port: u16, opts: &[&str]) -> SmtpSink {
        let dump_dir = dir.join(format!("sink-dump-{ip}-{port}"));
        fs::create_dir_all(&dump_dir).expect("dump dir");
        // As root, smtp-sink runs as `nobody` (-u): it must reach and write the folder.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        fs::set_permissions(&dump_dir, fs::Permissions::from_mode(0o777)).expect("chmod dump");
        let mut sink = SmtpSink {
            tool: tool.to_path_buf(),
            ip: ip.to_owned(),
            port,
            dump_dir,
            log: dir.join(format!("smtp-sink-{ip}-{port}.log")),
            child: None,
        };
        sink.spawn(opts);
        sink
    }

    /// `IP:PORT`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// Replaces the running sink by one with `opts`, on the same port.
    ///
    /// # Panics
    /// The new sink does not greet within [`START_DEADLINE`].
    pub fn swap(&mut self, opts: &[&str]) {
        self.stop();
        self.spawn(opts);
    }

    /// Kills the sink (by PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn spawn(&mut self, opts: &[&str]) {
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("sink log");
        let mut cmd = Command::new(&self.tool);
        if nix::unistd::geteuid().is_root() {
            cmd.args(["-u", "nobody"]);
        }
        // -d: one file per accepted message, named by the template (strftime + random).
        let template = format!("{}/%H%M%S.", self.dump_dir.display());
        cmd.args(opts)
            .args(["-d", &template])
            .arg(self.addr())
            .arg("64")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn smtp-sink"));
        let addr = self.addr().parse().expect("sink addr");
        let child = self.child.as_mut().expect("sink");
        let up = wait_until("smtp-sink to greet", START_DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(status));
            }
            greets(addr).then_some(Ok(()))
        });
        match up {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!(
                "smtp-sink {opts:?} exited: {status}\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            ),
            Err(e) => panic!("{e}\n{}", fs::read_to_string(&self.log).unwrap_or_default()),
        }
    }

    /// The contents of every message the sink accepted so far (smtp-sink's own headers
    /// first, then the message).
    pub fn dumped(&self) -> Vec<String> {
        let Ok(dir) = fs::read_dir(&self.dump_dir) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .take(100_000)
            .filter_map(|e| fs::read(e.path()).ok())
            .map(|b| crate::lossy(&b))
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}
