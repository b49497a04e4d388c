//! The `[milter]` section of `coffer.toml` (docs/interfaces.md "Configuration").
//!
//! coffer-milter reads the same file as cofferd but must not link the archiver (and with
//! it the storage engine), so it parses what it needs itself:
//!
//! - `[milter]`, strictly: an unknown key or a bad value is an error naming file, line
//!   and key.
//! - `[node] data_dir` and the `[[listener]]` entries, leniently, only to find the
//!   defaults of `listen` (`unix:<data_dir>/milter.sock`) and `target` (the first trusted
//!   `unix:` LMTP listener, else `unix:<data_dir>/lmtp.sock`) exactly as cofferd does.
//!   Their other keys are cofferd's business and are not checked here.
//!
//! Resolution: `--config FILE`, else `$COFFER_CONFIG`, else `/etc/coffer/coffer.toml` if
//! it exists, else the embedded default (the archiver's `default.toml`, shared so the two
//! never drift). Relative paths resolve against the file's folder, or the working
//! directory for the embedded default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The system-wide configuration file, used when it exists and nothing else is given.
pub const SYSTEM_CONFIG: &str = "/etc/coffer/coffer.toml";
/// The environment variable naming a configuration file.
pub const CONFIG_ENV: &str = "COFFER_CONFIG";
/// What messages call the embedded default.
pub const EMBEDDED_NAME: &str = "<embedded default>";
/// The embedded default: the same text cofferd embeds.
pub const EMBEDDED_TOML: &str = include_str!("../../archiver/src/config/default.toml");

/// `data_dir` when a file leaves it out (cofferd's default).
const DEFAULT_DATA_DIR: &str = "/var/lib/coffer";
/// `listen` and `target` file names inside `data_dir` when left out.
const MILTER_SOCKET: &str = "milter.sock";
const LMTP_SOCKET: &str = "lmtp.sock";
/// `timeout` (120 s): how long one step of the handoff (connect, a reply) may take. Well
/// inside Postfix's `milter_content_timeout` (300 s), so Postfix hears our 451 rather
/// than timing out itself.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// `max_connections` (256): Postfix can run 100 smtpd per service plus cleanup;
/// indymilter's own default of 100 is too low (design §5).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Highest permission bits a `socket_mode` may have.
const MAX_SOCKET_MODE: u32 = 0o7777;

/// Where the milter listens or where it hands off to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// `unix:PATH` (resolved against the config file's folder).
    Unix(PathBuf),
    /// `inet:HOST:PORT` (or `HOST:PORT` for `target`).
    Inet(String),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Inet(hp) => write!(f, "inet:{hp}"),
        }
    }
}

/// What to do when cofferd cannot confirm a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Answer `451 4.3.0`: the MTA keeps the message and retries (the default).
    Tempfail,
    /// Let the message through unarchived, and log it loudly.
    Accept,
}

/// The validated `[milter]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MilterConfig {
    pub listen: Addr,
    pub socket_mode: Option<u32>,
    pub socket_group: Option<String>,
    pub target: Addr,
    pub on_failure: OnFailure,
    pub timeout: Duration,
    pub max_connections: usize,
    pub add_header: bool,
}

/// Where a configuration came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl Source {
    /// The name used in messages.
    pub fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Embedded => EMBEDDED_NAME.to_owned(),
        }
    }
}

/// A configuration error: file, and where known line, column and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Loads the configuration following the resolution order (module documentation).
///
/// # Errors
/// The file cannot be read, or its `[milter]` section is invalid.
pub fn load(explicit: Option<&Path>) -> Result<(MilterConfig, Source), ConfigError> {
    let path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => match std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            Some(v) => Some(PathBuf::from(v)),
            None => Some(PathBuf::from(SYSTEM_CONFIG)).filter(|p| p.exists()),
        },
    };
    match path {
        None => {
            let c = parse(EMBEDDED_TOML, EMBEDDED_NAME, Path::new("."), true)?;
            Ok((c, Source::Embedded))
        }
        Some(path) => {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
                file: name.clone(),
                line: None,
                column: None,
                key: None,
                message: format!("cannot read the configuration: {e}"),
            })?;
            let base = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let c = parse(&text, &name, base, false)?;
            Ok((c, Source::File(path)))
        }
    }
}

