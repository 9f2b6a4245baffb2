//! The kTLS record layer: hand a finished rustls session's keys to the kernel. After both
//! handshakes of a proxied connection, rustls gives up what it still has to send, the
//! plaintext it already decrypted and its traffic secrets (`Side::take`); the socket
//! gets the `tls` ULP and those secrets as `TLS_TX`/`TLS_RX` crypto info
//! (`Side::enable_ktls`), and from then on the kernel encrypts and decrypts its records.
//! The proxy reads and writes the plaintext through [`KtlsStream`]s ([`hand_off`]), so
//! the detectors and the HTTP layer see the same bytes as over rustls.
//!
//! - **Which connections.** [`KernelTls::probe`] asks the kernel once, at start, which
//!   (TLS version, cipher) pairs it takes as keys in both directions; [`KernelTls::admit`]
//!   checks a connection's pair on both sides and sets the ULP (which changes nothing
//!   until keys are set) before rustls gives up its secrets, so a connection the kernel
//!   cannot take stays on rustls whole ([`Fallback`]).
//!
//! - **Handshake boundary.** Kernel TLS must start at a record boundary, and rustls keeps a
//!   partial record it read past the handshake in a buffer it cannot hand over.
//!   [`HandshakeCork`] never reads past the end of a record, so only whole records can be
//!   already decrypted; tokio-rustls's handshake loop reads on while the session wants to
//!   read, so one application record per connection may be
//!   ([`SpliceReport::user_space_bytes`]).
//! - **splice(2) from a kTLS RX socket into a kTLS TX socket.** `tls_sw_splice_read`
//!   (Linux 4.17+) hands decrypted record pages to a pipe; splicing the pipe into the other
//!   socket goes through kTLS TX (`tls_sw_sendpage` on 6.1, `MSG_SPLICE_PAGES` on 6.5+), so
//!   the plaintext moves page to page inside the kernel. The bytes pass uninspected, so the
//!   relay is reachable only through `splice_uninspected`, behind the
//!   `ktls-transport-test` feature that only the tests enable.
//! - **Control records stay in user space.** `recvmsg` with `TLS_GET_RECORD_TYPE` names
//!   each record's type (splice refuses non-data records with `EINVAL`, leaving them
//!   queued): session tickets are dropped, `close_notify` ends the read side (and is sent
//!   as an alert record on shutdown). A TLS 1.3 KeyUpdate ends the connection with an
//!   error: Linux 6.1 kTLS cannot rekey RX (6.13 can).
//!
//! The sockmap inspector that ran the detectors on kTLS plaintext as an `sk_msg` program
//! was removed: Linux refuses kTLS keys on any socket in a sockmap ("tls: reject the
//! combination of TLS and sockmap", backported to Debian's 6.1 and 6.12), and upstream
//! removed the code that ran `sk_msg` programs on TLS plaintext (see ARCHITECTURE.md).
//!
//! Minimum kernel: 4.17 (`tls_sw_splice_read`), TLS 1.3 RX offload 5.2.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::c_void,
    io::{self, Read as _},
    mem::size_of,
    os::fd::{AsRawFd, RawFd},
};

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per splice call: one full TLS record.
const SPLICE_CHUNK: usize = 16 * 1024;

/// What a relay through kTLS moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpliceReport {
    /// Plaintext bytes sent upstream.
    pub up_bytes: u64,
    /// Plaintext bytes sent to the agent.
    pub down_bytes: u64,
    /// Plaintext bytes user space handled: what rustls had already decrypted before the
    /// hand-off. Everything else stayed in the kernel.
    pub user_space_bytes: u64,
}

/// Errors of the kTLS hand-off.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel cannot do kernel TLS.
    #[error("kernel has no kTLS (CONFIG_TLS): {detail}")]
    NoKtls {
        /// What failed.
        detail: String,
    },
    /// rustls refused to hand out the session's secrets.
    #[error("extracting the {side} connection's TLS secrets")]
    Secrets {
        /// `agent` or `upstream`.
        side: &'static str,
        /// The cause (e.g. `enable_secret_extraction` not set).
        #[source]
        source: rustls::Error,
    },
    /// The negotiated TLS version or cipher suite has no kTLS equivalent here.
    #[error("the {side} connection uses {what}, which kernel TLS offload does not support")]
    Unsupported {
        /// `agent` or `upstream`.
        side: &'static str,
        /// The version or suite.
        what: String,
    },
    /// A system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The peer sent something the kernel relay cannot handle.
    #[error("{side} connection: {message}")]
    Protocol {
        /// `agent` or `upstream`.
        side: &'static str,
        /// What arrived.
        message: String,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> KtlsError {
    move |source| KtlsError::Io { what, source }
}

/// Takes over both TLS sessions after their handshakes and relays in the kernel until both
/// directions close: flush what rustls still has to send, take the plaintext rustls already
/// decrypted, extract the secrets; TLS ULP, TX and RX keys on each socket; write the taken
/// plaintext through kTLS; then splice each direction RX → pipe → TX. Bytes pass
/// uninspected, hence only behind the `ktls-transport-test` feature, which only the tests
/// enable (the transport tested and measured on its own).
///
/// The TLS streams must come straight from the handshake: rustls must not have read part of
/// a record past it (see [`HandshakeCork`]).
#[cfg(feature = "ktls-transport-test")]
pub async fn splice_uninspected<A, U>(
    agent: tokio_rustls::server::TlsStream<A>,
    upstream: tokio_rustls::client::TlsStream<U>,
) -> Result<SpliceReport, KtlsError>
where
    A: IntoTcp,
    U: IntoTcp,
{
    probe_ktls()?;
    let (agent_io, agent_conn) = agent.into_inner();
    let (upstream_io, upstream_conn) = upstream.into_inner();
    let agent = Side::take(agent_io.into_tcp()?, agent_conn.into(), "agent").await?;
    let upstream = Side::take(upstream_io.into_tcp()?, upstream_conn.into(), "upstream").await?;
    agent.enable_ktls()?;
    upstream.enable_ktls()?;

    let relayed = async {
        // Plaintext rustls decrypted before the hand-off: the agent's goes up, upstream's
        // goes down.
        write_all(&upstream, &agent.taken).await?;
        write_all(&agent, &upstream.taken).await?;
        tokio::try_join!(
            relay(&agent, &upstream, agent.closed),
            relay(&upstream, &agent, upstream.closed)
        )
    }
    .await;
    match relayed {
        Ok((up, down)) => Ok(SpliceReport {
            up_bytes: agent.taken.len() as u64 + up,
            down_bytes: upstream.taken.len() as u64 + down,
            user_space_bytes: (agent.taken.len() + upstream.taken.len()) as u64,
        }),
        Err(e) => {
            // A relay cut midway (a KeyUpdate, an unexpected alert, a failed splice) aborts
            // both connections, so neither peer can take the cut for an orderly end.
            agent.reset();
            upstream.reset();
            Err(e)
        }
    }
}

/// Sets the `tls` ULP on a loopback TCP socket: the only reliable test (the module may be
/// loadable but not loaded, and `/proc/sys/net/ipv4/tcp_available_ulp` lists only loaded
/// ULPs).
fn probe_ktls() -> Result<(), KtlsError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(io_err("binding a loopback socket to probe for kTLS"))?;
    let addr = listener.local_addr().map_err(io_err("probing for kTLS"))?;
    let client = std::net::TcpStream::connect(addr)
        .map_err(io_err("connecting on loopback to probe kTLS"))?;
    let _server = listener
        .accept()
        .map_err(io_err("accepting the kTLS probe"))?;
    set_ulp(client.as_raw_fd()).map_err(|e| KtlsError::NoKtls {
        detail: format!(
            "setting the \"tls\" TCP ULP failed: {e} (kernel TLS needs Linux 4.13+ built with \
             CONFIG_TLS)"
        ),
    })
}

