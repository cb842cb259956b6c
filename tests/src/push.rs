//! Pushing hand-made images to a test registry over the distribution API,
//! so tests can serve exactly the (hostile) content they need.

use anyhow::{Context, Result, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::registry::Registry;

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A layer to push: the blob as served, its media type, and the diff ID the
/// config will claim for it.
pub struct Layer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub diff_id: String,
}

impl Layer {
    /// A gzip layer of `tar`, with its true diff ID.
    pub fn gzip(tar: &[u8]) -> Layer {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(tar).expect("in memory");
        Layer {
            blob: enc.finish().expect("in memory"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: sha256(tar),
        }
    }
}

/// Uploads one blob (monolithic POST + PUT).
pub async fn push_blob(reg: &Registry, repo: &str, data: &[u8]) -> Result<String> {
    let client = reg.http_client()?;
    let digest = sha256(data);
    let resp = client
        .post(format!("{}/v2/{repo}/blobs/uploads/", reg.url()))
        .basic_auth_opt(reg)
        .send()
        .await?;
    ensure!(
        resp.status().as_u16() == 202,
        "starting an upload: {}",
        resp.status()
    );
    let location = resp
        .headers()
        .get("location")
        .context("no upload location")?
        .to_str()?
        .to_string();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("{}{location}", reg.url())
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let resp = client
        .put(format!("{url}{sep}digest={digest}"))
        .basic_auth_opt(reg)
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await?;
    ensure!(
        resp.status().as_u16() == 201,
        "finishing an upload: {}",
        resp.status()
    );
    Ok(digest)
}

/// Pushes an image (config + layers + manifest) as `repo:tag`; returns the
/// manifest digest. `config_extra` is merged into the config.
pub async fn push_image(reg: &Registry, repo: &str, tag: &str, layers: &[Layer]) -> Result<String> {
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = push_blob(reg, repo, &config).await?;
    let mut descs = Vec::new();
    for l in layers {
        let d = push_blob(reg, repo, &l.blob).await?;
        descs.push(json!({"mediaType": l.media_type, "digest": d, "size": l.blob.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))?;
    let resp = reg
        .http_client()?
        .put(format!("{}/v2/{repo}/manifests/{tag}", reg.url()))
        .basic_auth_opt(reg)
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await?;
    ensure!(
        resp.status().as_u16() == 201,
        "pushing the manifest: {}",
        resp.status()
    );
    Ok(sha256(&manifest))
}

/// Where the registry keeps a blob's bytes (to corrupt it behind its back).
pub fn blob_data_path(reg: &Registry, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    reg.dir()
        .join("storage/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

trait BasicAuthOpt {
    fn basic_auth_opt(self, reg: &Registry) -> Self;
}

impl BasicAuthOpt for reqwest::RequestBuilder {
    fn basic_auth_opt(self, reg: &Registry) -> Self {
        match reg.credentials() {
            Some((u, p)) => self.basic_auth(u, Some(p)),
            None => self,
        }
    }
}
