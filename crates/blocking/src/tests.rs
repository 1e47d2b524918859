use std::sync::atomic::{AtomicBool, AtomicUsize};

use super::*;

fn pool(threads: usize, tenant_threads: usize, queue: usize, tenant_queue: usize) -> BlockingPool {
    BlockingPool::new(PoolConfig { name: "test", threads, tenant_threads, queue, tenant_queue })
}

/// A job that runs until it is interrupted, counting how often it was.
fn until_interrupted(started: Arc<AtomicUsize>) -> impl FnOnce(&JobContext) -> Option<StopReason> + Send + 'static {
    move |ctx| {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        ctx.set_interrupt(move || flag.store(true, Ordering::SeqCst));
        started.fetch_add(1, Ordering::SeqCst);
        let give_up = Instant::now() + Duration::from_secs(20);
        while !stop.load(Ordering::SeqCst) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(1));
        }
        ctx.stop_reason()
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_job_runs_and_reports_its_cpu_time() {
    let pool = pool(2, 1, 8, 8);
    let done = pool
        .spawn("a", |_| {
            let until = thread_cpu_time() + Duration::from_millis(30);
            let mut spins = 0u64;
            while thread_cpu_time() < until {
                spins = spins.wrapping_add(1);
            }
            spins > 0
        })
        .unwrap()
        .await
        .unwrap();
    assert!(done.value);
    assert!(done.cpu_time >= Duration::from_millis(30), "{:?}", done.cpu_time);
    wait_for("the count", || pool.stats().completed_total == 1).await;
}

#[tokio::test]
async fn one_tenant_cannot_hold_every_thread_or_the_queue() {
    let pool = pool(4, 2, 16, 3);
    let started = Arc::new(AtomicUsize::new(0));
    // Tenant a: two running (its cap), three queued (its queue), the next refused.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(pool.spawn("a", until_interrupted(Arc::clone(&started))).unwrap());
    }
    wait_for("a's two jobs", || started.load(Ordering::SeqCst) == 2).await;
    for _ in 0..3 {
        held.push(pool.spawn("a", until_interrupted(Arc::clone(&started))).unwrap());
    }
    let refused = pool.spawn("a", |_| ()).err();
    assert_eq!(refused, Some(PoolError::TenantQueueFull { pool: "test", max: 3 }));
    assert!(refused.unwrap().to_string().contains("retry"));
    // Tenant b is not behind a's backlog: it runs at once on a free thread.
    let t = Instant::now();
    assert_eq!(pool.spawn("b", |_| 7).unwrap().await.unwrap().value, 7);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(started.load(Ordering::SeqCst), 2, "a never ran more than its cap");
    assert_eq!(pool.stats().queued, 3);
    // The queued ones first, so that none of them starts meanwhile.
    while let Some(job) = held.pop() {
        drop(job);
    }
    wait_for("the pool to empty", || {
        pool.stats() == PoolStats { rejected_total: 1, dropped_total: 3, completed_total: 3, ..Default::default() }
    })
    .await;
}

#[tokio::test]
async fn the_whole_queue_is_bounded_too() {
    let pool = pool(1, 1, 2, 2);
    let started = Arc::new(AtomicUsize::new(0));
    let _running = pool.spawn("a", until_interrupted(Arc::clone(&started))).unwrap();
    wait_for("the first job", || started.load(Ordering::SeqCst) == 1).await;
    let _q1 = pool.spawn("b", |_| ()).unwrap();
    let _q2 = pool.spawn("c", |_| ()).unwrap();
    assert_eq!(pool.spawn("d", |_| ()).err(), Some(PoolError::QueueFull { pool: "test", max: 2 }));
}

#[tokio::test]
async fn a_dropped_queued_job_never_runs() {
    let pool = pool(1, 1, 8, 8);
    let started = Arc::new(AtomicUsize::new(0));
    let blocker = pool.spawn("a", until_interrupted(Arc::clone(&started))).unwrap();
    wait_for("the blocker", || started.load(Ordering::SeqCst) == 1).await;
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    let queued = pool.spawn("b", move |_| flag.store(true, Ordering::SeqCst)).unwrap();
    assert_eq!(pool.stats().queued, 1);
    drop(queued);
    assert_eq!(pool.stats().queued, 0, "removed from the queue at once");
    drop(blocker);
    wait_for("the blocker to stop", || pool.stats().running == 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!ran.load(Ordering::SeqCst));
    assert_eq!(pool.stats().dropped_total, 1);
}

#[tokio::test]
async fn a_dropped_running_job_is_interrupted() {
    let pool = pool(1, 1, 8, 8);
    let started = Arc::new(AtomicUsize::new(0));
    let job = pool.spawn("a", until_interrupted(Arc::clone(&started))).unwrap();
    wait_for("the job", || started.load(Ordering::SeqCst) == 1).await;
    let t = Instant::now();
    drop(job);
    wait_for("the job to stop", || pool.stats().running == 0).await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The thread is free again.
    assert_eq!(pool.spawn("a", |_| 1).unwrap().await.unwrap().value, 1);
}

#[tokio::test]
async fn a_deadline_fires_the_interrupt_and_keeps_firing() {
    let pool = pool(1, 1, 8, 8);
    let t = Instant::now();
    let fired = pool
        .spawn("a", |ctx| {
            let count = Arc::new(AtomicUsize::new(0));
            let c = Arc::clone(&count);
            ctx.set_interrupt(move || {
                c.fetch_add(1, Ordering::SeqCst);
            });
            ctx.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
            // Ignores the first interrupts, as a job between two steps would.
            let give_up = Instant::now() + Duration::from_secs(10);
            while count.load(Ordering::SeqCst) < 3 && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(1));
            }
            (count.load(Ordering::SeqCst), ctx.stop_reason())
        })
        .unwrap()
        .await
        .unwrap()
        .value;
    assert_eq!(fired, (3, Some(StopReason::DeadlinePassed)));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn shutdown_drops_queued_jobs_and_interrupts_running_ones() {
    let pool = pool(1, 1, 8, 8);
    let started = Arc::new(AtomicUsize::new(0));
    let running = pool.spawn("a", until_interrupted(Arc::clone(&started))).unwrap();
    wait_for("the job", || started.load(Ordering::SeqCst) == 1).await;
    let queued = pool.spawn("b", |_| ()).unwrap();
    let t = Instant::now();
    pool.shutdown();
    assert_eq!(queued.await.err(), Some(PoolError::ShuttingDown));
    assert_eq!(running.await.unwrap().value, Some(StopReason::Shutdown));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(pool.spawn("c", |_| ()).err(), Some(PoolError::ShuttingDown));
}

#[tokio::test]
async fn a_panicking_job_is_an_error_and_the_thread_survives() {
    let pool = pool(1, 1, 8, 8);
    let failed = pool.spawn("a", |_| -> u8 { panic!("boom") }).unwrap().await;
    assert_eq!(failed.err(), Some(PoolError::Panicked { pool: "test" }));
    assert_eq!(pool.spawn("a", |_| 2).unwrap().await.unwrap().value, 2);
}
