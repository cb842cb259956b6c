//! Filesystem image tests. They need root, e2fsprogs, xfsprogs and loop
//! devices: the trees hold device nodes, foreign owners and `trusted.*`
//! xattrs, and the images are loop-mounted to check what they hold.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest as _, Sha256};

use super::*;

const EPOCH: i64 = 1_700_000_000;
const MTIME: i64 = 1_690_000_000;
const UUID: [u8; 16] = *b"coral-test-uuid!";
/// security.capability, revision 2, effective, cap_net_raw permitted.
const CAP_NET_RAW: &[u8] = &[
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];
const WEIRD: &str = ".coral/layers/aaa/we\"ird name ü";
const LONG_TARGET: &str =
    "../../../../a/rather/long/symlink/target/that/does/not/fit/in/the/inode/at/all";
const SPARSE_LEN: u64 = 64 << 20;
const SPARSE_AT: u64 = 32 << 20;
const BIG_DIR_FILES: usize = 300;

enum Op {
    Dir(String),
    File {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
    },
    Sparse(String),
    Hardlink(String, String),
    Symlink(String, String),
    Char(String, u32, u32),
    Fifo(String),
    Xattr(String, &'static str, Vec<u8>),
}

fn file(path: &str, mode: u32, uid: u32, gid: u32, data: &[u8]) -> Op {
    Op::File {
        path: path.into(),
        mode,
        uid,
        gid,
        data: data.to_vec(),
    }
}

/// Every edge case of a seed volume's tree.
fn tree_ops() -> Vec<Op> {
    let mut ops = vec![];
    for d in [
        ".coral",
        ".coral/blobs",
        ".coral/blobs/sha256",
        ".coral/layers",
        ".coral/layers/aaa",
        ".coral/layers/aaa/etc",
        ".coral/layers/aaa/usr",
        ".coral/layers/aaa/usr/bin",
        ".coral/layers/bbb",
        ".coral/layers/bbb/opq",
        ".coral/big",
    ] {
        ops.push(Op::Dir(d.into()));
    }
    ops.push(file(".coral/index.json", 0o644, 0, 0, b"{}"));
    ops.push(file(
        ".coral/blobs/sha256/0123abcd",
        0o444,
        0,
        0,
        &[7u8; 10000],
    ));
    ops.push(file(
        ".coral/layers/aaa/etc/hosts",
        0o640,
        1000,
        2000,
        b"127.0.0.1 localhost\n",
    ));
    ops.push(file(".coral/layers/aaa/etc/empty", 0o600, 0, 0, b""));
    ops.push(file(
        ".coral/layers/aaa/usr/bin/tool",
        0o4755,
        0,
        0,
        b"#!/bin/tool\n",
    ));
    ops.push(file(
        ".coral/layers/aaa/usr/bin/su",
        0o6750,
        1000,
        1001,
        b"su\n",
    ));
    ops.push(file(WEIRD, 0o644, 0, 0, b"weird\n"));
    ops.push(Op::Sparse(".coral/layers/aaa/sparse".into()));
    for i in 0..BIG_DIR_FILES {
        ops.push(file(
            &format!(".coral/big/file-{i:04}"),
            0o644,
            0,
            0,
            format!("{i}\n").as_bytes(),
        ));
    }
    ops.push(Op::Symlink(
        ".coral/layers/aaa/usr/bin/sh".into(),
        "tool".into(),
    ));
    ops.push(Op::Symlink(
        ".coral/layers/aaa/long".into(),
        LONG_TARGET.into(),
    ));
    ops.push(Op::Char(".coral/layers/bbb/gone".into(), 0, 0));
    ops.push(Op::Char(".coral/layers/bbb/null".into(), 1, 3));
    ops.push(Op::Fifo(".coral/layers/bbb/fifo".into()));
    ops.push(Op::Hardlink(
        ".coral/layers/aaa/usr/bin/tool-link".into(),
        ".coral/layers/aaa/usr/bin/tool".into(),
    ));
    let x = |p: &str, n, v: &[u8]| Op::Xattr(p.into(), n, v.to_vec());
    ops.push(x(".coral/layers/bbb/opq", "trusted.overlay.opaque", b"y"));
    ops.push(x(".coral/layers/bbb/opq", "user.note", b"opaque dir"));
    ops.push(x(
        ".coral/layers/aaa/usr/bin/tool",
        "security.capability",
        CAP_NET_RAW,
    ));
    ops.push(x(
        ".coral/layers/aaa/usr/bin/tool",
        "user.origin",
        b"layer aaa",
    ));
    ops.push(x(".coral/layers/aaa/etc/hosts", "user.one", b"1"));
    // On a symlink (user.* is not allowed there): the rewrite must not
    // follow it to `tool`.
    ops.push(x(".coral/layers/aaa/usr/bin/sh", "trusted.sym2", b"2"));
    ops.push(x(".coral/layers/aaa/usr/bin/sh", "trusted.sym1", b"1"));
    ops.push(x(WEIRD, "user.b", b"bee"));
    ops.push(x(WEIRD, "trusted.t", b"\0binary\xff"));
    ops.push(x(WEIRD, "user.a", b"a"));
    // Too big for the inode: these go to an xattr block.
    ops.push(x(".coral/index.json", "user.big1", &[b'x'; 300]));
    ops.push(x(".coral/index.json", "user.big2", &[b'y'; 200]));
    ops.push(x(".coral/index.json", "user.small", b"s"));
    ops
}

/// Stages the tree under `root`: `reversed` creates files, links and xattrs
/// in the opposite order (directory listings and xattr lists then differ),
/// and atimes differ between the two; mtimes are the same.
fn stage(root: &Path, reversed: bool) {
    let ops = tree_ops();
    let (dirs, rest): (Vec<&Op>, Vec<&Op>) = ops.iter().partition(|o| matches!(o, Op::Dir(_)));
    let rank = |o: &&Op| match o {
        Op::Dir(_) => 0,
        Op::Hardlink(..) => 2,
        Op::Xattr(..) => 3,
        _ => 1,
    };
    let mut rest = rest;
    rest.sort_by_key(rank);
    if reversed {
        // Keep the phases, reverse within each.
        rest.reverse();
        rest.sort_by_key(rank);
    }
    let mut paths = vec![String::new()];
    for op in dirs.into_iter().chain(rest) {
        match op {
            Op::Dir(p) => {
                fs::create_dir(root.join(p)).unwrap();
                paths.push(p.clone());
            }
            Op::File {
                path,
                mode,
                uid,
                gid,
                data,
            } => {
                let full = root.join(path);
                fs::write(&full, data).unwrap();
                // chown clears setuid: it goes first, as in a real extraction.
                std::os::unix::fs::lchown(&full, Some(*uid), Some(*gid)).unwrap();
                fs::set_permissions(&full, fs::Permissions::from_mode(*mode)).unwrap();
                paths.push(path.clone());
            }
            Op::Sparse(p) => {
                let mut f = fs::File::create(root.join(p)).unwrap();
                f.set_len(SPARSE_LEN).unwrap();
                f.seek(SeekFrom::Start(SPARSE_AT)).unwrap();
                f.write_all(b"data!").unwrap();
                paths.push(p.clone());
            }
            Op::Hardlink(new, old) => fs::hard_link(root.join(old), root.join(new)).unwrap(),
            Op::Symlink(p, target) => {
                symlink(target, root.join(p)).unwrap();
                paths.push(p.clone());
            }
            Op::Char(p, major, minor) => {
                rustix::fs::mknodat(
                    CWD,
                    root.join(p),
                    FileType::CharacterDevice,
                    Mode::from_raw_mode(0o666),
                    rustix::fs::makedev(*major, *minor),
                )
                .unwrap();
                paths.push(p.clone());
            }
            Op::Fifo(p) => {
                rustix::fs::mknodat(
                    CWD,
                    root.join(p),
                    FileType::Fifo,
                    Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
                paths.push(p.clone());
            }
            Op::Xattr(p, name, value) => {
                rustix::fs::lsetxattr(root.join(p), *name, value, XattrFlags::empty()).unwrap()
            }
        }
    }
    // Deepest first, so a directory's time is set after its entries changed.
    paths.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count() + usize::from(!p.is_empty())));
    let atime = if reversed { MTIME + 12345 } else { MTIME - 999 };
    for p in paths {
        let ts = |s| Timespec {
            tv_sec: s,
            tv_nsec: 0,
        };
        rustix::fs::utimensat(
            CWD,
            root.join(&p),
            &Timestamps {
                last_access: ts(atime),
                last_modification: ts(MTIME),
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
}

fn opts(fs: FsKind) -> FsOptions {
    FsOptions {
        fs,
        label: DEFAULT_LABEL.into(),
        uuid: UUID,
        epoch: EPOCH,
        size: None,
    }
}

fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// A tmpfs for the second staging, where the kernel has xattrs of every
/// namespace there (user.* since Linux 6.6); `None` otherwise.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
        let t = Tmpfs(dir);
        let probe = t.0.path().join("probe");
        fs::write(&probe, b"").unwrap();
        rustix::fs::lsetxattr(&probe, "user.probe", b"1", XattrFlags::empty()).ok()?;
        fs::remove_file(&probe).unwrap();
        Some(t)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn assert_tree(root: &Path, fs: FsKind) {
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    let xattrs = |p: &str| read_xattrs(&root.join(p)).unwrap();
    let owned = |v: &[(&str, &[u8])]| -> Vec<(Vec<u8>, Vec<u8>)> {
        v.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
            .collect()
    };

    let r = meta("");
    assert_eq!((r.uid(), r.gid(), r.mode()), (0, 0, 0o40755), "root");

    let hosts = meta(".coral/layers/aaa/etc/hosts");
    assert_eq!(
        (hosts.uid(), hosts.gid(), hosts.mode()),
        (1000, 2000, 0o100640)
    );
    assert_eq!(hosts.mtime(), MTIME);
    assert_eq!(
        fs::read(root.join(".coral/layers/aaa/etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(
        xattrs(".coral/layers/aaa/etc/hosts"),
        owned(&[("user.one", b"1")])
    );

    let tool = meta(".coral/layers/aaa/usr/bin/tool");
    assert_eq!(tool.mode(), 0o104755, "setuid kept");
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        tool.ino(),
        meta(".coral/layers/aaa/usr/bin/tool-link").ino(),
        "hardlink"
    );
    assert_eq!(
        xattrs(".coral/layers/aaa/usr/bin/tool"),
        owned(&[
            ("security.capability", CAP_NET_RAW),
            ("user.origin", b"layer aaa")
        ])
    );
    let su = meta(".coral/layers/aaa/usr/bin/su");
    assert_eq!((su.uid(), su.gid(), su.mode()), (1000, 1001, 0o106750));

    assert_eq!(
        fs::read_link(root.join(".coral/layers/aaa/usr/bin/sh")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(
        xattrs(".coral/layers/aaa/usr/bin/sh"),
        owned(&[("trusted.sym1", b"1"), ("trusted.sym2", b"2")])
    );
    assert_eq!(
        fs::read_link(root.join(".coral/layers/aaa/long")).unwrap(),
        Path::new(LONG_TARGET)
    );

    let gone = meta(".coral/layers/bbb/gone");
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0, "whiteout is 0:0");
    let null = meta(".coral/layers/bbb/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert!(meta(".coral/layers/bbb/fifo").file_type().is_fifo());

    assert_eq!(
        xattrs(".coral/layers/bbb/opq"),
        owned(&[
            ("trusted.overlay.opaque", b"y"),
            ("user.note", b"opaque dir")
        ])
    );
    assert_eq!(
        xattrs(WEIRD),
        owned(&[
            ("trusted.t", b"\0binary\xff"),
            ("user.a", b"a"),
            ("user.b", b"bee")
        ])
    );
    assert_eq!(fs::read(root.join(WEIRD)).unwrap(), b"weird\n");
    assert_eq!(
        xattrs(".coral/index.json"),
        owned(&[
            ("user.big1", &[b'x'; 300]),
            ("user.big2", &[b'y'; 200]),
            ("user.small", b"s")
        ])
    );

    let sparse = meta(".coral/layers/aaa/sparse");
    assert_eq!(sparse.len(), SPARSE_LEN);
    assert!(
        sparse.blocks() * 512 <= 64 * 1024,
        "sparse file stays sparse: {} blocks",
        sparse.blocks()
    );
    let mut f = fs::File::open(root.join(".coral/layers/aaa/sparse")).unwrap();
    f.seek(SeekFrom::Start(SPARSE_AT - 2)).unwrap();
    let mut buf = [9u8; 8];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"\0\0data!\0");

    assert_eq!(
        fs::read_dir(root.join(".coral/big")).unwrap().count(),
        BIG_DIR_FILES
    );
    assert_eq!(
        fs::read(root.join(".coral/big/file-0123")).unwrap(),
        b"123\n"
    );

    if fs == FsKind::Ext4 {
        // The times the filesystem took from the staging are fixed.
        for p in [".coral/layers/aaa/etc/hosts", ".coral/big", WEIRD] {
            let m = meta(p);
            assert_eq!((m.ctime(), m.atime()), (EPOCH, EPOCH), "{p}");
        }
    }
}

fn ext4_image(staging: &Path, out: &Path) -> ImageInfo {
    make_image(staging, out, &opts(FsKind::Ext4)).unwrap()
}

#[test]
fn ext4_images_of_one_tree_staged_twice_are_identical() {
    let a = tempfile::tempdir().unwrap();
    stage(a.path(), false);
    // New ctimes, another creation order, other atimes; on a tmpfs if it
    // takes every xattr (another filesystem lists entries and xattrs in
    // another order).
    sleep(Duration::from_millis(1100));
    let tmpfs = Tmpfs::mount();
    let b_disk = tempfile::tempdir().unwrap();
    // A directory inside it, as a build's work directory holds its tree:
    // large files are moved aside beside the root (crate::ext4bulk).
    let b = tmpfs
        .as_ref()
        .map(|t| t.0.path())
        .unwrap_or(b_disk.path())
        .join("root");
    fs::create_dir(&b).unwrap();
    let b = b.as_path();
    stage(b, true);

    let out = tempfile::tempdir().unwrap();
    let (img_a, img_b) = (out.path().join("a.img"), out.path().join("b.img"));
    let info_a = ext4_image(a.path(), &img_a);
    let info_b = ext4_image(b, &img_b);
    assert_eq!(info_a, info_b);
    assert_eq!(info_a.size, fs::metadata(&img_a).unwrap().len());
    assert_eq!(sha256_file(&img_a), sha256_file(&img_b));
    // Nothing else left beside the images.
    let mut names: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a.img", "b.img"]);
}

#[test]
fn ext4_image_holds_owners_modes_xattrs_devices_links_and_holes() {
    let staging = tempfile::tempdir().unwrap();
    stage(staging.path(), false);
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("seed.img");
    let info = ext4_image(staging.path(), &img);
    assert_eq!(info.fs, FsKind::Ext4);
    assert!(!info.block_device);
    let m = mount_image_readonly(&img).unwrap();
    assert_eq!(m.fs(), FsKind::Ext4);
    let mountpoint = m.path().to_path_buf();
    assert_tree(m.path(), FsKind::Ext4);
    // Large directories are indexed.
    drop(m);
    let htree = Command::new("debugfs")
        .args(["-R", "htree /.coral/big"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&htree.stdout).contains("Root node dump"),
        "{}",
        String::from_utf8_lossy(&htree.stderr)
    );
    // Unmounted, loop device detached, mount point gone.
    assert!(!mountpoint.exists());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(mountpoint.to_str().unwrap()));
    let loops = Command::new("losetup")
        .arg("-j")
        .arg(&img)
        .output()
        .unwrap();
    assert!(loops.stdout.is_empty(), "{loops:?}");
    // The label and UUID are the ones asked for.
    let blkid = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&img)
        .output()
        .unwrap();
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    assert!(blkid.contains("LABEL=coral-seed"), "{blkid}");
    assert!(
        blkid.contains(&format!("UUID={}", format_uuid(&UUID))),
        "{blkid}"
    );
}

#[test]
fn ext4_on_a_block_device_matches_the_image_file() {
    let staging = tempfile::tempdir().unwrap();
    stage(staging.path(), false);
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("seed.img");
    let size = 80 << 20;
    let o = FsOptions {
        size: Some(size),
        ..opts(FsKind::Ext4)
    };
    make_image(staging.path(), &img, &o).unwrap();

    let backing = out.path().join("device");
    fs::File::create(&backing)
        .unwrap()
        .set_len(size + (16 << 20))
        .unwrap();
    let losetup = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(losetup.status.success(), "{losetup:?}");
    let dev = String::from_utf8(losetup.stdout).unwrap().trim().to_owned();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());
    let info = make_image(staging.path(), Path::new(&dev), &o).unwrap();
    assert!(info.block_device);
    assert_eq!(info.size, size);

    let mut on_device = vec![0u8; size as usize];
    fs::File::open(&dev)
        .unwrap()
        .read_exact(&mut on_device)
        .unwrap();
    assert!(
        fs::read(&img).unwrap() == on_device,
        "the device holds the same bytes as the image file"
    );
}

#[test]
fn too_small_size_is_a_clear_error_and_leaves_nothing() {
    let staging = tempfile::tempdir().unwrap();
    // 80 MiB that are not zeros (zero blocks would become holes).
    let data: Vec<u8> = (0..80u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    fs::write(staging.path().join("blob"), &data).unwrap();
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("seed.img");
    for size in [64 << 20, 84 << 20] {
        let o = FsOptions {
            size: Some(size),
            ..opts(FsKind::Ext4)
        };
        let err = make_image(staging.path(), &img, &o).unwrap_err();
        let msg = err.to_string();
        match err {
            FsImageError::TooSmall { needed, given, .. } => {
                assert_eq!(given, size);
                assert!(needed > size, "{msg}");
            }
            other => panic!("expected TooSmall, got {other}"),
        }
        assert!(msg.starts_with("seed needs "), "{msg}");
        assert!(msg.contains(&format!("--size gives {size} bytes")), "{msg}");
        assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0, "{msg}");
    }
    // The computed size fits.
    let info = make_image(staging.path(), &img, &opts(FsKind::Ext4)).unwrap();
    assert_eq!(info.size, size_for(FsKind::Ext4, &info.tree));
}

#[test]
fn xfs_image_mounts_and_holds_the_same_tree() {
    let staging = tempfile::tempdir().unwrap();
    stage(staging.path(), false);
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("seed.xfs");
    let info = make_image(staging.path(), &img, &opts(FsKind::Xfs)).unwrap();
    assert_eq!(info.fs, FsKind::Xfs);
    assert!(info.size >= XFS_MIN_SIZE);
    let m = mount_image_readonly(&img).unwrap();
    assert_eq!(m.fs(), FsKind::Xfs);
    assert_tree(m.path(), FsKind::Xfs);
    m.unmount().unwrap();
    let blkid = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(&img)
        .output()
        .unwrap();
    let blkid = String::from_utf8_lossy(&blkid.stdout);
    assert!(blkid.contains("LABEL=coral-seed"), "{blkid}");
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
}

#[test]
fn mount_refuses_what_is_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.img");
    fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let err = mount_image_readonly(&junk).unwrap_err().to_string();
    assert!(err.contains("holds no filesystem"), "{err}");
}

#[test]
fn options_are_checked() {
    let staging = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("x.img");
    let long = FsOptions {
        label: "thirteen-char".into(),
        ..opts(FsKind::Xfs)
    };
    let err = make_image(staging.path(), &img, &long)
        .unwrap_err()
        .to_string();
    assert!(err.contains("xfs labels hold at most 12"), "{err}");
    let future = FsOptions {
        epoch: 1 << 33,
        ..opts(FsKind::Ext4)
    };
    assert!(make_image(staging.path(), &img, &future).is_err());
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn used_inodes_come_from_the_free_ranges() {
    let dump = "\
Inode count:              48
Free inodes:              30
Inodes per group:         16
First inode:              11
Group descriptor size:    64

Group 0: (Blocks 0-32767) csum 0x1 [ITABLE_ZEROED]
  0 free blocks, 1 free inodes, 2 directories
  Free blocks: 
  Free inodes: 14
Group 1: (Blocks 32768-65535) csum 0x2 [INODE_UNINIT]
  Free blocks: 1-2
  Free inodes: 17-20, 23-32
Group 2: (Blocks 65536-98303) csum 0x3
  Free inodes: 33-48
";
    assert_eq!(used_inodes(dump).unwrap(), [2, 11, 12, 13, 15, 16, 21, 22]);
    assert!(used_inodes(&dump.replace("Group 2", "Groop 2")).is_err());
}

#[test]
fn debugfs_quoting() {
    assert_eq!(debugfs_quote(b"/a b").unwrap(), b"\"/a b\"");
    assert_eq!(debugfs_quote(b"/q\"x").unwrap(), b"\"/q\"\"x\"");
    assert_eq!(debugfs_quote(b"/line\nbreak"), None);
    assert_eq!(debugfs_quote(b"/cr\r"), None);
}

#[test]
fn sizes() {
    let empty = TreeUsage::default();
    assert_eq!(size_for(FsKind::Ext4, &empty), 64 << 20);
    assert_eq!(size_for(FsKind::Xfs, &empty), 300 << 20);
    let tree = TreeUsage {
        bytes: 10 << 30,
        inodes: 200_000,
    };
    let s = size_for(FsKind::Ext4, &tree);
    assert_eq!(s % (1 << 20), 0);
    assert!(s > tree.bytes + tree.bytes / 10, "{s}");
    assert!(s < tree.bytes + tree.bytes / 4, "{s}");
    assert!(minimum_size(FsKind::Ext4, &tree) < s);
    // Many empty files: at least a block per inode.
    let files = TreeUsage {
        bytes: 1 << 20,
        inodes: 1_000_000,
    };
    assert!(size_for(FsKind::Ext4, &files) >= planned_inodes(files.inodes) * BLOCK);
    assert_eq!(
        format_uuid(&derive_uuid(b"x")).len(),
        36,
        "{}",
        format_uuid(&derive_uuid(b"x"))
    );
    assert_eq!(&format_uuid(&derive_uuid(b"x"))[14..15], "8");
}

#[test]
fn a_missing_tool_names_its_package() {
    let err = find_tool(&Tool {
        name: "no-such-mkfs",
        package: "no-such-package",
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("install the Debian package no-such-package"),
        "{err}"
    );
}

#[test]
fn ext4_keeps_nanosecond_mtimes_that_mke2fs_drops() {
    let staging = tempfile::tempdir().unwrap();
    let dir = staging.path().join("d");
    fs::create_dir(&dir).unwrap();
    let file = dir.join("f");
    fs::write(&file, b"x").unwrap();
    std::os::unix::fs::symlink("f", dir.join("l")).unwrap();
    let set = |p: &Path, ns: i64| {
        let ts = rustix::fs::Timespec {
            tv_sec: 1_700_000_000,
            tv_nsec: ns,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            p,
            &rustix::fs::Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    };
    set(&file, 123_456_789);
    set(&dir.join("l"), 5);
    set(&dir, 999_999_999);
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("ns.img");
    ext4_image(staging.path(), &img);
    let m = mount_image_readonly(&img).unwrap();
    let nsec = |rel: &str| {
        fs::symlink_metadata(m.path().join(rel))
            .unwrap()
            .mtime_nsec()
    };
    assert_eq!(nsec("d/f"), 123_456_789);
    assert_eq!(nsec("d/l"), 5);
    assert_eq!(nsec("d"), 999_999_999);
    assert_eq!(
        fs::metadata(m.path().join("d/f")).unwrap().mtime(),
        1_700_000_000
    );
}

/// A tree whose files are large enough for crate::ext4bulk: one with an
/// owner, setuid and xattrs, a sparse one, a hardlinked pair (left to
/// mke2fs), and small files beside them.
fn stage_large(root: &Path) {
    let sub = root.join("sub");
    fs::create_dir_all(sub.join("d")).unwrap();
    let data: Vec<u8> = (0..(3u32 << 19) + 17)
        .map(|i| (i % 253) as u8 + 1)
        .collect();
    let big = sub.join("d/big");
    fs::write(&big, &data).unwrap();
    rustix::fs::chown(
        &big,
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1001)),
    )
    .unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o4755)).unwrap();
    rustix::fs::setxattr(&big, "user.z", b"last", XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(&big, "user.a", b"first", XattrFlags::empty()).unwrap();
    rustix::fs::setxattr(
        &big,
        "security.capability",
        CAP_NET_RAW,
        XattrFlags::empty(),
    )
    .unwrap();
    let mut sparse = fs::File::create(sub.join("sparse")).unwrap();
    sparse.set_len(40 << 20).unwrap();
    sparse.seek(SeekFrom::Start(20 << 20)).unwrap();
    sparse.write_all(&data[..300_000]).unwrap();
    drop(sparse);
    fs::write(sub.join("linked"), &data[..400_000]).unwrap();
    fs::hard_link(sub.join("linked"), sub.join("d/linked-too")).unwrap();
    fs::write(sub.join("small"), b"small\n").unwrap();
    for p in ["d/big", "sparse", "linked", "small", "d", ""] {
        let ts = Timespec {
            tv_sec: MTIME,
            tv_nsec: 250_000_000,
        };
        rustix::fs::utimensat(
            CWD,
            sub.join(p),
            &Timestamps {
                last_access: ts,
                last_modification: ts,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
}

#[test]
fn large_files_set_aside_come_back_exactly_even_after_a_kill() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    stage_large(&root);
    let before = coral_seed::tree::tree_digest(&root).unwrap();
    let bulk = scan_tree(&root).unwrap().bulk;
    let names: Vec<String> = bulk
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    // The scan's order (a directory's entries by name, then its
    // subdirectories); the hardlinked pair and the small file stay.
    assert_eq!(names, ["/sub/sparse", "/sub/d/big"]);

    let swapped = ext4bulk::swap_out(&root, &bulk).unwrap().unwrap();
    assert_eq!(swapped.files.len(), 2);
    // The tree holds empty stand-ins with the same metadata ...
    let stand_in = fs::symlink_metadata(root.join("sub/d/big")).unwrap();
    assert_eq!(stand_in.len(), (3 << 19) + 17);
    // No data (at most an xattr block).
    assert!(stand_in.blocks() <= 8, "{} blocks", stand_in.blocks());
    assert_eq!(stand_in.mode() & 0o7777, 0o4755);
    assert_eq!((stand_in.uid(), stand_in.gid()), (1000, 1001));
    assert_eq!(
        read_xattrs(&root.join("sub/d/big")).unwrap(),
        read_xattrs(&parent.path().join(".root.coral-bulk/1")).unwrap()
    );
    assert_ne!(coral_seed::tree::tree_digest(&root).unwrap().0, before.0);
    // ... and a build killed here is undone by the next one's restore.
    drop(swapped);
    ext4bulk::restore(&root).unwrap();
    assert_eq!(coral_seed::tree::tree_digest(&root).unwrap(), before);
    assert!(!parent.path().join(".root.coral-bulk").exists());

    // Written into an image: the same files, and the tree as it was.
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("large.img");
    ext4_image(&root, &img);
    assert_eq!(coral_seed::tree::tree_digest(&root).unwrap(), before);
    assert!(!parent.path().join(".root.coral-bulk").exists());
    let m = mount_image_readonly(&img).unwrap();
    assert_eq!(
        coral_seed::tree::tree_digest(&m.path().join("sub")).unwrap(),
        coral_seed::tree::tree_digest(&root.join("sub")).unwrap()
    );
    let sparse = fs::metadata(m.path().join("sub/sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "the sparse file stays sparse: {} blocks",
        sparse.blocks()
    );
    drop(m);
    // The data went around mke2fs, and the image is still reproducible.
    let img2 = out.path().join("large2.img");
    ext4_image(&root, &img2);
    assert_eq!(sha256_file(&img), sha256_file(&img2));
}
