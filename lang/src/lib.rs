//! The mailpolicy language.
