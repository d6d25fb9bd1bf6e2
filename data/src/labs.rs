//! Blood tests: rows of MIMIC-IV `hosp/labevents.csv` ([`LabEvent`]), the 50 lab items the model
//! sees ([`LAB_ITEMS`], real MIMIC-IV `d_labitems` ids), per-item percentile tables fitted on the
//! training split ([`LabPercentiles`]) and the model's 100-number lab vector ([`lab_vector`]).
//!
//! The lab vector (documented choice): for each of the 50 items in [`LAB_ITEMS`] order, the
//! within-population percentile in [0, 1] of the item's latest value (by `charttime`, ties go to
//! the later row); then 50 missingness flags (1 = no value). A missing item gets percentile 0.5
//! (median imputation, so a model that ignores the flags sees a typical patient) and flag 1. An
//! item the training split never measured also reads 0.5, with flag 0 when the patient has it.

use crate::error::DataError;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;

/// One lab item of the model's vector: MIMIC-IV itemid, name, unit and a typical adult
/// reference range (used by the synthetic generator and as a fallback when a row has none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LabItem {
    pub itemid: u32,
    pub name: &'static str,
    pub unit: &'static str,
    pub ref_low: f64,
    pub ref_high: f64,
}

const fn item(itemid: u32, name: &'static str, unit: &'static str, ref_low: f64, ref_high: f64) -> LabItem {
    LabItem { itemid, name, unit, ref_low, ref_high }
}

/// Number of lab items in the model's vector.
pub const N_LAB_ITEMS: usize = 50;
/// Length of the model's lab vector (percentiles, then missingness flags).
pub const LAB_VECTOR_LEN: usize = 2 * N_LAB_ITEMS;

/// The 50 lab items, in vector order: the ten the diseases need first, then common chemistry,
/// haematology, liver, coagulation, cardiac, lipid, inflammation and blood-gas items.
pub const LAB_ITEMS: [LabItem; N_LAB_ITEMS] = [
    item(50912, "creatinine", "mg/dL", 0.5, 1.2),
    item(51006, "urea nitrogen", "mg/dL", 6.0, 20.0),
    item(50971, "potassium", "mEq/L", 3.3, 5.1),
    item(50983, "sodium", "mEq/L", 133.0, 145.0),
    item(50931, "glucose", "mg/dL", 70.0, 100.0),
    item(50852, "hemoglobin A1c", "%", 4.0, 6.0),
    item(51003, "troponin T", "ng/mL", 0.0, 0.01),
    item(50813, "lactate", "mmol/L", 0.5, 2.0),
    item(51301, "white blood cells", "K/uL", 4.0, 11.0),
    item(51222, "hemoglobin", "g/dL", 12.0, 16.0),
    item(50902, "chloride", "mEq/L", 96.0, 108.0),
    item(50882, "bicarbonate", "mEq/L", 22.0, 32.0),
    item(50868, "anion gap", "mEq/L", 8.0, 20.0),
    item(50893, "calcium, total", "mg/dL", 8.4, 10.3),
    item(50960, "magnesium", "mg/dL", 1.6, 2.6),
    item(50970, "phosphate", "mg/dL", 2.7, 4.5),
    item(51221, "hematocrit", "%", 36.0, 48.0),
    item(51265, "platelet count", "K/uL", 150.0, 440.0),
    item(51279, "red blood cells", "m/uL", 4.2, 5.4),
    item(51248, "MCH", "pg", 26.0, 32.0),
    item(51249, "MCHC", "g/dL", 31.0, 37.0),
    item(51250, "MCV", "fL", 82.0, 98.0),
    item(51277, "RDW", "%", 10.5, 15.5),
    item(50861, "alanine aminotransferase", "IU/L", 0.0, 40.0),
    item(50878, "aspartate aminotransferase", "IU/L", 0.0, 40.0),
    item(50863, "alkaline phosphatase", "IU/L", 35.0, 105.0),
    item(50885, "bilirubin, total", "mg/dL", 0.0, 1.5),
    item(50862, "albumin", "g/dL", 3.5, 5.2),
    item(50976, "protein, total", "g/dL", 6.4, 8.3),
    item(51237, "INR(PT)", "", 0.9, 1.1),
    item(51274, "PT", "sec", 9.4, 12.5),
    item(51275, "PTT", "sec", 25.0, 36.5),
    item(50910, "creatine kinase", "IU/L", 51.0, 294.0),
    item(50911, "creatine kinase MB", "ng/mL", 0.0, 10.0),
    item(50954, "lactate dehydrogenase", "IU/L", 94.0, 250.0),
    item(50907, "cholesterol, total", "mg/dL", 0.0, 199.0),
    item(50904, "cholesterol, HDL", "mg/dL", 40.0, 90.0),
    item(50905, "cholesterol, LDL", "mg/dL", 0.0, 129.0),
    item(51000, "triglycerides", "mg/dL", 0.0, 150.0),
    item(50889, "C-reactive protein", "mg/L", 0.0, 5.0),
    item(50963, "NT-proBNP", "pg/mL", 0.0, 353.0),
    item(50993, "thyroid stimulating hormone", "uIU/mL", 0.27, 4.2),
    item(50820, "pH", "units", 7.35, 7.45),
    item(50818, "pCO2", "mm Hg", 35.0, 45.0),
    item(50821, "pO2", "mm Hg", 85.0, 105.0),
    item(50802, "base excess", "mEq/L", -2.0, 3.0),
    item(51256, "neutrophils", "%", 50.0, 70.0),
    item(51244, "lymphocytes", "%", 18.0, 42.0),
    item(51254, "monocytes", "%", 2.0, 11.0),
    item(51200, "eosinophils", "%", 0.0, 7.0),
];

