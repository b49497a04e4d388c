//! Configuration: `coffer.toml` (docs/interfaces.md "Configuration").
//!
//! Loading is two steps: [`file`] parses the TOML into raw structs (unknown keys are
//! errors naming file, line and key), then validation turns them into the immutable
//! [`Config`] the rest of the daemon reads. Units (`"25MiB"`, `"30s"`) are parsed in
//! [`units`].

pub mod model;

pub use model::*;

use std::path::Path;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file at fault (`<embedded default>` for the built-in one).
    pub file: String,
    pub message: String,
}

/// Resolves and loads the configuration: `explicit` (from `--config`), else
/// `$COFFER_CONFIG`, else `/etc/coffer/coffer.toml` if it exists, else the embedded default.
///
/// # Errors
/// A [`ConfigError`] naming the file, line and key at fault.
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
    // Placeholder until the parser lands: always the embedded default.
    let _ = explicit;
    Ok(Config::embedded())
}

impl Config {
    /// The embedded default: a single node with its store in `./coffer-data`, an SMTP
    /// journal listener on 127.0.0.1:2525, one route archiving it.
    pub fn embedded() -> Config {
        use std::time::Duration;
        let loopback: Vec<ipnet::IpNet> =
            vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        Config {
            source: ConfigSource::Embedded,
            node: NodeConfig {
                name: "coffer".into(),
                data_dir: "coffer-data".into(),
            },
            store: StoreConfig {
                max_pending: 256 << 20,
                min_free_disk: 1 << 30,
                segment_size: 64 << 20,
                block_size: 4 << 20,
                block_level: 19,
                dictionary: true,
            },
            listeners: vec![ListenerConfig {
                name: "journal".into(),
                protocol: Protocol::Smtp,
                bind: BindAddr::Tcp("127.0.0.1:2525".parse().unwrap()),
                allow: loopback,
                proxy_protocol: false,
                trusted_proxies: vec![],
                max_message_size: 50 << 20,
                max_recipients: 1000,
                max_connections: 512,
                idle_timeout: Duration::from_secs(300),
                trust_xcoffer: false,
                socket_mode: None,
                socket_group: None,
                tls: None,
            }],
            connections: vec![],
            routes: vec![RouteConfig {
                from: vec!["journal".into(), "milter".into()],
                archive: true,
                forward: vec![],
            }],
            milter: MilterConfig {
                listen: "unix:coffer-data/milter.sock".into(),
                socket_mode: None,
                socket_group: None,
                target: "unix:coffer-data/lmtp.sock".into(),
                on_failure: OnFailure::Tempfail,
                timeout: Duration::from_secs(120),
                max_connections: 256,
                add_header: false,
            },
            console: None,
        }
    }
}
