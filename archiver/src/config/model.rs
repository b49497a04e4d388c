//! The validated configuration. Immutable once built; a reload builds a new one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// Where the configuration came from (for log lines and error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: ConfigSource,
    pub node: NodeConfig,
    pub store: StoreConfig,
    pub listeners: Vec<ListenerConfig>,
    pub connections: Vec<ConnectionConfig>,
    pub routes: Vec<RouteConfig>,
    pub milter: MilterConfig,
    pub console: Option<ConsoleConfig>,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub max_pending: u64,
    pub min_free_disk: u64,
    pub segment_size: u64,
    pub block_size: u64,
    pub block_level: i32,
    pub dictionary: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    Lmtp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub protocol: Protocol,
    pub bind: BindAddr,
    /// Client networks allowed to connect. Empty in the file means loopback only; the
    /// validated list is never empty for TCP listeners.
    pub allow: Vec<IpNet>,
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub trust_xcoffer: bool,
    pub socket_mode: Option<u32>,
    pub socket_group: Option<String>,
    pub tls: Option<ListenerTls>,
}

#[derive(Clone, Debug)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub required: bool,
    pub require_client_cert: bool,
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct ConnectionConfig {
    pub name: String,
    pub peer: String,
    pub target: String,
    pub source: Option<String>,
    pub max_retries: u32,
    pub queue_limit: u64,
    pub sessions: usize,
    pub probe_interval: Duration,
    pub tls: Option<ConnectionTls>,
}

#[derive(Clone, Debug)]
pub struct ConnectionTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub from: Vec<String>,
    pub archive: bool,
    pub forward: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct MilterConfig {
    pub listen: String,
    pub socket_mode: Option<u32>,
    pub socket_group: Option<String>,
    pub target: String,
    pub on_failure: OnFailure,
    pub timeout: Duration,
    pub max_connections: usize,
    pub add_header: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    Tempfail,
    Accept,
}

#[derive(Clone, Debug)]
pub struct ConsoleConfig {
    pub bind: SocketAddr,
}
