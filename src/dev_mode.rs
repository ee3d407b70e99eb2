//! Development mode: with no key configured the node signs tokens with a secret it makes up,
//! prints ready-made tokens and commands, and serves a demo page, so a first run shows the
//! whole path without any setup. Nothing here runs once a key is configured.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::Authenticator;

/// What development mode made up at startup.
pub struct DevMode {
    pub subscriber_token: String,
    pub publisher_token: String,
    pub admin_token: String,
    pub demo_page: String,
}

const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// The demo page `GET /` serves: it opens an EventSource and publishes through the API.
const DEMO_PAGE: &str = include_str!("http/demo.html");

/// Fills the page with the node's development tokens (JWTs hold only `[A-Za-z0-9_.-]`).
fn render_demo_page(subscriber_token: &str, publisher_token: &str) -> String {
    DEMO_PAGE.replace("{{SUBSCRIBER_TOKEN}}", subscriber_token).replace("{{PUBLISHER_TOKEN}}", publisher_token)
}

impl DevMode {
    /// Mints the development tokens; `None` when the node has a real key (no dev signer).
    pub fn start(auth: &Authenticator) -> Option<Self> {
        let subscriber_token = auth.mint_dev_token("demo-user", &["*"], None, DEV_TOKEN_TTL)?;
        let publisher_token = auth.mint_dev_token("demo-publisher", &[], Some("publisher"), DEV_TOKEN_TTL)?;
        let admin_token = auth.mint_dev_token("demo-admin", &[], Some("admin"), DEV_TOKEN_TTL)?;
        let demo_page = render_demo_page(&subscriber_token, &publisher_token);
        Some(Self { subscriber_token, publisher_token, admin_token, demo_page })
    }

    /// The first-run guide: a warning in the log, the tokens and commands on stdout.
    pub fn announce(&self, listen: SocketAddr) {
        let host = if listen.ip().is_unspecified() { "127.0.0.1".to_owned() } else { listen.ip().to_string() };
        let base = format!("http://{host}:{}", listen.port());
        tracing::warn!(
            "DEVELOPMENT MODE: no SSE_JWT_SECRET or SSE_JWT_PUBLIC_KEY; tokens below are signed with a random secret"
        );
        // Printed to stdout, not the log: this is the first-run guide, meant to be copied.
        println!(
            "\n==== sse-fanout is in DEVELOPMENT MODE ====\n\
             Set SSE_JWT_SECRET (HS256) or SSE_JWT_PUBLIC_KEY (RS256/ES256) for production.\n\n\
             Demo page:        {base}/\n\
             Subscriber token: {sub}\n\
             Publisher token:  {publ}\n\
             Admin token:      {admin}\n\n\
             Subscribe:\n  curl -N '{base}/events?topic=news&access_token={sub}'\n\n\
             Publish:\n  curl -X POST '{base}/api/publish' -H 'Authorization: Bearer {publ}' -H 'Content-Type: application/json' \\\n    \
             -d '{{\"users\":[\"demo-user\"],\"event\":\"notification\",\"data\":{{\"hello\":\"world\"}}}}'\n\n\
             Stats:\n  curl '{base}/api/stats' -H 'Authorization: Bearer {admin}'\n\
             ===========================================\n",
            sub = self.subscriber_token,
            publ = self.publisher_token,
            admin = self.admin_token,
        );
    }
}
