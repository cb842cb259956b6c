//! `coral-node-mounter mount` against real filesystems on loop devices.
//! They need root, loop devices, util-linux, e2fsprogs and xfsprogs.
//! Every loop device and mount a test makes is taken down by a guard, even
//! when the test panics; and each test checks that a failing mount leaves
//! neither a mount nor a loop device behind.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use coral_node_mounter::mount::{self, DeviceSpec, FsType, HostRoots, MountError, MountOptions};
use coral_seed::manifest::{FORMAT_VERSION, seed_key};
use coral_seed::{Digest, Platform, SeedManifest, Totals};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_coral-node-mounter");
const MIB: u64 = 1 << 20;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests mount filesystems and attach loop devices: run them as root"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A label no other test (or other process) uses at the same time.
fn unique_label() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "crl{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn seed_manifest() -> SeedManifest {
    let platforms = vec![Platform::new("linux", "amd64", None)];
    let m = SeedManifest {
        format_version: FORMAT_VERSION,
        build_id: "test-build".into(),
        tool_version: "coral-builder test".into(),
        created: "2024-01-01T00:00:00Z".into(),
        seed_key: seed_key(&platforms, std::iter::empty()),
        platforms,
        images: vec![],
        totals: Totals::default(),
    };
    m.validate().expect("a valid empty seed manifest");
    m
}

/// A filesystem image in a temporary directory, with `mnt/` beside it for
/// a mount point.
struct Volume {
    dir: TempDir,
    image: PathBuf,
    manifest: Vec<u8>,
}

impl Volume {
    fn target(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// `mke2fs -d`: an ext-family filesystem of `fs_mib` holding the
    /// manifest, in a file of `file_mib`.
    fn ext(kind: &str, label: &str, manifest: &[u8], fs_mib: u64, file_mib: u64) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("stage");
        fs::create_dir_all(stage.join(".coral")).unwrap();
        fs::write(stage.join(".coral/manifest.json"), manifest).unwrap();
        let image = dir.path().join("seed.img");
        run(Command::new("mke2fs")
            .args(["-q", "-F", "-t", kind, "-L", label, "-d"])
            .arg(&stage)
            .arg(&image)
            .arg(format!("{fs_mib}M")));
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(file_mib * MIB)
            .unwrap();
        Volume {
            dir,
            image,
            manifest: manifest.to_vec(),
        }
    }

    fn ext4(label: &str, manifest: &[u8]) -> Volume {
        Volume::ext("ext4", label, manifest, 16, 16)
    }

    fn xfs(label: &str, manifest: &[u8], fs_mib: u64, file_mib: u64) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("seed.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(file_mib * MIB)
            .unwrap();
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-L", label, "-d"])
            .arg(format!("size={}", fs_mib * MIB))
            .arg(&image));
        let stage = dir.path().join("stage");
        fs::create_dir(&stage).unwrap();
        {
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&stage));
            let _unmount = Unmount(stage.clone());
            fs::create_dir(stage.join(".coral")).unwrap();
            fs::write(stage.join(".coral/manifest.json"), manifest).unwrap();
        }
        wait_until("the staging loop device is freed", || {
            loops_of(&image).is_empty()
        });
        Volume {
            dir,
            image,
            manifest: manifest.to_vec(),
        }
    }

    fn digest(&self) -> Digest {
        Digest::sha256_of(&self.manifest)
    }
}

/// A loop device attached for a test; detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image));
        Loop(PathBuf::from(dev.trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Unmounts (lazily) whatever is still mounted at the path on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while mounts_at(&self.0) > 0 {
            let ok = Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                break;
            }
        }
    }
}

/// How many mounts are stacked at `path`.
fn mounts_at(path: &Path) -> usize {
    let Ok(path) = fs::canonicalize(path) else {
        return 0;
    };
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .count()
}

/// The per-mount options of the topmost mount at `path`.
fn mount_options(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .map(|l| l.split(' ').nth(5).unwrap().to_owned())
        .unwrap_or_default()
}

