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
    // "wait" ends on SIGINT through a handler, not the default action: a process started in the
    // background by a shell without job control (some CI runners) inherits SIGINT ignored, and would
    // sleep on. The handler is in place before the PID is printed (the test interrupts right after
    // reading it); exiting from it runs no destructors, as the default action would not.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let interrupt = (how == "wait").then(|| {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .expect("a SIGINT handler")
    });
    println!("{pid}");
    // Like a static that is never dropped: the supervision must not depend on Drop.
    std::mem::forget(child);
    match how.as_str() {
        "abort" => std::process::abort(),
        "wait" => {
            runtime.block_on(async {
                if let Some(mut interrupt) = interrupt {
                    let _ =
                        tokio::time::timeout(std::time::Duration::from_secs(600), interrupt.recv())
                            .await;
                }
            });
            std::process::exit(130)
        }
        _ => std::process::exit(0),
    }
}
