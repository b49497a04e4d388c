//! Binary values of the index's `arrivals` and `summaries` tables (index format 3).
//!
//! A value starts with a tag byte: [`TAG_ARRIVAL`] or [`TAG_SUMMARY`]; a value starting
//! with `{` is the JSON of index format 2 and still decodes. After the tag, fields in a
//! fixed order: strings as a LEB128 length and UTF-8 bytes, optional strings as length + 1
//! (0: none), lists as a count and their strings. An arrival's message id is its 32 bytes;
//! its time is a signed LEB128 count of µs when the RFC 3339 string is exactly what the
//! archiver writes for that instant (`2024-05-01T12:00:00.123456Z`), the string otherwise.
//! The rare parts of an arrival (`xcoffer`, `tls`) stay JSON inside an optional string.

use chrono::{DateTime, SecondsFormat, Utc};

use super::index::Loc;
use super::summary::Summary;
use super::Arrival;
use crate::ids::MessageId;

/// First byte of an arrival value.
pub const TAG_ARRIVAL: u8 = 0xA3;
/// First byte of a summary value.
pub const TAG_SUMMARY: u8 = 0x53;

/// Appends `v` in LEB128.
pub(crate) fn put_uint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    // zigzag
    put_uint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_uint(out, s.len() as u64 + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn put_list(out: &mut Vec<u8>, l: &[String]) {
    put_uint(out, l.len() as u64);
    for s in l {
        put_str(out, s);
    }
}

struct Cursor<'a> {
    b: &'a [u8],
}

type R<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> R<u8> {
        let (&first, rest) = self.b.split_first().ok_or("truncated value")?;
        self.b = rest;
        Ok(first)
    }

    fn bytes(&mut self, n: usize) -> R<&'a [u8]> {
        if self.b.len() < n {
            return Err("truncated value".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn uint(&mut self) -> R<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("bad varint".into())
    }

    fn int(&mut self) -> R<i64> {
        let u = self.uint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    fn len(&mut self) -> R<usize> {
        usize::try_from(self.uint()?).map_err(|_| "bad length".to_owned())
    }

    fn string(&mut self) -> R<String> {
        let n = self.len()?;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "bad UTF-8".to_owned())
    }

    fn opt(&mut self) -> R<Option<String>> {
        match self.len()? {
            0 => Ok(None),
            n => {
                let b = self.bytes(n - 1)?;
                String::from_utf8(b.to_vec())
                    .map(Some)
                    .map_err(|_| "bad UTF-8".to_owned())
            }
        }
    }

    fn list(&mut self) -> R<Vec<String>> {
        let n = self.len()?;
        if n > self.b.len() {
            return Err("bad list length".into());
        }
        (0..n).map(|_| self.string()).collect()
    }

    fn end(&self) -> R<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes".into())
        }
    }
}

/// The time as the archiver writes it, if `time` is exactly that: µs since the epoch.
fn canonical_time(time: &str) -> Option<i64> {
    let t = DateTime::parse_from_rfc3339(time).ok()?;
    let us = t.timestamp_micros();
    (format_time(us)? == time).then_some(us)
}

fn format_time(us: i64) -> Option<String> {
    let t: DateTime<Utc> = DateTime::from_timestamp_micros(us)?;
    Some(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn opt_json<T: serde::Serialize>(v: Option<&T>) -> Option<String> {
    v.map(|v| serde_json::to_string(v).expect("serializes"))
}

fn from_json<T: serde::de::DeserializeOwned>(s: Option<String>) -> R<Option<T>> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
        .transpose()
}

/// The `arrivals` value of `a`.
///
/// # Panics
/// If `a.message` is not a message id (every stored arrival names one).
pub fn encode_arrival(a: &Arrival) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(TAG_ARRIVAL);
    put_str(&mut out, &a.id.to_string());
    let message: MessageId = a.message.parse().expect("arrival names a message id");
    out.extend_from_slice(&message.0);
    match canonical_time(&a.time) {
        Some(us) => {
            out.push(1);
            put_int(&mut out, us);
        }
        None => {
            out.push(0);
            put_str(&mut out, &a.time);
        }
    }
    put_str(&mut out, &a.listener);
    put_str(&mut out, &a.protocol);
    put_opt(&mut out, a.client_addr.as_deref());
    put_opt(&mut out, a.helo.as_deref());
    put_str(&mut out, &a.mail_from);
    put_list(&mut out, &a.mail_params);
    put_list(&mut out, &a.rcpt_to);
    put_opt(&mut out, a.queue_id.as_deref());
    put_list(&mut out, &a.trace);
    put_opt(&mut out, a.via.as_deref());
    put_opt(&mut out, a.received.as_deref());
    put_opt(&mut out, opt_json(a.xcoffer.as_ref()).as_deref());
    put_opt(&mut out, opt_json(a.tls.as_ref()).as_deref());
    out
}

