//! Where a database lives: a static host, or the current leader of a Patroni cluster, published on a watch channel.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

pub mod patroni;

/// Follows one Patroni cluster: publishes its leader (host:port) as the route of every database that names it.
///
/// While `/cluster` names no running leader the route is `None`, so checkouts wait (bounded by query_wait_timeout)
/// instead of failing; while no endpoint answers, the last confirmed leader is kept.
pub async fn follow_cluster(
    name: String,
    mut view: watch::Receiver<ClusterView>,
    routes: Vec<watch::Sender<Route>>,
    leader_changes: metrics::Counter,
    shutdown: CancellationToken,
) {
    let mut last_leader: Option<Target> = None;
    let mut lost_at: Option<Instant> = None;
    loop {
        let v = view.borrow_and_update().clone();
        let leader = v.leader.as_ref().map(|m| Target { host: m.host.clone(), port: m.port });
        if !v.reachable {
            if last_leader.is_some() {
                warn!(cluster = %name, "patroni unreachable; routing to the last confirmed leader");
            }
        } else if leader != last_leader {
            match (&last_leader, &leader) {
                (_, None) => {
                    lost_at = Some(Instant::now());
                    info!(cluster = %name, "no running leader; new transactions wait");
                }
                (old, Some(new)) => {
                    let gap_ms = lost_at.take().map(|t| t.elapsed().as_millis() as u64);
                    if old.is_some() {
                        leader_changes.increment(1);
                    }
                    info!(cluster = %name, leader = %new, previous = ?old.as_ref().map(|t| t.to_string()), gap_ms = ?gap_ms, "routing to new leader");
                }
            }
            for r in &routes {
                publish(r, leader.clone());
            }
            last_leader = leader;
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// An empty route (no target yet), for databases that follow a cluster.
pub fn pending() -> (watch::Sender<Route>, watch::Receiver<Route>) {
    watch::channel(Route { target: None, generation: 1, since: Instant::now() })
}