fn set_ulp(fd: RawFd) -> io::Result<()> {
    const TLS: &[u8] = b"tls";
    // SAFETY: fd is an open socket; the option value is a valid buffer of that length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_TCP,
            libc::TCP_ULP,
            TLS.as_ptr().cast(),
            TLS.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The AEAD of a TLS session, as kernel TLS names its crypto info.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cipher {
    /// AES-128-GCM (`TLS_CIPHER_AES_GCM_128`, Linux 4.13).
    Aes128Gcm,
    /// AES-256-GCM (`TLS_CIPHER_AES_GCM_256`, Linux 5.1).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (`TLS_CIPHER_CHACHA20_POLY1305`, Linux 5.11).
    Chacha20Poly1305,
}

impl Cipher {
    const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::Chacha20Poly1305,
    ];

    /// The AEAD of a rustls cipher suite (TLS 1.2 and 1.3 suites name it alike).
    pub fn of(suite: rustls::SupportedCipherSuite) -> Option<Cipher> {
        let name = suite.suite().as_str()?;
        if name.contains("AES_128_GCM") {
            Some(Cipher::Aes128Gcm)
        } else if name.contains("AES_256_GCM") {
            Some(Cipher::Aes256Gcm)
        } else if name.contains("CHACHA20_POLY1305") {
            Some(Cipher::Chacha20Poly1305)
        } else {
            None
        }
    }

    /// The name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// Why a connection stays on rustls, as `reason` of
/// `enforcer_inspect_record_layer_total{layer="rustls"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fallback {
    /// `[inspect] record_layer = "rustls"`.
    Configured,
    /// The kernel has no kTLS (no `CONFIG_TLS`, or the module is not loaded).
    NoKernelTls,
    /// A side negotiated a TLS version or cipher the kernel takes no keys for.
    Cipher,
    /// The kernel refused the `tls` ULP on a side's socket (the peer had already closed
    /// it, for one).
    Ulp,
}

impl Fallback {
    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Fallback::Configured => "configured",
            Fallback::NoKernelTls => "no_ktls",
            Fallback::Cipher => "cipher",
            Fallback::Ulp => "ulp",
        }
    }
}

/// The (TLS version, cipher) pairs this kernel takes as kTLS keys, in both directions:
/// what [`KernelTls::probe`] found by setting keys on loopback sockets, the only exact
/// test (kernels differ by version, configuration and backports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTls {
    pairs: BTreeSet<(u16, Cipher)>,
}

