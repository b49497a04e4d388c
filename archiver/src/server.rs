//! Runs the daemon: store, listeners, signals, shutdown.
//!
//! # Lifecycle (docs/lifecycle.md)
//! 1. Open the store (recovering it after a crash) and start its writer thread.
//! 2. Bind every listener; only then tell systemd `READY=1`.
//! 3. Serve until SIGTERM or SIGINT. SIGHUP re-reads and checks the configuration.
//! 4. On shutdown: stop accepting; idle sessions get 421, a session in DATA finishes its
//!    message; then the store writer drains (every accepted message is answered and
//!    committed) and the process exits 0.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigSource};
use crate::metrics::{CountingSink, Metrics};
use crate::smtp::{Listener, Sink};
use crate::store::{Incoming, IngestError, Receipt, Store, StoreHandle, StoreOptions};

impl Sink for StoreHandle {
    fn ingest(
        &self,
        msg: Incoming,
    ) -> Pin<Box<dyn Future<Output = Result<Receipt, IngestError>> + Send + '_>> {
        Box::pin(StoreHandle::ingest(self, msg))
    }

    fn node(&self) -> &str {
        StoreHandle::node(self)
    }

    fn epoch(&self) -> &str {
        StoreHandle::epoch(self)
    }
}

/// The store options a configuration asks for.
pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        data_dir: config.node.data_dir.clone(),
        node: config.node.name.clone(),
        segment_size: config.store.segment_size,
        max_pending: config.store.max_pending,
        min_free_disk: config.store.min_free_disk,
    }
}

/// Runs `cofferd` in the foreground until SIGTERM/SIGINT.
///
/// # Errors
/// Opening the store or binding a listener failed.
pub fn run_blocking(config: Config) -> anyhow::Result<()> {
    let store = Store::open(store_options(&config))
        .with_context(|| format!("opening the store in {}", config.node.data_dir.display()))?;
    info!(
        node = %config.node.name,
        epoch = %store.handle().epoch(),
        data_dir = %config.node.data_dir.display(),
        "store open"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cofferd")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(config, store.handle()));
    drop(runtime);
    info!("listeners stopped; draining the store writer");
    store.close();
    info!("cofferd stopped");
    result
}

async fn serve(config: Config, handle: StoreHandle) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let bound = Listener::bind(Arc::new(l.clone()))?;
        info!(listener = %l.name, bind = %l.bind, protocol = %l.protocol, "listening");
        listeners.push(bound);
    }
    let console = match &config.console {
        Some(c) => Some(
            tokio::net::TcpListener::bind(c.bind)
                .await
                .with_context(|| format!("binding the console on {}", c.bind))?,
        ),
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new(
        config.listeners.iter().map(|l| l.name.as_str()),
    ));
    let sink: Arc<dyn Sink> = Arc::new(CountingSink {
        store: handle.clone(),
        metrics: metrics.clone(),
    });
    let hostname = config.node.name.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let (sink, hostname, stop) = (sink.clone(), hostname.clone(), stop_rx.clone());
        let name = l.config().name.clone();
        tasks.spawn(async move {
            if let Err(e) = l.serve(sink, hostname, stop).await {
                error!(listener = %name, error = %e, "listener failed");
            }
        });
    }
    drop(sink);
    if let Some(listener) = console {
        tasks.spawn(crate::console::serve(
            listener,
            handle,
            metrics,
            stop_rx.clone(),
        ));
    }
    notify_ready();

    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => reload(&config),
            Some(_) = tasks.join_next() => {
                if tasks.is_empty() {
                    warn!("every listener stopped; shutting down");
                    break;
                }
            }
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn signal(kind: tokio::signal::unix::SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("installing a signal handler")
}

fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        warn!(error = %e, "could not notify systemd");
    }
    info!("ready");
}

/// SIGHUP: re-reads and checks the configuration, and says what it would change.
///
/// Settings are not yet swapped into running listeners: the log says so, and which
/// changes need a restart in any case.
fn reload(current: &Config) {
    let explicit = match &current.source {
        ConfigSource::File(p) => Some(p.as_path()),
        ConfigSource::Embedded => None,
    };
    match config::load(explicit) {
        Ok(new) => {
            for w in config::check(&new) {
                warn!("configuration: {w}");
            }
            for change in config::reload_diff(current, &new) {
                warn!("reload: {change}: takes effect after a restart");
            }
            info!("SIGHUP: configuration re-read and valid; live changes take effect after a restart in this version");
        }
        Err(e) => error!("SIGHUP: the configuration has errors and was not applied: {e}"),
    }
}
