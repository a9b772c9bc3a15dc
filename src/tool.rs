//! What the command-line tools (the `clusterfunk` binary and the `kv` example) share: the exit
//! codes every tool gives the same meaning and the error a tool's command ends with. Behind the
//! `cli` feature, with the tools themselves.

use std::process::ExitCode;

use crate::admin::CredentialsError;

/// The command failed (an error, or the cluster refused it).
pub const EXIT_FAILED: u8 = 1;
/// Bad usage (clap exits with 2 too).
pub const EXIT_USAGE: u8 = 2;

/// Why a tool's command failed: the message for standard error and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolError {
    /// What went wrong and what to do next.
    pub message: String,
    /// The process's exit code.
    pub code: u8,
}

impl ToolError {
    /// A usage error ([`EXIT_USAGE`]).
    pub fn usage(message: impl Into<String>) -> ToolError {
        ToolError {
            message: message.into(),
            code: EXIT_USAGE,
        }
    }

    /// Prints `error: <message>` on standard error and gives the exit code.
    pub fn exit(self) -> ExitCode {
        eprintln!("error: {}", self.message);
        ExitCode::from(self.code)
    }
}

impl std::fmt::Display for ToolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ToolError {}

/// A failure ([`EXIT_FAILED`]) with this message.
impl From<String> for ToolError {
    fn from(message: String) -> ToolError {
        ToolError {
            message,
            code: EXIT_FAILED,
        }
    }
}

/// A failure ([`EXIT_FAILED`]) with this message.
impl From<&str> for ToolError {
    fn from(message: &str) -> ToolError {
        ToolError::from(message.to_string())
    }
}

/// Missing or conflicting credentials are a usage error; unreadable ones a failure.
impl From<CredentialsError> for ToolError {
    fn from(error: CredentialsError) -> ToolError {
        ToolError {
            code: if error.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            },
            message: error.to_string(),
        }
    }
}
