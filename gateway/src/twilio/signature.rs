//! `X-Twilio-Signature`, exactly as twilio-python's `RequestValidator` computes it: HMAC-SHA1 over
//! the URL Twilio requested followed by every POST parameter, names sorted by byte order, each
//! name's distinct values sorted, `name + value` appended without separators; base64.
//! JSON bodies are signed over the URL alone (which carries `bodySHA256`) plus the body's hash.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use subtle::ConstantTimeEq;

pub fn compute(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut by_name: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (k, v) in params {
        by_name.entry(k).or_default().insert(v);
    }
    let mut mac =
        <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    for (name, values) in by_name {
        for value in values {
            mac.update(name.as_bytes());
            mac.update(value.as_bytes());
        }
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The URL with its port removed, and with the scheme's default port added, as Twilio signs
/// either depending on its edge.
fn url_variants(url: &str) -> [String; 2] {
    let Some((scheme, rest)) = url.split_once("://") else {
        return [url.to_string(), url.to_string()];
    };
    let (netloc, path) = rest
        .find('/')
        .map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    let host = netloc
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()));
    match host {
        Some((h, _)) => [format!("{scheme}://{h}{path}"), url.to_string()],
        None => {
            let port = if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            };
            [url.to_string(), format!("{scheme}://{netloc}:{port}{path}")]
        }
    }
}

fn body_sha256(url: &str) -> Option<&str> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("bodySHA256="))
}

/// Checks a request Twilio signed. `url` is rebuilt from the configured public URL with the raw
/// query; `params` are the decoded form pairs (empty for JSON); `json_body` is the raw body when
/// it is JSON. Comparisons are constant-time.
pub fn validate(
    auth_token: &str,
    url: &str,
    params: &[(String, String)],
    json_body: Option<&[u8]>,
    signature: &str,
) -> bool {
    if let Some(body) = json_body {
        let Some(expected) = body_sha256(url) else {
            return false;
        };
        let actual = hex(&Sha256::digest(body));
        if !bool::from(
            actual
                .as_bytes()
                .ct_eq(expected.to_ascii_lowercase().as_bytes()),
        ) {
            return false;
        }
        return url_variants(url).iter().any(|u| {
            bool::from(
                compute(auth_token, u, &[])
                    .as_bytes()
                    .ct_eq(signature.as_bytes()),
            )
        });
    }
    url_variants(url).iter().any(|u| {
        bool::from(
            compute(auth_token, u, params)
                .as_bytes()
                .ct_eq(signature.as_bytes()),
        )
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// twilio-python's own test vectors (RequestValidator), and ones made with it.
    #[test]
    fn twilio_vectors() {
        let params = p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            compute("12345", url, &params),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert_eq!(
            compute(
                "12345",
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                &params
            ),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        assert_eq!(
            compute(
                "12345",
                "http://mycompany.com:80/myapp.php?foo=1&bar=2",
                &params
            ),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        );
        assert_eq!(
            compute(
                "12345",
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
                &params
            ),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        );
        // Either port form validates against either signature.
        assert!(validate(
            "12345",
            url,
            &params,
            None,
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        ));
        assert!(validate(
            "12345",
            "https://mycompany.com:443/myapp.php?foo=1&bar=2",
            &params,
            None,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!validate(
            "12345",
            url,
            &params,
            None,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8"
        ));

        let multi = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            compute("12345", url, &multi),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );

        let body = br#"{"property": "value", "boolean": true}"#;
        let json_url = "https://mycompany.com/myapp.php?foo=1&bar=2&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert!(validate(
            "12345",
            json_url,
            &[],
            Some(body),
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));
        assert!(!validate(
            "12345",
            json_url,
            &[],
            Some(b"{}"),
            "a9nBmqA0ju/hNViExpshrM61xv4="
        ));

        let sms = p(&[
            ("AccountSid", "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("ApiVersion", "2010-04-01"),
            ("Body", "Hello + ünïcode & ="),
            ("From", "+15558675310"),
            ("MessageSid", "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("NumMedia", "0"),
            ("NumSegments", "1"),
            ("SmsMessageSid", "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("SmsSid", "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("SmsStatus", "received"),
            ("To", "+15017122661"),
        ]);
        let token = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            compute(token, "https://gw.example.com/twilio/sms", &sms),
            "F1CKuK8Ek4KQAKRwvCpqU7S9MRM="
        );
        assert_eq!(
            compute(token, "https://gw.example.com:443/twilio/sms", &sms),
            "Vg3cW27r/RDi/rDzzju9Wiemod0="
        );
        let status = p(&[
            ("AccountSid", "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("ApiVersion", "2010-04-01"),
            ("From", "+15017122661"),
            ("MessageSid", "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("MessageStatus", "delivered"),
            ("SmsSid", "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("SmsStatus", "delivered"),
            ("To", "+15558675310"),
            ("RawDlrDoneDate", "2403011230"),
        ]);
        assert_eq!(
            compute(
                token,
                "https://gw.example.com/twilio/status?tenant=7",
                &status
            ),
            "qgzRmX3lav/jDKgB152k+VzdtfA="
        );
    }

    #[test]
    fn any_change_breaks_it() {
        let params = p(&[("Body", "hi"), ("From", "+15550001111")]);
        let url = "https://gw.example.com/twilio/sms/tok";
        let sig = compute("secret", url, &params);
        assert!(validate("secret", url, &params, None, &sig));
        assert!(!validate("secret2", url, &params, None, &sig));
        assert!(!validate(
            "secret",
            "https://gw.example.com/twilio/sms/tok2",
            &params,
            None,
            &sig
        ));
        assert!(!validate(
            "secret",
            url,
            &p(&[("Body", "hi!"), ("From", "+15550001111")]),
            None,
            &sig
        ));
        assert!(!validate("secret", url, &p(&[("Body", "hi")]), None, &sig));
        assert!(!validate("secret", url, &params, None, ""));
    }
}
