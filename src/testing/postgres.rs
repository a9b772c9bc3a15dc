//! [`PostgresServer`]: a throwaway PostgreSQL server for tests, started from the machine's
//! PostgreSQL binaries (Debian's `postgresql` package) in a temporary directory, listening on
//! 127.0.0.1 only, and stopped and deleted when dropped. Does not own what the tests store in it
//! (the `PostgresShardStore` does) nor the installation of PostgreSQL (`.ci/run` does that).
//!
//! The server runs with `fsync=off`: a crash of the server process (`pg_ctl stop -m immediate`,
//! which [`PostgresServer::stop`] uses) loses no committed transaction, since the kernel still
//! has every page written; only a crash of the machine would. [`PostgresServer::start_fsynced`]
//! starts one with `fsync=on` instead, for benchmarks that must pay what a production server
//! pays per commit. It trusts every local login (`initdb --auth=trust`), as the superuser
//! `postgres`.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use super::{reserve_ports, run_bounded, PortReservation, TestingError};

/// How long one `initdb`, `pg_ctl` or `createdb` may run: generous, for a loaded machine.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long `pg_ctl start` waits for the server to accept connections, in seconds.
const START_WAIT_SECONDS: u32 = 90;

/// Ports tried before giving up: another process may bind a port between its reservation here
/// and the server's start.
const START_ATTEMPTS_MAX: usize = 5;

/// The database [`PostgresServer::url`] points at.
const DATABASE: &str = "clusterfunk";

/// The superuser the server is set up with; logins need no password.
const SUPERUSER: &str = "postgres";

/// The OS user that runs the server when this process is root (PostgreSQL refuses to run as
/// root). Debian's `postgresql` package creates it.
const OS_USER: &str = "postgres";

/// A PostgreSQL server of its own for a test, in a temporary directory, on a free port of
/// 127.0.0.1 (from [`reserve_ports`]) with its Unix socket in that directory. Several can run at
/// once, in one process or in several. Dropping it stops the server (`pg_ctl stop -m
/// immediate`) and deletes the directory.
#[derive(Debug)]
pub struct PostgresServer {
    /// Where `initdb`, `pg_ctl`, `createdb` and `postgres` are.
    bin_dir: PathBuf,
    /// The temporary directory: `data/` (the cluster), `server.log`, and the socket.
    dir: Option<tempfile::TempDir>,
    /// The port, held for this process while the server lives (also while it is stopped, so a
    /// restart gets it back).
    reservation: PortReservation,
    /// Whether the server's commands run as [`OS_USER`] (this process is root).
    as_os_user: bool,
    /// Whether the server is running (between a start and a stop).
    running: Mutex<bool>,
    /// Whether the server flushes each commit to disk (`fsync=on`).
    fsync: bool,
}

impl PostgresServer {
    /// Sets up a new server (`initdb`), starts it and waits until it accepts connections,
    /// then creates the database of [`url`](Self::url). Fails with
    /// [`TestingError::PostgresMissing`] when PostgreSQL is not installed. The server runs
    /// with `fsync=off` (see the module docs).
    pub fn start() -> Result<PostgresServer, TestingError> {
        Self::start_with_fsync(false)
    }

    /// As [`start`](Self::start), with `fsync=on`: each commit is flushed to the disk of the
    /// temporary directory before it returns, as on a production server. For benchmarks;
    /// tests are faster with [`start`](Self::start) and lose nothing when the server crashes.
    pub fn start_fsynced() -> Result<PostgresServer, TestingError> {
        Self::start_with_fsync(true)
    }

