//! Fault injection: what the simulator does wrong on purpose, changeable at run time
//! (`POST /sim/faults` or [`crate::Sim::set_faults`]).

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::state::ApiError;

/// The simulator's bad days. The default is a perfect cloud.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added before every API call is handled.
    pub latency_ms: u64,
    /// HTTP error code → probability per call, decided before the call is processed (so the
    /// call had no effect). Codes: 429, 503, 530, 533, 534 and any other CloudStack code.
    pub error_rates: BTreeMap<u16, f64>,
    /// The delay a 429 asks for ("...please retry after [N] ms.").
    pub retry_after_ms: u64,
    /// Probability that an async job ends in failure (jobstatus 2, errorcode 530).
    pub job_failure_rate: f64,
    /// Probability that the connection drops after a mutating call was processed (the
    /// client cannot tell whether it acted).
    pub drop_after_processing_rate: f64,
    /// Drop the connection after processing the next N calls of each command (lowercase
    /// name), whatever the rate.
    pub drop_next: BTreeMap<String, u32>,
    /// Lowercase commands the error rates apply to; empty means every command.
    pub commands: Vec<String>,
    /// Lose the next N calls of each command (lowercase name): the connection breaks before
    /// the call is processed (a request lost on its way: nothing happened, the client cannot
    /// tell).
    pub lose_next: BTreeMap<String, u32>,
    /// The next call of each command (lowercase name) acts `act_after_ms` after it arrived and
    /// answers `answer_after_ms` after it arrived, as a loaded CloudStack does: it acts even
    /// when the client has gone by then. Used once.
    pub slow_next: BTreeMap<String, SlowCall>,
    /// CloudStack's clock minus the real one, in ms: a volume made by createVolume reports
    /// `created` shifted by it (a management server whose clock is behind is negative).
    pub clock_offset_ms: i64,
}

/// When a slow call acts and when it answers, from its arrival.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowCall {
    pub act_after_ms: u64,
    pub answer_after_ms: u64,
}

/// Commands that change something: a dropped answer leaves the client unsure.
pub fn is_mutating(command: &str) -> bool {
    matches!(
        command,
        "createvolume"
            | "attachvolume"
            | "detachvolume"
            | "deletevolume"
            | "createsnapshot"
            | "revertsnapshot"
            | "deletesnapshot"
            | "resizevolume"
    )
}

impl Faults {
    /// An injected error for this call, if the dice say so.
    pub fn injected_error(&self, command: &str) -> Option<ApiError> {
        if !self.commands.is_empty() && !self.commands.iter().any(|c| c == command) {
            return None;
        }
        let mut rng = rand::rng();
        let roll: f64 = rng.random();
        let mut acc = 0.0;
        for (&code, &rate) in &self.error_rates {
            acc += rate;
            if roll < acc {
                return Some(self.error(code, command));
            }
        }
        None
    }

    fn error(&self, code: u16, command: &str) -> ApiError {
        let (cs, text) = match code {
            429 => (
                Some(4545),
                format!(
                    "The given command '{command}' has reached the API rate limit. Please retry after [{}] ms.",
                    self.retry_after_ms
                ),
            ),
            503 => (
                None,
                "Service Unavailable: the management server is in maintenance".to_owned(),
            ),
            530 => (
                Some(4250),
                "Internal error executing command, please contact your system administrator"
                    .to_owned(),
            ),
            533 => (
                Some(4325),
                "Insufficient capacity to satisfy the request".to_owned(),
            ),
            534 => (Some(4380), "Resource unavailable, please retry".to_owned()),
            other => (Some(9999), format!("Injected error {other}")),
        };
        ApiError {
            code,
            cserrorcode: cs,
            text,
        }
    }

    /// Whether to drop the connection after processing this call (consumes `drop_next`).
    pub fn take_drop(&mut self, command: &str) -> bool {
        if !is_mutating(command) {
            return false;
        }
        if let Some(n) = self.drop_next.get_mut(command)
            && *n > 0
        {
            *n -= 1;
            return true;
        }
        self.drop_after_processing_rate > 0.0
            && rand::rng().random::<f64>() < self.drop_after_processing_rate
    }

    pub fn job_fails(&self) -> bool {
        self.job_failure_rate > 0.0 && rand::rng().random::<f64>() < self.job_failure_rate
    }
}

/// Parses `429=0.3` (CLI form of an error rate).
pub fn parse_rate(s: &str) -> Result<(u16, f64), String> {
    let (code, rate) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected CODE=RATE, e.g. 429=0.3"))?;
    let code: u16 = code
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {code:?} is not an HTTP code"))?;
    let rate: f64 = rate
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {rate:?} is not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("{s:?}: the rate must be between 0 and 1"));
    }
    Ok((code, rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_429_names_its_delay() {
        let f = Faults {
            retry_after_ms: 250,
            ..Faults::default()
        };
        let e = f.error(429, "createVolume");
        assert_eq!(e.code, 429);
        assert!(
            e.text.ends_with("Please retry after [250] ms."),
            "{}",
            e.text
        );
    }

    #[test]
    fn certain_and_impossible_errors() {
        let mut f = Faults::default();
        f.error_rates.insert(503, 1.0);
        assert_eq!(f.injected_error("listvolumes").map(|e| e.code), Some(503));
        f.commands = vec!["createvolume".into()];
        assert_eq!(f.injected_error("listvolumes"), None);
        assert!(Faults::default().injected_error("createvolume").is_none());
    }

    #[test]
    fn drop_next_counts_down_and_skips_reads() {
        let mut f = Faults::default();
        f.drop_next.insert("createvolume".into(), 1);
        assert!(!f.take_drop("listvolumes"));
        assert!(f.take_drop("createvolume"));
        assert!(!f.take_drop("createvolume"));
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("429=0.3"), Ok((429, 0.3)));
        assert!(parse_rate("429").is_err());
        assert!(parse_rate("x=0.1").is_err());
        assert!(parse_rate("503=2").is_err());
    }
}
