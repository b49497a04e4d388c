//! The handoff to cofferd: a small async LMTP client and a pool of its connections.
//!
//! One message is one LMTP transaction: `MAIL FROM:<…> [BODY=…] [SMTPUTF8]
//! XCOFFER=<…>`, one `RCPT TO:<…>` per recipient (pipelined when the server offers
//! PIPELINING), then the content in `BDAT` chunks, the last one `BDAT n LAST`, answered
//! with one reply per recipient (RFC 2033). Every wait for the server is bounded by the
//! configured timeout; every reply is bounded in line length and line count.
//!
//! The server must advertise `XCOFFER` and `CHUNKING` on LHLO: a target that does not is
//! not cofferd's trusted milter listener, and handing mail to it would lose the
//! metadata, so the handoff fails instead.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

use crate::config::Addr;

pub use coffer_proto::reply::Reply;
use coffer_proto::reply::{ReplyReader, MAX_REPLY_LINE};
/// Idle connections kept for reuse.
pub const MAX_IDLE: usize = 32;
/// What the milter calls itself on LHLO.
const LHLO_NAME: &str = "coffer-milter";

/// Why a message could not be handed to cofferd. Its `Display` is the reason given in
/// the `451 4.3.0` reply.
#[derive(Debug)]
pub enum HandoffError {
    /// Connecting to the target failed.
    Connect(String),
    /// The connection broke.
    Io(std::io::Error),
    /// cofferd did not answer within the timeout.
    Timeout(Duration),
    /// cofferd answered something other than success.
    Refused(Reply),
    /// The target is not a trusted Coffer LMTP listener, or spoke nonsense.
    Protocol(String),
}

impl fmt::Display for HandoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "archive unreachable: {e}"),
            Self::Io(e) => write!(f, "archive connection failed: {e}"),
            Self::Timeout(d) => write!(f, "archive did not answer within {}s", d.as_secs()),
            Self::Refused(r) => write!(f, "archive refused: {r}"),
            Self::Protocol(e) => write!(f, "archive handoff failed: {e}"),
        }
    }
}

impl std::error::Error for HandoffError {}

impl From<std::io::Error> for HandoffError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl HandoffError {
    /// True when the connection is still in a known state (the server answered), so it
    /// may go back to the pool.
    pub fn connection_usable(&self) -> bool {
        matches!(self, Self::Refused(_))
    }
}

/// What the server offered on LHLO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub chunking: bool,
    /// `XCOFFER NODE EPOCH`: the node name and store epoch.
    pub xcoffer: Option<(String, String)>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One LMTP connection to cofferd, greeted.
pub struct LmtpConn {
    io: BufStream<Box<dyn Io>>,
    pub caps: Capabilities,
    timeout: Duration,
    /// Where it is connected (a reload may change the pool's target).
    target: Addr,
}

impl fmt::Debug for LmtpConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LmtpConn")
            .field("caps", &self.caps)
            .finish()
    }
}

