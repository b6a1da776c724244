//! Where a database lives: a static host, or the current leader of a Patroni cluster, published on a watch channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::failover::{FailoverKey, PendingFailover};
use self::patroni::ClusterView;

use crate::server::Target;

/// The current destination of a database's pools.
#[derive(Clone, Debug)]
pub struct Route {
    /// `None` while there is no confirmed writable leader: checkouts wait instead of failing.
    pub target: Option<Arc<Target>>,
    /// Bumped on every change of target; connections made under an older generation are retired.
    pub generation: u64,
    pub since: Instant,
}

/// A route that never changes.
pub fn fixed(target: Target) -> (watch::Sender<Route>, watch::Receiver<Route>) {
    watch::channel(Route { target: Some(Arc::new(target)), generation: 1, since: Instant::now() })
}

/// Publishes a new target (or none) if it differs from the current one; returns whether it changed.
pub fn publish(tx: &watch::Sender<Route>, target: Option<Target>) -> bool {
    tx.send_if_modified(|r| {
        let same = match (&r.target, &target) {
            (Some(a), Some(b)) => **a == *b,
            (None, None) => true,
            _ => false,
        };
        if same {
            return false;
        }
        r.target = target.map(Arc::new);
        r.generation += 1;
        r.since = Instant::now();
        true
    })
}

pub mod failover;
pub mod patroni;

/// How long a pending switchover may hold new transactions before the router gives up on it and routes to
/// whatever `/cluster` names again. A `patronictl switchover` takes ~1.5–3 s from the key to the new leader.
pub const MAX_SWITCHOVER_HOLD: Duration = Duration::from_secs(10);
/// Leader-info gauges are per member name; a cluster has a handful, this only guards against a confused peer.
const MAX_MEMBER_GAUGES: usize = 32;

/// Where one cluster's databases go, as decided from `/cluster` and the failover key.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    /// No running leader: checkouts wait.
    NoLeader,
    Leader {
        name: String,
        target: Target,
    },
    /// A switchover away from `name` is pending: nothing new starts there while running transactions finish.
    /// `cleared_at` is when the key stopped asking for it (the drain ends `release_delay` later if `name`
    /// is still the running leader then: the switchover was refused or cancelled).
    Draining {
        name: String,
        since: Instant,
        cleared_at: Option<Instant>,
    },
}

/// The routing decision for one cluster; pure, so it can be driven by tests with made-up clocks.
#[derive(Debug)]
struct Follow {
    phase: Phase,
    /// A request the router gave up draining for (MAX_SWITCHOVER_HOLD): not drained for again.
    given_up: Option<PendingFailover>,
    /// Time the key must stay cleared before a drain is called off.
    release_delay: Duration,
}

/// Why the route lost its target, for the log line.
#[derive(Debug, PartialEq)]
enum Change {
    None,
    /// Started draining `from` for a pending switchover to `to`.
    Drain {
        from: String,
        to: Option<String>,
    },
    DrainEnded {
        reason: &'static str,
    },
}

impl Follow {
    fn new(release_delay: Duration) -> Follow {
        Follow { phase: Phase::NoLeader, given_up: None, release_delay }
    }

    fn settle(leader: Option<(String, Target)>) -> Phase {
        match leader {
            Some((name, target)) => Phase::Leader { name, target },
            None => Phase::NoLeader,
        }
    }