/// Loop devices backed by `image`.
fn loops_of(image: &Path) -> Vec<String> {
    run(Command::new("losetup").arg("-j").arg(image))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Nothing left of a failed mount: no mount at the target, no loop device
/// on the image.
fn assert_nothing_left(vol: &Volume) {
    assert_eq!(mounts_at(&vol.target()), 0, "the target is still mounted");
    wait_until("no loop device is left on the image", || {
        loops_of(&vol.image).is_empty()
    });
}

fn opts(device: DeviceSpec, target: PathBuf) -> MountOptions {
    let mut o = MountOptions::new(device, target);
    o.wait = Duration::from_secs(5);
    o
}

fn path(p: &Path) -> DeviceSpec {
    DeviceSpec::Path(p.to_path_buf())
}

fn fake_roots(dir: &Path) -> HostRoots {
    let roots = HostRoots {
        dev: dir.join("dev"),
        sys: dir.join("sys"),
        blkid: false,
    };
    fs::create_dir_all(&roots.dev).unwrap();
    fs::create_dir_all(&roots.sys).unwrap();
    roots
}

fn df_size(target: &Path) -> u64 {
    let st = rustix::fs::statvfs(target).unwrap();
    st.f_blocks * st.f_frsize
}

#[test]
fn mounts_a_block_device_by_path_and_a_rerun_is_idempotent() {
    require_root();
    let manifest = seed_manifest();
    let vol = Volume::ext4(&unique_label(), &manifest.to_json());
    let lp = Loop::attach(&vol.image);
    let _unmount = Unmount(vol.target());

    let m = mount::mount(&opts(path(&lp.0), vol.target())).unwrap();
    assert!(!m.already_mounted);
    assert!(!m.loop_attached);
    assert_eq!(m.device, lp.0);
    assert_eq!(m.image_file, None);
    assert_eq!(m.target, fs::canonicalize(vol.target()).unwrap());
    assert_eq!(m.fs, FsType::Ext4);
    assert!(!m.read_only);
    assert_eq!(m.images, 0);
    assert_eq!(m.seed_key, manifest.seed_key);
    assert_eq!(m.manifest_digest, vol.digest());
    assert_eq!(m.format_version, "1.0");
    assert_eq!(m.build_id, "test-build");
    assert_eq!(m.device_size, 16 * MIB);
    assert_eq!(m.size_before, m.size_after);
    assert!(!m.grown);
    let options = mount_options(&vol.target());
    assert!(
        options.starts_with("rw,") && options.contains("noatime"),
        "{options}"
    );

    // A re-run (with the digest now pinned) finds it mounted and leaves it.
    let mut again = opts(path(&lp.0), vol.target());
    again.expect = Some(vol.digest());
    let m2 = mount::mount(&again).unwrap();
    assert!(m2.already_mounted);
    assert_eq!(m2.device, lp.0);
    assert_eq!(m2.manifest_digest, vol.digest());
    assert_eq!(mounts_at(&vol.target()), 1, "mounted twice");

    mount::unmount(&m).unwrap();
    assert_eq!(mounts_at(&vol.target()), 0);
}

#[test]
fn mounts_an_image_file_on_a_loop_device_that_goes_with_the_mount() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let _unmount = Unmount(vol.target());

    let m = mount::mount(&opts(path(&vol.image), vol.target())).unwrap();
    assert!(m.loop_attached && !m.already_mounted);
    assert_eq!(m.image_file.as_deref(), Some(vol.image.as_path()));
    assert!(m.device.to_str().unwrap().starts_with("/dev/loop"), "{m:?}");
    assert_eq!(loops_of(&vol.image).len(), 1);

    let m2 = mount::mount(&opts(path(&vol.image), vol.target())).unwrap();
    assert!(m2.already_mounted && !m2.loop_attached);
    assert_eq!(m2.device, m.device);
    assert_eq!(loops_of(&vol.image).len(), 1, "a second loop device");
    assert_eq!(mounts_at(&vol.target()), 1);

    // An operator's plain umount also frees the loop device (autoclear).
    run(Command::new("umount").arg(vol.target()));
    wait_until("the loop device is freed by umount", || {
        loops_of(&vol.image).is_empty()
    });
}

