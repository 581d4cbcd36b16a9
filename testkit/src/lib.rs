//! # comodit-testkit
//!
//! Support for tests that talk to the real RabbitMQ (DESIGN §5): where it is, throwaway
//! prefixes so tests running at once never share an exchange or queue, per-host broker users
//! with the exact agent permissions, cleanup, and the disruptive operations (closing
//! connections, restarting the broker application).
//!
//! - AMQP url: env `COMODIT_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.
//! - Management API: env `COMODIT_TEST_MGMT_URL`, default `http://127.0.0.1:15672`, with the
//!   credentials of the AMQP url (guest/guest by default). Spoken with a minimal HTTP/1.0 client
//!   over `std::net::TcpStream` (no TLS, no dependency).
//! - `rabbitmqctl` on the `PATH` for [`restart_broker_app`] and the connection closers.
//!
//! ## Disruptive tests
//!
//! [`restart_broker_app`], [`close_all_connections`] (and, less so, [`close_user_connections`])
//! break the connections of every test running at the same time. Tests that use them hold
//! [`broker_lock`] for their whole run and live in their own test binary (cargo runs test
//! binaries one after another, but the tests of one binary in parallel), so ordinary tests
//! never see the broker go away. Prefer [`close_user_connections`] with a dedicated user: it
//! only drops the connections of the test that asked.
//!
//! Helpers panic with a clear message when the broker is not there: they are for tests.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use comodit_protocol::{HostId, Names};
use rand::Rng;

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEFAULT_MGMT_URL: &str = "http://127.0.0.1:15672";
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`restart_broker_app`] waits for AMQP and the management API to answer again.
const RESTART_DEADLINE: Duration = Duration::from_secs(60);

