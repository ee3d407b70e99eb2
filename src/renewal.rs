//! Token renewal of open streams: `POST /api/connections/<node>:<n>/token` accepted by any node
//! reaches the node that holds the stream, which gives the stream the new token.
//!
//! A stream's id names its node, so the call is routed, not broadcast: the node that takes the
//! HTTP call verifies the token (an invalid one never travels), then sends it on the holding
//! node's control channel (`<prefix>:node:<node id>`, on the bus every node already has) and waits
//! for the answer on its own, with a timeout. A `PUBLISH` no node received means no node of that
//! name is running: the stream is gone (404) without waiting. The holding node verifies the token
//! again with the same [`Authenticator`] before using it: a message on the bus grants nothing by
//! itself (anyone who can publish to Redis could send one). A call for a stream of the node that
//! took it is applied there, without the bus.
//!
//! Applying a renewal is the hub's ([`crate::hub::Hub::renew`]), run by the dispatcher between two
//! deliveries ([`HubWork`]), so that the `topics_revoked` notice is ordered with the stream's
//! events. This module owns the route between nodes, the messages on it and the grant → channel
//! decision; it owns no task: the dispatcher hands it what arrives on the control channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::auth::{AuthError, Authenticator, Grant};
use crate::bus::{Bus, BusError};
use crate::channel::{ChannelName, ChannelNames, topic_allowed};
use crate::connection::ConnectionId;
use crate::frame;
use crate::hub::{HubWork, Renewal};

/// How long the node that took the call waits for the holding node's answer. The holding node
/// verifies (a JWKS may fetch, at most a few seconds) and waits for its dispatcher.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a renewal waits for the dispatcher to apply it (it is behind at most one batch).
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Renewals waiting for the dispatcher before more are refused (503): the queue stays bounded
/// whatever a client with a valid token sends.
pub const WORK_CAPACITY: usize = 1024;

/// What a renewal came to; each maps to one HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 204: the stream lives on under the new token.
    Renewed,
    /// 404: no open stream has that id (closed, drained, its node gone, or never).
    NotFound,
    /// 403: the stream belongs to another user (the tokens' `sub` differ).
    OtherUser,
    /// 401: the holding node did not accept the token.
    InvalidToken,
    /// 503: the holding node did not answer in time, or the bus refused the call.
    Unavailable,
}

impl Outcome {
    /// The `outcome` label of `sse_token_renewals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Renewed => "renewed",
            Outcome::NotFound => "not_found",
            Outcome::OtherUser => "other_user",
            Outcome::InvalidToken => "invalid_token",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// What nodes say to each other on their control channels.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    /// Renew stream `connection` of the receiving node with `token`; answer on `reply_to`'s channel.
    Renew { request: u64, reply_to: String, connection: u64, token: String },
    /// The answer to `request`.
    Answer { request: u64, outcome: Outcome },
}

/// A stream's id as clients see it, `<node>:<n>`, split into its node and its number there.
/// `None` when it cannot name any stream.
pub fn parse_connection_id(id: &str) -> Option<(&str, ConnectionId)> {
    let (node, number) = id.rsplit_once(':')?;
    // Node ids are plain names (config.rs), so a channel is never built from anything else.
    let plain = !node.is_empty()
        && node.len() <= 64
        && node.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !plain || number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((node, ConnectionId(number.parse().ok()?)))
}

/// `event: topics_revoked` naming the topics a renewed token no longer grants.
pub fn revoked_frame(names: &ChannelNames, left: &[ChannelName]) -> Bytes {
    let topics: Vec<&str> = left.iter().filter_map(|c| names.topic_of(c)).collect();
    frame::event(Some("topics_revoked"), None, &serde_json::json!({ "topics": topics }).to_string())
}

/// Whether a stream renewed with `grant` keeps `channel`: its user's and the broadcast channel
/// always (the user is the same), a topic when the new token still grants it.
fn keeps(names: &ChannelNames, grant: &Grant, channel: &ChannelName) -> bool {
    names.topic_of(channel).is_none_or(|topic| topic_allowed(&grant.topics, topic))
}

