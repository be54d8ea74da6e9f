//! `POST /v1/files` and the rest of OpenAI's files endpoints, for the Batch API. An upload is
//! read from the multipart body chunk by chunk and cut into lines; each line is validated as a
//! batch request (JSON, `custom_id`, `method`, `url`, a chat-completions `body` as
//! `POST /v1/chat/completions` takes it) and stored with pipelined `RPUSH`es, so the api never
//! holds more than a chunk and one line (at most 1 MiB) of a file. Any error deletes what was
//! stored (also when the client goes away: a guard does it), and a replica killed mid-upload
//! leaves an entry in `files:gc` the loop collects. Every stored file is charged its bytes plus
//! a fixed overhead in `files:bytes`, bounded by `AGENTQ_FILES_MAX_TOTAL_BYTES`.
//!
//! Files are per tenant: an upload records the caller's tenant (`tenant` on the file's hash,
//! only for a tenant other than the default) and indexes the file in the tenant's own list
//! (`files:tenant:<id>`) beside the global one; a batch's output and error files belong to the
//! batch's tenant. A tenant's token sees, reads and deletes only its tenant's files, lists them
//! from its own index, and another tenant's file id answers 404 exactly as a missing one; the
//! admin sees every file.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use agentq_common::batch::{tenant_files_index, FileDelete};
use agentq_common::keys;
use agentq_common::tenant::non_default;
use agentq_common::time::now_ms;
use axum::body::Body;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{dl, page_of, query, ListQuery};
use crate::auth::Caller;
use crate::openai::chat::{self, Routing};
use crate::openai::OaiError;
use crate::AppState;

/// The longest line of a batch file (OpenAI's own limit for one request is far below).
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// What a file's record costs beside its lines: charged once per file, so even empty or tiny
/// files cannot grow Redis without bound under the total cap.
pub const FILE_OVERHEAD: u64 = 512;
/// An upload with no progress this long is taken for abandoned (its replica died) and deleted.
const UPLOAD_STALE: Duration = Duration::from_secs(600);
/// The longest wait for the next piece of an upload's body: an upload that stops sending fails
/// well before it would count as abandoned.
const CHUNK_IDLE: Duration = Duration::from_secs(60);
/// Lines and bytes per pipelined write.
const FLUSH_LINES: usize = 500;
const FLUSH_BYTES: usize = 1024 * 1024;
/// Lines per page of `GET /v1/files/{id}/content`.
const CONTENT_PAGE: isize = 500;
/// Longest `custom_id` accepted.
const MAX_CUSTOM_ID: usize = 512;
/// The purposes a file can have: `batch` (uploaded) and `batch_output` (written by a batch).
pub const PURPOSE_BATCH: &str = "batch";
pub const PURPOSE_OUTPUT: &str = "batch_output";

/// A new file id: `file-` and a time-ordered UUID (v7) in hex.
pub fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::now_v7().simple())
}

