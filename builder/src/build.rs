//! `coral-builder build`: references in, a staged seed volume tree out.
//!
//! 1. resolve every reference (tag → digest, index → the requested platforms);
//! 2. pull each distinct blob once, concurrently, verified while written;
//! 3. extract each distinct layer (by chain ID) once, in parallel on blocking
//!    threads, as soon as its blob is there; check its diff ID against the
//!    config; then, once its parents are final, give parent-only directories
//!    their parents' metadata and rename it into `.coral/layers/`;
//! 4. write the OCI layout (`index.json`, `oci-layout`) and the seed manifest.
//!
//! Everything in progress lives under `.coral/tmp/`; a blob or layer appears
//! under its final name only complete and verified, so a killed build resumes
//! by keeping what is final and discarding `.coral/tmp/`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use coral_seed::manifest::{FORMAT_VERSION, seed_key};
use coral_seed::paths::{OCI_LAYOUT_VERSION, REF_NAME_ANNOTATION};
use coral_seed::time::{parse_rfc3339, rfc3339};
use coral_seed::{
    ChainId, Digest, Platform, Reference, SeedImage, SeedLayer, SeedLayout, SeedManifest, Totals,
};
use futures_util::future::{BoxFuture, FutureExt, Shared, try_join_all};
use serde::Serialize;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::feed::{BlobFeed, FeedGuard};
use crate::progress::Progress;
use crate::registry::RegistryClient;
use crate::resolve::{PlannedLayer, ResolvedImage, resolve};
use crate::unpack::{self, UnpackOptions};

pub struct StageOptions {
    pub images: Vec<String>,
    pub platforms: Vec<Platform>,
    /// Bound on all extracted bytes together; `None`: 20x the compressed size.
    pub max_unpacked: Option<u64>,
    /// Layers extracted at once.
    pub extract_jobs: usize,
    /// Time recorded as the manifest's creation time; `None`: the newest
    /// image config's `created` (so the same inputs give the same bytes).
    pub source_date_epoch: Option<i64>,
    /// A previous volume this one is built on: what it already holds is
    /// neither pulled nor extracted again.
    pub reuse: Option<Reuse>,
}

/// What a previous volume (mounted) holds that a build can keep: its blobs,
/// and its layer trees as its seed manifest describes them.
#[derive(Debug, Clone)]
pub struct Reuse {
    pub layout: SeedLayout,
    /// chain → (file bytes, tree digest), for layers with a recorded tree digest.
    pub chains: BTreeMap<ChainId, (u64, Digest)>,
}

impl Reuse {
    pub fn new(root: &Path, manifest: &SeedManifest) -> Reuse {
        let layout = SeedLayout::new(root.to_path_buf());
        let mut chains = BTreeMap::new();
        for l in manifest.images.iter().flat_map(|i| i.layers.iter()) {
            if let Some(tree) = &l.tree_digest
                && layout.layer(&l.chain_id).is_dir()
            {
                chains.insert(l.chain_id.clone(), (l.unpacked_size, tree.clone()));
            }
        }
        Reuse { layout, chains }
    }

    fn blob(&self, d: &Digest, size: u64) -> Option<PathBuf> {
        let p = self.layout.blob(d);
        std::fs::metadata(&p)
            .is_ok_and(|m| m.is_file() && m.len() == size)
            .then_some(p)
    }
}

/// Times of each phase, for the report.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Phases {
    pub resolve_seconds: f64,
    pub pull_and_extract_seconds: f64,
    pub layout_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filesystem_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageResult {
    #[serde(skip)]
    pub manifest: SeedManifest,
    pub manifest_digest: Digest,
    /// Blob bytes fetched from registries by this run (0 when all was kept
    /// from an interrupted run).
    pub bytes_pulled: u64,
    /// Blob bytes reused from an earlier, interrupted run, or kept from
    /// the volume built on.
    pub bytes_reused: u64,
    /// Layers kept from the volume built on (not extracted again).
    pub layers_reused: u64,
    pub phases: Phases,
}

type SharedResult = Shared<BoxFuture<'static, Result<(), Arc<anyhow::Error>>>>;

