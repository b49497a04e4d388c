//! mboxrd, written by `coffer export --format mbox` and read by `coffer import --format
//! mbox`.
//!
//! Writing: each message is `From SENDER ASCTIME\n`, the message with every line that
//! matches `^>*From ` given one more `>`, a `\n` if the message did not end in one, and
//! a blank line (`\n`). Reading undoes exactly that, so a message that ended in a newline
//! comes back byte for byte. mboxo files (only `^From ` quoted) read the same way; the
//! one ambiguity of mboxo (a body line that was `>From ` to begin with) cannot be undone.

use std::io::{self, BufRead, Write};

/// The sender shown in a `From ` line for the null reverse path.
pub const NULL_SENDER: &str = "MAILER-DAEMON";

/// Whether `line` (without its end) matches `^>*From `.
fn is_from_line(line: &[u8]) -> bool {
    let rest = &line[line.iter().take_while(|&&b| b == b'>').count()..];
    rest.starts_with(b"From ")
}

/// The `From ` separator line (with its `\n`) for a message whose first arrival had
/// envelope sender `sender` (empty: the null sender) at `time` (RFC 3339).
pub fn separator(sender: &str, time: &str) -> String {
    let sender = sender.trim();
    let sender = if sender.is_empty() {
        NULL_SENDER.to_owned()
    } else {
        // The line is split on white space: a quoted local part must not break it.
        sender.replace(char::is_whitespace, "_")
    };
    let when = chrono::DateTime::parse_from_rfc3339(time)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_default();
    format!("From {sender} {}\n", when.format("%a %b %e %H:%M:%S %Y"))
}

/// Writes one message in mboxrd form: separator, quoted lines, final newline, blank line.
///
/// # Errors
/// Whatever `out` returns.
pub fn write_message(
    out: &mut dyn Write,
    sender: &str,
    time: &str,
    bytes: &[u8],
) -> io::Result<()> {
    out.write_all(separator(sender, time).as_bytes())?;
    quote(out, bytes)?;
    if !bytes.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.write_all(b"\n")
}

/// Writes `bytes` with one more `>` in front of every line matching `^>*From `.
///
/// # Errors
/// Whatever `out` returns.
pub fn quote(out: &mut dyn Write, bytes: &[u8]) -> io::Result<()> {
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        if is_from_line(line) {
            out.write_all(b">")?;
        }
        out.write_all(line)?;
    }
    Ok(())
}

/// Appends `line` to `msg` with one `>` taken off if it matches `^>+From `.
fn unquote_line(msg: &mut Vec<u8>, line: &[u8]) {
    if line.first() == Some(&b'>') && is_from_line(line) {
        msg.extend_from_slice(&line[1..]);
    } else {
        msg.extend_from_slice(line);
    }
}

/// One message read from an mbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MboxMessage {
    /// Byte offset of its `From ` line in the file.
    pub offset: u64,
    /// The sender of the `From ` line; empty for `MAILER-DAEMON` or `<>`.
    pub sender: String,
    /// The message, unquoted, without the separating blank line.
    pub bytes: Vec<u8>,
}

/// Reads messages from an mboxrd (or mboxo) stream, one at a time.
pub struct MboxReader<R> {
    input: R,
    /// Bytes consumed so far.
    pos: u64,
    /// The `From ` line that starts the next message: its offset and sender.
    next: Option<(u64, String)>,
    started: bool,
    line: Vec<u8>,
}

