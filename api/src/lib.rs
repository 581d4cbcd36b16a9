//! # comodit-api (being built)
