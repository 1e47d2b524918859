//! The timeouts a client may not raise: `statement_timeout`, `lock_timeout` and
//! `idle_in_transaction_session_timeout` are what bound how long a pooled connection can be held,
//! so a statement that would set one above the database's maximum (or to 0, which disables it) is
//! refused before it reaches the origin.
//!
//! This is a scan of the text's tokens, not a proof: it sees `SET [LOCAL|SESSION] name {=|TO}
//! value`, the same inside `ALTER ... SET` and `CREATE FUNCTION ... SET`, `set_config('name',
//! 'value', ...)`, `UPDATE pg_settings`, and all of these again inside string literals (function
//! bodies, `DO` blocks, `EXECUTE` strings). A value or a setting name it cannot read as a literal
//! is refused. A name built at run time (`'statement' || '_timeout'`) is not seen, which is why the
//! pool also enforces its own deadline on every statement (see [`crate::pool`]).

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer};

/// Settings whose maximum is enforced, lowercase.
const STATEMENT_TIMEOUT: &str = "statement_timeout";
const LOCK_TIMEOUT: &str = "lock_timeout";
const IDLE_IN_TRANSACTION: &str = "idle_in_transaction_session_timeout";
/// String literals are scanned again as SQL, this many levels deep (a `DO` body holding an
/// `EXECUTE` string is two).
const MAX_DEPTH: usize = 4;

/// The largest value each setting may take, in milliseconds; `None` when the database sets no
/// maximum, and then any value is allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    pub statement_timeout_ms: Option<u64>,
    pub lock_timeout_ms: Option<u64>,
    pub idle_in_transaction_timeout_ms: Option<u64>,
}

impl SessionLimits {
    /// The limits of a database with these configured timeouts (0 = none). `lock_timeout` may not
    /// exceed the statement timeout: waiting for a lock is part of a statement.
    pub fn new(statement_timeout_ms: u64, idle_in_transaction_timeout_ms: u64) -> SessionLimits {
        let some = |ms: u64| (ms > 0).then_some(ms);
        SessionLimits {
            statement_timeout_ms: some(statement_timeout_ms),
            lock_timeout_ms: some(statement_timeout_ms),
            idle_in_transaction_timeout_ms: some(idle_in_transaction_timeout_ms),
        }
    }

    fn is_unlimited(&self) -> bool {
        self.statement_timeout_ms.is_none() && self.lock_timeout_ms.is_none() && self.idle_in_transaction_timeout_ms.is_none()
    }

    fn max_for(&self, name: &str) -> Option<Option<u64>> {
        match name {
            STATEMENT_TIMEOUT => Some(self.statement_timeout_ms),
            LOCK_TIMEOUT => Some(self.lock_timeout_ms),
            IDLE_IN_TRANSACTION => Some(self.idle_in_transaction_timeout_ms),
            _ => None,
        }
    }

    /// Why `sql` may not run, or `None` when it changes none of the limited settings beyond its
    /// maximum.
    pub fn check(&self, sql: &str) -> Option<String> {
        if self.is_unlimited() || !worth_scanning(sql) {
            return None;
        }
        self.scan(sql, 0)
    }

    fn scan(&self, sql: &str, depth: usize) -> Option<String> {
        let dialect = PostgreSqlDialect {};
        let tokens = match Tokenizer::new(&dialect, sql).tokenize() {
            Ok(tokens) => tokens,
            // Text the tokenizer cannot read is judged by its words alone.
            Err(_) => {
                let lower = sql.to_ascii_lowercase();
                return [STATEMENT_TIMEOUT, LOCK_TIMEOUT, IDLE_IN_TRANSACTION, "set_config", "pg_settings"]
                    .iter()
                    .find(|name| lower.contains(*name))
                    .map(|name| format!("the text mentions {name} in a form that cannot be checked"));
            }
        };
        let tokens: Vec<Token> = tokens.into_iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect();
        for (i, token) in tokens.iter().enumerate() {
            if let Some(word) = word_of(token) {
                if let Some(max) = self.max_for(&word) {
                    // `name = value` / `name TO value`; any other use of the name (SHOW, a
                    // column of that name) changes nothing.
                    if (matches!(tokens.get(i + 1), Some(Token::Eq)) || tokens.get(i + 1).and_then(word_of).as_deref() == Some("to"))
                        && let Some(reason) = check_value(&word, max, &tokens[i + 2..])
                    {
                        return Some(reason);
                    }
                } else if word == "set_config" && matches!(tokens.get(i + 1), Some(Token::LParen)) {
                    if let Some(reason) = self.check_set_config(&tokens[i + 2..]) {
                        return Some(reason);
                    }
                } else if word == "pg_settings" && tokens.iter().any(|t| word_is(t, "update")) {
                    return Some("changing settings through UPDATE pg_settings is not allowed; use SET LOCAL".into());
                }
            }
            if depth < MAX_DEPTH
                && let Some(text) = string_literal(token)
                && worth_scanning(text)
                && let Some(reason) = self.scan(text, depth + 1)
            {
                return Some(reason);
            }
        }
        None
    }

