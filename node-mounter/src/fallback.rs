//! The CRI fallback: makes sure each wanted image is in the node's
//! containerd by pulling it through the CRI ImageService, exactly as kubelet
//! would (same API, same credentials), for whatever a seed volume lacked,
//! and for every image on a node with no volume at all (`prefetch`).
//!
//! For each image: `ImageStatus` first (present: nothing to do, it counts as
//! seeded), else `PullImage` with each credential [`credentials`] finds for
//! it, in order, until one is accepted (none found: anonymously). All of it
//! is bounded, because this runs while a node boots:
//!
//! - **concurrency**: at most `concurrency` pulls at once (presence checks
//!   and back-off waits hold no slot);
//! - **retries**: after a failed attempt the image waits a random time
//!   between 0 and `initial_backoff * 2^(attempt-1)`, capped at
//!   `max_backoff` ("full jitter", so a fleet of nodes booting together does
//!   not retry in step), then tries again;
//! - **failures**: an image is given up on (state `failed`, never retried
//!   in this run) once its failures add up to `max_failures`. A transient
//!   error (connection refused, timeout, 5xx, containerd restarting) counts
//!   one. A definite refusal from the registry (the image or tag does not
//!   exist, the credentials are refused) counts two: it is still retried,
//!   since tags are often pushed moments after the nodes that want them
//!   start, and credential plugins hand out fresh tokens (their cached
//!   answer is dropped after a refusal), but it is given up on about twice
//!   as fast. A request containerd rejects as malformed (an invalid
//!   reference, no CRI service) fails at once;
//! - **deadline**: the whole run ends at `deadline`. Pulls still running
//!   are cancelled, and every image not yet seeded or pulled is marked
//!   `failed`, saying that the deadline passed. An image whose next retry
//!   would start after the deadline is given up on right away.
//!
//! Progress goes to the [`StatusFile`] as it happens: `pending`, `pulling`,
//! `retrying` (with `nextRetryAt` and `lastError`), then `seeded`, `pulled`
//! or `failed`. Nothing here prints; outcomes are logged with `tracing`,
//! never with a credential.

pub mod credentials;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use coral_seed::Reference;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::Code;
use tonic::transport::Channel;

pub use credentials::{CredentialError, Credentials, RegistryCredential};

use crate::status::{ImageState, ImageStatus, StatusFile};

/// containerd's socket on every common node image.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Pulls at once: enough to overlap registry round trips, few enough not to
/// split a node's bandwidth (and its disk, which unpacks) into slivers.
pub const DEFAULT_CONCURRENCY: usize = 4;
pub const DEFAULT_MAX_FAILURES: u32 = 5;
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// The brief's cap: a registry outage longer than this is an incident, and
/// a node retrying more rarely would come up long after it ends.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(600);
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
/// What a failure counts toward `max_failures` when the registry definitely
/// refused (not found, unauthorized): retrying such errors rarely helps.
const REFUSAL_WEIGHT: u32 = 2;
/// Waits between attempts to reach containerd's socket (it may still be
/// starting).
const CONNECT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    /// Pulls at once (at least 1).
    pub concurrency: usize,
    /// An image is given up on once its failures add up to this (at least 1).
    pub max_failures: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// When the whole run ends, finished or not.
    pub deadline: Instant,
}

impl PullOptions {
    /// The defaults, with the deadline `deadline` from now.
    pub fn new(address: impl Into<PathBuf>, deadline: Duration) -> PullOptions {
        PullOptions {
            address: address.into(),
            concurrency: DEFAULT_CONCURRENCY,
            max_failures: DEFAULT_MAX_FAILURES,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            deadline: Instant::now() + deadline,
        }
    }
}

/// Where an image in containerd came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// Already in containerd: nothing was pulled.
    Present,
    /// Pulled through CRI.
    Pulled,
    /// Not in containerd: failed, or the deadline passed first.
    Failed,
}

/// The outcome for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageResult {
    pub reference: String,
    pub source: Source,
    /// CRI's image ref (containerd: the config digest, `sha256:…`).
    pub digest: Option<String>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub seconds: f64,
}

