//! Replication: one replicator task per `[[connection]]`, shipping arrivals to a peer
//! over SMTP from a durable cursor into the index (docs/replication.md).
//!
//! # Layout
//! - [`client`]: the SMTP client (EHLO, MAIL with `XCOFFER=`, RCPT, BDAT or DATA).
//! - [`backoff`]: retry timing, pure.
//! - [`replicator`]: the per-connection loop: scan, route, ship, park, advance the cursor.
//!
//! The queue *is* the store: a replicator reads the index's `arrivals` table in local
//! order from its cursor (a low-water mark: every arrival at or below it is shipped,
//! parked or not for this connection) and writes its cursor and parked arrivals through
//! the store's index stage, the only writer of the index.
//!
//! A connection with `tls` goes to TLS with STARTTLS before anything else
//! ([`client::TlsTo`]); it never ships in the clear.

pub mod backoff;
pub mod client;
pub mod replicator;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::store::Arrival;

pub use replicator::Replicator;

/// A request to one replicator, from the control socket.
#[derive(Debug)]
pub enum Command {
    /// Ship this parked arrival (local number) again.
    Retry(u64),
    /// Forget this parked arrival: it will not be shipped.
    Skip(u64),
    /// Start again from the first arrival, regardless of routes and trace.
    Resync,
}

/// One connection as `coffer status` and `coffer queue` show it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnStatus {
    pub name: String,
    pub peer: String,
    /// `unknown` (not tried yet), `up`, `down` (probed every `probe_interval`),
    /// `wrong-peer` (EHLO names another node; nothing is shipped).
    pub state: String,
    /// `xcoffer` (arrival ids kept), `plain` (content and envelope only), or `unknown`.
    pub mode: String,
    /// Arrivals past the cursor: not yet acknowledged, parked or passed over.
    pub lag_arrivals: u64,
    /// Bytes of the arrivals loaded for shipping and not yet acknowledged.
    pub lag_bytes: u64,
    /// Age of the oldest arrival waiting to be shipped.
    pub oldest_unsent_secs: Option<u64>,
    pub parked: u64,
    pub cursor: u64,
    pub shipped: u64,
    /// Failures by kind: connect, wrong_peer, temporary, permanent.
    pub failures: std::collections::BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub peer_epoch: Option<String>,
    /// The lag is over `queue_limit` (an alarm; nothing is dropped).
    pub lag_alarm: bool,
    /// While a rebuilt peer is resynced (or after `coffer resync`): arrivals up to this
    /// local number are shipped regardless of routes and trace.
    pub resync_until: Option<u64>,
    /// Arrivals that failed temporarily and wait for their next attempt (at most
    /// [`MAX_DEFERRED_SHOWN`], oldest first).
    pub deferred: Vec<Deferred>,
}

/// Most deferred arrivals listed in a [`ConnStatus`].
pub const MAX_DEFERRED_SHOWN: usize = 100;

/// An arrival waiting for its next attempt after a 4xx, a broken or a silent session.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Deferred {
    pub arrival: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Milliseconds until the next attempt may start (0: due).
    pub next_attempt_ms: u64,
    pub last_error: String,
}

/// The handle of one running replicator.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub name: String,
    pub status: Arc<Mutex<ConnStatus>>,
    pub commands: mpsc::Sender<Command>,
}

/// Every replicator of the daemon, for the control socket and `/metrics`. A reload
/// adds, replaces and removes replicators while the daemon runs.
#[derive(Debug, Default)]
pub struct Replication {
    connections: std::sync::RwLock<Vec<ConnHandle>>,
}

