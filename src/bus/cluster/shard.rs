//! One subscriber connection to one cluster primary: the channels of its slots that this node
//! listens on. A RESP2 connection in subscribe mode, so everything it receives is an event and
//! nothing needs pairing with a request but the confirmations and errors of its own commands,
//! which come back in order (a queue of what is expected). A `sunsubscribe` nobody asked for is
//! the shard giving a channel up (its slot moved): the channel gets a gap and the owner moves it.
//!
//! Messages go straight into the dispatcher's queue from here, each confirmation before the
//! first message of its channel, as on the single-Redis bus.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::resp::{self, Frame};
use super::{COMMAND_TIMEOUT, PING_INTERVAL, SharedKey, channel_of};
use crate::bus::Inbound;
use crate::bus::redis::log_forged;
use crate::channel::ChannelName;
use crate::history::Live;
use crate::metrics::BusMetrics;
use crate::redis_tls::RedisTls;

/// PINGs a connection may leave unanswered before it counts as dead.
const UNANSWERED_PINGS: u32 = 3;

/// What the owner asks of a shard connection: a sequence number and channels of one slot.
pub(in crate::bus) enum ShardCommand {
    Subscribe(u64, Vec<String>),
    Unsubscribe(u64, Vec<String>),
}

/// What a shard connection tells the owner (the first field is the shard's `host:port`).
pub(in crate::bus) enum ShardEvent {
    /// The shard confirmed the channel's latest `SSUBSCRIBE`.
    Confirmed(String, String),
    /// The shard gave the channel up by itself (its slot moved).
    Lost(String, String),
    /// The shard refused an `SSUBSCRIBE` (`MOVED`, `TRYAGAIN`, `CLUSTERDOWN`...): the error.
    Refused(String, Vec<String>, String),
    /// The connection ended; every channel it had has a gap.
    Down(String),
}

/// What every shard connection delivers into.
#[derive(Clone)]
pub(in crate::bus) struct Shared {
    pub inbound: mpsc::Sender<Inbound>,
    pub overflowed: Arc<AtomicBool>,
    pub metrics: BusMetrics,
    pub key: SharedKey,
}

impl Shared {
    fn queue(&self, message: Inbound) {
        if self.inbound.try_send(message).is_err() {
            self.metrics.inbound_dropped.increment(1);
            self.overflowed.store(true, Ordering::Release);
        }
    }
}

#[derive(PartialEq, Eq)]
enum Kind {
    Subscribe,
    Unsubscribe,
    Ping,
}

/// A command whose replies have not all come.
struct Expected {
    kind: Kind,
    sequence: u64,
    remaining: HashSet<String>,
}

pub(in crate::bus) struct Shard {
    address: String,
    credentials: Option<(Option<String>, String)>,
    tls: RedisTls,
    commands: mpsc::UnboundedReceiver<ShardCommand>,
    events: mpsc::UnboundedSender<ShardEvent>,
    shared: Shared,
    /// The sequence of the last command sent for each channel: only its confirmation counts.
    latest: HashMap<String, u64>,
    subscribed: HashSet<String>,
    expected: VecDeque<Expected>,
    unanswered_pings: u32,
}

impl Shard {
    pub(in crate::bus) fn new(
        address: String,
        credentials: Option<(Option<String>, String)>,
        tls: RedisTls,
        commands: mpsc::UnboundedReceiver<ShardCommand>,
        events: mpsc::UnboundedSender<ShardEvent>,
        shared: Shared,
    ) -> Self {
        Self {
            address,
            credentials,
            tls,
            commands,
            events,
            shared,
            latest: HashMap::new(),
            subscribed: HashSet::new(),
            expected: VecDeque::new(),
            unanswered_pings: 0,
        }
    }

    pub(in crate::bus) async fn run(mut self) {
        if let Err(e) = self.serve().await {
            tracing::debug!(shard = self.address, error = e, "cluster shard subscriber connection ended");
        }
        for name in self.subscribed.drain() {
            self.shared.queue(Inbound::Unsubscribed(ChannelName::from_bus(channel_of(&name))));
        }
        let _ = self.events.send(ShardEvent::Down(self.address));
    }

