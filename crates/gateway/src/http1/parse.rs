//! Parsing and validating a request head. Anything ambiguous is rejected:
//! these are the inputs that request smuggling and cache poisoning rely on.

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// Most header fields in one request head.
const MAX_HEADERS: usize = 100;

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub(crate) struct RequestHead {
    pub method: Method,
    /// Origin-form target: path and optional query.
    pub target: String,
    pub http10: bool,
    pub headers: HeaderMap,
    /// Lowercase host, without port.
    pub host: String,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

impl RequestHead {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("/")
    }
}

/// Why a head was refused: the status and error code the client gets. The
/// connection is closed after every rejection.
#[derive(Debug, Clone)]
pub(crate) struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

fn too_large(max: usize) -> Rejection {
    Rejection::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
        format!("the request line and headers exceed {max} bytes; send fewer or smaller headers"),
    )
}

/// Parses a head from the start of `buf`. `Ok(None)`: more bytes are needed.
/// On success, also returns the head's length in bytes.
pub(crate) fn parse_head(buf: &[u8], max_bytes: usize) -> Result<Option<(RequestHead, usize)>, Rejection> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > max_bytes => return Err(too_large(max_bytes)),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => return Err(too_large(max_bytes)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(e) => return Err(Rejection::bad(format!("malformed request head: {e}"))),
    };

    let http10 = req.version == Some(0);
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| Rejection::bad("invalid method"))?;
    if method == Method::CONNECT {
        return Err(Rejection::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "CONNECT is not supported"));
    }

    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Vec<String> = Vec::new();
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Rejection::bad(format!("invalid header name `{}`", h.name.escape_default())))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| Rejection::bad(format!("invalid value for header `{name}`")))?;
        if name == http::header::CONTENT_LENGTH {
            for part in h.value.split(|&b| b == b',') {
                let n = parse_content_length(part).ok_or_else(|| Rejection::bad("Content-Length is not a decimal number"))?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(Rejection::bad("conflicting Content-Length values; send exactly one"));
                }
                content_length = Some(n);
            }
        } else if name == http::header::TRANSFER_ENCODING {
            let text = value.to_str().map_err(|_| Rejection::bad("invalid Transfer-Encoding"))?;
            transfer_encoding.extend(text.split(',').map(|t| t.trim().to_ascii_lowercase()).filter(|t| !t.is_empty()));
        } else if name == http::header::HOST {
            hosts += 1;
        }
        headers.append(name, value);
    }

    let framing = match (content_length, transfer_encoding.is_empty()) {
        (Some(_), false) => {
            return Err(Rejection::bad("both Content-Length and Transfer-Encoding are present; send one of them"));
        }
        (None, false) if http10 => return Err(Rejection::bad("Transfer-Encoding is not allowed in HTTP/1.0")),
        (None, false) if transfer_encoding != ["chunked"] => {
            return Err(Rejection::bad("unsupported Transfer-Encoding; only `chunked` is accepted"));
        }
        (None, false) => Framing::Chunked,
        (Some(0), true) | (None, true) => Framing::None,
        (Some(n), true) => Framing::Length(n),
    };

    let raw_target = req.path.unwrap_or_default();
    let (target, authority) = parse_target(raw_target)?;
    if hosts > 1 {
        return Err(Rejection::bad("more than one Host header"));
    }
    let host_value = match authority {
        Some(a) => {
            // The worker must see the host it was routed by.
            let value = HeaderValue::from_str(&a).map_err(|_| Rejection::bad("invalid authority in the request target"))?;
            headers.insert(http::header::HOST, value);
            a
        }
        None => match headers.get(http::header::HOST) {
            Some(h) => h.to_str().map_err(|_| Rejection::bad("invalid Host header"))?.to_string(),
            None => return Err(Rejection::bad("missing Host header")),
        },
    };
    let host = normalize_host(&host_value).ok_or_else(|| Rejection::bad("invalid Host header"))?;

    let connection = header_tokens(&headers, http::header::CONNECTION);
    let keep_alive = if http10 { connection.iter().any(|t| t == "keep-alive") } else { !connection.iter().any(|t| t == "close") };
    let expect_continue = match headers.get(http::header::EXPECT) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => {
            return Err(Rejection::new(StatusCode::EXPECTATION_FAILED, "expectation_failed", "only `Expect: 100-continue` is supported"));
        }
    };

    Ok(Some((RequestHead { method, target, http10, headers, host, framing, keep_alive, expect_continue }, len)))
}

