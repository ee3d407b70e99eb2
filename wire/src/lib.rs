//! The client side of the wire, shared by `sse-fanout doctor`, `sse-loadtest` and the
//! end-to-end tests: whoever reads an event stream off a raw socket needs the same three
//! readers, and before this crate each tool had its own copy with its own bugs.
//!
//! - [`sse`]: the `text/event-stream` parser of the WHATWG spec (lines, fields, dispatch).
//! - [`head`]: an HTTP/1.x response head: status, headers, where the body starts.
//! - [`body`]: how that body is delimited: chunked, `Content-Length` or read-until-close.
//!
//! Everything is synchronous and does no I/O: callers feed the bytes they read, in whatever
//! pieces the socket gave them, and get items out. That keeps the crate free of any runtime
//! (async callers feed from their own read loop) and makes every reader testable on byte
//! strings, including every split of them. Every buffer is bounded: a peer that never ends a
//! line, a head or a chunk-size line gets an error, not our memory.
//!
//! The server side (writing frames) lives in the node's `frame.rs`; this crate only reads.

pub mod body;
pub mod head;
pub mod sse;

pub use body::{BodyDecoder, BodyError, ChunkedDecoder, Framing};
pub use head::{HeadError, HeadReader, ResponseHead};
pub use sse::{Event, EventRef, Item, ItemRef, SseError, SseParser};
