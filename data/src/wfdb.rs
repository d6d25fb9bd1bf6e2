//! WFDB records (PhysioNet's format, used by MIMIC-IV-ECG): the `.hea` header parser, signal
//! formats 16 and 212 (read and write), physical units, and the resampling that turns a 500 Hz,
//! 10 s, 12-lead record into the model's `[12, 1000]` input at 100 Hz.
//!
//! Header grammar (single-segment records; defaults as in the WFDB specification):
//! - record line: `name nsig [fs[/counterfreq[(base)]] [nsamp [base_time [base_date]]]]`; fs
//!   defaults to 250 Hz, a missing or zero nsamp is derived from the size of the signal file;
//! - one signal line per signal: `file format[xspf][:skew][+offset] [gain[(baseline)][/units]
//!   [adc_res [adc_zero [init [checksum [block_size [description]]]]]]]`; a missing or zero gain is
//!   200 adu per unit, baseline defaults to adc_zero, units to `mV`, adc_res to 12 (format 212) or
//!   16 (format 16), adc_zero to 0, init to adc_zero, block size to 0; the description (the lead
//!   name) is the rest of the line;
//! - lines whose first non-blank character is `#` are comments.
//!
//! Physical value = (adc - baseline) / gain; the invalid-sample code (-32768 in format 16, -2048
//! in format 212) reads as NaN. Several signals may share one `.dat` file (interleaved by frame);
//! signals may also be spread over several files.
//!
//! Resampling (documented choice): NaN becomes 0 first (the model's convention), then, when
//! down-sampling, a 41-tap-per-5x Hamming-windowed-sinc low-pass with its cut-off at 0.45 of the
//! target rate removes what would alias, and the filtered signal is read at the target instants by
//! linear interpolation. For an integer ratio (500 -> 100 Hz) the instants fall on samples, so this
//! is plain anti-aliased decimation; other rates work too.

use crate::error::DataError;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The standard 12-lead order of the model input.
pub const ECG_LEADS: [&str; 12] = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"];
/// Sampling rate of the model input.
pub const ECG_MODEL_FS: f64 = 100.0;
/// Samples per lead of the model input (10 s at 100 Hz).
pub const ECG_MODEL_SAMPLES: usize = 1000;

const DEFAULT_GAIN: f64 = 200.0;
const DEFAULT_FS: f64 = 250.0;

/// A WFDB storage format this crate reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SignalFormat {
    /// 16-bit little-endian two's complement.
    F16,
    /// Two 12-bit samples packed in three bytes.
    F212,
}

impl SignalFormat {
    pub fn code(self) -> u32 {
        match self {
            SignalFormat::F16 => 16,
            SignalFormat::F212 => 212,
        }
    }

    /// The sample value that means "no valid sample".
    pub fn invalid_value(self) -> i32 {
        match self {
            SignalFormat::F16 => -32768,
            SignalFormat::F212 => -2048,
        }
    }

    fn range(self) -> (i32, i32) {
        match self {
            SignalFormat::F16 => (-32767, 32767),
            SignalFormat::F212 => (-2047, 2047),
        }
    }

    fn default_resolution(self) -> u32 {
        match self {
            SignalFormat::F16 => 16,
            SignalFormat::F212 => 12,
        }
    }

    /// Bytes needed for `n` samples.
    fn bytes_for(self, n: usize) -> usize {
        match self {
            SignalFormat::F16 => n.saturating_mul(2),
            SignalFormat::F212 => n.saturating_mul(3).div_ceil(2),
        }
    }

    /// Whole samples that `bytes` hold.
    fn samples_in(self, bytes: usize) -> usize {
        match self {
            SignalFormat::F16 => bytes / 2,
            SignalFormat::F212 => bytes * 2 / 3,
        }
    }
}

/// One signal line of a header.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SignalSpec {
    pub file_name: String,
    pub format: SignalFormat,
    pub byte_offset: u64,
    /// ADC units per physical unit.
    pub gain: f64,
    pub baseline: i32,
    pub units: String,
    pub adc_resolution: u32,
    pub adc_zero: i32,
    pub init_value: i32,
    pub checksum: Option<i32>,
    pub block_size: u32,
    /// The lead name.
    pub description: String,
}

