//! Writing a file atomically: a temporary file beside the target, filled,
//! synced and renamed over it.
//!
//! What a crash or a kill must not leave behind, and how:
//! - **A half-written target**: the target is only ever replaced by a
//!   rename, which is atomic within a directory.
//! - **Temporary files of killed saves**: each save holds an exclusive lock
//!   on its temporary file (`flock` on Unix) while it writes. The kernel
//!   drops the lock when the process dies, however it dies. Before writing,
//!   a save removes the temporary files of its target that nobody holds
//!   locked, so at most the temporary files of saves still running remain.
//! - **Names too long**: temporary names are `.{name}.embtable-{pid}-{n}.tmp`
//!   with `{name}` cut so the whole name fits [`NAME_MAX`] bytes; a legal
//!   target name always has a legal temporary name.
//! - **Replacing a symbolic link by a file**: the link is followed to the
//!   file it names (through chains of links), and that file is replaced;
//!   the link stays.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

/// The longest file name most file systems take (ext4, XFS, Btrfs, tmpfs,
/// ZFS, APFS), in bytes.
pub(crate) const NAME_MAX: usize = 255;

/// Links followed before giving up, as Linux's `ELOOP` limit.
const MAX_SYMLINKS: usize = 40;

/// Marks our temporary files, so that cleaning up never touches a user's.
const TAG: &str = ".embtable-";

/// Writes `path` atomically: `write` fills a temporary file in the same
/// directory, which is flushed, synced to disk and renamed over `path`.
/// A crash or an error at any point leaves the previous `path` intact; on
/// error the temporary file is removed. If `path` is a symbolic link, the
/// file it points to is replaced (and created if missing); the new file
/// keeps the permissions of the file it replaces.
pub(crate) fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
{
    let io_error = |context: String, source| Error::Io { context, source };
    let target = follow_symlinks(path)?;
    let name = target.file_name().ok_or_else(|| {
        io_error(
            format!("writing {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path names no file"),
        )
    })?;
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let prefix = temp_prefix(&name.to_string_lossy());
    remove_abandoned(dir, &prefix);
    let (tmp, file) = create_locked(dir, &prefix)
        .map_err(|(tmp, e)| io_error(format!("creating {}", tmp.display()), e))?;
    let written = (|| {
        if let Ok(old) = fs::metadata(&target) {
            file.set_permissions(old.permissions())?;
        }
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file)
    })();
    let file = match written {
        Ok(file) => file,
        Err(e) => {
            // The write already failed; a leftover temporary file is all a
            // failed removal could cost (and the next save removes it), so
            // its error is not reported.
            let _ = fs::remove_file(&tmp);
            return Err(io_error(
                format!("writing {} (for {})", tmp.display(), path.display()),
                e,
            ));
        }
    };
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(
            format!("renaming {} to {}", tmp.display(), target.display()),
            e,
        ));
    }
    // Holding the lock until the file has its final name.
    drop(file);
    sync_dir(dir);
    Ok(())
}

/// The file `path` names once symbolic links are followed: `path` itself
/// if it is not a link or does not exist.
fn follow_symlinks(path: &Path) -> Result<PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..MAX_SYMLINKS {
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&at).map_err(|e| Error::Io {
                    context: format!("following the link {}", at.display()),
                    source: e,
                })?;
                // A relative link is relative to the link's directory
                // (`join` keeps an absolute one as it is).
                at = match at.parent() {
                    Some(dir) => dir.join(link),
                    None => link,
                };
            }
            _ => return Ok(at),
        }
    }
    Err(Error::Io {
        context: format!("writing {}", path.display()),
        source: std::io::Error::other(format!("more than {MAX_SYMLINKS} symbolic links to follow")),
    })
}

/// `.{name}` and the tag, with `name` cut (at a character boundary) so
/// that a whole temporary name fits [`NAME_MAX`] bytes.
fn temp_prefix(name: &str) -> String {
    // The longest tail: the tag, a pid and a counter of 20 digits each.
    const TAIL: usize = TAG.len() + 20 + 1 + 20 + ".tmp".len();
    let mut keep = name.len().min(NAME_MAX - 1 - TAIL);
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!(".{}{TAG}", &name[..keep])
}

