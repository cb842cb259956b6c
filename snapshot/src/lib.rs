//! Snapshot backends: what turns a built seed volume image into something a
//! node can be launched with. One interface, three kinds:
//!
//! - [`Kind::File`] (default, no cloud): the image file itself, plus a
//!   sidecar record `IMAGE.snapshot.json` whose ID is the image's SHA-256;
//! - [`Kind::EbsDirect`]: an EBS snapshot uploaded block by block through
//!   the EBS direct APIs, no instance or volume needed ([`ebs_direct`]);
//! - [`Kind::Ebs`]: CreateSnapshot of the EBS volume the image was written
//!   to, for a builder on EC2 with the volume attached ([`ebs`]).
//!
//! AWS endpoints and credentials come from the standard configuration chain
//! (`aws-config`): `AWS_ENDPOINT_URL` points it at a local server in tests.
//! Nothing here logs credentials.

pub mod blockmap;
pub mod blocks;
pub mod ebs;
pub mod ebs_direct;
pub mod file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use coral_seed::Digest;
use serde::Serialize;

/// Tag keys every snapshot carries, so the controller can find them.
pub const TAG_MANIFEST_DIGEST: &str = "coral/manifest-digest";
pub const TAG_SEED_KEY: &str = "coral/seed-key";
pub const TAG_BUILD_ID: &str = "coral/build-id";
/// ebs-direct: the StartSnapshot client token, to find a snapshot whose
/// start was answered but the answer lost.
pub const TAG_CLIENT_TOKEN: &str = "coral/client-token";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    EbsDirect,
    Ebs,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "file" => Ok(Kind::File),
            "ebs-direct" => Ok(Kind::EbsDirect),
            "ebs" => Ok(Kind::Ebs),
            other => Err(format!(
                "{other:?} is not a snapshot kind: file, ebs-direct or ebs"
            )),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::File => "file",
            Kind::EbsDirect => "ebs-direct",
            Kind::Ebs => "ebs",
        })
    }
}

/// What the seed volume is, from its manifest: recorded with the snapshot.
#[derive(Debug, Clone)]
pub struct SeedInfo {
    pub manifest_digest: Digest,
    pub seed_key: Digest,
    pub build_id: String,
}

/// The options, named the same in `build --snapshot` and `snapshot`.
#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    /// The snapshot this one is a child of (EBS: ParentSnapshotId).
    pub parent: Option<String>,
    /// Encrypt with this KMS key (EBS).
    pub kms_key: Option<String>,
    /// Extra tags (the coral/* tags are always added).
    pub tags: Vec<(String, String)>,
    pub description: Option<String>,
    /// Blocks uploaded at once (ebs-direct).
    pub workers: usize,
    /// Attempts per request (first try included), with the SDK's backoff.
    pub attempts: u32,
    /// The whole snapshot, waiting included, ends after this long.
    pub deadline: Duration,
    /// How often completion is polled.
    pub poll_interval: Duration,
    /// `ebs`: the volume to snapshot (default: found from the output device).
    pub volume_id: Option<String>,
    /// The image the parent snapshot was made from: its recorded block map
    /// (`IMAGE.blocks`) says which blocks the parent holds, so only blocks
    /// that differ are sent; its record names the parent when `parent` is
    /// not given.
    pub parent_image: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            kind: Kind::File,
            parent: None,
            kms_key: None,
            tags: Vec::new(),
            description: None,
            workers: 32,
            attempts: 6,
            deadline: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(5),
            volume_id: None,
            parent_image: None,
        }
    }
}

/// Parses `KEY=VALUE` (a `--tag`).
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && k.len() <= 128 && v.len() <= 256 => {
            if k.starts_with("aws:") {
                Err(format!("{k:?}: tag keys starting with aws: are reserved"))
            } else {
                Ok((k.to_string(), v.to_string()))
            }
        }
        _ => Err(format!(
            "{s:?} is not KEY=VALUE (a key of 1 to 128 characters, a value of at most 256)"
        )),
    }
}

