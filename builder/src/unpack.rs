//! Layer extraction into overlayfs form, the way containerd's overlayfs
//! snapshotter leaves a layer after `archive.Apply` with its overlay whiteout
//! converter: one directory per layer holding only that layer's changes, a
//! deleted path as a 0:0 character device, an opaque directory marked with
//! `trusted.overlay.opaque=y`, and ownership, modes (setuid included), times,
//! xattrs, hardlinks, symlinks, device nodes and fifos preserved.
//!
//! Where coral differs from containerd, it is stricter, never looser:
//! - An entry whose name is absolute or contains `..`, or whose parent is a
//!   symlink, or a hardlink whose target is outside the layer, is *rejected*
//!   with an error naming the layer and the entry (containerd resolves such
//!   names inside the root instead). Legitimate images never need them.
//! - `trusted.*` xattrs in a layer are dropped: they would steer overlayfs
//!   itself (`trusted.overlay.*`); containerd does not apply them either.
//! - The uncompressed stream is bounded: past `max_bytes` extraction stops
//!   (decompression bombs). The apparent size of sparse files is bounded the
//!   same way: a layer's PAX sparse files together may not be larger than
//!   `max_bytes`, the bound the same files would meet stored dense.
//! - A GNU PAX sparse entry of a version other than 0.0, 0.1 and 1.0 is
//!   rejected (Go's reader extracts it raw, under its placeholder name).
//! - An owner ID that is negative or does not fit in 32 bits, or is
//!   4294967295 (`(uid_t)-1`, which chown(2) takes as "leave unchanged"), is
//!   rejected: containerd hands it to lchown, which keeps the low 32 bits, so
//!   `uid=4294967296` would make the file root's.
//!
//! As Go's reader does, a PAX extended header (local or global) or a GNU
//! long name or long link name larger than 1 MiB is refused; it is checked
//! as its header block arrives, before the `tar` crate would buffer it.
//!
//! Times are set as containerd sets them: PAX times keep their nanoseconds,
//! the access time is the later of the entry's access time (PAX `atime`, or
//! a GNU or star header's) and its modification time, and a time before the
//! epoch or past what `int64` nanoseconds hold becomes the epoch.
//!
//! GNU tar's PAX sparse files (`--sparse`, versions 0.0, 0.1 and 1.0), which
//! the `tar` crate hands over unexpanded, are expanded here as Go's
//! `archive/tar` (containerd's) expands them: a regular file named by
//! `GNU.sparse.name`, of `GNU.sparse.size` (or `GNU.sparse.realsize`) bytes,
//! the stored chunks at their offsets and holes between them.
//!
//! This module never follows a symlink inside the destination while writing,
//! and never writes outside `dest`. It is blocking code: run it off the async
//! runtime.

use std::cell::{Cell, RefCell};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use coral_seed::{DiffId, Digest};
use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest as _, Sha256};
use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR: &str = "SCHILY.xattr.";
/// Zero runs of at least this many bytes (aligned) become holes, as the
/// filesystem would store them anyway; reading gives the same zeros.
const HOLE_BLOCK: usize = 4096;
static ZERO_BLOCK: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];
/// Tar's block size: a PAX 1.0 sparse map is padded to a multiple of it.
const TAR_BLOCK: u64 = 512;
/// Longest sparse map accepted, as text (the PAX 1.0 map with its padding,
/// or a 0.x `GNU.sparse.map` record): the limit of current Go releases
/// (containerd's reader) and libarchive. Room for some 50,000 data regions
/// of a real file; a hostile map of minimal "0\n" tokens parses into at most
/// 4 MiB of chunk list.
const MAX_SPARSE_MAP: u64 = 1 << 20;
/// Largest PAX extended header or GNU long name/link entry accepted: Go's
/// `maxSpecialFileSize` (containerd's reader refuses larger ones).
const MAX_SPECIAL_FILE: u64 = 1 << 20;

/// How a layer blob is compressed, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(
        "layer {layer}: entry {entry:?} {reason}; refusing to extract it (it would escape the layer directory)"
    )]
    Escape {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: entry {entry:?}: {what}")]
    Invalid {
        layer: String,
        entry: String,
        what: String,
    },
    #[error(
        "layer {layer}: uncompressed stream exceeds the limit of {limit} bytes \
         (a decompression bomb, or a layer larger than allowed: raise --max-unpacked or --size)"
    )]
    TooLarge { layer: String, limit: u64 },
    #[error(
        "layer {layer}: entry {entry:?} is a sparse file of {size} bytes, which takes the \
         apparent size of the layer's sparse files past the limit of {limit} bytes \
         (raise --max-unpacked or --size)"
    )]
    SparseTooLarge {
        layer: String,
        entry: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "layer {layer}: {} (at byte {offset} of the stream) is a {kind} of {size} bytes, \
         more than the limit of {limit} bytes (Go's archive/tar, containerd's reader, \
         refuses it too)",
        .entry.as_ref().map_or_else(|| "an unnamed entry".to_owned(), |e| format!("entry {e:?}"))
    )]
    HeaderTooLarge {
        layer: String,
        /// The name in the extension entry's own header, if it has one.
        entry: Option<String>,
        kind: &'static str,
        offset: u64,
        size: u64,
        limit: u64,
    },
    #[error("layer {layer}: reading the layer stream: {source}")]
    Read {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: entry {entry:?}: writing {path}: {source}")]
    Write {
        layer: String,
        entry: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub struct UnpackOptions<'a> {
    /// Names the layer in errors (e.g. `docker.io/library/x:1 layer sha256:…`).
    pub layer: &'a str,
    pub compression: Compression,
    /// The layer's directory; created if missing, and expected to be empty.
    pub dest: &'a Path,
    /// Whether layers lie below this one. A base layer has nothing to delete,
    /// so its whiteouts are dropped, as containerd drops them.
    pub has_parent: bool,
    /// Upper bound on the uncompressed stream, in bytes; also on the sum of
    /// the apparent sizes of the layer's PAX sparse files.
    pub max_bytes: u64,
    /// A count shared by layers extracted at the same time: the bytes all of
    /// their streams have produced, bounded by `max_bytes` together, so
    /// parallel decompression bombs cannot write `max_bytes` each.
    pub total: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackedLayer {
    /// SHA-256 of the whole uncompressed stream.
    pub diff_id: DiffId,
    /// Length of the uncompressed stream.
    pub tar_bytes: u64,
    /// Bytes of regular-file content written (apparent sizes: holes count).
    pub file_bytes: u64,
    /// Directories created only because an entry needed a parent (relative to
    /// `dest`): containerd copies their metadata from the layers below, which
    /// [`inherit_implicit_dirs`] does once those are extracted.
    pub implicit_dirs: Vec<PathBuf>,
}

/// Hashes, counts and bounds the uncompressed stream as the tar reader pulls
/// it, and checks the size of extension entries as their headers arrive.
struct Metered<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    /// Bytes produced by every layer sharing the bound.
    total: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    shared: Rc<Shared>,
    /// The header block being gathered, while watching headers.
    header: tar::Header,
    filled: usize,
    /// Stream offset of the next header block to check, if any.
    next_header: Option<u64>,
}

/// State shared between [`Metered`] (owned by the tar reader) and the loop
/// over the entries.
struct Shared {
    exceeded: Cell<bool>,
    watch: Cell<Watch>,
    /// Why a read was refused by the header watch.
    refused: RefCell<Option<Refused>>,
}

/// What [`Metered`] makes of the bytes it passes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    /// Entry data, read by the extractor: not looked at.
    Data,
    /// The tar reader is about to look for the next entry: its header starts
    /// at the next block boundary (the extractor reads each entry's data to
    /// its end first, so only padding lies before it).
    Arm,
    /// Header blocks (and the data of the extension entries among them).
    Headers,
}

