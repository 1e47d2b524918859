//! The floor for the `bindings` benchmark: the requests of the
//! `tests/guests/bindings` guest, served by hyper straight against SQLite,
//! with no sandbox, no routing and no per-request instance.
//!
//! It answers the same requests with the same bodies, so `run.sh` sends both
//! servers identical traffic:
//!
//! - `GET /kv?op=get&key=K`: the value as text, or `(none)`;
//! - `GET /kv?op=set&key=K&value=V`: stores V, answers `ok`;
//! - `POST /sql` with `{"sql": "...", "params": [...]}`: runs the statement
//!   and answers its rows as JSON (`columns`, `rows`, `rows_affected`,
//!   `last_insert_rowid`);
//! - anything else: 200 `bindings native`.
//!
//! Other query parameters (`binding=`) are ignored. A failure answers 500
//! `error: <message>`.
//!
//! Storage is set up as `crates/kv` and `crates/sql` set up theirs, so that
//! the SQLite work per request is the same and the difference between the two
//! servers is what Cordon adds: one connection per database file behind a
//! mutex, WAL with `synchronous=FULL` (every write fsyncs before it is
//! answered), calls run on tokio's blocking pool, the key-value table and
//! statements of `crates/kv/src/store.rs`. Unlike Cordon's SQL binding it
//! caches prepared statements and runs a statement in autocommit mode, with
//! no authorizer or limits: the fastest a native server would do it.
//!
//! Usage: `bindings-native 127.0.0.1:PORT DATA_DIR` (creates
//! `DATA_DIR/kv.sqlite3` and `DATA_DIR/sql.sqlite3`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params, params_from_iter};
use serde_json::{Value as Json, json};
use tokio::net::TcpListener;

/// Cordon's default `limits.max_request_body_bytes`.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// As in `crates/kv` and `crates/sql`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The key-value table of `crates/kv/src/store.rs`.
const KV_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS kv (
        key BLOB PRIMARY KEY NOT NULL,
        value BLOB NOT NULL,
        expires_at INTEGER
    ) WITHOUT ROWID, STRICT;
    CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;
";

/// Expired entries one write purges, as `crates/kv` does.
const PURGE_PER_WRITE: i64 = 16;

struct Storage {
    kv: Mutex<Connection>,
    sql: Mutex<Connection>,
}

type Reply = Result<(StatusCode, String), String>;

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(data_dir), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: bindings-native <ip:port> <data-dir>");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| {
        eprintln!("bindings-native: invalid address {addr:?}: {e}");
        std::process::exit(2);
    });
    let storage = match open_storage(Path::new(&data_dir)) {
        Ok(storage) => Arc::new(storage),
        Err(e) => {
            eprintln!("bindings-native: cannot open the databases in {data_dir}: {e}");
            std::process::exit(1);
        }
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("failed to build tokio runtime");
    if let Err(e) = runtime.block_on(serve(addr, storage)) {
        eprintln!("bindings-native: {e}");
        std::process::exit(1);
    }
}

fn open_storage(dir: &Path) -> rusqlite::Result<Storage> {
    let kv = open(&dir.join("kv.sqlite3"))?;
    kv.execute_batch(KV_SCHEMA)?;
    let sql = open(&dir.join("sql.sqlite3"))?;
    Ok(Storage { kv: Mutex::new(kv), sql: Mutex::new(sql) })
}

/// The settings both Cordon bindings use; NO_MUTEX because our own mutex
/// serialises each connection.
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        eprintln!("bindings-native: warning: {} is in journal mode {mode}, not WAL", path.display());
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

async fn serve(addr: SocketAddr, storage: Arc<Storage>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("bindings-native listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Transient errors such as EMFILE must not kill the server.
                eprintln!("bindings-native: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let storage = Arc::clone(&storage);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&storage), req));
            // Clients closing mid-request is normal under load; ignore it.
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(storage: Arc<Storage>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let query = req.uri().query().unwrap_or_default().to_owned();
    let reply = match (req.method(), req.uri().path()) {
        (_, "/kv") => blocking(move || kv(&storage, &query)).await,
        (&Method::POST, "/sql") => match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                blocking(move || sql(&storage, &body)).await
            }
            Err(e) => Err(format!("reading the body failed: {e}")),
        },
        _ => Ok((StatusCode::OK, "bindings native\n".to_owned())),
    };
    let (status, text) = reply.unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("error: {e}")));
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    Ok(resp)
}

