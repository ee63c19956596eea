//! disk (under construction).
