//! Who is calling and what they may do: bearer tokens, roles and scopes.
//!
//! A request's token is looked up by the sha256 of its secret ([`hash_token`]); the store never
//! holds a secret. The token carries a [`Role`] and a [`Scope`]:
//!
//! | role | may |
//! |---|---|
//! | admin | everything, everywhere (its scope is always global) |
//! | operator | read and change what lies inside its scope |
//! | viewer | read what lies inside its scope |
//!
//! A request's *target* is the organization or environment the route's path points at — through
//! the organization and environment in the path, or the host's or enrollment token's own
//! organization and environment. A scope covers a target when the target lies inside it; an
//! environment-scoped token may also *read* (never change) the record of its own organization.
//! Routes without a target are either admin-only ([`Rule::Admin`]) or listings
//! ([`Rule::Listing`]) whose handlers narrow the results to the caller's scope.

use std::str::FromStr;

use axum::http::{header, HeaderMap, Method};
use comodit_protocol::HostId;
use comodit_store::{
    ApiToken, EnrollmentToken, EnvId, Environment, Host, OrgId, Organization, Role, Scope, Store,
    TokenId,
};
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::problem::ApiError;

/// The sha256 (lowercase hex) of a token secret: what the store keeps and looks tokens up by.
/// Shared with the node, which stores the first admin token the same way.
pub fn hash_token(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret: a short prefix saying what it is (so secret scanners and people can tell
/// tokens apart) and 256 bits from the OS generator, in hex.
pub(crate) fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Longest `Authorization` secret looked up; longer ones are refused before hashing.
const MAX_SECRET_BYTES: usize = 512;

/// The authenticated caller, put into the request's extensions by the gate.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token: ApiToken,
}

impl Caller {
    /// The name recorded as actor in the audit log and as `requested_by` of changes.
    pub fn name(&self) -> &str {
        &self.token.name
    }

    pub fn is_admin(&self) -> bool {
        self.token.role == Role::Admin
    }

    /// The caller's scope, global for admins whatever was stored.
    pub fn scope(&self) -> Scope {
        if self.is_admin() {
            Scope::Global
        } else {
            self.token.scope.clone()
        }
    }
}

/// Finds the caller's token from `Authorization: Bearer <secret>`.
pub(crate) async fn authenticate(
    store: &dyn Store,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthenticated(
            "this route needs an 'Authorization: Bearer <token>' header",
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthenticated("the Authorization header is not ASCII"))?;
    let (scheme, secret) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthenticated("expected 'Authorization: Bearer <token>'"))?;
    let secret = secret.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || secret.is_empty() {
        return Err(ApiError::unauthenticated(
            "expected 'Authorization: Bearer <token>'",
        ));
    }
    if secret.len() > MAX_SECRET_BYTES {
        return Err(ApiError::unauthenticated("unknown or revoked token"));
    }
    match store.find_api_token(&hash_token(secret)).await? {
        Some(token) if !token.revoked => Ok(Caller { token }),
        _ => Err(ApiError::unauthenticated("unknown or revoked token")),
    }
}

/// How a route is authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// Admin tokens only.
    Admin,
    /// Read (GET) or change (other methods) the route's target, within the caller's scope.
    Access,
    /// A listing without a target, open to every token; the handler narrows it to the scope.
    Listing,
}

/// The authorization rule of a route (by its template). Anything not named here is `Access`,
/// which refuses non-admins when the route has no target: a new route fails closed.
pub(crate) fn rule(method: &Method, route: &str) -> Rule {
    // HEAD is a GET without the body, authorized the same way.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    match (method, route) {
        (_, r) if r == "/api/v1/tokens" || r.starts_with("/api/v1/tokens/") => Rule::Admin,
        (_, "/api/v1/audit") => Rule::Admin,
        (&Method::POST, "/api/v1/orgs") | (&Method::DELETE, "/api/v1/orgs/{org}") => Rule::Admin,
        (
            &Method::GET,
            "/api/v1/orgs"
            | "/api/v1/hosts"
            | "/api/v1/events"
            | "/api/v1/cluster"
            | "/api/v1/cluster/shards",
        ) => Rule::Listing,
        (_, r) if r.starts_with("/api/v1/cluster/") => Rule::Admin,
        _ => Rule::Access,
    }
}

/// What a request acts on, for the scope check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    None,
    Org(OrgId),
    Env(OrgId, EnvId),
}

