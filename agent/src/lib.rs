//! # comodit-agent (being assembled)

pub mod facts;
pub mod platform;
pub mod providers;
pub mod run;
