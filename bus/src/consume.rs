//! Consumers that survive reconnects.
//!
//! A [`Consumer`] is the receiving end of a bounded channel fed by a task. The task waits for a
//! connection, opens a channel with the prefetch as QoS, subscribes, and forwards deliveries.
//! When the subscription ends (connection lost, channel closed, consumer cancelled by the
//! broker) it subscribes again: at once on a new connection, after a backoff on the same one.
//! Deliveries not acked when their channel died are redelivered by the broker
//! (`redelivered = true`); acking one of those stale deliveries gives [`BusError::Stale`].

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Acker, Channel};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use crate::connection::Live;
use crate::publish::short;
use crate::{backoff, Bus, BusError};

/// How to subscribe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumeOptions {
    /// Unacked deliveries the broker may hand over at once (AMQP QoS); also the size of the
    /// buffer between the subscription and [`Consumer::next`]. 0 (unlimited in AMQP) is raised
    /// to 1: the bus never asks for an unbounded flow.
    pub prefetch: u16,
    /// Empty lets the broker choose.
    pub consumer_tag: String,
    /// No other consumer on the queue while this one is subscribed.
    pub exclusive: bool,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            prefetch: 32,
            consumer_tag: String::new(),
            exclusive: false,
        }
    }
}

/// The receiving end of a subscription. Dropping it cancels the subscription; unacked
/// deliveries then go back to the queue.
#[derive(Debug)]
pub struct Consumer {
    queue: String,
    rx: mpsc::Receiver<Delivery>,
}

impl Consumer {
    /// The next delivery. `None` only once the bus is shut down (after the deliveries already
    /// buffered).
    pub async fn next(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }
}

/// One message received. Ack it once its effect is durable; until then the broker keeps it and
/// redelivers it if the connection drops.
#[derive(Debug)]
pub struct Delivery {
    pub exchange: String,
    pub routing_key: String,
    /// The queue it was consumed from.
    pub queue: std::sync::Arc<str>,
    /// Set by the broker when this message was delivered before and not acked.
    pub redelivered: bool,
    pub payload: Vec<u8>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    pub message_id: Option<String>,
    /// Validated by the broker against the publisher's user: the sender's identity.
    pub user_id: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// Seconds since the epoch, as set by the publisher.
    pub timestamp: Option<u64>,
    /// The connection generation it arrived on (see [`Bus::generation`]).
    pub generation: u64,
    acker: Acker,
}

impl Delivery {
    fn from_lapin(
        d: lapin::message::Delivery,
        queue: std::sync::Arc<str>,
        generation: u64,
    ) -> Delivery {
        let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.to_string());
        let p = &d.properties;
        Delivery {
            exchange: d.exchange.to_string(),
            routing_key: d.routing_key.to_string(),
            queue,
            redelivered: d.redelivered,
            kind: text(p.kind()),
            message_id: text(p.message_id()),
            user_id: text(p.user_id()),
            reply_to: text(p.reply_to()),
            correlation_id: text(p.correlation_id()),
            timestamp: *p.timestamp(),
            generation,
            payload: d.data,
            acker: d.acker,
        }
    }

    /// Acknowledges the delivery: the broker forgets the message. `Ok` means the ack was sent;
    /// if the connection drops right after, the broker may still redeliver it, so receivers
    /// de-duplicate by message id anyway.
    pub async fn ack(self) -> Result<(), BusError> {
        Self::settled(self.acker.ack(BasicAckOptions::default()).await)
    }

    /// Rejects the delivery; with `requeue` the broker puts it back in the queue.
    pub async fn nack(self, requeue: bool) -> Result<(), BusError> {
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        Self::settled(self.acker.nack(options).await)
    }

    fn settled(r: lapin::Result<bool>) -> Result<(), BusError> {
        match r {
            Ok(true) => Ok(()),
            // The acker was poisoned: its channel is gone and the broker requeued the message.
            Ok(false) => Err(BusError::Stale),
            Err(e) => Err(BusError::Unknown(e.to_string())),
        }
    }
}

impl Bus {
    /// A consumer of `queue` that survives reconnects: after a reconnect it subscribes again
    /// (after the `on_connect` routines ran). Deliveries not acked before a connection loss are
    /// redelivered by the broker, so nothing acked is lost and nothing unacked is lost.
    pub fn consume(&self, queue: &str, opts: ConsumeOptions) -> Consumer {
        let capacity = usize::from(opts.prefetch.max(1));
        let (tx, rx) = mpsc::channel(capacity);
        let span = tracing::info_span!("bus_consumer", queue = %queue);
        tokio::spawn(consume_task(self.clone(), vec![queue.to_owned()], opts, tx).instrument(span));
        Consumer {
            queue: queue.to_owned(),
            rx,
        }
    }