impl<R: BufRead> MboxReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            pos: 0,
            next: None,
            started: false,
            line: Vec::new(),
        }
    }

    /// Bytes of input consumed so far (for progress).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads one line into `self.line`; false at the end of the input.
    fn read_line(&mut self) -> io::Result<bool> {
        self.line.clear();
        let n = self.input.read_until(b'\n', &mut self.line)?;
        self.pos += n as u64;
        Ok(n > 0)
    }

    fn sender_of(line: &[u8]) -> String {
        let text = String::from_utf8_lossy(&line[5..]);
        let s = text.split_whitespace().next().unwrap_or("");
        let s = s.trim_start_matches('<').trim_end_matches('>');
        if s.eq_ignore_ascii_case(NULL_SENDER) {
            String::new()
        } else {
            s.to_owned()
        }
    }

    /// The next message, or `None` at the end.
    ///
    /// # Errors
    /// Read errors; `InvalidData` if the input does not start with a `From ` line.
    pub fn next_message(&mut self) -> io::Result<Option<MboxMessage>> {
        if !self.started {
            self.started = true;
            // Leading blank lines are tolerated; anything else first is not an mbox.
            loop {
                let start = self.pos;
                if !self.read_line()? {
                    return Ok(None);
                }
                if self.line.starts_with(b"From ") {
                    self.next = Some((start, Self::sender_of(&self.line)));
                    break;
                }
                if !self.line.iter().all(u8::is_ascii_whitespace) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "not an mbox: the first line is not a \"From \" line",
                    ));
                }
            }
        }
        let Some((offset, sender)) = self.next.take() else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        loop {
            let start = self.pos;
            if !self.read_line()? {
                break;
            }
            if self.line.starts_with(b"From ") {
                self.next = Some((start, Self::sender_of(&self.line)));
                break;
            }
            unquote_line(&mut bytes, &self.line);
        }
        // Drop the blank line that separates messages.
        if bytes.ends_with(b"\n\n") {
            bytes.pop();
        } else if bytes.ends_with(b"\n\r\n") {
            bytes.truncate(bytes.len() - 2);
        }
        Ok(Some(MboxMessage {
            offset,
            sender,
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(msgs: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (sender, bytes) in msgs {
            write_message(&mut out, sender, "2026-01-02T03:04:05.123456Z", bytes).unwrap();
        }
        out
    }

    fn read_all(mbox: &[u8]) -> Vec<MboxMessage> {
        let mut r = MboxReader::new(mbox);
        let mut out = Vec::new();
        while let Some(m) = r.next_message().unwrap() {
            out.push(m);
        }
        assert_eq!(r.position(), mbox.len() as u64);
        out
    }

    #[test]
    fn separator_line_has_sender_and_asctime() {
        assert_eq!(
            separator("alice@example.org", "2026-01-02T03:04:05Z"),
            "From alice@example.org Fri Jan  2 03:04:05 2026\n"
        );
        assert_eq!(
            separator("", "2026-11-12T13:14:15+01:00"),
            "From MAILER-DAEMON Thu Nov 12 12:14:15 2026\n"
        );
        assert!(separator("\"a b\"@x", "2026-01-02T03:04:05Z").starts_with("From \"a_b\"@x "));
    }

    #[test]
    fn quoting_adds_one_level_to_every_from_line() {
        let mut out = Vec::new();
        quote(
            &mut out,
            b"From here\r\n>From there\n>>From x\nFrom\n From y\n>From",
        )
        .unwrap();
        assert_eq!(
            out,
            b">From here\r\n>>From there\n>>>From x\nFrom\n From y\n>From".to_vec()
        );
    }

    #[test]
    fn quoting_round_trips_exact_bytes() {
        let bodies: [&[u8]; 7] = [
            b"Subject: a\r\n\r\nFrom me\r\n>From you\r\n>>From them\r\n",
            b"Subject: b\r\n\r\nno final newline",
            b"Subject: c\n\nbare LF\n\n\n",
            b"From \r\n\r\n",
            b"",
            b"\r\n",
            b"Subject: \0 nul\r\n\r\n\xff\xfe bytes\r\n",
        ];
        let senders = ["a@x", "", "MAILER-DAEMON", "b@y", "c@z", "", "<>"];
        let msgs: Vec<(&str, &[u8])> = senders.iter().copied().zip(bodies).collect();
        let mbox = write_all(&msgs);
        let back = read_all(&mbox);
        assert_eq!(back.len(), bodies.len());
        for (i, (m, body)) in back.iter().zip(bodies).enumerate() {
            let want: Vec<u8> = if body.ends_with(b"\n") {
                body.to_vec()
            } else {
                [body, b"\n"].concat()
            };
            assert_eq!(m.bytes, want, "message {i}");
            let sender = senders[i];
            let want_sender = if sender == "MAILER-DAEMON" || sender == "<>" {
                ""
            } else {
                sender
            };
            assert_eq!(m.sender, want_sender, "message {i}");
            assert!(mbox[m.offset as usize..].starts_with(b"From "));
        }
    }

    #[test]
    fn reads_foreign_mboxes() {
        // mboxo with CRLF separators and leading blank lines.
        let mbox = b"\n\nFrom a@x Mon Jan  1 00:00:00 2024\r\nSubject: 1\r\n\r\n>From x\r\n\r\nFrom <> Mon Jan  1 00:00:00 2024\r\nSubject: 2\r\n";
        let back = read_all(mbox);
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].bytes, b"Subject: 1\r\n\r\nFrom x\r\n");
        assert_eq!(back[0].sender, "a@x");
        assert_eq!(back[0].offset, 2);
        assert_eq!(back[1].bytes, b"Subject: 2\r\n");
        assert_eq!(back[1].sender, "");
        assert!(read_all(b"").is_empty());
        let err = MboxReader::new(&b"Subject: x\n\nbody\n"[..])
            .next_message()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