impl Replication {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<ConnHandle>> {
        self.connections
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<ConnHandle>> {
        self.connections
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a replicator, or replaces the one of the same name.
    pub fn upsert(&self, handle: ConnHandle) {
        let mut all = self.write();
        match all.iter_mut().find(|c| c.name == handle.name) {
            Some(slot) => *slot = handle,
            None => all.push(handle),
        }
    }

    /// Forgets a replicator (its connection was removed).
    pub fn remove(&self, name: &str) {
        self.write().retain(|c| c.name != name);
    }

    /// Each connection's status, in configuration order.
    pub fn statuses(&self) -> Vec<ConnStatus> {
        self.read()
            .iter()
            .map(|c| {
                c.status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<ConnHandle> {
        self.read().iter().find(|c| c.name == name).cloned()
    }
}

/// The `XCOFFER=` object that ships `a` from node `node`: the origin's id, time, listener
/// and envelope facts, the client facts it was received with (TLS included), the trace (who holds it,
/// this node included) and the hop count.
pub fn xcoffer_for(a: &Arrival, node: &str) -> coffer_proto::Xcoffer {
    let mut x = a.xcoffer.clone().unwrap_or_default();
    x.origin_arrival = Some(a.id.to_string());
    x.origin_time = Some(a.time.clone());
    x.origin_listener = Some(a.listener.clone());
    if x.protocol.is_none() {
        x.protocol = Some(a.protocol.clone());
    }
    if !a.replicated() {
        // On the origin, the session's facts are the original client's unless a trusted
        // client (the milter) already said otherwise.
        if x.mail_params.is_empty() {
            x.mail_params.clone_from(&a.mail_params);
        }
        if x.client_addr.is_none() {
            x.client_addr.clone_from(&a.client_addr);
        }
        if x.helo.is_none() {
            x.helo.clone_from(&a.helo);
        }
        if x.tls.is_none() {
            x.tls.clone_from(&a.tls);
        }
    }
    if x.queue_id.is_none() {
        x.queue_id.clone_from(&a.queue_id);
    }
    let mut trace = a.holders();
    if !trace.iter().any(|t| t == node) {
        trace.push(node.to_owned());
    }
    x.trace = trace;
    x.hops = a.next_hops();
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ArrivalId;

    fn arrival() -> Arrival {
        Arrival {
            id: ArrivalId {
                node: "a".into(),
                epoch: "0badf00d".into(),
                seq: 5,
            },
            message: "ab".repeat(32),
            time: "2024-05-01T12:00:00.000001Z".into(),
            listener: "journal".into(),
            protocol: "ESMTP".into(),
            client_addr: Some("192.0.2.1:2525".into()),
            helo: Some("mx.example.org".into()),
            mail_from: "s@example.org".into(),
            mail_params: vec!["SIZE=10".into()],
            rcpt_to: vec!["r@example.net".into()],
            queue_id: None,
            xcoffer: None,
            trace: vec!["a".into()],
            via: None,
            tls: None,
            received: None,
        }
    }

    #[test]
    fn xcoffer_of_a_first_arrival() {
        let x = xcoffer_for(&arrival(), "a");
        assert_eq!(x.origin_arrival.as_deref(), Some("a/0badf00d/5"));
        assert_eq!(
            x.origin_time.as_deref(),
            Some("2024-05-01T12:00:00.000001Z")
        );
        assert_eq!(x.origin_listener.as_deref(), Some("journal"));
        assert_eq!(x.protocol.as_deref(), Some("ESMTP"));
        assert_eq!(x.mail_params, vec!["SIZE=10".to_owned()]);
        assert_eq!(x.client_addr.as_deref(), Some("192.0.2.1:2525"));
        assert_eq!(x.helo.as_deref(), Some("mx.example.org"));
        assert_eq!(x.trace, vec!["a".to_owned()]);
        assert_eq!(x.hops, 0);
        assert_eq!(x.tls, None);
        // The original client's TLS travels with it; a replica's own hop TLS does not.
        let mut a = arrival();
        let tls = coffer_proto::TlsInfo {
            version: Some("TLSv1.3".into()),
            ..coffer_proto::TlsInfo::default()
        };
        a.tls = Some(tls.clone());
        assert_eq!(xcoffer_for(&a, "a").tls, Some(tls));
        a.via = Some("ha".into());
        assert_eq!(xcoffer_for(&a, "a").tls, None);
        assert_eq!(coffer_proto::decode(&coffer_proto::encode(&x)), Ok(x));
    }

    #[test]
    fn xcoffer_of_a_milter_arrival_keeps_the_mta_facts() {
        let mut a = arrival();
        a.client_addr = Some("unix".into());
        a.xcoffer = Some(coffer_proto::Xcoffer {
            client_addr: Some("198.51.100.9".into()),
            helo: Some("client.example".into()),
            queue_id: Some("4Q1".into()),
            mail_params: vec!["BODY=8BITMIME".into()],
            ..coffer_proto::Xcoffer::default()
        });
        let x = xcoffer_for(&a, "a");
        assert_eq!(x.client_addr.as_deref(), Some("198.51.100.9"));
        assert_eq!(x.helo.as_deref(), Some("client.example"));
        assert_eq!(x.queue_id.as_deref(), Some("4Q1"));
        assert_eq!(x.mail_params, vec!["BODY=8BITMIME".to_owned()]);
    }

    #[test]
    fn xcoffer_of_a_replica_counts_a_hop_and_extends_the_trace() {
        let mut a = arrival();
        a.via = Some("ha".into());
        a.client_addr = Some("127.0.0.2:40000".into());
        a.trace = vec!["a".into(), "b".into()];
        a.xcoffer = Some(coffer_proto::Xcoffer {
            origin_arrival: Some("a/0badf00d/5".into()),
            client_addr: Some("192.0.2.1:2525".into()),
            trace: vec!["a".into()],
            hops: 0,
            ..coffer_proto::Xcoffer::default()
        });
        let x = xcoffer_for(&a, "b");
        assert_eq!(x.hops, 1);
        assert_eq!(x.trace, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(
            x.client_addr.as_deref(),
            Some("192.0.2.1:2525"),
            "the origin's client"
        );
        assert_eq!(x.origin_arrival.as_deref(), Some("a/0badf00d/5"));
    }
}