fn parse_content_length(raw: &[u8]) -> Option<u64> {
    let trimmed = raw.trim_ascii();
    if trimmed.is_empty() || trimmed.len() > 19 || !trimmed.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(trimmed).ok()?.parse().ok()
}

/// Origin-form (`/path?query`) or absolute-form (`http://host/path`); the
/// latter's authority replaces the Host header, as RFC 9112 says.
fn parse_target(raw: &str) -> Result<(String, Option<String>), Rejection> {
    if raw.starts_with('/') {
        let pq: http::uri::PathAndQuery = raw.parse().map_err(|_| Rejection::bad("invalid request target"))?;
        if raw.contains('#') {
            return Err(Rejection::bad("the request target must not contain a fragment (`#`)"));
        }
        return Ok((pq.as_str().to_string(), None));
    }
    let uri: http::Uri = raw.parse().map_err(|_| Rejection::bad("invalid request target"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(authority)) if authority.as_str().contains('@') => {
            Err(Rejection::bad("user info is not allowed in the request target"))
        }
        (Some("http" | "https"), Some(authority)) => {
            // `http://host?q` has an empty path: the origin-form is `/?q`.
            let path = if uri.path().is_empty() { "/" } else { uri.path() };
            let target = match uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            Ok((target, Some(authority.as_str().to_string())))
        }
        _ => Err(Rejection::bad("the request target must be a path like `/index.html`")),
    }
}

