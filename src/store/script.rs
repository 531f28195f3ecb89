//! An SQL script cut into its statements, so each can be sent on its own.
//!
//! A distributed (Citus) cluster forwards the text of some DDL to its workers
//! as it arrived; when that text holds several statements the workers refuse
//! it ("cannot insert multiple commands into a prepared statement"), so
//! migrations are sent one statement at a time. The cut follows PostgreSQL's
//! lexical rules for what may hide a `;`: quoted strings (with `''`, and
//! backslash escapes in `E'…'`), quoted identifiers, dollar-quoted bodies,
//! and `--` and (nested) `/* */` comments.

/// The statements of `script`, in order, each without its `;`; pieces that
/// hold only whitespace and comments are left out.
pub fn statements(script: &str) -> Vec<&str> {
    let bytes = script.as_bytes();
    let mut statements = Vec::new();
    let (mut start, mut i) = (0, 0);
    let mut has_code = false;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let skipped = match bytes[i] {
            b'-' if rest.starts_with(b"--") => {
                let end = memchr(b'\n', &rest[2..]).map_or(rest.len(), |n| n + 3);
                i += end;
                continue;
            }
            b'/' if rest.starts_with(b"/*") => {
                i += block_comment_len(rest);
                continue;
            }
            b'\'' => quoted_len(rest, b'\'', escapes_backslash(bytes, i)),
            b'"' => quoted_len(rest, b'"', false),
            b'$' => dollar_quoted_len(rest),
            b';' => {
                if has_code {
                    statements.push(script[start..i].trim());
                }
                i += 1;
                start = i;
                has_code = false;
                continue;
            }
            _ => 1,
        };
        if !bytes[i].is_ascii_whitespace() {
            has_code = true;
        }
        i += skipped;
    }
    if has_code {
        statements.push(script[start..].trim());
    }
    statements
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// `E'…'` strings treat a backslash as an escape; standard strings do not.
fn escapes_backslash(bytes: &[u8], quote: usize) -> bool {
    quote > 0
        && matches!(bytes[quote - 1], b'E' | b'e')
        && (quote < 2 || !(bytes[quote - 2].is_ascii_alphanumeric() || bytes[quote - 2] == b'_'))
}

/// Length of a string or identifier opening at `text[0]`, quotes included;
/// a doubled quote inside stands for one.
fn quoted_len(text: &[u8], quote: u8, backslash: bool) -> usize {
    let mut i = 1;
    while i < text.len() {
        match text[i] {
            b'\\' if backslash => i += 2,
            c if c == quote && text.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    text.len()
}

/// Length of `/* … */` (comments nest in PostgreSQL).
fn block_comment_len(text: &[u8]) -> usize {
    let (mut depth, mut i) = (0usize, 0);
    while i < text.len() {
        if text[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if text[i..].starts_with(b"*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    text.len()
}

/// Length of a `$tag$ … $tag$` body opening at `text[0]`, or 1 when the `$`
/// does not open one (a parameter such as `$1`).
fn dollar_quoted_len(text: &[u8]) -> usize {
    let tag_end = text[1..]
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_'))
        .map(|n| n + 1);
    let Some(tag_end) = tag_end else { return 1 };
    if text[tag_end] != b'$' || text.get(1).is_some_and(u8::is_ascii_digit) {
        return 1;
    }
    let tag = &text[..=tag_end];
    let body = &text[tag.len()..];
    match body.windows(tag.len()).position(|w| w == tag) {
        Some(at) => tag.len() + at + tag.len(),
        None => text.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::statements;

    #[test]
    fn a_script_is_cut_at_its_semicolons() {
        assert_eq!(
            statements("CREATE TABLE a (x int);\n\nDROP INDEX b;  \n"),
            ["CREATE TABLE a (x int)", "DROP INDEX b"]
        );
        assert_eq!(statements("SELECT 1"), ["SELECT 1"]);
    }

    #[test]
    fn comments_and_blank_pieces_are_not_statements() {
        assert_eq!(
            statements(
                "-- a comment; with a semicolon\n/* and; /* nested; */ this */;\nSELECT 1; ;"
            ),
            ["SELECT 1"]
        );
        assert!(statements("-- only a comment\n").is_empty());
    }

    #[test]
    fn semicolons_inside_quotes_do_not_cut() {
        let script = "INSERT INTO t VALUES ('a;b', 'it''s; here', E'\\';', \"odd;name\");\
                      DO $$ BEGIN RAISE NOTICE 'x;'; END $$;\
                      DO $body$ SELECT '$$;'; $body$;\
                      SELECT $1;";
        assert_eq!(
            statements(script),
            [
                "INSERT INTO t VALUES ('a;b', 'it''s; here', E'\\';', \"odd;name\")",
                "DO $$ BEGIN RAISE NOTICE 'x;'; END $$",
                "DO $body$ SELECT '$$;'; $body$",
                "SELECT $1",
            ]
        );
    }
}
