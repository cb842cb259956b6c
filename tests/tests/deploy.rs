//! Everything under `deploy/` is checked by tools that are not coral:
//! built-in kinds by `kubernetes-validate --strict`, custom resources
//! (ImageSeed, Karpenter's EC2NodeClass and NodePool) against their CRDs'
//! schemas, IAM policies against the AWS calls the code makes, and the
//! builder Job's arguments by coral-builder's own parser. The examples are
//! also held to what the code would write (the controller's block device
//! mapping, the node user-data).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use coral_controller::crd::{ImageSeed, SnapshotRef};
use coral_tests::cache::repo_root;
use coral_tests::manifests::{kubernetes_validate, text, validate_cr};
use serde::Deserialize as _;
use serde_json::Value;

/// The YAML files under `deploy/` that hold Kubernetes objects (the node
/// user-data are cloud-init and MIME documents, checked elsewhere).
fn manifests() -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                if !p.ends_with("node/user-data") {
                    walk(&p, out)?;
                }
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&repo_root().join("deploy"), &mut out)?;
    out.sort();
    ensure!(out.len() >= 8, "too few manifests found: {out:?}");
    Ok(out)
}

fn documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).with_context(|| format!("{}", path.display())))
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect()
}

fn shared_schema(name: &str) -> PathBuf {
    repo_root().join("../shared/schemas").join(name)
}

/// The CRD that defines `kind`, for the custom resources deploy/ holds.
fn crd_of(kind: &str) -> Option<PathBuf> {
    match kind {
        "ImageSeed" => Some(repo_root().join("deploy/crd/imageseeds.coral.dev.yaml")),
        "EC2NodeClass" => Some(shared_schema("karpenter.k8s.aws_ec2nodeclasses.yaml")),
        "NodePool" => Some(shared_schema("karpenter.sh_nodepools.yaml")),
        _ => None,
    }
}

#[test]
fn every_manifest_under_deploy_validates_and_a_broken_one_does_not() -> Result<()> {
    let mut builtin_files = Vec::new();
    let mut builtin_objects = 0;
    let mut custom: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    let mut seen = Vec::new();
    for file in manifests()? {
        let docs = documents(&file)?;
        ensure!(!docs.is_empty(), "{}: no object", file.display());
        let mut has_builtin = false;
        for d in &docs {
            let kind = d["kind"].as_str().context("an object without kind")?;
            seen.push(format!("{kind} {}", d["metadata"]["name"]));
            match crd_of(kind) {
                Some(crd) => {
                    custom.entry(crd).or_default().insert(file.clone());
                }
                None => {
                    has_builtin = true;
                    builtin_objects += 1;
                }
            }
        }
        if has_builtin {
            builtin_files.push(file);
        }
    }
    let o = kubernetes_validate(&builtin_files)?;
    ensure!(o.status.success(), "{}", text(&o));
    let passed = text(&o).matches(" passed ").count();
    ensure!(
        passed == builtin_objects,
        "{passed} of {builtin_objects} built-in objects checked:\n{}",
        text(&o)
    );
    ensure!(
        custom.len() == 3,
        "expected ImageSeed, EC2NodeClass and NodePool objects: {seen:?}"
    );
    for (crd, files) in &custom {
        let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let o = validate_cr(crd, &files)?;
        ensure!(
            o.status.success(),
            "against {}: {}",
            crd.display(),
            text(&o)
        );
    }
    println!("checked: {}", seen.join(", "));

    // Each checker refuses a broken copy, so the passes above mean something.
    let work = tempfile::tempdir()?;
    let broken = work.path().join("broken.yaml");
    let deployment =
        std::fs::read_to_string(repo_root().join("deploy/controller/deployment.yaml"))?;
    std::fs::write(
        &broken,
        deployment.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
    )?;
    let o = kubernetes_validate(std::slice::from_ref(&broken))?;
    ensure!(
        !o.status.success(),
        "a misspelled field passed: {}",
        text(&o)
    );
    let karpenter = std::fs::read_to_string(repo_root().join("deploy/examples/karpenter.yaml"))?;
    for (crd, from, to) in [
        (
            "karpenter.k8s.aws_ec2nodeclasses.yaml",
            "deleteOnTermination: true",
            "deleteOnTerminaton: true",
        ),
        (
            "karpenter.k8s.aws_ec2nodeclasses.yaml",
            "volumeSize: 80Gi",
            "volumeSize: 80GB",
        ),
        (
            "karpenter.sh_nodepools.yaml",
            "effect: NoSchedule",
            "effect: NoBoot",
        ),
    ] {
        ensure!(karpenter.contains(from), "the example has no {from:?}");
        std::fs::write(&broken, karpenter.replacen(from, to, 1))?;
        let o = validate_cr(&shared_schema(crd), &[&broken])?;
        ensure!(!o.status.success(), "{to:?} passed: {}", text(&o));
    }
    Ok(())
}

