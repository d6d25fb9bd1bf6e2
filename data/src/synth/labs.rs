//! Synthetic blood tests in the MIMIC-IV labevents schema. Which panels are ordered depends on
//! what a clinician would suspect (troponin when chest pain is likely, lactate in sepsis, ...),
//! values of healthy items fall inside their reference ranges with a few mild outliers, and the
//! basic panels are drawn twice (12 h apart) so that "latest value" matters.
//!
//! Disease traces (when the sign is expressed): CAD raises troponin T (and LDL); acute renal
//! failure raises creatinine and urea nitrogen, often potassium; diabetes raises glucose and
//! HbA1c; sepsis raises lactate and white cells; pneumonia raises white cells and CRP.

use crate::labs::{item_index, LabEvent, LAB_ITEMS};
use crate::time::format_datetime;
use rand::Rng;

/// Lab signs the encounter's diseases express.
#[derive(Debug, Clone, Copy, Default)]
pub struct LabSigns {
    pub troponin: bool,
    pub ldl: bool,
    pub renal: bool,
    pub potassium: bool,
    pub glucose: bool,
    pub hba1c: bool,
    pub lactate: bool,
    pub wbc_high: bool,
    pub wbc_moderate: bool,
    pub crp: bool,
    /// Suspicion that makes a clinician order the disease-specific tests.
    pub suspect_cardiac: bool,
    pub suspect_sepsis: bool,
    pub suspect_diabetes: bool,
    pub suspect_infection: bool,
}

/// Identifiers and time of the encounter's blood draw.
#[derive(Debug, Clone, Copy)]
pub struct LabContext {
    pub subject_id: u64,
    pub hadm_id: u64,
    /// Seconds since 1970 of the latest draw.
    pub draw_time: i64,
    /// First labevent_id to use.
    pub first_event_id: u64,
}

const BMP: [u32; 11] = [50912, 51006, 50971, 50983, 50931, 50902, 50882, 50868, 50893, 50960, 50970];
const CBC: [u32; 13] = [51301, 51222, 51221, 51265, 51279, 51248, 51249, 51250, 51277, 51256, 51244, 51254, 51200];
const LFT: [u32; 6] = [50861, 50878, 50863, 50885, 50862, 50976];
const COAG: [u32; 3] = [51237, 51274, 51275];
const CARDIAC: [u32; 4] = [51003, 50910, 50911, 50954];
const LIPIDS: [u32; 4] = [50907, 50904, 50905, 51000];
const GAS: [u32; 5] = [50820, 50818, 50821, 50802, 50813];

/// A value inside the item's reference range (rarely a mild outlier).
fn healthy(rng: &mut impl Rng, itemid: u32) -> f64 {
    let Some(item) = item_index(itemid).map(|i| LAB_ITEMS[i]) else { return 0.0 };
    let span = item.ref_high - item.ref_low;
    let u: f64 = if rng.random_bool(0.015) {
        if rng.random_bool(0.5) {
            rng.random_range(1.03..1.2)
        } else {
            rng.random_range(-0.2..-0.03)
        }
    } else {
        (0.5 + 0.17 * (rng.random::<f64>() + rng.random::<f64>() + rng.random::<f64>() - 1.5) * 2.0).clamp(0.03, 0.97)
    };
    (item.ref_low + u * span).max(if item.ref_low >= 0.0 { span * 0.05 } else { f64::MIN })
}

fn log_uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    (rng.random_range(lo.ln()..hi.ln())).exp()
}

/// The disease-shifted value of an item, if a sign shifts it.
fn shifted(rng: &mut impl Rng, itemid: u32, s: &LabSigns) -> Option<f64> {
    Some(match itemid {
        51003 if s.troponin => log_uniform(rng, 0.05, 1.5),
        50905 if s.ldl => rng.random_range(135.0..190.0),
        50912 if s.renal => rng.random_range(2.0..6.0),
        51006 if s.renal => rng.random_range(35.0..110.0),
        50971 if s.potassium => rng.random_range(5.6..6.8),
        50931 if s.glucose => rng.random_range(190.0..380.0),
        50852 if s.hba1c => rng.random_range(7.0..11.5),
        50813 if s.lactate => rng.random_range(2.6..7.0),
        51301 if s.wbc_high => rng.random_range(14.0..28.0),
        51301 if s.wbc_moderate => rng.random_range(12.0..19.0),
        50889 if s.crp => rng.random_range(40.0..200.0),
        _ => return None,
    })
}

