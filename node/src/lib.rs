//! # comodit-node (being built)

pub mod config;
pub mod enroll;
