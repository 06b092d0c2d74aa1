use crate::InvalidValue;
use std::fmt;

/// Every officially assigned ISO 3166-1 alpha-2 code (249), sorted for binary search.
const ISO_3166_ALPHA2: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// An ISO 3166-1 alpha-2 country code, as Twilio's geo permissions use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CountryCode(&'static str);

impl CountryCode {
    /// Accepts any case ("us" and "US" are the same country).
    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        let upper = value.to_ascii_uppercase();
        ISO_3166_ALPHA2
            .binary_search(&upper.as_str())
            .map(|i| Self(ISO_3166_ALPHA2[i]))
            .map_err(|_| InvalidValue::Country {
                value: value.to_string(),
            })
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_and_unique() {
        assert!(ISO_3166_ALPHA2.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn table() {
        for (input, ok) in [
            ("US", true),
            ("ca", true),
            ("GB", true),
            ("UK", false),
            ("USA", false),
            ("", false),
        ] {
            assert_eq!(CountryCode::parse(input).is_ok(), ok, "{input:?}");
        }
    }
}

/// NANP area codes outside the United States (`+1 NPA …`), by country.
const NANP_NON_US: &[(&str, &[u16])] = &[
    (
        "CA",
        &[
            204, 226, 236, 249, 250, 257, 263, 289, 306, 343, 354, 365, 367, 368, 382, 403, 416,
            418, 428, 431, 437, 438, 450, 460, 468, 474, 506, 514, 519, 548, 579, 581, 584, 587,
            604, 613, 639, 647, 672, 683, 705, 709, 742, 753, 778, 780, 782, 807, 819, 825, 867,
            873, 879, 902, 905, 942,
        ],
    ),
    ("BS", &[242]),
    ("BB", &[246]),
    ("AI", &[264]),
    ("AG", &[268]),
    ("VG", &[284]),
    ("VI", &[340]),
    ("KY", &[345]),
    ("BM", &[441]),
    ("GD", &[473]),
    ("TC", &[649]),
    ("JM", &[658, 876]),
    ("MS", &[664]),
    ("MP", &[670]),
    ("GU", &[671]),
    ("AS", &[684]),
    ("SX", &[721]),
    ("LC", &[758]),
    ("DM", &[767]),
    ("VC", &[784]),
    ("PR", &[787, 939]),
    ("DO", &[809, 829, 849]),
    ("TT", &[868]),
    ("KN", &[869]),
];

/// ITU-T E.164 country calling codes (other than +1 and +7), longest first when prefixes nest.
const CALLING_CODES: &[(&str, &str)] = &[
    ("20", "EG"),
    ("211", "SS"),
    ("212", "MA"),
    ("213", "DZ"),
    ("216", "TN"),
    ("218", "LY"),
    ("220", "GM"),
    ("221", "SN"),
    ("222", "MR"),
    ("223", "ML"),
    ("224", "GN"),
    ("225", "CI"),
    ("226", "BF"),
    ("227", "NE"),
    ("228", "TG"),
    ("229", "BJ"),
    ("230", "MU"),
    ("231", "LR"),
    ("232", "SL"),
    ("233", "GH"),
    ("234", "NG"),
    ("235", "TD"),
    ("236", "CF"),
    ("237", "CM"),
    ("238", "CV"),
    ("239", "ST"),
    ("240", "GQ"),
    ("241", "GA"),
    ("242", "CG"),
    ("243", "CD"),
    ("244", "AO"),
    ("245", "GW"),
    ("246", "IO"),
    ("248", "SC"),
    ("249", "SD"),
    ("250", "RW"),
    ("251", "ET"),
    ("252", "SO"),
    ("253", "DJ"),
    ("254", "KE"),
    ("255", "TZ"),
    ("256", "UG"),
    ("257", "BI"),
    ("258", "MZ"),
    ("260", "ZM"),
    ("261", "MG"),
    ("262", "RE"),
    ("263", "ZW"),
    ("264", "NA"),
    ("265", "MW"),
    ("266", "LS"),
    ("267", "BW"),
    ("268", "SZ"),
    ("269", "KM"),
    ("27", "ZA"),
    ("290", "SH"),
    ("291", "ER"),
    ("297", "AW"),
    ("298", "FO"),
    ("299", "GL"),
    ("30", "GR"),
    ("31", "NL"),
    ("32", "BE"),
    ("33", "FR"),
    ("34", "ES"),
    ("350", "GI"),
    ("351", "PT"),
    ("352", "LU"),
    ("353", "IE"),
    ("354", "IS"),
    ("355", "AL"),
    ("356", "MT"),
    ("357", "CY"),
    ("358", "FI"),
    ("359", "BG"),
    ("36", "HU"),
    ("370", "LT"),
    ("371", "LV"),
    ("372", "EE"),
    ("373", "MD"),
    ("374", "AM"),
    ("375", "BY"),
    ("376", "AD"),
    ("377", "MC"),
    ("378", "SM"),
    ("380", "UA"),
    ("381", "RS"),
    ("382", "ME"),
    ("383", "XK"),
    ("385", "HR"),
    ("386", "SI"),
    ("387", "BA"),
    ("389", "MK"),
    ("39", "IT"),
    ("40", "RO"),
    ("41", "CH"),
    ("420", "CZ"),
    ("421", "SK"),
    ("423", "LI"),
    ("43", "AT"),
    ("44", "GB"),
    ("45", "DK"),
    ("46", "SE"),
    ("47", "NO"),
    ("48", "PL"),
    ("49", "DE"),
    ("500", "FK"),
    ("501", "BZ"),
    ("502", "GT"),
    ("503", "SV"),
    ("504", "HN"),
    ("505", "NI"),
    ("506", "CR"),
    ("507", "PA"),
    ("508", "PM"),
    ("509", "HT"),
    ("51", "PE"),
    ("52", "MX"),
    ("53", "CU"),
    ("54", "AR"),
    ("55", "BR"),
    ("56", "CL"),
    ("57", "CO"),
    ("58", "VE"),
    ("590", "GP"),
    ("591", "BO"),
    ("592", "GY"),
    ("593", "EC"),
    ("594", "GF"),
    ("595", "PY"),
    ("596", "MQ"),
    ("597", "SR"),
    ("598", "UY"),
    ("599", "CW"),
    ("60", "MY"),
    ("61", "AU"),
    ("62", "ID"),
    ("63", "PH"),
    ("64", "NZ"),
    ("65", "SG"),
    ("66", "TH"),
    ("670", "TL"),
    ("672", "NF"),
    ("673", "BN"),
    ("674", "NR"),
    ("675", "PG"),
    ("676", "TO"),
    ("677", "SB"),
    ("678", "VU"),
    ("679", "FJ"),
    ("680", "PW"),
    ("681", "WF"),
    ("682", "CK"),
    ("683", "NU"),
    ("685", "WS"),
    ("686", "KI"),
    ("687", "NC"),
    ("688", "TV"),
    ("689", "PF"),
    ("690", "TK"),
    ("691", "FM"),
    ("692", "MH"),
    ("81", "JP"),
    ("82", "KR"),
    ("84", "VN"),
    ("850", "KP"),
    ("852", "HK"),
    ("853", "MO"),
    ("855", "KH"),
    ("856", "LA"),
    ("86", "CN"),
    ("880", "BD"),
    ("886", "TW"),
    ("90", "TR"),
    ("91", "IN"),
    ("92", "PK"),
    ("93", "AF"),
    ("94", "LK"),
    ("95", "MM"),
    ("960", "MV"),
    ("961", "LB"),
    ("962", "JO"),
    ("963", "SY"),
    ("964", "IQ"),
    ("965", "KW"),
    ("966", "SA"),
    ("967", "YE"),
    ("968", "OM"),
    ("970", "PS"),
    ("971", "AE"),
    ("972", "IL"),
    ("973", "BH"),
    ("974", "QA"),
    ("975", "BT"),
    ("976", "MN"),
    ("977", "NP"),
    ("98", "IR"),
    ("992", "TJ"),
    ("993", "TM"),
    ("994", "AZ"),
    ("995", "GE"),
    ("996", "KG"),
    ("998", "UZ"),
];

/// The country a number belongs to, for geo permissions. `None` for codes not tied to one country
/// (satellite, international networks) — those are refused unless explicitly allowed.
pub fn country_of(number: &crate::E164) -> Option<CountryCode> {
    let digits = number.digits();
    if let Some(national) = digits.strip_prefix('1') {
        let npa: u16 = national.get(..3)?.parse().ok()?;
        let iso = NANP_NON_US
            .iter()
            .find(|(_, codes)| codes.contains(&npa))
            .map_or("US", |(iso, _)| iso);
        return CountryCode::parse(iso).ok();
    }
    if let Some(national) = digits.strip_prefix('7') {
        // Kazakhstan uses +7 6xx and +7 7xx; the rest of +7 is Russia.
        let iso = if national.starts_with(['6', '7']) {
            "KZ"
        } else {
            "RU"
        };
        return CountryCode::parse(iso).ok();
    }
    (1..=3)
        .rev()
        .filter_map(|n| digits.get(..n))
        .find_map(|prefix| CALLING_CODES.iter().find(|(code, _)| *code == prefix))
        .and_then(|(_, iso)| CountryCode::parse(iso).ok())
}

#[cfg(test)]
mod calling_code_tests {
    use super::*;
    use crate::E164;

    #[test]
    fn table() {
        let cases = [
            ("+15017122661", Some("US")),
            ("+14165551234", Some("CA")),
            ("+18765551234", Some("JM")),
            ("+447911123456", Some("GB")),
            ("+4930123456", Some("DE")),
            ("+33612345678", Some("FR")),
            ("+35312345678", Some("IE")),
            ("+79161234567", Some("RU")),
            ("+77011234567", Some("KZ")),
            ("+61412345678", Some("AU")),
            ("+8613812345678", Some("CN")),
            ("+85212345678", Some("HK")),
            ("+882123456789", None),
        ];
        for (number, want) in cases {
            let got = country_of(&E164::parse(number).unwrap());
            assert_eq!(got.map(|c| c.as_str()), want, "{number}");
        }
    }

    #[test]
    fn every_code_maps_to_a_known_country() {
        for (code, iso) in CALLING_CODES {
            assert!(
                CountryCode::parse(iso).is_ok() || *iso == "XK",
                "{code} {iso}"
            );
        }
    }
}
