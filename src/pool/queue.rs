//! The FIFO of checkouts waiting for a server. A queued checkout parks in a reusable slot rather than behind a
//! channel of its own, so joining the queue and being handed a server allocate nothing.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::Pool;
use crate::server::ServerConn;

/// What a waiter is handed.
pub(super) enum Grant {
    /// An idle connection, passed directly so no other client can jump the queue.
    Conn(Box<ServerConn>),
    /// Room to open a new connection (someone closed one).
    Slot,
    /// The waiter's deadline passed (query_wait_timeout): sent by `expire`.
    Expired,
}

/// A queued checkout's claim on its slot. The slot's ticket changes with every use, so the queue entry of a
/// checkout that gave up is recognised as stale once the slot serves someone else.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket {
    slot: u32,
    ticket: u64,
}

struct Slot {
    ticket: u64,
    state: SlotState,
}

enum SlotState {
    Free,
    Queued(Waker),
    Granted(Grant),
}

struct Entry {
    slot: u32,
    ticket: u64,
    since: Instant,
    deadline: Option<Instant>,
}

/// Queue entries in arrival order plus the slots they point at. Lives under the pool's lock.
#[derive(Default)]
pub(super) struct WaitQueue {
    entries: VecDeque<Entry>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// No entry's deadline is earlier (it may be earlier than any live one): lets `expire` skip the scan.
    earliest: Option<Instant>,
}

impl WaitQueue {
    /// Queues a checkout at the back; `waker` is woken when a grant arrives.
    pub fn push(&mut self, waker: Waker, since: Instant, deadline: Option<Instant>) -> Ticket {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { ticket: 0, state: SlotState::Free });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.ticket += 1;
        s.state = SlotState::Queued(waker);
        let ticket = s.ticket;
        // Entries of checkouts that gave up stay until popped; drop them when the queue doubles.
        if self.entries.len() > 64 && self.entries.len().is_power_of_two() {
            self.compact();
        }
        if let Some(d) = deadline {
            self.earliest = Some(self.earliest.map_or(d, |e| e.min(d)));
        }
        self.entries.push_back(Entry { slot, ticket, since, deadline });
        Ticket { slot, ticket }
    }

    fn is_live(&self, e: &Entry) -> bool {
        let s = &self.slots[e.slot as usize];
        s.ticket == e.ticket && matches!(s.state, SlotState::Queued(_))
    }

    /// Hands `grant` to the first live waiter and returns its waker (to wake once the pool lock is released);
    /// gives the grant back when nobody waits.
    pub fn grant_first(&mut self, grant: Grant) -> Result<Waker, Grant> {
        while let Some(e) = self.entries.pop_front() {
            if self.is_live(&e) {
                let s = &mut self.slots[e.slot as usize];
                match std::mem::replace(&mut s.state, SlotState::Granted(grant)) {
                    SlotState::Queued(w) => return Ok(w),
                    _ => unreachable!("a live entry's slot is queued"),
                }
            }
        }
        Err(grant)
    }

    /// Grants `Expired` to every waiter whose deadline has passed; returns their wakers.
    pub fn expire(&mut self, now: Instant) -> Vec<Waker> {
        let mut woken = Vec::new();
        if self.earliest.is_none_or(|e| e > now) {
            return woken;
        }
        for i in 0..self.entries.len() {
            let e = &self.entries[i];
            if e.deadline.is_some_and(|d| d <= now) && self.is_live(e) {
                let slot = e.slot as usize;
                let s = &mut self.slots[slot];
                if let SlotState::Queued(w) = std::mem::replace(&mut s.state, SlotState::Granted(Grant::Expired)) {
                    woken.push(w);
                }
            }
        }
        self.compact();
        woken
    }

    /// Drops the entries of checkouts that gave up or were served.
    pub fn compact(&mut self) {
        let slots = &self.slots;
        self.entries.retain(|e| {
            let s = &slots[e.slot as usize];
            s.ticket == e.ticket && matches!(s.state, SlotState::Queued(_))
        });
        self.earliest = self.entries.iter().filter_map(|e| e.deadline).min();
    }

    /// The grant for `t` if one arrived (the slot is then free again); otherwise remembers `waker`.
    pub fn poll(&mut self, t: Ticket, waker: &Waker) -> Option<Grant> {
        let s = &mut self.slots[t.slot as usize];
        debug_assert_eq!(s.ticket, t.ticket, "a slot keeps its ticket until its owner takes the grant or cancels");
        match &mut s.state {
            SlotState::Queued(w) => {
                if !w.will_wake(waker) {
                    *w = waker.clone();
                }
                None
            }
            SlotState::Granted(_) => {
                let SlotState::Granted(g) = std::mem::replace(&mut s.state, SlotState::Free) else {
                    unreachable!("matched Granted above")
                };
                self.free.push(t.slot);
                Some(g)
            }
            SlotState::Free => unreachable!("a slot stays taken until its owner takes the grant or cancels"),
        }
    }

    /// Leaves the queue; returns a grant that arrived meanwhile, which the caller must pass on.
    pub fn cancel(&mut self, t: Ticket) -> Option<Grant> {
        let s = &mut self.slots[t.slot as usize];
        let state = std::mem::replace(&mut s.state, SlotState::Free);
        self.free.push(t.slot);
        match state {
            SlotState::Granted(g) => Some(g),
            _ => None,
        }
    }

    /// Checkouts still waiting, and when the oldest of them joined.
    pub fn live(&self) -> (usize, Option<Instant>) {
        let mut n = 0;
        let mut oldest = None;
        for e in self.entries.iter().filter(|e| self.is_live(e)) {
            n += 1;
            oldest = Some(oldest.map_or(e.since, |o: Instant| o.min(e.since)));
        }
        (n, oldest)
    }
}

