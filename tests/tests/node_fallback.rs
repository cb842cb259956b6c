//! `coral-node-mounter prefetch`: CRI pulls with credentials, retries,
//! failure limits and deadlines, against a real registry and every installed
//! containerd, watched through the status file as an operator would.
//! Needs root (containerd).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use coral_tests::containerd::{self, Containerd};
use coral_tests::cri;
use coral_tests::fixtures::Corpus;
use coral_tests::registry::{Registry, RegistryOptions};
use coral_tests::workspace_bin;
use serde_json::Value;

/// One finished `prefetch` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
    /// Every distinct status document seen while it ran, the last one last.
    snapshots: Vec<Value>,
}

impl Run {
    fn status(&self) -> &Value {
        self.snapshots.last().expect("the status file was written")
    }

    fn image(&self, reference: &str) -> &Value {
        self.status()["images"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["reference"] == reference))
            .unwrap_or_else(|| panic!("{reference} not in the status: {}", self.status()))
    }

    fn context(&self) -> String {
        format!(
            "exit {}; stdout:\n{}\nstderr:\n{}\nstatus:\n{:#}",
            self.code,
            self.stdout,
            self.stderr,
            self.status()
        )
    }
}

/// Runs `coral-node-mounter prefetch` against `c` with a status file in
/// `dir`, polling that file every few milliseconds while it runs.
async fn prefetch(c: &Containerd, dir: &Path, args: &[String]) -> Result<Run> {
    prefetch_at(c.address(), dir, args).await
}