/// A parsed header plus the digital samples of every signal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WfdbRecord {
    pub name: String,
    pub fs: f64,
    pub n_samples: usize,
    pub signals: Vec<SignalSpec>,
    pub base_time: Option<String>,
    pub base_date: Option<String>,
    pub comments: Vec<String>,
    /// Digital samples, `[n_signals][n_samples]`.
    #[serde(skip)]
    pub adc: Vec<Vec<i32>>,
}

/// The header alone (what `read_header` yields; `adc` is empty).
pub type WfdbHeader = WfdbRecord;

impl WfdbRecord {
    /// Physical values `[n_signals][n_samples]`, NaN where the sample is invalid.
    pub fn physical(&self) -> Vec<Vec<f64>> {
        self.signals
            .iter()
            .zip(&self.adc)
            .map(|(s, d)| {
                let invalid = s.format.invalid_value();
                d.iter().map(|&v| if v == invalid { f64::NAN } else { (v - s.baseline) as f64 / s.gain }).collect()
            })
            .collect()
    }

    /// Index of the signal whose description is `lead` (case-insensitive).
    pub fn lead_index(&self, lead: &str) -> Option<usize> {
        self.signals.iter().position(|s| s.description.trim().eq_ignore_ascii_case(lead))
    }

    /// Signals whose stored checksum disagrees with the data (names of the leads).
    pub fn checksum_mismatches(&self) -> Vec<String> {
        self.signals
            .iter()
            .zip(&self.adc)
            .filter(|(s, d)| s.checksum.is_some_and(|c| (c - checksum(d)).rem_euclid(65536) != 0))
            .map(|(s, _)| s.description.clone())
            .collect()
    }

    /// Writes this record's header and data as `<stem>.hea` / `<stem>.dat` (all signals in one
    /// file, interleaved), renaming it to the stem's file name. The base time and date are kept;
    /// a stored checksum that agrees with the data is written as it was read (WFDB allows it
    /// signed or unsigned: `63717` stays `63717`, not `-1819`), any other is recomputed from the
    /// data, as are the init values.
    pub fn write(&self, stem: &Path) -> Result<(), DataError> {
        let name = stem_name(stem)?;
        let hea = stem.with_extension("hea");
        let dat_name = format!("{name}.dat");
        let dat = stem.with_file_name(&dat_name);
        let format = self.signals.first().map(|s| s.format).unwrap_or(SignalFormat::F16);
        if self.signals.iter().any(|s| s.format != format) {
            return Err(DataError::arg("signals", "all signals must share one format to be written to one file"));
        }
        if self.adc.len() != self.signals.len() || self.adc.iter().any(|d| d.len() != self.n_samples) {
            return Err(DataError::arg("adc", "needs one row of n_samples per signal"));
        }
        let mut head = format!("{name} {} {} {}", self.signals.len(), fmt_num(self.fs), self.n_samples);
        // The date can only follow a time.
        if let Some(time) = &self.base_time {
            head.push_str(&format!(" {time}"));
            if let Some(date) = &self.base_date {
                head.push_str(&format!(" {date}"));
            }
        }
        head.push('\n');
        for (s, d) in self.signals.iter().zip(&self.adc) {
            head.push_str(&format!(
                "{dat_name} {} {}({})/{} {} {} {} {} 0 {}\n",
                format.code(),
                fmt_num(s.gain),
                s.baseline,
                s.units,
                s.adc_resolution,
                s.adc_zero,
                d.first().copied().unwrap_or(s.adc_zero),
                s.checksum.filter(|&c| (c - checksum(d)).rem_euclid(65536) == 0).unwrap_or_else(|| checksum(d)),
                s.description
            ));
        }
        for c in &self.comments {
            head.push_str(&format!("# {c}\n"));
        }
        let mut interleaved = Vec::with_capacity(self.n_samples * self.signals.len());
        for t in 0..self.n_samples {
            interleaved.extend(self.adc.iter().map(|d| d[t]));
        }
        std::fs::write(&dat, encode(format, &interleaved)).map_err(|e| DataError::io(&dat, e))?;
        std::fs::write(&hea, head).map_err(|e| DataError::io(&hea, e))
    }
}

