//! `scripts/scale`: how build and import grow with the seed set. Generates
//! seed sets from a seed (`coral_tests::scale`) at several sizes (a number
//! of images, each `--layers` distinct layers of `--files` files), pushes
//! each once into registry storage cached under
//! `$CORAL_CACHE/scale/`, then builds (coral-builder) and imports (adopt,
//! coral-node-mounter into a fresh containerd) it, timing both with their
//! peak RSS. Prints a JSON line per size and a table; `--write-docs`
//! rewrites `docs/scale.md` and `docs/scale.svg`.
//!
//! Usage: coral-scale [--seed N] [--images 20,60,200] [--layers 25]
//! [--files 200] [--write-docs]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use coral_tests::cache::{FileLock, cache_dir, repo_root};
use coral_tests::registry::{Registry, RegistryOptions};
use coral_tests::scale::{Outcome, Shape, build_and_import, push};

struct Args {
    seed: u64,
    images: Vec<u32>,
    layers: u32,
    files: u32,
    write_docs: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        seed: 1,
        images: vec![20, 60, 200],
        layers: 25,
        files: 200,
        write_docs: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => a.seed = value()?.parse()?,
            "--images" => {
                a.images = value()?
                    .split(',')
                    .map(|n| n.parse().with_context(|| format!("--images {n:?}")))
                    .collect::<Result<_>>()?
            }
            "--layers" => a.layers = value()?.parse()?,
            "--files" => a.files = value()?.parse()?,
            "--write-docs" => a.write_docs = true,
            "-h" | "--help" => {
                println!(
                    "coral-scale [--seed N] [--images 20,60,200] [--layers 25] [--files 200] [--write-docs]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// The registry storage holding `shape`, pushed once and kept.
async fn registry_for(shape: &Shape) -> Result<Registry> {
    let root = cache_dir().join("scale");
    std::fs::create_dir_all(&root)?;
    let name = format!(
        "registry-s{}-{}x{}x{}",
        shape.seed, shape.images, shape.layers, shape.files
    );
    let storage = root.join(&name);
    let done = root.join(format!("{name}.done"));
    let _lock = FileLock::acquire(&root.join(format!("{name}.lock")))?;
    if !done.exists() {
        if storage.exists() {
            std::fs::remove_dir_all(&storage)?;
        }
        std::fs::create_dir_all(&storage)?;
        let reg = Registry::start(RegistryOptions {
            storage: Some(storage.clone()),
            ..RegistryOptions::default()
        })?;
        let t = Instant::now();
        push(&reg, shape).await?;
        eprintln!(
            "coral-scale: pushed {} images, {} layers, {} files in {:.1?}",
            shape.images,
            shape.total_layers(),
            shape.total_files(),
            t.elapsed()
        );
        drop(reg);
        std::fs::write(&done, b"")?;
    }
    Registry::start(RegistryOptions {
        storage: Some(storage),
        read_only: true,
        ..RegistryOptions::default()
    })
}

fn row(o: &Outcome) -> String {
    let per_k = |s: f64| s * 1000.0 / o.files as f64;
    format!(
        "| {} | {} | {} | {:.1} | {:.2} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} |",
        o.shape.images,
        o.layers,
        o.files,
        o.build.seconds,
        per_k(o.build.seconds),
        o.build.peak_rss_mib,
        o.import.seconds,
        per_k(o.import.seconds),
        o.import.peak_rss_mib,
        o.volume_bytes as f64 / (1u64 << 30) as f64,
    )
}

const READING: &str = "Reading the numbers:\n\n\
- A build's wall time covers the whole command: pulling and extracting (phase \
`pullAndExtract`), writing the ext4 image (`filesystem`), and removing the work directory \
(the rest), which for a million small files takes a while on a disk mounted with `discard`, \
as this one is.\n\
- Sizes run smallest first, each right after the previous one, with nothing dropped from the \
page cache: a size whose registry storage was pushed in an earlier run is read from disk cold, \
which shows in its `pullAndExtract` (so a first size can take longer per file than the next).\n\
- Peak RSS is `ru_maxrss` of the builder or the node mounter, or of the largest child it \
waited for (mke2fs, debugfs, e2fsck); containerd's own memory is not in the table.\n\
- Linear growth shows as a flat \"per 1,000 files\" column.";

const HEADER: &str = "| images | layers | files | build s | build s per 1,000 files | build peak RSS MiB | import s | import s per 1,000 files | import peak RSS MiB | volume GiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

/// What a panel plots of an outcome: (build, import).
type Pick = fn(&Outcome) -> (f64, f64);

/// A plot of seconds and peak RSS against files, build and import.
fn svg(outcomes: &[Outcome]) -> String {
    let (w, h, pad) = (360.0, 240.0, 48.0);
    let max_files = outcomes.iter().map(|o| o.files).max().unwrap_or(1) as f64;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * w + 20.0,
        h + 30.0
    );
    let panels: [(&str, Pick); 2] = [
        ("seconds", |o| (o.build.seconds, o.import.seconds)),
        ("peak RSS, MiB", |o| {
            (o.build.peak_rss_mib, o.import.peak_rss_mib)
        }),
    ];
    for (p, (title, get)) in panels.iter().enumerate() {
        let x0 = p as f64 * (w + 20.0);
        let max_y = outcomes
            .iter()
            .map(|o| {
                let (a, b) = get(o);
                a.max(b)
            })
            .fold(1.0, f64::max)
            * 1.1;
        let px = |files: f64| x0 + pad + (w - pad - 10.0) * files / max_files;
        let py = |y: f64| h - pad + 20.0 - (h - pad - 10.0) * y / max_y;
        let _ = write!(
            out,
            r##"<text x="{}" y="14" font-weight="bold">{title} vs files</text><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#333"/><text x="{}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">{:.0}</text><text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="end">{:.0}</text>"##,
            x0 + pad,
            px(0.0),
            py(0.0),
            px(max_files),
            py(0.0),
            px(0.0),
            py(0.0),
            px(0.0),
            py(max_y),
            px(0.0) - 4.0,
            py(0.0) + 4.0,
            px(0.0) - 4.0,
            py(max_y) + 4.0,
            max_y,
            px(max_files),
            py(0.0) + 16.0,
            outcomes.iter().map(|o| o.files).max().unwrap_or(0),
            px(0.0) - 4.0,
            py(max_y / 2.0) + 4.0,
            max_y / 2.0,
        );
        for (series, colour, pick) in [("build", "#1f77b4", 0usize), ("import", "#d62728", 1usize)]
        {
            let points: Vec<String> = outcomes
                .iter()
                .map(|o| {
                    let (a, b) = get(o);
                    let y = if pick == 0 { a } else { b };
                    format!("{:.1},{:.1}", px(o.files as f64), py(y))
                })
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            for pt in &points {
                let (x, y) = pt.split_once(',').expect("x,y");
                let _ = write!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
            }
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" fill="{colour}">{series}</text>"#,
                x0 + pad + 8.0,
                32.0 + 14.0 * pick as f64
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

fn write_docs(root: &Path, a: &Args, outcomes: &[Outcome], machine: &str) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Scale: build and import against the size of the seed set\n\n\
         Made by `scripts/scale --seed {} --images {} --layers {} --files {} --write-docs` \
         (`scripts/scale --help`). Each size is a seed set generated from the seed: that many \
         images, each of {} distinct gzip layers of {} small files (0 to 512 random bytes, in 10 \
         directories). It is pushed once to a docker-registry on 127.0.0.1 (not timed), built \
         by `coral-builder build` (all images in one build, ext4 image file, no snapshot), \
         then imported by `coral-node-mounter import` (adopt) into a fresh containerd whose \
         root is the volume; afterwards `ctr images check` must list every image complete. \
         Peak RSS is the process's (or its largest child's) `ru_maxrss`. One run per size.\n\n\
         ![seconds and peak RSS against files](scale.svg)\n\n\
         {machine}\n\n{HEADER}",
        a.seed,
        a.images
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        a.layers,
        a.files,
        a.layers,
        a.files,
    );
    for o in outcomes {
        let _ = writeln!(md, "{}", row(o));
    }
    let _ = writeln!(md, "\n{READING}");
    let _ = writeln!(md, "\nBuild phases (seconds) per size:\n");
    for o in outcomes {
        let _ = writeln!(md, "- {} images: `{}`", o.shape.images, o.build_phases);
    }
    std::fs::write(root.join("docs/scale.md"), md)?;
    std::fs::write(root.join("docs/scale.svg"), svg(outcomes))?;
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "Results of {date}, on {cpus} CPUs and {:.1} GiB of RAM (the same machine as docs/bench.md).",
        mem / 1048576.0
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let work = cache_dir().join("scale/work");
    std::fs::create_dir_all(&work)?;
    let mut outcomes = Vec::new();
    println!("{HEADER}");
    for &images in &a.images {
        let shape = Shape {
            seed: a.seed,
            images,
            layers: a.layers,
            files: a.files,
        };
        let reg = registry_for(&shape).await?;
        let dir = tempfile::Builder::new().prefix("size-").tempdir_in(&work)?;
        let o = build_and_import(&reg, &shape, dir.path())
            .await
            .with_context(|| format!("{images} images"))?;
        anyhow::ensure!(
            o.images_in_containerd == u64::from(images) && o.files_on_volume == o.files,
            "{images} images: containerd has {} complete, the volume {} of {} files",
            o.images_in_containerd,
            o.files_on_volume,
            o.files
        );
        eprintln!("{}", serde_json::to_string(&o)?);
        println!("{}", row(&o));
        outcomes.push(o);
    }
    if a.write_docs {
        let root: PathBuf = repo_root();
        write_docs(&root, &a, &outcomes, &machine())?;
        println!("wrote docs/scale.md and docs/scale.svg");
    }
    Ok(())
}
