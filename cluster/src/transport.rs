//! Authenticated TCP between Raft peers (DESIGN §7).
//!
//! **Shape.** Every node listens on one address. For each peer it knows ([`Transport::set_peer`])
//! it runs one writer task that dials the peer and streams that peer's messages over the
//! connection: connections are one-way, dialer → listener, so node A's messages to B travel on
//! the connection A opened, and B's to A on the one B opened. [`Transport::send`] never blocks: it
//! puts the message on the peer's bounded queue, or drops it (counted) when the queue is full or
//! the peer is unknown. Raft retransmits what is lost, so dropping is the right answer to a slow
//! or absent peer. The writer takes a message off the queue only once it holds an authenticated
//! connection, so while a peer is unreachable its queue holds exactly `queue_per_peer` messages.
//!
//! **Authentication first** (RUSTSEC-2024-0437: the protobuf 2 decoder raft uses can be driven to
//! stack exhaustion by crafted input). Before a single frame is read, the two ends run a mutual
//! challenge–response keyed by the cluster secret:
//!
//! 1. dialer → listener: `MAGIC ‖ from ‖ to ‖ nonce_d` (fixed size);
//! 2. listener → dialer: `nonce_l ‖ HMAC(secret, "listener" ‖ from ‖ to ‖ nonce_d ‖ nonce_l)`;
//! 3. dialer → listener: `HMAC(secret, "dialer" ‖ from ‖ to ‖ nonce_d ‖ nonce_l)`.
//!
//! Both nonces are fresh (a recorded handshake cannot be replayed), the ids are bound into both
//! proofs, and the two labels differ (a proof cannot be reflected back). HMAC-SHA256 follows RFC
//! 2104 over `sha2`; proofs are compared in constant time. A peer that fails (wrong secret, wrong
//! id, garbage, or too slow: [`HANDSHAKE_TIMEOUT`]) is disconnected and counted, and nothing it
//! sent is decoded. The secret itself is never logged nor sent.
//!
//! **Frames** after the handshake: a `u32` big-endian length, then a bincode [`Envelope`]
//! `{from, to, body}` whose body is the protobuf-encoded Raft `Message`. A length over
//! `max_frame_bytes` closes the connection before anything is read or allocated; an envelope
//! whose ids do not match the authenticated peer, or a body that does not decode, closes it too.
//!
//! **Joining.** A node that is not a member yet dials any member with the target id `0` ("whoever
//! listens here"); the handshake is the same (the `0` is bound into both proofs). Such a
//! connection carries exactly one request frame, a bincode [`JoinRequest`] naming the joiner's id
//! and Raft address, and one reply frame, a [`JoinReply`] (accepted with the members' addresses,
//! or refused with a reason), then closes. The member's Raft driver decides ([`Transport::serve_joins`]);
//! a member that serves no joins refuses them. See [`request_join`] for the dialing side.
//!
//! **Bounded everything.** Per-peer queues, frame size, inbound connections
//! ([`MAX_INBOUND_CONNECTIONS`]), handshake and write time, reconnect backoff (capped, jittered).
//! Tasks stop with the `shutdown` token or when the last clone of the [`Transport`] is dropped.
//!
//! **Metrics** (`metrics` facade): `comodit_cluster_transport_dropped_total{reason}`,
//! `comodit_cluster_transport_auth_failures_total`,
//! `comodit_cluster_transport_rejected_frames_total{reason}`,
//! `comodit_cluster_transport_delivered_total`. The same counts are readable from
//! [`Transport::stats`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn, Instrument};

use crate::NodeId;

/// Default per-peer queue length.
pub const DEFAULT_QUEUE_PER_PEER: usize = 1024;
/// Default largest frame (16 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Time a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one frame may take to write (or, once its length was read, to arrive).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Most inbound connections served at once; more are closed on accept.
pub const MAX_INBOUND_CONNECTIONS: usize = 64;
/// First reconnect delay; doubles up to [`BACKOFF_MAX`], each with up to 50% jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// First bytes of a dialer's hello (then its id, the id it dials, and its nonce).
pub const HANDSHAKE_MAGIC: &[u8; 8] = b"CMDTRFT1";
const MAGIC: &[u8; 8] = HANDSHAKE_MAGIC;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const HELLO_LEN: usize = 8 + 8 + 8 + NONCE_LEN;

/// Settings of a [`Transport`].
#[derive(Clone)]
pub struct TransportConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Shared by every member; keys the handshake.
    pub cluster_secret: String,
    /// Messages queued per peer before `send` drops.
    pub queue_per_peer: usize,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame_bytes: usize,
}