/// Writes a record from physical values (`data[lead][sample]`, NaN allowed) quantised as
/// `adc = round(value * gain + baseline)`, clamped to the format's range. Returns what was written.
pub fn write_record(
    stem: &Path,
    fs: f64,
    leads: &[&str],
    data: &[Vec<f32>],
    format: SignalFormat,
    gains: &[f64],
    baselines: &[i32],
) -> Result<WfdbRecord, DataError> {
    let n_sig = leads.len();
    if data.len() != n_sig || gains.len() != n_sig || baselines.len() != n_sig {
        return Err(DataError::arg("leads", "leads, data, gains and baselines must have one entry per lead"));
    }
    let n_samples = data.first().map_or(0, |d| d.len());
    if data.iter().any(|d| d.len() != n_samples) {
        return Err(DataError::arg("data", "every lead needs the same number of samples"));
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(fs) || !gains.iter().all(|g| positive(*g)) {
        return Err(DataError::arg("fs/gains", "must be positive"));
    }
    let (lo, hi) = format.range();
    let mut signals = Vec::with_capacity(n_sig);
    let mut adc = Vec::with_capacity(n_sig);
    for i in 0..n_sig {
        let d: Vec<i32> = data[i]
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    format.invalid_value()
                } else {
                    ((v as f64 * gains[i] + baselines[i] as f64).round() as i64).clamp(lo as i64, hi as i64) as i32
                }
            })
            .collect();
        signals.push(SignalSpec {
            file_name: String::new(),
            format,
            byte_offset: 0,
            gain: gains[i],
            baseline: baselines[i],
            units: "mV".into(),
            adc_resolution: format.default_resolution(),
            adc_zero: 0,
            init_value: d.first().copied().unwrap_or(0),
            checksum: Some(checksum(&d)),
            block_size: 0,
            description: leads[i].to_string(),
        });
        adc.push(d);
    }
    let name = stem_name(stem)?;
    let dat_name = format!("{name}.dat");
    for s in &mut signals {
        s.file_name = dat_name.clone();
    }
    let rec = WfdbRecord { name, fs, n_samples, signals, base_time: None, base_date: None, comments: Vec::new(), adc };
    rec.write(stem)?;
    Ok(rec)
}

fn stem_name(stem: &Path) -> Result<String, DataError> {
    stem.file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.strip_suffix(".hea").unwrap_or(n).to_string())
        .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace))
        .ok_or_else(|| DataError::arg("stem", format!("{} has no usable record name", stem.display())))
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The WFDB checksum: the sum of the samples, kept to 16 bits, as a signed value.
pub fn checksum(d: &[i32]) -> i32 {
    let sum: i64 = d.iter().map(|&v| v as i64).sum();
    (sum & 0xffff) as u16 as i16 as i32
}

fn encode(format: SignalFormat, samples: &[i32]) -> Vec<u8> {
    match format {
        SignalFormat::F16 => samples.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect(),
        SignalFormat::F212 => {
            let mut out = Vec::with_capacity(format.bytes_for(samples.len()) + 1);
            for pair in samples.chunks(2) {
                let a = (pair[0] & 0xfff) as u32;
                let b = (pair.get(1).copied().unwrap_or(0) & 0xfff) as u32;
                out.push((a & 0xff) as u8);
                out.push((((a >> 8) & 0x0f) | (((b >> 8) & 0x0f) << 4)) as u8);
                // An odd final sample is padded with a zero sample, as wfdb-python writes it.
                out.push((b & 0xff) as u8);
            }
            out
        }
    }
}

fn decode(format: SignalFormat, bytes: &[u8], n: usize) -> Vec<i32> {
    match format {
        SignalFormat::F16 => bytes.chunks_exact(2).take(n).map(|c| i16::from_le_bytes([c[0], c[1]]) as i32).collect(),
        SignalFormat::F212 => {
            let mut out = Vec::with_capacity(n + 1);
            let twelve = |v: u32| if v > 2047 { v as i32 - 4096 } else { v as i32 };
            for c in bytes.chunks(3) {
                if out.len() >= n {
                    break;
                }
                let b0 = c[0] as u32;
                let b1 = c.get(1).copied().unwrap_or(0) as u32;
                out.push(twelve(b0 | ((b1 & 0x0f) << 8)));
                if let Some(&b2) = c.get(2) {
                    out.push(twelve(b2 as u32 | ((b1 & 0xf0) << 4)));
                }
            }
            out.truncate(n);
            out
        }
    }
}

/// The `.hea` path for a stem given with or without the extension.
pub fn header_path(stem: &Path) -> PathBuf {
    if stem.extension().is_some_and(|e| e == "hea") {
        stem.to_path_buf()
    } else {
        let mut s = stem.as_os_str().to_os_string();
        s.push(".hea");
        PathBuf::from(s)
    }
}