/// Creates and locks a new temporary file `{prefix}{pid}-{n}.tmp` in
/// `dir`. On error, the path it tried and why.
fn create_locked(dir: &Path, prefix: &str) -> Result<(PathBuf, File), (PathBuf, std::io::Error)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut attempt = 0;
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{prefix}{pid}-{n}.tmp"));
        let file = match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => file,
            // Another process's save with the same pid number (another
            // PID namespace sharing the directory): take the next name.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
                continue;
            }
            Err(e) => return Err((tmp, e)),
        };
        match file.try_lock() {
            // Between `open` and the lock, another save may have found the
            // file unlocked and removed it: then the name is no longer
            // ours, and a fresh file is made.
            Ok(()) if still_named(&file, &tmp) => return Ok((tmp, file)),
            Ok(()) | Err(TryLockError::WouldBlock) if attempt < 100 => attempt += 1,
            Ok(()) | Err(TryLockError::WouldBlock) => {
                return Err((tmp, std::io::Error::other("cannot lock a fresh file")));
            }
            Err(TryLockError::Error(e)) => {
                let _ = fs::remove_file(&tmp);
                return Err((tmp, e));
            }
        }
    }
}

/// Whether `path` still names the open `file`.
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether `path` still names the open `file`. (Elsewhere an open file
/// cannot be removed, so it still is if it exists.)
#[cfg(not(unix))]
fn still_named(_file: &File, path: &Path) -> bool {
    path.exists()
}

/// Removes the temporary files in `dir` starting with `prefix` that no
/// save holds locked: those of saves that were killed or crashed. Best
/// effort: a file that cannot be opened or removed is left alone.
fn remove_abandoned(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(prefix) && name.ends_with(".tmp")) {
            continue;
        }
        let path = entry.path();
        // Only a regular file is ours; never follow a link here.
        let is_file = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        if !is_file {
            continue;
        }
        if let Ok(file) = File::open(&path)
            && file.try_lock().is_ok()
        {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Makes the rename durable. Best effort: some file systems refuse to sync
/// a directory, and the data itself is already on disk.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("embtable-atomic-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = scratch_dir("ok");
        let path = dir.join("out.txt");
        fs::write(&path, b"old").unwrap();
        write_atomic(&path, |w| w.write_all(b"new contents")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new contents");
        assert_eq!(entries(&dir), ["out.txt"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_atomic_write_keeps_the_old_file_and_cleans_up() {
        let dir = scratch_dir("fail");
        let path = dir.join("out.txt");
        fs::write(&path, b"old").unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(&[7; 3 << 20])?; // more than the buffer: reaches the file
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        match &err {
            Error::Io { context, source } => {
                assert!(context.contains("out.txt"), "{context}");
                assert_eq!(source.to_string(), "disk on fire");
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(entries(&dir), ["out.txt"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_into_a_missing_directory_is_an_io_error() {
        let path = std::env::temp_dir().join("embtable-no-such-dir-xyz/out.txt");
        let err = write_atomic(&path, |w| w.write_all(b"x")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn temporary_names_fit_the_name_limit() {
        let longest = format!(
            "{}{}-{}.tmp",
            temp_prefix(&"é".repeat(200)),
            u64::MAX,
            u64::MAX
        );
        assert!(longest.len() <= NAME_MAX, "{}", longest.len());
        assert_eq!(temp_prefix("a.npy"), ".a.npy.embtable-");
        // Cut at a character boundary, never inside one.
        assert!(temp_prefix(&"é".repeat(200)).is_char_boundary(1));
    }

    /// A save killed mid-write leaves an unlocked temporary file; one still
    /// running holds its file locked. The next save removes the first only.
    #[test]
    fn abandoned_temporary_files_are_removed_and_live_ones_kept() {
        let dir = scratch_dir("abandoned");
        let path = dir.join("t.bin");
        let prefix = temp_prefix("t.bin");
        let (abandoned, file) = create_locked(&dir, &prefix).unwrap();
        (&file).write_all(&[1; 4096]).unwrap();
        drop(file); // what the kernel does when the process dies
        let (live, live_file) = create_locked(&dir, &prefix).unwrap();
        // Another target's temporary file and a user's file are not ours.
        let (other, _) = create_locked(&dir, &temp_prefix("other.bin")).unwrap();
        fs::write(dir.join(".t.bin.1-2.tmp"), b"user's").unwrap();

        write_atomic(&path, |w| w.write_all(b"new")).unwrap();
        assert!(!abandoned.exists());
        assert!(live.exists());
        drop(live_file);
        let mut expected = vec![
            ".t.bin.1-2.tmp".to_string(),
            other.file_name().unwrap().to_string_lossy().into_owned(),
            live.file_name().unwrap().to_string_lossy().into_owned(),
            "t.bin".to_string(),
        ];
        expected.sort();
        assert_eq!(entries(&dir), expected);
        fs::remove_dir_all(&dir).unwrap();
    }
}
