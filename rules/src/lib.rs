//! Pure decisions for smsgw: validated identifiers, rule matching, segments, opt-out words.
//!
//! Layout:
//! - [`number`]: `E164` telephone numbers.
//! - [`sender`]: `SenderId`, the Alphanumeric Sender ID.
//! - [`extension`]: `ExtensionId`, a PBX extension's user part.
//! - [`country`]: ISO 3166-1 alpha-2 codes and the country of a number, for geo permissions.
//! - [`dial`]: dialed strings reduced to digits.
//! - [`outbound`], [`inbound`]: the rule tables and sender choice.
//! - [`segments`], [`split`]: SMS segment counting and long-body splitting.
//! - [`optout`]: STOP/START/HELP keywords.
//! - [`status`]: `MessageStatus` and its allowed transitions.
//!
//! Nothing here does I/O or reads a clock.
#![forbid(unsafe_code)]

pub mod country;
pub mod dial;
pub mod extension;
pub mod inbound;
pub mod number;
pub mod optout;
pub mod outbound;
pub mod segments;
pub mod sender;
pub mod split;
pub mod status;

pub use country::CountryCode;
pub use extension::ExtensionId;
pub use number::E164;
pub use sender::SenderId;
pub use status::MessageStatus;

/// A value that failed validation, with a message a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("{value:?} is not an E.164 number: {reason} (expected '+' followed by 8 to 15 digits, e.g. +15017122661)")]
    E164 { value: String, reason: &'static str },
    #[error("{value:?} is not a valid Alphanumeric Sender ID: {reason} (1 to 11 characters of A-Z, a-z, 0-9 and space, at least one letter)")]
    SenderId { value: String, reason: &'static str },
    #[error("{value:?} is not a valid extension id: {reason} (1 to 32 characters of A-Z, a-z, 0-9, '.', '_' and '-')")]
    ExtensionId { value: String, reason: &'static str },
    #[error("{value:?} is not an ISO 3166-1 alpha-2 country code (e.g. \"US\", \"GB\")")]
    Country { value: String },
    #[error(
        "{value:?} is not a dialable number (digits, an optional leading '+', and separators)"
    )]
    Dialed { value: String },
}
