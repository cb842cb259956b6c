//! Reconcile scenarios against the in-process mock API server
//! ([`crate::fixtures`]): each expects exactly the requests it lists, in
//! order, and fails on a missing or an unexpected one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde_json::{Value, json};

use crate::crd::{FINALIZER, ImageSeed};
use crate::fixtures::{ApiServer, created, empty_list, mock_client, ok};
use crate::reconcile::{Context, Resolver, backoff, reconcile};

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

fn context(table: &[(&str, &str)]) -> (Arc<Context>, ApiServer, Table) {
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
    );
    (Arc::new(ctx), server, map)
}

/// The object the apiserver returns after a status patch: the seed with
/// the patched status.
fn with_status(seed: &Value, patch: &Value) -> Value {
    let mut out = seed.clone();
    out["status"] = patch["status"].clone();
    out
}

fn echo_event(server_seen: &crate::fixtures::Seen) -> (StatusCode, Value) {
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
                                "coral.dev/seed-key-hash": crate::job::key_hash(key)}},
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

#[tokio::test]
async fn a_finished_build_records_its_snapshot() {
    let (ctx, mut api, _) = context(&[("registry.example:5000/app:1", D1)]);
    let key = key_for(D1);
    let status = json!({"phase": "Building", "seedKey": key});
    let s = seed(true, status.clone());
    let obj = seed_json(true, status);
    let job_name = crate::job::job_name(&s, &key, 1);
    let (k2, jn) = (key.clone(), job_name.clone());
    let scenario = tokio::spawn(async move {
        api.expect(Method::GET, JOBS, |_| {
            ok(job_list(vec![job_with(
                &jn,
                &k2,
                Some(("Complete", "2026-11-26T01:00:00Z")),
            )]))
        })
        .await;
        let report = json!({"seedKey": k2, "manifestDigest": D2, "snapshotId": "snap-0123456789abcdef0", "volumeSizeGib": 2});
        let pods = api
            .expect(Method::GET, PODS, |_| {
                let mut l = empty_list("v1", "PodList");
                l["items"] = json!([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("{jn}-x")},
                    "status": {"containerStatuses": [{"name": "builder", "image": "b", "imageID": "", "ready": false,
                        "restartCount": 0, "state": {"terminated": {"exitCode": 0, "message": report.to_string()}}}]}}]);
                ok(l)
            })
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
        assert_eq!(
            st["status"]["current"]["snapshotId"],
            "snap-0123456789abcdef0"
        );
        assert_eq!(st["status"]["history"][0]["complete"], true);
        assert_eq!(st["status"]["images"][0]["inCurrentSnapshot"], true);
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
    let first = crate::job::job_name(&s, &key, 1);
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
    let second = crate::job::job_name(&s, &key, 2);
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

#[test]
fn the_backoff_doubles_from_30_seconds_up_to_10_minutes() {
    let secs: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(secs, [0, 30, 60, 120, 240, 480, 600, 600]);
    assert_eq!(backoff(u32::MAX).as_secs(), 600);
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

#[test]
fn the_crd_in_deploy_is_generated_from_the_types() {
    use kube::CustomResourceExt;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/crd/imageseeds.coral.dev.yaml"
    );
    let text = std::fs::read_to_string(path).expect("deploy/crd/imageseeds.coral.dev.yaml");
    let on_disk: Value = serde_norway::from_str(&text).expect("YAML");
    let generated = serde_json::to_value(ImageSeed::crd()).expect("JSON");
    assert!(
        on_disk == generated,
        "deploy/crd/imageseeds.coral.dev.yaml is not what the types generate: run \
         `coral-controller crd > deploy/crd/imageseeds.coral.dev.yaml`"
    );
    // What the schema enforces, besides types.
    let spec = &generated["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["properties"]["images"]["minItems"], 1);
    assert_eq!(generated["spec"]["scope"], "Cluster");
}