async fn prefetch_at(address: &Path, dir: &Path, args: &[String]) -> Result<Run> {
    let status = dir.join("status.json");
    let _ = std::fs::remove_file(&status);
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let mut child = Command::new(workspace_bin("coral-node-mounter")?)
        .arg("prefetch")
        .arg("--address")
        .arg(address)
        .arg("--status-file")
        .arg(&status)
        .args(args)
        // Debug logging, so the secrecy checks cover the logs too.
        .env("CORAL_LOG", "coral_node_mounter=debug,warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("starting coral-node-mounter")?;
    let started = Instant::now();
    let mut snapshots: Vec<Value> = Vec::new();
    let exit = loop {
        let exited = child.try_wait()?;
        // Writes are atomic renames: whatever is read is a whole document.
        if let Ok(text) = std::fs::read(&status) {
            let v: Value = serde_json::from_slice(&text).with_context(|| {
                format!("a torn status file: {}", String::from_utf8_lossy(&text))
            })?;
            if snapshots.last() != Some(&v) {
                snapshots.push(v);
            }
        }
        if let Some(exit) = exited {
            break exit;
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            bail!("prefetch still running after 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let run = Run {
        code: exit.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out_path)?,
        stderr: std::fs::read_to_string(&err_path)?,
        elapsed: started.elapsed(),
        snapshots,
    };
    ensure!(!run.snapshots.is_empty(), "no status file; {}", run.stderr);
    Ok(run)
}

fn image_ref(reg: &Registry, name: &str) -> String {
    format!("{}/{}:latest", reg.host(), Corpus::repository(name))
}

fn image_args(refs: &[&String]) -> Vec<String> {
    refs.iter()
        .flat_map(|r| ["--image".to_owned(), (*r).clone()])
        .collect()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn prefetch_pulls_images_through_cri_and_a_rerun_finds_them_present() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let tiny = image_ref(&reg, "tiny");
    let minbase = image_ref(&reg, "minbase");
    for b in &containerd::available()? {
        let c = Containerd::start(b, &[&reg]).await?;
        let dir = tempfile::tempdir()?;
        let mut args = image_args(&[&tiny, &minbase]);
        args.extend(strings(&["--concurrency", "2"]));

        let first = prefetch(&c, dir.path(), &args).await?;
        let ctx = || format!("containerd {}: {}", b.version, first.context());
        // Pulling is what prefetch is for: exit 0, not 10.
        ensure!(first.code == 0, "{}", ctx());
        ensure!(first.status()["phase"] == "done", "{}", ctx());
        ensure!(first.status()["exitCode"] == 0, "{}", ctx());
        let mut digests = Vec::new();
        for r in [&tiny, &minbase] {
            let img = first.image(r);
            ensure!(img["state"] == "pulled", "{r}: {}", ctx());
            ensure!(img["attempts"] == 1, "{r}: {}", ctx());
            ensure!(img.get("lastError").is_none(), "{r}: {}", ctx());
            let digest = img["digest"].as_str().unwrap_or("");
            ensure!(digest.starts_with("sha256:"), "{r}: {}", ctx());
            digests.push(digest.to_owned());
            ensure!(
                first
                    .stdout
                    .lines()
                    .any(|l| l.starts_with("pulled") && l.contains(r.as_str())),
                "{}",
                ctx()
            );
        }
        let tags = cri::tags(c.address()).await?;
        for r in [&tiny, &minbase] {
            ensure!(
                tags.contains(r),
                "containerd {}: CRI lists {tags:?}, not {r}",
                b.version
            );
        }

        // A re-run pulls nothing: both are found present (seeded), same digests.
        let again = prefetch(&c, dir.path(), &args).await?;
        let ctx = || format!("containerd {}: {}", b.version, again.context());
        ensure!(again.code == 0, "{}", ctx());
        for (r, digest) in [&tiny, &minbase].into_iter().zip(&digests) {
            let img = again.image(r);
            ensure!(img["state"] == "seeded", "{r}: {}", ctx());
            ensure!(img["attempts"] == 0, "{r}: {}", ctx());
            ensure!(img["digest"] == digest.as_str(), "{r}: {}", ctx());
        }
        ensure!(
            again.stdout.lines().all(|l| l.starts_with("present")),
            "{}",
            ctx()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_image_is_given_up_after_max_failures_with_backoff_in_the_status_file()
-> Result<()> {
    let corpus = Corpus::get()?;
    let reg = corpus.plain_registry()?;
    let tiny = image_ref(&reg, "tiny");
    let missing = format!("{}/coral/does-not-exist:latest", reg.host());
    for b in &containerd::available()? {
        let c = Containerd::start(b, &[&reg]).await?;
        let dir = tempfile::tempdir()?;
        let mut args = image_args(&[&tiny, &missing]);
        // "Not found" counts 2: three attempts, two waits of up to 1 s and 2 s.
        args.extend(strings(&[
            "--max-failures",
            "6",
            "--initial-backoff",
            "1s",
            "--max-backoff",
            "10s",
        ]));
        let run = prefetch(&c, dir.path(), &args).await?;
        let ctx = || format!("containerd {}: {}", b.version, run.context());
        ensure!(run.code == 20, "{}", ctx());
        ensure!(run.status()["phase"] == "failed", "{}", ctx());
        ensure!(run.status()["exitCode"] == 20, "{}", ctx());
        ensure!(run.image(&tiny)["state"] == "pulled", "{}", ctx());

        let gone = run.image(&missing);
        ensure!(gone["state"] == "failed", "{}", ctx());
        ensure!(gone["attempts"] == 3, "a refusal counts 2 of 6: {}", ctx());
        let err = gone["lastError"].as_str().unwrap_or("");
        ensure!(err.contains("not found"), "{}", ctx());
        ensure!(err.contains("gave up after 3 attempts"), "{}", ctx());
        ensure!(gone.get("nextRetryAt").is_none(), "{}", ctx());

        // While it waited, the status said so: retrying, when, and why.
        let waits: Vec<&Value> = run
            .snapshots
            .iter()
            .filter_map(|s| {
                s["images"]
                    .as_array()?
                    .iter()
                    .find(|i| i["reference"] == missing.as_str() && i["state"] == "retrying")
            })
            .collect();
        ensure!(!waits.is_empty(), "never seen retrying: {}", ctx());
        for w in &waits {
            ensure!(
                w["nextRetryAt"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{w}"
            );
            ensure!(
                w["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains("not found")),
                "{w}"
            );
            ensure!(matches!(w["attempts"].as_u64(), Some(1 | 2)), "{w}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn with_the_registry_down_the_run_ends_at_its_deadline_and_says_so() -> Result<()> {
    let corpus = Corpus::get()?;
    for b in &containerd::available()? {
        let reg = corpus.plain_registry()?;
        let c = Containerd::start(b, &[&reg]).await?;
        let tiny = image_ref(&reg, "tiny");
        drop(reg);
        let dir = tempfile::tempdir()?;
        let mut args = image_args(&[&tiny]);
        args.extend(strings(&[
            "--deadline",
            "3s",
            "--max-failures",
            "1000",
            "--initial-backoff",
            "100ms",
            "--max-backoff",
            "400ms",
        ]));
        let run = prefetch(&c, dir.path(), &args).await?;
        let ctx = || {
            format!(
                "containerd {}: {:?}; {}",
                b.version,
                run.elapsed,
                run.context()
            )
        };
        ensure!(run.code == 20, "{}", ctx());
        // It stops at the deadline (or just before it, when the next retry
        // would start after it), never long after.
        ensure!(run.elapsed >= Duration::from_millis(2500), "{}", ctx());
        ensure!(run.elapsed < Duration::from_secs(8), "{}", ctx());
        ensure!(run.status()["phase"] == "failed", "{}", ctx());
        let img = run.image(&tiny);
        ensure!(img["state"] == "failed", "{}", ctx());
        ensure!(
            img["attempts"].as_u64().unwrap_or(0) >= 3,
            "kept retrying: {}",
            ctx()
        );
        let err = img["lastError"].as_str().unwrap_or("");
        ensure!(err.contains("deadline"), "{}", ctx());
        ensure!(err.contains("connection refused"), "{}", ctx());
    }
    Ok(())
}

const USER: &str = "coral-node";
const PASSWORD: &str = "fallback-s3cret-9f2c";

fn auth_registry(corpus: &Corpus) -> Result<Registry> {
    corpus.registry(RegistryOptions {
        tls: true,
        auth: Some((USER.into(), PASSWORD.into())),
        ..Default::default()
    })
}

/// Nothing the mounter writes may hold the password.
fn ensure_no_secret(run: &Run) -> Result<()> {
    let status = serde_json::to_string(&run.snapshots)?;
    for (what, text) in [
        ("stdout", &run.stdout),
        ("stderr", &run.stderr),
        ("status", &status),
    ] {
        ensure!(
            !text.contains(PASSWORD),
            "the password is in {what}:\n{text}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_authenticated_registry_is_pulled_with_docker_config_credentials() -> Result<()> {
    let corpus = Corpus::get()?;
    let reg = auth_registry(corpus)?;
    let tiny = image_ref(&reg, "tiny");
    let minbase = image_ref(&reg, "minbase");
    for b in &containerd::available()? {
        let c = Containerd::start(b, &[&reg]).await?;
        let dir = tempfile::tempdir()?;

        // Anonymous: refused, and a refusal counts 2 of 2: one attempt.
        let mut args = image_args(&[&tiny]);
        args.extend(strings(&["--max-failures", "2"]));
        let anon = prefetch(&c, dir.path(), &args).await?;
        let ctx = || format!("containerd {}: {}", b.version, anon.context());
        ensure!(anon.code == 20, "{}", ctx());
        let img = anon.image(&tiny);
        ensure!(
            img["state"] == "failed" && img["attempts"] == 1,
            "{}",
            ctx()
        );
        let err = img["lastError"].as_str().unwrap_or("").to_ascii_lowercase();
        // 1.6 and 2.1 quote the registry's 401; 1.7 says "pull access denied
        // ... authorization failed: no basic auth credentials".
        ensure!(
            ["401", "unauthorized", "authorization failed"]
                .iter()
                .any(|s| err.contains(s)),
            "{}",
            ctx()
        );

        let config = dir.path().join("config.json");
        std::fs::write(
            &config,
            serde_json::json!({
                "auths": {
                    "ghcr.io": {"username": "someone", "password": "else"},
                    reg.host(): {"username": USER, "password": PASSWORD},
                }
            })
            .to_string(),
        )?;
        let mut args = image_args(&[&tiny, &minbase]);
        args.extend(strings(&[
            "--registry-config",
            config.to_str().context("utf-8")?,
        ]));
        let run = prefetch(&c, dir.path(), &args).await?;
        let ctx = || format!("containerd {}: {}", b.version, run.context());
        ensure!(run.code == 0, "{}", ctx());
        for r in [&tiny, &minbase] {
            ensure!(run.image(r)["state"] == "pulled", "{r}: {}", ctx());
        }
        ensure_no_secret(&run)?;
        let tags = cri::tags(c.address()).await?;
        ensure!(tags.contains(&tiny) && tags.contains(&minbase), "{tags:?}");
    }
    Ok(())
}

fn write_script(path: &Path, body: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A credential provider plugin speaking kubelet's exec protocol: it logs
/// each request (stdin) and its arguments to `log`, and answers `user` and
/// the password from `$CORAL_TEST_PASSWORD` (set by the provider config) for
/// `auth_key`, cached per registry.
fn write_plugin(
    bin_dir: &Path,
    name: &str,
    log: &Path,
    auth_key: &str,
    user: &str,
) -> Result<PathBuf> {
    let path = bin_dir.join(name);
    write_script(
        &path,
        &format!(
            r#"request=$(cat)
echo "$* $request" >> '{log}'
cat <<EOF
{{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "kind": "CredentialProviderResponse",
  "cacheKeyType": "Registry", "cacheDuration": "5m",
  "auth": {{"{auth_key}": {{"username": "{user}", "password": "$CORAL_TEST_PASSWORD"}}}}}}
EOF"#,
            log = log.display()
        ),
    )?;
    Ok(path)
}

#[tokio::test]
async fn a_credential_provider_plugin_serves_the_images_its_match_rules_select() -> Result<()> {
    let corpus = Corpus::get()?;
    let auth_reg = auth_registry(corpus)?;
    let plain_reg = corpus.plain_registry()?;
    let tiny = image_ref(&auth_reg, "tiny");
    let minbase = image_ref(&auth_reg, "minbase");
    let plain_tiny = image_ref(&plain_reg, "tiny");
    for b in &containerd::available()? {
        let c = Containerd::start(b, &[&auth_reg, &plain_reg]).await?;
        let dir = tempfile::tempdir()?;
        let bin_dir = dir.path().join("plugins");
        std::fs::create_dir(&bin_dir)?;
        let calls = dir.path().join("calls.log");
        let ecr_calls = dir.path().join("ecr-calls.log");
        write_plugin(
            &bin_dir,
            "coral-test-provider",
            &calls,
            &auth_reg.host(),
            USER,
        )?;
        // Would answer wrong credentials, but its rules match no image here.
        write_plugin(
            &bin_dir,
            "ecr-lookalike",
            &ecr_calls,
            "*.dkr.ecr.*.amazonaws.com",
            "AWS",
        )?;
        let config = dir.path().join("credential-providers.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-lookalike
    matchImages: ["*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn"]
    defaultCacheDuration: 12h
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    env: [{{name: CORAL_TEST_PASSWORD, value: wrong}}]
  - name: coral-test-provider
    # Every part of an IPv4 host, on the authenticated registry's port only.
    matchImages: ["*.*.*.*:{port}"]
    defaultCacheDuration: 1m
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials, --verbose]
    env:
      - name: CORAL_TEST_PASSWORD
        value: {PASSWORD}
"#,
                port = auth_reg.port()
            ),
        )?;
        let mut args = image_args(&[&tiny, &minbase, &plain_tiny]);
        args.extend(strings(&[
            "--credential-provider-config",
            config.to_str().context("utf-8")?,
            "--credential-provider-bin-dir",
            bin_dir.to_str().context("utf-8")?,
            "--max-failures",
            "2",
        ]));
        let run = prefetch(&c, dir.path(), &args).await?;
        let ctx = || format!("containerd {}: {}", b.version, run.context());
        ensure!(run.code == 0, "{}", ctx());
        for r in [&tiny, &minbase, &plain_tiny] {
            ensure!(run.image(r)["state"] == "pulled", "{r}: {}", ctx());
        }
        ensure_no_secret(&run)?;

        // Run once for both images of its registry (cached per registry),
        // asked as kubelet asks: the image name without its tag.
        let log = std::fs::read_to_string(&calls)?;
        ensure!(log.lines().count() == 1, "plugin calls:\n{log}\n{}", ctx());
        let line = log.lines().next().unwrap_or("");
        ensure!(line.starts_with("get-credentials --verbose {"), "{line}");
        let request: Value = serde_json::from_str(&line[line.find('{').unwrap_or(0)..])
            .with_context(|| format!("plugin request: {line}"))?;
        ensure!(request["kind"] == "CredentialProviderRequest", "{request}");
        ensure!(
            request["apiVersion"] == "credentialprovider.kubelet.k8s.io/v1",
            "{request}"
        );
        let asked = request["image"].as_str().unwrap_or("");
        ensure!(
            [&tiny, &minbase]
                .iter()
                .any(|r| r.strip_suffix(":latest") == Some(asked)),
            "{request}"
        );
        // The plain registry's port and the ECR-like globs matched nothing.
        ensure!(!log.contains(&plain_reg.host()), "{log}");
        ensure!(!ecr_calls.exists(), "the ECR-like plugin ran");
    }
    Ok(())
}

#[tokio::test]
async fn without_containerd_every_image_fails_at_the_deadline() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("no-containerd.sock");
    let mut args = strings(&["--image", "registry.example/app:1", "--image", "busybox"]);
    args.extend(strings(&["--deadline", "2s"]));
    let run = prefetch_at(&socket, dir.path(), &args).await?;
    let ctx = || format!("{:?}; {}", run.elapsed, run.context());
    ensure!(run.code == 20, "{}", ctx());
    ensure!(run.elapsed >= Duration::from_secs(2), "{}", ctx());
    ensure!(run.elapsed < Duration::from_secs(6), "{}", ctx());
    ensure!(run.status()["phase"] == "failed", "{}", ctx());
    for r in ["registry.example/app:1", "busybox"] {
        let img = run.image(r);
        ensure!(img["state"] == "failed", "{}", ctx());
        let err = img["lastError"].as_str().unwrap_or("");
        ensure!(
            err.contains("did not answer")
                && err.contains("no-containerd.sock")
                && err.contains("No such file"),
            "{}",
            ctx()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_broken_credential_config_exits_1_and_the_status_file_says_why() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("providers.yaml");
    std::fs::write(
        &config,
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n\
         - name: ecr-credential-provider\n  matchImages: [\"*.dkr.ecr.*.amazonaws.com\"]\n  \
         defaultCacheDuration: 12h\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
    )?;
    let args = strings(&[
        "--image",
        "registry.example/app:1",
        "--credential-provider-config",
        config.to_str().context("utf-8")?,
        "--credential-provider-bin-dir",
        dir.path().to_str().context("utf-8")?,
    ]);
    let run = prefetch_at(&dir.path().join("unused.sock"), dir.path(), &args).await?;
    let ctx = || run.context();
    ensure!(run.code == 1, "{}", ctx());
    ensure!(run.stderr.contains("ecr-credential-provider"), "{}", ctx());
    ensure!(run.status()["phase"] == "failed", "{}", ctx());
    ensure!(run.status()["exitCode"] == 1, "{}", ctx());
    let message = run.status()["message"].as_str().unwrap_or("");
    ensure!(message.contains("does not exist"), "{}", ctx());
    Ok(())
}
