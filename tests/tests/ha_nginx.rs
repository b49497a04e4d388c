//! nginx spraying SMTP over a replicating pair, with the shipped example
//! `packaging/nginx/coffer-smtp.conf` (its addresses replaced by the test's):
//! `stream`, `proxy_protocol on`, passive health checks (`max_fails`/`fail_timeout`).
//!
//! A (127.0.0.2) and B (127.0.0.3) replicate to each other. Clients connect from
//! 127.0.0.5 to nginx on 127.0.0.1, one message per connection; nginx leaves from
//! 127.0.0.4, the nodes' only trusted proxy. A is killed with SIGKILL in the middle of
//! the run and restarted. A client whose session broke, or that got no 250, sends the
//! message again (a bounded number of times); only 250s count. Afterwards both nodes
//! hold the same arrival set, each arrival once, including every arrival a client got
//! a 250 for, and every arrival records the real client (the PROXY header), not nginx.
//!
//! Without nginx and its stream module the test skips, unless `CI` is set.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_e2e::ha::{converge, start_pair, CONVERGE};
use coffer_e2e::{free_port, require_tool, wait_until, CofferCli, SmtpClient};

const CLIENT: &str = "127.0.0.5";
const NGINX_OUT: &str = "127.0.0.4";
const CLIENTS: usize = 4;
const PER_CLIENT: usize = 40;
/// Attempts per message before a client gives up on it.
const TRIES: usize = 30;

/// Kills nginx by its PID when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shipped example with the test's addresses; every replaced text must be there
/// exactly once, so a change of the example's shape fails here, not silently.
fn render_example(listen: &str, a: SocketAddr, b: SocketAddr) -> String {
    let path = coffer_e2e::workspace_root().join("packaging/nginx/coffer-smtp.conf");
    let mut text = std::fs::read_to_string(&path).expect("the shipped nginx example");
    for (from, to) in [
        ("listen 10.0.0.10:25;", format!("listen {listen};")),
        ("proxy_bind 10.0.0.10;", format!("proxy_bind {NGINX_OUT};")),
        ("server 10.0.0.11:25 ", format!("server {a} ")),
        ("server 10.0.0.12:25 ", format!("server {b} ")),
    ] {
        assert_eq!(
            text.matches(from).count(),
            1,
            "{from:?} in {}",
            path.display()
        );
        text = text.replace(from, &to);
    }
    text
}

/// The `load_module` line nginx needs for `stream`, or `None` (said why) to skip.
///
/// # Panics
/// There is no stream module and `CI` is set.
fn stream_module(nginx: &Path) -> Option<String> {
    let version = Command::new(nginx).arg("-V").output().expect("nginx -V");
    let flags = String::from_utf8_lossy(&version.stderr).into_owned();
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if flags.contains("--with-stream ") || flags.ends_with("--with-stream") {
        return Some(String::new());
    }
    if flags.contains("--with-stream=dynamic") && module.exists() {
        return Some(format!("load_module {};\n", module.display()));
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !ci,
        "CI is set but nginx has no stream module (libnginx-mod-stream)"
    );
    eprintln!("SKIPPED: nginx has no stream module (install libnginx-mod-stream)");
    None
}

/// A connection from `source` to `dest`, blocking.
fn connect_from(
    rt: &tokio::runtime::Runtime,
    source: &str,
    dest: SocketAddr,
) -> std::io::Result<TcpStream> {
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source.parse::<IpAddr>().expect("ip"), 0))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(dest))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let std = stream.into_std()?;
        std.set_nonblocking(false)?;
        Ok(std)
    })
}

fn message(client: usize, i: usize) -> Vec<u8> {
    format!(
        "From: c{client}@example.org\r\nTo: archive@example.net\r\nSubject: lb {client}-{i}\r\n\
         Message-ID: <lb-{client}-{i}@example.org>\r\n\r\nThrough nginx, {client}-{i}.\r\n"
    )
    .into_bytes()
}

/// One attempt: a fresh connection through nginx, one message. The 250's arrival id
/// and the client's own address.
fn send_once(
    rt: &tokio::runtime::Runtime,
    lb: SocketAddr,
    bytes: &[u8],
) -> anyhow::Result<(String, String)> {
    let stream = connect_from(rt, CLIENT, lb)?;
    let local = stream.local_addr()?.to_string();
    let mut c = SmtpClient::over(stream)?;
    c.ehlo("client.example")?;
    let acc = c.send("sender@example.org", &["archive@example.net"], bytes)?;
    let _ = c.quit();
    Ok((acc.arrival_id, local))
}

