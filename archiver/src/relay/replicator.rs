//! One connection's replicator: a loop that loads arrivals past the cursor, routes them,
//! ships up to `sessions` at once, parks refusals, and advances the durable cursor by a
//! low-water mark (docs/replication.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::backoff;
use super::client::{SendError, SmtpConn, TlsTo};
use super::{xcoffer_for, Command, ConnHandle, ConnStatus, Deferred, MAX_DEFERRED_SHOWN};
use crate::config::ConnectionConfig;
use crate::ids::MessageId;
use crate::route::SharedRouter;
use crate::store::index::{self, CursorState, StateOp};
use crate::store::{Arrival, IngestError, StoreError, StoreHandle};

/// Most arrivals loaded and waiting to be shipped at once.
const WINDOW: usize = 1024;
/// Most index entries examined in one scan.
const SCAN_MAX: usize = 4096;
/// Most message bytes held by shipping tasks at once (each holds its message whole):
/// memory stays bounded whatever `sessions` is. One message always goes, however big.
const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// Longest wait for one reply or write.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The cursor is written at most this often while shipping (and at once when idle).
const PERSIST_EVERY: Duration = Duration::from_millis(250);
/// Longest sleep of the loop without an event.
const TICK: Duration = Duration::from_millis(500);
/// At most one "deferred" log line per connection this often (the rest are counted in
/// `failures` and listed by `coffer queue`).
const DEFER_LOG_EVERY: Duration = Duration::from_secs(10);

struct Item {
    arrival: Arrival,
    size: u64,
    attempts: u32,
    not_before: Instant,
    in_flight: bool,
    last_error: Option<String>,
}

/// What one shipping task reports.
struct Outcome {
    local: Option<u64>,
    result: Result<(), SendError>,
    /// The session, when it is still usable.
    conn: Option<SmtpConn>,
    /// Set when this task opened a new session: what its EHLO said.
    fresh: Option<Option<(String, String)>>,
    /// A pooled session turned out broken (the peer dropped it): the others are suspect.
    stale_pool: bool,
}

/// The replicator of one connection. Build it with [`Replicator::new`], run it with
/// [`Replicator::run`].
pub struct Replicator {
    cfg: Arc<ConnectionConfig>,
    node: String,
    store: StoreHandle,
    router: SharedRouter,
    status: Arc<Mutex<ConnStatus>>,
    commands: mpsc::Receiver<Command>,
    /// The connection's TLS client configuration, when it has `tls`; a reload may
    /// replace it (new sessions use the new one).
    tls: Option<crate::tls::Shared<rustls::ClientConfig>>,
    // Loop state.
    st: CursorState,
    persisted: CursorState,
    last_persist: Instant,
    /// The cursor write in flight, if any (at most one). It goes through the store's
    /// index stage, which under ingest load takes a while: shipping goes on meanwhile.
    saving: JoinSet<(CursorState, Result<(), IngestError>)>,
    next_scan: u64,
    window: BTreeMap<u64, Item>,
    finished: BTreeSet<u64>,
    parked: BTreeSet<u64>,
    pool: Vec<SmtpConn>,
    /// Local number → size of each arrival a shipping task holds.
    in_flight: BTreeMap<u64, u64>,
    down_until: Option<Instant>,
    /// When an idle replicator next opens a fresh session (see [`Replicator::dispatch`]).
    next_idle_probe: Instant,
    last_defer_log: Option<Instant>,
    /// Since when shipping has had trouble (a failure while arrivals waited); cleared,
    /// with a "caught up" log line, once every arrival is shipped or parked again.
    behind_since: Option<Instant>,
    last_local: u64,
}

