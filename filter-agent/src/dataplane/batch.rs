//! Batched map updates: many entries per `bpf(2)` call
//! (`BPF_MAP_UPDATE_BATCH`, Linux 5.6; hashes and arrays). A policy's host
//! addresses and class words are most of what a generation writes, one
//! syscall each through aya 0.16, which has no batch call; in batches the
//! write is several times faster.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{Map, MapData, MapError},
    sys::SyscallError,
    Ebpf,
};

use super::{map_error, Error};

/// `BPF_MAP_UPDATE_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// `BPF_MAP_DELETE_BATCH`.
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per call: the kernel copies keys and values in per call, so a
/// bounded batch keeps its temporary memory small.
const CHUNK: usize = 16_384;

/// `union bpf_attr`'s member for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i]` → `values[i]` into the hash or array map `name` (flags
/// 0: insert or replace), a chunk per call. On failure, the error of the
/// call that failed; entries before it are written (the caller's
/// generation is inactive, and cleared again before its next use).
pub(super) fn update<K: aya::Pod + Sync, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    keys: &[K],
    values: &[V],
) -> Result<(), Error> {
    assert_eq!(keys.len(), values.len(), "a value per key");
    // SAFETY: plain data (`Pod`), viewed as its bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    };
    update_bytes(ebpf, name, keys, bytes, std::mem::size_of::<V>())
}

/// Zeroes entries `keys` of the per-CPU array `name` on every CPU.
pub(super) fn zero_per_cpu(ebpf: &Ebpf, name: &'static str, keys: &[u32]) -> Result<(), Error> {
    let (map, per_key) = per_cpu(ebpf, name)?;
    zero_keys(name, map.fd().as_fd().as_raw_fd(), per_key, keys)
}

/// [`zero_per_cpu`] on a thread of its own once `after` has passed: for
/// counters of a generation just retired, which packets that read it
/// before the flip may still be counting into, and which nothing needs
/// until it is patched again. `None` where no thread could be started.
pub(super) fn zero_per_cpu_after(
    ebpf: &Ebpf,
    name: &'static str,
    keys: Vec<u32>,
    after: std::time::Duration,
) -> Option<std::thread::JoinHandle<Result<(), Error>>> {
    let (map, per_key) = per_cpu(ebpf, name).ok()?;
    // The thread's own handle on the map, valid however long it runs.
    let fd = map.fd().as_fd().try_clone_to_owned().ok()?;
    std::thread::Builder::new()
        .name("filter-zero".into())
        .spawn(move || {
            std::thread::sleep(after);
            zero_keys(name, fd.as_raw_fd(), per_key, &keys)
        })
        .ok()
}

/// The per-CPU array `name` and the length of one key's value: one slot
/// per possible CPU, each rounded up to 8 bytes (the kernel's layout).
fn per_cpu<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<(&'a MapData, usize), Error> {
    if !matches!(ebpf.map(name), Some(Map::PerCpuArray(_))) {
        return Err(map_error(name, "find")(MapError::InvalidName {
            name: name.into(),
        }));
    }
    let map = data(ebpf, name)?;
    let info = map.info().map_err(map_error(name, "info"))?;
    if info.key_size() as usize != std::mem::size_of::<u32>() {
        return Err(map_error(name, "batch update")(MapError::InvalidKeySize {
            size: std::mem::size_of::<u32>(),
            expected: info.key_size() as usize,
        }));
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
        map_error(name, "count CPUs")(MapError::SyscallError(SyscallError {
            call: "nr_cpus",
            io_error: e,
        }))
    })?;
    Ok((
        map,
        (info.value_size() as usize).next_multiple_of(8) * cpus.get() as usize,
    ))
}

