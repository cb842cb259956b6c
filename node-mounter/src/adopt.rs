//! `import --mode adopt`: the seed volume *is* containerd's root. Everything
//! is registered through containerd's own gRPC API, and moved, never copied:
//!
//! - a blob is renamed from `.coral/blobs/sha256/<hex>` into the content
//!   store's blob directory, then a content Write with its expected digest
//!   and size finds it in place and only commits the metadata;
//! - a layer is prepared in the overlayfs snapshotter, the (empty) directory
//!   containerd returns is replaced by the pre-extracted tree (a rename), and
//!   the snapshot is committed under its chain ID;
//! - images are created as containerd's CRI pull leaves them: the tag name,
//!   the repo digest name and the image ID (config digest) name, each with
//!   `io.cri-containerd.image=managed`, and the content labels the garbage
//!   collector follows (`containerd.io/gc.ref.*`, `containerd.io/uncompressed`,
//!   distribution source).
//!
//! `--mode copy` does the same from a volume mounted elsewhere (read-only
//! is enough): each blob containerd lacks is streamed through a content
//! Write (containerd checks its digest), and each layer tree is copied
//! exactly ([`coral_seed::copytree`]) into a staging directory in the
//! snapshotter's root, several at once, then moved into its snapshot as
//! above.
//!
//! All of it happens under a lease, so nothing is collected half-way; the
//! lease is removed at the end, when the images hold everything. Each step
//! checks first whether it is already done, so a re-run (or a run after a
//! kill at any point) converges to the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateImageRequest, GetImageRequest, Image, InfoRequest, UpdateImageRequest, UpdateRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::types::{Descriptor, Mount};
use coral_seed::{ChainId, Digest, Platform, SeedImage, SeedLayout, SeedManifest};
use tonic::transport::Channel;
use tonic::{Code, Request};

pub const CONTENT_DIR: &str = "io.containerd.content.v1.content";
pub const LABEL_CRI_MANAGED: &str = "io.cri-containerd.image";
pub const LABEL_CRI_PINNED: &str = "io.cri-containerd.pinned";
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
const LEASE_PREFIX: &str = "coral-import-";
/// `--mode copy` copies layer trees here, in the snapshotter's root.
const COPY_STAGING: &str = "coral-copy";

/// How the volume's bytes reach containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ImportMode {
    /// The volume is containerd's root: blobs and trees are moved (renamed).
    Adopt,
    /// The volume is mounted elsewhere (read-only is enough): blobs are
    /// written through the content API and layer trees copied, `jobs` at
    /// a time.
    Copy { jobs: usize },
}

#[derive(Debug, Clone)]
pub struct AdoptOptions {
    pub mode: ImportMode,
    pub namespace: String,
    pub snapshotter: String,
    /// The node's platform: images of other platforms on the volume are left alone.
    pub platform: Platform,
    /// Label images `io.cri-containerd.pinned=pinned` so kubelet's GC keeps them.
    pub pin: bool,
}

impl Default for AdoptOptions {
    fn default() -> Self {
        AdoptOptions {
            mode: ImportMode::Adopt,
            namespace: "k8s.io".into(),
            snapshotter: "overlayfs".into(),
            platform: Platform::host(),
            pin: false,
        }
    }
}

/// What an adopt did, for the status file and the tests.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptReport {
    /// Blobs moved and registered by this run.
    pub blobs_adopted: u64,
    /// Blobs containerd already had (an earlier run, or its own pull).
    pub blobs_present: u64,
    pub layers_adopted: u64,
    pub layers_present: u64,
    /// Image records created or updated (tag, digest and ID names).
    pub image_names: Vec<String>,
    /// Seed images adopted (references as asked at build time).
    pub images: Vec<AdoptedImage>,
    /// Steps this containerd did not allow, done another way.
    pub fallbacks: Vec<String>,
    /// `--mode copy`: bytes of blob and file data written (holes not counted).
    pub bytes_copied: u64,
    pub seconds: f64,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptedImage {
    pub reference: String,
    pub name: String,
    pub digest: String,
    pub image_id: String,
}

