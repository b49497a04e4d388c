//! Store-level generator: builds a store of N synthetic but realistic messages through
//! the real ingest path (no SMTP), for scale figures. Used by `bench/store.sh`.
//!
//! ```text
//! cargo run --release -p coffer-archiver --example storegen -- --out DIR --messages N
//!     [--first 0] [--threads 32] [--seed 1] [--report 100000]
//!     [--segment-size BYTES] [--compact] [--block-level 19]
//! ```
//!
//! `--compact` runs the daemon's background compactor beside the ingest (it compacts
//! each segment once sealed, at nice 19, blocks of 4 MiB at `--block-level`): the
//! storage benchmark compares the ingest rate with and without it.
//!
//! Messages: top-level headers like real mail (From, To, Cc, Subject, Date, Message-ID,
//! MIME), a text body of words drawn from a fixed vocabulary, sizes spread from 1 KiB to
//! ~200 KiB (most a few KiB), one in eight with a base64 attachment. Every message is
//! distinct and depends only on its number and the seed, so `--first K` appends new
//! messages to an existing store and a rerun of the same numbers is all repeats. It prints the ingest rate per `--report` messages (is it flat?), then the
//! totals: messages, raw bytes, data folder bytes, seconds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use coffer_archiver::envelope::{Envelope, SessionInfo};
use coffer_archiver::store::{Incoming, Store, StoreOptions};

const WORDS: &[&str] = &[
    "invoice",
    "meeting",
    "quarterly",
    "report",
    "please",
    "find",
    "attached",
    "regards",
    "thanks",
    "schedule",
    "project",
    "update",
    "customer",
    "order",
    "shipment",
    "delay",
    "budget",
    "review",
    "approval",
    "contract",
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "for",
    "on",
    "with",
    "we",
    "you",
    "will",
    "be",
    "this",
    "that",
    "is",
    "are",
    "our",
    "your",
    "team",
    "next",
    "week",
    "monday",
    "friday",
    "call",
    "minutes",
    "draft",
    "final",
    "numbers",
    "forecast",
    "risk",
    "audit",
    "compliance",
    "archive",
    "retention",
    "policy",
];

/// A small deterministic generator (xorshift64*), so runs are repeatable by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn person(rng: &mut Rng) -> String {
    let users = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ];
    let domains = ["example.org", "example.net", "contoso.com", "fabrikam.com"];
    format!(
        "{}{}@{}",
        users[rng.below(users.len() as u64) as usize],
        rng.below(500),
        domains[rng.below(domains.len() as u64) as usize]
    )
}

/// Message `i`: distinct by its Message-ID and a counter line.
fn message(i: u64, rng: &mut Rng) -> (Vec<u8>, String, Vec<String>) {
    let from = person(rng);
    let to: Vec<String> = (0..1 + rng.below(3)).map(|_| person(rng)).collect();
    let cc = person(rng);
    // Most mail is small; a long tail is large.
    let body_len = match rng.below(100) {
        0..=59 => 800 + rng.below(4000),
        60..=89 => 4000 + rng.below(20_000),
        _ => 20_000 + rng.below(180_000),
    } as usize;
    let mut body = String::with_capacity(body_len + 100);
    let mut line = 0;
    while body.len() < body_len {
        body.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
        line += 1;
        body.push_str(if line % 12 == 0 { "\r\n" } else { " " });
    }
    let subject: Vec<&str> = (0..3 + rng.below(5))
        .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
        .collect();
    let mut m = format!(
        "Return-Path: <{from}>\r\nFrom: {from}\r\nTo: {}\r\nCc: {cc}\r\nSubject: {}\r\n\
         Date: Mon, 2 Nov 2026 10:{:02}:{:02} +0000\r\nMessage-ID: <gen.{i}.{}@{}>\r\n\
         MIME-Version: 1.0\r\n",
        to.join(", "),
        subject.join(" "),
        rng.below(60),
        rng.below(60),
        rng.next(),
        from.split('@').nth(1).unwrap_or("example.org"),
    );
    if rng.below(8) == 0 {
        let att_len = 2000 + rng.below(60_000) as usize;
        let raw: Vec<u8> = (0..att_len).map(|_| rng.next() as u8).collect();
        let mut b64 = String::new();
        for chunk in raw.chunks(57) {
            b64.push_str(&base64_line(chunk));
            b64.push_str("\r\n");
        }
        m.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\nmessage {i}\r\n--b{i}\r\n\
             Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
             Content-Disposition: attachment; filename=\"data{i}.bin\"\r\n\r\n{b64}--b{i}--\r\n"
        ));
    } else {
        m.push_str(&format!(
            "Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\nmessage {i}\r\n"
        ));
    }
    (m.into_bytes(), from, to)
}

