//! The Batch API's Redis side (docs/architecture.md, "Batch API"): the scripts that fan a
//! batch's lines out as tasks at most once, stop it (cancel, expiry), cancel its tasks page by
//! page, fence its finalization with a lease, and keep files (`POST /v1/files`) whole.
//! A batch's keys are in its queue's slot (`Keys::batch`); a file's keys in the file's own
//! (`keys::file_meta`); the global indexes are only ever touched with single commands.
//! The request counts themselves move in `queue/events.lua` (`ev_batch`), where every final
//! transition of every task passes once, and back in `queue/redrive.lua`.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, RedisResult, Script};

use crate::keys::{self, Keys};
use crate::queue::Broker;
use crate::script::declared;
use crate::time::now_ms;

struct Scripts {
    fanout: Script,
    stop: Script,
    cancel_page: Script,
    finalize: Script,
    lease: Script,
    file_use: Script,
    file_delete: Script,
    file_commit: Script,
    file_charge: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    // each task goes to its tenant's line (fair.lua, see queue/mod.rs)
    fanout: declared(concat!(
        include_str!("../queue/fair.lua"),
        include_str!("fanout.lua")
    )),
    stop: declared(include_str!("stop.lua")),
    // it makes tasks final, so it passes ev_final like every such script
    cancel_page: declared(concat!(
        include_str!("../queue/events.lua"),
        include_str!("../queue/fair.lua"),
        include_str!("cancel_page.lua")
    )),
    finalize: declared(include_str!("finalize.lua")),
    lease: declared(include_str!("lease.lua")),
    file_use: declared(include_str!("file_use.lua")),
    file_delete: declared(include_str!("file_delete.lua")),
    file_commit: declared(include_str!("file_commit.lua")),
    file_charge: declared(include_str!("file_charge.lua")),
});

/// ZSET of one tenant's stored files (member id, score = created ms), beside
/// [`keys::files_index`] (every file): `GET /v1/files` with a tenant's token pages this one, so
/// a page costs what the tenant's own files do, however many files others hold. Written and
/// pruned with the global index (single commands only); the default tenant has none (only the
/// admin acts for it, and the admin lists everything).
pub fn tenant_files_index(prefix: &str, tenant: &str) -> String {
    format!("{prefix}:files:tenant:{tenant}")
}

/// ZSET of one tenant's batches with a record (member id, score = created ms), beside
/// [`keys::batches_index`]: `GET /v1/batches` with a tenant's token pages this one. Single
/// commands only.
pub fn tenant_batches_index(prefix: &str, tenant: &str) -> String {
    format!("{prefix}:batches:tenant:{tenant}")
}

/// The member of [`keys::batches_gc`] for an ended batch: its id, and for a tenant's batch
/// `<id>~<tenant>` (`~` is in neither alphabet), so the collection also prunes
/// [`tenant_batches_index`] after the record, and its `tenant` field, expired.
pub fn batches_gc_member(batch_id: &str, tenant: Option<&str>) -> String {
    match crate::tenant::non_default(tenant) {
        None => batch_id.to_owned(),
        Some(t) => format!("{batch_id}~{t}"),
    }
}

/// A [`keys::batches_gc`] member back as (batch id, its tenant).
pub fn parse_batches_gc_member(member: &str) -> (&str, Option<&str>) {
    match member.split_once('~') {
        Some((id, t)) if !t.is_empty() => (id, Some(t)),
        _ => (member, None),
    }
}

/// One input line made ready for [`Broker::batch_fanout`].
#[derive(Debug, Clone)]
pub struct FanoutLine {
    pub task_id: String,
    pub custom_id: String,
    pub max_attempts: u32,
    /// The task's payload (JSON); `None` when the line no longer validates (the models served
    /// changed since the upload): its task is written failed with `error`.
    pub payload: Option<String>,
    /// (message, `<status>|<OpenAI error body>`) for a line that no longer validates.
    pub error: Option<(String, String)>,
}

