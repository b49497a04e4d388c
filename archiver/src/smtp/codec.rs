//! Sans-IO SMTP/LMTP codec: bytes in, [`Event`]s out.
//!
//! The codec has three modes. In *command* mode it frames lines itself (so that the line
//! cap is ours, not smtp-proto's, and so that a long `MAIL` line can be allowed for
//! XCOFFER), then parses each line into a typed [`Command`], using smtp-proto for
//! address and parameter syntax. In *data* mode (entered by the session with
//! [`Codec::start_data`] once it has answered 354) it collects the message: dot-unstuffing,
//! ending only at `<CRLF>.<CRLF>`, and never holding more than the size cap. In *chunk*
//! mode (entered by the session with [`Codec::start_chunk`] after a `BDAT` command) it
//! takes exactly the declared number of bytes, as they are.
//!
//! # DATA rules (docs/interfaces.md "Bytes", design.md §2.7)
//! - The start of DATA counts as the start of a line: a dot-stuffed first line is
//!   unstuffed, and a DATA that is only `.<CRLF>` ends with an empty message.
//! - Only `<CRLF>.<CRLF>` ends DATA. A bare LF or bare CR never starts a line, so
//!   `\n.\n`, `\n.\r\n`, `\r.\r\n` and `\r\n.\n` never end a message (SMTP smuggling).
//! - After a CRLF, a leading `.` is removed (dot-unstuffing); nothing else is changed.
//! - The archived bytes run up to and including the CRLF before the terminating dot.
//! - Past the size cap the codec stops buffering, keeps consuming to the terminator,
//!   then reports [`Event::TooBig`].
//!
//! # Memory
//! Command lines are held up to their cap (never past it: a longer line is discarded as
//! it arrives). Message content is buffered up to the size cap, and every byte of buffer
//! capacity is first claimed from the [`Budget`] given with [`Codec::set_budget`]; when
//! the budget refuses, the content is read and dropped, and the end of the message is
//! reported as [`Event::OverBudget`] (DATA) or an empty [`Event::Chunk`] (BDAT). The
//! session gives the claim back with [`Codec::release_budget`] once it is done with the
//! message.
//!
//! # BDAT rules (RFC 3030)
//! - `BDAT <size> [LAST]`: `size` is 1*DIGIT and fits a `u64`; `LAST` in any case. Anything
//!   else is [`CommandError::BadBdat`]: the chunk's length is unknown, so the stream can
//!   no longer be followed and the session closes.
//! - A chunk is exactly `size` bytes, binary, with no dot-stuffing and no line structure:
//!   NUL, bare CR or LF, `<CRLF>.<CRLF>` and command-like text are all content.
//! - The session decides whether a chunk is kept (appended to the message so far) or
//!   consumed and dropped (refused, or over the size cap); either way every declared byte
//!   is read before the next command, so a refused chunk is never taken for commands.

use std::borrow::Cow;

use smtp_proto::Request;

use super::budget::{Budget, Claim};

/// Longest command line accepted, CRLF included. RFC 5321 asks for at least 512; this is
/// what smtp-proto's own receiver allows and leaves room for long parameter lists.
pub const MAX_LINE: usize = 4096;

/// Longest `MAIL` line accepted where XCOFFER is trusted: its metadata rides in a
/// parameter (docs/interfaces.md "Wire extensions").
pub const MAX_XCOFFER_MAIL_LINE: usize = 16 * 1024;

/// Line caps of a [`Codec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest command line, CRLF included.
    pub max_line: usize,
    /// Longest `MAIL` command line, CRLF included; at least `max_line`.
    pub max_mail_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: MAX_LINE,
            max_mail_line: MAX_LINE,
        }
    }
}

/// What [`Codec::decode`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// All input was consumed; feed more.
    NeedMore,
    /// One command line, parsed (or why it could not be).
    Command(Result<Command, CommandError>),
    /// DATA ended with `<CRLF>.<CRLF>`: the archived bytes.
    Message(Vec<u8>),
    /// DATA ended, but its content was larger than the cap: `size` bytes (after
    /// unstuffing) were received and dropped.
    TooBig { size: u64 },
    /// DATA ended, but the memory budget could not hold its content: `size` bytes were
    /// received and dropped. A temporary condition: the client may retry.
    OverBudget { size: u64 },
    /// A BDAT chunk was read whole: the message so far with the chunk appended, or `None`
    /// when the chunk was to be dropped (or was dropped because the memory budget could
    /// not hold it).
    Chunk(Option<Vec<u8>>),
}

/// A parsed command. Strings are exactly as the client sent them: a line with a NUL byte
/// or invalid UTF-8 is refused ([`CommandError::BadBytes`]), never altered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `HELO arg`: the raw argument.
    Helo(String),
    /// `EHLO arg`: the raw argument.
    Ehlo(String),
    /// `LHLO arg` (LMTP): the raw argument.
    Lhlo(String),
    Mail(MailFrom),
    Rcpt(RcptTo),
    Data,
    /// `BDAT size [LAST]`. The session must follow it with [`Codec::start_chunk`].
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    /// A command we know but do not offer (`EXPN`, `AUTH`, `ETRN`, `ATRN`, `BURL`).
    NotImplemented(&'static str),
}

/// `MAIL FROM:<path> params`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path between the angle brackets, as sent; empty for `<>`.
    pub address: String,
    /// Every parameter as sent, XCOFFER excepted.
    pub params: Vec<String>,
    /// The `SIZE=` value, if given.
    pub size: Option<u64>,
    /// The `BODY=` value, upper-cased, if given.
    pub body: Option<String>,
    /// The raw `XCOFFER=` value, if given. The session decides whether it is trusted.
    pub xcoffer: Option<String>,
}

/// `RCPT TO:<path> params`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptTo {
    /// The forward path between the angle brackets, as sent.
    pub address: String,
    /// Every parameter as sent.
    pub params: Vec<String>,
}

