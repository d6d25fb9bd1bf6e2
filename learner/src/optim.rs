//! The optimizer side of a learner step: AdamW with explicit state (so it can be checkpointed and
//! restored exactly), the warm-up + cosine learning-rate schedule, global gradient-norm clipping,
//! and the guard that keeps a non-finite gradient from ever reaching the weights.
//!
//! Mixed precision: whatever the model's compute dtype, the optimizer keeps an f32 master copy of
//! every trainable tensor that is not f32 (and f32 moments for all), applies the update to the
//! master, and refreshes the low-precision copy the model computes with after each step, as
//! DeepSpeed and PyTorch AMP do. Without it, an update below half a bf16 ulp of its weight (at
//! lr 1e-6, any weight above about 5e-4) would round away every step and the weight never move.

use tch::{Kind, Tensor};

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio` at
/// `total` steps: lr(s) = min + (peak - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2.
#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl LrSchedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.peak * self.min_ratio;
        min + (self.peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW (Loshchilov & Hutter) over a fixed list of named parameters:
/// m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
/// p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr * wd * p.
pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Tensor)>,
    /// f32 master copies of the parameters that are not f32 (`None` for f32 ones, which are
    /// their own master).
    masters: Vec<Option<Tensor>>,
    /// First and second moments, one pair per parameter, always f32.
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    /// Number of updates applied so far (t in the formula).
    pub steps: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let zeros = |p: &Tensor| Tensor::zeros_like(p).to_kind(Kind::Float);
        let exp_avg = params.iter().map(|(_, p)| zeros(p)).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| zeros(p)).collect();
        let masters = params.iter().map(|(_, p)| master_of(p)).collect();
        AdamW { config, params, masters, exp_avg, exp_avg_sq, steps: 0 }
    }

    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The f32 values the optimizer updates, one per parameter: the master copy of a
    /// low-precision parameter, the parameter itself otherwise (shallow clones). Checkpoints hold
    /// these, so a resumed bf16 run continues from the same f32 weights.
    pub fn master_weights(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(&self.masters)
            .map(|((name, p), master)| (name.clone(), master.as_ref().unwrap_or(p).shallow_clone()))
            .collect()
    }

    /// Sets parameter `index` to `value`: its f32 master (if it has one) takes `value` exactly and
    /// the parameter its rounding to the parameter's dtype.
    pub fn set_weight(&mut self, index: usize, value: &Tensor) {
        let (_, p) = &self.params[index];
        tch::no_grad(|| {
            let value = value.to_device(p.device());
            p.shallow_clone().copy_(&value.to_kind(p.kind()));
            if let Some(master) = &self.masters[index] {
                master.shallow_clone().copy_(&value.to_kind(Kind::Float));
            }
        });
    }

    /// Re-reads every master from its parameter (after the parameters were overwritten from
    /// outside, e.g. by a broadcast of rank 0's weights).
    pub fn refresh_masters_from_params(&mut self) {
        tch::no_grad(|| {
            for ((_, p), master) in self.params.iter().zip(&self.masters) {
                if let Some(master) = master {
                    master.shallow_clone().copy_(&p.to_kind(Kind::Float));
                }
            }
        });
    }

    /// The gradients of all parameters. A parameter the loss did not reach gets a zero gradient
    /// first, so every rank hands the collective the same layout.
    pub fn grads(&self) -> Vec<Tensor> {
        let missing: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).filter(|p| !p.grad().defined()).collect();
        if !missing.is_empty() {
            // tch exposes no grad setter; a zero-weighted backward allocates zero gradients.
            let zero = missing
                .iter()
                .map(|p| p.sum(Kind::Float))
                .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |acc, s| acc + s.to_device(tch::Device::Cpu));
            (zero * 0.0).backward();
        }
        self.params.iter().map(|(_, p)| p.grad()).collect()
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Applies one update with learning rate `lr` from the current gradients.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                let m = &mut self.exp_avg[i];
                let v = &mut self.exp_avg_sq[i];
                let _ = m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
                let _ = v.g_mul_scalar_(c.beta2).g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = (&*v / bias2).sqrt() + c.eps;
                let master = self.masters[i].as_ref().unwrap_or(p);
                let update = (&*m / bias1) / denom * lr + master * (lr * c.weight_decay);
                let _ = master.shallow_clone().g_sub_(&update);
                if let Some(master) = &self.masters[i] {
                    p.shallow_clone().copy_(&master.to_kind(p.kind()));
                }
            }
        });
    }
}

/// An f32 master copy of a parameter that is not f32 (detached, same device).
fn master_of(p: &Tensor) -> Option<Tensor> {
    // to_kind of another dtype allocates, so the master never aliases the parameter.
    (p.kind() != Kind::Float).then(|| p.detach().to_kind(Kind::Float))
}

/// Global L2 norm of all gradients, in f64.
pub fn grad_norm(grads: &[Tensor]) -> f64 {
    let sq: f64 =
        grads.iter().map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float).double_value(&[])).sum();
    sq.sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm` (0 = no clipping). Returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        tch::no_grad(|| {
            for g in grads {
                let _ = g.shallow_clone().g_mul_scalar_(scale);
            }
        });
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = LrSchedule { peak: 1.0, warmup: 4, total: 14, min_ratio: 0.1 };
        assert!((s.at(0) - 0.25).abs() < 1e-12);
        assert!((s.at(3) - 1.0).abs() < 1e-12);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!((s.at(9) - 0.55).abs() < 1e-12, "half-way: 0.1 + 0.9 * 0.5");
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computed_first_two_steps() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], cfg);
        // loss = sum(p^2) / 2 -> grad = p
        for _ in 0..2 {
            opt.zero_grad();
            (&p * &p).sum(Kind::Float).g_mul_scalar(0.5).backward();
            opt.step(0.01);
        }
        // Step 1: m/(1-b1) = g, sqrt(v/(1-b2)) = |g| -> update = lr * sign(g) + lr*wd*p.
        // p1 = 1 - 0.01 - 0.001 = 0.989; second step with g = 0.989:
        // m = 0.09*1 + 0.1*0.989 ... computed below in f64.
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                let g = expect[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                expect[i] -= 0.01 * mh / (vh.sqrt() + 1e-8) + 0.01 * 0.1 * expect[i];
            }
        }
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        for (g, e) in got.iter().zip(expect) {
            assert!((*g as f64 - e).abs() < 1e-6, "{got:?} vs {expect:?}");
        }
        assert_eq!(opt.steps, 2);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = vec![Tensor::from_slice(&[3.0f32]), Tensor::from_slice(&[4.0f32])];
        let before = clip_grad_norm(&g, 1.0);
        assert!((before - 5.0).abs() < 1e-9);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let untouched = vec![Tensor::from_slice(&[0.3f32])];
        clip_grad_norm(&untouched, 1.0);
        assert!((untouched[0].double_value(&[0]) - 0.3).abs() < 1e-7);
    }

    #[test]
    fn parameters_without_gradients_are_left_alone_and_get_zero_grads_for_collectives() {
        let used = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let unused = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("a".into(), used.shallow_clone()), ("b".into(), unused.shallow_clone())],
            Default::default(),
        );
        used.sum(Kind::Float).backward();
        let grads = opt.grads();
        assert_eq!(grads[1].size(), vec![3]);
        assert_eq!(grads[1].abs().sum(Kind::Float).double_value(&[]), 0.0);
        opt.step(0.1);
        assert_eq!(unused.detach().sum(Kind::Float).double_value(&[]), 3.0);
    }
}
