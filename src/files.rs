//! Reading the files stackwarden is pointed at, safely: only regular files,
//! never more than a stated number of bytes, and never blocking on a FIFO or
//! a device. Every desired-state file and template goes through here, in
//! the CLI and in the daemon's change detection alike.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest desired-state file read. A real environment file is a few
/// kilobytes; anything near this is a mistake, not a configuration.
pub const MAX_DESIRED_STATE_BYTES: u64 = 1024 * 1024;

/// The largest template read: CloudFormation's own limit for a template
/// body uploaded through S3 (1 MB); nothing larger can ever be deployed.
pub const MAX_TEMPLATE_BYTES: u64 = 1024 * 1024;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file (a {0}); only regular files are read")]
    NotRegular(&'static str),
    #[error("larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("not UTF-8 text")]
    NotUtf8,
}

/// Reads `path` as UTF-8 text if it is a regular file (symlinks followed)
/// of at most `limit` bytes.
///
/// The file is opened non-blocking, so a FIFO cannot stall the open, and
/// its type is checked on the open handle, so it cannot be swapped between
/// the check and the read. The read itself is bounded too: a file that grows
/// past its reported size (or a /proc file that reports 0) still stops at
/// the limit.
///
/// # Errors
/// The file is missing or unreadable, not a regular file, larger than
/// `limit`, or not UTF-8.
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    let bytes = read_bytes(path, limit)?;
    String::from_utf8(bytes).map_err(|_| FileError::NotUtf8)
}

/// Like [`read_text`], for bytes.
///
/// # Errors
/// As [`read_text`], but for UTF-8.
pub fn read_bytes(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(FileError::NotRegular(if kind.is_dir() {
            "directory"
        } else if kind.is_fifo() {
            "FIFO"
        } else if kind.is_socket() {
            "socket"
        } else if kind.is_char_device() {
            "character device"
        } else if kind.is_block_device() {
            "block device"
        } else {
            "special file"
        }));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { limit });
    }
    let mut out = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(FileError::TooLarge { limit });
    }
    Ok(out)
}

/// The root a desired-state folder's templates must stay inside: the git
/// work tree holding the folder, or the folder's parent when there is none.
/// Symlinks are resolved, so the answer can be compared with a resolved
/// template path.
///
/// # Errors
/// The folder cannot be resolved.
pub fn repository_root(desired_state_dir: &Path) -> std::io::Result<PathBuf> {
    // `dev.yaml`'s parent is the empty path: the current folder.
    let dir = if desired_state_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        desired_state_dir
    };
    let dir = std::fs::canonicalize(dir)?;
    let mut cur = Some(dir.as_path());
    while let Some(d) = cur {
        if d.join(".git").exists() {
            return Ok(d.to_owned());
        }
        cur = d.parent();
    }
    Ok(dir.parent().map_or_else(|| dir.clone(), Path::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.yaml");
        std::fs::write(&p, "x: 1\n").unwrap();
        assert_eq!(read_text(&p, 100).unwrap(), "x: 1\n");
    }

    #[test]
    fn a_file_over_the_limit_names_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.yaml");
        std::fs::write(&p, "x".repeat(101)).unwrap();
        let e = read_text(&p, 100).unwrap_err();
        assert_eq!(e.to_string(), "larger than the limit of 100 bytes");
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.yaml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo has no other effect.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (fifo.as_path(), "FIFO"),
            (Path::new("/dev/zero"), "character device"),
            (dir.path(), "directory"),
        ] {
            let e = read_text(path, 1 << 20).unwrap_err();
            assert!(e.to_string().contains(kind), "{path:?}: {e}");
        }
    }

    #[test]
    fn proc_files_that_report_no_size_are_still_bounded() {
        // /proc/self/environ reports length 0 but has content: the bounded
        // read, not the metadata, enforces the limit.
        std::fs::metadata("/proc/self/maps").unwrap();
        let e = read_bytes(Path::new("/proc/self/maps"), 8).unwrap_err();
        assert!(matches!(e, FileError::TooLarge { limit: 8 }), "{e}");
    }

    #[test]
    fn a_bare_file_name_is_in_the_current_folder() {
        let here = std::fs::canonicalize(".").unwrap();
        assert!(here.starts_with(repository_root(Path::new("")).unwrap()));
    }

    #[test]
    fn the_repository_root_is_the_git_root_or_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("repo/desired-state");
        std::fs::create_dir_all(&ds).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(repository_root(&ds).unwrap(), root.join("repo"));
        std::fs::create_dir_all(dir.path().join(".git")).unwrap();
        assert_eq!(repository_root(&ds).unwrap(), root);
    }
}
