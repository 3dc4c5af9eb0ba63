//! Writes the document as YAML in one stable, readable layout: two-space
//! indentation with sequences indented under their key (as in the docs),
//! prices as plain decimals (`0.0000025`, never `2.5e-6`), multi-line text as
//! block literals. Scalars are quoted by `serde_norway`, so anything it would
//! quote stays quoted.

use std::fmt::Write as _;

use anyhow::bail;
use serde_norway::{Mapping, Value};

/// Renders a mapping (the document root) at indentation 0.
pub(super) fn document(root: &Value) -> anyhow::Result<String> {
    let mut out = String::new();
    match root {
        Value::Mapping(m) => mapping(&mut out, m, 0)?,
        _ => bail!("the document root must be a mapping"),
    }
    Ok(out)
}

/// Renders one entry or a list of entries (what `get|list -o yaml` print)
/// in the same layout as a whole document.
pub(super) fn entries(root: &Value) -> anyhow::Result<String> {
    let mut out = String::new();
    match root {
        Value::Mapping(m) if !m.is_empty() => mapping(&mut out, m, 0)?,
        Value::Sequence(s) if !s.is_empty() => sequence(&mut out, s, 0)?,
        other => {
            out.push_str(&scalar(other, 0)?);
            out.push('\n');
        }
    }
    Ok(out)
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

fn mapping(out: &mut String, m: &Mapping, indent: usize) -> anyhow::Result<()> {
    for (k, v) in m {
        pad(out, indent);
        entry(out, k, v, indent)?;
    }
    Ok(())
}

/// `key: value` whose key starts at column `indent` (already padded).
fn entry(out: &mut String, key: &Value, value: &Value, indent: usize) -> anyhow::Result<()> {
    out.push_str(&scalar(key, indent)?);
    out.push(':');
    match value {
        Value::Mapping(m) if !m.is_empty() => {
            out.push('\n');
            mapping(out, m, indent + 2)
        }
        Value::Sequence(s) if !s.is_empty() => {
            out.push('\n');
            sequence(out, s, indent + 2)
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other, indent)?);
            out.push('\n');
            Ok(())
        }
    }
}

fn sequence(out: &mut String, items: &[Value], indent: usize) -> anyhow::Result<()> {
    for item in items {
        pad(out, indent);
        out.push('-');
        match item {
            Value::Mapping(m) if !m.is_empty() => {
                // The first entry shares the dash's line; the rest align with it.
                for (i, (k, v)) in m.iter().enumerate() {
                    if i == 0 {
                        out.push(' ');
                    } else {
                        pad(out, indent + 2);
                    }
                    entry(out, k, v, indent + 2)?;
                }
            }
            Value::Sequence(s) if !s.is_empty() => {
                out.push('\n');
                sequence(out, s, indent + 2)?;
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other, indent)?);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// A scalar (or empty collection) as it appears after `key: ` or `- `, where
/// the key or dash is at column `indent`.
fn scalar(value: &Value, indent: usize) -> anyhow::Result<String> {
    Ok(match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.to_string()
            } else if let Some(i) = n.as_i64() {
                i.to_string()
            } else {
                float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => string(s, indent)?,
        Value::Sequence(s) if s.is_empty() => "[]".to_string(),
        Value::Mapping(m) if m.is_empty() => "{}".to_string(),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => {
            bail!("unexpected nested value in a scalar position")
        }
    })
}

/// Shortest decimal that reads back as the same `f64`, without exponent.
fn float(f: f64) -> String {
    if f.is_nan() {
        ".nan".to_string()
    } else if f.is_infinite() {
        if f > 0.0 { ".inf" } else { "-.inf" }.to_string()
    } else {
        // `Display` for f64 never uses an exponent and round-trips exactly.
        let mut s = String::new();
        let _ = write!(s, "{f}");
        s
    }
}

/// A string quoted as `serde_norway` would; block literals are re-indented
/// under the key at `indent`.
fn string(s: &str, indent: usize) -> anyhow::Result<String> {
    let rendered = serde_norway::to_string(s)?;
    let rendered = rendered.strip_suffix('\n').unwrap_or(&rendered);
    let mut lines = rendered.split('\n');
    let mut out = lines.next().unwrap_or_default().to_string();
    for line in lines {
        out.push('\n');
        if !line.is_empty() {
            // serde_norway indents block content by 2 relative to column 0.
            pad(&mut out, indent);
            out.push_str(line);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> String {
        let v: Value = serde_norway::from_str(text).expect("valid YAML");
        document(&v).expect("renderable")
    }

    #[test]
    fn sequences_are_indented_under_their_key() {
        let text = "\
backends:
  - name: b1
    rpm: 600
    models:
      - canonical: gpt-4o
        input_cost_per_token: 0.0000025
      - canonical: llama3
        input_cost_per_token: 0
    tags: []
pools:
  primary:
    exponential: true
    empty: {}
client_keys:
  - name: app
    models:
      - gpt-4o
";
        assert_eq!(yaml(text), text);
    }

    #[test]
    fn block_literals_keep_their_content() {
        for checklist in [
            "# Checks\n- [ ] inbox zero\n- [ ] \"quotes\" and: colons\n",
            "  leading spaces\nTodo:\n- a\n",
            "a\n\n\nb\n\n",
            "no trailing newline\nsecond",
            "tab\there and trailing space \n",
            "'single' \"double\" # not a comment",
            "",
        ] {
            let mut m = Mapping::new();
            m.insert("checklist".into(), checklist.into());
            let mut item = Mapping::new();
            item.insert("agents".into(), Value::Sequence(vec![Value::Mapping(m)]));
            let text = document(&Value::Mapping(item)).expect("renderable");
            let back: Value = serde_norway::from_str(&text).expect("parses back");
            assert_eq!(
                back["agents"][0]["checklist"].as_str(),
                Some(checklist),
                "{text}"
            );
        }
    }

    #[test]
    fn entries_render_like_the_document_sections() {
        let text = "\
- name: b1
  input_cost_per_token: 0.0000025
  probe:
    interval: 30s
- name: b2
";
        let v: Value = serde_norway::from_str(text).expect("valid YAML");
        assert_eq!(entries(&v).expect("renderable"), text);
        assert_eq!(entries(&Value::Sequence(vec![])).expect("empty"), "[]\n");
    }

    #[test]
    fn floats_are_plain_decimals() {
        assert_eq!(float(0.0000025), "0.0000025");
        assert_eq!(float(0.00001), "0.00001");
        assert_eq!(float(0.05), "0.05");
        assert_eq!(float(0.0), "0");
        assert_eq!(float(1e-12).parse::<f64>(), Ok(1e-12));
    }
}
