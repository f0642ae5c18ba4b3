//! evio-net
