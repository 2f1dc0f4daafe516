//! The device monitor and correlation (CONTRACT §7, CLOUDSTACK §5).
//!
//! - [`scan`]: one read of `$SYSFS_ROOT/block`.
//! - [`monitor`]: the polling loop; publishes the device table and change events.
//! - [`correlate`]: [`Devices`], the handle operations use to find a volume's device.
//! - [`sync`]: keeps `device_mappings` current when mapped devices vanish or reappear.

pub mod correlate;
pub mod monitor;
pub mod scan;
pub mod sync;

#[cfg(test)]
pub(crate) mod test_tree;

pub use correlate::{Devices, Expectation, Found, MatchedBy, MonitorState};
pub use monitor::{DeviceChange, DeviceEvent, DeviceTable, Monitor};