fn example_seed() -> Result<ImageSeed> {
    let path = repo_root().join("deploy/examples/imageseed.yaml");
    Ok(serde_norway::from_str(&std::fs::read_to_string(&path)?)?)
}

/// The userData the Karpenter example carries: the shell part of the
/// AL2023 user-data, in a MIME document of its own (Karpenter writes the
/// NodeConfig).
fn karpenter_user_data() -> Result<String> {
    let al2023 =
        std::fs::read_to_string(repo_root().join("deploy/node/user-data/al2023-nodeadm.yaml"))?;
    let marker = "--CORAL-BOUNDARY\nContent-Type: text/x-shellscript";
    let shell = &al2023[al2023.find(marker).context("the shell part")?..];
    Ok(format!(
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"CORAL-BOUNDARY\"\n\n{shell}"
    ))
}

/// The Karpenter example is what an operator gets once coral rolled out:
/// its seed mapping is the one coral-controller writes for the example
/// ImageSeed (with the example's snapshot ID), beside the class's own root
/// volume; the NodePool starts nodes with the seed's startup taint; the
/// userData is the AL2023 user-data's shell part, word for word.
#[test]
fn the_karpenter_example_is_what_the_controller_and_the_user_data_make() -> Result<()> {
    let path = repo_root().join("deploy/examples/karpenter.yaml");
    let docs = documents(&path)?;
    let class = docs
        .iter()
        .find(|d| d["kind"] == "EC2NodeClass")
        .context("an EC2NodeClass")?;
    let pool = docs
        .iter()
        .find(|d| d["kind"] == "NodePool")
        .context("a NodePool")?;
    let seed = example_seed()?;
    let name = class["metadata"]["name"].as_str().context("name")?;
    ensure!(
        seed.spec.targets.ec2_node_classes.iter().any(|c| c == name),
        "the example ImageSeed does not target EC2NodeClass {name}"
    );
    let mappings = class["spec"]["blockDeviceMappings"]
        .as_array()
        .context("blockDeviceMappings")?;
    let (coral, own): (Vec<&Value>, Vec<&Value>) = mappings
        .iter()
        .partition(|m| m["deviceName"] == seed.spec.volume.device_name.as_str());
    ensure!(
        coral.len() == 1,
        "one mapping on {}",
        seed.spec.volume.device_name
    );
    let snapshot_id = coral[0]["ebs"]["snapshotID"]
        .as_str()
        .context("snapshotID")?;
    let snap = SnapshotRef {
        snapshot_id: snapshot_id.into(),
        manifest_digest: String::new(),
        seed_key: String::new(),
        created: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ),
        complete: true,
        volume_size_gib: None,
    };
    let mut before = class["spec"].clone();
    before["blockDeviceMappings"] = Value::Array(own.into_iter().cloned().collect());
    let written = coral_controller::rollout::desired_mappings(&before, &seed, &snap);
    ensure!(
        Value::Array(written.clone()) == class["spec"]["blockDeviceMappings"],
        "the controller would write {}",
        serde_json::to_string_pretty(&written)?
    );
    let key = &seed
        .spec
        .startup_taint
        .as_ref()
        .context("startupTaint")?
        .key;
    let taints = pool["spec"]["template"]["spec"]["startupTaints"]
        .as_array()
        .context("startupTaints")?;
    ensure!(
        taints.iter().any(|t| t["key"] == key.as_str()),
        "the NodePool lacks the startup taint {key}"
    );
    ensure!(pool["spec"]["template"]["spec"]["nodeClassRef"]["name"] == name);

    let want = karpenter_user_data()?;
    let have = class["spec"]["userData"].as_str().context("userData")?;
    if have != want {
        if std::env::var_os("CORAL_UPDATE_EXAMPLES").is_some() {
            let file = std::fs::read_to_string(&path)?;
            let indent = |s: &str| {
                s.trim_end_matches('\n')
                    .lines()
                    .map(|l| {
                        if l.is_empty() {
                            String::new()
                        } else {
                            format!("    {l}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let updated = file.replacen(&indent(have), &indent(&want), 1);
            ensure!(
                updated != file,
                "could not find the userData block to rewrite"
            );
            std::fs::write(&path, updated)?;
            bail!("{} rewritten: check and commit it", path.display());
        }
        bail!(
            "the example's userData differs from deploy/node/user-data/al2023-nodeadm.yaml's shell part (CORAL_UPDATE_EXAMPLES=1 rewrites it)"
        );
    }
    Ok(())
}

/// The standalone builder Job's arguments are accepted by coral-builder's
/// parser and option checks: it gets as far as its deadline (1 ms). A
/// misspelled flag is a usage error (exit 2), so acceptance means something.
#[test]
fn the_builder_job_example_runs_arguments_coral_builder_accepts() -> Result<()> {
    let docs = documents(&repo_root().join("deploy/builder/job.yaml"))?;
    let job = docs.iter().find(|d| d["kind"] == "Job").context("a Job")?;
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    ensure!(container["securityContext"]["privileged"] == true);
    let args: Vec<String> = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect();
    let work = tempfile::tempdir()?;
    let local: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("--output=") {
                format!("--output={}", work.path().join("seed.img").display())
            } else if let Some(image) = a.strip_prefix("--image=") {
                format!("--image={}", coral_tests::manifests::on_loopback(image))
            } else {
                a.clone()
            }
        })
        .collect();
    let broken: Vec<String> = local
        .iter()
        .map(|a| a.replace("--fs=", "--filesystem="))
        .collect();
    coral_tests::manifests::builder_accepts(&local, &broken)
}

// ---- IAM --------------------------------------------------------------

/// The operations of each AWS SDK crate the workspace links (their
/// `src/operation/<name>` modules, snake_case), from the sources cargo
/// unpacked for the versions Cargo.lock pins.
fn sdk_operations() -> Result<BTreeMap<&'static str, BTreeSet<String>>> {
    let lock = std::fs::read_to_string(repo_root().join("Cargo.lock"))?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("no CARGO_HOME or HOME")?;
    let registries: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    let mut ops = BTreeMap::new();
    for (service, krate) in [
        ("ec2", "aws-sdk-ec2"),
        ("ebs", "aws-sdk-ebs"),
        ("ecr", "aws-sdk-ecr"),
    ] {
        let version = lock
            .split("[[package]]")
            .find(|p| p.contains(&format!("name = \"{krate}\"\n")))
            .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
            .map(|v| v.trim_matches('"').to_owned())
            .with_context(|| format!("{krate} in Cargo.lock"))?;
        let dir = registries
            .iter()
            .map(|r| r.join(format!("{krate}-{version}/src/operation")))
            .find(|d| d.is_dir())
            .with_context(|| format!("the sources of {krate} {version} (cargo fetch)"))?;
        let names: BTreeSet<String> = std::fs::read_dir(&dir)?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(names.len() > 5, "{}: too few operations", dir.display());
        ops.insert(service, names);
    }
    Ok(ops)
}

/// `describe_snapshots` -> `describesnapshots`, `ec2:DescribeSnapshots` ->
/// `describesnapshots`: the two spellings compared.
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Every SDK operation called in `files` (outside `#[cfg(test)]` code):
/// `service:operation`, squashed. A call is `.operation()` (the SDK's fluent
/// builders take no arguments) in a file that names that service's crate.
fn sdk_calls(
    files: &[PathBuf],
    ops: &BTreeMap<&'static str, BTreeSet<String>>,
) -> Result<BTreeMap<String, String>> {
    let mut calls = BTreeMap::new();
    for f in files {
        let src = std::fs::read_to_string(f)?;
        let src = match src.find("#[cfg(test)]") {
            Some(i) => &src[..i],
            None => &src[..],
        };
        for (service, names) in ops {
            if !src.contains(&format!("aws_sdk_{service}")) {
                continue;
            }
            for name in names {
                if src.contains(&format!(".{name}()")) {
                    calls.insert(
                        format!("{service}:{}", squash(name)),
                        format!("{} ({service} {name})", f.display()),
                    );
                }
            }
        }
    }
    Ok(calls)
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(rust_files(&p)?);
        } else if p.extension().is_some_and(|x| x == "rs")
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("tests.rs"))
        {
            out.push(p);
        }
    }
    Ok(out)
}

