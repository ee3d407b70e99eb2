//! Query strings, decoded strictly. The format is `application/x-www-form-urlencoded` as
//! browsers write it (`&` between pairs, `+` for a space, `%XX` for a byte), but a `%` not
//! followed by two hex digits, or escapes that decode to bytes that are not UTF-8, refuse the
//! query instead of being kept as written or turned into U+FFFD as lenient decoders do. Lenient
//! decoding makes two different raw names one: `a%ZZ` and `a%25ZZ` both read `a%ZZ`, and
//! `a%FF` and `a%FE` both read `a\u{FFFD}`.

use std::borrow::Cow;

use super::error::ApiError;

/// What is wrong with one component of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadEscape {
    #[error("'%' must be followed by two hex digits")]
    NotHex,
    #[error("percent-escapes must decode to UTF-8")]
    NotUtf8,
}

/// A query that cannot be decoded; `field` is the parameter's name, or `query` when the name
/// itself is what cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {error}")]
pub struct QueryError {
    pub field: String,
    pub error: BadEscape,
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        ApiError::bad_request(e.field, e.error.to_string())
    }
}

/// Every `name=value` pair of `query`, in order and decoded; an empty pair (`a=1&&b=2`) is
/// skipped and a pair without `=` has an empty value.
pub fn pairs(query: &str) -> impl Iterator<Item = Result<(Cow<'_, str>, Cow<'_, str>), QueryError>> {
    query.split('&').filter(|pair| !pair.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name).map_err(|error| QueryError { field: "query".to_owned(), error })?;
        let value = decode(value).map_err(|error| QueryError { field: name.clone().into_owned(), error })?;
        Ok((name, value))
    })
}

/// Decodes one name or value; borrows when there is nothing to decode.
pub fn decode(raw: &str) -> Result<Cow<'_, str>, BadEscape> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let (Some(high), Some(low)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex)) else {
                    return Err(BadEscape::NotHex);
                };
                out.push(high << 4 | low);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map(Cow::Owned).map_err(|_| BadEscape::NotUtf8)
}

fn hex(digit: &u8) -> Option<u8> {
    (*digit as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(query: &str) -> Result<Vec<(String, String)>, QueryError> {
        pairs(query).map(|pair| pair.map(|(k, v)| (k.into_owned(), v.into_owned()))).collect()
    }

    #[test]
    fn pairs_are_split_and_decoded() {
        let expected = [("topic", "a b"), ("topic", "b:1"), ("lastEventId", "é"), ("flag", ""), ("", "x")];
        let expected: Vec<(String, String)> = expected.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(decoded("topic=a+b&&topic=b%3a1&lastEventId=%C3%A9&flag&=x").expect("valid"), expected);
        assert_eq!(decoded("a=%25ZZ").expect("valid"), [("a".to_owned(), "%ZZ".to_owned())]);
        assert_eq!(decoded("").expect("valid"), []);
        assert!(matches!(decode("plain"), Ok(Cow::Borrowed("plain"))));
    }

    #[test]
    fn invalid_escapes_are_refused_not_guessed() {
        for (query, field, error) in [
            ("topic=a%ZZ", "topic", BadEscape::NotHex),
            ("topic=a%", "topic", BadEscape::NotHex),
            ("topic=a%4", "topic", BadEscape::NotHex),
            ("topic=a%+1", "topic", BadEscape::NotHex),
            ("topic=a%FF", "topic", BadEscape::NotUtf8),
            ("topic=a%C3", "topic", BadEscape::NotUtf8),
            ("topic=%ED%A0%80", "topic", BadEscape::NotUtf8),
            ("ok=1&t%ZZ=1", "query", BadEscape::NotHex),
        ] {
            assert_eq!(decoded(query), Err(QueryError { field: field.to_owned(), error }), "{query}");
        }
    }

    proptest! {
        #[test]
        fn any_query_decodes_or_is_refused_without_panicking(query in any::<String>()) {
            let _ = decoded(&query);
        }

        #[test]
        fn what_a_browser_encodes_decodes_back(pairs in proptest::collection::vec((any::<String>(), any::<String>()), 0..6)) {
            let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
            prop_assert_eq!(decoded(&query).expect("valid"), pairs);
        }

        /// Where the strict decoder answers, it answers what the lenient one does: it only
        /// refuses, never reads differently.
        #[test]
        fn strict_decoding_agrees_with_lenient_decoding_where_it_answers(query in "([a-z%+=&]|%[0-9a-fA-F]{2}|[^&]){0,24}") {
            if let Ok(strict) = decoded(&query) {
                let lenient: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                prop_assert_eq!(strict, lenient);
            }
        }
    }
}
