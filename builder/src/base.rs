//! Building a seed volume on a previous one (`build --parent-image PATH`),
//! so that a snapshot of it differs from the previous snapshot only where
//! the seed set changed.
//!
//! 1. The previous image is copied beside the output (by reflink where the
//!    filesystem can, keeping holes), grown to `--size` if that is larger,
//!    and mounted read-write.
//! 2. The build stages only what the previous volume lacks: blobs and
//!    layer trees it already holds are neither pulled nor extracted
//!    ([`crate::build::Reuse`]); its seed manifest says what they are. (The
//!    previous volume is trusted as coral built it; `coral-builder verify`
//!    checks one.)
//! 3. [`BaseVolume::merge`]: blobs and layers the new seed set does not use
//!    are removed (their blocks freed), the new ones are copied in exactly
//!    ([`coral_seed::copytree`]) under scratch names and renamed, and the
//!    OCI layout and seed manifest are replaced. The kernel allocates the
//!    new files in free space; unchanged layers keep their blocks.
//! 4. The copy is unmounted, checked (`e2fsck -f -n`, which writes nothing)
//!    and renamed onto the output.
//!
//! The result holds the same seed manifest (and so the same manifest
//! digest) as a fresh build of the same images, but not the same bytes: a
//! fresh build is reproducible, a volume built on another is not. A failure
//! or a kill at any point leaves the previous image untouched and the
//! output as it was; the scratch copy is removed (or, after a kill, by the
//! next build).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use coral_seed::{ChainId, Digest, SeedLayout, SeedManifest};
use serde::Serialize;

use crate::build::{Reuse, normalise_metadata, prune, remove_tree, write_atomic};
use crate::fsimage::{self, FsKind, MountGuard};

/// What building on the previous volume did.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeStats {
    pub parent_image: PathBuf,
    pub blobs_kept: u64,
    pub blobs_added: u64,
    pub blobs_removed: u64,
    pub layers_kept: u64,
    pub layers_added: u64,
    pub layers_removed: u64,
    /// Bytes of blob and file data written into the volume.
    pub bytes_written: u64,
}

/// A scratch copy of the previous volume image, mounted read-write.
pub struct BaseVolume {
    parent: PathBuf,
    scratch: PathBuf,
    output: PathBuf,
    fs: FsKind,
    mount: Option<MountGuard>,
    manifest: SeedManifest,
}

