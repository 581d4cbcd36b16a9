//! One-shot mode: `comodit-agent apply FILE.json [--dry-run] [--monitor]` applies a resource list on
//! this host without a broker and prints the results (provisioning scripts, first boot).
//!
//! The file holds either a JSON array of resources or `{"resources": [...]}`, exactly as in an
//! `apply` command; it is validated the same way (unknown fields, ids, limits).

use std::path::{Path, PathBuf};

use comodit_protocol::{limits::MAX_MESSAGE_BYTES, ApplyMode, Resource, ResourceResult};
use serde::Deserialize;

use crate::exec::{apply_resources, merge_baseline, Executor};
use crate::platform::Platform;
use crate::providers::cmd::SystemRunner;
use crate::state::LocalStore;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    resources: Vec<Resource>,
}

#[derive(Debug, thiserror::Error)]
pub enum OneShotError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Parses a resource file.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Resource>, OneShotError> {
    let bad = |reason: String| OneShotError::File {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(bad(format!("larger than {MAX_MESSAGE_BYTES} bytes")));
    }
    // Parse strictly first so the error names the offending field (untagged enums hide it).
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let resources = if value.is_array() {
        serde_json::from_value::<Vec<Resource>>(value).map_err(|e| bad(e.to_string()))?
    } else {
        serde_json::from_value::<Wrapped>(value)
            .map_err(|e| bad(e.to_string()))?
            .resources
    };
    if resources.len() > comodit_protocol::limits::MAX_RESOURCES_PER_COMMAND {
        return Err(bad("too many resources".into()));
    }
    Ok(resources)
}

/// Applies the file's resources. With `monitor_state_dir`, an enforced apply also adds them to the
/// monitored baseline stored there (as a command with `monitor: true` would).
pub fn apply_file(
    path: &Path,
    mode: ApplyMode,
    system_root: Option<PathBuf>,
    monitor_state_dir: Option<&Path>,
) -> Result<(Vec<ResourceResult>, bool), OneShotError> {
    let bytes = std::fs::read(path).map_err(|e| OneShotError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let resources = parse(path, &bytes)?;
    let platform = Platform::detect(&SystemRunner);
    let providers = Executor::system_providers(&platform, system_root);
    let (results, ok) = apply_resources(&providers, &resources, mode);
    if let (Some(dir), ApplyMode::Enforce) = (monitor_state_dir, mode) {
        let store = LocalStore::open(dir, 1)?;
        let mut baseline = store.baseline()?;
        merge_baseline(&mut baseline, &resources);
        store.set_baseline(&baseline)?;
    }
    Ok((results, ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_parse_and_typos_are_named() {
        let p = Path::new("x.json");
        let list = br#"[{"collection":"files","id":"/tmp/a","spec":{"content":"x"}}]"#;
        assert_eq!(parse(p, list).unwrap().len(), 1);
        let wrapped = br#"{"resources":[{"collection":"files","id":"/tmp/a"}]}"#;
        assert_eq!(parse(p, wrapped).unwrap().len(), 1);
        let typo =
            br#"{"resources":[{"collection":"files","id":"/tmp/a","spec":{"mdoe":"0644"}}]}"#;
        let err = parse(p, typo).unwrap_err().to_string();
        assert!(err.contains("mdoe"), "{err}");
        assert!(parse(p, br#"{"resource":[]}"#).is_err());
        assert!(parse(p, b"not json").is_err());
    }
}
