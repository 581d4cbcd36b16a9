//! Strict identifiers: hosts, commands, epochs, shards, collections and resource ids.
//!
//! Every id is parsed into a newtype that can only hold a valid value, so code past the parser
//! never re-checks and never sees a path with `..` or a package name with a space.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::limits::MAX_PATH_BYTES;
use crate::ProtocolError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new random id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Always the lowercase hyphenated form: it is what routing keys and queue names use.
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $name {
            type Err = ProtocolError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                // Only the canonical lowercase hyphenated form: names built from it must be unique.
                let id = Uuid::try_parse(s)
                    .map_err(|_| ProtocolError::invalid("id", format!("not a uuid: {s:?}")))?;
                if id.hyphenated().to_string() != s {
                    return Err(ProtocolError::invalid(
                        "id",
                        format!("uuid must be lowercase and hyphenated: {s:?}"),
                    ));
                }
                Ok(Self(id))
            }
        }
    };
}

uuid_id!(
    /// A managed host, assigned at enrollment. Also the host's broker user name.
    HostId
);
uuid_id!(
    /// A command sent to an agent; the agent de-duplicates on it.
    CommandId
);

impl HostId {
    /// The shard that owns this host: `u64::from_be_bytes(uuid[0..8]) % n_shards` (DESIGN §4).
    pub fn shard(&self, n_shards: u32) -> Shard {
        assert!(n_shards > 0, "n_shards must be positive");
        let bytes = self.0.as_bytes();
        let mut head = [0u8; 8];
        head.copy_from_slice(&bytes[0..8]);
        Shard((u64::from_be_bytes(head) % u64::from(n_shards)) as u32)
    }
}

/// A shard number, `0..n_shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shard(pub u32);

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The epoch of a shard assignment (the Raft log index of the assignment). Agents reject commands
/// whose epoch is lower than the highest they have seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The collections an agent exposes. Each has its own id syntax and spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collection {
    Files,
    Directories,
    Symlinks,
    Packages,
    Repos,
    Services,
    Users,
    Groups,
}

impl Collection {
    pub const ALL: [Collection; 8] = [
        Collection::Files,
        Collection::Directories,
        Collection::Symlinks,
        Collection::Packages,
        Collection::Repos,
        Collection::Services,
        Collection::Users,
        Collection::Groups,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Collection::Files => "files",
            Collection::Directories => "directories",
            Collection::Symlinks => "symlinks",
            Collection::Packages => "packages",
            Collection::Repos => "repos",
            Collection::Services => "services",
            Collection::Users => "users",
            Collection::Groups => "groups",
        }
    }

    /// Whether ids of this collection are filesystem paths.
    pub fn is_path(&self) -> bool {
        matches!(
            self,
            Collection::Files | Collection::Directories | Collection::Symlinks
        )
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Collection {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Collection::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                ProtocolError::invalid("collection", format!("unknown collection {s:?}"))
            })
    }
}

/// The id of a resource inside its collection, validated for that collection:
/// - files, directories, symlinks: an absolute, normalized path (no `.`/`..` components, no empty
///   components, no trailing slash, no NUL), at most [`MAX_PATH_BYTES`];
/// - packages: `[A-Za-z0-9][A-Za-z0-9+._:@-]*`, at most 128 bytes (deb, rpm and apk names);
/// - repos: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 bytes (it names a file on the host);
/// - services: `[A-Za-z0-9][A-Za-z0-9@._:-]*`, at most 255 bytes, no `..`;
/// - users and groups: `[a-z_][a-z0-9_-]*` with an optional trailing `$`, at most 32 bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn parse(collection: Collection, id: &str) -> Result<Self, ProtocolError> {
        validate_id(collection, id)?;
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for ResourceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

fn name_ok(s: &str, max: usize, first: impl Fn(char) -> bool, rest: impl Fn(char) -> bool) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if first(c) => {}
        _ => return false,
    }
    s.len() <= max && chars.all(rest)
}

/// Checks that `path` is absolute and normalized. Used for resource ids and for path-valued fields
/// (a run's `cwd`, a list's `under`).
pub fn validate_abs_path(field: &'static str, path: &str) -> Result<(), ProtocolError> {
    let bad = |why: &str| Err(ProtocolError::invalid(field, format!("{why}: {path:?}")));
    if path.len() > MAX_PATH_BYTES {
        return bad("path too long");
    }
    if !path.starts_with('/') {
        return bad("path must be absolute");
    }
    if path.contains('\0') {
        return bad("path contains NUL");
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return bad("path must not end with '/'");
    }
    for component in path[1..].split('/') {
        match component {
            "" => return bad("path has an empty component"),
            "." | ".." => return bad("path must be normalized (no '.' or '..')"),
            _ => {}
        }
    }
    Ok(())
}

