//! Minting HS256 tokens the way sse-fanout expects them: `sub` is the user, `exp` an hour
//! ahead, `topics` the patterns the user may join, and `role` for the publish API.

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde::Serialize;

use crate::payload::now_nanos;

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    topics: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
}

/// A signer built once per process (key setup is not free) and used for every client.
pub struct Minter {
    key: EncodingKey,
    header: Header,
}

impl Minter {
    pub fn new(secret: &str) -> Self {
        Self { key: EncodingKey::from_secret(secret.as_bytes()), header: Header::new(Algorithm::HS256) }
    }

    /// A token for `sub`, valid for an hour: longer than any bounded run.
    pub fn mint(&self, sub: &str, topics: &[String], role: Option<&str>) -> Result<String> {
        let claims = Claims { sub, exp: now_nanos() / 1_000_000_000 + 3600, topics, role };
        encode(&self.header, &claims, &self.key).context("signing JWT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};

    #[derive(serde::Deserialize)]
    struct Back {
        sub: String,
        topics: Vec<String>,
        role: Option<String>,
    }

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let m = Minter::new("s3cret");
        let t = m.mint("u7", &["bench:*".to_string()], Some("publisher")).unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let back = decode::<Back>(&t, &DecodingKey::from_secret(b"s3cret"), &v).unwrap();
        assert_eq!(back.claims.sub, "u7");
        assert_eq!(back.claims.topics, vec!["bench:*"]);
        assert_eq!(back.claims.role.as_deref(), Some("publisher"));
        assert!(decode::<Back>(&t, &DecodingKey::from_secret(b"other"), &v).is_err());
    }
}
