//! Errors of the device models.

/// Everything that can go wrong building or restoring a legacy device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A persisted state does not describe a valid device (hostile or corrupt snapshot).
    #[error("Invalid {device} state: {reason}")]
    InvalidState {
        /// Which device rejected the state.
        device: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Creating an eventfd or a helper thread failed.
    #[error("Device setup failed: {0}")]
    Setup(#[from] std::io::Error),
}

impl DeviceError {
    /// Shorthand for [`DeviceError::InvalidState`].
    pub(crate) fn invalid_state(device: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidState {
            device,
            reason: reason.into(),
        }
    }
}
