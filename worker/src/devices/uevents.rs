//! Kernel uevents: the `NETLINK_KOBJECT_UEVENT` socket on which the kernel announces every
//! device it adds, changes or removes (how udev learns of hot-plugged disks; inotify does not
//! work on sysfs). The monitor rescans at once when a `block` event arrives, so the device
//! table stays the one source of truth: an event is only a reason to look, never read as a
//! state, and none can be lost or misread.
//!
//! The socket comes from `rustix` (a safe wrapper of the system calls). It is read by a thread
//! of its own with blocking receives (a receive timeout lets it notice a stop), which wakes the
//! monitor through a `Notify`: a burst of events leaves one permit, so it costs one rescan. It
//! joins the kernel's multicast group 1 (udev's own re-broadcasts go to group 2 and are not
//! listened to). Opening it needs no privilege.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::sockopt::Timeout;
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType};
use tokio::sync::Notify;

/// How often the listener thread looks at its stop flag.
const RECV_TIMEOUT: Duration = Duration::from_millis(200);
/// The kernel's uevent multicast group.
const KERNEL_GROUP: u32 = 1;
/// Socket receive buffer: a burst of hot-plugs fits (the kernel default is ~200 KiB).
const RECV_BUFFER: usize = 1 << 20;
/// A uevent datagram is at most a few KiB (the kernel's limit is 2 KiB of environment).
const DATAGRAM: usize = 8 * 1024;

/// One kernel uevent, as far as the monitor cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `add`, `remove`, `change`, ...
    pub action: String,
    /// `/devices/virtual/block/loop0`.
    pub devpath: String,
    pub subsystem: Option<String>,
    /// `loop0`, `vdb`.
    pub devname: Option<String>,
}

impl Uevent {
    /// Whether this is about a block device (the only kind the monitor scans).
    pub fn is_block(&self) -> bool {
        self.subsystem.as_deref() == Some("block")
    }
}

/// Reads a kernel uevent datagram: `ACTION@DEVPATH` then `KEY=VALUE` fields, NUL-separated.
/// `None` for anything else (udev's binary `libudev` messages never reach group 1).
pub fn parse(datagram: &[u8]) -> Option<Uevent> {
    let mut fields = datagram.split(|b| *b == 0).filter(|f| !f.is_empty());
    let header = std::str::from_utf8(fields.next()?).ok()?;
    let (action, devpath) = header.split_once('@')?;
    let mut event = Uevent {
        action: action.to_owned(),
        devpath: devpath.to_owned(),
        subsystem: None,
        devname: None,
    };
    for field in fields {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        match field.split_once('=') {
            Some(("SUBSYSTEM", v)) => event.subsystem = Some(v.to_owned()),
            Some(("DEVNAME", v)) => event.devname = Some(v.to_owned()),
            _ => {}
        }
    }
    Some(event)
}

/// What one receive gave.
#[derive(Debug)]
pub enum Received {
    Event(Uevent),
    /// The kernel dropped events because the buffer was full (`ENOBUFS`): something changed,
    /// what is unknown. A rescan answers it.
    Overflow,
}

