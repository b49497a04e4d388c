//! Accept loops for TCP (`IP:PORT`) and Unix (`unix:PATH`) listeners.
//!
//! Binding is separate from serving so the daemon can bind every listener (and fail
//! early) before it tells systemd it is ready: [`Listener::bind`], then
//! [`Listener::serve`].
//!
//! Per listener: an allow-list on the client address (TCP only), `max_connections`,
//! the PROXY protocol from trusted proxies, accept errors retried with backoff, and a
//! graceful shutdown that returns only when every session of the listener has ended.
//!
//! # Live settings
//! A running listener reads its settings from a `watch` channel: [`Listener::reloader`]
//! gives a [`Reloader`] that replaces them (on SIGHUP). Connections accepted afterwards
//! use the new `allow`, `trusted_proxies`, `proxy_protocol`, `max_connections` and
//! session limits; sessions already running keep the settings they started with. A
//! lower `max_connections` refuses new connections until enough sessions have ended; no
//! running session is cut. `name`, `bind` and `protocol` cannot change (the socket is
//! bound once).
//!
//! # TLS
//! A TCP listener with `tls` offers STARTTLS ([`session`]). Its certificate, key and
//! client CA are read when it is bound ([`Listener::bind`] fails on a bad file) and again
//! on every [`Reloader::apply`], so new handshakes use the files as they are then. A file
//! that cannot be used on reload is logged, and the listener keeps the TLS settings and
//! files it had (the other settings still change).
//!
//! # PROXY protocol
//! On a TCP listener with `proxy_protocol = true`, a connection whose peer is in
//! `trusted_proxies` must start with a PROXY v1 or v2 header ([`super::proxy`]) within
//! [`PROXY_HEADER_TIMEOUT`], before we greet. The client the header names is the one the
//! allow-list is checked against and the arrival records; the proxy's address is logged.
//! v1 `UNKNOWN` and v2 `LOCAL` (a load balancer's health check) leave the proxy itself as
//! the client. A missing, malformed or unsupported header closes the connection without
//! a greeting. Bytes that follow the header in the same read (a client talking before
//! the greeting) are not lost: the session reads them first, after its greeting.
//!
//! A peer not in `trusted_proxies` is a direct client, even on a `proxy_protocol`
//! listener: the allow-list applies to it, and a PROXY header it sends is just an
//! unknown command. Listeners without `proxy_protocol` never parse PROXY headers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::proxy::{self, Parsed, ProxyHeader};
use super::session::{self, SessionConfig};
use super::{ConnRefusal, Sink};
use crate::config::{BindAddr, ListenerConfig};

/// First pause after a failed accept (EMFILE and the like); doubled up to
/// [`ACCEPT_BACKOFF_MAX`] while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long a trusted proxy has, from accept, to send its whole PROXY header. Load
/// balancers send it at once; a connection without one is closed, ungreeted.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound listener socket, not yet accepting.
#[derive(Debug)]
pub struct Listener {
    settings: Arc<watch::Sender<Arc<Settings>>>,
    socket: Socket,
}

/// What new connections of a listener get: its configuration and, for `tls`, the
/// configuration loaded from its files.
#[derive(Debug)]
struct Settings {
    config: Arc<ListenerConfig>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Settings {
    /// Reads the TLS files of `config` (TCP listeners only).
    fn load(config: Arc<ListenerConfig>) -> Result<Settings, crate::tls::TlsFileError> {
        let tls = match (&config.tls, &config.bind) {
            (Some(t), BindAddr::Tcp(_)) => Some(crate::tls::server_config(t)?),
            _ => None,
        };
        Ok(Settings { config, tls })
    }
}

/// Replaces the settings of a bound or running [`Listener`] for the connections it
/// accepts from then on. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reloader {
    settings: Arc<watch::Sender<Arc<Settings>>>,
}

/// A new configuration for a listener changes what only a restart can change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("listener `{listener}`: {what} changed; takes effect after a restart")]
pub struct ReloadError {
    pub listener: String,
    /// `name`, `bind` or `protocol`.
    pub what: &'static str,
}

impl Reloader {
    /// The settings new connections get now.
    pub fn current(&self) -> Arc<ListenerConfig> {
        self.settings.borrow().config.clone()
    }

