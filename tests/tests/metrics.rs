//! The console (interfaces.md "[console]"): after a known mix of new messages, retries
//! (same bytes and envelope: repeats) and a new envelope for known bytes, `/metrics`
//! counts exactly what was sent and agrees with `coffer status`; `/health` is 200 JSON
//! with status ok.

use std::time::Duration;

use coffer_e2e::daemon::{http_get, metric, smtp_daemon, Launched};
use coffer_e2e::CofferCli;
use coffer_e2e::{archived_form, wait_until, SmtpClient};

const DISTINCT: usize = 12;
const REPEATS: usize = 4;

fn message(i: usize) -> Vec<u8> {
    let mut m =
        format!("Subject: metrics {i}\r\nMessage-ID: <m{i}@metrics.test>\r\n\r\n").into_bytes();
    // Sizes differ so that a wrong byte count cannot pass by accident.
    for l in 0..(i * 7 + 1) {
        m.extend_from_slice(format!("line {l} of message {i}\r\n").as_bytes());
    }
    m
}

#[test]
fn metrics_count_exactly_what_was_sent() {
    let Launched {
        daemon: d,
        smtp,
        console,
    } = smtp_daemon("min_free_disk = \"0\"", "", true);
    let console = console.unwrap();
    let (code, text) = http_get(console, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        metric(
            &text,
            "coffer_received_messages_total{listener=\"journal\"}"
        ),
        Some(0.0),
        "{text}"
    );

    let mut c = SmtpClient::connect(smtp).unwrap();
    c.ehlo("metrics.test").unwrap();
    let to = ["archive@example.net"];
    let mut bytes = 0u64;
    let mut arrivals = Vec::new();
    for i in 0..DISTINCT {
        let m = message(i);
        let acc = c.send("m@example.org", &to, &m).unwrap();
        bytes += archived_form(&m).len() as u64;
        arrivals.push(acc.arrival_id);
    }
    // Retries after a "lost" 250: same bytes, same envelope, same arrival id.
    for (i, first) in arrivals.iter().enumerate().take(REPEATS) {
        let acc = c.send("m@example.org", &to, &message(i)).unwrap();
        assert_eq!(&acc.arrival_id, first, "a repeat names the first arrival");
    }
    // Known bytes under a new envelope: a new arrival of an existing message.
    let m = message(DISTINCT - 1);
    let acc = c.send("other@example.org", &to, &m).unwrap();
    assert_ne!(acc.arrival_id, arrivals[DISTINCT - 1]);
    bytes += archived_form(&m).len() as u64;
    c.quit().unwrap();

    let new_arrivals = DISTINCT as u64 + 1;
    // Store totals are published when the index commits, a moment after the 250s.
    let text = wait_until("store totals in /metrics", Duration::from_secs(20), || {
        let (_, text) = http_get(console, "/metrics").ok()?;
        (metric(&text, "coffer_store_arrivals") == Some(new_arrivals as f64)).then_some(text)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", http_get(console, "/metrics").unwrap().1));

    let want = [
        (
            "coffer_received_messages_total{listener=\"journal\"}",
            new_arrivals,
        ),
        ("coffer_received_bytes_total{listener=\"journal\"}", bytes),
        ("coffer_repeats_total{listener=\"journal\"}", REPEATS as u64),
        ("coffer_store_repeats_total", REPEATS as u64),
        ("coffer_store_messages", DISTINCT as u64),
        ("coffer_store_arrivals", new_arrivals),
        ("coffer_pending_bytes", 0),
        ("coffer_store_failed", 0),
        ("coffer_low_disk", 0),
        ("coffer_ingest_seconds_count", new_arrivals + REPEATS as u64),
    ];
    for (series, v) in want {
        assert_eq!(metric(&text, series), Some(v as f64), "{series} in\n{text}");
    }
    for reason in ["max_pending", "disk_full", "store_failed", "shutting_down"] {
        let series = format!("coffer_refusals_total{{listener=\"journal\",reason=\"{reason}\"}}");
        assert_eq!(metric(&text, &series), Some(0.0), "{series}");
    }
    assert!(
        text.contains("# TYPE coffer_commit_seconds histogram"),
        "{text}"
    );

    // The CLI agrees.
    let status = d.status();
    assert_eq!(
        status["messages"].as_u64(),
        Some(DISTINCT as u64),
        "{status}"
    );
    assert_eq!(status["arrivals"].as_u64(), Some(new_arrivals), "{status}");
    assert_eq!(status["repeats"].as_u64(), Some(REPEATS as u64), "{status}");

    let (code, body) = http_get(console, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("/health is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["node"], "e2e", "{health}");
    assert_eq!(health["epoch"], status["epoch"], "{health}");
    assert_eq!(health["pending_bytes"], 0, "{health}");

    let (code, _) = http_get(console, "/nope").unwrap();
    assert_eq!(code, 404);
}