/// What `fanout.lua` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fanout {
    /// The chunk is out; the cursor after it.
    Done(u64),
    /// Another replica moved the cursor first (to this value): nothing written.
    Moved(u64),
    /// The batch stopped fanning out (cancelled, expired, ended): nothing written.
    Stopped,
    Missing,
}

/// `finalize.lua`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finalize {
    /// begin: (output file id, error file id, ending); end: (final status, "", "")
    Ok(String, String, String),
    /// This replica does not hold the lease.
    Lease,
    Missing,
    /// Requests are not all final yet (begin), or begin never ran (end).
    Open,
    Ended(String),
}

/// `file_use.lua`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileUse {
    /// Taken; the file's line count.
    Ok(u64),
    Missing,
    /// The file's purpose is not the one required.
    Purpose(String),
}

/// `file_delete.lua`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDelete {
    /// Deleted; the bytes it was charged (to take off the files' total).
    Deleted(u64),
    Missing,
    InUse,
}

impl Broker {
    /// Writes one chunk of a batch's tasks if the batch's cursor is still `from` (`fanout.lua`).
    pub async fn batch_fanout(
        &self,
        keys: &Keys,
        batch_id: &str,
        from: u64,
        ttl: Duration,
        lines: &[FanoutLine],
    ) -> RedisResult<Fanout> {
        let mut conn = self.redis().conn().await?;
        // the tasks go to the batch's tenant's line: its tenant is read first (set when the
        // batch is created, never changed) to declare that line
        let tenant: Option<String> = redis::cmd("HGET")
            .arg(keys.batch(batch_id))
            .arg("tenant")
            .query_async(&mut conn)
            .await?;
        let now = now_ms();
        let mut inv = SCRIPTS.fanout.prepare_invoke();
        inv.key(keys.batch(batch_id))
            .key(keys.batch_tasks(batch_id))
            .key(keys.pending());
        for l in lines {
            inv.key(keys.task_raw(&l.task_id));
        }
        inv.key(keys.line(tenant.as_deref())).key(keys.ring());
        inv.arg(from)
            .arg(now)
            .arg(now / 1000)
            .arg(ttl.as_secs().max(1));
        for l in lines {
            let (msg, err) = l.error.clone().unwrap_or_default();
            inv.arg(&l.task_id)
                .arg(&l.custom_id)
                .arg(l.max_attempts)
                .arg(l.payload.as_deref().unwrap_or(""))
                .arg(msg)
                .arg(err);
        }
        let (verdict, cursor): (String, u64) = inv.invoke_async(&mut conn).await?;
        Ok(match verdict.as_str() {
            "ok" => Fanout::Done(cursor),
            "moved" => Fanout::Moved(cursor),
            "stopped" => Fanout::Stopped,
            _ => Fanout::Missing,
        })
    }

    /// Stops a batch's fan-out (`stop.lua`): `ending` is `cancelled` or `expired`. Returns `ok`
    /// when stopped now, `stopping` when it already was, else the batch's status or `missing`.
    pub async fn batch_stop(
        &self,
        keys: &Keys,
        batch_id: &str,
        ending: &str,
    ) -> RedisResult<String> {
        let mut conn = self.redis().conn().await?;
        SCRIPTS
            .stop
            .key(keys.batch(batch_id))
            .arg(ending)
            .arg(now_ms() / 1000)
            .invoke_async(&mut conn)
            .await
    }

