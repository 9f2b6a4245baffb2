//! One HTTP message body on its way through the proxy, searched by the detectors of its
//! direction as it streams ([`InspectedBody`]).
//!
//! The body's frames are the message as the peer's HTTP layer delivered it: chunked
//! encoding and HTTP/2 DATA framing are already gone, so a secret cut across two chunks
//! or two frames is one run of bytes to the [`Scanner`]. Only bytes the scanner releases
//! are passed on: a block match never leaves, not even its first byte, and the frame that
//! completes it ends the body with an error, which makes hyper abort the message (the
//! HTTP/1 connection is closed, the HTTP/2 stream reset).

use std::{
    collections::VecDeque,
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::{
    detect::{Detectors, Scan, Scanner},
    relay::{Direction, IDLE_RELEASE},
};

/// What can end a body early.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A detector found something in a body: a block (the body ends here) or a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// The detector's index in the direction's set.
    pub detector: usize,
    /// Which way the body was going.
    pub direction: Direction,
}

/// The error that ends a body a block detector matched in.
#[derive(Debug, thiserror::Error)]
#[error("blocked by detector {0}")]
pub struct Blocked(pub String);

/// Told about every hit as it happens: `(hit, blocked)`.
pub type OnHit = Arc<dyn Fn(Found, bool) + Send + Sync>;

/// A body searched as it streams (see the module documentation).
pub struct InspectedBody<B> {
    inner: B,
    detectors: Arc<Detectors>,
    scanner: Scanner,
    direction: Direction,
    on_hit: OnHit,
    /// Released bytes not yet handed to hyper.
    ready: VecDeque<Bytes>,
    /// Trailers, passed on after the last data.
    trailers: Option<HeaderMap>,
    /// Set while the scanner holds a block marker's possible start: fires the idle release.
    idle: Option<Pin<Box<Sleep>>>,
    /// The inner body ended (or failed).
    ended: bool,
    /// Bytes released, added to the connection's count.
    counter: Arc<AtomicU64>,
}

impl<B> InspectedBody<B> {
    /// `inner` searched by `detectors`, reporting hits to `on_hit` and released bytes to
    /// `counter`.
    pub fn new(
        inner: B,
        detectors: Arc<Detectors>,
        direction: Direction,
        on_hit: OnHit,
        counter: Arc<AtomicU64>,
    ) -> Self {
        InspectedBody {
            scanner: detectors.scanner(),
            inner,
            detectors,
            direction,
            on_hit,
            ready: VecDeque::new(),
            trailers: None,
            idle: None,
            ended: false,
            counter,
        }
    }

    /// Queues what one scan released, or reports the block that ends the body.
    fn take(&mut self, scan: Scan) -> Result<(), BoxError> {
        let found = |detector| Found {
            detector,
            direction: self.direction,
        };
        match scan {
            Scan::Pass { release, flagged } => {
                for detector in flagged {
                    (self.on_hit)(found(detector), false);
                }
                self.push(release);
                Ok(())
            }
            Scan::Block { detector, flagged } => {
                for detector in flagged {
                    (self.on_hit)(found(detector), false);
                }
                (self.on_hit)(found(detector), true);
                self.ended = true;
                self.ready.clear();
                Err(Box::new(Blocked(self.detectors.name(detector).to_string())))
            }
        }
    }

    fn push(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.counter
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.ready.push_back(Bytes::from(bytes));
        }
    }
}

impl<B> Body for InspectedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if this.ended {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let scan = this.scanner.feed(&this.detectors, &data);
                        if let Err(e) = this.take(scan) {
                            return Poll::Ready(Some(Err(e)));
                        }
                        this.idle = this
                            .scanner
                            .holding()
                            .then(|| Box::pin(tokio::time::sleep(IDLE_RELEASE)));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.trailers = Some(trailers);
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.idle = None;
                    let held = this.scanner.release_held();
                    this.push(held);
                }
                Poll::Pending => {
                    // The sender went quiet with a marker's possible start held back: let
                    // it go (see `Scanner::release_held`).
                    let Some(idle) = this.idle.as_mut() else {
                        return Poll::Pending;
                    };
                    ready!(idle.as_mut().poll(cx));
                    this.idle = None;
                    let held = this.scanner.release_held();
                    this.push(held);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Every byte comes out unless a block ends the body (then it fails anyway), so
        // the length the sender declared stays true.
        let queued = self.ready.iter().map(Bytes::len).sum::<usize>() as u64;
        if self.ended {
            return SizeHint::with_exact(queued);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + queued);
        // Held bytes are in neither count: while some are held there is no upper bound.
        if let Some(upper) = inner.upper().filter(|_| !self.scanner.holding()) {
            hint.set_upper(upper + queued);
        }
        hint
    }
}
