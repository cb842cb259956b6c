//! Large files' data written into an ext4 image in big direct writes, not
//! by `mke2fs -d`.
//!
//! `mke2fs -d` (e2fsprogs 1.47.0) writes file data one 4 KiB block per
//! `pwrite` through the page cache: for a multi-GiB image that is millions
//! of system calls and most of the build's time. So for the files that hold
//! nearly all the bytes (regular, at least [`BULK_MIN`], one link):
//!
//! 1. Setting aside ([`swap_out`]): each is moved aside (hardlinked into
//!    a directory beside the staging tree, `.<root>.coral-bulk/`) and
//!    replaced in the tree by an empty stand-in of the same size, owner,
//!    mode, xattrs and times, so `mke2fs -d` makes its inode and allocates
//!    no data. The parent directories' times are put back. A journal
//!    written first lets [`restore`] undo this after a kill.
//! 2. Allocating ([`allocate`]): libext2fs (`ext2fs_fallocate`, initialised
//!    extents) allocates each file's data runs, one file after another in
//!    an order that depends on the names only, so the layout is the same on
//!    every build, and reports where the blocks are.
//! 3. Copying ([`copy`]): the data goes from the moved-aside files straight
//!    to those blocks of the image, in 4 MiB `O_DIRECT` writes, a few files
//!    at once.
//! 4. Putting back ([`restore`]): the files go back into the tree, which is
//!    as it was.
//!
//! The image holds the same files, bytes and metadata as `mke2fs -d` would
//! write; only where data blocks lie differs (and all-zero blocks inside a
//! data run are allocated, where `mke2fs -d` leaves holes). The image stays
//! deterministic: the same tree gives the same bytes. The files can only
//! be moved aside when the staging root's parent is on the same filesystem
//! (a build's work directory always is); a staging root that is a mount
//! point of its own gets all its data written by `mke2fs -d`, which places
//! blocks differently.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rustix::fs::{AtFlags, CWD, Timespec, Timestamps};

use crate::fsimage::{BLOCK, FsImageError, io_err};

/// Files at least this large take the direct path; smaller ones are few
/// bytes and many files, which `mke2fs -d` handles well.
pub const BULK_MIN: u64 = 256 * 1024;
/// One direct write.
const CHUNK: usize = 4 << 20;
/// Files copied at once.
const COPY_JOBS: usize = 4;

#[allow(non_camel_case_types)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_long, c_uint, c_void};

    pub type errcode_t = c_long;
    pub type ext2_filsys = *mut c_void;
    pub type io_manager = *mut c_void;
    pub type ext2_extent_handle_t = *mut c_void;

    pub const EXT2_FLAG_RW: c_int = 0x01;
    pub const EXT2_FLAG_64BITS: c_int = 0x20000;
    pub const EXT2_FALLOCATE_FORCE_INIT: c_int = 0x2;
    pub const EXT2_EXTENT_ROOT: c_int = 0x0001;
    pub const EXT2_EXTENT_NEXT: c_int = 0x0009;
    pub const EXT2_EXTENT_FLAGS_LEAF: u32 = 0x0001;
    pub const EXT2_EXTENT_FLAGS_UNINIT: u32 = 0x0002;
    pub const EXT2_EXTENT_FLAGS_SECOND_VISIT: u32 = 0x0004;
    pub const EXT2_ET_EXTENT_NO_NEXT: errcode_t = 2133571452;
    pub const EXT2_ROOT_INO: u32 = 2;

    #[repr(C)]
    #[derive(Default)]
    pub struct ext2fs_extent {
        pub e_pblk: u64,
        pub e_lblk: u64,
        pub e_len: u32,
        pub e_flags: u32,
    }

    unsafe extern "C" {
        pub static unix_io_manager: io_manager;
        pub fn initialize_ext2_error_table();
        pub fn error_message(code: errcode_t) -> *const c_char;
        pub fn ext2fs_open(
            name: *const c_char,
            flags: c_int,
            superblock: c_int,
            block_size: c_uint,
            manager: io_manager,
            ret_fs: *mut ext2_filsys,
        ) -> errcode_t;
        pub fn ext2fs_read_bitmaps(fs: ext2_filsys) -> errcode_t;
        pub fn ext2fs_namei(
            fs: ext2_filsys,
            root: u32,
            cwd: u32,
            name: *const c_char,
            inode: *mut u32,
        ) -> errcode_t;
        pub fn ext2fs_fallocate(
            fs: ext2_filsys,
            flags: c_int,
            ino: u32,
            inode: *mut c_void,
            goal: u64,
            start: u64,
            len: u64,
        ) -> errcode_t;
        pub fn ext2fs_extent_open(
            fs: ext2_filsys,
            ino: u32,
            handle: *mut ext2_extent_handle_t,
        ) -> errcode_t;
        pub fn ext2fs_extent_get(
            handle: ext2_extent_handle_t,
            flags: c_int,
            extent: *mut ext2fs_extent,
        ) -> errcode_t;
        pub fn ext2fs_extent_free(handle: ext2_extent_handle_t);
        pub fn ext2fs_close_free(fs: *mut ext2_filsys) -> errcode_t;
    }
}

