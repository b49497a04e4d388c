//! What the subcommands print: JSON documents and terminal text, written to any
//! [`Write`] so they can be tested without a store.

use std::io::{self, Write};

use serde::Serialize;

use super::dates::display_time;
use crate::store::{Arrival, MessageRecord, StoreStatus, VerifyReport};

/// `coffer status --json`: exactly the fields of docs/interfaces.md.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatusOutput {
    pub node: String,
    pub epoch: String,
    pub messages: u64,
    pub arrivals: u64,
    pub repeats: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub connections: Vec<ConnectionStatus>,
}

/// One replication connection in `coffer status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ConnectionStatus {
    pub name: String,
    /// The node name expected at the other end.
    pub peer: String,
    /// `up`, `down`, `connecting`, ... as the daemon reports it.
    pub state: String,
    /// Arrivals not yet acknowledged by the peer.
    pub lag_arrivals: u64,
    pub lag_bytes: u64,
    /// Age of the oldest arrival not yet sent; `null` when nothing waits.
    pub oldest_unsent_secs: Option<u64>,
    /// Arrivals the peer refused with 5xx, waiting for `coffer queue retry|skip`.
    pub parked: u64,
}

impl StatusOutput {
    pub fn new(status: StoreStatus, connections: Vec<ConnectionStatus>) -> Self {
        Self {
            node: status.node,
            epoch: status.epoch,
            messages: status.messages,
            arrivals: status.arrivals,
            repeats: status.repeats,
            raw_bytes: status.raw_bytes,
            stored_bytes: status.stored_bytes,
            connections,
        }
    }
}

/// `coffer verify --json`: the report plus `ok`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyOutput<'a> {
    pub ok: bool,
    #[serde(flatten)]
    pub report: &'a VerifyReport,
}

/// One JSON document, pretty-printed, with a final newline.
pub fn write_json<T: Serialize + ?Sized>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    out.write_all(b"\n")
}

/// Sizes as people read them: `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Aligned `key: value` lines.
fn write_pairs(out: &mut dyn Write, pairs: &[(&str, String)]) -> io::Result<()> {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in pairs {
        writeln!(out, "{:<width$} {v}", format!("{k}:"), width = width)?;
    }
    Ok(())
}

/// `coffer status` for a terminal.
pub fn write_status_human(
    out: &mut dyn Write,
    s: &StatusOutput,
    daemon_running: bool,
) -> io::Result<()> {
    let bytes = |n: u64| format!("{n} ({})", human_bytes(n));
    let ratio = if s.raw_bytes == 0 {
        "-".to_owned()
    } else {
        #[allow(clippy::cast_precision_loss)]
        let r = s.stored_bytes as f64 / s.raw_bytes as f64;
        format!("{r:.3}")
    };
    let mut pairs = vec![
        ("node", s.node.clone()),
        ("epoch", s.epoch.clone()),
        (
            "daemon",
            if daemon_running {
                "running"
            } else {
                "not running"
            }
            .to_owned(),
        ),
        ("messages", s.messages.to_string()),
        ("arrivals", s.arrivals.to_string()),
        ("repeats", s.repeats.to_string()),
        ("raw_bytes", bytes(s.raw_bytes)),
        ("stored_bytes", bytes(s.stored_bytes)),
        ("ratio", ratio),
    ];
    if s.connections.is_empty() {
        pairs.push(("connections", "none".to_owned()));
    }
    write_pairs(out, &pairs)?;
    for c in &s.connections {
        let oldest = c
            .oldest_unsent_secs
            .map_or_else(|| "-".to_owned(), |s| format!("{s}s"));
        writeln!(
            out,
            "connection {} (peer {}): {}, lag {} arrivals / {}, oldest unsent {}, parked {}",
            sanitize(&c.name),
            sanitize(&c.peer),
            sanitize(&c.state),
            c.lag_arrivals,
            human_bytes(c.lag_bytes),
            oldest,
            c.parked
        )?;
    }
    Ok(())
}

/// Control characters from mail headers must not drive the terminal.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// At most `width` characters, with `…` marking a cut.
fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The earliest arrival (arrival times are RFC 3339; compared as instants).
pub fn first_arrival(rec: &MessageRecord) -> Option<&Arrival> {
    rec.arrivals.iter().min_by(|a, b| {
        let ta = chrono::DateTime::parse_from_rfc3339(&a.time).ok();
        let tb = chrono::DateTime::parse_from_rfc3339(&b.time).ok();
        match (ta, tb) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => a.time.cmp(&b.time),
        }
    })
}

/// The sender as a line shows it: header From, else the envelope sender.
fn from_column(rec: &MessageRecord) -> String {
    if !rec.from.is_empty() {
        return sanitize(&rec.from.join(", "));
    }
    match first_arrival(rec) {
        Some(a) if !a.mail_from.is_empty() => sanitize(&format!("<{}>", a.mail_from)),
        _ => "-".to_owned(),
    }
}

