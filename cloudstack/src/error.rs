//! Errors of CloudStack calls, classified the way CloudStack says to treat them (docs/cloudstack.md).

use std::time::Duration;

/// What went wrong talking to CloudStack. Every variant names the API command or job.
#[derive(Debug, thiserror::Error)]
pub enum CloudStackError {
    /// CloudStack answered with an error (HTTP status = its error code).
    #[error("CloudStack {command} failed with {code}{}: {text}", cserrorcode.map(|c| format!(" (cserrorcode {c})")).unwrap_or_default())]
    Api {
        command: String,
        code: u16,
        cserrorcode: Option<u32>,
        text: String,
    },
    /// The request may or may not have reached CloudStack (connection refused, reset, timeout).
    #[error("CloudStack {command}: request failed: {source}")]
    Transport {
        command: String,
        #[source]
        source: reqwest::Error,
    },
    /// Something in front of CloudStack (a load balancer, a proxy, the servlet container)
    /// answered with an HTTP error and no CloudStack error object: whether CloudStack acted is
    /// unknown, as after a lost connection.
    #[error("CloudStack {command}: HTTP {status} from in front of CloudStack: {text}")]
    Gateway {
        command: String,
        status: u16,
        text: String,
    },
    /// CloudStack answered something we cannot read.
    #[error("CloudStack {command}: unexpected response: {reason}")]
    Decode { command: String, reason: String },
    /// The async job ended in failure (`jobstatus` 2).
    #[error("CloudStack job {job_id} failed{}: {text}", code.map(|c| format!(" with {c}")).unwrap_or_default())]
    JobFailed {
        job_id: String,
        code: Option<u16>,
        text: String,
    },
    /// The async job was cancelled (`jobstatus` 3).
    #[error("CloudStack job {job_id} was cancelled")]
    JobCancelled { job_id: String },
    /// A wait (retries or job polling) passed its deadline.
    #[error("CloudStack {what} did not finish within {after:?}: {last}")]
    Deadline {
        what: String,
        /// The job still running at the deadline, if the wait was for one: it may still finish.
        job_id: Option<String>,
        after: Duration,
        last: String,
    },
}

/// Codes CloudStack documents as worth retrying (429 after its delay; the rest bounded).
const RETRYABLE_CODES: [u16; 5] = [429, 503, 530, 533, 534];

impl CloudStackError {
    /// CloudStack's error code, when it gave one.
    pub fn cloudstack_code(&self) -> Option<u16> {
        match self {
            Self::Api { code, .. } => Some(*code),
            Self::JobFailed { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether the same request may succeed if sent again: CloudStack said so by its code, or
    /// the request never got an answer. (A mutating call must reconcile before re-sending
    /// after a [`Transport`](Self::Transport) error: see [`Self::was_answered`].)
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { code, .. } => RETRYABLE_CODES.contains(code),
            Self::Transport { .. } | Self::Gateway { .. } => true,
            _ => false,
        }
    }

    /// Whether CloudStack said the entity does not exist: a 431 with the generic cserrorcode
    /// 9999 (or 4350) whose text says it found nothing, as CloudStack words an unknown id
    /// ("Unable to find …", "… entity does not exist …"). Any other 431 (a parameter refused, a
    /// permission missing) says nothing about existence.
    pub fn is_not_found(&self) -> bool {
        let Self::Api {
            code: 431,
            cserrorcode,
            text,
            ..
        } = self
        else {
            return false;
        };
        let text = text.to_ascii_lowercase();
        matches!(cserrorcode, Some(9999) | Some(4350) | None)
            && (text.contains("unable to find") || text.contains("entity does not exist"))
    }

    /// Whether the request timed out waiting for an answer: CloudStack may still be working on
    /// it, so a check of its effect right away can miss what it is about to do.
    pub fn timed_out(&self) -> bool {
        matches!(self, Self::Transport { source, .. } if source.is_timeout())
    }

    /// Whether CloudStack answered, so that we know whether it acted. A transport error
    /// leaves that unknown.
    pub fn was_answered(&self) -> bool {
        !matches!(self, Self::Transport { .. } | Self::Gateway { .. })
    }

    /// The delay a 429 asks for: "...please retry after [N] ms." (there is no Retry-After
    /// header).
    pub fn retry_after(&self) -> Option<Duration> {
        let Self::Api {
            code: 429, text, ..
        } = self
        else {
            return None;
        };
        let lower = text.to_ascii_lowercase();
        let rest = &lower[lower.find("retry after")? + "retry after".len()..];
        let digits: String = rest
            .trim_start_matches([' ', '['])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok().map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, text: &str) -> CloudStackError {
        CloudStackError::Api {
            command: "createVolume".into(),
            code,
            cserrorcode: Some(4545),
            text: text.into(),
        }
    }

    #[test]
    fn reads_the_delay_out_of_a_429() {
        let e = api(
            429,
            "The given command 'createVolume' has reached the API rate limit. Please retry after [1200] ms.",
        );
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1200)));
        assert_eq!(
            api(429, "please retry after 50 ms").retry_after(),
            Some(Duration::from_millis(50))
        );
        assert_eq!(api(429, "slow down").retry_after(), None);
        assert_eq!(api(530, "retry after [5] ms").retry_after(), None);
    }

    #[test]
    fn classifies_codes() {
        for code in RETRYABLE_CODES {
            assert!(api(code, "x").is_transient(), "{code}");
        }
        for code in [401, 430, 431, 432, 531, 532, 535, 536, 537] {
            assert!(!api(code, "x").is_transient(), "{code}");
        }
    }
}