    /// Makes `config` the settings for connections accepted from now on, and returns the
    /// ones it replaces. Sessions already running keep theirs. The TLS files `config`
    /// names are read again (new handshakes use them); if one cannot be used, that is
    /// logged and the previous `tls` settings and files stay.
    ///
    /// # Errors
    /// `config` differs in `name`, `bind` or `protocol`: nothing is changed.
    pub fn apply(&self, config: Arc<ListenerConfig>) -> Result<Arc<ListenerConfig>, ReloadError> {
        let previous = self.settings.borrow().clone();
        let old = previous.config.clone();
        let what = if config.name != old.name {
            Some("name")
        } else if config.bind != old.bind {
            Some("bind")
        } else if config.protocol != old.protocol {
            Some("protocol")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(ReloadError {
                listener: old.name.clone(),
                what,
            });
        }
        let settings = match Settings::load(config.clone()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(listener = %config.name, error = %e,
                    "reload: TLS not reloaded; new connections keep the previous TLS settings and files");
                let mut keep = (*config).clone();
                keep.tls.clone_from(&old.tls);
                Settings {
                    config: Arc::new(keep),
                    tls: previous.tls.clone(),
                }
            }
        };
        Ok(self
            .settings
            .send_replace(Arc::new(settings))
            .config
            .clone())
    }
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
    /// group could not be applied. The error names the listener and its address. Or a TLS
    /// file cannot be used: the error names the listener, the key and the file.
    pub fn bind(config: Arc<ListenerConfig>) -> io::Result<Listener> {
        let settings = Settings::load(config.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("listener {}: {e}", config.name),
            )
        })?;
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
        let (settings, _) = watch::channel(Arc::new(settings));
        Ok(Listener {
            settings: Arc::new(settings),
            socket,
        })
    }

    /// The bound TCP address (useful when binding port 0); `None` for Unix sockets.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.socket {
            Socket::Tcp(l) => l.local_addr().ok(),
            Socket::Unix { .. } => None,
        }
    }

    /// The current settings.
    pub fn config(&self) -> Arc<ListenerConfig> {
        self.settings.borrow().config.clone()
    }

    /// A handle that changes the settings, before or while the listener serves.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            settings: self.settings.clone(),
        }
    }

    /// Accepts connections and runs a session for each, until `shutdown` turns true (or
    /// its sender is dropped). Settings changed through a [`Reloader`] apply to the
    /// connections accepted afterwards.
    ///
    /// # Termination
    /// On shutdown the listener stops accepting at once; each session then ends as
    /// [`session::serve`] describes (idle ones get 421 now, one in DATA finishes its
    /// message; one still waiting for its PROXY header is closed). This returns when
    /// every session has ended; a Unix socket file is then removed if it is still ours.
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
        let Listener { settings, socket } = self;
        // `settings` lives as long as this loop, so `updates` never reports a closed
        // channel while we serve.
        let mut updates = settings.subscribe();
        let (mut config, mut session_config) = reload(&mut updates, &hostname);
        let name = config.name.clone();
        let (accepter, unix_path) = match socket {
            Socket::Tcp(l) => (Accepter::Tcp(tokio::net::TcpListener::from_std(l)?), None),
            Socket::Unix { listener, path, id } => (
                Accepter::Unix(tokio::net::UnixListener::from_std(listener)?),
                Some((path, id)),
            ),
        };
        let shared = Shared {
            sink,
            shutdown: shutdown.clone(),
            active: Arc::new(AtomicUsize::new(0)),
        };
        let mut sessions = JoinSet::new();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        tracing::info!(listener = %name, "accepting connections");

        while !*shutdown.borrow() {
            tokio::select! {
                accepted = accepter.accept() => match accepted {
                    Ok(conn) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        // Settings changed before this connection came take effect
                        // for it, whichever branch the select picked first.
                        if updates.has_changed().unwrap_or(false) {
                            (config, session_config) = reload(&mut updates, &hostname);
                        }
                        admit(conn, &config, &session_config, &shared, &mut sessions);
                    }
                    Err(e) => {
                        tracing::warn!(listener = %name, error = %e,
                            retry_in = ?backoff, "accept failed");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
                Ok(()) = updates.changed() => {
                    (config, session_config) = reload(&mut updates, &hostname);
                }
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(ended) = sessions.join_next(), if !sessions.is_empty() => {
                    log_session_end(&name, ended);
                }
            }
        }

        drop(accepter);
        tracing::info!(listener = %name, sessions = sessions.len(),
            "stopped accepting; waiting for sessions to end");
        while let Some(ended) = sessions.join_next().await {
            log_session_end(&name, ended);
        }
        if let Some((path, id)) = unix_path {
            remove_if_our_socket(&path, id);
        }
        tracing::info!(listener = %name, "stopped");
        Ok(())
    }
}