/// A file id as the api makes them (anything else is not found without asking Redis).
pub fn valid_file_id(id: &str) -> bool {
    id.strip_prefix("file-")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// OpenAI's file object from a stored file's hash.
fn file_object(id: &str, h: &HashMap<String, String>) -> Value {
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    json!({
        "id": id,
        "object": "file",
        "bytes": num("bytes"),
        "created_at": num("created_at"),
        "expires_at": num("expires_at"),
        "filename": h.get("filename").cloned().unwrap_or_default(),
        "purpose": h.get("purpose").cloned().unwrap_or_default(),
        "status": "processed",
        "status_details": null,
    })
}

fn not_found(id: &str) -> OaiError {
    let shown: String = id.chars().take(64).collect();
    OaiError::new(
        StatusCode::NOT_FOUND,
        format!("No such File object: {shown}"),
    )
    .param("id")
    .code("file_not_found")
}

/// A line's error: 400 (413 for sizes) with the line number first and the field in `param`.
fn line_error(line: u64, param: Option<&str>, message: impl std::fmt::Display) -> OaiError {
    let e = OaiError::new(StatusCode::BAD_REQUEST, format!("line {line}: {message}"))
        .code("invalid_batch_line");
    match param {
        Some(p) => e.param(p),
        None => e,
    }
}

fn too_large(message: String) -> OaiError {
    OaiError::new(StatusCode::PAYLOAD_TOO_LARGE, message)
        .param("file")
        .code("file_too_large")
}

/// The tenant a file's hash names (`None`: the default tenant).
fn owner(h: &HashMap<String, String>) -> Option<&str> {
    non_default(h.get("tenant").map(String::as_str))
}

/// Deletes a file's keys whatever holds it and gives its bytes back: an upload that failed or
/// was abandoned, a batch's output file being rewritten. `tenant` is the file's.
pub(crate) async fn discard(
    state: &AppState,
    id: &str,
    tenant: Option<&str>,
) -> Result<(), redis::RedisError> {
    let deleted = state.broker.file_delete(id, true).await?;
    unindex(state, id, tenant, deleted).await
}

/// Takes a deleted file out of the indexes (its tenant's too) and its bytes off the total.
async fn unindex(
    state: &AppState,
    id: &str,
    tenant: Option<&str>,
    deleted: FileDelete,
) -> Result<(), redis::RedisError> {
    let p = state.broker.prefix();
    // The charge first, while the file's gc entry still stands: an api killed between the two
    // leaves the entry, and the loop's next look finds the file gone and releases again (a no-op
    // once done, see file_charge.lua).
    let reported = match deleted {
        FileDelete::Deleted(n) => n,
        _ => 0,
    };
    state.broker.file_release(id, reported).await?;
    let mut pipe = redis::pipe();
    pipe.zrem(keys::files_index(p), id)
        .ignore()
        .zrem(keys::files_gc(p), id)
        .ignore();
    if let Some(t) = non_default(tenant) {
        pipe.zrem(tenant_files_index(p, t), id).ignore();
    }
    let mut conn = state.broker.redis().conn().await?;
    pipe.query_async::<()>(&mut conn).await
}

/// Starts a file of `tenant` (`None`: the default tenant): its hash (status `uploading`, and
/// `tenant` for another tenant), its overhead charged, and an entry in `files:gc` so a replica
/// dying now leaves nothing the loop does not find. Returns the total of every file's bytes
/// after the charge.
pub(crate) async fn begin_file(
    state: &AppState,
    id: &str,
    purpose: &str,
    tenant: Option<&str>,
) -> Result<u64, redis::RedisError> {
    let p = state.broker.prefix();
    let now = now_ms();
    let mut hset = redis::cmd("HSET");
    hset.arg(keys::file_meta(p, id))
        .arg("status")
        .arg("uploading")
        .arg("purpose")
        .arg(purpose)
        .arg("created_at")
        .arg(now / 1000)
        .arg("charged")
        .arg(FILE_OVERHEAD);
    if let Some(t) = non_default(tenant) {
        hset.arg("tenant").arg(t);
    }
    let mut conn = state.broker.redis().conn().await?;
    // The file and its gc entry before the charge: a crash between leaves an upload the loop
    // collects, never a charge for a file nobody will delete.
    redis::pipe()
        .add_command(hset)
        .ignore()
        .zadd(keys::files_gc(p), id, now + UPLOAD_STALE.as_millis() as i64)
        .ignore()
        .query_async::<()>(&mut conn)
        .await?;
    state.broker.file_charge(id, FILE_OVERHEAD).await
}

/// Appends lines to a file being written, charging their bytes (each line and its newline).
/// Returns the total of every file's bytes after the charge.
pub(crate) async fn append_lines(
    state: &AppState,
    id: &str,
    lines: &[String],
) -> Result<u64, redis::RedisError> {
    if lines.is_empty() {
        return Ok(0);
    }
    let p = state.broker.prefix();
    let bytes: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
    let mut conn = state.broker.redis().conn().await?;
    // Lines first, then the charge (file_charge.lua): a crash between leaves an unfinished
    // upload, which is discarded whole with whatever it was charged.
    redis::pipe()
        .rpush(keys::file_lines(p, id), lines)
        .ignore()
        .cmd("HINCRBY")
        .arg(keys::file_meta(p, id))
        .arg("charged")
        .arg(bytes)
        .ignore()
        .zadd(
            keys::files_gc(p),
            id,
            now_ms() + UPLOAD_STALE.as_millis() as i64,
        )
        .ignore()
        .query_async::<()>(&mut conn)
        .await?;
    state.broker.file_charge(id, bytes).await
}

/// Makes a written file a stored one: its object's fields, then the indexes (listing, its
/// tenant's listing, expiry). False when the upload was collected as abandoned meanwhile.
pub(crate) async fn commit_file(
    state: &AppState,
    id: &str,
    filename: &str,
    bytes: u64,
    lines: u64,
    tenant: Option<&str>,
) -> Result<bool, redis::RedisError> {
    let now = now_ms();
    let ttl = state.config.batch.file_ttl;
    let expires = now + ttl.as_millis() as i64;
    let committed = state
        .broker
        .file_commit(
            id,
            &[
                ("status", "processed".to_owned()),
                ("filename", filename.to_owned()),
                ("bytes", bytes.to_string()),
                ("lines", lines.to_string()),
                ("expires_at", (expires / 1000).to_string()),
            ],
        )
        .await?;
    if !committed {
        return Ok(false);
    }
    let p = state.broker.prefix();
    let mut pipe = redis::pipe();
    pipe.zadd(keys::files_index(p), id, now)
        .ignore()
        .zadd(keys::files_gc(p), id, expires)
        .ignore();
    if let Some(t) = non_default(tenant) {
        pipe.zadd(tenant_files_index(p, t), id, now).ignore();
    }
    let mut conn = state.broker.redis().conn().await?;
    pipe.query_async::<()>(&mut conn).await?;
    Ok(true)
}

/// Deletes an upload that did not finish (an error, or the client went away: the handler's
/// future is dropped), in a task of its own since a drop cannot wait.
struct UploadGuard {
    state: AppState,
    id: String,
    tenant: Option<String>,
    armed: bool,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let state = self.state.clone();
        let id = std::mem::take(&mut self.id);
        let tenant = self.tenant.take();
        tokio::spawn(async move {
            if let Err(e) = discard(&state, &id, tenant.as_deref()).await {
                // the loop collects it when its gc entry is due
                tracing::warn!(error = %e, file.id = %id, "could not delete a failed upload");
            }
        });
    }
}

