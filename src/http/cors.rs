//! Which browser origins may call this node (`SSE_CORS_ORIGINS`), decided in one place: the
//! CORS layer of the routes hyper serves, the CORS headers of streams served on the raw path,
//! and the refusals of `/events` and of cookie-carried tokens all ask [`Origins`].

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;

/// The configured allow-list. Empty: no browser rules at all (same-origin deployments and
/// non-browser clients).
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// `*` was configured: any origin, echoed back (credentials cannot be combined with `*`).
    any: bool,
    listed: Vec<String>,
}

impl Origins {
    pub fn from_config(config: &Config) -> Self {
        let mut origins = Origins::default();
        for origin in config.cors_origins() {
            if origin == "*" {
                origins.any = true;
            } else {
                origins.listed.push(origin.to_owned());
            }
        }
        origins
    }

    /// Whether an allow-list is configured at all.
    pub fn is_configured(&self) -> bool {
        self.any || !self.listed.is_empty()
    }

    /// Whether a request from `origin` may go on: always without an allow-list or without an
    /// `Origin` header (not a cross-origin browser request), else when the list names it.
    pub fn permits(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => true,
            Some(_) if !self.is_configured() => true,
            Some(origin) => self.lists(origin),
        }
    }

    fn lists(&self, origin: &[u8]) -> bool {
        self.any || self.listed.iter().any(|o| o.as_bytes() == origin)
    }

    /// The CORS layer for everything hyper serves; `None` without an allow-list.
    pub fn layer(&self) -> Option<CorsLayer> {
        if !self.is_configured() {
            return None;
        }
        let allow_origin = if self.any {
            AllowOrigin::mirror_request()
        } else {
            AllowOrigin::list(self.listed.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow_origin)
                .allow_credentials(true)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::CACHE_CONTROL,
                    HeaderName::from_static("last-event-id"),
                ])
                .max_age(std::time::Duration::from_secs(3600)),
        )
    }

    /// The CORS headers of an event stream served on the raw path (the layer above does the
    /// same for what hyper serves).
    pub fn stream_headers(&self, origin: Option<&HeaderValue>) -> Vec<(HeaderName, HeaderValue)> {
        let Some(origin) = origin.filter(|o| !o.is_empty()) else { return Vec::new() };
        if !self.is_configured() || !self.lists(origin.as_bytes()) {
            return Vec::new();
        }
        vec![
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
            (header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true")),
            (header::VARY, HeaderValue::from_static("origin")),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &str) -> Origins {
        Origins::from_config(&crate::config::config_from(&["--cors-origins", list]))
    }

    #[test]
    fn without_a_list_every_origin_passes_and_no_headers_are_sent() {
        let none = Origins::default();
        assert!(none.permits(Some(b"https://evil.example")));
        assert!(none.layer().is_none());
        assert!(none.stream_headers(Some(&HeaderValue::from_static("https://a.example"))).is_empty());
    }

    #[test]
    fn a_list_permits_only_its_origins_and_requests_without_one() {
        let list = origins("https://a.example,http://localhost:3000");
        assert!(list.permits(Some(b"https://a.example")));
        assert!(list.permits(None));
        assert!(!list.permits(Some(b"https://evil.example")));
        assert_eq!(list.stream_headers(Some(&HeaderValue::from_static("https://a.example"))).len(), 3);
        assert!(list.stream_headers(Some(&HeaderValue::from_static("https://evil.example"))).is_empty());
        assert!(origins("*").permits(Some(b"https://any.example")));
    }
}