/// `Example.COM:8080` to `example.com`; `[::1]:80` to `[::1]`. `None` for
/// anything that is not a plausible host.
pub(crate) fn normalize_host(value: &str) -> Option<String> {
    let value = value.trim();
    let host = if let Some(rest) = value.strip_prefix('[') {
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))) {
            return None;
        }
        let inner = &rest[..end];
        if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') {
            return None;
        }
        return Some(format!("[{}]", inner.to_ascii_lowercase()));
    } else {
        match value.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => value,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

fn header_tokens(headers: &HeaderMap, name: HeaderName) -> Vec<String> {
    headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(|t| t.trim().to_ascii_lowercase()).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<(RequestHead, usize)>, Rejection> {
        parse_head(s.as_bytes(), 8192)
    }

    fn rejected(s: &str) -> Rejection {
        parse(s).expect_err("must be rejected")
    }

    #[test]
    fn a_plain_get_parses() {
        let (h, len) = parse("GET /a/b?c=d HTTP/1.1\r\nHost: Hello.LocalHost:8080\r\n\r\nrest").unwrap().unwrap();
        assert_eq!(h.target, "/a/b?c=d");
        assert_eq!(h.path(), "/a/b");
        assert_eq!(h.host, "hello.localhost");
        assert_eq!(h.framing, Framing::None);
        assert!(h.keep_alive);
        assert_eq!(len, "GET /a/b?c=d HTTP/1.1\r\nHost: Hello.LocalHost:8080\r\n\r\n".len());
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert!(parse("GET / HTTP/1.1\r\nHost: a").unwrap().is_none());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cl_te = rejected("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(cl_te.status, StatusCode::BAD_REQUEST);
        assert!(cl_te.message.contains("both"));
        let dup = rejected("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert!(dup.message.contains("conflicting"));
        let list = rejected("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n");
        assert!(list.message.contains("conflicting"));
        assert!(rejected("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n").message.contains("decimal"));
        assert!(rejected("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").message.contains("only"));
        assert!(rejected("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n").message.contains("only"));
        assert!(rejected("POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").message.contains("HTTP/1.0"));
        assert!(rejected("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").message.contains("more than one Host"));
        assert!(rejected("GET / HTTP/1.1\r\n\r\n").message.contains("missing Host"));
        assert!(rejected("GET / HTTP/1.1\r\nHost : a\r\n\r\n").message.contains("malformed"));
        assert!(rejected("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n").message.contains("malformed"));
    }

    #[test]
    fn identical_duplicate_lengths_are_one_length() {
        let (h, _) = parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::Length(5));
    }

    #[test]
    fn oversized_heads_get_431() {
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(rejected(&big).status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let partial = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(9000));
        assert_eq!(rejected(&partial).status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn targets_and_hosts() {
        let (h, _) = parse("GET http://Other.Example:81/x?y HTTP/1.1\r\nHost: a\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.host.as_str(), h.target.as_str()), ("other.example", "/x?y"));
        assert_eq!(h.headers.get("host").unwrap(), "Other.Example:81", "the Host header follows the routed authority");
        let (h, _) = parse("GET http://b.example/ HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.headers.get("host").unwrap(), "b.example");
        let (h, _) = parse("GET http://b.example?q=1 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.target, "/?q=1");
        assert!(parse("GET * HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(parse("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert_eq!(normalize_host("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("example.com.").as_deref(), Some("example.com"));
        assert!(normalize_host("a b").is_none());
        assert!(normalize_host("a:b").is_none());
        assert!(normalize_host("a/b").is_none());
    }

    #[test]
    fn connection_semantics() {
        let (h, _) = parse("GET / HTTP/1.0\r\nHost: a\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let (h, _) = parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let (h, _) = parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").unwrap().unwrap();
        assert!(h.expect_continue);
        assert_eq!(rejected("GET / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n").status, StatusCode::EXPECTATION_FAILED);
    }

    /// A small deterministic generator, so that failures reproduce.
    pub(crate) struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Mutates valid heads (flips, deletions, insertions of the bytes that
    /// matter to HTTP framing, truncation) and checks that parsing never
    /// panics and that whatever it accepts has one unambiguous framing.
    #[test]
    fn mutated_heads_never_panic_and_stay_unambiguous() {
        let seeds: [&[u8]; 4] = [
            b"GET /a?b HTTP/1.1\r\nHost: h.localhost\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n",
            b"PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
            b"GET http://h.example:80/p HTTP/1.0\r\nHost: other\r\n\r\n",
        ];
        let interesting = b"\r\n:, \t\x00\x7f\xff0123456789abcdefABCDEF-+;=/?#[]@chunkedContent-LengthTransfer-Encoding";
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut head = seeds[rng.below(seeds.len())].to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(head.len() + 1);
                match rng.below(4) {
                    0 if at < head.len() => head[at] = interesting[rng.below(interesting.len())],
                    1 if at < head.len() => {
                        head.remove(at);
                    }
                    2 => head.insert(at, interesting[rng.below(interesting.len())]),
                    _ => head.truncate(at),
                }
            }
            if let Ok(Some((h, len))) = parse_head(&head, 8192) {
                assert!(len <= head.len());
                let cl = h.headers.get_all(http::header::CONTENT_LENGTH).iter().count();
                let te = h.headers.get_all(http::header::TRANSFER_ENCODING).iter().count();
                assert!(!(cl > 0 && te > 0), "accepted both framings: {:?}", String::from_utf8_lossy(&head));
                match h.framing {
                    Framing::Chunked => assert!(te > 0 && !h.http10),
                    Framing::Length(_) => assert!(cl > 0 && te == 0),
                    Framing::None => assert_eq!(te, 0),
                }
                assert!(h.target.starts_with('/'), "target {:?} from {:?}", h.target, String::from_utf8_lossy(&head));
                assert!(!h.host.is_empty() && !h.host.contains(':') || h.host.starts_with('['));
            }
        }
    }
}