/// Zeroes `keys` of the per-CPU array `fd` whose values are `per_key`
/// bytes, a chunk per call.
fn zero_keys(
    name: &'static str,
    fd: std::os::fd::RawFd,
    per_key: usize,
    keys: &[u32],
) -> Result<(), Error> {
    let zeros = vec![0u8; per_key * keys.len().min(CHUNK)];
    for k in keys.chunks(CHUNK) {
        call(name, BPF_MAP_UPDATE_BATCH, fd, k, zeros.as_ptr())?;
    }
    Ok(())
}

/// [`update`] with the values as `value_len`-byte slots of `values`.
fn update_bytes<K: aya::Pod + Sync>(
    ebpf: &Ebpf,
    name: &'static str,
    keys: &[K],
    values: &[u8],
    value_len: usize,
) -> Result<(), Error> {
    assert_eq!(values.len(), keys.len() * value_len, "a value per key");
    let map = data(ebpf, name)?;
    let info = map.info().map_err(map_error(name, "info"))?;
    let per_cpu = matches!(ebpf.map(name), Some(Map::PerCpuArray(_)));
    let expected = if per_cpu {
        value_len
    } else {
        info.value_size() as usize
    };
    if info.key_size() as usize != std::mem::size_of::<K>() || value_len != expected {
        return Err(map_error(name, "batch update")(
            MapError::InvalidValueSize {
                size: value_len,
                expected,
            },
        ));
    }
    let fd = map.fd().as_fd().as_raw_fd();
    calls(name, BPF_MAP_UPDATE_BATCH, fd, keys, values, value_len)
}

/// Deletes `keys` from the hash map `name`, a chunk per call. Every key
/// must be there (the kernel stops at the first it does not find).
pub(super) fn delete<K: aya::Pod + Sync>(
    ebpf: &Ebpf,
    name: &'static str,
    keys: &[K],
) -> Result<(), Error> {
    let map = data(ebpf, name)?;
    let info = map.info().map_err(map_error(name, "info"))?;
    if info.key_size() as usize != std::mem::size_of::<K>() {
        return Err(map_error(name, "batch delete")(MapError::InvalidKeySize {
            size: std::mem::size_of::<K>(),
            expected: info.key_size() as usize,
        }));
    }
    let fd = map.fd().as_fd().as_raw_fd();
    calls(name, BPF_MAP_DELETE_BATCH, fd, keys, &[], 0)
}

/// Entries from which [`calls`] splits a write over two threads.
const PARALLEL_AT: usize = 2 * CHUNK;

/// `cmd` on `keys` (and `values`, `value_len` bytes each; none for a
/// delete) of map `fd`, a chunk per call: on this thread for a small
/// write, else each half on a thread of its own
/// ([`crate::on_two_threads`]). A full reload of 100,000 host addresses
/// is 100,000 hash deletes and as many inserts, most of its write; the
/// kernel locks a hash bucket, not the map, so two CPUs do them at once.
/// On failure, the error of a call that failed (its half's entries before
/// it are written; see [`update`]).
fn calls<K: Sync>(
    name: &'static str,
    cmd: libc::c_long,
    fd: std::os::fd::RawFd,
    keys: &[K],
    values: &[u8],
    value_len: usize,
) -> Result<(), Error> {
    let run = |keys: &[K], values: &[u8]| {
        keys.chunks(CHUNK).enumerate().try_for_each(|(i, k)| {
            let v = match values.get(i * CHUNK * value_len..) {
                Some(v) if value_len > 0 => v.as_ptr(),
                _ => std::ptr::null(),
            };
            call(name, cmd, fd, k, v)
        })
    };
    if keys.len() < PARALLEL_AT {
        return run(keys, values);
    }
    let (k1, k2) = keys.split_at(keys.len() / 2);
    let (v1, v2) = values.split_at((keys.len() / 2) * value_len);
    let (a, b) = crate::on_two_threads(|| run(k1, v1), || run(k2, v2));
    a.and(b)
}

