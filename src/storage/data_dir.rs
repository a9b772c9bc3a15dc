//! Who a data dir belongs to: an exclusive lock while a process uses it, and the cluster name
//! and node id it was first started with.
//!
//! LMDB lets several processes open one environment, so without a lock a second node started on
//! a live data dir would write its votes into the first one's log. The lock is an advisory
//! `flock` on `clusterfunk.lock` (released by the kernel when the process exits, also after
//! `kill -9`), and the file holds the pid of the holder so the refusal can name it. The identity
//! is `clusterfunk.identity` (JSON), written once, before anything else, on first start; a
//! data dir of another cluster or another node id is refused before its log is read.
//!
//! This file does not know LMDB: it only guards the directory the store lives in.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The lock file in a data dir.
pub const LOCK_FILE: &str = "clusterfunk.lock";
/// The identity file in a data dir.
pub const IDENTITY_FILE: &str = "clusterfunk.identity";

/// What a data dir records about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster the node belongs to.
    pub cluster_name: String,
    /// The node's id.
    pub node_id: u64,
}

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Another process holds the data dir.
    #[error("the data dir {dir} is in use by {}: a node runs on it. Stop that process first, or give this node its own --data-dir (two processes on one data dir corrupt its raft log)", holder.map_or_else(|| "another process".to_owned(), |pid| format!("process {pid}")))]
    Locked {
        /// The data dir.
        dir: PathBuf,
        /// The pid written by the holder, if it could be read.
        holder: Option<u32>,
    },
    /// The data dir was first used by another node id.
    #[error("the data dir {dir} belongs to node {stored}, not node {given}: start node {stored} on it, or give node {given} its own empty --data-dir (a data dir never changes node id)")]
    OtherNode {
        /// The data dir.
        dir: PathBuf,
        /// The node id recorded in it.
        stored: u64,
        /// The node id this start was given.
        given: u64,
    },
    /// The data dir was first used by a node of another cluster.
    #[error("the data dir {dir} belongs to cluster {stored:?}, not {given:?}: run this node with --cluster-name {stored:?}, or give it an empty --data-dir to join {given:?} (a data dir never changes cluster)")]
    OtherCluster {
        /// The data dir.
        dir: PathBuf,
        /// The cluster name recorded in it.
        stored: String,
        /// The cluster name this start was given.
        given: String,
    },
    /// The identity file exists but cannot be understood.
    #[error("the identity file {path} is unreadable ({source}); it is written once when a node first starts on its data dir. Restore it (it holds {{\"cluster_name\": ..., \"node_id\": ...}}) or start the node on an empty data dir")]
    BadIdentity {
        /// The identity file.
        path: PathBuf,
        /// What was wrong.
        source: serde_json::Error,
    },
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}; check that the data dir exists, is writable by this user and its disk is not full")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
}

/// A claimed data dir: the lock is held until this is dropped (or the process exits).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Takes the exclusive lock of `dir` (creating the directory if needed) and writes this
/// process's pid into the lock file. Fails with [`DataDirError::Locked`] while another process
/// holds it.
pub fn lock(dir: &Path) -> Result<DataDirLock, DataDirError> {
    std::fs::create_dir_all(dir).map_err(io("create the data dir", dir))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("open the lock file", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let holder = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(DataDirError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(TryLockError::Error(source)) => {
            return Err(DataDirError::Io {
                action: "lock",
                path,
                source,
            })
        }
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()))
        .map_err(io("write the lock file", &path))?;
    Ok(DataDirLock {
        _file: file,
        dir: dir.to_path_buf(),
    })
}

/// Checks that the locked data dir belongs to `expected`, recording it on first use. A data
/// dir that has raft data but no identity file (made before identities were recorded) is
/// adopted. Call with the lock held.
pub fn check_identity(lock: &DataDirLock, expected: &Identity) -> Result<(), DataDirError> {
    let dir = lock.dir();
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let stored: Identity =
                serde_json::from_slice(&bytes).map_err(|e| DataDirError::BadIdentity {
                    path: path.clone(),
                    source: e,
                })?;
            if stored.node_id != expected.node_id {
                return Err(DataDirError::OtherNode {
                    dir: dir.to_path_buf(),
                    stored: stored.node_id,
                    given: expected.node_id,
                });
            }
            if stored.cluster_name != expected.cluster_name {
                return Err(DataDirError::OtherCluster {
                    dir: dir.to_path_buf(),
                    stored: stored.cluster_name,
                    given: expected.cluster_name.clone(),
                });
            }
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => write_identity(dir, expected),
        Err(source) => Err(DataDirError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// The identity recorded in `dir`, if any (for offline tools).
pub fn read_identity(dir: &Path) -> Result<Option<Identity>, DataDirError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DataDirError::BadIdentity { path, source: e }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DataDirError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// Writes the identity file durably: a temporary file, fsynced, renamed into place, and the
/// directory fsynced, so a crash leaves either no identity or the whole one.
fn write_identity(dir: &Path, identity: &Identity) -> Result<(), DataDirError> {
    let path = dir.join(IDENTITY_FILE);
    let temporary = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(identity).map_err(|e| DataDirError::BadIdentity {
        path: path.clone(),
        source: e,
    })?;
    let mut file = File::create(&temporary).map_err(io("create", &temporary))?;
    file.write_all(&json)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(io("write", &temporary))?;
    std::fs::rename(&temporary, &path).map_err(io("rename into place", &path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(cluster: &str, node: u64) -> Identity {
        Identity {
            cluster_name: cluster.to_owned(),
            node_id: node,
        }
    }

    #[test]
    fn a_second_lock_on_a_held_data_dir_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let held = lock(dir.path()).expect("first lock");
        let error = lock(dir.path()).expect_err("second lock");
        match &error {
            DataDirError::Locked { holder, .. } => assert_eq!(*holder, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(&format!("process {}", std::process::id()))
                && message.contains("Stop that process"),
            "{message}"
        );
        drop(held);
        lock(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn a_data_dir_keeps_the_identity_of_its_first_start() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let held = lock(dir.path()).expect("lock");
        check_identity(&held, &identity("blue", 2)).expect("first start records");
        check_identity(&held, &identity("blue", 2)).expect("same identity");
        assert_eq!(
            read_identity(dir.path()).expect("readable"),
            Some(identity("blue", 2))
        );
        let other_node = check_identity(&held, &identity("blue", 3)).expect_err("node 3");
        assert!(
            matches!(
                other_node,
                DataDirError::OtherNode {
                    stored: 2,
                    given: 3,
                    ..
                }
            ),
            "{other_node}"
        );
        assert!(other_node.to_string().contains("start node 2 on it"));
        let other_cluster = check_identity(&held, &identity("green", 2)).expect_err("green");
        assert!(
            matches!(other_cluster, DataDirError::OtherCluster { .. }),
            "{other_cluster}"
        );
        assert!(other_cluster
            .to_string()
            .contains("--cluster-name \"blue\""));
    }

    #[test]
    fn a_damaged_identity_file_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let held = lock(dir.path()).expect("lock");
        std::fs::write(dir.path().join(IDENTITY_FILE), b"{not json").expect("write");
        let error = check_identity(&held, &identity("blue", 1)).expect_err("damaged");
        assert!(matches!(error, DataDirError::BadIdentity { .. }), "{error}");
        assert_eq!(
            std::fs::read(dir.path().join(IDENTITY_FILE)).expect("still there"),
            b"{not json"
        );
    }
}
