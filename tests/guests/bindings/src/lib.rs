//! Drives the capabilities from the request, so that the host's tests can
//! attack them through a real server. `tests/guests/README.md` is the
//! contract.

use cordon_sdk::kv::Store;
use cordon_sdk::postgres;
use cordon_sdk::sql::{Database, Rows, Value};
use cordon_sdk::{Error, config};
use serde_json::{Value as Json, json};
use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Bindings;

impl Guest for Bindings {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = request.path_with_query().unwrap_or_default();
        let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
        let result = match path {
            "/kv" => kv(query),
            "/sql" => sql(query, &read_body(&request)),
            "/pg" => pg(query, &read_body(&request)),
            "/pg-many" => pg_many(query),
            "/config" => config_get(query),
            "/config-all" => config::get_all().map(|all| all.iter().map(|(k, v)| format!("{k}={v}\n")).collect()),
            _ => Ok("bindings guest\n".to_string()),
        };
        match result {
            Ok(text) => respond(out, 200, &text),
            Err(e) => respond(out, 500, &format!("error: {:?}: {}", e.kind(), e.message())),
        }
    }
}

fn param(query: &str, key: &str) -> String {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v.to_string()).unwrap_or_default()
}

fn kv(query: &str) -> Result<String, Error> {
    let store = Store::open(&param(query, "binding"))?;
    let key = param(query, "key");
    let value = param(query, "value");
    Ok(match param(query, "op").as_str() {
        "get" => store.get_string(&key)?.unwrap_or_else(|| "(none)".into()),
        "set" => store.set(&key, value.as_bytes()).map(|()| "ok".to_string())?,
        "set-big" => {
            let n: usize = param(query, "bytes").parse().unwrap_or(0);
            store.set(&key, vec![b'v'; n]).map(|()| "ok".to_string())?
        }
        "ttl" => {
            let seconds: u64 = param(query, "seconds").parse().unwrap_or(1);
            store.set_with_ttl(&key, value.as_bytes(), std::time::Duration::from_secs(seconds)).map(|()| "ok".to_string())?
        }
        "delete" => store.delete(&key).map(|()| "ok".to_string())?,
        "exists" => store.exists(&key)?.to_string(),
        "incr" => store.increment(&key, param(query, "delta").parse().unwrap_or(1))?.to_string(),
        "get-many" => {
            // `key0` .. `key{n-1}` in one batch call; answers the bytes read.
            let n: usize = param(query, "n").parse().unwrap_or(1);
            let keys: Vec<String> = (0..n).map(|i| format!("{key}{i}")).collect();
            let values = store.get_many(&keys)?;
            format!("read {} bytes", values.iter().flatten().map(Vec::len).sum::<usize>())
        }
        "list" => store.keys_with_prefix(&param(query, "prefix")).collect::<Result<Vec<_>, _>>()?.join("\n"),
        "many" => {
            // `n` separate operations, to reach the per-request limit.
            let n: u64 = param(query, "n").parse().unwrap_or(1);
            for i in 0..n {
                store.set(&format!("{key}{i}"), b"x")?;
            }
            format!("did {n}")
        }
        other => format!("unknown op {other}"),
    })
}

fn config_get(query: &str) -> Result<String, Error> {
    let value = config::get(&param(query, "key"))?;
    if param(query, "then") == "panic" {
        // The worker fails while holding the value: nothing of it may reach the logs.
        panic!("failing on purpose after reading a config value");
    }
    Ok(value.unwrap_or_else(|| "(none)".into()))
}

/// The body is JSON: `{"sql": "...", "params": [...]}` for one statement,
/// or `{"batch": [{"sql": ..., "params": [...]}, ...]}`. Parameters map
/// null, integers, floats and strings to SQL; `{"blob": [bytes]}` is a blob.
/// The answer is JSON: one row set, a list of them, or for a failed batch
/// `{"failed_at": i, "error": "..."}`.
fn sql(query: &str, body: &[u8]) -> Result<String, Error> {
    let db = Database::open(&param(query, "binding"))?;
    let request: Json = serde_json::from_slice(body).unwrap_or(Json::Null);
    if let Some(batch) = request.get("batch").and_then(Json::as_array) {
        let statements: Vec<(&str, Vec<Value>)> =
            batch.iter().map(|s| (s.get("sql").and_then(Json::as_str).unwrap_or_default(), params(s))).collect();
        return Ok(match db.batch(&statements) {
            Ok(sets) => Json::Array(sets.iter().map(rows_json).collect()).to_string(),
            Err((i, e)) => json!({ "failed_at": i, "error": format!("{:?}: {}", e.kind(), e.message()) }).to_string(),
        });
    }
    let statement = request.get("sql").and_then(Json::as_str).unwrap_or_default();
    Ok(rows_json(&db.execute(statement, &params(&request))?).to_string())
}

