//! Node processes and bounded runs of command-line tools. A [`NodeProcess`] is one node's slot:
//! its id, address, data dir and log file, and its process while one runs. Does not own the
//! command line beyond `serve --id --listen --data-dir` (see [`serve_command`]): callers add
//! `--init`, credentials and the environment.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::TestingError;
use crate::NodeId;

/// What a command-line tool did: its exit code (-1 when a signal ended it), stdout and stderr.
pub type Outcome = (i32, String, String);

/// A signal the harness sends to a node process with `kill(1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: asks the node to shut down.
    Term,
    /// SIGSTOP: freezes the node; it keeps its sockets but answers nothing.
    Stop,
    /// SIGCONT: thaws a frozen node.
    Cont,
    /// SIGKILL: ends the node at once, as a crash would.
    Kill,
}

impl Signal {
    /// Its name without `SIG`, as `kill -NAME` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "TERM",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
            Signal::Kill => "KILL",
        }
    }
}

/// The `PROGRAM serve --id ID --listen ADDR --data-dir DIR` command of a node, to which the
/// caller adds `--init`, credentials and the environment.
pub fn serve_command(program: &Path, id: NodeId, listen: &str, data_dir: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .args(["serve", "--id", &id.to_string(), "--listen", listen])
        .arg("--data-dir")
        .arg(data_dir);
    command
}

/// One node of a process cluster: its identity and files, and its process while one runs.
/// Dropping it kills and reaps the process, so a failed test or tool leaves none behind.
#[derive(Debug)]
pub struct NodeProcess {
    /// The node id.
    id: NodeId,
    /// Where it listens.
    addr: SocketAddr,
    /// Its data dir, kept across restarts.
    data_dir: PathBuf,
    /// Its stdout and stderr, appended across restarts.
    log: PathBuf,
    /// The process, while one is started and not yet reaped.
    child: Mutex<Option<Child>>,
    /// How often it was started.
    starts: Mutex<u32>,
}

impl NodeProcess {
    /// The slot of node `id` listening on `addr`, with its data dir `DIR/node-ID` and log file
    /// `DIR/node-ID.log` under `dir`. Nothing is started or created yet.
    pub fn new(id: NodeId, addr: SocketAddr, dir: &Path) -> Self {
        NodeProcess {
            id,
            addr,
            data_dir: dir.join(format!("node-{id}")),
            log: dir.join(format!("node-{id}.log")),
            child: Mutex::new(None),
            starts: Mutex::new(0),
        }
    }

    /// The node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How often it was started.
    pub fn starts(&self) -> u32 {
        *lock(&self.starts)
    }