/// An extension entry refused for its size.
struct Refused {
    entry: Option<String>,
    kind: &'static str,
    offset: u64,
    size: u64,
}

impl<R> Metered<R> {
    fn new(
        inner: R,
        limit: u64,
        total: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
        shared: Rc<Shared>,
    ) -> Metered<R> {
        Metered {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            total,
            shared,
            header: tar::Header::new_old(),
            filled: 0,
            next_header: None,
        }
    }

    /// Follows the header blocks in `bytes` (which start at stream offset
    /// `pos`) while the tar reader looks for an entry: the blocks of GNU long
    /// names and links and of PAX headers, which the reader takes whole into
    /// memory, and the data of each, up to the next header. An extension
    /// entry larger than [`MAX_SPECIAL_FILE`] fails the read that completes
    /// its header block, before the reader has seen its size.
    fn watch(&mut self, mut pos: u64, mut bytes: &[u8]) -> io::Result<()> {
        match self.shared.watch.get() {
            Watch::Data => return Ok(()),
            Watch::Arm => {
                self.shared.watch.set(Watch::Headers);
                self.next_header = Some(pos.next_multiple_of(TAR_BLOCK));
                self.filled = 0;
            }
            Watch::Headers => {}
        }
        while let Some(at) = self.next_header {
            if bytes.is_empty() {
                break;
            }
            let here = at + self.filled as u64;
            if pos < here {
                // Padding, or the data of an extension entry.
                let skip = (here - pos).min(bytes.len() as u64) as usize;
                pos += skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let block = self.header.as_mut_bytes();
            let n = (block.len() - self.filled).min(bytes.len());
            block[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            pos += n as u64;
            bytes = &bytes[n..];
            if self.filled == block.len() {
                self.filled = 0;
                self.next_header = self.check_header(at)?;
            }
        }
        Ok(())
    }

    /// Checks the header block gathered at offset `at`; returns where the
    /// next header the tar reader reads in the same search starts, if any.
    fn check_header(&self, at: u64) -> io::Result<Option<u64>> {
        let h = &self.header;
        let kind = match h.entry_type() {
            EntryType::XHeader => "PAX extended header",
            EntryType::XGlobalHeader => "PAX global extended header",
            EntryType::GNULongName => "GNU long name entry",
            EntryType::GNULongLink => "GNU long link name entry",
            // An entry proper (or the end of the archive): the search ends.
            _ => return Ok(None),
        };
        // A corrupt header is the tar reader's to report, as it does.
        let bytes = h.as_bytes();
        let sum = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .map(|b| u32::from(*b))
            .sum::<u32>()
            + 8 * u32::from(b' ');
        if h.cksum().ok() != Some(sum) {
            return Ok(None);
        }
        let Ok(size) = h.entry_size() else {
            return Ok(None);
        };
        if size > MAX_SPECIAL_FILE {
            let name = h.path_bytes();
            *self.shared.refused.borrow_mut() = Some(Refused {
                entry: (!name.is_empty()).then(|| String::from_utf8_lossy(&name).into_owned()),
                kind,
                offset: at,
                size,
            });
            return Err(io::Error::other(format!(
                "a {kind} of {size} bytes, more than {MAX_SPECIAL_FILE}"
            )));
        }
        Ok(match h.entry_type() {
            // The reader hands a global header over as an entry.
            EntryType::XGlobalHeader => None,
            // The others it reads whole, then reads the next header.
            _ => Some(at + TAR_BLOCK + size.next_multiple_of(TAR_BLOCK)),
        })
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let start = self.count;
        self.count += n as u64;
        let total = match &self.total {
            Some(t) => t.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed) + n as u64,
            None => self.count,
        };
        if self.count > self.limit || total > self.limit {
            self.shared.exceeded.set(true);
            return Err(io::Error::other("uncompressed size limit exceeded"));
        }
        self.hasher.update(&buf[..n]);
        self.watch(start, &buf[..n])?;
        Ok(n)
    }
}

/// Extracts one layer blob read from `blob` into `opts.dest`.
pub fn unpack_layer(
    blob: impl Read,
    opts: &UnpackOptions<'_>,
) -> Result<UnpackedLayer, UnpackError> {
    let layer = opts.layer.to_owned();
    let stream: Box<dyn Read> = match opts.compression {
        Compression::None => Box::new(blob),
        // Multi-member gzip is valid and Go's reader (containerd's) accepts it.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(1 << 16, blob),
        )),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(|source| {
                UnpackError::Read {
                    layer: layer.clone(),
                    source,
                }
            })?)
        }
    };
    let shared = Rc::new(Shared {
        exceeded: Cell::new(false),
        watch: Cell::new(Watch::Data),
        refused: RefCell::new(None),
    });
    let metered = Metered::new(stream, opts.max_bytes, opts.total.clone(), shared.clone());
    let exceeded = || shared.exceeded.get();
    let read_err = |source: io::Error| {
        if exceeded() {
            UnpackError::TooLarge {
                layer: layer.clone(),
                limit: opts.max_bytes,
            }
        } else if let Some(r) = shared.refused.borrow_mut().take() {
            UnpackError::HeaderTooLarge {
                layer: layer.clone(),
                entry: r.entry,
                kind: r.kind,
                offset: r.offset,
                size: r.size,
                limit: MAX_SPECIAL_FILE,
            }
        } else {
            UnpackError::Read {
                layer: layer.clone(),
                source,
            }
        }
    };

    fs::create_dir_all(opts.dest).map_err(|source| UnpackError::Write {
        layer: layer.clone(),
        entry: String::new(),
        path: opts.dest.to_owned(),
        source,
    })?;
    let mut x = Extractor {
        layer: &layer,
        dest: opts.dest,
        has_parent: opts.has_parent,
        max_bytes: opts.max_bytes,
        sparse_bytes: 0,
        file_bytes: 0,
        implicit_dirs: Vec::new(),
        dir_times: Vec::new(),
    };

    let mut archive = tar::Archive::new(metered);
    {
        let mut entries = archive.entries().map_err(read_err)?;
        loop {
            shared.watch.set(Watch::Arm);
            let next = entries.next();
            shared.watch.set(Watch::Data);
            let Some(entry) = next else {
                break;
            };
            let mut entry = entry.map_err(read_err)?;
            x.entry(&mut entry).map_err(|e| match e {
                // A read error surfaced while copying file content.
                UnpackError::Write { source, .. } if exceeded() => read_err(source),
                // Or while reading a sparse map.
                UnpackError::Invalid { what, .. } if exceeded() => read_err(io::Error::other(what)),
                other => other,
            })?;
            // What the extractor left of the entry's data (the tar reader
            // would skip it): the next header then starts at the next block.
            io::copy(&mut entry, &mut io::sink()).map_err(read_err)?;
        }
    }
    // The diff ID covers the whole stream, including what follows the
    // end-of-archive marker, exactly as containerd hashes it.
    let mut metered = archive.into_inner();
    io::copy(&mut metered, &mut io::sink()).map_err(read_err)?;

    // Directory times last: writing entries into a directory changes its mtime.
    for (path, times) in x.dir_times.iter().rev() {
        set_times(path, *times).map_err(|source| x.write_err("", path, source))?;
    }
    for rel in &x.implicit_dirs {
        let path = opts.dest.join(rel);
        let epoch = Times {
            atime: TarTime::EPOCH,
            mtime: TarTime::EPOCH,
        };
        set_times(&path, epoch).map_err(|source| x.write_err("", &path, source))?;
    }

    Ok(UnpackedLayer {
        diff_id: DiffId::new(Digest::from_sha256(metered.hasher.finalize().into())),
        tar_bytes: metered.count,
        file_bytes: x.file_bytes,
        implicit_dirs: x.implicit_dirs,
    })
}

