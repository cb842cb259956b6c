//! Reconcile scenarios against the in-process mock API server
//! (`coral_controller::fixtures`): each expects exactly the requests it
//! lists, in order, and fails on a missing or an unexpected one. EC2 calls
//! go to moto's server through the real AWS SDK.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{Value, json};

use coral_controller::crd::{FINALIZER, ImageSeed};
use coral_controller::fixtures::{ApiServer, Seen, created, empty_list, mock_client, ok};
use coral_controller::reconcile::{Context, Resolver, reconcile};
use coral_tests::moto::Moto;

const NS: &str = "coral-system";
const SEEDS: &str = "/apis/coral.dev/v1alpha1/imageseeds";
const JOBS: &str = "/apis/batch/v1/namespaces/coral-system/jobs";
const PODS: &str = "/api/v1/namespaces/coral-system/pods";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn seed_json(finalized: bool, status: Value) -> Value {
    let mut meta =
        json!({"name": "web", "uid": "uid-web-1", "generation": 1, "resourceVersion": "10"});
    if finalized {
        meta["finalizers"] = json!([FINALIZER]);
    }
    json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSeed", "metadata": meta,
        "spec": {"images": ["registry.example:5000/app:1"], "platforms": ["linux/amd64"]},
        "status": status,
    })
}

fn seed(finalized: bool, status: Value) -> ImageSeed {
    serde_json::from_value(seed_json(finalized, status)).expect("an ImageSeed")
}

type Table = Arc<Mutex<BTreeMap<String, String>>>;

/// An EC2 client for scenarios that must not reach EC2: its endpoint
/// refuses connections, so a call fails the scenario.
fn no_ec2() -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url("http://127.0.0.1:9")
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "x", "y", None, None, "test",
        ))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

fn context(table: &[(&str, &str)]) -> (Arc<Context>, ApiServer, Table) {
    context_with(table, no_ec2())
}

fn context_with(
    table: &[(&str, &str)],
    ec2: aws_sdk_ec2::Client,
) -> (Arc<Context>, ApiServer, Table) {
    let (client, server) = mock_client(NS);
    let map: BTreeMap<String, String> = table
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let map = Arc::new(Mutex::new(map));
    let ctx = Context::new(
        client,
        NS,
        Resolver::Fixed(map.clone()),
        "registry.example/coral-builder:test",
        PodTemplateSpec::default(),
        ec2,
    );
    (Arc::new(ctx), server, map)
}

/// The object the apiserver returns after a status merge patch: the
/// seed's status with the patch applied (RFC 7386: `null` removes).
fn with_status(seed: &Value, patch: &Value) -> Value {
    fn apply(target: &mut Value, patch: &Value) {
        match patch {
            Value::Object(p) => {
                if !target.is_object() {
                    *target = json!({});
                }
                let t = target.as_object_mut().unwrap();
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        apply(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            other => *target = other.clone(),
        }
    }
    let mut out = seed.clone();
    apply(&mut out["status"], &patch["status"]);
    out
}

#[test]
fn a_status_patch_removes_what_the_status_no_longer_has() {
    // A pending snapshot approved, a build finished: their keys must go,
    // nested optional fields too (a merge patch that omits them keeps them).
    let old = json!({"pending": {"snapshotId": "s2"}, "build": {"job": "j"},
                     "current": {"snapshotId": "s1", "volumeSizeGib": 2}, "phase": "AwaitingApproval"});
    let new = json!({"current": {"snapshotId": "s2"}, "phase": "Ready"});
    let patch = coral_controller::reconcile::merge_patch(&old, &new);
    assert_eq!(
        patch,
        json!({"pending": null, "build": null,
                             "current": {"snapshotId": "s2", "volumeSizeGib": null}, "phase": "Ready"})
    );
    let applied = with_status(&json!({"status": old}), &json!({"status": patch}));
    assert_eq!(applied["status"], new);
}

fn echo_event(server_seen: &Seen) -> (StatusCode, Value) {
    created(server_seen.body.clone())
}

/// The seed key the builder computes for `app:1` resolved to `digest`.
fn key_for(digest: &str) -> String {
    let name: coral_seed::Reference = "registry.example:5000/app:1".parse().unwrap();
    let d: coral_seed::Digest = digest.parse().unwrap();
    coral_seed::manifest::seed_key(&["linux/amd64".parse().unwrap()], [(&name, &d)]).to_string()
}

fn job_with(name: &str, key: &str, condition: Option<(&str, &str)>) -> Value {
    let mut job = json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": "2026-11-26T00:00:00Z",
                     "labels": {"coral.dev/imageseed-uid": "uid-web-1",
                                "coral.dev/seed-key-hash": coral_controller::job::key_hash(key)}},
        "spec": {"template": {"spec": {"containers": []}}},
        "status": {},
    });
    if let Some((type_, at)) = condition {
        job["status"] = json!({"conditions": [{"type": type_, "status": "True",
            "lastTransitionTime": at, "message": "exit 1: coral-builder: error: registry said 500"}],
            "completionTime": at});
    }
    job
}

fn job_list(items: Vec<Value>) -> Value {
    let mut l = empty_list("batch/v1", "JobList");
    l["items"] = Value::Array(items);
    l
}

#[tokio::test]
async fn a_new_seed_gets_the_finalizer_first() {
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let s = seed(false, Value::Null);
    let scenario = tokio::spawn(async move {
        let seen = api
            .expect(Method::PATCH, &format!("{SEEDS}/web"), |_| {
                ok(seed_json(true, Value::Null))
            })
            .await;
        assert!(seen.body.to_string().contains(FINALIZER), "{}", seen.body);
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn a_new_seed_gets_a_builder_job() {
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let s = seed(true, Value::Null);
    let obj = seed_json(true, Value::Null);
    let key = key_for(D1);
    let scenario = tokio::spawn(async move {
        let list = api
            .expect(Method::GET, JOBS, |_| ok(job_list(vec![])))
            .await;
        assert!(
            list.query.contains("coral.dev%2Fseed-key-hash")
                || list.query.contains("coral.dev/seed-key-hash"),
            "{}",
            list.query
        );
        let job = api
            .expect(Method::POST, JOBS, |s| created(s.body.clone()))
            .await
            .body;
        assert_eq!(job["spec"]["backoffLimit"], 0);
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["name"], "builder");
        assert_eq!(c["securityContext"]["privileged"], true);
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--image", "registry.example:5000/app:1"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--snapshot", "ebs-direct"]),
            "{args:?}"
        );
        assert_eq!(job["metadata"]["ownerReferences"][0]["uid"], "uid-web-1");
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "BuildStarted");
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["phase"], "Building");
        assert_eq!(st["status"]["seedKey"], key.as_str());
        assert_eq!(st["status"]["images"][0]["resolvedDigest"], D1);
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

