//! placeholder, written by the bus work
