//! Rendering of results: aligned tables and `key: value` views for humans,
//! JSON and YAML (the API's messages with proto field names) for scripts.

use std::borrow::Cow;
use std::io::{self, Write};

use clap::ValueEnum;
use serde::Serialize;

/// The `-o` output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for humans.
    Table,
    /// Pretty-printed JSON: one object, or an array for lists.
    Json,
    /// YAML: agents and pools in the shape of `export` documents
    /// (`interval: 30m`), everything else the same data as JSON.
    Yaml,
}

/// Writes `value` as JSON or YAML, or calls `table` to write the human view.
pub(crate) fn emit<T, F>(
    out: &mut dyn Write,
    format: Format,
    value: &T,
    table: F,
) -> anyhow::Result<()>
where
    T: Serialize + ?Sized,
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    match format {
        Format::Table => table(out)?,
        Format::Json => write_json(out, value)?,
        Format::Yaml => write_yaml(out, value)?,
    }
    Ok(())
}

/// Writes `value` as pretty JSON followed by a newline. The text is rendered
/// first, so a failed write stays an `io::Error` (a `serde_json::Error`
/// would hide a closed pipe from [`crate::is_broken_pipe`]).
pub(crate) fn write_json<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    out.write_all(&text)?;
    Ok(())
}

/// Writes `value` as a YAML document.
pub(crate) fn write_yaml<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    value: &T,
) -> anyhow::Result<()> {
    let text = serde_norway::to_string(value)?;
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// A table with a header row; columns are as wide as their widest cell and
/// separated by three spaces.
#[derive(Debug)]
pub(crate) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub(crate) fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; empty cells are shown as `-` so columns stay readable,
    /// control characters escaped ([`escape_control`]).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        let cells = cells
            .into_iter()
            .map(|c| {
                if c.is_empty() {
                    "-".to_string()
                } else {
                    escape_control(&c).into_owned()
                }
            })
            .collect();
        self.rows.push(cells);
    }

    /// Writes the header and the rows, without trailing spaces.
    pub(crate) fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let lines = std::iter::once(&header).chain(&self.rows);
        let mut widths = vec![0; self.header.len()];
        for line in lines.clone() {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for line in lines {
            let mut text = String::new();
            for (i, (cell, w)) in line.iter().zip(&widths).enumerate() {
                if i > 0 {
                    text.push_str("   ");
                }
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
            }
            writeln!(out, "{}", text.trim_end())?;
        }
        Ok(())
    }
}

/// A vertical `Key: value` view of one resource.
#[derive(Debug, Default)]
pub(crate) struct Details {
    fields: Vec<(&'static str, String)>,
}

impl Details {
    /// An empty view.
    pub(crate) fn new() -> Details {
        Details::default()
    }

    /// Adds a field; empty values are shown as `-`, control characters
    /// but line breaks escaped ([`escape_control`]).
    pub(crate) fn field(mut self, key: &'static str, value: impl Into<String>) -> Details {
        let value: String = value.into();
        let value = value
            .split('\n')
            .map(|line| escape_control(line).into_owned())
            .collect::<Vec<_>>()
            .join("\n");
        self.fields.push((key, value));
        self
    }

    /// Writes the fields with aligned values. Multi-line values are indented
    /// under their key.
    pub(crate) fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        for (key, value) in &self.fields {
            let label = format!("{key}:");
            if value.contains('\n') {
                writeln!(out, "{label}")?;
                for line in value.lines() {
                    writeln!(out, "  {line}")?;
                }
            } else {
                let value = if value.is_empty() { "-" } else { value };
                writeln!(out, "{label:<width$} {value}")?;
            }
        }
        Ok(())
    }
}

/// `text` with every control character (ESC, CR, LF, tab, DEL, C1…)
/// written as a Rust-style escape (`\u{1b}`, `\r`, `\n`), so a value read
/// from the server cannot move the cursor, recolour or rewrite the
/// terminal. JSON and YAML output are escaped by their encoders.
pub(crate) fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `yes`/`no` for table cells.
pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// A timestamp for table cells (RFC 3339, UTC), or empty when unset.
pub(crate) fn timestamp(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .map(claw_proto::serde_fmt::format_timestamp)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &Table) -> String {
        let mut buf = Vec::new();
        t.write(&mut buf).expect("write to a Vec");
        String::from_utf8(buf).expect("utf-8")
    }

    #[test]
    fn table_aligns_columns_and_marks_empty_cells() {
        let mut t = Table::new(&["NAME", "RPM", "KEY"]);
        t.row(vec!["openai-1".into(), "600".into(), "sk-abc…wxyz".into()]);
        t.row(vec!["b".into(), String::new(), String::new()]);
        assert_eq!(
            render(&t),
            "NAME       RPM   KEY\n\
             openai-1   600   sk-abc…wxyz\n\
             b          -     -\n"
        );
    }

    /// Issue 17: a label holding ESC/CR/LF is shown escaped, never raw.
    #[test]
    fn control_characters_are_escaped_in_tables_and_details() {
        let mut t = Table::new(&["LABEL"]);
        t.row(vec!["a\u{1b}[31mred\r\nX".into()]);
        let text = render(&t);
        assert_eq!(text, "LABEL\na\\u{1b}[31mred\\r\\nX\n");
        let d = Details::new().field("Label", "x\u{1b}]0;t\u{7}");
        let mut buf = Vec::new();
        d.write(&mut buf).expect("write to a Vec");
        let shown = String::from_utf8(buf).expect("utf-8");
        assert!(
            !shown.contains('\u{1b}') && shown.contains("\\u{1b}"),
            "{shown}"
        );
        assert_eq!(escape_control("plain"), "plain");
    }

    #[test]
    fn details_align_and_indent_multiline_values() {
        let d = Details::new()
            .field("Name", "a1")
            .field("Checklist", "- one\n- two")
            .field("Webhook", "");
        let mut buf = Vec::new();
        d.write(&mut buf).expect("write to a Vec");
        assert_eq!(
            String::from_utf8(buf).expect("utf-8"),
            "Name:      a1\nChecklist:\n  - one\n  - two\nWebhook:   -\n"
        );
    }
}
