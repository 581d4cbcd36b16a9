//! The conformance suite: one set of checks that every [`Store`] backend must pass, so the
//! embedded, PostgreSQL and ScyllaDB backends behave the same behind `Arc<dyn Store>`.
//!
//! Each check is a public `async fn(&dyn Store)` that panics on the first deviation. A backend's
//! test file runs them all with one line:
//!
//! ```ignore
//! async fn fixture() -> comodit_store::conformance::Fixture {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
//!     comodit_store::conformance::Fixture::new(store, dir)
//! }
//! comodit_store::conformance_tests!(fixture);
//! ```
//!
//! which expands to one `#[tokio::test]` per check (so a failure names the check), or calls
//! [`run_all`] with the same factory.
//!
//! What a backend must provide to pass:
//! - the factory gives a **new, empty** store to every check (global listings such as organizations
//!   or the audit log are compared exactly);
//! - timestamps survive a round trip to the millisecond (the suite only uses whole milliseconds);
//! - records come back equal (`PartialEq`) to what was written, apart from the fields the store
//!   assigns (`version`, `seq`, `uses`, a change's `status`/`reply`/`epoch`/`updated_at`).
//!
//! Contract details that the trait's docs leave open and the suite pins down:
//! - a host without a runtime record counts as offline for `HostFilter::online`, and matches no
//!   `HostFilter::fact`; facts compare as strings (`cpus=4`);
//! - fencing keeps one epoch per host, the highest any fenced write carried: a change appended at
//!   epoch 9 refuses a runtime write at epoch 8, and the reverse;
//! - records hang off existing parents: a host needs its environment (of the same organization), a
//!   runtime record or a change needs its host, a setting its scope, a job its organization, a job
//!   result its job and host (NotFound otherwise);
//! - `delete_host` also removes the host's settings; `delete_org` its applications, enrollment
//!   tokens and settings; `delete_env` its settings;
//! - an enrollment token whose environment is gone is unusable; `max_uses: Some(0)` is invalid;
//! - `delete_setting` of a missing key is NotFound;
//! - `update_change` may move a change between any statuses; the pending index follows;
//! - an idempotency record lapses at its `expires_at` (a claim at that instant takes it over) and
//!   `purge_idempotency_keys(now)` removes those strictly before `now`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::future::Future;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use comodit_protocol::{CommandId, Epoch, Facts, HostId, Reply, Status, V1};
use sha2::{Digest, Sha256};

use crate::*;

/// The shard count the suite's hosts are spread over.
pub const N_SHARDS: u32 = 16;

/// A store under test, with whatever must live as long as it (a temporary directory, a
/// throw-away database). The store is dropped first.
pub struct Fixture {
    store: Box<dyn Store>,
    _keep: Box<dyn std::any::Any + Send>,
}

impl Fixture {
    pub fn new(store: impl Store, keep: impl std::any::Any + Send) -> Self {
        Fixture {
            store: Box::new(store),
            _keep: Box::new(keep),
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }
}

/// Calls `$mac!` with every check's name: the one list of checks.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_checks {
    ($mac:ident { $($args:tt)* }) => {
        $crate::$mac! {
            $($args)*;
            org_lifecycle,
            org_listing,
            env_lifecycle,
            deleting_an_org_or_env_removes_what_lives_in_it,
            host_lifecycle,
            host_versions,
            delete_host_removes_everything_of_the_host,
            host_pagination_walks_every_host_once,
            host_pagination_is_stable_under_inserts,
            host_filters,
            page_limits_and_cursors_are_checked,
            runtime_fencing,
            change_fencing,
            change_log,
            pending_changes_follow_status_updates,
            hosts_with_pending_changes_per_shard,
            enrollment_tokens,
            enrollment_token_use_limits,
            single_use_enrollment_token_under_concurrency,
            api_tokens,
            audit_log,
            applications,
            settings,
            jobs_and_results,
            job_changes_keep_results_and_counts,
            jobs_listed_per_org_newest_first,
            idempotency_keys,
            idempotency_keys_lapse_and_purge,
        }
    };
}

/// Expands to one `#[tokio::test]` per conformance check, each on a fresh store from `$factory`
/// (an `async fn() -> Fixture`), inside a module `conformance_suite`.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::__conformance_checks!(__conformance_tests { $factory });
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($factory:path; $($check:ident),* $(,)?) => {
        mod conformance_suite {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let fixture = $factory().await;
                    $crate::conformance::$check(fixture.store()).await;
                }
            )*
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_run_all {
    (; $($check:ident),* $(,)?) => {
        /// Every check's name, in the order [`run_all`] runs them.
        pub const CHECKS: &[&str] = &[$(stringify!($check)),*];

        /// Runs every check, each on a fresh store from `factory`.
        pub async fn run_all<F, Fut>(factory: F)
        where
            F: Fn() -> Fut,
            Fut: Future<Output = Fixture>,
        {
            $(
                let fixture = factory().await;
                tracing::info!(check = stringify!($check), "conformance check");
                $check(fixture.store()).await;
                drop(fixture);
            )*
        }
    };
}

crate::__conformance_checks!(__conformance_run_all {});

// --- helpers ---------------------------------------------------------------------------------

/// Fails unless `$result` is an `Err` matching `$pat`.
macro_rules! assert_err {
    ($result:expr, $pat:pat) => {{
        let result = $result;
        assert!(
            matches!(result, Err($pat)),
            "{}: expected Err({}), got {:?}",
            stringify!($result),
            stringify!($pat),
            result
        );
    }};
}

/// Now, to the millisecond (what every backend keeps).
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// sha256 of `secret`, lowercase hex: how tokens are looked up.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn org_record(name: &str) -> Organization {
    Organization {
        id: OrgId::random(),
        name: name.into(),
        created_at: now(),
        version: 0,
    }
}

fn env_record(org: OrgId, name: &str) -> Environment {
    Environment {
        id: EnvId::random(),
        org,
        name: name.into(),
        created_at: now(),
        version: 0,
    }
}

async fn new_org(store: &dyn Store, name: &str) -> Organization {
    let org = org_record(name);
    store.create_org(&org).await.expect("create_org");
    Organization { version: 1, ..org }
}

async fn new_env(store: &dyn Store, org: &Organization, name: &str) -> Environment {
    let env = env_record(org.id, name);
    store.create_env(&env).await.expect("create_env");
    Environment { version: 1, ..env }
}

fn host_record(env: &Environment, name: &str) -> Host {
    let id = HostId::random();
    Host {
        id,
        org: env.org,
        env: env.id,
        name: name.into(),
        labels: BTreeMap::new(),
        created_at: now(),
        enrolled_at: now(),
        shard: id.shard(N_SHARDS).0,
        version: 0,
    }
}

async fn new_host(store: &dyn Store, env: &Environment, name: &str) -> Host {
    store
        .create_host(&host_record(env, name))
        .await
        .expect("create_host")
}

/// An organization `acme` with an environment `prod`.
async fn acme(store: &dyn Store) -> (Organization, Environment) {
    let org = new_org(store, "acme").await;
    let env = new_env(store, &org, "prod").await;
    (org, env)
}

/// Creates `hosts` four at a time.
async fn create_hosts(store: &dyn Store, hosts: &[Host]) {
    async fn one_by_one(store: &dyn Store, hosts: &[Host]) {
        for host in hosts {
            store.create_host(host).await.expect("create_host");
        }
    }
    let mut parts = hosts.chunks(hosts.len().div_ceil(4).max(1));
    let mut next = || parts.next().unwrap_or_default();
    tokio::join!(
        one_by_one(store, next()),
        one_by_one(store, next()),
        one_by_one(store, next()),
        one_by_one(store, next())
    );
}

fn runtime(host: HostId, epoch: u64) -> HostRuntime {
    HostRuntime {
        host,
        epoch: Epoch(epoch),
        online: true,
        last_seen: Some(now()),
        facts: None,
        desired_digest: None,
        drift: vec![],
        updated_at: now(),
    }
}

fn change_record(host: HostId, epoch: u64) -> Change {
    Change {
        id: ChangeId::random(),
        host,
        seq: 0,
        request: serde_json::json!({"op": "facts"}),
        status: ChangeStatus::Queued,
        command_id: CommandId::random(),
        epoch: Epoch(epoch),
        requested_by: "conformance".into(),
        created_at: now(),
        updated_at: now(),
        expires_at: now() + Duration::hours(1),
        reply: None,
        job: None,
    }
}

/// A running job of `org`, created at `created_at`, for tests (the store sets its version).
/// The ids of the organization's jobs on the first page, newest first (migration tests).
pub async fn listed_job_ids(store: &dyn Store, org: OrgId) -> Vec<JobId> {
    let listed = store.list_jobs(org, &Page::first(10)).await.unwrap();
    listed.items.iter().map(|j| j.id).collect()
}

pub fn job_record(org: OrgId, created_at: DateTime<Utc>) -> Job {
    Job {
        id: JobId::random(),
        org,
        spec: serde_json::json!({}),
        status: JobStatus::Running,
        created_at,
        created_by: "conformance".into(),
        version: 0,
    }
}

fn reply(host: HostId, to: CommandId) -> Reply {
    Reply {
        v: V1,
        re: Some(to),
        host,
        status: Status::Ok,
        reason: None,
        results: vec![],
        data: None,
        started_at: now(),
        finished_at: now(),
    }
}

/// Walks a listing to its end, `limit` at a time; returns the pages. Fails if a page is over the
/// limit, if a page but the last is short, or past 10,000 pages (a cursor that never ends).
async fn walk<T, F, Fut>(limit: u32, mut list: F) -> Vec<Vec<T>>
where
    F: FnMut(Page) -> Fut,
    Fut: Future<Output = Result<Paged<T>>>,
{
    let mut pages = Vec::new();
    let mut page = Page::first(limit);
    loop {
        let got = list(page.clone()).await.expect("listing");
        assert!(
            got.items.len() <= limit as usize,
            "a page is over its limit"
        );
        pages.push(got.items);
        match got.next {
            Some(next) => {
                assert_eq!(
                    pages.last().map(Vec::len),
                    Some(limit as usize),
                    "a page with a next cursor is full"
                );
                page.cursor = Some(next);
            }
            None => return pages,
        }
        assert!(pages.len() < 10_000, "the listing does not end");
    }
}

