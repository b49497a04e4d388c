//! `cofferd check-config`: output and exit codes (docs/interfaces.md "Commands").

use std::path::Path;
use std::process::{Command, Output};

const VALID: &str = "[node]\nname = \"n1\"\n\n[[listener]]\nname = \"journal\"\n\
                     bind = \"127.0.0.1:2525\"\n\n[[route]]\nfrom = [\"journal\"]\n";

fn cofferd(args: &[&str], env_config: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cofferd"));
    cmd.args(args).env_remove("RUST_LOG");
    match env_config {
        Some(p) => cmd.env("COFFER_CONFIG", p),
        None => cmd.env_remove("COFFER_CONFIG"),
    };
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_config_exit_codes_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let warn = dir.path().join("warn.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&good, VALID).unwrap();
    std::fs::write(
        &warn,
        format!("{VALID}\n[[listener]]\nname = \"lost\"\nbind = \"127.0.0.1:2600\"\n"),
    )
    .unwrap();
    std::fs::write(&bad, format!("{VALID}max_recipents = 3\n")).unwrap();
    let (good_s, warn_s, bad_s) = (
        good.to_str().unwrap(),
        warn.to_str().unwrap(),
        bad.to_str().unwrap(),
    );

    // Valid; --config before or after the subcommand.
    for args in [
        ["check-config", "--config", good_s],
        ["--config", good_s, "check-config"],
    ] {
        let out = cofferd(&args, None);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{}: ok\n", good.display()));
    }

    // Warnings: printed, still 0; --strict makes them errors.
    let out = cofferd(&["check-config", "--config", warn_s], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("warning: listener `lost`"),
        "{}",
        text(&out.stderr)
    );
    let out = cofferd(&["check-config", "--strict", "--config", warn_s], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).is_empty());
    assert!(text(&out.stderr).contains("--strict"));

    // An error names the file, line and key; exit 2.
    let out = cofferd(&["check-config", "--config", bad_s], None);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(bad_s) && err.contains("line 10") && err.contains("`max_recipents`"),
        "{err}"
    );

    // $COFFER_CONFIG when --config is absent; --config wins over it.
    let out = cofferd(&["check-config"], Some(&bad));
    assert_eq!(out.status.code(), Some(2));
    let out = cofferd(&["check-config", "--config", good_s], Some(&bad));
    assert_eq!(out.status.code(), Some(0));

    // A missing file: exit 2 with the cause.
    let out = cofferd(
        &["check-config", "--config", "/nonexistent/coffer.toml"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("caused by:"),
        "{}",
        text(&out.stderr)
    );

    // The daemon refuses to start on a bad config with exit 2.
    let out = cofferd(&["--config", bad_s], None);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_version_and_usage_errors() {
    let out = cofferd(&["--version"], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).starts_with("cofferd "));
    let out = cofferd(&["--help"], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("check-config"));
    let out = cofferd(&["--bogus"], None);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn embedded_default_when_nothing_is_found() {
    if Path::new("/etc/coffer/coffer.toml").exists() {
        return; // this machine has a system config; resolution would pick it
    }
    let out = cofferd(&["check-config"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "<embedded default>: ok\n");
    assert!(text(&out.stderr).contains("embedded default"));
}
