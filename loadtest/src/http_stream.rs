//! Reading a request head off a socket, for the tool's own small servers (`origin`, `floor`).
//! Where a head ends is `sse_wire::head::head_len`'s answer; this is only the tokio loop around
//! it. Responses are read with `sse_wire` directly (`client`, `publisher`).

use sse_wire::head::{DEFAULT_MAX_HEAD, head_len};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Reads from `sock` into `buf` until `buf` holds a whole request or response head; returns
/// its length including the blank line, or `None` if the peer closed first or sent a head
/// larger than `DEFAULT_MAX_HEAD` (16 KiB: every client here sends a few hundred bytes).
pub async fn read_head(sock: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(len) = head_len(buf) {
            return Ok(Some(len));
        }
        if buf.len() > DEFAULT_MAX_HEAD {
            return Ok(None);
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
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
        let huge = vec![b'x'; DEFAULT_MAX_HEAD + 4096];
        assert_eq!(read_head(&mut huge.as_slice(), &mut Vec::new()).await.unwrap(), None, "too large");
    }
}
