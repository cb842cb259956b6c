//! Extraction tests on hand-made tars. They need root (ownership, device
//! nodes, `trusted.*` xattrs), as the builder itself does.

use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::rc::Rc;

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
    /// A PAX extended header of `records`, for the next entry.
    fn pax(mut self, records: &[(&str, &str)]) -> Tar {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        self
    }
    /// A regular file whose GNU header `edit` adjusts.
    fn file_with(mut self, name: &str, data: &[u8], edit: impl FnOnce(&mut Header)) -> Tar {
        let mut h = Tar::header(EntryType::Regular, 0o644, data.len() as u64);
        edit(&mut h);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }
    /// An entry of type `kind` named `name` with `data`, header and all as given.
    fn special(mut self, kind: EntryType, name: &str, data: &[u8]) -> Tar {
        let mut h = Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    /// A regular file in a star header (ustar magic, `tar\0` trailer),
    /// which carries an access time.
    fn star_file(mut self, name: &str, atime: u64) -> Tar {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(1);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_path(name).unwrap();
        let b = h.as_mut_bytes();
        b[476..487].copy_from_slice(format!("{atime:011o}").as_bytes());
        b[508..512].copy_from_slice(b"tar\0");
        h.set_cksum();
        self.0.append(&h, &b"s"[..]).unwrap();
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
    /// A GNU PAX sparse entry: `records` in its PAX header, then a regular
    /// file header named `header_name` (GNU tar's placeholder) holding `data`.
    fn pax_sparse(mut self, records: &[(&str, &str)], header_name: &str, data: &[u8]) -> Tar {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, v.as_bytes())))
            .unwrap();
        // A ustar header, as `tar --format=pax` writes (GNU tar itself
        // fails on PAX sparse records behind a GNU-format header).
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        self.0.append_data(&mut h, header_name, data).unwrap();
        self
    }
    /// A well-formed PAX 1.0 sparse file, as `tar --sparse --sparse-version=1.0`
    /// writes it, with GNU tar's closing empty chunk at `size`.
    fn sparse_1_0(self, name: &str, size: u64, chunks: &[(u64, &[u8])]) -> Tar {
        let mut map: Vec<(u64, u64)> = chunks.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
        map.push((size, 0));
        let datas: Vec<&[u8]> = chunks.iter().map(|(_, d)| *d).collect();
        let size = size.to_string();
        self.pax_sparse(
            &[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "0"),
                ("GNU.sparse.name", name),
                ("GNU.sparse.realsize", &size),
            ],
            "GNUSparseFile.0/placeholder",
            &sparse_1_0_data(&map, &datas),
        )
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// The data of a PAX 1.0 sparse entry: the map (the chunk count, then offset
/// and length of each chunk, each number ended by a newline, NUL-padded to a
/// 512-byte block), then the chunks' bytes.
fn sparse_1_0_data(map: &[(u64, u64)], chunks: &[&[u8]]) -> Vec<u8> {
    let mut data = format!("{}\n", map.len()).into_bytes();
    for (offset, length) in map {
        data.extend_from_slice(format!("{offset}\n{length}\n").as_bytes());
    }
    data.resize(data.len().div_ceil(512) * 512, 0);
    for c in chunks {
        data.extend_from_slice(c);
    }
    data
}

/// The three data regions of the 64 MiB sparse file of the tests: one at
/// the start, one at an offset on no block boundary, one in the last quarter
/// (the file ends with a hole). All but the last are whole 512-byte blocks
/// long, as GNU tar writes them: GNU tar pads each chunk's data to a block,
/// Go's reader (containerd's) and this one take the chunks as concatenated;
/// they agree only on such maps.
fn sparse_chunks() -> Vec<(u64, Vec<u8>)> {
    let pattern = |len: usize, seed: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    };
    vec![
        (0, pattern(20 * 512, 1)),
        ((20 << 20) + 123, pattern(137 * 512, 2)),
        (48 << 20, pattern(4000, 3)),
    ]
}

