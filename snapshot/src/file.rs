//! The `file` backend: the image file is the snapshot; a sidecar record
//! `IMAGE.snapshot.json` (written atomically) names it by its SHA-256 and
//! says which seed it holds.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::Record;

/// Where the record of `image` goes.
pub fn record_path(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".snapshot.json");
    image.with_file_name(name)
}

pub fn write_record(image: &Path, record: &Record) -> Result<()> {
    let path = record_path(image);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        let mut text = serde_json::to_vec_pretty(record).expect("a record serialises");
        text.push(b'\n');
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// Removes the record of `image`, if any (the image is about to change).
pub fn remove_record(image: &Path) -> Result<()> {
    let path = record_path(image);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the stale {}", path.display())),
    }
}

pub fn read_record(image: &Path) -> Result<Record> {
    let path = record_path(image);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a snapshot record", path.display()))
}
