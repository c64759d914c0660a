//! Templates are rendered in a child process: the operator's own binary, started with the hidden
//! first argument [`SUBCOMMAND`], which lowers its own limits before it reads the template.
//!
//! Why a process: MiniJinja's fuel counts instructions, and one instruction can allocate without
//! bound (`''|indent(10**12)` aborts the process on allocation failure, which no `catch_unwind`
//! stops; `'x' * 10**8` costs 200 MB; `a ~ a` doubles per instruction). Bounding every filter and
//! operator by hand (or refusing them statically) would fail open at the next filter MiniJinja
//! adds; an address-space limit bounds whatever the template calls, and a child that dies at it
//! takes nothing else with it. The cost is a process start per render (measured: see
//! docs/security.md), and renders happen only when a refresh publishes a token or when the
//! template or its inputs changed (see [`super::digest`]).
//!
//! The child: address space [`MEMORY_LIMIT`] (`RLIMIT_AS`), CPU time [`CPU_SECONDS`], no core
//! dump, an empty environment, stdin/stdout pipes only (stderr discarded: a message could quote a
//! value). The parent: at most [`CONCURRENT`] children at once, of which one namespace's
//! integrations hold at most [`PER_NAMESPACE`] (`--max-namespace-share` of them: see
//! [`Renderer::with_namespace_share`]; a namespace whose templates run into the deadline
//! does not make the others' renders wait: see [`crate::reconcile::share::NamespaceQueue`]), each
//! killed after [`DEADLINE`], its output read up to [`MAX_OUTPUT`].
//!
//! Protocol: the parent writes one JSON [`Request`]; the child answers JSON lines: a
//! [`Line::Key`] before each key it renders (so that a child killed at a limit is reported with
//! the key it was rendering), then one [`Line::Done`] or [`Line::Failed`].

use super::{Rendered, TokenFields, render_in_process};
use crate::reconcile::share::NamespaceQueue;
use crate::{api::TokenSecretTemplate, secret::SecretValue};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    os::unix::process::ExitStatusExt as _,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The hidden first argument that makes the binary a renderer child.
pub const SUBCOMMAND: &str = "__render-template";
/// What a template may allocate: the child's address space is limited to what it has mapped when
/// it starts (binary, allocator, stack; read from `/proc/self/status`) plus this. Measured: the
/// largest template the CRD and the output limits allow (about 450 KiB rendered) takes 1.2 MiB;
/// kept small because each running child counts towards the pod's memory limit.
pub const MEMORY_LIMIT: u64 = 16 * 1024 * 1024;
/// The child's CPU time, a backstop for [`DEADLINE`] (SIGXCPU).
pub const CPU_SECONDS: u64 = 2;
/// A render that takes longer is killed (wall clock, from the child's start).
pub const DEADLINE: Duration = Duration::from_secs(3);
/// Children at once: a render takes a few milliseconds, and each child counts towards the pod's
/// memory (its start, about 20 MiB, plus at most [`MEMORY_LIMIT`]).
pub const CONCURRENT: usize = 2;
/// Children one namespace's integrations may run at once by default (the default
/// `--max-namespace-share`, half, of [`CONCURRENT`]).
pub const PER_NAMESPACE: usize = 1;
/// The most the child reads: the CRD allows 32 templates of 16 KiB, plus the fields.
const MAX_INPUT: u64 = 2 * 1024 * 1024;
/// The most the parent reads: the rendered keys (at most 512 KiB) JSON-escaped, and the key lines.
const MAX_OUTPUT: usize = 4 * 1024 * 1024;

/// What the parent asks.
#[derive(Serialize, Deserialize)]
struct Request {
    data: BTreeMap<String, String>,
    /// `None`: check with placeholders only.
    fields: Option<TokenFields>,
}

/// What the child answers, one JSON line each.
#[derive(Serialize, Deserialize)]
enum Line {
    Key(String),
    Done(BTreeMap<String, String>),
    Failed(String),
}

