//! The per-database query result cache.
//!
//! One [`QueryCache`] serves one database of one tenant, so a tenant that fills its cache evicts only
//! its own entries. Values are opaque [`Bytes`] (the encoded backend messages of one result) produced
//! by the caller's fetch function; the cache decides when to run it.
//!
//! # Lookups
//!
//! * age < `max_age`: [`CacheOutcome::Hit`].
//! * `max_age` <= age < `max_age + stale_while_revalidate`: [`CacheOutcome::StaleHit`]; the stale bytes
//!   are returned at once and one background refresh per key is spawned.
//! * otherwise [`CacheOutcome::Miss`]: the fetch runs. Identical concurrent misses share one fetch
//!   ([`CacheOutcome::Coalesced`]), but only when the leader's result is storable: an error or a
//!   result the caller marked `store = false` may belong to the leader's connection alone (a
//!   cancellation, a statement timeout), so then, and when the leader fails or is dropped, every
//!   follower runs its own fetch, uncoalesced. That also means the error type needs no `Clone`.
//!
//! # Invalidation
//!
//! A single invalidation clock counts writes. A write stamps each table name it touches (or the
//! whole database) with the next clock value; a fetch records the clock when it starts, and its
//! result counts as current only while none of its tables, and not the database, has been stamped
//! later. Checking this both before storing and on every lookup closes the race where a write lands
//! while a read is in flight, and makes an invalidation cost O(tables written) instead of O(entries);
//! outdated entries are dropped when they are next looked up, or evicted. Table names are matched
//! without their schema and case-folded: treating `a.t` and `b.t` as one table over-invalidates,
//! which is safe, whereas resolving schemas through a `search_path` the proxy cannot see would risk
//! under-invalidating.
//!
//! A concurrent miss joins an in-flight fetch only if nothing it reads was invalidated since that
//! fetch started: otherwise a client that wrote and then read could be handed a result computed
//! before its own write.
//!
//! # Memory and confidentiality
//!
//! Entries are weighed in bytes (sealed value, key digest, table names and a per-entry overhead
//! estimate) and the least recently used ones are evicted to keep the total within `max_bytes`.
//!
//! The map is keyed by an HMAC-SHA256 of the [`CacheKey`], so neither SQL text nor parameter
//! values are kept in the clear. Every value is sealed with XChaCha20-Poly1305 under a key derived
//! with HKDF-SHA256 (RFC 5869) from a per-process random secret, with the tenant and database names
//! in its `info`, and with the key digest as associated data: an entry moved to another key, or
//! into another tenant's cache, fails to open and is dropped, never served.

/// Written anywhere in a statement's text (usually in a comment, `/* cordon:no-cache */`), keeps
/// that statement out of the cache: it is neither served from nor stored in it.
pub const NO_CACHE_HINT: &str = "cordon:no-cache";

/// Whether the statement asks not to be cached. A string literal that happens to contain the
/// hint opts out too, which only ever costs a cache hit.
pub fn opted_out(sql: &str) -> bool {
    sql.contains(NO_CACHE_HINT)
}

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use sha2::Sha256;
use tokio::sync::watch;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::classify::{TableRef, Writes};

/// Limits and lifetimes of one cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// How long an entry is served as fresh.
    pub max_age: Duration,
    /// How long after `max_age` an entry is still served while it is refreshed in the background.
    pub stale_while_revalidate: Duration,
    /// Results larger than this (plaintext bytes) are not stored.
    pub max_entry_bytes: usize,
    /// Upper bound of the cache's weighted size.
    pub max_bytes: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_age: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(15),
            max_entry_bytes: 1 << 20,
            max_bytes: 64 << 20,
        }
    }
}

/// What identifies a result. Built by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The session's effective role (after confirmed SET ROLE), plus the proxy user; caller decides the string.
    pub role: String,
    /// The session state the result depends on: the digest of the origin connection's roles,
    /// `search_path`, time zone, date and interval styles, float digits, bytea output, timeouts
    /// and every session-set setting (see [`crate::session_state`]). A result is stored only when
    /// it was computed on a connection in exactly that state.
    pub session: String,
    /// The normalized query text.
    pub query: String,
    /// Parameter values as sent (None = NULL).
    pub params: Vec<Option<Bytes>>,
    /// Parameter formats followed by result formats, and anything else that changes the encoded
    /// result (caller encodes).
    pub formats: Vec<i16>,
    /// `b'Q'` simple protocol or `b'E'` extended; results are encoded differently.
    pub protocol: u8,
}

/// How [`QueryCache::get_or_fetch`] produced its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A fresh entry.
    Hit,
    /// A stale entry, served while a background refresh runs.
    StaleHit,
    /// The fetch ran (and its result was stored if it could be).
    Miss,
    /// Waited for another caller's in-flight fetch of the same key.
    Coalesced,
    /// The caller's fetch said the result is not storable.
    Bypass,
}

/// The result of a fetch: `store = false` when the result must not be stored (an error, too large, a notice, ...).
pub struct Fetched {
    /// The encoded result.
    pub bytes: Bytes,
    /// Whether the result may be stored and shared.
    pub store: bool,
}

/// What a fetch factory returns.
pub type FetchFuture<E> = Pin<Box<dyn Future<Output = Result<Fetched, E>> + Send>>;

/// A fetch factory: called once per miss, and again for each background refresh.
pub type FetchFn<E> = Arc<dyn Fn() -> FetchFuture<E> + Send + Sync>;

/// Counters of one cache. Every [`QueryCache::get_or_fetch`] call that returns `Ok` counts in
/// exactly one of `hits`, `stale_hits`, `misses`, `coalesced` and `bypass`; one that returns `Err`
/// counts in `fetch_errors`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub stale_hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub bypass: u64,
    /// Storable results not stored because of their size (also counted in `misses` or `coalesced`).
    pub too_large: u64,
    /// Fetches of the caller (not background refreshes) that failed.
    pub fetch_errors: u64,
    /// Background refreshes started.
    pub refreshes: u64,
    /// Entries that failed to decrypt and were dropped.
    pub integrity_failures: u64,
    /// Entries currently stored (including outdated ones not yet dropped).
    pub entries: u64,
    /// Weighted size of the stored entries.
    pub bytes: u64,
    /// Entries evicted to stay within `max_bytes`.
    pub evictions: u64,
    /// Invalidations (calls that wrote at least one table, or the whole database).
    pub invalidations: u64,
}

