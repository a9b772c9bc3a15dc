//! The errors of the process harness: [`TestingError`] for its operations and [`WaitError`]
//! for a wait that ran out. Does not own the tests' failure messages.

use std::fmt::Display;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::admin::AdminError;
use crate::NodeId;

/// What went wrong in the process harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestingError {
    /// No free ports were found in the range. Stop other clusters, or wait until the ports
    /// of ended ones leave TIME_WAIT.
    #[error("no {count} free loopback ports in {range:?}: stop other clusters or free some ports")]
    NoFreePorts {
        /// How many ports were asked for.
        count: usize,
        /// The range searched.
        range: Range<u16>,
    },
    /// The running program's path is unknown, so the binaries beside it cannot be found.
    #[error("cannot find the running program: {0}")]
    CurrentExe(#[source] io::Error),
    /// The running program is not inside cargo's `target/<profile>/examples`.
    #[error("{0} is not inside target/<profile>/examples: run it with `cargo run --example`")]
    NotInTargetDir(PathBuf),
    /// Binaries the caller needs are not built.
    #[error("missing {}: run `cargo build --release --examples --bins` first", display_paths(.0))]
    BinariesMissing(Vec<PathBuf>),
    /// Cargo could not be started to build the `kv` example.
    #[error("cannot run cargo to build the kv example: {0}")]
    CargoSpawn(#[source] io::Error),
    /// `cargo build --example kv` failed.
    #[error("`cargo build --example kv` failed ({0}): fix the build, then run again")]
    BuildFailed(ExitStatus),
    /// A binary is older than one of its sources, so it would run old code.
    #[error("{binary} is older than its source {changed}: run `cargo build --examples`")]
    Stale {
        /// The binary.
        binary: PathBuf,
        /// The source that changed after it was built.
        changed: PathBuf,
    },
    /// A file or directory operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What the harness tried (`open`, `create`, …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why it did not start.
        #[source]
        source: io::Error,
    },
    /// Polling or reaping a child process failed.
    #[error("cannot {action} the process of node {id}: {source}")]
    Process {
        /// The node.
        id: NodeId,
        /// What the harness tried (`kill`, `reap`, `poll`).
        action: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A node was started while its process still runs.
    #[error("node {0} is already running: kill or stop it first")]
    AlreadyRunning(NodeId),
    /// A node was signalled or killed while no process of it runs.
    #[error("node {0} is not running")]
    NotRunning(NodeId),
    /// `kill(1)` did not deliver a signal.
    #[error("kill -{signal} {pid} failed: {detail}")]
    Signal {
        /// The signal's name (`TERM`, `STOP`, …).
        signal: &'static str,
        /// The process.
        pid: u32,
        /// How `kill(1)` failed.
        detail: String,
    },
    /// PostgreSQL's server programs are not installed.
    #[error("PostgreSQL is not installed: initdb, pg_ctl and createdb were found neither in PATH nor in /usr/lib/postgresql/*/bin; install Debian's package: apt-get install postgresql")]
    PostgresMissing,
    /// A command-line tool the harness runs (`initdb`, `pg_ctl`, `createdb`, `chown`) failed.
    #[error("`{command}` failed: {detail}")]
    ToolFailed {
        /// The command line.
        command: String,
        /// Its exit code and output (and, for a server that did not start, its log).
        detail: String,
    },
    /// An admin call to a node failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The cluster did not reach the awaited state; the wait's last reason says what was
    /// still missing.
    #[error(transparent)]
    Wait(#[from] WaitError<String>),
    /// A node answered an admin request with the wrong kind of report.
    #[error("the node answered {request} with something else: {answer}")]
    UnexpectedAnswer {
        /// The request (`Status`, `Shards`).
        request: &'static str,
        /// The answer, as debug text.
        answer: String,
    },
}

/// A wait that ended without the awaited state: its deadline passed or the program was
/// interrupted (see [`watch_interrupt`](super::watch_interrupt)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError<E: Display> {
    /// The deadline passed; `last` is the last attempt's failure, if any attempt failed.
    #[error("timed out after {limit:?} waiting for {what}{}", last_reason(.last))]
    TimedOut {
        /// What was awaited.
        what: String,
        /// How long the wait lasted.
        limit: Duration,
        /// Why the last attempt failed.
        last: Option<E>,
    },
    /// Ctrl-C or SIGTERM arrived while waiting.
    #[error("interrupted while waiting for {what}")]
    Interrupted {
        /// What was awaited.
        what: String,
    },
}

fn last_reason<E: Display>(last: &Option<E>) -> String {
    last.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}
