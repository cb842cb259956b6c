//! Unit tests of the controller crate. The reconcile scenarios, which need
//! moto's server for EC2, are in `tests/tests/controller_reconcile.rs`.

use serde_json::Value;

use crate::crd::ImageSeed;
use crate::reconcile::backoff;

#[test]
fn the_backoff_doubles_from_30_seconds_up_to_10_minutes() {
    let secs: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(secs, [0, 30, 60, 120, 240, 480, 600, 600]);
    assert_eq!(backoff(u32::MAX).as_secs(), 600);
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
