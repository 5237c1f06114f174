//! The worker threads every CPU kernel's parallel loop runs on.
//!
//! Written here rather than taken from rayon because of how a decode step uses threads: about
//! 300 kernel launches per token, each a few microseconds to a few tens of microseconds of work,
//! separated by a few microseconds of serial work. Rayon parks an idle worker after a few
//! microseconds of spinning, and a launch from outside its pool is injected and waited for on a
//! lock: every launch then paid one or two thread wake-ups (a 576 x 576 w4a16 decode matmul took
//! as long on two threads as on one). The workers here spin for [`SPIN`] after each launch before
//! parking, so the next launch of the step finds them awake, and the launching thread takes tasks
//! itself, so a worker that is slow to wake only helps less.
//!
//! [`for_each`] runs on this pool when called from a thread outside any rayon pool and the pool
//! is free. Called from inside a rayon pool (a test pinning a thread count with `install`) or
//! while the pool is busy (a nested loop, a second engine on another thread), it runs on rayon
//! instead: the same tasks, so the same results, since tasks never depend on which thread runs
//! them. The pool has as many threads as rayon's global pool (counting the launching thread),
//! fixed at its first use.

use crossbeam_utils::CachePadded;
use rayon::prelude::*;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking: longer than the serial gaps between a step's
/// launches and between decode steps, short enough that an idle server soon stops burning CPU.
const SPIN: Duration = Duration::from_millis(2);

/// `state` packs the current job's epoch (high bits), whether it is closed to workers joining
/// (`CLOSED`), and how many workers are inside it (low bits).
const CLOSED: u64 = 1 << 16;
const INSIDE: u64 = CLOSED - 1;
const EPOCH_SHIFT: u32 = 17;

/// Runs `task(i)` for every `i` in `0..tasks`, in parallel, returning when all have run. Each
/// task runs exactly once on some thread; a panic in a task is re-raised here after every task
/// has stopped.
pub fn for_each(tasks: usize, task: impl Fn(usize) + Sync) {
    match tasks {
        0 => return,
        1 => return task(0),
        _ => {}
    }
    if rayon::current_thread_index().is_some() {
        return (0..tasks).into_par_iter().for_each(&task);
    }
    let pool = pool();
    if pool.workers == 0 {
        return (0..tasks).for_each(task);
    }
    match pool.dispatch.try_lock() {
        // A panic re-raised by `run` poisons the lock but leaves the pool consistent.
        Ok(_) | Err(TryLockError::Poisoned(_)) => pool.run(tasks, &task),
        Err(TryLockError::WouldBlock) => (0..tasks).into_par_iter().for_each(&task),
    }
}

/// Threads a parallel loop started on the calling thread runs on (the caller included): what
/// kernels size their task split by.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `task(i, chunk)` for the chunks of `chunk_len` elements of `data` (the last may be
/// shorter), in parallel, as [`for_each`].
pub fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk_len = chunk_len.max(1);
    let len = data.len();
    let base = SharedSlice::new(data);
    for_each(len.div_ceil(chunk_len), |i| {
        let start = i * chunk_len;
        // SAFETY: chunks are disjoint, and each index runs exactly once.
        task(i, unsafe {
            base.slice(start..(start + chunk_len).min(len))
        })
    });
}

/// A mutable slice shared by parallel tasks that each write their own part of it.
pub struct SharedSlice<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: only disjoint parts are handed out (the caller of `slice` promises it), and the slice's
// elements may move between threads.
unsafe impl<T: Send> Send for SharedSlice<T> {}
unsafe impl<T: Send> Sync for SharedSlice<T> {}

impl<T> SharedSlice<T> {
    pub fn new(data: &mut [T]) -> SharedSlice<T> {
        SharedSlice {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }
    }

    /// # Safety
    /// No two live slices handed out may overlap. Panics if `range` is outside the slice.
    #[allow(clippy::mut_from_ref)] // Disjointness is the caller's promise, as above.
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len())
    }
}

struct Pool {
    /// Threads beside the launching one.
    workers: usize,
    /// Held by the thread running a job: one job at a time.
    dispatch: Mutex<()>,
    shared: &'static Shared,
}

