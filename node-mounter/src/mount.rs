//! `coral-node-mounter mount`: find the seed volume's device, mount it, grow
//! it, and check that it holds the seed that was asked for.
//!
//! ```text
//! coral-node-mounter mount --device PATH|auto|label:LABEL|ebs:vol-XXXX --target DIR
//!                          [--grow] [--wait 60s] [--expect MANIFEST_DIGEST] [--read-only] [--json]
//! ```
//!
//! **The device** ([`DeviceSpec`]) is one of:
//! - a path: a block device (`/dev/nvme1n1`, `/dev/loop3`, a `/dev/disk/by-*`
//!   link) or a regular file holding a filesystem image, which is attached to
//!   a loop device;
//! - `label:LABEL`, or `auto` for the label `coral-seed` (the builder's
//!   default): found through `/dev/disk/by-label` and `blkid -t LABEL=…`; two
//!   devices with the label are an error, unless one is already mounted at
//!   the target;
//! - `ebs:vol-0123…` or a bare `vol-0123…`: on Nitro instances an EBS volume
//!   is an NVMe controller whose serial is the volume ID without its dash
//!   (`vol0123…`), seen in `/sys/class/nvme/*/serial` and as
//!   `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123…`. Both are
//!   looked at. (Xen instances, whose EBS volumes are `/dev/xvd*` without a
//!   serial, need a path.)
//!
//! The `/dev` and `/sys` used for *finding* the device are [`HostRoots`], so a
//! test (or a container that sees the host's under another path) can point
//! them elsewhere; kernel state (`/proc/self/mountinfo`, `/sys/block/loop*`)
//! is always read from the real paths.
//!
//! **Steps.** Create the target directory; take a lock (`flock` on the
//! target's parent directory) so two mounters never race; wait for the device
//! until `--wait` expires (polling every [`POLL_INTERVAL`]: udev may be
//! slow); if the target already has this device mounted, use that mount (an
//! idempotent re-run), and if it has anything else mounted, fail; otherwise
//! detect the filesystem with `blkid -p` (ext4 or xfs only) and mount it with
//! `noatime` (and `ro` with `--read-only`). Then read
//! `<target>/.coral/manifest.json`: it must exist, hash to `--expect` when
//! given, and parse as a seed manifest of a format this build reads. Last,
//! with `--grow`, grow the filesystem to the device's size (`resize2fs DEV`
//! for ext4, `xfs_growfs TARGET` for xfs, both online); a device no larger
//! than the filesystem is left alone.
//!
//! **Failure leaves nothing behind.** Any failure after this run mounted the
//! volume unmounts it and detaches the loop device it attached, before the
//! error is returned; guards do the same if the process panics. A loop
//! device this module attaches is marked autoclear, so the kernel also
//! releases it when the volume is unmounted later, by anyone. A mount that
//! was already in place is never unmounted: it is reported, with the error.
//!
//! A re-run accepts the existing mount when it is the same device mounted
//! at the target's root; a writable mount also satisfies `--read-only`, but a
//! read-only one does not satisfy a writable request (that is an error, and
//! the mount is left alone).
//!
//! **Exit codes** of the subcommand: 0 when the volume is mounted at the
//! target (by this run or an earlier one) and holds a readable seed manifest
//! (matching `--expect`); 1 on any error, with the reason on stderr; 2 for a
//! command line that does not parse.

use std::ffi::{CStr, OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use coral_seed::{Digest, ManifestError, SeedLayout, SeedManifest};
use serde::Serialize;

/// The label `--device auto` looks for: the builder's default.
pub const DEFAULT_LABEL: &str = "coral-seed";
/// How long to wait for the device by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// How often to look again while waiting for the device.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// udev's `/dev/disk/by-id/` name of an EBS volume, before the serial.
pub const EBS_BY_ID_PREFIX: &str = "nvme-Amazon_Elastic_Block_Store_";
/// A seed manifest larger than this is refused unread.
const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Where tools are looked for besides `$PATH` (a non-login root shell or a
/// container may lack the sbin directories), and the `PATH` they run with.
const TOOL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---------------------------------------------------------------------------
// What to mount, where, how

/// Which device holds the seed volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A block device, or a regular file holding a filesystem image.
    Path(PathBuf),
    /// The device whose filesystem has this label.
    Label(String),
    /// An EBS volume by ID (`vol-0123456789abcdef0`).
    Ebs(String),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceSpec, String> {
        if s == "auto" {
            return Ok(DeviceSpec::Label(DEFAULT_LABEL.to_owned()));
        }
        if let Some(label) = s.strip_prefix("label:") {
            if label.is_empty() || label.contains(['\0', '\n']) {
                return Err(format!(
                    "{s:?}: expected label:LABEL with a non-empty label"
                ));
            }
            return Ok(DeviceSpec::Label(label.to_owned()));
        }
        if let Some(vol) = s.strip_prefix("ebs:") {
            return check_volume_id(vol).map(DeviceSpec::Ebs);
        }
        if s.starts_with("vol-") {
            return check_volume_id(s)
                .map(DeviceSpec::Ebs)
                .map_err(|e| format!("{e} (for a file of that name, write ./{s})"));
        }
        if s.is_empty() {
            return Err("the device is empty: give a path, auto, label:LABEL or ebs:vol-…".into());
        }
        Ok(DeviceSpec::Path(PathBuf::from(s)))
    }
}

/// An EBS volume ID: `vol-` and 8 or 17 lowercase hex digits.
fn check_volume_id(vol: &str) -> Result<String, String> {
    let ok = vol.strip_prefix("vol-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(vol.to_owned())
    } else {
        Err(format!(
            "{vol:?} is not an EBS volume ID (vol- and 17 lowercase hex digits, e.g. vol-0123456789abcdef0)"
        ))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Path(p) => write!(f, "{}", p.display()),
            DeviceSpec::Label(l) => write!(f, "label:{l}"),
            DeviceSpec::Ebs(v) => write!(f, "ebs:{v}"),
        }
    }
}

impl DeviceSpec {
    /// What is being waited for, in words.
    fn describe(&self) -> String {
        match self {
            DeviceSpec::Path(p) => format!("device {}", p.display()),
            DeviceSpec::Label(l) => format!("a filesystem labelled {l:?}"),
            DeviceSpec::Ebs(v) => format!("EBS volume {v}"),
        }
    }
}

/// The `/dev` and `/sys` in which devices are looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoots {
    /// `/dev`: for `disk/by-label/`, `disk/by-id/` and NVMe namespaces.
    pub dev: PathBuf,
    /// `/sys`: for `class/nvme/*/serial`.
    pub sys: PathBuf,
    /// Also ask `blkid` for labels (it probes the real devices, whatever
    /// `dev` says; a test that fakes `dev` turns this off).
    pub blkid: bool,
}

impl Default for HostRoots {
    fn default() -> HostRoots {
        HostRoots {
            dev: PathBuf::from("/dev"),
            sys: PathBuf::from("/sys"),
            blkid: true,
        }
    }
}