/// Starts renderer children. One per operator process ([`Renderer::of_this_binary`]); tests name
/// the operator's binary.
#[derive(Debug)]
pub struct Renderer {
    exe: PathBuf,
    permits: Arc<NamespaceQueue>,
}

impl Renderer {
    /// Children of the binary at `exe` (which must handle [`SUBCOMMAND`] with [`child_main`]).
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        Renderer {
            exe: exe.into(),
            permits: NamespaceQueue::new(CONCURRENT, PER_NAMESPACE),
        }
    }

    /// Children of the running binary (`/proc/self/exe`, which stays valid when the file is
    /// replaced on disk).
    pub fn of_this_binary() -> Self {
        Self::new("/proc/self/exe")
    }

    /// Let one namespace's integrations run at most `percent` % of the [`CONCURRENT`] children
    /// (`--max-namespace-share`; at least one).
    pub fn with_namespace_share(mut self, percent: u8) -> Self {
        self.permits = NamespaceQueue::new(
            CONCURRENT,
            crate::reconcile::share::share_of(CONCURRENT, percent),
        );
        self
    }

    /// How many children one namespace's integrations may run at once.
    pub fn per_namespace(&self) -> usize {
        self.permits.per_namespace()
    }

    /// Whether `t` (of an integration in `namespace`) renders with placeholder values: `Err` says
    /// which key and why (a detailed message is safe: no real value is involved).
    pub async fn check(&self, namespace: &str, t: &TokenSecretTemplate) -> Result<(), String> {
        self.run(namespace, &t.data, None).await.map(|_| ())
    }

    /// The rendered keys of the token Secret: `t` is checked with placeholders first (for a
    /// detailed message), then rendered with `fields` (a failure said by kind and line only).
    pub async fn render(
        &self,
        namespace: &str,
        t: &TokenSecretTemplate,
        fields: &TokenFields,
    ) -> Result<Rendered, String> {
        self.run(namespace, &t.data, Some(fields)).await
    }

    async fn run(
        &self,
        namespace: &str,
        data: &BTreeMap<String, String>,
        fields: Option<&TokenFields>,
    ) -> Result<Rendered, String> {
        if data.is_empty() {
            return Ok(Rendered::new());
        }
        tracing::debug!(
            keys = data.len(),
            "rendering spec.tokenSecret.template in a child process"
        );
        let _permit =
            self.permits.acquire(namespace).await.ok_or_else(|| {
                "spec.tokenSecret.template: the renderer is shutting down".to_owned()
            })?;
        let input = serde_json::to_vec(&Request {
            data: data.clone(),
            fields: fields.cloned(),
        })
        .map_err(|e| format!("spec.tokenSecret.template: {e}"))?;
        let mut child = tokio::process::Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spec.tokenSecret.template: could not start the renderer: {e}"))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("spec.tokenSecret.template: the renderer has no pipes".into());
        };
        let exchange = async {
            let write = async {
                // A child that stops reading (it died, or the input is too large) closes the pipe.
                let _ = stdin.write_all(&input).await;
                drop(stdin);
            };
            let read = async {
                let mut out = Vec::new();
                let limit = u64::try_from(MAX_OUTPUT)
                    .unwrap_or(u64::MAX)
                    .saturating_add(1);
                let _ = stdout.take(limit).read_to_end(&mut out).await;
                out
            };
            let ((), out) = tokio::join!(write, read);
            (out, child.wait().await)
        };
        let answer = tokio::time::timeout(DEADLINE, exchange).await;
        let Ok((out, status)) = answer else {
            let _ = child.kill().await;
            return Err(interpret(&[], None, true));
        };
        if out.len() > MAX_OUTPUT {
            return Err(format!(
                "spec.tokenSecret.template: the renderer's answer is larger than {} MiB",
                MAX_OUTPUT / (1024 * 1024)
            ));
        }
        let status = status.ok();
        match last_line(&out) {
            Some(Line::Done(rendered)) if status.is_some_and(|s| s.success()) => Ok(rendered
                .into_iter()
                .map(|(k, v)| (k, SecretValue::new(v)))
                .collect()),
            Some(Line::Failed(message)) => Err(message),
            _ => Err(interpret(&out, status, false)),
        }
    }
}

