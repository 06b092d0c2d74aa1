use crate::InvalidValue;
use std::fmt;

/// An Alphanumeric Sender ID: 1 to 11 characters of A–Z, a–z, 0–9 and space, at least one letter
/// (Twilio refuses digit-only ids, which carriers would take for a number).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SenderId(String);

impl SenderId {
    pub const MAX_LEN: usize = 11;

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        let err = |reason| InvalidValue::SenderId {
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(err("it is empty"));
        }
        if value.chars().count() > Self::MAX_LEN {
            return Err(err("it is longer than 11 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b' ')
        {
            return Err(err(
                "it contains a character other than A-Z, a-z, 0-9 or space",
            ));
        }
        if !value.bytes().any(|b| b.is_ascii_alphabetic()) {
            return Err(err("it has no letter"));
        }
        if value.trim() != value {
            return Err(err("it starts or ends with a space"));
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SenderId {
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
            ("ACME", true),
            ("Acme Corp", true),
            ("ABCDEFGHIJK", true),
            ("A1", true),
            ("ABCDEFGHIJKL", false),
            ("12345", false),
            ("", false),
            ("ACME!", false),
            ("Café", false),
            (" ACME", false),
            ("1 2 3", false),
        ];
        for (input, ok) in cases {
            assert_eq!(SenderId::parse(input).is_ok(), ok, "{input:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let long = SenderId::parse("ABCDEFGHIJKL").unwrap_err().to_string();
        assert!(long.contains("longer than 11"), "{long}");
        let digits = SenderId::parse("12345").unwrap_err().to_string();
        assert!(digits.contains("no letter"), "{digits}");
    }
}
