//! Just enough RESP2 for the shard subscriber connections: reading the frames a connection in
//! subscribe mode receives (confirmations, messages, pongs, errors) and writing commands.

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Frame {
    Simple(Vec<u8>),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Frame>),
}

impl Frame {
    /// The bytes of a simple or bulk string.
    pub(super) fn bytes(&self) -> Option<&[u8]> {
        match self {
            Frame::Simple(b) | Frame::Bulk(Some(b)) => Some(b),
            _ => None,
        }
    }
}

/// The largest bulk string accepted (Redis's own `proto-max-bulk-len` default).
const MAX_BULK: usize = 512 << 20;

/// The first complete frame in `buf` and its length; `None` while it is incomplete. An error
/// means the stream is not RESP (the connection is dropped).
pub(super) fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let Some(&kind) = buf.first() else { return Ok(None) };
    let line = &buf[1..end];
    let after = end + 2;
    let number = || -> Result<i64, String> {
        std::str::from_utf8(line).ok().and_then(|l| l.parse().ok()).ok_or_else(|| "a malformed RESP length".to_owned())
    };
    Ok(Some(match kind {
        b'+' => (Frame::Simple(line.to_vec()), after),
        b'-' => (Frame::Error(String::from_utf8_lossy(line).into_owned()), after),
        b':' => (Frame::Int(number()?), after),
        b'_' => (Frame::Bulk(None), after),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else { return Ok(Some((Frame::Bulk(None), after))) };
            if len > MAX_BULK {
                return Err("a RESP bulk string over 512 MiB".into());
            }
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err("a RESP bulk string without its CRLF".into());
            }
            (Frame::Bulk(Some(buf[after..after + len].to_vec())), after + len + 2)
        }
        b'*' | b'>' => {
            let count = usize::try_from(number()?).unwrap_or(0);
            let mut items = Vec::with_capacity(count.min(16));
            let mut at = after;
            for _ in 0..count {
                let Some((item, used)) = parse(&buf[at..])? else { return Ok(None) };
                items.push(item);
                at += used;
            }
            (Frame::Array(items), at)
        }
        other => return Err(format!("an unexpected RESP type byte {other:#x}")),
    }))
}

/// Appends `name args...` as a RESP array of bulk strings.
pub(super) fn command(out: &mut Vec<u8>, name: &str, args: &[impl AsRef<[u8]>]) {
    out.extend_from_slice(format!("*{}\r\n", args.len() + 1).as_bytes());
    for arg in std::iter::once(name.as_bytes()).chain(args.iter().map(AsRef::as_ref)) {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_whole_or_not_at_all() {
        let message = b"*3\r\n$8\r\nsmessage\r\n$4\r\n{ch}\r\n$5\r\nhe\r\nl\r\n+PONG\r\n";
        let (frame, used) = parse(message).expect("resp").expect("complete");
        let bulk = |b: &[u8]| Frame::Bulk(Some(b.to_vec()));
        assert_eq!(frame, Frame::Array(vec![bulk(b"smessage"), bulk(b"{ch}"), bulk(b"he\r\nl")]));
        assert_eq!(parse(&message[used..]).expect("resp"), Some((Frame::Simple(b"PONG".to_vec()), 7)));
        for cut in 0..used {
            assert_eq!(parse(&message[..cut]).expect("resp"), None, "cut at {cut}");
        }
        assert_eq!(parse(b"-MOVED 1 h:2\r\n").expect("resp"), Some((Frame::Error("MOVED 1 h:2".into()), 14)));
        assert_eq!(parse(b":12\r\n").expect("resp"), Some((Frame::Int(12), 5)));
        assert_eq!(parse(b"$-1\r\n").expect("resp"), Some((Frame::Bulk(None), 5)));
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"$2\r\nabc\r\n").is_err());
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, "SSUBSCRIBE", &["{a}", "{b}"]);
        assert_eq!(out, b"*3\r\n$10\r\nSSUBSCRIBE\r\n$3\r\n{a}\r\n$3\r\n{b}\r\n");
        let (frame, used) = parse(&out).expect("resp").expect("complete");
        assert_eq!(used, out.len());
        assert!(matches!(frame, Frame::Array(items) if items.len() == 3));
    }
}