/// `POST /v1/files`: the file is the caller's tenant's.
///
/// An upload is refused as soon as a line is bad, with the rest of the body unread: the server
/// then closes the connection after the answer, and a client that put it back in its pool sent
/// its next request into a closed socket (the openai SDK's `APIConnectionError`, seen in CI). So
/// every refusal says `Connection: close`, as a server answering early must.
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    mp: Result<Multipart, MultipartRejection>,
) -> Response {
    match upload_file(state, caller, mp).await {
        Ok(r) => r,
        Err(e) => {
            let mut r = e.into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

async fn upload_file(
    state: AppState,
    caller: Caller,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Response, OaiError> {
    let tenant = non_default(caller.tenant());
    let mut mp = mp.map_err(|e| {
        OaiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be multipart/form-data: {}", e.body_text()),
        )
        .code("invalid_multipart")
    })?;
    let mut purpose: Option<String> = None;
    let mut stored: Option<(UploadGuard, String, u64, u64)> = None;
    loop {
        let field = match tokio::time::timeout(CHUNK_IDLE, mp.next_field()).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(multipart_error(&state, e.status(), &e.body_text())),
            Err(_) => return Err(stalled()),
        };
        match field.name() {
            Some("purpose") => {
                let p = small_field(field, "purpose").await?;
                if p != PURPOSE_BATCH {
                    return Err(OaiError::invalid(
                        "purpose",
                        format!("purpose must be {PURPOSE_BATCH:?} (the only purpose this deployment takes)"),
                    ));
                }
                purpose = Some(p);
            }
            Some("file") => {
                if stored.is_some() {
                    return Err(OaiError::invalid("file", "only one file per upload"));
                }
                stored = Some(store(&state, tenant, field).await?);
            }
            other => {
                let shown: String = other.unwrap_or("").chars().take(64).collect();
                return Err(OaiError::invalid(
                    shown.clone(),
                    format!("Unrecognized request argument supplied: {shown}"),
                )
                .code("unknown_parameter"));
            }
        }
    }
    if purpose.is_none() {
        return Err(OaiError::invalid(
            "purpose",
            "Missing required parameter: 'purpose'",
        ));
    }
    let Some((mut guard, filename, bytes, lines)) = stored else {
        return Err(OaiError::invalid(
            "file",
            "Missing required parameter: 'file'",
        ));
    };
    let id = guard.id.clone();
    if !dl(commit_file(&state, &id, &filename, bytes, lines, tenant)).await? {
        return Err(OaiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the upload took too long and was dropped; upload the file again",
        )
        .should_retry(true));
    }
    guard.armed = false;
    let h: HashMap<String, String> = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(redis::AsyncCommands::hgetall(
            &mut conn,
            keys::file_meta(state.broker.prefix(), &id),
        ))
        .await?
    };
    Ok(Json(file_object(&id, &h)).into_response())
}