/// Why a command line was refused. The session turns these into replies.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("line too long")]
    LineTooLong,
    #[error("unrecognized command")]
    Unknown,
    #[error("syntax: {0}")]
    Syntax(&'static str),
    #[error("bad sender address syntax")]
    BadSender,
    #[error("bad recipient address syntax")]
    BadRecipient,
    #[error("invalid value for parameter {0}")]
    InvalidParam(String),
    #[error("unsupported parameter {0}")]
    UnsupportedParam(String),
    /// A `BDAT` line whose chunk size cannot be read: the stream is out of step.
    #[error("syntax: BDAT chunk-size [LAST]")]
    BadBdat,
    /// A known command whose line holds a NUL byte or is not UTF-8. Refused rather than
    /// recorded altered: the envelope and the HELO name are kept as text, and a
    /// replacement character would not be what the client sent.
    #[error("{0} in command line")]
    BadBytes(&'static str),
}

const MAIL_SYNTAX: &str = "MAIL FROM:<reverse-path> [parameters]";
const RCPT_SYNTAX: &str = "RCPT TO:<forward-path> [parameters]";

/// MAIL parameters we accept: those of the extensions advertised in EHLO.
const MAIL_PARAMS: &[&str] = &["SIZE", "BODY", "SMTPUTF8"];
/// RCPT parameters we accept: none (DSN is not offered).
const RCPT_PARAMS: &[&str] = &[];

/// The incremental codec of one connection.
#[derive(Debug)]
pub struct Codec {
    limits: Limits,
    mode: Mode,
    /// Covers the capacity of the content buffers (DATA, and the BDAT message so far).
    claim: Claim,
}

#[derive(Debug)]
enum Mode {
    Command {
        /// A partial line carried over between calls; never longer than the line cap.
        line: Vec<u8>,
        /// The current line went over its cap: drop bytes up to the next LF.
        discarding: bool,
    },
    Data(DataState),
    Chunk {
        /// Chunk bytes still to read.
        remaining: u64,
        /// Where they go; `None` drops them.
        into: Option<Vec<u8>>,
    },
}

#[derive(Debug)]
struct DataState {
    /// The unstuffed content so far; never longer than `max`.
    buf: Vec<u8>,
    /// Content bytes seen (after unstuffing), buffered or not.
    size: u64,
    max: u64,
    pos: LinePos,
    /// The budget refused more buffer: content is counted, not kept.
    over_budget: bool,
}

/// The smallest content buffer allocated; it then grows by doubling, never past the
/// size cap.
const MIN_CONTENT_ALLOC: usize = 4096;

/// Where the data decoder is relative to CRLF line starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinePos {
    /// Right after a CRLF (or at the start of DATA).
    LineStart,
    /// Inside a line; `cr` when the last byte was a CR.
    Mid { cr: bool },
    /// Saw `.` at a line start (not yet emitted: it is either stuffing or the end).
    Dot,
    /// Saw `.` CR at a line start.
    DotCr,
}

impl Codec {
    pub fn new(limits: Limits) -> Self {
        assert!(limits.max_mail_line >= limits.max_line && limits.max_line >= 8);
        Self {
            limits,
            mode: Mode::Command {
                line: Vec::new(),
                discarding: false,
            },
            claim: Claim::default(),
        }
    }

    /// Claims content buffers from `budget` from now on (without one, nothing limits
    /// them but the size caps).
    pub fn set_budget(&mut self, budget: std::sync::Arc<Budget>) {
        self.claim.release();
        self.claim = Claim::on(budget);
    }

    /// Gives back the budget claimed for content buffers: call once the message they held
    /// has been handed over and answered, or dropped.
    pub fn release_budget(&mut self) {
        self.claim.release();
    }

    /// Bytes of budget claimed now.
    pub fn claimed(&self) -> u64 {
        self.claim.held()
    }

    /// Changes the line caps (e.g. allows a long MAIL line once XCOFFER is trusted).
    pub fn set_limits(&mut self, limits: Limits) {
        assert!(limits.max_mail_line >= limits.max_line && limits.max_line >= 8);
        self.limits = limits;
    }

    /// True while collecting message content: DATA, or a BDAT chunk.
    pub fn in_data(&self) -> bool {
        !matches!(self.mode, Mode::Command { .. })
    }

    /// Switches to chunk mode: the next `size` bytes are a BDAT chunk, taken as they are.
    /// With `into`, they are appended to it (the message so far) and it is returned in
    /// [`Event::Chunk`]; without, they are read and dropped. The caller bounds memory:
    /// pass `into` only when `into.len() + size` is within its size cap. A `size` of 0
    /// gives [`Event::Chunk`] at the next [`Codec::decode`], even with no input.
    pub fn start_chunk(&mut self, size: u64, into: Option<Vec<u8>>) {
        debug_assert!(!self.in_data(), "a chunk starts after a command");
        self.mode = Mode::Chunk {
            remaining: size,
            into,
        };
    }

    /// Switches to data mode: the bytes that follow are message content, up to
    /// `<CRLF>.<CRLF>`. At most `max_size` bytes are buffered.
    pub fn start_data(&mut self, max_size: u64) {
        self.mode = Mode::Data(DataState {
            buf: Vec::new(),
            size: 0,
            max: max_size,
            pos: LinePos::LineStart,
            over_budget: false,
        });
    }

    /// Decodes the next event from `input`. Returns how many bytes were consumed and the
    /// event; on [`Event::NeedMore`] all of `input` was consumed (partial lines are kept
    /// inside the codec). Call again with the rest after any other event.
    pub fn decode(&mut self, input: &[u8]) -> (usize, Event) {
        match &mut self.mode {
            Mode::Command { line, discarding } => {
                let Some(lf) = input.iter().position(|&b| b == b'\n') else {
                    if !*discarding {
                        // Checked before copying: the partial line never passes its cap.
                        if line.len() + input.len() > line_cap_of(line, input, &self.limits) {
                            *discarding = true;
                            *line = Vec::new();
                        } else {
                            line.extend_from_slice(input);
                        }
                    }
                    return (input.len(), Event::NeedMore);
                };
                let consumed = lf + 1;
                if *discarding {
                    *discarding = false;
                    return (consumed, Event::Command(Err(CommandError::LineTooLong)));
                }
                let full: Cow<'_, [u8]> = if line.is_empty() {
                    Cow::Borrowed(&input[..consumed])
                } else {
                    line.extend_from_slice(&input[..consumed]);
                    Cow::Owned(std::mem::take(line))
                };
                let event = if full.len() > line_cap(&full, &self.limits) {
                    Err(CommandError::LineTooLong)
                } else {
                    parse_line(&full)
                };
                (consumed, Event::Command(event))
            }
            Mode::Chunk { remaining, into } => {
                let take = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                if let Some(buf) = into {
                    // Grow by doubling, but never past this chunk's end: the caller's
                    // size cap bounds the allocation, not just the content. The budget
                    // is claimed first; when it refuses, the chunk is read and dropped.
                    let need = buf.len() + take;
                    let mut keep = true;
                    if need > buf.capacity() {
                        let end = buf.len() as u64 + *remaining;
                        let want = (buf.capacity() * 2).max(need).max(MIN_CONTENT_ALLOC) as u64;
                        let want = want.min(end);
                        if self.claim.grow_to(want) {
                            buf.reserve_exact(want as usize - buf.len());
                        } else {
                            keep = false;
                        }
                    }
                    if keep {
                        buf.extend_from_slice(&input[..take]);
                    } else {
                        *into = None;
                    }
                }
                *remaining -= take as u64;
                if *remaining > 0 {
                    return (take, Event::NeedMore);
                }
                let Mode::Chunk { into, .. } = std::mem::replace(
                    &mut self.mode,
                    Mode::Command {
                        line: Vec::new(),
                        discarding: false,
                    },
                ) else {
                    unreachable!("mode checked above")
                };
                (take, Event::Chunk(into))
            }
            Mode::Data(state) => {
                let (consumed, done) = state.ingest(input, &mut self.claim);
                if !done {
                    return (consumed, Event::NeedMore);
                }
                let Mode::Data(state) = std::mem::replace(
                    &mut self.mode,
                    Mode::Command {
                        line: Vec::new(),
                        discarding: false,
                    },
                ) else {
                    unreachable!("mode checked above")
                };
                let event = if state.size > state.max {
                    Event::TooBig { size: state.size }
                } else if state.over_budget {
                    Event::OverBudget { size: state.size }
                } else {
                    Event::Message(state.buf)
                };
                (consumed, event)
            }
        }
    }
}

