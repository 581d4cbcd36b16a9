//! Compliance: keep checking the host against its monitored baseline and report drift.
//!
//! A check is a `dry_run` of each baseline resource (the provider's diff is the drift). What changed
//! since the last check decides what is sent: a resource that starts drifting (or drifts differently)
//! sends one `drift`; one that comes back in line sends one `drift_cleared`; nothing is sent while the
//! state holds, however many checks run. With policy `enforce` a drifted resource is re-applied at once
//! and the `drift` event says it was repaired (or why the repair failed).
//!
//! Checks run every `interval` (with jitter, so a fleet does not check in step), when the baseline
//! changes, and — for files, directories and symlinks — when inotify reports a change under a monitored
//! path, so an edit is reported within moments rather than at the next interval.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use comodit_protocol::{
    ApplyMode, Drift, DriftCleared, DriftReport, FieldDiff, Policy, Resource, ResourceRef, Up, V1,
};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;

use crate::exec::Executor;

/// What one check saw of one resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    InSync,
    Drifted(Vec<FieldDiff>),
    /// Drifted, re-applied (policy enforce) and now in line.
    Repaired(Vec<FieldDiff>),
    /// Drifted, and the re-apply failed.
    RepairFailed(Vec<FieldDiff>, String),
}

/// What to send after an observation.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Drift(DriftReport),
    Cleared,
}

/// Decides the stored drift and the event for one resource (pure: the heart of "once per
/// transition"). Returns the new stored drift (None = in line) and the event to send, if any.
pub fn transition(
    previous: Option<&DriftReport>,
    r: &ResourceRef,
    observed: Observation,
    now: DateTime<Utc>,
) -> (Option<DriftReport>, Option<Transition>) {
    let report = |diff: Vec<FieldDiff>, repaired: bool, repair_error: Option<String>| DriftReport {
        r#ref: r.clone(),
        diff,
        since: previous.map(|p| p.since).unwrap_or(now),
        repaired,
        repair_error,
    };
    match observed {
        Observation::InSync => match previous {
            Some(_) => (None, Some(Transition::Cleared)),
            None => (None, None),
        },
        Observation::Repaired(diff) => {
            // Fixed at once: nothing stays drifted, the event says what was fixed.
            (None, Some(Transition::Drift(report(diff, true, None))))
        }
        Observation::Drifted(diff) => {
            let new = report(diff, false, None);
            let same = previous.is_some_and(|p| p.diff == new.diff && p.repair_error.is_none());
            let event = (!same).then(|| Transition::Drift(new.clone()));
            (Some(new), event)
        }
        Observation::RepairFailed(diff, error) => {
            let new = report(diff, false, Some(error));
            let same =
                previous.is_some_and(|p| p.diff == new.diff && p.repair_error == new.repair_error);
            let event = (!same).then(|| Transition::Drift(new.clone()));
            (Some(new), event)
        }
    }
}