    fn start_with_fsync(fsync: bool) -> Result<PostgresServer, TestingError> {
        let bin_dir = find_bin_dir()?;
        let as_os_user = is_root();
        let dir = tempfile::Builder::new()
            .prefix("clusterfunk-pg-")
            .tempdir()
            .map_err(|source| TestingError::Io {
                action: "create",
                path: std::env::temp_dir(),
                source,
            })?;
        if as_os_user {
            let mut chown = Command::new("chown");
            chown.arg(format!("{OS_USER}:")).arg(dir.path());
            run_tool(chown, "chown")?;
        }
        let data = dir.path().join("data");
        let initdb = command(
            &bin_dir,
            "initdb",
            as_os_user,
            &[
                "--pgdata".into(),
                data.clone().into(),
                "--auth=trust".into(),
                "--username".into(),
                SUPERUSER.into(),
                "--encoding=UTF8".into(),
                "--locale=C".into(),
                "--no-sync".into(),
            ],
        );
        run_tool(initdb, "initdb")?;
        let mut dir = Some(dir);
        let mut last_failure = None;
        for attempt in 0..START_ATTEMPTS_MAX {
            let reservation = reserve_ports(&format!("postgres-{data:?}-{attempt}"), 1)?;
            let server = PostgresServer {
                bin_dir: bin_dir.clone(),
                dir: dir.take(),
                reservation,
                as_os_user,
                running: Mutex::new(false),
                fsync,
            };
            match server.start_again() {
                Ok(()) => {
                    server.create_database(DATABASE)?;
                    return Ok(server);
                }
                Err(failure) => {
                    // Most likely another process bound the port since its reservation: try
                    // another one. A server that came up too late is stopped first, so it
                    // releases the data directory.
                    server.stop_unchecked();
                    last_failure = Some(failure);
                    dir = server.into_dir();
                }
            }
        }
        Err(last_failure.expect("at least one start was attempted"))
    }

    /// `postgres://postgres@127.0.0.1:PORT/clusterfunk`: the server's database for tests.
    pub fn url(&self) -> String {
        self.url_of(DATABASE)
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{name}", self.port())
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.reservation.ports()[0]
    }

    /// Creates database `name` (plain letters, digits and `_`) and returns its URL, so that
    /// tests sharing one server each have a database of their own.
    pub fn create_database(&self, name: &str) -> Result<String, TestingError> {
        let mut createdb = Command::new(self.bin_dir.join("createdb"));
        createdb
            .args(["--host", "127.0.0.1", "--port", &self.port().to_string()])
            .args(["--username", SUPERUSER, name]);
        run_tool(createdb, "createdb")?;
        Ok(self.url_of(name))
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): connections
    /// break, and the next start recovers from the write-ahead log. Stopping a stopped server
    /// does nothing.
    pub fn stop(&self) -> Result<(), TestingError> {
        let mut running = lock(&self.running);
        if !*running {
            return Ok(());
        }
        run_tool(self.pg_ctl_stop(), "pg_ctl stop")?;
        *running = false;
        Ok(())
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port and data, and waits
    /// until it accepts connections. Starting a running server does nothing.
    pub fn start_again(&self) -> Result<(), TestingError> {
        let mut running = lock(&self.running);
        if *running {
            return Ok(());
        }
        let dir = self.dir();
        // pg_ctl hands `-o` to a shell: the socket directory is quoted.
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k '{}' -c fsync={} -c shared_buffers=16MB -c max_connections=64",
            self.port(),
            dir.display(),
            if self.fsync { "on" } else { "off" }
        );
        let start = self.pg_ctl(&[
            "start".into(),
            "--wait".into(),
            format!("--timeout={START_WAIT_SECONDS}").into(),
            "--log".into(),
            dir.join("server.log").into(),
            "-o".into(),
            options.into(),
        ]);
        match run_tool(start, "pg_ctl start") {
            Ok(()) => {
                *running = true;
                Ok(())
            }
            Err(TestingError::ToolFailed { command, detail }) => Err(TestingError::ToolFailed {
                command,
                detail: format!("{detail}\nserver log:\n{}", self.log_tail()),
            }),
            Err(other) => Err(other),
        }
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops a server whose start failed, ignoring errors (there may be nothing to stop).
    fn stop_unchecked(&self) {
        let _ = run_bounded(self.pg_ctl_stop(), TOOL_TIMEOUT);
    }

    /// Takes the temporary directory out of a server that is not running, so that dropping
    /// the server neither stops anything nor deletes the directory.
    fn into_dir(mut self) -> Option<tempfile::TempDir> {
        self.dir.take()
    }

    /// The temporary directory (present until the drop).
    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the dir is taken only by the drop or a failed start")
            .path()
    }

