//! Binding the milter socket, running indymilter until told to stop, cleaning up.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use indymilter::EitherListener;
use tokio::net::{TcpListener, UnixListener};

use std::sync::Arc;

use crate::config::{Addr, MilterConfig};
use crate::session::{self, Shared};

/// The async runtime coffer-milter runs on (also used by the benchmark's no-op milter,
/// so the two are compared on equal terms): one thread.
///
/// The milter's work per message is a few copies and one LMTP exchange; what costs is
/// waking tasks and threads. On one thread every wake-up between indymilter's tasks, the
/// session and its LMTP connection is a queue push, where a multi-threaded runtime pays
/// futex and eventfd system calls and cross-CPU hops — CPU taken from the MTA on the same
/// host. One thread handles far more messages per second than an MTA accepts.
///
/// # Errors
/// The runtime could not be started.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A bound milter socket.
pub struct Bound {
    listener: EitherListener<TcpListener, UnixListener>,
    /// For `unix:`: the path and the (device, inode) it had when we bound it.
    unix: Option<(PathBuf, (u64, u64))>,
    /// What we listen on, for logs (with the real port for `inet:…:0`).
    pub local: String,
}

/// Binds `config.listen`. For `unix:PATH` a file already at PATH is removed only if it
/// is a socket nobody answers on; then the socket is chmod/chown-ed as configured
/// (after bind: a `UMask=0077` unit would otherwise leave it 0600).
///
/// Must be called inside a tokio runtime.
///
/// # Errors
/// Binding failed, or the mode or group could not be set.
pub fn bind(config: &MilterConfig) -> io::Result<Bound> {
    match &config.listen {
        Addr::Inet(hp) => {
            let std = std::net::TcpListener::bind(hp.as_str())
                .map_err(|e| io::Error::new(e.kind(), format!("inet:{hp}: {e}")))?;
            std.set_nonblocking(true)?;
            let local = format!("inet:{}", std.local_addr()?);
            Ok(Bound {
                listener: EitherListener::Tcp(TcpListener::from_std(std)?),
                unix: None,
                local,
            })
        }
        Addr::Unix(path) => {
            let ctx =
                |e: io::Error| io::Error::new(e.kind(), format!("unix:{}: {e}", path.display()));
            remove_stale_socket(path).map_err(ctx)?;
            let std = std::os::unix::net::UnixListener::bind(path).map_err(ctx)?;
            std.set_nonblocking(true)?;
            if let Some(mode) = config.socket_mode {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(ctx)?;
            }
            if let Some(group) = config.socket_group.as_deref() {
                let gid = nix::unistd::Group::from_name(group)
                    .map_err(io::Error::from)
                    .map_err(ctx)?
                    .ok_or_else(|| {
                        ctx(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no such group: {group}"),
                        ))
                    })?
                    .gid;
                nix::unistd::chown(path, None, Some(gid))
                    .map_err(io::Error::from)
                    .map_err(ctx)?;
            }
            let meta = std::fs::metadata(path)?;
            Ok(Bound {
                listener: EitherListener::Unix(UnixListener::from_std(std)?),
                unix: Some((path.clone(), (meta.dev(), meta.ino()))),
                local: format!("unix:{}", path.display()),
            })
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; not removing it",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs the milter on `bound` until `shutdown` completes, then waits for the sessions
/// to finish the command they are in, and removes the socket if it is still ours.
/// `shared` (from [`Shared::new`]) stays with the caller for reloads and reports.
///
/// # Errors
/// The listener failed for good.
pub async fn run(shared: Arc<Shared>, bound: Bound, shutdown: impl Future) -> io::Result<()> {
    let milter_config = indymilter::Config {
        max_connections: shared.config().max_connections,
        ..Default::default()
    };
    let Bound { listener, unix, .. } = bound;
    let result = indymilter::run(
        listener,
        session::callbacks(shared),
        milter_config,
        shutdown,
    )
    .await;
    if let Some((path, id)) = unix {
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() && (meta.dev(), meta.ino()) == id => {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove the socket");
                }
            }
            _ => {}
        }
    }
    result
}
