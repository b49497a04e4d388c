//! Runs the daemon: store, listeners, signals, shutdown.
//!
//! # Lifecycle (docs/lifecycle.md)
//! 1. Open the store (recovering it after a crash) and start its writer thread.
//! 2. Bind every listener; only then tell systemd `READY=1`.
//! 3. Serve until SIGTERM or SIGINT. SIGHUP re-reads the configuration from the same
//!    source and applies what can change live (see [`apply_reload`]); what needs a
//!    restart is logged.
//! 4. On shutdown: stop accepting; idle sessions get 421, a session in DATA finishes its
//!    message; then the store writer drains (every accepted message is answered and
//!    committed) and the process exits 0.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{self, Config, ConfigSource, ListenerConfig};
use crate::ingest::ListenerSink;
use crate::metrics::Metrics;
use crate::smtp::{Listener, Reloader, Sink};
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
        compaction: crate::store::compact::CompactOptions {
            block_size: config.store.block_size,
            level: config.store.block_level,
            dictionary: config.store.dictionary,
        },
        background_compaction: false,
    }
}

/// Runs `cofferd` in the foreground until SIGTERM/SIGINT.
///
/// # Errors
/// Opening the store or binding a listener failed.
pub fn run_blocking(config: Config) -> anyhow::Result<()> {
    let store = Store::open(StoreOptions {
        background_compaction: true,
        ..store_options(&config)
    })
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
    // Without the control socket the daemon still archives; only CLI commands that need
    // the daemon are unavailable, so a failure here is loud but not fatal.
    let control = crate::control::ControlSocket::bind(&config.node.data_dir)
        .map_err(|e| {
            error!(
                data_dir = %config.node.data_dir.display(),
                error = %e,
                "no control socket: `coffer` commands that need the daemon will not work"
            );
        })
        .ok();
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new(
        config.listeners.iter().map(|l| l.name.as_str()),
    ));
    let budget = crate::smtp::Budget::new(config.store.max_pending);
    let sink: Arc<dyn Sink> = Arc::new(ListenerSink {
        store: handle.clone(),
        metrics: metrics.clone(),
        budget: budget.clone(),
    });
    let hostname = config.node.name.clone();
    let mut tasks = tokio::task::JoinSet::new();
    // One replicator per connection (docs/replication.md).
    let router = crate::route::SharedRouter::new(crate::route::Router::new(
        &config.routes,
        &config.connections,
    ));
    let replication = Arc::new(crate::relay::Replication::default());
    let mut replicators = Replicators {
        node: config.node.name.clone(),
        store: handle.clone(),
        router: router.clone(),
        shared: replication.clone(),
        running: std::collections::BTreeMap::new(),
    };
    for c in &config.connections {
        replicators.start(c, &mut tasks);
    }
    let _ = metrics.replication.set(replication.clone());
    let reloaders: Vec<Reloader> = listeners.iter().map(Listener::reloader).collect();
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
            handle.clone(),
            metrics,
            stop_rx.clone(),
        ));
    }
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel(1);
    let described: Vec<serde_json::Value> = config
        .listeners
        .iter()
        .map(|l| {
            serde_json::json!({"name": l.name, "protocol": l.protocol.to_string(), "bind": l.bind.to_string()})
        })
        .collect();
    if let Some(control) = control {
        tasks.spawn(control.serve(
            handle.clone(),
            described,
            replication.clone(),
            reload_tx,
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
            _ = hup.recv() => reload(&config, &reloaders, &handle, &budget, &mut replicators, &mut tasks),
            Some(()) = reload_rx.recv() => {
                info!("reload requested on the control socket");
                reload(&config, &reloaders, &handle, &budget, &mut replicators, &mut tasks);
            }
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
    replicators.stop_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The running replicators, one per `[[connection]]`, and what a reload may change.
struct Replicators {
    node: String,
    store: StoreHandle,
    router: crate::route::SharedRouter,
    /// What the control socket and `/metrics` see.
    shared: Arc<crate::relay::Replication>,
    /// connection name → its replicator
    running: std::collections::BTreeMap<String, Running>,
}

/// One running replicator: its settings, its stop switch, its TLS client configuration.
struct Running {
    config: crate::config::ConnectionConfig,
    stop: watch::Sender<bool>,
    tls: Option<crate::tls::Shared<rustls::ClientConfig>>,
}

type ClientTls = Option<Arc<rustls::ClientConfig>>;

/// The TLS client configuration of `c`, read from its files now; `Err` is logged.
fn load_client_tls(c: &crate::config::ConnectionConfig) -> Result<ClientTls, ()> {
    let Some(t) = &c.tls else {
        return Ok(None);
    };
    crate::tls::client_config(t).map(Some).map_err(|e| {
        error!(connection = %c.name, error = %e, "TLS files cannot be used");
    })
}

impl Replicators {
    /// Starts the replicator of `c`; not when its TLS files cannot be used (logged).
    fn start(&mut self, c: &crate::config::ConnectionConfig, tasks: &mut tokio::task::JoinSet<()>) {
        let Ok(tls) = load_client_tls(c) else {
            error!(connection = %c.name, "replicator not started: fix the TLS files and reload");
            return;
        };
        self.start_with(c, tls, tasks);
    }

    fn start_with(
        &mut self,
        c: &crate::config::ConnectionConfig,
        tls: ClientTls,
        tasks: &mut tokio::task::JoinSet<()>,
    ) {
        let tls = tls.map(crate::tls::Shared::new);
        let (r, h) = crate::relay::Replicator::new(
            c.clone(),
            self.node.clone(),
            self.store.clone(),
            self.router.clone(),
            tls.clone(),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        tasks.spawn(r.run(stop_rx));
        self.shared.upsert(h);
        self.running.insert(
            c.name.clone(),
            Running {
                config: c.clone(),
                stop: stop_tx,
                tls,
            },
        );
    }

    fn stop(&mut self, name: &str) {
        if let Some(r) = self.running.remove(name) {
            let _ = r.stop.send(true);
        }
    }

    fn stop_all(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name);
        }
    }

    /// Makes the running replicators match `new`'s connections (removed ones stop,
    /// changed ones restart with their new settings from their durable cursor, new ones
    /// start), reads the TLS files of every connection with `tls` again (new sessions use
    /// them), and swaps in `new`'s routes. TLS files that cannot be used are logged and
    /// change nothing: an unchanged or changed connection keeps running as it was, a new
    /// one does not start.
    fn apply(&mut self, new: &Config, tasks: &mut tokio::task::JoinSet<()>) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !new.connections.iter().any(|c| &c.name == *name))
            .cloned()
            .collect();
        for name in gone {
            info!(connection = %name, "reload: connection removed; its replicator stops");
            self.stop(&name);
            self.shared.remove(&name);
        }
        self.router
            .replace(crate::route::Router::new(&new.routes, &new.connections));
        for c in &new.connections {
            let Ok(tls) = load_client_tls(c) else {
                warn!(connection = %c.name,
                    "reload: connection left as it was (its TLS files cannot be used)");
                continue;
            };
            match self.running.get(&c.name) {
                Some(old) if format!("{:?}", old.config) == format!("{c:?}") => {
                    if let (Some(shared), Some(tls)) = (&old.tls, tls) {
                        shared.set(tls);
                        info!(connection = %c.name, "reload: TLS files read again");
                    }
                }
                Some(_) => {
                    info!(connection = %c.name, "reload: connection changed; its replicator restarts");
                    self.stop(&c.name);
                    self.start_with(c, tls, tasks);
                }
                None => {
                    info!(connection = %c.name, "reload: connection added; its replicator starts");
                    self.start_with(c, tls, tasks);
                }
            }
        }
    }
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

/// SIGHUP: re-reads the configuration from where it came (the same file, or the
/// embedded default), validates it, and applies it ([`apply_reload`]). An invalid
/// configuration changes nothing.
fn reload(
    running: &Config,
    listeners: &[Reloader],
    store: &StoreHandle,
    budget: &crate::smtp::Budget,
    replicators: &mut Replicators,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let loaded = match &running.source {
        ConfigSource::File(p) => config::load_file(p),
        ConfigSource::Embedded => {
            config::from_toml(config::embedded_toml(), ConfigSource::Embedded)
        }
    };
    let new = match loaded {
        Ok(new) => new,
        Err(e) => {
            error!("SIGHUP: the configuration has errors and was not applied: {e}");
            return;
        }
    };
    for w in config::check(&new) {
        warn!("configuration: {w}");
    }
    store.set_limits(new.store.max_pending, new.store.min_free_disk);
    budget.set_max(new.store.max_pending);
    replicators.apply(&new, tasks);
    for change in apply_reload(running, &new, listeners) {
        warn!("reload: {change}: needs a restart");
    }
    info!(source = %new.source_name(), "SIGHUP: configuration reloaded");
}

/// Applies `new` to the running daemon, started with `running`, and returns what it
/// cannot apply (one line each, for the "needs a restart" log).
///
/// Applied: each running listener takes the settings of the listener of the same name
/// in `new` (`allow`, `trusted_proxies`, `proxy_protocol`, `max_message_size`,
/// `max_recipients`, `max_connections`, `idle_timeout`, `trust_xcoffer`, `tls`) for the
/// connections it accepts from then on; sessions already running keep theirs. A listener
/// with `tls` reads its TLS files again, changed or not ([`Reloader::apply`]). A listener
/// whose `bind` or `protocol` changed keeps its socket and protocol and takes the rest.
///
/// Not applied (returned): [`config::reload_diff`] (`[node]`, listeners added, removed or
/// rebound, the store's file layout, `[console]`). `[store] max_pending`/`min_free_disk`,
/// `[[route]]`s and `[[connection]]`s are applied live by the caller
/// ([`StoreHandle::set_limits`], [`Replicators::apply`]).
pub fn apply_reload(running: &Config, new: &Config, listeners: &[Reloader]) -> Vec<String> {
    let restart = config::reload_diff(running, new);
    let (os, ns) = (&running.store, &new.store);
    for (key, a, b) in [
        ("max_pending", os.max_pending, ns.max_pending),
        ("min_free_disk", os.min_free_disk, ns.min_free_disk),
    ] {
        // Applied live by the caller (`StoreHandle::set_limits`).
        if a != b {
            info!(
                "reload: [store] {key} changed from {} to {}",
                config::units::format_size(a),
                config::units::format_size(b)
            );
        }
    }
    for reloader in listeners {
        let current = reloader.current();
        let Some(wanted) = new.listeners.iter().find(|l| l.name == current.name) else {
            continue; // removed: reload_diff says so
        };
        let changed = live_changes(&current, wanted);
        // A listener with TLS takes its files again even when its settings are the same.
        if changed.is_empty() && wanted.tls.is_none() {
            continue;
        }
        // The socket stays as bound: bind and protocol changes are in reload_diff.
        let next = ListenerConfig {
            bind: current.bind.clone(),
            protocol: current.protocol.clone(),
            socket_mode: current.socket_mode,
            socket_group: current.socket_group.clone(),
            ..wanted.clone()
        };
        match reloader.apply(Arc::new(next)) {
            Ok(_) if changed.is_empty() => info!(listener = %current.name,
                "reload: TLS files read again for new connections"),
            Ok(_) => info!(listener = %current.name, changed = %changed.join(", "),
                "reload: new settings apply to new connections"),
            Err(e) => error!("reload: {e}"),
        }
    }
    restart
}

/// The settings a reload can change that differ between `old` and `new`, by key.
fn live_changes(old: &ListenerConfig, new: &ListenerConfig) -> Vec<&'static str> {
    let tls = |t: &Option<config::ListenerTls>| {
        t.as_ref().map(|t| {
            (
                t.cert.clone(),
                t.key.clone(),
                t.required,
                t.require_client_cert,
                t.client_ca.clone(),
            )
        })
    };
    [
        ("allow", old.allow != new.allow),
        (
            "trusted_proxies",
            old.trusted_proxies != new.trusted_proxies,
        ),
        ("proxy_protocol", old.proxy_protocol != new.proxy_protocol),
        (
            "max_message_size",
            old.max_message_size != new.max_message_size,
        ),
        ("max_recipients", old.max_recipients != new.max_recipients),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        ("idle_timeout", old.idle_timeout != new.idle_timeout),
        ("trust_xcoffer", old.trust_xcoffer != new.trust_xcoffer),
        ("tls", tls(&old.tls) != tls(&new.tls)),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        config::from_toml(text, ConfigSource::File("/etc/coffer/test.toml".into())).unwrap()
    }

    fn file(journal: &str, extra: &str) -> String {
        format!(
            r#"[node]
name = "n1"
data_dir = "/tmp/coffer-reload-test"
{extra}
[[listener]]
name = "journal"
bind = "127.0.0.1:0"
{journal}

[[listener]]
name = "other"
bind = "127.0.0.1:0"

[[route]]
from = ["journal", "other"]
"#
        )
    }

    #[test]
    fn sighup_applies_listener_settings_and_lists_what_needs_a_restart() {
        let running = parse(&file(r#"allow = ["10.0.0.0/8"]"#, ""));
        let bound: Vec<Listener> = running
            .listeners
            .iter()
            .map(|l| Listener::bind(Arc::new(l.clone())).unwrap())
            .collect();
        let reloaders: Vec<Reloader> = bound.iter().map(Listener::reloader).collect();

        let new = parse(&file(
            r#"allow = ["127.0.0.0/8"]
proxy_protocol = true
trusted_proxies = ["192.0.2.0/24"]
max_connections = 7
idle_timeout = "9s""#,
            "[store]\nmax_pending = \"1MiB\"\n",
        ));
        let restart = apply_reload(&running, &new, &reloaders);
        // The store limits are applied live by `reload`, not listed as needing a restart.
        assert!(restart.is_empty(), "{restart:?}");
        let journal = reloaders[0].current();
        assert_eq!(journal.allow, vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(journal.proxy_protocol);
        assert_eq!(
            journal.trusted_proxies,
            vec!["192.0.2.0/24".parse().unwrap()]
        );
        assert_eq!(journal.max_connections, 7);
        assert_eq!(journal.idle_timeout, std::time::Duration::from_secs(9));
        assert_eq!(
            live_changes(&running.listeners[1], &reloaders[1].current()),
            Vec::<&str>::new()
        );

        // Rebound and removed listeners need a restart; the rebound one still takes the
        // rest of its settings, on its old socket.
        let mut moved = new.clone();
        moved.listeners[0].bind = config::BindAddr::Tcp("127.0.0.1:1".parse().unwrap());
        moved.listeners[0].max_recipients = 3;
        moved.listeners.truncate(1);
        let restart = apply_reload(&running, &moved, &reloaders);
        assert!(
            restart.iter().any(|r| r.contains("`journal` bind")),
            "{restart:?}"
        );
        assert!(restart
            .iter()
            .any(|r| r.contains("`other`") && r.contains("removed")));
        let journal = reloaders[0].current();
        assert_eq!(journal.max_recipients, 3);
        assert_eq!(journal.bind, running.listeners[0].bind);
    }
}
