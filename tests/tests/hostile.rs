//! Hostile input gets a clear answer (design.md §2.7, docs/reliability.md "Hostile
//! input"): a catalogue of what a broken or malicious client can send, each case sent to
//! the real `cofferd` over TCP, with the replies it must get and the messages it must
//! leave archived.
//!
//! Each case is a name, the bytes sent (after the greeting, in one pipelined stream
//! written by a thread while the replies are read, so a big input never deadlocks), the
//! reply codes expected in order (with the enhanced status code where it matters), how
//! the connection ends, and the exact bytes every 250 to DATA/BDAT must name. The 250
//! names the SHA-256 of what was stored, so a matching id is a byte-exact archive; the
//! counts in `coffer status`, a few `coffer get`s and `coffer search` confirm it from the
//! store afterwards. Inputs are generated in memory and streamed.
//!
//! The codec-level versions of many cases are unit tests in archiver/src/smtp/codec.rs
//! and session.rs; this file is the contract test against the binary. XCOFFER on
//! untrusted listeners in depth: tests/tests/xcoffer.rs; PROXY from real load balancers:
//! tests/tests/proxy_lb.rs (here: PROXY headers where they must not be honoured).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use coffer_e2e::daemon::{free_addr, Daemon, Probe};
use coffer_e2e::{sha256_hex, CofferCli};

const MAX_REPLY_LINE: u64 = 8192;
const MAX_REPLY_LINES: usize = 200;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// `journal`'s size limit; `small`'s is 64 KiB.
const MAX_MESSAGE: usize = 12 << 20;
const SMALL_MAX: usize = 64 << 10;
const MAX_PENDING: u64 = 32 << 20;

struct Setup {
    d: Daemon,
    journal: SocketAddr,
    lb: SocketAddr,
    small: SocketAddr,
}

fn start() -> Setup {
    let mut picked = (free_addr(), free_addr(), free_addr());
    let d = Daemon::launch(|_| {
        picked = (free_addr(), free_addr(), free_addr());
        let (journal, lb, small) = picked;
        let toml = format!(
            r#"[node]
name = "hostile"
data_dir = "data"

[store]
min_free_disk = "0"
max_pending = "{MAX_PENDING}"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "{journal}"
max_message_size = "{MAX_MESSAGE}"
max_connections = 16

[[listener]]
name = "lb"
protocol = "smtp"
bind = "{lb}"
proxy_protocol = true
trusted_proxies = ["127.0.0.3/32"]
allow = ["127.0.0.0/8"]
max_connections = 16

[[listener]]
name = "small"
protocol = "smtp"
bind = "{small}"
max_message_size = "{SMALL_MAX}"
max_connections = 16

[[route]]
from = ["journal", "lb", "small"]
"#
        );
        (toml, Probe::Tcp(journal))
    });
    Setup {
        d,
        journal: picked.0,
        lb: picked.1,
        small: picked.2,
    }
}

/// One reply: its code and its lines' text.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> &str {
        self.lines.last().map_or("", String::as_str)
    }
}

/// Reads one reply; `None` at EOF or on a reset before any byte of it.
fn read_reply(r: &mut impl BufRead) -> Option<Reply> {
    let mut lines = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let mut raw = Vec::new();
        match r.take(MAX_REPLY_LINE).read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) if lines.is_empty() && raw.is_empty() => return None,
            Ok(_) if raw.ends_with(b"\n") => {}
            other => panic!("bad reply line {raw:?}: {other:?}"),
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let code: u16 = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad reply line {line:?}"));
        lines.push(line.get(4..).unwrap_or("").to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Some(Reply { code, lines });
        }
    }
    panic!("reply longer than {MAX_REPLY_LINES} lines")
}

/// How a case's connection ends once its replies are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Still open: QUIT gets 221.
    Open,
    /// The server closed it (after its last reply).
    Closed,
    /// We half-close; the server must close without another reply.
    HalfClose,
}

