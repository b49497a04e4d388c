//! Configuration: `coffer.toml` (docs/interfaces.md "Configuration").
//!
//! Loading is two steps: [`file`] parses the TOML into raw structs (unknown keys are
//! errors naming file, line and key), then validation turns them into the immutable
//! [`Config`] the rest of the daemon reads. Units (`"25MiB"`, `"30s"`) are parsed in
//! [`units`].

pub mod model;

pub use model::*;
