//! Exit codes and configuration errors (interfaces.md "Commands"): 0 success, 1 a
//! finding (get found nothing), 2 usage or configuration error; `check-config`;
//! `--version` and `--help` of all three binaries; `coffer compact --wait` through the
//! daemon rewriting its index.

use std::path::Path;
use std::process::Command;

use coffer_e2e::CofferCli;
use coffer_e2e::{bin, run, CmdOutput, Node, CLI_DEADLINE};

fn exec(binary: &str, args: &[&str], cwd: &Path) -> CmdOutput {
    let mut cmd = Command::new(bin(binary));
    cmd.args(args).current_dir(cwd).env_remove("COFFER_CONFIG");
    run(cmd, CLI_DEADLINE).unwrap_or_else(|e| panic!("{binary} {args:?}: {e:#}"))
}

fn valid_config(dir: &Path) -> String {
    format!(
        "[node]\nname = \"cli-test\"\ndata_dir = \"{}\"\n\n\
         [[listener]]\nname = \"journal\"\nprotocol = \"smtp\"\nbind = \"127.0.0.1:{}\"\n\n\
         [[route]]\nfrom = [\"journal\"]\narchive = true\nforward = []\n",
        dir.join("data").display(),
        coffer_e2e::free_port("127.0.0.1")
    )
}

#[test]
fn get_of_an_unknown_id_is_a_finding() {
    let node = Node::start();
    node.send(
        "a@example.org",
        &["b@example.net"],
        b"Subject: x\r\n\r\nbody\r\n",
    );
    let out = node.coffer(&["get", "deadbeefdeadbeef"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stdout.is_empty(),
        "get printed something for a missing message: {out}"
    );
    let out = node.coffer(&["get", "deadbeefdeadbeef", "--envelope"]);
    assert_eq!(out.code, Some(1), "{out}");
}

#[test]
fn check_config_valid_and_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, valid_config(dir.path())).unwrap();
    let out = exec(
        "cofferd",
        &["check-config", "--config", good.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.code, Some(0), "{out}");

    let cases = [
        (
            "unknown-key.toml",
            format!("{}\n[store]\nno_such_key = 1\n", valid_config(dir.path())),
            "no_such_key",
        ),
        (
            "syntax.toml",
            "[node\nname = \"x\"\n".to_owned(),
            "syntax.toml",
        ),
        (
            "bad-bind.toml",
            valid_config(dir.path()).replace("bind = \"127.0.0.1:", "bind = \"not-an-address:"),
            "bind",
        ),
        (
            "bad-size.toml",
            format!(
                "{}\n[store]\nmax_pending = \"lots\"\n",
                valid_config(dir.path())
            ),
            "max_pending",
        ),
        (
            "unknown-listener.toml",
            valid_config(dir.path()).replace("from = [\"journal\"]", "from = [\"nope\"]"),
            "nope",
        ),
    ];
    for (name, text, mentions) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = exec(
            "cofferd",
            &["check-config", "--config", path.to_str().unwrap()],
            dir.path(),
        );
        assert_eq!(out.code, Some(2), "check-config {name}: {out}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(name),
            "check-config {name}: the error should name the file:\n{out}"
        );
        assert!(
            err.contains(mentions),
            "check-config {name}: the error should mention {mentions:?}:\n{out}"
        );
    }

    let missing = dir.path().join("missing.toml");
    let out = exec(
        "cofferd",
        &["check-config", "--config", missing.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.code, Some(2), "check-config of a missing file: {out}");
}

