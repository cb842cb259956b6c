//! A fault-injecting HTTP proxy for tests: sits between a client (the
//! builder, the node agent) and a real server (the test registry) on
//! 127.0.0.1, and per request either passes it through or injects a fault:
//! a connection reset, an HTTP error status, a stall, or a body cut short.
//!
//! It speaks plain HTTP/1.1, one request per connection (it forwards
//! `Connection: close` both ways, so clients open a new connection per
//! request and every request is seen). Bodies are streamed, never buffered.
//! Which requests fail is set by a [`FaultPlan`], changeable at any time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Close the connection at once with a TCP reset, before any response.
    Reset,
    /// Answer with this status and an empty body (`Retry-After: 0` for 429/503).
    Status(u16),
    /// Accept the request and send nothing for this long, then close.
    Stall(Duration),
    /// Send the upstream's headers (full Content-Length) and this fraction of
    /// the body, then close.
    Truncate(f64),
    /// Send the headers and half the body, then send nothing for this long.
    StallMidBody(Duration),
    /// Answer `307 Temporary Redirect` to this origin (`http://host:port`),
    /// the same path: a registry sending blobs to a CDN, or anywhere.
    Redirect(String),
    /// Answer 200 with no length and a body that never ends (zeros, for as
    /// long as the client reads).
    Endless,
}

#[derive(Debug, Clone)]
pub enum When {
    /// The first `n` matching requests fail, the rest pass.
    FirstN(u64),
    /// Every `k`-th matching request fails (the k-th, 2k-th, …).
    EveryKth(u64),
    /// Each matching request fails with probability `p` (seeded, repeatable).
    Probability(f64, u64),
    /// Every matching request fails.
    Always,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Only requests whose path contains this (e.g. `/blobs/`).
    pub path_contains: Option<String>,
    pub fault: Fault,
    pub when: When,
}

/// The rules, first match wins; no rule matching means pass through.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    pub rules: Vec<Rule>,
}

impl FaultPlan {
    pub fn none() -> FaultPlan {
        FaultPlan::default()
    }
    pub fn with(mut self, path_contains: Option<&str>, fault: Fault, when: When) -> FaultPlan {
        self.rules.push(Rule {
            path_contains: path_contains.map(str::to_owned),
            fault,
            when,
        });
        self
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub passed: AtomicU64,
    pub resets: AtomicU64,
    pub statuses: AtomicU64,
    pub stalls: AtomicU64,
    pub truncations: AtomicU64,
    pub bytes_forwarded: AtomicU64,
    /// Requests that carried an `Authorization` header.
    pub authorized: AtomicU64,
}

impl Counters {
    pub fn faults(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
            + self.statuses.load(Ordering::Relaxed)
            + self.stalls.load(Ordering::Relaxed)
            + self.truncations.load(Ordering::Relaxed)
    }
}

struct State {
    plan: FaultPlan,
    /// Matching requests seen, per rule.
    seen: Vec<u64>,
    rng: u64,
}

pub struct FaultProxy {
    serving: Serving,
    upstream: String,
    state: Arc<Mutex<State>>,
    pub counters: Arc<Counters>,
}

/// A proxy's accept loop, on its own thread and runtime, on a random
/// 127.0.0.1 port; stopped when dropped.
pub(crate) struct Serving {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts a [`Serving`] that hands each connection to `serve`.
pub(crate) fn serve<F, Fut>(name: &str, serve: F) -> Result<Serving>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("a listener");
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            if let Ok((conn, _)) = accepted {
                                tokio::spawn(serve(conn));
                            }
                        }
                    }
                }
            });
        })?;
    Ok(Serving {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`host:port`) on a random 127.0.0.1 port.
    pub fn start(upstream: &str, plan: FaultPlan) -> Result<FaultProxy> {
        let seed = plan
            .rules
            .iter()
            .find_map(|r| match r.when {
                When::Probability(_, s) => Some(s),
                _ => None,
            })
            .unwrap_or(1);
        let state = Arc::new(Mutex::new(State {
            seen: vec![0; plan.rules.len()],
            plan,
            rng: seed | 1,
        }));
        let counters = Arc::new(Counters::default());
        let (st, ct, up) = (state.clone(), counters.clone(), upstream.to_string());
        let serving = serve("fault-proxy", move |conn| {
            let (st, ct, up) = (st.clone(), ct.clone(), up.clone());
            async move {
                let _ = handle(conn, &up, &st, &ct).await;
            }
        })?;
        Ok(FaultProxy {
            serving,
            upstream: upstream.to_string(),
            state,
            counters,
        })
    }

    /// `127.0.0.1:PORT`, to use in place of the upstream's host.
    pub fn host(&self) -> String {
        self.serving.addr.to_string()
    }

    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Replaces the plan (and restarts its per-rule counts).
    pub fn set_plan(&self, plan: FaultPlan) {
        let mut s = self.state.lock().expect("not poisoned");
        s.seen = vec![0; plan.rules.len()];
        s.plan = plan;
    }
}

