//! Authenticated TCP between Raft peers (in progress).
