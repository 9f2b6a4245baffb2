//! Replacing a file so that a crash or power loss leaves the old contents or the new, never
//! a torn or empty file: write a temporary file beside it, fsync it, rename it over the old
//! one, fsync the directory (the rename is only durable once the directory is). Without the
//! two fsyncs a crash soon after a rename can leave a zero-length file on ext4 and XFS.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Replaces `path` with `bytes`, durably. The file keeps its permission bits if it exists;
/// a new one gets `mode`. The temporary file is `<name>.tmp` in the same directory (a rename
/// is atomic only within one file system), removed if anything fails.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temporary(path);
    let mode = fs::metadata(path).map_or(mode, |m| m.permissions().mode() & 0o7777);
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask applied at creation; and an old temporary file kept its mode.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(path)
}

/// Fsyncs the directory holding `path`, which makes a rename or creation in it durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_keeps_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        replace(&path, b"first", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        replace(&path, b"second", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "an existing file keeps its mode"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["policy.toml"], "no temporary file is left");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        replace(&path, b"old", 0o644).unwrap();
        // The temporary name taken by a directory: the write fails before any rename.
        fs::create_dir(dir.path().join("status.json.tmp")).unwrap();
        assert!(replace(&path, b"new", 0o644).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
    }
}