fn stalled() -> OaiError {
    OaiError::new(
        StatusCode::BAD_REQUEST,
        format!(
            "the upload stalled: nothing came for {} s",
            CHUNK_IDLE.as_secs()
        ),
    )
    .code("upload_stalled")
}

fn multipart_error(state: &AppState, status: StatusCode, text: &str) -> OaiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(format!(
            "the file must be at most {} bytes (AGENTQ_FILE_MAX_BYTES)",
            state.config.batch.file_max_bytes
        ))
    } else {
        OaiError::new(
            StatusCode::BAD_REQUEST,
            format!("the multipart body is malformed: {text}"),
        )
        .code("invalid_multipart")
    }
}

/// A text field, at most 64 bytes.
async fn small_field(mut field: Field<'_>, name: &str) -> Result<String, OaiError> {
    let mut buf = Vec::new();
    while let Some(c) = tokio::time::timeout(CHUNK_IDLE, field.chunk())
        .await
        .map_err(|_| stalled())?
        .map_err(|e| OaiError::invalid(name, e.body_text()))?
    {
        buf.extend_from_slice(&c);
        if buf.len() > 64 {
            return Err(OaiError::invalid(name, format!("{name} is too long")));
        }
    }
    String::from_utf8(buf).map_err(|_| OaiError::invalid(name, format!("{name} must be UTF-8")))
}

/// A 128-bit digest of a custom_id: the duplicate check keeps these, not the ids (a 50,000-line
/// file's ids could take 25 MB; their digests take under 2 MB). Two keyed SipHashes; a false
/// duplicate needs a 128-bit collision.
fn digest(s: &str) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    (0u8, s).hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (1u8, s).hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