/// The file as far as the milter reads it.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    node: Option<toml::Table>,
    #[serde(default)]
    listener: Vec<toml::Table>,
    #[serde(default)]
    milter: FileMilter,
}

/// `[milter]`, strictly.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMilter {
    listen: Option<Spanned<String>>,
    socket_mode: Option<Spanned<u32>>,
    socket_group: Option<String>,
    target: Option<Spanned<String>>,
    on_failure: Option<OnFailure>,
    timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
    add_header: Option<bool>,
}

/// Parses `text` (named `file` in errors); relative paths resolve against `base`.
/// `embedded` selects the embedded default's `data_dir` rule (relative to `base`).
///
/// # Errors
/// A TOML error, or an invalid `[milter]` value.
pub fn parse(
    text: &str,
    file: &str,
    base: &Path,
    embedded: bool,
) -> Result<MilterConfig, ConfigError> {
    let err_at = |span: Option<std::ops::Range<usize>>, key: Option<&str>, message: String| {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = line_col(text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            key: key.map(str::to_owned),
            message,
        }
    };
    let raw: FileConfig = toml::from_str(text).map_err(|e| {
        let msg = e
            .message()
            .trim_end()
            .replace("unknown field", "unknown key")
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        err_at(e.span(), None, msg)
    })?;
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let data_dir = match raw
        .node
        .as_ref()
        .and_then(|n| n.get("data_dir"))
        .and_then(toml::Value::as_str)
    {
        Some(d) if !d.is_empty() => resolve(d),
        _ if embedded => base.join("coffer-data"),
        _ => PathBuf::from(DEFAULT_DATA_DIR),
    };
    let m = raw.milter;
    let address = |a: &Spanned<String>, key: &str, listen: bool| -> Result<Addr, ConfigError> {
        let s = a.get_ref();
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err_at(
                    Some(a.span()),
                    Some(key),
                    format!("`{key}`: unix: needs a path"),
                ));
            }
            return Ok(Addr::Unix(resolve(path)));
        }
        let hp = s
            .strip_prefix("inet:")
            .unwrap_or(if listen { "" } else { s });
        if host_port_ok(hp) {
            return Ok(Addr::Inet(hp.to_owned()));
        }
        let expected = if listen {
            "unix:PATH or inet:HOST:PORT"
        } else {
            "unix:PATH, HOST:PORT or inet:HOST:PORT"
        };
        Err(err_at(
            Some(a.span()),
            Some(key),
            format!("invalid `{key}` {s:?}: expected {expected}"),
        ))
    };
    let listen = match &m.listen {
        Some(l) => address(l, "listen", true)?,
        None => Addr::Unix(data_dir.join(MILTER_SOCKET)),
    };
    let target = match &m.target {
        Some(t) => address(t, "target", false)?,
        None => Addr::Unix(
            default_target(&raw.listener, &resolve).unwrap_or_else(|| data_dir.join(LMTP_SOCKET)),
        ),
    };
    let socket_mode = match &m.socket_mode {
        Some(mode) if *mode.get_ref() > MAX_SOCKET_MODE => {
            return Err(err_at(
                Some(mode.span()),
                Some("socket_mode"),
                format!(
                    "invalid `socket_mode` {:#o}: write it as a TOML octal such as 0o660",
                    mode.get_ref()
                ),
            ))
        }
        Some(mode) => Some(*mode.get_ref()),
        None => None,
    };
    let timeout = match &m.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => match parse_duration(t.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                return Err(err_at(
                    Some(t.span()),
                    Some("timeout"),
                    "`timeout` must be greater than zero".into(),
                ))
            }
            Err(e) => {
                return Err(err_at(
                    Some(t.span()),
                    Some("timeout"),
                    format!("`timeout`: {e}"),
                ))
            }
        },
    };
    let max_connections = match &m.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v) if v > 0 => v,
            _ => {
                return Err(err_at(
                    Some(n.span()),
                    Some("max_connections"),
                    "`max_connections` must be at least 1".into(),
                ))
            }
        },
    };
    Ok(MilterConfig {
        listen,
        socket_mode,
        socket_group: m.socket_group.filter(|g| !g.is_empty()),
        target,
        on_failure: m.on_failure.unwrap_or(OnFailure::Tempfail),
        timeout,
        max_connections,
        add_header: m.add_header.unwrap_or(false),
    })
}