    /// `set_config(name, value, is_local)`: the name must be a literal; when it is a limited
    /// setting, so must the value.
    fn check_set_config(&self, args: &[Token]) -> Option<String> {
        let name = match (args.first().and_then(string_literal), args.get(1)) {
            (Some(name), Some(Token::Comma)) => name.trim().to_ascii_lowercase(),
            _ => return Some("set_config with a setting name that is not a literal is not allowed".into()),
        };
        let max = self.max_for(&name)?;
        match (args.get(1), args.get(2).and_then(string_literal), args.get(3)) {
            (Some(Token::Comma), Some(value), Some(Token::Comma)) => check_literal(&name, max, value),
            _ => Some(format!("set_config of {name} with a value that is not a literal is not allowed")),
        }
    }
}

/// Whether `sql` refers to a parameter (`$1`...), outside string literals and comments.
pub fn has_parameters(sql: &str) -> bool {
    if !sql.contains('$') {
        return false;
    }
    match Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() {
        Ok(tokens) => tokens.iter().any(|t| matches!(t, Token::Placeholder(p) if p.starts_with('$'))),
        Err(_) => true,
    }
}

/// A cheap test that skips the tokenizer for text that cannot change a limited setting: the words
/// it looks for, or an escape that could spell them.
fn worth_scanning(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    ["timeout", "set_config", "pg_settings", "\\", "u&"].iter().any(|needle| lower.contains(needle))
}

fn word_of(token: &Token) -> Option<String> {
    match token {
        Token::Word(w) => Some(w.value.to_ascii_lowercase()),
        _ => None,
    }
}

fn word_is(token: &Token, expected: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(expected))
}

fn string_literal(token: &Token) -> Option<&str> {
    match token {
        Token::SingleQuotedString(s)
        | Token::EscapedStringLiteral(s)
        | Token::UnicodeStringLiteral(s)
        | Token::NationalStringLiteral(s)
        | Token::TripleSingleQuotedString(s) => Some(s),
        Token::DollarQuotedString(d) => Some(&d.value),
        _ => None,
    }
}

/// The value after `name =` / `name TO`.
fn check_value(name: &str, max: Option<u64>, rest: &[Token]) -> Option<String> {
    let max_ms = max?;
    let value = match rest.first() {
        Some(Token::Number(n, _)) => n.clone(),
        Some(token) if string_literal(token).is_some() => string_literal(token).unwrap_or_default().to_owned(),
        // Back to the pool's own value.
        Some(token) if word_is(token, "default") => return None,
        _ => return Some(format!("{name} may only be set to a literal value of at most {max_ms} ms")),
    };
    // `SET x = 1, 2` or an expression after the value is not a plain setting either.
    if matches!(rest.get(1), Some(t) if !matches!(t, Token::SemiColon | Token::EOF) && !is_clause_end(t)) {
        return Some(format!("{name} may only be set to a literal value of at most {max_ms} ms"));
    }
    check_literal(name, Some(max_ms), &value)
}

/// What may follow a `SET name = value`: the end of the statement, or the rest of a `CREATE
/// FUNCTION` / `ALTER` clause list.
fn is_clause_end(token: &Token) -> bool {
    matches!(token, Token::RParen) || matches!(token, Token::Word(w) if w.quote_style.is_none())
}

fn check_literal(name: &str, max: Option<u64>, value: &str) -> Option<String> {
    let max_ms = max?;
    match parse_duration_ms(value) {
        Some(0.0) => Some(format!("setting {name} to 0 (no limit) is not allowed; the most this database allows is {max_ms} ms")),
        Some(ms) if ms > max_ms as f64 => {
            Some(format!("setting {name} to {value} is not allowed; the most this database allows is {max_ms} ms"))
        }
        Some(_) => None,
        None => Some(format!("{name} value \"{}\" cannot be checked; give it in ms, s or min", value.chars().take(32).collect::<String>())),
    }
}

