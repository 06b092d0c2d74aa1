//! Opt-out, opt-in and help keywords, as Twilio's long codes treat them: an exact single word,
//! any case.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyword {
    OptOut,
    OptIn,
    Help,
}

pub fn classify(body: &str) -> Option<Keyword> {
    let word = body.trim().to_ascii_uppercase();
    match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "REVOKE" | "OPTOUT" => {
            Some(Keyword::OptOut)
        }
        "START" | "YES" | "UNSTOP" => Some(Keyword::OptIn),
        "HELP" | "INFO" => Some(Keyword::Help),
        _ => None,
    }
}

/// Twilio's `OptOutType` webhook parameter (Advanced Opt-Out), which wins over the body.
pub fn from_opt_out_type(value: &str) -> Option<Keyword> {
    match value.to_ascii_uppercase().as_str() {
        "STOP" => Some(Keyword::OptOut),
        "START" => Some(Keyword::OptIn),
        "HELP" => Some(Keyword::Help),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("STOP", Some(Keyword::OptOut)),
            ("stop", Some(Keyword::OptOut)),
            ("  Unsubscribe ", Some(Keyword::OptOut)),
            ("stopall", Some(Keyword::OptOut)),
            ("start", Some(Keyword::OptIn)),
            ("UNSTOP", Some(Keyword::OptIn)),
            ("help", Some(Keyword::Help)),
            ("INFO", Some(Keyword::Help)),
            ("stop it", None),
            ("please STOP", None),
            ("", None),
        ];
        for (body, want) in cases {
            assert_eq!(classify(body), want, "{body:?}");
        }
        assert_eq!(from_opt_out_type("STOP"), Some(Keyword::OptOut));
    }
}
