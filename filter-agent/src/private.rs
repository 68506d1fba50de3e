//! Directories only this agent may touch: the pin directory (its maps,
//! programs and links) and the state directory (`rules.json`).
//!
//! bpffs is mode 1777 on many hosts, so any local user could create the
//! pin directory first and later delete every pin in it, or read what the
//! agent writes. A directory the agent creates is mode 0700; one it finds
//! must be a real directory owned by the agent's user and writable by no
//! one else, or the agent refuses to start (docs/threat-model.md).

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Why a directory is not private.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct NotPrivate {
    /// The directory.
    pub path: PathBuf,
    /// What is wrong with it, and what to do.
    pub reason: String,
}

/// Creates `dir` (mode 0700) or checks an existing one: a directory, not
/// a symlink, owned by this process's user, not writable by group or
/// others. Group- or other-readable is tightened to 0700.
pub fn ensure_dir(dir: &Path) -> Result<(), NotPrivate> {
    let fail = |reason: String| NotPrivate {
        path: dir.to_owned(),
        reason,
    };
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(fail(format!("cannot create: {e}")));
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| fail(format!("cannot stat: {e}")))?;
    if !meta.file_type().is_dir() {
        return Err(fail(
            "is not a directory (a symlink or a file); remove it".into(),
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(fail(format!(
            "owned by uid {}, not by this agent's uid {me}: that user could remove or replace what is in it; remove the directory or chown it",
            meta.uid()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(fail(format!(
            "writable by group or others (mode {mode:o}): remove the directory or chmod it 0700"
        )));
    }
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("cannot chmod 0700: {e}")))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` readable by its owner only (0600), through a
/// temporary file and a rename, so readers never see half a file.
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("fw-private-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn a_new_directory_is_0700() {
        let d = scratch("new").join("a/b");
        ensure_dir(&d).expect("created");
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let _ = std::fs::remove_dir_all(scratch("new"));
    }

    #[test]
    fn a_world_writable_directory_is_refused_and_a_readable_one_tightened() {
        let d = scratch("open");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let e = ensure_dir(&d).expect_err("world-writable");
        assert!(e.reason.contains("writable by group or others"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_dir(&d).expect("readable is fine, tightened");
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_symlink_is_refused() {
        let d = scratch("link");
        std::fs::create_dir_all(&d).expect("mkdir");
        let l = d.join("pins");
        std::os::unix::fs::symlink(&d, &l).expect("symlink");
        let e = ensure_dir(&l).expect_err("symlink");
        assert!(e.reason.contains("not a directory"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn state_files_are_0600() {
        let d = scratch("file");
        ensure_dir(&d).expect("dir");
        let f = d.join("rules.json");
        write_file(&f, b"{}").expect("write");
        let mode = std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&f).expect("read"), b"{}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
