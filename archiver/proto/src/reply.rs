//! SMTP/LMTP replies as a client reads them: sans-IO, bounded.
//!
//! Both Coffer clients — coffer-milter's LMTP hand-off and cofferd's replicators — read
//! replies line by line with [`ReplyReader`]; the I/O (and its time-outs) stays theirs.

use std::fmt;

/// Longest reply line read (RFC 5321 says 512; be generous).
pub const MAX_REPLY_LINE: usize = 8192;
/// Most lines in one multi-line reply.
pub const MAX_REPLY_LINES: usize = 100;

/// One (possibly multi-line) reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, without code and separator.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The text of the last line.
    pub fn text(&self) -> &str {
        self.lines.last().map_or("", String::as_str)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// Why a reply could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    /// A line without its line end within [`MAX_REPLY_LINE`] bytes.
    LineTooLong,
    /// More than [`MAX_REPLY_LINES`] lines.
    TooManyLines,
    /// A line that does not start with a three-digit code.
    NotAReply(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LineTooLong => f.write_str("reply line too long"),
            Self::TooManyLines => f.write_str("reply has too many lines"),
            Self::NotAReply(line) => write!(f, "not a reply: {line:?}"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// Collects the lines of one reply.
#[derive(Debug, Default)]
pub struct ReplyReader {
    lines: Vec<String>,
}

impl ReplyReader {
    /// Feeds one line as read, line end included (read at most [`MAX_REPLY_LINE`] bytes
    /// up to `\n`). Returns the reply once its last line (`NNN ` rather than `NNN-`) came.
    ///
    /// # Errors
    /// A line cut short, not a reply, or one line too many.
    pub fn line(&mut self, raw: &[u8]) -> Result<Option<Reply>, ReplyError> {
        if !raw.ends_with(b"\n") {
            return Err(ReplyError::LineTooLong);
        }
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let code = line
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| ReplyError::NotAReply(line.to_owned()))?;
        let more = line.as_bytes().get(3) == Some(&b'-');
        self.lines.push(line.get(4..).unwrap_or("").to_owned());
        if !more {
            return Ok(Some(Reply {
                code,
                lines: std::mem::take(&mut self.lines),
            }));
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(lines: &[&str]) -> Result<Option<Reply>, ReplyError> {
        let mut r = ReplyReader::default();
        let mut last = Ok(None);
        for l in lines {
            last = r.line(l.as_bytes());
            if last.is_err() {
                break;
            }
        }
        last
    }

    #[test]
    fn single_and_multi_line_replies() {
        let r = read(&["250 2.0.0 Ok\r\n"]).unwrap().unwrap();
        assert_eq!((r.code, r.text(), r.is_ok()), (250, "2.0.0 Ok", true));
        let r = read(&[
            "250-mx\r\n",
            "250-PIPELINING\n",
            "250 XCOFFER a 0badf00d\r\n",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.lines, ["mx", "PIPELINING", "XCOFFER a 0badf00d"]);
        assert_eq!(r.to_string(), "250 mx / PIPELINING / XCOFFER a 0badf00d");
        assert_eq!(read(&["250-more\r\n"]), Ok(None));
        let r = read(&["451\r\n"]).unwrap().unwrap();
        assert_eq!((r.code, r.text(), r.is_ok()), (451, "", false));
    }

    #[test]
    fn bad_replies() {
        assert_eq!(read(&["250 no line end"]), Err(ReplyError::LineTooLong));
        assert!(matches!(
            read(&["hello\r\n"]),
            Err(ReplyError::NotAReply(_))
        ));
        assert!(matches!(
            read(&["2x0 x\r\n"]),
            Err(ReplyError::NotAReply(_))
        ));
        let many: Vec<&str> = std::iter::repeat_n("250-x\r\n", MAX_REPLY_LINES).collect();
        assert_eq!(read(&many), Err(ReplyError::TooManyLines));
    }
}
