//! Real containerd daemons with private root, state and socket, one per test.
//!
//! Versions: the Debian package on this machine (1.6) and the pinned builds
//! `scripts/lib/fetch-containerd` unpacks into the cache (1.7 from trixie,
//! 2.1 from sid). Tests iterate over [`available`] so each runs against
//! every version present; `CORAL_EXPECT_CONTAINERD` (set by `scripts/test`)
//! makes a missing one an error instead of a silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tonic::transport::Channel;

use crate::cache::cache_dir;
use crate::process::{Service, kill_processes_mentioning, run};
use crate::registry::Registry;

/// Config for containerd 1.x (`version = 2`).
const CONFIG_V2: &str = include_str!("../testbed/containerd-v2.toml");
/// Config for containerd 2.x (`version = 3`).
const CONFIG_V3: &str = include_str!("../testbed/containerd-v3.toml");

/// The pause image CRI is configured with. Nothing here pulls it (no pod
/// sandboxes are started), so it must not make start-up reach the network.
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.9";

/// One installed containerd build.
#[derive(Debug, Clone)]
pub struct ContainerdBuild {
    /// e.g. `1.6.20`.
    pub version: String,
    /// Holds `containerd`, `ctr` and `containerd-shim-runc-v2`.
    pub bin_dir: PathBuf,
}

impl ContainerdBuild {
    fn probe(bin_dir: &Path) -> Result<ContainerdBuild> {
        let out = run(Command::new(bin_dir.join("containerd")).arg("--version"))?;
        // "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
        let version = out
            .split_whitespace()
            .nth(2)
            .map(|v| {
                v.trim_start_matches('v')
                    .split(['~', '+'])
                    .next()
                    .unwrap_or(v)
                    .to_owned()
            })
            .with_context(|| format!("unexpected `containerd --version` output: {out}"))?;
        Ok(ContainerdBuild {
            version,
            bin_dir: bin_dir.to_owned(),
        })
    }

    /// `1.6`, `1.7`, `2.1`.
    pub fn minor(&self) -> String {
        self.version
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".")
    }

    pub fn major(&self) -> u32 {
        self.version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(1)
    }
}

/// Every containerd build on this machine, oldest first.
pub fn available() -> Result<Vec<ContainerdBuild>> {
    let mut builds = Vec::new();
    if Path::new("/usr/bin/containerd").exists() {
        builds.push(ContainerdBuild::probe(Path::new("/usr/bin"))?);
    }
    if let Ok(entries) = std::fs::read_dir(cache_dir().join("containerd")) {
        for e in entries.flatten() {
            let bin = e.path().join("usr/bin");
            if bin.join("containerd").exists() {
                builds.push(ContainerdBuild::probe(&bin)?);
            }
        }
    }
    builds.sort_by_key(|b| version_key(&b.version));
    builds.dedup_by(|a, b| a.version == b.version);
    if let Ok(expect) = std::env::var("CORAL_EXPECT_CONTAINERD") {
        for want in expect.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if !builds
                .iter()
                .any(|b| b.minor() == want || b.version == want)
            {
                bail!(
                    "containerd {want} was expected (CORAL_EXPECT_CONTAINERD={expect}) but is not installed; \
                     found {:?}. Run scripts/setup.",
                    builds.iter().map(|b| &b.version).collect::<Vec<_>>()
                );
            }
        }
    }
    if builds.is_empty() {
        bail!("no containerd found: run scripts/setup");
    }
    Ok(builds)
}

