//! mailpolicy runtime.
pub mod conn;
pub mod eval;
pub mod smtp;
