//! filter-agent: Calico v3 host-endpoint policy, enforced with XDP and TC.
//!
//! Modules follow the data's way: [`model`] (YAML → validated resources) →
//! [`selector`] → [`compile`] (resources → classifier tables, pure) →
//! [`dataplane`] (tables → kernel maps, programs attached); [`source`] feeds
//! the model (a watched directory, the Kubernetes API); [`agent`] is the
//! daemon's loop; [`cli`] parses the command line around it.

pub mod agent;
pub mod cli;
pub mod compile;
pub mod dataplane;
pub mod events;
pub mod fuzzing;
pub mod model;
pub mod node;
pub mod private;
pub mod reference;
pub mod selector;
pub mod source;
pub mod state;

/// Drops `garbage` on a thread of its own: freeing what a reload replaced
/// (a big policy's last parse is hundreds of thousands of allocations)
/// need not delay what it enforces. Should no thread start, the closure,
/// garbage and all, is dropped here with the error, as it would have been.
pub fn drop_aside<T: Send + 'static>(garbage: T) {
    let _ = std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || drop(garbage));
}

/// `here` on this thread and `there` on a second one, at once: the two
/// halves of a full reload's parse, typing or classification. Should no
/// thread start, `there` runs here after `here`; a panic in either is
/// this thread's.
pub fn on_two_threads<A, B: Send>(
    here: impl FnOnce() -> A,
    there: impl Fn() -> B + Sync,
) -> (A, B) {
    std::thread::scope(|s| {
        let helper = std::thread::Builder::new().spawn_scoped(s, &there).ok();
        let a = here();
        let b = match helper.map(|h| h.join()) {
            Some(Ok(b)) => b,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => there(),
        };
        (a, b)
    })
}

/// `f` over `items`, in order: on this thread alone below `at_least`
/// items, else each half on a thread of its own (see [`on_two_threads`]).
/// What a full reload does once per rule of a big policy pays for a
/// second thread; a small reload's thread would cost more than it saves.
pub fn map_in_halves<T: Sync, U: Send>(
    items: &[T],
    at_least: usize,
    f: impl Fn(&T) -> U + Sync,
) -> Vec<U> {
    let half = |items: &[T]| items.iter().map(&f).collect::<Vec<U>>();
    if items.len() < at_least {
        return half(items);
    }
    let (first, second) = items.split_at(items.len() / 2);
    let (mut out, rest) = on_two_threads(|| half(first), || half(second));
    out.extend(rest);
    out
}

/// Items of per-rule work (typing, resolving) before [`map_in_halves`]
/// starts a second thread: a rule's work is a few microseconds, starting
/// a thread tens of them. Small in unit tests, so that they take the two-thread
/// way too.
pub const PARALLEL_AT: usize = if cfg!(test) { 2 } else { 256 };
