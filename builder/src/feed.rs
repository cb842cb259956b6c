//! A layer blob read by its extraction while it is still being pulled.
//!
//! The download writes the blob to its partial file and says, every few
//! MiB, how many bytes are in it; a [`FeedReader`] reads that file up to
//! there and waits for more, so decompression and extraction run alongside
//! the transfer instead of after it. The blob's digest is still checked
//! when the download ends, and the layer is only kept if both the digest
//! and the diff ID (computed over what the extraction read) match: bytes
//! read before a restart cannot slip through, since the diff ID covers
//! exactly the stream the extraction saw.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// The partial file exists and is open for writing.
    started: bool,
    /// Bytes in the file that a reader may read.
    written: u64,
    /// The download's end: `Ok` once verified and renamed into place.
    done: Option<Result<(), String>>,
}

#[derive(Default)]
pub struct BlobFeed {
    state: Mutex<State>,
    changed: Condvar,
    started: tokio::sync::Notify,
}

impl BlobFeed {
    pub fn new() -> Arc<BlobFeed> {
        Arc::default()
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("not poisoned"));
        self.changed.notify_all();
        self.started.notify_waiters();
    }

    /// The partial file is there (download side).
    pub fn start(&self) {
        self.update(|s| s.started = true);
    }

    /// `written` bytes are in the partial file; 0 when a transfer restarts
    /// from the beginning (download side).
    pub fn advance(&self, written: u64) {
        self.update(|s| s.written = written);
    }

    /// The download ended (download side). The first verdict stands.
    pub fn finish(&self, result: Result<(), String>) {
        self.update(|s| {
            s.done.get_or_insert(result);
        });
    }

    /// Waits until the download has its file (or has ended without one).
    pub async fn started(&self) {
        loop {
            let notified = self.started.notified();
            {
                let s = self.state.lock().expect("not poisoned");
                if s.started || s.done.is_some() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// A reader of the blob: from `partial` while it is being written, or
    /// from `dest` once the download renamed it there.
    pub fn reader(self: &Arc<BlobFeed>, partial: &Path, dest: &Path) -> io::Result<FeedReader> {
        let mut s = self.state.lock().expect("not poisoned");
        loop {
            match &s.done {
                Some(Ok(())) => {
                    return Ok(FeedReader {
                        feed: self.clone(),
                        file: File::open(dest)?,
                        path: dest.to_path_buf(),
                        pos: 0,
                    });
                }
                Some(Err(e)) => return Err(io::Error::other(e.clone())),
                None if s.started => match File::open(partial) {
                    Ok(file) => {
                        return Ok(FeedReader {
                            feed: self.clone(),
                            file,
                            path: partial.to_path_buf(),
                            pos: 0,
                        });
                    }
                    // Renamed to `dest` a moment ago: its verdict follows.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                },
                None => {}
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(200))
                .expect("not poisoned")
                .0;
        }
    }
}

/// Ends the feed with an error when the download is dropped unfinished (a
/// build failing elsewhere), so no reader waits forever.
pub struct FeedGuard(pub Arc<BlobFeed>);

impl Drop for FeedGuard {
    fn drop(&mut self) {
        self.0
            .finish(Err("the blob's download was abandoned".to_owned()));
    }
}

pub struct FeedReader {
    feed: Arc<BlobFeed>,
    file: File,
    path: PathBuf,
    pos: u64,
}

impl Read for FeedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let (available, done) = {
                let mut s = self.feed.state.lock().expect("not poisoned");
                while s.written <= self.pos && s.done.is_none() {
                    s = self
                        .feed
                        .changed
                        .wait_timeout(s, Duration::from_millis(200))
                        .expect("not poisoned")
                        .0;
                }
                (s.written, s.done.clone())
            };
            if let Some(Err(e)) = done {
                return Err(io::Error::other(e));
            }
            // Once verified, the whole file is there whatever was published.
            let end = if done.is_some() { u64::MAX } else { available };
            if self.pos < end {
                let want = buf
                    .len()
                    .min((end - self.pos).min(usize::MAX as u64) as usize);
                let n = self.file.read_at(&mut buf[..want], self.pos).map_err(|e| {
                    io::Error::new(e.kind(), format!("reading {}: {e}", self.path.display()))
                })?;
                if n > 0 {
                    self.pos += n as u64;
                    return Ok(n);
                }
                if done.is_some() {
                    return Ok(0);
                }
                // Cut back by a restart from zero: wait for the bytes again.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if done.is_some() {
                return Ok(0);
            }
        }
    }
}