impl TransportConfig {
    /// Settings with the default bounds.
    pub fn new(listen: SocketAddr, cluster_secret: impl Into<String>) -> Self {
        TransportConfig {
            listen,
            cluster_secret: cluster_secret.into(),
            queue_per_peer: DEFAULT_QUEUE_PER_PEER,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl std::fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportConfig")
            .field("listen", &self.listen)
            .field("cluster_secret", &"<redacted>")
            .field("queue_per_peer", &self.queue_per_peer)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .finish()
    }
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A setting is out of range.
    #[error("invalid transport setting: {0}")]
    Config(String),
    /// Socket IO failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The peer did not prove it holds the cluster secret (or is not the node expected).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The handshake did not complete in time.
    #[error("handshake timed out")]
    Timeout,
}

/// Counts since start (the same events as the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// `send` dropped: the peer's queue was full.
    pub dropped_queue_full: u64,
    /// `send` dropped: no such peer.
    pub dropped_unknown_peer: u64,
    /// `send` dropped: the message did not fit in a frame.
    pub dropped_too_large: u64,
    /// `send` dropped: the transport was shut down.
    pub dropped_shut_down: u64,
    /// Handshakes that failed, on either side.
    pub auth_failures: u64,
    /// Connections closed for a bad frame (too large, undecodable, wrong ids).
    pub rejected_frames: u64,
    /// Messages handed to `inbound`.
    pub delivered: u64,
}

#[derive(Default)]
struct Counters {
    dropped_queue_full: AtomicU64,
    dropped_unknown_peer: AtomicU64,
    dropped_too_large: AtomicU64,
    dropped_shut_down: AtomicU64,
    auth_failures: AtomicU64,
    rejected_frames: AtomicU64,
    delivered: AtomicU64,
}

impl Counters {
    fn dropped(&self, reason: &'static str) {
        let c = match reason {
            "queue_full" => &self.dropped_queue_full,
            "unknown_peer" => &self.dropped_unknown_peer,
            "too_large" => &self.dropped_too_large,
            _ => &self.dropped_shut_down,
        };
        c.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("comodit_cluster_transport_dropped_total", "reason" => reason)
            .increment(1);
    }

    fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("comodit_cluster_transport_auth_failures_total").increment(1);
    }

    fn rejected(&self, reason: &'static str) {
        self.rejected_frames.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("comodit_cluster_transport_rejected_frames_total", "reason" => reason)
            .increment(1);
    }
}

/// The bincode envelope of one frame.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// The protobuf-encoded Raft `Message`.
    pub body: Vec<u8>,
}

fn bincode_opts(limit: usize) -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(limit as u64)
}

/// A node asking to become a member (see the module doc, "Joining").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The joiner's Raft id (the authenticated id of the connection).
    pub id: NodeId,
    /// The address its transport listens on, as the members should dial it.
    pub addr: String,
}

/// A member's answer to a [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    /// The request was proposed (or the node already is a member): dial these members.
    Accepted {
        /// The node table as the answering member knows it: `(id, addr)`.
        members: Vec<(NodeId, String)>,
    },
    /// Refused (the id is taken by another address or left the cluster, no leader to forward
    /// to yet, ...): the reason, for the joiner's log.
    Refused(String),
}

/// One join request handed to the Raft driver, with the way back to the joiner.
pub type JoinCall = (JoinRequest, tokio::sync::oneshot::Sender<JoinReply>);

/// Largest join frame (request or reply), in bytes.
pub const MAX_JOIN_FRAME_BYTES: usize = 64 * 1024;
/// Time a member's driver has to answer a join request.
pub const JOIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the tasks share (never the peer table, so dropping the last [`Transport`] stops them).
struct Shared {
    me: NodeId,
    secret: Vec<u8>,
    queue_per_peer: usize,
    max_frame_bytes: usize,
    counters: Counters,
    /// Where join requests go; `None`: refuse them.
    joins: Mutex<Option<mpsc::Sender<JoinCall>>>,
}

struct Peer {
    addr: SocketAddr,
    queue: mpsc::Sender<Message>,
    stop: CancellationToken,
}

struct Inner {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    peers: Mutex<HashMap<NodeId, Peer>>,
    token: CancellationToken,
    _stop_on_drop: DropGuard,
}

/// Authenticated TCP links to the other members. Cheap to clone; see the module doc.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("me", &self.inner.shared.me)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

