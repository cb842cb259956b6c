//! `prewarm`: reads every block of the seeded layer files once, several
//! files at a time, so that a volume restored from an EBS snapshot fetches
//! them from S3 now, in the background, instead of when the first container
//! touches them (EBS loads a restored volume's blocks lazily, on first read).
//!
//! Pages read are dropped from the page cache again (`POSIX_FADV_DONTNEED`)
//! so prewarming does not push out what the node is using. Each inode is
//! read once, however many hardlinks it has; holes are skipped.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// What a prewarm read.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrewarmReport {
    pub files: u64,
    /// Bytes read (data only: holes are skipped).
    pub bytes: u64,
    pub seconds: f64,
    /// Files that could not be read (each with why); the rest were read.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Every regular file under `roots` (each inode once), largest first so the
/// long reads start early.
fn files_under(roots: &[PathBuf]) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    let top: HashSet<PathBuf> = roots.iter().cloned().collect();
    while let Some(p) = stack.pop() {
        let listed = fs::symlink_metadata(&p).and_then(|m| {
            let children = if m.is_dir() {
                fs::read_dir(&p)?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<io::Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            Ok((m, children))
        });
        let (m, children) = match listed {
            Ok(x) => x,
            // Snapshots come and go while the node starts: skip what went.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !top.contains(&p) => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
        };
        if m.is_dir() {
            stack.extend(children);
        } else if m.is_file() && m.len() > 0 && seen.insert((m.dev(), m.ino())) {
            out.push((p, m.len()));
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.1));
    Ok(out)
}

/// Reads one file's data once and drops it from the page cache.
fn read_file(path: &Path, size: u64, buf: &mut [u8]) -> io::Result<u64> {
    let file = File::open(path)?;
    let mut read = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => pos,
        };
        let end = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(start))
            .unwrap_or(size)
            .min(size);
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = rustix::io::pread(&file, &mut buf[..want], at)?;
            if n == 0 {
                break;
            }
            at += n as u64;
            read += n as u64;
        }
        pos = end.max(at);
        if pos == start {
            break;
        }
    }
    let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
    Ok(read)
}

/// Reads every file under `roots` with `jobs` threads.
pub fn prewarm(roots: &[PathBuf], jobs: usize) -> io::Result<PrewarmReport> {
    let started = Instant::now();
    let files = files_under(roots)?;
    let queue = Mutex::new(files.into_iter());
    let report = Mutex::new(PrewarmReport::default());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((path, size)) = next else { break };
                    let result = read_file(&path, size, &mut buf);
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(n) => {
                            r.files += 1;
                            r.bytes += n;
                        }
                        Err(e) => r.errors.push(format!("{}: {e}", path.display())),
                    }
                }
            });
        }
    });
    let mut report = report.into_inner().unwrap_or_else(|p| p.into_inner());
    report.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_file_once_and_skips_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/one"), vec![1u8; 3 << 20]).unwrap();
        fs::write(d.join("a/b/two"), b"twelve bytes").unwrap();
        fs::hard_link(d.join("a/one"), d.join("a/b/same-as-one")).unwrap();
        fs::write(d.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("a/one", d.join("link")).unwrap();
        let sparse = File::create(d.join("sparse")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        rustix::io::pwrite(&sparse, &[9u8; 4096], 32 << 20).unwrap();
        drop(sparse);

        let r = prewarm(&[d.to_path_buf()], 3).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            r.files, 3,
            "one, two and sparse (the hardlink once, no empty file)"
        );
        // tmpfs and ext4 report holes: only the written block of `sparse`.
        assert!(
            r.bytes >= (3 << 20) + 12 + 4096 && r.bytes < (3 << 20) + 12 + (2 << 20),
            "read {} bytes",
            r.bytes
        );
    }

    #[test]
    fn a_missing_root_is_a_clear_error() {
        let e = prewarm(&[PathBuf::from("/nonexistent/coral-prewarm")], 2).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/coral-prewarm"), "{e}");
    }
}