/// What libext2fs says a code means.
fn message(code: ffi::errcode_t) -> String {
    static TABLE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers libext2fs's static message table once.
    TABLE.call_once(|| unsafe { ffi::initialize_ext2_error_table() });
    // SAFETY: error_message returns a NUL-terminated string it owns (a
    // static one, or a thread-local buffer for unknown codes).
    let text = unsafe { CStr::from_ptr(ffi::error_message(code)) };
    text.to_string_lossy().into_owned()
}

fn lib_err(what: String, code: ffi::errcode_t) -> FsImageError {
    FsImageError::Tool {
        tool: "libext2fs",
        what,
        status: format!("error {code}"),
        output: message(code),
    }
}

/// A file of the staging tree that [`swap_out`] set aside.
#[derive(Debug)]
pub struct Moved {
    /// Its path in the image, `/`-rooted.
    pub rel: Vec<u8>,
    /// The original, moved aside.
    held: PathBuf,
    size: u64,
    /// Runs of data: (first block, blocks), sorted, disjoint.
    runs: Vec<(u64, u64)>,
}

/// The files set aside, until [`restore`].
#[derive(Debug, Default)]
pub struct Swapped {
    pub files: Vec<Moved>,
}

impl Swapped {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Where the moved-aside files and the journal live: beside the staging
/// root, on the same filesystem, never inside the tree.
fn bulk_dir(staging: &Path) -> Option<PathBuf> {
    let name = staging.file_name()?;
    let parent = staging.parent().filter(|p| !p.as_os_str().is_empty())?;
    let mut dir = std::ffi::OsString::from(".");
    dir.push(name);
    dir.push(".coral-bulk");
    Some(parent.join(dir))
}

fn staged_path(staging: &Path, rel: &[u8]) -> PathBuf {
    staging.join(std::ffi::OsStr::from_bytes(
        rel.strip_prefix(b"/").unwrap_or(rel),
    ))
}

/// A journal line: the moved file's number, its path, and its directory's
/// times before anything was moved.
struct Entry {
    n: usize,
    rel: Vec<u8>,
    dir_times: [(i64, i64); 2],
}

impl Entry {
    fn line(&self) -> String {
        let [(a, an), (m, mn)] = self.dir_times;
        format!("{} {} {a} {an} {m} {mn}\n", self.n, hex::encode(&self.rel))
    }

    fn parse(line: &str) -> Option<Entry> {
        let mut f = line.split(' ');
        let n = f.next()?.parse().ok()?;
        let rel = hex::decode(f.next()?).ok()?;
        let mut t = [0i64; 4];
        for v in &mut t {
            *v = f.next()?.parse().ok()?;
        }
        Some(Entry {
            n,
            rel,
            dir_times: [(t[0], t[1]), (t[2], t[3])],
        })
    }
}

fn set_dir_times(dir: &Path, [(a, an), (m, mn)]: [(i64, i64); 2]) -> io::Result<()> {
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: a,
            tv_nsec: an as _,
        },
        last_modification: Timespec {
            tv_sec: m,
            tv_nsec: mn as _,
        },
    };
    rustix::fs::utimensat(CWD, dir, &ts, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

/// Puts back what [`swap_out`] moved aside (also what a killed build left):
/// the tree is as it was before. Idempotent; nothing to do when nothing
/// was moved.
pub fn restore(staging: &Path) -> Result<(), FsImageError> {
    let Some(dir) = bulk_dir(staging) else {
        return Ok(());
    };
    if fs::symlink_metadata(&dir).is_err() {
        return Ok(());
    }
    let journal = dir.join("journal");
    match File::open(&journal) {
        Ok(f) => {
            let mut dirs = BTreeMap::new();
            for line in BufReader::new(f).lines() {
                let line = line.map_err(io_err("reading", &journal))?;
                // A line cut short by a kill: nothing of it was moved yet
                // (the journal is synced before the first move).
                let Some(e) = Entry::parse(&line) else {
                    continue;
                };
                let path = staged_path(staging, &e.rel);
                let held = dir.join(e.n.to_string());
                if fs::symlink_metadata(&held).is_ok() {
                    // Replaces the stand-in; a no-op when `path` is still
                    // the original (both names of one inode). A directory
                    // removed since has nothing to put back into.
                    match fs::rename(&held, &path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(io_err("putting back", &path)(e));
                        }
                        _ => {}
                    }
                }
                if let Some(parent) = path.parent() {
                    dirs.insert(parent.to_path_buf(), e.dir_times);
                }
            }
            for (d, times) in dirs {
                match set_dir_times(&d, times) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err("setting the times of", &d)(e));
                    }
                    _ => {}
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", &journal)(e)),
    }
    fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))?;
    Ok(())
}