impl ImageResult {
    fn from_status(s: &ImageStatus) -> ImageResult {
        ImageResult {
            reference: s.reference.clone(),
            source: match s.state {
                ImageState::Seeded => Source::Present,
                ImageState::Pulled => Source::Pulled,
                _ => Source::Failed,
            },
            digest: s.digest.clone(),
            attempts: s.attempts,
            last_error: s.last_error.clone(),
            seconds: s.seconds.unwrap_or(0.0),
        }
    }
}

/// Makes every image of `images` present in containerd (see the module
/// docs), reporting each one's progress to `status` as it goes (phases are
/// the caller's). Returns one result per distinct reference, in order; it
/// never fails as a whole: an unreachable containerd fails every image.
pub async fn ensure_images(
    images: &[String],
    credentials: Arc<Credentials>,
    options: &PullOptions,
    status: Arc<Mutex<StatusFile>>,
) -> Vec<ImageResult> {
    let mut wanted: Vec<String> = Vec::new();
    for r in images {
        if !wanted.contains(r) {
            wanted.push(r.clone());
        }
    }
    {
        let mut sf = lock(&status);
        for r in &wanted {
            sf.update_image(ImageStatus::pending(r));
        }
        sf.write_or_warn();
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(options.deadline);

    let channel = match connect(&options.address, options.deadline).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("{e}");
            return give_up_all(&wanted, &status, started, &|_| e.clone());
        }
    };
    let ctx = Arc::new(Ctx {
        cri: ImageServiceClient::new(channel),
        credentials,
        options: options.clone(),
        slots: Semaphore::new(options.concurrency.max(1)),
        status: status.clone(),
    });
    // Each task records its image's progress and outcome in the status,
    // which is where the results are read from.
    let mut tasks = tokio::task::JoinSet::new();
    for r in &wanted {
        tasks.spawn(ensure_one(ctx.clone(), r.clone()));
    }
    let all_done = tokio::time::timeout_at(deadline, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!("an image task ended abnormally: {e}");
            }
        }
    })
    .await
    .is_ok();
    if !all_done {
        // Cancels the pulls still running (their gRPC calls are dropped).
        tasks.shutdown().await;
    }
    give_up_all(&wanted, &status, started, &|s: &ImageStatus| {
        if all_done {
            return "internal error: the image's task ended abnormally".to_owned();
        }
        let doing = match s.state {
            ImageState::Pulling => "while pulling",
            ImageState::Pending => "before it could be pulled",
            _ => "before the next retry",
        };
        match &s.last_error {
            Some(e) => format!("the deadline passed {doing} (last error: {e})"),
            None => format!("the deadline passed {doing}"),
        }
    })
}

/// The results of `wanted` from the status; every image not yet seeded or
/// pulled is marked failed first, with `why` as its error and the whole run
/// (since `started`) as its time.
fn give_up_all(
    wanted: &[String],
    status: &Mutex<StatusFile>,
    started: Instant,
    why: &dyn Fn(&ImageStatus) -> String,
) -> Vec<ImageResult> {
    let mut sf = lock(status);
    let mut results = Vec::new();
    for r in wanted {
        let mut entry = sf
            .status()
            .image(r)
            .cloned()
            .unwrap_or_else(|| ImageStatus::pending(r));
        if !entry.state.is_final() {
            entry.last_error = Some(why(&entry));
            entry.state = ImageState::Failed;
            entry.next_retry_at = None;
            entry.seconds = Some(seconds(started));
            tracing::warn!(image = %r, attempts = entry.attempts, "failed: {}", entry.last_error.as_deref().unwrap_or(""));
            sf.update_image(entry.clone());
        }
        results.push(ImageResult::from_status(&entry));
    }
    sf.write_or_warn();
    results
}