impl KernelTls {
    /// Sets the ULP and zero keys, TX and RX, for each version and cipher on fresh
    /// loopback sockets. `NoKtls` if the kernel has no kTLS or takes none of them.
    pub fn probe() -> Result<KernelTls, KtlsError> {
        probe_ktls()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(io_err("binding a loopback socket to probe kTLS ciphers"))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("probing kTLS ciphers"))?;
        let mut pairs = BTreeSet::new();
        for version in [ProtocolVersion::TLSv1_2, ProtocolVersion::TLSv1_3] {
            for cipher in Cipher::ALL {
                let client = std::net::TcpStream::connect(addr)
                    .map_err(io_err("connecting on loopback to probe kTLS ciphers"))?;
                let _server = listener
                    .accept()
                    .map_err(io_err("accepting the kTLS cipher probe"))?;
                let fd = client.as_raw_fd();
                let info = CryptoInfo::zero(version, cipher);
                let takes = set_ulp(fd).is_ok()
                    && [libc::TLS_TX, libc::TLS_RX]
                        .into_iter()
                        .all(|option| set_crypto_info(fd, option, &info).is_ok());
                if takes {
                    pairs.insert((u16::from(version), cipher));
                }
            }
        }
        if pairs.is_empty() {
            return Err(KtlsError::NoKtls {
                detail: "the kernel takes no TLS 1.2 or 1.3 keys for AES-GCM or \
                         ChaCha20-Poly1305"
                    .into(),
            });
        }
        Ok(KernelTls { pairs })
    }

    /// What the kernel takes, for the log line at start: `TLS1.3 AES-128-GCM, ...`.
    pub fn describe(&self) -> String {
        self.pairs
            .iter()
            .map(|(version, cipher)| {
                let version = if *version == u16::from(ProtocolVersion::TLSv1_3) {
                    "TLS1.3"
                } else {
                    "TLS1.2"
                };
                format!("{version} {}", cipher.name())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether both sessions of a proxied connection can move to the kernel, and if so
    /// sets the `tls` ULP on both sockets (without keys the socket behaves as before, so
    /// a refusal here leaves the connection whole on rustls).
    pub fn admit(
        &self,
        agent: &tokio_rustls::server::TlsStream<HandshakeCork>,
        upstream: &tokio_rustls::client::TlsStream<HandshakeCork>,
    ) -> Result<(), Fallback> {
        let takes = |state: &rustls::CommonState| {
            let (Some(version), Some(suite)) =
                (state.protocol_version(), state.negotiated_cipher_suite())
            else {
                return false;
            };
            Cipher::of(suite).is_some_and(|c| self.pairs.contains(&(u16::from(version), c)))
        };
        let (agent_io, agent_state) = agent.get_ref();
        let (upstream_io, upstream_state) = upstream.get_ref();
        if !takes(agent_state) || !takes(upstream_state) {
            return Err(Fallback::Cipher);
        }
        for io in [agent_io, upstream_io] {
            set_ulp(io.tcp.as_raw_fd()).map_err(|_| Fallback::Ulp)?;
        }
        Ok(())
    }
}

/// The kernel's TLS counters of this network namespace (`/proc/net/tls_stat`, Linux
/// 5.7+): sockets set up with software crypto (`TlsTxSw`, `TlsRxSw`) or a NIC's offload
/// (`TlsTxDevice`, `TlsRxDevice`), open now (`TlsCurr*`), and records that failed to
/// decrypt (`TlsDecryptError`). `None` where the file is missing (no kTLS, or older).
pub fn kernel_counters() -> Option<BTreeMap<String, u64>> {
    parse_counters(&std::fs::read_to_string("/proc/net/tls_stat").ok()?)
}

fn parse_counters(text: &str) -> Option<BTreeMap<String, u64>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_string();
            let value = fields.next()?.parse().ok()?;
            Some((name, value))
        })
        .collect()
}

/// Hands both sessions of a proxied connection to the kernel, after [`KernelTls::admit`]:
/// flush what rustls still has to send, take the plaintext it already decrypted and its
/// secrets, set the keys. From here the connection's plaintext is read and written through
/// the two [`KtlsStream`]s. A failure leaves no usable connection (rustls gave up its
/// secrets), so both sockets are reset.
pub async fn hand_off(
    agent: tokio_rustls::server::TlsStream<HandshakeCork>,
    upstream: tokio_rustls::client::TlsStream<HandshakeCork>,
) -> Result<(KtlsStream, KtlsStream), KtlsError> {
    let (agent_io, agent_conn) = agent.into_inner();
    let (upstream_io, upstream_conn) = upstream.into_inner();
    let agent = Side::take(agent_io.into_tcp()?, agent_conn.into(), "agent").await?;
    let upstream = Side::take(upstream_io.into_tcp()?, upstream_conn.into(), "upstream").await?;
    if let Err(e) = agent.enable_ktls().and_then(|()| upstream.enable_ktls()) {
        agent.reset();
        upstream.reset();
        return Err(e);
    }
    Ok((KtlsStream::new(agent), KtlsStream::new(upstream)))
}

/// The plaintext of one kTLS socket: reads decrypt in the kernel (`recvmsg`, with the
/// record type in a control message), writes encrypt in the kernel. Reads first hand out
/// what rustls had decrypted before the hand-off. `close_notify` from the peer reads as
/// the end of the stream; a FIN without it is an `UnexpectedEof` error, as rustls reports.
/// Shutdown sends `close_notify`, then a FIN.
#[derive(Debug)]
pub struct KtlsStream {
    tcp: TcpStream,
    side: &'static str,
    /// Plaintext to hand out before reading the socket again: what rustls had decrypted,
    /// or the rest of a record read for a caller's small buffer.
    pending: Vec<u8>,
    at: usize,
    /// `close_notify` arrived: reads end once `pending` is out.
    read_closed: bool,
    /// `close_notify` was sent.
    write_closed: bool,
    /// The read half of [`KtlsStream::split`]: writes and shutdown belong to the other.
    read_half: bool,
}

/// The largest TLS record plaintext, and some room: a read buffer of this size takes any
/// record whole, so a control record is never cut.
const RECORD_ROOM: usize = 16 * 1024 + 256;

impl KtlsStream {
    fn new(side: Side) -> KtlsStream {
        KtlsStream {
            tcp: side.tcp,
            side: side.name,
            pending: side.taken,
            at: 0,
            read_closed: side.closed,
            write_closed: false,
            read_half: false,
        }
    }

    /// `agent` or `upstream`.
    pub fn side(&self) -> &'static str {
        self.side
    }

    /// Puts bytes already read from this stream back in front of what reads return next.
    pub fn unread(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            let mut pending = bytes.to_vec();
            pending.extend_from_slice(&self.pending[self.at..]);
            self.pending = pending;
            self.at = 0;
        }
    }

    /// Two handles on the one socket (a duplicated descriptor: kTLS state belongs to the
    /// socket), so one direction can be spliced in the kernel while the other is read in
    /// user space: the first reads (it holds what rustls had decrypted), the second
    /// writes and reads nothing.
    pub fn split(self) -> io::Result<(KtlsStream, KtlsStream)> {
        let std = self.tcp.into_std()?;
        let writer = TcpStream::from_std(std.try_clone()?)?;
        let reader = KtlsStream {
            tcp: TcpStream::from_std(std)?,
            read_half: true,
            ..self
        };
        let writer = KtlsStream {
            tcp: writer,
            side: reader.side,
            pending: Vec::new(),
            at: 0,
            read_closed: true,
            write_closed: false,
            read_half: false,
        };
        Ok((reader, writer))
    }
}

