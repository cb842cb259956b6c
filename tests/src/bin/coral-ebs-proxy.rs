//! The recording EBS/EC2 proxy of the tests as a program, for
//! `scripts/bench --side snapshot`: `coral-ebs-proxy HOST:PORT` prints its
//! endpoint (`http://127.0.0.1:PORT`) on the first line, serves until its
//! standard input closes, then prints what it recorded as JSON: per
//! snapshot, the PutSnapshotBlock requests, distinct blocks and bytes, and
//! whether every checksum and the aggregate matched. StartSnapshot answers
//! say EBS's block size (moto's say 512 bytes), so clients that trust the
//! answer send 512 KiB blocks as they would to EBS.

use std::io::{Read, Write};

use anyhow::{Context, Result};
use coral_tests::ebsproxy::EbsProxy;
use serde_json::json;

fn main() -> Result<()> {
    let upstream = std::env::args()
        .nth(1)
        .context("usage: coral-ebs-proxy HOST:PORT")?;
    let proxy = EbsProxy::start(&upstream)?;
    proxy.fix_block_size(512 * 1024);
    println!("{}", proxy.endpoint());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    let report = proxy.with(|r| {
        let snapshots: serde_json::Map<String, serde_json::Value> = r
            .puts
            .iter()
            .map(|(id, puts)| {
                let c = r.completions.get(id);
                (
                    id.clone(),
                    json!({
                        "puts": puts,
                        "blocks": r.blocks.get(id).map_or(0, |b| b.len()),
                        "bytes": r.bytes.get(id).copied().unwrap_or(0),
                        "completed": c.is_some(),
                        "aggregateOk": c.is_some_and(|c| c.aggregate_ok),
                    }),
                )
            })
            .collect();
        json!({"snapshots": snapshots, "badChecksums": r.bad_checksums})
    });
    println!("{report}");
    Ok(())
}