/// The broker under test: env `COMODIT_TEST_AMQP_URL` or guest on 127.0.0.1.
pub fn amqp_url() -> String {
    std::env::var("COMODIT_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// The same broker and vhost as [`amqp_url`], as another user.
pub fn amqp_url_for(user: &str, password: &str) -> String {
    let url = Url::parse(&amqp_url());
    format!(
        "{}://{}:{}@{}:{}/{}",
        url.scheme,
        percent_encode(user),
        percent_encode(password),
        url.host,
        url.port,
        url.path
    )
}

/// `t` + 10 random hex digits: a valid [`Names`] prefix unique to one test.
pub fn unique_prefix() -> String {
    let n: u64 = rand::thread_rng().gen();
    format!("t{:010x}", n & 0xff_ffff_ffff)
}

/// [`Names`] under a fresh [`unique_prefix`].
pub fn unique_names() -> Names {
    Names::new(&unique_prefix()).expect("unique_prefix is a valid prefix")
}

/// Creates a broker user named by the host id with exactly the agent permissions of DESIGN §5
/// ([`Names::agent_permissions`]) on the test vhost, and returns its random password.
pub fn create_agent_user(names: &Names, host: HostId) -> String {
    let user = host.to_string();
    let password = random_hex(24);
    let perms = names.agent_permissions(host);
    let vhost = Url::parse(&amqp_url()).path;
    let u = percent_encode(&user);
    mgmt(
        "PUT",
        &format!("/api/users/{u}"),
        Some(&serde_json::json!({ "password": password, "tags": "" })),
    );
    mgmt(
        "PUT",
        &format!("/api/permissions/{vhost}/{u}"),
        Some(&serde_json::json!({
            "configure": perms.configure, "write": perms.write, "read": perms.read,
        })),
    );
    mgmt(
        "PUT",
        &format!("/api/topic-permissions/{vhost}/{u}"),
        Some(&serde_json::json!({
            "exchange": perms.topic_exchange, "write": perms.topic_write, "read": perms.topic_read,
        })),
    );
    password
}

/// Deletes a broker user (which closes its connections). Missing users are fine.
pub fn delete_user(name: &str) {
    let (status, body) = mgmt_raw(
        "DELETE",
        &format!("/api/users/{}", percent_encode(name)),
        None,
    );
    assert!(
        status == 204 || status == 404,
        "delete user {name}: HTTP {status}: {body}"
    );
}

/// Whether the broker has a user of this name.
pub fn user_exists(name: &str) -> bool {
    let (status, body) = mgmt_raw("GET", &format!("/api/users/{}", percent_encode(name)), None);
    match status {
        200 => true,
        404 => false,
        _ => panic!("user {name}: HTTP {status}: {body}"),
    }
}

/// Declares a durable, idle queue on the test vhost (bound to nothing).
pub fn declare_queue(name: &str) {
    let vhost = Url::parse(&amqp_url()).path;
    mgmt(
        "PUT",
        &format!("/api/queues/{vhost}/{}", percent_encode(name)),
        Some(&serde_json::json!({"durable": true})),
    );
}

/// Deletes a queue on the test vhost. A missing queue is fine.
pub fn delete_queue(name: &str) {
    let vhost = Url::parse(&amqp_url()).path;
    let (status, body) = mgmt_raw(
        "DELETE",
        &format!("/api/queues/{vhost}/{}", percent_encode(name)),
        None,
    );
    assert!(
        status == 204 || status == 404,
        "delete queue {name}: HTTP {status}: {body}"
    );
}

/// The management API's view of a queue on the test vhost (`arguments`, `type`, `durable`,
/// ...), or `None` if it does not exist.
pub fn queue_info(name: &str) -> Option<serde_json::Value> {
    let vhost = Url::parse(&amqp_url()).path;
    let (status, body) = mgmt_raw(
        "GET",
        &format!("/api/queues/{vhost}/{}", percent_encode(name)),
        None,
    );
    match status {
        200 => Some(serde_json::from_str(&body).expect("queue info is json")),
        404 => None,
        _ => panic!("queue info {name}: HTTP {status}: {body}"),
    }
}

/// Ready and unacknowledged message counts of a queue, straight from the queue process
/// (`rabbitmqctl list_queues`, no statistics delay), or `None` if the queue does not exist.
pub fn queue_counts(name: &str) -> Option<(u64, u64)> {
    let vhost = Url::parse(&amqp_url()).vhost();
    let out = rabbitmqctl(&[
        "list_queues",
        "-q",
        "-p",
        &vhost,
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    out.lines().find_map(|line| {
        let mut cols = line.split('\t');
        (cols.next()? == name).then_some(())?;
        Some((
            cols.next()?.trim().parse().ok()?,
            cols.next()?.trim().parse().ok()?,
        ))
    })
}

/// Process-wide lock for tests that restart the broker or close connections; hold the guard
/// for the whole test. A test that panicked while holding it does not poison the others.
pub fn broker_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Restarts the broker application (`rabbitmqctl stop_app` then `start_app`): every connection
/// closes and transient messages are dropped, as in a real restart. Returns once AMQP and the
/// management API answer again. Hold [`broker_lock`].
pub fn restart_broker_app() {
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    wait_broker_up(RESTART_DEADLINE);
}

/// Closes every client connection on the node (`rabbitmqctl close_all_connections`). This also
/// hits other tests and other programs using the broker: prefer [`close_user_connections`].
pub fn close_all_connections(reason: &str) {
    rabbitmqctl(&["close_all_connections", reason]);
}

/// Closes every connection of one broker user (`rabbitmqctl close_all_user_connections`).
pub fn close_user_connections(user: &str, reason: &str) {
    rabbitmqctl(&["close_all_user_connections", user, reason]);
}

/// How many connections one broker user has open, from `rabbitmqctl` (no statistics delay).
pub fn user_connection_count(user: &str) -> usize {
    let out = rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "user"]);
    out.lines().filter(|l| l.trim() == user).count()
}

/// The channel numbers open on one broker user's connections, from `rabbitmqctl`. A client
/// numbers its channels in sequence (lapin does), so the highest tells how many it has opened.
pub fn user_channel_numbers(user: &str) -> Vec<u32> {
    let out = rabbitmqctl(&[
        "list_channels",
        "-q",
        "--no-table-headers",
        "user",
        "number",
    ]);
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(u, _)| u.trim() == user)
        .filter_map(|(_, n)| n.trim().parse().ok())
        .collect()
}

/// Suspends the Erlang process of a classic queue of the vhost `/` until the guard is dropped:
/// messages routed to it are neither stored nor confirmed meanwhile — a broker slow to confirm —
/// while every connection goes on working. Hold [`broker_lock`].
pub struct SuspendedQueue {
    name: String,
}

impl SuspendedQueue {
    pub fn suspend(name: &str) -> SuspendedQueue {
        rabbitmqctl(&["eval", &queue_process_call(name, "suspend")]);
        SuspendedQueue { name: name.into() }
    }
}

impl Drop for SuspendedQueue {
    /// Never panics (it may run while a failed test unwinds, and a second panic would abort
    /// before the test's cleanup ran): a failure is printed.
    fn drop(&mut self) {
        let call = queue_process_call(&self.name, "resume");
        match Command::new("rabbitmqctl").args(["eval", &call]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not resume queue {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!(
                "could not run rabbitmqctl to resume queue {}: {e}",
                self.name
            ),
        }
    }
}

fn queue_process_call(queue: &str, f: &str) -> String {
    format!(
        "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
         sys:{f}(amqqueue:get_pid(Q))."
    )
}

/// Deletes every exchange and queue of the test vhost whose name starts with `prefix`, and
/// every broker user whose permissions there name the prefix (the node's enrollment user, the
/// hosts it enrolled). Best-effort: failures are printed, not raised, so cleanup never hides a
/// test's own failure.
pub fn cleanup_prefix(prefix: &str) {
    if prefix.is_empty() {
        eprintln!("cleanup: refusing an empty prefix (it would delete everything)");
        return;
    }
    cleanup_objects(prefix);
    cleanup_users(prefix);
}

fn cleanup_objects(prefix: &str) {
    let vhost = Url::parse(&amqp_url()).path;
    for kind in ["queues", "exchanges"] {
        let (status, body) =
            match mgmt_try("GET", &format!("/api/{kind}/{vhost}?columns=name"), None) {
                Ok(answer) => answer,
                Err(e) => {
                    eprintln!("cleanup {prefix}: list {kind}: {e}");
                    continue;
                }
            };
        if status != 200 {
            eprintln!("cleanup {prefix}: list {kind}: HTTP {status}");
            continue;
        }
        let Ok(serde_json::Value::Array(items)) = serde_json::from_str(&body) else {
            eprintln!("cleanup {prefix}: {kind} list is not a json array");
            continue;
        };
        for name in items.iter().filter_map(|i| i["name"].as_str()) {
            if name.starts_with(prefix) {
                let path = format!("/api/{kind}/{vhost}/{}", percent_encode(name));
                match mgmt_try("DELETE", &path, None) {
                    Ok((204 | 404, _)) => {}
                    Ok((status, _)) => eprintln!("cleanup {prefix}: delete {name}: HTTP {status}"),
                    Err(e) => eprintln!("cleanup {prefix}: delete {name}: {e}"),
                }
            }
        }
    }
}

/// The users of the test vhost whose permission patterns name `prefix` (`<prefix>.` or, escaped
/// as the node writes them, `<prefix>\\.`), deleted one by one.
fn cleanup_users(prefix: &str) {
    let vhost = Url::parse(&amqp_url()).path;
    let (plain, escaped) = (format!("{prefix}."), format!("{prefix}\\."));
    let perms = match mgmt_try("GET", &format!("/api/vhosts/{vhost}/permissions"), None) {
        Ok((200, body)) => body,
        Ok((status, _)) => return eprintln!("cleanup {prefix}: list permissions: HTTP {status}"),
        Err(e) => return eprintln!("cleanup {prefix}: list permissions: {e}"),
    };
    let Ok(serde_json::Value::Array(perms)) = serde_json::from_str(&perms) else {
        return eprintln!("cleanup {prefix}: permissions list is not a json array");
    };
    let users = perms.iter().filter(|p| {
        ["configure", "write", "read"].iter().any(|k| {
            p[*k]
                .as_str()
                .is_some_and(|r| r.contains(&plain) || r.contains(&escaped))
        })
    });
    for user in users.filter_map(|p| p["user"].as_str()) {
        match mgmt_try(
            "DELETE",
            &format!("/api/users/{}", percent_encode(user)),
            None,
        ) {
            Ok((204 | 404, _)) => {}
            Ok((status, _)) => eprintln!("cleanup {prefix}: delete user {user}: HTTP {status}"),
            Err(e) => eprintln!("cleanup {prefix}: delete user {user}: {e}"),
        }
    }
}

/// Deletes a prefix's exchanges and queues, and the listed users, when dropped: cleanup that
/// also runs when the test panics.
pub struct Cleanup {
    pub prefix: String,
    pub users: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Never panic here: this may run while a failed test unwinds.
        for user in &self.users {
            let path = format!("/api/users/{}", percent_encode(user));
            match mgmt_try("DELETE", &path, None) {
                Ok((204 | 404, _)) => {}
                Ok((status, _)) => eprintln!("cleanup: delete user {user}: HTTP {status}"),
                Err(e) => eprintln!("cleanup: delete user {user}: {e}"),
            }
        }
        cleanup_prefix(&self.prefix);
    }
}

/// Waits until the AMQP port answers the protocol header with `connection.start` and the
/// management API answers, or panics at the deadline.
pub fn wait_broker_up(deadline: Duration) {
    let url = Url::parse(&amqp_url());
    let until = Instant::now() + deadline;
    let mut last = String::new();
    while Instant::now() < until {
        match amqp_answers(&url.host, url.port) {
            Ok(()) => match mgmt_try("GET", "/api/overview", None) {
                Ok((200, _)) => return,
                Ok((status, _)) => last = format!("management HTTP {status}"),
                Err(e) => last = format!("management: {e}"),
            },
            Err(e) => last = format!("amqp: {e}"),
        }
        // A bounded poll of an external process: there is nothing to be notified by.
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("broker not up after {deadline:?}: {last}");
}

fn amqp_answers(host: &str, port: u16) -> std::io::Result<()> {
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    let mut frame = [0u8; 1];
    s.read_exact(&mut frame)?;
    // Frame type 1 (method): connection.start. Anything else is a broker not ready.
    if frame[0] == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "unexpected frame type {}",
            frame[0]
        )))
    }
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A management API call that must succeed (2xx).
fn mgmt(method: &str, path: &str, body: Option<&serde_json::Value>) -> String {
    let (status, text) = mgmt_raw(method, path, body);
    assert!(
        (200..300).contains(&status),
        "{method} {path}: HTTP {status}: {text}"
    );
    text
}

