//! The conformance suite every backend runs (written by the store work).
