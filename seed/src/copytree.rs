//! An exact copy of a directory tree, as `cp -a --sparse=always` with
//! xattrs would make it, for the places coral copies a layer tree: the
//! builder's incremental build (new layers into a copy of the previous
//! volume), the node's `import --mode copy` (a pre-extracted layer from a
//! read-only volume into containerd's snapshotter), and `mount`'s carry-over
//! of what the machine image left in containerd's root.
//!
//! Kept: file types (directories, regular files, symlinks, character and
//! block devices — overlayfs whiteouts are 0:0 character devices —, fifos,
//! sockets), modes including setuid/setgid/sticky, owners, nanosecond
//! access and modification times, every extended attribute the source
//! filesystem lists (`trusted.overlay.opaque`, `security.capability`,
//! `user.*`, ...), hardlinks within the tree, and holes in sparse files.
//!
//! Order matters and is kept: ownership before mode (chown clears setuid)
//! and before xattrs (chown drops `security.capability`), times last, and
//! directories finished deepest first, after their content.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, Timespec, Timestamps};

/// What a copy wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyStats {
    /// Entries created, of every type (the top directory included).
    pub entries: u64,
    /// Regular files whose data was copied (each inode once).
    pub files: u64,
    /// Bytes of file data copied (holes not counted).
    pub bytes: u64,
    /// Entries made as hardlinks to a file copied before.
    pub hardlinks: u64,
}

impl CopyStats {
    pub fn add(&mut self, other: CopyStats) {
        self.entries += other.entries;
        self.files += other.files;
        self.bytes += other.bytes;
        self.hardlinks += other.hardlinks;
    }
}

fn err_at(what: &str, path: &Path) -> impl FnOnce(io::Error) -> io::Error {
    let msg = format!("{what} {}", path.display());
    move |e| io::Error::new(e.kind(), format!("{msg}: {e}"))
}

/// Copies the tree at `src` (a directory, or a single entry of any type)
/// to `dst`, which must not exist (its parent must). Errors name the path that failed; what was copied before the
/// error stays, so a caller copies into a scratch name and renames.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<CopyStats> {
    let mut stats = CopyStats::default();
    // Hardlinked inodes seen so far → where their first copy is.
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    // Directories to finish (owner, mode, xattrs, times) once filled.
    let mut dirs: Vec<(PathBuf, PathBuf, Metadata)> = Vec::new();
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((from, to)) = stack.pop() {
        let m = fs::symlink_metadata(&from).map_err(err_at("reading", &from))?;
        let ft = m.file_type();
        if ft.is_dir() {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&to)
                .map_err(err_at("creating", &to))?;
            for entry in fs::read_dir(&from).map_err(err_at("listing", &from))? {
                let name = entry.map_err(err_at("listing", &from))?.file_name();
                stack.push((from.join(&name), to.join(&name)));
            }
            dirs.push((from, to, m));
            stats.entries += 1;
            continue;
        }
        if ft.is_file() && m.nlink() > 1 {
            let key = (m.dev(), m.ino());
            if let Some(first) = inodes.get(&key) {
                fs::hard_link(first, &to).map_err(err_at("linking", &to))?;
                stats.hardlinks += 1;
                stats.entries += 1;
                continue;
            }
            inodes.insert(key, to.clone());
        }
        if ft.is_file() {
            stats.bytes += copy_file(&from, &to, &m)?;
            stats.files += 1;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(err_at("reading the link", &from))?;
            std::os::unix::fs::symlink(&target, &to).map_err(err_at("creating", &to))?;
            finish(&from, &to, &m, true)?;
        } else {
            let kind = if ft.is_char_device() {
                rustix::fs::FileType::CharacterDevice
            } else if ft.is_block_device() {
                rustix::fs::FileType::BlockDevice
            } else if ft.is_fifo() {
                rustix::fs::FileType::Fifo
            } else if ft.is_socket() {
                rustix::fs::FileType::Socket
            } else {
                return Err(io::Error::other(format!(
                    "{}: a file type this copy does not know",
                    from.display()
                )));
            };
            rustix::fs::mknodat(
                CWD,
                &to,
                kind,
                rustix::fs::Mode::from_raw_mode(0o600),
                m.rdev() as rustix::fs::Dev,
            )
            .map_err(|e| err_at("creating", &to)(e.into()))?;
            finish(&from, &to, &m, false)?;
        }
        stats.entries += 1;
    }
    // Deepest first: a directory's times are set after its content is in.
    for (from, to, m) in dirs.iter().rev() {
        finish(from, to, m, false)?;
    }
    Ok(stats)
}

