//! sendmail / Postfix access-table semantics: they live in `mailpolicy_lang::access` so
//! the open-relay proof and the runtime share one implementation.

pub use mailpolicy_lang::access::*;