fn base64_line(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn dir_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(out) = arg(&args, "--out").map(PathBuf::from) else {
        eprintln!(
            "usage: storegen --out DIR --messages N [--first K] [--threads T] [--seed S] \
             [--report R]"
        );
        std::process::exit(2);
    };
    let n: u64 = arg(&args, "--messages")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let first: u64 = arg(&args, "--first")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let threads: u64 = arg(&args, "--threads")
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let seed: u64 = arg(&args, "--seed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let report: u64 = arg(&args, "--report")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);

    let segment_size: u64 = arg(&args, "--segment-size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    let compact = args.iter().any(|a| a == "--compact");
    let block_level: i32 = arg(&args, "--block-level")
        .and_then(|v| v.parse().ok())
        .unwrap_or(19);
    let store = Store::open(StoreOptions {
        data_dir: out.clone(),
        node: "gen".into(),
        segment_size,
        max_pending: 256 << 20,
        min_free_disk: 0,
        compaction: coffer_archiver::store::compact::CompactOptions {
            block_size: 4 << 20,
            level: block_level,
            dictionary: true,
        },
        background_compaction: compact,
    })
    .unwrap_or_else(|e| {
        eprintln!("storegen: opening {}: {e}", out.display());
        std::process::exit(1);
    });
    let next = Arc::new(AtomicU64::new(0));
    let raw = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (h, next, raw, done) = (store.handle(), next.clone(), raw.clone(), done.clone());
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let number = first + i;
                let mut rng = Rng((seed << 32) ^ (number.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1));
                let (bytes, from, to) = message(number, &mut rng);
                let len = bytes.len() as u64;
                let incoming = Incoming {
                    bytes,
                    envelope: Envelope {
                        mail_from: from,
                        mail_params: vec![],
                        rcpt_to: to,
                    },
                    session: SessionInfo {
                        listener: "journal".into(),
                        protocol: "ESMTP".into(),
                        ..SessionInfo::default()
                    },
                };
                loop {
                    match h.ingest_blocking(incoming.clone()) {
                        Ok(_) => break,
                        Err(e) => {
                            eprintln!("storegen: message {i}: {e}; retrying");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
                raw.fetch_add(len, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        // Progress: the rate over each block of `report` messages.
        let mut last = (0u64, Instant::now());
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let d = done.load(Ordering::Relaxed);
            if d >= last.0 + report || d >= n {
                let secs = last.1.elapsed().as_secs_f64();
                #[allow(clippy::cast_precision_loss)]
                let rate = (d - last.0) as f64 / secs.max(1e-9);
                println!("progress messages={d} rate_msg_s={rate:.0}");
                last = (d, Instant::now());
            }
            if d >= n {
                break;
            }
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let compacted = store.handle().compaction_status().segments_compacted;
    store.close();
    let raw = raw.load(Ordering::Relaxed);
    let on_disk = dir_bytes(&out);
    #[allow(clippy::cast_precision_loss)]
    let ratio = on_disk as f64 / raw.max(1) as f64;
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / secs.max(1e-9);
    println!(
        "done messages={n} raw_bytes={raw} data_dir_bytes={on_disk} ratio={ratio:.3} \
         seconds={secs:.1} rate_msg_s={rate:.0} segments_compacted={compacted}"
    );
}
