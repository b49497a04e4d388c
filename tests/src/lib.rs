//! End-to-end test harness: spawns the real binaries (`cofferd`, `coffer`) and talks to
//! them the way users and MTAs do — over SMTP on a loopback port and through the CLI.
//!
//! This library exists for the scenarios in `tests/tests/`; it promises no API
//! stability.
//!
//! # Layout
//! - [`bin`]: where the built binaries are (and building them once if they are not).
//! - [`Node`]: one `cofferd` with its own config file, free port and data dir; it is
//!   SIGKILLed on drop and can be killed, terminated and restarted on the same store.
//! - [`smtp`]: a tiny blocking SMTP client (EHLO/MAIL/RCPT/DATA with dot-stuffing).
//! - [`run`]: running a process with a deadline and capturing its output.
//! - [`tls`]: throwaway certificates (rcgen) and a blocking STARTTLS client.
//! - [`wait_until`]: the only way tests wait — for a condition, with a deadline.
//!
//! # Rules (docs/testing.md)
//! No fixed ports (every node binds a port the kernel handed out), no bare sleeps
//! (wait for a condition with a deadline), every loop bounded in count and time.

pub mod daemon;
pub mod ha;
pub mod milter;
pub mod postfix;
pub mod run;
pub mod sink;
pub mod smtp;
pub mod tls;
pub mod tmpfs;
pub mod wire;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

pub use run::{run, CmdOutput};
pub use smtp::{Accepted, Reply, SmtpClient};

/// How long a node gets to start listening, or to stop after SIGTERM.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long one `coffer` invocation may take before the test fails.
pub const CLI_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between two checks of a condition inside [`wait_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Lowercase hex SHA-256 of `bytes`: a message id.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Starts `cofferd --config CONFIG` in `dir`, its output appended to `log_path` after a
/// line naming the start (`what`), and waits up to [`START_DEADLINE`] until `up` says it
/// answers. A daemon that exits early or does not come up is killed and reaped.
///
/// # Errors
/// The log could not be opened, the spawn failed, or the daemon did not come up.
pub fn start_cofferd(
    config: &Path,
    dir: &Path,
    log_path: &Path,
    what: &str,
    mut up: impl FnMut() -> bool,
) -> anyhow::Result<Child> {
    let log = File::options().create(true).append(true).open(log_path)?;
    writeln!(&log, "==== e2e: starting cofferd {what} ====")?;
    let mut child = Command::new(bin("cofferd"))
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env_remove("COFFER_CONFIG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let ready = wait_until("cofferd to greet with 220", START_DEADLINE, || {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(Err(anyhow::anyhow!("cofferd exited early: {status}")));
        }
        up().then_some(Ok(()))
    });
    match ready.and_then(|r| r) {
        Ok(()) => Ok(child),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Checks `cond` until it returns `Some`, or fails after `deadline` with `what` in the
/// message. The pause between checks is [`POLL_INTERVAL`]; the number of checks is
/// bounded by the deadline.
///
/// # Errors
/// The deadline passed before the condition held.
pub fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() >= end {
            anyhow::bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Path of a binary built from this workspace (`cofferd`, `coffer`, `coffer-milter`).
///
/// With `$COFFER_BIN_DIR` set, the binary is taken from there as is. Otherwise it is the
/// one in the profile directory this test binary was built into (`<target>/<profile>/deps/
/// <test>` → `<target>/<profile>`), brought up to date first by one `cargo build --bins`
/// per test process (a no-op when nothing changed), so a plain `cargo test` never runs
/// stale binaries. `COFFER_E2E_NO_BUILD=1` skips that build.
///
/// # Panics
/// The binary cannot be found or built.
pub fn bin(name: &str) -> PathBuf {
    if std::env::var_os("COFFER_BIN_DIR").is_none() {
        build_binaries_once();
    }
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found; build the workspace first (`cargo build --workspace`) or set COFFER_BIN_DIR",
        path.display()
    );
    path
}

fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("COFFER_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

fn build_binaries_once() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("COFFER_E2E_NO_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let dir = bin_dir();
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--locked", "--bins"]);
        cmd.args(["-p", "coffer-archiver", "-p", "coffer-milter"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        cmd.current_dir(workspace_root());
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the binaries failed: {status}"
        );
    });
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `tests/fixtures/` of this crate.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Binds `ip:0` and returns the port the kernel chose. The listener is dropped before
/// returning, so a tiny race with another process exists; [`Node::start`] retries on a
/// fresh port if the daemon cannot bind.
///
/// # Panics
/// Binding failed.
pub fn free_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).expect("bind a free port");
    l.local_addr().expect("local_addr").port()
}

