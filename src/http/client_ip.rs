//! Which address a request comes from: the TCP peer, or, when the peer is one of
//! `SSE_TRUSTED_PROXIES`, the client that the proxies name in `X-Forwarded-For`.
//!
//! Each proxy appends the address it received the request from, so the header reads "client,
//! proxy 1, proxy 2" and only its right end was written by someone trusted. The walk starts at the
//! right and steps over trusted proxies; the first address that is not one is the client.
//! Whatever lies left of it was written by that client and is never read: a client that sends
//! `X-Forwarded-For: 203.0.113.9` itself only adds a hop the walk does not reach. An entry that
//! is not an address (`unknown`) ends the walk at the trusted hop that passed it on. Only
//! `X-Forwarded-For` is read (not RFC 7239's `Forwarded`), as nginx and most balancers write it.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

use crate::config::TrustedProxies;

/// The TCP peer of a connection, carried in the extensions of every request hyper serves.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

/// The address a request comes from.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer.to_canonical();
    if trusted.is_empty() || !trusted.contains(client) {
        return client;
    }
    // Several header lines are one list, in order (RFC 9110, 5.3): read from the last line back.
    for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(line) = line.to_str() else { return client };
        for hop in line.rsplit(',') {
            let Some(address) = parse_hop(hop.trim()) else { return client };
            client = address;
            if !trusted.contains(address) {
                return client;
            }
        }
    }
    client
}

/// `192.0.2.1`, `2001:db8::1`, or either with a port (`192.0.2.1:443`, `[2001:db8::1]:443`),
/// as some balancers write them.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let address = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(address.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &str) -> TrustedProxies {
        crate::config::config_from(&["--trusted-proxies", list]).trusted_proxies
    }

    fn client(peer: &str, forwarded: &[&str], trusted: &str) -> String {
        let mut headers = HeaderMap::new();
        for line in forwarded {
            headers.append("x-forwarded-for", line.parse().expect("header value"));
        }
        let trusted = if trusted.is_empty() { TrustedProxies::default() } else { proxies(trusted) };
        client_address(peer.parse().expect("peer"), &headers, &trusted).to_string()
    }

    #[test]
    fn without_a_trusted_peer_the_header_is_ignored() {
        assert_eq!(client("198.51.100.7", &["203.0.113.9"], ""), "198.51.100.7");
        assert_eq!(client("198.51.100.7", &["203.0.113.9"], "10.0.0.0/8"), "198.51.100.7");
    }

    #[test]
    fn from_a_trusted_proxy_the_rightmost_untrusted_hop_is_the_client() {
        assert_eq!(client("10.0.0.2", &["203.0.113.9"], "10.0.0.0/8"), "203.0.113.9");
        // The client wrote the first entry itself; the proxy appended what it saw.
        assert_eq!(client("10.0.0.2", &["1.2.3.4, 203.0.113.9"], "10.0.0.0/8"), "203.0.113.9");
        // Two trusted proxies in a row.
        assert_eq!(client("10.0.0.2", &["1.2.3.4, 203.0.113.9, 10.0.0.7"], "10.0.0.0/8"), "203.0.113.9");
        // Repeated header lines are one list.
        assert_eq!(client("10.0.0.2", &["1.2.3.4", "203.0.113.9, 10.0.0.7"], "10.0.0.0/8"), "203.0.113.9");
        // Ports and brackets as some balancers write them.
        assert_eq!(client("10.0.0.2", &["[2001:db8::5]:4711"], "10.0.0.0/8"), "2001:db8::5");
        assert_eq!(client("10.0.0.2", &["203.0.113.9:4711"], "10.0.0.0/8"), "203.0.113.9");
    }

    #[test]
    fn a_walk_through_trusted_hops_only_ends_at_the_last_one() {
        assert_eq!(client("127.0.0.1", &["127.0.0.1"], "127.0.0.1"), "127.0.0.1");
        assert_eq!(client("10.0.0.2", &["10.0.0.3, 10.0.0.4"], "10.0.0.0/8"), "10.0.0.3");
        assert_eq!(client("10.0.0.2", &[], "10.0.0.0/8"), "10.0.0.2");
    }

    #[test]
    fn garbage_stops_the_walk_at_the_trusted_hop_that_passed_it_on() {
        assert_eq!(client("10.0.0.2", &["unknown"], "10.0.0.0/8"), "10.0.0.2");
        assert_eq!(client("10.0.0.2", &["unknown, 10.0.0.9"], "10.0.0.0/8"), "10.0.0.9");
        assert_eq!(client("10.0.0.2", &["203.0.113.9, "], "10.0.0.0/8"), "10.0.0.2");
    }

    #[test]
    fn ipv4_mapped_peers_and_hops_are_read_as_ipv4() {
        assert_eq!(client("::ffff:10.0.0.2", &["::ffff:203.0.113.9"], "10.0.0.0/8"), "203.0.113.9");
        assert_eq!(client("::ffff:198.51.100.7", &[], ""), "198.51.100.7");
    }
}
