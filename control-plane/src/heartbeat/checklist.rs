//! Whether an agent's checklist (its `HEARTBEAT.md`) gives the model anything
//! to check. An effectively empty checklist is skipped as
//! `skipped(empty_checklist)` without an LLM call, so a template nobody
//! filled in costs nothing.
//!
//! The test is line-based Markdown, deliberately conservative: only the
//! structure of a template counts as empty — headings, blank lines,
//! horizontal rules, HTML comments, empty list items and empty checkboxes.
//! Any other text (a checkbox with words after it, prose, a table, a link,
//! the contents of a code block) means there is something to check: when in
//! doubt we run, because a wrongly skipped heartbeat is silent.

/// True when `text` contains nothing for the model to check.
pub fn is_effectively_empty(text: &str) -> bool {
    let text = strip_html_comments(text.trim_start_matches('\u{feff}'));
    let mut fence: Option<char> = None;
    let mut lines = text.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if let Some(marker) = fence {
            if is_fence(line) == Some(marker) {
                fence = None;
            } else if !line.is_empty() {
                // Anything inside a code block is content.
                return false;
            }
            continue;
        }
        if let Some(marker) = is_fence(line) {
            fence = Some(marker);
            continue;
        }
        if is_structural(line) {
            continue;
        }
        // A paragraph line directly underlined by `===` or `---` is a setext
        // heading; the underline is consumed with it. (Not a list item or a
        // quote: `- [ ] task` followed by `---` is a task and a rule.)
        let paragraph = strip_list_marker(line).is_none() && !line.starts_with('>');
        if paragraph && lines.peek().is_some_and(|next| is_setext_underline(next)) {
            lines.next();
            continue;
        }
        return false;
    }
    true
}

/// Removes `<!-- ... -->` comments, including multi-line ones. An unclosed
/// comment runs to the end of the text, as in CommonMark.
fn strip_html_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        match rest[start + 4..].find("-->") {
            Some(end) => rest = &rest[start + 4 + end + 3..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// Whether a trimmed line carries no checkable content on its own.
fn is_structural(line: &str) -> bool {
    if line.is_empty() || is_atx_heading(line) || is_thematic_break(line) {
        return true;
    }
    // Block quotes: judge what is quoted.
    if let Some(quoted) = line.strip_prefix('>') {
        return is_structural(quoted.trim());
    }
    match strip_list_marker(line) {
        Some(item) => is_empty_item(item),
        None => false,
    }
}

/// `#` to `######` followed by a space or the end of the line. The heading
/// text is structure, not a task.
fn is_atx_heading(line: &str) -> bool {
    let hashes = line.bytes().take_while(|&b| b == b'#').count();
    (1..=6).contains(&hashes)
        && line[hashes..]
            .chars()
            .next()
            .is_none_or(char::is_whitespace)
}

/// `---`, `***`, `___` (three or more, spaces allowed between).
fn is_thematic_break(line: &str) -> bool {
    let mut chars = line.chars().filter(|c| !c.is_whitespace());
    let Some(first) = chars.next() else {
        return false;
    };
    matches!(first, '-' | '*' | '_') && {
        let rest: Vec<char> = chars.collect();
        rest.len() >= 2 && rest.iter().all(|&c| c == first)
    }
}

fn is_setext_underline(line: &str) -> bool {
    let line = line.trim();
    !line.is_empty() && (line.chars().all(|c| c == '=') || line.chars().all(|c| c == '-'))
}

/// The opening or closing line of a fenced code block (three or more
/// backticks or tildes); returns the fence character.
fn is_fence(line: &str) -> Option<char> {
    ['`', '~']
        .into_iter()
        .find(|&c| line.starts_with(&String::from(c).repeat(3)))
}

/// Strips a bullet (`-`, `*`, `+`) or ordered (`1.`, `1)`) list marker; the
/// marker must be followed by whitespace or the end of the line.
fn strip_list_marker(line: &str) -> Option<&str> {
    let after = if let Some(rest) = line.strip_prefix(['-', '*', '+']) {
        rest
    } else {
        let digits = line.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        line[digits..].strip_prefix(['.', ')'])?
    };
    if after.is_empty() || after.starts_with(char::is_whitespace) {
        Some(after.trim())
    } else {
        None
    }
}

/// The text of a list item is empty, or only a checkbox (`[ ]`, `[x]`, `[]`).
fn is_empty_item(item: &str) -> bool {
    let item = item.trim();
    if item.is_empty() {
        return true;
    }
    let Some(inner) = item.strip_prefix('[') else {
        return false;
    };
    let Some((mark, after)) = inner.split_once(']') else {
        return false;
    };
    matches!(mark.trim(), "" | "x" | "X") && after.trim().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_blank_text_is_empty() {
        assert!(is_effectively_empty(""));
        assert!(is_effectively_empty("\n\n  \t\n"));
        assert!(is_effectively_empty("\u{feff}\n"));
    }

    #[test]
    fn a_template_of_headings_rules_comments_and_empty_boxes_is_empty() {
        let template = "\
# HEARTBEAT.md

<!-- Add things for the agent to check on every heartbeat.
     One checkbox per item. -->

## Inbox
- [ ]
* [ ]
+ [ ]
1. [ ]
2) [ ]

---
***
_ _ _

## Calendar
-
1.
> ## quoted heading
> - [ ]
>
Setext heading
==============
Another
-------
### Closed ATX heading ###
";
        assert!(is_effectively_empty(template));
    }

    #[test]
    fn a_checkbox_with_text_is_not_empty() {
        assert!(!is_effectively_empty("# Tasks\n- [ ] check the inbox\n"));
        assert!(!is_effectively_empty("1. [ ] water the plants"));
        assert!(!is_effectively_empty("- [x] done but still listed"));
        assert!(!is_effectively_empty("- [ ] check the inbox\n---\n"));
        assert!(!is_effectively_empty("- check the build"));
    }

    #[test]
    fn prose_is_not_empty() {
        assert!(!is_effectively_empty("Check whether the deploy finished."));
        assert!(!is_effectively_empty("# Title\n\nLook at the dashboard\n"));
        assert!(!is_effectively_empty("> remember the standup"));
        assert!(!is_effectively_empty("| a | b |\n|---|---|\n| 1 | 2 |"));
    }

    #[test]
    fn only_comments_are_stripped_not_surrounding_text() {
        assert!(is_effectively_empty("<!-- a -->\n<!--\nmulti\nline\n-->"));
        assert!(!is_effectively_empty("check <!-- not this --> email"));
        assert!(!is_effectively_empty("<!-- a --> ping the server"));
        // An unclosed comment hides the rest, as in Markdown renderers.
        assert!(is_effectively_empty("<!-- forgot to close\n- [ ] hidden"));
    }

    #[test]
    fn hashtags_and_markers_without_space_are_text() {
        assert!(!is_effectively_empty("#todo look at logs"));
        assert!(!is_effectively_empty("####### seven hashes"));
        assert!(!is_effectively_empty("-[ ]"));
        assert!(!is_effectively_empty("1.check"));
        assert!(!is_effectively_empty("- [ ]x"));
    }

    #[test]
    fn code_blocks_are_content() {
        assert!(!is_effectively_empty("```\ncurl https://status\n```"));
        assert!(!is_effectively_empty("~~~sh\n# a shell comment\n~~~"));
        assert!(is_effectively_empty("```\n\n```"));
    }

    #[test]
    fn a_heading_alone_is_empty_whatever_it_says() {
        // Headings are structure; the model is not asked to check them.
        assert!(is_effectively_empty("# Check the inbox"));
        assert!(is_effectively_empty("##\n#"));
    }
}