struct Extractor<'a> {
    layer: &'a str,
    dest: &'a Path,
    has_parent: bool,
    max_bytes: u64,
    /// Sum of the apparent sizes of the PAX sparse files met so far.
    sparse_bytes: u64,
    file_bytes: u64,
    implicit_dirs: Vec<PathBuf>,
    dir_times: Vec<(PathBuf, Times)>,
}

/// Metadata of one entry, with PAX overrides applied.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    times: Times,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A point in time as Go's `time.Time` holds a tar entry's: seconds since
/// the epoch, and nanoseconds in `0..1_000_000_000`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TarTime {
    sec: i64,
    nsec: u32,
}

impl TarTime {
    const EPOCH: TarTime = TarTime { sec: 0, nsec: 0 };
    /// containerd's `maxTime`, `time.Unix(0, 1<<63-1)`: the latest time
    /// `int64` nanoseconds hold.
    const MAX: TarTime = TarTime {
        sec: i64::MAX / 1_000_000_000,
        nsec: (i64::MAX % 1_000_000_000) as u32,
    };

    fn from_secs(sec: i64) -> TarTime {
        TarTime { sec, nsec: 0 }
    }

    /// Go's `time.Unix(sec, nsec)` for `nsec` in `-999_999_999..=999_999_999`.
    fn unix(sec: i64, nsec: i64) -> TarTime {
        if nsec < 0 {
            TarTime {
                sec: sec.wrapping_sub(1),
                nsec: (nsec + 1_000_000_000) as u32,
            }
        } else {
            TarTime {
                sec,
                nsec: nsec as u32,
            }
        }
    }

    /// What Go compares times by: seconds since year 1 (as `int64`, wrapping
    /// as Go's arithmetic does for absurd values), then nanoseconds.
    fn key(self) -> (i64, u32) {
        const UNIX_TO_INTERNAL: i64 = 62_135_596_800;
        (self.sec.wrapping_add(UNIX_TO_INTERNAL), self.nsec)
    }

    /// containerd's `boundTime`: a time it cannot set becomes the epoch.
    fn bound(self) -> TarTime {
        if self.key() < TarTime::EPOCH.key() || self.key() > TarTime::MAX.key() {
            TarTime::EPOCH
        } else {
            self
        }
    }

    fn timespec(self) -> Timespec {
        Timespec {
            tv_sec: self.sec,
            tv_nsec: self.nsec.into(),
        }
    }
}

/// The access and modification times to give an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Times {
    atime: TarTime,
    mtime: TarTime,
}

impl Times {
    /// As containerd sets them: `chtimes(path, boundTime(latestTime(atime,
    /// mtime)), boundTime(mtime))`. An entry without an access time has Go's
    /// zero time there, which `latestTime` passes over for any mtime it
    /// would not bound to the epoch anyway.
    fn containerd(atime: Option<TarTime>, mtime: TarTime) -> Times {
        let atime = atime.unwrap_or(mtime);
        let latest = if atime.key() < mtime.key() {
            mtime
        } else {
            atime
        };
        Times {
            atime: latest.bound(),
            mtime: mtime.bound(),
        }
    }
}

/// Which GNU PAX sparse format an entry uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SparseFormat {
    /// 0.0 (`GNU.sparse.offset`/`GNU.sparse.numbytes` record pairs) or 0.1
    /// (one `GNU.sparse.map` record): the map is in the PAX header and the
    /// entry's data is the chunks, concatenated.
    V0,
    /// 1.0: the entry's data opens with the map, padded to a tar block.
    V1,
}

/// The `GNU.sparse.*` records of an entry's PAX header (empty values count
/// as absent, as Go's reader treats them).
struct SparseRecords {
    format: SparseFormat,
    name: Option<Vec<u8>>,
    size: Option<Vec<u8>>,
    realsize: Option<Vec<u8>>,
    numblocks: Option<Vec<u8>>,
    map: Option<Vec<u8>>,
    /// 0.0: `(is_offset, value)` in archive order.
    pairs: Vec<(bool, Vec<u8>)>,
}

