//! Compliance through the executor, without a broker: the real providers against the real OS
//! (files in temporary directories, dpkg, users in a throwaway root).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use comodit_agent::compliance;
use comodit_agent::exec::{Executor, Providers};
use comodit_agent::platform::Platform;
use comodit_agent::providers::cmd::SystemRunner;
use comodit_agent::state::LocalStore;
use comodit_agent::stats::Stats;
use comodit_protocol::*;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Fixture {
    exec: Arc<Executor>,
    events: mpsc::Receiver<Up>,
    root: tempfile::TempDir,
    _state: tempfile::TempDir,
}

/// A throwaway system root holding just the account files the shadow tools need.
fn system_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    for (name, content, mode) in [
        ("passwd", "root:x:0:0:root:/root:/bin/bash\n", 0o644),
        ("group", "root:x:0:\nusers:x:100:\n", 0o644),
        ("shadow", "root:*:19000:0:99999:7:::\n", 0o640),
        ("gshadow", "root:*::\nusers:*::\n", 0o640),
        (
            "login.defs",
            "UID_MIN 1000\nUID_MAX 60000\nSYS_UID_MIN 100\nSYS_UID_MAX 999\nGID_MIN 1000\nGID_MAX 60000\nSYS_GID_MIN 100\nSYS_GID_MAX 999\nUSERGROUPS_ENAB yes\n",
            0o644,
        ),
    ] {
        std::fs::write(etc.join(name), content).unwrap();
        std::fs::set_permissions(etc.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    dir
}

fn fixture() -> Fixture {
    let root = system_root();
    let state = tempfile::tempdir().unwrap();
    let platform = Platform::detect(&SystemRunner);
    let providers = Providers::for_host(
        &platform,
        Arc::new(SystemRunner),
        Some(root.path().to_owned()),
    );
    let (tx, events) = mpsc::channel(64);
    let exec = Executor::new(
        HostId::random(),
        platform,
        providers,
        LocalStore::open(state.path(), 64).unwrap(),
        Arc::new(Stats::new()),
        tx,
        CancellationToken::new(),
    );
    Fixture {
        exec,
        events,
        root,
        _state: state,
    }
}

fn resource(value: serde_json::Value) -> Resource {
    serde_json::from_value(value).unwrap()
}

fn drain(rx: &mut mpsc::Receiver<Up>) -> Vec<Up> {
    let mut out = Vec::new();
    while let Ok(up) = rx.try_recv() {
        out.push(up);
    }
    out
}

async fn monitor(f: &Fixture, resources: Vec<Resource>) {
    let (results, ok) = f
        .exec
        .apply_blocking(resources.clone(), ApplyMode::Enforce)
        .await;
    assert!(ok, "{results:?}");
    f.exec.store.set_baseline(&resources).unwrap();
}

#[tokio::test]
async fn file_drift_edited_chmodded_deleted_reported_once_each() {
    let mut f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.conf");
    let r = resource(json!({"collection": "files", "id": path.to_str().unwrap(),
                            "spec": {"content": "a=1\n", "mode": "0644"}}));
    monitor(&f, vec![r.clone()]).await;
    assert!(compliance::check(&f.exec, None).await.unwrap().is_empty());
    assert!(drain(&mut f.events).is_empty());

    for (what, breakit) in [
        (
            "edited",
            Box::new(|p: &std::path::Path| std::fs::write(p, "a=2\n").unwrap())
                as Box<dyn Fn(&std::path::Path)>,
        ),
        (
            "chmod",
            Box::new(|p: &std::path::Path| {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap()
            }),
        ),
        (
            "deleted",
            Box::new(|p: &std::path::Path| std::fs::remove_file(p).unwrap()),
        ),
    ] {
        breakit(&path);
        let found = compliance::check(&f.exec, None).await.unwrap();
        assert_eq!(found.len(), 1, "{what}: {found:?}");
        // A second check of the same drift sends nothing new.
        compliance::check(&f.exec, None).await.unwrap();
        let events = drain(&mut f.events);
        assert_eq!(events.len(), 1, "{what}: {events:?}");
        assert!(
            matches!(&events[0], Up::Drift(d) if d.report.r#ref == r.r#ref),
            "{what}"
        );
        // Heal it and the clearance is sent once.
        f.exec
            .apply_blocking(vec![r.clone()], ApplyMode::Enforce)
            .await;
        compliance::check(&f.exec, None).await.unwrap();
        compliance::check(&f.exec, None).await.unwrap();
        let events = drain(&mut f.events);
        assert_eq!(events.len(), 1, "{what}: {events:?}");
        assert!(matches!(&events[0], Up::DriftCleared(_)), "{what}");
    }
}

#[tokio::test]
async fn enforce_policy_repairs_and_reports_what_it_fixed() {
    let mut f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("motd");
    let r = resource(
        json!({"collection": "files", "id": path.to_str().unwrap(), "policy": "enforce",
                            "spec": {"content": "hello\n", "mode": "0644"}}),
    );
    monitor(&f, vec![r]).await;
    std::fs::write(&path, "defaced\n").unwrap();
    let found = compliance::check(&f.exec, None).await.unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].repaired);
    assert!(found[0].diff.iter().any(|d| d.field == "content"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
    // Repaired resources are not left drifted.
    assert!(f.exec.store.drift().unwrap().is_empty());
    assert_eq!(drain(&mut f.events).len(), 1);
}

#[tokio::test]
async fn package_missing_behind_the_agents_back_is_drift() {
    let f = fixture();
    // `bash` is installed: in line. A package the baseline wants but the host lacks is drift,
    // exactly what `apt-get remove` behind the agent's back leaves.
    let absent_pkg = "comodit-surely-not-installed";
    let baseline = vec![
        resource(json!({"collection": "packages", "id": "bash", "spec": {"ensure": "present"}})),
        resource(json!({"collection": "packages", "id": absent_pkg, "spec": {"ensure": "absent"}})),
    ];
    f.exec.store.set_baseline(&baseline).unwrap();
    assert!(compliance::check(&f.exec, None).await.unwrap().is_empty());

    let wanted =
        resource(json!({"collection": "packages", "id": "hello", "spec": {"ensure": "present"}}));
    let installed = std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "hello"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false);
    if installed {
        eprintln!("'hello' is installed here; checking the other direction instead");
        let unwanted = resource(
            json!({"collection": "packages", "id": "hello", "spec": {"ensure": "absent"}}),
        );
        f.exec.store.set_baseline(&[unwanted]).unwrap();
    } else {
        f.exec.store.set_baseline(&[wanted]).unwrap();
    }
    let found = compliance::check(&f.exec, None).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].diff.iter().any(|d| d.field == "ensure"),
        "{found:?}"
    );
}

