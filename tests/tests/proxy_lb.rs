//! Real load balancers in front of a `proxy_protocol` listener: nginx (`stream`,
//! `proxy_protocol on`: PROXY v1) and haproxy (`send-proxy-v2`: PROXY v2).
//!
//! Each runs from a private config in a temporary folder, in the foreground, on
//! loopback ports, and is killed by PID at the end. Addresses: the client connects from
//! 127.0.0.2 (allowed) or 127.0.0.4 (not allowed), the balancer connects to us from
//! 127.0.0.3 (the only trusted proxy, and not itself allowed): a greeting proves the
//! header was honoured, and the arrival must record 127.0.0.2 with the client's port.
//!
//! Without nginx (and its stream module) or haproxy installed, a test prints why and
//! passes, unless `CI` is set: then it fails.

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use coffer_archiver::config::{BindAddr, ListenerConfig, Protocol};
use coffer_archiver::ids::{ArrivalId, MessageId};
use coffer_archiver::smtp::{Listener, Sink};
use coffer_archiver::store::{Incoming, IngestError, Receipt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

const CLIENT: &str = "127.0.0.2";
const PROXY: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.4";

#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Incoming>>,
}

impl Sink for Recorder {
    fn node(&self) -> &str {
        "e2e"
    }

    fn epoch(&self) -> &str {
        "00000000-0000-0000-0000-000000000000"
    }

    fn ingest(
        &self,
        msg: Incoming,
    ) -> Pin<Box<dyn Future<Output = Result<Receipt, IngestError>> + Send + '_>> {
        Box::pin(async move {
            let message_id = MessageId::of(&msg.bytes);
            let mut got = self.got.lock().unwrap();
            got.push(msg);
            Ok(Receipt {
                message_id,
                arrival_id: ArrivalId {
                    node: "e2e".into(),
                    epoch: "00000000".into(),
                    seq: got.len() as u64,
                },
                repeat: false,
            })
        })
    }
}

/// The program at `path`, or why the test cannot run: `None` means skip (and was said).
fn required(path: &str, what: &str) -> Option<PathBuf> {
    let p = PathBuf::from(path);
    if p.exists() {
        return Some(p);
    }
    let why = format!("{what} not installed ({path} missing)");
    assert!(std::env::var_os("CI").is_none(), "CI is set but {why}");
    eprintln!("skipping: {why}");
    None
}

