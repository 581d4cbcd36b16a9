//! The [`Bus`] handle and its connection task.
//!
//! One task per bus owns the AMQP connection. It connects, runs the `on_connect` routines, then
//! publishes the connection (a [`Live`]) in a watch channel and bumps the generation. When the
//! connection dies (an error event from lapin, or a status check), it withdraws the `Live` and
//! reconnects with backoff. Publishers and consumers only ever read the watch: they never
//! connect by themselves, so there is exactly one connection and one retry loop per bus.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::{backoff, BusConfig, BusError};

/// How long one connection attempt (TCP + AMQP handshake) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful close at shutdown may take before the connection is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the `on_connect` routines of one connection may take together.
const HOOKS_TIMEOUT: Duration = Duration::from_secs(60);
/// A second way to notice a dead connection, should lapin end it without an error event.
const STATUS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Publishes waiting for their confirm at once, by default ([`BusConfig::max_publishes_in_flight`]).
/// Each holds one confirm-mode channel for itself, so a broker refusal that closes the channel is
/// certainly about that message.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 64;
/// The bound for a node's connection, which sends a command to every host of a job at once: with
/// 64, a 10,000-host job waited on the slots (113 ms on average per publish, against 38 ms for
/// the confirm itself) while neither the node nor the broker had a full core (ARCHITECTURE §28).
pub const NODE_PUBLISHES_IN_FLIGHT: usize = 256;
/// The most a [`BusConfig`] may ask for: RabbitMQ's default `channel_max` is 2,047 per connection.
pub const PUBLISHES_IN_FLIGHT_LIMIT: usize = 1024;

/// A declaration routine run on every (re)connect; see [`Bus::on_connect`].
type Hook = Arc<dyn Fn(Channel) -> HookFuture + Send + Sync>;
type HookFuture = Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>;

/// A handle on one AMQP connection kept up in the background. Cheap to clone; every clone
/// shares the connection.
#[derive(Clone)]
pub struct Bus {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: BusConfig,
    pub(crate) shutdown: CancellationToken,
    /// The current connection, `None` while (re)connecting.
    pub(crate) live: watch::Sender<Option<Arc<Live>>>,
    generation: watch::Sender<u64>,
    hooks: Mutex<Vec<Hook>>,
    hooks_added: Notify,
    /// Bounds the publishes in flight (and so the channels the publisher opens).
    pub(crate) publish_slots: Arc<Semaphore>,
}

/// One established connection, after its `on_connect` routines ran.
pub(crate) struct Live {
    pub(crate) generation: u64,
    pub(crate) conn: Connection,
    /// Confirm-mode channels free for the next publish, at most the connection's publish slots.
    idle_publish_channels: IdlePool<Channel>,
    /// Channels that carry a direct reply-to consumer, free for the next [`Bus::request`].
    pub(crate) idle_request_channels: IdlePool<crate::publish::RequestChannel>,
}

impl Live {
    pub(crate) fn is_connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// A confirm-mode channel for one publish: a free one, or a new one.
    pub(crate) async fn take_publish_channel(&self) -> Result<Channel, BusError> {
        if let Some(ch) = self.idle_publish_channels.take() {
            return Ok(ch);
        }
        let ch = self.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// Gives a channel back after its publish was confirmed (or nacked, or returned).
    pub(crate) fn return_publish_channel(&self, ch: Channel) {
        self.idle_publish_channels.give_back(ch);
    }
}

/// Channels (or what wraps one) kept for reuse on one connection: at most `max`, and only
/// while `usable` says their channel is still open.
pub(crate) struct IdlePool<T> {
    items: Mutex<Vec<T>>,
    max: usize,
    usable: fn(&T) -> bool,
}

impl<T> IdlePool<T> {
    pub(crate) fn new(max: usize, usable: fn(&T) -> bool) -> IdlePool<T> {
        IdlePool {
            items: Mutex::new(Vec::new()),
            max,
            usable,
        }
    }

    /// A kept item still usable; those that are not any more are dropped on the way.
    pub(crate) fn take(&self) -> Option<T> {
        loop {
            let item = self.items.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if (self.usable)(&item) {
                return Some(item);
            }
        }
    }

