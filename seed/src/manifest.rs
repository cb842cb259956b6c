//! The seed manifest (`.coral/manifest.json`), format v1: what a volume holds
//! and how every piece of it can be checked.
//!
//! Compatibility rule: a reader accepts any minor version of the major it
//! knows (minor versions only add fields, which serde ignores) and refuses any
//! other major version with an error that names both.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::digest::{ChainId, DiffId, Digest};
use crate::platform::Platform;
use crate::reference::Reference;

/// The format version this crate writes.
pub const FORMAT_VERSION: FormatVersion = FormatVersion { major: 1, minor: 0 };

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FormatVersion {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl FromStr for FormatVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (major, minor) = s
            .split_once('.')
            .ok_or_else(|| format!("format version {s:?} is not MAJOR.MINOR"))?;
        let num = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("format version {s:?} is not MAJOR.MINOR"))
        };
        Ok(FormatVersion {
            major: num(major)?,
            minor: num(minor)?,
        })
    }
}

impl Serialize for FormatVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FormatVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("seed manifest is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("seed manifest has no \"formatVersion\": this is not a coral seed manifest")]
    MissingVersion,
    #[error("seed manifest has an invalid formatVersion: {0}")]
    BadVersion(String),
    #[error(
        "seed manifest format {found} is not supported by this coral (it reads {supported}.x): \
         use a coral release that supports format {found}, or rebuild the volume"
    )]
    UnsupportedVersion {
        found: FormatVersion,
        supported: u32,
    },
    #[error("seed manifest is inconsistent: {0}")]
    Inconsistent(String),
}

/// One compressed layer blob of an image and the extracted tree it became.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedLayer {
    /// Digest of the blob as the registry serves it (compressed).
    pub digest: Digest,
    pub media_type: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Digest of the uncompressed tar stream.
    pub diff_id: DiffId,
    /// Chain ID of this layer on top of the ones below it: the name of its
    /// tree under `.coral/layers/` and of containerd's committed snapshot.
    pub chain_id: ChainId,
    /// Bytes of regular-file content in the extracted tree.
    pub unpacked_size: u64,
    /// [`crate::tree::tree_digest`] of the extracted tree, as built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_digest: Option<Digest>,
}

/// One image, for one platform, as asked for and as resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedImage {
    /// The reference exactly as the user gave it.
    pub reference: String,
    /// The normalised reference (`docker.io/library/ubuntu:latest`).
    pub name: Reference,
    /// What the reference resolved to: an index digest or a manifest digest.
    pub resolved_digest: Digest,
    /// The index the manifest was chosen from, when the reference named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config_digest: Digest,
    pub platform: Platform,
    /// Bottom layer first, as in the image manifest.
    pub layers: Vec<SeedLayer>,
    /// Manifest + config + compressed layers, in bytes.
    pub size: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub images: u64,
    /// Distinct blobs (indexes, manifests, configs, layers).
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Distinct layer trees.
    pub layers: u64,
    pub unpacked_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeedManifest {
    pub format_version: FormatVersion,
    /// Unique per build (a deterministic build derives it from the seed key).
    pub build_id: String,
    /// `coral-builder <version>`.
    pub tool_version: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// The platforms asked for.
    pub platforms: Vec<Platform>,
    /// Identity of the inputs: see [`seed_key`].
    pub seed_key: Digest,
    pub images: Vec<SeedImage>,
    pub totals: Totals,
}

/// The identity of a seed set's *inputs*: the platforms and every resolved
/// image, independent of order. Two builds with the same seed key hold the
/// same images, so a controller can tell whether a snapshot is current
/// without building anything.
pub fn seed_key<'a>(
    platforms: &[Platform],
    images: impl IntoIterator<Item = (&'a Reference, &'a Digest)>,
) -> Digest {
    let platforms: BTreeSet<String> = platforms.iter().map(|p| p.to_string()).collect();
    let images: BTreeSet<String> = images
        .into_iter()
        .map(|(r, d)| format!("{r} {d}"))
        .collect();
    let mut text = format!("coral-seed-key/v{}\n", FORMAT_VERSION.major);
    for p in &platforms {
        text.push_str(&format!("platform {p}\n"));
    }
    for i in &images {
        text.push_str(&format!("image {i}\n"));
    }
    Digest::sha256_of(text.as_bytes())
}