/// A validated sparse layout: `chunks` are `(offset, length)`, in order,
/// not overlapping, within `size`; their lengths add up to the entry's data
/// (after the map, for 1.0).
struct SparsePlan {
    size: u64,
    chunks: Vec<(u64, u64)>,
}

impl<'a> Extractor<'a> {
    fn escape(&self, entry: &str, reason: impl Into<String>) -> UnpackError {
        UnpackError::Escape {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    fn invalid(&self, entry: &str, what: impl Into<String>) -> UnpackError {
        UnpackError::Invalid {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            what: what.into(),
        }
    }

    fn write_err(&self, entry: &str, path: &Path, source: io::Error) -> UnpackError {
        UnpackError::Write {
            layer: self.layer.to_owned(),
            entry: entry.to_owned(),
            path: path.to_owned(),
            source,
        }
    }

    /// A member name as a relative path of normal components, or `None` for
    /// the root itself (which containerd ignores too).
    fn clean_name(&self, entry: &str, raw: &[u8]) -> Result<Option<PathBuf>, UnpackError> {
        if raw.first() == Some(&b'/') {
            return Err(self.escape(entry, "is an absolute path"));
        }
        let mut out = PathBuf::new();
        for c in Path::new(OsStr::from_bytes(raw)).components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => return Err(self.escape(entry, "contains a '..' component")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.escape(entry, "is an absolute path"));
                }
            }
        }
        Ok((!out.as_os_str().is_empty()).then_some(out))
    }

    /// Makes sure every parent of `rel` is a real directory inside `dest`,
    /// creating missing ones (recorded as implicit), refusing symlinks.
    fn ensure_parents(&mut self, entry: &str, rel: &Path) -> Result<(), UnpackError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut cur = self.dest.to_path_buf();
        let mut cur_rel = PathBuf::new();
        for c in parent.components() {
            cur.push(c);
            cur_rel.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.escape(
                        entry,
                        format!("would be written through the symlink {:?}", cur_rel),
                    ));
                }
                Ok(_) => {
                    return Err(
                        self.invalid(entry, format!("its parent {cur_rel:?} is not a directory"))
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&cur).map_err(|source| self.write_err(entry, &cur, source))?;
                    set_mode(&cur, 0o755).map_err(|source| self.write_err(entry, &cur, source))?;
                    self.implicit_dirs.push(cur_rel.clone());
                }
                Err(source) => return Err(self.write_err(entry, &cur, source)),
            }
        }
        Ok(())
    }

    /// Removes whatever is at `path` (a directory with its contents).
    fn remove_existing(&mut self, entry: &str, path: &Path) -> Result<(), UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|source| self.write_err(entry, path, source))?;
        // Anything implicit below a removed path is gone too.
        if let Ok(rel) = path.strip_prefix(self.dest) {
            self.implicit_dirs.retain(|d| !d.starts_with(rel));
        }
        Ok(())
    }

    /// The entry's metadata: its header's, with its PAX records applied as
    /// Go's reader applies them (the last record of a key wins; an empty
    /// value keeps the header's).
    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Meta, UnpackError> {
        let h = entry.header();
        let bad =
            |what: &str, e: io::Error| self.invalid(name, format!("bad {what} in header: {e}"));
        let header_uid = h.uid().map_err(|e| bad("uid", e))?;
        let header_gid = h.gid().map_err(|e| bad("gid", e))?;
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let header_mtime = h.mtime().map_err(|e| bad("mtime", e))?;
        let header_atime = header_atime(h).map_err(|what| self.invalid(name, what))?;

        // (first, last) record of each key that matters here.
        let mut uid: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut gid: Option<(Vec<u8>, Vec<u8>)> = None;
        let (mut mtime, mut atime, mut ctime) = (None, None, None);
        let mut xattrs = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| bad("PAX extensions", e))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| bad("PAX record", e))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                match key {
                    b"uid" | b"gid" => {
                        let slot = if key == b"uid" { &mut uid } else { &mut gid };
                        match slot {
                            Some((_, last)) => *last = value.to_vec(),
                            None => *slot = Some((value.to_vec(), value.to_vec())),
                        }
                    }
                    b"mtime" => mtime = Some(value.to_vec()),
                    b"atime" => atime = Some(value.to_vec()),
                    b"ctime" => ctime = Some(value.to_vec()),
                    k if k.starts_with(PAX_XATTR.as_bytes()) => {
                        let attr = &k[PAX_XATTR.len()..];
                        if !attr.starts_with(b"trusted.") {
                            xattrs.push((attr.to_vec(), value.to_vec()));
                        }
                    }
                    _ => {}
                }
            }
        }

        let time = |key: &str, value: Option<Vec<u8>>| -> Result<Option<TarTime>, UnpackError> {
            match value {
                Some(v) if !v.is_empty() => parse_pax_time(&v).map(Some).ok_or_else(|| {
                    self.invalid(
                        name,
                        format!("bad PAX {key} {:?}", String::from_utf8_lossy(&v)),
                    )
                }),
                _ => Ok(None),
            }
        };
        let mtime = time("mtime", mtime)?.unwrap_or(TarTime::from_secs(header_mtime as i64));
        let atime = time("atime", atime)?.or(header_atime);
        // Go's reader refuses a malformed ctime too; it is not applied.
        time("ctime", ctime)?;

        let owner = |key: &str, header: u64, records: Option<(Vec<u8>, Vec<u8>)>| {
            let (value, whence) = match records {
                Some((_, last)) if !last.is_empty() => {
                    let v = std::str::from_utf8(&last)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| {
                            self.invalid(
                                name,
                                format!("bad PAX {key} {:?}", String::from_utf8_lossy(&last)),
                            )
                        })?;
                    (i128::from(v), "its PAX header")
                }
                // The tar crate has put the first record in the header if it
                // is a number; Go would keep the header's own value.
                Some((first, _))
                    if std::str::from_utf8(&first).is_ok_and(|s| s.parse::<u64>().is_ok()) =>
                {
                    return Err(self.invalid(
                        name,
                        format!("has conflicting PAX {key} records (the last one is empty)"),
                    ));
                }
                _ => (i128::from(header), "its header"),
            };
            // u32::MAX is (uid_t)-1: chown(2) would leave the owner unchanged.
            u32::try_from(value)
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| {
                    self.invalid(
                        name,
                        format!(
                            "has {key} {value} (from {whence}), which is not a valid owner \
                             ID: owner IDs are 0 to 4294967294; refusing it rather than \
                             cutting it to 32 bits"
                        ),
                    )
                })
        };
        Ok(Meta {
            uid: owner("uid", header_uid, uid)?,
            gid: owner("gid", header_gid, gid)?,
            mode,
            times: Times::containerd(atime, mtime),
            xattrs,
        })
    }

    /// The entry's GNU PAX sparse records, or `None` if it is not a PAX
    /// sparse file. Versions are told apart as Go's reader does; unknown
    /// ones are refused (Go would extract the raw entry under its
    /// placeholder name).
    fn sparse_records<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        name: &str,
    ) -> Result<Option<SparseRecords>, UnpackError> {
        let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| self.invalid(name, format!("bad PAX extensions in header: {e}")))?
        else {
            return Ok(None);
        };
        let (mut major, mut minor) = (None, None);
        let mut r = SparseRecords {
            format: SparseFormat::V0,
            name: None,
            size: None,
            realsize: None,
            numblocks: None,
            map: None,
            pairs: Vec::new(),
        };
        for ext in pax {
            let ext =
                ext.map_err(|e| self.invalid(name, format!("bad PAX record in header: {e}")))?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            match key {
                b"GNU.sparse.offset" => r.pairs.push((true, value.to_vec())),
                b"GNU.sparse.numbytes" => r.pairs.push((false, value.to_vec())),
                _ => {}
            }
            let slot = match key {
                b"GNU.sparse.major" => &mut major,
                b"GNU.sparse.minor" => &mut minor,
                b"GNU.sparse.name" => &mut r.name,
                b"GNU.sparse.size" => &mut r.size,
                b"GNU.sparse.realsize" => &mut r.realsize,
                b"GNU.sparse.numblocks" => &mut r.numblocks,
                b"GNU.sparse.map" => &mut r.map,
                _ => continue,
            };
            // The last record wins, as for every other PAX key.
            *slot = (!value.is_empty()).then(|| value.to_vec());
        }
        // Errors name the file as a listing shows it, not the placeholder.
        let shown = r.name.as_deref().map(String::from_utf8_lossy);
        let name = shown.as_deref().unwrap_or(name);
        r.format = match (major.as_deref(), minor.as_deref()) {
            (Some(b"0"), Some(b"0" | b"1")) => SparseFormat::V0,
            (Some(b"1"), Some(b"0")) => SparseFormat::V1,
            (None, None) if r.map.is_some() || !r.pairs.is_empty() => SparseFormat::V0,
            (None, None) => return Ok(None),
            (major, minor) => {
                let show = |v: Option<&[u8]>| {
                    v.map_or("(none)".into(), |v| String::from_utf8_lossy(v).into_owned())
                };
                return Err(self.invalid(
                    name,
                    format!(
                        "is a GNU sparse file of version {}.{}, which is not supported \
                         (only 0.0, 0.1 and 1.0 are)",
                        show(major),
                        show(minor)
                    ),
                ));
            }
        };
        if !matches!(kind, EntryType::Regular | EntryType::Continuous) {
            return Err(self.invalid(
                name,
                format!(
                    "has GNU sparse PAX records but is of type {:?}, not a regular file",
                    kind.as_byte() as char
                ),
            ));
        }
        Ok(Some(r))
    }

    /// Reads (1.0) or parses (0.x) the sparse map of the entry `name` and
    /// checks it against the file's size, the entry's data and the layer's
    /// sparse budget.
    fn sparse_plan<R: Read>(
        &mut self,
        name: &str,
        r: SparseRecords,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<SparsePlan, UnpackError> {
        let layer = self.layer;
        let bad = |what: String| UnpackError::Invalid {
            layer: layer.to_owned(),
            entry: name.to_owned(),
            what,
        };
        // As Go: GNU.sparse.size first (0.x), else GNU.sparse.realsize (1.0).
        let (key, raw_size) = match (&r.size, &r.realsize) {
            (Some(v), _) => ("GNU.sparse.size", v),
            (None, Some(v)) => ("GNU.sparse.realsize", v),
            (None, None) => {
                return Err(bad(
                    "is a GNU sparse file without GNU.sparse.realsize or GNU.sparse.size".into(),
                ));
            }
        };
        let size = parse_decimal(raw_size).ok_or_else(|| {
            bad(format!(
                "has a bad {key} {:?}",
                String::from_utf8_lossy(raw_size)
            ))
        })?;
        match self.sparse_bytes.checked_add(size) {
            Some(total) if total <= self.max_bytes => self.sparse_bytes = total,
            _ => {
                return Err(UnpackError::SparseTooLarge {
                    layer: self.layer.to_owned(),
                    entry: name.to_owned(),
                    size,
                    limit: self.max_bytes,
                });
            }
        }

        let stored = entry.size();
        let (chunks, map_bytes) = match r.format {
            SparseFormat::V1 => read_sparse_map(entry, stored).map_err(|e| match e {
                MapError::Bad(what) => bad(what),
                MapError::Io(e) => bad(format!("reading its sparse map: {e}")),
            })?,
            SparseFormat::V0 => (sparse_map_v0(&r).map_err(bad)?, 0),
        };

        let mut end = 0u64;
        let mut data = 0u64;
        for (i, &(offset, length)) in chunks.iter().enumerate() {
            // Both are at most i64::MAX: no overflow.
            let chunk_end = offset + length;
            if offset < end {
                return Err(bad(format!(
                    "sparse chunk {i} (offset {offset}) starts before the previous chunk ends \
                     (at {end}): chunks must be in order and not overlap"
                )));
            }
            if chunk_end > size {
                return Err(bad(format!(
                    "sparse chunk {i} (offset {offset}, length {length}) ends past the \
                     file's size of {size} bytes"
                )));
            }
            end = chunk_end;
            // Cannot overflow: the chunks are disjoint and within `size`.
            data += length;
        }
        let stored_data = stored - map_bytes;
        if data != stored_data {
            return Err(bad(format!(
                "its sparse map lists {data} bytes of data but the entry stores {stored_data} \
                 (after a map of {map_bytes} bytes)"
            )));
        }
        Ok(SparsePlan { size, chunks })
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let mut raw_name = entry.path_bytes().into_owned();
        let sparse = self.sparse_records(entry, kind, &String::from_utf8_lossy(&raw_name))?;
        // The header names a placeholder (`dir/GNUSparseFile.0/file`); the
        // real name goes through the same checks as any other.
        if let Some(n) = sparse.as_ref().and_then(|s| s.name.clone()) {
            raw_name = n;
        }
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        let Some(rel) = self.clean_name(&name, &raw_name)? else {
            return Ok(());
        };
        // Validated before anything is written, as Go's reader does.
        let sparse = match sparse {
            Some(records) => Some(self.sparse_plan(&name, records, entry)?),
            None => None,
        };
        let meta = self.meta(entry, &name)?;
        let base = rel
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();

        // Whiteouts: never written as files.
        if base == WHITEOUT_OPAQUE {
            if self.has_parent {
                self.ensure_parents(&name, &rel)?;
                let dir = self.dest.join(rel.parent().unwrap_or(Path::new("")));
                rustix::fs::lsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(|e| self.write_err(&name, &dir, e.into()))?;
            }
            return Ok(());
        }
        if let Some(original) = base.strip_prefix(WHITEOUT_PREFIX) {
            if original.is_empty() || original == "." || original == ".." {
                return Err(self.escape(&name, "is a whiteout for an invalid name"));
            }
            let target_rel = rel.with_file_name(original);
            let target = self.dest.join(&target_rel);
            self.ensure_parents(&name, &target_rel)?;
            self.remove_existing(&name, &target)?;
            if self.has_parent {
                rustix::fs::mknodat(CWD, &target, FileType::CharacterDevice, Mode::empty(), 0)
                    .map_err(|e| self.write_err(&name, &target, e.into()))?;
                self.apply_meta(&name, &target, &meta, false)?;
            }
            return Ok(());
        }

        self.ensure_parents(&name, &rel)?;
        let path = self.dest.join(&rel);
        let existing_dir = fs::symlink_metadata(&path)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if !(existing_dir && kind == EntryType::Directory) {
            self.remove_existing(&name, &path)?;
        }
        let werr = |s: &Self, e: io::Error| s.write_err(&name, &path, e);

        match kind {
            EntryType::Directory => {
                if !existing_dir {
                    fs::create_dir(&path).map_err(|e| werr(self, e))?;
                }
                // An explicit entry wins over an implicit parent made earlier.
                self.implicit_dirs.retain(|d| d != &rel);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| werr(self, e))?;
                let n = match &sparse {
                    Some(plan) => write_sparse(entry, &mut f, plan).map(|()| plan.size),
                    None => copy_sparse(entry, &mut f),
                }
                .map_err(|e| werr(self, e))?;
                self.file_bytes += n;
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.invalid(&name, "hardlink without a target"))?
                    .into_owned();
                let target_name = String::from_utf8_lossy(&raw_target).into_owned();
                let target_rel = self
                    .clean_name(&name, &raw_target)
                    .map_err(|_| {
                        self.escape(
                            &name,
                            format!("is a hardlink to {target_name:?}, outside the layer"),
                        )
                    })?
                    .ok_or_else(|| self.escape(&name, "is a hardlink to the layer root"))?;
                self.check_no_symlink_parents(&name, &target_rel)?;
                let target = self.dest.join(&target_rel);
                match fs::symlink_metadata(&target) {
                    Ok(m) if !m.is_dir() => {}
                    Ok(_) => {
                        return Err(self.invalid(
                            &name,
                            format!("is a hardlink to the directory {target_name:?}"),
                        ));
                    }
                    Err(_) => {
                        return Err(self.invalid(
                            &name,
                            format!(
                                "is a hardlink to {target_name:?}, which is not in this layer \
                                 (links to lower layers are refused, as containerd refuses them)"
                            ),
                        ));
                    }
                }
                fs::hard_link(&target, &path).map_err(|e| werr(self, e))?;
                // containerd chowns and times the (shared) inode but leaves its mode.
                return self.apply_meta(&name, &path, &meta, false);
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| self.invalid(&name, "symlink without a target"))?
                    .into_owned();
                symlink(OsStr::from_bytes(&target), &path).map_err(|e| werr(self, e))?;
                return self.apply_meta(&name, &path, &meta, false);
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let ft = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                rustix::fs::mknodat(
                    CWD,
                    &path,
                    ft,
                    Mode::empty(),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|e| werr(self, e.into()))?;
            }
            other => {
                return Err(self.invalid(
                    &name,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ));
            }
        }

        self.apply_meta(&name, &path, &meta, true)?;
        if kind == EntryType::Directory {
            self.dir_times.push((path, meta.times));
        }
        Ok(())
    }

    fn check_no_symlink_parents(&self, entry: &str, rel: &Path) -> Result<(), UnpackError> {
        let mut cur = self.dest.to_path_buf();
        if let Some(parent) = rel.parent() {
            for c in parent.components() {
                cur.push(c);
                if fs::symlink_metadata(&cur)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false)
                {
                    return Err(self.escape(
                        entry,
                        format!("is a hardlink through the symlink {:?}", cur),
                    ));
                }
            }
        }
        Ok(())
    }

    fn set_xattrs(&self, entry: &str, path: &Path, meta: &Meta) -> Result<(), UnpackError> {
        for (k, v) in &meta.xattrs {
            let name = OsStr::from_bytes(k);
            if let Err(e) = rustix::fs::lsetxattr(path, name, v, XattrFlags::empty()) {
                let security = k.starts_with(b"security.");
                // As containerd: unsupported attributes, and security.* the
                // kernel refuses, are skipped; Linux refuses user.* on symlinks.
                if e == rustix::io::Errno::OPNOTSUPP
                    || (e == rustix::io::Errno::PERM && (security || is_symlink(path)))
                {
                    tracing::debug!(layer = self.layer, entry, xattr = %name.to_string_lossy(), "xattr skipped: {e}");
                    continue;
                }
                return Err(self.write_err(entry, path, e.into()));
            }
        }
        Ok(())
    }

    /// Ownership, xattrs, mode, times, in the order containerd applies them:
    /// chown clears setuid/setgid and `security.capability`, so it goes first.
    fn apply_meta(
        &self,
        entry: &str,
        path: &Path,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), UnpackError> {
        let werr = |e: io::Error| self.write_err(entry, path, e);
        rustix::fs::chownat(
            CWD,
            path,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| werr(e.into()))?;
        self.set_xattrs(entry, path, meta)?;
        if chmod && !is_symlink(path) {
            set_mode(path, meta.mode).map_err(werr)?;
        }
        set_times(path, meta.times).map_err(werr)
    }
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    rustix::fs::chmod(path, Mode::from_raw_mode(mode)).map_err(Into::into)
}

