//! A volume image seen as fixed-size snapshot blocks: which blocks hold data
//! (holes found with `SEEK_DATA`/`SEEK_HOLE` are never read), reading one
//! (the last one padded with zeros), and its SHA-256.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// EBS snapshots are made of 512 KiB blocks.
pub const EBS_BLOCK_SIZE: u64 = 512 * 1024;
pub const GIB: u64 = 1 << 30;

/// The size of an image file or block device, in bytes.
pub fn image_size(path: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(path)?;
    if meta.file_type().is_block_device() {
        let f = File::open(path)?;
        let end = rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0))?;
        Ok(end)
    } else {
        Ok(meta.len())
    }
}

/// The indexes of the blocks of `block_size` bytes that hold any data, in
/// order. A block device (no holes to find) has every block.
pub fn data_blocks(file: &File, size: u64, block_size: u64) -> io::Result<Vec<u64>> {
    let blocks = size.div_ceil(block_size);
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA here (a block device, an old filesystem):
            // everything is data.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                return Ok((0..blocks).collect());
            }
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start))
            .unwrap_or(size)
            .min(size);
        let (first, last) = (start / block_size, (end - 1) / block_size);
        for b in first..=last {
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

/// Block `index` of the image: `block_size` bytes, zero-padded past the end.
pub fn read_block(file: &File, size: u64, block_size: u64, index: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; block_size as usize];
    let offset = index * block_size;
    let want = size.saturating_sub(offset).min(block_size) as usize;
    let mut done = 0;
    while done < want {
        let n = rustix::io::pread(file, &mut buf[done..want], offset + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the image ended inside block {index}"),
            ));
        }
        done += n;
    }
    Ok(buf)
}

pub fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

pub fn sha256(block: &[u8]) -> [u8; 32] {
    Sha256::digest(block).into()
}

/// EBS's "linear" aggregate: the SHA-256 of the blocks' SHA-256 digests
/// concatenated in block-index order.
pub fn linear_checksum<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    h.finalize().into()
}

/// SHA-256 of the whole image (holes read as zeros), for the file backend.
pub fn sha256_of_image(path: &Path) -> io::Result<(String, u64)> {
    let file = File::open(path)?;
    let size = image_size(path)?;
    let mut h = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        // Holes are hashed as zeros without being read.
        let data = match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => pos,
        };
        while pos < data {
            let n = (data - pos).min(zeros.len() as u64) as usize;
            h.update(&zeros[..n]);
            pos += n as u64;
        }
        if pos >= size {
            break;
        }
        let end = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(pos))
            .unwrap_or(size)
            .min(size);
        while pos < end {
            let want = (end - pos).min(buf.len() as u64) as usize;
            let n = rustix::io::pread(&file, &mut buf[..want], pos)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} shrank while being hashed", path.display()),
                ));
            }
            h.update(&buf[..n]);
            pos += n as u64;
        }
    }
    Ok((hex::encode(h.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(dir: &Path) -> (std::path::PathBuf, u64) {
        let path = dir.join("img");
        let f = File::create(&path).unwrap();
        let size = 10 * EBS_BLOCK_SIZE + 1000; // a short last block
        f.set_len(size).unwrap();
        // Data in block 1 (spilling into 2), block 7, and the short last block.
        rustix::io::pwrite(&f, &[1u8; 4096], 2 * EBS_BLOCK_SIZE - 100).unwrap();
        rustix::io::pwrite(&f, &[2u8; 10], 7 * EBS_BLOCK_SIZE + 5).unwrap();
        rustix::io::pwrite(&f, &[3u8; 10], 10 * EBS_BLOCK_SIZE + 900).unwrap();
        (path, size)
    }

    #[test]
    fn only_blocks_with_data_are_listed_and_the_last_is_padded() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, size) = sparse_file(tmp.path());
        let f = File::open(&path).unwrap();
        assert_eq!(
            data_blocks(&f, size, EBS_BLOCK_SIZE).unwrap(),
            vec![1, 2, 7, 10]
        );
        let last = read_block(&f, size, EBS_BLOCK_SIZE, 10).unwrap();
        assert_eq!(last.len() as u64, EBS_BLOCK_SIZE);
        assert_eq!(&last[900..910], &[3u8; 10]);
        assert!(is_zero(&last[910..]));
        assert!(is_zero(&read_block(&f, size, EBS_BLOCK_SIZE, 4).unwrap()));
    }

    #[test]
    fn the_image_hash_treats_holes_as_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, size) = sparse_file(tmp.path());
        let (hex, n) = sha256_of_image(&path).unwrap();
        assert_eq!(n, size);
        let dense = std::fs::read(&path).unwrap();
        assert_eq!(hex, hex::encode(Sha256::digest(&dense)));
    }

    #[test]
    fn the_linear_checksum_is_the_hash_of_the_hashes_in_order() {
        let (a, b) = (sha256(b"a"), sha256(b"b"));
        let mut cat = a.to_vec();
        cat.extend_from_slice(&b);
        assert_eq!(linear_checksum([&a, &b]), sha256(&cat));
        assert_ne!(linear_checksum([&b, &a]), linear_checksum([&a, &b]));
    }
}
