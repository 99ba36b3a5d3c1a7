//! The standard library's pure logic: table semantics, address handling and the
//! algorithms behind built-in tests. No I/O: the runtime feeds answers in.

pub mod access;
pub mod address;