async fn walk_all<T, F, Fut>(limit: u32, list: F) -> Vec<T>
where
    F: FnMut(Page) -> Fut,
    Fut: Future<Output = Result<Paged<T>>>,
{
    walk(limit, list).await.into_iter().flatten().collect()
}

fn ids(hosts: &[Host]) -> Vec<HostId> {
    hosts.iter().map(|h| h.id).collect()
}

fn assert_unique_ascending<T: Ord + Debug>(items: &[T]) {
    for pair in items.windows(2) {
        assert!(pair[0] < pair[1], "not strictly ascending: {pair:?}");
    }
}

// --- organizations and environments ----------------------------------------------------------

pub async fn org_lifecycle(store: &dyn Store) {
    let org = org_record("acme");
    store.create_org(&org).await.unwrap();
    let stored = store.get_org(org.id).await.unwrap().expect("created org");
    assert_eq!(
        stored,
        Organization {
            version: 1,
            ..org.clone()
        }
    );
    assert_eq!(store.get_org_by_name("acme").await.unwrap(), Some(stored));
    assert_eq!(store.get_org_by_name("other").await.unwrap(), None);
    assert_eq!(store.get_org(OrgId::random()).await.unwrap(), None);

    assert_err!(
        store.create_org(&org_record("acme")).await,
        StoreError::Conflict(_)
    );
    assert_err!(
        store
            .create_org(&Organization {
                name: "fresh".into(),
                ..org.clone()
            })
            .await,
        StoreError::Conflict(_)
    );
    for bad in ["", "-acme", "Acme", "ac_me", "ac.me", "é", &"a".repeat(64)] {
        assert_err!(
            store.create_org(&org_record(bad)).await,
            StoreError::Invalid(_)
        );
    }
    store
        .create_org(&org_record(&"a".repeat(63)))
        .await
        .unwrap();

    assert_err!(
        store.delete_org(OrgId::random()).await,
        StoreError::NotFound(_)
    );
    store.delete_org(org.id).await.unwrap();
    assert_eq!(store.get_org(org.id).await.unwrap(), None);
    assert_eq!(store.get_org_by_name("acme").await.unwrap(), None);
    assert_err!(store.delete_org(org.id).await, StoreError::NotFound(_));
    // The name is free again.
    new_org(store, "acme").await;
}

pub async fn org_listing(store: &dyn Store) {
    let names = ["delta", "alpha", "echo", "charlie", "bravo"];
    for name in names {
        new_org(store, name).await;
    }
    let pages = walk(2, |p| async move { store.list_orgs(&p).await }).await;
    let listed: Vec<Vec<String>> = pages
        .iter()
        .map(|page| page.iter().map(|o| o.name.clone()).collect())
        .collect();
    assert_eq!(
        listed,
        vec![
            vec!["alpha", "bravo"],
            vec!["charlie", "delta"],
            vec!["echo"]
        ]
    );
    let all = store.list_orgs(&Page::first(5)).await.unwrap();
    assert_eq!(all.items.len(), 5);
    assert_eq!(all.next, None, "no next cursor on the last page");
}

pub async fn env_lifecycle(store: &dyn Store) {
    let acme = new_org(store, "acme").await;
    let globex = new_org(store, "globex").await;
    assert_err!(
        store.create_env(&env_record(OrgId::random(), "prod")).await,
        StoreError::NotFound(_)
    );
    let prod = env_record(acme.id, "prod");
    store.create_env(&prod).await.unwrap();
    let stored = store.get_env(prod.id).await.unwrap().expect("created env");
    assert_eq!(
        stored,
        Environment {
            version: 1,
            ..prod.clone()
        }
    );
    assert_eq!(
        store.get_env_by_name(acme.id, "prod").await.unwrap(),
        Some(stored.clone())
    );
    assert_eq!(
        store.get_env_by_name(globex.id, "prod").await.unwrap(),
        None
    );
    assert_eq!(store.get_env(EnvId::random()).await.unwrap(), None);

    assert_err!(
        store.create_env(&env_record(acme.id, "prod")).await,
        StoreError::Conflict(_)
    );
    assert_err!(
        store
            .create_env(&Environment {
                name: "qa".into(),
                ..prod.clone()
            })
            .await,
        StoreError::Conflict(_)
    );
    assert_err!(
        store.create_env(&env_record(acme.id, "Prod!")).await,
        StoreError::Invalid(_)
    );
    // Names are unique inside one organization only.
    let globex_prod = new_env(store, &globex, "prod").await;
    let staging = new_env(store, &acme, "staging").await;
    let dev = new_env(store, &acme, "dev").await;

    let listed = walk_all(2, |p| async move { store.list_envs(acme.id, &p).await }).await;
    assert_eq!(listed, vec![dev.clone(), stored.clone(), staging.clone()]);
    let listed = walk_all(2, |p| async move { store.list_envs(globex.id, &p).await }).await;
    assert_eq!(listed, vec![globex_prod]);
    let none = store
        .list_envs(OrgId::random(), &Page::first(10))
        .await
        .unwrap();
    assert_eq!(
        none,
        Paged {
            items: vec![],
            next: None
        }
    );

    // Deleting goes bottom-up.
    let host = new_host(store, &stored, "web-1").await;
    assert_err!(store.delete_org(acme.id).await, StoreError::Conflict(_));
    assert_err!(store.delete_env(prod.id).await, StoreError::Conflict(_));
    store.delete_host(host.id).await.unwrap();
    store.delete_env(prod.id).await.unwrap();
    assert_eq!(store.get_env(prod.id).await.unwrap(), None);
    assert_eq!(store.get_env_by_name(acme.id, "prod").await.unwrap(), None);
    assert_err!(store.delete_env(prod.id).await, StoreError::NotFound(_));
    store.delete_env(staging.id).await.unwrap();
    assert_err!(store.delete_org(acme.id).await, StoreError::Conflict(_));
    store.delete_env(dev.id).await.unwrap();
    store.delete_org(acme.id).await.unwrap();
    assert_eq!(store.get_org(acme.id).await.unwrap(), None);
}

pub async fn deleting_an_org_or_env_removes_what_lives_in_it(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let globex = new_org(store, "globex").await;
    let globex_prod = new_env(store, &globex, "prod").await;
    for org in [&acme, &globex] {
        store
            .put_application(&application(org.id, "nginx", "1"))
            .await
            .unwrap();
    }
    let token = enrollment_token(&prod, "acme-secret");
    store.create_enrollment_token(&token).await.unwrap();
    let kept_token = enrollment_token(&globex_prod, "globex-secret");
    store.create_enrollment_token(&kept_token).await.unwrap();
    let setting = |scope: SettingScope| Setting {
        scope,
        key: "region".into(),
        value: serde_json::json!("eu"),
        secret: false,
        updated_at: now(),
    };
    let scopes = [
        SettingScope::Org { org: acme.id },
        SettingScope::Env { env: prod.id },
        SettingScope::Org { org: globex.id },
        SettingScope::Env {
            env: globex_prod.id,
        },
    ];
    for scope in &scopes {
        store.put_setting(&setting(scope.clone())).await.unwrap();
    }

    store.delete_env(prod.id).await.unwrap();
    assert!(store.list_settings(&scopes[1]).await.unwrap().is_empty());
    assert_eq!(store.list_settings(&scopes[0]).await.unwrap().len(), 1);
    store.delete_org(acme.id).await.unwrap();

    assert!(store.list_settings(&scopes[0]).await.unwrap().is_empty());
    assert_eq!(
        store.get_application(acme.id, "nginx", "1").await.unwrap(),
        None
    );
    let apps = store
        .list_applications(acme.id, &Page::first(10))
        .await
        .unwrap();
    assert!(apps.items.is_empty());
    assert_eq!(store.get_enrollment_token(token.id).await.unwrap(), None);
    let tokens = store
        .list_enrollment_tokens(acme.id, &Page::first(10))
        .await
        .unwrap();
    assert!(tokens.items.is_empty());
    assert_err!(
        store
            .use_enrollment_token(&sha256_hex("acme-secret"), now())
            .await,
        StoreError::NotFound(_)
    );
    // A new organization of the same name starts empty, and the other one kept everything.
    let again = new_org(store, "acme").await;
    let apps = store
        .list_applications(again.id, &Page::first(10))
        .await
        .unwrap();
    assert!(apps.items.is_empty());
    assert!(store
        .get_application(globex.id, "nginx", "1")
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store.get_enrollment_token(kept_token.id).await.unwrap(),
        Some(kept_token)
    );
    for scope in &scopes[2..] {
        assert_eq!(store.list_settings(scope).await.unwrap().len(), 1);
    }
}

// --- hosts -----------------------------------------------------------------------------------

