//! `comodit-agent apply FILE.json [--dry-run]`: the binary, on the real filesystem.

use std::process::Command;

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_comodit-agent"));
    c.env_remove("COMODIT_CONFIG").env("COMODIT_LOG", "warn");
    c
}

#[test]
fn apply_dry_run_then_enforce_then_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("etc-app");
    let file = target.join("app.conf");
    let resources = serde_json::json!([
        {"collection": "directories", "id": target.to_str().unwrap(), "spec": {"mode": "0750"}},
        {"collection": "files", "id": file.to_str().unwrap(), "spec": {"content": "port = 8080\n", "mode": "0640"}},
        {"collection": "symlinks", "id": dir.path().join("current").to_str().unwrap(), "spec": {"target": target.to_str().unwrap()}}
    ]);
    let spec = dir.path().join("resources.json");
    std::fs::write(&spec, serde_json::to_vec(&resources).unwrap()).unwrap();

    let run = |extra: &[&str]| {
        let out = agent()
            .arg("apply")
            .arg(&spec)
            .args(extra)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), json)
    };
    let (code, out) = run(&["--dry-run"]);
    assert_eq!(code, Some(0));
    assert_eq!(out["changed"], 3, "{out}");
    assert!(!target.exists(), "dry run created the directory");

    let (code, out) = run(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out["changed"], 3);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "port = 8080\n");

    let (code, out) = run(&[]);
    assert_eq!(code, Some(0));
    assert_eq!(out["changed"], 0, "second apply changed something: {out}");
}

#[test]
fn a_failing_resource_stops_the_list_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing_parent = dir.path().join("no/such/dir/file");
    let after = dir.path().join("after");
    let resources = serde_json::json!({"resources": [
        {"collection": "files", "id": missing_parent.to_str().unwrap(), "spec": {"content": "x"}},
        {"collection": "files", "id": after.to_str().unwrap(), "spec": {"content": "y"}}
    ]});
    let spec = dir.path().join("r.json");
    std::fs::write(&spec, serde_json::to_vec(&resources).unwrap()).unwrap();
    let out = agent().arg("apply").arg(&spec).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["results"][0]["error"].is_string(), "{json}");
    assert_eq!(json["results"][1]["skipped"], true);
    assert!(!after.exists());
}

#[test]
fn a_bad_file_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("r.json");
    std::fs::write(
        &spec,
        br#"[{"collection": "files", "id": "relative/path"}]"#,
    )
    .unwrap();
    let out = agent().arg("apply").arg(&spec).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("absolute"));
}
