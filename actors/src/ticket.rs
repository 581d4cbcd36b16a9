//! A delivery travelling from the shard consumer to a host actor, settled exactly once.
//!
//! Every delivery must be acked or nacked, or it holds one of the shard's prefetch slots until
//! the channel closes. A [`Ticket`] dropped unsettled (an actor stopped with messages in its
//! mailbox, an arbiter shut down) puts its delivery back in the queue.

use std::time::Duration;

use comodit_bus::Delivery;
use tokio::runtime::Handle;
use tracing::debug;

pub struct Ticket {
    delivery: Option<Delivery>,
    /// Where acks run (the bus's runtime), whatever thread drops the ticket.
    rt: Handle,
}

impl Ticket {
    pub fn new(delivery: Delivery, rt: Handle) -> Ticket {
        Ticket {
            delivery: Some(delivery),
            rt,
        }
    }

    /// The effect is durable: the broker may forget the message.
    pub async fn ack(mut self) {
        if let Some(d) = self.delivery.take() {
            if let Err(e) = d.ack().await {
                // Stale: its channel died and the broker redelivers it; handlers are idempotent.
                debug!(error = %e, "ack not sent");
            }
        }
    }

    /// The effect could not be made durable: put the message back after `delay`, so a failing
    /// store or a lost lease does not spin the queue.
    pub async fn requeue_after(mut self, delay: Duration) {
        if let Some(d) = self.delivery.take() {
            tokio::time::sleep(delay).await;
            if let Err(e) = d.nack(true).await {
                debug!(error = %e, "nack not sent");
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(d) = self.delivery.take() {
            self.rt.spawn(async move {
                let _ = d.nack(true).await;
            });
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("settled", &self.delivery.is_none())
            .finish()
    }
}
