//! Helpers shared by the bus's integration tests (each test binary includes this module).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use comodit_bus::{Bus, BusConfig, Consumer, Delivery};
use tokio_util::sync::CancellationToken;

/// Deadline for anything a live local broker does at once (a delivery, a reconnect).
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A bus on `url` with a short backoff, so reconnects in tests take a fraction of a second.
pub fn start(url: String, name: &str, shutdown: &CancellationToken) -> Bus {
    let config = BusConfig {
        url,
        connection_name: format!("comodit-test-{name}"),
        backoff_min_ms: 50,
        backoff_max_ms: 500,
        ..BusConfig::default()
    };
    Bus::start(config, shutdown.clone())
}

/// The next delivery, or a panic naming what was awaited.
pub async fn recv(consumer: &mut Consumer, what: &str) -> Delivery {
    tokio::time::timeout(DEADLINE, consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no delivery of {what} within {DEADLINE:?}"))
        .unwrap_or_else(|| panic!("consumer ended while waiting for {what}"))
}

/// Waits until the generation watch reaches at least `at_least`.
pub async fn wait_generation(bus: &Bus, at_least: u64) -> u64 {
    let mut rx = bus.generation();
    let g = tokio::time::timeout(DEADLINE, rx.wait_for(|g| *g >= at_least))
        .await
        .unwrap_or_else(|_| panic!("generation did not reach {at_least} within {DEADLINE:?}"))
        .expect("generation watch closed");
    *g
}

/// Runs blocking test-kit work (HTTP, rabbitmqctl) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking helper panicked")
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (default: the bus at debug).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("comodit_bus=debug,lapin=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `rabbitmqctl` (the broker offers no notification for this) until the queue shows
/// these (ready, unacked) counts, or panics at the deadline.
pub async fn wait_counts(queue: String, want: (u64, u64)) {
    let until = Instant::now() + DEADLINE;
    loop {
        let q = queue.clone();
        let got = blocking(move || comodit_testkit::queue_counts(&q)).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{queue}: counts {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The runtime for tests that must hold a std lock (the broker lock) around their async body.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
