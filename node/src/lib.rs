//! # comodit-node (being built)

pub mod enroll;
