//! Every process a test starts dies with the test binary: when it exits without running destructors,
//! when it aborts (a panic with panic=abort, a crash), and when it is interrupted (Ctrl-C).

mod support;

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn probe() -> PathBuf {
    support::process::example_binary("supervise_probe")
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by init) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"))
}

fn run(how: &str, interrupt: bool) {
    let mut child = Command::new(probe())
        .arg(how)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The probe's first line is its child's PID; read on a thread of its own, so that a probe that
    // never prints fails the test after 30 s instead of holding the run.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the probe ({how}) printed no PID within 30 s")
        });
    let pid: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("probe printed {line:?}"));
    assert!(
        alive(pid),
        "the supervised process runs while its parent does"
    );
    if interrupt {
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the probe ({how}) did not end within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "{how}: the supervised process {pid} outlived its parent by 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn supervised_processes_die_when_the_parent_exits_without_destructors() {
    run("exit", false);
}

#[test]
fn supervised_processes_die_when_the_parent_aborts() {
    run("abort", false);
}

#[test]
fn supervised_processes_die_when_the_parent_is_interrupted() {
    run("wait", true);
}
