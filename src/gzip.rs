//! The gzip body of a compressed event stream, built so that each event is compressed once for
//! every stream instead of once per stream.
//!
//! A gzip member is a 10-byte header, DEFLATE data, and a trailer (CRC32 and length of the
//! uncompressed bytes). The DEFLATE data of a stream is a sequence of [`Piece`]s, one per
//! frame: each is deflated from a fresh compressor state and ended with a sync flush (or, below
//! the size threshold, is a stored block), so its bytes do not depend on anything the stream
//! carried before, end on a byte boundary, and are a complete, non-final run of blocks. The same
//! piece can therefore be appended to any number of streams, and a browser's inflater hands out
//! every byte of it as soon as it arrives (verified in Chromium: each event is dispatched within
//! milliseconds of being written, not when a buffer fills).
//!
//! What differs per stream is only the trailer: a [`Member`] keeps the running CRC32 and length
//! (8 bytes), folding in each piece's CRC with the piece's precomputed shift (zlib's
//! `crc32_combine_op`: one carry-less multiplication per piece and stream, no pass over the
//! bytes). A stream that ends cleanly writes [`Member::trailer`]: an empty final block, the CRC
//! and the length.
//!
//! The compressor is one per thread, reset before each piece: a compressor's state is a few
//! hundred KB, which a stream must never own. This module knows nothing of streams or events.

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};

/// The gzip header every compressed stream starts with: deflate, no name, no time, unknown OS.
pub const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// The largest stored block DEFLATE allows.
const STORED_MAX: usize = u16::MAX as usize;

/// One frame's part of a DEFLATE stream, independent of what came before it, with what a
/// stream's trailer needs to account for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Non-final DEFLATE blocks ending on a byte boundary (empty for an empty frame).
    bytes: Bytes,
    /// CRC32 of the uncompressed bytes.
    crc: u32,
    /// Their length (mod 2^32, as gzip counts it).
    len: u32,
    /// x^(8·len) mod the CRC polynomial: what a running CRC is multiplied by to append this
    /// piece's (computed once here, not per stream).
    shift: u32,
}

impl Piece {
    /// `plain` deflated from a fresh state and sync-flushed.
    pub fn deflated(plain: &[u8]) -> Self {
        let bytes = if plain.is_empty() { Bytes::new() } else { Bytes::from(deflate(plain)) };
        Self::of(plain, bytes)
    }

    /// `plain` as stored (uncompressed) blocks: 5 bytes of framing per 64 KiB.
    pub fn stored(plain: &[u8]) -> Self {
        let mut out = Vec::with_capacity(plain.len() + 5 * plain.len().div_ceil(STORED_MAX));
        put_stored(&mut out, plain);
        Self::of(plain, Bytes::from(out))
    }

    fn of(plain: &[u8], bytes: Bytes) -> Self {
        Self { bytes, crc: crc32fast::hash(plain), len: plain.len() as u32, shift: shift_for(plain.len() as u64) }
    }

    /// The bytes a stream writes for this piece.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

/// Appends `plain` as stored blocks (none for an empty `plain`).
pub fn put_stored(out: &mut Vec<u8>, plain: &[u8]) {
    for block in plain.chunks(STORED_MAX) {
        out.extend_from_slice(&stored_header(block.len()));
        out.extend_from_slice(block);
    }
}

/// Turns `out[from..]`, bytes appended in place, into stored blocks: the caller left 5 bytes at
/// `out[from..from + 5]` for the header. For the `id:` line a direct send assembles in its
/// buffer, without a copy (a line is far below the 64 KiB a block holds).
pub fn wrap_stored(out: &mut Vec<u8>, from: usize) {
    let len = out.len() - from - 5;
    if len == 0 {
        out.truncate(from);
    } else if len <= STORED_MAX {
        out[from..from + 5].copy_from_slice(&stored_header(len));
    } else {
        let plain = out.split_off(from + 5);
        out.truncate(from);
        put_stored(out, &plain);
    }
}

/// The header of a non-final stored block of `len` bytes (at most [`STORED_MAX`]).
fn stored_header(len: usize) -> [u8; 5] {
    debug_assert!(len <= STORED_MAX);
    let [lo, hi] = (len as u16).to_le_bytes();
    // BFINAL = 0, BTYPE = 00, padding to the byte boundary; LEN, then NLEN (its complement).
    [0, lo, hi, !lo, !hi]
}

/// What one stream keeps to end its gzip member: the CRC32 and length of everything it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Member {
    crc: u32,
    len: u32,
}