/// Sets atime and mtime (not following symlinks).
fn set_times(path: &Path, times: Times) -> io::Result<()> {
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: times.atime.timespec(),
            last_modification: times.mtime.timespec(),
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(Into::into)
}

/// Copies `src` to `dst`, leaving aligned all-zero blocks as holes.
fn copy_sparse(src: &mut impl Read, dst: &mut File) -> io::Result<u64> {
    thread_local! {
        // One buffer per extraction thread, not one per file.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 20]);
    }
    BUF.with_borrow_mut(|buf| copy_with_holes(src, dst, buf))
}

/// [`copy_sparse`] from `dst`'s current position (which must be its end, or
/// a hole past it), with the caller's buffer.
fn copy_with_holes(src: &mut impl Read, dst: &mut File, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pending_hole = false;
    loop {
        let n = read_full(src, buf)?;
        if n == 0 {
            break;
        }
        // Runs of data blocks go out in one write each; zero blocks are
        // skipped over.
        let data = &buf[..n];
        let mut run_start = 0;
        let mut at = 0;
        while at < n {
            let end = (at + HOLE_BLOCK).min(n);
            let chunk = &data[at..end];
            // Slice equality is a memcmp: data differs at once, zeros are
            // compared many bytes at a time.
            if chunk == ZERO_BLOCK.as_slice() {
                if run_start < at {
                    dst.write_all(&data[run_start..at])?;
                }
                dst.seek(SeekFrom::Current(HOLE_BLOCK as i64))?;
                pending_hole = true;
                run_start = end;
            } else {
                pending_hole = false;
            }
            at = end;
        }
        if run_start < n {
            dst.write_all(&data[run_start..n])?;
        }
        total += n as u64;
    }
    if pending_hole {
        // A trailing hole: give the file its full length.
        let end = dst.stream_position()?;
        dst.set_len(end)?;
    }
    Ok(total)
}