/// Copies one regular file's data (keeping holes) and metadata; returns the
/// bytes copied.
fn copy_file(from: &Path, to: &Path, m: &Metadata) -> io::Result<u64> {
    let mut src = File::open(from).map_err(err_at("opening", from))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(err_at("creating", to))?;
    let size = m.len();
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < size {
        // The next run of data, and where it ends; a filesystem without
        // SEEK_DATA reports the whole file as data.
        let start = match rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(_) => pos,
        };
        if start >= size {
            break; // the file grew after it was looked at: copy what it was
        }
        let end = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(start))
            .unwrap_or(size)
            .min(size)
            .max(start + 1);
        copied += copy_range(&mut src, &mut dst, start, end - start)
            .map_err(err_at("copying into", to))?;
        pos = end;
    }
    // A trailing hole (and an empty file) gets its length here.
    dst.set_len(size).map_err(err_at("sizing", to))?;
    finish_fd(from, to, m, &dst)?;
    Ok(copied)
}

/// Copies `len` bytes at `offset` from `src` to the same offset in `dst`:
/// in the kernel where it can, by read and write where it cannot.
fn copy_range(src: &mut File, dst: &mut File, offset: u64, len: u64) -> io::Result<u64> {
    let (mut off_in, mut off_out) = (offset, offset);
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        match rustix::fs::copy_file_range(
            &*src,
            Some(&mut off_in),
            &*dst,
            Some(&mut off_out),
            chunk,
        ) {
            Ok(0) => break,
            Ok(n) => left -= n as u64,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::OPNOTSUPP,
            ) => return read_write(src, dst, off_in, left).map(|n| len - left + n),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if left > 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the source ended {left} bytes early"),
        ));
    }
    Ok(len)
}

fn read_write(src: &mut File, dst: &mut File, offset: u64, len: u64) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    src.seek(SeekFrom::Start(offset))?;
    dst.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = src.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the source ended {left} bytes early"),
            ));
        }
        dst.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(len)
}

fn timestamps(m: &Metadata) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: m.atime(),
            tv_nsec: m.atime_nsec() as _,
        },
        last_modification: Timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec() as _,
        },
    }
}

fn xattrs_of(from: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    match crate::tree::xattrs(from) {
        Ok(x) => Ok(x),
        // A source filesystem without xattrs has none to copy.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(Vec::new()),
        Err(e) => Err(err_at("reading the xattrs of", from)(e)),
    }
}

fn set_xattrs(to: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    for (name, value) in xattrs {
        let set = rustix::fs::lsetxattr(
            to,
            OsStr::from_bytes(name),
            value,
            rustix::fs::XattrFlags::empty(),
        );
        // The source's SELinux label is the host policy's business (an
        // enforcing host may refuse it), as `cp -a` treats it.
        if set.is_err() && name.as_slice() == b"security.selinux" {
            tracing::warn!(path = %to.display(), "security.selinux not copied");
            continue;
        }
        set.map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "setting xattr {} on {}: {e}",
                    String::from_utf8_lossy(name),
                    to.display()
                ),
            )
        })?;
    }
    Ok(())
}

/// Owner, mode, xattrs and times of an entry that is not an open file.
fn finish(from: &Path, to: &Path, m: &Metadata, symlink: bool) -> io::Result<()> {
    let owner = (
        Some(rustix::fs::Uid::from_raw(m.uid())),
        Some(rustix::fs::Gid::from_raw(m.gid())),
    );
    rustix::fs::chownat(
        CWD,
        to,
        owner.0,
        owner.1,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err_at("setting the owner of", to)(e.into()))?;
    if !symlink {
        // After chown, which clears setuid and setgid.
        rustix::fs::chmod(to, rustix::fs::Mode::from_raw_mode(m.mode() & 0o7777))
            .map_err(|e| err_at("setting the mode of", to)(e.into()))?;
    }
    set_xattrs(to, &xattrs_of(from)?)?;
    rustix::fs::utimensat(
        CWD,
        to,
        &timestamps(m),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err_at("setting the times of", to)(e.into()))?;
    Ok(())
}

