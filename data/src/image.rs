//! Chest X-ray images: decode a PNG or JPEG (grey or colour, 8 or 16 bit) and turn it into the
//! model's `[3, S, S]` input.
//!
//! Documented choices: the image is resized to S x S with a triangle (bilinear) filter, without
//! keeping the aspect ratio (chest films are near square, and a crop could cut off a lung base);
//! grey images are replicated to three channels; values are scaled to [0, 1] and then normalised
//! per channel with the ImageNet mean and standard deviation, the statistics the spec's ViT-B/16
//! encoder was pre-trained with.

use crate::error::DataError;
use image::imageops::FilterType;
use std::path::Path;

/// ImageNet per-channel mean (RGB).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Decodes an image file; the format is taken from the content, not the name. A JPEG must be
/// complete (see [`crate::jpeg`]): the decoder alone would fill a truncated one with grey.
pub fn open_image(path: &Path) -> Result<image::DynamicImage, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bad = |problem: String| DataError::Image { path: path.to_path_buf(), problem };
    if crate::jpeg::is_jpeg(&bytes) {
        crate::jpeg::check_complete(&bytes).map_err(bad)?;
    }
    image::load_from_memory(&bytes).map_err(|e| bad(e.to_string()))
}

/// The model's X-ray input: `[3, size, size]` row-major, ImageNet-normalised.
pub fn load_image(path: &Path, size: u32) -> Result<Vec<f32>, DataError> {
    if size == 0 {
        return Err(DataError::arg("image_size", "must be at least 1"));
    }
    Ok(image_tensor(&open_image(path)?, size))
}

/// Resizes and normalises a decoded image to `[3, size, size]`.
pub fn image_tensor(img: &image::DynamicImage, size: u32) -> Vec<f32> {
    let rgb = img.resize_exact(size, size, FilterType::Triangle).to_rgb32f();
    let plane = (size * size) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (k, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + k] = (px.0[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_png_and_jpeg_become_normalised_three_channel_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let grey = image::GrayImage::from_fn(40, 30, |x, _| image::Luma([if x < 20 { 0 } else { 255 }]));
        for name in ["g.png", "g.jpg"] {
            let p = dir.path().join(name);
            grey.save(&p).unwrap();
            let t = load_image(&p, 16).unwrap();
            assert_eq!(t.len(), 3 * 16 * 16);
            // Left edge black, right edge white, in every channel.
            for c in 0..3 {
                let left = t[c * 256 + 8 * 16];
                let right = t[c * 256 + 8 * 16 + 15];
                assert!((left - (0.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]).abs() < 0.1, "{name} {left}");
                assert!((right - (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]).abs() < 0.1, "{name} {right}");
            }
        }
    }

    #[test]
    fn truncated_jpeg_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cut.jpg");
        let bytes = crate::jpeg::tests::noisy_jpeg(128);
        std::fs::write(&p, &bytes).unwrap();
        load_image(&p, 8).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_image(&p, 8).unwrap_err().to_string();
        assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
    }

    #[test]
    fn corrupt_image_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("broken.png");
        std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = load_image(&p, 8).unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("image"), "{e}");
        assert!(load_image(&dir.path().join("none.jpg"), 8).unwrap_err().to_string().contains("none.jpg"));
    }
}
