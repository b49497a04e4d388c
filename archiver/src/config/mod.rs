//! Configuration: `coffer.toml` (docs/interfaces.md "Configuration").
//!
//! Loading is two steps: [`file`](mod@file) parses the TOML into raw structs (unknown keys are
//! errors naming file, line and key), then validation turns them into the immutable
//! [`Config`] the rest of the daemon reads, applying the [`defaults`]. Units (`"25MiB"`,
//! `"30s"`) are parsed in [`units`]. [`check`] lists what is valid but probably wrong
//! (warnings); [`reload_diff`] what a SIGHUP cannot apply.
//!
//! # Layout
//! - [`file`](mod@file): serde structs, one per section, unknown keys denied.
//! - `validate`: `FileConfig` → [`Config`].
//! - [`model`]: the validated, immutable [`Config`].
//! - [`defaults`]: every default, with its unit and reason.
//! - [`units`]: sizes and durations.
//! - `check`: warnings and the reload diff.
//! - `default.toml`: the embedded default, also the packaged example ([`embedded_toml`]).

mod check;
pub mod defaults;
pub mod file;
pub mod model;
mod source;
pub mod units;
mod validate;

pub use check::{check, reload_diff};
pub use model::*;
pub use validate::parse_bind;

use std::fmt;
use std::path::{Path, PathBuf};

use source::SourceText;

/// The display name of the embedded default in messages.
pub const EMBEDDED_NAME: &str = "<embedded default>";

/// The embedded default, as a commented TOML file.
const EMBEDDED_TOML: &str = include_str!("default.toml");

/// Why a configuration could not be loaded.
///
/// Displays as `FILE, line L, column C: MESSAGE` (or `FILE: MESSAGE` when the problem
/// has no place in the file, such as a file that cannot be read). The message names the
/// key at fault.
#[derive(Debug)]
pub struct ConfigError {
    /// The file at fault, as given (`<embedded default>` for the built-in one).
    pub file: String,
    /// 1-based line of the problem, when it has one.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the problem, when it has one.
    pub column: Option<usize>,
    /// The key at fault, when there is one (`bind`, `max_recipients`, ...).
    pub key: Option<String>,
    pub message: String,
    /// The I/O error behind "cannot read", if that was the problem.
    pub source: Option<std::io::Error>,
}

impl ConfigError {
    /// An error about `file` as a whole, with no line (e.g. from a caller that checks
    /// something the parser cannot, such as a socket path that is not reachable).
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            line: None,
            column: None,
            key: None,
            message: message.into(),
            source: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => {
                write!(f, "{}, line {l}, column {c}: {}", self.file, self.message)
            }
            (Some(l), None) => write!(f, "{}, line {l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Which configuration [`load`] picks, before reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// `--config FILE`.
    Explicit(PathBuf),
    /// `$COFFER_CONFIG`.
    Env(PathBuf),
    /// [`defaults::CONFIG_PATH`], which exists.
    System(PathBuf),
    /// Nothing found: the embedded default.
    Embedded,
}

impl Resolved {
    /// The file to read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Resolved::Explicit(p) | Resolved::Env(p) | Resolved::System(p) => Some(p),
            Resolved::Embedded => None,
        }
    }
}

/// Decides which configuration to use: `explicit` (from `--config`), else
/// `$COFFER_CONFIG` (when set and not empty), else [`defaults::CONFIG_PATH`] if it exists,
/// else the embedded default.
pub fn resolve(explicit: Option<&Path>) -> Resolved {
    resolve_with(
        explicit,
        std::env::var_os(defaults::CONFIG_ENV),
        Path::new(defaults::CONFIG_PATH),
    )
}