pub async fn host_lifecycle(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let mut host = host_record(&prod, "web-1");
    host.labels.insert("role".into(), "web".into());
    host.version = 42;
    let created = store.create_host(&host).await.unwrap();
    assert_eq!(
        created,
        Host {
            version: 1,
            ..host.clone()
        }
    );
    assert_eq!(
        store.get_host(host.id).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(store.get_host(HostId::random()).await.unwrap(), None);

    assert_err!(store.create_host(&host).await, StoreError::Conflict(_));
    let mut orphan = host_record(&prod, "web-2");
    orphan.env = EnvId::random();
    assert_err!(store.create_host(&orphan).await, StoreError::NotFound(_));
    let globex = new_org(store, "globex").await;
    let mut mismatched = host_record(&prod, "web-2");
    mismatched.org = globex.id;
    assert_err!(store.create_host(&mismatched).await, StoreError::Invalid(_));
    assert_err!(
        store.create_host(&host_record(&prod, "")).await,
        StoreError::Invalid(_)
    );
    let mut bad_label = host_record(&prod, "web-2");
    bad_label.labels.insert(String::new(), "x".into());
    assert_err!(store.create_host(&bad_label).await, StoreError::Invalid(_));
    let mut long_label = host_record(&prod, "web-2");
    long_label.labels.insert("k".into(), "v".repeat(100_000));
    assert_err!(store.create_host(&long_label).await, StoreError::Invalid(_));
    let mut many_labels = host_record(&prod, "web-2");
    for i in 0..10_000 {
        many_labels.labels.insert(format!("k{i}"), "v".into());
    }
    assert_err!(
        store.create_host(&many_labels).await,
        StoreError::Invalid(_)
    );
    assert_eq!(
        ids(&walk_all(10, |p| async move {
            store.list_hosts(&HostFilter::default(), &p).await
        })
        .await),
        vec![host.id],
        "refused hosts were not stored"
    );

    assert_err!(
        store.delete_host(HostId::random()).await,
        StoreError::NotFound(_)
    );
    store.delete_host(host.id).await.unwrap();
    assert_eq!(store.get_host(host.id).await.unwrap(), None);
    assert_err!(store.delete_host(host.id).await, StoreError::NotFound(_));
}

pub async fn host_versions(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let other_env = new_env(store, &new_org(store, "globex").await, "qa").await;
    let mut host = host_record(&prod, "web-1");
    host.labels.insert("role".into(), "web".into());
    let v1 = store.create_host(&host).await.unwrap();

    let mut edit = v1.clone();
    edit.name = "web-1.example.com".into();
    edit.labels = BTreeMap::from([("role".into(), "db".into()), ("dc".into(), "eu".into())]);
    // Only name and labels are replaced, whatever else the caller sends.
    edit.env = other_env.id;
    edit.org = other_env.org;
    edit.shard = v1.shard + 1;
    let v2 = store.update_host(&edit, 1).await.unwrap();
    assert_eq!(
        v2,
        Host {
            name: "web-1.example.com".into(),
            labels: edit.labels.clone(),
            version: 2,
            ..v1.clone()
        }
    );
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(v2.clone()));

    // A writer that read version 1 is refused.
    let mut late = v1.clone();
    late.name = "late".into();
    let refused = store.update_host(&late, 1).await;
    assert_eq!(
        refused,
        Err(StoreError::VersionMismatch {
            expected: 1,
            found: 2
        })
    );
    assert_eq!(store.get_host(host.id).await.unwrap(), Some(v2.clone()));
    assert_err!(
        store.update_host(&host_record(&prod, "ghost"), 1).await,
        StoreError::NotFound(_)
    );
    let mut invalid = v2.clone();
    invalid.name = String::new();
    assert_err!(store.update_host(&invalid, 2).await, StoreError::Invalid(_));

    // The label index follows the update.
    let by_label = |k: &str, v: &str| HostFilter {
        label: Some((k.into(), v.into())),
        ..Default::default()
    };
    for (filter, want) in [
        (by_label("role", "web"), vec![]),
        (by_label("role", "db"), vec![host.id]),
        (by_label("dc", "eu"), vec![host.id]),
    ] {
        let got = store.list_hosts(&filter, &Page::first(10)).await.unwrap();
        assert_eq!(ids(&got.items), want, "{filter:?}");
    }
    // And the host stayed where it was.
    let in_env = HostFilter {
        env: Some(prod.id),
        ..Default::default()
    };
    let got = store.list_hosts(&in_env, &Page::first(10)).await.unwrap();
    assert_eq!(ids(&got.items), vec![host.id]);
}

pub async fn delete_host_removes_everything_of_the_host(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let mut host = host_record(&prod, "web-1");
    host.labels.insert("role".into(), "web".into());
    let host = store.create_host(&host).await.unwrap();
    let keep = new_host(store, &prod, "web-2").await;
    for h in [&host, &keep] {
        store.put_runtime(&runtime(h.id, 3)).await.unwrap();
        store.append_change(&change_record(h.id, 3)).await.unwrap();
        store
            .put_setting(&Setting {
                scope: SettingScope::Host { host: h.id },
                key: "motd".into(),
                value: serde_json::json!("hi"),
                secret: false,
                updated_at: now(),
            })
            .await
            .unwrap();
    }
    let change = store
        .append_change(&change_record(host.id, 3))
        .await
        .unwrap();
    let job = job_record(acme.id, now());
    store.create_job(&job).await.unwrap();
    for h in [&host, &keep] {
        store
            .put_job_result(&JobResult {
                job: job.id,
                host: h.id,
                change: None,
                status: ChangeStatus::Queued,
                updated_at: now(),
            })
            .await
            .unwrap();
    }

    store.delete_host(host.id).await.unwrap();

    assert_eq!(store.get_host(host.id).await.unwrap(), None);
    assert_eq!(store.get_runtime(host.id).await.unwrap(), None);
    assert_eq!(store.get_change(host.id, change.id).await.unwrap(), None);
    let log = store.list_changes(host.id, &Page::first(10)).await.unwrap();
    assert!(log.items.is_empty(), "change log left: {log:?}");
    assert!(store.pending_changes(host.id).await.unwrap().is_empty());
    let pending = store.hosts_with_pending_changes(host.shard).await.unwrap();
    assert!(!pending.contains(&host.id), "pending index left");
    let results = store
        .list_job_results(job.id, &Page::first(10))
        .await
        .unwrap();
    assert_eq!(
        results.items.iter().map(|r| r.host).collect::<Vec<_>>(),
        vec![keep.id]
    );
    let scope = SettingScope::Host { host: host.id };
    assert!(store.list_settings(&scope).await.unwrap().is_empty());
    for filter in [
        HostFilter::default(),
        HostFilter {
            org: Some(acme.id),
            ..Default::default()
        },
        HostFilter {
            env: Some(prod.id),
            ..Default::default()
        },
        HostFilter {
            shard: Some(host.shard),
            ..Default::default()
        },
        HostFilter {
            label: Some(("role".into(), "web".into())),
            ..Default::default()
        },
        HostFilter {
            online: Some(true),
            ..Default::default()
        },
    ] {
        let got = store.list_hosts(&filter, &Page::first(10)).await.unwrap();
        assert!(
            !ids(&got.items).contains(&host.id),
            "{filter:?} still lists it"
        );
    }
    assert_err!(
        store.put_runtime(&runtime(host.id, 9)).await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store.append_change(&change_record(host.id, 9)).await,
        StoreError::NotFound(_)
    );
    // The other host kept everything.
    assert!(store.get_runtime(keep.id).await.unwrap().is_some());
    assert_eq!(store.pending_changes(keep.id).await.unwrap().len(), 1);
    let scope = SettingScope::Host { host: keep.id };
    assert_eq!(store.list_settings(&scope).await.unwrap().len(), 1);
}

pub async fn host_pagination_walks_every_host_once(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let hosts: Vec<Host> = (0..2500)
        .map(|i| host_record(&prod, &format!("h{i}")))
        .collect();
    create_hosts(store, &hosts).await;

    let all = HostFilter::default();
    let pages = walk(100, |p| {
        let all = &all;
        async move { store.list_hosts(all, &p).await }
    })
    .await;
    assert_eq!(pages.len(), 25);
    assert!(pages.iter().all(|p| p.len() == 100));
    let listed: Vec<HostId> = pages.iter().flat_map(|p| ids(p)).collect();
    assert_unique_ascending(&listed);
    let mut want = ids(&hosts);
    want.sort();
    assert_eq!(listed, want, "every host exactly once, by id");

    // The same walk again gives the same pages.
    let again = walk(100, |p| {
        let all = &all;
        async move { store.list_hosts(all, &p).await }
    })
    .await;
    assert_eq!(again, pages);

    // Filtered listings page the same way.
    let in_env = HostFilter {
        env: Some(prod.id),
        ..Default::default()
    };
    let listed = walk_all(Page::MAX_LIMIT, |p| {
        let in_env = &in_env;
        async move { store.list_hosts(in_env, &p).await }
    })
    .await;
    assert_eq!(ids(&listed), want);
}

pub async fn host_pagination_is_stable_under_inserts(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let before: Vec<Host> = (0..300)
        .map(|i| host_record(&prod, &format!("h{i}")))
        .collect();
    create_hosts(store, &before).await;

    let all = HostFilter::default();
    let first = store.list_hosts(&all, &Page::first(100)).await.unwrap();
    assert_eq!(first.items.len(), 100);
    let mut seen = ids(&first.items);
    let mut cursor = first.next.expect("more pages");
    let mut inserted = Vec::new();
    loop {
        // Hosts arrive between pages, with ids before and after the cursor.
        let batch: Vec<Host> = (0..20)
            .map(|i| host_record(&prod, &format!("late{i}")))
            .collect();
        create_hosts(store, &batch).await;
        inserted.extend(ids(&batch));
        let page = store
            .list_hosts(
                &all,
                &Page {
                    cursor: Some(cursor),
                    limit: 100,
                },
            )
            .await
            .unwrap();
        seen.extend(ids(&page.items));
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
        assert!(seen.len() < 10_000, "the listing does not end");
    }
    assert_unique_ascending(&seen);
    let seen: BTreeSet<HostId> = seen.into_iter().collect();
    for host in &before {
        assert!(
            seen.contains(&host.id),
            "host {} present all along was skipped",
            host.id
        );
    }
    assert!(
        seen.iter()
            .all(|id| before.iter().any(|h| h.id == *id) || inserted.contains(id)),
        "a listed host was never created"
    );
}

