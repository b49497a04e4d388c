//! Step two of loading: [`FileConfig`] → [`Config`]. Applies the documented defaults
//! ([`super::defaults`]), resolves relative paths against the config file's folder and
//! refuses what cannot work, pointing at the line.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use super::defaults;
use super::file::{FileConfig, FileListener, FileOnFailure, FileProtocol};
use super::model::*;
use super::source::SourceText;
use super::ConfigError;

/// Validates a parsed file.
///
/// `base` is the folder relative paths resolve against (`None`: keep them relative, for
/// the embedded default). `host_name` is the default node name.
///
/// # Errors
/// The first problem found, with its line when the file has one.
pub(crate) fn validate(
    file: FileConfig,
    src: &SourceText<'_>,
    base: Option<&Path>,
    host_name: Option<String>,
) -> Result<Config, ConfigError> {
    let v = Validator { src, base };

    // [node]
    let name = match &file.node.name {
        Some(name) => {
            v.node_name(name, "name")?;
            name.get_ref().clone()
        }
        None => match host_name {
            Some(h) if node_name_problem(&h).is_none() => h,
            Some(h) => {
                return Err(src.error(format!(
                    "the host name {h:?} cannot be a node name; set `name` in [node]"
                )))
            }
            None => {
                return Err(
                    src.error("the host name could not be read; set `name` in [node]".to_string())
                )
            }
        },
    };
    let data_dir = match &file.node.data_dir {
        Some(d) if d.get_ref().is_empty() => {
            return Err(v.at(d, "data_dir", "`data_dir` must not be empty"))
        }
        Some(d) => v.path(d.get_ref()),
        None => PathBuf::from(defaults::DATA_DIR),
    };
    let node = NodeConfig { name, data_dir };

    // [store]
    let s = &file.store;
    let store = StoreConfig {
        max_pending: v.nonzero_size(
            s.max_pending.as_ref(),
            "max_pending",
            defaults::MAX_PENDING,
        )?,
        min_free_disk: s.min_free_disk.map_or(defaults::MIN_FREE_DISK, |m| m.0),
        segment_size: v.nonzero_size(
            s.segment_size.as_ref(),
            "segment_size",
            defaults::SEGMENT_SIZE,
        )?,
        block_size: v.nonzero_size(s.block_size.as_ref(), "block_size", defaults::BLOCK_SIZE)?,
        block_level: match &s.block_level {
            None => defaults::BLOCK_LEVEL,
            Some(l) => match i32::try_from(*l.get_ref()) {
                Ok(level) if (1..=defaults::MAX_BLOCK_LEVEL).contains(&level) => level,
                _ => {
                    return Err(v.at(
                        l,
                        "block_level",
                        format!(
                            "`block_level` must be a zstd level from 1 to {}, not {}",
                            defaults::MAX_BLOCK_LEVEL,
                            l.get_ref()
                        ),
                    ))
                }
            },
        },
        dictionary: s.dictionary.unwrap_or(defaults::DICTIONARY),
    };

    // [[listener]]
    let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(file.listeners.len());
    let mut bind_spans: Vec<Range<usize>> = Vec::new();
    for l in &file.listeners {
        let span = l.span();
        let l = l.get_ref();
        let cfg = v.listener(l)?;
        if let Some(dup) = listeners.iter().find(|o| o.name == cfg.name) {
            return Err(v.at(
                &l.name,
                "name",
                format!("two listeners are named `{}`", dup.name),
            ));
        }
        for (other, other_span) in listeners.iter().zip(&bind_spans) {
            if binds_conflict(&other.bind, &cfg.bind) {
                let (line, _) = src.line_col(other_span.start);
                return Err(v.at(
                    &l.bind,
                    "bind",
                    format!(
                        "listener `{}` binds {}, which listener `{}` (line {line}) already takes",
                        cfg.name, cfg.bind, other.name
                    ),
                ));
            }
        }
        bind_spans.push(span);
        listeners.push(cfg);
    }

    // [[connection]]
    let mut connections: Vec<ConnectionConfig> = Vec::with_capacity(file.connections.len());
    for c in &file.connections {
        let c = c.get_ref();
        v.object_name(&c.name, "connection")?;
        if connections.iter().any(|o| o.name == *c.name.get_ref()) {
            return Err(v.at(
                &c.name,
                "name",
                format!("two connections are named `{}`", c.name.get_ref()),
            ));
        }
        v.node_name(&c.peer, "peer")?;
        if host_port(c.target.get_ref()).is_none() {
            return Err(v.at(
                &c.target,
                "target",
                format!(
                    "invalid `target` {:?}: expected HOST:PORT or [IPv6]:PORT",
                    c.target.get_ref()
                ),
            ));
        }
        let source = match &c.source {
            None => None,
            Some(s) if s.get_ref().is_empty() => None,
            Some(s) => {
                if s.get_ref().parse::<IpAddr>().is_err() {
                    return Err(v.at(
                        s,
                        "source",
                        format!("invalid `source` {:?}: expected an IP address", s.get_ref()),
                    ));
                }
                Some(s.get_ref().clone())
            }
        };
        let tls = match &c.tls {
            None => None,
            Some(t) => {
                let ca = v.opt_path(t.ca.as_deref());
                let cert = v.opt_path(t.cert.as_deref());
                let key = v.opt_path(t.key.as_deref());
                if cert.is_some() != key.is_some() {
                    return Err(v.at(
                        &c.name,
                        "tls",
                        format!(
                            "connection `{}`: tls needs both `cert` and `key`, or neither",
                            c.name.get_ref()
                        ),
                    ));
                }
                if ca.is_none() {
                    return Err(v.at(
                        &c.name,
                        "ca",
                        format!(
                            "connection `{}`: tls needs `ca`, the CA that signs the peers' \
                             certificates",
                            c.name.get_ref()
                        ),
                    ));
                }
                if let Err(why) = crate::tls::server_name(c.peer.get_ref()) {
                    return Err(v.at(
                        &c.peer,
                        "peer",
                        format!(
                            "connection `{}` has tls: {why} (its certificate must carry \
                             `peer` as a DNS name)",
                            c.name.get_ref()
                        ),
                    ));
                }
                Some(ConnectionTls { ca, cert, key })
            }
        };
        connections.push(ConnectionConfig {
            name: c.name.get_ref().clone(),
            peer: c.peer.get_ref().clone(),
            target: c.target.get_ref().clone(),
            source,
            max_retries: c.max_retries.unwrap_or(defaults::MAX_RETRIES),
            queue_limit: v.nonzero(c.queue_limit.as_ref(), "queue_limit", defaults::QUEUE_LIMIT)?,
            sessions: v.nonzero_usize(c.sessions.as_ref(), "sessions", defaults::SESSIONS)?,
            probe_interval: v.nonzero_duration(
                c.probe_interval.as_ref(),
                "probe_interval",
                defaults::PROBE_INTERVAL,
            )?,
            tls,
        });
    }

    // [[route]]
    let mut routes = Vec::with_capacity(file.routes.len());
    for r in &file.routes {
        let r = r.get_ref();
        if r.from.get_ref().is_empty() {
            return Err(v.at(
                &r.from,
                "from",
                "a route needs at least one listener in `from`",
            ));
        }
        for f in r.from.get_ref() {
            if !listeners.iter().any(|l| l.name == *f.get_ref()) {
                return Err(v.at(
                    f,
                    "from",
                    format!(
                        "route names listener `{}`, which is not defined",
                        f.get_ref()
                    ),
                ));
            }
        }
        for f in &r.forward {
            if !connections.iter().any(|c| c.name == *f.get_ref()) {
                return Err(v.at(
                    f,
                    "forward",
                    format!(
                        "route names connection `{}`, which is not defined",
                        f.get_ref()
                    ),
                ));
            }
        }
        if let Some(a) = &r.archive {
            if !*a.get_ref() {
                return Err(v.at(
                    a,
                    "archive",
                    "`archive = false` is reserved for a later version; routes always archive",
                ));
            }
        }
        routes.push(RouteConfig {
            from: r
                .from
                .get_ref()
                .iter()
                .map(|f| f.get_ref().clone())
                .collect(),
            archive: true,
            forward: r.forward.iter().map(|f| f.get_ref().clone()).collect(),
        });
    }

    // [milter]
    let m = &file.milter;
    let listen = match &m.listen {
        Some(l) => v.milter_address(l, "listen", true)?,
        None => format!(
            "unix:{}",
            node.data_dir.join(defaults::MILTER_SOCKET).display()
        ),
    };
    let target = match &m.target {
        Some(t) => v.milter_address(t, "target", false)?,
        None => default_milter_target(&listeners, &node.data_dir),
    };
    let milter = MilterConfig {
        listen,
        socket_mode: v.socket_mode(m.socket_mode.as_ref())?,
        socket_group: m.socket_group.clone().filter(|g| !g.is_empty()),
        target,
        on_failure: match m.on_failure {
            None => defaults::MILTER_ON_FAILURE,
            Some(FileOnFailure::Tempfail) => OnFailure::Tempfail,
            Some(FileOnFailure::Accept) => OnFailure::Accept,
        },
        timeout: v.nonzero_duration(m.timeout.as_ref(), "timeout", defaults::MILTER_TIMEOUT)?,
        max_connections: v.nonzero_usize(
            m.max_connections.as_ref(),
            "max_connections",
            defaults::MILTER_MAX_CONNECTIONS,
        )?,
        add_header: m.add_header.unwrap_or(defaults::MILTER_ADD_HEADER),
    };

    // [console]
    let console = match &file.console {
        None => None,
        Some(c) => {
            let bind = match &c.bind {
                None => defaults::CONSOLE_BIND.parse().expect("valid default"),
                Some(b) => b.get_ref().parse::<SocketAddr>().map_err(|_| {
                    v.at(
                        b,
                        "bind",
                        format!(
                            "invalid console `bind` {:?}: expected IP:PORT or [IPv6]:PORT",
                            b.get_ref()
                        ),
                    )
                })?,
            };
            if let Some((l, span)) = listeners
                .iter()
                .zip(&bind_spans)
                .find(|(l, _)| binds_conflict(&l.bind, &BindAddr::Tcp(bind)))
            {
                let (line, _) = src.line_col(span.start);
                let msg = format!(
                    "console binds {bind}, which listener `{}` (line {line}) already takes",
                    l.name
                );
                return Err(match &c.bind {
                    Some(b) => v.at(b, "bind", msg),
                    None => src.error(msg),
                });
            }
            Some(ConsoleConfig { bind })
        }
    };

    Ok(Config {
        source: ConfigSource::Embedded, // set by the caller
        node,
        store,
        listeners,
        connections,
        routes,
        milter,
        console,
    })
}

