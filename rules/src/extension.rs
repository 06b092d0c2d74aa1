use crate::InvalidValue;
use std::fmt;

/// The user part that identifies a PBX extension (the SIP username it registers with).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtensionId(String);

impl ExtensionId {
    pub const MAX_LEN: usize = 32;

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        let err = |reason| InvalidValue::ExtensionId {
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(err("it is empty"));
        }
        if value.len() > Self::MAX_LEN {
            return Err(err("it is longer than 32 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(err("it contains a character that is not allowed"));
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExtensionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("101", true),
            ("alice", true),
            ("sales.desk-2_b", true),
            ("", false),
            ("a@b", false),
            ("a b", false),
            (&"9".repeat(33), false),
        ];
        for (input, ok) in cases {
            assert_eq!(ExtensionId::parse(input).is_ok(), ok, "{input:?}");
        }
    }
}
