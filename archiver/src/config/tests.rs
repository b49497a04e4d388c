use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "/etc/coffer/test.toml";

/// The smallest useful file; cases append to it.
const BASE: &str = r#"[node]
name = "n1"

[[listener]]
name = "journal"
bind = "127.0.0.1:2525"

[[route]]
from = ["journal"]
"#;

fn parse_ok(text: &str) -> Config {
    from_toml(text, ConfigSource::File(FILE.into())).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn parse_err(text: &str) -> ConfigError {
    match from_toml(text, ConfigSource::File(FILE.into())) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

fn sock(s: &str) -> BindAddr {
    BindAddr::Tcp(s.parse().unwrap())
}

#[test]
fn interfaces_example_parses() {
    let c = parse_ok(include_str!("testdata/interfaces-example.toml"));
    assert_eq!(c.node.name, "archive-a");
    assert_eq!(c.node.data_dir, Path::new("/var/lib/coffer"));
    assert_eq!(c.store.max_pending, 256 << 20);
    assert_eq!(c.store.min_free_disk, 1 << 30);
    assert_eq!(c.store.segment_size, 64 << 20);
    assert_eq!(c.store.block_size, 4 << 20);
    assert_eq!(c.store.block_level, 19);
    assert!(c.store.dictionary);

    let names: Vec<&str> = c.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["journal", "milter", "ha"]);
    let journal = &c.listeners[0];
    assert_eq!(journal.protocol, Protocol::Smtp);
    assert_eq!(journal.bind, sock("0.0.0.0:25"));
    assert_eq!(
        journal.allow,
        vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(journal.max_message_size, 50 << 20);
    assert_eq!(journal.max_recipients, 1000);
    assert_eq!(journal.max_connections, 512);
    assert_eq!(journal.idle_timeout, Duration::from_secs(300));
    assert_eq!(journal.socket_mode, Some(0o600));
    assert_eq!(journal.socket_group, None);
    let tls = journal.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/etc/coffer/tls.crt"));
    assert!(!tls.required && !tls.require_client_cert);
    assert_eq!(tls.client_ca, None);

    let milter = &c.listeners[1];
    assert_eq!(milter.protocol, Protocol::Lmtp);
    assert_eq!(
        milter.bind,
        BindAddr::Unix("/var/lib/coffer/lmtp.sock".into())
    );
    assert!(milter.trust_xcoffer);
    assert!(
        milter.allow.is_empty(),
        "allow is not defaulted on unix: listeners"
    );

    let ha = &c.listeners[2];
    let tls = ha.tls.as_ref().unwrap();
    assert!(tls.required && tls.require_client_cert);
    assert_eq!(
        tls.client_ca.as_deref(),
        Some(Path::new("/etc/coffer/peers-ca.crt"))
    );

    let conn = &c.connections[0];
    assert_eq!(
        (conn.name.as_str(), conn.peer.as_str()),
        ("to-b", "archive-b")
    );
    assert_eq!(conn.target, "10.0.0.12:8091");
    assert_eq!(conn.source.as_deref(), Some("10.0.1.11"));
    assert_eq!(
        (conn.max_retries, conn.queue_limit, conn.sessions),
        (0, 100_000, 4)
    );
    assert_eq!(conn.probe_interval, Duration::from_secs(5));
    // "..." placeholders are relative paths: resolved against the file's folder.
    assert_eq!(
        conn.tls.as_ref().unwrap().cert.as_deref(),
        Some(Path::new("/etc/coffer/..."))
    );

    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.routes[0].from, ["journal", "milter"]);
    assert_eq!(c.routes[0].forward, ["to-b"]);
    assert!(c.routes[1].forward.is_empty());

    assert_eq!(
        c.milter.listen,
        "unix:/var/spool/postfix/coffer/milter.sock"
    );
    assert_eq!(c.milter.socket_mode, Some(0o660));
    assert_eq!(c.milter.socket_group.as_deref(), Some("coffer"));
    assert_eq!(c.milter.target, "unix:/var/lib/coffer/lmtp.sock");
    assert_eq!(c.milter.on_failure, OnFailure::Tempfail);
    assert_eq!(c.milter.timeout, Duration::from_secs(120));
    assert_eq!(c.milter.max_connections, 256);
    assert!(!c.milter.add_header);
    assert_eq!(
        c.console.as_ref().unwrap().bind,
        "127.0.0.1:8093".parse::<SocketAddr>().unwrap()
    );

    // The example documents socket_mode on a TCP listener: the only warning.
    let warnings = check(&c);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(warnings[0].contains("`journal`") && warnings[0].contains("socket_mode"));
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = format!("{BASE}\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:2\"\nalow = []\n");
    let e = parse_err(&text);
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{FILE}, line 14, column 1: ")),
        "{msg}"
    );
    assert!(
        msg.contains("unknown key `alow`") && msg.contains("[[listener]] #2"),
        "{msg}"
    );
    assert_eq!((e.line, e.key.as_deref()), (Some(14), Some("alow")));

    // Inside an inline table.
    let e = parse_err(&format!(
        "{BASE}[[connection]]\nname = \"c\"\npeer = \"p\"\ntarget = \"h:1\"\n\
         tls = {{ ca = \"x\", crt = \"y\" }}\n"
    ));
    assert_eq!(
        (e.line, e.key.as_deref()),
        Some(14).zip(Some("crt")).unzip()
    );
    assert!(
        e.to_string().contains("line 14") && e.to_string().contains("`crt`"),
        "{e}"
    );

    // An unknown section.
    let e = parse_err(&format!("{BASE}[consle]\nbind = \"127.0.0.1:1\"\n"));
    assert!(
        e.to_string().contains("line 10") && e.to_string().contains("`consle`"),
        "{e}"
    );
}

