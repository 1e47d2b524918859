//! Replacements for SQLite's `LIKE`, `GLOB`, `instr()`, `replace()` and
//! `trim()`/`ltrim()`/`rtrim()` on tenant connections.
//!
//! SQLite checks for interrupts between virtual-machine instructions, and
//! one call of these functions is one instruction whose cost grows with the
//! product of its inputs' lengths: `LIKE` with a leading `%` against a value
//! of a few MiB ran for tens of seconds, past any timeout. The versions here
//! give the same results, but `instr()` and `replace()` use a linear-time
//! substring search, the trims look characters up in a set instead of
//! scanning the list of characters for each one, and `LIKE`/`GLOB` check every [`CHECK_EVERY`] steps
//! whether the statement was told to stop (its deadline passed, or its
//! request ended), and fail with `SQLITE_INTERRUPT` if so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, Error, ffi};

/// Matching steps between two checks of the stop flag and the deadline.
const CHECK_EVERY: u64 = 1 << 16;

/// When the statement in progress must stop: set by the watchdog's
/// interrupt, and a deadline of its own so that a connection used without
/// a pool stops too.
#[derive(Debug)]
pub(crate) struct StopSignal {
    stopped: AtomicBool,
    /// Nanoseconds after `base`; `u64::MAX` for none.
    deadline_ns: AtomicU64,
    base: Instant,
}

impl StopSignal {
    pub(crate) fn new() -> Arc<StopSignal> {
        Arc::new(StopSignal { stopped: AtomicBool::new(false), deadline_ns: AtomicU64::new(u64::MAX), base: Instant::now() })
    }

    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Starts a statement: not stopped, stopping at `deadline`.
    pub(crate) fn arm(&self, deadline: Option<Instant>) {
        let ns = deadline.map_or(u64::MAX, |d| u64::try_from(d.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX));
        self.deadline_ns.store(ns, Ordering::SeqCst);
        self.stopped.store(false, Ordering::SeqCst);
    }

    /// Whether the watchdog said stop (the deadline alone does not count).
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub(crate) fn should_stop(&self) -> bool {
        self.stopped.load(Ordering::SeqCst) || {
            let deadline = self.deadline_ns.load(Ordering::SeqCst);
            deadline != u64::MAX && self.base + Duration::from_nanos(deadline) <= Instant::now()
        }
    }
}

fn interrupted() -> Error {
    Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_INTERRUPT), None)
}

fn too_big() -> Error {
    Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_TOOBIG), None)
}

fn error(message: &str) -> Error {
    Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_ERROR), Some(message.to_owned()))
}

/// Installs the functions on `conn`. `max_pattern` mirrors
/// `SQLITE_LIMIT_LIKE_PATTERN_LENGTH`, `max_length` `SQLITE_LIMIT_LENGTH`
/// (read on each call, since the host changes it per call).
pub(crate) fn register(conn: &Connection, stop: &Arc<StopSignal>, max_pattern: usize) -> rusqlite::Result<()> {
    // INNOCUOUS: usable from the schema (a CHECK with LIKE) under
    // trusted_schema=OFF, as the built-ins are; they have no side effects.
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC | FunctionFlags::SQLITE_INNOCUOUS;
    for args in [2, 3] {
        let stop = Arc::clone(stop);
        conn.create_scalar_function("like", args, flags, move |ctx| like(ctx, &stop, max_pattern))?;
    }
    let glob_stop = Arc::clone(stop);
    conn.create_scalar_function("glob", 2, flags, move |ctx| glob(ctx, &glob_stop, max_pattern))?;
    conn.create_scalar_function("instr", 2, flags, instr)?;
    conn.create_scalar_function("replace", 3, flags, replace)?;
    for (name, ends) in [("trim", Ends::Both), ("ltrim", Ends::Left), ("rtrim", Ends::Right)] {
        for args in [1, 2] {
            conn.create_scalar_function(name, args, flags, move |ctx| trim(ctx, ends))?;
        }
    }
    Ok(())
}

