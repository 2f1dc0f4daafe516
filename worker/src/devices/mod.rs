//! The device monitor and correlation (docs/host.md): sysfs is read here, nothing is written
//! to the database (the mapping sync that records what the monitor sees is
//! `operation::mapping_sync`).
//!
//! - [`scan`]: one read of `$SYSFS_ROOT/block`.
//! - [`monitor`]: the polling loop; publishes the device table and change events.
//! - [`correlate`]: [`Devices`], the handle operations use to find a volume's device.
//! - [`uevents`]: the kernel's uevent socket, which makes the monitor rescan at once.
//! - [`loops`]: real loop devices for the monitor's tests and benchmark.

pub mod correlate;
pub mod loops;
pub mod monitor;
pub mod scan;
pub mod uevents;

#[cfg(test)]
pub(crate) mod test_tree;

pub use correlate::{Devices, Expectation, Found, MatchedBy, MonitorState};
pub use monitor::{DeviceChange, DeviceEvent, DeviceTable, Monitor, MonitorMode};
pub use scan::NameFilter;
