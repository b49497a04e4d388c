//! The `XCOFFER=` MAIL parameter.
//!
//! A Coffer client (the milter, a peer's replicator) sends, on listeners that advertise
//! `XCOFFER NODE EPOCH` and only there:
//!
//! ```text
//! MAIL FROM:<sender@example.org> BODY=8BITMIME XCOFFER=<unpadded base64url of a JSON object>
//! ```
//!
//! The JSON object is an [`Xcoffer`]: every field is optional and left out when empty, so
//! a typical value is a few hundred bytes. The encoded value is at most
//! [`MAX_ENCODED_LEN`] bytes (the receiver's MAIL line cap is 16 KiB in all).
//!
//! # Decoding rules
//! - base64url alphabet (`A-Z a-z 0-9 - _`), no padding, no whitespace, canonical
//!   trailing bits; anything else is refused.
//! - The JSON is one object (not an array or a scalar) with nothing after it; a field
//!   given twice is refused.
//! - Known fields must have the documented type; a string where a number is expected (or
//!   the reverse) is refused.
//! - Unknown fields are ignored, so a newer sender can add fields without breaking an
//!   older receiver.
//! - A few fields carry identities and are checked: [`Xcoffer::origin_arrival`] must be
//!   `NODE/EPOCH/SEQ`, [`Xcoffer::origin_time`] RFC 3339, each [`Xcoffer::trace`] entry a
//!   node name. Everything else is evidence and is kept exactly as sent, whatever it
//!   contains (a hostile HELO is exactly what must be recorded faithfully).

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Longest encoded `XCOFFER=` value accepted by [`decode`], in bytes.
pub const MAX_ENCODED_LEN: usize = 16 * 1024;

/// What a Coffer client tells cofferd about one message, beyond the standard envelope.
///
/// Field names are the JSON keys. Every field defaults to empty and is left out of the
/// JSON when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Xcoffer {
    /// The arrival id where the message first arrived, `NODE/EPOCH/SEQ` (replication keeps
    /// it, so every node holds the same arrival set). Absent on a first arrival.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_arrival: Option<String>,
    /// When the message first arrived, RFC 3339 (`2024-05-01T12:00:00.123456Z`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_time: Option<String>,
    /// The listener that first took it, on the origin node (`journal`, `milter`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin_listener: Option<String>,
    /// The protocol the original client spoke, as its receiver named it (`ESMTP`,
    /// `ESMTPSA`, `LMTP`; Postfix's `{protocol}`-like value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The MAIL FROM parameters the original client sent (`SIZE=1234`, `BODY=8BITMIME`,
    /// ...), which the hop to cofferd may not repeat.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mail_params: Vec<String>,
    /// The RCPT TO parameters the original client sent, one list per recipient in the
    /// order of the RCPT commands of this transaction (`NOTIFY=NEVER`, `ORCPT=...`).
    /// Empty when no recipient had any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rcpt_params: Vec<Vec<String>>,
    /// The original client's address as its receiver saw it (`IP` or `IP:PORT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// The original client's name, as its receiver resolved it (`unknown` when it did not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_name: Option<String>,
    /// The raw HELO/EHLO argument of the original client, whatever it contained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helo: Option<String>,
    /// The SASL-authenticated user, if the original client authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// TLS details of the original client's connection, if it used TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    /// The MTA's queue id (Postfix `{i}`). Not unique by itself: Postfix reuses them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// Other MTA macros worth keeping, by name as the MTA names them (`{daemon_name}`,
    /// `j`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub macros: BTreeMap<String, String>,
    /// Names of the nodes that already hold this arrival, in the order it reached them. A
    /// route forwards an arrival only to peers not on its trace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<String>,
    /// How many Coffer-to-Coffer hops the arrival has made before this one.
    #[serde(skip_serializing_if = "is_zero")]
    pub hops: u32,
}

