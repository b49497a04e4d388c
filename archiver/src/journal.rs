//! Exchange / Microsoft 365 envelope journal reports (`docs/journal-reports.md`).
//!
//! A journal report is a message carrying an `X-MS-Journal-Report:` header at the top
//! level, whose multipart body holds a text/plain *report* (the envelope of the original
//! message: `Sender:`, `Subject:`, `Message-Id:`, `To:`/`Cc:`/`Bcc:`/`Recipient:` lines
//! with `Expanded:`/`Forwarded:` annotations, `On-Behalf-Of:`) and the original message
//! as a `message/rfc822` part.
//!
//! [`unwrap`] is a pure function: it recognises a report, extracts the original's bytes
//! exactly as they were attached (transfer decoding only), and the envelope the report
//! states. [`original_arrival`] turns a received report into the second arrival the
//! daemon archives, so a search by a BCC or distribution-list recipient finds the
//! original.
//!
//! Only the top-level header section and the top-level multipart are looked at; nothing
//! is parsed recursively. Work is linear in the input, and the report text is read up to
//! [`REPORT_CAP`] bytes.

use std::collections::HashSet;

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::MessageParser;

use crate::envelope::Envelope;
use crate::store::Incoming;

/// The most bytes of the report part (before transfer decoding) that are read.
pub const REPORT_CAP: usize = 1 << 20;

/// The most bytes of one header section (top level, a part, the original) that are read.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// The header that marks a journal report, compared case-insensitively.
const REPORT_HEADER: &str = "x-ms-journal-report";

/// A journal report taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwrapped {
    /// The original message, exactly as attached (after base64/quoted-printable decoding
    /// when the part was so encoded).
    pub original: Vec<u8>,
    /// The envelope sender: the report's `Sender:` (without angle brackets; empty for the
    /// null sender), else the first address of the original's `From:`, else empty.
    pub sender: String,
    /// Every recipient the report names, annotations included, in order of appearance,
    /// spelled as first written, de-duplicated case-insensitively.
    pub recipients: Vec<String>,
    /// Everything the report said, as written.
    pub report: ReportFields,
}

/// The fields of the text/plain report part, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportFields {
    /// The first `Sender:` value, trimmed.
    pub sender: Option<String>,
    /// The first `Subject:` value, trimmed (encoded words are left encoded).
    pub subject: Option<String>,
    /// The first `Message-Id:` value, trimmed, angle brackets kept.
    pub message_id: Option<String>,
    /// The first `On-Behalf-Of:` value, trimmed.
    pub on_behalf_of: Option<String>,
    /// Every `To:`, `Cc:`, `Bcc:` and `Recipient:` line, in order.
    pub recipients: Vec<RecipientLine>,
    /// The report part was longer than [`REPORT_CAP`]; lines past it were not read.
    pub truncated: bool,
}

/// Which kind of recipient line a report used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipientKind {
    To,
    Cc,
    Bcc,
    /// `Recipient:`: Exchange's form when it does not say (or know) the header kind.
    Recipient,
}

/// One recipient line of a report, e.g. `To: carol@contoso.com, Expanded: sales@contoso.com`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientLine {
    pub kind: RecipientKind,
    /// The addresses before any annotation (normally exactly one), angle brackets removed.
    pub addresses: Vec<String>,
    /// `Expanded:`, `Forwarded:` (or any other `Name: value`) annotations, in order.
    pub annotations: Vec<Annotation>,
    /// The value of the line as written, trimmed.
    pub raw: String,
}

/// A `Name: value` annotation on a recipient line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Annotation {
    /// As written (`Expanded`, `Forwarded`, ...).
    pub name: String,
    /// The address, angle brackets removed.
    pub value: String,
}

/// Why a message that carries `X-MS-Journal-Report` could not be unwrapped. The report
/// itself is archived all the same; only the second arrival is missing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("journal report without a multipart Content-Type and boundary")]
    NotMultipart,
    #[error("journal report without a text/plain report part")]
    NoReport,
    #[error("journal report without a message/rfc822 part at the top level")]
    NoOriginal,
    #[error("the attached original is not closed by a boundary delimiter (truncated report)")]
    Unterminated,
    #[error("the attached original cannot be decoded: {0}")]
    Encoding(String),
    #[error("the attached original is empty")]
    EmptyOriginal,
    #[error("the journal report names no recipient")]
    NoRecipients,
}

