//! The observable session state of an origin connection, read with one query, so that the pool
//! can prove a connection is back in the state it was opened in before another client gets it.
//!
//! The statement classifier sees `SET`, but not a setting changed by `UPDATE pg_settings`, by
//! `set_config(..., false)` inside a function, a view, a `DEFAULT` expression or a trigger, nor a
//! temporary table created that way; and the origin reports only some settings with
//! ParameterStatus (`search_path` is not among them before Postgres 18). So the pool reads the
//! state itself with [`PROBE_SQL`], and resets what it cannot read (every other setting, custom
//! ones such as `app.user_id` that row-level security policies read, and advisory locks) with
//! [`RESET_SQL`] each time a connection goes back.
//!
//! Every name and operator in the probe is qualified with `pg_catalog`, so a
//! `search_path` that puts a schema of the client's ahead of `pg_catalog` cannot answer for it.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::origin::{OriginError, ServerConn};
use crate::protocol::{ErrorFields, FrontendMessage, Severity, TransactionStatus};

/// One row, one round trip, a fraction of a millisecond: the roles, the settings that change
/// what a statement means or how its result is printed, temporary relations (they shadow the
/// client's own), LISTEN registrations, open cursors and SQL-level prepared statements. Every other setting, and session advisory locks, are not read
/// but reset with [`RESET_SQL`] whenever a connection goes back to the pool.
pub const PROBE_SQL: &str = "SELECT current_user, session_user, \
pg_catalog.current_setting('search_path'), pg_catalog.current_setting('TimeZone'), \
pg_catalog.current_setting('DateStyle'), pg_catalog.current_setting('IntervalStyle'), \
pg_catalog.current_setting('statement_timeout'), pg_catalog.current_setting('lock_timeout'), \
pg_catalog.current_setting('idle_in_transaction_session_timeout'), \
pg_catalog.current_setting('default_transaction_read_only'), pg_catalog.current_setting('transaction_read_only'), \
pg_catalog.current_setting('default_transaction_isolation'), pg_catalog.current_setting('extra_float_digits'), \
pg_catalog.current_setting('bytea_output'), pg_catalog.current_setting('row_security'), \
pg_catalog.current_setting('standard_conforming_strings'), pg_catalog.current_setting('client_encoding'), \
pg_catalog.current_setting('client_min_messages'), pg_catalog.current_setting('lc_monetary'), \
pg_catalog.current_setting('lc_numeric'), pg_catalog.current_setting('lc_time'), \
pg_catalog.current_setting('default_text_search_config'), pg_catalog.current_setting('xmloption'), \
CASE WHEN pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.=) 0::pg_catalog.oid THEN false ELSE \
EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema()) END, \
EXISTS (SELECT FROM pg_catalog.pg_listening_channels()), \
EXISTS (SELECT FROM pg_catalog.pg_cursors), \
EXISTS (SELECT FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql)";

/// Sent after the probe on a connection going back to the pool: every setting, custom ones
/// included (Postgres keeps undeclared custom settings such as `app.user_id` out of
/// `pg_settings`, so no query can list them), back to the value the connection was opened with;
/// no sequence state (`lastval()` would tell the next client another's last id), and no session
/// advisory lock left held.
pub const RESET_SQL: &str = "RESET ALL; DISCARD SEQUENCES; SELECT pg_catalog.pg_advisory_unlock_all()";

/// The state as the probe printed it: the DataRow's body, compared byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState(Bytes);

impl SessionState {
    pub fn from_data_row(body: Bytes) -> SessionState {
        SessionState(body)
    }

    /// A short digest of the state, for cache keys: two connections in different states give
    /// different keys, so a result computed under one is never served under the other.
    pub fn key(&self) -> String {
        let digest = Sha256::digest(&self.0);
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The probe's name as a prepared statement on each connection: parsed and planned once per
/// connection, it costs a fraction of the same text sent as a simple query.
const PROBE_STATEMENT: &str = "cordon_state_probe";

/// Queues the probe on `conn`; [`read`] reads its answer after whatever was queued before it.
/// `prepare` parses the probe first (on a new connection, and after `DISCARD ALL` dropped it).
///
/// With `reset_after`, the probe is followed by [`RESET_SQL`]: the connection is then clean if
/// the probe found it so.
pub fn queue(conn: &mut ServerConn, prepare: bool, reset_after: bool) -> Result<(), OriginError> {
    let buf = conn.write_buf();
    if prepare {
        FrontendMessage::Parse { name: PROBE_STATEMENT.to_owned(), query: PROBE_SQL.to_owned(), param_types: Vec::new() }.encode(buf)?;
    }
    FrontendMessage::Bind {
        portal: String::new(),
        statement: PROBE_STATEMENT.to_owned(),
        param_formats: Vec::new(),
        params: Vec::new(),
        result_formats: Vec::new(),
    }
    .encode(buf)?;
    FrontendMessage::Execute { portal: String::new(), max_rows: 0 }.encode(buf)?;
    FrontendMessage::Sync.encode(buf)?;
    if reset_after {
        FrontendMessage::Query(RESET_SQL.to_owned()).encode(buf)?;
    }
    Ok(())
}

/// Reads the probe's answer (and the reset's, with `reset_after`) up to the last
/// ReadyForQuery: the state, and whether the connection is idle.
pub async fn read(conn: &mut ServerConn, reset_after: bool) -> Result<(SessionState, TransactionStatus), OriginError> {
    let mut state = None;
    let mut error = None;
    let mut ready_left = if reset_after { 2 } else { 1 };
    loop {
        let frame = conn.read_frame().await?;
        match frame.tag {
            // The first row is the probe's; the reset's own row follows it.
            b'D' if state.is_none() => state = Some(SessionState::from_data_row(frame.body)),
            b'E' => {
                let fields = ErrorFields::parse(&frame.body)?;
                if matches!(fields.severity, Severity::Fatal | Severity::Panic) {
                    return Err(OriginError::Server(fields));
                }
                error.get_or_insert(fields);
            }
            b'Z' => {
                let status = TransactionStatus::from_ready_for_query(&frame)?;
                ready_left -= 1;
                if ready_left > 0 {
                    continue;
                }
                return match (error, state) {
                    (Some(fields), _) => Err(OriginError::Server(fields)),
                    (None, Some(state)) => Ok((state, status)),
                    (None, None) => Err(OriginError::Protocol("the session state probe returned no row".into())),
                };
            }
            _ => {}
        }
    }
}

/// Runs the probe on an otherwise idle connection.
pub async fn probe(conn: &mut ServerConn, prepare: bool, reset_after: bool) -> Result<(SessionState, TransactionStatus), OriginError> {
    queue(conn, prepare, reset_after)?;
    conn.flush().await?;
    read(conn, reset_after).await
}