    /// Runs `command` as this node's process, its stdout and stderr appended to the log file
    /// after a line `=== harness: start #N of node ID: COMMAND`. Stdin is closed; the caller
    /// sets the rest of the environment.
    pub fn start(&self, mut command: Command) -> Result<(), TestingError> {
        let mut slot = lock(&self.child);
        if slot.is_some() {
            return Err(TestingError::AlreadyRunning(self.id));
        }
        let mut starts = lock(&self.starts);
        let io_error = |action, source| TestingError::Io {
            action,
            path: self.log.clone(),
            source,
        };
        let mut log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| io_error("open", e))?;
        writeln!(
            log,
            "=== harness: start #{} of node {}: {command:?}",
            *starts + 1,
            self.id
        )
        .map_err(|e| io_error("write", e))?;
        let stderr = log.try_clone().map_err(|e| io_error("share", e))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|source| TestingError::Spawn {
                program: PathBuf::from(command.get_program()),
                source,
            })?;
        *starts += 1;
        *slot = Some(child);
        Ok(())
    }

    /// Its process id, while a process is started and not reaped.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// Whether its process runs (started, not killed, stopped or exited by itself).
    pub fn is_running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// How its process exited, if it did (it stays in the slot: see [`NodeProcess::reap`]).
    pub fn exit_status(&self) -> Result<Option<ExitStatus>, TestingError> {
        match lock(&self.child).as_mut() {
            None => Ok(None),
            Some(child) => child.try_wait().map_err(|source| TestingError::Process {
                id: self.id,
                action: "poll",
                source,
            }),
        }
    }

    /// Forgets its process if it has exited, and returns how it exited.
    pub fn reap(&self) -> Result<Option<ExitStatus>, TestingError> {
        let mut slot = lock(&self.child);
        let Some(child) = slot.as_mut() else {
            return Ok(None);
        };
        let status = child.try_wait().map_err(|source| TestingError::Process {
            id: self.id,
            action: "poll",
            source,
        })?;
        if status.is_some() {
            slot.take();
        }
        Ok(status)
    }

    /// Kills its process with SIGKILL and reaps it; returns the moment right after the kill.
    pub fn kill(&self) -> Result<Instant, TestingError> {
        let mut child = lock(&self.child)
            .take()
            .ok_or(TestingError::NotRunning(self.id))?;
        let process_error = |action, source| TestingError::Process {
            id: self.id,
            action,
            source,
        };
        child.kill().map_err(|e| process_error("kill", e))?;
        let at = Instant::now();
        child.wait().map_err(|e| process_error("reap", e))?;
        self.mark("killed with SIGKILL");
        Ok(at)
    }

    /// Sends `signal` to its process with `kill(1)` and returns the moment right after the
    /// signal was delivered. The process stays in the slot (see [`NodeProcess::reap`]).
    pub fn signal(&self, signal: Signal) -> Result<Instant, TestingError> {
        // Only to a child not yet reaped: until the harness waits for it, its pid cannot be
        // reused by another process. The lock keeps it unreaped while `kill` runs.
        let slot = lock(&self.child);
        let pid = slot
            .as_ref()
            .map(Child::id)
            .ok_or(TestingError::NotRunning(self.id))?;
        send_signal(pid, signal)?;
        let at = Instant::now();
        drop(slot);
        self.mark(&format!("sent SIG{}", signal.name()));
        Ok(at)
    }

    /// Freezes its process with SIGSTOP.
    pub fn pause(&self) -> Result<Instant, TestingError> {
        self.signal(Signal::Stop)
    }

    /// Thaws its process with SIGCONT after [`NodeProcess::pause`].
    pub fn resume(&self) -> Result<Instant, TestingError> {
        self.signal(Signal::Cont)
    }

    /// Appends `=== harness: TEXT` to its log, so that a log shows when the harness did what.
    /// Best effort: a log that cannot be written is no reason to fail.
    pub fn mark(&self, text: &str) {
        if let Ok(mut log) = OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = writeln!(log, "=== harness: {text}");
        }
    }

    /// The last `lines` lines of its log (empty when there is none).
    pub fn log_tail(&self, lines: usize) -> Vec<String> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|line| line.to_string())
            .collect()
    }

    /// Its process state in words, for failure reports.
    pub fn describe_process(&self) -> String {
        match lock(&self.child).as_mut() {
            None => "not running".to_string(),
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => format!("exited by itself ({status})"),
                Ok(None) => format!("running, pid {}", child.id()),
                Err(e) => format!("unknown ({e})"),
            },
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `command` with piped output until it ends; `Ok(None)` when it runs longer than
/// `limit` (it is killed and reaped).
pub fn run_bounded(mut command: Command, limit: Duration) -> Result<Option<Outcome>, TestingError> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| TestingError::Spawn {
        program: PathBuf::from(command.get_program()),
        source,
    })?;
    // Drain both pipes on their own threads so a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|pipe| Box::new(pipe) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|pipe| Box::new(pipe) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let poll_error = |source| TestingError::Spawn {
        program: PathBuf::from(command.get_program()),
        source,
    };
    let status = loop {
        if let Some(status) = child.try_wait().map_err(poll_error)? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    // A reader thread that panicked read nothing worth reporting.
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(status.map(|status| (status.code().unwrap_or(-1), stdout, stderr)))
}

/// Sends `signal` to `pid` with `kill(1)`.
fn send_signal(pid: u32, signal: Signal) -> Result<(), TestingError> {
    let failed = |detail: String| TestingError::Signal {
        signal: signal.name(),
        pid,
        detail,
    };
    let status = Command::new("kill")
        .arg(format!("-{}", signal.name()))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .map_err(|e| failed(format!("cannot run kill(1): {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(status.to_string()))
    }
}

/// Locks `mutex`, ignoring poisoning: a panicking test must still clean up in `Drop`.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
