//! One elastic pool of inference threads shared by every loaded model version. A version owns
//! a bounded queue, not threads: an idle executor takes the next batch from the version whose
//! oldest job has waited longest for its size (its wait over the model's time per image),
//! among those under their cap (`runtime.workers`), so short jobs pass long ones, no model
//! starves, and a model nobody calls holds no thread. Each forward gets the cores divided among
//! the executors busy at that moment: a lone request runs on every core (the low-latency
//! split), a busy server one forward per core (the throughput split).
//!
//! Locking order: the pool's list, then a queue's jobs. A push takes the queue's lock, then
//! the pool's only to notify, so an executor checking for work under the pool's lock cannot
//! miss it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::admission::QueuedImages;
use super::backend::LoadedModel;
use super::policy::{strongest, threads_for, wait_for_size, Claim};
use super::batcher::run_jobs;
use super::{EngineError, Job};
use crate::metrics as m;
use crate::model_config::ModelConfig;

/// One version's queue of jobs, and what the executors need to run them.
pub struct ModelQueue {
    pub name: String,
    pub model: Arc<LoadedModel>,
    pub config: Arc<ModelConfig>,
    jobs: Mutex<VecDeque<Job>>,
    /// Signalled when a job arrives, for an executor gathering a batch.
    arrived: Condvar,
    queued_images: QueuedImages,
    /// Most executors this version may use at once.
    cap: AtomicUsize,
    /// Executors kept for this version whenever it has work (TorchServe's `min_worker`): while
    /// fewer than this run its batches, it goes before every version that has its share.
    reserved: AtomicUsize,
    running: AtomicUsize,
    /// Executors that picked this queue and have not yet taken their jobs. A queue is only
    /// picked while it holds more jobs than that, so a lone job wakes one executor, not two
    /// racing for it: two would take a lone request's forwards in turn, and a forward whose
    /// threads' OpenMP team sat idle runs slower (measured: BENCHMARKS.md, "Figures behind
    /// the code's choices").
    claimed: AtomicUsize,
    /// An executor is waiting (`max_delay_ms`) for more jobs to fill a batch: new jobs join it
    /// instead of starting another forward.
    gathering: AtomicBool,
    /// No handle is left: drain what is queued, then leave the pool.
    closed: AtomicBool,
}

impl ModelQueue {
    pub fn queued_images(&self) -> usize {
        self.queued_images.get()
    }

    pub fn queued_jobs(&self) -> usize {
        self.jobs.lock().unwrap().len()
    }

    pub fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    /// Executors running (or gathering) a batch of this version now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Sets the reservation and the cap together (the cap never below the reservation);
    /// returns the cap set.
    pub fn set_share(&self, reserved: usize, cap: usize) -> usize {
        let cap = cap.max(reserved).max(1);
        self.reserved.store(reserved, Ordering::Relaxed);
        self.cap.store(cap, Ordering::Relaxed);
        pool().notify();
        cap
    }

    /// Queues a job, or hands it back when the queue is full.
    pub fn push(&self, job: Job) -> Result<(), Job> {
        {
            let mut jobs = self.jobs.lock().unwrap();
            if jobs.len() >= self.config.batching.queue_capacity {
                return Err(job);
            }
            self.queued_images.add(job.images.len());
            jobs.push_back(job);
        }
        self.arrived.notify_all();
        pool().notify();
        Ok(())
    }

    pub fn is_full(&self) -> bool {
        self.jobs.lock().unwrap().len() >= self.config.batching.queue_capacity
    }

    fn pop(jobs: &mut VecDeque<Job>, queued_images: &QueuedImages) -> Option<Job> {
        let job = jobs.pop_front()?;
        queued_images.take(job.images.len());
        Some(job)
    }