    /// Folds the current inputs in; returns the target to route to and what happened.
    fn step(&mut self, view: &ClusterView, key: &FailoverKey, now: Instant) -> (Option<Target>, Change) {
        let leader = view.leader.as_ref().map(|m| (m.name.clone(), Target { host: m.host.clone(), port: m.port }));
        let pending = match key {
            FailoverKey::Pending(p) => Some(p),
            _ => None,
        };
        if self.given_up.as_ref() != pending {
            self.given_up = None;
        }
        let away_from = |name: &str| pending.is_some_and(|p| p.moves_away_from(name));
        let mut change = Change::None;
        self.phase = match std::mem::replace(&mut self.phase, Phase::NoLeader) {
            Phase::Draining { name, since, cleared_at } => {
                let moved = leader.as_ref().is_some_and(|(n, _)| *n != name);
                let cleared_at = if away_from(&name) { None } else { cleared_at.or(Some(now)) };
                let cancelled = cleared_at.is_some_and(|c| now.saturating_duration_since(c) >= self.release_delay);
                let expired = now.saturating_duration_since(since) >= MAX_SWITCHOVER_HOLD;
                if moved || cancelled || expired {
                    let reason = if moved {
                        "new leader"
                    } else if cancelled {
                        "failover key cleared"
                    } else {
                        self.given_up = pending.cloned();
                        "held too long"
                    };
                    change = Change::DrainEnded { reason };
                    Self::settle(leader)
                } else {
                    Phase::Draining { name, since, cleared_at }
                }
            }
            _ => Self::settle(leader),
        };
        if let Phase::Leader { name, .. } = &self.phase {
            if away_from(name) && self.given_up.is_none() {
                let to = pending.and_then(|p| p.candidate.clone());
                change = Change::Drain { from: name.clone(), to };
                self.phase = Phase::Draining { name: name.clone(), since: now, cleared_at: None };
            }
        }
        let target = match &self.phase {
            Phase::Leader { target, .. } => Some(target.clone()),
            _ => None,
        };
        (target, change)
    }