/// Parses a header file (`<stem>.hea`); the record's `adc` is left empty.
pub fn read_header(stem: &Path) -> Result<WfdbHeader, DataError> {
    let path = header_path(stem);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    parse_header(&path, &text)
}

fn parse_header(path: &Path, text: &str) -> Result<WfdbHeader, DataError> {
    let err = |line: usize, field: &str, problem: String| DataError::WfdbHeader {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        problem,
    };
    let mut comments = Vec::new();
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        if let Some(c) = t.strip_prefix('#') {
            comments.push(c.trim().to_string());
        } else if !t.is_empty() {
            lines.push((i + 1, t));
        }
    }
    let &(rec_line, rec) = lines.first().ok_or_else(|| err(1, "record line", "the header is empty".into()))?;
    let toks: Vec<&str> = rec.split_whitespace().collect();
    let name = toks[0];
    if name.contains('/') {
        return Err(err(rec_line, "record name", format!("{name:?} is a multi-segment record, not supported")));
    }
    let n_sig: usize = toks
        .get(1)
        .ok_or_else(|| err(rec_line, "number of signals", "missing".into()))?
        .parse()
        .map_err(|_| err(rec_line, "number of signals", format!("{:?} is not a count", toks[1])))?;
    let fs = match toks.get(2) {
        None => DEFAULT_FS,
        Some(t) => {
            let v: f64 = t
                .split('/')
                .next()
                .unwrap_or(t)
                .parse()
                .map_err(|_| err(rec_line, "sampling frequency", format!("{t:?} is not a number")))?;
            if v > 0.0 {
                v
            } else {
                DEFAULT_FS
            }
        }
    };
    let n_samples_hdr: usize = match toks.get(3) {
        None => 0,
        Some(t) => t.parse().map_err(|_| err(rec_line, "number of samples", format!("{t:?} is not a count")))?,
    };
    let sig_lines = &lines[1..];
    if sig_lines.len() < n_sig {
        return Err(err(
            rec_line,
            "number of signals",
            format!("the record line announces {n_sig} signals but {} signal lines follow", sig_lines.len()),
        ));
    }
    let mut signals = Vec::with_capacity(n_sig);
    for &(ln, line) in &sig_lines[..n_sig] {
        signals.push(parse_signal_line(line).map_err(|(field, problem)| err(ln, field, problem))?);
    }
    Ok(WfdbRecord {
        name: name.to_string(),
        fs,
        n_samples: n_samples_hdr,
        signals,
        base_time: toks.get(4).map(|s| s.to_string()),
        base_date: toks.get(5).map(|s| s.to_string()),
        comments,
        adc: Vec::new(),
    })
}

fn parse_signal_line(line: &str) -> Result<SignalSpec, (&'static str, String)> {
    // The first eight fields are tokens; the description is the rest of the line.
    let mut rest = line;
    let mut toks = Vec::with_capacity(8);
    while toks.len() < 8 {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        toks.push(&rest[..end]);
        rest = &rest[end..];
    }
    let description = rest.trim().to_string();
    let file_name = toks[0].to_string();
    let fmt_tok = toks.get(1).ok_or(("format", "missing".to_string()))?;
    let (format, byte_offset) = parse_format(fmt_tok).map_err(|p| ("format", p))?;
    let int = |i: usize, field: &'static str| -> Result<Option<i64>, (&'static str, String)> {
        toks.get(i).map(|t| t.parse::<i64>().map_err(|_| (field, format!("{t:?} is not an integer")))).transpose()
    };
    let adc_res = int(3, "ADC resolution")?.filter(|&v| v > 0).map_or(format.default_resolution(), |v| v as u32);
    let adc_zero = int(4, "ADC zero")?.unwrap_or(0) as i32;
    let init_value = int(5, "initial value")?.map_or(adc_zero, |v| v as i32);
    let checksum = int(6, "checksum")?.map(|v| v as i32);
    let block_size = int(7, "block size")?.unwrap_or(0).max(0) as u32;
    let (gain, baseline, units) = match toks.get(2) {
        None => (DEFAULT_GAIN, adc_zero, "mV".to_string()),
        Some(t) => parse_gain(t, adc_zero).map_err(|p| ("ADC gain", p))?,
    };
    Ok(SignalSpec {
        file_name,
        format,
        byte_offset,
        gain,
        baseline,
        units,
        adc_resolution: adc_res,
        adc_zero,
        init_value,
        checksum,
        block_size,
        description,
    })
}