/// Estimated bookkeeping per entry beyond its sealed value, digest and table names (hash map slot,
/// LRU node, `Bytes` header, allocator slack), so many tiny entries cannot exceed the bound unseen.
const ENTRY_OVERHEAD: u64 = 160;
/// Per table name stored in an entry: the boxed `str` header.
const TABLE_OVERHEAD: u64 = 16;
/// Distinct written table names remembered before they are folded into one database-wide
/// invalidation, so a tenant writing ever-new names cannot grow the map without bound.
const MAX_TRACKED_TABLES: usize = 4096;
const NONCE_LEN: usize = 24;

type KeyDigest = [u8; 32];

/// The process-wide secret every cache key is derived from. `None` when the OS has no randomness
/// to give: the caches then store nothing rather than encrypt under a guessable key.
fn master_secret() -> Option<&'static [u8; 32]> {
    static MASTER: OnceLock<Option<[u8; 32]>> = OnceLock::new();
    MASTER
        .get_or_init(|| {
            let mut secret = [0u8; 32];
            rand::rngs::OsRng.try_fill_bytes(&mut secret).ok().map(|()| secret)
        })
        .as_ref()
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes a key of any length")
}

fn update_len_prefixed(mac: &mut HmacSha256, data: &[u8]) {
    mac.update(&(data.len() as u64).to_be_bytes());
    mac.update(data);
}

/// HKDF-SHA256 (RFC 5869) with an empty salt, for one 32-byte output.
fn hkdf_sha256(ikm: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let mut okm = Zeroizing::new([0u8; 32]);
    hkdf::Hkdf::<Sha256>::new(None, ikm).expand_multi_info(info, okm.as_mut_slice()).expect("HKDF-SHA256 gives 32 bytes");
    okm
}

/// The key for `purpose` of one tenant's database: HKDF of the process secret, with the purpose,
/// tenant and database (each length-prefixed) as `info`.
fn derive(purpose: &[u8], master: &[u8; 32], tenant: &str, database: &str) -> Zeroizing<[u8; 32]> {
    let len = |data: &[u8]| (data.len() as u64).to_be_bytes();
    let (p, t, d) = (len(purpose), len(tenant.as_bytes()), len(database.as_bytes()));
    hkdf_sha256(master, &[&p, purpose, &t, tenant.as_bytes(), &d, database.as_bytes()])
}

/// Schema dropped and case folded; see the module documentation.
fn table_names(reads: &[TableRef]) -> Box<[Box<str>]> {
    let mut names: Vec<Box<str>> = reads.iter().map(|t| t.name.to_lowercase().into_boxed_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.into_boxed_slice()
}

/// A query result cache for one database of one tenant. Shared as `Arc<QueryCache>`.
pub struct QueryCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QueryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryCache").field("settings", &self.inner.settings).field("stats", &self.stats()).finish_non_exhaustive()
    }
}

struct Inner {
    /// `None` without a process secret: nothing is stored.
    cipher: Option<XChaCha20Poly1305>,
    /// Keys the map digests, so a digest cannot be checked against guessed SQL and parameters.
    index_key: Zeroizing<[u8; 32]>,
    settings: CacheSettings,
    state: Mutex<State>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    stale_hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    bypass: AtomicU64,
    too_large: AtomicU64,
    fetch_errors: AtomicU64,
    refreshes: AtomicU64,
    integrity_failures: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct State {
    entries: HashMap<KeyDigest, Entry>,
    /// LRU order: sequence number of the last use -> key.
    lru: BTreeMap<u64, KeyDigest>,
    bytes: u64,
    /// Source of entry ids, LRU positions and in-flight ids.
    seq: u64,
    /// The invalidation clock: advanced by each invalidation.
    clock: u64,
    db_invalidated_at: u64,
    table_invalidated_at: HashMap<Box<str>, u64>,
    in_flight: HashMap<KeyDigest, InFlight>,
    refreshing: HashSet<KeyDigest>,
}

struct Entry {
    /// `nonce || XChaCha20-Poly1305(value)`, associated data = the key digest.
    sealed: Bytes,
    tables: Box<[Box<str>]>,
    /// The invalidation clock when the fetch that produced the value started.
    started_at: u64,
    stored_at: Instant,
    lru_pos: u64,
    id: u64,
    weight: u64,
}

struct InFlight {
    id: u64,
    started_at: u64,
    /// Gets the leader's bytes when its result is storable; dropped unset otherwise, which tells the
    /// followers to fetch for themselves.
    tx: watch::Sender<Option<Bytes>>,
}

enum Found {
    Fresh(Bytes, u64),
    Stale(Bytes, u64),
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// True when nothing in `tables`, nor the database, was invalidated after `started_at`.
    fn is_current(&self, started_at: u64, tables: &[Box<str>]) -> bool {
        self.db_invalidated_at <= started_at && tables.iter().all(|t| self.table_invalidated_at.get(t).is_none_or(|&at| at <= started_at))
    }

    fn remove(&mut self, digest: &KeyDigest, counters: &Counters) -> Option<Entry> {
        let entry = self.entries.remove(digest)?;
        self.lru.remove(&entry.lru_pos);
        self.bytes = self.bytes.saturating_sub(entry.weight);
        counters.entries.store(self.entries.len() as u64, Ordering::Relaxed);
        counters.bytes.store(self.bytes, Ordering::Relaxed);
        Some(entry)
    }

    fn remove_if_id(&mut self, digest: &KeyDigest, id: u64, counters: &Counters) {
        if self.entries.get(digest).is_some_and(|e| e.id == id) {
            self.remove(digest, counters);
        }
    }

    fn advance_clock(&mut self) -> u64 {
        self.clock = self.clock.saturating_add(1);
        self.clock
    }
}

impl QueryCache {
    /// `tenant` and `database` are bound into the encryption key and the associated data, so an entry decrypts only for them.
    pub fn new(tenant: &str, database: &str, settings: CacheSettings) -> QueryCache {
        Self::with_master(master_secret(), tenant, database, settings)
    }

