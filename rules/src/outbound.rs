//! Outbound rules: ordered, first match wins, like a PBX's outbound call routes.

use crate::{ExtensionId, SenderId, E164};
use regex::Regex;

/// Who sent the MESSAGE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    Extension(&'a str),
    Trunk(&'a str),
}

/// One entry of a rule's `from` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourcePattern {
    Extension(ExtensionId),
    /// `"101-199"`: numeric extension ids in the range, inclusive.
    Range(u64, u64),
    /// `"trunk:pbx"`.
    Trunk(String),
}

impl SourcePattern {
    pub fn parse(value: &str) -> Result<Self, String> {
        if let Some(name) = value.strip_prefix("trunk:") {
            return if name.is_empty() {
                Err("\"trunk:\" needs a trunk name".into())
            } else {
                Ok(Self::Trunk(name.to_string()))
            };
        }
        if let Some((lo, hi)) = value.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<u64>(), hi.trim().parse::<u64>()) {
                return if lo <= hi {
                    Ok(Self::Range(lo, hi))
                } else {
                    Err(format!("range {value:?} runs backwards"))
                };
            }
        }
        ExtensionId::parse(value)
            .map(Self::Extension)
            .map_err(|e| e.to_string())
    }

    fn matches(&self, source: Source<'_>) -> bool {
        match (self, source) {
            (Self::Extension(id), Source::Extension(ext)) => id.as_str() == ext,
            (Self::Range(lo, hi), Source::Extension(ext)) => {
                ext.parse::<u64>().is_ok_and(|n| (*lo..=*hi).contains(&n))
            }
            (Self::Trunk(name), Source::Trunk(trunk)) => name == trunk,
            _ => false,
        }
    }
}

/// How the sender of the SMS is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderChoice {
    /// The extension's default DID (or the DID the remote party last texted: reply routing).
    Extension,
    Did(E164),
    SenderId,
    MessagingService,
}

impl SenderChoice {
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "extension" => Ok(Self::Extension),
            "sender_id" => Ok(Self::SenderId),
            "messaging_service" => Ok(Self::MessagingService),
            other => match other.strip_prefix("did:") {
                Some(n) => E164::parse(n).map(Self::Did).map_err(|e| e.to_string()),
                None => Err(format!(
                    "{other:?} is not \"extension\", \"did:+…\", \"sender_id\" or \"messaging_service\""
                )),
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct OutboundRule {
    pub name: String,
    /// Empty: anyone.
    pub from: Vec<SourcePattern>,
    /// Matched against the dialed digits after separators are stripped.
    pub to: Regex,
    /// `$1`-style expansion of `to`'s captures; the result must be E.164.
    pub rewrite: String,
    pub sms: String,
    pub sender: SenderChoice,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no outbound rule matches {dialed} from this source")]
    NoRule { dialed: String },
    #[error("rule {rule:?} rewrote {dialed} to {result:?}, which is not E.164")]
    NotE164 {
        rule: String,
        dialed: String,
        result: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'a> {
    pub rule: &'a str,
    pub to: E164,
    pub sms: &'a str,
    pub sender: &'a SenderChoice,
}

/// The first rule whose `from` admits the source and whose `to` matches `dialed` (normalized
/// digits, see [`crate::dial::normalize_dialed`]).
pub fn route<'a>(
    rules: &'a [OutboundRule],
    source: Source<'_>,
    dialed: &str,
) -> Result<Route<'a>, RouteError> {
    for rule in rules {
        if !rule.from.is_empty() && !rule.from.iter().any(|p| p.matches(source)) {
            continue;
        }
        let Some(caps) = rule.to.captures(dialed) else {
            continue;
        };
        let mut result = String::new();
        caps.expand(&rule.rewrite, &mut result);
        let to = E164::parse(&result).map_err(|_| RouteError::NotE164 {
            rule: rule.name.clone(),
            dialed: dialed.to_string(),
            result: result.clone(),
        })?;
        return Ok(Route {
            rule: &rule.name,
            to,
            sms: &rule.sms,
            sender: &rule.sender,
        });
    }
    Err(RouteError::NoRule {
        dialed: dialed.to_string(),
    })
}

/// The sender the SMS goes out from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    Number(E164),
    Alpha(SenderId),
    Service(String),
}