/// Position of an itemid in [`LAB_ITEMS`].
pub fn item_index(itemid: u32) -> Option<usize> {
    LAB_ITEMS.iter().position(|i| i.itemid == itemid)
}

/// The MIMIC-IV labevents columns, in the file's order.
pub const LABEVENTS_COLUMNS: [&str; 16] = [
    "labevent_id",
    "subject_id",
    "hadm_id",
    "specimen_id",
    "itemid",
    "order_provider_id",
    "charttime",
    "storetime",
    "value",
    "valuenum",
    "valueuom",
    "ref_range_lower",
    "ref_range_upper",
    "flag",
    "priority",
    "comments",
];

/// Columns a lab file must have.
pub const REQUIRED_COLUMNS: [&str; 7] =
    ["itemid", "charttime", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag"];

/// One row of labevents. Optional columns are `None` when absent or empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabEvent {
    pub labevent_id: Option<u64>,
    pub subject_id: Option<u64>,
    pub hadm_id: Option<u64>,
    pub specimen_id: Option<u64>,
    pub itemid: u32,
    pub order_provider_id: Option<String>,
    /// `YYYY-MM-DD HH:MM:SS`.
    pub charttime: String,
    pub storetime: Option<String>,
    pub value: Option<String>,
    pub valuenum: Option<f64>,
    pub valueuom: Option<String>,
    pub ref_range_lower: Option<f64>,
    pub ref_range_upper: Option<f64>,
    /// `abnormal` or empty in MIMIC-IV.
    pub flag: Option<String>,
    pub priority: Option<String>,
    pub comments: Option<String>,
}

impl LabEvent {
    /// Whether the value lies outside its reference range (the row's, else the item table's).
    pub fn is_abnormal(&self) -> bool {
        if self.flag.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("abnormal")) {
            return true;
        }
        let (Some(v), Some(lo), Some(hi)) = (self.valuenum, self.ref_range_lower, self.ref_range_upper) else {
            return false;
        };
        v < lo || v > hi
    }
}

/// Checks a MIMIC timestamp `YYYY-MM-DD HH:MM:SS` (fractional seconds allowed).
pub fn check_timestamp(t: &str) -> bool {
    let b = t.as_bytes();
    if b.len() < 19 {
        return false;
    }
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    digits.iter().all(|&i| b[i].is_ascii_digit())
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b' ' || b[10] == b'T')
        && b[13] == b':'
        && b[16] == b':'
}

/// A labevents row that could not be parsed, with what could still be read of it: the subject
/// and chart time say which sample's lab window the row belonged to.
#[derive(Debug)]
pub struct BadLabRow {
    /// Names the file, line and column.
    pub error: DataError,
    pub subject_id: Option<u64>,
    /// `charttime` as written, when it is a valid timestamp.
    pub charttime: Option<String>,
}

