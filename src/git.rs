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
        let why = text(&out.stderr);
        // Anything but "not a repository" (a folder owned by another user,
        // a broken .git) is said as git says it.
        if why.contains("not a git repository") || why.is_empty() {
            return Err(GitError::NotARepository(dir));
        }
        return Err(GitError::Failed {
            what: format!("rev-parse in {}", dir.display()),
            why,
        });
    }
    Ok(PathBuf::from(text(&out.stdout)))
}

/// The commit checked out where `files` are, and whether any of them
/// differs from it. `None` outside a git repository: the history then has
/// no commit, which is not an error. Without the `git` command (the
/// distroless image), the commit is read from the repository's files and
/// the files are taken as committed (a git-sync checkout is never edited).
pub fn checkout(files: &[PathBuf]) -> Option<Checkout> {
    let first = files.first()?;
    let dir = folder_of(first);
    let head = match git(&dir, &["rev-parse", "HEAD"]) {
        Ok(head) => head,
        Err(GitError::NotInstalled(_)) => {
            return head_from_files(&dir).map(|commit| Checkout {
                commit,
                dirty: false,
            });
        }
        Err(_) => return None,
    };
    if !head.status.success() {
        return None;
    }
    let mut args = vec!["status", "--porcelain", "--"];
    // Absolute: git reads a pathspec relative to the folder it runs in.
    let paths: Vec<String> = files
        .iter()
        .map(|f| {
            std::fs::canonicalize(f)
                .unwrap_or_else(|_| f.clone())
                .display()
                .to_string()
        })
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let status = git(&dir, &args).ok()?;
    Some(Checkout {
        commit: text(&head.stdout),
        dirty: !status.status.success() || !status.stdout.is_empty(),
    })
}

/// HEAD's commit, read from the `.git` of the repository holding `dir`
/// (a folder, or a `gitdir:` file as worktrees have; a detached HEAD, a
/// loose ref, or a packed one).
fn head_from_files(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let dot_git = dir
        .ancestors()
        .map(|d| d.join(".git"))
        .find(|p| p.exists())?;
    let git_dir = if dot_git.is_file() {
        let text = std::fs::read_to_string(&dot_git).ok()?;
        let target = PathBuf::from(text.trim().strip_prefix("gitdir:")?.trim());
        if target.is_absolute() {
            target
        } else {
            dot_git.parent()?.join(target)
        }
    } else {
        dot_git
    };
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:").map(str::trim) else {
        return is_commit_id(head).then(|| head.to_owned());
    };
    // A worktree's refs are the main repository's.
    let common = std::fs::read_to_string(git_dir.join("commondir"))
        .ok()
        .map(|c| git_dir.join(c.trim()))
        .unwrap_or(git_dir);
    if let Ok(id) = std::fs::read_to_string(common.join(reference)) {
        let id = id.trim();
        return is_commit_id(id).then(|| id.to_owned());
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, name)| *name == reference)
        .map(|(id, _)| id.to_owned())
        .filter(|id| is_commit_id(id))
}

fn is_commit_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The full id of the commit `reference` names, in the repository holding
/// `path`.
///
/// # Errors
/// Not a repository, or not a commit.
pub fn resolve(path: &Path, reference: &str) -> Result<String, GitError> {
    let top = toplevel(path)?;
    if reference.starts_with('-') || reference.is_empty() {
        return Err(GitError::UnknownRef {
            reference: reference.to_owned(),
            repo: top,
            why: "not a revision".into(),
        });
    }
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
/// temporary folder: the desired state and its templates exactly as
/// committed, whatever the working tree holds. It reads the commit into a
/// temporary index and checks that out under the folder (`read-tree`,
/// `checkout-index`): the repository, its index and its worktree list are
/// left alone, and the files come out as a checkout makes them (filters
/// such as Git LFS applied, `export-ignore` not).
///
/// # Errors
/// Not a repository, an unknown commit, or git failing.
pub fn export(path: &Path, commit: &str) -> Result<Export, GitError> {
    let top = toplevel(path)?;
    if !is_commit_id(commit) {
        return Err(GitError::UnknownRef {
            reference: commit.to_owned(),
            repo: top,
            why: "not a full commit id".into(),
        });
    }
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
    let index = dir.path().join("index");
    let tree = dir.path().join("tree");
    let step = |what: &str, args: &[&str]| -> Result<(), GitError> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&top)
            .args(args)
            .env("GIT_INDEX_FILE", &index)
            .stdin(Stdio::null())
            .output()
            .map_err(GitError::NotInstalled)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(GitError::Failed {
                what: format!("{what} {commit}"),
                why: text(&out.stderr),
            })
        }
    };
    step("read-tree", &["read-tree", commit])?;
    let prefix = format!("--prefix={}/", tree.display());
    step("checkout-index", &["checkout-index", "--all", &prefix])?;
    Ok(Export {
        path: tree.join(inside),
        dir,
        commit: commit.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_in(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("git");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    #[test]
    fn head_is_read_from_the_repository_files_as_git_reads_it() {
        let repo = tempfile::tempdir().unwrap();
        let dir = repo.path();
        git_in(dir, &["init", "-q", "-b", "main"]);
        std::fs::create_dir(dir.join("desired-state")).unwrap();
        std::fs::write(dir.join("desired-state/dev.yaml"), "a: 1").unwrap();
        git_in(dir, &["add", "-A"]);
        git_in(dir, &["commit", "-q", "-m", "one"]);
        let one = git_in(dir, &["rev-parse", "HEAD"]);
        let sub = dir.join("desired-state");
        // A loose ref.
        assert_eq!(head_from_files(&sub), Some(one.clone()));
        // A packed ref.
        git_in(dir, &["pack-refs", "--all"]);
        assert_eq!(head_from_files(&sub), Some(one.clone()));
        // A worktree on a detached HEAD (git-sync's layout).
        let wt = tempfile::tempdir().unwrap();
        let wt_path = wt.path().join("wt");
        git_in(
            dir,
            &[
                "worktree",
                "add",
                "-q",
                "--detach",
                wt_path.to_str().unwrap(),
            ],
        );
        assert_eq!(head_from_files(&wt_path), Some(one.clone()));
        // And what `checkout` says with git at hand.
        let files = [sub.join("dev.yaml")];
        assert_eq!(
            checkout(&files),
            Some(Checkout {
                commit: one.clone(),
                dirty: false
            })
        );
        std::fs::write(sub.join("dev.yaml"), "a: 2").unwrap();
        assert!(checkout(&files).unwrap().dirty);
        // The tree at the commit, whatever the working tree holds; the
        // repository's index is left alone.
        let export = export(&sub, &one).unwrap();
        assert_eq!(
            std::fs::read_to_string(export.path.join("dev.yaml")).unwrap(),
            "a: 1"
        );
        assert!(git_in(dir, &["status", "--porcelain"]).contains("M desired-state/dev.yaml"));
        assert!(matches!(
            resolve(&sub, "--output=/tmp/x"),
            Err(GitError::UnknownRef { .. })
        ));
        assert_eq!(resolve(&sub, &one[..8]).unwrap(), one);
        // Outside a repository: no commit.
        let plain = tempfile::tempdir().unwrap();
        assert_eq!(head_from_files(plain.path()), None);
    }
}
