//! Logging and error output shared by the binaries.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset or invalid.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the tracing subscriber: human-readable lines on stderr (colours only on a
/// terminal, so journald gets plain text), filtered by `RUST_LOG`, `info` by default.
/// Calling it twice is harmless (the second call does nothing).
pub fn init_logging() {
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some((spec, e))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .is_ok();
    if let (true, Some((spec, e))) = (installed, bad) {
        tracing::warn!("ignoring RUST_LOG={spec:?} ({e}); logging at {DEFAULT_FILTER}");
    }
}

/// Prints an error and its causes to stderr, one line each:
/// `error: ...` then `  caused by: ...`.
pub fn print_error_chain(err: &(dyn std::error::Error + 'static)) {
    eprintln!("error: {err}");
    let mut cause = err.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
}
