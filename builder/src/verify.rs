//! `coral-builder verify`: re-hash every blob and every layer tree of a seed
//! volume and check them against its manifest. Read-only.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use coral_seed::{ChainId, Digest, SeedLayout, SeedManifest};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub intact: bool,
    pub manifest_digest: Option<Digest>,
    pub blobs_checked: u64,
    pub blob_bytes: u64,
    pub layers_checked: u64,
    /// Everything wrong, one line each; empty when intact.
    pub problems: Vec<String>,
}

/// Reads and checks the seed manifest of the volume rooted at `root`.
pub fn read_manifest(root: &Path) -> Result<(SeedManifest, Digest)> {
    let layout = SeedLayout::new(root);
    let path = layout.manifest();
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}: is {} a coral seed volume?",
            path.display(),
            root.display()
        )
    })?;
    let manifest =
        SeedManifest::from_json(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok((manifest, Digest::sha256_of(&bytes)))
}

fn hash_file(path: &Path) -> std::io::Result<(Digest, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((Digest::from_sha256(h.finalize().into()), n))
}

enum Job {
    Blob(Digest, Option<u64>, String),
    Tree(ChainId, Option<Digest>, u64),
}

/// Verifies the volume rooted at `root` with `jobs` threads.
pub fn verify(root: &Path, jobs: usize) -> Result<VerifyReport> {
    let layout = SeedLayout::new(root);
    let (manifest, manifest_digest) = read_manifest(root)?;
    let mut report = VerifyReport {
        manifest_digest: Some(manifest_digest),
        ..Default::default()
    };

    // What must be there: every blob once (with the size when known) and
    // every layer tree once.
    let mut blobs: BTreeMap<Digest, (Option<u64>, String)> = BTreeMap::new();
    let mut trees: BTreeMap<ChainId, (Option<Digest>, u64)> = BTreeMap::new();
    for img in &manifest.images {
        let who = format!("{} ({})", img.reference, img.platform);
        blobs
            .entry(img.resolved_digest.clone())
            .or_insert((None, format!("{who} index/manifest")));
        blobs
            .entry(img.manifest_digest.clone())
            .or_insert((None, format!("{who} manifest")));
        blobs
            .entry(img.config_digest.clone())
            .or_insert((None, format!("{who} config")));
        for l in &img.layers {
            blobs
                .entry(l.digest.clone())
                .or_insert((Some(l.size), format!("{who} layer")));
            trees
                .entry(l.chain_id.clone())
                .or_insert((l.tree_digest.clone(), l.unpacked_size));
        }
    }
    // The OCI layout must name each image.
    match std::fs::read(layout.index()) {
        Ok(bytes) => match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(index) => {
                let names: Vec<&str> = index["manifests"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|m| {
                                m["annotations"][coral_seed::paths::REF_NAME_ANNOTATION].as_str()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                for img in &manifest.images {
                    if !names.contains(&img.name.to_string().as_str()) {
                        report
                            .problems
                            .push(format!("index.json does not name {}", img.name));
                    }
                }
            }
            Err(e) => report.problems.push(format!("index.json is not JSON: {e}")),
        },
        Err(e) => report.problems.push(format!("index.json: {e}")),
    }
    if !layout.oci_layout().exists() {
        report.problems.push("oci-layout is missing".into());
    }

    let queue: Mutex<Vec<Job>> = Mutex::new(
        blobs
            .into_iter()
            .map(|(d, (size, who))| Job::Blob(d, size, who))
            .chain(trees.into_iter().map(|(c, (d, b))| Job::Tree(c, d, b)))
            .rev()
            .collect(),
    );
    let results: Mutex<(Vec<String>, u64, u64, u64)> = Mutex::new((Vec::new(), 0, 0, 0));
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    let Some(job) = queue.lock().expect("not poisoned").pop() else {
                        return;
                    };
                    let problem = match job {
                        Job::Blob(d, size, who) => {
                            let path: PathBuf = layout.blob(&d);
                            match hash_file(&path) {
                                Ok((actual, n)) => {
                                    let mut r = results.lock().expect("not poisoned");
                                    r.1 += 1;
                                    r.2 += n;
                                    drop(r);
                                    if actual != d {
                                        Some(format!("blob {d} ({who}) hashes to {actual}"))
                                    } else if size.is_some_and(|s| s != n) {
                                        Some(format!("blob {d} ({who}) is {n} bytes, the manifest says {}", size.unwrap_or(0)))
                                    } else {
                                        None
                                    }
                                }
                                Err(e) => Some(format!("blob {d} ({who}): {e}")),
                            }
                        }
                        Job::Tree(chain, want, bytes) => {
                            let path = layout.layer(&chain);
                            match coral_seed::tree::tree_digest(&path) {
                                Ok((actual, stats)) => {
                                    results.lock().expect("not poisoned").3 += 1;
                                    if want.as_ref().is_some_and(|w| w != &actual) {
                                        Some(format!(
                                            "layer {chain}: the tree has changed since it was built (tree digest {actual}, built as {})",
                                            want.unwrap_or_else(|| actual.clone())
                                        ))
                                    } else if stats.file_bytes != bytes {
                                        Some(format!(
                                            "layer {chain}: holds {} bytes of files, the manifest says {bytes}",
                                            stats.file_bytes
                                        ))
                                    } else {
                                        None
                                    }
                                }
                                Err(e) => Some(format!("layer {chain} ({}): {e}", path.display())),
                            }
                        }
                    };
                    if let Some(p) = problem {
                        results.lock().expect("not poisoned").0.push(p);
                    }
                }
            });
        }
    });
    let (mut problems, blobs_checked, blob_bytes, layers_checked) =
        results.into_inner().expect("not poisoned");
    problems.sort();
    report.problems.extend(problems);
    report.blobs_checked = blobs_checked;
    report.blob_bytes = blob_bytes;
    report.layers_checked = layers_checked;
    report.intact = report.problems.is_empty();
    Ok(report)
}
