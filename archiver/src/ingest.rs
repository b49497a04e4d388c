//! What every listener hands its messages to: [`ListenerSink`].
//!
//! It archives the message, counts the outcome per listener, and unwraps Exchange /
//! Microsoft 365 envelope journal reports (docs/journal-reports.md): the report is
//! archived as received, then the original it carries with an arrival whose recipients
//! come from the report — both durable before the client hears 250.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tracing::warn;

use crate::journal;
use crate::metrics::Metrics;
use crate::smtp::{Budget, Sink};
use crate::store::{Incoming, IngestError, Receipt, StoreHandle};

/// The listeners' [`Sink`]: the store's handle, with counting and journal unwrapping.
pub struct ListenerSink {
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    /// What sessions claim message buffers from: `[store] max_pending` bytes.
    pub budget: Arc<Budget>,
}

impl ListenerSink {
    async fn archive(&self, msg: Incoming) -> Result<Receipt, IngestError> {
        let listener = msg.session.listener.clone();
        let bytes = msg.bytes.len() as u64;
        let started = std::time::Instant::now();
        let result = self.store.ingest(msg).await;
        self.metrics
            .ingest_ms
            .observe(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        self.metrics.record(&listener, bytes, &result);
        result
    }
}

/// Whether this arrival came from a peer that already unwrapped it (replication): the
/// original's arrival travels on its own, so unwrapping again would add a duplicate.
fn replicated(msg: &Incoming) -> bool {
    msg.session
        .xcoffer
        .as_ref()
        .is_some_and(|x| x.origin_arrival.is_some())
}

impl Sink for ListenerSink {
    fn node(&self) -> &str {
        self.store.node()
    }

    fn epoch(&self) -> &str {
        self.store.epoch()
    }

    fn budget(&self) -> Option<Arc<Budget>> {
        Some(self.budget.clone())
    }

    fn refused(&self, listener: &str, error: &IngestError) {
        self.metrics.refusal(listener, error);
    }

    fn connection_refused(&self, listener: &str, reason: crate::smtp::ConnRefusal) {
        self.metrics.connection_refused(listener, reason);
    }

    fn ingest(
        &self,
        msg: Incoming,
    ) -> Pin<Box<dyn Future<Output = Result<Receipt, IngestError>> + Send + '_>> {
        Box::pin(async move {
            let original = if replicated(&msg) {
                None
            } else {
                journal::original_arrival(&msg)
            };
            let queue_id = msg.session.queue_id.clone();
            let receipt = self.archive(msg).await?;
            match original {
                None => {}
                Some(Ok(original)) => {
                    // The report is durable; the client hears 250 only once the original
                    // is too (a retry after a failure here is a repeat of the report).
                    self.archive(original).await?;
                }
                Some(Err(e)) => warn!(
                    message = %receipt.message_id,
                    queue_id = queue_id.as_deref().unwrap_or("-"),
                    error = %e,
                    "journal report archived as received; its original could not be unwrapped"
                ),
            }
            Ok(receipt)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, SessionInfo};
    use crate::store::fault::FaultVfs;
    use crate::store::{Query, Store, StoreOptions, StoreReader};

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/journal")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[tokio::test]
    async fn a_journal_report_archives_the_report_and_its_original() {
        let vfs = Arc::new(FaultVfs::new());
        let store = Store::open_with(
            vfs.clone(),
            StoreOptions {
                data_dir: "/j".into(),
                node: "n".into(),
                segment_size: 1 << 20,
                max_pending: 1 << 24,
                min_free_disk: 0,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let sink = ListenerSink {
            store: store.handle(),
            metrics: Arc::new(Metrics::new(["journal"])),
            budget: Budget::new(1 << 24),
        };
        let report = fixture("m365-to-cc-bcc.eml");
        let incoming = Incoming {
            bytes: report.clone(),
            envelope: Envelope {
                mail_from: "MicrosoftExchange@contoso.com".into(),
                mail_params: vec![],
                rcpt_to: vec!["journal@archive.contoso.com".into()],
            },
            session: SessionInfo {
                listener: "journal".into(),
                ..SessionInfo::default()
            },
        };
        let unwrapped = journal::unwrap(&report).unwrap().unwrap();
        let receipt = sink.ingest(incoming.clone()).await.unwrap();
        assert_eq!(receipt.message_id, crate::ids::MessageId::of(&report));
        // A retry is a repeat of both.
        assert!(sink.ingest(incoming).await.unwrap().repeat);
        drop(sink);
        store.close();

        let reader = StoreReader::open_with(vfs, std::path::Path::new("/j")).unwrap();
        let status = reader.status().unwrap();
        assert_eq!(
            (status.messages, status.arrivals, status.repeats),
            (2, 2, 2)
        );
        let original = crate::ids::MessageId::of(&unwrapped.original);
        assert_eq!(reader.read_message(&original).unwrap(), unwrapped.original);
        let arrivals = reader.arrivals(&original).unwrap();
        assert_eq!(arrivals.len(), 1);
        assert_eq!(arrivals[0].rcpt_to, unwrapped.recipients);
        // Search by a BCC recipient named only in the report finds the original.
        let bcc = unwrapped
            .report
            .recipients
            .iter()
            .find(|r| matches!(r.kind, journal::RecipientKind::Bcc));
        let bcc = bcc.expect("the fixture has a Bcc line").addresses[0].clone();
        let found = reader
            .search(&Query {
                to: Some(bcc),
                ..Query::default()
            })
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, original.to_hex());
    }
}
