//! Lease rules (being written).