    /// The first job and whatever else is queued, up to the batch size, waiting at most
    /// `max_delay_ms` for more.
    fn take_batch(&self) -> Vec<Job> {
        let max_batch = self.model.batch_bound;
        let max_delay = Duration::from_millis(self.config.batching.max_delay_ms);
        let deadline = Instant::now() + max_delay;
        let mut batch = Vec::new();
        let mut images = 0;
        let mut jobs = self.jobs.lock().unwrap();
        // Taken (or found gone): this executor's claim ends.
        self.claimed.fetch_sub(1, Ordering::Relaxed);
        loop {
            while images < max_batch.max(1) {
                match Self::pop(&mut jobs, &self.queued_images) {
                    Some(job) => {
                        images += job.images.len();
                        batch.push(job);
                    }
                    None => break,
                }
            }
            let now = Instant::now();
            if batch.is_empty() || images >= max_batch || max_delay.is_zero() || now >= deadline {
                break;
            }
            self.gathering.store(true, Ordering::Relaxed);
            jobs = self.arrived.wait_timeout(jobs, deadline - now).unwrap().0;
        }
        self.gathering.store(false, Ordering::Relaxed);
        batch
    }
}

/// A version's place in the pool; the queue closes when the last handle is dropped.
pub struct Registration {
    pub queue: Arc<ModelQueue>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Relaxed);
        pool().notify();
    }
}

pub struct Pool {
    queues: Mutex<Vec<Arc<ModelQueue>>>,
    work: Condvar,
    executors: usize,
    busy: AtomicUsize,
    cores: usize,
    /// Which executors are looking for work. The lowest idle one takes the next batch, so a
    /// lone stream of requests stays on one thread and its OpenMP team (moving a forward of
    /// several threads between threads made mobilenet_v2's lone requests 1.3× slower here).
    idle: Vec<AtomicBool>,
}

static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
static EXECUTORS: OnceLock<usize> = OnceLock::new();

/// Sets how many executors the pool has (`--inference-threads`); call it before any model
/// loads. Unset, the pool has one executor per core.
pub fn set_inference_threads(threads: usize) {
    let _ = EXECUTORS.set(threads.max(1));
}

/// How many executors the pool has (or will have once started).
pub fn inference_thread_count() -> usize {
    *EXECUTORS.get_or_init(cores)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The process's pool, started on first use.
pub fn pool() -> &'static Arc<Pool> {
    POOL.get_or_init(|| {
        let executors = *EXECUTORS.get_or_init(cores);
        let pool = Arc::new(Pool {
            queues: Mutex::new(Vec::new()),
            work: Condvar::new(),
            executors,
            busy: AtomicUsize::new(0),
            cores: cores(),
            idle: (0..executors).map(|_| AtomicBool::new(false)).collect(),
        });
        for index in 0..executors {
            let pool = Arc::clone(&pool);
            std::thread::Builder::new()
                .name(format!("executor-{index}"))
                .spawn(move || pool.executor_loop(index))
                .expect("spawning an inference executor");
        }
        pool
    })
}

impl Pool {
    pub fn executors(&self) -> usize {
        self.executors
    }

    fn notify(&self) {
        let _list = self.queues.lock().unwrap();
        self.work.notify_all();
    }

