//! What `docker build .` hands to the Dockerfile's build stage: the `COPY` sources of the stage that
//! runs `cargo build`, filtered by `.dockerignore` (Docker's rules: patterns relative to the context
//! root, `*` and `?` within one path element, `**` across elements, a pattern also excludes what is
//! under a matching directory, `!` re-includes, the last matching pattern wins), placed where the
//! `COPY` instructions put them. Only the Dockerfile forms the repository uses are read; anything
//! else (a variable in a path, a heredoc, a character class) panics instead of being guessed.

use std::path::{Path, PathBuf};

/// One instruction of the build stage, with the working directory at that point.
#[derive(Debug)]
pub enum Step {
    Copy {
        sources: Vec<String>,
        dest: String,
        workdir: String,
    },
    Run {
        command: String,
        workdir: String,
    },
}

/// The instructions of a Dockerfile (continuation lines joined, comments dropped), split by stage.
pub fn stages(dockerfile: &str) -> Vec<Vec<Step>> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        assert!(!t.contains("<<"), "heredocs are not read: {t}");
        match t.strip_suffix('\\') {
            Some(head) => {
                cur.push_str(head);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: Vec<Vec<Step>> = Vec::new();
    let mut workdir = "/".to_owned();
    for line in lines {
        let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let rest = rest.trim();
        match instr.to_ascii_uppercase().as_str() {
            "FROM" => {
                stages.push(Vec::new());
                workdir = "/".to_owned();
            }
            "WORKDIR" => {
                assert!(
                    !rest.contains('$'),
                    "variables are not read: WORKDIR {rest}"
                );
                workdir = join_abs(&workdir, rest);
            }
            "COPY" | "ADD" => {
                let words = if rest.starts_with('[') {
                    serde_json::from_str::<Vec<String>>(rest)
                        .unwrap_or_else(|e| panic!("COPY {rest}: {e}"))
                } else {
                    rest.split_whitespace().map(str::to_owned).collect()
                };
                // From another stage or image: not from the build context.
                if words.iter().any(|w| w.starts_with("--from")) {
                    continue;
                }
                let mut paths: Vec<String> =
                    words.into_iter().filter(|w| !w.starts_with("--")).collect();
                let dest = paths.pop().expect("COPY has a destination");
                assert!(!paths.is_empty(), "COPY without a source: {line}");
                for p in paths.iter().chain([&dest]) {
                    assert!(!p.contains('$'), "variables are not read: {line}");
                    assert!(!p.contains("://"), "remote sources are not read: {line}");
                }
                stages
                    .last_mut()
                    .expect("COPY before FROM")
                    .push(Step::Copy {
                        sources: paths,
                        dest,
                        workdir: workdir.clone(),
                    });
            }
            "RUN" => stages.last_mut().expect("RUN before FROM").push(Step::Run {
                command: rest.to_owned(),
                workdir: workdir.clone(),
            }),
            _ => {}
        }
    }
    stages
}

/// `rel` against the absolute directory `base` (`.` and `..` resolved), as an absolute path.
fn join_abs(base: &str, rel: &str) -> String {
    let mut parts: Vec<&str> = if rel.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|p| !p.is_empty()).collect()
    };
    for p in rel.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `.dockerignore` as Docker reads it.
pub struct DockerIgnore {
    /// (pattern elements, re-include)
    patterns: Vec<(Vec<String>, bool)>,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Self {
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (l, include) = match l.strip_prefix('!') {
                    Some(rest) => (rest.trim(), true),
                    None => (l, false),
                };
                assert!(
                    !l.contains('[') && !l.contains('\\'),
                    ".dockerignore: character classes and escapes are not read: {l}"
                );
                let elems: Vec<String> = l
                    .split('/')
                    .filter(|e| !e.is_empty() && *e != ".")
                    .map(str::to_owned)
                    .collect();
                (elems, include)
            })
            .collect();
        Self { patterns }
    }

    /// Whether the file at `rel` (relative to the context root, `/`-separated) is left out of the
    /// context.
    pub fn excludes(&self, rel: &str) -> bool {
        let elems: Vec<&str> = rel.split('/').filter(|e| !e.is_empty()).collect();
        let mut excluded = false;
        for (pattern, include) in &self.patterns {
            // The path itself or a directory above it.
            let hit = (1..=elems.len()).any(|n| match_elems(pattern, &elems[..n]));
            if hit {
                excluded = !include;
            }
        }
        excluded
    }
}

