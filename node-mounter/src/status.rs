//! The node's status file: one JSON document that says where the mounter is
//! (`phase`) and what became of every wanted image, rewritten as things
//! progress so that an operator (or the node agent) reading it mid-boot sees
//! the current state. Every write is atomic (a temporary file in the same
//! directory, fsynced, then renamed over the old one), so a reader never
//! sees half a document.
//!
//! ```json
//! {
//!   "phase": "pulling",
//!   "startedAt": "2025-01-01T00:00:00Z",
//!   "updatedAt": "2025-01-01T00:00:07Z",
//!   "images": [
//!     {"reference": "ghcr.io/org/app:1", "state": "seeded", "digest": "sha256:…", "attempts": 0},
//!     {"reference": "ghcr.io/org/big:2", "state": "retrying", "attempts": 1,
//!      "lastError": "…connection refused", "nextRetryAt": "2025-01-01T00:00:09Z", "seconds": 1.2}
//!   ]
//! }
//! ```
//!
//! The status file never holds a secret: errors written here come from
//! containerd or from coral, never from a credential.
//!
//! The exit codes of the commands that seed images are defined here, beside
//! the states they summarise.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Every wanted image is in containerd without a pull by coral's fallback
/// (imported from the seed volume, or already there). Also the success code
/// of `prefetch`, whose whole point is pulling: see [`exit_code`].
pub const EXIT_ALL_SEEDED: u8 = 0;
/// Every wanted image is in containerd, some of them pulled through CRI
/// because the volume lacked them or they failed verification.
pub const EXIT_SOME_PULLED: u8 = 10;
/// At least one wanted image is not in containerd (it failed, or the
/// deadline passed first); kubelet will pull it as it would without coral.
pub const EXIT_FAILED: u8 = 20;

/// Where the mounter is in a node's bootstrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Finding and mounting the seed volume.
    Mounting,
    /// Registering the volume's content with containerd.
    Importing,
    /// Pulling images through CRI (fallback or prefetch).
    Pulling,
    /// Finished: every image is seeded or pulled.
    Done,
    /// Finished, with at least one image missing or an error (see `message`).
    Failed,
}

/// What became of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ImageState {
    /// Not looked at yet.
    Pending,
    /// A CRI pull is under way.
    Pulling,
    /// An attempt failed; the next one starts at `nextRetryAt`.
    Retrying,
    /// In containerd without a pull by coral: imported from the volume, or
    /// already present.
    Seeded,
    /// Pulled through CRI by coral's fallback.
    Pulled,
    /// Given up on: too many failures, a refusal that retrying cannot fix,
    /// or the deadline (`lastError` says which).
    Failed,
}

impl ImageState {
    /// Whether nothing more will happen to the image in this run.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Seeded | Self::Pulled | Self::Failed)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// The reference as it was asked for.
    pub reference: String,
    pub state: ImageState,
    /// The image as containerd names it once it is there (CRI's image ref:
    /// the config digest, `sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// CRI pulls started for it (0 for an image that was already there).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Time spent on it so far, from its first look to its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// When the next attempt starts (RFC 3339), while `retrying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<String>,
}

impl ImageStatus {
    pub fn pending(reference: impl Into<String>) -> ImageStatus {
        ImageStatus {
            reference: reference.into(),
            state: ImageState::Pending,
            digest: None,
            attempts: 0,
            last_error: None,
            seconds: None,
            next_retry_at: None,
        }
    }
}

/// The document the status file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub phase: Phase,
    /// When this run started (RFC 3339).
    pub started_at: String,
    /// When the file was last written (RFC 3339).
    pub updated_at: String,
    /// Why the phase is what it is, when that needs saying (an error, a
    /// skipped step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The code the command exits with, once it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u8>,
    /// No seed volume was found (none to mount, or none mounted where the
    /// import looked): such a node gets its images by other means (the
    /// node agent's prefetch).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_volume: bool,
    /// Every wanted image, in the order they were first mentioned.
    #[serde(default)]
    pub images: Vec<ImageStatus>,
}

impl Status {
    pub fn image(&self, reference: &str) -> Option<&ImageStatus> {
        self.images.iter().find(|i| i.reference == reference)
    }
}

