//! Cache keys: two texts that share a key must be the same query. A corpus of literal forms and
//! spellings is run on a real Postgres; every group of texts with one key must answer byte for
//! byte alike, and the proxy must answer each text as Postgres does, whatever was cached before.

use std::collections::BTreeMap;

use cordon_pgaccel::classify::classify;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::Proxy;

/// Literal forms whose spellings the tokenizer may merge.
const LITERALS: &[&str] = &[
    "0x1F",
    "0X1F",
    "X'1F'",
    "x'1F'",
    "x'1f'",
    "0o17",
    "0b101",
    "B'101'",
    "b'101'",
    "1_000",
    "1000",
    "1e3",
    "1E3",
    ".5e3",
    "0.5e3",
    "500",
    "1.0",
    "1",
    "01",
    "1a",
    "1 a",
    "1.a",
    "'a'",
    "E'a'",
    "e'a\\''",
    "E'\\x41'",
    "U&'\\0041'",
    "u&'\\0041'",
    "'\\0041'",
    "N'a'",
    "$$a$$",
    "$A$a$A$",
    "$a$a$a$",
    "'a' 'b'",
    "'a'\n'b'",
    "'a' -- c\n'b'",
    "'a' /* c */\n'b'",
    "int4 '1'",
    "'1'::int4",
    "interval '1' day",
    "'1 day'::interval",
    "true",
    "TRUE",
    "'t'::bool",
    "NULL",
    "null",
    "1::text",
    "1 ::text",
    "-1",
    "- 1",
    "--1\n2",
    "1/**/a",
    "1\u{a0}a",
    "'x' \"y\"",
    "'x' y",
    "1.5::numeric(3,1)",
    "1.5::numeric(3, 1)",
    "ARRAY[1,2]",
    "'{1,2}'::int[]",
    "E'\\\\'",
];

/// Spellings of the same text around each literal.
fn spellings(literal: &str) -> Vec<String> {
    vec![
        format!("SELECT {literal}"),
        format!("select {literal}"),
        format!("SELECT  {literal} "),
        format!("SELECT /* c */ {literal}"),
        format!("SELECT {literal} -- c\n"),
        format!("SeLeCt\t{literal};"),
        format!("SELECT ({literal})"),
        format!("SELECT {}", literal.to_uppercase()),
        format!("SELECT {}", literal.to_lowercase()),
    ]
}

/// The result of a text on the origin, as comparable bytes: columns, rows and any error code.
async fn answer(client: &Client, sql: &str) -> String {
    match client.simple_query(sql).await {
        Ok(messages) => {
            let mut out = String::new();
            for message in messages {
                match message {
                    SimpleQueryMessage::RowDescription(columns) => {
                        for column in columns.iter() {
                            out.push_str(&format!("col {:?} ", column.name()));
                        }
                    }
                    SimpleQueryMessage::Row(row) => {
                        out.push_str("row");
                        for i in 0..row.len() {
                            out.push_str(&format!(" {:?}", row.get(i)));
                        }
                        out.push('\n');
                    }
                    SimpleQueryMessage::CommandComplete(n) => out.push_str(&format!("complete {n}\n")),
                    _ => {}
                }
            }
            out
        }
        Err(error) => format!("error {:?}", error.code().map(|c| c.code().to_owned())),
    }
}

#[tokio::test]
async fn texts_that_share_a_key_give_byte_identical_results() {
    let proxy = Proxy::start("", "max_age_s = 60").await;
    let origin = proxy.origin().await;
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut texts = Vec::new();
    for literal in LITERALS {
        for sql in spellings(literal) {
            if let Some(key) = classify(&sql, false).normalized {
                groups.entry(key).or_default().push(sql.clone());
            }
            texts.push(sql);
        }
    }
    let mut compared = 0;
    for (key, members) in &groups {
        let expected = answer(&origin, &members[0]).await;
        for other in &members[1..] {
            assert_eq!(answer(&origin, other).await, expected, "{:?} and {:?} share the key {key:?}", members[0], other);
            compared += 1;
        }
    }
    assert!(compared > 100, "the corpus must exercise shared keys: {compared}");

    // Through the proxy, every text answers as the origin does, whatever the cache holds: each
    // text is read twice (the second time from the cache where it is cacheable).
    let client = proxy.client().await;
    for pair in [["SELECT 0x1F", "SELECT X'1F'"], ["SELECT 1 a", "SELECT 1a"], ["SELECT 0b101", "SELECT B'101'"]] {
        for sql in pair.iter().chain(pair.iter()) {
            assert_eq!(answer(&client, sql).await, answer(&origin, sql).await, "{sql:?} through the proxy");
        }
    }
    for sql in &texts {
        for _ in 0..2 {
            assert_eq!(answer(&client, sql).await, answer(&origin, sql).await, "{sql:?} through the proxy");
        }
    }
}