/// This node's side of renewals: the calls it routes and waits for, and those it serves.
pub struct Renewals {
    node_id: String,
    names: ChannelNames,
    /// This node's control channel: renewals for its streams, and answers to its own calls.
    control: ChannelName,
    bus: Arc<dyn Bus>,
    auth: Arc<Authenticator>,
    /// To the dispatcher, which applies a renewal between two deliveries.
    work: mpsc::Sender<HubWork>,
    /// Calls sent to other nodes, by request number, waiting for their answer.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
}

impl Renewals {
    pub fn new(
        node_id: &str,
        names: ChannelNames,
        bus: Arc<dyn Bus>,
        auth: Arc<Authenticator>,
        work: mpsc::Sender<HubWork>,
    ) -> Self {
        let control = names.node(node_id);
        Self { node_id: node_id.to_owned(), names, control, bus, auth, work, waiting: Mutex::default() }
    }

    /// The channel this node must be subscribed to for renewals to reach it.
    pub fn node_channel(&self) -> &ChannelName {
        &self.control
    }

    /// Renews stream `connection_id` with `token`, whose `grant` the caller verified: here when
    /// the stream is this node's, else through its node.
    pub async fn renew(&self, connection_id: &str, token: &str, grant: Grant) -> Outcome {
        let Some((node, id)) = parse_connection_id(connection_id) else { return Outcome::NotFound };
        if node == self.node_id {
            return self.apply(id, grant).await;
        }
        let request = rand::random::<u64>();
        let (answer, answered) = oneshot::channel();
        self.waiting().insert(request, answer);
        // Removes the entry however this ends, the caller going away included.
        let _forget = Forget { renewals: self, request };
        let message =
            Message::Renew { request, reply_to: self.node_id.clone(), connection: id.0, token: token.to_owned() };
        match self.send(node, &message).await {
            Ok(0) => return Outcome::NotFound,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node, error = %e, "could not send a token renewal to its node");
                return Outcome::Unavailable;
            }
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, answered).await {
            Ok(Ok(outcome)) => outcome,
            _ => {
                tracing::warn!(node, "no answer to a token renewal in time");
                Outcome::Unavailable
            }
        }
    }

    /// Applies a verified renewal to this node's stream `id`, through the dispatcher.
    async fn apply(&self, id: ConnectionId, grant: Grant) -> Outcome {
        let (done, applied) = oneshot::channel();
        let names = self.names.clone();
        let work: HubWork = Box::new(move |hub| {
            let renewed = hub.renew(
                id,
                &grant.user,
                grant.expires_at,
                |channel| keeps(&names, &grant, channel),
                |left| revoked_frame(&names, left),
            );
            let _ = done.send(renewed);
        });
        if self.work.try_send(work).is_err() {
            return Outcome::Unavailable;
        }
        match tokio::time::timeout(APPLY_TIMEOUT, applied).await {
            Ok(Ok(Renewal::Applied { .. })) => Outcome::Renewed,
            Ok(Ok(Renewal::NotFound)) => Outcome::NotFound,
            Ok(Ok(Renewal::OtherUser)) => Outcome::OtherUser,
            _ => Outcome::Unavailable,
        }
    }

    /// Something arrived on a channel no stream listens on: a message for this node when it is
    /// its control channel (anything else is a channel just left, and is dropped).
    pub fn on_message(self: &Arc<Self>, payload: &[u8]) {
        match serde_json::from_slice::<Message>(payload) {
            Ok(Message::Renew { request, reply_to, connection, token }) => {
                let renewals = self.clone();
                tokio::spawn(async move {
                    let outcome = renewals.serve(ConnectionId(connection), &token).await;
                    let answer = Message::Answer { request, outcome };
                    if let Err(e) = renewals.send(&reply_to, &answer).await {
                        tracing::warn!(node = reply_to, error = %e, "could not answer a token renewal");
                    }
                });
            }
            Ok(Message::Answer { request, outcome }) => {
                if let Some(waiting) = self.waiting().remove(&request) {
                    let _ = waiting.send(outcome);
                }
            }
            Err(e) => tracing::warn!(error = %e, "ignored a message on this node's control channel"),
        }
    }

    /// Serves another node's renewal call: the token is verified here too before it is used.
    async fn serve(&self, id: ConnectionId, token: &str) -> Outcome {
        match self.auth.verify(token).await {
            Ok(grant) => self.apply(id, grant).await,
            Err(AuthError::KeysUnavailable) => Outcome::Unavailable,
            Err(_) => Outcome::InvalidToken,
        }
    }

    /// Publishes `message` on `node`'s control channel; how many subscribers received it.
    async fn send(&self, node: &str, message: &Message) -> Result<usize, BusError> {
        let payload = serde_json::to_vec(message).map_err(|e| BusError::Refused(e.to_string()))?;
        let channel = [self.names.node(node)];
        let receipt = self.bus.publish(&channel, Bytes::from(payload), false).await?;
        Ok(receipt.receivers.unwrap_or(1))
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Outcome>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops a call's entry among those waiting for an answer.
struct Forget<'a> {
    renewals: &'a Renewals,
    request: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.renewals.waiting().remove(&self.request);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, UserId};
    use crate::channel::TopicPattern;

    #[test]
    fn a_connection_id_names_a_node_and_a_number() {
        assert_eq!(parse_connection_id("node-a1:42"), Some(("node-a1", ConnectionId(42))));
        assert_eq!(parse_connection_id("n.1_x:0"), Some(("n.1_x", ConnectionId(0))));
        for bad in [
            "",
            "42",
            ":42",
            "node:",
            "node:4x",
            "node:-1",
            "node:+1",
            "a b:1",
            "sse:node:x:1",
            "n:99999999999999999999",
        ] {
            assert_eq!(parse_connection_id(bad), None, "{bad:?}");
        }
        assert_eq!(parse_connection_id(&format!("{}:1", "x".repeat(65))), None);
    }

    #[test]
    fn messages_between_nodes_are_tagged_json() {
        let renew = Message::Renew { request: 7, reply_to: "b".into(), connection: 3, token: "t.k.n".into() };
        let text = serde_json::to_string(&renew).expect("json");
        assert_eq!(text, r#"{"type":"renew","request":7,"reply_to":"b","connection":3,"token":"t.k.n"}"#);
        assert_eq!(serde_json::from_str::<Message>(&text).expect("parses"), renew);
        let answer = Message::Answer { request: 7, outcome: Outcome::OtherUser };
        let text = serde_json::to_string(&answer).expect("json");
        assert_eq!(text, r#"{"type":"answer","request":7,"outcome":"other_user"}"#);
        assert_eq!(serde_json::from_str::<Message>(&text).expect("parses"), answer);
        assert!(serde_json::from_str::<Message>(r#"{"type":"shout"}"#).is_err());
    }

    #[test]
    fn a_renewed_grant_keeps_the_users_own_channels_and_the_topics_it_still_grants() {
        let names = ChannelNames::new("sse");
        let grant = Grant {
            user: UserId::new("u").expect("id"),
            topics: vec![TopicPattern::new("news:*"), TopicPattern::new("kept")],
            role: Role::Subscriber,
            expires_at: 1,
            jti: None,
            claims: None,
        };
        assert!(keeps(&names, &grant, &names.user("u")));
        assert!(keeps(&names, &grant, &names.broadcast()));
        assert!(keeps(&names, &grant, &names.topic("news:1")));
        assert!(keeps(&names, &grant, &names.topic("kept")));
        assert!(!keeps(&names, &grant, &names.topic("dropped")));
        let frame = revoked_frame(&names, &[names.topic("dropped"), names.topic("a:b")]);
        assert_eq!(frame, Bytes::from_static(b"event: topics_revoked\ndata: {\"topics\":[\"dropped\",\"a:b\"]}\n\n"));
    }
}