/// The text SQLite would give for a value (`sqlite3_value_text`), or `None`
/// for NULL.
fn text_of(value: ValueRef<'_>) -> Option<Vec<u8>> {
    match value {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string().into_bytes()),
        ValueRef::Real(r) => Some(real_text(r)),
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(t.to_vec()),
    }
}

/// A real as SQLite renders it (`%!.15g`), by SQLite's own formatter.
fn real_text(r: f64) -> Vec<u8> {
    // SAFETY: the format string is a NUL-terminated literal whose only
    // conversion takes one double, which is passed; the returned buffer is
    // NUL-terminated (or NULL when out of memory), read before it is freed
    // with sqlite3_free, as sqlite3_mprintf requires.
    unsafe {
        let p = ffi::sqlite3_mprintf(c"%!.15g".as_ptr(), r);
        if p.is_null() {
            return format!("{r}").into_bytes();
        }
        let text = std::ffi::CStr::from_ptr(p).to_bytes().to_vec();
        ffi::sqlite3_free(p.cast());
        text
    }
}

fn chars(bytes: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(bytes).chars().collect()
}

/// One element of a compiled pattern.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// `%` or `*`: any run of characters.
    Any,
    /// `_` or `?`: one character.
    One,
    Literal(char),
    /// `[...]` of GLOB: one character in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// A pattern that can match nothing (LIKE's escape at its very end).
    Never,
}

fn like(ctx: &Context<'_>, stop: &StopSignal, max_pattern: usize) -> rusqlite::Result<Option<bool>> {
    let (Some(pattern), Some(text)) = (text_of(ctx.get_raw(0)), text_of(ctx.get_raw(1))) else { return Ok(None) };
    let escape = if ctx.len() == 3 {
        let Some(escape) = text_of(ctx.get_raw(2)) else { return Ok(None) };
        let escape = chars(&escape);
        if escape.len() != 1 {
            return Err(error("ESCAPE expression must be a single character"));
        }
        Some(escape[0])
    } else {
        None
    };
    if pattern.len() > max_pattern {
        return Err(error("LIKE or GLOB pattern too complex"));
    }
    let mut tokens = Vec::new();
    let mut pattern = chars(&pattern).into_iter();
    while let Some(c) = pattern.next() {
        tokens.push(match c {
            c if Some(c) == escape => match pattern.next() {
                Some(c) => Token::Literal(c.to_ascii_lowercase()),
                None => Token::Never,
            },
            '%' => Token::Any,
            '_' => Token::One,
            c => Token::Literal(c.to_ascii_lowercase()),
        });
    }
    let text: Vec<char> = chars(&text).into_iter().map(|c| c.to_ascii_lowercase()).collect();
    matches(&tokens, &text, stop).map(Some)
}

fn glob(ctx: &Context<'_>, stop: &StopSignal, max_pattern: usize) -> rusqlite::Result<Option<bool>> {
    let (Some(pattern), Some(text)) = (text_of(ctx.get_raw(0)), text_of(ctx.get_raw(1))) else { return Ok(None) };
    if pattern.len() > max_pattern {
        return Err(error("LIKE or GLOB pattern too complex"));
    }
    let pattern = chars(&pattern);
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        let c = pattern[i];
        i += 1;
        tokens.push(match c {
            '*' => Token::Any,
            '?' => Token::One,
            '[' => match glob_class(&pattern, &mut i) {
                Some(class) => class,
                // An unterminated class matches nothing, as in SQLite.
                None => Token::Never,
            },
            c => Token::Literal(c),
        });
    }
    matches(&tokens, &chars(&text), stop).map(Some)
}

/// Parses a GLOB class after its `[`: `^` negates, a `]` first is a member,
/// `a-z` is a range, a `-` first or last is a member.
fn glob_class(pattern: &[char], i: &mut usize) -> Option<Token> {
    let mut negated = false;
    if pattern.get(*i) == Some(&'^') {
        negated = true;
        *i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *pattern.get(*i)?;
        *i += 1;
        if c == ']' && !first {
            return Some(Token::Class { negated, ranges });
        }
        first = false;
        if pattern.get(*i) == Some(&'-')
            && let Some(&end) = pattern.get(*i + 1)
            && end != ']'
        {
            *i += 2;
            ranges.push((c, end));
        } else {
            ranges.push((c, c));
        }
    }
}

