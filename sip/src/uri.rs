//! Typed views of the header values smsgw reads: Via, name-addr (From/To/Contact) and SIP URIs.

use std::fmt::Write as _;
use std::net::SocketAddr;

/// `;name=value` parameters in order; values keep their quotes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params(pub Vec<(String, Option<String>)>);

impl Params {
    fn parse(text: &str) -> Self {
        Self(
            text.split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
                    None => (p.to_string(), None),
                })
                .collect(),
        )
    }

    /// `Some(None)` for a flag parameter such as `;rport`, `Some(Some(v))` for `;k=v`.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref())
    }

    pub fn set(&mut self, name: &str, value: Option<String>) {
        match self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(entry) => entry.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }

    fn write(&self, out: &mut String) {
        for (k, v) in &self.0 {
            match v {
                Some(v) => {
                    let _ = write!(out, ";{k}={v}");
                }
                None => {
                    let _ = write!(out, ";{k}");
                }
            }
        }
    }
}

/// One Via element: `SIP/2.0/UDP host:port;params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
}

impl Via {
    pub fn parse(text: &str) -> Option<Self> {
        let (proto, rest) = text.trim().split_once(char::is_whitespace)?;
        let transport = proto
            .strip_prefix("SIP/2.0/")
            .or_else(|| proto.strip_prefix("sip/2.0/"))?;
        let rest = rest.trim_start();
        let (sent_by, params) = rest.split_once(';').unwrap_or((rest, ""));
        let (host, port) = split_host_port(sent_by.trim())?;
        Some(Self {
            transport: transport.to_ascii_uppercase(),
            host,
            port,
            params: Params::parse(params),
        })
    }

    pub fn branch(&self) -> Option<&str> {
        self.params.get("branch").flatten()
    }

    /// RFC 3581: record where the request really came from.
    pub fn set_received(&mut self, source: SocketAddr) {
        self.params.set("received", Some(source.ip().to_string()));
        if self.params.get("rport").is_some() {
            self.params.set("rport", Some(source.port().to_string()));
        }
    }

    pub fn sent_by(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = format!("SIP/2.0/{} {}", self.transport, self.sent_by());
        self.params.write(&mut out);
        f.write_str(&out)
    }
}

fn split_host_port(text: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((format!("[{host}]"), port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse().ok()?)),
        None => (text, None),
    };
    if host.is_empty() || host.contains([' ', '<', '>', '@']) {
        return None;
    }
    Some((host.to_string(), port))
}

/// `"Display" <uri>;params` or a bare `uri;params` (From, To, Contact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    pub display: Option<String>,
    pub uri: String,
    pub params: Params,
}

impl NameAddr {
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Some(open) = find_unquoted(text, b'<') {
            let close = open + text[open..].find('>')?;
            let display = text[..open].trim().trim_matches('"').trim();
            return Some(Self {
                display: (!display.is_empty()).then(|| display.to_string()),
                uri: text[open + 1..close].trim().to_string(),
                params: Params::parse(&text[close + 1..]),
            });
        }
        // addr-spec form: parameters after the URI belong to the header, not the URI.
        let (uri, params) = text.split_once(';').unwrap_or((text, ""));
        if uri.is_empty() || uri.contains(char::is_whitespace) {
            return None;
        }
        Some(Self {
            display: None,
            uri: uri.to_string(),
            params: Params::parse(params),
        })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).flatten()
    }

    pub fn sip_uri(&self) -> Option<SipUri> {
        SipUri::parse(&self.uri)
    }
}

fn find_unquoted(text: &str, needle: u8) -> Option<usize> {
    let mut quoted = false;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b if b == needle && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Sip,
    Sips,
    Tel,
}

/// The parts of a `sip:`, `sips:` or `tel:` URI that routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    pub scheme: Scheme,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub params: Params,
}