/// The runs of data of `file` (SEEK_DATA/SEEK_HOLE), in blocks.
pub(crate) fn data_runs(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let whole = vec![(0, size.div_ceil(BLOCK))];
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => return Ok(whole),
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(data))?.min(size);
        let (first, end) = (data / BLOCK, hole.div_ceil(BLOCK));
        match runs.last_mut() {
            Some((s, n)) if *s + *n >= first => *n = (*n).max(end - *s),
            _ => runs.push((first, end - first)),
        }
        pos = hole;
    }
    Ok(runs)
}

/// Moves `candidates` (image paths of regular files with one link, at
/// least [`BULK_MIN`] bytes, in an order that depends on names only) aside and puts
/// empty stand-ins in their place. `None` when the staging root has no
/// sibling directory on its own filesystem to move them to.
pub fn swap_out(staging: &Path, candidates: &[Vec<u8>]) -> Result<Option<Swapped>, FsImageError> {
    restore(staging)?;
    if candidates.is_empty() {
        return Ok(Some(Swapped::default()));
    }
    let Some(dir) = bulk_dir(staging) else {
        return Ok(None);
    };
    let root_dev = fs::metadata(staging)
        .map_err(io_err("reading", staging))?
        .dev();
    match staging.parent().map(fs::metadata) {
        Some(Ok(m)) if m.dev() == root_dev => {}
        _ => {
            tracing::warn!(
                staging = %staging.display(),
                "the staging root is a mount point: mke2fs -d writes all file data itself \
                 (slower, and other block placement than a staging root inside a directory)"
            );
            return Ok(None);
        }
    }
    fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
    let mut dir_times: BTreeMap<PathBuf, [(i64, i64); 2]> = BTreeMap::new();
    let mut entries = Vec::with_capacity(candidates.len());
    for (n, rel) in candidates.iter().enumerate() {
        let path = staged_path(staging, rel);
        let parent = path.parent().unwrap_or(staging).to_path_buf();
        let times = match dir_times.get(&parent) {
            Some(t) => *t,
            None => {
                let m = fs::symlink_metadata(&parent).map_err(io_err("reading", &parent))?;
                let t = [(m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec())];
                dir_times.insert(parent, t);
                t
            }
        };
        entries.push(Entry {
            n,
            rel: rel.clone(),
            dir_times: times,
        });
    }
    let journal = dir.join("journal");
    {
        let mut f = File::create(&journal).map_err(io_err("creating", &journal))?;
        for e in &entries {
            f.write_all(e.line().as_bytes())
                .map_err(io_err("writing", &journal))?;
        }
        f.sync_all().map_err(io_err("writing", &journal))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &dir))?;
    }
    let mut swapped = Swapped::default();
    let result = (|| {
        for e in &entries {
            swapped.files.push(swap_one(staging, &dir, e)?);
        }
        for (d, times) in &dir_times {
            set_dir_times(d, *times).map_err(io_err("setting the times of", d))?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Some(swapped)),
        Err(e) => {
            if let Err(r) = restore(staging) {
                tracing::error!("putting the staging tree back: {r}");
            }
            Err(e)
        }
    }
}

fn swap_one(staging: &Path, dir: &Path, e: &Entry) -> Result<Moved, FsImageError> {
    let path = staged_path(staging, &e.rel);
    let held = dir.join(e.n.to_string());
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    let meta = file.metadata().map_err(io_err("reading", &path))?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(FsImageError::Invalid(format!(
            "{} changed while the image was being written",
            path.display()
        )));
    }
    let runs = data_runs(&file, meta.len()).map_err(io_err("reading", &path))?;
    fs::hard_link(&path, &held).map_err(io_err("linking", &held))?;
    let stand_in = dir.join(format!("{}.new", e.n));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&stand_in)
        .map_err(io_err("creating", &stand_in))?;
    f.set_len(meta.len()).map_err(io_err("sizing", &stand_in))?;
    coral_seed::copytree::finish_fd(&path, &stand_in, &meta, &f)
        .map_err(io_err("copying the metadata of", &path))?;
    drop(f);
    fs::rename(&stand_in, &path).map_err(io_err("replacing", &path))?;
    Ok(Moved {
        rel: e.rel.clone(),
        held,
        size: meta.len(),
        runs,
    })
}

