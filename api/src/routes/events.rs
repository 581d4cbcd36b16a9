//! `GET /events`: the node's events as Server-Sent Events.
//!
//! Each event's SSE `event` name is its `type` (`host_online`, `host_offline`, `host_enrolled`,
//! `host_revoked`, `change`, `drift`, `drift_cleared`, `output`) and its `data` the JSON of the
//! event. The node's event bus is a bounded broadcast: a client that reads too slowly misses
//! events and gets an `event: lagged` with `{"missed": n}` instead, then the stream goes on. A
//! keep-alive comment is sent when nothing happened for a while, so proxies keep the connection.
//! Tokens scoped to an organization or environment see only the events of hosts inside it. The
//! number of concurrent streams is bounded (503 beyond).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use comodit_actors::NodeEvent;
use comodit_protocol::HostId;
use comodit_store::Scope;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::OwnedSemaphorePermit;
use utoipa::IntoParams;

use crate::auth::{covers_host, parse_host_id, Caller};
use crate::problem::ApiError;
use crate::Shared;

/// Hosts whose scope verdict a stream remembers; cleared when full.
const SCOPE_CACHE_ENTRIES: usize = 4096;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only the events of this host.
    pub host: Option<String>,
}

fn host_of(ev: &NodeEvent) -> HostId {
    match ev {
        NodeEvent::HostOnline { host }
        | NodeEvent::HostOffline { host }
        | NodeEvent::HostEnrolled { host }
        | NodeEvent::HostRevoked { host }
        | NodeEvent::Change { host, .. }
        | NodeEvent::Drift { host, .. }
        | NodeEvent::DriftCleared { host, .. }
        | NodeEvent::Output { host, .. } => *host,
    }
}

struct Stream {
    app: Arc<Shared>,
    rx: tokio::sync::broadcast::Receiver<NodeEvent>,
    scope: Scope,
    host: Option<HostId>,
    visible: HashMap<HostId, bool>,
    /// Held for the life of the stream: frees a slot when the client goes away.
    _permit: OwnedSemaphorePermit,
}

impl Stream {
    async fn visible(&mut self, host: HostId) -> bool {
        if self.host.is_some_and(|h| h != host) {
            return false;
        }
        if self.scope == Scope::Global {
            return true;
        }
        if let Some(v) = self.visible.get(&host) {
            return *v;
        }
        let v = match self.app.state.store.get_host(host).await {
            Ok(Some(h)) => covers_host(&self.scope, &h, false),
            // Unknown (e.g. revoked and deleted) or unreadable: not shown to a scoped token.
            _ => false,
        };
        if self.visible.len() >= SCOPE_CACHE_ENTRIES {
            self.visible.clear();
        }
        self.visible.insert(host, v);
        v
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await {
                Ok(ev) => {
                    if !self.visible(host_of(&ev)).await {
                        continue;
                    }
                    let mut json = serde_json::to_value(&ev).unwrap_or_default();
                    crate::views::redact(&mut json);
                    let kind = json
                        .get("type")
                        .and_then(|t| t.as_str())
                        .unwrap_or("event")
                        .to_owned();
                    return Some(Event::default().event(kind).data(json.to_string()));
                }
                Err(RecvError::Lagged(missed)) => {
                    metrics::counter!("comodit_api_sse_lagged_total").increment(1);
                    return Some(
                        Event::default()
                            .event("lagged")
                            .data(serde_json::json!({ "missed": missed }).to_string()),
                    );
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// A stream of node events (Server-Sent Events): host online/offline/enrolled/revoked, change
/// status, drift, streamed run output. A slow reader gets `event: lagged` for what it missed.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery),
    responses(
        (status = 200, description = "An SSE stream; each event's name is its type, its data the event's JSON", body = String, content_type = "text/event-stream"),
        (status = 503, description = "Too many event streams open", body = crate::problem::Problem, content_type = "application/problem+json"),
    ))]
pub async fn events(
    State(app): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let host = q
        .host
        .as_deref()
        .map(|h| {
            parse_host_id(h)
                .map_err(|e| ApiError::bad_request("invalid-query", e.detail).field("host"))
        })
        .transpose()?;
    let permit = app
        .sse_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::unavailable("too many event streams open; retry later"))?;
    let state = Stream {
        rx: app.state.ops.events(),
        app: app.clone(),
        scope: caller.scope(),
        host,
        visible: HashMap::new(),
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        s.next().await.map(|e| (Ok::<_, Infallible>(e), s))
    });
    let keep_alive =
        KeepAlive::new().interval(Duration::from_secs(app.state.limits.sse_keep_alive_s));
    Ok(Sse::new(stream).keep_alive(keep_alive).into_response())
}
