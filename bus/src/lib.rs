//! # comodit-bus
//!
//! AMQP for comodit, over lapin on tokio: one connection per process kept up in the background,
//! publishing with confirms, consumers that survive reconnects, and the DESIGN §5 topology.
//!
//! ## Main types
//!
//! - [`Bus`]: a cheap-to-clone handle. [`Bus::start`] spawns the connection task and returns at
//!   once; the task connects, runs the [`Bus::on_connect`] routines (topology declarations),
//!   announces the connection, and on any loss reconnects with capped, jittered [`backoff`]
//!   until the shutdown token is cancelled. [`Bus::generation`] counts the connections made.
//! - [`Bus::publish`] sends an [`OutMessage`] and waits for the broker's confirm. Its error says
//!   whether the message was certainly not routed ([`BusError::NotConnected`], `Nacked`,
//!   `Unroutable`, `Refused`) or whether the outcome is unknown ([`BusError::Unknown`]).
//! - [`Bus::consume`] returns a [`Consumer`] whose [`Delivery`]s are acked by the caller once
//!   their effect is durable. It re-subscribes after every reconnect.
//! - [`Bus::request`] publishes with RabbitMQ's direct reply-to and waits for the one reply
//!   (enrollment); the answering side replies with [`Bus::publish`] to the default exchange.
//! - [`topology`]: idempotent declarations of exchanges and queues under a prefix.
//! - [`admin::BrokerAdmin`]: the management API, for per-host broker users and their
//!   permissions, the enrollment user, and closing a user's connections.
//!
//! ## How data flows
//!
//! ```text
//!              ┌──────────── connection task ─────────────┐
//!  start ────► │ connect → on_connect routines → announce │──► watch<Option<Live>>, generation
//!              │   ▲            (backoff)          │ lost │
//!              │   └───────────────────────────────┘      │
//!              └──────────────────────────────────────────┘
//!  publish ──► slot (≤ 64 in flight) → current Live → own confirm channel → basic.publish
//!              → wait confirm → Ok | Nacked | Unroutable | Refused | Unknown
//!  consume ──► task: wait Live → channel + qos(prefetch) → basic.consume → bounded mpsc(prefetch)
//!              → Consumer::next → Delivery::ack / nack ; on loss: wait next Live, subscribe again
//! ```
//!
//! Nothing is queued while disconnected: a publish without a connection fails at once with
//! [`BusError::NotConnected`] and the caller decides (the store, not the broker, holds pending
//! work: DESIGN §5). The password in the broker url is never logged ([`redact_url`]).

mod config;
mod connection;
mod consume;
mod error;
mod publish;

pub mod admin;
pub mod backoff;
pub mod topology;

pub use config::{redact_url, BusConfig};
pub use connection::{
    Bus, MAX_PUBLISHES_IN_FLIGHT, NODE_PUBLISHES_IN_FLIGHT, PUBLISHES_IN_FLIGHT_LIMIT,
};
pub use consume::{ConsumeOptions, Consumer, Delivery};
pub use error::BusError;
pub use publish::{OutMessage, RpcReply, DIRECT_REPLY_TO};

/// lapin, re-exported so users of [`Bus::channel`] and [`Bus::on_connect`] name the same types.
pub use lapin;
