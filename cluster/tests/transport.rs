//! The Raft transport over real sockets on 127.0.0.1: delivery both ways, authentication before
//! decoding, bad frames, peer restarts, and the per-peer queue bound. Every wait is a poll with a
//! deadline.

use std::net::SocketAddr;
use std::time::Duration;

use comodit_cluster::transport::{
    authenticate_outbound, Envelope, Transport, TransportConfig, TransportStats, HANDSHAKE_MAGIC,
};
use comodit_cluster::NodeId;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "correct horse battery staple";
const WAIT: Duration = Duration::from_secs(10);

type Inbox = mpsc::Receiver<(NodeId, Message)>;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_with(id: NodeId, cfg: TransportConfig) -> (Transport, Inbox) {
    let (tx, rx) = mpsc::channel(256);
    let t = Transport::start(cfg, id, tx, CancellationToken::new())
        .await
        .unwrap();
    (t, rx)
}

async fn start(id: NodeId) -> (Transport, Inbox) {
    start_with(id, TransportConfig::new(loopback(), SECRET)).await
}

fn msg(from: NodeId, to: NodeId, term: u64) -> Message {
    let mut m = Message {
        from,
        to,
        term,
        commit: term * 10,
        ..Message::default()
    };
    m.set_msg_type(MessageType::MsgHeartbeat);
    m
}

async fn recv(rx: &mut Inbox) -> (NodeId, Message) {
    timeout(WAIT, rx.recv())
        .await
        .expect("no message within the deadline")
        .expect("inbound channel closed")
}

/// Poll `cond` until it holds or the deadline passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the server closes `stream` (EOF or reset), reading and discarding anything it sends.
async fn closed_by_peer(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after the deadline"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn two_transports_exchange_messages_both_ways() {
    let (a, mut ra) = start(1).await;
    let (b, mut rb) = start(2).await;
    a.set_peer(2, b.local_addr());
    b.set_peer(1, a.local_addr());
    for term in 1..=20 {
        a.send(msg(1, 2, term));
        b.send(msg(2, 1, 100 + term));
    }
    for term in 1..=20 {
        let (from, m) = recv(&mut rb).await;
        assert_eq!(
            (from, m.from, m.to, m.term, m.commit),
            (1, 1, 2, term, term * 10)
        );
        assert_eq!(m.get_msg_type(), MessageType::MsgHeartbeat);
        let (from, m) = recv(&mut ra).await;
        assert_eq!((from, m.term), (2, 100 + term));
    }
    assert_eq!(a.stats().delivered, 20);
    assert_eq!(b.stats().delivered, 20);
    assert_eq!(a.stats().auth_failures + b.stats().auth_failures, 0);
}

