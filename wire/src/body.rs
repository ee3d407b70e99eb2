//! How an HTTP/1.1 response body is delimited, and the decoder that finds its bytes: chunked
//! transfer coding, a `Content-Length`, or everything until the connection closes.
//!
//! The decoders keep no data: body bytes are handed to a callback as slices of the caller's
//! input, so a chunk boundary may fall anywhere and costs no copy. Chunk-size lines and
//! trailers are walked byte by byte in a state machine rather than buffered, so a malformed or
//! endless one is an error as soon as it shows, never a growing buffer.

/// Longest chunk-size line (extensions included) and longest trailer line accepted. Servers
/// write a few hex digits; anything near this is not HTTP we understand.
pub const MAX_CHUNK_LINE: usize = 4096;

/// How a body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
    UntilClose,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("bad chunk size")]
    BadChunkSize,
    #[error("chunk size too large")]
    ChunkTooLarge,
    #[error("chunk-size or trailer line over {MAX_CHUNK_LINE} bytes")]
    LineTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingDataEnd,
    #[error("line not ended by CRLF")]
    BadLineEnd,
    #[error("the connection closed before the body ended")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In the hex digits of a chunk size.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the digits (whitespace, `;name=value` extensions), this many bytes so far.
    Extension {
        value: u64,
        len: usize,
    },
    /// A CR ended the size line; its LF must follow.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    /// Chunk data ended; its CRLF must follow.
    DataCr,
    DataLf,
    /// In the trailer section after the last chunk: this many bytes of the current line.
    Trailer {
        len: usize,
    },
    /// A CR ended a trailer line, which was empty (the end of the body) or not.
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// An incremental decoder of `Transfer-Encoding: chunked` (RFC 9112 §7.1). Accepts a bare LF
/// where CRLF belongs, as RFC 9112 §2.2 allows a recipient to; ignores extensions and trailers.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self { state: ChunkState::Size { value: 0, digits: 0 } }
    }

    /// True after the last (zero-size) chunk and its trailer section.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, handing chunk data to `out` as slices of it. Returns how many bytes of
    /// `input` belonged to the body: all of them until the body ends, then what remains is
    /// whatever follows the response on the connection.
    pub fn decode(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, BodyError> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                ChunkState::Data { remaining } => {
                    let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(input.len() - pos);
                    out(&input[pos..pos + take]);
                    pos += take;
                    let remaining = remaining - take as u64;
                    self.state = if remaining == 0 { ChunkState::DataCr } else { ChunkState::Data { remaining } };
                }
                ChunkState::Done => break,
                // The two states every chunk passes through, taken a run of bytes at a time
                // (a load generator decodes one chunk per event); the rest goes byte by byte.
                ChunkState::Size { mut value, mut digits } => {
                    while let Some(d) = input.get(pos).and_then(|&b| hex(b)) {
                        if digits == 16 {
                            return Err(BodyError::ChunkTooLarge);
                        }
                        value = value << 4 | d;
                        digits += 1;
                        pos += 1;
                    }
                    self.state = ChunkState::Size { value, digits };
                    if let Some(&b) = input.get(pos) {
                        pos += 1;
                        self.state = self.step(b)?;
                    }
                }
                ChunkState::DataCr if input[pos..].starts_with(b"\r\n") => {
                    pos += 2;
                    self.state = ChunkState::Size { value: 0, digits: 0 };
                }
                _ => {
                    let b = input[pos];
                    pos += 1;
                    self.state = self.step(b)?;
                }
            }
        }
        Ok(pos)
    }

    /// One byte outside chunk data.
    fn step(&self, b: u8) -> Result<ChunkState, BodyError> {
        use ChunkState::*;
        let size_line_ended = |value: u64| if value == 0 { Trailer { len: 0 } } else { Data { remaining: value } };
        Ok(match self.state {
            Size { value, digits } => match (b, hex(b)) {
                (_, Some(d)) if digits < 16 => Size { value: value << 4 | d, digits: digits + 1 },
                (_, Some(_)) => return Err(BodyError::ChunkTooLarge),
                _ if digits == 0 => return Err(BodyError::BadChunkSize),
                (b'\r', _) => SizeLf { value },
                (b'\n', _) => size_line_ended(value),
                (b';' | b' ' | b'\t', _) => Extension { value, len: digits.into() },
                _ => return Err(BodyError::BadChunkSize),
            },
            Extension { value, len } => match b {
                b'\r' => SizeLf { value },
                b'\n' => size_line_ended(value),
                _ if len >= MAX_CHUNK_LINE => return Err(BodyError::LineTooLong),
                _ => Extension { value, len: len + 1 },
            },
            SizeLf { value } if b == b'\n' => size_line_ended(value),
            SizeLf { .. } => return Err(BodyError::BadLineEnd),
            DataCr => match b {
                b'\r' => DataLf,
                b'\n' => Size { value: 0, digits: 0 },
                _ => return Err(BodyError::MissingDataEnd),
            },
            DataLf if b == b'\n' => Size { value: 0, digits: 0 },
            DataLf => return Err(BodyError::MissingDataEnd),
            Trailer { len } => match b {
                b'\r' => TrailerLf { empty: len == 0 },
                b'\n' if len == 0 => Done,
                b'\n' => Trailer { len: 0 },
                _ if len >= MAX_CHUNK_LINE => return Err(BodyError::LineTooLong),
                _ => Trailer { len: len + 1 },
            },
            TrailerLf { empty } if b == b'\n' => {
                if empty {
                    Done
                } else {
                    Trailer { len: 0 }
                }
            }
            TrailerLf { .. } => return Err(BodyError::BadLineEnd),
            Data { .. } | Done => unreachable!("decode handles data and the end itself"),
        })
    }
}