/// gRPC calls in one namespace, under one lease.
#[derive(Clone)]
struct Ctr {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Ctr {
    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace.parse().expect("a namespace is ASCII"),
        );
        if let Some(l) = &self.lease {
            md.insert("containerd-lease", l.parse().expect("a lease ID is ASCII"));
        }
        r
    }
    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }
    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
}

/// One blob to register and the labels containerd's pull would give it.
#[derive(Debug, Clone)]
struct BlobPlan {
    digest: Digest,
    size: u64,
    labels: BTreeMap<String, String>,
}

/// Reads a small JSON blob of the volume (an index or a manifest), wherever
/// it is now: still in `.coral/blobs`, or already moved into the store.
fn read_blob(layout: &SeedLayout, content_blobs: &Path, d: &Digest) -> Result<Vec<u8>> {
    let seed = layout.blob(d);
    let store = content_blobs.join(d.hex());
    std::fs::read(&seed)
        .or_else(|_| std::fs::read(&store))
        .with_context(|| {
            format!(
                "blob {d} is neither in {} nor in {}",
                seed.display(),
                store.display()
            )
        })
}

fn rfc3339_in(d: Duration) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    coral_seed::time::rfc3339((now + d).as_secs() as i64)
}

/// Seed images for this node's platform: for each reference, the best match.
pub fn images_for_platform<'a>(
    manifest: &'a SeedManifest,
    platform: &Platform,
) -> Vec<&'a SeedImage> {
    let mut best: BTreeMap<&str, (usize, &SeedImage)> = BTreeMap::new();
    for img in &manifest.images {
        if let Some(rank) = platform.preference(&img.platform) {
            let e = best.entry(img.reference.as_str()).or_insert((rank, img));
            if rank < e.0 {
                *e = (rank, img);
            }
        }
    }
    best.into_values().map(|(_, i)| i).collect()
}