/// A Postgres time setting in milliseconds: a number (ms) or a number with a unit.
fn parse_duration_ms(value: &str) -> Option<f64> {
    let value = value.trim();
    let split = value.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    if !number.is_finite() {
        return None;
    }
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "us" => 0.001,
        "s" => 1000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = number * factor;
    // Postgres rounds to whole milliseconds; a negative value is an error there.
    Some(if ms > 0.0 && ms < 1.0 { 1.0 } else { ms.round() }).filter(|ms| *ms >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits::new(5000, 60_000)
    }

    #[test]
    fn raising_or_disabling_a_timeout_is_refused() {
        for sql in [
            "SET LOCAL statement_timeout = 0",
            "SET statement_timeout TO 0",
            "set session statement_timeout = '10min'",
            "SET \"statement_timeout\" = 0",
            "SET LOCAL lock_timeout = '6s'",
            "SET idle_in_transaction_session_timeout = 0",
            "SELECT set_config('statement_timeout', '0', true)",
            "SELECT pg_catalog.set_config('STATEMENT_TIMEOUT', '1h', false)",
            "SELECT set_config($1, '0', true)",
            "SELECT set_config('statement_timeout', $1, true)",
            "SELECT set_config('statement' || '_timeout', '0', true)",
            "UPDATE pg_settings SET setting = '0' WHERE name = 'statement_timeout'",
            "DO $$ BEGIN PERFORM set_config('statement_timeout', '0', true); END $$",
            "DO $$ BEGIN EXECUTE 'SET LOCAL statement_timeout = 0'; END $$",
            "DO $$ BEGIN EXECUTE 'SET LOCAL statement_timeout = ' || 0; END $$",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET statement_timeout = 0 AS 'SELECT 1'",
            "ALTER ROLE CURRENT_USER SET statement_timeout = 0",
            "SELECT set_config(E'statement\\x5ftimeout', '0', true)",
            "SET statement_timeout = 1e9",
            "SET statement_timeout = 'forever'",
        ] {
            assert!(limits().check(sql).is_some(), "{sql}");
        }
    }

    #[test]
    fn values_within_the_limit_and_unrelated_text_pass() {
        for sql in [
            "SET LOCAL statement_timeout = 1000",
            "SET LOCAL statement_timeout = '4s'",
            "SET statement_timeout TO DEFAULT",
            "RESET statement_timeout",
            "SHOW statement_timeout",
            "SELECT set_config('search_path', 'public', true)",
            "SELECT set_config('statement_timeout', '500ms', true)",
            "SELECT current_setting('statement_timeout')",
            "SELECT 1",
            "SELECT timeout FROM jobs WHERE timeout > 5",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET statement_timeout = 1000 STABLE AS 'SELECT 1'",
        ] {
            assert_eq!(limits().check(sql), None, "{sql}");
        }
        // Without maxima nothing is refused.
        assert_eq!(SessionLimits::new(0, 0).check("SET LOCAL statement_timeout = 0"), None);
        // Only the idle-in-transaction maximum is set.
        let idle_only = SessionLimits::new(0, 1000);
        assert_eq!(idle_only.check("SET LOCAL statement_timeout = 0"), None);
        assert!(idle_only.check("SET idle_in_transaction_session_timeout = 0").is_some());
    }

    #[test]
    fn parameters_are_found_outside_literals() {
        assert!(has_parameters("SELECT set_config('statement_timeout', $1, true)"));
        assert!(!has_parameters("SET statement_timeout = 0"));
        assert!(!has_parameters("DO $$ BEGIN PERFORM 1; END $$"));
        assert!(!has_parameters("SELECT '$1'"));
    }

    #[test]
    fn durations_parse_like_postgres() {
        assert_eq!(parse_duration_ms("1500"), Some(1500.0));
        assert_eq!(parse_duration_ms("2s"), Some(2000.0));
        assert_eq!(parse_duration_ms(" 1 min "), Some(60_000.0));
        assert_eq!(parse_duration_ms("10us"), Some(1.0));
        assert_eq!(parse_duration_ms("0"), Some(0.0));
        assert_eq!(parse_duration_ms("-1"), None);
        assert_eq!(parse_duration_ms("soon"), None);
    }
}
