//! A gzip-coded event stream (`--accept-encoding gzip`) decoded as it arrives, so that the SSE
//! parser behind it, and every check on what it parses, sees the plain stream.
//!
//! The body is one gzip member: a header, raw DEFLATE, an 8-byte trailer. Only the fixed
//! 10-byte header sse-fanout writes (no name, comment or extra field) is accepted; what follows
//! goes through a raw inflater that each stream keeps for its life (its window and state, tens
//! of KB: the price of decoding on the client side, not the server's). The trailer is not
//! checked here; `tests/compression.rs` checks it with a real gzip decoder.

use flate2::{Decompress, FlushDecompress, Status};

/// Length of a gzip header without optional fields.
const HEADER_LEN: usize = 10;

/// One stream's decoding state.
pub struct Gunzip {
    /// Header bytes still to read (they arrive in as many reads as the network likes).
    header: Vec<u8>,
    inflater: Decompress,
    /// The final block was decoded: what follows is the trailer.
    ended: bool,
}

impl Default for Gunzip {
    fn default() -> Self {
        Self { header: Vec::with_capacity(HEADER_LEN), inflater: Decompress::new(false), ended: false }
    }
}

impl Gunzip {
    /// Decodes `input`, the next bytes of the body, handing every decoded run to `out` as soon
    /// as it is decoded; `scratch` is where it is decoded to (shared by a worker's streams).
    pub fn feed(
        &mut self,
        mut input: &[u8],
        scratch: &mut [u8],
        mut out: impl FnMut(&[u8]),
    ) -> Result<(), &'static str> {
        if self.header.len() < HEADER_LEN {
            let take = (HEADER_LEN - self.header.len()).min(input.len());
            self.header.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.header.len() == HEADER_LEN && !self.header.starts_with(&[0x1f, 0x8b, 8, 0]) {
                return Err("bad_gzip_header");
            }
        }
        while !self.ended {
            let (before_in, before_out) = (self.inflater.total_in(), self.inflater.total_out());
            let status =
                self.inflater.decompress(input, scratch, FlushDecompress::None).map_err(|_| "bad_gzip_data")?;
            let taken = (self.inflater.total_in() - before_in) as usize;
            let made = (self.inflater.total_out() - before_out) as usize;
            input = &input[taken..];
            out(&scratch[..made]);
            self.ended = status == Status::StreamEnd;
            // A full `scratch` may leave decoded bytes inside the inflater: call again, even
            // with no input left. Otherwise, nothing taken and nothing made means it waits for
            // more input.
            if made == scratch.len() {
                continue;
            }
            if input.is_empty() || (taken == 0 && made == 0) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(plain: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(plain).unwrap();
        let mut bytes = encoder.finish().unwrap();
        // What sse-fanout writes: no modification time, unknown OS.
        bytes[4..10].copy_from_slice(&[0, 0, 0, 0, 0, 0xff]);
        bytes
    }

    #[test]
    fn decodes_a_member_fed_in_any_pieces() {
        let plain: Vec<u8> = (0..20_000u32).flat_map(|i| format!("data: {{\"n\":{i}}}\n\n").into_bytes()).collect();
        let coded = gzip(&plain);
        for piece in [1, 7, 10, 11, 1000, coded.len()] {
            let mut gunzip = Gunzip::default();
            let mut scratch = vec![0; 4096];
            let mut got = Vec::new();
            for input in coded.chunks(piece) {
                gunzip.feed(input, &mut scratch, |b| got.extend_from_slice(b)).unwrap();
            }
            assert!(got == plain, "pieces of {piece}: {} of {} bytes", got.len(), plain.len());
        }
    }

    #[test]
    fn refuses_what_is_not_gzip() {
        let mut scratch = vec![0; 64];
        assert_eq!(Gunzip::default().feed(b"data: plain\n\n", &mut scratch, |_| {}), Err("bad_gzip_header"));
        let mut coded = gzip(b"data: x\n\n");
        coded[10] = 0xff; // a reserved block type
        assert_eq!(Gunzip::default().feed(&coded, &mut scratch, |_| {}), Err("bad_gzip_data"));
    }
}