#[tokio::test]
async fn user_changed_behind_the_agents_back_is_drift() {
    let f = fixture();
    let r = resource(json!({"collection": "users", "id": "deploy",
                            "spec": {"uid": 1500, "shell": "/bin/bash", "comment": "Deploy"}}));
    monitor(&f, vec![r]).await;
    assert!(compliance::check(&f.exec, None).await.unwrap().is_empty());
    let passwd = f.root.path().join("etc/passwd");
    // Edit only deploy's line, as a person with vipw would.
    let edited: String = std::fs::read_to_string(&passwd)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("deploy:") {
                l.replace("/bin/bash", "/bin/sh")
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&passwd, &edited).unwrap();
    let found = compliance::check(&f.exec, None).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let shell = found[0]
        .diff
        .iter()
        .find(|d| d.field == "shell")
        .expect("shell diff");
    assert_eq!(shell.from, json!("/bin/sh"));
    assert_eq!(shell.to, json!("/bin/bash"));
}

#[tokio::test]
async fn set_desired_replaces_the_baseline_and_forgets_old_drift() {
    let mut f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let ra = resource(
        json!({"collection": "files", "id": a.to_str().unwrap(), "spec": {"content": "a"}}),
    );
    let rb = resource(
        json!({"collection": "files", "id": b.to_str().unwrap(), "spec": {"content": "b"}}),
    );
    monitor(&f, vec![ra.clone()]).await;
    std::fs::remove_file(&a).unwrap();
    assert_eq!(compliance::check(&f.exec, None).await.unwrap().len(), 1);
    drain(&mut f.events);

    let now = chrono::Utc::now();
    let cmd = Command {
        v: V1,
        id: CommandId::random(),
        host: f.exec.host,
        epoch: Epoch(1),
        issued_at: now,
        expires_at: now + chrono::Duration::minutes(1),
        body: Body::SetDesired {
            resources: vec![rb.clone()],
        },
    };
    let reply = f.exec.handle_command(cmd).await.expect("a reply");
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    assert_eq!(f.exec.store.baseline().unwrap(), vec![rb]);
    assert!(f.exec.store.drift().unwrap().is_empty());
    // b does not exist yet: the next check reports it.
    let found = compliance::check(&f.exec, None).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].r#ref.id.as_str(), b.to_str().unwrap());
}
