//! Pacing per sender: a token bucket in segments per second, so a burst is spread out instead of
//! bounced by Twilio (21611) or failed later (30001).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

struct Bucket {
    tokens: f64,
    last: Instant,
    waiting: usize,
}

#[derive(Default)]
pub struct Pacer {
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// Up to one second's worth of segments may go out at once.
fn burst(rate: f64) -> f64 {
    rate.max(1.0)
}

impl Pacer {
    /// Reserves `segments` for `sender` at `rate` per second; returns how long to wait before
    /// sending. The reservation is made now, so concurrent callers queue behind each other.
    pub fn reserve(&self, sender: &str, rate: f64, segments: u32, now: Instant) -> Duration {
        let mut buckets = self.buckets.lock().expect("pacer lock");
        let b = buckets.entry(sender.to_string()).or_insert(Bucket {
            tokens: burst(rate),
            last: now,
            waiting: 0,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst(rate));
        b.last = now;
        b.tokens -= f64::from(segments.max(1));
        if b.tokens >= 0.0 {
            return Duration::ZERO;
        }
        b.waiting += 1;
        Duration::from_secs_f64(-b.tokens / rate)
    }

    /// Gives back a reservation that will not be used now (the message was rescheduled).
    pub fn cancel(&self, sender: &str, segments: u32) {
        if let Some(b) = self.buckets.lock().expect("pacer lock").get_mut(sender) {
            b.tokens += f64::from(segments.max(1));
            b.waiting = b.waiting.saturating_sub(1);
        }
    }

    /// A waiting reservation has been used.
    pub fn done_waiting(&self, sender: &str) {
        if let Some(b) = self.buckets.lock().expect("pacer lock").get_mut(sender) {
            b.waiting = b.waiting.saturating_sub(1);
        }
    }

    /// Messages waiting per sender, for the queue-depth gauge.
    pub fn depths(&self) -> Vec<(String, usize)> {
        self.buckets
            .lock()
            .expect("pacer lock")
            .iter()
            .map(|(k, b)| (k.clone(), b.waiting))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spreads_a_burst_at_the_rate() {
        let p = Pacer::default();
        let now = Instant::now();
        // One message per second: the first goes at once, the next ones a second apart.
        let waits: Vec<u64> = (0..4)
            .map(|_| p.reserve("+1501", 1.0, 1, now).as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![0, 1000, 2000, 3000]);
        // Segments count: a 3-segment message takes three seconds of budget.
        let q = Pacer::default();
        assert_eq!(q.reserve("A", 1.0, 3, now).as_millis(), 2000);
        // Separate senders do not share a budget.
        assert_eq!(p.reserve("+1502", 1.0, 1, now), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.reserve("+1502", 1.0, 1, Instant::now()), Duration::ZERO);
        assert_eq!(p.depths().iter().find(|(s, _)| s == "+1501").unwrap().1, 3);
    }
}
