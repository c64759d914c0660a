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
# The child ended by itself: the watchdog ends with its exit status (128 + N for signal N).
kill -0 "$child" 2>/dev/null || { wait "$child"; exit $?; }
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

    /// The exit status of a child that ended by itself (128 + N when signal N killed it); `None`
    /// while it runs. (A child stopped through [`Self::stop`] reports 0.)
    pub fn exit_code(&mut self) -> Option<i32> {
        self.watchdog
            .try_wait()
            .ok()
            .flatten()
            .and_then(|s| s.code())
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
/// a connection there is refused — unlike a port probed with `bind(0)`, which a parallel test may take.
pub const CLOSED_PORT: u16 = 1;

/// A TCP port of 127.0.0.1 reserved for one server that must be told its port before it starts
/// (the operator's sign-in address, which its public URL names; etcd and kube-apiserver; Dovecot;
/// chromedriver; Prometheus). Wherever the code allows it, bind `127.0.0.1:0` and pass the
/// listener instead.
///
/// A port probed with `bind(0)` and released comes from the kernel's ephemeral range, where any
/// other `bind(0)` or outgoing connection of a parallel test may take it before the server binds
/// it. Reserved ports are therefore taken below that range (which the kernel never hands out on
/// its own), and each is held by an exclusive lock on a file under the temporary directory for the
/// life of this test process, so that parallel tests and other test processes (a second checkout,
/// the sandbox) never pick the same one. A port something else already listens on is skipped.
pub fn reserve_port() -> u16 {
    reserve_ports(1)[0]
}

/// `n` distinct reserved ports (see [`reserve_port`]), e.g. Dovecot's several listeners.
pub fn reserve_ports(n: usize) -> Vec<u16> {
    use std::sync::{Mutex, OnceLock};
    // The lock files of this process's ports: kept open (and so locked) until it exits.
    static HELD: OnceLock<Mutex<Vec<std::fs::File>>> = OnceLock::new();
    static NEXT: OnceLock<Mutex<u16>> = OnceLock::new();
    let (low, high) = reservable_range();
    let dir = std::env::temp_dir().join("mio-test-ports");
    std::fs::create_dir_all(&dir).expect("create the port lock directory");
    let span = high - low;
    // Start where this process's ID points, so that test processes rarely meet on a lock.
    let next = NEXT.get_or_init(|| Mutex::new(low + (std::process::id() % u32::from(span)) as u16));
    let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = HELD
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let mut ports = Vec::with_capacity(n);
    let mut tried = 0u32;
    while ports.len() < n {
        assert!(
            tried < u32::from(span),
            "no free port left between {low} and {high} (lock files in {})",
            dir.display()
        );
        tried += 1;
        let port = *next;
        *next = if port + 1 >= high { low } else { port + 1 };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .expect("open a port lock file");
        if file.try_lock().is_err() {
            continue; // another test process holds it
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue; // something outside the tests listens there
        }
        held.push(file);
        ports.push(port);
    }
    ports
}

/// Ports below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999 by
/// default) and above the well-known ones.
fn reservable_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    assert!(
        ephemeral_low > 12000,
        "the ephemeral port range starts at {ephemeral_low}: tests need ports 10000-12000 outside it"
    );
    (10000, ephemeral_low)
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
