//! A `cofferd` with the milter's trusted LMTP listener, plus a running `coffer-milter`
//! handing off to it: the set-up of the `milter_*` scenarios.
//!
//! Both read the same `coffer.toml` in the node's temp dir (cofferd its listeners,
//! coffer-milter its `[milter]` section); both sockets live in that dir:
//! `lmtp.sock` (cofferd, `trust_xcoffer = true`) and `milter.sock` (coffer-milter).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{bin, lossy, wait_until, Node, NodeOptions, START_DEADLINE};

/// The cofferd side: an LMTP listener trusted for XCOFFER, archived by a route.
pub const LMTP_TOML: &str = r#"
[[listener]]
name = "milter"
protocol = "lmtp"
bind = "unix:lmtp.sock"
trust_xcoffer = true
socket_mode = 0o600

[[route]]
from = ["milter"]
archive = true
forward = []
"#;

/// A node and a milter handing off to it.
pub struct MilterNode {
    pub node: Node,
    pub milter_socket: PathBuf,
    pub milter_log: PathBuf,
    child: Option<Child>,
}

impl MilterNode {
    /// Starts cofferd (with [`LMTP_TOML`]) and coffer-milter with the `[milter]` keys in
    /// `milter_keys` added to `listen = "unix:milter.sock"` and `target =
    /// "unix:lmtp.sock"`.
    ///
    /// # Panics
    /// Either did not come up within [`START_DEADLINE`].
    pub fn start(milter_keys: &str) -> MilterNode {
        let node = Node::start_with(NodeOptions {
            name: "e2e".into(),
            extra_toml: format!(
                "{LMTP_TOML}\n[milter]\nlisten = \"unix:milter.sock\"\ntarget = \
                 \"unix:lmtp.sock\"\nsocket_mode = 0o666\n{milter_keys}\n"
            ),
            ..NodeOptions::default()
        });
        // Postfix's smtpd (user postfix) must reach the milter socket in this dir.
        let _ = std::fs::set_permissions(node.dir(), std::fs::Permissions::from_mode(0o755));
        let mut m = MilterNode {
            milter_socket: node.dir().join("milter.sock"),
            milter_log: node.dir().join("coffer-milter.log"),
            node,
            child: None,
        };
        m.start_milter();
        m
    }

    /// Starts coffer-milter and waits until its socket accepts connections.
    ///
    /// # Panics
    /// It did not come up within [`START_DEADLINE`].
    pub fn start_milter(&mut self) {
        assert!(self.child.is_none(), "coffer-milter already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.milter_log)
            .expect("milter log");
        writeln!(&log, "==== e2e: starting coffer-milter ====").expect("write log");
        let child = Command::new(bin("coffer-milter"))
            .arg("--config")
            .arg(&self.node.config_path)
            .current_dir(self.node.dir())
            .env_remove("COFFER_CONFIG")
            .env("RUST_LOG", "coffer_milter=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn coffer-milter");
        self.child = Some(child);
        let socket = self.milter_socket.clone();
        let child = self.child.as_mut().expect("child");
        let up = wait_until("coffer-milter to listen", START_DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(Err(format!("coffer-milter exited early: {status}")));
            }
            std::os::unix::net::UnixStream::connect(&socket)
                .is_ok()
                .then_some(Ok(()))
        });
        match up {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}\n{}", self.log_tail()),
            Err(e) => panic!("{e}\n{}", self.log_tail()),
        }
    }

    /// SIGTERM to coffer-milter and wait for it to exit; returns whether it exited 0.
    ///
    /// # Panics
    /// It did not stop within [`START_DEADLINE`].
    pub fn stop_milter(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let _ = kill(pid, Signal::SIGTERM);
        match wait_until("coffer-milter to exit", START_DEADLINE, || {
            child.try_wait().ok().flatten()
        }) {
            Ok(status) => status.success(),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}\n{}", self.log_tail());
            }
        }
    }

    /// SIGKILL to coffer-milter, and wait for it to be gone.
    pub fn kill9_milter(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last 60 lines of the milter's log, then cofferd's.
    pub fn log_tail(&self) -> String {
        let lines: Vec<String> = File::open(&self.milter_log)
            .map(|f| {
                BufReader::new(f)
                    .split(b'\n')
                    .map_while(Result::ok)
                    .map(|l| lossy(&l))
                    .collect()
            })
            .unwrap_or_default();
        let start = lines.len().saturating_sub(60);
        format!(
            "---- coffer-milter log (last lines) ----\n{}\n{}",
            lines[start..].join("\n"),
            self.node.log_tail()
        )
    }

    /// The milter's log so far.
    pub fn milter_log_text(&self) -> String {
        std::fs::read(&self.milter_log)
            .map(|b| lossy(&b))
            .unwrap_or_default()
    }
}

impl Drop for MilterNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
