//! A digest of an extracted layer tree: everything a container would see of
//! it (paths, types, modes, owners, mtimes, sizes, file contents, link
//! targets, device numbers, xattrs), in a canonical order. The builder
//! records it per layer; `verify` and the node recompute it to prove a tree
//! is exactly what was built.
//!
//! The record of each entry, in depth-first order with children sorted by
//! name bytes, is one line:
//! `path NUL type NUL mode NUL uid NUL gid NUL mtime.nsec NUL size NUL
//! payload NUL xattrs LF`, where payload is the SHA-256 of a regular file's
//! content, a symlink's target, or `major:minor` of a device, and xattrs are
//! `name=hexvalue` joined by `;` in name order. A hardlinked file is hashed
//! once per inode; its record also carries the path it was first seen at, so
//! hardlinks are part of the digest.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    /// Bytes of regular-file content, each inode once.
    pub file_bytes: u64,
}

/// Digest of the tree at `root` (see the module docs for what it covers).
pub fn tree_digest(root: &Path) -> io::Result<(Digest, TreeStats)> {
    let mut h = Sha256::new();
    let mut stats = TreeStats::default();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path)?;
        let ft = m.file_type();
        let (kind, payload): (&str, Vec<u8>) = if ft.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
            for n in names {
                stack.push(rel.join(n));
            }
            ("d", Vec::new())
        } else if ft.is_file() {
            let key = (m.dev(), m.ino());
            if m.nlink() > 1
                && let Some(first) = inodes.get(&key)
            {
                let mut p = b"link:".to_vec();
                p.extend_from_slice(first.as_os_str().as_bytes());
                ("h", p)
            } else {
                if m.nlink() > 1 {
                    inodes.insert(key, rel.clone());
                }
                stats.file_bytes += m.len();
                let mut fh = Sha256::new();
                let mut f = File::open(&path)?;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    fh.update(&buf[..n]);
                }
                ("f", hex::encode(fh.finalize()).into_bytes())
            }
        } else if ft.is_symlink() {
            ("l", fs::read_link(&path)?.as_os_str().as_bytes().to_vec())
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = m.rdev();
            let (major, minor) = (libc_major(rdev), libc_minor(rdev));
            (
                if ft.is_char_device() { "c" } else { "b" },
                format!("{major}:{minor}").into_bytes(),
            )
        } else if ft.is_fifo() {
            ("p", Vec::new())
        } else {
            ("s", Vec::new())
        };
        stats.entries += 1;
        let name = if rel.as_os_str().is_empty() {
            b".".as_slice()
        } else {
            rel.as_os_str().as_bytes()
        };
        h.update(name);
        h.update(b"\0");
        h.update(kind.as_bytes());
        let size = if kind == "f" || kind == "h" {
            m.len()
        } else {
            0
        };
        h.update(
            format!(
                "\0{:o}\0{}\0{}\0{}.{}\0{}\0",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec(),
                size
            )
            .as_bytes(),
        );
        h.update(&payload);
        h.update(b"\0");
        for (k, v) in xattrs(&path)? {
            h.update(&k);
            h.update(b"=");
            h.update(hex::encode(v).as_bytes());
            h.update(b";");
        }
        h.update(b"\n");
    }
    Ok((Digest::from_sha256(h.finalize().into()), stats))
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}

/// The extended attributes of `path` itself (not a symlink's target), sorted.
pub fn xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let len = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).expect("no NUL inside a name");
        let mut value = vec![0u8; 256];
        let n = loop {
            match rustix::fs::lgetxattr(path, cname.as_c_str(), &mut value) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                // Removed between list and get.
                Err(rustix::io::Errno::NODATA) => break usize::MAX,
                Err(e) => return Err(e.into()),
            }
        };
        if n != usize::MAX {
            value.truncate(n);
            out.push((name.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/file"), b"content").unwrap();
        fs::hard_link(dir.join("a/b/file"), dir.join("a/hard")).unwrap();
        symlink("b/file", dir.join("a/link")).unwrap();
        fs::write(dir.join("top"), b"x").unwrap();
    }

    /// Sets every entry's mtime (symlinks' own too) to `secs`.
    fn set_all_times(dir: &Path, secs: i64) {
        let ts = rustix::fs::Timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        let mut stack = vec![dir.to_path_buf()];
        while let Some(p) = stack.pop() {
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                for e in fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
            }
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &p,
                &rustix::fs::Timestamps {
                    last_access: ts,
                    last_modification: ts,
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
    }

    #[test]
    fn equal_trees_give_equal_digests_and_any_change_shows() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        sample(one.path());
        sample(two.path());
        set_all_times(one.path(), 1_700_000_000);
        set_all_times(two.path(), 1_700_000_000);
        let (d1, s1) = tree_digest(one.path()).unwrap();
        let (d2, _) = tree_digest(two.path()).unwrap();
        assert_eq!(d1, d2);
        // The hardlinked content counts once.
        assert_eq!(s1.file_bytes, 8);
        assert_eq!(s1.entries, 7);

        fs::write(two.path().join("top"), b"y").unwrap();
        set_all_times(two.path(), 1_700_000_000);
        assert_ne!(tree_digest(two.path()).unwrap().0, d1, "content change");

        fs::write(two.path().join("top"), b"x").unwrap();
        set_all_times(two.path(), 1_700_000_000);
        assert_eq!(tree_digest(two.path()).unwrap().0, d1, "restored");
        let mut p = fs::metadata(two.path().join("top")).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o4755);
        fs::set_permissions(two.path().join("top"), p).unwrap();
        assert_ne!(tree_digest(two.path()).unwrap().0, d1, "mode change");
        set_all_times(two.path(), 1_700_000_001);
    }

    #[test]
    fn a_copy_instead_of_a_hardlink_changes_the_digest() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        sample(one.path());
        sample(two.path());
        fs::remove_file(two.path().join("a/hard")).unwrap();
        fs::copy(two.path().join("a/b/file"), two.path().join("a/hard")).unwrap();
        // Align times so only the link structure differs.
        set_all_times(one.path(), 0);
        set_all_times(two.path(), 0);
        assert_ne!(
            tree_digest(one.path()).unwrap().0,
            tree_digest(two.path()).unwrap().0
        );
    }
}
