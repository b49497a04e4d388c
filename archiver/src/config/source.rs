//! The text of a config file, for pointing errors at a line, a column and a key.

use std::ops::Range;

use super::ConfigError;

/// A config file's name (as the user wrote it) and text.
pub(crate) struct SourceText<'a> {
    pub file: String,
    pub text: &'a str,
}

impl SourceText<'_> {
    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// An error with no position (a problem with the file as a whole).
    pub fn error(&self, message: String) -> ConfigError {
        ConfigError::new(self.file.clone(), message)
    }

    /// An error at `span`, about `key`. The message should name the key itself; the
    /// section the span lies in is added when it helps (`in [[listener]] #2`).
    pub fn error_at(&self, span: Range<usize>, key: Option<&str>, message: String) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        let message = match self.section_at(span.start) {
            Some(section) => format!("{message} (in {section})"),
            None => message,
        };
        ConfigError {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            key: key.map(str::to_owned),
            message,
            source: None,
        }
    }

    /// Turns a TOML syntax or type error into a [`ConfigError`] naming line, column and key.
    pub fn toml_error(&self, err: &toml::de::Error) -> ConfigError {
        let raw = err.message().trim_end();
        let Some(span) = err.span() else {
            return self.error(raw.to_owned());
        };
        // serde says "field"; the file says "key".
        let message = raw
            .replace("unknown field", "unknown key")
            .replace("missing field", "missing key")
            .replace(", expected one of", "; expected one of")
            .replace(", expected `", "; expected `");
        let key = backticked(raw)
            .filter(|_| raw.starts_with("unknown field") || raw.starts_with("missing field"))
            .or_else(|| self.key_before(span.start));
        // Syntax errors come on several lines ("invalid table header\nexpected `.`").
        let message = message
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        let message = match &key {
            // Type errors ("invalid type: string, expected u32") do not say which key.
            Some(k) if !message.contains(&format!("`{k}`")) => format!("`{k}`: {message}"),
            _ => message,
        };
        self.error_at(span, key.as_deref(), message)
    }

    /// The key whose value starts at or after `offset` on the same line: the last `key =`
    /// before it, or the bare key the offset points at.
    fn key_before(&self, offset: usize) -> Option<String> {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i);
        let at = &self.text[offset..line_end];
        // The span points at a key (an unknown key reported without its name).
        if let Some((word, _)) = at.split_once('=') {
            let word = word.trim();
            if is_bare_key(word) && !self.text[line_start..offset].contains('=') {
                return Some(word.to_owned());
            }
        }
        let before = &self.text[line_start..offset];
        let eq = before.rfind('=')?;
        let word = before[..eq].trim_end();
        // Past the last character that cannot be in a bare key (which may be several
        // bytes long: slicing one byte past its start would panic).
        let start = word
            .char_indices()
            .rev()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let key = &word[start..];
        is_bare_key(key).then(|| key.to_owned())
    }

    /// The table header the offset lies under: `[node]`, or `[[listener]] #2` for the
    /// second of an array of tables. `None` at the top of the file.
    fn section_at(&self, offset: usize) -> Option<String> {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        // A span that starts exactly at a header belongs to that header's table.
        let line_end = self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i);
        let mut current: Option<String> = None;
        let mut counts: Vec<(String, usize)> = Vec::new();
        for line in self.text[..line_end].lines() {
            let t = line.trim_start();
            if let Some(rest) = t.strip_prefix("[[") {
                let name = rest.split("]]").next().unwrap_or("").trim().to_owned();
                let n = match counts.iter_mut().find(|(k, _)| *k == name) {
                    Some((_, n)) => {
                        *n += 1;
                        *n
                    }
                    None => {
                        counts.push((name.clone(), 1));
                        1
                    }
                };
                current = Some(format!("[[{name}]] #{n}"));
            } else if let Some(rest) = t.strip_prefix('[') {
                let name = rest.split(']').next().unwrap_or("").trim();
                if is_bare_key(name) {
                    current = Some(format!("[{name}]"));
                }
            }
        }
        current
    }
}

fn is_bare_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// The first `word` between backticks in a serde message.
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