/// How to configure a test node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// `[node] name`: the first part of every arrival id.
    pub name: String,
    /// Extra TOML appended to the generated config (e.g. a second listener).
    pub extra_toml: String,
    /// The loopback address the `journal` listener binds (`127.0.0.2` for a second node).
    pub ip: String,
    /// More keys of the `journal` listener (e.g. `proxy_protocol`, `allow`).
    pub journal_extra: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            name: "e2e".into(),
            extra_toml: String::new(),
            ip: "127.0.0.1".into(),
            journal_extra: String::new(),
        }
    }
}

/// One running (or stopped) `cofferd` with its own temp directory holding
/// `coffer.toml`, the store (`data/`) and the daemon's log (`cofferd.log`, appended to
/// across restarts).
///
/// Dropping the guard SIGKILLs the daemon and removes the directory, unless
/// `COFFER_E2E_KEEP=1`, in which case the directory is kept and its path printed.
pub struct Node {
    /// Owns the config, the store and the log; removed on drop.
    dir: Option<tempfile::TempDir>,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// The SMTP listener `journal`, on [`NodeOptions::ip`] (127.0.0.1 by default).
    pub addr: SocketAddr,
    opts: NodeOptions,
    /// The daemon; `None` while stopped. Killed on drop so no daemon outlives a test.
    child: Option<Child>,
}

impl Node {
    /// Starts a node with the default options and waits until it greets with 220.
    ///
    /// # Panics
    /// The daemon did not come up within [`START_DEADLINE`] (its log is printed).
    pub fn start() -> Node {
        Self::start_with(NodeOptions::default())
    }

    /// Starts a node with `opts`; see [`Node::start`].
    ///
    /// # Panics
    /// The daemon did not come up within [`START_DEADLINE`] (its log is printed).
    pub fn start_with(opts: NodeOptions) -> Node {
        let dir = tempfile::Builder::new()
            .prefix("coffer-e2e-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().to_path_buf();
        let mut node = Node {
            config_path: root.join("coffer.toml"),
            data_dir: root.join("data"),
            log_path: root.join("cofferd.log"),
            dir: Some(dir),
            addr: SocketAddr::new(opts.ip.parse().expect("NodeOptions::ip"), 0),
            opts,
            child: None,
        };
        // The port is picked by the kernel, then released and handed to cofferd: another
        // process may grab it in between. Retry with a new port a bounded number of times.
        let mut last_err = None;
        for _ in 0..3 {
            let ip = node.addr.ip();
            node.addr = SocketAddr::new(ip, free_port(&ip.to_string()));
            node.write_config();
            match node.try_start() {
                Ok(()) => return node,
                Err(e) => last_err = Some(e),
            }
        }
        panic!(
            "cofferd did not start: {:#}\n{}",
            last_err.unwrap(),
            node.log_tail()
        );
    }

    /// The generated configuration (interfaces.md "Configuration").
    pub fn config_toml(&self) -> String {
        format!(
            r#"# written by the coffer-e2e harness
[node]
name = "{name}"
data_dir = "data"

[store]
min_free_disk = "16MiB"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "{addr}"
{journal_extra}

[[route]]
from = ["journal"]
archive = true
forward = []
{extra}"#,
            name = self.opts.name,
            addr = self.addr,
            journal_extra = self.opts.journal_extra,
            extra = self.opts.extra_toml
        )
    }

    fn write_config(&self) {
        fs::write(&self.config_path, self.config_toml()).expect("write coffer.toml");
    }

    /// The temp directory holding config, store and log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("node dir").path()
    }

