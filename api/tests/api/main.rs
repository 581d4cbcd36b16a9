//! Integration tests of the REST API: the real router over the real embedded store, with fake
//! host actors (see `common`).

mod auth;
mod common;
mod errors;
mod hosts;
mod jobs;
mod misc;
mod resources;
mod tokens;