fn lines(out: &[u8]) -> impl Iterator<Item = Line> + '_ {
    out.split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Line>(l).ok())
}

fn last_line(out: &[u8]) -> Option<Line> {
    lines(out).last()
}

/// Why a child gave no answer, naming the key it was rendering and the limit it met.
fn interpret(out: &[u8], status: Option<ExitStatus>, timed_out: bool) -> String {
    let key = lines(out)
        .filter_map(|l| match l {
            Line::Key(k) => Some(k),
            _ => None,
        })
        .last();
    let at = key
        .map(|k| format!("spec.tokenSecret.template.data[{k:?}]"))
        .unwrap_or_else(|| "spec.tokenSecret.template".into());
    let signal = status.and_then(|s| s.signal());
    let mib = MEMORY_LIMIT / (1024 * 1024);
    // SIGABRT: the allocator's failure at the address-space limit; SIGXCPU/SIGKILL: CPU time.
    match signal {
        _ if timed_out => format!(
            "{at}: rendering takes longer than {} s, the most a template may take",
            DEADLINE.as_secs()
        ),
        Some(6) => {
            format!("{at}: rendering needs more than the {mib} MiB of memory a template may use")
        }
        Some(9) | Some(24) => format!(
            "{at}: rendering takes more than {CPU_SECONDS} s of CPU, the most a template may take"
        ),
        Some(n) => format!(
            "{at}: the renderer stopped (signal {n}) within its limits of {mib} MiB and {CPU_SECONDS} s"
        ),
        None => format!(
            "{at}: the renderer failed ({}) within its limits of {mib} MiB and {CPU_SECONDS} s",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "no exit status".into())
        ),
    }
}

/// The child: lower the limits, read the request, render, answer. Returns the exit code. Called by
/// `main` before anything else when the first argument is [`SUBCOMMAND`].
pub fn child_main() -> i32 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut say = |line: &Line| {
        if let Ok(mut s) = serde_json::to_vec(line) {
            s.push(b'\n');
            let _ = out.write_all(&s);
            let _ = out.flush();
        }
    };
    if let Err(e) = lower_limits() {
        say(&Line::Failed(format!(
            "spec.tokenSecret.template: the renderer could not limit its memory ({e}); nothing was rendered"
        )));
        return 1;
    }
    let mut input = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(MAX_INPUT)
        .read_to_end(&mut input);
    let request = read
        .ok()
        .and_then(|_| serde_json::from_slice::<Request>(&input).ok());
    let Some(request) = request else {
        say(&Line::Failed(
            "spec.tokenSecret.template: the renderer got no readable request".into(),
        ));
        return 1;
    };
    drop(input);
    let mut progress = |k: &str| say_key(k);
    let checked = render_in_process(
        &request.data,
        &TokenFields::placeholders(),
        true,
        &mut progress,
    );
    let result = match (checked, &request.fields) {
        (Err(e), _) => Err(e),
        (Ok(_), None) => Ok(Rendered::new()),
        (Ok(_), Some(fields)) => render_in_process(&request.data, fields, false, &mut progress),
    };
    match result {
        Ok(rendered) => {
            say(&Line::Done(
                rendered
                    .into_iter()
                    .map(|(k, v)| (k, v.expose().to_owned()))
                    .collect(),
            ));
            0
        }
        Err(message) => {
            say(&Line::Failed(message));
            0
        }
    }
}

