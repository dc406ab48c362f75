//! Every file and directory deltatune writes goes through here. Outputs are built beside their
//! destination under a staging name (`.NAME.deltatune-PID-N`), fsynced, and moved into place in
//! one rename: readers see the old content or the complete new one, never half of either. A
//! failed write removes its staging; a staging left by a killed process (its pid is gone) is
//! removed by the next write to the same destination.
//!
//! The output policy every command follows ([`check_output`]): a destination that exists and is
//! not empty is refused unless the caller passes `overwrite`; a destination that is one of the
//! command's inputs, lies inside one, or contains one is always refused.

use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Staging names in this process are `.NAME.deltatune-PID-N`; `N` counts.
static COUNTER: AtomicU64 = AtomicU64::new(0);
const MARK: &str = ".deltatune-";

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into())
}

/// A fresh staging path beside `dst`.
fn staging_path(dst: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_of(dst).join(format!(".{}{MARK}{}-{n}", file_name(dst), std::process::id()))
}

/// Whether process `pid` is alive (signal 0 reaches it, or it exists but is not ours).
fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for the process; it sends nothing.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes stagings of `dst` left by processes that no longer exist. Best effort: a staging that
/// cannot be removed is left for the next attempt.
pub fn clean_stale(dst: &Path) {
    let prefix = format!(".{}{MARK}", file_name(dst));
    let Ok(entries) = fs::read_dir(parent_of(dst)) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let pid = rest.split(['-', '.']).next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !alive(p)) {
            let p = e.path();
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
    }
}

/// fsyncs a directory so that renames inside it persist.
fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir) {
        Ok(d) => d.sync_all().map_err(|e| Error::io_op(dir, "syncing", e)),
        // Some filesystems cannot open directories for syncing; the rename itself happened.
        Err(_) => Ok(()),
    }
}

/// `renameat2` flags: fail if the target exists / swap the two names.
const NOREPLACE: libc::c_uint = 1;
const EXCHANGE: libc::c_uint = 2;

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("path contains a NUL byte"));
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like rename(2).
    let r = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves `staged` to `dst`. Without `replace`, fails if `dst` appeared meanwhile (another process
/// wrote it). With `replace`, an existing `dst` is swapped out in one step and removed after.
fn install(staged: &Path, dst: &Path, replace: bool) -> Result<()> {
    // An empty directory holds nothing to keep: it may be replaced without `replace`.
    if !replace && fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) && !occupied(dst) {
        let _ = fs::remove_dir(dst); // fails harmlessly if something appeared in it meanwhile
    }
    let exists = fs::symlink_metadata(dst).is_ok();
    if !exists || !replace {
        match renameat2(staged, dst, NOREPLACE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) || e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                return Err(Error::arg(
                    "--out",
                    format!("{} appeared while this command was writing it (another process?); nothing was replaced", dst.display()),
                ));
            }
            // Filesystems without renameat2: a plain rename, which refuses non-empty directories.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) => {
                fs::rename(staged, dst).map_err(|e| Error::io_op(dst, "moving the finished output to", e))?
            }
            Err(e) => return Err(Error::io_op(dst, "moving the finished output to", e)),
        }
    } else {
        match renameat2(staged, dst, EXCHANGE) {
            // `staged` now holds the old content.
            Ok(()) => remove_any(staged).map_err(|e| Error::io_op(staged, "removing the replaced output", e))?,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOSYS) => {
                let old = staging_path(dst);
                fs::rename(dst, &old).map_err(|e| Error::io_op(dst, "moving the old output aside", e))?;
                if let Err(e) = fs::rename(staged, dst) {
                    let _ = fs::rename(&old, dst); // put the old one back
                    return Err(Error::io_op(dst, "moving the finished output to", e));
                }
                remove_any(&old).map_err(|e| Error::io_op(&old, "removing the replaced output", e))?;
            }
            Err(e) => return Err(Error::io_op(dst, "replacing", e)),
        }
    }
    sync_dir(&parent_of(dst))
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(p)?.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

