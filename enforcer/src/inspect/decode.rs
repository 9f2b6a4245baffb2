//! Content-Encoding decoders for the inspected HTTP bodies: `gzip`, `deflate`, `br` and
//! `zstd`, at most two stacked, pushed a chunk at a time (no async adaptor: the body layer
//! decodes a *copy* of each frame for the DLP scan and forwards the encoded original).
//!
//! Every stage writes into a [`Sink`] that counts what it is given and errs as soon as a
//! limit is crossed, so a decompression bomb is stopped while it expands, not after: memory
//! stays within [`Limits::max_decoded`] per stage plus the codecs' own windows (32 KiB for
//! deflate, at most 16 MiB for brotli, 8 MiB for zstd).

use std::io::{self, Write};

use brotli_decompressor::DecompressorWriter;
use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// One content coding (RFC 9110 §8.4.1, RFC 7932, RFC 8878).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// `gzip` (or `x-gzip`): one or more gzip members.
    Gzip,
    /// `deflate`: a zlib stream, or raw deflate from servers that got it wrong.
    Deflate,
    /// `br`: brotli.
    Br,
    /// `zstd`: one or more zstd frames, window at most 8 MiB (RFC 9659).
    Zstd,
}

impl Coding {
    /// The coding's token as HTTP writes it.
    pub fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Br => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// Most codings stacked in one Content-Encoding: two covers every real server (a gzip
/// file served with `br` on top), and each extra layer multiplies the work a bomb costs.
pub const MAX_CODINGS: usize = 2;

/// The largest window a zstd frame may ask for: HTTP's cap (RFC 9659 §3).
pub const ZSTD_MAX_WINDOW: u64 = 8 << 20;

/// Decoded bytes allowed before [`Limits::max_ratio`] applies: small bodies of one
/// repeated byte compress far beyond any ratio and are harmless at this size.
pub const RATIO_GRACE: u64 = 1 << 20;

/// Encoded bytes handed to the first stage at a time, so the ratio is checked against
/// the input consumed so far, not the whole push (a push may be one large DATA frame).
const FEED: usize = 512;

/// Parses a Content-Encoding header value (comma-separated list, case-insensitive,
/// `identity` and empty elements skipped, `x-gzip` = gzip), in header order: the first
/// coding was applied first. Unknown coding or more than [`MAX_CODINGS`] stacked → Err.
pub fn codings(value: &str) -> Result<Vec<Coding>, DecodeError> {
    let mut out = Vec::new();
    for token in value.split(',').map(str::trim) {
        let coding = match token.to_ascii_lowercase().as_str() {
            "" | "identity" => continue,
            "gzip" | "x-gzip" => Coding::Gzip,
            "deflate" => Coding::Deflate,
            "br" => Coding::Br,
            "zstd" => Coding::Zstd,
            _ => return Err(DecodeError::Unknown(token.to_owned())),
        };
        out.push(coding);
    }
    if out.len() > MAX_CODINGS {
        return Err(DecodeError::TooMany(out.len()));
    }
    Ok(out)
}

/// Limits on one message's decoding, against decompression bombs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most decoded bytes per message (default 64 MiB). Also bounds each intermediate
    /// stage of stacked codings.
    pub max_decoded: u64,
    /// Most decoded bytes per encoded byte (default 200), enforced once more than
    /// [`RATIO_GRACE`] bytes have been decoded.
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_decoded: 64 << 20,
            max_ratio: 200,
        }
    }
}

/// Why a body could not be decoded. All of them mean "not inspectable": the body layer
/// blocks such a body going up and flags it coming down.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A coding this proxy does not decode (`compress`, `exi`, a typo…).
    #[error("unknown content coding {0:?}")]
    Unknown(String),
    /// More codings stacked than [`MAX_CODINGS`].
    #[error("{0} content codings stacked, at most {MAX_CODINGS} are decoded")]
    TooMany(usize),
    /// The stream is not valid in its coding.
    #[error("corrupt {coding} stream")]
    Corrupt {
        /// The coding's name.
        coding: &'static str,
        /// What the codec said.
        #[source]
        source: io::Error,
    },
    /// More decoded bytes than [`Limits::max_decoded`].
    #[error("decoded body over {limit} bytes")]
    TooLarge {
        /// The limit crossed.
        limit: u64,
    },
    /// More decoded bytes per encoded byte than [`Limits::max_ratio`].
    #[error("decoded {decoded} bytes from {encoded} encoded bytes, over the ratio of {limit}:1")]
    Ratio {
        /// Decoded bytes when the limit was crossed.
        decoded: u64,
        /// Encoded bytes consumed by then.
        encoded: u64,
        /// The ratio limit.
        limit: u64,
    },
    /// The encoded stream ended inside a member, frame or block.
    #[error("truncated {0} stream")]
    Truncated(&'static str),
    /// A push or finish after an earlier error: codecs are not resumable after an error.
    #[error("decoding already failed")]
    Failed,
}