fn parse_format(t: &str) -> Result<(SignalFormat, u64), String> {
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let format = match &t[..digits_end] {
        "16" => SignalFormat::F16,
        "212" => SignalFormat::F212,
        other => return Err(format!("format {other:?} is not supported (only 16 and 212)")),
    };
    let mut rest = &t[digits_end..];
    let mut offset = 0u64;
    while !rest.is_empty() {
        // The tag may be any character (a malformed header can hold non-ASCII): slice by its
        // UTF-8 length, never by one byte.
        let tag = rest.chars().next().unwrap_or('?');
        let digits = &rest[tag.len_utf8()..];
        let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
        let num: u64 = digits[..end].parse().map_err(|_| format!("{t:?}: bad number after {tag:?}"))?;
        match tag {
            'x' if num > 1 => return Err(format!("{t:?}: {num} samples per frame is not supported")),
            'x' => {}
            ':' if num != 0 => return Err(format!("{t:?}: skew is not supported")),
            ':' => {}
            '+' => offset = num,
            _ => return Err(format!("{t:?}: unexpected {tag:?}")),
        }
        rest = &digits[end..];
    }
    Ok((format, offset))
}

fn parse_gain(t: &str, adc_zero: i32) -> Result<(f64, i32, String), String> {
    let (num_part, units) = match t.split_once('/') {
        Some((a, u)) => (a, u.to_string()),
        None => (t, "mV".to_string()),
    };
    let (gain_str, baseline) = match num_part.split_once('(') {
        Some((g, b)) => {
            let b = b.strip_suffix(')').ok_or_else(|| format!("{t:?}: unclosed baseline"))?;
            (g, b.parse::<i32>().map_err(|_| format!("{t:?}: baseline {b:?} is not an integer"))?)
        }
        None => (num_part, adc_zero),
    };
    let gain: f64 = gain_str.parse().map_err(|_| format!("{t:?}: gain {gain_str:?} is not a number"))?;
    let gain = if gain == 0.0 { DEFAULT_GAIN } else { gain };
    if !gain.is_finite() || gain < 0.0 {
        return Err(format!("{t:?}: gain must be positive"));
    }
    Ok((gain, baseline, units))
}

/// Reads a record: `stem` is the path without extension (or the `.hea` path); signal files are
/// looked up beside the header.
pub fn read_record(stem: &Path) -> Result<WfdbRecord, DataError> {
    let hea = header_path(stem);
    let text = std::fs::read_to_string(&hea).map_err(|e| DataError::io(&hea, e))?;
    let dir = hea.parent().map(Path::to_path_buf).unwrap_or_default();
    parse_record(&hea, &text, |file| {
        let path = dir.join(file);
        std::fs::read(&path).map_err(|e| DataError::io(&path, e))
    })
}

/// Parses a record from its header text and a reader of its signal files (by the file name the
/// header gives); `hea` names the header in errors. [`read_record`] is this over the file system;
/// the fuzz target feeds it bytes directly.
pub fn parse_record(
    hea: &Path,
    header_text: &str,
    mut read_signal_file: impl FnMut(&str) -> Result<Vec<u8>, DataError>,
) -> Result<WfdbRecord, DataError> {
    let mut rec = parse_header(hea, header_text)?;
    let dir = hea.parent().map(Path::to_path_buf).unwrap_or_default();
    // Signals grouped by file, in order of first appearance.
    let mut files: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, s) in rec.signals.iter().enumerate() {
        match files.iter_mut().find(|(f, _)| *f == s.file_name) {
            Some((_, v)) => v.push(i),
            None => files.push((s.file_name.clone(), vec![i])),
        }
    }
    let mut adc = vec![Vec::new(); rec.signals.len()];
    let mut n_samples = rec.n_samples;
    for (file, idx) in &files {
        let first = &rec.signals[idx[0]];
        let path = dir.join(file);
        if idx.iter().any(|&i| rec.signals[i].format != first.format || rec.signals[i].byte_offset != first.byte_offset)
        {
            return Err(DataError::WfdbSignal {
                path: hea.to_path_buf(),
                problem: format!("signals in {file} mix formats or byte offsets"),
            });
        }
        let bytes = read_signal_file(file)?;
        let offset = first.byte_offset as usize;
        let data = bytes.get(offset..).ok_or_else(|| DataError::WfdbSignal {
            path: path.clone(),
            problem: format!("byte offset {offset} is past the end ({} bytes)", bytes.len()),
        })?;
        let k = idx.len();
        if n_samples == 0 {
            n_samples = first.format.samples_in(data.len()) / k;
        }
        let total = n_samples.checked_mul(k).ok_or_else(|| DataError::WfdbSignal {
            path: hea.to_path_buf(),
            problem: format!("{n_samples} samples x {k} signals does not fit in memory"),
        })?;
        let need = first.format.bytes_for(total);
        if data.len() < need {
            return Err(DataError::WfdbSignal {
                path: path.clone(),
                problem: format!(
                    "truncated: {n_samples} samples x {k} signals in format {} need {need} bytes, the file has {}",
                    first.format.code(),
                    data.len()
                ),
            });
        }
        let samples = decode(first.format, data, total);
        for (j, &i) in idx.iter().enumerate() {
            adc[i] = samples.iter().skip(j).step_by(k).copied().collect();
        }
    }
    rec.n_samples = n_samples;
    rec.adc = adc;
    Ok(rec)
}

