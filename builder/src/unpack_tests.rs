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
