//! The resource model: what a host should look like, one typed spec per collection.
//!
//! A resource on the wire is `{ "collection", "id", "spec", "policy"?, "notify"? }`. The spec is
//! platform-agnostic: the agent picks the provider (apt or dnf, systemd or OpenRC, ...) for the host.
//! Unknown fields are rejected at every level.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{validate_abs_path, Collection, ResourceId, ResourceRef};
use crate::limits::{MAX_INLINE_CONTENT_BYTES, MAX_LIST_ITEMS, MAX_TEXT_BYTES};
use crate::ProtocolError;

/// Whether a resource should exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ensure {
    #[default]
    Present,
    Absent,
}

/// Whether a package should exist, and at which version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageEnsure {
    #[default]
    Present,
    Absent,
    /// Installed and upgraded to the newest version the configured repositories offer.
    Latest,
}

/// What compliance does when a monitored resource drifts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Report the drift and leave the host as it is.
    #[default]
    Report,
    /// Re-apply the resource and report what was fixed.
    Enforce,
}

/// A file mode, written as an octal string (`"0644"`, `"1777"`); at most `0o7777`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mode(pub u32);

impl Mode {
    pub fn parse(s: &str) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::invalid("mode", format!("not an octal mode: {s:?}"));
        if s.is_empty() || s.len() > 5 || !s.chars().all(|c| ('0'..='7').contains(&c)) {
            return Err(bad());
        }
        let v = u32::from_str_radix(s, 8).map_err(|_| bad())?;
        if v > 0o7777 {
            return Err(bad());
        }
        Ok(Mode(v))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mode({self})")
    }
}

impl Serialize for Mode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Mode::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A secret value (a password hash). Its `Debug` and `Display` never show it; diffs and logs print
/// [`Secret::REDACTED`]. It is serialized as-is only because the agent must receive it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub const REDACTED: &'static str = "<redacted>";

    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

/// Remote content for a file: fetched over HTTP(S) and checked against its sha256 before it is
/// written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    pub url: String,
    /// Lowercase hex sha256 of the content.
    pub sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    #[serde(default)]
    pub ensure: Ensure,
    /// Inline UTF-8 content, at most [`MAX_INLINE_CONTENT_BYTES`]. Exclusive with `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FileSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySpec {
    #[serde(default)]
    pub ensure: Ensure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// With `ensure: absent`, remove a non-empty directory and its content. Without it a non-empty
    /// directory is left in place and the resource fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkSpec {
    #[serde(default)]
    pub ensure: Ensure,
    /// Where the link points (absolute or relative). Required with `ensure: present`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Replace a regular file or empty directory standing where the link should be.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    #[serde(default)]
    pub ensure: PackageEnsure,
    /// Pin an exact version (the package manager's syntax, e.g. `2.10-3` for apt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A package repository, described once for every family: apt writes
/// `/etc/apt/sources.list.d/<id>.list`, dnf/yum `/etc/yum.repos.d/<id>.repo`, zypper
/// `/etc/zypp/repos.d/<id>.repo`, apk a line in `/etc/apk/repositories`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoSpec {
    #[serde(default)]
    pub ensure: Ensure,
    /// Base URL of the repository. Required with `ensure: present`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// apt: the suite (`bookworm`, `stable`); ignored elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<String>,
    /// apt: the components (`main`, `contrib`); ignored elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<String>,
    /// Path of the signing key already on the host (apt `signed-by`, rpm `gpgkey=file://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_path: Option<String>,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// rpm families: check package signatures (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub gpgcheck: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// How a service is refreshed when a resource that notifies it changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refresh {
    #[default]
    Restart,
    Reload,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Running now; absent means "leave as it is".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
    /// Started at boot; absent means "leave as it is".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// What a notification from a changed resource does (default restart).
    #[serde(default)]
    pub refresh: Refresh,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    #[serde(default)]
    pub ensure: Ensure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Primary group name; created with the user's name when absent (the distribution's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Supplementary groups, exactly: missing ones are added, groups not listed are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// A crypt(3) hash (`$6$...`, `$y$...`). Never plaintext; never logged or shown in diffs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<Secret>,
    /// A system account (uid below the distribution's `UID_MIN`, no aging).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    /// Create the home directory when the user is created (default true for non-system users).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manage_home: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    #[serde(default)]
    pub ensure: Ensure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
}

/// The typed spec of a resource; its variant always matches the resource's collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    File(FileSpec),
    Directory(DirectorySpec),
    Symlink(SymlinkSpec),
    Package(PackageSpec),
    Repo(RepoSpec),
    Service(ServiceSpec),
    User(UserSpec),
    Group(GroupSpec),
}

