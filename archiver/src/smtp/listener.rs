//! Accept loops for TCP (`IP:PORT`) and Unix (`unix:PATH`) listeners.
//!
//! Binding is separate from serving so the daemon can bind every listener (and fail
//! early) before it tells systemd it is ready: [`Listener::bind`], then
//! [`Listener::serve`].
//!
//! Per listener: an allow-list on the peer address (TCP only), `max_connections`
//! through a semaphore, accept errors retried with backoff, and a graceful shutdown that
//! returns only when every session of the listener has ended.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::session::{self, SessionConfig};
use super::Sink;
use crate::config::{BindAddr, ListenerConfig};

/// First pause after a failed accept (EMFILE and the like); doubled up to
/// [`ACCEPT_BACKOFF_MAX`] while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A bound listener socket, not yet accepting.
#[derive(Debug)]
pub struct Listener {
    config: Arc<ListenerConfig>,
    socket: Socket,
}

#[derive(Debug)]
enum Socket {
    Tcp(std::net::TcpListener),
    Unix {
        listener: std::os::unix::net::UnixListener,
        path: PathBuf,
        /// Device and inode of the socket file we created: on exit we remove the path
        /// only if it is still this socket.
        id: (u64, u64),
    },
}

/// Binds `config` and serves it until `shutdown` turns true (see [`Listener::serve`]).
///
/// # Errors
/// Binding failed; see [`Listener::bind`].
pub async fn serve(
    config: Arc<ListenerConfig>,
    sink: Arc<dyn Sink>,
    hostname: String,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    Listener::bind(config)?
        .serve(sink, hostname, shutdown)
        .await
}

impl Listener {
    /// Binds the listener's socket. Needs no runtime.
    ///
    /// For `unix:PATH`, a file already at PATH is removed only if it is a socket nobody
    /// listens on; `socket_mode` and `socket_group` are applied after bind.
    ///
    /// # Errors
    /// The address is taken, PATH is something other than a stale socket, or the mode or
    /// group could not be applied. The error names the listener and its address.
    pub fn bind(config: Arc<ListenerConfig>) -> io::Result<Listener> {
        let socket = match &config.bind {
            BindAddr::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|e| context(e, &config.name, &addr.to_string()))?;
                listener.set_nonblocking(true)?;
                Socket::Tcp(listener)
            }
            BindAddr::Unix(path) => bind_unix(&config, path)
                .map_err(|e| context(e, &config.name, &format!("unix:{}", path.display())))?,
        };
        Ok(Listener { config, socket })
    }

    /// The bound TCP address (useful when binding port 0); `None` for Unix sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().ok(),
            Socket::Unix { .. } => None,
        }
    }

    pub fn config(&self) -> &Arc<ListenerConfig> {
        &self.config
    }

    /// Accepts connections and runs a session for each, until `shutdown` turns true (or
    /// its sender is dropped).
    ///
    /// # Termination
    /// On shutdown the listener stops accepting at once; each session then ends as
    /// [`session::serve`] describes (idle ones get 421 now, one in DATA finishes its
    /// message). This returns when every session has ended; a Unix socket file is then
    /// removed if it is still ours.
    ///
    /// # Errors
    /// Registering the socket with the runtime failed. Accept errors are logged and
    /// retried, never returned.
    pub async fn serve(
        self,
        sink: Arc<dyn Sink>,
        hostname: String,
        mut shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        let Listener { config, socket } = self;
        let session_config = Arc::new(SessionConfig::from_listener(&config, &hostname));
        let (accepter, unix_path) = match socket {
            Socket::Tcp(l) => (Accepter::Tcp(tokio::net::TcpListener::from_std(l)?), None),
            Socket::Unix { listener, path, id } => (
                Accepter::Unix(tokio::net::UnixListener::from_std(listener)?),
                Some((path, id)),
            ),
        };
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let mut sessions = JoinSet::new();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        tracing::info!(listener = %config.name, "accepting connections");

        while !*shutdown.borrow() {
            tokio::select! {
                accepted = accepter.accept() => match accepted {
                    Ok(conn) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        admit(conn, &config, &session_config, &slots, &sink, &shutdown,
                            &mut sessions);
                    }
                    Err(e) => {
                        tracing::warn!(listener = %config.name, error = %e,
                            retry_in = ?backoff, "accept failed");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                    log_session_end(&config.name, ended);
                }
            }
        }

        drop(accepter);
        tracing::info!(listener = %config.name, sessions = sessions.len(),
            "stopped accepting; waiting for sessions to end");
        while let Some(ended) = sessions.join_next().await {
            log_session_end(&config.name, ended);
        }
        if let Some((path, id)) = unix_path {
            remove_if_our_socket(&path, id);
        }
        tracing::info!(listener = %config.name, "stopped");
        Ok(())
    }
}