fn match_elems(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => {
            (0..=path.len()).any(|skip| match_elems(rest, &path[skip..]))
        }
        Some((p, rest)) => match path.split_first() {
            Some((e, path_rest)) => {
                wildcard(p.as_bytes(), e.as_bytes()) && match_elems(rest, path_rest)
            }
            None => false,
        },
    }
}

/// `*` (any run) and `?` (one byte) within one path element.
pub fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| wildcard(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && wildcard(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && wildcard(rest, &s[1..]),
    }
}

/// Every file under `root/rel` (itself when it is a file), as `/`-separated paths relative to `root`.
fn files_under(root: &Path, rel: &str, out: &mut Vec<String>) {
    let path = root.join(rel);
    let meta =
        std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        for e in entries {
            files_under(root, &format!("{rel}/{e}"), out);
        }
    } else {
        out.push(rel.to_owned());
    }
}

/// The context entries a COPY source names (a glob is expanded one path element at a time).
fn expand_source(context: &Path, source: &str) -> Vec<String> {
    let mut found = vec![String::new()];
    for elem in source.split('/').filter(|e| !e.is_empty() && *e != ".") {
        let mut next = Vec::new();
        for base in &found {
            let dir = context.join(base);
            if elem.contains(['*', '?']) {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                let mut names: Vec<String> = entries
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| wildcard(elem.as_bytes(), n.as_bytes()))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| join_rel(base, &n)));
            } else if dir.join(elem).exists() {
                next.push(join_rel(base, elem));
            }
        }
        found = next;
    }
    found
}

fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}/{name}")
    }
}

/// The build stage's files, copied from `context` into `root` (standing for the image's `/`) as
/// its COPY instructions place them, `.dockerignore` applied. Returns the working directory (in
/// `root`) of the stage's `RUN` that contains `run_contains`, and the context files copied.
pub fn materialize(context: &Path, root: &Path, run_contains: &str) -> (PathBuf, Vec<String>) {
    let dockerfile = std::fs::read_to_string(context.join("Dockerfile")).unwrap();
    let ignore = DockerIgnore::parse(
        &std::fs::read_to_string(context.join(".dockerignore")).unwrap_or_default(),
    );
    let stage = stages(&dockerfile)
        .into_iter()
        .find(|s| {
            s.iter()
                .any(|st| matches!(st, Step::Run { command, .. } if command.contains(run_contains)))
        })
        .unwrap_or_else(|| panic!("no stage of the Dockerfile runs `{run_contains}`"));
    let mut copied = Vec::new();
    for step in &stage {
        match step {
            Step::Copy {
                sources,
                dest,
                workdir,
            } => {
                let dest_abs = join_abs(workdir, dest);
                let expanded: Vec<String> = sources
                    .iter()
                    .flat_map(|s| {
                        let e = expand_source(context, s);
                        // Docker fails a COPY whose source is missing from the context.
                        assert!(!e.is_empty(), "COPY {s}: not in the build context");
                        e
                    })
                    .collect();
                let into_dir = dest.ends_with('/') || expanded.len() > 1;
                for src in expanded {
                    let mut files = Vec::new();
                    files_under(context, &src, &mut files);
                    let src_is_dir = context.join(&src).is_dir();
                    let mut any = false;
                    for f in files {
                        if ignore.excludes(&f) {
                            continue;
                        }
                        any = true;
                        let target = if src_is_dir {
                            // A directory's contents go into the destination.
                            join_abs(&dest_abs, f.strip_prefix(&format!("{src}/")).unwrap())
                        } else if into_dir {
                            join_abs(&dest_abs, f.rsplit('/').next().unwrap())
                        } else {
                            dest_abs.clone()
                        };
                        let to = root.join(target.trim_start_matches('/'));
                        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                        std::fs::copy(context.join(&f), &to).unwrap();
                        copied.push(f);
                    }
                    assert!(
                        any || src_is_dir,
                        "COPY {src}: left out by .dockerignore, so not in the build context"
                    );
                }
            }
            Step::Run { command, workdir } if command.contains(run_contains) => {
                return (root.join(workdir.trim_start_matches('/')), copied);
            }
            Step::Run { .. } => {}
        }
    }
    unreachable!("the stage holds the RUN")
}