/// Whether `caller` may act on `target` under `rule`; `write` for every method but GET/HEAD.
pub(crate) fn allowed(caller: &Caller, rule: Rule, write: bool, target: Target) -> bool {
    if caller.is_admin() {
        return true;
    }
    match rule {
        Rule::Admin => false,
        Rule::Listing => !write,
        Rule::Access => {
            if write && caller.token.role != Role::Operator {
                return false;
            }
            covers(&caller.scope(), target, write)
        }
    }
}

/// Whether `scope` covers `target`.
pub(crate) fn covers(scope: &Scope, target: Target, write: bool) -> bool {
    match (scope, target) {
        (_, Target::None) => false,
        (Scope::Global, _) => true,
        (Scope::Org { org }, Target::Org(o) | Target::Env(o, _)) => *org == o,
        (Scope::Env { env, .. }, Target::Env(_, e)) => *env == e,
        // An environment's token may read its organization's record, not change it.
        (Scope::Env { org, .. }, Target::Org(o)) => !write && *org == o,
    }
}

/// Whether `scope` covers the host's environment.
pub(crate) fn covers_host(scope: &Scope, host: &Host, write: bool) -> bool {
    covers(scope, Target::Env(host.org, host.env), write)
}

/// The records a route's path names, loaded once by the gate for the scope check and handed to
/// the handler in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    pub org: Option<Organization>,
    pub env: Option<Environment>,
    pub host: Option<Host>,
    pub enrollment_token: Option<EnrollmentToken>,
}

impl Resolved {
    pub(crate) fn target(&self) -> Target {
        if let Some(h) = &self.host {
            Target::Env(h.org, h.env)
        } else if let Some(t) = &self.enrollment_token {
            Target::Env(t.org, t.env)
        } else if let Some(e) = &self.env {
            Target::Env(e.org, e.id)
        } else if let Some(o) = &self.org {
            Target::Org(o.id)
        } else {
            Target::None
        }
    }

    pub(crate) fn host(&self) -> Result<&Host, ApiError> {
        self.host
            .as_ref()
            .ok_or_else(|| ApiError::internal("route without a resolved host"))
    }

    pub(crate) fn org(&self) -> Result<&Organization, ApiError> {
        self.org
            .as_ref()
            .ok_or_else(|| ApiError::internal("route without a resolved organization"))
    }

    pub(crate) fn env(&self) -> Result<&Environment, ApiError> {
        self.env
            .as_ref()
            .ok_or_else(|| ApiError::internal("route without a resolved environment"))
    }
}

/// Loads what the path parameters of `route` name: `{org}` and `{env}` (by id or name), `{id}` of
/// a host or of an enrollment token. Invalid ids are 400, missing records 404.
pub(crate) async fn resolve(
    store: &dyn Store,
    route: &str,
    params: &[(String, String)],
) -> Result<Resolved, ApiError> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = Resolved::default();
    if let Some(org) = param("org") {
        let org = find_org(store, org).await?;
        if let Some(env) = param("env") {
            out.env = Some(find_env(store, &org, env).await?);
        }
        out.org = Some(org);
    }
    if let Some(id) = param("id") {
        if route.starts_with("/api/v1/hosts/{id}") {
            let host = parse_host_id(id)?;
            out.host = Some(
                store
                    .get_host(host)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("no such host: {host}")))?,
            );
        } else if route.starts_with("/api/v1/enrollment-tokens/{id}") {
            let id = TokenId(parse_uuid("id", id)?);
            out.enrollment_token =
                Some(store.get_enrollment_token(id).await?.ok_or_else(|| {
                    ApiError::not_found(format!("no such enrollment token: {id}"))
                })?);
        }
    }
    Ok(out)
}

pub(crate) fn parse_host_id(s: &str) -> Result<HostId, ApiError> {
    HostId::from_str(s).map_err(|e| ApiError::invalid_id("id", format!("host id: {e}")))
}

/// Parses a uuid id (of an organization, token, change, ...) from a path or query parameter; only
/// the canonical lowercase hyphenated form, like the protocol's ids.
pub(crate) fn parse_uuid(field: &str, s: &str) -> Result<Uuid, ApiError> {
    match Uuid::try_parse(s) {
        Ok(u) if u.hyphenated().to_string() == s => Ok(u),
        _ => Err(ApiError::invalid_id(
            field,
            format!("{field} must be a lowercase hyphenated uuid: {s:?}"),
        )),
    }
}

/// An organization by id (a uuid) or by name. Names that look like uuids are refused at creation,
/// so the two never collide.
pub(crate) async fn find_org(store: &dyn Store, key: &str) -> Result<Organization, ApiError> {
    let found = match Uuid::try_parse(key) {
        Ok(u) => store.get_org(OrgId(u)).await?,
        Err(_) => {
            check_name("org", key).map_err(|e| ApiError::invalid_id("org", e))?;
            store.get_org_by_name(key).await?
        }
    };
    found.ok_or_else(|| ApiError::not_found(format!("no such organization: {key:?}")))
}