/// The cap for the line that `line` followed by `more` starts.
fn line_cap_of(line: &[u8], more: &[u8], limits: &Limits) -> usize {
    let mut head = [0u8; 5];
    let n = line.len().min(5);
    head[..n].copy_from_slice(&line[..n]);
    let m = more.len().min(5 - n);
    head[n..n + m].copy_from_slice(&more[..m]);
    line_cap(&head[..n + m], limits)
}

/// The cap for a line starting with `start`: longer for MAIL.
fn line_cap(start: &[u8], limits: &Limits) -> usize {
    if start.len() >= 5 && start[..5].eq_ignore_ascii_case(b"MAIL ") {
        limits.max_mail_line
    } else {
        limits.max_line
    }
}

impl DataState {
    fn push(&mut self, bytes: &[u8], claim: &mut Claim) {
        self.size += bytes.len() as u64;
        if self.size > self.max || self.over_budget {
            // Over the cap or the budget: free what we held, keep counting.
            if self.buf.capacity() > 0 {
                self.buf = Vec::new();
            }
            return;
        }
        let need = self.buf.len() + bytes.len();
        if need > self.buf.capacity() {
            // Doubling, from a small start, never past the size cap (`need` is within it).
            let cap = usize::try_from(self.max).unwrap_or(usize::MAX);
            let want = (self.buf.capacity() * 2)
                .max(MIN_CONTENT_ALLOC)
                .min(cap)
                .max(need);
            if !claim.grow_to(want as u64) {
                self.over_budget = true;
                self.buf = Vec::new();
                return;
            }
            self.buf.reserve_exact(want - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Consumes content; returns (bytes consumed, whether the terminator was seen).
    fn ingest(&mut self, input: &[u8], claim: &mut Claim) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            match self.pos {
                LinePos::Mid { cr } => {
                    // Fast path: copy up to and including the next LF in one go.
                    let rest = &input[i..];
                    match rest.iter().position(|&b| b == b'\n') {
                        None => {
                            self.push(rest, claim);
                            self.pos = LinePos::Mid {
                                cr: rest.last() == Some(&b'\r'),
                            };
                            return (input.len(), false);
                        }
                        Some(lf) => {
                            let before_cr = if lf == 0 { cr } else { rest[lf - 1] == b'\r' };
                            self.push(&rest[..=lf], claim);
                            self.pos = if before_cr {
                                LinePos::LineStart
                            } else {
                                LinePos::Mid { cr: false }
                            };
                            i += lf + 1;
                        }
                    }
                }
                LinePos::LineStart => {
                    if input[i] == b'.' {
                        self.pos = LinePos::Dot;
                        i += 1;
                    } else {
                        self.pos = LinePos::Mid { cr: false };
                    }
                }
                LinePos::Dot => {
                    if input[i] == b'\r' {
                        self.pos = LinePos::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: dropped; the byte is ordinary content.
                        self.pos = LinePos::Mid { cr: false };
                    }
                }
                LinePos::DotCr => {
                    if input[i] == b'\n' {
                        return (i + 1, true);
                    }
                    // `.` CR then something else: the dot was stuffing, the CR is content.
                    self.push(b"\r", claim);
                    self.pos = LinePos::Mid { cr: true };
                }
            }
        }
        (input.len(), false)
    }
}

/// Every verb [`parse_line`] knows, BDAT aside.
const KNOWN_VERBS: &[&str] = &[
    "MAIL", "RCPT", "HELO", "EHLO", "LHLO", "DATA", "RSET", "QUIT", "STARTTLS", "NOOP", "HELP",
    "VRFY", "EXPN", "AUTH", "ETRN", "ATRN", "BURL",
];

/// Parses one complete command line (ending in LF).
fn parse_line(line: &[u8]) -> Result<Command, CommandError> {
    let body = strip_eol(line);
    let verb_end = body.iter().position(|&b| b == b' ').unwrap_or(body.len());
    let verb = &body[..verb_end];
    let arg = trim_start(&body[verb_end..]);
    let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());

    if is("BDAT") {
        // Before the byte check: a BDAT line that cannot be read must close the session
        // (its chunk would otherwise be taken for commands), and the strict syntax
        // refuses any odd byte anyway.
        return parse_bdat(trim_end(arg));
    }
    if KNOWN_VERBS.iter().any(|v| is(v)) {
        if body.contains(&0) {
            return Err(CommandError::BadBytes("NUL byte"));
        }
        if std::str::from_utf8(body).is_err() {
            return Err(CommandError::BadBytes("invalid UTF-8"));
        }
    }
    if is("MAIL") {
        return parse_mail(arg);
    }
    if is("RCPT") {
        return parse_rcpt(arg);
    }
    if is("HELO") || is("EHLO") || is("LHLO") {
        // Any non-empty argument is taken, and kept whole as evidence (smtp-proto would
        // refuse two spaces after the verb and cut the argument at the first space).
        let raw = trim_end(arg);
        if raw.is_empty() {
            return Err(CommandError::Syntax(if is("HELO") {
                "HELO domain"
            } else if is("EHLO") {
                "EHLO domain"
            } else {
                "LHLO domain"
            }));
        }
        let raw = String::from_utf8_lossy(raw).into_owned();
        return Ok(if is("HELO") {
            Command::Helo(raw)
        } else if is("EHLO") {
            Command::Ehlo(raw)
        } else {
            Command::Lhlo(raw)
        });
    }
    // Commands that take no argument, or whose argument we ignore.
    let no_arg = |cmd: Command, syntax: &'static str| {
        if trim_end(arg).is_empty() {
            Ok(cmd)
        } else {
            Err(CommandError::Syntax(syntax))
        }
    };
    if is("DATA") {
        return no_arg(Command::Data, "DATA");
    }
    if is("RSET") {
        return no_arg(Command::Rset, "RSET");
    }
    if is("QUIT") {
        return no_arg(Command::Quit, "QUIT");
    }
    if is("STARTTLS") {
        return no_arg(Command::StartTls, "STARTTLS");
    }
    if is("NOOP") {
        return Ok(Command::Noop);
    }
    if is("HELP") {
        return Ok(Command::Help);
    }
    if is("VRFY") {
        return if trim_end(arg).is_empty() {
            Err(CommandError::Syntax("VRFY string"))
        } else {
            Ok(Command::Vrfy)
        };
    }
    for name in ["EXPN", "AUTH", "ETRN", "ATRN", "BURL"] {
        if is(name) {
            return Ok(Command::NotImplemented(name));
        }
    }
    Err(CommandError::Unknown)
}

