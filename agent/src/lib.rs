//! # comodit-agent
//!
//! The daemon on every managed host. It connects *out* to the broker with its own credentials (no
//! open port), consumes only its queue `<prefix>.agent.<host>`, and publishes replies and events on
//! `<prefix>.up` (DESIGN §5–§6, §12).
//!
//! How a command flows:
//! [`daemon`] takes a delivery → [`exec::Executor`] decodes it, checks host, dedup window, expiry and
//! epoch ([`state::LocalStore`]), then runs the op: resource ops go to a [`providers::Provider`] per
//! collection (picked for this Linux by [`platform`]), `run` to [`run`], `facts` to [`facts`] → the
//! reply is recorded, published (confirmed) and only then the delivery is acked.
//!
//! Beside it, [`compliance`] re-checks the monitored baseline (on an interval and on inotify events)
//! and sends `drift` / `drift_cleared` once per transition; policy `enforce` repairs.
//! [`oneshot`] applies a resource file locally without a broker. Counters live in [`stats`].
//! [`enroll`] gets the host its identity and broker credentials from the node, with a token.
//!
//! Entry point for tests and the binary: [`daemon::run`]`(config, shutdown)`.

pub mod compliance;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod exec;
pub mod facts;
pub mod oneshot;
pub mod platform;
pub mod providers;
pub mod run;
pub mod state;
pub mod stats;

pub use config::AgentConfig;
pub use daemon::run;
