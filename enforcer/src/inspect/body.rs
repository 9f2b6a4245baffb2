//! One HTTP message body on its way through the proxy, searched by the detectors of its
//! direction as it streams ([`InspectedBody`]).
//!
//! The body's frames are the message as the peer's HTTP layer delivered it: chunked
//! encoding and HTTP/2 DATA framing are already gone, so a secret cut across two chunks
//! or two frames is one run of bytes to the [`Scanner`]. Only bytes the scanner releases
//! are passed on: a block match never leaves, not even its first byte, and the frame that
//! completes it ends the body with an error, which makes hyper abort the message (the
//! HTTP/1 connection is closed, the HTTP/2 stream reset).
//!
//! A body with a `Content-Encoding` is searched decoded ([`Decoder`], within its limits
//! against decompression bombs) and passed on as it came, byte for byte: each encoded
//! frame waits until everything decoded from it and before it has been searched and
//! nothing is held back, so no encoded byte leaves ahead of the search of what it
//! carries. A body that cannot be decoded (an unknown coding, a corrupt stream, over a
//! limit) cannot be searched: going up it is stopped like a block, coming down it passes
//! and is reported.

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
    decode::{Decoder, Limits, codings},
    dlp::{Detectors, Scan, Scanner},
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

/// What a body reports as it streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyEvent {
    /// A detector matched; `blocked` when it ended the body.
    Detector(Found, bool),
    /// The body could not be decoded, so not searched; `blocked` when that ended it.
    Undecodable {
        /// Which way the body was going.
        direction: Direction,
        /// Why, in words.
        error: String,
        /// The body was stopped.
        blocked: bool,
    },
}

/// Told about every [`BodyEvent`] as it happens.
pub type OnHit = Arc<dyn Fn(BodyEvent) + Send + Sync>;

/// The error that ends a body that could not be decoded going up.
#[derive(Debug, thiserror::Error)]
#[error("not inspectable: {0}")]
pub struct Undecodable(pub String);

/// How a body is decoded for the search.
pub enum Decoding {
    /// Searched as it is.
    Identity,
    /// Searched through this decoder, passed on encoded.
    Decoder(Box<Decoder>),
    /// Its codings cannot be decoded (this says why).
    Unknown(String),
}

impl Decoding {
    /// The decoding for a `Content-Encoding` header value (`None`: no header), within
    /// `limits`.
    pub fn for_header(value: Option<&[u8]>, limits: Limits) -> Decoding {
        let Some(value) = value else {
            return Decoding::Identity;
        };
        match std::str::from_utf8(value)
            .map_err(|_| "a Content-Encoding that is not text".to_string())
            .and_then(|v| codings(v).map_err(|e| e.to_string()))
        {
            Ok(codings) if codings.is_empty() => Decoding::Identity,
            Ok(codings) => Decoding::Decoder(Box::new(Decoder::new(&codings, limits))),
            Err(e) => Decoding::Unknown(e),
        }
    }
}

