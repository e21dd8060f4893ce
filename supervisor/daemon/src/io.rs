//! A worker's standard streams on the daemon's side.
//!
//! Owns: each output stream's log file in the state dir (a bounded prefix
//! of the stream) with a live feed for attached clients, the pump that
//! copies a worker's pipe there, and the worker's stdin.
//!
//! Must never: block a worker on a slow or vanished client (output goes to
//! the log and a lossy broadcast; a reader that falls behind replays from
//! the log).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

/// Chunks (of at most [`READ`] bytes) the live feed keeps for attached
/// clients that are behind: the most it holds per stream.
const LIVE_CHUNKS: usize = 64;
/// One read from a worker's pipe.
const READ: usize = 64 << 10;

/// One output stream's log and live feed.
#[derive(Debug)]
pub struct OutputLog {
    pub path: PathBuf,
    /// Bytes produced so far (the offset of the next byte).
    produced: AtomicU64,
    /// Bytes kept in the log file (a prefix of the stream).
    kept: AtomicU64,
    live: broadcast::Sender<Chunk>,
    /// The stream ended (its readers wake on the change, no polling).
    done: watch::Sender<bool>,
}

/// A piece of output at its offset in the stream.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub offset: u64,
    pub data: Arc<Vec<u8>>,
}

impl OutputLog {
    pub fn new(path: PathBuf) -> Self {
        OutputLog {
            path,
            produced: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            live: broadcast::channel(LIVE_CHUNKS).0,
            done: watch::channel(false).0,
        }
    }

    /// The log of a stream that ended before this daemon started: what the
    /// file holds is all there is.
    pub fn finished(path: PathBuf) -> Self {
        let log = OutputLog::new(path);
        let len = std::fs::metadata(&log.path).map_or(0, |m| m.len());
        log.kept.store(len, Ordering::SeqCst);
        log.produced.store(len, Ordering::SeqCst);
        log.done.send_replace(true);
        log
    }

    pub fn produced(&self) -> u64 {
        self.produced.load(Ordering::SeqCst)
    }

    pub fn kept(&self) -> u64 {
        self.kept.load(Ordering::SeqCst)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Chunk> {
        self.live.subscribe()
    }

    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Watches for the end of the stream.
    pub fn watch_done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Reads kept bytes from `from` up to `to`.
    pub async fn read_kept(&self, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        let to = to.min(self.kept());
        if from >= to {
            return Ok(Vec::new());
        }
        let len = usize::try_from(to - from).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mut f = tokio::fs::File::open(&self.path).await?;
        tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(from)).await?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).await?;
        Ok(buf)
    }

    /// Copies a worker's output stream to this log (up to `cap` bytes) and
    /// the live feed (and to `tap`, the Claude Code session driver, when
    /// there is one), until the stream ends. With `project`, the log file
    /// is in that project (the user's: it counts toward the user's disk
    /// limit, and past the limit the output is streamed but not kept).
    pub async fn pump(
        &self,
        mut from: impl tokio::io::AsyncRead + Unpin,
        cap: u64,
        project: Option<u32>,
        tap: Option<tokio::sync::mpsc::Sender<Arc<Vec<u8>>>>,
    ) {
        // Only root reads a worker's output from disk (0600); its user
        // reads it through the API.
        let mut file = match tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .await
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot open an output log; output is only streamed live");
                None
            }
        };
        if let (Some(f), Some(project)) = (&file, project) {
            use std::os::fd::AsFd;
            if let Err(e) = crate::sys::set_project(f.as_fd(), project, false) {
                tracing::error!(path = %self.path.display(), error = %e, "cannot charge an output log to its user's disk limit; it is kept up to log_max_bytes only");
            }
        }
        let mut buf = vec![0u8; READ];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = &buf[..n];
            let offset = self.produced();
            let kept = self.kept();
            if let Some(f) = file.as_mut() {
                if kept == offset && kept < cap {
                    let room = usize::try_from(cap - kept).unwrap_or(usize::MAX).min(n);
                    if f.write_all(&data[..room]).await.is_ok() {
                        self.kept.fetch_add(room as u64, Ordering::SeqCst);
                    }
                }
            }
            self.produced.fetch_add(n as u64, Ordering::SeqCst);
            let data = Arc::new(data.to_vec());
            // The session driver reads at its pace: while it is behind, the
            // pipe is not read and the worker's writes block.
            if let Some(t) = &tap {
                let _ = t.send(data.clone()).await;
            }
            // A lagging receiver loses live chunks, never the worker: it replays from the log.
            let _ = self.live.send(Chunk { offset, data });
        }
        if let Some(mut f) = file {
            let _ = f.flush().await;
        }
        self.done.send_replace(true);
    }
}

/// A worker's stdin, shared by attached clients and the Claude Code
/// session driver; closed once, for all of them.
#[derive(Debug, Default)]
pub struct Stdin(tokio::sync::Mutex<Option<tokio::net::unix::pipe::Sender>>);

impl Stdin {
    pub fn new(pipe: Option<tokio::net::unix::pipe::Sender>) -> Self {
        Stdin(tokio::sync::Mutex::new(pipe))
    }

    pub async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        match self.0.lock().await.as_mut() {
            Some(s) => s.write_all(data).await,
            None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin is closed")),
        }
    }

    pub async fn close(&self) {
        self.0.lock().await.take();
    }
}