fn say_key(key: &str) {
    if let Ok(mut s) = serde_json::to_vec(&Line::Key(key.to_owned())) {
        s.push(b'\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&s);
        let _ = out.flush();
    }
}

fn lower_limits() -> std::io::Result<()> {
    use rlimit::Resource;
    Resource::CORE.set(0, 0)?;
    Resource::CPU.set(CPU_SECONDS, CPU_SECONDS.saturating_add(1))?;
    let mapped =
        mapped_bytes().ok_or_else(|| std::io::Error::other("no VmSize in /proc/self/status"))?;
    let limit = mapped.saturating_add(MEMORY_LIMIT);
    Resource::AS.set(limit, limit)?;
    Ok(())
}

/// The address space this process has mapped (`VmSize`), in bytes.
fn mapped_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&status, "VmSize:").map(|kib| kib.saturating_mul(1024))
}

/// A `kB` figure of `/proc/<pid>/status`.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(signal: Option<i32>, code: i32) -> ExitStatus {
        match signal {
            Some(s) => ExitStatus::from_raw(s),
            None => ExitStatus::from_raw(code << 8),
        }
    }

    #[test]
    fn a_child_without_an_answer_is_reported_with_its_key_and_limit() {
        let out = b"{\"Key\":\"a\"}\n{\"Key\":\"b\"}\n";
        let e = interpret(out, Some(status(Some(6), 0)), false);
        assert_eq!(
            e,
            "spec.tokenSecret.template.data[\"b\"]: rendering needs more than the 16 MiB of memory a template may use"
        );
        let e = interpret(out, Some(status(Some(24), 0)), false);
        assert!(e.contains("2 s of CPU"), "{e}");
        let e = interpret(b"", None, true);
        assert!(
            e.starts_with("spec.tokenSecret.template: rendering takes longer than 3 s"),
            "{e}"
        );
        let e = interpret(b"garbage\n", Some(status(None, 101)), false);
        assert!(
            e.starts_with("spec.tokenSecret.template: the renderer failed"),
            "{e}"
        );
    }

    /// A namespace whose templates run until the deadline holds one child at a time: another
    /// namespace's render does not wait for them (on main both children were the slow namespace's,
    /// and the other's render waited the deadline out).
    #[tokio::test]
    async fn a_namespace_of_slow_templates_leaves_a_child_for_the_others() {
        let dir = std::env::temp_dir().join(format!("mio-renderer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("renderer.sh");
        // A stand-in renderer: a request naming "slow" never answers; any other is rendered empty.
        std::fs::write(
            &exe,
            "#!/bin/sh\nif grep -q slow; then exec sleep 30; fi\necho '{\"Done\":{}}'\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let renderer = Arc::new(Renderer::new(&exe));
        let template = |v: &str| TokenSecretTemplate {
            data: [("k".to_owned(), v.to_owned())].into(),
            ..Default::default()
        };
        let slow: Vec<_> = (0..CONCURRENT)
            .map(|_| {
                let renderer = renderer.clone();
                let t = template("slow");
                tokio::spawn(async move { renderer.check("hog", &t).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let other = renderer.check("other", &template("fast")).await;
        let took = started.elapsed();
        assert_eq!(other, Ok(()));
        assert!(
            took < DEADLINE.saturating_sub(Duration::from_secs(1)),
            "another namespace's render waited {took:?} behind the slow namespace's"
        );
        for s in slow {
            let e = s.await.unwrap().unwrap_err();
            assert!(e.contains("longer than"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_namespace_share_follows_the_flag() {
        let r = Renderer::new("/bin/false");
        assert_eq!(r.per_namespace(), PER_NAMESPACE);
        assert_eq!(
            Renderer::new("/bin/false")
                .with_namespace_share(crate::reconcile::share::DEFAULT_MAX_NAMESPACE_SHARE)
                .per_namespace(),
            PER_NAMESPACE
        );
        assert_eq!(
            Renderer::new("/bin/false")
                .with_namespace_share(100)
                .per_namespace(),
            CONCURRENT
        );
        assert_eq!(
            Renderer::new("/bin/false")
                .with_namespace_share(1)
                .per_namespace(),
            1
        );
    }

    #[test]
    fn status_figures_are_read_in_kib() {
        let status = "Name:\tx\nVmPeak:\t   12345 kB\nVmHWM:\t  678 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(678));
        assert_eq!(status_kib(status, "VmSize:"), None);
    }
}
