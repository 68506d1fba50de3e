//! Where resources come from: a watched policy directory.
//!
//! Any change under the directory (create, write, rename, delete) wakes the
//! agent, which reloads the whole directory: the store is small, and a full
//! reload can never miss an edit that a per-file cache could.

use std::path::Path;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Watches `dir`; each change sends `()` on the returned channel. Keep the
/// watcher alive as long as changes should arrive.
pub fn watch(
    dir: &Path,
) -> notify::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            if !e.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok((watcher, rx))
}