impl tokio::io::AsyncRead for KtlsStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.at);
                buf.put_slice(&this.pending[this.at..this.at + n]);
                this.at += n;
                if this.at == this.pending.len() {
                    this.pending.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(this.tcp.poll_read_ready(cx))?;
            // A buffer that takes any record whole is read into directly; a smaller one
            // through `pending`, so a control record is never cut.
            let direct = buf.remaining() >= RECORD_ROOM;
            if !direct {
                this.pending.resize(RECORD_ROOM, 0);
            }
            let fd = this.tcp.as_raw_fd();
            let received = this.tcp.try_io(Interest::READABLE, || {
                if direct {
                    // SAFETY: recvmsg only writes into the unfilled part; we mark as
                    // filled only what it wrote.
                    let unfilled = unsafe { buf.unfilled_mut() };
                    recv_record(fd, unfilled.as_mut_ptr().cast(), unfilled.len())
                } else {
                    recv_record(fd, this.pending.as_mut_ptr(), this.pending.len())
                }
            });
            let (n, record_type) = match received {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !direct {
                        this.pending.clear();
                    }
                    continue;
                }
                Err(e) => {
                    if !direct {
                        this.pending.clear();
                    }
                    return Poll::Ready(Err(e));
                }
            };
            let body: &[u8] = if direct {
                // SAFETY: recvmsg wrote n bytes at the start of the unfilled part.
                unsafe { std::slice::from_raw_parts(buf.unfilled_mut().as_ptr().cast(), n) }
            } else {
                &this.pending[..n]
            };
            match classify(this.side, record_type, body) {
                Ok(Record::Data) if n == 0 => {
                    this.pending.clear();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} closed the connection without close_notify", this.side),
                    )));
                }
                Ok(Record::Data) => {
                    if direct {
                        // SAFETY: the kernel initialized these n bytes.
                        unsafe { buf.assume_init(n) };
                        buf.advance(n);
                    } else {
                        this.pending.truncate(n);
                    }
                    if direct {
                        return Poll::Ready(Ok(()));
                    }
                }
                Ok(Record::Ignore) => this.pending.clear(),
                Ok(Record::CloseNotify) => {
                    this.pending.clear();
                    this.read_closed = true;
                }
                Err(e) => {
                    this.pending.clear();
                    return Poll::Ready(Err(io::Error::other(e)));
                }
            }
        }
    }
}

fn read_half_written() -> io::Error {
    io::Error::other("writing to the read half of a split kTLS stream")
}

impl tokio::io::AsyncWrite for KtlsStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if self.read_half {
            return std::task::Poll::Ready(Err(read_half_written()));
        }
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        if self.read_half {
            return std::task::Poll::Ready(Err(read_half_written()));
        }
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        // Each write is a record the kernel has already taken.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read_half {
            // The write half ends the direction; this one must not half-close the socket.
            return std::task::Poll::Ready(Ok(()));
        }
        while !this.write_closed {
            std::task::ready!(this.tcp.poll_write_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            match this
                .tcp
                .try_io(Interest::WRITABLE, || send_close_notify(fd))
            {
                Ok(()) => this.write_closed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer is gone: the FIN (or the reset) ends the direction anyway.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                    this.write_closed = true;
                }
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
        std::pin::Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// The transport under a TLS stream the kTLS hand-off accepts: a plain tokio
/// `TcpStream`, or one wrapped in [`HandshakeCork`].
pub trait IntoTcp: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    /// The socket.
    fn into_tcp(self) -> Result<TcpStream, KtlsError>;
}

impl IntoTcp for TcpStream {
    fn into_tcp(self) -> Result<TcpStream, KtlsError> {
        Ok(self)
    }
}

/// A `TcpStream` that never reads past the end of a TLS record, so when the handshake
/// completes rustls holds no partial record of application data: the next byte in the
/// socket is the start of a record, which is where kernel TLS must start. (rustls reads in
/// 4 KiB chunks and keeps a partial record in a buffer it cannot hand over.) Use it under
/// the acceptor and the connector of connections that may be spliced.
pub struct HandshakeCork {
    tcp: TcpStream,
    /// Reads stop at record boundaries; off once the connection stays on rustls.
    corked: bool,
    /// Bytes left in the current record; 0 at a record boundary.
    left: usize,
    /// Header bytes read so far (a header may arrive in pieces).
    header: [u8; 5],
    header_len: usize,
}

impl HandshakeCork {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            corked: true,
            left: 0,
            header: [0; 5],
            header_len: 0,
        }
    }

    /// Reads pass straight through from now on: for a connection that stays on rustls,
    /// which then reads in large chunks again.
    pub fn uncork(&mut self) {
        self.corked = false;
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl IntoTcp for HandshakeCork {
    fn into_tcp(self) -> Result<TcpStream, KtlsError> {
        if self.header_len != 0 || self.left != 0 {
            return Err(KtlsError::Protocol {
                side: "handed-over",
                message: "the TLS stream stopped inside a record".into(),
            });
        }
        Ok(self.tcp)
    }
}

impl tokio::io::AsyncRead for HandshakeCork {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if !this.corked && this.left == 0 && this.header_len == 0 {
            return std::pin::Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        if this.left == 0 {
            // At a boundary: read the header alone, then hand it out.
            while this.header_len < 5 {
                let mut hb = tokio::io::ReadBuf::new(&mut this.header[this.header_len..]);
                match std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut hb) {
                    Poll::Ready(Ok(())) if hb.filled().is_empty() => {
                        // EOF: give out a partial header so rustls sees the truncation.
                        let n = this.header_len.min(buf.remaining());
                        buf.put_slice(&this.header[..n]);
                        this.header_len = 0;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(())) => this.header_len += hb.filled().len(),
                    other => return other,
                }
            }
            if buf.remaining() < 5 {
                return Poll::Ready(Err(io::Error::other("read buffer under 5 bytes")));
            }
            buf.put_slice(&this.header);
            this.left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
            this.header_len = 0;
            return Poll::Ready(Ok(()));
        }
        let want = this.left.min(buf.remaining());
        let mut limited = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(want));
        let poll = std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut limited);
        if let Poll::Ready(Ok(())) = poll {
            let n = limited.filled().len();
            buf.advance(n);
            this.left -= n;
        }
        poll
    }
}