fn mgmt_raw(method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String) {
    mgmt_try(method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path}: management API unreachable: {e}"))
}

/// What a management client of the test broker needs: the management API's base url, then the
/// user, password and vhost (decoded) of the test broker's AMQP url.
pub fn mgmt_login() -> (String, String, String, String) {
    let amqp = Url::parse(&amqp_url());
    (
        mgmt_base(),
        amqp.user,
        amqp.password,
        percent_decode(&amqp.path),
    )
}

fn mgmt_base() -> String {
    std::env::var("COMODIT_TEST_MGMT_URL").unwrap_or_else(|_| DEFAULT_MGMT_URL.into())
}

/// One HTTP/1.0 request (so the answer is never chunked and ends at EOF).
fn mgmt_try(
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> std::io::Result<(u16, String)> {
    let mgmt = Url::parse(&mgmt_base());
    let amqp = Url::parse(&amqp_url());
    let addr = (mgmt.host.as_str(), mgmt.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = base64(format!("{}:{}", amqp.user, amqp.password).as_bytes());
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {}:{}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        mgmt.host,
        mgmt.port,
        body.len()
    );
    s.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Just enough of a url: `scheme://[user[:password]@]host[:port][/path]`.
struct Url {
    scheme: String,
    user: String,
    password: String,
    host: String,
    port: u16,
    /// Still percent-encoded (`%2f` for the vhost `/`).
    path: String,
}

impl Url {
    fn parse(url: &str) -> Url {
        let (scheme, rest) = url
            .split_once("://")
            .unwrap_or_else(|| panic!("not a url: {}", redact(url)));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let default_port = match scheme {
            "amqp" => 5672,
            "amqps" => 5671,
            "https" => 443,
            _ => 80,
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') => (
                h,
                p.parse()
                    .unwrap_or_else(|_| panic!("bad port in {}", redact(url))),
            ),
            _ => (hostport, default_port),
        };
        Url {
            scheme: scheme.to_owned(),
            user: if user.is_empty() {
                "guest".into()
            } else {
                percent_decode(user)
            },
            password: if userinfo.is_empty() {
                "guest".into()
            } else {
                percent_decode(password)
            },
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            path: if path.is_empty() {
                "%2f".into()
            } else {
                path.split('?').next().unwrap_or_default().to_owned()
            },
        }
    }

    /// The vhost, decoded.
    fn vhost(&self) -> String {
        percent_decode(&self.path)
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(TABLE[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// --- PostgreSQL ------------------------------------------------------------------------------

const DEFAULT_PG_URL: &str = "postgres://comodit:comodit@127.0.0.1:5432/postgres";

/// The PostgreSQL server under test: env `COMODIT_TEST_PG_URL`, default the `comodit` role
/// (CREATEDB) on 127.0.0.1, database `postgres` (what `deploy/common.sh`'s `ensure_postgres`
/// sets up).
pub fn pg_url() -> String {
    std::env::var("COMODIT_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// Creates a new, empty database with a unique name on the [`pg_url`] server; returns its url and
/// a guard that drops the database (closing what is still connected to it) when dropped, also
/// when the test panics. Talks to the server with `psql` (no driver dependency here); panics with
/// a clear message if the server is not there.
pub fn fresh_pg_database() -> (String, PgDatabase) {
    let base = pg_url();
    let n: u64 = rand::thread_rng().gen();
    let name = format!("comodit_t{:012x}", n & 0xffff_ffff_ffff);
    if let Err(e) = psql(&base, &format!("CREATE DATABASE {name}")) {
        panic!("cannot create a test database on {}: {e}", redact(&base));
    }
    let url = with_database(&base, &name);
    (url, PgDatabase { base, name })
}

/// A throw-away database made by [`fresh_pg_database`]; dropped with the guard.
pub struct PgDatabase {
    base: String,
    name: String,
}

impl PgDatabase {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Never panic here: this may run while a failed test unwinds.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = psql(&self.base, &sql) {
            eprintln!("cleanup: drop database {}: {e}", self.name);
        }
    }
}

/// Runs one statement with `psql` against `url`, bounded in time.
fn psql(url: &str, sql: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "SET statement_timeout = '60s'", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "psql {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `url` with its database (the path) replaced by `db`, keeping any `?parameters`.
fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let authority_start = head.find("://").map_or(0, |i| i + 3);
    let path_start = head[authority_start..]
        .find('/')
        .map_or(head.len(), |i| authority_start + i);
    let mut out = format!("{}/{db}", &head[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod pg_tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres", "x"),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/postgres?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
    }

    #[test]
    fn urls_parse_and_rebuild() {
        let u = Url::parse("amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            (
                u.user.as_str(),
                u.password.as_str(),
                u.host.as_str(),
                u.port,
                u.path.as_str()
            ),
            ("guest", "guest", "127.0.0.1", 5672, "%2f")
        );
        assert_eq!(u.vhost(), "/");
        let u = Url::parse("http://127.0.0.1:15672");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 15672));
        let u = Url::parse("amqp://a%40b:p%2Fw@[::1]/v");
        assert_eq!(
            (
                u.user.as_str(),
                u.password.as_str(),
                u.host.as_str(),
                u.port
            ),
            ("a@b", "p/w", "::1", 5672)
        );
        assert_eq!(percent_encode("a@b/c"), "a%40b%2Fc");
        assert_eq!(percent_decode("%2f%2F%zz%"), "//%zz%");
        assert!(!redact("amqp://u:secret@h/").contains("secret"));
    }

    #[test]
    fn prefixes_are_valid_and_distinct() {
        let a = unique_prefix();
        assert_eq!(a.len(), 11);
        assert!(a.starts_with('t'));
        assert!(Names::new(&a).is_ok());
        assert_ne!(a, unique_prefix());
    }
}