/// TLS details of a connection, as the MTA reported them (Postfix `{tls_version}`,
/// `{cipher}`, `{cipher_bits}`, `{cert_subject}`, `{cert_issuer}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsInfo {
    /// `TLSv1.3`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The cipher suite name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// The cipher's key bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// The client certificate's subject, if one was presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_subject: Option<String>,
    /// The client certificate's issuer, if one was presented.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_issuer: Option<String>,
    /// Whether the client certificate was verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_verified: Option<bool>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Why an `XCOFFER=` value was refused. The receiver answers `501 5.5.4` with this text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XcofferError {
    /// The encoded value is longer than [`MAX_ENCODED_LEN`].
    TooLong { len: usize },
    /// The value is empty.
    Empty,
    /// Not unpadded base64url.
    Base64(String),
    /// The JSON is valid but not an object.
    NotAnObject,
    /// Not JSON, trailing bytes, a duplicate field, or a field of the wrong type.
    Json(String),
    /// A field's value breaks its rule.
    Field { field: &'static str, why: String },
}

impl fmt::Display for XcofferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { len } => {
                write!(
                    f,
                    "value is {len} bytes, over the {MAX_ENCODED_LEN} byte limit"
                )
            }
            Self::Empty => f.write_str("value is empty"),
            Self::Base64(e) => write!(f, "not unpadded base64url: {e}"),
            Self::NotAnObject => f.write_str("JSON is not an object"),
            Self::Json(e) => write!(f, "bad JSON: {e}"),
            Self::Field { field, why } => write!(f, "field {field}: {why}"),
        }
    }
}

impl std::error::Error for XcofferError {}

/// Encodes `x` as an `XCOFFER=` value: unpadded base64url of its compact JSON.
///
/// Does not check the result against [`MAX_ENCODED_LEN`] or [`Xcoffer::validate`]: a
/// sender that fills fields from outside input should check both before sending.
pub fn encode(x: &Xcoffer) -> String {
    let json = serde_json::to_vec(x).expect("an Xcoffer always serializes");
    URL_SAFE_NO_PAD.encode(json)
}

/// Decodes and validates an `XCOFFER=` value (the text after `XCOFFER=`).
///
/// # Errors
/// See the module documentation's decoding rules.
pub fn decode(value: &str) -> Result<Xcoffer, XcofferError> {
    if value.is_empty() {
        return Err(XcofferError::Empty);
    }
    if value.len() > MAX_ENCODED_LEN {
        return Err(XcofferError::TooLong { len: value.len() });
    }
    let json = URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|e| XcofferError::Base64(e.to_string()))?;
    // serde would also take a JSON array for a struct: insist on an object.
    let first = json.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(&json) {
            Ok(_) => Err(XcofferError::NotAnObject),
            Err(e) => Err(XcofferError::Json(e.to_string())),
        };
    }
    let x: Xcoffer =
        serde_json::from_slice(&json).map_err(|e| XcofferError::Json(e.to_string()))?;
    x.validate()?;
    Ok(x)
}

impl Xcoffer {
    /// Checks the fields that carry identities (see the module documentation).
    ///
    /// # Errors
    /// [`XcofferError::Field`] naming the first field at fault.
    pub fn validate(&self) -> Result<(), XcofferError> {
        let field = |field: &'static str, why: String| XcofferError::Field { field, why };
        if let Some(id) = &self.origin_arrival {
            arrival_id_problem(id)
                .map_err(|why| field("origin_arrival", format!("{id:?} {why}")))?;
        }
        if let Some(t) = &self.origin_time {
            if !is_rfc3339(t) {
                return Err(field("origin_time", format!("{t:?} is not RFC 3339")));
            }
        }
        for node in &self.trace {
            if let Some(why) = node_name_problem(node) {
                return Err(field("trace", format!("{node:?}: a node name {why}")));
            }
        }
        if self.macros.keys().any(String::is_empty) {
            return Err(field("macros", "a macro name is empty".into()));
        }
        Ok(())
    }
}

/// Why `name` cannot be a node name, or `None` when it can. The same rule as the
/// configuration's `[node] name`: it appears in arrival ids and on the EHLO line.
pub fn node_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.contains('/') {
        Some("must not contain `/` (it separates the parts of an arrival id)")
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Some("must be printable ASCII without whitespace (it is sent on the EHLO line)")
    } else {
        None
    }
}