#[tokio::test]
async fn three_transports_all_pairs() {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start(id).await);
    }
    let addrs: Vec<_> = nodes.iter().map(|(t, _)| t.local_addr()).collect();
    for (i, (t, _)) in nodes.iter().enumerate() {
        for (j, addr) in addrs.iter().enumerate() {
            if i != j {
                t.set_peer(j as NodeId + 1, *addr);
            }
        }
    }
    for (i, (t, _)) in nodes.iter().enumerate() {
        let me = i as NodeId + 1;
        for to in (1..=3).filter(|&p| p != me) {
            t.send(msg(me, to, me * 10 + to));
        }
    }
    for (i, (_, rx)) in nodes.iter_mut().enumerate() {
        let me = i as NodeId + 1;
        let mut got = vec![recv(rx).await, recv(rx).await];
        got.sort_by_key(|(from, _)| *from);
        let want: Vec<_> = (1..=3).filter(|&p| p != me).collect();
        assert_eq!(got.iter().map(|(f, _)| *f).collect::<Vec<_>>(), want);
        for (from, m) in got {
            assert_eq!((m.from, m.to, m.term), (from, me, from * 10 + me));
        }
    }
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_nothing_is_delivered() {
    let (a, _ra) = start_with(1, TransportConfig::new(loopback(), "another secret")).await;
    let (b, mut rb) = start(2).await;
    a.set_peer(2, b.local_addr());
    a.send(msg(1, 2, 7));
    // Both sides notice: the listener's proof does not verify for the dialer, and the listener
    // never gets a proof from it.
    eventually("auth failures on both sides", || {
        a.stats().auth_failures >= 1 && b.stats().auth_failures >= 1
    })
    .await;
    assert!(rb.try_recv().is_err(), "a message got through");
    assert_eq!(b.stats().delivered, 0);

    // A raw dialer that presents a wrong proof: the listener is the one that checks it.
    let mut raw = TcpStream::connect(b.local_addr()).await.unwrap();
    let before = b.stats().auth_failures;
    let mut hello = HANDSHAKE_MAGIC.to_vec();
    hello.extend_from_slice(&3u64.to_be_bytes());
    hello.extend_from_slice(&2u64.to_be_bytes());
    hello.extend_from_slice(&[7u8; 32]);
    raw.write_all(&hello).await.unwrap();
    let mut reply = [0u8; 64];
    timeout(WAIT, raw.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    raw.write_all(&[0u8; 32]).await.unwrap();
    closed_by_peer(&mut raw).await;
    eventually("listener counts the failure", || {
        b.stats().auth_failures > before
    })
    .await;
    assert!(rb.try_recv().is_err());

    // And the dialer's half refuses a listener that does not know the secret.
    let mut raw = TcpStream::connect(b.local_addr()).await.unwrap();
    let err = authenticate_outbound(&mut raw, b"wrong", 3, 2)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did not prove"), "{err}");
}

#[tokio::test]
async fn garbage_before_authentication_closes_the_connection() {
    let (b, mut rb) = start(2).await;
    let mut raw = TcpStream::connect(b.local_addr()).await.unwrap();
    // Looks like a frame holding a Raft message, but no handshake came first.
    let mut frame = Vec::new();
    let body = msg(1, 2, 1).write_to_bytes().unwrap();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame.resize(200, 0xff);
    raw.write_all(&frame).await.unwrap();
    closed_by_peer(&mut raw).await;
    eventually("auth failure counted", || b.stats().auth_failures == 1).await;
    assert!(rb.try_recv().is_err());
    assert_eq!(b.stats().delivered, 0);
    assert_eq!(b.stats().rejected_frames, 0, "no frame was even read");
}

fn envelope_frame(from: NodeId, to: NodeId, body: Vec<u8>) -> Vec<u8> {
    use bincode::Options;
    let env = bincode::DefaultOptions::new()
        .serialize(&Envelope { from, to, body })
        .unwrap();
    let mut frame = (env.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&env);
    frame
}

async fn authenticated(addr: SocketAddr, me: NodeId, peer: NodeId) -> TcpStream {
    let mut raw = TcpStream::connect(addr).await.unwrap();
    authenticate_outbound(&mut raw, SECRET.as_bytes(), me, peer)
        .await
        .unwrap();
    raw
}

#[tokio::test]
async fn bad_frames_after_authentication_close_the_connection() {
    let mut cfg = TransportConfig::new(loopback(), SECRET);
    cfg.max_frame_bytes = 1024;
    let (b, mut rb) = start_with(2, cfg).await;
    let addr = b.local_addr();

    // Control: a well-formed frame over a hand-made connection is delivered, so the refusals
    // below are about the frames, not the harness.
    let mut raw = authenticated(addr, 5, 2).await;
    raw.write_all(&envelope_frame(
        5,
        2,
        msg(5, 2, 3).write_to_bytes().unwrap(),
    ))
    .await
    .unwrap();
    let (from, m) = recv(&mut rb).await;
    assert_eq!((from, m.term), (5, 3));

    // Oversized: only the length is read, the connection closes.
    raw.write_all(&1025u32.to_be_bytes()).await.unwrap();
    raw.write_all(&[0u8; 64]).await.unwrap();
    closed_by_peer(&mut raw).await;
    eventually("oversized frame rejected", || {
        b.stats().rejected_frames == 1
    })
    .await;

    // Garbage where the envelope should be.
    let mut raw = authenticated(addr, 5, 2).await;
    let mut frame = 40u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0xffu8; 40]);
    raw.write_all(&frame).await.unwrap();
    closed_by_peer(&mut raw).await;
    eventually("garbage envelope rejected", || {
        b.stats().rejected_frames == 2
    })
    .await;

    // A valid envelope with a protobuf body that does not decode.
    let mut raw = authenticated(addr, 5, 2).await;
    raw.write_all(&envelope_frame(5, 2, vec![0xff; 30]))
        .await
        .unwrap();
    closed_by_peer(&mut raw).await;
    eventually("garbage body rejected", || b.stats().rejected_frames == 3).await;

    // An authenticated peer may not speak for another node.
    let mut raw = authenticated(addr, 5, 2).await;
    raw.write_all(&envelope_frame(
        6,
        2,
        msg(6, 2, 1).write_to_bytes().unwrap(),
    ))
    .await
    .unwrap();
    closed_by_peer(&mut raw).await;
    eventually("spoofed sender rejected", || b.stats().rejected_frames == 4).await;

    assert!(rb.try_recv().is_err(), "nothing after the control message");
    assert_eq!(b.stats().delivered, 1);
    assert_eq!(b.stats().auth_failures, 0);
}

