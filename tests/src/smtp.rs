//! A tiny blocking SMTP client over `std::net::TcpStream`, enough to drive `cofferd` the
//! way an MTA does: greeting, EHLO, MAIL, RCPT, DATA with dot-stuffing, QUIT.
//!
//! Every read has a timeout and every reply is bounded in line length and line count,
//! so a misbehaving server fails the test instead of hanging it.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

/// Read/write timeout on the socket: the longest a single reply may take (a durable
/// commit under load included).
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest reply line accepted (RFC 5321 says 512; be generous).
const MAX_LINE: u64 = 8192;
/// Most lines in one multi-line reply.
const MAX_LINES: usize = 200;

/// One (possibly multi-line) SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of every line, without code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    /// The text of the last line.
    pub fn text(&self) -> &str {
        self.lines.last().map_or("", String::as_str)
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// A message the server took: `250 2.0.0 Ok: <arrival id> <message id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub arrival_id: String,
    pub message_id: String,
    pub reply: Reply,
}

impl Accepted {
    /// Parses the final reply to DATA.
    ///
    /// # Errors
    /// Not a 250, or the text lacks `Ok: <arrival> <64 hex digits>`.
    pub fn parse(reply: Reply) -> anyhow::Result<Accepted> {
        if reply.code != 250 {
            bail!("DATA not accepted: {reply}");
        }
        let text = reply.text();
        let rest = text
            .split_once("Ok:")
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("no `Ok:` in the reply to DATA: {reply}"))?;
        let mut words = rest.split_whitespace();
        let (Some(arrival), Some(msgid)) = (words.next(), words.next()) else {
            bail!("expected `Ok: <arrival id> <message id>`: {reply}");
        };
        if msgid.len() != 64 || !msgid.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("message id is not 64 hex digits: {reply}");
        }
        Ok(Accepted {
            arrival_id: arrival.to_owned(),
            message_id: msgid.to_ascii_lowercase(),
            reply,
        })
    }
}

/// Dot-stuffs `msg` for DATA and appends the terminator: a `.` is doubled at the start
/// of the message and after every CRLF; a CRLF is added first when `msg` does not end
/// with one. Only CRLF ends a line here: a `.` after a bare LF is sent as is, and the
/// server must not treat `\n.\r\n` as the end of data.
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + 5);
    let mut at_line_start = true;
    let mut prev = 0u8;
    for &b in msg {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = prev == b'\r' && b == b'\n';
        prev = b;
    }
    if !msg.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A blocking SMTP session.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The 220 greeting.
    pub greeting: Reply,
    /// EHLO keywords (upper-cased first word of each line after the first).
    pub extensions: Vec<String>,
}

impl SmtpClient {
    /// Connects and reads the greeting.
    ///
    /// # Errors
    /// Connecting, a timeout, or a greeting that is not 220.
    pub fn connect(addr: SocketAddr) -> anyhow::Result<SmtpClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connect {addr}"))?;
        Self::over(s)
    }

    /// Starts a session on a connected stream (e.g. one bound to a chosen source
    /// address): reads the greeting.
    ///
    /// # Errors
    /// A timeout, or a greeting that is not 220.
    pub fn over(s: TcpStream) -> anyhow::Result<SmtpClient> {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        let writer = s.try_clone()?;
        let mut c = SmtpClient {
            reader: BufReader::new(s),
            writer,
            greeting: Reply {
                code: 0,
                lines: vec![],
            },
            extensions: vec![],
        };
        let g = c.read_reply().context("greeting")?;
        if g.code != 220 {
            bail!("greeting is not 220: {g}");
        }
        c.greeting = g;
        Ok(c)
    }

    /// Reads one reply, all of its lines.
    ///
    /// # Errors
    /// I/O, timeout, EOF, or a malformed or over-long reply.
    pub fn read_reply(&mut self) -> anyhow::Result<Reply> {
        read_reply(&mut self.reader)
    }

    /// Sends one command line (CRLF added) and reads the reply.
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn command(&mut self, line: &str) -> anyhow::Result<Reply> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\r\n")?;
        self.writer.flush()?;
        self.read_reply()
            .with_context(|| format!("reply to {line:?}"))
    }

    /// EHLO; remembers the advertised extensions.
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn ehlo(&mut self, name: &str) -> anyhow::Result<Reply> {
        let r = self.command(&format!("EHLO {name}"))?;
        if r.code == 250 {
            self.extensions = r
                .lines
                .iter()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_ascii_uppercase)
                .collect();
        }
        Ok(r)
    }

    /// MAIL FROM:<from> (no parameters).
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn mail(&mut self, from: &str) -> anyhow::Result<Reply> {
        self.command(&format!("MAIL FROM:<{from}>"))
    }

    /// RCPT TO:<to>.
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn rcpt(&mut self, to: &str) -> anyhow::Result<Reply> {
        self.command(&format!("RCPT TO:<{to}>"))
    }

    /// DATA, then the dot-stuffed message, then the final reply.
    ///
    /// # Errors
    /// DATA refused (the reply is in the error), I/O, or a malformed reply.
    pub fn data(&mut self, msg: &[u8]) -> anyhow::Result<Reply> {
        let r = self.command("DATA")?;
        if r.code != 354 {
            bail!("DATA refused: {r}");
        }
        self.writer.write_all(&dot_stuff(msg))?;
        self.writer.flush()?;
        self.read_reply().context("reply after the final dot")
    }

    /// One whole transaction: MAIL, every RCPT, DATA; expects `250 … Ok: <arrival> <id>`.
    ///
    /// # Errors
    /// Any negative reply (with the step that failed), I/O, or a 250 without ids.
    pub fn send(&mut self, from: &str, to: &[&str], msg: &[u8]) -> anyhow::Result<Accepted> {
        let r = self.mail(from)?;
        if r.code != 250 {
            bail!("MAIL FROM refused: {r}");
        }
        for rcpt in to {
            let r = self.rcpt(rcpt)?;
            if r.code != 250 && r.code != 251 {
                bail!("RCPT TO:<{rcpt}> refused: {r}");
            }
        }
        Accepted::parse(self.data(msg)?)
    }

    /// RSET.
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn rset(&mut self) -> anyhow::Result<Reply> {
        self.command("RSET")
    }

    /// QUIT, then reads until the server closes the connection (bounded).
    ///
    /// # Errors
    /// I/O or a malformed reply.
    pub fn quit(mut self) -> anyhow::Result<Reply> {
        let r = self.command("QUIT")?;
        let mut rest = Vec::new();
        let _ = (&mut self.reader).take(64 * 1024).read_to_end(&mut rest);
        Ok(r)
    }
}