/// Adopts the seed volume rooted at `root` (containerd's root directory)
/// into the containerd at `channel`.
pub async fn adopt(
    channel: Channel,
    root: &Path,
    manifest: &SeedManifest,
    opts: &AdoptOptions,
) -> Result<AdoptReport> {
    let started = Instant::now();
    let layout = SeedLayout::new(root);
    // Where this containerd keeps content, as it says itself.
    let adopting = opts.mode == ImportMode::Adopt;
    let content_root = match plugin_root(&channel, "type==io.containerd.content.v1").await? {
        Some(r) => r,
        None if adopting => root.join(CONTENT_DIR),
        // Guessing would put the staging area on the (read-only) volume.
        None => bail!(
            "containerd does not say where its content store is (introspection): copy mode \
             cannot find its snapshotter's directory"
        ),
    };
    if adopting && content_root != root.join(CONTENT_DIR) {
        bail!(
            "containerd keeps its content in {}, not on the volume at {}: the volume is not this \
             containerd's root (mount it at containerd's root before containerd starts, or use --mode copy)",
            content_root.display(),
            root.display()
        );
    }
    let content_blobs = content_root.join("blobs/sha256");
    if adopting {
        std::fs::create_dir_all(&content_blobs)
            .with_context(|| format!("creating {}", content_blobs.display()))?;
    }
    let images = images_for_platform(manifest, &opts.platform);
    if images.is_empty() {
        bail!(
            "the volume holds no image for this node's platform {} (it has {})",
            opts.platform,
            manifest
                .platforms
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let mut ctr = Ctr {
        channel,
        namespace: opts.namespace.clone(),
        lease: None,
    };
    let mut report = AdoptReport::default();

    // A lease for the whole import; it expires on its own if we are killed.
    let lease_id = format!("{LEASE_PREFIX}{}", &manifest.seed_key.hex()[..16]);
    let lease_req = containerd_client::services::v1::CreateRequest {
        id: lease_id.clone(),
        labels: [(
            "containerd.io/gc.expire".to_string(),
            rfc3339_in(Duration::from_secs(3600)),
        )]
        .into(),
    };
    match ctr.leases().create(ctr.req(lease_req)).await {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => return Err(anyhow!(s)).context("creating a lease"),
    }
    ctr.lease = Some(lease_id.clone());

    // The blobs and their labels, as containerd's pull labels them.
    let mut blobs: BTreeMap<Digest, BlobPlan> = BTreeMap::new();
    let add = |blobs: &mut BTreeMap<Digest, BlobPlan>,
               d: &Digest,
               size: u64,
               labels: BTreeMap<String, String>| {
        let e = blobs.entry(d.clone()).or_insert_with(|| BlobPlan {
            digest: d.clone(),
            size,
            labels: BTreeMap::new(),
        });
        e.labels.extend(labels);
    };
    // Index children present on the volume, per index.
    let mut index_children: HashMap<Digest, BTreeSet<Digest>> = HashMap::new();
    for img in &images {
        if let Some(ix) = &img.index_digest {
            index_children
                .entry(ix.clone())
                .or_default()
                .insert(img.manifest_digest.clone());
        }
    }
    for img in &images {
        let source = (
            format!("containerd.io/distribution.source.{}", img.name.registry()),
            img.name.repository().to_string(),
        );
        let top = img.layers.last().map(|l| l.chain_id.clone());
        // Config: keeps the top snapshot alive.
        let mut labels = BTreeMap::from([source.clone()]);
        if let Some(top) = &top {
            labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
                top.to_string(),
            );
        }
        let config_size = std::fs::metadata(layout.blob(&img.config_digest))
            .or_else(|_| std::fs::metadata(content_blobs.join(img.config_digest.hex())))
            .with_context(|| format!("config {} of {}", img.config_digest, img.reference))?
            .len();
        add(&mut blobs, &img.config_digest, config_size, labels);
        // Layers.
        for l in &img.layers {
            let labels = BTreeMap::from([
                source.clone(),
                (LABEL_UNCOMPRESSED.to_string(), l.diff_id.to_string()),
            ]);
            add(&mut blobs, &l.digest, l.size, labels);
        }
        // Manifest: refers to its config and layers.
        let mut labels = BTreeMap::from([
            source.clone(),
            (
                "containerd.io/gc.ref.content.config".to_string(),
                img.config_digest.to_string(),
            ),
        ]);
        for (i, l) in img.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.to_string(),
            );
        }
        let msize = read_blob(&layout, &content_blobs, &img.manifest_digest)?.len() as u64;
        add(&mut blobs, &img.manifest_digest, msize, labels);
        // Index: refers to the manifests it has here, by their position in it.
        if let Some(ix) = &img.index_digest {
            let bytes = read_blob(&layout, &content_blobs, ix)?;
            let index: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("index {ix} of {}", img.reference))?;
            let mut labels = BTreeMap::from([source.clone()]);
            let present = &index_children[ix];
            if let Some(ms) = index["manifests"].as_array() {
                for (i, m) in ms.iter().enumerate() {
                    if let Some(d) = m["digest"].as_str().and_then(|d| d.parse::<Digest>().ok())
                        && present.contains(&d)
                    {
                        labels.insert(format!("containerd.io/gc.ref.content.m.{i}"), d.to_string());
                    }
                }
            }
            add(&mut blobs, ix, bytes.len() as u64, labels);
        }
    }

    // 1. Content: layers and configs first, manifests and indexes last, so a
    // reference label never points at something not yet registered.
    let order = |p: &BlobPlan| -> u8 {
        if p.labels
            .keys()
            .any(|k| k.starts_with("containerd.io/gc.ref.content.m."))
        {
            3
        } else if p.labels.contains_key("containerd.io/gc.ref.content.config") {
            2
        } else {
            1
        }
    };
    let mut plans: Vec<&BlobPlan> = blobs.values().collect();
    plans.sort_by_key(|p| order(p));
    if let ImportMode::Copy { jobs } = opts.mode {
        // The data first, in parallel; the loop below then finds each blob
        // present and labels it.
        let (written, bytes) = copy_blobs(&ctr, &layout, &plans, jobs).await?;
        report.blobs_adopted += written;
        report.blobs_present += plans.len() as u64 - written;
        report.bytes_copied += bytes;
    }
    for plan in plans {
        let moved = adopt_blob(&ctr, &layout, &content_blobs, plan, &mut report).await?;
        if adopting {
            if moved {
                report.blobs_adopted += 1;
            } else {
                report.blobs_present += 1;
            }
        }
    }

    // 2. Snapshots, bottom-up per image; each chain once. In copy mode the
    // trees are first copied, in parallel, next to the snapshotter's
    // directories, and from there moved in as adopt moves them.
    let staging = match opts.mode {
        ImportMode::Adopt => None,
        ImportMode::Copy { jobs } => {
            let staging = staging_dir(&ctr, &opts.snapshotter, &content_root).await?;
            let chains: BTreeSet<&ChainId> = images
                .iter()
                .flat_map(|i| i.layers.iter().map(|l| &l.chain_id))
                .collect();
            let mut missing = Vec::new();
            for chain in chains {
                if !snapshot_exists(&ctr, &opts.snapshotter, chain).await? {
                    missing.push(chain.clone());
                }
            }
            report.bytes_copied += copy_layers(&layout, &staging, missing, jobs).await?;
            Some(staging)
        }
    };
    let tree_of = |chain: &ChainId| match &staging {
        None => layout.layer(chain),
        Some(dir) => dir.join(chain.hex()),
    };
    let mut done: BTreeSet<ChainId> = BTreeSet::new();
    for img in &images {
        let mut parent: Option<&ChainId> = None;
        for l in &img.layers {
            if done.insert(l.chain_id.clone()) {
                let tree = tree_of(&l.chain_id);
                let moved =
                    adopt_layer(&ctr, &tree, &opts.snapshotter, &l.chain_id, parent).await?;
                if !moved && staging.is_some() && tree.exists() {
                    // Committed meanwhile by someone else (a CRI pull): the
                    // staged copy is not needed.
                    let _ = std::fs::remove_dir_all(&tree);
                }
                if moved {
                    report.layers_adopted += 1;
                } else {
                    report.layers_present += 1;
                }
            }
            parent = Some(&l.chain_id);
        }
    }

    // 3. Images, under the three names CRI lists.
    for img in &images {
        let target = Descriptor {
            media_type: if img.index_digest.is_some() {
                media_type_of(&read_blob(&layout, &content_blobs, &img.resolved_digest)?)
                    .unwrap_or_else(|| "application/vnd.oci.image.index.v1+json".into())
            } else {
                img.manifest_media_type.clone()
            },
            digest: img.resolved_digest.to_string(),
            size: blobs[&img.resolved_digest].size as i64,
            annotations: Default::default(),
        };
        let mut names = Vec::new();
        if img.name.tag().is_some() {
            names.push(img.name.to_string());
        }
        names.push(
            img.name
                .with_digest(img.resolved_digest.clone())
                .to_string(),
        );
        names.push(img.config_digest.to_string());
        let mut labels: HashMap<String, String> =
            [(LABEL_CRI_MANAGED.to_string(), "managed".to_string())].into();
        if opts.pin {
            labels.insert(LABEL_CRI_PINNED.to_string(), "pinned".to_string());
        }
        for name in &names {
            put_image(&ctr, name, &target, &labels).await?;
            report.image_names.push(name.clone());
        }
        report.images.push(AdoptedImage {
            reference: img.reference.clone(),
            name: img.name.to_string(),
            digest: img.resolved_digest.to_string(),
            image_id: img.config_digest.to_string(),
        });
    }

    if let Some(dir) = &staging {
        // Every staged tree has been moved in; an error here leaves only an
        // empty directory.
        let _ = std::fs::remove_dir(dir);
    }

    // The images hold everything now.
    let del = containerd_client::services::v1::DeleteRequest {
        id: lease_id,
        sync: false,
    };
    ctr.lease = None;
    match ctr.leases().delete(ctr.req(del)).await {
        Ok(_) => {}
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(anyhow!(s)).context("removing the import lease"),
    }
    report.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    Ok(report)
}