/// The files a Rust source file reads at compile time: `include_str!`/`include_bytes!` of a string
/// literal (or of `concat!(env!("CARGO_MANIFEST_DIR"), "...")`) and `#[path = "..."]` modules,
/// resolved as rustc resolves them (relative to the source file's directory; for the manifest dir,
/// `manifest_dir`).
pub fn compile_time_reads(file: &Path, text: &str, manifest_dir: &Path) -> Vec<PathBuf> {
    let dir = file.parent().unwrap();
    let mut out = Vec::new();
    for mac in ["include_str!", "include_bytes!"] {
        for (i, _) in text.match_indices(mac) {
            let after = text[i + mac.len()..].trim_start();
            let after = after
                .strip_prefix('(')
                .unwrap_or_else(|| panic!("{}: {mac} without (", file.display()))
                .trim_start();
            if let Some(lit) = string_literal(after) {
                out.push(dir.join(lit));
            } else if let Some(rest) = after.strip_prefix("concat!(env!(\"CARGO_MANIFEST_DIR\"),") {
                let lit = string_literal(rest.trim_start())
                    .unwrap_or_else(|| panic!("{}: unreadable {mac}", file.display()));
                out.push(manifest_dir.join(lit.trim_start_matches('/')));
            } else {
                panic!(
                    "{}: {mac} of a form this check does not read: {}",
                    file.display(),
                    &after[..after.len().min(60)]
                );
            }
        }
    }
    for (i, _) in text.match_indices("#[path") {
        let after = text[i + "#[path".len()..].trim_start();
        let after = after
            .strip_prefix('=')
            .unwrap_or_else(|| panic!("{}: unreadable #[path", file.display()))
            .trim_start();
        let lit = string_literal(after)
            .unwrap_or_else(|| panic!("{}: unreadable #[path", file.display()));
        out.push(dir.join(lit));
    }
    out
}

/// The contents of a plain `"..."` literal at the start of `s` (no escapes: a path has none).
fn string_literal(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('"')?;
    let end = rest.find('"')?;
    let lit = &rest[..end];
    (!lit.contains('\\')).then_some(lit)
}

/// Every `.rs` file under `dir`.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn dockerignore_rules() {
    let ig = DockerIgnore::parse("# c\n*\n!Cargo.toml\n!src/\nsrc/**/*.bak\n!**/keep.bak\n");
    assert!(ig.excludes("README.md"));
    assert!(
        ig.excludes("tests/install.rs"),
        "under an excluded directory"
    );
    assert!(!ig.excludes("Cargo.toml"));
    assert!(!ig.excludes("src/main.rs"));
    assert!(!ig.excludes("src/a/b.rs"));
    assert!(ig.excludes("src/a/b.bak"));
    assert!(ig.excludes("src/b.bak"), "** matches no element too");
    assert!(!ig.excludes("src/a/keep.bak"));
    let ig = DockerIgnore::parse("target\n*.md\n");
    assert!(ig.excludes("target/debug/x"));
    assert!(ig.excludes("README.md"));
    assert!(!ig.excludes("docs/x.md"), "* does not cross /");
}

#[test]
fn dockerfile_copy_steps() {
    let st = stages(
        "# syntax=x\nFROM a AS b\nWORKDIR /src\nCOPY --chown=1 A B ./\nCOPY [\"src\", \"./src\"]\nRUN x \\\n  && cargo build\nFROM c\nCOPY --from=b /x /y\n",
    );
    assert_eq!(st.len(), 2);
    assert!(matches!(&st[0][0], Step::Copy { sources, dest, workdir }
        if sources == &["A", "B"] && dest == "./" && workdir == "/src"));
    assert!(
        matches!(&st[0][1], Step::Copy { sources, dest, .. } if sources == &["src"] && dest == "./src")
    );
    assert!(matches!(&st[0][2], Step::Run { command, .. } if command.contains("&& cargo build")));
    assert!(st[1].is_empty(), "COPY --from is not from the context");
}
