//! The queue's newest tasks (`recent` index, `keys.rs`), for `GET /v1/tasks`: a bounded walk,
//! newest first, filtered by owner, agent and status, with a cursor to go on from.
//!
//! Owner and agent are read off the index member itself (`<id>~<tenant>~<agent>`), so a tenant's
//! listing reads no other tenant's record; only the members that pass are looked up (one `HMGET`
//! each, pipelined), for their status and the columns a listing shows.

use redis::RedisResult;

use super::Broker;
use crate::task::Status;

/// Index members read per round trip.
const PAGE: usize = 200;
/// Most index members one listing looks through. A filter that matches little (a rare agent, a
/// tenant among many) answers a short or empty page with a cursor rather than walking the whole
/// index in one request.
pub const MAX_SCAN: usize = 2_000;
/// Longest error text a listing carries (the task's record has all of it).
const ERROR_PREVIEW: usize = 300;

/// What a listing keeps.
pub struct RecentFilter<'a> {
    /// `None`: everyone's (the admin); `Some(None)`: the default tenant's; `Some(Some(t))`: `t`'s.
    pub owner: Option<Option<&'a str>>,
    pub agent: Option<&'a str>,
    pub status: Option<Status>,
}

/// One task of a listing.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskSummary {
    pub id: String,
    pub status: Status,
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at: Option<String>,
    pub finished_at: Option<String>,
    /// The first 300 characters of the task's error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A page of a listing: the tasks, and where the next page starts when the walk stopped before
/// the index's end (a full page, or [`MAX_SCAN`] members looked through).
pub struct RecentPage {
    pub tasks: Vec<TaskSummary>,
    pub next_cursor: Option<String>,
}

/// `<id>~<tenant>~<agent>` → its parts (`None` for an empty tenant or agent).
fn split_member(m: &str) -> Option<(&str, Option<&str>, Option<&str>)> {
    fn some(s: &str) -> Option<&str> {
        (!s.is_empty()).then_some(s)
    }
    let (id, rest) = m.split_once('~')?;
    let (tenant, agent) = rest.split_once('~')?;
    // agent ids never hold `~`, so whatever follows the second one is the agent's
    Some((id, some(tenant), some(agent)))
}

impl Broker {
    /// Up to `limit` of `queue`'s newest tasks that pass `filter`, older than the task `cursor`
    /// (exclusive; `None`: from the newest). Records that expired are skipped.
    pub async fn recent_tasks(
        &self,
        queue: &str,
        filter: &RecentFilter<'_>,
        cursor: Option<&str>,
        limit: usize,
    ) -> RedisResult<RecentPage> {
        let keys = self.keys(queue);
        let mut conn = self.redis.conn().await?;
        let mut tasks = Vec::new();
        // `(<id>` sorts below every member of that id (`<id>~...`) and above every older one
        let mut max = cursor.map_or_else(|| "+".to_owned(), |c| format!("({c}"));
        let mut scanned = 0usize;
        loop {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(keys.recent())
                .arg(&max)
                .arg("-")
                .arg("BYLEX")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            let exhausted = members.len() < PAGE;
            let mut wanted = Vec::new();
            let mut last = None;
            for m in &members {
                let Some((id, tenant, agent)) = split_member(m) else {
                    continue;
                };
                scanned += 1;
                last = Some(id);
                if filter.owner.is_some_and(|want| tenant != want) {
                    continue;
                }
                if filter.agent.is_some_and(|want| agent != Some(want)) {
                    continue;
                }
                wanted.push((id, tenant, agent));
            }
            if !wanted.is_empty() {
                let mut pipe = redis::pipe();
                for (id, _, _) in &wanted {
                    pipe.cmd("HMGET")
                        .arg(keys.task_raw(id))
                        .arg("status")
                        .arg("attempts")
                        .arg("max_attempts")
                        .arg("created_at")
                        .arg("finished_at")
                        .arg("error");
                }
                type Row = (
                    Option<String>,
                    Option<u32>,
                    Option<u32>,
                    Option<i64>,
                    Option<i64>,
                    Option<String>,
                );
                let rows: Vec<Row> = pipe.query_async(&mut conn).await?;
                for (
                    (id, tenant, agent),
                    (status, attempts, max_attempts, created, finished, error),
                ) in wanted.into_iter().zip(rows)
                {
                    // expired records stay in the index until trimmed
                    let Some(status) = status.as_deref().and_then(Status::parse) else {
                        continue;
                    };
                    if filter.status.is_some_and(|s| s != status) {
                        continue;
                    }
                    tasks.push(TaskSummary {
                        id: id.to_owned(),
                        status,
                        attempts: attempts.unwrap_or(0),
                        max_attempts: max_attempts.unwrap_or(0),
                        agent_id: agent.map(str::to_owned),
                        tenant: tenant.map(str::to_owned),
                        created_at: created.map(crate::time::format_ms),
                        finished_at: finished.map(crate::time::format_ms),
                        error: error
                            .filter(|e| !e.is_empty())
                            .map(|e| e.chars().take(ERROR_PREVIEW).collect()),
                    });
                    if tasks.len() == limit {
                        return Ok(RecentPage {
                            tasks,
                            next_cursor: Some(id.to_owned()),
                        });
                    }
                }
            }
            let Some(last) = last else {
                return Ok(RecentPage {
                    tasks,
                    next_cursor: None,
                });
            };
            if exhausted {
                return Ok(RecentPage {
                    tasks,
                    next_cursor: None,
                });
            }
            if scanned >= MAX_SCAN {
                return Ok(RecentPage {
                    tasks,
                    next_cursor: Some(last.to_owned()),
                });
            }
            max = format!("({last}");
        }
    }

    /// Tasks created in `queue` since `since_ms` (Unix ms), counted in the `recent` index: a UUID
    /// v7 id starts with its creation time in ms (48 bits, the first 12 hex digits), so the
    /// members from `<queue>.<that time>` up are the newer ones. At most the index's cap.
    pub async fn created_since(&self, queue: &str, since_ms: i64) -> RedisResult<u64> {
        let keys = self.keys(queue);
        let ms = u64::try_from(since_ms.max(0)).unwrap_or(0) & 0xffff_ffff_ffff;
        let min = format!("[{queue}.{:08x}-{:04x}", ms >> 16, ms & 0xffff);
        let mut conn = self.redis.conn().await?;
        redis::cmd("ZLEXCOUNT")
            .arg(keys.recent())
            .arg(min)
            .arg("+")
            .query_async(&mut conn)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::split_member;

    #[test]
    fn members_split_into_id_owner_and_agent() {
        assert_eq!(
            split_member("default.0193-x~~"),
            Some(("default.0193-x", None, None))
        );
        assert_eq!(
            split_member("q.1~acme~support:bot"),
            Some(("q.1", Some("acme"), Some("support:bot")))
        );
        assert_eq!(split_member("q.1~~a"), Some(("q.1", None, Some("a"))));
        assert_eq!(split_member("no-tilde"), None);
    }
}