impl Sender {
    /// The value stored and shown: the number, the alpha id or the MG… sid.
    pub fn label(&self) -> &str {
        match self {
            Self::Number(n) => n.as_str(),
            Self::Alpha(a) => a.as_str(),
            Self::Service(s) => s,
        }
    }
}

/// What the chosen SMS configuration offers.
#[derive(Debug, Clone, Copy)]
pub struct SenderOptions<'a> {
    pub dids: &'a [E164],
    pub sender_id: Option<&'a SenderId>,
    pub messaging_service_sid: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    #[error("the sending extension has no DID in this SMS configuration")]
    NoDid,
    #[error("a trunk has no default DID; use a rule with sender \"did:…\", \"sender_id\" or \"messaging_service\"")]
    TrunkNeedsExplicitSender,
    #[error("DID {0} is not one of this SMS configuration's numbers")]
    ForeignDid(E164),
    #[error("this SMS configuration has no sender_id")]
    NoSenderId,
    #[error("this SMS configuration has no messaging_service_sid")]
    NoMessagingService,
}

/// Picks the sender. `extension_dids` are the sending extension's DIDs (first = default);
/// `reply_did` is one of them that the recipient texted recently, which wins for "extension".
pub fn choose_sender(
    choice: &SenderChoice,
    source: Source<'_>,
    extension_dids: &[E164],
    reply_did: Option<&E164>,
    options: SenderOptions<'_>,
) -> Result<Sender, SenderError> {
    match choice {
        SenderChoice::Extension => {
            if matches!(source, Source::Trunk(_)) {
                return Err(SenderError::TrunkNeedsExplicitSender);
            }
            let usable = |d: &&E164| options.dids.contains(d);
            reply_did
                .filter(|d| extension_dids.contains(d))
                .filter(usable)
                .or_else(|| extension_dids.iter().find(usable))
                .cloned()
                .map(Sender::Number)
                .ok_or(SenderError::NoDid)
        }
        SenderChoice::Did(did) => {
            if options.dids.contains(did) {
                Ok(Sender::Number(did.clone()))
            } else {
                Err(SenderError::ForeignDid(did.clone()))
            }
        }
        SenderChoice::SenderId => options
            .sender_id
            .cloned()
            .map(Sender::Alpha)
            .ok_or(SenderError::NoSenderId),
        SenderChoice::MessagingService => options
            .messaging_service_sid
            .map(|s| Sender::Service(s.to_string()))
            .ok_or(SenderError::NoMessagingService),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, from: &[&str], to: &str, rewrite: &str, sender: &str) -> OutboundRule {
        OutboundRule {
            name: name.into(),
            from: from
                .iter()
                .map(|f| SourcePattern::parse(f).unwrap())
                .collect(),
            to: Regex::new(to).unwrap(),
            rewrite: rewrite.into(),
            sms: "main".into(),
            sender: SenderChoice::parse(sender).unwrap(),
        }
    }

    fn rules() -> Vec<OutboundRule> {
        vec![
            rule(
                "uk",
                &["101-199"],
                r"^(?:\+|011|00)44(\d{9,10})$",
                "+44$1",
                "sender_id",
            ),
            rule(
                "north-america",
                &["101-199", "trunk:pbx"],
                r"^\+?1?([2-9]\d{9})$",
                "+1$1",
                "extension",
            ),
            rule("broken", &["200"], r"^(\d+)$", "$1", "extension"),
            rule(
                "any-e164",
                &[],
                r"^(\+[1-9]\d{7,14})$",
                "$1",
                "messaging_service",
            ),
        ]
    }

    #[test]
    fn table() {
        let rules = rules();
        let ext = Source::Extension;
        type Case<'a> = (Source<'a>, &'a str, Result<(&'a str, &'a str), &'a str>);
        let cases: Vec<Case> = vec![
            (
                ext("101"),
                "+15551234567",
                Ok(("north-america", "+15551234567")),
            ),
            (
                ext("150"),
                "15551234567",
                Ok(("north-america", "+15551234567")),
            ),
            (
                ext("199"),
                "5551234567",
                Ok(("north-america", "+15551234567")),
            ),
            (ext("101"), "011442079460958", Ok(("uk", "+442079460958"))),
            (ext("101"), "00442079460958", Ok(("uk", "+442079460958"))),
            (
                Source::Trunk("pbx"),
                "5551234567",
                Ok(("north-america", "+15551234567")),
            ),
            // Outside the range, only the catch-all applies, which needs a '+'.
            (ext("250"), "5551234567", Err("no rule")),
            (ext("250"), "+4930123456", Ok(("any-e164", "+4930123456"))),
            (
                Source::Trunk("other"),
                "+15551234567",
                Ok(("any-e164", "+15551234567")),
            ),
            (ext("101"), "1234", Err("no rule")),
            (ext("200"), "5551234", Err("not e164")),
        ];
        for (source, dialed, want) in cases {
            let got = route(&rules, source, dialed);
            match (want, got) {
                (Ok((name, to)), Ok(r)) => {
                    assert_eq!((r.rule, r.to.as_str()), (name, to), "{source:?} {dialed}")
                }
                (Err("no rule"), Err(RouteError::NoRule { .. })) => {}
                (Err("not e164"), Err(RouteError::NotE164 { .. })) => {}
                (want, got) => panic!("{source:?} {dialed}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn source_patterns_parse() {
        assert_eq!(
            SourcePattern::parse("101-199"),
            Ok(SourcePattern::Range(101, 199))
        );
        assert_eq!(
            SourcePattern::parse("trunk:pbx"),
            Ok(SourcePattern::Trunk("pbx".into()))
        );
        assert!(SourcePattern::parse("199-101").is_err());
        assert!(SourcePattern::parse("trunk:").is_err());
        assert!(SourcePattern::parse("a b").is_err());
        assert!(SenderChoice::parse("did:+15017122661").is_ok());
        assert!(SenderChoice::parse("did:5017122661").is_err());
        assert!(SenderChoice::parse("alpha").is_err());
    }

    #[test]
    fn sender_choice_and_reply_routing() {
        let d1 = E164::parse("+15017122661").unwrap();
        let d2 = E164::parse("+15017122662").unwrap();
        let other = E164::parse("+15017120000").unwrap();
        let alpha = SenderId::parse("ACME").unwrap();
        let opts = SenderOptions {
            dids: &[d1.clone(), d2.clone()],
            sender_id: Some(&alpha),
            messaging_service_sid: None,
        };
        let ext = Source::Extension("101");
        let mine = [d1.clone(), d2.clone()];
        let pick = |choice: &str, reply: Option<&E164>| {
            choose_sender(
                &SenderChoice::parse(choice).unwrap(),
                ext,
                &mine,
                reply,
                opts,
            )
        };
        assert_eq!(pick("extension", None), Ok(Sender::Number(d1.clone())));
        assert_eq!(pick("extension", Some(&d2)), Ok(Sender::Number(d2.clone())));
        // A reply DID that is not the extension's own never wins.
        assert_eq!(
            pick("extension", Some(&other)),
            Ok(Sender::Number(d1.clone()))
        );
        assert_eq!(pick("sender_id", None), Ok(Sender::Alpha(alpha.clone())));
        assert_eq!(
            pick("messaging_service", None),
            Err(SenderError::NoMessagingService)
        );
        assert_eq!(
            pick("did:+15017120000", None),
            Err(SenderError::ForeignDid(other.clone()))
        );
        assert_eq!(
            choose_sender(
                &SenderChoice::Extension,
                Source::Trunk("pbx"),
                &[],
                None,
                opts
            ),
            Err(SenderError::TrunkNeedsExplicitSender)
        );
        assert_eq!(
            choose_sender(&SenderChoice::Extension, ext, &[other], None, opts),
            Err(SenderError::NoDid)
        );
    }
}