/// A snapshot in moto, as a builder's ebs-direct upload leaves it:
/// completed, tagged with the seed key. Returns its ID.
async fn moto_snapshot(ec2: &aws_sdk_ec2::Client, key: &str) -> String {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let vol = ec2
        .create_volume()
        .availability_zone("us-east-1a")
        .size(2)
        .send()
        .await
        .expect("CreateVolume");
    let snap = ec2
        .create_snapshot()
        .volume_id(vol.volume_id().unwrap())
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Snapshot)
                .tags(Tag::builder().key("coral/seed-key").value(key).build())
                .build(),
        )
        .send()
        .await
        .expect("CreateSnapshot");
    snap.snapshot_id().unwrap().to_string()
}

/// The Job's pod, with the builder's report as its termination message.
fn pods_with_report(job: &str, report: &Value) -> Value {
    let mut l = empty_list("v1", "PodList");
    l["items"] = json!([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("{job}-x")},
        "status": {"containerStatuses": [{"name": "builder", "image": "b", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 0, "message": report.to_string()}}}]}}]);
    l
}

#[tokio::test]
async fn a_finished_build_records_its_snapshot_once_ec2_shows_it() {
    let moto = Moto::start().expect("moto");
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let key = key_for(D1);
    let snap = moto_snapshot(&ec2, &key).await;
    let (ctx, mut api, _) = context_with(&[("registry.example:5000/app:1", D1)], ec2.clone());
    let status = json!({"phase": "Building", "seedKey": key});
    let s = seed(true, status.clone());
    let obj = seed_json(true, status);
    let job_name = coral_controller::job::job_name(&s, &key, 1);
    let (k2, jn, sn) = (key.clone(), job_name.clone(), snap.clone());
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| {
            ok(job_list(vec![job_with(
                &jn,
                &k2,
                Some(("Complete", "2026-11-26T01:00:00Z")),
            )]))
        })
        .await;
        let report = json!({"v": 1, "seedKey": k2, "manifestDigest": D2, "snapshotId": sn, "volumeSizeGib": 2});
        let pods = api
            .expect(Method::GET, PODS, |_| ok(pods_with_report(&jn, &report)))
            .await;
        assert!(pods.query.contains("job-name"), "{}", pods.query);
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "BuildSucceeded");
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["phase"], "Ready");
        assert_eq!(st["status"]["current"]["snapshotId"], sn.as_str());
        assert_eq!(st["status"]["history"][0]["complete"], true);
        assert_eq!(st["status"]["history"][0]["volumeSizeGib"], 2);
        assert_eq!(st["status"]["images"][0]["inCurrentSnapshot"], true);
        api.done().await;
    });
    reconcile(Arc::new(s.clone()), ctx)
        .await
        .expect("reconcile");
    scenario.await.expect("the scenario");

    // A report naming a snapshot EC2 does not have (or not for this key) is
    // never recorded, so never rolled out.
    let (ctx, mut api, _) = context_with(&[("registry.example:5000/app:1", D1)], ec2.clone());
    let obj = seed_json(true, json!({"phase": "Building", "seedKey": key}));
    let other = moto_snapshot(&ec2, "sha256:someotherkey").await;
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| {
            ok(job_list(vec![job_with(
                &job_name,
                &key,
                Some(("Complete", "2026-11-26T01:00:00Z")),
            )]))
        })
        .await;
        let report = json!({"v": 1, "seedKey": key, "manifestDigest": D2, "snapshotId": other});
        api.expect(Method::GET, PODS, |_| {
            ok(pods_with_report(&job_name, &report))
        })
        .await;
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["phase"], "Failed");
        assert!(st["status"].get("current").is_none(), "{st}");
        assert!(st["status"].get("history").is_none(), "{st}");
        let built = st["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Built")
            .cloned()
            .unwrap();
        assert_eq!(built["reason"], "IncompleteReport");
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

/// Karpenter's EC2NodeClass schema (from ../shared/schemas) checks what
/// coral writes; a broken copy must fail.
fn check_node_class(obj: &Value) {
    let work = tempfile::tempdir().unwrap();
    let crd = coral_tests::cache::repo_root()
        .join("../shared/schemas/karpenter.k8s.aws_ec2nodeclasses.yaml");
    let run = |v: &Value| {
        let f = work.path().join("nc.yaml");
        std::fs::write(&f, serde_norway::to_string(v).unwrap()).unwrap();
        std::process::Command::new(coral_tests::cache::cache_dir().join("venv/bin/python3"))
            .arg(coral_tests::cache::repo_root().join("tests/fixtures/validate-cr"))
            .arg(&crd)
            .arg(&f)
            .output()
            .unwrap()
    };
    let o = run(obj);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let broken: Value =
        serde_json::from_str(&obj.to_string().replace("snapshotID", "snapshotId")).unwrap();
    assert!(
        !run(&broken).status.success(),
        "a misspelled snapshotId passed the schema"
    );
}

