//! The mailpolicy language: parsing, checking and lowering `.mailpolicy` files to the IR
//! that the runtime evaluates. `lang` reads the policy and its includes through a
//! [`source::Loader`] and does no other I/O.

pub mod access;
pub mod address;
pub mod analysis;
pub mod ast;
pub mod check;
pub mod diag;
pub mod format;
pub mod ide;
pub mod ir;
pub mod parse;
pub mod resources;
pub mod schema;
pub mod settings;
pub mod source;
pub mod syntax;
pub mod tables;

pub use check::{compile, Compilation};
pub use diag::{Diagnostic, Severity};
pub use ir::Program;
pub use source::{std_module, FsLoader, Loader, MemLoader, SourceMap, STD_MODULES};