struct Validator<'a> {
    src: &'a SourceText<'a>,
    base: Option<&'a Path>,
}

impl Validator<'_> {
    fn at<T>(&self, value: &Spanned<T>, key: &str, message: impl Into<String>) -> ConfigError {
        self.src.error_at(value.span(), Some(key), message.into())
    }

    fn path(&self, p: &str) -> PathBuf {
        resolve_path(self.base, p)
    }

    fn opt_path(&self, p: Option<&str>) -> Option<PathBuf> {
        p.filter(|p| !p.is_empty()).map(|p| self.path(p))
    }

    fn node_name(&self, name: &Spanned<String>, key: &str) -> Result<(), ConfigError> {
        match node_name_problem(name.get_ref()) {
            None => Ok(()),
            Some(why) => Err(self.at(
                name,
                key,
                format!("invalid `{key}` {:?}: a node name {why}", name.get_ref()),
            )),
        }
    }

    fn object_name(&self, name: &Spanned<String>, what: &str) -> Result<(), ConfigError> {
        let n = name.get_ref();
        let why = if n.is_empty() {
            Some("must not be empty")
        } else if n.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("must not contain whitespace or control characters")
        } else {
            None
        };
        match why {
            None => Ok(()),
            Some(why) => Err(self.at(name, "name", format!("invalid {what} name {n:?}: {why}"))),
        }
    }

    fn nonzero(
        &self,
        value: Option<&Spanned<u64>>,
        key: &str,
        default: u64,
    ) -> Result<u64, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Err(self.at(v, key, format!("`{key}` must not be 0"))),
            Some(v) => Ok(*v.get_ref()),
        }
    }

    fn nonzero_usize(
        &self,
        value: Option<&Spanned<u64>>,
        key: &str,
        default: usize,
    ) -> Result<usize, ConfigError> {
        let n = self.nonzero(value, key, default as u64)?;
        usize::try_from(n).map_err(|_| {
            self.at(
                value.expect("only a file value can overflow"),
                key,
                format!("`{key}` is too large"),
            )
        })
    }

    fn nonzero_size(
        &self,
        value: Option<&Spanned<super::units::Size>>,
        key: &str,
        default: u64,
    ) -> Result<u64, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if v.get_ref().0 == 0 => Err(self.at(v, key, format!("`{key}` must not be 0"))),
            Some(v) => Ok(v.get_ref().0),
        }
    }

    fn nonzero_duration(
        &self,
        value: Option<&Spanned<super::units::Dur>>,
        key: &str,
        default: std::time::Duration,
    ) -> Result<std::time::Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if v.get_ref().0.is_zero() => {
                Err(self.at(v, key, format!("`{key}` must not be 0")))
            }
            Some(v) => Ok(v.get_ref().0),
        }
    }

    fn socket_mode(&self, mode: Option<&Spanned<u32>>) -> Result<Option<u32>, ConfigError> {
        match mode {
            None => Ok(None),
            Some(m) if *m.get_ref() > defaults::MAX_SOCKET_MODE => Err(self.at(
                m,
                "socket_mode",
                format!(
                    "invalid `socket_mode` {:#o}: write it as a TOML octal such as 0o660",
                    m.get_ref()
                ),
            )),
            Some(m) => Ok(Some(*m.get_ref())),
        }
    }

    fn nets(&self, list: &[Spanned<String>], key: &str) -> Result<Vec<IpNet>, ConfigError> {
        list.iter()
            .map(|n| {
                parse_net(n.get_ref()).ok_or_else(|| {
                    self.at(
                        n,
                        key,
                        format!(
                            "invalid network {:?} in `{key}`: expected an address or CIDR such \
                             as \"10.0.0.0/8\"",
                            n.get_ref()
                        ),
                    )
                })
            })
            .collect()
    }

    fn listener(&self, l: &FileListener) -> Result<ListenerConfig, ConfigError> {
        self.object_name(&l.name, "listener")?;
        if l.name.get_ref() == defaults::IMPORT_LISTENER {
            return Err(self.at(
                &l.name,
                "name",
                format!(
                    "the listener name `{}` is reserved for `coffer import`",
                    defaults::IMPORT_LISTENER
                ),
            ));
        }
        let bind = parse_bind(l.bind.get_ref(), self.base).map_err(|why| {
            self.at(
                &l.bind,
                "bind",
                format!("invalid `bind` {:?}: {why}", l.bind.get_ref()),
            )
        })?;
        let mut allow = self.nets(&l.allow, "allow")?;
        if allow.is_empty() && matches!(bind, BindAddr::Tcp(_)) {
            allow = loopback();
        }
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                let span_t = t;
                let t = t.get_ref();
                let require_client_cert = t.require_client_cert.unwrap_or(false);
                let client_ca = self.opt_path(t.client_ca.as_deref());
                if require_client_cert && client_ca.is_none() {
                    return Err(self.at(
                        span_t,
                        "client_ca",
                        "tls: `require_client_cert = true` needs `client_ca`, the CA that \
                         signs the peers' certificates",
                    ));
                }
                if t.cert.is_empty() || t.key.is_empty() {
                    return Err(self.at(span_t, "cert", "tls needs both `cert` and `key`"));
                }
                Some(ListenerTls {
                    cert: self.path(&t.cert),
                    key: self.path(&t.key),
                    required: t.required.unwrap_or(false),
                    require_client_cert,
                    client_ca,
                })
            }
        };
        Ok(ListenerConfig {
            name: l.name.get_ref().clone(),
            protocol: match l.protocol {
                None => defaults::PROTOCOL,
                Some(FileProtocol::Smtp) => Protocol::Smtp,
                Some(FileProtocol::Lmtp) => Protocol::Lmtp,
            },
            bind,
            allow,
            proxy_protocol: l.proxy_protocol.unwrap_or(false),
            trusted_proxies: self.nets(&l.trusted_proxies, "trusted_proxies")?,
            max_message_size: self.nonzero_size(
                l.max_message_size.as_ref(),
                "max_message_size",
                defaults::MAX_MESSAGE_SIZE,
            )?,
            max_recipients: self.nonzero_usize(
                l.max_recipients.as_ref(),
                "max_recipients",
                defaults::MAX_RECIPIENTS,
            )?,
            max_connections: self.nonzero_usize(
                l.max_connections.as_ref(),
                "max_connections",
                defaults::MAX_CONNECTIONS,
            )?,
            idle_timeout: self.nonzero_duration(
                l.idle_timeout.as_ref(),
                "idle_timeout",
                defaults::IDLE_TIMEOUT,
            )?,
            trust_xcoffer: l.trust_xcoffer.unwrap_or(false),
            socket_mode: self.socket_mode(l.socket_mode.as_ref())?,
            socket_group: l.socket_group.clone().filter(|g| !g.is_empty()),
            tls,
        })
    }

    /// `[milter] listen` (`unix:PATH` or `inet:HOST:PORT`) or `target` (also `HOST:PORT`).
    fn milter_address(
        &self,
        addr: &Spanned<String>,
        key: &str,
        listen: bool,
    ) -> Result<String, ConfigError> {
        let a = addr.get_ref();
        if let Some(path) = a.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(self.at(addr, key, format!("`{key}`: unix: needs a path")));
            }
            return Ok(format!("unix:{}", self.path(path).display()));
        }
        let hp = a
            .strip_prefix("inet:")
            .unwrap_or(if listen { "" } else { a });
        if host_port(hp).is_some() {
            return Ok(a.clone());
        }
        let expected = if listen {
            "unix:PATH or inet:HOST:PORT"
        } else {
            "unix:PATH, HOST:PORT or inet:HOST:PORT"
        };
        Err(self.at(
            addr,
            key,
            format!("invalid `{key}` {a:?}: expected {expected}"),
        ))
    }
}