    async fn serve(&mut self) -> Result<(), String> {
        let stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&self.address))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Socket> = if self.tls.is_enabled() {
            let host = host_of(&self.address);
            let tls = tokio::time::timeout(COMMAND_TIMEOUT, self.tls.connect(stream, host))
                .await
                .map_err(|_| "TLS handshake timed out".to_owned())?
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            Box::new(tls)
        } else {
            Box::new(stream)
        };
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut buffer = BytesMut::with_capacity(64 << 10);
        if let Some((user, password)) = self.credentials.clone() {
            let mut auth = Vec::new();
            match user {
                Some(user) => resp::command(&mut auth, "AUTH", &[user.as_str(), password.as_str()]),
                None => resp::command(&mut auth, "AUTH", &[password.as_str()]),
            }
            writer.write_all(&auth).await.map_err(|e| e.to_string())?;
            let reply = tokio::time::timeout(COMMAND_TIMEOUT, read_frame(&mut reader, &mut buffer))
                .await
                .map_err(|_| "AUTH timed out".to_owned())??;
            if let Frame::Error(e) = reply {
                return Err(format!("AUTH refused: {e}"));
            }
        }
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut out = Vec::new();
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ok(()) };
                    self.encode(command, &mut out);
                    while let Ok(command) = self.commands.try_recv() {
                        self.encode(command, &mut out);
                    }
                }
                read = reader.read_buf(&mut buffer) => {
                    if read.map_err(|e| e.to_string())? == 0 {
                        return Err("closed by the server".into());
                    }
                    while let Some((frame, used)) = resp::parse(&buffer)? {
                        buffer.advance(used);
                        self.on_frame(frame);
                    }
                }
                _ = ping.tick() => {
                    if self.unanswered_pings >= UNANSWERED_PINGS {
                        return Err("PING unanswered".into());
                    }
                    self.unanswered_pings += 1;
                    self.expected.push_back(Expected { kind: Kind::Ping, sequence: 0, remaining: HashSet::new() });
                    resp::command(&mut out, "PING", &[] as &[&str]);
                }
            }
            if !out.is_empty() {
                tokio::time::timeout(COMMAND_TIMEOUT, writer.write_all(&out))
                    .await
                    .map_err(|_| "write timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            }
        }
    }

    fn encode(&mut self, command: ShardCommand, out: &mut Vec<u8>) {
        let (kind, sequence, names, verb) = match command {
            ShardCommand::Subscribe(sequence, names) => (Kind::Subscribe, sequence, names, "SSUBSCRIBE"),
            ShardCommand::Unsubscribe(sequence, names) => (Kind::Unsubscribe, sequence, names, "SUNSUBSCRIBE"),
        };
        for name in &names {
            self.latest.insert(name.clone(), sequence);
        }
        resp::command(out, verb, &names);
        self.expected.push_back(Expected { kind, sequence, remaining: names.into_iter().collect() });
    }

    /// Takes `name` off the oldest command of `kind` that waits for it; that command's sequence.
    fn answered(&mut self, kind: Kind, name: &str) -> Option<u64> {
        let at = self.expected.iter().position(|e| e.kind == kind && e.remaining.contains(name))?;
        let expected = &mut self.expected[at];
        expected.remaining.remove(name);
        let sequence = expected.sequence;
        if expected.remaining.is_empty() {
            self.expected.remove(at);
        }
        Some(sequence)
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Array(items) => {
                let mut items = items.into_iter();
                let Some(kind) = items.next() else { return };
                let name =
                    items.next().and_then(|f| f.bytes().and_then(|b| std::str::from_utf8(b).ok()).map(str::to_owned));
                match (kind.bytes().unwrap_or_default(), name) {
                    (b"smessage", Some(name)) => {
                        if let Some(Frame::Bulk(Some(payload))) = items.next() {
                            self.message(&name, Bytes::from(payload));
                        }
                    }
                    (b"ssubscribe", Some(name)) => self.confirmed(name),
                    (b"sunsubscribe", Some(name)) => self.unsubscribed(name),
                    (b"pong", _) => self.pong(),
                    _ => {}
                }
            }
            Frame::Simple(pong) if pong.eq_ignore_ascii_case(b"PONG") => self.pong(),
            Frame::Error(error) => self.refused(error),
            _ => {}
        }
    }

    fn message(&self, name: &str, payload: Bytes) {
        let (id, payload) = match self.shared.key.read(name.as_bytes(), &payload) {
            Live::Plain(payload) => (None, payload),
            Live::Durable { id, payload } => (Some(id), payload),
            Live::Forged => {
                self.shared.metrics.forged_ids.increment(1);
                log_forged(name);
                return;
            }
        };
        self.shared.queue(Inbound::Message { channel: ChannelName::from_bus(channel_of(name)), id, payload });
    }

    fn confirmed(&mut self, name: String) {
        let sequence = self.answered(Kind::Subscribe, &name);
        if sequence.is_some() && self.latest.get(&name) == sequence.as_ref() {
            self.subscribed.insert(name.clone());
            self.shared.queue(Inbound::Subscribed(ChannelName::from_bus(channel_of(&name))));
            let _ = self.events.send(ShardEvent::Confirmed(self.address.clone(), name));
        }
    }

    fn unsubscribed(&mut self, name: String) {
        match self.answered(Kind::Unsubscribe, &name) {
            Some(sequence) => {
                if self.latest.get(&name) == Some(&sequence) {
                    self.latest.remove(&name);
                    self.subscribed.remove(&name);
                }
            }
            // Not asked for: the shard no longer serves the channel's slot.
            None => {
                self.latest.remove(&name);
                if self.subscribed.remove(&name) {
                    self.shared.queue(Inbound::Unsubscribed(ChannelName::from_bus(channel_of(&name))));
                    let _ = self.events.send(ShardEvent::Lost(self.address.clone(), name));
                }
            }
        }
    }

    fn pong(&mut self) {
        if let Some(at) = self.expected.iter().position(|e| e.kind == Kind::Ping) {
            self.expected.remove(at);
        }
        self.unanswered_pings = 0;
    }

    /// An error answers the oldest command still waiting (a command fails as a whole).
    fn refused(&mut self, error: String) {
        let Some(expected) = self.expected.pop_front() else { return };
        if expected.kind != Kind::Subscribe {
            return;
        }
        let names: Vec<String> =
            expected.remaining.into_iter().filter(|name| self.latest.get(name) == Some(&expected.sequence)).collect();
        for name in &names {
            self.latest.remove(name);
        }
        if !names.is_empty() {
            let _ = self.events.send(ShardEvent::Refused(self.address.clone(), names, error));
        }
    }
}

