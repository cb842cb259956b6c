//! Seed sets of any size, generated from a seed: `images` images of
//! `layers` distinct gzip layers each, every layer `files` small files
//! (0 to 512 random bytes, in 10 directories). Pushed to a test registry, built
//! with coral-builder, imported into a fresh containerd with
//! coral-node-mounter (adopt), each step timed with its peak RSS.
//! `scripts/scale` runs it at several sizes; `tests/tests/scale.rs` at a
//! small one.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::containerd::{self, Containerd};
use crate::push::Layer;
use crate::registry::Registry;
use crate::seed::Mounted;
use crate::workspace_bin;

/// The size of a generated seed set.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    pub seed: u64,
    pub images: u32,
    /// Layers per image, all distinct.
    pub layers: u32,
    /// Files per layer.
    pub files: u32,
}

impl Shape {
    pub fn total_layers(&self) -> u64 {
        u64::from(self.images) * u64::from(self.layers)
    }

    pub fn total_files(&self) -> u64 {
        self.total_layers() * u64::from(self.files)
    }

    /// Repository of image `i`.
    pub fn repository(&self, i: u32) -> String {
        format!("scale/s{}-{i:04}", self.seed)
    }

    /// The image references a build of the whole set takes.
    pub fn references(&self, reg: &Registry) -> Vec<String> {
        (0..self.images)
            .map(|i| format!("{}/{}:latest", reg.host(), self.repository(i)))
            .collect()
    }
}

/// splitmix64: the same stream for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The tar of layer `layer` of image `image`: `files` regular files under
/// `i<image>/l<layer>/d<0-9>/`, their sizes and contents from the seed.
pub fn layer_tar(shape: &Shape, image: u32, layer: u32) -> Vec<u8> {
    let mut rng = Rng::new(
        shape.seed ^ (u64::from(image) << 32) ^ u64::from(layer).wrapping_mul(0x1000_0001),
    );
    let mut b = tar::Builder::new(Vec::new());
    let top = format!("i{image:04}/l{layer:03}");
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    };
    for dir in [format!("i{image:04}"), top.clone()] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())
            .expect("in memory");
    }
    for d in 0..10 {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{top}/d{d}/"), std::io::empty())
            .expect("in memory");
    }
    for f in 0..shape.files {
        let len = (rng.next() % 513) as usize;
        // Random bytes: real files do not compress 20 times over (which
        // the builder's bomb limit, 20x the compressed size, would stop).
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            data.extend_from_slice(&rng.next().to_le_bytes());
        }
        data.truncate(len);
        let mut h = header(tar::EntryType::Regular, 0o644, len as u64);
        b.append_data(&mut h, format!("{top}/d{}/f{f:05}", f % 10), &data[..])
            .expect("in memory");
    }
    b.into_inner().expect("in memory")
}

/// Pushes the whole set (8 images at a time), each image as `:latest`.
pub async fn push(reg: &Registry, shape: &Shape) -> Result<()> {
    use futures_util::StreamExt as _;
    let shape = *shape;
    let pushes = futures_util::stream::iter(0..shape.images)
        .map(|i| push_image(reg, shape, i))
        .buffer_unordered(8);
    let results: Vec<Result<()>> = pushes.collect().await;
    results.into_iter().collect()
}

async fn push_image(reg: &Registry, shape: Shape, i: u32) -> Result<()> {
    let layers = tokio::task::spawn_blocking(move || {
        (0..shape.layers)
            .map(|l| Layer::gzip(&layer_tar(&shape, i, l)))
            .collect::<Vec<_>>()
    })
    .await?;
    crate::push::push_image(reg, &shape.repository(i), "latest", &layers).await?;
    Ok(())
}

/// A child process's wall time and peak RSS.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Measured {
    pub seconds: f64,
    /// ru_maxrss of the child (its largest waited-for descendant's if
    /// larger), MiB.
    pub peak_rss_mib: f64,
}

