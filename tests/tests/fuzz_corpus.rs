//! Every input the fuzzers have kept (`fuzz/corpus/<target>/`, committed:
//! the hand-made hostile seeds of `fuzz/make-seeds` plus what `scripts/fuzz`
//! runs found and minimised, crashes that were fixed included) replayed
//! through the same harness the fuzz targets run, on stable Rust, in every
//! test run: a regression comes back as a failing test here. Needs root
//! (the layer harness creates device nodes).

use std::path::PathBuf;

use anyhow::{Result, ensure};
use coral_tests::cache::repo_root;

fn corpus(target: &str) -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    ensure!(
        files.len() >= 4,
        "{}: only {} inputs",
        dir.display(),
        files.len()
    );
    Ok(files)
}

fn replay(target: &str, harness: fn(&[u8])) -> Result<()> {
    let files = corpus(target)?;
    for f in &files {
        let data = std::fs::read(f)?;
        let caught = std::panic::catch_unwind(|| harness(&data));
        ensure!(caught.is_ok(), "{target}: {} fails", f.display());
    }
    println!("{target}: {} inputs", files.len());
    Ok(())
}

#[test]
fn hostile_layers_never_write_outside_their_directory() -> Result<()> {
    replay("layer", coral_builder::fuzzing::layer)
}

#[test]
fn seed_manifests_parse_or_fail_cleanly_and_round_trip() -> Result<()> {
    replay("seed_manifest", coral_builder::fuzzing::seed_manifest)
}

#[test]
fn image_references_parse_or_fail_cleanly_and_normalise_idempotently() -> Result<()> {
    replay("reference", coral_builder::fuzzing::reference)
}

#[test]
fn oci_documents_parse_or_fail_cleanly() -> Result<()> {
    replay("oci_document", coral_builder::fuzzing::oci_document)
}
