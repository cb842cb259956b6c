//! Talking to OCI registries: manifests and blobs, with timeouts, retries
//! (exponential backoff with full jitter) and byte-exact verification.
//!
//! Built on `oci-client` for the protocol and its auth flows (anonymous,
//! basic, bearer token). We never use its `pull()`: it holds whole layers in
//! memory. Blobs stream to a temporary file that is hashed while written and
//! renamed into place only once its digest matches; an interrupted transfer
//! resumes with a range request from the bytes already verified in memory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coral_seed::{Digest, Reference};
use futures_util::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::auth::Credentials;

/// Manifests and configs larger than this are refused (containerd's limit for
/// manifests is 4 MiB too); it keeps a hostile registry from filling memory.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

pub const MEDIA_TYPES_MANIFEST: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a uniformly random wait in [0, min(max, initial * 2^attempt)].
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        ceiling.mul_f64(jitter())
    }
}

/// A number in [0, 1) that differs between calls and processes (no RNG crate
/// needed for this).
fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ COUNTER
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .rotate_left(17)
        ^ (std::process::id() as u64) << 32;
    // splitmix64
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// `HOST:PORT`s spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// PEM files of extra CAs to trust.
    pub ca_certs: Vec<PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for any byte of a response: a stalled transfer fails
    /// after this long and is retried.
    pub read_timeout: Duration,
    pub retry: RetryPolicy,
    /// Parallel blob downloads, across all images.
    pub connections: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: Vec::new(),
            ca_certs: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            connections: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{what}: the registry refused the request: {detail}")]
    Refused { what: String, detail: String },
    #[error("{what}: not authorized by the registry ({detail}); check --registry-config")]
    Unauthorized { what: String, detail: String },
    #[error("{what}: gave up after {attempts} attempts in {elapsed:.1?}; last error: {last}")]
    Exhausted {
        what: String,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error(
        "{what}: digest mismatch: expected {expected}, the registry sent content hashing to {actual}"
    )]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "{what}: size mismatch: the descriptor says {expected} bytes, the registry sent {actual}"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{what}: {size} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit for manifests and configs"
    )]
    TooLarge { what: String, size: usize },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("registry client set-up: {0}")]
    Setup(String),
}

/// What one failed attempt means for the next.
enum Failure {
    /// Worth another try (5xx, 429, resets, timeouts, short bodies).
    Transient(String),
    /// Trying again cannot help.
    Fatal(RegistryError),
}

