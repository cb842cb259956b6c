//! A small seeded variant of `scripts/scale` (the large runs, and the curve
//! in docs/scale.md, are the script's): a generated seed set of 6 images of
//! 4 distinct layers of 60 files is pushed, built into one volume and
//! imported (adopt) into a fresh containerd. Every image must end complete
//! in containerd and every generated file on the volume; the generator must
//! give the same layers for the same seed and other layers for another.
//! Needs root (containerd, loop mounts). No timing is asserted.

use anyhow::{Result, ensure};
use coral_tests::registry::{Registry, RegistryOptions};
use coral_tests::scale::{Shape, build_and_import, layer_tar, push};

#[test]
fn the_generator_is_a_function_of_its_seed() {
    let shape = Shape {
        seed: 7,
        images: 2,
        layers: 2,
        files: 30,
    };
    let other = Shape { seed: 8, ..shape };
    assert_eq!(layer_tar(&shape, 1, 1), layer_tar(&shape, 1, 1));
    assert_ne!(layer_tar(&shape, 1, 1), layer_tar(&shape, 1, 0));
    assert_ne!(layer_tar(&shape, 1, 1), layer_tar(&other, 1, 1));
    let mut entries = 0;
    let tar = layer_tar(&shape, 0, 0);
    for e in tar::Archive::new(&tar[..]).entries().unwrap() {
        if e.unwrap().header().entry_type().is_file() {
            entries += 1;
        }
    }
    assert_eq!(entries, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_seed_set_builds_and_imports_whole() -> Result<()> {
    let shape = Shape {
        seed: 7,
        images: 6,
        layers: 4,
        files: 60,
    };
    let reg = Registry::start(RegistryOptions::default())?;
    push(&reg, &shape).await?;
    let dir = tempfile::tempdir()?;
    let o = build_and_import(&reg, &shape, dir.path()).await?;
    ensure!(o.images_in_containerd == 6, "{o:?}");
    ensure!(o.layers == 24 && o.files == 1440, "{o:?}");
    ensure!(o.files_on_volume == 1440, "{o:?}");
    ensure!(
        o.build.peak_rss_mib > 0.0 && o.import.peak_rss_mib > 0.0,
        "{o:?}"
    );
    println!("{}", serde_json::to_string(&o)?);
    Ok(())
}