/// A temporary path beside `path` for a writer that needs a file name (a plotting backend): stale
/// ones of dead processes are removed first. Move it over `path` with [`finish_temp`].
pub fn temp_path(path: &Path) -> Result<PathBuf> {
    let dir = parent_of(path);
    fs::create_dir_all(&dir).map_err(|e| Error::io_op(&dir, "creating", e))?;
    clean_stale(path);
    // Keep the extension: some writers pick the format by it.
    let tmp = staging_path(path);
    Ok(match path.extension() {
        Some(ext) => tmp.with_file_name(format!("{}.{}", file_name(&tmp), ext.to_string_lossy())),
        None => tmp,
    })
}

/// Moves a temporary file written by the caller over `path`, or removes it if writing failed.
pub fn finish_temp<T>(tmp: &Path, path: &Path, written: Result<T>) -> Result<T> {
    let v = match written {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(tmp); // the write already failed and is reported
            return Err(e);
        }
    };
    if let Err(e) = File::open(tmp).and_then(|f| f.sync_all()).and_then(|()| fs::rename(tmp, path)) {
        let _ = fs::remove_file(tmp);
        return Err(Error::io_op(path, "writing", e));
    }
    sync_dir(&parent_of(path))?;
    Ok(v)
}

/// Writes `bytes` to `path` atomically (replacing an existing file).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Serialises `value` as pretty JSON (with a final newline) and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::Json { file: path.to_path_buf(), msg: e.to_string() })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Runs `fill` on a staging file and moves it over `path` only if `fill` and the fsync succeed.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> std::io::Result<()>) -> Result<()> {
    let dir = parent_of(path);
    fs::create_dir_all(&dir).map_err(|e| Error::io_op(&dir, "creating", e))?;
    clean_stale(path);
    let tmp = staging_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp); // best effort: the write already failed and is reported
        return Err(Error::io_op(path, "writing", e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io_op(path, "moving the finished file to", e));
    }
    sync_dir(&dir)
}

/// A directory being built beside its destination; dropped without [`StagedDir::commit`], it is
/// removed with everything in it.
#[derive(Debug)]
pub struct StagedDir {
    path: PathBuf,
    dst: PathBuf,
    done: bool,
}

impl StagedDir {
    /// Creates an empty staging directory beside `dst` (its parent is created if needed).
    pub fn new(dst: &Path) -> Result<Self> {
        let parent = parent_of(dst);
        fs::create_dir_all(&parent).map_err(|e| Error::io_op(&parent, "creating", e))?;
        clean_stale(dst);
        let path = staging_path(dst);
        fs::create_dir(&path).map_err(|e| Error::io_op(&parent, "creating a staging directory in", e))?;
        Ok(StagedDir { path, dst: dst.to_path_buf(), done: false })
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The final destination.
    pub fn dst(&self) -> &Path {
        &self.dst
    }

    /// Moves the finished directory into place. With `replace`, an existing destination is
    /// swapped out and removed; without, the commit fails if the destination exists.
    pub fn commit(mut self, replace: bool) -> Result<()> {
        sync_tree(&self.path)?;
        install(&self.path, &self.dst, replace)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.path); // nothing to report from a drop
        }
    }
}

/// fsyncs every file under `dir` and the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::io_op(dir, "reading", e))? {
        let p = e.map_err(|e| Error::io_op(dir, "reading", e))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p).and_then(|f| f.sync_all()).map_err(|e| Error::io_op(&p, "syncing", e))?;
        }
    }
    sync_dir(dir)
}

/// Replaces directory `dst` by the fully written directory `staging` (same parent), so readers
/// see the old directory or the complete new one.
pub fn replace_dir(staging: &Path, dst: &Path) -> Result<()> {
    install(staging, dst, true)
}

/// A path made absolute and with its symbolic links resolved as far as it exists (a destination
/// that does not exist yet resolves through its nearest existing ancestor).
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = fs::canonicalize(cur) {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_owned());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Whether `dst` holds something: a non-empty directory, or a file.
pub fn occupied(dst: &Path) -> bool {
    match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => fs::read_dir(dst).map(|mut d| d.next().is_some()).unwrap_or(true),
        Ok(_) => true,
        Err(_) => false,
    }
}