/// Reads the header line of a CSV file; an empty file is said to be empty (rather than every
/// column being reported missing).
pub(crate) fn csv_header<R: Read>(path: &Path, reader: &mut csv::Reader<R>) -> Result<csv::StringRecord, DataError> {
    let header = reader
        .headers()
        .map_err(|e| DataError::Csv {
            path: path.to_path_buf(),
            line: 1,
            column: "header".into(),
            problem: e.to_string(),
        })?
        .clone();
    if header.iter().all(|h| h.trim().is_empty()) {
        return Err(DataError::EmptyFile { path: path.to_path_buf() });
    }
    Ok(header)
}

/// Streams the rows of a labevents CSV (plain, or gzip when the name ends in `.gz`) to `f`; a bad
/// row is passed on as a [`BadLabRow`] whose error names file, line and column (the caller
/// decides whether to stop). An empty file, a missing required column or an unreadable file is an
/// error of the whole call.
pub fn for_each_lab_row(
    path: &Path,
    mut f: impl FnMut(Result<LabEvent, BadLabRow>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let reader = open_maybe_gz(path)?;
    // Flexible so that a row with the wrong number of fields still reaches `parse_row`, which
    // says so and keeps what it can read of the row.
    let mut rdr = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
    let headers = csv_header(path, &mut rdr)?;
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    for name in REQUIRED_COLUMNS {
        if col(name).is_none() {
            return Err(DataError::Csv {
                path: path.to_path_buf(),
                line: 1,
                column: name.into(),
                problem: "required column is missing from the header".into(),
            });
        }
    }
    let idx: Vec<Option<usize>> = LABEVENTS_COLUMNS.iter().map(|c| col(c)).collect();
    let mut record = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                let parsed = if record.len() != headers.len() {
                    let problem = format!("the row has {} fields, the header {}", record.len(), headers.len());
                    Err(DataError::Csv { path: path.to_path_buf(), line, column: "-".into(), problem })
                } else {
                    parse_row(path, line, &record, &idx)
                };
                f(parsed.map_err(|error| BadLabRow {
                    error,
                    subject_id: lenient_subject(&record, &idx),
                    charttime: lenient_time(&record, &idx),
                }))?;
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let bad = DataError::Csv { path: path.to_path_buf(), line, column: "-".into(), problem: e.to_string() };
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(bad);
                }
                f(Err(BadLabRow { error: bad, subject_id: None, charttime: None }))?;
            }
        }
    }
}

/// The subject of a row that failed to parse, if that cell is readable.
fn lenient_subject(rec: &csv::StringRecord, idx: &[Option<usize>]) -> Option<u64> {
    idx[1].and_then(|i| rec.get(i)).and_then(|s| s.trim().parse().ok())
}

/// The chart time of a row that failed to parse, if that cell is a valid timestamp.
fn lenient_time(rec: &csv::StringRecord, idx: &[Option<usize>]) -> Option<String> {
    idx[6].and_then(|i| rec.get(i)).map(str::trim).filter(|t| check_timestamp(t)).map(str::to_string)
}

/// Reads a whole lab CSV; the first bad row is an error.
pub fn read_lab_csv(path: &Path) -> Result<Vec<LabEvent>, DataError> {
    let mut out = Vec::new();
    for_each_lab_row(path, |e| {
        out.push(e.map_err(|bad| bad.error)?);
        Ok(())
    })?;
    Ok(out)
}

/// Opens a file, decompressing gzip when its name ends in `.gz`.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let buffered = std::io::BufReader::new(file);
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buffered)))
    } else {
        Ok(Box::new(buffered))
    }
}