impl tokio::io::AsyncWrite for HandshakeCork {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// One connection being handed to the kernel.
struct Side {
    tcp: TcpStream,
    name: &'static str,
    version: ProtocolVersion,
    tx: (u64, ConnectionTrafficSecrets),
    rx: (u64, ConnectionTrafficSecrets),
    /// Application plaintext rustls had already decrypted.
    taken: Vec<u8>,
    /// The peer had already sent close_notify.
    closed: bool,
}

impl Side {
    async fn take(
        tcp: TcpStream,
        mut conn: rustls::Connection,
        name: &'static str,
    ) -> Result<Self, KtlsError> {
        // rustls refuses to give the secrets while it has records to send (the server's
        // session tickets, typically).
        while conn.wants_write() {
            tcp.writable()
                .await
                .map_err(io_err("waiting to flush TLS records"))?;
            match conn.write_tls(&mut TryWriter(&tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io_err("flushing TLS records before the hand-off")(e)),
            }
        }
        let mut taken = Vec::new();
        let closed = match conn.reader().read_to_end(&mut taken) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => return Err(io_err("taking the plaintext rustls buffered")(e)),
        };
        let version = conn.protocol_version().ok_or_else(|| KtlsError::Protocol {
            side: name,
            message: "handshake not complete".into(),
        })?;
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|source| KtlsError::Secrets { side: name, source })?;
        Ok(Self {
            tcp,
            name,
            version,
            tx: secrets.tx,
            rx: secrets.rx,
            taken,
            closed,
        })
    }

    fn enable_ktls(&self) -> Result<(), KtlsError> {
        let fd = self.tcp.as_raw_fd();
        // [`KernelTls::admit`] may have set it already.
        match set_ulp(fd) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(KtlsError::NoKtls {
                    detail: format!("setting the \"tls\" ULP on the {} socket: {e}", self.name),
                });
            }
            _ => {}
        }
        for (option, (seq, secrets), what) in [
            (libc::TLS_TX, &self.tx, "setting kTLS TX keys"),
            (libc::TLS_RX, &self.rx, "setting kTLS RX keys"),
        ] {
            let info = CryptoInfo::new(self.version, *seq, secrets, self.name)?;
            set_crypto_info(fd, option, &info).map_err(io_err(what))?;
        }
        if self.version == ProtocolVersion::TLSv1_3 {
            // TLS 1.3 records may carry padding after the content type, so the kernel
            // decrypts into a buffer of its own to find the type. Peers that never pad
            // (rustls, OpenSSL, Go, BoringSSL by default) let it decrypt straight into the
            // reader's buffer (Linux 6.0+); a padded record is still read right, after a
            // retry the kernel counts (TlsRxNoPadViolation). Older kernels refuse the
            // option and keep the copy.
            let on: libc::c_int = 1;
            // SAFETY: fd is our socket; the value is a valid int of that size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_TLS,
                    libc::TLS_RX_EXPECT_NO_PAD,
                    (&raw const on).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Ok(())
    }

    /// Aborts the connection: close with a zero linger sends an RST.
    fn reset(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and option buffer. Failure leaves an orderly close, which is
        // still a close.
        unsafe {
            libc::setsockopt(
                self.tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::shutdown(self.tcp.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

/// `io::Write` over a non-blocking tokio socket, for rustls's `write_tls`.
struct TryWriter<'a>(&'a TcpStream);

impl io::Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// kTLS's crypto-info structs, by cipher.
enum CryptoInfo {
    Aes128(libc::tls12_crypto_info_aes_gcm_128),
    Aes256(libc::tls12_crypto_info_aes_gcm_256),
    Chacha(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    fn new(
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
        side: &'static str,
    ) -> Result<Self, KtlsError> {
        let version = match version {
            ProtocolVersion::TLSv1_2 => libc::TLS_1_2_VERSION,
            ProtocolVersion::TLSv1_3 => libc::TLS_1_3_VERSION,
            other => {
                return Err(KtlsError::Unsupported {
                    side,
                    what: format!("{other:?}"),
                });
            }
        };
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => {
                return Err(KtlsError::Unsupported {
                    side,
                    what: "a cipher suite newer than this code".into(),
                });
            }
        };
        Self::from_parts(version, seq, cipher, key.as_ref(), iv.as_ref())
            .ok_or_else(|| bad_key(side))
    }

    /// The struct for `cipher` with `key` and the 12-byte nonce base `iv`; `None` when a
    /// length is not the cipher's.
    fn from_parts(
        version: u16,
        seq: u64,
        cipher: Cipher,
        key: &[u8],
        iv: &[u8],
    ) -> Option<CryptoInfo> {
        let rec_seq = seq.to_be_bytes();
        let iv: &[u8; 12] = iv.try_into().ok()?;
        // For AES-GCM the 12-byte nonce base is a 4-byte salt and an 8-byte IV in kTLS's
        // terms, in both TLS 1.2 (implicit salt) and 1.3; ChaCha20 takes all 12 as IV.
        let (salt, explicit) = (iv[..4].try_into().ok()?, iv[4..].try_into().ok()?);
        Some(match cipher {
            Cipher::Aes128Gcm => Self::Aes128(libc::tls12_crypto_info_aes_gcm_128 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_128,
                },
                iv: explicit,
                key: key.try_into().ok()?,
                salt,
                rec_seq,
            }),
            Cipher::Aes256Gcm => Self::Aes256(libc::tls12_crypto_info_aes_gcm_256 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_AES_GCM_256,
                },
                iv: explicit,
                key: key.try_into().ok()?,
                salt,
                rec_seq,
            }),
            Cipher::Chacha20Poly1305 => Self::Chacha(libc::tls12_crypto_info_chacha20_poly1305 {
                info: libc::tls_crypto_info {
                    version,
                    cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305,
                },
                iv: *iv,
                key: key.try_into().ok()?,
                salt: [],
                rec_seq,
            }),
        })
    }

    /// Zero keys for `version` and `cipher`: what [`KernelTls::probe`] offers the kernel.
    fn zero(version: ProtocolVersion, cipher: Cipher) -> CryptoInfo {
        let version = if version == ProtocolVersion::TLSv1_3 {
            libc::TLS_1_3_VERSION
        } else {
            libc::TLS_1_2_VERSION
        };
        let key_len = if cipher == Cipher::Aes128Gcm { 16 } else { 32 };
        Self::from_parts(version, 0, cipher, &[0; 32][..key_len], &[0; 12])
            .expect("zero keys have the cipher's lengths")
    }

    fn as_raw(&self) -> (*const c_void, libc::socklen_t) {
        fn raw<T>(v: &T) -> (*const c_void, libc::socklen_t) {
            (
                std::ptr::from_ref(v).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        }
        match self {
            Self::Aes128(i) => raw(i),
            Self::Aes256(i) => raw(i),
            Self::Chacha(i) => raw(i),
        }
    }
}

