//! Channel names and topic patterns: which Redis channel carries a user's, a topic's or the
//! broadcast messages, and whether a token's `topics` claim lets a stream join a topic.
//!
//! Names are checked when they enter (a token's `sub`, a `topic=` parameter, a publish request),
//! so everything past this module handles only valid names.

use std::fmt;
use std::sync::Arc;

/// Longest user id or topic accepted; Redis accepts far more, but a name this long is a mistake.
pub const MAX_NAME_LEN: usize = 256;

/// A full pub/sub channel name such as `sse:user:42`. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(Arc<str>);

impl ChannelName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps a name that came from the bus (a channel we subscribed to ourselves).
    pub fn from_bus(name: &str) -> Self {
        Self(Arc::from(name))
    }
}

impl std::borrow::Borrow<str> for ChannelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Why a user id or topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("contains whitespace or a control character")]
    BadCharacter,
    #[error("contains the invisible format character U+{:04X}", u32::from(*.0))]
    Invisible(char),
    #[error("contains '*', which only token patterns may use")]
    Wildcard,
}

/// Checks a user id or a topic name.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::BadCharacter);
    }
    if let Some(c) = name.chars().find(|&c| is_format_character(c)) {
        return Err(NameError::Invisible(c));
    }
    if name.contains('*') {
        return Err(NameError::Wildcard);
    }
    Ok(())
}

/// Unicode's format characters (General_Category `Cf`, Unicode 16.0): zero-width spaces and
/// joiners, bidi marks, embeddings, overrides and isolates, the BOM, tags. They render as
/// nothing, so `ad\u{200B}min` reads as `admin` in a log or a dashboard while naming another
/// user, and a bidi override makes a name display as a different one. A name has no use for
/// them. Checked against `regex-syntax`'s Unicode tables in the tests.
const FORMAT_CHARACTERS: &[(char, char)] = &[
    ('\u{ad}', '\u{ad}'),
    ('\u{600}', '\u{605}'),
    ('\u{61c}', '\u{61c}'),
    ('\u{6dd}', '\u{6dd}'),
    ('\u{70f}', '\u{70f}'),
    ('\u{890}', '\u{891}'),
    ('\u{8e2}', '\u{8e2}'),
    ('\u{180e}', '\u{180e}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{202a}', '\u{202e}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{fff9}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0001}', '\u{e0001}'),
    ('\u{e0020}', '\u{e007f}'),
];

fn is_format_character(c: char) -> bool {
    // Every range lies above U+00AC: the ASCII names of the common case skip the search.
    c > '\u{ac}' && FORMAT_CHARACTERS.iter().any(|&(first, last)| (first..=last).contains(&c))
}

/// Builds channel names under the configured prefix.
#[derive(Debug, Clone)]
pub struct ChannelNames {
    prefix: String,
}

impl ChannelNames {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    /// The configured prefix (`SSE_CHANNEL_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn user(&self, user_id: &str) -> ChannelName {
        ChannelName(Arc::from(format!("{}:user:{user_id}", self.prefix)))
    }

    pub fn topic(&self, topic: &str) -> ChannelName {
        ChannelName(Arc::from(format!("{}:topic:{topic}", self.prefix)))
    }

    pub fn broadcast(&self) -> ChannelName {
        ChannelName(Arc::from(format!("{}:broadcast", self.prefix)))
    }

    /// The cluster's control channel (operator commands every node obeys, such as a revoke).
    /// No user, topic or broadcast name can take this form.
    pub fn control(&self) -> ChannelName {
        ChannelName(Arc::from(format!("{}:control", self.prefix)))
    }

    /// The node's own canary channel (`<prefix>:canary:<node id>`, see [`crate::canary`]). No
    /// stream can listen on it: a stream joins only the names built by [`Self::user`],
    /// [`Self::topic`] and [`Self::broadcast`], which all differ from it after the prefix, and
    /// a publish request targets only those. [`Self::kind_of`] knows no kind for it.
    pub fn canary(&self, node_id: &str) -> ChannelName {
        ChannelName(Arc::from(format!("{}:canary:{node_id}", self.prefix)))
    }

    /// A node's control channel, `<prefix>:node:<node id>`: what other nodes send it (token
    /// renewals of the streams it holds, answers to its own). No stream listens on it.
    pub fn node(&self, node_id: &str) -> ChannelName {
        ChannelName(Arc::from(format!("{}:node:{node_id}", self.prefix)))
    }

    /// The name without the prefix (`user:42`, `topic:news`, `broadcast`), as clients see it.
    pub fn logical<'a>(&self, channel: &'a ChannelName) -> &'a str {
        channel.as_str().strip_prefix(&self.prefix).and_then(|r| r.strip_prefix(':')).unwrap_or(channel.as_str())
    }

    /// The topic a topic channel carries (`sse:topic:news` → `news`); `None` for other channels.
    pub fn topic_of<'a>(&self, channel: &'a ChannelName) -> Option<&'a str> {
        self.logical(channel).strip_prefix("topic:").filter(|_| self.kind_of(channel) == Some(ChannelKind::Topic))
    }

    /// What kind of channel a name is, for per-kind settings and metrics.
    pub fn kind_of(&self, channel: &ChannelName) -> Option<ChannelKind> {
        let rest = channel.as_str().strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if rest == "broadcast" {
            Some(ChannelKind::Broadcast)
        } else if rest.starts_with("user:") {
            Some(ChannelKind::User)
        } else if rest.starts_with("topic:") {
            Some(ChannelKind::Topic)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    User,
    Topic,
    Broadcast,
}

/// One entry of a token's `topics` claim: an exact topic, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(String);

impl TopicPattern {
    pub fn new(pattern: impl Into<String>) -> Self {
        Self(pattern.into())
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => self.0 == topic,
        }
    }
}

