//! Bounded memory under slow and greedy clients (docs/reliability.md "Memory bound").
//!
//! 200 clients connect at once and dribble: half a partial command line, half a DATA
//! body, a few bytes at a time for a bounded number of rounds. Meanwhile a normal client
//! still gets its message archived. Then 8 clients send 6 MiB messages at once against a
//! `max_pending` of 8 MiB: what does not fit the budget is answered 451 4.3.2 (and
//! archived on retry), never held. Throughout, cofferd's peak RSS (VmHWM) stays under
//! the bound computed from the configuration:
//!
//! ```text
//! base + 3 x max(max_pending, max_message_size) + max_connections x (per-connection)
//! ```
//!
//! where base is the peak right after start, and per-connection is the fixed session
//! buffers plus `max_recipients` addresses (docs/reliability.md explains each term).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use coffer_e2e::daemon::{free_addr, Daemon, Probe};
use coffer_e2e::{sha256_hex, wait_until};

const SLOW_CLIENTS: usize = 200;
/// Rounds of dribbling, and the pause between two.
const ROUNDS: usize = 20;
const PAUSE: Duration = Duration::from_millis(100);

const MAX_CONNECTIONS: u64 = 256;
const MAX_RECIPIENTS: u64 = 100;
const MAX_PENDING: u64 = 8 << 20;
const MAX_MESSAGE: u64 = 8 << 20;
const BIG: usize = 6 << 20;
const GREEDY_CLIENTS: usize = 8;

/// Per connection: the 64 KiB read buffer, a command line (a partial one is held up to
/// its 4 KiB cap, with its vector's spare capacity: 2 x 4 KiB), 16 KiB of replies, the
/// task, socket and state (8 KiB), and every recipient address (at most 256 bytes,
/// smtp-proto's limit, plus its string: 512 bytes each).
const PER_CONNECTION: u64 = (64 << 10) + (8 << 10) + (16 << 10) + (8 << 10) + MAX_RECIPIENTS * 512;

fn start() -> (Daemon, SocketAddr) {
    let mut picked = free_addr();
    let d = Daemon::launch(|_| {
        picked = free_addr();
        let toml = format!(
            r#"[node]
name = "slow"
data_dir = "data"

[store]
min_free_disk = "0"
max_pending = "{MAX_PENDING}"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "{picked}"
max_connections = {MAX_CONNECTIONS}
max_recipients = {MAX_RECIPIENTS}
max_message_size = "{MAX_MESSAGE}"
idle_timeout = "60s"

[[route]]
from = ["journal"]
"#
        );
        (toml, Probe::Tcp(picked))
    });
    (d, picked)
}

fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        assert!(c.reply().starts_with("220"));
        c
    }

    /// One reply's last line (bounded).
    fn reply(&mut self) -> String {
        for _ in 0..100 {
            let mut line = Vec::new();
            let n = (&mut self.r)
                .take(8192)
                .read_until(b'\n', &mut line)
                .unwrap();
            assert!(n > 0, "connection closed");
            if line.get(3) != Some(&b'-') {
                return String::from_utf8_lossy(&line).into_owned();
            }
        }
        panic!("reply too long")
    }

    fn cmd(&mut self, line: &str, want: &str) -> String {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\r\n").unwrap();
        let r = self.reply();
        assert!(r.starts_with(want), "{line}: want {want}, got {r}");
        r
    }

    fn transaction(&mut self) {
        self.cmd("EHLO slow.test", "250");
        self.cmd("MAIL FROM:<a@example.org>", "250");
        self.cmd("RCPT TO:<b@example.net>", "250");
        self.cmd("DATA", "354");
    }
}

