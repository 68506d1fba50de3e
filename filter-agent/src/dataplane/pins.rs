//! Pins and adoption: the pin directory (bpffs, private), link pin names,
//! restoring pins someone removed, and what an agent leaves behind when it
//! exits.

use super::*;

/// Pin file of the link of `program` on interface `iface` (`ifindex`),
/// e.g. `fw_xdp@eth1@2`. bpffs refuses dots in names, so a VLAN's `eth0.100`
/// becomes `eth0_100`; the index keeps names unique, and is there because an
/// interface deleted and created again is a new attachment point.
pub(super) fn link_pin(dir: &Path, iface: &str, ifindex: u32, program: &str) -> PathBuf {
    dir.join(format!("{program}@{}@{ifindex}", iface.replace('.', "_")))
}

/// The map pinned as `name` under `pin_dir`, opened from another process
/// (a running agent's pins: counters, conntrack, `explain --dataplane`).
pub(super) fn open_map_pin(pin_dir: &Path, name: &'static str) -> Result<MapData, Error> {
    MapData::from_pin(pin_dir.join(name)).map_err(map_error(
        name,
        format!("open pin in {}", pin_dir.display()),
    ))
}

/// Unpins the maps a previous agent pinned under names this object does
/// not have: a map's name carries its layout's version
/// (`filter_common::names`), and one whose version was bumped is left to
/// no reader, its pin alone keeping its memory (the programs still
/// attached keep theirs alive until they are swapped for ours).
pub(super) fn remove_retired_map_pins(pin_dir: &Path, ebpf: &Ebpf) -> Result<(), Error> {
    let current: BTreeSet<&str> = ebpf.maps().map(|(name, _)| name).collect();
    unpin_where(pin_dir, "unpinning a map of an earlier layout", |path| {
        path.file_name()
            .map(|n| n.to_string_lossy())
            .is_some_and(|n| {
                n.starts_with("FW_") && !is_link_pin(path) && !current.contains(n.as_ref())
            })
    })
}

/// Where new programs' class arrays are pinned until their programs take
/// the links over ([`super::Dataplane::publish`]), then renamed to `name`.
pub(super) fn staging_pin(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(format!("{STAGING}{name}"))
}

const STAGING: &str = "new_";

/// Renames the sized maps' staging pins into place, each replacing the
/// pin of the same name in one step.
pub(super) fn unstage_pins(pin_dir: &Path) -> Result<(), Error> {
    for name in SIZED_MAPS {
        let (from, to) = (staging_pin(pin_dir, name), pin_dir.join(name));
        std::fs::rename(&from, &to).map_err(|source| Error::Fs {
            op: "rename",
            path: from,
            source,
        })?;
    }
    Ok(())
}

/// Unpins what a resize that did not finish left at its staging pins.
pub(super) fn remove_staging_pins(pin_dir: &Path) -> Result<(), Error> {
    unpin_where(pin_dir, "unpinning a class array a resize left", |path| {
        path.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(STAGING))
    })
}

/// Unpins each pin of `pin_dir` that `stale` picks, logging `why`.
pub(super) fn unpin_where(
    pin_dir: &Path,
    why: &str,
    stale: impl Fn(&Path) -> bool,
) -> Result<(), Error> {
    let entries = std::fs::read_dir(pin_dir).map_err(|source| Error::Fs {
        op: "read",
        path: pin_dir.to_path_buf(),
        source,
    })?;
    for e in entries.flatten() {
        let path = e.path();
        if stale(&path) {
            tracing::info!(pin = %path.display(), "{why}");
            std::fs::remove_file(&path).map_err(|source| Error::Fs {
                op: "unpin",
                path: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

/// Whether a pin in the pin directory is a link (see [`link_pin`]).
pub(super) fn is_link_pin(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().contains('@'))
}

/// Whether `pin_dir` holds a link's pin.
pub(super) fn has_link_pins(pin_dir: &Path) -> bool {
    std::fs::read_dir(pin_dir)
        .map(|entries| entries.flatten().any(|e| is_link_pin(&e.path())))
        .unwrap_or(false)
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory lives there and it is
/// not mounted (a fresh VM, or a container without the host's bpffs).
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    pub(super) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let is_bpffs =
        nix::sys::statfs::statfs(root).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if is_bpffs {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(|source| Error::Fs {
        op: "create",
        path: root.to_owned(),
        source,
    })?;
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Fs {
        op: "mount bpffs on",
        path: root.to_owned(),
        source: std::io::Error::from(e),
    })?;
    tracing::info!(path = %root.display(), "mounted bpffs");
    Ok(())
}

/// Unpins everything in `dir` (unlinking a bpffs entry is unpinning) and
/// removes the directory.
pub(super) fn remove_pins(dir: &Path) -> Result<(), Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Fs {
                op: "read",
                path: dir.to_owned(),
                source,
            })
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        std::fs::remove_file(&path).map_err(|source| Error::Fs {
            op: "unpin",
            path: path.clone(),
            source,
        })?;
    }
    std::fs::remove_dir(dir).map_err(|source| Error::Fs {
        op: "remove",
        path: dir.to_owned(),
        source,
    })
}

impl Dataplane {
    /// Pins again whatever pin has disappeared from the pin directory (a
    /// user or a careless script removed it): without its pins the next
    /// agent could not adopt the enforcement, and a removed link pin would
    /// let the attachment go when this agent exits. Returns the pins
    /// restored.
    pub fn restore_pins(&mut self) -> Result<Vec<PathBuf>, Error> {
        crate::private::ensure_dir(&self.pin_dir)?;
        let pin_err = |what: String| {
            move |e: aya::pin::PinError| Error::Load {
                what,
                source: Box::new(e),
            }
        };
        let mut restored = Vec::new();
        for name in &self.pinned_maps {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            if let Some(map) = self.ebpf.map(name) {
                map.pin(&path)
                    .map_err(pin_err(format!("re-pin map {name}")))?;
                restored.push(path);
            }
        }
        for name in ATTACHED_PROGRAMS {
            let path = self.pin_dir.join(name);
            if path.exists() {
                continue;
            }
            if let Some(prog) = self.ebpf.program_mut(name) {
                prog.pin(&path)
                    .map_err(pin_err(format!("re-pin program {name}")))?;
                restored.push(path);
            }
        }
        for a in self.attached.values_mut() {
            for i in 0..a.links.len() {
                if a.links[i].1.exists() {
                    continue;
                }
                // Pinning consumes the fd link; the pinned link it returns
                // holds the same attachment.
                let (link, path) = a.links.remove(i);
                let pinned = link
                    .pin(&path)
                    .map_err(pin_err(format!("re-pin link {}", path.display())))?;
                a.links.insert(i, (FdLink::from(pinned), path.clone()));
                restored.push(path);
            }
        }
        Ok(restored)
    }

    /// Detaches everything and removes the pins (`--detach-on-exit`).
    pub fn shutdown(mut self) -> Result<(), Error> {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n)?;
        }
        let dir = self.pin_dir.clone();
        drop(self);
        remove_pins(&dir)
    }

    /// Leaves programs attached and everything pinned: the node stays
    /// enforced, and the next agent adopts it all.
    pub fn leave(self) {
        tracing::info!(dir = %self.pin_dir.display(), "leaving programs attached and pinned for the next agent");
    }
}
