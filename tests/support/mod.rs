//! Shared helpers for the integration tests; include with `mod support;`.

pub mod cluster;
pub mod controlplane;
pub mod ftp;
pub mod gateway;
pub mod helm;
pub mod http;
pub mod kubelet;
pub mod names;
pub mod proxy;
pub mod s3;
pub mod sftp;
