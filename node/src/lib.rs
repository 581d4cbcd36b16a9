//! # comodit-node (being built)

pub mod config;