fn parse_row(path: &Path, line: u64, rec: &csv::StringRecord, idx: &[Option<usize>]) -> Result<LabEvent, DataError> {
    let get = |k: usize| -> Option<&str> { idx[k].and_then(|i| rec.get(i)).map(str::trim).filter(|s| !s.is_empty()) };
    let bad = |k: usize, problem: String| DataError::Csv {
        path: path.to_path_buf(),
        line,
        column: LABEVENTS_COLUMNS[k].into(),
        problem,
    };
    let int = |k: usize| -> Result<Option<u64>, DataError> {
        get(k).map(|s| s.parse::<u64>().map_err(|_| bad(k, format!("{s:?} is not an id")))).transpose()
    };
    let num = |k: usize| -> Result<Option<f64>, DataError> {
        get(k)
            .map(|s| match s.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(bad(k, format!("{s:?} is not a number"))),
            })
            .transpose()
    };
    let text = |k: usize| get(k).map(str::to_string);
    let itemid = get(4).ok_or_else(|| bad(4, "empty".into()))?;
    let itemid = itemid.parse::<u32>().map_err(|_| bad(4, format!("{itemid:?} is not an itemid")))?;
    let charttime = get(6).ok_or_else(|| bad(6, "empty".into()))?;
    if !check_timestamp(charttime) {
        return Err(bad(6, format!("{charttime:?} is not YYYY-MM-DD HH:MM:SS")));
    }
    Ok(LabEvent {
        labevent_id: int(0)?,
        subject_id: int(1)?,
        hadm_id: int(2)?,
        specimen_id: int(3)?,
        itemid,
        order_provider_id: text(5),
        charttime: charttime.to_string(),
        storetime: text(7),
        value: text(8),
        valuenum: num(9)?,
        valueuom: text(10),
        ref_range_lower: num(11)?,
        ref_range_upper: num(12)?,
        flag: text(13),
        priority: text(14),
        comments: text(15),
    })
}

/// Writes rows in the full MIMIC-IV labevents schema (empty cells for `None`).
pub fn write_lab_csv(path: &Path, events: &[LabEvent]) -> Result<(), DataError> {
    let io = |e: csv::Error| DataError::Csv {
        path: path.to_path_buf(),
        line: 0,
        column: "-".into(),
        problem: e.to_string(),
    };
    let mut w = csv::Writer::from_path(path).map_err(io)?;
    w.write_record(LABEVENTS_COLUMNS).map_err(io)?;
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let n = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for e in events {
        w.write_record([
            n(e.labevent_id),
            n(e.subject_id),
            n(e.hadm_id),
            n(e.specimen_id),
            e.itemid.to_string(),
            s(&e.order_provider_id),
            e.charttime.clone(),
            s(&e.storetime),
            s(&e.value),
            f(e.valuenum),
            s(&e.valueuom),
            f(e.ref_range_lower),
            f(e.ref_range_upper),
            s(&e.flag),
            s(&e.priority),
            s(&e.comments),
        ])
        .map_err(io)?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}

/// The latest numeric value of each of the 50 items (`None` when the item has none).
pub fn latest_values(events: &[LabEvent]) -> [Option<&LabEvent>; N_LAB_ITEMS] {
    let mut latest: [Option<&LabEvent>; N_LAB_ITEMS] = [None; N_LAB_ITEMS];
    for e in events {
        let (Some(i), Some(_)) = (item_index(e.itemid), e.valuenum) else { continue };
        if latest[i].is_none_or(|prev| e.charttime >= prev.charttime) {
            latest[i] = Some(e);
        }
    }
    latest
}

/// Number of quantiles stored per item (0%, 1%, ..., 100%).
const N_QUANTILES: usize = 101;

/// Per-item quantile tables fitted on the training split: `quantiles[i]` holds the 0..=100th
/// percentiles of the latest values of item `LAB_ITEMS[i]` over the training encounters (empty
/// when no training encounter has that item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabPercentiles {
    pub itemids: Vec<u32>,
    pub counts: Vec<usize>,
    pub quantiles: Vec<Vec<f64>>,
}

