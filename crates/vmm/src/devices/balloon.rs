//! virtio-balloon with statistics, deflate-on-OOM and free page reporting: configuration, per-run resources and wiring.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio::VirtioPciDevice;

use super::AttachContext;
use crate::config::{ConfigError, VmConfig};
use crate::error::VmmError;

/// `--balloon` as given by the user.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BalloonConfig {
    /// The option string, until the device defines its fields.
    pub spec: String,
}

impl BalloonConfig {
    /// Parse the `--balloon` syntax.
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
pub struct OpenBalloon {}

/// Open the host side.
pub fn open(cfg: &BalloonConfig) -> Result<OpenBalloon, VmmError> {
    let _ = cfg;
    Err(VmmError::NotSupported("--balloon is not built yet"))
}

/// The control socket's handle on the balloon (`balloon-set`, `balloon-status`).
pub fn control(open: &OpenBalloon) -> Option<Arc<dyn crate::control::BalloonControl>> {
    let _ = open;
    None
}

/// Create the device for one VM instance and plug it in.
pub fn attach(
    open: &OpenBalloon,
    ctx: &AttachContext<'_>,
) -> Result<Arc<Mutex<VirtioPciDevice>>, VmmError> {
    let _ = (open, ctx);
    Err(VmmError::NotSupported("--balloon is not built yet"))
}