impl SeedManifest {
    /// Parses a manifest, refusing unknown major versions before anything else
    /// (a newer format may change the meaning of fields that still parse),
    /// then checks that it is internally consistent.
    pub fn from_json(bytes: &[u8]) -> Result<SeedManifest, ManifestError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(ManifestError::Json)?;
        let version = value
            .get("formatVersion")
            .ok_or(ManifestError::MissingVersion)?
            .as_str()
            .ok_or_else(|| ManifestError::BadVersion("not a string".into()))?
            .parse::<FormatVersion>()
            .map_err(ManifestError::BadVersion)?;
        if version.major != FORMAT_VERSION.major {
            return Err(ManifestError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION.major,
            });
        }
        let manifest: SeedManifest = serde_json::from_value(value).map_err(ManifestError::Json)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The exact bytes written to `.coral/manifest.json`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a seed manifest always serialises");
        out.push(b'\n');
        out
    }

    /// The digest a node is told to expect (of [`Self::to_json`]'s bytes).
    pub fn digest(&self) -> Digest {
        Digest::sha256_of(&self.to_json())
    }

    /// Distinct layers across all images, keyed by chain ID.
    pub fn layers(&self) -> BTreeMap<&ChainId, &SeedLayer> {
        self.images
            .iter()
            .flat_map(|i| i.layers.iter())
            .map(|l| (&l.chain_id, l))
            .collect()
    }

    /// Checks what a reader relies on: every chain ID follows from the diff
    /// IDs below it, the seed key matches the images, and the totals add up.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Inconsistent(m));
        for image in &self.images {
            let diff_ids: Vec<DiffId> = image.layers.iter().map(|l| l.diff_id.clone()).collect();
            for (layer, want) in image.layers.iter().zip(ChainId::chain(&diff_ids)) {
                if layer.chain_id != want {
                    return bad(format!(
                        "image {} ({}): layer {} has chain ID {}, but its diff IDs give {}",
                        image.reference, image.platform, layer.digest, layer.chain_id, want
                    ));
                }
            }
            if image
                .name
                .digest()
                .is_some_and(|d| d != &image.resolved_digest)
            {
                return bad(format!(
                    "image {} was pinned to a digest but resolved to {}",
                    image.reference, image.resolved_digest
                ));
            }
        }
        let key = seed_key(
            &self.platforms,
            self.images.iter().map(|i| (&i.name, &i.resolved_digest)),
        );
        if key != self.seed_key {
            return bad(format!(
                "seed key {} does not match its images (they give {key})",
                self.seed_key
            ));
        }
        let layers = self.layers();
        let unpacked: u64 = layers.values().map(|l| l.unpacked_size).sum();
        if self.totals.images != self.images.len() as u64
            || self.totals.layers != layers.len() as u64
            || self.totals.unpacked_bytes != unpacked
        {
            return bad(format!(
                "totals {:?} do not match {} images, {} distinct layers, {} unpacked bytes",
                self.totals,
                self.images.len(),
                layers.len(),
                unpacked
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn sample() -> SeedManifest {
        let diffs = [DiffId::new(d(1)), DiffId::new(d(2))];
        let chain = ChainId::chain(&diffs);
        let layers: Vec<SeedLayer> = diffs
            .iter()
            .zip(&chain)
            .enumerate()
            .map(|(i, (diff, c))| SeedLayer {
                digest: d(10 + i as u8),
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                size: 100,
                diff_id: diff.clone(),
                chain_id: c.clone(),
                unpacked_size: 1000,
                tree_digest: None,
            })
            .collect();
        let name: Reference = "127.0.0.1:5000/coral/tiny".parse().unwrap();
        let platforms = vec![Platform::new("linux", "amd64", None)];
        let resolved = d(20);
        SeedManifest {
            format_version: FORMAT_VERSION,
            build_id: "b1".into(),
            tool_version: "coral-builder 0.1.0".into(),
            created: "2023-11-14T22:13:20Z".into(),
            seed_key: seed_key(&platforms, [(&name, &resolved)]),
            platforms,
            images: vec![SeedImage {
                reference: "127.0.0.1:5000/coral/tiny".into(),
                name,
                resolved_digest: resolved,
                index_digest: None,
                manifest_digest: d(20),
                manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                config_digest: d(21),
                platform: Platform::new("linux", "amd64", None),
                layers,
                size: 300,
            }],
            totals: Totals {
                images: 1,
                blobs: 4,
                blob_bytes: 400,
                layers: 2,
                unpacked_bytes: 2000,
            },
        }
    }

    #[test]
    fn manifest_round_trips_and_its_digest_is_stable() {
        let m = sample();
        let json = m.to_json();
        let back = SeedManifest::from_json(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.digest(), m.digest());
        let text = String::from_utf8(json).unwrap();
        assert!(text.contains("\"formatVersion\": \"1.0\""), "{text}");
        assert!(text.contains("\"chainId\""), "{text}");
    }

    #[test]
    fn newer_minor_version_with_extra_fields_is_accepted() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["formatVersion"] = "1.7".into();
        v["someFutureField"] = serde_json::json!({"x": 1});
        let m = SeedManifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(m.format_version, FormatVersion { major: 1, minor: 7 });
    }

    #[test]
    fn unknown_major_version_is_refused_with_a_clear_error() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["formatVersion"] = "2.0".into();
        // Even a manifest whose other fields no longer parse must be refused
        // for its version, not for a confusing field error.
        v["images"] = "changed in v2".into();
        let err = SeedManifest::from_json(&serde_json::to_vec(&v).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("format 2.0 is not supported"), "{err}");
        assert!(err.contains("1.x"), "{err}");
    }

    #[test]
    fn missing_or_malformed_version_is_refused() {
        let err = SeedManifest::from_json(b"{\"images\": []}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a coral seed manifest"), "{err}");
        let err = SeedManifest::from_json(b"{\"formatVersion\": \"one\"}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("MAJOR.MINOR"), "{err}");
        let err = SeedManifest::from_json(b"not json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn wrong_chain_id_is_refused() {
        let mut m = sample();
        m.images[0].layers[1].chain_id = ChainId::new(d(99));
        let err = SeedManifest::from_json(&m.to_json())
            .unwrap_err()
            .to_string();
        assert!(err.contains("has chain ID"), "{err}");
    }

    #[test]
    fn seed_key_ignores_order_but_not_content() {
        let a: Reference = "a".parse().unwrap();
        let b: Reference = "b".parse().unwrap();
        let p = [Platform::host()];
        let k1 = seed_key(&p, [(&a, &d(1)), (&b, &d(2))]);
        let k2 = seed_key(&p, [(&b, &d(2)), (&a, &d(1))]);
        assert_eq!(k1, k2);
        assert_ne!(k1, seed_key(&p, [(&a, &d(1)), (&b, &d(3))]));
        assert_ne!(
            k1,
            seed_key(
                &[Platform::new("linux", "s390x", None)],
                [(&a, &d(1)), (&b, &d(2))]
            )
        );
    }

    #[test]
    fn tampered_seed_key_or_totals_are_refused() {
        let mut m = sample();
        m.seed_key = d(7);
        assert!(
            SeedManifest::from_json(&m.to_json())
                .unwrap_err()
                .to_string()
                .contains("seed key")
        );
        let mut m = sample();
        m.totals.layers = 5;
        assert!(
            SeedManifest::from_json(&m.to_json())
                .unwrap_err()
                .to_string()
                .contains("totals")
        );
    }
}