fn classify(what: &str, e: OciDistributionError) -> Failure {
    use OciDistributionError as E;
    match e {
        E::ServerError { code, message, .. } => {
            let msg = format!("HTTP {code}: {}", message.trim());
            if code >= 500 || code == 429 || code == 408 {
                Failure::Transient(msg)
            } else if code == 401 || code == 403 {
                Failure::Fatal(RegistryError::Unauthorized {
                    what: what.into(),
                    detail: msg,
                })
            } else {
                Failure::Fatal(RegistryError::Refused {
                    what: what.into(),
                    detail: msg,
                })
            }
        }
        E::RegistryError { envelope, .. } => {
            let text = envelope.to_string();
            if text.to_ascii_uppercase().contains("TOOMANYREQUESTS") {
                Failure::Transient(text)
            } else if text.to_ascii_uppercase().contains("UNAUTHORIZED")
                || text.to_ascii_uppercase().contains("DENIED")
            {
                Failure::Fatal(RegistryError::Unauthorized {
                    what: what.into(),
                    detail: text,
                })
            } else {
                Failure::Fatal(RegistryError::Refused {
                    what: what.into(),
                    detail: text,
                })
            }
        }
        E::UnauthorizedError { url } => Failure::Fatal(RegistryError::Unauthorized {
            what: what.into(),
            detail: format!("HTTP 401 from {url}"),
        }),
        E::AuthenticationFailure(m) => Failure::Fatal(RegistryError::Unauthorized {
            what: what.into(),
            detail: m,
        }),
        E::RequestError(r) => {
            if r.is_builder() {
                Failure::Fatal(RegistryError::Setup(r.to_string()))
            } else {
                Failure::Transient(error_chain(&r))
            }
        }
        E::IoError(io) => Failure::Transient(error_chain(&io)),
        other => {
            let text = other.to_string();
            // oci-client reports a failed token request this way.
            if text.contains("401") || text.contains("403") {
                Failure::Fatal(RegistryError::Unauthorized {
                    what: what.into(),
                    detail: text,
                })
            } else {
                Failure::Transient(text)
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

pub struct RegistryClient {
    client: oci_client::Client,
    credentials: Credentials,
    options: RegistryOptions,
    connections: Arc<Semaphore>,
}

impl RegistryClient {
    /// How many registry connections are open at once at most.
    pub fn connections(&self) -> usize {
        self.options.connections.max(1)
    }
}

/// A fetched manifest (or index) and what it is.
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub digest: Digest,
    pub media_type: String,
}

impl RegistryClient {
    pub fn new(
        options: RegistryOptions,
        credentials: Credentials,
    ) -> Result<RegistryClient, RegistryError> {
        let mut extra = Vec::new();
        for path in &options.ca_certs {
            let data = std::fs::read(path).map_err(|e| {
                RegistryError::Setup(format!("reading CA certificate {}: {e}", path.display()))
            })?;
            extra.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let config = ClientConfig {
            protocol: if options.insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(options.insecure.clone())
            },
            extra_root_certificates: extra,
            // We pick platforms ourselves, variant included.
            platform_resolver: None,
            read_timeout: Some(options.read_timeout),
            connect_timeout: Some(options.connect_timeout),
            user_agent: concat!("coral-builder/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        Ok(RegistryClient {
            client: oci_client::Client::new(config),
            credentials,
            connections: Arc::new(Semaphore::new(options.connections.max(1))),
            options,
        })
    }

    fn oci_ref(r: &Reference, digest: Option<&Digest>) -> oci_client::Reference {
        match (digest.or(r.digest()), r.tag()) {
            (Some(d), _) => oci_client::Reference::with_digest(
                r.registry().to_owned(),
                r.repository().to_owned(),
                d.to_string(),
            ),
            (None, Some(t)) => oci_client::Reference::with_tag(
                r.registry().to_owned(),
                r.repository().to_owned(),
                t.to_owned(),
            ),
            (None, None) => oci_client::Reference::with_tag(
                r.registry().to_owned(),
                r.repository().to_owned(),
                "latest".to_owned(),
            ),
        }
    }

    async fn auth_for(&self, r: &Reference) -> Result<RegistryAuth, RegistryError> {
        self.credentials
            .lookup(r.registry())
            .await
            .map_err(|e| RegistryError::Setup(format!("credentials for {}: {e}", r.registry())))
    }

    /// Runs `op` until it succeeds, fails for good, or the retries run out.
    async fn with_retries<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(msg)) => {
                    if attempt >= self.options.retry.retries {
                        return Err(RegistryError::Exhausted {
                            what: what.into(),
                            attempts: attempt + 1,
                            elapsed: started.elapsed(),
                            last: msg,
                        });
                    }
                    let wait = self.options.retry.backoff(attempt);
                    tracing::warn!(
                        target: "coral::registry",
                        "{what}: attempt {} failed ({msg}); retrying in {wait:.1?}",
                        attempt + 1
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Fetches a manifest or index by tag or digest. The digest returned is
    /// the SHA-256 of the bytes received; when the reference (or `digest`)
    /// pins one, the bytes must match it.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        digest: Option<&Digest>,
    ) -> Result<FetchedManifest, RegistryError> {
        let oref = Self::oci_ref(r, digest);
        let what = match digest {
            Some(d) => format!("{} manifest {d}", r.name()),
            None => r.to_string(),
        };
        let auth = self.auth_for(r).await?;
        let pinned = digest.or(r.digest()).cloned();
        let (bytes, _) = self
            .with_retries(&what, |_| {
                let (oref, auth, what) = (&oref, &auth, &what);
                async move {
                    let _permit = self.connections.acquire().await.expect("never closed");
                    self.client
                        .pull_manifest_raw(oref, auth, MEDIA_TYPES_MANIFEST)
                        .await
                        .map_err(|e| classify(what, e))
                }
            })
            .await?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                what,
                size: bytes.len(),
            });
        }
        let actual = Digest::sha256_of(&bytes);
        if let Some(expected) = pinned
            && expected != actual
        {
            return Err(RegistryError::DigestMismatch {
                what,
                expected,
                actual,
            });
        }
        let media_type = media_type_of(&bytes).ok_or_else(|| RegistryError::Refused {
            what: what.clone(),
            detail: "the manifest is not JSON with a mediaType this builder understands \
                     (OCI or Docker schema 2 image manifest or index)"
                .into(),
        })?;
        Ok(FetchedManifest {
            bytes,
            digest: actual,
            media_type,
        })
    }

    /// Fetches a small blob (an image config) into memory, verified.
    pub async fn fetch_small_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
    ) -> Result<Bytes, RegistryError> {
        let what = format!("{} blob {digest}", r.name());
        if size > MAX_MANIFEST_BYTES as u64 {
            return Err(RegistryError::TooLarge {
                what,
                size: size as usize,
            });
        }
        let oref = Self::oci_ref(r, None);
        let auth = self.auth_for(r).await?;
        self.client
            .store_auth_if_needed(oref.resolve_registry(), &auth)
            .await;
        let bytes = self
            .with_retries(&what, |_| {
                let (oref, what) = (&oref, &what);
                async move {
                    let _permit = self.connections.acquire().await.expect("never closed");
                    let mut out = Vec::with_capacity(size as usize);
                    let mut stream = self
                        .client
                        .pull_blob_stream(oref, digest.to_string().as_str())
                        .await
                        .map_err(|e| classify(what, e))?;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| {
                            if out.len() as u64 == size {
                                // The whole body arrived: this is oci-client's digest check.
                                Failure::Transient(format!("verification: {e}"))
                            } else {
                                Failure::Transient(format!("reading the body: {e}"))
                            }
                        })?;
                        if (out.len() + chunk.len()) as u64 > size {
                            return Err(Failure::Fatal(RegistryError::SizeMismatch {
                                what: what.clone(),
                                expected: size,
                                actual: (out.len() + chunk.len()) as u64,
                            }));
                        }
                        out.extend_from_slice(&chunk);
                    }
                    if (out.len() as u64) < size {
                        return Err(Failure::Transient(format!(
                            "body ended after {} of {size} bytes",
                            out.len()
                        )));
                    }
                    Ok(Bytes::from(out))
                }
            })
            .await?;
        let actual = Digest::sha256_of(&bytes);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Streams a blob to `dest`: written to `partial` (created or truncated),
    /// hashed as it arrives, resumed with a range request after a transient
    /// failure, and renamed to `dest` only once size and digest match.
    /// `progress` gets the number of new bytes as they arrive (and a negative
    /// correction when a transfer restarts from zero). `feed` hears when the
    /// partial file exists and, every [`FEED_STEP`] bytes, how much of it is
    /// written, so an extraction can read it as it arrives.
    #[allow(clippy::too_many_arguments)]
    pub async fn fetch_blob_to_file(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        partial: &Path,
        dest: &Path,
        progress: &(dyn Fn(i64) + Send + Sync),
        feed: Option<&crate::feed::BlobFeed>,
    ) -> Result<u64, RegistryError> {
        let what = format!("{} blob {digest}", r.name());
        let io_err = |source: std::io::Error| RegistryError::Io {
            what: what.clone(),
            source,
        };
        let oref = Self::oci_ref(r, None);
        let auth = self.auth_for(r).await?;
        self.client
            .store_auth_if_needed(oref.resolve_registry(), &auth)
            .await;

        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(partial)
            .await
            .map_err(io_err)?;
        if let Some(f) = feed {
            f.start();
        }
        struct State {
            hasher: Sha256,
            written: u64,
            /// Written since the feed last heard.
            unpublished: u64,
        }
        let mut state = State {
            hasher: Sha256::new(),
            written: 0,
            unpublished: 0,
        };
        let state_ref = &mut state;
        let file_ref = &mut file;
        let what_ref = &what;
        let oref_ref = &oref;

        let attempt_fn =
            async |state: &mut State, file: &mut tokio::fs::File| -> Result<(), Failure> {
                let _permit = self.connections.acquire().await.expect("never closed");
                let desc = digest.to_string();
                let mut stream = if state.written == 0 {
                    self.client
                        .pull_blob_stream(oref_ref, desc.as_str())
                        .await
                        .map_err(|e| classify(what_ref, e))?
                } else {
                    match self
                        .client
                        .pull_blob_stream_partial(oref_ref, desc.as_str(), state.written, None)
                        .await
                        .map_err(|e| classify(what_ref, e))?
                    {
                        BlobResponse::Partial(s) => s,
                        BlobResponse::Full(s) => {
                            // The registry ignored the range: start over.
                            progress(-(state.written as i64));
                            if let Some(f) = feed {
                                f.advance(0);
                            }
                            state.hasher = Sha256::new();
                            state.written = 0;
                            state.unpublished = 0;
                            file.set_len(0)
                                .await
                                .map_err(|e| Failure::Fatal(io_fatal(what_ref, e)))?;
                            file.rewind()
                                .await
                                .map_err(|e| Failure::Fatal(io_fatal(what_ref, e)))?;
                            s
                        }
                    }
                };
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(c) => c,
                        Err(e) if state.written == size => {
                            // Every byte arrived and oci-client's own check
                            // failed: our hash below says what arrived.
                            tracing::debug!("{what_ref}: stream verification: {e}");
                            break;
                        }
                        Err(e) => {
                            return Err(Failure::Transient(format!(
                                "reading the body after {} of {size} bytes: {}",
                                state.written,
                                error_chain(&e)
                            )));
                        }
                    };
                    if state.written + chunk.len() as u64 > size {
                        return Err(Failure::Fatal(RegistryError::SizeMismatch {
                            what: what_ref.clone(),
                            expected: size,
                            actual: state.written + chunk.len() as u64,
                        }));
                    }
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| Failure::Fatal(io_fatal(what_ref, e)))?;
                    state.hasher.update(&chunk);
                    state.written += chunk.len() as u64;
                    progress(chunk.len() as i64);
                    state.unpublished += chunk.len() as u64;
                    if let Some(f) = feed
                        && state.unpublished >= FEED_STEP
                    {
                        // tokio's File writes in the background: flushed,
                        // the bytes are in the file for a reader.
                        file.flush()
                            .await
                            .map_err(|e| Failure::Fatal(io_fatal(what_ref, e)))?;
                        f.advance(state.written);
                        state.unpublished = 0;
                    }
                }
                if state.written < size {
                    return Err(Failure::Transient(format!(
                        "body ended after {} of {size} bytes",
                        state.written
                    )));
                }
                Ok(())
            };

        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            match attempt_fn(state_ref, file_ref).await {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(msg)) => {
                    if attempt >= self.options.retry.retries {
                        return Err(RegistryError::Exhausted {
                            what: what.clone(),
                            attempts: attempt + 1,
                            elapsed: started.elapsed(),
                            last: msg,
                        });
                    }
                    let wait = self.options.retry.backoff(attempt);
                    tracing::warn!(
                        target: "coral::registry",
                        "{what}: attempt {} failed ({msg}); resuming at byte {} in {wait:.1?}",
                        attempt + 1,
                        state_ref.written
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
        let actual = Digest::from_sha256(state.hasher.finalize().into());
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.clone(),
                actual,
            });
        }
        file.sync_all().await.map_err(io_err)?;
        drop(file);
        tokio::fs::rename(partial, dest).await.map_err(io_err)?;
        Ok(size)
    }
}