/// The filesystems a seed volume can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    fn from_name(name: &str) -> Option<FsType> {
        match name {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything `mount` needs; [`MountOptions::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub device: DeviceSpec,
    /// The mount point; created if missing.
    pub target: PathBuf,
    /// Grow the filesystem to the device's size after mounting.
    pub grow: bool,
    /// How long to wait for the device to appear.
    pub wait: Duration,
    /// The digest `.coral/manifest.json` must have.
    pub expect: Option<Digest>,
    pub read_only: bool,
    pub roots: HostRoots,
    /// Carry what the target directory held (the machine image's containerd
    /// state: the pause image and whatever else it pre-cached) over onto the
    /// volume, instead of hiding it under the mount. The value is a
    /// directory where the old content is kept reachable (a bind mount)
    /// until it is copied; a run killed half-way finishes from there.
    pub carry_over: Option<PathBuf>,
}

/// Where `mount` keeps a target's old content reachable while carrying it over.
pub const DEFAULT_CARRY_DIR: &str = "/run/coral/carry-over";

impl MountOptions {
    pub fn new(device: DeviceSpec, target: impl Into<PathBuf>) -> MountOptions {
        MountOptions {
            device,
            target: target.into(),
            grow: false,
            wait: DEFAULT_WAIT,
            expect: None,
            read_only: false,
            roots: HostRoots::default(),
            carry_over: Some(PathBuf::from(DEFAULT_CARRY_DIR)),
        }
    }
}

/// A mounted seed volume: what [`mount`] returns, and (as camelCase JSON)
/// what `mount --json` prints.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mounted {
    /// The block device mounted (a loop device for an image file).
    pub device: PathBuf,
    /// The image file behind the loop device, when the device was a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_file: Option<PathBuf>,
    /// The mount point, canonical.
    pub target: PathBuf,
    pub fs: FsType,
    pub read_only: bool,
    /// The volume was mounted there already (an earlier run): left as it was.
    pub already_mounted: bool,
    /// This run attached the loop device.
    pub loop_attached: bool,
    /// The device's size in bytes.
    pub device_size: u64,
    /// The filesystem's size as `df` shows it (statvfs blocks × fragment
    /// size), before and after `--grow`; equal without it.
    pub size_before: u64,
    pub size_after: u64,
    pub grown: bool,
    /// SHA-256 of `.coral/manifest.json` as it is on the volume.
    pub manifest_digest: Digest,
    pub format_version: String,
    pub build_id: String,
    pub seed_key: Digest,
    /// Number of images in the manifest.
    pub images: usize,
    /// What the target held before and was copied onto the volume (names
    /// of the entries of its top directory).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub carried_over: Vec<String>,
    /// Entries the target held that the volume already had: the volume's
    /// were kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub carry_skipped: Vec<String>,
    /// Bytes of file data carried over.
    pub carried_bytes: u64,
    /// Wall time of the whole step, waiting included.
    pub seconds: f64,
    /// The parsed manifest, for whatever runs next.
    #[serde(skip)]
    pub manifest: SeedManifest,
}

impl Mounted {
    /// One line for a person.
    pub fn summary(&self) -> String {
        let what = if self.already_mounted {
            "already mounted"
        } else {
            "mounted"
        };
        let mut s = format!(
            "{what} {}{} ({}{}) at {}: seed {} with {} image{}, manifest {}",
            self.device.display(),
            self.image_file
                .as_ref()
                .map(|f| format!(" [{}]", f.display()))
                .unwrap_or_default(),
            self.fs,
            if self.read_only { ", read-only" } else { "" },
            self.target.display(),
            self.seed_key,
            self.images,
            if self.images == 1 { "" } else { "s" },
            self.manifest_digest,
        );
        if !self.carried_over.is_empty() {
            s.push_str(&format!(
                ", carried over {} ({})",
                self.carried_over.join(" "),
                human(self.carried_bytes)
            ));
        }
        if self.grown {
            s.push_str(&format!(
                ", grown from {} to {}",
                human(self.size_before),
                human(self.size_after)
            ));
        } else {
            s.push_str(&format!(", {}", human(self.size_after)));
        }
        s.push_str(&format!(" ({:.2} s)", self.seconds));
        s
    }
}

// ---------------------------------------------------------------------------
// Errors

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Options that contradict each other or make no sense.
    #[error("{0}")]
    Usage(String),
    #[error("timed out after {} waiting for {wanted}: {why}", show_duration(*waited))]
    DeviceTimeout {
        wanted: String,
        waited: Duration,
        why: String,
    },
    /// A device that was found but cannot be used as it is.
    #[error("{0}")]
    Device(String),
    #[error("{what} {}: {err}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        err: io::Error,
    },
    #[error("{tool} ({what}) failed: {detail}")]
    Tool {
        tool: &'static str,
        what: String,
        detail: String,
    },
    #[error(
        "{} holds no filesystem that blkid recognises (a partitioned disk? a seed volume is a \
         bare ext4 or xfs filesystem)",
        device.display()
    )]
    NoFilesystem { device: PathBuf },
    #[error("{} holds a {found} filesystem; a seed volume is ext4 or xfs", device.display())]
    UnsupportedFs { device: PathBuf, found: String },
    #[error(
        "{} already has {mounted} ({fstype}) mounted on it, not {}: refusing to mount over it",
        target.display(), device.display()
    )]
    TargetBusy {
        target: PathBuf,
        mounted: String,
        fstype: String,
        device: PathBuf,
    },
    #[error("mounting {} ({fs}) at {}: {err}", device.display(), target.display())]
    Mount {
        device: PathBuf,
        target: PathBuf,
        fs: FsType,
        err: io::Error,
    },
    #[error(
        "{} (from {}) has no seed manifest at {}: it is not a coral seed volume",
        target.display(), device.display(), path.display()
    )]
    NoManifest {
        device: PathBuf,
        target: PathBuf,
        path: PathBuf,
    },
    #[error("{}: {err}", path.display())]
    Manifest { path: PathBuf, err: ManifestError },
    #[error(
        "seed manifest {} has digest {found}, but {expected} was expected: this is not the seed \
         volume that was asked for",
        path.display()
    )]
    DigestMismatch {
        path: PathBuf,
        found: Digest,
        expected: Digest,
    },
    /// The filesystem cannot be grown here.
    #[error("{0}")]
    Grow(String),
    #[error("{error}; cleaning up also failed: {cleanup}")]
    Cleanup {
        error: Box<MountError>,
        cleanup: String,
    },
}

fn io_err(what: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> MountError {
    let what = what.into();
    let path = path.to_path_buf();
    move |err| MountError::Io { what, path, err }
}

// ---------------------------------------------------------------------------
// The whole step

/// Finds, mounts, checks and (with `grow`) grows the seed volume. On error,
/// nothing this call mounted or attached is left behind.
pub fn mount(opts: &MountOptions) -> Result<Mounted, MountError> {
    let started = Instant::now();
    if opts.grow && opts.read_only {
        return Err(MountError::Usage(
            "--grow needs a writable mount: drop --read-only or --grow".into(),
        ));
    }
    fs::create_dir_all(&opts.target).map_err(io_err("creating the mount point", &opts.target))?;
    let target = fs::canonicalize(&opts.target)
        .map_err(io_err("resolving the mount point", &opts.target))?;
    if !target.is_dir() {
        return Err(MountError::Usage(format!(
            "the target {} is not a directory",
            target.display()
        )));
    }
    let Some(parent) = target.parent() else {
        return Err(MountError::Usage("refusing to mount over /".into()));
    };
    let _lock = lock_dir(parent)?;

    let found = wait_for_device(&opts.device, &opts.roots, opts.wait, Some(&target))?;
    let target_free = mount_at(&target)?.is_none();
    if target_free && !opts.read_only && containerd_holds(&target) {
        return Err(MountError::Usage(format!(
            "containerd is running on {} (its metadata database is locked): the volume must be \
             mounted there before containerd starts; mount it elsewhere and use \
             `import --mode copy` instead",
            target.display()
        )));
    }
    // Carrying over: the volume is mounted at a staging point first, filled
    // with what the target holds, and only then moved onto the target, so
    // the target never shows a half-carried volume (a run killed half-way
    // leaves the old content in place and the volume at the staging point,
    // where the next run finishes).
    let staging = match &opts.carry_over {
        Some(dir) if target_free && !opts.read_only => {
            let at = carry_dir(dir, &target);
            if mount_at(&at)?.is_some() || worth_carrying(&target)? {
                private_dir(dir)?;
                fs::create_dir_all(&at).map_err(io_err("creating", &at))?;
                Some(at)
            } else {
                None
            }
        }
        _ => None,
    };
    let state = attach_and_mount(opts, found, staging.as_deref().unwrap_or(&target))?;
    // Bound in this order so that, on a panic, the mount is undone before
    // the loop device under it.
    let Attached {
        device,
        image_file,
        fs,
        read_only,
        mut loop_guard,
        mut mount_guard,
    } = state;

    let mounted_at = staging.clone().unwrap_or_else(|| target.clone());
    let checked = check_and_grow(opts, &device, &mounted_at, fs).and_then(|c| {
        let carried = match &staging {
            Some(at) => {
                let carried = carry_over(&target, at)?;
                rustix::mount::mount_move(at, &target).map_err(|e| MountError::Io {
                    what: format!("moving the volume from {} onto", at.display()),
                    path: target.clone(),
                    err: e.into(),
                })?;
                if let Some(g) = mount_guard.as_mut() {
                    g.target = target.clone();
                }
                let _ = fs::remove_dir(at);
                tracing::info!(target = %target.display(), "moved the volume into place");
                carried
            }
            None => Carried::default(),
        };
        Ok((c, carried))
    });
    match checked {
        Ok((c, carried)) => {
            let loop_attached = loop_guard.is_some();
            if let Some(g) = mount_guard.as_mut() {
                g.keep();
            }
            if let Some(g) = loop_guard.take() {
                g.keep();
            }
            Ok(Mounted {
                device,
                image_file,
                target,
                fs,
                read_only,
                already_mounted: mount_guard.is_none(),
                loop_attached,
                device_size: c.device_size,
                size_before: c.size_before,
                size_after: c.size_after,
                grown: c.size_after > c.size_before,
                manifest_digest: c.digest,
                format_version: c.manifest.format_version.to_string(),
                build_id: c.manifest.build_id.clone(),
                seed_key: c.manifest.seed_key.clone(),
                images: c.manifest.images.len(),
                carried_over: carried.names,
                carry_skipped: carried.skipped,
                carried_bytes: carried.bytes,
                seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
                manifest: c.manifest,
            })
        }
        Err(error) => {
            let mut problems = Vec::new();
            if let Some(g) = mount_guard.as_mut()
                && let Err(e) = g.undo()
            {
                problems.push(e);
            }
            if let Some(g) = loop_guard.as_mut()
                && let Err(e) = g.undo()
            {
                problems.push(e);
            }

            if mount_guard.is_none() {
                tracing::warn!(
                    target = %target.display(),
                    "the volume was mounted before this run, so it stays mounted"
                );
            }
            if problems.is_empty() {
                Err(error)
            } else {
                Err(MountError::Cleanup {
                    error: Box::new(error),
                    cleanup: problems.join("; "),
                })
            }
        }
    }
}

/// Unmounts a volume that [`mount`] mounted, and detaches the loop device
/// behind it if it was an image file (the kernel does that on its own for
/// loop devices `mount` attached; this also covers older ones).
pub fn unmount(mounted: &Mounted) -> Result<(), MountError> {
    rustix::mount::unmount(&mounted.target, rustix::mount::UnmountFlags::empty()).map_err(|e| {
        MountError::Io {
            what: "unmounting".into(),
            path: mounted.target.clone(),
            err: e.into(),
        }
    })?;
    if let Some(file) = &mounted.image_file {
        for l in loops_backed_by(file)? {
            if l.device == mounted.device
                && let Err(e) = detach_loop(&l.device)
            {
                // Autoclear may have freed it meanwhile.
                if loops_backed_by(file)?
                    .iter()
                    .any(|l| l.device == mounted.device)
                {
                    return Err(MountError::Device(e));
                }
            }
        }
    }
    Ok(())
}

struct Attached {
    device: PathBuf,
    image_file: Option<PathBuf>,
    fs: FsType,
    read_only: bool,
    /// Set when this run mounted the volume.
    mount_guard: Option<MountGuard>,
    /// Set when this run attached the loop device.
    loop_guard: Option<LoopGuard>,
}

/// Mounts the device at the target, or recognises it as mounted there.
fn attach_and_mount(
    opts: &MountOptions,
    found: Found,
    target: &Path,
) -> Result<Attached, MountError> {
    let current = mount_at(target)?;
    let (device, image_file, loop_guard) = match found {
        Found::BlockDevice(device) => {
            let dev = dev_numbers(&device)?;
            if let Some(m) = &current {
                return if m.dev == dev && m.root == Path::new("/") {
                    already_mounted(opts, m, device, None)
                } else {
                    Err(busy(target, m, &device))
                };
            }
            (device, None, None)
        }
        Found::ImageFile(file) => {
            let loops = loops_backed_by(&file)?;
            if let Some(m) = &current {
                return match loops.iter().find(|l| l.dev == m.dev) {
                    Some(l) if m.root == Path::new("/") => {
                        already_mounted(opts, m, l.device.clone(), Some(file))
                    }
                    _ => Err(busy(target, m, &file)),
                };
            }
            // The same image through a second loop device is a second,
            // independent writer of one filesystem: corruption.
            let mounts = read_mountinfo()?;
            for l in &loops {
                if let Some(m) = mounts.iter().find(|m| m.dev == l.dev) {
                    return Err(MountError::Device(format!(
                        "{} is already mounted at {} through {}: unmount it first (a second \
                         loop device on the same image would corrupt it)",
                        file.display(),
                        m.mount_point.display(),
                        l.device.display()
                    )));
                }
            }
            let guard = LoopGuard::attach(&file, opts.read_only)?;
            (guard.device.clone(), Some(file), Some(guard))
        }
    };
    // From here on, an error drops `loop_guard`, which detaches.
    let fs = probe_fs(&device)?;
    let mut flags = rustix::mount::MountFlags::NOATIME;
    if opts.read_only {
        // Read-only is a copy-mode source: only the mounter reads it, and
        // it never runs, opens as devices or trusts setuid bits of what is
        // there (device nodes are copied by their metadata).
        use rustix::mount::MountFlags as F;
        flags |= F::RDONLY | F::NOSUID | F::NODEV | F::NOEXEC;
    }
    rustix::mount::mount(&device, target, fs.as_str(), flags, None::<&CStr>).map_err(|e| {
        MountError::Mount {
            device: device.clone(),
            target: target.to_path_buf(),
            fs,
            err: e.into(),
        }
    })?;
    tracing::info!(device = %device.display(), target = %target.display(), %fs, "mounted");
    Ok(Attached {
        device,
        image_file,
        fs,
        read_only: opts.read_only,
        mount_guard: Some(MountGuard {
            target: target.to_path_buf(),
            armed: true,
        }),
        loop_guard,
    })
}

fn already_mounted(
    opts: &MountOptions,
    m: &MountEntry,
    device: PathBuf,
    image_file: Option<PathBuf>,
) -> Result<Attached, MountError> {
    let Some(fs) = FsType::from_name(&m.fstype) else {
        return Err(MountError::UnsupportedFs {
            device,
            found: m.fstype.clone(),
        });
    };
    let read_only = m.options.split(',').any(|o| o == "ro");
    if read_only && !opts.read_only {
        return Err(MountError::Device(format!(
            "{} is already mounted read-only at {}, but a writable mount was asked for: \
             unmount it first, or pass --read-only",
            device.display(),
            m.mount_point.display()
        )));
    }
    tracing::info!(device = %device.display(), target = %m.mount_point.display(), "already mounted");
    Ok(Attached {
        device,
        image_file,
        fs,
        read_only,
        mount_guard: None,
        loop_guard: None,
    })
}

fn busy(target: &Path, m: &MountEntry, device: &Path) -> MountError {
    MountError::TargetBusy {
        target: target.to_path_buf(),
        mounted: m.source.clone(),
        fstype: m.fstype.clone(),
        device: device.to_path_buf(),
    }
}

struct Checked {
    device_size: u64,
    size_before: u64,
    size_after: u64,
    digest: Digest,
    manifest: SeedManifest,
}

/// The manifest first (a wrong volume is not grown), then the size.
fn check_and_grow(
    opts: &MountOptions,
    device: &Path,
    target: &Path,
    fs: FsType,
) -> Result<Checked, MountError> {
    let (digest, manifest) = check_manifest(device, target, opts.expect.as_ref())?;
    let device_size = block_device_size(device)?;
    let size_before = fs_size(target)?;
    let mut size_after = size_before;
    if opts.grow {
        let current = superblock_size(device, fs)?;
        if device_size > current {
            grow(device, target, fs)?;
            size_after = fs_size(target)?;
            tracing::info!(
                device = %device.display(),
                before = size_before,
                after = size_after,
                "grew the filesystem"
            );
        } else {
            tracing::info!(
                device = %device.display(),
                "the filesystem already fills the device"
            );
        }
    }
    Ok(Checked {
        device_size,
        size_before,
        size_after,
        digest,
        manifest,
    })
}

/// Reads `.coral/manifest.json`: its digest against `expect`, then its
/// format and consistency.
fn check_manifest(
    device: &Path,
    target: &Path,
    expect: Option<&Digest>,
) -> Result<(Digest, SeedManifest), MountError> {
    let path = SeedLayout::new(target).manifest();
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::NoManifest {
                device: device.to_path_buf(),
                target: target.to_path_buf(),
                path,
            });
        }
        Err(e) => return Err(io_err("opening the seed manifest", &path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading the seed manifest", &path))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(MountError::Device(format!(
            "seed manifest {} is larger than {}: refusing to read it",
            path.display(),
            human(MAX_MANIFEST_BYTES)
        )));
    }
    let digest = Digest::sha256_of(&bytes);
    if let Some(expected) = expect
        && !expected.verifies(&bytes)
    {
        return Err(MountError::DigestMismatch {
            path,
            found: digest,
            expected: expected.clone(),
        });
    }
    let manifest = SeedManifest::from_json(&bytes).map_err(|err| MountError::Manifest {
        path: path.clone(),
        err,
    })?;
    Ok((digest, manifest))
}

// ---------------------------------------------------------------------------
// Finding the device

/// What a [`DeviceSpec`] led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A block device (canonical path).
    BlockDevice(PathBuf),
    /// A regular file to attach to a loop device (canonical path).
    ImageFile(PathBuf),
}

enum Lookup {
    Found(Found),
    /// Not there (yet): what was looked at, for the timeout message.
    Missing(String),
}

/// Waits up to `wait` for the device to appear (at least one look is taken).
pub fn find_device(
    spec: &DeviceSpec,
    roots: &HostRoots,
    wait: Duration,
) -> Result<Found, MountError> {
    wait_for_device(spec, roots, wait, None)
}

fn wait_for_device(
    spec: &DeviceSpec,
    roots: &HostRoots,
    wait: Duration,
    target: Option<&Path>,
) -> Result<Found, MountError> {
    let deadline = Instant::now() + wait;
    let mut logged = false;
    loop {
        match lookup(spec, roots, target)? {
            Lookup::Found(found) => return Ok(found),
            Lookup::Missing(why) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(MountError::DeviceTimeout {
                        wanted: spec.describe(),
                        waited: wait,
                        why,
                    });
                }
                if !logged {
                    tracing::info!(
                        "waiting up to {} for {}: {why}",
                        show_duration(wait),
                        spec.describe()
                    );
                    logged = true;
                }
                std::thread::sleep(POLL_INTERVAL.min(deadline - now));
            }
        }
    }
}

fn lookup(
    spec: &DeviceSpec,
    roots: &HostRoots,
    target: Option<&Path>,
) -> Result<Lookup, MountError> {
    match spec {
        DeviceSpec::Path(p) => lookup_path(p),
        DeviceSpec::Label(label) => lookup_label(label, roots, target),
        DeviceSpec::Ebs(vol) => lookup_ebs(vol, roots),
    }
}

fn lookup_path(path: &Path) -> Result<Lookup, MountError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Lookup::Missing(format!(
                "{} does not exist",
                path.display()
            )));
        }
        Err(e) => return Err(io_err("looking at", path)(e)),
    };
    let canonical = fs::canonicalize(path).map_err(io_err("resolving", path))?;
    if meta.file_type().is_block_device() {
        Ok(Lookup::Found(Found::BlockDevice(canonical)))
    } else if meta.is_file() {
        Ok(Lookup::Found(Found::ImageFile(canonical)))
    } else {
        Err(MountError::Device(format!(
            "{} is neither a block device nor a filesystem image file",
            path.display()
        )))
    }
}

/// A path found through a link or a tool must be a block device.
fn block_device(path: &Path, via: &str) -> Result<PathBuf, MountError> {
    let canonical = fs::canonicalize(path).map_err(io_err("resolving", path))?;
    let meta = fs::metadata(&canonical).map_err(io_err("looking at", &canonical))?;
    if !meta.file_type().is_block_device() {
        return Err(MountError::Device(format!(
            "{via} leads to {}, which is not a block device",
            canonical.display()
        )));
    }
    Ok(canonical)
}

fn lookup_label(
    label: &str,
    roots: &HostRoots,
    target: Option<&Path>,
) -> Result<Lookup, MountError> {
    let link = roots
        .dev
        .join("disk/by-label")
        .join(udev_encode(label.as_bytes()));
    let mut candidates = Vec::new();
    if fs::symlink_metadata(&link).is_ok() && fs::metadata(&link).is_ok() {
        candidates.push(block_device(&link, &link.display().to_string())?);
    }
    let mut looked = format!("looked at {}", link.display());
    if roots.blkid {
        match blkid_by_label(label)? {
            Some(devices) => {
                for d in devices {
                    candidates.push(block_device(&d, &format!("blkid LABEL={label}"))?);
                }
                looked.push_str(" and asked blkid");
            }
            None => looked.push_str(" (blkid is not installed)"),
        }
    }
    candidates.sort();
    candidates.dedup();
    match candidates.len() {
        0 => Ok(Lookup::Missing(format!(
            "no filesystem labelled {label:?} ({looked})"
        ))),
        1 => Ok(Lookup::Found(Found::BlockDevice(candidates.remove(0)))),
        _ => {
            // A re-run after a successful mount picks the one it mounted.
            if let Some(m) = target.map(mount_at).transpose()?.flatten() {
                for c in &candidates {
                    if dev_numbers(c)? == m.dev {
                        return Ok(Lookup::Found(Found::BlockDevice(c.clone())));
                    }
                }
            }
            let names: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
            Err(MountError::Device(format!(
                "several devices have the filesystem label {label:?}: {}; name one with \
                 --device PATH or ebs:vol-…",
                names.join(", ")
            )))
        }
    }
}

/// `blkid -t LABEL=… -o device`, bypassing blkid's cache; `None` when
/// blkid is not installed.
fn blkid_by_label(label: &str) -> Result<Option<Vec<PathBuf>>, MountError> {
    let Ok(blkid) = find_tool("blkid") else {
        return Ok(None);
    };
    let out = tool_output(
        &blkid,
        "blkid",
        "finding a filesystem by label",
        [
            OsStr::new("-c"),
            OsStr::new("/dev/null"),
            OsStr::new("-t"),
            &OsString::from(format!("LABEL={label}")),
            OsStr::new("-o"),
            OsStr::new("device"),
        ],
    )?;
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect(),
        )),
        // 2: nothing matched.
        Some(2) => Ok(Some(Vec::new())),
        _ => Err(MountError::Tool {
            tool: "blkid",
            what: format!("finding the filesystem labelled {label:?}"),
            detail: format!("{}: {}", out.status, output_tail(&out)),
        }),
    }
}

/// udev's encoding of a label in a `/dev/disk/by-label/` name: bytes other
/// than ASCII alphanumerics, `#+-.:=@_` and valid UTF-8 beyond ASCII become
/// `\xHH`.
fn udev_encode(raw: &[u8]) -> OsString {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b.is_ascii_alphanumeric() || b"#+-.:=@_".contains(&b) {
            out.push(b);
            i += 1;
            continue;
        }
        if b >= 0x80 {
            let len = match b {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf4 => 4,
                _ => 0,
            };
            if len > 0 && i + len <= raw.len() && std::str::from_utf8(&raw[i..i + len]).is_ok() {
                out.extend_from_slice(&raw[i..i + len]);
                i += len;
                continue;
            }
        }
        out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        i += 1;
    }
    OsString::from_vec(out)
}

fn lookup_ebs(vol: &str, roots: &HostRoots) -> Result<Lookup, MountError> {
    let serial = vol.replacen('-', "", 1);
    let class = roots.sys.join("class/nvme");
    let mut notes = Vec::new();
    // The kernel's view first: it needs no udev.
    if let Ok(entries) = fs::read_dir(&class) {
        let mut controllers: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        controllers.sort();
        for ctrl in controllers {
            let Ok(s) = fs::read_to_string(ctrl.join("serial")) else {
                continue;
            };
            if s.trim() != serial {
                continue;
            }
            let name = ctrl
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let mut namespaces: Vec<String> = fs::read_dir(&ctrl)
                .map_err(io_err("listing", &ctrl))?
                .flatten()
                .filter_map(|e| nvme_block_name(&e.file_name().to_string_lossy()))
                .collect();
            namespaces.sort();
            namespaces.dedup();
            for ns in &namespaces {
                let dev = roots.dev.join(ns);
                if fs::metadata(&dev).is_ok() {
                    let via = format!("NVMe controller {name} (serial {serial})");
                    return Ok(Lookup::Found(Found::BlockDevice(block_device(&dev, &via)?)));
                }
            }
            notes.push(if namespaces.is_empty() {
                format!("controller {name} has the serial but no namespace yet")
            } else {
                format!(
                    "controller {name} has the serial but {} does not exist yet",
                    roots.dev.join(&namespaces[0]).display()
                )
            });
        }
    }
    // udev's link, for when sysfs is not where it is expected.
    let by_id = roots.dev.join("disk/by-id");
    let want = format!("{EBS_BY_ID_PREFIX}{serial}");
    if let Ok(entries) = fs::read_dir(&by_id) {
        let mut links: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                let rest = n.strip_prefix(&want)?;
                // `…vol0123` or `…vol0123_1` (namespace), never `-part1`.
                (rest.is_empty()
                    || rest
                        .strip_prefix('_')
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())))
                .then(|| (n, e.path()))
            })
            .collect();
        links.sort();
        for (_, link) in links {
            if fs::metadata(&link).is_ok() {
                let via = link.display().to_string();
                return Ok(Lookup::Found(Found::BlockDevice(block_device(
                    &link, &via,
                )?)));
            }
        }
    }
    let mut why = format!(
        "no NVMe device with serial {serial} (looked in {}/*/serial and for {})",
        class.display(),
        by_id.join(&want).display()
    );
    for n in notes {
        why.push_str("; ");
        why.push_str(&n);
    }
    Ok(Lookup::Missing(why))
}

