//! Twilio: the signature check (pure), the REST client, and the stand-in.

pub mod client;
pub mod signature;
pub mod sim;

pub use client::{Account, SendOutcome, SendRequest, TwilioClient};
