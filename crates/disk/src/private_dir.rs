//! The data directory and the stores in it must be Cordon's alone: a
//! directory that another user can write lets that user delete the master
//! key or a store, replace a file, or put an old copy of a row back. Every
//! command that opens them checks first, and refuses with the fix.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// A directory that is not private to Cordon's user.
#[derive(Debug, thiserror::Error)]
#[error(
    "the directory {} is {problem}; another user could delete or replace Cordon's keys and stores in it, or roll \
     their rows back. Fix it with `chown $(id -u) {0} && chmod 700 {0}`",
    path.display()
)]
pub struct NotPrivate {
    pub path: PathBuf,
    pub problem: String,
}

/// Checks that `dir` is a directory (not a symlink to one), owned by the
/// user this process runs as, and writable by nobody else. A directory
/// that does not exist passes: whoever creates it creates it 0700.
pub fn check(dir: &Path) -> Result<(), NotPrivate> {
    let not_private = |problem: String| Err(NotPrivate { path: dir.to_path_buf(), problem });
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return not_private(format!("not readable ({e})")),
    };
    if !meta.is_dir() {
        return not_private("not a directory (a symlink or a file)".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return not_private(format!("owned by uid {} rather than Cordon's uid {me}", meta.uid()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return not_private(format!("writable by group or others (mode {mode:04o})"));
    }
    Ok(())
}

/// [`check`] on the data directory and on the stores' directories in it
/// (`kv`, `sql`).
pub fn check_data_dir(data_dir: &Path) -> Result<(), NotPrivate> {
    check(data_dir)?;
    for store in crate::STORE_DIRS {
        check(&data_dir.join(store))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_of_our_own_that_nobody_else_can_write_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        assert!(check_data_dir(&data).is_ok(), "a missing directory is created private later");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_data_dir(&data).is_ok());
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_data_dir(&data).is_ok(), "readable is not writable");

        for mode in [0o777, 0o770, 0o702] {
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(mode)).unwrap();
            let msg = check_data_dir(&data).unwrap_err().to_string();
            assert!(msg.contains("writable by group or others") && msg.contains(&format!("chmod 700 {}", data.display())), "{msg}");
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();

        // A store directory beside it counts as much.
        let kv = data.join("kv");
        std::fs::create_dir(&kv).unwrap();
        std::fs::set_permissions(&kv, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(check_data_dir(&data).unwrap_err().path, kv);
        std::fs::set_permissions(&kv, std::fs::Permissions::from_mode(0o700)).unwrap();

        // A symlink is not the directory it points at.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(check(&link).unwrap_err().problem.contains("not a directory"));
    }
}
