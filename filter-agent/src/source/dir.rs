//! Where resources come from: a watched policy directory.
//!
//! Any change under the directory (create, write, rename, delete) wakes the
//! agent, which reloads the whole directory: the store is small, and a full
//! reload can never miss an edit that a per-file cache could. The watch
//! follows the directory's path, not its inode: a directory replaced (moved
//! away and created again, as deployment tools and ConfigMap updates do)
//! is watched anew once [`DirWatch::refresh`] notices.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// A watch on one policy directory.
pub struct DirWatch {
    dir: PathBuf,
    /// (device, inode) of the directory watched.
    identity: Option<(u64, u64)>,
    watcher: notify::RecommendedWatcher,
    tx: mpsc::UnboundedSender<()>,
}

fn identity(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

fn watcher_for(
    dir: &Path,
    tx: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            if !e.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok(watcher)
}

/// Watches `dir`; each change sends `()` on `tx`. Keep the watch alive as
/// long as changes should arrive.
pub fn watch(dir: &Path, tx: mpsc::UnboundedSender<()>) -> notify::Result<DirWatch> {
    let watcher = watcher_for(dir, tx.clone())?;
    Ok(DirWatch {
        dir: dir.to_owned(),
        identity: identity(dir),
        watcher,
        tx,
    })
}

impl DirWatch {
    /// Watches the directory now at the path if it is not the one watched
    /// (replaced, or back after being removed), and then sends a change.
    /// Returns whether it did. A directory that is gone keeps the old watch
    /// until one is there again.
    pub fn refresh(&mut self) -> bool {
        let now = identity(&self.dir);
        if now.is_none() || now == self.identity {
            return false;
        }
        match watcher_for(&self.dir, self.tx.clone()) {
            Ok(w) => {
                self.watcher = w;
                self.identity = now;
                let _ = self.tx.send(());
                true
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the new policy directory yet");
                false
            }
        }
    }
}