fn params(statement: &Json) -> Vec<Value> {
    let list = statement.get("params").and_then(Json::as_array).cloned().unwrap_or_default();
    list.iter()
        .map(|p| match p {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Integer(i64::from(*b)),
            Json::Number(n) => n.as_i64().map(Value::Integer).unwrap_or_else(|| Value::Real(n.as_f64().unwrap_or(0.0))),
            Json::String(s) => Value::Text(s.clone()),
            Json::Object(o) => Value::Blob(
                o.get("blob")
                    .and_then(Json::as_array)
                    .map(|b| b.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect())
                    .unwrap_or_default(),
            ),
            Json::Array(_) => Value::Null,
        })
        .collect()
}

fn rows_json(rows: &Rows) -> Json {
    let value = |v: &Value| match v {
        Value::Null => Json::Null,
        Value::Integer(i) => json!(i),
        Value::Real(r) => json!(r),
        Value::Text(t) => json!(t),
        Value::Blob(b) => json!({ "blob": b }),
    };
    json!({
        "columns": rows.columns,
        "rows": rows.rows.iter().map(|r| r.iter().map(value).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "rows_affected": rows.rows_affected,
        "last_insert_rowid": rows.last_insert_rowid,
    })
}

/// Like `/sql`, for `cordon:postgres`: `{"sql": "...", "params": [...]}`
/// answers one result as JSON (`columns` with names and type OIDs, `rows`,
/// `rows_affected`, `cached`); `{"transaction": [{"sql", "params"}, ...]}`
/// answers a list of them, or `{"failed_at": i, "error": "..."}`.
/// Parameters: JSON null, booleans, integers, floats, strings, and
/// `{"bytes": [...]}` for bytea.
fn pg(query: &str, body: &[u8]) -> Result<String, Error> {
    let db = postgres::Database::open(&param(query, "binding"));
    let request: Json = serde_json::from_slice(body).unwrap_or(Json::Null);
    if let Some(statements) = request.get("transaction").and_then(Json::as_array) {
        let statements: Vec<(&str, Vec<postgres::Value>)> =
            statements.iter().map(|s| (s.get("sql").and_then(Json::as_str).unwrap_or_default(), pg_params(s))).collect();
        return Ok(match db.transaction(&statements) {
            Ok(results) => Json::Array(results.iter().map(pg_json).collect()).to_string(),
            Err((i, e)) => json!({ "failed_at": i, "error": format!("{:?}: {}", e.kind(), e.message()) }).to_string(),
        });
    }
    let statement = request.get("sql").and_then(Json::as_str).unwrap_or_default();
    Ok(pg_json(&db.query(statement, &pg_params(&request))?).to_string())
}

/// `n` separate one-statement calls, to reach the per-request budget.
fn pg_many(query: &str) -> Result<String, Error> {
    let db = postgres::Database::open(&param(query, "binding"));
    let n: i64 = param(query, "n").parse().unwrap_or(1);
    for i in 0..n {
        db.query("SELECT $1::int8 AS i", &[i.into()])?;
    }
    Ok(format!("did {n}"))
}

fn pg_params(statement: &Json) -> Vec<postgres::Value> {
    use postgres::Value;
    let list = statement.get("params").and_then(Json::as_array).cloned().unwrap_or_default();
    list.iter()
        .map(|p| match p {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Boolean(*b),
            Json::Number(n) => n.as_i64().map(Value::Int).unwrap_or_else(|| Value::Float(n.as_f64().unwrap_or(0.0))),
            Json::String(s) => Value::Text(s.clone()),
            Json::Object(o) => Value::Bytes(
                o.get("bytes")
                    .and_then(Json::as_array)
                    .map(|b| b.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect())
                    .unwrap_or_default(),
            ),
            Json::Array(_) => Value::Null,
        })
        .collect()
}

fn pg_json(rows: &postgres::Rows) -> Json {
    use postgres::Value;
    let value = |v: &Value| match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Text(t) => json!(t),
        Value::Bytes(b) => json!({ "bytes": b }),
    };
    json!({
        "columns": rows.columns.iter().map(|c| json!({ "name": c.name, "type_oid": c.type_oid })).collect::<Vec<_>>(),
        "rows": rows.rows.iter().map(|r| r.iter().map(value).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "rows_affected": rows.rows_affected,
        "cached": rows.cached,
    })
}

fn read_body(request: &IncomingRequest) -> Vec<u8> {
    let mut bytes = Vec::new();
    let Ok(body) = request.consume() else { return bytes };
    let Ok(stream) = body.stream() else { return bytes };
    while let Ok(chunk) = stream.blocking_read(4096) {
        bytes.extend_from_slice(&chunk);
    }
    bytes
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).expect("a valid status");
    let body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().expect("the body stream is taken once");
    for piece in text.as_bytes().chunks(4096) {
        if stream.blocking_write_and_flush(piece).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

wasi::http::proxy::export!(Bindings);
