//! The byte-stream relay, for what is not HTTP: each direction is a loop of read, scan
//! ([`Scanner`]), write over the connection's plaintext (rustls or kernel TLS). A block
//! hit returns at once, which drops (and so closes) both connections without writing the
//! read that completed the marker; the end of one direction is passed on as a TLS
//! close_notify and a TCP half-close, and the other direction carries on until it ends
//! too. On kernel TLS a direction no detector needs to see is spliced in the kernel
//! instead ([`relay`], [`ktls::splice_direction`]): its plaintext never enters user space.

use std::{future::Future, pin::pin, sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{
    dlp::{Detectors, Scan, Scanner},
    ktls::{self, KtlsStream},
};

/// Which way bytes were going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the agent to the server.
    Up,
    /// From the server to the agent.
    Down,
}

impl Direction {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// A block detector's hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// Index of the detector in its direction's [`Detectors`].
    pub detector: usize,
    /// Where it was going.
    pub direction: Direction,
}

/// How a relay ended.
#[derive(Debug)]
pub struct RelayReport {
    /// Plaintext bytes written to the server.
    pub up_bytes: u64,
    /// Plaintext bytes written to the agent.
    pub down_bytes: u64,
    /// The block hit that closed the connections, if one did.
    pub hit: Option<Hit>,
    /// The first I/O error, if one ended the relay.
    pub error: Option<std::io::Error>,
    /// Of `up_bytes` and `down_bytes`, those spliced in the kernel.
    pub spliced_bytes: u64,
}

/// A stream the byte-stream relay can move: one on kernel TLS can give up its
/// [`KtlsStream`] for a splice.
pub trait RelayStream: AsyncRead + AsyncWrite + Unpin + Send + 'static + Sized {
    /// The kernel TLS stream under this one, with any bytes already read put back in
    /// front, or `self` when there is none.
    fn into_ktls(self) -> Result<KtlsStream, Self> {
        Err(self)
    }
}