/// What was made: the build report's `snapshot`, and the file backend's
/// sidecar record.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub kind: String,
    /// `sha256:…` of the image (file), or the EBS snapshot ID.
    pub id: String,
    pub image: PathBuf,
    /// The image's size in bytes.
    pub size: u64,
    /// The size of a volume made from it (EBS: whole GiB).
    pub volume_size_gib: u64,
    pub manifest_digest: String,
    pub seed_key: String,
    pub build_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub encrypted: bool,
    pub tags: BTreeMap<String, String>,
    /// ebs-direct: blocks sent, and blocks left out (holes, zeros).
    #[serde(default)]
    pub blocks_sent: u64,
    #[serde(default)]
    pub blocks_skipped: u64,
    #[serde(default)]
    pub bytes_sent: u64,
    /// ebs-direct with a parent image: blocks the parent already holds.
    #[serde(default)]
    pub blocks_unchanged: u64,
    /// The image the parent snapshot was made from, when given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parent_image: Option<PathBuf>,
    /// The block map file written beside the image (file name) and its
    /// SHA-256: what a later incremental snapshot compares against.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub block_map: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub block_map_sha256: Option<String>,
    pub created_at: String,
    pub seconds: f64,
}

impl Record {
    fn new(kind: Kind, id: String, image: &Path, size: u64, seed: &SeedInfo, o: &Options) -> Self {
        Record {
            kind: kind.to_string(),
            id,
            image: image.to_path_buf(),
            size,
            volume_size_gib: size.div_ceil(blocks::GIB).max(1),
            manifest_digest: seed.manifest_digest.to_string(),
            seed_key: seed.seed_key.to_string(),
            build_id: seed.build_id.clone(),
            parent: o.parent.clone(),
            encrypted: o.kms_key.is_some(),
            tags: all_tags(seed, o),
            blocks_sent: 0,
            blocks_skipped: 0,
            bytes_sent: 0,
            blocks_unchanged: 0,
            parent_image: o.parent_image.clone(),
            block_map: None,
            block_map_sha256: None,
            created_at: coral_seed::time::rfc3339_of(std::time::SystemTime::now()),
            seconds: 0.0,
        }
    }
}

/// The user's tags plus coral's own (which win).
pub fn all_tags(seed: &SeedInfo, o: &Options) -> BTreeMap<String, String> {
    let mut tags: BTreeMap<String, String> = o.tags.iter().cloned().collect();
    tags.insert(TAG_MANIFEST_DIGEST.into(), seed.manifest_digest.to_string());
    tags.insert(TAG_SEED_KEY.into(), seed.seed_key.to_string());
    tags.insert(TAG_BUILD_ID.into(), seed.build_id.clone());
    tags
}

/// The AWS configuration: the standard chain, with coral's retry and
/// timeout bounds.
pub async fn aws_config(o: &Options) -> aws_config::SdkConfig {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(o.attempts.max(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(30))
                .operation_attempt_timeout(Duration::from_secs(120))
                .build(),
        )
        .load()
        .await
}

/// What the parent image says about the parent snapshot: its ID (when its
/// record is an ebs-direct one) and its block map.
struct Base {
    snapshot: Option<String>,
    map: Option<blockmap::BlockMap>,
}