#[tokio::test]
async fn a_restarted_peer_is_reconnected_to() {
    let (a, mut ra) = start(1).await;
    let (b, mut rb) = start(2).await;
    let b_addr = b.local_addr();
    a.set_peer(2, b_addr);
    b.set_peer(1, a.local_addr());
    a.send(msg(1, 2, 1));
    assert_eq!(recv(&mut rb).await.1.term, 1);
    b.send(msg(2, 1, 1));
    assert_eq!(recv(&mut ra).await.0, 2);

    drop(b);
    drop(rb);
    // The old listener goes away asynchronously: retry binding the same port until it is free.
    let deadline = Instant::now() + WAIT;
    let (b2, mut rb2) = loop {
        let (tx, rx) = mpsc::channel(256);
        match Transport::start(
            TransportConfig::new(b_addr, SECRET),
            2,
            tx,
            CancellationToken::new(),
        )
        .await
        {
            Ok(t) => break (t, rx),
            Err(e) => {
                assert!(Instant::now() < deadline, "port never freed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(b2.local_addr(), b_addr);
    b2.set_peer(1, a.local_addr());

    // Raft-style: keep sending (each a new term) until one lands; a message written into the
    // dead connection before the writer noticed may be lost, as raft allows.
    let deadline = Instant::now() + WAIT;
    let mut term = 10;
    let got = loop {
        a.send(msg(1, 2, term));
        if let Ok(Some((from, m))) = timeout(Duration::from_millis(50), rb2.recv()).await {
            break (from, m);
        }
        assert!(
            Instant::now() < deadline,
            "no message reached the restarted peer"
        );
        term += 1;
    };
    assert_eq!(got.0, 1);
    assert!(got.1.term >= 10);
    b2.send(msg(2, 1, 99));
    let deadline = Instant::now() + WAIT;
    loop {
        let (from, m) = recv(&mut ra).await;
        if m.term == 99 {
            assert_eq!(from, 2);
            break;
        }
        assert!(Instant::now() < deadline);
    }
}

#[tokio::test]
async fn the_peer_queue_drops_at_its_exact_bound() {
    // A port nobody listens on: bind, note it, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = TransportConfig::new(loopback(), SECRET);
    cfg.queue_per_peer = 8;
    let (a, _ra) = start_with(1, cfg).await;
    a.set_peer(2, dead);
    for term in 1..=8 {
        a.send(msg(1, 2, term));
    }
    assert_eq!(a.stats(), TransportStats::default(), "8 fit");
    a.send(msg(1, 2, 9));
    a.send(msg(1, 2, 10));
    assert_eq!(a.stats().dropped_queue_full, 2);
    a.send(msg(1, 3, 1));
    assert_eq!(a.stats().dropped_unknown_peer, 1);

    // Once the peer shows up at that address, the queued 8 go out, in order.
    let (tx, mut rb) = mpsc::channel(256);
    let b = Transport::start(
        TransportConfig::new(dead, SECRET),
        2,
        tx,
        CancellationToken::new(),
    )
    .await
    .expect("the freed port was taken by someone else");
    for term in 1..=8 {
        assert_eq!(recv(&mut rb).await.1.term, term);
    }
    assert!(
        timeout(Duration::from_millis(300), rb.recv())
            .await
            .is_err(),
        "the dropped two never arrive"
    );
    drop(b);
}

#[tokio::test]
async fn shutdown_token_stops_the_listener() {
    let (tx, _rx) = mpsc::channel(4);
    let token = CancellationToken::new();
    let t = Transport::start(
        TransportConfig::new(loopback(), SECRET),
        1,
        tx,
        token.clone(),
    )
    .await
    .unwrap();
    let addr = t.local_addr();
    token.cancel();
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_join_request_needs_the_secret_and_reaches_the_driver_only_when_it_serves_joins() {
    use comodit_cluster::transport::{request_join, JoinReply};
    let (member, _inbox) = start(1).await;
    let addr = member.local_addr();

    // Not serving joins yet: refused, cleanly.
    let reply = request_join(addr, SECRET.as_bytes(), 7, "127.0.0.1:7007")
        .await
        .unwrap();
    assert!(matches!(reply, JoinReply::Refused(_)), "{reply:?}");

    // Wrong secret: the handshake fails, nothing reaches the driver.
    let (calls_tx, mut calls) = mpsc::channel(4);
    member.serve_joins(calls_tx);
    let err = request_join(addr, b"not the secret", 7, "127.0.0.1:7007")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    assert!(calls.try_recv().is_err());

    // The right secret: the driver sees the request and its answer goes back.
    let driver = tokio::spawn(async move {
        let (req, reply) = calls.recv().await.unwrap();
        let _ = reply.send(JoinReply::Accepted {
            members: vec![(1, "127.0.0.1:1".into()), (req.id, req.addr.clone())],
        });
        req
    });
    let reply = timeout(
        WAIT,
        request_join(addr, SECRET.as_bytes(), 7, "127.0.0.1:7007"),
    )
    .await
    .unwrap()
    .unwrap();
    let req = driver.await.unwrap();
    assert_eq!((req.id, req.addr.as_str()), (7, "127.0.0.1:7007"));
    assert_eq!(
        reply,
        JoinReply::Accepted {
            members: vec![(1, "127.0.0.1:1".into()), (7, "127.0.0.1:7007".into())]
        }
    );
    assert!(member.stats().auth_failures >= 1);
}