pub async fn host_filters(store: &dyn Store) {
    let acme = new_org(store, "acme").await;
    let globex = new_org(store, "globex").await;
    let envs = [
        new_env(store, &acme, "prod").await,
        new_env(store, &acme, "qa").await,
        new_env(store, &globex, "prod").await,
    ];
    let mut hosts = Vec::new();
    let mut runtimes: BTreeMap<HostId, HostRuntime> = BTreeMap::new();
    for i in 0..48usize {
        let mut host = host_record(&envs[i % 3], &format!("h{i}"));
        host.labels
            .insert("role".into(), ["web", "db"][i % 2].into());
        if i % 5 == 0 {
            host.labels.insert("canary".into(), String::new());
        }
        let host = store.create_host(&host).await.unwrap();
        if i % 4 != 0 {
            let mut rt = runtime(host.id, 1);
            rt.online = i % 4 != 1;
            if i % 7 != 0 {
                rt.facts = Some(Facts {
                    os_family: ["debian", "rhel", "suse"][i % 3].into(),
                    cpus: (i % 2 + 1) as u32,
                    package_manager: (i % 3 == 0).then(|| "apt".into()),
                    ..Default::default()
                });
            }
            store.put_runtime(&rt).await.unwrap();
            runtimes.insert(host.id, rt);
        }
        hosts.push(host);
    }

    let matches = |f: &HostFilter, h: &Host| {
        let rt = runtimes.get(&h.id);
        let facts = rt.and_then(|r| r.facts.as_ref());
        f.org.is_none_or(|o| o == h.org)
            && f.env.is_none_or(|e| e == h.env)
            && f.shard.is_none_or(|s| s == h.shard)
            && f.label
                .as_ref()
                .is_none_or(|(k, v)| h.labels.get(k) == Some(v))
            && f.online
                .is_none_or(|want| want == rt.is_some_and(|r| r.online))
            && f.fact.as_ref().is_none_or(|(k, v)| {
                facts.is_some_and(|facts| match k.as_str() {
                    "os_family" => &facts.os_family == v,
                    "cpus" => &facts.cpus.to_string() == v,
                    "package_manager" => facts.package_manager.as_ref() == Some(v),
                    other => panic!("no expectation for fact {other}"),
                })
            })
    };
    let label = |k: &str, v: &str| Some((k.to_string(), v.to_string()));
    let fact = label;
    let shard = hosts[0].shard;
    let filters = [
        HostFilter::default(),
        HostFilter {
            org: Some(acme.id),
            ..Default::default()
        },
        HostFilter {
            org: Some(globex.id),
            ..Default::default()
        },
        HostFilter {
            org: Some(OrgId::random()),
            ..Default::default()
        },
        HostFilter {
            env: Some(envs[1].id),
            ..Default::default()
        },
        HostFilter {
            label: label("role", "web"),
            ..Default::default()
        },
        HostFilter {
            label: label("canary", ""),
            ..Default::default()
        },
        HostFilter {
            label: label("role", "cache"),
            ..Default::default()
        },
        HostFilter {
            online: Some(true),
            ..Default::default()
        },
        HostFilter {
            online: Some(false),
            ..Default::default()
        },
        HostFilter {
            fact: fact("os_family", "rhel"),
            ..Default::default()
        },
        HostFilter {
            fact: fact("cpus", "2"),
            ..Default::default()
        },
        HostFilter {
            fact: fact("package_manager", "apt"),
            ..Default::default()
        },
        HostFilter {
            shard: Some(shard),
            ..Default::default()
        },
        HostFilter {
            org: Some(acme.id),
            label: label("role", "db"),
            online: Some(true),
            ..Default::default()
        },
        HostFilter {
            env: Some(envs[2].id),
            fact: fact("os_family", "suse"),
            ..Default::default()
        },
        HostFilter {
            org: Some(globex.id),
            env: Some(envs[0].id),
            ..Default::default()
        },
        HostFilter {
            label: label("role", "web"),
            shard: Some(shard),
            online: Some(false),
            ..Default::default()
        },
        HostFilter {
            org: Some(acme.id),
            env: Some(envs[0].id),
            label: label("role", "web"),
            online: Some(true),
            fact: fact("cpus", "1"),
            shard: None,
        },
    ];
    let mut nonempty = 0;
    for filter in &filters {
        let mut want: Vec<HostId> = hosts
            .iter()
            .filter(|h| matches(filter, h))
            .map(|h| h.id)
            .collect();
        want.sort();
        nonempty += usize::from(!want.is_empty());
        // Small pages: `walk` checks that every page but the last is full.
        let got = walk_all(3, |p| async move { store.list_hosts(filter, &p).await }).await;
        assert_eq!(ids(&got), want, "{filter:?}");
        for h in &got {
            let stored = hosts.iter().find(|x| x.id == h.id).unwrap();
            assert_eq!(h, stored);
        }
    }
    assert!(nonempty >= 14, "the data set exercises the filters");
}

pub async fn page_limits_and_cursors_are_checked(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let host = new_host(store, &prod, "web-1").await;
    let all = HostFilter::default();
    for limit in [0, Page::MAX_LIMIT + 1, u32::MAX] {
        let page = Page::first(limit);
        assert_err!(store.list_hosts(&all, &page).await, StoreError::Invalid(_));
        assert_err!(store.list_orgs(&page).await, StoreError::Invalid(_));
        assert_err!(
            store.list_envs(acme.id, &page).await,
            StoreError::Invalid(_)
        );
        assert_err!(
            store.list_changes(host.id, &page).await,
            StoreError::Invalid(_)
        );
        assert_err!(
            store.list_enrollment_tokens(acme.id, &page).await,
            StoreError::Invalid(_)
        );
        assert_err!(store.list_api_tokens(&page).await, StoreError::Invalid(_));
        assert_err!(store.list_audit(&page).await, StoreError::Invalid(_));
        assert_err!(
            store.list_applications(acme.id, &page).await,
            StoreError::Invalid(_)
        );
        assert_err!(
            store.list_job_results(JobId::random(), &page).await,
            StoreError::Invalid(_)
        );
    }
    let max = store
        .list_hosts(&all, &Page::first(Page::MAX_LIMIT))
        .await
        .unwrap();
    assert_eq!(ids(&max.items), vec![host.id]);
    assert_eq!(max.next, None);
    for bad in ["not a cursor", "zz", "", "\u{0}"] {
        let page = Page {
            cursor: Some(bad.into()),
            limit: 10,
        };
        assert_err!(store.list_hosts(&all, &page).await, StoreError::Invalid(_));
        assert_err!(store.list_audit(&page).await, StoreError::Invalid(_));
    }
}

// --- runtime and fencing ---------------------------------------------------------------------

pub async fn runtime_fencing(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let host = new_host(store, &prod, "web-1").await;
    assert_eq!(store.get_runtime(host.id).await.unwrap(), None);
    assert_err!(
        store.put_runtime(&runtime(HostId::random(), 1)).await,
        StoreError::NotFound(_)
    );

    let mut rt = runtime(host.id, 5);
    rt.facts = Some(Facts {
        hostname: "web-1".into(),
        os_family: "debian".into(),
        cpus: 2,
        ..Default::default()
    });
    rt.desired_digest = Some("d1".into());
    store.put_runtime(&rt).await.unwrap();
    assert_eq!(store.get_runtime(host.id).await.unwrap(), Some(rt.clone()));

    let mut stale = rt.clone();
    stale.epoch = Epoch(4);
    stale.online = false;
    assert_eq!(
        store.put_runtime(&stale).await,
        Err(StoreError::StaleEpoch {
            given: Epoch(4),
            stored: Epoch(5)
        })
    );
    assert_eq!(store.get_runtime(host.id).await.unwrap(), Some(rt.clone()));

    // The same epoch writes again (the owner updating its own record).
    let mut same = rt.clone();
    same.online = false;
    store.put_runtime(&same).await.unwrap();
    assert_eq!(
        store.get_runtime(host.id).await.unwrap(),
        Some(same.clone())
    );

    // A new owner raises the epoch; the previous one is then stale.
    let mut newer = same.clone();
    newer.epoch = Epoch(8);
    newer.online = true;
    store.put_runtime(&newer).await.unwrap();
    assert_eq!(
        store.put_runtime(&same).await,
        Err(StoreError::StaleEpoch {
            given: Epoch(5),
            stored: Epoch(8)
        })
    );
    assert_eq!(store.get_runtime(host.id).await.unwrap(), Some(newer));
}

pub async fn change_fencing(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let host = new_host(store, &prod, "web-1").await;
    store.put_runtime(&runtime(host.id, 5)).await.unwrap();

    assert_eq!(
        store.append_change(&change_record(host.id, 4)).await,
        Err(StoreError::StaleEpoch {
            given: Epoch(4),
            stored: Epoch(5)
        })
    );
    let log = store.list_changes(host.id, &Page::first(10)).await.unwrap();
    assert!(log.items.is_empty(), "a refused append left {log:?}");
    let change = store
        .append_change(&change_record(host.id, 5))
        .await
        .unwrap();
    assert_eq!(change.epoch, Epoch(5));

    // Updates are fenced by the change's own epoch and the host's.
    assert_eq!(
        store
            .update_change(host.id, change.id, ChangeStatus::Dispatched, None, Epoch(4))
            .await,
        Err(StoreError::StaleEpoch {
            given: Epoch(4),
            stored: Epoch(5)
        })
    );
    let same = store
        .update_change(host.id, change.id, ChangeStatus::Dispatched, None, Epoch(5))
        .await
        .unwrap();
    assert_eq!(same.status, ChangeStatus::Dispatched);
    assert_eq!(same.epoch, Epoch(5));

    // A new owner takes the change over at epoch 7...
    let taken = store
        .update_change(host.id, change.id, ChangeStatus::Queued, None, Epoch(7))
        .await
        .unwrap();
    assert_eq!(taken.epoch, Epoch(7));
    // ...and from then on the old owner can write nothing for the host.
    assert_eq!(
        store
            .update_change(host.id, change.id, ChangeStatus::Applied, None, Epoch(5))
            .await,
        Err(StoreError::StaleEpoch {
            given: Epoch(5),
            stored: Epoch(7)
        })
    );
    assert_eq!(
        store.put_runtime(&runtime(host.id, 5)).await,
        Err(StoreError::StaleEpoch {
            given: Epoch(5),
            stored: Epoch(7)
        })
    );
    assert_eq!(
        store.append_change(&change_record(host.id, 6)).await,
        Err(StoreError::StaleEpoch {
            given: Epoch(6),
            stored: Epoch(7)
        })
    );
    let stored = store.get_change(host.id, change.id).await.unwrap().unwrap();
    assert_eq!(stored.status, ChangeStatus::Queued);
    assert_eq!(stored.epoch, Epoch(7));

    // An append at a higher epoch raises the host's fence for runtime writes too.
    let other = new_host(store, &prod, "web-2").await;
    store.put_runtime(&runtime(other.id, 2)).await.unwrap();
    store
        .append_change(&change_record(other.id, 9))
        .await
        .unwrap();
    assert_eq!(
        store.put_runtime(&runtime(other.id, 8)).await,
        Err(StoreError::StaleEpoch {
            given: Epoch(8),
            stored: Epoch(9)
        })
    );
    store.put_runtime(&runtime(other.id, 9)).await.unwrap();
    // Fences are per host.
    store.put_runtime(&runtime(host.id, 7)).await.unwrap();
}

