//! A recording proxy for the EBS direct and EC2 APIs, between the builder
//! and moto's server on 127.0.0.1. moto checks neither block checksums nor
//! the aggregate checksum and has no `pending` state, so this proxy does
//! what AWS would:
//!
//! - every PutSnapshotBlock: the block's SHA-256 is recomputed from the
//!   bytes sent and compared with the `x-amz-Checksum` header; the block's
//!   index and digest are recorded per snapshot;
//! - every CompleteSnapshot: the changed-blocks count and the linear
//!   aggregate checksum (SHA-256 of the recorded block digests in index
//!   order) are recomputed and compared with what the client claims;
//! - DescribeSnapshots answers can be made to say `pending` instead of
//!   `completed` for the next N polls ([`EbsProxy::hold_pending`]).
//!
//! One request per connection (`Connection: close` both ways); bodies are
//! buffered, which is fine for 512 KiB blocks and small XML answers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::faultproxy::{Serving, close_head, content_length, read_head, serve};

/// What a CompleteSnapshot claimed, checked against what was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub claimed_blocks: u64,
    pub blocks_received: u64,
    /// The claimed aggregate equals the one recomputed from the blocks.
    pub aggregate_ok: bool,
}

#[derive(Debug, Default)]
pub struct Recorded {
    /// snapshot → block index → SHA-256 of the bytes received (the last
    /// write of an index wins, as in EBS).
    pub blocks: BTreeMap<String, BTreeMap<u64, [u8; 32]>>,
    /// snapshot → PutSnapshotBlock requests received (retries included).
    pub puts: BTreeMap<String, u64>,
    /// snapshot → bytes of block data received.
    pub bytes: BTreeMap<String, u64>,
    /// Blocks whose bytes did not hash to the checksum sent with them.
    pub bad_checksums: Vec<String>,
    pub completions: BTreeMap<String, Completion>,
    /// DescribeSnapshots requests seen.
    pub describes: u64,
    /// DescribeSnapshots answers rewritten from completed to pending.
    pub held_pending: u64,
    pending_left: u64,
    /// Rewrite StartSnapshot's BlockSize to this (moto says 512 bytes,
    /// EBS's blocks are 512 KiB; clients that trust the answer need this).
    block_size: Option<u64>,
}

pub struct EbsProxy {
    serving: Serving,
    state: Arc<Mutex<Recorded>>,
}

impl EbsProxy {
    /// Starts a proxy to `upstream` (`host:port`) on a random 127.0.0.1 port.
    pub fn start(upstream: &str) -> Result<EbsProxy> {
        let state = Arc::new(Mutex::new(Recorded::default()));
        let (st, up) = (state.clone(), upstream.to_string());
        let serving = serve("ebs-proxy", move |conn| {
            let (st, up) = (st.clone(), up.clone());
            async move {
                if let Err(e) = handle(conn, &up, &st).await {
                    eprintln!("ebs-proxy: {e:#}");
                }
            }
        })?;
        Ok(EbsProxy { serving, state })
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.serving.addr)
    }

    /// The next `n` DescribeSnapshots answers say `pending` where the
    /// server says `completed`.
    pub fn hold_pending(&self, n: u64) {
        self.state.lock().expect("not poisoned").pending_left = n;
    }

    /// StartSnapshot answers say `BlockSize` is `n` (EBS's 524288, where
    /// moto says 512).
    pub fn fix_block_size(&self, n: u64) {
        self.state.lock().expect("not poisoned").block_size = Some(n);
    }

    /// Runs `f` on what was recorded so far.
    pub fn with<T>(&self, f: impl FnOnce(&Recorded) -> T) -> T {
        f(&self.state.lock().expect("not poisoned"))
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Reads the rest of a body of `len` bytes (some already read) or, with no
/// length, until the peer closes.
async fn read_body(conn: &mut TcpStream, mut body: Vec<u8>, len: Option<u64>) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if len.is_some_and(|l| body.len() as u64 >= l) {
            body.truncate(len.unwrap_or(0) as usize);
            return Ok(body);
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            anyhow::ensure!(len.is_none(), "the body ended early");
            return Ok(body);
        }
        body.extend_from_slice(&buf[..n]);
    }
}