fn version_key(v: &str) -> Vec<u32> {
    v.split(['.', '-', '~'])
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The first containerd of [`available`] (Debian's own, 1.6), for tests
/// and programs that need one, not every version.
pub fn first() -> Result<ContainerdBuild> {
    available()?
        .into_iter()
        .next()
        .context("no containerd installed (scripts/setup installs them)")
}

pub struct Containerd {
    // Field order matters: stop the daemon before removing its directories.
    service: Service,
    pub build: ContainerdBuild,
    address: PathBuf,
    root: PathBuf,
    dir: TempDir,
}

impl Containerd {
    /// Starts `build` with a private root, state and socket, trusting
    /// `registries` (plain HTTP, or TLS with their own certificate).
    pub async fn start(build: &ContainerdBuild, registries: &[&Registry]) -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("coral-ctrd-").tempdir()?;
        let root = dir.path().join("root");
        Self::start_with_root(build, registries, dir, root).await
    }

    /// Starts containerd on an existing root directory (e.g. a mounted seed
    /// volume that is to be adopted).
    pub async fn start_with_root(
        build: &ContainerdBuild,
        registries: &[&Registry],
        dir: TempDir,
        root: PathBuf,
    ) -> Result<Containerd> {
        let state = dir.path().join("state");
        let certs = dir.path().join("certs.d");
        let address = dir.path().join("containerd.sock");
        for d in [&root, &state, &certs] {
            std::fs::create_dir_all(d)?;
        }
        for r in registries {
            write_hosts_toml(&certs, r)?;
        }
        let template = if build.major() >= 2 {
            CONFIG_V3
        } else {
            CONFIG_V2
        };
        let config = template
            .replace("{root}", &root.display().to_string())
            .replace("{state}", &state.display().to_string())
            .replace("{address}", &address.display().to_string())
            .replace("{certs_dir}", &certs.display().to_string())
            .replace("{sandbox_image}", SANDBOX_IMAGE);
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config)?;

        let service = Self::spawn(build, dir.path(), &address)?;
        let me = Containerd {
            service,
            build: build.clone(),
            address,
            root,
            dir,
        };
        me.wait_ready().await?;
        Ok(me)
    }

    fn spawn(build: &ContainerdBuild, dir: &Path, address: &Path) -> Result<Service> {
        let mut cmd = Command::new(build.bin_dir.join("containerd"));
        cmd.arg("--config").arg(dir.join("config.toml"));
        // The runc shim is looked up on PATH: the build's own comes first.
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", build.bin_dir.display()));
        let mut service = Service::spawn(
            &format!("containerd {}", build.version),
            cmd,
            &dir.join("containerd.log"),
        )?;
        service.wait_until(Duration::from_secs(30), || address.exists())?;
        Ok(service)
    }

    async fn wait_ready(&self) -> Result<()> {
        // The socket exists before every service is registered: wait for an answer.
        let mut last = None;
        for _ in 0..100 {
            match self.version().await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.expect("tried")).with_context(|| {
            format!(
                "containerd did not answer; log:\n{}",
                self.service.log_tail()
            )
        })
    }

    /// Stops the daemon and starts it again on the same root and config
    /// (running containers' shims are killed).
    pub async fn restart(&mut self) -> Result<()> {
        self.service.stop();
        kill_processes_mentioning(&self.address.display().to_string());
        let _ = std::fs::remove_file(&self.address);
        self.service = Self::spawn(&self.build, self.dir.path(), &self.address)?;
        self.wait_ready().await
    }

    pub fn address(&self) -> &Path {
        &self.address
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub async fn channel(&self) -> Result<Channel> {
        containerd_client::connect(&self.address)
            .await
            .with_context(|| format!("connecting to {}", self.address.display()))
    }

    /// The daemon's version, over gRPC.
    pub async fn version(&self) -> Result<String> {
        let mut client = containerd_client::services::v1::version_client::VersionClient::new(
            self.channel().await?,
        );
        let v = client.version(()).await?.into_inner();
        Ok(v.version)
    }

    /// This build's `ctr`, pointed at this daemon.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new(self.build.bin_dir.join("ctr"));
        c.arg("--address").arg(&self.address);
        c
    }

    pub fn log_tail(&self) -> String {
        self.service.log_tail()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.service.stop();
        // Shims detach from containerd; they name the socket on their command line.
        kill_processes_mentioning(&self.address.display().to_string());
        unmount_below(self.dir.path());
        // Not the root itself: it may be a volume the test mounted and owns.
        unmount_inside(&self.root);
    }
}

/// `certs.d/<host>/hosts.toml` for one test registry.
fn write_hosts_toml(certs: &Path, registry: &Registry) -> Result<()> {
    let dir = certs.join(registry.host());
    std::fs::create_dir_all(&dir)?;
    let mut host = format!(
        "server = \"{url}\"\n\n[host.\"{url}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n",
        url = registry.url()
    );
    if let Some(ca) = registry.ca_cert() {
        host.push_str(&format!("  ca = \"{}\"\n", ca.display()));
    }
    std::fs::write(dir.join("hosts.toml"), host)?;
    Ok(())
}