#[test]
fn slow_clients_hold_little_and_others_are_served() {
    let (mut d, addr) = start();
    let base = vm_hwm(d.pid());
    let bound = base + 3 * MAX_PENDING.max(MAX_MESSAGE) + MAX_CONNECTIONS * PER_CONNECTION;

    // --- 200 dribbling clients ------------------------------------------------------
    let ready = Arc::new(Barrier::new(SLOW_CLIENTS + 1));
    let done = Arc::new(Barrier::new(SLOW_CLIENTS + 1));
    let slow: Vec<_> = (0..SLOW_CLIENTS)
        .map(|i| {
            let (ready, done) = (ready.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let in_data = i % 2 == 0;
                if in_data {
                    c.transaction();
                } else {
                    c.cmd("EHLO slow.test", "250");
                    c.w.write_all(b"MAIL FROM:<").unwrap();
                }
                ready.wait();
                for round in 0..ROUNDS {
                    let bytes = if in_data {
                        format!("client {i} line {round}\r\n")
                    } else {
                        "s".repeat(3)
                    };
                    c.w.write_all(bytes.as_bytes()).unwrap();
                    std::thread::sleep(PAUSE);
                }
                done.wait();
                if in_data {
                    c.w.write_all(b".\r\n").unwrap();
                    let r = c.reply();
                    assert!(r.starts_with("250 2.0.0"), "{r}");
                } else {
                    c.cmd("@example.org>", "250 2.1.0");
                }
                c.cmd("QUIT", "221");
            })
        })
        .collect();
    ready.wait();
    // While they dribble, a normal client gets its message archived.
    let normal = b"Subject: served while others dribble\r\n\r\nhello\r\n";
    let mut c = Client::connect(addr);
    c.transaction();
    c.w.write_all(normal).unwrap();
    c.w.write_all(b".\r\n").unwrap();
    let r = c.reply();
    assert!(r.contains(&sha256_hex(normal)), "{r}");
    c.cmd("QUIT", "221");
    let during = vm_hwm(d.pid());
    done.wait();
    for t in slow {
        t.join().expect("a slow client failed");
    }
    assert_eq!(d.counts().1 as usize, 1 + SLOW_CLIENTS / 2);

    // --- greedy clients: more big messages at once than max_pending holds ---------------
    let go = Arc::new(Barrier::new(GREEDY_CLIENTS));
    let greedy: Vec<_> = (0..GREEDY_CLIENTS)
        .map(|i| {
            let go = go.clone();
            std::thread::spawn(move || {
                let mut m = format!("Subject: greedy {i}\r\n\r\n").into_bytes();
                while m.len() < BIG {
                    m.extend_from_slice(
                        format!("{i} ........................................\r\n").as_bytes(),
                    );
                }
                let mut c = Client::connect(addr);
                c.transaction();
                go.wait();
                c.w.write_all(&m).unwrap();
                c.w.write_all(b".\r\n").unwrap();
                let r = c.reply();
                let _ = c.cmd("QUIT", "221");
                (m, r)
            })
        })
        .collect();
    let mut refused = Vec::new();
    for t in greedy {
        let (m, r) = t.join().unwrap();
        if r.starts_with("451 4.3.2") {
            refused.push(m);
        } else {
            assert!(r.contains(&sha256_hex(&m)), "{r}");
        }
    }
    let greedy_peak = vm_hwm(d.pid());
    eprintln!(
        "slow_clients: VmHWM at start {} MiB, with {SLOW_CLIENTS} slow clients {} MiB, after \
         {GREEDY_CLIENTS} x {} MiB at once {} MiB ({} refused with 451); bound {} MiB",
        base >> 20,
        during >> 20,
        BIG >> 20,
        greedy_peak >> 20,
        refused.len(),
        bound >> 20
    );
    // Refused ones are archived on a retry, one at a time.
    for m in &refused {
        let r = wait_until(
            "a refused message to be taken on retry",
            Duration::from_secs(60),
            || {
                let mut c = Client::connect(addr);
                c.transaction();
                c.w.write_all(m).unwrap();
                c.w.write_all(b".\r\n").unwrap();
                let r = c.reply();
                let _ = c.cmd("QUIT", "221");
                r.starts_with("250").then_some(r)
            },
        )
        .unwrap();
        assert!(r.contains(&sha256_hex(m)), "{r}");
    }
    assert_eq!(d.counts().1 as usize, 1 + SLOW_CLIENTS / 2 + GREEDY_CLIENTS);
    let peak = vm_hwm(d.pid());
    assert!(d.is_alive(), "{}", d.log_tail());
    assert!(peak <= bound, "VmHWM {peak} over the bound {bound}");
    d.terminate();
}