#[tokio::test]
async fn a_built_snapshot_rolls_out_to_node_classes_and_launch_templates() {
    use aws_sdk_ec2::types::{
        LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
        RequestLaunchTemplateData,
    };
    let moto = Moto::start().expect("moto");
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let key = key_for(D1);
    let snap = moto_snapshot(&ec2, &key).await;
    // A launch template with a root volume of its own.
    let lt = ec2
        .create_launch_template()
        .launch_template_name("gpu-nodes")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id("ami-12345678")
                .block_device_mappings(
                    LaunchTemplateBlockDeviceMappingRequest::builder()
                        .device_name("/dev/xvda")
                        .ebs(
                            LaunchTemplateEbsBlockDeviceRequest::builder()
                                .volume_size(50)
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("CreateLaunchTemplate");
    let lt_id = lt
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    let (ctx, mut api, _) = context_with(&[("registry.example:5000/app:1", D1)], ec2.clone());
    let entry = json!({"snapshotId": snap, "manifestDigest": D2, "seedKey": key,
                       "created": "2026-11-26T00:00:00Z", "complete": true, "volumeSizeGib": 2});
    let status = json!({"phase": "Ready", "seedKey": key, "history": [entry]});
    let mut v = seed_json(true, status.clone());
    v["spec"]["targets"] = json!({"ec2NodeClasses": ["default"], "launchTemplates": [lt_id]});
    v["spec"]["volume"] = json!({"sizeGiB": 40, "throughput": 500, "initializationRate": 300});
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    // The class as the user wrote it: AL2023 by alias, no mappings (so
    // Karpenter's default root volume applies).
    let class = json!({"apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass",
        "metadata": {"name": "default", "resourceVersion": "77"},
        "spec": {"amiSelectorTerms": [{"alias": "al2023@latest"}], "role": "KarpenterNodeRole",
                 "subnetSelectorTerms": [{"tags": {"karpenter.sh/discovery": "demo"}}],
                 "securityGroupSelectorTerms": [{"tags": {"karpenter.sh/discovery": "demo"}}]}});
    let (sn, obj, cl) = (snap.clone(), v.clone(), class.clone());
    let scenario = tokio::spawn(async move {
        let ncs = "/apis/karpenter.k8s.aws/v1/ec2nodeclasses/default";
        api.expect(Method::GET, ncs, |_| ok(cl.clone())).await;
        let patch = api
            .expect(Method::PATCH, ncs, |p| {
                let mut out = cl.clone();
                out["spec"]["blockDeviceMappings"] = p.body["spec"]["blockDeviceMappings"].clone();
                ok(out)
            })
            .await
            .body;
        assert_eq!(patch["metadata"]["resourceVersion"], "77", "{patch}");
        let list = patch["spec"]["blockDeviceMappings"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(list.len(), 2, "{patch}");
        assert_eq!(
            list[0]["deviceName"], "/dev/xvda",
            "the default root volume was written out: {patch}"
        );
        assert_eq!(list[0]["rootVolume"], true);
        assert_eq!(list[1]["deviceName"], "/dev/xvdc");
        assert_eq!(list[1]["ebs"]["snapshotID"], sn.as_str());
        assert_eq!(list[1]["ebs"]["volumeSize"], "40Gi");
        assert_eq!(list[1]["ebs"]["volumeInitializationRate"], 300);
        let mut patched = cl.clone();
        patched["spec"]["blockDeviceMappings"] = Value::Array(list);
        check_node_class(&patched);
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "RolledOut");
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert!(
            ev["note"].as_str().unwrap().contains("launch template"),
            "{ev}"
        );
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["current"]["snapshotId"], sn.as_str());
        let rolled = st["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "RolledOut")
            .cloned()
            .unwrap();
        assert_eq!(rolled["status"], "True", "{st}");
        assert_eq!(st["status"]["targets"][1]["version"], 2, "{st}");
        api.done().await;
        patched
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    let patched = scenario.await.expect("the scenario");

    // EC2: version 2 is the default, with the root volume kept and coral's.
    let out = ec2
        .describe_launch_template_versions()
        .launch_template_id(&lt_id)
        .versions("$Default")
        .send()
        .await
        .expect("DescribeLaunchTemplateVersions");
    let v2 = &out.launch_template_versions()[0];
    assert_eq!(v2.version_number(), Some(2));
    let maps = v2.launch_template_data().unwrap().block_device_mappings();
    let dev = |d: &str| {
        maps.iter()
            .find(|m| m.device_name() == Some(d))
            .and_then(|m| m.ebs())
            .cloned()
    };
    assert_eq!(
        dev("/dev/xvda").and_then(|e| e.volume_size()),
        Some(50),
        "{maps:?}"
    );
    let ours = dev("/dev/xvdc").expect("coral's mapping");
    assert_eq!(ours.snapshot_id(), Some(snap.as_str()));
    assert_eq!(
        (ours.volume_size(), ours.delete_on_termination()),
        (Some(40), Some(true))
    );

    // Again, with everything in place: nothing is written.
    let (ctx, mut api, _) = context_with(&[("registry.example:5000/app:1", D1)], ec2.clone());
    let mut again = v.clone();
    again["status"]["current"] = entry.clone();
    again["status"]["targets"] = json!([
        {"kind": "EC2NodeClass", "name": "default", "snapshotId": snap},
        {"kind": "LaunchTemplate", "name": lt_id, "snapshotId": snap, "version": 2}]);
    let s: ImageSeed = serde_json::from_value(again.clone()).unwrap();
    let scenario = tokio::spawn(async move {
        api.expect(
            Method::GET,
            "/apis/karpenter.k8s.aws/v1/ec2nodeclasses/default",
            |_| ok(patched),
        )
        .await;
        // Only the resolve time moved: a status write, and nothing else.
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&again, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["current"]["snapshotId"], snap.as_str());
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
    let out = ec2
        .describe_launch_template_versions()
        .launch_template_id(&lt_id)
        .send()
        .await
        .expect("DescribeLaunchTemplateVersions");
    assert_eq!(
        out.launch_template_versions().len(),
        2,
        "a second rollout made another version"
    );
}

#[tokio::test]
async fn a_manual_rollout_waits_for_the_approve_annotation() {
    let old = json!({"snapshotId": "snap-old", "manifestDigest": D1, "seedKey": "sha256:old",
                     "created": "2026-11-25T00:00:00Z", "complete": true});
    let key = key_for(D1);
    let new = json!({"snapshotId": "snap-new", "manifestDigest": D2, "seedKey": key,
                     "created": "2026-11-26T00:00:00Z", "complete": true});
    let status = json!({"phase": "Ready", "seedKey": key, "current": old, "history": [new, old]});
    let mut v = seed_json(true, status);
    v["spec"]["rollout"] = json!({"policy": "Manual"});
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let obj = v.clone();
    let scenario = tokio::spawn(async move {
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "ApprovalRequired");
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["phase"], "AwaitingApproval");
        assert_eq!(st["status"]["pending"]["snapshotId"], "snap-new");
        assert_eq!(st["status"]["current"]["snapshotId"], "snap-old");
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");

    // Approved: the new snapshot becomes current.
    v["metadata"]["annotations"] = json!({"coral.dev/approve": "snap-new"});
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let scenario = tokio::spawn(async move {
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&v, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["current"]["snapshotId"], "snap-new");
        assert!(
            st["status"].get("pending").is_none() || st["status"]["pending"].is_null(),
            "{st}"
        );
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn a_moved_tag_starts_a_rebuild() {
    let old = key_for(D1);
    let (ctx, mut api, table) = context(&[("registry.example:5000/app:1", D1)]);
    // Built and rolled out for D1; the tag now names D2.
    table
        .lock()
        .unwrap()
        .insert("registry.example:5000/app:1".into(), D2.into());
    let snap = json!({"snapshotId": "snap-1", "manifestDigest": D1, "seedKey": old,
                      "created": "2026-11-26T00:00:00Z", "complete": true});
    let status = json!({"phase": "Ready", "seedKey": old, "current": snap, "history": [snap]});
    let s = seed(true, status.clone());
    let obj = seed_json(true, status);
    let new = key_for(D2);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| ok(job_list(vec![])))
            .await;
        let job = api
            .expect(Method::POST, JOBS, |s| created(s.body.clone()))
            .await
            .body;
        assert_eq!(
            job["metadata"]["annotations"]["coral.dev/seed-key"],
            new.as_str()
        );
        api.expect(Method::POST, EVENTS, echo_event).await;
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["seedKey"], new.as_str());
        assert_eq!(st["status"]["phase"], "Building");
        // The old snapshot stays current until the new one is built.
        assert_eq!(st["status"]["current"]["snapshotId"], "snap-1");
        assert_eq!(st["status"]["images"][0]["inCurrentSnapshot"], false);
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn a_failed_build_backs_off_then_tries_again() {
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let key = key_for(D1);
    let s = seed(true, json!({"phase": "Building", "seedKey": key}));
    let obj = seed_json(true, json!({"phase": "Building", "seedKey": key}));
    let first = coral_controller::job::job_name(&s, &key, 1);
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let (k2, f2, o2) = (key.clone(), first.clone(), obj.clone());
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| {
            ok(job_list(vec![job_with(
                &f2,
                &k2,
                Some(("Failed", &just_now)),
            )]))
        })
        .await;
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "BuildFailed");
        assert_eq!(ev["type"], "Warning");
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&o2, &s.body))
            })
            .await
            .body;
        let built = st["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Built")
            .cloned()
            .unwrap();
        assert_eq!(
            (built["status"].as_str(), built["reason"].as_str()),
            (Some("False"), Some("BuildFailed"))
        );
        assert!(
            built["message"]
                .as_str()
                .unwrap()
                .contains("registry said 500"),
            "{built}"
        );
        assert_eq!(st["status"]["build"]["failureCount"], 1);
        assert!(st["status"]["build"]["nextRetry"].is_string());
        // No Job is created before the backoff ends.
        api.done().await;
    });
    let action = reconcile(Arc::new(s.clone()), ctx)
        .await
        .expect("reconcile");
    scenario.await.expect("the scenario");
    assert!(format!("{action:?}").contains("requeue"), "{action:?}");

    // Once the backoff has passed, attempt 2.
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let long_ago = "2026-01-01T00:00:00Z";
    let second = coral_controller::job::job_name(&s, &key, 2);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| {
            ok(job_list(vec![job_with(
                &first,
                &key,
                Some(("Failed", long_ago)),
            )]))
        })
        .await;
        let job = api
            .expect(Method::POST, JOBS, |s| created(s.body.clone()))
            .await
            .body;
        assert_eq!(job["metadata"]["name"], second.as_str());
        api.expect(Method::POST, EVENTS, echo_event).await;
        api.expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
            ok(with_status(&obj, &s.body))
        })
        .await;
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn deleting_removes_the_jobs_then_the_finalizer() {
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let mut v = seed_json(true, Value::Null);
    v["metadata"]["deletionTimestamp"] = json!("2026-11-26T02:00:00Z");
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let scenario = tokio::spawn(async move {
        let del = api
            .expect(Method::DELETE, JOBS, |_| ok(job_list(vec![])))
            .await;
        assert!(del.query.contains("uid-web-1"), "{}", del.query);
        api.expect(Method::POST, EVENTS, echo_event).await;
        let fin = api
            .expect(Method::PATCH, &format!("{SEEDS}/web"), |_| {
                let mut done = v.clone();
                done["metadata"]["finalizers"] = json!([]);
                ok(done)
            })
            .await;
        assert!(fin.body.to_string().contains("remove"), "{}", fin.body);
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn an_unresolvable_image_is_reported_per_reference_and_retried() {
    let (ctx, mut api, _) = context(&[]);
    let s = seed(true, Value::Null);
    let obj = seed_json(true, Value::Null);
    let scenario = tokio::spawn(async move {
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        let img = &st["status"]["images"][0];
        assert_eq!(img["failureCount"], 1);
        assert!(
            img["lastError"].as_str().unwrap().contains("not found"),
            "{img}"
        );
        assert!(img["nextRetry"].is_string());
        assert_eq!(st["status"]["phase"], "Resolving");
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn retention_deletes_the_oldest_unused_snapshot_and_keeps_used_ones() {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let moto = Moto::start().expect("moto");
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let key = key_for(D1);
    // Five snapshots, newest first: s1 current; s3 has a volume made from
    // it; s5 is not tagged as this seed's.
    let mut ids = Vec::new();
    for i in 0..5 {
        let vol = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .send()
            .await
            .unwrap();
        let mut tags = TagSpecification::builder()
            .resource_type(ResourceType::Snapshot)
            .tags(Tag::builder().key("coral/seed-key").value(&key).build());
        if i != 4 {
            tags = tags.tags(
                Tag::builder()
                    .key("coral.dev/imageseed")
                    .value("web")
                    .build(),
            );
        }
        let s = ec2
            .create_snapshot()
            .volume_id(vol.volume_id().unwrap())
            .tag_specifications(tags.build())
            .send()
            .await
            .unwrap();
        ids.push(s.snapshot_id().unwrap().to_string());
    }
    ec2.create_volume()
        .availability_zone("us-east-1b")
        .snapshot_id(&ids[2])
        .send()
        .await
        .unwrap();
    let entry = |id: &str, day: u32| {
        json!({"snapshotId": id, "manifestDigest": D2, "seedKey": key,
               "created": format!("2026-11-{day:02}T00:00:00Z"), "complete": true})
    };
    let history: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| entry(id, 25 - i as u32))
        .collect();
    let status =
        json!({"phase": "Ready", "seedKey": key, "current": history[0], "history": history});
    let mut v = seed_json(true, status);
    v["spec"]["snapshot"] = json!({"retention": 2});
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let (ctx, mut api, _) = context_with(&[("registry.example:5000/app:1", D1)], ec2.clone());
    let (ids2, obj) = (ids.clone(), v.clone());
    let scenario = tokio::spawn(async move {
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "SnapshotDeleted");
        assert!(ev["note"].as_str().unwrap().contains(&ids2[3]), "{ev}");
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        let left: Vec<&str> = st["status"]["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["snapshotId"].as_str().unwrap())
            .collect();
        assert_eq!(left, [&ids2[0], &ids2[1], &ids2[2], &ids2[4]], "{st}");
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
    let exists = |id: String| {
        let ec2 = ec2.clone();
        async move {
            ec2.describe_snapshots()
                .owner_ids("self")
                .send()
                .await
                .unwrap()
                .snapshots()
                .iter()
                .any(|s| s.snapshot_id() == Some(id.as_str()))
        }
    };
    assert!(
        !exists(ids[3].clone()).await,
        "the oldest unused snapshot of the seed is still there"
    );
    for i in [0, 1, 2, 4] {
        assert!(exists(ids[i].clone()).await, "snapshot {i} was deleted");
    }
}

#[tokio::test]
async fn a_seed_deleted_and_applied_again_is_reconciled_again() {
    // Applied again, the seed is a new object (new uid) without the
    // finalizer: it gets it, then a Job of its own.
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let mut v = seed_json(false, Value::Null);
    v["metadata"]["uid"] = json!("uid-web-2");
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let mut finalized = v.clone();
    finalized["metadata"]["finalizers"] = json!([FINALIZER]);
    let f2 = finalized.clone();
    let scenario = tokio::spawn(async move {
        api.expect(Method::PATCH, &format!("{SEEDS}/web"), |_| ok(f2))
            .await;
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");

    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let s: ImageSeed = serde_json::from_value(finalized.clone()).unwrap();
    let scenario = tokio::spawn(async move {
        let list = api
            .expect(Method::GET, JOBS, |_| ok(job_list(vec![])))
            .await;
        assert!(list.query.contains("uid-web-2"), "{}", list.query);
        let job = api
            .expect(Method::POST, JOBS, |s| created(s.body.clone()))
            .await
            .body;
        assert_eq!(
            job["metadata"]["labels"]["coral.dev/imageseed-uid"],
            "uid-web-2"
        );
        api.expect(Method::POST, EVENTS, echo_event).await;
        api.expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
            ok(with_status(&finalized, &s.body))
        })
        .await;
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

const NODES: &str = "/api/v1/nodes";

fn node_json(created: &str, status_annotation: Option<&Value>) -> Value {
    let mut n = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "ip-10-0-0-1", "uid": "node-uid-1", "creationTimestamp": created,
                     "annotations": {}},
        "spec": {"providerID": "aws:///us-east-1b/i-0123456789abcdef0",
                 "taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                            {"key": "coral.dev/seeding", "effect": "NoSchedule"}]},
    });
    if let Some(a) = status_annotation {
        n["metadata"]["annotations"]["coral.dev/seed-status"] = json!(a.to_string());
    }
    n
}

fn seeds_list_with_taint() -> Value {
    let mut seed = seed_json(true, Value::Null);
    seed["spec"]["startupTaint"] = json!({"key": "coral.dev/seeding", "deadline": "10m"});
    json!({"apiVersion": "coral.dev/v1alpha1", "kind": "ImageSeedList",
           "metadata": {"resourceVersion": "5"}, "items": [seed]})
}

#[tokio::test]
async fn the_startup_taint_goes_when_the_node_is_seeded() {
    let (ctx, mut api, _) = context(&[]);
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let summary = json!({"phase": "done", "exitCode": 0, "images": {"seeded": 3}});
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(node_json(&just_now, Some(&summary))).unwrap();
    let n2 = node_json(&just_now, Some(&summary));
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, SEEDS, |_| ok(seeds_list_with_taint()))
            .await;
        let patch = api
            .expect(Method::PATCH, &format!("{NODES}/ip-10-0-0-1"), |_| ok(n2))
            .await
            .body;
        // Only coral's taint (index 1), guarded by a test of that entry.
        assert_eq!(patch[0]["op"], "test", "{patch}");
        assert_eq!(patch[0]["path"], "/spec/taints/1");
        assert_eq!(patch[0]["value"]["key"], "coral.dev/seeding");
        assert_eq!(patch[1], json!({"op": "remove", "path": "/spec/taints/1"}));
        assert_eq!(patch.as_array().unwrap().len(), 2);
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "StartupTaintRemoved");
        api.done().await;
    });
    coral_controller::nodes::reconcile_node(Arc::new(node), ctx)
        .await
        .expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn the_startup_taint_waits_for_the_node_then_goes_at_its_deadline() {
    // A young node that has not reported: the taint stays, and the node is
    // looked at again by the deadline.
    let (ctx, mut api, _) = context(&[]);
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let importing = json!({"phase": "importing"});
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(node_json(&just_now, Some(&importing))).unwrap();
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, SEEDS, |_| ok(seeds_list_with_taint()))
            .await;
        api.done().await;
    });
    let action = coral_controller::nodes::reconcile_node(Arc::new(node), ctx)
        .await
        .expect("reconcile");
    scenario.await.expect("the scenario");
    let text = format!("{action:?}");
    assert!(
        text.contains("requeue")
            && (text.contains("599") || text.contains("600") || text.contains("598")),
        "{text}"
    );

    // Eleven minutes old and still not seeded: the deadline lifts it.
    let (ctx, mut api, _) = context(&[]);
    let old = (k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs(660))
    .to_string();
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_value(node_json(&old, Some(&importing))).unwrap();
    let n2 = node_json(&old, None);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, SEEDS, |_| ok(seeds_list_with_taint()))
            .await;
        let patch = api
            .expect(Method::PATCH, &format!("{NODES}/ip-10-0-0-1"), |_| ok(n2))
            .await
            .body;
        assert_eq!(patch[1], json!({"op": "remove", "path": "/spec/taints/1"}));
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(
            (ev["reason"].as_str(), ev["type"].as_str()),
            (Some("StartupTaintDeadline"), Some("Warning"))
        );
        api.done().await;
    });
    coral_controller::nodes::reconcile_node(Arc::new(node), ctx)
        .await
        .expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn the_node_agent_puts_the_mounter_status_on_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("status.json");
    std::fs::write(
        &file,
        json!({"phase": "done", "startedAt": "2026-11-26T05:00:00Z", "updatedAt": "2026-11-26T05:00:03Z",
               "exitCode": 10, "images": [{"reference": "a:1", "state": "seeded"},
                                           {"reference": "b:1", "state": "pulled"}]})
        .to_string(),
    )
    .unwrap();
    let (client, mut api) = mock_client(NS);
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let n = node_json(&just_now, None);
    let (n2, n3) = (n.clone(), n.clone());
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, &format!("{NODES}/ip-10-0-0-1"), |_| ok(n))
            .await;
        let a = api
            .expect(Method::PATCH, &format!("{NODES}/ip-10-0-0-1"), |_| ok(n2))
            .await
            .body;
        let summary: Value = serde_json::from_str(
            a["metadata"]["annotations"]["coral.dev/seed-status"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(summary["phase"], "done");
        assert_eq!(summary["exitCode"], 10);
        assert_eq!(summary["images"], json!({"seeded": 1, "pulled": 1}));
        let c = api
            .expect(
                Method::PATCH,
                &format!("{NODES}/ip-10-0-0-1/status"),
                |_| ok(n3),
            )
            .await
            .body;
        let cond = &c["status"]["conditions"][0];
        assert_eq!(
            (
                cond["type"].as_str(),
                cond["status"].as_str(),
                cond["reason"].as_str()
            ),
            (Some("CoralSeeded"), Some("False"), Some("FellBack")),
            "{c}"
        );
        api.done().await;
    });
    let wrote = coral_controller::nodes::report(&client, "ip-10-0-0-1", &file)
        .await
        .expect("report");
    assert!(wrote);
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn attach_mode_gives_a_node_without_a_volume_one_in_its_zone() {
    let moto = Moto::start().expect("moto");
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let key = key_for(D1);
    let snap = moto_snapshot(&ec2, &key).await;
    let run = ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .placement(
            aws_sdk_ec2::types::Placement::builder()
                .availability_zone("us-east-1b")
                .build(),
        )
        .send()
        .await
        .expect("RunInstances");
    let instance = run.instances()[0].instance_id().unwrap().to_string();
    let entry = json!({"snapshotId": snap, "manifestDigest": D2, "seedKey": key,
                       "created": "2026-11-26T00:00:00Z", "complete": true, "volumeSizeGib": 2});
    let mut seed = seed_json(
        true,
        json!({"phase": "Ready", "current": entry, "history": [entry]}),
    );
    seed["spec"]["targets"] = json!({"attach": {"nodeSelector": {"coral.dev/attach": "true"}}});
    seed["spec"]["volume"] = json!({"sizeGiB": 8});
    let seeds = json!({"apiVersion": "coral.dev/v1alpha1", "kind": "ImageSeedList",
                       "metadata": {"resourceVersion": "5"}, "items": [seed]});
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut n = node_json(&just_now, None);
    n["metadata"]["labels"] = json!({"coral.dev/attach": "true"});
    n["spec"]["providerID"] = json!(format!("aws:///us-east-1b/{instance}"));
    n["spec"]["taints"] = json!([]);
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(n.clone()).unwrap();
    let (ctx, mut api, _) = context_with(&[], ec2.clone());
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, SEEDS, |_| ok(seeds)).await;
        let first = api
            .expect(Method::PATCH, &format!("{NODES}/ip-10-0-0-1"), |_| {
                ok(n.clone())
            })
            .await
            .body;
        let volume = first["metadata"]["annotations"]["coral.dev/volume-id"]
            .as_str()
            .expect("the volume, recorded at once")
            .to_string();
        let second = api
            .expect(Method::PATCH, &format!("{NODES}/ip-10-0-0-1"), |_| {
                ok(n.clone())
            })
            .await
            .body;
        assert_eq!(
            second["metadata"]["annotations"]["coral.dev/volume-state"],
            "attached"
        );
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "VolumeAttached");
        api.done().await;
        volume
    });
    coral_controller::nodes::reconcile_node(Arc::new(node), ctx)
        .await
        .expect("reconcile");
    let volume = scenario.await.expect("the scenario");

    let v = ec2
        .describe_volumes()
        .volume_ids(&volume)
        .send()
        .await
        .unwrap();
    let v = &v.volumes()[0];
    assert_eq!(v.availability_zone(), Some("us-east-1b"));
    assert_eq!(v.snapshot_id(), Some(snap.as_str()));
    assert_eq!(v.size(), Some(8));
    let att = &v.attachments()[0];
    assert_eq!(
        (att.instance_id(), att.device()),
        (Some(instance.as_str()), Some("/dev/xvdc"))
    );
    let tags: Vec<(&str, &str)> = v
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    assert!(
        tags.contains(&("coral.dev/imageseed", "web"))
            && tags.contains(&("coral.dev/managed", "attach")),
        "{tags:?}"
    );
    let inst = ec2
        .describe_instances()
        .instance_ids(&instance)
        .send()
        .await
        .unwrap();
    let maps = inst.reservations()[0].instances()[0].block_device_mappings();
    let ours = maps
        .iter()
        .find(|m| m.device_name() == Some("/dev/xvdc"))
        .expect("the mapping");
    assert_eq!(
        ours.ebs().and_then(|e| e.delete_on_termination()),
        Some(true),
        "{maps:?}"
    );
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/coral-system/leases/coral-controller";

