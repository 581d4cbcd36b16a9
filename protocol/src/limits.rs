//! Size limits of the wire protocol.
//!
//! Every limit is checked where a message is parsed (`validate`), so an oversized payload is refused
//! with a clear reason before any work is done. Each has a test at the limit in this crate.

/// Largest message body accepted from the broker, in bytes. Checked before JSON parsing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Largest inline `content` of a file resource, in bytes. Larger files use `source` (URL + sha256).
pub const MAX_INLINE_CONTENT_BYTES: usize = 1024 * 1024;

/// Most resources in one `apply`, `remove` or `set_desired` command.
pub const MAX_RESOURCES_PER_COMMAND: usize = 10_000;

/// Most arguments in a `run` argv (the program included).
pub const MAX_ARGV_ITEMS: usize = 1024;

/// Largest argv of a `run`, all arguments added up, in bytes.
pub const MAX_ARGV_BYTES: usize = 128 * 1024;

/// Most environment variables given to a `run`.
pub const MAX_ENV_VARS: usize = 256;

/// Longest `run` timeout, in seconds (one day).
pub const MAX_RUN_TIMEOUT_S: u64 = 86_400;

/// Largest `output` event chunk, in bytes.
pub const MAX_OUTPUT_CHUNK_BYTES: usize = 64 * 1024;

/// Most output of a `run` kept in its reply (stdout and stderr each), in bytes. The rest is dropped
/// from the reply and the reply says it was truncated; streamed output is capped the same way.
pub const MAX_RUN_OUTPUT_BYTES: usize = 1024 * 1024;

/// Longest path of a file, directory or symlink resource, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest free-text field (comments, descriptions, reasons, URLs), in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Most labels/components/groups in one list-valued field of a spec.
pub const MAX_LIST_ITEMS: usize = 256;