/// Resamples one signal from `fs_in` to `fs_out` (see the module doc); NaN becomes 0.
pub fn resample(x: &[f32], fs_in: f64, fs_out: f64) -> Vec<f32> {
    let clean: Vec<f32> = x.iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
    let n_out = (clean.len() as f64 * fs_out / fs_in).floor() as usize;
    if clean.is_empty() || n_out == 0 {
        return Vec::new();
    }
    let taps = if fs_out < fs_in { lowpass_taps(0.45 * fs_out / fs_in, fs_in / fs_out) } else { vec![1.0] };
    let half = (taps.len() / 2) as isize;
    let last = clean.len() as isize - 1;
    let filtered_at = |i: isize| -> f64 {
        taps.iter().enumerate().map(|(k, &h)| h * clean[(i + k as isize - half).clamp(0, last) as usize] as f64).sum()
    };
    (0..n_out)
        .map(|j| {
            let t = j as f64 * fs_in / fs_out;
            let i0 = t.floor() as isize;
            let frac = t - i0 as f64;
            let a = filtered_at(i0.min(last));
            if frac < 1e-9 || i0 >= last {
                a as f32
            } else {
                (a + frac * (filtered_at(i0 + 1) - a)) as f32
            }
        })
        .collect()
}

/// Hamming-windowed sinc low-pass; `cutoff` in cycles per input sample, unit DC gain.
fn lowpass_taps(cutoff: f64, ratio: f64) -> Vec<f64> {
    let m = (4.0 * ratio).ceil() as isize;
    let len = (2 * m + 1) as f64;
    let mut h: Vec<f64> = (-m..=m)
        .map(|n| {
            let x = n as f64;
            let sinc = if n == 0 {
                2.0 * cutoff
            } else {
                (2.0 * std::f64::consts::PI * cutoff * x).sin() / (std::f64::consts::PI * x)
            };
            let w = 0.54 + 0.46 * (2.0 * std::f64::consts::PI * x / (len - 1.0)).cos();
            sinc * w
        })
        .collect();
    let sum: f64 = h.iter().sum();
    h.iter_mut().for_each(|v| *v /= sum);
    h
}

