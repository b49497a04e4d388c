//! Everything that can end a `coffer` run early, and the one place that maps it to an
//! exit status (docs/interfaces.md "Commands").

use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::store::{LookupError, StoreError};

/// Success.
pub const EXIT_OK: u8 = 0;
/// A finding: verify found damage, get found nothing, there is no archive, the store
/// failed while reading.
pub const EXIT_FINDING: u8 = 1;
/// Usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// The daemon is needed and not reachable.
pub const EXIT_NO_DAEMON: u8 = 3;
/// The daemon is running and must be stopped first.
pub const EXIT_DAEMON_RUNNING: u8 = 4;

/// Shown under `coffer --help`.
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success (also a search or export that matched nothing)
  1  a finding: verify found problems, get found no such message, no archive exists
     at the configured data_dir, or the store failed while reading
  2  usage or configuration error (bad option, bad date, ambiguous or malformed id)
  3  the daemon is needed and not reachable
  4  the daemon is running and must be stopped first";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments that clap could not catch.
    #[error("{0}")]
    Usage(String),
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// `node.data_dir` holds no store.
    #[error("no archive at {}", .0.display())]
    NoArchive(PathBuf),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Lookup(#[from] LookupError),
    /// The command needs the running daemon and its control socket did not answer.
    #[error("{0}")]
    NoDaemon(String),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
    /// Writing our output failed (a broken pipe ends the run quietly).
    #[error("writing output: {0}")]
    Output(io::Error),
    /// A command could not finish (import: the store refused a message).
    #[error("{0}")]
    Failed(String),
    /// A file we write (export) could not be written.
    #[error("{}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CliError {
    /// The reader of our stdout went away (`coffer search | head`): stop without a word.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

fn store_exit_code(e: &StoreError) -> u8 {
    match e {
        StoreError::DaemonRunning(_) => EXIT_DAEMON_RUNNING,
        // The daemon holds the store but cannot serve it yet (index under repair).
        StoreError::Unavailable(_) => EXIT_NO_DAEMON,
        _ => EXIT_FINDING,
    }
}

/// The exit status for an error. The single mapping every subcommand goes through.
pub fn exit_code(err: &CliError) -> u8 {
    match err {
        CliError::Usage(_) | CliError::Config(_) => EXIT_USAGE,
        CliError::NoArchive(_) | CliError::File { .. } | CliError::Failed(_) => EXIT_FINDING,
        CliError::NoDaemon(_) => EXIT_NO_DAEMON,
        CliError::Refused(_) => EXIT_FINDING,
        CliError::Output(_) if err.is_broken_pipe() => EXIT_OK,
        CliError::Output(_) => EXIT_FINDING,
        CliError::Store(e) => store_exit_code(e),
        CliError::Lookup(LookupError::NotFound(_)) => EXIT_FINDING,
        CliError::Lookup(LookupError::Ambiguous(..) | LookupError::BadPrefix(_)) => EXIT_USAGE,
        CliError::Lookup(LookupError::Store(e)) => store_exit_code(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_err(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "x")
    }

    #[test]
    fn every_error_maps_to_its_documented_code() {
        let cases: Vec<(CliError, u8)> = vec![
            (CliError::Usage("bad".into()), 2),
            (CliError::Config(ConfigError::new("c.toml", "line 3")), 2),
            (CliError::NoArchive("/nope".into()), 1),
            (
                CliError::Store(StoreError::DaemonRunning("/d/index.redb".into())),
                4,
            ),
            (CliError::Store(StoreError::Corrupt("x".into())), 1),
            (CliError::Store(StoreError::Index("x".into())), 1),
            (
                CliError::Store(StoreError::Io {
                    path: "/d".into(),
                    source: io_err(io::ErrorKind::PermissionDenied),
                }),
                1,
            ),
            (
                CliError::Lookup(LookupError::NotFound("abcdef01".into())),
                1,
            ),
            (
                CliError::Lookup(LookupError::Ambiguous("abcdef01".into(), 2)),
                2,
            ),
            (CliError::Lookup(LookupError::BadPrefix("xyz".into())), 2),
            (
                CliError::Lookup(LookupError::Store(StoreError::DaemonRunning("/d".into()))),
                4,
            ),
            (
                CliError::Lookup(LookupError::Store(StoreError::Corrupt("x".into()))),
                1,
            ),
            (CliError::Output(io_err(io::ErrorKind::BrokenPipe)), 0),
            (CliError::Output(io_err(io::ErrorKind::StorageFull)), 1),
            (
                CliError::File {
                    path: "/o/x.eml".into(),
                    source: io_err(io::ErrorKind::Other),
                },
                1,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(exit_code(&err), code, "{err:?}");
        }
        assert_eq!(EXIT_NO_DAEMON, 3);
    }

    #[test]
    fn messages_name_what_went_wrong() {
        assert_eq!(
            CliError::NoArchive("/var/lib/coffer".into()).to_string(),
            "no archive at /var/lib/coffer"
        );
        assert!(CliError::Output(io_err(io::ErrorKind::BrokenPipe)).is_broken_pipe());
    }
}