#[test]
fn finds_the_device_by_label_through_blkid() {
    require_root();
    let label = unique_label();
    let vol = Volume::ext4(&label, &seed_manifest().to_json());
    let lp = Loop::attach(&vol.image);
    let _unmount = Unmount(vol.target());

    let spec: DeviceSpec = format!("label:{label}").parse().unwrap();
    let m = mount::mount(&opts(spec.clone(), vol.target())).unwrap();
    assert_eq!(m.device, lp.0);
    assert!(!m.already_mounted);
    let m2 = mount::mount(&opts(spec, vol.target())).unwrap();
    assert!(m2.already_mounted);
    mount::unmount(&m).unwrap();
}

#[test]
fn auto_finds_the_coral_seed_label_in_dev_disk_by_label() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let lp = Loop::attach(&vol.image);
    let _unmount = Unmount(vol.target());
    let roots = fake_roots(vol.dir.path());
    fs::create_dir_all(roots.dev.join("disk/by-label")).unwrap();
    symlink(&lp.0, roots.dev.join("disk/by-label/coral-seed")).unwrap();

    let mut o = opts("auto".parse().unwrap(), vol.target());
    o.roots = roots;
    let m = mount::mount(&o).unwrap();
    assert_eq!(m.device, lp.0);
    mount::unmount(&m).unwrap();
}

#[test]
fn finds_an_ebs_volume_by_its_nvme_serial_in_sysfs() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let lp = Loop::attach(&vol.image);
    let _unmount = Unmount(vol.target());
    let roots = fake_roots(vol.dir.path());
    // The root volume: another serial.
    let nvme0 = roots.sys.join("class/nvme/nvme0");
    fs::create_dir_all(nvme0.join("nvme0n1")).unwrap();
    fs::write(nvme0.join("serial"), "vol0aaaaaaaaaaaaaaaa\n").unwrap();
    symlink("/dev/null", roots.dev.join("nvme0n1")).unwrap();
    // The seed volume, with native NVMe multipath naming (nvme1c1n1 -> nvme1n1).
    let nvme1 = roots.sys.join("class/nvme/nvme1");
    fs::create_dir_all(nvme1.join("nvme1c1n1")).unwrap();
    fs::write(nvme1.join("serial"), "vol0123456789abcdef0\n").unwrap();
    symlink(&lp.0, roots.dev.join("nvme1n1")).unwrap();

    let mut o = opts("ebs:vol-0123456789abcdef0".parse().unwrap(), vol.target());
    o.roots = roots.clone();
    let found = mount::find_device(&o.device, &roots, Duration::ZERO).unwrap();
    assert_eq!(found, mount::Found::BlockDevice(lp.0.clone()));
    let m = mount::mount(&o).unwrap();
    assert_eq!(m.device, lp.0);
    mount::unmount(&m).unwrap();

    // Old-style 8-digit IDs are space-padded to 20 characters in sysfs.
    fs::write(nvme1.join("serial"), "vol01234567         \n").unwrap();
    let found = mount::find_device(&"vol-01234567".parse().unwrap(), &roots, Duration::ZERO);
    assert_eq!(found.unwrap(), mount::Found::BlockDevice(lp.0.clone()));
}

#[test]
fn finds_an_ebs_volume_by_its_udev_by_id_link() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let lp = Loop::attach(&vol.image);
    let _unmount = Unmount(vol.target());
    let roots = fake_roots(vol.dir.path());
    let by_id = roots.dev.join("disk/by-id");
    fs::create_dir_all(&by_id).unwrap();
    symlink(
        &lp.0,
        by_id.join("nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210"),
    )
    .unwrap();
    symlink(
        "/dev/null",
        by_id.join("nvme-Amazon_Elastic_Block_Store_vol0fedcba9876543210-part1"),
    )
    .unwrap();

    let mut o = opts("vol-0fedcba9876543210".parse().unwrap(), vol.target());
    o.roots = roots;
    let m = mount::mount(&o).unwrap();
    assert_eq!(m.device, lp.0);
    mount::unmount(&m).unwrap();
}