impl LmtpConn {
    /// Connects, reads the greeting, sends LHLO and checks the capabilities.
    ///
    /// # Errors
    /// Connecting failed or timed out, the greeting or LHLO was refused, or the server
    /// does not offer XCOFFER and CHUNKING.
    pub async fn connect(target: &Addr, timeout: Duration) -> Result<Self, HandoffError> {
        let io: Box<dyn Io> = match target {
            Addr::Unix(path) => {
                let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| HandoffError::Timeout(timeout))?
                    .map_err(|e| HandoffError::Connect(format!("{target}: {e}")))?;
                Box::new(s)
            }
            Addr::Inet(hp) => {
                let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(hp.as_str()))
                    .await
                    .map_err(|_| HandoffError::Timeout(timeout))?
                    .map_err(|e| HandoffError::Connect(format!("{target}: {e}")))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        let mut conn = LmtpConn {
            io: BufStream::new(io),
            caps: Capabilities::default(),
            timeout,
            target: target.clone(),
        };
        let greeting = conn.read_reply().await?;
        if greeting.code != 220 {
            return Err(HandoffError::Refused(greeting));
        }
        conn.send_line(&format!("LHLO {LHLO_NAME}")).await?;
        conn.flush().await?;
        let lhlo = conn.read_reply().await?;
        if lhlo.code != 250 {
            return Err(HandoffError::Refused(lhlo));
        }
        for line in lhlo.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("PIPELINING") => conn.caps.pipelining = true,
                Some("CHUNKING") => conn.caps.chunking = true,
                Some("XCOFFER") => {
                    let node = words.next().unwrap_or_default().to_owned();
                    let epoch = words.next().unwrap_or_default().to_owned();
                    conn.caps.xcoffer = Some((node, epoch));
                }
                _ => {}
            }
        }
        if conn.caps.xcoffer.is_none() || !conn.caps.chunking {
            return Err(HandoffError::Protocol(format!(
                "{target} does not offer XCOFFER and CHUNKING: it is not cofferd's trusted \
                 LMTP listener (trust_xcoffer = true)"
            )));
        }
        Ok(conn)
    }

    async fn send_line(&mut self, line: &str) -> Result<(), HandoffError> {
        self.io.write_all(line.as_bytes()).await?;
        self.io.write_all(b"\r\n").await?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), HandoffError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.io.flush())
            .await
            .map_err(|_| HandoffError::Timeout(timeout))??;
        Ok(())
    }

    /// Reads one reply, within the timeout.
    async fn read_reply(&mut self) -> Result<Reply, HandoffError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.read_reply_untimed())
            .await
            .map_err(|_| HandoffError::Timeout(timeout))?
    }

    async fn read_reply_untimed(&mut self) -> Result<Reply, HandoffError> {
        let mut reader = ReplyReader::default();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = (&mut self.io)
                .take(MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await?;
            if n == 0 {
                return Err(HandoffError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cofferd closed the connection",
                )));
            }
            let line = reader
                .line(&buf)
                .map_err(|e| HandoffError::Protocol(e.to_string()))?;
            if let Some(reply) = line {
                return Ok(reply);
            }
        }
    }

    /// `RSET`: ends whatever transaction is open. Also the health check before reuse.
    ///
    /// # Errors
    /// The connection is broken or the server refused.
    pub async fn rset(&mut self) -> Result<(), HandoffError> {
        self.send_line("RSET").await?;
        self.flush().await?;
        let r = self.read_reply().await?;
        if r.code == 250 {
            Ok(())
        } else {
            Err(HandoffError::Refused(r))
        }
    }

    /// Opens the transaction: `mail_line` (a whole `MAIL FROM:` command) and one `RCPT
    /// TO:<r>` per recipient, pipelined when offered. Every reply is read, even after a
    /// refusal, so the connection stays in step.
    ///
    /// # Errors
    /// Any reply but 2xx (the first one is reported), or I/O trouble.
    pub async fn begin(&mut self, mail_line: &str, rcpts: &[String]) -> Result<(), HandoffError> {
        let mut first_refusal = None;
        if self.caps.pipelining {
            self.send_line(mail_line).await?;
            for r in rcpts {
                self.send_line(&format!("RCPT TO:<{r}>")).await?;
            }
            self.flush().await?;
            for _ in 0..=rcpts.len() {
                let reply = self.read_reply().await?;
                if !reply.is_ok() && first_refusal.is_none() {
                    first_refusal = Some(reply);
                }
            }
        } else {
            let lines = std::iter::once(mail_line.to_owned())
                .chain(rcpts.iter().map(|r| format!("RCPT TO:<{r}>")));
            for line in lines {
                self.send_line(&line).await?;
                self.flush().await?;
                let reply = self.read_reply().await?;
                if !reply.is_ok() {
                    first_refusal = Some(reply);
                    break;
                }
            }
        }
        match first_refusal {
            Some(r) => Err(HandoffError::Refused(r)),
            None => Ok(()),
        }
    }

    /// Sends one `BDAT` chunk. For a middle chunk, returns `None` after its 250. For the
    /// last chunk, reads one reply per recipient (LMTP) and returns the first; all must
    /// be 250.
    ///
    /// # Errors
    /// A refusal, a timeout or I/O trouble.
    pub async fn chunk(
        &mut self,
        data: &[u8],
        last: bool,
        rcpts: usize,
    ) -> Result<Option<Reply>, HandoffError> {
        let cmd = if last {
            format!("BDAT {} LAST", data.len())
        } else {
            format!("BDAT {}", data.len())
        };
        self.send_line(&cmd).await?;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.io.write_all(data))
            .await
            .map_err(|_| HandoffError::Timeout(timeout))??;
        self.flush().await?;
        let first = self.read_reply().await?;
        if !last {
            return if first.code == 250 {
                Ok(None)
            } else {
                Err(HandoffError::Refused(first))
            };
        }
        let mut refusal = (first.code != 250).then(|| first.clone());
        // A refused transaction may answer BDAT LAST once (503) instead of per recipient:
        // then there is nothing more to read.
        if first.code == 250 || first.code / 100 == 4 || first.code == 552 {
            for _ in 1..rcpts.max(1) {
                let r = self.read_reply().await?;
                if r.code != 250 && refusal.is_none() {
                    refusal = Some(r);
                }
            }
        }
        match refusal {
            Some(r) => Err(HandoffError::Refused(r)),
            None => Ok(Some(first)),
        }
    }
}

