//! From references to exact content: each reference is resolved to a digest
//! once, an index to the manifest for every requested platform (containerd's
//! matching and preference rules), and each manifest to its config and
//! layers, with every rule a consumer relies on checked up front.

use bytes::Bytes;
use coral_seed::{ChainId, DiffId, Digest, Platform, Reference};
use serde::Deserialize;

use crate::registry::{RegistryClient, RegistryError};
use crate::unpack::Compression;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const CONFIG_TYPES: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error("{image} has no manifest for {wanted} (it has: {available})")]
    NoPlatform {
        image: String,
        wanted: Platform,
        available: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<DescPlatform>,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DescPlatform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    created: Option<String>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<DiffId>,
}

/// One layer of one platform image.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    pub digest: Digest,
    pub media_type: String,
    pub compression: Compression,
    pub size: u64,
    pub diff_id: DiffId,
    pub chain_id: ChainId,
}

/// One image for one platform, fully resolved.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub platform: Platform,
    pub manifest: Descriptor,
    pub manifest_bytes: Bytes,
    pub config: Descriptor,
    pub config_bytes: Bytes,
    pub created: Option<String>,
    pub layers: Vec<PlannedLayer>,
}

/// A reference as asked, what it resolved to, and its platform images.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub asked: String,
    pub name: Reference,
    /// What the reference names: an index or a manifest.
    pub target: Descriptor,
    pub target_bytes: Bytes,
    pub index: Option<Descriptor>,
    pub images: Vec<PlatformImage>,
}

/// For the fuzzer ([`crate::fuzzing::oci_document`]): `bytes` read as an
/// index, a manifest and a config, with the checks [`resolve`] makes on
/// each (platforms, media types, foreign layers, diff IDs and chain IDs).
#[doc(hidden)]
pub fn check_documents(bytes: &[u8]) {
    if let Ok(idx) = serde_json::from_slice::<Index>(bytes) {
        for d in &idx.manifests {
            let _ = d.platform.as_ref().and_then(platform_of);
        }
    }
    if let Ok(m) = serde_json::from_slice::<Manifest>(bytes) {
        let _ = CONFIG_TYPES.contains(&m.config.media_type.as_str());
        for d in &m.layers {
            let _ = Compression::from_media_type(&d.media_type);
            let _ = d.urls.as_ref().is_some_and(|u| !u.is_empty());
        }
    }
    if let Ok(c) = serde_json::from_slice::<Config>(bytes) {
        let s = match &c.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{}", c.os, c.architecture, v),
            _ => format!("{}/{}", c.os, c.architecture),
        };
        let _ = s.parse::<Platform>();
        let chains = ChainId::chain(&c.rootfs.diff_ids);
        assert_eq!(chains.len(), c.rootfs.diff_ids.len());
    }
}

fn platform_of(p: &DescPlatform) -> Option<Platform> {
    let s = match &p.variant {
        Some(v) if !v.is_empty() => format!("{}/{}/{}", p.os, p.architecture, v),
        _ => format!("{}/{}", p.os, p.architecture),
    };
    s.parse().ok()
}

pub async fn resolve(
    client: &RegistryClient,
    asked: &str,
    name: &Reference,
    platforms: &[Platform],
) -> Result<ResolvedImage, ResolveError> {
    let invalid = |reason: String| ResolveError::Invalid {
        image: asked.to_string(),
        reason,
    };
    let top = client.fetch_manifest(name, None).await?;
    let target = Descriptor {
        media_type: top.media_type.clone(),
        digest: top.digest.clone(),
        size: top.bytes.len() as u64,
        platform: None,
        urls: None,
    };
    let mut images = Vec::new();
    let index;
    match top.media_type.as_str() {
        MT_OCI_INDEX | MT_DOCKER_LIST => {
            index = Some(target.clone());
            let idx: Index = serde_json::from_slice(&top.bytes)
                .map_err(|e| invalid(format!("index {} is malformed: {e}", top.digest)))?;
            let candidates: Vec<(Platform, &Descriptor)> = idx
                .manifests
                .iter()
                .filter(|d| matches!(d.media_type.as_str(), MT_OCI_MANIFEST | MT_DOCKER_MANIFEST))
                .filter_map(|d| Some((platform_of(d.platform.as_ref()?)?, d)))
                .collect();
            let mut chosen: Vec<&Descriptor> = Vec::new();
            for want in platforms {
                let best = candidates
                    .iter()
                    .filter_map(|(p, d)| want.preference(p).map(|rank| (rank, *d)))
                    .min_by_key(|(rank, _)| *rank);
                match best {
                    Some((_, d)) => {
                        if !chosen.iter().any(|c| c.digest == d.digest) {
                            chosen.push(d);
                        }
                    }
                    None => {
                        return Err(ResolveError::NoPlatform {
                            image: asked.to_string(),
                            wanted: want.clone(),
                            available: candidates
                                .iter()
                                .map(|(p, _)| p.to_string())
                                .collect::<Vec<_>>()
                                .join(", "),
                        });
                    }
                }
            }
            for d in chosen {
                let m = client.fetch_manifest(name, Some(&d.digest)).await?;
                if m.bytes.len() as u64 != d.size {
                    return Err(invalid(format!(
                        "manifest {} is {} bytes, the index says {}",
                        d.digest,
                        m.bytes.len(),
                        d.size
                    )));
                }
                let desc = Descriptor {
                    media_type: m.media_type.clone(),
                    ..d.clone()
                };
                images.push(platform_image(client, asked, name, desc, m.bytes, None).await?);
            }
        }
        MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => {
            index = None;
            let img = platform_image(
                client,
                asked,
                name,
                target.clone(),
                top.bytes.clone(),
                Some(platforms),
            )
            .await?;
            images.push(img);
        }
        "application/vnd.docker.distribution.manifest.v1+json"
        | "application/vnd.docker.distribution.manifest.v1+prettyjws" => {
            return Err(invalid(
                "is a Docker schema 1 image, which containerd no longer pulls either; \
                 push it again with a current tool"
                    .into(),
            ));
        }
        other => {
            return Err(invalid(format!(
                "is a {other}, not a container image manifest or index"
            )));
        }
    }
    Ok(ResolvedImage {
        asked: asked.to_string(),
        name: name.clone(),
        target,
        target_bytes: top.bytes,
        index,
        images,
    })
}