/// Reads the parent image's record and block map. A map is used only with
/// the snapshot it describes: if `--parent-snapshot` names another one, or
/// the record has no map, every block is compared against zeros instead.
fn read_base(parent_image: &Path, parent: Option<&str>) -> Result<Base> {
    let record = match file::read_record(parent_image) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                "{e:#}: {} has no usable snapshot record; no block is assumed unchanged",
                parent_image.display()
            );
            return Ok(Base {
                snapshot: None,
                map: None,
            });
        }
    };
    let recorded = (record.kind == Kind::EbsDirect.to_string()).then(|| record.id.clone());
    if let (Some(p), Some(r)) = (parent, recorded.as_deref())
        && p != r
    {
        tracing::warn!(
            parent = p,
            recorded = r,
            "--parent-snapshot is not the snapshot recorded for --parent-image; \
             its block map is not used"
        );
        return Ok(Base {
            snapshot: None,
            map: None,
        });
    }
    if parent.is_none() && recorded.is_none() {
        return Ok(Base {
            snapshot: None,
            map: None,
        });
    }
    let map = match (&record.block_map, &record.block_map_sha256) {
        (Some(name), Some(sum)) => {
            let path = parent_image.with_file_name(name);
            Some(blockmap::BlockMap::read(&path, sum)?)
        }
        _ => {
            tracing::warn!(
                "{} was snapshotted without a block map; no block is assumed unchanged",
                parent_image.display()
            );
            None
        }
    };
    if let Some(m) = &map
        && m.block_size != blocks::EBS_BLOCK_SIZE
    {
        bail!(
            "the block map of {} has {}-byte blocks, not EBS's {}",
            parent_image.display(),
            m.block_size,
            blocks::EBS_BLOCK_SIZE
        );
    }
    Ok(Base {
        snapshot: recorded,
        map,
    })
}

/// Writes the block map beside `image` and the record naming it.
fn write_map_and_record(image: &Path, map: &blockmap::BlockMap, record: &mut Record) -> Result<()> {
    let path = blockmap::map_path(image);
    let sum = map.write(&path)?;
    record.block_map = path.file_name().map(|n| n.to_string_lossy().into_owned());
    record.block_map_sha256 = Some(sum);
    file::write_record(image, record)
}

/// Makes the snapshot of `image` (an image file, or for `ebs` the device
/// written) that `o.kind` says. For an image file, the record and block map
/// are written beside it (`IMAGE.snapshot.json`, `IMAGE.blocks`).
pub async fn snapshot(image: &Path, seed: &SeedInfo, o: &Options) -> Result<Record> {
    if o.kind == Kind::File && (o.parent.is_some() || o.kms_key.is_some()) {
        bail!(
            "--parent-snapshot and --kms-key are for EBS snapshots (--snapshot ebs-direct or ebs)"
        );
    }
    if o.kind == Kind::Ebs && o.parent_image.is_some() {
        bail!(
            "--parent-image is for --snapshot ebs-direct (and for building on an earlier image); \
             CreateSnapshot of a volume is incremental by itself"
        );
    }
    let is_file = std::fs::metadata(image).is_ok_and(|m| m.is_file());
    // An earlier record is for an earlier image: gone before anything else.
    if is_file {
        file::remove_record(image)?;
    }
    let started = std::time::Instant::now();
    let (mut record, map) = match o.kind {
        Kind::File => {
            let path = image.to_path_buf();
            let (hex, map) = tokio::task::spawn_blocking(move || {
                blockmap::hash_image(&path, blocks::EBS_BLOCK_SIZE)
            })
            .await?
            .with_context(|| format!("hashing {}", image.display()))?;
            let record = Record::new(
                Kind::File,
                format!("sha256:{hex}"),
                image,
                map.image_size,
                seed,
                o,
            );
            (record, Some(map))
        }
        Kind::EbsDirect => {
            let mut o = o.clone();
            let base = match &o.parent_image {
                Some(p) => read_base(p, o.parent.as_deref())?,
                None => Base {
                    snapshot: None,
                    map: None,
                },
            };
            if o.parent.is_none() {
                o.parent = base.snapshot.clone();
            }
            let config = aws_config(&o).await;
            let (record, map) =
                ebs_direct::upload(&config, image, seed, &o, base.map.as_ref()).await?;
            (record, Some(map))
        }
        Kind::Ebs => {
            let config = aws_config(o).await;
            (ebs::create(&config, image, seed, o).await?, None)
        }
    };
    record.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    if is_file && let Some(map) = map {
        write_map_and_record(image, &map, &mut record)?;
    }
    Ok(record)
}
