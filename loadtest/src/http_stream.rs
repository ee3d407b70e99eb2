//! The HTTP/1.1 framing around a response body, for a client that reads a raw socket: the
//! status line and headers, then a body delimited by `Transfer-Encoding: chunked`, a
//! `Content-Length`, or the end of the connection.
//!
//! Only what a load generator talking to known servers needs: no header values are kept but
//! the status and the framing, and the chunk decoder is a byte-at-a-time state machine that
//! passes data slices through without copying, so chunk boundaries may fall anywhere.
//!
//! The tool's own small servers (`origin`, `floor`) read request heads with [`read_head`].

use std::fmt;

use tokio::io::{AsyncRead, AsyncReadExt};

/// How the body after the head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub framing: Framing,
    /// The server will close the connection after this response (`Connection: close`, or
    /// HTTP/1.0 without keep-alive): a client must not send another request on it.
    pub closes: bool,
    /// Bytes of `buf` the head took, including the blank line.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError(pub &'static str);

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for FramingError {}

/// Heads larger than this are refused: every server here sends a few hundred bytes.
pub const MAX_HEAD: usize = 16 * 1024;

/// Reads from `sock` into `buf` until `buf` holds a whole request or response head; returns
/// its length including the blank line, or `None` if the peer closed first or sent a head
/// larger than [`MAX_HEAD`].
pub async fn read_head(sock: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses a response head from the start of `buf`; `Ok(None)` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, FramingError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(FramingError("response head too large"));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| FramingError("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(FramingError("not an HTTP/1.x response"));
    }
    let status = parts.next().and_then(|s| s.parse::<u16>().ok()).ok_or(FramingError("bad status code"))?;
    let mut framing = Framing::UntilClose;
    let mut closes = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            let n = value.parse::<u64>().map_err(|_| FramingError("bad content-length"))?;
            framing = Framing::Length(n);
        } else if name.eq_ignore_ascii_case("connection") {
            let v = value.to_ascii_lowercase();
            if v.contains("close") {
                closes = true;
            } else if v.contains("keep-alive") {
                closes = false;
            }
        }
    }
    if matches!(status, 204 | 304) || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok(Some(Head { status, framing, closes, len: end + 4 }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size {
        value: u64,
        digits: u8,
    },
    Extension,
    SizeLf,
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last (zero-size) chunk: trailers and the final CRLF are not needed.
    Done,
}

/// Decoder for `Transfer-Encoding: chunked`.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Size of the chunk whose size line is being finished.
    size: u64,
    /// That chunk has size zero: the body ends after its line.
    last: bool,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self { state: ChunkState::Size { value: 0, digits: 0 }, size: 0, last: false }
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn pending_size(&mut self, size: u64) {
        self.size = size;
        self.last = size == 0;
    }

    /// The terminating zero-size chunk has been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, handing body bytes to `out` as slices of `input`.
    pub fn decode(&mut self, mut input: &[u8], mut out: impl FnMut(&[u8])) -> Result<(), FramingError> {
        while !input.is_empty() {
            match &mut self.state {
                ChunkState::Data { remaining } => {
                    let take = (*remaining).min(input.len() as u64) as usize;
                    out(&input[..take]);
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    input = &input[take..];
                    continue;
                }
                ChunkState::Done => return Ok(()),
                _ => {}
            }
            let b = input[0];
            input = &input[1..];
            self.state = match self.state {
                ChunkState::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(FramingError("chunk size too large"));
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        ChunkState::Size { value: value * 16 + d, digits: digits + 1 }
                    }
                    b';' | b' ' | b'\t' if digits > 0 => {
                        self.pending_size(value);
                        ChunkState::Extension
                    }
                    b'\r' if digits > 0 => {
                        self.pending_size(value);
                        ChunkState::SizeLf
                    }
                    _ => return Err(FramingError("bad chunk size")),
                },
                ChunkState::Extension => match b {
                    b'\r' => ChunkState::SizeLf,
                    _ => ChunkState::Extension,
                },
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(FramingError("chunk size line not CRLF"));
                    }
                    if self.last { ChunkState::Done } else { ChunkState::Data { remaining: self.size } }
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(FramingError("chunk data not followed by CRLF"));
                    }
                    ChunkState::DataLf
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(FramingError("chunk data not followed by CRLF"));
                    }
                    ChunkState::Size { value: 0, digits: 0 }
                }
                ChunkState::Data { .. } | ChunkState::Done => unreachable!("handled above"),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_head_stops_at_the_blank_line_or_gives_up() {
        // Delivered in pieces: the head ends inside the second read.
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
            tx.write_all(b"st: x\r\n\r\nnext").await.unwrap();
        });
        let mut buf = Vec::new();
        assert_eq!(read_head(&mut rx, &mut buf).await.unwrap(), Some(27));
        assert!(buf.starts_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        writer.await.unwrap();

        let mut closed: &[u8] = b"GET / HTTP/1.1\r\n";
        assert_eq!(read_head(&mut closed, &mut Vec::new()).await.unwrap(), None, "closed before the end");
        let huge = vec![b'x'; MAX_HEAD + 4096];
        assert_eq!(read_head(&mut huge.as_slice(), &mut Vec::new()).await.unwrap(), None, "too large");
    }

    #[test]
    fn parses_heads() {
        let h =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\nxx")
                .unwrap()
                .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Chunked);
        assert_eq!(h.len, 80);
        let h = parse_head(b"HTTP/1.1 202 Accepted\r\ncontent-length: 12\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.status, h.framing), (202, Framing::Length(12)));
        assert!(!h.closes);
        let h = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 10\r\n\r\n").unwrap().unwrap();
        assert!(h.closes);
        let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(h.closes);
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n").unwrap(), None);
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    const BODY: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";

    #[test]
    fn decodes_chunks_split_anywhere() {
        for i in 0..=BODY.len() {
            let mut d = ChunkedDecoder::new();
            let mut out = Vec::new();
            d.decode(&BODY[..i], |s| out.extend_from_slice(s)).unwrap();
            d.decode(&BODY[i..], |s| out.extend_from_slice(s)).unwrap();
            assert_eq!(out, b"hello, world0123456789abcdef", "split at {i}");
            assert!(d.is_done());
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        for b in BODY {
            d.decode(std::slice::from_ref(b), |s| out.extend_from_slice(s)).unwrap();
        }
        assert_eq!(out, b"hello, world0123456789abcdef");
    }

    #[test]
    fn rejects_garbage() {
        let mut d = ChunkedDecoder::new();
        assert!(d.decode(b"zz\r\n", |_| {}).is_err());
        let mut d = ChunkedDecoder::new();
        assert!(d.decode(b"2\r\nabX", |_| {}).is_err());
    }
}
