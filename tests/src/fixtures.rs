//! The fixture image corpus: real images built without Docker by
//! `tests/fixtures/build-corpus` (a Debian minbase rootfs, a multi-layer image
//! full of edge cases in gzip, zstd and uncompressed form, a multi-platform
//! index, a tiny image), cached by recipe hash, and a registry storage
//! directory with all of it pushed (cached by content hash), so a test gets a serving registry in
//! well under a second.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::cache::{FileLock, cache_dir, repo_root};
use crate::process::run;
use crate::registry::{Registry, RegistryOptions};

/// How to run a fixture image and what it must print.
#[derive(Debug, Clone, Deserialize)]
pub struct RunCheck {
    pub argv: Vec<String>,
    pub stdout: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FixtureImage {
    pub name: String,
    /// The digest of the top descriptor (manifest or index) in the layout.
    pub digest: String,
    pub media_type: String,
    /// `os/arch[/variant]` of every manifest the image has.
    pub platforms: Vec<String>,
    /// Present for images that run on this machine.
    #[serde(default)]
    pub run: Option<RunCheck>,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Deserialize)]
struct CorpusFile {
    recipe_hash: String,
    images: Vec<FixtureImage>,
}

#[derive(Debug)]
pub struct Corpus {
    pub dir: PathBuf,
    pub recipe_hash: String,
    /// SHA-256 of corpus.json: what the corpus holds, not just how it was
    /// made (the cached debootstrap rootfs can change under the same recipe).
    pub content_hash: String,
    pub images: Vec<FixtureImage>,
}

static CORPUS: OnceLock<Corpus> = OnceLock::new();

impl Corpus {
    /// The corpus, built on first use (under a lock shared by all test processes).
    pub fn get() -> Result<&'static Corpus> {
        if let Some(c) = CORPUS.get() {
            return Ok(c);
        }
        let dir = cache_dir().join("fixtures/corpus");
        {
            let _lock = FileLock::acquire(&cache_dir().join("locks/fixtures"))?;
            run(
                Command::new(repo_root().join("tests/fixtures/build-corpus"))
                    .arg("--out")
                    .arg(&dir),
            )
            .context("building the fixture corpus")?;
        }
        let text = std::fs::read(dir.join("corpus.json")).context("reading corpus.json")?;
        let file: CorpusFile = serde_json::from_slice(&text).context("parsing corpus.json")?;
        let content_hash = format!("{:x}", Sha256::digest(&text));
        let _ = CORPUS.set(Corpus {
            dir,
            recipe_hash: file.recipe_hash,
            content_hash,
            images: file.images,
        });
        Ok(CORPUS.get().expect("just set"))
    }

    /// The OCI image layout holding every fixture image.
    pub fn oci_layout(&self) -> PathBuf {
        self.dir.join("oci")
    }

    pub fn image(&self, name: &str) -> &FixtureImage {
        self.images
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no fixture image {name:?}"))
    }

    /// The repository a fixture image is pushed to.
    pub fn repository(name: &str) -> String {
        format!("coral/{name}")
    }

    /// Registry storage with the whole corpus pushed (made once, then shared).
    pub fn registry_storage(&self) -> Result<PathBuf> {
        let root = cache_dir().join("registry-corpus");
        let done = root.join(&self.content_hash);
        let _lock = FileLock::acquire(&cache_dir().join("locks/registry-corpus"))?;
        if done.exists() {
            return Ok(done);
        }
        let tmp = root.join(format!("{}.tmp", self.content_hash));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        {
            let reg = Registry::start(RegistryOptions {
                storage: Some(tmp.clone()),
                ..Default::default()
            })?;
            run(Command::new(repo_root().join("tests/fixtures/push-corpus"))
                .arg(&self.dir)
                .arg(reg.host())
                .arg("--tls-verify=false"))
            .with_context(|| format!("pushing the corpus; registry log:\n{}", reg.log_tail()))?;
        }
        // Keep only this recipe's storage; older ones are stale.
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.path() != tmp {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        std::fs::rename(&tmp, &done)?;
        Ok(done)
    }

    /// A registry serving the corpus read-only, with the given TLS and auth.
    pub fn registry(&self, mut options: RegistryOptions) -> Result<Registry> {
        options.storage = Some(self.registry_storage()?);
        options.read_only = true;
        Registry::start(options)
    }

    /// A plain-HTTP anonymous registry serving the corpus.
    pub fn plain_registry(&self) -> Result<Registry> {
        self.registry(RegistryOptions::default())
    }
}
