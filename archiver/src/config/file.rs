//! The raw file: serde structs mirroring `coffer.toml` key for key (docs/interfaces.md
//! "Configuration"). Every struct denies unknown keys, so a typo is an error naming the
//! file, line and key rather than a silently ignored setting.
//!
//! Values that validation may still refuse (names, limits, addresses) are wrapped in
//! [`Spanned`] so that error can point at the line too. Defaults are applied in
//! `validate`, not here: this layer only says what the file says.

use serde::Deserialize;
use toml::Spanned;

use super::units::{Dur, Size};

/// The whole file. Every section is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub node: FileNode,
    #[serde(default)]
    pub store: FileStore,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<FileListener>>,
    #[serde(default, rename = "connection")]
    pub connections: Vec<Spanned<FileConnection>>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Spanned<FileRoute>>,
    #[serde(default)]
    pub milter: FileMilter,
    pub console: Option<FileConsole>,
}

/// `[node]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNode {
    pub name: Option<Spanned<String>>,
    pub data_dir: Option<Spanned<String>>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStore {
    pub max_pending: Option<Spanned<Size>>,
    pub min_free_disk: Option<Size>,
    pub segment_size: Option<Spanned<Size>>,
    pub block_size: Option<Spanned<Size>>,
    pub block_level: Option<Spanned<i64>>,
    pub dictionary: Option<bool>,
}

/// `protocol = "smtp" | "lmtp"`: an unknown value is refused by serde, with its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileProtocol {
    Smtp,
    Lmtp,
}

/// `on_failure = "tempfail" | "accept"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileOnFailure {
    Tempfail,
    Accept,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub name: Spanned<String>,
    pub protocol: Option<FileProtocol>,
    pub bind: Spanned<String>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    pub proxy_protocol: Option<bool>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub max_message_size: Option<Spanned<Size>>,
    pub max_recipients: Option<Spanned<u64>>,
    pub max_connections: Option<Spanned<u64>>,
    pub idle_timeout: Option<Spanned<Dur>>,
    pub trust_xcoffer: Option<bool>,
    pub socket_mode: Option<Spanned<u32>>,
    pub socket_group: Option<String>,
    pub tls: Option<Spanned<FileListenerTls>>,
}

/// A listener's `tls = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListenerTls {
    pub cert: String,
    pub key: String,
    pub required: Option<bool>,
    pub require_client_cert: Option<bool>,
    pub client_ca: Option<String>,
}

/// One `[[connection]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConnection {
    pub name: Spanned<String>,
    pub peer: Spanned<String>,
    pub target: Spanned<String>,
    pub source: Option<Spanned<String>>,
    pub max_retries: Option<u32>,
    pub queue_limit: Option<Spanned<u64>>,
    pub sessions: Option<Spanned<u64>>,
    pub probe_interval: Option<Spanned<Dur>>,
    pub tls: Option<FileConnectionTls>,
}

/// A connection's `tls = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConnectionTls {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub from: Spanned<Vec<Spanned<String>>>,
    pub archive: Option<Spanned<bool>>,
    #[serde(default)]
    pub forward: Vec<Spanned<String>>,
}

/// `[milter]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMilter {
    pub listen: Option<Spanned<String>>,
    pub socket_mode: Option<Spanned<u32>>,
    pub socket_group: Option<String>,
    pub target: Option<Spanned<String>>,
    pub on_failure: Option<FileOnFailure>,
    pub timeout: Option<Spanned<Dur>>,
    pub max_connections: Option<Spanned<u64>>,
    pub add_header: Option<bool>,
}

/// `[console]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConsole {
    pub bind: Option<Spanned<String>>,
}

/// Parses the text of a config file.
///
/// # Errors
/// The TOML error: its message and the byte range it points at, if any.
pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}
