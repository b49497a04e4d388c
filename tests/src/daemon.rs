//! A `cofferd` started from a configuration the test writes in full, for scenarios that
//! [`Node`](crate::Node)'s generated config cannot express: LMTP on a Unix socket, a
//! `[store]` section with other limits, a `[console]`, several listeners, a config file
//! rewritten before SIGHUP.
//!
//! Also the console's HTTP client ([`http_get`]) and a reader for Prometheus text
//! ([`metric`]).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{lossy, wait_until, CofferCli, START_DEADLINE};

/// Where the daemon is known to be up: it greets with 220 there.
#[derive(Clone, Debug)]
pub enum Probe {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// One `cofferd` with a temp directory holding `coffer.toml`, the daemon's log
/// (`cofferd.log`) and whatever the config puts there (`data/` by convention).
///
/// Dropping it SIGKILLs the daemon (if running) and removes the directory, unless
/// `COFFER_E2E_KEEP=1`.
pub struct Daemon {
    dir: Option<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub probe: Probe,
    child: Option<Child>,
}

impl Daemon {
    /// Creates a temp dir, asks `make(dir)` for the config text and the probe, writes the
    /// config and starts `cofferd`, waiting until the probe greets with 220. `make` is
    /// called again (up to 3 attempts in all) when the daemon does not come up, so a
    /// config with freshly picked ports survives a lost port race.
    ///
    /// # Panics
    /// The daemon did not come up in any attempt (the log is printed).
    pub fn launch(mut make: impl FnMut(&Path) -> (String, Probe)) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("coffer-e2e-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut d = Daemon {
            config_path: root.join("coffer.toml"),
            log_path: root.join("cofferd.log"),
            dir: Some(dir),
            probe: Probe::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            child: None,
        };
        let mut last = None;
        for _ in 0..3 {
            let (toml, probe) = make(&root);
            d.probe = probe;
            d.write_config(&toml);
            match d.try_start() {
                Ok(()) => return d,
                Err(e) => last = Some(e),
            }
        }
        panic!(
            "cofferd did not start: {:#}\n{}",
            last.unwrap(),
            d.log_tail()
        );
    }

    /// The temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("daemon dir").path()
    }

    /// Replaces the config file (e.g. before a SIGHUP).
    pub fn write_config(&self, toml: &str) {
        fs::write(&self.config_path, toml).expect("write coffer.toml");
    }

    fn try_start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "cofferd already running");
        let probe = self.probe.clone();
        let child = crate::start_cofferd(
            &self.config_path,
            self.dir(),
            &self.log_path,
            &format!("({probe:?})"),
            || greets(&probe),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts the daemon again on the same config and store (after [`Daemon::kill9`] or
    /// [`Daemon::terminate`]), waiting until it greets.
    ///
    /// # Panics
    /// It did not come up within [`START_DEADLINE`].
    pub fn restart(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("cofferd did not restart: {e:#}\n{}", self.log_tail());
        }
    }

    /// PID of the running daemon.
    ///
    /// # Panics
    /// The daemon is stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("cofferd is running").id()
    }

    /// True while the daemon process has not exited.
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits i32"));
        kill(pid, sig).expect("signal cofferd");
    }

    /// Sends SIGHUP and waits until the log shows the reload was handled: either
    /// "configuration reloaded" or "configuration has errors" one more time than before.
    /// Returns the log lines added since the signal.
    ///
    /// # Panics
    /// The daemon did not handle the signal within 20 s.
    pub fn sighup(&self) -> String {
        let before = self.log_text();
        let handled = |t: &str| {
            t.matches("SIGHUP: configuration reloaded").count()
                + t.matches("SIGHUP: the configuration has errors").count()
        };
        let n = handled(&before);
        self.signal(Signal::SIGHUP);
        let r = wait_until("cofferd to handle SIGHUP", Duration::from_secs(20), || {
            let now = self.log_text();
            (handled(&now) > n).then(|| now.get(before.len()..).unwrap_or("").to_owned())
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()))
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to [`START_DEADLINE`]) for a graceful exit.
    ///
    /// # Panics
    /// The daemon did not stop in time (it is SIGKILLed then).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        let mut child = self.child.take().expect("cofferd is running");
        let status = wait_until("cofferd to exit after SIGTERM", START_DEADLINE, || {
            child.try_wait().ok().flatten()
        });
        match status {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}\n{}", self.log_tail());
            }
        }
    }

    /// `(messages, arrivals)` from `coffer status --json`.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.status();
        (
            s["messages"].as_u64().expect("status.messages"),
            s["arrivals"].as_u64().expect("status.arrivals"),
        )
    }

    /// The whole log as text.
    pub fn log_text(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| lossy(&b))
            .unwrap_or_default()
    }

    /// The last 60 lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(60);
        format!(
            "---- cofferd log (last lines) ----\n{}",
            lines[start..].join("\n")
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::env::var_os("COFFER_E2E_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("e2e: keeping {}", d.keep().display());
            }
        }
    }
}

