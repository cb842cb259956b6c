//! Filesystem images: turns the staging directory of a seed volume (`.coral/`
//! with its blobs and its overlayfs-form layer trees) into an ext4 or xfs
//! filesystem, in an image file or directly on a block device, and mounts
//! such images read-only for `inspect` and `verify`.
//!
//! ext4 images are deterministic: the same tree (names, contents, owners,
//! modes, mtimes, xattrs) gives the same image bytes, however and whenever it
//! was staged. e2fsprogs 1.47.0 gets most of the way; the rest is done here:
//! - `mke2fs -d` fills the filesystem from the tree, entries sorted by name
//!   (`scandir` + `alphasort`, hence `LC_ALL=C`), with a fixed UUID, hash
//!   seed, root owner, journal size and inode count, `E2FSPROGS_FAKE_TIME`
//!   for every time it sets itself, eager inode-table and journal zeroing,
//!   no discard, and our own `mke2fs.conf` so the host's cannot change the
//!   features. The staging root's own owner, mode and times are not copied
//!   (the root is 0:0, 0755, `epoch`); sub-second mtimes, which it drops, are
//!   put back by the debugfs pass below.
//! - What it copies but should not: each inode's ctime and atime (they
//!   differ between two stagings of the same tree), and the order of an
//!   inode's in-inode xattrs (the order the staging filesystem lists them
//!   in). One `debugfs -w` pass sets atime, ctime and crtime (and their
//!   nanosecond fields) of every used inode to `epoch`, and rewrites the
//!   xattrs of every inode that has two or more in name order.
//! - `e2fsck -fyD` then checks the result and indexes large directories
//!   (`mke2fs -d` leaves them linear), with `E2FSCK_TIME` fixed.
//!
//! xfs images are not deterministic: `mkfs.xfs`, a loop mount, `cp -a`.
//!
//! This module never leaves a half-written image at the output path (it
//! writes a temporary sibling and renames it; a block device is written in
//! place), never leaves a mount or a loop device behind, and never deletes
//! anything below a mount point. It runs external tools with a cleared
//! environment. It is blocking code and needs root: run it off the async
//! runtime.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::ext4bulk::{self, Swapped};

/// A label both filesystems accept (xfs labels hold at most 12 bytes).
pub const DEFAULT_LABEL: &str = "coral-seed";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The ext4 block size; also the unit in which [`measure_tree`] counts.
pub(crate) const BLOCK: u64 = 4096;
const EXT4_INODE_SIZE: u64 = 256;
/// xfs allocates 512-byte inodes on demand.
const XFS_INODE_SIZE: u64 = 512;
/// ext4's usual density, one inode per 16 KiB: after the node grows the
/// filesystem to its volume, the inode density is what the image had, and
/// containerd will unpack more layers into it.
const INODE_RATIO: u64 = 16 * KIB;
const EXT4_MIN_SIZE: u64 = 64 * MIB;
/// `mkfs.xfs` (xfsprogs 5.19 and later) refuses smaller filesystems.
const XFS_MIN_SIZE: u64 = 300 * MIB;
const HEADROOM_PERCENT: u64 = 10;
/// Superblock copies, bitmaps, group descriptors (and those reserved for
/// growth), root and lost+found: 1% of the content plus this.
const FIXED_METADATA: u64 = 4 * MIB;
/// ext4 keeps up to four extents in the inode, each at most 128 MiB; more
/// need extent-tree blocks holding 340 each.
const EXTENT_MAX: u64 = 128 * MIB;
const EXTENTS_IN_INODE: u64 = 4;
const EXTENTS_PER_BLOCK: u64 = 340;
/// Symlink targets shorter than this live in the inode.
const FAST_SYMLINK_MAX: u64 = 60;
/// Room for xattrs inside a 256-byte inode (256 - 128 - 32 extra - header
/// and end marker), a little under.
const XATTR_IN_INODE: u64 = 80;
/// debugfs reads its command file with `fgets` into a BUFSIZ (8192) buffer.
const DEBUGFS_MAX_LINE: usize = 8000;
/// Automatic sizing retries with 25% more when the estimate was too tight.
const AUTO_SIZE_ATTEMPTS: u32 = 3;
const TOOL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Our own mke2fs profile, so that `/etc/mke2fs.conf` on the build host
/// cannot change the features (and so the bytes). Debian's ext4 defaults,
/// no reserved blocks (the volume holds containerd's data only, and a
/// reserve would be room the size computation must skip).
const MKE2FS_CONF: &str = "\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 0

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tcoral = {
\t}
";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FsKind {
    #[default]
    Ext4,
    Xfs,
}