/// The scratch copy's name: beside the output, hidden.
fn scratch_prefix(output: &Path) -> String {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.coral-base-")
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

impl BaseVolume {
    /// Copies `parent` beside `output` (grown to `size` if larger) and mounts
    /// the copy read-write.
    pub fn open(parent: &Path, output: &Path, size: Option<u64>) -> Result<BaseVolume> {
        let meta = std::fs::metadata(parent)
            .with_context(|| format!("--parent-image {}", parent.display()))?;
        if !meta.is_file() {
            bail!(
                "--parent-image {} is not an image file (a volume built on another is made \
                 from an image file)",
                parent.display()
            );
        }
        if std::fs::metadata(output).is_ok_and(|m| !m.is_file()) {
            bail!(
                "--output {} is not an image file: with --parent-image the new volume is an \
                 image file",
                output.display()
            );
        }
        if same_file(parent, output) {
            bail!(
                "--parent-image and --output are the same file: the parent image must stay as \
                 its snapshot holds it; write the new volume to another path"
            );
        }
        let dir = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // What a killed build left.
        let prefix = scratch_prefix(output);
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let scratch = dir.join(format!("{prefix}{}", std::process::id()));
        let fs = fsimage::copy_image(parent, &scratch, size).inspect_err(|_| {
            let _ = std::fs::remove_file(&scratch);
        })?;
        let mount = match fsimage::mount_image_writable(&scratch) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&scratch);
                return Err(e.into());
            }
        };
        let layout = SeedLayout::new(mount.path().to_path_buf());
        let manifest = std::fs::read(layout.manifest())
            .with_context(|| {
                format!(
                    "{} holds no seed manifest: it is not a coral seed volume",
                    parent.display()
                )
            })
            .and_then(|bytes| {
                SeedManifest::from_json(&bytes)
                    .with_context(|| format!("the seed manifest of {}", parent.display()))
            });
        let manifest = match manifest {
            Ok(m) => m,
            Err(e) => {
                drop(mount);
                let _ = std::fs::remove_file(&scratch);
                return Err(e);
            }
        };
        let base = BaseVolume {
            parent: parent.to_path_buf(),
            scratch,
            output: output.to_path_buf(),
            fs,
            mount: Some(mount),
            manifest,
        };
        tracing::info!(
            parent = %parent.display(),
            images = base.manifest.images.len(),
            "building on the previous volume"
        );
        Ok(base)
    }

    fn layout(&self) -> SeedLayout {
        SeedLayout::new(
            self.mount
                .as_ref()
                .expect("mounted until merged")
                .path()
                .to_path_buf(),
        )
    }

    /// What the build can keep from this volume.
    pub fn reuse(&self) -> Reuse {
        Reuse::new(self.layout().root(), &self.manifest)
    }

    /// Makes the volume hold what `staged` (the work directory's tree, with
    /// the new OCI layout and seed manifest) describes, then unmounts,
    /// checks and renames it onto the output.
    pub fn merge(
        mut self,
        staged: &SeedLayout,
        manifest: &SeedManifest,
        epoch: i64,
    ) -> Result<MergeStats> {
        let layout = self.layout();
        let mut stats = MergeStats {
            parent_image: self.parent.clone(),
            ..MergeStats::default()
        };
        let blobs = referenced_blobs(manifest);
        let chains: std::collections::BTreeSet<ChainId> = manifest
            .images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.chain_id.clone()))
            .collect();
        let count = |d: &Path| std::fs::read_dir(d).map(|r| r.count() as u64).unwrap_or(0);
        let (blobs_before, layers_before) = (
            count(&layout.blobs_dir().join("sha256")),
            count(&layout.layers_dir()),
        );
        // Frees what the new seed set does not use.
        prune(&layout, &blobs, &chains).context("removing what the new seed set drops")?;
        stats.blobs_removed = blobs_before - count(&layout.blobs_dir().join("sha256"));
        stats.layers_removed = layers_before - count(&layout.layers_dir());
        let tmp = layout.tmp_dir();
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

        for d in &blobs {
            let (from, to) = (staged.blob(d), layout.blob(d));
            if to.exists() {
                stats.blobs_kept += 1;
                continue;
            }
            let scratch = tmp.join(d.hex());
            let n = std::fs::copy(&from, &scratch)
                .with_context(|| format!("copying blob {d} into the volume"))
                .map_err(out_of_space)?;
            std::fs::rename(&scratch, &to).with_context(|| format!("renaming {}", to.display()))?;
            stats.blobs_added += 1;
            stats.bytes_written += n;
        }
        for c in &chains {
            let to = layout.layer(c);
            if to.exists() {
                stats.layers_kept += 1;
                continue;
            }
            let scratch = tmp.join(c.hex());
            let copied = coral_seed::copytree::copy_tree(&staged.layer(c), &scratch)
                .with_context(|| format!("copying layer {c} into the volume"))
                .map_err(out_of_space)?;
            std::fs::rename(&scratch, &to).with_context(|| format!("renaming {}", to.display()))?;
            stats.layers_added += 1;
            stats.bytes_written += copied.bytes;
        }
        for (from, to) in [
            (staged.oci_layout(), layout.oci_layout()),
            (staged.index(), layout.index()),
            (staged.manifest(), layout.manifest()),
        ] {
            let bytes = std::fs::read(&from).with_context(|| format!("{}", from.display()))?;
            write_atomic(&to, &bytes).map_err(out_of_space)?;
        }
        remove_tree(&tmp)?;
        normalise_metadata(&layout, epoch)?;

        let mount = self.mount.take().expect("mounted until merged");
        let root = mount.path().to_path_buf();
        std::fs::File::open(&root)
            .and_then(|f| rustix::fs::syncfs(&f).map_err(std::io::Error::from))
            .with_context(|| format!("syncing {}", root.display()))?;
        mount.unmount()?;
        fsimage::check_image(&self.scratch, self.fs)?;
        std::fs::File::open(&self.scratch)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", self.scratch.display()))?;
        std::fs::rename(&self.scratch, &self.output).with_context(|| {
            format!(
                "renaming {} to {}",
                self.scratch.display(),
                self.output.display()
            )
        })?;
        Ok(stats)
    }
}

impl Drop for BaseVolume {
    fn drop(&mut self) {
        // Unmounted first (the guard's own drop), then the scratch copy goes.
        drop(self.mount.take());
        if self.scratch.exists()
            && let Err(e) = std::fs::remove_file(&self.scratch)
        {
            tracing::warn!("removing {}: {e}", self.scratch.display());
        }
    }
}

/// Every blob the new volume holds, as its seed manifest lists them: each
/// is in the work directory or kept in the volume.
fn referenced_blobs(manifest: &SeedManifest) -> std::collections::BTreeSet<Digest> {
    let mut out = std::collections::BTreeSet::new();
    for i in &manifest.images {
        out.insert(i.resolved_digest.clone());
        out.extend(i.index_digest.clone());
        out.insert(i.manifest_digest.clone());
        out.insert(i.config_digest.clone());
        out.extend(i.layers.iter().map(|l| l.digest.clone()));
    }
    out
}

/// "No space left" gets advice.
fn out_of_space(e: anyhow::Error) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(libc::ENOSPC)
        })
    });
    if full {
        e.context(
            "the volume built on has too little free space for the new layers: give a larger \
             --size (it grows) or build without --parent-image",
        )
    } else {
        e
    }
}
