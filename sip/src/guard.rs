//! Brute-force guard: a source address that fails authentication too often is refused for a while.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub max_failures: u32,
    pub window: Duration,
    pub cooldown: Duration,
    /// Hard bound on tracked addresses; when full and nothing has aged out, new sources are not
    /// tracked (they still have to authenticate) rather than letting memory grow.
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
}

pub struct AuthGuard {
    config: GuardConfig,
    entries: DashMap<IpAddr, Entry>,
    len: AtomicUsize,
    last_prune: Mutex<Option<Instant>>,
}

/// IPv6 hosts are counted per /64: one subscriber usually holds a whole /64, and tracking single
/// addresses would let one host rotate through it.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
    }
}

impl AuthGuard {
    pub fn new(config: GuardConfig) -> Self {
        Self {
            config,
            entries: DashMap::new(),
            len: AtomicUsize::new(0),
            last_prune: Mutex::new(None),
        }
    }

    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = bucket(ip);
        self.entries
            .get(&ip)
            .and_then(|e| e.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Counts a failed authentication; returns true when this failure starts a block.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = bucket(ip);
        if !self.entries.contains_key(&ip)
            && self.len.load(Ordering::Relaxed) >= self.config.max_tracked
        {
            // A full table is pruned at most once a second, so a flood cannot make every
            // failure scan it.
            let due = {
                let mut last = self.last_prune.lock().expect("prune lock");
                let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
                if due {
                    *last = Some(now);
                }
                due
            };
            if due {
                self.prune(now);
            }
            if self.len.load(Ordering::Relaxed) >= self.config.max_tracked {
                return false;
            }
        }
        let mut inserted = false;
        let mut entry = self.entries.entry(ip).or_insert_with(|| {
            inserted = true;
            Entry {
                failures: 0,
                window_start: now,
                blocked_until: None,
            }
        });
        if inserted {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        if now.duration_since(entry.window_start) > self.config.window {
            entry.failures = 0;
            entry.window_start = now;
        }
        entry.failures += 1;
        if entry.failures >= self.config.max_failures
            && entry.blocked_until.is_none_or(|u| u <= now)
        {
            entry.blocked_until = Some(now + self.config.cooldown);
            entry.failures = 0;
            entry.window_start = now;
            return true;
        }
        false
    }

    /// A success clears the count, so a phone that mistyped once is not punished later.
    pub fn record_success(&self, ip: IpAddr) {
        if self.entries.remove(&bucket(ip)).is_some() {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drops entries whose window and block have both passed.
    pub fn prune(&self, now: Instant) {
        let window = self.config.window;
        self.entries.retain(|_, e| {
            e.blocked_until.is_some_and(|u| now < u) || now.duration_since(e.window_start) <= window
        });
        self.len.store(self.entries.len(), Ordering::Relaxed);
    }

    pub fn tracked(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_tracked: usize) -> AuthGuard {
        AuthGuard::new(GuardConfig {
            max_failures: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
            max_tracked,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn blocks_after_n_failures_then_lifts() {
        let g = guard(10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!g.record_failure(ip, Instant::now()));
        assert!(!g.record_failure(ip, Instant::now()));
        assert!(g.record_failure(ip, Instant::now()));
        assert!(g.is_blocked(ip, Instant::now()));
        assert!(!g.is_blocked("192.0.2.2".parse().unwrap(), Instant::now()));
        tokio::time::advance(Duration::from_secs(301)).await;
        assert!(!g.is_blocked(ip, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let g = guard(10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert!(!g.record_failure(ip, Instant::now()));
            tokio::time::advance(Duration::from_secs(40)).await;
            assert!(!g.record_failure(ip, Instant::now()));
            tokio::time::advance(Duration::from_secs(61)).await;
        }
        assert!(!g.is_blocked(ip, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_is_counted_per_64() {
        let g = guard(10);
        for i in 1..=3u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
            g.record_failure(ip, Instant::now());
        }
        assert!(g.is_blocked("2001:db8:0:1::ffff".parse().unwrap(), Instant::now()));
        assert!(!g.is_blocked("2001:db8:0:2::1".parse().unwrap(), Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let g = guard(100);
        for i in 0..10_000u32 {
            g.record_failure(IpAddr::from(i.to_be_bytes()), Instant::now());
        }
        assert!(g.tracked() <= 100);
        tokio::time::advance(Duration::from_secs(61)).await;
        g.prune(Instant::now());
        assert_eq!(g.tracked(), 0);
    }
}
