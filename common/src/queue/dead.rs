//! Dead letters seen by one tenant: its newest dead tasks, and a redrive of exactly the ids it
//! names (`redrive.lua` in its explicit-ids mode), so a tenant never lists or revives another's.

use redis::RedisResult;

use super::{Broker, DeadTask};

/// Dead-set entries read per round trip while looking for one tenant's.
const PAGE: isize = 500;
/// Most dead-set entries one listing looks through: a tenant's list shows its newest dead tasks
/// among the queue's newest this many, so one request's work stays bounded however large the
/// dead set grows.
pub const MAX_SCAN: isize = 20_000;

impl Broker {
    /// Up to `limit` of `tenant`'s dead tasks in `queue`, newest first (`None`: the default
    /// tenant's).
    pub async fn dead_of(
        &self,
        queue: &str,
        tenant: Option<&str>,
        limit: usize,
    ) -> RedisResult<Vec<DeadTask>> {
        self.dead_scan(queue, Some(crate::tenant::non_default(tenant)), limit)
            .await
    }

    /// Up to `limit` dead tasks of `queue`, newest first, whoever owns them.
    pub async fn dead(&self, queue: &str, limit: usize) -> RedisResult<Vec<DeadTask>> {
        self.dead_scan(queue, None, limit).await
    }

    /// The newest dead tasks owned by `only` (`Some(None)`: the default tenant's), or by anyone
    /// (`None`).
    async fn dead_scan(
        &self,
        queue: &str,
        only: Option<Option<&str>>,
        limit: usize,
    ) -> RedisResult<Vec<DeadTask>> {
        let keys = self.keys(queue);
        let mut conn = self.redis.conn().await?;
        let mut out = Vec::new();
        let mut start = 0isize;
        while out.len() < limit && start < MAX_SCAN {
            let entries: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(keys.dead())
                .arg(start)
                .arg(start + PAGE - 1)
                .arg("REV")
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await?;
            if entries.is_empty() {
                break;
            }
            start += PAGE;
            let mut pipe = redis::pipe();
            for (id, _) in &entries {
                pipe.cmd("HMGET")
                    .arg(format!("{}{id}", keys.task_prefix()))
                    .arg("error")
                    .arg("attempts")
                    .arg("tenant");
            }
            let fields: Vec<(Option<String>, Option<u32>, Option<String>)> =
                pipe.query_async(&mut conn).await?;
            for ((id, score), (error, attempts, owner)) in entries.into_iter().zip(fields) {
                let owner = owner.filter(|t| !t.is_empty());
                if only.is_some_and(|want| owner.as_deref() != want) {
                    continue;
                }
                out.push(DeadTask {
                    id,
                    died_at: crate::time::format_ms(score as i64),
                    error,
                    attempts: attempts.unwrap_or(0),
                    tenant: owner,
                });
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Redrives exactly `ids` (those still dead in `queue`); returns (redriven, dropped).
    pub async fn redrive_ids(&self, queue: &str, ids: &[String]) -> RedisResult<(u64, u64)> {
        if ids.is_empty() {
            return Ok((0, 0));
        }
        let keys = self.keys(queue);
        let mut conn = self.redis.conn().await?;
        self.redrive_these(&keys, &mut conn, ids).await
    }
}
