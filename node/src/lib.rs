//! # comodit-node (being built)