/// The latest settings from `updates`, and the session settings made from them.
fn reload(
    updates: &mut watch::Receiver<Arc<Settings>>,
    hostname: &str,
) -> (Arc<ListenerConfig>, Arc<SessionConfig>) {
    let settings = updates.borrow_and_update().clone();
    let config = settings.config.clone();
    let session_config = Arc::new(SessionConfig::from_listener(
        &config,
        hostname,
        settings.tls.clone(),
    ));
    tracing::debug!(listener = %config.name, "new settings apply to new connections");
    (config, session_config)
}

/// What every connection of a serving listener shares.
struct Shared {
    sink: Arc<dyn Sink>,
    shutdown: watch::Receiver<bool>,
    /// Connections holding a [`Slot`].
    active: Arc<AtomicUsize>,
}

/// One of `max_connections`, held for the life of a connection.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A slot, if fewer than `max` are taken. `max` may change between calls (reload);
    /// connections above a lowered `max` keep theirs.
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
    fn refuse(&self, line: &str) {
        match self {
            Conn::Tcp(s, _) => refuse_tcp(s, line),
            Conn::Unix(s) => {
                let _ = s.try_read(&mut [0u8; 1024]);
                let _ = s.try_write(format!("{line}\r\n").as_bytes());
            }
        }
    }
}

/// Best effort, without waiting: a refusal line into a fresh socket's empty buffer. What
/// the peer already sent (a PROXY header) is read first, so closing does not reset the
/// connection before the line arrives.
fn refuse_tcp(s: &tokio::net::TcpStream, line: &str) {
    let _ = s.try_read(&mut [0u8; 1024]);
    let _ = s.try_write(format!("{line}\r\n").as_bytes());
}

/// Checks the allow-list (for direct clients) and the connection limit, then spawns the
/// connection's task: the PROXY header (from trusted proxies), then the session.
fn admit(
    conn: Conn,
    config: &Arc<ListenerConfig>,
    session_config: &Arc<SessionConfig>,
    shared: &Shared,
    sessions: &mut JoinSet<()>,
) {
    let (peer, via_proxy) = match &conn {
        Conn::Tcp(_, peer) => {
            let peer = canonical(*peer);
            let via_proxy = config.proxy_protocol && allowed(&config.trusted_proxies, peer.ip());
            if !via_proxy && !allowed(&config.allow, peer.ip()) {
                tracing::warn!(listener = %config.name, client = %peer,
                    "connection refused: address not in allow list");
                shared
                    .sink
                    .connection_refused(&config.name, ConnRefusal::NotAllowed);
                conn.refuse(&format!("554 5.7.1 {} not allowed", peer.ip()));
                return;
            }
            (Some(peer), via_proxy)
        }
        Conn::Unix(_) => (None, false),
    };
    let Some(slot) = Slot::take(&shared.active, config.max_connections) else {
        let client = peer.map_or_else(|| "unix".to_owned(), |p| p.to_string());
        tracing::warn!(listener = %config.name, client = %client, via_proxy,
            max = config.max_connections, "connection refused: too many connections");
        shared
            .sink
            .connection_refused(&config.name, ConnRefusal::MaxConnections);
        conn.refuse(&format!(
            "421 4.7.0 {} too many connections",
            session_config.hostname
        ));
        return;
    };
    let config = config.clone();
    let session_config = session_config.clone();
    let sink = shared.sink.clone();
    let mut shutdown = shared.shutdown.clone();
    sessions.spawn(async move {
        let _slot = slot;
        let (result, client, proxy) = match conn {
            Conn::Tcp(stream, peer) => {
                let _ = stream.set_nodelay(true);
                let peer = canonical(peer);
                let (stream, client, proxy) = if via_proxy {
                    let Some((stream, client)) =
                        accept_proxied(stream, peer, &config, &*sink, &mut shutdown).await
                    else {
                        return;
                    };
                    (stream, client, Some(peer))
                } else {
                    (Prefixed::new(stream, Vec::new()), peer, None)
                };
                let client = client.to_string();
                let result =
                    session::serve(stream, session_config, client.clone(), sink, shutdown).await;
                (result, client, proxy)
            }
            Conn::Unix(stream) => {
                let client = "unix".to_owned();
                let result =
                    session::serve(stream, session_config, client.clone(), sink, shutdown).await;
                (result, client, None)
            }
        };
        if let Err(e) = result {
            tracing::info!(listener = %config.name, client = %client, proxy = %Shown(proxy),
                error = %e, "session ended with an error");
        }
    });
}