/// The file part: read, cut into lines, each validated and stored. Returns the guard that
/// deletes it unless committed, the filename, the bytes received and the lines stored.
async fn store(
    state: &AppState,
    tenant: Option<&str>,
    mut field: Field<'_>,
) -> Result<(UploadGuard, String, u64, u64), OaiError> {
    let cfg = &state.config.batch;
    let filename: String = field
        .file_name()
        .filter(|f| !f.is_empty())
        .unwrap_or("upload.jsonl")
        .chars()
        .take(255)
        .collect();
    let id = new_file_id();
    let guard = UploadGuard {
        state: state.clone(),
        id: id.clone(),
        tenant: tenant.map(str::to_owned),
        armed: true,
    };
    let total = dl(begin_file(state, &id, PURPOSE_BATCH, tenant)).await?;
    let over_total = || {
        too_large(format!(
            "the files stored here would take more than {} bytes together (AGENTQ_FILES_MAX_TOTAL_BYTES); delete files or wait for them to expire",
            cfg.files_max_total_bytes
        ))
    };
    if total > cfg.files_max_total_bytes {
        return Err(over_total());
    }
    let mut lines = Lines {
        state,
        seen: HashMap::new(),
        line_no: 0,
        requests: 0,
        chunk: Vec::new(),
        chunk_bytes: 0,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut received: u64 = 0;
    loop {
        let next = tokio::time::timeout(CHUNK_IDLE, field.chunk())
            .await
            .map_err(|_| stalled())?
            .map_err(|e| multipart_error(state, e.status(), &e.body_text()))?;
        let Some(bytes) = next else { break };
        received += bytes.len() as u64;
        if received > cfg.file_max_bytes {
            return Err(too_large(format!(
                "the file must be at most {} bytes (AGENTQ_FILE_MAX_BYTES)",
                cfg.file_max_bytes
            )));
        }
        buf.extend_from_slice(&bytes);
        // cut every whole line out of the buffer, then drop them at once (one move per chunk)
        let mut start = 0;
        while let Some(rel) = buf[start..].iter().position(|b| *b == b'\n') {
            lines.push(&buf[start..start + rel])?;
            start += rel + 1;
        }
        buf.drain(..start);
        if buf.len() > MAX_LINE_BYTES {
            return Err(line_too_long(lines.line_no + 1));
        }
        if lines.chunk.len() >= FLUSH_LINES || lines.chunk_bytes >= FLUSH_BYTES {
            lines.flush(&id, over_total).await?;
        }
    }
    if !buf.is_empty() {
        lines.push(&buf)?;
    }
    lines.flush(&id, over_total).await?;
    if lines.requests == 0 {
        return Err(OaiError::invalid(
            "file",
            "the file holds no requests (one JSON object per line)",
        ));
    }
    Ok((guard, filename, received, lines.requests))
}

fn line_too_long(line: u64) -> OaiError {
    OaiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("line {line}: a line must be at most {MAX_LINE_BYTES} bytes"),
    )
    .param("file")
    .code("line_too_large")
}

/// The lines of one upload as they come.
struct Lines<'a> {
    state: &'a AppState,
    /// custom_id digests → the line that had it first
    seen: HashMap<u128, u64>,
    line_no: u64,
    requests: u64,
    chunk: Vec<String>,
    chunk_bytes: usize,
}

impl Lines<'_> {
    fn push(&mut self, raw: &[u8]) -> Result<(), OaiError> {
        self.line_no += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > MAX_LINE_BYTES {
            return Err(line_too_long(self.line_no));
        }
        // blank lines (a trailing newline, an empty line between requests) are not requests
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let max = self.state.config.batch.max_requests;
        if self.requests >= max as u64 {
            return Err(too_large(format!(
                "line {}: a batch file holds at most {max} requests (AGENTQ_BATCH_MAX_REQUESTS)",
                self.line_no
            )));
        }
        let text = std::str::from_utf8(raw)
            .map_err(|_| line_error(self.line_no, None, "the line is not UTF-8"))?;
        let (custom_id, _) = check_line(self.state, self.line_no, text)?;
        if let Some(first) = self.seen.insert(digest(&custom_id), self.line_no) {
            let shown: String = custom_id.chars().take(64).collect();
            return Err(line_error(
                self.line_no,
                Some("custom_id"),
                format!("duplicate custom_id {shown:?} (first on line {first}); custom_id must be unique within the file"),
            ));
        }
        self.requests += 1;
        self.chunk_bytes += text.len();
        self.chunk.push(text.to_owned());
        Ok(())
    }

    async fn flush(&mut self, id: &str, over_total: impl Fn() -> OaiError) -> Result<(), OaiError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let total = dl(append_lines(self.state, id, &self.chunk)).await?;
        self.chunk.clear();
        self.chunk_bytes = 0;
        if total > self.state.config.batch.files_max_total_bytes {
            return Err(over_total());
        }
        Ok(())
    }
}

