//! Sluice: a Kubernetes operator for region-pinned SFTP/FTPS file-transfer gateways.
//!
//! One crate, one binary (`sluice`) with subcommands. See `DESIGN.md` for the map:
//! [`api`] holds the custom resources, [`residency`] the pure policy evaluation,
//! [`operator`] the controllers, [`gateway`] the data plane and [`storage`] the
//! OpenDAL operators behind it.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod cli;
pub mod gateway;
pub mod operator;
pub mod probe_http;
pub mod residency;
pub mod storage;
