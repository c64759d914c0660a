//! Child processes (etcd, kube-apiserver, the OAuth server, Dovecot, the operator) that never outlive
//! the test binary.
//!
//! Rust runs no destructors for statics at exit, and Linux's parent-death signal fires when the
//! *thread* that spawned the child ends, not the process — so neither `Drop` nor `PR_SET_PDEATHSIG`
//! is enough for servers shared by all tests of one binary. Each child is therefore started under a
//! small watchdog shell, in a process group of its own (so a Ctrl-C aimed at the test run does not
//! race it), that polls the test process's PID and kills the child's whole group once the test
//! process is gone — whether it returned, panicked, or was interrupted. `Drop` also stops it early.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A supervised child process. Dropping it stops the process (TERM, then KILL).
pub struct Supervised {
    pub name: String,
    watchdog: Child,
    /// Combined stdout and stderr of the child.
    pub log_path: PathBuf,
}

const WATCHDOG: &str = r#"
parent="$1"; shift
"$@" &
child=$!
stop() { kill -TERM "$child" 2>/dev/null; for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$child" 2>/dev/null || exit 0; sleep 0.3; done; kill -KILL "$child" 2>/dev/null; exit 0; }
trap stop TERM INT HUP
while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
stop
"#;

impl Supervised {
    /// Start `program args…` with its output appended to `log_path`.
    pub fn spawn(
        name: &str,
        program: &std::path::Path,
        args: &[String],
        envs: &[(&str, String)],
        log_path: PathBuf,
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", log_path.display()));
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("watchdog")
            .arg(std::process::id().to_string())
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let watchdog = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        Self {
            name: name.to_owned(),
            watchdog,
            log_path,
        }
    }

    /// The PID of the supervised program (the watchdog's child), if it runs.
    pub fn child_pid(&self) -> Option<u32> {
        let pid = self.watchdog.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Whether the child (through its watchdog) still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.watchdog.try_wait(), Ok(None))
    }

    /// The last `n` lines of the child's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stop the child and wait for it (at most about 5 s).
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        let pid = self.watchdog.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = self.watchdog.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port of 127.0.0.1 where nothing listens: privileged (below 1024), and no test binds it, so
/// a connection there is refused — unlike a probed free port, which a parallel test may take.
pub const CLOSED_PORT: u16 = 1;

/// A free TCP port on 127.0.0.1, bound and released: another process may take it before the
/// caller's server binds it. Only for servers that must be told their port before they start
/// (the operator's sign-in address, which its public URL names; etcd and kube-apiserver; Dovecot;
/// chromedriver); bind `127.0.0.1:0` and pass the listener wherever the code allows it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// `n` distinct free ports on 127.0.0.1: all are bound at once before any is released, so two calls
/// in a row cannot hand out the same port (one server's several listeners, e.g. Dovecot's).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// An example program, as `cargo build --examples` leaves it (`target/<profile>/examples/NAME`;
/// tools/test.sh builds them before the tests, since `cargo test` builds examples only as tests).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target dir")
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run cargo build --examples (tools/test.sh does) to build examples/{name}.rs",
        path.display()
    );
    path
}