#[test]
fn type_errors_and_missing_keys_name_file_line_and_key() {
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "[store]\nblock_level = \"high\"\n",
            11,
            "block_level",
            "invalid type",
        ),
        (
            "[store]\nmax_pending = \"lots\"\n",
            11,
            "max_pending",
            "invalid size \"lots\"",
        ),
        ("[milter]\ntimeout = 30\n", 11, "timeout", "needs a unit"),
        (
            "[milter]\ntimeout = \"30x\"\n",
            11,
            "timeout",
            "unknown unit",
        ),
        (
            "[milter]\non_failure = \"drop\"\n",
            11,
            "on_failure",
            "unknown variant `drop`",
        ),
        (
            "[[listener]]\nname = \"x\"\nbind = \"127.0.0.1:3\"\nprotocol = \"http\"\n",
            13,
            "protocol",
            "`smtp` or `lmtp`",
        ),
        (
            "[[listener]]\nname = \"x\"\n",
            10,
            "bind",
            "missing key `bind`",
        ),
        (
            "[[connection]]\nname = \"c\"\npeer = \"p\"\n",
            10,
            "target",
            "missing key `target`",
        ),
        (
            "[[listener]]\nname = \"x\"\nbind = \"unix:s\"\nsocket_mode = \"0660\"\n",
            13,
            "socket_mode",
            "invalid type",
        ),
    ];
    for (tail, line, key, what) in cases {
        let e = parse_err(&format!("{BASE}{tail}"));
        let msg = e.to_string();
        assert!(msg.starts_with(FILE), "{msg}");
        assert!(msg.contains(&format!("line {line},")), "{msg}");
        assert!(msg.contains(&format!("`{key}`")), "{msg}");
        assert!(msg.contains(what), "{msg}");
        assert_eq!(e.key.as_deref(), Some(*key), "{msg}");
    }
    // A syntax error: one line of message, still placed.
    let e = parse_err("[node\nname = \"x\"\n");
    assert_eq!(e.line, Some(1));
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn defaults() {
    let c = parse_ok(BASE);
    assert_eq!(c.node.data_dir, Path::new(defaults::DATA_DIR));
    assert_eq!(c.store.max_pending, 256 << 20);
    assert_eq!(c.store.min_free_disk, 1 << 30);
    assert_eq!(c.store.segment_size, 64 << 20);
    assert_eq!(c.store.block_size, 4 << 20);
    assert_eq!(c.store.block_level, 19);
    assert!(c.store.dictionary);
    let l = &c.listeners[0];
    assert_eq!(l.protocol, Protocol::Smtp);
    assert_eq!(l.max_message_size, 50 << 20);
    assert_eq!(l.max_recipients, 1000);
    assert_eq!(l.max_connections, 512);
    assert_eq!(l.idle_timeout, Duration::from_secs(300));
    let loopback: Vec<ipnet::IpNet> =
        vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    assert_eq!(l.allow, loopback);
    assert!(!l.proxy_protocol && !l.trust_xcoffer);
    assert!(l.trusted_proxies.is_empty() && l.tls.is_none());
    assert_eq!((l.socket_mode, &l.socket_group), (None, &None));
    assert!(c.routes[0].archive && c.routes[0].forward.is_empty());
    assert_eq!(c.milter.listen, "unix:/var/lib/coffer/milter.sock");
    assert_eq!(c.milter.target, "unix:/var/lib/coffer/lmtp.sock");
    assert_eq!(c.milter.on_failure, OnFailure::Tempfail);
    assert_eq!(c.milter.timeout, Duration::from_secs(120));
    assert_eq!(c.milter.max_connections, 256);
    assert!(!c.milter.add_header && c.milter.socket_mode.is_none());
    assert!(c.console.is_none());
    assert!(check(&c).is_empty(), "{:?}", check(&c));

    // An empty [console] section turns the console on at its default bind.
    let c = parse_ok(&format!("{BASE}[console]\n"));
    assert_eq!(
        c.console.unwrap().bind,
        "127.0.0.1:8093".parse::<SocketAddr>().unwrap()
    );

    // Connection defaults.
    let c = parse_ok(&format!(
        "{BASE}forward = [\"c\"]\n[[connection]]\nname = \"c\"\npeer = \"p\"\ntarget = \"h:8091\"\n"
    ));
    let conn = &c.connections[0];
    assert_eq!(
        (conn.max_retries, conn.queue_limit, conn.sessions),
        (0, 100_000, 32)
    );
    assert_eq!(conn.probe_interval, Duration::from_secs(5));
    assert!(conn.source.is_none() && conn.tls.is_none());

    // The node name defaults to the host name.
    if let Some(host) = host_name() {
        let c = parse_ok(
            "[[listener]]\nname = \"j\"\nbind = \"127.0.0.1:1\"\n[[route]]\nfrom = [\"j\"]\n",
        );
        assert_eq!(c.node.name, host);
    }
    // An empty file is valid: no listeners, nothing to do, but nothing wrong.
    if host_name().is_some() {
        assert!(parse_ok("").listeners.is_empty());
    }
}

