//! Runs the daemon: store, listeners, signals, shutdown.

use crate::config::Config;

/// Runs `cofferd` in the foreground until SIGTERM/SIGINT.
///
/// # Errors
/// Opening the store or binding a listener failed.
pub fn run_blocking(config: Config) -> anyhow::Result<()> {
    let _ = config;
    anyhow::bail!("cofferd: not wired yet")
}
