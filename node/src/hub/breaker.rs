//! A circuit breaker per target service (sans-IO: no clock, no network; the time is
//! passed in), used by the request/response client ([`super::rpc`]).
//!
//! * **Closed**: every call goes through; `failure_threshold` consecutive failures
//!   (timeouts, transport errors, retryable error answers) open the breaker. A success
//!   resets the count.
//! * **Open**: calls fail fast (`service_unavailable`, `breaker: open`) until the
//!   cool-down has passed since the breaker opened.
//! * **Half-open**: the first call after the cool-down is let through as the one probe;
//!   others fail fast while it runs. The probe's success closes the breaker, its failure
//!   opens it again for another cool-down. A probe that never reports (its caller gave
//!   up) counts as lost after one cool-down, and the next call becomes the probe.
//!
//! Outcomes of calls admitted *before* the breaker opened (they were already in flight)
//! do not close it: only a probe does.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before it lets a probe through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            cool_down: Duration::from_secs(5),
        }
    }
}

/// The breaker's state, as reported by the `gs_node_rpc_breaker_state` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    /// The gauge's value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        }
    }
}

/// Whether a call may go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Pass,
    /// Half-open: go ahead as the probe; its outcome decides the state.
    Probe,
    /// Open (or a probe is running): fail fast; the next probe is possible in `retry_in`.
    Reject { retry_in: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen { probe_since: Instant },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Inner,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Breaker {
        Breaker {
            cfg,
            inner: Inner::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Consecutive failures counted while closed.
    pub fn failures(&self) -> u32 {
        match self.inner {
            Inner::Closed { failures } => failures,
            _ => 0,
        }
    }

    /// Asks to send a call at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        let cool = self.cfg.cool_down;
        match self.inner {
            Inner::Closed { .. } => Admission::Pass,
            Inner::Open { since } | Inner::HalfOpen { probe_since: since } => {
                let ready = since + cool;
                if now >= ready {
                    self.inner = Inner::HalfOpen { probe_since: now };
                    Admission::Probe
                } else {
                    Admission::Reject {
                        retry_in: ready - now,
                    }
                }
            }
        }
    }

    /// Reports a call's success. `probe`: whether the call was admitted as the probe.
    pub fn success(&mut self, probe: bool) {
        match self.inner {
            Inner::Closed { .. } => self.inner = Inner::Closed { failures: 0 },
            Inner::HalfOpen { .. } if probe => self.inner = Inner::Closed { failures: 0 },
            // A call from before the breaker opened: only the probe decides.
            Inner::HalfOpen { .. } | Inner::Open { .. } => {}
        }
    }

    /// Reports a call's failure at `now`.
    pub fn failure(&mut self, now: Instant, probe: bool) {
        match self.inner {
            Inner::Closed { failures } => {
                let failures = failures + 1;
                self.inner = if failures >= self.cfg.failure_threshold.max(1) {
                    Inner::Open { since: now }
                } else {
                    Inner::Closed { failures }
                };
            }
            Inner::HalfOpen { .. } if probe => self.inner = Inner::Open { since: now },
            Inner::HalfOpen { .. } | Inner::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a scenario, at `t` ms after the start.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Ask to send; expect this admission (retry_in in ms for a rejection).
        Admit(u64, Expect),
        /// A call's outcome: `probe`, success?
        Ok(bool),
        Fail(u64, bool),
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        Pass,
        Probe,
        Reject(u64),
    }

    use Expect::*;
    use Step::*;

    fn run(name: &str, threshold: u32, steps: &[Step], end: BreakerState) {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            failure_threshold: threshold,
            cool_down: Duration::from_millis(1000),
        });
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Admit(t, want) => {
                    let got = match b.admit(t0 + Duration::from_millis(t)) {
                        Admission::Pass => Pass,
                        Admission::Probe => Probe,
                        Admission::Reject { retry_in } => Reject(retry_in.as_millis() as u64),
                    };
                    assert_eq!(got, want, "{name}: step {i} ({step:?}), state {b:?}");
                }
                Ok(probe) => b.success(probe),
                Fail(t, probe) => b.failure(t0 + Duration::from_millis(t), probe),
            }
        }
        assert_eq!(b.state(), end, "{name}: final state");
    }

    #[test]
    fn scenarios() {
        use BreakerState::{Closed as C, HalfOpen as H, Open as O};
        #[rustfmt::skip]
        let table: &[(&str, u32, &[Step], BreakerState)] = &[
            ("a new breaker lets calls through", 3,
             &[Admit(0, Pass), Ok(false), Admit(1, Pass)], C),
            ("failures below the threshold keep it closed", 3,
             &[Fail(0, false), Fail(1, false), Admit(2, Pass)], C),
            ("the threshold of consecutive failures opens it", 3,
             &[Fail(0, false), Fail(1, false), Fail(2, false), Admit(3, Reject(999))], O),
            ("a success resets the count", 3,
             &[Fail(0, false), Fail(1, false), Ok(false), Fail(3, false), Fail(4, false), Admit(5, Pass)], C),
            ("a threshold of 0 acts as 1", 0,
             &[Fail(10, false), Admit(10, Reject(1000))], O),
            ("open rejects until the cool-down, then one probe", 1,
             &[Fail(0, false), Admit(999, Reject(1)), Admit(1000, Probe)], H),
            ("while the probe runs, others fail fast", 1,
             &[Fail(0, false), Admit(1000, Probe), Admit(1001, Reject(999)), Admit(1500, Reject(500))], H),
            ("the probe's success closes it", 1,
             &[Fail(0, false), Admit(1000, Probe), Ok(true), Admit(1001, Pass)], C),
            ("the probe's failure opens it for another cool-down", 1,
             &[Fail(0, false), Admit(1000, Probe), Fail(1200, true), Admit(2199, Reject(1)), Admit(2200, Probe)], H),
            ("a lost probe is replaced after a cool-down", 1,
             &[Fail(0, false), Admit(1000, Probe), Admit(1999, Reject(1)), Admit(2000, Probe)], H),
            ("a success from before the opening does not close it", 2,
             &[Admit(0, Pass), Fail(1, false), Fail(2, false), Ok(false), Admit(3, Reject(999))], O),
            ("a success from before the opening does not close a half-open breaker", 1,
             &[Fail(0, false), Admit(1000, Probe), Ok(false), Admit(1001, Reject(999))], H),
            ("a failure from before the opening does not extend it", 1,
             &[Fail(0, false), Fail(500, false), Admit(1000, Probe)], H),
            ("a failure from before does not reopen a half-open breaker", 1,
             &[Fail(0, false), Admit(1000, Probe), Fail(1001, false), Ok(true), Admit(1002, Pass)], C),
            ("after closing, the count starts from zero", 2,
             &[Fail(0, false), Fail(0, false), Admit(1000, Probe), Ok(true), Fail(1001, false), Admit(1002, Pass)], C),
            ("closed again, it opens again at the threshold", 2,
             &[Fail(0, false), Fail(0, false), Admit(1000, Probe), Ok(true), Fail(1001, false), Fail(1002, false), Admit(1003, Reject(999))], O),
        ];
        for (name, threshold, steps, end) in table {
            run(name, *threshold, steps, *end);
        }
    }

    #[test]
    fn gauge_values() {
        assert_eq!(BreakerState::Closed.gauge(), 0.0);
        assert_eq!(BreakerState::HalfOpen.gauge(), 1.0);
        assert_eq!(BreakerState::Open.gauge(), 2.0);
    }
}
