//! Parameterised statements on behalf of workers: the core of the `cordon:postgres` binding.
//!
//! Statements always go through the extended protocol with their parameters bound separately,
//! so a parameter can never become SQL. Results are requested in text format and decoded by
//! column type into a small set of values. Reads that the classifier finds cacheable are served
//! from the database's cache, under a role of their own that no proxy user can have.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};

use crate::accel::Database;
use crate::cache::{CacheKey, CacheOutcome};
use crate::classify::{Classification, MAX_SQL_BYTES, has_multiple_statements};
use crate::origin::OriginError;
use crate::pool::{PooledConn, Release, describe_origin_error};
use crate::protocol::{ErrorFields, Frame, FrontendMessage, TransactionStatus};
use crate::proxy::{ExtendedRequest, FetchError, Prepared, fetch_extended};

/// The cache role of worker bindings: a control character cannot appear in a proxy user name.
const BINDING_ROLE: &str = "\u{1}binding";
/// Most parameters a statement may carry (the protocol's own limit).
const MAX_PARAMS: usize = u16::MAX as usize;

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The Postgres type OID.
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    /// Rows inserted, updated, deleted or returned, from the command tag.
    pub rows_affected: u64,
    /// Whether the result came from the cache.
    pub cached: bool,
}

/// Why a statement did not run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueryError {
    /// The origin refused or failed the statement; `code` is its SQLSTATE.
    #[error("{message} (SQLSTATE {code})")]
    Database { code: String, message: String },
    /// No origin connection could be had (pool limits, origin down).
    #[error("{message} (SQLSTATE {code})")]
    Unavailable { code: String, message: String },
    #[error("the result is larger than {limit} bytes")]
    ResultTooLarge { limit: usize },
    #[error("{0}")]
    Invalid(String),
}

impl QueryError {
    fn from_fields(fields: &ErrorFields) -> Self {
        QueryError::Database { code: fields.code.clone(), message: fields.message.clone() }
    }
}

/// Limits of one call.
#[derive(Debug, Clone, Copy)]
pub struct ExecLimits {
    /// Largest encoded result, in bytes.
    pub max_result_bytes: usize,
}