/// True when any of the patterns grants `topic`.
pub fn topic_allowed(patterns: &[TopicPattern], topic: &str) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_built_under_the_prefix() {
        let names = ChannelNames::new("sse");
        assert_eq!(names.user("42").as_str(), "sse:user:42");
        assert_eq!(names.topic("rounds:roulette:7").as_str(), "sse:topic:rounds:roulette:7");
        assert_eq!(names.broadcast().as_str(), "sse:broadcast");
        assert_eq!(names.kind_of(&names.user("a")), Some(ChannelKind::User));
        assert_eq!(names.kind_of(&names.topic("a")), Some(ChannelKind::Topic));
        assert_eq!(names.kind_of(&names.broadcast()), Some(ChannelKind::Broadcast));
        assert_eq!(names.kind_of(&ChannelName::from_bus("other:user:1")), None);
        assert_eq!(names.canary("node-1").as_str(), "sse:canary:node-1");
        assert_eq!(names.kind_of(&names.canary("node-1")), None, "no client kind");
        // A user or topic named like the canary still lands under its own kind.
        assert_ne!(names.user("canary:node-1"), names.canary("node-1"));
        assert_ne!(names.topic("canary:node-1"), names.canary("node-1"));
        assert_eq!(names.node("node-a").as_str(), "sse:node:node-a");
        assert_eq!(names.kind_of(&names.node("node-a")), None, "no stream's channel");
        assert_eq!(names.logical(&names.topic("a:b")), "topic:a:b");
        assert_eq!(names.topic_of(&names.topic("a:b")), Some("a:b"));
        assert_eq!(names.topic_of(&names.user("topic:x")), None);
        assert_eq!(names.topic_of(&names.broadcast()), None);
        assert_eq!(names.topic_of(&ChannelName::from_bus("other:topic:x")), None);
    }

    #[test]
    fn trailing_star_matches_any_suffix_and_nothing_else_is_special() {
        let rounds = TopicPattern::new("rounds:*");
        assert!(rounds.matches("rounds:roulette:7"));
        assert!(rounds.matches("rounds:"));
        assert!(!rounds.matches("round"));
        assert!(!rounds.matches("news:rounds:1"));
        assert!(TopicPattern::new("*").matches("anything"));
        let exact = TopicPattern::new("news");
        assert!(exact.matches("news"));
        assert!(!exact.matches("news:1"));
        assert!(!TopicPattern::new("a*b").matches("axxb"), "a star inside is literal");
        assert!(TopicPattern::new("a*b").matches("a*b"));
        assert!(!topic_allowed(&[], "news"));
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(check_name("42"), Ok(()));
        assert_eq!(check_name("rounds:roulette:7"), Ok(()));
        assert_eq!(check_name("ünïcode-✓"), Ok(()));
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name("a b"), Err(NameError::BadCharacter));
        assert_eq!(check_name("a\nb"), Err(NameError::BadCharacter));
        assert_eq!(check_name("a\u{0}"), Err(NameError::BadCharacter));
        assert_eq!(check_name("news:*"), Err(NameError::Wildcard));
        assert_eq!(check_name(&"x".repeat(MAX_NAME_LEN + 1)), Err(NameError::TooLong));
    }

    #[test]
    fn invisible_format_characters_are_refused() {
        for (name, c) in [
            ("ad\u{200B}min", '\u{200B}'),
            ("a\u{200C}b", '\u{200C}'),
            ("a\u{200D}b", '\u{200D}'),
            ("\u{200E}a", '\u{200E}'),
            ("a\u{200F}", '\u{200F}'),
            ("a\u{202A}b", '\u{202A}'),
            ("user\u{202E}gpj.exe", '\u{202E}'),
            ("a\u{2060}b", '\u{2060}'),
            ("a\u{2066}b\u{2069}", '\u{2066}'),
            ("\u{FEFF}news", '\u{FEFF}'),
            ("soft\u{AD}hyphen", '\u{AD}'),
            ("tag\u{E0041}", '\u{E0041}'),
        ] {
            assert_eq!(check_name(name), Err(NameError::Invisible(c)), "{name:?}");
        }
        assert_eq!(NameError::Invisible('\u{202E}').to_string(), "contains the invisible format character U+202E");
        // Visible neighbours of those ranges stay valid.
        for name in ["a\u{AC}b", "a\u{2010}b", "a\u{2070}b", "caf\u{E9}", "\u{1F680}"] {
            assert_eq!(check_name(name), Ok(()), "{name:?}");
        }
    }

    /// The table is Unicode's `Cf`, exactly: every character of `\p{Cf}` in regex-syntax's
    /// tables (generated from the UCD) is refused, and no other character is.
    #[test]
    fn the_format_table_is_unicodes_cf() {
        use regex_syntax::hir::{Class, HirKind};
        let hir = regex_syntax::parse(r"\p{Cf}").expect("a Unicode class");
        let HirKind::Class(Class::Unicode(class)) = hir.kind() else { panic!("{hir:?}") };
        let cf: Vec<(char, char)> = class.ranges().iter().map(|r| (r.start(), r.end())).collect();
        assert_eq!(cf, FORMAT_CHARACTERS);
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            let in_cf = cf.iter().any(|&(first, last)| (first..=last).contains(&c));
            assert_eq!(is_format_character(c), in_cf, "U+{:04X}", u32::from(c));
        }
    }
}
