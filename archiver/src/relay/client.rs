//! A small async SMTP client for replication: EHLO, `MAIL FROM` (with `XCOFFER=` when the
//! peer offers it), `RCPT TO`, then the content with `BDAT ... LAST` (or DATA when the
//! bytes are DATA-safe and the peer lacks CHUNKING). Every wait is bounded by a timeout,
//! every reply in line length and line count.
//!
//! With [`TlsTo`] (a connection's `tls`), the session goes to TLS right after the first
//! EHLO: `STARTTLS`, the handshake (the peer's certificate must chain to the connection's
//! `ca` and name its `peer`; ours is presented when configured), then EHLO again, and only
//! the capabilities of that second EHLO count (`XCOFFER NODE EPOCH` included). A peer that
//! does not offer STARTTLS, refuses it, or fails the handshake is a connect failure: the
//! session never goes on in the clear.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::io::{BufReader, BufWriter};
use tokio::net::TcpStream;

pub use coffer_proto::reply::Reply;
use coffer_proto::reply::{ReplyReader, MAX_REPLY_LINE};

/// Why shipping one message failed, by what the replicator does about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendError {
    /// No session: the peer is down (probe it later; not the message's fault).
    Connect(String),
    /// The peer's EHLO names another node than the connection's `peer`.
    WrongPeer(String),
    /// A 4xx, a broken or silent session: retry with backoff.
    Temp(String),
    /// A 5xx, or content this peer cannot take: park the arrival.
    Perm(String),
}

impl SendError {
    /// The failure kind, as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::WrongPeer(_) => "wrong_peer",
            Self::Temp(_) => "temporary",
            Self::Perm(_) => "permanent",
        }
    }

    fn of_reply(what: &str, r: &Reply) -> SendError {
        let why = format!("{what}: {r}");
        if r.code / 100 == 5 {
            Self::Perm(why)
        } else {
            Self::Temp(why)
        }
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot reach the peer: {e}"),
            Self::WrongPeer(e) => write!(f, "wrong peer: {e}"),
            Self::Temp(e) | Self::Perm(e) => f.write_str(e),
        }
    }
}

/// What the peer offered on EHLO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    pub pipelining: bool,
    pub chunking: bool,
    pub eight_bit: bool,
    pub binarymime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// `XCOFFER NODE EPOCH`; `None` means plain mode.
    pub xcoffer: Option<(String, String)>,
}

/// The shape of a message's bytes, for the BODY parameter and the DATA fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// 7-bit and DATA-safe.
    SevenBit,
    /// 8-bit bytes, but DATA-safe (CRLF lines up to 998 octets, no NUL, ends in CRLF).
    EightBit,
    /// Anything else: only BDAT carries it faithfully.
    Binary,
}

impl Body {
    pub fn of(b: &[u8]) -> Body {
        if !data_safe(b) {
            Body::Binary
        } else if b.is_ascii() {
            Body::SevenBit
        } else {
            Body::EightBit
        }
    }
}

/// Whether DATA (with dot-stuffing) delivers exactly these bytes: every line ends in
/// CRLF, no bare CR or LF, no NUL, lines at most 998 octets, and the last line ends too.
pub fn data_safe(b: &[u8]) -> bool {
    if b.is_empty() {
        return true;
    }
    if !b.ends_with(b"\r\n") || b.contains(&0) {
        return false;
    }
    let mut line = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' => {
                if b.get(i + 1) != Some(&b'\n') {
                    return false;
                }
                line = 0;
                i += 2;
                continue;
            }
            b'\n' => return false,
            _ => line += 1,
        }
        if line > 998 {
            return false;
        }
        i += 1;
    }
    true
}

/// The byte stream under a session: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Buffered = BufReader<BufWriter<Box<dyn Io>>>;