#[test]
fn a_wrong_expected_digest_unmounts_and_detaches() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let _unmount = Unmount(vol.target());

    let mut o = opts(path(&vol.image), vol.target());
    o.expect = Some(Digest::sha256_of(b"some other seed"));
    let err = mount::mount(&o).unwrap_err();
    assert!(matches!(err, MountError::DigestMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&vol.digest().to_string()) && msg.contains("not the seed volume"),
        "{msg}"
    );
    assert_nothing_left(&vol);
}

#[test]
fn an_unknown_major_format_is_refused_and_nothing_stays_mounted() {
    require_root();
    let mut v: serde_json::Value = serde_json::from_slice(&seed_manifest().to_json()).unwrap();
    v["formatVersion"] = "2.0".into();
    let vol = Volume::ext4(&unique_label(), &serde_json::to_vec_pretty(&v).unwrap());
    let _unmount = Unmount(vol.target());

    let out = Command::new(BIN)
        .args(["mount", "--wait", "5s", "--device"])
        .arg(&vol.image)
        .arg("--target")
        .arg(vol.target())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("format 2.0 is not supported") && stderr.contains("manifest.json"),
        "{stderr}"
    );
    assert_nothing_left(&vol);
}

#[test]
fn a_missing_device_times_out_with_a_clear_message() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("/dev/coral-missing-{}", std::process::id());
    let started = Instant::now();
    let out = Command::new(BIN)
        .args(["mount", "--wait", "1s", "--device", &missing, "--target"])
        .arg(dir.path().join("mnt"))
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "timed out after 1s waiting for device {missing}: {missing} does not exist"
        )),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Labels and EBS volumes name where they were looked for.
    let roots = fake_roots(dir.path());
    let wait = Duration::from_millis(300);
    let err = mount::find_device(&"auto".parse().unwrap(), &roots, wait)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("waiting for a filesystem labelled \"coral-seed\"")
            && err.contains(
                &roots
                    .dev
                    .join("disk/by-label/coral-seed")
                    .display()
                    .to_string()
            ),
        "{err}"
    );
    let err = mount::find_device(&"ebs:vol-0123456789abcdef0".parse().unwrap(), &roots, wait)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("waiting for EBS volume vol-0123456789abcdef0")
            && err.contains("serial vol0123456789abcdef0")
            && err.contains(&roots.sys.join("class/nvme").display().to_string())
            && err.contains("nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"),
        "{err}"
    );
}

#[test]
fn a_device_that_appears_while_waiting_is_mounted() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let lp = Loop::attach(&vol.image);
    let _unmount = Unmount(vol.target());
    let roots = fake_roots(vol.dir.path());
    let link = roots.dev.join("nvme5n1");
    let dev = lp.0.clone();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        symlink(&dev, &link).unwrap();
    });
    let started = Instant::now();
    let found = mount::find_device(
        &DeviceSpec::Path(roots.dev.join("nvme5n1")),
        &roots,
        Duration::from_secs(5),
    )
    .unwrap();
    late.join().unwrap();
    assert_eq!(found, mount::Found::BlockDevice(lp.0.clone()));
    assert!(started.elapsed() >= Duration::from_millis(600));
}

#[test]
fn grows_ext4_to_the_device_size() {
    require_root();
    let vol = Volume::ext("ext4", &unique_label(), &seed_manifest().to_json(), 64, 128);
    let _unmount = Unmount(vol.target());

    let mut o = opts(path(&vol.image), vol.target());
    o.grow = true;
    if !mount::can_grow_ext4_online() {
        // Without CAP_SYS_RESOURCE the kernel refuses online ext4 resizes:
        // the error says why, and the volume is unmounted and detached.
        let err = mount::mount(&o).unwrap_err();
        assert!(matches!(err, MountError::Grow(_)), "{err:?}");
        assert!(err.to_string().contains("CAP_SYS_RESOURCE"), "{err}");
        assert_nothing_left(&vol);
        eprintln!("NOTE: this process lacks CAP_SYS_RESOURCE: online ext4 growth not exercised");
        return;
    }
    let m = mount::mount(&o).unwrap();
    assert_eq!(m.device_size, 128 * MIB);
    assert!(m.grown, "{m:?}");
    assert!(m.size_before < 64 * MIB, "{m:?}");
    assert!(m.size_after > 100 * MIB, "{m:?}");
    assert_eq!(df_size(&vol.target()), m.size_after);

    // Grown already: a re-run changes nothing.
    let m2 = mount::mount(&o).unwrap();
    assert!(m2.already_mounted && !m2.grown, "{m2:?}");
    assert_eq!(
        (m2.size_before, m2.size_after),
        (m.size_after, m.size_after)
    );
    mount::unmount(&m).unwrap();
    assert_nothing_left(&vol);
}

