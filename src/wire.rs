//! An event stream's bytes on a raw HTTP/1 socket: body framing (HTTP/1.1 chunks, or the bytes
//! as they are for HTTP/1.0), the direct send the fan-out uses to write one event without a
//! task, and the vectored `write_all` a stream's task uses for everything else.
//!
//! It does not decide *what* is written or *who* may write: that is the stream's state in
//! [`crate::connection`], which calls in here with the bytes of an event. Nothing here knows
//! about queues, cursors or the hub, so this module imports nothing from the crate.
//!
//! A batch of events is one chunk: one size line for the whole batch, so a task that catches up
//! on sixty events writes one chunk with one vectored write, and the hub's shared `Bytes` are
//! never copied. A direct send assembles the chunk size, the `id:` line and (small) frame in one
//! per-thread buffer, so one event costs one `send(2)` and no allocation.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;

/// Events one write of a stream's task takes from its queue at most (each an optional `id:`
/// line and a frame): enough to catch up in few system calls, few enough that one slow stream
/// does not hold a worker thread for long.
pub const MAX_BATCH: usize = 64;
/// Bytes of events one write of a stream's task takes at most (always at least one event):
/// what a task holds while its client does not read is this, not a whole queue of large
/// events. A few socket buffers' worth, so catching up still takes few system calls.
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Slices one vectored write passes at most: a full batch with its chunk size line and end,
/// well below the kernel's `IOV_MAX` (1024).
const MAX_SLICES: usize = MAX_BATCH * 2 + 2;
/// Frames up to this size are copied next to their framing and sent with one `send`; larger
/// ones go out with a vectored write that does not copy them.
pub const COPY_MAX: usize = 2048;
/// Room left in front of a direct send for its chunk-size line (16 hex digits and CRLF).
const HEADROOM: usize = 18;

thread_local! {
    /// Where a direct send assembles its bytes; one per thread, reused for every delivery.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(HEADROOM + COPY_MAX + 256));
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// HTTP/1.1 chunked transfer encoding.
    Chunked,
    /// HTTP/1.0 has no chunked encoding: the bytes go as they are and closing the connection
    /// ends the body.
    Identity,
}

impl Framing {
    /// The framing of a response to a request of this HTTP version.
    pub fn for_request(http10: bool) -> Self {
        if http10 { Framing::Identity } else { Framing::Chunked }
    }

    /// What ends the body after the last event (the last chunk), if anything.
    pub fn end_of_body(self) -> Option<Bytes> {
        match self {
            Framing::Chunked => Some(Bytes::from_static(b"0\r\n\r\n")),
            Framing::Identity => None,
        }
    }

    /// Frames `pieces[from..]`, a batch of events, for the wire: one chunk for the whole batch
    /// (a size line in front, CRLF behind), or nothing to add for `Identity`. An empty batch
    /// stays empty: a chunk of size 0 would end the body.
    pub fn frame_batch(self, pieces: &mut VecDeque<Bytes>, from: usize) {
        if self == Framing::Identity {
            return;
        }
        let size: usize = pieces.range(from..).map(Bytes::len).sum();
        if size == 0 {
            return;
        }
        // `from` is 0 or 1 (after a backlog): inserting there moves at most one slice.
        pieces.insert(from, Bytes::from(format!("{size:x}\r\n")));
        pieces.push_back(Bytes::from_static(b"\r\n"));
    }
}

/// How a direct send went.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// All of it is on its way to the peer.
    All,
    /// The socket took only part of it, or nothing: the rest, framed, must be written before
    /// anything else.
    Rest(Bytes),
    /// The socket failed: the peer is gone.
    Failed,
}

/// One event being assembled in this thread's scratch buffer for a direct send.
pub struct Direct<'a> {
    out: &'a mut Vec<u8>,
}

