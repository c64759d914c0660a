use super::*;

fn watch() -> LogoutWatch {
    LogoutWatch::new()
}

#[test]
fn the_watch_follows_what_the_commands_did_to_the_session() {
    let mut w = watch();
    w.from_app(b"a1 SELECT INBOX\r\n");
    w.from_server(b"* 2 EXISTS\r\na1 OK [READ-WRITE] done\r\n");
    assert!(w.reset().maybe_selected && !w.reset().tainted);
    // UNSELECT refused (a server without it): still selected.
    w.from_app(b"a2 UNSELECT\r\n");
    w.from_server(b"a2 BAD unknown command\r\n");
    assert!(w.reset().maybe_selected);
    w.from_app(b"a3 CLOSE\r\n");
    w.from_server(b"a3 OK closed\r\n");
    assert!(!w.reset().maybe_selected);
    w.from_app(b"a4 APPEND INBOX {3+}\r\nabc\r\n");
    w.from_server(b"a4 OK appended\r\n");
    assert!(!w.reset().tainted, "APPEND's literal");
    w.from_app(b"a5 SEARCH SUBJECT {3+}\r\nabc\r\n");
    w.from_server(b"* SEARCH\r\na5 OK done\r\n");
    assert!(w.reset().tainted, "arguments after a literal not seen");
    let mut w = watch();
    w.from_server(b"* BYE shutting down\r\n");
    assert!(w.reset().tainted, "the server ends the session");
    let mut w = watch();
    w.from_app(b"a1 COMPRESS DEFLATE\r\n");
    assert!(w.reset().tainted, "not followed");
    let mut w = watch();
    w.from_app(b"x NOOP\r\nx UNSELECT\r\n");
    assert!(w.reset().tainted, "one tag, two commands");
}

#[test]
fn markers_are_read_from_a_line_end_only() {
    assert_eq!(marker(b"a APPEND INBOX {12}\r\n"), Some(Marker::Sync(12)));
    assert_eq!(marker(b"* 1 FETCH (BODY[] ~{5}\r\n"), Some(Marker::Sync(5)));
    assert_eq!(marker(b"a LOGIN {3+}\r\n"), Some(Marker::NonSync(3)));
    assert_eq!(marker(b"x {3-}\r\n"), None, "not a literal (RFC 7888)");
    assert_eq!(marker(b"* OK {}\r\n"), None);
    assert_eq!(marker(b"* OK {x}\r\n"), None);
    assert_eq!(marker(b"* OK {12}\n"), None);
    assert_eq!(marker(b"{123456789012345678901}\r\n"), None);
    assert_eq!(marker(b"* OK done\r\n"), None);
}

#[test]
fn a_lone_logout_with_nothing_outstanding_is_answered_here() {
    let mut w = watch();
    assert!(w.app_chunk(b"b LOGOUT\r\n", true));
    assert_eq!(w.answered(), Some("b"));
    let mut w = watch();
    assert!(w.app_chunk(b"A0007 logout\r\n", true));
    assert_eq!(w.answered(), Some("A0007"));
    assert_eq!(
        answer("A0007"),
        "* BYE Logging out\r\nA0007 OK LOGOUT completed\r\n"
    );
}

#[test]
fn a_logout_behind_an_unanswered_command_is_relayed() {
    let mut w = watch();
    assert!(!w.app_chunk(b"a1 SELECT INBOX\r\n", true));
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", true).is_none(),
        "a1 not answered"
    );
    let mut w = watch();
    w.from_app(b"a1 SELECT INBOX\r\n");
    w.from_server(b"* 3 EXISTS\r\n* OK [UIDVALIDITY 1] x\r\n");
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", true).is_none(),
        "untagged only"
    );
    w.from_server(b"a1 OK [READ-WRITE] Select completed\r\n");
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", false).is_none(),
        "reply not yet written"
    );
    assert!(w.app_chunk(b"a2 LOGOUT\r\n", true));
}

#[test]
fn pipelined_or_split_logouts_are_relayed() {
    let mut w = watch();
    assert!(!w.app_chunk(b"a1 NOOP\r\na2 LOGOUT\r\n", true));
    assert_eq!(w.outstanding.len(), 2);
    let mut w = watch();
    assert!(!w.app_chunk(b"a2 LOG", true));
    assert!(
        w.would_take(b"OUT\r\n", true).is_none(),
        "not at a command boundary"
    );
    let mut w = watch();
    w.from_server(b"* 4 EXI");
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", true).is_none(),
        "server mid-line"
    );
    assert!(w.would_take(b"a2 LOGOUT extra\r\n", true).is_none());
    assert!(w.would_take(b"a2 LOGOUT", true).is_none());
}

