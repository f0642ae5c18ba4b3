//! evio-subnet