// --- change log ------------------------------------------------------------------------------

pub async fn change_log(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let host = new_host(store, &prod, "web-1").await;
    let other = new_host(store, &prod, "web-2").await;
    assert_err!(
        store
            .append_change(&change_record(HostId::random(), 1))
            .await,
        StoreError::NotFound(_)
    );

    let mut appended = Vec::new();
    for i in 1..=5u64 {
        let mut change = change_record(host.id, 1);
        change.seq = 99; // assigned by the store
        change.request = serde_json::json!({"op": "run", "n": i});
        let stored = store.append_change(&change).await.unwrap();
        assert_eq!(stored, Change { seq: i, ..change });
        appended.push(stored);
    }
    // Each host has its own sequence.
    let first_of_other = store
        .append_change(&change_record(other.id, 1))
        .await
        .unwrap();
    assert_eq!(first_of_other.seq, 1);

    for change in &appended {
        assert_eq!(
            store.get_change(host.id, change.id).await.unwrap(),
            Some(change.clone())
        );
    }
    assert_eq!(
        store.get_change(host.id, ChangeId::random()).await.unwrap(),
        None
    );
    assert_eq!(
        store.get_change(other.id, appended[0].id).await.unwrap(),
        None,
        "a change is found only under its own host"
    );
    assert_err!(
        store
            .append_change(&Change {
                seq: 0,
                ..appended[2].clone()
            })
            .await,
        StoreError::Conflict(_)
    );

    let pages = walk(2, |p| async move { store.list_changes(host.id, &p).await }).await;
    let seqs: Vec<Vec<u64>> = pages
        .iter()
        .map(|p| p.iter().map(|c| c.seq).collect())
        .collect();
    assert_eq!(seqs, vec![vec![5, 4], vec![3, 2], vec![1]], "newest first");

    let done = reply(host.id, appended[1].command_id);
    let updated = store
        .update_change(
            host.id,
            appended[1].id,
            ChangeStatus::Applied,
            Some(done.clone()),
            Epoch(1),
        )
        .await
        .unwrap();
    assert_eq!(updated.status, ChangeStatus::Applied);
    assert_eq!(updated.reply, Some(done.clone()));
    assert_eq!(updated.seq, 2);
    assert_eq!(updated.request, appended[1].request);
    assert_eq!(
        store.get_change(host.id, appended[1].id).await.unwrap(),
        Some(updated.clone())
    );
    // No reply given: the stored one stays.
    let kept = store
        .update_change(
            host.id,
            appended[1].id,
            ChangeStatus::Failed,
            None,
            Epoch(1),
        )
        .await
        .unwrap();
    assert_eq!(kept.reply, Some(done));
    assert_err!(
        store
            .update_change(
                host.id,
                ChangeId::random(),
                ChangeStatus::Applied,
                None,
                Epoch(1)
            )
            .await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store
            .update_change(
                other.id,
                appended[0].id,
                ChangeStatus::Applied,
                None,
                Epoch(1)
            )
            .await,
        StoreError::NotFound(_)
    );
    let log = store
        .list_changes(HostId::random(), &Page::first(10))
        .await
        .unwrap();
    assert_eq!(
        log,
        Paged {
            items: vec![],
            next: None
        }
    );
}

pub async fn pending_changes_follow_status_updates(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let host = new_host(store, &prod, "web-1").await;
    let host_id = host.id;
    let mut changes = Vec::new();
    for status in [
        ChangeStatus::Queued,
        ChangeStatus::Dispatched,
        ChangeStatus::Applied,
        ChangeStatus::Queued,
        ChangeStatus::Cancelled,
    ] {
        let mut change = change_record(host.id, 1);
        change.status = status;
        changes.push(store.append_change(&change).await.unwrap());
    }
    let pending_seqs = || async move {
        let pending = store.pending_changes(host_id).await.unwrap();
        assert!(pending.iter().all(|c| c.status.is_pending()));
        pending.iter().map(|c| c.seq).collect::<Vec<_>>()
    };
    assert_eq!(pending_seqs().await, vec![1, 2, 4], "oldest first");

    let set = |i: usize, status: ChangeStatus| {
        let id = changes[i].id;
        async move {
            store
                .update_change(host_id, id, status, None, Epoch(1))
                .await
                .unwrap()
        }
    };
    set(0, ChangeStatus::Dispatched).await;
    assert_eq!(pending_seqs().await, vec![1, 2, 4]);
    set(1, ChangeStatus::Applied).await;
    assert_eq!(pending_seqs().await, vec![1, 4]);
    set(3, ChangeStatus::Expired).await;
    assert_eq!(pending_seqs().await, vec![1]);
    // Back to queued (a failover re-queues): pending again.
    set(2, ChangeStatus::Queued).await;
    assert_eq!(pending_seqs().await, vec![1, 3]);
    let pending = store.pending_changes(host.id).await.unwrap();
    assert_eq!(pending[0].status, ChangeStatus::Dispatched);
    assert_eq!(pending[1].status, ChangeStatus::Queued);
    set(0, ChangeStatus::Failed).await;
    set(2, ChangeStatus::Cancelled).await;
    assert!(pending_seqs().await.is_empty());
    assert!(!store
        .hosts_with_pending_changes(host.shard)
        .await
        .unwrap()
        .contains(&host.id));
    assert!(store
        .pending_changes(HostId::random())
        .await
        .unwrap()
        .is_empty());
}

pub async fn hosts_with_pending_changes_per_shard(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let hosts: Vec<Host> = (0..64)
        .map(|i| host_record(&prod, &format!("h{i}")))
        .collect();
    create_hosts(store, &hosts).await;
    let mut want: BTreeMap<u32, BTreeSet<HostId>> = BTreeMap::new();
    for (i, host) in hosts.iter().enumerate() {
        match i % 3 {
            // Several pending changes: listed once.
            0 => {
                for _ in 0..3 {
                    store
                        .append_change(&change_record(host.id, 1))
                        .await
                        .unwrap();
                }
                want.entry(host.shard).or_default().insert(host.id);
            }
            // Only finished changes: not listed.
            1 => {
                let change = store
                    .append_change(&change_record(host.id, 1))
                    .await
                    .unwrap();
                store
                    .update_change(host.id, change.id, ChangeStatus::Applied, None, Epoch(1))
                    .await
                    .unwrap();
            }
            // No changes.
            _ => {}
        }
    }
    let check = |want: BTreeMap<u32, BTreeSet<HostId>>| async move {
        for shard in 0..N_SHARDS {
            let got = store.hosts_with_pending_changes(shard).await.unwrap();
            let unique: BTreeSet<HostId> = got.iter().copied().collect();
            assert_eq!(unique.len(), got.len(), "shard {shard} lists a host twice");
            assert_eq!(
                unique,
                want.get(&shard).cloned().unwrap_or_default(),
                "shard {shard}"
            );
        }
    };
    check(want.clone()).await;

    // Finishing every change of a host takes it off its shard's list.
    let host = &hosts[0];
    for change in store.pending_changes(host.id).await.unwrap() {
        store
            .update_change(host.id, change.id, ChangeStatus::Expired, None, Epoch(1))
            .await
            .unwrap();
    }
    want.get_mut(&host.shard).unwrap().remove(&host.id);
    check(want).await;
    assert!(store
        .hosts_with_pending_changes(N_SHARDS + 5)
        .await
        .unwrap()
        .is_empty());
}

// --- tokens ----------------------------------------------------------------------------------

fn enrollment_token(env: &Environment, secret: &str) -> EnrollmentToken {
    EnrollmentToken {
        id: TokenId::random(),
        org: env.org,
        env: env.id,
        description: "rack 4".into(),
        secret_sha256: sha256_hex(secret),
        expires_at: now() + Duration::hours(1),
        max_uses: Some(10),
        uses: 0,
        revoked: false,
        created_at: now(),
        created_by: "conformance".into(),
    }
}