struct Shared {
    state: CachePadded<AtomicU64>,
    /// The next task of the current job to hand out.
    next: CachePadded<AtomicUsize>,
    /// Written only while the job is closed and no worker is inside it.
    job: UnsafeCell<Job>,
    /// A panic of a worker's task, for the launching thread to re-raise.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the one dispatching thread only while no worker can read it (the
// job is closed and empty, see `Pool::run`), and read by workers only while inside an open job.
unsafe impl Sync for Shared {}

#[derive(Clone, Copy)]
struct Job {
    tasks: usize,
    /// The launching call's closure; valid while the job is open or has workers inside.
    task: *const (dyn Fn(usize) + Sync),
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: CachePadded::new(AtomicU64::new(CLOSED)),
            next: CachePadded::new(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job {
                tasks: 0,
                task: &|_| {},
            }),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut workers = 0;
        for i in 1..rayon::current_num_threads() {
            let spawned = std::thread::Builder::new()
                .name(format!("kernel-worker-{i}"))
                .spawn(move || shared.work());
            // Fewer threads than asked only makes loops slower, never wrong.
            if spawned.is_ok() {
                workers += 1;
            }
        }
        Pool {
            workers,
            dispatch: Mutex::new(()),
            shared,
        }
    })
}

impl Pool {
    /// Runs one job; the caller holds `dispatch`.
    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        let s = self.shared;
        let epoch = (s.state.load(Ordering::Acquire) >> EPOCH_SHIFT) + 1;
        // SAFETY: the previous job is closed with no worker inside (its `run` waited for that),
        // so no worker reads `job` until the store below opens the new one. The closure outlives
        // the job: this function returns only once the job is closed and empty again.
        unsafe {
            let task: *const (dyn Fn(usize) + Sync + '_) = task;
            *s.job.get() = Job {
                tasks,
                task: std::mem::transmute::<
                    *const (dyn Fn(usize) + Sync + '_),
                    *const (dyn Fn(usize) + Sync + 'static),
                >(task),
            };
        }
        s.next.store(0, Ordering::Relaxed);
        // SeqCst pairs with the parking worker's check of `state` (see `Shared::wait`).
        s.state.store(epoch << EPOCH_SHIFT, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _sleep = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| s.take_tasks(tasks, task)));
        // Every task is taken; close the job and wait for the workers still running theirs.
        s.state.fetch_or(CLOSED, Ordering::AcqRel);
        while s.state.load(Ordering::Acquire) & INSIDE != 0 {
            std::hint::spin_loop();
        }
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(panic) = theirs {
            resume_unwind(panic);
        }
    }
}

impl Shared {
    fn take_tasks(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= tasks {
                return;
            }
            task(i);
        }
    }

    /// A worker's life: wait for a job, join it if still open, take tasks until none are left.
    fn work(&self) {
        let mut seen = self.state.load(Ordering::Acquire) >> EPOCH_SHIFT;
        loop {
            let mut state = self.wait(seen);
            seen = state >> EPOCH_SHIFT;
            // Join unless the job closed (or a newer one opened) meanwhile.
            let joined = loop {
                if state >> EPOCH_SHIFT != seen || state & CLOSED != 0 {
                    break false;
                }
                match self.state.compare_exchange_weak(
                    state,
                    state + 1,
                    Ordering::Acquire,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break true,
                    Err(now) => state = now,
                }
            };
            if !joined {
                continue;
            }
            // SAFETY: inside an open job, `job` and its closure are valid until we leave.
            let job = unsafe { *self.job.get() };
            let ran = catch_unwind(AssertUnwindSafe(|| {
                self.take_tasks(job.tasks, unsafe { &*job.task })
            }));
            if let Err(panic) = ran {
                *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(panic);
            }
            self.state.fetch_sub(1, Ordering::Release);
        }
    }

    /// Waits until the job epoch differs from `seen`: spins for [`SPIN`], then parks.
    fn wait(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state >> EPOCH_SHIFT != seen {
                return state;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                break;
            }
        }
        let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // The dispatcher publishes the epoch before it reads `sleepers` (both SeqCst), so either
        // this load sees the new epoch or the dispatcher sees this sleeper and notifies under
        // the lock, which this thread holds until it waits.
        let state = loop {
            let state = self.state.load(Ordering::SeqCst);
            if state >> EPOCH_SHIFT != seen {
                break state;
            }
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_across_many_jobs() {
        for tasks in [2, 3, 17, 1000] {
            for _ in 0..200 {
                let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                for_each(tasks, |i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn jobs_after_the_workers_parked_still_run() {
        let sum = AtomicUsize::new(0);
        for_each(4, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 3);
        for_each(4, |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn concurrent_and_nested_loops_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 3);
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_goes_on() {
        let caught = catch_unwind(|| {
            for_each(64, |i| {
                if i == 63 {
                    panic!("task 63");
                }
            })
        });
        assert!(caught.is_err());
        let ran = AtomicUsize::new(0);
        for_each(64, |_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let mut data = vec![0u32; 1001];
        for_each_chunk_mut(&mut data, 64, |i, chunk| {
            for v in chunk.iter_mut() {
                *v += i as u32 + 1;
            }
        });
        for (j, v) in data.iter().enumerate() {
            assert_eq!(*v, (j / 64) as u32 + 1);
        }
    }
}