/// The block device of an NVMe namespace entry in a controller's sysfs
/// directory: `nvme1n1` is itself; with native multipath the entry is the
/// hidden path `nvme<subsys>c<ctrl>n<ns>`, whose device is `nvme<subsys>n<ns>`.
fn nvme_block_name(entry: &str) -> Option<String> {
    fn digits(s: &str) -> Option<(&str, &str)> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        (end > 0).then(|| s.split_at(end))
    }
    let rest = entry.strip_prefix("nvme")?;
    let (subsys, rest) = digits(rest)?;
    let rest = match rest.strip_prefix('c') {
        Some(r) => digits(r)?.1,
        None => rest,
    };
    let (ns, rest) = digits(rest.strip_prefix('n')?)?;
    rest.is_empty().then(|| format!("nvme{subsys}n{ns}"))
}

// ---------------------------------------------------------------------------
// Kernel state: mounts, loop devices, sizes

#[derive(Clone, Debug, PartialEq, Eq)]
struct MountEntry {
    /// major:minor of the mounted filesystem's device.
    dev: (u32, u32),
    /// The directory of the filesystem that is mounted (`/` unless a bind).
    root: PathBuf,
    mount_point: PathBuf,
    /// Per-mount options (`rw,noatime`).
    options: String,
    fstype: String,
    source: String,
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as
/// three octal digits.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    if sep < 6 || fields.len() < sep + 3 {
        return None;
    }
    let (major, minor) = fields[2].split_once(':')?;
    Some(MountEntry {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        root: PathBuf::from(OsString::from_vec(unescape_mountinfo(fields[3]))),
        mount_point: PathBuf::from(OsString::from_vec(unescape_mountinfo(fields[4]))),
        options: fields[5].to_owned(),
        fstype: fields[sep + 1].to_owned(),
        source: String::from_utf8_lossy(&unescape_mountinfo(fields[sep + 2])).into_owned(),
    })
}