/// The open socket (blocking, with a receive timeout).
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl UeventSocket {
    /// Opens and binds the socket. Fails where uevents cannot be had (no netlink in a sandbox,
    /// a seccomp filter): the monitor then polls.
    pub fn open() -> io::Result<Self> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        // A larger buffer is a wish, not a need (the size is capped by rmem_max).
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, RECV_BUFFER);
        rustix::net::sockopt::set_socket_timeout(&fd, Timeout::Recv, Some(RECV_TIMEOUT))?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        Ok(Self {
            fd,
            buf: vec![0; DATAGRAM],
        })
    }

    /// One datagram, waiting at most the receive timeout (`None` then, or for a datagram that
    /// is not a uevent).
    pub fn recv(&mut self) -> io::Result<Option<Received>> {
        match rustix::net::recv(&self.fd, &mut self.buf[..], RecvFlags::empty()) {
            Ok((n, _)) => Ok(parse(&self.buf[..n]).map(Received::Event)),
            Err(rustix::io::Errno::NOBUFS) => Ok(Some(Received::Overflow)),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the socket on a thread of its own until the feed is dropped.
    pub fn listen(mut self) -> UeventFeed {
        let shared = Arc::new(Shared::default());
        let thread = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("uevents".into())
            .spawn(move || {
                while !thread.stop.load(Ordering::Relaxed) {
                    match self.recv() {
                        Ok(Some(Received::Event(e))) if e.is_block() => thread.due.notify_one(),
                        Ok(Some(Received::Overflow)) => thread.due.notify_one(),
                        Ok(_) => {}
                        Err(e) => {
                            *thread.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(e.to_string());
                            thread.due.notify_one();
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            *shared.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("cannot start the uevent thread: {e}"));
        }
        UeventFeed { shared }
    }
}

#[derive(Debug, Default)]
struct Shared {
    due: Notify,
    stop: AtomicBool,
    failed: Mutex<Option<String>>,
}

/// Block uevents as wake-ups for the monitor.
#[derive(Debug)]
pub struct UeventFeed {
    shared: Arc<Shared>,
}

impl UeventFeed {
    /// Waits until a scan is due (a block event, or events lost). `Err` when the socket
    /// failed: the monitor polls from then on.
    pub async fn due(&self) -> Result<(), String> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.shared.due.notified().await;
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn failure(&self) -> Option<String> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for UeventFeed {
    fn drop(&mut self) {
        // The thread sees it within the receive timeout and ends.
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_datagram_reads_as_its_action_path_and_fields() {
        let raw = b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0MAJOR=7\0MINOR=0\0DEVNAME=loop0\0DEVTYPE=disk\0SEQNUM=4711\0";
        let e = parse(raw).expect("a uevent");
        assert_eq!(e.action, "change");
        assert_eq!(e.devpath, "/devices/virtual/block/loop0");
        assert_eq!(e.devname.as_deref(), Some("loop0"));
        assert!(e.is_block());
        let net =
            parse(b"add@/devices/virtual/net/veth0\0ACTION=add\0SUBSYSTEM=net\0").expect("net");
        assert!(!net.is_block());
        assert_eq!(parse(b"libudev\0\xfe\xed\xca\xfe"), None);
        assert_eq!(parse(b""), None);
    }

    /// A real kernel event on a real socket: a loop device attached to a sparse file.
    #[tokio::test]
    async fn the_socket_receives_the_kernels_block_event_for_a_loop_device() {
        let mut socket = UeventSocket::open().expect("a uevent socket opens here");
        let mut loops = crate::devices::loops::Loops::new();
        let name = loops.attach(1).await[0].clone();
        let seen = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(Received::Event(e))) = socket.recv()
                    && e.is_block()
                    && e.devname.as_deref() == Some(name.as_str())
                {
                    return true;
                }
            }
            false
        })
        .await
        .expect("the receiving thread");
        loops.detach().await;
        assert!(seen, "the kernel announced the loop device within 5 s");
    }
}

#[cfg(test)]
mod burst {
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::UeventSocket;
    use crate::devices::loops::Loops;
    use crate::devices::{Monitor, MonitorMode};

    /// 32 loop devices attached at once, then detached at once: the table ends with exactly
    /// the 32, then with none of them (detached loop devices stay in `/sys/block` with size 0).
    async fn burst_of_32(uevents: bool) {
        let mut loops = Loops::new();
        let mut monitor = Monitor::new(PathBuf::from("/sys"), Duration::from_millis(250))
            .with_filter(loops.filter());
        if uevents {
            monitor = monitor.with_uevents(UeventSocket::open().expect("a uevent socket"));
        }
        let mode = *monitor.mode().borrow();
        assert_eq!(mode == MonitorMode::Uevents, uevents);
        let mut table = monitor.table();
        let stop = CancellationToken::new();
        let task = tokio::spawn(monitor.run(stop.clone()));

        let names: BTreeSet<String> = loops.attach(32).await.into_iter().collect();
        assert_eq!(names.len(), 32);
        let seen =
            |t: &crate::devices::DeviceTable| t.devices.keys().cloned().collect::<BTreeSet<_>>();
        tokio::time::timeout(Duration::from_secs(5), table.wait_for(|t| seen(t) == names))
            .await
            .expect("the table holds exactly the 32 devices")
            .expect("monitor running");
        loops.detach().await;
        tokio::time::timeout(
            Duration::from_secs(5),
            table.wait_for(|t| t.devices.is_empty()),
        )
        .await
        .expect("the table ends empty")
        .expect("monitor running");
        // Each name is no longer ours; unless another test attached it again meanwhile (loop
        // names are reused at once), it is still in /sys/block with size 0.
        let ours = loops.filter();
        for name in &names {
            assert!(
                !ours.admits(name),
                "{name} is still backed by this test's file"
            );
            let reused =
                std::path::Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists();
            let size =
                std::fs::read_to_string(format!("/sys/block/{name}/size")).unwrap_or_default();
            assert!(
                reused || matches!(size.trim(), "0" | ""),
                "{name} detached: size {size:?}"
            );
        }
        stop.cancel();
        let _ = task.await;
    }

    #[tokio::test]
    async fn a_burst_of_32_loop_devices_ends_exactly_right_with_uevents() {
        burst_of_32(true).await;
    }

    #[tokio::test]
    async fn a_burst_of_32_loop_devices_ends_exactly_right_polling() {
        burst_of_32(false).await;
    }
}