fn flatten(e: Arc<anyhow::Error>) -> anyhow::Error {
    anyhow!("{e:#}")
}

/// Removes everything under `.coral/` that is not final, and every final
/// blob or layer not in `keep_*` (left from another seed set).
pub(crate) fn prune(
    layout: &SeedLayout,
    blobs: &BTreeSet<Digest>,
    chains: &BTreeSet<ChainId>,
) -> Result<()> {
    for d in [
        layout.dir(),
        layout.layers_dir(),
        layout.blobs_dir().join("sha256"),
    ] {
        remove_trash(&d)?;
    }
    let tmp = layout.tmp_dir();
    if tmp.exists() {
        remove_tree(&tmp)?;
    }
    let sha = layout.blobs_dir().join("sha256");
    if let Ok(entries) = std::fs::read_dir(&sha) {
        for e in entries.flatten() {
            let keep = e
                .file_name()
                .to_str()
                .and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
                .is_some_and(|d| blobs.contains(&d));
            if !keep {
                remove_tree(&e.path())?;
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(layout.layers_dir()) {
        for e in entries.flatten() {
            let keep = e
                .file_name()
                .to_str()
                .and_then(|h| format!("sha256:{h}").parse::<ChainId>().ok())
                .is_some_and(|c| chains.contains(&c));
            if !keep {
                remove_tree(&e.path())?;
            }
        }
    }
    Ok(())
}

/// Removes a file or a whole tree. A tree is first renamed aside, so a
/// removal cut short by a kill never leaves a half-empty tree under a name
/// a resumed build would trust as complete.
pub fn remove_tree(p: &Path) -> Result<()> {
    let m = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspecting {}", p.display())),
    };
    if !m.is_dir() {
        return std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()));
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = p.with_file_name(format!(".{name}.coral-trash-{}", std::process::id()));
    std::fs::rename(p, &trash)
        .with_context(|| format!("moving {} aside to remove it", p.display()))?;
    match std::fs::remove_dir_all(&trash) {
        // Another build's `remove_trash` got there first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.with_context(|| format!("removing {}", trash.display())),
    }
}

/// Removes what removals cut short by a kill left in `dir` (see [`remove_tree`]).
pub fn remove_trash(dir: &Path) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            // Best effort: another build may be removing its own trash here.
            if e.file_name().to_string_lossy().contains(".coral-trash-")
                && let Err(err) = std::fs::remove_dir_all(e.path())
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("removing {}: {err}", e.path().display());
            }
        }
    }
    Ok(())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("coral-tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn seconds(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
}