/// The `root` a containerd plugin of `kind` exports (introspection), if any.
async fn plugin_root(channel: &Channel, filter: &str) -> Result<Option<PathBuf>> {
    use containerd_client::services::v1::PluginsRequest;
    use containerd_client::services::v1::introspection_client::IntrospectionClient;
    let plugins = IntrospectionClient::new(channel.clone())
        .plugins(Request::new(PluginsRequest {
            filters: vec![filter.to_string()],
        }))
        .await
        .context("containerd introspection")?
        .into_inner()
        .plugins;
    Ok(plugins
        .iter()
        .find_map(|p| p.exports.get("root"))
        .map(PathBuf::from))
}

fn media_type_of(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    v["mediaType"].as_str().map(str::to_owned)
}

/// Registers one blob; true if this run moved it in, false if containerd
/// already had it.
async fn adopt_blob(
    ctr: &Ctr,
    layout: &SeedLayout,
    content_blobs: &Path,
    plan: &BlobPlan,
    report: &mut AdoptReport,
) -> Result<bool> {
    let d = &plan.digest;
    let info = ctr
        .content()
        .info(ctr.req(InfoRequest {
            digest: d.to_string(),
        }))
        .await;
    let adopted = match info {
        Ok(_) => false,
        Err(s) if s.code() == Code::NotFound => {
            let from = layout.blob(d);
            let to = content_blobs.join(d.hex());
            if from.exists() {
                let (a, b) = (
                    std::fs::metadata(&from)?.dev(),
                    std::fs::metadata(content_blobs)?.dev(),
                );
                if a != b {
                    bail!(
                        "blob {d}: {} and the content store {} are on different filesystems; \
                         adopt moves, it does not copy (use --mode copy)",
                        from.display(),
                        content_blobs.display()
                    );
                }
                std::fs::rename(&from, &to)
                    .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
            } else if !to.exists() {
                bail!("blob {d} is missing from the volume ({})", from.display());
            }
            commit_in_place(ctr, d, plan.size, report)
                .await
                .with_context(|| format!("registering blob {d}"))?;
            true
        }
        Err(s) => return Err(anyhow!(s)).with_context(|| format!("content Info {d}")),
    };
    // Labels (also on blobs containerd had, so its GC follows our images).
    let mut info = containerd_client::services::v1::Info {
        digest: d.to_string(),
        ..Default::default()
    };
    info.labels = plan
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let paths = plan.labels.keys().map(|k| format!("labels.{k}")).collect();
    ctr.content()
        .update(ctr.req(UpdateRequest {
            info: Some(info),
            update_mask: Some(prost_types::FieldMask { paths }),
        }))
        .await
        .with_context(|| format!("labelling blob {d}"))?;
    Ok(adopted)
}

