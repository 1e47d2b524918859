//! Statement classification: what the pooler and the query cache must do with one SQL text.
//!
//! The accelerator sees every statement a client sends (a simple-query text, or the query of a
//! Parse message with `$1..$n` parameters). [`classify`] tells it three things about that text:
//!
//! * may the result be served from, or stored in, the per-tenant query cache ([`Classification::cacheable`]),
//!   and which tables the cached result depends on ([`Classification::reads`]);
//! * which cached results the statement invalidates ([`Classification::writes`]);
//! * whether the client must stay pinned to its server connection because the statement leaves
//!   state behind in the server session ([`Classification::pins_session`]).
//!
//! # Fail closed
//!
//! A wrong "cacheable" serves stale or foreign data, a missing "writes" leaves stale entries behind and
//! a missing "pins" hands session state (a role, a temp table, a lock) to another client. Every path
//! that does not fully understand a statement therefore answers: not cacheable, writes
//! [`Writes::Unknown`] (invalidate the whole database), and pins the session unless the statement's
//! first keywords show it cannot change session state (a `SELECT` or DDL that mentions no
//! session-affecting function or `TEMP` object). Unparseable text, unrecognised statements and
//! expressions, calls to functions that are not known built-ins, and statements too large or too
//! deeply nested to parse safely all take that path.
//!
//! # Function policy
//!
//! Functions are judged by name against three lists (see [`is_cache_safe_function`]):
//!
//! * an allowlist of built-ins whose result depends only on their arguments (immutable), or in
//!   addition only on the server-reported formatting settings `TimeZone`, `DateStyle` and
//!   `IntervalStyle` (e.g. `date_trunc` on `timestamptz`, `concat`, `format`). Those settings already
//!   shape the text of plain column values, so the cache must key on them anyway;
//! * built-ins that are volatile or stable for other reasons (`now()`, `random()`, `current_user`,
//!   `current_setting`, `nextval`, `pg_backend_pid`, catalog lookups, `to_char` which depends on
//!   `lc_*`, ...). These make the query uncacheable but write nothing the cache holds;
//! * everything else, in particular user-defined functions and anything schema-qualified with a
//!   schema other than `pg_catalog`: uncacheable, and [`Writes::Unknown`] because a function may
//!   write any table.
//!
//! Calls to unknown functions do not pin the session, although a function could run `set_config`
//! or take an advisory lock internally: pinning on every function call would defeat pooling, and
//! this is the same contract PgBouncer's transaction mode has with applications.
//!
//! # What the caller still has to do
//!
//! A text classifier cannot see everything the cache depends on:
//!
//! * key entries on database, effective role, parameter values and types, result formats, and the
//!   server-reported settings (`TimeZone`, `DateStyle`, `IntervalStyle`, `client_encoding`,
//!   `standard_conforming_strings`);
//! * never use the cache for a session that has been pinned: its `search_path`, temp tables,
//!   settings or role may differ from the defaults the cached results were computed with;
//! * [`Writes::Tables`] names the tables in the statement only. Triggers, foreign-key `ON DELETE`/
//!   `ON UPDATE` actions, rules, partition routing and views that read a written table are
//!   invisible here; [`crate::catalog`] expands them from the origin's catalog, and also decides
//!   whether a function, operator or type named here is the tenant's own
//!   ([`Classification::functions`], [`Classification::operators`], [`Classification::types`]);
//! * bind parameters such as `'now'` or `'today'` make a timestamp comparison time-relative;
//!   [`is_time_relative_literal`] tells which values.
//!
//! # Parser safety
//!
//! `sqlparser`'s recursion limit does not cover every recursive path: parenthesised joins and chains
//! of `INTERVAL` recurse without counting, nested function calls take time exponential in their
//! depth (every argument is parsed twice), and in debug builds a few dozen nested `NOT`s already
//! exhaust a 2 MiB stack. So each statement's tokens are measured first; statements that
//! are too large, too deep or too costly are not parsed at all, shallow ones are parsed on the
//! caller's stack with a low recursion limit, and the rest on a short-lived thread with a large
//! stack and the parser's normal limit. A panic inside the parser is caught and classified as
//! unparseable.
//!
//! A text has one budget for all its statements: at most [`MAX_STATEMENTS`] statements, a total
//! measured parse cost of [`MAX_TEXT_COST`] (measured before anything is parsed) and
//! [`TIME_BUDGET`]; beyond any of them it fails closed, saying why in `Classification::over_budget`.
//! [`classify_inline`] answers only for texts cheap enough for a shared thread; the rest go to
//! [`crate::classifier`]'s pool, which runs [`classify_bounded`].

use std::borrow::Cow;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use sqlparser::ast::{
    AccessExpr, Assignment, CascadeOption, ContextModifier, CopySource, DataType, DeclareType, DiscardObject, Expr, FromTable, Function,
    FunctionArg, FunctionArgExpr, FunctionArgumentClause, FunctionArguments, GroupByExpr, Ident, JoinConstraint, JoinOperator, LimitClause,
    ListAggOnOverflow, MergeAction, MergeInsertKind, NamedWindowExpr, ObjectName, ObjectNamePart, ObjectType, OnConflictAction, OnInsert,
    OrderBy, OrderByExpr, OrderByKind, OutputClause, Query, Select, SelectItem, SelectItemQualifiedWildcardKind, Set, SetExpr, Statement,
    Subscript, TableFactor, TableObject, TableWithJoins, UpdateTableFromKind, Value, WildcardAdditionalOptions, WindowFrameBound,
    WindowSpec, WindowType, With, XmlTableColumnOption,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace};

/// What the pooler and the cache must do with one SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// Exactly one statement, read-only, calling only cache-safe functions, without a locking clause,
    /// writing nothing (data-modifying CTEs included), outside an explicit transaction, reading no
    /// temp table or system catalog and no session state: the result may be served from and stored
    /// in the cache.
    pub cacheable: bool,
    /// Why the text is not cacheable, for logs and metrics (`None` when cacheable).
    pub not_cacheable_because: Option<String>,
    /// Tables read, as cache dependency keys: identifiers lowercased unless quoted, schema only when
    /// written in the statement. CTE names are not tables and are left out.
    pub reads: Vec<TableRef>,
    /// What the statement writes, i.e. which cached results it invalidates.
    pub writes: Writes,
    /// The reason the client must stay pinned to its server connection until it disconnects, because
    /// the statement leaves session state behind: `SET` and `RESET` (but not `SET LOCAL`, which ends
    /// with the transaction), `SET ROLE`, `SET SESSION AUTHORIZATION`, `LISTEN`/`UNLISTEN`,
    /// session-level advisory locks (the `*_xact_*` variants end with the transaction and do not
    /// pin), temporary objects, SQL-level `PREPARE`, `DECLARE ... WITH HOLD`, `set_config(..., false)`,
    /// `LOAD`, `DISCARD`.
    pub pins_session: Option<String>,
    /// Transaction control, if the text contains any (the last one when there are several). The
    /// pooler tracks the transaction state from ReadyForQuery; this only says what was asked.
    pub transaction_control: Option<TxControl>,
    /// A requested change of the effective role: `Some(Some(role))` for `SET ROLE role` and
    /// `SET SESSION AUTHORIZATION role`, `Some(None)` for `RESET ROLE`, `SET ROLE NONE`,
    /// `SET SESSION AUTHORIZATION DEFAULT` and `DISCARD ALL`. This is only the request: the caller
    /// must apply it after the server confirms the command, and undo it if the enclosing transaction
    /// rolls back (a session-level `SET` inside a transaction is reverted by `ROLLBACK`). `SET LOCAL
    /// ROLE` is not reported: it ends with the transaction, inside which nothing is cacheable.
    pub role_change: Option<Option<String>>,
    /// The text normalised for cache keys: comments and whitespace removed, unquoted identifiers and
    /// keywords lowercased, literals and parameters kept exactly, so that two texts with the same key
    /// mean the same statement. `None` when a statement could not be parsed.
    ///
    /// It is rendered from the token stream rather than from the AST: the AST's `Display` is not
    /// guaranteed to be lossless, and a lossy key would serve one statement's result for another.
    pub normalized: Option<String>,
    /// Number of statements in the text (a multi-statement simple query is never cacheable); 1 when
    /// the text cannot even be tokenized.
    pub statement_count: usize,
    /// Functions called by an unqualified name (lowercased unless quoted), including the ones on the
    /// allowlist: a function of the same name outside `pg_catalog` on the origin may be what the call
    /// resolves to, which only the catalog can tell (see [`crate::catalog`]).
    pub functions: Vec<String>,
    /// Operators spelled in the text (adjacent operator characters joined, as the server reads them).
    pub operators: Vec<String>,
    /// Types cast to (`::t`, `CAST(x AS t)`, `t 'literal'`): the last part of the name, lowercased
    /// unless quoted, without array brackets or modifiers.
    pub types: Vec<String>,
    /// Why the text was not examined at all because it exceeds the classification budget (size,
    /// statements, parse cost or time), if it was not. The classification then fails closed.
    pub over_budget: Option<String>,
}

/// A table (or view, or sequence) named in a statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    /// The schema, when the statement qualified the name.
    pub schema: Option<String>,
    /// The relation name.
    pub name: String,
}

impl TableRef {
    /// A reference with the given (already normalised) schema and name.
    pub fn new(schema: Option<&str>, name: &str) -> Self {
        Self { schema: schema.map(str::to_owned), name: name.to_owned() }
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What a statement writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writes {
    /// Nothing the cache could hold.
    None,
    /// These tables (insert, update, delete, truncate, merge, `COPY FROM`, DDL on the table, `SELECT
    /// INTO`, writes inside CTEs, `nextval` on a named sequence).
    Tables(Vec<TableRef>),
    /// Possibly anything: invalidate every cached result of the database.
    Unknown,
}

/// Transaction control statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
    /// `SAVEPOINT name`.
    Savepoint,
    /// `RELEASE [SAVEPOINT] name`.
    Release,
    /// `ROLLBACK TO [SAVEPOINT] name`.
    RollbackToSavepoint,
}

/// Classifies one SQL text. `in_transaction` says whether the client is inside an explicit
/// transaction block, where nothing is cacheable (the transaction may already have written, and its
/// snapshot may be older than the cache's).
///
/// Never panics; anything not fully understood is classified fail-closed (see the module docs).
pub fn classify(sql: &str, in_transaction: bool) -> Classification {
    let budget = Budget { deadline: Some(Instant::now() + TIME_BUDGET), stop: &|| false };
    match classify_in(sql, in_transaction, Stack::SpawnLarge, &budget) {
        Some(classification) => classification,
        None => unreachable_classification(),
    }
}

/// Classifies `sql` on the caller's thread if that is cheap, or answers `None` when it is not: the
/// text is longer than [`INLINE_MAX_TEXT_BYTES`], has more than [`INLINE_MAX_STATEMENTS`]
/// statements, or a statement is deeper or costlier than the caller's stack and time allow. The
/// caller then classifies it elsewhere with [`classify_bounded`]. The worst case of this function
/// is tokenizing and measuring [`INLINE_MAX_TEXT_BYTES`] plus parsing statements of a total
/// measured cost of [`INLINE_MAX_TEXT_COST`] on the caller's stack.
pub fn classify_inline(sql: &str, in_transaction: bool) -> Option<Classification> {
    if sql.len() > INLINE_MAX_TEXT_BYTES {
        return None;
    }
    let budget = Budget { deadline: None, stop: &|| false };
    classify_in(sql, in_transaction, Stack::InlineOnly, &budget)
}

/// Classifies `sql` within `budget`, parsing on the current thread, which must have a stack of at
/// least [`LARGE_STACK_BYTES`] (the classification pool's threads do). `budget.stop` is asked
/// between statements; once it says stop, or the deadline passes, the text fails closed.
pub fn classify_bounded(sql: &str, in_transaction: bool, budget: &Budget<'_>) -> Classification {
    classify_in(sql, in_transaction, Stack::Large, budget).unwrap_or_else(unreachable_classification)
}

/// What a classification may spend beyond the fixed limits on size, statements and parse cost.
pub struct Budget<'a> {
    /// Statements not started by then are not parsed, and the text fails closed.
    pub deadline: Option<Instant>,
    /// Asked between statements: `true` abandons the text (the caller has gone away).
    pub stop: &'a dyn Fn() -> bool,
}

/// Where statements are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// The caller's stack, only when cheap: anything else answers `None`.
    InlineOnly,
    /// The current thread has a large stack.
    Large,
    /// Shallow statements on the caller's stack, the rest on a short-lived large-stack thread.
    SpawnLarge,
}

fn unreachable_classification() -> Classification {
    Classification::fail_closed(INTERNAL_ERROR.to_owned())
}

fn classify_in(sql: &str, in_transaction: bool, stack: Stack, budget: &Budget<'_>) -> Option<Classification> {
    if sql.len() > MAX_SQL_BYTES {
        return Some(Classification::over_budget(format!("statement text larger than {MAX_SQL_BYTES} bytes")));
    }
    // The tokenizer and parser are third-party code with explicit `panic!`s in places; such a panic
    // must not take the caller's task down. (Under `panic = "abort"` nothing can be caught; the
    // randomized test checks that this path is never taken.)
    match panic::catch_unwind(AssertUnwindSafe(|| classify_text(sql, in_transaction, stack, budget))) {
        Ok(classification) => classification,
        Err(_) => Some(Classification::fail_closed(INTERNAL_ERROR.to_owned())),
    }
}