pub async fn enrollment_tokens(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let globex = new_org(store, "globex").await;
    let globex_prod = new_env(store, &globex, "prod").await;
    let base = now() - Duration::minutes(10);
    let mut tokens = Vec::new();
    for i in 0..5 {
        let mut token = enrollment_token(&prod, &format!("secret-{i}"));
        token.created_at = base + Duration::seconds(i);
        store.create_enrollment_token(&token).await.unwrap();
        tokens.push(token);
    }
    store
        .create_enrollment_token(&enrollment_token(&globex_prod, "globex-secret"))
        .await
        .unwrap();
    assert_eq!(
        store.get_enrollment_token(tokens[0].id).await.unwrap(),
        Some(tokens[0].clone())
    );
    assert_eq!(
        store.get_enrollment_token(TokenId::random()).await.unwrap(),
        None
    );

    let listed = walk_all(2, |p| async move {
        store.list_enrollment_tokens(acme.id, &p).await
    })
    .await;
    let want: Vec<EnrollmentToken> = tokens.iter().rev().cloned().collect();
    assert_eq!(listed, want, "newest first, one organization");

    assert_err!(
        store.create_enrollment_token(&tokens[0]).await,
        StoreError::Conflict(_)
    );
    assert_err!(
        store
            .create_enrollment_token(&enrollment_token(&prod, "secret-0"))
            .await,
        StoreError::Conflict(_)
    );
    let mut orphan = enrollment_token(&prod, "orphan");
    orphan.env = EnvId::random();
    assert_err!(
        store.create_enrollment_token(&orphan).await,
        StoreError::NotFound(_)
    );
    let mut mismatched = enrollment_token(&prod, "mismatched");
    mismatched.org = globex.id;
    assert_err!(
        store.create_enrollment_token(&mismatched).await,
        StoreError::Invalid(_)
    );
    let mut unhashed = enrollment_token(&prod, "x");
    unhashed.secret_sha256 = "plain text secret".into();
    assert_err!(
        store.create_enrollment_token(&unhashed).await,
        StoreError::Invalid(_)
    );
    let mut zero = enrollment_token(&prod, "zero");
    zero.max_uses = Some(0);
    assert_err!(
        store.create_enrollment_token(&zero).await,
        StoreError::Invalid(_)
    );

    store.revoke_enrollment_token(tokens[1].id).await.unwrap();
    let revoked = store
        .get_enrollment_token(tokens[1].id)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked);
    // Revoking twice is fine; an unknown token is not found.
    store.revoke_enrollment_token(tokens[1].id).await.unwrap();
    assert_err!(
        store.revoke_enrollment_token(TokenId::random()).await,
        StoreError::NotFound(_)
    );
}

pub async fn enrollment_token_use_limits(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let t0 = now();

    assert_err!(
        store.use_enrollment_token(&sha256_hex("unknown"), t0).await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store.use_enrollment_token("not even a hash", t0).await,
        StoreError::NotFound(_)
    );

    let mut limited = enrollment_token(&prod, "limited");
    limited.max_uses = Some(2);
    store.create_enrollment_token(&limited).await.unwrap();
    let used = store
        .use_enrollment_token(&sha256_hex("limited"), t0)
        .await
        .unwrap();
    assert_eq!(
        used,
        EnrollmentToken {
            uses: 1,
            ..limited.clone()
        }
    );
    let used = store
        .use_enrollment_token(&sha256_hex("limited"), t0)
        .await
        .unwrap();
    assert_eq!(used.uses, 2);
    assert_err!(
        store.use_enrollment_token(&sha256_hex("limited"), t0).await,
        StoreError::TokenUnusable(_)
    );
    assert_eq!(
        store
            .get_enrollment_token(limited.id)
            .await
            .unwrap()
            .unwrap()
            .uses,
        2,
        "a refused use is not counted"
    );
    // A use given back (the enrollment failed on the node's side) can be used again, once.
    store
        .release_enrollment_token_use(limited.id)
        .await
        .unwrap();
    assert_eq!(
        store
            .use_enrollment_token(&sha256_hex("limited"), t0)
            .await
            .unwrap()
            .uses,
        2
    );
    assert_err!(
        store.use_enrollment_token(&sha256_hex("limited"), t0).await,
        StoreError::TokenUnusable(_)
    );
    let mut unused = enrollment_token(&prod, "unused");
    unused.max_uses = Some(1);
    store.create_enrollment_token(&unused).await.unwrap();
    store.release_enrollment_token_use(unused.id).await.unwrap();
    assert_eq!(
        store
            .get_enrollment_token(unused.id)
            .await
            .unwrap()
            .unwrap()
            .uses,
        0,
        "never below zero"
    );
    assert_err!(
        store.release_enrollment_token_use(TokenId::random()).await,
        StoreError::NotFound(_)
    );

    let mut expiring = enrollment_token(&prod, "expiring");
    expiring.expires_at = t0 + Duration::minutes(5);
    store.create_enrollment_token(&expiring).await.unwrap();
    store
        .use_enrollment_token(&sha256_hex("expiring"), t0 + Duration::minutes(4))
        .await
        .unwrap();
    assert_err!(
        store
            .use_enrollment_token(&sha256_hex("expiring"), t0 + Duration::minutes(5))
            .await,
        StoreError::TokenUnusable(_)
    );
    assert_err!(
        store
            .use_enrollment_token(&sha256_hex("expiring"), t0 + Duration::days(30))
            .await,
        StoreError::TokenUnusable(_)
    );

    let revoked = enrollment_token(&prod, "revoked");
    store.create_enrollment_token(&revoked).await.unwrap();
    store.revoke_enrollment_token(revoked.id).await.unwrap();
    assert_err!(
        store.use_enrollment_token(&sha256_hex("revoked"), t0).await,
        StoreError::TokenUnusable(_)
    );
    assert_eq!(
        store
            .get_enrollment_token(revoked.id)
            .await
            .unwrap()
            .unwrap()
            .uses,
        0
    );

    let mut unlimited = enrollment_token(&prod, "unlimited");
    unlimited.max_uses = None;
    store.create_enrollment_token(&unlimited).await.unwrap();
    for n in 1..=25 {
        let used = store
            .use_enrollment_token(&sha256_hex("unlimited"), t0)
            .await
            .unwrap();
        assert_eq!(used.uses, n);
    }

    // A token whose environment is gone enrolls nobody.
    let qa = new_env(store, &new_org(store, "globex").await, "qa").await;
    store
        .create_enrollment_token(&enrollment_token(&qa, "qa"))
        .await
        .unwrap();
    store.delete_env(qa.id).await.unwrap();
    assert_err!(
        store.use_enrollment_token(&sha256_hex("qa"), t0).await,
        StoreError::TokenUnusable(_)
    );
}

pub async fn single_use_enrollment_token_under_concurrency(store: &dyn Store) {
    let (_, prod) = acme(store).await;
    let mut token = enrollment_token(&prod, "once");
    token.max_uses = Some(1);
    store.create_enrollment_token(&token).await.unwrap();
    let hash = sha256_hex("once");
    let at = now();
    let attempt = || store.use_enrollment_token(&hash, at);
    let r = tokio::join!(
        attempt(),
        attempt(),
        attempt(),
        attempt(),
        attempt(),
        attempt(),
        attempt(),
        attempt()
    );
    let results = [r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7];
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one use succeeds: {results:?}");
    for r in &results {
        assert!(
            matches!(r, Ok(_) | Err(StoreError::TokenUnusable(_))),
            "{r:?}"
        );
    }
    assert_eq!(
        store
            .get_enrollment_token(token.id)
            .await
            .unwrap()
            .unwrap()
            .uses,
        1
    );
}

fn api_token(name: &str, secret: &str) -> ApiToken {
    ApiToken {
        id: TokenId::random(),
        name: name.into(),
        secret_sha256: sha256_hex(secret),
        role: Role::Operator,
        scope: Scope::Global,
        revoked: false,
        created_at: now(),
    }
}

pub async fn api_tokens(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let admin = ApiToken {
        role: Role::Admin,
        ..api_token("admin", "s-admin")
    };
    let ops = ApiToken {
        scope: Scope::Env {
            org: acme.id,
            env: prod.id,
        },
        ..api_token("ops", "s-ops")
    };
    let viewer = ApiToken {
        role: Role::Viewer,
        scope: Scope::Org { org: acme.id },
        ..api_token("viewer", "s-viewer")
    };
    for t in [&admin, &ops, &viewer] {
        store.create_api_token(t).await.unwrap();
    }
    assert_eq!(
        store.find_api_token(&sha256_hex("s-ops")).await.unwrap(),
        Some(ops.clone())
    );
    assert_eq!(
        store.find_api_token(&sha256_hex("nope")).await.unwrap(),
        None
    );
    assert_eq!(store.find_api_token("junk").await.unwrap(), None);

    assert_err!(
        store.create_api_token(&admin).await,
        StoreError::Conflict(_)
    );
    assert_err!(
        store.create_api_token(&api_token("again", "s-admin")).await,
        StoreError::Conflict(_)
    );
    let mut unhashed = api_token("plain", "x");
    unhashed.secret_sha256 = "x".into();
    assert_err!(
        store.create_api_token(&unhashed).await,
        StoreError::Invalid(_)
    );

    store.revoke_api_token(ops.id).await.unwrap();
    assert_eq!(
        store.find_api_token(&sha256_hex("s-ops")).await.unwrap(),
        None
    );
    assert_eq!(
        store.find_api_token(&sha256_hex("s-viewer")).await.unwrap(),
        Some(viewer.clone())
    );
    assert_err!(
        store.revoke_api_token(TokenId::random()).await,
        StoreError::NotFound(_)
    );

    // The listing shows every token, revoked ones too, each once.
    let listed = walk_all(2, |p| async move { store.list_api_tokens(&p).await }).await;
    let mut want = vec![
        admin,
        ApiToken {
            revoked: true,
            ..ops
        },
        viewer,
    ];
    want.sort_by_key(|t| t.id);
    let mut got = listed;
    got.sort_by_key(|t| t.id);
    assert_eq!(got, want);
}

// --- audit, applications, settings, jobs -----------------------------------------------------

pub async fn audit_log(store: &dyn Store) {
    let mut seqs = Vec::new();
    for i in 0..7 {
        let entry = AuditEntry {
            seq: 1000,
            at: now(),
            actor: "alice".into(),
            action: "POST /api/v1/orgs".into(),
            target: format!("org-{i}"),
            outcome: if i == 3 { "denied".into() } else { "ok".into() },
        };
        seqs.push(store.append_audit(&entry).await.unwrap());
    }
    assert_unique_ascending(&seqs);

    let pages = walk(3, |p| async move { store.list_audit(&p).await }).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![3, 3, 1]
    );
    let listed: Vec<AuditEntry> = pages.into_iter().flatten().collect();
    let listed_seqs: Vec<u64> = listed.iter().map(|e| e.seq).collect();
    let mut want = seqs.clone();
    want.reverse();
    assert_eq!(listed_seqs, want, "newest first");
    assert_eq!(listed[0].target, "org-6");
    assert_eq!(listed[3].outcome, "denied");

    // Concurrent appends still get distinct, increasing numbers.
    let append = |i: u32| async move {
        store
            .append_audit(&AuditEntry {
                seq: 0,
                at: now(),
                actor: "bob".into(),
                action: "enroll".into(),
                target: format!("host-{i}"),
                outcome: "ok".into(),
            })
            .await
            .unwrap()
    };
    let (a, b, c, d) = tokio::join!(append(1), append(2), append(3), append(4));
    let mut more = vec![a, b, c, d];
    more.sort();
    assert_unique_ascending(&more);
    assert!(more[0] > *seqs.last().unwrap());
}