impl LabPercentiles {
    /// Fits the tables on the latest value per item of each training encounter.
    pub fn fit<'a>(encounters: impl IntoIterator<Item = &'a [LabEvent]>) -> Self {
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); N_LAB_ITEMS];
        for events in encounters {
            for (i, e) in latest_values(events).iter().enumerate() {
                if let Some(v) = e.and_then(|e| e.valuenum) {
                    values[i].push(v);
                }
            }
        }
        let quantiles = values
            .iter_mut()
            .map(|v| {
                v.sort_by(f64::total_cmp);
                if v.is_empty() {
                    return Vec::new();
                }
                (0..N_QUANTILES)
                    .map(|q| {
                        let pos = q as f64 / (N_QUANTILES - 1) as f64 * (v.len() - 1) as f64;
                        let lo = pos.floor() as usize;
                        let hi = pos.ceil() as usize;
                        v[lo] + (pos - lo as f64) * (v[hi] - v[lo])
                    })
                    .collect()
            })
            .collect();
        LabPercentiles {
            itemids: LAB_ITEMS.iter().map(|i| i.itemid).collect(),
            counts: values.iter().map(Vec::len).collect(),
            quantiles,
        }
    }

    /// The percentile in [0, 1] of `value` for item index `i` (0.5 when the item was not fitted).
    /// Inside a run of equal quantiles (a value many patients share) the middle of the run is used.
    pub fn percentile(&self, i: usize, value: f64) -> f32 {
        let q = &self.quantiles[i];
        if q.is_empty() {
            return 0.5;
        }
        let last = q.len() - 1;
        if value <= q[0] {
            return if value < q[0] { 0.0 } else { mid_run(q, 0) };
        }
        if value >= q[last] {
            return if value > q[last] { 1.0 } else { mid_run(q, last) };
        }
        let hi = q.partition_point(|&x| x < value);
        if q[hi] == value {
            return mid_run(q, hi);
        }
        let lo = hi - 1;
        let frac = (value - q[lo]) / (q[hi] - q[lo]);
        ((lo as f64 + frac) / last as f64) as f32
    }

    /// Writes the tables as JSON.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let text = serde_json::to_string(self)
            .map_err(|e| DataError::Json { path: path.to_path_buf(), problem: e.to_string() })?;
        std::fs::write(path, text).map_err(|e| DataError::io(path, e))
    }

    /// Reads and checks tables written by [`LabPercentiles::save`].
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let json = |problem: String| DataError::Json { path: path.to_path_buf(), problem };
        let p: LabPercentiles = serde_json::from_str(&text).map_err(|e| json(e.to_string()))?;
        let want: Vec<u32> = LAB_ITEMS.iter().map(|i| i.itemid).collect();
        if p.itemids != want {
            return Err(json("field `itemids` does not list the 50 lab items in table order".into()));
        }
        if p.quantiles.len() != N_LAB_ITEMS || p.counts.len() != N_LAB_ITEMS {
            return Err(json(format!("fields `quantiles` and `counts` need {N_LAB_ITEMS} entries")));
        }
        for (i, q) in p.quantiles.iter().enumerate() {
            if !(q.is_empty() || q.len() == N_QUANTILES)
                || q.windows(2).any(|w| w[0].partial_cmp(&w[1]).is_none_or(|o| o.is_gt()))
            {
                return Err(json(format!(
                    "field `quantiles[{i}]` (itemid {}) must be empty or {N_QUANTILES} ascending numbers",
                    want[i]
                )));
            }
        }
        Ok(p)
    }
}

fn mid_run(q: &[f64], at: usize) -> f32 {
    let v = q[at];
    let first = q.partition_point(|&x| x < v);
    let last = q.partition_point(|&x| x <= v) - 1;
    ((first + last) as f64 / 2.0 / (q.len() - 1) as f64) as f32
}