/// Reads until `buf` is full or the stream ends (so hole detection sees
/// aligned blocks whatever sizes the decompressor hands out).
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes a PAX sparse file: each chunk's data, read in turn from `src`, at
/// its offset (zero blocks in it left as holes too), holes between, and the
/// file's full size.
fn write_sparse(src: &mut impl Read, dst: &mut File, plan: &SparsePlan) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    for &(offset, length) in &plan.chunks {
        dst.seek(SeekFrom::Start(offset))?;
        let n = copy_with_holes(&mut src.take(length), dst, &mut buf)?;
        if n != length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the layer stream ends inside a sparse chunk",
            ));
        }
    }
    dst.set_len(plan.size)
}

/// A PAX `mtime`, `atime` or `ctime` as Go's `parsePAXTime` reads it:
/// decimal seconds (signed), optionally a point and decimal digits, of
/// which the first nine count (the rest are cut off, not rounded); the
/// fraction of a negative time counts towards the past.
fn parse_pax_time(v: &[u8]) -> Option<TarTime> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    // As Go's strconv.ParseInt: an optional sign, then digits.
    let sec: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = &frac.as_bytes()[..frac.len().min(9)];
    let nsec = digits
        .iter()
        .chain(std::iter::repeat_n(&b'0', 9 - digits.len()))
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if secs.starts_with('-') {
        TarTime::unix(sec, -nsec)
    } else {
        TarTime::unix(sec, nsec)
    })
}