impl Replicator {
    /// `tls` must be set when `cfg` has `tls` (loaded by the caller, which reloads it).
    pub fn new(
        cfg: ConnectionConfig,
        node: String,
        store: StoreHandle,
        router: SharedRouter,
        tls: Option<crate::tls::Shared<rustls::ClientConfig>>,
    ) -> (Replicator, ConnHandle) {
        let (tx, rx) = mpsc::channel(64);
        let status = Arc::new(Mutex::new(ConnStatus {
            name: cfg.name.clone(),
            peer: cfg.peer.clone(),
            state: "unknown".into(),
            mode: "unknown".into(),
            ..ConnStatus::default()
        }));
        let handle = ConnHandle {
            name: cfg.name.clone(),
            status: status.clone(),
            commands: tx,
        };
        let r = Replicator {
            cfg: Arc::new(cfg),
            node,
            store,
            router,
            status,
            commands: rx,
            tls,
            st: CursorState::default(),
            persisted: CursorState::default(),
            last_persist: Instant::now(),
            saving: JoinSet::new(),
            next_scan: 1,
            window: BTreeMap::new(),
            finished: BTreeSet::new(),
            parked: BTreeSet::new(),
            pool: Vec::new(),
            in_flight: BTreeMap::new(),
            // Start by probing: a session learns the peer's mode and epoch (a rebuilt
            // peer is resynced even when nothing new waits for it).
            down_until: Some(Instant::now()),
            next_idle_probe: Instant::now(),
            last_defer_log: None,
            behind_since: None,
            last_local: 0,
        };
        (r, handle)
    }