/// How often a blob's download tells its feed how far it is.
pub const FEED_STEP: u64 = 4 << 20;

fn io_fatal(what: &str, source: std::io::Error) -> RegistryError {
    RegistryError::Io {
        what: what.into(),
        source,
    }
}

/// The media type a manifest or index declares (`mediaType`), or for an OCI
/// one that omits it, the one its shape implies.
pub fn media_type_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    match (p.media_type, p.schema_version) {
        (Some(mt), _) => Some(mt),
        (None, Some(2)) if p.manifests.is_some() => {
            Some("application/vnd.oci.image.index.v1+json".into())
        }
        (None, Some(2)) if p.layers.is_some() => {
            Some("application/vnd.oci.image.manifest.v1+json".into())
        }
        (None, Some(1)) => Some("application/vnd.docker.distribution.manifest.v1+json".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let p = RetryPolicy {
            retries: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        };
        for attempt in 0..12 {
            let ceiling = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(2));
            for _ in 0..50 {
                assert!(p.backoff(attempt) <= ceiling, "attempt {attempt}");
            }
        }
        // Full jitter spreads waits: 50 draws are not all the same.
        let draws: std::collections::BTreeSet<_> = (0..50).map(|_| p.backoff(5)).collect();
        assert!(draws.len() > 10, "{draws:?}");
    }

    #[test]
    fn media_type_from_declared_or_shape() {
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#).as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(media_type_of(b"<html>"), None);
    }
}
