#!/usr/bin/env python3
"""WFDB parity fixtures for medtvt-data, made with the reference `wfdb` package (and pydicom).

Modes (run from the repository root):
    .venv/bin/python scripts/make_data_fixtures.py            # write data/tests/fixtures/wfdb/
    .venv/bin/python scripts/make_data_fixtures.py verify STEM EXPECTED.json

Default mode writes, into data/tests/fixtures/wfdb/:
  - wf16.hea/.dat, wf212.hea/.dat: 12-lead, 500 Hz, 2 s records written by wfdb.wrsamp in formats
    16 and 212 with odd gains and baselines and a few invalid samples, and wf16.json / wf212.json
    holding what wfdb.rdrecord reads back (p_signal per lead, null for NaN, plus the header fields);
  - real_ecg.hea/.dat: pydicom's real 12-lead resting ECG (waveform_ecg.dcm, 1000 Hz, 10 s, MIT
    licence) converted to WFDB format 16, and real_ecg.json with wfdb's reading of its first
    samples and per-lead means;
  - ours16.json / ours212.json: wfdb's reading of ours16 / ours212, the records that OUR writer
    produced (committed beside them by the Rust test `wfdb_parity` when MEDTVT_BLESS=1); skipped
    when those records are not there yet.

verify mode reads STEM with wfdb.rdrecord and compares it with EXPECTED.json (same layout as
above): exit status 0 when every physical value agrees within 1e-6 relative (and the header
fields match), 1 otherwise. The Rust tests call it on records written by our writer.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import wfdb

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "tests" / "fixtures" / "wfdb"
LEADS = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def describe(record):
    """The JSON layout shared by the fixtures and verify mode."""
    p = record.p_signal
    return {
        "record": record.record_name,
        "fs": float(record.fs),
        "n_samples": int(record.sig_len),
        "sig_name": list(record.sig_name),
        "fmt": [int(f) for f in record.fmt],
        "adc_gain": [float(g) for g in record.adc_gain],
        "baseline": [int(b) for b in record.baseline],
        "units": list(record.units),
        "p_signal": [[None if math.isnan(v) else float(v) for v in p[:, i]] for i in range(p.shape[1])],
    }


def synthetic(fmt, seed):
    rng = np.random.default_rng(seed)
    fs, n = 500, 1000
    t = np.arange(n) / fs
    gains = [200.0, 1000.0, 437.5, 123.25, 800.0, 77.0, 250.0, 1500.0, 333.0, 200.0, 612.5, 95.0]
    baselines = [0, -123, 77, 1024, -5, 3, 0, -1000, 250, 12, -64, 999]
    if fmt == "212":
        gains = [g / 4 for g in gains]
        baselines = [b // 4 for b in baselines]
    d = np.zeros((n, 12), dtype=np.int64)
    lo, hi = (-2047, 2047) if fmt == "212" else (-32767, 32767)
    for i in range(12):
        phys = 1.2 * np.sin(2 * np.pi * (1 + i) * t) + 0.1 * rng.standard_normal(n)
        d[:, i] = np.clip(np.round(phys * gains[i] + baselines[i]), lo, hi)
    invalid = -2048 if fmt == "212" else -32768
    d[5, 2] = invalid
    d[700, 9] = invalid
    name = "wf" + fmt
    wfdb.wrsamp(name, fs=fs, units=["mV"] * 12, sig_name=LEADS, d_signal=d, fmt=[fmt] * 12,
                adc_gain=gains, baseline=baselines, write_dir=str(OUT))
    rec = wfdb.rdrecord(str(OUT / name))
    (OUT / f"{name}.json").write_text(json.dumps(describe(rec)))


def real_ecg():
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    wave = ds.WaveformSequence[0]
    names = []
    for ch in wave.ChannelDefinitionSequence:
        meaning = ch.ChannelSourceSequence[0].CodeMeaning
        names.append(meaning.replace("Lead ", "").replace(" (Einthoven)", "").strip())
    microvolts = ds.waveform_array(0)  # [samples, 12], sensitivity applied, in uV
    sens = float(wave.ChannelDefinitionSequence[0].ChannelSensitivity)
    d = np.round(microvolts / sens).astype(np.int64)
    gain = 1000.0 / sens  # adu per mV
    wfdb.wrsamp("real_ecg", fs=float(wave.SamplingFrequency), units=["mV"] * 12, sig_name=names,
                d_signal=d, fmt=["16"] * 12, adc_gain=[gain] * 12, baseline=[0] * 12,
                comments=["pydicom waveform_ecg.dcm (MIT licence), converted by make_data_fixtures.py"],
                write_dir=str(OUT))
    rec = wfdb.rdrecord(str(OUT / "real_ecg"))
    summary = describe(rec)
    summary["p_signal"] = [lead[:20] for lead in summary["p_signal"]]
    summary["mean"] = [float(np.mean(rec.p_signal[:, i])) for i in range(12)]
    (OUT / "real_ecg.json").write_text(json.dumps(summary))


def verify(stem, expected_path):
    expected = json.loads(Path(expected_path).read_text())
    got = describe(wfdb.rdrecord(stem))
    problems = []
    for key in ["fs", "n_samples", "sig_name", "fmt", "adc_gain", "baseline", "units"]:
        if got[key] != expected[key]:
            problems.append(f"{key}: wfdb reads {got[key]!r}, expected {expected[key]!r}")
    worst = 0.0
    for lead, (a, b) in enumerate(zip(got["p_signal"], expected["p_signal"])):
        if len(a) != len(b):
            problems.append(f"lead {lead}: {len(a)} samples, expected {len(b)}")
            continue
        for i, (x, y) in enumerate(zip(a, b)):
            if (x is None) != (y is None):
                problems.append(f"lead {lead} sample {i}: {x} vs {y}")
            elif x is not None:
                rel = abs(x - y) / max(abs(y), 1e-9)
                worst = max(worst, rel if abs(y) > 1e-9 else abs(x - y))
    if worst > 1e-6:
        problems.append(f"largest relative difference {worst:.3g} > 1e-6")
    for p in problems[:20]:
        print(p)
    print("ok" if not problems else "MISMATCH", f"max_rel={worst:.3g}")
    return 0 if not problems else 1


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "verify":
        sys.exit(verify(sys.argv[2], sys.argv[3]))
    if len(sys.argv) != 1:
        sys.exit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    synthetic("16", 1)
    synthetic("212", 2)
    real_ecg()
    for name in ["ours16", "ours212"]:
        if (OUT / f"{name}.hea").exists():
            (OUT / f"{name}.json").write_text(json.dumps(describe(wfdb.rdrecord(str(OUT / name)))))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