/// A content Write for a blob already sitting at its final path: containerd
/// finds the data complete and only records it.
async fn commit_in_place(ctr: &Ctr, d: &Digest, size: u64, report: &mut AdoptReport) -> Result<()> {
    let r#ref = format!("coral-adopt-{}", d.hex());
    let stat = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: r#ref.clone(),
        total: size as i64,
        expected: d.to_string(),
        ..Default::default()
    };
    let commit = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: r#ref.clone(),
        total: size as i64,
        expected: d.to_string(),
        offset: size as i64,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(stat).await.ok();
    let mut stream = match ctr
        .content()
        .write(ctr.req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
    {
        Ok(s) => s.into_inner(),
        // The store found the blob by digest: registered.
        Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
        Err(s) => return Err(anyhow!(s)),
    };
    let first = match stream.message().await {
        Ok(Some(m)) => m,
        Ok(None) => bail!("containerd closed the write stream"),
        Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
        Err(s) => return Err(anyhow!(s)),
    };
    if first.offset != size as i64 {
        // This containerd does not see the moved file as the write's data:
        // stream it (a copy; said in the report).
        report.fallbacks.push(format!(
            "blob {d}: containerd saw offset {} of {size}; streamed instead",
            first.offset
        ));
        bail!(
            "containerd did not find blob {d} in place (offset {} of {size})",
            first.offset
        );
    }
    tx.send(commit).await.ok();
    drop(tx);
    match stream.message().await {
        Ok(Some(m)) if m.digest == d.to_string() || m.action == WriteAction::Commit as i32 => {
            Ok(())
        }
        Ok(Some(m)) => bail!("containerd committed {} instead of {d}", m.digest),
        Ok(None) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(anyhow!(s)),
    }
}