/// A numeric header field as Go's reader parses it: base-256 (two's
/// complement, when the top bit of the first byte is set) or octal between
/// spaces and NULs (empty is 0). `None` where Go reports a bad header.
fn parse_numeric(b: &[u8]) -> Option<i64> {
    if b.first().is_some_and(|c| c & 0x80 != 0) {
        let inv = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x = 0u64;
        for (i, &c) in b.iter().enumerate() {
            let c = if i == 0 { (c ^ inv) & 0x7f } else { c ^ inv };
            if x >> 56 > 0 {
                return None;
            }
            x = x << 8 | u64::from(c);
        }
        if x >> 63 > 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    let trim = |c: &u8| *c == b' ' || *c == 0;
    let start = b.iter().position(|c| !trim(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !trim(c)).map_or(start, |e| e + 1);
    let field = &b[start..end];
    if field.is_empty() {
        return Some(0);
    }
    // Go reads up to the first NUL left inside.
    let digits = &field[..field.iter().position(|c| *c == 0).unwrap_or(field.len())];
    if digits.is_empty() || !digits.iter().all(|c| (b'0'..=b'7').contains(c)) {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(8)?.checked_add(u64::from(d - b'0'))
        })
        .map(|x| x as i64)
}

/// The access time a header block itself carries, as Go's reader takes it:
/// a GNU header's atime field unless empty (dropped, with the ctime field,
/// if either does not parse: old Go writers put a name prefix there), or a
/// star header's (which must parse).
fn header_atime(h: &tar::Header) -> Result<Option<TarTime>, String> {
    let b = h.as_bytes();
    let (magic, trailer) = (&b[257..263], &b[508..512]);
    if magic == b"ustar\0" && trailer == b"tar\0" {
        let field = &b[476..488];
        return parse_numeric(field)
            .map(|s| Some(TarTime::from_secs(s)))
            .ok_or_else(|| format!("bad atime {field:?} in its star header"));
    }
    if let Some(gnu) = h.as_gnu() {
        let parse = |f: &[u8]| match f[0] {
            0 => Some(None),
            _ => parse_numeric(f).map(Some),
        };
        return Ok(match (parse(&gnu.atime), parse(&gnu.ctime)) {
            (Some(atime), Some(_)) => atime.map(TarTime::from_secs),
            _ => None,
        });
    }
    Ok(None)
}

/// A decimal number as GNU tar writes them in sparse records: digits only,
/// at most `i64::MAX` (Go's reader parses them as `int64`).
fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        let d = b.checked_sub(b'0').filter(|d| *d < 10)?;
        n.checked_mul(10)?
            .checked_add(u64::from(d))
            .filter(|n| *n <= i64::MAX as u64)
    })
}

/// Why a PAX 1.0 sparse map could not be read.
enum MapError {
    /// It is malformed or too long (the text says how).
    Bad(String),
    /// The stream failed (or ended) under it.
    Io(io::Error),
}

