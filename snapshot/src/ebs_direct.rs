//! The `ebs-direct` backend: an EBS snapshot written block by block through
//! the EBS direct APIs, with no instance and no volume.
//!
//! 1. StartSnapshot: the volume size (whole GiB), description, tags (coral's
//!    own: manifest digest, seed key, build ID), optional parent and KMS key.
//! 2. PutSnapshotBlock for every 512 KiB block that holds data, `workers` at
//!    once, each with its SHA-256 (base64). Holes (SEEK_DATA/SEEK_HOLE) are
//!    never read and all-zero blocks are not sent, except where that would
//!    be wrong: a block the parent snapshot has data in (it must read as
//!    zeros now), up to the end of the new volume. (Unwritten blocks of a
//!    snapshot read as zeros, encrypted or not: AWS documents no exception.)
//!    With a parent and the block map recorded for it (`--parent-image`),
//!    a block whose SHA-256 equals the parent's at the same index is not
//!    sent either: the child inherits it, so what is sent is what changed.
//!    A block refused because the new snapshot is not visible yet is
//!    retried within the deadline. Memory stays at `workers` blocks.
//! 3. CompleteSnapshot with the number of blocks sent and the linear
//!    aggregate checksum (SHA-256 of the block digests in index order).
//! 4. Wait, polling EC2 DescribeSnapshots, until the snapshot is
//!    `completed` (usable), within the deadline.
//!
//! Every request has the SDK's timeouts and a bounded number of attempts
//! with backoff ([`crate::aws_config`]). If anything fails after
//! StartSnapshot, the snapshot is deleted (DeleteSnapshot), so no snapshot
//! that looks complete is left; if even that fails, the error says which
//! snapshot to delete by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_ebs::error::DisplayErrorContext;
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::blockmap::BlockMap;
use crate::blocks::{self, EBS_BLOCK_SIZE};
use crate::{Kind, Options, Record, SeedInfo, TAG_CLIENT_TOKEN};

/// The indexes of the blocks a snapshot holds (ListSnapshotBlocks).
pub async fn list_blocks(ebs: &aws_sdk_ebs::Client, snapshot: &str) -> Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    let mut token: Option<String> = None;
    loop {
        let page = ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot)
            .max_results(10_000)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| anyhow!("ListSnapshotBlocks {snapshot}: {}", DisplayErrorContext(&e)))?;
        out.extend(
            page.blocks()
                .iter()
                .filter_map(|b| b.block_index())
                .map(|i| i as u64),
        );
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => return Ok(out),
        }
    }
}

/// What became of one block.
enum Block {
    /// Sent: index, digest, length, and whether it was all zeros (sent to
    /// cover parent data).
    Sent(u64, [u8; 32], u64, bool),
    /// Not sent: the parent holds the same bytes there.
    Unchanged(u64, [u8; 32]),
    /// Not sent: all zeros, and the parent has nothing there.
    Zero,
}

/// What was sent.
#[derive(Default)]
struct Sent {
    digests: BTreeMap<u64, [u8; 32]>,
    skipped: u64,
    unchanged: u64,
    bytes: u64,
    /// The new image's block map (every non-zero block, sent or not).
    map: BlockMap,
}