#[test]
fn milter_target_defaults_to_the_trusted_lmtp_listener() {
    let c = parse_ok(&format!(
        "{BASE}[[listener]]\nname = \"m\"\nprotocol = \"lmtp\"\nbind = \"unix:run/l.sock\"\n\
         trust_xcoffer = true\n"
    ));
    assert_eq!(c.milter.target, "unix:/etc/coffer/run/l.sock");
}

#[test]
fn binds_and_socket_modes() {
    let c = parse_ok(&format!(
        "{BASE}[[listener]]\nname = \"v6\"\nbind = \"[::1]:2526\"\n\
         [[listener]]\nname = \"u\"\nbind = \"unix:/run/coffer/x.sock\"\nsocket_mode = 0o660\n\
         socket_group = \"coffer\"\n"
    ));
    assert_eq!(c.listeners[1].bind, sock("[::1]:2526"));
    assert_eq!(
        c.listeners[2].bind,
        BindAddr::Unix("/run/coffer/x.sock".into())
    );
    assert_eq!(c.listeners[2].bind.to_string(), "unix:/run/coffer/x.sock");
    assert_eq!(c.listeners[2].socket_mode, Some(0o660));
    assert_eq!(c.listeners[2].socket_group.as_deref(), Some("coffer"));
    // Decimal works too (432 = 0o660), and port 0 may repeat (tests bind any free port).
    let c = parse_ok(
        "[node]\nname = \"n\"\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:0\"\n\
         [[listener]]\nname = \"u\"\nbind = \"unix:x\"\nsocket_mode = 432\n\
         [[route]]\nfrom = [\"a\", \"b\", \"u\"]\n",
    );
    assert_eq!(c.listeners[2].socket_mode, Some(0o660));
    assert_eq!(
        parse_bind("unix:rel/x", Some(Path::new("/b"))),
        Ok(BindAddr::Unix("/b/rel/x".into()))
    );
    for bad in [
        "",
        "unix:",
        "localhost:25",
        "1.2.3.4",
        "::1:25",
        "1.2.3.4:99999",
    ] {
        assert!(parse_bind(bad, None).is_err(), "{bad:?}");
    }
}

