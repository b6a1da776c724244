//! Where a database lives: a static host, or the current leader of a Patroni cluster, published on a watch channel.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

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
    watch::channel(Route {
        target: Some(Arc::new(target)),
        generation: 1,
        since: Instant::now(),
    })
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
