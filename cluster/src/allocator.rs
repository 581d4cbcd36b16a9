//! Shard allocation (being written).