/// True when the probe accepts a connection and greets with `220`.
fn greets(probe: &Probe) -> bool {
    let first_line = |r: &mut dyn Read| {
        let mut line = Vec::new();
        let mut r = BufReader::new(r.take(4096));
        matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) && line.starts_with(b"220")
    };
    match probe {
        Probe::Tcp(addr) => {
            let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(500)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            first_line(&mut s)
        }
        Probe::Unix(path) => {
            let Ok(mut s) = UnixStream::connect(path) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            first_line(&mut s)
        }
    }
}

/// A plain HTTP/1.1 `GET path` to the console; returns the status code and the body.
/// Reads until the server closes (it always does: `Connection: close`), at most 4 MiB.
///
/// # Errors
/// Connecting, a timeout, or a response that is not HTTP.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to the console at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(4 << 20).read_to_end(&mut raw)?;
    let text = lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no end of the response head: {text:?}");
    };
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The value of the sample `series` (the metric name with its labels exactly as
/// rendered, e.g. `coffer_refusals_total{listener="a",reason="max_pending"}`) in a
/// Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// A free loopback TCP address (bound and released: a small race, covered by
/// [`Daemon::launch`]'s retries).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], crate::free_port("127.0.0.1")))
}

/// What [`smtp_daemon`] started: the daemon, its SMTP listener `journal`, and its console
/// when one was asked for.
pub struct Launched {
    pub daemon: Daemon,
    pub smtp: SocketAddr,
    pub console: Option<SocketAddr>,
}

/// A daemon with one SMTP listener `journal` on a free loopback port, `store` as the
/// body of its `[store]` section, `listener` appended to the listener's keys, and a
/// `[console]` on another free port when `console` is true.
pub fn smtp_daemon(store: &str, listener: &str, console: bool) -> Launched {
    let mut picked = (free_addr(), None);
    let daemon = Daemon::launch(|_| {
        let smtp = free_addr();
        let con = console.then(free_addr);
        picked = (smtp, con);
        let console_toml = con
            .map(|a| format!("\n[console]\nbind = \"{a}\"\n"))
            .unwrap_or_default();
        let toml = format!(
            r#"[node]
name = "e2e"
data_dir = "data"

[store]
{store}

[[listener]]
name = "journal"
protocol = "smtp"
bind = "{smtp}"
{listener}

[[route]]
from = ["journal"]
{console_toml}"#
        );
        (toml, Probe::Tcp(smtp))
    });
    Launched {
        daemon,
        smtp: picked.0,
        console: picked.1,
    }
}

impl CofferCli for Daemon {
    fn cli_config(&self) -> &Path {
        &self.config_path
    }
    fn cli_dir(&self) -> &Path {
        self.dir()
    }
    fn cli_log_tail(&self) -> String {
        self.log_tail()
    }
}
