//! virtio-net over a host TAP device: configuration, per-run resources and wiring.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio::VirtioPciDevice;

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

/// `--net` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetConfig {
    /// The option string, until the device defines its fields.
    pub spec: String,
}

impl NetConfig {
    /// Parse the `--net` syntax.
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
pub struct OpenNet {}

/// Open the host side.
pub fn open(cfg: &NetConfig, index: usize, vm: &VmConfig) -> Result<OpenNet, VmmError> {
    let _ = (cfg, index, vm);
    Err(VmmError::NotSupported("--net is not built yet"))
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenNet,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let _ = (open, ctx);
    Err(VmmError::NotSupported("--net is not built yet"))
}
