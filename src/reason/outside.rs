//! Text from outside (a provider's error description, a discovery document's issuer, a mail
//! server's reply, a URL a spec or a server names) on its way into a condition, an event or the
//! sign-in page: one rule for all of it, so that no server can forge lines in `kubectl describe`,
//! or fill a status (etcd keeps it, every watcher receives it) with what it sends.

/// The most of any one piece of outside text a message quotes, in characters.
pub const MAX_QUOTED: usize = 300;

/// The most of a condition message, in characters: the operator's own words around what it quotes,
/// which are bounded by [`MAX_QUOTED`] each. (An event note is held to fewer bytes still:
/// `reconcile::events::MAX_NOTE_BYTES`.)
pub const MAX_MESSAGE: usize = 2048;

/// `text` made safe to show: every control character (newlines, escapes, NUL) becomes a space, the
/// ends are trimmed, and at most `max` characters are kept (cut on a character boundary, ending in
/// `…` when cut). Idempotent; text within the bound and without control characters comes back
/// trimmed only. Reads at most `max + 1` characters of `text`, however long it is.
pub fn outside_text(text: &str, max: usize) -> String {
    let trimmed = text.trim_matches(|c: char| c.is_whitespace() || c.is_control());
    let mut out: String = trimmed
        .chars()
        .take(max.saturating_add(1))
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.chars().count() > max {
        out = out.chars().take(max.saturating_sub(1)).collect();
        out.truncate(out.trim_end().len());
        if max > 0 {
            out.push('…');
        }
    } else {
        out.truncate(out.trim_end().len());
    }
    out
}

/// [`outside_text`] with [`MAX_QUOTED`], in double quotes: for a value quoted in a message.
pub fn quoted(text: &str) -> String {
    format!("\"{}\"", outside_text(text, MAX_QUOTED).replace('"', "'"))
}

/// Provider-sent text made safe to show and store: [`outside_text`], at most [`MAX_QUOTED`]
/// characters.
pub fn clean(s: &str) -> String {
    outside_text(s, MAX_QUOTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_spaces_and_long_text_is_cut_on_a_char_boundary() {
        assert_eq!(outside_text("  a\nb\u{1b}[31mc\t ", 100), "a b [31mc");
        let long = "é".repeat(1000);
        let cut = outside_text(&long, 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
        assert_eq!(outside_text(&cut, 10), cut, "idempotent");
        assert_eq!(outside_text("short", 10), "short");
        assert_eq!(outside_text("abc", 0), "");
        assert_eq!(outside_text("\n\n", 5), "");
    }

    #[test]
    fn a_quoted_value_is_bounded_and_cannot_close_its_quotes() {
        let q = quoted(&format!("x\"y{}", "z".repeat(10_000)));
        assert!(q.chars().count() <= MAX_QUOTED + 2);
        assert!(q.starts_with("\"x'y"));
    }
}
