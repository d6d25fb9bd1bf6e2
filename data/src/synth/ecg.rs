//! Synthetic 12-lead ECGs: a train of PQRST beats, each wave a Gaussian bump (the McSharry-style
//! sum-of-Gaussians model), with per-lead morphology. Leads I, II and V1-V6 are drawn; III, aVR,
//! aVL and aVF follow from Einthoven's and Goldberger's relations, as in a real recording.
//!
//! Disease traces: atrial fibrillation removes P waves, makes RR intervals irregular and adds
//! fibrillatory waves; ischaemia (CAD) lowers the ST segment and/or inverts T in the lateral and
//! inferior leads; LVH (hypertension) raises R in I, aVL, V4-V6 and deepens S in V1-V3;
//! hyperkalaemia (renal failure) peaks the T waves; sepsis raises the rate.

use crate::qa_text::EcgFindings;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Sampling rate of the written records.
pub const SYNTH_FS: f64 = 500.0;
/// Samples per lead (10 s).
pub const SYNTH_SAMPLES: usize = 5000;

/// What to draw: the signs the encounter's diseases express on the ECG.
#[derive(Debug, Clone, Copy, Default)]
pub struct EcgSigns {
    pub heart_rate: f64,
    pub af: bool,
    pub st_depression: bool,
    pub t_inversion: bool,
    pub lvh: bool,
    pub peaked_t: bool,
}

impl EcgSigns {
    pub fn findings(&self) -> EcgFindings {
        EcgFindings {
            heart_rate: self.heart_rate,
            irregular: self.af,
            st_depression: Some(self.st_depression),
            t_inversion: Some(self.t_inversion),
            lvh_voltage: Some(self.lvh),
            peaked_t: Some(self.peaked_t),
        }
    }
}

/// Wave amplitudes (mV) of one drawn lead: P, Q, R, S, T, and the ST-segment weight.
struct LeadShape {
    p: f64,
    q: f64,
    r: f64,
    s: f64,
    t: f64,
    st: f64,
}

/// I, II, V1..V6 (the independent leads), a typical adult morphology.
const BASE: [LeadShape; 8] = [
    LeadShape { p: 0.08, q: -0.05, r: 0.70, s: -0.10, t: 0.20, st: 0.8 },
    LeadShape { p: 0.15, q: -0.07, r: 1.10, s: -0.20, t: 0.30, st: 1.0 },
    LeadShape { p: 0.06, q: 0.00, r: 0.25, s: -0.90, t: 0.05, st: 0.0 },
    LeadShape { p: 0.07, q: 0.00, r: 0.45, s: -1.20, t: 0.35, st: 0.2 },
    LeadShape { p: 0.07, q: 0.00, r: 0.80, s: -0.80, t: 0.40, st: 0.5 },
    LeadShape { p: 0.07, q: -0.05, r: 1.20, s: -0.45, t: 0.40, st: 1.0 },
    LeadShape { p: 0.07, q: -0.07, r: 1.30, s: -0.25, t: 0.30, st: 1.0 },
    LeadShape { p: 0.06, q: -0.06, r: 1.00, s: -0.15, t: 0.25, st: 1.0 },
];

/// Output lead order (the standard 12) built from the 8 drawn leads.
fn twelve(drawn: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let (i, ii) = (&drawn[0], &drawn[1]);
    let n = i.len();
    let derive = |f: &dyn Fn(f32, f32) -> f32| (0..n).map(|k| f(i[k], ii[k])).collect::<Vec<f32>>();
    let mut out = vec![i.clone(), ii.clone()];
    out.push(derive(&|a, b| b - a));
    out.push(derive(&|a, b| -(a + b) / 2.0));
    out.push(derive(&|a, b| a - b / 2.0));
    out.push(derive(&|a, b| b - a / 2.0));
    out.extend(drawn[2..].iter().cloned());
    out
}

