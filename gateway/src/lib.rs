//! smsgw, the gateway binary's library: configuration, store, HTTP, and the SIP service.
//!
//! Layout:
//! - [`config`]: the TOML file and environment, validated into `Settings`.
//! - [`store`]: the durable store trait and its SQLite implementation.
//! - [`registration`]: digest authentication, REGISTER/OPTIONS handling, write-behind.
//! - [`http`]: the webhook and admin listeners.
//! - [`metrics`]: Prometheus metrics.
//! - [`app`]: wiring, start-up and graceful shutdown.
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod content;
pub mod http;
pub mod messaging;
pub mod metrics;
pub mod registration;
pub mod store;
pub mod twilio;