    fn set_status(&self, f: impl FnOnce(&mut ConnStatus)) {
        f(&mut self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    fn load_state(&mut self) -> Result<(), StoreError> {
        let txn = self.store.snapshot()?;
        let cursors = txn
            .open_table(index::CURSORS)
            .map_err(|e| StoreError::Index(e.to_string()))?;
        if let Some(v) = cursors
            .get(self.cfg.name.as_str())
            .map_err(|e| StoreError::Index(e.to_string()))?
        {
            self.st = serde_json::from_slice(v.value()).unwrap_or_default();
        }
        let parked = txn
            .open_table(index::PARKED)
            .map_err(|e| StoreError::Index(e.to_string()))?;
        let name = self.cfg.name.as_str();
        for e in parked
            .range((name, 0)..=(name, u64::MAX))
            .map_err(|e| StoreError::Index(e.to_string()))?
        {
            let (k, _) = e.map_err(|e| StoreError::Index(e.to_string()))?;
            self.parked.insert(k.value().1);
        }
        self.persisted = self.st.clone();
        self.next_scan = self.st.cursor + 1;
        Ok(())
    }

    /// Runs until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut commits = self.store.commits();
        // The store may be reopening: try again a bounded number of times per second.
        while let Err(e) = self.load_state() {
            warn!(connection = %self.cfg.name, error = %e, "replicator cannot read its state yet");
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        info!(connection = %self.cfg.name, peer = %self.cfg.peer, target = %self.cfg.target,
            cursor = self.st.cursor, "replicator started");
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        loop {
            if *stop.borrow() {
                break;
            }
            if let Err(e) = self.fill() {
                warn!(connection = %self.cfg.name, error = %e, "reading arrivals failed");
            }
            self.advance();
            let idle = tasks.is_empty();
            if self.st != self.persisted && (idle || self.last_persist.elapsed() >= PERSIST_EVERY) {
                self.start_persist();
            }
            self.dispatch(&mut tasks);
            self.publish();
            let wake = self.next_wake();
            tokio::select! {
                _ = stop.changed() => break,
                Some(done) = tasks.join_next() => {
                    if let Ok(outcome) = done {
                        self.handle(outcome).await;
                    }
                }
                Some(cmd) = self.commands.recv() => self.command(cmd).await,
                Some(saved) = self.saving.join_next() => {
                    if let Ok(saved) = saved {
                        self.saved(saved);
                    }
                }
                _ = commits.changed() => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        // Stop: in-flight sessions are abandoned; what they shipped is resent after the
        // next start (idempotent by arrival id). Record how far we got.
        tasks.abort_all();
        self.advance();
        if self.st != self.persisted {
            self.persist().await;
        }
        for c in self.pool.drain(..) {
            c.quit().await;
        }
        info!(connection = %self.cfg.name, cursor = self.st.cursor, "replicator stopped");
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + TICK;
        if let Some(d) = self.down_until {
            wake = wake.min(d.max(now));
        } else if self.window.is_empty() {
            wake = wake.min(self.next_idle_probe.max(now));
        }
        // Deferred arrivals wake the loop when their backoff ends. Arrivals that are due
        // already wait for a free session: a finishing task wakes the loop for them
        // (waking now would spin while every session is busy).
        for item in self
            .window
            .values()
            .filter(|i| !i.in_flight && i.not_before > now)
        {
            wake = wake.min(item.not_before);
        }
        if self.st != self.persisted {
            wake = wake.min(now + PERSIST_EVERY);
        }
        wake
    }

    /// Whether this connection ships the arrival at `local`.
    fn routed(&self, local: u64, a: &Arrival) -> bool {
        if local <= self.st.resync_until {
            return true;
        }
        let mut trace = a.holders();
        trace.push(self.node.clone());
        self.router
            .sends_to(&self.cfg.name, a.local_listener(), &trace, a.next_hops())
    }

    /// Loads arrivals past `next_scan` into the window.
    fn fill(&mut self) -> Result<(), StoreError> {
        let ie = |e: redb::Error| StoreError::Index(e.to_string());
        let txn = self.store.snapshot()?;
        self.last_local = crate::store::catalog::last_local(&txn)?;
        if self.window.len() >= WINDOW || self.next_scan > self.last_local {
            return Ok(());
        }
        let messages = txn.open_table(index::MESSAGES).map_err(|e| ie(e.into()))?;
        for (local, arrival) in self.store.arrivals_from(&txn, self.next_scan, SCAN_MAX)? {
            if self.window.len() >= WINDOW {
                break;
            }
            self.next_scan = local + 1;
            let arrival: Arrival = match arrival {
                Ok(a) => a,
                Err(e) => {
                    warn!(connection = %self.cfg.name, local, error = %e,
                        "an arrival in the index does not parse; passed over");
                    self.finished.insert(local);
                    continue;
                }
            };
            if self.parked.contains(&local) || !self.routed(local, &arrival) {
                self.finished.insert(local);
                continue;
            }
            let size = arrival
                .message
                .parse::<MessageId>()
                .ok()
                .and_then(|id| messages.get(id.0).ok().flatten())
                .and_then(|v| index::Loc::decode(v.value()))
                .map_or(0, |l| u64::from(l.raw_len));
            self.window.insert(
                local,
                Item {
                    arrival,
                    size,
                    attempts: 0,
                    not_before: Instant::now(),
                    in_flight: false,
                    last_error: None,
                },
            );
        }
        Ok(())
    }

    /// Moves the cursor over every finished arrival right after it.
    fn advance(&mut self) {
        while self.finished.remove(&(self.st.cursor + 1)) {
            self.st.cursor += 1;
        }
        // Finished entries at or below the cursor (a retried parked one) are done.
        let cursor = self.st.cursor;
        self.finished.retain(|&l| l > cursor);
    }

    /// Starts writing the cursor unless a write is in flight; [`Replicator::saved`] takes
    /// the result.
    fn start_persist(&mut self) {
        if !self.saving.is_empty() {
            return;
        }
        let state = self.st.clone();
        let op = StateOp::SetCursor {
            connection: self.cfg.name.clone(),
            state: state.clone(),
        };
        let store = self.store.clone();
        self.saving
            .spawn(async move { (state, store.update_state(op).await) });
        self.last_persist = Instant::now();
    }

    fn saved(&mut self, (state, result): (CursorState, Result<(), IngestError>)) {
        match result {
            Ok(()) => self.persisted = state,
            Err(e) => {
                warn!(connection = %self.cfg.name, error = %e, "saving the cursor failed");
            }
        }
    }

    /// Writes the cursor and waits for it (resync, epoch changes, stop). Writes go
    /// through one channel in order, so a write started earlier never lands after it.
    async fn persist(&mut self) {
        let op = StateOp::SetCursor {
            connection: self.cfg.name.clone(),
            state: self.st.clone(),
        };
        match self.store.update_state(op).await {
            Ok(()) => self.persisted = self.st.clone(),
            Err(e) => {
                warn!(connection = %self.cfg.name, error = %e, "saving the cursor failed");
            }
        }
        self.last_persist = Instant::now();
    }

    fn dispatch(&mut self, tasks: &mut JoinSet<Outcome>) {
        let now = Instant::now();
        let probing = match self.down_until {
            Some(t) if now < t => return,
            Some(_) => true,
            None => false,
        };
        let limit = if probing { 1 } else { self.cfg.sessions.max(1) };
        if probing && self.window.is_empty() && tasks.is_empty() {
            // Nothing to send: probe with a bare session.
            self.down_until = Some(now + self.cfg.probe_interval);
            tasks.spawn(ship(self.ctx(), None, None));
            return;
        }
        if !probing && self.window.is_empty() && tasks.is_empty() && now >= self.next_idle_probe {
            // Idle for a probe_interval: open a fresh session in place of the pooled
            // ones. It notices a peer that went down (state "down" even when nothing
            // waits), and reads the peer's epoch, so a peer rebuilt from empty is
            // resynced without waiting for new mail; pooled sessions the peer dropped
            // (a restart, its idle timeout) are not used for the next arrival.
            self.next_idle_probe = now + self.cfg.probe_interval;
            self.pool.clear();
            tasks.spawn(ship(self.ctx(), None, None));
            return;
        }
        let mut bytes: u64 = self.in_flight.values().sum();
        while tasks.len() < limit {
            let Some((&local, item)) = self
                .window
                .iter_mut()
                .find(|(_, i)| !i.in_flight && i.not_before <= now)
            else {
                break;
            };
            if !self.in_flight.is_empty() && bytes + item.size > MAX_IN_FLIGHT_BYTES {
                break;
            }
            bytes += item.size;
            self.in_flight.insert(local, item.size);
            item.in_flight = true;
            if probing {
                // Until it answers, wait for this probe only.
                self.down_until = Some(now + self.cfg.probe_interval);
            }
            let conn = self.pool.pop();
            let job = (local, item.arrival.clone());
            tasks.spawn(ship(self.ctx(), conn, Some(job)));
        }
    }

    fn ctx(&self) -> ShipCtx {
        ShipCtx {
            cfg: self.cfg.clone(),
            node: self.node.clone(),
            store: self.store.clone(),
            tls: self.tls.as_ref().map(crate::tls::Shared::get),
        }
    }

    async fn handle(&mut self, o: Outcome) {
        if let Some(local) = o.local {
            self.in_flight.remove(&local);
        }
        if o.stale_pool {
            self.pool.clear();
        }
        if let Some(caps) = &o.fresh {
            match caps {
                Some((_, epoch)) => {
                    self.set_status(|s| s.mode = "xcoffer".into());
                    self.check_epoch(epoch).await;
                }
                None => self.set_status(|s| s.mode = "plain".into()),
            }
        }
        if let Some(c) = o.conn {
            if self.pool.len() < self.cfg.sessions.max(1) {
                self.pool.push(c);
            }
        }
        let now = Instant::now();
        match o.result {
            Ok(()) => {
                self.down_until = None;
                self.next_idle_probe = now + self.cfg.probe_interval;
                let was = self.state();
                if was == "down" || was == "wrong-peer" {
                    let lag = self.last_local.saturating_sub(self.st.cursor);
                    info!(connection = %self.cfg.name, peer = %self.cfg.peer, lag,
                        "peer reachable again: shipping resumes");
                }
                self.set_status(|s| s.state = "up".into());
                if let Some(local) = o.local {
                    if self.window.remove(&local).is_some() {
                        self.finish(local);
                        self.set_status(|s| s.shipped += 1);
                    }
                }
            }
            Err(e) => {
                let kind = e.kind();
                if self.behind_since.is_none() && self.last_local > self.st.cursor {
                    self.behind_since = Some(now);
                }
                let why = e.to_string();
                let new_error = self
                    .status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .last_error
                    .as_ref()
                    != Some(&why);
                self.set_status(|s| {
                    *s.failures.entry(kind.into()).or_default() += 1;
                    s.last_error = Some(why);
                });
                match &e {
                    SendError::Connect(_) | SendError::WrongPeer(_) => {
                        // Once per outage, and again when the reason changes (a peer
                        // down from the start, a TLS failure after a reload).
                        if self.down_until.is_none() || new_error {
                            warn!(connection = %self.cfg.name, error = %e,
                                "peer unreachable; probing every {:?}", self.cfg.probe_interval);
                        }
                        self.down_until = Some(now + self.cfg.probe_interval);
                        let state = if matches!(e, SendError::WrongPeer(_)) {
                            "wrong-peer"
                        } else {
                            "down"
                        };
                        self.set_status(|s| s.state = state.into());
                        self.pool.clear();
                        if let Some(item) = o.local.and_then(|l| self.window.get_mut(&l)) {
                            item.in_flight = false;
                        }
                    }
                    SendError::Temp(why) => {
                        let Some(local) = o.local else { return };
                        let Some(item) = self.window.get_mut(&local) else {
                            return;
                        };
                        item.in_flight = false;
                        item.attempts += 1;
                        item.last_error = Some(why.clone());
                        let max = self.cfg.max_retries;
                        if max > 0 && item.attempts >= max {
                            let reason = format!("{} attempts failed; last: {why}", item.attempts);
                            self.park(local, reason).await;
                        } else {
                            let cap = backoff::CAP.max(self.cfg.probe_interval);
                            item.not_before = backoff::next_attempt(
                                now,
                                item.attempts,
                                cap,
                                backoff::jitter_seed(),
                            );
                            let (attempts, wait) = (item.attempts, item.not_before - now);
                            let arrival = item.arrival.id.to_string();
                            if self
                                .last_defer_log
                                .is_none_or(|t| now.duration_since(t) >= DEFER_LOG_EVERY)
                            {
                                self.last_defer_log = Some(now);
                                warn!(connection = %self.cfg.name, arrival = %arrival, attempts,
                                    retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                                    error = %why, "arrival deferred; retrying with backoff");
                            }
                        }
                    }
                    SendError::Perm(why) => {
                        if let Some(local) = o.local {
                            if self.window.contains_key(&local) {
                                self.park(local, why.clone()).await;
                            }
                        }
                    }
                }
            }
        }
    }

    fn state(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .state
            .clone()
    }

    fn finish(&mut self, local: u64) {
        if local > self.st.cursor {
            self.finished.insert(local);
        }
    }

    async fn park(&mut self, local: u64, reason: String) {
        let Some(item) = self.window.remove(&local) else {
            return;
        };
        warn!(connection = %self.cfg.name, arrival = %item.arrival.id, reason = %reason,
            "arrival parked; `coffer queue retry` ships it again");
        let op = StateOp::Park {
            connection: self.cfg.name.clone(),
            local,
            reason,
        };
        if let Err(e) = self.store.update_state(op).await {
            // Not durably parked: keep it queued rather than lose it.
            warn!(connection = %self.cfg.name, error = %e, "parking failed; retrying later");
            let mut item = item;
            item.in_flight = false;
            item.not_before = Instant::now() + self.cfg.probe_interval;
            self.window.insert(local, item);
            return;
        }
        self.parked.insert(local);
        self.finish(local);
    }

    async fn check_epoch(&mut self, epoch: &str) {
        match &self.st.peer_epoch {
            Some(known) if known == epoch => {}
            None => {
                self.st.peer_epoch = Some(epoch.to_owned());
                self.persist().await;
            }
            Some(known) => {
                let old = known.clone();
                self.st.peer_epoch = Some(epoch.to_owned());
                self.restart_from_zero();
                warn!(connection = %self.cfg.name, old = %old, new = %epoch,
                    resync_until = self.st.resync_until,
                    "the peer's store epoch changed (rebuilt): resyncing from the start");
                self.persist().await;
            }
        }
    }

    fn restart_from_zero(&mut self) {
        self.behind_since = Some(Instant::now());
        self.st.cursor = 0;
        self.st.resync_until = self.last_local.max(self.next_scan.saturating_sub(1));
        self.next_scan = 1;
        self.window.clear();
        self.finished.clear();
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Resync => {
                info!(connection = %self.cfg.name, "resync requested");
                self.restart_from_zero();
                self.persist().await;
            }
            Command::Skip(local) => {
                let op = StateOp::Unpark {
                    connection: self.cfg.name.clone(),
                    local,
                };
                if self.store.update_state(op).await.is_ok() {
                    self.parked.remove(&local);
                }
            }
            Command::Retry(local) => {
                let op = StateOp::Unpark {
                    connection: self.cfg.name.clone(),
                    local,
                };
                if self.store.update_state(op).await.is_err() {
                    return;
                }
                self.parked.remove(&local);
                if let Ok(Some(arrival)) = self.arrival_at(local) {
                    self.finished.remove(&local);
                    self.window.insert(
                        local,
                        Item {
                            arrival,
                            size: 0,
                            attempts: 0,
                            not_before: Instant::now(),
                            in_flight: false,
                            last_error: None,
                        },
                    );
                    self.down_until = None;
                }
            }
        }
    }

    fn arrival_at(&self, local: u64) -> Result<Option<Arrival>, StoreError> {
        let txn = self.store.snapshot()?;
        self.store.arrival_at(&txn, local)
    }

    fn publish(&mut self) {
        let lag = self.last_local.saturating_sub(self.st.cursor);
        let bytes: u64 = self.window.values().map(|i| i.size).sum();
        let oldest = self.window.values().next().map(|i| {
            let t = index::time_us(&i.arrival.time);
            let now = chrono::Utc::now().timestamp_micros();
            u64::try_from((now - t).max(0) / 1_000_000).unwrap_or(0)
        });
        let alarm = lag > self.cfg.queue_limit;
        if lag == 0 {
            if let Some(since) = self.behind_since.take() {
                info!(connection = %self.cfg.name, parked = self.parked.len(),
                    behind_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "caught up: every arrival is shipped or parked");
            }
        }
        let now = Instant::now();
        let deferred: Vec<Deferred> = self
            .window
            .values()
            .filter(|i| i.attempts > 0)
            .take(MAX_DEFERRED_SHOWN)
            .map(|i| Deferred {
                arrival: i.arrival.id.to_string(),
                attempts: i.attempts,
                next_attempt_ms: u64::try_from(
                    i.not_before.saturating_duration_since(now).as_millis(),
                )
                .unwrap_or(u64::MAX),
                last_error: i.last_error.clone().unwrap_or_default(),
            })
            .collect();
        let resync_until = (self.st.resync_until > self.st.cursor).then_some(self.st.resync_until);
        let was = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .lag_alarm;
        if alarm && !was {
            warn!(connection = %self.cfg.name, lag, queue_limit = self.cfg.queue_limit,
                "replication lag over queue_limit (nothing is dropped)");
        }
        self.set_status(|s| {
            s.lag_arrivals = lag;
            s.lag_bytes = bytes;
            s.oldest_unsent_secs = if lag == 0 { None } else { oldest };
            s.parked = self.parked.len() as u64;
            s.cursor = self.st.cursor;
            s.peer_epoch.clone_from(&self.st.peer_epoch);
            s.lag_alarm = alarm;
            s.resync_until = resync_until;
            s.deferred = deferred;
        });
    }
}

struct ShipCtx {
    cfg: Arc<ConnectionConfig>,
    node: String,
    store: StoreHandle,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl ShipCtx {
    /// STARTTLS to the peer, when the connection has `tls` (or `tls` without a loaded
    /// configuration, which never sends in the clear either).
    fn tls(&self) -> Result<Option<TlsTo>, SendError> {
        if self.cfg.tls.is_none() {
            return Ok(None);
        }
        let Some(config) = self.tls.clone() else {
            return Err(SendError::Connect(
                "the connection's TLS files are not loaded; nothing is sent in the clear".into(),
            ));
        };
        let name = crate::tls::server_name(&self.cfg.peer).map_err(SendError::Connect)?;
        Ok(Some(TlsTo { config, name }))
    }
}

/// Ships one arrival (or, with `job` `None`, only opens a session: a probe). When a
/// pooled session breaks under it — the peer restarted or dropped it while it sat in
/// the pool — that is not the arrival's fault: it goes once more on a fresh session, and
/// only that attempt counts. (A resend after a lost reply is a repeat at the peer.)
async fn ship(ctx: ShipCtx, conn: Option<SmtpConn>, job: Option<(u64, Arrival)>) -> Outcome {
    let reused = conn.is_some() && job.is_some();
    let first = ship_once(&ctx, conn, job.clone()).await;
    if reused && first.conn.is_none() && matches!(first.result, Err(SendError::Temp(_))) {
        let mut again = ship_once(&ctx, None, job).await;
        again.stale_pool = true;
        return again;
    }
    first
}

async fn ship_once(ctx: &ShipCtx, conn: Option<SmtpConn>, job: Option<(u64, Arrival)>) -> Outcome {
    let local = job.as_ref().map(|(l, _)| *l);
    let mut fresh = None;
    let mut conn = match conn {
        Some(c) => c,
        None => {
            let c = match ctx.tls() {
                Ok(tls) => {
                    SmtpConn::connect(
                        &ctx.cfg.target,
                        ctx.cfg.source.as_deref(),
                        &ctx.node,
                        TIMEOUT,
                        tls.as_ref(),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match c {
                Ok(c) => {
                    if let Some((node, _)) = &c.caps.xcoffer {
                        if *node != ctx.cfg.peer {
                            let why = format!(
                                "{} answers as node {node:?}, not {:?}; nothing is shipped",
                                ctx.cfg.target, ctx.cfg.peer
                            );
                            c.quit().await;
                            return Outcome {
                                local,
                                result: Err(SendError::WrongPeer(why)),
                                conn: None,
                                fresh: None,
                                stale_pool: false,
                            };
                        }
                    }
                    fresh = Some(c.caps.xcoffer.clone());
                    c
                }
                Err(e) => {
                    return Outcome {
                        local,
                        result: Err(e),
                        conn: None,
                        fresh: None,
                        stale_pool: false,
                    }
                }
            }
        }
    };
    let Some((_, arrival)) = job else {
        return Outcome {
            local,
            result: Ok(()),
            conn: Some(conn),
            fresh,
            stale_pool: false,
        };
    };
    let result = send_one(ctx, &mut conn, &arrival).await;
    let usable = match &result {
        Ok(()) | Err(SendError::Perm(_)) => true,
        // A refusal reply leaves the session in step; I/O trouble does not. The client
        // resets after refusals, so only replies kept it usable.
        Err(SendError::Temp(why)) => why.contains(": 4"),
        Err(_) => false,
    };
    Outcome {
        local,
        result,
        conn: usable.then_some(conn),
        fresh,
        stale_pool: false,
    }
}

async fn send_one(ctx: &ShipCtx, conn: &mut SmtpConn, a: &Arrival) -> Result<(), SendError> {
    let id: MessageId = a
        .message
        .parse()
        .map_err(|_| SendError::Perm(format!("arrival {} names no message", a.id)))?;
    let store = ctx.store.clone();
    let bytes = tokio::task::spawn_blocking(move || store.read_message(&id))
        .await
        .map_err(|e| SendError::Temp(format!("reading the message: {e}")))?
        .map_err(|e| SendError::Temp(format!("reading the message: {e}")))?;
    let xcoffer = if conn.caps.xcoffer.is_some() {
        let value = coffer_proto::encode(&xcoffer_for(a, &ctx.node));
        if value.len() > coffer_proto::xcoffer::MAX_ENCODED_LEN {
            return Err(SendError::Perm(format!(
                "the XCOFFER value would be {} bytes, over the limit",
                value.len()
            )));
        }
        Some(value)
    } else {
        None
    };
    conn.send(&a.mail_from, &a.rcpt_to, &bytes, xcoffer.as_deref())
        .await
        .map(|_| ())
}