#[test]
fn validation_errors() {
    let listener2 = |extra: &str| {
        format!("{BASE}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:2526\"\n{extra}")
    };
    let connection = |extra: &str| {
        format!("{BASE}[[connection]]\nname = \"c\"\npeer = \"p\"\ntarget = \"h:8091\"\n{extra}")
    };
    // (text, line, words the message must contain)
    let cases: Vec<(String, usize, &[&str])> = vec![
        (BASE.replace("\"n1\"", "\"\""), 2, &["`name`", "must not be empty"]),
        (BASE.replace("\"n1\"", "\"a/b\""), 2, &["`name`", "`/`"]),
        (BASE.replace("\"n1\"", "\"a b\""), 2, &["`name`", "whitespace"]),
        (BASE.replace("\"n1\"", "\"a\\tb\""), 2, &["`name`", "whitespace"]),
        (BASE.replace("name = \"n1\"", "name = \"n1\"\ndata_dir = \"\""), 3, &["`data_dir`"]),
        (listener2("").replace("\"b\"", "\"journal\""), 11, &["two listeners", "`journal`"]),
        (listener2("").replace("2526", "2525"), 12, &["127.0.0.1:2525", "`journal` (line 4)"]),
        (listener2("").replace("127.0.0.1:2526", "0.0.0.0:2525"), 12, &["already takes"]),
        (listener2("").replace("127.0.0.1:2526", "[::]:2525"), 12, &["already takes"]),
        (
            format!("{BASE}[[listener]]\nname = \"u1\"\nbind = \"unix:/s\"\n[[listener]]\nname = \"u2\"\nbind = \"unix:/s\"\n"),
            15,
            &["unix:/s", "`u1`"],
        ),
        (format!("{BASE}[console]\nbind = \"127.0.0.1:2525\"\n"), 11, &["console", "`journal`"]),
        (listener2("").replace("\"b\"", "\"import\""), 11, &["reserved", "coffer import"]),
        (listener2("").replace("\"b\"", "\"\""), 11, &["listener name", "empty"]),
        (listener2("").replace("127.0.0.1:2526", "localhost:25"), 12, &["`bind`", "IP:PORT"]),
        (listener2("max_recipients = 0\n"), 13, &["`max_recipients` must not be 0"]),
        (listener2("max_connections = 0\n"), 13, &["`max_connections` must not be 0"]),
        (listener2("max_message_size = \"0MiB\"\n"), 13, &["`max_message_size` must not be 0"]),
        (listener2("idle_timeout = \"0s\"\n"), 13, &["`idle_timeout` must not be 0"]),
        (listener2("socket_mode = 0o17777\n"), 13, &["`socket_mode`", "0o17777"]),
        (listener2("allow = [\"10.0.0.0/33\"]\n"), 13, &["`allow`", "10.0.0.0/33"]),
        (listener2("trusted_proxies = [\"x\"]\n"), 13, &["`trusted_proxies`"]),
        (
            listener2("tls = { cert = \"c\", key = \"k\", require_client_cert = true }\n"),
            13,
            &["require_client_cert", "client_ca"],
        ),
        (format!("{BASE}[store]\nmax_pending = 0\n"), 11, &["`max_pending` must not be 0"]),
        (format!("{BASE}[store]\nsegment_size = \"0B\"\n"), 11, &["`segment_size`"]),
        (format!("{BASE}[store]\nblock_size = 0\n"), 11, &["`block_size`"]),
        (format!("{BASE}[store]\nblock_level = 23\n"), 11, &["`block_level`", "1 to 22"]),
        (format!("{BASE}[store]\nblock_level = 0\n"), 11, &["`block_level`"]),
        (connection("").replace("name = \"c\"", "name = \"journal\"") + "[[connection]]\nname = \"journal\"\npeer = \"q\"\ntarget = \"h:1\"\n", 15, &["two connections", "`journal`"]),
        (connection("").replace("\"p\"", "\"p q\""), 12, &["`peer`", "whitespace"]),
        (connection("").replace("h:8091", "h"), 13, &["`target`", "HOST:PORT"]),
        (connection("").replace("h:8091", "h:0"), 13, &["`target`"]),
        (connection("source = \"eth0\"\n"), 14, &["`source`", "IP address"]),
        (connection("sessions = 0\n"), 14, &["`sessions` must not be 0"]),
        (connection("queue_limit = 0\n"), 14, &["`queue_limit` must not be 0"]),
        (connection("probe_interval = \"0ms\"\n"), 14, &["`probe_interval` must not be 0"]),
        (connection("tls = { cert = \"c\" }\n"), 11, &["`cert` and `key`"]),
        (connection("tls = { cert = \"c\", key = \"k\" }\n"), 11, &["connection `c`", "`ca`"]),
        (connection("tls = { ca = \"ca\" }\n").replace("\"p\"", "\"10.0.0.2\""), 12, &["`peer`", "DNS name"]),
        (format!("{BASE}[[route]]\nfrom = [\"journal\", \"nope\"]\n"), 11, &["listener `nope`", "not defined"]),
        (format!("{BASE}forward = [\"nowhere\"]\n"), 10, &["connection `nowhere`", "not defined"]),
        (format!("{BASE}[[route]]\nfrom = []\n"), 11, &["at least one listener"]),
        (format!("{BASE}archive = false\n"), 10, &["`archive = false` is reserved"]),
        (format!("{BASE}[milter]\nmax_connections = 0\n"), 11, &["`max_connections` must not be 0"]),
        (format!("{BASE}[milter]\ntimeout = \"0s\"\n"), 11, &["`timeout` must not be 0"]),
        (format!("{BASE}[milter]\nlisten = \"/tmp/m.sock\"\n"), 11, &["`listen`", "unix:PATH or inet:HOST:PORT"]),
        (format!("{BASE}[milter]\nlisten = \"unix:\"\n"), 11, &["`listen`", "needs a path"]),
        (format!("{BASE}[milter]\ntarget = \"lmtp.sock\"\n"), 11, &["`target`"]),
        (format!("{BASE}[console]\nbind = \"unix:/c.sock\"\n"), 11, &["console `bind`"]),
    ];
    for (text, line, words) in &cases {
        let e = parse_err(text);
        let msg = e.to_string();
        assert!(msg.starts_with(FILE), "{msg}");
        assert_eq!(e.line, Some(*line), "{msg}\n{text}");
        for w in *words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}\n{text}");
        }
    }
}