impl Member {
    /// Accounts for a shared piece the stream wrote.
    #[inline]
    pub fn add(&mut self, piece: &Piece) {
        self.crc = multiply(piece.shift, self.crc) ^ piece.crc;
        self.len = self.len.wrapping_add(piece.len);
    }

    /// Accounts for bytes of the stream's own that it wrote as stored blocks (its `id:` line):
    /// short, so the CRC simply runs on over them.
    #[inline]
    pub fn add_bytes(&mut self, plain: &[u8]) {
        let mut hasher = crc32fast::Hasher::new_with_initial(self.crc);
        hasher.update(plain);
        self.crc = hasher.finalize();
        self.len = self.len.wrapping_add(plain.len() as u32);
    }

    /// The end of the member: an empty final block (fixed Huffman: only the end-of-block code),
    /// then the CRC32 and the length, little-endian.
    pub fn trailer(&self) -> Bytes {
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(&[0x03, 0x00]);
        out.extend_from_slice(&self.crc.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        Bytes::from(out)
    }
}

thread_local! {
    /// This thread's compressor, reset before each piece (creating one costs far more than
    /// resetting it).
    static DEFLATER: RefCell<Option<Compress>> = const { RefCell::new(None) };
}

/// Raw DEFLATE of `plain` from a fresh state, ended with a sync flush (an empty stored block
/// that brings the data to a byte boundary, without the final bit).
fn deflate(plain: &[u8]) -> Vec<u8> {
    let run = |compress: &mut Compress| {
        compress.reset();
        let mut out = Vec::with_capacity(plain.len() / 2 + 64);
        let mut taken = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before = compress.total_in();
            if compress.compress_vec(&plain[taken..], &mut out, FlushCompress::Sync).is_err() {
                return None;
            }
            taken += (compress.total_in() - before) as usize;
            // The flush is complete once all input is taken and the output did not fill up.
            if taken == plain.len() && out.len() < out.capacity() {
                return Some(out);
            }
        }
    };
    let deflated = DEFLATER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => run(slot.get_or_insert_with(new_compressor)),
        Err(_) => run(&mut new_compressor()),
    });
    // A compressor never fails on well-formed calls; should it, the bytes still go out, stored.
    deflated.unwrap_or_else(|| {
        let mut out = Vec::new();
        put_stored(&mut out, plain);
        out
    })
}

fn new_compressor() -> Compress {
    Compress::new(Compression::default(), false)
}

// CRC32 combination, as zlib's crc32.c does it (reflected polynomial 0xedb88320): the CRC of
// A‖B is CRC(A)·x^(8·|B|) ⊕ CRC(B) in GF(2)[x] modulo the polynomial.

const POLY: u32 = 0xedb8_8320;

/// a·b modulo the CRC polynomial (bit-reflected: bit 31 is x^0).
#[inline]
const fn multiply(a: u32, mut b: u32) -> u32 {
    let mut m: u32 = 1 << 31;
    let mut p: u32 = 0;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                return p;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
    }
}

/// x^(2^k) mod the polynomial, for k in 0..32 (the cycle repeats after 32).
const X2N: [u32; 32] = {
    let mut table = [0u32; 32];
    let mut p: u32 = 1 << 30; // x^1
    table[0] = p;
    let mut k = 1;
    while k < 32 {
        p = multiply(p, p);
        table[k] = p;
        k += 1;
    }
    table
};

