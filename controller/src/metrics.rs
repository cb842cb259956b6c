//! Prometheus metrics (text exposition) and the health endpoints, served
//! by `coral-controller run` on `--metrics-addr`: `/metrics`, `/healthz`
//! (the process answers), `/readyz` (the controllers run, or this replica
//! waits as a standby).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub builds_started: AtomicU64,
    pub builds_succeeded: AtomicU64,
    pub builds_failed: AtomicU64,
    pub snapshots_deleted: AtomicU64,
    pub volumes_attached: AtomicU64,
    pub taints_removed_seeded: AtomicU64,
    pub taints_removed_deadline: AtomicU64,
    pub leader: AtomicU64,
    /// Successful builds' durations (Job start to completion): sum in
    /// milliseconds, and count.
    pub build_millis_sum: AtomicU64,
    pub build_count: AtomicU64,
    /// ImageSeed → (current snapshot's creation time, unix seconds).
    pub snapshot_created: Mutex<std::collections::BTreeMap<String, i64>>,
    /// Node → its last reported state (`seeded`, `fellBack`, `failed`, `pending`).
    pub node_states: Mutex<std::collections::BTreeMap<String, &'static str>>,
}

pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(Metrics::default);

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The exposition text.
pub fn render(m: &Metrics) -> String {
    let mut out = String::new();
    let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    };
    counter(
        &mut out,
        "coral_reconciles_total",
        "ImageSeed reconciles run.",
        &m.reconciles,
    );
    counter(
        &mut out,
        "coral_reconcile_errors_total",
        "ImageSeed reconciles that failed.",
        &m.reconcile_errors,
    );
    counter(
        &mut out,
        "coral_builds_started_total",
        "Builder Jobs created.",
        &m.builds_started,
    );
    counter(
        &mut out,
        "coral_builds_succeeded_total",
        "Builds whose snapshot was recorded.",
        &m.builds_succeeded,
    );
    counter(
        &mut out,
        "coral_builds_failed_total",
        "Builder Jobs seen failed.",
        &m.builds_failed,
    );
    counter(
        &mut out,
        "coral_snapshots_deleted_total",
        "Snapshots deleted beyond retention.",
        &m.snapshots_deleted,
    );
    counter(
        &mut out,
        "coral_volumes_attached_total",
        "Attach-mode volumes attached.",
        &m.volumes_attached,
    );
    let _ = writeln!(
        out,
        "# HELP coral_startup_taints_removed_total Startup taints removed, by why.\n\
         # TYPE coral_startup_taints_removed_total counter\n\
         coral_startup_taints_removed_total{{reason=\"seeded\"}} {}\n\
         coral_startup_taints_removed_total{{reason=\"deadline\"}} {}",
        m.taints_removed_seeded.load(Ordering::Relaxed),
        m.taints_removed_deadline.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP coral_build_duration_seconds Successful builds, Job start to completion.\n\
         # TYPE coral_build_duration_seconds summary\n\
         coral_build_duration_seconds_sum {:.3}\ncoral_build_duration_seconds_count {}",
        m.build_millis_sum.load(Ordering::Relaxed) as f64 / 1000.0,
        m.build_count.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP coral_leader 1 when this replica holds the leader Lease.\n# TYPE coral_leader gauge\ncoral_leader {}",
        m.leader.load(Ordering::Relaxed)
    );
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let _ = writeln!(
        out,
        "# HELP coral_snapshot_age_seconds Age of each ImageSeed's current snapshot.\n# TYPE coral_snapshot_age_seconds gauge"
    );
    for (seed, created) in m.snapshot_created.lock().expect("not poisoned").iter() {
        let _ = writeln!(
            out,
            "coral_snapshot_age_seconds{{imageseed=\"{seed}\"}} {}",
            now - created
        );
    }
    let _ = writeln!(
        out,
        "# HELP coral_nodes Nodes by their reported seed state.\n# TYPE coral_nodes gauge"
    );
    let states = m.node_states.lock().expect("not poisoned");
    for state in ["seeded", "fellBack", "failed", "pending"] {
        let n = states.values().filter(|s| **s == state).count();
        let _ = writeln!(out, "coral_nodes{{state=\"{state}\"}} {n}");
    }
    out
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the
/// process ends. One small request per connection.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", render(&METRICS)),
                "/healthz" | "/readyz" => ("200 OK", "ok\n".to_string()),
                _ => ("404 Not Found", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}