#[test]
fn grows_xfs_to_the_device_size() {
    require_root();
    let manifest = seed_manifest();
    let vol = Volume::xfs(&unique_label(), &manifest.to_json(), 320, 640);
    let _unmount = Unmount(vol.target());

    let mut o = opts(path(&vol.image), vol.target());
    o.grow = true;
    let m = mount::mount(&o).unwrap();
    assert_eq!(m.fs, FsType::Xfs);
    assert_eq!(m.seed_key, manifest.seed_key);
    assert!(m.grown, "{m:?}");
    assert!(m.size_before < 320 * MIB, "{m:?}");
    assert!(m.size_after > 560 * MIB, "{m:?}");
    assert_eq!(df_size(&vol.target()), m.size_after);

    let m2 = mount::mount(&o).unwrap();
    assert!(m2.already_mounted && !m2.grown, "{m2:?}");
    mount::unmount(&m).unwrap();
    assert_nothing_left(&vol);
}

#[test]
fn a_device_no_larger_than_the_filesystem_is_not_grown() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let _unmount = Unmount(vol.target());
    let mut o = opts(path(&vol.image), vol.target());
    o.grow = true;
    let m = mount::mount(&o).unwrap();
    assert!(!m.grown && m.size_before == m.size_after, "{m:?}");
    mount::unmount(&m).unwrap();
}

#[test]
fn refuses_a_target_with_something_else_mounted() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    fs::create_dir(vol.target()).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "coral-test-tmpfs"])
        .arg(vol.target()));
    let _unmount = Unmount(vol.target());

    let err = mount::mount(&opts(path(&vol.image), vol.target())).unwrap_err();
    assert!(matches!(err, MountError::TargetBusy { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("coral-test-tmpfs (tmpfs)"), "{msg}");
    assert_eq!(mounts_at(&vol.target()), 1, "the tmpfs was touched");
    assert!(loops_of(&vol.image).is_empty());
}

#[test]
fn read_only_mounts_are_read_only() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let _unmount = Unmount(vol.target());

    let mut o = opts(path(&vol.image), vol.target());
    o.read_only = true;
    o.grow = true;
    let err = mount::mount(&o).unwrap_err();
    assert!(matches!(err, MountError::Usage(_)), "{err:?}");
    assert_nothing_left(&vol);

    o.grow = false;
    let m = mount::mount(&o).unwrap();
    assert!(m.read_only);
    let options = mount_options(&vol.target());
    assert!(
        options.starts_with("ro,") && options.contains("noatime"),
        "{options}"
    );
    assert!(fs::write(vol.target().join("x"), b"x").is_err());

    // A writable mount was asked for: not silently accepted, not unmounted.
    let err = mount::mount(&opts(path(&vol.image), vol.target())).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(mounts_at(&vol.target()), 1);
    mount::unmount(&m).unwrap();
    assert_nothing_left(&vol);
}

#[test]
fn refuses_other_filesystems_and_volumes_without_a_manifest() {
    require_root();
    let ext2 = Volume::ext("ext2", &unique_label(), &seed_manifest().to_json(), 16, 16);
    let _unmount = Unmount(ext2.target());
    let err = mount::mount(&opts(path(&ext2.image), ext2.target())).unwrap_err();
    assert!(
        matches!(&err, MountError::UnsupportedFs { found, .. } if found == "ext2"),
        "{err:?}"
    );
    assert!(err.to_string().contains("ext4 or xfs"), "{err}");
    assert_nothing_left(&ext2);

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("empty.img");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&image)
        .arg("16M"));
    let bare = Volume {
        dir,
        image,
        manifest: vec![],
    };
    let _unmount = Unmount(bare.target());
    let err = mount::mount(&opts(path(&bare.image), bare.target())).unwrap_err();
    assert!(matches!(err, MountError::NoManifest { .. }), "{err:?}");
    assert!(err.to_string().contains("not a coral seed volume"), "{err}");
    assert_nothing_left(&bare);
}