/// Checks the baseline (or only `only`), sends transitions and returns the drift found (including
/// resources repaired in this check).
pub async fn check(
    exec: &Arc<Executor>,
    only: Option<&HashSet<ResourceRef>>,
) -> Result<Vec<DriftReport>, String> {
    let _lock = exec.apply_lock.lock().await;
    let baseline = exec.store.baseline().map_err(|e| e.to_string())?;
    let targets: Vec<Resource> = baseline
        .iter()
        .filter(|r| only.is_none_or(|o| o.contains(&r.r#ref)))
        .cloned()
        .collect();
    let providers = exec.providers.clone();
    let stats = exec.stats.clone();
    let observations = tokio::task::spawn_blocking(move || {
        targets
            .into_iter()
            .filter_map(|r| {
                let p = providers.get(r.r#ref.collection);
                match p.apply(&r.r#ref.id, &r.spec, ApplyMode::DryRun) {
                    Ok(c) if !c.changed => Some((r.r#ref, Observation::InSync)),
                    Ok(c) => {
                        if r.policy == Policy::Enforce {
                            match p.apply(&r.r#ref.id, &r.spec, ApplyMode::Enforce) {
                                Ok(_) => Some((r.r#ref, Observation::Repaired(c.diff))),
                                Err(e) => Some((
                                    r.r#ref,
                                    Observation::RepairFailed(c.diff, e.to_string()),
                                )),
                            }
                        } else {
                            Some((r.r#ref, Observation::Drifted(c.diff)))
                        }
                    }
                    Err(e) => {
                        // A resource that cannot even be checked is not drift: log and count it.
                        stats.inc(
                            "check_errors",
                            &[("collection", r.r#ref.collection.as_str())],
                        );
                        tracing::warn!(resource = %r.r#ref, error = %e, "compliance check failed");
                        None
                    }
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| format!("compliance check panicked: {e}"))?;

    let previous: HashMap<ResourceRef, DriftReport> = exec
        .store
        .drift()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|d| (d.r#ref.clone(), d))
        .collect();
    let now = Utc::now();
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    for (r, obs) in observations {
        seen.insert(r.clone());
        let (stored, event) = transition(previous.get(&r), &r, obs, now);
        match &stored {
            Some(d) => exec.store.set_drift(d).map_err(|e| e.to_string())?,
            None if previous.contains_key(&r) => {
                exec.store.clear_drift(&r).map_err(|e| e.to_string())?
            }
            None => {}
        }
        match event {
            Some(Transition::Drift(report)) => {
                found.push(report.clone());
                exec.stats.inc("drift_events", &[]);
                tracing::info!(resource = %r, repaired = report.repaired, "drift");
                send(
                    exec,
                    Up::Drift(Drift {
                        v: V1,
                        host: exec.host,
                        report,
                    }),
                )
                .await;
            }
            Some(Transition::Cleared) => {
                exec.stats.inc("drift_cleared_events", &[]);
                tracing::info!(resource = %r, "drift cleared");
                send(
                    exec,
                    Up::DriftCleared(DriftCleared {
                        v: V1,
                        host: exec.host,
                        r#ref: r,
                        at: now,
                    }),
                )
                .await;
            }
            None => {
                if let Some(d) = stored {
                    found.push(d);
                }
            }
        }
    }
    if only.is_none() {
        // Drift of resources that are no longer monitored is forgotten, and says so.
        for (r, _) in previous.iter().filter(|(r, _)| !seen.contains(*r)) {
            if !baseline.iter().any(|b| &b.r#ref == r) {
                exec.store.clear_drift(r).map_err(|e| e.to_string())?;
                send(
                    exec,
                    Up::DriftCleared(DriftCleared {
                        v: V1,
                        host: exec.host,
                        r#ref: r.clone(),
                        at: now,
                    }),
                )
                .await;
            }
        }
    }
    Ok(found)
}

async fn send(exec: &Executor, up: Up) {
    if exec.events.send(up).await.is_err() {
        tracing::debug!("no event publisher (one-shot mode or shutting down)");
    }
}

/// `interval` ± `jitter_pct` percent.
pub fn jittered(interval: Duration, jitter_pct: u32) -> Duration {
    let jitter = interval.as_secs_f64() * f64::from(jitter_pct.min(100)) / 100.0;
    let offset = if jitter > 0.0 {
        rand::thread_rng().gen_range(-jitter..=jitter)
    } else {
        0.0
    };
    Duration::from_secs_f64((interval.as_secs_f64() + offset).max(0.001))
}

/// Paths under watch → the monitored resources they concern.
fn watch_targets(baseline: &[Resource]) -> BTreeMap<PathBuf, Vec<ResourceRef>> {
    let mut by_path: BTreeMap<PathBuf, Vec<ResourceRef>> = BTreeMap::new();
    for r in baseline.iter().filter(|r| r.r#ref.collection.is_path()) {
        by_path
            .entry(PathBuf::from(r.r#ref.id.as_str()))
            .or_default()
            .push(r.r#ref.clone());
    }
    by_path
}

/// Runs checks until shutdown: on the interval, on kicks, and on inotify events for monitored paths.
pub async fn run_loop(exec: Arc<Executor>, interval: Duration, jitter_pct: u32, use_inotify: bool) {
    let (changed_tx, mut changed_rx) = mpsc::channel::<PathBuf>(1024);
    let mut watcher = if use_inotify {
        Watcher::start(changed_tx).map_err(|e| tracing::warn!(error = %e, "inotify unavailable; checking on the interval only")).ok()
    } else {
        None
    };
    // The watches follow the baseline, and are in place before the check that follows a change
    // of it: an edit made after that check started is then seen by inotify, one made before by
    // the check itself (watching only after the check left a window where an edit right after an
    // apply went unnoticed until the next interval).
    let rewatch = |watcher: Option<&mut Watcher>| {
        let targets = watch_targets(&exec.store.baseline().unwrap_or_default());
        if let Some(w) = watcher {
            w.watch_parents(targets.keys());
        }
        targets
    };
    let mut targets = rewatch(watcher.as_mut());
    let mut next = tokio::time::Instant::now() + jittered(interval, jitter_pct);
    loop {
        let mut only: Option<HashSet<ResourceRef>> = None;
        tokio::select! {
            _ = exec.shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {
                next = tokio::time::Instant::now() + jittered(interval, jitter_pct);
            }
            _ = exec.compliance_kick.notified() => {
                targets = rewatch(watcher.as_mut());
            }
            Some(path) = changed_rx.recv() => {
                // Gather the burst of events one edit makes, then check just those resources.
                let mut paths = vec![path];
                let settle = tokio::time::sleep(Duration::from_millis(100));
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        _ = &mut settle => break,
                        Some(p) = changed_rx.recv() => paths.push(p),
                    }
                }
                let refs: HashSet<ResourceRef> = paths
                    .iter()
                    .filter_map(|p| targets.get(p))
                    .flatten()
                    .cloned()
                    .collect();
                if refs.is_empty() {
                    continue;
                }
                only = Some(refs);
            }
        }
        if let Err(e) = check(&exec, only.as_ref()).await {
            tracing::error!(error = %e, "compliance check failed");
        }
    }
}

/// inotify on the parent directories of monitored paths: a file replaced by rename, deleted,
/// written or chmod'ed shows up as an event named after it in its parent.
struct Watcher {
    watches: inotify::Watches,
    /// Shared with the event task, which turns (watch, name) back into a path.
    dirs: Arc<std::sync::Mutex<HashMap<inotify::WatchDescriptor, PathBuf>>>,
}

impl Watcher {
    fn start(changed: mpsc::Sender<PathBuf>) -> std::io::Result<Self> {
        let inotify = inotify::Inotify::init()?;
        let mut stream = inotify.into_event_stream([0u8; 8192])?;
        let watches = stream.watches();
        let dirs: Arc<std::sync::Mutex<HashMap<inotify::WatchDescriptor, PathBuf>>> =
            Default::default();
        let shared = dirs.clone();
        tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { continue };
                let dir = shared.lock().unwrap().get(&event.wd).cloned();
                let (Some(dir), Some(name)) = (dir, event.name) else {
                    continue;
                };
                if changed.send(dir.join(name)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Watcher { watches, dirs })
    }

    /// Watches exactly the parents of `paths` (adding new ones, dropping the rest).
    fn watch_parents<'a>(&mut self, paths: impl Iterator<Item = &'a PathBuf>) {
        use inotify::WatchMask;
        let wanted: HashSet<&Path> = paths.filter_map(|p| p.parent()).collect();
        let mut dirs = self.dirs.lock().unwrap();
        dirs.retain(|wd, dir| {
            let keep = wanted.contains(dir.as_path());
            if !keep {
                let _ = self.watches.remove(wd.clone());
            }
            keep
        });
        let mask = WatchMask::MODIFY
            | WatchMask::ATTRIB
            | WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE;
        for dir in wanted {
            if dirs.values().any(|d| d == dir) {
                continue;
            }
            match self.watches.add(dir, mask) {
                Ok(wd) => {
                    dirs.insert(wd, dir.to_owned());
                }
                // A missing parent is itself drift the interval check reports.
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comodit_protocol::Collection;

    fn r() -> ResourceRef {
        ResourceRef::new(Collection::Files, "/etc/motd").unwrap()
    }

    fn diff(to: &str) -> Vec<FieldDiff> {
        vec![FieldDiff {
            field: "mode".into(),
            from: "0600".into(),
            to: to.into(),
        }]
    }

    #[test]
    fn drift_is_sent_once_per_transition() {
        let t0 = Utc::now();
        let (stored, event) = transition(None, &r(), Observation::InSync, t0);
        assert_eq!((stored, event), (None, None));

        let (stored, event) = transition(None, &r(), Observation::Drifted(diff("0644")), t0);
        let stored = stored.unwrap();
        assert!(matches!(event, Some(Transition::Drift(ref d)) if d.since == t0));

        // Same drift on the next check: nothing sent, `since` kept.
        let t1 = t0 + chrono::Duration::seconds(60);
        let (again, event) =
            transition(Some(&stored), &r(), Observation::Drifted(diff("0644")), t1);
        assert_eq!(event, None);
        assert_eq!(again.unwrap().since, t0);

        // Drifts differently: one new event.
        let (_, event) = transition(Some(&stored), &r(), Observation::Drifted(diff("0640")), t1);
        assert!(matches!(event, Some(Transition::Drift(_))));

        // Back in line: cleared once.
        let (cleared, event) = transition(Some(&stored), &r(), Observation::InSync, t1);
        assert_eq!((cleared, event), (None, Some(Transition::Cleared)));
    }

    #[test]
    fn enforce_repairs_and_reports() {
        let t0 = Utc::now();
        let (stored, event) = transition(None, &r(), Observation::Repaired(diff("0644")), t0);
        assert_eq!(stored, None);
        assert!(matches!(event, Some(Transition::Drift(ref d)) if d.repaired));

        let (stored, event) = transition(
            None,
            &r(),
            Observation::RepairFailed(diff("0644"), "read-only".into()),
            t0,
        );
        let stored = stored.unwrap();
        assert_eq!(stored.repair_error.as_deref(), Some("read-only"));
        assert!(event.is_some());
        let (_, event) = transition(
            Some(&stored),
            &r(),
            Observation::RepairFailed(diff("0644"), "read-only".into()),
            t0,
        );
        assert_eq!(event, None);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(100), 10);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        assert_eq!(jittered(Duration::from_secs(5), 0), Duration::from_secs(5));
    }
}
