//! Message status with the only transitions allowed: forward, never out of a final state.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    // Outbound, in Twilio's lifecycle order.
    /// Committed to our outbox, not yet accepted by Twilio.
    Stored,
    Accepted,
    Queued,
    Sending,
    Sent,
    Delivered,
    Undelivered,
    Failed,
    /// Not accepted by Twilio before its validity period ran out.
    Expired,
    Canceled,
    // Inbound.
    /// Accepted from Twilio's webhook and stored.
    Received,
    /// Waiting for the extension to be reachable.
    Pending,
    /// No rule and no extension claimed the number.
    Unroutable,
    /// Matched a "drop" rule.
    Dropped,
}

impl MessageStatus {
    fn rank(self) -> u8 {
        use MessageStatus::*;
        match self {
            Stored | Received => 0,
            Accepted | Pending => 1,
            Queued => 2,
            Sending => 3,
            Sent => 4,
            Delivered | Undelivered | Failed | Expired | Canceled | Unroutable | Dropped => 5,
        }
    }

    pub fn is_final(self) -> bool {
        self.rank() == 5
    }

    /// Whether a message in `self` may move to `next`. Late or duplicate callbacks (a "sent"
    /// after "delivered") are refused.
    pub fn can_become(self, next: MessageStatus) -> bool {
        !self.is_final() && next.rank() > self.rank()
    }

    pub fn as_str(self) -> &'static str {
        use MessageStatus::*;
        match self {
            Stored => "stored",
            Accepted => "accepted",
            Queued => "queued",
            Sending => "sending",
            Sent => "sent",
            Delivered => "delivered",
            Undelivered => "undelivered",
            Failed => "failed",
            Expired => "expired",
            Canceled => "canceled",
            Received => "received",
            Pending => "pending",
            Unroutable => "unroutable",
            Dropped => "dropped",
        }
    }

    /// Our own names, as stored.
    pub fn parse(s: &str) -> Option<Self> {
        use MessageStatus::*;
        Some(match s {
            "stored" => Stored,
            "accepted" => Accepted,
            "queued" => Queued,
            "sending" => Sending,
            "sent" => Sent,
            "delivered" => Delivered,
            "undelivered" => Undelivered,
            "failed" => Failed,
            "expired" => Expired,
            "canceled" => Canceled,
            "received" => Received,
            "pending" => Pending,
            "unroutable" => Unroutable,
            "dropped" => Dropped,
            _ => return None,
        })
    }

    /// Twilio's `MessageStatus` values for outbound messages (`scheduled` counts as accepted,
    /// `read` and `partially_delivered` as delivered).
    pub fn from_twilio(s: &str) -> Option<Self> {
        use MessageStatus::*;
        Some(match s {
            "accepted" | "scheduled" => Accepted,
            "queued" => Queued,
            "sending" => Sending,
            "sent" => Sent,
            "delivered" | "read" | "partially_delivered" => Delivered,
            "undelivered" => Undelivered,
            "failed" => Failed,
            "canceled" => Canceled,
            _ => return None,
        })
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::MessageStatus::*;
    use super::*;

    #[test]
    fn transitions() {
        let cases = [
            (Stored, Queued, true),
            (Queued, Sent, true),
            (Sent, Delivered, true),
            (Sent, Undelivered, true),
            (Queued, Failed, true),
            (Delivered, Sent, false),
            (Delivered, Failed, false),
            (Sent, Sent, false),
            (Sent, Queued, false),
            (Failed, Delivered, false),
            (Received, Pending, true),
            (Pending, Delivered, true),
            (Pending, Expired, true),
            (Expired, Delivered, false),
        ];
        for (from, to, ok) in cases {
            assert_eq!(from.can_become(to), ok, "{from} -> {to}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in [
            Stored,
            Accepted,
            Queued,
            Sending,
            Sent,
            Delivered,
            Undelivered,
            Failed,
            Expired,
            Canceled,
            Received,
            Pending,
            Unroutable,
            Dropped,
        ] {
            assert_eq!(MessageStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(MessageStatus::from_twilio("read"), Some(Delivered));
        assert_eq!(MessageStatus::from_twilio("bogus"), None);
    }
}