/// What a reload (SIGHUP) does with a newly read `[milter]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reload {
    /// The configuration to run with from now on: the new `on_failure`, `timeout`,
    /// `add_header` and `target`; the old `listen`, `socket_mode`, `socket_group` and
    /// `max_connections` (the socket is bound and indymilter is running).
    pub config: MilterConfig,
    /// The keys applied, each as `key: old -> new` (empty: nothing changed).
    pub applied: Vec<String>,
    /// The keys that changed but take effect only after a restart.
    pub need_restart: Vec<&'static str>,
}

/// Decides what a reload applies: `on_failure`, `timeout` and `add_header` for new
/// messages, `target` for new LMTP connections; a change of `listen`, `socket_mode`,
/// `socket_group` or `max_connections` is reported as needing a restart and not
/// applied.
pub fn reload(old: &MilterConfig, new: &MilterConfig) -> Reload {
    let mut applied = Vec::new();
    if old.on_failure != new.on_failure {
        applied.push(format!(
            "on_failure: {:?} -> {:?}",
            old.on_failure, new.on_failure
        ));
    }
    if old.timeout != new.timeout {
        applied.push(format!("timeout: {:?} -> {:?}", old.timeout, new.timeout));
    }
    if old.add_header != new.add_header {
        applied.push(format!(
            "add_header: {} -> {} (for MTA connections made from now on)",
            old.add_header, new.add_header
        ));
    }
    if old.target != new.target {
        applied.push(format!("target: {} -> {}", old.target, new.target));
    }
    let mut need_restart = Vec::new();
    if old.listen != new.listen {
        need_restart.push("listen");
    }
    if old.socket_mode != new.socket_mode {
        need_restart.push("socket_mode");
    }
    if old.socket_group != new.socket_group {
        need_restart.push("socket_group");
    }
    if old.max_connections != new.max_connections {
        need_restart.push("max_connections");
    }
    Reload {
        config: MilterConfig {
            listen: old.listen.clone(),
            socket_mode: old.socket_mode,
            socket_group: old.socket_group.clone(),
            max_connections: old.max_connections,
            target: new.target.clone(),
            on_failure: new.on_failure,
            timeout: new.timeout,
            add_header: new.add_header,
        },
        applied,
        need_restart,
    }
}

/// The first `[[listener]]` with `protocol = "lmtp"`, `trust_xcoffer = true` and a
/// `unix:` bind: cofferd's default for `target` too.
fn default_target(listeners: &[toml::Table], resolve: &dyn Fn(&str) -> PathBuf) -> Option<PathBuf> {
    listeners.iter().find_map(|l| {
        let lmtp = l.get("protocol").and_then(toml::Value::as_str) == Some("lmtp");
        let trusted = l.get("trust_xcoffer").and_then(toml::Value::as_bool) == Some(true);
        let path = l
            .get("bind")
            .and_then(toml::Value::as_str)
            .and_then(|b| b.strip_prefix("unix:"))
            .filter(|p| !p.is_empty())?;
        (lmtp && trusted).then(|| resolve(path))
    })
}