/// The 64 MiB file `sparse_chunks` describes, dense.
fn sparse_expected() -> Vec<u8> {
    let mut want = vec![0u8; 64 << 20];
    for (offset, data) in sparse_chunks() {
        want[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    want
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
            total: None,
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
            total: None,
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
                total: None,
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

#[test]
fn pax_sparse_1_0_expands_to_the_full_file_with_holes() {
    let chunks = sparse_chunks();
    let refs: Vec<(u64, &[u8])> = chunks.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    let tar = Tar::new()
        .file("before", 0o644, b"before")
        .sparse_1_0("var/big.img", 64 << 20, &refs)
        // Entries after it still line up: the map and its padding were consumed.
        .file("after", 0o644, b"after")
        .bytes();
    assert!(
        tar.len() < 1 << 20,
        "the layer stores only the data regions"
    );
    let d = tempfile::tempdir().unwrap();
    let out = unpack(&tar, d.path(), false).unwrap();

    let path = d.path().join("var/big.img");
    let m = fs::symlink_metadata(&path).unwrap();
    assert!(m.file_type().is_file());
    assert_eq!(m.len(), 64 << 20, "apparent size is GNU.sparse.realsize");
    assert_eq!(
        hex::encode(Sha256::digest(fs::read(&path).unwrap())),
        hex::encode(Sha256::digest(sparse_expected())),
        "content: the chunks at their offsets, zeros elsewhere"
    );
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes allocated for a 64 MiB file with 84 KB of data",
        m.blocks() * 512
    );
    assert_eq!((m.mode() & 0o7777, m.mtime()), (0o644, 1_700_000_000));
    assert!(
        !d.path().join("GNUSparseFile.0").exists(),
        "the placeholder header name is not used"
    );
    assert_eq!(fs::read(d.path().join("before")).unwrap(), b"before");
    assert_eq!(fs::read(d.path().join("after")).unwrap(), b"after");

    // The diff ID still covers the raw stream: map, chunks and all.
    assert_eq!(
        out.diff_id.to_string(),
        format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
    );
    assert_eq!(out.tar_bytes, tar.len() as u64);
    assert_eq!(out.file_bytes, 6 + (64 << 20) + 5);
}

#[test]
fn pax_sparse_0_1_and_0_0_give_the_same_file_as_1_0() {
    let chunks = sparse_chunks();
    let data: Vec<u8> = chunks.iter().flat_map(|(_, d)| d.clone()).collect();
    let size = (64u64 << 20).to_string();
    let numblocks = chunks.len().to_string();
    // 0.1: one GNU.sparse.map record, and a placeholder header name.
    let map = chunks
        .iter()
        .map(|(o, d)| format!("{o},{}", d.len()))
        .collect::<Vec<_>>()
        .join(",");
    let v01 = Tar::new()
        .pax_sparse(
            &[
                ("GNU.sparse.size", &size),
                ("GNU.sparse.numblocks", &numblocks),
                ("GNU.sparse.name", "big.img"),
                ("GNU.sparse.map", &map),
            ],
            "GNUSparseFile.7/big.img",
            &data,
        )
        .bytes();
    // 0.0: offset/numbytes record pairs, and the real header name.
    let pairs: Vec<(String, String)> = chunks
        .iter()
        .map(|(o, d)| (o.to_string(), d.len().to_string()))
        .collect();
    let mut records = vec![
        ("GNU.sparse.size", size.as_str()),
        ("GNU.sparse.numblocks", numblocks.as_str()),
    ];
    for (o, n) in &pairs {
        records.push(("GNU.sparse.offset", o));
        records.push(("GNU.sparse.numbytes", n));
    }
    let v00 = Tar::new().pax_sparse(&records, "big.img", &data).bytes();

    let want = hex::encode(Sha256::digest(sparse_expected()));
    for (version, tar) in [("0.1", v01), ("0.0", v00)] {
        let d = tempfile::tempdir().unwrap();
        unpack(&tar, d.path(), false).unwrap();
        let path = d.path().join("big.img");
        let m = fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 64 << 20, "{version}");
        assert_eq!(
            hex::encode(Sha256::digest(fs::read(&path).unwrap())),
            want,
            "{version}"
        );
        assert!(m.blocks() * 512 < 1 << 20, "{version}: holes");
        assert!(!d.path().join("GNUSparseFile.7").exists(), "{version}");
    }
}

#[test]
fn hostile_sparse_maps_are_refused_with_the_layer_and_entry_named() {
    let v1 = |realsize: &str, data: Vec<u8>| {
        Tar::new()
            .pax_sparse(
                &[
                    ("GNU.sparse.major", "1"),
                    ("GNU.sparse.minor", "0"),
                    ("GNU.sparse.name", "victim"),
                    ("GNU.sparse.realsize", realsize),
                ],
                "GNUSparseFile.0/victim",
                &data,
            )
            .bytes()
    };
    let map = |map: &[(u64, u64)], data: &[u8]| sparse_1_0_data(map, &[data]);
    let raw_map = |text: &str, data: &[u8]| {
        let mut v = text.as_bytes().to_vec();
        v.resize(v.len().div_ceil(512) * 512, 0);
        v.extend_from_slice(data);
        v
    };
    // 1.4 MB of map text: 200,000 "1000\n1\n" pairs.
    let long_map = format!("200000\n{}", "1000\n1\n".repeat(200_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "chunk past the size",
            v1("1000", map(&[(900, 200)], &[7; 200])),
            "ends past the file's size of 1000 bytes",
        ),
        (
            "offset overflows",
            v1("1000", raw_map("1\n99999999999999999999\n1\n", b"x")),
            "overflows",
        ),
        (
            "offset beyond i64",
            v1("1000", raw_map("1\n9223372036854775808\n1\n", b"x")),
            "overflows",
        ),
        (
            "chunks out of order",
            v1("1000", map(&[(100, 10), (50, 10)], &[7; 20])),
            "in order",
        ),
        (
            "chunks overlap",
            v1("1000", map(&[(0, 100), (50, 10)], &[7; 110])),
            "in order",
        ),
        (
            "chunk data longer than the entry",
            v1("100000", map(&[(0, 50_000)], &[7; 100])),
            "lists 50000 bytes of data but the entry stores 100",
        ),
        (
            "entry data beyond the chunks",
            v1("1000", map(&[(0, 10)], &[7; 600])),
            "lists 10 bytes of data but the entry stores 600",
        ),
        (
            "huge chunk count",
            v1("1000", raw_map("1000000000\n", b"")),
            "declares 1000000000 chunks",
        ),
        (
            "map longer than the entry",
            // 128 chunks announced, 127 in the entry's only block.
            v1(
                "1000",
                raw_map(&format!("128\n{}", "0\n0\n".repeat(127)), b""),
            ),
            "runs past the entry's 512 bytes",
        ),
        (
            "map longer than the limit",
            v1("1000", raw_map(&long_map, b"")),
            "longer than the limit of 1048576 bytes",
        ),
        (
            "malformed map",
            v1("1000", raw_map("1\n0x10\n1\n", b"x")),
            "malformed",
        ),
        (
            "negative offset",
            v1("1000", raw_map("1\n-5\n1\n", b"x")),
            "malformed",
        ),
        (
            "bad realsize",
            v1("-1", map(&[], b"")),
            "bad GNU.sparse.realsize",
        ),
        (
            "no realsize",
            Tar::new()
                .pax_sparse(
                    &[
                        ("GNU.sparse.major", "1"),
                        ("GNU.sparse.minor", "0"),
                        ("GNU.sparse.name", "victim"),
                    ],
                    "GNUSparseFile.0/victim",
                    &map(&[], b""),
                )
                .bytes(),
            "without GNU.sparse.realsize",
        ),
        (
            "unknown version",
            Tar::new()
                .pax_sparse(
                    &[
                        ("GNU.sparse.major", "2"),
                        ("GNU.sparse.minor", "0"),
                        ("GNU.sparse.name", "victim"),
                        ("GNU.sparse.realsize", "10"),
                    ],
                    "GNUSparseFile.0/victim",
                    &map(&[], b""),
                )
                .bytes(),
            "version 2.0, which is not supported",
        ),
        (
            "0.1 count mismatch",
            Tar::new()
                .pax_sparse(
                    &[
                        ("GNU.sparse.size", "1000"),
                        ("GNU.sparse.numblocks", "2"),
                        ("GNU.sparse.name", "victim"),
                        ("GNU.sparse.map", "0,1"),
                    ],
                    "GNUSparseFile.0/victim",
                    b"x",
                )
                .bytes(),
            "holds 2 numbers where GNU.sparse.numblocks=2 needs 4",
        ),
        (
            "0.0 pairs out of order",
            Tar::new()
                .pax_sparse(
                    &[
                        ("GNU.sparse.size", "1000"),
                        ("GNU.sparse.numblocks", "1"),
                        ("GNU.sparse.numbytes", "1"),
                        ("GNU.sparse.offset", "0"),
                    ],
                    "victim",
                    b"x",
                )
                .bytes(),
            "do not alternate",
        ),
    ];
    for (what, tar, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        let err = unpack(&tar, d.path(), false)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{what}: {err}");
        assert!(
            err.contains("layer test-layer: entry \"victim\""),
            "{what}: the layer and the entry are named: {err}"
        );
        assert!(
            !d.path().join("victim").exists(),
            "{what}: nothing is written"
        );
    }
}

#[test]
fn sparse_names_are_checked_like_any_entry_name() {
    let cases: Vec<(&str, Tar, &str)> = vec![
        ("dotdot", Tar::new(), "../escape"),
        ("nested dotdot", Tar::new(), "a/../../escape"),
        ("absolute", Tar::new(), "/tmp/escape"),
        (
            "through symlink",
            Tar::new().link(EntryType::Symlink, "lnk", "/tmp"),
            "lnk/escape",
        ),
    ];
    let needles = ["'..'", "'..'", "absolute", "through the symlink"];
    for ((what, tar, name), needle) in cases.into_iter().zip(needles) {
        // The placeholder header name is harmless: only GNU.sparse.name escapes.
        let tar = tar.sparse_1_0(name, 8192, &[(0, b"x")]).bytes();
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("layer");
        let err = unpack(&tar, &dest, false)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{what}: {err}");
        assert!(
            err.contains(&format!("layer test-layer: entry {name:?}")),
            "{what}: {err}"
        );
        let beside: Vec<_> = fs::read_dir(outer.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, vec![std::ffi::OsString::from("layer")], "{what}");
        assert!(
            !dest.join("GNUSparseFile.0").exists(),
            "{what}: nor under the placeholder"
        );
    }
    assert!(!Path::new("/tmp/escape").exists());
}

#[test]
fn sparse_apparent_sizes_are_bounded_by_max_bytes() {
    let opts = |dest| UnpackOptions {
        layer: "sparse-layer",
        compression: Compression::None,
        dest,
        has_parent: false,
        max_bytes: 1 << 30,
        total: None,
    };
    // One file at the limit is fine; a second takes the layer past it.
    let d = tempfile::tempdir().unwrap();
    let one = Tar::new().sparse_1_0("a", 1 << 30, &[]).bytes();
    unpack_layer(&one[..], &opts(d.path())).unwrap();
    assert_eq!(fs::metadata(d.path().join("a")).unwrap().len(), 1 << 30);

    let d = tempfile::tempdir().unwrap();
    let two = Tar::new()
        .sparse_1_0("a", 600 << 20, &[])
        .sparse_1_0("b", 600 << 20, &[])
        .bytes();
    let err = unpack_layer(&two[..], &opts(d.path())).unwrap_err();
    assert!(
        matches!(&err, UnpackError::SparseTooLarge { entry, .. } if entry == "b"),
        "{err}"
    );
    assert!(err.to_string().contains("sparse-layer"), "{err}");
    assert!(err.to_string().contains("--max-unpacked"), "{err}");
    assert!(!d.path().join("b").exists());

    let d = tempfile::tempdir().unwrap();
    let huge = Tar::new().sparse_1_0("h", i64::MAX as u64, &[]).bytes();
    let err = unpack_layer(&huge[..], &opts(d.path())).unwrap_err();
    assert!(matches!(err, UnpackError::SparseTooLarge { .. }), "{err}");
}

#[test]
fn the_stream_limit_applies_inside_a_sparse_map() {
    // A map of some 500 KB in a layer allowed 256 KiB of stream.
    let mut text = String::from("60000\n");
    for i in 0..60_000u64 {
        text.push_str(&format!("{}\n1\n", i * 2));
    }
    let mut data = text.into_bytes();
    data.resize(data.len().div_ceil(512) * 512, 0);
    assert!(data.len() > 400 << 10);
    data.extend(std::iter::repeat_n(7u8, 60_000));
    let tar = Tar::new()
        .pax_sparse(
            &[
                ("GNU.sparse.major", "1"),
                ("GNU.sparse.minor", "0"),
                ("GNU.sparse.name", "f"),
                ("GNU.sparse.realsize", "120000"),
            ],
            "GNUSparseFile.0/f",
            &data,
        )
        .bytes();
    let d = tempfile::tempdir().unwrap();
    let err = unpack_layer(
        &tar[..],
        &UnpackOptions {
            layer: "l",
            compression: Compression::None,
            dest: d.path(),
            has_parent: false,
            max_bytes: 256 << 10,
            total: None,
        },
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");

    // With room, the same layer extracts: 60,000 one-byte chunks.
    let d = tempfile::tempdir().unwrap();
    unpack(&tar, d.path(), false).unwrap();
    let got = fs::read(d.path().join("f")).unwrap();
    assert_eq!(got.len(), 120_000);
    assert!(got.chunks(2).all(|p| p == [7, 0]));
}

/// PAX data of exactly `len` bytes: one `comment` record.
fn pax_comment(len: usize) -> Vec<u8> {
    // "<len> comment=<value>\n", the length counting its own digits.
    let digits = len.to_string().len();
    let value = "c".repeat(len - digits - " comment=\n".len());
    let record = format!("{len} comment={value}\n").into_bytes();
    assert_eq!(record.len(), len);
    record
}

#[test]
fn extension_entries_larger_than_1_mib_are_refused_with_the_layer_named() {
    const MIB: usize = 1 << 20;
    let long = "n".repeat(MIB);
    /// What the layer is, then the entry, kind and size refused.
    type Case = (
        &'static str,
        Vec<u8>,
        Option<&'static str>,
        &'static str,
        u64,
    );
    let cases: Vec<Case> = vec![
        (
            "PAX header",
            Tar::new()
                .special(EntryType::XHeader, "", &pax_comment(MIB + 1))
                .file("f", 0o644, b"f")
                .bytes(),
            None,
            "PAX extended header",
            MIB as u64 + 1,
        ),
        (
            "named PAX header",
            Tar::new()
                .special(EntryType::XHeader, "PaxHeaders.0/f", &pax_comment(2 * MIB))
                .file("f", 0o644, b"f")
                .bytes(),
            Some("PaxHeaders.0/f"),
            "PAX extended header",
            2 * MIB as u64,
        ),
        (
            "PAX global header",
            Tar::new()
                .special(
                    EntryType::XGlobalHeader,
                    "pax_global_header",
                    &pax_comment(MIB + 512),
                )
                .file("f", 0o644, b"f")
                .bytes(),
            Some("pax_global_header"),
            "PAX global extended header",
            MIB as u64 + 512,
        ),
        (
            // The builder writes the name and a NUL: 1 MiB + 1 bytes.
            "GNU long name",
            Tar::new().file(&long, 0o644, b"f").bytes(),
            Some("././@LongLink"),
            "GNU long name entry",
            MIB as u64 + 1,
        ),
        (
            "GNU long link name",
            Tar::new().link(EntryType::Symlink, "l", &long).bytes(),
            Some("././@LongLink"),
            "GNU long link name entry",
            MIB as u64 + 1,
        ),
        (
            // After other entries, and after a PAX header within the limit.
            "later in the layer",
            Tar::new()
                .file("a", 0o644, &[7; 1000])
                .pax(&[("mtime", "1700000000.5")])
                .file(&long, 0o644, b"f")
                .bytes(),
            Some("././@LongLink"),
            "GNU long name entry",
            MIB as u64 + 1,
        ),
    ];
    for (what, tar, entry_name, kind_name, size_of) in cases {
        let d = tempfile::tempdir().unwrap();
        let err = unpack(&tar, d.path(), false).unwrap_err();
        match &err {
            UnpackError::HeaderTooLarge {
                layer,
                entry,
                kind,
                size,
                limit,
                ..
            } => {
                assert_eq!(layer, "test-layer", "{what}");
                assert_eq!(entry.as_deref(), entry_name, "{what}");
                assert_eq!(*kind, kind_name, "{what}");
                assert_eq!((*size, *limit), (size_of, MIB as u64), "{what}");
            }
            other => panic!("{what}: {other}"),
        }
        let text = err.to_string();
        assert!(text.starts_with("layer test-layer: "), "{what}: {text}");
        assert!(text.contains("limit of 1048576 bytes"), "{what}: {text}");
        if let Some(name) = entry_name {
            assert!(text.contains(&format!("entry {name:?}")), "{what}: {text}");
        }
        assert!(!d.path().join("f").exists(), "{what}");
    }
}

#[test]
fn extension_entries_of_1_mib_are_accepted() {
    const MIB: usize = 1 << 20;
    // The name and its NUL: exactly 1 MiB.
    let long = format!("dir/{}", "n".repeat(200));
    let long = format!("{long}/{}", "x".repeat(MIB - 1 - long.len() - 1));
    assert_eq!(long.len() + 1, MIB);
    let tar = Tar::new()
        .special(
            EntryType::XGlobalHeader,
            "pax_global_header",
            &pax_comment(MIB),
        )
        .special(EntryType::XHeader, "PaxHeaders.0/f", &pax_comment(MIB))
        .file("f", 0o644, b"f")
        .file(&long, 0o644, b"long")
        .file("g", 0o644, b"g")
        .bytes();
    let d = tempfile::tempdir().unwrap();
    // The long name is too long for the filesystem, but it was read whole.
    let err = unpack(&tar, d.path(), false).unwrap_err();
    assert!(matches!(err, UnpackError::Write { .. }), "{err}");
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"f");

    let tar = Tar::new()
        .special(EntryType::XHeader, "PaxHeaders.0/f", &pax_comment(MIB))
        .file("f", 0o644, b"f")
        .file("g", 0o644, b"g")
        .bytes();
    let d = tempfile::tempdir().unwrap();
    let out = unpack(&tar, d.path(), false).unwrap();
    assert_eq!(fs::read(d.path().join("g")).unwrap(), b"g");
    assert_eq!(out.tar_bytes, tar.len() as u64);
}

#[test]
fn an_oversized_extension_entry_is_refused_before_its_data_is_read() {
    /// A PAX header announcing 8 GiB of records, then endless bytes; counts
    /// what it hands out.
    struct Endless {
        header: Vec<u8>,
        given: Rc<Cell<u64>>,
    }
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let at = self.given.get() as usize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.header.get(at + i).copied().unwrap_or(b'a');
            }
            self.given.set((at + buf.len()) as u64);
            Ok(buf.len())
        }
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_size(8 << 30);
    h.set_cksum();
    let given = Rc::new(Cell::new(0));
    let d = tempfile::tempdir().unwrap();
    let err = unpack_layer(
        Endless {
            header: h.as_bytes().to_vec(),
            given: given.clone(),
        },
        &UnpackOptions {
            layer: "endless-layer",
            compression: Compression::None,
            dest: d.path(),
            has_parent: false,
            max_bytes: 64 << 20,
            total: None,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, UnpackError::HeaderTooLarge { size, .. } if *size == 8 << 30),
        "{err}"
    );
    assert!(err.to_string().contains("endless-layer"), "{err}");
    assert!(
        given.get() <= 64 << 10,
        "{} bytes read before refusing",
        given.get()
    );
}