pub async fn upload(
    config: &aws_config::SdkConfig,
    image: &Path,
    seed: &SeedInfo,
    o: &Options,
    base: Option<&BlockMap>,
) -> Result<(Record, BlockMap)> {
    let deadline = Instant::now() + o.deadline;
    let ebs = aws_sdk_ebs::Client::new(config);
    let ec2 = aws_sdk_ec2::Client::new(config);
    let size = blocks::image_size(image).with_context(|| format!("{}", image.display()))?;
    let mut record = Record::new(Kind::EbsDirect, String::new(), image, size, seed, o);

    if o.parent.is_some() && o.kms_key.is_some() {
        bail!(
            "--parent-snapshot and --kms-key cannot go together: EBS refuses a StartSnapshot \
             with both (a child snapshot is encrypted as its parent is)"
        );
    }
    // A block that is zero now but has data in the parent must be sent.
    let parent_blocks = match &o.parent {
        Some(p) => list_blocks(&ebs, p).await?,
        None => BTreeSet::new(),
    };
    // Unique per run of this command, so the SDK's own retries of
    // StartSnapshot cannot start two snapshots; also a tag, to find a
    // snapshot whose StartSnapshot answer was lost.
    let client_token = hex::encode(
        &blocks::sha256(
            format!(
                "{} {} {:?}",
                seed.seed_key,
                std::process::id(),
                std::time::SystemTime::now()
            )
            .as_bytes(),
        )[..16],
    );
    let mut tags: Vec<Tag> = record
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    tags.push(
        Tag::builder()
            .key(TAG_CLIENT_TOKEN)
            .value(&client_token)
            .build(),
    );
    let minutes = (o.deadline.as_secs().div_ceil(60)).clamp(10, 4320) as i32;
    let started = ebs
        .start_snapshot()
        .volume_size(record.volume_size_gib as i64)
        .description(
            o.description
                .clone()
                .unwrap_or_else(|| format!("coral seed volume {}", seed.seed_key)),
        )
        .set_tags(Some(tags))
        .set_parent_snapshot_id(o.parent.clone())
        .set_encrypted(o.kms_key.as_ref().map(|_| true))
        .set_kms_key_arn(o.kms_key.clone())
        .timeout(minutes)
        .client_token(&client_token)
        .send()
        .await;
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            let error = anyhow!("StartSnapshot: {}", DisplayErrorContext(&e));
            return Err(discard_by_token(&ec2, &client_token, error).await);
        }
    };
    let id = started
        .snapshot_id()
        .context("StartSnapshot returned no snapshot ID")?
        .to_string();
    // EBS blocks are 512 KiB, always (moto's server says 512 bytes: ignored).
    let block_size = EBS_BLOCK_SIZE;
    if started.block_size().map(|b| b as u64) != Some(EBS_BLOCK_SIZE) {
        tracing::warn!(
            said = ?started.block_size(),
            "StartSnapshot reported an unexpected block size; using 512 KiB"
        );
    }
    record.id = id.clone();
    tracing::info!(snapshot = %id, block_size, "snapshot started");

    let work = async {
        let volume_blocks = record.volume_size_gib * crate::blocks::GIB / block_size;
        let sent = send_blocks(
            &ebs,
            image,
            &id,
            (size, block_size, volume_blocks),
            &parent_blocks,
            base.filter(|_| o.parent.is_some()),
            o,
        )
        .await?;
        complete(&ebs, &id, &sent).await?;
        crate::ebs::wait_completed(&ec2, &id, o.poll_interval).await?;
        anyhow::Ok(sent)
    };
    let outcome = match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!(
            "the snapshot did not complete within its deadline of {:?}",
            o.deadline
        )),
    };
    match outcome {
        Ok(sent) => {
            record.blocks_sent = sent.digests.len() as u64;
            record.blocks_skipped = sent.skipped;
            record.bytes_sent = sent.bytes;
            record.blocks_unchanged = sent.unchanged;
            Ok((record, sent.map))
        }
        Err(e) => Err(crate::ebs::discard(&ec2, &id, e).await),
    }
}