/// A policy's Allow statements: (action, statement).
fn allowed(policy: &Path) -> Result<Vec<(String, Value)>> {
    let doc: Value = serde_json::from_slice(&std::fs::read(policy)?)
        .with_context(|| format!("{}", policy.display()))?;
    ensure!(
        doc["Version"] == "2012-10-17",
        "{}: Version",
        policy.display()
    );
    let mut out = Vec::new();
    for s in doc["Statement"].as_array().context("Statement")? {
        ensure!(
            s["Effect"] == "Allow",
            "{}: only Allow statements",
            policy.display()
        );
        ensure!(s["Sid"].is_string() && s["Resource"] != Value::Null, "{s}");
        let actions = match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            other => bail!("{}: Action {other}", policy.display()),
        };
        for a in actions {
            ensure!(
                !a.contains('*'),
                "{}: wildcard action {a}",
                policy.display()
            );
            out.push((a, s.clone()));
        }
    }
    Ok(out)
}

/// Each IAM policy in deploy/iam allows exactly what its component's code
/// calls: every AWS SDK operation in the sources has a permission, and
/// every permission is either such a call, a tag written as part of one
/// (`ec2:CreateTags` conditioned on `ec2:CreateAction`), or one of the
/// few used outside the SDK (listed here, with why). The README explains
/// each permission.
#[test]
fn every_aws_call_in_the_code_has_exactly_one_iam_permission() -> Result<()> {
    let ops = sdk_operations()?;
    let root = repo_root();
    // Used outside the AWS SDK: the registry protocol with an ECR token,
    // the node user-data's `aws s3 cp`, kubelet's ECR credential provider.
    let outside_sdk: BTreeMap<&str, &[&str]> = BTreeMap::from([
        (
            "builder.json",
            &["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"][..],
        ),
        ("controller.json", &["ecr:BatchGetImage"][..]),
        (
            "node.json",
            &[
                "s3:GetObject",
                "ecr:GetAuthorizationToken",
                "ecr:BatchGetImage",
                "ecr:GetDownloadUrlForLayer",
            ][..],
        ),
    ]);
    let sources: BTreeMap<&str, Vec<PathBuf>> = BTreeMap::from([
        ("builder.json", {
            let mut v = rust_files(&root.join("snapshot/src"))?;
            v.extend(rust_files(&root.join("builder/src"))?);
            v
        }),
        ("controller.json", {
            // The controller resolves tags with the builder's registry
            // client, whose ECR token call is in auth.rs.
            let mut v = rust_files(&root.join("controller/src"))?;
            v.push(root.join("builder/src/auth.rs"));
            v
        }),
        ("node.json", rust_files(&root.join("node-mounter/src"))?),
    ]);
    let readme = std::fs::read_to_string(root.join("deploy/iam/README.md"))?;
    let mut report = Vec::new();
    for (policy, files) in &sources {
        let calls = sdk_calls(files, &ops)?;
        let allow = allowed(&root.join("deploy/iam").join(policy))?;
        let granted: BTreeSet<String> = allow.iter().map(|(a, _)| squash(a)).collect();
        for (call, site) in &calls {
            ensure!(granted.contains(call), "{policy}: no permission for {site}");
        }
        let mut seen = BTreeSet::new();
        for (action, statement) in &allow {
            ensure!(seen.insert(action.clone()), "{policy}: {action} twice");
            ensure!(
                readme.contains(&format!("`{action}`")),
                "deploy/iam/README.md does not explain {policy}'s {action}"
            );
            if calls.contains_key(&squash(action)) || outside_sdk[policy].contains(&action.as_str())
            {
                continue;
            }
            if action == "ec2:CreateTags" {
                let on = &statement["Condition"]["StringEquals"]["ec2:CreateAction"];
                let on: Vec<&str> = match on {
                    Value::String(s) => vec![s.as_str()],
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                ensure!(
                    !on.is_empty(),
                    "{policy}: ec2:CreateTags without an ec2:CreateAction condition"
                );
                for create in on {
                    ensure!(
                        calls
                            .keys()
                            .any(|c| c.ends_with(&format!(":{}", squash(create)))),
                        "{policy}: tags on {create}, which the code never calls"
                    );
                }
                continue;
            }
            bail!("{policy}: {action} is allowed but the code never calls it");
        }
        report.push(format!(
            "{policy}: {} calls, {} permissions",
            calls.len(),
            allow.len()
        ));
    }
    ensure!(
        sdk_calls(&sources["node.json"], &ops)?.is_empty(),
        "the node mounter calls AWS"
    );
    println!("{}", report.join("; "));
    Ok(())
}