    fn with_master(master: Option<&[u8; 32]>, tenant: &str, database: &str, settings: CacheSettings) -> QueryCache {
        let (cipher, index_key) = match master {
            Some(master) => {
                let key = derive(b"cordon-pgaccel cache encryption v1", master, tenant, database);
                let index_key = derive(b"cordon-pgaccel cache index v1", master, tenant, database);
                (Some(XChaCha20Poly1305::new((&*key).into())), index_key)
            }
            None => (None, Zeroizing::new([0u8; 32])),
        };
        QueryCache {
            inner: Arc::new(Inner { cipher, index_key, settings, state: Mutex::new(State::default()), counters: Counters::default() }),
        }
    }

    /// The settings the cache was created with.
    pub fn settings(&self) -> CacheSettings {
        self.inner.settings
    }

    /// Returns the cached bytes or runs `fetch`. `reads` = the tables the query reads (for invalidation).
    ///
    /// See the module documentation for the outcomes. When the leader of a coalesced miss fails, is
    /// dropped or returns a result with `store = false`, its followers each run their own fetch.
    pub async fn get_or_fetch<E: Send + 'static>(
        &self,
        key: CacheKey,
        reads: &[TableRef],
        fetch: FetchFn<E>,
    ) -> Result<(Bytes, CacheOutcome), E> {
        let inner = &*self.inner;
        let digest = inner.digest(&key);
        drop(key);
        let tables = table_names(reads);

        if let Some(found) = inner.lookup(&digest, &tables) {
            let (sealed, id, fresh) = match found {
                Found::Fresh(sealed, id) => (sealed, id, true),
                Found::Stale(sealed, id) => (sealed, id, false),
            };
            match inner.open(&digest, &sealed) {
                Some(bytes) if fresh => {
                    bump(&inner.counters.hits);
                    return Ok((bytes, CacheOutcome::Hit));
                }
                Some(bytes) => {
                    bump(&inner.counters.stale_hits);
                    self.spawn_refresh(digest, tables, fetch);
                    return Ok((bytes, CacheOutcome::StaleHit));
                }
                None => {
                    tracing::warn!("query cache entry failed to decrypt; dropped");
                    bump(&inner.counters.integrity_failures);
                    inner.lock().remove_if_id(&digest, id, &inner.counters);
                }
            }
        }

        enum Role {
            Leader(LeaderGuard, u64, u64),
            Follower(watch::Receiver<Option<Bytes>>),
            Alone(u64),
        }
        let role = {
            let mut state = inner.lock();
            let started_at = state.clock;
            match state.in_flight.get(&digest) {
                Some(flight) if state.is_current(flight.started_at, &tables) => Role::Follower(flight.tx.subscribe()),
                Some(_) => Role::Alone(started_at),
                None => {
                    let id = state.next_seq();
                    let (tx, _) = watch::channel(None);
                    state.in_flight.insert(digest, InFlight { id, started_at, tx });
                    Role::Leader(LeaderGuard { inner: Arc::clone(&self.inner), digest, id }, id, started_at)
                }
            }
        };

        match role {
            Role::Leader(guard, id, started_at) => {
                let result = inner.fetch_and_store(&digest, tables, started_at, Some(id), &fetch).await;
                drop(guard);
                result
            }
            Role::Alone(started_at) => inner.fetch_and_store(&digest, tables, started_at, None, &fetch).await,
            Role::Follower(mut rx) => {
                let shared = rx.wait_for(Option::is_some).await.ok().and_then(|value| value.clone());
                drop(rx);
                if let Some(bytes) = shared {
                    bump(&inner.counters.coalesced);
                    return Ok((bytes, CacheOutcome::Coalesced));
                }
                let started_at = inner.lock().clock;
                inner.fetch_and_store(&digest, tables, started_at, None, &fetch).await
            }
        }
    }

    /// A write through Cordon: invalidates entries reading these tables, matched on the table name
    /// only. `Writes::Unknown` invalidates everything in this cache; `Writes::None` nothing.
    pub fn invalidate(&self, writes: &Writes) {
        let tables = match writes {
            Writes::None => return,
            Writes::Unknown => return self.invalidate_all(),
            Writes::Tables(tables) if tables.is_empty() => return,
            Writes::Tables(tables) => tables,
        };
        let names = table_names(tables);
        let mut state = self.inner.lock();
        let at = state.advance_clock();
        for name in names {
            if state.table_invalidated_at.len() >= MAX_TRACKED_TABLES && !state.table_invalidated_at.contains_key(&name) {
                state.table_invalidated_at.clear();
                state.db_invalidated_at = at;
                break;
            }
            state.table_invalidated_at.insert(name, at);
        }
        drop(state);
        bump(&self.inner.counters.invalidations);
    }

    /// Invalidates every entry of this cache.
    pub fn invalidate_all(&self) {
        let mut state = self.inner.lock();
        let at = state.advance_clock();
        state.db_invalidated_at = at;
        // Every entry a table stamp could still outdate started before `at`, so the stamps are moot.
        state.table_invalidated_at.clear();
        drop(state);
        bump(&self.inner.counters.invalidations);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&c.hits),
            stale_hits: get(&c.stale_hits),
            misses: get(&c.misses),
            coalesced: get(&c.coalesced),
            bypass: get(&c.bypass),
            too_large: get(&c.too_large),
            fetch_errors: get(&c.fetch_errors),
            refreshes: get(&c.refreshes),
            integrity_failures: get(&c.integrity_failures),
            entries: get(&c.entries),
            bytes: get(&c.bytes),
            evictions: get(&c.evictions),
            invalidations: get(&c.invalidations),
        }
    }

    fn spawn_refresh<E: Send + 'static>(&self, digest: KeyDigest, tables: Box<[Box<str>]>, fetch: FetchFn<E>) {
        if !self.inner.lock().refreshing.insert(digest) {
            return;
        }
        let guard = RefreshGuard { inner: Arc::clone(&self.inner), digest };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to refresh on: keep serving the stale entry until it expires.
            return;
        };
        bump(&self.inner.counters.refreshes);
        runtime.spawn(async move {
            let inner = &guard.inner;
            let started_at = inner.lock().clock;
            match fetch().await {
                Ok(fetched) if fetched.store && fetched.bytes.len() <= inner.settings.max_entry_bytes => {
                    inner.store(&guard.digest, tables, started_at, &fetched.bytes);
                }
                Ok(_) => tracing::debug!("query cache refresh returned a result that is not stored"),
                Err(_) => tracing::debug!("query cache refresh failed; the stale entry stays until it expires"),
            }
            drop(guard);
        });
    }

    #[cfg(test)]
    fn sealed_entry(&self, key: &CacheKey) -> Option<Bytes> {
        let digest = self.inner.digest(key);
        self.inner.lock().entries.get(&digest).map(|e| e.sealed.clone())
    }

    /// Stores `sealed` under `key` as if it had been sealed for it.
    #[cfg(test)]
    fn plant_sealed(&self, key: &CacheKey, sealed: Bytes) {
        let digest = self.inner.digest(key);
        let mut state = self.inner.lock();
        let started_at = state.clock;
        self.inner.insert_locked(&mut state, digest, sealed, Box::default(), started_at);
    }
}