fn read_mountinfo() -> Result<Vec<MountEntry>, MountError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// The topmost mount at `target`, if it is a mount point.
fn mount_at(target: &Path) -> Result<Option<MountEntry>, MountError> {
    Ok(read_mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == target))
}

fn dev_numbers(device: &Path) -> Result<(u32, u32), MountError> {
    let rdev = fs::metadata(device)
        .map_err(io_err("looking at", device))?
        .rdev();
    Ok((rustix::fs::major(rdev), rustix::fs::minor(rdev)))
}

struct LoopDevice {
    device: PathBuf,
    dev: (u32, u32),
}

/// Loop devices whose backing file is `file` (canonical).
fn loops_backed_by(file: &Path) -> Result<Vec<LoopDevice>, MountError> {
    let sys = Path::new("/sys/block");
    let mut found = Vec::new();
    for entry in fs::read_dir(sys).map_err(io_err("listing", sys))?.flatten() {
        let name = entry.file_name();
        if !name.as_bytes().starts_with(b"loop") {
            continue;
        }
        let Ok(backing) = fs::read(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if backing.strip_suffix(b"\n").unwrap_or(&backing) != file.as_os_str().as_bytes() {
            continue;
        }
        let Ok(dev) = fs::read_to_string(entry.path().join("dev")) else {
            continue;
        };
        let Some((major, minor)) = dev.trim().split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse(), minor.parse()) else {
            continue;
        };
        found.push(LoopDevice {
            device: Path::new("/dev").join(&name),
            dev: (major, minor),
        });
    }
    Ok(found)
}