    /// One consumer of many queues on one channel (a subscription per queue, `prefetch`
    /// each), merged into one stream; otherwise like [`Bus::consume`]. For processes that
    /// stand for many hosts (the loadtest's simulated fleet): a channel per queue would cost the
    /// broker a channel process per host and hit the connection's channel limit (2,047 by
    /// default). [`Delivery::queue`] tells which queue a delivery came from.
    /// [`Consumer::queue`] is the first queue. The buffer holds at most 4,096 deliveries; the
    /// rest wait, unacked, at the broker.
    pub fn consume_many(&self, queues: Vec<String>, opts: ConsumeOptions) -> Consumer {
        let per_queue = usize::from(opts.prefetch.max(1));
        let capacity = per_queue.saturating_mul(queues.len().max(1)).min(4096);
        let (tx, rx) = mpsc::channel(capacity);
        let first = queues.first().cloned().unwrap_or_default();
        let span = tracing::info_span!("bus_consumer", queue = %first, queues = queues.len());
        tokio::spawn(consume_task(self.clone(), queues, opts, tx).instrument(span));
        Consumer { queue: first, rx }
    }
}

async fn consume_task(
    bus: Bus,
    queues: Vec<String>,
    opts: ConsumeOptions,
    tx: mpsc::Sender<Delivery>,
) {
    let shutdown = bus.shared.shutdown.clone();
    let mut live_rx = bus.shared.live.subscribe();
    let mut failures: u32 = 0;
    loop {
        // A connection to subscribe on.
        let live = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            live = next_live(&mut live_rx, 0) => match live { Some(l) => l, None => return },
        };
        match subscribe(&live, &queues, &opts).await {
            Ok((channel, consumer)) => {
                failures = 0;
                info!(generation = live.generation, "consumer subscribed");
                let ended = forward(&bus, &live, consumer, &tx).await;
                drop(channel);
                match ended {
                    Forward::Stop => return,
                    Forward::Ended(reason) => {
                        info!(generation = live.generation, %reason, "consumer subscription ended")
                    }
                }
            }
            Err(e) => {
                warn!(generation = live.generation, attempt = failures, error = %e, "cannot subscribe")
            }
        }
        // Subscribe again: at once on a new connection, after a backoff on the same one (queue
        // missing, consumer cancelled by the broker, ...).
        let delay = backoff::delay(
            failures,
            bus.shared.config.backoff_min_ms,
            bus.shared.config.backoff_max_ms,
        );
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = next_live(&mut live_rx, live.generation) => {}
        }
    }
}

/// The next announced connection newer than `after`; `None` when the bus is gone.
async fn next_live(
    rx: &mut tokio::sync::watch::Receiver<Option<std::sync::Arc<Live>>>,
    after: u64,
) -> Option<std::sync::Arc<Live>> {
    loop {
        if let Some(live) = rx.borrow_and_update().clone() {
            if live.generation > after {
                return Some(live);
            }
        }
        rx.changed().await.ok()?;
    }
}

/// Subscribes to every queue on one new channel; the subscriptions come back merged.
async fn subscribe(
    live: &Live,
    queues: &[String],
    opts: &ConsumeOptions,
) -> Result<(Channel, Merged), BusError> {
    let channel = live.conn.create_channel().await?;
    channel
        .basic_qos(opts.prefetch.max(1), BasicQosOptions { global: false })
        .await?;
    let options = BasicConsumeOptions {
        no_local: false,
        no_ack: false,
        exclusive: opts.exclusive,
        nowait: false,
    };
    let mut consumers = Vec::with_capacity(queues.len());
    for (i, queue) in queues.iter().enumerate() {
        let queue_s = short("queue", queue)?;
        // Tags must differ between the subscriptions of one channel.
        let tag = if queues.len() > 1 && !opts.consumer_tag.is_empty() {
            format!("{}.{i}", opts.consumer_tag)
        } else {
            opts.consumer_tag.clone()
        };
        let tag = short("consumer_tag", &tag)?;
        let consumer = channel
            .basic_consume(queue_s, tag, options, FieldTable::default())
            .await?;
        let name: std::sync::Arc<str> = queue.as_str().into();
        let tagged: Tagged = Box::pin(consumer.map(move |d| (name.clone(), d)));
        consumers.push(tagged);
    }
    Ok((channel, futures_util::stream::select_all(consumers)))
}

/// One subscription's deliveries, each with the name of its queue.
type Tagged = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = (std::sync::Arc<str>, lapin::Result<lapin::message::Delivery>),
            > + Send,
    >,
>;
type Merged = futures_util::stream::SelectAll<Tagged>;

enum Forward {
    /// Shutdown, or the [`Consumer`] was dropped.
    Stop,
    /// The subscription ended; subscribe again.
    Ended(String),
}

async fn forward(
    bus: &Bus,
    live: &Live,
    mut consumer: Merged,
    tx: &mpsc::Sender<Delivery>,
) -> Forward {
    let shutdown = &bus.shared.shutdown;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Forward::Stop,
            _ = tx.closed() => return Forward::Stop,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some((queue, Ok(d))) => Delivery::from_lapin(d, queue, live.generation),
            Some((_, Err(e))) => return Forward::Ended(e.to_string()),
            None => return Forward::Ended("cancelled".into()),
        };
        debug!(routing_key = %delivery.routing_key, redelivered = delivery.redelivered, "delivery");
        // The buffer holds at most `prefetch` deliveries, which is all the broker sends unacked.
        tokio::select! {
            _ = shutdown.cancelled() => return Forward::Stop,
            sent = tx.send(delivery) => if sent.is_err() { return Forward::Stop },
        }
    }
}
