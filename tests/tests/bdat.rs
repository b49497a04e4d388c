//! CHUNKING/BDAT and BINARYMIME (interfaces.md "CHUNKING (BDAT) and BINARYMIME"), from a
//! raw client over TCP: chunks at odd sizes are concatenated exactly, binary bytes
//! included; a client that closes inside a chunk, or never sends `LAST`, leaves nothing
//! stored; a message over `max_message_size` gets 552 and nothing is stored, and the
//! refused chunk's bytes are never read as commands.

use std::net::SocketAddr;

use coffer_e2e::daemon::{smtp_daemon, Launched};
use coffer_e2e::wire::Wire;
use coffer_e2e::CofferCli;
use coffer_e2e::{sha256_hex, Accepted};

fn session(addr: SocketAddr) -> Wire {
    let mut c = Wire::tcp(addr).unwrap().expect_220().unwrap();
    let ehlo = c.expect("EHLO bdat.test", 250).unwrap();
    for ext in ["CHUNKING", "BINARYMIME"] {
        assert!(ehlo.lines.iter().any(|l| l == ext), "{ext} missing: {ehlo}");
    }
    c
}

/// `len` bytes cycling through every byte value, with the nasty ones up front.
fn binary(len: usize, seed: u8) -> Vec<u8> {
    let nasty: &[u8] = b"\0\r\n.\n\r.\r\n.\r\n\x00\xff\rX";
    let mut v: Vec<u8> = nasty
        .iter()
        .copied()
        .cycle()
        .take(len.min(nasty.len()))
        .collect();
    v.extend((v.len()..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

/// Sends one small message with BDAT and returns its id (a known-good transaction).
fn send_small(c: &mut Wire, subject: &str) -> String {
    c.expect("MAIL FROM:<ok@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let msg = format!("Subject: {subject}\r\n\r\nfine\r\n");
    let acc = Accepted::parse(c.bdat(msg.as_bytes(), true).unwrap()).unwrap();
    assert_eq!(acc.message_id, sha256_hex(msg.as_bytes()));
    acc.message_id
}

#[test]
fn odd_chunks_are_concatenated_byte_for_byte() {
    let Launched {
        daemon: d, smtp, ..
    } = smtp_daemon("min_free_disk = \"0\"", "", false);
    let mut c = session(smtp);
    c.expect("MAIL FROM:<bin@example.org> BODY=BINARYMIME", 250)
        .unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    // BINARYMIME content must not go through DATA; the transaction stays open.
    let r = c.cmd("DATA").unwrap();
    assert_eq!(r.code, 503, "{r}");

    let sizes = [1usize, 7, 4099];
    let chunks: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| binary(n, i as u8))
        .collect();
    let mut all = Vec::new();
    for ch in &chunks {
        let r = c.bdat(ch, false).unwrap();
        assert_eq!(r.code, 250, "{r}");
        assert_eq!(r.text(), format!("2.0.0 Ok: {} octets received", ch.len()));
        all.extend_from_slice(ch);
    }
    let acc = Accepted::parse(c.bdat(b"", true).unwrap()).unwrap();
    assert_eq!(all.len(), 1 + 7 + 4099);
    assert_eq!(acc.message_id, sha256_hex(&all));

    // A second transaction in the same session: a chunk made of SMTP-looking lines and a
    // DATA terminator is content, not commands.
    c.expect("MAIL FROM:<bin@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let tricky = b"Subject: x\r\n\r\n.\r\nQUIT\r\nRSET\r\nMAIL FROM:<evil@x>\r\n\n.\n\r\n";
    let acc2 = Accepted::parse(c.bdat(tricky, true).unwrap()).unwrap();
    assert_eq!(acc2.message_id, sha256_hex(tricky));
    c.quit().unwrap();

    let got = d.get(&acc.message_id);
    assert_eq!(got.len(), all.len());
    assert!(
        got == all,
        "archived bytes differ from the concatenated chunks"
    );
    assert_eq!(d.get(&acc2.message_id), tricky.to_vec());
    let arrivals = d.arrivals(&acc.message_id);
    assert_eq!(arrivals.len(), 1);
    let params = arrivals[0]["mail_params"].to_string();
    assert!(params.contains("BODY=BINARYMIME"), "mail_params: {params}");
    assert_eq!(d.counts(), (2, 2));
    let v = d.coffer(&["verify"]);
    assert_eq!(v.code, Some(0), "verify:\n{v}");
}

#[test]
fn client_closing_inside_a_chunk_stores_nothing() {
    let Launched {
        daemon: d, smtp, ..
    } = smtp_daemon("min_free_disk = \"0\"", "", false);
    let mut c = session(smtp);
    send_small(&mut c, "before");
    c.quit().unwrap();
    assert_eq!(d.counts(), (1, 1));

    // A lying size: 1000 declared, 500 sent, then the client closes.
    let mut c = session(smtp);
    c.expect("MAIL FROM:<liar@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let mut raw = b"BDAT 1000 LAST\r\nSubject: cut short\r\n\r\n".to_vec();
    raw.resize(16 + 500, b'z');
    c.send_raw(&raw).unwrap();
    c.shutdown_write().unwrap();
    let tail = c.read_to_eof(); // the server closes when it sees EOF
    assert!(
        !String::from_utf8_lossy(&tail).contains("250 2.0.0 Ok:"),
        "a cut chunk was acknowledged: {tail:?}"
    );

    // Whole non-LAST chunks, then the client goes away without LAST.
    let mut c = session(smtp);
    c.expect("MAIL FROM:<quitter@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let r = c
        .bdat(b"Subject: never finished\r\n\r\npart one\r\n", false)
        .unwrap();
    assert_eq!(r.code, 250, "{r}");
    c.shutdown_write().unwrap();
    let _ = c.read_to_eof();

    // The store is sequential: a message sent afterwards is the only one added.
    let mut c = session(smtp);
    send_small(&mut c, "after");
    c.quit().unwrap();
    assert_eq!(d.counts(), (2, 2), "{}", d.log_tail());
    let mut found = Vec::new();
    for s in ["cut short", "never finished"] {
        let out = d.coffer_ok(&["search", "--subject", s, "--json"]);
        found.extend(out.json().as_array().unwrap().clone());
    }
    assert!(found.is_empty(), "partial messages were stored: {found:?}");
}

#[test]
fn bdat_over_max_message_size_gets_552_and_nothing_is_stored() {
    let Launched {
        daemon: d, smtp, ..
    } = smtp_daemon(
        "min_free_disk = \"0\"",
        "max_message_size = \"4KiB\"",
        false,
    );
    let mut c = session(smtp);
    let size_line = c.cmd("EHLO again.test").unwrap();
    assert!(
        size_line.lines.iter().any(|l| l == "SIZE 4096"),
        "{size_line}"
    );

    // Over the limit across chunks: the chunk that passes it gets 552 and ends the
    // transaction; a following chunk gets 503.
    c.expect("MAIL FROM:<big@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    assert_eq!(c.bdat(&vec![b'a'; 3000], false).unwrap().code, 250);
    // The refused chunk carries command-like lines: they must be read as content.
    let mut over = b"\r\nQUIT\r\nMAIL FROM:<x@y>\r\n".to_vec();
    over.resize(2000, b'b');
    let r = c.bdat(&over, false).unwrap();
    assert_eq!(r.code, 552, "{r}");
    assert!(r.text().starts_with("5.3.4"), "{r}");
    let r = c.bdat(b"more", true).unwrap();
    assert_eq!(r.code, 503, "{r}");

    // Over the limit in one LAST chunk.
    c.expect("MAIL FROM:<big@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let mut one = b"Subject: too big\r\n\r\nRSET\r\n".to_vec();
    one.resize(4097, b'c');
    let r = c.bdat(&one, true).unwrap();
    assert_eq!(r.code, 552, "{r}");

    // Exactly at the limit is fine.
    c.expect("NOOP", 250).unwrap();
    c.expect("MAIL FROM:<fits@example.org>", 250).unwrap();
    c.expect("RCPT TO:<archive@example.net>", 250).unwrap();
    let mut fits = b"Subject: fits\r\n\r\n".to_vec();
    fits.resize(4096, b'd');
    let acc = Accepted::parse(c.bdat(&fits, true).unwrap()).unwrap();
    c.quit().unwrap();
    assert_eq!(acc.message_id, sha256_hex(&fits));
    assert_eq!(
        d.counts(),
        (1, 1),
        "only the message at the limit is stored"
    );
}
