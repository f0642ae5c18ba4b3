//! `evio-node` as a library: one module per subcommand, plus the
//! net-conf.json parsers they share. The binary (`main.rs`) only
//! dispatches; the fuzz targets link the parsers from here, so what is
//! fuzzed is exactly what ships.

pub mod agent;
pub mod config_gen;
pub mod conflist;
pub mod doctor;
pub mod error;
pub mod install_cni;
pub mod netconf;
pub mod nodes;
pub mod overlay;
pub mod peers;
pub mod run;
pub mod store_args;
pub mod subnets;
pub mod uninstall;
