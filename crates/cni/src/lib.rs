//! evio-cni