/// `chunk-size [SP "LAST"]` (RFC 3030), strictly: one space, digits only.
fn parse_bdat(arg: &[u8]) -> Result<Command, CommandError> {
    let (size, last) = match arg.iter().position(|&b| b == b' ') {
        None => (arg, false),
        Some(sp) if arg[sp + 1..].eq_ignore_ascii_case(b"LAST") => (&arg[..sp], true),
        Some(_) => return Err(CommandError::BadBdat),
    };
    if size.is_empty() || !size.iter().all(u8::is_ascii_digit) {
        return Err(CommandError::BadBdat);
    }
    let size = std::str::from_utf8(size)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(CommandError::BadBdat)?;
    Ok(Command::Bdat { size, last })
}

fn parse_mail(arg: &[u8]) -> Result<Command, CommandError> {
    let Some(rest) = strip_prefix_ci(arg, b"FROM:") else {
        return Err(CommandError::Syntax(MAIL_SYNTAX));
    };
    let (path, params) = split_path(rest).ok_or(CommandError::Syntax(MAIL_SYNTAX))?;
    let mut xcoffer = None;
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut size = None;
    let mut body = None;
    for p in &params {
        let key = param_key(p);
        if key.eq_ignore_ascii_case(b"XCOFFER") {
            let value = p.get(key.len() + 1..).unwrap_or_default();
            if xcoffer.is_some() || value.is_empty() {
                return Err(CommandError::InvalidParam("XCOFFER".into()));
            }
            xcoffer = Some(String::from_utf8_lossy(value).into_owned());
            continue;
        }
        check_known(key, MAIL_PARAMS)?;
        let value = p.get(key.len() + 1..).unwrap_or_default();
        if key.eq_ignore_ascii_case(b"SIZE") {
            size = Some(
                std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| CommandError::InvalidParam("SIZE".into()))?,
            );
        } else if key.eq_ignore_ascii_case(b"BODY") {
            body = Some(String::from_utf8_lossy(value).to_ascii_uppercase());
        }
        kept.push(p);
    }
    // smtp-proto validates the path and the parameters we kept (not XCOFFER, whose value
    // it would drop and whose length it would refuse).
    validate_with_smtp_proto(Verb::Mail, path, &kept)?;
    Ok(Command::Mail(MailFrom {
        address: String::from_utf8_lossy(path).into_owned(),
        params: kept
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
        size,
        body,
        xcoffer,
    }))
}