/// (atime, mtime) of `path` itself, to the nanosecond.
fn times_of(path: &Path) -> ((i64, i64), (i64, i64)) {
    let m = fs::symlink_metadata(path).unwrap();
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

#[test]
fn times_keep_pax_nanoseconds_and_atime_is_the_later_of_atime_and_mtime() {
    let tar = Tar::new()
        .pax(&[("mtime", "1700000000.5")])
        .file("half", 0o644, b"h")
        .pax(&[("mtime", "1700000000.25"), ("atime", "1800000000.75")])
        .file("later-atime", 0o644, b"l")
        .pax(&[("atime", "1600000000.9"), ("mtime", "1700000000.125")])
        .file("earlier-atime", 0o644, b"e")
        // Digits past the ninth are cut, not rounded.
        .pax(&[("mtime", "1700000000.1234567899")])
        .file("many-digits", 0o644, b"m")
        .pax(&[("mtime", "1700000000.")])
        .file("bare-point", 0o644, b"b")
        // The last record wins; an empty one keeps the header's time.
        .pax(&[("mtime", "5.5"), ("mtime", "1700000001.000000001")])
        .file("last-wins", 0o644, b"w")
        .pax(&[("mtime", "")])
        .file("empty", 0o644, b"e")
        // Before the epoch, or past what int64 nanoseconds hold: the epoch.
        .pax(&[("mtime", "-1.5")])
        .file("negative", 0o644, b"n")
        .pax(&[("mtime", "9223372036.854775808")])
        .file("too-late", 0o644, b"t")
        .pax(&[("mtime", "9223372036.854775807")])
        .file("latest", 0o644, b"t")
        .pax(&[("mtime", "1700000000.5"), ("atime", "9999999999")])
        .file("atime-too-late", 0o644, b"t")
        // A GNU header's own atime field counts too.
        .file_with("gnu-atime", b"g", |h| {
            h.as_gnu_mut().unwrap().set_atime(1_750_000_000);
            h.set_cksum();
        })
        .file_with("gnu-early-atime", b"g", |h| {
            h.as_gnu_mut().unwrap().set_atime(1_600_000_000);
            h.set_cksum();
        })
        // A PAX atime overrides it.
        .pax(&[("atime", "1760000000.5")])
        .file_with("pax-over-gnu", b"g", |h| {
            h.as_gnu_mut().unwrap().set_atime(1_750_000_000);
            h.set_cksum();
        })
        // And a star header's.
        .star_file("star-atime", 1_750_000_000)
        .pax(&[("mtime", "1700000000.75"), ("atime", "1710000000.5")])
        .dir("dir/", 0o755)
        .file("dir/inner", 0o644, b"i")
        .pax(&[("mtime", "1700000000.375"), ("atime", "1720000000.125")])
        .link(EntryType::Symlink, "dir/link", "inner")
        .pax(&[("mtime", "1700000002.5")])
        .link(EntryType::Link, "hard", "half")
        .bytes();
    let d = tempfile::tempdir().unwrap();
    unpack(&tar, d.path(), false).unwrap();
    let t = |name: &str| times_of(&d.path().join(name));
    let header = (1_700_000_000, 0);
    let epoch = (0, 0);

    // The hardlink's header set the shared inode's times last.
    assert_eq!(
        t("hard"),
        ((1_700_000_002, 500_000_000), (1_700_000_002, 500_000_000))
    );
    assert_eq!(t("half"), t("hard"));
    let l = ((1_800_000_000, 750_000_000), (1_700_000_000, 250_000_000));
    assert_eq!(t("later-atime"), l);
    let e = (1_700_000_000, 125_000_000);
    assert_eq!(t("earlier-atime"), (e, e));
    let m = (1_700_000_000, 123_456_789);
    assert_eq!(t("many-digits"), (m, m));
    assert_eq!(t("bare-point"), (header, header));
    let w = (1_700_000_001, 1);
    assert_eq!(t("last-wins"), (w, w));
    assert_eq!(t("empty"), (header, header));
    assert_eq!(t("negative"), (epoch, epoch));
    assert_eq!(t("too-late"), (epoch, epoch));
    let latest = (9_223_372_036, 854_775_807);
    assert_eq!(t("latest"), (latest, latest));
    assert_eq!(t("atime-too-late"), (epoch, (1_700_000_000, 500_000_000)));
    assert_eq!(t("gnu-atime"), ((1_750_000_000, 0), header));
    assert_eq!(t("gnu-early-atime"), (header, header));
    assert_eq!(t("pax-over-gnu"), ((1_760_000_000, 500_000_000), header));
    assert_eq!(t("star-atime"), ((1_750_000_000, 0), header));
    assert_eq!(
        t("dir"),
        ((1_710_000_000, 500_000_000), (1_700_000_000, 750_000_000)),
        "a directory's times, set last"
    );
    assert_eq!(
        t("dir/link"),
        ((1_720_000_000, 125_000_000), (1_700_000_000, 375_000_000)),
        "a symlink's own times"
    );
    assert_eq!(
        t("dir/inner"),
        (header, header),
        "not the symlink's target's"
    );
}

#[test]
fn implicit_parents_inherit_times_to_the_nanosecond() {
    let lower = tempfile::tempdir().unwrap();
    let tar = Tar::new()
        .pax(&[("mtime", "1700000000.5"), ("atime", "1710000000.25")])
        .dir("lib/", 0o755)
        .bytes();
    unpack(&tar, lower.path(), false).unwrap();
    let upper = tempfile::tempdir().unwrap();
    let out = unpack(
        &Tar::new().file("lib/new", 0o644, b"n").bytes(),
        upper.path(),
        true,
    )
    .unwrap();
    inherit_implicit_dirs(upper.path(), &out.implicit_dirs, &[lower.path()]).unwrap();
    assert_eq!(
        times_of(&upper.path().join("lib")),
        times_of(&lower.path().join("lib"))
    );
    assert_eq!(
        times_of(&upper.path().join("lib")).1,
        (1_700_000_000, 500_000_000)
    );
}

#[test]
fn bad_owner_ids_and_pax_values_are_refused_with_the_layer_and_entry_named() {
    let pax_file =
        |records: &[(&str, &str)]| Tar::new().pax(records).file("victim", 0o644, b"v").bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "uid past 32 bits",
            pax_file(&[("uid", "4294967296")]),
            "uid 4294967296 (from its PAX header)",
        ),
        (
            "gid past 32 bits",
            pax_file(&[("gid", "4294967296")]),
            "gid 4294967296 (from its PAX header)",
        ),
        (
            "uid far past 32 bits",
            pax_file(&[("uid", "9223372036854775807")]),
            "uid 9223372036854775807",
        ),
        ("negative uid", pax_file(&[("uid", "-1")]), "uid -1"),
        ("negative gid", pax_file(&[("gid", "-5")]), "gid -5"),
        (
            "(uid_t)-1",
            pax_file(&[("uid", "4294967295")]),
            "uid 4294967295",
        ),
        (
            "header uid past 32 bits",
            Tar::new()
                .file_with("victim", b"v", |h| {
                    h.set_uid(1 << 32);
                    h.set_cksum();
                })
                .bytes(),
            "uid 4294967296 (from its header)",
        ),
        (
            "header gid past 32 bits",
            Tar::new()
                .file_with("victim", b"v", |h| {
                    h.set_gid((1 << 32) + 1000);
                    h.set_cksum();
                })
                .bytes(),
            "gid 4294968296 (from its header)",
        ),
        (
            "fractional uid",
            pax_file(&[("uid", "1000.5")]),
            "bad PAX uid \"1000.5\"",
        ),
        (
            "uid beyond int64",
            pax_file(&[("uid", "9223372036854775808")]),
            "bad PAX uid",
        ),
        (
            "conflicting uid records",
            pax_file(&[("uid", "5"), ("uid", "")]),
            "conflicting PAX uid records",
        ),
        (
            "bad mtime",
            pax_file(&[("mtime", "1700000000.5x")]),
            "bad PAX mtime",
        ),
        (
            "two points",
            pax_file(&[("mtime", "1.2.3")]),
            "bad PAX mtime",
        ),
        ("no seconds", pax_file(&[("mtime", ".5")]), "bad PAX mtime"),
        ("bad atime", pax_file(&[("atime", "soon")]), "bad PAX atime"),
        ("bad ctime", pax_file(&[("ctime", "1e9")]), "bad PAX ctime"),
    ];
    for (what, tar, needle) in cases {
        let d = tempfile::tempdir().unwrap();
        let err = unpack(&tar, d.path(), false)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{what}: {err}");
        assert!(
            err.contains("layer test-layer: entry \"victim\""),
            "{what}: the layer and the entry are named: {err}"
        );
        assert!(
            !d.path().join("victim").exists(),
            "{what}: nothing is written"
        );
    }
}