    /// When the decision may change with no new input (a drain ending by time).
    fn next_wakeup(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Draining { since, cleared_at, .. } => {
                let end = *since + MAX_SWITCHOVER_HOLD;
                Some(cleared_at.map_or(end, |c| end.min(c + self.release_delay)))
            }
            _ => None,
        }
    }

    fn routed_name(&self) -> Option<&str> {
        match &self.phase {
            Phase::Leader { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// The metrics one followed cluster keeps.
pub struct ClusterMetrics {
    /// Counts every move to a leader other than the last one routed to (switchovers included).
    pub leader_changes: metrics::Counter,
    /// 1 while some Patroni endpoint answers.
    pub reachable: metrics::Gauge,
    /// 1 while new transactions are held for a pending switchover.
    pub switchover_pending: metrics::Gauge,
    /// 1 while etcd answers (only set when the failover key is watched).
    pub etcd_reachable: Option<metrics::Gauge>,
    /// Gauge for `member`: 1 for the member routed to, 0 for the others.
    pub leader_info: Box<dyn Fn(&str) -> metrics::Gauge + Send>,
}

/// Follows one Patroni cluster: publishes its leader (host:port) as the route of every database that names it.
///
/// While `/cluster` names no running leader, or a switchover away from the leader is pending in the failover
/// key, the route is `None`, so checkouts wait (bounded by query_wait_timeout) instead of failing; transactions
/// already running on the old leader go on. While no endpoint answers, the last confirmed leader is kept.
/// `release_delay`: how long the failover key must stay cleared before a drain of a leader that is still
/// running is called off (a couple of `/cluster` polls, so a stale view is not mistaken for a refusal).
#[allow(clippy::too_many_arguments)]
pub async fn follow_cluster(
    name: String,
    mut view: watch::Receiver<ClusterView>,
    mut key: watch::Receiver<FailoverKey>,
    routes: Vec<watch::Sender<Route>>,
    metrics: ClusterMetrics,
    release_delay: Duration,
    shutdown: CancellationToken,
) {
    let mut follow = Follow::new(release_delay);
    let mut current: Option<Target> = None;
    // The last leader routed to survives no-leader gaps, so a switchover counts as a change.
    let mut last_routed: Option<(String, Target)> = None;
    let mut lost_at: Option<Instant> = Some(Instant::now());
    let mut was_reachable: Option<bool> = None;
    let mut key_open = true;
    let mut member_gauges: HashMap<String, metrics::Gauge> = HashMap::new();
    loop {
        let v = view.borrow_and_update().clone();
        let k = key.borrow_and_update().clone();
        let now = Instant::now();
        if was_reachable != Some(v.reachable) {
            metrics.reachable.set(if v.reachable { 1.0 } else { 0.0 });
            if !v.reachable && was_reachable.is_some() {
                warn!(cluster = %name, kept = ?current.as_ref().map(|t| t.to_string()),
                    "patroni unreachable; routing to the last confirmed leader");
            }
            was_reachable = Some(v.reachable);
        }
        if let Some(g) = &metrics.etcd_reachable {
            g.set(if k == FailoverKey::Unknown { 0.0 } else { 1.0 });
        }
        let (target, change) = follow.step(&v, &k, now);
        match &change {
            Change::Drain { from, to } => info!(cluster = %name, leader = %from, candidate = ?to,
                "switchover pending: new transactions wait while running ones finish on the old leader"),
            Change::DrainEnded { reason } => info!(cluster = %name, reason, "switchover hold ended"),
            Change::None => {}
        }
        metrics.switchover_pending.set(if matches!(follow.phase, Phase::Draining { .. }) { 1.0 } else { 0.0 });
        if target != current {
            match &target {
                None => {
                    lost_at = Some(now);
                    if change == Change::None {
                        info!(cluster = %name, "no running leader; new transactions wait");
                    }
                }
                Some(new) => {
                    let gap_ms = lost_at.take().map(|t| now.saturating_duration_since(t).as_millis() as u64);
                    let member = follow.routed_name().unwrap_or_default().to_string();
                    let previous = last_routed.as_ref().map(|(n, t)| format!("{n} {t}"));
                    if last_routed.as_ref().is_some_and(|(n, t)| *n != member || t != new) {
                        metrics.leader_changes.increment(1);
                        info!(cluster = %name, leader = %new, member = %member, previous = ?previous, gap_ms = ?gap_ms,
                            "routing to new leader");
                    } else if last_routed.is_none() {
                        info!(cluster = %name, leader = %new, member = %member, gap_ms = ?gap_ms, "routing to new leader");
                    } else {
                        info!(cluster = %name, leader = %new, member = %member, gap_ms = ?gap_ms, "routing to the same leader again");
                    }
                    last_routed = Some((member, new.clone()));
                }
            }
            for r in &routes {
                publish(r, target.clone());
            }
            current = target;
        }
        for m in v.members.iter().map(|m| m.name.as_str()).chain(follow.routed_name()) {
            if !member_gauges.contains_key(m) && member_gauges.len() < MAX_MEMBER_GAUGES {
                member_gauges.insert(m.to_string(), (metrics.leader_info)(m));
            }
        }
        for (m, g) in &member_gauges {
            g.set(if follow.routed_name() == Some(m.as_str()) { 1.0 } else { 0.0 });
        }
        let wake = follow.next_wakeup();
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            r = key.changed(), if key_open => if r.is_err() { key_open = false },
            _ = sleep_until_opt(wake) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// An empty route (no target yet), for databases that follow a cluster.
pub fn pending() -> (watch::Sender<Route>, watch::Receiver<Route>) {
    watch::channel(Route { target: None, generation: 1, since: Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::patroni::{initial_view, Member, Role};
    use super::*;

    fn member(name: &str, port: u16) -> Member {
        Member {
            name: name.into(),
            role: Role::Leader,
            state: "running".into(),
            host: "127.0.0.1".into(),
            port,
            api_url: None,
            timeline: None,
            lag_bytes: None,
        }
    }

    fn view(leader: Option<(&str, u16)>) -> ClusterView {
        let mut v = initial_view();
        v.reachable = true;
        v.leader = leader.map(|(n, p)| member(n, p));
        v
    }

    fn t(port: u16) -> Option<Target> {
        Some(Target { host: "127.0.0.1".into(), port })
    }

    fn pending(leader: &str, candidate: &str) -> FailoverKey {
        FailoverKey::Pending(PendingFailover { leader: Some(leader.into()), candidate: Some(candidate.into()) })
    }

    const DELAY: Duration = Duration::from_millis(500);

    #[test]
    fn switchover_drains_then_routes_to_the_new_leader() {
        let mut f = Follow::new(DELAY);
        let t0 = Instant::now();
        let n1 = view(Some(("node1", 1)));
        assert_eq!(f.step(&n1, &FailoverKey::Idle, t0), (t(1), Change::None));
        // The key appears while /cluster still says node1 is running: hold.
        let (target, change) = f.step(&n1, &pending("node1", "node2"), t0 + Duration::from_millis(10));
        assert_eq!(target, None);
        assert_eq!(change, Change::Drain { from: "node1".into(), to: Some("node2".into()) });
        // Still holding through the no-leader gap, even once the key is cleared.
        let gap = view(None);
        assert_eq!(f.step(&gap, &pending("node1", "node2"), t0 + Duration::from_secs(1)).0, None);
        assert_eq!(f.step(&gap, &FailoverKey::Idle, t0 + Duration::from_millis(1100)).0, None);
        // The new leader ends the hold at once.
        let (target, change) = f.step(&view(Some(("node2", 2))), &FailoverKey::Idle, t0 + Duration::from_millis(1200));
        assert_eq!(target, t(2));
        assert_eq!(change, Change::DrainEnded { reason: "new leader" });
        assert_eq!(f.next_wakeup(), None);
    }

    #[test]
    fn refused_switchover_goes_back_to_the_old_leader() {
        let mut f = Follow::new(DELAY);
        let t0 = Instant::now();
        let n1 = view(Some(("node1", 1)));
        f.step(&n1, &FailoverKey::Idle, t0);
        assert_eq!(f.step(&n1, &pending("node1", "node2"), t0).0, None);
        // Key cleared, node1 still running: not before release_delay...
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(f.step(&n1, &FailoverKey::Idle, t1).0, None);
        assert_eq!(f.next_wakeup(), Some(t1 + DELAY));
        assert_eq!(f.step(&n1, &FailoverKey::Idle, t1 + DELAY / 2).0, None);
        // ...then back to node1.
        let (target, change) = f.step(&n1, &FailoverKey::Idle, t1 + DELAY);
        assert_eq!((target, change), (t(1), Change::DrainEnded { reason: "failover key cleared" }));
    }

    #[test]
    fn a_hold_is_bounded_and_not_repeated_for_the_same_request() {
        let mut f = Follow::new(DELAY);
        let t0 = Instant::now();
        let n1 = view(Some(("node1", 1)));
        let key = pending("node1", "node2");
        f.step(&n1, &FailoverKey::Idle, t0);
        assert_eq!(f.step(&n1, &key, t0).0, None);
        assert_eq!(f.next_wakeup(), Some(t0 + MAX_SWITCHOVER_HOLD));
        let (target, change) = f.step(&n1, &key, t0 + MAX_SWITCHOVER_HOLD);
        assert_eq!((target, change), (t(1), Change::DrainEnded { reason: "held too long" }));
        assert_eq!(f.step(&n1, &key, t0 + MAX_SWITCHOVER_HOLD * 2).0, t(1), "same stale request: no new hold");
        // A new request drains again.
        f.step(&n1, &FailoverKey::Idle, t0 + MAX_SWITCHOVER_HOLD * 2);
        assert_eq!(f.step(&n1, &key, t0 + MAX_SWITCHOVER_HOLD * 3).0, None);
    }

    #[test]
    fn requests_that_keep_the_leader_or_unknown_keys_change_nothing() {
        let mut f = Follow::new(DELAY);
        let t0 = Instant::now();
        let n1 = view(Some(("node1", 1)));
        assert_eq!(f.step(&n1, &FailoverKey::Unknown, t0).0, t(1));
        assert_eq!(f.step(&n1, &pending("node2", "node1"), t0).0, t(1));
        let to_self = FailoverKey::Pending(PendingFailover { leader: None, candidate: Some("node1".into()) });
        assert_eq!(f.step(&n1, &to_self, t0).0, t(1));
        // Patroni unreachable: the view keeps the last leader, and so does the route.
        let mut down = n1.clone();
        down.reachable = false;
        assert_eq!(f.step(&down, &FailoverKey::Unknown, t0).0, t(1));
        assert_eq!(f.step(&view(None), &FailoverKey::Idle, t0).0, None);
    }

    async fn wait_route(rx: &mut watch::Receiver<Route>, want: Option<Target>) {
        let r = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|r| r.target.as_deref() == want.as_ref()));
        r.await.expect("route within 2 s").expect("route channel open");
    }

    #[tokio::test]
    async fn follow_counts_a_switchover_across_the_gap() {
        let recorder = crate::observe::Metrics::new();
        let changes = recorder.counter("pgrelay_leader_changes_total", &[("cluster", "c".into())]);
        let m = Arc::new(recorder);
        let mm = m.clone();
        let metrics = ClusterMetrics {
            leader_changes: changes,
            reachable: m.gauge("pgrelay_patroni_reachable", &[("cluster", "c".into())]),
            switchover_pending: m.gauge("pgrelay_patroni_switchover_pending", &[("cluster", "c".into())]),
            etcd_reachable: None,
            leader_info: Box::new(move |member: &str| {
                mm.gauge("pgrelay_patroni_leader_info", &[("cluster", "c".into()), ("member", member.to_string())])
            }),
        };
        let (vtx, vrx) = watch::channel(view(Some(("node1", 1))));
        let (ktx, krx) = watch::channel(FailoverKey::Idle);
        let (rtx, mut rrx) = super::pending();
        let token = CancellationToken::new();
        let task = tokio::spawn(follow_cluster("c".into(), vrx, krx, vec![rtx], metrics, DELAY, token.clone()));
        wait_route(&mut rrx, t(1)).await;
        ktx.send(pending("node1", "node2")).unwrap();
        wait_route(&mut rrx, None).await;
        vtx.send(view(None)).unwrap();
        vtx.send(view(Some(("node2", 2)))).unwrap();
        wait_route(&mut rrx, t(2)).await;
        let text = m.render();
        assert!(text.contains("pgrelay_leader_changes_total{cluster=\"c\"} 1"), "{text}");
        assert!(text.contains("pgrelay_patroni_leader_info{cluster=\"c\",member=\"node2\"} 1"), "{text}");
        assert!(text.contains("pgrelay_patroni_switchover_pending{cluster=\"c\"} 0"), "{text}");
        token.cancel();
        task.await.unwrap();
    }
}

/// The member a read-only pool should use: the running replica with the least lag strictly below `max_lag` bytes
/// (staying on the current one while it still qualifies), else the leader. `None` when there is neither.
pub fn pick_replica(view: &ClusterView, current: Option<&Target>, max_lag: u64) -> Option<Target> {
    use self::patroni::Role;
    let qualified: Vec<&patroni::Member> = view
        .members
        .iter()
        .filter(|m| matches!(m.role, Role::Replica | Role::SyncStandby) && m.state == "running")
        .filter(|m| m.lag_bytes.is_some_and(|l| l < max_lag))
        .collect();
    let target = |m: &patroni::Member| Target { host: m.host.clone(), port: m.port };
    if let Some(cur) = current {
        if let Some(m) = qualified.iter().find(|m| m.host == cur.host && m.port == cur.port) {
            return Some(target(m));
        }
    }
    qualified.iter().min_by_key(|m| m.lag_bytes).map(|m| target(m)).or_else(|| view.leader.as_ref().map(target))
}

/// Routes read-only pools (`role = "replica"`) of one cluster, each with its lag limit. While Patroni cannot be
/// reached the current target is kept.
pub async fn follow_replicas(
    name: String,
    mut view: watch::Receiver<ClusterView>,
    routes: Vec<(watch::Sender<Route>, u64)>,
    shutdown: CancellationToken,
) {
    loop {
        let v = view.borrow_and_update().clone();
        if v.reachable {
            for (tx, max_lag) in &routes {
                let current = tx.borrow().target.as_deref().cloned();
                let next = pick_replica(&v, current.as_ref(), *max_lag);
                if next != current {
                    info!(cluster = %name, target = ?next.as_ref().map(|t| t.to_string()), max_lag, "read-only route");
                    publish(tx, next);
                }
            }
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod replica_tests {
    use super::patroni::{Member, Role};
    use super::*;

    fn member(name: &str, role: Role, port: u16, lag: Option<u64>) -> Member {
        Member {
            name: name.into(),
            role,
            state: "running".into(),
            host: "127.0.0.1".into(),
            port,
            api_url: None,
            timeline: None,
            lag_bytes: lag,
        }
    }

    #[test]
    fn replicas_under_the_lag_limit_else_the_leader() {
        let leader = member("a", Role::Leader, 1, None);
        let mut v = patroni::initial_view();
        v.reachable = true;
        v.leader = Some(leader.clone());
        v.members = vec![leader, member("b", Role::Replica, 2, Some(10)), member("c", Role::SyncStandby, 3, Some(5))];
        assert_eq!(pick_replica(&v, None, 100).map(|t| t.port), Some(3), "least lag first");
        let b = Target { host: "127.0.0.1".into(), port: 2 };
        assert_eq!(pick_replica(&v, Some(&b), 100).map(|t| t.port), Some(2), "stays while it qualifies");
        assert_eq!(pick_replica(&v, Some(&b), 8).map(|t| t.port), Some(3), "moves when it lags");
        assert_eq!(pick_replica(&v, None, 0).map(|t| t.port), Some(1), "falls back to the leader");
        v.members[2].lag_bytes = None;
        assert_eq!(pick_replica(&v, None, 6).map(|t| t.port), Some(1), "unknown lag does not qualify");
    }
}