/// Removes the in-flight record when the leader finishes or is dropped mid-fetch; dropping the
/// record's sender without a value sends the followers to fetch for themselves.
struct LeaderGuard {
    inner: Arc<Inner>,
    digest: KeyDigest,
    id: u64,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if state.in_flight.get(&self.digest).is_some_and(|f| f.id == self.id) {
            state.in_flight.remove(&self.digest);
        }
    }
}

/// Lets the next stale hit start a refresh again, also when the refresh panics or is cancelled.
struct RefreshGuard {
    inner: Arc<Inner>,
    digest: KeyDigest,
}

impl Drop for RefreshGuard {
    fn drop(&mut self) {
        self.inner.lock().refreshing.remove(&self.digest);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements, so a panic elsewhere need not disable the cache.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn digest(&self, key: &CacheKey) -> KeyDigest {
        let mut hasher = hmac_sha256(self.index_key.as_slice());
        update_len_prefixed(&mut hasher, b"cordon-pgaccel cache key v2");
        hasher.update(&[key.protocol]);
        update_len_prefixed(&mut hasher, key.role.as_bytes());
        update_len_prefixed(&mut hasher, key.session.as_bytes());
        update_len_prefixed(&mut hasher, key.query.as_bytes());
        hasher.update(&(key.params.len() as u64).to_be_bytes());
        for param in &key.params {
            match param {
                None => hasher.update(&[0u8]),
                Some(value) => {
                    hasher.update(&[1u8]);
                    update_len_prefixed(&mut hasher, value);
                }
            }
        }
        hasher.update(&(key.formats.len() as u64).to_be_bytes());
        for format in &key.formats {
            hasher.update(&format.to_be_bytes());
        }
        hasher.finalize().into_bytes().into()
    }

    fn seal(&self, digest: &KeyDigest, plaintext: &[u8]) -> Option<Bytes> {
        let cipher = self.cipher.as_ref()?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.try_fill_bytes(&mut nonce).ok()?;
        let ciphertext = cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: digest }).ok()?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Some(Bytes::from(sealed))
    }

    fn open(&self, digest: &KeyDigest, sealed: &[u8]) -> Option<Bytes> {
        let cipher = self.cipher.as_ref()?;
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: ciphertext, aad: digest }).ok().map(Bytes::from)
    }

    fn lifetime(&self) -> Duration {
        self.settings.max_age.saturating_add(self.settings.stale_while_revalidate)
    }

    /// The sealed value of a live entry, touched in the LRU order. Expired and outdated entries are
    /// dropped on the way.
    fn lookup(&self, digest: &KeyDigest, tables: &[Box<str>]) -> Option<Found> {
        let now = Instant::now();
        let mut state = self.lock();
        let entry = state.entries.get(digest)?;
        let age = now.saturating_duration_since(entry.stored_at);
        // The caller's tables are checked too, should they ever differ from the entry's.
        let live = age < self.lifetime() && state.is_current(entry.started_at, &entry.tables) && state.is_current(entry.started_at, tables);
        if !live {
            state.remove(digest, &self.counters);
            return None;
        }
        let (old_pos, sealed, id) = (entry.lru_pos, entry.sealed.clone(), entry.id);
        let pos = state.next_seq();
        state.lru.remove(&old_pos);
        state.lru.insert(pos, *digest);
        if let Some(entry) = state.entries.get_mut(digest) {
            entry.lru_pos = pos;
        }
        Some(if age < self.settings.max_age { Found::Fresh(sealed, id) } else { Found::Stale(sealed, id) })
    }

    /// Runs the caller's fetch, stores a storable result, and hands it to the followers when
    /// `leader` is this key's in-flight id.
    async fn fetch_and_store<E>(
        &self,
        digest: &KeyDigest,
        tables: Box<[Box<str>]>,
        started_at: u64,
        leader: Option<u64>,
        fetch: &FetchFn<E>,
    ) -> Result<(Bytes, CacheOutcome), E> {
        let fetched = match fetch().await {
            Ok(fetched) => fetched,
            Err(err) => {
                bump(&self.counters.fetch_errors);
                return Err(err);
            }
        };
        if !fetched.store {
            bump(&self.counters.bypass);
            return Ok((fetched.bytes, CacheOutcome::Bypass));
        }
        bump(&self.counters.misses);
        if fetched.bytes.len() > self.settings.max_entry_bytes {
            bump(&self.counters.too_large);
        } else {
            self.store(digest, tables, started_at, &fetched.bytes);
        }
        if let Some(id) = leader {
            let state = self.lock();
            if let Some(flight) = state.in_flight.get(digest).filter(|f| f.id == id) {
                flight.tx.send_replace(Some(fetched.bytes.clone()));
            }
        }
        Ok((fetched.bytes, CacheOutcome::Miss))
    }

    fn store(&self, digest: &KeyDigest, tables: Box<[Box<str>]>, started_at: u64, plaintext: &Bytes) {
        if self.lifetime().is_zero() {
            return;
        }
        let Some(sealed) = self.seal(digest, plaintext) else {
            return;
        };
        let mut state = self.lock();
        if !state.is_current(started_at, &tables) {
            return;
        }
        self.insert_locked(&mut state, *digest, sealed, tables, started_at);
    }

    fn insert_locked(&self, state: &mut State, digest: KeyDigest, sealed: Bytes, tables: Box<[Box<str>]>, started_at: u64) {
        let weight = sealed.len() as u64
            + digest.len() as u64
            + tables.iter().map(|t| t.len() as u64 + TABLE_OVERHEAD).sum::<u64>()
            + ENTRY_OVERHEAD;
        if weight > self.settings.max_bytes {
            bump(&self.counters.too_large);
            return;
        }
        if let Some(existing) = state.entries.get(&digest) {
            // A result whose fetch started after an invalidation this one predates is not replaced.
            if existing.started_at > started_at {
                return;
            }
            state.remove(&digest, &self.counters);
        }
        while state.bytes + weight > self.settings.max_bytes {
            let Some((_, victim)) = state.lru.pop_first() else { break };
            if let Some(entry) = state.entries.remove(&victim) {
                state.bytes = state.bytes.saturating_sub(entry.weight);
                bump(&self.counters.evictions);
            }
        }
        let (id, lru_pos) = (state.next_seq(), state.next_seq());
        state.lru.insert(lru_pos, digest);
        state.entries.insert(digest, Entry { sealed, tables, started_at, stored_at: Instant::now(), lru_pos, id, weight });
        state.bytes += weight;
        self.counters.entries.store(state.entries.len() as u64, Ordering::Relaxed);
        self.counters.bytes.store(state.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::Notify;
    use tokio::task::JoinSet;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn key_derivation_is_rfc_5869_hkdf_sha256() {
        // RFC 5869 A.3 (test case 3: no salt, no info), the form derive() uses.
        let okm = hkdf_sha256(&[0x0b; 22], &[]);
        assert_eq!(hex(okm.as_slice()), "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d");
        // Tenants, databases and purposes get different keys, with no
        // ambiguity in how the names are joined.
        let master = [7u8; 32];
        let keys = [derive(b"p", &master, "ab", "c"), derive(b"p", &master, "a", "bc"), derive(b"q", &master, "ab", "c")];
        assert!(keys[0] != keys[1] && keys[0] != keys[2] && keys[1] != keys[2]);
    }

    const MAX_AGE: Duration = Duration::from_millis(100);
    const SWR: Duration = Duration::from_millis(100);

    fn settings() -> CacheSettings {
        CacheSettings { max_age: MAX_AGE, stale_while_revalidate: SWR, max_entry_bytes: 1024, max_bytes: 1 << 20 }
    }

    fn cache() -> Arc<QueryCache> {
        Arc::new(QueryCache::new("tenant-a", "db", settings()))
    }

    fn key(query: &str) -> CacheKey {
        CacheKey {
            role: "app".into(),
            session: String::new(),
            query: query.into(),
            params: Vec::new(),
            formats: Vec::new(),
            protocol: b'Q',
        }
    }

    fn table(schema: Option<&str>, name: &str) -> TableRef {
        TableRef::new(schema, name)
    }

    fn fetcher<F, Fut>(f: F) -> FetchFn<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Fetched, ()>> + Send + 'static,
    {
        Arc::new(move || Box::pin(f()))
    }

    /// Returns `v1`, `v2`, ... by call number, storable.
    fn counting(calls: &Arc<AtomicUsize>) -> FetchFn<()> {
        let calls = Arc::clone(calls);
        fetcher(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok(Fetched { bytes: Bytes::from(format!("v{n}")), store: true }) }
        })
    }

    /// Like [`counting`], but every call signals `started` and then waits for `gate` (one permit per call).
    fn gated(calls: &Arc<AtomicUsize>, started: &Arc<Notify>, gate: &Arc<Notify>) -> FetchFn<()> {
        let (calls, started, gate) = (Arc::clone(calls), Arc::clone(started), Arc::clone(gate));
        fetcher(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let (started, gate) = (Arc::clone(&started), Arc::clone(&gate));
            async move {
                started.notify_one();
                gate.notified().await;
                Ok(Fetched { bytes: Bytes::from(format!("v{n}")), store: true })
            }
        })
    }

    async fn get(cache: &QueryCache, key: CacheKey, reads: &[TableRef], fetch: &FetchFn<()>) -> (String, CacheOutcome) {
        let (bytes, outcome) = cache.get_or_fetch(key, reads, Arc::clone(fetch)).await.expect("fetch succeeds");
        (String::from_utf8(bytes.to_vec()).expect("utf-8"), outcome)
    }

    async fn settle(cache: &QueryCache) {
        for _ in 0..100 {
            if cache.inner.lock().refreshing.is_empty() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the background refresh did not finish");
    }

    #[test]
    fn the_cache_and_its_future_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<QueryCache>();
        let cache = QueryCache::new("t", "d", settings());
        let calls = Arc::new(AtomicUsize::new(0));
        send(&cache.get_or_fetch(key("select 1"), &[], counting(&calls)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_is_stored_and_then_hit() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        let reads = [table(None, "t")];
        assert_eq!(get(&cache, key("select * from t"), &reads, &fetch).await, ("v1".into(), CacheOutcome::Miss));
        assert_eq!(get(&cache, key("select * from t"), &reads, &fetch).await, ("v1".into(), CacheOutcome::Hit));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 1, 1));
        assert!(stats.bytes > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_max_age() {
        let cache = Arc::new(QueryCache::new("t", "d", CacheSettings { stale_while_revalidate: Duration::ZERO, ..settings() }));
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        assert_eq!(get(&cache, key("q"), &[], &fetch).await.1, CacheOutcome::Miss);
        tokio::time::advance(MAX_AGE - Duration::from_millis(1)).await;
        assert_eq!(get(&cache, key("q"), &[], &fetch).await, ("v1".into(), CacheOutcome::Hit));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(get(&cache, key("q"), &[], &fetch).await, ("v2".into(), CacheOutcome::Miss));
        assert_eq!(cache.stats().entries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_max_age_plus_stale_while_revalidate_is_a_miss() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        get(&cache, key("q"), &[], &fetch).await;
        tokio::time::advance(MAX_AGE + SWR).await;
        assert_eq!(get(&cache, key("q"), &[], &fetch).await, ("v2".into(), CacheOutcome::Miss));
        assert_eq!(cache.stats().refreshes, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_hits_start_exactly_one_refresh_whose_result_is_served_next() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(get(&cache, key("q"), &[], &counting(&calls)).await.1, CacheOutcome::Miss);
        tokio::time::advance(MAX_AGE + SWR / 2).await;

        let (started, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let fetch = gated(&calls, &started, &gate);
        let mut hits = JoinSet::new();
        for _ in 0..20 {
            let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
            hits.spawn(async move { get(&cache, key("q"), &[], &fetch).await });
        }
        while let Some(hit) = hits.join_next().await {
            assert_eq!(hit.expect("task"), ("v1".into(), CacheOutcome::StaleHit));
        }
        started.notified().await;
        // A stale hit while the refresh is still running starts no second one.
        assert_eq!(get(&cache, key("q"), &[], &fetch).await, ("v1".into(), CacheOutcome::StaleHit));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        gate.notify_one();
        settle(&cache).await;
        assert_eq!(get(&cache, key("q"), &[], &fetch).await, ("v2".into(), CacheOutcome::Hit));
        let stats = cache.stats();
        assert_eq!((stats.stale_hits, stats.refreshes, stats.hits), (21, 1, 1));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_that_raced_a_write_is_not_stored() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let reads = [table(None, "t")];
        get(&cache, key("q"), &reads, &counting(&calls)).await;
        let original = cache.sealed_entry(&key("q"));
        tokio::time::advance(MAX_AGE).await;
        let (started, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let fetch = gated(&calls, &started, &gate);
        assert_eq!(get(&cache, key("q"), &reads, &fetch).await.1, CacheOutcome::StaleHit);
        started.notified().await;
        cache.invalidate(&Writes::Tables(vec![table(Some("public"), "t")]));
        gate.notify_one();
        settle(&cache).await;
        // Still the outdated original (dropped lazily on the next lookup), not the refresh's result.
        assert_eq!(cache.sealed_entry(&key("q")), original);
        assert_eq!(get(&cache, key("q"), &reads, &counting(&calls)).await, ("v3".into(), CacheOutcome::Miss));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_identical_misses_share_one_fetch() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = {
            let calls = Arc::clone(&calls);
            fetcher(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Ok(Fetched { bytes: Bytes::from_static(b"shared"), store: true })
                }
            })
        };
        let mut tasks = JoinSet::new();
        for _ in 0..50 {
            let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
            tasks.spawn(async move { get(&cache, key("q"), &[table(None, "t")], &fetch).await });
        }
        let mut outcomes = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (value, outcome) = done.expect("task");
            assert_eq!(value, "shared");
            outcomes.push(outcome);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == CacheOutcome::Miss).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| **o == CacheOutcome::Coalesced).count(), 49);
        assert_eq!(cache.stats().coalesced, 49);
        assert!(cache.inner.lock().in_flight.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn followers_of_a_failed_or_unstorable_leader_fetch_for_themselves() {
        for first in [Err(()), Ok(false)] {
            let cache = cache();
            let calls = Arc::new(AtomicUsize::new(0));
            let fetch = {
                let calls = Arc::clone(&calls);
                fetcher(move || {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        match (n, first) {
                            (1, Err(())) => Err(()),
                            (1, Ok(store)) => Ok(Fetched { bytes: Bytes::from_static(b"error response"), store }),
                            _ => Ok(Fetched { bytes: Bytes::from(format!("v{n}")), store: true }),
                        }
                    }
                })
            };
            let mut tasks = JoinSet::new();
            for _ in 0..5 {
                let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
                tasks.spawn(async move { cache.get_or_fetch(key("q"), &[], fetch).await });
            }
            let mut outcomes = Vec::new();
            while let Some(done) = tasks.join_next().await {
                outcomes.push(done.expect("task").map(|(_, outcome)| outcome));
            }
            assert_eq!(calls.load(Ordering::SeqCst), 5, "{first:?}");
            let leader = if first.is_err() { Err(()) } else { Ok(CacheOutcome::Bypass) };
            assert_eq!(outcomes.iter().filter(|o| **o == leader).count(), 1, "{outcomes:?}");
            assert_eq!(outcomes.iter().filter(|o| **o == Ok(CacheOutcome::Miss)).count(), 4, "{outcomes:?}");
            assert_eq!(cache.stats().coalesced, 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn followers_of_a_cancelled_leader_fetch_for_themselves() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let (started, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let fetch = gated(&calls, &started, &gate);
        let leader = {
            let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
            tokio::spawn(async move { get(&cache, key("q"), &[], &fetch).await })
        };
        started.notified().await;
        let follower = {
            let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
            tokio::spawn(async move { get(&cache, key("q"), &[], &fetch).await })
        };
        tokio::task::yield_now().await;
        leader.abort();
        started.notified().await;
        gate.notify_one();
        assert_eq!(follower.await.expect("task"), ("v2".into(), CacheOutcome::Miss));
        assert!(cache.inner.lock().in_flight.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_after_a_write_does_not_join_a_fetch_that_started_before_it() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let (started, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let fetch = gated(&calls, &started, &gate);
        let reads = [table(None, "t")];
        let spawn_get = || {
            let (cache, fetch, reads) = (Arc::clone(&cache), Arc::clone(&fetch), reads.clone());
            tokio::spawn(async move { get(&cache, key("q"), &reads, &fetch).await })
        };
        let before = spawn_get();
        started.notified().await;
        cache.invalidate(&Writes::Tables(vec![table(None, "t")]));
        let after = spawn_get();
        started.notified().await;
        gate.notify_one();
        gate.notify_one();
        assert_eq!(before.await.expect("task"), ("v1".into(), CacheOutcome::Miss));
        assert_eq!(after.await.expect("task"), ("v2".into(), CacheOutcome::Miss));
        // The fetch that started after the write is current and stored.
        assert_eq!(get(&cache, key("q"), &reads, &fetch).await, ("v2".into(), CacheOutcome::Hit));
    }

    #[tokio::test(start_paused = true)]
    async fn role_session_params_formats_and_protocol_are_all_part_of_the_key() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        let base = CacheKey {
            role: "app".into(),
            session: "s1".into(),
            query: "select * from t where a = $1 and b = $2".into(),
            params: vec![Some(Bytes::from_static(b"ab")), Some(Bytes::from_static(b"c"))],
            formats: vec![0, 0, 1],
            protocol: b'E',
        };
        let variants = [
            CacheKey { role: "admin".into(), ..base.clone() },
            CacheKey { session: "s2".into(), ..base.clone() },
            CacheKey { params: vec![Some(Bytes::from_static(b"a")), Some(Bytes::from_static(b"bc"))], ..base.clone() },
            CacheKey { params: vec![Some(Bytes::from_static(b"ab")), None], ..base.clone() },
            CacheKey { params: vec![Some(Bytes::from_static(b"ab")), Some(Bytes::new())], ..base.clone() },
            CacheKey { params: vec![Some(Bytes::from_static(b"ab"))], ..base.clone() },
            CacheKey { formats: vec![0, 0, 0], ..base.clone() },
            CacheKey { formats: vec![0, 0], ..base.clone() },
            CacheKey { protocol: b'Q', ..base.clone() },
            CacheKey { query: "select * from t where a = $1 and b = $3".into(), ..base.clone() },
        ];
        assert_eq!(get(&cache, base.clone(), &[], &fetch).await, ("v1".into(), CacheOutcome::Miss));
        for (i, variant) in variants.iter().enumerate() {
            assert_eq!(get(&cache, variant.clone(), &[], &fetch).await, (format!("v{}", i + 2), CacheOutcome::Miss), "{variant:?}");
        }
        assert_eq!(get(&cache, base, &[], &fetch).await, ("v1".into(), CacheOutcome::Hit));
        for (i, variant) in variants.into_iter().enumerate() {
            assert_eq!(get(&cache, variant, &[], &fetch).await, (format!("v{}", i + 2), CacheOutcome::Hit));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tenants_and_databases_never_share_entries_even_when_ciphertext_is_copied() {
        let ours = QueryCache::new("tenant-a", "db", settings());
        let theirs = [QueryCache::new("tenant-b", "db", settings()), QueryCache::new("tenant-a", "db2", settings())];
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        assert_eq!(get(&ours, key("q"), &[], &fetch).await, ("v1".into(), CacheOutcome::Miss));
        let sealed = ours.sealed_entry(&key("q")).expect("stored");
        for (i, other) in theirs.iter().enumerate() {
            assert_ne!(ours.inner.digest(&key("q")), other.inner.digest(&key("q")));
            assert_eq!(other.sealed_entry(&key("q")), None);
            other.plant_sealed(&key("q"), sealed.clone());
            let (value, outcome) = get(other, key("q"), &[], &fetch).await;
            assert_eq!((value, outcome), (format!("v{}", i + 2), CacheOutcome::Miss));
            assert_eq!(other.stats().integrity_failures, 1);
            // The planted entry was dropped and replaced by the cache's own result.
            assert_eq!(get(other, key("q"), &[], &fetch).await, (format!("v{}", i + 2), CacheOutcome::Hit));
        }
        assert_eq!(get(&ours, key("q"), &[], &fetch).await, ("v1".into(), CacheOutcome::Hit));
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_moved_to_another_key_does_not_open() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        get(&cache, key("select secret"), &[], &fetch).await;
        let sealed = cache.sealed_entry(&key("select secret")).expect("stored");
        cache.plant_sealed(&key("select public"), sealed);
        assert_eq!(get(&cache, key("select public"), &[], &fetch).await, ("v2".into(), CacheOutcome::Miss));
        assert_eq!(cache.stats().integrity_failures, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_invalidates_readers_of_the_table_by_name() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        let reads_t = [table(None, "t")];
        let reads_u = [table(Some("app"), "u")];
        let reads_none: [TableRef; 0] = [];
        get(&cache, key("select t"), &reads_t, &fetch).await;
        get(&cache, key("select u"), &reads_u, &fetch).await;
        get(&cache, key("select 1"), &reads_none, &fetch).await;

        cache.invalidate(&Writes::None);
        cache.invalidate(&Writes::Tables(Vec::new()));
        cache.invalidate(&Writes::Tables(vec![table(None, "unrelated")]));
        assert_eq!(get(&cache, key("select t"), &reads_t, &fetch).await.1, CacheOutcome::Hit);

        cache.invalidate(&Writes::Tables(vec![table(Some("public"), "T")]));
        assert_eq!(get(&cache, key("select t"), &reads_t, &fetch).await, ("v4".into(), CacheOutcome::Miss));
        assert_eq!(get(&cache, key("select u"), &reads_u, &fetch).await, ("v2".into(), CacheOutcome::Hit));
        assert_eq!(get(&cache, key("select 1"), &reads_none, &fetch).await, ("v3".into(), CacheOutcome::Hit));

        // A differently qualified write to the same name over-invalidates, which is safe.
        cache.invalidate(&Writes::Tables(vec![table(Some("other"), "u")]));
        assert_eq!(get(&cache, key("select u"), &reads_u, &fetch).await, ("v5".into(), CacheOutcome::Miss));

        cache.invalidate(&Writes::Unknown);
        assert_eq!(get(&cache, key("select t"), &reads_t, &fetch).await, ("v6".into(), CacheOutcome::Miss));
        assert_eq!(get(&cache, key("select u"), &reads_u, &fetch).await, ("v7".into(), CacheOutcome::Miss));
        assert_eq!(get(&cache, key("select 1"), &reads_none, &fetch).await, ("v8".into(), CacheOutcome::Miss));

        cache.invalidate_all();
        assert_eq!(get(&cache, key("select 1"), &reads_none, &fetch).await, ("v9".into(), CacheOutcome::Miss));
        assert_eq!(cache.stats().invalidations, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn many_written_table_names_fold_into_a_database_wide_invalidation() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        let reads = [table(None, "kept")];
        get(&cache, key("q"), &reads, &fetch).await;
        for i in 0..MAX_TRACKED_TABLES + 10 {
            cache.invalidate(&Writes::Tables(vec![table(None, &format!("t{i}"))]));
        }
        assert!(cache.inner.lock().table_invalidated_at.len() <= MAX_TRACKED_TABLES);
        assert_eq!(get(&cache, key("q"), &reads, &fetch).await, ("v2".into(), CacheOutcome::Miss));
        cache.invalidate(&Writes::Tables(vec![table(None, "t1")]));
        assert_eq!(get(&cache, key("q"), &reads, &fetch).await, ("v2".into(), CacheOutcome::Hit));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_during_a_fetch_keeps_its_result_out_of_the_cache() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let (started, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let fetch = gated(&calls, &started, &gate);
        let reads = [table(None, "t")];
        for (write, stored) in [(table(Some("public"), "t"), false), (table(None, "other"), true)] {
            let task = {
                let (cache, fetch, reads) = (Arc::clone(&cache), Arc::clone(&fetch), reads.clone());
                tokio::spawn(async move { get(&cache, key("q"), &reads, &fetch).await })
            };
            started.notified().await;
            cache.invalidate(&Writes::Tables(vec![write]));
            gate.notify_one();
            assert_eq!(task.await.expect("task").1, CacheOutcome::Miss);
            assert_eq!(cache.stats().entries, u64::from(stored));
        }
        assert_eq!(get(&cache, key("q"), &reads, &fetch).await, ("v2".into(), CacheOutcome::Hit));
    }

    #[tokio::test(start_paused = true)]
    async fn unstorable_and_too_large_results_are_never_stored() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let unstorable = {
            let calls = Arc::clone(&calls);
            fetcher(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(Fetched { bytes: Bytes::from_static(b"ERROR"), store: false }) }
            })
        };
        let too_large = {
            let calls = Arc::clone(&calls);
            fetcher(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok(Fetched { bytes: Bytes::from(vec![7u8; 1025]), store: true }) }
            })
        };
        for _ in 0..2 {
            assert_eq!(get(&cache, key("a"), &[], &unstorable).await, ("ERROR".into(), CacheOutcome::Bypass));
            let (bytes, outcome) = cache.get_or_fetch(key("b"), &[], Arc::clone(&too_large)).await.expect("fetch");
            assert_eq!((bytes.len(), outcome), (1025, CacheOutcome::Miss));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let stats = cache.stats();
        assert_eq!((stats.bypass, stats.too_large, stats.misses, stats.entries, stats.bytes), (2, 2, 2, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn fetch_errors_are_returned_and_not_stored() {
        let cache = cache();
        let failing = fetcher(|| async { Err(()) });
        assert_eq!(cache.get_or_fetch(key("q"), &[], Arc::clone(&failing)).await, Err(()));
        assert_eq!(cache.get_or_fetch(key("q"), &[], failing).await, Err(()));
        let stats = cache.stats();
        assert_eq!((stats.fetch_errors, stats.entries), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_within_max_bytes_and_evicts_least_recently_used() {
        let max_bytes = 10_000;
        let cache = QueryCache::new("t", "d", CacheSettings { max_bytes, ..settings() });
        let value = fetcher(|| async { Ok(Fetched { bytes: Bytes::from(vec![1u8; 500]), store: true }) });
        let reads = [table(None, "t")];
        get(&cache, key("hot"), &reads, &value).await;
        for i in 0..200 {
            get(&cache, key(&format!("q{i}")), &reads, &value).await;
            assert!(cache.stats().bytes <= max_bytes);
            // Kept recently used, so it is never the one evicted.
            assert_eq!(get(&cache, key("hot"), &reads, &value).await.1, CacheOutcome::Hit);
        }
        let stats = cache.stats();
        assert!(stats.evictions >= 180, "{stats:?}");
        assert!(stats.entries < 20 && stats.entries > 1, "{stats:?}");
        assert_eq!(stats.entries, cache.inner.lock().entries.len() as u64);
        assert_eq!(get(&cache, key("q199"), &reads, &value).await.1, CacheOutcome::Hit);
        assert_eq!(get(&cache, key("q0"), &reads, &value).await.1, CacheOutcome::Miss);

        // An entry heavier than the whole cache is refused rather than emptying it.
        let tiny = QueryCache::new("t", "d", CacheSettings { max_bytes: 600, ..settings() });
        get(&tiny, key("q"), &reads, &value).await;
        assert_eq!((tiny.stats().entries, tiny.stats().too_large), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn stored_values_are_encrypted() {
        let cache = cache();
        let secret = Bytes::from_static(b"credit-card 4111-1111-1111-1111 belongs to alice");
        let fetch = {
            let secret = secret.clone();
            fetcher(move || {
                let secret = secret.clone();
                async move { Ok(Fetched { bytes: secret, store: true }) }
            })
        };
        get(&cache, key("select card from cards"), &[], &fetch).await;
        let sealed = cache.sealed_entry(&key("select card from cards")).expect("stored");
        assert_eq!(sealed.len(), NONCE_LEN + secret.len() + 16);
        assert!(!sealed.windows(8).any(|w| secret.windows(8).any(|s| s == w)));
        // Same value, fresh nonce: no two entries share a ciphertext.
        get(&cache, key("select card from cards limit 1"), &[], &fetch).await;
        assert_ne!(cache.sealed_entry(&key("select card from cards limit 1")).expect("stored")[NONCE_LEN..], sealed[NONCE_LEN..]);
        let digest = cache.inner.digest(&key("select card from cards"));
        assert!(!digest.windows(4).any(|w| b"select card".windows(4).any(|s| s == w)));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_process_secret_nothing_is_stored() {
        let cache = QueryCache::with_master(None, "t", "d", settings());
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = counting(&calls);
        assert_eq!(get(&cache, key("q"), &[], &fetch).await.1, CacheOutcome::Miss);
        assert_eq!(get(&cache, key("q"), &[], &fetch).await.1, CacheOutcome::Miss);
        assert_eq!(cache.stats().entries, 0);
    }
}
