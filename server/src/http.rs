//! HTTP helpers the route tables share: which database a request addresses, who the client
//! is, and resources that answer unknown methods with a JSON 405.

use actix_web::{HttpRequest, HttpResponse, web};

use crate::db::DEFAULT_DB;
use crate::error::ApiError;

/// The name of the database a request addresses: header `X-Dbname`, else query `db`, else
/// `default`. Not checked: [`AppState::db`] resolves and validates it.
pub fn requested_db_name(req: &HttpRequest) -> String {
    let from_header = req
        .headers()
        .get("x-dbname")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    from_header
        .or_else(|| {
            web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
                .ok()
                .and_then(|q| q.get("db").cloned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_DB.to_string())
}

/// The client's address: the TCP peer, or, when the peer is one of `trusted` (the reverse
/// proxies of `TRUSTED_PROXIES`), the address `X-Forwarded-For` gives for the hop before it:
/// the right-most entry that is not itself a trusted proxy. Anyone else's `X-Forwarded-For` is
/// ignored, so a client cannot name itself another address.
pub fn client_ip(req: &HttpRequest, trusted: &[ipnet::IpNet]) -> Option<std::net::IpAddr> {
    let peer = req.peer_addr().map(|a| a.ip())?;
    forwarded_client(peer, req.headers().get_all("x-forwarded-for"), trusted)
}

/// [`client_ip`] for a peer and its `X-Forwarded-For` values.
pub fn forwarded_client<'a>(
    peer: std::net::IpAddr,
    forwarded: impl Iterator<Item = &'a actix_web::http::header::HeaderValue>,
    trusted: &[ipnet::IpNet],
) -> Option<std::net::IpAddr> {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let hops: Vec<std::net::IpAddr> = forwarded
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    // Unparseable entries are skipped; a chain of nothing but proxies leaves the first hop.
    Some(
        hops.iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .or(hops.first())
            .copied()
            .unwrap_or(peer),
    )
}

/// A resource whose unmatched methods get a JSON 405 instead of an empty one.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed("Method not allowed for this route.".into()))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.2/32".parse().unwrap()];
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let h = |s: &'static str| HeaderValue::from_static(s);
        let xff = [h("198.51.100.1, 203.0.113.5"), h("10.1.2.3")];
        // An untrusted peer's header is ignored.
        assert_eq!(
            forwarded_client(ip("127.0.0.1"), xff.iter(), &trusted),
            Some(ip("127.0.0.1"))
        );
        // Through trusted proxies, the right-most hop that is not one.
        assert_eq!(
            forwarded_client(ip("127.0.0.2"), xff.iter(), &trusted),
            Some(ip("203.0.113.5"))
        );
        // No header, or nothing parseable: the peer.
        assert_eq!(
            forwarded_client(ip("10.0.0.9"), [h("junk")].iter(), &trusted),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(
            forwarded_client(ip("10.0.0.9"), std::iter::empty(), &trusted),
            Some(ip("10.0.0.9"))
        );
    }
}