impl Spec {
    pub fn collection(&self) -> Collection {
        match self {
            Spec::File(_) => Collection::Files,
            Spec::Directory(_) => Collection::Directories,
            Spec::Symlink(_) => Collection::Symlinks,
            Spec::Package(_) => Collection::Packages,
            Spec::Repo(_) => Collection::Repos,
            Spec::Service(_) => Collection::Services,
            Spec::User(_) => Collection::Users,
            Spec::Group(_) => Collection::Groups,
        }
    }

    /// Parses a spec for `collection` from JSON, rejecting unknown fields, then validates it.
    pub fn from_json(
        collection: Collection,
        value: serde_json::Value,
    ) -> Result<Self, ProtocolError> {
        fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ProtocolError> {
            serde_json::from_value(v).map_err(|e| ProtocolError::invalid("spec", e.to_string()))
        }
        let spec = match collection {
            Collection::Files => Spec::File(typed(value)?),
            Collection::Directories => Spec::Directory(typed(value)?),
            Collection::Symlinks => Spec::Symlink(typed(value)?),
            Collection::Packages => Spec::Package(typed(value)?),
            Collection::Repos => Spec::Repo(typed(value)?),
            Collection::Services => Spec::Service(typed(value)?),
            Collection::Users => Spec::User(typed(value)?),
            Collection::Groups => Spec::Group(typed(value)?),
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Spec::File(s) => serde_json::to_value(s),
            Spec::Directory(s) => serde_json::to_value(s),
            Spec::Symlink(s) => serde_json::to_value(s),
            Spec::Package(s) => serde_json::to_value(s),
            Spec::Repo(s) => serde_json::to_value(s),
            Spec::Service(s) => serde_json::to_value(s),
            Spec::User(s) => serde_json::to_value(s),
            Spec::Group(s) => serde_json::to_value(s),
        };
        v.expect("specs always serialize")
    }

    /// Checks the rules serde cannot express: sizes, exclusive fields, syntax of names.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            Spec::File(f) => {
                if let Some(c) = &f.content {
                    if c.len() > MAX_INLINE_CONTENT_BYTES {
                        return Err(ProtocolError::TooLarge {
                            what: "content",
                            size: c.len(),
                            limit: MAX_INLINE_CONTENT_BYTES,
                        });
                    }
                }
                if f.content.is_some() && f.source.is_some() {
                    return Err(ProtocolError::invalid(
                        "spec",
                        "content and source are exclusive",
                    ));
                }
                if let Some(src) = &f.source {
                    text("source.url", &src.url)?;
                    if !(src.url.starts_with("http://") || src.url.starts_with("https://")) {
                        return Err(ProtocolError::invalid(
                            "source.url",
                            "only http and https URLs are supported",
                        ));
                    }
                    if src.sha256.len() != 64
                        || !src
                            .sha256
                            .chars()
                            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
                    {
                        return Err(ProtocolError::invalid(
                            "source.sha256",
                            "must be 64 lowercase hex digits",
                        ));
                    }
                }
                owner_group(&f.owner, &f.group)
            }
            Spec::Directory(d) => owner_group(&d.owner, &d.group),
            Spec::Symlink(s) => {
                if s.ensure == Ensure::Present && s.target.is_none() {
                    return Err(ProtocolError::invalid("target", "required when present"));
                }
                if let Some(t) = &s.target {
                    if t.is_empty() || t.contains('\0') || t.len() > crate::limits::MAX_PATH_BYTES {
                        return Err(ProtocolError::invalid("target", "empty, too long or NUL"));
                    }
                }
                Ok(())
            }
            Spec::Package(p) => {
                if let Some(v) = &p.version {
                    let ok = !v.is_empty()
                        && v.len() <= 128
                        && v.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+.~:_-".contains(c));
                    if !ok {
                        return Err(ProtocolError::invalid("version", format!("{v:?}")));
                    }
                    if p.ensure != PackageEnsure::Present {
                        return Err(ProtocolError::invalid(
                            "version",
                            "a version pin goes only with ensure: present",
                        ));
                    }
                }
                Ok(())
            }
            Spec::Repo(r) => {
                if r.ensure == Ensure::Present && r.url.is_none() {
                    return Err(ProtocolError::invalid("url", "required when present"));
                }
                for (field, v) in [
                    ("url", &r.url),
                    ("distribution", &r.distribution),
                    ("key_path", &r.key_path),
                    ("description", &r.description),
                ] {
                    if let Some(v) = v {
                        text(field, v)?;
                        if v.contains(['\n', '\r']) {
                            return Err(ProtocolError::invalid(field, "must be one line"));
                        }
                    }
                }
                if let Some(k) = &r.key_path {
                    validate_abs_path("key_path", k)?;
                    // It lands inside apt's `[signed-by=...]` option list.
                    if k.contains(|c: char| c.is_whitespace() || c == ']' || c == ',') {
                        return Err(ProtocolError::invalid("key_path", "no spaces, ']' or ','"));
                    }
                }
                if let Some(u) = &r.url {
                    if u.contains(char::is_whitespace) {
                        return Err(ProtocolError::invalid("url", "must not contain spaces"));
                    }
                }
                if r.distribution.as_deref().is_some_and(|d| d.contains(' ')) {
                    return Err(ProtocolError::invalid("distribution", "one word"));
                }
                list("components", &r.components)?;
                for c in &r.components {
                    if c.is_empty()
                        || !c
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
                    {
                        return Err(ProtocolError::invalid("components", format!("{c:?}")));
                    }
                }
                Ok(())
            }
            Spec::Service(_) => Ok(()),
            Spec::User(u) => {
                if let Some(g) = &u.group {
                    ResourceId::parse(Collection::Groups, g)?;
                }
                if let Some(groups) = &u.groups {
                    list("groups", groups)?;
                    for g in groups {
                        ResourceId::parse(Collection::Groups, g)?;
                    }
                }
                if let Some(h) = &u.home {
                    validate_abs_path("home", h)?;
                }
                if let Some(s) = &u.shell {
                    validate_abs_path("shell", s)?;
                }
                if let Some(c) = &u.comment {
                    text("comment", c)?;
                    if c.contains([':', '\n', '\0']) {
                        return Err(ProtocolError::invalid("comment", "no ':' or newline"));
                    }
                }
                if let Some(p) = &u.password_hash {
                    let h = p.expose();
                    // A crypt(3) hash, or a locked/disabled marker ('!', '*', '!$6$...').
                    let ok = !h.is_empty()
                        && h.len() <= 512
                        && !h.contains([':', '\n', '\0', ' '])
                        && (h.starts_with('$') || h.starts_with('!') || h == "*");
                    if !ok {
                        return Err(ProtocolError::invalid(
                            "password_hash",
                            "must be a crypt(3) hash (never plaintext)",
                        ));
                    }
                }
                Ok(())
            }
            Spec::Group(_) => Ok(()),
        }
    }
}

