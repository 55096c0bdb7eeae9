//! What can go wrong in a deploy by extraction; one type for every part of it.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::deploy::download::StreamError;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{tool} is not here: installing from a root tar needs the ephemeral root's tools")]
    Missing {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {tool}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}):\n{tail}")]
    Tool {
        command: String,
        status: ExitStatus,
        tail: String,
    },
    #[error("after partitioning, {disk} has {found}; the layout wants {want}")]
    Layout {
        disk: String,
        found: String,
        want: String,
    },
    #[error("no UUID on {device} after mkfs (blkid said {said:?})")]
    NoUuid { device: String, said: String },
    #[error("decompressing the root tar at tar byte {offset}")]
    Decode {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("feeding tar at tar byte {offset}")]
    Pipe {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("reading the rest of the root tar")]
    Rest(#[source] io::Error),
    #[error("the image has no kernel to boot: neither /vmlinuz nor /boot/vmlinuz-*")]
    NoKernel,
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(super) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ExtractError + 'a {
    move |source| ExtractError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