fn parse_rcpt(arg: &[u8]) -> Result<Command, CommandError> {
    let Some(rest) = strip_prefix_ci(arg, b"TO:") else {
        return Err(CommandError::Syntax(RCPT_SYNTAX));
    };
    let (path, params) = split_path(rest).ok_or(CommandError::Syntax(RCPT_SYNTAX))?;
    if path.is_empty() {
        return Err(CommandError::BadRecipient);
    }
    for p in &params {
        check_known(param_key(p), RCPT_PARAMS)?;
    }
    validate_with_smtp_proto(Verb::Rcpt, path, &[])?;
    Ok(Command::Rcpt(RcptTo {
        address: String::from_utf8_lossy(path).into_owned(),
        params: params
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
    }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Mail,
    Rcpt,
}

/// Rebuilds `MAIL FROM:<path> params` or `RCPT TO:<path>` as a canonical line and lets
/// smtp-proto check it (address syntax, the values of the parameters it knows).
fn validate_with_smtp_proto(verb: Verb, path: &[u8], params: &[&[u8]]) -> Result<(), CommandError> {
    let (prefix, bad_address, syntax): (&[u8], _, _) = match verb {
        Verb::Mail => (b"MAIL FROM:<", CommandError::BadSender, MAIL_SYNTAX),
        Verb::Rcpt => (b"RCPT TO:<", CommandError::BadRecipient, RCPT_SYNTAX),
    };
    // smtp-proto refuses address literals (`user@[192.0.2.1]`, RFC 5321 4.1.3), which
    // MTAs accept and hand on: check such a path with a placeholder domain instead. The
    // address is kept as sent.
    let placeholder = with_literal_replaced(path);
    let path = placeholder.as_deref().unwrap_or(path);
    let mut canon = Vec::with_capacity(
        prefix.len() + path.len() + 3 + params.iter().map(|p| p.len() + 1).sum::<usize>(),
    );
    canon.extend_from_slice(prefix);
    canon.extend_from_slice(path);
    canon.push(b'>');
    for p in params {
        canon.push(b' ');
        canon.extend_from_slice(p);
    }
    canon.extend_from_slice(b"\r\n");
    match (verb, Request::parse(&mut canon.iter())) {
        (Verb::Mail, Ok(Request::Mail { .. })) | (Verb::Rcpt, Ok(Request::Rcpt { .. })) => Ok(()),
        (_, Ok(_)) => Err(CommandError::Syntax(syntax)),
        (_, Err(e)) => Err(map_proto_error(e, bad_address, syntax)),
    }
}

/// `local@[literal]` with a valid IPv4 or `IPv6:` address literal, as
/// `local@address-literal.invalid`; `None` for any other path.
fn with_literal_replaced(path: &[u8]) -> Option<Vec<u8>> {
    let at = path.iter().rposition(|&b| b == b'@')?;
    let inner = path[at + 1..].strip_prefix(b"[")?.strip_suffix(b"]")?;
    let inner = std::str::from_utf8(inner).ok()?;
    let valid = inner.parse::<std::net::Ipv4Addr>().is_ok()
        || inner
            .get(..5)
            .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"))
            .and_then(|_| inner[5..].parse::<std::net::Ipv6Addr>().ok())
            .is_some();
    if !valid {
        return None;
    }
    let mut out = path[..=at].to_vec();
    out.extend_from_slice(b"address-literal.invalid");
    Some(out)
}

fn map_proto_error(
    e: smtp_proto::Error,
    bad_address: CommandError,
    syntax: &'static str,
) -> CommandError {
    match e {
        smtp_proto::Error::InvalidSenderAddress | smtp_proto::Error::InvalidRecipientAddress => {
            bad_address
        }
        smtp_proto::Error::InvalidParameter { param } => CommandError::InvalidParam(param.into()),
        smtp_proto::Error::UnsupportedParameter { param } => CommandError::UnsupportedParam(param),
        _ => CommandError::Syntax(syntax),
    }
}

fn check_known(key: &[u8], known: &[&str]) -> Result<(), CommandError> {
    if known.iter().any(|k| key.eq_ignore_ascii_case(k.as_bytes())) {
        Ok(())
    } else {
        Err(CommandError::UnsupportedParam(
            String::from_utf8_lossy(key).to_ascii_uppercase(),
        ))
    }
}

/// The keyword of `KEY=value` or `KEY`.
fn param_key(p: &[u8]) -> &[u8] {
    &p[..p.iter().position(|&b| b == b'=').unwrap_or(p.len())]
}

/// Splits `<path> params...` (spaces after the colon tolerated) into the raw path between
/// the brackets and the parameters. Quoted strings in the path may contain `>`.
fn split_path(rest: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let rest = trim_start(rest);
    let inner = rest.strip_prefix(b"<")?;
    let mut in_quote = false;
    let mut escaped = false;
    let mut end = None;
    for (i, &b) in inner.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if b == b'\\' && in_quote {
            escaped = true;
        } else if b == b'"' {
            in_quote = !in_quote;
        } else if b == b'>' && !in_quote {
            end = Some(i);
            break;
        }
    }
    let end = end?;
    let path = &inner[..end];
    let after = &inner[end + 1..];
    if !after.is_empty() && after[0] != b' ' {
        return None;
    }
    let params = after
        .split(|&b| b == b' ')
        .filter(|p| !p.is_empty())
        .collect();
    Some((path, params))
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

fn trim_end(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &s[..s.len() - n]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 64;

    /// Feeds `chunks` in order; enters data mode after every DATA command (as the session
    /// does after its 354), and chunk mode after every BDAT, appending chunks to the
    /// message so far until `LAST`. Returns every event but `NeedMore`.
    fn run(chunks: &[&[u8]], limits: Limits, max: u64) -> Vec<Event> {
        let mut codec = Codec::new(limits);
        let mut out = Vec::new();
        let mut message = Vec::new();
        let mut last = false;
        for chunk in chunks {
            let mut rest = *chunk;
            loop {
                let (n, ev) = codec.decode(rest);
                assert!(n <= rest.len());
                rest = &rest[n..];
                match &ev {
                    Event::NeedMore => {
                        assert!(rest.is_empty(), "NeedMore must consume everything");
                        break;
                    }
                    Event::Command(Ok(Command::Data)) => codec.start_data(max),
                    Event::Command(Ok(Command::Bdat { size, last: l })) => {
                        last = *l;
                        codec.start_chunk(*size, Some(std::mem::take(&mut message)));
                    }
                    Event::Chunk(Some(m)) if !last => message.clone_from(m),
                    _ => {}
                }
                out.push(ev);
            }
        }
        out
    }

    /// Runs `input` whole, byte by byte, and split at every boundary; all must agree.
    fn run_all_splits(input: &[u8], limits: Limits, max: u64) -> Vec<Event> {
        let whole = run(&[input], limits, max);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes, limits, max), whole, "byte by byte");
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(run(&[a, b], limits, max), whole, "split at {i}");
        }
        whole
    }

    fn msg(bytes: &[u8]) -> Event {
        Event::Message(bytes.to_vec())
    }

    fn data() -> Event {
        Event::Command(Ok(Command::Data))
    }

    #[test]
    fn data_content_table() {
        let cases: &[(&str, &[u8], &[u8])] = &[
            ("simple", b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n"),
            ("empty message", b".\r\n", b""),
            ("dot-stuffed first line", b"..foo\r\n.\r\n", b".foo\r\n"),
            (
                "dot-stuffed later line",
                b"a\r\n..b\r\n.\r\n",
                b"a\r\n.b\r\n",
            ),
            ("stuffed lone dot", b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
            ("dot then text unstuffed", b".x\r\n.\r\n", b"x\r\n"),
            ("bare LF dot LF", b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
            ("bare LF dot CRLF", b"a\n.\r\nb\r\n.\r\n", b"a\n.\r\nb\r\n"),
            ("CRLF dot LF", b"a\r\n.\nb\r\n.\r\n", b"a\r\n\nb\r\n"),
            ("bare CR dot CRLF", b"a\r.\r\nb\r\n.\r\n", b"a\r.\r\nb\r\n"),
            (
                "dot CR CR LF",
                b"a\r\n.\r\r\nb\r\n.\r\n",
                b"a\r\n\r\r\nb\r\n",
            ),
            ("dot CR x", b"a\r\n.\rx\r\n.\r\n", b"a\r\n\rx\r\n"),
            (
                "NUL and 8-bit kept",
                b"\0\xff\xfe\r\n.\r\n",
                b"\0\xff\xfe\r\n",
            ),
            (
                "no final CRLF before dot is not an end",
                b"a.\r\n.\r\n",
                b"a.\r\n",
            ),
            ("CR at line end", b"a\r\r\n.\r\n", b"a\r\r\n"),
        ];
        for (name, input, want) in cases {
            let mut wire = b"DATA\r\n".to_vec();
            wire.extend_from_slice(input);
            wire.extend_from_slice(b"NOOP\r\n");
            let got = run_all_splits(&wire, Limits::default(), MAX);
            assert_eq!(
                got,
                vec![data(), msg(want), Event::Command(Ok(Command::Noop))],
                "{name}"
            );
        }
    }

    /// The DATA rules stated over a whole input: the message ends at the first CRLF.CRLF
    /// (DATA starting counts as a CRLF), and every CRLF-dot before it loses its dot.
    fn model(content: &[u8]) -> Option<Vec<u8>> {
        let mut s = b"\r\n".to_vec();
        s.extend_from_slice(content);
        let end = s.windows(5).position(|w| w == b"\r\n.\r\n")?;
        let body = &s[..end + 2];
        let mut out = Vec::new();
        let mut i = 0;
        while i < body.len() {
            out.push(body[i]);
            if body[i..].starts_with(b"\r\n.") {
                out.push(b'\n');
                i += 3;
            } else {
                i += 1;
            }
        }
        Some(out[2..].to_vec())
    }

    #[test]
    fn random_data_matches_the_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5321);
        let alphabet = b"\r\n.a";
        for _ in 0..300 {
            let len = rng.gen_range(0..24);
            let content: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let mut wire = b"DATA\r\n".to_vec();
            wire.extend_from_slice(&content);
            let got = run_all_splits(&wire, Limits::default(), MAX);
            match model(&content) {
                None => assert_eq!(got, vec![data()], "{content:?}"),
                Some(want) => assert_eq!(got[..2], [data(), msg(&want)], "{content:?}"),
            }
        }
    }

    #[test]
    fn smuggled_terminators_never_end_data() {
        for fake in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"] {
            let mut wire = b"DATA\r\nx".to_vec();
            wire.extend_from_slice(fake);
            wire.extend_from_slice(b"MAIL FROM:<evil@x>\r\n");
            // Without a real terminator the message is still open.
            let got = run_all_splits(&wire, Limits::default(), MAX);
            assert_eq!(got, vec![data()], "{fake:?}");
            wire.extend_from_slice(b".\r\n");
            let got = run_all_splits(&wire, Limits::default(), MAX);
            assert_eq!(got.len(), 2, "{fake:?}");
            let Event::Message(m) = &got[1] else {
                panic!("{got:?}")
            };
            assert!(m.ends_with(b"MAIL FROM:<evil@x>\r\n"), "{fake:?}");
        }
    }

    #[test]
    fn size_cap() {
        // Exactly at the cap: kept.
        let mut wire = b"DATA\r\n".to_vec();
        let line = [b'a'; 62];
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n.\r\nRSET\r\n");
        let got = run_all_splits(&wire, Limits::default(), 64);
        assert_eq!(got[1], msg(&wire[6..6 + 64]));
        // One over: dropped, counted, and the session goes on.
        let got = run_all_splits(&wire, Limits::default(), 63);
        assert_eq!(
            got,
            vec![
                data(),
                Event::TooBig { size: 64 },
                Event::Command(Ok(Command::Rset))
            ]
        );
    }

    #[test]
    fn over_cap_data_is_not_held() {
        let mut codec = Codec::new(Limits::default());
        assert_eq!(codec.decode(b"DATA\r\n").1, data());
        codec.start_data(1000);
        let chunk = vec![b'x'; 4096];
        for _ in 0..10 {
            assert_eq!(codec.decode(&chunk), (4096, Event::NeedMore));
            let Mode::Data(state) = &codec.mode else {
                panic!()
            };
            assert!(state.buf.len() <= 1000);
        }
        assert_eq!(
            codec.decode(b"\r\n.\r\n"),
            (5, Event::TooBig { size: 40962 })
        );
    }

    #[test]
    fn a_partial_line_never_grows_past_its_cap() {
        let mut codec = Codec::new(Limits::default());
        let block = vec![b'x'; 3000];
        for _ in 0..400 {
            assert_eq!(codec.decode(&block), (3000, Event::NeedMore));
            let Mode::Command { line, .. } = &codec.mode else {
                panic!()
            };
            assert!(line.capacity() <= 2 * MAX_LINE, "{}", line.capacity());
        }
        assert_eq!(
            codec.decode(b"\r\nNOOP\r\n").1,
            Event::Command(Err(CommandError::LineTooLong))
        );
    }

    #[test]
    fn content_buffers_are_claimed_from_the_budget() {
        let budget = Budget::new(10_000);
        // Another session holds part of the budget.
        let mut other = Claim::on(budget.clone());
        assert!(other.grow_to(1));
        let mut codec = Codec::new(Limits::default());
        codec.set_budget(budget.clone());
        codec.start_data(1 << 20);
        let line = [b'y'; 100];
        let mut sent = 0u64;
        for _ in 0..150 {
            codec.decode(&line);
            sent += 100;
            assert!(codec.claimed() <= 10_000);
            let Mode::Data(state) = &codec.mode else {
                panic!()
            };
            assert!(state.buf.capacity() as u64 <= codec.claimed().max(1));
        }
        // 8 KiB fitted; 16 KiB did not: the rest was dropped, and the end says so.
        assert_eq!(
            codec.decode(b"\r\n.\r\n").1,
            Event::OverBudget { size: sent + 2 }
        );
        assert_eq!(codec.claimed(), 8192);
        codec.release_budget();
        assert_eq!(budget.held(), 1);
        // A BDAT chunk the budget cannot hold comes back empty, read whole.
        codec.start_chunk(20_000, Some(Vec::new()));
        for _ in 0..199 {
            assert_eq!(codec.decode(&line), (100, Event::NeedMore));
        }
        assert_eq!(codec.decode(&line), (100, Event::Chunk(None)));
        codec.release_budget();
        drop(other);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn long_lines_are_refused_and_resynced() {
        let limits = Limits {
            max_line: 16,
            max_mail_line: 40,
        };
        let cases: &[(&str, &[u8], Vec<Event>)] = &[
            (
                "exactly at the cap",
                b"NOOP 012345678\r\n",
                vec![Event::Command(Ok(Command::Noop))],
            ),
            (
                "one over",
                b"NOOP 0123456789\r\nRSET\r\n",
                vec![
                    Event::Command(Err(CommandError::LineTooLong)),
                    Event::Command(Ok(Command::Rset)),
                ],
            ),
            (
                "far over",
                &[b"NOOP ".as_slice(), &[b'x'; 200], b"\r\nQUIT\r\n"].concat(),
                vec![
                    Event::Command(Err(CommandError::LineTooLong)),
                    Event::Command(Ok(Command::Quit)),
                ],
            ),
            (
                "MAIL gets the longer cap",
                b"MAIL FROM:<aaaaaaaaaa@b.example>\r\n",
                vec![Event::Command(Ok(Command::Mail(MailFrom {
                    address: "aaaaaaaaaa@b.example".into(),
                    params: vec![],
                    size: None,
                    body: None,
                    xcoffer: None,
                })))],
            ),
            (
                "MAIL over its cap",
                b"MAIL FROM:<aaaaaaaaaaaaaaaaaaaaaa@b.example>\r\nNOOP\r\n",
                vec![
                    Event::Command(Err(CommandError::LineTooLong)),
                    Event::Command(Ok(Command::Noop)),
                ],
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(&run_all_splits(input, limits, MAX), want, "{name}");
        }
    }

    #[test]
    fn pipelined_commands_come_out_in_order() {
        let wire = b"EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=10\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n";
        let got = run_all_splits(wire, Limits::default(), MAX);
        let rcpt = |a: &str| {
            Event::Command(Ok(Command::Rcpt(RcptTo {
                address: a.into(),
                params: vec![],
            })))
        };
        assert_eq!(
            got,
            vec![
                Event::Command(Ok(Command::Ehlo("client.example".into()))),
                Event::Command(Ok(Command::Mail(MailFrom {
                    address: "a@b.example".into(),
                    params: vec!["SIZE=10".into()],
                    size: Some(10),
                    body: None,
                    xcoffer: None,
                }))),
                rcpt("c@d.example"),
                rcpt("e@f.example"),
                data(),
                msg(b"hi\r\n"),
                Event::Command(Ok(Command::Quit)),
            ]
        );
    }

    #[test]
    fn command_table() {
        use CommandError as E;
        let mail = |address: &str, params: &[&str], size: Option<u64>, body: Option<&str>| {
            Ok(Command::Mail(MailFrom {
                address: address.into(),
                params: params.iter().map(|p| p.to_string()).collect(),
                size,
                body: body.map(str::to_owned),
                xcoffer: None,
            }))
        };
        let cases: Vec<(&str, Result<Command, CommandError>)> = vec![
            ("HELO x.example", Ok(Command::Helo("x.example".into()))),
            ("ehlo [127.0.0.1]", Ok(Command::Ehlo("[127.0.0.1]".into()))),
            ("EHLO odd  name ", Ok(Command::Ehlo("odd  name".into()))),
            ("LHLO x", Ok(Command::Lhlo("x".into()))),
            ("EHLO", Err(E::Syntax("EHLO domain"))),
            ("HELO", Err(E::Syntax("HELO domain"))),
            ("HELO  ", Err(E::Syntax("HELO domain"))),
            ("HELO  x y", Ok(Command::Helo("x y".into()))),
            ("MAIL FROM:<>", mail("", &[], None, None)),
            (
                "mail from:<a@b.example>",
                mail("a@b.example", &[], None, None),
            ),
            (
                "MAIL FROM: <a@b.example>",
                mail("a@b.example", &[], None, None),
            ),
            (
                "MAIL FROM:<Postmaster>",
                mail("Postmaster", &[], None, None),
            ),
            (
                "MAIL FROM:<a@b.example> BODY=8bitmime SMTPUTF8 SIZE=123",
                mail(
                    "a@b.example",
                    &["BODY=8bitmime", "SMTPUTF8", "SIZE=123"],
                    Some(123),
                    Some("8BITMIME"),
                ),
            ),
            (
                "MAIL FROM:<\"odd>name\"@b.example>",
                mail("\"odd>name\"@b.example", &[], None, None),
            ),
            (
                "MAIL FROM:<a@b.example> SIZE=x",
                Err(E::InvalidParam("SIZE".into())),
            ),
            (
                "MAIL FROM:<a@b.example> BODY=WHAT",
                Err(E::InvalidParam("BODY".into())),
            ),
            (
                "MAIL FROM:<a@b.example> RET=FULL",
                Err(E::UnsupportedParam("RET".into())),
            ),
            (
                "MAIL FROM:<a@b.example> FOO=bar",
                Err(E::UnsupportedParam("FOO".into())),
            ),
            ("MAIL FROM:a@b.example", Err(E::Syntax(MAIL_SYNTAX))),
            ("MAIL FROM:<a@b.example", Err(E::Syntax(MAIL_SYNTAX))),
            ("MAIL TO:<a@b.example>", Err(E::Syntax(MAIL_SYNTAX))),
            ("MAIL FROM:<not an address>", Err(E::BadSender)),
            (
                "RCPT TO:<c@d.example>",
                Ok(Command::Rcpt(RcptTo {
                    address: "c@d.example".into(),
                    params: vec![],
                })),
            ),
            (
                "RCPT TO:<postmaster>",
                Ok(Command::Rcpt(RcptTo {
                    address: "postmaster".into(),
                    params: vec![],
                })),
            ),
            ("RCPT TO:<>", Err(E::BadRecipient)),
            (
                "RCPT TO:<c@[192.0.2.1]>",
                Ok(Command::Rcpt(RcptTo {
                    address: "c@[192.0.2.1]".into(),
                    params: vec![],
                })),
            ),
            (
                "RCPT TO:<c@[IPv6:2001:db8::1]>",
                Ok(Command::Rcpt(RcptTo {
                    address: "c@[IPv6:2001:db8::1]".into(),
                    params: vec![],
                })),
            ),
            ("RCPT TO:<c@[192.0.2.256]>", Err(E::BadRecipient)),
            ("RCPT TO:<c@[2001:db8::1]>", Err(E::BadRecipient)),
            ("RCPT TO:<@[192.0.2.1]>", Err(E::BadRecipient)),
            (
                "MAIL FROM:<a@[192.0.2.1]>",
                mail("a@[192.0.2.1]", &[], None, None),
            ),
            (
                "RCPT TO:<c@d.example> NOTIFY=NEVER",
                Err(E::UnsupportedParam("NOTIFY".into())),
            ),
            ("RCPT FROM:<c@d.example>", Err(E::Syntax(RCPT_SYNTAX))),
            ("DATA", Ok(Command::Data)),
            ("DATA x", Err(E::Syntax("DATA"))),
            ("RSET", Ok(Command::Rset)),
            ("NOOP whatever", Ok(Command::Noop)),
            ("QUIT", Ok(Command::Quit)),
            ("VRFY bob", Ok(Command::Vrfy)),
            ("HELP", Ok(Command::Help)),
            ("STARTTLS", Ok(Command::StartTls)),
            ("EXPN list", Ok(Command::NotImplemented("EXPN"))),
            (
                "BDAT 100 LAST",
                Ok(Command::Bdat {
                    size: 100,
                    last: true,
                }),
            ),
            ("BDAT x", Err(E::BadBdat)),
            ("FOO", Err(E::Unknown)),
            ("", Err(E::Unknown)),
            ("\0\0", Err(E::Unknown)),
            ("HELO a\0b", Err(E::BadBytes("NUL byte"))),
            ("NOOP \0", Err(E::BadBytes("NUL byte"))),
            ("MAIL FROM:<a\0@b.example>", Err(E::BadBytes("NUL byte"))),
            ("RCPT TO:<c@d.example>\0", Err(E::BadBytes("NUL byte"))),
            ("BDAT 1\0", Err(E::BadBdat)),
            (
                "MAIL FROM:<\u{e9}@b.example> SMTPUTF8",
                mail("\u{e9}@b.example", &["SMTPUTF8"], None, None),
            ),
            (
                "MAIL FROM:<\u{e9}@b.example>",
                mail("\u{e9}@b.example", &[], None, None),
            ),
            (
                "RCPT TO:<\u{e9}@d.example>",
                Ok(Command::Rcpt(RcptTo {
                    address: "\u{e9}@d.example".into(),
                    params: vec![],
                })),
            ),
        ];
        for (line, want) in cases {
            for eol in ["\r\n", "\n"] {
                let wire = format!("{line}{eol}");
                let got = run(&[wire.as_bytes()], Limits::default(), MAX);
                assert_eq!(got, vec![Event::Command(want.clone())], "{line:?}{eol:?}");
            }
        }
    }

    #[test]
    fn invalid_utf8_in_a_command_is_refused_not_altered() {
        use CommandError as E;
        let cases: &[(&[u8], Result<Command, CommandError>)] = &[
            (
                b"MAIL FROM:<a\xff@b.example>",
                Err(E::BadBytes("invalid UTF-8")),
            ),
            (
                b"MAIL FROM:<a\xff@b.example> SMTPUTF8",
                Err(E::BadBytes("invalid UTF-8")),
            ),
            (
                b"RCPT TO:<\xc3@d.example>",
                Err(E::BadBytes("invalid UTF-8")),
            ),
            (b"EHLO h\xe9llo", Err(E::BadBytes("invalid UTF-8"))),
            (b"\xff\xfe", Err(E::Unknown)),
            (b"BDAT \xff", Err(E::BadBdat)),
        ];
        for (line, want) in cases {
            let mut wire = line.to_vec();
            wire.extend_from_slice(b"\r\n");
            let got = run(&[&wire], Limits::default(), MAX);
            assert_eq!(got, vec![Event::Command(want.clone())], "{line:?}");
        }
    }

    fn bdat(size: u64, last: bool) -> Event {
        Event::Command(Ok(Command::Bdat { size, last }))
    }

    fn chunk(so_far: &[u8]) -> Event {
        Event::Chunk(Some(so_far.to_vec()))
    }

    /// Bytes that would mean something in command or DATA mode, and binary ones.
    fn tricky_bytes(len: usize) -> Vec<u8> {
        let specials: &[&[u8]] = &[
            b"\r\n.\r\n",
            b"\0",
            b"\r",
            b"\n",
            b"BDAT 5 LAST\r\n",
            b"QUIT\r\n",
            b"\xff\xfe",
            b"\n.\n",
        ];
        let mut out = Vec::with_capacity(len);
        let mut i = 0usize;
        while out.len() < len {
            if i.is_multiple_of(5) {
                out.extend_from_slice(specials[(i / 5) % specials.len()]);
            } else {
                out.push((i * 37 % 256) as u8);
            }
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn bdat_chunks_at_every_split() {
        // Odd sizes, a chunk bigger than one read, and content that looks like commands,
        // DATA terminators and binary: all taken as they are.
        let sizes = [1usize, 7, 4096 + 3];
        let content = tricky_bytes(sizes.iter().sum());
        let mut wire = Vec::new();
        let mut want = Vec::new();
        let mut at = 0;
        for (i, &size) in sizes.iter().enumerate() {
            let last = i + 1 == sizes.len();
            let line = format!("BDAT {size}{}\r\n", if last { " LAST" } else { "" });
            wire.extend_from_slice(line.as_bytes());
            wire.extend_from_slice(&content[at..at + size]);
            at += size;
            want.push(bdat(size as u64, last));
            want.push(chunk(&content[..at]));
        }
        wire.extend_from_slice(b"NOOP\r\n");
        want.push(Event::Command(Ok(Command::Noop)));
        assert_eq!(run_all_splits(&wire, Limits::default(), MAX), want);
    }

    #[test]
    fn bdat_table() {
        let cases: &[(&str, &[u8], Vec<Event>)] = &[
            (
                "zero LAST",
                b"BDAT 0 LAST\r\nNOOP\r\n",
                vec![bdat(0, true), chunk(b""), Event::Command(Ok(Command::Noop))],
            ),
            (
                "zero then LAST",
                b"BDAT 0\r\nBDAT 3 LAST\r\nabc",
                vec![bdat(0, false), chunk(b""), bdat(3, true), chunk(b"abc")],
            ),
            (
                "CRLF dot CRLF inside a chunk is content",
                b"BDAT 7 LAST\r\na\r\n.\r\nbNOOP\r\n",
                vec![
                    bdat(7, true),
                    chunk(b"a\r\n.\r\nb"),
                    Event::Command(Ok(Command::Noop)),
                ],
            ),
            (
                "declared size too small: the rest is a command line",
                b"BDAT 3 LAST\r\nabcdef\r\n",
                vec![
                    bdat(3, true),
                    chunk(b"abc"),
                    Event::Command(Err(CommandError::Unknown)),
                ],
            ),
            (
                "declared size too big: the chunk never ends",
                b"BDAT 100 LAST\r\nabc\r\nQUIT\r\n",
                vec![bdat(100, true)],
            ),
            (
                "BDAT inside DATA is content; BDAT after DATA is a command",
                b"DATA\r\nBDAT 3\r\nabc\r\n.\r\nBDAT 3 LAST\r\nxyz",
                vec![
                    data(),
                    msg(b"BDAT 3\r\nabc\r\n"),
                    bdat(3, true),
                    chunk(b"xyz"),
                ],
            ),
            (
                "DATA after BDAT LAST",
                b"BDAT 2 LAST\r\n\r\nDATA\r\nx\r\n.\r\n",
                vec![bdat(2, true), chunk(b"\r\n"), data(), msg(b"x\r\n")],
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(
                &run_all_splits(input, Limits::default(), MAX),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn bdat_syntax_table() {
        let cases: &[(&str, Result<Command, CommandError>)] = &[
            (
                "BDAT 10",
                Ok(Command::Bdat {
                    size: 10,
                    last: false,
                }),
            ),
            (
                "bdat 10 last",
                Ok(Command::Bdat {
                    size: 10,
                    last: true,
                }),
            ),
            (
                "BDAT 007 LaSt",
                Ok(Command::Bdat {
                    size: 7,
                    last: true,
                }),
            ),
            (
                "BDAT 10 LAST  ",
                Ok(Command::Bdat {
                    size: 10,
                    last: true,
                }),
            ),
            (
                "BDAT 18446744073709551615",
                Ok(Command::Bdat {
                    size: u64::MAX,
                    last: false,
                }),
            ),
            ("BDAT 18446744073709551616", Err(CommandError::BadBdat)),
            ("BDAT", Err(CommandError::BadBdat)),
            ("BDAT x", Err(CommandError::BadBdat)),
            ("BDAT -1", Err(CommandError::BadBdat)),
            ("BDAT +1", Err(CommandError::BadBdat)),
            ("BDAT 1e3", Err(CommandError::BadBdat)),
            ("BDAT 0x10", Err(CommandError::BadBdat)),
            ("BDAT 10  LAST", Err(CommandError::BadBdat)),
            ("BDAT 10 LAST x", Err(CommandError::BadBdat)),
            ("BDAT 10 NOTLAST", Err(CommandError::BadBdat)),
            ("BDAT LAST", Err(CommandError::BadBdat)),
        ];
        for (line, want) in cases {
            let wire = format!("{line}\r\n");
            let mut codec = Codec::new(Limits::default());
            let (n, got) = codec.decode(wire.as_bytes());
            assert_eq!(n, wire.len(), "{line:?}");
            assert_eq!(got, Event::Command(want.clone()), "{line:?}");
        }
    }

    #[test]
    fn dropped_chunks_are_consumed_exactly() {
        let mut codec = Codec::new(Limits::default());
        codec.start_chunk(5, None);
        assert!(codec.in_data());
        assert_eq!(codec.decode(b"ab"), (2, Event::NeedMore));
        assert_eq!(codec.decode(b"c\r\nRSET\r\n"), (3, Event::Chunk(None)));
        assert!(!codec.in_data());
        assert_eq!(
            codec.decode(b"RSET\r\n"),
            (6, Event::Command(Ok(Command::Rset)))
        );
        // A huge dropped chunk holds nothing.
        codec.start_chunk(u64::MAX, None);
        let block = vec![b'x'; 64 * 1024];
        for _ in 0..16 {
            assert_eq!(codec.decode(&block), (block.len(), Event::NeedMore));
        }
        let Mode::Chunk { remaining, into } = &codec.mode else {
            panic!()
        };
        assert_eq!(*remaining, u64::MAX - 16 * 64 * 1024);
        assert!(into.is_none());
    }

    #[test]
    fn kept_chunks_never_allocate_past_their_end() {
        let mut codec = Codec::new(Limits::default());
        let mut message = b"0123456789".to_vec();
        message.shrink_to_fit();
        codec.start_chunk(1000, Some(message));
        for _ in 0..999 {
            assert_eq!(codec.decode(b"x"), (1, Event::NeedMore));
        }
        let (_, Event::Chunk(Some(m))) = codec.decode(b"yz") else {
            panic!()
        };
        assert_eq!(m.len(), 1010);
        assert_eq!(m.capacity(), 1010);
    }

    #[test]
    fn xcoffer_is_taken_off_before_parsing() {
        let limits = Limits {
            max_line: MAX_LINE,
            max_mail_line: MAX_XCOFFER_MAIL_LINE,
        };
        let blob = "e".repeat(8000);
        let wire = format!("MAIL FROM:<a@b.example> XCOFFER={blob} SIZE=5\r\n");
        let got = run(&[wire.as_bytes()], limits, MAX);
        assert_eq!(
            got,
            vec![Event::Command(Ok(Command::Mail(MailFrom {
                address: "a@b.example".into(),
                params: vec!["SIZE=5".into()],
                size: Some(5),
                body: None,
                xcoffer: Some(blob),
            })))]
        );
        let got = run(&[b"MAIL FROM:<a@b.example> XCOFFER=\r\n"], limits, MAX);
        assert_eq!(
            got,
            vec![Event::Command(Err(CommandError::InvalidParam(
                "XCOFFER".into()
            )))]
        );
    }
}