/// Whether a SQL text holds more than one statement, by a lexical scan that parses nothing: it
/// follows quoted strings (including `E''` escapes and dollar quotes), quoted identifiers and
/// comments (nested), and looks for a `;` followed by anything but whitespace, comments and more
/// `;`. Linear in the text; meant to refuse multi-statement text before classifying it.
///
/// A `;` inside a SQL-standard function body (`BEGIN ATOMIC ... END`) counts as a separator.
pub fn has_multiple_statements(sql: &str) -> bool {
    let bytes = sql.as_bytes();
    let mut i = 0;
    let mut seen_separator = false;
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b if b.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            b';' => {
                seen_separator = true;
                i += 1;
                continue;
            }
            _ => {}
        }
        if seen_separator {
            return true;
        }
        match b {
            b'\'' => {
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E') && (i < 2 || !is_ident(bytes[i - 2]));
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' if escapes => i += 2,
                        b'\'' if bytes.get(i + 1) == Some(&b'\'') => i += 2,
                        b'\'' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match bytes[i] {
                        b'"' if bytes.get(i + 1) == Some(&b'"') => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'$' if i == 0 || !is_ident(bytes[i - 1]) => {
                // `$tag$ ... $tag$` (the tag may be empty); `$1` is a parameter.
                let tag_end =
                    bytes[i + 1..].iter().position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)).map(|n| i + 1 + n);
                match tag_end {
                    Some(end) if bytes[end] == b'$' && !bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                        let tag = &bytes[i..=end];
                        let body = end + 1;
                        match bytes[body..].windows(tag.len()).position(|w| w == tag) {
                            Some(n) => i = body + n + tag.len(),
                            None => i = bytes.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// Whether a call to `name` may appear in a cacheable query: `name` is a built-in, optionally
/// qualified with `pg_catalog`, on the allowlist of functions whose result depends only on their
/// arguments and the server-reported formatting settings. Matching is case-insensitive unless a part
/// is double-quoted. Functions that are cache-safe only with a certain number of arguments (`age`
/// with two, `to_tsvector` with an explicit configuration) are not on the list; [`classify`] accepts
/// them when called that way.
pub fn is_cache_safe_function(name: &str) -> bool {
    let parts: Vec<String> = name.split('.').map(|part| normalize_name_part(part.trim())).collect();
    match parts.as_slice() {
        [function] => CACHE_SAFE_FUNCTIONS.contains(&function.as_str()),
        [schema, function] if schema == "pg_catalog" => CACHE_SAFE_FUNCTIONS.contains(&function.as_str()),
        _ => false,
    }
}

/// Whether a string literal is one of Postgres's time-relative date/time inputs (`now`, `today`,
/// `tomorrow`, `yesterday`), which turn a literal or a text-format parameter into the current time
/// once it is coerced to a date/time type. Case-insensitive; matches whole words.
pub fn is_time_relative_literal(text: &str) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|word| ["now", "today", "tomorrow", "yesterday"].iter().any(|special| word.eq_ignore_ascii_case(special)))
}

/// Texts larger than this are not tokenized at all: tokens cost far more memory than the text.
pub const MAX_SQL_BYTES: usize = 1 << 20;
/// Statements per text that are classified; a text with more fails closed.
pub const MAX_STATEMENTS: usize = 256;
/// Measured parse cost (token visits, weighted by nesting) summed over the statements of one text, about 180 ms in a
/// release build; a text that would cost more fails closed without being parsed.
pub const MAX_TEXT_COST: u64 = 2 * MAX_PARSE_COST;
/// Time one text may take to classify; statements not started by then are not parsed.
pub const TIME_BUDGET: Duration = Duration::from_millis(250);
/// Largest text [`classify_inline`] examines on the caller's thread.
pub const INLINE_MAX_TEXT_BYTES: usize = 16 << 10;
/// Most statements [`classify_inline`] examines on the caller's thread.
pub const INLINE_MAX_STATEMENTS: usize = 16;
/// Largest measured parse cost, summed over the statements, that [`classify_inline`] parses on
/// the caller's thread.
pub const INLINE_MAX_TEXT_COST: u64 = 4_096;
/// The stack a thread running [`classify_bounded`] needs.
pub const LARGE_STACK_BYTES: usize = BIG_STACK_BYTES;
/// Statements with more tokens than this are not parsed (bounds the depth of left-deep operator
/// chains, whose drop recurses once per operator).
const MAX_PARSE_TOKENS: usize = 100_000;
/// Deepest bracket nesting parsed at all (parenthesised joins recurse without counting).
const MAX_BRACKET_DEPTH: usize = 32;
/// Longest run of keywords and operators without an operand in between (chains such as
/// `INTERVAL INTERVAL ...` or `ARRAY<ARRAY<...` recurse without counting).
const MAX_OPERATOR_RUN: usize = 64;
/// Upper bound on the parser's work, in token visits: each token costs `2^d`, `d` being the number of
/// enclosing brackets the parser may parse twice (function arguments, `ARRAY[...]`, subqueries; on
/// a syntax error deep inside them it backtracks through every level). About 90 ms in release.
const MAX_PARSE_COST: u64 = 1 << 17;
/// The parser's recursion limit on the large stack (sqlparser's default).
const PARSER_RECURSION_LIMIT: usize = 50;
/// Stack for parsing statements that are not shallow. Only the touched part is ever committed.
const BIG_STACK_BYTES: usize = 64 << 20;
/// Limits under which a statement is parsed on the caller's stack (2 MiB on tokio workers and test
/// threads). Debug builds use far bigger frames (about 130 KiB per level of nested subqueries).
const INLINE_RECURSION_LIMIT: usize = if cfg!(debug_assertions) { 6 } else { 16 };
const INLINE_MAX_BRACKET_DEPTH: usize = if cfg!(debug_assertions) { 3 } else { 8 };
const INLINE_MAX_OPERATOR_RUN: usize = 12;
const INLINE_MAX_TOKENS: usize = 2_000;
/// Deepest AST nesting the analyser follows before giving up (fail closed).
const MAX_WALK_DEPTH: usize = 256;
/// The reason given when classification itself panicked.
const INTERNAL_ERROR: &str = "internal error while classifying";

/// Built-ins whose result depends only on their arguments, or in addition only on the
/// server-reported `TimeZone`/`DateStyle`/`IntervalStyle` (which the cache keys on).
#[rustfmt::skip] // Grouped by topic, several names to a line.
const CACHE_SAFE_FUNCTIONS: &[&str] = &[
    // Aggregates and window functions.
    "count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "array_agg", "string_agg", "json_agg", "jsonb_agg",
    "json_agg_strict", "jsonb_agg_strict", "json_object_agg", "jsonb_object_agg", "json_object_agg_strict",
    "jsonb_object_agg_strict", "json_object_agg_unique", "jsonb_object_agg_unique", "stddev", "stddev_pop", "stddev_samp",
    "variance", "var_pop", "var_samp", "corr", "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count",
    "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy", "bit_and", "bit_or", "bit_xor",
    "percentile_cont", "percentile_disc", "mode", "range_agg", "range_intersect_agg", "any_value", "grouping", "row_number",
    "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value", "last_value", "nth_value",
    // Conditionals.
    "coalesce", "nullif", "greatest", "least", "num_nulls", "num_nonnulls",
    // Mathematics.
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "sign", "sqrt", "cbrt", "exp", "ln", "log", "log10", "power", "pow",
    "mod", "div", "pi", "degrees", "radians", "sin", "cos", "tan", "cot", "asin", "acos", "atan", "atan2", "sind", "cosd",
    "tand", "cotd", "asind", "acosd", "atand", "atan2d", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "width_bucket",
    "gcd", "lcm", "factorial", "scale", "min_scale", "trim_scale", "erf", "erfc",
    // Strings and bytes.
    "lower", "upper", "initcap", "length", "char_length", "character_length", "octet_length", "bit_length", "concat",
    "concat_ws", "format", "substring", "substr", "trim", "btrim", "ltrim", "rtrim", "lpad", "rpad", "left", "right",
    "repeat", "replace", "reverse", "split_part", "strpos", "position", "starts_with", "translate", "overlay", "ascii",
    "chr", "md5", "sha224", "sha256", "sha384", "sha512", "encode", "decode", "regexp_replace", "regexp_match",
    "regexp_matches", "regexp_split_to_array", "regexp_split_to_table", "regexp_count", "regexp_instr", "regexp_like",
    "regexp_substr", "quote_ident", "quote_literal", "quote_nullable", "to_hex", "to_bin", "to_oct", "unistr", "normalize",
    "string_to_array", "string_to_table", "array_to_string", "casefold", "get_byte", "get_bit", "crc32", "crc32c",
    "parse_ident",
    // Dates and times (TimeZone/DateStyle/IntervalStyle at most).
    "date_trunc", "date_part", "extract", "date_bin", "make_date", "make_time", "make_timestamp", "make_timestamptz",
    "make_interval", "justify_days", "justify_hours", "justify_interval", "isfinite", "timezone",
    // JSON.
    "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_build_object", "jsonb_build_object", "json_build_array",
    "jsonb_build_array", "json_object", "jsonb_object", "json_array_length", "jsonb_array_length", "json_extract_path",
    "json_extract_path_text", "jsonb_extract_path", "jsonb_extract_path_text", "json_typeof", "jsonb_typeof", "jsonb_set",
    "jsonb_set_lax", "jsonb_insert", "json_strip_nulls", "jsonb_strip_nulls", "jsonb_pretty", "jsonb_path_exists",
    "jsonb_path_match", "jsonb_path_query", "jsonb_path_query_array", "jsonb_path_query_first", "json_each", "jsonb_each",
    "json_each_text", "jsonb_each_text", "json_array_elements", "jsonb_array_elements", "json_array_elements_text",
    "jsonb_array_elements_text", "json_object_keys", "jsonb_object_keys", "json_populate_record", "jsonb_populate_record",
    "json_populate_recordset", "jsonb_populate_recordset", "json_to_record", "jsonb_to_record", "json_to_recordset",
    "jsonb_to_recordset",
    // Arrays, rows and set-returning helpers.
    "array_length", "array_lower", "array_upper", "array_ndims", "array_dims", "cardinality", "array_append",
    "array_prepend", "array_cat", "array_remove", "array_replace", "array_position", "array_positions", "array_fill",
    "trim_array", "array_reverse", "array_sort", "unnest", "generate_series", "generate_subscripts", "array", "row",
    // Ranges.
    "int4range", "int8range", "numrange", "tsrange", "tstzrange", "daterange", "isempty", "lower_inc", "upper_inc",
    "lower_inf", "upper_inf", "range_merge",
    // Text search with an explicit configuration, network addresses, sizes.
    "ts_rank", "ts_rank_cd", "setweight", "strip", "numnode", "querytree", "tsvector_to_array", "array_to_tsvector",
    "ts_delete", "ts_filter", "host", "hostmask", "masklen", "netmask", "network", "broadcast", "family", "abbrev",
    "inet_merge", "inet_same_family", "set_masklen", "pg_size_pretty", "pg_size_bytes",
];

/// Built-ins that are volatile or stable for reasons the cache cannot key on, but write nothing the
/// cache could hold: they make a query uncacheable without invalidating anything.
#[rustfmt::skip] // Grouped by topic, several names to a line.
const UNCACHEABLE_BUILTINS: &[&str] = &[
    // Time.
    "now", "current_timestamp", "current_date", "current_time", "localtime", "localtimestamp", "statement_timestamp",
    "transaction_timestamp", "clock_timestamp", "timeofday", "age", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    // Randomness and identifiers.
    "random", "random_normal", "setseed", "gen_random_uuid", "uuidv4", "uuidv7", "uuid_generate_v1", "uuid_generate_v1mc",
    "uuid_generate_v3", "uuid_generate_v4", "uuid_generate_v5", "array_shuffle", "array_sample",
    // Transactions and sequences read in this session.
    "txid_current", "txid_current_if_assigned", "txid_current_snapshot", "txid_status", "pg_current_xact_id",
    "pg_current_xact_id_if_assigned", "pg_current_snapshot", "pg_xact_status", "currval", "lastval",
    // Session and server identity, settings.
    "current_user", "session_user", "user", "current_role", "current_catalog", "current_database", "current_schema",
    "current_schemas", "system_user", "current_setting", "inet_client_addr", "inet_client_port", "inet_server_addr",
    "inet_server_port", "pg_backend_pid", "pg_blocking_pids", "version", "pg_postmaster_start_time", "pg_conf_load_time",
    "pg_is_in_recovery", "pg_my_temp_schema", "pg_is_other_temp_schema", "pg_trigger_depth", "pg_listening_channels",
    "pg_notification_queue_usage",
    // Locale- or configuration-dependent formatting and text search.
    "to_char", "to_number", "to_date", "to_timestamp", "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
    "websearch_to_tsquery", "ts_headline", "get_current_ts_config", "jsonb_path_exists_tz", "jsonb_path_match_tz",
    "jsonb_path_query_tz", "jsonb_path_query_array_tz", "jsonb_path_query_first_tz",
    // Catalog and storage lookups (change with DDL, grants and any write).
    "pg_relation_size", "pg_table_size", "pg_indexes_size", "pg_total_relation_size", "pg_database_size", "pg_column_size",
    "pg_relation_filenode", "pg_relation_filepath", "pg_typeof", "to_regclass", "to_regtype", "to_regproc",
    "to_regprocedure", "to_regnamespace", "to_regrole", "has_table_privilege", "has_column_privilege",
    "has_schema_privilege", "has_database_privilege", "has_function_privilege", "has_sequence_privilege", "pg_has_role",
    "pg_get_viewdef", "pg_get_functiondef", "pg_get_indexdef", "pg_get_constraintdef", "pg_get_triggerdef", "pg_get_expr",
    "pg_get_serial_sequence", "pg_get_userbyid", "obj_description", "col_description", "shobj_description", "format_type",
    "pg_table_is_visible", "pg_function_is_visible",
    // Administration, files, notifications, large objects (never cached).
    "pg_notify", "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "pg_ls_logdir", "pg_ls_waldir",
    "pg_cancel_backend", "pg_terminate_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_switch_wal", "lo_creat",
    "lo_create", "lo_import", "lo_export", "lo_unlink", "lo_open", "lo_close", "lo_put", "lo_get", "lo_from_bytea", "loread",
    "lowrite", "lo_lseek", "lo_lseek64", "lo_tell", "lo_tell64", "lo_truncate", "lo_truncate64",
];

/// Advisory locks held until unlocked or the session ends: they pin.
const SESSION_ADVISORY_LOCK_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
];

/// Advisory locks released at the end of the transaction: uncacheable, but they do not pin.
const XACT_ADVISORY_LOCK_FUNCTIONS: &[&str] =
    &["pg_advisory_xact_lock", "pg_advisory_xact_lock_shared", "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared"];

/// SQL value functions written without parentheses, which sqlparser may leave as plain identifiers.
const SQL_VALUE_FUNCTIONS: &[&str] = &[
    "current_user",
    "session_user",
    "user",
    "current_role",
    "current_catalog",
    "current_schema",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "system_user",
];

/// Object identifier alias types: casting to them reads the catalog.
const OID_ALIAS_TYPES: &[&str] = &[
    "regclass",
    "regcollation",
    "regconfig",
    "regdictionary",
    "regnamespace",
    "regoper",
    "regoperator",
    "regproc",
    "regprocedure",
    "regrole",
    "regtype",
];

/// Words whose presence in an unparseable statement means it may change session state.
const SESSION_STATE_WORDS: &[&str] = &[
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "temp",
    "temporary",
    "pg_temp",
    "dblink_connect",
    "dblink_connect_u",
];

/// Keywords before `(` that do not start a function call (used to estimate the parser's cost).
const NON_CALL_KEYWORDS: &[Keyword] = &[
    Keyword::AS,
    Keyword::IN,
    Keyword::VALUES,
    Keyword::FROM,
    Keyword::JOIN,
    Keyword::ON,
    Keyword::USING,
    Keyword::WHERE,
    Keyword::AND,
    Keyword::OR,
    Keyword::NOT,
    Keyword::SELECT,
    Keyword::THEN,
    Keyword::ELSE,
    Keyword::WHEN,
    Keyword::INTO,
    Keyword::OVER,
    Keyword::WITH,
    Keyword::UNION,
    Keyword::INTERSECT,
    Keyword::EXCEPT,
    Keyword::RETURNING,
    Keyword::SET,
    Keyword::BY,
    Keyword::LATERAL,
    Keyword::EXISTS,
];

impl Classification {
    /// The answer for text that could not be examined at all.
    fn fail_closed(reason: String) -> Self {
        Self {
            cacheable: false,
            not_cacheable_because: Some(reason.clone()),
            reads: Vec::new(),
            writes: Writes::Unknown,
            pins_session: Some(reason),
            transaction_control: None,
            role_change: None,
            normalized: None,
            statement_count: 1,
            functions: Vec::new(),
            operators: Vec::new(),
            types: Vec::new(),
            over_budget: None,
        }
    }

    /// The answer for text beyond the classification budget.
    pub(crate) fn over_budget(reason: String) -> Self {
        Self { over_budget: Some(reason.clone()), ..Self::fail_closed(reason) }
    }
}

fn classify_text(sql: &str, in_transaction: bool, stack: Stack, budget: &Budget<'_>) -> Option<Classification> {
    let tokens = match Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location() {
        Ok(tokens) => tokens,
        Err(err) => return Some(Classification::fail_closed(format!("cannot tokenize: {err}"))),
    };
    let sources = token_sources(sql, &tokens);
    let statements = split_statements(tokens.into_iter().zip(sources).collect());
    let limit = if stack == Stack::InlineOnly { INLINE_MAX_STATEMENTS } else { MAX_STATEMENTS };
    if statements.len() > limit {
        if stack == Stack::InlineOnly {
            return None;
        }
        return Some(Classification::over_budget(format!("more than {MAX_STATEMENTS} statements in one text")));
    }
    // Measure every statement before parsing any: the text's total cost is known up front.
    let shapes: Vec<Shape> = statements.iter().map(|statement| Shape::measure(&significant_tokens(statement))).collect();
    let total: u64 = shapes.iter().filter(|shape| shape.too_complex().is_none()).map(|shape| shape.cost).fold(0, u64::saturating_add);
    if stack == Stack::InlineOnly && (total > INLINE_MAX_TEXT_COST || shapes.iter().any(|shape| !shape.parses_inline())) {
        return None;
    }
    if total > MAX_TEXT_COST {
        return Some(Classification::over_budget("statements too costly to analyse in one text".to_owned()));
    }
    let mut outcomes = Vec::with_capacity(statements.len());
    for (statement, shape) in statements.iter().zip(&shapes) {
        if (budget.stop)() {
            return Some(Classification::over_budget("classification abandoned".to_owned()));
        }
        if budget.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Some(Classification::over_budget(format!("classification took longer than {} ms", TIME_BUDGET.as_millis())));
        }
        outcomes.push(classify_statement(statement, shape, stack)?);
    }
    Some(merge(outcomes, in_transaction))
}

/// One token with the text it was read from.
type Sourced<'a> = (TokenWithSpan, &'a str);

fn significant_tokens<'t>(statement: &'t [Sourced<'_>]) -> Vec<&'t Token> {
    statement.iter().map(|(t, _)| &t.token).filter(|t| is_significant(t)).collect()
}

/// The source text of each token. Token spans are contiguous (whitespace and comments are tokens
/// too) and count characters per line, so one forward walk maps them to byte offsets.
fn token_sources<'a>(sql: &'a str, tokens: &[TokenWithSpan]) -> Vec<&'a str> {
    let mut offsets = Vec::with_capacity(tokens.len() + 1);
    let mut chars = sql.char_indices().peekable();
    let (mut line, mut column) = (1u64, 1u64);
    let mut position = 0usize;
    for token in tokens {
        let target = token.span.start;
        while (line, column) < (target.line, target.column) {
            let Some((index, c)) = chars.next() else { break };
            position = index + c.len_utf8();
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        offsets.push(if (line, column) == (target.line, target.column) { position } else { sql.len() });
    }
    offsets.push(sql.len());
    (0..tokens.len()).map(|i| sql.get(offsets[i]..offsets[i + 1].max(offsets[i])).unwrap_or("")).collect()
}

/// The classification of one statement.
struct Outcome {
    effects: Effects,
    /// `None` when the statement could not be parsed.
    normalized: Option<String>,
    operators: Vec<String>,
}

/// Combines the statements of one text.
fn merge(outcomes: Vec<Outcome>, in_transaction: bool) -> Classification {
    let statement_count = outcomes.len();
    if statement_count == 0 {
        return Classification {
            cacheable: false,
            not_cacheable_because: Some("empty query".to_owned()),
            reads: Vec::new(),
            writes: Writes::None,
            pins_session: None,
            transaction_control: None,
            role_change: None,
            normalized: None,
            statement_count,
            functions: Vec::new(),
            operators: Vec::new(),
            types: Vec::new(),
            over_budget: None,
        };
    }
    let mut all = Effects::default();
    let mut normalized = Some(Vec::new());
    let mut operators = Vec::new();
    for outcome in outcomes {
        for operator in outcome.operators {
            push_unique(&mut operators, operator);
        }
        let fx = outcome.effects;
        for function in fx.functions {
            push_unique(&mut all.functions, function);
        }
        for name in fx.types {
            push_unique(&mut all.types, name);
        }
        for table in fx.reads {
            push_unique(&mut all.reads, table);
        }
        for table in fx.write_tables {
            push_unique(&mut all.write_tables, table);
        }
        all.writes_unknown |= fx.writes_unknown;
        if all.uncacheable.is_none() {
            all.uncacheable = fx.uncacheable;
        }
        if all.pins.is_none() {
            all.pins = fx.pins;
        }
        if fx.tx.is_some() {
            all.tx = fx.tx;
        }
        if fx.role_change.is_some() {
            all.role_change = fx.role_change;
        }
        normalized = match (normalized, outcome.normalized) {
            (Some(mut parts), Some(text)) => {
                parts.push(text);
                Some(parts)
            }
            _ => None,
        };
    }
    let reason = if statement_count > 1 {
        Some("multiple statements in one query".to_owned())
    } else if let Some(reason) = all.uncacheable.take() {
        Some(reason)
    } else if in_transaction {
        Some("inside an explicit transaction".to_owned())
    } else {
        None
    };
    let writes = if all.writes_unknown {
        Writes::Unknown
    } else if all.write_tables.is_empty() {
        Writes::None
    } else {
        Writes::Tables(all.write_tables)
    };
    Classification {
        cacheable: reason.is_none(),
        not_cacheable_because: reason,
        reads: all.reads,
        writes,
        pins_session: all.pins,
        transaction_control: all.tx,
        role_change: all.role_change,
        normalized: normalized.map(|parts| parts.join(" ; ")),
        statement_count,
        functions: all.functions,
        operators,
        types: all.types,
        over_budget: None,
    }
}