/// Runs `cmd` to completion; fails with its stderr's tail if it fails.
pub fn measure(cmd: &mut Command) -> Result<(Measured, String)> {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    // Read both pipes off this thread so a chatty child cannot block.
    let (mut out, mut err) = (child.stdout, child.stderr);
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = std::io::Read::read_to_string(o, &mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut s);
        }
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, whose handle we no longer use.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(r == pid, "wait4: {}", std::io::Error::last_os_error());
    let seconds = started.elapsed().as_secs_f64();
    let (stdout, stderr) = (
        out_reader.join().unwrap_or_default(),
        err_reader.join().unwrap_or_default(),
    );
    let status = std::process::ExitStatus::from_raw(status);
    ensure!(
        status.success(),
        "{cmd:?} failed ({status}): {}",
        tail(&stderr)
    );
    Ok((
        Measured {
            seconds,
            peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
        },
        stdout,
    ))
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// What one size gave.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub shape: Shape,
    pub layers: u64,
    pub files: u64,
    pub build: Measured,
    /// The builder's report's phases.
    pub build_phases: serde_json::Value,
    pub volume_bytes: u64,
    pub import: Measured,
    /// Tagged images containerd lists complete after the import (nothing
    /// it lists may be incomplete).
    pub images_in_containerd: u64,
    /// Regular files below the volume's layer trees.
    pub files_on_volume: u64,
}

/// Builds the set from `reg` into `dir/seed.img`, then imports it (adopt)
/// into a fresh containerd whose root is that volume, and checks that every
/// image is there, complete, and every generated file is on the volume.
pub async fn build_and_import(reg: &Registry, shape: &Shape, dir: &Path) -> Result<Outcome> {
    let volume = dir.join("seed.img");
    let mut build = Command::new(workspace_bin("coral-builder")?);
    build.arg("build");
    for r in shape.references(reg) {
        build.arg("--image").arg(r);
    }
    build
        .args(["--platform", "linux/amd64", "--insecure-registry"])
        .arg(reg.host())
        .arg("--output")
        .arg(&volume)
        .args(["--snapshot", "none", "--progress", "none", "--json"]);
    let (built, report) = measure(&mut build)?;
    let report: serde_json::Value =
        serde_json::from_str(&report).context("the build report is not JSON")?;
    let volume_bytes = std::fs::metadata(&volume)?.len();

    let vol = Mounted::read_write(&volume)?;
    let files_on_volume = count_files(&vol.0.join(".coral/layers"))?;
    let state = tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?;
    let c =
        Containerd::start_with_root(&containerd::first()?, &[reg], state, vol.0.clone()).await?;
    let mut import = Command::new(workspace_bin("coral-node-mounter")?);
    import
        .args(["import", "--deadline", "30m", "--address"])
        .arg(c.address())
        .arg("--seed")
        .arg(&vol.0);
    let (imported, _) = measure(&mut import)?;
    let out = crate::process::run(c.ctr().args(["--namespace", "k8s.io", "images", "check"]))?;
    // containerd lists each image under its tag, its digest reference and
    // its ID, as a pull leaves it: count the tagged ones.
    let complete = out
        .lines()
        .skip(1)
        .filter(|l| {
            containerd::check_line_complete(l)
                && l.split_whitespace()
                    .next()
                    .is_some_and(|r| r.ends_with(":latest"))
        })
        .count() as u64;
    let incomplete = out
        .lines()
        .skip(1)
        .filter(|l| !containerd::check_line_complete(l))
        .count();
    ensure!(
        incomplete == 0,
        "ctr images check lists incomplete images:\n{}",
        tail(&out)
    );
    drop(c);
    drop(vol);
    Ok(Outcome {
        shape: *shape,
        layers: shape.total_layers(),
        files: shape.total_files(),
        build: built,
        build_phases: report["phases"].clone(),
        volume_bytes,
        import: imported,
        images_in_containerd: complete,
        files_on_volume,
    })
}

fn count_files(dir: &Path) -> Result<u64> {
    let mut n = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                n += 1;
            }
        }
    }
    Ok(n)
}