/// Takes a journal report apart.
///
/// `None`: not a journal report (no `X-MS-Journal-Report` header in the top-level header
/// section). `Some(Err(_))`: it carries the header but is malformed. Never panics.
pub fn unwrap(bytes: &[u8]) -> Option<Result<Unwrapped, JournalError>> {
    let top = Headers::parse(bytes);
    if !top.fields.iter().any(|f| f.is(REPORT_HEADER)) {
        return None;
    }
    Some(unwrap_report(bytes, &top))
}

/// The arrival of the original that a received journal report yields: the original's
/// bytes, an envelope of the report's sender and recipients (no MAIL parameters), and the
/// report's session (same listener, client, HELO, queue id).
///
/// The daemon archives `report` as received, then this arrival; both before it
/// acknowledges. `None`: not a journal report. `Some(Err(_))`: a malformed report, to be
/// archived (and logged) as received only. The original is never unwrapped again.
pub fn original_arrival(report: &Incoming) -> Option<Result<Incoming, JournalError>> {
    Some(unwrap(&report.bytes)?.map(|u| Incoming {
        bytes: u.original,
        envelope: Envelope {
            mail_from: u.sender,
            mail_params: Vec::new(),
            rcpt_to: u.recipients,
        },
        session: report.session.clone(),
    }))
}

fn unwrap_report(bytes: &[u8], top: &Headers<'_>) -> Result<Unwrapped, JournalError> {
    let body_start = top.body.ok_or(JournalError::NotMultipart)?;
    let ct = top
        .get("content-type")
        .map(|v| ContentType::parse(&v))
        .ok_or(JournalError::NotMultipart)?;
    let boundary = match ct.param("boundary") {
        Some(b) if ct.mime.starts_with("multipart/") && !b.is_empty() && b.len() <= 998 => b,
        _ => return Err(JournalError::NotMultipart),
    };
    let default_type = if ct.mime == "multipart/digest" {
        "message/rfc822"
    } else {
        "text/plain"
    };

    let mut report: Option<Part<'_>> = None;
    let mut original: Option<Part<'_>> = None;
    for span in PartSpans::new(bytes, body_start, boundary.as_bytes()) {
        let part = Part::parse(bytes, span, default_type);
        if report.is_none() && part.mime == "text/plain" {
            report = Some(part);
        } else if original.is_none() && part.mime == "message/rfc822" {
            original = Some(part);
        }
        if report.is_some() && original.is_some() {
            break;
        }
    }
    let original = original.ok_or(JournalError::NoOriginal)?;
    let report = report.ok_or(JournalError::NoReport)?;
    if !original.terminated {
        return Err(JournalError::Unterminated);
    }
    let original = match original.decode(usize::MAX)? {
        o if o.is_empty() => return Err(JournalError::EmptyOriginal),
        o => o,
    };

    let truncated = report.body.len() > REPORT_CAP;
    let text = report.decode(REPORT_CAP)?;
    let fields = ReportFields::parse(&String::from_utf8_lossy(&text), truncated);

    let recipients = fields.all_recipients();
    if recipients.is_empty() {
        return Err(JournalError::NoRecipients);
    }
    let sender = match &fields.sender {
        Some(s) => clean_address(s),
        None => first_from(&original),
    };
    Ok(Unwrapped {
        original,
        sender,
        recipients,
        report: fields,
    })
}

/// The first address of the original's `From:`, or empty.
fn first_from(original: &[u8]) -> String {
    let head = &original[..Headers::parse(original).end];
    MessageParser::new()
        .parse_headers(head)
        .and_then(|m| {
            m.from()
                .and_then(|a| a.first())
                .and_then(|a| a.address())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Header sections.

/// One header field: the name, and the raw value (folding line breaks included, the
/// final line break excluded).
struct Field<'a> {
    name: &'a [u8],
    value: &'a [u8],
}

impl Field<'_> {
    fn is(&self, lower_name: &str) -> bool {
        self.name.eq_ignore_ascii_case(lower_name.as_bytes())
    }

    /// The value unfolded (line breaks removed), trimmed, lossily as UTF-8.
    fn unfolded(&self) -> String {
        let v: Vec<u8> = self
            .value
            .iter()
            .copied()
            .filter(|&b| b != b'\r' && b != b'\n')
            .collect();
        String::from_utf8_lossy(&v).trim().to_owned()
    }
}

/// A header section, read up to the first empty line or [`MAX_HEADER_BYTES`].
struct Headers<'a> {
    fields: Vec<Field<'a>>,
    /// Offset of the body: just past the empty line. `None` when no empty line was found.
    body: Option<usize>,
    /// Offset just past the last header line read (the empty line included).
    end: usize,
}