/// An environment of `org` by id or by name.
pub(crate) async fn find_env(
    store: &dyn Store,
    org: &Organization,
    key: &str,
) -> Result<Environment, ApiError> {
    let found = match Uuid::try_parse(key) {
        Ok(u) => store.get_env(EnvId(u)).await?.filter(|e| e.org == org.id),
        Err(_) => {
            check_name("env", key).map_err(|e| ApiError::invalid_id("env", e))?;
            store.get_env_by_name(org.id, key).await?
        }
    };
    found.ok_or_else(|| {
        ApiError::not_found(format!(
            "no such environment in organization {}: {key:?}",
            org.name
        ))
    })
}

/// Organization and environment names: `[a-z0-9][a-z0-9-]{0,62}`, and not a uuid (a path segment
/// is looked up as an id when it parses as one).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(format!(
            "{what} name must match [a-z0-9][a-z0-9-]{{0,62}}: {name:?}"
        ));
    }
    if Uuid::try_parse(name).is_ok() {
        return Err(format!("{what} name must not look like a uuid: {name:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn caller(role: Role, scope: Scope) -> Caller {
        Caller {
            token: ApiToken {
                id: TokenId::random(),
                name: "t".into(),
                secret_sha256: String::new(),
                role,
                scope,
                revoked: false,
                created_at: Utc::now(),
            },
        }
    }

    #[test]
    fn roles_and_scopes() {
        let (o1, o2) = (OrgId::random(), OrgId::random());
        let (e1, e2) = (EnvId::random(), EnvId::random());
        let env1 = Target::Env(o1, e1);
        let env2 = Target::Env(o1, e2);

        let op = caller(Role::Operator, Scope::Env { org: o1, env: e1 });
        assert!(allowed(&op, Rule::Access, true, env1));
        assert!(!allowed(&op, Rule::Access, true, env2));
        assert!(!allowed(&op, Rule::Access, false, env2));
        assert!(allowed(&op, Rule::Access, false, Target::Org(o1)));
        assert!(!allowed(&op, Rule::Access, true, Target::Org(o1)));
        assert!(!allowed(&op, Rule::Admin, false, Target::None));
        assert!(!allowed(&op, Rule::Access, false, Target::None));

        let viewer = caller(Role::Viewer, Scope::Org { org: o1 });
        assert!(allowed(&viewer, Rule::Access, false, env2));
        assert!(!allowed(&viewer, Rule::Access, true, env2));
        assert!(!allowed(&viewer, Rule::Access, false, Target::Org(o2)));
        assert!(allowed(&viewer, Rule::Listing, false, Target::None));

        let admin = caller(Role::Admin, Scope::Org { org: o2 });
        assert!(allowed(&admin, Rule::Access, true, env1));
        assert!(allowed(&admin, Rule::Admin, true, Target::None));
    }

    #[test]
    fn route_rules() {
        assert_eq!(rule(&Method::GET, "/api/v1/tokens"), Rule::Admin);
        assert_eq!(rule(&Method::DELETE, "/api/v1/tokens/{id}"), Rule::Admin);
        assert_eq!(rule(&Method::GET, "/api/v1/audit"), Rule::Admin);
        assert_eq!(rule(&Method::POST, "/api/v1/orgs"), Rule::Admin);
        assert_eq!(rule(&Method::GET, "/api/v1/orgs"), Rule::Listing);
        assert_eq!(rule(&Method::HEAD, "/api/v1/hosts"), Rule::Listing);
        assert_eq!(rule(&Method::POST, "/api/v1/hosts"), Rule::Access);
        assert_eq!(
            rule(
                &Method::PUT,
                "/api/v1/hosts/{id}/resources/{collection}/{*resource_id}"
            ),
            Rule::Access
        );
    }

    #[test]
    fn names_are_checked() {
        check_name("org", "acme").unwrap();
        check_name("org", "a-1").unwrap();
        assert!(check_name("org", "").is_err());
        assert!(check_name("org", "-a").is_err());
        assert!(check_name("org", "Acme").is_err());
        assert!(check_name("org", &"a".repeat(64)).is_err());
        assert!(check_name("org", "0f8fad5b-d9cb-469f-a165-70867728950e").is_err());
    }

    #[test]
    fn secrets_hash_to_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let s = new_secret("cmd_");
        assert!(s.starts_with("cmd_") && s.len() == 4 + 64);
        assert_ne!(s, new_secret("cmd_"));
    }
}