    /// Adds a version's queue; `cap` bounds the executors it may use at once (`None`: all).
    pub fn register(&self, name: &str, model: Arc<LoadedModel>, config: Arc<ModelConfig>, cap: Option<usize>) -> Arc<Registration> {
        let queue = Arc::new(ModelQueue {
            name: name.to_string(),
            model,
            config,
            jobs: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            queued_images: QueuedImages::default(),
            cap: AtomicUsize::new(cap.unwrap_or(self.executors).max(1)),
            reserved: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            claimed: AtomicUsize::new(0),
            gathering: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        self.queues.lock().unwrap().push(Arc::clone(&queue));
        Arc::new(Registration { queue })
    }

    /// The queue whose oldest job has waited longest *for its size*: its wait divided by the
    /// model's recent time per image, among those with work, under their cap and with no
    /// executor already gathering a batch for them. Oldest-first alone is fair per request
    /// in milliseconds, so a 10 ms classifier waits behind 50 ms detectors as long as they do;
    /// waiting measured in units of one's own work lets short jobs pass long ones, while a long
    /// one's claim still grows with every millisecond, so none starves. (It cannot undo a long
    /// batched forward already running: executors are not preempted.)
    ///
    /// A version below its reservation (`min_worker`) goes first, whatever the others waited.
    fn pick(queues: &[Arc<ModelQueue>]) -> Option<Arc<ModelQueue>> {
        let now = Instant::now();
        let candidates: Vec<(Claim, &Arc<ModelQueue>)> = queues
            .iter()
            .filter(|q| q.running.load(Ordering::Relaxed) < q.cap() && !q.gathering.load(Ordering::Relaxed))
            .filter_map(|q| {
                let jobs = q.jobs.lock().unwrap();
                // Jobs left for this executor once those already claimed are taken.
                if jobs.len() <= q.claimed.load(Ordering::Relaxed) {
                    return None;
                }
                let waited = now.saturating_duration_since(jobs.front()?.enqueued_at);
                let claim = Claim {
                    reserved: q.running.load(Ordering::Relaxed) < q.reserved(),
                    wait_for_size: wait_for_size(waited, q.model.service.per_image()),
                };
                Some((claim, q))
            })
            .collect();
        let best = strongest(candidates.iter().map(|(claim, _)| *claim))?;
        Some(Arc::clone(candidates[best].1))
    }

    fn executor_loop(&self, index: usize) {
        let _span = tracing::info_span!("executor", index).entered();
        // Grad mode is per thread: off once, here.
        let _no_grad = tch::no_grad_guard();
        thread_local!(static THREADS: Cell<usize> = const { Cell::new(0) });
        loop {
            let queue = {
                let mut queues = self.queues.lock().unwrap();
                self.idle[index].store(true, Ordering::Relaxed);
                loop {
                    // A closed queue leaves once drained and idle.
                    queues.retain(|q| {
                        !(q.closed.load(Ordering::Relaxed) && q.running.load(Ordering::Relaxed) == 0 && q.jobs.lock().unwrap().is_empty())
                    });
                    let lower_idle = self.idle[..index].iter().any(|i| i.load(Ordering::Relaxed));
                    if !lower_idle {
                        if let Some(queue) = Self::pick(&queues) {
                            queue.running.fetch_add(1, Ordering::Relaxed);
                            queue.claimed.fetch_add(1, Ordering::Relaxed);
                            self.idle[index].store(false, Ordering::Relaxed);
                            // More work may wait for the next executor up.
                            self.work.notify_all();
                            break queue;
                        }
                    }
                    queues = self.work.wait(queues).unwrap();
                }
            };
            let busy = self.busy.fetch_add(1, Ordering::Relaxed) + 1;
            let own = queue.config.runtime.intra_op_threads;
            let threads = threads_for(own, self.cores, busy);
            THREADS.with(|current| {
                if current.get() != threads {
                    tch::set_num_threads(threads as i32);
                    current.set(threads);
                }
            });
            // A panic outside the guarded forward pass drops the jobs it held (their callers
            // answer 500); the executor carries on.
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                let jobs = queue.take_batch();
                let jobs = skip_gone(&queue.name, jobs);
                if !jobs.is_empty() {
                    run_jobs(&queue.name, &queue.model, &queue.config, jobs);
                }
            }));
            if outcome.is_err() {
                // A panic while gathering must not leave the model looking gathered for ever.
                queue.gathering.store(false, Ordering::Relaxed);
                metrics::counter!(m::EXECUTOR_PANICS, "model" => queue.name.clone()).increment(1);
                tracing::error!(model = %queue.name, "inference executor panicked; it carries on");
            }
            self.busy.fetch_sub(1, Ordering::Relaxed);
            queue.running.fetch_sub(1, Ordering::Relaxed);
            self.notify();
        }
    }
}

/// A client that has gone, or whose deadline passed, gets no computation.
fn skip_gone(name: &str, jobs: Vec<Job>) -> Vec<Job> {
    let now = Instant::now();
    let mut kept = Vec::with_capacity(jobs.len());
    for job in jobs {
        let reason = if job.reply.is_closed() {
            "disconnected"
        } else if job.deadline <= now {
            "deadline"
        } else {
            kept.push(job);
            continue;
        };
        metrics::counter!(m::JOBS_SKIPPED, "model" => name.to_string(), "reason" => reason).increment(1);
        tracing::debug!(parent: &job.span, reason, "job skipped before its forward pass");
        // Said, not left to a dropped channel: a caller whose timer has not fired yet would
        // otherwise read the closed channel as a worker that died (500 instead of 504).
        let _ = job.reply.send(Err(EngineError::DeadlineExceeded));
    }
    kept
}