/// The output policy, checked before any work. `flag` names the destination's flag in messages;
/// `inputs` are the command's inputs as (flag, path).
pub fn check_output(dst: &Path, flag: &str, overwrite: bool, inputs: &[(&str, &Path)]) -> Result<()> {
    check_not_input(dst, flag, inputs)?;
    if occupied(dst) && !overwrite {
        let what = if dst.is_dir() { "a non-empty directory" } else { "a file" };
        return Err(Error::arg(flag, format!("{} exists and is {what}; pass --overwrite to replace it", dst.display())));
    }
    Ok(())
}

/// Refuses a destination that is one of `inputs`, lies inside one, or contains one.
pub fn check_not_input(dst: &Path, flag: &str, inputs: &[(&str, &Path)]) -> Result<()> {
    let d = resolved(dst);
    for (in_flag, input) in inputs {
        let i = resolved(input);
        if d == i || d.starts_with(&i) || i.starts_with(&d) {
            let relation = if d == i {
                "is"
            } else if d.starts_with(&i) {
                "lies inside"
            } else {
                "contains"
            };
            return Err(Error::arg(
                flag,
                format!("{} {relation} the input {in_flag} {}; an input is never overwritten — choose another {flag}", dst.display(), input.display()),
            ));
        }
    }
    Ok(())
}

/// An exclusive lock on a directory, held while a run writes into it (released on drop).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist); another process holding it is an error naming `flag`.
    pub fn acquire(dir: &Path, flag: &str) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let file = File::open(dir).map_err(|e| Error::io_op(dir, "opening", e))?;
        // SAFETY: flock on a file descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::arg(flag, format!("another deltatune process is writing {}; wait for it or choose another {flag}", dir.display())));
            }
            return Err(Error::io_op(dir, "locking", e));
        }
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_fill_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn staged_dirs_commit_replace_and_vanish() {
        let root = tempfile::tempdir().unwrap();
        let dst = root.path().join("out");
        let s = StagedDir::new(&dst).unwrap();
        fs::write(s.path().join("f"), b"1").unwrap();
        s.commit(false).unwrap();
        assert_eq!(fs::read(dst.join("f")).unwrap(), b"1");
        // Without replace, an existing destination is refused and kept.
        let s = StagedDir::new(&dst).unwrap();
        fs::write(s.path().join("f"), b"2").unwrap();
        assert!(s.commit(false).is_err());
        assert_eq!(fs::read(dst.join("f")).unwrap(), b"1");
        // With replace, it is swapped out.
        let s = StagedDir::new(&dst).unwrap();
        fs::write(s.path().join("g"), b"3").unwrap();
        s.commit(true).unwrap();
        assert!(!dst.join("f").exists() && dst.join("g").exists());
        // Dropped stagings vanish; nothing but `out` remains.
        drop(StagedDir::new(&dst).unwrap());
        let names: Vec<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn stale_stagings_of_dead_processes_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let dst = root.path().join("out");
        // A pid that cannot exist (above the kernel's pid_max).
        let stale = root.path().join(format!(".out{MARK}{}-0", 1u32 << 30));
        fs::create_dir(&stale).unwrap();
        let mine = StagedDir::new(&dst).unwrap();
        assert!(!stale.exists());
        assert!(mine.path().exists());
    }

    #[test]
    fn output_policy() {
        let root = tempfile::tempdir().unwrap();
        let input = root.path().join("model");
        fs::create_dir(&input).unwrap();
        fs::write(input.join("config.json"), b"{}").unwrap();
        let e = check_output(&input, "--out", true, &[("--model", &input)]).unwrap_err().to_string();
        assert!(e.contains("is the input --model"), "{e}");
        let e = check_output(&input.join("sub"), "--out", true, &[("--model", &input)]).unwrap_err().to_string();
        assert!(e.contains("lies inside the input --model"), "{e}");
        let e = check_output(root.path(), "--out", true, &[("--model", &input)]).unwrap_err().to_string();
        assert!(e.contains("contains the input"), "{e}");
        let busy = root.path().join("busy");
        fs::create_dir(&busy).unwrap();
        fs::write(busy.join("x"), b"").unwrap();
        let e = check_output(&busy, "--out", false, &[]).unwrap_err().to_string();
        assert!(e.contains("pass --overwrite"), "{e}");
        check_output(&busy, "--out", true, &[]).unwrap();
        check_output(&root.path().join("new"), "--out", false, &[]).unwrap();
        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        check_output(&empty, "--out", false, &[]).unwrap();
    }
}