/// x^(8·len) mod the polynomial.
fn shift_for(len: u64) -> u32 {
    let mut p: u32 = 1 << 31; // x^0
    let (mut n, mut k) = (len, 3usize);
    while n != 0 {
        if n & 1 != 0 {
            p = multiply(X2N[k & 31], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use proptest::prelude::*;

    /// A whole stream: header, the pieces, the trailer of a member that counted them.
    fn member(pieces: &[Piece]) -> Vec<u8> {
        let mut out = HEADER.to_vec();
        let mut member = Member::default();
        for piece in pieces {
            out.extend_from_slice(piece.bytes());
            member.add(piece);
        }
        out.extend_from_slice(&member.trailer());
        out
    }

    fn gunzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
        Ok(out)
    }

    fn json(size: usize) -> Vec<u8> {
        let mut out = String::from("data: {\"items\":[");
        let mut i = 0;
        while out.len() < size {
            out.push_str(&format!(
                r#"{{"id":{i},"name":"item {i}","price":{}.{:02},"ok":{}}},"#,
                i * 7 % 100,
                i % 100,
                i % 3 == 0
            ));
            i += 1;
        }
        out.truncate(size - 4);
        out.push_str("]}\n\n");
        out.into_bytes()
    }

    #[test]
    fn the_combined_crc_is_the_crc_of_the_concatenation() {
        let (a, b) = (b"data: first\n\n".as_slice(), json(5000));
        let mut member = Member::default();
        member.add(&Piece::stored(a));
        member.add(&Piece::deflated(&b));
        member.add_bytes(b"id: 1\n");
        let whole = [a, &b, b"id: 1\n"].concat();
        assert_eq!(member.crc, crc32fast::hash(&whole));
        assert_eq!(member.len as usize, whole.len());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(a);
        let mut other = crc32fast::Hasher::new();
        other.update(&b);
        hasher.combine(&other);
        let mut just_two = Member::default();
        just_two.add(&Piece::stored(a));
        just_two.add(&Piece::deflated(&b));
        assert_eq!(just_two.crc, hasher.finalize(), "the same as crc32fast's combine");
    }

    #[test]
    fn pieces_in_any_order_make_a_valid_member() {
        let frames =
            [json(256), b": ping\n\n".to_vec(), json(4096), Vec::new(), json(100_000), b"retry: 3\n\n".to_vec()];
        let deflated: Vec<Piece> = frames.iter().map(|f| Piece::deflated(f)).collect();
        let stored: Vec<Piece> = frames.iter().map(|f| Piece::stored(f)).collect();
        for order in [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]] {
            let pieces: Vec<Piece> = order
                .iter()
                .enumerate()
                .map(|(k, &i)| if k % 2 == 0 { &deflated[i] } else { &stored[i] }.clone())
                .collect();
            let expected: Vec<u8> = order.iter().flat_map(|&i| frames[i].clone()).collect();
            assert_eq!(gunzip(&member(&pieces)).expect("a valid gzip member"), expected);
        }
    }

    #[test]
    fn a_piece_needs_nothing_before_it() {
        // The thread's compressor is reused: a piece made after another must not point back
        // into it (a fresh inflater would reject the distance, or read other bytes).
        let first = json(8000);
        let _ = Piece::deflated(&first);
        let second = first.clone(); // everything it holds, the previous piece held too
        let piece = Piece::deflated(&second);
        assert!(piece.bytes().len() < second.len() / 3, "it compressed: {} bytes", piece.bytes().len());
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&piece.bytes()[..]).read_to_end(&mut inflated).ok();
        assert!(inflated == second, "decoded alone: {} of {} bytes", inflated.len(), second.len());
    }

    #[test]
    fn a_wrong_crc_or_length_is_refused() {
        let piece = Piece::deflated(&json(1000));
        let mut bytes = member(std::slice::from_ref(&piece));
        let crc_at = bytes.len() - 8;
        bytes[crc_at] ^= 1;
        assert!(gunzip(&bytes).is_err(), "the decoder checks the CRC this module computes");
    }

    #[test]
    fn stored_blocks_split_at_64_kib_and_wrap_in_place() {
        let big = vec![b'x'; 150_000];
        assert_eq!(gunzip(&member(&[Piece::stored(&big)])).expect("valid"), big);
        for len in [0, 1, 40, STORED_MAX, STORED_MAX + 1, 200_000] {
            let mut out = b"head".to_vec();
            out.extend_from_slice(&[0; 5]);
            out.extend(std::iter::repeat_n(b'i', len));
            wrap_stored(&mut out, 4);
            let mut expected = b"head".to_vec();
            put_stored(&mut expected, &vec![b'i'; len]);
            assert!(out == expected, "{len} bytes");
        }
    }

    #[test]
    fn an_empty_frame_is_no_bytes() {
        assert!(Piece::deflated(b"").bytes().is_empty());
        assert!(Piece::stored(b"").bytes().is_empty());
        assert_eq!(gunzip(&member(&[Piece::stored(b""), Piece::deflated(b"")])).expect("valid"), b"");
    }

    /// JSON objects with little repetition (ids, numbers and words that vary): a notification
    /// feed rather than a list of alike rows.
    fn varied_json(size: usize) -> Vec<u8> {
        const WORDS: [&str; 16] = [
            "order",
            "shipped",
            "payment",
            "received",
            "alice",
            "bob",
            "refund",
            "pending",
            "item",
            "delivered",
            "warehouse",
            "berlin",
            "lisbon",
            "express",
            "cancelled",
            "review",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed >> 33
        };
        let mut out = String::from("data: [");
        while out.len() < size {
            let text: Vec<&str> = (0..6).map(|_| WORDS[next() as usize % 16]).collect();
            out.push_str(&format!(
                r#"{{"id":"{:08x}{:08x}","at":{},"user":{},"text":"{}","amount":{}.{:02}}},"#,
                next() & 0xffff_ffff,
                next() & 0xffff_ffff,
                1_795_000_000_000 + next() % 1_000_000,
                next() % 100_000,
                text.join(" "),
                next() % 10_000,
                next() % 100
            ));
        }
        out.truncate(size - 3);
        out.push_str("]\n\n");
        out.into_bytes()
    }

    /// The numbers the README quotes: bytes on the wire per event, plain against gzip (each
    /// event compressed on its own), and the time one compression takes. Printed by
    /// `cargo test --release --lib gzip::tests::sizes -- --nocapture`.
    #[test]
    fn sizes_of_json_events() {
        for (kind, make) in [("alike rows", json as fn(usize) -> Vec<u8>), ("varied objects", varied_json)] {
            for size in [128, 256, 512, 1024, 4096, 32768] {
                let plain = make(size);
                assert_eq!(plain.len(), size);
                let runs = 200;
                let started = std::time::Instant::now();
                for _ in 0..runs {
                    std::hint::black_box(Piece::deflated(std::hint::black_box(&plain)));
                }
                let each = started.elapsed() / runs;
                let deflated = Piece::deflated(&plain).bytes().len();
                println!(
                    "{kind:>14} {size:>6} B: deflated {deflated:>6} B ({:>3.0} %) in {each:>9.1?}, stored {} B",
                    deflated as f64 * 100.0 / size as f64,
                    Piece::stored(&plain).bytes().len()
                );
            }
        }
        assert!(Piece::deflated(&json(4096)).bytes().len() < 4096 / 3);
    }

    proptest! {
        #[test]
        fn any_frames_read_back_exactly(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..6), deflate in any::<u64>()) {
            let pieces: Vec<Piece> = frames.iter().enumerate()
                .map(|(k, f)| if deflate >> (k % 64) & 1 == 1 { Piece::deflated(f) } else { Piece::stored(f) })
                .collect();
            prop_assert_eq!(gunzip(&member(&pieces)).expect("valid"), frames.concat());
        }

        #[test]
        fn shifts_append_zeros(len in 0u64..1 << 40, crc in any::<u32>()) {
            // Appending a piece of `len` bytes multiplies the running CRC by x^(8·len): its CRC
            // over zeros of that length, as crc32fast computes it, for lengths it can hash.
            if len < 70_000 {
                let zeros = vec![0u8; len as usize];
                let mut member = Member { crc, len: 0 };
                member.add_bytes(&zeros);
                let expected = member.crc ^ crc32fast::hash(&zeros);
                prop_assert_eq!(multiply(shift_for(len), crc), expected);
            } else {
                prop_assert_eq!(multiply(shift_for(len), 0), 0);
            }
        }
    }
}