/// Decimals a value of this item is reported with.
fn decimals(itemid: u32) -> usize {
    let Some(item) = item_index(itemid).map(|i| LAB_ITEMS[i]) else { return 1 };
    let span = item.ref_high - item.ref_low;
    if span <= 0.2 {
        3
    } else if span <= 2.0 {
        2
    } else if span <= 20.0 {
        1
    } else {
        0
    }
}

/// Draws the encounter's lab rows (chronological).
pub fn synthesize_labs(rng: &mut impl Rng, s: &LabSigns, ctx: &LabContext) -> Vec<LabEvent> {
    let mut ordered: Vec<u32> = Vec::new();
    let mut order = |rng: &mut dyn rand::RngCore, items: &[u32], p: f64| {
        if rng.random_bool(p) {
            ordered.extend_from_slice(items);
        }
    };
    order(rng, &BMP, 0.95);
    order(rng, &CBC, 0.92);
    order(rng, &LFT, 0.45);
    order(rng, &COAG, 0.45);
    order(rng, &CARDIAC, if s.suspect_cardiac { 0.9 } else { 0.35 });
    order(rng, &LIPIDS, if s.suspect_cardiac { 0.5 } else { 0.2 });
    order(rng, &GAS, if s.suspect_sepsis { 0.9 } else { 0.25 });
    order(rng, &[50852], if s.suspect_diabetes { 0.85 } else { 0.15 });
    order(rng, &[50889], if s.suspect_infection { 0.75 } else { 0.25 });
    order(rng, &[50963], 0.25);
    order(rng, &[50993], 0.15);

    let mut events = Vec::new();
    let mut next_id = ctx.first_event_id;
    // The basic panels are drawn twice; the earlier draw is closer to normal.
    for (draw, time) in [(0, ctx.draw_time - 12 * 3600), (1, ctx.draw_time)] {
        let specimen = ctx.hadm_id * 10 + draw;
        for &itemid in &ordered {
            let basic = BMP.contains(&itemid) || CBC.contains(&itemid);
            if draw == 0 && (!basic || rng.random_bool(0.4)) {
                continue;
            }
            let target = shifted(rng, itemid, s);
            let mut value = match target {
                Some(v) if draw == 1 => v,
                Some(v) => (v + healthy(rng, itemid)) / 2.0,
                None => healthy(rng, itemid),
            };
            if itemid == 50931 && target.is_none() && rng.random_bool(0.1) {
                value = rng.random_range(105.0..165.0); // stress hyperglycaemia
            }
            events.push(lab_row(itemid, value, time, specimen, next_id, ctx));
            next_id += 1;
        }
    }
    events
}

fn lab_row(itemid: u32, value: f64, time: i64, specimen: u64, id: u64, ctx: &LabContext) -> LabEvent {
    let item = item_index(itemid).map(|i| LAB_ITEMS[i]).unwrap_or(LAB_ITEMS[0]);
    let text = format!("{value:.*}", decimals(itemid));
    let valuenum: f64 = text.parse().unwrap_or(value);
    let abnormal = valuenum < item.ref_low || valuenum > item.ref_high;
    LabEvent {
        labevent_id: Some(id),
        subject_id: Some(ctx.subject_id),
        hadm_id: Some(ctx.hadm_id),
        specimen_id: Some(specimen),
        itemid,
        order_provider_id: None,
        charttime: format_datetime(time),
        storetime: Some(format_datetime(time + 3600)),
        value: Some(text),
        valuenum: Some(valuenum),
        valueuom: Some(item.unit.to_string()),
        ref_range_lower: Some(item.ref_low),
        ref_range_upper: Some(item.ref_high),
        flag: abnormal.then(|| "abnormal".to_string()),
        priority: Some(if abnormal { "STAT" } else { "ROUTINE" }.to_string()),
        comments: None,
    }
}