/// Decides the fault (if any) for a request to `path`.
fn decide(state: &Mutex<State>, path: &str) -> Option<Fault> {
    let mut s = state.lock().expect("not poisoned");
    for i in 0..s.plan.rules.len() {
        let rule = s.plan.rules[i].clone();
        if rule
            .path_contains
            .as_deref()
            .is_some_and(|p| !path.contains(p))
        {
            continue;
        }
        s.seen[i] += 1;
        let n = s.seen[i];
        let fire = match rule.when {
            When::FirstN(k) => n <= k,
            When::EveryKth(k) => k > 0 && n.is_multiple_of(k),
            When::Probability(p, _) => {
                // xorshift64*
                let mut x = s.rng;
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                s.rng = x;
                let r = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
                r < p
            }
            When::Always => true,
        };
        return fire.then_some(rule.fault);
    }
    None
}

/// Reads an HTTP head (up to and including the blank line).
pub(crate) async fn read_head(conn: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        anyhow::ensure!(buf.len() < 64 * 1024, "head too large");
        let n = conn.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before a full head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The head with `Connection: close` in place of any Connection header.
pub(crate) fn close_head(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

pub(crate) fn content_length(head: &[u8]) -> Option<u64> {
    String::from_utf8_lossy(head).split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

async fn handle(
    mut client: TcpStream,
    upstream: &str,
    state: &Mutex<State>,
    c: &Counters,
) -> Result<()> {
    let (head, early_body) = read_head(&mut client).await?;
    c.requests.fetch_add(1, Ordering::Relaxed);
    if String::from_utf8_lossy(&head)
        .split("\r\n")
        .any(|l| l.to_ascii_lowercase().starts_with("authorization:"))
    {
        c.authorized.fetch_add(1, Ordering::Relaxed);
    }
    let request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let fault = decide(state, &path);
    match &fault {
        Some(Fault::Reset) => {
            c.resets.fetch_add(1, Ordering::Relaxed);
            // A zero linger sends a RST on close and never blocks (the
            // deprecation is about non-zero lingers blocking in drop).
            #[allow(deprecated)]
            client.set_linger(Some(Duration::ZERO))?;
            drop(client);
            return Ok(());
        }
        Some(Fault::Status(code)) => {
            c.statuses.fetch_add(1, Ordering::Relaxed);
            let retry = if *code == 429 || *code == 503 {
                "Retry-After: 0\r\n"
            } else {
                ""
            };
            let resp = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n{retry}Connection: close\r\n\r\n"
            );
            client.write_all(resp.as_bytes()).await?;
            client.shutdown().await?;
            return Ok(());
        }
        Some(Fault::Stall(d)) => {
            c.stalls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(*d).await;
            return Ok(());
        }
        Some(Fault::Redirect(origin)) => {
            c.statuses.fetch_add(1, Ordering::Relaxed);
            let resp = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {origin}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            client.write_all(resp.as_bytes()).await?;
            client.shutdown().await?;
            return Ok(());
        }
        Some(Fault::Endless) => {
            c.statuses.fetch_add(1, Ordering::Relaxed);
            client
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n")
                .await?;
            let zeros = vec![0u8; 64 * 1024];
            // Until the client hangs up (a write then fails).
            loop {
                client.write_all(&zeros).await?;
                c.bytes_forwarded
                    .fetch_add(zeros.len() as u64, Ordering::Relaxed);
            }
        }
        _ => {}
    }
    // Forward the request.
    let mut up = TcpStream::connect(upstream).await?;
    up.write_all(&close_head(&head)).await?;
    up.write_all(&early_body).await?;
    if let Some(len) = content_length(&head) {
        let mut remaining = len.saturating_sub(early_body.len() as u64);
        let mut buf = vec![0u8; 64 * 1024];
        while remaining > 0 {
            let n = client
                .read(&mut buf[..remaining.min(65536) as usize])
                .await?;
            if n == 0 {
                break;
            }
            up.write_all(&buf[..n]).await?;
            remaining -= n as u64;
        }
    }
    let (resp_head, resp_early) = read_head(&mut up).await?;
    client.write_all(&close_head(&resp_head)).await?;
    let is_head = request_line.starts_with("HEAD ");
    let body_len = if is_head {
        Some(0)
    } else {
        content_length(&resp_head)
    };
    let limit = match (&fault, body_len) {
        (Some(Fault::Truncate(f)), Some(len)) => Some((len as f64 * f) as u64),
        (Some(Fault::StallMidBody(_)), Some(len)) => Some(len / 2),
        _ => None,
    };
    // Stream the body (up to `limit`).
    let mut sent = 0u64;
    let mut pending = resp_early;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !pending.is_empty() {
            let take = match limit {
                Some(l) => (l.saturating_sub(sent) as usize).min(pending.len()),
                None => pending.len(),
            };
            client.write_all(&pending[..take]).await?;
            sent += take as u64;
            c.bytes_forwarded.fetch_add(take as u64, Ordering::Relaxed);
            pending.clear();
        }
        if limit.is_some_and(|l| sent >= l) || body_len.is_some_and(|l| sent >= l) {
            break;
        }
        let n = up.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
    }
    match fault {
        Some(Fault::Truncate(_)) => {
            c.truncations.fetch_add(1, Ordering::Relaxed);
        }
        Some(Fault::StallMidBody(d)) => {
            c.stalls.fetch_add(1, Ordering::Relaxed);
            client.flush().await?;
            tokio::time::sleep(d).await;
        }
        _ => {
            c.passed.fetch_add(1, Ordering::Relaxed);
        }
    }
    client.shutdown().await.ok();
    Ok(())
}
