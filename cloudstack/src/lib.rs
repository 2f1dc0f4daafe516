//! A client for the slice of Apache CloudStack's API that volume-daemon uses.
//!
//! - [`signing`]: request signatures exactly as CloudStack's `ApiServer` verifies them
//!   (docs/cloudstack.md). The simulator verifies with the same code; the public test
//!   vectors pin it down.
//! - [`response`]: CloudStack's JSON shapes, parsed into typed values.
//! - [`error`]: [`CloudStackError`], classified into retryable and final failures.
//! - [`client`]: [`Client`], signed calls with retries, and async-job polling.

pub mod client;
pub mod error;
pub mod response;
pub mod signing;

pub use client::{Client, Credentials, JobPolling, Observer, RetryPolicy};
pub use error::CloudStackError;
pub use response::{
    AsyncJob, DiskOffering, JobId, JobStatus, Snapshot, VirtualMachine, Volume, Zone,
};
