//! SMS segment counting: GSM-7 (160 / 153 per part, extension characters count 2) or UCS-2
//! (70 / 67 per part, counted in UTF-16 code units, so most emoji count 2).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gsm7,
    Ucs2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    pub encoding: Encoding,
    /// Septets for GSM-7, UTF-16 code units for UCS-2.
    pub units: usize,
    pub count: usize,
}

const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\u{1b}ÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM7_EXTENSION: &str = "^{}\\[~]|€\u{c}";

fn gsm7_units(c: char) -> Option<usize> {
    if c != '\u{1b}' && GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

pub fn count(text: &str) -> Segments {
    let gsm: Option<usize> = text.chars().map(gsm7_units).sum();
    let (encoding, units, single, multi) = match gsm {
        Some(units) => (Encoding::Gsm7, units, 160, 153),
        None => (Encoding::Ucs2, text.encode_utf16().count(), 70, 67),
    };
    let count = match units {
        0 => 1,
        u if u <= single => 1,
        u => u.div_ceil(multi),
    };
    Segments {
        encoding,
        units,
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_cases() {
        let cases: [(String, Encoding, usize, usize); 10] = [
            ("".into(), Encoding::Gsm7, 0, 1),
            ("Hello".into(), Encoding::Gsm7, 5, 1),
            ("a".repeat(160), Encoding::Gsm7, 160, 1),
            ("a".repeat(161), Encoding::Gsm7, 161, 2),
            ("a".repeat(306), Encoding::Gsm7, 306, 2),
            ("a".repeat(307), Encoding::Gsm7, 307, 3),
            // Extension characters take two septets: 80 of them fill one segment.
            ("{".repeat(80), Encoding::Gsm7, 160, 1),
            ("€".repeat(81), Encoding::Gsm7, 162, 2),
            ("é".repeat(10) + "ï", Encoding::Ucs2, 11, 1), // ï is not GSM-7
            ("👍".repeat(35), Encoding::Ucs2, 70, 1),
        ];
        for (text, enc, units, n) in cases {
            let s = count(&text);
            assert_eq!((s.encoding, s.units, s.count), (enc, units, n), "{text:?}");
        }
        assert_eq!(count(&"👍".repeat(36)).count, 2);
        assert_eq!(count(&"ж".repeat(134)).count, 2);
        assert_eq!(count(&"ж".repeat(135)).count, 3);
    }
}
