//! Where SQL texts are classified, so that no tenant's text can hold a thread another tenant needs.
//!
//! [`Classifier::classify`] classifies a text on the caller's thread only when a cheap measurement
//! says it is cheap ([`classify::classify_inline`]: at most
//! [`INLINE_MAX_TEXT_BYTES`](classify::INLINE_MAX_TEXT_BYTES), a few statements, a small parse
//! cost), which is every ordinary query. Anything else goes to a small pool of dedicated threads
//! with large stacks, shared by all databases, and the caller awaits the answer without holding its
//! thread. Each tenant has at most [`TENANT_CONCURRENCY`] texts on the pool at a time and at most
//! [`TENANT_WAITING`] more waiting for their turn; beyond that its texts fail closed at once. On the
//! pool a text has the budget of [`classify::classify_bounded`] ([`TIME_BUDGET`], a total parse cost
//! and a statement count), and it is abandoned between statements when the caller has gone away.
//! A tenant that sends pathological SQL therefore spends its own request time and its own pool
//! share; other tenants' ordinary queries never wait for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot};

use crate::classify::{self, Budget, Classification, TIME_BUDGET};

/// Texts of one tenant on the classification pool at the same time.
pub const TENANT_CONCURRENCY: usize = 1;
/// Texts of one tenant waiting for the pool; more fail closed without waiting.
pub const TENANT_WAITING: usize = 32;
/// An inline classification that took this long lets the thread's other tasks run before the next.
const INLINE_YIELD_AFTER: Duration = Duration::from_micros(200);
/// Threads of the classification pool at most (fewer on small machines: half the cores, at least one).
const MAX_POOL_THREADS: usize = 4;

/// One tenant's access to the classification pool. Cheap to clone; all of a tenant's databases share it.
#[derive(Debug, Clone)]
pub struct Classifier {
    share: Arc<TenantShare>,
}

#[derive(Debug)]
struct TenantShare {
    permits: Semaphore,
    waiting: AtomicUsize,
}

struct Job {
    sql: String,
    in_transaction: bool,
    reply: oneshot::Sender<Classification>,
}

impl Classifier {
    /// The classifier of `tenant`: the same share for every database of the tenant.
    pub fn for_tenant(tenant: &str) -> Classifier {
        static SHARES: OnceLock<Mutex<HashMap<String, Arc<TenantShare>>>> = OnceLock::new();
        let mut shares = SHARES.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        let share = shares
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(TenantShare { permits: Semaphore::new(TENANT_CONCURRENCY), waiting: AtomicUsize::new(0) }))
            .clone();
        Classifier { share }
    }

    /// Classifies `sql`: inline when cheap, otherwise on the pool within the tenant's share. Never
    /// blocks the caller's thread for longer than the inline bound; never panics.
    pub async fn classify(&self, sql: &str, in_transaction: bool) -> Classification {
        let started = Instant::now();
        if let Some(classification) = classify::classify_inline(sql, in_transaction) {
            if started.elapsed() >= INLINE_YIELD_AFTER {
                // Many cheap texts in a row (a batch of Parse messages) take turns with other
                // clients on the same thread rather than running back to back.
                tokio::task::yield_now().await;
            }
            return classification;
        }
        if sql.len() > classify::MAX_SQL_BYTES {
            // Not even tokenized: no need for the pool.
            return classify::classify(sql, in_transaction);
        }
        if self.share.waiting.fetch_add(1, Ordering::AcqRel) >= TENANT_WAITING {
            self.share.waiting.fetch_sub(1, Ordering::AcqRel);
            return Classification::over_budget(format!("more than {TENANT_WAITING} statements of this tenant waiting to be analysed"));
        }
        let permit = self.share.permits.acquire().await;
        self.share.waiting.fetch_sub(1, Ordering::AcqRel);
        let Ok(_permit) = permit else {
            return Classification::over_budget("the classification pool is closed".to_owned());
        };
        let Some(pool) = pool() else {
            return Classification::over_budget("the classification pool could not start".to_owned());
        };
        let (reply, answer) = oneshot::channel();
        let job = Job { sql: sql.to_owned(), in_transaction, reply };
        if pool.lock().unwrap_or_else(PoisonError::into_inner).send(job).is_err() {
            return Classification::over_budget("the classification pool is gone".to_owned());
        }
        // Dropping this future (the client went away) closes `answer`, which the job notices.
        answer.await.unwrap_or_else(|_| Classification::over_budget("the classification was abandoned".to_owned()))
    }
}

/// The pool's queue, or `None` when no thread could be started.
fn pool() -> Option<&'static Mutex<mpsc::Sender<Job>>> {
    static POOL: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / 2).clamp(1, MAX_POOL_THREADS);
        let mut started = 0;
        for index in 0..threads {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("pgaccel-classify-{index}"))
                .stack_size(classify::LARGE_STACK_BYTES)
                .spawn(move || work(&receiver));
            match spawned {
                Ok(_) => started += 1,
                Err(error) => tracing::error!(target: "cordon::pgaccel", error = %error, "cannot start a SQL classification thread"),
            }
        }
        (started > 0).then(|| Mutex::new(sender))
    })
    .as_ref()
}

fn work(receiver: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match receiver.lock().unwrap_or_else(PoisonError::into_inner).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if job.reply.is_closed() {
            continue;
        }
        let budget = Budget { deadline: Some(Instant::now() + TIME_BUDGET), stop: &|| job.reply.is_closed() };
        let classification = classify::classify_bounded(&job.sql, job.in_transaction, &budget);
        let _ = job.reply.send(classification);
    }
}
