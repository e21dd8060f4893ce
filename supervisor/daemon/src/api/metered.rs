//! Request bytes a calling uid may have the daemon hold at once.
//!
//! Owns: the pool of bytes per calling uid that the partial gRPC messages
//! of its requests draw from. A request body passes through [`Metered`],
//! which reads the gRPC framing (a flag byte and a four-byte length before
//! each message): before the bytes of a message go on to be assembled, the
//! message's whole length is taken from the uid's pool, and it goes back
//! when the consumer (tonic's decoder, then the handler) asks for what
//! follows the message: a streaming handler that has not taken a message
//! yet, or is still busy with it, keeps it charged. While the pool is empty the
//! request waits and HTTP/2 flow control holds its sender; one that waits
//! longer than the client timeout ends with RESOURCE_EXHAUSTED.
//!
//! Must never: let the partial messages of one uid's connections and
//! streams (each up to `max_message_bytes`) add up to more than its pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Bytes of partial request messages one uid may have the daemon hold, at
/// least (at least one message of the largest size fits too).
pub const POOL_BYTES: usize = 64 << 20;

/// The pool of a uid with messages of at most `max_message` bytes.
pub fn pool(max_message: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(POOL_BYTES.max(max_message).min(Semaphore::MAX_PERMITS)))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Where the reader is in the gRPC framing.
#[derive(Debug, Clone, Copy)]
enum State {
    /// In a message's five-byte prefix, with `n` of them read.
    Prefix { got: [u8; 5], n: usize },
    /// The prefix said `len` bytes follow; they need the pool first.
    Charge { len: usize },
    /// `left` bytes of the message still to pass on.
    Message { left: usize },
}

/// A request body that charges the partial messages it passes on to a
/// pool.
pub struct Metered<B> {
    inner: B,
    pool: Arc<Semaphore>,
    uid: u32,
    max_message: usize,
    timeout: Duration,
    state: State,
    /// Bytes read from `inner` and not passed on yet, of which the first
    /// `parsed` have been walked through the framing.
    pending: Bytes,
    parsed: usize,
    /// The current message's charge.
    held: Option<OwnedSemaphorePermit>,
    /// Waiting for the pool, and for how long at most.
    waiting: Option<(Acquire, Pin<Box<tokio::time::Sleep>>)>,
}

impl<B> std::fmt::Debug for Metered<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("uid", &self.uid)
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .field("held", &self.held.as_ref().map(OwnedSemaphorePermit::num_permits))
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Metered<B> {
    pub fn new(inner: B, pool: Arc<Semaphore>, uid: u32, max_message: usize, timeout: Duration) -> Self {
        Metered {
            inner,
            pool,
            uid,
            max_message,
            timeout,
            state: State::Prefix { got: [0; 5], n: 0 },
            pending: Bytes::new(),
            parsed: 0,
            held: None,
            waiting: None,
        }
    }
}

/// What to do with the pending bytes.
enum Step {
    /// Pass these on.
    Pass(Bytes),
    /// Wait for the pool (the waker is registered).
    Wait,
    Fail(tonic::Status),
}