/// One batch line checked: `{custom_id, method: "POST", url: "/v1/chat/completions", body}`
/// with a body `chat::parse` accepts, not streamed, with no agent (a batch's requests are
/// independent). Returns its custom_id and its task (queue not set yet).
pub(crate) fn check_line(
    state: &AppState,
    line: u64,
    text: &str,
) -> Result<(String, agentq_common::task::NewTask), OaiError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| line_error(line, None, format!("invalid JSON: {e}")))?;
    let Value::Object(mut obj) = v else {
        return Err(line_error(line, None, "a line must be a JSON object"));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "custom_id" | "method" | "url" | "body"))
    {
        let shown: String = k.chars().take(64).collect();
        return Err(line_error(
            line,
            Some(&shown),
            format!("unknown key {shown:?} (a line has custom_id, method, url and body)"),
        ));
    }
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_CUSTOM_ID => s.clone(),
        Some(Value::String(_)) => {
            return Err(line_error(
                line,
                Some("custom_id"),
                format!("custom_id must be 1 to {MAX_CUSTOM_ID} characters"),
            ))
        }
        Some(_) => {
            return Err(line_error(
                line,
                Some("custom_id"),
                "custom_id must be a string",
            ))
        }
        None => return Err(line_error(line, Some("custom_id"), "missing custom_id")),
    };
    match obj.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        None => return Err(line_error(line, Some("method"), "missing method")),
        Some(_) => return Err(line_error(line, Some("method"), "method must be \"POST\"")),
    }
    match obj.get("url") {
        Some(Value::String(u)) if u == "/v1/chat/completions" => {}
        None => return Err(line_error(line, Some("url"), "missing url")),
        Some(_) => {
            return Err(line_error(
                line,
                Some("url"),
                "url must be \"/v1/chat/completions\" (the only endpoint batches serve here)",
            ))
        }
    }
    let body = match obj.remove("body") {
        Some(b @ Value::Object(_)) => b,
        None => return Err(line_error(line, Some("body"), "missing body")),
        Some(_) => return Err(line_error(line, Some("body"), "body must be a JSON object")),
    };
    let req = chat::parse(state, body, &Routing::default()).map_err(|e| {
        let param = e.param.as_deref().map(|p| format!("body.{p}"));
        let mut out = line_error(line, param.as_deref(), &e.message);
        out.code = e.code.or(out.code);
        out
    })?;
    if req.stream {
        return Err(line_error(
            line,
            Some("body.stream"),
            "batch requests cannot stream (stream must be false or absent)",
        ));
    }
    if req.task.payload.agent_id.is_some() {
        return Err(line_error(
            line,
            Some("body.metadata.agent_id"),
            "batch requests run independently and cannot name an agent",
        ));
    }
    Ok((custom_id, req.task))
}