/// [`EXIT_FAILED`] if any image is not seeded or pulled, else
/// [`EXIT_SOME_PULLED`] if any was pulled, else [`EXIT_ALL_SEEDED`].
pub fn exit_code(images: &[ImageStatus]) -> u8 {
    if images
        .iter()
        .any(|i| !matches!(i.state, ImageState::Seeded | ImageState::Pulled))
    {
        EXIT_FAILED
    } else if images.iter().any(|i| i.state == ImageState::Pulled) {
        EXIT_SOME_PULLED
    } else {
        EXIT_ALL_SEEDED
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("writing status file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading status file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("status file {path} is not a coral status document: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// A status document and the file it is written to. Changes are made in
/// memory ([`set_phase`](Self::set_phase), [`update_image`](Self::update_image))
/// and reach the file on [`write`](Self::write).
#[derive(Debug)]
pub struct StatusFile {
    path: Option<PathBuf>,
    status: Status,
}

impl StatusFile {
    /// A new run's status (phase `mounting`, no images), to be written to `path`.
    pub fn new(path: impl Into<PathBuf>) -> StatusFile {
        StatusFile {
            path: Some(path.into()),
            status: Self::fresh(),
        }
    }

    /// A status kept in memory only, for runs without `--status-file`:
    /// [`write`](Self::write) does nothing.
    pub fn in_memory() -> StatusFile {
        StatusFile {
            path: None,
            status: Self::fresh(),
        }
    }

    fn fresh() -> Status {
        let now = coral_seed::time::rfc3339_of(SystemTime::now());
        Status {
            phase: Phase::Mounting,
            started_at: now.clone(),
            updated_at: now,
            message: None,
            exit_code: None,
            no_volume: false,
            images: Vec::new(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn set_phase(&mut self, phase: Phase) {
        self.status.phase = phase;
    }

    pub fn set_message(&mut self, message: Option<String>) {
        self.status.message = message;
    }

    pub fn set_exit_code(&mut self, code: u8) {
        self.status.exit_code = Some(code);
    }

    pub fn set_no_volume(&mut self, no_volume: bool) {
        self.status.no_volume = no_volume;
    }

    /// Replaces the entry for `image.reference`, or appends it.
    pub fn update_image(&mut self, image: ImageStatus) {
        match self
            .status
            .images
            .iter_mut()
            .find(|i| i.reference == image.reference)
        {
            Some(slot) => *slot = image,
            None => self.status.images.push(image),
        }
    }

    /// Stamps `updatedAt` and replaces the file atomically.
    pub fn write(&mut self) -> Result<(), StatusError> {
        self.status.updated_at = coral_seed::time::rfc3339_of(SystemTime::now());
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = serde_json::to_vec_pretty(&self.status).expect("status serialises");
        text.push(b'\n');
        write_atomically(path, &text).map_err(|source| StatusError::Write {
            path: path.clone(),
            source,
        })
    }

    /// [`write`](Self::write), logging a failure instead of returning it:
    /// the status file is a report, and failing to write it must never stop
    /// the work it reports on.
    pub fn write_or_warn(&mut self) {
        if let Err(e) = self.write() {
            tracing::warn!("{e}");
        }
    }

    /// Reads a status file (for whoever reports it: the node agent, tests).
    pub fn read(path: &Path) -> Result<Status, StatusError> {
        let text = std::fs::read(path).map_err(|source| StatusError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| StatusError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

/// `path.<pid>.tmp` beside `path`, fsynced, renamed over `path`, and the
/// directory fsynced so the rename itself survives a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_the_file_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/coral/status.json");
        let mut sf = StatusFile::new(&path);
        sf.set_phase(Phase::Pulling);
        sf.update_image(ImageStatus::pending("a:1"));
        sf.update_image(ImageStatus::pending("b:1"));
        sf.write().unwrap();
        let first = StatusFile::read(&path).unwrap();
        assert_eq!(first.phase, Phase::Pulling);
        assert_eq!(first.images.len(), 2);

        sf.update_image(ImageStatus {
            state: ImageState::Pulled,
            digest: Some("sha256:abc".into()),
            attempts: 2,
            seconds: Some(1.5),
            ..ImageStatus::pending("a:1")
        });
        sf.set_phase(Phase::Done);
        sf.set_exit_code(exit_code(&sf.status().images));
        sf.write().unwrap();
        let second = StatusFile::read(&path).unwrap();
        assert_eq!(second, *sf.status());
        assert_eq!(second.images[0].state, ImageState::Pulled);
        assert_eq!(second.images.len(), 2, "updated in place, not appended");
        // Only the status file is left: no temporary files beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("status.json")]);
    }

    #[test]
    fn json_uses_the_documented_names() {
        let mut sf = StatusFile::in_memory();
        sf.update_image(ImageStatus {
            state: ImageState::Retrying,
            attempts: 1,
            last_error: Some("boom".into()),
            next_retry_at: Some("2025-01-01T00:00:00Z".into()),
            ..ImageStatus::pending("r")
        });
        sf.write().unwrap();
        let v = serde_json::to_value(sf.status()).unwrap();
        assert_eq!(v["phase"], "mounting");
        assert!(v["startedAt"].is_string() && v["updatedAt"].is_string());
        let img = &v["images"][0];
        assert_eq!(img["state"], "retrying");
        assert_eq!(img["lastError"], "boom");
        assert_eq!(img["nextRetryAt"], "2025-01-01T00:00:00Z");
        assert!(img.get("digest").is_none(), "absent values are left out");
    }

    #[test]
    fn exit_codes_summarise_image_states() {
        let with = |states: &[ImageState]| {
            states
                .iter()
                .enumerate()
                .map(|(n, s)| ImageStatus {
                    state: *s,
                    ..ImageStatus::pending(n.to_string())
                })
                .collect::<Vec<_>>()
        };
        use ImageState::*;
        assert_eq!(exit_code(&with(&[])), EXIT_ALL_SEEDED);
        assert_eq!(exit_code(&with(&[Seeded, Seeded])), EXIT_ALL_SEEDED);
        assert_eq!(exit_code(&with(&[Seeded, Pulled])), EXIT_SOME_PULLED);
        assert_eq!(exit_code(&with(&[Pulled, Failed])), EXIT_FAILED);
        assert_eq!(exit_code(&with(&[Seeded, Retrying])), EXIT_FAILED);
    }
}
