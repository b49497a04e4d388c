//! SMTP and LMTP listeners.
//!
//! # Layout
//! - [`codec`]: sans-IO codec: command lines and DATA content in, typed events out.
//! - [`session`]: one connection's state machine over the codec and an async stream.
//! - [`listener`]: TCP and Unix accept loops: allow-list, connection limit, PROXY
//!   protocol, live settings, shutdown.
//! - [`proxy`]: sans-IO parser for PROXY protocol v1/v2 headers.
//!
//! The session talks to the store only through [`Sink`], so it can be tested with a
//! fake and the store's handle implements it elsewhere.

pub mod budget;
pub mod codec;
pub mod listener;
pub mod proxy;
pub mod session;

pub use listener::{serve, Listener, ReloadError, Reloader};
pub use session::SessionConfig;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use budget::Budget;

use crate::store::{Incoming, IngestError, Receipt};

/// Where a session hands a complete message. `ingest` resolves only once the message is
/// durable (design.md §2.1): the session answers 250 after it returns `Ok`, never before.
pub trait Sink: Send + Sync + 'static {
    fn ingest(
        &self,
        msg: Incoming,
    ) -> Pin<Box<dyn Future<Output = Result<Receipt, IngestError>> + Send + '_>>;

    /// This node's name, advertised as `XCOFFER NODE EPOCH` on trusted listeners.
    fn node(&self) -> &str;

    /// The store epoch (a UUID), advertised beside the node name: a peer that sees it
    /// change knows the store was rebuilt.
    fn epoch(&self) -> &str;

    /// The memory budget every session claims message buffers from (`max_pending`);
    /// `None` leaves them bounded by the size caps only.
    fn budget(&self) -> Option<Arc<Budget>> {
        None
    }

    /// Counts a message a session refused itself, before handing it over (the memory
    /// budget was exhausted while it arrived).
    fn refused(&self, _listener: &str, _error: &IngestError) {}

    /// Counts a connection a listener turned away before any session began.
    fn connection_refused(&self, _listener: &str, _reason: ConnRefusal) {}
}

/// Why a listener turned a connection away, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// The client's address is not in `allow` (554 5.7.1).
    NotAllowed,
    /// `max_connections` reached (421 4.7.0).
    MaxConnections,
}

impl ConnRefusal {
    pub const ALL: [ConnRefusal; 2] = [ConnRefusal::NotAllowed, ConnRefusal::MaxConnections];

    pub fn label(self) -> &'static str {
        match self {
            ConnRefusal::NotAllowed => "not_allowed",
            ConnRefusal::MaxConnections => "max_connections",
        }
    }
}