/// Splits a token stream into statements at top-level semicolons, dropping empty statements.
///
/// Semicolons inside a SQL-standard function body (`CREATE FUNCTION ... BEGIN ATOMIC ...; END`) do
/// not end the statement; like psql, `CASE` and `BEGIN` open and `END` closes a block there.
fn split_statements(tokens: Vec<Sourced<'_>>) -> Vec<Vec<Sourced<'_>>> {
    let mut statements = Vec::new();
    let mut current: Vec<Sourced<'_>> = Vec::new();
    let mut first_keyword: Option<Keyword> = None;
    let mut previous_keyword: Option<Keyword> = None;
    let mut block_depth = 0usize;
    for token in tokens {
        match &token.0.token {
            Token::EOF => continue,
            Token::Whitespace(_) => {
                current.push(token);
                continue;
            }
            Token::SemiColon if block_depth == 0 => {
                if current.iter().any(|t| is_significant(&t.0.token)) {
                    statements.push(std::mem::take(&mut current));
                } else {
                    current.clear();
                }
                first_keyword = None;
                previous_keyword = None;
                continue;
            }
            _ => {}
        }
        let keyword = match &token.0.token {
            Token::Word(word) if word.quote_style.is_none() => Some(word.keyword),
            _ => None,
        };
        if first_keyword.is_none() {
            first_keyword = Some(keyword.unwrap_or(Keyword::NoKeyword));
        } else if first_keyword == Some(Keyword::CREATE) {
            match keyword {
                Some(Keyword::ATOMIC) if previous_keyword == Some(Keyword::BEGIN) => block_depth += 1,
                Some(Keyword::CASE) | Some(Keyword::BEGIN) if block_depth > 0 => block_depth += 1,
                Some(Keyword::END) if block_depth > 0 => block_depth -= 1,
                _ => {}
            }
        }
        previous_keyword = keyword;
        current.push(token);
    }
    if current.iter().any(|t| is_significant(&t.0.token)) {
        statements.push(current);
    }
    statements
}

fn is_significant(token: &Token) -> bool {
    !matches!(token, Token::Whitespace(_) | Token::EOF)
}

/// Classifies one statement's tokens: measure, parse where safe, analyse, or fall back to tokens.
fn classify_statement(statement: &[Sourced<'_>], shape: &Shape, stack: Stack) -> Option<Outcome> {
    let significant = significant_tokens(statement);
    let operators = operator_spellings(statement);
    if let Some(reason) = shape.too_complex() {
        return Some(Outcome { effects: fallback(&significant, &reason), normalized: None, operators });
    }
    let tokens: Vec<TokenWithSpan> = statement.iter().map(|(token, _)| token.clone()).collect();
    let rewritten = rewrite_for_parser(&tokens);
    let parsed = match stack {
        Stack::Large => parse_and_analyze(&rewritten, PARSER_RECURSION_LIMIT),
        Stack::InlineOnly => match parse_and_analyze(&rewritten, INLINE_RECURSION_LIMIT) {
            Err(ParseFailure::RecursionLimit) => return None,
            other => other,
        },
        Stack::SpawnLarge if shape.parses_inline() => match parse_and_analyze(&rewritten, INLINE_RECURSION_LIMIT) {
            Err(ParseFailure::RecursionLimit) => parse_on_big_stack(&rewritten),
            other => other,
        },
        Stack::SpawnLarge => parse_on_big_stack(&rewritten),
    };
    Some(match parsed {
        Ok(effects) => Outcome { effects, normalized: Some(normalize(statement)), operators },
        Err(failure) => Outcome { effects: fallback(&significant, &failure.reason()), normalized: None, operators },
    })
}

/// Characters Postgres operators are made of.
const OPERATOR_CHARS: &str = "+-*/<>=~!@#%^&|`?";

/// The operators of a statement as the server reads them: runs of operator tokens with nothing in
/// between, joined (the tokenizer may split what the server reads as one operator).
fn operator_spellings(statement: &[Sourced<'_>]) -> Vec<String> {
    let mut operators = Vec::new();
    let mut run = String::new();
    for (token, source) in statement {
        let is_operator =
            !source.is_empty() && source.chars().all(|c| OPERATOR_CHARS.contains(c)) && !matches!(token.token, Token::Whitespace(_));
        if is_operator {
            run.push_str(source);
        } else if !run.is_empty() {
            push_unique(&mut operators, std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        push_unique(&mut operators, run);
    }
    operators
}

/// Why a statement was not analysed from its AST.
#[derive(Debug)]
enum ParseFailure {
    RecursionLimit,
    Syntax(String),
    NotOneStatement(usize),
    Panicked,
    NoThread,
}

impl ParseFailure {
    fn reason(&self) -> String {
        match self {
            ParseFailure::RecursionLimit => "statement nested too deeply to parse".to_owned(),
            ParseFailure::Syntax(err) => format!("cannot parse: {err}"),
            ParseFailure::NotOneStatement(n) => format!("parsed into {n} statements"),
            ParseFailure::Panicked => INTERNAL_ERROR.to_owned(),
            ParseFailure::NoThread => "cannot start the parser thread".to_owned(),
        }
    }
}

/// Parses one statement and analyses it. Everything that touches the AST happens here, so that on
/// the large-stack thread the drop of a deep AST happens there too.
fn parse_and_analyze(tokens: &[TokenWithSpan], recursion_limit: usize) -> Result<Effects, ParseFailure> {
    let run = || {
        let dialect = PostgreSqlDialect {};
        let mut parser = Parser::new(&dialect).with_recursion_limit(recursion_limit).with_tokens_with_locations(tokens.to_vec());
        let statements = match parser.parse_statements() {
            Ok(statements) => statements,
            Err(ParserError::RecursionLimitExceeded) => return Err(ParseFailure::RecursionLimit),
            Err(err) => return Err(ParseFailure::Syntax(err.to_string())),
        };
        match statements.as_slice() {
            [statement] => {
                let mut analyzer = Analyzer::default();
                analyzer.root(statement);
                Ok(analyzer.fx)
            }
            other => Err(ParseFailure::NotOneStatement(other.len())),
        }
    };
    panic::catch_unwind(AssertUnwindSafe(run)).unwrap_or(Err(ParseFailure::Panicked))
}

/// Parses on a short-lived thread with a large stack and the parser's normal recursion limit.
fn parse_on_big_stack(tokens: &[TokenWithSpan]) -> Result<Effects, ParseFailure> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("pgaccel-classify".to_owned())
            .stack_size(BIG_STACK_BYTES)
            .spawn_scoped(scope, || parse_and_analyze(tokens, PARSER_RECURSION_LIMIT));
        match thread {
            Ok(handle) => handle.join().unwrap_or(Err(ParseFailure::Panicked)),
            Err(_) => Err(ParseFailure::NoThread),
        }
    })
}

/// Rewrites what sqlparser misreads before parsing. `FOR NO KEY UPDATE` becomes `FOR UPDATE` and
/// `FOR KEY SHARE` becomes `FOR SHARE`, which sqlparser does not know; for classification they are
/// the same: a locking clause, never cacheable. `ONLY` before a relation name (`FROM ONLY t`,
/// `UPDATE ONLY t`, `DELETE FROM ONLY t`, `MERGE INTO ONLY t`, `JOIN ONLY t`, `TRUNCATE ONLY t`)
/// is dropped: sqlparser would read `ONLY` as the table's name and `t` as its alias, and for
/// classification `ONLY t` names `t`. Only the parser sees the rewritten tokens; the normalised
/// text keeps the original ones.
fn rewrite_for_parser(tokens: &[TokenWithSpan]) -> Cow<'_, [TokenWithSpan]> {
    let keyword_at = |index: usize| match tokens.get(index).map(|t| &t.token) {
        Some(Token::Word(word)) if word.quote_style.is_none() => Some(word.keyword),
        _ => None,
    };
    let next_significant = |from: usize| (from..tokens.len()).find(|&i| is_significant(&tokens[i].token));
    let previous_significant = |before: usize| (0..before).rev().find(|&i| is_significant(&tokens[i].token));
    let mut drop = vec![false; tokens.len()];
    for index in 0..tokens.len() {
        match keyword_at(index) {
            Some(Keyword::FOR) => {
                let Some(second) = next_significant(index + 1) else { continue };
                let Some(third) = next_significant(second + 1) else { continue };
                match (keyword_at(second), keyword_at(third)) {
                    (Some(Keyword::NO), Some(Keyword::KEY))
                        if next_significant(third + 1).and_then(keyword_at) == Some(Keyword::UPDATE) =>
                    {
                        drop[second] = true;
                        drop[third] = true;
                    }
                    (Some(Keyword::KEY), Some(Keyword::SHARE)) => drop[second] = true,
                    _ => {}
                }
            }
            Some(Keyword::ONLY) => {
                let after_relation_keyword = previous_significant(index).is_some_and(|before| {
                    matches!(tokens[before].token, Token::Comma)
                        || matches!(
                            keyword_at(before),
                            Some(
                                Keyword::FROM
                                    | Keyword::JOIN
                                    | Keyword::UPDATE
                                    | Keyword::INTO
                                    | Keyword::USING
                                    | Keyword::TABLE
                                    | Keyword::TRUNCATE
                            )
                        )
                });
                let before_name = next_significant(index + 1).is_some_and(|next| match &tokens[next].token {
                    Token::Word(word) => {
                        word.quote_style.is_some() || word.keyword == Keyword::NoKeyword || !is_reserved_after_only(word.keyword)
                    }
                    Token::LParen => true,
                    _ => false,
                });
                if after_relation_keyword && before_name {
                    drop[index] = true;
                }
            }
            _ => {}
        }
    }
    if !drop.contains(&true) {
        return Cow::Borrowed(tokens);
    }
    Cow::Owned(tokens.iter().zip(drop).filter(|(_, dropped)| !dropped).map(|(token, _)| token.clone()).collect())
}

/// Keywords that cannot start a relation name after `ONLY` (`FETCH FIRST 1 ROW ONLY` and the like
/// are not preceded by a relation keyword anyway; this keeps `ONLY` when what follows is a clause).
fn is_reserved_after_only(keyword: Keyword) -> bool {
    matches!(keyword, Keyword::WHERE | Keyword::SET | Keyword::ON | Keyword::USING | Keyword::AS | Keyword::RETURNING)
}

/// A cheap token-level measurement of what parsing a statement would cost, taken before parsing.
#[derive(Debug, Default)]
struct Shape {
    tokens: usize,
    bracket_depth: usize,
    operator_run: usize,
    cost: u64,
}

impl Shape {
    fn measure(tokens: &[&Token]) -> Self {
        let mut shape = Shape { tokens: tokens.len(), ..Shape::default() };
        // For each open bracket: whether the parser may parse its contents twice.
        let mut open: Vec<bool> = Vec::new();
        let mut doubling_depth = 0u32;
        let mut run = 0usize;
        let mut previous: Option<&Token> = None;
        for (index, &token) in tokens.iter().enumerate() {
            shape.cost = shape.cost.saturating_add(1u64 << doubling_depth.min(62));
            match token {
                Token::LParen | Token::LBracket | Token::LBrace => {
                    let doubles = may_parse_twice(previous, token, tokens.get(index + 1).copied());
                    open.push(doubles);
                    if doubles {
                        doubling_depth += 1;
                    }
                    shape.bracket_depth = shape.bracket_depth.max(open.len());
                }
                Token::RParen | Token::RBracket | Token::RBrace => {
                    if open.pop() == Some(true) {
                        doubling_depth -= 1;
                    }
                    run = 0;
                }
                _ if is_operand(token) => run = 0,
                _ => {
                    run += 1;
                    shape.operator_run = shape.operator_run.max(run);
                }
            }
            previous = Some(token);
        }
        shape
    }

    /// Why the statement must not be parsed at all, if it must not.
    fn too_complex(&self) -> Option<String> {
        if self.tokens > MAX_PARSE_TOKENS {
            Some(format!("statement has more than {MAX_PARSE_TOKENS} tokens"))
        } else if self.bracket_depth > MAX_BRACKET_DEPTH {
            Some(format!("brackets nested deeper than {MAX_BRACKET_DEPTH}"))
        } else if self.operator_run > MAX_OPERATOR_RUN {
            Some(format!("more than {MAX_OPERATOR_RUN} keywords or operators in a row"))
        } else if self.cost > MAX_PARSE_COST {
            Some("function calls nested too deeply to parse".to_owned())
        } else {
            None
        }
    }

    /// Whether the statement is shallow enough to parse on the caller's stack.
    fn parses_inline(&self) -> bool {
        self.tokens <= INLINE_MAX_TOKENS && self.bracket_depth <= INLINE_MAX_BRACKET_DEPTH && self.operator_run <= INLINE_MAX_OPERATOR_RUN
    }
}

/// Whether sqlparser may parse the contents of `open` (between `previous` and `next`) twice: function
/// arguments, `ARRAY[...]` constructors and parenthesised subqueries. Plain parentheses are parsed
/// once (measured; see the `parse_cost_estimate_*` test).
fn may_parse_twice(previous: Option<&Token>, open: &Token, next: Option<&Token>) -> bool {
    let subquery = matches!(next, Some(Token::Word(word)) if word.quote_style.is_none()
        && matches!(word.keyword, Keyword::SELECT | Keyword::WITH | Keyword::VALUES | Keyword::TABLE));
    match (previous, open) {
        (_, Token::LParen) if subquery => true,
        (Some(Token::Word(word)), Token::LParen) => word.quote_style.is_some() || !NON_CALL_KEYWORDS.contains(&word.keyword),
        (Some(Token::Word(word)), Token::LBracket) => word.quote_style.is_none() && word.keyword == Keyword::ARRAY,
        _ => false,
    }
}

/// Whether a token ends a run of keywords and operators: identifiers, literals, parameters, commas.
fn is_operand(token: &Token) -> bool {
    match token {
        Token::Word(word) => word.quote_style.is_some() || word.keyword == Keyword::NoKeyword,
        Token::Comma | Token::SemiColon | Token::Placeholder(_) | Token::Number(..) => true,
        other => is_string_token(other),
    }
}

fn is_string_token(token: &Token) -> bool {
    matches!(
        token,
        Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
    )
}

/// Renders a statement as its cache-key text: the statement as written, with each run of whitespace
/// and comments between two tokens replaced by one space, and unquoted words (keywords and
/// identifiers) ASCII-lowercased as the server folds them. Every other token (literals of every
/// kind, numbers, parameters, quoted identifiers, operators) keeps its exact spelling, and tokens
/// written without anything between them stay joined (`1a` is not `1 a`, `0x1F` is not `X'1F'`).
///
/// Each step keeps the meaning, so the key is itself a text equivalent to the statement, and two
/// statements with the same key mean the same. Two exceptions keep the text as written: a run
/// with a line break between a literal ending in `'` and one starting with `'` becomes a newline
/// (the server concatenates such literals) and one holding a block comment is kept whole (which
/// stops the concatenation); and a statement with a backslash in a plain string literal keeps all
/// its whitespace and comments, because with `standard_conforming_strings` off the server would
/// read that literal's end elsewhere.
fn normalize(statement: &[Sourced<'_>]) -> String {
    let keep_layout = statement.iter().any(|(token, source)| matches!(token.token, Token::SingleQuotedString(_)) && source.contains('\\'));
    let mut out = String::new();
    let mut gap_start: Option<usize> = None;
    let mut previous: Option<&str> = None;
    for (index, (token, source)) in statement.iter().enumerate() {
        match &token.token {
            Token::EOF => continue,
            Token::Whitespace(_) => {
                gap_start.get_or_insert(index);
                continue;
            }
            _ => {}
        }
        if let (Some(start), Some(before)) = (gap_start.take(), previous) {
            let gap = &statement[start..index];
            let layout: String = gap.iter().map(|(_, text)| *text).collect();
            // Whitespace other than ASCII space, tab and line breaks (which the server may read as
            // part of an identifier) is kept as written.
            let unusual = gap.iter().any(|(token, text)| {
                matches!(token.token, Token::Whitespace(Whitespace::Space | Whitespace::Tab | Whitespace::Newline))
                    && !text.chars().all(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
            });
            let block_comment = gap.iter().any(|(token, _)| matches!(token.token, Token::Whitespace(Whitespace::MultiLineComment(_))));
            let line_break = gap.iter().any(|(token, text)| {
                matches!(token.token, Token::Whitespace(Whitespace::SingleLineComment { .. }))
                    || (!matches!(token.token, Token::Whitespace(Whitespace::MultiLineComment(_))) && text.contains(['\n', '\r']))
            });
            let joins_literals = before.ends_with('\'') && source.starts_with('\'');
            if keep_layout || unusual || (joins_literals && block_comment) {
                out.push_str(&layout);
            } else if joins_literals && line_break {
                out.push('\n');
            } else {
                out.push(' ');
            }
        } else {
            gap_start = None;
        }
        match &token.token {
            Token::Word(word) if word.quote_style.is_none() => out.push_str(&source.to_ascii_lowercase()),
            _ => out.push_str(source),
        }
        previous = Some(source);
    }
    out
}

/// The effects of a statement, accumulated while analysing it.
#[derive(Debug, Default)]
struct Effects {
    reads: Vec<TableRef>,
    write_tables: Vec<TableRef>,
    writes_unknown: bool,
    uncacheable: Option<String>,
    pins: Option<String>,
    tx: Option<TxControl>,
    role_change: Option<Option<String>>,
    functions: Vec<String>,
    types: Vec<String>,
}

impl Effects {
    /// Records the first reason the statement is not cacheable.
    fn deny(&mut self, reason: impl Into<String>) {
        if self.uncacheable.is_none() {
            self.uncacheable = Some(reason.into());
        }
    }

    fn pin(&mut self, reason: impl Into<String>) {
        if self.pins.is_none() {
            self.pins = Some(reason.into());
        }
    }

    fn read(&mut self, table: TableRef) {
        push_unique(&mut self.reads, table);
    }

    fn write(&mut self, table: TableRef) {
        self.deny("writes data");
        push_unique(&mut self.write_tables, table);
    }

    fn write_unknown(&mut self, reason: impl Into<String>) {
        self.deny(reason);
        self.writes_unknown = true;
    }

    /// Not understood: uncacheable, may write anything, may change session state.
    fn fail_closed(&mut self, reason: &str) {
        self.write_unknown(reason);
        self.pin(reason);
    }
}

fn push_unique<T: PartialEq>(items: &mut Vec<T>, item: T) {
    if !items.contains(&item) {
        items.push(item);
    }
}

/// Classifies a statement from its tokens alone, for text that was not parsed. Recognises the
/// session and transaction commands sqlparser does not (`RESET`, `SET SESSION AUTHORIZATION`,
/// `ABORT`, `LOCK`, `COPY ... FROM STDIN`, ...); everything else fails closed.
fn fallback(tokens: &[&Token], reason: &str) -> Effects {
    let mut fx = Effects::default();
    let keyword = |index: usize| match tokens.get(index) {
        Some(Token::Word(word)) if word.quote_style.is_none() => Some(word.value.to_ascii_uppercase()),
        _ => None,
    };
    let first = keyword(0);
    let second = keyword(1);
    match first.as_deref() {
        Some("RESET") => {
            fx.deny("RESET changes session settings");
            fx.pin("RESET changes session settings");
            let third = keyword(2);
            if second.as_deref() == Some("ROLE") || (second.as_deref() == Some("SESSION") && third.as_deref() == Some("AUTHORIZATION")) {
                fx.role_change = Some(None);
            }
        }
        Some("SET") => {
            fx.deny("SET changes session settings");
            let local = second.as_deref() == Some("LOCAL");
            // Where the role is named in `SET [LOCAL|SESSION] SESSION AUTHORIZATION role`,
            // `SET [LOCAL|SESSION] ROLE role` and `SET role|session_authorization {TO|=} role`.
            let role_position = |at: usize| match keyword(at).as_deref() {
                Some("SESSION") if keyword(at + 1).as_deref() == Some("AUTHORIZATION") => Some(at + 2),
                Some("ROLE" | "SESSION_AUTHORIZATION") => {
                    let assigns = matches!(tokens.get(at + 1), Some(Token::Eq)) || keyword(at + 1).as_deref() == Some("TO");
                    Some(if assigns { at + 2 } else { at + 1 })
                }
                _ => None,
            };
            let modifier = matches!(second.as_deref(), Some("LOCAL" | "SESSION"));
            let role_at = role_position(1).or_else(|| if modifier { role_position(2) } else { None });
            if !local {
                fx.pin("SET changes session settings");
                if let Some(at) = role_at {
                    fx.role_change = Some(token_role(tokens.get(at).copied()));
                }
            }
        }
        Some("BEGIN") | Some("START") => fx.tx = Some(TxControl::Begin),
        Some("COMMIT") | Some("END") if second.as_deref() != Some("PREPARED") => fx.tx = Some(TxControl::Commit),
        Some("ROLLBACK") | Some("ABORT") if second.as_deref() != Some("PREPARED") => {
            let to_savepoint = tokens.iter().any(|t| matches!(t, Token::Word(w) if w.quote_style.is_none() && w.keyword == Keyword::TO));
            fx.tx = Some(if to_savepoint { TxControl::RollbackToSavepoint } else { TxControl::Rollback });
        }
        Some("SAVEPOINT") => fx.tx = Some(TxControl::Savepoint),
        Some("RELEASE") => fx.tx = Some(TxControl::Release),
        // Two-phase commit: `PREPARE TRANSACTION` detaches the transaction from the session, and
        // `COMMIT PREPARED` makes some earlier transaction's writes visible.
        Some("PREPARE") if second.as_deref() == Some("TRANSACTION") => fx.deny("two-phase commit"),
        Some("COMMIT") | Some("ROLLBACK") => fx.write_unknown("two-phase commit of a prepared transaction"),
        // Transaction-scoped or maintenance commands that change no data.
        Some("LOCK") | Some("VACUUM") | Some("ANALYZE") | Some("ANALYSE") | Some("CHECKPOINT") | Some("CLUSTER") | Some("REINDEX") => {
            fx.deny("not a query")
        }
        // `TABLE name` (sqlparser only knows it as a set operand).
        Some("TABLE") => match token_table_name(&tokens[1..]) {
            Some(table) if tokens.len() == 2 || (tokens.len() == 4 && matches!(tokens[2], Token::Period)) => fx.read(table),
            _ => fx.write_unknown(reason),
        },
        Some("REFRESH") if second.as_deref() == Some("MATERIALIZED") && keyword(2).as_deref() == Some("VIEW") => {
            let start = if keyword(3).as_deref() == Some("CONCURRENTLY") { 4 } else { 3 };
            match token_table_name(&tokens[start.min(tokens.len())..]) {
                Some(table) => fx.write(table),
                None => fx.write_unknown(reason),
            }
        }
        Some("COPY") => copy_from_tokens(&mut fx, tokens, reason),
        Some("DO") => fx.fail_closed("DO block may do anything"),
        _ => {
            fx.write_unknown(reason);
            let statement_like = matches!(
                first.as_deref(),
                Some(
                    "SELECT"
                        | "WITH"
                        | "INSERT"
                        | "UPDATE"
                        | "DELETE"
                        | "MERGE"
                        | "VALUES"
                        | "CREATE"
                        | "ALTER"
                        | "DROP"
                        | "COMMENT"
                        | "GRANT"
                        | "REVOKE"
                        | "TRUNCATE"
                        | "EXPLAIN"
                        | "CALL"
                        | "SECURITY"
                        | "IMPORT"
                        | "REASSIGN"
                )
            ) || matches!(tokens.first(), Some(Token::LParen));
            if !statement_like || mentions_session_state(tokens) {
                fx.pin("unparsed statement may change session state");
            }
        }
    }
    if fx.tx.is_some() {
        fx.deny("transaction control");
    }
    fx.deny(reason);
    fx
}

/// `COPY table [(columns)] FROM ...` writes the table (sqlparser cannot parse `FROM STDIN` without
/// inline data); anything else unparsed is unknown.
fn copy_from_tokens(fx: &mut Effects, tokens: &[&Token], reason: &str) {
    let rest = tokens.get(1..).unwrap_or_default();
    let Some(table) = token_table_name(rest) else {
        fx.write_unknown(reason);
        return;
    };
    let direction = rest.iter().find_map(|t| match t {
        Token::Word(word) if word.quote_style.is_none() && matches!(word.keyword, Keyword::FROM | Keyword::TO) => Some(word.keyword),
        _ => None,
    });
    match direction {
        Some(Keyword::FROM) => fx.write(table),
        Some(_) => fx.read(table),
        None => fx.write_unknown(reason),
    }
}

/// A possibly qualified table name at the start of `tokens`, if there is one.
fn token_table_name(tokens: &[&Token]) -> Option<TableRef> {
    let part = |token: Option<&&Token>| match token {
        Some(Token::Word(word)) if word.quote_style == Some('"') => Some(word.value.clone()),
        Some(Token::Word(word)) if word.quote_style.is_none() && word.keyword == Keyword::NoKeyword => {
            Some(word.value.to_ascii_lowercase())
        }
        // Non-reserved keywords are valid table names too; only the structure matters here.
        Some(Token::Word(word)) if word.quote_style.is_none() && !matches!(word.keyword, Keyword::FROM | Keyword::TO) => {
            Some(word.value.to_ascii_lowercase())
        }
        _ => None,
    };
    let first = part(tokens.first())?;
    match tokens.get(1) {
        Some(Token::Period) => {
            let second = part(tokens.get(2))?;
            if matches!(tokens.get(3), Some(Token::Period)) {
                // catalog.schema.table
                let third = part(tokens.get(4))?;
                Some(TableRef { schema: Some(second), name: third })
            } else {
                Some(TableRef { schema: Some(first), name: second })
            }
        }
        _ => Some(TableRef { schema: None, name: first }),
    }
}

/// The role named by a token (`DEFAULT` or `NONE` mean the session's own role).
fn token_role(token: Option<&Token>) -> Option<String> {
    match token {
        Some(Token::Word(word)) if word.quote_style.is_none() => {
            let value = word.value.to_ascii_lowercase();
            (value != "default" && value != "none").then_some(value)
        }
        Some(Token::Word(word)) => Some(word.value.clone()),
        Some(Token::SingleQuotedString(value)) => Some(value.clone()),
        _ => None,
    }
}

fn mentions_session_state(tokens: &[&Token]) -> bool {
    tokens.iter().any(|token| match token {
        Token::Word(word) => {
            let value = word.value.to_ascii_lowercase();
            SESSION_STATE_WORDS.contains(&value.as_str()) || value.starts_with("pg_temp_")
        }
        _ => false,
    })
}

/// Normalises one identifier the way Postgres resolves it: ASCII-lowercased unless quoted.
fn ident_name(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

/// Normalises one part of a name given as plain text (`"Quoted"` or unquoted).
fn normalize_name_part(part: &str) -> String {
    match part.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => part.to_ascii_lowercase(),
    }
}

/// The normalised parts of an object name, or `None` if a part is not a plain identifier.
fn name_parts(name: &ObjectName) -> Option<Vec<String>> {
    name.0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => Some(ident_name(ident)),
            _ => None,
        })
        .collect()
}

/// A relation name as a table reference (`table`, `schema.table`, `catalog.schema.table`).
fn table_ref(name: &ObjectName) -> Option<TableRef> {
    let mut parts = name_parts(name)?;
    let table = parts.pop()?;
    match parts.len() {
        0 => Some(TableRef { schema: None, name: table }),
        1 | 2 => Some(TableRef { schema: parts.pop(), name: table }),
        _ => None,
    }
}

/// Parses a relation name given as a string literal (`nextval('public."Seq"')`).
fn parse_relation_literal(text: &str) -> Option<TableRef> {
    let mut parts = Vec::new();
    let mut chars = text.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c.is_whitespace() || c == '"' {
                    break;
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => break,
            Some('.') => continue,
            Some(_) => return None,
        }
    }
    let name = parts.pop()?;
    match parts.len() {
        0 => Some(TableRef { schema: None, name }),
        1 | 2 => Some(TableRef { schema: parts.pop(), name }),
        _ => None,
    }
}

