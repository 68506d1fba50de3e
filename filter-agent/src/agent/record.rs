//! What an applied or refused policy leaves for the rest of the node, after
//! the kernel enforces it: the rule index `rules.json` (`filter-agent
//! stats` and `status`), the record reader's rule names, `/metrics`,
//! readiness and the "policy applied" line, in that order, so a reader of
//! the line finds the rest done.
//!
//! A thread of its own does it, one reload after another: for 10,000 rules
//! it takes about 20 ms, which the loop spends on the next change instead
//! (a change arriving meanwhile is no longer held back by the last one's
//! books).

use std::{
    path::PathBuf,
    sync::{mpsc, Arc},
    thread::JoinHandle,
};

use super::{Status, Took};
use crate::{compile::Compiled, events::reader::SharedNames, state::StateFile};

/// A policy the kernel enforces from its generation's flip.
pub(super) struct Applied {
    pub compiled: Compiled,
    pub generation: u32,
    /// (interface, index, XDP mode) of each attachment.
    pub attachments: Vec<(String, u32, &'static str)>,
    /// The LOG prefix template, where FelixConfiguration sets one.
    pub prefix: Option<String>,
    /// Seconds from the reload's start to the flip.
    pub took: f64,
    /// Where the load's time went.
    pub load: Took,
    /// Patching the inactive generation, and the entries it wrote.
    pub written: std::time::Duration,
    pub changed: usize,
}

/// A policy source refused; the last good policy stays.
pub(super) struct Refused {
    /// Seconds the reload took.
    pub took: f64,
    /// What `status` says: the first error and how many more.
    pub message: Option<String>,
}

enum Job {
    Applied(Box<Applied>),
    Refused(Refused),
}

/// The thread that keeps the books; [`Recorder::finish`] (or dropping it)
/// waits for what was sent.
pub(super) struct Recorder {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Recorder {
    /// Starts the thread. Without it the agent would never say it is
    /// ready, so failing to start it fails the agent's start.
    pub(super) fn start(
        state_dir: PathBuf,
        names: SharedNames,
        status: Status,
    ) -> std::io::Result<Recorder> {
        let (tx, rx) = mpsc::channel();
        let mut books = Books {
            state_dir,
            names,
            status,
            state: None,
        };
        let thread = std::thread::Builder::new()
            .name("filter-books".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Applied(a) => books.applied(*a),
                        Job::Refused(r) => books.refused(r),
                    }
                }
            })?;
        Ok(Recorder {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(super) fn applied(&self, a: Applied) {
        self.send(Job::Applied(Box::new(a)));
    }

    pub(super) fn refused(&self, r: Refused) {
        self.send(Job::Refused(r));
    }

    fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }

    /// Waits until everything sent is recorded.
    pub(super) fn finish(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish();
    }
}

struct Books {
    state_dir: PathBuf,
    names: SharedNames,
    status: Status,
    /// What `rules.json` says now (a refusal adds to it), shared with the
    /// record reader's names and the metrics.
    state: Option<Arc<StateFile>>,
}

impl Books {
    fn applied(&mut self, a: Applied) {
        let _span = tracing::info_span!("sync").entered();
        let mut state = crate::state::state(&a.compiled, a.generation, &a.attachments);
        state.last_apply = Some(crate::state::Event::now(a.took, None));
        let state = Arc::new(state);
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update(&state, a.prefix.as_deref());
        self.status
            .metrics
            .applied(true, a.took, Some(state.clone()));
        self.write(state);
        self.status.set_ready();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            generation = a.generation,
            rules = a.compiled.tables.iter().map(|t| t.rules.len()).sum::<usize>(),
            enforced_after_ms = a.took * 1e3,
            read_ms = ms(a.load.read),
            model_ms = ms(a.load.model),
            compile_ms = ms(a.load.compile),
            written_ms = ms(a.written),
            changed = a.changed,
            classes = a.compiled.classes.len(),
            endpoints = ?a.attachments,
            "policy applied"
        );
    }

    fn refused(&mut self, r: Refused) {
        let _span = tracing::info_span!("sync").entered();
        self.status.metrics.applied(false, r.took, None);
        // `status` says why, beside the policy that stayed.
        let kept = self.state.is_some();
        if let Some(held) = &self.state {
            let mut state = StateFile::clone(held);
            state.last_error = Some(crate::state::Event::now(r.took, r.message));
            self.write(Arc::new(state));
        }
        tracing::error!(kept, "policy rejected; the last good policy stays enforced");
    }

    /// Writes `rules.json` (and keeps it, to add a later refusal to it).
    fn write(&mut self, state: Arc<StateFile>) {
        if let Err(e) = crate::state::write_state(&self.state_dir, &state) {
            tracing::warn!(dir = %self.state_dir.display(), error = %e, "cannot write the rule index: stats and status will be unavailable");
        }
        self.state = Some(state);
    }
}
