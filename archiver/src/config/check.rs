//! What is valid but probably wrong ([`check`]), and what a reload cannot apply
//! ([`reload_diff`]). Pure functions of [`Config`]; no I/O.

use super::model::*;
use super::units::format_size;
use super::validate::host_port;

/// The SMTP port: mail sent there by a connection is journal mail again.
const SMTP_PORT: u16 = 25;

/// Warnings about a valid configuration: each is one line, naming the section and what to
/// do. `cofferd check-config` prints them (and fails on them with `--strict`); the
/// daemon logs them at startup and on reload.
///
/// Warned about:
/// - a connection whose `target` port is 25, or the port of one of this node's SMTP
///   listeners that does not trust XCOFFER (a journal port): the forwarded mail would be
///   archived as new journal mail, the mail loop the MailArchiva guide warns about;
/// - a TCP listener with `trust_xcoffer = true` whose TLS does not require a client
///   certificate: anyone allowed to connect could forge arrival ids and traces;
/// - an `allow` or `trusted_proxies` containing `0.0.0.0/0` or `::/0`;
/// - a route forwarding to a connection whose `peer` is this node's own name;
/// - a listener no route takes mail from, a connection no route forwards to;
/// - `proxy_protocol = true` with no `trusted_proxies`;
/// - settings that are ignored: `allow`, `proxy_protocol` or `tls` on a `unix:` listener,
///   `socket_mode` or `socket_group` on a TCP listener.
pub fn check(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let journal_ports: Vec<(u16, &str)> = config
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Smtp && !l.trust_xcoffer)
        .filter_map(|l| match &l.bind {
            BindAddr::Tcp(a) if a.port() != 0 => Some((a.port(), l.name.as_str())),
            _ => None,
        })
        .collect();

    for c in &config.connections {
        let Some((_, port)) = host_port(&c.target) else {
            continue;
        };
        if port == SMTP_PORT {
            warnings.push(format!(
                "connection `{}`: target {} is port 25, a journal port: what this node \
                 forwards would be archived there as new journal mail and can loop back; \
                 point it at the peer's trust_xcoffer listener (e.g. port 8091)",
                c.name, c.target
            ));
        } else if let Some((_, listener)) = journal_ports.iter().find(|(p, _)| *p == port) {
            warnings.push(format!(
                "connection `{}`: target {} uses the port of journal listener `{listener}` \
                 (an SMTP listener without trust_xcoffer): what this node forwards would be \
                 archived there as new journal mail and can loop back; point it at the \
                 peer's trust_xcoffer listener",
                c.name, c.target
            ));
        }
    }

    for l in &config.listeners {
        let tcp = matches!(l.bind, BindAddr::Tcp(_));
        if tcp && l.trust_xcoffer && !l.tls.as_ref().is_some_and(|t| t.require_client_cert) {
            warnings.push(format!(
                "listener `{}`: trust_xcoffer = true on a TCP listener without \
                 `tls.require_client_cert = true`: any client its `allow` admits can forge \
                 arrival ids and traces",
                l.name
            ));
        }
        for (key, nets) in [("allow", &l.allow), ("trusted_proxies", &l.trusted_proxies)] {
            if let Some(any) = nets.iter().find(|n| n.prefix_len() == 0) {
                warnings.push(format!(
                    "listener `{}`: `{key}` contains {any}, which admits every address",
                    l.name
                ));
            }
        }
        if !config.routes.iter().any(|r| r.from.contains(&l.name)) {
            warnings.push(format!(
                "listener `{}` is in no route's `from`: mail it receives is neither \
                 archived nor forwarded",
                l.name
            ));
        }
        if tcp {
            if l.proxy_protocol && l.trusted_proxies.is_empty() {
                warnings.push(format!(
                    "listener `{}`: proxy_protocol = true but `trusted_proxies` is empty: no \
                     client may send a PROXY header",
                    l.name
                ));
            }
            if l.socket_mode.is_some() || l.socket_group.is_some() {
                warnings.push(format!(
                    "listener `{}`: socket_mode and socket_group apply to unix: listeners \
                     only and are ignored on {}",
                    l.name, l.bind
                ));
            }
        } else {
            let ignored: Vec<&str> = [
                (!l.allow.is_empty()).then_some("allow"),
                l.proxy_protocol.then_some("proxy_protocol"),
                l.tls.is_some().then_some("tls"),
            ]
            .into_iter()
            .flatten()
            .collect();
            if !ignored.is_empty() {
                warnings.push(format!(
                    "listener `{}`: {} ignored on a unix: listener (the socket's mode and \
                     group guard it)",
                    l.name,
                    ignored
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                        + if ignored.len() == 1 { " is" } else { " are" }
                ));
            }
        }
    }

    for c in &config.connections {
        let forwarded = config.routes.iter().any(|r| r.forward.contains(&c.name));
        if !forwarded {
            warnings.push(format!(
                "connection `{}` is in no route's `forward`: nothing is sent to it",
                c.name
            ));
        } else if c.peer == config.node.name {
            warnings.push(format!(
                "connection `{}`: its peer `{}` is this node's own name; a route forwards \
                 to it, so this node would replicate to itself (or two nodes share a name)",
                c.name, c.peer
            ));
        }
    }
    warnings
}

