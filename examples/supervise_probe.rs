//! Used by tests/process_cleanup.rs: starts a supervised `sleep`, prints its PID, then ends the way
//! the first argument says (exit, abort, or wait for a signal) without running destructors.

#[path = "../tests/support/process.rs"]
#[allow(dead_code)]
mod process;

fn main() {
    let how = std::env::args().nth(1).unwrap_or_else(|| "exit".into());
    let dir = std::env::temp_dir();
    let child = process::Supervised::spawn(
        "sleep",
        std::path::Path::new("sleep"),
        &["600".into()],
        &[],
        dir.join(format!("supervise-probe-{}.log", std::process::id())),
    );
    let pid = loop {
        if let Some(pid) = child.child_pid() {
            break pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    println!("{pid}");
    // Like a static that is never dropped: the supervision must not depend on Drop.
    std::mem::forget(child);
    match how.as_str() {
        "abort" => std::process::abort(),
        "wait" => std::thread::sleep(std::time::Duration::from_secs(600)),
        _ => std::process::exit(0),
    }
}