/// The directory a prepared snapshot's changes go to.
fn upper_dir(mounts: &[Mount]) -> Result<PathBuf> {
    let m = mounts
        .first()
        .context("the snapshotter returned no mount")?;
    match m.r#type.as_str() {
        "bind" => Ok(PathBuf::from(&m.source)),
        "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from)
            .context("an overlay mount without upperdir"),
        other => bail!(
            "unsupported snapshot mount type {other:?} (adopt needs the overlayfs snapshotter)"
        ),
    }
}

/// Registers one layer tree as the committed snapshot `chain`; true if this
/// run moved it in.
async fn adopt_layer(
    ctr: &Ctr,
    tree: &Path,
    snapshotter: &str,
    chain: &ChainId,
    parent: Option<&ChainId>,
) -> Result<bool> {
    if snapshot_exists(ctr, snapshotter, chain).await? {
        return Ok(false);
    }
    let key = format!("coral-adopt-{}", chain.hex());
    let prepare = PrepareSnapshotRequest {
        snapshotter: snapshotter.into(),
        key: key.clone(),
        parent: parent.map(|p| p.to_string()).unwrap_or_default(),
        labels: Default::default(),
    };
    let mounts = match ctr.snapshots().prepare(ctr.req(prepare.clone())).await {
        Ok(r) => r.into_inner().mounts,
        Err(s) if s.code() == Code::AlreadyExists => {
            // An earlier run was killed after Prepare.
            let mounts = ctr
                .snapshots()
                .mounts(ctr.req(MountsRequest {
                    snapshotter: snapshotter.into(),
                    key: key.clone(),
                }))
                .await
                .with_context(|| format!("snapshot Mounts {key}"))?
                .into_inner()
                .mounts;
            if !tree.exists() {
                // The tree was already moved in: only the commit is left.
                mounts
            } else {
                ctr.snapshots()
                    .remove(ctr.req(RemoveSnapshotRequest {
                        snapshotter: snapshotter.into(),
                        key: key.clone(),
                    }))
                    .await
                    .with_context(|| format!("removing the stale snapshot {key}"))?;
                ctr.snapshots()
                    .prepare(ctr.req(prepare))
                    .await
                    .with_context(|| format!("snapshot Prepare {key}"))?
                    .into_inner()
                    .mounts
            }
        }
        Err(s) => {
            return Err(anyhow!(s))
                .with_context(|| format!("snapshot Prepare {key} (parent {parent:?})"));
        }
    };
    let upper = upper_dir(&mounts)?;
    if tree.exists() {
        let (a, b) = (
            std::fs::metadata(tree)?.dev(),
            std::fs::metadata(&upper)?.dev(),
        );
        if a != b {
            bail!(
                "layer {chain}: {} and the snapshot directory {} are on different filesystems; \
                 adopt moves, it does not copy (use --mode copy)",
                tree.display(),
                upper.display()
            );
        }
        std::fs::remove_dir(&upper).with_context(|| {
            format!("removing the fresh snapshot directory {}", upper.display())
        })?;
        std::fs::rename(tree, &upper)
            .with_context(|| format!("moving {} to {}", tree.display(), upper.display()))?;
    } else if std::fs::read_dir(&upper)?.next().is_none() {
        bail!(
            "layer {chain} is missing from the volume ({})",
            tree.display()
        );
    }
    ctr.snapshots()
        .commit(ctr.req(CommitSnapshotRequest {
            snapshotter: snapshotter.into(),
            name: chain.to_string(),
            key,
            labels: Default::default(),
        }))
        .await
        .with_context(|| format!("snapshot Commit {chain}"))?;
    Ok(true)
}

/// Whether the committed snapshot `chain` exists.
async fn snapshot_exists(ctr: &Ctr, snapshotter: &str, chain: &ChainId) -> Result<bool> {
    let stat = ctr
        .snapshots()
        .stat(ctr.req(StatSnapshotRequest {
            snapshotter: snapshotter.into(),
            key: chain.to_string(),
        }))
        .await;
    match stat {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(anyhow!(s)).with_context(|| format!("snapshot Stat {chain}")),
    }
}