/// Where a file's data goes in the image: (first file block, first image
/// block, blocks).
pub type Extents = Vec<(u64, u64, u64)>;

/// An open libext2fs filesystem, closed (and its metadata written) once.
struct Fs(ffi::ext2_filsys);

impl Fs {
    fn open(image: &Path) -> Result<Fs, FsImageError> {
        let name = CString::new(image.as_os_str().as_bytes())
            .map_err(|_| FsImageError::Invalid(format!("{} holds a NUL", image.display())))?;
        let mut fs: ffi::ext2_filsys = std::ptr::null_mut();
        // SAFETY: `name` outlives the call; unix_io_manager is libext2fs's
        // own static; `fs` receives an owned handle on success.
        let code = unsafe {
            ffi::ext2fs_open(
                name.as_ptr(),
                ffi::EXT2_FLAG_RW | ffi::EXT2_FLAG_64BITS,
                0,
                0,
                ffi::unix_io_manager,
                &mut fs,
            )
        };
        if code != 0 {
            return Err(lib_err(format!("opening {}", image.display()), code));
        }
        let fs = Fs(fs);
        // SAFETY: an open filesystem.
        let code = unsafe { ffi::ext2fs_read_bitmaps(fs.0) };
        if code != 0 {
            return Err(lib_err(
                format!("reading the bitmaps of {}", image.display()),
                code,
            ));
        }
        Ok(fs)
    }

    /// Writes the superblock, group descriptors and bitmaps, and frees.
    fn close(mut self) -> Result<(), ffi::errcode_t> {
        // SAFETY: frees the handle and nulls it, so Drop does nothing.
        let code = unsafe { ffi::ext2fs_close_free(&mut self.0) };
        if code != 0 { Err(code) } else { Ok(()) }
    }

    fn allocate(&self, file: &Moved) -> Result<Extents, FsImageError> {
        let what =
            |step: &str| format!("{step} {} in the image", String::from_utf8_lossy(&file.rel));
        let name = CString::new(file.rel.clone())
            .map_err(|_| FsImageError::Invalid(what("a NUL in the name of")))?;
        let mut ino = 0u32;
        // SAFETY: an open filesystem; `name` outlives the call.
        let code = unsafe {
            ffi::ext2fs_namei(
                self.0,
                ffi::EXT2_ROOT_INO,
                ffi::EXT2_ROOT_INO,
                name.as_ptr(),
                &mut ino,
            )
        };
        if code != 0 {
            return Err(lib_err(what("finding"), code));
        }
        for &(start, len) in &file.runs {
            // SAFETY: a null inode pointer makes libext2fs read and write
            // the inode itself; goal ~0 lets it choose near the inode.
            let code = unsafe {
                ffi::ext2fs_fallocate(
                    self.0,
                    ffi::EXT2_FALLOCATE_FORCE_INIT,
                    ino,
                    std::ptr::null_mut(),
                    !0,
                    start,
                    len,
                )
            };
            if code != 0 {
                return Err(lib_err(what("allocating the data of"), code));
            }
        }
        let mut handle: ffi::ext2_extent_handle_t = std::ptr::null_mut();
        // SAFETY: an open filesystem and an extent-mapped inode.
        let code = unsafe { ffi::ext2fs_extent_open(self.0, ino, &mut handle) };
        if code != 0 {
            return Err(lib_err(what("reading the extents of"), code));
        }
        let mut extents = Vec::new();
        let mut e = ffi::ext2fs_extent::default();
        let mut op = ffi::EXT2_EXTENT_ROOT;
        let result = loop {
            // SAFETY: `handle` is open until freed below.
            let code = unsafe { ffi::ext2fs_extent_get(handle, op, &mut e) };
            op = ffi::EXT2_EXTENT_NEXT;
            if code == ffi::EXT2_ET_EXTENT_NO_NEXT {
                break Ok(extents);
            }
            if code != 0 {
                break Err(lib_err(what("reading the extents of"), code));
            }
            if e.e_flags & ffi::EXT2_EXTENT_FLAGS_LEAF == 0
                || e.e_flags & ffi::EXT2_EXTENT_FLAGS_SECOND_VISIT != 0
            {
                continue;
            }
            if e.e_flags & ffi::EXT2_EXTENT_FLAGS_UNINIT != 0 {
                break Err(FsImageError::Invalid(what(
                    "libext2fs left an uninitialised extent in",
                )));
            }
            extents.push((e.e_lblk, e.e_pblk, u64::from(e.e_len)));
        };
        // SAFETY: opened above, freed once.
        unsafe { ffi::ext2fs_extent_free(handle) };
        let extents = result?;
        let mapped: u64 = extents.iter().map(|x| x.2).sum();
        let wanted: u64 = file.runs.iter().map(|r| r.1).sum();
        if mapped != wanted {
            return Err(FsImageError::Invalid(format!(
                "{}: {mapped} blocks mapped, {wanted} allocated",
                what("allocating the data of")
            )));
        }
        Ok(extents)
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: still open (close nulls it): freed without a flush
            // only on an error path, whose image is discarded.
            unsafe { ffi::ext2fs_close_free(&mut self.0) };
        }
    }
}