fn token_matches(token: &Token, c: char) -> bool {
    match token {
        Token::Any | Token::One => true,
        Token::Literal(l) => *l == c,
        Token::Class { negated, ranges } => ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated,
        Token::Never => false,
    }
}

/// Wildcard matching that backtracks only to the last `Any`, which is
/// enough for patterns whose other elements each match one character; its
/// worst case is the product of the lengths, hence the stop checks.
fn matches(pattern: &[Token], text: &[char], stop: &StopSignal) -> rusqlite::Result<bool> {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    let mut steps: u64 = 0;
    while t < text.len() {
        steps += 1;
        if steps.is_multiple_of(CHECK_EVERY) && stop.should_stop() {
            return Err(interrupted());
        }
        match pattern.get(p) {
            Some(Token::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(token) if token_matches(token, text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return Ok(false),
            },
        }
    }
    Ok(pattern[p..].iter().all(|token| *token == Token::Any))
}

/// `instr(X, Y)`: the 1-based position of the first `Y` in `X` (bytes when
/// both are blobs, characters otherwise), 0 if none.
fn instr(ctx: &Context<'_>) -> rusqlite::Result<Option<i64>> {
    let (haystack, needle) = (ctx.get_raw(0), ctx.get_raw(1));
    let blobs = matches!((haystack, needle), (ValueRef::Blob(_), ValueRef::Blob(_)));
    let (Some(haystack), Some(needle)) = (text_of(haystack), text_of(needle)) else { return Ok(None) };
    let Some(at) = memchr::memmem::find(&haystack, &needle) else { return Ok(Some(0)) };
    let position = if blobs {
        at
    } else {
        // Characters before the match: bytes that do not continue a UTF-8 sequence.
        haystack[..at].iter().filter(|&&b| b & 0xC0 != 0x80).count()
    };
    Ok(Some(i64::try_from(position).unwrap_or(i64::MAX).saturating_add(1)))
}

/// `replace(X, Y, Z)`: every `Y` in `X` replaced by `Z`; `X` itself when `Y`
/// is empty.
fn replace(ctx: &Context<'_>) -> rusqlite::Result<Option<Value>> {
    // The order of the NULL checks is SQLite's: an empty `Y` gives `X`
    // even when `Z` is NULL.
    let (Some(text), Some(from)) = (text_of(ctx.get_raw(0)), text_of(ctx.get_raw(1))) else { return Ok(None) };
    if from.is_empty() {
        return Ok(Some(as_text(text)));
    }
    let Some(to) = text_of(ctx.get_raw(2)) else { return Ok(None) };
    // SAFETY: the connection is only read for its length limit, on the
    // thread that runs this function, while the statement holds it.
    let max = unsafe { ctx.get_connection() }
        .map(|conn| conn.limit(rusqlite::limits::Limit::SQLITE_LIMIT_LENGTH))
        .unwrap_or(Ok(i32::MAX))
        .unwrap_or(i32::MAX);
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(text.len().min(max));
    let mut rest = &text[..];
    for at in memchr::memmem::find_iter(&text, &from) {
        let start = text.len() - rest.len();
        if at < start {
            continue; // Overlaps the previous match.
        }
        out.extend_from_slice(&text[start..at]);
        out.extend_from_slice(&to);
        rest = &text[at + from.len()..];
        if out.len() > max {
            return Err(too_big());
        }
    }
    out.extend_from_slice(rest);
    if out.len() > max {
        return Err(too_big());
    }
    Ok(Some(as_text(out)))
}

#[derive(Debug, Clone, Copy)]
enum Ends {
    Left,
    Right,
    Both,
}

/// `trim(X [, Y])`: `X` without the characters of `Y` (a space by default)
/// at its start, end or both.
fn trim(ctx: &Context<'_>, ends: Ends) -> rusqlite::Result<Option<Value>> {
    let Some(text) = text_of(ctx.get_raw(0)) else { return Ok(None) };
    let chars = if ctx.len() == 1 {
        b" ".to_vec()
    } else {
        let Some(chars) = text_of(ctx.get_raw(1)) else { return Ok(None) };
        chars
    };
    // Single bytes in a table, longer characters in a set.
    let mut bytes = [false; 256];
    let mut longer: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    for c in utf8_chars(&chars) {
        match c {
            [b] => bytes[usize::from(*b)] = true,
            _ => {
                longer.insert(c);
            }
        }
    }
    let mut lengths: Vec<usize> = longer.iter().map(|c| c.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    // The length of the member of the set that `text[from..to]` starts
    // (`left`) or ends (`!left`) with.
    let member = |from: usize, to: usize, left: bool| -> Option<usize> {
        let edge = if left { text.get(from) } else { to.checked_sub(1).and_then(|i| text.get(i)) };
        if from < to && edge.is_some_and(|b| bytes[usize::from(*b)]) {
            return Some(1);
        }
        lengths
            .iter()
            .copied()
            .find(|&len| from + len <= to && longer.contains(if left { &text[from..from + len] } else { &text[to - len..to] }))
    };
    let (mut start, mut end) = (0, text.len());
    if matches!(ends, Ends::Left | Ends::Both) {
        while let Some(len) = member(start, end, true) {
            start += len;
        }
    }
    if matches!(ends, Ends::Right | Ends::Both) {
        while let Some(len) = member(start, end, false) {
            end -= len;
        }
    }
    Ok(Some(as_text(text[start..end].to_vec())))
}

/// Splits bytes into UTF-8 characters the way SQLite does: a lead byte and
/// the continuation bytes after it.
fn utf8_chars(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        let start = i;
        let lead = *bytes.get(start)?;
        i += 1;
        if lead >= 0xC0 {
            while bytes.get(i).is_some_and(|b| b & 0xC0 == 0x80) {
                i += 1;
            }
        }
        Some(&bytes[start..i])
    })
}

