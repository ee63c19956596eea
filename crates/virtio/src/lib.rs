//! virtio (under construction).