/// Idle connections to cofferd, reused across messages (and milter connections).
#[derive(Debug)]
pub struct Pool {
    /// Where new connections go and how long each step may take: replaced on reload.
    settings: Mutex<(Addr, Duration)>,
    idle: Mutex<Vec<LmtpConn>>,
}

impl Pool {
    pub fn new(target: Addr, timeout: Duration) -> Self {
        Self {
            settings: Mutex::new((target, timeout)),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Where new connections go.
    pub fn target(&self) -> Addr {
        self.settings.lock().expect("pool lock").0.clone()
    }

    /// Applies a reloaded `target` and `timeout`: connections handed out from now on
    /// use the new timeout; a new target drops the idle connections to the old one, and
    /// connections to it still in use are closed when they come back.
    pub fn reconfigure(&self, target: Addr, timeout: Duration) {
        let changed = {
            let mut settings = self.settings.lock().expect("pool lock");
            let changed = settings.0 != target;
            *settings = (target, timeout);
            changed
        };
        if changed {
            self.idle.lock().expect("pool lock").clear();
        }
    }

    /// An idle connection that passes a health check (RSET), else a new one.
    ///
    /// # Errors
    /// A new connection could not be made.
    pub async fn get(&self) -> Result<LmtpConn, HandoffError> {
        let (target, timeout) = self.settings.lock().expect("pool lock").clone();
        // Bounded: each round takes one connection out of a pool of at most MAX_IDLE.
        for _ in 0..=MAX_IDLE {
            let Some(mut conn) = self.idle.lock().expect("pool lock").pop() else {
                break;
            };
            if conn.target != target {
                continue;
            }
            conn.timeout = timeout;
            match conn.rset().await {
                Ok(()) => return Ok(conn),
                Err(e) => tracing::debug!(error = %e, "dropping a stale LMTP connection"),
            }
        }
        LmtpConn::connect(&target, timeout).await
    }

    /// Returns a connection whose transaction is finished (or reset) for reuse; one to
    /// a target no longer configured is closed instead.
    pub fn put(&self, conn: LmtpConn) {
        if conn.target != self.settings.lock().expect("pool lock").0 {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Idle connections now held (for tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    /// A scripted server on a Unix socket: answers each command line with the canned
    /// reply, reads BDAT payloads, records everything it got.
    async fn server(
        script: Vec<(&'static str, &'static str)>,
    ) -> (tempfile_dir::Dir, Addr, tokio::task::JoinHandle<Vec<u8>>) {
        let dir = tempfile_dir::Dir::new();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let handle = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut got = Vec::new();
            s.get_mut().write_all(b"220 test LMTP\r\n").await.unwrap();
            for (expect, reply) in script {
                let mut line = Vec::new();
                if s.read_until(b'\n', &mut line).await.unwrap() == 0 {
                    break;
                }
                got.extend_from_slice(&line);
                let text = String::from_utf8_lossy(&line).to_string();
                assert!(
                    text.starts_with(expect),
                    "expected {expect:?}, got {text:?}"
                );
                if let Some(rest) = text.strip_prefix("BDAT ") {
                    let n: usize = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let mut data = vec![0; n];
                    s.read_exact(&mut data).await.unwrap();
                    got.extend_from_slice(&data);
                }
                s.get_mut().write_all(reply.as_bytes()).await.unwrap();
            }
            got
        });
        (dir, Addr::Unix(path), handle)
    }

    const LHLO_OK: &str =
        "250-test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 XCOFFER n 0badf00d\r\n";

    #[tokio::test]
    async fn one_transaction() {
        let (_d, addr, h) = server(vec![
            ("LHLO", LHLO_OK),
            ("MAIL FROM:<a@b>", "250 2.1.0 Ok\r\n"),
            ("RCPT TO:<c@d>", "250 2.1.5 Ok\r\n"),
            ("RCPT TO:<e@f>", "250 2.1.5 Ok\r\n"),
            ("BDAT 3", "250 2.0.0 Ok: 3 octets received\r\n"),
            (
                "BDAT 2 LAST",
                "250 2.0.0 Ok: n/0badf00d/1 abc\r\n250 2.0.0 Ok: n/0badf00d/1 abc\r\n",
            ),
            ("RSET", "250 2.0.0 Ok\r\n"),
        ])
        .await;
        let mut c = LmtpConn::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(c.caps.pipelining && c.caps.chunking);
        assert_eq!(c.caps.xcoffer, Some(("n".into(), "0badf00d".into())));
        c.begin("MAIL FROM:<a@b>", &["c@d".into(), "e@f".into()])
            .await
            .unwrap();
        assert_eq!(c.chunk(b"abc", false, 2).await.unwrap(), None);
        let r = c.chunk(b"de", true, 2).await.unwrap().unwrap();
        assert_eq!(r.text(), "2.0.0 Ok: n/0badf00d/1 abc");
        c.rset().await.unwrap();
        drop(c);
        let got = h.await.unwrap();
        assert!(got.ends_with(b"BDAT 3\r\nabcBDAT 2 LAST\r\ndeRSET\r\n"));
    }

    #[tokio::test]
    async fn refusals_are_reported_and_replies_stay_in_step() {
        let (_d, addr, h) = server(vec![
            ("LHLO", LHLO_OK),
            ("MAIL", "250 2.1.0 Ok\r\n"),
            ("RCPT TO:<c@d>", "452 4.5.3 Too many recipients\r\n"),
            ("RCPT TO:<e@f>", "250 2.1.5 Ok\r\n"),
            ("RSET", "250 2.0.0 Ok\r\n"),
        ])
        .await;
        let mut c = LmtpConn::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        let e = c
            .begin("MAIL FROM:<>", &["c@d".into(), "e@f".into()])
            .await
            .unwrap_err();
        assert!(e.connection_usable());
        assert_eq!(
            e.to_string(),
            "archive refused: 452 4.5.3 Too many recipients"
        );
        c.rset().await.unwrap();
        drop(c);
        h.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_without_xcoffer_is_refused() {
        let (_d, addr, _h) = server(vec![("LHLO", "250-test\r\n250 CHUNKING\r\n")]).await;
        let e = LmtpConn::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not offer XCOFFER"), "{e}");
    }

    #[tokio::test]
    async fn silence_times_out() {
        let dir = tempfile_dir::Dir::new();
        let path = dir.path().join("s.sock");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap();
        let e = LmtpConn::connect(&Addr::Unix(path), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, HandoffError::Timeout(_)), "{e}");
    }

    #[tokio::test]
    async fn nobody_listening() {
        let dir = tempfile_dir::Dir::new();
        let e = LmtpConn::connect(&Addr::Unix(dir.path().join("none")), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with("archive unreachable: unix:"),
            "{e}"
        );
    }

    /// A temp directory removed on drop, without another dependency.
    mod tempfile_dir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "coffer-milter-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