const FROM_MAX: usize = 32;
const SHORT_ID: usize = 12;

/// `coffer search` for a terminal: one line per message — first arrival (UTC), short
/// id, sender, subject — under a header line. Nothing at all when there are no matches.
pub fn write_search_human(out: &mut dyn Write, records: &[MessageRecord]) -> io::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let froms: Vec<String> = records
        .iter()
        .map(|r| truncate(&from_column(r), FROM_MAX))
        .collect();
    let from_w = froms
        .iter()
        .map(|f| f.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    writeln!(
        out,
        "{:<19}  {:<SHORT_ID$}  {:<from_w$}  SUBJECT",
        "ARRIVED (UTC)", "ID", "FROM"
    )?;
    for (rec, from) in records.iter().zip(&froms) {
        let when = first_arrival(rec).map_or_else(|| "-".to_owned(), |a| display_time(&a.time));
        let id: String = rec.id.chars().take(SHORT_ID).collect();
        let subject = rec
            .subject
            .as_deref()
            .map_or_else(|| "(no subject)".to_owned(), sanitize);
        // Pad by characters, not bytes: `format!` width counts chars too.
        writeln!(
            out,
            "{when:<19}  {id:<SHORT_ID$}  {from:<from_w$}  {subject}"
        )?;
    }
    Ok(())
}

