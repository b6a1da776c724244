//! Fuzz targets for pgrelay's parsers of peer bytes; see `targets` and SECURITY.md.

pub mod targets;