fn lease(holder: &str, renewed_secs_ago: i64, transitions: i32) -> Value {
    let renewed = k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago);
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "coral-controller", "namespace": NS, "resourceVersion": "42"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                    "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                    "leaseTransitions": transitions}})
}

#[tokio::test]
async fn only_one_replica_holds_the_leader_lease() {
    use coral_controller::lease::Elector;
    let elector = |client| {
        Elector::new(
            client,
            NS,
            "coral-controller",
            "replica-a",
            std::time::Duration::from_secs(15),
        )
    };

    // No Lease yet: created, held.
    let (client, mut api) = mock_client(NS);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, LEASE, |_| {
            coral_controller::fixtures::not_found("lease")
        })
        .await;
        let made = api
            .expect(
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/coral-system/leases",
                |s| created(s.body.clone()),
            )
            .await
            .body;
        assert_eq!(made["spec"]["holderIdentity"], "replica-a");
        api.done().await;
    });
    assert!(elector(client).try_acquire_or_renew().await.unwrap());
    scenario.await.unwrap();

    // Held by another replica that renews: not taken, nothing written.
    let (client, mut api) = mock_client(NS);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, LEASE, |_| ok(lease("replica-b", 3, 4)))
            .await;
        api.done().await;
    });
    assert!(!elector(client).try_acquire_or_renew().await.unwrap());
    scenario.await.unwrap();

    // Held by one that stopped renewing a minute ago: taken over, with the
    // resourceVersion read (a racing replica gets a conflict).
    let (client, mut api) = mock_client(NS);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, LEASE, |_| ok(lease("replica-b", 60, 4)))
            .await;
        let put = api
            .expect(Method::PUT, LEASE, |s| ok(s.body.clone()))
            .await
            .body;
        assert_eq!(put["spec"]["holderIdentity"], "replica-a");
        assert_eq!(put["spec"]["leaseTransitions"], 5);
        assert_eq!(put["metadata"]["resourceVersion"], "42");
        api.done().await;
    });
    assert!(elector(client).try_acquire_or_renew().await.unwrap());
    scenario.await.unwrap();

    // Two racing: the write conflicts, so this one does not hold it.
    let (client, mut api) = mock_client(NS);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, LEASE, |_| ok(lease("replica-b", 60, 4)))
            .await;
        api.expect(Method::PUT, LEASE, |_| {
            (StatusCode::CONFLICT, json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}))
        })
        .await;
        api.done().await;
    });
    assert!(!elector(client).try_acquire_or_renew().await.unwrap());
    scenario.await.unwrap();
}

