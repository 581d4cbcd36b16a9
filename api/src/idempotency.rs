//! `Idempotency-Key` on POST: the same key from the same token within the retention time gets the
//! first response again instead of doing the work twice.
//!
//! This is an in-memory cache bounded in entries and bytes, evicting the least recently used
//! first: it holds for a single node and does not survive a restart. A key whose entry was evicted
//! (or that was sent to another node of a cluster) is treated as new. What is kept:
//!
//! - the key is scoped to the token (two tokens never see each other's responses);
//! - the request is fingerprinted (method, path and query, body); the same key with a different
//!   request is refused (422) rather than answered with an unrelated response;
//! - while the first request runs, a second one with the same key is refused (409), never run;
//! - responses with a 5xx status are not kept (the outcome may be unknown, the client retries).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use comodit_store::TokenId;
use sha2::{Digest, Sha256};

/// Longest accepted `Idempotency-Key`.
pub(crate) const MAX_KEY_BYTES: usize = 255;

type Key = (TokenId, String);

/// A kept response.
#[derive(Debug)]
pub(crate) struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Stored {
    fn cost(&self, key: &Key) -> usize {
        self.body.len() + key.1.len() + 256
    }
}

#[derive(Debug)]
enum SlotState {
    InFlight,
    Done { at: Instant, response: Arc<Stored> },
}

#[derive(Debug)]
struct Slot {
    tick: u64,
    fingerprint: [u8; 32],
    state: SlotState,
}

#[derive(Debug, Default)]
struct Inner {
    slots: HashMap<Key, Slot>,
    /// Least recently used first.
    lru: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

impl Inner {
    fn touch(&mut self, key: &Key) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.slots.get_mut(key) {
            self.lru.remove(&slot.tick);
            slot.tick = tick;
            self.lru.insert(tick, key.clone());
        }
    }

    fn remove(&mut self, key: &Key) {
        if let Some(slot) = self.slots.remove(key) {
            self.lru.remove(&slot.tick);
            if let SlotState::Done { response, .. } = &slot.state {
                self.bytes -= response.cost(key);
            }
        }
    }

    fn insert(&mut self, key: Key, fingerprint: [u8; 32], state: SlotState) {
        self.remove(&key);
        if let SlotState::Done { response, .. } = &state {
            self.bytes += response.cost(&key);
        }
        self.tick += 1;
        self.lru.insert(self.tick, key.clone());
        self.slots.insert(
            key,
            Slot {
                tick: self.tick,
                fingerprint,
                state,
            },
        );
    }
}

/// What to do with a request that carries a key.
pub(crate) enum Begin {
    /// First time: run it, then hand the response to the guard.
    Proceed(InFlightGuard),
    /// Seen before: answer this.
    Replay(Arc<Stored>),
    /// The first request with this key is still running.
    InProgress,
    /// The key was used for a different request.
    Mismatch,
}

#[derive(Debug)]
pub(crate) struct IdempotencyCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    max_bytes: usize,
    ttl: Duration,
}

impl IdempotencyCache {
    pub fn new(max_entries: usize, max_bytes: usize, ttl: Duration) -> Self {
        IdempotencyCache {
            inner: Mutex::new(Inner::default()),
            max_entries: max_entries.max(1),
            max_bytes,
            ttl,
        }
    }

    /// The fingerprint of a request: what must be equal for a key to be replayed.
    pub fn fingerprint(method: &str, path_and_query: &str, body: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(path_and_query.as_bytes());
        h.update([0]);
        h.update(body);
        h.finalize().into()
    }

    pub fn begin(self: &Arc<Self>, token: TokenId, key: String, fingerprint: [u8; 32]) -> Begin {
        let key = (token, key);
        let mut inner = self.inner.lock().expect("idempotency lock poisoned");
        let now = Instant::now();
        let verdict = match inner.slots.get(&key) {
            None => None,
            Some(slot) => match &slot.state {
                SlotState::Done { at, .. } if now.duration_since(*at) > self.ttl => None,
                _ if slot.fingerprint != fingerprint => Some(Begin::Mismatch),
                SlotState::InFlight => Some(Begin::InProgress),
                SlotState::Done { response, .. } => Some(Begin::Replay(response.clone())),
            },
        };
        if let Some(v) = verdict {
            if matches!(v, Begin::Replay(_)) {
                inner.touch(&key);
            }
            return v;
        }
        inner.insert(key.clone(), fingerprint, SlotState::InFlight);
        self.evict(&mut inner);
        Begin::Proceed(InFlightGuard {
            cache: self.clone(),
            key: Some(key),
            fingerprint,
        })
    }

    fn finish(&self, key: Key, fingerprint: [u8; 32], response: Option<Stored>) {
        let mut inner = self.inner.lock().expect("idempotency lock poisoned");
        // Only our own in-flight slot is replaced: an eviction may have let another request with
        // the same key start since.
        let ours = inner.slots.get(&key).is_some_and(|s| {
            s.fingerprint == fingerprint && matches!(s.state, SlotState::InFlight)
        });
        if !ours {
            return;
        }
        match response {
            Some(r) if r.cost(&key) <= self.max_bytes => {
                let state = SlotState::Done {
                    at: Instant::now(),
                    response: Arc::new(r),
                };
                inner.insert(key, fingerprint, state);
                self.evict(&mut inner);
            }
            _ => inner.remove(&key),
        }
    }