/// The result as text, as SQLite gives it; bytes that are not UTF-8 (a
/// blob went in) come back as a blob, which keeps them intact.
fn as_text(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(s) => Value::Text(s),
        Err(e) => Value::Blob(e.into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        register(&conn, &StopSignal::new(), 50_000).unwrap();
        conn
    }

    /// Each expression gives the same result with the replacements as with
    /// SQLite's built-ins.
    #[test]
    fn results_match_the_builtins() {
        let builtin = Connection::open_in_memory().unwrap();
        let ours = conn();
        let cases = [
            "'abc' LIKE 'a%'",
            "'ABC' LIKE 'a_c'",
            "'abc' LIKE 'A%C'",
            "'Ärger' LIKE 'ärger'",
            "'Ärger' LIKE 'Ä%'",
            "'a%c' LIKE 'a\\%c' ESCAPE '\\'",
            "'abc' LIKE 'a\\%c' ESCAPE '\\'",
            "'abc' LIKE 'abc\\' ESCAPE '\\'",
            "'' LIKE '%'",
            "'' LIKE '_'",
            "'x' LIKE ''",
            "'mississippi' LIKE '%iss%ppi'",
            "'mississippi' LIKE '%iss%ppix'",
            "'日本語' LIKE '_本_'",
            "12 LIKE '1%'",
            "1.5 LIKE '1.5'",
            "x'616263' LIKE 'a%'",
            "NULL LIKE 'a'",
            "'a' LIKE NULL",
            "'a' LIKE 'a' ESCAPE NULL",
            "'abc' GLOB 'a*'",
            "'abc' GLOB 'A*'",
            "'abc' GLOB 'a?c'",
            "'abc' GLOB '[a-c]bc'",
            "'abc' GLOB '[^a]bc'",
            "'-bc' GLOB '[-x]bc'",
            "']bc' GLOB '[]x]bc'",
            "'abc' GLOB '[abc'",
            "'a*c' GLOB 'a[*]c'",
            "'x' GLOB ''",
            "'' GLOB '*'",
            "instr('hello', 'l')",
            "instr('héllo', 'l')",
            "instr('hello', '')",
            "instr('hello', 'z')",
            "instr(x'00ff01', x'01')",
            "instr(12345, 34)",
            "instr(NULL, 'a')",
            "replace('banana', 'an', 'AN')",
            "replace('aaaa', 'aa', 'b')",
            "replace('abc', '', 'x')",
            "replace(123, 2, 9)",
            "typeof(replace(123, '', 9))",
            "replace('abc', 'b', NULL)",
            "replace('abc', '', NULL)",
            "replace(NULL, '', 'x')",
            "replace('abc', NULL, 'x')",
            "replace('héllo', 'é', 'e')",
            "trim('  abc  ')",
            "ltrim('  abc  ')",
            "rtrim('  abc  ')",
            "trim('xxabcxyx', 'xy')",
            "ltrim('xxabcxyx', 'xy')",
            "rtrim('xxabcxyx', 'xy')",
            "trim('ééaéé', 'é')",
            "trim('abc', '')",
            "trim('abc', NULL)",
            "trim(NULL)",
            "trim(12300, '0')",
            "typeof(trim(123))",
            "trim('aaa', 'a')",
        ];
        for case in cases {
            let sql = format!("SELECT quote({case})");
            let want: String = builtin.query_row(&sql, [], |r| r.get(0)).unwrap_or_else(|e| panic!("{case}: {e}"));
            let got: String = ours.query_row(&sql, [], |r| r.get(0)).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(got, want, "{case}");
        }
        for bad in ["'a' LIKE 'a' ESCAPE 'xy'", "'a' LIKE 'a' ESCAPE ''"] {
            let e = ours.query_row(&format!("SELECT {bad}"), [], |r| r.get::<_, i64>(0)).unwrap_err();
            assert!(e.to_string().contains("ESCAPE expression must be a single character"), "{e}");
        }
    }

    #[test]
    fn a_long_match_stops_when_told() {
        let conn = Connection::open_in_memory().unwrap();
        let stop = StopSignal::new();
        register(&conn, &stop, 50_000).unwrap();
        stop.arm(Some(Instant::now() + Duration::from_millis(100)));
        let t = Instant::now();
        let slow = "SELECT printf('%.*c', 4000000, 'a') LIKE ('%' || printf('%.*c', 12000, 'a') || 'b')";
        let e = conn.query_row(slow, [], |r| r.get::<_, i64>(0)).unwrap_err();
        assert_eq!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::OperationInterrupted), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        stop.arm(None);
        stop.stop();
        let e = conn
            .query_row("SELECT printf('%.*c', 4000000, 'a') GLOB ('*' || printf('%.*c', 12000, 'a') || 'b')", [], |r| r.get::<_, i64>(0));
        assert_eq!(e.unwrap_err().sqlite_error_code(), Some(rusqlite::ErrorCode::OperationInterrupted));
        // instr, replace and trim are linear: quadratic would take hours here.
        stop.arm(None);
        let t = Instant::now();
        let found: i64 =
            conn.query_row("SELECT instr(printf('%.*c', 4000000, 'a'), printf('%.*c', 2000000, 'a') || 'b')", [], |r| r.get(0)).unwrap();
        assert_eq!(found, 0);
        let len: i64 = conn
            .query_row("SELECT length(replace(printf('%.*c', 4000000, 'a'), printf('%.*c', 2000000, 'a') || 'b', 'x'))", [], |r| r.get(0))
            .unwrap();
        assert_eq!(len, 4_000_000);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let t = Instant::now();
        let len: i64 = conn
            .query_row("SELECT length(trim(printf('%.*c', 4000000, 'a'), printf('%.*c', 1000000, 'b') || 'a'))", [], |r| r.get(0))
            .unwrap();
        assert_eq!(len, 0);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
