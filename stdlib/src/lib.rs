//! The standard library's pure logic: table formats and semantics, address handling, and
//! the algorithms behind built-in tests (rate windows, greylisting, BATV). No I/O: the
//! runtime reads files and sockets and feeds the results in.

pub mod access;
pub mod address;
pub mod batv;
pub mod cdb;
pub mod digest;
pub mod greylist;
pub mod listtoken;
pub mod ratelimit;
pub mod tables;
