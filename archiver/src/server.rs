//! Runs the daemon: store, listeners, signals, shutdown.