fn lock(status: &Mutex<StatusFile>) -> std::sync::MutexGuard<'_, StatusFile> {
    // A panic elsewhere must not stop status reporting.
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// A channel to containerd, retried until `deadline` (at boot, containerd
/// may not have created its socket yet).
async fn connect(address: &Path, deadline: Instant) -> Result<Channel, String> {
    let mut wait = CONNECT_BACKOFF.0;
    loop {
        let tried = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline),
            containerd_client::connect(address),
        )
        .await;
        let e = match tried {
            Ok(Ok(channel)) => return Ok(channel),
            Ok(Err(e)) => error_chain(&e),
            Err(_) => "no answer".to_owned(),
        };
        let e = format!(
            "containerd at {} did not answer before the deadline: {e}",
            address.display()
        );
        // The last try is at the deadline itself: containerd may come up late.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(e);
        }
        tracing::debug!("{e}; retrying in {wait:?}");
        tokio::time::sleep(wait.min(left)).await;
        wait = (wait * 2).min(CONNECT_BACKOFF.1);
    }
}

/// An error and its sources (tonic's transport error alone says only
/// "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

struct Ctx {
    cri: ImageServiceClient<Channel>,
    credentials: Arc<Credentials>,
    options: PullOptions,
    slots: Semaphore,
    status: Arc<Mutex<StatusFile>>,
}

/// How much retrying an error deserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorClass {
    /// Might work next time: counts 1.
    Transient,
    /// The registry said no (not found, unauthorized): counts [`REFUSAL_WEIGHT`].
    Refused,
    /// Cannot work: fails the image at once.
    Fatal,
}

#[derive(Debug)]
struct AttemptError {
    class: ErrorClass,
    /// The registry refused the credentials (or their absence).
    auth: bool,
    message: String,
}

impl AttemptError {
    fn from_cri(call: &str, status: &tonic::Status) -> AttemptError {
        let (class, auth) = classify(status.code(), status.message());
        AttemptError {
            class,
            auth,
            message: format!("CRI {call}: {:?}: {}", status.code(), status.message()),
        }
    }
}

/// Sorts a CRI error. containerd reports a missing image as NotFound, but
/// a refused login only in its message (the registry's status line or
/// error code), so both are looked at.
fn classify(code: Code, message: &str) -> (ErrorClass, bool) {
    let m = message.to_ascii_lowercase();
    let auth = [
        "unauthorized",
        "forbidden",
        "access denied",
        "denied:",
        "authorization failed",
    ]
    .iter()
    .any(|s| m.contains(s));
    match code {
        Code::InvalidArgument | Code::Unimplemented => (ErrorClass::Fatal, false),
        Code::Unauthenticated | Code::PermissionDenied => (ErrorClass::Refused, true),
        _ if auth => (ErrorClass::Refused, true),
        Code::NotFound => (ErrorClass::Refused, false),
        _ if m.contains(": not found") => (ErrorClass::Refused, false),
        _ => (ErrorClass::Transient, false),
    }
}

enum Found {
    Present(String),
    Pulled(String),
}

fn seconds(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}

/// A random duration in `[0, max]` (the jitter needs no cryptographic
/// randomness: std's per-process random hash keys are enough).
fn jitter(max: Duration) -> Duration {
    use std::hash::BuildHasher as _;
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    max.mul_f64((r >> 11) as f64 / (1u64 << 53) as f64)
}

impl Ctx {
    /// Records `entry` and rewrites the status file: a few small
    /// synchronous writes per image (the file normally lives on tmpfs under
    /// /run), not worth a hop to the blocking pool.
    fn report(&self, entry: &ImageStatus) {
        let mut sf = lock(&self.status);
        sf.update_image(entry.clone());
        sf.write_or_warn();
    }
}

/// The wait after `attempts` attempts: full jitter under
/// `initial * 2^(attempts-1)`, capped at `max`.
fn backoff(initial: Duration, max: Duration, attempts: u32) -> Duration {
    let exp = 2u32.saturating_pow(attempts.saturating_sub(1));
    jitter(initial.saturating_mul(exp).min(max))
}

