//! The per-VM monitor: KVM VM and vCPUs, guest memory, exit handling and device wiring.
//!
//! Entry point: [`builder::run`] with a [`config::VmConfig`], a [`console::Console`] and a
//! [`stop::StopHandle`]:
//!
//! ```no_run
//! use vmm::{builder, config::VmConfig, console::Console};
//! let config = VmConfig { kernel: "vmlinux".into(), ..VmConfig::default() };
//! let console = Console::new(Box::new(std::io::stdout())).unwrap();
//! let stop = vmm::StopHandle::new().unwrap();
//! let report = builder::run(&config, &console, &stop).unwrap();
//! println!("{:?}", report.outcome);
//! ```

pub mod boot;
pub mod builder;
pub mod clone;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
pub mod dirty;
pub mod disk_snapshot;
pub mod dump;
pub mod error;
pub mod gsi;
pub mod ioevent;
pub mod kick;
pub mod live;
pub mod memory;
pub mod migrate;
pub mod persist;
pub mod platform;
pub mod repair;
pub mod stats;
pub mod stop;
pub mod vcpu;
pub mod vm;
pub mod vm_snapshot;
pub mod vmgenid;

pub use builder::{run, run_with, Outcome, RunReport};
pub use config::{ConfigError, DiskConfig, RepairMode, VmConfig};
pub use console::{Console, ConsoleInput};
pub use error::VmmError;
pub use stop::StopHandle;
