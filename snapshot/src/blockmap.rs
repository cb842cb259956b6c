//! The block map of a snapshotted image: the SHA-256 of every 512 KiB block
//! that is not all zeros, recorded beside the image (`IMAGE.blocks`) when it
//! is snapshotted. An incremental snapshot of a later image built on this
//! one compares its own blocks against it and sends only those that differ
//! from the parent snapshot's.
//!
//! The file: the magic `CORALBLK`, a format version (u32), the block size,
//! the image size and the number of entries (u64 each), then that many
//! entries of a block index (u64) and its SHA-256 (32 bytes), in index
//! order; integers little-endian. Blocks not listed are all zeros. The
//! snapshot record names the file and its SHA-256, so a map is only ever
//! used with the snapshot it describes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::blocks;

const MAGIC: &[u8; 8] = b"CORALBLK";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 8 + 8;
const ENTRY: usize = 8 + 32;

/// Index → SHA-256 of each block holding any non-zero byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockMap {
    pub block_size: u64,
    pub image_size: u64,
    pub blocks: BTreeMap<u64, [u8; 32]>,
}

impl BlockMap {
    pub fn new(block_size: u64, image_size: u64) -> BlockMap {
        BlockMap {
            block_size,
            image_size,
            blocks: BTreeMap::new(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + ENTRY * self.blocks.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for (i, d) in &self.blocks {
            out.extend_from_slice(&i.to_le_bytes());
            out.extend_from_slice(d);
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<BlockMap> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            bail!("not a coral block map");
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4"));
        if version != VERSION {
            bail!("block map version {version}; this coral reads version {VERSION}");
        }
        let (block_size, image_size, count) = (u64_at(12), u64_at(20), u64_at(28));
        if block_size == 0 || (bytes.len() - HEADER) as u64 != count.saturating_mul(ENTRY as u64) {
            bail!(
                "a block map of {count} entries cannot be {} bytes",
                bytes.len()
            );
        }
        let mut map = BlockMap::new(block_size, image_size);
        let total = image_size.div_ceil(block_size);
        let mut last = None;
        for e in bytes[HEADER..].chunks_exact(ENTRY) {
            let index = u64::from_le_bytes(e[..8].try_into().expect("8"));
            if index >= total || last.is_some_and(|l| index <= l) {
                bail!("block map entry {index} is out of order or past the image's end");
            }
            last = Some(index);
            map.blocks
                .insert(index, e[8..].try_into().expect("32 bytes"));
        }
        Ok(map)
    }

    /// Writes the map to `path` (atomically); returns its SHA-256 (hex).
    pub fn write(&self, path: &Path) -> Result<String> {
        let bytes = self.to_bytes();
        let tmp = scratch_name(path);
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(hex::encode(Sha256::digest(&bytes)))
    }

    /// Reads the map at `path`, which must hash to `sha256` (hex).
    pub fn read(path: &Path, sha256: &str) -> Result<BlockMap> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != sha256 {
            bail!(
                "{} hashes to {got}, not the {sha256} its snapshot record names: it is not the \
                 map of that snapshot",
                path.display()
            );
        }
        BlockMap::from_bytes(&bytes).with_context(|| format!("{}", path.display()))
    }
}

/// Where the block map of `image` goes.
pub fn map_path(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".blocks");
    image.with_file_name(name)
}

fn scratch_name(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Reads the whole image once: its SHA-256 (holes hashed as zeros without
/// being read) and its block map.
pub fn hash_image(path: &Path, block_size: u64) -> io::Result<(String, BlockMap)> {
    let file = File::open(path)?;
    let size = blocks::image_size(path)?;
    let data = blocks::data_blocks(&file, size, block_size)?;
    let mut whole = Sha256::new();
    let mut map = BlockMap::new(block_size, size);
    let zeros = vec![0u8; block_size as usize];
    let total = size.div_ceil(block_size);
    let mut next = data.iter().copied().peekable();
    for index in 0..total {
        let len = (size - index * block_size).min(block_size) as usize;
        if next.peek() == Some(&index) {
            next.next();
            let block = blocks::read_block(&file, size, block_size, index)?;
            whole.update(&block[..len]);
            if !blocks::is_zero(&block) {
                map.blocks.insert(index, blocks::sha256(&block));
            }
        } else {
            whole.update(&zeros[..len]);
        }
    }
    Ok((hex::encode(whole.finalize()), map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_map_lists_the_non_zero_blocks_and_survives_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let f = File::create(&image).unwrap();
        f.set_len(10 * 4096 + 100).unwrap();
        f.write_all_at(b"data", 4096 * 2 + 7).unwrap();
        f.write_all_at(&[0u8; 4096], 4096 * 5).unwrap(); // written zeros
        f.write_all_at(b"tail", 10 * 4096 + 90).unwrap();
        let (hex_all, map) = hash_image(&image, 4096).unwrap();
        assert_eq!(map.blocks.keys().copied().collect::<Vec<_>>(), vec![2, 10]);
        assert_eq!(hex_all, crate::blocks::sha256_of_image(&image).unwrap().0);
        let mut padded = vec![0u8; 4096];
        padded[90..94].copy_from_slice(b"tail");
        assert_eq!(map.blocks[&10], blocks::sha256(&padded));

        let path = map_path(&image);
        let sum = map.write(&path).unwrap();
        assert_eq!(BlockMap::read(&path, &sum).unwrap(), map);
        let err = BlockMap::read(&path, &"0".repeat(64)).unwrap_err();
        assert!(format!("{err:#}").contains("not the map of that snapshot"));
    }

    #[test]
    fn a_damaged_map_is_refused() {
        let mut map = BlockMap::new(4096, 8192);
        map.blocks.insert(1, [7; 32]);
        let bytes = map.to_bytes();
        assert!(BlockMap::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut past_end = BlockMap::new(4096, 4096);
        past_end.blocks.insert(3, [1; 32]);
        assert!(BlockMap::from_bytes(&past_end.to_bytes()).is_err());
        assert!(BlockMap::from_bytes(b"CORALBLX").is_err());
    }
}