impl Database {
    /// Runs one parameterised statement outside any transaction.
    pub async fn query(self: &Arc<Self>, sql: &str, params: &[Value], limits: ExecLimits) -> Result<QueryResult, QueryError> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let class = self.analyse(sql).await?;
        self.check_session_limits(sql)?;
        let request = Arc::new(request(sql, params, class)?);
        let class = &request.prepared.class;
        let cacheable = request.prepared.cacheable
            && self.cache.is_some()
            && self.cache_refusal(class, &request.params, &request.prepared.param_types).await.is_none();
        let max_bytes = match &self.cache {
            Some(_) if cacheable => limits.max_result_bytes.min(self.cache_max_entry_bytes),
            _ => limits.max_result_bytes,
        };
        let state = self.pool.state_key();
        let fetch = fetch_extended(self.pool.clone(), request.clone(), max_bytes, state.clone());
        let (bytes, cached) = match (&self.cache, cacheable, &class.normalized) {
            (Some(cache), true, Some(normalized)) => {
                let key = CacheKey {
                    role: BINDING_ROLE.to_owned(),
                    session: state,
                    query: format!("{normalized}\u{0}{:?}", request.prepared.param_types),
                    params: request.params.clone(),
                    formats: vec![i16::MIN, 1],
                    protocol: b'E',
                };
                match cache.get_or_fetch(key, &class.reads, fetch.clone()).await {
                    Ok((bytes, outcome)) => {
                        self.counters.count_cache(outcome);
                        (bytes, matches!(outcome, CacheOutcome::Hit | CacheOutcome::StaleHit | CacheOutcome::Coalesced))
                    }
                    // Too large for a cache entry, but maybe within the caller's own limit.
                    Err(FetchError::TooLarge) if max_bytes < limits.max_result_bytes => {
                        let fetch = fetch_extended(self.pool.clone(), request.clone(), limits.max_result_bytes, String::new());
                        (fetch().await.map_err(|e| fetch_error(e, limits))?.bytes, false)
                    }
                    Err(error) => return Err(fetch_error(error, limits)),
                }
            }
            _ => {
                if !request.prepared.cacheable {
                    self.counters.uncacheable.fetch_add(1, Ordering::Relaxed);
                }
                (fetch().await.map_err(|e| fetch_error(e, limits))?.bytes, false)
            }
        };
        let result = decode_result(bytes, cached);
        self.invalidate(&self.invalidation(class));
        result
    }

    /// Classifies a statement of the binding, refusing what the binding does not run: more than
    /// one statement (found by a lexical scan, before any parsing) and text beyond the
    /// classification budget.
    async fn analyse(&self, sql: &str) -> Result<Classification, QueryError> {
        if sql.len() > MAX_SQL_BYTES {
            return Err(QueryError::Invalid(format!("the statement is longer than {MAX_SQL_BYTES} bytes")));
        }
        if has_multiple_statements(sql) {
            // The code Postgres gives a prepared statement with several commands.
            return Err(QueryError::Database {
                code: "42601".into(),
                message: "the text holds more than one statement; send one statement per call".into(),
            });
        }
        let class = self.classifier.classify(sql, false).await;
        if let Some(reason) = &class.over_budget {
            return Err(QueryError::Invalid(format!("the statement is too large or too complex to analyse ({reason}); simplify it")));
        }
        Ok(class)
    }

    /// Runs statements in one transaction: all of them commit, or none does. Returns one result
    /// per statement; the error of a failed statement names its index.
    pub async fn transaction(
        self: &Arc<Self>,
        statements: &[(String, Vec<Value>)],
        limits: ExecLimits,
    ) -> Result<Vec<QueryResult>, (usize, QueryError)> {
        let mut requests = Vec::with_capacity(statements.len());
        for (i, (sql, params)) in statements.iter().enumerate() {
            let class = self.analyse(sql).await.map_err(|e| (i, e))?;
            self.check_session_limits(sql).map_err(|e| (i, e))?;
            requests.push(request(sql, params, class).map_err(|e| (i, e))?);
        }
        let mut conn = self.pool.acquire().await.map_err(|e| {
            let fields = e.to_error_fields();
            (0, QueryError::Unavailable { code: fields.code, message: fields.message })
        })?;
        // Anything that goes wrong below leaves the connection to be rolled back and reset.
        conn.mark(Release::Reset);
        let lost =
            |i: usize, e: OriginError| (i, QueryError::Unavailable { code: e.sqlstate().to_owned(), message: describe_origin_error(&e) });
        match conn.simple_query("BEGIN").await {
            Ok(TransactionStatus::InTransaction) => {}
            Ok(_) => return Err((0, QueryError::Invalid("the origin did not open a transaction".into()))),
            Err(e) => return Err(lost(0, e)),
        }
        let mut results = Vec::with_capacity(requests.len());
        let mut writes = Vec::new();
        let mut used = 0usize;
        for (i, request) in requests.iter().enumerate() {
            self.counters.queries.fetch_add(1, Ordering::Relaxed);
            let bytes =
                run_on(&mut conn, request, limits.max_result_bytes.saturating_sub(used)).await.map_err(|e| (i, fetch_error(e, limits)))?;
            used += bytes.len();
            results.push(decode_result(bytes, false).map_err(|e| (i, e))?);
            writes.push(&request.prepared.class);
        }
        match conn.simple_query("COMMIT").await {
            Ok(TransactionStatus::Idle) => {}
            Ok(_) => return Err((requests.len(), QueryError::Invalid("the transaction did not commit".into()))),
            Err(OriginError::Server(fields)) => return Err((requests.len(), QueryError::from_fields(&fields))),
            Err(e) => return Err(lost(requests.len(), e)),
        }
        // Judged now, after the commit, against the catalog as it is now.
        for class in writes {
            self.invalidate(&self.invalidation(class));
        }
        // Committed and idle. Statements that leave session state were refused up front, but one
        // may still have changed it unseen (a function calling set_config): the pool probes the
        // connection before anyone else gets it, and resets it if it changed.
        conn.set_release(Release::Clean);
        Ok(results)
    }

    /// Refuses a statement that would raise a timeout past the database's maximum.
    fn check_session_limits(&self, sql: &str) -> Result<(), QueryError> {
        match self.session_limits.check(sql) {
            None => Ok(()),
            Some(reason) => {
                self.counters.timeout_changes_refused.fetch_add(1, Ordering::Relaxed);
                Err(QueryError::Database { code: "42501".into(), message: format!("refused by Cordon: {reason}") })
            }
        }
    }
}