/// The payload of a chunked body.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk size line")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(body.len() >= size + 2, "a chunk ended early");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Replaces the Content-Length of a head (and drops chunked encoding).
fn with_length(head: &[u8], len: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("content-length:") || lower.starts_with("transfer-encoding:") {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    out.into_bytes()
}

async fn handle(mut client: TcpStream, upstream: &str, state: &Mutex<Recorded>) -> Result<()> {
    let (head, early) = read_head(&mut client).await?;
    let text = String::from_utf8_lossy(&head).into_owned();
    let request_line = text.lines().next().unwrap_or_default().to_string();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or("/").to_string(),
    );
    if header(&text, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let body = read_body(&mut client, early, Some(content_length(&head).unwrap_or(0))).await?;
    let segments: Vec<&str> = path
        .split('?')
        .next()
        .unwrap_or_default()
        .split('/')
        .collect();

    // PUT /snapshots/{id}/blocks/{index}
    if method == "PUT"
        && segments.len() == 5
        && segments[1] == "snapshots"
        && segments[3] == "blocks"
    {
        let (id, index) = (segments[2].to_string(), segments[4].parse::<u64>().ok());
        let digest: [u8; 32] = Sha256::digest(&body).into();
        let claimed = header(&text, "x-amz-checksum")
            .unwrap_or_default()
            .to_string();
        let mut s = state.lock().expect("not poisoned");
        *s.puts.entry(id.clone()).or_default() += 1;
        *s.bytes.entry(id.clone()).or_default() += body.len() as u64;
        if B64.encode(digest) != claimed {
            s.bad_checksums
                .push(format!("{id} block {index:?}: claimed {claimed}"));
        }
        if let Some(i) = index {
            s.blocks.entry(id).or_default().insert(i, digest);
        }
    }
    // POST /snapshots/completion/{id}
    if method == "POST" && segments.len() == 4 && segments[2] == "completion" {
        let id = segments[3].to_string();
        let claimed_blocks = header(&text, "x-amz-changedblockscount")
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        let claimed_sum = header(&text, "x-amz-checksum").map(str::to_string);
        let mut s = state.lock().expect("not poisoned");
        let received = s.blocks.get(&id).cloned().unwrap_or_default();
        let mut h = Sha256::new();
        for d in received.values() {
            h.update(d);
        }
        let aggregate = B64.encode(h.finalize());
        let aggregate_ok = match claimed_sum {
            Some(c) => c == aggregate,
            None => received.is_empty(),
        };
        s.completions.insert(
            id,
            Completion {
                claimed_blocks,
                blocks_received: received.len() as u64,
                aggregate_ok,
            },
        );
    }
    let describe =
        method == "POST" && String::from_utf8_lossy(&body).contains("Action=DescribeSnapshots");

    let mut up = TcpStream::connect(upstream).await?;
    let forward_head = close_head(&head)
        .split(|&b| b == b'\n')
        .filter(|l| {
            !String::from_utf8_lossy(l)
                .to_ascii_lowercase()
                .starts_with("expect:")
        })
        .collect::<Vec<_>>()
        .join(&b'\n');
    up.write_all(&forward_head).await?;
    up.write_all(&body).await?;
    let (resp_head, resp_early) = read_head(&mut up).await?;
    let resp_len = if method == "HEAD" {
        Some(0)
    } else {
        content_length(&resp_head)
    };
    let mut resp = read_body(&mut up, resp_early, resp_len).await?;
    let resp_text = String::from_utf8_lossy(&resp_head).into_owned();
    if header(&resp_text, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        resp = dechunk(&resp)?;
    }
    let start = method == "POST" && segments.len() == 2 && segments[1] == "snapshots";
    if start && let Some(n) = state.lock().expect("not poisoned").block_size {
        let mut v: serde_json::Value =
            serde_json::from_slice(&resp).context("a StartSnapshot answer")?;
        if v.get("BlockSize").is_some() {
            v["BlockSize"] = n.into();
        }
        resp = serde_json::to_vec(&v)?;
    }
    if describe {
        let mut s = state.lock().expect("not poisoned");
        s.describes += 1;
        let text = String::from_utf8_lossy(&resp).into_owned();
        if s.pending_left > 0 && text.contains("<status>completed</status>") {
            s.pending_left -= 1;
            s.held_pending += 1;
            resp = text
                .replace("<status>completed</status>", "<status>pending</status>")
                .replace("<progress>100%</progress>", "<progress>42%</progress>")
                .into_bytes();
        }
    }
    client
        .write_all(&with_length(&close_head(&resp_head), resp.len()))
        .await?;
    client.write_all(&resp).await?;
    client.shutdown().await.ok();
    Ok(())
}