impl<B> Metered<B> {
    /// Takes a message's charge from the pool, or says to wait.
    fn charge(&mut self, len: usize, cx: &mut Context<'_>) -> Poll<Result<OwnedSemaphorePermit, tonic::Status>> {
        // Longer messages are refused by the decoder at their prefix.
        let bytes = u32::try_from(len.min(self.max_message)).unwrap_or(u32::MAX);
        if self.waiting.is_none() {
            match self.pool.clone().try_acquire_many_owned(bytes) {
                Ok(permit) => return Poll::Ready(Ok(permit)),
                Err(TryAcquireError::NoPermits) => {
                    self.waiting = Some((
                        Box::pin(self.pool.clone().acquire_many_owned(bytes)),
                        Box::pin(tokio::time::sleep(self.timeout)),
                    ));
                }
                Err(TryAcquireError::Closed) => {
                    return Poll::Ready(Err(tonic::Status::unavailable("wardend is stopping")))
                }
            }
        }
        let Some((acquire, deadline)) = self.waiting.as_mut() else {
            return Poll::Pending;
        };
        if let Poll::Ready(got) = acquire.as_mut().poll(cx) {
            self.waiting = None;
            return Poll::Ready(got.map_err(|_| tonic::Status::unavailable("wardend is stopping")));
        }
        if deadline.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            return Poll::Ready(Err(tonic::Status::resource_exhausted(format!(
                "uid {} has {} MiB of request messages in flight to wardend, the most it may; this request \
                 waited {} s for room and was dropped",
                self.uid,
                POOL_BYTES.max(self.max_message) >> 20,
                self.timeout.as_secs()
            ))));
        }
        Poll::Pending
    }

    /// Walks the pending bytes through the framing: what can be passed on.
    /// A message's prefix is held back with it until its charge is taken,
    /// so that the decoder (which makes room for the whole message when it
    /// reads a prefix) holds nothing for a message that waits.
    fn step(&mut self, cx: &mut Context<'_>) -> Step {
        let len = self.pending.len();
        let mut i = self.parsed;
        // Where the current message's prefix starts in `pending`.
        let mut prefix_at = 0;
        loop {
            match self.state {
                State::Charge { len: 0 } => self.state = State::Prefix { got: [0; 5], n: 0 },
                // The message before is still the consumer's: pass what
                // precedes this one and charge it when asked for more.
                State::Charge { .. } if self.held.is_some() && prefix_at > 0 => {
                    self.parsed = i - prefix_at;
                    return Step::Pass(self.pending.split_to(prefix_at));
                }
                State::Charge { len: message } => match self.charge(message, cx) {
                    Poll::Ready(Ok(permit)) => {
                        self.held = Some(permit);
                        self.state = State::Message { left: message };
                    }
                    Poll::Ready(Err(status)) => return Step::Fail(status),
                    Poll::Pending => {
                        // What came before this message goes on meanwhile.
                        self.parsed = i - prefix_at;
                        return if prefix_at > 0 {
                            Step::Pass(self.pending.split_to(prefix_at))
                        } else {
                            Step::Wait
                        };
                    }
                },
                _ if i == len => break,
                State::Prefix { mut got, mut n } => {
                    if n == 0 {
                        prefix_at = i;
                    }
                    let k = (5 - n).min(len - i);
                    got[n..n + k].copy_from_slice(&self.pending[i..i + k]);
                    n += k;
                    i += k;
                    self.state = if n == 5 {
                        let declared = u32::from_be_bytes([got[1], got[2], got[3], got[4]]);
                        State::Charge {
                            len: usize::try_from(declared).unwrap_or(usize::MAX),
                        }
                    } else {
                        State::Prefix { got, n }
                    };
                }
                State::Message { left } => {
                    let k = left.min(len - i);
                    i += k;
                    self.state = if left == k {
                        // Whole: its charge stays until the consumer (the
                        // decoder, then the handler) asks for what follows.
                        State::Prefix { got: [0; 5], n: 0 }
                    } else {
                        State::Message { left: left - k }
                    };
                }
            }
        }
        self.parsed = 0;
        Step::Pass(self.pending.split_to(len))
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Asked for more between messages: the last one is taken.
        if !matches!(self.state, State::Message { .. }) {
            self.held = None;
        }
        loop {
            if !self.pending.is_empty() {
                return match self.step(cx) {
                    Step::Pass(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                    Step::Wait => Poll::Pending,
                    Step::Fail(status) => Poll::Ready(Some(Err(Box::new(status)))),
                };
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(data) => self.pending = data,
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body fed by the test, one chunk at a time.
    fn channel() -> (
        tokio::sync::mpsc::Sender<Bytes>,
        http_body_util::StreamBody<impl tokio_stream::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok(Frame::data(b)));
        (tx, http_body_util::StreamBody::new(stream))
    }

    use tokio_stream::StreamExt;

    fn prefix(len: u32) -> Bytes {
        let mut p = vec![0u8];
        p.extend_from_slice(&len.to_be_bytes());
        Bytes::from(p)
    }

    async fn next<B: Body<Data = Bytes> + Unpin>(b: &mut B) -> Option<Bytes>
    where
        B::Error: std::fmt::Debug,
    {
        b.frame().await.map(|f| f.unwrap().into_data().unwrap())
    }

    #[tokio::test]
    async fn a_partial_message_holds_its_whole_length_until_it_is_complete() {
        let pool = Arc::new(Semaphore::new(1000));
        let (tx, body) = channel();
        let mut m = Metered::new(body, pool.clone(), 1, 4096, Duration::from_secs(30));
        tx.send(prefix(600)).await.unwrap();
        assert_eq!(next(&mut m).await.unwrap().len(), 5);
        tx.send(Bytes::from(vec![7u8; 100])).await.unwrap();
        assert_eq!(next(&mut m).await.unwrap().len(), 100);
        assert_eq!(pool.available_permits(), 400, "the message's 600 bytes are charged");
        // Its end and the next message's prefix in one chunk: its end goes
        // on, and it stays charged until the consumer asks for more.
        let mut chunk = vec![7u8; 500];
        chunk.extend_from_slice(&prefix(10));
        tx.send(Bytes::from(chunk)).await.unwrap();
        assert_eq!(next(&mut m).await.unwrap().len(), 500);
        assert_eq!(pool.available_permits(), 400);
        assert_eq!(next(&mut m).await.unwrap().len(), 5);
        assert_eq!(
            pool.available_permits(),
            990,
            "the next message is charged at its prefix"
        );
        tx.send(Bytes::from(vec![1u8; 10])).await.unwrap();
        assert_eq!(next(&mut m).await.unwrap().len(), 10);
        assert_eq!(pool.available_permits(), 990);
        drop(tx);
        assert!(next(&mut m).await.is_none());
        assert_eq!(pool.available_permits(), 1000);
    }

    #[tokio::test]
    async fn a_message_waits_while_the_pool_is_taken_then_goes_on() {
        let pool = Arc::new(Semaphore::new(1000));
        let (tx1, body1) = channel();
        let (tx2, body2) = channel();
        let mut first = Metered::new(body1, pool.clone(), 1, 4096, Duration::from_secs(30));
        let mut second = Metered::new(body2, pool.clone(), 1, 4096, Duration::from_secs(30));
        tx1.send(prefix(900)).await.unwrap();
        assert_eq!(next(&mut first).await.unwrap().len(), 5);
        tx1.send(Bytes::from(vec![0u8; 10])).await.unwrap();
        next(&mut first).await.unwrap();
        // The second's 200 bytes do not fit beside the first's 900.
        let mut chunk = prefix(200).to_vec();
        chunk.extend_from_slice(&[0u8; 200]);
        tx2.send(Bytes::from(chunk)).await.unwrap();
        // It waits, prefix and all (the decoder would make room for it).
        let waiting = tokio::spawn(async move { (next(&mut second).await.map(|b| b.len()), second) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        tx1.send(Bytes::from(vec![0u8; 890])).await.unwrap();
        next(&mut first).await.unwrap();
        // The first's consumer has its message, and asks for more.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(tx1);
        assert!(next(&mut first).await.is_none());
        let (got, second) = waiting.await.unwrap();
        assert_eq!(got, Some(205));
        assert_eq!(pool.available_permits(), 800);
        drop(second);
        assert_eq!(pool.available_permits(), 1000);
    }

    #[tokio::test]
    async fn a_request_that_waits_too_long_for_the_pool_is_refused() {
        let pool = Arc::new(Semaphore::new(100));
        let _taken = pool.clone().try_acquire_many_owned(100).unwrap();
        let (tx, body) = channel();
        let mut m = Metered::new(body, pool.clone(), 1000, 4096, Duration::from_millis(200));
        let mut chunk = prefix(50).to_vec();
        chunk.extend_from_slice(&[0u8; 50]);
        tx.send(Bytes::from(chunk)).await.unwrap();
        let err = m.frame().await.unwrap().unwrap_err();
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("uid 1000"), "{}", status.message());
    }

    #[tokio::test]
    async fn what_comes_before_a_waiting_message_goes_on() {
        let pool = Arc::new(Semaphore::new(100));
        let (tx, body) = channel();
        let mut m = Metered::new(body, pool.clone(), 1, 4096, Duration::from_secs(30));
        // A whole small message, then the prefix of one too large for the
        // pool as it is (a split prefix).
        let taken = pool.clone().try_acquire_many_owned(60).unwrap();
        let mut chunk = prefix(3).to_vec();
        chunk.extend_from_slice(b"abc");
        chunk.extend_from_slice(&prefix(50)[..2]);
        tx.send(Bytes::from(chunk)).await.unwrap();
        // (Part of a prefix goes on: the decoder waits for all five bytes.)
        assert_eq!(next(&mut m).await.unwrap().len(), 10);
        let mut rest = prefix(50)[2..].to_vec();
        rest.extend_from_slice(&[0u8; 50]);
        tx.send(Bytes::from(rest)).await.unwrap();
        let waiting = tokio::spawn(async move { (next(&mut m).await.map(|b| b.len()), m) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(taken);
        let (got, _m) = waiting.await.unwrap();
        assert_eq!(got, Some(53));
        assert_eq!(pool.available_permits(), 50);
    }

    #[tokio::test]
    async fn a_dropped_request_gives_its_charge_back() {
        let pool = Arc::new(Semaphore::new(1000));
        let (tx, body) = channel();
        let mut m = Metered::new(body, pool.clone(), 1, 4096, Duration::from_secs(30));
        tx.send(prefix(700)).await.unwrap();
        next(&mut m).await.unwrap();
        tx.send(Bytes::from(vec![0u8; 1])).await.unwrap();
        next(&mut m).await.unwrap();
        assert_eq!(pool.available_permits(), 300);
        drop(m);
        assert_eq!(pool.available_permits(), 1000);
    }

    #[tokio::test]
    async fn an_oversized_declared_length_is_charged_at_most_the_largest_message() {
        let pool = Arc::new(Semaphore::new(10_000));
        let (tx, body) = channel();
        let mut m = Metered::new(body, pool.clone(), 1, 4096, Duration::from_secs(30));
        let mut chunk = prefix(u32::MAX).to_vec();
        chunk.push(0);
        tx.send(Bytes::from(chunk)).await.unwrap();
        assert_eq!(next(&mut m).await.unwrap().len(), 6);
        assert_eq!(pool.available_permits(), 10_000 - 4096);
    }
}