    /// `pg_ctl --pgdata DIR/data ARGS`, as the server's OS user.
    fn pg_ctl(&self, args: &[OsString]) -> Command {
        let mut all: Vec<OsString> = vec!["--pgdata".into(), self.dir().join("data").into()];
        all.extend_from_slice(args);
        command(&self.bin_dir, "pg_ctl", self.as_os_user, &all)
    }

    /// `pg_ctl stop` at once (`immediate`: as a crash would), waiting until the server exited.
    fn pg_ctl_stop(&self) -> Command {
        self.pg_ctl(&[
            "stop".into(),
            "--mode=immediate".into(),
            "--wait".into(),
            format!("--timeout={START_WAIT_SECONDS}").into(),
        ])
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.dir.is_some() {
            if let Err(error) = self.stop() {
                eprintln!("cannot stop the test PostgreSQL server: {error}");
            }
        }
        // The TempDir deletes the directory (root may delete the server user's files; any
        // other user ran the server as itself).
    }
}

/// Runs `command` to its end within [`TOOL_TIMEOUT`]; an error with its output unless it
/// succeeded.
fn run_tool(command: Command, name: &str) -> Result<(), TestingError> {
    let shown = format!("{command:?}");
    match run_bounded(command, TOOL_TIMEOUT)? {
        Some((0, _, _)) => Ok(()),
        Some((code, stdout, stderr)) => Err(TestingError::ToolFailed {
            command: shown,
            detail: format!("{name} exited with {code}:\n{stdout}{stderr}"),
        }),
        None => Err(TestingError::ToolFailed {
            command: shown,
            detail: format!("{name} ran longer than {TOOL_TIMEOUT:?} and was killed"),
        }),
    }
}

/// `BIN_DIR/program ARGS`, run as [`OS_USER`] when `as_os_user` (with `runuser`, or `su` where
/// there is no `runuser`).
fn command(bin_dir: &Path, program: &str, as_os_user: bool, args: &[OsString]) -> Command {
    let program = bin_dir.join(program);
    if !as_os_user {
        let mut command = Command::new(program);
        command.args(args);
        return command;
    }
    match find_in_path("runuser") {
        Some(runuser) => {
            let mut command = Command::new(runuser);
            command.args(["-u", OS_USER, "--"]).arg(program).args(args);
            command
        }
        None => {
            // `su -c` takes one shell command line: every word is quoted for the shell.
            let line: Vec<String> = std::iter::once(program.into_os_string())
                .chain(args.iter().cloned())
                .map(|word| shell_quote(&word.to_string_lossy()))
                .collect();
            let mut command = Command::new("su");
            command
                .args(["-s", "/bin/sh", "-c"])
                .arg(format!("exec {}", line.join(" ")))
                .arg(OS_USER);
            command
        }
    }
}

/// `word` in single quotes for `sh`, so that nothing in it is expanded.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Where `initdb` and `pg_ctl` are: beside the `initdb` found in `PATH` (following a symbolic
/// link to the real directory), else the newest `/usr/lib/postgresql/NN/bin`.
fn find_bin_dir() -> Result<PathBuf, TestingError> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "createdb"]
            .iter()
            .all(|p| dir.join(p).is_file())
    };
    if let Some(initdb) = find_in_path("initdb") {
        let real = fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(dir) = real.parent().filter(|dir| complete(dir)) {
            return Ok(dir.to_path_buf());
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| complete(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(TestingError::PostgresMissing)
}

/// `program` in a directory of `PATH`, if it is there.
fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Whether this process runs as root (user id 0), from `/proc/self/status`.
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?;
            // Real, effective, saved, file system: the effective one decides.
            line.split_whitespace().nth(2).map(|uid| uid == "0")
        })
        .unwrap_or(false)
}

/// Locks `mutex`, ignoring poisoning: a panicking test must still stop its server.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_keeps_every_word_as_it_is() {
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        let quoted = shell_quote("it's $HOME");
        let echoed = Command::new("sh")
            .args(["-c", &format!("printf %s {quoted}")])
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&echoed.stdout), "it's $HOME");
    }
}
