//! Error codes of failed events (docs/wire.md).

use serde::{Deserialize, Serialize};

/// What went wrong, as a subscriber can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    InvalidCommand,
    CloudstackInvalidParameter,
    CloudstackUnauthorized,
    CloudstackLimit,
    CloudstackUnavailable,
    CloudstackJobFailed,
    VolumeNotFound,
    SnapshotNotFound,
    VolumeInUse,
    DeviceCorrelationTimeout,
    Timeout,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        Self::InvalidCommand,
        Self::CloudstackInvalidParameter,
        Self::CloudstackUnauthorized,
        Self::CloudstackLimit,
        Self::CloudstackUnavailable,
        Self::CloudstackJobFailed,
        Self::VolumeNotFound,
        Self::SnapshotNotFound,
        Self::VolumeInUse,
        Self::DeviceCorrelationTimeout,
        Self::Timeout,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidCommand => "INVALID_COMMAND",
            Self::CloudstackInvalidParameter => "CLOUDSTACK_INVALID_PARAMETER",
            Self::CloudstackUnauthorized => "CLOUDSTACK_UNAUTHORIZED",
            Self::CloudstackLimit => "CLOUDSTACK_LIMIT",
            Self::CloudstackUnavailable => "CLOUDSTACK_UNAVAILABLE",
            Self::CloudstackJobFailed => "CLOUDSTACK_JOB_FAILED",
            Self::VolumeNotFound => "VOLUME_NOT_FOUND",
            Self::SnapshotNotFound => "SNAPSHOT_NOT_FOUND",
            Self::VolumeInUse => "VOLUME_IN_USE",
            Self::DeviceCorrelationTimeout => "DEVICE_CORRELATION_TIMEOUT",
            Self::Timeout => "TIMEOUT",
            Self::Internal => "INTERNAL",
        }
    }

    /// Whether sending the same command again (with a new `command_id`) may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::CloudstackLimit
                | Self::CloudstackUnavailable
                | Self::DeviceCorrelationTimeout
                | Self::Internal
        )
    }

    /// A one-line recovery suggestion for the operator.
    pub fn hint(self) -> &'static str {
        match self {
            Self::InvalidCommand => {
                "fix the command (see the message for the field) and publish it again"
            }
            Self::CloudstackInvalidParameter => "check the zone, disk offering and VM ids",
            Self::CloudstackUnauthorized => {
                "check the API and secret keys (CLOUDSTACK_* or the active ossea_configs row), \
                 and that this machine's clock is within 10 minutes of CloudStack's (a signed \
                 request expires 10 minutes after this clock's now)"
            }
            Self::CloudstackLimit => {
                "the account hit a CloudStack resource limit: free resources or raise the limit"
            }
            Self::CloudstackUnavailable => {
                "CloudStack was unavailable until the deadline: retry later"
            }
            Self::CloudstackJobFailed => {
                "read CloudStack's errortext; the management server log has the details"
            }
            Self::VolumeNotFound => "check the volume id: CloudStack does not know it",
            Self::SnapshotNotFound => {
                "check the snapshot id: it is not a snapshot of that volume (list them with `volumectl snapshots <volume>`)"
            }
            Self::VolumeInUse => "detach the volume from its VM first",
            Self::DeviceCorrelationTimeout => {
                "the volume is attached but no guest device appeared: check the VM's kernel log"
            }
            Self::Timeout => {
                "the operation passed its deadline and its job may still finish: check CloudStack's job list before acting again"
            }
            Self::Internal => "see the daemon's log for this operation id",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown error code {s:?}"))
    }
}

/// The `error` object of a failed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EventError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    pub cloudstack_error_code: Option<u16>,
    pub hint: String,
}

/// The most bytes a message or a hint keeps: CloudStack's `errortext` and a response quoted
/// in a message can be any length, and both end up in events and in a `TEXT` column.
pub const MAX_ERROR_TEXT: usize = 2048;

/// `text` cut to `max` bytes on a character boundary, with `…` added when cut.
pub fn cut_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `text` cut to [`MAX_ERROR_TEXT`] bytes.
fn bounded(text: String) -> String {
    cut_to(text, MAX_ERROR_TEXT)
}

impl EventError {
    /// An error with the code's own `retryable` flag and hint; the message is cut to
    /// [`MAX_ERROR_TEXT`] bytes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: bounded(message.into()),
            retryable: code.retryable(),
            cloudstack_error_code: None,
            hint: code.hint().to_owned(),
        }
    }

    /// A recovery suggestion more precise than the code's own (naming a job id, say), cut to
    /// [`MAX_ERROR_TEXT`] bytes.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = bounded(hint.into());
        self
    }

    pub fn with_cloudstack_code(mut self, code: Option<u16>) -> Self {
        self.cloudstack_error_code = code;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_of_any_length_is_cut_on_a_character_boundary() {
        let long = "é".repeat(5000);
        let e = EventError::new(ErrorCode::CloudstackJobFailed, long).with_hint("h".repeat(9000));
        assert!(e.message.len() <= MAX_ERROR_TEXT + '…'.len_utf8());
        assert!(e.message.ends_with('…'));
        assert!(e.hint.len() <= MAX_ERROR_TEXT + '…'.len_utf8());
        let short = EventError::new(ErrorCode::Internal, "short");
        assert_eq!(short.message, "short");
    }

    #[test]
    fn codes_serialize_as_the_contract_spells_them() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).expect("serialize");
            assert_eq!(json, serde_json::Value::from(code.as_str()));
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
    }
}