#[test]
fn warnings() {
    let with = |tail: &str| check(&parse_ok(&format!("{BASE}{tail}")));
    let conn = |target: &str| {
        format!(
            "forward = [\"c\"]\n[[connection]]\nname = \"c\"\npeer = \"p\"\ntarget = \"{target}\"\n"
        )
    };
    // (file tail, words of the one expected warning)
    let cases: Vec<(String, &[&str])> = vec![
        (conn("10.0.0.2:25"), &["connection `c`", "port 25", "journal"]),
        (conn("mx.example.org:2525"), &["connection `c`", "`journal`", "journal"]),
        (
            format!("{}[[listener]]\nname = \"j2\"\nprotocol = \"lmtp\"\nbind = \"127.0.0.1:24\"\n[[route]]\nfrom = [\"j2\"]\n", conn("h:8091")),
            &[],
        ),
        (conn("h:8091").replace("\"p\"", "\"n1\""), &["connection `c`", "own name"]),
        (
            "[[listener]]\nname = \"ha\"\nbind = \"0.0.0.0:8091\"\nallow = [\"10.0.1.12\"]\ntrust_xcoffer = true\n[[route]]\nfrom = [\"ha\"]\n".into(),
            &["listener `ha`", "trust_xcoffer", "require_client_cert"],
        ),
        (
            "[[listener]]\nname = \"ha\"\nbind = \"0.0.0.0:8091\"\ntrust_xcoffer = true\ntls = { cert = \"c\", key = \"k\", required = true }\n[[route]]\nfrom = [\"ha\"]\n".into(),
            &["listener `ha`", "require_client_cert"],
        ),
        (
            "[[listener]]\nname = \"ha\"\nbind = \"0.0.0.0:8091\"\ntrust_xcoffer = true\ntls = { cert = \"c\", key = \"k\", require_client_cert = true, client_ca = \"ca\" }\n[[route]]\nfrom = [\"ha\"]\n".into(),
            &[],
        ),
        (
            "[[listener]]\nname = \"m\"\nprotocol = \"lmtp\"\nbind = \"unix:l.sock\"\ntrust_xcoffer = true\n[[route]]\nfrom = [\"m\"]\n".into(),
            &[],
        ),
        (
            "[[listener]]\nname = \"o\"\nbind = \"0.0.0.0:2600\"\nallow = [\"0.0.0.0/0\"]\n[[route]]\nfrom = [\"o\"]\n".into(),
            &["listener `o`", "0.0.0.0/0"],
        ),
        (
            "[[listener]]\nname = \"o\"\nbind = \"[::]:2600\"\nallow = [\"::/0\"]\n[[route]]\nfrom = [\"o\"]\n".into(),
            &["listener `o`", "::/0"],
        ),
        ("[[listener]]\nname = \"lost\"\nbind = \"127.0.0.1:2600\"\n".into(), &["listener `lost`", "no route"]),
        ("[[connection]]\nname = \"idle\"\npeer = \"p\"\ntarget = \"h:8091\"\n".into(), &["connection `idle`", "no route"]),
        (
            "[[listener]]\nname = \"p\"\nbind = \"0.0.0.0:2600\"\nproxy_protocol = true\n[[route]]\nfrom = [\"p\"]\n".into(),
            &["listener `p`", "trusted_proxies"],
        ),
        (
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:2600\"\nsocket_group = \"g\"\n[[route]]\nfrom = [\"t\"]\n".into(),
            &["listener `t`", "socket_group", "ignored"],
        ),
        (
            "[[listener]]\nname = \"u\"\nbind = \"unix:u.sock\"\nallow = [\"10.0.0.0/8\"]\n[[route]]\nfrom = [\"u\"]\n".into(),
            &["listener `u`", "`allow` is ignored"],
        ),
    ];
    for (tail, words) in &cases {
        let w = with(tail);
        if words.is_empty() {
            assert!(w.is_empty(), "{w:#?}\n{tail}");
            continue;
        }
        assert_eq!(w.len(), 1, "{w:#?}\n{tail}");
        for word in *words {
            assert!(w[0].contains(word), "{:?} lacks {word:?}", w[0]);
        }
    }
}

