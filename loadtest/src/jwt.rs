//! Minting HS256 tokens the way sse-fanout expects them: `sub` is the user, `exp` an hour
//! ahead (or as asked), `topics` the patterns the user may join, and `role` for the publish
//! and stats APIs. The `token` subcommand prints one, for scripts (`scripts/cluster`).

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
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
        self.mint_for(sub, topics, role, 3600)
    }

    /// A token for `sub`, valid for `ttl_secs` seconds.
    pub fn mint_for(&self, sub: &str, topics: &[String], role: Option<&str>, ttl_secs: u64) -> Result<String> {
        let claims = Claims { sub, exp: now_nanos() / 1_000_000_000 + ttl_secs, topics, role };
        encode(&self.header, &claims, &self.key).context("signing JWT")
    }
}

/// What a token lets its holder do beyond subscribing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// May publish through `POST /api/publish`.
    Publisher,
    /// May publish and read `/api/stats`.
    Admin,
}

impl Role {
    fn claim(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Admin => "admin",
        }
    }
}

/// `sse-loadtest token`: one token on stdout.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// A topic pattern the user may join, e.g. `news:*` (repeatable; `topics` claim).
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// The `role` claim; without it the token only subscribes.
    #[arg(long, value_enum)]
    pub role: Option<Role>,
    /// Seconds until the token expires.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// HS256 secret the nodes verify with. Best passed in the environment, which `ps` does
    /// not show.
    #[arg(long, env = "SSE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
}

/// Prints the token `args` describe.
pub fn print_token(args: &TokenArgs) -> Result<()> {
    let token =
        Minter::new(&args.jwt_secret).mint_for(&args.sub, &args.topics, args.role.map(Role::claim), args.ttl_secs)?;
    println!("{token}");
    Ok(())
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

    #[derive(serde::Deserialize)]
    struct Expiry {
        exp: u64,
        topics: Option<Vec<String>>,
        role: Option<String>,
    }

    #[test]
    fn tokens_last_as_long_as_asked_and_carry_only_the_claims_given() {
        let m = Minter::new("s3cret");
        let t = m.mint_for("demo-admin", &[], Some(Role::Admin.claim()), 86_400).unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let back = decode::<Expiry>(&t, &DecodingKey::from_secret(b"s3cret"), &v).unwrap().claims;
        let in_a_day = now_nanos() / 1_000_000_000 + 86_400;
        assert!((in_a_day - 5..=in_a_day).contains(&back.exp), "exp {} for a day from now", back.exp);
        assert_eq!((back.topics, back.role.as_deref()), (None, Some("admin")));
    }
}