    /// Keeps `item` for the next taker, unless it is unusable or the pool is full.
    pub(crate) fn give_back(&self, item: T) {
        if (self.usable)(&item) {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            if items.len() < self.max {
                items.push(item);
            }
        }
    }
}

impl Bus {
    /// Starts the connection task and returns at once, without waiting for the broker. The task
    /// retries forever with backoff until `shutdown` is cancelled; then it closes the connection.
    /// Must be called within a tokio runtime. An invalid url is logged and leaves the bus
    /// disconnected: check it first with [`BusConfig::validate`].
    pub fn start(config: BusConfig, shutdown: CancellationToken) -> Bus {
        let (live, _) = watch::channel(None);
        let (generation, _) = watch::channel(0);
        let span = tracing::info_span!("bus", connection = %config.connection_name);
        let slots = config.max_publishes_in_flight.max(1);
        let shared = Arc::new(Shared {
            config,
            shutdown,
            live,
            generation,
            hooks: Mutex::new(Vec::new()),
            hooks_added: Notify::new(),
            publish_slots: Arc::new(Semaphore::new(slots)),
        });
        tokio::spawn(connection_task(shared.clone()).instrument(span));
        Bus { shared }
    }

    /// Waits until connected (and the `on_connect` routines ran). Errs with
    /// [`BusError::Timeout`] or [`BusError::Shutdown`].
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), BusError> {
        let mut live = self.shared.live.subscribe();
        let wait = async {
            loop {
                if live.borrow_and_update().is_some() {
                    return Ok(());
                }
                if live.changed().await.is_err() {
                    return Err(BusError::Shutdown);
                }
            }
        };
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => Err(BusError::Shutdown),
            r = tokio::time::timeout(timeout, wait) => r.unwrap_or(Err(BusError::Timeout(timeout))),
        }
    }

    /// True while a connection is up (it may still die the next instant).
    pub fn is_connected(&self) -> bool {
        self.current().is_some_and(|l| l.is_connected())
    }

    /// The connection generation: 0 = never connected, +1 on every (re)connect, set after the
    /// `on_connect` routines ran. The agent sends `hello` on every change.
    ///
    /// The receiver's first `changed()` returns at once, whatever the value: a routine that acts
    /// on every connection must also act on the one that may already be up when it subscribes
    /// (otherwise a connection made between `Bus::start` and the subscription is never seen).
    pub fn generation(&self) -> watch::Receiver<u64> {
        let mut rx = self.shared.generation.subscribe();
        rx.mark_changed();
        rx
    }

    /// Registers a routine run on every (re)connect, on a fresh channel, before the connection
    /// is announced (so before consumers re-subscribe and before `generation` moves), e.g. to
    /// declare topology. If it fails, that connection is dropped and retried with backoff.
    ///
    /// Register routines right after [`Bus::start`]. One registered while a connection is up
    /// also runs at once on that connection, in the background; consumers already subscribed do
    /// not wait for it (a subscription that fails, e.g. on a queue not declared yet, is retried).
    pub fn on_connect<F, Fut>(&self, f: F)
    where
        F: Fn(Channel) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BusError>> + Send + 'static,
    {
        let hook: Hook = Arc::new(move |ch| Box::pin(f(ch)));
        self.shared
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
        self.shared.hooks_added.notify_one();
    }

    /// A new channel on the current connection, for one-off admin work (declarations). Close it
    /// or drop it when done.
    pub async fn channel(&self) -> Result<Channel, BusError> {
        let live = self.current().ok_or(BusError::NotConnected)?;
        Ok(live.conn.create_channel().await?)
    }

    /// The bus's settings (the url is redacted in their `Debug`).
    pub fn config(&self) -> &BusConfig {
        &self.shared.config
    }

    pub(crate) fn current(&self) -> Option<Arc<Live>> {
        self.shared.live.borrow().clone()
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("config", &self.shared.config)
            .field("generation", &*self.shared.generation.borrow())
            .finish()
    }
}

/// Why a connection stopped being used.
enum End {
    Shutdown,
    Lost(String),
}