/// Runs one request on a connection inside a transaction.
async fn run_on(conn: &mut PooledConn, request: &ExtendedRequest, max_bytes: usize) -> Result<Bytes, FetchError> {
    let encode = |e: crate::protocol::ProtocolError| FetchError::Pool(e.to_error_fields());
    let buf = conn.conn.write_buf();
    FrontendMessage::Parse {
        name: String::new(),
        query: request.prepared.query.clone(),
        param_types: request.prepared.param_types.clone(),
    }
    .encode(buf)
    .map_err(encode)?;
    request.encode_execution(buf, "").map_err(encode)?;
    let fetched = crate::proxy::collect_response(conn, max_bytes, 1).await?;
    Ok(fetched.bytes)
}

fn fetch_error(error: FetchError, limits: ExecLimits) -> QueryError {
    match error {
        FetchError::Pool(fields) => QueryError::Unavailable { code: fields.code, message: fields.message },
        FetchError::TooLarge => QueryError::ResultTooLarge { limit: limits.max_result_bytes },
    }
}

/// Builds the extended-protocol request: parameters in text format with types left to the origin
/// to infer, except where the value's kind decides the type.
fn request(sql: &str, params: &[Value], class: Classification) -> Result<ExtendedRequest, QueryError> {
    if params.len() > MAX_PARAMS {
        return Err(QueryError::Invalid(format!("{} parameters given; at most {MAX_PARAMS} are allowed", params.len())));
    }
    if sql.contains('\0') {
        return Err(QueryError::Invalid("the statement contains a NUL character".into()));
    }
    let mut param_types = Vec::with_capacity(params.len());
    let mut values = Vec::with_capacity(params.len());
    for value in params {
        // 0 lets the origin infer the type from context, like an untyped literal; bytes are
        // declared bytea so that they are never read as text.
        let (oid, text) = match value {
            Value::Null => (0, None),
            Value::Bool(b) => (0, Some(if *b { "true".to_owned() } else { "false".to_owned() })),
            Value::Int(i) => (0, Some(i.to_string())),
            Value::Float(f) => (0, Some(float_text(*f))),
            Value::Text(s) => {
                if s.contains('\0') {
                    return Err(QueryError::Invalid("a text parameter contains a NUL character; pass it as bytes".into()));
                }
                (0, Some(s.clone()))
            }
            Value::Bytes(b) => (17, Some(format!("\\x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()))),
        };
        param_types.push(oid);
        values.push(text.map(Bytes::from));
    }
    let prepared = Prepared::new(sql.to_owned(), param_types, class);
    if let Some(reason) = &prepared.class.pins_session {
        return Err(QueryError::Invalid(format!(
            "statements that leave session state are not allowed through the binding ({reason}); use SET LOCAL inside a transaction"
        )));
    }
    if prepared.class.transaction_control.is_some() {
        return Err(QueryError::Invalid("transaction control is not allowed in a statement; use the transaction call".into()));
    }
    Ok(ExtendedRequest {
        prepared: Arc::new(prepared),
        param_formats: Vec::new(),
        params: values,
        result_formats: Vec::new(),
        describe: true,
    })
}

fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{f:?}")
    }
}

/// Decodes the encoded response frames (RowDescription, DataRows, CommandComplete, or an
/// ErrorResponse) into a result.
fn decode_result(bytes: Bytes, cached: bool) -> Result<QueryResult, QueryError> {
    let malformed = || QueryError::Invalid("malformed response from the origin".into());
    let mut buf = BytesMut::from(&bytes[..]);
    let limits = crate::protocol::Limits { max_message_bytes: usize::MAX >> 1, max_read_ahead: usize::MAX >> 1, ..Default::default() };
    let mut result = QueryResult { columns: Vec::new(), rows: Vec::new(), rows_affected: 0, cached };
    while let Some(frame) = crate::protocol::decode_frame(&mut buf, &limits).map_err(|_| malformed())? {
        match frame.tag {
            b'E' => return Err(QueryError::from_fields(&ErrorFields::parse(&frame.body).map_err(|_| malformed())?)),
            b'T' => result.columns = row_description(&frame).ok_or_else(malformed)?,
            b'D' => result.rows.push(data_row(&frame, &result.columns).ok_or_else(malformed)?),
            b'C' => {
                let tag = frame.body.strip_suffix(b"\0").unwrap_or(&frame.body);
                let tag = std::str::from_utf8(tag).map_err(|_| malformed())?;
                result.rows_affected = tag.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            _ => {}
        }
    }
    Ok(result)
}

fn row_description(frame: &Frame) -> Option<Vec<Column>> {
    let mut body = frame.body.clone();
    if body.remaining() < 2 {
        return None;
    }
    let count = body.get_i16();
    let mut columns = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        let end = body.iter().position(|b| *b == 0)?;
        let name = String::from_utf8(body.split_to(end).to_vec()).ok()?;
        body.advance(1);
        if body.remaining() < 18 {
            return None;
        }
        body.advance(6);
        let type_oid = body.get_u32();
        body.advance(8);
        columns.push(Column { name, type_oid });
    }
    Some(columns)
}

fn data_row(frame: &Frame, columns: &[Column]) -> Option<Vec<Value>> {
    let mut body = frame.body.clone();
    if body.remaining() < 2 {
        return None;
    }
    let count = body.get_i16();
    let mut row = Vec::with_capacity(count.max(0) as usize);
    for i in 0..count.max(0) as usize {
        if body.remaining() < 4 {
            return None;
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(Value::Null);
            continue;
        }
        if body.remaining() < len as usize {
            return None;
        }
        let raw = body.split_to(len as usize);
        let text = std::str::from_utf8(&raw).ok()?;
        row.push(decode_text(columns.get(i).map_or(0, |c| c.type_oid), text));
    }
    Some(row)
}

/// A text-format value by its type: booleans, integers, floats and bytea get their own kinds;
/// everything else (numeric, dates, json, arrays...) stays text, exactly as Postgres printed it.
fn decode_text(type_oid: u32, text: &str) -> Value {
    match type_oid {
        16 => Value::Bool(text == "t"),
        20 | 21 | 23 | 26 => text.parse().map(Value::Int).unwrap_or_else(|_| Value::Text(text.to_owned())),
        700 | 701 => match text {
            "NaN" => Value::Float(f64::NAN),
            "Infinity" => Value::Float(f64::INFINITY),
            "-Infinity" => Value::Float(f64::NEG_INFINITY),
            _ => text.parse().map(Value::Float).unwrap_or_else(|_| Value::Text(text.to_owned())),
        },
        17 => match text.strip_prefix("\\x").and_then(unhex) {
            Some(bytes) => Value::Bytes(bytes),
            None => Value::Text(text.to_owned()),
        },
        _ => Value::Text(text.to_owned()),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_by_type() {
        assert_eq!(decode_text(16, "t"), Value::Bool(true));
        assert_eq!(decode_text(20, "-9223372036854775808"), Value::Int(i64::MIN));
        assert_eq!(decode_text(701, "1.5"), Value::Float(1.5));
        assert_eq!(decode_text(17, "\\x00ff"), Value::Bytes(vec![0, 255]));
        assert_eq!(decode_text(1700, "3.14159265358979323846"), Value::Text("3.14159265358979323846".into()));
        assert!(matches!(decode_text(701, "NaN"), Value::Float(f) if f.is_nan()));
    }

    #[test]
    fn parameters_are_text_and_bytes_are_bytea() {
        let class = crate::classify::classify("SELECT $1, $2, $3", false);
        let built = request("SELECT $1, $2, $3", &[Value::Int(7), Value::Bytes(vec![1, 2]), Value::Null], class.clone()).unwrap();
        assert_eq!(built.prepared.param_types, vec![0, 17, 0]);
        assert_eq!(built.params, vec![Some(Bytes::from("7")), Some(Bytes::from("\\x0102")), None]);
        assert!(matches!(request("SELECT $1", &[Value::Text("a\0b".into())], class), Err(QueryError::Invalid(_))));
    }
}