    /// Cancels the next `page` tasks of a stopped batch (`cancel_page.lua`). Returns (next
    /// index, tasks in the batch's list): done when they are equal.
    pub async fn batch_cancel_page(
        &self,
        keys: &Keys,
        batch_id: &str,
        page: usize,
        ttl: Duration,
        reason: &str,
    ) -> RedisResult<(u64, u64)> {
        let mut conn = self.redis().conn().await?;
        // the page is read first, so its tasks' records and streams are declared
        let at: Option<u64> = redis::cmd("HGET")
            .arg(keys.batch(batch_id))
            .arg("ccur")
            .query_async(&mut conn)
            .await?;
        let at = at.unwrap_or(0);
        let ids: Vec<String> = conn
            .lrange(
                keys.batch_tasks(batch_id),
                at as isize,
                (at as usize + page.max(1) - 1) as isize,
            )
            .await?;
        let mut declared = crate::queue::Declared::default();
        let mut inv = SCRIPTS.cancel_page.prepare_invoke();
        inv.key(keys.batch(batch_id))
            .key(keys.batch_tasks(batch_id))
            .key(keys.delayed())
            .key(keys.active())
            .key(keys.throttled())
            .key(keys.waiting())
            .key(keys.running());
        inv.arg(at)
            .arg(keys.cancels())
            .arg(now_ms())
            .arg(ttl.as_secs().max(1))
            .arg(reason);
        for id in &ids {
            declared
                .key(keys.task_raw(id))
                .key(keys.task_events_raw(id));
            inv.arg(id);
        }
        declared.to(&mut inv);
        inv.invoke_async(&mut conn).await
    }

    /// `finalize.lua` step `begin`: freezes the counts once every request is final.
    pub async fn batch_finalize_begin(
        &self,
        keys: &Keys,
        batch_id: &str,
        token: &str,
        out_file: &str,
        err_file: &str,
    ) -> RedisResult<Finalize> {
        let mut conn = self.redis().conn().await?;
        let v: Vec<String> = SCRIPTS
            .finalize
            .key(keys.batch(batch_id))
            .key(keys.batch_lease(batch_id))
            .key(keys.batch_tasks(batch_id))
            .arg("begin")
            .arg(token)
            .arg(now_ms() / 1000)
            .arg(out_file)
            .arg(err_file)
            .invoke_async(&mut conn)
            .await?;
        Ok(finalize_answer(v))
    }

