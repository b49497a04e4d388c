//! Prometheus metrics: counters kept by the daemon, rendered as text for `/metrics`.
//!
//! Per-listener counters are counted where a listener hands a message to the store
//! ([`ListenerSink`](crate::ingest::ListenerSink)); store totals, batch sizes, commit latency and errors come from the
//! store's own [`StoreStats`](crate::store::stats::StoreStats).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::smtp::ConnRefusal;
use crate::store::stats::Histogram;
use crate::store::{IngestError, Receipt, StoreHandle};

/// Why a listener refused a message, as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_pending` reached (451 4.3.2).
    Busy,
    /// Free disk under `min_free_disk`, or ENOSPC (452 4.3.1).
    DiskFull,
    /// The store failed and is reopening (451 4.3.0).
    Unavailable,
    /// The daemon is stopping (421).
    ShuttingDown,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Busy,
        Refusal::DiskFull,
        Refusal::Unavailable,
        Refusal::ShuttingDown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Busy => "max_pending",
            Refusal::DiskFull => "disk_full",
            Refusal::Unavailable => "store_failed",
            Refusal::ShuttingDown => "shutting_down",
        }
    }

    fn of(e: &IngestError) -> Refusal {
        match e {
            IngestError::Busy => Refusal::Busy,
            IngestError::DiskFull => Refusal::DiskFull,
            IngestError::ShuttingDown => Refusal::ShuttingDown,
            _ => Refusal::Unavailable,
        }
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// Messages durably archived (new arrivals).
    pub messages: AtomicU64,
    /// Bytes of those messages.
    pub bytes: AtomicU64,
    /// Retries of arrivals already stored (acknowledged, nothing added).
    pub repeats: AtomicU64,
    refusals: [AtomicU64; 4],
    connections_refused: [AtomicU64; 2],
}

impl ListenerCounters {
    pub fn refusals(&self, r: Refusal) -> u64 {
        self.refusals[r as usize].load(Ordering::Relaxed)
    }

    pub fn connections_refused(&self, r: ConnRefusal) -> u64 {
        self.connections_refused[r as usize].load(Ordering::Relaxed)
    }
}

/// Every counter the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    listeners: BTreeMap<String, ListenerCounters>,
    /// Milliseconds from the store's hand-off to its answer, per message.
    pub ingest_ms: Histogram<10>,
    /// The replicators, once started (`coffer_replication_*`).
    pub replication: std::sync::OnceLock<std::sync::Arc<crate::relay::Replication>>,
}

