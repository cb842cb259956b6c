//! The bodies of coral's fuzz targets (`fuzz/`, cargo fuzz) and of the
//! test that replays their corpus on stable Rust (`tests/tests/fuzz_corpus.rs`):
//! one function per input format coral reads from outside. Each takes any
//! bytes, must never panic, hang or write outside its scratch directory,
//! and panics itself when an invariant breaks, so the fuzzer reports it.

use std::str::FromStr;

use coral_seed::{Reference, SeedManifest};

use crate::unpack::{Compression, UnpackOptions, unpack_layer};

/// A layer blob: the first byte picks the compression (none, gzip, zstd)
/// and whether layers lie below; the rest is the blob. Extraction happens
/// three directories deep in a fresh scratch directory, capped at 64 MiB;
/// afterwards nothing may exist beside the layer directory at any level
/// (a `..`, absolute-path, symlink or hardlink escape would put it there).
pub fn layer(data: &[u8]) {
    let Some((&mode, blob)) = data.split_first() else {
        return;
    };
    let compression = match mode % 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let scratch = tempfile::Builder::new()
        .prefix("coral-fuzz-")
        .tempdir()
        .expect("a scratch directory");
    let dest = scratch.path().join("a/b/layer");
    std::fs::create_dir_all(&dest).expect("the layer directory");
    let opts = UnpackOptions {
        layer: "fuzz",
        compression,
        dest: &dest,
        has_parent: mode & 0x80 != 0,
        max_bytes: 64 << 20,
        total: None,
    };
    let _ = unpack_layer(blob, &opts);
    for (dir, only) in [
        (scratch.path().to_path_buf(), "a"),
        (scratch.path().join("a"), "b"),
        (scratch.path().join("a/b"), "layer"),
    ] {
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("the scratch directory")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [only],
            "extraction wrote outside its directory, into {}",
            dir.display()
        );
    }
    assert!(
        std::fs::symlink_metadata(scratch.path().join("a/b/layer"))
            .expect("the layer directory")
            .is_dir(),
        "the layer directory was replaced"
    );
}

/// A seed manifest: parsing never panics, and whatever parses survives a
/// round trip through its own encoding unchanged.
pub fn seed_manifest(data: &[u8]) {
    if let Ok(m) = SeedManifest::from_json(data) {
        let again =
            SeedManifest::from_json(&m.to_json()).expect("a manifest coral wrote reads back");
        assert_eq!(again, m, "the manifest changed in a round trip");
    }
}

/// An image reference: parsing never panics, and a parsed reference's
/// normal form parses to itself.
pub fn reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Reference::from_str(text) {
        let normal = r.to_string();
        let again = Reference::from_str(&normal).unwrap_or_else(|e| {
            panic!("{text:?} normalised to {normal:?}, which does not parse: {e}")
        });
        assert_eq!(
            again.to_string(),
            normal,
            "normalising {text:?} is not idempotent"
        );
    }
}

/// An OCI index, image manifest or image config, as a registry serves
/// them: every check resolution makes on such a document, on any bytes.
pub fn oci_document(data: &[u8]) {
    crate::resolve::check_documents(data);
}
