use super::*;

/// One credential keeps at most its cap, one integration's credentials together at most
/// theirs, the oldest going first; another integration's are never touched.
#[test]
fn parked_sessions_are_capped_per_credential_and_per_mailbox() {
    let slots: Vec<(&str, Vec<u64>)> = vec![
        ("ns/mi/a", vec![1, 5, 9]),
        ("ns/mi/b", vec![2, 6]),
        ("ns/mi/c", vec![3]),
        ("ns/other/a", vec![4, 7, 8]),
    ];
    let over = |user: &str, per_credential: usize, per_mailbox: usize| {
        let mut o = over_caps(
            slots.iter().map(|(u, ids)| (*u, ids.iter().copied())),
            user,
            per_credential,
            per_mailbox,
        );
        o.sort();
        o
    };
    let pair = |u: &str, id: u64| (u.to_owned(), id);
    // a holds 3 of 2: its oldest goes; then 5 of the mailbox remain against 4: the oldest, 2.
    assert_eq!(
        over("ns/mi/a", 2, 4),
        vec![pair("ns/mi/a", 1), pair("ns/mi/b", 2)]
    );
    // Room for all.
    assert_eq!(over("ns/mi/b", 3, 10), vec![]);
    // The mailbox cap alone, whoever parked last.
    assert_eq!(
        over("ns/mi/c", 3, 3),
        vec![pair("ns/mi/a", 1), pair("ns/mi/b", 2), pair("ns/mi/c", 3)]
    );
    assert_eq!(over("ns/other/a", 3, 3), vec![]);
    assert_eq!(mailbox_of("ns/mi/app"), "ns/mi");
}
use tokio::io::{AsyncBufReadExt, BufReader, duplex};

#[test]
fn only_our_tagged_ok_completes_and_literals_are_not_untagged_lines() {
    assert_eq!(reply_line(b"P1 OK NOOP completed\r\n", "P1"), ReplyLine::Ok);
    assert_eq!(reply_line(b"P1 ok\r\n", "P1"), ReplyLine::Ok);
    assert_eq!(reply_line(b"P1 NO nope\r\n", "P1"), ReplyLine::Other);
    assert_eq!(reply_line(b"P10 OK x\r\n", "P1"), ReplyLine::Other);
    assert_eq!(reply_line(b"* 3 EXISTS\r\n", "P1"), ReplyLine::Untagged);
    assert_eq!(
        reply_line(b"* 1 FETCH (BODY[] {5}\r\n", "P1"),
        ReplyLine::Other
    );
    assert_eq!(reply_line(b"+ go\r\n", "P1"), ReplyLine::Other);
}

/// A server that answers the next command line with `answer`.
async fn answers(answer: &'static [u8], untagged: bool) -> bool {
    asked(answer, untagged).await.is_some()
}

/// [`answers`], with the untagged lines before the OK.
async fn asked(answer: &'static [u8], untagged: bool) -> Option<Vec<u8>> {
    let (ours, theirs) = duplex(4096);
    let server = tokio::spawn(async move {
        let mut theirs = BufReader::new(theirs);
        let mut line = String::new();
        theirs.read_line(&mut line).await.unwrap();
        theirs.get_mut().write_all(answer).await.unwrap();
        line
    });
    let mut stream: Box<dyn AsyncStream> = Box::new(ours);
    let ok = exchange(
        &mut stream,
        "P1",
        "NOOP",
        untagged,
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(server.await.unwrap(), "P1 NOOP\r\n");
    ok
}

#[tokio::test]
async fn the_untagged_lines_before_the_ok_are_handed_back() {
    let lines = asked(
        b"* CAPABILITY IMAP4rev1 UNSELECT IDLE\r\nP1 OK done\r\n",
        true,
    )
    .await;
    assert_eq!(
        lines.as_deref(),
        Some(&b"* CAPABILITY IMAP4rev1 UNSELECT IDLE\r\n"[..])
    );
    assert!(reuse::offers_unselect(&lines.unwrap(), ""));
}

#[tokio::test]
async fn a_probe_passes_only_on_its_tagged_ok_alone() {
    assert!(answers(b"P1 OK NOOP completed.\r\n", false).await);
    assert!(!answers(b"* BYE shutting down\r\nP1 OK x\r\n", false).await);
    assert!(!answers(b"P1 OK x\r\n* 1 EXISTS\r\n", false).await);
    assert!(!answers(b"P1 BAD x\r\n", false).await);
    assert!(!answers(b"", false).await, "no answer within the timeout");
    assert!(answers(b"* 2 EXPUNGE\r\nP1 OK x\r\n", true).await);
    assert!(!answers(b"* 1 FETCH (BODY[] {3}\r\nP1 OK x\r\n", true).await);
}