/// A connection from a trusted proxy: reads its PROXY header and checks the allow-list
/// against the client it names. `None` when the connection is closed instead (logged):
/// no header in time, a malformed one, shutdown, or a client not allowed (554).
async fn accept_proxied(
    mut stream: tokio::net::TcpStream,
    proxy: SocketAddr,
    config: &ListenerConfig,
    sink: &dyn Sink,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(Prefixed<tokio::net::TcpStream>, SocketAddr)> {
    let read = tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_proxy_header(&mut stream));
    let read = tokio::select! {
        read = read => read,
        _ = shutdown.wait_for(|stop| *stop) => return None,
    };
    let (header, leftover) = match read {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => {
            tracing::warn!(listener = %config.name, proxy = %proxy, error = %e,
                "closing a connection from a trusted proxy: bad PROXY header");
            return None;
        }
        Err(_) => {
            tracing::warn!(listener = %config.name, proxy = %proxy,
                timeout = ?PROXY_HEADER_TIMEOUT,
                "closing a connection from a trusted proxy: no PROXY header in time");
            return None;
        }
    };
    let client = header.source().map_or(proxy, canonical);
    if !allowed(&config.allow, client.ip()) {
        tracing::warn!(listener = %config.name, client = %client, proxy = %proxy,
            "connection refused: address not in allow list");
        sink.connection_refused(&config.name, ConnRefusal::NotAllowed);
        refuse_tcp(&stream, &format!("554 5.7.1 {} not allowed", client.ip()));
        return None;
    }
    match header {
        ProxyHeader::Proxied { destination, .. } => {
            tracing::info!(listener = %config.name, client = %client, proxy = %proxy,
                destination = %destination, "connection through proxy");
        }
        ProxyHeader::Local => {
            tracing::debug!(listener = %config.name, proxy = %proxy,
                "proxy connection on its own behalf (LOCAL/UNKNOWN)");
        }
    }
    Some((Prefixed::new(stream, leftover), client))
}

/// Reads exactly one PROXY header, and returns it with whatever was read past it.
async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(ProxyHeader, Vec<u8>)> {
    let mut buf = vec![0u8; proxy::MAX_HEADER];
    let mut len = 0;
    // Each pass reads at least one byte into a bounded buffer.
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the PROXY header ended",
            ));
        }
        len += n;
        match proxy::parse(&buf[..len]) {
            Ok(Parsed::NeedMore) => {}
            Ok(Parsed::Done { header, consumed }) => {
                return Ok((header, buf[consumed..len].to_vec()));
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "PROXY header too long",
    ))
}

/// A stream that yields `prefix` before what `inner` reads: bytes a client sent right
/// after its PROXY header, handed to the session as if not yet read.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(inner: S, prefix: Vec<u8>) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.pos);
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An optional address for a log field: the address, or `-`.
struct Shown(Option<SocketAddr>);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

