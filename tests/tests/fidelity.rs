//! Byte fidelity (design.md §2.4): every message of the fixture corpus
//! (`tests/fixtures/eml/{rfc,malformed,smuggling}`), in its CRLF form and in its LF form,
//! plus a generated 3 MiB message, is sent over SMTP; the 250 names the SHA-256 of the
//! bytes as archived, and `coffer get` returns exactly those bytes.
//!
//! "As archived" is what DATA carries after dot-unstuffing, up to and including the CRLF
//! before the final dot: the file itself, plus a CRLF when it does not end with one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use coffer_e2e::CofferCli;
use coffer_e2e::{archived_form, fixtures_dir, sha256_hex, Node};

fn corpus() -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
        assert!(depth < 4, "fixture tree too deep at {}", dir.display());
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out, depth + 1);
            } else if p.extension().is_some_and(|e| e == "eml") {
                out.push(p);
            }
        }
    }
    let root = fixtures_dir().join("eml");
    let mut files = Vec::new();
    walk(&root, &mut files, 0);
    assert!(
        files.len() >= 10,
        "fixture corpus missing under {}",
        root.display()
    );

    let mut out = Vec::new();
    for f in files {
        let name = f.strip_prefix(&root).unwrap().display().to_string();
        let bytes = std::fs::read(&f).unwrap();
        let lf = lf_form(&bytes);
        if lf != bytes {
            out.push((format!("{name} (LF form)"), lf));
        }
        out.push((name, bytes));
    }
    out.push(("generated 3 MiB message".into(), big_message(3 << 20)));
    out
}

/// Every CRLF turned into a bare LF.
fn lf_form(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// A deterministic message of about `size` bytes whose body has 76-character lines,
/// some starting with a dot.
fn big_message(size: usize) -> Vec<u8> {
    let mut m =
        b"From: big@example.org\r\nTo: archive@example.net\r\nSubject: big\r\n\r\n".to_vec();
    let mut n: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut line = 0u32;
    while m.len() < size {
        line += 1;
        if line.is_multiple_of(97) {
            m.push(b'.');
        }
        for _ in 0..76 {
            n ^= n << 13;
            n ^= n >> 7;
            n ^= n << 17;
            m.push(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(n % 64) as usize],
            );
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

#[test]
fn corpus_round_trips_byte_for_byte() {
    let node = Node::start();
    let mut failures = String::new();
    let mut sent = Vec::new();
    // One session for the whole corpus: consecutive transactions must not bleed into
    // each other either.
    let mut smtp = node.smtp();
    for (name, bytes) in corpus() {
        let expect = archived_form(&bytes);
        match smtp.send("fixtures@example.org", &["archive@example.net"], &bytes) {
            Ok(acc) => {
                if acc.message_id != sha256_hex(&expect) {
                    let _ = writeln!(
                        failures,
                        "{name}: 250 names {} but the sent bytes hash to {}",
                        acc.message_id,
                        sha256_hex(&expect)
                    );
                }
                sent.push((name, expect, acc.message_id));
            }
            Err(e) => {
                let _ = writeln!(failures, "{name}: not accepted: {e:#}");
                smtp = node.smtp();
            }
        }
    }
    let _ = smtp.quit();

    for (name, expect, id) in &sent {
        let out = node.coffer(&["get", id]);
        if out.code != Some(0) {
            let _ = writeln!(failures, "{name}: coffer get {id} failed: {out}");
            continue;
        }
        let got = &out.stdout;
        if sha256_hex(got) != *id {
            let _ = writeln!(
                failures,
                "{name}: coffer get {id} returned bytes hashing to {}",
                sha256_hex(got)
            );
        }
        if got != expect {
            let at = got
                .iter()
                .zip(expect.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(expect.len()));
            let _ = writeln!(
                failures,
                "{name}: coffer get returned {} bytes, sent {}; first difference at byte {at}",
                got.len(),
                expect.len()
            );
        }
    }

    // Every accepted fixture is its own message: no two were merged or split.
    let status = node.status();
    let distinct: std::collections::BTreeSet<&String> = sent.iter().map(|s| &s.2).collect();
    if status["messages"].as_u64() != Some(distinct.len() as u64) {
        let _ = writeln!(
            failures,
            "status counts {} messages, expected {}",
            status["messages"],
            distinct.len()
        );
    }
    assert!(
        failures.is_empty(),
        "fidelity failures:\n{failures}\n{}",
        node.log_tail()
    );
}

#[test]
fn lf_form_helper() {
    assert_eq!(lf_form(b"a\r\nb\rc\n\r\n"), b"a\nb\rc\n\n");
}
