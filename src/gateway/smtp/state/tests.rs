use super::*;
use crate::gateway::config::GatewayAppConfig;

fn machine(tls: bool) -> Machine {
    Machine::new(
        Listener {
            hostname: "gw.test".into(),
            tls,
            starttls: true,
            plaintext_auth: false,
        },
        Limits::default(),
    )
}

fn reply(step: Step) -> String {
    match step {
        Step::Reply(r) | Step::Close(r) => r,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn logged_in(m: &mut Machine) {
    m.logged_in(LoggedIn {
        app: GatewayAppConfig {
            name: "app".into(),
            username: "ns/mi/app".into(),
            protocols: vec![],
            send_as: vec!["alerts@example.com".into()],
            verifiers: vec![],
        },
        mailbox: "box@example.com".into(),
        limit: 1000,
        eight_bit: true,
    });
}

#[test]
fn the_submission_port_wants_starttls_before_auth_and_advertises_accordingly() {
    let mut m = machine(false);
    let ehlo = reply(m.line(b"EHLO client"));
    assert!(ehlo.contains("STARTTLS\r\n"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(
        !ehlo.contains("8BITMIME") && !ehlo.contains("CHUNKING"),
        "{ehlo}"
    );
    assert!(reply(m.line(b"AUTH PLAIN AGEAYg==")).starts_with("530 5.7.0 Must issue a STARTTLS"));
    assert!(reply(m.line(b"MAIL FROM:<box@example.com>")).starts_with("530 "));
    assert!(matches!(m.line(b"STARTTLS"), Step::StartTls));
    m.tls_started();
    assert!(reply(m.line(b"AUTH PLAIN AGEAYg==")).starts_with("503 5.5.1 Send EHLO"));
    let ehlo = reply(m.line(b"EHLO client"));
    assert!(
        ehlo.contains("250-AUTH PLAIN LOGIN\r\n") || ehlo.ends_with("250 AUTH PLAIN LOGIN\r\n"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(ehlo.contains("SIZE\r\n"), "{ehlo}");
}

#[test]
fn auth_plain_and_login_with_and_without_initial_responses() {
    let mut m = machine(true);
    m.line(b"EHLO c");
    let Step::Login(c) = m.line(b"AUTH PLAIN AG5zL21pL2FwcABwdw==") else {
        panic!()
    };
    assert_eq!(
        (c.username.as_str(), c.password.expose()),
        ("ns/mi/app", "pw")
    );
    m.login_failed("535 x\r\n".into());
    assert_eq!(reply(m.line(b"AUTH PLAIN")), "334 \r\n");
    let Step::Login(c) = m.line(b"AG5zL21pL2FwcABwdw==") else {
        panic!()
    };
    assert_eq!(c.username, "ns/mi/app");
    m.login_failed(String::new());
    assert_eq!(reply(m.line(b"AUTH LOGIN")), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(reply(m.line(b"bnMvbWkvYXBw")), "334 UGFzc3dvcmQ6\r\n");
    let Step::Login(c) = m.line(b"cHc=") else {
        panic!()
    };
    assert_eq!(
        (c.username.as_str(), c.password.expose()),
        ("ns/mi/app", "pw")
    );
    m.login_failed(String::new());
    assert_eq!(
        reply(m.line(b"AUTH LOGIN bnMvbWkvYXBw")),
        "334 UGFzc3dvcmQ6\r\n"
    );
    assert!(reply(m.line(b"*")).starts_with("501 5.0.0"));
    assert!(reply(m.line(b"AUTH CRAM-MD5")).starts_with("504 "));
}

#[test]
fn commands_before_login_are_bounded() {
    let mut m = machine(true);
    for _ in 0..10 {
        assert!(matches!(m.line(b"NOOP"), Step::Reply(_)));
    }
    assert!(reply(m.line(b"NOOP")).starts_with("421 4.7.0"));
    // Lines too long to read count too.
    let mut m = machine(true);
    for _ in 0..10 {
        assert!(reply(m.line_too_long()).starts_with("500 5.5.6"));
    }
    assert!(reply(m.line_too_long()).starts_with("421 4.7.0"));
    // After a login there is no such bound.
    let mut m = machine(true);
    logged_in(&mut m);
    for _ in 0..100 {
        assert!(matches!(m.line(b"NOOP"), Step::Reply(_)));
    }
}

#[test]
fn mail_from_is_checked_before_it_goes_upstream() {
    let mut m = machine(true);
    m.line(b"EHLO c");
    logged_in(&mut m);
    let ehlo = reply(m.line(b"EHLO c"));
    assert!(
        ehlo.contains("SIZE 1000\r\n") && ehlo.contains("8BITMIME"),
        "{ehlo}"
    );
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let r = reply(m.line(b"MAIL FROM:<ceo@example.com>"));
    assert!(
        r.starts_with("550 5.7.1 Sender <ceo@example.com> is not allowed"),
        "{r}"
    );
    assert!(reply(m.line(b"MAIL FROM:<box@example.com> SIZE=1001")).starts_with("552 5.3.4"));
    assert!(reply(m.line(b"RCPT TO:<x@y.example>")).starts_with("503 "));
    assert!(reply(m.line(b"DATA")).starts_with("503 "));
    let Step::Mail {
        from,
        size,
        eight_bit,
    } = m.line(b"MAIL FROM:<Alerts@example.com> SIZE=1000 BODY=8BITMIME")
    else {
        panic!()
    };
    assert_eq!(
        (from.as_str(), size, eight_bit),
        ("Alerts@example.com", Some(1000), true)
    );
    m.mail_answered(from, true);
    assert!(reply(m.line(b"DATA")).starts_with("554 5.5.1 No valid"));
    assert!(matches!(
        m.line(b"RCPT TO:<x@y.example>"),
        Step::Rcpt { .. }
    ));
    m.rcpt_answered(true);
    assert!(matches!(m.line(b"DATA"), Step::Data));
    m.data_done();
    assert!(reply(m.line(b"RCPT TO:<x@y.example>")).starts_with("503 "));
    assert!(reply(m.line(b"BDAT 10 LAST")).starts_with("502 5.5.1 BDAT"));
    let long = format!("NOOP {}", "x".repeat(600));
    assert!(reply(m.line(long.as_bytes())).starts_with("500 5.5.6"));
}
