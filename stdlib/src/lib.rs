//! Built-in tests and actions.