impl<'a> Headers<'a> {
    fn parse(data: &'a [u8]) -> Headers<'a> {
        let window = &data[..data.len().min(MAX_HEADER_BYTES)];
        // (name, start of value, end of value): the value grows over folded lines.
        let mut raw: Vec<(&'a [u8], usize, usize)> = Vec::new();
        let mut open = false; // the last line started a field that may continue
        let mut pos = 0;
        let mut body = None;
        while pos < window.len() {
            let (content_end, next, complete) = line_at(window, pos);
            let line = &window[pos..content_end];
            if line.is_empty() && complete {
                body = Some(next);
                pos = next;
                break;
            }
            if matches!(line.first(), Some(b' ' | b'\t')) {
                if let (true, Some(last)) = (open, raw.last_mut()) {
                    last.2 = content_end;
                }
            } else if let Some(colon) = line.iter().position(|&b| b == b':') {
                let name = trim_end_wsp(&line[..colon]);
                open = !name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic());
                if open {
                    raw.push((name, pos + colon + 1, content_end));
                }
            } else {
                open = false;
            }
            pos = next;
        }
        Headers {
            fields: raw
                .into_iter()
                .map(|(name, start, end)| Field {
                    name,
                    value: &window[start..end],
                })
                .collect(),
            body,
            end: pos,
        }
    }

    /// The first field called `lower_name`, unfolded.
    fn get(&self, lower_name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|f| f.is(lower_name))
            .map(Field::unfolded)
    }
}

/// The line starting at `pos`: (end of its content without CR LF or LF, start of the next
/// line, whether it ended with LF).
fn line_at(data: &[u8], pos: usize) -> (usize, usize, bool) {
    match data[pos..].iter().position(|&b| b == b'\n') {
        Some(i) => {
            let lf = pos + i;
            let end = if lf > pos && data[lf - 1] == b'\r' {
                lf - 1
            } else {
                lf
            };
            (end, lf + 1, true)
        }
        None => (data.len(), data.len(), false),
    }
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &s[..n]
}

// ---------------------------------------------------------------------------------------
// Content-Type.

/// A Content-Type value: `type/subtype` lowercased, and its parameters (names lowercased,
/// values unquoted).
struct ContentType {
    mime: String,
    params: Vec<(String, String)>,
}

impl ContentType {
    fn parse(value: &str) -> ContentType {
        let s = value.as_bytes();
        let mut i = skip_cfws(s, 0);
        let start = i;
        while i < s.len() && !matches!(s[i], b';' | b' ' | b'\t' | b'(') {
            i += 1;
        }
        let mime = value[start..i].to_ascii_lowercase();
        let mut params = Vec::new();
        loop {
            i = skip_cfws(s, i);
            while i < s.len() && s[i] == b';' {
                i = skip_cfws(s, i + 1);
            }
            if i >= s.len() {
                break;
            }
            let name_start = i;
            while i < s.len() && !matches!(s[i], b'=' | b';' | b' ' | b'\t' | b'(') {
                i += 1;
            }
            let name = value[name_start..i].to_ascii_lowercase();
            i = skip_cfws(s, i);
            if i >= s.len() || s[i] != b'=' {
                // A parameter without a value: skip to the next one.
                while i < s.len() && s[i] != b';' {
                    i += 1;
                }
                continue;
            }
            i = skip_cfws(s, i + 1);
            let mut val = Vec::new();
            if i < s.len() && s[i] == b'"' {
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' && i + 1 < s.len() {
                        i += 1;
                    }
                    val.push(s[i]);
                    i += 1;
                }
                i += 1; // closing quote
            } else {
                while i < s.len() && !matches!(s[i], b';' | b' ' | b'\t' | b'(') {
                    val.push(s[i]);
                    i += 1;
                }
            }
            params.push((name, String::from_utf8_lossy(&val).into_owned()));
        }
        ContentType { mime, params }
    }

    fn param(&self, lower_name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == lower_name)
            .map(|(_, v)| v.as_str())
    }
}

/// Skips white space and (nested) comments from `i`.
fn skip_cfws(s: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < s.len() {
        match s[i] {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    i.min(s.len())
}

// ---------------------------------------------------------------------------------------
// The top-level multipart.

/// Where one body part lies: its headers and body, without the line break that belongs to
/// the next delimiter (RFC 2046 §5.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
    /// Closed by a delimiter (not cut off by the end of the message).
    terminated: bool,
}

/// The body parts of one multipart level, in order. Lines are scanned once; a delimiter is
/// a line that is `--boundary` followed only by white space, or `--boundary--` (the close
/// delimiter, after which nothing is read). Nested multiparts are only content.
struct PartSpans<'a> {
    data: &'a [u8],
    boundary: &'a [u8],
    pos: usize,
    /// Start of the part being scanned; `None` while in the preamble.
    current: Option<usize>,
    done: bool,
}