/// Checks `NODE/EPOCH/SEQ`: a node name, 8 lowercase hex digits, a decimal `u64`.
fn arrival_id_problem(id: &str) -> Result<(), &'static str> {
    let mut parts = id.split('/');
    let (Some(node), Some(epoch), Some(seq), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("is not NODE/EPOCH/SEQ");
    };
    if node_name_problem(node).is_some() {
        return Err("does not start with a valid node name");
    }
    if epoch.len() != 8
        || !epoch
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("needs 8 lowercase hex digits of epoch");
    }
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || seq.parse::<u64>().is_err() {
        return Err("needs a decimal sequence number");
    }
    Ok(())
}

/// RFC 3339 `date-time`: `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`, `T`/`Z` in either
/// case, leap second allowed, calendar dates checked.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let d = b.get(from..from + len)?;
        if d.iter().all(u8::is_ascii_digit) {
            Some(d.iter().fold(0, |n, &c| n * 10 + u32::from(c - b'0')))
        } else {
            None
        }
    };
    let at = |i: usize, c: u8| b.get(i).is_some_and(|x| x.eq_ignore_ascii_case(&c));
    let (Some(year), Some(month), Some(day), Some(hour), Some(min), Some(sec)) = (
        num(0, 4),
        num(5, 2),
        num(8, 2),
        num(11, 2),
        num(14, 2),
        num(17, 2),
    ) else {
        return false;
    };
    if !(at(4, b'-') && at(7, b'-') && at(10, b'T') && at(13, b':') && at(16, b':')) {
        return false;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || min > 59 || sec > 60 {
        return false;
    }
    let mut i = 19;
    if at(i, b'.') {
        let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        i += 1 + digits;
    }
    if at(i, b'Z') {
        return i + 1 == b.len();
    }
    if !(at(i, b'+') || at(i, b'-')) || !at(i + 3, b':') || i + 6 != b.len() {
        return false;
    }
    matches!((num(i + 1, 2), num(i + 4, 2)), (Some(h), Some(m)) if h <= 23 && m <= 59)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn full() -> Xcoffer {
        Xcoffer {
            origin_arrival: Some("archive-a/0badf00d/42".into()),
            origin_time: Some("2024-05-01T12:00:00.123456Z".into()),
            origin_listener: Some("journal".into()),
            protocol: Some("ESMTPSA".into()),
            mail_params: vec!["SIZE=1234".into(), "BODY=8BITMIME".into()],
            rcpt_params: vec![vec![], vec!["NOTIFY=NEVER".into()]],
            client_addr: Some("[2001:db8::1]:4567".into()),
            client_name: Some("unknown".into()),
            helo: Some("evil\r\nname \u{0} ünïcode".into()),
            auth_user: Some("alice".into()),
            tls: Some(TlsInfo {
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS_AES_256_GCM_SHA384".into()),
                bits: Some(256),
                peer_subject: None,
                peer_issuer: None,
                peer_verified: Some(false),
            }),
            queue_id: Some("4VQ3xY1z2Bz9abc".into()),
            macros: [("{daemon_name}".to_owned(), "smtpd".to_owned())].into(),
            trace: vec!["archive-a".into(), "archive-b".into()],
            hops: 2,
        }
    }

    #[test]
    fn round_trips() {
        for x in [Xcoffer::default(), full()] {
            let value = encode(&x);
            assert!(value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(decode(&value), Ok(x));
        }
    }

    #[test]
    fn empty_fields_are_left_out() {
        let json = serde_json::to_string(&Xcoffer::default()).unwrap();
        assert_eq!(json, "{}");
        let x = Xcoffer {
            queue_id: Some("ABC".into()),
            tls: Some(TlsInfo::default()),
            ..Xcoffer::default()
        };
        assert_eq!(
            serde_json::to_string(&x).unwrap(),
            r#"{"tls":{},"queue_id":"ABC"}"#
        );
    }

    /// What a decode is expected to give.
    #[derive(Debug)]
    enum Want {
        Ok,
        Empty,
        Base64,
        NotAnObject,
        Json,
        TooLong,
        Field(&'static str),
    }

    fn check(name: &str, value: &str, want: &Want) {
        let got = decode(value);
        let matched = match (want, &got) {
            (Want::Ok, Ok(_)) => true,
            (Want::Empty, Err(XcofferError::Empty))
            | (Want::Base64, Err(XcofferError::Base64(_)))
            | (Want::NotAnObject, Err(XcofferError::NotAnObject))
            | (Want::Json, Err(XcofferError::Json(_)))
            | (Want::TooLong, Err(XcofferError::TooLong { .. })) => true,
            (Want::Field(f), Err(XcofferError::Field { field, .. })) => f == field,
            _ => false,
        };
        assert!(matched, "{name}: want {want:?}, got {got:?}");
    }

    #[test]
    fn encoding_table() {
        let cases: &[(&str, String, Want)] = &[
            ("empty", String::new(), Want::Empty),
            ("empty object", b64("{}"), Want::Ok),
            ("padded", format!("{}=", b64("{}")), Want::Base64),
            ("standard alphabet", "e30+".into(), Want::Base64),
            ("space inside", "e3 0".into(), Want::Base64),
            // "{}" is e30; e31 has non-zero trailing bits.
            ("non-canonical trailing bits", "e31".into(), Want::Base64),
            ("one char", "e".into(), Want::Base64),
            ("too long", "A".repeat(MAX_ENCODED_LEN + 1), Want::TooLong),
            (
                "invalid UTF-8 in JSON",
                URL_SAFE_NO_PAD.encode(b"{\"helo\":\"\xff\"}"),
                Want::Json,
            ),
        ];
        for (name, value, want) in cases {
            check(name, value, want);
        }
    }

    #[test]
    fn json_table() {
        let cases: &[(&str, &str, Want)] = &[
            // Shape.
            ("empty object", "{}", Want::Ok),
            ("whitespace around", " {} ", Want::Ok),
            ("array", "[]", Want::NotAnObject),
            ("array of fields", r#"["a"]"#, Want::NotAnObject),
            ("string", r#""x""#, Want::NotAnObject),
            ("null", "null", Want::NotAnObject),
            ("not JSON", "{", Want::Json),
            ("garbage", "hello", Want::Json),
            ("trailing bytes", "{}x", Want::Json),
            ("two objects", "{}{}", Want::Json),
            ("duplicate field", r#"{"hops":1,"hops":2}"#, Want::Json),
            ("lone surrogate", r#"{"helo":"\ud800"}"#, Want::Json),
            // Types.
            ("hops as string", r#"{"hops":"1"}"#, Want::Json),
            ("negative hops", r#"{"hops":-1}"#, Want::Json),
            ("hops too big", r#"{"hops":4294967296}"#, Want::Json),
            ("helo as number", r#"{"helo":1}"#, Want::Json),
            ("trace as string", r#"{"trace":"a"}"#, Want::Json),
            ("rcpt_params flat", r#"{"rcpt_params":["a"]}"#, Want::Json),
            ("macros as list", r#"{"macros":["a"]}"#, Want::Json),
            ("macro value number", r#"{"macros":{"i":1}}"#, Want::Json),
            (
                "tls bits as string",
                r#"{"tls":{"bits":"256"}}"#,
                Want::Json,
            ),
            ("tls as string", r#"{"tls":"TLSv1.3"}"#, Want::Json),
            ("null for an option", r#"{"helo":null}"#, Want::Ok),
            // Forward compatibility.
            (
                "unknown field",
                r#"{"future":{"x":[1,2]},"hops":1}"#,
                Want::Ok,
            ),
            ("unknown tls field", r#"{"tls":{"alpn":"smtp"}}"#, Want::Ok),
            // Field rules.
            (
                "arrival id",
                r#"{"origin_arrival":"a/0badf00d/1"}"#,
                Want::Ok,
            ),
            (
                "arrival id, 2 parts",
                r#"{"origin_arrival":"a/0badf00d"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, 4 parts",
                r#"{"origin_arrival":"x/a/0badf00d/1"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, upper hex",
                r#"{"origin_arrival":"a/0BADF00D/1"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, short epoch",
                r#"{"origin_arrival":"a/0badf0/1"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, signed seq",
                r#"{"origin_arrival":"a/0badf00d/+1"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, empty seq",
                r#"{"origin_arrival":"a/0badf00d/"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, seq overflow",
                r#"{"origin_arrival":"a/0badf00d/18446744073709551616"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, empty node",
                r#"{"origin_arrival":"/0badf00d/1"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "arrival id, node with space",
                r#"{"origin_arrival":"a b/0badf00d/1"}"#,
                Want::Field("origin_arrival"),
            ),
            (
                "time, offset and leap second",
                r#"{"origin_time":"2024-02-29T23:59:60.5+05:30"}"#,
                Want::Ok,
            ),
            (
                "time, lower case",
                r#"{"origin_time":"2024-01-01t00:00:00z"}"#,
                Want::Ok,
            ),
            (
                "time, no zone",
                r#"{"origin_time":"2024-01-01T00:00:00"}"#,
                Want::Field("origin_time"),
            ),
            (
                "time, Feb 29 of a common year",
                r#"{"origin_time":"2023-02-29T00:00:00Z"}"#,
                Want::Field("origin_time"),
            ),
            (
                "time, month 13",
                r#"{"origin_time":"2024-13-01T00:00:00Z"}"#,
                Want::Field("origin_time"),
            ),
            (
                "time, date only",
                r#"{"origin_time":"2024-01-01"}"#,
                Want::Field("origin_time"),
            ),
            (
                "time, empty fraction",
                r#"{"origin_time":"2024-01-01T00:00:00.Z"}"#,
                Want::Field("origin_time"),
            ),
            (
                "time, offset without colon",
                r#"{"origin_time":"2024-01-01T00:00:00+0200"}"#,
                Want::Field("origin_time"),
            ),
            (
                "time, trailing text",
                r#"{"origin_time":"2024-01-01T00:00:00Zx"}"#,
                Want::Field("origin_time"),
            ),
            (
                "trace entry with slash",
                r#"{"trace":["a","b/c"]}"#,
                Want::Field("trace"),
            ),
            (
                "trace entry empty",
                r#"{"trace":[""]}"#,
                Want::Field("trace"),
            ),
            (
                "empty macro name",
                r#"{"macros":{"":"x"}}"#,
                Want::Field("macros"),
            ),
        ];
        for (name, json, want) in cases {
            check(name, &b64(json), want);
        }
    }

    #[test]
    fn evidence_is_kept_as_sent() {
        let x = decode(&b64(r#"{"helo":"a\r\nb\u0000 ü","hops":1,"future":true}"#)).unwrap();
        assert_eq!(
            x,
            Xcoffer {
                helo: Some("a\r\nb\0 ü".into()),
                hops: 1,
                ..Xcoffer::default()
            }
        );
    }

    #[test]
    fn size_cap_is_on_the_encoded_value() {
        // The biggest value that fits decodes; one more byte is refused before decoding.
        let mut x = Xcoffer::default();
        let overhead = encode(&Xcoffer {
            queue_id: Some(String::new()),
            ..Xcoffer::default()
        })
        .len();
        let room = (MAX_ENCODED_LEN - overhead) / 4 * 3;
        x.queue_id = Some("q".repeat(room));
        let value = encode(&x);
        assert!(value.len() <= MAX_ENCODED_LEN, "{}", value.len());
        assert_eq!(decode(&value), Ok(x.clone()));
        x.queue_id = Some("q".repeat(room + 8));
        let value = encode(&x);
        assert!(value.len() > MAX_ENCODED_LEN);
        assert_eq!(
            decode(&value),
            Err(XcofferError::TooLong { len: value.len() })
        );
    }

    #[test]
    fn errors_read_well() {
        let e = decode(&b64(r#"{"trace":["a b"]}"#)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field trace: \"a b\": a node name must be printable ASCII without whitespace \
             (it is sent on the EHLO line)"
        );
    }
}
