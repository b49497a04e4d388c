//! What the index keeps of a message's top-level headers, for search.
//!
//! Only the header section is parsed (at most [`MAX_HEADER_BYTES`]), never the body or
//! MIME parts: a message that cannot be parsed is archived all the same, and flagged.

use mail_parser::{Address, MessageParser};
use serde::{Deserialize, Serialize};

/// The most header bytes parsed for the index. Anything past it is archived, not indexed.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The Date header, as RFC 3339 when it parses.
    pub date: Option<String>,
    /// From addresses, lowercased.
    pub from: Vec<String>,
    /// To and Cc addresses, lowercased.
    pub to: Vec<String>,
    /// The decoded Subject.
    pub subject: Option<String>,
    /// Message-ID without angle brackets.
    pub message_id: Option<String>,
    /// The headers could not be parsed (the message is archived all the same).
    #[serde(default)]
    pub unparsed: bool,
}

/// The header section of `bytes`: up to and including the first empty line (CRLF or LF).
fn header_section(bytes: &[u8]) -> &[u8] {
    let limit = bytes.len().min(MAX_HEADER_BYTES);
    let window = &bytes[..limit];
    let mut i = 0;
    while i < window.len() {
        if window[i] == b'\n' {
            match window.get(i + 1) {
                Some(b'\n') => return &window[..i + 2],
                Some(b'\r') if window.get(i + 2) == Some(&b'\n') => return &window[..i + 3],
                _ => {}
            }
        }
        i += 1;
    }
    window
}

fn addresses(out: &mut Vec<String>, addr: Option<&Address<'_>>) {
    if let Some(addr) = addr {
        for a in addr.iter() {
            if let Some(s) = a.address() {
                let s = s.trim().to_lowercase();
                if !s.is_empty() && !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
}

impl Summary {
    pub fn of(bytes: &[u8]) -> Summary {
        let section = header_section(bytes);
        let Some(msg) = MessageParser::new().parse_headers(section) else {
            return Summary {
                unparsed: true,
                ..Summary::default()
            };
        };
        let mut s = Summary {
            date: msg.date().map(mail_parser::DateTime::to_rfc3339),
            subject: msg.subject().map(str::to_owned),
            message_id: msg
                .message_id()
                .map(|m| m.trim_matches(['<', '>']).to_owned()),
            ..Summary::default()
        };
        addresses(&mut s.from, msg.from());
        addresses(&mut s.to, msg.to());
        addresses(&mut s.to, msg.cc());
        if s.from.is_empty() && s.to.is_empty() && s.subject.is_none() && s.message_id.is_none() {
            s.unparsed = msg.headers().is_empty();
        }
        s
    }
}

/// Lowercased domain part of an address, with its `@` (`@example.org`).
pub fn domain_of(addr: &str) -> Option<String> {
    addr.rfind('@')
        .map(|i| addr[i..].to_lowercase())
        .filter(|d| d.len() > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_top_level_headers_only() {
        let m = b"From: Alice <Alice@Example.org>\r\nTo: bob@x.org, c@y.org\r\nCc: d@z.org\r\n\
Subject: =?utf-8?q?h=C3=A9llo?=\r\nMessage-ID: <abc@x>\r\nDate: Tue, 1 Jan 2030 10:00:00 +0000\r\n\r\n\
From: body@not.header\r\n";
        let s = Summary::of(m);
        assert_eq!(s.from, vec!["alice@example.org"]);
        assert_eq!(s.to, vec!["bob@x.org", "c@y.org", "d@z.org"]);
        assert_eq!(s.subject.as_deref(), Some("h\u{e9}llo"));
        assert_eq!(s.message_id.as_deref(), Some("abc@x"));
        assert!(s.date.unwrap().starts_with("2030-01-01T10:00:00"));
        assert!(!s.unparsed);
    }

    #[test]
    fn garbage_is_flagged_not_refused() {
        let s = Summary::of(b"\x00\x01\x02 no headers at all");
        assert!(s.from.is_empty());
        assert_eq!(domain_of("a@B.org").as_deref(), Some("@b.org"));
        assert_eq!(domain_of("nodomain"), None);
    }
}
