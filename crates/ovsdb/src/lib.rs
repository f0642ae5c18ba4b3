//! evio-ovsdb