/// Reads one reply, all of its lines, from `reader`: at most [`MAX_LINES`] lines of at
/// most [`MAX_LINE`] bytes each.
///
/// # Errors
/// I/O, timeout, EOF, or a malformed or over-long reply.
pub fn read_reply(reader: &mut impl BufRead) -> anyhow::Result<Reply> {
    let mut lines = Vec::new();
    for _ in 0..MAX_LINES {
        let mut raw = Vec::new();
        let n = reader.take(MAX_LINE).read_until(b'\n', &mut raw)?;
        if n == 0 {
            bail!("connection closed while waiting for a reply");
        }
        if !raw.ends_with(b"\n") {
            bail!("reply line over {MAX_LINE} bytes or cut short");
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.len() < 3 || !line.is_char_boundary(3) {
            bail!("malformed reply line {line:?}");
        }
        let code: u16 = line[..3]
            .parse()
            .map_err(|_| anyhow!("bad reply code {line:?}"))?;
        let sep = line.as_bytes().get(3).copied();
        lines.push(line.get(4..).unwrap_or("").to_owned());
        match sep {
            Some(b'-') => continue,
            None | Some(b' ') => return Ok(Reply { code, lines }),
            Some(_) => bail!("malformed reply line {line:?}"),
        }
    }
    bail!("reply longer than {MAX_LINES} lines")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b""), b"\r\n.\r\n");
        assert_eq!(dot_stuff(b"a\r\n"), b"a\r\n.\r\n");
        assert_eq!(dot_stuff(b"a"), b"a\r\n.\r\n");
        assert_eq!(dot_stuff(b".a\r\n.\r\n"), b"..a\r\n..\r\n.\r\n");
        assert_eq!(dot_stuff(b"x\r\n..y\r\n"), b"x\r\n...y\r\n.\r\n");
        // Only CRLF starts a line: a bare LF or a bare CR does not.
        assert_eq!(dot_stuff(b"x\n.y\r\n"), b"x\n.y\r\n.\r\n");
        assert_eq!(dot_stuff(b"x\r.y\r\n"), b"x\r.y\r\n.\r\n");
        assert_eq!(dot_stuff(b"x\r\n.\n"), b"x\r\n..\n\r\n.\r\n");
    }

    #[test]
    fn accepted_parses_ids() {
        let id = "a".repeat(64);
        let r = Reply {
            code: 250,
            lines: vec![format!("2.0.0 Ok: e2e/0badf00d/7 {id}")],
        };
        let a = Accepted::parse(r).unwrap();
        assert_eq!(a.arrival_id, "e2e/0badf00d/7");
        assert_eq!(a.message_id, id);
        assert!(Accepted::parse(Reply {
            code: 451,
            lines: vec!["4.3.0 busy".into()]
        })
        .is_err());
        assert!(Accepted::parse(Reply {
            code: 250,
            lines: vec!["2.0.0 Ok".into()]
        })
        .is_err());
    }
}