/// `setsockopt(SOL_TLS, TLS_TX or TLS_RX)` with `info`.
fn set_crypto_info(fd: RawFd, option: libc::c_int, info: &CryptoInfo) -> io::Result<()> {
    let (ptr, len) = info.as_raw();
    // SAFETY: fd is a socket; ptr/len describe the crypto-info struct `info`.
    if unsafe { libc::setsockopt(fd, libc::SOL_TLS, option, ptr, len) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn bad_key(side: &'static str) -> KtlsError {
    KtlsError::Protocol {
        side,
        message: "traffic key of unexpected length".into(),
    }
}

#[cfg(feature = "ktls-transport-test")]
/// Writes user-space plaintext into a kTLS socket.
async fn write_all(to: &Side, mut bytes: &[u8]) -> Result<(), KtlsError> {
    while !bytes.is_empty() {
        to.tcp
            .writable()
            .await
            .map_err(io_err("waiting to write"))?;
        match to.tcp.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err("writing buffered plaintext into kTLS")(e)),
        }
    }
    Ok(())
}

/// A pipe, both ends non-blocking.
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

impl Pipe {
    fn new() -> Result<Self, KtlsError> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid out-array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io_err("creating a splice pipe")(io::Error::last_os_error()));
        }
        use std::os::fd::{FromRawFd as _, OwnedFd};
        // SAFETY: pipe2 returned two fresh descriptors we now own.
        Ok(unsafe {
            Self {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let flags =
        libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
    // SAFETY: plain fds, null offsets (both are a socket or a pipe).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(feature = "ktls-transport-test")]
/// One direction of `splice_uninspected`: the kernel splice, then `close_notify` if the
/// sender sent one, and a half-close.
async fn relay(from: &Side, to: &Side, already_closed: bool) -> Result<u64, KtlsError> {
    let (moved, close_notify) = if already_closed {
        (0, true)
    } else {
        splice_loop(&from.tcp, from.name, &to.tcp).await?
    };
    let to_fd = to.tcp.as_raw_fd();
    if close_notify {
        match send_close_notify(to_fd) {
            // The peer may be gone already; the FIN that follows still ends the direction.
            Err(e) if !matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                return Err(io_err("sending close_notify through kTLS")(e));
            }
            _ => {}
        }
    }
    // SAFETY: our socket; half-close so the peer sees the end of this direction only.
    unsafe { libc::shutdown(to_fd, libc::SHUT_WR) };
    Ok(moved)
}

/// Moves one direction in the kernel until the sender's end: RX socket → pipe → TX socket,
/// a record at a time, the plaintext never entering user space. Returns the bytes moved and
/// whether the end was a `close_notify` (rather than a FIN without one).
async fn splice_loop(
    from: &TcpStream,
    from_side: &'static str,
    to: &TcpStream,
) -> Result<(u64, bool), KtlsError> {
    let pipe = Pipe::new()?;
    let mut moved = 0u64;
    let (from_fd, to_fd) = (from.as_raw_fd(), to.as_raw_fd());
    loop {
        let got = from
            .async_io(Interest::READABLE, || {
                splice(from_fd, pipe.write.as_raw_fd(), SPLICE_CHUNK, false)
            })
            .await;
        let mut left = match got {
            Ok(0) => return Ok((moved, false)),
            Ok(n) => n,
            // splice refuses non-data records, leaving them queued.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                match read_control(from, from_side)? {
                    Record::Data | Record::Ignore => continue,
                    Record::CloseNotify => return Ok((moved, true)),
                }
            }
            Err(e) => return Err(io_err("splicing from a kTLS socket")(e)),
        };
        while left > 0 {
            let sent = to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to_fd, left, false)
                })
                .await;
            match sent {
                Ok(n) => {
                    left -= n;
                    moved += n as u64;
                }
                Err(e) => return Err(io_err("splicing into a kTLS socket")(e)),
            }
        }
    }
}