struct Case {
    name: &'static str,
    /// Where to connect, and from which address.
    to: SocketAddr,
    from: &'static str,
    /// The server greets with 220 (false: it must close without a word).
    greeted: bool,
    /// Sent after the greeting (EHLO included where the case wants it).
    input: Vec<u8>,
    /// Expected replies, in order: "250", "500 5.5.6", ...
    replies: Vec<String>,
    end: End,
    /// The messages the 250s to DATA/BDAT name, in order: exactly these bytes.
    archived: Vec<Vec<u8>>,
}

const EHLO: &str = "EHLO hostile.test\r\n";

fn r(codes: &[&str]) -> Vec<String> {
    codes.iter().map(|c| (*c).to_owned()).collect()
}

fn n_times(code: &str, n: usize) -> Vec<String> {
    vec![code.to_owned(); n]
}

/// EHLO, MAIL, RCPT, DATA, `content` and the terminator: `content` must be what the
/// server stores (no dot-stuffing needed: callers avoid a dot after CRLF, or mean it).
fn data_session(content: &[u8]) -> Vec<u8> {
    let mut v = format!("{EHLO}MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .into_bytes();
    v.extend_from_slice(content);
    v.extend_from_slice(b".\r\n");
    v
}

/// The replies to [`data_session`].
fn data_replies() -> Vec<String> {
    r(&["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"])
}

/// A message with a subject, whose body is `body`, ending in CRLF.
fn message(subject: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!("From: x@example.org\r\nSubject: {subject}\r\n\r\n").into_bytes();
    m.extend_from_slice(body);
    m.extend_from_slice(b"\r\n");
    m
}

fn smuggling(name: &'static str, to: SocketAddr, fake: &[u8]) -> Case {
    // A fake end of data, then a whole second transaction: all of it is content.
    let mut body = b"before".to_vec();
    body.extend_from_slice(fake);
    body.extend_from_slice(
        b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n",
    );
    let content = message(name, &body);
    Case {
        name,
        to,
        from: "127.0.0.1",
        greeted: true,
        input: data_session(&content),
        replies: data_replies(),
        end: End::Open,
        archived: vec![content],
    }
}

/// Nested multipart, `depth` levels, each with its own boundary.
fn deep_multipart(depth: usize) -> Vec<u8> {
    let mut m = b"From: x@example.org\r\nSubject: deep nesting bomb\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n"
        .to_vec();
    for i in 1..depth {
        m.extend_from_slice(
            format!(
                "--b{}\r\nContent-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n",
                i - 1
            )
            .as_bytes(),
        );
    }
    m.extend_from_slice(
        format!(
            "--b{}\r\nContent-Type: text/plain\r\n\r\nleaf\r\n",
            depth - 1
        )
        .as_bytes(),
    );
    for i in (0..depth).rev() {
        m.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
    }
    m
}

fn many_headers(n: usize) -> Vec<u8> {
    let mut m = b"From: x@example.org\r\nSubject: header flood bomb\r\n".to_vec();
    for i in 0..n {
        m.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    m.extend_from_slice(b"\r\nbody\r\n");
    m
}

fn huge_encoded_subject(bytes: usize) -> Vec<u8> {
    let mut m = b"From: x@example.org\r\nSubject: =?utf-8?b?".to_vec();
    let chunk = b"w6nDqcOpw6nDqcOpw6nDqcOp"; // "éééééééééééé" in base64
    while m.len() < bytes {
        m.extend_from_slice(chunk);
    }
    m.extend_from_slice(b"?=\r\n\r\nbody\r\n");
    m
}

/// One header line of `bytes` bytes with no CRLF inside, then a body.
fn huge_header_line(bytes: usize) -> Vec<u8> {
    let mut m = b"Subject: long line bomb\r\nX-Long: ".to_vec();
    m.resize(bytes, b'q');
    m.extend_from_slice(b"\r\n\r\nbody\r\n");
    m
}

fn cases(s: &Setup) -> Vec<Case> {
    let j = s.journal;
    let case = |name, input: Vec<u8>, replies: Vec<String>, end, archived| Case {
        name,
        to: j,
        from: "127.0.0.1",
        greeted: true,
        input,
        replies,
        end,
        archived,
    };
    let mut v = vec![
        // --- smuggling: only CRLF.CRLF ends DATA; one message holds everything ---------
        smuggling("smuggle bare LF dot LF", j, b"\n.\n"),
        smuggling("smuggle bare CR dot CR", j, b"\r.\r"),
        smuggling("smuggle LF dot CRLF", j, b"\n.\r\n"),
        smuggling("smuggle CR dot LF", j, b"\r.\n"),
        smuggling("smuggle CR dot CRLF", j, b"\r.\r\n"),
    ];
    {
        // CRLF dot LF: the dot after CRLF is stuffing and goes; the LF stays.
        let wire = b"Subject: crlf dot lf\r\n\r\nbefore\r\n.\nMAIL FROM:<evil@example.org>\r\n";
        let stored =
            b"Subject: crlf dot lf\r\n\r\nbefore\r\n\nMAIL FROM:<evil@example.org>\r\n".to_vec();
        v.push(case(
            "smuggle CRLF dot LF",
            data_session(wire),
            data_replies(),
            End::Open,
            vec![stored],
        ));
    }

    // --- long command lines: 500 5.5.6, the session goes on -------------------------------
    let line = |len: usize| {
        let mut l = b"NOOP ".to_vec();
        l.resize(len - 2, b'x');
        l.extend_from_slice(b"\r\n");
        l
    };
    v.push(case(
        "command line of 1,001 bytes (under the 4 KiB cap)",
        [EHLO.as_bytes(), &line(1001)].concat(),
        r(&["250", "250 2.0.0"]),
        End::Open,
        vec![],
    ));
    v.push(case(
        "command line of 4,096 bytes (the cap) and 4,097",
        [EHLO.as_bytes(), &line(4096), &line(4097), b"NOOP\r\n"].concat(),
        r(&["250", "250 2.0.0", "500 5.5.6", "250 2.0.0"]),
        End::Open,
        vec![],
    ));
    v.push(case(
        "command line of 1 MiB, then more commands",
        [EHLO.as_bytes(), &line(1 << 20), b"NOOP\r\n"].concat(),
        r(&["250", "500 5.5.6", "250 2.0.0"]),
        End::Open,
        vec![],
    ));
    {
        let mut no_lf = b"MAIL FROM:<".to_vec();
        no_lf.resize(2 << 20, b'a');
        v.push(case(
            "2 MiB without a line end, then the client closes",
            [EHLO.as_bytes(), &no_lf].concat(),
            r(&["250"]),
            End::HalfClose,
            vec![],
        ));
    }

    // --- content: long lines, NUL, 8-bit stored as they came ---------------------------
    {
        let mut body = vec![b'L'; (1 << 20) + 10];
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&vec![b'M'; 3 << 20]);
        let m = message("body line over 1 MiB", &body);
        v.push(case(
            "body lines of 1 MiB and 3 MiB",
            data_session(&m),
            data_replies(),
            End::Open,
            vec![m],
        ));
    }
    {
        let m = message("nul in body", b"a\0b\0\0\xff\xfe\r\n\0\r\nend");
        v.push(case(
            "NUL and 8-bit bytes in the body",
            data_session(&m),
            data_replies(),
            End::Open,
            vec![m],
        ));
    }

    // --- NUL and invalid UTF-8 in commands ------------------------------------------
    v.push(case(
        "NUL bytes in commands",
        [
            EHLO.as_bytes(),
            b"NOOP\0\r\n",
            b"\0\0\0\r\n",
            b"HELO a\0b\r\n",
            b"MAIL FROM:<a\0@example.org>\r\n",
            b"MAIL FROM:<a@example.org>\r\n",
            b"RCPT TO:<b@exa\0mple.net>\r\n",
            b"RSET\r\n",
        ]
        .concat(),
        r(&[
            "250",
            "500 5.5.1",
            "500 5.5.1",
            "501 5.5.2",
            "501 5.5.2",
            "250 2.1.0",
            "501 5.5.2",
            "250 2.0.0",
        ]),
        End::Open,
        vec![],
    ));
    {
        let utf8 = message("utf-8 envelope", b"x");
        let mut input = [
            EHLO.as_bytes(),
            b"MAIL FROM:<a\xff@example.org>\r\n",
            b"MAIL FROM:<a\xff@example.org> SMTPUTF8\r\n",
            b"MAIL FROM:<\xc3@example.org> SMTPUTF8\r\n",
            b"EHLO h\xe9llo\r\n",
            "MAIL FROM:<j\u{f6}rg@example.org>\r\n".as_bytes(),
            b"RCPT TO:<b\xff@example.net>\r\n",
            "RCPT TO:<m\u{fc}ller@example.net>\r\n".as_bytes(),
            b"RSET\r\n",
            "MAIL FROM:<j\u{f6}rg@example.org> SMTPUTF8\r\n".as_bytes(),
            "RCPT TO:<\u{e9}t\u{e9}@example.net>\r\n".as_bytes(),
            b"DATA\r\n",
        ]
        .concat();
        input.extend_from_slice(&utf8);
        input.extend_from_slice(b".\r\n");
        v.push(case(
            "invalid UTF-8 in MAIL/RCPT/EHLO: 501; valid UTF-8 with or without SMTPUTF8: kept",
            input,
            r(&[
                "250",
                "501 5.5.2",
                "501 5.5.2",
                "501 5.5.2",
                "501 5.5.2",
                "250 2.1.0",
                "501 5.5.2",
                "250 2.1.5",
                "250 2.0.0",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                "250 2.0.0",
            ]),
            End::Open,
            vec![utf8],
        ));
    }

    // --- 10,000 recipients: 1,000 accepted (the default), the rest 452 ------------------
    {
        let m = message("ten thousand recipients", b"x");
        let mut input = format!("{EHLO}MAIL FROM:<a@example.org>\r\n").into_bytes();
        for i in 0..10_000 {
            input.extend_from_slice(format!("RCPT TO:<r{i}@example.net>\r\n").as_bytes());
        }
        input.extend_from_slice(b"DATA\r\n");
        input.extend_from_slice(&m);
        input.extend_from_slice(b".\r\n");
        let mut replies = r(&["250", "250 2.1.0"]);
        replies.extend(n_times("250 2.1.5", 1000));
        replies.extend(n_times("452 4.5.3", 9000));
        replies.extend(r(&["354", "250 2.0.0"]));
        v.push(case(
            "10,000 recipients",
            input,
            replies,
            End::Open,
            vec![m],
        ));
    }

    // --- BDAT sizes that lie ------------------------------------------------------------
    {
        let mut input = format!(
            "{EHLO}MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 100000 LAST\r\n"
        )
        .into_bytes();
        input.extend_from_slice(&[b'z'; 500]);
        v.push(case(
            "BDAT declares more than is sent, then the client closes",
            input,
            r(&["250", "250 2.1.0", "250 2.1.5"]),
            End::HalfClose,
            vec![],
        ));
    }
    v.push(case(
        "BDAT declares less than is sent: the rest is read as commands",
        [
            EHLO.as_bytes(),
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
            b"BDAT 5 LAST\r\nhelloRCPT TO:<smuggled@example.net>\r\nmore content\r\n",
        ]
        .concat(),
        r(&[
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "503 5.5.1",
            "500 5.5.1",
        ]),
        End::Open,
        vec![b"hello".to_vec()],
    ));

    // --- pipelined floods ---------------------------------------------------------------
    {
        let mut input = EHLO.as_bytes().to_vec();
        let mut replies = r(&["250"]);
        for i in 0..3000 {
            let (cmd, code) = match i % 3 {
                0 => ("NOOP\r\n", "250 2.0.0"),
                1 => ("HELP\r\n", "214 2.0.0"),
                _ => ("VRFY x\r\n", "252 2.5.0"),
            };
            input.extend_from_slice(cmd.as_bytes());
            replies.push(code.to_owned());
        }
        v.push(case(
            "3,000 pipelined commands in one write, answered in order",
            input,
            replies,
            End::Open,
            vec![],
        ));
    }
    {
        let mut input = EHLO.as_bytes().to_vec();
        // Few enough to arrive in one read: the server closes with nothing unread, so
        // its close cannot turn into a reset that would swallow the 421.
        for _ in 0..25 {
            input.extend_from_slice(b"JUNK\r\n");
        }
        let mut replies = r(&["250"]);
        replies.extend(n_times("500 5.5.1", 20));
        replies.push("421 4.7.0".into());
        v.push(case(
            "25 bad commands in one write: 20 answers, then 421 and close",
            input,
            replies,
            End::Closed,
            vec![],
        ));
    }

    // --- sequence -------------------------------------------------------------------------
    v.push(case(
        "commands before EHLO/HELO",
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nBDAT 3 LAST\r\nabcNOOP\r\n"
            .to_vec(),
        r(&["503 5.5.1", "503 5.5.1", "503 5.5.1", "503 5.5.1", "250 2.0.0"]),
        End::Open,
        vec![],
    ));
    v.push(case(
        "XCOFFER on an untrusted listener (more in xcoffer.rs)",
        format!("{EHLO}MAIL FROM:<a@example.org> XCOFFER=e30\r\nRCPT TO:<b@example.net>\r\n")
            .into_bytes(),
        r(&["250", "555 5.5.4", "503 5.5.1"]),
        End::Open,
        vec![],
    ));

    // --- PROXY headers where they are not honoured --------------------------------------
    let proxied = message("proxy header ignored", b"x");
    v.push(Case {
        name: "PROXY v1 on a listener without proxy_protocol: an unknown command",
        input: [
            b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 25\r\n".as_slice(),
            &data_session(&proxied),
        ]
        .concat(),
        replies: [r(&["500 5.5.1"]), data_replies()].concat(),
        archived: vec![proxied.clone()],
        ..case("", vec![], vec![], End::Open, vec![])
    });
    v.push(case(
        "PROXY v2 on a listener without proxy_protocol: its QUIT ends the session",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc6\x33\x64\x09\x7f\x00\x00\x01\x9c\x40\x00\x19"
            .to_vec(),
        r(&["500 5.5.1", "500 5.5.1", "500 5.5.1", "221"]),
        End::Closed,
        vec![],
    ));
    let untrusted = message("proxy header from an untrusted peer", b"x");
    v.push(Case {
        name: "PROXY v1 from a peer not in trusted_proxies: an unknown command",
        to: s.lb,
        input: [
            b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 25\r\n".as_slice(),
            &data_session(&untrusted),
        ]
        .concat(),
        replies: [r(&["500 5.5.1"]), data_replies()].concat(),
        archived: vec![untrusted],
        ..case("", vec![], vec![], End::Open, vec![])
    });
    v.push(Case {
        name: "a trusted proxy sending garbage instead of a header: closed ungreeted",
        to: s.lb,
        from: "127.0.0.3",
        greeted: false,
        input: b"EHLO not-a-proxy-header\r\n".to_vec(),
        replies: vec![],
        end: End::Closed,
        ..case("", vec![], vec![], End::Open, vec![])
    });

    // --- size limits: 552 -----------------------------------------------------------------
    v.push(Case {
        name: "SIZE= over the limit",
        to: s.small,
        input: format!(
            "{EHLO}MAIL FROM:<a@example.org> SIZE={}\r\nMAIL FROM:<a@example.org> SIZE={SMALL_MAX}\r\n",
            SMALL_MAX + 1
        )
        .into_bytes(),
        replies: r(&["250", "552 5.3.4", "250 2.1.0"]),
        ..case("", vec![], vec![], End::Open, vec![])
    });
    {
        let mut input = data_session(&message("too big", &vec![b'x'; SMALL_MAX + 10]));
        input.extend_from_slice(b"NOOP\r\n");
        input.extend_from_slice(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
        input.extend_from_slice(format!("BDAT {} LAST\r\n", SMALL_MAX + 1).as_bytes());
        input.extend_from_slice(&vec![b'y'; SMALL_MAX + 1]);
        input.extend_from_slice(b"NOOP\r\n");
        let mut replies = r(&[
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "552 5.3.4",
            "250 2.0.0",
        ]);
        replies.extend(r(&["250 2.1.0", "250 2.1.5", "552 5.3.4", "250 2.0.0"]));
        v.push(Case {
            name: "message over the limit by its bytes, in DATA and in BDAT",
            to: s.small,
            input,
            replies,
            ..case("", vec![], vec![], End::Open, vec![])
        });
    }

    // --- MIME bombs for the indexer: archived byte-exact ---------------------------------
    for (name, m) in [
        ("multipart nested 10,000 levels", deep_multipart(10_000)),
        ("100,000 header lines", many_headers(100_000)),
        ("5 MB encoded-word Subject", huge_encoded_subject(5_000_000)),
        (
            "10 MB header line without CRLF",
            huge_header_line(10_000_000),
        ),
    ] {
        v.push(case(
            name,
            data_session(&m),
            data_replies(),
            End::Open,
            vec![m],
        ));
    }
    v
}

fn connect(from: &str, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
            .unwrap();
        let stream = tokio::time::timeout(Duration::from_secs(10), s.connect(to))
            .await
            .expect("connect in time")
            .expect("connect");
        stream.into_std().unwrap()
    });
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Runs one case; returns the message ids the 250s to DATA/BDAT named.
fn run(c: Case) -> Vec<String> {
    let started = Instant::now();
    let stream = connect(c.from, c.to);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    if c.greeted {
        let g = read_reply(&mut reader).unwrap_or_else(|| panic!("{}: no greeting", c.name));
        assert_eq!(g.code, 220, "{}: greeting {g:?}", c.name);
    }
    let mut writer = stream.try_clone().unwrap();
    let (input, half_close) = (c.input, c.end == End::HalfClose);
    // The server may answer (or close) before it has read everything: write on a thread.
    let sender = std::thread::spawn(move || {
        for chunk in input.chunks(64 << 10) {
            if writer.write_all(chunk).is_err() {
                return;
            }
        }
        if half_close {
            let _ = writer.shutdown(Shutdown::Write);
        }
    });
    let mut ids = Vec::new();
    for (i, want) in c.replies.iter().enumerate() {
        let got = read_reply(&mut reader)
            .unwrap_or_else(|| panic!("{}: connection closed before reply {i} ({want})", c.name));
        let text = format!("{} {}", got.code, got.text());
        assert!(
            text.starts_with(want.as_str()),
            "{}: reply {i}: want {want:?}, got {text:?}",
            c.name
        );
        if got.code == 250 {
            if let Some((_, rest)) = got.text().split_once("Ok: ") {
                if let Some(id) = rest.split_whitespace().nth(1) {
                    ids.push(id.to_owned());
                }
            }
        }
    }
    match c.end {
        End::Open => {
            writer_join(sender, c.name);
            let mut w = stream.try_clone().unwrap();
            w.write_all(b"QUIT\r\n").unwrap();
            let q =
                read_reply(&mut reader).unwrap_or_else(|| panic!("{}: no reply to QUIT", c.name));
            assert_eq!(q.code, 221, "{}: QUIT: {q:?}", c.name);
            assert!(
                read_reply(&mut reader).is_none(),
                "{}: open after QUIT",
                c.name
            );
        }
        End::Closed | End::HalfClose => {
            let extra = read_reply(&mut reader);
            assert!(extra.is_none(), "{}: unexpected reply {extra:?}", c.name);
            writer_join(sender, c.name);
        }
    }
    let want: Vec<String> = c.archived.iter().map(|m| sha256_hex(m)).collect();
    assert_eq!(
        ids, want,
        "{}: the 250s name other bytes than expected",
        c.name
    );
    eprintln!("hostile: {:<75} ok in {:?}", c.name, started.elapsed());
    ids
}

fn writer_join(t: std::thread::JoinHandle<()>, name: &str) {
    t.join()
        .unwrap_or_else(|_| panic!("{name}: the writer thread failed"));
}

/// `VmHWM` (peak resident set) of a process, in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

#[test]
fn hostile_input_catalogue() {
    let started = Instant::now();
    let mut s = start();
    let base = vm_hwm(s.d.pid());
    let mut stored = Vec::new();
    let mut expected_bytes = std::collections::BTreeMap::new();
    for c in cases(&s) {
        for m in &c.archived {
            expected_bytes.insert(sha256_hex(m), m.len());
        }
        stored.extend(run(c));
    }
    // Every 250 was one message, and nothing else got in: not the smuggled halves, not
    // the lying BDAT, not the refused ones.
    let (messages, arrivals) = s.d.counts();
    assert_eq!(
        messages as usize,
        expected_bytes.len(),
        "messages in the store"
    );
    assert_eq!(arrivals as usize, stored.len(), "arrivals in the store");
    // Byte-exact from the store, for the bombs and the long lines.
    for id in &stored {
        let len = expected_bytes[id];
        if len > 1 << 20 {
            let got = s.d.get(id);
            assert_eq!(got.len(), len, "{id}");
            assert_eq!(sha256_hex(&got), *id, "{id}");
        }
    }
    // The UTF-8 envelope is kept as sent; the 10,000-recipient arrival has 1,000.
    let utf8 = s.d.search(&["--subject", "utf-8 envelope"]);
    assert_eq!(utf8.len(), 1, "{utf8:?}");
    let a = &utf8[0]["arrivals"][0];
    assert_eq!(a["mail_from"], "j\u{f6}rg@example.org", "{a}");
    assert_eq!(a["rcpt_to"][0], "\u{e9}t\u{e9}@example.net", "{a}");
    let many = s.d.search(&["--subject", "ten thousand recipients"]);
    assert_eq!(
        many[0]["arrivals"][0]["rcpt_to"].as_array().unwrap().len(),
        1000
    );
    // The PROXY headers were not honoured: the arrivals record the real peer.
    for subject in [
        "proxy header ignored",
        "proxy header from an untrusted peer",
    ] {
        let found = s.d.search(&["--subject", subject]);
        let addr = found[0]["arrivals"][0]["client_addr"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(addr.starts_with("127.0.0.1:"), "{subject}: {addr}");
    }
    // Search still works after the bombs, and finds them.
    for subject in [
        "deep nesting bomb",
        "header flood bomb",
        "long line bomb",
        "smuggle CR dot LF",
    ] {
        let found = s.d.search(&["--subject", subject]);
        assert_eq!(found.len(), 1, "search --subject {subject:?}: {found:?}");
    }
    let v = s.d.coffer(&["verify"]);
    assert_eq!(v.code, Some(0), "verify:\n{v}");
    // No panic, and memory stayed bounded (docs/reliability.md "Memory bound").
    assert!(s.d.is_alive(), "cofferd died\n{}", s.d.log_tail());
    let log = s.d.log_text();
    assert!(!log.contains("panicked"), "{}", s.d.log_tail());
    let peak = vm_hwm(s.d.pid());
    let bound = base + 3 * MAX_PENDING.max(MAX_MESSAGE as u64) + (64 << 20);
    eprintln!(
        "hostile: cofferd VmHWM {} MiB (at start {} MiB, bound {} MiB); {:?} in all",
        peak >> 20,
        base >> 20,
        bound >> 20,
        started.elapsed()
    );
    assert!(peak <= bound, "VmHWM {peak} over {bound}");
    s.d.terminate();
}