    fn try_start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "cofferd already running");
        let addr = self.addr;
        let child = start_cofferd(
            &self.config_path,
            self.dir(),
            &self.log_path,
            &format!("on {addr}"),
            || greets(addr),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// PID of the running daemon.
    ///
    /// # Panics
    /// The node is stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("cofferd is running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: the daemon gets no chance to flush anything. Waits for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to [`START_DEADLINE`]) for a graceful exit. Returns the
    /// exit status; falls back to SIGKILL (and fails) when the deadline passes.
    ///
    /// # Panics
    /// The daemon did not stop in time.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("cofferd is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let _ = kill(pid, Signal::SIGTERM);
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

    /// Starts the daemon again on the same config, port and store.
    ///
    /// # Panics
    /// It did not come up within [`START_DEADLINE`].
    pub fn restart(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("cofferd did not restart: {e:#}\n{}", self.log_tail());
        }
    }

    /// Opens an SMTP session to the `journal` listener (greeting read, EHLO sent).
    ///
    /// # Panics
    /// Connecting or EHLO failed.
    pub fn smtp(&self) -> SmtpClient {
        let mut c = SmtpClient::connect(self.addr).expect("connect to cofferd");
        let r = c.ehlo("e2e.test").expect("EHLO");
        assert_eq!(r.code, 250, "EHLO: {r}");
        c
    }

    /// Sends one message in a fresh session and expects a 250 with ids.
    ///
    /// # Panics
    /// Anything but a 250 with `Ok: <arrival> <message id>`.
    pub fn send(&self, from: &str, to: &[&str], bytes: &[u8]) -> Accepted {
        let mut c = self.smtp();
        let acc = c
            .send(from, to, bytes)
            .unwrap_or_else(|e| panic!("send: {e:#}"));
        let _ = c.quit();
        acc
    }

    /// The daemon's whole log so far, as text.
    pub fn log_text(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| lossy(&b))
            .unwrap_or_default()
    }

    /// The last 60 lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let Ok(f) = File::open(&self.log_path) else {
            return format!("(no log at {})", self.log_path.display());
        };
        let lines: Vec<String> = BufReader::new(f)
            .split(b'\n')
            .map_while(Result::ok)
            .map(|l| lossy(&l))
            .collect();
        let start = lines.len().saturating_sub(60);
        format!(
            "---- cofferd log (last lines) ----\n{}",
            lines[start..].join("\n")
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::env::var_os("COFFER_E2E_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("e2e: keeping {}", d.keep().display());
            }
        }
    }
}

/// True when `addr` accepts a connection and greets with `220`.
pub fn greets(addr: SocketAddr) -> bool {
    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = Vec::new();
    let mut r = BufReader::new(s).take_limit(4096);
    matches!(r.read_until(b'\n', &mut line), Ok(n) if n > 0) && line.starts_with(b"220")
}

trait TakeLimit: Sized {
    fn take_limit(self, n: u64) -> std::io::Take<Self>;
}
impl<R: std::io::Read> TakeLimit for R {
    fn take_limit(self, n: u64) -> std::io::Take<Self> {
        std::io::Read::take(self, n)
    }
}