enum Accepter {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

enum Conn {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

impl Accepter {
    async fn accept(&self) -> io::Result<Conn> {
        match self {
            Accepter::Tcp(l) => l.accept().await.map(|(s, a)| Conn::Tcp(s, a)),
            Accepter::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }
}

impl Conn {
    /// Best effort, without waiting: a refusal line into a fresh socket's empty buffer.
    fn refuse(&self, line: &str) {
        let line = format!("{line}\r\n");
        let _ = match self {
            Conn::Tcp(s, _) => s.try_write(line.as_bytes()),
            Conn::Unix(s) => s.try_write(line.as_bytes()),
        };
    }
}

/// Checks the allow-list and the connection limit, then spawns the session.
fn admit(
    conn: Conn,
    config: &ListenerConfig,
    session_config: &Arc<SessionConfig>,
    slots: &Arc<Semaphore>,
    sink: &Arc<dyn Sink>,
    shutdown: &watch::Receiver<bool>,
    sessions: &mut JoinSet<()>,
) {
    let client_addr = match &conn {
        Conn::Tcp(_, peer) => {
            let ip = peer.ip().to_canonical();
            if !allowed(&config.allow, ip) {
                tracing::warn!(listener = %config.name, client = %peer,
                    "connection refused: address not in allow list");
                conn.refuse(&format!("554 5.7.1 {ip} not allowed"));
                return;
            }
            SocketAddr::new(ip, peer.port()).to_string()
        }
        Conn::Unix(_) => "unix".to_owned(),
    };
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        tracing::warn!(listener = %config.name, client = %client_addr,
            max = config.max_connections, "connection refused: too many connections");
        conn.refuse(&format!(
            "421 4.7.0 {} too many connections",
            session_config.hostname
        ));
        return;
    };
    let session_config = session_config.clone();
    let sink = sink.clone();
    let shutdown = shutdown.clone();
    let listener = config.name.clone();
    sessions.spawn(async move {
        let _permit = permit;
        let result = match conn {
            Conn::Tcp(stream, _) => {
                let _ = stream.set_nodelay(true);
                session::serve(stream, session_config, client_addr.clone(), sink, shutdown).await
            }
            Conn::Unix(stream) => {
                session::serve(stream, session_config, client_addr.clone(), sink, shutdown).await
            }
        };
        if let Err(e) = result {
            tracing::info!(listener = %listener, client = %client_addr, error = %e,
                "session ended with an error");
        }
    });
}

fn allowed(allow: &[ipnet::IpNet], ip: IpAddr) -> bool {
    allow.iter().any(|net| net.contains(&ip))
}

fn log_session_end(listener: &str, ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        tracing::error!(listener = %listener, error = %e, "session task failed");
    }
}

fn context(e: io::Error, listener: &str, addr: &str) -> io::Error {
    io::Error::new(e.kind(), format!("listener {listener} ({addr}): {e}"))
}

fn bind_unix(config: &ListenerConfig, path: &Path) -> io::Result<Socket> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; not removing it",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    if let Some(mode) = config.socket_mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    if let Some(group) = config.socket_group.as_deref().filter(|g| !g.is_empty()) {
        let gid = nix::unistd::Group::from_name(group)
            .map_err(io::Error::from)?
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no such group: {group}"))
            })?
            .gid;
        nix::unistd::chown(path, None, Some(gid)).map_err(io::Error::from)?;
    }
    let meta = std::fs::metadata(path)?;
    Ok(Socket::Unix {
        listener,
        path: path.to_owned(),
        id: (meta.dev(), meta.ino()),
    })
}