impl SipUri {
    pub fn parse(text: &str) -> Option<Self> {
        let (scheme, rest) = text.trim().split_once(':')?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "sip" => Scheme::Sip,
            "sips" => Scheme::Sips,
            "tel" => Scheme::Tel,
            _ => return None,
        };
        let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
        let (main, params) = rest.split_once(';').unwrap_or((rest, ""));
        if scheme == Scheme::Tel {
            if main.is_empty() {
                return None;
            }
            return Some(Self {
                scheme,
                user: Some(main.to_string()),
                host: String::new(),
                port: None,
                params: Params::parse(params),
            });
        }
        let (user, hostport) = match main.rsplit_once('@') {
            Some((u, h)) => (Some(u.split_once(':').map_or(u, |(u, _)| u)), h),
            None => (None, main),
        };
        let (host, port) = split_host_port(hostport)?;
        Some(Self {
            scheme,
            user: user.filter(|u| !u.is_empty()).map(str::to_string),
            host,
            port,
            params: Params::parse(params),
        })
    }

    /// The `transport=` parameter, lower-cased.
    pub fn transport(&self) -> Option<String> {
        self.params
            .get("transport")
            .flatten()
            .map(str::to_ascii_lowercase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn via_round_trip_and_received() {
        let mut via = Via::parse("SIP/2.0/UDP 10.0.0.7:5062;branch=z9hG4bK776;rport").unwrap();
        assert_eq!(via.transport, "UDP");
        assert_eq!(via.sent_by(), "10.0.0.7:5062");
        assert_eq!(via.branch(), Some("z9hG4bK776"));
        via.set_received("203.0.113.9:40000".parse().unwrap());
        assert_eq!(
            via.to_string(),
            "SIP/2.0/UDP 10.0.0.7:5062;branch=z9hG4bK776;rport=40000;received=203.0.113.9"
        );
        // Without ;rport the port stays untouched, but received is always set (RFC 3581 §4).
        let mut plain = Via::parse("SIP/2.0/TCP host;branch=z9hG4bK1").unwrap();
        plain.set_received("192.0.2.1:5060".parse().unwrap());
        assert_eq!(plain.params.get("received"), Some(Some("192.0.2.1")));
        assert_eq!(plain.params.get("rport"), None);
    }

    #[test]
    fn via_ipv6_and_garbage() {
        let via = Via::parse("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKa").unwrap();
        assert_eq!(via.host, "[2001:db8::1]");
        assert_eq!(via.port, Some(5060));
        assert!(Via::parse("garbage").is_none());
        assert!(Via::parse("SIP/2.0/UDP host:notaport").is_none());
    }

    #[test]
    fn name_addr_forms() {
        let na = NameAddr::parse(r#""Alice, A" <sip:101@pbx.example.com;transport=tcp>;tag=99"#)
            .unwrap();
        assert_eq!(na.display.as_deref(), Some("Alice, A"));
        assert_eq!(na.uri, "sip:101@pbx.example.com;transport=tcp");
        assert_eq!(na.param("tag"), Some("99"));
        let bare = NameAddr::parse("sip:101@10.0.0.1:5060;expires=60").unwrap();
        assert_eq!(bare.uri, "sip:101@10.0.0.1:5060");
        assert_eq!(bare.param("expires"), Some("60"));
    }

    #[test]
    fn uris() {
        let u = SipUri::parse("sip:101:secret@10.0.0.1:5070;transport=TCP?x=y").unwrap();
        assert_eq!(u.user.as_deref(), Some("101"));
        assert_eq!(u.host, "10.0.0.1");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.transport().as_deref(), Some("tcp"));
        let t = SipUri::parse("tel:+15551234567;phone-context=x").unwrap();
        assert_eq!(t.scheme, Scheme::Tel);
        assert_eq!(t.user.as_deref(), Some("+15551234567"));
        assert!(SipUri::parse("http://x").is_none());
        assert!(SipUri::parse("sip:").is_none());
    }
}
