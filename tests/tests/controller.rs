//! The controller's manifests and what it hands to others, checked by
//! independent tools: `kubernetes-validate --strict` (the Kubernetes 1.33
//! schemas) for built-in kinds, the CRD's own schema for ImageSeeds
//! (`tests/fixtures/validate-cr`, strict about unknown fields as the
//! apiserver is), and coral-builder's own argument parser for the builder
//! Job's arguments. (The reconcile scenarios, driven by a mock API server,
//! are in `controller/src/tests.rs`.)

use std::path::Path;

use anyhow::{Context, Result, ensure};
use coral_controller::crd::ImageSeed;
use coral_tests::cache::repo_root;
use coral_tests::manifests::{kubernetes_validate, text};
use k8s_openapi::api::core::v1::PodTemplateSpec;

const CRD: &str = "deploy/crd/imageseeds.coral.dev.yaml";

fn validate_cr(files: &[&Path]) -> Result<std::process::Output> {
    coral_tests::manifests::validate_cr(&repo_root().join(CRD), files)
}

fn example() -> Result<ImageSeed> {
    let path = repo_root().join("deploy/examples/imageseed.yaml");
    let mut seed: ImageSeed = serde_norway::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}", path.display()))?;
    seed.metadata.uid = Some("0c0ffee0-0000-4000-8000-000000000001".into());
    Ok(seed)
}

/// The Job the controller creates, from the deployed pod template, is a
/// valid Job (every file under deploy/ is checked in tests/tests/deploy.rs).
#[test]
fn the_builder_job_the_controller_makes_validates_against_kubernetes() -> Result<()> {
    let work = tempfile::tempdir()?;
    let deployment =
        std::fs::read_to_string(repo_root().join("deploy/controller/deployment.yaml"))?;
    let template_text = serde_norway::Deserializer::from_str(&deployment)
        .filter_map(|d| serde_json::Value::deserialize(d).ok())
        .find(|d| d["kind"] == "ConfigMap")
        .and_then(|d| d["data"]["job-template.yaml"].as_str().map(str::to_owned))
        .context("the job template ConfigMap")?;
    let template: PodTemplateSpec = serde_norway::from_str(&template_text)?;
    let seed = example()?;
    let job = coral_controller::job::builder_job(
        &seed,
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        1,
        "coral-system",
        "ghcr.io/coral-dev/coral-builder:0.1.0",
        &template,
    );
    let job_file = work.path().join("job.yaml");
    std::fs::write(&job_file, serde_norway::to_string(&job)?)?;
    let o = kubernetes_validate(&[job_file])?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(text(&o).contains("passed"), "not checked: {}", text(&o));
    Ok(())
}

use serde::Deserialize as _;

#[test]
fn the_example_image_seed_validates_and_broken_copies_do_not() -> Result<()> {
    let example = repo_root().join("deploy/examples/imageseed.yaml");
    let o = validate_cr(&[&example])?;
    ensure!(o.status.success(), "{}", text(&o));
    let good = std::fs::read_to_string(&example)?;
    let work = tempfile::tempdir()?;
    for (what, from, to) in [
        ("a misspelled field", "sizeGiB: 80", "sizeGib: 80"),
        ("a string for a number", "retention: 3", "retention: three"),
        ("an unknown backend", "backend: ebs-direct", "backend: s3"),
        (
            "an initialization rate out of range",
            "initializationRate: 300",
            "initializationRate: 900",
        ),
    ] {
        ensure!(good.contains(from), "the example has no {from:?}");
        let bad = work.path().join("bad.yaml");
        std::fs::write(&bad, good.replace(from, to))?;
        let o = validate_cr(&[&bad])?;
        ensure!(!o.status.success(), "{what} passed: {}", text(&o));
    }
    Ok(())
}

/// The arguments a builder Job runs coral-builder with are accepted by
/// coral-builder's own parser and option checks: the build gets as far as
/// its deadline (1 ms, so it stops there: nothing is pulled). A misspelled
/// flag is refused as a usage error (exit 2), so acceptance means something.
#[test]
fn the_builder_job_arguments_parse_with_coral_builder() -> Result<()> {
    let mut seed = example()?;
    // Two pull secrets: one --registry-config each.
    seed.spec
        .pull_secrets
        .push(coral_controller::crd::SecretRef {
            name: "second".into(),
        });
    let args = coral_controller::job::builder_args(&seed);
    let work = tempfile::tempdir()?;
    let config = work.path().join("config.json");
    std::fs::write(&config, r#"{"auths": {}}"#)?;
    // Paths inside the Job's pod, moved to this machine.
    let local: Vec<String> = args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && args[i - 1] == "--image" {
                coral_tests::manifests::on_loopback(a)
            } else if a == "/work/seed.img" {
                work.path().join("seed.img").display().to_string()
            } else if a.starts_with("/secrets/") {
                config.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut broken = local.clone();
    let i = broken
        .iter()
        .position(|a| a == "--snapshot")
        .context("--snapshot")?;
    broken[i] = "--snapshots".into();
    coral_tests::manifests::builder_accepts(&local, &broken)
}