/// Runs `assemble` with this thread's scratch buffer, or returns `None` when the buffer is in
/// use further up this thread's stack (nothing does that today): the caller queues the event
/// for its task instead.
#[inline]
pub fn direct<R>(assemble: impl FnOnce(Direct<'_>) -> R) -> Option<R> {
    SCRATCH.with(|scratch| {
        let mut out = scratch.try_borrow_mut().ok()?;
        out.clear();
        out.resize(HEADROOM, 0);
        Some(assemble(Direct { out: &mut out }))
    })
}

impl Direct<'_> {
    /// Where the caller appends what goes before the frame (an `id:` line). Append only: the
    /// bytes already there are room for the chunk size.
    #[inline]
    pub fn prefix(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Sends the prefix and `frame`, framed, with one system call. Inlined into the caller's
    /// closure, as it was when this code lived in `connection.rs`: it runs per stream per event.
    #[inline]
    pub fn send(self, socket: &TcpStream, framing: Framing, frame: &[u8]) -> Sent {
        let out = self.out;
        let size = out.len() - HEADROOM + frame.len();
        if size == 0 {
            return Sent::All; // Nothing to write; an empty chunk would end the body.
        }
        let (start, tail): (usize, &[u8]) = match framing {
            Framing::Chunked => (put_chunk_size(out, size), b"\r\n"),
            Framing::Identity => (HEADROOM, b""),
        };
        let parts = if frame.len() <= COPY_MAX {
            out.extend_from_slice(frame);
            out.extend_from_slice(tail);
            Parts { head: &out[start..], frame: &[], tail: &[] }
        } else {
            Parts { head: &out[start..], frame, tail }
        };
        match parts.send(socket) {
            Ok(written) if written == parts.len() => Sent::All,
            Ok(written) => Sent::Rest(parts.rest(written)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Sent::Rest(parts.rest(0)),
            Err(_) => Sent::Failed,
        }
    }
}

/// Writes the chunk-size line for `size` bytes right before `out[HEADROOM..]`; returns where
/// the chunk starts.
#[inline]
fn put_chunk_size(out: &mut [u8], size: usize) -> usize {
    let digits = if size == 0 { 1 } else { (usize::BITS - size.leading_zeros()).div_ceil(4) as usize };
    let start = HEADROOM - digits - 2;
    for (i, slot) in out[start..start + digits].iter_mut().enumerate() {
        let nibble = (size >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble];
    }
    out[HEADROOM - 2..HEADROOM].copy_from_slice(b"\r\n");
    start
}

/// One direct send: the assembled head (chunk size, `id:` line and, for small frames, the
/// frame and chunk end), and for large frames the frame and chunk end uncopied.
struct Parts<'a> {
    head: &'a [u8],
    frame: &'a [u8],
    tail: &'a [u8],
}

impl Parts<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.head.len() + self.frame.len() + self.tail.len()
    }

    /// Calls the kernel directly rather than through tokio's `try_write`, which first reads the
    /// socket's readiness from a separate allocation: one cache miss per stream per event, 6 %
    /// of a broadcast's CPU in a profile. A `WouldBlock` here leaves tokio's readiness stale;
    /// the stream's task then finds the socket full on its own first try and waits properly.
    #[inline]
    fn send(&self, socket: &TcpStream) -> io::Result<usize> {
        let socket = socket2::SockRef::from(socket);
        if self.frame.is_empty() {
            // `send(2)`: cheaper in the kernel than `writev(2)` with one segment.
            socket.send(self.head)
        } else {
            socket.send_vectored(&[IoSlice::new(self.head), IoSlice::new(self.frame), IoSlice::new(self.tail)])
        }
    }

    /// What is left after the first `written` bytes.
    fn rest(&self, written: usize) -> Bytes {
        let mut rest = Vec::with_capacity(self.len() - written);
        let mut skip = written;
        for part in [self.head, self.frame, self.tail] {
            let from = skip.min(part.len());
            rest.extend_from_slice(&part[from..]);
            skip -= from;
        }
        Bytes::from(rest)
    }
}

/// Why [`write_all`] gave up on a peer that took no byte for the whole stall timeout; it is
/// the inner error of the `TimedOut` error returned, which [`is_stall`] recognises (a kernel
/// `ETIMEDOUT`, a connection that died, is not one).
#[derive(Debug, thiserror::Error)]
#[error("the peer took no byte for {0:?}")]
pub struct Stalled(pub Duration);

/// Whether a [`write_all`] error is a write stall rather than a failed socket.
pub fn is_stall(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Stalled>())
}