/// The stored file's hash, or 404: an upload in progress is not a file yet, and another
/// tenant's file answers exactly as a missing one.
async fn stored_meta(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<HashMap<String, String>, OaiError> {
    if !valid_file_id(id) {
        return Err(not_found(id));
    }
    let mut conn = dl(state.broker.redis().conn()).await?;
    let h: HashMap<String, String> = dl(redis::AsyncCommands::hgetall(
        &mut conn,
        keys::file_meta(state.broker.prefix(), id),
    ))
    .await?;
    if h.get("status").map(String::as_str) != Some("processed") || !caller.sees(owner(&h)) {
        return Err(not_found(id));
    }
    Ok(h)
}

/// `GET /v1/files/{id}`
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, OaiError> {
    let h = stored_meta(&state, &caller, &id).await?;
    Ok(Json(file_object(&id, &h)).into_response())
}

/// `GET /v1/files`: newest first by default; `purpose` filters. A tenant's token pages its
/// tenant's own index (`files:tenant:<id>`), so its pages are full while more of its files
/// follow and cost what its own files do (plus those a `purpose` filter passes over), whatever
/// other tenants store; the admin pages the index of every file.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, OaiError> {
    let q = query(q)?;
    let limit = q.limit(100)?;
    let newest_first = q.newest_first()?;
    if let Some(p) = q.purpose.as_deref() {
        if p != PURPOSE_BATCH && p != PURPOSE_OUTPUT {
            return Err(OaiError::invalid(
                "purpose",
                "purpose must be batch or batch_output",
            ));
        }
    }
    let p = state.broker.prefix();
    let tenant_index = non_default(caller.tenant()).map(|t| tenant_files_index(p, t));
    let index = tenant_index.clone().unwrap_or_else(|| keys::files_index(p));
    let mut after = q.after.clone();
    let mut data: Vec<Value> = Vec::new();
    let mut more = false;
    // a purpose filter walks pages of the index until the page is full or the index ends
    loop {
        let (ids, rest) = page_of(&state, &index, after.as_deref(), limit, newest_first).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(keys::file_meta(state.broker.prefix(), id));
        }
        let metas: Vec<HashMap<String, String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let mut conn = dl(state.broker.redis().conn()).await?;
            dl(pipe.query_async(&mut conn)).await?
        };
        let mut taken_all = true;
        let mut gone: Vec<&String> = Vec::new();
        for (id, h) in ids.iter().zip(metas) {
            if h.is_empty() {
                gone.push(id);
                continue;
            }
            if h.get("status").map(String::as_str) != Some("processed") || !caller.sees(owner(&h)) {
                continue;
            }
            if q.purpose
                .as_deref()
                .is_some_and(|p| h.get("purpose").map(String::as_str) != Some(p))
            {
                continue;
            }
            if data.len() == limit {
                taken_all = false;
                break;
            }
            data.push(file_object(id, &h));
        }
        // a tenant's entry whose file is gone (a replica died between deleting it and taking
        // it off the indexes) is dropped here; a file being rewritten is indexed again when
        // committed, so this never loses a stored one
        if let (Some(ti), false) = (&tenant_index, gone.is_empty()) {
            let mut conn = dl(state.broker.redis().conn()).await?;
            let _: i64 = dl(redis::AsyncCommands::zrem(&mut conn, ti, &gone)).await?;
        }
        after = ids.last().cloned();
        if !taken_all || (data.len() == limit && rest) {
            more = true;
            break;
        }
        if !rest || ids.is_empty() {
            break;
        }
    }
    Ok(super::list_page(data, more))
}

