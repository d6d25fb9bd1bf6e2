//! Typed run configs for MedTVT-R1 runs, loaded from TOML and validated at load.
