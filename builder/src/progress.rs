//! Build progress: bars per image and overall on a terminal (indicatif), JSON
//! lines on stderr otherwise, so logs of a Kubernetes Job stay parseable.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

pub enum Mode {
    Bars,
    JsonLines,
    Quiet,
}

impl Mode {
    /// Bars when stderr is a terminal, JSON lines otherwise.
    pub fn detect() -> Mode {
        if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::JsonLines
        }
    }
}

pub struct Progress {
    mode: Mode,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    images: Mutex<BTreeMap<String, ProgressBar>>,
    done: AtomicU64,
    total: AtomicU64,
    last_line: Mutex<Instant>,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        let (multi, overall) = match mode {
            Mode::Bars => {
                let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>12.bold} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar.set_prefix("total");
                (Some(multi), Some(bar))
            }
            _ => (None, None),
        };
        Progress {
            mode,
            multi,
            overall,
            images: Mutex::new(BTreeMap::new()),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            last_line: Mutex::new(Instant::now() - Duration::from_secs(60)),
        }
    }

    /// A JSON line (non-terminal mode only); events are rare, so unthrottled.
    pub fn event(&self, value: serde_json::Value) {
        if let Mode::JsonLines = self.mode {
            let mut line = serde_json::to_vec(&value).expect("serialisable");
            line.push(b'\n');
            let _ = std::io::stderr().lock().write_all(&line);
        }
    }

    /// A human message: above the bars, or as a JSON line.
    pub fn message(&self, text: &str) {
        match (&self.mode, &self.multi) {
            (Mode::Bars, Some(m)) => {
                let _ = m.println(text);
            }
            (Mode::JsonLines, _) => self.event(json!({"event": "message", "message": text})),
            _ => {}
        }
    }

    pub fn add_image(&self, name: &str, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
        if let (Some(m), Some(o)) = (&self.multi, &self.overall) {
            o.set_length(self.total.load(Ordering::Relaxed));
            let bar = m.add(ProgressBar::new(bytes));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(truncate_left(name, 12));
            bar.set_message(name.to_string());
            self.images
                .lock()
                .expect("not poisoned")
                .insert(name.to_string(), bar);
        }
    }

    /// `delta` bytes of a blob arrived (negative when a transfer restarts),
    /// counted for each image in `images` and once overall.
    pub fn bytes(&self, images: &[String], delta: i64) {
        if delta >= 0 {
            self.done.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.done.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
        match self.mode {
            Mode::Bars => {
                let apply = |b: &ProgressBar| {
                    if delta >= 0 {
                        b.inc(delta as u64)
                    } else {
                        b.set_position(b.position().saturating_sub(delta.unsigned_abs()))
                    }
                };
                if let Some(o) = &self.overall {
                    apply(o);
                }
                let bars = self.images.lock().expect("not poisoned");
                for i in images {
                    if let Some(b) = bars.get(i) {
                        apply(b);
                    }
                }
            }
            Mode::JsonLines => {
                let mut last = self.last_line.lock().expect("not poisoned");
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = Instant::now();
                    self.event(json!({
                        "event": "progress",
                        "bytesPulled": self.done.load(Ordering::Relaxed),
                        "bytesTotal": self.total.load(Ordering::Relaxed),
                    }));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// Marks an image's bar finished with a short status.
    pub fn image_status(&self, name: &str, status: &str) {
        if let Some(b) = self.images.lock().expect("not poisoned").get(name) {
            b.set_message(format!("{name}: {status}"));
        }
    }

    pub fn finish(&self) {
        if let Some(o) = &self.overall {
            o.finish();
        }
        for b in self.images.lock().expect("not poisoned").values() {
            b.finish();
        }
    }
}

fn truncate_left(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= n {
        s.to_string()
    } else {
        let tail: String = chars[chars.len() - (n - 1)..].iter().collect();
        format!("…{tail}")
    }
}