/// The model's lab vector: 50 percentiles then 50 missingness flags (see the module doc).
pub fn lab_vector(events: &[LabEvent], percentiles: &LabPercentiles) -> [f32; LAB_VECTOR_LEN] {
    let mut out = [0f32; LAB_VECTOR_LEN];
    for (i, e) in latest_values(events).iter().enumerate() {
        match e.and_then(|e| e.valuenum) {
            Some(v) => out[i] = percentiles.percentile(i, v),
            None => {
                out[i] = 0.5;
                out[N_LAB_ITEMS + i] = 1.0;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(itemid: u32, t: &str, v: f64) -> LabEvent {
        LabEvent {
            labevent_id: None,
            subject_id: Some(1),
            hadm_id: None,
            specimen_id: None,
            itemid,
            order_provider_id: None,
            charttime: t.into(),
            storetime: None,
            value: Some(v.to_string()),
            valuenum: Some(v),
            valueuom: Some("mg/dL".into()),
            ref_range_lower: Some(0.5),
            ref_range_upper: Some(1.2),
            flag: None,
            priority: None,
            comments: None,
        }
    }

    #[test]
    fn table_has_fifty_distinct_items_with_the_required_ids() {
        let mut ids: Vec<u32> = LAB_ITEMS.iter().map(|i| i.itemid).collect();
        for want in [50912, 51006, 50971, 50983, 50931, 50852, 51003, 50813, 51301, 51222] {
            assert!(ids.contains(&want), "{want}");
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 50);
        assert!(LAB_ITEMS.iter().all(|i| i.ref_low < i.ref_high));
    }

    #[test]
    fn lab_vector_uses_latest_value_and_flags_missing() {
        let train: Vec<Vec<LabEvent>> = (1..=100).map(|k| vec![ev(50912, "2020-01-01 00:00:00", k as f64)]).collect();
        let p = LabPercentiles::fit(train.iter().map(|v| v.as_slice()));
        let events = vec![ev(50912, "2020-01-02 10:00:00", 75.25), ev(50912, "2020-01-01 10:00:00", 1.0)];
        let v = lab_vector(&events, &p);
        assert!((v[0] - 0.75).abs() < 1e-4, "{}", v[0]);
        assert_eq!(v[50], 0.0);
        assert_eq!((v[1], v[51]), (0.5, 1.0));
        assert_eq!(p.percentile(0, -5.0), 0.0);
        assert_eq!(p.percentile(0, 1e6), 1.0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        p.save(&path).unwrap();
        assert_eq!(LabPercentiles::load(&path).unwrap(), p);
        std::fs::write(&path, "{\"itemids\": [1], \"counts\": [], \"quantiles\": []}").unwrap();
        assert!(LabPercentiles::load(&path).unwrap_err().to_string().contains("itemids"));
    }

    #[test]
    fn csv_roundtrip_and_bad_rows_name_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labs.csv");
        let events = vec![ev(50912, "2020-01-02 10:00:00", 2.5), ev(51301, "2020-01-02 11:00:00", 14.0)];
        write_lab_csv(&path, &events).unwrap();
        assert_eq!(read_lab_csv(&path).unwrap(), events);
        assert!(events[0].is_abnormal());

        let minimal = "itemid,charttime,valuenum,valueuom,ref_range_lower,ref_range_upper,flag\n\
                       50912,2020-01-01 00:00:00,1.0,mg/dL,0.5,1.2,\n50912,2020-01-01 01:00:00,high,mg/dL,0.5,1.2,\n";
        std::fs::write(&path, minimal).unwrap();
        let e = read_lab_csv(&path).unwrap_err().to_string();
        assert!(e.contains("labs.csv:3") && e.contains("valuenum") && e.contains("high"), "{e}");
        std::fs::write(&path, "itemid,charttime\n1,2020-01-01 00:00:00\n").unwrap();
        assert!(read_lab_csv(&path).unwrap_err().to_string().contains("valuenum"));
        std::fs::write(&path, minimal.replace("2020-01-01 00:00:00", "yesterday")).unwrap();
        assert!(read_lab_csv(&path).unwrap_err().to_string().contains("charttime"));
    }

    #[test]
    fn an_empty_csv_is_reported_as_empty_and_a_short_row_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labs.csv");
        for text in ["", "\n", "  \n"] {
            std::fs::write(&path, text).unwrap();
            let e = read_lab_csv(&path).unwrap_err().to_string();
            assert!(e.contains("labs.csv") && e.contains("is empty") && !e.contains("missing"), "{text:?}: {e}");
        }
        std::fs::write(&path, "subject_id,itemid,charttime,valuenum,valueuom,ref_range_lower,ref_range_upper,flag\n7,50912,2020-01-01 00:00:00,1.0\n").unwrap();
        let mut bad = None;
        for_each_lab_row(&path, |row| {
            bad = row.err();
            Ok(())
        })
        .unwrap();
        let bad = bad.expect("the short row is reported");
        assert!(
            bad.error.to_string().contains("labs.csv:2") && bad.error.to_string().contains("4 fields"),
            "{}",
            bad.error
        );
        assert_eq!((bad.subject_id, bad.charttime.as_deref()), (Some(7), Some("2020-01-01 00:00:00")));
    }
}
