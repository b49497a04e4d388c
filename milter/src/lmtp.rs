//! The handoff to cofferd: a small async LMTP client and a pool of its connections.
//!
//! One message is one LMTP transaction: `MAIL FROM:<…> [BODY=…] [SMTPUTF8]
//! XCOFFER=<…>`, one `RCPT TO:<…>` per recipient, then the content in `BDAT` chunks, the
//! last one `BDAT n LAST`, answered with one reply per recipient (RFC 2033). Every wait
//! for the server is bounded by the configured timeout; every reply is bounded in line
//! length and line count.
//!
//! Round trips are what a message costs here (each is a wake-up and a few system calls
//! on both sides, on a host whose CPU Postfix needs), so a message takes as few as the
//! contracts allow:
//! - a pooled connection is reused without a health-check round trip: whether cofferd
//!   closed it while it was idle is seen without waiting (a non-blocking read), and one
//!   that breaks before its first reply is replaced and the message sent again on a new
//!   connection (harmless: a message cofferd did store is a repeat, no new arrival);
//! - with PIPELINING, a message for one recipient goes out as `MAIL`, `RCPT` and its
//!   first `BDAT` chunk in one write and is answered in one round trip. With several
//!   recipients, `MAIL` and the `RCPT`s are answered before any content is sent: a
//!   recipient refused while the others are taken would otherwise leave an archived copy
//!   of a message the milter then tempfails.
//!
//! The server must advertise `XCOFFER` and `CHUNKING` on LHLO: a target that does not is
//! not cofferd's trusted milter listener, and handing mail to it would lose the
//! metadata, so the handoff fails instead.

use std::fmt;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

use crate::config::Addr;

pub use coffer_proto::reply::Reply;
use coffer_proto::reply::{ReplyReader, MAX_REPLY_LINE};
/// Idle connections kept for reuse.
pub const MAX_IDLE: usize = 32;
/// What the milter calls itself on LHLO.
const LHLO_NAME: &str = "coffer-milter";
/// Content up to this size is copied behind the command lines and sent with them in one
/// write; bigger content is written on its own.
const COALESCE_MAX: usize = 64 << 10;

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

/// The socket under an [`LmtpConn`].
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// A read that never waits: `Ok(0)` at end of file, `WouldBlock` when nothing came.
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.try_read(buf),
            Self::Tcp(s) => s.try_read(buf),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One LMTP connection to cofferd, greeted.
pub struct LmtpConn {
    io: BufReader<Stream>,
    /// Command lines (and small content) not yet written.
    out: Vec<u8>,
    /// Replies owed for pipelined `MAIL`/`RCPT` commands, read before the next chunk's.
    owed: usize,
    /// Replies read since the transaction began.
    replies: usize,
    /// Taken from the pool (it carried an earlier transaction), not freshly connected.
    reused: bool,
    pub caps: Capabilities,
    timeout: Duration,
    /// Where it is connected (a reload may change the pool's target).
    target: Addr,
}

