//! Whether an event stream response is gzip-coded: the request's `Accept-Encoding` read as
//! RFC 9110 §12.5.3 defines it (codings are case-insensitive, `q=0` refuses one, `*` stands for
//! every coding not named), and the response headers that go with the answer. How a gzip stream
//! is encoded is [`crate::gzip`]'s and the stream's ([`crate::connection`]).

use axum::http::HeaderMap;

/// The header of a gzip-coded stream response.
const GZIP: (&str, &str) = ("content-encoding", "gzip");

/// With compression on, every stream response depends on `Accept-Encoding`, coded or not: a
/// cache (or a proxy that stores responses) must not hand one client's coding to another.
const VARY: (&str, &str) = ("vary", "accept-encoding");

/// The headers a stream response adds for its coding: none while compression is off, `Vary`
/// on every stream while it is on, and `Content-Encoding` on a gzip stream.
pub fn headers(enabled: bool, gzip: bool) -> &'static [(&'static str, &'static str)] {
    match (enabled, gzip) {
        (false, _) => &[],
        (true, false) => &[VARY],
        (true, true) => &[VARY, GZIP],
    }
}

/// Whether the client takes a gzip-coded response (`gzip` or its alias `x-gzip` with a non-zero
/// weight, or `*` with one when neither is named).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip: Option<bool> = None;
    let mut any: Option<bool> = None;
    let elements = headers.get_all("accept-encoding").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    for element in elements {
        let mut parts = element.split(';');
        let coding = parts.next().unwrap_or_default().trim();
        let mut weight = Some(true);
        for param in parts {
            let Some((name, value)) = param.split_once('=') else { continue };
            if name.trim().eq_ignore_ascii_case("q") {
                weight = positive_weight(value.trim());
            }
        }
        // A malformed weight makes the element mean nothing, rather than a guess.
        let Some(accepted) = weight else { continue };
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(gzip.unwrap_or(false) || accepted);
        } else if coding == "*" {
            any = Some(accepted);
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// Whether a `q` value (`0`..`1` with at most three decimals) is above zero; `None` when it is
/// not a valid weight.
fn positive_weight(value: &str) -> Option<bool> {
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let valid = matches!(whole, "0" | "1")
        && fraction.len() <= 3
        && fraction.bytes().all(|b| b.is_ascii_digit())
        && (whole == "0" || fraction.bytes().all(|b| b == b'0'));
    valid.then(|| whole == "1" || fraction.bytes().any(|b| b != b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("accept-encoding", value.parse().expect("a header value"));
        }
        accepts_gzip(&headers)
    }

    #[test]
    fn gzip_is_taken_when_the_client_names_it_with_a_weight_above_zero() {
        assert!(accepts(&["gzip"]));
        assert!(accepts(&["gzip, deflate, br, zstd"]), "what browsers send");
        assert!(accepts(&["br;q=1.0, GZIP;q=0.5"]));
        assert!(accepts(&["x-gzip"]));
        assert!(accepts(&["deflate", "gzip;q=0.001"]), "several header lines");
        assert!(accepts(&["*"]));
        assert!(accepts(&["br, *;q=0.1"]));
    }

    #[test]
    fn gzip_is_not_taken_when_refused_missing_or_unreadable() {
        assert!(!accepts(&[]));
        assert!(!accepts(&[""]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["br, deflate"]));
        assert!(!accepts(&["gzip;q=0"]));
        assert!(!accepts(&["gzip; q=0.000, deflate"]));
        assert!(!accepts(&["*;q=0"]));
        assert!(!accepts(&["gzip;q=0, *"]), "named: the star does not override it");
        assert!(!accepts(&["gzip;q=2"]), "not a weight");
        assert!(!accepts(&["gzip;q=0.5x"]));
    }
}
