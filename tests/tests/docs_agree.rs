//! The documents agree with the product:
//! - every key of the reference configuration in docs/interfaces.md (the one
//!   interfaces.md fixes) is described in the man page coffer.toml(5), and every key
//!   of its "Every key" tables has an entry of its own there;
//! - every metric docs/operations.md tells administrators to alert on exists on a
//!   running daemon's `/metrics` — one with a connection, so the per-connection
//!   replication metrics are there too.

use std::collections::BTreeSet;
use std::time::Duration;

use coffer_e2e::daemon::{free_addr, http_get, Daemon, Probe};
use coffer_e2e::{wait_until, workspace_root};

fn read(rel: &str) -> String {
    std::fs::read_to_string(workspace_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The first ```toml block of docs/interfaces.md.
fn reference_config() -> toml::Table {
    let doc = read("docs/interfaces.md");
    let start = doc
        .find("```toml\n")
        .expect("a ```toml block in docs/interfaces.md")
        + 8;
    let len = doc[start..].find("```").expect("its closing fence");
    doc[start..start + len]
        .parse()
        .expect("the reference configuration parses as TOML")
}

/// `section.key` for every leaf, with inline tables as `section.key.inner`.
fn keys(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => keys(&path, t, out),
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    keys(&path, item.as_table().unwrap(), out);
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

/// The man page's text with roff's escapes for '-' and fonts removed.
fn man_text() -> String {
    let src = read("packaging/man/coffer.toml.5");
    let mut s = src.replace("\\-", "-").replace("\\(em", " ");
    for font in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        s = s.replace(font, "");
    }
    s
}

fn mentions_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let before = text[..i].chars().next_back().is_none_or(|c| !is_word(c));
        let after = text[i + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !is_word(c));
        before && after
    })
}

#[test]
fn every_reference_key_is_in_the_man_page() {
    let mut all = BTreeSet::new();
    keys("", &reference_config(), &mut all);
    assert!(all.len() > 40, "parsed too few keys: {all:?}");
    let man = man_text();
    let missing: Vec<&String> = all
        .iter()
        .filter(|path| {
            // Every part of the path: the section ("listener"), the key, an inline
            // table's key ("tls") and its inner key ("require_client_cert").
            !path.split('.').all(|part| mentions_word(&man, part))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys of docs/interfaces.md not described in packaging/man/coffer.toml.5: {missing:?}"
    );
}

/// The keys of the "Every key" tables of docs/interfaces.md, each of which coffer.toml(5)
/// describes under a `.B KEY` tag of its own.
#[test]
fn every_key_of_the_key_tables_has_its_own_man_entry() {
    let doc = read("docs/interfaces.md");
    let start = doc.find("### Every key").expect("an \"Every key\" section");
    let end = doc[start..]
        .find("### The embedded default")
        .map_or(doc.len(), |n| start + n);
    let table_keys: BTreeSet<&str> = doc[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(k, _)| k))
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(table_keys.len() >= 30, "found only {table_keys:?}");
    let man = read("packaging/man/coffer.toml.5");
    let entries: BTreeSet<&str> = man.lines().filter_map(|l| l.strip_prefix(".B ")).collect();
    let missing: Vec<&&str> = table_keys
        .iter()
        .filter(|k| !entries.contains(**k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys of docs/interfaces.md without a `.B KEY` entry in coffer.toml(5): {missing:?}"
    );
}

/// `coffer_*` names in docs/operations.md (a histogram's `_bucket` series counts as
/// the histogram).
fn documented_metrics() -> BTreeSet<String> {
    let doc = read("docs/operations.md");
    let mut out = BTreeSet::new();
    let bytes = doc.as_bytes();
    for (i, _) in doc.match_indices("coffer_") {
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
            continue;
        }
        let end = doc[i..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(doc.len(), |n| i + n);
        let name = &doc[i..end];
        if name == "coffer_" {
            continue; // a file name such as coffer_NEW.deb
        }
        out.insert(name.strip_suffix("_bucket").unwrap_or(name).to_owned());
    }
    out
}

#[test]
fn every_metric_in_the_operations_guide_exists() {
    let documented = documented_metrics();
    assert!(documented.len() >= 15, "found too few: {documented:?}");
    let mut console = None;
    let d = Daemon::launch(|_| {
        let smtp = free_addr();
        let con = free_addr();
        console = Some(con);
        // A connection to a port nothing listens on: its replicator exists (and is down).
        let toml = format!(
            r#"[node]
name = "docs"
data_dir = "data"

[store]
min_free_disk = "0"

[[listener]]
name = "journal"
protocol = "smtp"
bind = "{smtp}"

[[connection]]
name = "to-nowhere"
peer = "nowhere"
target = "{nowhere}"
probe_interval = "1s"

[[route]]
from = ["journal"]
forward = ["to-nowhere"]

[console]
bind = "{con}"
"#,
            nowhere = free_addr(),
        );
        (toml, Probe::Tcp(smtp))
    });
    let console = console.unwrap();
    // The replicator registers its series once it has started.
    let text = wait_until(
        "replication series on /metrics",
        Duration::from_secs(20),
        || {
            let (code, text) = http_get(console, "/metrics").ok()?;
            (code == 200 && text.contains("coffer_replication_up{")).then_some(text)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", d.log_tail()));
    let present: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let missing: Vec<&String> = documented
        .iter()
        .filter(|m| !present.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics named in docs/operations.md but not on /metrics: {missing:?}\n{text}"
    );
}
