//! Per-object exponential backoff for failed reconciles.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const FIRST: Duration = Duration::from_secs(2);
const LAST: Duration = Duration::from_secs(300);

/// Remembers consecutive failures per object key and hands out growing delays.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records a failure of `key` and returns how long to wait before retrying:
    /// 2 s, 4 s, 8 s, ... up to 5 minutes.
    pub fn fail(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key.to_string()).or_default();
        *count = count.saturating_add(1);
        FIRST.saturating_mul(1 << (*count - 1).min(16)).min(LAST)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeed(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_on_success() {
        let backoff = Backoff::default();
        let delays: Vec<u64> = (0..10).map(|_| backoff.fail("a").as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff.fail("b").as_secs(), 2);
        backoff.succeed("a");
        assert_eq!(backoff.fail("a").as_secs(), 2);
    }
}