/// Brings one image to a final state (`seeded`, `pulled` or `failed`),
/// reporting every step.
async fn ensure_one(ctx: Arc<Ctx>, reference: String) {
    let started = Instant::now();
    let mut entry = ImageStatus::pending(&reference);
    let finish = |entry: &mut ImageStatus, state, digest, error: Option<String>| {
        entry.state = state;
        entry.digest = digest;
        entry.last_error = match state {
            ImageState::Failed => error.or(entry.last_error.take()),
            _ => None,
        };
        entry.next_retry_at = None;
        entry.seconds = Some(seconds(started));
        match state {
            ImageState::Failed => tracing::warn!(
                image = %entry.reference, attempts = entry.attempts,
                "failed: {}", entry.last_error.as_deref().unwrap_or("")
            ),
            _ => tracing::info!(
                image = %entry.reference, attempts = entry.attempts, state = ?state,
                digest = entry.digest.as_deref().unwrap_or(""), "ready"
            ),
        }
        ctx.report(entry);
    };
    // kubelet looks credentials up by the normalised name without tag.
    let name = match reference.parse::<Reference>() {
        Ok(r) => r.name(),
        Err(e) => return finish(&mut entry, ImageState::Failed, None, Some(e.to_string())),
    };
    let mut failures = 0u32;
    loop {
        let e = match try_once(&ctx, &reference, &name, &mut entry, started).await {
            Ok(Found::Present(id)) => {
                return finish(&mut entry, ImageState::Seeded, Some(id), None);
            }
            Ok(Found::Pulled(id)) => return finish(&mut entry, ImageState::Pulled, Some(id), None),
            Err(e) => e,
        };
        failures = failures.saturating_add(match e.class {
            ErrorClass::Transient => 1,
            ErrorClass::Refused => REFUSAL_WEIGHT,
            ErrorClass::Fatal => u32::MAX,
        });
        if failures >= ctx.options.max_failures.max(1) {
            let why = if e.class == ErrorClass::Fatal {
                e.message
            } else {
                let n = entry.attempts;
                let s = if n == 1 { "" } else { "s" };
                format!("{} (gave up after {n} attempt{s})", e.message)
            };
            return finish(&mut entry, ImageState::Failed, None, Some(why));
        }
        let wait = backoff(
            ctx.options.initial_backoff,
            ctx.options.max_backoff,
            entry.attempts,
        );
        if Instant::now() + wait >= ctx.options.deadline {
            let why = format!("{} (the deadline passes before the next retry)", e.message);
            return finish(&mut entry, ImageState::Failed, None, Some(why));
        }
        tracing::info!(image = %reference, attempts = entry.attempts, "retrying in {wait:.1?}: {}", e.message);
        entry.state = ImageState::Retrying;
        entry.last_error = Some(e.message);
        entry.next_retry_at = Some(coral_seed::time::rfc3339_of(SystemTime::now() + wait));
        entry.seconds = Some(seconds(started));
        ctx.report(&entry);
        tokio::time::sleep(wait).await;
    }
}

/// One attempt: present already, or pulled now (counted in `entry.attempts`
/// when it gets as far as a pull, or fails before one).
async fn try_once(
    ctx: &Ctx,
    reference: &str,
    name: &str,
    entry: &mut ImageStatus,
    started: Instant,
) -> Result<Found, AttemptError> {
    let mut cri = ctx.cri.clone();
    match present(&mut cri, reference).await {
        Ok(Some(id)) => return Ok(Found::Present(id)),
        Ok(None) => {}
        Err(e) => {
            entry.attempts += 1;
            return Err(e);
        }
    }
    let _slot = ctx
        .slots
        .acquire()
        .await
        .expect("the semaphore is never closed");
    entry.attempts += 1;
    entry.state = ImageState::Pulling;
    entry.next_retry_at = None;
    entry.seconds = Some(seconds(started));
    ctx.report(entry);
    pull(ctx, &mut cri, reference, name)
        .await
        .map(Found::Pulled)
}