/// One direction of a kernel TLS connection moved in the kernel, for a direction no
/// detector needs to see: what `from` already holds (decrypted by rustls before the
/// hand-off) is written first, then the kernel splices until `from` ends, then `to` is
/// shut down (`close_notify`, FIN), as the user-space relay ends a direction.
pub async fn splice_direction(from: &KtlsStream, to: &mut KtlsStream) -> Result<u64, KtlsError> {
    use tokio::io::AsyncWriteExt as _;
    let held = &from.pending[from.at..];
    to.write_all(held)
        .await
        .map_err(io_err("writing buffered plaintext into kTLS"))?;
    let mut moved = held.len() as u64;
    if !from.read_closed {
        moved += splice_loop(&from.tcp, from.side, &to.tcp).await?.0;
    }
    to.shutdown()
        .await
        .map_err(io_err("ending a spliced direction"))?;
    Ok(moved)
}

/// What a record read from a kTLS socket is to its reader.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    /// Application data (or, with no bytes, the end of the stream).
    Data,
    /// A record to drop: a session ticket (resumption is not offered through the proxy).
    Ignore,
    /// The peer's `close_notify`.
    CloseNotify,
}

const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;
const RECORD_DATA: u8 = 23;

/// `recvmsg` on a kTLS socket into `len` bytes at `data`, without waiting: the bytes and the
/// type of the record(s) read (the kernel never mixes types in one call).
fn recv_record(fd: RawFd, data: *mut u8, len: usize) -> io::Result<(usize, Option<u8>)> {
    // Room for one cmsg carrying the record type (one byte, padded).
    let mut cbuf = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.cast(),
        iov_len: len,
    };
    // SAFETY: all-zero msghdr is valid; fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>();
    // SAFETY: msg describes buffers valid for the call (the caller's `data` of `len`).
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = None;
    // SAFETY: iterating the cmsgs the kernel wrote into cbuf, as CMSG_* define.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE
            {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n as usize, record_type))
}

/// What a record of `record_type` holding `body` means; an alert other than
/// `close_notify`, a KeyUpdate or an unknown type ends the connection.
fn classify(side: &'static str, record_type: Option<u8>, body: &[u8]) -> Result<Record, KtlsError> {
    match record_type {
        // No type: nothing was read (the end of the stream).
        None | Some(RECORD_DATA) => Ok(Record::Data),
        Some(RECORD_ALERT) if body.get(1) == Some(&0) => Ok(Record::CloseNotify),
        Some(RECORD_ALERT) => Err(KtlsError::Protocol {
            side,
            message: format!("TLS alert {body:?}"),
        }),
        // NewSessionTicket (4): resumption is not offered through the proxy; dropping the
        // ticket is harmless.
        Some(RECORD_HANDSHAKE) if body.first() == Some(&4) => Ok(Record::Ignore),
        Some(RECORD_HANDSHAKE) if body.first() == Some(&24) => Err(KtlsError::Protocol {
            side,
            message: "TLS 1.3 KeyUpdate: kernel TLS cannot rekey (Linux 6.13+ can; not used)"
                .into(),
        }),
        other => Err(KtlsError::Protocol {
            side,
            message: format!(
                "unexpected TLS record type {other:?} ({} bytes)",
                body.len()
            ),
        }),
    }
}

/// Reads the non-data record at the head of a kTLS socket (splice refused it).
fn read_control(tcp: &TcpStream, side: &'static str) -> Result<Record, KtlsError> {
    let mut data = vec![0u8; RECORD_ROOM];
    let (n, record_type) = recv_record(tcp.as_raw_fd(), data.as_mut_ptr(), data.len())
        .map_err(io_err("reading a TLS control record"))?;
    classify(side, record_type, &data[..n])
}