/// The text of a string literal.
fn value_text(value: &Value) -> Option<&str> {
    match value {
        Value::SingleQuotedString(s)
        | Value::TripleSingleQuotedString(s)
        | Value::TripleDoubleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s)
        | Value::NationalStringLiteral(s)
        | Value::DoubleQuotedString(s)
        | Value::SingleQuotedRawStringLiteral(s)
        | Value::DoubleQuotedRawStringLiteral(s)
        | Value::TripleSingleQuotedRawStringLiteral(s)
        | Value::TripleDoubleQuotedRawStringLiteral(s) => Some(s),
        Value::DollarQuotedString(s) => Some(&s.value),
        _ => None,
    }
}

/// A string literal argument, looking through casts (`'seq'::regclass`) and parentheses.
fn string_argument(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Value(value) => value_text(&value.value),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => string_argument(expr),
        _ => None,
    }
}

/// A boolean literal argument, as Postgres would read it.
fn bool_argument(expr: &Expr) -> Option<bool> {
    match expr {
        Expr::Value(value) => match &value.value {
            Value::Boolean(b) => Some(*b),
            other => match value_text(other)?.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "on" | "yes" | "y" | "1" => Some(true),
                "f" | "false" | "off" | "no" | "n" | "0" => Some(false),
                _ => None,
            },
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => bool_argument(expr),
        _ => None,
    }
}

/// The role named by a `SET role = ...` value.
fn expr_role(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(ident) if ident.quote_style.is_none() => {
            let value = ident.value.to_ascii_lowercase();
            (value != "default" && value != "none").then_some(value)
        }
        Expr::Identifier(ident) => Some(ident.value.clone()),
        Expr::Value(value) => value_text(&value.value).filter(|text| *text != "none").map(str::to_owned),
        _ => None,
    }
}

/// Walks a parsed statement and records its effects.
#[derive(Default)]
struct Analyzer {
    fx: Effects,
    /// Names of the CTEs in scope (unqualified references to them are not tables).
    ctes: Vec<String>,
    depth: usize,
}

impl Analyzer {
    /// Analyses the top-level statement; only a query can be cacheable.
    fn root(&mut self, statement: &Statement) {
        self.statement(statement);
        if !matches!(statement, Statement::Query(_)) {
            self.fx.deny("not a query");
        }
    }