    /// `finalize.lua` step `end`: the batch ends with its files.
    pub async fn batch_finalize_end(
        &self,
        keys: &Keys,
        batch_id: &str,
        token: &str,
        has_output: bool,
        has_errors: bool,
        ttl: Duration,
    ) -> RedisResult<Finalize> {
        let mut conn = self.redis().conn().await?;
        let flag = |b: bool| if b { "1" } else { "0" };
        let v: Vec<String> = SCRIPTS
            .finalize
            .key(keys.batch(batch_id))
            .key(keys.batch_lease(batch_id))
            .key(keys.batch_tasks(batch_id))
            .arg("end")
            .arg(token)
            .arg(now_ms() / 1000)
            .arg(flag(has_output))
            .arg(flag(has_errors))
            .arg(ttl.as_secs().max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(finalize_answer(v))
    }

    /// Takes, renews or releases (`mode`) a batch's lease for `token` (`lease.lua`).
    pub async fn batch_lease(
        &self,
        keys: &Keys,
        batch_id: &str,
        mode: &str,
        token: &str,
        time: Duration,
    ) -> RedisResult<bool> {
        let mut conn = self.redis().conn().await?;
        let held: i64 = SCRIPTS
            .lease
            .key(keys.batch_lease(batch_id))
            .arg(mode)
            .arg(token)
            .arg(u64::try_from(time.as_millis()).unwrap_or(u64::MAX).max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// A batch takes a stored file of `purpose` as its input (`file_use.lua`).
    pub async fn file_use(
        &self,
        file_id: &str,
        batch_id: &str,
        purpose: &str,
    ) -> RedisResult<FileUse> {
        let p = self.prefix();
        let mut conn = self.redis().conn().await?;
        let v: Vec<String> = SCRIPTS
            .file_use
            .key(keys::file_meta(p, file_id))
            .key(keys::file_users(p, file_id))
            .arg(batch_id)
            .arg(purpose)
            .invoke_async(&mut conn)
            .await?;
        Ok(match v.first().map(String::as_str) {
            Some("ok") => FileUse::Ok(v.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)),
            Some("purpose") => FileUse::Purpose(v.get(1).cloned().unwrap_or_default()),
            _ => FileUse::Missing,
        })
    }

    /// Deletes a file's keys (`file_delete.lua`), unless a batch still reads it and not `force`.
    pub async fn file_delete(&self, file_id: &str, force: bool) -> RedisResult<FileDelete> {
        let p = self.prefix();
        let mut conn = self.redis().conn().await?;
        let v: Vec<String> = SCRIPTS
            .file_delete
            .key(keys::file_meta(p, file_id))
            .key(keys::file_lines(p, file_id))
            .key(keys::file_users(p, file_id))
            .arg(if force { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok(match v.first().map(String::as_str) {
            Some("ok") => FileDelete::Deleted(v.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)),
            Some("in_use") => FileDelete::InUse,
            _ => FileDelete::Missing,
        })
    }

    /// Charges `bytes` to a file and to the files' total (`file_charge.lua`); returns the total.
    pub async fn file_charge(&self, file_id: &str, bytes: u64) -> RedisResult<u64> {
        let total = self.charge_script(file_id, &bytes.to_string(), 0).await?;
        Ok(u64::try_from(total).unwrap_or(0))
    }

    /// Takes a deleted file's charge off the total (`file_charge.lua`, idempotent). `reported` is
    /// what its deletion returned, used only for a file charged before the charges ledger existed.
    pub async fn file_release(&self, file_id: &str, reported: u64) -> RedisResult<()> {
        self.charge_script(file_id, "release", reported).await?;
        Ok(())
    }

    async fn charge_script(&self, file_id: &str, what: &str, reported: u64) -> RedisResult<i64> {
        let p = self.prefix();
        let mut conn = self.redis().conn().await?;
        SCRIPTS
            .file_charge
            .key(keys::files_bytes(p))
            .key(keys::files_charges(p))
            .arg(file_id)
            .arg(what)
            .arg(reported)
            .invoke_async(&mut conn)
            .await
    }

    /// Turns an upload in progress into a stored file (`file_commit.lua`); false when the
    /// upload was taken for abandoned and deleted meanwhile.
    pub async fn file_commit(&self, file_id: &str, fields: &[(&str, String)]) -> RedisResult<bool> {
        let mut conn = self.redis().conn().await?;
        let mut inv = SCRIPTS.file_commit.prepare_invoke();
        inv.key(keys::file_meta(self.prefix(), file_id));
        for (k, v) in fields {
            inv.arg(*k).arg(v);
        }
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(n == 1)
    }
}

fn finalize_answer(v: Vec<String>) -> Finalize {
    let at = |i: usize| v.get(i).cloned().unwrap_or_default();
    match v.first().map(String::as_str) {
        Some("ok") => Finalize::Ok(at(1), at(2), at(3)),
        Some("lease") => Finalize::Lease,
        Some("open") => Finalize::Open,
        Some("ended") => Finalize::Ended(at(1)),
        _ => Finalize::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_members_carry_the_tenant() {
        let id = "batch_default.0190a0b1c2d3e4f5a6b7c8d9e0f1a2b3";
        assert_eq!(batches_gc_member(id, None), id);
        assert_eq!(batches_gc_member(id, Some("default")), id);
        assert_eq!(parse_batches_gc_member(id), (id, None));
        let m = batches_gc_member(id, Some("team-a"));
        assert_eq!(m, format!("{id}~team-a"));
        assert_eq!(parse_batches_gc_member(&m), (id, Some("team-a")));
        assert_eq!(tenant_files_index("agentq", "a"), "agentq:files:tenant:a");
        assert_eq!(
            tenant_batches_index("agentq", "a"),
            "agentq:batches:tenant:a"
        );
    }
}