impl FsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
        }
    }

    /// Longest label the filesystem stores, in bytes.
    pub fn max_label_len(self) -> usize {
        match self {
            FsKind::Ext4 => 16,
            FsKind::Xfs => 12,
        }
    }

    /// Smallest filesystem this module makes.
    pub fn min_size(self) -> u64 {
        match self {
            FsKind::Ext4 => EXT4_MIN_SIZE,
            FsKind::Xfs => XFS_MIN_SIZE,
        }
    }

    fn inode_size(self) -> u64 {
        match self {
            FsKind::Ext4 => EXT4_INODE_SIZE,
            FsKind::Xfs => XFS_INODE_SIZE,
        }
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsKind {
    type Err = String;
    fn from_str(s: &str) -> Result<FsKind, String> {
        match s {
            "ext4" => Ok(FsKind::Ext4),
            "xfs" => Ok(FsKind::Xfs),
            _ => Err(format!("unknown filesystem {s:?}: expected ext4 or xfs")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsOptions {
    pub fs: FsKind,
    /// Filesystem label: up to 16 bytes on ext4, 12 on xfs.
    pub label: String,
    /// Filesystem UUID; ext4 also uses it as its directory hash seed. Fixed
    /// for determinism: derive it from what the seed holds ([`derive_uuid`]).
    pub uuid: [u8; 16],
    /// Seconds since 1970 for every time the filesystem sets itself (creation,
    /// write, check; each inode's ctime, atime and crtime). mtimes come from
    /// the tree. Between 1970 and 2038, and not in the future of the nodes
    /// (e2fsck complains about superblock times in the future).
    pub epoch: i64,
    /// Filesystem size in bytes (rounded down to 4 KiB). `None`: [`size_for`]
    /// the tree for an image file, the whole device for a block device.
    pub size: Option<u64>,
}

impl FsOptions {
    fn validate(&self) -> Result<(), FsImageError> {
        let max = self.fs.max_label_len();
        if self.label.len() > max {
            return Err(FsImageError::Invalid(format!(
                "label {:?} has {} bytes; {} labels hold at most {max}",
                self.label,
                self.label.len(),
                self.fs
            )));
        }
        if self.label.bytes().any(|b| b.is_ascii_control()) {
            return Err(FsImageError::Invalid(format!(
                "label {:?} holds control characters",
                self.label
            )));
        }
        // ext4 keeps times past 2038 in extra epoch bits that the debugfs
        // pass would have to set; nothing needs them yet.
        if !(0..=i64::from(i32::MAX)).contains(&self.epoch) {
            return Err(FsImageError::Invalid(format!(
                "epoch {} is outside 1970..2038 (0..={})",
                self.epoch,
                i32::MAX
            )));
        }
        Ok(())
    }
}

/// A UUID (RFC 9562 version 8, name-based) derived from `input`, for example
/// the seed manifest's digest: the same seed gives the same filesystem UUID.
pub fn derive_uuid(input: &[u8]) -> [u8; 16] {
    let hash = Sha256::digest(input);
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&hash[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

/// `01234567-89ab-cdef-0123-456789abcdef`
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in uuid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// What a staging tree needs on ext4, from [`measure_tree`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes in 4 KiB blocks: file data (holes excluded, each hardlinked
    /// file once), extent-tree blocks, directory blocks, long symlink
    /// targets, xattrs that do not fit in the inode.
    pub bytes: u64,
    /// Inodes: every file, directory, symlink, device node and fifo, each
    /// hardlinked file once, the root included.
    pub inodes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub fs: FsKind,
    /// Size of the filesystem in bytes.
    pub size: u64,
    /// What the tree needed.
    pub tree: TreeUsage,
    /// `output` was a block device, written in place.
    pub block_device: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FsImageError {
    #[error(
        "making or mounting a filesystem image needs root: the tree holds files of any owner, \
         device nodes and trusted.* xattrs (overlay whiteouts and opaque directories) that only \
         root can read and reproduce, and images are loop-mounted; run as root (in Kubernetes, \
         a privileged container)"
    )]
    NotRoot,
    #[error("{tool} not found in PATH, /usr/sbin or /sbin: install the Debian package {package}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "seed needs {needed} bytes ({}), {given_by} gives {given} bytes ({})",
        human(*.needed),
        human(*.given)
    )]
    TooSmall {
        needed: u64,
        given: u64,
        /// `--size`, or the device.
        given_by: String,
    },
    #[error("{what}: {tool} failed ({status}): {output}")]
    Tool {
        tool: &'static str,
        what: String,
        status: String,
        /// The end of what it printed.
        output: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FsImageError {
    let path = path.to_path_buf();
    move |source| FsImageError::Io { what, path, source }
}

/// `1.5 GiB`, `300.0 MiB`
fn human(n: u64) -> String {
    if n >= GIB {
        format!("{:.1} GiB", n as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", n as f64 / MIB as f64)
    }
}

fn round_up(n: u64, unit: u64) -> u64 {
    n.div_ceil(unit).saturating_mul(unit)
}

/// Inodes the image gets room for: the tree's, a quarter more and 1024 spare
/// (reserved inodes, lost+found, rounding to whole inode-table blocks).
fn planned_inodes(tree_inodes: u64) -> u64 {
    tree_inodes + tree_inodes / 4 + 1024
}

/// ext4's inode count for a filesystem of `size` bytes: the usual density or
/// what the tree needs, whichever is more, and at most one per block (the
/// most mke2fs allows).
fn ext4_inode_count(size: u64, tree_inodes: u64) -> u64 {
    (size / INODE_RATIO)
        .max(planned_inodes(tree_inodes))
        .min(size / BLOCK)
}

/// The ext4 journal (and our bound for the xfs log): 1/32 of the
/// filesystem, 4 MiB (the least jbd2 takes) to 128 MiB. It does not grow
/// with the filesystem.
fn journal_bytes(size: u64) -> u64 {
    (size / 32 / MIB * MIB).clamp(4 * MIB, 128 * MIB)
}

/// The size of a filesystem for a tree ([`measure_tree`]): its content, inode
/// tables for its inodes ([`planned_inodes`]), 1% and 4 MiB for the
/// filesystem's own metadata, then 10% headroom; on top, what scales with the
/// filesystem itself: the journal (1/32 of it, 4 to 128 MiB) and, on ext4,
/// inode tables for one inode per 16 KiB if that is more than the tree needs.
/// Rounded up to 1 MiB; at least 64 MiB (ext4) or 300 MiB (xfs), and at
/// least one 4 KiB block per inode. The node grows the filesystem to its
/// volume; this is only what the image needs.
pub fn size_for(fs: FsKind, tree: &TreeUsage) -> u64 {
    let inodes = planned_inodes(tree.inodes);
    let need = base_need(fs, tree);
    let with_headroom = need.saturating_add(need / 100 * HEADROOM_PERCENT);
    // A fixed point: the journal and the inode floor grow with the size.
    let mut size = with_headroom;
    for _ in 0..8 {
        let floor_tables = match fs {
            FsKind::Ext4 => (size / INODE_RATIO).saturating_sub(inodes) * EXT4_INODE_SIZE,
            FsKind::Xfs => 0,
        };
        let next = with_headroom
            .saturating_add(journal_bytes(size))
            .saturating_add(floor_tables);
        if next <= size {
            break;
        }
        size = next;
    }
    round_up(size, MIB)
        .max(fs.min_size())
        .max(round_up(inodes.saturating_mul(BLOCK), MIB))
}

/// Content, inode tables and fixed metadata, without headroom or journal.
fn base_need(fs: FsKind, tree: &TreeUsage) -> u64 {
    tree.bytes
        .saturating_add(planned_inodes(tree.inodes).saturating_mul(fs.inode_size()))
        .saturating_add(tree.bytes / 100)
        .saturating_add(FIXED_METADATA)
}

/// Below this a build cannot succeed: the content, its inodes, the metadata
/// and the journal, without headroom.
fn minimum_size(fs: FsKind, tree: &TreeUsage) -> u64 {
    let need = base_need(fs, tree);
    need.saturating_add(journal_bytes(need)).max(fs.min_size())
}

struct Tool {
    name: &'static str,
    package: &'static str,
}

const MKE2FS: Tool = Tool {
    name: "mke2fs",
    package: "e2fsprogs",
};
const DUMPE2FS: Tool = Tool {
    name: "dumpe2fs",
    package: "e2fsprogs",
};
const DEBUGFS: Tool = Tool {
    name: "debugfs",
    package: "e2fsprogs",
};
const E2FSCK: Tool = Tool {
    name: "e2fsck",
    package: "e2fsprogs",
};
const MKFS_XFS: Tool = Tool {
    name: "mkfs.xfs",
    package: "xfsprogs",
};
const MOUNT: Tool = Tool {
    name: "mount",
    package: "mount",
};
const UMOUNT: Tool = Tool {
    name: "umount",
    package: "mount",
};
const BLKID: Tool = Tool {
    name: "blkid",
    package: "util-linux",
};
const CP: Tool = Tool {
    name: "cp",
    package: "coreutils",
};
const RESIZE2FS: Tool = Tool {
    name: "resize2fs",
    package: "e2fsprogs",
};
const XFS_REPAIR: Tool = Tool {
    name: "xfs_repair",
    package: "xfsprogs",
};
const XFS_GROWFS: Tool = Tool {
    name: "xfs_growfs",
    package: "xfsprogs",
};

/// The tool's path: from PATH, else the sbin directories a non-login root
/// shell (or a container's PATH) may lack.
fn find_tool(tool: &Tool) -> Result<PathBuf, FsImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(TOOL_PATH.split(':').map(PathBuf::from))
        .map(|dir| dir.join(tool.name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or(FsImageError::ToolMissing {
            tool: tool.name,
            package: tool.package,
        })
}

/// A command with a cleared environment: only what we set reaches the tool
/// (`MKE2FS_*`, `E2FSCK_CONFIG`, locale and the like change its output).
fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", TOOL_PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion; a failure carries the end of its output.
fn run(cmd: &mut Command, tool: &'static str, what: &str) -> Result<Output, FsImageError> {
    tracing::debug!(tool, what, "running {cmd:?}");
    let out = cmd.output().map_err(|e| FsImageError::Tool {
        tool,
        what: what.to_owned(),
        status: "could not start".to_owned(),
        output: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(FsImageError::Tool {
            tool,
            what: what.to_owned(),
            status: out.status.to_string(),
            output: output_tail(&out),
        });
    }
    Ok(out)
}

/// The last lines of a tool's stderr and stdout, enough to act on.
fn output_tail(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("; ");
    if tail.len() > 2000 {
        let mut cut = tail.len() - 2000;
        while !tail.is_char_boundary(cut) {
            cut += 1;
        }
        format!("…{}", &tail[cut..])
    } else {
        tail
    }
}

fn require_root() -> Result<(), FsImageError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(FsImageError::NotRoot);
    }
    Ok(())
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos:x}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A new private (0700) directory under the temp dir.
fn private_dir(prefix: &str) -> Result<PathBuf, FsImageError> {
    let base = std::env::temp_dir();
    loop {
        let path = base.join(format!("{prefix}-{}", unique_suffix()));
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("creating a temporary directory", &path)(e)),
        }
    }
}

/// A [`private_dir`] removed with everything in it when dropped. Never a
/// mount point: see [`MountGuard`].
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(prefix: &str) -> Result<WorkDir, FsImageError> {
        private_dir(prefix).map(WorkDir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), "removing a temporary directory: {e}");
        }
    }
}

/// Where the filesystem goes.
enum Target {
    /// A temporary sibling of `dest`, renamed over it once complete and
    /// removed if anything fails before.
    File {
        tmp: PathBuf,
        dest: PathBuf,
        committed: bool,
    },
    Device {
        path: PathBuf,
        size: u64,
    },
}

impl Target {
    fn open(output: &Path) -> Result<Target, FsImageError> {
        // Follows symlinks: /dev/disk/by-id/… names a device.
        match fs::metadata(output) {
            Ok(m) if m.file_type().is_block_device() => {
                let mut dev = File::open(output).map_err(io_err("opening the device", output))?;
                let size = dev
                    .seek(SeekFrom::End(0))
                    .map_err(io_err("reading the size of the device", output))?;
                return Ok(Target::Device {
                    path: output.to_path_buf(),
                    size,
                });
            }
            Ok(m) if !m.is_file() => {
                return Err(FsImageError::Invalid(format!(
                    "output {} exists and is neither a regular file nor a block device",
                    output.display()
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("examining the output", output)(e)),
        }
        let name = output.file_name().ok_or_else(|| {
            FsImageError::Invalid(format!("output {} names no file", output.display()))
        })?;
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        loop {
            let mut tmp_name = OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".partial-{}", unique_suffix()));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
            {
                Ok(_) => {
                    return Ok(Target::File {
                        tmp,
                        dest: output.to_path_buf(),
                        committed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("creating the image file", &tmp)(e)),
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            Target::File { tmp, .. } => tmp,
            Target::Device { path, .. } => path,
        }
    }

    fn is_device(&self) -> bool {
        matches!(self, Target::Device { .. })
    }

    /// An image file of exactly `size` bytes, all of them a hole.
    fn prepare(&self, size: u64) -> Result<(), FsImageError> {
        if let Target::File { tmp, .. } = self {
            let f = OpenOptions::new()
                .write(true)
                .open(tmp)
                .map_err(io_err("opening the image file", tmp))?;
            f.set_len(0)
                .and_then(|()| f.set_len(size))
                .map_err(io_err("sizing the image file", tmp))?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), FsImageError> {
        match self {
            Target::File {
                tmp,
                dest,
                committed,
            } => {
                File::open(&*tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err("flushing the image file", tmp))?;
                fs::rename(&*tmp, &*dest).map_err(io_err("renaming the image into place", dest))?;
                *committed = true;
                if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                    // The rename is durable once the directory is.
                    let _ = File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(())
            }
            Target::Device { path, .. } => File::open(&*path)
                .and_then(|f| f.sync_all())
                .map_err(io_err("flushing the device", path)),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Target::File {
            tmp,
            committed: false,
            ..
        } = self
            && let Err(e) = fs::remove_file(&*tmp)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %tmp.display(), "removing a partial image: {e}");
        }
    }
}

/// An inode with two or more xattrs: mke2fs keeps them in the order the
/// staging filesystem lists them, so the debugfs pass rewrites them sorted.
struct XattrFix {
    /// Path in the image, `/`-rooted.
    path: Vec<u8>,
    /// Sorted by name.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Scan {
    usage: TreeUsage,
    fixes: Vec<XattrFix>,
    /// Paths whose mtime has nanoseconds, which `mke2fs -d` 1.47.0 drops:
    /// the debugfs pass puts them back.
    nsec: Vec<(Vec<u8>, u32)>,
    /// Regular files with one link and at least [`ext4bulk::BULK_MIN`]
    /// bytes, in the scan's order (which depends on the names only: a
    /// directory's entries sorted, then its subdirectories): their data is written by
    /// [`crate::ext4bulk`], not by `mke2fs -d`.
    bulk: Vec<Vec<u8>>,
}

/// What the staging tree needs on ext4 (the basis of [`size_for`]). Walks
/// the whole tree without following symlinks.
pub fn measure_tree(staging: &Path) -> Result<TreeUsage, FsImageError> {
    Ok(scan_tree(staging)?.usage)
}

fn scan_tree(root: &Path) -> Result<Scan, FsImageError> {
    let meta = fs::symlink_metadata(root).map_err(io_err("reading the staging tree", root))?;
    if !meta.is_dir() {
        return Err(FsImageError::Invalid(format!(
            "staging tree {} is not a directory",
            root.display()
        )));
    }
    let mut scan = Scan {
        usage: TreeUsage::default(),
        fixes: Vec::new(),
        nsec: Vec::new(),
        bulk: Vec::new(),
    };
    let mut seen = HashSet::new();
    account(&mut scan, &mut seen, root, b"/".to_vec(), &meta)?;
    // Sorted, depth-first: which of a hardlinked inode's names its xattr fix
    // uses must not depend on the staging order.
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("reading directory", &dir))? {
            names.push(
                entry
                    .map_err(io_err("reading directory", &dir))?
                    .file_name(),
            );
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        // "." and "..", then 8 bytes and the name (rounded to 4) per entry.
        let mut dirents = 24u64;
        let mut subdirs = Vec::new();
        for name in names {
            dirents += 8 + round_up(name.len() as u64, 4);
            let path = dir.join(&name);
            let mut child_rel = rel.clone();
            child_rel.push(b'/');
            child_rel.extend_from_slice(name.as_bytes());
            let meta = fs::symlink_metadata(&path).map_err(io_err("reading", &path))?;
            account(&mut scan, &mut seen, &path, child_rel.clone(), &meta)?;
            if meta.is_dir() {
                subdirs.push((path, child_rel));
            }
        }
        let mut dir_blocks = dirents.div_ceil(BLOCK);
        if dir_blocks > 1 {
            // e2fsck -D indexes it: partly filled leaves, index blocks.
            dir_blocks += dir_blocks / 4 + 1;
        }
        scan.usage.bytes += dir_blocks * BLOCK;
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(scan)
}

/// Counts one entry: its inode (once per hardlinked inode), its blocks, and
/// whether its xattrs need rewriting.
fn account(
    scan: &mut Scan,
    seen: &mut HashSet<(u64, u64)>,
    path: &Path,
    rel: Vec<u8>,
    meta: &fs::Metadata,
) -> Result<(), FsImageError> {
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    scan.usage.inodes += 1;
    let ft = meta.file_type();
    if ft.is_file() {
        let allocated = (meta.blocks() * 512).min(round_up(meta.size(), BLOCK));
        let mut extents = meta.size().div_ceil(EXTENT_MAX);
        if meta.blocks() * 512 < meta.size() {
            extents += data_segments(path, meta.size()).map_err(io_err("reading", path))?;
        }
        scan.usage.bytes += round_up(allocated, BLOCK);
        if meta.nlink() == 1 && meta.size() >= ext4bulk::BULK_MIN {
            scan.bulk.push(rel.clone());
        }
        if extents > EXTENTS_IN_INODE {
            scan.usage.bytes += extents.div_ceil(EXTENTS_PER_BLOCK) * BLOCK;
        }
    } else if ft.is_symlink() && meta.size() >= FAST_SYMLINK_MAX {
        scan.usage.bytes += BLOCK;
    }
    let xattrs = read_xattrs(path).map_err(io_err("reading the xattrs of", path))?;
    // An entry: 16 bytes, the name without its prefix and the value, each
    // rounded to 4.
    let xattr_bytes: u64 = xattrs
        .iter()
        .map(|(n, v)| 16 + round_up(n.len() as u64, 4) + round_up(v.len() as u64, 4))
        .sum();
    if xattr_bytes > XATTR_IN_INODE {
        scan.usage.bytes += round_up(xattr_bytes, BLOCK);
    }
    if meta.mtime_nsec() != 0 && rel != b"/" {
        scan.nsec.push((rel.clone(), meta.mtime_nsec() as u32));
    }
    if xattrs.len() >= 2 {
        scan.fixes.push(XattrFix { path: rel, xattrs });
    }
    Ok(())
}

/// How many runs of data a sparse file holds.
fn data_segments(path: &Path, size: u64) -> io::Result<u64> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    Ok(ext4bulk::data_runs(&file, size)?.len() as u64)
}

/// All xattrs of `path` (not following a symlink), sorted by name.
fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut list = vec![0u8; 1024];
    let len = loop {
        match rustix::fs::llistxattr(path, &mut list[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => {
                let n = rustix::fs::llistxattr_query(path)?;
                list.resize(n.max(list.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut xattrs = Vec::new();
    for name in list[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 256];
        let n = loop {
            match rustix::fs::lgetxattr(path, name, &mut value[..]) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => {
                    let n = rustix::fs::lgetxattr_query(path, name)?;
                    value.resize(n.max(value.len() * 2), 0);
                }
                Err(e) => return Err(e.into()),
            }
        };
        value.truncate(n);
        xattrs.push((name.as_bytes().to_vec(), value));
    }
    xattrs.sort();
    Ok(xattrs)
}

/// Turns `staging` into a filesystem at `output`: an image file (written
/// beside it and renamed into place) or, when `output` is a block device,
/// the device itself. See the module documentation for what makes ext4
/// images deterministic.
pub fn make_image(
    staging: &Path,
    output: &Path,
    opts: &FsOptions,
) -> Result<ImageInfo, FsImageError> {
    opts.validate()?;
    require_root()?;
    let tools = Tools::find(opts.fs)?;
    let started = Instant::now();
    let scan = scan_tree(staging)?;
    tracing::info!(
        staging = %staging.display(),
        bytes = scan.usage.bytes,
        inodes = scan.usage.inodes,
        xattr_fixes = scan.fixes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "measured the staging tree"
    );
    let mut target = Target::open(output)?;
    let needed = size_for(opts.fs, &scan.usage);
    let minimum = minimum_size(opts.fs, &scan.usage);
    let (mut size, given_by) = match (&target, opts.size) {
        (Target::Device { size: dev, path }, Some(s)) if s > *dev => {
            return Err(FsImageError::Invalid(format!(
                "--size {s} exceeds the {dev} bytes of device {}",
                path.display()
            )));
        }
        (_, Some(s)) => (s, "--size".to_owned()),
        (Target::Device { size, path }, None) => (*size, format!("device {}", path.display())),
        (Target::File { .. }, None) => (needed, "the computed size".to_owned()),
    };
    size = size / BLOCK * BLOCK;
    if size < minimum {
        return Err(FsImageError::TooSmall {
            needed,
            given: size,
            given_by,
        });
    }
    let work = WorkDir::new("coral-fsimage")?;
    let auto = opts.size.is_none() && !target.is_device();
    let mut attempt = 1;
    // Large files leave the tree for the image's making, and come back
    // (also after an error; after a kill, the next build's `restore`).
    let swapped = match opts.fs {
        FsKind::Ext4 => ext4bulk::swap_out(staging, &scan.bulk)?,
        FsKind::Xfs => None,
    };
    let written = (|| loop {
        target.prepare(size)?;
        let result = match opts.fs {
            FsKind::Ext4 => build_ext4(
                &tools,
                staging,
                target.path(),
                size,
                &scan,
                opts,
                &work,
                swapped.as_ref(),
            ),
            FsKind::Xfs => build_xfs(&tools, staging, target.path(), size, opts),
        };
        match result {
            Ok(()) => return Ok(size),
            Err(e) if is_out_of_space(&e) => {
                if auto && attempt < AUTO_SIZE_ATTEMPTS {
                    let bigger = round_up(size + size / 4, MIB);
                    tracing::warn!(size, bigger, "the computed size was too small; retrying");
                    size = bigger;
                    attempt += 1;
                    continue;
                }
                tracing::debug!("out of space: {e}");
                return Err(FsImageError::TooSmall {
                    needed: needed.max(round_up(size + size / 4, MIB)),
                    given: size,
                    given_by: given_by.clone(),
                });
            }
            Err(e) => return Err(e),
        }
    })();
    let restored = match &swapped {
        Some(_) => ext4bulk::restore(staging),
        None => Ok(()),
    };
    let size = match (written, restored) {
        (Ok(size), restored) => restored.map(|()| size)?,
        (Err(e), Ok(())) => return Err(e),
        (Err(e), Err(r)) => {
            tracing::error!("putting the staging tree back: {r}");
            return Err(e);
        }
    };
    target.commit()?;
    tracing::info!(
        output = %output.display(),
        fs = %opts.fs,
        size,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "filesystem image written"
    );
    Ok(ImageInfo {
        fs: opts.fs,
        size,
        tree: scan.usage,
        block_device: target.is_device(),
    })
}

fn is_out_of_space(e: &FsImageError) -> bool {
    match e {
        FsImageError::Tool { output, .. } => [
            "Could not allocate block",
            "Could not allocate inode",
            "No space left on device",
            "No free space in the directory",
        ]
        .iter()
        .any(|m| output.contains(m)),
        _ => false,
    }
}

/// The external programs a build runs, resolved before any work starts.
struct Tools {
    mke2fs: PathBuf,
    dumpe2fs: PathBuf,
    debugfs: PathBuf,
    e2fsck: PathBuf,
    mkfs_xfs: PathBuf,
    cp: PathBuf,
}

impl Tools {
    fn find(fs: FsKind) -> Result<Tools, FsImageError> {
        let none = PathBuf::new();
        Ok(match fs {
            FsKind::Ext4 => Tools {
                mke2fs: find_tool(&MKE2FS)?,
                dumpe2fs: find_tool(&DUMPE2FS)?,
                debugfs: find_tool(&DEBUGFS)?,
                e2fsck: find_tool(&E2FSCK)?,
                mkfs_xfs: none.clone(),
                cp: none,
            },
            FsKind::Xfs => {
                // Checked now so that a missing one fails before mkfs.
                find_tool(&MOUNT)?;
                find_tool(&UMOUNT)?;
                Tools {
                    mke2fs: none.clone(),
                    dumpe2fs: none.clone(),
                    debugfs: none.clone(),
                    e2fsck: none.clone(),
                    mkfs_xfs: find_tool(&MKFS_XFS)?,
                    cp: find_tool(&CP)?,
                }
            }
        })
    }
}

fn log_step(step: &str, started: Instant) -> Duration {
    let elapsed = started.elapsed();
    tracing::info!(
        step,
        elapsed_ms = elapsed.as_millis() as u64,
        "filesystem image step"
    );
    elapsed
}

#[allow(clippy::too_many_arguments)]
fn build_ext4(
    tools: &Tools,
    staging: &Path,
    target: &Path,
    size: u64,
    scan: &Scan,
    opts: &FsOptions,
    work: &WorkDir,
    swapped: Option<&Swapped>,
) -> Result<(), FsImageError> {
    let conf = work.0.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).map_err(io_err("writing", &conf))?;
    let uuid = format_uuid(&opts.uuid);
    let epoch = opts.epoch.to_string();
    let inodes = ext4_inode_count(size, scan.usage.inodes);

    let t = Instant::now();
    run(
        command(&tools.mke2fs)
            .env("MKE2FS_CONFIG", &conf)
            .env("E2FSPROGS_FAKE_TIME", &epoch)
            .env("SOURCE_DATE_EPOCH", &epoch)
            .args(["-q", "-F", "-t", "ext4", "-T", "coral"])
            .args(["-b", "4096", "-I", "256", "-m", "0"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-J")
            .arg(format!("size={}", journal_bytes(size) / MIB))
            .arg("-L")
            .arg(&opts.label)
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!(
                "hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"
            ))
            .arg("-d")
            .arg(staging)
            .arg(target)
            .arg((size / BLOCK).to_string()),
        MKE2FS.name,
        &format!("writing an ext4 filesystem from {}", staging.display()),
    )?;
    log_step("mke2fs", t);

    if let Some(swapped) = swapped.filter(|s| !s.files.is_empty()) {
        let t = Instant::now();
        let extents = ext4bulk::allocate(target, swapped)?;
        log_step("allocate", t);
        let t = Instant::now();
        ext4bulk::copy(target, swapped, &extents)?;
        log_step("copy", t);
    }

    let t = Instant::now();
    let dump = run(
        command(&tools.dumpe2fs).arg(target),
        DUMPE2FS.name,
        "listing the used inodes",
    )?;
    let used =
        used_inodes(&String::from_utf8_lossy(&dump.stdout)).map_err(|e| FsImageError::Tool {
            tool: DUMPE2FS.name,
            what: "listing the used inodes".to_owned(),
            status: "unexpected output".to_owned(),
            output: e,
        })?;
    let cmds = work.0.join("debugfs.cmds");
    write_debugfs_commands(&cmds, work, &scan.fixes, &scan.nsec, &used, opts.epoch)
        .map_err(io_err("writing", &cmds))?;
    let out = run(
        command(&tools.debugfs)
            .env("E2FSPROGS_FAKE_TIME", &epoch)
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(target)
            .stdout(Stdio::null()),
        DEBUGFS.name,
        "fixing inode times and xattr order",
    )?;
    // debugfs reports failed commands on stderr and still exits 0; its
    // banner is the only line expected there.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .take(10)
        .collect();
    if !errors.is_empty() {
        return Err(FsImageError::Tool {
            tool: DEBUGFS.name,
            what: "fixing inode times and xattr order".to_owned(),
            status: "a command failed".to_owned(),
            output: errors.join("; "),
        });
    }
    log_step("debugfs", t);
    tracing::debug!(inodes = used.len(), "inode times fixed");

    let t = Instant::now();
    run(
        command(&tools.e2fsck)
            .env("E2FSCK_TIME", &epoch)
            .env("E2FSPROGS_FAKE_TIME", &epoch)
            .env("E2FSCK_CONFIG", "/dev/null")
            .args(["-f", "-y", "-D"])
            .arg(target),
        E2FSCK.name,
        "checking the ext4 filesystem and indexing its directories",
    )?;
    log_step("e2fsck", t);
    Ok(())
}

/// The used inodes (from `dumpe2fs` output) whose times the filesystem took
/// from the staging tree: the root and every inode from the first ordinary
/// one on. Reserved inodes (journal, resize) carry mke2fs's own times.
fn used_inodes(dump: &str) -> Result<Vec<u64>, String> {
    let field = |name: &str| -> Result<u64, String> {
        dump.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no {name:?} in dumpe2fs output"))
    };
    let per_group = field("Inodes per group:")?;
    let first = field("First inode:")?;
    let count = field("Inode count:")?;
    if per_group == 0 {
        return Err("0 inodes per group".to_owned());
    }
    let mut used = vec![2];
    let mut group: Option<u64> = None;
    let mut groups_seen = 0;
    for line in dump.lines() {
        // "Group 3: (Blocks …)", not "Group descriptor size:".
        if let Some(rest) = line.strip_prefix("Group ")
            && rest.starts_with(|c: char| c.is_ascii_digit())
        {
            let n = rest.split(':').next().unwrap_or_default();
            group = Some(n.parse().map_err(|_| format!("bad group line {line:?}"))?);
            continue;
        }
        let Some(free) = line.trim_start().strip_prefix("Free inodes:") else {
            continue;
        };
        // The header has a "Free inodes:" count too; ranges come per group.
        let Some(g) = group.take() else { continue };
        groups_seen += 1;
        let lo = g * per_group + 1;
        let hi = (g + 1) * per_group;
        let mut next = lo;
        for part in free.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let a: u64 = a.parse().map_err(|_| format!("bad inode range {part:?}"))?;
            let b: u64 = b.parse().map_err(|_| format!("bad inode range {part:?}"))?;
            if a < next || b < a || b > hi {
                return Err(format!("inode range {part:?} out of order in group {g}"));
            }
            used.extend((next..a).filter(|&i| i >= first));
            next = b + 1;
        }
        used.extend((next..=hi).filter(|&i| i >= first));
    }
    if groups_seen != count.div_ceil(per_group) {
        return Err(format!(
            "free inodes of {groups_seen} groups listed, expected {}",
            count.div_ceil(per_group)
        ));
    }
    Ok(used)
}

/// `"…"` for debugfs' parser, which doubles a quote inside quotes; `None`
/// for what no command line can carry (a line ends at `\n`, and debugfs
/// strips `\r`).
fn debugfs_quote(s: &[u8]) -> Option<Vec<u8>> {
    if s.iter().any(|&b| matches!(b, b'\n' | b'\r' | 0)) {
        return None;
    }
    let mut q = Vec::with_capacity(s.len() + 2);
    q.push(b'"');
    for &b in s {
        if b == b'"' {
            q.push(b'"');
        }
        q.push(b);
    }
    q.push(b'"');
    Some(q)
}

/// The debugfs pass: xattrs of inodes with two or more rewritten in name
/// order (each value from a file, so any bytes go), then atime, ctime and
/// crtime of every used inode set to `epoch`, nanoseconds 0.
fn write_debugfs_commands(
    cmds: &Path,
    work: &WorkDir,
    fixes: &[XattrFix],
    nsec: &[(Vec<u8>, u32)],
    used: &[u64],
    epoch: i64,
) -> io::Result<()> {
    let mut w = BufWriter::new(File::create(cmds)?);
    // Marks the superblock dirty, so that debugfs writes it (and its
    // backups) with E2FSPROGS_FAKE_TIME as the last write time, whatever
    // wrote it before (libext2fs in `ext4bulk` uses the clock).
    writeln!(w, "ssv wtime @{epoch}")?;
    let mut values: HashMap<&[u8], Vec<u8>> = HashMap::new();
    for fix in fixes {
        let Some(path) = debugfs_quote(&fix.path) else {
            tracing::warn!(path = %String::from_utf8_lossy(&fix.path),
                "a name with a line break: its xattr order is left as staged");
            continue;
        };
        let mut lines: Vec<Vec<u8>> = Vec::new();
        for (name, _) in &fix.xattrs {
            let Some(name) = debugfs_quote(name) else {
                lines.clear();
                break;
            };
            lines.push([b"ea_rm ", &path[..], b" ", &name[..], b"\n"].concat());
        }
        for (name, value) in &fix.xattrs {
            let Some(qname) = debugfs_quote(name) else {
                lines.clear();
                break;
            };
            let n = values.len();
            let file = match values.get(value.as_slice()) {
                Some(f) => f.clone(),
                None => {
                    let p = work.0.join(format!("xattr-{n}"));
                    fs::write(&p, value)?;
                    let q = debugfs_quote(p.as_os_str().as_bytes()).ok_or_else(|| {
                        io::Error::other("temporary directory path holds a line break")
                    })?;
                    values.insert(value, q.clone());
                    q
                }
            };
            lines.push(
                [
                    b"ea_set -f ",
                    &file[..],
                    b" ",
                    &path[..],
                    b" ",
                    &qname[..],
                    b"\n",
                ]
                .concat(),
            );
        }
        if lines.is_empty() || lines.iter().any(|l| l.len() > DEBUGFS_MAX_LINE) {
            tracing::warn!(path = %String::from_utf8_lossy(&fix.path),
                "a name debugfs cannot take: its xattr order is left as staged");
            continue;
        }
        for l in lines {
            w.write_all(&l)?;
        }
    }
    for ino in used {
        for field in ["atime", "ctime", "crtime"] {
            writeln!(w, "sif <{ino}> {field} @{epoch}")?;
            writeln!(w, "sif <{ino}> {field}_extra 0")?;
        }
    }
    // The extra field holds nanoseconds << 2 (the low two bits extend the
    // epoch, 0 before 2038, the only range supported here).
    for (path, ns) in nsec {
        let Some(q) = debugfs_quote(path) else {
            tracing::warn!(path = %String::from_utf8_lossy(path),
                "a name with a line break: its mtime loses its nanoseconds");
            continue;
        };
        let line = [
            b"sif ",
            &q[..],
            format!(" mtime_extra {}\n", u64::from(*ns) << 2).as_bytes(),
        ]
        .concat();
        if line.len() > DEBUGFS_MAX_LINE {
            tracing::warn!(path = %String::from_utf8_lossy(path),
                "a name debugfs cannot take: its mtime loses its nanoseconds");
            continue;
        }
        w.write_all(&line)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn build_xfs(
    tools: &Tools,
    staging: &Path,
    target: &Path,
    size: u64,
    opts: &FsOptions,
) -> Result<(), FsImageError> {
    let t = Instant::now();
    run(
        command(&tools.mkfs_xfs)
            .args(["-q", "-f", "-K"])
            .arg("-L")
            .arg(&opts.label)
            .arg("-m")
            .arg(format!("uuid={}", format_uuid(&opts.uuid)))
            .arg("-d")
            .arg(format!("size={size}"))
            .arg(target),
        MKFS_XFS.name,
        "making an xfs filesystem",
    )?;
    log_step("mkfs.xfs", t);
    let t = Instant::now();
    let mnt = mount(target, FsKind::Xfs, true)?;
    run(
        command(&tools.cp)
            .args(["-a", "--preserve=all", "--sparse=always", "--"])
            .arg(staging.join("."))
            .arg(mnt.path()),
        CP.name,
        &format!("copying {} into the xfs filesystem", staging.display()),
    )?;
    // As on ext4: the root is root's, 0755, dated `epoch`.
    let root = mnt.path();
    std::os::unix::fs::chown(root, Some(0), Some(0)).map_err(io_err("chown", root))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", root))?;
    let when = UNIX_EPOCH + Duration::from_secs(opts.epoch as u64);
    File::open(root)
        .and_then(|d| d.set_times(fs::FileTimes::new().set_accessed(when).set_modified(when)))
        .map_err(io_err("setting the times of", root))?;
    mnt.unmount()?;
    log_step("xfs copy", t);
    Ok(())
}

/// A mounted filesystem image on a private temporary directory. Dropping
/// it unmounts (lazily if it is busy), which also detaches the loop device,
/// and removes the directory, never anything in it.
#[derive(Debug)]
pub struct MountGuard {
    path: PathBuf,
    fs: FsKind,
    umount: PathBuf,
    mounted: bool,
}

impl MountGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fs(&self) -> FsKind {
        self.fs
    }

    /// Unmounts now, reporting failure (a busy mount stays mounted and is
    /// unmounted lazily on drop).
    pub fn unmount(mut self) -> Result<(), FsImageError> {
        run(
            command(&self.umount).arg(&self.path),
            UMOUNT.name,
            &format!("unmounting {}", self.path.display()),
        )?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            let what = format!("unmounting {}", self.path.display());
            if let Err(e) = run(command(&self.umount).arg(&self.path), UMOUNT.name, &what) {
                tracing::warn!("{e}; unmounting lazily");
                if let Err(e) = run(
                    command(&self.umount).arg("-l").arg(&self.path),
                    UMOUNT.name,
                    &what,
                ) {
                    tracing::warn!("{e}");
                    return;
                }
            }
        }
        // remove_dir, not remove_dir_all: should the unmount have failed,
        // this must not reach into the filesystem.
        if let Err(e) = fs::remove_dir(&self.path) {
            tracing::warn!(path = %self.path.display(), "removing a mount point: {e}");
        }
    }
}

/// The filesystem an image file (or block device) holds: ext4 or xfs, the
/// only ones coral mounts (an image may come from elsewhere, and the
/// kernel's other filesystem drivers are not meant for untrusted input).
pub fn detect_fs(image: &Path) -> Result<FsKind, FsImageError> {
    let blkid = find_tool(&BLKID)?;
    let out = command(&blkid)
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(image)
        .output()
        .map_err(io_err("running blkid on", image))?;
    let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match found.as_str() {
        "ext4" => Ok(FsKind::Ext4),
        "xfs" => Ok(FsKind::Xfs),
        "" => Err(FsImageError::Invalid(format!(
            "{} holds no filesystem blkid recognises",
            image.display()
        ))),
        other => Err(FsImageError::Invalid(format!(
            "{} holds a {other} filesystem; coral images are ext4 or xfs",
            image.display()
        ))),
    }
}

/// Mounts an image file (or block device) read-only, without replaying a
/// journal or log and with `nodev,nosuid,noexec`, on a private temporary
/// directory, for inspection.
pub fn mount_image_readonly(image: &Path) -> Result<MountGuard, FsImageError> {
    require_root()?;
    let fs = detect_fs(image)?;
    mount(image, fs, false)
}

/// Mounts an image file read-write (`nodev,nosuid,noexec`) on a private
/// temporary directory: for building a new volume on a copy of an old one.
pub fn mount_image_writable(image: &Path) -> Result<MountGuard, FsImageError> {
    require_root()?;
    let fs = detect_fs(image)?;
    mount(image, fs, true)
}

/// Copies the image `from` to `to` (a new file) keeping its holes, by
/// reflink where the filesystem shares blocks; then, when `size` is larger
/// than the image, grows the file and its filesystem to `size`.
pub fn copy_image(from: &Path, to: &Path, size: Option<u64>) -> Result<FsKind, FsImageError> {
    require_root()?;
    let fs = detect_fs(from)?;
    let cp = find_tool(&CP)?;
    run(
        command(&cp)
            .args(["--reflink=auto", "--sparse=always", "--"])
            .arg(from)
            .arg(to),
        CP.name,
        &format!("copying {} to build on it", from.display()),
    )?;
    let current = fs::metadata(to).map_err(io_err("examining", to))?.len();
    match size.map(|s| s / BLOCK * BLOCK) {
        Some(s) if s < current => {
            return Err(FsImageError::Invalid(format!(
                "--size {s} is smaller than the {current} bytes of the image built on; \
                 a volume built on another can only grow"
            )));
        }
        Some(s) if s > current => {
            fs::OpenOptions::new()
                .write(true)
                .open(to)
                .and_then(|f| f.set_len(s))
                .map_err(io_err("growing", to))?;
            match fs {
                FsKind::Ext4 => {
                    let e2fsck = find_tool(&E2FSCK)?;
                    // resize2fs wants a freshly checked filesystem.
                    run(
                        command(&e2fsck).args(["-f", "-p"]).arg(to),
                        E2FSCK.name,
                        "checking the image before growing it",
                    )?;
                    run(
                        command(&find_tool(&RESIZE2FS)?).arg(to),
                        RESIZE2FS.name,
                        &format!("growing the filesystem of {} to {s} bytes", to.display()),
                    )?;
                }
                FsKind::Xfs => {
                    let m = mount(to, fs, true)?;
                    run(
                        command(&find_tool(&XFS_GROWFS)?).arg(m.path()),
                        XFS_GROWFS.name,
                        &format!("growing the filesystem of {} to {s} bytes", to.display()),
                    )?;
                    m.unmount()?;
                }
            }
        }
        _ => {}
    }
    Ok(fs)
}

/// Checks a filesystem the kernel wrote (ext4: `e2fsck -f -y`, which also
/// replays nothing after a clean unmount); a filesystem with errors fails.
pub fn check_image(image: &Path, fs: FsKind) -> Result<(), FsImageError> {
    match fs {
        FsKind::Ext4 => {
            run(
                command(&find_tool(&E2FSCK)?)
                    .env("E2FSCK_CONFIG", "/dev/null")
                    .args(["-f", "-n"])
                    .arg(image),
                E2FSCK.name,
                &format!("checking {}", image.display()),
            )?;
        }
        FsKind::Xfs => {
            run(
                command(&find_tool(&XFS_REPAIR)?).arg("-n").arg(image),
                XFS_REPAIR.name,
                &format!("checking {}", image.display()),
            )?;
        }
    }
    Ok(())
}

fn mount(source: &Path, fs: FsKind, writable: bool) -> Result<MountGuard, FsImageError> {
    let mount_bin = find_tool(&MOUNT)?;
    let umount = find_tool(&UMOUNT)?;
    let is_file = fs::metadata(source)
        .map_err(io_err("examining", source))?
        .is_file();
    let mut options = vec!["nodev", "nosuid", "noexec"];
    if is_file {
        // util-linux sets autoclear: unmounting detaches the loop device.
        options.push("loop");
    }
    if !writable {
        options.push("ro");
        options.push(match fs {
            FsKind::Ext4 => "noload",
            FsKind::Xfs => "norecovery",
        });
    }
    if fs == FsKind::Xfs {
        // Two images of one seed share a UUID.
        options.push("nouuid");
    }
    // Not a WorkDir: dropping the guard must only ever rmdir it.
    let path = private_dir("coral-mnt")?;
    let result = run(
        command(&mount_bin)
            .arg("-t")
            .arg(fs.as_str())
            .arg("-o")
            .arg(options.join(","))
            .arg(source)
            .arg(&path),
        MOUNT.name,
        &format!("mounting {} ({fs})", source.display()),
    );
    if let Err(e) = result {
        let _ = fs::remove_dir(&path);
        return Err(e);
    }
    Ok(MountGuard {
        path,
        fs,
        umount,
        mounted: true,
    })
}

#[cfg(test)]
#[path = "fsimage_tests.rs"]
mod tests;