    /// Increments the depth, or fails closed when the AST is too deep to follow.
    fn enter(&mut self) -> bool {
        if self.depth >= MAX_WALK_DEPTH {
            self.fx.fail_closed("statement nested too deeply to analyse");
            return false;
        }
        self.depth += 1;
        true
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn unsupported(&mut self, what: &str) {
        self.fx.fail_closed(&format!("unrecognised {what}"));
    }

    fn statement(&mut self, statement: &Statement) {
        if !self.enter() {
            return;
        }
        self.statement_inner(statement);
        self.leave();
    }

    fn statement_inner(&mut self, statement: &Statement) {
        match statement {
            Statement::Query(query) => self.query(query),
            Statement::Insert(insert) => {
                match &insert.table {
                    TableObject::TableName(name) => self.write_relation(name),
                    TableObject::TableFunction(_) => self.unsupported("INSERT target"),
                }
                if let Some(source) = &insert.source {
                    self.query(source);
                }
                self.assignments(&insert.assignments);
                match &insert.on {
                    Some(OnInsert::OnConflict(conflict)) => {
                        if let OnConflictAction::DoUpdate(update) = &conflict.action {
                            self.assignments(&update.assignments);
                            self.opt_expr(update.selection.as_ref());
                        }
                    }
                    Some(OnInsert::DuplicateKeyUpdate(assignments)) => self.assignments(assignments),
                    Some(_) => self.unsupported("INSERT clause"),
                    None => {}
                }
                self.returning(insert.returning.as_deref());
            }
            Statement::Update { table, assignments, from, selection, returning, limit, .. } => {
                self.write_target(&table.relation);
                self.joins(table);
                if let Some(UpdateTableFromKind::BeforeSet(from) | UpdateTableFromKind::AfterSet(from)) = from {
                    for table in from {
                        self.table_with_joins(table);
                    }
                }
                self.assignments(assignments);
                self.opt_expr(selection.as_ref());
                self.opt_expr(limit.as_ref());
                self.returning(returning.as_deref());
            }
            Statement::Delete(delete) => {
                for name in &delete.tables {
                    self.write_relation(name);
                }
                let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &delete.from;
                for table in from {
                    if delete.tables.is_empty() {
                        self.write_target(&table.relation);
                        self.joins(table);
                    } else {
                        self.table_with_joins(table);
                    }
                }
                for table in delete.using.iter().flatten() {
                    self.table_with_joins(table);
                }
                self.opt_expr(delete.selection.as_ref());
                self.order_by_exprs(&delete.order_by);
                self.opt_expr(delete.limit.as_ref());
                self.returning(delete.returning.as_deref());
            }
            Statement::Merge { table, source, on, clauses, output, .. } => {
                self.write_target(table);
                self.table_factor(source);
                self.expr(on);
                for clause in clauses {
                    self.opt_expr(clause.predicate.as_ref());
                    match &clause.action {
                        MergeAction::Insert(insert) => {
                            if let MergeInsertKind::Values(values) = &insert.kind {
                                for row in &values.rows {
                                    self.exprs(row);
                                }
                            }
                        }
                        MergeAction::Update { assignments } => self.assignments(assignments),
                        MergeAction::Delete => {}
                    }
                }
                match output {
                    Some(OutputClause::Returning { select_items }) => self.returning(Some(select_items)),
                    Some(OutputClause::Output { .. }) => self.unsupported("MERGE output clause"),
                    None => {}
                }
            }
            Statement::Truncate { table_names, cascade, .. } => {
                for target in table_names {
                    self.write_relation(&target.name);
                }
                if matches!(cascade, Some(CascadeOption::Cascade)) {
                    self.fx.write_unknown("TRUNCATE ... CASCADE truncates referencing tables");
                }
            }
            Statement::Copy { source, to, .. } => {
                self.fx.deny("COPY");
                match source {
                    CopySource::Table { table_name, .. } if *to => self.read_relation(table_name),
                    CopySource::Table { table_name, .. } => self.write_relation(table_name),
                    CopySource::Query(query) => self.query(query),
                }
            }
            Statement::CreateTable(create) => {
                self.fx.deny("DDL");
                self.create_relation(&create.name, create.temporary);
                if let Some(query) = &create.query {
                    self.query(query);
                }
            }
            Statement::CreateView { name, query, temporary, .. } => {
                self.fx.deny("DDL");
                self.create_relation(name, *temporary);
                self.query(query);
            }
            Statement::CreateIndex(index) => {
                self.fx.deny("DDL");
                self.write_relation(&index.table_name);
            }
            Statement::CreateSequence { name, temporary, .. } => {
                self.fx.deny("DDL");
                self.create_relation(name, *temporary);
            }
            Statement::Drop { object_type, cascade, .. } => {
                self.fx.deny("DDL");
                match object_type {
                    // Dropping an index changes no result.
                    ObjectType::Index if !cascade => {}
                    _ => self.fx.write_unknown("DDL that may affect any table"),
                }
            }
            Statement::CreateFunction(function) => {
                self.fx.write_unknown("DDL that may affect any table");
                let temp_schema = name_parts(&function.name).is_some_and(|parts| parts.len() > 1 && is_temp_schema(&parts[0]));
                if function.temporary || temp_schema {
                    self.fx.pin("creates a temporary object");
                }
            }
            Statement::AlterTable { .. }
            | Statement::AlterIndex { .. }
            | Statement::AlterView { .. }
            | Statement::AlterType(_)
            | Statement::AlterRole { .. }
            | Statement::AlterSchema(_)
            | Statement::AlterPolicy { .. }
            | Statement::CreateSchema { .. }
            | Statement::CreateDatabase { .. }
            | Statement::CreateProcedure { .. }
            | Statement::CreateTrigger(_)
            | Statement::DropTrigger(_)
            | Statement::CreatePolicy { .. }
            | Statement::DropPolicy { .. }
            | Statement::CreateRole { .. }
            | Statement::CreateUser(_)
            | Statement::CreateExtension { .. }
            | Statement::DropExtension { .. }
            | Statement::DropFunction { .. }
            | Statement::DropProcedure { .. }
            | Statement::CreateDomain(_)
            | Statement::DropDomain(_)
            | Statement::CreateType { .. }
            | Statement::CreateServer(_)
            | Statement::Grant { .. }
            | Statement::Revoke { .. }
            | Statement::Deny(_)
            | Statement::RenameTable(_) => self.fx.write_unknown("DDL that may affect any table"),
            Statement::Comment { .. } => self.fx.deny("DDL"),
            Statement::Set(set) => self.set(set),
            Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowCreate { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowCollation { .. }
            | Statement::ShowObjects(_)
            | Statement::ShowCharset(_) => self.fx.deny("SHOW depends on the session"),
            Statement::StartTransaction { statements, exception, .. } => {
                if !statements.is_empty() || exception.is_some() {
                    self.unsupported("transaction block");
                }
                self.transaction(TxControl::Begin);
            }
            Statement::Commit { .. } => self.transaction(TxControl::Commit),
            Statement::Rollback { savepoint: Some(_), .. } => self.transaction(TxControl::RollbackToSavepoint),
            Statement::Rollback { savepoint: None, .. } => self.transaction(TxControl::Rollback),
            Statement::Savepoint { .. } => self.transaction(TxControl::Savepoint),
            Statement::ReleaseSavepoint { .. } => self.transaction(TxControl::Release),
            Statement::Declare { stmts } => {
                self.fx.deny("cursor");
                for declare in stmts {
                    match (&declare.declare_type, &declare.for_query) {
                        (Some(DeclareType::Cursor), Some(query)) => {
                            if declare.hold == Some(true) {
                                self.fx.pin("DECLARE ... WITH HOLD keeps a cursor after the transaction");
                            }
                            self.query(query);
                        }
                        _ => self.unsupported("DECLARE"),
                    }
                }
            }
            Statement::Fetch { into, .. } => {
                self.fx.deny("cursor");
                if into.is_some() {
                    self.unsupported("FETCH INTO");
                }
            }
            Statement::Close { .. } => self.fx.deny("cursor"),
            Statement::Discard { object_type } => {
                self.fx.deny("DISCARD");
                self.fx.pin("DISCARD resets session state");
                if matches!(object_type, DiscardObject::ALL) {
                    self.fx.role_change = Some(None);
                }
            }
            Statement::LISTEN { .. } => {
                self.fx.deny("LISTEN");
                self.fx.pin("LISTEN registers the session for notifications");
            }
            Statement::UNLISTEN { .. } => {
                self.fx.deny("UNLISTEN");
                self.fx.pin("UNLISTEN changes the session's notification registrations");
            }
            Statement::NOTIFY { .. } => self.fx.deny("NOTIFY"),
            Statement::Load { .. } => {
                self.fx.deny("LOAD");
                self.fx.pin("LOAD loads a library into the session");
            }
            Statement::Prepare { .. } => {
                self.fx.deny("PREPARE");
                self.fx.pin("PREPARE creates a session-level prepared statement");
            }
            Statement::Deallocate { .. } => {
                self.fx.deny("DEALLOCATE");
                self.fx.pin("DEALLOCATE changes the session's prepared statements");
            }
            Statement::Execute { .. } => self.fx.write_unknown("EXECUTE runs a prepared statement of unknown content"),
            Statement::Call(function) => {
                self.fx.write_unknown("CALL runs a procedure");
                self.function_arguments(&function.args);
            }
            Statement::Explain { analyze, options, statement, .. } => {
                self.fx.deny("EXPLAIN");
                let analyze_option = options.iter().flatten().any(|option| {
                    option.name.value.eq_ignore_ascii_case("analyze")
                        && option.arg.as_ref().is_none_or(|arg| bool_argument(arg) != Some(false))
                });
                // EXPLAIN ANALYZE runs the statement, with all its effects.
                if *analyze || analyze_option {
                    self.statement(statement);
                }
            }
            Statement::ExplainTable { .. } => self.fx.deny("EXPLAIN"),
            Statement::Analyze { .. } | Statement::Vacuum(_) => self.fx.deny("maintenance command"),
            _ => self.unsupported("statement"),
        }
    }

    fn transaction(&mut self, control: TxControl) {
        self.fx.deny("transaction control");
        self.fx.tx = Some(control);
    }

    fn set(&mut self, set: &Set) {
        self.fx.deny("SET changes session settings");
        match set {
            Set::SingleAssignment { scope, variable, values, .. } => {
                if matches!(scope, Some(ContextModifier::Local)) {
                    return;
                }
                let name = name_parts(variable).map(|parts| parts.join(".")).unwrap_or_default();
                self.fx.pin(format!("SET {name}"));
                if name == "role" || name == "session_authorization" {
                    self.fx.role_change = Some(values.first().and_then(expr_role));
                }
            }
            Set::MultipleAssignments { assignments } => {
                if assignments.iter().any(|a| !matches!(a.scope, Some(ContextModifier::Local))) {
                    self.fx.pin("SET changes session settings");
                }
            }
            Set::ParenthesizedAssignments { .. } | Set::SetSessionParam(_) => self.fx.pin("SET changes session settings"),
            Set::SetRole { context_modifier, role_name } => {
                if !matches!(context_modifier, Some(ContextModifier::Local)) {
                    self.fx.pin("SET ROLE");
                    self.fx.role_change = Some(role_name.as_ref().map(ident_name));
                }
            }
            Set::SetTimeZone { local, .. } => {
                if !local {
                    self.fx.pin("SET TIME ZONE");
                }
            }
            Set::SetNames { .. } | Set::SetNamesDefault {} => self.fx.pin("SET NAMES"),
            Set::SetTransaction { session, .. } => {
                if *session {
                    self.fx.pin("SET SESSION CHARACTERISTICS");
                }
            }
        }
    }

    fn query(&mut self, query: &Query) {
        if !self.enter() {
            return;
        }
        let scope = self.ctes.len();
        if let Some(with) = &query.with {
            self.with(with);
        }
        self.set_expr(&query.body);
        if let Some(order_by) = &query.order_by {
            self.order_by(order_by);
        }
        match &query.limit_clause {
            Some(LimitClause::LimitOffset { limit, offset, limit_by }) => {
                self.opt_expr(limit.as_ref());
                if let Some(offset) = offset {
                    self.expr(&offset.value);
                }
                self.exprs(limit_by);
            }
            Some(LimitClause::OffsetCommaLimit { offset, limit }) => {
                self.expr(offset);
                self.expr(limit);
            }
            None => {}
        }
        if let Some(fetch) = &query.fetch {
            self.opt_expr(fetch.quantity.as_ref());
        }
        if !query.locks.is_empty() {
            self.fx.deny("locking clause (FOR UPDATE/SHARE)");
        }
        if query.for_clause.is_some() || query.settings.is_some() || query.format_clause.is_some() || !query.pipe_operators.is_empty() {
            self.unsupported("query clause");
        }
        self.ctes.truncate(scope);
        self.leave();
    }

    fn with(&mut self, with: &With) {
        let name = |cte: &sqlparser::ast::Cte| ident_name(&cte.alias.name);
        if with.recursive {
            self.ctes.extend(with.cte_tables.iter().map(name));
            for cte in &with.cte_tables {
                self.query(&cte.query);
            }
        } else {
            // Each CTE sees the ones before it, not itself.
            for cte in &with.cte_tables {
                self.query(&cte.query);
                self.ctes.push(name(cte));
            }
        }
    }

    fn set_expr(&mut self, body: &SetExpr) {
        if !self.enter() {
            return;
        }
        // Follow the left spine of UNION chains iteratively: they are as deep as they are long.
        let mut current = body;
        loop {
            match current {
                SetExpr::SetOperation { left, right, .. } => {
                    self.set_expr(right);
                    current = left;
                    continue;
                }
                SetExpr::Select(select) => self.select(select),
                SetExpr::Query(query) => self.query(query),
                SetExpr::Values(values) => {
                    for row in &values.rows {
                        self.exprs(row);
                    }
                }
                SetExpr::Insert(statement) | SetExpr::Update(statement) | SetExpr::Delete(statement) | SetExpr::Merge(statement) => {
                    self.statement(statement)
                }
                SetExpr::Table(table) => match &table.table_name {
                    // `TABLE name` keeps no quoting information: depend on both spellings.
                    Some(name) => {
                        let schema = table.schema_name.clone();
                        let is_cte = schema.is_none() && self.ctes.iter().any(|cte| cte.eq_ignore_ascii_case(name));
                        if !is_cte {
                            self.read_table(TableRef { schema: schema.clone(), name: name.clone() });
                            self.read_table(TableRef { schema: schema.map(|s| s.to_ascii_lowercase()), name: name.to_ascii_lowercase() });
                        }
                    }
                    None => self.unsupported("TABLE statement"),
                },
            }
            break;
        }
        self.leave();
    }

    fn select(&mut self, select: &Select) {
        if let Some(sqlparser::ast::Distinct::On(exprs)) = &select.distinct {
            self.exprs(exprs);
        }
        if select.top.is_some() || !select.lateral_views.is_empty() || select.connect_by.is_some() {
            self.unsupported("SELECT clause");
        }
        for item in &select.projection {
            self.select_item(item);
        }
        if let Some(into) = &select.into {
            self.fx.deny("SELECT INTO creates a table");
            self.create_relation(&into.name, into.temporary);
        }
        for table in &select.from {
            self.table_with_joins(table);
        }
        self.opt_expr(select.prewhere.as_ref());
        self.opt_expr(select.selection.as_ref());
        if let GroupByExpr::Expressions(exprs, _) = &select.group_by {
            self.exprs(exprs);
        }
        self.exprs(&select.cluster_by);
        self.exprs(&select.distribute_by);
        self.order_by_exprs(&select.sort_by);
        self.opt_expr(select.having.as_ref());
        for window in &select.named_window {
            if let NamedWindowExpr::WindowSpec(spec) = &window.1 {
                self.window_spec(spec);
            }
        }
        self.opt_expr(select.qualify.as_ref());
    }

    fn select_item(&mut self, item: &SelectItem) {
        match item {
            SelectItem::UnnamedExpr(expr) => self.expr(expr),
            SelectItem::ExprWithAlias { expr, alias } => {
                self.expr(expr);
                // `SELECT "type" 'text'` (a typed literal whose type sqlparser does not know) parses
                // as an alias in single quotes, which Postgres does not allow: treat it as the literal.
                if alias.quote_style == Some('\'') {
                    self.literal(&Value::SingleQuotedString(alias.value.clone()));
                    let type_name = match expr {
                        Expr::Identifier(ident) => Some(vec![ident_name(ident)]),
                        Expr::CompoundIdentifier(idents) => Some(idents.iter().map(ident_name).collect()),
                        _ => None,
                    };
                    if let Some(last) = type_name.as_ref().and_then(|parts| parts.last()) {
                        push_unique(&mut self.fx.types, last.clone());
                    }
                    if type_name.is_some_and(|parts| is_oid_alias_type(&parts)) {
                        self.fx.deny("casts to an object identifier type, which reads the catalog");
                    }
                }
            }
            SelectItem::QualifiedWildcard(kind, options) => {
                if let SelectItemQualifiedWildcardKind::Expr(expr) = kind {
                    self.expr(expr);
                }
                self.wildcard_options(options);
            }
            SelectItem::Wildcard(options) => self.wildcard_options(options),
        }
    }

    fn wildcard_options(&mut self, options: &WildcardAdditionalOptions) {
        if let Some(replace) = &options.opt_replace {
            for item in &replace.items {
                self.expr(&item.expr);
            }
        }
    }

    fn returning(&mut self, items: Option<&[SelectItem]>) {
        for item in items.unwrap_or_default() {
            self.select_item(item);
        }
    }

    fn assignments(&mut self, assignments: &[Assignment]) {
        for assignment in assignments {
            self.expr(&assignment.value);
        }
    }

    fn table_with_joins(&mut self, table: &TableWithJoins) {
        self.table_factor(&table.relation);
        self.joins(table);
    }

    fn joins(&mut self, table: &TableWithJoins) {
        for join in &table.joins {
            self.table_factor(&join.relation);
            match &join.join_operator {
                JoinOperator::Join(constraint)
                | JoinOperator::Inner(constraint)
                | JoinOperator::Left(constraint)
                | JoinOperator::LeftOuter(constraint)
                | JoinOperator::Right(constraint)
                | JoinOperator::RightOuter(constraint)
                | JoinOperator::FullOuter(constraint)
                | JoinOperator::CrossJoin(constraint)
                | JoinOperator::Semi(constraint)
                | JoinOperator::LeftSemi(constraint)
                | JoinOperator::RightSemi(constraint)
                | JoinOperator::Anti(constraint)
                | JoinOperator::LeftAnti(constraint)
                | JoinOperator::RightAnti(constraint)
                | JoinOperator::StraightJoin(constraint) => self.join_constraint(constraint),
                JoinOperator::AsOf { match_condition, constraint } => {
                    self.expr(match_condition);
                    self.join_constraint(constraint);
                }
                JoinOperator::CrossApply | JoinOperator::OuterApply => {}
            }
        }
    }

    fn join_constraint(&mut self, constraint: &JoinConstraint) {
        if let JoinConstraint::On(expr) = constraint {
            self.expr(expr);
        }
    }

    fn table_factor(&mut self, factor: &TableFactor) {
        if !self.enter() {
            return;
        }
        match factor {
            TableFactor::Table { name, args, with_hints, version, sample, .. } => {
                match args {
                    // `FROM f(...)`: a set-returning function, not a table.
                    Some(args) => self.call(name, &args.args),
                    None => self.read_relation(name),
                }
                self.exprs(with_hints);
                if version.is_some() {
                    self.unsupported("table version clause");
                }
                if sample.is_some() {
                    self.fx.deny("TABLESAMPLE returns random rows");
                }
            }
            TableFactor::Derived { subquery, .. } => self.query(subquery),
            TableFactor::TableFunction { expr, .. } => self.expr(expr),
            TableFactor::Function { name, args, .. } => self.call(name, args),
            TableFactor::UNNEST { array_exprs, .. } => self.exprs(array_exprs),
            TableFactor::JsonTable { json_expr, .. } => self.expr(json_expr),
            TableFactor::NestedJoin { table_with_joins, .. } => self.table_with_joins(table_with_joins),
            TableFactor::XmlTable { namespaces, row_expression, passing, columns, .. } => {
                for namespace in namespaces {
                    self.expr(&namespace.uri);
                }
                self.expr(row_expression);
                for argument in &passing.arguments {
                    self.expr(&argument.expr);
                }
                for column in columns {
                    if let XmlTableColumnOption::NamedInfo { path, default, .. } = &column.option {
                        self.opt_expr(path.as_ref());
                        self.opt_expr(default.as_ref());
                    }
                }
            }
            _ => self.unsupported("table expression"),
        }
        self.leave();
    }

    /// A relation that is written: the target of UPDATE, DELETE or MERGE.
    fn write_target(&mut self, factor: &TableFactor) {
        match factor {
            TableFactor::Table { name, args: None, .. } => self.write_relation(name),
            _ => self.unsupported("write target"),
        }
    }

    fn read_relation(&mut self, name: &ObjectName) {
        match table_ref(name) {
            Some(table) => {
                if table.schema.is_none() && self.ctes.contains(&table.name) {
                    return;
                }
                self.read_table(table);
            }
            None => self.unsupported("table name"),
        }
    }

    fn read_table(&mut self, table: TableRef) {
        let schema = table.schema.as_deref();
        if matches!(schema, Some("pg_catalog" | "information_schema")) || (schema.is_none() && table.name.starts_with("pg_")) {
            self.fx.deny("reads a system catalog");
        } else if schema.is_some_and(is_temp_schema) {
            self.fx.deny("reads a temporary table");
        }
        self.fx.read(table);
    }

    fn write_relation(&mut self, name: &ObjectName) {
        match table_ref(name) {
            Some(table) => self.fx.write(table),
            None => self.fx.fail_closed("unrecognised table name"),
        }
    }

    /// A relation created by the statement: it changes the catalog (a new table may be a partition,
    /// a child or a view of others), so everything is invalidated; pinning if it is temporary.
    fn create_relation(&mut self, name: &ObjectName, temporary: bool) {
        self.fx.write_unknown("DDL changes the catalog");
        let temp_schema = table_ref(name).is_some_and(|t| t.schema.as_deref().is_some_and(is_temp_schema));
        if temporary || temp_schema {
            self.fx.pin("creates a temporary object");
        }
    }

    fn order_by(&mut self, order_by: &OrderBy) {
        if let OrderByKind::Expressions(exprs) = &order_by.kind {
            self.order_by_exprs(exprs);
        }
        if let Some(interpolate) = &order_by.interpolate {
            for item in interpolate.exprs.iter().flatten() {
                self.opt_expr(item.expr.as_ref());
            }
        }
    }

    fn order_by_exprs(&mut self, exprs: &[OrderByExpr]) {
        for item in exprs {
            self.expr(&item.expr);
            if let Some(fill) = &item.with_fill {
                self.opt_expr(fill.from.as_ref());
                self.opt_expr(fill.to.as_ref());
                self.opt_expr(fill.step.as_ref());
            }
        }
    }

    fn window_spec(&mut self, spec: &WindowSpec) {
        self.exprs(&spec.partition_by);
        self.order_by_exprs(&spec.order_by);
        if let Some(frame) = &spec.window_frame {
            for bound in std::iter::once(&frame.start_bound).chain(frame.end_bound.as_ref()) {
                if let WindowFrameBound::Preceding(Some(expr)) | WindowFrameBound::Following(Some(expr)) = bound {
                    self.expr(expr);
                }
            }
        }
    }

    fn exprs(&mut self, exprs: &[Expr]) {
        for expr in exprs {
            self.expr(expr);
        }
    }

    fn opt_expr(&mut self, expr: Option<&Expr>) {
        if let Some(expr) = expr {
            self.expr(expr);
        }
    }

    fn expr(&mut self, expr: &Expr) {
        if !self.enter() {
            return;
        }
        // Follow the left spine of operator chains iteratively: `a + b + c ...` is as deep as it is long.
        let mut current = expr;
        while let Expr::BinaryOp { left, right, .. } = current {
            self.expr(right);
            current = left;
        }
        self.expr_inner(current);
        self.leave();
    }

    fn expr_inner(&mut self, expr: &Expr) {
        // Forms the grammar turns into calls of functions that a same-named function elsewhere
        // on the search path could shadow when written with plain arguments.
        let implied: &[&str] = match expr {
            Expr::Substring { .. } => &["substring", "substr"],
            Expr::Trim { .. } => &["trim", "btrim", "ltrim", "rtrim"],
            Expr::Position { .. } => &["position", "strpos"],
            Expr::Overlay { .. } => &["overlay"],
            Expr::Ceil { .. } => &["ceil", "ceiling"],
            Expr::Floor { .. } => &["floor"],
            Expr::Extract { .. } => &["extract", "date_part"],
            Expr::AtTimeZone { .. } => &["timezone"],
            Expr::Convert { .. } => &["convert"],
            Expr::IsNormalized { .. } => &["is_normalized"],
            _ => &[],
        };
        for name in implied {
            push_unique(&mut self.fx.functions, (*name).to_owned());
        }
        match expr {
            Expr::Identifier(ident) => {
                if ident.quote_style.is_none() {
                    let name = ident.value.to_ascii_lowercase();
                    if SQL_VALUE_FUNCTIONS.contains(&name.as_str()) {
                        self.fx.deny(format!("uses {name}, which depends on the session or the time"));
                    }
                }
            }
            Expr::CompoundIdentifier(_) | Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => {}
            Expr::CompoundFieldAccess { root, access_chain } => {
                self.expr(root);
                for access in access_chain {
                    match access {
                        AccessExpr::Dot(expr) => self.expr(expr),
                        AccessExpr::Subscript(subscript) => self.subscript(subscript),
                    }
                }
            }
            Expr::IsFalse(inner)
            | Expr::IsNotFalse(inner)
            | Expr::IsTrue(inner)
            | Expr::IsNotTrue(inner)
            | Expr::IsNull(inner)
            | Expr::IsNotNull(inner)
            | Expr::IsUnknown(inner)
            | Expr::IsNotUnknown(inner)
            | Expr::Nested(inner)
            | Expr::UnaryOp { expr: inner, .. }
            | Expr::Extract { expr: inner, .. }
            | Expr::Ceil { expr: inner, .. }
            | Expr::Floor { expr: inner, .. }
            | Expr::Collate { expr: inner, .. }
            | Expr::IsNormalized { expr: inner, .. }
            | Expr::Named { expr: inner, .. } => self.expr(inner),
            Expr::IsDistinctFrom(a, b)
            | Expr::IsNotDistinctFrom(a, b)
            | Expr::BinaryOp { left: a, right: b, .. }
            | Expr::InUnnest { expr: a, array_expr: b, .. }
            | Expr::Like { expr: a, pattern: b, .. }
            | Expr::ILike { expr: a, pattern: b, .. }
            | Expr::SimilarTo { expr: a, pattern: b, .. }
            | Expr::RLike { expr: a, pattern: b, .. }
            | Expr::AnyOp { left: a, right: b, .. }
            | Expr::AllOp { left: a, right: b, .. }
            | Expr::AtTimeZone { timestamp: a, time_zone: b }
            | Expr::Position { expr: a, r#in: b } => {
                self.expr(a);
                self.expr(b);
            }
            Expr::Cast { expr, data_type, .. } => {
                self.oid_alias(data_type);
                self.cast_to(data_type);
                // Text computed at run time ('n' || 'ow', lower('NOW'), a subquery) may be a
                // time-relative input once cast to a date/time type; only literals (checked
                // themselves), parameters (checked by value) and columns are taken as they are.
                if is_date_time_type(data_type) && !is_plain_operand(expr) {
                    self.fx.deny("casts a computed value to a date/time type, which may read 'now'");
                }
                self.expr(expr);
            }
            Expr::InList { expr, list, .. } => {
                self.expr(expr);
                self.exprs(list);
            }
            Expr::InSubquery { expr, subquery, .. } => {
                self.expr(expr);
                self.query(subquery);
            }
            Expr::Between { expr, low, high, .. } => {
                self.expr(expr);
                self.expr(low);
                self.expr(high);
            }
            Expr::Convert { expr, styles, .. } => {
                self.expr(expr);
                self.exprs(styles);
            }
            Expr::Substring { expr, substring_from, substring_for, .. } => {
                self.expr(expr);
                self.opt_expr(substring_from.as_deref());
                self.opt_expr(substring_for.as_deref());
            }
            Expr::Trim { expr, trim_what, trim_characters, .. } => {
                self.expr(expr);
                self.opt_expr(trim_what.as_deref());
                self.exprs(trim_characters.as_deref().unwrap_or_default());
            }
            Expr::Overlay { expr, overlay_what, overlay_from, overlay_for } => {
                self.expr(expr);
                self.expr(overlay_what);
                self.expr(overlay_from);
                self.opt_expr(overlay_for.as_deref());
            }
            Expr::Value(value) => self.literal(&value.value),
            Expr::TypedString(typed) => {
                self.oid_alias(&typed.data_type);
                self.cast_to(&typed.data_type);
                self.literal(&typed.value.value);
            }
            Expr::Function(function) => self.function(function),
            Expr::Case { operand, conditions, else_result, .. } => {
                self.opt_expr(operand.as_deref());
                for when in conditions {
                    self.expr(&when.condition);
                    self.expr(&when.result);
                }
                self.opt_expr(else_result.as_deref());
            }
            Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => self.query(subquery),
            Expr::GroupingSets(sets) | Expr::Cube(sets) | Expr::Rollup(sets) => {
                for set in sets {
                    self.exprs(set);
                }
            }
            Expr::Tuple(exprs) => self.exprs(exprs),
            Expr::Array(array) => self.exprs(&array.elem),
            Expr::Interval(interval) => self.expr(&interval.value),
            _ => self.unsupported("expression"),
        }
    }

    fn subscript(&mut self, subscript: &Subscript) {
        match subscript {
            Subscript::Index { index } => self.expr(index),
            Subscript::Slice { lower_bound, upper_bound, stride } => {
                self.opt_expr(lower_bound.as_ref());
                self.opt_expr(upper_bound.as_ref());
                self.opt_expr(stride.as_ref());
            }
        }
    }

    /// Casts to `regclass` and friends look names up in the catalog (through `search_path`), and
    /// the OID they yield changes when an object is dropped and recreated.
    fn oid_alias(&mut self, data_type: &DataType) {
        let is_oid_alias = match data_type {
            DataType::Regclass => true,
            DataType::Custom(name, _) => name_parts(name).is_some_and(|parts| is_oid_alias_type(&parts)),
            _ => false,
        };
        if is_oid_alias {
            self.fx.deny("casts to an object identifier type, which reads the catalog");
        }
    }

    /// Records the type a value is cast to, for the catalog to check (a domain runs its checks).
    fn cast_to(&mut self, data_type: &DataType) {
        push_unique(&mut self.fx.types, type_name(data_type));
    }

    fn literal(&mut self, value: &Value) {
        if value_text(value).is_some_and(is_time_relative_literal) {
            self.fx.deny("time-relative date/time literal ('now', 'today', ...)");
        }
    }

    fn function(&mut self, function: &Function) {
        let args = match &function.args {
            FunctionArguments::List(list) => list.args.as_slice(),
            _ => &[],
        };
        self.call(&function.name, args);
        self.function_arguments(&function.parameters);
        self.function_arguments(&function.args);
        self.opt_expr(function.filter.as_deref());
        if let Some(WindowType::WindowSpec(spec)) = &function.over {
            self.window_spec(spec);
        }
        self.order_by_exprs(&function.within_group);
    }

    fn function_arguments(&mut self, arguments: &FunctionArguments) {
        match arguments {
            FunctionArguments::None => {}
            FunctionArguments::Subquery(query) => self.query(query),
            FunctionArguments::List(list) => {
                for arg in &list.args {
                    self.function_arg(arg);
                }
                for clause in &list.clauses {
                    match clause {
                        FunctionArgumentClause::OrderBy(exprs) => self.order_by_exprs(exprs),
                        FunctionArgumentClause::Limit(expr) => self.expr(expr),
                        FunctionArgumentClause::OnOverflow(ListAggOnOverflow::Truncate { filler, .. }) => self.opt_expr(filler.as_deref()),
                        FunctionArgumentClause::Having(bound) => self.expr(&bound.1),
                        _ => {}
                    }
                }
            }
        }
    }

    fn function_arg(&mut self, arg: &FunctionArg) {
        let value = match arg {
            FunctionArg::Named { arg, .. } | FunctionArg::Unnamed(arg) => arg,
            FunctionArg::ExprNamed { name, arg, .. } => {
                self.expr(name);
                arg
            }
        };
        if let FunctionArgExpr::Expr(expr) = value {
            self.expr(expr);
        }
    }

    /// Applies the function policy to a call of `name` with `args` (the arguments are walked by the
    /// caller).
    fn call(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let args: Vec<&Expr> = args
            .iter()
            .filter_map(|arg| match arg {
                FunctionArg::Named { arg: FunctionArgExpr::Expr(expr), .. }
                | FunctionArg::ExprNamed { arg: FunctionArgExpr::Expr(expr), .. }
                | FunctionArg::Unnamed(FunctionArgExpr::Expr(expr)) => Some(expr),
                _ => None,
            })
            .collect();
        let function = match name_parts(name).as_deref() {
            Some([function]) => {
                push_unique(&mut self.fx.functions, function.clone());
                function.clone()
            }
            Some([schema, function]) if schema == "pg_catalog" => function.clone(),
            _ => {
                self.fx.write_unknown(format!("calls {name}, which is not a known built-in and may write"));
                return;
            }
        };
        let f = function.as_str();
        if CACHE_SAFE_FUNCTIONS.contains(&f) {
            return;
        }
        match f {
            "age" if args.len() == 2 => {}
            "to_tsvector" | "to_tsquery" | "plainto_tsquery" | "phraseto_tsquery" | "websearch_to_tsquery" if args.len() == 2 => {}
            "set_config" => {
                self.fx.deny("calls set_config()");
                let is_local = args.get(2).and_then(|arg| bool_argument(arg));
                if is_local != Some(true) {
                    self.fx.pin("set_config(..., false) changes session settings");
                    let setting = args.first().and_then(|arg| string_argument(arg)).map(str::to_ascii_lowercase);
                    if matches!(setting.as_deref(), Some("role" | "session_authorization")) {
                        let role = args.get(1).and_then(|arg| string_argument(arg));
                        self.fx.role_change = Some(role.filter(|role| !role.is_empty() && *role != "none").map(str::to_owned));
                    }
                }
            }
            "nextval" | "setval" => match args.first().and_then(|arg| string_argument(arg)).and_then(parse_relation_literal) {
                Some(sequence) => {
                    self.fx.deny(format!("calls {f}(), which advances a sequence"));
                    self.fx.write(sequence);
                }
                None => self.fx.write_unknown(format!("calls {f}() on a sequence that is not a literal")),
            },
            _ if SESSION_ADVISORY_LOCK_FUNCTIONS.contains(&f) => {
                self.fx.deny(format!("calls {f}()"));
                self.fx.pin("session-level advisory lock");
            }
            _ if XACT_ADVISORY_LOCK_FUNCTIONS.contains(&f) => self.fx.deny(format!("calls {f}()")),
            _ if f.starts_with("dblink") => {
                self.fx.write_unknown(format!("calls {f}(), which may run any statement"));
                self.fx.pin("dblink may keep connections in the session");
            }
            _ if UNCACHEABLE_BUILTINS.contains(&f) => self.fx.deny(format!("calls {f}(), which is volatile or session dependent")),
            _ => self.fx.write_unknown(format!("calls {f}(), which is not known to be immutable and may write")),
        }
    }
}

/// The name a cast's type is looked up by: the last part of a custom name (lowercased unless
/// quoted), the element type of an array, the first word of a built-in (`timestamp` for `TIMESTAMP
/// WITH TIME ZONE`), without modifiers.
fn type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Custom(name, _) => name_parts(name).and_then(|mut parts| parts.pop()).unwrap_or_default(),
        DataType::Array(
            sqlparser::ast::ArrayElemTypeDef::AngleBracket(inner)
            | sqlparser::ast::ArrayElemTypeDef::SquareBracket(inner, _)
            | sqlparser::ast::ArrayElemTypeDef::Parenthesis(inner),
        ) => type_name(inner),
        other => {
            let text = other.to_string().to_ascii_lowercase();
            text.split(|c: char| c == '(' || c == '[' || c.is_whitespace()).next().unwrap_or_default().to_owned()
        }
    }
}

