//! bgs, the Bot Gateway Server: wiring of configuration, CLI, HTTP, sockets and plugins around the
//! actors of `bgs-actors`. docs/ARCHITECTURE.md is the map.

pub mod bench;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod esp_client;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod http;
pub mod intake;
pub mod limits;
pub mod net;
pub mod plugins;
pub mod report;
pub mod serve;
pub mod store;
pub mod telemetry;
