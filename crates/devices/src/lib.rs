//! devices (under construction).