#[test]
fn metrics_are_prometheus_text() {
    use coral_controller::metrics::{Metrics, render};
    let m = Metrics::default();
    m.reconciles.store(7, std::sync::atomic::Ordering::Relaxed);
    m.node_states.lock().unwrap().insert("n1".into(), "seeded");
    m.node_states
        .lock()
        .unwrap()
        .insert("n2".into(), "fellBack");
    let text = render(&m);
    assert!(
        text.contains("# TYPE coral_reconciles_total counter\ncoral_reconciles_total 7\n"),
        "{text}"
    );
    assert!(
        text.contains("coral_nodes{state=\"seeded\"} 1")
            && text.contains("coral_nodes{state=\"fellBack\"} 1"),
        "{text}"
    );
    m.build_millis_sum
        .store(90_500, std::sync::atomic::Ordering::Relaxed);
    m.build_count.store(2, std::sync::atomic::Ordering::Relaxed);
    let text = render(&m);
    assert!(
        text.contains(
            "coral_build_duration_seconds_sum 90.500\ncoral_build_duration_seconds_count 2"
        ),
        "{text}"
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(
            name.starts_with("coral_") && value.parse::<f64>().is_ok(),
            "{line}"
        );
    }
}

#[tokio::test]
async fn deleting_with_the_delete_policy_takes_back_what_coral_rolled_out() {
    use aws_sdk_ec2::types::{
        LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
        RequestLaunchTemplateData, ResourceType, Tag, TagSpecification,
    };
    let moto = Moto::start().expect("moto");
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let key = key_for(D1);
    // Two snapshots of the seed (tagged as its builds tag them).
    let mut ids = Vec::new();
    for _ in 0..2 {
        let vol = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .send()
            .await
            .unwrap();
        let s = ec2
            .create_snapshot()
            .volume_id(vol.volume_id().unwrap())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .tags(Tag::builder().key("coral/seed-key").value(&key).build())
                    .tags(
                        Tag::builder()
                            .key("coral.dev/imageseed")
                            .value("web")
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
        ids.push(s.snapshot_id().unwrap().to_string());
    }
    let lt = ec2
        .create_launch_template()
        .launch_template_name("nodes")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .block_device_mappings(
                    LaunchTemplateBlockDeviceMappingRequest::builder()
                        .device_name("/dev/xvda")
                        .ebs(
                            LaunchTemplateEbsBlockDeviceRequest::builder()
                                .volume_size(30)
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let lt_id = lt
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    let entry = |id: &str| {
        json!({"snapshotId": id, "manifestDigest": D2, "seedKey": key,
                                  "created": "2026-11-26T00:00:00Z", "complete": true})
    };
    let mut v = seed_json(true, Value::Null);
    v["spec"]["deletionPolicy"] = json!("Delete");
    v["spec"]["targets"] = json!({"ec2NodeClasses": ["default"], "launchTemplates": [lt_id]});
    v["status"] = json!({"current": entry(&ids[0]), "history": [entry(&ids[0]), entry(&ids[1])]});
    // Rolled out as the controller does it: version 2 is the default.
    let rolled: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let current: coral_controller::crd::SnapshotRef =
        serde_json::from_value(entry(&ids[0])).unwrap();
    let (made, replaced) =
        coral_controller::rollout::launch_template(&ec2, &lt_id, &rolled, &current)
            .await
            .unwrap()
            .unwrap();
    assert_eq!((made, replaced), (2, 1));
    v["status"]["targets"] = json!([{"kind": "LaunchTemplate", "name": lt_id, "snapshotId": ids[0],
                                     "version": 2, "originalVersion": 1}]);
    v["metadata"]["deletionTimestamp"] = json!(k8s_openapi::jiff::Timestamp::now().to_string());
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let class = json!({"apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass",
        "metadata": {"name": "default", "resourceVersion": "9"},
        "spec": {"blockDeviceMappings": [
            {"deviceName": "/dev/xvda", "rootVolume": true, "ebs": {"volumeSize": "20Gi"}},
            {"deviceName": "/dev/xvdc", "ebs": {"snapshotID": ids[0], "volumeType": "gp3"}}]}});
    let (ctx, mut api, _) = context_with(&[], ec2.clone());
    let ncs = "/apis/karpenter.k8s.aws/v1/ec2nodeclasses/default";
    let scenario = tokio::spawn(async move {
        api.expect(Method::DELETE, JOBS, |_| ok(job_list(vec![])))
            .await;
        api.expect(Method::GET, ncs, |_| ok(class.clone())).await;
        let patch = api
            .expect(Method::PATCH, ncs, |_| ok(class.clone()))
            .await
            .body;
        assert_eq!(
            patch["spec"]["blockDeviceMappings"],
            json!([{"deviceName": "/dev/xvda", "rootVolume": true, "ebs": {"volumeSize": "20Gi"}}]),
            "only coral's device goes: {patch}"
        );
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "Deleted", "{ev}");
        let fin = api
            .expect(Method::PATCH, &format!("{SEEDS}/web"), |_| {
                let mut done = v.clone();
                done["metadata"]["finalizers"] = json!([]);
                ok(done)
            })
            .await;
        assert!(fin.body.to_string().contains("remove"), "{}", fin.body);
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
    let out = ec2
        .describe_launch_templates()
        .launch_template_ids(&lt_id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        out.launch_templates()[0].default_version_number(),
        Some(1),
        "the original default is back"
    );
    let left = ec2
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap();
    let left: Vec<&str> = left
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id())
        .collect();
    assert!(
        !left.contains(&ids[0].as_str()) && !left.contains(&ids[1].as_str()),
        "left: {left:?}"
    );
}

#[tokio::test]
async fn attach_mode_volumes_whose_node_is_gone_are_deleted() {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let moto = Moto::start().expect("moto");
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let key = key_for(D1);
    let mut vols = Vec::new();
    for node in ["ip-gone", "ip-10-0-0-1"] {
        let v = ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .tags(
                        Tag::builder()
                            .key("coral.dev/managed")
                            .value("attach")
                            .build(),
                    )
                    .tags(
                        Tag::builder()
                            .key("coral.dev/imageseed")
                            .value("web")
                            .build(),
                    )
                    .tags(Tag::builder().key("coral.dev/node").value(node).build())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        vols.push(v.volume_id().unwrap().to_string());
    }
    let snap = json!({"snapshotId": "snap-1", "manifestDigest": D2, "seedKey": key,
                      "created": "2026-11-26T00:00:00Z", "complete": true});
    let mut v = seed_json(
        true,
        json!({"phase": "Ready", "seedKey": key, "current": snap, "history": [snap]}),
    );
    v["spec"]["targets"] = json!({"attach": {"nodeSelector": {"coral.dev/attach": "true"}}});
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let (ctx, mut api, _) = context_with(&[("registry.example:5000/app:1", D1)], ec2.clone());
    let just_now = k8s_openapi::jiff::Timestamp::now().to_string();
    let node = node_json(&just_now, None);
    let scenario = tokio::spawn(async move {
        // One GET per volume, in EC2's order: answered by the node's name.
        for _ in 0..2 {
            api.expect_path(Method::GET, |seen| {
                assert!(seen.path.starts_with("/api/v1/nodes/"), "{}", seen.path);
                if seen.path.ends_with("/ip-gone") {
                    coral_controller::fixtures::not_found("node ip-gone")
                } else {
                    ok(node.clone())
                }
            })
            .await;
        }
        let ev = api.expect(Method::POST, EVENTS, echo_event).await.body;
        assert_eq!(ev["reason"], "VolumeDeleted");
        api.expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
            ok(with_status(&v, &s.body))
        })
        .await;
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
    let left = ec2.describe_volumes().send().await.unwrap();
    let left: Vec<&str> = left
        .volumes()
        .iter()
        .filter_map(|v| v.volume_id())
        .collect();
    assert!(
        !left.contains(&vols[0].as_str()),
        "the volume of a gone node is still there"
    );
    assert!(
        left.contains(&vols[1].as_str()),
        "a fresh volume of a live node was deleted"
    );
}

#[test]
fn a_node_without_a_volume_prefetches_the_seeded_images_with_the_mounter() {
    use coral_controller::nodes::{needs_prefetch, prefetch_args, prefetch_images};
    use std::time::Duration;
    let grace = Duration::from_secs(120);
    // No status file: only after the grace period.
    assert!(!needs_prefetch(None, Duration::from_secs(30), grace));
    assert!(needs_prefetch(None, Duration::from_secs(121), grace));
    // A real node mounter that finds no volume says so in its status file
    // (here: an import where containerd's root holds no volume); one that
    // is importing or failed otherwise does not trigger a prefetch.
    let dir = tempfile::tempdir().unwrap();
    let status_file = dir.path().join("status.json");
    let out = std::process::Command::new(coral_tests::workspace_bin("coral-node-mounter").unwrap())
        .args(["import", "--deadline", "5s", "--seed"])
        .arg(dir.path())
        .arg("--address")
        .arg(dir.path().join("containerd.sock"))
        .arg("--status-file")
        .arg(&status_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(20), "{out:?}");
    let none: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&status_file).unwrap()).unwrap();
    assert!(needs_prefetch(Some(&none), Duration::ZERO, grace), "{none}");
    let mut broken = none.clone();
    broken["noVolume"] = json!(false);
    assert!(!needs_prefetch(
        Some(&broken),
        Duration::from_secs(999),
        grace
    ));
    assert!(!needs_prefetch(
        Some(&json!({"phase": "importing"})),
        Duration::from_secs(999),
        grace
    ));
    assert!(!needs_prefetch(
        Some(&json!({"phase": "done", "exitCode": 0})),
        Duration::from_secs(999),
        grace
    ));

    let with_current = seed(
        true,
        json!({"current": {"snapshotId": "snap-1", "manifestDigest": D1,
        "seedKey": "k", "created": "2026-11-26T00:00:00Z", "complete": true}}),
    );
    let never_built = seed(true, Value::Null);
    let images = prefetch_images(&[with_current, never_built]);
    assert_eq!(images, ["registry.example:5000/app:1"]);
    // The command line is one the node mounter's own parser takes: run it
    // against a socket nobody serves, and it fails for the socket, not the
    // arguments (exit 1, not a usage error's 2).
    let dir = tempfile::tempdir().unwrap();
    let args = prefetch_args(
        &dir.path().join("containerd.sock"),
        &images,
        &dir.path().join("prefetch.json"),
    );
    let o = std::process::Command::new(coral_tests::workspace_bin("coral-node-mounter").unwrap())
        .args(&args)
        .args(["--deadline", "2s"])
        .output()
        .unwrap();
    assert_ne!(
        o.status.code(),
        Some(2),
        "a usage error: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "nothing answers on that socket");
}

fn docker_secret(config: &Value) -> Value {
    use base64::Engine as _;
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
           "metadata": {"name": "reg", "namespace": NS},
           "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config.to_string())}})
}

#[tokio::test]
async fn pull_secrets_are_read_from_coral_s_namespace_and_helpers_are_refused() {
    let secret_path = "/api/v1/namespaces/coral-system/secrets/reg";
    // Static auths: read, then the build goes on as usual.
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let mut v = seed_json(true, Value::Null);
    v["spec"]["pullSecrets"] = json!([{"name": "reg"}]);
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let obj = v.clone();
    let scenario = tokio::spawn(async move {
        let auths = json!({"auths": {"registry.example:5000": {"auth": "dXNlcjpwYXNz"}}});
        api.expect(Method::GET, secret_path, |_| ok(docker_secret(&auths)))
            .await;
        api.expect(Method::GET, JOBS, |_| ok(job_list(vec![])))
            .await;
        let job = api
            .expect(Method::POST, JOBS, |s| created(s.body.clone()))
            .await
            .body;
        let c = &job["spec"]["template"]["spec"];
        assert_eq!(c["volumes"][1]["secret"]["secretName"], "reg", "{c}");
        api.expect(Method::POST, EVENTS, echo_event).await;
        api.expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
            ok(with_status(&obj, &s.body))
        })
        .await;
        api.done().await;
    });
    reconcile(Arc::new(s.clone()), ctx)
        .await
        .expect("reconcile");
    scenario.await.expect("the scenario");

    // A credential helper named by a Secret would run a program: refused.
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let scenario = tokio::spawn(async move {
        let helper = json!({"credHelpers": {"registry.example:5000": "evil"}});
        api.expect(Method::GET, secret_path, |_| ok(docker_secret(&helper)))
            .await;
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&v, &s.body))
            })
            .await
            .body;
        let r = st["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Resolved")
            .cloned()
            .unwrap();
        assert_eq!(
            (r["status"].as_str(), r["reason"].as_str()),
            (Some("False"), Some("InvalidSpec"))
        );
        assert!(
            r["message"].as_str().unwrap().contains("credential helper"),
            "{r}"
        );
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn a_manual_rebuild_policy_keeps_the_digests_until_the_spec_changes() {
    let key = key_for(D1);
    let snap = json!({"snapshotId": "snap-1", "manifestDigest": D2, "seedKey": key,
                      "created": "2026-11-26T00:00:00Z", "complete": true});
    let status = json!({"phase": "Ready", "seedKey": key, "observedGeneration": 1, "current": snap,
                        "history": [snap], "images": [{"reference": "registry.example:5000/app:1",
                        "resolvedDigest": D1, "inCurrentSnapshot": true, "failureCount": 0}]});
    let mut v = seed_json(true, status);
    v["spec"]["rebuild"] = json!({"policy": "Manual", "resolveInterval": "30m"});
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    // The tag has moved, but the spec has not changed: nothing is built.
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D2)]);
    let obj = v.clone();
    let scenario = tokio::spawn(async move {
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await
            .body;
        assert_eq!(st["status"]["images"][0]["resolvedDigest"], D1);
        assert_eq!(st["status"]["phase"], "Ready");
        api.done().await;
    });
    let action = reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
    assert!(
        format!("{action:?}").contains("1800s"),
        "requeued per resolveInterval: {action:?}"
    );

    // The spec changed (generation 2): resolved again, and built.
    v["metadata"]["generation"] = json!(2);
    let s: ImageSeed = serde_json::from_value(v.clone()).unwrap();
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D2)]);
    let new = key_for(D2);
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| ok(job_list(vec![])))
            .await;
        let job = api
            .expect(Method::POST, JOBS, |s| created(s.body.clone()))
            .await
            .body;
        assert_eq!(
            job["metadata"]["annotations"]["coral.dev/seed-key"],
            new.as_str()
        );
        api.expect(Method::POST, EVENTS, echo_event).await;
        api.expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
            ok(with_status(&v, &s.body))
        })
        .await;
        api.done().await;
    });
    reconcile(Arc::new(s), ctx).await.expect("reconcile");
    scenario.await.expect("the scenario");
}