/// Which limit a [`Sink`] hit; kept aside because the codecs wrap the sink's error into
/// their own `io::Error`.
#[derive(Clone, Copy, Debug)]
enum Trip {
    TooLarge {
        limit: u64,
    },
    Ratio {
        decoded: u64,
        encoded: u64,
        limit: u64,
    },
}

/// The error for the limit a sink hit, if it hit one.
fn limit_error(trip: Option<Trip>) -> Option<DecodeError> {
    Some(match trip? {
        Trip::TooLarge { limit } => DecodeError::TooLarge { limit },
        Trip::Ratio {
            decoded,
            encoded,
            limit,
        } => DecodeError::Ratio {
            decoded,
            encoded,
            limit,
        },
    })
}

/// The output of one stage: buffers what the codec writes, and errs once a limit is
/// crossed, before the bytes are kept.
#[derive(Debug)]
struct Sink {
    buf: Vec<u8>,
    written: u64,
    /// Encoded bytes given to the whole decoder so far; for the last stage's ratio.
    encoded: u64,
    limits: Limits,
    /// Only the last stage checks the ratio (against the original encoded bytes).
    check_ratio: bool,
    trip: Option<Trip>,
}

impl Sink {
    fn new(limits: Limits, check_ratio: bool) -> Sink {
        Sink {
            buf: Vec::new(),
            written: 0,
            encoded: 0,
            limits,
            check_ratio,
            trip: None,
        }
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let total = self.written.saturating_add(data.len() as u64);
        let trip = if total > self.limits.max_decoded {
            Some(Trip::TooLarge {
                limit: self.limits.max_decoded,
            })
        } else if self.check_ratio
            && total > RATIO_GRACE
            && total > self.encoded.saturating_mul(self.limits.max_ratio)
        {
            Some(Trip::Ratio {
                decoded: total,
                encoded: self.encoded,
                limit: self.limits.max_ratio,
            })
        } else {
            None
        };
        if let Some(trip) = trip {
            self.trip = Some(trip);
            return Err(io::Error::other("decode limit"));
        }
        self.written = total;
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A zstd stage. ruzstd's `decode_from_to` decodes every complete block of its input at
/// once, which a run of 4-byte RLE blocks turns into 32768:1 before any sink sees it; so
/// the frames are cut here and handed over one block at a time.
struct Zstd {
    dec: FrameDecoder,
    input: Vec<u8>,
    state: ZstdState,
    sink: Sink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZstdState {
    /// Before a frame (or between frames).
    Frame,
    /// Inside a frame's blocks; whether the frame ends with a 4-byte checksum.
    Blocks { checksum: bool },
    /// Inside a skippable frame: bytes left to skip.
    Skip(u64),
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Largest block content (RFC 8878 §3.1.1.2.3: `Block_Maximum_Size` is 128 KiB).
const ZSTD_MAX_BLOCK: usize = 128 << 10;

fn corrupt(
    coding: &'static str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> DecodeError {
    DecodeError::Corrupt {
        coding,
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl Zstd {
    fn new(sink: Sink) -> Zstd {
        let mut dec = FrameDecoder::new();
        dec.set_max_window_size(ZSTD_MAX_WINDOW);
        Zstd {
            dec,
            input: Vec::new(),
            state: ZstdState::Frame,
            sink,
        }
    }

    /// Takes `data`, decodes every complete block now in the buffer.
    fn write(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        self.input.extend_from_slice(data);
        let mut at = 0;
        let result = self.run(&mut at);
        self.input.drain(..at);
        result
    }

    fn run(&mut self, at: &mut usize) -> Result<(), DecodeError> {
        loop {
            let rest = &self.input[*at..];
            match self.state {
                ZstdState::Skip(left) => {
                    let n = (rest.len() as u64).min(left);
                    *at += n as usize;
                    self.state = if n == left {
                        ZstdState::Frame
                    } else {
                        ZstdState::Skip(left - n)
                    };
                    if n < left {
                        return Ok(());
                    }
                }
                ZstdState::Frame => {
                    if rest.len() < 4 {
                        return Ok(());
                    }
                    let magic = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
                        if rest.len() < 8 {
                            return Ok(());
                        }
                        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
                        *at += 8;
                        self.state = ZstdState::Skip(u64::from(len));
                        continue;
                    }
                    if magic != ZSTD_MAGIC {
                        return Err(corrupt("zstd", "not a zstd frame"));
                    }
                    if rest.len() < 5 {
                        return Ok(());
                    }
                    // RFC 8878 §3.1.1.1: the header's length follows from its first byte.
                    let fhd = rest[4];
                    let single = fhd & 0x20 != 0;
                    let window = usize::from(!single);
                    let dict = [0, 1, 2, 4][usize::from(fhd & 3)];
                    let fcs = match fhd >> 6 {
                        0 => usize::from(single),
                        1 => 2,
                        2 => 4,
                        _ => 8,
                    };
                    let len = 5 + window + dict + fcs;
                    if rest.len() < len {
                        return Ok(());
                    }
                    self.dec
                        .reset(&rest[..len])
                        .map_err(|e| corrupt("zstd", e))?;
                    *at += len;
                    self.state = ZstdState::Blocks {
                        checksum: fhd & 0x04 != 0,
                    };
                }
                ZstdState::Blocks { checksum } => {
                    if rest.len() < 3 {
                        return Ok(());
                    }
                    let header = u32::from_le_bytes([rest[0], rest[1], rest[2], 0]);
                    let last = header & 1 != 0;
                    let size = (header >> 3) as usize;
                    let content = match (header >> 1) & 3 {
                        0 | 2 => size,
                        1 => 1,
                        _ => return Err(corrupt("zstd", "reserved block type")),
                    };
                    if size > ZSTD_MAX_BLOCK {
                        return Err(corrupt("zstd", "block over 128 KiB"));
                    }
                    let need = 3 + content + if last && checksum { 4 } else { 0 };
                    if rest.len() < need {
                        return Ok(());
                    }
                    let block = &rest[..need];
                    let dec = &mut self.dec;
                    // ruzstd 0.9 still has `assert!`s on some malformed blocks: a peer's
                    // bytes must not take the proxy's task down with them.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        dec.decode_blocks(block, BlockDecodingStrategy::UptoBlocks(1))
                    }))
                    .map_err(|_| corrupt("zstd", "malformed block"))?
                    .map_err(|e| corrupt("zstd", e))?;
                    *at += need;
                    if last {
                        self.state = ZstdState::Frame;
                    }
                    // Mid-frame this leaves the window in the decoder: back-references
                    // need it. See `Decoder::holds_output`.
                    if let Err(e) = self.dec.collect_to_writer(&mut self.sink) {
                        return Err(
                            limit_error(self.sink.trip).unwrap_or_else(|| corrupt("zstd", e))
                        );
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> Result<(), DecodeError> {
        if self.state != ZstdState::Frame || !self.input.is_empty() {
            return Err(DecodeError::Truncated("zstd"));
        }
        Ok(())
    }

    fn holds_output(&self) -> bool {
        matches!(self.state, ZstdState::Blocks { .. })
    }
}

/// `deflate` before its first two bytes tell zlib from raw deflate.
struct Sniff {
    head: Vec<u8>,
    sink: Sink,
}

/// A zlib header (RFC 1950 §2.2): method 8, window ≤ 32 KiB, no preset dictionary (no
/// HTTP peer has one), and the check bits.
fn is_zlib_header(cmf: u8, flg: u8) -> bool {
    cmf & 0x0F == 8
        && cmf >> 4 <= 7
        && flg & 0x20 == 0
        && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0
}

enum Stage {
    Gzip(MultiGzDecoder<Sink>),
    Sniff(Sniff),
    Zlib(ZlibDecoder<Sink>),
    Raw(DeflateDecoder<Sink>),
    Br(Box<DecompressorWriter<Sink>>),
    Zstd(Box<Zstd>),
    /// Only while a stage is being replaced (sniffing `deflate`).
    Gone,
}

impl Stage {
    fn new(coding: Coding, sink: Sink) -> Stage {
        match coding {
            Coding::Gzip => Stage::Gzip(MultiGzDecoder::new(sink)),
            Coding::Deflate => Stage::Sniff(Sniff {
                head: Vec::new(),
                sink,
            }),
            // 4 KiB of output buffer: output reaches the sink (and its limits) in small steps.
            Coding::Br => Stage::Br(Box::new(DecompressorWriter::new(sink, 4096))),
            Coding::Zstd => Stage::Zstd(Box::new(Zstd::new(sink))),
        }
    }

    fn sink(&mut self) -> &mut Sink {
        match self {
            Stage::Gzip(d) => d.get_mut(),
            Stage::Sniff(s) => &mut s.sink,
            Stage::Zlib(d) => d.get_mut(),
            Stage::Raw(d) => d.get_mut(),
            Stage::Br(d) => d.get_mut(),
            Stage::Zstd(z) => &mut z.sink,
            Stage::Gone => unreachable!("a stage is replaced within one call"),
        }
    }

    /// The limit the sink hit, else the codec's error.
    fn error(&mut self, coding: &'static str, e: io::Error) -> DecodeError {
        limit_error(self.sink().trip).unwrap_or_else(|| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                DecodeError::Truncated(coding)
            } else {
                DecodeError::Corrupt { coding, source: e }
            }
        })
    }

    fn write(&mut self, coding: &'static str, data: &[u8]) -> Result<(), DecodeError> {
        let r = match self {
            Stage::Gzip(d) => d.write_all(data).and_then(|()| d.flush()),
            Stage::Zlib(d) => d.write_all(data).and_then(|()| d.flush()),
            Stage::Raw(d) => d.write_all(data).and_then(|()| d.flush()),
            Stage::Br(d) => d.write_all(data),
            Stage::Zstd(z) => return z.write(data),
            Stage::Sniff(s) => {
                s.head.extend_from_slice(data);
                if s.head.len() < 2 {
                    return Ok(());
                }
                let Stage::Sniff(s) = std::mem::replace(self, Stage::Gone) else {
                    unreachable!()
                };
                *self = if is_zlib_header(s.head[0], s.head[1]) {
                    Stage::Zlib(ZlibDecoder::new(s.sink))
                } else {
                    Stage::Raw(DeflateDecoder::new(s.sink))
                };
                return self.write(coding, &s.head);
            }
            Stage::Gone => unreachable!("a stage is replaced within one call"),
        };
        r.map_err(|e| self.error(coding, e))
    }

    fn finish(&mut self, coding: &'static str) -> Result<(), DecodeError> {
        let r = match self {
            Stage::Gzip(d) => d.try_finish(),
            Stage::Zlib(d) => d.try_finish(),
            Stage::Raw(d) => d.try_finish(),
            Stage::Br(d) => d.close(),
            Stage::Zstd(z) => return z.finish(),
            Stage::Sniff(_) => return Err(DecodeError::Truncated(coding)),
            Stage::Gone => unreachable!("a stage is replaced within one call"),
        };
        r.map_err(|e| self.error(coding, e))
    }
}

/// A push decoder for one message body: the codings of its Content-Encoding, decoded in
/// reverse order (the last applied is decoded first), within [`Limits`].
///
/// With no codings the bytes are copied through, under the same limits.
pub struct Decoder {
    /// In decoding order; each stage's sink feeds the next stage.
    stages: Vec<(Coding, Stage)>,
    /// The last stage's sink when there are stages; the identity sink otherwise.
    identity: Sink,
    encoded: u64,
    failed: bool,
}

impl Decoder {
    /// A decoder for `codings` in header order (as [`codings`] returns them).
    pub fn new(codings: &[Coding], limits: Limits) -> Decoder {
        let n = codings.len();
        let stages = codings
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &c)| (c, Stage::new(c, Sink::new(limits, i + 1 == n))))
            .collect();
        Decoder {
            stages,
            identity: Sink::new(limits, true),
            encoded: 0,
            failed: false,
        }
    }

    /// Decodes the next encoded bytes, appending decoded bytes to `out`.
    pub fn push(&mut self, encoded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let r = self.push_inner(encoded, out);
        self.failed = r.is_err();
        r
    }

    fn push_inner(&mut self, encoded: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        for chunk in encoded.chunks(FEED) {
            self.encoded += chunk.len() as u64;
            let Some(((coding, first), rest)) = self.stages.split_first_mut() else {
                self.identity.encoded = self.encoded;
                // The identity sink fails only on a limit.
                self.identity
                    .write_all(chunk)
                    .map_err(|_| limit_error(self.identity.trip).unwrap_or(DecodeError::Failed))?;
                out.append(&mut self.identity.buf);
                continue;
            };
            if let Some((_, last)) = rest.last_mut() {
                last.sink().encoded = self.encoded;
            } else {
                first.sink().encoded = self.encoded;
            }
            first.write(coding.name(), chunk)?;
            let mut between = std::mem::take(&mut first.sink().buf);
            for (coding, stage) in rest.iter_mut() {
                stage.write(coding.name(), &between)?;
                between = std::mem::take(&mut stage.sink().buf);
            }
            out.append(&mut between);
        }
        Ok(())
    }

    /// End of the encoded stream: flushes, and errs on a truncated stream. An empty
    /// body is fine whatever its codings (a HEAD or 304 reply keeps its Content-Encoding).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        if self.encoded == 0 {
            return Ok(());
        }
        let r = self.finish_inner(out);
        self.failed = r.is_err();
        r
    }

    fn finish_inner(&mut self, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let mut between = Vec::new();
        for (i, (coding, stage)) in self.stages.iter_mut().enumerate() {
            if i > 0 {
                stage.write(coding.name(), &between)?;
            }
            stage.finish(coding.name())?;
            between = std::mem::take(&mut stage.sink().buf);
        }
        out.append(&mut between);
        Ok(())
    }

    /// Decoded bytes so far (given to `out`).
    pub fn decoded(&self) -> u64 {
        match self.stages.last() {
            Some((_, Stage::Gzip(d))) => d.get_ref().written,
            Some((_, Stage::Zlib(d))) => d.get_ref().written,
            Some((_, Stage::Raw(d))) => d.get_ref().written,
            Some((_, Stage::Br(d))) => d.get_ref().written,
            Some((_, Stage::Zstd(z))) => z.sink.written,
            Some((_, Stage::Sniff(s))) => s.sink.written,
            Some((_, Stage::Gone)) => 0,
            None => self.identity.written,
        }
    }

    /// Whether a stage keeps decoded bytes that have not reached `out` yet, so that the
    /// encoded bytes pushed so far are not fully scanned: zstd keeps up to its window
    /// (at most 8 MiB) inside the decoder until its frame ends, because ruzstd drains only
    /// what back-references can no longer need. gzip, deflate and brotli give out all
    /// they decoded at every push.
    pub fn holds_output(&self) -> bool {
        self.stages.iter().any(|(_, s)| match s {
            Stage::Zstd(z) => z.holds_output(),
            _ => false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use flate2::{
        Compression,
        write::{DeflateEncoder, GzEncoder, ZlibEncoder},
    };

    use super::*;

    /// A body that compresses but not to nothing.
    fn body(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"abcdefghij klmnop\n"[(i * 7 + i / 13) % 18])
            .collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn br(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut r = brotli::CompressorReader::new(data, 4096, 5, 22);
        r.read_to_end(&mut out).unwrap();
        out
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn encode(coding: Coding, data: &[u8]) -> Vec<u8> {
        match coding {
            Coding::Gzip => gzip(data),
            Coding::Deflate => zlib(data),
            Coding::Br => br(data),
            Coding::Zstd => zstd(data),
        }
    }

    /// Decodes `encoded` pushed in pieces of `step` bytes.
    fn decode(codings: &[Coding], encoded: &[u8], step: usize) -> Result<Vec<u8>, DecodeError> {
        let mut d = Decoder::new(codings, Limits::default());
        let mut out = Vec::new();
        for piece in encoded.chunks(step) {
            d.push(piece, &mut out)?;
        }
        d.finish(&mut out)?;
        assert_eq!(d.decoded(), out.len() as u64);
        Ok(out)
    }

    /// `hello zstd, content-encoding test body\n` three times, by the reference `zstd -19
    /// --check` (one frame, one compressed block, a content checksum).
    const ZSTD_HELLO: &[u8] = &[
        0x28, 0xb5, 0x2f, 0xfd, 0x24, 0x75, 0x7d, 0x01, 0x00, 0x74, 0x02, 0x68, 0x65, 0x6c, 0x6c,
        0x6f, 0x20, 0x7a, 0x73, 0x74, 0x64, 0x2c, 0x20, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74,
        0x2d, 0x65, 0x6e, 0x63, 0x6f, 0x64, 0x69, 0x6e, 0x67, 0x20, 0x74, 0x65, 0x73, 0x74, 0x20,
        0x62, 0x6f, 0x64, 0x79, 0x0a, 0x01, 0x00, 0x5f, 0x85, 0xaa, 0x27, 0xc3, 0x4e, 0x13, 0x70,
    ];

    /// `0123456789abcdef` 20000 times (320000 bytes), by `zstd -19 --check`: three blocks
    /// (one compressed, two RLE-heavy), a checksum.
    const ZSTD_HEX: &[u8] = &[
        0x28, 0xb5, 0x2f, 0xfd, 0xa4, 0x00, 0xe2, 0x04, 0x00, 0xc4, 0x00, 0x00, 0x80, 0x30, 0x31,
        0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x01,
        0x00, 0xda, 0xff, 0x27, 0x9f, 0x4b, 0x44, 0x00, 0x00, 0x00, 0x01, 0x00, 0xfd, 0xff, 0x93,
        0x4f, 0x20, 0x45, 0x00, 0x00, 0x00, 0x01, 0x00, 0xfd, 0x61, 0x1d, 0x00, 0x01, 0x04, 0x7f,
        0x1c, 0x6c,
    ];

    #[test]
    fn header_values() {
        use Coding::*;
        assert_eq!(codings("gzip").unwrap(), [Gzip]);
        assert_eq!(codings(" X-GZIP ").unwrap(), [Gzip]);
        assert_eq!(codings("identity").unwrap(), []);
        assert_eq!(codings("").unwrap(), []);
        assert_eq!(codings("gzip, identity ,BR").unwrap(), [Gzip, Br]);
        assert_eq!(codings("deflate,zstd,").unwrap(), [Deflate, Zstd]);
        assert!(
            matches!(codings("gzip, compress"), Err(DecodeError::Unknown(c)) if c == "compress")
        );
        assert!(matches!(codings("gzip;q=1"), Err(DecodeError::Unknown(_))));
        assert!(matches!(
            codings("gzip, br, zstd"),
            Err(DecodeError::TooMany(3))
        ));
        assert!(matches!(
            codings("gzip,gzip,gzip,gzip"),
            Err(DecodeError::TooMany(4))
        ));
    }

    #[test]
    fn each_coding_round_trips_whole_and_byte_by_byte() {
        let plain = body(100_000);
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            let encoded = encode(coding, &plain);
            assert!(encoded.len() < plain.len() / 2, "{coding:?} compresses");
            for step in [encoded.len(), 1, 7, 4096] {
                let got = decode(&[coding], &encoded, step)
                    .unwrap_or_else(|e| panic!("{coding:?} step {step}: {e}"));
                assert!(got == plain, "{coding:?} step {step}");
            }
        }
    }

    #[test]
    fn deflate_accepts_raw_deflate_too() {
        let plain = body(10_000);
        for step in [1, 100_000] {
            assert_eq!(
                decode(&[Coding::Deflate], &raw_deflate(&plain), step).unwrap(),
                plain
            );
        }
    }

    #[test]
    fn gzip_members_are_all_decoded() {
        let mut two = gzip(b"first member\n");
        two.extend(gzip(b"second member\n"));
        for step in [1, 3, 1000] {
            assert_eq!(
                decode(&[Coding::Gzip], &two, step).unwrap(),
                b"first member\nsecond member\n"
            );
        }
    }

    #[test]
    fn reference_zstd_frames() {
        let hello = b"hello zstd, content-encoding test body\n".repeat(3);
        let hex = b"0123456789abcdef".repeat(20_000);
        for step in [1, 2, 5, 1000] {
            assert_eq!(decode(&[Coding::Zstd], ZSTD_HELLO, step).unwrap(), hello);
            assert_eq!(decode(&[Coding::Zstd], ZSTD_HEX, step).unwrap(), hex);
            // Two frames back to back, with a skippable frame between them.
            let mut frames = ZSTD_HELLO.to_vec();
            frames.extend([0x5a, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
            frames.extend(ZSTD_HEX);
            let mut both = hello.clone();
            both.extend(&hex);
            assert!(decode(&[Coding::Zstd], &frames, step).unwrap() == both);
        }
    }

    #[test]
    fn zstd_says_while_it_holds_decoded_bytes() {
        let mut d = Decoder::new(&[Coding::Zstd], Limits::default());
        let mut out = Vec::new();
        d.push(&ZSTD_HEX[..ZSTD_HEX.len() - 5], &mut out).unwrap();
        assert!(d.holds_output());
        d.push(&ZSTD_HEX[ZSTD_HEX.len() - 5..], &mut out).unwrap();
        assert!(!d.holds_output());
        assert_eq!(out.len(), 320_000);
        d.finish(&mut out).unwrap();
    }

    /// Letters from a linear congruential generator: compresses to about 60 %, so every
    /// encoded byte stands for a few decoded ones.
    fn noisy(len: usize) -> Vec<u8> {
        let mut x: u32 = 1;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                b'a' + (x >> 16) as u8 % 26
            })
            .collect()
    }

    #[test]
    fn gzip_and_brotli_give_out_what_they_decoded_at_once() {
        let plain = noisy(50_000);
        for coding in [Coding::Gzip, Coding::Br] {
            let encoded = encode(coding, &plain);
            let mut d = Decoder::new(&[coding], Limits::default());
            let mut out = Vec::new();
            d.push(&encoded[..encoded.len() - 12], &mut out).unwrap();
            assert!(!d.holds_output());
            assert!(out.len() > 40_000, "{coding:?} gave {}", out.len());
            assert_eq!(out, plain[..out.len()]);
        }
    }

    #[test]
    fn stacked_gzip_then_br() {
        let plain = body(30_000);
        // `Content-Encoding: gzip, br`: gzip applied first, then br.
        let encoded = br(&gzip(&plain));
        let order = codings("gzip, br").unwrap();
        for step in [1, 64, encoded.len()] {
            assert_eq!(decode(&order, &encoded, step).unwrap(), plain);
        }
        // The wrong order is a corrupt brotli stream.
        assert!(matches!(
            decode(&[Coding::Br, Coding::Gzip], &encoded, 64),
            Err(DecodeError::Corrupt { coding: "gzip", .. })
        ));
    }

    #[test]
    fn truncated_streams_are_refused() {
        let plain = body(20_000);
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            let encoded = encode(coding, &plain);
            for cut in [1, 2, 5, 10, encoded.len() / 2, encoded.len() - 1] {
                let r = decode(&[coding], &encoded[..cut], 3);
                assert!(
                    matches!(
                        r,
                        Err(DecodeError::Truncated(_) | DecodeError::Corrupt { .. })
                    ),
                    "{coding:?} cut at {cut}: {r:?}"
                );
            }
        }
        assert!(matches!(
            decode(&[Coding::Zstd], &ZSTD_HEX[..40], 1),
            Err(DecodeError::Truncated("zstd"))
        ));
        assert!(matches!(
            decode(&[Coding::Gzip], &gzip(&plain)[..100], 1),
            Err(DecodeError::Truncated("gzip"))
        ));
    }

    #[test]
    fn corrupt_streams_are_refused() {
        let plain = body(20_000);
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            let mut encoded = encode(coding, &plain);
            let mid = encoded.len() / 2;
            for b in &mut encoded[mid..mid + 16] {
                *b ^= 0x5a;
            }
            let r = decode(&[coding], &encoded, 1000);
            assert!(r.is_err(), "{coding:?}: {r:?}");
        }
        for coding in [Coding::Gzip, Coding::Br, Coding::Zstd] {
            let r = decode(&[coding], b"this is not compressed at all, just text", 8);
            assert!(
                matches!(r, Err(DecodeError::Corrupt { .. })),
                "{coding:?}: {r:?}"
            );
        }
        // Trailing bytes after the end of a zlib stream.
        let mut z = zlib(b"short");
        z.extend(b"junk");
        assert!(matches!(
            decode(&[Coding::Deflate], &z, 100),
            Err(DecodeError::Corrupt {
                coding: "deflate",
                ..
            })
        ));
        // A zstd frame asking for a 128 MiB window (window descriptor 0x88).
        let big_window = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x88, 0x01, 0x00, 0x00];
        assert!(matches!(
            decode(&[Coding::Zstd], &big_window, 100),
            Err(DecodeError::Corrupt { coding: "zstd", .. })
        ));
    }

    #[test]
    fn an_error_is_final() {
        let mut d = Decoder::new(&[Coding::Gzip], Limits::default());
        let mut out = Vec::new();
        assert!(d.push(b"this is not gzip at all", &mut out).is_err());
        assert!(matches!(
            d.push(&gzip(b"x"), &mut out),
            Err(DecodeError::Failed)
        ));
        assert!(matches!(d.finish(&mut out), Err(DecodeError::Failed)));
    }

    #[test]
    fn empty_body_is_fine_and_identity_copies() {
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Br, Coding::Zstd] {
            assert_eq!(decode(&[coding], b"", 1).unwrap(), b"");
        }
        assert_eq!(decode(&[], b"plain text", 3).unwrap(), b"plain text");
    }

