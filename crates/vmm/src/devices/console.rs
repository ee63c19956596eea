//! virtio-console (hvc0), a second console next to the serial port: configuration, per-run resources and wiring.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio::VirtioPciDevice;

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

/// `--virtio-console` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// The option string, until the device defines its fields.
    pub spec: String,
}

impl ConsoleConfig {
    /// Parse the `--virtio-console` syntax.
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            spec: spec.to_string(),
        })
    }

    /// Check what can be checked before opening anything.
    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Host resources of the device, opened once per run.
pub struct OpenConsole {}

/// Open the host side.
pub fn open(cfg: &ConsoleConfig) -> Result<OpenConsole, VmmError> {
    let _ = cfg;
    Err(VmmError::NotSupported("--virtio-console is not built yet"))
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenConsole,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let _ = (open, ctx);
    Err(VmmError::NotSupported("--virtio-console is not built yet"))
}
