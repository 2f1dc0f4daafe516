//! Identifiers. Each is parsed once at the edge; inside the system a value of these types is
//! known to be well formed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be 1 to 64 characters, got {0}")]
    Length(usize),
    #[error("contains {0:?}; only A-Z a-z 0-9 . _ : - are allowed")]
    Character(char),
    #[error("{0:?} is not a UUID")]
    NotUuid(String),
}

/// The idempotency key of a command; it also becomes the operation id.
/// 1–64 characters of `[A-Za-z0-9._:-]` (docs/wire.md).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommandId(String);

impl CommandId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let len = s.chars().count();
        if !(1..=64).contains(&len) {
            return Err(IdError::Length(len));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(IdError::Character(c));
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh random id (a UUID), for producers that have none of their own.
    pub fn random() -> Self {
        Self(Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CommandId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for CommandId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl schemars::JsonSchema for CommandId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CommandId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[A-Za-z0-9._:-]{1,64}$",
            "description": "1-64 characters of [A-Za-z0-9._:-]: the idempotency key"
        })
    }
}

impl<'de> Deserialize<'de> for CommandId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Declares a UUID-valued CloudStack identifier. CloudStack prints UUIDs in lowercase
/// hyphenated form, and so do we.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub fn parse(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError::NotUuid(s.chars().take(80).collect()))
            }
            pub const fn from_uuid(u: Uuid) -> Self {
                Self(u)
            }
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        /// For columns and fields read as text (`#[sqlx(try_from = "String")]`).
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)
            }
        }
    };
}

uuid_id!(
    /// A CloudStack volume.
    VolumeId
);
uuid_id!(
    /// A CloudStack virtual machine.
    VmId
);
uuid_id!(
    /// A CloudStack zone.
    ZoneId
);
uuid_id!(
    /// A CloudStack disk offering.
    DiskOfferingId
);
uuid_id!(
    /// A CloudStack volume snapshot.
    SnapshotId
);
uuid_id!(
    /// A CloudEvent id: stable across re-publication, so subscribers dedupe on it.
    EventId
);

impl VolumeId {
    /// The disk serial CloudStack gives this volume's virtio disk: the UUID without dashes,
    /// first 20 characters (docs/cloudstack.md).
    pub fn disk_serial(&self) -> String {
        self.0.simple().to_string()[..20].to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_id_accepts_the_allowed_alphabet() {
        for ok in ["a", "cmd-1", "A.b_c:d-9", &"x".repeat(64)] {
            assert!(CommandId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn command_id_rejects_empty_long_and_odd_characters() {
        assert_eq!(CommandId::parse(""), Err(IdError::Length(0)));
        assert_eq!(CommandId::parse(&"x".repeat(65)), Err(IdError::Length(65)));
        assert_eq!(CommandId::parse("a b"), Err(IdError::Character(' ')));
        assert_eq!(CommandId::parse("a/b"), Err(IdError::Character('/')));
        assert_eq!(CommandId::parse("é"), Err(IdError::Character('é')));
    }

    #[test]
    fn disk_serial_is_the_first_twenty_hex_digits() {
        let id = VolumeId::parse("3106013a-e175-423e-a090-1234567890ab").expect("uuid");
        assert_eq!(id.disk_serial(), "3106013ae175423ea090");
    }

    #[test]
    fn uuid_ids_print_lowercase_hyphenated() {
        let id = VmId::parse("3106013A-E175-423E-A090-1234567890AB").expect("uuid");
        assert_eq!(id.to_string(), "3106013a-e175-423e-a090-1234567890ab");
        assert!(VmId::parse("not-a-uuid").is_err());
    }
}
