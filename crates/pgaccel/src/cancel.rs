//! Query cancellation across the pool.
//!
//! A proxy client gets Cordon's own BackendKeyData, never an origin backend's: it does not know
//! which backend runs its query (that changes with every transaction), and an origin key would let
//! it cancel queries of whichever client holds that backend later. A CancelRequest carrying a
//! client key is forwarded, with the origin key, to the backend the client holds at that moment,
//! and to no other.
//!
//! The race to close is a cancel that is still on its way while the backend is handed to another
//! client. Each client's slot is behind an async mutex: a cancel holds it until the origin has
//! processed the CancelRequest (it closes the cancel connection when done), and releasing a
//! backend clears the slot under the same mutex, so a backend changes hands only after every
//! cancel aimed at it has landed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rand::RngCore;
use tokio::sync::Mutex as AsyncMutex;

use crate::accel::Database;
use crate::origin::{OriginConfig, send_cancel};

/// The backend a client is running on right now.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub origin: OriginConfig,
    pub process_id: i32,
    pub secret_key: i32,
}

#[derive(Debug)]
struct Entry {
    secret_key: i32,
    target: Arc<AsyncMutex<Option<CancelTarget>>>,
    /// The client's database, whose counters record the cancels forwarded.
    database: Arc<Database>,
}

/// Clients' keys, by the process id handed to them.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<i32, Entry>>,
}

/// A client's registration; dropping it removes the key.
#[derive(Debug)]
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub process_id: i32,
    pub secret_key: i32,
    target: Arc<AsyncMutex<Option<CancelTarget>>>,
}

impl CancelRegistry {
    /// Registers a new client of `database` under a fresh random key.
    pub fn register(self: &Arc<Self>, database: Arc<Database>) -> CancelHandle {
        let mut rng = rand::rng();
        let target = Arc::new(AsyncMutex::new(None));
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Positive, like real process ids, which some clients assume.
            let process_id = (rng.next_u32() & 0x7fff_ffff) as i32;
            let secret_key = rng.next_u32() as i32;
            if process_id == 0 || entries.contains_key(&process_id) {
                continue;
            }
            entries.insert(process_id, Entry { secret_key, target: target.clone(), database });
            return CancelHandle { registry: self.clone(), process_id, secret_key, target };
        }
    }

    /// Handles a CancelRequest. Unknown keys and wrong secrets are ignored silently, as Postgres
    /// does, so a client learns nothing about other clients' keys. Returns whether a cancel was
    /// sent to an origin.
    pub async fn cancel(&self, process_id: i32, secret_key: i32) -> bool {
        let (target, database) = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            match entries.get(&process_id) {
                Some(entry) if constant_time_eq(entry.secret_key, secret_key) => (entry.target.clone(), entry.database.clone()),
                _ => return false,
            }
        };
        let slot = target.lock().await;
        let Some(target) = slot.as_ref() else { return false };
        match send_cancel(&target.origin, target.process_id, target.secret_key).await {
            Ok(()) => {
                database.counters.cancels.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(error) => {
                tracing::warn!(target: "cordon::pgaccel", error = %error, "forwarding a cancel request to the origin failed");
                false
            }
        }
    }
}

impl CancelHandle {
    /// Records the backend the client now runs on.
    pub async fn set(&self, target: CancelTarget) {
        *self.target.lock().await = Some(target);
    }

    /// Forgets the backend; waits for a cancel in flight to land first.
    pub async fn clear(&self) {
        *self.target.lock().await = None;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        let mut entries = self.registry.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(&self.process_id);
    }
}

fn constant_time_eq(a: i32, b: i32) -> bool {
    // The secret is 32 bits; comparing without an early exit keeps its timing flat.
    let diff = (a ^ b) as u32;
    std::hint::black_box(diff) == 0
}