/// Why `name` cannot be a node name, if it cannot. Node names appear in arrival ids
/// (`NODE/EPOCH/SEQ`) and on the EHLO line (`XCOFFER NODE EPOCH`).
pub(crate) fn node_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.contains('/') {
        Some("must not contain `/` (it separates the parts of an arrival id)")
    } else if name.chars().any(char::is_whitespace) {
        Some("must not contain whitespace (it is sent on the EHLO line)")
    } else if !name.chars().all(|c| c.is_ascii_graphic()) {
        Some("must be printable ASCII (it is sent on the EHLO line)")
    } else {
        None
    }
}

/// The validated `allow` of a TCP listener whose file list is empty.
pub(crate) fn loopback() -> Vec<IpNet> {
    defaults::LOOPBACK
        .iter()
        .map(|n| n.parse().expect("valid loopback network"))
        .collect()
}

/// Reads `10.0.0.0/8`, `::1/128`, or a bare address (a /32 or /128).
fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Resolves `p` against `base` unless it is absolute or there is no base.
pub(crate) fn resolve_path(base: Option<&Path>, p: &str) -> PathBuf {
    let path = Path::new(p);
    match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

/// Parses a listener `bind`: `IP:PORT`, `[IPv6]:PORT` or `unix:PATH`.
///
/// # Errors
/// Why not, for the message.
pub fn parse_bind(s: &str, base: Option<&Path>) -> Result<BindAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a path".into());
        }
        return Ok(BindAddr::Unix(resolve_path(base, path)));
    }
    s.parse::<SocketAddr>()
        .map(BindAddr::Tcp)
        .map_err(|_| "expected IP:PORT, [IPv6]:PORT or unix:PATH".into())
}

