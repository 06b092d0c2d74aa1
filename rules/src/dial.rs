//! What a phone dialed, reduced to the digits rules match on.

use crate::InvalidValue;

/// Strips visual separators (space, `-`, `.`, `(`, `)`, `/`) and percent-encoded spaces; keeps a
/// leading `+`. Anything else that is not a digit is refused.
pub fn normalize_dialed(dialed: &str) -> Result<String, InvalidValue> {
    let decoded = dialed
        .replace("%20", " ")
        .replace("%2B", "+")
        .replace("%2b", "+");
    let mut out = String::with_capacity(decoded.len());
    for (i, c) in decoded.trim().chars().enumerate() {
        match c {
            '+' if i == 0 => out.push('+'),
            '0'..='9' => out.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' => {}
            _ => {
                return Err(InvalidValue::Dialed {
                    value: dialed.to_string(),
                })
            }
        }
    }
    if out.trim_start_matches('+').is_empty() {
        return Err(InvalidValue::Dialed {
            value: dialed.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("+15551234567", Some("+15551234567")),
            ("15551234567", Some("15551234567")),
            ("(555) 123-4567", Some("5551234567")),
            ("011 44 20 7946 0958", Some("011442079460958")),
            ("+1.555.123.4567", Some("+15551234567")),
            ("%2B15551234567", Some("+15551234567")),
            ("555-CALL", None),
            ("1+5", None),
            ("", None),
            ("+", None),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_dialed(input).ok().as_deref(), want, "{input:?}");
        }
    }
}
