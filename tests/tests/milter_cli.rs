//! `coffer-milter check-config`: exit codes and error positions (docs/interfaces.md
//! "Commands"), `--config` before or after the subcommand, `--strict`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use coffer_e2e::{bin, run, CmdOutput};

fn milter(args: &[&str], dir: &Path) -> CmdOutput {
    let mut cmd = Command::new(bin("coffer-milter"));
    cmd.args(args).current_dir(dir).env_remove("COFFER_CONFIG");
    run(cmd, Duration::from_secs(60)).expect("run coffer-milter")
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[node]\nname = \"a\"\n\n[milter]\nlisten = \"unix:m.sock\"\ntimeout = \"30s\"\n",
    )
    .unwrap();
    let g = good.to_str().unwrap();
    for args in [
        vec!["check-config", "--config", g],
        vec!["--config", g, "check-config"],
        vec!["check-config", "--strict", &format!("--config={g}")],
    ] {
        let out = milter(&args, dir.path());
        assert_eq!(out.code, Some(0), "{args:?}: {out}");
        assert!(out.stdout_str().contains(": ok"), "{out}");
    }

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[milter]\nlisten = \"unix:m.sock\"\nlisen = \"x\"\n").unwrap();
    let out = milter(
        &["check-config", "--config", bad.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(out.code, Some(2), "{out}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:") && err.contains("`lisen`"),
        "{out}"
    );

    // A warning passes, unless --strict.
    let warn = dir.path().join("warn.toml");
    std::fs::write(&warn, "[milter]\non_failure = \"accept\"\n").unwrap();
    let w = warn.to_str().unwrap();
    let out = milter(&["check-config", "--config", w], dir.path());
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("warning:"),
        "{out}"
    );
    let out = milter(&["check-config", "--strict", "--config", w], dir.path());
    assert_eq!(out.code, Some(2), "{out}");

    // The embedded default, in an empty directory (unless this machine has a system
    // config, which resolution would pick instead).
    if !std::path::Path::new("/etc/coffer/coffer.toml").exists() {
        let out = milter(&["check-config"], dir.path());
        assert_eq!(out.code, Some(0), "{out}");
        assert!(out.stdout_str().contains("<embedded default>: ok"), "{out}");
    }

    // Usage errors.
    let out = milter(&["--bogus"], dir.path());
    assert_eq!(out.code, Some(2), "{out}");
    let out = milter(&["--config", "/nonexistent/coffer.toml"], dir.path());
    assert_eq!(out.code, Some(2), "{out}");
}