/// Where `--mode copy` copies layer trees before moving them into their
/// snapshots: inside the snapshotter's root, so the move is a rename.
async fn staging_dir(ctr: &Ctr, snapshotter: &str, content_root: &Path) -> Result<PathBuf> {
    let root = plugin_root(
        &ctr.channel,
        &format!("type==io.containerd.snapshotter.v1,id=={snapshotter}"),
    )
    .await?
    // Older containerd does not export it: the default layout.
    .or_else(|| {
        content_root
            .parent()
            .map(|r| r.join(format!("io.containerd.snapshotter.v1.{snapshotter}")))
    })
    .with_context(|| format!("where the {snapshotter} snapshotter keeps its snapshots"))?;
    let dir = root.join(COPY_STAGING);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Copies the trees of `chains` from the volume into `staging/<hex>`,
/// `jobs` at a time; returns the bytes of file data written. A tree is
/// copied under a `.partial` name and renamed when complete, so a killed
/// run leaves only partial copies, which the next run discards.
async fn copy_layers(
    layout: &SeedLayout,
    staging: &Path,
    chains: Vec<ChainId>,
    jobs: usize,
) -> Result<u64> {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for chain in chains {
        let src = layout.layer(&chain);
        let done = staging.join(chain.hex());
        let partial = staging.join(format!("{}.partial", chain.hex()));
        let limit = limit.clone();
        tasks.spawn(async move {
            let _permit = limit
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            tokio::task::spawn_blocking(move || -> Result<u64> {
                if done.exists() {
                    return Ok(0);
                }
                if !src.is_dir() {
                    bail!(
                        "layer {chain} is missing from the volume ({})",
                        src.display()
                    );
                }
                if partial.exists() {
                    std::fs::remove_dir_all(&partial)
                        .with_context(|| format!("removing {}", partial.display()))?;
                }
                let stats = coral_seed::copytree::copy_tree(&src, &partial)
                    .with_context(|| format!("copying layer {chain}"))?;
                // On disk before it gets the name a rerun trusts.
                let dir = std::fs::File::open(&partial)?;
                rustix::fs::syncfs(&dir)
                    .with_context(|| format!("syncing {}", partial.display()))?;
                std::fs::rename(&partial, &done)
                    .with_context(|| format!("renaming {}", partial.display()))?;
                Ok(stats.bytes)
            })
            .await
            .context("a layer copy panicked")?
        });
    }
    let mut bytes = 0;
    while let Some(r) = tasks.join_next().await {
        bytes += r.context("a layer copy task")??;
    }
    Ok(bytes)
}

/// Writes the blobs containerd does not have through its content API,
/// `jobs` at a time; returns how many it wrote and their bytes.
async fn copy_blobs(
    ctr: &Ctr,
    layout: &SeedLayout,
    plans: &[&BlobPlan],
    jobs: usize,
) -> Result<(u64, u64)> {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for plan in plans {
        let (ctr, limit) = (ctr.clone(), limit.clone());
        let (digest, size, path) = (plan.digest.clone(), plan.size, layout.blob(&plan.digest));
        tasks.spawn(async move {
            let _permit = limit
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let info = ctr
                .content()
                .info(ctr.req(InfoRequest {
                    digest: digest.to_string(),
                }))
                .await;
            match info {
                Ok(_) => Ok(None),
                Err(s) if s.code() == Code::NotFound => copy_blob(&ctr, &path, &digest, size)
                    .await
                    .with_context(|| format!("writing blob {digest} to containerd")),
                Err(s) => Err(anyhow!(s)).with_context(|| format!("content Info {digest}")),
            }
        });
    }
    let (mut count, mut bytes) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        if let Some(n) = r.context("a blob write task")?? {
            count += 1;
            bytes += n;
        }
    }
    Ok((count, bytes))
}

