//! Busy polling (`proxy.busy_poll`): for a while after the last client or server message, the runtime keeps asking
//! the kernel for the next socket event (`epoll_wait` with a zero timeout) instead of sleeping until one arrives.
//!
//! A thread asleep in `epoll_wait` is woken by the sender's kernel path and scheduled again; that takes microseconds,
//! more in a virtual machine, and a relayed transaction pays it twice (query in, reply back). A polling thread finds
//! the event on its next turn. The price is CPU: while traffic flows, and for `busy_poll` after it stops, the runtime
//! thread runs flat out. That is the usual trade in latency-bound deployments with a core to spare; it is off by
//! default because on a host where the proxy shares its cores with PostgreSQL it takes CPU the database needs.
//!
//! The poller is one task. Sessions call [`BusyPoll::touch`] once per event (a relaxed load when busy polling is
//! off); the task yields in a loop, which makes tokio's scheduler poll the I/O driver without blocking, until nothing
//! has been touched for the window, then parks until the next touch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

/// Shared between the sessions and the polling task.
#[derive(Default)]
pub struct BusyPoll {
    /// A poller runs (set once, at start-up).
    on: AtomicBool,
    /// Something happened since the poller last looked.
    active: AtomicBool,
    /// The poller sleeps and wants to be woken by the next touch.
    parked: AtomicBool,
    waker: AtomicWaker,
    /// Turns spent polling (for tests).
    spins: AtomicU64,
}

impl BusyPoll {
    /// Called by a session for each client or server event.
    #[inline]
    pub fn touch(&self) {
        if self.on.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::Relaxed);
            if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
                self.waker.wake();
            }
        }
    }

    /// Turns the poller has spent polling so far.
    pub fn spins(&self) -> u64 {
        self.spins.load(Ordering::Relaxed)
    }

    /// True while the poller sleeps, waiting for traffic.
    pub fn parked(&self) -> bool {
        self.parked.load(Ordering::Acquire)
    }

    /// The polling task: runs until the runtime stops. `window` is how long it keeps polling after the last touch.
    pub async fn run(&self, window: Duration) {
        self.on.store(true, Ordering::Relaxed);
        loop {
            // Asleep until a session reports traffic. Register, then look: a touch in between finds the waker.
            self.parked.store(true, Ordering::Release);
            std::future::poll_fn(|cx| {
                self.waker.register(cx.waker());
                if self.parked.load(Ordering::Acquire) {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            let mut last = Instant::now();
            loop {
                // A yielded task is woken only after the scheduler has polled the I/O driver without blocking.
                tokio::task::yield_now().await;
                self.spins.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if self.active.swap(false, Ordering::Relaxed) {
                    last = now;
                } else if now.duration_since(last) >= window {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn polls_after_a_touch_and_parks_when_traffic_stops() {
        let bp = Arc::new(BusyPoll::default());
        let poller = bp.clone();
        let task = tokio::spawn(async move { poller.run(Duration::from_millis(20)).await });
        wait_until("the poller parks at start", || bp.parked()).await;
        // Parked: no turns are spent while nothing happens.
        let idle = bp.spins();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(bp.spins(), idle, "a parked poller must not spin");
        // A touch wakes it; it polls, then parks again once the window has passed without traffic.
        bp.touch();
        assert!(!bp.parked(), "a touch takes the poller out of its sleep");
        wait_until("the poller spins after a touch", || bp.spins() > idle).await;
        wait_until("the poller parks after the window", || bp.parked()).await;
        let after = bp.spins();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(bp.spins(), after, "parked again: no more turns");
        task.abort();
    }

    #[test]
    fn touch_does_nothing_without_a_poller() {
        let bp = BusyPoll::default();
        bp.touch();
        assert!(!bp.active.load(Ordering::Relaxed));
        assert_eq!(bp.spins(), 0);
    }
}
