//! coffer-milter: taps Postfix (or Sendmail) through the milter protocol and hands every
//! message to cofferd over LMTP before the MTA may accept it.
//!
//! This library exists for the binary and its tests; it promises no API stability.
//!
//! # Layout
//! - [`config`]: the `[milter]` section of `coffer.toml`, parsed without the archiver.
//! - [`message`]: rebuilding the message bytes from headers and body chunks.
//! - [`latency`]: the end-of-message latency histogram (SIGUSR1 report).
//! - [`lmtp`]: the LMTP client that talks to cofferd, and its connection pool.
//! - [`session`]: the milter callbacks — capture, handoff, the decision at
//!   end-of-message.
//! - [`server`]: binding the socket, running indymilter, shutting down.
//!
//! See docs/milter.md for what is archived and how to set up Postfix and Sendmail.

pub mod config;
pub mod latency;
pub mod lmtp;
pub mod message;
pub mod server;
pub mod session;