impl<'a> PartSpans<'a> {
    fn new(data: &'a [u8], body_start: usize, boundary: &'a [u8]) -> PartSpans<'a> {
        PartSpans {
            data,
            boundary,
            pos: body_start,
            current: None,
            done: false,
        }
    }

    /// Is `line` (without its line break) a delimiter? `Some(true)` for the close delimiter.
    fn delimiter(&self, line: &[u8]) -> Option<bool> {
        let rest = line.strip_prefix(b"--")?.strip_prefix(self.boundary)?;
        if rest.starts_with(b"--") {
            Some(true)
        } else if rest.iter().all(|&b| b == b' ' || b == b'\t') {
            Some(false)
        } else {
            None
        }
    }

    /// End of the current part's content, given the start of the delimiter line: the CRLF
    /// (or bare LF) before it belongs to the delimiter.
    fn content_end(&self, part_start: usize, line_start: usize) -> usize {
        let d = self.data;
        if line_start >= part_start + 2 && &d[line_start - 2..line_start] == b"\r\n" {
            line_start - 2
        } else if line_start > part_start && d[line_start - 1] == b'\n' {
            line_start - 1
        } else {
            line_start
        }
    }
}

impl Iterator for PartSpans<'_> {
    type Item = Span;

    fn next(&mut self) -> Option<Span> {
        while !self.done && self.pos < self.data.len() {
            let line_start = self.pos;
            let (content_end, next, _) = line_at(self.data, line_start);
            self.pos = next;
            let Some(close) = self.delimiter(&self.data[line_start..content_end]) else {
                continue;
            };
            self.done = close;
            let finished = self.current.map(|start| Span {
                start,
                end: self.content_end(start, line_start),
                terminated: true,
            });
            self.current = Some(next);
            if finished.is_some() {
                return finished;
            }
        }
        // End of the data without a close delimiter: the open part is cut off.
        if !self.done {
            self.done = true;
            if let Some(start) = self.current.take() {
                return Some(Span {
                    start,
                    end: self.data.len(),
                    terminated: false,
                });
            }
        }
        None
    }
}

/// One top-level body part, classified.
struct Part<'a> {
    /// `type/subtype`, lowercased, the multipart's default applied.
    mime: String,
    /// Content-Transfer-Encoding, lowercased, empty when absent.
    encoding: String,
    body: &'a [u8],
    terminated: bool,
}

impl<'a> Part<'a> {
    fn parse(data: &'a [u8], span: Span, default_type: &str) -> Part<'a> {
        let raw = &data[span.start..span.end.max(span.start)];
        let headers = Headers::parse(raw);
        let mime = headers
            .get("content-type")
            .map(|v| ContentType::parse(&v).mime)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| default_type.to_owned());
        let encoding = headers
            .get("content-transfer-encoding")
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = match headers.body {
            Some(b) => &raw[b..],
            None => &raw[raw.len()..],
        };
        Part {
            mime,
            encoding,
            body,
            terminated: span.terminated,
        }
    }

