//! pci (under construction).
