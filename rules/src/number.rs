use crate::InvalidValue;
use std::fmt;

/// A telephone number in E.164 form: `+`, a country code not starting with 0, 8 to 15 digits in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct E164(String);

impl E164 {
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        let err = |reason| InvalidValue::E164 {
            value: value.to_string(),
            reason,
        };
        let digits = value
            .strip_prefix('+')
            .ok_or_else(|| err("it must start with '+'"))?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("only digits may follow '+'"));
        }
        if digits.starts_with('0') {
            return Err(err("a country code never starts with 0"));
        }
        if !(8..=15).contains(&digits.len()) {
            return Err(err("it must have 8 to 15 digits"));
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digits without the leading '+'.
    pub fn digits(&self) -> &str {
        &self.0[1..]
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for E164 {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases = [
            ("+15017122661", true),
            ("+447911123456", true),
            ("+4930123456", true),
            ("15017122661", false),
            ("+1 501 712 2661", false),
            ("+0123456789", false),
            ("+1234567", false),
            ("+1234567890123456", false),
            ("+", false),
            ("", false),
            ("+1501712266a", false),
        ];
        for (input, ok) in cases {
            assert_eq!(E164::parse(input).is_ok(), ok, "{input}");
        }
    }

    #[test]
    fn error_names_the_value() {
        let err = E164::parse("5551234").unwrap_err().to_string();
        assert!(err.contains("\"5551234\""), "{err}");
        assert!(err.contains("must start with '+'"), "{err}");
    }

    proptest! {
        #[test]
        fn valid_numbers_round_trip(d in "[1-9][0-9]{7,14}") {
            let n = E164::parse(&format!("+{d}")).unwrap();
            prop_assert_eq!(n.digits(), d.as_str());
        }

        #[test]
        fn never_panics(s in ".{0,20}") {
            let _ = E164::parse(&s);
        }
    }
}