/// `GET /v1/files/{id}/content`: the lines, streamed page by page (`LRANGE`), each with its
/// newline; never the whole file in memory. A file deleted while it streams ends early.
pub async fn content(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, OaiError> {
    stored_meta(&state, &caller, &id).await?;
    let key = keys::file_lines(state.broker.prefix(), &id);
    let redis = state.broker.redis().clone();
    let pages = futures::stream::try_unfold(0isize, move |at| {
        let key = key.clone();
        let redis = redis.clone();
        async move {
            let mut conn = redis.conn().await?;
            let lines: Vec<String> =
                redis::AsyncCommands::lrange(&mut conn, &key, at, at + CONTENT_PAGE - 1).await?;
            if lines.is_empty() {
                return Ok::<_, redis::RedisError>(None);
            }
            let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
            for l in &lines {
                out.push_str(l);
                out.push('\n');
            }
            Ok(Some((bytes::Bytes::from(out), at + lines.len() as isize)))
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(pages),
    )
        .into_response())
}

/// `DELETE /v1/files/{id}`: refused (409) while a batch not ended reads it.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, OaiError> {
    let h = stored_meta(&state, &caller, &id).await?;
    dl(drop_ended_users(&state, &id)).await?;
    let deleted = dl(state.broker.file_delete(&id, false)).await?;
    match deleted {
        FileDelete::Missing => Err(not_found(&id)),
        FileDelete::InUse => Err(OaiError::new(
            StatusCode::CONFLICT,
            "the file is the input of a batch that has not ended; cancel the batch or wait for it",
        )
        .param("id")
        .code("file_in_use")),
        FileDelete::Deleted(_) => {
            dl(unindex(&state, &id, owner(&h), deleted)).await?;
            Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
        }
    }
}

/// Removes from a file's users the batches that ended (or are gone), so only live ones keep it.
async fn drop_ended_users(state: &AppState, id: &str) -> Result<(), redis::RedisError> {
    let p = state.broker.prefix();
    let users_key = keys::file_users(p, id);
    let mut conn = state.broker.redis().conn().await?;
    let users: Vec<String> = redis::AsyncCommands::smembers(&mut conn, &users_key).await?;
    for b in users {
        let live = match super::batches::parse_id(&b) {
            Some(queue) => {
                let status: Option<String> = redis::AsyncCommands::hget(
                    &mut conn,
                    state.broker.keys(&queue).batch(&b),
                    "status",
                )
                .await?;
                status.is_some_and(|s| !super::batches::ended(&s))
            }
            None => false,
        };
        if !live {
            let _: i64 = redis::AsyncCommands::srem(&mut conn, &users_key, &b).await?;
        }
    }
    Ok(())
}

/// The loop's collection: files past their `expires_at` (unless a live batch reads one: it is
/// looked at again in an hour) and uploads nobody finished.
pub(crate) async fn gc(state: &AppState) -> Result<(), OaiError> {
    let p = state.broker.prefix();
    let now = now_ms();
    let due: Vec<String> = {
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(redis::cmd("ZRANGEBYSCORE")
            .arg(keys::files_gc(p))
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(200)
            .query_async(&mut conn))
        .await?
    };
    // each file's tenant, read before its hash goes, to take it off its tenant's index too
    let owners: Vec<Option<String>> = if due.is_empty() {
        Vec::new()
    } else {
        let mut pipe = redis::pipe();
        for id in &due {
            pipe.hget(keys::file_meta(p, id), "tenant");
        }
        let mut conn = dl(state.broker.redis().conn()).await?;
        dl(pipe.query_async(&mut conn)).await?
    };
    for (id, tenant) in due.iter().zip(owners) {
        dl(drop_ended_users(state, id)).await?;
        match dl(state.broker.file_delete(id, false)).await? {
            FileDelete::InUse => {
                let mut conn = dl(state.broker.redis().conn()).await?;
                let _: i64 = dl(redis::AsyncCommands::zadd(
                    &mut conn,
                    keys::files_gc(p),
                    id,
                    now + 3_600_000,
                ))
                .await?;
            }
            deleted => {
                tracing::info!(file.id = %id, "file expired or abandoned: deleted");
                dl(unindex(state, id, tenant.as_deref(), deleted)).await?;
            }
        }
    }
    let mut conn = dl(state.broker.redis().conn()).await?;
    let bytes: Option<i64> = dl(redis::AsyncCommands::get(&mut conn, keys::files_bytes(p))).await?;
    state.metrics.files_bytes.set(bytes.unwrap_or(0));
    Ok(())
}
