//! The git checkout the desired state lives in: which commit it is (for
//! the history), and the desired state as it was at an earlier commit (for
//! `rollback --to`), read from git's objects rather than the working tree.
//! Runs the `git` command, as every git user has it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An error of a git operation, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error(
        "{0} is not inside a git repository: --to and --to-previous read the desired state from git"
    )]
    NotARepository(PathBuf),
    #[error("git: `{reference}` is not a commit of {repo}: {why}")]
    UnknownRef {
        reference: String,
        repo: PathBuf,
        why: String,
    },
    #[error("git {what}: {why}")]
    Failed { what: String, why: String },
    #[error("cannot run git (is it installed?): {0}")]
    NotInstalled(std::io::Error),
}

/// A commit, and whether the files read differ from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub commit: String,
    pub dirty: bool,
}

fn git(dir: &Path, args: &[&str]) -> Result<std::process::Output, GitError> {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(GitError::NotInstalled)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim().to_owned()
}

/// The folder of a path (a file's parent; a folder itself).
fn folder_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_owned()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }
}

/// The top of the git repository holding `path`.
///
/// # Errors
/// Not in a repository, or git cannot run.
pub fn toplevel(path: &Path) -> Result<PathBuf, GitError> {
    let dir = folder_of(path);
    let out = git(&dir, &["rev-parse", "--show-toplevel"])?;
    if !out.status.success() {
        return Err(GitError::NotARepository(dir));
    }
    Ok(PathBuf::from(text(&out.stdout)))
}

/// The commit checked out where `files` are, and whether any of them
/// differs from it. `None` outside a git repository (or without git): the
/// history then has no commit, which is not an error.
pub fn checkout(files: &[PathBuf]) -> Option<Checkout> {
    let first = files.first()?;
    let dir = folder_of(first);
    let head = git(&dir, &["rev-parse", "HEAD"]).ok()?;
    if !head.status.success() {
        return None;
    }
    let mut args = vec!["status", "--porcelain", "--"];
    let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let status = git(&dir, &args).ok()?;
    Some(Checkout {
        commit: text(&head.stdout),
        dirty: !status.status.success() || !status.stdout.is_empty(),
    })
}

/// The full id of the commit `reference` names, in the repository holding
/// `path`.
///
/// # Errors
/// Not a repository, or not a commit.
pub fn resolve(path: &Path, reference: &str) -> Result<String, GitError> {
    let top = toplevel(path)?;
    let spec = format!("{reference}^{{commit}}");
    let out = git(&top, &["rev-parse", "--verify", "--quiet", &spec])?;
    if !out.status.success() {
        return Err(GitError::UnknownRef {
            reference: reference.to_owned(),
            repo: top,
            why: "unknown revision".into(),
        });
    }
    Ok(text(&out.stdout))
}

/// A repository's tree at one commit, written to a temporary folder
/// (removed on drop).
pub struct Export {
    pub dir: tempfile::TempDir,
    pub commit: String,
    /// Where `path` (given to [`export`]) is in the exported tree.
    pub path: PathBuf,
}

/// Writes the tree of `commit` of the repository holding `path` to a
/// temporary folder (`git archive`, read by `tar`): the desired state and
/// its templates exactly as committed, whatever the working tree holds.
///
/// # Errors
/// Not a repository, an unknown commit, or git or tar failing.
pub fn export(path: &Path, commit: &str) -> Result<Export, GitError> {
    let top = toplevel(path)?;
    let abs = std::fs::canonicalize(path).map_err(|e| GitError::Failed {
        what: format!("cannot resolve {}", path.display()),
        why: e.to_string(),
    })?;
    let top_abs = std::fs::canonicalize(&top).unwrap_or(top.clone());
    let inside = abs
        .strip_prefix(&top_abs)
        .map_err(|_| GitError::NotARepository(abs.clone()))?
        .to_owned();
    let dir = tempfile::Builder::new()
        .prefix("stackwarden-git-")
        .tempdir()
        .map_err(|e| GitError::Failed {
            what: "temporary folder".into(),
            why: e.to_string(),
        })?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(&top)
        .args(["archive", "--format=tar", commit])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GitError::NotInstalled)?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir.path())
        .stdin(archive.stdout.take().expect("piped"))
        .output()
        .map_err(|e| GitError::Failed {
            what: "tar".into(),
            why: e.to_string(),
        })?;
    let archived = archive.wait_with_output().map_err(|e| GitError::Failed {
        what: "archive".into(),
        why: e.to_string(),
    })?;
    if !archived.status.success() {
        return Err(GitError::Failed {
            what: format!("archive {commit}"),
            why: text(&archived.stderr),
        });
    }
    if !tar.status.success() {
        return Err(GitError::Failed {
            what: "archive (extracting)".into(),
            why: text(&tar.stderr),
        });
    }
    Ok(Export {
        path: dir.path().join(inside),
        dir,
        commit: commit.to_owned(),
    })
}