/// CRI's image ref for `reference` if containerd has it.
async fn present(
    cri: &mut ImageServiceClient<Channel>,
    reference: &str,
) -> Result<Option<String>, AttemptError> {
    let resp = cri
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: reference.to_owned(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .map_err(|s| AttemptError::from_cri("ImageStatus", &s))?;
    Ok(resp.into_inner().image.map(|i| i.id))
}

/// `PullImage` with each credential found for the image until one is
/// accepted; the first error that is not a refused login ends the attempt.
async fn pull(
    ctx: &Ctx,
    cri: &mut ImageServiceClient<Channel>,
    reference: &str,
    name: &str,
) -> Result<String, AttemptError> {
    let lookup = ctx.credentials.lookup(name).await;
    let candidates: Vec<Option<&RegistryCredential>> = if lookup.credentials.is_empty() {
        vec![None]
    } else {
        lookup.credentials.iter().map(Some).collect()
    };
    let mut last = None;
    let mut tried = Vec::new();
    for cred in candidates {
        let request = cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: reference.to_owned(),
                ..Default::default()
            }),
            // No server address: containerd then offers the credential to
            // the image's registry (an address it disagrees with drops it).
            auth: cred.map(|c| cri::AuthConfig {
                username: c.username.clone(),
                password: c.password.clone(),
                ..Default::default()
            }),
            sandbox_config: None,
        };
        tried.push(cred.map_or_else(|| "anonymous".to_owned(), |c| c.origin.to_string()));
        match cri.pull_image(request).await {
            Ok(resp) => return Ok(resp.into_inner().image_ref),
            Err(status) => {
                let e = AttemptError::from_cri("PullImage", &status);
                let next = e.auth;
                last = Some(e);
                if !next {
                    break;
                }
            }
        }
    }
    let mut e = last.expect("at least one pull was tried");
    if e.auth {
        ctx.credentials.forget(name).await;
    }
    if tried.len() > 1 {
        e.message = format!(
            "{} (refused with each credential: {})",
            e.message,
            tried.join(", ")
        );
    } else if let Some(origin) = tried.first().filter(|_| e.auth) {
        e.message = format!("{} (credentials: {origin})", e.message);
    }
    if !lookup.problems.is_empty() {
        e.message = format!("{} ({})", e.message, lookup.problems.join("; "));
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_what_retrying_can_do() {
        use ErrorClass::*;
        let c = classify;
        // containerd's own words for a missing tag and a refused login.
        assert_eq!(
            c(
                Code::NotFound,
                "failed to pull and unpack image \"r/x:1\": failed to resolve reference \"r/x:1\": r/x:1: not found"
            ),
            (Refused, false)
        );
        assert_eq!(
            c(
                Code::Unknown,
                "failed to resolve reference \"r/x:1\": r/x:1: not found"
            ),
            (Refused, false)
        );
        assert_eq!(
            c(
                Code::Unknown,
                "failed to resolve reference \"r/x:1\": pulling from host r failed with status code [manifests 1]: 401 Unauthorized"
            ),
            (Refused, true)
        );
        assert_eq!(
            c(
                Code::Unknown,
                "failed to authorize: failed to fetch anonymous token: unexpected status: 403 Forbidden"
            ),
            (Refused, true)
        );
        assert_eq!(
            c(
                Code::Unknown,
                "failed to do request: Head \"http://127.0.0.1:1/v2/x/manifests/1\": dial tcp 127.0.0.1:1: connect: connection refused"
            ),
            (Transient, false)
        );
        assert_eq!(c(Code::Unavailable, "transport error"), (Transient, false));
        assert_eq!(
            c(Code::InvalidArgument, "invalid reference"),
            (Fatal, false)
        );
        assert_eq!(
            c(
                Code::Unimplemented,
                "unknown service runtime.v1.ImageService"
            ),
            (Fatal, false)
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_cap() {
        let ctx_backoff = |initial: Duration, max: Duration, attempts: u32| {
            (0..200)
                .map(|_| backoff(initial, max, attempts))
                .collect::<Vec<_>>()
        };
        let samples = ctx_backoff(Duration::from_secs(1), Duration::from_secs(600), 3);
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(4)));
        assert!(
            samples.iter().any(|d| *d > Duration::from_secs(2)),
            "spread over the whole range"
        );
        assert!(samples.iter().any(|d| *d < Duration::from_secs(2)));
        let capped = ctx_backoff(Duration::from_secs(1), Duration::from_secs(600), 40);
        assert!(capped.iter().all(|d| *d <= Duration::from_secs(600)));
    }
}