#[test]
fn bad_config_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[node]\nname = \"x\"\nbogus = true\n").unwrap();
    let bad = bad.to_str().unwrap();
    for args in [
        vec!["--config", bad, "status", "--json"],
        // --config is global: accepted after the subcommand too.
        vec!["status", "--json", "--config", bad],
        vec!["--config", bad, "get", "deadbeefdeadbeef"],
    ] {
        let out = exec("coffer", &args, dir.path());
        assert_eq!(out.code, Some(2), "coffer {args:?}: {out}");
    }
    let out = exec("cofferd", &["--config", bad], dir.path());
    assert_eq!(out.code, Some(2), "cofferd with a bad config: {out}");

    // Usage errors.
    let out = exec("coffer", &["no-such-subcommand"], dir.path());
    assert_eq!(out.code, Some(2), "{out}");
    let out = exec("coffer", &["search", "--no-such-flag"], dir.path());
    assert_eq!(out.code, Some(2), "{out}");
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let version = env!("CARGO_PKG_VERSION");
    for binary in ["cofferd", "coffer", "coffer-milter"] {
        let out = exec(binary, &["--version"], dir.path());
        assert_eq!(out.code, Some(0), "{binary} --version: {out}");
        assert!(
            out.stdout_str().contains(version),
            "{binary} --version should say {version}: {out}"
        );
        let out = exec(binary, &["--help"], dir.path());
        assert_eq!(out.code, Some(0), "{binary} --help: {out}");
        assert!(!out.stdout.is_empty(), "{binary} --help printed nothing");
    }
}

/// `coffer compact --wait` through a running daemon also rewrites `index.redb` in key
/// order: the file shrinks, search and get still find every message, and mail sent
/// right after is archived.
#[test]
fn compact_through_the_daemon_shrinks_the_index() {
    let node = Node::start();
    let mut sent = std::collections::BTreeMap::new();
    let mut c = node.smtp();
    for i in 0..300 {
        let body = format!(
            "From: s{i}@example.org\r\nTo: r@example.net\r\nSubject: index {i}\r\n\
             Message-ID: <idx{i}@example.org>\r\n\r\n{}\r\n",
            "words in a body ".repeat(5 + i % 40)
        );
        let acc = c
            .send("s@example.org", &["r@example.net"], body.as_bytes())
            .unwrap_or_else(|e| panic!("send {i}: {e:#}"));
        sent.insert(acc.message_id, body.into_bytes());
    }
    let _ = c.quit();
    let index = node.data_dir.join("index.redb");
    let out = node.coffer_ok(&["compact", "--wait", "--json"]);
    let doc = out.json();
    let before = doc["index_bytes_before"]
        .as_u64()
        .unwrap_or_else(|| panic!("no index sizes in the reply: {doc}\n{}", node.log_tail()));
    let after = doc["index_bytes_after"].as_u64().unwrap();
    // redb grows the reopened file ahead of its need, sparsely: compare disk use.
    let disk = |k: &str| doc["index"][k].as_u64().unwrap();
    let (disk_before, disk_after) = (disk("disk_bytes_before"), disk("disk_bytes_after"));
    assert!(
        disk_after < disk_before,
        "index on disk {disk_before} -> {disk_after}: {doc}"
    );
    assert!(after <= before, "index {before} -> {after}: {doc}");
    assert_eq!(std::fs::metadata(&index).unwrap().len(), after);
    assert!(!node.data_dir.join("index.redb.rewrite").exists());
    assert!(
        node.log_text().contains("index rewritten in key order"),
        "{}",
        node.log_tail()
    );

    let found: std::collections::BTreeSet<String> = node
        .search(&[])
        .into_iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(found, sent.keys().cloned().collect());
    for (id, bytes) in &sent {
        assert_eq!(&node.get(id), bytes, "{id}");
    }
    let late = b"Subject: after the rewrite\r\n\r\nstill archived\r\n".to_vec();
    let acc = node.send("late@example.org", &["r@example.net"], &late);
    assert_eq!(node.get(&acc.message_id), late);
    assert_eq!(node.search(&[]).len(), 301);

    // The text reply names the index sizes too.
    let out = node.coffer_ok(&["compact", "--wait"]);
    assert!(out.stdout_str().contains("; index "), "{out}");
}
