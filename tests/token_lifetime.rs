//! How long a token keeps its stream open: the leeway that lets a token in also keeps it in.

mod common;

use std::time::Duration;

use common::{Node, Received, SseClient, token_with, unix_now};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_token_accepted_inside_the_leeway_is_closed_only_when_the_leeway_has_passed() {
    let node = Node::start(&[("SSE_JWT_LEEWAY", "4s")]).await;
    // Expired a second ago: accepted, because the leeway is 4 s.
    let exp = unix_now() - 1;
    let token = token_with(json!({"sub": "lee", "exp": exp}));
    let mut stream = SseClient::open(&node.url(&format!("/events?access_token={token}")), &[]).await;
    assert_eq!(stream.status, 200, "{:?}", stream.body);
    stream.connected().await;
    // Past its exp, it is warned at once that it must be renewed (SSE_TOKEN_EXPIRY_WARNING)...
    let warning = stream.next_event(Duration::from_secs(3)).await.expect("token_expiring");
    assert_eq!(warning.event, "token_expiring", "{warning:?}");
    // ...but not closed: before, the first tick (within a second) closed it with `token_expired`.
    let early = stream.next(Duration::from_millis(1500)).await;
    assert_eq!(early, None, "the stream must stay open until exp + leeway, got {early:?}");
    let farewell = stream.next_event(Duration::from_secs(8)).await.expect("disconnected at exp + leeway");
    assert_eq!((farewell.event.as_str(), farewell.data.as_str()), ("disconnected", r#"{"reason":"token_expired"}"#));
    // Not before exp + leeway, on the node's clock (the same as this one).
    assert!(unix_now() >= exp + 4, "closed at {}, before exp + leeway {}", unix_now(), exp + 4);
    assert_eq!(stream.next(Duration::from_secs(5)).await, Some(Received::End));
}