/// [`resolve`] with the environment and the system path given, for tests.
fn resolve_with(
    explicit: Option<&Path>,
    env: Option<std::ffi::OsString>,
    system: &Path,
) -> Resolved {
    if let Some(p) = explicit {
        Resolved::Explicit(p.to_path_buf())
    } else if let Some(p) = env.filter(|p| !p.is_empty()) {
        Resolved::Env(PathBuf::from(p))
    } else if system.exists() {
        Resolved::System(system.to_path_buf())
    } else {
        Resolved::Embedded
    }
}

/// Resolves and loads the configuration: `explicit` (from `--config`), else
/// `$COFFER_CONFIG`, else `/etc/coffer/coffer.toml` if it exists, else the embedded default.
///
/// Check `config.source` for [`ConfigSource::Embedded`] to log that the default is in use.
///
/// # Errors
/// A [`ConfigError`] naming the file, line and key at fault.
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    match resolve(explicit).path() {
        Some(path) => load_file(path),
        None => from_toml(EMBEDDED_TOML, ConfigSource::Embedded),
    }
}

/// Reads and validates one file. Relative paths in it resolve against its folder.
///
/// # Errors
/// The file cannot be read, or is not a valid configuration.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        source: Some(e),
        ..ConfigError::new(
            path.display().to_string(),
            "cannot read the configuration file",
        )
    })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut config = parse(&text, path.display().to_string(), absolute.parent(), false)?;
    config.source = ConfigSource::File(absolute);
    Ok(config)
}

/// Validates configuration text. For [`ConfigSource::File`], relative paths resolve
/// against the file's folder; for [`ConfigSource::Embedded`] they stay relative (to the
/// working directory).
///
/// # Errors
/// The text is not a valid configuration.
pub fn from_toml(text: &str, source: ConfigSource) -> Result<Config, ConfigError> {
    let (name, base) = match &source {
        ConfigSource::File(p) => (p.display().to_string(), p.parent()),
        ConfigSource::Embedded => (EMBEDDED_NAME.to_owned(), None),
    };
    let embedded = source == ConfigSource::Embedded;
    let mut config = parse(text, name, base, embedded)?;
    config.source = source;
    Ok(config)
}

fn parse(
    text: &str,
    file: String,
    base: Option<&Path>,
    embedded: bool,
) -> Result<Config, ConfigError> {
    let src = SourceText { file, text };
    let raw = file::parse(text).map_err(|e| src.toml_error(&e))?;
    let mut default_name = host_name();
    if embedded {
        // The embedded default must always load: a single node does not need a good name.
        default_name = default_name
            .filter(|h| validate::node_name_problem(h).is_none())
            .or_else(|| Some(defaults::FALLBACK_NODE_NAME.to_owned()));
    }
    validate::validate(raw, &src, base, default_name)
}

/// The embedded default as a commented TOML file: what [`Config::embedded`] is parsed
/// from, and the example config shipped in the packages.
pub fn embedded_toml() -> &'static str {
    EMBEDDED_TOML
}

/// The host name: the default node name. `None` when it cannot be read or is empty.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

impl Config {
    /// The embedded default ([`embedded_toml`]): node named after the host, store in
    /// `./coffer-data`, an SMTP journal listener on 127.0.0.1:2525 (loopback clients
    /// only), one route archiving it, the milter on `./coffer-data/milter.sock` handing
    /// off to `./coffer-data/lmtp.sock`, no console.
    ///
    /// The milter's trusted LMTP listener is not among the listeners yet (see
    /// `default.toml`).
    ///
    /// # Panics
    /// Never in a released build: `default.toml` is parsed by a unit test.
    pub fn embedded() -> Config {
        from_toml(EMBEDDED_TOML, ConfigSource::Embedded)
            .unwrap_or_else(|e| panic!("the embedded default config is invalid: {e}"))
    }

    /// The file's name for messages: its path, or `<embedded default>`.
    pub fn source_name(&self) -> String {
        match &self.source {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded => EMBEDDED_NAME.to_owned(),
        }
    }
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Smtp => "smtp",
            Protocol::Lmtp => "lmtp",
        })
    }
}

#[cfg(test)]
mod tests;
