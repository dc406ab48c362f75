//! Every file deltatune writes goes through here: write to a temporary file in the same directory,
//! fsync it, rename it over the target, fsync the directory. A crash or a full disk leaves either the
//! old file or the new one, never half of one.

use crate::error::{Error, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Serialises `value` as pretty JSON (with a final newline) and writes it atomically.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Json { file: path.to_path_buf(), msg: e.to_string() })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Runs `fill` on a temporary file and moves it into place only if `fill` and the fsync succeed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp); // best effort: the write already failed and is reported
        return Err(Error::io(path, e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Persist the rename itself. Directories cannot be opened for sync on every platform; ignore
    // only that case.
    if let Ok(d) = File::open(&dir) {
        d.sync_all().map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// Replaces directory `dst` by the fully written directory `staging` (same parent), so readers see
/// the old directory or the complete new one.
pub fn replace_dir(staging: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        let old = dst.with_extension(format!("old.{}", std::process::id()));
        fs::rename(dst, &old).map_err(|e| Error::io(dst, e))?;
        fs::rename(staging, dst).map_err(|e| Error::io(dst, e))?;
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        fs::rename(staging, dst).map_err(|e| Error::io(dst, e))?;
    }
    if let Some(parent) = dst.parent() {
        if let Ok(d) = File::open(parent) {
            d.sync_all().map_err(|e| Error::io(parent, e))?;
        }
    }
    Ok(())
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
}