#[test]
fn relative_paths_resolve_against_the_file_folder() {
    let text = "[node]\nname = \"n\"\ndata_dir = \"data\"\n\
        [[listener]]\nname = \"m\"\nprotocol = \"lmtp\"\nbind = \"unix:run/lmtp.sock\"\n\
        trust_xcoffer = true\n\
        [[listener]]\nname = \"t\"\nbind = \"127.0.0.1:2600\"\n\
        tls = { cert = \"tls/c.pem\", key = \"/abs/k.pem\", client_ca = \"ca.pem\" }\n\
        [[connection]]\nname = \"c\"\npeer = \"p\"\ntarget = \"h:1\"\n\
        tls = { ca = \"ca.pem\", cert = \"c.pem\", key = \"k.pem\" }\n\
        [[route]]\nfrom = [\"m\", \"t\"]\nforward = [\"c\"]\n\
        [milter]\nlisten = \"unix:spool/milter.sock\"\ntarget = \"unix:run/lmtp.sock\"\n";
    let c = from_toml(text, ConfigSource::File("/srv/coffer/coffer.toml".into())).unwrap();
    assert_eq!(c.node.data_dir, Path::new("/srv/coffer/data"));
    assert_eq!(
        c.listeners[0].bind,
        BindAddr::Unix("/srv/coffer/run/lmtp.sock".into())
    );
    let tls = c.listeners[1].tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/srv/coffer/tls/c.pem"));
    assert_eq!(tls.key, Path::new("/abs/k.pem"));
    assert_eq!(
        tls.client_ca.as_deref(),
        Some(Path::new("/srv/coffer/ca.pem"))
    );
    let ctls = c.connections[0].tls.as_ref().unwrap();
    assert_eq!(ctls.ca.as_deref(), Some(Path::new("/srv/coffer/ca.pem")));
    assert_eq!(ctls.key.as_deref(), Some(Path::new("/srv/coffer/k.pem")));
    assert_eq!(c.milter.listen, "unix:/srv/coffer/spool/milter.sock");
    assert_eq!(c.milter.target, "unix:/srv/coffer/run/lmtp.sock");

    // The embedded default keeps them relative: the working directory.
    let c = from_toml(text, ConfigSource::Embedded).unwrap();
    assert_eq!(c.node.data_dir, Path::new("data"));
    assert_eq!(c.milter.listen, "unix:spool/milter.sock");

    // inet: addresses are left alone.
    let c = parse_ok(&format!(
        "{BASE}[milter]\nlisten = \"inet:127.0.0.1:8890\"\ntarget = \"127.0.0.1:24\"\n"
    ));
    assert_eq!(
        (c.milter.listen.as_str(), c.milter.target.as_str()),
        ("inet:127.0.0.1:8890", "127.0.0.1:24")
    );
}

