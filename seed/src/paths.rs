//! Where everything lives on a seed volume. Every program computes these
//! paths here and nowhere else; the layout is part of format v1.

use std::path::{Path, PathBuf};

use crate::digest::{ChainId, Digest};

/// The hidden directory at the volume's root that holds all of coral's data.
pub const SEED_DIR: &str = ".coral";
/// The annotation an OCI layout's `index.json` names each image by.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The `imageLayoutVersion` written to `oci-layout`.
pub const OCI_LAYOUT_VERSION: &str = "1.0.0";

/// The paths of one seed volume, rooted at its mount point (or the directory
/// a builder stages it in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedLayout {
    root: PathBuf,
}

impl SeedLayout {
    pub fn new(root: impl Into<PathBuf>) -> SeedLayout {
        SeedLayout { root: root.into() }
    }
    /// The volume root (mount point).
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `.coral/`: also the root of the OCI image layout.
    pub fn dir(&self) -> PathBuf {
        self.root.join(SEED_DIR)
    }
    /// `.coral/manifest.json`: the seed manifest.
    pub fn manifest(&self) -> PathBuf {
        self.dir().join("manifest.json")
    }
    /// `.coral/oci-layout`.
    pub fn oci_layout(&self) -> PathBuf {
        self.dir().join("oci-layout")
    }
    /// `.coral/index.json`: the OCI layout's index, one entry per image reference.
    pub fn index(&self) -> PathBuf {
        self.dir().join("index.json")
    }
    /// `.coral/blobs/`.
    pub fn blobs_dir(&self) -> PathBuf {
        self.dir().join("blobs")
    }
    /// `.coral/blobs/<algorithm>/<hex>`.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir()
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }
    /// `.coral/layers/`.
    pub fn layers_dir(&self) -> PathBuf {
        self.dir().join("layers")
    }
    /// `.coral/layers/<chain-id hex>/`: one layer, extracted in overlayfs form.
    pub fn layer(&self, chain_id: &ChainId) -> PathBuf {
        self.layers_dir().join(chain_id.hex())
    }
    /// `.coral/tmp/`: work in progress (partial downloads, extractions not yet
    /// verified). Never part of a finished volume; safe to delete at any time
    /// no build is running.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir().join("tmp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_format_v1() {
        let l = SeedLayout::new("/mnt/seed");
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        assert_eq!(
            l.blob(&d),
            Path::new(
                "/mnt/seed/.coral/blobs/sha256/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )
        );
        assert_eq!(
            l.layer(&ChainId::new(d.clone())),
            Path::new(
                "/mnt/seed/.coral/layers/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            )
        );
        assert_eq!(l.manifest(), Path::new("/mnt/seed/.coral/manifest.json"));
        assert_eq!(l.index(), Path::new("/mnt/seed/.coral/index.json"));
        assert_eq!(l.oci_layout(), Path::new("/mnt/seed/.coral/oci-layout"));
    }
}
