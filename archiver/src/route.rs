//! The router: which connections an arrival is forwarded to. Pure, no I/O.
//!
//! An arrival is forwarded to the union of the `forward` lists of every route whose `from`
//! names the listener it came in on (for a replicated arrival: the local listener, not the
//! origin's), minus every connection whose `peer` already holds it (is on its trace), and
//! to none once it has made [`MAX_HOPS`] Coffer-to-Coffer hops (design.md §2.5).

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{ConnectionConfig, RouteConfig};

/// A [`Router`] shared by every replicator and replaced whole on reload, so a changed
/// `[[route]]` applies to the next arrival each replicator looks at.
#[derive(Clone, Debug, Default)]
pub struct SharedRouter(std::sync::Arc<std::sync::RwLock<Router>>);

impl SharedRouter {
    pub fn new(router: Router) -> SharedRouter {
        SharedRouter(std::sync::Arc::new(std::sync::RwLock::new(router)))
    }

    /// Swaps in new routes.
    pub fn replace(&self, router: Router) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = router;
    }

    /// See [`Router::sends_to`].
    pub fn sends_to(&self, connection: &str, listener: &str, trace: &[String], hops: u32) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .sends_to(connection, listener, trace, hops)
    }
}

/// Most Coffer-to-Coffer hops an arrival makes; past it, it is archived and not forwarded.
pub const MAX_HOPS: u32 = 8;

/// Routes and the peer of each connection, from one configuration.
#[derive(Clone, Debug, Default)]
pub struct Router {
    routes: Vec<RouteConfig>,
    /// connection name → peer node name
    peers: BTreeMap<String, String>,
}

impl Router {
    pub fn new(routes: &[RouteConfig], connections: &[ConnectionConfig]) -> Router {
        Router {
            routes: routes.to_vec(),
            peers: connections
                .iter()
                .map(|c| (c.name.clone(), c.peer.clone()))
                .collect(),
        }
    }

    /// The connections to forward to. `listener` is where the arrival came in on this
    /// node, `trace` the nodes holding it, `hops` the hops an onward copy would have made
    /// before reaching the next node.
    pub fn forward(&self, listener: &str, trace: &[String], hops: u32) -> BTreeSet<String> {
        if hops >= MAX_HOPS {
            return BTreeSet::new();
        }
        self.routes
            .iter()
            .filter(|r| r.from.iter().any(|f| f == listener))
            .flat_map(|r| r.forward.iter())
            .filter(|c| {
                self.peers
                    .get(*c)
                    .is_some_and(|peer| !trace.iter().any(|t| t == peer))
            })
            .cloned()
            .collect()
    }

    /// Whether `connection` is among [`Router::forward`]'s answer.
    pub fn sends_to(&self, connection: &str, listener: &str, trace: &[String], hops: u32) -> bool {
        self.forward(listener, trace, hops).contains(connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(from: &[&str], forward: &[&str]) -> RouteConfig {
        RouteConfig {
            from: from.iter().map(|s| (*s).to_owned()).collect(),
            archive: true,
            forward: forward.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn conn(name: &str, peer: &str) -> ConnectionConfig {
        ConnectionConfig {
            name: name.into(),
            peer: peer.into(),
            target: "127.0.0.1:1".into(),
            source: None,
            max_retries: 0,
            queue_limit: 100_000,
            sessions: 1,
            probe_interval: std::time::Duration::from_secs(5),
            tls: None,
        }
    }

    #[test]
    fn routing_table() {
        // Node b of a mesh a-b-c: journal and milter go to both others; replicas from the
        // ha listener go on to whoever does not have them yet.
        let router = Router::new(
            &[
                route(&["journal", "milter"], &["to-a", "to-c"]),
                route(&["ha"], &["to-a", "to-c"]),
                route(&["import"], &[]),
                route(&["journal"], &["to-c"]),
            ],
            &[conn("to-a", "a"), conn("to-c", "c")],
        );
        let t = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let cases: &[(&str, Vec<String>, u32, &[&str])] = &[
            ("journal", t(&["b"]), 0, &["to-a", "to-c"]),
            ("milter", t(&["b"]), 0, &["to-a", "to-c"]),
            ("import", t(&["b"]), 0, &[]),
            ("unknown", t(&["b"]), 0, &[]),
            // From a: c still needs it, a has it.
            ("ha", t(&["a", "b"]), 1, &["to-c"]),
            // Everyone has it: a loop stops here.
            ("ha", t(&["a", "c", "b"]), 2, &[]),
            // An empty trace (a record from before traces) still routes.
            ("journal", t(&[]), 0, &["to-a", "to-c"]),
            // The hop limit.
            ("ha", t(&["x"]), MAX_HOPS - 1, &["to-a", "to-c"]),
            ("ha", t(&["x"]), MAX_HOPS, &[]),
        ];
        for (listener, trace, hops, want) in cases {
            let got = router.forward(listener, trace, *hops);
            let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
            assert_eq!(got, want, "{listener} {trace:?} {hops}");
        }
        assert!(router.sends_to("to-c", "ha", &t(&["a"]), 1));
        assert!(!router.sends_to("to-a", "ha", &t(&["a"]), 1));
    }

    #[test]
    fn a_route_to_an_unknown_connection_sends_nothing() {
        let router = Router::new(&[route(&["journal"], &["gone"])], &[]);
        assert!(router.forward("journal", &[], 0).is_empty());
    }
    #[test]
    fn a_shared_router_is_replaced_for_every_clone() {
        let shared = SharedRouter::new(Router::new(
            &[route(&["journal"], &["to-b"])],
            &[conn("to-b", "b")],
        ));
        let replicator_view = shared.clone();
        assert!(replicator_view.sends_to("to-b", "journal", &[], 0));
        shared.replace(Router::new(
            &[route(&["journal"], &[])],
            &[conn("to-b", "b")],
        ));
        assert!(!replicator_view.sends_to("to-b", "journal", &[], 0));
    }
}