async fn platform_image(
    client: &RegistryClient,
    asked: &str,
    name: &Reference,
    manifest: Descriptor,
    bytes: Bytes,
    // For a reference naming a single manifest: the platforms asked for, one
    // of which its config must match.
    check_platforms: Option<&[Platform]>,
) -> Result<PlatformImage, ResolveError> {
    let invalid = |reason: String| ResolveError::Invalid {
        image: asked.to_string(),
        reason,
    };
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("manifest {} is malformed: {e}", manifest.digest)))?;
    if !CONFIG_TYPES.contains(&m.config.media_type.as_str()) {
        return Err(invalid(format!(
            "manifest {} has a config of type {:?}: an artifact, not a container image",
            manifest.digest, m.config.media_type
        )));
    }
    let config_bytes = client
        .fetch_small_blob(name, &m.config.digest, m.config.size)
        .await?;
    let config: Config = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("config {} is malformed: {e}", m.config.digest)))?;
    if config.rootfs.kind != "layers" {
        return Err(invalid(format!(
            "config {} has rootfs type {:?}, not \"layers\"",
            m.config.digest, config.rootfs.kind
        )));
    }
    if config.rootfs.diff_ids.len() != m.layers.len() {
        return Err(invalid(format!(
            "manifest {} has {} layers but its config lists {} diff IDs",
            manifest.digest,
            m.layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    let platform = {
        let s = match &config.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{}", config.os, config.architecture, v),
            _ => format!("{}/{}", config.os, config.architecture),
        };
        match (
            manifest.platform.as_ref().and_then(platform_of),
            s.parse::<Platform>(),
        ) {
            (Some(p), _) => p,
            (None, Ok(p)) => p,
            (None, Err(e)) => {
                return Err(invalid(format!(
                    "config {} has no usable platform: {e}",
                    m.config.digest
                )));
            }
        }
    };
    // A single-platform image must serve every platform asked for, as an
    // index must: a seed that silently lacks an image on some nodes is worse
    // than a build that says so.
    if let Some(missing) = check_platforms
        .unwrap_or_default()
        .iter()
        .find(|w| w.preference(&platform).is_none())
    {
        return Err(ResolveError::NoPlatform {
            image: asked.to_string(),
            wanted: missing.clone(),
            available: platform.to_string(),
        });
    }
    let chains = ChainId::chain(&config.rootfs.diff_ids);
    let mut layers = Vec::new();
    for ((d, diff_id), chain_id) in m.layers.iter().zip(&config.rootfs.diff_ids).zip(chains) {
        let compression = Compression::from_media_type(&d.media_type).ok_or_else(|| {
            invalid(format!(
                "layer {} has media type {:?}, which is not a tar, tar+gzip or tar+zstd layer",
                d.digest, d.media_type
            ))
        })?;
        if d.urls.as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(invalid(format!(
                "layer {} is a foreign layer served from other URLs; coral only pulls from the registry",
                d.digest
            )));
        }
        layers.push(PlannedLayer {
            digest: d.digest.clone(),
            media_type: d.media_type.clone(),
            compression,
            size: d.size,
            diff_id: diff_id.clone(),
            chain_id,
        });
    }
    Ok(PlatformImage {
        platform,
        manifest,
        manifest_bytes: bytes,
        config: m.config,
        config_bytes,
        created: config.created,
        layers,
    })
}