/// An `arrivals` value: binary (format 3) or JSON (format 2).
///
/// # Errors
/// A damaged value.
pub fn decode_arrival(b: &[u8]) -> R<Arrival> {
    if b.first() == Some(&b'{') {
        return serde_json::from_slice(b).map_err(|e| e.to_string());
    }
    let mut c = Cursor { b };
    if c.byte()? != TAG_ARRIVAL {
        return Err("not an arrival value".into());
    }
    let id = c
        .string()?
        .parse()
        .map_err(|_| "bad arrival id".to_owned())?;
    let message = MessageId(c.bytes(32)?.try_into().expect("32 bytes")).to_hex();
    let time = match c.byte()? {
        1 => format_time(c.int()?).ok_or("bad time")?,
        0 => c.string()?,
        _ => return Err("bad time tag".into()),
    };
    let a = Arrival {
        id,
        message,
        time,
        listener: c.string()?,
        protocol: c.string()?,
        client_addr: c.opt()?,
        helo: c.opt()?,
        mail_from: c.string()?,
        mail_params: c.list()?,
        rcpt_to: c.list()?,
        queue_id: c.opt()?,
        trace: c.list()?,
        via: c.opt()?,
        received: c.opt()?,
        xcoffer: from_json(c.opt()?)?,
        tls: from_json(c.opt()?)?,
    };
    c.end()?;
    Ok(a)
}

/// The message id and arrival time (µs) of a binary `arrivals` value, read without
/// decoding the rest; `None` for a JSON value or one whose time is not in the canonical
/// form (decode it whole then).
pub fn arrival_message_and_time(b: &[u8]) -> Option<([u8; 32], i64)> {
    let (mut c, message) = arrival_head(b)?;
    match c.byte().ok()? {
        1 => Some((message, c.int().ok()?)),
        _ => None,
    }
}

/// The message id of a binary `arrivals` value, and the cursor past it (at the time).
fn arrival_head(b: &[u8]) -> Option<(Cursor<'_>, [u8; 32])> {
    let mut c = Cursor { b };
    if c.byte().ok()? != TAG_ARRIVAL {
        return None;
    }
    c.string().ok()?;
    let message: [u8; 32] = c.bytes(32).ok()?.try_into().ok()?;
    Some((c, message))
}

/// The message id, envelope sender and recipients of an `arrivals` value in the binary
/// form, read without the rest; `None` if it is not one (JSON, damage).
pub fn arrival_envelope(b: &[u8]) -> Option<([u8; 32], String, Vec<String>)> {
    let (mut c, message) = arrival_head(b)?;
    match c.byte().ok()? {
        1 => {
            c.int().ok()?;
        }
        0 => {
            c.string().ok()?;
        }
        _ => return None,
    }
    c.string().ok()?; // listener
    c.string().ok()?; // protocol
    c.opt().ok()?; // client address
    c.opt().ok()?; // HELO
    let mail_from = c.string().ok()?;
    c.list().ok()?; // MAIL FROM parameters
    let rcpt_to = c.list().ok()?;
    Some((message, mail_from, rcpt_to))
}

/// The `summaries` value of `s`.
pub fn encode_summary(s: &Summary) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(TAG_SUMMARY);
    out.push(u8::from(s.unparsed));
    put_opt(&mut out, s.date.as_deref());
    put_list(&mut out, &s.from);
    put_list(&mut out, &s.to);
    put_opt(&mut out, s.subject.as_deref());
    put_opt(&mut out, s.message_id.as_deref());
    out
}

/// A `summaries` value: binary (format 3) or JSON (format 2).
///
/// # Errors
/// A damaged value.
pub fn decode_summary(b: &[u8]) -> R<Summary> {
    if b.first() == Some(&b'{') {
        return serde_json::from_slice(b).map_err(|e| e.to_string());
    }
    let mut c = Cursor { b };
    if c.byte()? != TAG_SUMMARY {
        return Err("not a summary value".into());
    }
    let unparsed = match c.byte()? {
        0 => false,
        1 => true,
        _ => return Err("bad flag".into()),
    };
    let s = Summary {
        unparsed,
        date: c.opt()?,
        from: c.list()?,
        to: c.list()?,
        subject: c.opt()?,
        message_id: c.opt()?,
    };
    c.end()?;
    Ok(s)
}

/// A `messages` value (index format 5): the fields of a [`Loc`] as LEB128 numbers —
/// segment, offset, record length, raw length, then the block table position + 1, or 0
/// for a record in a segment. 8 to 13 bytes where format 4 took 20 or 24.
pub fn encode_loc(l: &Loc) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    put_uint(&mut out, u64::from(l.segment));
    put_uint(&mut out, l.offset);
    put_uint(&mut out, u64::from(l.record_len));
    put_uint(&mut out, u64::from(l.raw_len));
    put_uint(&mut out, l.position.map_or(0, |p| u64::from(p) + 1));
    out
}