/// A body searched as it streams (see the module documentation).
pub struct InspectedBody<B> {
    inner: B,
    detectors: Arc<Detectors>,
    scanner: Scanner,
    direction: Direction,
    on_hit: OnHit,
    decoding: Decoding,
    /// Whether a body that cannot be decoded is stopped (up, enforcing) or only reported.
    stop_undecodable: bool,
    /// Encoded frames waiting for the search of what they carry.
    pending: VecDeque<Bytes>,
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
    /// `inner` searched by `detectors` after `decoding`, reporting to `on_hit` and
    /// released bytes to `counter`; `stop_undecodable`: a body that cannot be decoded is
    /// stopped rather than passed.
    pub fn new(
        inner: B,
        detectors: Arc<Detectors>,
        direction: Direction,
        decoding: Decoding,
        stop_undecodable: bool,
        on_hit: OnHit,
        counter: Arc<AtomicU64>,
    ) -> Self {
        InspectedBody {
            scanner: detectors.scanner(),
            inner,
            detectors,
            direction,
            on_hit,
            decoding,
            stop_undecodable,
            pending: VecDeque::new(),
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
                    (self.on_hit)(BodyEvent::Detector(found(detector), false));
                }
                // A decoded body passes its encoded frames instead (see `settle`).
                if matches!(self.decoding, Decoding::Identity) {
                    self.push(Bytes::from(release));
                }
                Ok(())
            }
            Scan::Block { detector, flagged } => {
                for detector in flagged {
                    (self.on_hit)(BodyEvent::Detector(found(detector), false));
                }
                (self.on_hit)(BodyEvent::Detector(found(detector), true));
                self.stop();
                Err(Box::new(Blocked(self.detectors.name(detector).to_string())))
            }
        }
    }

    fn stop(&mut self) {
        self.ended = true;
        self.ready.clear();
        self.pending.clear();
        self.trailers = None;
    }

    /// Searches the next `data` of the body (decoded first when it has codings).
    fn search(&mut self, data: Bytes) -> Result<(), BoxError> {
        let decoded = match &mut self.decoding {
            Decoding::Identity => {
                let scan = self.scanner.feed(&self.detectors, &data);
                return self.take(scan);
            }
            Decoding::Decoder(decoder) => {
                let mut out = Vec::new();
                let pushed = decoder.push(&data, &mut out);
                self.pending.push_back(data);
                pushed.map(|()| out).map_err(|e| e.to_string())
            }
            Decoding::Unknown(why) => Err(why.clone()),
        };
        match decoded {
            Ok(out) => {
                let scan = self.scanner.feed(&self.detectors, &out);
                self.take(scan)?;
                self.settle(false);
                Ok(())
            }
            Err(error) => self.undecodable(error),
        }
    }

    /// The end of the body: the decoder's and the scanner's last words.
    fn end(&mut self) -> Result<(), BoxError> {
        self.ended = true;
        self.idle = None;
        if let Decoding::Decoder(decoder) = &mut self.decoding {
            let mut out = Vec::new();
            if let Err(e) = decoder.finish(&mut out) {
                return self.undecodable(e.to_string());
            }
            let scan = self.scanner.feed(&self.detectors, &out);
            self.take(scan)?;
        }
        // End-of-input matches (a trailing `\b`), then everything held.
        let scan = self.scanner.finish(&self.detectors);
        self.take(scan)?;
        self.settle(true);
        Ok(())
    }

    /// Lets waiting encoded frames go once what they carry is searched and nothing is
    /// held back (`idle`: the held bytes were let go, see `Scanner::release_held`).
    fn settle(&mut self, idle: bool) {
        let searched = match &self.decoding {
            Decoding::Decoder(decoder) => {
                !decoder.holds_output() && (idle || !self.scanner.holding())
            }
            _ => true,
        };
        if searched {
            while let Some(frame) = self.pending.pop_front() {
                self.push(frame);
            }
        }
    }

    /// A body that cannot be decoded: stopped, or reported and passed unsearched.
    fn undecodable(&mut self, error: String) -> Result<(), BoxError> {
        let blocked = self.stop_undecodable;
        (self.on_hit)(BodyEvent::Undecodable {
            direction: self.direction,
            error: error.clone(),
            blocked,
        });
        if blocked {
            self.stop();
            return Err(Box::new(Undecodable(error)));
        }
        // Passed as it is from here on.
        self.decoding = Decoding::Identity;
        self.scanner = self.detectors.scanner();
        while let Some(frame) = self.pending.pop_front() {
            self.push(frame);
        }
        Ok(())
    }

    fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.counter
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.ready.push_back(bytes);
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
                        if let Err(e) = this.search(data) {
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
                    if let Err(e) = this.end() {
                        return Poll::Ready(Some(Err(e)));
                    }
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
                    if matches!(this.decoding, Decoding::Identity) {
                        this.push(Bytes::from(held));
                    } else {
                        this.settle(true);
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty() && self.pending.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Every byte comes out unless a block ends the body (then it fails anyway), so
        // the length the sender declared stays true.
        let queued = self
            .ready
            .iter()
            .chain(&self.pending)
            .map(Bytes::len)
            .sum::<usize>() as u64;
        if self.ended {
            return SizeHint::with_exact(queued);
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + queued);
        // Bytes the scanner holds of a body searched as it is are in neither count: while
        // some are held there is no upper bound.
        let unknown = matches!(self.decoding, Decoding::Identity) && self.scanner.holding();
        if let Some(upper) = inner.upper().filter(|_| !unknown) {
            hint.set_upper(upper + queued);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, sync::Mutex};

    use flate2::{Compression, write::GzEncoder};
    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;
    use crate::policy::{Detector, DetectorAction, DetectorDirection, DetectorPattern};

    fn detectors() -> Arc<Detectors> {
        Arc::new(
            Detectors::new(&[Detector {
                name: "key".into(),
                pattern: DetectorPattern::Literal("sk-live-".into()),
                action: DetectorAction::Block,
                direction: DetectorDirection::Both,
            }])
            .unwrap(),
        )
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Streams `pieces` through an [`InspectedBody`]: what came out before the end or the
    /// error, whether it failed, and the events.
    async fn run(
        pieces: Vec<Vec<u8>>,
        decoding: Decoding,
        stop_undecodable: bool,
    ) -> (Vec<u8>, bool, Vec<BodyEvent>) {
        let frames = pieces
            .into_iter()
            .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(p))));
        let inner = StreamBody::new(tokio_stream::iter(frames));
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = events.clone();
        let mut body = InspectedBody::new(
            inner,
            detectors(),
            Direction::Up,
            decoding,
            stop_undecodable,
            Arc::new(move |e| log.lock().unwrap().push(e)),
            Arc::default(),
        );
        let mut out = Vec::new();
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => out.extend_from_slice(frame.data_ref().unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let events = events.lock().unwrap().clone();
        (out, failed, events)
    }

    fn gzip_decoding() -> Decoding {
        Decoding::for_header(Some(b"gzip"), Limits::default())
    }

    #[tokio::test]
    async fn a_marker_cut_across_frames_never_leaves() {
        let (out, failed, events) = run(
            vec![b"token=sk-l".to_vec(), b"ive-0123".to_vec()],
            Decoding::Identity,
            true,
        )
        .await;
        assert!(failed);
        assert_eq!(out, b"token=");
        assert_eq!(
            events,
            vec![BodyEvent::Detector(
                Found {
                    detector: 0,
                    direction: Direction::Up
                },
                true
            )]
        );
    }

    #[tokio::test]
    async fn a_compressed_body_is_searched_decoded_and_passed_as_it_came() {
        let mut clean = vec![b'x'; 300_000];
        clean.extend_from_slice(b"sk-not-a-key");
        let encoded = gzip(&clean);
        let pieces: Vec<Vec<u8>> = encoded.chunks(777).map(<[u8]>::to_vec).collect();
        let (out, failed, events) = run(pieces, gzip_decoding(), true).await;
        assert!(!failed && events.is_empty(), "{events:?}");
        assert_eq!(out, encoded, "the encoded bytes pass unchanged");

        let mut secret = vec![b'x'; 300_000];
        secret.extend_from_slice(b"sk-live-0123456789");
        secret.extend_from_slice(&[b'y'; 1000]);
        let encoded = gzip(&secret);
        // Cut at every few bytes: whatever frame carries the marker's start is held.
        let pieces: Vec<Vec<u8>> = encoded.chunks(5).map(<[u8]>::to_vec).collect();
        let (out, failed, _) = run(pieces, gzip_decoding(), true).await;
        assert!(failed);
        // What left decodes to a prefix without the marker's first byte.
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        let _ = decoder.write_all(&out);
        let _ = decoder.flush();
        let got = decoder.get_ref();
        assert!(got.len() <= 300_000, "{} decoded bytes left", got.len());
    }

    #[tokio::test]
    async fn what_cannot_be_decoded_is_stopped_going_up_and_reported_coming_down() {
        let corrupt = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff];
        let (out, failed, events) = run(vec![corrupt.clone()], gzip_decoding(), true).await;
        assert!(failed && out.is_empty());
        assert!(matches!(
            &events[..],
            [BodyEvent::Undecodable { blocked: true, .. }]
        ));

        let (out, failed, events) = run(vec![corrupt.clone()], gzip_decoding(), false).await;
        assert!(!failed);
        assert_eq!(out, corrupt);
        assert!(matches!(
            &events[..],
            [BodyEvent::Undecodable { blocked: false, .. }]
        ));

        let unknown = Decoding::for_header(Some(b"compress"), Limits::default());
        let (_, failed, events) = run(vec![b"abc".to_vec()], unknown, true).await;
        assert!(failed);
        assert!(
            matches!(&events[..], [BodyEvent::Undecodable { error, .. }] if error.contains("compress")),
            "{events:?}"
        );
    }
}
