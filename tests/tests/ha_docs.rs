//! Every configuration in docs/high-availability.md is valid: each complete node file
//! (a ```toml block with `[node]` and a listener) and the seven steps' snippets put
//! together pass `cofferd check-config` (warnings allowed: the examples have no TLS).

use std::process::Command;
use std::time::Duration;

use coffer_e2e::{bin, run, workspace_root};

fn toml_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match (&mut current, trimmed) {
            (None, "```toml") => current = Some(Vec::new()),
            (Some(lines), "```") => {
                // Snippets inside list items are indented: drop the common indent.
                let indent = lines
                    .iter()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.len() - l.trim_start().len())
                    .min()
                    .unwrap_or(0);
                let body: Vec<&str> = lines
                    .iter()
                    .map(|l| l.get(indent..).unwrap_or(""))
                    .collect();
                out.push(body.join("\n") + "\n");
                current = None;
            }
            (Some(lines), _) => lines.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unterminated ```toml block");
    out
}

fn check(name: &str, toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(bin("cofferd"));
    cmd.arg("check-config").arg("--config").arg(&path);
    let out = run(cmd, Duration::from_secs(60)).unwrap();
    assert_eq!(out.code, Some(0), "{name}:\n{toml}\n{out}");
}

#[test]
fn every_configuration_in_the_ha_guide_is_valid() {
    let text = std::fs::read_to_string(workspace_root().join("docs/high-availability.md")).unwrap();
    let blocks = toml_blocks(&text);
    let full: Vec<&String> = blocks
        .iter()
        .filter(|b| b.contains("[node]") && b.contains("[[listener]]"))
        .collect();
    assert!(
        full.len() >= 6,
        "pair (2), chain (3) and mesh (1) expected: {}",
        full.len()
    );
    for (i, b) in full.iter().enumerate() {
        check(&format!("node-{i}"), b);
    }
    // The seven steps: their first six snippets make one node's file.
    let steps: String = blocks.iter().take(6).map(String::as_str).collect();
    for key in [
        "[node]",
        "name = \"journal\"",
        "name = \"ha\"",
        "[[connection]]",
        "from = [\"ha\"]",
    ] {
        assert!(
            steps.contains(key),
            "the step snippets lack {key}:\n{steps}"
        );
    }
    check("steps", &steps);
}
