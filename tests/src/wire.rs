//! A raw, line-level SMTP/LMTP client over TCP or a Unix socket, for the scenarios that
//! need more control than [`SmtpClient`](crate::SmtpClient): LHLO, BDAT chunks at exact
//! sizes, pipelined commands, parameters such as `XCOFFER=`, a greeting that is not 220,
//! closing in the middle of a chunk.
//!
//! Every read has a timeout, every reply is bounded in line length and line count, and
//! reading to EOF is bounded in bytes, so a misbehaving server fails the test instead of
//! hanging it.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::smtp::{Reply, IO_TIMEOUT};

/// Most bytes read by [`Wire::read_to_eof`].
const MAX_TAIL: u64 = 1 << 20;

/// A connected stream: TCP or Unix.
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
                s.set_nodelay(true)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// One raw session. The greeting is read on connect and kept, whatever its code.
pub struct Wire {
    reader: BufReader<Conn>,
    writer: Conn,
    /// The first reply the server sent (220, or 554 when the client is not allowed).
    pub greeting: Reply,
}

impl Wire {
    /// Connects over TCP and reads the greeting.
    ///
    /// # Errors
    /// Connecting, a timeout, or a malformed greeting.
    pub fn tcp(addr: SocketAddr) -> anyhow::Result<Wire> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect {addr}"))?;
        Self::from_conn(Conn::Tcp(s))
    }

    /// Connects over TCP from the local address `from` (e.g. `127.0.0.3`, to be a client
    /// some `allow` list does or does not name) and reads the greeting.
    ///
    /// # Errors
    /// Binding, connecting, a timeout, or a malformed greeting.
    pub fn tcp_from(from: std::net::IpAddr, addr: SocketAddr) -> anyhow::Result<Wire> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let stream = rt.block_on(async {
            let s = if from.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            s.bind(SocketAddr::new(from, 0))?;
            let stream = tokio::time::timeout(Duration::from_secs(10), s.connect(addr))
                .await
                .map_err(|_| anyhow::anyhow!("connect {addr} from {from}: timed out"))??;
            anyhow::Ok(stream.into_std()?)
        })?;
        stream.set_nonblocking(false)?;
        Self::from_conn(Conn::Tcp(stream))
    }

    /// Connects to a Unix socket and reads the greeting.
    ///
    /// # Errors
    /// Connecting, a timeout, or a malformed greeting.
    pub fn unix(path: &Path) -> anyhow::Result<Wire> {
        let s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        Self::from_conn(Conn::Unix(s))
    }

    /// Wraps a stream connected elsewhere (e.g. from a chosen source address) and reads
    /// the greeting.
    ///
    /// # Errors
    /// A timeout or a malformed greeting.
    pub fn from_conn(conn: Conn) -> anyhow::Result<Wire> {
        conn.set_timeouts(IO_TIMEOUT)?;
        let writer = conn.try_clone()?;
        let mut w = Wire {
            reader: BufReader::new(conn),
            writer,
            greeting: Reply {
                code: 0,
                lines: vec![],
            },
        };
        w.greeting = w.read_reply().context("greeting")?;
        Ok(w)
    }

    /// Like [`Wire::tcp`] / [`Wire::unix`], and insists on a 220 greeting.
    ///
    /// # Errors
    /// As [`Wire::from_conn`], or a greeting that is not 220.
    pub fn expect_220(self) -> anyhow::Result<Wire> {
        if self.greeting.code != 220 {
            bail!("greeting is not 220: {}", self.greeting);
        }
        Ok(self)
    }

    /// Reads one reply, all of its lines.
    ///
    /// # Errors
    /// I/O, timeout, EOF, or a malformed or over-long reply.
    pub fn read_reply(&mut self) -> anyhow::Result<Reply> {
        crate::smtp::read_reply(&mut self.reader)
    }

    /// Writes `bytes` as they are.
    ///
    /// # Errors
    /// I/O.
    pub fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Writes one command line (CRLF added) without reading a reply (pipelining).
    ///
    /// # Errors
    /// I/O.
    pub fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        let mut b = Vec::with_capacity(line.len() + 2);
        b.extend_from_slice(line.as_bytes());
        b.extend_from_slice(b"\r\n");
        self.send_raw(&b)
    }

    /// Sends one command line and reads its reply.
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn cmd(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.send_line(line)?;
        self.read_reply()
            .with_context(|| format!("reply to {:?}", cut(line)))
    }

    /// Sends a command and insists on a reply code.
    ///
    /// # Errors
    /// I/O, or another code (the reply is in the error).
    pub fn expect(&mut self, line: &str, code: u16) -> anyhow::Result<Reply> {
        let r = self.cmd(line)?;
        if r.code != code {
            bail!("{:?}: expected {code}, got {r}", cut(line));
        }
        Ok(r)
    }

    /// `BDAT <len of chunk> [LAST]` followed by the chunk, in one write; reads the reply.
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn bdat(&mut self, chunk: &[u8], last: bool) -> anyhow::Result<Reply> {
        let mut b = format!(
            "BDAT {}{}\r\n",
            chunk.len(),
            if last { " LAST" } else { "" }
        )
        .into_bytes();
        b.extend_from_slice(chunk);
        self.send_raw(&b)?;
        self.read_reply()
            .with_context(|| format!("reply to BDAT {}", chunk.len()))
    }

    /// Half-closes the sending side: the server sees EOF.
    ///
    /// # Errors
    /// I/O.
    pub fn shutdown_write(&self) -> anyhow::Result<()> {
        self.writer.shutdown(Shutdown::Write)?;
        Ok(())
    }

    /// Reads until the server closes the connection (bounded in bytes and by the read
    /// timeout) and returns what came.
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = (&mut self.reader).take(MAX_TAIL).read_to_end(&mut rest);
        rest
    }

    /// QUIT, then reads to EOF (bounded).
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn quit(mut self) -> anyhow::Result<Reply> {
        let r = self.cmd("QUIT")?;
        let _ = self.read_to_eof();
        Ok(r)
    }
}

/// A command shortened for error messages (a 16 KiB MAIL line is not helpful in full).
fn cut(line: &str) -> String {
    if line.len() <= 120 {
        return line.to_owned();
    }
    let end = (0..=120)
        .rev()
        .find(|&i| line.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &line[..end], line.len())
}