    fn evict(&self, inner: &mut Inner) {
        while inner.slots.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some((_, key)) = inner.lru.pop_first() else {
                break;
            };
            // `remove` looks the tick up again; the entry is already out of `lru`.
            if let Some(slot) = inner.slots.remove(&key) {
                if let SlotState::Done { response, .. } = &slot.state {
                    inner.bytes -= response.cost(&key);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().slots.len()
    }
}

/// Holds a key's in-flight slot; dropping it without [`complete`](Self::complete) (the client went
/// away, the handler panicked) frees the key so that a retry can run.
pub(crate) struct InFlightGuard {
    cache: Arc<IdempotencyCache>,
    key: Option<Key>,
    fingerprint: [u8; 32],
}

impl InFlightGuard {
    /// Keeps `response` for replays; `None` forgets the key (5xx, or a body that could not be kept).
    pub fn complete(mut self, response: Option<Stored>) {
        if let Some(key) = self.key.take() {
            self.cache.finish(key, self.fingerprint, response);
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.cache.finish(key, self.fingerprint, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &str) -> Stored {
        Stored {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    fn proceed(b: Begin) -> InFlightGuard {
        match b {
            Begin::Proceed(g) => g,
            _ => panic!("expected proceed"),
        }
    }

    #[test]
    fn replay_mismatch_in_progress_and_token_scoping() {
        let c = Arc::new(IdempotencyCache::new(10, 1 << 20, Duration::from_secs(60)));
        let t = TokenId::random();
        let fp = IdempotencyCache::fingerprint("POST", "/x", b"{}");
        let g = proceed(c.begin(t, "k".into(), fp));
        assert!(matches!(c.begin(t, "k".into(), fp), Begin::InProgress));
        g.complete(Some(stored("first")));
        match c.begin(t, "k".into(), fp) {
            Begin::Replay(r) => assert_eq!(&r.body[..], b"first"),
            _ => panic!("expected replay"),
        }
        let other = IdempotencyCache::fingerprint("POST", "/x", b"{\"a\":1}");
        assert!(matches!(c.begin(t, "k".into(), other), Begin::Mismatch));
        // Another token with the same key is a different key.
        proceed(c.begin(TokenId::random(), "k".into(), fp)).complete(None);
    }

    #[test]
    fn dropped_guard_and_5xx_free_the_key() {
        let c = Arc::new(IdempotencyCache::new(10, 1 << 20, Duration::from_secs(60)));
        let t = TokenId::random();
        let fp = [1; 32];
        drop(proceed(c.begin(t, "k".into(), fp)));
        proceed(c.begin(t, "k".into(), fp)).complete(None);
        assert_eq!(c.len(), 0);
        proceed(c.begin(t, "k".into(), fp));
    }

    #[test]
    fn bounded_by_entries_and_bytes_lru_first() {
        let c = Arc::new(IdempotencyCache::new(3, 10_000, Duration::from_secs(60)));
        let t = TokenId::random();
        for k in ["a", "b", "c"] {
            proceed(c.begin(t, k.into(), [0; 32])).complete(Some(stored(k)));
        }
        // Touch "a" so that "b" is the least recently used.
        assert!(matches!(c.begin(t, "a".into(), [0; 32]), Begin::Replay(_)));
        proceed(c.begin(t, "d".into(), [0; 32])).complete(Some(stored("d")));
        assert_eq!(c.len(), 3);
        assert!(matches!(c.begin(t, "a".into(), [0; 32]), Begin::Replay(_)));
        assert!(matches!(c.begin(t, "b".into(), [0; 32]), Begin::Proceed(_)));

        // A response bigger than the byte budget is not kept at all.
        let small = Arc::new(IdempotencyCache::new(10, 1_000, Duration::from_secs(60)));
        proceed(small.begin(t, "big".into(), [0; 32])).complete(Some(stored(&"x".repeat(2_000))));
        assert_eq!(small.len(), 0);
        // Two that fit one at a time evict each other.
        proceed(small.begin(t, "1".into(), [0; 32])).complete(Some(stored(&"x".repeat(500))));
        proceed(small.begin(t, "2".into(), [0; 32])).complete(Some(stored(&"x".repeat(500))));
        assert_eq!(small.len(), 1);
        assert!(matches!(
            small.begin(t, "2".into(), [0; 32]),
            Begin::Replay(_)
        ));
    }

    #[test]
    fn entries_expire() {
        let c = Arc::new(IdempotencyCache::new(10, 1 << 20, Duration::ZERO));
        let t = TokenId::random();
        proceed(c.begin(t, "k".into(), [0; 32])).complete(Some(stored("x")));
        // With a zero retention the entry is stale as soon as any time has passed.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Begin::Proceed(_) = c.begin(t, "k".into(), [0; 32]) {
                break;
            }
            assert!(Instant::now() < deadline, "entry never expired");
        }
    }
}