/// The same for a regular file, through its open descriptor: `file` (open
/// for writing, at `to`) gets the owner, mode, xattrs and times `m` and
/// `from` have. Also used to make an empty stand-in of a file.
pub fn finish_fd(from: &Path, to: &Path, m: &Metadata, file: &File) -> io::Result<()> {
    let fd = file.as_fd();
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(m.uid())),
        Some(rustix::fs::Gid::from_raw(m.gid())),
    )
    .map_err(|e| err_at("setting the owner of", to)(e.into()))?;
    rustix::fs::fchmod(fd, rustix::fs::Mode::from_raw_mode(m.mode() & 0o7777))
        .map_err(|e| err_at("setting the mode of", to)(e.into()))?;
    set_xattrs(to, &xattrs_of(from)?)?;
    rustix::fs::futimens(fd, &timestamps(m))
        .map_err(|e| err_at("setting the times of", to)(e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A tree with one of everything a layer holds.
    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/file"), b"hello").unwrap();
        fs::hard_link(dir.join("a/file"), dir.join("a/b/link")).unwrap();
        std::os::unix::fs::symlink("../file", dir.join("a/b/sym")).unwrap();
        fs::write(dir.join("suid"), b"x").unwrap();
        rustix::fs::chown(
            dir.join("suid"),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
        )
        .unwrap();
        fs::set_permissions(dir.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        rustix::fs::lsetxattr(
            dir.join("suid"),
            "security.capability",
            // VFS_CAP_REVISION_2, cap_net_bind_service permitted+effective.
            &[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::mknodat(
            CWD,
            dir.join("a/whiteout"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )
        .unwrap();
        rustix::fs::mknodat(
            CWD,
            dir.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        rustix::fs::lsetxattr(
            dir.join("a/b"),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        rustix::fs::lsetxattr(
            dir.join("a/file"),
            "user.note",
            b"kept",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        // Sparse: 8 MiB with 4 KiB of data in the middle.
        let f = File::create(dir.join("sparse")).unwrap();
        f.set_len(8 << 20).unwrap();
        rustix::io::pwrite(&f, &[7u8; 4096], 4 << 20).unwrap();
        drop(f);
        fs::set_permissions(dir.join("a"), fs::Permissions::from_mode(0o1777)).unwrap();
        let old = Timestamps {
            last_access: Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 5,
            },
            last_modification: Timespec {
                tv_sec: 1_000_000_001,
                tv_nsec: 123_456_789,
            },
        };
        for p in ["a/b/sym", "a/b", "a", "suid", "sparse", "a/whiteout"] {
            rustix::fs::utimensat(
                CWD,
                dir.join(p),
                &old,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
    }

    #[test]
    fn a_copy_has_the_same_tree_digest_hardlinks_and_holes() {
        // Root: owners, devices and trusted.* xattrs need it (CI runs as root).
        assert!(
            is_root(),
            "this test needs root (mknod, chown, trusted xattrs)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        sample(&src);
        let stats = copy_tree(&src, &dst).unwrap();

        let (want, _) = crate::tree::tree_digest(&src).unwrap();
        let (got, _) = crate::tree::tree_digest(&dst).unwrap();
        assert_eq!(got, want, "the copy differs from its source");
        // The digest covers owners, modes, times, xattrs and hardlinks; the
        // rest a user would notice:
        let a = fs::metadata(dst.join("a/file")).unwrap();
        let b = fs::metadata(dst.join("a/b/link")).unwrap();
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), 2),
            "a hardlink became a copy"
        );
        let sparse = fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 8 << 20);
        assert!(
            sparse.blocks() * 512 < 1 << 20,
            "holes were filled: {} bytes allocated",
            sparse.blocks() * 512
        );
        assert_eq!(
            fs::read(dst.join("sparse")).unwrap(),
            fs::read(src.join("sparse")).unwrap()
        );
        assert_eq!(stats.hardlinks, 1);
        assert_eq!(stats.files, 3);
        assert_eq!(stats.bytes, 5 + 1 + 4096);
        let suid = fs::metadata(dst.join("suid")).unwrap();
        assert_eq!(
            suid.mode() & 0o7777,
            0o4755,
            "setuid lost (chown after chmod?)"
        );
    }

    #[test]
    fn a_copy_to_another_filesystem_is_exact_too() {
        // copy_file_range fails across filesystems (EXDEV): the read/write
        // path, the one a node uses (volume to containerd's disk), runs here.
        assert!(
            is_root(),
            "this test needs root (mknod, chown, trusted xattrs)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let (src, dst) = (tmp.path().join("src"), shm.path().join("dst"));
        fs::create_dir(&src).unwrap();
        sample(&src);
        // Bigger than one read/write chunk, with a hole in the middle.
        let f = File::create(src.join("big")).unwrap();
        f.set_len(5 << 20).unwrap();
        rustix::io::pwrite(&f, &vec![5u8; 3 << 20], 0).unwrap();
        rustix::io::pwrite(&f, &[6u8; 100], (5 << 20) - 100).unwrap();
        drop(f);
        copy_tree(&src, &dst).unwrap();
        let (want, _) = crate::tree::tree_digest(&src).unwrap();
        let (got, _) = crate::tree::tree_digest(&dst).unwrap();
        assert_eq!(got, want, "the copy on tmpfs differs from its source");
        assert_eq!(
            fs::read(dst.join("big")).unwrap(),
            fs::read(src.join("big")).unwrap()
        );
    }

    #[test]
    fn an_existing_destination_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        fs::write(dst.join("mine"), b"keep").unwrap();
        let e = copy_tree(&src, &dst).unwrap_err();
        assert!(e.to_string().contains(&dst.display().to_string()), "{e}");
        assert_eq!(fs::read(dst.join("mine")).unwrap(), b"keep");
    }
}
