//! The device monitor and correlation (CONTRACT §7, CLOUDSTACK §5).
//!
//! - [`scan`]: one read of `$SYSFS_ROOT/block`.
//! - [`monitor`]: the polling loop; publishes the device table and change events.
//! - [`correlate`]: [`Devices`], the handle operations use to find a volume's device.
//! - [`sync`]: keeps `device_mappings` current when mapped devices vanish or reappear.
//! - [`uevents`]: the kernel's uevent socket, which makes the monitor rescan at once.
//! - [`loops`]: real loop devices for the monitor's tests and benchmark.

pub mod correlate;
pub mod loops;
pub mod monitor;
pub mod scan;
pub mod sync;
pub mod uevents;

#[cfg(test)]
pub(crate) mod test_tree;

pub use correlate::{Devices, Expectation, Found, MatchedBy, MonitorState};
pub use monitor::{DeviceChange, DeviceEvent, DeviceTable, Monitor, MonitorMode};
pub use scan::NameFilter;
