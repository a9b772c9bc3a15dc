//! How the LMDB environment is opened ([`StoreOptions`]): a leaf the environment and the store
//! both read.

use super::error::StorageError;

/// How the LMDB environment is opened. Build with `..Default::default()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// The largest size the data file may grow to, in bytes. LMDB reserves this much address
    /// space up front but uses disk only as data is written; writes fail with a "raise
    /// map_size_bytes" error once it is full. Rounded up to a multiple of 64 KiB; at least 1 MiB.
    /// Default: 1 GiB.
    pub map_size_bytes: usize,
    /// Whether every commit is fsynced before it is acknowledged. With `false`, a process crash
    /// (even `kill -9`) loses nothing, but an OS crash or power loss can lose the last commits,
    /// which raft cannot tolerate on a majority of nodes: turn it off only for tests and
    /// benchmarks. Default: `true`.
    pub sync: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            map_size_bytes: 1 << 30,
            sync: true,
        }
    }
}

/// Smallest accepted map size: LMDB needs a few pages per database before storing anything.
const MAP_SIZE_MIN_BYTES: usize = 1 << 20;
/// Map sizes are rounded up to this, a multiple of every page size LMDB runs with (4, 16 and
/// 64 KiB), because LMDB rejects a map size that is not a multiple of the page size.
const MAP_SIZE_GRANULE_BYTES: usize = 64 * 1024;

impl StoreOptions {
    /// Checks the options; [`LmdbStore::open`](super::LmdbStore::open) calls it.
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.map_size_bytes < MAP_SIZE_MIN_BYTES {
            return Err(StorageError::InvalidOptions {
                reason: format!(
                    "map_size_bytes is {}, below the minimum of {MAP_SIZE_MIN_BYTES}: raise it (default 1 GiB)",
                    self.map_size_bytes
                ),
            });
        }
        if self
            .map_size_bytes
            .checked_next_multiple_of(MAP_SIZE_GRANULE_BYTES)
            .is_none()
        {
            return Err(StorageError::InvalidOptions {
                reason: format!(
                    "map_size_bytes is {}, too large for this platform's address space: lower it (default 1 GiB)",
                    self.map_size_bytes
                ),
            });
        }
        Ok(())
    }

    /// `map_size_bytes` rounded up to the granule LMDB accepts on every page size.
    pub(crate) fn map_size_rounded_bytes(&self) -> usize {
        self.map_size_bytes
            .checked_next_multiple_of(MAP_SIZE_GRANULE_BYTES)
            .unwrap_or(self.map_size_bytes)
    }
}