fn validate_id(collection: Collection, id: &str) -> Result<(), ProtocolError> {
    let ok = match collection {
        Collection::Files | Collection::Directories | Collection::Symlinks => {
            validate_abs_path("id", id)?;
            if id == "/" && collection != Collection::Directories {
                return Err(ProtocolError::invalid("id", "'/' is not a file or symlink"));
            }
            true
        }
        Collection::Packages => name_ok(
            id,
            128,
            |c| c.is_ascii_alphanumeric(),
            |c| c.is_ascii_alphanumeric() || "+._:@-".contains(c),
        ),
        Collection::Repos => name_ok(
            id,
            128,
            |c| c.is_ascii_alphanumeric(),
            |c| c.is_ascii_alphanumeric() || "._-".contains(c),
        ),
        Collection::Services => {
            !id.contains("..")
                && name_ok(
                    id,
                    255,
                    |c| c.is_ascii_alphanumeric(),
                    |c| c.is_ascii_alphanumeric() || "@._:-".contains(c),
                )
        }
        Collection::Users | Collection::Groups => {
            let body = id.strip_suffix('$').unwrap_or(id);
            id.len() <= 32
                && name_ok(
                    body,
                    32,
                    |c| c.is_ascii_lowercase() || c == '_',
                    |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-',
                )
        }
    };
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::invalid(
            "id",
            format!("{id:?} is not a valid id for {collection}"),
        ))
    }
}

/// A reference to one resource: its collection and its id in that collection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ResourceRef {
    pub collection: Collection,
    pub id: ResourceId,
}

impl ResourceRef {
    pub fn new(collection: Collection, id: &str) -> Result<Self, ProtocolError> {
        Ok(Self {
            collection,
            id: ResourceId::parse(collection, id)?,
        })
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.collection, self.id)
    }
}

impl<'de> Deserialize<'de> for ResourceRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            collection: Collection,
            id: String,
        }
        let raw = Raw::deserialize(d)?;
        ResourceRef::new(raw.collection, &raw.id).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_function_matches_design() {
        let host: HostId = "00000000-0000-0101-8000-000000000000".parse().unwrap();
        assert_eq!(host.shard(256), Shard((0x0101u64 % 256) as u32));
        let host: HostId = "ffffffff-ffff-ffff-8000-000000000000".parse().unwrap();
        assert_eq!(host.shard(256), Shard(255));
        assert_eq!(host.shard(1), Shard(0));
    }

    #[test]
    fn uuid_must_be_canonical() {
        assert!("0f8fad5b-d9cb-469f-a165-70867728950e"
            .parse::<HostId>()
            .is_ok());
        assert!("0F8FAD5B-D9CB-469F-A165-70867728950E"
            .parse::<HostId>()
            .is_err());
        assert!("0f8fad5bd9cb469fa16570867728950e"
            .parse::<HostId>()
            .is_err());
        assert!("not-a-uuid".parse::<HostId>().is_err());
    }

    #[test]
    fn paths_are_absolute_and_normalized() {
        for good in ["/etc/motd", "/a/b c/d", "/x"] {
            ResourceId::parse(Collection::Files, good).unwrap();
        }
        ResourceId::parse(Collection::Directories, "/").unwrap();
        for bad in [
            "etc/motd",
            "/etc/../shadow",
            "/etc/./motd",
            "/etc//motd",
            "/etc/",
            "/",
            "",
            "/a\0b",
        ] {
            assert!(
                ResourceId::parse(Collection::Files, bad).is_err(),
                "{bad:?} accepted"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        ResourceId::parse(Collection::Files, &long).unwrap();
        let too_long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert!(ResourceId::parse(Collection::Files, &too_long).is_err());
    }

    #[test]
    fn names_are_validated_per_collection() {
        ResourceId::parse(Collection::Packages, "libstdc++6").unwrap();
        ResourceId::parse(Collection::Packages, "python3.11").unwrap();
        assert!(ResourceId::parse(Collection::Packages, "foo bar").is_err());
        assert!(ResourceId::parse(Collection::Packages, "-rf").is_err());
        assert!(ResourceId::parse(Collection::Packages, "a;rm").is_err());
        ResourceId::parse(Collection::Services, "getty@tty1.service").unwrap();
        assert!(ResourceId::parse(Collection::Services, "../../bin/sh").is_err());
        ResourceId::parse(Collection::Users, "www-data").unwrap();
        ResourceId::parse(Collection::Users, "machine$").unwrap();
        assert!(ResourceId::parse(Collection::Users, "Root").is_err());
        assert!(ResourceId::parse(Collection::Users, &"a".repeat(33)).is_err());
        ResourceId::parse(Collection::Users, &"a".repeat(32)).unwrap();
        ResourceId::parse(Collection::Repos, "docker-ce").unwrap();
        assert!(ResourceId::parse(Collection::Repos, "../x").is_err());
    }
}
