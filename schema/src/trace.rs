//! W3C Trace Context (`traceparent`, `tracestate`) as a command carries it in its AMQP headers
//! and an event carries it back (docs/wire.md, "Trace context"): the same trace id, the
//! daemon's operation span as parent, `tracestate` verbatim.

use serde::{Deserialize, Serialize};

/// A trace context: a valid `traceparent` and, optionally, its `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// Why a `traceparent` was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("traceparent {0:?} is not `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`")]
    Malformed(String),
    #[error("traceparent {0:?} has an all-zero trace or parent id")]
    Zero(String),
    #[error("tracestate is {0} bytes; at most 512")]
    StateTooLong(usize),
}

/// The longest `tracestate` kept (W3C: 32 list members; in practice well under 512 bytes).
const MAX_STATE: usize = 512;

impl TraceContext {
    /// Validates a `traceparent` (version 00, lowercase hex, non-zero ids) and a `tracestate`.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceError> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let [version, trace, parent, flags] = parts[..] else {
            return Err(TraceError::Malformed(traceparent.into()));
        };
        if version != "00" || !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
            return Err(TraceError::Malformed(traceparent.into()));
        }
        if trace.bytes().all(|b| b == b'0') || parent.bytes().all(|b| b == b'0') {
            return Err(TraceError::Zero(traceparent.into()));
        }
        let tracestate = tracestate.map(str::trim).filter(|s| !s.is_empty());
        if let Some(state) = tracestate
            && state.len() > MAX_STATE
        {
            return Err(TraceError::StateTooLong(state.len()));
        }
        Ok(Self {
            traceparent: traceparent.trim().to_owned(),
            tracestate: tracestate.map(str::to_owned),
        })
    }

    /// The trace id (32 hex digits).
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent span id (16 hex digits).
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// The trace flags (2 hex digits; `01`: sampled).
    pub fn flags(&self) -> &str {
        &self.traceparent[53..55]
    }

    /// The same trace with `span` (16 hex digits, not all zero) as the parent: what the
    /// daemon's operation span passes on. `tracestate` is kept verbatim.
    pub fn child(&self, span: &str) -> Self {
        let flags = &self.traceparent[53..55];
        Self {
            traceparent: format!("00-{}-{span}-{flags}", self.trace_id()),
            tracestate: self.tracestate.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_and_a_child_keeps_the_trace_id_and_state() {
        let t = TraceContext::parse(GOOD, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = t.child("a1b2c3d4e5f60718");
        assert_eq!(
            child.traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-a1b2c3d4e5f60718-01"
        );
        assert_eq!(child.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_or_zero_traceparents_and_huge_states_are_refused() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(
                matches!(
                    TraceContext::parse(bad, None),
                    Err(TraceError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        let zero = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        assert!(matches!(
            TraceContext::parse(zero, None),
            Err(TraceError::Zero(_))
        ));
        let huge = "k=v,".repeat(200);
        assert!(matches!(
            TraceContext::parse(GOOD, Some(&huge)),
            Err(TraceError::StateTooLong(_))
        ));
    }
}