/// One batch command on `keys` (and `values`, or null) of map `fd`.
fn call<K>(
    name: &'static str,
    cmd: libc::c_long,
    fd: std::os::fd::RawFd,
    keys: &[K],
    values: *const u8,
) -> Result<(), Error> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is the batch member of `union bpf_attr`, its size
    // passed (the kernel zero-fills the rest); `keys` (and `values`)
    // point at `count` keys (and values) of the sizes the map was created
    // with (checked by the callers), alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        let io_error = std::io::Error::last_os_error();
        let call = if cmd == BPF_MAP_DELETE_BATCH {
            "bpf_map_delete_batch"
        } else {
            "bpf_map_update_batch"
        };
        return Err(map_error(name, "batch")(MapError::SyscallError(
            SyscallError { call, io_error },
        )));
    }
    Ok(())
}

/// The data of hash, array or per-CPU array map `name` (what is batched
/// here).
fn data<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a MapData, Error> {
    match ebpf.map(name) {
        Some(Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d)) => Ok(d),
        _ => Err(map_error(name, "find")(MapError::InvalidName {
            name: name.into(),
        })),
    }
}

/// Stores `byte` at each of `offsets` in the values of the array map
/// `name` (created `BPF_F_MMAPABLE`), one byte store each through a
/// shared mapping of them. For maps whose entries hold several slots that
/// the programs store into byte by byte meanwhile: an update through the
/// syscall would write the whole entry back, and with it an older copy of
/// the slots beside.
pub(super) fn store_bytes(
    ebpf: &Ebpf,
    name: &'static str,
    offsets: &[u32],
    byte: u8,
) -> Result<(), Error> {
    store_bytes_in(data(ebpf, name)?, name, offsets, byte)
}

/// [`store_bytes`] into an array map already open.
pub(super) fn store_bytes_in(
    map: &MapData,
    name: &'static str,
    offsets: &[u32],
    byte: u8,
) -> Result<(), Error> {
    use std::sync::atomic::{AtomicU8, Ordering};
    if offsets.is_empty() {
        return Ok(());
    }
    let mapping = Mapping::new(map, name)?;
    let bytes = mapping.atomics::<AtomicU8>();
    if let Some(&index) = offsets.iter().find(|&&at| at as usize >= bytes.len()) {
        return Err(map_error(name, "store")(MapError::OutOfBounds {
            index,
            max_entries: bytes.len() as u32,
        }));
    }
    for &at in offsets {
        // An atomic store is the byte store the programs do too.
        bytes[at as usize].store(byte, Ordering::Relaxed);
    }
    Ok(())
}

/// A shared mapping of the values of an array map created
/// `BPF_F_MMAPABLE`, unmapped when dropped. The programs read and write
/// the same memory meanwhile, so it is handed out only as atomics.
pub(super) struct Mapping {
    base: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    pub(super) fn new(map: &MapData, name: &'static str) -> Result<Mapping, Error> {
        let info = map.info().map_err(map_error(name, "info"))?;
        let len = info.max_entries() as usize * info.value_size().next_multiple_of(8) as usize;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared mapping of the map's `len` bytes of values
        // (offset 0 of an mmapable array's file), unmapped on drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(map_error(name, "map into memory")(MapError::SyscallError(
                SyscallError {
                    call: "mmap",
                    io_error: std::io::Error::last_os_error(),
                },
            )));
        }
        Ok(Mapping { base, len })
    }

    /// The mapping as atomics of type `A` (`AtomicU8`, `AtomicU64`).
    pub(super) fn atomics<A>(&self) -> &[A] {
        // SAFETY: the mapping is page-aligned and `len` bytes long, and
        // lives as long as the slice; atomics may alias the programs'
        // accesses, which are single loads and stores of their size.
        unsafe {
            std::slice::from_raw_parts(self.base.cast::<A>(), self.len / std::mem::size_of::<A>())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer borrowed.
        unsafe { libc::munmap(self.base, self.len) };
    }
}
