//! The README's first command: the sandbox brings everything up, signs in by itself and the example
//! integration goes Ready with MailboxConnected.

use std::{path::PathBuf, process::Command};

#[test]
fn the_sandbox_signs_in_and_goes_ready() {
    // target/debug/deps/sandbox-… → target/debug/examples/sandbox (cargo test builds examples).
    let exe = std::env::current_exe().unwrap();
    let debug: PathBuf = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let sandbox = debug.join("examples/sandbox");
    assert!(
        sandbox.is_file(),
        "{} is missing: cargo test --all-targets builds it from examples/sandbox.rs",
        sandbox.display()
    );
    assert!(
        debug.join("mail-integration-operator").is_file(),
        "the operator binary is missing next to the examples"
    );
    let out = Command::new(&sandbox)
        .args(["--auto-sign-in", "--exit-when-ready"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
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
