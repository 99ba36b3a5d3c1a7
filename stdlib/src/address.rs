//! Address helpers: they live in `mailpolicy_lang::address` so the checker's analysis
//! and the runtime share one implementation.

pub use mailpolicy_lang::address::*;
