//! The sending side of a server stream (`Watch`, `Attach`, `Logs`): a few
//! messages queued at most, and a client that takes none of them for the
//! configured time is cut off with a status that says so and where to
//! resume.
//!
//! Must never: queue more than its capacity for a client, or keep a task
//! (and what it holds) alive for a client that does not read.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// Why a send failed: the stream is over for this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// The client went away.
    Left,
    /// The client took nothing for the whole timeout.
    Slow,
}

/// The stream a handler returns.
pub type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A bounded queue to one client.
#[derive(Debug)]
pub struct Outbox<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    timeout: Duration,
    last_word: Arc<Mutex<Option<Status>>>,
}

/// An outbox of `capacity` messages whose client is cut off after
/// `timeout` without taking any, and the stream to return for it.
pub fn outbox<T: Send + 'static>(capacity: usize, timeout: Duration) -> (Outbox<T>, Out<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let last_word: Arc<Mutex<Option<Status>>> = Arc::default();
    let tail = last_word.clone();
    // What was queued, then the status the handler left (if any).
    let ending =
        tokio_stream::once(()).filter_map(move |()| tail.lock().unwrap_or_else(|p| p.into_inner()).take().map(Err));
    let stream = ReceiverStream::new(rx).chain(ending);
    let outbox = Outbox { tx, timeout, last_word };
    (outbox, Box::pin(stream))
}

impl<T> Outbox<T> {
    /// Queues `item`, waiting while the queue is full, at most the timeout.
    pub async fn send(&self, item: T) -> Result<(), Gone> {
        match self.tx.send_timeout(Ok(item), self.timeout).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Gone::Left),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Gone::Slow),
        }
    }

    /// Ends the stream with `status` after what is queued; the outbox must
    /// then be dropped.
    pub fn end_with(self, status: Status) {
        *self.last_word.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
    }

    /// The status for a client cut off for not reading (and counted).
    pub fn too_slow(&self, resume: &str) -> Status {
        crate::metrics::global()
            .streams
            .cut_off
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Status::resource_exhausted(format!(
            "The client read nothing for {} s and was cut off; {resume}",
            self.timeout.as_secs()
        ))
    }

    /// Whether the client has gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<T> Clone for Outbox<T> {
    fn clone(&self) -> Self {
        Outbox {
            tx: self.tx.clone(),
            timeout: self.timeout,
            last_word: self.last_word.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off_with_a_status_after_what_was_queued() {
        let (out, mut stream) = outbox::<u32>(2, Duration::from_millis(50));
        out.send(1).await.unwrap();
        out.send(2).await.unwrap();
        assert_eq!(out.send(3).await, Err(Gone::Slow));
        let status = out.too_slow("resume from 3");
        out.end_with(status);
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        assert_eq!(stream.next().await.unwrap().unwrap(), 2);
        let e = stream.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("read nothing for 0 s") && e.message().contains("resume from 3"),
            "{e:?}"
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_ends_normally_ends_without_a_status() {
        let (out, mut stream) = outbox::<u32>(2, Duration::from_secs(5));
        out.send(7).await.unwrap();
        drop(out);
        assert_eq!(stream.next().await.unwrap().unwrap(), 7);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_client_that_left_is_noticed() {
        let (out, stream) = outbox::<u32>(2, Duration::from_secs(5));
        drop(stream);
        assert_eq!(out.send(1).await, Err(Gone::Left));
        assert!(out.is_closed());
    }
}
