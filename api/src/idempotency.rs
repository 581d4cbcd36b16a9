//! `Idempotency-Key` on POST: the same key from the same token within the retention time gets the
//! first response again instead of doing the work twice.
//!
//! Keys live in the store ([`Store::claim_idempotency_key`]), so every node of a cluster sees the
//! same ones and they survive a restart: a client retrying through a load balancer is answered
//! once whichever node its retry reaches. What is kept:
//!
//! - the key is scoped to the token (two tokens never see each other's responses);
//! - the request is fingerprinted (method, path and query, body); the same key with a different
//!   request is refused (422) rather than answered with an unrelated response;
//! - while the first request runs, a second one with the same key is refused (409), never run. A
//!   claim whose node died mid-request lapses after `idempotency_lease_s`;
//! - except on routes that submit a change to a host ([`JOINED_ROUTES`]): the change is recorded
//!   under an id derived from the token, the key and the host ([`change_id`]), so a second request
//!   while the first runs — or after the node that ran it died, or after its claim lapsed — finds
//!   that change and answers with it instead of recording a second one (ARCHITECTURE §24);
//! - responses with a 5xx status, bodies that are not UTF-8 and bodies over
//!   `idempotency_max_bytes` are not kept (the key is forgotten and a retry runs again).

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use chrono::{DateTime, Utc};
use comodit_protocol::HostId;
use comodit_store::{ChangeId, JobId, KeptResponse, Store, TokenId};
use sha2::{Digest, Sha256};

/// Longest accepted `Idempotency-Key`.
pub(crate) const MAX_KEY_BYTES: usize = comodit_store::MAX_IDEMPOTENCY_KEY_BYTES;

/// Routes (as matched) whose handler records its work as a change under [`change_id`]: a
/// request there with a key that is still in progress joins the first request's change instead
/// of being refused.
pub(crate) const JOINED_ROUTES: &[&str] = &[
    "/api/v1/hosts/{id}/run",
    "/api/v1/orgs/{org}/jobs",
    "/api/v1/orgs/{org}/envs/{env}/jobs",
];

/// The token and key of a keyed request, for its handler (a request extension).
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub token: TokenId,
    pub key: String,
}

impl IdempotencyKey {
    /// The id the change of this key's request to `host` is recorded under: the same for every
    /// retry, so that the store finds the first one (sha256 of token, key and host, shaped as a
    /// UUID).
    pub fn change_id(&self, host: HostId) -> ChangeId {
        ChangeId(derived_uuid(&[
            b"comodit change\0",
            self.token.0.as_bytes(),
            host.0.as_bytes(),
            self.key.as_bytes(),
        ]))
    }

    /// The id of the job a keyed `POST .../jobs` creates: the same for every retry, so that a
    /// retry finds the job and records only the changes still missing (each under
    /// `jobs::job_change_id`).
    pub fn job_id(&self) -> JobId {
        JobId(derived_uuid(&[
            b"comodit job\0",
            self.token.0.as_bytes(),
            self.key.as_bytes(),
        ]))
    }
}

/// An id that is the same whenever `parts` are: their sha256, shaped as a UUID.
pub(crate) fn derived_uuid(parts: &[&[u8]]) -> uuid::Uuid {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The fingerprint of a request (sha256, lowercase hex): what must be equal for a key to be
/// replayed.
pub(crate) fn fingerprint(method: &str, path_and_query: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(path_and_query.as_bytes());
    h.update([0]);
    h.update(body);
    hex::encode(h.finalize())
}

/// A response as the store keeps it; `None` if it cannot be kept (a body that is not UTF-8).
pub(crate) fn keep(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Option<KeptResponse> {
    Some(KeptResponse {
        status: status.as_u16(),
        headers: headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body: std::str::from_utf8(body).ok()?.to_owned(),
    })
}

/// The status and headers of a kept response (headers that no longer parse are left out).
pub(crate) fn replay_head(kept: &KeptResponse) -> (StatusCode, HeaderMap) {
    let status = StatusCode::from_u16(kept.status).unwrap_or(StatusCode::OK);
    let mut headers = HeaderMap::new();
    for (n, v) in &kept.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(n.as_str()), HeaderValue::try_from(v)) {
            headers.append(n, v);
        }
    }
    (status, headers)
}

/// A key this request claimed. [`finish`](Self::finish) it with the response; dropped unfinished
/// (the client went away, the handler panicked) it is forgotten in the background, so that a
/// retry can run.
pub(crate) struct Claim {
    pub store: Arc<dyn Store>,
    pub token: TokenId,
    pub key: String,
    pub fingerprint: String,
    pub done: bool,
}

impl Claim {
    /// Keeps `response` for replays until `keep_until`; `None` forgets the key. A store error is
    /// logged: the response still goes out, and the key stays claimed until its lease lapses.
    pub async fn finish(mut self, response: Option<KeptResponse>, keep_until: DateTime<Utc>) {
        self.done = true;
        let r = self
            .store
            .finish_idempotency_key(
                self.token,
                &self.key,
                &self.fingerprint,
                response,
                keep_until,
            )
            .await;
        if let Err(e) = r {
            metrics::counter!("comodit_api_idempotency_store_failures_total").increment(1);
            tracing::warn!(error = %e, "could not record the outcome of an idempotency key");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let claim = Claim {
            store: self.store.clone(),
            token: self.token,
            key: std::mem::take(&mut self.key),
            fingerprint: std::mem::take(&mut self.fingerprint),
            done: false,
        };
        rt.spawn(claim.finish(None, Utc::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_differ_by_method_path_and_body() {
        let a = fingerprint("POST", "/x", b"{}");
        assert_eq!(a.len(), 64);
        assert_eq!(a, fingerprint("POST", "/x", b"{}"));
        assert_ne!(a, fingerprint("PUT", "/x", b"{}"));
        assert_ne!(a, fingerprint("POST", "/y", b"{}"));
        assert_ne!(a, fingerprint("POST", "/x", b"{ }"));
        // The separators keep a path and a body from trading bytes.
        assert_ne!(
            fingerprint("POST", "/x", b"a"),
            fingerprint("POST", "/xa", b"")
        );
    }

    #[test]
    fn change_ids_are_the_same_for_a_retry_and_differ_by_token_key_and_host() {
        let (t1, t2) = (TokenId::random(), TokenId::random());
        let (h1, h2) = (HostId::random(), HostId::random());
        let k = |token, key: &str| IdempotencyKey {
            token,
            key: key.into(),
        };
        let a = k(t1, "a").change_id(h1);
        assert_eq!(a, k(t1, "a").change_id(h1));
        assert_ne!(a, k(t2, "a").change_id(h1));
        assert_ne!(a, k(t1, "b").change_id(h1));
        assert_ne!(a, k(t1, "a").change_id(h2));
        assert_eq!(a.0.get_version_num(), 4, "shaped as a random UUID");
    }

    #[test]
    fn kept_responses_round_trip_and_binary_bodies_are_not_kept() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("location", HeaderValue::from_static("/api/v1/orgs/1"));
        let kept = keep(StatusCode::CREATED, &headers, b"{\"a\":1}").unwrap();
        let (status, back) = replay_head(&kept);
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(back, headers);
        assert_eq!(kept.body, "{\"a\":1}");
        assert!(keep(StatusCode::OK, &headers, &[0xff, 0xfe]).is_none());
    }
}