impl Transport {
    /// Listens (loopback in tests), accepts authenticated peers, and delivers their Raft messages
    /// on `inbound`. Runs until `shutdown` is cancelled or the last clone is dropped.
    pub async fn start(
        cfg: TransportConfig,
        me: NodeId,
        inbound: mpsc::Sender<(NodeId, Message)>,
        shutdown: CancellationToken,
    ) -> Result<Transport, TransportError> {
        if cfg.queue_per_peer == 0 {
            return Err(TransportError::Config(
                "queue_per_peer must be at least 1".into(),
            ));
        }
        if cfg.max_frame_bytes == 0 || cfg.max_frame_bytes > u32::MAX as usize {
            return Err(TransportError::Config(format!(
                "max_frame_bytes must be within 1..={}",
                u32::MAX
            )));
        }
        if cfg.cluster_secret.is_empty() {
            return Err(TransportError::Config("cluster_secret is empty".into()));
        }
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| TransportError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            me,
            secret: cfg.cluster_secret.into_bytes(),
            queue_per_peer: cfg.queue_per_peer,
            max_frame_bytes: cfg.max_frame_bytes,
            counters: Counters::default(),
            joins: Mutex::new(None),
        });
        let token = shutdown.child_token();
        tokio::spawn(
            accept_loop(listener, shared.clone(), inbound, token.clone())
                .instrument(tracing::info_span!("raft_listen", node = me, %local_addr)),
        );
        info!(node = me, %local_addr, "raft transport listening");
        Ok(Transport {
            inner: Arc::new(Inner {
                shared,
                local_addr,
                peers: Mutex::new(HashMap::new()),
                token: token.clone(),
                _stop_on_drop: token.drop_guard(),
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Add a peer, or move it to a new address (its queue starts afresh). Same address: no-op.
    pub fn set_peer(&self, id: NodeId, addr: SocketAddr) {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        if let Some(old) = peers.remove(&id) {
            old.stop.cancel();
        }
        let (tx, rx) = mpsc::channel(self.inner.shared.queue_per_peer);
        let stop = self.inner.token.child_token();
        let shared = self.inner.shared.clone();
        tokio::spawn(
            writer(shared, id, addr, rx, stop.clone()).instrument(tracing::info_span!(
                "raft_peer",
                node = self.inner.shared.me,
                peer = id,
                %addr
            )),
        );
        peers.insert(
            id,
            Peer {
                addr,
                queue: tx,
                stop,
            },
        );
    }

    /// Hand the join requests this member receives to `calls` (until then they are refused).
    pub fn serve_joins(&self, calls: mpsc::Sender<JoinCall>) {
        *self
            .inner
            .shared
            .joins
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(calls);
    }

    /// The peers this transport dials, with their addresses.
    pub fn peers(&self) -> Vec<(NodeId, SocketAddr)> {
        let peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = peers.iter().map(|(id, p)| (*id, p.addr)).collect();
        out.sort();
        out
    }

    /// Forget a peer: its writer stops and its queue is dropped.
    pub fn remove_peer(&self, id: NodeId) {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = peers.remove(&id) {
            old.stop.cancel();
        }
    }

    /// Never blocks: queued for the peer's writer task; dropped (and counted) when the peer's
    /// bounded queue is full or the peer is unknown — Raft retransmits.
    pub fn send(&self, msg: Message) {
        let counters = &self.inner.shared.counters;
        let peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(peer) = peers.get(&msg.to) else {
            debug!(
                node = self.inner.shared.me,
                peer = msg.to,
                "message to an unknown peer dropped"
            );
            counters.dropped("unknown_peer");
            return;
        };
        match peer.queue.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                debug!(
                    node = self.inner.shared.me,
                    peer = m.to,
                    "peer queue full, message dropped"
                );
                counters.dropped("queue_full");
            }
            // The writer is gone only once the transport shuts down.
            Err(mpsc::error::TrySendError::Closed(_)) => counters.dropped("shut_down"),
        }
    }

    /// Counts since start.
    pub fn stats(&self) -> TransportStats {
        let c = &self.inner.shared.counters;
        TransportStats {
            dropped_queue_full: c.dropped_queue_full.load(Ordering::Relaxed),
            dropped_unknown_peer: c.dropped_unknown_peer.load(Ordering::Relaxed),
            dropped_too_large: c.dropped_too_large.load(Ordering::Relaxed),
            dropped_shut_down: c.dropped_shut_down.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            rejected_frames: c.rejected_frames.load(Ordering::Relaxed),
            delivered: c.delivered.load(Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Listening side

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    inbound: mpsc::Sender<(NodeId, Message)>,
    token: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF_MIN) => continue,
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(%remote, "too many inbound connections, closing this one");
            continue;
        };
        let shared = shared.clone();
        let inbound = inbound.clone();
        let token = token.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                serve_inbound(stream, shared, inbound, token).await;
            }
            .instrument(tracing::info_span!("raft_inbound", %remote)),
        );
    }
}