/// Settings that differ between `old` and `new` and that a reload cannot apply: each
/// entry is one line for the "restart needed" log. Empty when everything that changed
/// can be applied live (`allow`, `trusted_proxies`, limits, routes, connections, TLS
/// files, ...).
///
/// Needs a restart: `[node]` (`name`, `data_dir`); a listener added or removed, or its
/// `bind`, `protocol`, `socket_mode` or `socket_group` changed (the socket is bound
/// once); `[store]` `segment_size`, `block_size`, `block_level`, `dictionary` (the writer
/// thread reads them at start); `[console]` added, removed or moved. The `[milter]`
/// section belongs to coffer-milter and is not compared.
pub fn reload_diff(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.node.name != new.node.name {
        changed(
            &mut out,
            "[node] name".into(),
            format!("`{}`", old.node.name),
            format!("`{}`", new.node.name),
        );
    }
    if old.node.data_dir != new.node.data_dir {
        changed(
            &mut out,
            "[node] data_dir".into(),
            old.node.data_dir.display().to_string(),
            new.node.data_dir.display().to_string(),
        );
    }
    let (os, ns) = (&old.store, &new.store);
    for (key, a, b) in [
        ("segment_size", os.segment_size, ns.segment_size),
        ("block_size", os.block_size, ns.block_size),
    ] {
        if a != b {
            changed(
                &mut out,
                format!("[store] {key}"),
                format_size(a),
                format_size(b),
            );
        }
    }
    if os.block_level != ns.block_level {
        changed(
            &mut out,
            "[store] block_level".into(),
            os.block_level.to_string(),
            ns.block_level.to_string(),
        );
    }
    if os.dictionary != ns.dictionary {
        changed(
            &mut out,
            "[store] dictionary".into(),
            os.dictionary.to_string(),
            ns.dictionary.to_string(),
        );
    }
    for o in &old.listeners {
        let Some(n) = new.listeners.iter().find(|n| n.name == o.name) else {
            out.push(format!("listener `{}` ({}) removed", o.name, o.bind));
            continue;
        };
        let what = |key: &str| format!("listener `{}` {key}", o.name);
        if o.bind != n.bind {
            changed(
                &mut out,
                what("bind"),
                o.bind.to_string(),
                n.bind.to_string(),
            );
        }
        if o.protocol != n.protocol {
            changed(
                &mut out,
                what("protocol"),
                o.protocol.to_string(),
                n.protocol.to_string(),
            );
        }
        if o.socket_mode != n.socket_mode {
            changed(
                &mut out,
                what("socket_mode"),
                mode(o.socket_mode),
                mode(n.socket_mode),
            );
        }
        if o.socket_group != n.socket_group {
            changed(
                &mut out,
                what("socket_group"),
                group(&o.socket_group),
                group(&n.socket_group),
            );
        }
    }
    for n in &new.listeners {
        if !old.listeners.iter().any(|o| o.name == n.name) {
            out.push(format!("listener `{}` ({}) added", n.name, n.bind));
        }
    }
    match (&old.console, &new.console) {
        (None, Some(c)) => out.push(format!("[console] added ({})", c.bind)),
        (Some(c), None) => out.push(format!("[console] removed ({})", c.bind)),
        (Some(a), Some(b)) if a.bind != b.bind => {
            out.push(format!(
                "[console] bind changed from {} to {}",
                a.bind, b.bind
            ));
        }
        _ => {}
    }
    out
}

fn changed(out: &mut Vec<String>, what: String, from: String, to: String) {
    out.push(format!("{what} changed from {from} to {to}"));
}

fn mode(m: Option<u32>) -> String {
    m.map_or_else(|| "unset".into(), |m| format!("{m:#o}"))
}

fn group(g: &Option<String>) -> String {
    g.as_ref()
        .map_or_else(|| "unset".into(), |g| format!("`{g}`"))
}
