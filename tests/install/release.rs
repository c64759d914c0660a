//! The release: the GitHub workflows (.github/workflows) pass actionlint and zizmor, pin every
//! action by commit and grant each job only what it uses; the release's own steps
//! (tools/release.sh: the version check, the notes, the krew manifest with the archives' sha256,
//! the SBOM) do here what the release workflow runs them for. docs/releasing.md describes them.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A tool script of tools/ that never installs or downloads anything (MIO_NO_INSTALL=1: a missing
/// tool fails and names tools/install-test-deps.sh).
fn script(name: &str, args: &[&str]) -> Output {
    Command::new(repo().join("tools").join(name))
        .args(args)
        .env("MIO_NO_INSTALL", "1")
        .output()
        .unwrap_or_else(|e| panic!("run tools/{name}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn workflow(name: &str) -> Value {
    let path = repo().join(".github/workflows").join(name);
    let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&s).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn workflows_pass_actionlint_and_zizmor() {
    let out = script("workflow-lint.sh", &[]);
    assert!(
        out.status.success(),
        "tools/workflow-lint.sh (actionlint, zizmor) fails:\n{}",
        text(&out)
    );
    // The linters do look: a workflow with an unpinned action, a template injection into a shell
    // script and the default token permissions fails both, each naming its finding.
    let dir = tempfile::tempdir().unwrap();
    let wf = dir.path().join(".github/workflows");
    std::fs::create_dir_all(&wf).unwrap();
    std::fs::write(
        wf.join("bad.yml"),
        "name: bad\non:\n  pull_request_target:\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      \
         - uses: actions/checkout@v7\n      - run: echo ${{ github.event.pull_request.title }}\n      \
         - run: echo $UNQUOTED_${{ matrix.nope }}\n",
    )
    .unwrap();
    let out = script("workflow-lint.sh", &[dir.path().to_str().unwrap()]);
    let said = text(&out);
    assert!(!out.status.success(), "a bad workflow passed:\n{said}");
    for finding in [
        "property \"nope\" is not defined", // actionlint
        "SC2086",                           // shellcheck, run by actionlint
        "unpinned-uses",                    // zizmor
        "template-injection",               // zizmor
        "dangerous-triggers",               // zizmor
    ] {
        assert!(said.contains(finding), "no {finding:?} in:\n{said}");
    }
}

/// Every `uses:` of a workflow (steps and reusable workflows), with the job it is in.
fn uses(wf: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (job, def) in wf["jobs"].as_object().expect("jobs") {
        if let Some(u) = def["uses"].as_str() {
            out.push((job.clone(), u.to_owned()));
        }
        for step in def["steps"].as_array().into_iter().flatten() {
            if let Some(u) = step["uses"].as_str() {
                out.push((job.clone(), u.to_owned()));
            }
        }
    }
    out
}

#[test]
fn workflows_pin_actions_by_commit_and_grant_each_job_its_permissions() {
    let raw_release =
        std::fs::read_to_string(repo().join(".github/workflows/release.yml")).unwrap();
    for name in ["ci.yml", "release.yml"] {
        let wf = workflow(name);
        assert_eq!(
            wf["permissions"],
            serde_json::json!({}),
            "{name}: the workflow's default permissions must be none (permissions: {{}}), each job naming its own"
        );
        for (job, def) in wf["jobs"].as_object().unwrap() {
            assert!(
                def["permissions"].is_object(),
                "{name}: job {job} names no permissions"
            );
        }
        for (job, u) in uses(&wf) {
            let (_, reference) = u.split_once('@').unwrap_or((&u, ""));
            assert!(
                reference.len() == 40 && reference.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}: job {job} uses {u}: pin it by the full commit SHA (# vX.Y.Z after it)"
            );
        }
    }
    // Writing permissions only where something is written: the registry (image, chart), the OIDC
    // token (cosign keyless, attestations), the release itself.
    let release = workflow("release.yml");
    let jobs = release["jobs"].as_object().unwrap();
    for (job, def) in jobs {
        let perms = def["permissions"].as_object().unwrap();
        let steps = serde_json::to_string(&def["steps"]).unwrap();
        for (perm, needed_by) in [
            ("packages", vec!["docker/login-action", "helm push"]),
            ("id-token", vec!["cosign sign", "attest-build-provenance"]),
            ("attestations", vec!["attest-build-provenance"]),
            ("contents", vec!["gh release create"]),
        ] {
            if perms.get(perm).and_then(Value::as_str) == Some("write") {
                assert!(
                    needed_by.iter().any(|n| steps.contains(n)),
                    "release.yml: job {job} may write {perm} but none of its steps {needed_by:?} needs it"
                );
            }
        }
    }
    // What a release produces (docs/releasing.md says how each is verified).
    for (what, needle) in [
        ("both image platforms", "linux/arm64"),
        ("both image platforms", "linux/amd64"),
        ("the multi-arch index", "imagetools create"),
        ("BuildKit's SBOM and provenance", "provenance: mode=max"),
        ("the crates' SBOM", "tools/release.sh sbom"),
        (
            "the SBOM attestation",
            "cosign attest --yes --type cyclonedx",
        ),
        ("keyless signatures", "cosign sign --yes"),
        ("the chart as an OCI artifact", "helm push"),
        ("the krew manifest with checksums", "tools/release.sh krew"),
        ("the checksums' signature", "cosign sign-blob"),
        ("provenance of every file", "subject-checksums"),
        ("notes from the CHANGELOG", "tools/release.sh notes"),
        ("the version check", "tools/release.sh check"),
    ] {
        assert!(
            raw_release.contains(needle),
            "release.yml lacks {what} ({needle})"
        );
    }
    assert_eq!(
        raw_release
            .matches("actions/attest-build-provenance@")
            .count(),
        3,
        "provenance for the image, the chart and the release files"
    );
}

#[test]
fn release_check_and_notes_follow_the_repository() {
    let out = script("release.sh", &["check", VERSION]);
    assert!(out.status.success(), "{}", text(&out));
    // Another version: each file that does not say it is named, with the command that fixes it.
    let out = script("release.sh", &["check", "99.0.0"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for file in [
        "Cargo.toml",
        "Chart.yaml",
        "CHANGELOG.md",
        "deploy/deployment.yaml",
        "deploy/krew/mailint.yaml",
    ] {
        assert!(
            said.contains(file),
            "check 99.0.0 does not name {file}:\n{said}"
        );
    }
    let out = script("release.sh", &["check", "v1"]);
    assert!(!out.status.success() && text(&out).contains("is not a version"));

    let out = script("release.sh", &["notes", VERSION]);
    assert!(out.status.success(), "{}", text(&out));
    let notes = String::from_utf8(out.stdout).unwrap();
    let changelog = std::fs::read_to_string(repo().join("CHANGELOG.md")).unwrap();
    let heading = changelog
        .lines()
        .find(|l| l.starts_with(&format!("## [{VERSION}]")))
        .unwrap();
    let section = changelog
        .split_once(heading)
        .unwrap()
        .1
        .split("\n## [")
        .next()
        .unwrap();
    assert_eq!(notes.trim(), section.trim());
    assert!(notes.contains("### Upgrading"), "{notes}");
    assert!(!script("release.sh", &["notes", "99.0.0"]).status.success());
}

#[test]
fn krew_manifest_is_generated_with_the_archives_checksums() {
    // The repository's manifest is the generator's, for the crate version.
    let out = script("release.sh", &["krew", VERSION]);
    assert!(out.status.success(), "{}", text(&out));
    let checked_in = std::fs::read_to_string(repo().join("deploy/krew/mailint.yaml")).unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout) == checked_in,
        "deploy/krew/mailint.yaml is not generated: tools/release.sh krew {VERSION} > deploy/krew/mailint.yaml"
    );
    // With the release's archives: each platform's sha256 is its archive's.
    let dir = tempfile::tempdir().unwrap();
    let targets = [
        "x86_64-unknown-linux-musl",
        "aarch64-unknown-linux-musl",
        "aarch64-apple-darwin",
    ];
    let mut sums = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let body = format!("archive {i} of {target}");
        std::fs::write(
            dir.path()
                .join(format!("kubectl-mailint-v{VERSION}-{target}.tar.gz")),
            &body,
        )
        .unwrap();
        sums.push(hex(&Sha256::digest(body.as_bytes())));
    }
    let out = script(
        "release.sh",
        &["krew", VERSION, dir.path().to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let manifest: Value = serde_saphyr::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(manifest["kind"], "Plugin");
    assert_eq!(manifest["spec"]["version"], format!("v{VERSION}"));
    let platforms = manifest["spec"]["platforms"].as_array().unwrap();
    assert_eq!(platforms.len(), targets.len());
    for ((p, target), sum) in platforms.iter().zip(targets).zip(&sums) {
        let uri = p["uri"].as_str().unwrap();
        assert!(
            uri.ends_with(&format!(
                "/releases/download/v{VERSION}/kubectl-mailint-v{VERSION}-{target}.tar.gz"
            )),
            "{uri}"
        );
        assert_eq!(p["sha256"].as_str(), Some(sum.as_str()), "{target}");
        assert_eq!(p["bin"], "kubectl-mailint");
        // krew's index asks for the license in the archive (the plugin job packs it).
        assert!(p["files"].to_string().contains("LICENSE"), "{p}");
    }
    // A missing archive is an error, not a manifest with a wrong checksum.
    std::fs::remove_file(
        dir.path()
            .join(format!("kubectl-mailint-v{VERSION}-{}.tar.gz", targets[1])),
    )
    .unwrap();
    let out = script(
        "release.sh",
        &["krew", VERSION, dir.path().to_str().unwrap()],
    );
    assert!(
        !out.status.success() && text(&out).contains(targets[1]),
        "{}",
        text(&out)
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The (name, version) of every package of Cargo.lock.
fn lock_packages() -> BTreeSet<(String, String)> {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let mut out = BTreeSet::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_owned)
        };
        out.insert((field("name").unwrap(), field("version").unwrap()));
    }
    out
}

fn components(v: &Value, out: &mut BTreeSet<(String, String)>) {
    for c in v["components"].as_array().into_iter().flatten() {
        if let (Some(n), Some(ver)) = (c["name"].as_str(), c["version"].as_str()) {
            out.insert((n.to_owned(), ver.to_owned()));
        }
        components(c, out);
    }
}

/// The crates of Cargo.lock that the shipped targets (library, binaries, their build scripts) use
/// on any platform: the resolve graph of `cargo metadata` from the package through normal and build
/// dependencies. The rest are only the tests' (dev-dependencies), which no artifact carries.
fn shipped_crates() -> BTreeSet<(String, String)> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", text(&out));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: std::collections::BTreeMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let packages: std::collections::BTreeMap<&str, (String, String)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap(),
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["version"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    let root = meta["resolve"]["root"].as_str().unwrap();
    let mut seen = BTreeSet::from([root]);
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().into_iter().flatten() {
            let shipped = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].as_str() != Some("dev"));
            let pkg = dep["pkg"].as_str().unwrap();
            if shipped && seen.insert(pkg) {
                todo.push(pkg);
            }
        }
    }
    seen.into_iter().map(|id| packages[id].clone()).collect()
}

