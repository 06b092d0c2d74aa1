//! Splitting a long text into parts Twilio accepts (at most 1600 characters each).

pub const TWILIO_MAX_BODY: usize = 1600;

/// Splits at the last whitespace before `max` characters; a word longer than `max` is cut.
pub fn split_body(text: &str, max: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    while rest.chars().count() > max {
        let limit = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        // The character just past the limit may itself be the space to cut at.
        let window_end = rest[limit..]
            .chars()
            .next()
            .map_or(limit, |c| limit + c.len_utf8());
        let cut = rest[..window_end]
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map(|(i, _)| i)
            .filter(|&i| i > 0)
            .unwrap_or(limit);
        parts.push(rest[..cut].trim_end().to_string());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() || parts.is_empty() {
        parts.push(rest.to_string());
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        assert_eq!(split_body("short", 10), vec!["short"]);
        assert_eq!(split_body("one two three", 7), vec!["one two", "three"]);
        assert_eq!(split_body("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(split_body("ééé ééé", 4), vec!["ééé", "ééé"]);
        let long = "word ".repeat(500);
        let parts = split_body(&long, TWILIO_MAX_BODY);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.chars().count() <= TWILIO_MAX_BODY));
        assert_eq!(parts.join(" "), long.trim());
    }
}