/// Reads the PAX 1.0 sparse map that opens the data of an entry of `stored`
/// bytes: decimal numbers each ended by a newline (the number of chunks,
/// then an offset and a length per chunk), padded to a whole tar block
/// (whatever the padding holds is ignored, as by GNU tar and Go). Reads no
/// further than the block holding the last number. Returns the chunks and
/// the bytes the map took.
fn read_sparse_map(src: &mut impl Read, stored: u64) -> Result<(Vec<(u64, u64)>, u64), MapError> {
    let max_blocks = stored.min(MAX_SPARSE_MAP) / TAR_BLOCK;
    let mut block = [0u8; TAR_BLOCK as usize];
    let mut pos = block.len();
    let mut blocks = 0u64;
    let mut next = |what: &str| -> Result<u64, MapError> {
        let mut n = 0u64;
        let mut digits = 0;
        loop {
            if pos == block.len() {
                if blocks == max_blocks {
                    return Err(MapError::Bad(if stored <= MAX_SPARSE_MAP {
                        format!("its sparse map runs past the entry's {stored} bytes of data")
                    } else {
                        format!("its sparse map is longer than the limit of {MAX_SPARSE_MAP} bytes")
                    }));
                }
                src.read_exact(&mut block).map_err(MapError::Io)?;
                blocks += 1;
                pos = 0;
            }
            let b = block[pos];
            pos += 1;
            match b {
                b'0'..=b'9' => {
                    n = n
                        .checked_mul(10)
                        .and_then(|n| n.checked_add(u64::from(b - b'0')))
                        .filter(|n| *n <= i64::MAX as u64)
                        .ok_or_else(|| {
                            MapError::Bad(format!("its sparse map has a {what} that overflows"))
                        })?;
                    digits += 1;
                }
                b'\n' if digits > 0 => return Ok(n),
                _ => {
                    return Err(MapError::Bad(format!(
                        "its sparse map is malformed: byte {b:#04x} at offset {} in a {what}",
                        (blocks - 1) * TAR_BLOCK + pos as u64 - 1
                    )));
                }
            }
        }
    };
    let count = next("chunk count")?;
    // Each chunk takes at least 4 bytes ("0\n0\n").
    if count > max_blocks * TAR_BLOCK / 4 {
        return Err(MapError::Bad(format!(
            "its sparse map declares {count} chunks, more than a map of at most {} bytes can hold",
            max_blocks * TAR_BLOCK
        )));
    }
    let mut chunks = Vec::with_capacity(count.min(1024) as usize);
    for _ in 0..count {
        let offset = next("chunk offset")?;
        let length = next("chunk length")?;
        chunks.push((offset, length));
    }
    Ok((chunks, blocks * TAR_BLOCK))
}

/// The chunks of a PAX 0.0 or 0.1 sparse map, from the PAX records.
fn sparse_map_v0(r: &SparseRecords) -> Result<Vec<(u64, u64)>, String> {
    let count = r
        .numblocks
        .as_deref()
        .and_then(parse_decimal)
        .ok_or_else(|| {
            format!(
                "is a GNU sparse 0.x file with a missing or bad GNU.sparse.numblocks {:?}",
                String::from_utf8_lossy(r.numblocks.as_deref().unwrap_or_default())
            )
        })?;
    let values: Vec<&[u8]> = match (&r.map, r.pairs.is_empty()) {
        (Some(_), false) => {
            return Err("has both GNU.sparse.map and GNU.sparse.offset/numbytes records".into());
        }
        (Some(map), true) => {
            if map.len() as u64 > MAX_SPARSE_MAP {
                return Err(format!(
                    "its GNU.sparse.map is longer than the limit of {MAX_SPARSE_MAP} bytes"
                ));
            }
            map.split(|b| *b == b',').collect()
        }
        (None, _) => {
            for (i, (is_offset, _)) in r.pairs.iter().enumerate() {
                if *is_offset != (i % 2 == 0) {
                    return Err(
                        "its GNU.sparse.offset and GNU.sparse.numbytes records do not alternate"
                            .into(),
                    );
                }
            }
            r.pairs.iter().map(|(_, v)| v.as_slice()).collect()
        }
    };
    if values.len() as u64 != count.saturating_mul(2) {
        return Err(format!(
            "its sparse map holds {} numbers where GNU.sparse.numblocks={count} needs {}",
            values.len(),
            count.saturating_mul(2)
        ));
    }
    values
        .chunks(2)
        .map(|pair| {
            let num = |v: &[u8]| {
                parse_decimal(v).ok_or_else(|| {
                    format!(
                        "its sparse map has a bad number {:?}",
                        String::from_utf8_lossy(v)
                    )
                })
            };
            Ok((num(pair[0])?, num(pair[1])?))
        })
        .collect()
}

/// Gives directories that a layer created only as parents the metadata of the
/// same directory in the layers below (`parents`, topmost first), as
/// containerd's `mkparent` does; directories found in none keep 0755 root.
pub fn inherit_implicit_dirs(
    dest: &Path,
    implicit: &[PathBuf],
    parents: &[&Path],
) -> io::Result<()> {
    for rel in implicit {
        let path = dest.join(rel);
        for p in parents {
            let candidate = resolve_in_root(p, rel)?;
            match fs::symlink_metadata(&candidate) {
                Ok(m) if m.is_dir() => {
                    use std::os::unix::fs::MetadataExt;
                    rustix::fs::chownat(
                        CWD,
                        &path,
                        Some(rustix::fs::Uid::from_raw(m.uid())),
                        Some(rustix::fs::Gid::from_raw(m.gid())),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )?;
                    set_mode(&path, m.mode() & 0o7777)?;
                    // Both times, to the nanosecond, as containerd's copyDirInfo.
                    let time = |sec: i64, nsec: i64| TarTime {
                        sec,
                        nsec: nsec as u32,
                    };
                    let times = Times {
                        atime: time(m.atime(), m.atime_nsec()),
                        mtime: time(m.mtime(), m.mtime_nsec()),
                    };
                    set_times(&path, times)?;
                    break;
                }
                // Replaced by a non-directory below: keep the defaults.
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Resolves `rel` inside `root` as if `root` were `/`: symlinks are followed
/// but can never leave `root` (containerd's `fs.RootPath`).
pub fn resolve_in_root(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut pending: Vec<PathBuf> = rel
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        match c.as_os_str().as_bytes() {
            b"/" | b"." | b"" => continue,
            b".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = root.join(&resolved).join(&c);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    return Err(io::Error::other(format!(
                        "too many symlinks resolving {}",
                        rel.display()
                    )));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => resolved.push(&c),
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