/// Lossy UTF-8 for messages.
pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The bytes a server archives when `msg` is sent with DATA by [`SmtpClient`]: `msg`
/// itself, plus a CRLF when it does not end with one (the client must end the last
/// line before the terminating dot).
pub fn archived_form(msg: &[u8]) -> Vec<u8> {
    let mut v = msg.to_vec();
    if !v.ends_with(b"\r\n") {
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// True when `tool` is on `PATH` or in `/usr/sbin` (where Postfix puts its tools).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Finds an external tool, or decides the test cannot run: outside CI a missing tool
/// skips (returns `None` after printing why); with `CI` set it fails.
///
/// # Panics
/// The tool is missing and `CI` is set.
pub fn require_tool(tool: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = find_tool(tool) {
        return Some(p);
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !ci,
        "{tool} is missing (Debian package {package}); CI must install it (.ci/run)"
    );
    eprintln!(
        "SKIPPED: {tool} not found (install the Debian package {package}); \
         this test fails instead of skipping when CI is set"
    );
    None
}

/// The `coffer` commands, run against one daemon's configuration with a deadline.
/// Implemented by [`Node`] and [`daemon::Daemon`]; bring it into scope to call them.
pub trait CofferCli {
    /// The daemon's `coffer.toml`.
    fn cli_config(&self) -> &Path;
    /// The working directory for the CLI (the daemon's folder).
    fn cli_dir(&self) -> &Path;
    /// The daemon's recent log lines, for failure messages.
    fn cli_log_tail(&self) -> String;

    /// Runs `coffer --config <the daemon's file> ARGS` with a deadline.
    ///
    /// # Panics
    /// The CLI could not be spawned or ran past [`CLI_DEADLINE`].
    fn coffer(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = Command::new(bin("coffer"));
        cmd.arg("--config").arg(self.cli_config()).args(args);
        cmd.current_dir(self.cli_dir()).env_remove("COFFER_CONFIG");
        run(cmd, CLI_DEADLINE).unwrap_or_else(|e| panic!("coffer {args:?}: {e:#}"))
    }

    /// Runs `coffer ARGS` and expects exit 0.
    ///
    /// # Panics
    /// Any other exit.
    fn coffer_ok(&self, args: &[&str]) -> CmdOutput {
        let out = self.coffer(args);
        assert_eq!(
            out.code,
            Some(0),
            "coffer {args:?} failed:\n{out}\n{}",
            self.cli_log_tail()
        );
        out
    }

    /// `coffer get ID`: the archived bytes.
    fn get(&self, id: &str) -> Vec<u8> {
        self.coffer_ok(&["get", id]).stdout
    }

    /// `coffer get ID --envelope`: the arrival list.
    fn arrivals(&self, id: &str) -> Vec<serde_json::Value> {
        match self.coffer_ok(&["get", id, "--envelope"]).json() {
            serde_json::Value::Array(a) => a,
            other => panic!("get --envelope is not a JSON array: {other}"),
        }
    }

    /// `coffer status --json`.
    fn status(&self) -> serde_json::Value {
        self.coffer_ok(&["status", "--json"]).json()
    }

    /// `coffer search ARGS --json --limit 0`: the matching message records.
    fn search(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut a: Vec<&str> = vec!["search"];
        a.extend_from_slice(args);
        a.extend(["--limit", "0", "--json"]);
        match self.coffer_ok(&a).json() {
            serde_json::Value::Array(v) => v,
            other => panic!("search --json is not a JSON array: {other}"),
        }
    }
}

impl CofferCli for Node {
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

/// One stored message as `coffer export --format eml` writes it: its bytes and its
/// arrival list (the `.json` beside the `.eml`).
pub struct Exported {
    pub bytes: Vec<u8>,
    pub arrivals: Vec<serde_json::Value>,
}

/// Exports the whole archive of `node` into `out` (created) and reads it back, keyed by
/// message id. The crash tests check a whole store at once this way.
///
/// # Panics
/// The export failed or wrote something unreadable.
pub fn export_all(
    node: &impl CofferCli,
    out: &Path,
) -> std::collections::BTreeMap<String, Exported> {
    node.coffer_ok(&[
        "export",
        "--format",
        "eml",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    let mut map = std::collections::BTreeMap::new();
    for e in fs::read_dir(out).expect("read the export") {
        let p = e.expect("export entry").path();
        if p.extension().is_some_and(|x| x == "eml") {
            let id = p
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("id")
                .to_owned();
            let bytes = fs::read(&p).expect("read .eml");
            let json: serde_json::Value =
                serde_json::from_slice(&fs::read(p.with_extension("json")).expect("read .json"))
                    .unwrap_or_else(|e| panic!("{id}.json: {e}"));
            let arrivals = match json {
                serde_json::Value::Array(a) => a,
                serde_json::Value::Object(o) => o
                    .get("arrivals")
                    .and_then(serde_json::Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            map.insert(id, Exported { bytes, arrivals });
        }
    }
    map
}

/// `COFFER_CRASH_ITERATIONS` (the crash matrix's kills per scenario), or `default`.
pub fn crash_iterations(default: usize) -> usize {
    std::env::var("COFFER_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// How many messages one client thread of a crash scenario may send at most, for
/// `iterations` kills: enough that every kill lands under load (the clients are
/// stopped once the kills are done and some mail has flowed after the last one).
pub fn crash_per_thread(iterations: usize) -> usize {
    150 + 80 * iterations
}

/// How long the clients of a crash scenario may run at most, for `iterations` kills.
pub fn crash_time_cap(iterations: usize) -> Duration {
    Duration::from_secs(120 + 30 * iterations as u64)
}

/// `COFFER_E2E_SEED`, or a fresh random seed; printed by the caller so a run can be
/// replayed.
pub fn e2e_seed() -> u64 {
    std::env::var("COFFER_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}