/// A `messages` value as [`encode_loc`] writes it; `None` if it is not one.
pub fn decode_loc(b: &[u8]) -> Option<Loc> {
    let mut c = Cursor { b };
    let u32_of = |c: &mut Cursor<'_>| c.uint().ok().and_then(|v| u32::try_from(v).ok());
    let segment = u32_of(&mut c)?;
    let offset = c.uint().ok()?;
    let record_len = u32_of(&mut c)?;
    let raw_len = u32_of(&mut c)?;
    let position = match c.uint().ok()? {
        0 => None,
        p => Some(u32::try_from(p - 1).ok()?),
    };
    c.end().ok()?;
    Some(Loc {
        segment,
        offset,
        record_len,
        raw_len,
        position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_reads_back_in_few_bytes() {
        let record = Loc {
            segment: 12,
            offset: 1 << 30,
            record_len: 22_000,
            raw_len: 21_000,
            position: None,
        };
        let in_block = Loc {
            position: Some(0),
            ..record
        };
        let widest = Loc {
            segment: u32::MAX,
            offset: u64::MAX,
            record_len: u32::MAX,
            raw_len: u32::MAX,
            position: Some(u32::MAX),
        };
        for l in [record, in_block, widest] {
            assert_eq!(decode_loc(&encode_loc(&l)), Some(l));
        }
        assert_eq!(encode_loc(&in_block).len(), 13); // format 4: 24
        let b = encode_loc(&record);
        assert_eq!(decode_loc(&b[..b.len() - 1]), None);
        assert_eq!(decode_loc(&[b.as_slice(), &[0]].concat()), None);
    }
    use crate::ids::ArrivalId;

    fn arrival(time: &str) -> Arrival {
        Arrival {
            id: ArrivalId {
                node: "node-a".into(),
                epoch: "0a1b2c3d".into(),
                seq: 300,
            },
            message: hex::encode([7u8; 32]),
            time: time.into(),
            listener: "journal".into(),
            protocol: "ESMTP".into(),
            client_addr: Some("192.0.2.1".into()),
            helo: None,
            mail_from: "a@example.org".into(),
            mail_params: vec!["SIZE=12".into(), "BODY=8BITMIME".into()],
            rcpt_to: vec!["b@example.org".into(), "".into(), "c@ex.org".into()],
            queue_id: Some("4XyZ".into()),
            xcoffer: None,
            trace: vec!["node-b".into(), "node-a".into()],
            via: Some("peers".into()),
            tls: None,
            received: Some("2024-05-01T12:00:01.5Z".into()),
        }
    }

    #[test]
    fn arrivals_round_trip_in_both_time_forms() {
        for time in [
            "2024-05-01T12:00:00.123456Z",
            "1969-12-31T23:59:59.999999Z",
            "2024-05-01T12:00:00Z",
            "2024-05-01T14:00:00.123456+02:00",
            "not a time",
            "",
        ] {
            let mut a = arrival(time);
            let b = encode_arrival(&a);
            assert_eq!(decode_arrival(&b).unwrap(), a, "{time}");
            a.xcoffer = Some(coffer_proto::Xcoffer {
                origin_arrival: Some("node-b/00000000/1".into()),
                ..Default::default()
            });
            a.tls = Some(coffer_proto::TlsInfo {
                version: Some("TLSv1.3".into()),
                bits: Some(256),
                ..Default::default()
            });
            a.client_addr = None;
            a.via = None;
            a.trace.clear();
            let b = encode_arrival(&a);
            assert_eq!(decode_arrival(&b).unwrap(), a, "{time}");
        }
        let a = arrival("2024-05-01T12:00:00.123456Z");
        let b = encode_arrival(&a);
        assert_eq!(
            arrival_message_and_time(&b),
            Some(([7u8; 32], crate::store::index::time_us(&a.time)))
        );
        assert_eq!(
            arrival_message_and_time(&encode_arrival(&arrival("not a time"))),
            None,
            "a time kept as a string is read whole"
        );
        let json = serde_json::to_vec(&a).unwrap();
        assert!(b.len() * 2 < json.len(), "{} vs {}", b.len(), json.len());
        assert_eq!(decode_arrival(&json).unwrap(), a);
    }

    #[test]
    fn summaries_round_trip() {
        let s = Summary {
            date: Some("2002-08-03T20:34:27+01:00".into()),
            from: vec!["x@y.example".into()],
            to: vec!["a@b.example".into(), "c@d.example".into()],
            subject: Some("Grüße".into()),
            message_id: Some("abc@def".into()),
            unparsed: false,
        };
        assert_eq!(decode_summary(&encode_summary(&s)).unwrap(), s);
        let empty = Summary {
            unparsed: true,
            subject: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(decode_summary(&encode_summary(&empty)).unwrap(), empty);
        assert_eq!(decode_summary(&serde_json::to_vec(&s).unwrap()).unwrap(), s);
    }

    #[test]
    fn damaged_values_are_errors_not_panics() {
        let a = encode_arrival(&arrival("2024-05-01T12:00:00.123456Z"));
        let s = encode_summary(&Summary {
            subject: Some("s".into()),
            ..Default::default()
        });
        for v in [&a, &s] {
            for n in 0..v.len() {
                assert!(decode_arrival(&v[..n]).is_err());
                assert!(decode_summary(&v[..n]).is_err());
            }
            let mut longer = v.clone();
            longer.push(0);
            assert!(decode_arrival(&longer).is_err());
            assert!(decode_summary(&longer).is_err());
        }
        assert!(decode_arrival(&s).is_err());
        assert!(decode_summary(&a).is_err());
    }
}