/// A queued checkout waiting for its grant. Dropping it leaves the queue, passing on a grant that arrived meanwhile.
pub(super) struct Turn<'a> {
    pub pool: &'a Pool,
    pub ticket: Option<Ticket>,
    /// Set until the first poll. `step` queued the ticket with the waker of the very poll that then awaits the
    /// Turn, so that first poll has nothing to check: a grant that arrived in between has already woken the task,
    /// which polls again.
    pub fresh: bool,
}

impl Future for Turn<'_> {
    type Output = Grant;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        let this = self.get_mut();
        if std::mem::take(&mut this.fresh) {
            return Poll::Pending;
        }
        let t = this.ticket.expect("a Turn is not polled after it completed");
        let grant = this.pool.inner.lock().queue.poll(t, cx.waker());
        match grant {
            Some(g) => {
                this.ticket = None;
                Poll::Ready(g)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else { return };
        let grant = self.pool.inner.lock().queue.cancel(t);
        match grant {
            Some(Grant::Conn(c)) => self.pool.pass_on(c),
            Some(Grant::Slot) => self.pool.give_back_slot(),
            Some(Grant::Expired) | None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn grants_go_out_in_arrival_order_and_skip_cancelled() {
        let mut q = WaitQueue::default();
        let now = Instant::now();
        let (_, w) = waker();
        let a = q.push(w.clone(), now, None);
        let b = q.push(w.clone(), now, None);
        let c = q.push(w.clone(), now, None);
        assert!(q.cancel(b).is_none());
        // b's slot is reused by d, which must still queue behind c.
        let d = q.push(w.clone(), now, None);
        assert_eq!(q.live().0, 3);
        for t in [a, c, d] {
            assert!(q.grant_first(Grant::Slot).is_ok());
            assert!(matches!(q.poll(t, &w), Some(Grant::Slot)));
        }
        assert!(q.grant_first(Grant::Slot).is_err());
        assert_eq!(q.live().0, 0);
    }

    #[test]
    fn expire_wakes_only_waiters_past_their_deadline() {
        let mut q = WaitQueue::default();
        let now = Instant::now();
        let (late_count, late) = waker();
        let (_, on_time) = waker();
        let t1 = q.push(late.clone(), now, Some(now));
        let t2 = q.push(on_time.clone(), now, Some(now + std::time::Duration::from_secs(60)));
        for w in q.expire(now) {
            w.wake();
        }
        assert_eq!(late_count.0.load(Ordering::Relaxed), 1);
        assert!(matches!(q.poll(t1, &late), Some(Grant::Expired)));
        assert!(q.poll(t2, &on_time).is_none());
        assert_eq!(q.live().0, 1);
    }

    #[test]
    fn a_grant_before_the_first_poll_wakes_the_queued_waker_and_waits_in_the_slot() {
        // `Turn::fresh`: the first poll does not look, so a grant made between `push` and that poll must have woken
        // the waker given to `push`, and must still be there for the next poll.
        let mut q = WaitQueue::default();
        let (count, w) = waker();
        let t = q.push(w.clone(), Instant::now(), None);
        q.grant_first(Grant::Slot).map(Waker::wake).unwrap_or_else(|_| panic!("a live waiter"));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        assert!(matches!(q.poll(t, &w), Some(Grant::Slot)));
    }

    #[test]
    fn a_grant_wakes_the_waker_of_the_latest_poll() {
        let mut q = WaitQueue::default();
        let (first_count, first) = waker();
        let (second_count, second) = waker();
        let t = q.push(first, Instant::now(), None);
        // Polled again from another task (or through another combinator): the new waker replaces the old one.
        assert!(q.poll(t, &second).is_none());
        q.grant_first(Grant::Slot).map(Waker::wake).unwrap_or_else(|_| panic!("a live waiter"));
        assert_eq!(first_count.0.load(Ordering::Relaxed), 0);
        assert_eq!(second_count.0.load(Ordering::Relaxed), 1);
        assert!(matches!(q.poll(t, &second), Some(Grant::Slot)));
    }

    #[test]
    fn an_expired_waiter_is_passed_over_by_later_grants() {
        let mut q = WaitQueue::default();
        let now = Instant::now();
        let (_, w) = waker();
        let late = q.push(w.clone(), now, Some(now));
        let next = q.push(w.clone(), now, None);
        assert_eq!(q.expire(now).len(), 1);
        // The expired waiter keeps its Expired; the grant goes to the one behind it.
        assert!(q.grant_first(Grant::Slot).is_ok());
        assert!(matches!(q.poll(late, &w), Some(Grant::Expired)));
        assert!(matches!(q.poll(next, &w), Some(Grant::Slot)));
        assert!(q.grant_first(Grant::Slot).is_err());
    }

    #[test]
    fn a_grant_that_races_a_cancel_is_returned() {
        let mut q = WaitQueue::default();
        let (_, w) = waker();
        let t = q.push(w, Instant::now(), None);
        assert!(q.grant_first(Grant::Slot).is_ok());
        assert!(matches!(q.cancel(t), Some(Grant::Slot)));
    }
}