/// Allocates the data of every moved file in `image` (which `mke2fs -d`
/// wrote from the tree with stand-ins), in order, and says where it lies.
pub fn allocate(image: &Path, swapped: &Swapped) -> Result<Vec<Extents>, FsImageError> {
    let started = Instant::now();
    let fs = Fs::open(image)?;
    let mut all = Vec::with_capacity(swapped.files.len());
    for f in &swapped.files {
        all.push(fs.allocate(f)?);
    }
    fs.close()
        .map_err(|code| lib_err(format!("writing the metadata of {}", image.display()), code))?;
    tracing::info!(
        files = all.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "allocated the data of large files"
    );
    Ok(all)
}

/// A 4 KiB-aligned buffer, as `O_DIRECT` needs.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, BLOCK as usize).expect("layout");
        // SAFETY: a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: owned, initialised (zeroed) memory of `layout.size()`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Writes each moved file's data to its blocks in `image`.
pub fn copy(image: &Path, swapped: &Swapped, extents: &[Extents]) -> Result<u64, FsImageError> {
    let started = Instant::now();
    let open = |direct: bool| {
        OpenOptions::new()
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(image)
    };
    let out = match open(true) {
        Ok(f) => f,
        // A filesystem without O_DIRECT: through the page cache.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            open(false).map_err(io_err("opening", image))?
        }
        Err(e) => return Err(io_err("opening", image)(e)),
    };
    let next = AtomicUsize::new(0);
    let jobs = COPY_JOBS.min(swapped.files.len()).max(1);
    let results: Vec<Result<u64, FsImageError>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| {
                    let mut buf = Aligned::new(CHUNK);
                    let mut bytes = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = swapped.files.get(i) else {
                            return Ok(bytes);
                        };
                        bytes += copy_one(file, &extents[i], &out, image, &mut buf)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a copy thread panicked"))
            .collect()
    });
    let mut bytes = 0;
    for r in results {
        bytes += r?;
    }
    out.sync_data().map_err(io_err("syncing", image))?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        files = swapped.files.len(),
        bytes,
        elapsed_ms = (secs * 1000.0) as u64,
        mib_per_s = (bytes as f64 / 1048576.0 / secs.max(1e-3)) as u64,
        "wrote the data of large files"
    );
    Ok(bytes)
}

fn copy_one(
    file: &Moved,
    extents: &Extents,
    out: &File,
    image: &Path,
    buf: &mut Aligned,
) -> Result<u64, FsImageError> {
    let src = File::open(&file.held).map_err(io_err("opening", &file.held))?;
    let buf = buf.as_mut();
    let mut written = 0;
    for &(lblk, pblk, len) in extents {
        let start = lblk * BLOCK;
        let end = ((lblk + len) * BLOCK).min(file.size);
        let mut pos = start;
        while pos < end {
            let want = ((end - pos) as usize).min(CHUNK);
            let mut got = 0;
            while got < want {
                let n = src
                    .read_at(&mut buf[got..want], pos + got as u64)
                    .map_err(io_err("reading", &file.held))?;
                if n == 0 {
                    return Err(FsImageError::Invalid(format!(
                        "{} became shorter while the image was being written",
                        file.held.display()
                    )));
                }
                got += n;
            }
            // Whole blocks: the tail of the last one is zeros.
            let whole = want.next_multiple_of(BLOCK as usize);
            buf[want..whole].fill(0);
            out.write_all_at(&buf[..whole], pblk * BLOCK + (pos - start))
                .map_err(io_err("writing", image))?;
            pos += want as u64;
            written += want as u64;
        }
    }
    Ok(written)
}