/// Runs a SQLite call on the blocking pool, as Cordon's bindings do.
async fn blocking(f: impl FnOnce() -> Reply + Send + 'static) -> Reply {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(format!("the call did not complete: {e}")))
}

/// The same query parsing as the guest: no percent-decoding.
fn param<'a>(query: &'a str, key: &str) -> &'a str {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map_or("", |(_, v)| v)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The statements of `crates/kv/src/store.rs`: a read filters out expired
/// entries; a write is an upsert plus a bounded purge of expired entries in
/// one `IMMEDIATE` transaction.
fn kv(storage: &Storage, query: &str) -> Reply {
    let key = param(query, "key");
    if key.is_empty() {
        return Err("the key is empty".to_owned());
    }
    let now = now_ms();
    let mut conn = lock(&storage.kv);
    let text = match param(query, "op") {
        "get" => kv_get(&conn, key, now)
            .map_err(|e| e.to_string())?
            .map_or_else(|| "(none)".to_owned(), |v| String::from_utf8_lossy(&v).into_owned()),
        "set" => kv_set(&mut conn, key, param(query, "value"), now).map(|()| "ok".to_owned()).map_err(|e| e.to_string())?,
        other => format!("unknown op {other}"),
    };
    Ok((StatusCode::OK, text))
}

fn kv_get(conn: &Connection, key: &str, now: i64) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT value FROM kv WHERE key = :key AND (expires_at IS NULL OR expires_at > :now)")?
        .query_row(rusqlite::named_params! { ":key": key.as_bytes(), ":now": now }, |r| r.get(0))
        .optional()
}

fn kv_set(conn: &mut Connection, key: &str, value: &str, now: i64) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached(
        "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
    )?
    .execute(params![key.as_bytes(), value.as_bytes(), None::<i64>])?;
    tx.prepare_cached("DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)")?
        .execute(params![now, PURGE_PER_WRITE])?;
    tx.commit()
}

/// One statement from `{"sql": "...", "params": [...]}`, answered as the
/// guest answers it.
fn sql(storage: &Storage, body: &[u8]) -> Reply {
    let request: Json = serde_json::from_slice(body).unwrap_or(Json::Null);
    let statement = request.get("sql").and_then(Json::as_str).unwrap_or_default();
    let params: Vec<Value> =
        request.get("params").and_then(Json::as_array).map(|list| list.iter().map(param_value).collect()).unwrap_or_default();

    let conn = lock(&storage.sql);
    let run = || -> rusqlite::Result<Json> {
        let mut stmt = conn.prepare_cached(statement)?;
        let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
        // Like Cordon, no row id for a statement that only reads.
        let writes = !stmt.readonly();
        let changes_before = conn.total_changes();
        let mut rows = Vec::new();
        let mut cursor = stmt.query(params_from_iter(params.iter()))?;
        while let Some(row) = cursor.next()? {
            let mut out = Vec::with_capacity(columns.len());
            for i in 0..columns.len() {
                out.push(json_value(row.get_ref(i)?));
            }
            rows.push(Json::Array(out));
        }
        drop(cursor);
        Ok(json!({
            "columns": columns,
            "rows": rows,
            "rows_affected": conn.total_changes() - changes_before,
            "last_insert_rowid": writes.then(|| conn.last_insert_rowid()),
        }))
    };
    run().map(|rows| (StatusCode::OK, rows.to_string())).map_err(|e| e.to_string())
}

/// The guest's mapping of JSON parameters to SQL values.
fn param_value(p: &Json) -> Value {
    match p {
        Json::Null | Json::Array(_) => Value::Null,
        Json::Bool(b) => Value::Integer(i64::from(*b)),
        Json::Number(n) => n.as_i64().map_or_else(|| Value::Real(n.as_f64().unwrap_or(0.0)), Value::Integer),
        Json::String(s) => Value::Text(s.clone()),
        Json::Object(o) => Value::Blob(
            o.get("blob").and_then(Json::as_array).map(|b| b.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect()).unwrap_or_default(),
        ),
    }
}

fn json_value(v: ValueRef<'_>) -> Json {
    match v {
        ValueRef::Null => Json::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(r) => json!(r),
        ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => json!({ "blob": b }),
    }
}
