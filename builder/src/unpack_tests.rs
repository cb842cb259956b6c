//! Extraction tests on hand-made tars. They need root (ownership, device
//! nodes, `trusted.*` xattrs), as the builder itself does.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};
use tar::{Builder, EntryType, Header};

use super::*;

/// Builds a tar in memory, entry by entry.
struct Tar(Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(Builder::new(Vec::new()))
    }
    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    }
    fn dir(mut self, name: &str, mode: u32) -> Tar {
        let mut h = Tar::header(EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }
    fn file(mut self, name: &str, mode: u32, data: &[u8]) -> Tar {
        let mut h = Tar::header(EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }
    fn owned_file(mut self, name: &str, uid: u64, gid: u64, data: &[u8]) -> Tar {
        let mut h = Tar::header(EntryType::Regular, 0o644, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }
    fn link(mut self, kind: EntryType, name: &str, target: &str) -> Tar {
        let mut h = Tar::header(kind, 0o777, 0);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }
    fn node(mut self, kind: EntryType, name: &str, major: u32, minor: u32) -> Tar {
        let mut h = Tar::header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, name, &[][..]).unwrap();
        self
    }
    fn xattr(mut self, key: &str, value: &[u8]) -> Tar {
        let k = format!("SCHILY.xattr.{key}");
        self.0.append_pax_extensions([(k.as_str(), value)]).unwrap();
        self
    }
    /// A raw header with an arbitrary name, bypassing the builder's own checks
    /// (it refuses `..` and absolute paths, as it should; attackers don't).
    fn raw(mut self, kind: EntryType, name: &str, link: Option<&str>, data: &[u8]) -> Tar {
        let mut h = Tar::header(kind, 0o644, data.len() as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn unpack(tar: &[u8], dest: &Path, has_parent: bool) -> Result<UnpackedLayer, UnpackError> {
    unpack_layer(
        tar,
        &UnpackOptions {
            layer: "test-layer",
            compression: Compression::None,
            dest,
            has_parent,
            max_bytes: 1 << 30,
        },
    )
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

#[test]
fn regular_entries_keep_type_mode_owner_times_and_content() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/hello", 0o644, b"hello\n")
        .file("usr/bin/su", 0o4755, b"#!/bin/true\n")
        .owned_file("home/u/f", 1000, 1001, b"mine")
        .link(EntryType::Symlink, "etc/rel", "hello")
        .link(EntryType::Symlink, "etc/abs", "/etc/hello")
        .link(EntryType::Symlink, "etc/dangling", "nowhere")
        .link(EntryType::Link, "etc/hard", "etc/hello")
        .node(EntryType::Char, "dev/null", 1, 3)
        .node(EntryType::Block, "dev/loop0", 7, 0)
        .node(EntryType::Fifo, "run/fifo", 0, 0)
        .bytes();
    let out = unpack(&tar, d.path(), false).unwrap();
    let p = |s: &str| d.path().join(s);

    assert_eq!(fs::read(p("etc/hello")).unwrap(), b"hello\n");
    let su = fs::metadata(p("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid survives chown");
    let f = fs::metadata(p("home/u/f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (1000, 1001));
    assert_eq!(fs::metadata(p("etc/hello")).unwrap().mtime(), 1_700_000_000);
    assert_eq!(
        fs::symlink_metadata(p("etc")).unwrap().mtime(),
        1_700_000_000,
        "dir times set last"
    );
    assert_eq!(fs::read_link(p("etc/rel")).unwrap(), Path::new("hello"));
    assert_eq!(
        fs::read_link(p("etc/abs")).unwrap(),
        Path::new("/etc/hello")
    );
    assert_eq!(
        fs::read_link(p("etc/dangling")).unwrap(),
        Path::new("nowhere")
    );
    assert_eq!(
        fs::metadata(p("etc/hard")).unwrap().ino(),
        fs::metadata(p("etc/hello")).unwrap().ino()
    );
    let null = fs::symlink_metadata(p("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert!(
        fs::symlink_metadata(p("dev/loop0"))
            .unwrap()
            .file_type()
            .is_block_device()
    );
    assert!(
        fs::symlink_metadata(p("run/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );

    // The diff ID is the SHA-256 of the whole stream (trailing zero blocks included).
    assert_eq!(
        out.diff_id.to_string(),
        format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
    );
    assert_eq!(out.tar_bytes, tar.len() as u64);
    assert_eq!(out.file_bytes, 6 + 12 + 4);
    // usr, usr/bin, home, home/u, dev, run were never named: implicit.
    let mut implicit: Vec<String> = out
        .implicit_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    implicit.sort();
    assert_eq!(implicit, ["dev", "home", "home/u", "run", "usr", "usr/bin"]);
}

#[test]
fn xattrs_are_applied_except_trusted_ones() {
    let d = tempfile::tempdir().unwrap();
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let tar = Tar::new()
        .xattr("user.coral", b"hello")
        .file("a", 0o644, b"a")
        .xattr("security.capability", &cap)
        .file("ping", 0o755, b"p")
        .xattr("trusted.overlay.opaque", b"y")
        .dir("sneaky/", 0o755)
        .bytes();
    unpack(&tar, d.path(), true).unwrap();
    assert_eq!(
        xattr(&d.path().join("a"), "user.coral").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        xattr(&d.path().join("ping"), "security.capability").as_deref(),
        Some(&cap[..])
    );
    assert_eq!(
        xattr(&d.path().join("sneaky"), "trusted.overlay.opaque"),
        None,
        "a layer must not steer overlayfs"
    );
}

#[test]
fn whiteouts_become_overlay_char_devices_over_a_parent() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tar::new()
        .file("etc/.wh.deleted", 0o644, b"")
        .file("opt/opaque/.wh..wh..opq", 0o644, b"")
        .file("opt/opaque/new", 0o644, b"n")
        .bytes();
    unpack(&tar, d.path(), true).unwrap();
    let wh = fs::symlink_metadata(d.path().join("etc/deleted")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!d.path().join("etc/.wh.deleted").exists());
    assert_eq!(
        xattr(&d.path().join("opt/opaque"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!d.path().join("opt/opaque/.wh..wh..opq").exists());
    assert_eq!(fs::read(d.path().join("opt/opaque/new")).unwrap(), b"n");
}

#[test]
fn whiteouts_in_a_base_layer_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tar::new()
        .file("a", 0o644, b"a")
        .file(".wh.a", 0o644, b"")
        .file("dir/.wh..wh..opq", 0o644, b"")
        .bytes();
    unpack(&tar, d.path(), false).unwrap();
    assert!(
        fs::symlink_metadata(d.path().join("a")).is_err(),
        "deleted within the base layer"
    );
    assert!(xattr(&d.path().join("dir"), "trusted.overlay.opaque").is_none());
}

#[test]
fn later_entries_replace_earlier_ones_but_directories_merge() {
    let d = tempfile::tempdir().unwrap();
    let tar = Tar::new()
        .file("x", 0o644, b"first")
        .dir("x/", 0o700)
        .file("x/inner", 0o644, b"i")
        .dir("x/", 0o750)
        .file("y", 0o644, b"one")
        .file("y", 0o600, b"two")
        .bytes();
    unpack(&tar, d.path(), false).unwrap();
    assert!(fs::metadata(d.path().join("x")).unwrap().is_dir());
    assert_eq!(
        fs::metadata(d.path().join("x")).unwrap().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        fs::read(d.path().join("x/inner")).unwrap(),
        b"i",
        "a second dir entry keeps contents"
    );
    assert_eq!(fs::read(d.path().join("y")).unwrap(), b"two");
}

#[test]
fn hostile_entries_are_refused_with_the_layer_and_entry_named() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            Tar::new()
                .raw(EntryType::Regular, "../escape", None, b"x")
                .bytes(),
            "'..'",
        ),
        (
            "nested dotdot",
            Tar::new()
                .raw(EntryType::Regular, "a/../../escape", None, b"x")
                .bytes(),
            "'..'",
        ),
        (
            "absolute",
            Tar::new()
                .raw(EntryType::Regular, "/etc/escape", None, b"x")
                .bytes(),
            "absolute",
        ),
        (
            "through symlink",
            Tar::new()
                .link(EntryType::Symlink, "lnk", "/tmp")
                .raw(EntryType::Regular, "lnk/escape", None, b"x")
                .bytes(),
            "through the symlink",
        ),
        (
            "hardlink out",
            Tar::new()
                .raw(EntryType::Link, "h", Some("../../etc/passwd"), b"")
                .bytes(),
            "outside the layer",
        ),
        (
            "hardlink absolute",
            Tar::new()
                .raw(EntryType::Link, "h", Some("/etc/passwd"), b"")
                .bytes(),
            "outside the layer",
        ),
        (
            "hardlink via symlink",
            Tar::new()
                .link(EntryType::Symlink, "lnk", "/etc")
                .raw(EntryType::Link, "h", Some("lnk/passwd"), b"")
                .bytes(),
            "through the symlink",
        ),
        (
            "hardlink to lower layer",
            Tar::new()
                .raw(EntryType::Link, "h", Some("not/here"), b"")
                .bytes(),
            "not in this layer",
        ),
        (
            "whiteout dotdot",
            Tar::new()
                .raw(EntryType::Regular, "a/.wh...", None, b"")
                .bytes(),
            "invalid name",
        ),
    ];
    for (what, tar, needle) in cases {
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("layer");
        let err = unpack(&tar, &dest, true)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{what}: {err}");
        assert!(
            err.contains("test-layer"),
            "{what}: the layer is named: {err}"
        );
        // Nothing landed beside the layer directory.
        let beside: Vec<_> = fs::read_dir(outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, vec![std::ffi::OsString::from("layer")], "{what}");
    }
    assert!(!Path::new("/etc/escape").exists() && !Path::new("/tmp/escape").exists());
}

#[test]
fn a_decompression_bomb_stops_at_the_limit() {
    // 64 MiB of zeros compresses to ~64 KiB.
    let mut tar = Builder::new(Vec::new());
    let zeros = vec![0u8; 64 << 20];
    let mut h = Tar::header(EntryType::Regular, 0o644, zeros.len() as u64);
    tar.append_data(&mut h, "bomb", &zeros[..]).unwrap();
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 1 << 20);

    let d = tempfile::tempdir().unwrap();
    let err = unpack_layer(
        &gz[..],
        &UnpackOptions {
            layer: "bomb-layer",
            compression: Compression::Gzip,
            dest: d.path(),
            has_parent: false,
            max_bytes: 20 * gz.len() as u64,
        },
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("--max-unpacked"), "{err}");
}

#[test]
fn gzip_and_zstd_streams_give_the_diff_id_of_the_tar() {
    let tar = Tar::new().file("a", 0o644, b"content").bytes();
    let want = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (compression, blob) in [(Compression::Gzip, gz), (Compression::Zstd, zst)] {
        let d = tempfile::tempdir().unwrap();
        let out = unpack_layer(
            &blob[..],
            &UnpackOptions {
                layer: "l",
                compression,
                dest: d.path(),
                has_parent: false,
                max_bytes: 1 << 20,
            },
        )
        .unwrap();
        assert_eq!(out.diff_id.to_string(), want, "{compression:?}");
        assert_eq!(fs::read(d.path().join("a")).unwrap(), b"content");
    }
}

#[test]
fn zero_runs_become_holes_and_read_back_identically() {
    let mut data = vec![0u8; 8 << 20];
    data[..5].copy_from_slice(b"start");
    let n = data.len();
    data[n - 3..].copy_from_slice(b"end");
    let tar = Tar::new().file("sparse", 0o644, &data).bytes();
    let d = tempfile::tempdir().unwrap();
    unpack(&tar, d.path(), false).unwrap();
    let path = d.path().join("sparse");
    assert_eq!(fs::read(&path).unwrap(), data);
    let m = fs::metadata(&path).unwrap();
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated for 8 MiB of mostly zeros",
        m.blocks() * 512
    );
}

#[test]
fn implicit_parents_inherit_metadata_from_lower_layers_through_symlinks() {
    let lower = tempfile::tempdir().unwrap();
    let tar = Tar::new()
        .dir("usr/", 0o755)
        .dir("usr/lib/", 0o755)
        .owned_file("usr/lib/x", 0, 0, b"")
        .link(EntryType::Symlink, "lib", "usr/lib")
        .bytes();
    unpack(&tar, lower.path(), false).unwrap();
    rustix::fs::chmod(lower.path().join("usr/lib"), Mode::from_raw_mode(0o711)).unwrap();
    rustix::fs::chownat(
        CWD,
        lower.path().join("usr/lib"),
        Some(rustix::fs::Uid::from_raw(7)),
        Some(rustix::fs::Gid::from_raw(8)),
        AtFlags::empty(),
    )
    .unwrap();

    let upper = tempfile::tempdir().unwrap();
    let out = unpack(
        &Tar::new().file("lib/new", 0o644, b"n").bytes(),
        upper.path(),
        true,
    )
    .unwrap();
    assert_eq!(out.implicit_dirs, vec![PathBuf::from("lib")]);
    inherit_implicit_dirs(upper.path(), &out.implicit_dirs, &[lower.path()]).unwrap();
    let m = fs::metadata(upper.path().join("lib")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o711, 7, 8));
}

#[test]
fn resolve_in_root_never_leaves_the_root() {
    let root = tempfile::tempdir().unwrap();
    symlink("/../../etc", root.path().join("up")).unwrap();
    symlink("../../..", root.path().join("rel")).unwrap();
    assert_eq!(
        resolve_in_root(root.path(), Path::new("up/passwd")).unwrap(),
        root.path().join("etc/passwd")
    );
    assert_eq!(
        resolve_in_root(root.path(), Path::new("rel/x")).unwrap(),
        root.path().join("x")
    );
    symlink("loop", root.path().join("loop")).unwrap();
    assert!(resolve_in_root(root.path(), Path::new("loop/x")).is_err());
}