impl Metrics {
    /// Counters for these listener names (fixed for the daemon's life).
    pub fn new<'a>(listeners: impl IntoIterator<Item = &'a str>) -> Metrics {
        Metrics {
            listeners: listeners
                .into_iter()
                .map(|n| (n.to_owned(), ListenerCounters::default()))
                .collect(),
            ingest_ms: Histogram::new([1, 2, 5, 10, 20, 50, 100, 250, 1000, 5000]),
            replication: std::sync::OnceLock::new(),
        }
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerCounters> {
        self.listeners.get(name)
    }

    /// Counts one hand-off to the store and its outcome.
    pub fn record(&self, listener: &str, bytes: u64, result: &Result<Receipt, IngestError>) {
        let Some(c) = self.listeners.get(listener) else {
            return;
        };
        match result {
            Ok(r) if r.repeat => {
                c.repeats.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                c.messages.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                c.refusals[Refusal::of(e) as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a message refused before it reached the store (a session over the memory
    /// budget).
    pub fn refusal(&self, listener: &str, e: &IngestError) {
        if let Some(c) = self.listeners.get(listener) {
            c.refusals[Refusal::of(e) as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection turned away before its session (allow-list, connection limit).
    pub fn connection_refused(&self, listener: &str, r: ConnRefusal) {
        if let Some(c) = self.listeners.get(listener) {
            c.connections_refused[r as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, store: &StoreHandle) -> String {
        let mut out = String::with_capacity(4096);
        let s = store.stats();
        let compaction = store.compaction_status();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            &mut out,
            "coffer_received_messages_total",
            "counter",
            "Messages archived, by listener (new arrivals).",
        );
        for (name, c) in &self.listeners {
            let _ = writeln!(
                out,
                "coffer_received_messages_total{{listener=\"{name}\"}} {}",
                get(&c.messages)
            );
        }
        family(
            &mut out,
            "coffer_received_bytes_total",
            "counter",
            "Bytes of messages archived, by listener.",
        );
        for (name, c) in &self.listeners {
            let _ = writeln!(
                out,
                "coffer_received_bytes_total{{listener=\"{name}\"}} {}",
                get(&c.bytes)
            );
        }
        family(
            &mut out,
            "coffer_repeats_total",
            "counter",
            "Retries of arrivals already stored, by listener.",
        );
        for (name, c) in &self.listeners {
            let _ = writeln!(
                out,
                "coffer_repeats_total{{listener=\"{name}\"}} {}",
                get(&c.repeats)
            );
        }
        family(
            &mut out,
            "coffer_refusals_total",
            "counter",
            "Messages refused with a temporary error, by listener and reason.",
        );
        for (name, c) in &self.listeners {
            for r in Refusal::ALL {
                let _ = writeln!(
                    out,
                    "coffer_refusals_total{{listener=\"{name}\",reason=\"{}\"}} {}",
                    r.label(),
                    c.refusals(r)
                );
            }
        }
        family(
            &mut out,
            "coffer_connections_refused_total",
            "counter",
            "Connections turned away before a session, by listener and reason.",
        );
        for (name, c) in &self.listeners {
            for r in ConnRefusal::ALL {
                let _ = writeln!(
                    out,
                    "coffer_connections_refused_total{{listener=\"{name}\",reason=\"{}\"}} {}",
                    r.label(),
                    c.connections_refused(r)
                );
            }
        }
        for (metric, help, v) in [
            (
                "coffer_store_messages",
                "Distinct messages in the store.",
                get(&s.messages),
            ),
            (
                "coffer_store_arrivals",
                "Arrivals in the store.",
                get(&s.arrivals),
            ),
            (
                "coffer_store_raw_bytes",
                "Bytes of the distinct messages as received.",
                get(&s.raw_bytes),
            ),
            (
                "coffer_store_stored_bytes",
                "Bytes the messages take in the log.",
                get(&s.stored_bytes),
            ),
            (
                "coffer_pending_bytes",
                "Bytes accepted and not yet committed (max_pending budget in use).",
                store.pending_bytes(),
            ),
            (
                "coffer_free_disk_bytes",
                "Free disk in data_dir, as last measured.",
                store.free_disk(),
            ),
            (
                "coffer_store_failed",
                "1 while the store is failed and reopening (ingest answers 451).",
                u64::from(store.failed()),
            ),
            (
                "coffer_low_disk",
                "1 while free disk is under min_free_disk (ingest answers 452).",
                u64::from(store.low_disk()),
            ),
            (
                "coffer_compaction_running",
                "1 while the compactor rewrites a sealed segment.",
                u64::from(compaction.running),
            ),
            (
                "coffer_compaction_segments_waiting",
                "Sealed segments not compacted yet, as last counted.",
                compaction.segments_waiting,
            ),
        ] {
            family(&mut out, metric, "gauge", help);
            let _ = writeln!(out, "{metric} {v}");
        }
        family(
            &mut out,
            "coffer_compaction_segments_total",
            "counter",
            "Sealed segments compacted since the daemon started.",
        );
        let _ = writeln!(
            out,
            "coffer_compaction_segments_total {}",
            compaction.segments_compacted
        );
        family(
            &mut out,
            "coffer_compaction_bytes_total",
            "counter",
            "Bytes of segments compacted (in) and of the compacted segments written (out).",
        );
        let _ = writeln!(
            out,
            "coffer_compaction_bytes_total{{dir=\"in\"}} {}",
            compaction.bytes_in
        );
        let _ = writeln!(
            out,
            "coffer_compaction_bytes_total{{dir=\"out\"}} {}",
            compaction.bytes_out
        );
        family(
            &mut out,
            "coffer_store_repeats_total",
            "counter",
            "Retries of arrivals already stored, all listeners.",
        );
        let _ = writeln!(out, "coffer_store_repeats_total {}", get(&s.repeats));
        family(
            &mut out,
            "coffer_store_errors_total",
            "counter",
            "Store I/O errors, by kind.",
        );
        for (kind, v) in [
            ("append", get(&s.errors_append)),
            ("sync", get(&s.errors_sync)),
            ("commit", get(&s.errors_commit)),
        ] {
            let _ = writeln!(out, "coffer_store_errors_total{{kind=\"{kind}\"}} {v}");
        }
        family(
            &mut out,
            "coffer_store_reopens_total",
            "counter",
            "Times the store was reopened after a failure.",
        );
        let _ = writeln!(out, "coffer_store_reopens_total {}", get(&s.reopens));
        histogram(
            &mut out,
            "coffer_commit_batch_messages",
            "Messages per group commit.",
            &s.batch_messages,
            1.0,
        );
        histogram(
            &mut out,
            "coffer_commit_seconds",
            "Duration of a group commit of the log (append, fdatasync): what a 250 waits for.",
            &s.commit_us,
            1e6,
        );
        histogram(
            &mut out,
            "coffer_index_commit_seconds",
            "Duration of an index transaction (it may cover several log commits); replicators \
             see an arrival once it is indexed.",
            &s.index_commit_us,
            1e6,
        );
        histogram(
            &mut out,
            "coffer_ingest_seconds",
            "From hand-off to the store until it answered, per message.",
            &self.ingest_ms,
            1e3,
        );
        if let Some(r) = self.replication.get() {
            render_replication(&mut out, &r.statuses());
        }
        out
    }
}

/// Name, kind, help, value of one per-connection metric.
type ConnMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::relay::ConnStatus) -> u64,
);

fn render_replication(out: &mut String, conns: &[crate::relay::ConnStatus]) {
    let gauges: [ConnMetric; 5] = [
        (
            "coffer_replication_lag_arrivals",
            "gauge",
            "Arrivals past the connection's cursor.",
            |c| c.lag_arrivals,
        ),
        (
            "coffer_replication_lag_bytes",
            "gauge",
            "Bytes of arrivals loaded for shipping and not yet acknowledged.",
            |c| c.lag_bytes,
        ),
        (
            "coffer_replication_parked",
            "gauge",
            "Arrivals the peer refused, waiting for `coffer queue retry|skip`.",
            |c| c.parked,
        ),
        (
            "coffer_replication_shipped_total",
            "counter",
            "Arrivals the peer acknowledged.",
            |c| c.shipped,
        ),
        (
            "coffer_replication_lag_alarm",
            "gauge",
            "1 while the lag is over queue_limit (nothing is dropped).",
            |c| u64::from(c.lag_alarm),
        ),
    ];
    for (name, kind, help, get) in gauges {
        family(out, name, kind, help);
        for c in conns {
            let _ = writeln!(out, "{name}{{connection=\"{}\"}} {}", c.name, get(c));
        }
    }
    family(
        out,
        "coffer_replication_up",
        "gauge",
        "1 while the last session to the peer worked.",
    );
    for c in conns {
        let _ = writeln!(
            out,
            "coffer_replication_up{{connection=\"{}\"}} {}",
            c.name,
            u8::from(c.state == "up")
        );
    }
    family(
        out,
        "coffer_replication_failures_total",
        "counter",
        "Failed shipping attempts, by kind (connect, wrong_peer, temporary, permanent).",
    );
    for c in conns {
        for kind in ["connect", "wrong_peer", "temporary", "permanent"] {
            let n = c.failures.get(kind).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "coffer_replication_failures_total{{connection=\"{}\",kind=\"{kind}\"}} {n}",
                c.name
            );
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[allow(clippy::cast_precision_loss)]
fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    h: &Histogram<N>,
    per_unit: f64,
) {
    family(out, name, "histogram", help);
    for (bound, count) in h.cumulative() {
        match bound {
            Some(b) => {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{le=\"{}\"}} {count}",
                    b as f64 / per_unit
                );
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
            }
        }
    }
    let _ = writeln!(
        out,
        "{name}_sum {}",
        h.sum.load(Ordering::Relaxed) as f64 / per_unit
    );
    let _ = writeln!(out, "{name}_count {}", h.count.load(Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::envelope::{Envelope, SessionInfo};
    use crate::ingest::ListenerSink;
    use crate::smtp::Sink;
    use crate::store::fault::FaultVfs;
    use crate::store::Incoming;
    use crate::store::{Store, StoreOptions};

    fn incoming(body: &[u8]) -> Incoming {
        Incoming {
            bytes: body.to_vec(),
            envelope: Envelope {
                mail_from: "a@x".into(),
                mail_params: vec![],
                rcpt_to: vec!["b@y".into()],
            },
            session: SessionInfo {
                listener: "journal".into(),
                ..SessionInfo::default()
            },
        }
    }

    #[tokio::test]
    async fn counters_equal_what_was_sent() {
        let store = Store::open_with(
            Arc::new(FaultVfs::new()),
            StoreOptions {
                data_dir: "/m".into(),
                node: "n".into(),
                segment_size: 1 << 20,
                max_pending: 1 << 20,
                min_free_disk: 0,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new(["journal", "ha"]));
        let sink = ListenerSink {
            store: store.handle(),
            metrics: metrics.clone(),
            budget: crate::smtp::Budget::new(1 << 20),
        };
        sink.ingest(incoming(b"Subject: 1\r\n\r\nx\r\n"))
            .await
            .unwrap();
        sink.ingest(incoming(b"Subject: 2\r\n\r\nyy\r\n"))
            .await
            .unwrap();
        sink.ingest(incoming(b"Subject: 2\r\n\r\nyy\r\n"))
            .await
            .unwrap();
        sink.connection_refused("journal", crate::smtp::ConnRefusal::NotAllowed);
        sink.connection_refused("journal", crate::smtp::ConnRefusal::NotAllowed);
        sink.connection_refused("ha", crate::smtp::ConnRefusal::MaxConnections);
        // Store totals are published when the index commits, a moment after the answers.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let stats = |h: &StoreHandle| {
            let s = h.stats();
            (
                s.arrivals.load(Ordering::Relaxed),
                s.repeats.load(Ordering::Relaxed),
            )
        };
        while matches!(stats(&store.handle()), (a, r) if a < 2 || r < 1)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let text = metrics.render(&store.handle());
        for line in [
            "coffer_received_messages_total{listener=\"journal\"} 2",
            "coffer_received_bytes_total{listener=\"journal\"} 35",
            "coffer_repeats_total{listener=\"journal\"} 1",
            "coffer_received_messages_total{listener=\"ha\"} 0",
            "coffer_connections_refused_total{listener=\"journal\",reason=\"not_allowed\"} 2",
            "coffer_connections_refused_total{listener=\"journal\",reason=\"max_connections\"} 0",
            "coffer_connections_refused_total{listener=\"ha\",reason=\"max_connections\"} 1",
            "coffer_store_messages 2",
            "coffer_store_arrivals 2",
            "coffer_store_repeats_total 1",
            "coffer_commit_batch_messages_count 3",
            "coffer_commit_seconds_bucket{le=\"0.05\"} 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