/// IPv4-mapped IPv6 addresses as IPv4, so `10.0.0.0/8` matches `::ffff:10.1.2.3`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
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
        sink: Arc<FakeSink>,
        reloader: Reloader,
    }

    impl Running {
        async fn stop(self) {
            self.shutdown.send(true).unwrap();
            self.task.await.unwrap().unwrap();
        }
    }

    fn run(config: ListenerConfig) -> Running {
        let listener = Listener::bind(Arc::new(config)).unwrap();
        let addr = listener.local_addr();
        let reloader = listener.reloader();
        let (shutdown, rx) = watch::channel(false);
        let sink = Arc::new(FakeSink::default());
        let dyn_sink: Arc<dyn Sink> = sink.clone();
        let task = tokio::spawn(listener.serve(dyn_sink, "mx.test".into(), rx));
        Running {
            addr,
            shutdown,
            task,
            sink,
            reloader,
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

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn proxy_config(trusted: &[&str], allow: &[&str]) -> ListenerConfig {
        let mut config = tcp_config();
        config.proxy_protocol = true;
        config.trusted_proxies = nets(trusted);
        config.allow = nets(allow);
        config
    }

    fn v1(line: &str) -> Vec<u8> {
        format!("{line}\r\n").into_bytes()
    }

    /// A v2 header: command, family, address block (source, destination, ports).
    fn v2(cmd: u8, family: u8, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut block = Vec::new();
        for ip in [src, dst] {
            match ip {
                IpAddr::V4(a) => block.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => block.extend_from_slice(&a.octets()),
            }
        }
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&25u16.to_be_bytes());
        block.extend_from_slice(&[0x04, 0x00, 0x02, b'h', b'i']); // a NOOP TLV, skipped
        let mut out = proxy::V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[cmd, family]);
        out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&block);
        out
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Connects, sends `first` at once, and returns the client end.
    async fn connect_sending(
        addr: SocketAddr,
        first: &[u8],
    ) -> Client<tokio::net::tcp::OwnedReadHalf> {
        let mut c = connect(addr).await;
        c.send_bytes(first).await;
        c
    }

    /// Runs one transaction after the greeting; returns the client_addr it was recorded
    /// with.
    async fn transaction(
        c: &mut Client<tokio::net::tcp::OwnedReadHalf>,
        sink: &FakeSink,
    ) -> String {
        c.cmd("EHLO me", "250-").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("hi\r\n.\r\n").await;
        c.expect("250 2.0.0 Ok: ").await;
        c.cmd("QUIT", "221 ").await;
        let got = sink.got.lock().unwrap();
        got.last().unwrap().session.client_addr.clone().unwrap()
    }

    /// What a trusted proxy's connection leads to.
    #[derive(Debug)]
    enum Outcome {
        /// Greeted; the arrival records this client (a prefix when the port is the
        /// socket's own).
        Client(&'static str),
        /// This line, then the connection is closed.
        Refused(&'static str),
        /// Closed without a word.
        Closed,
    }

    async fn check(r: &Running, name: &str, first: &[u8], want: &Outcome) {
        let addr = r.addr.unwrap();
        let mut c = connect_sending(addr, first).await;
        match want {
            Outcome::Client(client) => {
                c.expect("220 mx.test ESMTP Coffer").await;
                let got = transaction(&mut c, &r.sink).await;
                assert!(
                    got.starts_with(client),
                    "{name}: recorded {got}, want {client}"
                );
            }
            Outcome::Refused(line) => assert_eq!(c.reply().await, *line, "{name}"),
            Outcome::Closed => assert_eq!(c.reply().await, "", "{name}"),
        }
        assert_eq!(c.reply().await, "", "{name}: then closed");
    }

    #[tokio::test]
    async fn proxy_headers_from_a_trusted_proxy() {
        use Outcome::*;
        let (tcp4, tcp6) = (0x11, 0x21);
        let lb = ip("192.0.2.1");
        let cases: Vec<(&str, Vec<u8>, Outcome)> = vec![
            (
                "v1 tcp4 allowed",
                v1("PROXY TCP4 198.51.100.9 192.0.2.1 40000 25"),
                Client("198.51.100.9:40000"),
            ),
            (
                "v1 tcp4 not allowed",
                v1("PROXY TCP4 203.0.113.7 192.0.2.1 40000 25"),
                Refused("554 5.7.1 203.0.113.7 not allowed\r\n"),
            ),
            (
                "v1 tcp6",
                v1("PROXY TCP6 2001:db8::7 2001:db8::1 40000 25"),
                Client("[2001:db8::7]:40000"),
            ),
            (
                "v1 tcp6 v4-mapped is checked as v4",
                v1("PROXY TCP6 ::ffff:198.51.100.9 ::1 40000 25"),
                Client("198.51.100.9:40000"),
            ),
            (
                "v2 tcp4 allowed",
                v2(0x21, tcp4, ip("198.51.100.9"), lb),
                Client("198.51.100.9:40000"),
            ),
            (
                "v2 tcp4 not allowed",
                v2(0x21, tcp4, ip("203.0.113.7"), lb),
                Refused("554 5.7.1 203.0.113.7 not allowed\r\n"),
            ),
            (
                "v2 tcp6",
                v2(0x21, tcp6, ip("2001:db8::7"), ip("2001:db8::1")),
                Client("[2001:db8::7]:40000"),
            ),
            (
                "v2 tcp6 not allowed",
                v2(0x21, tcp6, ip("2001:db9::7"), ip("2001:db8::1")),
                Refused("554 5.7.1 2001:db9::7 not allowed\r\n"),
            ),
            (
                "v1 unknown: the proxy is the client",
                v1("PROXY UNKNOWN"),
                Refused("554 5.7.1 127.0.0.1 not allowed\r\n"),
            ),
            (
                "v2 local: the proxy is the client",
                v2(0x20, 0x00, ip("198.51.100.9"), lb),
                Refused("554 5.7.1 127.0.0.1 not allowed\r\n"),
            ),
            (
                "v1 malformed",
                v1("PROXY TCP4 198.51.100.9 nonsense 40000 25"),
                Closed,
            ),
            ("v1 without CR", b"PROXY UNKNOWN\n".to_vec(), Closed),
            ("smtp instead of a header", v1("EHLO me"), Closed),
            (
                "v2 version 3",
                v2(0x31, tcp4, ip("198.51.100.9"), lb),
                Closed,
            ),
            ("v2 udp", v2(0x21, 0x12, ip("198.51.100.9"), lb), Closed),
            (
                "v1 too long",
                v1(&format!("PROXY UNKNOWN {}", "x".repeat(200))),
                Closed,
            ),
        ];
        let r = run(proxy_config(
            &["127.0.0.0/8"],
            &["198.51.100.0/24", "2001:db8::/32"],
        ));
        for (name, first, want) in &cases {
            check(&r, name, first, want).await;
        }
        assert_eq!(r.sink.got.lock().unwrap().len(), 5);
        r.stop().await;
    }

    #[tokio::test]
    async fn health_checks_are_the_proxy_itself() {
        use Outcome::*;
        let r = run(proxy_config(&["127.0.0.0/8"], &["127.0.0.0/8"]));
        let local = v2(0x20, 0x00, ip("198.51.100.9"), ip("192.0.2.1"));
        check(&r, "v2 local", &local, &Client("127.0.0.1:")).await;
        check(
            &r,
            "v1 unknown",
            &v1("PROXY UNKNOWN"),
            &Client("127.0.0.1:"),
        )
        .await;
        r.stop().await;
    }

    #[tokio::test]
    async fn bytes_after_the_header_reach_the_session() {
        let r = run(proxy_config(&["127.0.0.0/8"], &["198.51.100.0/24"]));
        let mut first = v1("PROXY TCP4 198.51.100.9 192.0.2.1 40000 25");
        first.extend_from_slice(b"EHLO early\r\nNOOP\r\n");
        let mut c = connect_sending(r.addr.unwrap(), &first).await;
        c.expect("220 ").await;
        c.expect("250-mx.test").await;
        c.expect("250 2.0.0").await;
        c.cmd("QUIT", "221 ").await;
        // The header split over several writes is read whole.
        let header = v2(0x21, 0x11, ip("198.51.100.9"), ip("192.0.2.1"));
        let mut c = connect(r.addr.unwrap()).await;
        for part in header.chunks(5) {
            c.send_bytes(part).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        c.expect("220 ").await;
        assert_eq!(transaction(&mut c, &r.sink).await, "198.51.100.9:40000");
        r.stop().await;
    }

    #[tokio::test]
    async fn a_trusted_proxy_that_sends_no_header_is_closed() {
        let r = run(proxy_config(&["127.0.0.0/8"], &["127.0.0.0/8"]));
        let started = tokio::time::Instant::now();
        // Half a header, then nothing: closed once the timeout passes, never greeted.
        let mut c = connect_sending(r.addr.unwrap(), b"PROXY TCP4 198.").await;
        assert_eq!(c.reply().await, "");
        assert!(started.elapsed() >= PROXY_HEADER_TIMEOUT - Duration::from_millis(100));
        // Half a header, then EOF: closed at once.
        let mut s = TcpStream::connect(r.addr.unwrap()).await.unwrap();
        s.write_all(b"PROXY TCP4 198.").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "");
        r.stop().await;
    }

    #[tokio::test]
    async fn shutdown_closes_a_connection_waiting_for_its_header() {
        let r = run(proxy_config(&["127.0.0.0/8"], &["127.0.0.0/8"]));
        let mut c = connect_sending(r.addr.unwrap(), b"PROXY ").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = tokio::time::Instant::now();
        r.stop().await;
        assert!(started.elapsed() < PROXY_HEADER_TIMEOUT);
        assert_eq!(c.reply().await, "");
    }

    #[tokio::test]
    async fn proxy_headers_from_anyone_else_are_not_honoured() {
        let header = v1("PROXY TCP4 198.51.100.9 192.0.2.1 40000 25");
        let mut not_proxy = proxy_config(&["127.0.0.0/8"], &["127.0.0.0/8"]);
        not_proxy.proxy_protocol = false;
        for (name, config) in [
            (
                "untrusted peer",
                proxy_config(&["10.0.0.0/8"], &["127.0.0.0/8"]),
            ),
            ("listener without proxy_protocol", not_proxy),
        ] {
            let r = run(config);
            let mut c = connect_sending(r.addr.unwrap(), &header).await;
            c.expect("220 mx.test ESMTP Coffer").await;
            c.expect("500 5.5.1").await;
            let got = transaction(&mut c, &r.sink).await;
            assert!(got.starts_with("127.0.0.1:"), "{name}: recorded {got}");
            r.stop().await;
        }
        // An untrusted peer is checked against the allow-list itself.
        let r = run(proxy_config(&["10.0.0.0/8"], &["198.51.100.0/24"]));
        let mut c = connect_sending(r.addr.unwrap(), &header).await;
        assert_eq!(c.reply().await, "554 5.7.1 127.0.0.1 not allowed\r\n");
        r.stop().await;
    }

    #[tokio::test]
    async fn reloaded_allow_list_applies_to_new_connections() {
        let mut config = tcp_config();
        config.allow = nets(&["10.0.0.0/8"]);
        let r = run(config.clone());
        let addr = r.addr.unwrap();
        assert_eq!(
            read_to_end(addr).await,
            "554 5.7.1 127.0.0.1 not allowed\r\n"
        );

        config.allow = nets(&["127.0.0.0/8"]);
        let old = r.reloader.apply(Arc::new(config.clone())).unwrap();
        assert_eq!(old.allow, nets(&["10.0.0.0/8"]));
        let mut c = connect(addr).await;
        c.expect("220 ").await;

        config.allow = nets(&["10.0.0.0/8"]);
        r.reloader.apply(Arc::new(config.clone())).unwrap();
        assert_eq!(
            read_to_end(addr).await,
            "554 5.7.1 127.0.0.1 not allowed\r\n"
        );
        // The session admitted before goes on.
        assert!(transaction(&mut c, &r.sink).await.starts_with("127.0.0.1:"));

        // Trusted proxies and proxy_protocol reload too.
        config.proxy_protocol = true;
        config.trusted_proxies = nets(&["127.0.0.0/8"]);
        config.allow = nets(&["198.51.100.0/24"]);
        r.reloader.apply(Arc::new(config.clone())).unwrap();
        let header = v1("PROXY TCP4 198.51.100.9 192.0.2.1 40000 25");
        let mut c = connect_sending(addr, &header).await;
        c.expect("220 ").await;
        assert_eq!(transaction(&mut c, &r.sink).await, "198.51.100.9:40000");

        // What needs a restart is refused, and nothing changes.
        let mut moved = config.clone();
        moved.bind = BindAddr::Tcp("127.0.0.1:1".parse().unwrap());
        let err = r.reloader.apply(Arc::new(moved)).unwrap_err();
        assert_eq!(err.what, "bind");
        let mut lmtp = config.clone();
        lmtp.protocol = Protocol::Lmtp;
        assert_eq!(
            r.reloader.apply(Arc::new(lmtp)).unwrap_err().what,
            "protocol"
        );
        assert_eq!(r.reloader.current().allow, config.allow);
        r.stop().await;
    }

    #[tokio::test]
    async fn reloaded_limits_apply_to_new_sessions_only() {
        let mut config = tcp_config();
        config.max_connections = 1;
        let r = run(config.clone());
        let addr = r.addr.unwrap();
        let mut first = connect(addr).await;
        first.expect("220 ").await;
        let size = |ehlo: &str| {
            ehlo.lines()
                .find(|l| l.contains("SIZE"))
                .unwrap()
                .to_owned()
        };
        assert_eq!(size(&first.cmd("EHLO me", "250-").await), "250-SIZE 1000");
        assert_eq!(
            read_to_end(addr).await,
            "421 4.7.0 mx.test too many connections\r\n"
        );

        // More connections and a larger size: the second session gets both.
        config.max_connections = 2;
        config.max_message_size = 2000;
        r.reloader.apply(Arc::new(config.clone())).unwrap();
        let mut second = connect(addr).await;
        second.expect("220 ").await;
        assert_eq!(size(&second.cmd("EHLO me", "250-").await), "250-SIZE 2000");
        // The first keeps what it started with.
        assert_eq!(size(&first.cmd("EHLO me", "250-").await), "250-SIZE 1000");

        // Fewer than are open: both go on, new ones wait until enough have ended.
        config.max_connections = 1;
        r.reloader.apply(Arc::new(config.clone())).unwrap();
        assert_eq!(
            read_to_end(addr).await,
            "421 4.7.0 mx.test too many connections\r\n"
        );
        first.cmd("NOOP", "250 ").await;
        second.cmd("NOOP", "250 ").await;
        first.cmd("QUIT", "221 ").await;
        assert_eq!(first.reply().await, "");
        assert_eq!(
            read_to_end(addr).await,
            "421 4.7.0 mx.test too many connections\r\n"
        );
        second.cmd("QUIT", "221 ").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = connect(addr).await;
            if c.reply().await.starts_with("220 ") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        r.stop().await;
    }

    /// STARTTLS on `addr` trusting what `client` trusts; Ok once EHLO is answered over TLS.
    async fn starttls(addr: SocketAddr, client: Arc<rustls::ClientConfig>) -> io::Result<()> {
        use crate::smtp::session::tests::raw_reply;
        let mut s = TcpStream::connect(addr).await?;
        raw_reply(&mut s).await;
        s.write_all(b"EHLO me\r\nSTARTTLS\r\n").await?;
        raw_reply(&mut s).await;
        assert_eq!(raw_reply(&mut s).await, "220 2.0.0 Ready to start TLS\r\n");
        let name = rustls::pki_types::ServerName::try_from("mx.test").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, s)
            .await?;
        tls.write_all(b"EHLO me\r\n").await?;
        let reply = raw_reply(&mut tls).await;
        assert!(reply.starts_with("250-mx.test"), "{reply}");
        Ok(())
    }

    #[tokio::test]
    async fn reload_reads_the_tls_files_again() {
        use crate::tls::testing::TestCa;
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (TestCa::new("CA one"), TestCa::new("CA two"));
        let (_, cert, key) = one.write(dir.path(), "server", "mx.test");
        let mut config = tcp_config();
        config.tls = Some(crate::config::ListenerTls {
            cert: cert.clone(),
            key,
            required: true,
            require_client_cert: false,
            client_ca: None,
        });
        let r = run(config.clone());
        let addr = r.addr.unwrap();
        starttls(addr, one.client(None)).await.unwrap();
        assert!(starttls(addr, two.client(None)).await.is_err());

        // New files, same paths: new handshakes use them after a reload.
        two.write(dir.path(), "server", "mx.test");
        r.reloader.apply(Arc::new(config.clone())).unwrap();
        starttls(addr, two.client(None)).await.unwrap();
        assert!(starttls(addr, one.client(None)).await.is_err());

        // A bad file on reload keeps the previous ones; other settings still change.
        std::fs::write(&cert, "garbage\n").unwrap();
        config.max_recipients = 7;
        r.reloader.apply(Arc::new(config.clone())).unwrap();
        assert_eq!(r.reloader.current().max_recipients, 7);
        starttls(addr, two.client(None)).await.unwrap();
        r.stop().await;

        // At bind, a bad file is an error naming the listener, the key and the file.
        let err = Listener::bind(Arc::new(config)).unwrap_err().to_string();
        assert!(
            err.contains("journal") && err.contains("`tls.cert`") && err.contains("server.crt"),
            "{err}"
        );
    }
}