async fn serve_inbound(
    mut stream: TcpStream,
    shared: Arc<Shared>,
    inbound: mpsc::Sender<(NodeId, Message)>,
    token: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        accept_handshake(&mut stream, &shared.secret, shared.me),
    );
    let (peer, to) = tokio::select! {
        _ = token.cancelled() => return,
        r = handshake => match r {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                warn!(error = %e, "inbound peer refused");
                shared.counters.auth_failure();
                return;
            }
            Err(_) => {
                warn!("inbound peer refused: handshake timed out");
                shared.counters.auth_failure();
                return;
            }
        }
    };
    debug!(peer, "inbound peer authenticated");
    if to == 0 {
        tokio::select! {
            _ = token.cancelled() => {}
            _ = serve_join(&mut stream, &shared, peer) => {}
        }
        return;
    }
    let span = tracing::info_span!("raft_peer_in", peer);
    async {
        loop {
            let msg = tokio::select! {
                _ = token.cancelled() => return,
                r = read_frame(&mut stream, &shared, peer) => match r {
                    Ok(Some(msg)) => msg,
                    Ok(None) => {
                        debug!("peer closed the connection");
                        return;
                    }
                    Err(reason) => {
                        warn!(reason, "bad frame, closing the connection");
                        shared.counters.rejected(reason);
                        return;
                    }
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                r = inbound.send((peer, msg)) => if r.is_err() {
                    debug!("inbound receiver gone, closing");
                    return;
                }
            }
            shared.counters.delivered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("comodit_cluster_transport_delivered_total").increment(1);
        }
    }
    .instrument(span)
    .await
}

/// The one request and one reply of a join connection (the peer is authenticated).
async fn serve_join(stream: &mut TcpStream, shared: &Shared, peer: NodeId) {
    let reply = match read_join_frame::<JoinRequest>(stream).await {
        Err(reason) => {
            warn!(peer, reason, "bad join request, closing");
            shared.counters.rejected(reason);
            return;
        }
        Ok(req) if req.id != peer => JoinReply::Refused(format!(
            "the request names node {} but the connection authenticated node {peer}",
            req.id
        )),
        Ok(req) => {
            let calls = shared
                .joins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match calls {
                None => JoinReply::Refused("this member does not take joins yet".into()),
                Some(calls) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    info!(peer, addr = %req.addr, "join request");
                    let asked = calls.try_send((req, tx)).is_ok();
                    match tokio::time::timeout(JOIN_ANSWER_TIMEOUT, rx).await {
                        Ok(Ok(reply)) if asked => reply,
                        _ => JoinReply::Refused("this member is busy, try again".into()),
                    }
                }
            }
        }
    };
    let _ = write_join_frame(stream, &reply).await;
}

async fn read_join_frame<T: serde::de::DeserializeOwned>(
    stream: &mut TcpStream,
) -> Result<T, &'static str> {
    use bincode::Options;
    let mut len = [0u8; 4];
    let read = async {
        stream.read_exact(&mut len).await.map_err(|_| "io")?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_JOIN_FRAME_BYTES {
            return Err("too_large");
        }
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await.map_err(|_| "io")?;
        Ok(buf)
    };
    let buf = tokio::time::timeout(FRAME_TIMEOUT, read)
        .await
        .map_err(|_| "timeout")??;
    bincode_opts(MAX_JOIN_FRAME_BYTES)
        .deserialize(&buf)
        .map_err(|_| "join_frame")
}

async fn write_join_frame<T: Serialize>(
    stream: &mut TcpStream,
    value: &T,
) -> Result<(), TransportError> {
    use bincode::Options;
    let bytes = bincode_opts(MAX_JOIN_FRAME_BYTES)
        .serialize(value)
        .map_err(|e| TransportError::Config(format!("join frame does not encode: {e}")))?;
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    tokio::time::timeout(FRAME_TIMEOUT, stream.write_all(&frame))
        .await
        .map_err(|_| TransportError::Timeout)??;
    Ok(())
}

