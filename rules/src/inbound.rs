//! Inbound rules: ordered, first match wins, like a PBX's inbound call routes.

use crate::{ExtensionId, E164};
use regex::Regex;

/// One entry of a rule's `did` list.
#[derive(Debug, Clone)]
pub enum DidPattern {
    Exact(E164),
    /// `"+1501712266[0-9]"`: digits with character classes.
    Class(Regex),
    /// `"+1501*"`.
    Prefix(String),
}

impl DidPattern {
    pub fn parse(value: &str) -> Result<Self, String> {
        if let Some(prefix) = value.strip_suffix('*') {
            if prefix.starts_with('+') && prefix[1..].bytes().all(|b| b.is_ascii_digit()) {
                return Ok(Self::Prefix(prefix.to_string()));
            }
            return Err(format!(
                "{value:?}: a prefix is '+' and digits followed by '*'"
            ));
        }
        if value.contains('[') {
            let ok = value.starts_with('+')
                && value[1..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || matches!(b, b'[' | b']' | b'-'));
            let re = ok
                .then(|| Regex::new(&format!("^\\{value}$")).ok())
                .flatten()
                .ok_or_else(|| {
                    format!("{value:?}: a range is '+' and digits with classes like [0-9]")
                })?;
            return Ok(Self::Class(re));
        }
        E164::parse(value)
            .map(Self::Exact)
            .map_err(|e| e.to_string())
    }

    fn matches(&self, did: &E164) -> bool {
        match self {
            Self::Exact(n) => n == did,
            Self::Class(re) => re.is_match(did.as_str()),
            Self::Prefix(p) => did.as_str().starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Extension(ExtensionId),
    Trunk(String),
    Forward(E164),
    Drop,
}

impl Target {
    pub fn parse(value: &str) -> Result<Self, String> {
        if value == "drop" {
            return Ok(Self::Drop);
        }
        if let Some(t) = value.strip_prefix("trunk:") {
            return if t.is_empty() {
                Err("\"trunk:\" needs a trunk name".into())
            } else {
                Ok(Self::Trunk(t.to_string()))
            };
        }
        if let Some(n) = value.strip_prefix("forward:") {
            return E164::parse(n).map(Self::Forward).map_err(|e| e.to_string());
        }
        ExtensionId::parse(value)
            .map(Self::Extension)
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct InboundRule {
    pub name: String,
    /// Empty: any DID of the configuration.
    pub did: Vec<DidPattern>,
    pub from: Option<Regex>,
    pub sms: Option<String>,
    pub to: Vec<Target>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Rule {
        name: String,
        targets: Vec<Target>,
    },
    /// No rule matched, but the DID is an extension's own number.
    Owner(ExtensionId),
    Unroutable,
}

/// Routes an SMS that arrived on `did` from `from` through configuration `sms`.
/// `owner_of` says which extension lists the DID among its `dids`.
pub fn route_inbound(
    rules: &[InboundRule],
    sms: &str,
    did: &E164,
    from: &str,
    owner_of: impl Fn(&E164) -> Option<ExtensionId>,
) -> Decision {
    for rule in rules {
        if rule.sms.as_deref().is_some_and(|s| s != sms) {
            continue;
        }
        if !rule.did.is_empty() && !rule.did.iter().any(|p| p.matches(did)) {
            continue;
        }
        if rule.from.as_ref().is_some_and(|re| !re.is_match(from)) {
            continue;
        }
        return Decision::Rule {
            name: rule.name.clone(),
            targets: rule.to.clone(),
        };
    }
    owner_of(did).map_or(Decision::Unroutable, Decision::Owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        name: &str,
        did: &[&str],
        from: Option<&str>,
        sms: Option<&str>,
        to: &[&str],
    ) -> InboundRule {
        InboundRule {
            name: name.into(),
            did: did.iter().map(|d| DidPattern::parse(d).unwrap()).collect(),
            from: from.map(|f| Regex::new(f).unwrap()),
            sms: sms.map(Into::into),
            to: to.iter().map(|t| Target::parse(t).unwrap()).collect(),
        }
    }

    #[test]
    fn table() {
        let rules = vec![
            rule("spam", &[], Some(r"^\+1900"), None, &["drop"]),
            rule(
                "sales",
                &["+15017122661"],
                None,
                Some("main"),
                &["101", "102"],
            ),
            rule(
                "support range",
                &["+1501712267[0-9]"],
                None,
                None,
                &["trunk:pbx"],
            ),
            rule("uk", &["+44*"], None, None, &["forward:+15557654321"]),
        ];
        let owner =
            |d: &E164| (d.as_str() == "+15017122699").then(|| ExtensionId::parse("103").unwrap());
        let n = |s: &str| E164::parse(s).unwrap();
        let cases = [
            ("main", "+15017122661", "+15550001111", "sales"),
            ("other", "+15017122661", "+15550001111", "unroutable"),
            ("main", "+15017122675", "+15550001111", "support range"),
            ("main", "+447700900123", "+15550001111", "uk"),
            ("main", "+15017122661", "+19005551234", "spam"),
            ("main", "+15017122699", "+15550001111", "owner 103"),
            ("main", "+15017122600", "+15550001111", "unroutable"),
        ];
        for (sms, did, from, want) in cases {
            let got = match route_inbound(&rules, sms, &n(did), from, owner) {
                Decision::Rule { name, .. } => name,
                Decision::Owner(ext) => format!("owner {ext}"),
                Decision::Unroutable => "unroutable".into(),
            };
            assert_eq!(got, want, "{sms} {did} {from}");
        }
    }

    #[test]
    fn patterns_and_targets_parse() {
        assert!(DidPattern::parse("+1501712266[0-9]").is_ok());
        assert!(DidPattern::parse("+1501*").is_ok());
        assert!(DidPattern::parse("1501*").is_err());
        assert!(DidPattern::parse("+1501(.*)[").is_err());
        assert_eq!(Target::parse("trunk:pbx"), Ok(Target::Trunk("pbx".into())));
        assert!(Target::parse("forward:555").is_err());
        assert_eq!(Target::parse("drop"), Ok(Target::Drop));
    }
}
