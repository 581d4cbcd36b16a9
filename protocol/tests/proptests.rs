//! Property tests: every envelope round-trips through JSON; the parsers never panic.

use chrono::{TimeZone, Utc};
use comodit_protocol::*;
use proptest::prelude::*;
use uuid::Uuid;

fn host() -> impl Strategy<Value = HostId> {
    any::<u128>().prop_map(|n| HostId(Uuid::from_u128(n)))
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_ .-]{1,12}", 1..5).prop_filter_map("normalized", |parts| {
        if parts.iter().any(|p| p == "." || p == "..") {
            None
        } else {
            Some(format!("/{}", parts.join("/")))
        }
    })
}

fn resource() -> impl Strategy<Value = Resource> {
    prop_oneof![
        (
            path(),
            any::<Option<String>>(),
            prop::option::of(0u32..0o7777)
        )
            .prop_map(|(p, content, mode)| {
                Resource::new(
                    Collection::Files,
                    &p,
                    Spec::File(FileSpec {
                        content,
                        mode: mode.map(Mode),
                        ..Default::default()
                    }),
                )
                .unwrap()
            }),
        (path(), any::<bool>()).prop_map(|(p, purge)| {
            Resource::new(
                Collection::Directories,
                &p,
                Spec::Directory(DirectorySpec {
                    purge,
                    ..Default::default()
                }),
            )
            .unwrap()
        }),
        (
            "[a-z][a-z0-9+.-]{0,20}",
            prop::option::of("[0-9][0-9a-z.~+-]{0,10}")
        )
            .prop_map(|(n, version)| {
                Resource::new(
                    Collection::Packages,
                    &n,
                    Spec::Package(PackageSpec {
                        ensure: PackageEnsure::Present,
                        version,
                    }),
                )
                .unwrap()
            }),
        (
            "[a-z_][a-z0-9_-]{0,20}",
            prop::option::of(any::<u32>()),
            any::<bool>()
        )
            .prop_map(|(n, uid, system)| {
                Resource::new(
                    Collection::Users,
                    &n,
                    Spec::User(UserSpec {
                        uid,
                        system,
                        ..Default::default()
                    }),
                )
                .unwrap()
            }),
        (
            "[a-z][a-z0-9@-]{0,20}(\\.service)?",
            prop::option::of(any::<bool>())
        )
            .prop_map(|(n, running)| {
                let mut r = Resource::new(
                    Collection::Services,
                    &n,
                    Spec::Service(ServiceSpec {
                        running,
                        ..Default::default()
                    }),
                )
                .unwrap();
                r.policy = Policy::Enforce;
                r
            }),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (
            prop::collection::vec(resource(), 0..4),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(resources, monitor, dry)| Body::Apply {
                mode: if dry {
                    ApplyMode::DryRun
                } else {
                    ApplyMode::Enforce
                },
                monitor,
                resources
            }),
        prop::collection::vec(resource(), 0..4)
            .prop_map(|resources| Body::SetDesired { resources }),
        prop::collection::vec(".{0,20}", 1..5).prop_map(|argv| {
            let argv: Vec<String> = argv
                .into_iter()
                .map(|a| {
                    if a.is_empty() {
                        "x".into()
                    } else {
                        a.replace('\0', "")
                    }
                })
                .map(|a: String| if a.is_empty() { "x".to_string() } else { a })
                .collect();
            Body::Run(RunSpec {
                argv,
                env: Default::default(),
                cwd: None,
                timeout_s: 5,
                stream: true,
            })
        }),
        Just(Body::Ping {}),
        Just(Body::Facts {}),
        Just(Body::Check {}),
    ]
}

proptest! {
    #[test]
    fn commands_round_trip(h in host(), id in any::<u128>(), epoch in any::<u64>(), secs in 0i64..4_000_000_000, b in body()) {
        let issued_at = Utc.timestamp_opt(secs, 0).unwrap();
        let cmd = Command { v: V1, id: CommandId(Uuid::from_u128(id)), host: h, epoch: Epoch(epoch),
            issued_at, expires_at: issued_at + chrono::Duration::seconds(60), body: b };
        let bytes = cmd.encode();
        prop_assert_eq!(Command::decode(&bytes).unwrap(), cmd);
    }

    #[test]
    fn replies_round_trip(h in host(), ok in any::<bool>(), out in ".{0,40}", code in any::<Option<i32>>()) {
        let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let reply = Up::Reply(Reply { v: V1, re: Some(CommandId::random()), host: h,
            status: if ok { Status::Ok } else { Status::Failed }, reason: None, results: vec![],
            data: Some(ReplyData::Run(RunResult { exit_code: code, signal: None, timed_out: false,
                stdout: out.clone(), stderr: out, truncated: false, duration_ms: 3 })),
            started_at: now, finished_at: now });
        prop_assert_eq!(Up::decode(UpKind::Reply, &reply.encode()).unwrap(), reply);
    }

    #[test]
    fn events_round_trip(h in host(), drifted in any::<u32>(), r in resource()) {
        let now = Utc.timestamp_opt(1_800_000_000, 0).unwrap();
        let events = vec![
            Up::Heartbeat(Heartbeat { v: V1, host: h, sent_at: now, drifted }),
            Up::Hello(Hello { v: V1, host: h, facts: Facts { hostname: "h".into(), cpus: 2, ..Default::default() },
                desired_digest: "d".into(), epoch: Epoch(3), sent_at: now }),
            Up::Drift(Drift { v: V1, host: h, report: DriftReport { r#ref: r.r#ref.clone(),
                diff: vec![FieldDiff { field: "mode".into(), from: "0600".into(), to: "0644".into() }],
                since: now, repaired: false, repair_error: None } }),
            Up::DriftCleared(DriftCleared { v: V1, host: h, r#ref: r.r#ref.clone(), at: now }),
            Up::Bye(Bye { v: V1, host: h, reason: "shutdown".into() }),
        ];
        for e in events {
            let k = e.kind();
            let key = UpKey::new(h, 256, k);
            prop_assert_eq!(UpKey::parse(&key.to_string(), 256).unwrap(), key);
            prop_assert_eq!(Up::decode(k, &e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn command_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Command::decode(&bytes);
        for k in UpKind::ALL {
            let _ = Up::decode(k, &bytes);
        }
    }

    #[test]
    fn parser_never_panics_on_near_valid_json(s in r#"\{"v":1,"id":"[0-9a-f-]{0,36}","host":".{0,40}","epoch":[0-9]{0,25},"body":\{"op":"[a-z_]{0,12}".{0,60}\}\}"#) {
        let _ = Command::decode(s.as_bytes());
    }

    #[test]
    fn resource_ids_never_panic(c in 0usize..8, s in ".{0,64}") {
        let _ = ResourceId::parse(Collection::ALL[c], &s);
    }
}
