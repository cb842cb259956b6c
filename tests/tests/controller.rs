//! The controller's manifests and what it hands to others, checked by
//! independent tools: `kubernetes-validate --strict` (the Kubernetes 1.33
//! schemas) for built-in kinds, the CRD's own schema for ImageSeeds
//! (`tests/fixtures/validate-cr`, strict about unknown fields as the
//! apiserver is), and coral-builder's own argument parser for the builder
//! Job's arguments. (The reconcile scenarios, driven by a mock API server,
//! are in `controller/src/tests.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use coral_controller::crd::ImageSeed;
use coral_tests::cache::{cache_dir, repo_root};
use coral_tests::workspace_bin;
use k8s_openapi::api::core::v1::PodTemplateSpec;

const CRD: &str = "deploy/crd/imageseeds.coral.dev.yaml";

fn venv_bin(name: &str) -> Result<PathBuf> {
    let p = cache_dir().join("venv/bin").join(name);
    ensure!(p.exists(), "{} is missing: run scripts/setup", p.display());
    Ok(p)
}

fn kubernetes_validate(files: &[PathBuf]) -> Result<Output> {
    Ok(Command::new(venv_bin("kubernetes-validate")?)
        .args(["-k", "1.33.0", "--strict"])
        .args(files)
        .output()?)
}

fn validate_cr(files: &[&Path]) -> Result<Output> {
    Ok(Command::new(venv_bin("python3")?)
        .arg(repo_root().join("tests/fixtures/validate-cr"))
        .arg(repo_root().join(CRD))
        .args(files)
        .output()?)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn example() -> Result<ImageSeed> {
    let path = repo_root().join("deploy/examples/imageseed.yaml");
    let mut seed: ImageSeed = serde_norway::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}", path.display()))?;
    seed.metadata.uid = Some("0c0ffee0-0000-4000-8000-000000000001".into());
    Ok(seed)
}

#[test]
fn the_deploy_manifests_and_the_builder_job_validate_against_kubernetes() -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("deploy/controller"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files.push(repo_root().join(CRD));
    // The Job the controller creates, from the deployed pod template.
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
    files.push(job_file);
    let o = kubernetes_validate(&files)?;
    ensure!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    ensure!(
        out.matches("passed").count() >= files.len(),
        "not every file was checked: {out}"
    );
    // A broken manifest fails (so a pass above means something).
    let broken = work.path().join("broken.yaml");
    std::fs::write(
        &broken,
        deployment.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )?;
    let o = kubernetes_validate(&[broken])?;
    ensure!(
        !o.status.success(),
        "a misspelled field passed: {}",
        text(&o)
    );
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
    let seed = example()?;
    let args = coral_controller::job::builder_args(&seed);
    let work = tempfile::tempdir()?;
    let config = work.path().join("config.json");
    std::fs::write(&config, r#"{"auths": {}}"#)?;
    // Paths inside the Job's pod, moved to this machine.
    let local: Vec<String> = args
        .iter()
        .map(|a| {
            if a == "/work/seed.img" {
                work.path().join("seed.img").display().to_string()
            } else if a.starts_with("/secrets/") {
                config.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let bin = workspace_bin("coral-builder")?;
    let o = Command::new(&bin)
        .args(&local)
        .args(["--deadline", "1ms"])
        .env("CORAL_LOG", "error")
        .output()?;
    let out = text(&o);
    ensure!(
        o.status.code() == Some(1) && out.contains("--deadline"),
        "coral-builder {}: {:?}\n{out}",
        local.join(" "),
        o.status
    );
    let mut broken = local.clone();
    let i = broken
        .iter()
        .position(|a| a == "--snapshot")
        .context("--snapshot")?;
    broken[i] = "--snapshots".into();
    let o = Command::new(&bin).args(&broken).output()?;
    ensure!(
        o.status.code() == Some(2),
        "a misspelled flag: {:?}\n{}",
        o.status,
        text(&o)
    );
    Ok(())
}
