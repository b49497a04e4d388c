//! Coffer's archiver: the `cofferd` daemon and the `coffer` CLI.
//!
//! This library exists so the binaries stay thin and the tests can drive every part; it
//! promises no API stability.
//!
//! # Layout
//! - [`ids`], [`envelope`]: identities and the evidence recorded with each arrival.
//! - [`config`]: `coffer.toml`, parsed then validated into an immutable [`config::Config`].
//! - [`store`]: the archive — segment log, redb index, the single writer thread.
//! - [`smtp`]: the SMTP/LMTP listeners: a sans-IO codec, sessions, accept loops.
//! - [`ingest`]: what listeners hand messages to: archive, count, unwrap journal reports.
//! - [`journal`]: Exchange/Microsoft 365 journal reports (pure parsing).
//! - [`metrics`], [`console`]: Prometheus counters, `/health` and `/metrics` over HTTP.
//! - [`control`]: the control socket in `data_dir` for the CLI's daemon commands.
//! - [`route`]: the router: which connections an arrival goes to (pure).
//! - [`relay`]: replication: one replicator per connection, an SMTP client, backoff.
//! - [`tls`]: rustls configurations from the TLS files, and the TLS facts of a session.
//! - [`server`]: wires listeners to the store and runs until shutdown.
//! - [`cli`]: the `coffer` subcommands.

pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod envelope;
pub mod ids;
pub mod ingest;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod relay;
pub mod route;
pub mod server;
pub mod smtp;
pub mod store;
pub mod tls;