/// STARTTLS to a peer: the client configuration (trusted CA, our certificate) and the
/// name the peer's certificate must carry.
#[derive(Clone, Debug)]
pub struct TlsTo {
    pub config: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

/// One SMTP session to a peer, greeted.
pub struct SmtpConn {
    io: Buffered,
    pub caps: Caps,
    timeout: Duration,
}

impl SmtpConn {
    /// Connects to `target` (from `source` when set), reads the greeting, sends EHLO; with
    /// `tls`, then STARTTLS, the handshake, and EHLO again.
    ///
    /// # Errors
    /// [`SendError::Connect`] when no session could be set up, TLS included.
    pub async fn connect(
        target: &str,
        source: Option<&str>,
        helo: &str,
        timeout: Duration,
        tls: Option<&TlsTo>,
    ) -> Result<SmtpConn, SendError> {
        let fail = |e: String| SendError::Connect(format!("{target}: {e}"));
        let stream = tokio::time::timeout(timeout, open(target, source))
            .await
            .map_err(|_| fail("connect timed out".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut conn = SmtpConn::over(Box::new(stream), timeout);
        let greeting = conn.read_reply().await.map_err(|e| fail(e.to_string()))?;
        if greeting.code != 220 {
            return Err(fail(format!("greeting {greeting}")));
        }
        conn.ehlo(helo).await.map_err(|e| fail(e.to_string()))?;
        let Some(tls) = tls else {
            return Ok(conn);
        };
        if !conn.caps.starttls {
            return Err(fail(
                "the peer does not offer STARTTLS, and this connection has `tls`: \
                 nothing is sent in the clear"
                    .into(),
            ));
        }
        conn.line("STARTTLS")
            .await
            .map_err(|e| fail(e.to_string()))?;
        let r = conn.read_reply().await.map_err(|e| fail(e.to_string()))?;
        if r.code != 220 {
            return Err(fail(format!("STARTTLS {r}")));
        }
        if !conn.io.buffer().is_empty() {
            // Sent in the clear after the 220: an injection, never read as a reply.
            return Err(fail("the peer sent more after its STARTTLS reply".into()));
        }
        let plain = conn.io.into_inner().into_inner();
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let handshake = connector.connect(tls.name.clone(), plain);
        let stream = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| fail("TLS handshake timed out".into()))?
            .map_err(|e| {
                fail(format!(
                    "TLS handshake with `{}` failed: {e}",
                    tls.name.to_str()
                ))
            })?;
        let mut conn = SmtpConn::over(Box::new(stream), timeout);
        conn.ehlo(helo).await.map_err(|e| fail(e.to_string()))?;
        Ok(conn)
    }

    fn over(stream: Box<dyn Io>, timeout: Duration) -> SmtpConn {
        SmtpConn {
            io: BufReader::new(BufWriter::new(stream)),
            caps: Caps::default(),
            timeout,
        }
    }

    /// Sends EHLO and learns the peer's capabilities from its reply.
    async fn ehlo(&mut self, helo: &str) -> Result<(), SendError> {
        self.line(&format!("EHLO {helo}")).await?;
        let ehlo = self.read_reply().await?;
        if ehlo.code != 250 {
            return Err(SendError::Temp(format!("EHLO {ehlo}")));
        }
        let conn = self;
        conn.caps = Caps::default();
        for line in ehlo.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("PIPELINING") => conn.caps.pipelining = true,
                Some("CHUNKING") => conn.caps.chunking = true,
                Some("8BITMIME") => conn.caps.eight_bit = true,
                Some("BINARYMIME") => conn.caps.binarymime = true,
                Some("SMTPUTF8") => conn.caps.smtputf8 = true,
                Some("STARTTLS") => conn.caps.starttls = true,
                Some("XCOFFER") => {
                    let node = words.next().unwrap_or_default().to_owned();
                    let epoch = words.next().unwrap_or_default().to_owned();
                    conn.caps.xcoffer = Some((node, epoch));
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn line(&mut self, line: &str) -> Result<(), SendError> {
        self.write(line.as_bytes()).await?;
        self.write(b"\r\n").await?;
        self.flush().await
    }

    async fn write(&mut self, b: &[u8]) -> Result<(), SendError> {
        let t = self.timeout;
        tokio::time::timeout(t, self.io.write_all(b))
            .await
            .map_err(|_| SendError::Temp("writing to the peer timed out".into()))?
            .map_err(|e| SendError::Temp(format!("writing to the peer: {e}")))
    }

    async fn flush(&mut self) -> Result<(), SendError> {
        let t = self.timeout;
        tokio::time::timeout(t, self.io.flush())
            .await
            .map_err(|_| SendError::Temp("writing to the peer timed out".into()))?
            .map_err(|e| SendError::Temp(format!("writing to the peer: {e}")))
    }

    async fn read_reply(&mut self) -> Result<Reply, SendError> {
        let t = self.timeout;
        tokio::time::timeout(t, self.read_reply_untimed())
            .await
            .map_err(|_| SendError::Temp(format!("no reply within {}s", t.as_secs())))?
    }

    async fn read_reply_untimed(&mut self) -> Result<Reply, SendError> {
        let mut reader = ReplyReader::default();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = (&mut self.io)
                .take(MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut buf)
                .await
                .map_err(|e| SendError::Temp(format!("reading from the peer: {e}")))?;
            if n == 0 {
                return Err(SendError::Temp("the peer closed the connection".into()));
            }
            if let Some(reply) = reader
                .line(&buf)
                .map_err(|e| SendError::Temp(e.to_string()))?
            {
                return Ok(reply);
            }
        }
    }

    /// Sends one message. `xcoffer` is the encoded `XCOFFER=` value (XCOFFER peers only).
    /// On a refusal the transaction is reset, so the session stays usable.
    ///
    /// # Errors
    /// See [`SendError`]. After [`SendError::Temp`] for I/O trouble the session is broken;
    /// [`SmtpConn::usable`] tells.
    pub async fn send(
        &mut self,
        mail_from: &str,
        rcpts: &[String],
        bytes: &[u8],
        xcoffer: Option<&str>,
    ) -> Result<Reply, SendError> {
        let body = Body::of(bytes);
        if !self.caps.chunking && body == Body::Binary {
            return Err(SendError::Perm(
                "the message is not DATA-safe and the peer does not offer CHUNKING".into(),
            ));
        }
        if rcpts.is_empty() {
            return Err(SendError::Perm("the arrival has no recipients".into()));
        }
        let mut mail = format!("MAIL FROM:<{mail_from}>");
        match body {
            Body::Binary if self.caps.binarymime => mail.push_str(" BODY=BINARYMIME"),
            Body::EightBit | Body::Binary if self.caps.eight_bit => {
                mail.push_str(" BODY=8BITMIME");
            }
            _ => {}
        }
        let utf8 = !mail_from.is_ascii() || rcpts.iter().any(|r| !r.is_ascii());
        if utf8 && self.caps.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if let Some(x) = xcoffer {
            mail.push_str(" XCOFFER=");
            mail.push_str(x);
        }
        let mut first_refusal = None;
        let lines: Vec<String> = std::iter::once(mail)
            .chain(rcpts.iter().map(|r| format!("RCPT TO:<{r}>")))
            .collect();
        if self.caps.pipelining {
            for l in &lines {
                self.write(l.as_bytes()).await?;
                self.write(b"\r\n").await?;
            }
            self.flush().await?;
            for l in &lines {
                let r = self.read_reply().await?;
                if r.code / 100 != 2 && first_refusal.is_none() {
                    first_refusal = Some(SendError::of_reply(verb(l), &r));
                }
            }
        } else {
            for l in &lines {
                self.line(l).await?;
                let r = self.read_reply().await?;
                if r.code / 100 != 2 {
                    first_refusal = Some(SendError::of_reply(verb(l), &r));
                    break;
                }
            }
        }
        if let Some(e) = first_refusal {
            self.rset().await?;
            return Err(e);
        }
        let reply = if self.caps.chunking {
            self.write(format!("BDAT {} LAST\r\n", bytes.len()).as_bytes())
                .await?;
            self.write(bytes).await?;
            self.flush().await?;
            self.read_reply().await?
        } else {
            self.line("DATA").await?;
            let r = self.read_reply().await?;
            if r.code != 354 {
                self.rset().await?;
                return Err(SendError::of_reply("DATA", &r));
            }
            self.write(&dot_stuff(bytes)).await?;
            self.write(b".\r\n").await?;
            self.flush().await?;
            self.read_reply().await?
        };
        if reply.code / 100 == 2 {
            Ok(reply)
        } else {
            Err(SendError::of_reply("end of data", &reply))
        }
    }

    async fn rset(&mut self) -> Result<(), SendError> {
        self.line("RSET").await?;
        let r = self.read_reply().await?;
        if r.code == 250 {
            Ok(())
        } else {
            Err(SendError::Temp(format!("RSET: {r}")))
        }
    }

    /// Ends the session politely (best effort).
    pub async fn quit(mut self) {
        if self.line("QUIT").await.is_ok() {
            let _ = self.read_reply().await;
        }
    }
}

fn verb(line: &str) -> &str {
    if line.starts_with("MAIL") {
        "MAIL FROM"
    } else {
        "RCPT TO"
    }
}

async fn open(target: &str, source: Option<&str>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(target).await;
    };
    let ip: std::net::IpAddr = source.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("source {source:?} is not an IP address"),
        )
    })?;
    let mut last = None;
    for addr in tokio::net::lookup_host(target).await? {
        if addr.is_ipv4() != ip.is_ipv4() {
            continue;
        }
        let socket = if ip.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{target} has no address of the source's family"),
        )
    }))
}

