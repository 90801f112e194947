//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! Contract:
//! - [`LeaseLock::try_acquire_or_renew`] makes one attempt: it reads the Lease, and writes
//!   it (create, or replace with the `resourceVersion` it read as a precondition) only if
//!   this instance holds it or may take it. Two instances racing for it cannot both win:
//!   the API server refuses the second write with a conflict.
//! - A Lease held by another instance may be taken once it has not changed for its
//!   `leaseDurationSeconds`, measured on this instance's own monotonic clock from the
//!   moment this instance first saw its current version. Nothing depends on the clocks
//!   of two machines agreeing (the times written in the Lease are for people).
//! - [`keep_leading`] renews every retry period and gives up when no renewal has
//!   succeeded for the renew deadline, counted from when the last successful renewal was
//!   *sent*. Since the renew deadline is shorter than the lease duration, and a standby
//!   counts the lease duration from when it *saw* that renewal, a leader has stopped
//!   acting before anyone else can take over.
//! - [`LeaseLock::release`] empties the holder (lease duration 1 s) on graceful shutdown,
//!   so a standby takes over at its next attempt instead of waiting for expiry.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;

use super::FIELD_MANAGER;

/// Name of the Lease the operator's instances compete for.
pub const LEASE_NAME: &str = "sluice-operator";

/// Timing of the election.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a Lease that stops changing keeps others from taking it.
    pub lease_duration: Duration,
    /// How long a leader keeps acting without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between attempts, for the leader and for standbys.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseTiming {
    /// Checks that a leader stops before its lease can be taken and renews several times
    /// within its deadline.
    pub fn check(&self) -> Result<(), String> {
        if self.renew_deadline >= self.lease_duration {
            return Err("the renew deadline must be shorter than the lease duration".into());
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(
                "the retry period must be positive and shorter than the renew \
                        deadline"
                    .into(),
            );
        }
        if self.lease_duration.as_secs() > i32::MAX as u64 || self.lease_duration.as_secs() < 1 {
            return Err("the lease duration must be at least one second".into());
        }
        Ok(())
    }
}

/// Why a leader stopped leading.
#[derive(Debug, PartialEq, Eq)]
pub enum LeaseLost {
    /// Another instance holds the Lease (it was released, or taken after it expired).
    TakenBy(String),
    /// No renewal succeeded within the renew deadline.
    RenewDeadlinePassed,
}

/// A failed API call while reading or writing the Lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading the Lease failed.
    #[error("failed to read Lease {name}")]
    Read {
        /// The Lease.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Creating or replacing the Lease failed for a reason other than a lost race.
    #[error("failed to write Lease {name}")]
    Write {
        /// The Lease.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// The outcome of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This instance holds the Lease now.
    Leading,
    /// Another instance holds it and it has not expired.
    HeldBy(String),
    /// Another writer changed the Lease between our read and our write.
    Conflict,
}

/// The Lease as this instance last saw it, and when it first saw that version.
struct Observed {
    lease: Lease,
    since: Instant,
}

/// One instance's handle on the Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Option<Observed>,
}