async fn connection_task(shared: Arc<Shared>) {
    let uri = match shared.config.amqp_uri() {
        Ok(uri) => uri,
        Err(e) => {
            error!(error = %e, "invalid broker url, the bus stays disconnected");
            return;
        }
    };
    let url = crate::config::redact_url(&shared.config.url);
    let mut attempt: u32 = 0;
    let mut generation: u64 = 0;
    while !shared.shutdown.is_cancelled() {
        let props = ConnectionProperties::default()
            .with_connection_name(shared.config.connection_name.as_str().into());
        let connect =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri.clone(), props));
        let result = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = connect => r,
        };
        match result {
            Ok(Ok(conn)) => {
                // Subscribe before anything can fail, so no error event is missed.
                let events = conn.events_listener();
                match run_hooks(&shared, &conn, 0).await {
                    Ok(hooks_run) => {
                        generation += 1;
                        attempt = 0;
                        let live = Arc::new(Live {
                            generation,
                            conn,
                            idle_publish_channels: IdlePool::new(
                                shared.config.max_publishes_in_flight,
                                |ch| ch.status().connected(),
                            ),
                            idle_request_channels: IdlePool::new(
                                shared.config.max_publishes_in_flight,
                                crate::publish::RequestChannel::is_open,
                            ),
                        });
                        shared.live.send_replace(Some(live.clone()));
                        shared.generation.send_replace(generation);
                        info!(generation, url = %url, "connected to the broker");
                        let end = watch_connection(&shared, &live, events, hooks_run).await;
                        shared.live.send_replace(None);
                        match end {
                            End::Shutdown => {
                                close(&live.conn).await;
                                break;
                            }
                            End::Lost(reason) => {
                                warn!(generation, %reason, "connection to the broker lost");
                                close(&live.conn).await;
                            }
                        }
                    }
                    Err(BusError::Shutdown) => {
                        close(&conn).await;
                        break;
                    }
                    Err(e) => {
                        warn!(attempt, error = %e, "on_connect routine failed, reconnecting");
                        close(&conn).await;
                    }
                }
            }
            Ok(Err(e)) => warn!(attempt, url = %url, error = %e, "cannot connect to the broker"),
            Err(_) => {
                warn!(attempt, url = %url, timeout_ms = CONNECT_TIMEOUT.as_millis() as u64, "connecting to the broker timed out")
            }
        }
        let delay = backoff::delay(
            attempt,
            shared.config.backoff_min_ms,
            shared.config.backoff_max_ms,
        );
        attempt = attempt.saturating_add(1);
        debug!(
            delay_ms = delay.as_millis() as u64,
            "waiting before reconnecting"
        );
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    shared.live.send_replace(None);
    info!("bus stopped");
}

/// Runs the routines from index `from` on `conn`, each on its own channel (a routine that gets
/// its channel closed by the broker does not break the next), all within [`HOOKS_TIMEOUT`].
/// Returns how many have run.
async fn run_hooks(shared: &Shared, conn: &Connection, from: usize) -> Result<usize, BusError> {
    tokio::select! {
        _ = shared.shutdown.cancelled() => Err(BusError::Shutdown),
        r = tokio::time::timeout(HOOKS_TIMEOUT, run_hooks_unbounded(shared, conn, from)) => {
            r.unwrap_or(Err(BusError::Timeout(HOOKS_TIMEOUT)))
        }
    }
}

async fn run_hooks_unbounded(
    shared: &Shared,
    conn: &Connection,
    from: usize,
) -> Result<usize, BusError> {
    let hooks: Vec<Hook> = shared
        .hooks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for hook in hooks.iter().skip(from) {
        let ch = conn.create_channel().await?;
        hook(ch.clone()).await?;
        if ch.status().connected() {
            let _ = ch.close(200, "on_connect done".into()).await;
        }
    }
    Ok(hooks.len().max(from))
}

/// Waits until the connection dies, the bus shuts down, or a routine registered meanwhile fails.
async fn watch_connection(
    shared: &Shared,
    live: &Live,
    events: impl futures_util::Stream<Item = Event> + Send,
    mut hooks_run: usize,
) -> End {
    let mut events = std::pin::pin!(events);
    let mut check = tokio::time::interval(STATUS_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return End::Shutdown,
            event = events.next() => match event {
                // lapin also reports channel-level (soft) errors here, e.g. a publish refused
                // with 403: those closed one channel, not the connection.
                Some(Event::Error(e)) if e.is_amqp_soft_error() && live.is_connected() => {
                    debug!(error = %e, "channel closed by the broker");
                }
                Some(Event::Error(e)) => return End::Lost(e.to_string()),
                Some(Event::ConnectionBlocked(reason)) => warn!(%reason, "the broker blocked the connection"),
                Some(Event::ConnectionUnblocked) => info!("the broker unblocked the connection"),
                Some(_) => {}
                None => return End::Lost("event stream ended".into()),
            },
            _ = check.tick() => {
                if !live.is_connected() {
                    return End::Lost("connection no longer open".into());
                }
            }
            _ = shared.hooks_added.notified() => {
                match run_hooks(shared, &live.conn, hooks_run).await {
                    Ok(n) => hooks_run = n,
                    Err(BusError::Shutdown) => return End::Shutdown,
                    Err(e) => return End::Lost(format!("on_connect routine failed: {e}")),
                }
            }
        }
    }
}

async fn close(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "bye".into())).await;
    }
}
