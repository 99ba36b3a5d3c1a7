//! The mailpolicy engine: everything that decides, and nothing that waits. No socket, no
//! clock, no TLS, no resolver: hosts (`mailc test` in [`transcript`], `mailc serve` in the
//! daemon crate) feed bytes, time and answers in and carry bytes and needs out.
pub mod before_queue;
pub mod client;
pub mod config;
pub mod conn;
pub mod date;
pub mod eval;
pub mod headers;
pub mod milter;
pub mod paths;
pub mod proxy;
pub mod queue;
pub mod record;
pub mod routing;
pub mod smtp;
pub mod transcript;