/// Ask the member listening at `member` to add node `me` (whose transport listens at `my_addr`)
/// to the cluster; see the module doc. Bounded by the handshake and frame timeouts.
pub async fn request_join(
    member: SocketAddr,
    secret: &[u8],
    me: NodeId,
    my_addr: &str,
) -> Result<JoinReply, TransportError> {
    let mut stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(member))
        .await
        .map_err(|_| TransportError::Timeout)??;
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        authenticate_outbound(&mut stream, secret, me, 0),
    )
    .await
    .map_err(|_| TransportError::Timeout)??;
    write_join_frame(
        &mut stream,
        &JoinRequest {
            id: me,
            addr: my_addr.to_owned(),
        },
    )
    .await?;
    let answer = tokio::time::timeout(
        JOIN_ANSWER_TIMEOUT + FRAME_TIMEOUT,
        read_join_frame::<JoinReply>(&mut stream),
    )
    .await
    .map_err(|_| TransportError::Timeout)?;
    answer.map_err(|reason| {
        TransportError::Auth(format!("member sent no valid join reply ({reason})"))
    })
}

/// One frame from an authenticated peer: `Ok(None)` on a clean close between frames, `Err(reason)`
/// for anything that must close the connection.
async fn read_frame(
    stream: &mut TcpStream,
    shared: &Shared,
    peer: NodeId,
) -> Result<Option<Message>, &'static str> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(_) => return Err("io"),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > shared.max_frame_bytes {
        return Err("too_large");
    }
    let mut buf = vec![0u8; len];
    match tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Err("io"),
        Err(_) => return Err("timeout"),
    }
    use bincode::Options;
    let env: Envelope = bincode_opts(shared.max_frame_bytes)
        .deserialize(&buf)
        .map_err(|_| "envelope")?;
    if env.from != peer || env.to != shared.me {
        return Err("wrong_ids");
    }
    // The peer is authenticated: only now may protobuf see its bytes.
    let msg = Message::parse_from_bytes(&env.body).map_err(|_| "protobuf")?;
    if msg.from != peer || msg.to != shared.me {
        return Err("wrong_ids");
    }
    Ok(Some(msg))
}

// ---------------------------------------------------------------------------------------------
// Dialing side

async fn writer(
    shared: Arc<Shared>,
    peer: NodeId,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Message>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = connect(&shared, peer, addr) => r,
        };
        let mut stream = match connected {
            Ok(s) => s,
            Err(e) => {
                if matches!(e, TransportError::Auth(_) | TransportError::Timeout) {
                    shared.counters.auth_failure();
                    warn!(error = %e, "peer refused");
                } else {
                    debug!(error = %e, "cannot reach peer");
                }
                let delay = jitter(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        backoff = BACKOFF_MIN;
        debug!("connected to peer");
        // The connection only carries our frames; the peer never writes, so a readable socket
        // means it closed (or broke the protocol): reconnect at once.
        let mut probe = [0u8; 1];
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                _ = stream.read(&mut probe) => {
                    debug!("peer closed the connection");
                    break;
                }
                m = queue.recv() => match m {
                    Some(m) => m,
                    None => return,
                },
            };
            let Some(frame) = encode_frame(&shared, peer, &msg) else {
                continue;
            };
            match tokio::time::timeout(FRAME_TIMEOUT, stream.write_all(&frame)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "write failed, reconnecting");
                    break;
                }
                Err(_) => {
                    warn!("write timed out, reconnecting");
                    break;
                }
            }
        }
    }
}

fn encode_frame(shared: &Shared, peer: NodeId, msg: &Message) -> Option<Vec<u8>> {
    use bincode::Options;
    let body = match msg.write_to_bytes() {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "message does not encode, dropped");
            shared.counters.dropped("too_large");
            return None;
        }
    };
    let env = Envelope {
        from: shared.me,
        to: peer,
        body,
    };
    match bincode_opts(shared.max_frame_bytes).serialize(&env) {
        Ok(bytes) if bytes.len() <= shared.max_frame_bytes => {
            let mut frame = Vec::with_capacity(4 + bytes.len());
            frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            frame.extend_from_slice(&bytes);
            Some(frame)
        }
        _ => {
            warn!(
                limit = shared.max_frame_bytes,
                "message larger than a frame, dropped"
            );
            shared.counters.dropped("too_large");
            None
        }
    }
}