async fn send_blocks(
    ebs: &aws_sdk_ebs::Client,
    image: &Path,
    id: &str,
    (size, block_size, volume_blocks): (u64, u64, u64),
    parent_blocks: &BTreeSet<u64>,
    base: Option<&BlockMap>,
    o: &Options,
) -> Result<Sent> {
    let file = Arc::new(File::open(image).with_context(|| format!("{}", image.display()))?);
    let total = size.div_ceil(block_size);
    let mut candidates: BTreeSet<u64> = {
        let f = file.clone();
        tokio::task::spawn_blocking(move || blocks::data_blocks(&f, size, block_size))
            .await??
            .into_iter()
            .collect()
    };
    let holes_with_parent_data: BTreeSet<u64> = parent_blocks
        .iter()
        .copied()
        // Up to the new volume's end, not the image's: the parent's data
        // past the image must read as zeros too.
        .filter(|b| *b < volume_blocks && !candidates.contains(b))
        .collect();
    candidates.extend(holes_with_parent_data.iter().copied());
    let mut sent = Sent {
        skipped: total - candidates.len() as u64,
        map: BlockMap::new(block_size, size),
        ..Sent::default()
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(o.workers.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for index in candidates {
        let permit = limit.clone().acquire_owned().await?;
        // Collect what finished meanwhile, and stop at the first failure.
        while let Some(done) = tasks.try_join_next() {
            record_block(&mut sent, done)?;
        }
        let (ebs, file, id) = (ebs.clone(), file.clone(), id.to_string());
        let parent_has = parent_blocks.contains(&index);
        // The parent's bytes here, when the block map recorded for it says.
        let parent_digest = base.and_then(|m| m.blocks.get(&index)).copied();
        let parent_known = base.is_some();
        tasks.spawn(async move {
            let _permit = permit;
            let f = file.clone();
            let data = tokio::task::spawn_blocking(move || {
                blocks::read_block(&f, size, block_size, index)
            })
            .await??;
            let zero = blocks::is_zero(&data);
            // Zeros over nothing, or over blocks the parent's map says are
            // zeros too, need not be sent.
            if zero && (!parent_has || (parent_known && parent_digest.is_none())) {
                return anyhow::Ok(Block::Zero);
            }
            let digest = blocks::sha256(&data);
            if !zero && parent_has && parent_digest == Some(digest) {
                return Ok(Block::Unchanged(index, digest));
            }
            let len = data.len();
            let data = bytes::Bytes::from(data);
            let index32 = i32::try_from(index).context("block index beyond EBS's range")?;
            // A new snapshot can be refused as not found for a while; the
            // SDK does not retry that, so this does (the deadline bounds it).
            let mut not_found = 0u64;
            loop {
                let put = ebs
                    .put_snapshot_block()
                    .snapshot_id(&id)
                    .block_index(index32)
                    .block_data(ByteStream::from(data.clone()))
                    .data_length(len as i32)
                    .checksum(B64.encode(digest))
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .send()
                    .await;
                match put {
                    Ok(_) => break,
                    Err(e)
                        if not_found < 12
                            && e.as_service_error()
                                .is_some_and(|s| s.is_resource_not_found_exception()) =>
                    {
                        not_found += 1;
                        tokio::time::sleep(std::time::Duration::from_secs(2 * not_found)).await;
                    }
                    Err(e) => bail!(
                        "PutSnapshotBlock {index} of {id}: {}",
                        DisplayErrorContext(&e)
                    ),
                }
            }
            Ok(Block::Sent(index, digest, len as u64, zero))
        });
    }
    while let Some(done) = tasks.join_next().await {
        record_block(&mut sent, done)?;
    }
    Ok(sent)
}

fn record_block(
    sent: &mut Sent,
    done: Result<Result<Block>, tokio::task::JoinError>,
) -> Result<()> {
    match done.context("a block upload task")?? {
        Block::Sent(index, digest, len, zero) => {
            sent.digests.insert(index, digest);
            sent.bytes += len;
            // A zero block sent over parent data is still zeros: not mapped.
            if !zero {
                sent.map.blocks.insert(index, digest);
            }
        }
        Block::Unchanged(index, digest) => {
            sent.unchanged += 1;
            sent.map.blocks.insert(index, digest);
        }
        Block::Zero => sent.skipped += 1,
    }
    Ok(())
}

/// StartSnapshot failed, but may have started one whose answer was lost:
/// finds it by its client-token tag and deletes it.
async fn discard_by_token(
    ec2: &aws_sdk_ec2::Client,
    token: &str,
    error: anyhow::Error,
) -> anyhow::Error {
    let filter = aws_sdk_ec2::types::Filter::builder()
        .name(format!("tag:{TAG_CLIENT_TOKEN}"))
        .values(token)
        .build();
    let found = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(filter)
        .send();
    match tokio::time::timeout(std::time::Duration::from_secs(60), found).await {
        Ok(Ok(out)) => match out.snapshots().first().and_then(|s| s.snapshot_id()) {
            Some(id) => crate::ebs::discard(ec2, id, error).await,
            None => error,
        },
        _ => error.context(format!(
            "whether a snapshot tagged {TAG_CLIENT_TOKEN}={token} was started could not be \
             checked: look for it and delete it"
        )),
    }
}

async fn complete(ebs: &aws_sdk_ebs::Client, id: &str, sent: &Sent) -> Result<()> {
    let count = i32::try_from(sent.digests.len()).context("too many blocks")?;
    let mut req = ebs
        .complete_snapshot()
        .snapshot_id(id)
        .changed_blocks_count(count);
    if count > 0 {
        req = req
            .checksum(B64.encode(blocks::linear_checksum(sent.digests.values())))
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear);
    }
    let out = req
        .send()
        .await
        .map_err(|e| anyhow!("CompleteSnapshot {id}: {}", DisplayErrorContext(&e)))?;
    if let Some(status) = out.status()
        && status.as_str() == "error"
    {
        bail!("CompleteSnapshot {id}: the snapshot is in state error");
    }
    Ok(())
}