/// The shard connection's socket: plain TCP, or TLS over it (`rediss+cluster://`).
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// The host part of `host:port` (an IPv6 address without its brackets), which the shard's
/// certificate must name.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

async fn read_frame(reader: &mut (impl AsyncRead + Unpin), buffer: &mut BytesMut) -> Result<Frame, String> {
    loop {
        if let Some((frame, used)) = resp::parse(buffer)? {
            buffer.advance(used);
            return Ok(frame);
        }
        if reader.read_buf(buffer).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed by the server".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Frame {
        Frame::Bulk(Some(text.as_bytes().to_vec()))
    }

    fn push(kind: &str, name: &str) -> Frame {
        Frame::Array(vec![bulk(kind), bulk(name), Frame::Int(1)])
    }

    struct Setup {
        shard: Shard,
        inbound: mpsc::Receiver<Inbound>,
        events: mpsc::UnboundedReceiver<ShardEvent>,
    }

    fn setup() -> Setup {
        let (inbound_tx, inbound) = mpsc::channel(64);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (_commands_tx, commands) = mpsc::unbounded_channel();
        let shared = Shared {
            inbound: inbound_tx,
            overflowed: Arc::default(),
            metrics: BusMetrics::new(),
            key: SharedKey::default(),
        };
        Setup {
            shard: Shard::new("h:1".into(), None, RedisTls::default(), commands, events_tx, shared),
            inbound,
            events,
        }
    }

    #[test]
    fn the_certificate_must_name_the_host_of_the_address() {
        assert_eq!(host_of("10.0.0.7:6379"), "10.0.0.7");
        assert_eq!(host_of("redis-0.example:6380"), "redis-0.example");
        assert_eq!(host_of("[::1]:6379"), "::1");
    }

    fn subscribe(shard: &mut Shard, sequence: u64, names: &[&str]) {
        let mut out = Vec::new();
        shard.encode(ShardCommand::Subscribe(sequence, names.iter().map(|n| (*n).to_owned()).collect()), &mut out);
        assert!(out.starts_with(b"*"));
    }

    #[test]
    fn a_confirmation_comes_before_messages_and_an_unasked_sunsubscribe_is_a_lost_channel() {
        let Setup { mut shard, mut inbound, mut events } = setup();
        subscribe(&mut shard, 1, &["{sse:user:1}"]);
        shard.on_frame(push("ssubscribe", "{sse:user:1}"));
        shard.on_frame(Frame::Array(vec![bulk("smessage"), bulk("{sse:user:1}"), bulk("hi")]));
        assert!(matches!(inbound.try_recv(), Ok(Inbound::Subscribed(c)) if c.as_str() == "sse:user:1"));
        assert!(
            matches!(inbound.try_recv(), Ok(Inbound::Message { channel, id: None, payload }) if channel.as_str() == "sse:user:1" && payload == "hi")
        );
        assert!(matches!(events.try_recv(), Ok(ShardEvent::Confirmed(_, n)) if n == "{sse:user:1}"));

        // The slot moved: the shard gives the channel up by itself.
        shard.on_frame(push("sunsubscribe", "{sse:user:1}"));
        assert!(matches!(inbound.try_recv(), Ok(Inbound::Unsubscribed(c)) if c.as_str() == "sse:user:1"));
        assert!(matches!(events.try_recv(), Ok(ShardEvent::Lost(_, n)) if n == "{sse:user:1}"));
    }

    #[test]
    fn an_asked_sunsubscribe_is_quiet_and_only_the_latest_subscribe_confirms() {
        let Setup { mut shard, mut inbound, mut events } = setup();
        subscribe(&mut shard, 1, &["{a}"]);
        let mut out = Vec::new();
        shard.encode(ShardCommand::Unsubscribe(2, vec!["{a}".into()]), &mut out);
        subscribe(&mut shard, 3, &["{a}"]);
        // The first confirmation answers the first SSUBSCRIBE, which the SUNSUBSCRIBE undoes.
        shard.on_frame(push("ssubscribe", "{a}"));
        shard.on_frame(push("sunsubscribe", "{a}"));
        assert!(inbound.try_recv().is_err(), "nothing confirmed, nothing lost");
        assert!(events.try_recv().is_err());
        shard.on_frame(push("ssubscribe", "{a}"));
        assert!(matches!(inbound.try_recv(), Ok(Inbound::Subscribed(_))));
        assert!(matches!(events.try_recv(), Ok(ShardEvent::Confirmed(_, n)) if n == "{a}"));
    }

    #[test]
    fn an_error_refuses_the_oldest_command_waiting_and_pongs_clear_pings() {
        let Setup { mut shard, mut inbound, mut events } = setup();
        shard.expected.push_back(Expected { kind: Kind::Ping, sequence: 0, remaining: HashSet::new() });
        shard.unanswered_pings = 1;
        subscribe(&mut shard, 1, &["{b}", "{b}:x"]);
        shard.on_frame(Frame::Array(vec![bulk("pong"), bulk("")]));
        assert_eq!(shard.unanswered_pings, 0);
        shard.on_frame(Frame::Error("MOVED 3300 h:2".into()));
        match events.try_recv() {
            Ok(ShardEvent::Refused(_, mut names, error)) => {
                names.sort();
                assert_eq!(names, ["{b}", "{b}:x"]);
                assert_eq!(error, "MOVED 3300 h:2");
            }
            _ => panic!("refused"),
        }
        assert!(inbound.try_recv().is_err());
        assert!(shard.expected.is_empty());
    }
}