fn block_device_size(device: &Path) -> Result<u64, MountError> {
    File::open(device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(io_err("measuring", device))
}

/// The filesystem's size as `df` shows it.
fn fs_size(target: &Path) -> Result<u64, MountError> {
    let st = rustix::fs::statvfs(target).map_err(|e| MountError::Io {
        what: "statvfs".into(),
        path: target.to_path_buf(),
        err: e.into(),
    })?;
    Ok(st.f_blocks.saturating_mul(st.f_frsize))
}

/// The filesystem's own idea of its size (blocks × block size), from its
/// superblock: what growing compares with the device's size.
fn superblock_size(device: &Path, fs: FsType) -> Result<u64, MountError> {
    let bad = |what: &str| {
        MountError::Device(format!(
            "{}: {what} (is the {fs} superblock damaged?)",
            device.display()
        ))
    };
    match fs {
        FsType::Ext4 => {
            // Buffered: the mounted ext4 keeps its superblock in the block
            // device's page cache, so this sees its latest size.
            let f = File::open(device).map_err(io_err("opening", device))?;
            let mut sb = [0u8; 1024];
            f.read_exact_at(&mut sb, 1024)
                .map_err(io_err("reading the superblock of", device))?;
            let le32 = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()) as u64;
            if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
                return Err(bad("no ext4 superblock magic"));
            }
            let log = le32(0x18);
            if log > 6 {
                return Err(bad("impossible block size"));
            }
            let mut blocks = le32(0x04);
            const INCOMPAT_64BIT: u64 = 0x80;
            if le32(0x60) & INCOMPAT_64BIT != 0 {
                blocks |= le32(0x150) << 32;
            }
            Ok(blocks.saturating_mul(1024 << log))
        }
        FsType::Xfs => {
            // xfs caches metadata in its own buffers, not the block device's
            // page cache: read past that cache. (The on-disk superblock may
            // still lag a grow that is seconds old; then `xfs_growfs` runs
            // again and changes nothing.)
            let head =
                read_direct(device, 4096).map_err(io_err("reading the superblock of", device))?;
            if &head[0..4] != b"XFSB" {
                return Err(bad("no xfs superblock magic"));
            }
            let block = u32::from_be_bytes(head[4..8].try_into().unwrap()) as u64;
            let blocks = u64::from_be_bytes(head[8..16].try_into().unwrap());
            Ok(blocks.saturating_mul(block))
        }
    }
}