/// Splits `HOST:PORT` / `[IPv6]:PORT` into host and a non-zero port.
pub(crate) fn host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
            return None;
        }
        (host, port)
    };
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some((host, port))
}

/// Whether two binds cannot both be bound: the same socket path, or the same TCP port on
/// the same address or with either on the unspecified address (`0.0.0.0`, `[::]`, which
/// on Linux also takes the other family's port). Port 0 (any free port) never conflicts.
pub(crate) fn binds_conflict(a: &BindAddr, b: &BindAddr) -> bool {
    match (a, b) {
        (BindAddr::Unix(a), BindAddr::Unix(b)) => a == b,
        (BindAddr::Tcp(a), BindAddr::Tcp(b)) => {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        _ => false,
    }
}

/// The milter's target when `[milter] target` is left out: the first trusted unix: LMTP
/// listener of this file, else `unix:<data_dir>/lmtp.sock`.
fn default_milter_target(listeners: &[ListenerConfig], data_dir: &Path) -> String {
    let trusted = listeners.iter().find_map(|l| match &l.bind {
        BindAddr::Unix(p) if l.protocol == Protocol::Lmtp && l.trust_xcoffer => Some(p.clone()),
        _ => None,
    });
    let path = trusted.unwrap_or_else(|| data_dir.join(defaults::LMTP_SOCKET));
    format!("unix:{}", path.display())
}