async fn connect(
    shared: &Shared,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<TcpStream, TransportError> {
    let mut stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| TransportError::Io(std::io::ErrorKind::TimedOut.into()))??;
    let _ = stream.set_nodelay(true);
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        authenticate_outbound(&mut stream, &shared.secret, shared.me, peer),
    )
    .await
    .map_err(|_| TransportError::Timeout)??;
    Ok(stream)
}

fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    let extra = rand::thread_rng().gen_range(0..=d.as_millis() as u64 / 2);
    d + Duration::from_millis(extra)
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// The dialer's half of the handshake: prove to `peer` that `me` holds the secret, and check that
/// `peer` does. On success the stream carries frames. Public so tools (and tests) can speak the
/// protocol; the transport's writers use it.
pub async fn authenticate_outbound(
    stream: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    peer: NodeId,
) -> Result<(), TransportError> {
    let nonce_d = fresh_nonce();
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&me.to_be_bytes());
    hello.extend_from_slice(&peer.to_be_bytes());
    hello.extend_from_slice(&nonce_d);
    stream.write_all(&hello).await?;

    let mut reply = [0u8; NONCE_LEN + MAC_LEN];
    stream.read_exact(&mut reply).await.map_err(|e| {
        TransportError::Auth(format!("peer {peer} closed during the handshake: {e}"))
    })?;
    let (nonce_l, mac_l) = reply.split_at(NONCE_LEN);
    let expected = proof(secret, b"listener", me, peer, &nonce_d, nonce_l);
    if !constant_time_eq(mac_l, &expected) {
        return Err(TransportError::Auth(format!(
            "peer {peer} did not prove the cluster secret"
        )));
    }
    let mine = proof(secret, b"dialer", me, peer, &nonce_d, nonce_l);
    stream.write_all(&mine).await?;
    Ok(())
}

/// The listener's half: returns the authenticated peer's id and the id it dialed (this node's, or
/// `0` for a join connection).
async fn accept_handshake(
    stream: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
) -> Result<(NodeId, NodeId), TransportError> {
    let mut hello = [0u8; HELLO_LEN];
    stream
        .read_exact(&mut hello)
        .await
        .map_err(|e| TransportError::Auth(format!("incomplete hello: {e}")))?;
    if &hello[..8] != MAGIC {
        return Err(TransportError::Auth(
            "not a comodit raft peer (bad magic)".into(),
        ));
    }
    let from = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
    let to = u64::from_be_bytes(hello[16..24].try_into().expect("8 bytes"));
    let nonce_d = &hello[24..];
    if to != me && to != 0 {
        return Err(TransportError::Auth(format!(
            "peer {from} dialed node {to}, this is node {me}"
        )));
    }
    if from == 0 || from == me {
        return Err(TransportError::Auth(format!(
            "peer claims invalid id {from}"
        )));
    }
    let nonce_l = fresh_nonce();
    let mut reply = Vec::with_capacity(NONCE_LEN + MAC_LEN);
    reply.extend_from_slice(&nonce_l);
    reply.extend_from_slice(&proof(secret, b"listener", from, to, nonce_d, &nonce_l));
    stream.write_all(&reply).await?;
    let mut mac_d = [0u8; MAC_LEN];
    stream
        .read_exact(&mut mac_d)
        .await
        .map_err(|e| TransportError::Auth(format!("peer {from} gave no proof: {e}")))?;
    let expected = proof(secret, b"dialer", from, to, nonce_d, &nonce_l);
    if !constant_time_eq(&mac_d, &expected) {
        return Err(TransportError::Auth(format!(
            "peer {from} did not prove the cluster secret"
        )));
    }
    Ok((from, to))
}

fn fresh_nonce() -> [u8; NONCE_LEN] {
    use rand::RngCore;
    let mut n = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

fn proof(
    secret: &[u8],
    label: &[u8],
    dialer: NodeId,
    listener: NodeId,
    nonce_d: &[u8],
    nonce_l: &[u8],
) -> [u8; MAC_LEN] {
    let mut data = Vec::with_capacity(label.len() + 16 + 2 * NONCE_LEN);
    data.extend_from_slice(label);
    data.extend_from_slice(&dialer.to_be_bytes());
    data.extend_from_slice(&listener.to_be_bytes());
    data.extend_from_slice(nonce_d);
    data.extend_from_slice(nonce_l);
    hmac_sha256(secret, &data)
}

/// HMAC-SHA256 by the RFC 2104 construction.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for i in 0..BLOCK {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(data)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231_vectors() {
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
