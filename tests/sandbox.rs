//! The README's first command: the sandbox brings everything up, signs in by itself and the example
//! integration goes Ready with MailboxConnected.

mod support;

use std::process::Command;

#[test]
fn the_sandbox_signs_in_and_goes_ready() {
    let sandbox = support::process::example_binary("sandbox");
    let operator = support::operator::operator_binary();
    assert!(
        operator.is_file(),
        "the operator binary is missing: {}",
        operator.display()
    );
    // A deadline (coreutils' timeout: TERM after 300 s, KILL 10 s later), so that a sandbox that
    // never gets Ready fails this test instead of holding the run.
    let out = Command::new("timeout")
        .args(["--kill-after=10", "300"])
        .arg(&sandbox)
        .args(["--auto-sign-in", "--exit-when-ready"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(
        out.status.code(),
        Some(124),
        "the sandbox was not Ready within 300 s:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the sandbox failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sign in at\n  http://127.0.0.1:"),
        "it prints the sign-in URL:\n{stdout}"
    );
    let table = stdout
        .lines()
        .skip_while(|l| !l.starts_with("NAME"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        table.contains("support-inbox")
            && table.contains("True")
            && table.contains("alice@example.test")
            && table.contains("Connected"),
        "{table}"
    );
}