#[test]
fn nginx_sprays_over_a_pair_and_a_killed_node_loses_nothing() {
    let Some(nginx) = require_tool("nginx", "nginx-light") else {
        return;
    };
    let Some(load) = stream_module(&nginx) else {
        return;
    };
    let (mut a, b) = start_pair(|_| {
        format!(
            "allow = [\"127.0.0.1/32\", \"{CLIENT}/32\"]\nproxy_protocol = true\n\
             trusted_proxies = [\"{NGINX_OUT}/32\"]\n"
        )
    });

    let dir = tempfile::tempdir().unwrap();
    let port = free_port("127.0.0.1");
    let lb: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        dir.path().join("coffer-smtp.conf"),
        render_example(&lb.to_string(), a.addr, b.addr),
    )
    .unwrap();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "{load}daemon off;\nmaster_process off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             include {d}/coffer-smtp.conf;\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("nginx.out")).unwrap();
    let _nginx = Running(
        Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let nginx_log = || {
        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            + &std::fs::read_to_string(dir.path().join("nginx.out")).unwrap_or_default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    wait_until("nginx to pass a session through", CONVERGE, || {
        let s = connect_from(&rt, CLIENT, lb).ok()?;
        SmtpClient::over(s).ok().map(|c| {
            let _ = c.quit();
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", nginx_log()));

    // Clients, each message in its own connection; 250s are counted.
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let failed_attempts = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (acked, count, failed) = (acked.clone(), count.clone(), failed_attempts.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                for i in 0..PER_CLIENT {
                    let bytes = message(k, i);
                    let mut last = None;
                    for _ in 0..TRIES {
                        match send_once(&rt, lb, &bytes) {
                            Ok(got) => {
                                acked.lock().unwrap().push(got);
                                count.fetch_add(1, Ordering::SeqCst);
                                last = None;
                                break;
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                last = Some(e);
                                // An MTA would wait minutes; the pause only keeps this
                                // bounded loop from spinning while a node is down.
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                    }
                    if let Some(e) = last {
                        panic!("client {k}, message {i}: no 250 in {TRIES} attempts: {e:#}");
                    }
                }
            })
        })
        .collect();

    let total = CLIENTS * PER_CLIENT;
    let reached = |n: usize| {
        wait_until(&format!("{n} messages accepted"), CONVERGE, || {
            (count.load(Ordering::SeqCst) >= n).then_some(())
        })
    };
    reached(total / 4).unwrap_or_else(|e| panic!("{e}\n{}", nginx_log()));
    a.kill9();
    reached(total / 2).unwrap_or_else(|e| panic!("{e}\n{}", nginx_log()));
    a.restart();
    for c in clients {
        c.join().expect("a client failed");
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), total);
    eprintln!(
        "{total} messages accepted; {} attempts failed and were retried",
        failed_attempts.load(Ordering::SeqCst)
    );

    // Both nodes: the same arrivals, each once, every acknowledged one among them.
    let acked_ids: BTreeSet<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let ids = converge(&[&a, &b], |ids| ids.is_superset(&acked_ids));
    assert!(
        ids.iter().any(|i| i.starts_with("a/")) && ids.iter().any(|i| i.starts_with("b/")),
        "nginx used both nodes: {ids:?}"
    );

    // The real client everywhere: the origin records it as the session's client, a
    // replica inside the XCOFFER facts its origin sent.
    let by_id: std::collections::BTreeMap<&str, &str> = acked
        .iter()
        .map(|(id, local)| (id.as_str(), local.as_str()))
        .collect();
    for node in [&a, &b] {
        for rec in node.search(&[]) {
            for arr in rec["arrivals"].as_array().unwrap() {
                let client = if arr["via"].is_null() {
                    &arr["client_addr"]
                } else {
                    &arr["xcoffer"]["client_addr"]
                };
                let client = client.as_str().unwrap_or_default();
                assert!(client.starts_with(&format!("{CLIENT}:")), "{arr}");
                if let Some(local) = by_id.get(arr["id"].as_str().unwrap()) {
                    assert_eq!(client, *local, "{arr}");
                }
            }
        }
    }
}