#[tokio::test]
async fn a_settled_seed_is_left_alone_until_its_resolve_interval() {
    // Reconciles follow every status write; a settled seed must converge:
    // no registry call before resolveInterval, and no write when nothing
    // changed (else each write would trigger the next).
    let key = key_for(D1);
    let snap = json!({"snapshotId": "snap-1", "manifestDigest": D2, "seedKey": key,
                      "created": "2026-11-26T00:00:00Z", "complete": true});
    let a_minute_ago = (k8s_openapi::jiff::Timestamp::now()
        - k8s_openapi::jiff::SignedDuration::from_secs(60))
    .strftime("%Y-%m-%dT%H:%M:%SZ")
    .to_string();
    let status = json!({"phase": "Ready", "seedKey": key, "observedGeneration": 1, "current": snap,
                        "history": [snap], "lastResolved": a_minute_ago,
                        "images": [{"reference": "registry.example:5000/app:1", "resolvedDigest": D1,
                                    "inCurrentSnapshot": true, "failureCount": 0}]});
    let v = seed_json(true, status);
    // The tag has moved meanwhile; it is only seen at the next interval.
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D2)]);
    let obj = v.clone();
    let first = tokio::spawn(async move {
        let st = api
            .expect(Method::PATCH, &format!("{SEEDS}/web/status"), |s| {
                ok(with_status(&obj, &s.body))
            })
            .await;
        api.done().await;
        with_status(&obj, &st.body)
    });
    reconcile(Arc::new(serde_json::from_value(v).unwrap()), ctx)
        .await
        .expect("reconcile");
    let settled = first.await.expect("the scenario");
    assert_eq!(settled["status"]["images"][0]["resolvedDigest"], D1);
    assert_eq!(
        settled["status"]["lastResolved"].as_str(),
        Some(a_minute_ago.as_str())
    );

    let (ctx, api, _) = context(&[("registry.example:5000/app:1", D2)]);
    let second = tokio::spawn(async move { api.done().await });
    reconcile(Arc::new(serde_json::from_value(settled).unwrap()), ctx)
        .await
        .expect("reconcile");
    second.await.expect("no request at all on the second pass");
}