fn application(org: OrgId, name: &str, version: &str) -> Application {
    Application {
        org,
        name: name.into(),
        version: version.into(),
        resources: serde_json::json!([{"collection": "packages", "id": name}]),
        parameters: serde_json::json!({"port": 80}),
        created_at: now(),
    }
}

pub async fn applications(store: &dyn Store) {
    let (acme, _) = acme(store).await;
    let globex = new_org(store, "globex").await;
    let apps = [
        application(acme.id, "nginx", "1.0.0"),
        application(acme.id, "nginx", "1.1.0"),
        application(acme.id, "apache", "2.4"),
        application(acme.id, "postgres", "16"),
        application(globex.id, "nginx", "1.0.0"),
    ];
    for app in &apps {
        store.put_application(app).await.unwrap();
    }
    assert_eq!(
        store
            .get_application(acme.id, "nginx", "1.1.0")
            .await
            .unwrap(),
        Some(apps[1].clone())
    );
    assert_eq!(
        store
            .get_application(globex.id, "nginx", "1.0.0")
            .await
            .unwrap(),
        Some(apps[4].clone())
    );
    assert_eq!(
        store.get_application(acme.id, "nginx", "9").await.unwrap(),
        None
    );
    assert_eq!(
        store
            .get_application(globex.id, "apache", "2.4")
            .await
            .unwrap(),
        None
    );

    // Versions are immutable.
    let mut changed = apps[0].clone();
    changed.parameters = serde_json::json!({"port": 8080});
    assert_err!(
        store.put_application(&changed).await,
        StoreError::Conflict(_)
    );
    assert_eq!(
        store
            .get_application(acme.id, "nginx", "1.0.0")
            .await
            .unwrap(),
        Some(apps[0].clone())
    );
    assert_err!(
        store
            .put_application(&application(OrgId::random(), "nginx", "1"))
            .await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store.put_application(&application(acme.id, "", "1")).await,
        StoreError::Invalid(_)
    );
    assert_err!(
        store.put_application(&application(acme.id, "x", "")).await,
        StoreError::Invalid(_)
    );

    let listed = walk_all(
        2,
        |p| async move { store.list_applications(acme.id, &p).await },
    )
    .await;
    let names: Vec<(String, String)> = listed
        .iter()
        .map(|a| (a.name.clone(), a.version.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("apache", "2.4"),
        ("nginx", "1.0.0"),
        ("nginx", "1.1.0"),
        ("postgres", "16"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(names, want, "by name, then version");
}

pub async fn settings(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let host = new_host(store, &prod, "web-1").await;
    let scopes = [
        SettingScope::Org { org: acme.id },
        SettingScope::Env { env: prod.id },
        SettingScope::Host { host: host.id },
    ];
    let setting = |scope: &SettingScope, key: &str, value: serde_json::Value| Setting {
        scope: scope.clone(),
        key: key.into(),
        value,
        secret: key == "password",
        updated_at: now(),
    };
    for (i, scope) in scopes.iter().enumerate() {
        store
            .put_setting(&setting(scope, "port", serde_json::json!(8000 + i)))
            .await
            .unwrap();
    }
    store
        .put_setting(&setting(
            &scopes[0],
            "password",
            serde_json::json!("hunter2"),
        ))
        .await
        .unwrap();
    for (i, scope) in scopes.iter().enumerate() {
        let got = store.get_setting(scope, "port").await.unwrap().unwrap();
        assert_eq!(got.value, serde_json::json!(8000 + i), "{scope:?}");
        assert_eq!(got.scope, *scope);
    }
    assert_eq!(
        store.get_setting(&scopes[1], "password").await.unwrap(),
        None
    );
    let org_settings = store.list_settings(&scopes[0]).await.unwrap();
    let mut keys: Vec<&str> = org_settings.iter().map(|s| s.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, vec!["password", "port"]);
    assert!(org_settings.iter().any(|s| s.secret));
    assert_eq!(store.list_settings(&scopes[2]).await.unwrap().len(), 1);

    // Settings are mutable: a put replaces.
    let replaced = setting(&scopes[1], "port", serde_json::json!(9000));
    store.put_setting(&replaced).await.unwrap();
    assert_eq!(
        store.get_setting(&scopes[1], "port").await.unwrap(),
        Some(replaced)
    );
    assert_eq!(store.list_settings(&scopes[1]).await.unwrap().len(), 1);

    store.delete_setting(&scopes[1], "port").await.unwrap();
    assert_eq!(store.get_setting(&scopes[1], "port").await.unwrap(), None);
    assert!(store
        .get_setting(&scopes[0], "port")
        .await
        .unwrap()
        .is_some());
    assert_err!(
        store.delete_setting(&scopes[1], "port").await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store
            .put_setting(&setting(
                &SettingScope::Host {
                    host: HostId::random()
                },
                "port",
                serde_json::json!(1)
            ))
            .await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store
            .put_setting(&setting(&scopes[0], "", serde_json::json!(1)))
            .await,
        StoreError::Invalid(_)
    );
}

pub async fn jobs_and_results(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let job = Job {
        id: JobId::random(),
        org: acme.id,
        spec: serde_json::json!({"run": ["uptime"]}),
        status: JobStatus::Pending,
        created_at: now(),
        created_by: "alice".into(),
        version: 0,
    };
    store.create_job(&job).await.unwrap();
    assert_eq!(
        store.get_job(job.id).await.unwrap(),
        Some(Job {
            version: 1,
            ..job.clone()
        })
    );
    assert_eq!(store.get_job(JobId::random()).await.unwrap(), None);
    assert_err!(store.create_job(&job).await, StoreError::Conflict(_));
    assert_err!(
        store
            .create_job(&Job {
                id: JobId::random(),
                org: OrgId::random(),
                ..job.clone()
            })
            .await,
        StoreError::NotFound(_)
    );

    let running = store
        .update_job_status(job.id, JobStatus::Running, 1)
        .await
        .unwrap();
    assert_eq!(running.status, JobStatus::Running);
    assert_eq!(running.version, 2);
    assert_eq!(
        store
            .update_job_status(job.id, JobStatus::Cancelled, 1)
            .await,
        Err(StoreError::VersionMismatch {
            expected: 1,
            found: 2
        })
    );
    assert_eq!(store.get_job(job.id).await.unwrap(), Some(running));
    assert_err!(
        store
            .update_job_status(JobId::random(), JobStatus::Done, 1)
            .await,
        StoreError::NotFound(_)
    );

    let hosts: Vec<Host> = (0..7)
        .map(|i| host_record(&prod, &format!("h{i}")))
        .collect();
    create_hosts(store, &hosts).await;
    for host in &hosts {
        store
            .put_job_result(&JobResult {
                job: job.id,
                host: host.id,
                change: None,
                status: ChangeStatus::Queued,
                updated_at: now(),
            })
            .await
            .unwrap();
    }
    // A result is per (job, host): a put replaces.
    let change = store
        .append_change(&change_record(hosts[3].id, 1))
        .await
        .unwrap();
    let applied = JobResult {
        job: job.id,
        host: hosts[3].id,
        change: Some(change.id),
        status: ChangeStatus::Applied,
        updated_at: now(),
    };
    store.put_job_result(&applied).await.unwrap();

    let listed = walk_all(
        3,
        |p| async move { store.list_job_results(job.id, &p).await },
    )
    .await;
    let listed_hosts: Vec<HostId> = listed.iter().map(|r| r.host).collect();
    let mut want = ids(&hosts);
    want.sort();
    assert_eq!(listed_hosts, want, "one result per host, by host id");
    assert_eq!(
        listed.iter().find(|r| r.host == hosts[3].id),
        Some(&applied)
    );
    let none = store
        .list_job_results(JobId::random(), &Page::first(10))
        .await
        .unwrap();
    assert!(none.items.is_empty());
    assert_err!(
        store
            .put_job_result(&JobResult {
                job: JobId::random(),
                ..applied.clone()
            })
            .await,
        StoreError::NotFound(_)
    );
    assert_err!(
        store
            .put_job_result(&JobResult {
                host: HostId::random(),
                ..applied
            })
            .await,
        StoreError::NotFound(_)
    );
}

pub async fn jobs_listed_per_org_newest_first(store: &dyn Store) {
    let (acme, _prod) = acme(store).await;
    let other = new_org(store, "umbrella").await;
    let base = now();
    let mut made = Vec::new();
    for i in 0..5 {
        let job = job_record(acme.id, base + Duration::seconds(i));
        store.create_job(&job).await.unwrap();
        made.push(job.id);
    }
    let theirs = job_record(other.id, base + Duration::seconds(10));
    store.create_job(&theirs).await.unwrap();
    let listed = walk_all(2, |p| async move { store.list_jobs(acme.id, &p).await }).await;
    let ids: Vec<JobId> = listed.iter().map(|j| j.id).collect();
    made.reverse();
    assert_eq!(
        ids, made,
        "the organization's jobs, newest first, each once"
    );
    assert!(listed.iter().all(|j| j.version == 1));
    let theirs_listed = store.list_jobs(other.id, &Page::first(10)).await.unwrap();
    assert_eq!(
        theirs_listed.items.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![theirs.id]
    );
    let none = store
        .list_jobs(OrgId::random(), &Page::first(10))
        .await
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());
}

/// A change that belongs to a job writes the job's result for its host when appended, and every
/// status update moves that result and the job's counts with it.
pub async fn job_changes_keep_results_and_counts(store: &dyn Store) {
    let (acme, prod) = acme(store).await;
    let job = job_record(acme.id, now());
    store.create_job(&job).await.unwrap();
    assert_eq!(
        store.job_counts(job.id).await.unwrap(),
        JobCounts::default()
    );
    let hosts: Vec<Host> = (0..4)
        .map(|i| host_record(&prod, &format!("j{i}")))
        .collect();
    create_hosts(store, &hosts).await;
    let mut changes = Vec::new();
    for host in &hosts {
        let change = store
            .append_change(&Change {
                job: Some(job.id),
                ..change_record(host.id, 1)
            })
            .await
            .unwrap();
        assert_eq!(change.job, Some(job.id));
        changes.push(change);
    }
    // A change of another job that does not exist is refused, and records nothing.
    let orphan = Change {
        job: Some(JobId::random()),
        ..change_record(hosts[0].id, 1)
    };
    assert_err!(store.append_change(&orphan).await, StoreError::NotFound(_));
    assert_eq!(
        store.get_change(hosts[0].id, orphan.id).await.unwrap(),
        None
    );
    // A change without a job leaves the job alone.
    store
        .append_change(&change_record(hosts[0].id, 1))
        .await
        .unwrap();
    assert_eq!(
        store.job_counts(job.id).await.unwrap(),
        JobCounts {
            queued: 4,
            ..JobCounts::default()
        }
    );

    let outcomes = [
        ChangeStatus::Dispatched,
        ChangeStatus::Applied,
        ChangeStatus::Failed,
    ];
    for (change, status) in changes.iter().zip(outcomes) {
        store
            .update_change(change.host, change.id, status, None, Epoch(1))
            .await
            .unwrap();
    }
    // The dispatched one answers: it moves from dispatched to applied.
    store
        .update_change(
            changes[0].host,
            changes[0].id,
            ChangeStatus::Applied,
            None,
            Epoch(1),
        )
        .await
        .unwrap();
    let counts = store.job_counts(job.id).await.unwrap();
    assert_eq!(
        counts,
        JobCounts {
            queued: 1,
            applied: 2,
            failed: 1,
            ..JobCounts::default()
        }
    );
    assert_eq!((counts.total(), counts.pending()), (4, 1));
    let listed = store
        .list_job_results(job.id, &Page::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(listed.len(), 4);
    for result in &listed {
        let change = changes.iter().find(|c| c.host == result.host).unwrap();
        let now = store
            .get_change(change.host, change.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(result.change, Some(change.id));
        assert_eq!(result.status, now.status, "result in step with its change");
    }
    // A refused (stale) update moves nothing.
    assert_err!(
        store
            .update_change(
                changes[3].host,
                changes[3].id,
                ChangeStatus::Cancelled,
                None,
                Epoch(0),
            )
            .await,
        StoreError::StaleEpoch { .. }
    );
    assert_eq!(store.job_counts(job.id).await.unwrap(), counts);
    // Deleting a host takes its result out of the counts.
    store.delete_host(hosts[3].id).await.unwrap();
    assert_eq!(
        store.job_counts(job.id).await.unwrap(),
        JobCounts {
            queued: 0,
            ..counts
        }
    );
}

fn kept(body: &str) -> KeptResponse {
    KeptResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into(),
    }
}

pub async fn idempotency_keys(store: &dyn Store) {
    let (alice, bob) = (TokenId::random(), TokenId::random());
    let (fp, other) = (sha256_hex("POST /a {}"), sha256_hex("POST /a {\"x\":1}"));
    let at = now();
    let lease = at + Duration::minutes(10);
    let keep = at + Duration::hours(24);
    let claim = |token, key: &'static str, fp: &str| {
        let fp = fp.to_owned();
        async move {
            store
                .claim_idempotency_key(token, key, &fp, at, lease)
                .await
                .unwrap()
        }
    };
    assert_eq!(claim(alice, "k1", &fp).await, IdempotencyClaim::Claimed);
    assert_eq!(claim(alice, "k1", &fp).await, IdempotencyClaim::InProgress);
    assert_eq!(claim(alice, "k1", &other).await, IdempotencyClaim::Mismatch);
    // Keys are the token's own.
    assert_eq!(claim(bob, "k1", &fp).await, IdempotencyClaim::Claimed);

    // Finishing with another fingerprint is not this claim's end.
    store
        .finish_idempotency_key(alice, "k1", &other, Some(kept("wrong")), keep)
        .await
        .unwrap();
    assert_eq!(claim(alice, "k1", &fp).await, IdempotencyClaim::InProgress);
    store
        .finish_idempotency_key(alice, "k1", &fp, Some(kept("first")), keep)
        .await
        .unwrap();
    assert_eq!(
        claim(alice, "k1", &fp).await,
        IdempotencyClaim::Replay(kept("first"))
    );
    assert_eq!(claim(alice, "k1", &other).await, IdempotencyClaim::Mismatch);
    // An answered key keeps its first response.
    store
        .finish_idempotency_key(alice, "k1", &fp, Some(kept("second")), keep)
        .await
        .unwrap();
    assert_eq!(
        claim(alice, "k1", &fp).await,
        IdempotencyClaim::Replay(kept("first"))
    );

    // Finishing without a response forgets the key: a retry runs again.
    store
        .finish_idempotency_key(bob, "k1", &fp, None, keep)
        .await
        .unwrap();
    assert_eq!(claim(bob, "k1", &fp).await, IdempotencyClaim::Claimed);
    // Finishing a key nobody claimed does nothing.
    store
        .finish_idempotency_key(bob, "never", &fp, Some(kept("x")), keep)
        .await
        .unwrap();
    assert_eq!(claim(bob, "never", &fp).await, IdempotencyClaim::Claimed);

    // Of claims racing on a new key, exactly one runs.
    let race = || claim(alice, "raced", &fp);
    let r = tokio::join!(
        race(),
        race(),
        race(),
        race(),
        race(),
        race(),
        race(),
        race()
    );
    let results = [r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7];
    let claimed = results
        .iter()
        .filter(|r| **r == IdempotencyClaim::Claimed)
        .count();
    assert_eq!(claimed, 1, "{results:?}");
    assert!(results
        .iter()
        .all(|r| matches!(r, IdempotencyClaim::Claimed | IdempotencyClaim::InProgress)));

    // Invalid keys and fingerprints change nothing.
    let long = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1);
    for (key, fp) in [
        ("", fp.as_str()),
        (long.as_str(), fp.as_str()),
        ("k2", "abc"),
    ] {
        assert_err!(
            store.claim_idempotency_key(alice, key, fp, at, lease).await,
            StoreError::Invalid(_)
        );
        assert_err!(
            store
                .finish_idempotency_key(alice, key, fp, None, keep)
                .await,
            StoreError::Invalid(_)
        );
    }
    let longest = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES);
    assert_eq!(
        store
            .claim_idempotency_key(alice, &longest, &fp, at, lease)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
}

pub async fn idempotency_keys_lapse_and_purge(store: &dyn Store) {
    let token = TokenId::random();
    let fp = sha256_hex("POST /b {}");
    let t0 = now();
    let lease = t0 + Duration::minutes(1);
    // A claim whose node died: it lapses at its lease, and a retry then takes the key over.
    assert_eq!(
        store
            .claim_idempotency_key(token, "dead", &fp, t0, lease)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    let later = lease - Duration::milliseconds(1);
    assert_eq!(
        store
            .claim_idempotency_key(token, "dead", &fp, later, later + Duration::minutes(1))
            .await
            .unwrap(),
        IdempotencyClaim::InProgress
    );
    let retry_lease = lease + Duration::minutes(1);
    assert_eq!(
        store
            .claim_idempotency_key(token, "dead", &fp, lease, retry_lease)
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    // A kept response is replayed until it lapses too.
    store
        .finish_idempotency_key(token, "dead", &fp, Some(kept("r")), t0 + Duration::hours(1))
        .await
        .unwrap();
    let in_an_hour = t0 + Duration::hours(1);
    assert_eq!(
        store
            .claim_idempotency_key(token, "dead", &fp, in_an_hour - Duration::seconds(1), lease)
            .await
            .unwrap(),
        IdempotencyClaim::Replay(kept("r"))
    );

    // Purge: two more records, one answered and one in progress, lapsing at different times.
    for (key, until) in [
        ("a", t0 + Duration::minutes(5)),
        ("b", t0 + Duration::hours(2)),
    ] {
        store
            .claim_idempotency_key(token, key, &fp, t0, until)
            .await
            .unwrap();
    }
    store
        .finish_idempotency_key(token, "a", &fp, Some(kept("a")), t0 + Duration::minutes(30))
        .await
        .unwrap();
    // Nothing has lapsed at t0.
    assert_eq!(store.purge_idempotency_keys(t0).await.unwrap(), 0);
    // At t0 + 1 h: "a" (kept until t0 + 30 min) goes; "dead" lapses exactly then and stays;
    // "b" is in progress until t0 + 2 h.
    assert_eq!(store.purge_idempotency_keys(in_an_hour).await.unwrap(), 1);
    assert_eq!(
        store
            .claim_idempotency_key(token, "b", &fp, in_an_hour, lease)
            .await
            .unwrap(),
        IdempotencyClaim::InProgress
    );
    assert_eq!(
        store
            .claim_idempotency_key(
                token,
                "a",
                &fp,
                in_an_hour,
                in_an_hour + Duration::minutes(1)
            )
            .await
            .unwrap(),
        IdempotencyClaim::Claimed
    );
    // Far later everything has lapsed: "dead", "b" and the new claim of "a".
    let far = t0 + Duration::days(2);
    assert_eq!(store.purge_idempotency_keys(far).await.unwrap(), 3);
    assert_eq!(store.purge_idempotency_keys(far).await.unwrap(), 0);
}
