//! BMC power drivers (being written).
