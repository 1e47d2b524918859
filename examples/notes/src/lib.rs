//! A JSON API for notes, stored in a SQL database.
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /notes` `{"text": "..."}` | `201` and the note `{"id": 1, "text": "..."}` |
//! | `GET /notes` | `200` and every note, oldest first |
//! | `GET /notes/ID` | `200` and the note, or `404` |
//! | `PUT /notes/ID` `{"text": "..."}` | `200` and the note, or `404` |
//! | `DELETE /notes/ID` | `204`, or `404` |
//!
//! Bad input gets `400` with `{"error": "..."}`. Config:
//! `[[worker.sql]] binding = "DB"`.

use cordon_sdk::sql::{Database, Value};
use serde::{Deserialize, Serialize};
use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

#[derive(Serialize)]
struct Note {
    id: i64,
    text: String,
}

#[derive(Deserialize)]
struct NoteInput {
    text: String,
}

struct Notes;

impl Guest for Notes {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, body) = match route(&request) {
            Ok(reply) => reply,
            Err(Failure(status, message)) => (status, Some(serde_json::json!({ "error": message }).to_string())),
        };
        respond(out, status, body.as_deref());
    }
}

struct Failure(u16, String);

impl From<cordon_sdk::Error> for Failure {
    fn from(e: cordon_sdk::Error) -> Failure {
        Failure(500, e.to_string())
    }
}

type Reply = (u16, Option<String>);

fn route(request: &IncomingRequest) -> Result<Reply, Failure> {
    let target = request.path_with_query().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    let db = Database::open("DB")?;
    db.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL)", &[])?;

    let id = match path.strip_prefix("/notes") {
        Some("") | Some("/") => None,
        Some(rest) => Some(rest.trim_start_matches('/').parse::<i64>().map_err(|_| Failure(404, format!("no such note: {rest}")))?),
        None => return Err(Failure(404, "not found: the API is under /notes".into())),
    };
    match (request.method(), id) {
        (Method::Get, None) => {
            let rows = db.execute("SELECT id, text FROM notes ORDER BY id", &[])?;
            let notes: Vec<Note> =
                rows.iter().map(|r| Note { id: r.integer("id").unwrap_or(0), text: r.text("text").unwrap_or_default().into() }).collect();
            Ok((200, Some(json(&notes))))
        }
        (Method::Post, None) => {
            let input = read_note(request)?;
            let inserted = db.execute("INSERT INTO notes (text) VALUES (?)", &[input.text.clone().into()])?;
            let id = inserted.last_insert_rowid.unwrap_or(0);
            Ok((201, Some(json(&Note { id, text: input.text }))))
        }
        (Method::Get, Some(id)) => find(&db, id).map(|note| (200, Some(json(&note)))),
        (Method::Put, Some(id)) => {
            let input = read_note(request)?;
            let updated = db.execute("UPDATE notes SET text = ? WHERE id = ?", &[input.text.clone().into(), Value::from(id)])?;
            if updated.rows_affected == 0 {
                return Err(Failure(404, format!("no such note: {id}")));
            }
            Ok((200, Some(json(&Note { id, text: input.text }))))
        }
        (Method::Delete, Some(id)) => {
            let deleted = db.execute("DELETE FROM notes WHERE id = ?", &[Value::from(id)])?;
            if deleted.rows_affected == 0 {
                return Err(Failure(404, format!("no such note: {id}")));
            }
            Ok((204, None))
        }
        _ => Err(Failure(405, "method not allowed here".into())),
    }
}

fn find(db: &Database, id: i64) -> Result<Note, Failure> {
    let rows = db.execute("SELECT id, text FROM notes WHERE id = ?", &[Value::from(id)])?;
    let row = rows.iter().next().ok_or_else(|| Failure(404, format!("no such note: {id}")))?;
    Ok(Note { id, text: row.text("text").unwrap_or_default().into() })
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// Reads the body (at most [`MAX_BODY`] bytes) as `{"text": "..."}`.
fn read_note(request: &IncomingRequest) -> Result<NoteInput, Failure> {
    let body = request.consume().map_err(|()| Failure(400, "the request has no body".into()))?;
    let stream = body.stream().map_err(|()| Failure(400, "the request has no body".into()))?;
    let mut bytes = Vec::new();
    while let Ok(chunk) = stream.blocking_read(4096) {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > MAX_BODY {
            return Err(Failure(413, format!("the body is over {MAX_BODY} bytes")));
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| Failure(400, format!("expected {{\"text\": \"...\"}}: {e}")))
}

fn respond(out: ResponseOutparam, status: u16, body: Option<&str>) {
    let headers = Fields::new();
    if body.is_some() {
        headers.append("content-type", b"application/json").expect("a valid header");
    }
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).expect("a valid status");
    let out_body = response.body().expect("the body is taken once");
    ResponseOutparam::set(out, Ok(response));
    let stream = out_body.write().expect("the body stream is taken once");
    for piece in body.unwrap_or_default().as_bytes().chunks(4096) {
        if stream.blocking_write_and_flush(piece).is_err() {
            return;
        }
    }
    drop(stream);
    let _ = OutgoingBody::finish(out_body, None);
}

wasi::http::proxy::export!(Notes);