fn text(field: &'static str, v: &str) -> Result<(), ProtocolError> {
    if v.len() > MAX_TEXT_BYTES {
        return Err(ProtocolError::TooLarge {
            what: field,
            size: v.len(),
            limit: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

fn list<T>(field: &'static str, v: &[T]) -> Result<(), ProtocolError> {
    if v.len() > MAX_LIST_ITEMS {
        return Err(ProtocolError::TooLarge {
            what: field,
            size: v.len(),
            limit: MAX_LIST_ITEMS,
        });
    }
    Ok(())
}

fn owner_group(owner: &Option<String>, group: &Option<String>) -> Result<(), ProtocolError> {
    // Owners are names or numeric ids.
    for (field, coll, v) in [
        ("owner", Collection::Users, owner),
        ("group", Collection::Groups, group),
    ] {
        if let Some(v) = v {
            if !v.chars().all(|c| c.is_ascii_digit()) || v.is_empty() {
                ResourceId::parse(coll, v)
                    .map_err(|_| ProtocolError::invalid(field, format!("{v:?}")))?;
            }
        }
    }
    Ok(())
}

/// One resource of a desired state: what it is, what it should look like, and how compliance
/// treats it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    pub r#ref: ResourceRef,
    pub spec: Spec,
    pub policy: Policy,
    /// Services refreshed (restart or reload, per their spec) when this resource changed.
    pub notify: Vec<ResourceRef>,
}

impl Resource {
    pub fn new(collection: Collection, id: &str, spec: Spec) -> Result<Self, ProtocolError> {
        if spec.collection() != collection {
            return Err(ProtocolError::invalid(
                "spec",
                "spec does not match collection",
            ));
        }
        spec.validate()?;
        Ok(Self {
            r#ref: ResourceRef::new(collection, id)?,
            spec,
            policy: Policy::Report,
            notify: Vec::new(),
        })
    }
}

/// The rule for a resource's `notify` list: at most [`MAX_LIST_ITEMS`] entries, services only.
pub fn validate_notify(notify: &[ResourceRef]) -> Result<(), ProtocolError> {
    list("notify", notify)?;
    if notify.iter().any(|n| n.collection != Collection::Services) {
        return Err(ProtocolError::invalid(
            "notify",
            "notify may only name services",
        ));
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    collection: Collection,
    id: String,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "is_report")]
    policy: Policy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    notify: Vec<ResourceRef>,
}

fn is_report(p: &Policy) -> bool {
    *p == Policy::Report
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RawResource {
            collection: self.r#ref.collection,
            id: self.r#ref.id.as_str().to_owned(),
            spec: self.spec.to_json(),
            policy: self.policy,
            notify: self.notify.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawResource::deserialize(d)?;
        let r#ref = ResourceRef::new(raw.collection, &raw.id).map_err(serde::de::Error::custom)?;
        let spec_value = if raw.spec.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            raw.spec
        };
        let spec = Spec::from_json(raw.collection, spec_value).map_err(serde::de::Error::custom)?;
        validate_notify(&raw.notify).map_err(serde::de::Error::custom)?;
        Ok(Resource {
            r#ref,
            spec,
            policy: raw.policy,
            notify: raw.notify,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(Mode::parse("0644").unwrap().0, 0o644);
        assert_eq!(Mode::parse("1777").unwrap().0, 0o1777);
        assert_eq!(Mode::parse("0644").unwrap().to_string(), "0644");
        assert_eq!(Mode::parse("600").unwrap().to_string(), "0600");
        for bad in ["", "0x644", "0888", "17777", "-1", "644a"] {
            assert!(Mode::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_parses_typed_spec() {
        let r: Resource = serde_json::from_value(json!({
            "collection": "files", "id": "/etc/motd",
            "spec": {"ensure": "present", "content": "hi\n", "mode": "0644", "owner": "root", "group": "root"}
        }))
        .unwrap();
        match &r.spec {
            Spec::File(f) => assert_eq!(f.mode, Some(Mode(0o644))),
            other => panic!("{other:?}"),
        }
        let back = serde_json::to_value(&r).unwrap();
        let again: Resource = serde_json::from_value(back).unwrap();
        assert_eq!(r, again);
    }

    #[test]
    fn unknown_spec_fields_and_mismatches_are_rejected() {
        let err = serde_json::from_value::<Resource>(json!({
            "collection": "files", "id": "/etc/motd", "spec": {"contnet": "typo"}
        }))
        .unwrap_err();
        assert!(err.to_string().contains("contnet"), "{err}");
        assert!(serde_json::from_value::<Resource>(json!({
            "collection": "files", "id": "/etc/motd", "spec": {}, "extra": 1
        }))
        .is_err());
        assert!(serde_json::from_value::<Resource>(json!({
            "collection": "packages", "id": "/etc/motd", "spec": {}
        }))
        .is_err());
        assert!(serde_json::from_value::<Resource>(json!({
            "collection": "files", "id": "/a", "notify": [{"collection": "files", "id": "/b"}]
        }))
        .is_err());
    }

    #[test]
    fn inline_content_limit_is_exact() {
        let at = "a".repeat(MAX_INLINE_CONTENT_BYTES);
        let ok = json!({"collection": "files", "id": "/f", "spec": {"content": at}});
        serde_json::from_value::<Resource>(ok).unwrap();
        let over = "a".repeat(MAX_INLINE_CONTENT_BYTES + 1);
        let bad = json!({"collection": "files", "id": "/f", "spec": {"content": over}});
        let err = serde_json::from_value::<Resource>(bad).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn password_hash_is_never_plaintext_nor_printed() {
        let bad =
            json!({"collection": "users", "id": "alice", "spec": {"password_hash": "hunter2"}});
        assert!(serde_json::from_value::<Resource>(bad).is_err());
        let good = json!({"collection": "users", "id": "alice", "spec": {"password_hash": "$6$salt$hash"}});
        let r: Resource = serde_json::from_value(good).unwrap();
        assert!(!format!("{r:?}").contains("$6$salt$hash"));
    }

    #[test]
    fn pins_only_with_present_and_key_paths_stay_in_their_option() {
        let bad = json!({"collection": "packages", "id": "nginx", "spec": {"ensure": "latest", "version": "1.2"}});
        assert!(serde_json::from_value::<Resource>(bad).is_err());
        let bad = json!({"collection": "repos", "id": "x", "spec": {"url": "http://a/", "key_path": "/k.gpg] trusted=yes"}});
        assert!(serde_json::from_value::<Resource>(bad).is_err());
    }

    #[test]
    fn repo_fields_cannot_inject_lines() {
        let bad = json!({"collection": "repos", "id": "x", "spec": {"url": "http://a/\nbaseurl=http://evil"}});
        assert!(serde_json::from_value::<Resource>(bad).is_err());
        let bad =
            json!({"collection": "repos", "id": "x", "spec": {"url": "http://a/ trusted=yes"}});
        assert!(serde_json::from_value::<Resource>(bad).is_err());
    }
}
