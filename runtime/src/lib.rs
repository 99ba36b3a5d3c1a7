//! mailpolicy runtime.
pub mod conn;
pub mod eval;
pub mod smtp;
pub mod config;
pub mod transcript;
pub mod daemon;
pub mod spool;