/// The first `len` bytes of a device, read with O_DIRECT when the device
/// allows it (`len` a multiple of 4096).
fn read_direct(device: &Path, len: usize) -> io::Result<Vec<u8>> {
    const ALIGN: usize = 4096;
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
    {
        Ok(f) => {
            let mut buf = vec![0u8; len + ALIGN];
            let off = buf.as_ptr().align_offset(ALIGN);
            let slice = &mut buf[off..off + len];
            match f.read_exact_at(slice, 0) {
                Ok(()) => return Ok(slice.to_vec()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; len];
    File::open(device)?.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

fn grow(device: &Path, target: &Path, fs: FsType) -> Result<(), MountError> {
    // The kernel refuses an online ext4 resize without CAP_SYS_RESOURCE
    // (resize2fs then only says "Permission denied"); xfs needs
    // CAP_SYS_ADMIN, which mounting needed anyway.
    if fs == FsType::Ext4 && !can_grow_ext4_online() {
        return Err(MountError::Grow(format!(
            "growing the ext4 filesystem on {} online needs the CAP_SYS_RESOURCE capability, \
             which this process lacks (in a container, run it privileged or add SYS_RESOURCE); \
             or mount without --grow",
            device.display()
        )));
    }
    let (tool, arg) = match fs {
        FsType::Ext4 => ("resize2fs", device),
        FsType::Xfs => ("xfs_growfs", target),
    };
    let path = find_tool(tool)?;
    let what = format!("growing the {fs} filesystem on {}", device.display());
    let out = tool_output(&path, tool, &what, [arg.as_os_str()])?;
    if !out.status.success() {
        return Err(MountError::Tool {
            tool,
            what,
            detail: format!("{}: {}", out.status, output_tail(&out)),
        });
    }
    Ok(())
}

/// Whether this process may resize a mounted ext4 filesystem: it holds
/// CAP_SYS_RESOURCE (assumed when `/proc/self/status` cannot tell).
pub fn can_grow_ext4_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return true;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_none_or(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The filesystem type `blkid -p` finds on the device: ext4 or xfs.
fn probe_fs(device: &Path) -> Result<FsType, MountError> {
    let blkid = find_tool("blkid")?;
    let out = tool_output(
        &blkid,
        "blkid",
        "detecting the filesystem",
        [
            OsStr::new("-p"),
            OsStr::new("-s"),
            OsStr::new("TYPE"),
            OsStr::new("-o"),
            OsStr::new("value"),
            device.as_os_str(),
        ],
    )?;
    match out.status.code() {
        Some(0) => {}
        Some(2) => {
            return Err(MountError::NoFilesystem {
                device: device.to_path_buf(),
            });
        }
        _ => {
            return Err(MountError::Tool {
                tool: "blkid",
                what: format!("detecting the filesystem on {}", device.display()),
                detail: format!("{}: {}", out.status, output_tail(&out)),
            });
        }
    }
    let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if found.is_empty() {
        return Err(MountError::NoFilesystem {
            device: device.to_path_buf(),
        });
    }
    FsType::from_name(&found).ok_or_else(|| MountError::UnsupportedFs {
        device: device.to_path_buf(),
        found,
    })
}

// ---------------------------------------------------------------------------
// Carrying over what the target held

/// Entries of a target directory that are never carried over.
const NOT_CARRIED: &[&str] = &["lost+found", ".coral"];

/// The carry-over directory for one target.
fn carry_dir(dir: &Path, target: &Path) -> PathBuf {
    // `-` doubled first, so /a-b and /a/b get different names.
    let name = target
        .to_string_lossy()
        .trim_matches('/')
        .replace('-', "--")
        .replace('/', "-");
    dir.join(if name.is_empty() { "root".into() } else { name })
}

/// Whether `target` holds anything to carry over.
fn worth_carrying(target: &Path) -> Result<bool, MountError> {
    let mut entries = fs::read_dir(target).map_err(io_err("listing", target))?;
    Ok(entries.any(|e| {
        e.map(|e| !NOT_CARRIED.contains(&e.file_name().to_string_lossy().as_ref()))
            .unwrap_or(true)
    }))
}

/// Makes `dir` a private mount (a bind of itself), so that a volume mounted
/// below it can be moved (MS_MOVE refuses a mount whose parent is shared)
/// and nothing mounted there propagates elsewhere.
fn private_dir(dir: &Path) -> Result<(), MountError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let dir = fs::canonicalize(dir).map_err(io_err("resolving", dir))?;
    let fail = |what: &str| {
        let what = what.to_string();
        let dir = dir.clone();
        move |e: rustix::io::Errno| MountError::Io {
            what,
            path: dir,
            err: e.into(),
        }
    };
    if mount_at(&dir)?.is_none() {
        rustix::mount::mount_bind(&dir, &dir).map_err(fail("binding onto itself"))?;
    }
    rustix::mount::mount_change(&dir, rustix::mount::MountPropagationFlags::PRIVATE)
        .map_err(fail("making private"))
}

/// Whether a containerd has its metadata database under `root` open (bbolt
/// holds an exclusive flock on it while open).
pub fn containerd_holds(root: &Path) -> bool {
    let db = root.join("io.containerd.metadata.v1.bolt/meta.db");
    let Ok(f) = File::open(&db) else {
        return false;
    };
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = rustix::fs::flock(&f, rustix::fs::FlockOperation::Unlock);
            false
        }
        Err(e) => e == rustix::io::Errno::WOULDBLOCK,
    }
}

#[derive(Default)]
struct Carried {
    names: Vec<String>,
    skipped: Vec<String>,
    bytes: u64,
}

/// Copies each entry of `from` that `volume` lacks onto it, exactly, under
/// a scratch name first and renamed when complete.
fn carry_over(from: &Path, volume: &Path) -> Result<Carried, MountError> {
    let mut carried = Carried::default();
    let mut names: Vec<_> = fs::read_dir(from)
        .map_err(io_err("listing", from))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io_err("listing", from))?;
    names.sort();
    for name in names {
        let shown = name.to_string_lossy().into_owned();
        if NOT_CARRIED.contains(&shown.as_str()) {
            continue;
        }
        let dest = volume.join(&name);
        if fs::symlink_metadata(&dest).is_ok() {
            tracing::warn!(entry = %shown, "the volume already has it: kept the volume's");
            carried.skipped.push(shown);
            continue;
        }
        let mut scratch = std::ffi::OsString::from(".coral-carry-");
        scratch.push(&name);
        let scratch = volume.join(scratch);
        if fs::symlink_metadata(&scratch).is_ok() {
            let removed = if scratch.is_dir() {
                fs::remove_dir_all(&scratch)
            } else {
                fs::remove_file(&scratch)
            };
            removed.map_err(io_err("removing the partial copy", &scratch))?;
        }
        let stats = match coral_seed::copytree::copy_tree(&from.join(&name), &scratch) {
            Ok(stats) => stats,
            Err(err) => {
                // Not left to fill the volume (a full volume is the usual cause).
                let _ = fs::remove_dir_all(&scratch).or_else(|_| fs::remove_file(&scratch));
                return Err(MountError::Io {
                    what: format!("carrying {shown} over from the target's old content to"),
                    path: scratch,
                    err,
                });
            }
        };
        // On disk before it gets its real name: a rerun trusts what has it.
        sync_fs(&scratch)?;
        fs::rename(&scratch, &dest).map_err(io_err("renaming into place", &dest))?;
        File::open(volume)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", volume))?;
        tracing::info!(entry = %shown, bytes = stats.bytes, "carried over");
        carried.names.push(shown);
        carried.bytes += stats.bytes;
    }
    Ok(carried)
}

fn sync_fs(path: &Path) -> Result<(), MountError> {
    let f = File::open(path).map_err(io_err("opening", path))?;
    rustix::fs::syncfs(&f).map_err(|e| MountError::Io {
        what: "syncing the filesystem of".into(),
        path: path.to_path_buf(),
        err: e.into(),
    })
}

// ---------------------------------------------------------------------------
// Guards: what this run set up is taken down again on failure or panic

/// A mount this run made. Dropped or undone while armed, it unmounts
/// (lazily, should the filesystem be busy).
struct MountGuard {
    target: PathBuf,
    armed: bool,
}

impl MountGuard {
    fn keep(&mut self) {
        self.armed = false;
    }

    fn undo(&mut self) -> Result<(), String> {
        if !std::mem::replace(&mut self.armed, false) {
            return Ok(());
        }
        use rustix::mount::{UnmountFlags, unmount};
        match unmount(&self.target, UnmountFlags::empty()) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::BUSY) => {
                tracing::warn!(target = %self.target.display(), "busy: unmounting lazily");
                unmount(&self.target, UnmountFlags::DETACH)
                    .map_err(|e| format!("unmounting {}: {e}", self.target.display()))
            }
            Err(e) => Err(format!("unmounting {}: {e}", self.target.display())),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::error!("{e}");
        }
    }
}

