//! Logging (abi/README.md §5.1): how the host writes a guest's message.

/// The most of a log message the host writes, in bytes (abi/README.md §7);
/// the rest is cut ([`one_line`]).
pub const MAX_LOG: usize = 4096;

/// A guest's log text as one line of at most `max` bytes (plus the marker):
/// control characters but tabs escaped (`\n`, `\r`, `\u{1b}`), so nothing a
/// guest writes can end the line or move the terminal's cursor and pass for
/// the host's own lines; other text, UTF-8 included, is kept as it is. Cut
/// after escaping, at a character boundary, with `…[truncated]`.
pub fn one_line(text: &str, max: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > max {
            let mut cut = max;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("…[truncated]");
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_escapes_controls_only_and_cuts_after() {
        assert_eq!(one_line("a\tb é \"q\" \\", 100), "a\tb é \"q\" \\");
        assert_eq!(
            one_line("x\r[host] fake\n\u{1b}[2J", 100),
            "x\\r[host] fake\\n\\u{1b}[2J"
        );
        let long = one_line(&"\n".repeat(10), 8);
        assert_eq!(long, "\\n\\n\\n\\n…[truncated]");
        assert_eq!(one_line("éé", 3), "é…[truncated]");
        assert_eq!(one_line(&"x".repeat(MAX_LOG), MAX_LOG).len(), MAX_LOG);
    }
}
