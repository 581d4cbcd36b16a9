//! The embedded backend: one redb file (written by the store work).