/// The model's ECG input: `[12, 1000]` row-major, the 12 standard leads (matched by name,
/// case-insensitively; a 12-signal record with other names is taken in file order), physical
/// units, resampled to 100 Hz, first 10 s (zero-padded when shorter), NaN -> 0.
pub fn ecg_model_input(rec: &WfdbRecord, source: &Path) -> Result<Vec<f32>, DataError> {
    let by_name: Option<Vec<usize>> = ECG_LEADS.iter().map(|l| rec.lead_index(l)).collect();
    let order = match by_name {
        Some(o) => o,
        None if rec.signals.len() == 12 => (0..12).collect(),
        None => {
            let missing: Vec<&str> = ECG_LEADS.iter().filter(|l| rec.lead_index(l).is_none()).copied().collect();
            return Err(DataError::WfdbSignal {
                path: source.to_path_buf(),
                problem: format!("needs the 12 standard leads; missing {}", missing.join(", ")),
            });
        }
    };
    let phys = rec.physical();
    let mut out = vec![0f32; 12 * ECG_MODEL_SAMPLES];
    for (row, &i) in order.iter().enumerate() {
        let lead: Vec<f32> = phys[i].iter().map(|&v| v as f32).collect();
        let r = resample(&lead, rec.fs, ECG_MODEL_FS);
        let n = r.len().min(ECG_MODEL_SAMPLES);
        out[row * ECG_MODEL_SAMPLES..row * ECG_MODEL_SAMPLES + n].copy_from_slice(&r[..n]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_212_roundtrip_including_odd_length_and_extremes() {
        let v = [0, 1, -1, 2047, -2047, -2048, 1000, -5];
        for n in [v.len(), v.len() - 1] {
            let bytes = encode(SignalFormat::F212, &v[..n]);
            assert_eq!(decode(SignalFormat::F212, &bytes, n), v[..n].to_vec());
        }
    }

    #[test]
    fn header_defaults_follow_the_spec() {
        let h = parse_header(Path::new("x.hea"), "r1 2\n# a comment\nr1.dat 212\nr1.dat 212 0 0 7 3 0 0 V1 lead\n")
            .unwrap();
        assert_eq!(h.fs, 250.0);
        assert_eq!(h.n_samples, 0);
        assert_eq!(h.comments, vec!["a comment"]);
        let s = &h.signals[0];
        assert_eq!((s.gain, s.baseline, s.units.as_str(), s.adc_resolution), (200.0, 0, "mV", 12));
        let s = &h.signals[1];
        assert_eq!((s.gain, s.baseline, s.adc_zero, s.init_value, s.description.as_str()), (200.0, 7, 7, 3, "V1 lead"));
    }

    #[test]
    fn malformed_headers_name_line_and_field() {
        let cases = [
            ("r 2 500 10\nr.dat 16 200 16 0 0 0 0 I\n", ":1: WFDB header field `number of signals`"),
            ("r 1 500 10\nr.dat 8 200 16 0 0 0 0 I\n", ":2: WFDB header field `format`"),
            ("r 1 5x0 10\nr.dat 16\n", "`sampling frequency`"),
            ("r 1 500 10\nr.dat 16 abc(0)/mV\n", "`ADC gain`"),
            ("r 1 500 10\nr.dat 16 200 16 zero\n", "`ADC zero`"),
            ("", "empty"),
        ];
        for (text, want) in cases {
            let e = parse_header(Path::new("bad.hea"), text).unwrap_err().to_string();
            assert!(e.contains("bad.hea") && e.contains(want), "{e} lacks {want}");
        }
    }

    /// Found by the `wfdb_header` fuzz target (fuzz/): a non-ASCII character after the format
    /// number used to panic on a byte slice inside it.
    #[test]
    fn non_ascii_after_the_format_is_an_error_not_a_panic() {
        let crash =
            b"ouour121\x08&&&&&&&&&&wf16 01 520 1000\nwt 16\xe0\xb6\xb512\xe0\xb6\xb7\xe0\xb6\xb7r 200. 131 3 -61";
        let text = std::str::from_utf8(crash).unwrap();
        let e = parse_record(Path::new("fuzz.hea"), text, |_| Ok(Vec::new())).unwrap_err().to_string();
        assert!(e.contains("fuzz.hea") && e.contains("`format`"), "{e}");
        let e = parse_format("212\u{dbb}5").unwrap_err();
        assert!(e.contains("unexpected"), "{e}");
        assert_eq!(parse_format("212x1:0+7").unwrap(), (SignalFormat::F212, 7));
    }

    /// A header announcing more samples than memory holds is reported as such (no overflow).
    #[test]
    fn absurd_sample_counts_are_errors() {
        let text = format!("r 4 500 {}\nr.dat 16\nr.dat 16\nr.dat 16\nr.dat 16\n", usize::MAX / 2);
        let e = parse_record(Path::new("big.hea"), &text, |_| Ok(vec![0; 64])).unwrap_err().to_string();
        assert!(e.contains("big.hea") && e.contains("does not fit"), "{e}");
        let text = format!("r 1 500 {}\nr.dat 212\n", usize::MAX / 2);
        let e = parse_record(Path::new("big.hea"), &text, |_| Ok(vec![0; 64])).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn resample_decimates_low_frequencies_and_removes_aliases() {
        let fs = 500.0;
        let slow: Vec<f32> =
            (0..5000).map(|i| (2.0 * std::f64::consts::PI * 5.0 * i as f64 / fs).sin() as f32).collect();
        let r = resample(&slow, fs, 100.0);
        assert_eq!(r.len(), 1000);
        for (j, v) in r.iter().enumerate().skip(20).take(900) {
            let want = (2.0 * std::f64::consts::PI * 5.0 * j as f64 / 100.0).sin() as f32;
            assert!((v - want).abs() < 0.02, "{j}: {v} vs {want}");
        }
        // 120 Hz would alias to 20 Hz at 100 Hz without the low-pass.
        let fast: Vec<f32> =
            (0..5000).map(|i| (2.0 * std::f64::consts::PI * 120.0 * i as f64 / fs).sin() as f32).collect();
        let r = resample(&fast, fs, 100.0);
        let peak = r[50..950].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(peak < 0.02, "aliased amplitude {peak}");
        let with_nan = resample(&[f32::NAN; 10], 500.0, 100.0);
        assert_eq!(with_nan, vec![0.0, 0.0]);
    }

    #[test]
    fn signals_spread_over_two_files_and_a_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let a = write_record(
            &dir.path().join("a"),
            500.0,
            &["I"],
            &[vec![0.5, -0.25, 1.0]],
            SignalFormat::F16,
            &[200.0],
            &[0],
        )
        .unwrap();
        let b = write_record(
            &dir.path().join("b"),
            500.0,
            &["II"],
            &[vec![0.1, 0.2, 0.3]],
            SignalFormat::F212,
            &[100.0],
            &[7],
        )
        .unwrap();
        // b.dat again, behind 4 bytes of preamble.
        let mut shifted = vec![9u8; 4];
        shifted.extend(std::fs::read(dir.path().join("b.dat")).unwrap());
        std::fs::write(dir.path().join("c.dat"), shifted).unwrap();
        std::fs::write(dir.path().join("ab.hea"), "ab 3 500 3\na.dat 16 200(0)/mV 16 0 0 0 0 I\nb.dat 212 100(7)/mV 12 0 0 0 0 II\nc.dat 212+4 100(7)/mV 12 0 0 0 0 II copy\n").unwrap();
        let rec = read_record(&dir.path().join("ab")).unwrap();
        assert_eq!(rec.adc, vec![a.adc[0].clone(), b.adc[0].clone(), b.adc[0].clone()]);
        assert_eq!(rec.physical()[0], vec![0.5, -0.25, 1.0]);
        assert_eq!(rec.signals[2].description, "II copy");
    }

    #[test]
    fn rewriting_keeps_the_base_time_and_date_and_the_checksum_as_written() {
        let dir = tempfile::tempdir().unwrap();
        // Frames of leads (I, II, III). Lead I sums to -1819, stored unsigned as 63717 (as
        // MIMIC-IV-ECG writes it); lead II sums to -1, stored signed (as wfdb-python writes it);
        // lead III's stored checksum is wrong, so it is recomputed.
        let samples: [i16; 6] = [30000, -2, 4, -31819, 1, 5];
        let bytes: Vec<u8> = samples.iter().flat_map(|v| v.to_le_bytes()).collect();
        let src = dir.path().join("40689238");
        std::fs::write(src.with_extension("dat"), bytes).unwrap();
        std::fs::write(
            src.with_extension("hea"),
            "40689238 3 500 2 13:25:31 04/08/2181\n\
             40689238.dat 16 200(0)/mV 16 0 30000 63717 0 I\n\
             40689238.dat 16 200(0)/mV 16 0 -2 -1 0 II\n\
             40689238.dat 16 200(0)/mV 16 0 4 77 0 III\n",
        )
        .unwrap();
        let rec = read_record(&src).unwrap();
        let out = dir.path().join("enc-1");
        rec.write(&out).unwrap();
        let text = std::fs::read_to_string(out.with_extension("hea")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "enc-1 3 500 2 13:25:31 04/08/2181", "{text}");
        let checksum_field = |line: &str| line.split_whitespace().nth(6).unwrap_or_default().to_string();
        assert_eq!(checksum_field(lines[1]), "63717", "{text}");
        assert_eq!(checksum_field(lines[2]), "-1", "{text}");
        assert_eq!(checksum_field(lines[3]), "9", "{text}");
        let back = read_record(&out).unwrap();
        assert_eq!((back.base_time.as_deref(), back.base_date.as_deref()), (Some("13:25:31"), Some("04/08/2181")));
        assert!(back.checksum_mismatches().is_empty());
        assert_eq!(back.adc, rec.adc);
    }
}