impl fmt::Debug for LmtpConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LmtpConn")
            .field("caps", &self.caps)
            .field("reused", &self.reused)
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
        let stream = match target {
            Addr::Unix(path) => {
                let s = tokio::time::timeout(timeout, UnixStream::connect(path))
                    .await
                    .map_err(|_| HandoffError::Timeout(timeout))?
                    .map_err(|e| HandoffError::Connect(format!("{target}: {e}")))?;
                Stream::Unix(s)
            }
            Addr::Inet(hp) => {
                let s = tokio::time::timeout(timeout, TcpStream::connect(hp.as_str()))
                    .await
                    .map_err(|_| HandoffError::Timeout(timeout))?
                    .map_err(|e| HandoffError::Connect(format!("{target}: {e}")))?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        let mut conn = LmtpConn {
            io: BufReader::new(stream),
            out: Vec::new(),
            owed: 0,
            replies: 0,
            reused: false,
            caps: Capabilities::default(),
            timeout,
            target: target.clone(),
        };
        let greeting = conn.read_reply().await?;
        if greeting.code != 220 {
            return Err(HandoffError::Refused(greeting));
        }
        conn.queue_line(&format!("LHLO {LHLO_NAME}"));
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

    fn queue_line(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Writes what is queued, within the timeout.
    async fn flush(&mut self) -> Result<(), HandoffError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let timeout = self.timeout;
        let out = std::mem::take(&mut self.out);
        let written = tokio::time::timeout(timeout, self.io.get_mut().write_all(&out))
            .await
            .map_err(|_| HandoffError::Timeout(timeout))?;
        // Keep the allocation for the next transaction.
        self.out = out;
        self.out.clear();
        written?;
        Ok(())
    }

    /// Whether the connection is unfit for another transaction, judged without waiting:
    /// cofferd closed it (idle timeout, restart), or it sent something unasked (a `421`
    /// before closing).
    fn stale(&self) -> bool {
        if !self.io.buffer().is_empty() || !self.out.is_empty() || self.owed != 0 {
            return true;
        }
        let mut probe = [0u8; 64];
        // Nothing to read is the healthy answer; end of file, data or an error is not.
        !matches!(
            self.io.get_ref().try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }

    /// Reads one reply, within the timeout.
    async fn read_reply(&mut self) -> Result<Reply, HandoffError> {
        let timeout = self.timeout;
        let reply = tokio::time::timeout(timeout, self.read_reply_untimed())
            .await
            .map_err(|_| HandoffError::Timeout(timeout))??;
        self.replies += 1;
        Ok(reply)
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

    /// Whether a failure of the transaction just begun may be retried on a new
    /// connection: this one came from the pool and broke before cofferd answered
    /// anything in it (cofferd closed it while it sat idle).
    pub fn retryable(&self, e: &HandoffError) -> bool {
        self.reused && self.replies == 0 && matches!(e, HandoffError::Io(_))
    }

    /// `RSET`: ends whatever transaction is open (replies still owed are read first).
    ///
    /// # Errors
    /// The connection is broken or the server refused.
    pub async fn rset(&mut self) -> Result<(), HandoffError> {
        self.queue_line("RSET");
        self.flush().await?;
        for _ in 0..std::mem::take(&mut self.owed) {
            self.read_reply().await?;
        }
        let r = self.read_reply().await?;
        if r.code == 250 {
            Ok(())
        } else {
            Err(HandoffError::Refused(r))
        }
    }

    /// Opens the transaction: `mail_line` (a whole `MAIL FROM:` command) and one `RCPT
    /// TO:<r>` per recipient. With PIPELINING and one recipient the commands are only
    /// queued: they go out with the first chunk and are answered before it
    /// ([`LmtpConn::chunk`]). Otherwise they are answered here. Every reply is read, even
    /// after a refusal, so the connection stays in step.
    ///
    /// # Errors
    /// Any reply but 2xx (the first one is reported), or I/O trouble.
    pub async fn begin(&mut self, mail_line: &str, rcpts: &[String]) -> Result<(), HandoffError> {
        self.replies = 0;
        if self.caps.pipelining {
            self.queue_line(mail_line);
            for r in rcpts {
                self.queue_line(&format!("RCPT TO:<{r}>"));
            }
            self.owed = 1 + rcpts.len();
            if rcpts.len() <= 1 {
                return Ok(());
            }
            self.flush().await?;
            return match self.read_owed().await? {
                Some(refusal) => Err(refusal),
                None => Ok(()),
            };
        }
        let lines = std::iter::once(mail_line.to_owned())
            .chain(rcpts.iter().map(|r| format!("RCPT TO:<{r}>")));
        for line in lines {
            self.queue_line(&line);
            self.flush().await?;
            let reply = self.read_reply().await?;
            if !reply.is_ok() {
                return Err(HandoffError::Refused(reply));
            }
        }
        Ok(())
    }

    /// Reads the replies owed for pipelined commands. `Ok(Some(r))`: the first refusal.
    async fn read_owed(&mut self) -> Result<Option<HandoffError>, HandoffError> {
        let mut refusal = None;
        while self.owed > 0 {
            let reply = self.read_reply().await?;
            self.owed -= 1;
            if !reply.is_ok() && refusal.is_none() {
                refusal = Some(HandoffError::Refused(reply));
            }
        }
        Ok(refusal)
    }

    /// Sends one `BDAT` chunk (after whatever [`LmtpConn::begin`] queued). For a middle
    /// chunk, returns `None` after its 250. For the last chunk, reads one reply per
    /// recipient (LMTP) and returns the first; all must be 250.
    ///
    /// # Errors
    /// A refusal (of the chunk, or of a `MAIL`/`RCPT` sent with it), a timeout or I/O
    /// trouble.
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
        self.queue_line(&cmd);
        if data.len() <= COALESCE_MAX {
            self.out.extend_from_slice(data);
            self.flush().await?;
        } else {
            self.flush().await?;
            let timeout = self.timeout;
            tokio::time::timeout(timeout, self.io.get_mut().write_all(data))
                .await
                .map_err(|_| HandoffError::Timeout(timeout))??;
        }
        // Refused MAIL or RCPT: the chunk is answered 503 (nothing stored); report the
        // refusal, after reading that answer too.
        let begin_refusal = self.read_owed().await?;
        let first = self.read_reply().await?;
        if !last {
            return match begin_refusal {
                Some(e) => Err(e),
                None if first.code == 250 => Ok(None),
                None => Err(HandoffError::Refused(first)),
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
        if let Some(e) = begin_refusal {
            return Err(e);
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

    /// An idle connection that cofferd has not closed, else a new one.
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
            if conn.stale() {
                tracing::debug!("dropping an LMTP connection cofferd closed");
                continue;
            }
            conn.timeout = timeout;
            conn.reused = true;
            return Ok(conn);
        }
        self.connect().await
    }

    /// A new connection to the configured target, bypassing the idle ones.
    ///
    /// # Errors
    /// The connection could not be made.
    pub async fn connect(&self) -> Result<LmtpConn, HandoffError> {
        let (target, timeout) = self.settings.lock().expect("pool lock").clone();
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

    /// Reads from `s` until `want` has been received (bounded by the test's timeouts).
    async fn read_until_has(s: &mut BufReader<tokio::net::UnixStream>, want: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(want.len()).any(|w| w == want) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "client closed; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Greets and answers LHLO on a new connection.
    async fn greet(listener: &tokio::net::UnixListener) -> BufReader<tokio::net::UnixStream> {
        let (s, _) = listener.accept().await.unwrap();
        let mut s = BufReader::new(s);
        s.get_mut().write_all(b"220 test LMTP\r\n").await.unwrap();
        read_until_has(&mut s, b"LHLO coffer-milter\r\n").await;
        s.get_mut().write_all(LHLO_OK.as_bytes()).await.unwrap();
        s
    }

    #[tokio::test]
    async fn one_recipient_is_one_round_trip() {
        let dir = tempfile_dir::Dir::new();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut s = greet(&listener).await;
            // Nothing is answered before the content is in: a client that waited for
            // the MAIL or RCPT reply would time out.
            let got = read_until_has(&mut s, b"BDAT 3 LAST\r\nabc").await;
            s.get_mut()
                .write_all(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: n/0badf00d/1 abc\r\n")
                .await
                .unwrap();
            got
        });
        let mut c = LmtpConn::connect(&Addr::Unix(path), Duration::from_secs(5))
            .await
            .unwrap();
        c.begin("MAIL FROM:<a@b>", &["c@d".into()]).await.unwrap();
        let r = c.chunk(b"abc", true, 1).await.unwrap().unwrap();
        assert_eq!(r.text(), "2.0.0 Ok: n/0badf00d/1 abc");
        let got = server.await.unwrap();
        assert_eq!(
            got,
            b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nabc"
        );
    }

    #[tokio::test]
    async fn a_refused_sender_sent_with_the_content_is_what_is_reported() {
        let (_d, addr, h) = server(vec![
            ("LHLO", LHLO_OK),
            ("MAIL", "501 5.5.4 Invalid XCOFFER: bad\r\n"),
            ("RCPT", "503 5.5.1 Need MAIL command\r\n"),
            ("BDAT 2 LAST", "503 5.5.1 Need MAIL command\r\n"),
            ("RSET", "250 2.0.0 Ok\r\n"),
        ])
        .await;
        let mut c = LmtpConn::connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        c.begin("MAIL FROM:<a@b> XCOFFER=x", &["c@d".into()])
            .await
            .unwrap();
        let e = c.chunk(b"hi", true, 1).await.unwrap_err();
        assert!(e.connection_usable());
        assert_eq!(
            e.to_string(),
            "archive refused: 501 5.5.4 Invalid XCOFFER: bad"
        );
        // In step: the next command gets its own answer.
        c.rset().await.unwrap();
        drop(c);
        h.await.unwrap();
    }

    #[tokio::test]
    async fn the_pool_replaces_a_connection_cofferd_closed() {
        let dir = tempfile_dir::Dir::new();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(async move {
            // The first connection is closed while it sits in the pool (an idle
            // timeout, a restart) ...
            let first = greet(&listener).await;
            drop(first);
            closed_tx.send(()).unwrap();
            // ... so the next message comes on a new one.
            let mut second = greet(&listener).await;
            read_until_has(&mut second, b"BDAT 1 LAST\r\nx").await;
            second
                .get_mut()
                .write_all(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: n/0badf00d/2 x\r\n")
                .await
                .unwrap();
        });
        let pool = Pool::new(Addr::Unix(path), Duration::from_secs(5));
        let c = pool.get().await.unwrap();
        assert!(!c.reused);
        pool.put(c);
        closed_rx.await.unwrap();
        // Bounded: the close reaches our end of the socket promptly.
        let mut stale = false;
        for _ in 0..500 {
            let c = pool.idle.lock().unwrap().pop().unwrap();
            stale = c.stale();
            pool.put(c);
            if stale {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stale, "the closed connection is seen as stale");
        let mut c = pool.get().await.unwrap();
        assert!(!c.reused, "a new connection, not the closed one");
        c.begin("MAIL FROM:<a@b>", &["c@d".into()]).await.unwrap();
        c.chunk(b"x", true, 1).await.unwrap().unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_pooled_connection_that_breaks_before_answering_may_be_retried() {
        let dir = tempfile_dir::Dir::new();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut s = greet(&listener).await;
            // Takes the transaction, then goes away without a word.
            read_until_has(&mut s, b"BDAT 1 LAST\r\nx").await;
        });
        let pool = Pool::new(Addr::Unix(path), Duration::from_secs(5));
        let mut c = pool.get().await.unwrap();
        // As if it had carried an earlier message.
        c.reused = true;
        c.begin("MAIL FROM:<a@b>", &["c@d".into()]).await.unwrap();
        let e = c.chunk(b"x", true, 1).await.unwrap_err();
        server.await.unwrap();
        assert!(matches!(e, HandoffError::Io(_)), "{e}");
        assert!(c.retryable(&e));
        // A fresh connection that breaks is not retried: cofferd is in trouble.
        c.reused = false;
        assert!(!c.retryable(&e));
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
