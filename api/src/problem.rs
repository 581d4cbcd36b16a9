//! Every error leaves the API as `application/problem+json` (RFC 9457).
//!
//! Handlers return [`ApiError`]; its response carries a [`Problem`] body (`type`, `title`, `status`,
//! `detail`, and `field` when one input field is to blame). Errors raised by axum itself (malformed
//! JSON, unknown fields, a bad query string, a body over the limit, an unknown route, a wrong method)
//! are plain text when axum makes them; [`problemize`] rewrites any such response on its way out, so
//! a client never has to parse two error formats.
//!
//! Problem types are URNs (`urn:comodit:problem:<kind>`): stable identifiers a client can match on,
//! without pretending there is a web page behind them. Generic HTTP failures use `about:blank`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use comodit_actors::OpsError;
use comodit_protocol::ProtocolError;
use comodit_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:comodit:problem:<kind>`, or `about:blank` for a plain HTTP failure.
    #[serde(rename = "type")]
    pub r#type: String,
    /// A short summary of the kind of problem (the same for every occurrence of a type).
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request. Never contains a secret.
    pub detail: String,
    /// The input field (body field, query or path parameter) to blame, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What an error response was, kept in the response's extensions so the audit layer can record the
/// outcome without parsing the body.
#[derive(Debug, Clone)]
pub(crate) struct ProblemSummary {
    pub kind: &'static str,
    pub field: Option<String>,
}

/// The error type of every handler and layer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// The `<kind>` of the problem type; `http` means "plain HTTP failure" (`about:blank`).
    pub kind: &'static str,
    pub detail: String,
    pub field: Option<String>,
    /// Extra response headers (`ETag` on 412, `WWW-Authenticate` on 401). A vector, not a
    /// `HeaderMap`, to keep the error small.
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            detail: detail.into(),
            field: None,
            headers: Vec::new(),
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn bad_request(kind: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, kind, detail)
    }

    pub fn invalid_id(field: &str, detail: impl Into<String>) -> Self {
        Self::bad_request("invalid-id", detail).field(field)
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-input", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail).header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"comodit\""),
        )
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// A protocol validation error about the request's input (body or query), naming the field.
    pub fn from_protocol(status: StatusCode, err: &ProtocolError) -> Self {
        let kind = if status == StatusCode::BAD_REQUEST {
            "invalid-id"
        } else {
            "invalid-input"
        };
        let e = Self::new(status, kind, err.to_string());
        match err {
            ProtocolError::Invalid { field, .. } => e.field(*field),
            ProtocolError::TooLarge { what, .. } => e.field(*what),
            ProtocolError::Malformed(_) => e,
        }
    }

    pub fn title(&self) -> String {
        title_of(self.kind, self.status)
    }

    pub fn problem(&self) -> Problem {
        Problem {
            r#type: type_of(self.kind),
            title: self.title(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            field: self.field.clone(),
        }
    }
}

fn type_of(kind: &str) -> String {
    if kind == "http" {
        "about:blank".to_owned()
    } else {
        format!("urn:comodit:problem:{kind}")
    }
}

fn title_of(kind: &str, status: StatusCode) -> String {
    let t = match kind {
        "unauthenticated" => "Missing or unknown API token",
        "forbidden" => "Not allowed for this token",
        "not-found" => "Not found",
        "invalid-id" => "Invalid identifier",
        "invalid-query" => "Invalid query parameter",
        "invalid-body" => "Invalid request body",
        "invalid-input" => "Invalid input",
        "conflict" => "Conflict with the current state",
        "precondition-required" => "If-Match required",
        "precondition-failed" => "Version mismatch",
        "too-large" => "Request body too large",
        "unsupported-media-type" => "Unsupported media type",
        "method-not-allowed" => "Method not allowed",
        "idempotency-in-progress" => "A request with this Idempotency-Key is in progress",
        "idempotency-key-reused" => "Idempotency-Key reused for a different request",
        "unavailable" => "Service unavailable",
        "not-ready" => "Not ready",
        "timeout" => "Outcome unknown (timed out)",
        "internal" => "Internal error",
        _ => status.canonical_reason().unwrap_or("Error"),
    };
    t.to_owned()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).expect("problems always serialize");
        let mut resp = (self.status, body).into_response();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp.extensions_mut().insert(ProblemSummary {
            kind: self.kind,
            field: self.field,
        });
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("not found: {what}")),
            StoreError::Conflict(what) => ApiError::conflict(what),
            StoreError::VersionMismatch { expected, found } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "precondition-failed",
                format!("the record changed: expected version {expected}, found {found}"),
            )
            .header(header::ETAG, etag(found)),
            StoreError::StaleEpoch { .. } => ApiError::conflict(
                "the host's shard moved to another owner while this request ran; retry",
            ),
            StoreError::TokenUnusable(why) => ApiError::conflict(format!("token unusable: {why}")),
            StoreError::Invalid(why) => ApiError::bad_request("invalid-input", why),
            StoreError::Backend(why) => {
                tracing::error!(error = %why, "store backend failed");
                ApiError::internal("the store failed; the outcome of this request is unknown")
            }
        }
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::UnknownHost(h) => ApiError::not_found(format!("no such host: {h}")),
            OpsError::NotOwner(h) => ApiError::unavailable(format!(
                "host {h} is served by another node right now; retry"
            )),
            OpsError::Store(e) => e.into(),
            OpsError::Bus(why) => {
                tracing::warn!(error = %why, "broker failure during a host operation");
                ApiError::unavailable("the message broker is unavailable; retry")
            }
            OpsError::ShuttingDown => ApiError::unavailable("the node is shutting down; retry"),
            OpsError::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the host actor did not answer in time; the change may or may not be recorded: \
                 check the host's change log",
            ),
        }
    }
}

/// The `ETag` of a record at `version` (strong: versions are exact).
pub(crate) fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"v{version}\"")).expect("digits are a valid header")
}

/// Largest error body of axum's own rejections we read back to put into a problem's `detail`.
const MAX_REJECTION_BYTES: usize = 16 * 1024;

/// Rewrites error responses that are not problem documents yet (axum's rejections, 404 and 405
/// of the router) into problems, keeping headers such as `Allow`.
pub(crate) async fn problemize(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REJECTION_BYTES).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let kind = match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid-body",
        StatusCode::BAD_REQUEST => "invalid-body",
        _ => "http",
    };
    let detail = if text.is_empty() {
        match status {
            StatusCode::NOT_FOUND => "no such route".to_owned(),
            StatusCode::METHOD_NOT_ALLOWED => "this route does not take this method".to_owned(),
            _ => status.canonical_reason().unwrap_or("error").to_owned(),
        }
    } else {
        text
    };
    let mut err = ApiError::new(status, kind, detail);
    if let Some(f) = blamed_field(&err.detail) {
        err = err.field(f);
    }
    let mut out = err.into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// Picks the field out of serde's messages (`unknown field `x``, `missing field `x``) so the
/// problem names it in `field` too, not only in `detail`.
fn blamed_field(detail: &str) -> Option<String> {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(start) = detail.find(marker) {
            let rest = &detail[start + marker.len()..];
            if let Some(end) = rest.find('`') {
                return Some(rest[..end].to_owned());
            }
        }
    }
    None
}

/// A 404 problem for routes that do not exist.
pub(crate) async fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}

/// Makes an empty body response (for 204).
pub(crate) fn no_content() -> Response {
    (StatusCode::NO_CONTENT, Body::empty()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_field_names_are_extracted() {
        assert_eq!(
            blamed_field("Failed to deserialize: spec: unknown field `contnet`, expected one of"),
            Some("contnet".to_owned())
        );
        assert_eq!(
            blamed_field("missing field `name` at line 1"),
            Some("name".into())
        );
        assert_eq!(blamed_field("expected value at line 1 column 1"), None);
    }

    #[test]
    fn problem_types_are_urns_or_about_blank() {
        let p = ApiError::not_found("x").problem();
        assert_eq!(p.r#type, "urn:comodit:problem:not-found");
        assert_eq!(p.status, 404);
        let p = ApiError::new(StatusCode::IM_A_TEAPOT, "http", "x").problem();
        assert_eq!(p.r#type, "about:blank");
        assert_eq!(p.title, "I'm a teapot");
    }
}