/// Streams one blob from the volume through a content Write; containerd
/// checks size and digest before it commits. Returns the bytes sent, or
/// None when containerd turned out to have it. It always starts at offset 0
/// (containerd then truncates whatever ingest a killed run left under the
/// same ref): the source is a local disk, resuming would save little, and a
/// damaged ingest could never be resumed into a good blob.
async fn copy_blob(ctr: &Ctr, path: &Path, d: &Digest, size: u64) -> Result<Option<u64>> {
    use tokio::io::AsyncReadExt;
    let r#ref = format!("coral-copy-{}", d.hex());
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("blob {d} is missing from the volume ({})", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // The data goes out from one task while this one reads containerd's
    // answers (one per message), so neither side's flow control stalls the
    // other. Size and digest go with the first and the last message only.
    let sender = tokio::spawn({
        let (path, d, r#ref) = (path.to_path_buf(), d.to_string(), r#ref.clone());
        async move {
            let mut offset = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            while offset < size {
                let want = (size - offset).min(buf.len() as u64) as usize;
                let n = file.read(&mut buf[..want]).await?;
                if n == 0 {
                    bail!("{} is shorter than its {size} bytes", path.display());
                }
                let mut chunk = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: r#ref.clone(),
                    offset: offset as i64,
                    data: buf[..n].to_vec(),
                    ..Default::default()
                };
                if offset == 0 {
                    chunk.total = size as i64;
                    chunk.expected = d.clone();
                }
                if tx.send(chunk).await.is_err() {
                    return Ok(offset); // the stream ended: its error tells why
                }
                offset += n as u64;
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref,
                offset: size as i64,
                total: size as i64,
                expected: d,
                ..Default::default()
            };
            tx.send(commit).await.ok();
            anyhow::Ok(offset)
        }
    });
    let mut stream = match ctr
        .content()
        .write(ctr.req(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => {
            sender.abort();
            return match s.code() {
                Code::AlreadyExists => Ok(None),
                _ => Err(anyhow!(s)),
            };
        }
    };
    let answer = loop {
        match stream.message().await {
            Ok(Some(m)) if m.action == WriteAction::Commit as i32 => break Ok(true),
            Ok(Some(_)) => {}
            Ok(None) => break Err(anyhow!("containerd ended the write before the commit")),
            Err(s) if s.code() == Code::AlreadyExists => break Ok(false),
            Err(s) => break Err(anyhow!(s)),
        }
    };
    if !matches!(answer, Ok(true)) {
        sender.abort();
    }
    let sent = sender.await;
    match answer? {
        true => Ok(Some(sent.context("the blob sender")??)),
        false => Ok(None),
    }
}

async fn put_image(
    ctr: &Ctr,
    name: &str,
    target: &Descriptor,
    labels: &HashMap<String, String>,
) -> Result<()> {
    let image = Image {
        name: name.to_string(),
        labels: labels.clone(),
        target: Some(target.clone()),
        created_at: None,
        updated_at: None,
    };
    match ctr
        .images()
        .get(ctr.req(GetImageRequest { name: name.into() }))
        .await
    {
        Ok(existing) => {
            let existing = existing.into_inner().image;
            if existing
                .as_ref()
                .and_then(|i| i.target.as_ref())
                .map(|t| &t.digest)
                == Some(&target.digest)
                && labels
                    .iter()
                    .all(|(k, v)| existing.as_ref().and_then(|i| i.labels.get(k)) == Some(v))
            {
                return Ok(());
            }
            let mut paths = vec!["target".to_string()];
            paths.extend(labels.keys().map(|k| format!("labels.{k}")));
            ctr.images()
                .update(ctr.req(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths }),
                    ..Default::default()
                }))
                .await
                .with_context(|| format!("updating image {name}"))?;
        }
        Err(s) if s.code() == Code::NotFound => {
            match ctr
                .images()
                .create(ctr.req(CreateImageRequest {
                    image: Some(image),
                    ..Default::default()
                }))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {}
                Err(s) => return Err(anyhow!(s)).with_context(|| format!("creating image {name}")),
            }
        }
        Err(s) => return Err(anyhow!(s)).with_context(|| format!("getting image {name}")),
    }
    Ok(())
}