/// Pulls, verifies and extracts the seed set into `layout` (the staging
/// root), and writes its OCI layout and seed manifest.
pub async fn stage(
    client: Arc<RegistryClient>,
    layout: &SeedLayout,
    opts: &StageOptions,
    progress: Arc<Progress>,
) -> Result<StageResult> {
    if opts.images.is_empty() {
        bail!("no images to seed: give --image REF or --seed FILE");
    }
    let mut phases = Phases::default();

    // 1. Resolve.
    let t = Instant::now();
    let mut names = Vec::new();
    for asked in &opts.images {
        let name: Reference = asked
            .parse()
            .with_context(|| format!("image reference {asked:?}"))?;
        names.push((asked.clone(), name));
    }
    let resolved: Vec<ResolvedImage> = try_join_all(names.iter().map(|(asked, name)| {
        let client = client.clone();
        async move { resolve(&client, asked, name, &opts.platforms).await }
    }))
    .await?;
    for r in &resolved {
        progress.event(json!({
            "event": "resolved", "image": r.asked, "digest": r.target.digest.to_string(),
            "platforms": r.images.iter().map(|i| i.platform.to_string()).collect::<Vec<_>>(),
        }));
    }
    phases.resolve_seconds = seconds(t);

    // The plan: every blob once, every layer tree once.
    let t = Instant::now();
    let mut small_blobs: BTreeMap<Digest, bytes::Bytes> = BTreeMap::new();
    // digest -> (layer, a reference to pull it from, images that use it)
    let mut layer_blobs: BTreeMap<Digest, (PlannedLayer, Reference, Vec<String>)> = BTreeMap::new();
    // chain -> (the layer, parent chain, label)
    let mut chains: BTreeMap<ChainId, (PlannedLayer, Option<ChainId>, String)> = BTreeMap::new();
    let mut compressed_total = 0u64;
    for r in &resolved {
        small_blobs.insert(r.target.digest.clone(), r.target_bytes.clone());
        let mut image_bytes = 0;
        for img in &r.images {
            small_blobs.insert(img.manifest.digest.clone(), img.manifest_bytes.clone());
            small_blobs.insert(img.config.digest.clone(), img.config_bytes.clone());
            let mut parent: Option<ChainId> = None;
            for l in &img.layers {
                let entry = layer_blobs.entry(l.digest.clone()).or_insert_with(|| {
                    compressed_total += l.size;
                    (l.clone(), r.name.clone(), Vec::new())
                });
                if !entry.2.contains(&r.asked) {
                    entry.2.push(r.asked.clone());
                    image_bytes += l.size;
                }
                chains.entry(l.chain_id.clone()).or_insert_with(|| {
                    (
                        l.clone(),
                        parent.clone(),
                        format!("{} layer {}", r.asked, l.digest),
                    )
                });
                parent = Some(l.chain_id.clone());
            }
        }
        progress.add_image(&r.asked, image_bytes);
    }
    let budget = opts
        .max_unpacked
        .unwrap_or_else(|| compressed_total.saturating_mul(20).max(64 << 20));

    let all_blobs: BTreeSet<Digest> = small_blobs
        .keys()
        .chain(layer_blobs.keys())
        .cloned()
        .collect();
    let all_chains: BTreeSet<ChainId> = chains.keys().cloned().collect();
    prune(layout, &all_blobs, &all_chains)?;
    for d in [
        layout.blobs_dir().join("sha256"),
        layout.layers_dir(),
        layout.tmp_dir().join("blobs"),
        layout.tmp_dir().join("layers"),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    for (d, bytes) in &small_blobs {
        let path = layout.blob(d);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
    }

    // 2. Pull every layer blob once.
    let bytes_pulled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut bytes_reused = 0u64;
    let mut blob_ready: HashMap<Digest, SharedResult> = HashMap::new();
    // Where each layer blob is read from to extract it: the work directory,
    // or the volume built on.
    let mut blob_path: HashMap<Digest, PathBuf> = HashMap::new();
    // Blobs being pulled: their layers are extracted as the bytes arrive.
    let mut feeds: HashMap<Digest, Arc<BlobFeed>> = HashMap::new();
    // As many downloads under way as connections: a download holds its
    // partial file (and its feed says "started") only while it is pulled,
    // so extraction slots go to layers whose bytes are arriving, and a
    // seed set of thousands of layers does not open thousands of files.
    let downloads = Arc::new(Semaphore::new(client.connections()));
    for (digest, (layer, from, users)) in &layer_blobs {
        let dest = layout.blob(digest);
        let in_base = opts.reuse.as_ref().and_then(|r| r.blob(digest, layer.size));
        let fut: BoxFuture<'static, Result<(), Arc<anyhow::Error>>> = match std::fs::metadata(&dest)
        {
            _ if in_base.is_some() && !dest.exists() => {
                // The volume built on has it (verified when it was built).
                bytes_reused += layer.size;
                progress.bytes(users, layer.size as i64);
                blob_path.insert(digest.clone(), in_base.expect("checked"));
                async { Ok(()) }.boxed()
            }
            Ok(m) if m.len() == layer.size => {
                // Final names are only ever given to verified blobs.
                bytes_reused += layer.size;
                progress.bytes(users, layer.size as i64);
                async { Ok(()) }.boxed()
            }
            _ => {
                let client = client.clone();
                let progress = progress.clone();
                let (digest, from, users) = (digest.clone(), from.clone(), users.clone());
                let size = layer.size;
                let partial = layout.tmp_dir().join("blobs").join(digest.hex());
                let pulled = bytes_pulled.clone();
                let feed = BlobFeed::new();
                feeds.insert(digest.clone(), feed.clone());
                let downloads = downloads.clone();
                async move {
                    let guard = FeedGuard(feed);
                    let _download = downloads.acquire_owned().await.expect("never closed");
                    let progress2 = progress.clone();
                    let users2 = users.clone();
                    let cb = move |delta: i64| progress2.bytes(&users2, delta);
                    let fetched = client
                        .fetch_blob_to_file(
                            &from,
                            &digest,
                            size,
                            &partial,
                            &dest,
                            &cb,
                            Some(&guard.0),
                        )
                        .await;
                    guard
                        .0
                        .finish(fetched.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                    fetched.map_err(|e| Arc::new(anyhow::Error::new(e)))?;
                    pulled.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
                    progress.event(
                        json!({"event": "blob", "digest": digest.to_string(), "bytes": size}),
                    );
                    Ok(())
                }
                .boxed()
            }
        };
        blob_ready.insert(digest.clone(), fut.shared());
    }

    // 3. Extract each layer tree once; finalise bottom-up.
    let extract_slots = Arc::new(Semaphore::new(opts.extract_jobs.max(1)));
    // All layers' uncompressed streams together stay within the budget.
    let unpacked_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut chain_ready: HashMap<ChainId, SharedResult> = HashMap::new();
    let unpacked_sizes: Arc<std::sync::Mutex<BTreeMap<ChainId, (u64, Digest)>>> =
        Default::default();
    // BTreeMap order is by chain ID, not bottom-up: create parents first.
    let mut order: Vec<ChainId> = Vec::new();
    {
        let mut seen = BTreeSet::new();
        fn visit(
            c: &ChainId,
            chains: &BTreeMap<ChainId, (PlannedLayer, Option<ChainId>, String)>,
            seen: &mut BTreeSet<ChainId>,
            order: &mut Vec<ChainId>,
        ) {
            if !seen.insert(c.clone()) {
                return;
            }
            if let Some(p) = &chains[c].1 {
                visit(p, chains, seen, order);
            }
            order.push(c.clone());
        }
        for c in chains.keys() {
            visit(c, &chains, &mut seen, &mut order);
        }
    }
    // Layers kept from the volume built on: those it has that this work
    // directory does not.
    let from_base: BTreeMap<ChainId, (u64, Digest)> = match &opts.reuse {
        Some(r) => r
            .chains
            .iter()
            .filter(|(c, _)| chains.contains_key(*c) && !layout.layer(c).exists())
            .map(|(c, v)| (c.clone(), v.clone()))
            .collect(),
        None => BTreeMap::new(),
    };
    let layer_dir = |c: &ChainId| -> PathBuf {
        match (&opts.reuse, from_base.contains_key(c)) {
            (Some(r), true) => r.layout.layer(c),
            _ => layout.layer(c),
        }
    };
    for chain in &order {
        let (layer, parent, label) = chains[chain].clone();
        let final_dir = layout.layer(chain);
        let parent_ready = parent.as_ref().map(|p| chain_ready[p].clone());
        // Ancestors' final trees, topmost first, for parent-only directories.
        let mut ancestors = Vec::new();
        let mut cur = parent.clone();
        while let Some(c) = cur {
            ancestors.push(layer_dir(&c));
            cur = chains[&c].1.clone();
        }
        let sizes = unpacked_sizes.clone();
        let fut: BoxFuture<'static, Result<(), Arc<anyhow::Error>>> = if let Some(kept) =
            from_base.get(chain)
        {
            sizes
                .lock()
                .expect("not poisoned")
                .insert(chain.clone(), kept.clone());
            async { Ok(()) }.boxed()
        } else if final_dir.exists() {
            let chain = chain.clone();
            async move {
                // Kept from an interrupted run: describe it as it is.
                let (digest, stats) = tokio::task::spawn_blocking(move || {
                    coral_seed::tree::tree_digest(&final_dir)
                        .with_context(|| format!("reading {}", final_dir.display()))
                })
                .await
                .map_err(|e| Arc::new(anyhow!(e)))?
                .map_err(Arc::new)?;
                sizes
                    .lock()
                    .expect("not poisoned")
                    .insert(chain, (stats.file_bytes, digest));
                Ok(())
            }
            .boxed()
        } else {
            let blob = blob_path
                .get(&layer.digest)
                .cloned()
                .unwrap_or_else(|| layout.blob(&layer.digest));
            let blob_ready = blob_ready[&layer.digest].clone();
            let feed = feeds.get(&layer.digest).cloned();
            let partial = layout.tmp_dir().join("blobs").join(layer.digest.hex());
            let work = layout.tmp_dir().join("layers").join(chain.hex());
            let slots = extract_slots.clone();
            let stream_total = unpacked_total.clone();
            let progress = progress.clone();
            let chain = chain.clone();
            async move {
                // A blob being pulled is extracted as it arrives (once its
                // download has a connection and a file); another once it
                // is there.
                match &feed {
                    Some(f) => f.started().await,
                    None => blob_ready.clone().await?,
                }
                let unpacked = {
                    let _slot = slots.acquire_owned().await.expect("never closed");
                    let (work, label, layer, has_parent) =
                        (work.clone(), label.clone(), layer.clone(), parent.is_some());
                    tokio::task::spawn_blocking(move || -> Result<unpack::UnpackedLayer> {
                        if work.exists() {
                            remove_tree(&work)?;
                        }
                        let reader: Box<dyn std::io::Read + Send> = match &feed {
                            Some(f) => Box::new(
                                f.reader(&partial, &blob)
                                    .with_context(|| format!("opening {}", blob.display()))?,
                            ),
                            None => Box::new(
                                std::fs::File::open(&blob)
                                    .with_context(|| format!("opening {}", blob.display()))?,
                            ),
                        };
                        let out = unpack::unpack_layer(
                            std::io::BufReader::with_capacity(1 << 20, reader),
                            &UnpackOptions {
                                layer: &label,
                                compression: layer.compression,
                                dest: &work,
                                has_parent,
                                max_bytes: budget,
                                total: Some(stream_total.clone()),
                            },
                        )?;
                        if out.diff_id != layer.diff_id {
                            bail!(
                                "{label}: the uncompressed layer hashes to {}, but the image config says its diff ID is {}",
                                out.diff_id,
                                layer.diff_id
                            );
                        }
                        Ok(out)
                    })
                    .await
                    .map_err(|e| Arc::new(anyhow!(e)))?
                };
                // The blob's verdict first: a blob that failed (wrong
                // digest, cut short) is the cause of whatever its
                // extraction said.
                blob_ready.await?;
                let unpacked = unpacked.map_err(Arc::new)?;
                if let Some(p) = parent_ready {
                    p.await?;
                }
                let (file_bytes, tree) = tokio::task::spawn_blocking(move || -> Result<(u64, Digest)> {
                    let parents: Vec<&Path> = ancestors.iter().map(|p| p.as_path()).collect();
                    unpack::inherit_implicit_dirs(&work, &unpacked.implicit_dirs, &parents)
                        .with_context(|| format!("{label}: copying parent directory metadata"))?;
                    // The layer root's metadata is not the tar's to set (its
                    // `./` entry is skipped, as the snapshot directory's own
                    // is kept by containerd); fix it so builds are reproducible.
                    fix_root(&work).with_context(|| format!("{label}: setting the layer root's metadata"))?;
                    let (tree, stats) = coral_seed::tree::tree_digest(&work)
                        .with_context(|| format!("{label}: hashing the extracted tree"))?;
                    std::fs::rename(&work, &final_dir)
                        .with_context(|| format!("renaming {} into place", work.display()))?;
                    Ok((stats.file_bytes, tree))
                })
                .await
                .map_err(|e| Arc::new(anyhow!(e)))?
                .map_err(Arc::new)?;
                sizes.lock().expect("not poisoned").insert(chain.clone(), (file_bytes, tree));
                progress.event(json!({"event": "layer", "chainId": chain.to_string(), "fileBytes": file_bytes}));
                Ok(())
            }
            .boxed()
        };
        chain_ready.insert(chain.clone(), fut.shared());
    }
    // Run everything; the first failure ends the build.
    let all: Vec<SharedResult> = blob_ready
        .values()
        .cloned()
        .chain(chain_ready.values().cloned())
        .collect();
    try_join_all(all).await.map_err(flatten)?;
    let unpacked_sizes = unpacked_sizes.lock().expect("not poisoned").clone();
    let unpacked_total: u64 = unpacked_sizes.values().map(|(b, _)| b).sum();
    if unpacked_total > budget {
        bail!(
            "the layers hold {unpacked_total} bytes of files, more than the {budget}-byte limit \
             (--max-unpacked, or --size)"
        );
    }
    phases.pull_and_extract_seconds = seconds(t);

    // 4. The OCI layout and the seed manifest.
    let t = Instant::now();
    let mut images = Vec::new();
    let mut index_entries = Vec::new();
    for r in &resolved {
        let mut target = json!({
            "mediaType": r.target.media_type,
            "digest": r.target.digest.to_string(),
            "size": r.target.size,
            "annotations": {
                REF_NAME_ANNOTATION: r.name.to_string(),
                "io.containerd.image.name": r.name.to_string(),
            },
        });
        if r.index.is_none()
            && let Some(img) = r.images.first()
        {
            target["platform"] = platform_json(&img.platform);
        }
        index_entries.push(target);
        for img in &r.images {
            let layers: Vec<SeedLayer> = img
                .layers
                .iter()
                .map(|l| SeedLayer {
                    digest: l.digest.clone(),
                    media_type: l.media_type.clone(),
                    size: l.size,
                    diff_id: l.diff_id.clone(),
                    chain_id: l.chain_id.clone(),
                    unpacked_size: unpacked_sizes[&l.chain_id].0,
                    tree_digest: Some(unpacked_sizes[&l.chain_id].1.clone()),
                })
                .collect();
            images.push(SeedImage {
                reference: r.asked.clone(),
                name: r.name.clone(),
                resolved_digest: r.target.digest.clone(),
                index_digest: r.index.as_ref().map(|d| d.digest.clone()),
                manifest_digest: img.manifest.digest.clone(),
                manifest_media_type: img.manifest.media_type.clone(),
                config_digest: img.config.digest.clone(),
                platform: img.platform.clone(),
                size: img.manifest.size
                    + img.config.size
                    + img.layers.iter().map(|l| l.size).sum::<u64>(),
                layers,
            });
        }
    }
    // Same order whatever the order of --image flags.
    index_entries.sort_by(|a, b| {
        a["annotations"][REF_NAME_ANNOTATION]
            .as_str()
            .cmp(&b["annotations"][REF_NAME_ANNOTATION].as_str())
    });
    index_entries.dedup_by(|a, b| {
        a["annotations"][REF_NAME_ANNOTATION] == b["annotations"][REF_NAME_ANNOTATION]
    });
    images.sort_by(|a, b| {
        (a.name.to_string(), a.platform.to_string())
            .cmp(&(b.name.to_string(), b.platform.to_string()))
    });
    images.dedup_by(|a, b| a.name == b.name && a.platform == b.platform);

    let key = seed_key(
        &opts.platforms,
        images.iter().map(|i| (&i.name, &i.resolved_digest)),
    );
    let created = opts.source_date_epoch.unwrap_or_else(|| {
        resolved
            .iter()
            .flat_map(|r| r.images.iter())
            .filter_map(|i| i.created.as_deref().and_then(parse_rfc3339))
            .max()
            .unwrap_or(0)
    });
    let blob_bytes: u64 = small_blobs.values().map(|b| b.len() as u64).sum::<u64>()
        + layer_blobs.values().map(|(l, _, _)| l.size).sum::<u64>();
    let mut platforms = opts.platforms.clone();
    platforms.sort_by_key(|p| p.to_string());
    platforms.dedup();
    let manifest = SeedManifest {
        format_version: FORMAT_VERSION,
        build_id: format!("{}-{}", &key.hex()[..16], env!("CARGO_PKG_VERSION")),
        tool_version: format!("coral-builder {}", env!("CARGO_PKG_VERSION")),
        created: rfc3339(created),
        platforms,
        seed_key: key,
        totals: Totals {
            images: images.len() as u64,
            blobs: all_blobs.len() as u64,
            blob_bytes,
            layers: all_chains.len() as u64,
            unpacked_bytes: unpacked_total,
        },
        images,
    };
    manifest
        .validate()
        .context("the manifest this build wrote is inconsistent (a bug)")?;
    write_atomic(
        &layout.oci_layout(),
        serde_json::to_string(&json!({"imageLayoutVersion": OCI_LAYOUT_VERSION}))?.as_bytes(),
    )?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index_entries,
    });
    let mut index_bytes = serde_json::to_vec_pretty(&index)?;
    index_bytes.push(b'\n');
    write_atomic(&layout.index(), &index_bytes)?;
    let manifest_json = manifest.to_json();
    write_atomic(&layout.manifest(), &manifest_json)?;
    remove_tree(&layout.tmp_dir())?;
    normalise_metadata(layout, created)?;
    phases.layout_seconds = seconds(t);

    Ok(StageResult {
        manifest_digest: Digest::sha256_of(&manifest_json),
        manifest,
        bytes_pulled: bytes_pulled.load(std::sync::atomic::Ordering::Relaxed),
        bytes_reused,
        layers_reused: from_base.len() as u64,
        phases,
    })
}

