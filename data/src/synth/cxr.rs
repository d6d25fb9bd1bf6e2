//! Synthetic chest X-rays (grey, PA view, radiological convention: the patient's right lung on
//! the image's left): soft tissue, two dark lung fields, mediastinum and spine, a heart shadow,
//! ribs, the diaphragm, exposure variation and noise.
//!
//! Disease traces: pneumonia puts a bright patchy opacity in one lung's mid zone; hypertension
//! may enlarge the heart shadow (cardiomegaly).

use crate::qa_text::{CxrFindings, Side};
use image::GrayImage;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Where the lung fields' mid zones are, in image fractions (u across, v down): the boxes the
/// opacity is placed in and a reader can look at.
pub const RIGHT_LUNG_MID: [f64; 4] = [0.20, 0.36, 0.32, 0.52];
pub const LEFT_LUNG_MID: [f64; 4] = [0.64, 0.80, 0.32, 0.52];

fn smooth_inside(d: f64) -> f64 {
    // d < 1 inside an ellipse; a soft edge over 10 % of the radius.
    ((1.0 - d) / 0.1).clamp(0.0, 1.0)
}

fn ellipse(u: f64, v: f64, cu: f64, cv: f64, ru: f64, rv: f64) -> f64 {
    smooth_inside(((u - cu) / ru).powi(2) + ((v - cv) / rv).powi(2))
}

/// Draws one `size` x `size` image for the given findings.
pub fn synthesize_cxr(rng: &mut impl Rng, size: u32, findings: &CxrFindings) -> GrayImage {
    let shift_u = rng.random_range(-0.015..0.015);
    let shift_v = rng.random_range(-0.015..0.015);
    let exposure = rng.random_range(0.9..1.1);
    let heart_ru = if findings.cardiomegaly { rng.random_range(0.21..0.24) } else { rng.random_range(0.14..0.165) };
    let opacity = findings.opacity.map(|side| {
        let box_ = match side {
            Side::Right => RIGHT_LUNG_MID,
            Side::Left => LEFT_LUNG_MID,
        };
        let cu = (box_[0] + box_[1]) / 2.0 + rng.random_range(-0.03..0.03);
        let cv = rng.random_range(box_[2] + 0.04..box_[3] - 0.02);
        (cu, cv, rng.random_range(0.05..0.07), rng.random_range(0.28..0.38))
    });
    let noise = Normal::new(0.0, 0.03).expect("a positive, finite standard deviation");
    let rib_phase = rng.random_range(0.0..0.02);
    GrayImage::from_fn(size, size, |x, y| {
        let u = (x as f64 + 0.5) / size as f64 - shift_u;
        let v = (y as f64 + 0.5) / size as f64 - shift_v;
        let body = ellipse(u, v, 0.5, 0.56, 0.45, 0.54);
        // Diaphragm: two domes; below them the abdomen, brighter than the lungs.
        let dome = (0.70 + 0.10 * ((u - 0.29) / 0.2).powi(2)).min(0.72 + 0.10 * ((u - 0.71) / 0.2).powi(2));
        let above = smooth_inside(((v - dome + 0.1) / 0.1).max(0.0).powi(2));
        let mut g = 0.05 + 0.30 * body;
        let lungs = ellipse(u, v, 0.29, 0.44, 0.15, 0.31).max(ellipse(u, v, 0.71, 0.44, 0.15, 0.31)) * above;
        g -= 0.20 * lungs;
        // Ribs: faint arcs across the lung fields.
        for k in 0..9 {
            let arc = 0.17 + rib_phase + k as f64 * 0.062 + 0.10 * ((u - 0.5) / 0.4).powi(2);
            if (v - arc).abs() < 0.010 {
                g += 0.06 * lungs;
            }
        }
        // Mediastinum widening downwards, the spine within it, the heart shadow at its foot.
        let half_width = 0.045 + 0.03 * ((v - 0.08) / 0.5).clamp(0.0, 1.0);
        if v > 0.06 && v < 0.66 {
            g += 0.22 * smooth_inside(((u - 0.5) / half_width).powi(2));
        }
        g += 0.10 * smooth_inside(((u - 0.5) / 0.022).powi(2)) * body;
        g += 0.24 * ellipse(u, v, 0.54, 0.63, heart_ru, 0.12);
        g += 0.20 * (1.0 - above) * body;
        if let Some((cu, cv, sd, amp)) = opacity {
            let r2 = ((u - cu).powi(2) + (v - cv).powi(2)) / (sd * sd);
            g += amp * (-0.5 * r2).exp() * (0.8 + 0.2 * (37.0 * u).sin() * (41.0 * v).cos());
        }
        let value = g * exposure + noise.sample(rng);
        image::Luma([(value.clamp(0.0, 1.0) * 255.0).round() as u8])
    })
}