impl RelayStream for KtlsStream {
    fn into_ktls(self) -> Result<KtlsStream, Self> {
        Ok(self)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> RelayStream
    for tokio_rustls::server::TlsStream<S>
{
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> RelayStream
    for tokio_rustls::client::TlsStream<S>
{
}

/// Relays between `agent` and `upstream` as [`userspace_relay`] does, except that on
/// kernel TLS a direction without detectors is spliced in the kernel.
pub async fn relay<A: RelayStream, U: RelayStream>(
    agent: A,
    upstream: U,
    up: Arc<Detectors>,
    down: Arc<Detectors>,
    on_flag: impl FnMut(usize, Direction),
) -> RelayReport {
    if !up.is_empty() && !down.is_empty() {
        return userspace_relay(agent, upstream, up, down, on_flag).await;
    }
    match (agent.into_ktls(), upstream.into_ktls()) {
        (Ok(agent), Ok(upstream)) => ktls_relay(agent, upstream, up, down, on_flag).await,
        (Ok(agent), Err(upstream)) => userspace_relay(agent, upstream, up, down, on_flag).await,
        (Err(agent), Ok(upstream)) => userspace_relay(agent, upstream, up, down, on_flag).await,
        (Err(agent), Err(upstream)) => userspace_relay(agent, upstream, up, down, on_flag).await,
    }
}

/// Both sides on kernel TLS, at least one direction without detectors: that direction is
/// spliced, the other pumped through the detectors.
async fn ktls_relay(
    agent: KtlsStream,
    upstream: KtlsStream,
    up: Arc<Detectors>,
    down: Arc<Detectors>,
    on_flag: impl FnMut(usize, Direction),
) -> RelayReport {
    let halves = agent
        .split()
        .and_then(|agent| Ok((agent, upstream.split()?)));
    let ((agent_read, agent_write), (upstream_read, upstream_write)) = match halves {
        Ok(halves) => halves,
        Err(e) => {
            return RelayReport {
                up_bytes: 0,
                down_bytes: 0,
                hit: None,
                error: Some(e),
                spliced_bytes: 0,
            };
        }
    };
    let (flags_tx, flags_rx) = tokio::sync::mpsc::unbounded_channel();
    let one_way = |from: KtlsStream,
                   mut to: KtlsStream,
                   detectors: Arc<Detectors>,
                   direction,
                   flags| async move {
        if detectors.is_empty() {
            let moved = ktls::splice_direction(&from, &mut to).await;
            match moved {
                Ok(bytes) => Pumped {
                    bytes,
                    how: PumpEnd::Eof,
                    spliced: true,
                },
                Err(e) => Pumped {
                    bytes: 0,
                    how: PumpEnd::Failed(std::io::Error::other(e)),
                    spliced: true,
                },
            }
        } else {
            pump(from, to, &detectors, direction, flags).await
        }
    };
    drive(
        one_way(
            agent_read,
            upstream_write,
            up,
            Direction::Up,
            flags_tx.clone(),
        ),
        one_way(upstream_read, agent_write, down, Direction::Down, flags_tx),
        flags_rx,
        on_flag,
    )
    .await
}

/// How long a sender may stay quiet with a block marker's prefix at the end of what it
/// sent before those bytes are released (see [`Scanner::release_held`]). Short: it only
/// delays messages that happen to end like the start of a marker.
pub(crate) const IDLE_RELEASE: Duration = Duration::from_millis(100);

/// Size of each read: TLS records carry at most 16 KiB, so this takes several at once
/// when they are buffered.
const READ_SIZE: usize = 64 * 1024;

/// Relays between `agent` and `upstream` until both directions end, or a `block` detector
/// hits (then both are closed): `up` is searched in what the agent sends, `down` in what
/// the server sends. `on_flag` is called for every flag hit as it happens, with the index
/// into that direction's detectors.
pub async fn userspace_relay<A, U>(
    agent: A,
    upstream: U,
    up: Arc<Detectors>,
    down: Arc<Detectors>,
    on_flag: impl FnMut(usize, Direction),
) -> RelayReport
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (agent_read, agent_write) = tokio::io::split(agent);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let (flags_tx, flags_rx) = tokio::sync::mpsc::unbounded_channel();
    drive(
        pump(
            agent_read,
            upstream_write,
            &up,
            Direction::Up,
            flags_tx.clone(),
        ),
        pump(upstream_read, agent_write, &down, Direction::Down, flags_tx),
        flags_rx,
        on_flag,
    )
    .await
}

/// Runs both directions until both end or one is blocked or fails, reporting flag hits as
/// they come.
async fn drive(
    up: impl Future<Output = Pumped>,
    down: impl Future<Output = Pumped>,
    mut flags_rx: tokio::sync::mpsc::UnboundedReceiver<(usize, Direction)>,
    mut on_flag: impl FnMut(usize, Direction),
) -> RelayReport {
    let mut up = pin!(up);
    let mut down = pin!(down);
    let mut report = RelayReport {
        up_bytes: 0,
        down_bytes: 0,
        hit: None,
        error: None,
        spliced_bytes: 0,
    };
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let (end, direction) = tokio::select! {
            Some((detector, direction)) = flags_rx.recv() => {
                on_flag(detector, direction);
                continue;
            }
            end = &mut up, if !up_done => { up_done = true; (end, Direction::Up) }
            end = &mut down, if !down_done => { down_done = true; (end, Direction::Down) }
        };
        match direction {
            Direction::Up => report.up_bytes = end.bytes,
            Direction::Down => report.down_bytes = end.bytes,
        }
        if end.spliced {
            report.spliced_bytes += end.bytes;
        }
        let stop = match end.how {
            PumpEnd::Eof => false,
            PumpEnd::Blocked(detector) => {
                report.hit = Some(Hit {
                    detector,
                    direction,
                });
                true
            }
            PumpEnd::Failed(e) => {
                report.error = Some(e);
                true
            }
        };
        if stop {
            break;
        }
    }
    // Flags found by the last reads, before the futures are dropped.
    while let Ok((detector, direction)) = flags_rx.try_recv() {
        on_flag(detector, direction);
    }
    report
}

enum PumpEnd {
    Eof,
    Blocked(usize),
    Failed(std::io::Error),
}

struct Pumped {
    bytes: u64,
    how: PumpEnd,
    /// Moved by the kernel, not through the detectors.
    spliced: bool,
}

/// One direction: read, scan, write, until the end of the stream or a block hit.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    detectors: &Detectors,
    direction: Direction,
    flags: tokio::sync::mpsc::UnboundedSender<(usize, Direction)>,
) -> Pumped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scanner: Scanner = detectors.scanner();
    let mut buf = vec![0u8; READ_SIZE];
    let mut bytes = 0u64;
    let how = loop {
        let read = if scanner.holding() {
            match tokio::time::timeout(IDLE_RELEASE, from.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => {
                    let held = scanner.release_held();
                    if let Err(e) = to.write_all(&held).await {
                        break PumpEnd::Failed(e);
                    }
                    bytes += held.len() as u64;
                    continue;
                }
            }
        } else {
            from.read(&mut buf).await
        };
        let n = match read {
            Ok(n) => n,
            // A peer that closes TCP without close_notify: the end of its stream all the
            // same (HTTP framing, not TLS, tells a client whether a response is complete).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => break PumpEnd::Failed(e),
        };
        if n == 0 {
            // The end resolves what only the end can (a secret whose trailing `\b` is the
            // end of the stream), then releases the rest.
            let held = match scanner.finish(detectors) {
                Scan::Pass { release, flagged } => {
                    for detector in flagged {
                        let _ = flags.send((detector, direction));
                    }
                    release
                }
                Scan::Block { detector, flagged } => {
                    for detector in flagged {
                        let _ = flags.send((detector, direction));
                    }
                    break PumpEnd::Blocked(detector);
                }
            };
            let result = async {
                to.write_all(&held).await?;
                to.shutdown().await
            }
            .await;
            bytes += held.len() as u64;
            break match result {
                Ok(()) => PumpEnd::Eof,
                Err(e) => PumpEnd::Failed(e),
            };
        }
        match scanner.feed(detectors, &buf[..n]) {
            Scan::Pass { release, flagged } => {
                for detector in flagged {
                    let _ = flags.send((detector, direction));
                }
                if let Err(e) = to.write_all(&release).await {
                    break PumpEnd::Failed(e);
                }
                bytes += release.len() as u64;
            }
            Scan::Block { detector, flagged } => {
                for detector in flagged {
                    let _ = flags.send((detector, direction));
                }
                break PumpEnd::Blocked(detector);
            }
        }
    };
    Pumped {
        bytes,
        how,
        spliced: false,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;
    use crate::policy::{Detector, DetectorAction, DetectorDirection, DetectorPattern};

    fn detectors() -> Arc<Detectors> {
        Arc::new(
            Detectors::new(&[
                Detector {
                    name: "key".into(),
                    pattern: DetectorPattern::Literal("sk-live-".into()),
                    direction: DetectorDirection::Both,
                    action: DetectorAction::Block,
                },
                Detector {
                    name: "mcp".into(),
                    pattern: DetectorPattern::Literal("tools/call".into()),
                    direction: DetectorDirection::Both,
                    action: DetectorAction::Flag,
                },
            ])
            .unwrap(),
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn clean_bytes_pass_both_ways_and_flags_are_reported() {
        let (agent, mut agent_peer) = duplex(1024);
        let (upstream, mut server_peer) = duplex(1024);
        let relay = tokio::spawn(async move {
            let mut flags = Vec::new();
            let report = userspace_relay(agent, upstream, detectors(), detectors(), |d, dir| {
                flags.push((d, dir))
            })
            .await;
            (report, flags)
        });
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down = b"{\"method\":\"tools/call\"} ends with sk".to_vec();
        let (up2, down2) = (up.clone(), down.clone());
        let client = tokio::spawn(async move {
            agent_peer.write_all(&up2).await.unwrap();
            agent_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            agent_peer.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        server_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up);
        server_peer.write_all(&down2).await.unwrap();
        server_peer.shutdown().await.unwrap();
        assert_eq!(client.await.unwrap(), down);
        let (report, flags) = relay.await.unwrap();
        assert_eq!(report.up_bytes, up.len() as u64);
        assert_eq!(report.down_bytes, down.len() as u64);
        assert!(report.hit.is_none() && report.error.is_none());
        assert_eq!(flags, vec![(1, Direction::Down)]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn block_closes_both_before_the_marker_passes() {
        let (agent, mut agent_peer) = duplex(1 << 20);
        let (upstream, mut server_peer) = duplex(1 << 20);
        let relay = tokio::spawn(userspace_relay(
            agent,
            upstream,
            detectors(),
            detectors(),
            |_, _| {},
        ));
        agent_peer.write_all(b"hello ").await.unwrap();
        agent_peer.write_all(b"token=sk-li").await.unwrap();
        agent_peer.write_all(b"ve-123 and more").await.unwrap();
        let report = relay.await.unwrap();
        assert_eq!(
            report.hit,
            Some(Hit {
                detector: 0,
                direction: Direction::Up
            })
        );
        let mut got = Vec::new();
        server_peer.read_to_end(&mut got).await.unwrap();
        assert!(
            got.len() <= b"hello token=".len() && b"hello token=".starts_with(&got),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        // The agent's side is closed too.
        let mut rest = Vec::new();
        assert_eq!(agent_peer.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
