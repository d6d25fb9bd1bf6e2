//! Heart rate and rhythm regularity measured from a record: R peaks are found in the QRS slope
//! energy summed over all leads (Pan-Tompkins style), then the mean RR interval gives the rate
//! and the RR coefficient of variation the irregularity. Used to describe real ECGs, whose
//! findings are not known in advance.

use crate::wfdb::WfdbRecord;

/// RR coefficient of variation above which a rhythm counts as irregular.
pub const IRREGULAR_RR_CV: f64 = 0.08;

/// What the rhythm measurement found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rhythm {
    pub heart_rate: f64,
    pub rr_cv: f64,
    pub beats: usize,
}

impl Rhythm {
    pub fn irregular(&self) -> bool {
        self.rr_cv > IRREGULAR_RR_CV
    }
}

/// R-peak sample indices of a record (NaN counts as 0).
pub fn r_peaks(rec: &WfdbRecord) -> Vec<usize> {
    let phys = rec.physical();
    let n = rec.n_samples;
    if n < 3 {
        return Vec::new();
    }
    let clean = |v: f64| if v.is_nan() { 0.0 } else { v };
    let energy: Vec<f64> = (0..n)
        .map(|k| {
            if k == 0 || k + 1 == n {
                0.0
            } else {
                phys.iter().map(|x| (clean(x[k + 1]) - clean(x[k - 1])).powi(2)).sum()
            }
        })
        .collect();
    let max = energy.iter().cloned().fold(0.0, f64::max);
    if max <= 0.0 {
        return Vec::new();
    }
    let refractory = (0.25 * rec.fs) as usize;
    let search = ((0.05 * rec.fs) as usize).max(1);
    let mut peaks = Vec::new();
    let mut k = 0;
    while k < n {
        if energy[k] > 0.3 * max {
            let end = (k + search).min(n);
            let r = (k..end).max_by(|&a, &b| energy[a].total_cmp(&energy[b])).unwrap_or(k);
            peaks.push(r);
            k = r + refractory.max(1);
        } else {
            k += 1;
        }
    }
    peaks
}

/// Rate and regularity; `None` with fewer than 3 beats.
pub fn measure_rhythm(rec: &WfdbRecord) -> Option<Rhythm> {
    let peaks = r_peaks(rec);
    if peaks.len() < 3 {
        return None;
    }
    let rr: Vec<f64> = peaks.windows(2).map(|w| (w[1] - w[0]) as f64 / rec.fs).collect();
    let mean = rr.iter().sum::<f64>() / rr.len() as f64;
    let sd = (rr.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rr.len() as f64).sqrt();
    Some(Rhythm { heart_rate: 60.0 / mean, rr_cv: sd / mean, beats: peaks.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(beats: &[f64]) -> WfdbRecord {
        let fs = 500.0;
        let adc: Vec<i32> = (0..5000)
            .map(|k| {
                let t = k as f64 / fs;
                let v: f64 = beats.iter().map(|b| (-0.5 * ((t - b) / 0.01).powi(2)).exp()).sum();
                (v * 1000.0) as i32
            })
            .collect();
        let spec = crate::wfdb::SignalSpec {
            file_name: "x.dat".into(),
            format: crate::wfdb::SignalFormat::F16,
            byte_offset: 0,
            gain: 1000.0,
            baseline: 0,
            units: "mV".into(),
            adc_resolution: 16,
            adc_zero: 0,
            init_value: 0,
            checksum: None,
            block_size: 0,
            description: "II".into(),
        };
        WfdbRecord {
            name: "x".into(),
            fs,
            n_samples: 5000,
            signals: vec![spec],
            base_time: None,
            base_date: None,
            comments: vec![],
            adc: vec![adc],
        }
    }

    #[test]
    fn regular_and_irregular_beats() {
        let regular: Vec<f64> = (0..12).map(|i| 0.3 + 0.8 * i as f64).collect();
        let r = measure_rhythm(&record(&regular)).unwrap();
        assert!((r.heart_rate - 75.0).abs() < 0.5 && !r.irregular(), "{r:?}");
        let irregular = [0.3, 0.9, 1.9, 2.4, 3.5, 4.0, 4.7, 5.9, 6.4, 7.6, 8.1, 9.2];
        assert!(measure_rhythm(&record(&irregular)).unwrap().irregular());
        assert_eq!(measure_rhythm(&record(&[1.0])), None);
    }
}
