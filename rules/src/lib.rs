//! Pure decisions for smsgw: validated identifiers and (in later stages) rule matching.
//!
//! Layout:
//! - [`number`]: `E164` telephone numbers.
//! - [`sender`]: `SenderId`, the Alphanumeric Sender ID.
//! - [`extension`]: `ExtensionId`, a PBX extension's user part.
//! - [`country`]: ISO 3166-1 alpha-2 codes for geo permissions.
//!
//! Nothing here does I/O or reads a clock.
#![forbid(unsafe_code)]

pub mod country;
pub mod extension;
pub mod number;
pub mod sender;

pub use country::CountryCode;
pub use extension::ExtensionId;
pub use number::E164;
pub use sender::SenderId;

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
}
