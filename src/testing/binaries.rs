//! Finding the programs a process cluster runs: the node program (the `kv` example, or a tool
//! that is its own node program) and the `clusterfunk` admin tool. Does not start them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use super::TestingError;

/// The programs a process cluster runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The node program, run as `PROGRAM serve --id N --listen ADDR --data-dir DIR ..`:
    /// `target/<profile>/examples/kv`, or a tool that has such a `serve` mode.
    pub kv: PathBuf,
    /// `target/<profile>/clusterfunk`; empty with [`Binaries::node_program`].
    pub clusterfunk: PathBuf,
}

impl Binaries {
    /// Runs `program` as the node program, without the admin tool: for a tool that is its own
    /// node program (`bench serve ..`).
    pub fn node_program(program: PathBuf) -> Self {
        Binaries {
            kv: program,
            clusterfunk: PathBuf::new(),
        }
    }

    /// Finds `kv` beside the running program (an example in `target/<profile>/examples`) and,
    /// with `need_clusterfunk`, `clusterfunk` in the profile directory above it; the error says
    /// how to build what is missing.
    pub fn beside_current_exe(need_clusterfunk: bool) -> Result<Self, TestingError> {
        let exe = std::env::current_exe().map_err(TestingError::CurrentExe)?;
        let examples = exe
            .parent()
            .ok_or_else(|| TestingError::NotInTargetDir(exe.clone()))?;
        let profile = match examples.parent() {
            Some(profile) => profile,
            None if need_clusterfunk => return Err(TestingError::NotInTargetDir(exe.clone())),
            None => examples,
        };
        let binaries = Binaries {
            kv: examples.join("kv"),
            clusterfunk: profile.join("clusterfunk"),
        };
        let mut wanted = vec![&binaries.kv];
        if need_clusterfunk {
            wanted.push(&binaries.clusterfunk);
        }
        let missing: Vec<PathBuf> = wanted
            .into_iter()
            .filter(|path| !path.is_file())
            .cloned()
            .collect();
        if missing.is_empty() {
            Ok(binaries)
        } else {
            Err(TestingError::BinariesMissing(missing))
        }
    }

    /// The binaries for an integration test: `clusterfunk` is the test's
    /// `CARGO_BIN_EXE_clusterfunk`, and `kv` is built here with `cargo` (the test's `CARGO`)
    /// for the package at `manifest_dir`, in the profile `clusterfunk` was built in.
    ///
    /// `cargo test` builds the `kv` example as a test harness (it has unit tests), not as the
    /// program the tests start, so the harness builds the program itself (a no-op when it is
    /// up to date; cargo's own lock orders it with any other build). Fails when the build
    /// fails, or when the built `kv` is older than one of the sources it was built from.
    pub fn build_for_tests(
        cargo: &Path,
        manifest_dir: &Path,
        clusterfunk: &Path,
    ) -> Result<Self, TestingError> {
        let profile_dir = clusterfunk
            .parent()
            .ok_or_else(|| TestingError::NotInTargetDir(clusterfunk.to_path_buf()))?;
        let kv = profile_dir.join("examples").join("kv");
        let release = profile_dir
            .file_name()
            .is_some_and(|name| name == "release");
        build_kv_example(cargo, manifest_dir, release, true)?;
        if !kv.is_file() {
            return Err(TestingError::BinariesMissing(vec![kv]));
        }
        if let Some(changed) = stale_source(&kv, &manifest_dir.join("examples/kv.rs")) {
            return Err(TestingError::Stale {
                binary: kv,
                changed,
            });
        }
        Ok(Binaries {
            kv,
            clusterfunk: clusterfunk.to_path_buf(),
        })
    }
}

/// Runs `cargo build --example kv` (with `--release` when `release`, `--quiet` when
/// `quiet`) for the package at `manifest_dir`: a no-op when `kv` is up to date. Cargo's output
/// goes to this program's stderr.
pub fn build_kv_example(
    cargo: &Path,
    manifest_dir: &Path,
    release: bool,
    quiet: bool,
) -> Result<(), TestingError> {
    let mut build = Command::new(cargo);
    build
        .args(["build", "--example", "kv", "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .stdin(Stdio::null());
    // Under `cargo test` or `cargo run` this program runs with the variables cargo sets for a
    // crate (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, OUT_DIR, …). Build scripts that watch them
    // (ring's does, with `rerun-if-env-changed`) would see them set here and unset in the
    // outer build, and every build would redo theirs and all that depends on it.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_crates) {
            build.env_remove(&name);
        }
    }
    if release {
        build.arg("--release");
    }
    if quiet {
        build.arg("--quiet");
    }
    let status = build.status().map_err(TestingError::CargoSpawn)?;
    if status.success() {
        Ok(())
    } else {
        Err(TestingError::BuildFailed(status))
    }
}

/// Whether cargo sets the variable `name` for the crate it runs (see "Environment variables
/// Cargo sets for crates" in the Cargo book), as opposed to configuring cargo itself.
fn set_by_cargo_for_crates(name: &str) -> bool {
    const SET_FOR_CRATES: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    SET_FOR_CRATES.contains(&name)
        || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
}

/// A source of the binary `kv` (from cargo's dep-info file beside it) that changed after the
/// binary was built, so it would run old code. A change counts only if the running program was
/// built after it (a file saved while the tests run is not this build's business), except for
/// `kv_source` itself, which the running test does not depend on.
fn stale_source(kv: &Path, kv_source: &Path) -> Option<PathBuf> {
    let modified = |path: &Path| -> Option<SystemTime> { fs::metadata(path).ok()?.modified().ok() };
    let built = modified(kv)?;
    let this_build = modified(&std::env::current_exe().ok()?)?;
    let dep_info = fs::read_to_string(kv.with_extension("d")).ok()?;
    let (_, sources) = dep_info.lines().next()?.split_once(": ")?;
    // Dep-info separates paths with spaces and escapes spaces inside paths with a backslash.
    let sources = sources.replace("\\ ", "\u{0}");
    sources
        .split_whitespace()
        .map(|source| PathBuf::from(source.replace('\u{0}', " ")))
        .find(|source| {
            modified(source).is_some_and(|changed| {
                changed > built && (changed <= this_build || source == kv_source)
            })
        })
}
