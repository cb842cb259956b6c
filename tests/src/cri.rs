//! CRI v1 (the API kubelet uses) over containerd's own socket.

use std::path::Path;

use anyhow::{Context, Result};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

pub async fn image_service(socket: &Path) -> Result<ImageServiceClient<Channel>> {
    let channel = containerd_client::connect(socket)
        .await
        .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
    Ok(ImageServiceClient::new(channel))
}

pub async fn runtime_service(socket: &Path) -> Result<RuntimeServiceClient<Channel>> {
    let channel = containerd_client::connect(socket)
        .await
        .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Pulls `reference` through CRI, as kubelet would; returns the image ref CRI reports.
pub async fn pull(images: &mut ImageServiceClient<Channel>, reference: &str) -> Result<String> {
    let resp = images
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(k8s_cri::v1::ImageSpec {
                image: reference.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CRI PullImage {reference}"))?;
    Ok(resp.into_inner().image_ref)
}

/// Every repo tag CRI lists (kubelet's view of the node's images), sorted.
pub async fn tags(socket: &Path) -> Result<Vec<String>> {
    let mut svc = image_service(socket).await?;
    let mut tags: Vec<String> = svc
        .list_images(k8s_cri::v1::ListImagesRequest { filter: None })
        .await
        .context("CRI ListImages")?
        .into_inner()
        .images
        .into_iter()
        .flat_map(|i| i.repo_tags)
        .collect();
    tags.sort();
    Ok(tags)
}
