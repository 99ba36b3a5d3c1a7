//! mailpolicy runtime.
pub mod smtp;