/// A loop device this run attached. It is marked autoclear while this
/// guard holds it open, so the kernel frees it when the last user (the
/// mount) goes away; undone or dropped while armed, it detaches at once.
struct LoopGuard {
    device: PathBuf,
    fd: Option<File>,
    armed: bool,
}

// <linux/loop.h>
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

fn set_autoclear(fd: &File) -> io::Result<()> {
    // SAFETY: LoopInfo64 is plain data of the kernel's layout; all-zero is valid.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open, and the kernel writes exactly one loop_info64.
    if unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    info.lo_flags |= LO_FLAGS_AUTOCLEAR;
    // SAFETY: as above; the kernel reads one loop_info64.
    if unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl LoopGuard {
    fn attach(file: &Path, read_only: bool) -> Result<LoopGuard, MountError> {
        let losetup = find_tool("losetup")?;
        let what = format!("attaching {} to a loop device", file.display());
        let mut args: Vec<&OsStr> = vec![OsStr::new("--find"), OsStr::new("--show")];
        if read_only {
            args.push(OsStr::new("--read-only"));
        }
        args.push(file.as_os_str());
        let out = tool_output(&losetup, "losetup", &what, args)?;
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !out.status.success() || !device.is_absolute() {
            return Err(MountError::Tool {
                tool: "losetup",
                what,
                detail: format!("{}: {}", out.status, output_tail(&out)),
            });
        }
        tracing::info!(device = %device.display(), file = %file.display(), "attached a loop device");
        let mut guard = LoopGuard {
            device,
            fd: None,
            armed: true,
        };
        let open = OpenOptions::new().read(true).open(&guard.device);
        match open {
            Ok(fd) => {
                if let Err(e) = set_autoclear(&fd) {
                    tracing::warn!(device = %guard.device.display(), "setting autoclear: {e}");
                }
                guard.fd = Some(fd);
            }
            Err(e) => {
                let err = io_err("opening", &guard.device)(e);
                return Err(match guard.undo() {
                    Ok(()) => err,
                    Err(cleanup) => MountError::Cleanup {
                        error: Box::new(err),
                        cleanup,
                    },
                });
            }
        }
        Ok(guard)
    }

    /// Success: the mount keeps the device; autoclear frees it on unmount.
    fn keep(mut self) {
        self.armed = false;
    }

    fn undo(&mut self) -> Result<(), String> {
        if !std::mem::replace(&mut self.armed, false) {
            return Ok(());
        }
        if let Some(fd) = self.fd.take() {
            // SAFETY: LOOP_CLR_FD takes no argument.
            if unsafe { libc::ioctl(fd.as_raw_fd(), LOOP_CLR_FD as _, 0) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(()); // already free
            }
            tracing::debug!(device = %self.device.display(), "LOOP_CLR_FD: {e}");
        }
        detach_loop(&self.device)
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::error!("{e}");
        }
    }
}