#[test]
fn sbom_lists_every_crate_of_cargo_lock() {
    let dir = tempfile::tempdir().unwrap();
    let out = script("release.sh", &["sbom", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "tools/release.sh sbom:\n{}",
        text(&out)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let bom: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(bom["bomFormat"], "CycloneDX");
    let subject = &bom["metadata"]["component"];
    assert_eq!(subject["name"], "mail-integration-operator");
    assert_eq!(subject["version"], VERSION);
    // The crates are the BOM's components; the subject's own components are its targets (the
    // binaries the image and the plugin ship).
    let mut listed = BTreeSet::new();
    components(&bom, &mut listed);
    let mut targets = BTreeSet::new();
    components(subject, &mut targets);
    assert!(
        targets.contains(&("kubectl-mailint".to_owned(), VERSION.to_owned())),
        "the SBOM's subject names the plugin binary: {targets:?}"
    );
    listed.insert((
        subject["name"].as_str().unwrap().to_owned(),
        VERSION.to_owned(),
    ));
    let lock = lock_packages();
    let shipped = shipped_crates();
    assert!(
        shipped.is_subset(&lock),
        "cargo metadata names crates Cargo.lock lacks"
    );
    let missing: Vec<_> = shipped.difference(&listed).cloned().collect();
    assert!(
        missing.is_empty(),
        "the SBOM lacks {} crates of Cargo.lock that the shipped binaries use: {missing:?}",
        missing.len()
    );
    let unknown: Vec<_> = listed.difference(&lock).cloned().collect();
    assert!(
        unknown.is_empty(),
        "the SBOM lists crates not in Cargo.lock: {unknown:?}"
    );
    // Only the tests' crates are left out; a dozen at least (proptest, fantoccini, tempfile, ...).
    let test_only: Vec<_> = lock.difference(&listed).map(|(n, _)| n.as_str()).collect();
    assert!(
        test_only.contains(&"proptest") && test_only.contains(&"fantoccini"),
        "{test_only:?}"
    );
}