fn platform_json(p: &Platform) -> serde_json::Value {
    let mut v = json!({"os": p.os(), "architecture": p.architecture()});
    if let Some(var) = p.variant() {
        v["variant"] = json!(var);
    }
    v
}

/// Gives everything coral wrote itself (not the layer trees' contents) fixed
/// owners, modes and times, so the filesystem image does not depend on when,
/// in what order or under what umask the volume was staged.
pub(crate) fn normalise_metadata(layout: &SeedLayout, epoch: i64) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let ts = rustix::fs::Timespec {
        tv_sec: epoch,
        tv_nsec: 0,
    };
    let fix = |p: &Path, dir: bool| -> Result<()> {
        std::fs::set_permissions(
            p,
            std::fs::Permissions::from_mode(if dir { 0o755 } else { 0o644 }),
        )?;
        rustix::fs::chownat(
            rustix::fs::CWD,
            p,
            Some(rustix::fs::Uid::ROOT),
            Some(rustix::fs::Gid::ROOT),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
        rustix::fs::utimensat(
            rustix::fs::CWD,
            p,
            &rustix::fs::Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    };
    let ctx = |p: &Path| format!("setting the metadata of {}", p.display());
    for f in [layout.manifest(), layout.index(), layout.oci_layout()] {
        fix(&f, false).with_context(|| ctx(&f))?;
    }
    for algo in std::fs::read_dir(layout.blobs_dir())? {
        let algo = algo?.path();
        for blob in std::fs::read_dir(&algo)? {
            let blob = blob?.path();
            fix(&blob, false).with_context(|| ctx(&blob))?;
        }
        fix(&algo, true).with_context(|| ctx(&algo))?;
    }
    // Directories last: changing their entries' metadata does not touch
    // them, but creating or renaming entries did.
    for d in [
        layout.blobs_dir(),
        layout.layers_dir(),
        layout.dir(),
        layout.root().to_path_buf(),
    ] {
        fix(&d, true).with_context(|| ctx(&d))?;
    }
    // Root only below .coral, as containerd keeps its own content and
    // snapshots: the layer trees hold images' setuid files and device
    // nodes, which local users on a node must not reach through the mount.
    std::fs::set_permissions(layout.dir(), std::fs::Permissions::from_mode(0o700))
        .with_context(|| ctx(&layout.dir()))?;
    Ok(())
}

fn fix_root(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let zero = rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dir,
        &rustix::fs::Timestamps {
            last_access: zero,
            last_modification: zero,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Where an interrupted build's work is kept by default: beside the output.
pub fn default_work_dir(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "seed".into());
    if output.starts_with("/dev") {
        PathBuf::from("/var/tmp").join(format!("coral-build-{name}"))
    } else {
        output.with_file_name(format!(".{name}.coral-work"))
    }
}