fn remove_if_our_socket(path: &Path, id: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == id => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove socket");
            }
        }
        Ok(_) => tracing::warn!(path = %path.display(),
            "socket path was replaced by something else; leaving it"),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    use super::*;
    use crate::config::Protocol;
    use crate::smtp::session::tests::{Client, FakeSink};

    fn listener_config(bind: BindAddr) -> ListenerConfig {
        ListenerConfig {
            name: "journal".into(),
            protocol: Protocol::Smtp,
            bind,
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            proxy_protocol: false,
            trusted_proxies: vec![],
            max_message_size: 1000,
            max_recipients: 10,
            max_connections: 4,
            idle_timeout: Duration::from_secs(10),
            trust_xcoffer: false,
            socket_mode: None,
            socket_group: None,
            tls: None,
        }
    }

    fn tcp_config() -> ListenerConfig {
        listener_config(BindAddr::Tcp("127.0.0.1:0".parse().unwrap()))
    }

    struct Running {
        addr: Option<SocketAddr>,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    fn run(config: ListenerConfig) -> Running {
        let listener = Listener::bind(Arc::new(config)).unwrap();
        let addr = listener.local_addr();
        let (shutdown, rx) = watch::channel(false);
        let sink: Arc<dyn Sink> = Arc::new(FakeSink::default());
        let task = tokio::spawn(listener.serve(sink, "mx.test".into(), rx));
        Running {
            addr,
            shutdown,
            task,
        }
    }

    async fn connect(addr: SocketAddr) -> Client<tokio::net::tcp::OwnedReadHalf> {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Client {
            reader: BufReader::new(r),
            writer: Box::new(w),
        }
    }

    async fn read_to_end(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn refuses_addresses_outside_the_allow_list() {
        let mut config = tcp_config();
        config.allow = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let r = run(config);
        let got = read_to_end(r.addr.unwrap()).await;
        assert_eq!(got, "554 5.7.1 127.0.0.1 not allowed\r\n");
        r.shutdown.send(true).unwrap();
        r.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn serves_a_transaction_over_tcp() {
        let r = run(tcp_config());
        let mut c = connect(r.addr.unwrap()).await;
        c.expect("220 mx.test ESMTP Coffer").await;
        c.cmd("EHLO me", "250-").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("hi\r\n.\r\n").await;
        c.expect("250 2.0.0 Ok: test/0badf00d/1 ").await;
        c.cmd("QUIT", "221 ").await;
        r.shutdown.send(true).unwrap();
        r.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn max_connections() {
        let mut config = tcp_config();
        config.max_connections = 1;
        let r = run(config);
        let addr = r.addr.unwrap();
        let mut first = connect(addr).await;
        first.expect("220 ").await;
        assert_eq!(
            read_to_end(addr).await,
            "421 4.7.0 mx.test too many connections\r\n"
        );
        first.cmd("QUIT", "221 ").await;
        // The slot comes back once the first session has ended.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = connect(addr).await;
            if c.reply().await.starts_with("220 ") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        r.shutdown.send(true).unwrap();
        r.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_closes_idle_sessions_and_waits_for_busy_ones() {
        let r = run(tcp_config());
        let addr = r.addr.unwrap();
        let mut idle = connect(addr).await;
        idle.expect("220 ").await;
        let mut busy = connect(addr).await;
        busy.expect("220 ").await;
        busy.cmd("EHLO me", "250-").await;
        busy.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        busy.cmd("RCPT TO:<c@d.test>", "250 ").await;
        busy.cmd("DATA", "354 ").await;
        busy.send("part one\r\n").await;

        r.shutdown.send(true).unwrap();
        idle.expect("421 4.3.2 mx.test shutting down").await;
        assert!(!r.task.is_finished(), "must wait for the session in DATA");
        // No new connections are taken.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match TcpStream::connect(addr).await {
                Err(_) => break,
                Ok(mut s) => {
                    let mut out = String::new();
                    let _ = s.read_to_string(&mut out).await;
                    if out.is_empty() {
                        break;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        busy.send("part two\r\n.\r\n").await;
        busy.expect("250 2.0.0 Ok: ").await;
        busy.expect("421 4.3.2 ").await;
        r.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn unix_socket_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmtp.sock");
        // A stale socket (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let mut config = listener_config(BindAddr::Unix(path.clone()));
        config.socket_mode = Some(0o600);
        config.allow = vec![];
        let r = run(config.clone());
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A live socket is not taken over.
        let err = Listener::bind(Arc::new(config.clone())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");

        let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut rd, &mut line)
            .await
            .unwrap();
        assert!(line.starts_with("220 mx.test ESMTP Coffer"), "{line}");
        wr.write_all(b"QUIT\r\n").await.unwrap();
        r.shutdown.send(true).unwrap();
        r.task.await.unwrap().unwrap();
        assert!(!path.exists(), "socket removed on exit");

        // Something that is not a socket is never removed.
        std::fs::write(&path, b"precious").unwrap();
        let err = Listener::bind(Arc::new(config)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