#[test]
fn embedded_default_parses_from_default_toml() {
    let c = Config::embedded();
    assert!(check(&c).is_empty(), "{:?}", check(&c));
    assert_eq!(c.source, ConfigSource::Embedded);
    assert_eq!(c.source_name(), "<embedded default>");
    assert_eq!(c.node.name, host_name().unwrap_or_else(|| "coffer".into()));
    assert_eq!(c.node.data_dir, Path::new("coffer-data"));
    assert_eq!(c.listeners.len(), 2);
    let j = &c.listeners[0];
    assert_eq!(
        (j.name.as_str(), &j.protocol, &j.bind),
        ("journal", &Protocol::Smtp, &sock("127.0.0.1:2525"))
    );
    assert_eq!(j.allow.len(), 2, "loopback only");
    let m = &c.listeners[1];
    assert_eq!(
        (m.name.as_str(), &m.protocol, &m.bind),
        (
            "milter",
            &Protocol::Lmtp,
            &BindAddr::Unix("coffer-data/lmtp.sock".into())
        )
    );
    assert!(m.trust_xcoffer && !j.trust_xcoffer);
    assert_eq!(m.socket_mode, Some(0o600));
    assert_eq!(c.routes.len(), 1);
    assert_eq!(c.routes[0].from, ["journal", "milter"]);
    assert!(c.connections.is_empty() && c.console.is_none());
    assert_eq!(c.milter.listen, "unix:coffer-data/milter.sock");
    assert_eq!(c.milter.target, "unix:coffer-data/lmtp.sock");
    assert_eq!(c.milter.on_failure, OnFailure::Tempfail);
    assert!(check(&c).is_empty(), "{:?}", check(&c));
    // The same text is what embedded_toml() hands out for packaging.
    assert!(embedded_toml().contains("bind = \"127.0.0.1:2525\""));
    assert!(from_toml(embedded_toml(), ConfigSource::Embedded).is_ok());
    // And as a file in /etc/coffer, its relative paths land beside it.
    let f = from_toml(
        embedded_toml(),
        ConfigSource::File("/etc/coffer/coffer.toml".into()),
    )
    .unwrap();
    assert_eq!(f.node.data_dir, Path::new("/etc/coffer/coffer-data"));
}

#[test]
fn resolution_order() {
    let dir = tempfile::tempdir().unwrap();
    let system = dir.path().join("system.toml");
    let explicit = dir.path().join("explicit.toml");
    let env = dir.path().join("env.toml");
    let missing = dir.path().join("missing.toml");

    // Pure decision: explicit, else env, else the system file if it exists, else embedded.
    assert_eq!(resolve_with(None, None, &missing), Resolved::Embedded);
    std::fs::write(&system, BASE).unwrap();
    assert_eq!(
        resolve_with(None, None, &system),
        Resolved::System(system.clone())
    );
    assert_eq!(
        resolve_with(None, Some("".into()), &system),
        Resolved::System(system.clone())
    );
    assert_eq!(
        resolve_with(None, Some(env.clone().into()), &system),
        Resolved::Env(env.clone())
    );
    assert_eq!(
        resolve_with(Some(&explicit), Some(env.clone().into()), &system),
        Resolved::Explicit(explicit.clone())
    );

    // Through load() and the real environment (the only test touching COFFER_CONFIG).
    std::fs::write(&explicit, BASE.replace("\"n1\"", "\"from-explicit\"")).unwrap();
    std::fs::write(&env, BASE.replace("\"n1\"", "\"from-env\"")).unwrap();
    std::env::set_var(defaults::CONFIG_ENV, &env);
    let by_env = load(None);
    let by_flag = load(Some(&explicit));
    std::env::set_var(defaults::CONFIG_ENV, &missing);
    let env_missing = load(None);
    std::env::remove_var(defaults::CONFIG_ENV);

    let by_env = by_env.unwrap();
    assert_eq!(by_env.node.name, "from-env");
    assert_eq!(by_env.source, ConfigSource::File(env.clone()));
    assert_eq!(by_flag.unwrap().node.name, "from-explicit");
    // A named file that does not exist is an error, not a fallback.
    let e = env_missing.unwrap_err();
    assert!(
        e.to_string().contains("missing.toml") && e.source.is_some(),
        "{e}"
    );
    assert!(load(Some(&missing)).is_err());
}