fn hex(b: u8) -> Option<u64> {
    let digit = match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => return None,
    };
    Some(u64::from(digit))
}

#[derive(Debug, Clone)]
enum Kind {
    Chunked(ChunkedDecoder),
    Length { remaining: u64 },
    UntilClose,
}

/// Finds a response body's bytes in what the connection delivers, whatever its framing.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    kind: Kind,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let kind = match framing {
            Framing::Chunked => Kind::Chunked(ChunkedDecoder::new()),
            Framing::Length(remaining) => Kind::Length { remaining },
            Framing::UntilClose => Kind::UntilClose,
        };
        Self { kind }
    }

    /// Decodes `input`, handing body bytes to `out` as slices of it; returns how many bytes of
    /// `input` belonged to the body (see [`ChunkedDecoder::decode`]).
    pub fn decode(&mut self, input: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, BodyError> {
        match &mut self.kind {
            Kind::Chunked(decoder) => decoder.decode(input, out),
            Kind::Length { remaining } => {
                let take = usize::try_from(*remaining).unwrap_or(usize::MAX).min(input.len());
                if take > 0 {
                    out(&input[..take]);
                }
                *remaining -= take as u64;
                Ok(take)
            }
            Kind::UntilClose => {
                if !input.is_empty() {
                    out(input);
                }
                Ok(input.len())
            }
        }
    }

    /// True once the whole body was seen. A read-until-close body is never done before the
    /// connection closes: see [`at_close`](Self::at_close).
    pub fn is_done(&self) -> bool {
        match &self.kind {
            Kind::Chunked(decoder) => decoder.is_done(),
            Kind::Length { remaining } => *remaining == 0,
            Kind::UntilClose => false,
        }
    }

    /// What the connection closing means for the body: its normal end for a read-until-close
    /// body or one already complete, else [`BodyError::Truncated`].
    pub fn at_close(&self) -> Result<(), BodyError> {
        match self.kind {
            Kind::UntilClose => Ok(()),
            _ if self.is_done() => Ok(()),
            _ => Err(BodyError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes `raw` fed in the given pieces; returns the body, whether it ended, and how many
    /// bytes the body took.
    fn decode_pieces(framing: Framing, pieces: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), BodyError> {
        let mut decoder = BodyDecoder::new(framing);
        let (mut body, mut used) = (Vec::new(), 0);
        for piece in pieces {
            used += decoder.decode(piece, |s| body.extend_from_slice(s))?;
        }
        Ok((body, decoder.is_done(), used))
    }

    const CHUNKED: &[u8] =
        b"5;ext=1\r\nhello\r\n1\r\n \r\n6 ; a=\"b\"\r\nworld!\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";
    const DECODED: &[u8] = b"hello world!0123456789abcdef";

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        for i in 0..=CHUNKED.len() {
            for j in i..=CHUNKED.len() {
                let got = decode_pieces(Framing::Chunked, &[&CHUNKED[..i], &CHUNKED[i..j], &CHUNKED[j..]]);
                assert_eq!(got, Ok((DECODED.to_vec(), true, CHUNKED.len())), "split at {i},{j}");
            }
        }
        let bytes: Vec<&[u8]> = CHUNKED.chunks(1).collect();
        assert_eq!(decode_pieces(Framing::Chunked, &bytes), Ok((DECODED.to_vec(), true, CHUNKED.len())));
    }

    #[test]
    fn bare_lf_line_ends_and_no_trailers_are_accepted() {
        let got = decode_pieces(Framing::Chunked, &[b"3\nabc\n0\n\n"]);
        assert_eq!(got, Ok((b"abc".to_vec(), true, 9)));
        assert_eq!(decode_pieces(Framing::Chunked, &[b"0\r\n\r\n"]), Ok((Vec::new(), true, 5)));
    }

    #[test]
    fn what_follows_the_body_is_left_to_the_caller() {
        let got = decode_pieces(Framing::Chunked, &[b"2\r\nhi\r\n0\r\n\r\nHTTP/1.1 200 OK"]);
        assert_eq!(got, Ok((b"hi".to_vec(), true, 12)));
        assert_eq!(decode_pieces(Framing::Length(3), &[b"ab", b"cdef"]), Ok((b"abc".to_vec(), true, 3)));
    }

    #[test]
    fn malformed_chunks_are_errors_not_buffers() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"3\r\nabc\rX",
            b"3\rX",
            b"11111111111111111\r\n",
            b"0\r\nTrailer: x\rX",
            b"-3\r\n",
            b"3x\r\n",
        ] {
            assert!(decode_pieces(Framing::Chunked, &[bad]).is_err(), "{bad:?}");
        }
        let mut long_extension = b"1;".to_vec();
        long_extension.resize(MAX_CHUNK_LINE + 8, b'x');
        assert_eq!(decode_pieces(Framing::Chunked, &[&long_extension]), Err(BodyError::LineTooLong));
        let mut long_trailer = b"0\r\nT: ".to_vec();
        long_trailer.resize(MAX_CHUNK_LINE + 8, b'x');
        assert_eq!(decode_pieces(Framing::Chunked, &[&long_trailer]), Err(BodyError::LineTooLong));
        // 16 hex digits fit in 64 bits; the 17th is refused.
        assert!(decode_pieces(Framing::Chunked, &[b"ffffffffffffffff\r\n"]).is_ok());
        assert_eq!(decode_pieces(Framing::Chunked, &[b"1ffffffffffffffff"]), Err(BodyError::ChunkTooLarge));
    }

    #[test]
    fn length_and_until_close_bodies() {
        assert_eq!(decode_pieces(Framing::Length(0), &[b"x"]), Ok((Vec::new(), true, 0)));
        let mut decoder = BodyDecoder::new(Framing::Length(4));
        decoder.decode(b"ab", |_| {}).expect("fine");
        assert_eq!(decoder.at_close(), Err(BodyError::Truncated));
        let mut decoder = BodyDecoder::new(Framing::UntilClose);
        let mut body = Vec::new();
        decoder.decode(b"any", |s| body.extend_from_slice(s)).expect("fine");
        decoder.decode(b"thing", |s| body.extend_from_slice(s)).expect("fine");
        assert_eq!((body.as_slice(), decoder.is_done(), decoder.at_close()), (&b"anything"[..], false, Ok(())));
        let mut chunked = BodyDecoder::new(Framing::Chunked);
        chunked.decode(b"3\r\nab", |_| {}).expect("fine");
        assert_eq!(chunked.at_close(), Err(BodyError::Truncated));
    }

    /// `chunks` written with chunked coding, with the given extensions and trailers.
    fn encode(chunks: &[Vec<u8>], extensions: bool, trailers: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}", chunk.len()).as_bytes());
            if extensions {
                out.extend_from_slice(b";name=value");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for trailer in trailers {
            out.extend_from_slice(trailer.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        #[test]
        fn encoded_chunks_decode_in_any_pieces(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
            extensions in any::<bool>(),
            trailers in proptest::collection::vec("[A-Za-z]{1,8}: [ -~]{0,12}", 0..3),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
            after in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut raw = encode(&chunks, extensions, &trailers);
            let body_len = raw.len();
            raw.extend_from_slice(&after);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(raw.len() + 1)).collect();
            cuts.push(0);
            cuts.push(raw.len());
            cuts.sort_unstable();
            cuts.dedup();
            let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &raw[w[0]..w[1]]).collect();
            prop_assert_eq!(decode_pieces(Framing::Chunked, &pieces), Ok((chunks.concat(), true, body_len)));
        }

        #[test]
        fn garbage_never_panics_and_never_passes_unseen(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            // The decoder keeps nothing: whatever it accepts it either hands out or walks past
            // in a bounded line, so "fine so far" is all garbage can get.
            let mut decoder = ChunkedDecoder::new();
            let mut out = 0;
            if let Ok(used) = decoder.decode(&raw, |s| out += s.len()) {
                prop_assert!(used <= raw.len() && out <= used);
            }
        }
    }
}
