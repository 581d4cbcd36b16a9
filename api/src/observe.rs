//! Request metrics and the tracing span of every request.
//!
//! Labels use the route template (`/api/v1/hosts/{id}`), never the raw path, so that the number of
//! series stays bounded whatever clients send; requests that match no route share `unmatched`.

use std::time::Instant;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, RawPathParams, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub(crate) async fn observe(
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!("api_request", method = %method, route = %route,
        host_id = tracing::field::Empty);
    if route.starts_with("/api/v1/hosts/{id}") {
        if let Some((_, id)) = params.ok().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == "id")
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        }) {
            // Only a well-formed id goes into the span: the raw segment is client input.
            if let Ok(host) = id.parse::<comodit_protocol::HostId>() {
                span.record("host_id", tracing::field::display(host));
            }
        }
    }
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    metrics::counter!("comodit_api_requests_total",
        "route" => route.clone(), "method" => method.clone(), "status" => status.to_string())
    .increment(1);
    metrics::histogram!("comodit_api_request_duration_seconds",
        "route" => route, "method" => method)
    .record(elapsed);
    let _entered = span.enter();
    if status >= 500 {
        tracing::warn!(status, elapsed_s = elapsed, "request failed");
    } else {
        tracing::debug!(status, elapsed_s = elapsed, "request served");
    }
    resp
}