    /// A gzip member of `len` zeros, built without holding the zeros.
    fn gzip_zeros(len: u64) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::best());
        let zeros = [0u8; 64 << 10];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            e.write_all(&zeros[..n]).unwrap();
            left -= n as u64;
        }
        e.finish().unwrap()
    }

    #[test]
    fn a_gigabyte_of_zeros_is_stopped_early() {
        let bomb = gzip_zeros(1 << 30);
        assert!(bomb.len() < 2 << 20, "{}", bomb.len());
        // Ratio first: zeros deflate at about 1000:1.
        let mut d = Decoder::new(&[Coding::Gzip], Limits::default());
        let mut out = Vec::new();
        let r = bomb.chunks(64 << 10).try_for_each(|c| d.push(c, &mut out));
        assert!(
            matches!(r, Err(DecodeError::Ratio { limit: 200, .. })),
            "{r:?}"
        );
        assert!(d.decoded() <= 2 << 20, "{}", d.decoded());
        assert!(out.len() <= 2 << 20);
        // Then the size cap, with the ratio out of the way.
        let limits = Limits {
            max_decoded: 8 << 20,
            max_ratio: u64::MAX,
        };
        let mut d = Decoder::new(&[Coding::Gzip], limits);
        let mut out = Vec::new();
        let r = d.push(&bomb, &mut out);
        assert!(
            matches!(r, Err(DecodeError::TooLarge { limit })  if limit == 8 << 20),
            "{r:?}"
        );
        assert!(out.len() <= 8 << 20);
        assert!(d.decoded() <= 8 << 20);
    }

    #[test]
    fn brotli_and_zstd_bombs_are_stopped_too() {
        let zeros = vec![0u8; 16 << 20];
        let limits = Limits {
            max_decoded: 4 << 20,
            max_ratio: 200,
        };
        for coding in [Coding::Br, Coding::Zstd] {
            let bomb = encode(coding, &zeros);
            let mut d = Decoder::new(&[coding], limits);
            let mut out = Vec::new();
            let r = d.push(&bomb, &mut out).and_then(|()| d.finish(&mut out));
            assert!(
                matches!(
                    r,
                    Err(DecodeError::Ratio { .. } | DecodeError::TooLarge { .. })
                ),
                "{coding:?}: {r:?}"
            );
            assert!(out.len() <= 4 << 20);
        }
        // Stacked: the inner gzip bomb under brotli.
        let bomb = br(&gzip_zeros(64 << 20));
        let mut d = Decoder::new(&[Coding::Gzip, Coding::Br], limits);
        let mut out = Vec::new();
        let r = d.push(&bomb, &mut out).and_then(|()| d.finish(&mut out));
        assert!(
            matches!(
                r,
                Err(DecodeError::Ratio { .. } | DecodeError::TooLarge { .. })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn small_bodies_may_exceed_the_ratio() {
        // 1 MiB of zeros is about 1 KiB of gzip: within the grace, so it decodes.
        let zeros = vec![0u8; 1 << 20];
        assert_eq!(decode(&[Coding::Gzip], &gzip(&zeros), 4096).unwrap(), zeros);
    }
}
