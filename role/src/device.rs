//! Which device a job runs on, by one rule for learners and rollout workers: the `--device` flag
//! wins; without it the job config's `model.device` decides.

use medtvt_config::DeviceChoice;
use tch::Device;

/// A `--device` flag that names no device, or one this libtorch cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("--device {0}: expected cpu, cuda or cuda:N")]
    Device(String),
    #[error("--device {0}: CUDA is not available to this libtorch")]
    NoCuda(String),
}

/// A job config asks for `model.device = "cuda"` on a machine where libtorch sees no CUDA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "model.device = \"cuda\" but CUDA is not available to this libtorch (run with --device cpu to override the config)"
)]
pub struct ConfigDeviceError;

/// The device one job runs on. The rule, the same for learners and rollout workers: the
/// `--device` flag (or `MEDTVT_DEVICE`), parsed at start-up into `flag`, wins; without it the
/// job config's `model.device` decides: `cpu`, `cuda` (device 0; an error without CUDA) or `auto`
/// (CUDA device 0 when libtorch sees one, else the CPU).
pub fn job_device(flag: Option<Device>, config: DeviceChoice) -> Result<Device, ConfigDeviceError> {
    if let Some(device) = flag {
        return Ok(device);
    }
    match config {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(ConfigDeviceError),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device, DeviceError> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Device::Cuda(n),
            None => return Err(DeviceError::Device(text.to_string())),
        },
    };
    if device.is_cuda() && !tch::Cuda::is_available() {
        return Err(DeviceError::NoCuda(text.to_string()));
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_flag_wins_over_the_config() {
        for config in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda] {
            assert_eq!(job_device(Some(Device::Cpu), config), Ok(Device::Cpu), "{config:?}");
            assert_eq!(job_device(Some(Device::Cuda(1)), config), Ok(Device::Cuda(1)), "{config:?}");
        }
    }

    #[test]
    fn without_the_flag_the_config_decides() {
        let cuda = tch::Cuda::is_available();
        assert_eq!(job_device(None, DeviceChoice::Cpu), Ok(Device::Cpu));
        assert_eq!(job_device(None, DeviceChoice::Auto), Ok(if cuda { Device::Cuda(0) } else { Device::Cpu }));
        assert_eq!(
            job_device(None, DeviceChoice::Cuda),
            if cuda { Ok(Device::Cuda(0)) } else { Err(ConfigDeviceError) }
        );
    }

    #[test]
    fn device_flags_parse_and_bad_ones_are_named() {
        assert_eq!(parse_device("cpu").ok(), Some(Device::Cpu));
        let bad = parse_device("tpu").map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(bad, Err("--device tpu: expected cpu, cuda or cuda:N".to_string()));
        let cuda = parse_device("cuda:0").map(|_| ()).map_err(|e| e.to_string());
        if !tch::Cuda::is_available() {
            assert_eq!(cuda, Err("--device cuda:0: CUDA is not available to this libtorch".to_string()));
        }
    }
}