/// Sends a close_notify alert record through kTLS (record type by cmsg), without waiting.
fn send_close_notify(fd: RawFd) -> io::Result<()> {
    let alert = [1u8, 0];
    let mut cbuf = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: alert.as_ptr().cast_mut().cast(),
        iov_len: alert.len(),
    };
    // SAFETY: all-zero msghdr is valid; fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_FIRSTHDR/CMSG_DATA over cbuf, which has room for one
    // one-byte cmsg.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as usize;
        *libc::CMSG_DATA(cmsg) = RECORD_ALERT;
    }
    // SAFETY: msg describes valid buffers for the duration of the call.
    if unsafe { libc::sendmsg(fd, &raw const msg, libc::MSG_DONTWAIT) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rustls::crypto::cipher::{AeadKey, Iv};

    use super::*;

    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    /// The cork hands out a record's header, then at most the rest of that record, so a
    /// reader with a large buffer still stops at the boundary, and the socket is handed
    /// over only there.
    #[tokio::test]
    async fn the_cork_never_reads_past_a_record_and_hands_over_only_at_a_boundary() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        // Two application-data records of 3 and 2 bytes, and the first 4 bytes of a third
        // record's header, in one write.
        let bytes = [
            23, 3, 3, 0, 3, b'a', b'b', b'c', 23, 3, 3, 0, 2, b'd', b'e', 23, 3, 3, 0,
        ];
        writer.write_all(&bytes).await.unwrap();
        let mut cork = HandshakeCork::new(reader);
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        for expected in [&bytes[..5], &bytes[5..8], &bytes[8..13], &bytes[13..15]] {
            // The body may arrive in pieces, never past the record.
            let mut read = Vec::new();
            while read.len() < expected.len() {
                let n = cork.read(&mut buf).await.unwrap();
                assert!(n > 0);
                read.extend_from_slice(&buf[..n]);
            }
            assert_eq!(read, expected);
            got.extend_from_slice(&read);
        }
        assert_eq!(got, bytes[..15]);
        // At a boundary: the socket is handed over, the partial header still in it.
        let mut tcp = cork.into_tcp().unwrap();
        let mut rest = [0u8; 4];
        tcp.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, bytes[15..]);

        // Inside a record: refused.
        writer.write_all(&[23, 3, 3, 0, 9, b'x']).await.unwrap();
        let mut cork = HandshakeCork::new(tcp);
        // The read hands out the 9-byte record's header alone, leaving the record open.
        assert_eq!(cork.read(&mut buf).await.unwrap(), 5);
        let e = cork.into_tcp().err().unwrap();
        assert_eq!(
            e.to_string(),
            "handed-over connection: the TLS stream stopped inside a record"
        );
    }

    #[test]
    fn aes_gcm_nonce_splits_into_salt_and_iv_and_the_sequence_is_big_endian() {
        let secrets = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7; 32]),
            iv: Iv::new(NONCE),
        };
        let info = CryptoInfo::new(ProtocolVersion::TLSv1_3, 0x0102, &secrets, "agent").unwrap();
        let CryptoInfo::Aes256(info) = &info else {
            panic!("AES-256-GCM became another cipher");
        };
        assert_eq!(info.info.version, libc::TLS_1_3_VERSION);
        assert_eq!(info.info.cipher_type, libc::TLS_CIPHER_AES_GCM_256);
        assert_eq!(info.salt, [1, 2, 3, 4]);
        assert_eq!(info.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(info.key, [7; 32]);
        assert_eq!(info.rec_seq, [0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(
            CryptoInfo::new(ProtocolVersion::TLSv1_3, 0, &secrets, "agent")
                .unwrap()
                .as_raw()
                .1 as usize,
            size_of::<libc::tls12_crypto_info_aes_gcm_256>()
        );
    }

    /// Every suite rustls can negotiate maps to a kernel cipher, and the probe's zero keys
    /// have each cipher's struct.
    #[test]
    fn every_rustls_suite_has_a_kernel_cipher_and_probe_keys_fit() {
        for suite in rustls::crypto::ring::ALL_CIPHER_SUITES {
            let name = suite.suite().as_str().unwrap();
            let cipher = Cipher::of(*suite).unwrap_or_else(|| panic!("{name}"));
            assert!(
                name.contains(&cipher.name().replace('-', "_").to_uppercase()),
                "{name} is not {cipher:?}"
            );
        }
        for version in [ProtocolVersion::TLSv1_2, ProtocolVersion::TLSv1_3] {
            for (cipher, size) in [
                (
                    Cipher::Aes128Gcm,
                    size_of::<libc::tls12_crypto_info_aes_gcm_128>(),
                ),
                (
                    Cipher::Aes256Gcm,
                    size_of::<libc::tls12_crypto_info_aes_gcm_256>(),
                ),
                (
                    Cipher::Chacha20Poly1305,
                    size_of::<libc::tls12_crypto_info_chacha20_poly1305>(),
                ),
            ] {
                assert_eq!(CryptoInfo::zero(version, cipher).as_raw().1 as usize, size);
            }
        }
    }

    #[test]
    fn kernel_counters_are_read_by_name() {
        let text = "TlsCurrTxSw                     \t2\nTlsCurrRxSw                     \t2\nTlsTxDevice                     \t0\nTlsDecryptError                 \t1\n";
        let counters = parse_counters(text).unwrap();
        assert_eq!(counters["TlsCurrTxSw"], 2);
        assert_eq!(counters["TlsDecryptError"], 1);
        assert_eq!(counters.len(), 4);
        assert_eq!(parse_counters("TlsTxSw x\n"), None);
    }

    /// What a record read from a kTLS socket means to the reader.
    #[test]
    fn records_are_classified_by_type_and_first_bytes() {
        assert_eq!(classify("agent", Some(23), b"data").unwrap(), Record::Data);
        assert_eq!(classify("agent", None, b"").unwrap(), Record::Data);
        // Alert level 1, description 0: close_notify.
        assert_eq!(
            classify("agent", Some(21), &[1, 0]).unwrap(),
            Record::CloseNotify
        );
        // NewSessionTicket.
        assert_eq!(
            classify("agent", Some(22), &[4, 0, 0, 1, 0]).unwrap(),
            Record::Ignore
        );
        let key_update = classify("upstream", Some(22), &[24, 0, 0, 1, 0]).unwrap_err();
        assert!(key_update.to_string().contains("KeyUpdate"), "{key_update}");
        let alert = classify("agent", Some(21), &[2, 40]).unwrap_err();
        assert_eq!(alert.to_string(), "agent connection: TLS alert [2, 40]");
        assert!(classify("agent", Some(20), &[1]).is_err());
    }

    #[test]
    fn chacha_takes_the_whole_nonce_as_iv() {
        let secrets = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: AeadKey::from([9; 32]),
            iv: Iv::new(NONCE),
        };
        let info = CryptoInfo::new(ProtocolVersion::TLSv1_2, 5, &secrets, "upstream").unwrap();
        let CryptoInfo::Chacha(info) = &info else {
            panic!("ChaCha20-Poly1305 became another cipher");
        };
        assert_eq!(info.info.version, libc::TLS_1_2_VERSION);
        assert_eq!(info.iv, NONCE);
        assert_eq!(info.rec_seq, 5u64.to_be_bytes());
    }

    #[test]
    fn a_key_of_the_wrong_length_or_an_old_version_is_refused_by_side() {
        // A 32-byte key where AES-128 needs 16.
        let wrong = ConnectionTrafficSecrets::Aes128Gcm {
            key: AeadKey::from([0; 32]),
            iv: Iv::new(NONCE),
        };
        let e = CryptoInfo::new(ProtocolVersion::TLSv1_3, 0, &wrong, "agent")
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "agent connection: traffic key of unexpected length"
        );
        let old = CryptoInfo::new(ProtocolVersion::TLSv1_1, 0, &wrong, "upstream")
            .err()
            .unwrap();
        assert_eq!(
            old.to_string(),
            "the upstream connection uses TLSv1_1, which kernel TLS offload does not support"
        );
    }
}