/// `HOST:PORT` or `[IPv6]:PORT` with a non-empty host and a port number.
fn host_port_ok(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
}

/// Parses `"30s"`, `"250ms"`, `"5m"`, `"2h"`, `"1d"` or a sum such as `"1h30m"` (the
/// same rule as cofferd: a bare number is refused).
///
/// # Errors
/// Anything else, with a message saying what is expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: &[(&str, u64)] = &[
        ("ms", 1),
        ("s", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
    ];
    let bad = || {
        format!(
            "invalid duration {text:?}: expected a number with a unit (ms, s, m, h, d), \
             e.g. \"30s\" or \"1h30m\""
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let (_, ms) = UNITS.iter().find(|(u, _)| *u == unit).ok_or_else(bad)?;
        total = n
            .checked_mul(*ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total))
}

/// 1-based line and column (in characters) of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_file(text: &str) -> Result<MilterConfig, ConfigError> {
        parse(
            text,
            "/etc/coffer/coffer.toml",
            Path::new("/etc/coffer"),
            false,
        )
    }

    #[test]
    fn embedded_default() {
        let c = parse(EMBEDDED_TOML, EMBEDDED_NAME, Path::new("."), true).unwrap();
        assert_eq!(c.listen, Addr::Unix("./coffer-data/milter.sock".into()));
        assert_eq!(c.target, Addr::Unix("./coffer-data/lmtp.sock".into()));
        assert_eq!(c.on_failure, OnFailure::Tempfail);
        assert_eq!(c.timeout, Duration::from_secs(120));
        assert_eq!(c.max_connections, 256);
        assert!(!c.add_header);
        assert_eq!(c.socket_mode, None);
    }

    #[test]
    fn full_section() {
        let c = parse_file(
            r#"
[node]
name = "a"
whatever = 1

[[listener]]
name = "journal"
bind = "0.0.0.0:25"
unknown_to_us = true

[milter]
listen = "unix:/var/spool/postfix/coffer/milter.sock"
socket_mode = 0o660
socket_group = "coffer"
target = "unix:/var/lib/coffer/lmtp.sock"
on_failure = "accept"
timeout = "1m30s"
max_connections = 300
add_header = true

[console]
bind = "127.0.0.1:8093"
"#,
        )
        .unwrap();
        assert_eq!(
            c,
            MilterConfig {
                listen: Addr::Unix("/var/spool/postfix/coffer/milter.sock".into()),
                socket_mode: Some(0o660),
                socket_group: Some("coffer".into()),
                target: Addr::Unix("/var/lib/coffer/lmtp.sock".into()),
                on_failure: OnFailure::Accept,
                timeout: Duration::from_secs(90),
                max_connections: 300,
                add_header: true,
            }
        );
    }

    #[test]
    fn defaults_follow_data_dir_and_the_trusted_lmtp_listener() {
        let c = parse_file("[node]\ndata_dir = \"store\"\n").unwrap();
        assert_eq!(c.listen, Addr::Unix("/etc/coffer/store/milter.sock".into()));
        assert_eq!(c.target, Addr::Unix("/etc/coffer/store/lmtp.sock".into()));
        let c = parse_file(
            "[[listener]]\nname = \"m\"\nprotocol = \"lmtp\"\nbind = \"unix:x/l.sock\"\n\
             trust_xcoffer = true\n",
        )
        .unwrap();
        assert_eq!(c.target, Addr::Unix("/etc/coffer/x/l.sock".into()));
        assert_eq!(c.listen, Addr::Unix("/var/lib/coffer/milter.sock".into()));
        // Untrusted LMTP listeners are not a target.
        let c =
            parse_file("[[listener]]\nname = \"m\"\nprotocol = \"lmtp\"\nbind = \"unix:l.sock\"\n")
                .unwrap();
        assert_eq!(c.target, Addr::Unix("/var/lib/coffer/lmtp.sock".into()));
    }

    #[test]
    fn inet_addresses() {
        let c = parse_file("[milter]\nlisten = \"inet:127.0.0.1:8891\"\ntarget = \"[::1]:2424\"\n")
            .unwrap();
        assert_eq!(c.listen, Addr::Inet("127.0.0.1:8891".into()));
        assert_eq!(c.target, Addr::Inet("[::1]:2424".into()));
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[milter]\nlisten = \"unix:a\"\ntimout = \"1s\"\n",
                3,
                "unknown key `timout`",
            ),
            (
                "[milter]\nlisten = \"127.0.0.1:25\"\n",
                2,
                "invalid `listen`",
            ),
            ("[milter]\ntarget = \"unix:\"\n", 2, "unix: needs a path"),
            ("[milter]\n\ntimeout = \"30\"\n", 3, "invalid duration"),
            ("[milter]\ntimeout = \"0s\"\n", 2, "greater than zero"),
            ("[milter]\nmax_connections = 0\n", 2, "at least 1"),
            (
                "[milter]\non_failure = \"drop\"\n",
                2,
                "unknown variant `drop`",
            ),
            ("[milter]\nsocket_mode = 0o77777\n", 2, "TOML octal"),
            ("[milter]\nadd_header = \"yes\"\n", 2, "invalid type"),
            ("[milter\n", 1, ""),
        ];
        for (text, line, needle) in cases {
            let e = parse_file(text).unwrap_err();
            assert_eq!(e.line, Some(*line), "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().starts_with("/etc/coffer/coffer.toml:"), "{e}");
        }
    }

    #[test]
    fn reload_applies_what_new_messages_use_and_reports_the_rest() {
        let old =
            parse_file("[milter]\nlisten = \"unix:/run/m.sock\"\ntarget = \"unix:/run/l.sock\"\n")
                .unwrap();
        // Nothing changed.
        let r = reload(&old, &old.clone());
        assert_eq!(r.config, old);
        assert!(r.applied.is_empty() && r.need_restart.is_empty(), "{r:?}");

        // Everything changed: the live keys are applied, the socket keys are not.
        let new = parse_file(
            "[milter]\nlisten = \"inet:127.0.0.1:8891\"\nsocket_mode = 0o660\n\
             socket_group = \"coffer\"\ntarget = \"127.0.0.1:2424\"\n\
             on_failure = \"accept\"\ntimeout = \"5s\"\nmax_connections = 10\n\
             add_header = true\n",
        )
        .unwrap();
        let r = reload(&old, &new);
        assert_eq!(
            r.config,
            MilterConfig {
                listen: old.listen.clone(),
                socket_mode: None,
                socket_group: None,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                target: Addr::Inet("127.0.0.1:2424".into()),
                on_failure: OnFailure::Accept,
                timeout: Duration::from_secs(5),
                add_header: true,
            }
        );
        assert_eq!(
            r.need_restart,
            ["listen", "socket_mode", "socket_group", "max_connections"]
        );
        let applied = r.applied.join("; ");
        for key in ["on_failure", "timeout", "add_header", "target"] {
            assert!(applied.contains(&format!("{key}: ")), "{applied}");
        }

        // Only a socket key changed: nothing applied, a restart reported.
        let mut only_mode = old.clone();
        only_mode.socket_mode = Some(0o600);
        let r = reload(&old, &only_mode);
        assert_eq!(r.config, old);
        assert!(r.applied.is_empty());
        assert_eq!(r.need_restart, ["socket_mode"]);

        // Reloading the reload's own result with the same file changes nothing more.
        let again = reload(&reload(&old, &new).config, &new);
        assert!(again.applied.is_empty(), "{again:?}");
        assert_eq!(
            again.need_restart,
            ["listen", "socket_mode", "socket_group", "max_connections"]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "30", "s", "1x", "1.5s", "-1s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