    /// The body's first `cap` bytes, transfer-decoded.
    fn decode(&self, cap: usize) -> Result<Vec<u8>, JournalError> {
        let raw = &self.body[..self.body.len().min(cap)];
        match self.encoding.as_str() {
            "" | "7bit" | "8bit" | "binary" => Ok(raw.to_vec()),
            "base64" => base64_decode(raw)
                .ok_or_else(|| JournalError::Encoding("invalid base64".to_owned())),
            "quoted-printable" => quoted_printable_decode(raw)
                .ok_or_else(|| JournalError::Encoding("invalid quoted-printable".to_owned())),
            other => Err(JournalError::Encoding(format!(
                "unknown Content-Transfer-Encoding {other:?}"
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The report text.

impl ReportFields {
    /// Reads `Name: value` lines (CRLF or LF). Unknown names and other lines are ignored;
    /// when `truncated`, the last, possibly cut, line is dropped.
    fn parse(text: &str, truncated: bool) -> ReportFields {
        let mut f = ReportFields {
            truncated,
            ..ReportFields::default()
        };
        let mut lines: Vec<&str> = text.split('\n').collect();
        if truncated {
            lines.pop();
        }
        for line in lines {
            let line = line.trim_end_matches('\r');
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                continue;
            }
            let value = value.trim();
            let first = |slot: &mut Option<String>| {
                if slot.is_none() {
                    *slot = Some(value.to_owned());
                }
            };
            let kind = match name.to_ascii_lowercase().as_str() {
                "sender" => {
                    first(&mut f.sender);
                    continue;
                }
                "subject" => {
                    first(&mut f.subject);
                    continue;
                }
                "message-id" => {
                    first(&mut f.message_id);
                    continue;
                }
                "on-behalf-of" => {
                    first(&mut f.on_behalf_of);
                    continue;
                }
                "to" => RecipientKind::To,
                "cc" => RecipientKind::Cc,
                "bcc" => RecipientKind::Bcc,
                "recipient" => RecipientKind::Recipient,
                _ => continue,
            };
            f.recipients.push(RecipientLine::parse(kind, value));
        }
        f
    }

    /// Every address of every recipient line, then its `Expanded`/`Forwarded`
    /// annotations, spelled as first written, de-duplicated case-insensitively.
    fn all_recipients(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for line in &self.recipients {
            let annotated = line.annotations.iter().filter(|a| {
                a.name.eq_ignore_ascii_case("expanded") || a.name.eq_ignore_ascii_case("forwarded")
            });
            for addr in line.addresses.iter().chain(annotated.map(|a| &a.value)) {
                if !addr.is_empty() && seen.insert(addr.to_lowercase()) {
                    out.push(addr.clone());
                }
            }
        }
        out
    }
}

impl RecipientLine {
    /// `addr[, Name: value]...`; a comma-separated segment that is not `Name: value` is
    /// one more address.
    fn parse(kind: RecipientKind, value: &str) -> RecipientLine {
        let mut line = RecipientLine {
            kind,
            addresses: Vec::new(),
            annotations: Vec::new(),
            raw: value.to_owned(),
        };
        for segment in value.split(',') {
            let segment = segment.trim();
            let annotation = segment.split_once(':').filter(|(name, _)| {
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-')
            });
            match annotation {
                Some((name, v)) => line.annotations.push(Annotation {
                    name: name.to_owned(),
                    value: clean_address(v),
                }),
                None => {
                    let a = clean_address(segment);
                    if !a.is_empty() {
                        line.addresses.push(a);
                    }
                }
            }
        }
        line
    }
}

/// An address as written, trimmed, the part inside `<...>` when there is one.
fn clean_address(s: &str) -> String {
    let s = s.trim();
    match (s.find('<'), s.rfind('>')) {
        (Some(l), Some(r)) if l < r => s[l + 1..r].trim().to_owned(),
        _ => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SessionInfo;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/journal/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn sha256(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn ok(bytes: &[u8]) -> Unwrapped {
        match unwrap(bytes) {
            Some(Ok(u)) => u,
            other => panic!("expected a journal report, got {other:?}"),
        }
    }

    fn err(bytes: &[u8]) -> JournalError {
        match unwrap(bytes) {
            Some(Err(e)) => e,
            other => panic!("expected a malformed journal report, got {other:?}"),
        }
    }

    /// A report (CRLF) wrapping `original` in a message/rfc822 part with the given
    /// Content-Transfer-Encoding header line (or none) and body.
    fn wrap(report_lines: &str, cte: Option<&str>, part_body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(
            b"From: journal@contoso.com\r\nX-MS-Journal-Report:\r\n\
              Content-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n\
              --=_b\r\nContent-Type: text/plain\r\n\r\n",
        );
        m.extend_from_slice(report_lines.replace('\n', "\r\n").as_bytes());
        m.extend_from_slice(b"\r\n--=_b\r\nContent-Type: message/rfc822\r\n");
        if let Some(cte) = cte {
            m.extend_from_slice(format!("Content-Transfer-Encoding: {cte}\r\n").as_bytes());
        }
        m.extend_from_slice(b"\r\n");
        m.extend_from_slice(part_body);
        m.extend_from_slice(b"\r\n--=_b--\r\n");
        m
    }

    const LINES: &str = "Sender: a@x\nRecipient: b@y\n";

    #[test]
    fn exchange_2013_recipient_lines() {
        let report = fixture("exchange2013-recipient.eml");
        let original = fixture("original-quarterly.eml");
        let u = ok(&report);
        assert_eq!(sha256(&u.original), sha256(&original));
        assert_eq!(u.original, original);
        assert_eq!(u.sender, "alice@contoso.com");
        assert_eq!(
            u.recipients,
            ["bob@fabrikam.com", "carol@contoso.com", "frank@contoso.com"]
        );
        assert_eq!(u.report.subject.as_deref(), Some("Quarterly numbers"));
        assert_eq!(
            u.report.message_id.as_deref(),
            Some("<5f2c9a1e.1@contoso.com>")
        );
        assert_eq!(u.report.on_behalf_of, None);
        assert!(u
            .report
            .recipients
            .iter()
            .all(|l| l.kind == RecipientKind::Recipient && l.annotations.is_empty()));
        assert!(!u.report.truncated);
    }

    #[test]
    fn m365_to_cc_bcc_with_expanded_and_forwarded() {
        let report = fixture("m365-to-cc-bcc.eml");
        let original = fixture("original-utf8.eml");
        let u = ok(&report);
        // 8bit original without a final line break: the CRLF before the delimiter is not
        // part of it.
        assert_eq!(sha256(&u.original), sha256(&original));
        assert_eq!(u.sender, "alice@contoso.com");
        assert_eq!(
            u.recipients,
            [
                "bob@fabrikam.com",
                "carol@contoso.com",
                "sales@contoso.com",
                "Dave@Contoso.com",
                "erin@contoso.com",
                "frank@contoso.com",
            ]
        );
        let r = &u.report;
        assert_eq!(r.on_behalf_of.as_deref(), Some("ceo@contoso.com"));
        assert_eq!(
            r.subject.as_deref(),
            Some("=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_Z=C3=BCrich?=")
        );
        let kinds: Vec<_> = r.recipients.iter().map(|l| l.kind).collect();
        use RecipientKind::*;
        assert_eq!(kinds, [To, To, To, Cc, Bcc]);
        assert_eq!(
            r.recipients[1],
            RecipientLine {
                kind: To,
                addresses: vec!["carol@contoso.com".into()],
                annotations: vec![Annotation {
                    name: "Expanded".into(),
                    value: "sales@contoso.com".into()
                }],
                raw: "carol@contoso.com, Expanded: sales@contoso.com".into(),
            }
        );
        assert_eq!(r.recipients[2].annotations[0].name, "Forwarded");
        assert_eq!(r.recipients[2].annotations[0].value, "erin@contoso.com");
        assert_eq!(r.recipients[3].addresses, ["CAROL@contoso.com"]);
    }

    #[test]
    fn base64_original_is_decoded_and_sender_falls_back_to_from() {
        let report = fixture("m365-base64.eml");
        let original = fixture("original-quarterly.eml");
        let u = ok(&report);
        assert_eq!(sha256(&u.original), sha256(&original));
        assert_eq!(u.report.sender, None);
        assert_eq!(u.sender, "alice@contoso.com");
        assert_eq!(u.recipients, ["bob@fabrikam.com", "frank@contoso.com"]);
    }

    #[test]
    fn lf_only_report() {
        let report = fixture("lf-only.eml");
        let original = fixture("original-lf.eml");
        assert!(!report.contains(&b'\r'));
        let u = ok(&report);
        assert_eq!(sha256(&u.original), sha256(&original));
        assert_eq!(u.sender, "alice@contoso.com");
        assert_eq!(u.recipients, ["bob@fabrikam.com", "grace@contoso.com"]);
        assert_eq!(u.report.message_id.as_deref(), Some("<lf.1@contoso.com>"));
    }

    #[test]
    fn not_a_report() {
        for name in [
            "not-report-plain.eml",
            "not-report-header-in-body.eml",
            "not-report-header-in-attached.eml",
            "original-quarterly.eml",
        ] {
            assert_eq!(unwrap(&fixture(name)), None, "{name}");
        }
        assert_eq!(unwrap(b""), None);
        assert_eq!(unwrap(b"\r\nX-MS-Journal-Report:\r\n"), None);
        // A continuation line of another field is not a field.
        assert_eq!(unwrap(b"X-Note: a\r\n X-MS-Journal-Report:\r\n\r\n"), None);
        // A header section cut off by the end of the data still counts.
        assert!(unwrap(b"X-MS-Journal-Report:").is_some());
    }

    #[test]
    fn header_name_is_case_insensitive_and_may_be_folded_or_padded() {
        for header in [
            "x-ms-journal-report:",
            "X-MS-JOURNAL-REPORT: ",
            "X-MS-Journal-Report :",
            "X-MS-Journal-Report:\r\n ",
        ] {
            let m = String::from_utf8(wrap(LINES, None, b"Subject: s\r\n\r\nbody\r\n"))
                .unwrap()
                .replacen("X-MS-Journal-Report:", header, 1);
            assert!(matches!(unwrap(m.as_bytes()), Some(Ok(_))), "{header:?}");
        }
        let m = String::from_utf8(wrap(LINES, None, b"S: s\r\n\r\nb\r\n")).unwrap();
        let m = m.replacen("X-MS-Journal-Report:", "X-MS-Journal-Reporting:", 1);
        assert_eq!(unwrap(m.as_bytes()), None);
    }

    #[test]
    fn malformed_reports() {
        assert_eq!(
            err(&fixture("malformed-no-original.eml")),
            JournalError::NoOriginal
        );
        assert_eq!(
            err(b"X-MS-Journal-Report:\r\nContent-Type: text/plain\r\n\r\nSender: a@x\r\n"),
            JournalError::NotMultipart
        );
        assert_eq!(
            err(b"X-MS-Journal-Report:\r\nContent-Type: multipart/mixed\r\n\r\n--\r\n"),
            JournalError::NotMultipart
        );
        assert_eq!(
            err(b"X-MS-Journal-Report:\r\nContent-Type: multipart/mixed; boundary=b\r\n"),
            JournalError::NotMultipart
        );
        // Only an original, no report part.
        let m = b"X-MS-Journal-Report:\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\
                  --b\r\nContent-Type: message/rfc822\r\n\r\nS: x\r\n\r\nbody\r\n--b--\r\n";
        assert_eq!(err(m), JournalError::NoReport);
        // Truncated: no delimiter after the original.
        let mut m = wrap(LINES, None, b"Subject: s\r\n\r\nbody\r\n");
        m.truncate(m.len() - b"\r\n--=_b--\r\n".len());
        assert_eq!(err(&m), JournalError::Unterminated);
        assert_eq!(
            err(&wrap(LINES, Some("x-uuencode"), b"begin 644 x\r\n")),
            JournalError::Encoding("unknown Content-Transfer-Encoding \"x-uuencode\"".into())
        );
        assert!(matches!(
            err(&wrap(LINES, Some("base64"), b"not*base64!")),
            JournalError::Encoding(_)
        ));
        assert_eq!(err(&wrap(LINES, None, b"")), JournalError::EmptyOriginal);
        assert_eq!(
            err(&wrap("Sender: a@x\nSubject: s\n", None, b"S: s\r\n\r\nb")),
            JournalError::NoRecipients
        );
    }

    #[test]
    fn original_bytes_are_exact_for_every_transfer_encoding() {
        let original = fixture("original-utf8.eml");
        for cte in [None, Some("7bit"), Some("8bit"), Some("Binary")] {
            let u = ok(&wrap(LINES, cte, &original));
            assert_eq!(u.original, original, "{cte:?}");
        }
        // Quoted-printable: soft line breaks and escapes decoded.
        let u = ok(&wrap(
            LINES,
            Some("quoted-printable"),
            b"Subject: q=\r\np\r\n\r\nGr=C3=BC=C3=9Fe\r\n",
        ));
        assert_eq!(u.original, "Subject: qp\r\n\r\nGrüße\r\n".as_bytes());
        // An original ending in an empty line keeps it; one ending in a bare CR keeps it.
        for orig in [
            &b"S: s\r\n\r\nb\r\n\r\n"[..],
            b"S: s\r\n\r\nb\r",
            b"S: s\n\nb",
        ] {
            assert_eq!(ok(&wrap(LINES, None, orig)).original, orig);
        }
    }

    #[test]
    fn first_rfc822_part_and_first_text_part_are_used() {
        let m = b"X-MS-Journal-Report:\r\nContent-Type: Multipart/Mixed; boundary=\"b\"\r\n\r\n\
                  preamble\r\n--b\r\n\r\nRecipient: first@x\r\n\
                  --b\r\nContent-Type: text/plain\r\n\r\nRecipient: second@x\r\n\
                  --b \t\r\nContent-Type: MESSAGE/RFC822; name=a\r\n\r\none\r\n\
                  --b\r\nContent-Type: message/rfc822\r\n\r\ntwo\r\n--b--";
        let u = ok(m);
        // A part without Content-Type is text/plain (RFC 2046): it is the report.
        assert_eq!(u.recipients, ["first@x"]);
        assert_eq!(u.original, b"one");
        // No Sender: and no From: in the original: the null sender.
        assert_eq!(u.sender, "");
    }

    #[test]
    fn multipart_digest_parts_default_to_rfc822() {
        let m = b"X-MS-Journal-Report:\r\nContent-Type: multipart/digest; boundary=b\r\n\r\n\
                  --b\r\nContent-Type: text/plain\r\n\r\nRecipient: r@x\r\n\
                  --b\r\n\r\nFrom: <s@x>\r\n\r\nbody\r\n--b--\r\n";
        let u = ok(m);
        assert_eq!(u.original, b"From: <s@x>\r\n\r\nbody");
        assert_eq!(u.sender, "s@x");
    }

    #[test]
    fn report_lines_are_tolerant() {
        let lines = "Sender: <>\n\
                     junk line\n\
                     Subject: Re: a: b\n\
                     To: Bob <bob@x>\n\
                     To: one@x, two@x, Expanded: <DL@x>, Expanded: dl2@x\n\
                     recipient:   ONE@X  \n\
                     Bcc: \n\
                     X-Unknown: ignored@x\n\
                     To: three@x, Custom: not-included@x\n";
        let u = ok(&wrap(lines, None, b"From: f@x\r\n\r\nb"));
        // An explicit null sender is kept; From: is only the fallback for no Sender: line.
        assert_eq!(u.sender, "");
        assert_eq!(u.report.sender.as_deref(), Some("<>"));
        assert_eq!(u.report.subject.as_deref(), Some("Re: a: b"));
        assert_eq!(
            u.recipients,
            ["bob@x", "one@x", "two@x", "DL@x", "dl2@x", "three@x"]
        );
        let last = u.report.recipients.last().unwrap();
        assert_eq!(last.annotations[0].name, "Custom");
    }

    #[test]
    fn report_part_is_capped() {
        let mut lines = String::from("Sender: a@x\nRecipient: early@x\n");
        while lines.len() < REPORT_CAP + 100 {
            lines.push_str("Recipient: filler@x\n");
        }
        lines.push_str("Recipient: late@x\n");
        let u = ok(&wrap(&lines, None, b"S: s\r\n\r\nb"));
        assert!(u.report.truncated);
        assert_eq!(u.recipients, ["early@x", "filler@x"]);
    }

    #[test]
    fn original_arrival_keeps_the_session_and_sets_the_envelope() {
        let report = Incoming {
            bytes: fixture("m365-to-cc-bcc.eml"),
            envelope: Envelope {
                mail_from: "MicrosoftExchange@contoso.com".into(),
                mail_params: vec!["SIZE=1571".into()],
                rcpt_to: vec!["journal@archive.contoso.com".into()],
            },
            session: SessionInfo {
                listener: "journal".into(),
                protocol: "ESMTP".into(),
                client_addr: Some("10.0.0.5:41234".into()),
                helo: Some("EX01.contoso.com".into()),
                queue_id: None,
                xcoffer: None,
                tls: None,
            },
        };
        let o = original_arrival(&report).unwrap().unwrap();
        assert_eq!(o.bytes, fixture("original-utf8.eml"));
        assert_eq!(o.session, report.session);
        assert_eq!(o.envelope.mail_from, "alice@contoso.com");
        assert!(o.envelope.mail_params.is_empty());
        assert!(o.envelope.rcpt_to.iter().any(|r| r == "frank@contoso.com"));
        assert!(o.envelope.rcpt_to.iter().any(|r| r == "sales@contoso.com"));

        let mut plain = report.clone();
        plain.bytes = fixture("not-report-plain.eml");
        assert!(original_arrival(&plain).is_none());
        let mut broken = report;
        broken.bytes = fixture("malformed-no-original.eml");
        assert_eq!(
            original_arrival(&broken).unwrap().unwrap_err(),
            JournalError::NoOriginal
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any original that does not contain the delimiter comes back byte for byte, raw
        /// and base64-encoded.
        #[test]
        fn wrapped_original_round_trips(
            body in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b'='), Just(b'_'),
                            Just(b'b'), Just(b' '), any::<u8>()],
                1..400)
        ) {
            let mut original = b"Subject: p\r\n\r\n".to_vec();
            original.extend_from_slice(&body);
            let has_delimiter = original
                .split(|&b| b == b'\n')
                .any(|line| line.starts_with(b"--=_b"));
            prop_assume!(!has_delimiter);
            let u = unwrap(&wrap(LINES, Some("binary"), &original)).unwrap().unwrap();
            prop_assert_eq!(&u.original, &original);

            let mut encoded = Vec::new();
            for chunk in original.chunks(57) {
                encoded.extend_from_slice(b64(chunk).as_bytes());
                encoded.extend_from_slice(b"\r\n");
            }
            let u = unwrap(&wrap(LINES, Some("base64"), &encoded)).unwrap().unwrap();
            prop_assert_eq!(&u.original, &original);
        }

        /// Arbitrary input never panics, with or without the header.
        #[test]
        fn never_panics(
            tail in proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'-'), Just(b':'), Just(b'"'),
                            Just(b'b'), Just(b' '), Just(b';'), any::<u8>()],
                0..600)
        ) {
            let _ = unwrap(&tail);
            let mut m = b"X-MS-Journal-Report:\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                .to_vec();
            m.extend_from_slice(&tail);
            let _ = unwrap(&m);
        }
    }

    /// Standard base64 with padding, for building samples.
    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
                if i <= c.len() {
                    s.push(A[(n >> shift) as usize & 63] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }
}