#[test]
fn owner_ids_up_to_4294967294_are_kept_and_empty_pax_ids_keep_the_header() {
    let tar = Tar::new()
        .pax(&[("uid", "4294967294"), ("gid", "+70000")])
        .file("big", 0o644, b"b")
        .pax(&[("uid", ""), ("gid", "")])
        .owned_file("empty", 1000, 1001, b"e")
        .pax(&[("uid", "7"), ("uid", "8")])
        .owned_file("last", 1000, 1001, b"l")
        .bytes();
    let d = tempfile::tempdir().unwrap();
    unpack(&tar, d.path(), false).unwrap();
    let owner = |name: &str| {
        let m = fs::symlink_metadata(d.path().join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("big"), (4_294_967_294, 70_000));
    assert_eq!(owner("empty"), (1000, 1001));
    assert_eq!(owner("last"), (8, 1001));
}

#[test]
fn pax_times_and_numeric_fields_parse_as_go_reads_them() {
    let t = |v: &str| parse_pax_time(v.as_bytes()).map(|t| (t.sec, t.nsec));
    assert_eq!(
        t("1700000000.123456789"),
        Some((1_700_000_000, 123_456_789))
    );
    assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
    assert_eq!(
        t("1.1234567899"),
        Some((1, 123_456_789)),
        "cut, not rounded"
    );
    assert_eq!(t("0.000000001"), Some((0, 1)));
    assert_eq!(t("1."), Some((1, 0)));
    assert_eq!(t("+5.25"), Some((5, 250_000_000)));
    assert_eq!(t("-1"), Some((-1, 0)));
    assert_eq!(t("-1.5"), Some((-2, 500_000_000)), "1.5 s before the epoch");
    assert_eq!(t("-0.25"), Some((-1, 750_000_000)));
    assert_eq!(t("-9223372036854775808"), Some((i64::MIN, 0)));
    for bad in [
        "",
        ".5",
        "1.2.3",
        "1.-5",
        "1.+5",
        "1.5x",
        "1e9",
        " 1",
        "1 ",
        "--1",
        "+-1",
        "-",
        "9223372036854775808",
        "0x10",
    ] {
        assert_eq!(t(bad), None, "{bad:?}");
    }

    let n = |b: &[u8]| parse_numeric(b);
    assert_eq!(n(b"0001234\0"), Some(0o1234));
    assert_eq!(n(b"  17 \0\0"), Some(0o17));
    assert_eq!(n(&[0; 12]), Some(0));
    assert_eq!(n(b"        "), Some(0));
    assert_eq!(n(b"8\0"), None);
    assert_eq!(n(b"1 2\0"), None);
    assert_eq!(n(b"+7\0"), None);
    assert_eq!(n(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), Some(1 << 32));
    assert_eq!(n(&[0xff; 12]), Some(-1), "base-256 two's complement");
    assert_eq!(
        n(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]),
        Some(-2)
    );
    assert_eq!(
        n(&[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        None,
        "overflow"
    );
}