/// A free loopback port (bound and released: a small race we accept in tests).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the balancer by its PID when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Running {
    let log = std::fs::File::create(log).unwrap();
    Running(
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

struct Archive {
    upstream: SocketAddr,
    sink: Arc<Recorder>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

fn archive() -> Archive {
    let config = ListenerConfig {
        name: "journal".into(),
        protocol: Protocol::Smtp,
        bind: BindAddr::Tcp("127.0.0.1:0".parse().unwrap()),
        allow: vec![format!("{CLIENT}/32").parse().unwrap()],
        proxy_protocol: true,
        trusted_proxies: vec![format!("{PROXY}/32").parse().unwrap()],
        max_message_size: 1 << 20,
        max_recipients: 10,
        max_connections: 16,
        idle_timeout: Duration::from_secs(30),
        trust_xcoffer: false,
        socket_mode: None,
        socket_group: None,
        tls: None,
    };
    let listener = Listener::bind(Arc::new(config)).unwrap();
    let upstream = listener.local_addr().unwrap();
    let sink = Arc::new(Recorder::default());
    let (stop, rx) = watch::channel(false);
    let dyn_sink: Arc<dyn Sink> = sink.clone();
    let task = tokio::spawn(listener.serve(dyn_sink, "mx.test".into(), rx));
    Archive {
        upstream,
        sink,
        stop,
        task,
    }
}

struct Client {
    local: SocketAddr,
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    /// One reply (all its lines); empty at EOF.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut line))
                .await
                .expect("reply in time")
                .unwrap();
            all.push_str(&line);
            if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn cmd(&mut self, line: &str, want: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let got = self.reply().await;
        assert!(got.starts_with(want), "{line}: want {want:?}, got {got:?}");
    }
}

/// Connects from `from` to the balancer at `port`, and reads the first reply. Retries
/// while the balancer is not yet listening, or not yet reaching us (up to 20 s).
async fn connect(from: &str, port: u16, log: &Path) -> (Client, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        if let Ok(stream) = socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
        {
            let local = stream.local_addr().unwrap();
            let (r, w) = stream.into_split();
            let mut c = Client {
                local,
                reader: BufReader::new(r),
                writer: w,
            };
            let first = c.reply().await;
            if !first.is_empty() {
                return (c, first);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the balancer never answered; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Through the balancer on `port`: an allowed client is served and recorded with its
/// own address; another is refused with 554 naming its address.
async fn check_through(archive: Archive, port: u16, log: &Path) {
    let (mut c, greeting) = connect(CLIENT, port, log).await;
    assert!(
        greeting.starts_with("220 mx.test ESMTP Coffer"),
        "{greeting:?}"
    );
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
    c.cmd("RCPT TO:<c@d.test>", "250 ").await;
    c.cmd("DATA", "354 ").await;
    c.cmd("Subject: via a balancer\r\n\r\nhi\r\n.", "250 2.0.0 Ok: ")
        .await;
    c.cmd("QUIT", "221 ").await;
    {
        let got = archive.sink.got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].session.client_addr.as_deref(),
            Some(c.local.to_string().as_str()),
            "the arrival records the real client"
        );
    }

    let (mut s, first) = connect(STRANGER, port, log).await;
    assert_eq!(first, format!("554 5.7.1 {STRANGER} not allowed\r\n"));
    assert_eq!(s.reply().await, "");

    archive.stop.send(true).unwrap();
    archive.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn nginx_sends_proxy_v1() {
    let Some(nginx) = required("/usr/sbin/nginx", "nginx") else {
        return;
    };
    let version = Command::new(&nginx).arg("-V").output().unwrap();
    let flags = String::from_utf8_lossy(&version.stderr).into_owned();
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    let load = if flags.contains("--with-stream=dynamic") {
        let Some(_) = required(&module.display().to_string(), "nginx's stream module") else {
            return;
        };
        format!("load_module {};\n", module.display())
    } else if flags.contains("--with-stream ") || flags.ends_with("--with-stream") {
        String::new()
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but nginx has no stream module"
        );
        eprintln!("skipping: nginx built without the stream module");
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    let archive = archive();
    let port = free_port();
    let conf = dir.path().join("nginx.conf");
    let mut f = std::fs::File::create(&conf).unwrap();
    write!(
        f,
        "{load}daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\n\
         error_log {dir}/error.log info;\nevents {{ worker_connections 64; }}\n\
         stream {{\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass {up};\n\
         proxy_protocol on;\n    proxy_bind {PROXY};\n  }}\n}}\n",
        dir = dir.path().display(),
        up = archive.upstream,
    )
    .unwrap();
    drop(f);
    let log = dir.path().join("nginx.out");
    let _nginx = spawn(
        Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf),
        &log,
    );
    check_through(archive, port, &dir.path().join("error.log")).await;
}

#[tokio::test]
async fn haproxy_sends_proxy_v2() {
    let Some(haproxy) = required("/usr/sbin/haproxy", "haproxy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let archive = archive();
    let port = free_port();
    let conf = dir.path().join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  log stderr format raw local0 info\n\
             defaults\n  mode tcp\n  log global\n  timeout connect 5s\n\
             timeout client 30s\n  timeout server 30s\n\
             frontend journal\n  bind 127.0.0.1:{port}\n  default_backend archive\n\
             backend archive\n  source {PROXY}\n  server a {up} send-proxy-v2\n",
            up = archive.upstream,
        ),
    )
    .unwrap();
    let log = dir.path().join("haproxy.out");
    let _haproxy = spawn(Command::new(&haproxy).arg("-db").arg("-f").arg(&conf), &log);
    check_through(archive, port, &log).await;
}