/// DATA content for DATA-safe bytes: a leading `.` on a line doubled.
fn dot_stuff(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 16);
    let mut at_line_start = true;
    for &c in b {
        if at_line_start && c == b'.' {
            out.push(b'.');
        }
        out.push(c);
        at_line_start = c == b'\n';
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shapes() {
        assert_eq!(Body::of(b""), Body::SevenBit);
        assert_eq!(Body::of(b"a\r\nb\r\n"), Body::SevenBit);
        assert_eq!(Body::of("ü\r\n".as_bytes()), Body::EightBit);
        for binary in [
            &b"no final crlf"[..],
            b"bare\nlf\r\n",
            b"bare\rcr\r\n",
            b"nul\0\r\n",
        ] {
            assert_eq!(Body::of(binary), Body::Binary, "{binary:?}");
        }
        let long = [b"x".repeat(999), b"\r\n".to_vec()].concat();
        assert_eq!(Body::of(&long), Body::Binary);
        let ok = [b"x".repeat(998), b"\r\n".to_vec()].concat();
        assert_eq!(Body::of(&ok), Body::SevenBit);
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\n..b\r\nc.\r\n"), b"..a\r\n...b\r\nc.\r\n");
    }

    mod tls {
        use std::sync::Arc;
        use std::time::Duration;

        use tokio::sync::watch;

        use super::super::*;
        use crate::config::{BindAddr, ListenerConfig, ListenerTls, Protocol};
        use crate::smtp::session::tests::FakeSink;
        use crate::smtp::{Listener, Sink};
        use crate::tls::testing::TestCa;

        /// A listener on 127.0.0.1 with `tls` (client certificates from `peers` required),
        /// serving until the returned sender is dropped.
        fn listen(
            tls: Option<(&TestCa, &TestCa)>,
        ) -> (
            String,
            Arc<FakeSink>,
            watch::Sender<bool>,
            tempfile::TempDir,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let tls = tls.map(|(ca, peers)| {
                let (_, cert, key) = ca.write(dir.path(), "b", "archive-b");
                let client_ca = dir.path().join("peers.pem");
                std::fs::write(&client_ca, peers.pem()).unwrap();
                ListenerTls {
                    cert,
                    key,
                    required: true,
                    require_client_cert: true,
                    client_ca: Some(client_ca),
                }
            });
            let config = ListenerConfig {
                name: "ha".into(),
                protocol: Protocol::Smtp,
                bind: BindAddr::Tcp("127.0.0.1:0".parse().unwrap()),
                allow: vec!["127.0.0.0/8".parse().unwrap()],
                proxy_protocol: false,
                trusted_proxies: vec![],
                max_message_size: 1000,
                max_recipients: 10,
                max_connections: 4,
                idle_timeout: Duration::from_secs(10),
                trust_xcoffer: true,
                socket_mode: None,
                socket_group: None,
                tls,
            };
            let l = Listener::bind(Arc::new(config)).unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let sink = Arc::new(FakeSink::default());
            let dyn_sink: Arc<dyn Sink> = sink.clone();
            let (stop, rx) = watch::channel(false);
            tokio::spawn(l.serve(dyn_sink, "archive-b".into(), rx));
            (addr, sink, stop, dir)
        }

        fn to(config: Arc<rustls::ClientConfig>, name: &str) -> TlsTo {
            TlsTo {
                config,
                name: crate::tls::server_name(name).unwrap(),
            }
        }

        const T: Duration = Duration::from_secs(20);

        #[tokio::test]
        async fn ships_over_tls_with_a_client_certificate() {
            let (ca, peers) = (TestCa::new("Nodes CA"), TestCa::new("Peers CA"));
            let (addr, sink, _stop, _dir) = listen(Some((&ca, &peers)));
            let tls = to(ca.client(Some((&peers, "archive-a"))), "archive-b");
            let mut c = SmtpConn::connect(&addr, None, "archive-a", T, Some(&tls))
                .await
                .unwrap();
            // Learned from the EHLO after the handshake.
            assert!(!c.caps.starttls);
            assert_eq!(c.caps.xcoffer.as_ref().unwrap().0, "archive-a");
            c.send("s@example.org", &["r@example.net".into()], b"hi\r\n", None)
                .await
                .unwrap();
            c.quit().await;
            let got = sink.got.lock().unwrap();
            let info = got[0].session.tls.as_ref().unwrap();
            assert_eq!(info.peer_issuer.as_deref(), Some("CN=Peers CA"));
            assert!(info
                .peer_subject
                .as_deref()
                .unwrap()
                .ends_with("CN=archive-a"));
        }

        #[tokio::test]
        async fn never_falls_back_to_the_clear_or_a_wrong_certificate() {
            let (ca, peers) = (TestCa::new("Nodes CA"), TestCa::new("Peers CA"));
            let other = TestCa::new("Other CA");
            let (addr, sink, _stop, _dir) = listen(Some((&ca, &peers)));
            let (plain, plain_sink, _stop2, _dir2) = listen(None);
            let cases = [
                (
                    &plain,
                    to(ca.client(Some((&peers, "a"))), "archive-b"),
                    "does not offer STARTTLS",
                ),
                (
                    &addr,
                    to(ca.client(Some((&peers, "a"))), "archive-c"),
                    "TLS handshake with `archive-c` failed",
                ),
                (
                    &addr,
                    to(other.client(Some((&peers, "a"))), "archive-b"),
                    "TLS handshake with `archive-b` failed",
                ),
                // The listener refuses a client without a certificate of its CA.
                (&addr, to(ca.client(None), "archive-b"), ""),
                (&addr, to(ca.client(Some((&other, "a"))), "archive-b"), ""),
            ];
            for (target, tls, why) in cases {
                let e = match SmtpConn::connect(target, None, "a", T, Some(&tls)).await {
                    Ok(_) => panic!("{target} {why}: connected"),
                    Err(e) => e,
                };
                assert!(matches!(e, SendError::Connect(_)), "{e:?}");
                assert!(e.to_string().contains(why), "{e}");
            }
            assert!(sink.got.lock().unwrap().is_empty());
            assert!(plain_sink.got.lock().unwrap().is_empty());
        }
    }
}
