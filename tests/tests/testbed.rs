//! The test bed itself works: every real component answers, and every fixture
//! image is a real image that containerd pulls (and runs, where it can).
//! Needs root (containerd, overlay mounts).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coral_tests::containerd::{self, Containerd};
use coral_tests::cri;
use coral_tests::fixtures::Corpus;
use coral_tests::moto::Moto;
use coral_tests::process::run;
use coral_tests::registry::RegistryOptions;
use k8s_cri::v1 as criv1;

#[tokio::test]
async fn containerd_answers_its_version_over_grpc_for_each_installed_version() -> Result<()> {
    let builds = containerd::available()?;
    for b in &builds {
        let c = Containerd::start(b, &[]).await?;
        let v = c.version().await?;
        println!(
            "containerd {} ({}) answered gRPC Version: {v}",
            b.version,
            b.bin_dir.display()
        );
        ensure!(
            v.trim_start_matches('v').starts_with(&b.minor()),
            "containerd {} reported version {v}",
            b.version
        );
    }
    println!(
        "ran against containerd {}",
        builds
            .iter()
            .map(|b| b.version.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[tokio::test]
async fn cri_image_fs_info_answers_on_the_containerd_socket() -> Result<()> {
    for b in &containerd::available()? {
        let c = Containerd::start(b, &[]).await?;
        let mut images = cri::image_service(c.address()).await?;
        let info = images
            .image_fs_info(criv1::ImageFsInfoRequest {})
            .await
            .with_context(|| {
                format!(
                    "CRI ImageFsInfo on containerd {}; log:\n{}",
                    b.version,
                    c.log_tail()
                )
            })?
            .into_inner();
        let mounts: Vec<String> = info
            .image_filesystems
            .iter()
            .filter_map(|f| f.fs_id.as_ref().map(|id| id.mountpoint.clone()))
            .collect();
        println!("containerd {}: CRI image filesystems {mounts:?}", b.version);
        ensure!(
            mounts
                .iter()
                .any(|m| m.starts_with(&c.root().display().to_string())),
            "containerd {}: CRI reports image filesystems {mounts:?}, none under its private root {}",
            b.version,
            c.root().display()
        );
    }
    Ok(())
}

#[tokio::test]
async fn registry_catalog_lists_every_fixture_repository() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let catalog = reg.catalog().await?;
    for image in &corpus.images {
        let repo = Corpus::repository(&image.name);
        ensure!(
            catalog.contains(&repo),
            "{repo} missing from catalog {catalog:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn registry_with_tls_and_basic_auth_refuses_anonymous_and_untrusted_clients() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.registry(RegistryOptions {
        tls: true,
        auth: Some(("coral".into(), "s3cret-pass".into())),
        ..Default::default()
    })?;
    assert!(reg.url().starts_with("https://"));

    // With the right credentials and the registry's CA: the corpus is there.
    let catalog = reg.catalog().await?;
    ensure!(
        catalog.contains(&Corpus::repository("tiny")),
        "catalog {catalog:?}"
    );

    // Anonymous: 401 with a Basic challenge.
    let anon = reg
        .http_client()?
        .get(format!("{}/v2/", reg.url()))
        .send()
        .await?;
    assert_eq!(anon.status(), reqwest::StatusCode::UNAUTHORIZED);
    let challenge = anon
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    assert!(
        challenge.as_deref().unwrap_or("").starts_with("Basic"),
        "{challenge:?}"
    );

    // Wrong password: 401 too.
    let wrong = reg
        .http_client()?
        .get(format!("{}/v2/", reg.url()))
        .basic_auth("coral", Some("wrong"))
        .send()
        .await?;
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);

    // A client that does not trust the self-signed certificate fails the handshake.
    let untrusted = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?
        .get(format!("{}/v2/", reg.url()))
        .send()
        .await;
    assert!(
        untrusted.is_err(),
        "TLS with an untrusted certificate must fail: {untrusted:?}"
    );

    // skopeo (an independent client) reads an image with the same credentials and CA.
    let certs = tempfile::tempdir()?;
    std::fs::copy(reg.ca_cert().expect("tls"), certs.path().join("ca.crt"))?;
    let out = run(std::process::Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--creds",
            "coral:s3cret-pass",
            "--cert-dir",
        ])
        .arg(certs.path())
        .arg(format!("docker://{}/coral/tiny:latest", reg.host())))?;
    ensure!(out.contains("schemaVersion"), "skopeo read: {out}");
    Ok(())
}

#[tokio::test]
async fn moto_answers_describe_volumes_through_the_rust_sdk() -> Result<()> {
    let moto = Moto::start()?;
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let created = ec2
        .create_volume()
        .availability_zone("us-east-1a")
        .size(3)
        .send()
        .await
        .with_context(|| format!("CreateVolume; moto log:\n{}", moto.log_tail()))?;
    let id = created.volume_id().context("no volume id")?.to_owned();
    let described = ec2.describe_volumes().volume_ids(&id).send().await?;
    let vols = described.volumes();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].size(), Some(3));
    assert_eq!(vols[0].availability_zone(), Some("us-east-1a"));

    // Reset between tests: the volume is gone afterwards.
    moto.reset().await?;
    let after = ec2.describe_volumes().send().await?;
    assert!(
        after.volumes().iter().all(|v| v.volume_id() != Some(&id)),
        "volume {id} survived a reset"
    );
    Ok(())
}

/// Every fixture image pulls through CRI (as kubelet would) on every
/// containerd version, lands with the digest the corpus recorded, and the
/// runnable ones print what they must (whiteouts and opaque directories
/// applied as containerd applies them).
#[tokio::test]
async fn every_fixture_image_is_pulled_by_containerd_and_runnable_ones_run() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    for b in &containerd::available()? {
        let c = Containerd::start(b, &[&reg]).await?;
        let mut images = cri::image_service(c.address()).await?;
        for image in &corpus.images {
            let reference = format!("{}/{}:latest", reg.host(), Corpus::repository(&image.name));
            let image_ref = cri::pull(&mut images, &reference)
                .await
                .with_context(|| format!("containerd {}; log:\n{}", b.version, c.log_tail()))?;
            let status = images
                .image_status(criv1::ImageStatusRequest {
                    image: Some(criv1::ImageSpec {
                        image: image_ref.clone(),
                        ..Default::default()
                    }),
                    verbose: false,
                })
                .await?
                .into_inner()
                .image
                .with_context(|| format!("{reference} not found after pull"))?;
            let want_digest = format!(
                "{}/{}@{}",
                reg.host(),
                Corpus::repository(&image.name),
                image.digest
            );
            ensure!(
                status.repo_digests.contains(&want_digest),
                "containerd {}: {reference} has repo digests {:?}, expected {want_digest}",
                b.version,
                status.repo_digests
            );

            if let Some(check) = &image.run {
                let id = coral_tests::container_id(&format!("fixture-{}", image.name));
                let out = run(c
                    .ctr()
                    .args(["--namespace", "k8s.io", "run", "--rm"])
                    .arg(&reference)
                    .arg(&id)
                    .args(&check.argv))
                .with_context(|| format!("containerd {}: running {reference}", b.version))?;
                assert_eq!(
                    out, check.stdout,
                    "containerd {}: output of {reference}",
                    b.version
                );
            }
        }
        println!(
            "containerd {}: pulled {} fixture images",
            b.version,
            corpus.images.len()
        );
    }
    Ok(())
}