impl LeaseLock {
    /// A handle on Lease `name` in the namespace of `api`, for the instance `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: None,
        }
    }

    /// This instance's identity in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Makes one attempt to take or keep the Lease; see the module documentation.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let started = Instant::now();
        let now = MicroTime(Timestamp::now());
        let current = self.read().await?;
        let Some(current) = current else {
            return self.create(now, started).await;
        };
        self.observe(&current, started);

        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if let Some(holder) = holder.filter(|_| !ours)
            && !self.expired(&spec, Instant::now())
        {
            return Ok(Attempt::HeldBy(holder));
        }

        let mut wanted = current.clone();
        wanted.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            renew_time: Some(now.clone()),
            acquire_time: match ours {
                true => spec.acquire_time.clone().or(Some(now.clone())),
                false => Some(now),
            },
            lease_transitions: match ours {
                true => spec.lease_transitions,
                false => Some(spec.lease_transitions.unwrap_or(0).saturating_add(1)),
            },
            ..spec
        });
        self.replace(&wanted, started).await
    }

    /// The Lease as it is now, if it exists.
    async fn read(&self) -> Result<Option<Lease>, LeaseError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaseError::Read {
                name: self.name.clone(),
                source,
            })
    }

    /// Gives the Lease up if this instance holds it, so a standby need not wait for it to
    /// expire. A Lease held by someone else is left alone.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let current = self.read().await?;
        let Some(mut lease) = current else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.replace(&lease, Instant::now()).await? {
            Attempt::Leading | Attempt::Conflict | Attempt::HeldBy(_) => Ok(()),
        }
    }

    async fn create(&mut self, now: MicroTime, started: Instant) -> Result<Attempt, LeaseError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.duration_seconds()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match self.api.create(&params, &lease).await {
            Ok(created) => {
                self.observe(&created, started);
                Ok(Attempt::Leading)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(source) => Err(LeaseError::Write {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Replaces the Lease with `wanted`, whose `resourceVersion` is the one read: the
    /// API server refuses the write if anyone wrote in between.
    async fn replace(&mut self, wanted: &Lease, started: Instant) -> Result<Attempt, LeaseError> {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match self.api.replace(&self.name, &params, wanted).await {
            Ok(written) => {
                self.observe(&written, started);
                let holder = written.spec.and_then(|s| s.holder_identity);
                Ok(match holder {
                    Some(holder) if holder == self.identity => Attempt::Leading,
                    Some(holder) => Attempt::HeldBy(holder),
                    None => Attempt::Conflict,
                })
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(source) => Err(LeaseError::Write {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Remembers `lease`; the clock of its expiry restarts only when its version changed.
    fn observe(&mut self, lease: &Lease, at: Instant) {
        let changed = self.observed.as_ref().is_none_or(|seen| {
            seen.lease.metadata.resource_version != lease.metadata.resource_version
                || seen.lease.spec != lease.spec
        });
        if changed {
            self.observed = Some(Observed {
                lease: lease.clone(),
                since: at,
            });
        }
    }

    /// Whether the version of the Lease last seen has gone unchanged for its duration.
    fn expired(&self, spec: &LeaseSpec, now: Instant) -> bool {
        let Some(seen) = &self.observed else {
            return false;
        };
        let seconds = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(self.timing.lease_duration.as_secs());
        now.duration_since(seen.since) >= Duration::from_secs(seconds)
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Waits until this instance holds the Lease, trying every retry period, and returns when
/// the winning attempt was sent. API errors are logged and retried.
pub async fn acquire(lock: &mut LeaseLock) -> Instant {
    let mut last_holder = None;
    loop {
        let started = Instant::now();
        match lock.try_acquire_or_renew().await {
            Ok(Attempt::Leading) => return started,
            Ok(Attempt::HeldBy(holder)) => {
                if last_holder.as_ref() != Some(&holder) {
                    tracing::info!(leader = %holder, "Standing by: another instance leads");
                    last_holder = Some(holder);
                }
            }
            Ok(Attempt::Conflict) => {}
            Err(error) => {
                let error = super::error::chain(&error);
                tracing::warn!(%error, "Cannot take part in the leader election; retrying");
            }
        }
        tokio::time::sleep(lock.timing.retry_period).await;
    }
}

/// Renews the Lease every retry period for as long as that works; returns when this
/// instance must stop acting as leader. `acquired` is when the attempt that won (or last
/// renewed) the Lease was sent.
pub async fn keep_leading(lock: &mut LeaseLock, acquired: Instant) -> LeaseLost {
    let timing = lock.timing;
    let mut renewed = acquired;
    loop {
        let deadline = renewed + timing.renew_deadline;
        tokio::time::sleep_until((Instant::now() + timing.retry_period).min(deadline)).await;
        if Instant::now() >= deadline {
            return LeaseLost::RenewDeadlinePassed;
        }
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, lock.try_acquire_or_renew()).await {
            Ok(Ok(Attempt::Leading)) => renewed = started,
            Ok(Ok(Attempt::HeldBy(holder))) => return LeaseLost::TakenBy(holder),
            // Perhaps our own write whose answer was lost: read again next time.
            Ok(Ok(Attempt::Conflict)) => {}
            Ok(Err(error)) => {
                let error = super::error::chain(&error);
                tracing::warn!(%error, "Failed to renew the leader Lease; retrying");
            }
            Err(_) => return LeaseLost::RenewDeadlinePassed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_timing_stops_a_leader_before_its_lease_can_be_taken() {
        assert_eq!(LeaseTiming::default().check(), Ok(()));
        let late = LeaseTiming {
            renew_deadline: Duration::from_secs(15),
            ..LeaseTiming::default()
        };
        assert!(late.check().is_err());
        let idle = LeaseTiming {
            retry_period: Duration::from_secs(10),
            ..LeaseTiming::default()
        };
        assert!(idle.check().is_err());
    }
}
