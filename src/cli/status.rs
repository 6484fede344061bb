//! `pollhook status`: the running daemon's `/status` as tables
//! (instances, endpoints, hosts, and in a cluster its nodes).

use pollhook::status::StatusReport;

use super::table;

/// Milliseconds since the epoch as "12s ago" / "in 3s" / "now", seen at
/// `now_ms`.
pub fn relative(ms: Option<i64>, now_ms: i64) -> String {
    let Some(ms) = ms else {
        return "-".into();
    };
    let d = ms - now_ms;
    let text = humantime::format_duration(std::time::Duration::from_secs(
        (d.unsigned_abs() / 1000).max(if d.unsigned_abs() >= 1000 { 1 } else { 0 }),
    ))
    .to_string();
    let text = if text == "0s" {
        "now".to_string()
    } else {
        text
    };
    if text == "now" {
        text
    } else if d >= 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

pub fn print_status(s: &StatusReport) {
    let now = pollhook::now_ms();
    table::print(&instances(s, now));
    println!();
    table::print(&endpoints(s));
    if !s.hosts.is_empty() {
        println!();
        table::print(&hosts(s));
    }
    if s.cluster.is_some() {
        println!();
        print_cluster(s, now);
    }
    if let Some(e) = &s.store.error {
        println!();
        println!("STORE UNAVAILABLE: {e}");
    }
}

fn instances(s: &StatusReport, now: i64) -> Vec<Vec<String>> {
    let clustered = s.cluster.is_some();
    let mut rows = vec![[
        "INSTANCE",
        "NODE",
        "LAST POLL",
        "NEXT POLL",
        "OK",
        "304",
        "FAILED",
        "EVENTS",
        "INTERVAL",
        "CURSOR",
        "ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for (k, i) in &s.instances {
        rows.push(vec![
            k.clone(),
            i.node.clone().unwrap_or("-".into()),
            relative(i.last_poll_ms, now),
            relative(i.next_poll_ms, now),
            i.polls_ok.to_string(),
            i.polls_not_modified.to_string(),
            i.polls_failed.to_string(),
            i.events.to_string(),
            i.effective_interval_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or("-".into()),
            i.cursor.clone().unwrap_or("-".into()),
            i.last_error
                .clone()
                .or(i.last_warning.clone())
                .unwrap_or_default(),
        ]);
    }
    if !clustered {
        // One process: no node column.
        for r in &mut rows {
            r.remove(1);
        }
    }
    rows
}

fn endpoints(s: &StatusReport) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "ENDPOINT",
        "QUEUE",
        "DEAD",
        "DELIVERED",
        "FAILED",
        "CIRCUIT",
        "LAST ERROR",
    ]
    .map(String::from)
    .to_vec()];
    for (k, e) in &s.endpoints {
        rows.push(vec![
            k.clone(),
            e.queue_depth.to_string(),
            e.dead_letters.to_string(),
            e.delivered.to_string(),
            e.failed_attempts.to_string(),
            if let Some(d) = &e.disabled {
                format!("disabled: {d}")
            } else if e.circuit_open {
                "open".into()
            } else {
                "closed".into()
            },
            e.last_error.clone().unwrap_or_default(),
        ]);
    }
    rows
}

fn hosts(s: &StatusReport) -> Vec<Vec<String>> {
    let mut rows = vec![["HOST", "REQUESTS", "THROTTLED", "PAUSES", "PAUSED"]
        .map(String::from)
        .to_vec()];
    for (k, h) in &s.hosts {
        rows.push(vec![
            k.clone(),
            h.requests.to_string(),
            h.throttled.to_string(),
            h.pauses.to_string(),
            h.paused_for_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or("-".into()),
        ]);
    }
    rows
}

/// The nodes of a cluster, and what no node holds.
fn print_cluster(s: &StatusReport, now: i64) {
    let Some(c) = &s.cluster else {
        return;
    };
    let mut rows = vec![["NODE", "LEASES", "HEARTBEAT", "STARTED"]
        .map(String::from)
        .to_vec()];
    for n in &c.nodes {
        let name = if n.node == c.node {
            format!("{} (this node)", n.node)
        } else {
            n.node.clone()
        };
        rows.push(vec![
            name,
            n.leases.to_string(),
            relative(Some(now - n.heartbeat_age_ms), now),
            relative(Some(n.started_ms), now),
        ]);
    }
    table::print(&rows);
    if !c.unheld.is_empty() {
        println!("not held by any node now: {}", c.unheld.join(", "));
    }
    if let Some(e) = &c.error {
        println!("cannot read the cluster: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn relative_times_read_naturally() {
        let now = 1_000_000;
        assert_eq!(relative(Some(now + 3_000), now), "in 3s");
        assert_eq!(relative(Some(now - 12_000), now), "12s ago");
        assert_eq!(relative(Some(now + 400), now), "now");
        assert_eq!(relative(Some(now), now), "now");
        assert_eq!(relative(None, now), "-");
    }
}