#[test]
fn the_cli_prints_json_and_a_human_line() {
    require_root();
    let manifest = seed_manifest();
    let vol = Volume::xfs(&unique_label(), &manifest.to_json(), 320, 640);
    let _unmount = Unmount(vol.target());

    let out = run(Command::new(BIN)
        .args(["mount", "--grow", "--json", "--device"])
        .arg(&vol.image)
        .arg("--target")
        .arg(vol.target())
        .arg("--expect")
        .arg(vol.digest().to_string()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["device"].as_str().unwrap().starts_with("/dev/loop"),
        "{v}"
    );
    assert_eq!(v["imageFile"], vol.image.to_str().unwrap());
    assert_eq!(
        v["target"],
        fs::canonicalize(vol.target()).unwrap().to_str().unwrap()
    );
    assert_eq!(v["fs"], "xfs");
    assert_eq!(v["readOnly"], false);
    assert_eq!(v["alreadyMounted"], false);
    assert_eq!(v["manifestDigest"], vol.digest().to_string());
    assert_eq!(v["seedKey"], manifest.seed_key.to_string());
    assert_eq!(v["images"], 0);
    assert_eq!(v["grown"], true);
    assert_eq!(v["deviceSize"], 640 * MIB);
    assert!(v["sizeAfter"].as_u64() > v["sizeBefore"].as_u64(), "{v}");
    assert!(v["seconds"].as_f64().unwrap() >= 0.0, "{v}");

    let out = run(Command::new(BIN)
        .args(["mount", "--device"])
        .arg(&vol.image)
        .arg("--target")
        .arg(vol.target()));
    assert!(
        out.starts_with("coral-node-mounter: already mounted /dev/loop")
            && out.contains(&manifest.seed_key.to_string()),
        "{out}"
    );
    run(Command::new("umount").arg(vol.target()));
    assert_nothing_left(&vol);
}

#[test]
fn two_devices_with_one_label_are_refused_unless_one_is_mounted_at_the_target() {
    require_root();
    let label = unique_label();
    let a = Volume::ext4(&label, &seed_manifest().to_json());
    let b = Volume::ext4(&label, &seed_manifest().to_json());
    let la = Loop::attach(&a.image);
    let lb = Loop::attach(&b.image);
    let _unmount = Unmount(a.target());
    let spec = DeviceSpec::Label(label.clone());

    let err = mount::mount(&opts(spec.clone(), a.target())).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("several devices have the filesystem label")
            && msg.contains(la.0.to_str().unwrap())
            && msg.contains(lb.0.to_str().unwrap()),
        "{msg}"
    );
    assert_eq!(mounts_at(&a.target()), 0);

    // Once one of them is mounted at the target, a re-run by label is fine.
    let m = mount::mount(&opts(path(&lb.0), a.target())).unwrap();
    let m2 = mount::mount(&opts(spec, a.target())).unwrap();
    assert!(m2.already_mounted);
    assert_eq!(m2.device, lb.0);
    mount::unmount(&m).unwrap();
}

#[test]
fn an_image_mounted_elsewhere_is_not_mounted_through_a_second_loop_device() {
    require_root();
    let vol = Volume::ext4(&unique_label(), &seed_manifest().to_json());
    let _unmount = Unmount(vol.target());
    let other = vol.dir.path().join("other");
    let _unmount_other = Unmount(other.clone());

    let m = mount::mount(&opts(path(&vol.image), vol.target())).unwrap();
    let err = mount::mount(&opts(path(&vol.image), other.clone())).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("is already mounted at") && msg.contains(m.device.to_str().unwrap()),
        "{msg}"
    );
    assert_eq!(mounts_at(&other), 0);
    assert_eq!(loops_of(&vol.image).len(), 1);
    mount::unmount(&m).unwrap();
    assert_nothing_left(&vol);
}
