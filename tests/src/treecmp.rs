//! Entry-by-entry comparison of two directory trees as a container would see
//! them: type, mode (setuid included), owner, size, content hash, link
//! target, device numbers, xattrs and (optionally) mtimes.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest as _, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Content hash, link target, or `major:minor`.
    pub payload: String,
    pub xattrs: BTreeMap<String, String>,
    pub mtime: i64,
    /// Inode key, to compare hardlink structure.
    pub ino: (u64, u64),
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:o} {}:{} size={} {} mtime={} xattrs={:?}",
            self.kind,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.payload,
            self.mtime,
            self.xattrs
        )
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Compare mtimes of non-directories.
    pub file_mtimes: bool,
    /// Compare mtimes of directories too.
    pub dir_mtimes: bool,
    /// Xattr name prefixes to ignore (e.g. `trusted.overlay.` on a merged view).
    pub ignore_xattr_prefixes: Vec<String>,
    /// Paths (relative, no leading `/`) to leave out, with everything below.
    pub ignore_paths: Vec<String>,
    /// Compare the root directory's own metadata.
    pub root_metadata: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            file_mtimes: true,
            dir_mtimes: false,
            ignore_xattr_prefixes: vec!["trusted.overlay.".into(), "security.selinux".into()],
            ignore_paths: Vec::new(),
            root_metadata: false,
        }
    }
}

/// Every entry under `root` by relative path ("" is the root itself).
pub fn snapshot(root: &Path, opts: &Options) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        if opts
            .ignore_paths
            .iter()
            .any(|p| rel == Path::new(p) || rel.starts_with(p))
        {
            continue;
        }
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path).with_context(|| format!("{}", path.display()))?;
        let ft = m.file_type();
        let (kind, payload) = if ft.is_dir() {
            for e in fs::read_dir(&path)? {
                stack.push(rel.join(e?.file_name()));
            }
            ('d', String::new())
        } else if ft.is_file() {
            let mut h = Sha256::new();
            let mut f = fs::File::open(&path)?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            ('f', hex::encode(h.finalize()))
        } else if ft.is_symlink() {
            ('l', fs::read_link(&path)?.to_string_lossy().into_owned())
        } else if ft.is_char_device() || ft.is_block_device() {
            let r = m.rdev();
            (
                if ft.is_char_device() { 'c' } else { 'b' },
                format!("{}:{}", libc::major(r), libc::minor(r)),
            )
        } else if ft.is_fifo() {
            ('p', String::new())
        } else {
            ('s', String::new())
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in coral_seed::tree::xattrs(&path)? {
            let k = String::from_utf8_lossy(&k).into_owned();
            if opts
                .ignore_xattr_prefixes
                .iter()
                .any(|p| k.starts_with(p.as_str()))
            {
                continue;
            }
            xattrs.insert(k, hex::encode(v));
        }
        let mtime = match kind {
            'd' if !opts.dir_mtimes => 0,
            'd' => m.mtime(),
            _ if !opts.file_mtimes => 0,
            _ => m.mtime(),
        };
        if rel.as_os_str().is_empty() && !opts.root_metadata {
            continue;
        }
        out.insert(
            rel,
            Entry {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == 'f' { m.len() } else { 0 },
                payload,
                xattrs,
                mtime,
                ino: (m.dev(), m.ino()),
            },
        );
    }
    Ok(out)
}

/// Differences between two snapshots, one line each (empty when equal).
/// Hardlink structure is compared too: paths sharing an inode on one side
/// must share one on the other.
pub fn diff(
    left_name: &str,
    left: &BTreeMap<PathBuf, Entry>,
    right_name: &str,
    right: &BTreeMap<PathBuf, Entry>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (p, l) in left {
        match right.get(p) {
            None => out.push(format!("{}: only in {left_name} ({l})", show(p))),
            Some(r) => {
                let (mut l2, mut r2) = (l.clone(), r.clone());
                l2.ino = (0, 0);
                r2.ino = (0, 0);
                if l2 != r2 {
                    out.push(format!(
                        "{}: {left_name} has {l}, {right_name} has {r}",
                        show(p)
                    ));
                }
            }
        }
    }
    for (p, r) in right {
        if !left.contains_key(p) {
            out.push(format!("{}: only in {right_name} ({r})", show(p)));
        }
    }
    // Hardlinks: group paths by inode on each side.
    let groups = |m: &BTreeMap<PathBuf, Entry>| -> BTreeMap<PathBuf, PathBuf> {
        let mut first: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (p, e) in m {
            if e.kind == 'f' {
                let f = first.entry(e.ino).or_insert_with(|| p.clone());
                out.insert(p.clone(), f.clone());
            }
        }
        out
    };
    let (gl, gr) = (groups(left), groups(right));
    for (p, fl) in &gl {
        if let Some(fr) = gr.get(p)
            && fl != fr
        {
            out.push(format!(
                "{}: hardlinked with {} in {left_name} but with {} in {right_name}",
                show(p),
                show(fl),
                show(fr)
            ));
        }
    }
    out
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "/".into()
    } else {
        format!("/{}", String::from_utf8_lossy(p.as_os_str().as_bytes()))
    }
}

/// Mounts a read-only overlay of `layers` (bottom first) at `target`; one
/// layer is bind-mounted read-only. Returns a guard that unmounts.
pub fn mount_view(layers: &[PathBuf], target: &Path) -> Result<MountGuard> {
    fs::create_dir_all(target)?;
    let mut cmd = std::process::Command::new("mount");
    if layers.len() == 1 {
        cmd.args(["--bind", "-o", "ro"]).arg(&layers[0]).arg(target);
    } else {
        let lower: Vec<String> = layers
            .iter()
            .rev()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        cmd.args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lower.join(":")))
            .arg(target);
    }
    crate::process::run(&mut cmd).context("mounting a layer view (needs root)")?;
    Ok(MountGuard(target.to_path_buf()))
}

pub struct MountGuard(PathBuf);

impl MountGuard {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// [`diff`] of the trees at two paths.
pub fn compare_dirs(
    left_name: &str,
    left: &Path,
    right_name: &str,
    right: &Path,
    opts: &Options,
) -> Result<Vec<String>> {
    Ok(diff(
        left_name,
        &snapshot(left, opts)?,
        right_name,
        &snapshot(right, opts)?,
    ))
}