#[test]
fn literal_contents_never_count_as_replies() {
    let mut w = watch();
    w.from_app(b"a1 FETCH 1 BODY[]\r\n");
    // The message body holds lines that look like a tagged reply and a literal marker.
    let body = b"Subject: x\r\n\r\na1 OK fake\r\nb {2}\r\n";
    let mut reply = format!("* 1 FETCH (BODY[] {{{}}}\r\n", body.len()).into_bytes();
    reply.extend_from_slice(body);
    // Fed in pieces, split inside the marker and the literal.
    for piece in reply.chunks(7) {
        w.from_server(piece);
        assert!(w.would_take(b"a2 LOGOUT\r\n", true).is_none());
    }
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", true).is_none(),
        "FETCH line not ended"
    );
    w.from_server(b")\r\n");
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", true).is_none(),
        "a1 not answered"
    );
    w.from_server(b"a1 OK Fetch completed\r\n");
    assert!(w.app_chunk(b"a2 LOGOUT\r\n", true));
}

#[test]
fn non_synchronizing_literals_are_followed_synchronizing_ones_stop_the_watch() {
    let mut w = watch();
    w.from_app(b"a1 APPEND INBOX {10+}\r\nb LOGOUT\r\n\r\n");
    assert_eq!(w.outstanding.len(), 1);
    w.from_server(b"a1 OK Append completed\r\n");
    assert!(w.app_chunk(b"a2 LOGOUT\r\n", true));
    let mut w = watch();
    w.from_app(b"a1 APPEND INBOX {11}\r\n");
    assert!(!w.following());
    w.from_server(b"a1 NO [TOOBIG] no\r\n");
    assert!(w.would_take(b"a2 LOGOUT\r\n", true).is_none());
    // Over LITERAL-'s 4096 bytes a server may refuse the literal and read its bytes as
    // commands: not followed, and the session not reusable.
    let mut w = watch();
    w.from_app(b"a1 APPEND INBOX {4097+}\r\n");
    assert!(!w.following());
    assert!(w.reset().tainted);
    // `{n-}` is no literal: what follows is a command (here one that is not reset-safe).
    let mut w = watch();
    w.from_app(b"a1 APPEND INBOX {20-}\r\nc ENABLE CONDSTORE\r\n");
    assert!(w.reset().tainted, "the ENABLE after {{20-}} was seen");
}

#[test]
fn idle_done_and_streams_that_change_are_handled() {
    let mut w = watch();
    w.from_app(b"a1 IDLE\r\n");
    w.from_server(b"+ idling\r\n* 5 EXISTS\r\n");
    assert!(
        w.would_take(b"a2 LOGOUT\r\n", true).is_none(),
        "IDLE still running"
    );
    w.from_app(b"DONE\r\n");
    w.from_server(b"a1 OK Idle completed\r\n");
    assert!(w.app_chunk(b"a2 LOGOUT\r\n", true));
    for line in [
        &b"a1 COMPRESS DEFLATE\r\n"[..],
        b"a1 starttls\r\n",
        b"garbage\r\n",
        b"a(1 NOOP\r\n",
    ] {
        let mut w = watch();
        w.from_app(line);
        assert!(!w.following(), "{}", String::from_utf8_lossy(line));
        w.from_server(b"a1 OK\r\n");
        assert!(w.would_take(b"a2 LOGOUT\r\n", true).is_none());
    }
    let mut w = watch();
    w.from_server(b"x OK unasked\r\n");
    assert!(!w.following(), "a reply to nothing the watch saw");
    for reply in [&b"b OK not a1's\r\n"[..], b"\r\n", b"a1 MAYBE\r\n"] {
        let mut w = watch();
        w.from_app(b"a1 NOOP\r\n");
        w.from_server(reply);
        assert!(!w.following(), "{}", String::from_utf8_lossy(reply));
    }
    let mut w = watch();
    for i in 0..MAX_OUTSTANDING {
        w.from_app(format!("p{i} NOOP\r\n").as_bytes());
    }
    assert!(w.following());
    w.from_app(b"q NOOP\r\n");
    assert!(!w.following(), "too many outstanding");
}