/// Whether a cast's target is a date/time type, which reads `now`, `today`, ... as the current time.
fn is_date_time_type(data_type: &DataType) -> bool {
    matches!(type_name(data_type).as_str(), "timestamp" | "timestamptz" | "date" | "time" | "timetz" | "datetime")
}

/// A literal, a parameter, a column, or a cast or parentheses around one of them.
fn is_plain_operand(expr: &Expr) -> bool {
    match expr {
        Expr::Value(_) | Expr::TypedString(_) | Expr::Identifier(_) | Expr::CompoundIdentifier(_) => true,
        Expr::Cast { expr, .. } | Expr::Nested(expr) => is_plain_operand(expr),
        _ => false,
    }
}

/// Whether a (normalised, possibly `pg_catalog`-qualified) type name is an object identifier alias.
fn is_oid_alias_type(parts: &[String]) -> bool {
    match parts {
        [name] => OID_ALIAS_TYPES.contains(&name.as_str()),
        [schema, name] => schema == "pg_catalog" && OID_ALIAS_TYPES.contains(&name.as_str()),
        _ => false,
    }
}

/// Whether a schema name is the session's temporary schema.
fn is_temp_schema(schema: &str) -> bool {
    schema == "pg_temp" || schema.starts_with("pg_temp_")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `"name"` or `"schema.name"` (test names never contain dots or quotes).
    fn table(spec: &str) -> TableRef {
        match spec.split_once('.') {
            Some((schema, name)) => TableRef::new(Some(schema), name),
            None => TableRef::new(None, spec),
        }
    }

    fn tables(specs: &[&str]) -> Vec<TableRef> {
        let mut tables: Vec<TableRef> = specs.iter().map(|spec| table(spec)).collect();
        tables.sort();
        tables
    }

    fn sorted(mut tables: Vec<TableRef>) -> Vec<TableRef> {
        tables.sort();
        tables
    }

    fn written(specs: &[&str]) -> Writes {
        Writes::Tables(specs.iter().map(|spec| table(spec)).collect())
    }

    /// `writes` with the table list sorted, for order-independent comparison.
    fn sorted_writes(writes: Writes) -> Writes {
        match writes {
            Writes::Tables(tables) => Writes::Tables(sorted(tables)),
            other => other,
        }
    }

    /// Invariants every classification must satisfy, whatever the input.
    fn assert_consistent(sql: &str, c: &Classification) {
        assert_eq!(c.cacheable, c.not_cacheable_because.is_none(), "{sql:?}: {c:?}");
        if c.cacheable {
            assert_eq!(c.writes, Writes::None, "{sql:?}");
            assert_eq!(c.pins_session, None, "{sql:?}");
            assert_eq!(c.transaction_control, None, "{sql:?}");
            assert_eq!(c.statement_count, 1, "{sql:?}");
            assert!(c.normalized.is_some(), "{sql:?}");
        }
        if let Writes::Tables(tables) = &c.writes {
            assert!(!tables.is_empty(), "{sql:?}");
        }
        assert_ne!(c.not_cacheable_because.as_deref(), Some(INTERNAL_ERROR), "{sql:?} panicked inside the classifier");
    }

    fn check(sql: &str, in_transaction: bool) -> Classification {
        let c = classify(sql, in_transaction);
        assert_consistent(sql, &c);
        c
    }

    #[test]
    fn plain_selects_are_cacheable_with_their_reads() {
        let cases: &[(&str, &[&str])] = &[
            ("SELECT * FROM users WHERE id = $1", &["users"]),
            ("select  *  from USERS where id=$1", &["users"]),
            ("SELECT 1", &[]),
            ("SELECT u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id", &["users", "orders"]),
            ("SELECT * FROM a LEFT JOIN (SELECT * FROM b) x ON true", &["a", "b"]),
            ("SELECT * FROM a WHERE id IN (SELECT a_id FROM c) AND EXISTS (SELECT 1 FROM d)", &["a", "c", "d"]),
            ("SELECT (SELECT max(id) FROM t2) FROM t1", &["t1", "t2"]),
            ("SELECT * FROM a, LATERAL (SELECT * FROM b WHERE b.x = a.x) sub", &["a", "b"]),
            ("SELECT * FROM (a JOIN b ON true) JOIN c USING (id)", &["a", "b", "c"]),
            ("SELECT * FROM t UNION SELECT * FROM u EXCEPT SELECT * FROM v", &["t", "u", "v"]),
            ("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent JOIN users ON true", &["orders", "users"]),
            ("WITH a AS (SELECT * FROM t), b AS (SELECT * FROM a) SELECT * FROM b", &["t"]),
            ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT * FROM r", &[]),
            // A CTE shadows only the unqualified name.
            ("WITH t AS (SELECT 1) SELECT * FROM t, public.t", &["public.t"]),
            // A CTE defined inside a subquery is out of scope outside it.
            ("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x", &["x"]),
            ("SELECT * FROM public.users", &["public.users"]),
            ("SELECT * FROM Public.Users", &["public.users"]),
            ("SELECT * FROM \"Users\"", &["Users"]),
            ("SELECT * FROM \"My Schema\".\"MixedCase\"", &["My Schema.MixedCase"]),
            ("SELECT * FROM mydb.public.t", &["public.t"]),
            ("VALUES (1), (2)", &[]),
            ("SELECT * FROM generate_series(1, 10) g", &[]),
            ("SELECT * FROM unnest(ARRAY[1, 2]) WITH ORDINALITY AS x(v, n)", &[]),
            ("SELECT lower(name), count(*) FROM t GROUP BY 1 ORDER BY 2 DESC LIMIT 10 OFFSET $1", &["t"]),
            ("SELECT count(*) FILTER (WHERE a > 1), string_agg(b, ',' ORDER BY b) FROM t", &["t"]),
            ("SELECT a FROM t WHERE b = ANY($1) AND c BETWEEN 1 AND 2 AND d LIKE 'x%' AND e IS NOT NULL", &["t"]),
            ("SELECT CASE WHEN a THEN 1 ELSE 2 END, a::text, CAST(b AS int), EXTRACT(year FROM c) FROM t", &["t"]),
            ("SELECT substring(d from 1 for 2), trim(e), position('a' in f), coalesce(g, 0) FROM t", &["t"]),
            ("SELECT arr[1], arr[1:2], (data->'a')->>'b', data #>> '{a,b}' FROM docs WHERE data @> $1", &["docs"]),
            ("SELECT interval '1 day', ts AT TIME ZONE 'UTC', date_trunc('day', ts) FROM t", &["t"]),
            ("SELECT x FROM t GROUP BY GROUPING SETS ((a), (b)) HAVING count(*) > 1", &["t"]),
            ("SELECT DISTINCT ON (a) a, b FROM t ORDER BY a, b DESC NULLS LAST", &["t"]),
            ("SELECT row_number() OVER w FROM t WINDOW w AS (PARTITION BY a ORDER BY b)", &["t"]),
            ("SELECT sum(x) OVER (ORDER BY y ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t", &["t"]),
            ("SELECT jsonb_build_object('a', 1), json_agg(t) FROM t", &["t"]),
            ("SELECT pg_catalog.lower(x) FROM t", &["t"]),
            ("SELECT age(a, b) FROM t", &["t"]),
            ("SELECT to_tsvector('english', body) @@ to_tsquery('english', $1) FROM posts", &["posts"]),
            ("SELECT * FROM t WHERE (a, b) IN ((1, 2), (3, 4))", &["t"]),
            ("SELECT * FROM t WHERE a = $1 OFFSET 10 ROWS FETCH FIRST 5 ROWS ONLY", &["t"]),
            ("SELECT * FROM ONLY t", &["t"]),
            ("SELECT * FROM ONLY public.t AS x, ONLY u JOIN ONLY v ON true", &["public.t", "u", "v"]),
            ("SELECT * FROM ONLY \"T\" WHERE id = $1", &["T"]),
            ("SELECT * FROM t WHERE created_at > '2024-01-01'::date", &["t"]),
            ("SELECT created_at::date, $1::timestamptz, CAST(d AS timestamp) FROM t", &["t"]),
            ("SELECT * FROM t WHERE status = 'now_playing' AND r = $1::region", &["t"]),
            ("SELECT x.* FROM docs, XMLTABLE('/rows/row' PASSING docs.body COLUMNS id int PATH '@id') x", &["docs"]),
            ("SELECT 1;", &[]),
        ];
        for (sql, reads) in cases {
            let c = check(sql, false);
            assert!(c.cacheable, "{sql:?} should be cacheable: {c:?}");
            assert_eq!(sorted(c.reads.clone()), tables(reads), "{sql:?}");
            assert_eq!(c.writes, Writes::None, "{sql:?}");
            assert_eq!(c.pins_session, None, "{sql:?}");
            assert_eq!(c.role_change, None, "{sql:?}");
            assert_eq!(c.statement_count, 1, "{sql:?}");
        }
    }

    #[test]
    fn inside_a_transaction_nothing_is_cacheable() {
        let c = check("SELECT * FROM t WHERE id = $1", true);
        assert!(!c.cacheable);
        assert_eq!(c.not_cacheable_because.as_deref(), Some("inside an explicit transaction"));
        assert_eq!(c.reads, tables(&["t"]));
        assert_eq!(c.writes, Writes::None);
        assert!(check("SELECT * FROM t WHERE id = $1", false).cacheable);
    }

    #[test]
    fn volatile_and_stable_spellings_are_not_cacheable() {
        let cases = [
            "SELECT now()",
            "SELECT NOW() FROM t",
            "SELECT ('n' || 'ow')::timestamptz",
            "SELECT CAST(lower('NOW') AS date)",
            "SELECT (SELECT 'today')::date",
            "SELECT 'now'::text::timestamp",
            "SELECT $$tomorrow$$::date",
            "SELECT CURRENT_TIMESTAMP",
            "SELECT current_timestamp(3)",
            "SELECT * FROM t WHERE created_at > CURRENT_DATE - 1",
            "SELECT current_time",
            "SELECT localtime",
            "SELECT localtimestamp",
            "SELECT current_user",
            "SELECT session_user",
            "SELECT user",
            "SELECT current_role",
            "SELECT current_catalog",
            "SELECT current_schema",
            "SELECT current_schema()",
            "SELECT system_user",
            "SELECT * FROM t WHERE owner = current_user",
            "SELECT pg_catalog.now()",
            "SELECT random()",
            "SELECT gen_random_uuid()",
            "SELECT clock_timestamp(), statement_timestamp(), transaction_timestamp(), timeofday()",
            "SELECT txid_current()",
            "SELECT current_setting('search_path')",
            "SELECT pg_backend_pid()",
            "SELECT inet_client_addr()",
            "SELECT version()",
            "SELECT currval('s')",
            "SELECT lastval()",
            "SELECT age(ts) FROM t",
            "SELECT to_char(ts, 'Month') FROM t",
            "SELECT to_tsvector(body) FROM posts",
            "SELECT pg_sleep(1)",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_try_advisory_xact_lock(1, 2)",
            "SELECT uuid_generate_v4()",
            "SELECT lo_get(42)",
            "SELECT pg_read_file('x')",
            "SELECT pg_notify('c', 'x')",
            "SELECT * FROM t WHERE ts > 'now'::timestamptz",
            "SELECT * FROM t WHERE d = 'today'",
            "SELECT DATE 'tomorrow'",
            "SELECT TIMESTAMP 'yesterday'",
            "SELECT 'users'::regclass",
            "SELECT x::pg_catalog.regtype FROM t",
            "SELECT regproc 'lower'",
            "SELECT \"timestamptz\" 'now'",
            "SELECT timestamptz 'now'",
        ];
        for sql in cases {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?} must not be cacheable");
            assert_eq!(c.writes, Writes::None, "{sql:?}: built-ins write nothing cached");
            assert_eq!(c.pins_session, None, "{sql:?}");
        }
    }

    #[test]
    fn every_listed_builtin_is_classified_by_its_list() {
        // Quoting the name forces a function call even for keywords such as `user`.
        for &name in UNCACHEABLE_BUILTINS {
            assert!(!is_cache_safe_function(name), "{name}");
            let sql = format!("SELECT \"{name}\"(x) FROM t");
            let c = check(&sql, false);
            assert!(!c.cacheable, "{sql}");
            assert_eq!(c.writes, Writes::None, "{sql}");
            assert_eq!(c.pins_session, None, "{sql}");
        }
        for &name in CACHE_SAFE_FUNCTIONS {
            assert!(is_cache_safe_function(name), "{name}");
            assert!(!UNCACHEABLE_BUILTINS.contains(&name), "{name} is in both lists");
            let sql = format!("SELECT \"{name}\"(x) FROM t");
            assert!(check(&sql, false).cacheable, "{sql}");
        }
        for &name in SESSION_ADVISORY_LOCK_FUNCTIONS.iter().chain(XACT_ADVISORY_LOCK_FUNCTIONS) {
            assert!(!is_cache_safe_function(name), "{name}");
            assert!(!check(&format!("SELECT {name}(1)"), false).cacheable, "{name}");
        }
        for name in ["set_config", "nextval", "setval", "dblink", "my_function"] {
            assert!(!is_cache_safe_function(name), "{name}");
        }
    }

    #[test]
    fn cache_safe_function_names() {
        let cases = [
            ("lower", true),
            ("LOWER", true),
            ("pg_catalog.lower", true),
            ("PG_CATALOG.Lower", true),
            ("\"lower\"", true),
            ("\"LOWER\"", false),
            ("public.lower", false),
            ("a.b.lower", false),
            ("now", false),
            ("pg_catalog.now", false),
            ("current_user", false),
            ("age", false),
            ("my_func", false),
            ("", false),
        ];
        for (name, safe) in cases {
            assert_eq!(is_cache_safe_function(name), safe, "{name}");
        }
    }

    #[test]
    fn user_defined_functions_may_write_anything() {
        let cases = [
            "SELECT my_func(id) FROM t",
            "SELECT myschema.lower(x) FROM t",
            "SELECT * FROM my_set_returning_function(1)",
            "SELECT * FROM t WHERE id = (SELECT f())",
            "SELECT nextval($1)",
            "INSERT INTO t VALUES (compute())",
            "CALL refresh_everything()",
            "EXECUTE prepared_thing(1)",
        ];
        for sql in cases {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(c.writes, Writes::Unknown, "{sql:?}");
            assert_eq!(c.pins_session, None, "{sql:?}: function calls do not pin");
        }
        let c = check("COMMIT PREPARED 'tx1'", false);
        assert_eq!((c.writes, c.pins_session), (Writes::Unknown, None), "another transaction's writes become visible");
        let c = check("SELECT dblink_exec('dbname=x', 'DELETE FROM t')", false);
        assert_eq!(c.writes, Writes::Unknown);
        assert!(c.pins_session.is_some());
    }

    #[test]
    fn locking_clauses_are_not_cacheable() {
        for clause in ["FOR UPDATE", "FOR SHARE", "FOR NO KEY UPDATE", "FOR KEY SHARE", "FOR UPDATE SKIP LOCKED", "FOR UPDATE OF t NOWAIT"]
        {
            let sql = format!("SELECT * FROM t WHERE id = $1 {clause}");
            let c = check(&sql, false);
            assert!(!c.cacheable, "{sql}");
            assert_eq!(c.not_cacheable_because.as_deref(), Some("locking clause (FOR UPDATE/SHARE)"), "{sql}");
            assert_eq!(c.reads, tables(&["t"]), "{sql}");
            assert_eq!(c.writes, Writes::None, "{sql}");
            assert_eq!(c.pins_session, None, "{sql}");
            assert!(c.normalized.is_some(), "{sql}");
        }
        // The lock strength stays part of the key even though the parser sees a rewritten clause.
        assert_ne!(check("SELECT * FROM t FOR NO KEY UPDATE", false).normalized, check("SELECT * FROM t FOR UPDATE", false).normalized);
    }

    #[test]
    fn writes_name_their_tables() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("INSERT INTO t VALUES (1)", &["t"], &[]),
            ("INSERT INTO s.t (a) SELECT a FROM u", &["s.t"], &["u"]),
            ("INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a + 1", &["t"], &[]),
            ("INSERT INTO t VALUES (1) RETURNING id", &["t"], &[]),
            ("INSERT INTO t VALUES (nextval('public.\"Seq\"'))", &["t", "public.Seq"], &[]),
            ("UPDATE t SET a = 1 WHERE id = 2", &["t"], &[]),
            ("UPDATE t SET a = u.a FROM u WHERE t.id = u.id RETURNING t.*", &["t"], &["u"]),
            ("UPDATE \"Accounts\" SET balance = balance - $1 WHERE id = $2", &["Accounts"], &[]),
            ("DELETE FROM t WHERE id = $1", &["t"], &[]),
            ("DELETE FROM t USING u WHERE t.id = u.id", &["t"], &["u"]),
            ("DELETE FROM t WHERE id IN (SELECT id FROM u)", &["t"], &["u"]),
            ("TRUNCATE a, b.c", &["a", "b.c"], &[]),
            (
                "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 1 WHEN NOT MATCHED THEN INSERT (id) VALUES (s.id)",
                &["t"],
                &["s"],
            ),
            ("MERGE INTO t USING (SELECT * FROM s) src ON t.id = src.id WHEN MATCHED THEN DELETE", &["t"], &["s"]),
            ("COPY t FROM STDIN", &["t"], &[]),
            ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", &["t"], &[]),
            ("COPY s.t FROM '/tmp/x'", &["s.t"], &[]),
            ("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d", &["t"], &[]),
            ("WITH i AS (INSERT INTO log VALUES (1) RETURNING id) SELECT * FROM i JOIN users ON true", &["log"], &["users"]),
            ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", &["t"], &[]),
            // `ONLY t` names t (sqlparser alone reads a table called "only" with the alias t).
            ("UPDATE ONLY t SET a = 1", &["t"], &[]),
            ("UPDATE ONLY s.t AS x SET a = 1 WHERE x.id = 2", &["s.t"], &[]),
            ("DELETE FROM ONLY t WHERE id = 1", &["t"], &[]),
            ("DELETE FROM ONLY t USING ONLY u WHERE t.id = u.id", &["t"], &["u"]),
            ("MERGE INTO ONLY t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", &["t"], &["s"]),
            ("MERGE INTO t USING ONLY s ON t.id = s.id WHEN MATCHED THEN DELETE", &["t"], &["s"]),
            ("TRUNCATE ONLY t", &["t"], &[]),
            ("TRUNCATE TABLE ONLY t, ONLY u", &["t", "u"], &[]),
            ("INSERT INTO t SELECT * FROM ONLY u", &["t"], &["u"]),
            ("SELECT nextval('seq')", &["seq"], &[]),
            ("SELECT setval('s.seq', 10)", &["s.seq"], &[]),
            ("EXPLAIN ANALYZE DELETE FROM t", &["t"], &[]),
            ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", &["t"], &[]),
        ];
        for (sql, writes, reads) in cases {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(sorted_writes(c.writes.clone()), Writes::Tables(tables(writes)), "{sql:?}");
            assert_eq!(sorted(c.reads.clone()), tables(reads), "{sql:?}");
            assert_eq!(c.pins_session, None, "{sql:?}");
        }
    }

    #[test]
    fn reads_that_write_nothing() {
        let cases: &[(&str, &[&str])] = &[
            ("COPY t TO STDOUT", &["t"]),
            ("COPY (SELECT * FROM t) TO STDOUT", &["t"]),
            ("EXPLAIN SELECT * FROM t", &[]),
            ("EXPLAIN DELETE FROM t", &[]),
            ("EXPLAIN (ANALYZE false) DELETE FROM t", &[]),
            ("SHOW search_path", &[]),
            ("SHOW ALL", &[]),
            ("SELECT * FROM pg_catalog.pg_class", &["pg_catalog.pg_class"]),
            ("SELECT * FROM pg_class", &["pg_class"]),
            ("SELECT * FROM information_schema.tables", &["information_schema.tables"]),
            ("SELECT * FROM pg_temp.scratch", &["pg_temp.scratch"]),
            ("SELECT * FROM t TABLESAMPLE BERNOULLI (10)", &["t"]),
            ("DECLARE c CURSOR FOR SELECT * FROM t", &["t"]),
            ("FETCH 10 FROM c", &[]),
            ("CLOSE c", &[]),
            ("NOTIFY chan, 'x'", &[]),
            ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", &[]),
            ("VACUUM t", &[]),
            ("ANALYZE t", &[]),
            ("COMMENT ON TABLE t IS 'x'", &[]),
            ("DROP INDEX i", &[]),
            ("TABLE s.t", &["s.t"]),
        ];
        for (sql, reads) in cases {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(c.writes, Writes::None, "{sql:?}");
            assert_eq!(sorted(c.reads.clone()), tables(reads), "{sql:?}");
            assert_eq!(c.pins_session, None, "{sql:?}");
        }
    }

    #[test]
    fn ddl_writes_its_table_or_everything() {
        let cases: &[(&str, Writes)] = &[
            // Creating or dropping a relation changes the catalog: partitions, children and views
            // link relations, so everything is invalidated and the catalog reread.
            ("CREATE TABLE t (a int)", Writes::Unknown),
            ("CREATE TABLE s.\"T\" (a int)", Writes::Unknown),
            ("CREATE TABLE s.t AS SELECT * FROM u", Writes::Unknown),
            ("CREATE TABLE c PARTITION OF p FOR VALUES IN (1)", Writes::Unknown),
            ("CREATE TABLE c () INHERITS (p)", Writes::Unknown),
            ("CREATE INDEX i ON t (a)", written(&["t"])),
            ("CREATE INDEX CONCURRENTLY i ON s.t (a)", written(&["s.t"])),
            ("CREATE VIEW v AS SELECT * FROM t", Writes::Unknown),
            ("CREATE OR REPLACE VIEW v AS SELECT * FROM t", Writes::Unknown),
            ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM t", Writes::Unknown),
            ("CREATE SEQUENCE seq", Writes::Unknown),
            ("DROP TABLE a, s.b", Writes::Unknown),
            ("DROP VIEW IF EXISTS v", Writes::Unknown),
            ("REFRESH MATERIALIZED VIEW mv", written(&["mv"])),
            ("REFRESH MATERIALIZED VIEW CONCURRENTLY s.mv WITH DATA", written(&["s.mv"])),
            ("DROP TABLE a CASCADE", Writes::Unknown),
            ("TRUNCATE a CASCADE", Writes::Unknown),
            ("DROP SCHEMA s CASCADE", Writes::Unknown),
            ("DROP SCHEMA s", Writes::Unknown),
            ("ALTER TABLE t ADD COLUMN b int", Writes::Unknown),
            ("ALTER TABLE t RENAME TO u", Writes::Unknown),
            ("CREATE SCHEMA s", Writes::Unknown),
            ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", Writes::Unknown),
            ("DROP FUNCTION f", Writes::Unknown),
            ("CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()", Writes::Unknown),
            ("CREATE POLICY p ON t USING (owner = current_user)", Writes::Unknown),
            ("GRANT SELECT ON t TO bob", Writes::Unknown),
            ("REVOKE SELECT ON t FROM bob", Writes::Unknown),
            ("CREATE ROLE bob", Writes::Unknown),
            ("CREATE EXTENSION pgcrypto", Writes::Unknown),
        ];
        for (sql, writes) in cases {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(sorted_writes(c.writes.clone()), sorted_writes(writes.clone()), "{sql:?}");
            assert_eq!(c.pins_session, None, "{sql:?}");
        }
    }

    #[test]
    fn do_blocks_and_unknown_commands_fail_closed() {
        for sql in ["DO $$ BEGIN PERFORM 1; END $$", "FROBNICATE the_database", "SELEC * FROM t"] {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(c.writes, Writes::Unknown, "{sql:?}");
            assert!(c.pins_session.is_some(), "{sql:?}: an unrecognised command may change session state");
            assert_eq!(c.normalized, None, "{sql:?}");
        }
    }

    #[test]
    fn unparseable_text_fails_closed() {
        // Text that cannot even be tokenized.
        for sql in ["SELECT 'unterminated", "SELECT \"unterminated", "SELECT $$ unterminated"] {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(c.writes, Writes::Unknown, "{sql:?}");
            assert!(c.pins_session.is_some(), "{sql:?}");
            assert_eq!(c.normalized, None, "{sql:?}");
        }
        // A broken SELECT or DDL cannot change session state unless it names something that can.
        let cases = [
            ("SELECT * FROM t WHERE", false),
            ("SELECT * FROM t WHERE a = ANY(ARRAY[1]) GARBAGE GARBAGE", false),
            ("CREATE TABLE t (a int) GARBAGE GARBAGE", false),
            ("SELECT set_config('a', 'b', false) GARBAGE GARBAGE", true),
            ("SELECT pg_advisory_lock(1) GARBAGE GARBAGE", true),
            ("CREATE TEMP TABLE x (a int) GARBAGE GARBAGE", true),
            ("GARBAGE", true),
        ];
        for (sql, pins) in cases {
            let c = check(sql, false);
            assert!(!c.cacheable, "{sql:?}");
            assert_eq!(c.writes, Writes::Unknown, "{sql:?}");
            assert_eq!(c.pins_session.is_some(), pins, "{sql:?}: {c:?}");
            assert_eq!(c.normalized, None, "{sql:?}");
        }
    }

    #[test]
    fn statement_counting() {
        let cases = [
            ("", 0),
            ("   ", 0),
            ("-- just a comment", 0),
            (";;", 0),
            ("SELECT 1", 1),
            ("SELECT 1;", 1),
            ("SELECT 1; SELECT 2", 2),
            ("SELECT ';'; SELECT $$;$$", 2),
            ("SELECT 1;;SELECT 2;", 2),
            ("BEGIN; INSERT INTO t VALUES (1); COMMIT", 3),
            ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END; SELECT 3", 2),
        ];
        for (sql, count) in cases {
            let c = check(sql, false);
            assert_eq!(c.statement_count, count, "{sql:?}");
            assert_eq!(c.cacheable, count == 1, "{sql:?}");
        }
        let c = check("SELECT 1; SELECT 2", false);
        assert_eq!(c.not_cacheable_because.as_deref(), Some("multiple statements in one query"));
        let c = check("", false);
        assert_eq!((c.writes, c.pins_session), (Writes::None, None));

        let c = check("BEGIN; INSERT INTO t VALUES (1); SET search_path = x; COMMIT", false);
        assert_eq!(c.writes, written(&["t"]));
        assert_eq!(c.pins_session.as_deref(), Some("SET search_path"));
        assert_eq!(c.transaction_control, Some(TxControl::Commit));
    }

    #[test]
    fn session_pinning() {
        let cases = [
            ("SET search_path TO a, b", true),
            ("SET search_path = DEFAULT", true),
            ("SET SESSION statement_timeout = 0", true),
            ("SET app.tenant = 'x'", true),
            ("SET TIME ZONE 'UTC'", true),
            ("SET NAMES 'UTF8'", true),
            ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", true),
            ("SET ROLE bob", true),
            ("SET SESSION AUTHORIZATION bob", true),
            ("RESET ALL", true),
            ("RESET search_path", true),
            ("RESET ROLE", true),
            ("DISCARD ALL", true),
            ("LISTEN chan", true),
            ("UNLISTEN *", true),
            ("LOAD 'auto_explain'", true),
            ("SELECT pg_advisory_lock(1)", true),
            ("SELECT pg_try_advisory_lock(1)", true),
            ("SELECT pg_advisory_lock_shared(1, 2)", true),
            ("SELECT pg_advisory_unlock_all()", true),
            ("CREATE TEMP TABLE x (a int)", true),
            ("CREATE TEMPORARY TABLE x AS SELECT * FROM t", true),
            ("CREATE TABLE pg_temp.x (a int)", true),
            ("CREATE TEMP VIEW v AS SELECT 1", true),
            ("CREATE TEMP SEQUENCE s", true),
            ("SELECT * INTO TEMP nt FROM t", true),
            ("PREPARE p (int) AS SELECT $1", true),
            ("DEALLOCATE p", true),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", true),
            ("SELECT set_config('search_path', 'x', false)", true),
            ("SELECT set_config('search_path', 'x', $1)", true),
            ("SELECT set_config('search_path', 'x', 'off')", true),
            ("SET LOCAL search_path = a", false),
            ("SET LOCAL TIME ZONE 'UTC'", false),
            ("SET LOCAL ROLE bob", false),
            ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", false),
            ("SELECT set_config('search_path', 'x', true)", false),
            ("SELECT pg_advisory_xact_lock(1)", false),
            ("SELECT pg_try_advisory_xact_lock_shared(1)", false),
            ("DECLARE c CURSOR FOR SELECT * FROM t", false),
            ("BEGIN", false),
            ("SELECT * FROM t", false),
            ("INSERT INTO t VALUES (1)", false),
            ("CREATE TABLE t (a int)", false),
        ];
        for (sql, pins) in cases {
            let c = check(sql, false);
            assert_eq!(c.pins_session.is_some(), pins, "{sql:?}: {c:?}");
            if pins {
                assert!(!c.cacheable, "{sql:?}");
            }
        }
    }

    #[test]
    fn role_changes_are_reported() {
        let bob = Some(Some("bob".to_owned()));
        let reset = Some(None);
        let cases: &[(&str, Option<Option<String>>)] = &[
            ("SET ROLE bob", bob.clone()),
            ("SET ROLE Bob", bob.clone()),
            ("SET SESSION ROLE bob", bob.clone()),
            ("SET role = bob", bob.clone()),
            ("SET role TO 'bob'", bob.clone()),
            ("SET ROLE \"Bob\"", Some(Some("Bob".to_owned()))),
            ("SET ROLE 'Bob'", Some(Some("Bob".to_owned()))),
            ("SET ROLE NONE", reset.clone()),
            ("RESET ROLE", reset.clone()),
            ("SET SESSION AUTHORIZATION bob", bob.clone()),
            ("SET SESSION AUTHORIZATION 'Alice'", Some(Some("Alice".to_owned()))),
            ("SET SESSION AUTHORIZATION DEFAULT", reset.clone()),
            ("RESET SESSION AUTHORIZATION", reset.clone()),
            ("DISCARD ALL", reset.clone()),
            ("SELECT set_config('role', 'bob', false)", bob.clone()),
            ("SET LOCAL ROLE bob", None),
            ("SET LOCAL SESSION AUTHORIZATION bob", None),
            ("SELECT set_config('role', 'bob', true)", None),
            ("SET search_path = bob", None),
            ("RESET ALL", None),
            ("SELECT 1", None),
        ];
        for (sql, role) in cases {
            assert_eq!(&check(sql, false).role_change, role, "{sql:?}");
        }
    }

    #[test]
    fn transaction_control_is_detected() {
        let cases = [
            ("BEGIN", Some(TxControl::Begin)),
            ("begin work", Some(TxControl::Begin)),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE", Some(TxControl::Begin)),
            ("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY, DEFERRABLE", Some(TxControl::Begin)),
            ("START TRANSACTION READ ONLY", Some(TxControl::Begin)),
            ("COMMIT", Some(TxControl::Commit)),
            ("COMMIT AND CHAIN", Some(TxControl::Commit)),
            ("END", Some(TxControl::Commit)),
            ("ROLLBACK", Some(TxControl::Rollback)),
            ("ABORT", Some(TxControl::Rollback)),
            ("SAVEPOINT s1", Some(TxControl::Savepoint)),
            ("RELEASE SAVEPOINT s1", Some(TxControl::Release)),
            ("RELEASE s1", Some(TxControl::Release)),
            ("ROLLBACK TO SAVEPOINT s1", Some(TxControl::RollbackToSavepoint)),
            ("ROLLBACK TO s1", Some(TxControl::RollbackToSavepoint)),
            ("SELECT 1", None),
            ("SET TRANSACTION READ ONLY", None),
            ("COMMIT PREPARED 'x'", None),
            ("PREPARE TRANSACTION 'x'", None),
        ];
        for (sql, control) in cases {
            let c = check(sql, false);
            assert_eq!(c.transaction_control, control, "{sql:?}");
            if control.is_some() {
                assert!(!c.cacheable, "{sql:?}");
                assert_eq!(c.writes, Writes::None, "{sql:?}");
                assert_eq!(c.pins_session, None, "{sql:?}");
            }
        }
    }

    #[test]
    fn normalized_text_collapses_layout_but_not_meaning() {
        let same = [
            ("select  *  from T where id=$1", "SELECT * FROM t WHERE id=$1"),
            ("SELECT 1 -- trailing comment\n", "select /* leading */ 1"),
            ("SELECT a FROM t;", "SELECT a\n\tFROM t"),
            ("SELECT A.B FROM A", "select a.b from a"),
            ("SELECT * FROM t FOR UPDATE", "select * from t for update"),
            ("SELECT 'a' /* x */ , 'b'", "SELECT 'a'\n, 'b'"),
            ("SELECT 'a'\n'b'", "SELECT 'a' -- c\n'b'"),
        ];
        for (a, b) in same {
            let (ka, kb) = (check(a, false).normalized, check(b, false).normalized);
            assert!(ka.is_some(), "{a:?}");
            assert_eq!(ka, kb, "{a:?} vs {b:?}");
        }
        assert_eq!(check("select  *  from T where id = $1", false).normalized.as_deref(), Some("select * from t where id = $1"));
        let different = [
            ("SELECT * FROM t WHERE id = 1", "SELECT * FROM t WHERE id = 2"),
            ("SELECT * FROM t WHERE id = $1", "SELECT * FROM t WHERE id = $2"),
            ("SELECT * FROM t WHERE name = 'a'", "SELECT * FROM t WHERE name = 'A'"),
            ("SELECT * FROM \"T\"", "SELECT * FROM T"),
            ("SELECT 'a''b'", "SELECT 'a' 'b'"),
            ("SELECT \"a\"\" \"\"b\" FROM t", "SELECT \"a\" \"b\" FROM t"),
            ("SELECT 'a'\n'b'", "SELECT 'a' 'b'"),
            ("SELECT 'a'\n'b'", "SELECT 'a' /* c */\n'b'"),
            ("SELECT 'a'\r'b'", "SELECT 'a' 'b'"),
            ("SELECT E'x'", "SELECT 'x'"),
            ("SELECT 1.0", "SELECT 1"),
            ("SELECT * FROM t ORDER BY a", "SELECT * FROM t ORDER BY a DESC"),
            // Postgres 16 reads 0x1F as the integer 31, X'1F' as a bit string.
            ("SELECT 0x1F", "SELECT X'1F'"),
            ("SELECT 0x1F", "SELECT x'1F'"),
            ("SELECT 0b101", "SELECT B'101'"),
            ("SELECT 1_000", "SELECT 1000"),
            ("SELECT 1a", "SELECT 1 a"),
            ("SELECT .5e3", "SELECT 500"),
            ("SELECT $$a$$", "SELECT 'a'"),
            ("SELECT $A$x$A$", "SELECT $a$x$a$"),
            ("SELECT U&'\\0041'", "SELECT '\\0041'"),
            ("SELECT N'a'", "SELECT 'a'"),
            ("SELECT $1", "SELECT $01"),
            ("SELECT 1\u{a0}a", "SELECT 1 a"),
            ("SELECT '\\' -- ', 2\n", "SELECT '\\' , 2"),
        ];
        for (a, b) in different {
            let (ka, kb) = (check(a, false).normalized, check(b, false).normalized);
            assert_ne!(ka, kb, "{a:?} vs {b:?}");
        }
        assert_eq!(check("SELECT FROM WHERE (", false).normalized, None);
    }

    #[test]
    fn helper_parsers() {
        let relations = [
            ("seq", Some(table("seq"))),
            ("  Public.Seq ", Some(table("public.seq"))),
            ("\"My\"\"Seq\"", Some(TableRef::new(None, "My\"Seq"))),
            ("s.\"Mixed.Case\"", Some(TableRef::new(Some("s"), "Mixed.Case"))),
            ("db.s.t", Some(table("s.t"))),
            ("a.b.c.d", None),
            ("", None),
            ("a.", None),
            ("a b", None),
            ("\"unterminated", None),
        ];
        for (text, expected) in relations {
            assert_eq!(parse_relation_literal(text), expected, "{text:?}");
        }
        let literals = [
            ("now", true),
            ("NOW", true),
            (" today ", true),
            ("tomorrow 10:00", true),
            ("yesterday", true),
            ("2024-01-01", false),
            ("known", false),
            ("now_playing", false),
        ];
        for (text, relative) in literals {
            assert_eq!(is_time_relative_literal(text), relative, "{text:?}");
        }
    }

    /// Generators of pathological nesting: (name, prefix, suffix) repeated around `1`.
    const NESTINGS: &[(&str, &str, &str)] = &[
        ("parentheses", "(", ")"),
        ("not", "NOT ", ""),
        ("unary minus", "- ", ""),
        ("function calls", "f(", ")"),
        ("coalesce", "coalesce(", ", 0)"),
        ("casts", "CAST(", " AS int)"),
        ("arrays", "ARRAY[", "]"),
        ("scalar subqueries", "(SELECT ", ")"),
        ("exists", "EXISTS (SELECT ", ")"),
        ("case", "CASE WHEN ", " THEN 1 END"),
        ("intervals", "INTERVAL ", ""),
        ("in lists", "a IN (", ")"),
        ("postfix casts", "", "::int"),
        ("is null", "", " IS NULL"),
        ("additions", "", " + 1"),
    ];

    #[test]
    fn deep_nesting_fails_closed_without_overflowing() {
        for (name, prefix, suffix) in NESTINGS {
            for depth in [200, 5_000] {
                let sql = format!("SELECT {}1{} FROM t", prefix.repeat(depth), suffix.repeat(depth));
                let c = check(&sql, false);
                // Left-deep chains (postfix casts, IS NULL, additions) parse iteratively and may be
                // understood; everything else exceeds the nesting limits.
                if !matches!(*name, "postfix casts" | "is null" | "additions") {
                    assert!(!c.cacheable, "{name} x{depth}");
                    assert_eq!(c.writes, Writes::Unknown, "{name} x{depth}");
                }
            }
        }
        let joins = format!("SELECT * FROM {}t{}", "(t JOIN ".repeat(5_000), " ON true)".repeat(5_000));
        let from = format!("SELECT * FROM {}t{}", "(SELECT * FROM ".repeat(5_000), ") x".repeat(5_000));
        let huge = format!("SELECT {}1", "1 + ".repeat(60_000));
        let oversized = format!("SELECT '{}'", "x".repeat(MAX_SQL_BYTES));
        for sql in [joins, from, huge, oversized] {
            let c = check(&sql, false);
            assert!(!c.cacheable, "{}...", &sql[..40]);
            assert_eq!(c.writes, Writes::Unknown, "{}...", &sql[..40]);
        }
        // Long but flat: parsed iteratively, understood, and harmless.
        let unions = format!("SELECT a FROM t{}", " UNION SELECT a FROM t".repeat(10_000));
        let c = check(&unions, false);
        assert!(c.cacheable, "{:?}", c.not_cacheable_because);
        assert_eq!(c.reads, tables(&["t"]));
    }

    #[test]
    fn moderate_nesting_is_still_understood() {
        // Deeper than the inline limits, so these parse on the large stack.
        let subqueries = format!("SELECT * FROM t WHERE a IN {}(1){}", "(SELECT b FROM u WHERE b IN ".repeat(6), ")".repeat(6));
        let c = check(&subqueries, false);
        assert!(c.cacheable, "{c:?}");
        assert_eq!(c.reads, tables(&["t", "u"]));

        let joins = format!("SELECT * FROM {}t{}", "(a JOIN ".repeat(12), " ON true)".repeat(12));
        let c = check(&joins, false);
        assert!(c.cacheable, "{c:?}");
        assert_eq!(sorted(c.reads), tables(&["a", "t"]));

        let calls = format!("SELECT {}x{} FROM t", "lower(".repeat(10), ")".repeat(10));
        assert!(check(&calls, false).cacheable);

        let hidden = format!("SELECT {}now(){} FROM t", "coalesce(".repeat(8), ", 0)".repeat(8));
        let c = check(&hidden, false);
        assert!(!c.cacheable);
        assert_eq!(c.writes, Writes::None);

        let long_chain = format!("SELECT 1{} FROM t WHERE x = my_func()", " + 1".repeat(10_000));
        let c = check(&long_chain, false);
        assert_eq!(c.writes, Writes::Unknown, "the function at the end of a long chain is still seen");
    }

    #[test]
    fn inline_and_large_stack_parsing_agree() {
        let corpus = [
            "SELECT * FROM t WHERE id = $1",
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x JOIN u ON true",
            "SELECT set_config('a', 'b', false)",
            "UPDATE t SET a = now() FROM u WHERE t.id = u.id",
            "SET ROLE bob",
            "SELECT * FROM t FOR UPDATE",
        ];
        for sql in corpus {
            let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location().expect("tokenizes");
            let significant: Vec<&Token> = tokens.iter().map(|t| &t.token).filter(|t| is_significant(t)).collect();
            assert!(Shape::measure(&significant).parses_inline(), "{sql:?}");
            let inline = parse_and_analyze(&tokens, INLINE_RECURSION_LIMIT).expect("parses inline");
            let big = parse_on_big_stack(&tokens).expect("parses on the large stack");
            assert_eq!(format!("{inline:?}"), format!("{big:?}"), "{sql:?}");
        }
    }

    #[test]
    fn parse_cost_estimate_catches_backtracking() {
        let measure = |sql: &str| {
            let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().expect("tokenizes");
            let significant: Vec<&Token> = tokens.iter().filter(|t| is_significant(t)).collect();
            Shape::measure(&significant)
        };
        let flat = measure("SELECT a, b FROM t WHERE a IN (1, 2, 3) AND (b = 1 OR c = 2)");
        assert_eq!(flat.cost, flat.tokens as u64, "plain brackets are parsed once");
        let subquery = measure("SELECT a FROM t WHERE b = (SELECT 1)");
        assert!(subquery.cost > subquery.tokens as u64);
        let nested = measure("SELECT f(g(h(1)))");
        assert!(nested.cost > nested.tokens as u64);
        assert!(measure(&format!("SELECT {}1{}", "f(".repeat(30), ")".repeat(30))).too_complex().is_some());
        assert!(measure(&format!("SELECT {}1", "INTERVAL ".repeat(100))).too_complex().is_some());
        // Found by fuzzing: a syntax error under nested subqueries backtracks through every level.
        assert!(measure(&format!("SELECT * FROM {}1 x y{}", "(SELECT ".repeat(25), ")".repeat(25))).too_complex().is_some());
        assert!(measure(&format!("MERGE INT{}O t USING s ON true", "(SELECT ".repeat(31))).too_complex().is_some());
        assert!(measure(&format!("SELECT {}1{}", "(".repeat(40), ")".repeat(40))).too_complex().is_some());
        assert!(measure("SELECT lower(upper(trim(x))) FROM t").too_complex().is_none());
    }

    /// The text of the classifier bomb: `count` statements of function calls nested `depth` deep.
    fn bomb(count: usize, depth: usize) -> String {
        let one = format!("SELECT {}1{}", "f(".repeat(depth), ")".repeat(depth));
        vec![one; count].join(";\n")
    }

    #[test]
    fn a_text_has_one_budget_for_all_its_statements() {
        // Each statement alone is just within the per-statement parse cost...
        let depth = (1..64).rev().find(|&d| {
            let tokens = Tokenizer::new(&PostgreSqlDialect {}, &bomb(1, d)).tokenize().expect("tokenizes");
            let significant: Vec<&Token> = tokens.iter().filter(|t| is_significant(t)).collect();
            Shape::measure(&significant).too_complex().is_none()
        });
        let depth = depth.expect("some depth parses");
        let single = check(&bomb(1, depth), false);
        assert_eq!(single.over_budget, None);
        // ...but a few hundred of them are not parsed at all, and the text fails closed at once.
        let started = Instant::now();
        let c = check(&bomb(300, depth), false);
        let took = started.elapsed();
        assert!(c.over_budget.is_some(), "{c:?}");
        assert!(!c.cacheable && c.writes == Writes::Unknown && c.pins_session.is_some());
        assert!(took < Duration::from_millis(500), "fail closed without parsing, took {took:?}");
        // A cap on statements, whatever their cost.
        let many = vec!["SELECT 1"; MAX_STATEMENTS + 1].join(";");
        assert!(check(&many, false).over_budget.is_some());
        assert!(check(&vec!["SELECT 1"; MAX_STATEMENTS].join(";"), false).over_budget.is_none());
        // The deadline and the caller's departure are checked between statements.
        let past = Budget { deadline: Some(Instant::now()), stop: &|| false };
        assert!(classify_bounded("SELECT 1; SELECT 2", false, &past).over_budget.is_some());
        let gone = Budget { deadline: None, stop: &|| true };
        assert!(classify_bounded("SELECT 1", false, &gone).over_budget.is_some());
    }

    #[test]
    fn inline_classification_takes_only_cheap_texts() {
        for sql in ["SELECT * FROM t WHERE id = $1", "UPDATE t SET a = $1 WHERE id = $2", "BEGIN; SELECT 1; COMMIT"] {
            assert_eq!(classify_inline(sql, false), Some(classify(sql, false)), "{sql:?}");
        }
        let costly = [
            bomb(2, 8),
            format!("SELECT '{}'", "x".repeat(INLINE_MAX_TEXT_BYTES)),
            vec!["SELECT 1"; INLINE_MAX_STATEMENTS + 1].join(";"),
            format!("SELECT * FROM t WHERE a IN {}(1){}", "(SELECT b FROM u WHERE b IN ".repeat(6), ")".repeat(6)),
        ];
        for sql in costly {
            assert_eq!(classify_inline(&sql, false), None, "{}...", &sql[..30]);
        }
        // The worst the inline path accepts stays cheap (measured in debug builds here; release is
        // about ten times faster).
        let worst = format!("SELECT {} FROM t", vec!["coalesce(a, b, c)"; 200].join(", "));
        assert!(worst.len() <= INLINE_MAX_TEXT_BYTES);
        let started = Instant::now();
        let inline = classify_inline(&worst, false);
        let took = started.elapsed();
        assert!(inline.is_some_and(|c| c.cacheable));
        eprintln!("the costliest inline text took {took:?}");
        assert!(took < Duration::from_millis(250), "{took:?}");
    }

    #[test]
    fn multiple_statements_are_found_without_parsing() {
        let single = [
            "SELECT 1",
            "SELECT 1;",
            "SELECT 1 ; -- done\n ;",
            "SELECT ';'",
            "SELECT 'it''s; fine'",
            "SELECT E'\\'; still' ",
            "SELECT \"a;b\" FROM t",
            "SELECT $$;$$",
            "SELECT $tag$ ; $notyet$ ; $tag$",
            "SELECT 1 /* ; /* nested ; */ ; */",
            "SELECT $1; /* trailing */",
        ];
        for sql in single {
            assert!(!has_multiple_statements(sql), "{sql:?}");
        }
        let multiple =
            ["SELECT 1; SELECT 2", "SELECT 1;;DELETE FROM t", "SELECT 'a'';'; DROP TABLE t", "SELECT $$a$$; SELECT 2", "SELECT e'\\''; x'"];
        for sql in multiple {
            assert!(has_multiple_statements(sql), "{sql:?}");
        }
    }

    #[test]
    fn functions_operators_and_types_are_reported_for_the_catalog() {
        let c = check("SELECT lower(a), pg_catalog.upper(b), substring(c FROM 1) FROM t WHERE d @@ $1 AND e::mydomain = 'x'", false);
        assert!(c.functions.contains(&"lower".to_owned()), "{:?}", c.functions);
        assert!(!c.functions.contains(&"upper".to_owned()), "schema-qualified with pg_catalog: built in");
        assert!(c.functions.contains(&"substring".to_owned()));
        assert!(c.operators.contains(&"@@".to_owned()), "{:?}", c.operators);
        assert!(c.types.contains(&"mydomain".to_owned()), "{:?}", c.types);
        // Operators are read from the tokens, also where the parser gives up.
        let c = check("SELECT a !== b, c+-d FROM t", false);
        assert!(c.operators.contains(&"!==".to_owned()) && c.operators.contains(&"+-".to_owned()), "{:?}", c.operators);
        let c = check("SELECT CAST(a AS s.\"Dom\"[]), 'x'::text, int4 '1' FROM t", false);
        assert!(c.types.contains(&"Dom".to_owned()) && c.types.contains(&"text".to_owned()), "{:?}", c.types);
    }

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics() {
        let corpus = [
            "SELECT u.name, count(*) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 GROUP BY 1",
            "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
            "INSERT INTO t (a, b) VALUES ($1, 'x') ON CONFLICT (a) DO UPDATE SET b = excluded.b RETURNING *",
            "UPDATE t SET a = a + 1 FROM u WHERE t.id = u.id",
            "SET SESSION AUTHORIZATION 'x'; RESET ALL; SELECT set_config('a', 'b', false)",
            "CREATE TEMP TABLE x AS SELECT * FROM t FOR UPDATE",
            "SELECT CASE WHEN a THEN now() END, ARRAY[1, 2][1], $$x$$, E'\\n', x'ff' FROM t",
            "BEGIN; SAVEPOINT a; ROLLBACK TO a; COMMIT",
            "SELECT * FROM t WHERE ts > 'now'::timestamptz FOR NO KEY UPDATE",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
        ];
        let fragments =
            ["(", ")", "'", "\"", "$$", ";", "--", "/*", "*/", "::", "[", "]", "NOT ", "f(", "SELECT ", ",", "$1", "\\", "é", "\0"];
        let mut rng = Rng(0x5eed_cafe_f00d_d00d);
        for iteration in 0..3_000 {
            let sql = if iteration % 3 == 0 {
                let bytes: Vec<u8> = (0..rng.below(80)).map(|_| rng.next() as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                let mut sql = corpus[rng.below(corpus.len())].to_owned();
                for _ in 0..1 + rng.below(6) {
                    let mut at = rng.below(sql.len() + 1);
                    while !sql.is_char_boundary(at) {
                        at -= 1;
                    }
                    match rng.below(4) {
                        0 => sql.insert_str(at, fragments[rng.below(fragments.len())]),
                        1 => {
                            let mut end = (at + 1 + rng.below(8)).min(sql.len());
                            while !sql.is_char_boundary(end) {
                                end -= 1;
                            }
                            sql.replace_range(at..end, "");
                        }
                        2 => {
                            let piece = fragments[rng.below(fragments.len())].repeat(1 + rng.below(60));
                            sql.insert_str(at, &piece);
                        }
                        _ => {
                            let other = corpus[rng.below(corpus.len())];
                            let mut cut = rng.below(other.len() + 1);
                            while !other.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            sql.insert_str(at, &other[cut..]);
                        }
                    }
                }
                sql
            };
            let first = check(&sql, iteration % 2 == 0);
            assert_eq!(first, classify(&sql, iteration % 2 == 0), "classification of {sql:?} is not deterministic");
        }
    }
}