#[test]
fn load_file_resolves_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coffer.toml");
    std::fs::write(
        &path,
        BASE.replace("name = \"n1\"", "name = \"n1\"\ndata_dir = \"d\""),
    )
    .unwrap();
    let c = load_file(&path).unwrap();
    assert_eq!(c.node.data_dir, dir.path().join("d"));
    assert_eq!(c.source, ConfigSource::File(path.clone()));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, format!("{BASE}bogus = 1\n")).unwrap();
    let e = load_file(&bad).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}, line 10", bad.display())),
        "{e}"
    );
}

#[test]
fn reload_diff_lists_what_needs_a_restart() {
    let old = parse_ok(BASE);
    assert!(reload_diff(&old, &old).is_empty());

    // Reloadable: allow, limits, routes, connections, TLS files.
    let live = parse_ok(&format!(
        "{}allow = [\"10.0.0.0/8\"]\nmax_recipients = 5\nidle_timeout = \"10s\"\n\
         tls = {{ cert = \"c\", key = \"k\" }}\n[[route]]\nfrom = [\"journal\"]\nforward = [\"c\"]\n\
         [[connection]]\nname = \"c\"\npeer = \"p\"\ntarget = \"h:1\"\n[store]\nmax_pending = \"1MiB\"\n",
        BASE.replace("[[route]]\nfrom = [\"journal\"]\n", "")
    ));
    assert!(
        reload_diff(&old, &live).is_empty(),
        "{:?}",
        reload_diff(&old, &live)
    );

    let new = parse_ok(&format!(
        "{}[[listener]]\nname = \"extra\"\nbind = \"unix:/x.sock\"\n[console]\n[store]\nblock_level = 3\n",
        BASE.replace("n1", "n2")
            .replace("127.0.0.1:2525", "127.0.0.1:2600")
            .replace("[node]", "[node]\ndata_dir = \"/srv/c\"")
    ));
    let diff = reload_diff(&old, &new);
    let all = diff.join("\n");
    for w in [
        "[node] name changed from `n1` to `n2`",
        "[node] data_dir changed from /var/lib/coffer to /srv/c",
        "listener `journal` bind changed from 127.0.0.1:2525 to 127.0.0.1:2600",
        "listener `extra` (unix:/x.sock) added",
        "[console] added (127.0.0.1:8093)",
        "[store] block_level changed from 19 to 3",
    ] {
        assert!(all.contains(w), "{all}\nlacks {w}");
    }
    assert_eq!(diff.len(), 6, "{all}");
    let back = reload_diff(&new, &old).join("\n");
    assert!(
        back.contains("listener `extra` (unix:/x.sock) removed")
            && back.contains("[console] removed")
    );
}

/// Found by fuzzing (fuzz/corpus/config): a multi-byte character before the `=` of a
/// broken line made the error reporter slice inside it and panic.
#[test]
fn a_multibyte_character_before_a_broken_key_is_an_error_not_a_panic() {
    for text in [
        "'# Coffer \u{2014}  \u{2014}cnd = \"707.0.0list[ener.1:8093\"\n",
        "[node]\nn\u{e9}me = \"x\"\n",
        "\u{2014}= 1\n",
        "a\u{2014}b = [\n",
    ] {
        let e = from_toml(text, ConfigSource::Embedded).expect_err(text);
        assert!(e.line.is_some(), "{text:?}: {e}");
    }
}