fn add_gaussian(x: &mut [f32], centre: f64, width: f64, amp: f64) {
    if amp == 0.0 {
        return;
    }
    let lo = ((centre - 4.0 * width) * SYNTH_FS).floor().max(0.0) as usize;
    let hi = (((centre + 4.0 * width) * SYNTH_FS).ceil() as usize).min(x.len());
    for (k, v) in x.iter_mut().enumerate().take(hi).skip(lo) {
        let t = k as f64 / SYNTH_FS - centre;
        *v += (amp * (-0.5 * (t / width).powi(2)).exp()) as f32;
    }
}

/// Beat (R-peak) times over the 10 s: near-constant RR in sinus rhythm, irregularly irregular RR
/// in AF.
fn beat_times(rng: &mut impl Rng, signs: &EcgSigns) -> Vec<f64> {
    let mean_rr = 60.0 / signs.heart_rate;
    let spread = normal(if signs.af { 0.2 } else { 0.015 });
    let mut t = rng.random_range(0.1..0.1 + mean_rr);
    let mut out = Vec::new();
    while t < SYNTH_SAMPLES as f64 / SYNTH_FS + 0.5 {
        out.push(t);
        let jitter: f64 = spread.sample(rng);
        t += mean_rr * (1.0 + jitter).clamp(0.55, 1.6);
    }
    out
}

/// A zero-mean normal; `sd` is one of this file's positive constants, so construction cannot fail.
fn normal(sd: f64) -> Normal<f64> {
    Normal::new(0.0, sd).expect("a positive, finite standard deviation")
}

/// Draws the 12 leads (physical mV, standard order) for the given signs.
pub fn synthesize_ecg(rng: &mut impl Rng, signs: &EcgSigns) -> Vec<Vec<f32>> {
    let beats = beat_times(rng, signs);
    let noise = normal(0.012);
    let st_level = if signs.st_depression { -rng.random_range(0.12..0.22) } else { 0.0 };
    let f_freq = rng.random_range(5.0..7.0);
    let mut drawn = Vec::with_capacity(8);
    for (li, base) in BASE.iter().enumerate() {
        let scale = rng.random_range(0.85..1.15);
        let mut r = base.r * scale;
        let mut s = base.s * scale;
        let mut t = base.t * scale;
        let mut t_width = 0.045;
        if signs.lvh {
            if matches!(li, 0 | 5 | 6 | 7) {
                r *= 2.0;
            }
            if matches!(li, 2..=4) {
                s *= 1.8;
            }
        }
        if signs.t_inversion && matches!(li, 0 | 5 | 6 | 7) {
            t = -0.7 * t.abs();
        }
        if signs.peaked_t {
            t = t.signum() * (t.abs() * 2.2 + 0.25);
            t_width *= 0.65;
        }
        let mut x = vec![0f32; SYNTH_SAMPLES];
        for &b in &beats {
            let rr_sqrt = (60.0 / signs.heart_rate).sqrt();
            if !signs.af {
                add_gaussian(&mut x, b - 0.16, 0.022, base.p * scale);
            }
            add_gaussian(&mut x, b - 0.028, 0.008, base.q * scale);
            add_gaussian(&mut x, b, 0.010, r);
            add_gaussian(&mut x, b + 0.030, 0.009, s);
            add_gaussian(&mut x, b + 0.13 * rr_sqrt, 0.045, st_level * base.st);
            add_gaussian(&mut x, b + 0.27 * rr_sqrt, t_width, t);
        }
        let wander_f = rng.random_range(0.15..0.4);
        let wander_a = rng.random_range(0.0..0.08);
        let phase = rng.random_range(0.0..std::f64::consts::TAU);
        let f_amp = if signs.af { 0.04 * if matches!(li, 1 | 2) { 1.5 } else { 1.0 } } else { 0.0 };
        for (k, v) in x.iter_mut().enumerate() {
            let tt = k as f64 / SYNTH_FS;
            let wander = wander_a * (std::f64::consts::TAU * wander_f * tt + phase).sin();
            let fib = f_amp * (std::f64::consts::TAU * f_freq * tt + phase * 3.0).sin();
            *v += (wander + fib + noise.sample(rng)) as f32;
        }
        drawn.push(x);
    }
    twelve(&drawn)
}
