//! Prints the Redis keys of one queue as JSON, so deploy checks and scripts use the code's names.
//! Usage: `cargo run -q -p agentq-common --example keys -- [prefix] [queue]`

use agentq_common::keys::{validate_queue, Keys};

fn main() {
    let mut args = std::env::args().skip(1);
    let prefix = args.next().unwrap_or_else(|| "agentq".to_owned());
    let queue = args.next().unwrap_or_else(|| "default".to_owned());
    if let Err(e) = validate_queue(&queue) {
        eprintln!("error: {e}");
        std::process::exit(64);
    }
    let k = Keys::new(&prefix, &queue);
    let json = serde_json::json!({
        "pending": k.pending(),
        "tenant_pending_prefix": k.tenant_pending_prefix(),
        "ring": k.ring(),
        "turns": k.turns(),
        "running": k.running(),
        "tenants": k.tenants(),
        "active": k.active(),
        "delayed": k.delayed(),
        "throttled": k.throttled(),
        "dead": k.dead(),
        "recent": k.recent(),
        "workers": k.workers(),
        "task_prefix": k.task_prefix(),
    });
    println!("{json}");
}