/// Writes every piece with vectored writes, dropping a peer that takes no byte for `stall`
/// (it stopped reading). The write is tried first: the stall timer (and its clock read) is
/// armed only when the socket is full, which keeps the common case at one system call per
/// wake-up.
pub async fn write_all(stream: &TcpStream, pieces: &mut VecDeque<Bytes>, stall: Duration) -> io::Result<()> {
    loop {
        // An empty piece (an empty frame) is nothing to write; left in front it would make a
        // write of zero bytes, which reads as a peer that takes nothing.
        while pieces.front().is_some_and(Bytes::is_empty) {
            pieces.pop_front();
        }
        if pieces.is_empty() {
            return Ok(());
        }
        let slices: Vec<IoSlice<'_>> = pieces.iter().take(MAX_SLICES).map(|b| IoSlice::new(b)).collect();
        match stream.try_write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut written) => {
                while written > 0 {
                    let Some(front) = pieces.front_mut() else { break };
                    if written >= front.len() {
                        written -= front.len();
                        pieces.pop_front();
                    } else {
                        front.advance(written);
                        written = 0;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall, stream.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, Stalled(stall))),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    fn flat(pieces: &VecDeque<Bytes>) -> Vec<u8> {
        pieces.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// A connected loopback pair: (server side, client side).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (accepted.expect("accept").0, client.expect("connect"))
    }

    #[test]
    fn a_batch_is_one_chunk() {
        let mut pieces = VecDeque::from([Bytes::from_static(b"id: 1\n"), Bytes::from_static(b"data: x\n\n")]);
        Framing::Chunked.frame_batch(&mut pieces, 0);
        assert_eq!(flat(&pieces), b"f\r\nid: 1\ndata: x\n\n\r\n");
    }

    #[test]
    fn a_batch_after_a_backlog_is_framed_behind_it_and_identity_adds_nothing() {
        let backlog = Bytes::from_static(b"rest of a chunk\r\n");
        let mut pieces = VecDeque::from([backlog.clone(), Bytes::from_static(b"data: y\n\n")]);
        Framing::Chunked.frame_batch(&mut pieces, 1);
        assert_eq!(flat(&pieces), b"rest of a chunk\r\n9\r\ndata: y\n\n\r\n");
        let mut pieces = VecDeque::from([backlog.clone()]);
        Framing::Chunked.frame_batch(&mut pieces, 1);
        assert_eq!(pieces, [backlog], "no events: no chunk, and never a last (empty) chunk");
        let mut pieces = VecDeque::from([Bytes::from_static(b"data: z\n\n")]);
        Framing::Identity.frame_batch(&mut pieces, 0);
        assert_eq!(flat(&pieces), b"data: z\n\n");
    }

    #[test]
    fn chunk_size_lines_are_lowercase_hex_right_before_the_data() {
        for (size, line) in [(0, "0"), (9, "9"), (15, "f"), (16, "10"), (300, "12c"), (65536, "10000")] {
            let mut out = vec![0u8; HEADROOM];
            let start = put_chunk_size(&mut out, size);
            assert_eq!(&out[start..], format!("{line}\r\n").as_bytes());
        }
    }

    #[test]
    fn the_rest_of_a_cut_short_send_continues_where_the_socket_stopped() {
        let parts = Parts { head: b"4\r\nid", frame: b": 1\n", tail: b"\r\n" };
        for written in 0..parts.len() {
            assert_eq!(parts.rest(written), &b"4\r\nid: 1\n\r\n"[written..], "after {written} bytes");
        }
    }

    #[tokio::test]
    async fn a_direct_send_frames_small_and_large_frames_alike() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = socket_pair().await;
        let big = format!("data: {}\n\n", "b".repeat(COPY_MAX));
        let sent = direct(|mut send| {
            send.prefix().extend_from_slice(b"id: 7\n");
            send.send(&server, Framing::Chunked, b"data: a\n\n")
        });
        assert_eq!(sent, Some(Sent::All));
        assert_eq!(direct(|send| send.send(&server, Framing::Chunked, big.as_bytes())), Some(Sent::All));
        assert_eq!(direct(|send| send.send(&server, Framing::Identity, b"data: c\n\n")), Some(Sent::All));
        assert_eq!(direct(|send| send.send(&server, Framing::Chunked, b"")), Some(Sent::All), "nothing sent");
        let expected = [
            b"f\r\nid: 7\ndata: a\n\n\r\n".to_vec(),
            format!("{:x}\r\n{big}\r\n", big.len()).into_bytes(),
            b"data: c\n\n".to_vec(),
        ]
        .concat();
        let mut wire = vec![0u8; expected.len()];
        client.read_exact(&mut wire).await.expect("read");
        assert!(wire == expected, "wire: {:?}", String::from_utf8_lossy(&wire[..40]));
        drop(server);
        let mut more = Vec::new();
        client.read_to_end(&mut more).await.expect("read");
        assert!(more.is_empty(), "an empty frame wrote nothing (not even a last chunk): {more:?}");
    }

    #[tokio::test]
    async fn write_all_writes_every_piece_and_skips_empty_ones() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = socket_pair().await;
        let mut pieces: VecDeque<Bytes> =
            [&b""[..], b"data: a\n\n", b"", b"", b"data: b\n\n", b""].into_iter().map(Bytes::from_static).collect();
        write_all(&server, &mut pieces, STALL).await.expect("written");
        assert!(pieces.is_empty());
        drop(server);
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.expect("read");
        assert_eq!(wire, b"data: a\n\ndata: b\n\n");
    }

    #[tokio::test]
    async fn a_peer_that_takes_nothing_for_the_stall_timeout_is_a_stall_and_not_a_failed_socket() {
        let (server, _client) = socket_pair().await;
        socket2::SockRef::from(&server).set_send_buffer_size(4096).expect("SO_SNDBUF");
        // Far more than the kernel buffers of a client that never reads.
        let mut pieces = VecDeque::from([Bytes::from(vec![b'x'; 64 << 20])]);
        let stall = Duration::from_millis(300);
        let error = write_all(&server, &mut pieces, stall).await.expect_err("the peer never reads");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(is_stall(&error), "{error}");
        assert!(!is_stall(&io::Error::from(io::ErrorKind::TimedOut)), "a kernel ETIMEDOUT is not a stall");
        assert!(!is_stall(&io::Error::from(io::ErrorKind::BrokenPipe)));
    }

    #[test]
    fn the_scratch_buffer_is_never_lent_twice() {
        let nested = direct(|_outer| direct(|_inner| ()));
        assert_eq!(nested, Some(None), "a nested direct send must queue instead");
    }
}