fn detach_loop(device: &Path) -> Result<(), String> {
    let losetup = find_tool("losetup").map_err(|e| e.to_string())?;
    let what = format!("detaching {}", device.display());
    let out = tool_output(
        &losetup,
        "losetup",
        &what,
        [OsStr::new("-d"), device.as_os_str()],
    )
    .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "losetup ({what}) failed: {}: {}",
            out.status,
            output_tail(&out)
        ))
    }
}

/// Holds an exclusive `flock` on a directory while alive.
fn lock_dir(dir: &Path) -> Result<File, MountError> {
    let f = File::open(dir).map_err(io_err("opening", dir))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        MountError::Io {
            what: "locking".into(),
            path: dir.to_path_buf(),
            err: e.into(),
        }
    })?;
    Ok(f)
}

// ---------------------------------------------------------------------------
// Tools

fn find_tool(name: &'static str) -> Result<PathBuf, MountError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::env::split_paths(TOOL_PATH))
        .map(|dir| dir.join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or_else(|| MountError::Tool {
            tool: name,
            what: "looking for it".into(),
            detail: format!(
                "not installed: install {} (looked in $PATH and {TOOL_PATH})",
                match name {
                    "resize2fs" => "e2fsprogs",
                    "xfs_growfs" => "xfsprogs",
                    _ => "util-linux",
                }
            ),
        })
}

/// Runs a tool with a clean environment and returns its output, whatever
/// its exit status; only a tool that cannot start is an error.
fn tool_output<I, S>(
    program: &Path,
    tool: &'static str,
    what: &str,
    args: I,
) -> Result<Output, MountError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", TOOL_PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    tracing::debug!(tool, what, "running {cmd:?}");
    cmd.output().map_err(|e| MountError::Tool {
        tool,
        what: what.to_owned(),
        detail: format!("could not start {}: {e}", program.display()),
    })
}

/// The last lines of a tool's stderr and stdout.
fn output_tail(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(8)..].join("; ")
}

// ---------------------------------------------------------------------------
// Units

/// A duration: a whole number with `ms`, `s`, `m` or `h` (`60s`, `500ms`,
/// `2m`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration (examples: 60s, 500ms, 2m)");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs).ok_or_else(err);
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(err()),
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        let p = |s: &str| s.parse::<DeviceSpec>();
        assert_eq!(p("auto"), Ok(DeviceSpec::Label("coral-seed".into())));
        assert_eq!(p("label:seed2"), Ok(DeviceSpec::Label("seed2".into())));
        assert_eq!(
            p("ebs:vol-0123456789abcdef0"),
            Ok(DeviceSpec::Ebs("vol-0123456789abcdef0".into()))
        );
        assert_eq!(
            p("vol-01234567"),
            Ok(DeviceSpec::Ebs("vol-01234567".into()))
        );
        assert_eq!(
            p("/dev/nvme1n1"),
            Ok(DeviceSpec::Path("/dev/nvme1n1".into()))
        );
        assert_eq!(p("./vol-x.img"), Ok(DeviceSpec::Path("./vol-x.img".into())));
        let e = p("vol-xyz").unwrap_err();
        assert!(
            e.contains("not an EBS volume ID") && e.contains("./vol-xyz"),
            "{e}"
        );
        assert!(p("ebs:vol-0123456789ABCDEF0").is_err());
        assert!(p("ebs:snap-0123456789abcdef0").is_err());
        assert!(p("label:").is_err());
        assert!(p("").is_err());
        assert_eq!(
            p("ebs:vol-0123456789abcdef0").unwrap().to_string(),
            "ebs:vol-0123456789abcdef0"
        );
    }

    #[test]
    fn labels_are_encoded_as_udev_names_them() {
        assert_eq!(udev_encode(b"coral-seed"), OsString::from("coral-seed"));
        assert_eq!(udev_encode(b"a b/c"), OsString::from("a\\x20b\\x2fc"));
        assert_eq!(udev_encode("grüß".as_bytes()), OsString::from("grüß"));
        assert_eq!(udev_encode(b"\xff"), OsString::from("\\xff"));
    }

    #[test]
    fn nvme_namespace_entries_name_their_block_device() {
        assert_eq!(nvme_block_name("nvme1n1").as_deref(), Some("nvme1n1"));
        assert_eq!(nvme_block_name("nvme0c3n2").as_deref(), Some("nvme0n2"));
        assert_eq!(nvme_block_name("nvme1n1p1"), None);
        assert_eq!(nvme_block_name("serial"), None);
        assert_eq!(nvme_block_name("nvme1"), None);
        assert_eq!(nvme_block_name("nvmen1"), None);
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let m = parse_mountinfo_line(
            "36 35 7:3 / /mnt/my\\040seed rw,noatime shared:1 master:2 - ext4 /dev/loop3 rw,errors=remount-ro",
        )
        .unwrap();
        assert_eq!(m.dev, (7, 3));
        assert_eq!(m.root, Path::new("/"));
        assert_eq!(m.mount_point, Path::new("/mnt/my seed"));
        assert_eq!(m.options, "rw,noatime");
        assert_eq!(m.fstype, "ext4");
        assert_eq!(m.source, "/dev/loop3");
        let m = parse_mountinfo_line("1 2 0:5 /sub /a\\134b ro - tmpfs none rw").unwrap();
        assert_eq!(m.root, Path::new("/sub"));
        assert_eq!(m.mount_point, Path::new("/a\\b"));
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(show_duration(Duration::from_secs(60)), "60s");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(64 << 20), "64.0 MiB");
    }
}