/// Lazily unmounts everything mounted strictly below `dir`, deepest first.
pub fn unmount_inside(dir: &Path) {
    unmount_matching(dir, false)
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first.
pub fn unmount_below(dir: &Path) {
    unmount_matching(dir, true)
}

fn unmount_matching(dir: &Path, including: bool) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && (including || p != dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 on a NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// A read-only view of a committed snapshot, mounted; unmounted and removed
/// from containerd's snapshotter when dropped (the removal is best effort:
/// the daemon may be gone by then).
pub struct SnapshotView {
    at: PathBuf,
    key: String,
    address: PathBuf,
    namespace: String,
}

impl SnapshotView {
    pub fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let (address, key, ns) = (
            self.address.clone(),
            self.key.clone(),
            self.namespace.clone(),
        );
        // A small runtime of its own: Drop may run inside or outside one.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
                use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
                let ch = containerd_client::connect(&address).await.ok()?;
                let mut req = tonic::Request::new(RemoveSnapshotRequest {
                    snapshotter: "overlayfs".into(),
                    key,
                });
                req.metadata_mut()
                    .insert("containerd-namespace", ns.parse().ok()?);
                SnapshotsClient::new(ch).remove(req).await.ok()
            })
        })
        .join();
    }
}

static VIEWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Containerd {
    /// Mounts containerd's own read-only view of the committed overlayfs
    /// snapshot `chain` (in namespace k8s.io) at `at`.
    pub async fn view(&self, chain: &str, at: &Path) -> Result<SnapshotView> {
        use containerd_client::services::v1::snapshots::ViewSnapshotRequest;
        use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
        let key = format!(
            "coral-test-view-{}-{}",
            std::process::id(),
            VIEWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        // A gc.root label keeps the collector (which a pull or an image
        // removal can trigger) from removing the view under the test.
        let mut req = tonic::Request::new(ViewSnapshotRequest {
            snapshotter: "overlayfs".into(),
            key: key.clone(),
            parent: chain.into(),
            labels: [(
                "containerd.io/gc.root".to_string(),
                "coral-test".to_string(),
            )]
            .into(),
        });
        req.metadata_mut()
            .insert("containerd-namespace", "k8s.io".parse()?);
        let mounts = SnapshotsClient::new(self.channel().await?)
            .view(req)
            .await
            .with_context(|| {
                format!(
                    "containerd {}: View of {chain}; log:\n{}",
                    self.build.version,
                    self.log_tail()
                )
            })?
            .into_inner()
            .mounts;
        let view = SnapshotView {
            at: at.to_path_buf(),
            key,
            address: self.address.clone(),
            namespace: "k8s.io".into(),
        };
        std::fs::create_dir_all(at)?;
        let m = mounts.first().context("a view without mounts")?;
        let opts: Vec<String> = m
            .options
            .iter()
            .filter(|o| o.as_str() != "rbind")
            .cloned()
            .collect();
        let mut cmd = Command::new("mount");
        if m.r#type == "bind" {
            cmd.args(["--bind", "-o", "ro"]).arg(&m.source).arg(at);
        } else {
            cmd.args(["-t", &m.r#type, &m.source, "-o", &opts.join(",")])
                .arg(at);
        }
        crate::process::run(&mut cmd)
            .with_context(|| format!("mounting containerd's view {mounts:?}"))?;
        Ok(view)
    }
}

/// Whether a line of `ctr images check` says the image is complete. Its
/// status column reads `complete (n/n)`, `incomplete (k/n)` or
/// `unavailable`: the word must be exactly `complete` (`incomplete`
/// contains it).
pub fn check_line_complete(line: &str) -> bool {
    line.split_whitespace().any(|w| w == "complete")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_complete_is_complete() {
        let head =
            "docker.io/coral/minbase:latest application/vnd.oci.image.manifest.v1+json sha256:ab";
        assert!(super::check_line_complete(&format!(
            "{head} complete (2/2) 28.1 MiB/28.1 MiB true"
        )));
        assert!(!super::check_line_complete(&format!(
            "{head} incomplete (1/2) 8.1 MiB/28.1 MiB false"
        )));
        assert!(!super::check_line_complete(&format!(
            "{head} unavailable 0.0 B/? false"
        )));
    }
}