/// `coffer verify` for a terminal.
pub fn write_verify_human(out: &mut dyn Write, r: &VerifyReport) -> io::Result<()> {
    write_pairs(
        out,
        &[
            ("messages checked", r.messages_checked.to_string()),
            ("arrivals checked", r.arrivals_checked.to_string()),
            ("problems", r.problems.len().to_string()),
        ],
    )?;
    for p in &r.problems {
        writeln!(out, "problem: {}", sanitize(p))?;
    }
    if r.problems.is_empty() {
        writeln!(out, "ok")?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ids::ArrivalId;
    use serde_json::Value;

    pub(crate) fn arrival(seq: u64, time: &str) -> Arrival {
        Arrival {
            id: ArrivalId {
                node: "archive-a".into(),
                epoch: "0badf00d".into(),
                seq,
            },
            message: "ab".repeat(32),
            time: time.into(),
            listener: "journal".into(),
            protocol: "smtp".into(),
            client_addr: Some("10.0.0.5:41234".into()),
            helo: Some("mx.example.org".into()),
            mail_from: "bounce@example.org".into(),
            mail_params: vec!["SIZE=1234".into()],
            rcpt_to: vec!["bob@example.net".into(), "carol@example.net".into()],
            queue_id: Some("4Q1x2y3z".into()),
            xcoffer: None,
            trace: Vec::new(),
            via: None,
            tls: None,
            received: None,
        }
    }

    pub(crate) fn record(id: &str, subject: Option<&str>) -> MessageRecord {
        MessageRecord {
            id: id.into(),
            size: 1234,
            date: Some("Fri, 02 Jan 2026 15:04:05 +0100".into()),
            from: vec!["alice@example.org".into()],
            to: vec!["bob@example.net".into()],
            subject: subject.map(Into::into),
            message_id: Some("<m1@example.org>".into()),
            arrivals: vec![
                arrival(7, "2026-01-02T14:04:06Z"),
                arrival(3, "2026-01-02T15:04:05+01:00"),
            ],
        }
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    fn to_json<T: Serialize + ?Sized>(v: &T) -> Value {
        let mut buf = Vec::new();
        write_json(&mut buf, v).unwrap();
        assert!(buf.ends_with(b"}\n") || buf.ends_with(b"]\n"));
        serde_json::from_slice(&buf).unwrap()
    }

    #[test]
    fn status_json_has_exactly_the_interface_fields() {
        let st = StoreStatus {
            node: "archive-a".into(),
            epoch: "0badf00d-0000-4000-8000-000000000000".into(),
            messages: 10,
            arrivals: 12,
            repeats: 1,
            raw_bytes: 2048,
            stored_bytes: 512,
        };
        let v = to_json(&StatusOutput::new(st.clone(), vec![]));
        let mut want = vec![
            "node",
            "epoch",
            "messages",
            "arrivals",
            "repeats",
            "raw_bytes",
            "stored_bytes",
            "connections",
        ];
        want.sort_unstable();
        assert_eq!(keys(&v), want);
        assert_eq!(v["connections"], Value::Array(vec![]));
        assert_eq!(v["node"], "archive-a");
        assert_eq!(v["raw_bytes"], 2048);

        let conn = ConnectionStatus {
            name: "to-b".into(),
            peer: "archive-b".into(),
            state: "up".into(),
            lag_arrivals: 3,
            lag_bytes: 4096,
            oldest_unsent_secs: Some(2),
            parked: 0,
        };
        let v = to_json(&StatusOutput::new(st, vec![conn]));
        let mut want = vec![
            "name",
            "peer",
            "state",
            "lag_arrivals",
            "lag_bytes",
            "oldest_unsent_secs",
            "parked",
        ];
        want.sort_unstable();
        assert_eq!(keys(&v["connections"][0]), want);
    }

    #[test]
    fn search_json_is_an_array_of_records_with_arrivals() {
        let v = to_json(&[record(&"ab".repeat(32), Some("Hello"))][..]);
        let rec = &v.as_array().unwrap()[0];
        for k in [
            "id",
            "size",
            "date",
            "from",
            "to",
            "subject",
            "message_id",
            "arrivals",
        ] {
            assert!(rec.get(k).is_some(), "record lacks {k}");
        }
        let arr = &rec["arrivals"][0];
        for k in [
            "id",
            "time",
            "listener",
            "client_addr",
            "mail_from",
            "rcpt_to",
            "queue_id",
        ] {
            assert!(arr.get(k).is_some(), "arrival lacks {k}");
        }
        assert_eq!(arr["id"], "archive-a/0badf00d/7");
        assert!(arr["rcpt_to"].is_array());
        assert_eq!(to_json(&Vec::<MessageRecord>::new()), Value::Array(vec![]));
    }

    #[test]
    fn verify_json_flattens_the_report_and_adds_ok() {
        let r = VerifyReport {
            messages_checked: 2,
            arrivals_checked: 3,
            problems: vec![],
        };
        let v = to_json(&VerifyOutput {
            ok: true,
            report: &r,
        });
        assert_eq!(
            keys(&v),
            vec!["arrivals_checked", "messages_checked", "ok", "problems"]
        );
        assert_eq!(v["ok"], true);
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(50 << 20), "50.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn status_human_is_aligned() {
        let s = StatusOutput {
            node: "archive-a".into(),
            epoch: "e".into(),
            messages: 10,
            raw_bytes: 2048,
            stored_bytes: 512,
            ..StatusOutput::default()
        };
        let mut buf = Vec::new();
        write_status_human(&mut buf, &s, false).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("node:         archive-a\n"), "{text}");
        assert!(text.contains("raw_bytes:    2048 (2.0 KiB)\n"), "{text}");
        assert!(text.contains("ratio:        0.250\n"), "{text}");
        assert!(text.contains("daemon:       not running\n"), "{text}");
        // Every value starts in the same column.
        let cols: Vec<usize> = text
            .lines()
            .map(|l| {
                l.find(": ").unwrap()
                    + 2
                    + l[l.find(": ").unwrap() + 2..].find(|c| c != ' ').unwrap()
            })
            .collect();
        assert!(cols.windows(2).all(|w| w[0] == w[1]), "{text}");
    }

    #[test]
    fn search_human_lines() {
        let id1 = format!("0123456789ab{}", "c".repeat(52));
        let mut r2 = record(&"f".repeat(64), None);
        r2.from = vec![];
        let mut r3 = record(&"e".repeat(64), Some("evil\x1b[2J\r\nsubject"));
        r3.from = vec![format!("{}@example.org", "x".repeat(40))];
        let recs = vec![record(&id1, Some("Hello wörld")), r2, r3];
        let mut buf = Vec::new();
        write_search_human(&mut buf, &recs).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("ARRIVED (UTC)        ID            FROM"),
            "{text}"
        );
        // Earliest arrival, in UTC; 12-digit id; sender; subject.
        assert!(
            lines[1].starts_with("2026-01-02 14:04:05  0123456789ab  alice@example.org"),
            "{text}"
        );
        assert!(lines[1].ends_with("  Hello wörld"), "{text}");
        // No header From: the envelope sender; no subject: a placeholder.
        assert!(lines[2].contains("<bounce@example.org>"), "{text}");
        assert!(lines[2].ends_with("(no subject)"), "{text}");
        // Long senders are cut; control characters never reach the terminal.
        assert!(lines[3].contains('…'), "{text}");
        assert!(!text.contains('\x1b') && !text.contains('\r'), "{text}");
        // Subjects start in the header's SUBJECT column (counted in characters).
        let col = lines[0].find("SUBJECT").unwrap();
        let subject_at = |l: &str| l.chars().skip(col).collect::<String>();
        assert_eq!(subject_at(lines[1]), "Hello wörld");
        assert_eq!(subject_at(lines[2]), "(no subject)");
        assert!(subject_at(lines[3]).starts_with("evil"), "{text}");

        let mut empty = Vec::new();
        write_search_human(&mut empty, &[]).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn verify_human() {
        let mut buf = Vec::new();
        let r = VerifyReport {
            messages_checked: 2,
            arrivals_checked: 3,
            problems: vec!["message abc: hash mismatch".into()],
        };
        write_verify_human(&mut buf, &r).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("problems:         1\n"), "{text}");
        assert!(
            text.contains("problem: message abc: hash mismatch\n"),
            "{text}"
        );
        assert!(!text.contains("\nok\n"));
    }
}
